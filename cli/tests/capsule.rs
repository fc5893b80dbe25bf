//! `soma capsule pack|push|fetch` as a user (and an agent pod's init container) runs them,
//! against the real docker-registry on 127.0.0.1 and the real cosign CLI.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

#[path = "../../signatures/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::Workdir;

const POLICY: &str = "sha256:9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b9b";

fn soma(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_soma"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn corpus(dir: &Path) {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("refunds.md"),
        "# Refunds\n\nRefunds are paid within 30 days.\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("policies/returns.txt"),
        "Returns need a receipt.\n",
    )
    .unwrap();
}

fn pack(src: &Path, out: &Path) -> String {
    let (code, digest, err) = soma(&[
        "capsule",
        "pack",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--version",
        "1.0.0",
        "--policy-hash",
        POLICY,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("packed 2 documents"), "{err}");
    digest
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

fn stored_blob(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

#[test]
fn pack_push_sign_fetch_by_digest_and_refuse_anything_else() {
    let tools = tools_or_fail!();
    let registry = support::Registry::start(&tools).unwrap();
    let work = Workdir::new(&tools).unwrap();
    work.key_pair("soma").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("kb");
    corpus(&src);

    // The same folder packs to the same digest.
    let digest = pack(&src, &tmp.path().join("layout"));
    assert_eq!(pack(&src, &tmp.path().join("layout2")), digest);
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );

    let repository = format!("{}/capsules/kb", registry.addr);
    let (code, pushed, err) = soma(&[
        "capsule",
        "push",
        tmp.path().join("layout").to_str().unwrap(),
        &format!("{repository}:v1"),
        "--insecure-registry",
        &registry.addr,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(pushed, format!("{repository}@{digest}"));
    work.sign("soma", &registry.addr, "capsules/kb", &digest)
        .unwrap();

    let fetch = |digest: &str, into: &Path, extra: &[&str]| {
        let mut args = vec![
            "capsule",
            "fetch",
            "--repository",
            &repository,
            "--digest",
            digest,
            "--into",
            into.to_str().unwrap(),
            "--insecure-registry",
            &registry.addr,
        ];
        args.extend_from_slice(extra);
        soma(&args)
    };

    // Fetched by the verified digest: the documents, the chunks and the manifest whose
    // sha256 is the digest, all read-only.
    let into = tmp.path().join("capsules/kb");
    let (code, _, err) = fetch(&digest, &into, &["--policy-hash", POLICY]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(into.join("documents/policies/returns.txt")).unwrap(),
        "Returns need a receipt.\n"
    );
    let manifest = std::fs::read(into.join("manifest.json")).unwrap();
    assert_eq!(soma_capsule::sha256_digest(&manifest), digest);
    assert!(
        std::fs::metadata(into.join("chunks.jsonl"))
            .unwrap()
            .permissions()
            .readonly()
    );

    // Into a folder that is not empty: refused (exit 2), left as it was.
    let (code, _, err) = fetch(&digest, &into, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not empty"), "{err}");

    // Another signed policyHash than the Capsule's: refused (exit 1), nothing written.
    let other = tmp.path().join("other");
    let (code, _, err) = fetch(
        &digest,
        &other,
        &["--policy-hash", &POLICY.replace("9b", "aa")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("PolicyHashMismatch"), "{err}");
    assert!(is_empty(&other), "nothing written");

    // A digest the registry does not hold: refused, nothing written.
    let wrong = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let (code, _, err) = fetch(wrong, &other, &[]);
    assert_ne!(code, 0, "{err}");
    assert!(is_empty(&other), "nothing written");

    // The registry's stored documents blob rewritten: the bytes no longer match the signed
    // manifest; refused (exit 1), nothing written.
    let layout_index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            tmp.path()
                .join("layout/blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let docs = layout_index["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = stored_blob(&registry.data_dir(), &docs);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(7).position(|w| w == b"receipt").unwrap();
    bytes[at] = b'R';
    std::fs::write(&path, &bytes).unwrap();
    let (code, _, err) = fetch(&digest, &other, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("BlobMismatch"), "{err}");
    assert!(is_empty(&other), "nothing written");
}

#[test]
fn a_config_map_capsule_is_delivered_only_with_its_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("faq.jsonl");
    std::fs::write(&content, "{\"id\":\"a\",\"text\":\"refunds: 30 days\"}\n").unwrap();
    let digest = soma_capsule::sha256_digest(&std::fs::read(&content).unwrap());
    let run = |digest: &str, into: &Path| {
        soma(&[
            "capsule",
            "fetch",
            "--file",
            content.to_str().unwrap(),
            "--name",
            "faq.jsonl",
            "--digest",
            digest,
            "--into",
            into.to_str().unwrap(),
        ])
    };
    let refused = tmp.path().join("refused");
    let (code, _, err) = run(&POLICY.replace("9b", "00"), &refused);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("DigestMismatch"), "{err}");
    assert!(is_empty(&refused));

    let into = tmp.path().join("faq");
    let (code, _, err) = run(&digest, &into);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(into.join("faq.jsonl")).unwrap(),
        std::fs::read(&content).unwrap()
    );
}

#[test]
fn pack_refuses_bad_input_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("kb");
    corpus(&src);
    let out = tmp.path().join("layout");
    let (code, _, err) = soma(&[
        "capsule",
        "pack",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--version",
        "1",
        "--policy-hash",
        "sha256:abc",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--policy-hash") && err.contains("sha256:<64 lowercase hex>"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");

    // Embeddings of the wrong dimension for one chunk.
    let embeddings = tmp.path().join("embeddings.jsonl");
    std::fs::write(
        &embeddings,
        "{\"id\":\"policies/returns.txt#0\",\"vector\":[0.1,0.2]}\n{\"id\":\"refunds.md#0\",\"vector\":[0.1]}\n",
    )
    .unwrap();
    let (code, _, err) = soma(&[
        "capsule",
        "pack",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--version",
        "1",
        "--policy-hash",
        POLICY,
        "--embeddings",
        embeddings.to_str().unwrap(),
        "--embedding-model",
        "all-MiniLM-L6-v2",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has 1 dimensions, the model makes 2"), "{err}");
    assert!(!out.exists(), "nothing written");
}
