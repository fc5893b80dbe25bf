//! The operator's real image verifier ([`CosignImages`], through `soma-signatures`) against a
//! real docker-registry and images signed by the real cosign CLI: a tag resolves to its
//! digest and verifies; a moved tag is verified afresh; a wrong key and an unsigned image are
//! rejected with actionable text; a stopped registry is a transient rejection.

#[path = "support/signing.rs"]
mod signing;

use std::time::Duration;

use anyhow::Result;
use soma_operator::agent::image::{CosignImages, ImageCache, ImageVerifier, pin, verify_cached};
use soma_operator::config::ImageSignatures;
use soma_signatures::TrustConfig;

fn images(keys: Vec<String>) -> ImageSignatures {
    ImageSignatures {
        required: true,
        keys,
        ..ImageSignatures::default()
    }
}

fn trust(registry: &str) -> TrustConfig {
    TrustConfig {
        insecure_registries: vec![registry.to_owned()],
        ..TrustConfig::default()
    }
}

#[tokio::test]
async fn tags_resolve_to_signed_digests_and_other_signers_are_rejected() -> Result<()> {
    let tools = signing::tools().expect(
        "cosign, oras and docker-registry are not available: run scripts/test-deps/signing-tools.sh",
    );
    let mut registry = signing::Registry::start(&tools)?;
    let work = signing::Workdir::new(&tools)?;
    let ours = work.key_pair("ours")?;
    let theirs = work.key_pair("theirs")?;
    let addr = registry.addr.clone();
    let v1 = work.push(&addr, "agents/helper", "1.0", r#"{"agent":"v1"}"#)?;
    work.sign("ours", &addr, "agents/helper", &v1)?;
    let other = work.push(&addr, "agents/helper", "other", r#"{"agent":"other"}"#)?;
    work.sign("theirs", &addr, "agents/helper", &other)?;
    work.push(
        &addr,
        "agents/helper",
        "unsigned",
        r#"{"agent":"unsigned"}"#,
    )?;

    let verifier =
        CosignImages::new(trust(&addr), &images(vec![ours.clone()])).map_err(anyhow::Error::msg)?;
    let tagged = format!("{addr}/agents/helper:1.0");
    let verified = verifier
        .verify(&tagged)
        .await
        .map_err(|r| anyhow::anyhow!("{r:?}"))?;
    assert_eq!(verified.digest, v1, "the tag's digest is what is verified");
    assert!(
        verified.signer.starts_with("key:sha256:"),
        "{}",
        verified.signer
    );
    assert_eq!(
        pin(&tagged, &verified.digest),
        format!("{addr}/agents/helper@{v1}")
    );
    // The pinned reference verifies as well (what the Deployment runs).
    let pinned = verifier
        .verify(&pin(&tagged, &verified.digest))
        .await
        .map_err(|r| anyhow::anyhow!("{r:?}"))?;
    assert_eq!(pinned.digest, v1);

    // Signed by a key the operator does not accept.
    let wrong = verifier
        .verify(&format!("{addr}/agents/helper:other"))
        .await
        .expect_err("rejected");
    assert_eq!(wrong.reason, "WrongKey", "{}", wrong.message);
    assert!(!wrong.transient);
    assert!(
        wrong.message.contains("agents/helper:other"),
        "{}",
        wrong.message
    );
    let unsigned = verifier
        .verify(&format!("{addr}/agents/helper:unsigned"))
        .await
        .expect_err("rejected");
    assert_eq!(unsigned.reason, "Unsigned", "{}", unsigned.message);

    // The same image under an operator accepting only the other key is rejected.
    let strict =
        CosignImages::new(trust(&addr), &images(vec![theirs])).map_err(anyhow::Error::msg)?;
    assert_eq!(
        strict.verify(&tagged).await.expect_err("rejected").reason,
        "WrongKey"
    );

    // The tag moves to other content: within the recheck interval the cached digest stands
    // (the Deployment stays pinned to it); after it, the new digest is verified.
    let cache = ImageCache::default();
    let long = Duration::from_secs(3600);
    assert_eq!(
        verify_cached(&verifier, &cache, &tagged, long)
            .await
            .map(|v| v.digest),
        Ok(v1.clone())
    );
    let v2 = work.push(&addr, "agents/helper", "1.0", r#"{"agent":"v2"}"#)?;
    assert_ne!(v2, v1);
    assert_eq!(
        verify_cached(&verifier, &cache, &tagged, long)
            .await
            .map(|v| v.digest),
        Ok(v1.clone())
    );
    let moved = verify_cached(&verifier, &cache, &tagged, Duration::ZERO)
        .await
        .expect_err("the moved tag's content is unsigned");
    assert_eq!(moved.reason, "Unsigned", "{}", moved.message);
    work.sign("ours", &addr, "agents/helper", &v2)?;
    assert_eq!(
        verify_cached(&verifier, &cache, &tagged, Duration::ZERO)
            .await
            .map(|v| v.digest),
        Ok(v2)
    );

    // A registry that does not answer is worth a retry, not a verdict.
    registry.stop();
    let down = verifier
        .verify(&format!("{addr}/agents/helper:unsigned"))
        .await
        .expect_err("registry down");
    assert!(down.transient, "{down:?}");
    Ok(())
}
