//! The provider key from a real OpenBao dev server (`bao server -dev`, the Vault API): AppRole
//! and JWT login, KV v2 reads, rotation while a stream is being relayed and a client sends
//! continuously, Vault unreachable and back, permission denied, a missing path or field, a
//! key the provider refuses, token revocation at stop, and no secret in any log line (TRACE),
//! metric or error body of the real binary. Dynamic ledger credentials from the database
//! secrets engine against a real PostgreSQL that checks passwords: usage delivered as the
//! leased user, the lease renewed and replaced at its max TTL, and the users gone at stop.
//!
//! Kubernetes auth is not exercised here: Vault's Kubernetes auth method calls the cluster's
//! TokenReview API, which neither these machines nor the kmock stand-in serve (docs/vault.md).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use soma_proxy::fake_upstream::FakeUpstream;
use soma_testsupport::Bao;
use support::{KEY, TOKEN, http, send, start_proxy};

/// The key Vault rotates to; no response, log or error may contain it either.
const NEW_KEY: &str = "sk-test-ROTATED-52b8e0aa9c31";
const ROLE_ID: &str = "soma-role-id-0c5d";
const SECRET_ID: &str = "soma-secret-id-9b7f1e2d";
const KV_PATH: &str = "agents/research/openai";

/// AppRole `sidecar` may read `secret/data/agents/*`; AppRole `stranger` may read nothing.
/// The secret holds `api-key`.
fn seed(bao: &Bao, key: &str) {
    bao.ok(&["auth", "enable", "approle"]);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.hcl");
    std::fs::write(
        &policy,
        r#"path "secret/data/agents/*" { capabilities = ["read"] }"#,
    )
    .unwrap();
    bao.ok(&["policy", "write", "agents-read", policy.to_str().unwrap()]);
    for (role, policies, role_id, secret_id) in [
        ("sidecar", "agents-read", ROLE_ID, SECRET_ID),
        ("stranger", "default", "stranger-id", "stranger-secret"),
    ] {
        bao.ok(&[
            "write",
            &format!("auth/approle/role/{role}"),
            &format!("token_policies={policies}"),
            "token_ttl=1h",
        ]);
        bao.ok(&[
            "write",
            &format!("auth/approle/role/{role}/role-id"),
            &format!("role_id={role_id}"),
        ]);
        bao.ok(&[
            "write",
            &format!("auth/approle/role/{role}/custom-secret-id"),
            &format!("secret_id={secret_id}"),
        ]);
    }
    put_key(bao, key);
}

fn put_key(bao: &Bao, key: &str) {
    bao.ok(&[
        "kv",
        "put",
        &format!("secret/{KV_PATH}"),
        &format!("api-key={key}"),
        "owner=research",
    ]);
}

/// `credentials.vault` logging in with AppRole `role_id`/`secret_id` (written to files in `dir`).
fn approle(addr: &str, dir: &std::path::Path, role_id: &str, secret_id: &str) -> Value {
    std::fs::write(dir.join("role-id"), role_id).unwrap();
    std::fs::write(dir.join("secret-id"), format!("{secret_id}\n")).unwrap();
    json!({"vault": {
        "address": addr,
        "auth": {"appRole": {"roleIdPath": dir.join("role-id"), "secretIdPath": dir.join("secret-id")}},
        "path": KV_PATH,
        "key": "api-key",
        "refreshMs": 100,
    }})
}

struct Sidecar {
    upstream: FakeUpstream,
    proxy: soma_proxy::Running,
    dir: tempfile::TempDir,
}

async fn sidecar(credentials: impl FnOnce(&std::path::Path) -> Value) -> Sidecar {
    sidecar_for("openai", credentials).await
}

async fn sidecar_for(kind: &str, credentials: impl FnOnce(&std::path::Path) -> Value) -> Sidecar {
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config_json(&upstream.url(), kind, dir.path(), json!({}));
    config["credentials"] = credentials(dir.path());
    let proxy = start_proxy(&config).await;
    Sidecar {
        upstream,
        proxy,
        dir,
    }
}

impl Sidecar {
    async fn chat(&self, extra: &str) -> support::Reply {
        let body = json!({"model": "gpt-4o", "max_tokens": 4,
            "messages": [{"role": "user", "content": format!("hello {extra}")}]});
        send(
            &http(),
            "POST",
            &format!("http://{}/v1/chat/completions", self.proxy.proxy_addr),
            &[
                ("authorization", &format!("Bearer {TOKEN}")),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
    }

    async fn messages(&self) -> support::Reply {
        let body = json!({"model": "claude-sonnet-4", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]});
        send(
            &http(),
            "POST",
            &format!("http://{}/v1/messages", self.proxy.proxy_addr),
            &[
                ("x-api-key", TOKEN),
                ("content-type", "application/json"),
                ("anthropic-version", "2023-06-01"),
            ],
            body.to_string(),
        )
        .await
    }

    async fn readyz(&self) -> (u16, Value) {
        let r = send(
            &http(),
            "GET",
            &format!("http://{}/readyz", self.proxy.admin_addr),
            &[],
            String::new(),
        )
        .await;
        (r.status.as_u16(), r.json())
    }

    async fn metrics(&self) -> String {
        send(
            &http(),
            "GET",
            &format!("http://{}/metrics", self.proxy.admin_addr),
            &[],
            String::new(),
        )
        .await
        .text()
    }

    /// Waits until `/readyz` answers `status` with `reason` (None: no problem).
    async fn wait_ready(&self, status: u16, reason: Option<&str>) -> Value {
        let mut last = json!(null);
        for _ in 0..400 {
            let (s, body) = self.readyz().await;
            if s == status && body["problem"]["reason"].as_str() == reason {
                return body;
            }
            last = json!({"status": s, "body": body});
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("readyz never became {status} {reason:?}: {last}");
    }

    /// The keys the provider was presented, in order.
    fn presented(&self) -> Vec<String> {
        self.upstream
            .received()
            .iter()
            .filter_map(|r| {
                r.headers
                    .iter()
                    .find(|(k, _)| k == "authorization")
                    .map(|(_, v)| v.trim_start_matches("Bearer ").to_owned())
            })
            .collect()
    }
}

fn assert_no_secret(what: &str, text: &str) {
    for s in [KEY, NEW_KEY, SECRET_ID] {
        assert!(!text.contains(s), "{what} holds a secret: {text}");
    }
}

#[tokio::test]
async fn approle_login_reads_the_key_and_the_provider_gets_it() {
    let bao = Bao::start();
    seed(&bao, KEY);
    let s = sidecar(|d| approle(&bao.addr(), d, ROLE_ID, SECRET_ID)).await;
    let body = s.wait_ready(200, None).await;
    assert_eq!(body, json!({"ready": true}));
    let r = s.chat("").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.presented(), vec![KEY.to_owned()]);
    let m = s.metrics().await;
    assert!(m.contains("soma_proxy_credentials_ready 1"), "{m}");
    assert!(
        m.contains(r#"soma_proxy_credential_refreshes_total{outcome="ok"}"#),
        "{m}"
    );
    assert_no_secret("metrics", &m);
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_rotation_mid_stream_drops_nothing_and_the_new_key_is_used_within_the_interval() {
    let bao = Bao::start();
    seed(&bao, KEY);
    let s = sidecar(|d| approle(&bao.addr(), d, ROLE_ID, SECRET_ID)).await;
    s.wait_ready(200, None).await;
    // The provider accepts both keys during the rotation, as a real one does.
    s.upstream.accept_key(NEW_KEY);

    // A long stream, started with the old key (20 ms between 200 chunks).
    let url = format!("http://{}/v1/chat/completions", s.proxy.proxy_addr);
    let stream = {
        let url = url.clone();
        tokio::spawn(async move {
            let body = json!({"model": "gpt-4o", "max_tokens": 200, "stream": true,
                "messages": [{"role": "user", "content": "SCENARIO:slow"}]});
            send(
                &http(),
                "POST",
                &url,
                &[
                    ("authorization", &format!("Bearer {TOKEN}")),
                    ("content-type", "application/json"),
                ],
                body.to_string(),
            )
            .await
        })
    };
    // The stream reached the provider with the old key before the rotation.
    for _ in 0..400 {
        if !s.presented().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.presented(), vec![KEY.to_owned()]);

    // A client sending continuously while the key changes in Vault.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sender = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !*stop_rx.borrow() {
                let body = json!({"model": "gpt-4o", "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}]});
                let r = send(
                    &http(),
                    "POST",
                    &url,
                    &[
                        ("authorization", &format!("Bearer {TOKEN}")),
                        ("content-type", "application/json"),
                    ],
                    body.to_string(),
                )
                .await;
                statuses.push(r.status.as_u16());
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    put_key(&bao, NEW_KEY);
    // The new key is in use within the refresh interval (100 ms) plus a read.
    let mut switched = false;
    for _ in 0..400 {
        if s.presented().last().map(String::as_str) == Some(NEW_KEY) {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(switched, "the new key was never presented");
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_tx.send(true).unwrap();
    let statuses = sender.await.unwrap();
    assert!(statuses.len() > 2, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "a request failed during the rotation: {statuses:?}"
    );
    // Once switched, only the new key is presented.
    let presented = s.presented();
    let first_new = presented.iter().position(|k| k == NEW_KEY).unwrap();
    assert!(
        presented[first_new..].iter().all(|k| k == NEW_KEY),
        "{presented:?}"
    );
    let r = stream.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.broken, "the stream started with the old key was cut");
    let text = r.text();
    assert!(text.contains("w199"), "the stream did not finish");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let m = s.metrics().await;
    assert!(
        m.contains(r#"soma_proxy_credential_refreshes_total{outcome="rotated"} 1"#),
        "{m}"
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn vault_unreachable_is_a_503_in_each_wire_format_until_it_comes_back() {
    let mut bao = Bao::start();
    bao.stop();
    let s = sidecar(|d| approle(&bao.addr(), d, ROLE_ID, SECRET_ID)).await;
    let body = s.wait_ready(503, Some("VaultUnreachable")).await;
    let msg = body["problem"]["message"].as_str().unwrap();
    assert!(msg.contains(&bao.addr()), "{msg}");
    let r = s.chat("").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    let b = r.json();
    assert_eq!(b["error"]["code"], "credentials_unavailable", "{b}");
    assert_eq!(b["error"]["type"], "api_error");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("VaultUnreachable"),
        "{b}"
    );
    assert!(
        s.upstream.received().is_empty(),
        "nothing reached the provider"
    );
    let anthropic = sidecar_for("anthropic", |d| approle(&bao.addr(), d, ROLE_ID, SECRET_ID)).await;
    anthropic.wait_ready(503, Some("VaultUnreachable")).await;
    let r = anthropic.messages().await;
    assert_eq!(r.status, 503);
    let b = r.json();
    assert_eq!(
        (b["type"].as_str(), b["error"]["type"].as_str()),
        (Some("error"), Some("api_error"))
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("VaultUnreachable"),
        "{b}"
    );
    anthropic.proxy.stop().await;

    // Vault comes up: the sidecar becomes ready without a restart.
    bao.run();
    seed(&bao, KEY);
    s.wait_ready(200, None).await;
    assert_eq!(s.chat("").await.status, 200);

    // Vault goes away mid-run: the key in hand keeps serving; /readyz says what failed.
    bao.stop();
    let body = s.wait_ready(200, Some("VaultUnreachable")).await;
    assert_eq!(body["ready"], true);
    assert_eq!(s.chat("").await.status, 200);

    // And back (a dev server restarts empty: the token the sidecar held is gone, so it logs
    // in again).
    bao.run();
    seed(&bao, NEW_KEY);
    s.upstream.accept_key(NEW_KEY);
    s.wait_ready(200, None).await;
    assert_eq!(s.chat("").await.status, 200);
    assert_eq!(s.presented().last().map(String::as_str), Some(NEW_KEY));
    let m = s.metrics().await;
    assert!(
        m.contains(r#"soma_proxy_errors_total{reason="credentials_unavailable"} 1"#),
        "{m}"
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn permission_denied_a_missing_path_or_field_and_a_refused_login_say_why() {
    let bao = Bao::start();
    seed(&bao, KEY);
    bao.ok(&["kv", "put", "secret/agents/research/nokey", "other=1"]);
    let cases = [
        (
            "stranger-id",
            "stranger-secret",
            KV_PATH,
            "api-key",
            "VaultPermissionDenied",
            "denied reading secret/data/agents/research/openai",
        ),
        (
            ROLE_ID,
            SECRET_ID,
            "agents/research/absent",
            "api-key",
            "VaultPathNotFound",
            "no secret at secret/data/agents/research/absent",
        ),
        (
            ROLE_ID,
            SECRET_ID,
            "agents/research/nokey",
            "api-key",
            "VaultKeyMissing",
            "no non-empty string field \"api-key\"",
        ),
        (
            ROLE_ID,
            "wrong-secret-id-3e1",
            KV_PATH,
            "api-key",
            "VaultLoginFailed",
            "refused the appRole login",
        ),
    ];
    for (role_id, secret_id, path, key, reason, says) in cases {
        let s = sidecar(|d| {
            let mut c = approle(&bao.addr(), d, role_id, secret_id);
            c["vault"]["path"] = json!(path);
            c["vault"]["key"] = json!(key);
            c
        })
        .await;
        let body = s.wait_ready(503, Some(reason)).await;
        let msg = body["problem"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{reason}: {msg}");
        assert!(!msg.contains(secret_id), "{reason}: {msg}");
        let r = s.chat("").await;
        assert_eq!(r.status, 503, "{reason}");
        assert!(r.text().contains(reason), "{reason}: {}", r.text());
        assert!(s.upstream.received().is_empty(), "{reason}");
        s.proxy.stop().await;
    }

    // A policy taken away mid-run drops the key: Vault's answer is a decision, not an outage.
    let s = sidecar(|d| approle(&bao.addr(), d, ROLE_ID, SECRET_ID)).await;
    s.wait_ready(200, None).await;
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.hcl");
    std::fs::write(
        &empty,
        r#"path "secret/data/elsewhere" { capabilities = ["read"] }"#,
    )
    .unwrap();
    bao.ok(&["policy", "write", "agents-read", empty.to_str().unwrap()]);
    s.wait_ready(503, Some("VaultPermissionDenied")).await;
    assert_eq!(s.chat("").await.status, 503);
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_key_the_provider_refuses_makes_the_sidecar_not_ready_until_vault_has_another() {
    let bao = Bao::start();
    seed(&bao, KEY);
    let s = sidecar(|d| approle(&bao.addr(), d, ROLE_ID, SECRET_ID)).await;
    s.wait_ready(200, None).await;
    // The provider revokes the key before Vault has the new one.
    s.upstream.revoke_key(KEY);
    let r = s.chat("").await;
    assert_eq!(r.status, 401, "the provider's answer is passed on");
    assert!(!r.text().contains(KEY), "scrubbed: {}", r.text());
    s.wait_ready(503, Some("ProviderRejectedKey")).await;
    // Vault gets the new key: ready again.
    s.upstream.accept_key(NEW_KEY);
    put_key(&bao, NEW_KEY);
    s.wait_ready(200, None).await;
    assert_eq!(s.chat("").await.status, 200);
    s.proxy.stop().await;
}

/// The sidecar's token accessors (the root token's is not one of them).
fn sidecar_accessors(bao: &Bao) -> Vec<String> {
    let out = bao.ok(&["list", "-format=json", "auth/token/accessors"]);
    let all: Vec<String> = serde_json::from_str(&out).unwrap();
    all.into_iter()
        .filter(|a| {
            let info = bao.ok(&["token", "lookup", "-format=json", "-accessor", a]);
            let v: Value = serde_json::from_str(&info).unwrap();
            v["data"]["path"]
                .as_str()
                .unwrap_or_default()
                .starts_with("auth/approle/")
        })
        .collect()
}

#[tokio::test]
async fn the_token_is_revoked_when_the_sidecar_stops() {
    let bao = Bao::start();
    seed(&bao, KEY);
    let s = sidecar(|d| approle(&bao.addr(), d, ROLE_ID, SECRET_ID)).await;
    s.wait_ready(200, None).await;
    assert_eq!(sidecar_accessors(&bao).len(), 1);
    s.proxy.stop().await;
    assert_eq!(sidecar_accessors(&bao), Vec::<String>::new());
    drop(s.dir);
}

/// base64url without padding.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An ECDSA signature's DER (`SEQUENCE { INTEGER r, INTEGER s }`) as JWS's `r || s`.
fn der_to_jws(der: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 2;
    for _ in 0..2 {
        assert_eq!(der[at], 0x02);
        let len = der[at + 1] as usize;
        let int = &der[at + 2..at + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        at += 2 + len;
    }
    out
}

#[tokio::test]
async fn jwt_auth_with_a_key_pair_the_test_makes() {
    use rcgen::SigningKey;
    let bao = Bao::start();
    seed(&bao, KEY);
    let key = rcgen::KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("pub.pem");
    std::fs::write(&pem, key.public_key_pem()).unwrap();
    bao.ok(&["auth", "enable", "jwt"]);
    bao.ok(&[
        "write",
        "auth/jwt/config",
        &format!("jwt_validation_pubkeys=@{}", pem.display()),
    ]);
    bao.ok(&[
        "write",
        "auth/jwt/role/soma-sidecar",
        "role_type=jwt",
        "bound_audiences=vault",
        "user_claim=sub",
        "bound_subject=system:serviceaccount:research:assistant",
        "token_policies=agents-read",
        "token_ttl=1h",
    ]);
    let now = jiff::Timestamp::now().as_second();
    let header = b64url(br#"{"alg":"ES256","typ":"JWT"}"#);
    let claims = b64url(
        json!({"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:research:assistant",
            "aud": ["vault"], "iat": now, "nbf": now, "exp": now + 3600})
        .to_string()
        .as_bytes(),
    );
    let signing_input = format!("{header}.{claims}");
    let sig = der_to_jws(&key.sign(signing_input.as_bytes()).unwrap());
    let jwt = format!("{signing_input}.{}", b64url(&sig));
    let token = dir.path().join("token");
    std::fs::write(&token, &jwt).unwrap();

    let s = sidecar(|_| {
        json!({"vault": {"address": bao.addr(), "auth": {"jwt": {"tokenPath": token}},
            "role": "soma-sidecar", "path": format!("secret/data/{KV_PATH}"), "key": "api-key",
            "refreshMs": 100}})
    })
    .await;
    s.wait_ready(200, None).await;
    assert_eq!(s.chat("").await.status, 200);
    assert_eq!(s.presented(), vec![KEY.to_owned()]);
    s.proxy.stop().await;

    // A token for another subject is refused, and the JWT is not in the reason.
    let s = sidecar(|_| {
        json!({"vault": {"address": bao.addr(), "auth": {"jwt": {"tokenPath": token}},
            "role": "missing-role", "path": KV_PATH, "key": "api-key"}})
    })
    .await;
    let body = s.wait_ready(503, Some("VaultLoginFailed")).await;
    assert!(!body.to_string().contains(&jwt));
    s.proxy.stop().await;
}

/// The real binary at TRACE through login, reads, a rotation, a denial, 503s and a stop: the
/// provider keys, the AppRole secret id and every Vault token the server issued (read from
/// its raw audit log) appear in no log line, metric, `/readyz` or error body.
#[tokio::test]
async fn no_token_or_key_in_any_log_line_metric_or_error() {
    let bao = Bao::start_with_raw_audit();
    let audit = bao.audit_log();
    seed(&bao, KEY);
    // The ledger's user comes from the database secrets engine too: its password and lease
    // id must not leak either.
    let mut pg = support::pg::Pg::start();
    // Short leases, so that renewals, a replacement and a refused read happen here too.
    let database_url = ledger_engine(&bao, &pg, "2s", "4s").await;
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    upstream.accept_key(NEW_KEY);
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config_json(
        &upstream.url(),
        "openai",
        dir.path(),
        json!({"databaseUrl": database_url, "deliveryIntervalMs": 50,
               "ledgerCredentials": {"vault": {"role": "soma-ledger"}}}),
    );
    config["credentials"] = approle(&bao.addr(), dir.path(), ROLE_ID, SECRET_ID);
    // The key file the harness writes is not used: Vault is.
    std::fs::remove_file(dir.path().join("api-key")).unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let proc = support::sidecar::spawn(&path, "trace");
    let client = http();
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let url = format!("http://{}/v1/chat/completions", proc.addr);
    let mut seen = Vec::new();
    let chat = |stream: bool| {
        json!({"model": "gpt-4o", "max_tokens": 3, "stream": stream,
            "messages": [{"role": "user", "content": "SCENARIO:echo-key"}]})
        .to_string()
    };
    let ready = |want: u16| {
        let client = client.clone();
        let url = format!("http://{}/readyz", proc.admin);
        async move {
            for _ in 0..400 {
                let r = send(&client, "GET", &url, &[], String::new()).await;
                if r.status.as_u16() == want {
                    return r.text();
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("readyz never {want}");
        }
    };
    seen.push(ready(200).await);
    seen.push(
        send(&client, "POST", &url, &headers, chat(false))
            .await
            .text(),
    );
    seen.push(
        send(&client, "POST", &url, &headers, chat(true))
            .await
            .text(),
    );
    put_key(&bao, NEW_KEY);
    for _ in 0..400 {
        if upstream
            .received()
            .iter()
            .any(|r| r.headers.iter().any(|(_, v)| v.contains(NEW_KEY)))
        {
            break;
        }
        seen.push(
            send(&client, "POST", &url, &headers, chat(false))
                .await
                .text(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir2 = tempfile::tempdir().unwrap();
    let empty = dir2.path().join("empty.hcl");
    std::fs::write(
        &empty,
        r#"path "secret/data/elsewhere" { capabilities = ["read"] }"#,
    )
    .unwrap();
    bao.ok(&["policy", "write", "agents-read", empty.to_str().unwrap()]);
    seen.push(ready(503).await);
    seen.push(
        send(&client, "POST", &url, &headers, chat(false))
            .await
            .text(),
    );
    // The ledger's credentials refused until the lease ends: what /readyz says about them.
    ledger_policy(&bao, false);
    let readyz = format!("http://{}/readyz", proc.admin);
    let mut ledger_said = String::new();
    for _ in 0..1_200 {
        ledger_said = send(&client, "GET", &readyz, &[], String::new())
            .await
            .text();
        if ledger_said.contains("LedgerVaultPermissionDenied")
            && ledger_said.contains("no ledger user")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        ledger_said.contains("LedgerVaultPermissionDenied"),
        "{ledger_said}"
    );
    seen.push(ledger_said);
    ledger_policy(&bao, true);
    // A new user before the stop, so the outbox can be flushed to the ledger.
    for _ in 0..1_200 {
        let said = send(&client, "GET", &readyz, &[], String::new())
            .await
            .text();
        if said.contains(r#""ledger":{"usable":true}"#) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let metrics_url = format!("http://{}/metrics", proc.admin);
    seen.push(
        send(&client, "GET", &metrics_url, &[], String::new())
            .await
            .text(),
    );
    // SIGTERM, so that the stop (and the revocation) is logged too.
    let pid = proc.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // What it printed while starting (the first login and ledger lease) is checked too.
    let mut lines = proc.startup.clone();
    while let Ok(l) = proc.lines.recv_timeout(Duration::from_secs(20)) {
        lines.push(l);
        if lines
            .last()
            .is_some_and(|l| l.contains("Vault token revoked"))
        {
            break;
        }
    }
    assert!(
        lines.iter().any(|l| l.contains("Vault token revoked")),
        "{lines:#?}"
    );
    // Every client token Vault issued, from its raw audit log.
    let audit_text = std::fs::read_to_string(&audit).unwrap();
    let tokens: Vec<String> = audit_text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            v["response"]["auth"]["client_token"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(!tokens.is_empty(), "no login in the audit log");
    // Every ledger password and lease id Vault handed out.
    let ledger_secrets: Vec<String> = audit_text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["request"]["path"] == "database/creds/soma-ledger")
        .flat_map(|v| {
            [
                v["response"]["data"]["password"]
                    .as_str()
                    .map(str::to_owned),
                v["response"]["secret"]["lease_id"]
                    .as_str()
                    .or(v["response"]["lease_id"].as_str())
                    .map(str::to_owned),
            ]
        })
        .flatten()
        .filter(|s| !s.is_empty())
        .collect();
    assert!(
        !ledger_secrets.is_empty(),
        "no ledger credentials in the audit log"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ledger credentials from Vault in use")),
        "the ledger user was never leased: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ledger credentials lease revoked")),
        "{lines:#?}"
    );
    assert!(
        lines.len() > 20,
        "TRACE logging produced too little to mean anything"
    );
    let mut secrets: Vec<&str> = vec![KEY, NEW_KEY, SECRET_ID];
    secrets.extend(tokens.iter().map(String::as_str));
    secrets.extend(ledger_secrets.iter().map(String::as_str));
    for text in lines.iter().chain(seen.iter()) {
        for s in &secrets {
            assert!(!text.contains(s), "a secret leaked: {text}");
        }
    }
    drop(proc);
    pg.stop();
}

/// The superuser connection to the test's ledger database.
async fn superuser(pg: &support::pg::Pg) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&format!("postgres://soma@127.0.0.1:{}/ledger", pg.port()))
        .await
        .unwrap()
}

/// Database `ledger` whose schema belongs to the group role `soma_ledger`, passwords checked
/// for every user but the superuser `soma`, and Vault's database secrets engine making members
/// of `soma_ledger` (role `soma-ledger`, TTL `ttl`, max `max_ttl`); AppRole `sidecar` may ask
/// for them and revoke its leases. Returns the `databaseUrl` (no user or password).
async fn ledger_engine(bao: &Bao, pg: &support::pg::Pg, ttl: &str, max_ttl: &str) -> String {
    pg.database("ledger").await;
    let admin = superuser(pg).await;
    for sql in [
        "CREATE ROLE soma_ledger NOLOGIN",
        "ALTER SCHEMA public OWNER TO soma_ledger",
    ] {
        sqlx::query(sql).execute(&admin).await.unwrap();
    }
    std::fs::write(
        pg.data().join("pg_hba.conf"),
        "local all all trust\nhost all soma 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&admin)
        .await
        .unwrap();
    bao.ok(&["secrets", "enable", "database"]);
    bao.ok(&[
        "write",
        "database/config/ledger",
        "plugin_name=postgresql-database-plugin",
        &format!(
            "connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/ledger?sslmode=disable",
            pg.port()
        ),
        "username=soma",
        "password=unused-trust",
        "allowed_roles=soma-ledger",
    ]);
    // Sessions run as soma_ledger, so the tables the sidecar's migrations create belong to it
    // and a leased user owns nothing: dropping it at revocation cannot fail.
    bao.ok(&[
        "write",
        "database/roles/soma-ledger",
        "db_name=ledger",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE soma_ledger; ALTER ROLE \"{{name}}\" SET role = 'soma_ledger';",
        "revocation_statements=SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}'; DROP ROLE IF EXISTS \"{{name}}\";",
        &format!("default_ttl={ttl}"),
        &format!("max_ttl={max_ttl}"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("ledger.hcl");
    std::fs::write(
        &policy,
        "path \"database/creds/soma-ledger\" { capabilities = [\"read\"] }\npath \"sys/leases/revoke\" { capabilities = [\"update\"] }\n",
    )
    .unwrap();
    bao.ok(&["policy", "write", "ledger-creds", policy.to_str().unwrap()]);
    bao.ok(&[
        "write",
        "auth/approle/role/sidecar",
        "token_policies=agents-read,ledger-creds",
        "token_ttl=1h",
    ]);
    format!("postgres://127.0.0.1:{}/ledger", pg.port())
}

/// The users Vault made for the ledger that exist now.
async fn leased_users(admin: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'v-%' ORDER BY 1")
        .fetch_all(admin)
        .await
        .unwrap()
}

/// A sidecar logging in with AppRole `sidecar`, its ledger user from `soma-ledger` of the
/// database secrets engine, delivering to `url`.
async fn ledger_sidecar(bao: &Bao, url: &str) -> Sidecar {
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config_json(
        &upstream.url(),
        "openai",
        dir.path(),
        json!({"databaseUrl": url, "deliveryIntervalMs": 50,
               "ledgerCredentials": {"vault": {"role": "soma-ledger"}}}),
    );
    config["credentials"] = approle(&bao.addr(), dir.path(), ROLE_ID, SECRET_ID);
    let proxy = start_proxy(&config).await;
    Sidecar {
        upstream,
        proxy,
        dir,
    }
}

/// Stops the sidecar: its lease is revoked, so no leased user is left in PostgreSQL.
async fn stopped_and_revoked(s: Sidecar, admin: sqlx::PgPool, mut pg: support::pg::Pg) {
    s.proxy.stop().await;
    assert_eq!(leased_users(&admin).await, Vec::<String>::new());
    admin.close().await;
    pg.stop();
}

/// The usage records in the ledger once there are `want` of them (or after a bounded wait).
async fn in_ledger(admin: &sqlx::PgPool, want: i64) -> i64 {
    let mut found = 0i64;
    for _ in 0..400 {
        found = sqlx::query_scalar("SELECT count(*) FROM usage_records")
            .fetch_one(admin)
            .await
            .unwrap_or(0);
        if found == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    found
}

/// Requests (path) in the raw audit log.
fn audited(bao: &Bao, path: &str) -> usize {
    std::fs::read_to_string(bao.audit_log())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "response" && v["request"]["path"] == path)
        .count()
}

#[tokio::test]
async fn ledger_credentials_from_the_database_engine_are_used_renewed_replaced_and_revoked() {
    let pg = support::pg::Pg::start();
    let bao = Bao::start_with_raw_audit();
    seed(&bao, KEY);
    // Renewed at two thirds of 3 s; at the 8 s max TTL a renewal comes back short and new
    // credentials replace the old.
    let url = ledger_engine(&bao, &pg, "3s", "8s").await;
    let admin = superuser(&pg).await;
    let s = ledger_sidecar(&bao, &url).await;
    let first = leased_users(&admin).await;
    assert_eq!(first.len(), 1, "one user leased at start: {first:?}");

    // Usage reaches the ledger through the leased user, while the lease is renewed and then
    // replaced at its max TTL; requests keep going throughout.
    let mut sent = 0;
    let mut seen: std::collections::BTreeSet<String> = first.iter().cloned().collect();
    let mut delivered_as = std::collections::BTreeSet::new();
    for _ in 0..2_000 {
        assert_eq!(s.chat(&sent.to_string()).await.status, 200);
        sent += 1;
        seen.extend(leased_users(&admin).await);
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT usename::text FROM pg_stat_activity WHERE datname = 'ledger' AND usename LIKE 'v-%'",
        )
        .fetch_all(&admin)
        .await
        .unwrap();
        delivered_as.extend(users);
        let replaced = seen.len() >= 2 && !leased_users(&admin).await.contains(&first[0]);
        if replaced && audited(&bao, "sys/leases/renew") >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        audited(&bao, "sys/leases/renew") >= 1,
        "the lease was never renewed"
    );
    assert!(seen.len() >= 2, "the lease was never replaced: {seen:?}");
    assert!(
        !leased_users(&admin).await.contains(&first[0]),
        "the replaced user was not revoked"
    );
    assert!(
        delivered_as.iter().all(|u| seen.contains(u)) && !delivered_as.is_empty(),
        "the ledger was reached as {delivered_as:?}, not only as leased users {seen:?}"
    );
    // Nothing lost across the swap: every request is in the ledger once.
    assert_eq!(
        in_ledger(&admin, sent).await,
        sent,
        "every request delivered once"
    );

    stopped_and_revoked(s, admin, pg).await;
}

/// Writes policy `ledger-creds`: reading `database/creds/soma-ledger` allowed or not (revoking
/// leases always).
fn ledger_policy(bao: &Bao, creds_allowed: bool) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("ledger.hcl");
    let creds = if creds_allowed {
        "path \"database/creds/soma-ledger\" { capabilities = [\"read\"] }\n"
    } else {
        ""
    };
    std::fs::write(
        &policy,
        format!("{creds}path \"sys/leases/revoke\" {{ capabilities = [\"update\"] }}\n"),
    )
    .unwrap();
    bao.ok(&["policy", "write", "ledger-creds", policy.to_str().unwrap()]);
}

/// A metric's value in the text exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The ledger's user from Vault is refused, granted, refused again until its lease ends, and
/// granted again: `/readyz` (still 200: requests are served) says whether the sidecar holds a
/// usable ledger user and why not, with a `Ledger…` reason of its own; the metrics count every
/// round and show the state; every request reaches the ledger once, after the fact.
#[tokio::test]
async fn a_ledger_credential_failure_is_on_readyz_and_in_the_metrics_until_it_recovers() {
    let pg = support::pg::Pg::start();
    let bao = Bao::start_with_raw_audit();
    seed(&bao, KEY);
    // Renewed at two thirds of 2 s; at the 4 s max TTL new credentials are read.
    let url = ledger_engine(&bao, &pg, "2s", "4s").await;
    let admin = superuser(&pg).await;
    ledger_policy(&bao, false);
    let s = ledger_sidecar(&bao, &url).await;
    // Waits until /readyz's ledger part is `usable` with `reason` (None: no problem).
    let ledger_state = |usable: bool, reason: Option<&'static str>| {
        let s = &s;
        async move {
            let mut last = json!(null);
            for _ in 0..1_200 {
                let (status, body) = s.readyz().await;
                assert_eq!(status, 200, "the provider key is fine: {body}");
                let l = &body["ledger"];
                if l["usable"] == usable && l["problem"]["reason"].as_str() == reason {
                    return body;
                }
                last = body;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("the ledger never became usable={usable} {reason:?}: {last}");
        }
    };
    let mut sent = 0i64;

    // Refused from the start: no ledger user, the reason is the ledger's own, and the sidecar
    // serves all the same.
    let body = ledger_state(false, Some("LedgerVaultPermissionDenied")).await;
    assert!(body["problem"].is_null(), "no provider-key problem: {body}");
    let msg = body["ledger"]["problem"]["message"].as_str().unwrap();
    assert!(msg.contains("database/creds/soma-ledger"), "{msg}");
    assert!(msg.contains("usage waits in its outbox"), "{msg}");
    for _ in 0..3 {
        assert_eq!(s.chat(&sent.to_string()).await.status, 200);
        sent += 1;
    }
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "soma_proxy_ledger_credentials_ready"),
        0.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"soma_proxy_ledger_credential_refreshes_total{outcome="LedgerVaultPermissionDenied"}"#
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "soma_proxy_credentials_ready"), 1.0, "{m}");
    assert_eq!(leased_users(&admin).await, Vec::<String>::new());

    // Granted: a user is leased within the retry interval, and what waited is delivered.
    ledger_policy(&bao, true);
    ledger_state(true, None).await;
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "soma_proxy_ledger_credentials_ready"),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"soma_proxy_ledger_credential_refreshes_total{outcome="issued"}"#
        ) >= 1.0,
        "{m}"
    );

    // Refused again: the current user serves until its lease ends at the max TTL, then there
    // is none; requests are still answered.
    ledger_policy(&bao, false);
    let body = ledger_state(false, Some("LedgerVaultPermissionDenied")).await;
    assert!(
        body["ledger"]["problem"]["message"]
            .as_str()
            .unwrap()
            .contains("no ledger user"),
        "{body}"
    );
    assert_eq!(s.chat(&sent.to_string()).await.status, 200);
    sent += 1;
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "soma_proxy_ledger_credentials_ready"),
        0.0,
        "{m}"
    );

    // And back: a new user, and every request in the ledger exactly once.
    ledger_policy(&bao, true);
    ledger_state(true, None).await;
    assert_eq!(
        in_ledger(&admin, sent).await,
        sent,
        "every request delivered once"
    );
    stopped_and_revoked(s, admin, pg).await;
}
