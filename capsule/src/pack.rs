//! Packing a folder of UTF-8 text documents into a bundle, reproducibly: files are read in
//! sorted path order, the documents tar has fixed metadata (mtime 0, uid/gid 0, mode 0644, no
//! user names), JSON is written with fixed field order, and no timestamp is recorded anywhere;
//! the same folder and options always give the same bytes and the same digest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::bundle::{Bundle, check_embeddings, sha256_digest};
use crate::chunk::{MIN_MAX_BYTES, chunk_document};
use crate::error::{Error, Result};
use crate::format::{
    ARTIFACT_TYPE, CHUNKS_MEDIA_TYPE, CONFIG_MEDIA_TYPE, CapsuleManifest, Chunk, Chunking,
    DOCUMENTS_MEDIA_TYPE, Descriptor, EMBEDDINGS_MEDIA_TYPE, Embedding, EmbeddingModel,
    OCI_MANIFEST_MEDIA_TYPE, OciManifest, POLICY_HASH_ANNOTATION, SCHEMA_VERSION,
    VERSION_ANNOTATION, from_jsonl, to_jsonl,
};

/// Precomputed embeddings to pack with the chunks.
#[derive(Clone, Debug)]
pub struct Embeddings {
    /// The model that made them.
    pub model: String,
    /// One per chunk, in chunk order (JSON Lines `{"id": …, "vector": […]}` as read by
    /// [`read_embeddings`]).
    pub records: Vec<Embedding>,
}

/// What to pack.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// The Capsule's version.
    pub version: String,
    /// The `policyHash` the content was reviewed against (`sha256:<hex>`).
    pub policy_hash: String,
    /// Upper bound of a chunk in bytes.
    pub max_bytes: usize,
    /// Precomputed embeddings, if any.
    pub embeddings: Option<Embeddings>,
}

/// Reads an embeddings file (JSON Lines of `{"id": …, "vector": […]}`).
pub fn read_embeddings(path: &Path, model: &str) -> Result<Embeddings> {
    let bytes = std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let records = from_jsonl(&bytes).map_err(|reason| Error::Input {
        path: path.display().to_string(),
        reason: format!("expected JSON Lines of {{\"id\": …, \"vector\": […]}}: {reason}"),
    })?;
    Ok(Embeddings {
        model: model.to_owned(),
        records,
    })
}

/// The documents under `root`: regular files, sorted by their `/`-separated relative path.
/// Names starting with `.` are skipped (version-control folders, editor files); a symbolic
/// link, a name that is not UTF-8 or a file that is not UTF-8 text is refused.
pub fn read_documents(root: &Path) -> Result<Vec<(String, String)>> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(Error::io(format!("reading {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("reading {}", dir.display())))?;
            let path = entry.path();
            let input = |reason: &str| Error::Input {
                path: path.display().to_string(),
                reason: reason.to_owned(),
            };
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| input("the name is not UTF-8"))?;
            if name.starts_with('.') {
                continue;
            }
            if name.contains('\\') {
                return Err(input("a name may not contain a backslash"));
            }
            let rel = format!("{prefix}{name}");
            let kind = entry
                .file_type()
                .map_err(Error::io(format!("reading {}", path.display())))?;
            if kind.is_symlink() {
                return Err(input("symbolic links are not packed; copy the file in"));
            } else if kind.is_dir() {
                stack.push((path, format!("{rel}/")));
            } else if kind.is_file() {
                let bytes = std::fs::read(&path)
                    .map_err(Error::io(format!("reading {}", path.display())))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| input("not UTF-8 text; only text documents are packed"))?;
                out.insert(rel, text);
            } else {
                return Err(input("not a regular file"));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Input {
            path: root.display().to_string(),
            reason: "no documents to pack".to_owned(),
        });
    }
    Ok(out.into_iter().collect())
}

/// The chunks of `documents`, in document order.
pub fn chunks(documents: &[(String, String)], max_bytes: usize) -> Vec<Chunk> {
    documents
        .iter()
        .flat_map(|(path, text)| chunk_document(path, text, max_bytes))
        .collect()
}

/// A tar of `documents` with fixed metadata.
fn documents_tar(documents: &[(String, String)]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, text) in documents {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        builder
            .append_data(&mut header, path, text.as_bytes())
            .map_err(|e| Error::Input {
                path: path.clone(),
                reason: format!("cannot be stored in the documents tar: {e}"),
            })?;
    }
    builder
        .into_inner()
        .map_err(Error::io("finishing the documents tar"))
}

fn check_options(options: &PackOptions) -> Result<()> {
    let input = |path: &str, reason: String| {
        Err(Error::Input {
            path: path.to_owned(),
            reason,
        })
    };
    if options.version.trim().is_empty() {
        return input("--version", "must not be empty".to_owned());
    }
    if !crate::bundle::is_sha256_digest(&options.policy_hash) {
        return input(
            "--policy-hash",
            format!("{:?} is not sha256:<64 lowercase hex>", options.policy_hash),
        );
    }
    if options.max_bytes < MIN_MAX_BYTES {
        return input(
            "--max-chunk-bytes",
            format!("{} is below the minimum {MIN_MAX_BYTES}", options.max_bytes),
        );
    }
    if let Some(e) = &options.embeddings
        && e.model.trim().is_empty()
    {
        return input(
            "--embedding-model",
            "must name the model that made the embeddings".to_owned(),
        );
    }
    Ok(())
}

/// Packs the documents under `root`.
pub fn pack(root: &Path, options: &PackOptions) -> Result<Bundle> {
    check_options(options)?;
    let documents = read_documents(root)?;
    pack_documents(&documents, options)
}

/// Packs `documents` (path, text), sorted by path.
pub fn pack_documents(documents: &[(String, String)], options: &PackOptions) -> Result<Bundle> {
    check_options(options)?;
    let chunks = chunks(documents, options.max_bytes);
    let embedding = match &options.embeddings {
        None => None,
        Some(e) => {
            let dimensions = e.records.first().map_or(0, |r| r.vector.len());
            check_embeddings(&chunks, &e.records, dimensions)?;
            Some(EmbeddingModel {
                model: e.model.clone(),
                dimensions,
            })
        }
    };
    let config = CapsuleManifest {
        schema_version: SCHEMA_VERSION,
        version: options.version.clone(),
        policy_hash: options.policy_hash.clone(),
        chunking: Chunking {
            max_bytes: options.max_bytes,
        },
        documents: documents.len(),
        chunks: chunks.len(),
        embedding,
    };
    let json = |what: &str, e: serde_json::Error| Error::malformed(what, e.to_string());
    let config_bytes = serde_json::to_vec(&config).map_err(|e| json("Capsule manifest", e))?;
    let mut blobs = BTreeMap::new();
    let mut describe = |media_type: &str, bytes: Vec<u8>| {
        let d = Descriptor {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&bytes),
            size: bytes.len() as u64,
        };
        blobs.insert(d.digest.clone(), bytes);
        d
    };
    let config_descriptor = describe(CONFIG_MEDIA_TYPE, config_bytes);
    let mut layers = vec![
        describe(DOCUMENTS_MEDIA_TYPE, documents_tar(documents)?),
        describe(
            CHUNKS_MEDIA_TYPE,
            to_jsonl(&chunks).map_err(|e| json("chunks", e))?,
        ),
    ];
    if let Some(e) = &options.embeddings {
        layers.push(describe(
            EMBEDDINGS_MEDIA_TYPE,
            to_jsonl(&e.records).map_err(|e| json("embeddings", e))?,
        ));
    }
    let manifest = OciManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST_MEDIA_TYPE.to_owned(),
        artifact_type: ARTIFACT_TYPE.to_owned(),
        config: config_descriptor,
        layers,
        annotations: BTreeMap::from([
            (
                POLICY_HASH_ANNOTATION.to_owned(),
                options.policy_hash.clone(),
            ),
            (VERSION_ANNOTATION.to_owned(), options.version.clone()),
        ]),
    };
    let manifest = serde_json::to_vec(&manifest).map_err(|e| json("manifest", e))?;
    let bundle = Bundle {
        digest: sha256_digest(&manifest),
        manifest,
        blobs,
    };
    // What is packed is what a consumer will check: fail here, not at fetch time.
    bundle.open()?;
    Ok(bundle)
}

/// A test bundle of `documents` at `version` (chunks of at most 64 bytes), with the 8-dimension
/// hashed embeddings of its chunks when `with_embeddings`.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn test_bundle(
    documents: &[(String, String)],
    version: &str,
    with_embeddings: bool,
) -> Bundle {
    let embeddings = with_embeddings.then(|| Embeddings {
        model: "soma-hash-8".into(),
        records: chunks(documents, 64)
            .iter()
            .map(|c| Embedding {
                id: c.id.clone(),
                vector: crate::hashed::embed(&c.text, 8),
            })
            .collect(),
    });
    let options = PackOptions {
        version: version.into(),
        policy_hash: format!("sha256:{}", "9".repeat(64)),
        max_bytes: 64,
        embeddings,
    };
    pack_documents(documents, &options).unwrap()
}
