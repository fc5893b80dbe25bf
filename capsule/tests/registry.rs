//! Bundles pushed to a real docker-registry on 127.0.0.1, signed and verified with the real
//! cosign CLI, and fetched back by digest: the signature covers the manifest (so the
//! policyHash and the content are signed together), a re-pushed tag does not change what a
//! digest fetches, and tampered bytes in the registry's storage are refused.

#[path = "../../signatures/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use anyhow::Result;
use soma_capsule::format::OciManifest;
use soma_capsule::pack::PackOptions;
use soma_capsule::{Bundle, Registry, pack};
use soma_signatures::{OciRef, Policy};
use support::Workdir;

const REPO: &str = "capsules/support-kb";
const POLICY: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn options(policy_hash: &str) -> PackOptions {
    PackOptions {
        version: "1.0.0".into(),
        policy_hash: policy_hash.into(),
        max_bytes: 200,
        embeddings: None,
    }
}

fn corpus(dir: &Path) -> Result<()> {
    std::fs::write(
        dir.join("refunds.md"),
        "# Refunds\n\nRefunds are paid within 30 days.\n",
    )?;
    std::fs::write(
        dir.join("shipping.md"),
        "Shipping inside the EU is free above 50 euros.\n",
    )?;
    Ok(())
}

/// Where the registry stores the blob `digest`.
fn stored_blob(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

fn cosign_verify(work: &Workdir, key: &str, reference: &str) -> Result<String> {
    work.cosign(&[
        "verify",
        "--key",
        &format!("{key}.pub"),
        "--insecure-ignore-tlog=true",
        "--allow-http-registry",
        "--allow-insecure-registry",
        reference,
    ])
}

#[tokio::test]
async fn push_sign_verify_fetch_and_tamper() -> Result<()> {
    let tools = tools_or_fail!();
    let registry = support::Registry::start(&tools)?;
    let work = Workdir::new(&tools)?;
    let pem = work.key_pair("soma")?;
    let src = tempfile::tempdir()?;
    corpus(src.path())?;
    let client = Registry::new(vec![registry.addr.clone()]);
    let target = |tag: &str| format!("{}/{REPO}:{tag}", registry.addr);
    let repository = format!("{}/{REPO}", registry.addr);

    // Pack → push: the registry serves the bundle under the digest pack computed; a second
    // pack of the same folder pushes to the same digest.
    let bundle = pack(src.path(), &options(POLICY))?;
    let digest = client.push(&bundle, &target("v1")).await?;
    assert_eq!(digest, bundle.digest);
    let again = pack(src.path(), &options(POLICY))?;
    assert_eq!(client.push(&again, &target("v1-again")).await?, digest);

    // Sign with the real cosign; both cosign and Soma's verifier accept it.
    work.sign("soma", &registry.addr, REPO, &digest)?;
    let reference = format!("{repository}@{digest}");
    let out = cosign_verify(&work, "soma", &reference)?;
    assert!(out.contains(&digest), "{out}");
    let policy = Policy::public_key_pem(&pem)?;
    let verifier = support::verifier(&registry.addr);
    let at = |d: &str| OciRef::new(&registry.addr, REPO, d).expect("reference");
    let verified = verifier.verify_oci(&at(&digest), &policy).await?;
    assert_eq!(verified.digest, digest);

    // Fetched by digest: the same bytes, opened, delivered.
    let fetched = client.fetch(&repository, &digest).await?;
    assert_eq!(fetched, bundle);
    let into = tempfile::tempdir()?;
    fetched.open()?.write_into(&into.path().join("kb"))?;
    assert!(into.path().join("kb/documents/refunds.md").is_file());

    // Another policyHash is another manifest, hence another digest, which nobody signed:
    // the policyHash cannot be changed without breaking the signature. Pushed over the same
    // tag (a "re-pushed tag"), it does not change what the verified digest fetches.
    let relabelled = pack(src.path(), &options(&POLICY.replace('1', "2")))?;
    let moved = client.push(&relabelled, &target("v1")).await?;
    assert_ne!(moved, digest);
    let err = verifier.verify_oci(&at(&moved), &policy).await.unwrap_err();
    assert_eq!(err.reason(), "Unsigned", "{err}");
    assert!(cosign_verify(&work, "soma", &format!("{repository}@{moved}")).is_err());
    assert_eq!(client.fetch(&repository, &digest).await?, bundle);

    // A digest the registry does not hold: refused, nothing written.
    let missing = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    let err = client.fetch(&repository, missing).await.unwrap_err();
    assert_eq!(err.reason(), "RegistryUnreachable", "{err}");
    assert!(err.to_string().contains("not found"), "{err}");

    // Tampered storage: the chunks blob rewritten in the registry's own files. The registry
    // now serves other bytes under the signed digest's layer; fetch refuses them.
    let manifest: OciManifest = serde_json::from_slice(&bundle.manifest)?;
    let chunks = &manifest.layers[1];
    let path = stored_blob(&registry.data_dir(), &chunks.digest);
    let original = std::fs::read(&path)?;
    let mut forged = original.clone();
    let at_byte = forged
        .iter()
        .position(|&b| b == b'3')
        .expect("a byte to change");
    forged[at_byte] = b'9';
    std::fs::write(&path, &forged)?;
    let err = client.fetch(&repository, &digest).await.unwrap_err();
    assert_eq!(err.reason(), "BlobMismatch", "{err}");
    std::fs::write(&path, &original)?;

    // Tampered manifest bytes in storage: refused before any layer is read.
    let path = stored_blob(&registry.data_dir(), &digest);
    let mut forged = std::fs::read(&path)?;
    let pos = forged
        .windows(4)
        .position(|w| w == b"1.0.")
        .expect("version");
    forged[pos] = b'2';
    std::fs::write(&path, &forged)?;
    let err = client.fetch(&repository, &digest).await.unwrap_err();
    assert_eq!(err.reason(), "DigestMismatch", "{err}");
    Ok(())
}

#[tokio::test]
async fn push_refuses_what_is_not_a_tag_and_an_unreachable_registry_is_transient() -> Result<()> {
    let src = tempfile::tempdir()?;
    corpus(src.path())?;
    let bundle: Bundle = pack(src.path(), &options(POLICY))?;
    let client = Registry::new(vec!["127.0.0.1:1".into()]);
    let err = client
        .push(&bundle, &format!("127.0.0.1:1/{REPO}@{}", bundle.digest))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "InvalidReference", "{err}");
    let err = client
        .push(&bundle, &format!("127.0.0.1:1/{REPO}:v1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            soma_capsule::Error::Registry {
                transient: true,
                ..
            }
        ),
        "{err:?}"
    );
    Ok(())
}
