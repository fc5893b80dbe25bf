//! A revoked Capsule's folder leaves the agent container's view: the sidecar moves
//! `visible/<name>` (the only folder the agent mounts) to `withheld/<name>` on the same
//! filesystem when the revocation arrives through its live loop (the configuration file or
//! the ledger), and back, its digest checked again, when the revocation is lifted. Real
//! folders, a running sidecar, a real PostgreSQL for the ledger.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use soma_proxy::fake_upstream::FakeUpstream;
use support::capsules::{DIMS, MODEL, deliver, recall_refunds, tamper};
use support::pg::Pg;
use support::*;

const REASON: &str = "Capsule research/kb is revoked (spec.revoked)";

struct Volume {
    _root: tempfile::TempDir,
    visible: PathBuf,
    withheld: PathBuf,
    digest: String,
}

/// The pod's Capsule volume, `kb` delivered into `visible/` as the init container does.
fn volume() -> Volume {
    let root = tempfile::tempdir().unwrap();
    let visible = root.path().join("visible");
    let withheld = root.path().join("withheld");
    let digest = deliver(&visible, "kb", MODEL, DIMS);
    Volume {
        _root: root,
        visible,
        withheld,
        digest,
    }
}

/// A sidecar following `path` (written from `config`).
async fn sidecar(config: &Value, path: &Path) -> Harness {
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config.clone();
    config["provider"]["upstream"] = json!(upstream.url());
    std::fs::write(path, config.to_string()).unwrap();
    let proxy = soma_proxy::start(
        soma_proxy::Config::parse(&config.to_string()).unwrap(),
        TOKEN.to_owned(),
        Some(path.to_owned()),
    )
    .await
    .unwrap();
    Harness {
        upstream,
        proxy,
        dir,
        client: http(),
    }
}

fn base_config(v: &Volume, dir: &Path, extra: Value) -> Value {
    let mut more = json!({
        "capsules": [{"name": "kb", "digest": v.digest}],
        "recall": {"capsulesDir": v.visible, "withheldDir": v.withheld},
        "live": {"fileCheckMs": 20, "ledgerPollMs": 0}
    });
    for (k, val) in extra.as_object().unwrap() {
        more[k] = val.clone();
    }
    config_json("http://127.0.0.1:9", "openai", dir, more)
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never: {what}");
}

fn sha256_file(p: &Path) -> String {
    soma_capsule::bundle::sha256_digest(&std::fs::read(p).unwrap())
}

#[tokio::test]
async fn a_revoked_capsule_leaves_the_agent_view_and_comes_back_checked() {
    let v = volume();
    let cfg_dir = tempfile::tempdir().unwrap();
    let path = cfg_dir.path().join("config.json");
    let mut config = base_config(&v, cfg_dir.path(), json!({}));
    let h = sidecar(&config, &path).await;
    let seen = v.visible.join("kb");
    let held = v.withheld.join("kb");
    assert!(seen.join("manifest.json").exists());
    assert_eq!(recall_refunds(&h, "kb").await.status, 200);

    // Revoked through the file (the operator's ConfigMap): the folder leaves visible/ whole.
    config["revokedCapsules"] = json!([{"name": "kb", "digest": v.digest, "reason": REASON}]);
    std::fs::write(&path, config.to_string()).unwrap();
    until("kb withdrawn", || !seen.exists()).await;
    assert_eq!(
        sha256_file(&held.join("manifest.json")),
        v.digest,
        "the same content, withheld"
    );
    assert!(held.join("documents/billing.md").exists());
    let r = recall_refunds(&h, "kb").await;
    assert_eq!(r.status, 410, "{}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.revoked")
    );

    // Lifted: back in view, checked against its digest, served again.
    config["revokedCapsules"] = json!([]);
    std::fs::write(&path, config.to_string()).unwrap();
    until("kb back", || seen.join("manifest.json").exists()).await;
    assert!(!held.exists());
    assert_eq!(recall_refunds(&h, "kb").await.status, 200);

    // A withheld folder changed while revoked fails the check: it stays out of view and
    // recall says why.
    config["revokedCapsules"] = json!([{"name": "kb", "digest": v.digest, "reason": REASON}]);
    std::fs::write(&path, config.to_string()).unwrap();
    until("kb withdrawn again", || !seen.exists()).await;
    tamper(&held);
    config["revokedCapsules"] = json!([]);
    std::fs::write(&path, config.to_string()).unwrap();
    let r = until_recall(&h, 409).await;
    assert_eq!(r["error"]["code"], "capsule_unavailable");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no longer holds the verified content"),
        "{message}"
    );
    assert!(
        !seen.exists(),
        "a changed folder never comes back into view"
    );
    assert!(held.exists());
    h.proxy.stop().await;
}

#[tokio::test]
async fn a_sidecar_starting_with_a_revocation_withdraws_before_serving_and_restores_after_one_lifted()
 {
    let v = volume();
    let cfg_dir = tempfile::tempdir().unwrap();
    let path = cfg_dir.path().join("config.json");
    let revoked = base_config(
        &v,
        cfg_dir.path(),
        json!({"revokedCapsules": [{"name": "kb", "digest": v.digest, "reason": REASON}]}),
    );
    let h = sidecar(&revoked, &path).await;
    assert!(
        !v.visible.join("kb").exists(),
        "withdrawn before start returned"
    );
    assert_eq!(recall_refunds(&h, "kb").await.status, 410);
    h.proxy.stop().await;
    // Restarted (a sidecar container restart) without the revocation and without a ledger:
    // the file is the only word, so the folder found withheld is checked and put back.
    let lifted = base_config(&v, cfg_dir.path(), json!({}));
    let h = sidecar(&lifted, &path).await;
    assert!(v.visible.join("kb/manifest.json").exists());
    assert_eq!(
        recall_refunds(&h, "kb").await.status,
        200,
        "loaded from where it was found"
    );
    h.proxy.stop().await;
}

#[tokio::test]
async fn the_ledger_revokes_and_lifts_and_a_restart_waits_for_it() {
    let pg = Pg::start();
    let pool = pg.pool().await;
    soma_ledger::MIGRATOR.run(&pool).await.unwrap();
    let v = volume();
    let cfg_dir = tempfile::tempdir().unwrap();
    let path = cfg_dir.path().join("config.json");
    let config = base_config(
        &v,
        cfg_dir.path(),
        json!({"databaseUrl": pg.url(), "live": {"fileCheckMs": 0, "ledgerPollMs": 0}}),
    );
    let h = sidecar(&config, &path).await;
    let row = soma_ledger::live::CapsuleRevocation {
        namespace: "research".into(),
        name: "kb".into(),
        digest: v.digest.clone(),
        reason: "the signature of Capsule research/kb no longer verifies".into(),
    };
    assert!(
        soma_ledger::live::revoke_capsule(&pool, &row)
            .await
            .unwrap()
    );
    until("kb withdrawn by the ledger", || {
        !v.visible.join("kb").exists()
    })
    .await;
    assert!(v.withheld.join("kb/manifest.json").exists());
    h.proxy.stop().await;

    // A restart while the ledger still revokes: the file says nothing, but with a ledger the
    // folder is not put back before the ledger has been read, and then it stays withheld.
    let h = sidecar(&config, &path).await;
    assert!(!v.visible.join("kb").exists());
    let r = until_recall(&h, 410).await;
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer verifies")
    );
    assert!(!v.visible.join("kb").exists());
    assert!(
        soma_ledger::live::reinstate_capsule(&pool, "research", "kb", &v.digest)
            .await
            .unwrap()
    );
    until("kb back after the ledger lifted it", || {
        v.visible.join("kb/manifest.json").exists()
    })
    .await;
    until_recall(&h, 200).await;
    h.proxy.stop().await;
}

async fn until_recall(h: &Harness, want: u16) -> Value {
    for _ in 0..400 {
        let r = recall_refunds(h, "kb").await;
        if r.status.as_u16() == want {
            return r.json();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("recall never answered {want}");
}

/// A ConfigMap Capsule: one file in its folder (`visible/<name>/<key>`, as its init container
/// writes it), named in the configuration with its digest and file.
#[tokio::test]
async fn a_config_map_capsule_is_withdrawn_and_comes_back_only_as_its_verified_file() {
    let v = volume();
    let faq = v.visible.join("faq");
    std::fs::create_dir_all(&faq).unwrap();
    let bytes = b"{\"q\": \"refund?\", \"a\": \"five days\"}\n";
    std::fs::write(faq.join("faq.jsonl"), bytes).unwrap();
    let faq_digest = soma_capsule::bundle::sha256_digest(bytes);
    let cfg_dir = tempfile::tempdir().unwrap();
    let path = cfg_dir.path().join("config.json");
    let mut config = base_config(
        &v,
        cfg_dir.path(),
        json!({"capsules": [{"name": "kb", "digest": v.digest},
                            {"name": "faq", "digest": faq_digest, "file": "faq.jsonl"}]}),
    );
    let h = sidecar(&config, &path).await;
    // Recall serves bundles only, and says so for the file.
    let r = recall_refunds(&h, "faq").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("one file (faq.jsonl)"), "{}", r.text());
    assert_eq!(
        recall_refunds(&h, "kb").await.status,
        200,
        "kb is served as before"
    );

    // Revoked (its digest is the file's): the folder leaves the agent's view.
    let reason = "Capsule research/faq is revoked (spec.revoked)";
    config["revokedCapsules"] = json!([{"name": "faq", "digest": faq_digest, "reason": reason}]);
    std::fs::write(&path, config.to_string()).unwrap();
    until("faq withdrawn", || !faq.exists()).await;
    let held = v.withheld.join("faq");
    assert_eq!(std::fs::read(held.join("faq.jsonl")).unwrap(), bytes);
    let r = recall_refunds(&h, "faq").await;
    assert_eq!(r.status, 410, "{}", r.text());
    assert!(
        v.visible.join("kb/manifest.json").exists(),
        "only faq moved"
    );

    // Lifted: the file is checked against the digest and put back.
    config["revokedCapsules"] = json!([]);
    std::fs::write(&path, config.to_string()).unwrap();
    until("faq back", || faq.join("faq.jsonl").exists()).await;
    assert!(!held.exists());

    // Changed while withheld: it stays out of view.
    config["revokedCapsules"] = json!([{"name": "faq", "digest": faq_digest, "reason": reason}]);
    std::fs::write(&path, config.to_string()).unwrap();
    until("faq withdrawn again", || !faq.exists()).await;
    let file = held.join("faq.jsonl");
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    std::fs::write(&file, b"{\"q\": \"refund?\", \"a\": \"never\"}\n").unwrap();
    config["revokedCapsules"] = json!([]);
    std::fs::write(&path, config.to_string()).unwrap();
    for _ in 0..400 {
        let r = recall_refunds(&h, "faq").await;
        if r.status == 409 && r.text().contains("no longer holds the verified content") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r = recall_refunds(&h, "faq").await;
    assert!(
        r.text().contains("no longer holds the verified content"),
        "{}",
        r.text()
    );
    assert!(!faq.exists(), "a changed file never comes back into view");
    assert!(held.exists());
    h.proxy.stop().await;
}
