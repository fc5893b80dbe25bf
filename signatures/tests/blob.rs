//! Blobs signed with the real `cosign sign-blob` (plain signature, legacy bundle, Sigstore bundle).

mod support;

use anyhow::Result;
use soma_signatures::{Blob, Policy, sha256_digest};
use support::Workdir;

const CAPSULE: &str = r#"{"blocks":[{"id":"refunds","text":"Refunds within 30 days."}]}"#;

fn blob<'a>(bytes: &'a [u8], signature: &'a str) -> Blob<'a> {
    Blob {
        bytes,
        declared_digest: None,
        signature,
    }
}

#[tokio::test]
async fn verifies_cosign_sign_blob_in_every_output_form() -> Result<()> {
    let tools = tools_or_fail!();
    let work = Workdir::new(&tools)?;
    let pem = work.key_pair("soma")?;
    let policy = Policy::public_key_pem(&pem)?;
    std::fs::write(work.path("capsule.json"), CAPSULE)?;
    let signature = work.sign_blob("soma", "capsule.json", &["--bundle", "legacy.bundle"])?;
    let legacy = std::fs::read_to_string(work.path("legacy.bundle"))?;
    work.sign_blob(
        "soma",
        "capsule.json",
        &["--new-bundle-format", "--bundle", "new.bundle"],
    )?;
    let sigstore_bundle = std::fs::read_to_string(work.path("new.bundle"))?;

    for (form, sig) in [
        ("signature", &signature),
        ("legacy bundle", &legacy),
        ("sigstore bundle", &sigstore_bundle),
    ] {
        let verifier = support::verifier("127.0.0.1:1");
        let verified = verifier
            .verify_blob(
                &Blob {
                    declared_digest: Some(&sha256_digest(CAPSULE.as_bytes())),
                    ..blob(CAPSULE.as_bytes(), sig)
                },
                &policy,
            )
            .unwrap_or_else(|e| panic!("{form}: {e}"));
        assert_eq!(verified.digest, sha256_digest(CAPSULE.as_bytes()));
        assert_eq!(
            verified.signer,
            format!("key:{}", policy.keys()[0].fingerprint())
        );
    }
    Ok(())
}

#[tokio::test]
async fn rejects_tampered_blobs_wrong_keys_other_digests_and_malformed_signatures() -> Result<()> {
    let tools = tools_or_fail!();
    let work = Workdir::new(&tools)?;
    let pem = work.key_pair("soma")?;
    let wrong_pem = work.key_pair("wrong")?;
    let policy = Policy::public_key_pem(&pem)?;
    std::fs::write(work.path("capsule.json"), CAPSULE)?;
    std::fs::write(work.path("other.json"), "{}")?;
    let signature = work.sign_blob("soma", "capsule.json", &[])?;
    work.sign_blob(
        "soma",
        "other.json",
        &["--new-bundle-format", "--bundle", "other.bundle"],
    )?;
    let other_bundle = std::fs::read_to_string(work.path("other.bundle"))?;
    let verifier = support::verifier("127.0.0.1:1");
    let reason = |b: Blob<'_>, p: &Policy| {
        verifier
            .verify_blob(&b, p)
            .map(|v| v.digest)
            .unwrap_err()
            .reason()
    };

    let tampered = CAPSULE.replace("30", "300");
    assert_eq!(
        reason(blob(tampered.as_bytes(), &signature), &policy),
        "WrongKey"
    );
    assert_eq!(
        reason(
            blob(CAPSULE.as_bytes(), &signature),
            &Policy::public_key_pem(&wrong_pem)?
        ),
        "WrongKey"
    );
    let declared = sha256_digest(b"{}");
    assert_eq!(
        reason(
            Blob {
                declared_digest: Some(&declared),
                ..blob(CAPSULE.as_bytes(), &signature)
            },
            &policy
        ),
        "DigestMismatch"
    );
    assert_eq!(
        reason(blob(CAPSULE.as_bytes(), &other_bundle), &policy),
        "DigestMismatch"
    );
    for bad in ["", "not base64!", "{\"nothing\": 1}", "{"] {
        assert_eq!(
            reason(blob(CAPSULE.as_bytes(), bad), &policy),
            "MalformedSignature",
            "{bad:?}"
        );
    }
    assert_eq!(verifier.cached_len(), 0, "rejections are never cached");
    assert!(
        verifier
            .verify_blob(&blob(CAPSULE.as_bytes(), &signature), &policy)
            .is_ok()
    );
    assert_eq!(verifier.cached_len(), 1);

    // The content is cached as verified now; a signature swapped for another blob's, or
    // tampered with, must still be rejected rather than answered from the cache.
    let other_signature = work.sign_blob("soma", "other.json", &[])?;
    assert_eq!(
        reason(blob(CAPSULE.as_bytes(), &other_signature), &policy),
        "WrongKey",
        "a signature moved from another blob"
    );
    let mut flipped = signature.trim().to_string().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped)?;
    assert_eq!(
        reason(blob(CAPSULE.as_bytes(), &flipped), &policy),
        "WrongKey",
        "a tampered signature"
    );
    assert_eq!(verifier.cached_len(), 1, "rejections are never cached");
    Ok(())
}
