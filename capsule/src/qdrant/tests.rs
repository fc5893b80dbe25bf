#![allow(clippy::unwrap_used)]
use super::*;
use qdrant_client::qdrant::{PointId, Vector, point_id::PointIdOptions, vector, vectors};

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn contents(with_embeddings: bool) -> Contents {
    let para = |w: &str| format!("{w} ").repeat(12).trim_end().to_owned();
    let docs = vec![
        (
            "a.md".to_owned(),
            format!(
                "{}\n\n{}\n\n{}",
                para("alpha"),
                para("gamma"),
                para("delta")
            ),
        ),
        ("b.md".to_owned(), "beta".to_owned()),
    ];
    crate::pack::test_bundle(&docs, "2.1.0", with_embeddings)
        .open()
        .unwrap()
}

#[test]
fn a_collection_is_named_by_namespace_and_digest() {
    let name = collection_name("team-a", DIGEST).unwrap();
    assert_eq!(
        name,
        "soma_team-a_sha256_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    // The same content in another namespace is another collection.
    assert_ne!(name, collection_name("team-b", DIGEST).unwrap());
    // The longest namespace still fits Qdrant's limit (255).
    let long = "a".repeat(63);
    assert!(collection_name(&long, DIGEST).unwrap().len() <= 140);
    for (ns, digest) in [
        ("", DIGEST),
        ("Team", DIGEST),
        ("team_a", DIGEST),
        ("-team", DIGEST),
        ("team-", DIGEST),
        ("a/b", DIGEST),
        (&"a".repeat(64), DIGEST),
        ("team", "sha256:abc"),
        (
            "team",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
        ("team", &DIGEST.to_uppercase()),
        (
            "team",
            "sha512:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
    ] {
        let e = collection_name(ns, digest).unwrap_err();
        assert_eq!(e.reason(), "QdrantName", "{ns:?} {digest:?}");
        assert!(!e.transient());
    }
}

#[test]
fn point_ids_are_stable_uuids_from_digest_and_chunk() {
    let a = point_id(DIGEST, "a.md#0");
    assert_eq!(a, point_id(DIGEST, "a.md#0"));
    assert_ne!(a, point_id(DIGEST, "a.md#1"));
    let other = DIGEST.replace("sha256:0", "sha256:1");
    assert_ne!(a, point_id(&other, "a.md#0"));
    // RFC 9562 shape: 8-4-4-4-12 lowercase hex, version 8, variant 10xx.
    let parts: Vec<&str> = a.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12]
    );
    assert!(
        a.bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert!(parts[2].starts_with('8'));
    assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
    // Where the digest ends is part of the hash: ("d", "ab") and ("da", "b") do not meet.
    assert_ne!(point_id("d", "ab"), point_id("da", "b"));
}

#[test]
fn every_chunk_becomes_a_point_with_its_vector_and_provenance() {
    let c = contents(true);
    let (model, points) = points(&c).unwrap();
    assert_eq!((model.model.as_str(), model.dimensions), ("soma-hash-8", 8));
    assert_eq!(points.len(), c.chunks.len());
    assert!(
        points.len() >= 4,
        "the corpus should chunk into several pieces"
    );
    let (_, records) = c.embeddings.as_ref().unwrap();
    for (row, (p, chunk)) in points.iter().zip(&c.chunks).enumerate() {
        assert_eq!(
            p.id,
            Some(PointId {
                point_id_options: Some(PointIdOptions::Uuid(point_id(&c.digest, &chunk.id)))
            })
        );
        let payload: ChunkPayload = serde_json::from_value(serde_json::Value::from(
            qdrant_client::Payload::from(p.payload.clone()),
        ))
        .unwrap();
        assert_eq!(payload, ChunkPayload::of(&c.digest, "2.1.0", row, chunk));
        assert_eq!(payload.clone().into_chunk(), *chunk);
        let data = match p.vectors.as_ref().and_then(|v| v.vectors_options.as_ref()) {
            Some(vectors::VectorsOptions::Vector(Vector {
                vector: Some(vector::Vector::Dense(d)),
                ..
            })) => d.data.clone(),
            other => panic!("not a single dense vector: {other:?}"),
        };
        assert_eq!(data, records[row].vector);
    }
    // The same bundle gives the same points: a second load writes nothing new.
    assert_eq!(points, self::points(&c).unwrap().1);
}

#[test]
fn a_bundle_that_cannot_be_loaded_is_refused() {
    let e = points(&contents(false)).unwrap_err();
    assert_eq!(e.reason(), "QdrantBundle");
    assert!(e.to_string().contains("no embeddings"), "{e}");

    let mut c = contents(true);
    c.embeddings.as_mut().unwrap().1[1].vector.pop();
    assert!(
        points(&c)
            .unwrap_err()
            .to_string()
            .contains("not 8 finite numbers")
    );

    let mut c = contents(true);
    c.embeddings.as_mut().unwrap().1[2].vector[0] = f32::NAN;
    assert_eq!(points(&c).unwrap_err().reason(), "QdrantBundle");

    let mut c = contents(true);
    c.embeddings.as_mut().unwrap().1.swap(0, 1);
    assert!(
        points(&c)
            .unwrap_err()
            .to_string()
            .contains("embedding 0 is of chunk")
    );

    let mut c = contents(true);
    c.embeddings.as_mut().unwrap().1.pop();
    assert!(
        points(&c)
            .unwrap_err()
            .to_string()
            .contains("embeddings for")
    );
}

#[test]
fn upserts_are_batched_and_wait() {
    let c = contents(true);
    let (_, points) = points(&c).unwrap();
    let n = points.len();
    let batches = upserts("coll", points.clone(), 3);
    assert_eq!(batches.len(), n.div_ceil(3));
    assert!(
        batches
            .iter()
            .all(|b| b.collection_name == "coll" && b.wait == Some(true))
    );
    assert_eq!(
        batches
            .iter()
            .flat_map(|b| b.points.clone())
            .collect::<Vec<_>>(),
        points
    );
    // A zero batch is one point a request, not a loop that never ends.
    assert_eq!(upserts("coll", points, 0).len(), n);
    assert!(upserts("coll", Vec::new(), 3).is_empty());
}

#[test]
fn the_query_asks_for_k_payloads_without_vectors() {
    let q = query("coll", &[0.5, 0.25], 7);
    assert_eq!(q.collection_name, "coll");
    assert_eq!(q.limit, Some(7));
    let with_payload = q.with_payload.unwrap().selector_options.unwrap();
    assert_eq!(
        with_payload,
        qdrant_client::qdrant::with_payload_selector::SelectorOptions::Enable(true)
    );
    let with_vectors = q.with_vectors.unwrap().selector_options.unwrap();
    assert_eq!(
        with_vectors,
        qdrant_client::qdrant::with_vectors_selector::SelectorOptions::Enable(false)
    );
    assert!(q.query.is_some());
}

fn scored(payload: serde_json::Value, score: f32) -> ScoredPoint {
    ScoredPoint {
        payload: qdrant_client::Payload::try_from(payload).unwrap().into(),
        score,
        ..ScoredPoint::default()
    }
}

#[test]
fn a_hit_is_read_back_only_as_a_chunk_of_this_digest() {
    let chunk = Chunk {
        id: "a.md#3".into(),
        document: "a.md".into(),
        start: 30,
        end: 42,
        text: "alpha three".into(),
    };
    let good = serde_json::to_value(ChunkPayload::of(DIGEST, "2.1.0", 3, &chunk)).unwrap();
    let hit = recalled("coll", DIGEST, scored(good.clone(), 0.75)).unwrap();
    assert_eq!(
        hit,
        Recalled {
            row: 3,
            score: 0.75,
            chunk: chunk.clone()
        }
    );
    // Another digest's point (a collection written by something else) is refused.
    let other = recalled(
        "coll",
        &DIGEST.replace("sha256:0", "sha256:f"),
        scored(good.clone(), 0.5),
    )
    .unwrap_err();
    assert_eq!(other.reason(), "QdrantPayload");
    assert!(
        other.to_string().contains("it is of sha256:0123"),
        "{other}"
    );
    // A payload missing a field, or carrying one it should not.
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("text");
    assert_eq!(
        recalled("coll", DIGEST, scored(missing, 0.5))
            .unwrap_err()
            .reason(),
        "QdrantPayload"
    );
    let mut extra = good.clone();
    extra["secret"] = "x".into();
    assert!(recalled("coll", DIGEST, scored(extra, 0.5)).is_err());
    let mut negative = good.clone();
    negative["row"] = (-1).into();
    assert!(recalled("coll", DIGEST, scored(negative, 0.5)).is_err());
    assert!(recalled("coll", DIGEST, scored(good, f32::NAN)).is_err());
}

#[test]
fn urls_are_checked() {
    for ok in [
        "http://qdrant:6334",
        "http://qdrant.soma-system.svc:6334/",
        "https://vectors.example.com",
        "http://127.0.0.1:6334",
        "http://[::1]:6334",
    ] {
        check_url(ok).unwrap();
        QdrantSettings::new(ok).unwrap();
    }
    for bad in [
        "",
        "qdrant:6334",
        "grpc://qdrant:6334",
        "http://",
        "http://qdrant:6334/collections",
        "http://qdrant:6334?x=1",
        "http://user:pw@qdrant:6334",
        "http://qdrant:port",
        "http://qdrant:70000",
        "http://qd rant:6334",
    ] {
        let e = check_url(bad).unwrap_err();
        assert_eq!(e.reason(), "QdrantUrl", "{bad:?}");
    }
}

#[tokio::test]
async fn a_query_that_does_not_fit_is_refused_before_any_request() {
    // Port 9 on loopback: nothing answers; the checks below never reach it.
    let settings = QdrantSettings::new("http://127.0.0.1:9").unwrap();
    let index = QdrantIndex::new(&settings, "coll", DIGEST, 4, 10).unwrap();
    assert_eq!(
        (index.kind(), index.dims(), index.local_rows()),
        ("qdrant", 4, 0)
    );
    assert_eq!(
        index.search(&[1.0; 3], 2).await.unwrap_err(),
        SearchError::Query(IndexError::Dimensions { want: 4, got: 3 })
    );
    assert_eq!(
        index
            .search(&[1.0, f32::INFINITY, 0.0, 0.0], 2)
            .await
            .unwrap_err(),
        SearchError::Query(IndexError::NotFinite)
    );
    assert!(index.search(&[1.0; 4], 0).await.unwrap().is_empty());
    // A server that does not answer: unavailable, with the collection named.
    match index.search(&[1.0; 4], 2).await.unwrap_err() {
        SearchError::Unavailable(m) => assert!(m.contains("\"coll\""), "{m}"),
        other => panic!("{other:?}"),
    }
}
