//! Keyless signatures verified offline: a CA made here stands in for Fulcio (Fulcio is not
//! reachable), issuing a code-signing certificate with Fulcio's OIDC-issuer extensions and an
//! email subject for a cosign key; the real `cosign sign --certificate --certificate-chain`
//! attaches it to the signature, and Soma checks chain, identity and signature against the
//! trusted root it is configured with.

mod support;

use std::process::Command;

use anyhow::{Result, bail};
use soma_signatures::{KeylessIdentity, OciRef, Policy, TrustConfig, Verifier};
use support::Workdir;

const ISSUER: &str = "https://issuer.example";
const SUBJECT: &str = "ci@example.com";
const REPO: &str = "capsules/keyless";

fn openssl(work: &Workdir, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(work.dir.path())
        .output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A self-signed CA `NAME.pem`/`NAME-ca.key`.
fn make_ca(work: &Workdir, name: &str) -> Result<String> {
    let key = format!("{name}-ca.key");
    let pem = format!("{name}.pem");
    openssl(
        work,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
    )?;
    openssl(
        work,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/O=soma-test/CN={name}"),
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &pem,
        ],
    )?;
    Ok(std::fs::read_to_string(work.path(&pem))?)
}

/// A leaf certificate `OUT` for the cosign public key `KEY.pub`, issued by CA `ca`, carrying
/// Fulcio's issuer extensions (v1 raw, v2 DER UTF8String) and an email SAN.
fn issue(
    work: &Workdir,
    ca: &str,
    key: &str,
    out: &str,
    issuer: &str,
    subject: &str,
    code_signing: bool,
) -> Result<()> {
    let raw_issuer: Vec<String> = issuer.bytes().map(|b| format!("{b:02X}")).collect();
    let mut ext = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         subjectAltName=critical,email:{subject}\n\
         1.3.6.1.4.1.57264.1.1=DER:{}\n1.3.6.1.4.1.57264.1.8=ASN1:UTF8String:{issuer}\n",
        raw_issuer.join(":")
    );
    if code_signing {
        ext.push_str("extendedKeyUsage=codeSigning\n");
    }
    std::fs::write(work.path(&format!("{out}.cnf")), ext)?;
    openssl(
        work,
        &[
            "x509",
            "-new",
            "-force_pubkey",
            &format!("{key}.pub"),
            "-subj",
            "/",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-days",
            "1",
            "-extfile",
            &format!("{out}.cnf"),
            "-out",
            out,
        ],
    )
}

fn sign_with_certificate(
    work: &Workdir,
    registry: &str,
    key: &str,
    cert: &str,
    chain: &str,
    digest: &str,
) -> Result<()> {
    work.cosign(&[
        "sign",
        "--key",
        &format!("{key}.key"),
        "--certificate",
        cert,
        "--certificate-chain",
        chain,
        "--tlog-upload=false",
        "--allow-http-registry",
        "--allow-insecure-registry",
        "--yes",
        &format!("{registry}/{REPO}@{digest}"),
    ])?;
    Ok(())
}

fn keyless(issuer: &str, subject: &str) -> Policy {
    Policy::new(
        Vec::new(),
        vec![KeylessIdentity {
            issuer: issuer.into(),
            subject: subject.into(),
        }],
    )
}

fn have_openssl() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the openssl CLI is needed to make the test certificate authority (apt-get install openssl)"
    );
    ok
}

#[tokio::test]
async fn verifies_keyless_signatures_against_the_configured_root_and_identity() -> Result<()> {
    let tools = tools_or_fail!();
    if !have_openssl() {
        return Ok(());
    }
    let registry = support::Registry::start(&tools)?;
    let work = Workdir::new(&tools)?;
    let root = make_ca(&work, "root")?;
    let other_root = make_ca(&work, "other-root")?;
    work.key_pair("signer")?;
    issue(&work, "root", "signer", "leaf.pem", ISSUER, SUBJECT, true)?;

    let digest = work.push(
        &registry.addr,
        REPO,
        "v1",
        r#"{"blocks":[{"id":"a","text":"keyless"}]}"#,
    )?;
    sign_with_certificate(
        &work,
        &registry.addr,
        "signer",
        "leaf.pem",
        "root.pem",
        &digest,
    )?;
    let artifact = OciRef::new(&registry.addr, REPO, &digest)?;

    // The cosign CLI accepts the same signature offline with the same root and identity.
    work.cosign(&[
        "verify",
        "--certificate-chain",
        "root.pem",
        "--certificate-identity",
        SUBJECT,
        "--certificate-oidc-issuer",
        ISSUER,
        "--insecure-ignore-tlog",
        "--insecure-ignore-sct",
        "--allow-http-registry",
        "--allow-insecure-registry",
        &artifact.to_string(),
    ])?;

    let verifier = support::verifier_with_roots(&registry.addr, vec![root.clone()]);
    let verified = verifier
        .verify_oci(&artifact, &keyless(ISSUER, SUBJECT))
        .await?;
    assert_eq!(verified.digest, digest);
    assert_eq!(
        verified.signer,
        format!("keyless:subject={SUBJECT},issuer={ISSUER}")
    );

    // Wrong subject, wrong issuer: the certificate is trusted but names someone else.
    for policy in [
        keyless(ISSUER, "mallory@example.com"),
        keyless("https://other.example", SUBJECT),
    ] {
        let err = verifier.verify_oci(&artifact, &policy).await.unwrap_err();
        assert_eq!(err.reason(), "IdentityMismatch", "{err}");
        assert!(err.to_string().contains(SUBJECT), "{err}");
    }

    // A verifier trusting another root refuses the certificate.
    let elsewhere = support::verifier_with_roots(&registry.addr, vec![other_root]);
    let err = elsewhere
        .verify_oci(&artifact, &keyless(ISSUER, SUBJECT))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "UntrustedCertificate", "{err}");

    // Without any root, a keyless policy cannot be checked at all.
    let rootless = support::verifier(&registry.addr);
    let err = rootless
        .verify_oci(&artifact, &keyless(ISSUER, SUBJECT))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "KeylessNotConfigured", "{err}");

    // A key policy does not accept a keyless signature just because its key made it.
    let other_pem = work.key_pair("unrelated")?;
    let err = verifier
        .verify_oci(&artifact, &Policy::public_key_pem(&other_pem)?)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "WrongKey", "{err}");
    Ok(())
}

#[tokio::test]
async fn rejects_replayed_and_non_code_signing_keyless_signatures() -> Result<()> {
    let tools = tools_or_fail!();
    if !have_openssl() {
        return Ok(());
    }
    let registry = support::Registry::start(&tools)?;
    let work = Workdir::new(&tools)?;
    let root = make_ca(&work, "root")?;
    work.key_pair("signer")?;
    issue(&work, "root", "signer", "leaf.pem", ISSUER, SUBJECT, true)?;
    issue(
        &work,
        "root",
        "signer",
        "no-eku.pem",
        ISSUER,
        SUBJECT,
        false,
    )?;
    let verifier = support::verifier_with_roots(&registry.addr, vec![root]);
    let policy = keyless(ISSUER, SUBJECT);

    let signed = work.push(&registry.addr, REPO, "v1", r#"{"blocks":[]}"#)?;
    sign_with_certificate(
        &work,
        &registry.addr,
        "signer",
        "leaf.pem",
        "root.pem",
        &signed,
    )?;
    let other = work.push(
        &registry.addr,
        REPO,
        "v2",
        r#"{"blocks":[{"id":"x","text":"y"}]}"#,
    )?;
    let signed_ref = OciRef::new(&registry.addr, REPO, &signed)?;
    let other_ref = OciRef::new(&registry.addr, REPO, &other)?;
    work.oras(&[
        "tag",
        "--plain-http",
        &format!("{}/{REPO}:{}", registry.addr, signed_ref.signature_tag()),
        &other_ref.signature_tag(),
    ])?;
    let err = verifier.verify_oci(&other_ref, &policy).await.unwrap_err();
    assert_eq!(err.reason(), "DigestMismatch", "{err}");

    let third = work.push(
        &registry.addr,
        REPO,
        "v3",
        r#"{"blocks":[{"id":"z","text":"z"}]}"#,
    )?;
    sign_with_certificate(
        &work,
        &registry.addr,
        "signer",
        "no-eku.pem",
        "root.pem",
        &third,
    )?;
    let err = verifier
        .verify_oci(&OciRef::new(&registry.addr, REPO, &third)?, &policy)
        .await
        .unwrap_err();
    assert_eq!(
        err.reason(),
        "UntrustedCertificate",
        "a certificate not for code signing is refused: {err}"
    );
    Ok(())
}

#[test]
fn unreadable_trusted_roots_are_refused_up_front() {
    for root in [
        "",
        "not a certificate",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ] {
        let err = Verifier::new(TrustConfig {
            keyless_roots: vec![root.to_string()],
            ..Default::default()
        })
        .err()
        .unwrap_or_else(|| panic!("{root:?} was accepted as a trusted root"));
        assert_eq!(err.reason(), "InvalidTrustedRoot", "{root:?}: {err}");
    }
}
