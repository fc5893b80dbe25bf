//! The operator's reads of its sidecars' admin port: the pods of an Agent, and a JSON answer
//! from one pod (`GET http://<podIP>:<admin port><path>`). Shared by the scaling loop (`/load`
//! of ready pods) and the credentials check (`/readyz` of every pod, ready or not).
//!
//! ```text
//!  PodAdmin::pods(ns, agent) ─► [AgentPod {uid, name, ip, ready}] (not being deleted, with an IP)
//!  PodAdmin::get_json(pod, path, accept) ─► T   (bounded by a timeout and a body limit)
//! ```

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::de::DeserializeOwned;

use crate::agent::children::AGENT_LABEL;
use crate::error::{Error, Result};

/// Largest admin answer read.
const BODY_LIMIT: usize = 64 * 1024;

/// One pod of an Agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPod {
    /// `metadata.uid` (the name when there is none).
    pub uid: String,
    /// `metadata.name`.
    pub name: String,
    /// `status.podIP`.
    pub ip: String,
    /// The pod's `Ready` condition is True.
    pub ready: bool,
}

/// How a leader loop that asks every watched Agent's pods on their admin port runs (the
/// scaling loop, the credentials check).
#[derive(Clone, Debug)]
pub struct Polling {
    /// Time between two rounds.
    pub interval: Duration,
    /// Agents handled at once.
    pub concurrency: usize,
    /// How long one sidecar may take to answer.
    pub timeout: Duration,
}

impl Default for Polling {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            concurrency: 8,
            timeout: Duration::from_secs(2),
        }
    }
}

/// An HTTP client for the sidecars' admin port.
pub struct PodAdmin {
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    port: u16,
    timeout: Duration,
}

impl PodAdmin {
    /// A client for admin port `port`; each call is bounded by `timeout`.
    pub fn new(port: u16, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            http: HttpClient::builder(TokioExecutor::new()).build(connector),
            port,
            timeout,
        }
    }

    /// The Agent's pods that have an IP and are not being deleted, ready or not.
    pub async fn pods(
        &self,
        client: &kube::Client,
        namespace: &str,
        agent: &str,
    ) -> Result<Vec<AgentPod>> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let selector = format!("app.kubernetes.io/name=soma-agent,{AGENT_LABEL}={agent}");
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| Error::Read {
                what: format!("pods of Agent {namespace}/{agent}"),
                source,
            })?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let status = p.status.as_ref()?;
                let ready = status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let ip = status.pod_ip.clone().filter(|ip| !ip.is_empty())?;
                Some(AgentPod {
                    uid: p.metadata.uid.clone().unwrap_or_else(|| p.name_any()),
                    name: p.name_any(),
                    ip,
                    ready,
                })
            })
            .collect())
    }

    /// `GET <path>` on `pod`'s admin port, its body read as `T` when `accept` takes the status
    /// (`/readyz` answers 503 with a body worth reading: [`success_or_unavailable`]).
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        pod: &AgentPod,
        path: &str,
        accept: fn(hyper::StatusCode) -> bool,
    ) -> std::result::Result<T, String> {
        let host = if pod.ip.contains(':') {
            format!("[{}]", pod.ip)
        } else {
            pod.ip.clone()
        };
        let uri: hyper::Uri = format!("http://{host}:{}{path}", self.port)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let call = async {
            let response = self.http.get(uri).await.map_err(|e| e.to_string())?;
            if !accept(response.status()) {
                return Err(format!("HTTP {}", response.status()));
            }
            let body = Limited::new(response.into_body(), BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            serde_json::from_slice::<T>(&body).map_err(|e| e.to_string())
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| "timed out".to_owned())?
    }
}

/// A 2xx status.
pub fn success(status: hyper::StatusCode) -> bool {
    status.is_success()
}

/// A 2xx status or 503 (a not-ready sidecar's `/readyz`, which says why).
pub fn success_or_unavailable(status: hyper::StatusCode) -> bool {
    status.is_success() || status == hyper::StatusCode::SERVICE_UNAVAILABLE
}
