//! `soma audit verify`: re-derives every hash of the ledger's chains and seals and prints what
//! broke and where. Exit 0: intact; 1: tampering found; 2: bad input or no ledger.

use std::process::ExitCode;

use soma_ledger::audit::{Scope, public_key, verify as check};

use crate::budget::Output;
use crate::ledger::{Failure, LedgerArgs, cause, connect};

/// `soma audit verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    /// Verify one Budget (`namespace/name`): every sidecar chain that charged it, its seals.
    #[arg(long, group = "scope")]
    budget: Option<String>,
    /// Verify every Budget and Agent of a namespace.
    #[arg(long, short = 'n', group = "scope")]
    namespace: Option<String>,
    /// Verify the whole ledger.
    #[arg(long, group = "scope")]
    all: bool,
    /// The operator's seal public key (base64), or a file holding it: from
    /// `kubectl -n soma-system get configmap soma-ledger-seal-key -o jsonpath='{.data.public-key}'`.
    /// Without it, seals are checked only against the key the ledger itself records.
    #[arg(long)]
    seal_public_key: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

/// Runs the verification.
pub async fn verify(args: VerifyArgs) -> Result<ExitCode, Failure> {
    let scope = match (&args.budget, &args.namespace, args.all) {
        (Some(b), _, _) => {
            b.parse::<soma_metering::BudgetKey>()
                .map_err(|_| Failure::input(format!("--budget {b:?} must be namespace/name")))?;
            Scope::Budget(b.clone())
        }
        (_, Some(n), _) => Scope::Namespace(n.clone()),
        (_, _, true) => Scope::All,
        _ => {
            return Err(Failure::input(
                "say what to verify: --budget ns/name, --namespace ns or --all",
            ));
        }
    };
    let trusted = match &args.seal_public_key {
        None => None,
        Some(k) => {
            let text = std::fs::read_to_string(k).unwrap_or_else(|_| k.clone());
            Some(public_key(&text).map_err(|_| {
                Failure::input("--seal-public-key is neither a base64 Ed25519 public key nor a file holding one")
            })?)
        }
    };
    let pool = connect(&args.ledger).await?;
    let report = check(&pool, &scope, trusted.as_ref())
        .await
        .map_err(|e| Failure::input(format!("reading the ledger: {}", cause(&e))))?;
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Output::Table => {
            for f in &report.findings {
                let mark = if f.tampering { "TAMPERED" } else { "note    " };
                println!("{mark}  {:<9} {}", f.kind, f.message);
            }
            println!(
                "checked {} records in {} sidecar chains and {} seals: {}",
                report.records,
                report.chains,
                report.seals,
                if report.tampered() {
                    "TAMPERING FOUND"
                } else {
                    "intact"
                }
            );
            if !report.trusted_key {
                println!(
                    "seal signatures were checked against the key recorded in the ledger only; pass --seal-public-key to check them against the operator's"
                );
            }
        }
    }
    Ok(if report.tampered() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
