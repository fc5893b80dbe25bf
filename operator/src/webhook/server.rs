//! Starting the webhook on a replica, and following certificate rotation.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use soma_admission::tls::{self, CertBundle, SwappableCert};
use tracing::{info, warn};

use super::WebhookOptions;
use super::cert::{CertError, bundle_of, obtain};
use super::configuration::{desired, ensure};

/// How long a replica waits for cert-manager's Secret before giving up (and restarting).
const CERT_MANAGER_WAIT: Duration = Duration::from_secs(120);

/// Errors starting the webhook.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The serving certificate.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The certificate could not be loaded into rustls.
    #[error("loading the serving certificate: {0}")]
    Tls(#[from] tls::TlsError),
    /// The port could not be bound.
    #[error("binding the webhook port {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Applying the ValidatingWebhookConfiguration failed.
    #[error(transparent)]
    Configuration(#[from] crate::error::Error),
}

/// Obtains the certificate, starts serving `state` over HTTPS on `bind:port`, applies the
/// ValidatingWebhookConfiguration, and follows rotation of the Secret until `shutdown`.
/// Returns once serving; the returned task ends after `shutdown`.
pub async fn start(
    client: Client,
    options: WebhookOptions,
    bind: IpAddr,
    state: Arc<soma_admission::State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    let bundle = obtain(&client, &options, CERT_MANAGER_WAIT).await?;
    let cert = SwappableCert::new(&bundle)?;
    let addr = SocketAddr::new(bind, options.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    info!(%addr, "serving the admission webhook");
    if ensure(&client, &desired(&options, &bundle.ca_pem)).await? {
        info!(name = %options.configuration_name, "applied the ValidatingWebhookConfiguration");
    }
    let app = soma_admission::router(state);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(tls::serve(
        listener,
        app,
        tls::server_config(cert.clone()),
        async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|v| *v).await;
        },
    ));
    Ok(tokio::spawn(async move {
        tokio::select! {
            () = shutdown => {}
            () = follow_rotation(client, options, cert, bundle) => {}
        }
        let _ = stop.send(true);
        let _ = server.await;
    }))
}

/// Watches the Secret; a new certificate is served from the next handshake and its CA
/// patched into the configuration.
async fn follow_rotation(
    client: Client,
    options: WebhookOptions,
    cert: Arc<SwappableCert>,
    mut current: CertBundle,
) {
    let api: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", options.cert_secret));
    let secrets = watcher(api, config).default_backoff().applied_objects();
    tokio::pin!(secrets);
    while let Some(next) = secrets.next().await {
        let secret = match next {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "watching the webhook certificate Secret failed; retrying");
                continue;
            }
        };
        let bundle = match bundle_of(&secret) {
            Ok(b) => b,
            Err(message) => {
                warn!(%message, "the webhook certificate Secret is not usable; still serving the previous certificate");
                continue;
            }
        };
        if bundle.cert_pem == current.cert_pem && bundle.ca_pem == current.ca_pem {
            continue;
        }
        if let Err(e) = cert.replace(&bundle) {
            warn!(error = %e, "the rotated certificate does not load; still serving the previous one");
            continue;
        }
        info!("serving the rotated webhook certificate");
        if let Err(e) = ensure(&client, &desired(&options, &bundle.ca_pem)).await {
            warn!(error = %e, "patching the new CA into the ValidatingWebhookConfiguration failed");
        }
        current = bundle;
    }
}
