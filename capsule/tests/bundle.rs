//! Packing is reproducible and every way a bundle can be wrong is refused with a clear error,
//! before anything is written.

use std::path::Path;

use anyhow::Result;
use soma_capsule::format::{
    CHUNKS_MEDIA_TYPE, Chunk, Embedding, OciManifest, from_jsonl, to_jsonl,
};
use soma_capsule::layout::{read_layout, write_layout};
use soma_capsule::pack::{Embeddings, PackOptions, chunks, read_documents};
use soma_capsule::{Bundle, pack, sha256_digest};

const POLICY: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn options() -> PackOptions {
    PackOptions {
        version: "1.0.0".into(),
        policy_hash: POLICY.into(),
        max_bytes: 200,
        embeddings: None,
    }
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

fn corpus(dir: &Path, order: &[usize]) {
    let us = "US orders ship from Newark. ".repeat(20);
    let files = [
        (
            "refunds.md",
            "# Refunds\n\nRefunds are paid within 30 days.\n\nKeep the receipt.\n",
        ),
        (
            "shipping/eu.md",
            "Shipping inside the EU is free above 50 euros.\n",
        ),
        ("shipping/us.txt", us.as_str()),
    ];
    for &i in order {
        write(dir, files[i].0, files[i].1);
    }
    // Skipped: hidden files and folders.
    write(dir, ".git/HEAD", "ref: refs/heads/main\n");
}

#[test]
fn the_same_folder_packs_to_the_same_digest_whatever_the_file_order_and_times() -> Result<()> {
    let a = tempfile::tempdir()?;
    let b = tempfile::tempdir()?;
    corpus(a.path(), &[0, 1, 2]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    corpus(b.path(), &[2, 0, 1]);
    let first = pack(a.path(), &options())?;
    let second = pack(b.path(), &options())?;
    assert_eq!(first, second, "same documents, same bytes");
    assert_eq!(first.digest, sha256_digest(&first.manifest));

    // One byte more is another digest; so is another policyHash or version.
    write(
        b.path(),
        "refunds.md",
        "# Refunds\n\nRefunds are paid within 31 days.\n\nKeep the receipt.\n",
    );
    assert_ne!(pack(b.path(), &options())?.digest, first.digest);
    let other_policy = PackOptions {
        policy_hash: POLICY.replace('1', "2"),
        ..options()
    };
    assert_ne!(pack(a.path(), &other_policy)?.digest, first.digest);

    // The layout round-trips to the same bundle.
    let out = tempfile::tempdir()?;
    let layout = out.path().join("kb");
    write_layout(&first, &layout)?;
    assert_eq!(read_layout(&layout)?, first);
    let again = out.path().join("kb2");
    write_layout(&pack(a.path(), &options())?, &again)?;
    for f in ["index.json", "oci-layout"] {
        assert_eq!(
            std::fs::read(layout.join(f))?,
            std::fs::read(again.join(f))?
        );
    }
    Ok(())
}

#[test]
fn a_bundle_opens_into_its_documents_chunks_and_signed_policy_hash() -> Result<()> {
    let src = tempfile::tempdir()?;
    corpus(src.path(), &[0, 1, 2]);
    let bundle = pack(src.path(), &options())?;
    let manifest: OciManifest = serde_json::from_slice(&bundle.manifest)?;
    assert_eq!(manifest.annotations["dev.soma.capsule.policy-hash"], POLICY);
    assert_eq!(manifest.annotations["dev.soma.capsule.version"], "1.0.0");
    let contents = bundle.open()?;
    assert_eq!(contents.manifest.policy_hash, POLICY);
    assert_eq!(contents.documents.len(), 3);
    assert!(contents.chunks.len() > 3, "the long document is cut");
    assert!(contents.chunks.iter().all(|c| c.text.len() <= 200));
    assert_eq!(contents.chunks[0].id, "refunds.md#0");

    let out = tempfile::tempdir()?;
    let into = out.path().join("support-kb");
    contents.write_into(&into)?;
    let manifest_file = std::fs::read(into.join("manifest.json"))?;
    assert_eq!(
        sha256_digest(&manifest_file),
        bundle.digest,
        "the folder names its own digest"
    );
    assert_eq!(
        std::fs::read_to_string(into.join("documents/shipping/eu.md"))?,
        "Shipping inside the EU is free above 50 euros.\n"
    );
    let chunks: Vec<Chunk> =
        from_jsonl(&std::fs::read(into.join("chunks.jsonl"))?).map_err(anyhow::Error::msg)?;
    assert_eq!(chunks, contents.chunks);
    assert!(
        std::fs::metadata(into.join("capsule.json"))?
            .permissions()
            .readonly()
    );
    let mut names: Vec<String> = std::fs::read_dir(&into)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(
        names,
        ["capsule.json", "chunks.jsonl", "documents", "manifest.json"]
    );
    // A folder that is not empty is refused, and left as it was.
    let err = contents.write_into(&into).expect_err("not empty");
    assert_eq!(err.reason(), "NotEmpty", "{err}");
    Ok(())
}

fn embeddings_for(dir: &Path, dims: usize) -> Result<Vec<Embedding>> {
    let docs = read_documents(dir)?;
    Ok(chunks(&docs, 200)
        .iter()
        .enumerate()
        .map(|(i, c)| Embedding {
            id: c.id.clone(),
            vector: (0..dims).map(|d| (i * dims + d) as f32 / 10.0).collect(),
        })
        .collect())
}

#[test]
fn embeddings_are_packed_with_their_model_and_must_fit_the_chunks() -> Result<()> {
    let src = tempfile::tempdir()?;
    corpus(src.path(), &[0, 1, 2]);
    let records = embeddings_for(src.path(), 4)?;
    let with = |records: Vec<Embedding>| PackOptions {
        embeddings: Some(Embeddings {
            model: "all-MiniLM-L6-v2".into(),
            records,
        }),
        ..options()
    };
    let bundle = pack(src.path(), &with(records.clone()))?;
    let contents = bundle.open()?;
    let model = contents.manifest.embedding.clone().expect("model recorded");
    assert_eq!(
        (model.model.as_str(), model.dimensions),
        ("all-MiniLM-L6-v2", 4)
    );
    assert_eq!(
        contents.embeddings.as_ref().map(|e| e.1.len()),
        Some(contents.chunks.len())
    );

    let mut wrong_dim = records.clone();
    wrong_dim[1].vector.push(0.5);
    let err = pack(src.path(), &with(wrong_dim)).expect_err("dimension");
    assert_eq!(err.reason(), "EmbeddingsMismatch");
    assert!(
        err.to_string()
            .contains("has 5 dimensions, the model makes 4"),
        "{err}"
    );

    let err = pack(src.path(), &with(records[1..].to_vec())).expect_err("count");
    assert!(err.to_string().contains("vectors for"), "{err}");

    let mut nan = records;
    nan[0].vector[0] = f32::NAN;
    assert_eq!(
        pack(src.path(), &with(nan)).expect_err("nan").reason(),
        "EmbeddingsMismatch"
    );
    Ok(())
}

#[test]
fn bad_input_folders_and_options_are_refused() -> Result<()> {
    let empty = tempfile::tempdir()?;
    let err = pack(empty.path(), &options()).expect_err("empty");
    assert!(err.to_string().contains("no documents"), "{err}");

    let binary = tempfile::tempdir()?;
    std::fs::write(
        binary.path().join("logo.png"),
        [0x89, b'P', b'N', b'G', 0xff, 0xfe],
    )?;
    let err = pack(binary.path(), &options()).expect_err("binary");
    assert!(
        err.to_string().contains("logo.png") && err.to_string().contains("UTF-8"),
        "{err}"
    );

    let linked = tempfile::tempdir()?;
    write(linked.path(), "a.md", "a");
    std::os::unix::fs::symlink("/etc/passwd", linked.path().join("passwd"))?;
    let err = pack(linked.path(), &options()).expect_err("symlink");
    assert!(err.to_string().contains("symbolic links"), "{err}");

    let ok = tempfile::tempdir()?;
    write(ok.path(), "a.md", "a");
    for bad in [
        PackOptions {
            policy_hash: "sha256:abc".into(),
            ..options()
        },
        PackOptions {
            version: " ".into(),
            ..options()
        },
        PackOptions {
            max_bytes: 3,
            ..options()
        },
    ] {
        assert_eq!(
            pack(ok.path(), &bad).expect_err("option").reason(),
            "InvalidInput"
        );
    }
    Ok(())
}

fn repack(bundle: &Bundle, edit: impl FnOnce(&mut OciManifest)) -> Bundle {
    let mut manifest: OciManifest = serde_json::from_slice(&bundle.manifest).expect("manifest");
    edit(&mut manifest);
    let bytes = serde_json::to_vec(&manifest).expect("json");
    Bundle {
        digest: sha256_digest(&bytes),
        manifest: bytes,
        blobs: bundle.blobs.clone(),
    }
}

#[test]
fn wrong_digest_swapped_layer_missing_layer_and_malformed_manifest_are_refused() -> Result<()> {
    let src = tempfile::tempdir()?;
    corpus(src.path(), &[0, 1, 2]);
    let good = pack(src.path(), &options())?;
    let out = tempfile::tempdir()?;
    let check = |bundle: &Bundle, reason: &str, needle: &str| {
        let err = bundle.open().expect_err(reason);
        assert_eq!(err.reason(), reason, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        let into = out.path().join(reason);
        assert!(
            !into.exists(),
            "nothing is written for a bundle that does not open"
        );
    };

    // Asked for another digest than the bytes have.
    let mut wrong = good.clone();
    wrong.digest = POLICY.into();
    check(
        &wrong,
        "DigestMismatch",
        "refusing content other than the verified digest",
    );

    // A layer's bytes swapped for others (same descriptor).
    let mut swapped = good.clone();
    let manifest: OciManifest = serde_json::from_slice(&good.manifest)?;
    let chunks_digest = manifest.layers[1].digest.clone();
    let tampered: Vec<Chunk> = vec![Chunk {
        id: "refunds.md#0".into(),
        document: "refunds.md".into(),
        start: 0,
        end: 9,
        text: "# Refunds".into(),
    }];
    swapped
        .blobs
        .insert(chunks_digest.clone(), to_jsonl(&tampered)?);
    check(&swapped, "BlobMismatch", &chunks_digest);

    // A manifest whose chunks layer was dropped (a new digest, which nobody would have signed).
    let missing = repack(&good, |m| {
        m.layers.retain(|l| l.media_type != CHUNKS_MEDIA_TYPE)
    });
    check(&missing, "MissingLayer", CHUNKS_MEDIA_TYPE);

    // The annotation no longer matches the Capsule manifest.
    let relabelled = repack(&good, |m| {
        m.annotations.insert(
            "dev.soma.capsule.policy-hash".into(),
            POLICY.replace('1', "9"),
        );
    });
    check(&relabelled, "MalformedBundle", "policy-hash");

    // Not a manifest at all; another artifact's config.
    let garbage = Bundle {
        digest: sha256_digest(b"{\"schemaVersion\":"),
        manifest: b"{\"schemaVersion\":".to_vec(),
        blobs: Default::default(),
    };
    check(&garbage, "MalformedBundle", "not an OCI image manifest");
    let other = repack(&good, |m| {
        m.config.media_type = "application/vnd.oci.empty.v1+json".into()
    });
    check(&other, "MalformedBundle", "not a Capsule bundle");
    Ok(())
}
