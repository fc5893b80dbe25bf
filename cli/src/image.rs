//! `soma image verify`: the Cosign signatures of container images, checked by Soma's own
//! verifier (`soma-signatures`, the one the operator uses for Capsules and agent images).
//!
//! ```text
//!  IMAGE… ─► resolve tag → digest ─► cosign signature under sha256-<hex>.sig ─► a --key accepts it?
//!                                                   │                                │
//!                                 "verified IMAGE@digest by key:sha256:…"   "rejected IMAGE (Reason): why"
//! ```
//!
//! The release script signs Soma's own images with it and the chart's `verify-images` init
//! container runs it before the operator starts (docs/release.md). Registries are read
//! anonymously, as the operator does.

use std::path::PathBuf;
use std::process::ExitCode;

use soma_signatures::{Policy, PublicKey, TrustConfig, Verifier};

use crate::ledger::Failure;

/// `soma image verify` arguments.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// A PEM public key (`cosign generate-key-pair`'s `.pub`) whose signature is accepted;
    /// repeat for several. A file holding several PEM keys accepts each.
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    /// A registry (`host:port`, as written in the image references) reached over plain HTTP.
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// Refuse references without a digest (`repo@sha256:…`): a tag may move between this
    /// check and the pull, a digest cannot.
    #[arg(long)]
    pub require_digest: bool,
    /// The images: `registry/repository@sha256:…` or `registry/repository:tag`.
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// The PEM blocks of `text` that are public keys.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") {
            current = Some(format!("{line}\n"));
        } else if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
            if line.starts_with("-----END ") {
                blocks.extend(current.take());
            }
        }
    }
    blocks
}

fn policy(args: &VerifyArgs) -> Result<Policy, String> {
    let mut keys = Vec::new();
    for path in &args.keys {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key {}: {e}", path.display()))?;
        let blocks = pem_blocks(&text);
        if blocks.is_empty() {
            return Err(format!("{} holds no PEM public key", path.display()));
        }
        for pem in blocks {
            keys.push(
                PublicKey::from_pem(&pem)
                    .map_err(|e| format!("{} is not a usable public key: {e}", path.display()))?,
            );
        }
    }
    Ok(Policy::new(keys, Vec::new()))
}

/// Verifies every image; exit 0 when all verify, 1 when one does not, 2 on bad input.
pub async fn verify(args: VerifyArgs) -> Result<ExitCode, Failure> {
    let policy = policy(&args).map_err(Failure::input)?;
    if args.require_digest
        && let Some(tagged) = args.images.iter().find(|i| !i.contains("@sha256:"))
    {
        return Err(Failure::input(format!(
            "{tagged} has no digest; name the image as repository@sha256:<digest> (--require-digest)"
        )));
    }
    let verifier = Verifier::new(TrustConfig {
        insecure_registries: args.insecure_registries.clone(),
        ..TrustConfig::default()
    })
    .map_err(|e| Failure::input(e.to_string()))?;
    let mut failed = false;
    for image in &args.images {
        match verifier.verify_image(image, &policy).await {
            Ok(v) => println!("verified {image} digest={} signer={}", v.digest, v.signer),
            Err(e) => {
                failed = true;
                println!("rejected {image} ({}): {e}", e.reason());
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pem_block_of_a_key_file_is_a_key() {
        let two = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\nnoise\n  -----BEGIN PUBLIC KEY-----\nBBBB\n-----END PUBLIC KEY-----\n";
        assert_eq!(
            pem_blocks(two),
            [
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                "-----BEGIN PUBLIC KEY-----\nBBBB\n-----END PUBLIC KEY-----\n"
            ]
        );
        assert!(pem_blocks("not a key").is_empty());
    }
}
