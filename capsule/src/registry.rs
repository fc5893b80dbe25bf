//! Bundles in an OCI registry, over the distribution API (anonymous access, as the operator
//! reads registries): [`Registry::push`] uploads the blobs and then the manifest's exact bytes;
//! [`Registry::fetch`] pulls by digest only and checks every byte against it before returning.
//!
//! ```text
//!  fetch(repo, digest) ─► GET manifest by digest ─► sha256(bytes) == digest? ─► parse, limits
//!                      ─► GET each blob (bounded by its descriptor's size) ─► sha256 == descriptor?
//!                      ─► Bundle::open: layers, Capsule manifest, chunks, embeddings
//! ```

use std::collections::BTreeMap;

use futures::StreamExt as _;
use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;

use crate::bundle::{Bundle, check_blob, is_sha256_digest, parse_manifest};
use crate::error::{Error, Result};
use crate::format::{Descriptor, OCI_MANIFEST_MEDIA_TYPE};

/// A registry client.
pub struct Registry {
    client: oci_client::Client,
}

/// `registry/repository` split in two, checked.
pub fn split_repository(repository: &str) -> Result<(String, String)> {
    let invalid = |reason: &str| Error::InvalidReference {
        reference: repository.to_owned(),
        reason: reason.to_owned(),
    };
    let (registry, repo) = repository.split_once('/').ok_or_else(|| {
        invalid("expected registry/repository, for example registry.example.com/capsules/kb")
    })?;
    let ok = !registry.is_empty()
        && !repo.is_empty()
        && repo.split('/').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        });
    if !ok {
        return Err(invalid(
            "the repository must be lowercase path components ([a-z0-9._-]) after the registry host",
        ));
    }
    Ok((registry.to_owned(), repo.to_owned()))
}

impl Registry {
    /// A client reaching `insecure_registries` (`host:port`) over plain HTTP, all others over
    /// HTTPS.
    pub fn new(insecure_registries: Vec<String>) -> Self {
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure_registries),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..ClientConfig::default()
        });
        Registry { client }
    }

    /// Pushes `bundle` to `target` (`registry/repository:tag`); returns the digest the
    /// registry now serves for the tag, which must be the bundle's.
    pub async fn push(&self, bundle: &Bundle, target: &str) -> Result<String> {
        bundle.open()?;
        let reference: Reference = target.parse().map_err(|e| Error::InvalidReference {
            reference: target.to_owned(),
            reason: format!("{e}"),
        })?;
        if reference.digest().is_some() || reference.tag().is_none() {
            return Err(Error::InvalidReference {
                reference: target.to_owned(),
                reason: "push to registry/repository:tag (the digest is the bundle's own)"
                    .to_owned(),
            });
        }
        split_repository(&format!(
            "{}/{}",
            reference.registry(),
            reference.repository()
        ))?;
        let registry = reference.registry().to_owned();
        for (digest, bytes) in &bundle.blobs {
            let exists = self
                .client
                .blob_exists(&reference, digest)
                .await
                .map_err(|e| classify(&registry, e))?;
            if !exists {
                self.client
                    .push_blob(&reference, bytes.clone(), digest)
                    .await
                    .map_err(|e| classify(&registry, e))?;
            }
        }
        let content_type = http::HeaderValue::from_static(OCI_MANIFEST_MEDIA_TYPE);
        self.client
            .push_manifest_raw(&reference, bundle.manifest.clone(), content_type)
            .await
            .map_err(|e| classify(&registry, e))?;
        let served = self
            .client
            .fetch_manifest_digest(&reference, &RegistryAuth::Anonymous)
            .await
            .map_err(|e| classify(&registry, e))?;
        if served != bundle.digest {
            return Err(Error::DigestMismatch {
                expected: bundle.digest.clone(),
                actual: served,
            });
        }
        Ok(served)
    }

    /// The manifest of `repository@digest`, its bytes checked against the digest and its
    /// shape against the bundle format (a Capsule manifest config, the required layers). What
    /// the operator reads to compare the signed `policyHash` and version with the Capsule's.
    pub async fn manifest(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<crate::format::OciManifest> {
        let (registry, repo) = split_repository(repository)?;
        let reference = Reference::with_digest(registry.clone(), repo, digest.to_owned());
        let (raw, _) = self
            .client
            .pull_manifest_raw(
                &reference,
                &RegistryAuth::Anonymous,
                &[OCI_MANIFEST_MEDIA_TYPE],
            )
            .await
            .map_err(|e| match e {
                OciDistributionError::DigestError(e) => Error::DigestMismatch {
                    expected: digest.to_owned(),
                    actual: e.to_string(),
                },
                e => classify(&registry, e),
            })?;
        parse_manifest(&raw, Some(digest))
    }

    /// Fetches the bundle `repository@digest` (`repository` is `registry/path`), checking
    /// every byte against `digest` and opening it.
    pub async fn fetch(&self, repository: &str, digest: &str) -> Result<Bundle> {
        let (registry, repo) = split_repository(repository)?;
        if !is_sha256_digest(digest) {
            return Err(Error::InvalidReference {
                reference: format!("{repository}@{digest}"),
                reason: "the digest must be sha256:<64 lowercase hex>".to_owned(),
            });
        }
        let reference = Reference::with_digest(registry.clone(), repo, digest.to_owned());
        let (raw, _) = self
            .client
            .pull_manifest_raw(
                &reference,
                &RegistryAuth::Anonymous,
                &[OCI_MANIFEST_MEDIA_TYPE],
            )
            .await
            .map_err(|e| match e {
                OciDistributionError::DigestError(e) => Error::DigestMismatch {
                    expected: digest.to_owned(),
                    actual: e.to_string(),
                },
                e => classify(&registry, e),
            })?;
        // Checked here too, whatever the client did: this is the check delivery relies on.
        let manifest = parse_manifest(&raw, Some(digest))?;
        let mut blobs = BTreeMap::new();
        for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let bytes = self.blob(&reference, &registry, d).await?;
            check_blob(d, &bytes)?;
            blobs.insert(d.digest.clone(), bytes);
        }
        let bundle = Bundle {
            manifest: raw.to_vec(),
            digest: digest.to_owned(),
            blobs,
        };
        bundle.open()?;
        Ok(bundle)
    }

    /// One blob, refused as soon as it grows past its descriptor's size.
    async fn blob(&self, reference: &Reference, registry: &str, d: &Descriptor) -> Result<Vec<u8>> {
        let descriptor = OciDescriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: i64::try_from(d.size).unwrap_or(i64::MAX),
            ..OciDescriptor::default()
        };
        let mut stream = self
            .client
            .pull_blob_stream(reference, &descriptor)
            .await
            .map_err(|e| classify(registry, e))?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                // The client's own digest check ends the stream with this error: other bytes
                // than the descriptor names, which no retry fixes.
                if e.get_ref()
                    .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
                {
                    Error::BlobMismatch {
                        digest: d.digest.clone(),
                        media_type: d.media_type.clone(),
                        problem: format!("was served with other bytes: {e}"),
                    }
                } else {
                    Error::Registry {
                        registry: registry.to_owned(),
                        detail: format!("reading blob {}: {e}", d.digest),
                        transient: true,
                    }
                }
            })?;
            out.extend_from_slice(&chunk);
            if out.len() as u64 > d.size {
                return Err(Error::BlobMismatch {
                    digest: d.digest.clone(),
                    media_type: d.media_type.clone(),
                    problem: format!("is longer than the {} bytes the manifest says", d.size),
                });
            }
        }
        Ok(out)
    }
}

/// Sorts a registry error into not found (permanent), transient and permanent.
fn classify(registry: &str, error: OciDistributionError) -> Error {
    let err = |transient: bool, detail: String| Error::Registry {
        registry: registry.to_owned(),
        detail,
        transient,
    };
    match error {
        OciDistributionError::ImageManifestNotFoundError(m) => {
            err(false, format!("not found: {m}"))
        }
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) =>
        {
            err(false, format!("not found: {error}"))
        }
        OciDistributionError::ServerError {
            code, ref message, ..
        } => err(
            code >= 500 || code == 429,
            format!("HTTP {code}: {message}"),
        ),
        OciDistributionError::RequestError(ref e) => err(
            e.is_connect() || e.is_timeout() || e.is_request(),
            error_chain(e),
        ),
        other => err(false, other.to_string()),
    }
}

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
