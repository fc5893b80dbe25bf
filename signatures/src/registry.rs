//! The OCI registry side: the artifact's existence, its cosign `.sig` manifest and layers, and
//! tag → digest resolution, with registry errors sorted into not-found, transient and permanent.

use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciImageManifest};
use oci_client::secrets::RegistryAuth;

use crate::simple_signing::{
    CERTIFICATE_ANNOTATION, CHAIN_ANNOTATION, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE,
    SignatureLayer,
};
use crate::{OciRef, Rejection, TrustConfig};

/// A signature payload is a few hundred bytes; refuse to download anything much larger.
const MAX_LAYER_BYTES: i64 = 256 * 1024;

/// What a registry call ended with, when it did not succeed.
pub(crate) enum Failure {
    /// The manifest or repository does not exist.
    NotFound,
    /// Anything else, already a rejection.
    Other(Rejection),
}

/// Anonymous, read-only access to OCI registries.
pub(crate) struct Registry {
    client: oci_client::Client,
}

impl Registry {
    pub(crate) fn new(config: &TrustConfig) -> Self {
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(config.insecure_registries.clone()),
            connect_timeout: Some(config.connect_timeout),
            read_timeout: Some(config.read_timeout),
            ..ClientConfig::default()
        });
        Registry { client }
    }

    /// Succeeds when the artifact's manifest exists (a HEAD request).
    pub(crate) async fn artifact_exists(&self, artifact: &OciRef) -> Result<(), Failure> {
        let reference = Reference::with_digest(
            artifact.registry.clone(),
            artifact.repository.clone(),
            artifact.digest.clone(),
        );
        self.client
            .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
            .await
            .map(|_| ())
            .map_err(|e| classify(&artifact.registry, e))
    }

    /// The simple-signing layers stored under the artifact's `sha256-<hex>.sig` tag.
    pub(crate) async fn signature_layers(
        &self,
        artifact: &OciRef,
    ) -> Result<Vec<SignatureLayer>, Failure> {
        let reference = Reference::with_tag(
            artifact.registry.clone(),
            artifact.repository.clone(),
            artifact.signature_tag(),
        );
        let (raw, _) = self
            .client
            .pull_manifest_raw(
                &reference,
                &RegistryAuth::Anonymous,
                &[OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE],
            )
            .await
            .map_err(|e| classify(&artifact.registry, e))?;
        let malformed = |reason: String| {
            Failure::Other(Rejection::MalformedSignature {
                reference: artifact.to_string(),
                reason,
            })
        };
        let manifest: OciImageManifest = serde_json::from_slice(&raw).map_err(|e| {
            malformed(format!(
                "the signature manifest is not an OCI image manifest: {e}"
            ))
        })?;
        let mut layers = Vec::new();
        for descriptor in manifest
            .layers
            .iter()
            .filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE)
        {
            if !(0..=MAX_LAYER_BYTES).contains(&descriptor.size) {
                return Err(malformed(format!(
                    "a signature layer is {} bytes (at most {MAX_LAYER_BYTES})",
                    descriptor.size
                )));
            }
            let mut payload = Vec::with_capacity(usize::try_from(descriptor.size).unwrap_or(0));
            // pull_blob checks the bytes against the descriptor's digest.
            self.client
                .pull_blob(&reference, descriptor, &mut payload)
                .await
                .map_err(|e| match e {
                    OciDistributionError::DigestError(e) => {
                        malformed(format!("a signature layer fails its digest: {e}"))
                    }
                    e => classify(&artifact.registry, e),
                })?;
            let annotation = |name: &str| {
                descriptor
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(name))
                    .cloned()
            };
            layers.push(SignatureLayer {
                payload,
                signature: annotation(SIGNATURE_ANNOTATION),
                certificate: annotation(CERTIFICATE_ANNOTATION),
                chain: annotation(CHAIN_ANNOTATION),
            });
        }
        Ok(layers)
    }

    /// Resolves `image` (`registry/repository:tag` or `...@sha256:...`) to the digest the
    /// registry serves for it now.
    pub(crate) async fn resolve(&self, image: &str) -> Result<OciRef, Rejection> {
        let invalid = |reason: String| Rejection::InvalidReference {
            reference: image.to_string(),
            reason,
        };
        let reference: Reference = image.parse().map_err(|e| invalid(format!("{e}")))?;
        let digest = self
            .client
            .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
            .await
            .map_err(|e| match classify(reference.registry(), e) {
                Failure::NotFound => Rejection::ArtifactNotFound {
                    reference: image.to_string(),
                },
                Failure::Other(rejection) => rejection,
            })?;
        if let Some(pinned) = reference.digest()
            && pinned != digest
        {
            return Err(invalid(format!(
                "the registry serves {digest}, not {pinned}"
            )));
        }
        OciRef::new(reference.registry(), reference.repository(), &digest)
    }
}

/// Sorts a registry error into not-found, transient (retry) and permanent.
fn classify(registry: &str, error: OciDistributionError) -> Failure {
    let unreachable = |transient: bool, detail: String| {
        Failure::Other(Rejection::RegistryUnreachable {
            registry: registry.to_string(),
            transient,
            detail,
        })
    };
    match error {
        OciDistributionError::ImageManifestNotFoundError(_) => Failure::NotFound,
        OciDistributionError::ServerError { code: 404, .. } => Failure::NotFound,
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) =>
        {
            Failure::NotFound
        }
        OciDistributionError::ServerError {
            code, ref message, ..
        } if code >= 500 || code == 429 => unreachable(true, format!("HTTP {code}: {message}")),
        OciDistributionError::RequestError(ref e)
            if e.is_connect() || e.is_timeout() || e.is_request() =>
        {
            unreachable(true, error_chain(e))
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => unreachable(
            false,
            "anonymous pull refused (registry credentials are not supported yet)".to_string(),
        ),
        other => unreachable(false, other.to_string()),
    }
}

/// An error and its causes on one line (reqwest's Display hides the useful part in the source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
