//! `soma`: Soma's command-line tool.
//!
//! - `soma policy verify|test`: Gatekeeper suites and Rego tests, offline ([`policy`]);
//! - `soma budget report`: spend by Budget, Agent, model and day, from the ledger ([`budget`]);
//! - `soma cost --dry-run`: a request's worst-case tokens and cost, as the sidecar reserves
//!   them ([`cost`]);
//! - `soma audit verify`: the ledger's hash chains and seals ([`audit`]);
//! - `soma image verify`: container images' Cosign signatures, by Soma's own verifier
//!   ([`image`]).
//! - `soma capsule pack|push|fetch`: Capsule bundles: pack a folder reproducibly, push it to
//!   a registry, deliver exactly a verified digest into a folder ([`capsule`]).
//! - `soma dr drill|backup|restore`: DR drills of the ledger: a consistent backup, a restore
//!   into scratch, verified against the audit chain and the NATS stream, RPO and RTO ([`dr`]).
//!
//! Exit codes: 0 success, 1 the check failed (a test failed, tampering found), 2 bad input
//! (with a message on stderr saying what to fix).

mod audit;
mod budget;
mod capsule;
mod cost;
mod dr;
mod image;
mod ledger;
mod policy;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "soma", version, about = "Soma's command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// What Budgets spent, from the usage ledger.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// Estimate what a request may cost before sending it.
    Cost(cost::CostArgs),
    /// Check the ledger's audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check container images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Capsule bundles: pack, push, fetch by digest.
    Capsule {
        #[command(subcommand)]
        command: CapsuleCommand,
    },
    /// Disaster recovery: back up the ledger, restore it into scratch, verify it.
    Dr {
        #[command(subcommand)]
        command: DrCommand,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Verify images' Cosign signatures against public keys (offline: no transparency log).
    Verify(image::VerifyArgs),
}

#[derive(Subcommand)]
enum CapsuleCommand {
    /// Pack a folder of text documents into a bundle (an OCI image layout), reproducibly;
    /// prints the digest.
    Pack(capsule::PackArgs),
    /// Push a packed bundle to a registry; prints `registry/repository@digest` to sign.
    Push(capsule::PushArgs),
    /// Deliver exactly the content of a digest into a folder (an agent pod's init container).
    Fetch(capsule::FetchArgs),
}

#[derive(Subcommand)]
enum DrCommand {
    /// A drill: back up the ledger, restore it into a scratch database, verify the restore
    /// (totals, audit chain, every record against the NATS stream) and report RPO and RTO.
    Drill(dr::DrillArgs),
    /// A consistent backup of the ledger and its manifest.
    Backup(dr::BackupArgs),
    /// Restore a backup into a scratch database and verify it, as a drill does.
    Restore(dr::RestoreArgs),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run Gatekeeper Suite files (templates, constraints, cases) offline, like `gator verify`.
    Verify {
        /// A Suite file, or a directory searched recursively for Suite files (`dir/...` works).
        path: PathBuf,
        /// Only run cases whose `test/case` name matches this regular expression.
        #[arg(long)]
        run: Option<String>,
        /// Print every case, not only failures.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Run the `test_` rules of every `*_test.rego` in a directory against its other `.rego`
    /// files (Rego v1).
    Test {
        /// The directory.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum BudgetCommand {
    /// Spend by Budget, Agent, model and day for a period.
    Report(budget::ReportArgs),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chains and seals of a Budget, a namespace, or the whole ledger.
    Verify(audit::VerifyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy {
            command: PolicyCommand::Verify { path, run, verbose },
        } => policy::verify(&path, run.as_deref(), verbose),
        Command::Policy {
            command: PolicyCommand::Test { dir },
        } => policy::rego_test(&dir),
        Command::Budget {
            command: BudgetCommand::Report(args),
        } => ledger::block_on(budget::report(args)),
        Command::Cost(args) => cost::run(&args),
        Command::Audit {
            command: AuditCommand::Verify(args),
        } => ledger::block_on(audit::verify(args)),
        Command::Image {
            command: ImageCommand::Verify(args),
        } => ledger::block_on(image::verify(args)),
        Command::Capsule { command } => match command {
            CapsuleCommand::Pack(args) => match capsule::pack(&args) {
                Ok(code) => code,
                Err(f) => {
                    eprintln!("soma: {}", f.message);
                    ExitCode::from(f.code)
                }
            },
            CapsuleCommand::Push(args) => ledger::block_on(capsule::push(args)),
            CapsuleCommand::Fetch(args) => ledger::block_on(capsule::fetch(args)),
        },
        Command::Dr { command } => match command {
            DrCommand::Drill(args) => ledger::block_on(dr::drill(args)),
            DrCommand::Backup(args) => ledger::block_on(dr::backup(args)),
            DrCommand::Restore(args) => ledger::block_on(dr::restore(args)),
        },
    }
}
