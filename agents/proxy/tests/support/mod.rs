//! Test harness: the fake upstream and a sidecar on 127.0.0.1 ports, a plain HTTP client.
#![allow(dead_code, clippy::unwrap_used)] // test support: a failed set-up should panic

use std::path::PathBuf;

pub mod capsules;
pub mod fleet;
#[allow(unused_imports)] // each test binary uses part of it
pub use soma_testsupport::{nats, pg};
pub mod sidecar;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, header::HeaderMap};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soma_proxy::fake_upstream::FakeUpstream;
use soma_proxy::{Config, Running};

/// The provider key every test uses; no response, log or error may contain it.
pub const KEY: &str = "sk-test-SECRET-7f3a9c04e1d2";
/// The per-pod client token.
pub const TOKEN: &str = "pod-uid-3f1c2a";

pub struct Harness {
    pub upstream: FakeUpstream,
    pub proxy: Running,
    pub dir: tempfile::TempDir,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

pub fn http() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A config document like the operator's, plus `extra` fields merged in.
pub fn config_json(upstream: &str, kind: &str, dir: &std::path::Path, extra: Value) -> Value {
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let mut c = json!({
        "listen": "127.0.0.1:0",
        "adminListen": "127.0.0.1:0",
        "agent": {"namespace": "research", "name": "assistant"},
        "provider": {"kind": kind, "upstream": upstream, "model": "gpt-4o"},
        "credentials": {"file": key_file},
        "clientTokenEnv": "SOMA_POD_UID",
        "tools": [],
        "capsules": [],
        "outboxPath": dir.join("outbox.db"),
        "prices": {
            "gpt-4o": {"inputPerMTok": 2_500_000, "outputPerMTok": 10_000_000, "cachedInputPerMTok": 1_250_000},
            "gpt-4o-mini": {"inputPerMTok": 150_000, "outputPerMTok": 600_000},
            "text-embedding-3-small": {"inputPerMTok": 20_000, "outputPerMTok": 0},
            "claude-sonnet-4": {"inputPerMTok": 3_000_000, "outputPerMTok": 15_000_000, "cachedInputPerMTok": 300_000, "cacheWritePerMTok": 3_750_000},
        },
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

impl Harness {
    pub async fn start(kind: &str, extra: Value) -> Harness {
        let upstream = FakeUpstream::start(KEY).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = config_json(&upstream.url(), kind, dir.path(), extra);
        let proxy = start_proxy(&config).await;
        Harness {
            upstream,
            proxy,
            dir,
            client: http(),
        }
    }

    /// Like [`Harness::start`], with `prices` added to the price table.
    pub async fn start_with_prices(kind: &str, extra: Value, prices: Value) -> Harness {
        let upstream = FakeUpstream::start(KEY).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_json(&upstream.url(), kind, dir.path(), extra);
        if let (Some(table), Some(more)) = (config["prices"].as_object_mut(), prices.as_object()) {
            for (k, v) in more {
                table.insert(k.clone(), v.clone());
            }
        }
        let proxy = start_proxy(&config).await;
        Harness {
            upstream,
            proxy,
            dir,
            client: http(),
        }
    }

    pub fn outbox_path(&self) -> PathBuf {
        self.dir.path().join("outbox.db")
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.proxy_addr)
    }

    pub fn direct_url(&self, path: &str) -> String {
        format!("{}{path}", self.upstream.url())
    }

    /// POST JSON through the sidecar with the pod token (OpenAI style).
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        send(
            &self.client,
            "POST",
            &self.proxy_url(path),
            &[
                ("authorization", &format!("Bearer {TOKEN}")),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
    }

    /// POST JSON through the sidecar, Anthropic style.
    pub async fn post_anthropic(&self, path: &str, body: &Value) -> Reply {
        send(
            &self.client,
            "POST",
            &self.proxy_url(path),
            &[
                ("x-api-key", TOKEN),
                ("content-type", "application/json"),
                ("anthropic-version", "2023-06-01"),
            ],
            body.to_string(),
        )
        .await
    }

    /// The same request straight to the fake provider with the real key.
    pub async fn post_direct(&self, path: &str, body: &Value, anthropic: bool) -> Reply {
        let auth = format!("Bearer {KEY}");
        let headers: Vec<(&str, &str)> = if anthropic {
            vec![
                ("x-api-key", KEY),
                ("content-type", "application/json"),
                ("anthropic-version", "2023-06-01"),
            ]
        } else {
            vec![
                ("authorization", &auth),
                ("content-type", "application/json"),
            ]
        };
        send(
            &self.client,
            "POST",
            &self.direct_url(path),
            &headers,
            body.to_string(),
        )
        .await
    }

    /// The sidecar's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.proxy.admin_addr);
        send(&self.client, "GET", &url, &[], String::new())
            .await
            .text()
    }

    pub async fn rows(&self) -> Vec<Value> {
        self.proxy.state.outbox.rows().await.unwrap()
    }

    /// Waits until no outbox row is open (settling happens before a response completes, but a
    /// client that left early returns before the relay settles).
    pub async fn settled_rows(&self) -> Vec<Value> {
        for _ in 0..500 {
            let rows = self.rows().await;
            if rows.iter().all(|r| r["state"] == "settled") {
                return rows;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("rows still open: {:?}", self.rows().await);
    }
}

pub async fn start_proxy(config: &Value) -> Running {
    let config = Config::parse(&config.to_string()).unwrap();
    soma_proxy::start(config, TOKEN.to_owned(), None)
        .await
        .unwrap()
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Whether the body ended with an error (a cut stream).
    pub broken: bool,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let (parts, mut body) = resp.into_parts();
    let mut buf = Vec::new();
    let mut broken = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(buf),
        broken,
    }
}

/// Cost in micros of tokens at the test price of `model` (same rule as the sidecar: ceil).
pub fn cost(model: &str, input: u64, cached: u64, output: u64) -> u64 {
    let (i, c, o) = match model {
        "gpt-4o" => (2_500_000u128, 1_250_000u128, 10_000_000u128),
        "gpt-4o-mini" => (150_000, 150_000, 600_000),
        "claude-sonnet-4" => (3_000_000, 300_000, 15_000_000),
        "text-embedding-3-small" => (20_000, 20_000, 0),
        m => panic!("no test price for {m}"),
    };
    let scaled = u128::from(input - cached) * i + u128::from(cached) * c + u128::from(output) * o;
    scaled.div_ceil(1_000_000) as u64
}
