//! Reaching the ledger from the command line: the URL from `--database-url` or
//! `SOMA_LEDGER_URL`, a short connect timeout, and errors that say what to fix.

use std::process::ExitCode;
use std::time::Duration;

use sqlx::postgres::PgPool;

/// `--database-url`, shared by the ledger commands.
#[derive(clap::Args, Debug)]
pub struct LedgerArgs {
    /// The ledger's PostgreSQL URL.
    #[arg(long, env = "SOMA_LEDGER_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// A failure of a command: a message for stderr and the exit code.
pub struct Failure {
    /// What went wrong, and what to do.
    pub message: String,
    /// 1: the check failed; 2: bad input or an unreachable ledger.
    pub code: u8,
}

impl Failure {
    /// Bad input (exit 2).
    pub fn input(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 2,
        }
    }
}

/// Connects and checks the connection (without the URL, which may hold a password, in any
/// message).
pub async fn connect(args: &LedgerArgs) -> Result<PgPool, Failure> {
    let url = args
        .database_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| {
            Failure::input("no ledger: pass --database-url postgres://... or set SOMA_LEDGER_URL")
        })?;
    let pool = soma_ledger::pool(url, 2, Duration::from_secs(5))
        .map_err(|_| Failure::input("--database-url is not a valid PostgreSQL URL"))?;
    sqlx::query("SELECT 1")
        .execute(&pool)
        .await
        .map_err(|e| Failure::input(format!("cannot reach the ledger: {}", cause(&e))))?;
    Ok(pool)
}

/// A database error without connection details.
pub fn cause(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::PoolTimedOut => "timed out connecting".to_owned(),
        other => other.to_string(),
    }
}

/// Runs an async command to its exit code.
pub fn block_on(command: impl std::future::Future<Output = Result<ExitCode, Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soma: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        Err(f) => {
            eprintln!("soma: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
