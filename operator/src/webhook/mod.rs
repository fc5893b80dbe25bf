//! The admission webhook in the operator: every replica serves `soma-admission` over HTTPS
//! on `--webhook-port`, with a serving certificate kept in a Secret, and keeps the
//! ValidatingWebhookConfiguration pointing at its Service with that certificate's CA.
//!
//! ```text
//!  start ─▶ cert::obtain ─────────────▶ Secret <name>-cert   (generate: create if absent, read
//!            │                                                back — one CA for all replicas;
//!            │                                                cert-manager: wait for its Secret)
//!            ├▶ tls::serve(router(State)) on :port     (SwappableCert)
//!            ├▶ configuration::ensure ──▶ ValidatingWebhookConfiguration (SSA only if it differs)
//!            └▶ watch the Secret ──▶ rotated: SwappableCert::replace + ensure caBundle
//! ```
//!
//! - [`configuration`]: the ValidatingWebhookConfiguration (pure builder) and applying it;
//! - [`cert`]: the serving certificate's Secret;
//! - [`server`]: start-up and the rotation loop.

pub mod cert;
pub mod configuration;
pub mod server;

use std::time::Duration;

/// Where the webhook serves and how it is registered.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// Port of the HTTPS server on every replica (the Service's target port).
    pub port: u16,
    /// The Service in front of the replicas (the certificate's DNS names and the
    /// configuration's `clientConfig`).
    pub service: String,
    /// The Service's port (`clientConfig.service.port`).
    pub service_port: i32,
    /// The operator's namespace: the Service, the Secret, and the namespace the webhook
    /// exempts so the operator can always be repaired.
    pub namespace: String,
    /// Name of the ValidatingWebhookConfiguration.
    pub configuration_name: String,
    /// Secret holding the serving certificate (`tls.crt`, `tls.key`, `ca.crt`).
    pub cert_secret: String,
    /// The Secret is written by cert-manager: read and watch it, never generate.
    pub cert_manager: bool,
    /// Namespaces the operator watches; the webhook judges only these. Empty: every namespace
    /// but its own.
    pub watched: Vec<String>,
    /// `failurePolicy: Ignore` instead of `Fail`.
    pub fail_open: bool,
    /// Time one decision may take; `timeoutSeconds` is set above it.
    pub deadline: Duration,
}

impl WebhookOptions {
    /// The DNS names the serving certificate is for.
    pub fn dns_names(&self) -> Vec<String> {
        vec![
            format!("{}.{}.svc", self.service, self.namespace),
            format!("{}.{}.svc.cluster.local", self.service, self.namespace),
        ]
    }
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            port: 9443,
            service: "soma-operator-webhook".to_owned(),
            service_port: 443,
            namespace: "default".to_owned(),
            configuration_name: "soma-policy".to_owned(),
            cert_secret: "soma-operator-webhook-cert".to_owned(),
            cert_manager: false,
            watched: Vec::new(),
            fail_open: false,
            deadline: Duration::from_millis(1500),
        }
    }
}
