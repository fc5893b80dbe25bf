//! The serving certificate's Secret (`kubernetes.io/tls` with `ca.crt`). Generated mode:
//! the first replica to start generates a CA and certificate and creates the Secret; a
//! replica that loses the race (409 AlreadyExists) reads the winner's back, so every replica
//! serves the same certificate under the one `caBundle`. cert-manager mode: the Secret is
//! cert-manager's; the operator only reads it (waiting until it exists).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use soma_admission::tls::CertBundle;
use tracing::info;

use super::WebhookOptions;

/// Keys of the Secret (cert-manager's layout).
pub const CA_KEY: &str = "ca.crt";
/// The serving certificate.
pub const CERT_KEY: &str = "tls.crt";
/// Its private key.
pub const KEY_KEY: &str = "tls.key";

/// Errors obtaining the certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The API refused a read or a create.
    #[error("{what} Secret {namespace}/{name} failed: {source}")]
    Api {
        /// `reading` or `creating`.
        what: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The Secret exists but lacks a key or holds something that is not a certificate.
    #[error("Secret {namespace}/{name} is not a usable serving certificate: {message}")]
    Unusable {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What is wrong, and what to do.
        message: String,
    },
    /// Generating the certificate failed.
    #[error("generating the serving certificate failed: {0}")]
    Generate(#[from] soma_admission::tls::TlsError),
    /// cert-manager's Secret did not appear in time.
    #[error(
        "Secret {namespace}/{name} (from cert-manager) did not appear within {waited:?}; check the Certificate resource"
    )]
    NotIssued {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// How long the operator waited.
        waited: Duration,
    },
}

/// The bundle a Secret holds, or what is missing. The certificate and key are checked by
/// building the rustls key, so a Secret that would not serve is refused here.
pub fn bundle_of(secret: &Secret) -> Result<CertBundle, String> {
    let data = secret.data.as_ref();
    let get = |key: &str| -> Result<String, String> {
        let bytes = data
            .and_then(|d| d.get(key))
            .ok_or_else(|| format!("key {key} is missing"))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| format!("key {key} is not PEM text"))
    };
    let bundle = CertBundle {
        ca_pem: get(CA_KEY)?,
        cert_pem: get(CERT_KEY)?,
        key_pem: get(KEY_KEY)?,
    };
    if !bundle.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("key {CA_KEY} holds no PEM certificate"));
    }
    bundle.certified_key().map_err(|e| e.to_string())?;
    Ok(bundle)
}

/// The Secret the operator creates for a generated bundle.
pub fn secret_for(options: &WebhookOptions, bundle: &CertBundle) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(options.cert_secret.clone()),
            namespace: Some(options.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "soma-operator".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (CA_KEY.to_owned(), bytes(&bundle.ca_pem)),
            (CERT_KEY.to_owned(), bytes(&bundle.cert_pem)),
            (KEY_KEY.to_owned(), bytes(&bundle.key_pem)),
        ])),
        ..Secret::default()
    }
}

/// Reads the Secret, or (generated mode) creates it if absent; waits up to `wait` for
/// cert-manager's.
pub async fn obtain(
    client: &Client,
    options: &WebhookOptions,
    wait: Duration,
) -> Result<CertBundle, CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let api_error = |what, source| CertError::Api {
        what,
        namespace: options.namespace.clone(),
        name: options.cert_secret.clone(),
        source,
    };
    let unusable = |message: String| CertError::Unusable {
        namespace: options.namespace.clone(),
        name: options.cert_secret.clone(),
        message,
    };
    let started = tokio::time::Instant::now();
    loop {
        let live = api
            .get_opt(&options.cert_secret)
            .await
            .map_err(|e| api_error("reading", e))?;
        match live {
            Some(secret) => {
                return bundle_of(&secret).map_err(|m| {
                    unusable(if options.cert_manager {
                        m
                    } else {
                        format!("{m}; delete the Secret and the operator generates a new one")
                    })
                });
            }
            None if options.cert_manager => {
                if started.elapsed() >= wait {
                    return Err(CertError::NotIssued {
                        namespace: options.namespace.clone(),
                        name: options.cert_secret.clone(),
                        waited: wait,
                    });
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            None => {
                let bundle = CertBundle::generate(&options.dns_names())?;
                match api
                    .create(&PostParams::default(), &secret_for(options, &bundle))
                    .await
                {
                    Ok(_) => {
                        info!(secret = %options.cert_secret, "generated the webhook serving certificate");
                        return Ok(bundle);
                    }
                    // Another replica created it first: use theirs (read it on the next pass).
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(api_error("creating", e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_reads_back_and_a_broken_one_is_refused() {
        let options = WebhookOptions::default();
        let bundle = CertBundle::generate(&options.dns_names()).expect("generate");
        let secret = secret_for(&options, &bundle);
        let back = bundle_of(&secret).expect("usable");
        assert_eq!(back.ca_pem, bundle.ca_pem);

        let mut missing = secret.clone();
        if let Some(d) = missing.data.as_mut() {
            d.remove(KEY_KEY);
        }
        assert_eq!(
            bundle_of(&missing).expect_err("no key"),
            "key tls.key is missing"
        );
        let mut garbage = secret;
        if let Some(d) = garbage.data.as_mut() {
            d.insert(CERT_KEY.into(), ByteString(b"not a cert".to_vec()));
        }
        assert!(bundle_of(&garbage).is_err());
    }
}
