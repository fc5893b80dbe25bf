//! Reading a delivered Capsule back from its folder (`/capsules/<name>/`, written by
//! [`crate::Contents::write_into`]) for recall, checked again at load: `manifest.json` must
//! hash to the digest the reader expects (the verified one), and `capsule.json`,
//! `chunks.jsonl` and `embeddings.jsonl` must each be the blob the manifest names (digest and
//! size). What recall serves is then exactly the signed content, whatever happened to the
//! folder between the init container's fetch and the load.
//!
//! ```text
//!  /capsules/<name>/manifest.json ──sha256 == expected digest──► OciManifest
//!                   capsule.json   ──== config descriptor──────► CapsuleManifest (version, model)
//!                   chunks.jsonl   ──== chunks layer───────────► Vec<Chunk>
//!                   embeddings.jsonl ─== embeddings layer──────► Vec<Embedding> (checked against the chunks)
//! ```
//!
//! The documents folder is not read: recall returns chunk text, which the chunks layer (signed
//! through the manifest) carries.

use std::path::Path;

use crate::bundle::{check_blob, check_embeddings, files, parse_manifest, read_config};
use crate::error::{Error, Result};
use crate::format::{
    CHUNKS_MEDIA_TYPE, CapsuleManifest, Chunk, EMBEDDINGS_MEDIA_TYPE, Embedding, from_jsonl,
};

/// A delivered Capsule's checked content.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivered {
    /// The digest its manifest hashes to.
    pub digest: String,
    /// The Capsule manifest.
    pub manifest: CapsuleManifest,
    /// The chunks, in layer order.
    pub chunks: Vec<Chunk>,
    /// One vector per chunk, in chunk order, when the bundle carries embeddings.
    pub embeddings: Option<Vec<Embedding>>,
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(Error::io(format!("reading {}", path.display())))
}

/// Reads only the Capsule manifest of the Capsule delivered into `dir` (its OCI manifest
/// must hash to `digest`, the Capsule manifest must be the blob it names): what a Capsule
/// whose vectors live elsewhere (a Qdrant collection) needs from its folder.
pub fn open_manifest(dir: &Path, digest: &str) -> Result<CapsuleManifest> {
    Ok(open_config(dir, digest)?.1)
}

fn open_config(dir: &Path, digest: &str) -> Result<(crate::format::OciManifest, CapsuleManifest)> {
    let manifest_bytes = read(dir, files::MANIFEST)?;
    let manifest = parse_manifest(&manifest_bytes, Some(digest))?;
    let config_bytes = read(dir, files::CAPSULE)?;
    check_blob(&manifest.config, &config_bytes)?;
    let config = read_config(&manifest, &config_bytes)?;
    Ok((manifest, config))
}

/// Reads the Capsule delivered into `dir`, refusing anything but the content of `digest`.
pub fn open_delivered(dir: &Path, digest: &str) -> Result<Delivered> {
    let (manifest, config) = open_config(dir, digest)?;
    let layer = |media_type: &str| manifest.layers.iter().find(|l| l.media_type == media_type);
    let chunks_layer = layer(CHUNKS_MEDIA_TYPE).ok_or_else(|| Error::MissingLayer {
        media_type: CHUNKS_MEDIA_TYPE.to_owned(),
    })?;
    let chunks_bytes = read(dir, files::CHUNKS)?;
    check_blob(chunks_layer, &chunks_bytes)?;
    let chunks: Vec<Chunk> =
        from_jsonl(&chunks_bytes).map_err(|reason| Error::malformed("chunks layer", reason))?;
    if chunks.len() != config.chunks {
        return Err(Error::malformed(
            "chunks layer",
            format!(
                "{} chunks, the Capsule manifest counts {}",
                chunks.len(),
                config.chunks
            ),
        ));
    }
    let embeddings = match (layer(EMBEDDINGS_MEDIA_TYPE), &config.embedding) {
        (None, None) => None,
        (Some(l), Some(model)) => {
            let bytes = read(dir, files::EMBEDDINGS)?;
            check_blob(l, &bytes)?;
            let records: Vec<Embedding> = from_jsonl(&bytes)
                .map_err(|reason| Error::malformed("embeddings layer", reason))?;
            check_embeddings(&chunks, &records, model.dimensions)?;
            Some(records)
        }
        (Some(_), None) => {
            return Err(Error::Embeddings {
                reason: "an embeddings layer, but the Capsule manifest names no embedding model"
                    .to_owned(),
            });
        }
        (None, Some(_)) => {
            return Err(Error::MissingLayer {
                media_type: EMBEDDINGS_MEDIA_TYPE.to_owned(),
            });
        }
    };
    Ok(Delivered {
        digest: digest.to_owned(),
        manifest: config,
        chunks,
        embeddings,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bundle(with_embeddings: bool) -> crate::Bundle {
        let docs = vec![
            ("a.md".to_owned(), "alpha one\n\nalpha two".to_owned()),
            ("b.md".to_owned(), "beta".to_owned()),
        ];
        crate::pack::test_bundle(&docs, "1.0.0", with_embeddings)
    }

    #[test]
    fn reads_back_what_was_delivered_and_only_that_digest() {
        let b = bundle(true);
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("kb");
        b.open().unwrap().write_into(&to).unwrap();
        let d = open_delivered(&to, &b.digest).unwrap();
        assert_eq!(d.chunks.len(), d.manifest.chunks);
        assert_eq!(d.embeddings.as_ref().map(Vec::len), Some(d.chunks.len()));
        let other = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            open_delivered(&to, &other).unwrap_err().reason(),
            "DigestMismatch"
        );
    }

    #[test]
    fn a_changed_file_is_refused() {
        let b = bundle(true);
        let dir = tempfile::tempdir().unwrap();
        for (file, reason) in [
            (files::CHUNKS, "BlobMismatch"),
            (files::EMBEDDINGS, "BlobMismatch"),
            (files::CAPSULE, "BlobMismatch"),
            (files::MANIFEST, "DigestMismatch"),
        ] {
            let to = dir.path().join(file);
            b.open().unwrap().write_into(&to).unwrap();
            let path = to.join(file);
            let mut perms = std::fs::metadata(&path).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&path, perms).unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.push(b' ');
            std::fs::write(&path, bytes).unwrap();
            let err = open_delivered(&to, &b.digest).unwrap_err();
            assert_eq!(err.reason(), reason, "{file}: {err}");
        }
        let to = dir.path().join("gone");
        b.open().unwrap().write_into(&to).unwrap();
        std::fs::remove_file(to.join(files::EMBEDDINGS)).unwrap();
        assert_eq!(open_delivered(&to, &b.digest).unwrap_err().reason(), "Io");
    }

    #[test]
    fn a_bundle_without_embeddings_reads_without_them() {
        let b = bundle(false);
        let dir = tempfile::tempdir().unwrap();
        b.open().unwrap().write_into(dir.path()).unwrap();
        assert!(
            open_delivered(dir.path(), &b.digest)
                .unwrap()
                .embeddings
                .is_none()
        );
    }
}
