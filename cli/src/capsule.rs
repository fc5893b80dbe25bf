//! `soma capsule pack|push|fetch`: Capsule bundles (`soma-capsule`, docs/capsules.md).
//!
//! ```text
//!  DIR ──pack──► OCI layout (digest printed) ──push──► registry/repo:tag (digest printed)
//!                                                        │  cosign sign registry/repo@digest
//!  init container: fetch --repository registry/repo --digest D --into /capsules/<name>
//!                  (every byte checked against D; nothing written unless all of it matches)
//! ```
//!
//! Exit codes: 0 done; 1 fetched or pushed content was refused (another digest, a swapped or missing layer,
//! a malformed bundle, another policyHash); 2 bad input or an unreachable registry.

use std::path::PathBuf;
use std::process::ExitCode;

use soma_capsule::chunk::DEFAULT_MAX_BYTES;
use soma_capsule::layout::{read_layout, write_layout};
use soma_capsule::pack::{PackOptions, read_embeddings};
use soma_capsule::{Error, Registry};

use crate::ledger::Failure;

/// `soma capsule pack` arguments.
#[derive(clap::Args, Debug)]
pub struct PackArgs {
    /// The folder of UTF-8 text documents (names starting with `.` are skipped).
    pub dir: PathBuf,
    /// Where to write the bundle as an OCI image layout (absent or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// The Capsule's version (its resource's `spec.version`).
    #[arg(long)]
    pub version: String,
    /// The policy set the content was reviewed against (`sha256:<hex>`, the resource's
    /// `spec.policyHash`); signed with the content.
    #[arg(long)]
    pub policy_hash: String,
    /// Upper bound of a chunk, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_BYTES)]
    pub max_chunk_bytes: usize,
    /// Precomputed embeddings: JSON Lines of `{"id": <chunk id>, "vector": [...]}`, one per
    /// chunk in chunk order (the chunks are in the layout's chunks layer of a pack without
    /// embeddings; chunking is deterministic).
    #[arg(long, requires = "embedding_model")]
    pub embeddings: Option<PathBuf>,
    /// The model that made `--embeddings`.
    #[arg(long, requires = "embeddings")]
    pub embedding_model: Option<String>,
}

/// `soma capsule push` arguments.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// A layout written by `soma capsule pack`.
    pub layout: PathBuf,
    /// Where to push: `registry/repository:tag`.
    pub target: String,
    /// A registry (`host:port`) reached over plain HTTP.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
}

/// `soma capsule fetch` arguments.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// The verified digest: the only content accepted.
    #[arg(long)]
    pub digest: String,
    /// The folder to deliver into (absent or empty).
    #[arg(long)]
    pub into: PathBuf,
    /// An OCI bundle's `registry/repository`.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub repository: Option<String>,
    /// Content held in a file instead (a ConfigMap Capsule's key, mounted into the init
    /// container): copied as `--name` once its bytes match `--digest`.
    #[arg(long, requires = "name")]
    pub file: Option<PathBuf>,
    /// The file name to deliver `--file` as.
    #[arg(long)]
    pub name: Option<String>,
    /// Refuse an OCI bundle whose signed policyHash is not this one.
    #[arg(long)]
    pub policy_hash: Option<String>,
    /// A registry (`host:port`) reached over plain HTTP.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
}

/// A bundle error as a command failure: refused content is 1, the rest 2.
fn failure(e: &Error) -> Failure {
    let code = match e {
        Error::Input { .. }
        | Error::Io { .. }
        | Error::NotEmpty { .. }
        | Error::InvalidReference { .. }
        | Error::Registry { .. } => 2,
        _ => 1,
    };
    Failure {
        message: format!("{} ({})", e, e.reason()),
        code,
    }
}

/// Packs a folder; prints the digest. Every failure is bad input (exit 2).
pub fn pack(args: &PackArgs) -> Result<ExitCode, Failure> {
    pack_layout(args).map_err(|f| Failure { code: 2, ..f })
}

fn pack_layout(args: &PackArgs) -> Result<ExitCode, Failure> {
    let embeddings = match (&args.embeddings, &args.embedding_model) {
        (Some(path), Some(model)) => Some(read_embeddings(path, model).map_err(|e| failure(&e))?),
        _ => None,
    };
    let options = PackOptions {
        version: args.version.clone(),
        policy_hash: args.policy_hash.clone(),
        max_bytes: args.max_chunk_bytes,
        embeddings,
    };
    let bundle = soma_capsule::pack(&args.dir, &options).map_err(|e| failure(&e))?;
    let contents = bundle.open().map_err(|e| failure(&e))?;
    write_layout(&bundle, &args.out).map_err(|e| failure(&e))?;
    eprintln!(
        "packed {} documents, {} chunks{} into {}",
        contents.documents.len(),
        contents.chunks.len(),
        contents
            .manifest
            .embedding
            .as_ref()
            .map(|m| format!(", embeddings by {} ({} dimensions)", m.model, m.dimensions))
            .unwrap_or_default(),
        args.out.display()
    );
    println!("{}", bundle.digest);
    Ok(ExitCode::SUCCESS)
}

/// Pushes a packed layout; prints `registry/repository@digest`, the reference to sign.
pub async fn push(args: PushArgs) -> Result<ExitCode, Failure> {
    let bundle = read_layout(&args.layout).map_err(|e| failure(&e))?;
    let registry = Registry::new(args.insecure_registries);
    let digest = registry
        .push(&bundle, &args.target)
        .await
        .map_err(|e| failure(&e))?;
    let repository = args
        .target
        .rsplit_once(':')
        .map_or(args.target.as_str(), |(r, _)| r);
    println!("{repository}@{digest}");
    Ok(ExitCode::SUCCESS)
}

/// Delivers the content of exactly `--digest` into `--into`.
pub async fn fetch(args: FetchArgs) -> Result<ExitCode, Failure> {
    if let (Some(file), Some(name)) = (&args.file, &args.name) {
        let bytes = std::fs::read(file)
            .map_err(|e| Failure::input(format!("cannot read {}: {e}", file.display())))?;
        soma_capsule::bundle::deliver_blob(&bytes, &args.digest, &args.into, name)
            .map_err(|e| failure(&e))?;
        eprintln!(
            "delivered {} ({}) into {}",
            name,
            args.digest,
            args.into.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let Some(repository) = &args.repository else {
        return Err(Failure::input(
            "give --repository (an OCI bundle) or --file with --name",
        ));
    };
    // Refuse a folder that is not empty before asking the registry anything.
    soma_capsule::bundle::require_empty(&args.into).map_err(|e| failure(&e))?;
    let registry = Registry::new(args.insecure_registries.clone());
    let bundle = registry
        .fetch(repository, &args.digest)
        .await
        .map_err(|e| failure(&e))?;
    let contents = bundle.open().map_err(|e| failure(&e))?;
    if let Some(expected) = &args.policy_hash
        && &contents.manifest.policy_hash != expected
    {
        return Err(failure(&Error::Unexpected {
            field: "policyHash",
            actual: contents.manifest.policy_hash.clone(),
            expected: expected.clone(),
        }));
    }
    contents.write_into(&args.into).map_err(|e| failure(&e))?;
    eprintln!(
        "delivered {repository}@{} (version {}, {} documents, {} chunks) into {}",
        contents.digest,
        contents.manifest.version,
        contents.documents.len(),
        contents.chunks.len(),
        args.into.display()
    );
    Ok(ExitCode::SUCCESS)
}
