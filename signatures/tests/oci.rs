//! OCI artifacts pushed with oras to a real docker-registry on 127.0.0.1 and signed with the real
//! cosign CLI; Soma verifies what cosign signed and rejects everything else.

mod support;

use anyhow::Result;
use soma_signatures::{KeylessIdentity, OciRef, Policy, Rejection};
use support::{Registry, Workdir};

const REPO: &str = "capsules/support-kb";

fn reason(result: Result<soma_signatures::Verified, Rejection>) -> String {
    match result {
        Ok(v) => format!("unexpectedly verified: {v:?}"),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            e.reason().to_string()
        }
    }
}

#[tokio::test]
async fn verifies_what_cosign_signed_then_answers_from_cache_without_the_registry() -> Result<()> {
    let tools = tools_or_fail!();
    let mut registry = Registry::start(&tools)?;
    let work = Workdir::new(&tools)?;
    let pem = work.key_pair("soma")?;
    let digest = work.push(
        &registry.addr,
        REPO,
        "v1",
        r#"{"blocks":[{"id":"a","text":"hello"}]}"#,
    )?;
    work.sign("soma", &registry.addr, REPO, &digest)?;

    let policy = Policy::public_key_pem(&pem)?;
    let artifact = OciRef::new(&registry.addr, REPO, &digest)?;
    let verifier = support::verifier(&registry.addr);
    let verified = verifier.verify_oci(&artifact, &policy).await?;
    assert_eq!(verified.digest, digest);
    assert_eq!(
        verified.signer,
        format!("key:{}", policy.keys()[0].fingerprint())
    );
    assert_eq!(verifier.cached_len(), 1);

    registry.stop();
    let again = verifier.verify_oci(&artifact, &policy).await?;
    assert_eq!(
        again, verified,
        "a cached verification is returned as first recorded"
    );

    // Another policy is not answered from the cache: it needs the (stopped) registry.
    let other_pem = work.key_pair("other")?;
    let other = Policy::public_key_pem(&other_pem)?;
    let err = verifier.verify_oci(&artifact, &other).await.unwrap_err();
    assert_eq!(err.reason(), "RegistryUnreachable", "{err}");
    assert!(
        err.is_transient(),
        "connection refused is worth retrying: {err}"
    );
    let fresh = support::verifier(&registry.addr);
    let err = fresh.verify_oci(&artifact, &policy).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    Ok(())
}

#[tokio::test]
async fn rejects_tampered_unsigned_wrong_key_and_replayed_signatures() -> Result<()> {
    let tools = tools_or_fail!();
    let registry = Registry::start(&tools)?;
    let work = Workdir::new(&tools)?;
    let pem = work.key_pair("soma")?;
    let wrong_pem = work.key_pair("wrong")?;
    let policy = Policy::public_key_pem(&pem)?;
    let verifier = support::verifier(&registry.addr);
    let at = |digest: &str| OciRef::new(&registry.addr, REPO, digest).unwrap();

    let signed = work.push(
        &registry.addr,
        REPO,
        "v1",
        r#"{"blocks":[{"id":"a","text":"refunds: 30 days"}]}"#,
    )?;
    work.sign("soma", &registry.addr, REPO, &signed)?;
    assert!(verifier.verify_oci(&at(&signed), &policy).await.is_ok());

    // Tampered: the same tag now holds other bytes, hence another digest, which nobody signed.
    let tampered = work.push(
        &registry.addr,
        REPO,
        "v1",
        r#"{"blocks":[{"id":"a","text":"refunds: never"}]}"#,
    )?;
    assert_ne!(tampered, signed);
    assert_eq!(
        reason(verifier.verify_oci(&at(&tampered), &policy).await),
        "Unsigned"
    );

    // Signed, but by a key the policy does not accept.
    let wrong = Policy::public_key_pem(&wrong_pem)?;
    let err = verifier.verify_oci(&at(&signed), &wrong).await.unwrap_err();
    assert_eq!(err.reason(), "WrongKey", "{err}");
    assert!(!err.is_transient());

    // Replayed: the genuine signature of `signed` copied to the `.sig` tag of another artifact.
    let other = work.push(
        &registry.addr,
        REPO,
        "v2",
        r#"{"blocks":[{"id":"b","text":"other"}]}"#,
    )?;
    assert_eq!(
        reason(verifier.verify_oci(&at(&other), &policy).await),
        "Unsigned"
    );
    let signed_ref = at(&signed);
    let other_ref = at(&other);
    work.oras(&[
        "tag",
        "--plain-http",
        &format!("{}/{REPO}:{}", registry.addr, signed_ref.signature_tag()),
        &other_ref.signature_tag(),
    ])?;
    let err = verifier.verify_oci(&other_ref, &policy).await.unwrap_err();
    assert_eq!(err.reason(), "DigestMismatch", "{err}");
    assert!(
        err.to_string().contains(&signed),
        "the message names the digest really signed: {err}"
    );
    // The cosign CLI agrees that the replayed signature is not valid for `other`.
    assert!(
        work.cosign(&[
            "verify",
            "--key",
            "soma.pub",
            "--insecure-ignore-tlog",
            "--allow-http-registry",
            "--allow-insecure-registry",
            &other_ref.to_string()
        ])
        .is_err()
    );

    // A digest the registry does not have at all.
    let missing = at("sha256:0000000000000000000000000000000000000000000000000000000000000000");
    assert_eq!(
        reason(verifier.verify_oci(&missing, &policy).await),
        "ArtifactNotFound"
    );

    // Nothing rejected was cached; the one success was.
    assert_eq!(verifier.cached_len(), 1);
    Ok(())
}

/// Pushes a hand-made `.sig` manifest for `artifact` with one simple-signing layer.
fn push_signature(
    work: &Workdir,
    artifact: &OciRef,
    payload: &[u8],
    signature: &str,
) -> Result<()> {
    std::fs::write(work.path("payload.json"), payload)?;
    std::fs::write(
        work.path("annotations.json"),
        serde_json::json!({ "payload.json": { "dev.cosignproject.cosign/signature": signature } })
            .to_string(),
    )?;
    work.oras(&[
        "push",
        "--plain-http",
        "--annotation-file",
        "annotations.json",
        &format!(
            "{}/{}:{}",
            artifact.registry,
            artifact.repository,
            artifact.signature_tag()
        ),
        "payload.json:application/vnd.dev.cosign.simplesigning.v1+json",
    ])?;
    Ok(())
}

#[tokio::test]
async fn rejects_malformed_and_altered_signature_payloads() -> Result<()> {
    let tools = tools_or_fail!();
    let registry = Registry::start(&tools)?;
    let work = Workdir::new(&tools)?;
    let pem = work.key_pair("soma")?;
    let policy = Policy::public_key_pem(&pem)?;
    let verifier = support::verifier(&registry.addr);
    let digest = work.push(&registry.addr, REPO, "v1", r#"{"blocks":[]}"#)?;
    let artifact = OciRef::new(&registry.addr, REPO, &digest)?;

    // Signed by the right key, but the payload is not simple signing JSON.
    std::fs::write(work.path("garbage.txt"), "not json at all")?;
    let sig = work.sign_blob("soma", "garbage.txt", &[])?;
    push_signature(&work, &artifact, b"not json at all", &sig)?;
    let err = verifier.verify_oci(&artifact, &policy).await.unwrap_err();
    assert_eq!(err.reason(), "MalformedSignature", "{err}");

    // The signature annotation is not base64.
    push_signature(&work, &artifact, b"{}", "this is !!! not base64")?;
    assert_eq!(
        reason(verifier.verify_oci(&artifact, &policy).await),
        "MalformedSignature"
    );

    // A correct payload for this digest whose bytes were altered after signing.
    let payload = serde_json::json!({
        "critical": {
            "identity": {"docker-reference": format!("{}/{REPO}", registry.addr)},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature"
        },
        "optional": null
    })
    .to_string();
    std::fs::write(work.path("payload-src.json"), &payload)?;
    let sig = work.sign_blob("soma", "payload-src.json", &[])?;
    push_signature(&work, &artifact, format!("{payload} ").as_bytes(), &sig)?;
    assert_eq!(
        reason(verifier.verify_oci(&artifact, &policy).await),
        "WrongKey"
    );

    // The same payload unaltered is accepted: the checks above failed for the reasons named.
    push_signature(&work, &artifact, payload.as_bytes(), &sig)?;
    let verified = verifier.verify_oci(&artifact, &policy).await?;
    assert_eq!(verified.digest, digest);
    Ok(())
}

#[tokio::test]
async fn resolves_agent_image_tags_to_digests_and_verifies_them() -> Result<()> {
    let tools = tools_or_fail!();
    let registry = Registry::start(&tools)?;
    let work = Workdir::new(&tools)?;
    let pem = work.key_pair("soma")?;
    let policy = Policy::public_key_pem(&pem)?;
    let verifier = support::verifier(&registry.addr);
    let digest = work.push(
        &registry.addr,
        "agents/support",
        "1.0",
        r#"{"image":"pretend"}"#,
    )?;
    work.sign("soma", &registry.addr, "agents/support", &digest)?;
    let unsigned = work.push(
        &registry.addr,
        "agents/support",
        "1.1",
        r#"{"image":"other"}"#,
    )?;

    let image = format!("{}/agents/support:1.0", registry.addr);
    let resolved = verifier.resolve_tag(&image).await?;
    assert_eq!(resolved.digest, digest);
    assert_eq!(resolved.repository, "agents/support");
    let verified = verifier.verify_image(&image, &policy).await?;
    assert_eq!(
        verified.digest, digest,
        "the digest the tag resolved to is recorded"
    );

    let pinned = format!("{}/agents/support@{digest}", registry.addr);
    assert_eq!(
        verifier.verify_image(&pinned, &policy).await?.digest,
        digest
    );

    let err = verifier
        .verify_image(&format!("{}/agents/support:1.1", registry.addr), &policy)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "Unsigned", "{err}");
    assert!(err.to_string().contains(&unsigned));
    let err = verifier
        .verify_image(&format!("{}/agents/support:9.9", registry.addr), &policy)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ArtifactNotFound", "{err}");
    let err = verifier.resolve_tag("Not A Reference").await.unwrap_err();
    assert_eq!(err.reason(), "InvalidReference", "{err}");
    Ok(())
}

#[tokio::test]
async fn a_policy_change_means_a_fresh_verification() -> Result<()> {
    let tools = tools_or_fail!();
    let registry = Registry::start(&tools)?;
    let work = Workdir::new(&tools)?;
    let pem = work.key_pair("soma")?;
    let second_pem = work.key_pair("second")?;
    let verifier = support::verifier(&registry.addr);
    let digest = work.push(&registry.addr, REPO, "v1", r#"{"blocks":[]}"#)?;
    work.sign("soma", &registry.addr, REPO, &digest)?;
    let artifact = OciRef::new(&registry.addr, REPO, &digest)?;

    let first = Policy::public_key_pem(&pem)?;
    verifier.verify_oci(&artifact, &first).await?;
    assert!(verifier.cached(&digest, &first).is_some());

    let rotated = Policy::public_key_pem(&second_pem)?;
    assert!(verifier.cached(&digest, &rotated).is_none());
    assert_eq!(
        reason(verifier.verify_oci(&artifact, &rotated).await),
        "WrongKey"
    );

    let both = Policy::new(
        vec![
            soma_signatures::PublicKey::from_pem(&second_pem)?,
            soma_signatures::PublicKey::from_pem(&pem)?,
        ],
        Vec::new(),
    );
    assert_ne!(both.fingerprint(), first.fingerprint());
    verifier.verify_oci(&artifact, &both).await?;
    assert_eq!(
        verifier.cached_len(),
        2,
        "the new policy's verification is cached beside the old one"
    );
    Ok(())
}

#[tokio::test]
async fn bad_policies_and_references_get_clear_errors() -> Result<()> {
    let keyless = Policy::new(
        Vec::new(),
        vec![KeylessIdentity {
            issuer: "https://issuer.example".into(),
            subject: "ci@example.com".into(),
        }],
    );
    let verifier = support::verifier("127.0.0.1:1");
    let artifact = OciRef::new(
        "127.0.0.1:1",
        REPO,
        "sha256:50d462ba7793fb453045fe18ef6547305b7e920a845192fb63500803331d51fa",
    )?;
    let err = verifier.verify_oci(&artifact, &keyless).await.unwrap_err();
    assert_eq!(err.reason(), "KeylessNotConfigured", "{err}");
    assert!(!err.is_transient());

    for pem in [
        "",
        "not a key",
        "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    ] {
        let err = Policy::public_key_pem(pem).unwrap_err();
        assert_eq!(err.reason(), "InvalidPublicKey", "{pem:?}: {err}");
    }
    Ok(())
}
