//! A Capsule bundle packed with the deterministic `soma-hash-<d>` embeddings (which the fake
//! upstream's `/v1/embeddings` reproduces) and delivered into a folder as the init container
//! does.

use std::path::Path;

use soma_capsule::format::Embedding;
use soma_capsule::pack::{Embeddings, PackOptions, pack_documents};

/// The embedding model of the test bundles.
pub const MODEL: &str = "soma-hash-256";
/// Its dimension.
pub const DIMS: usize = 256;

pub fn documents() -> Vec<(String, String)> {
    vec![
        (
            "billing.md".into(),
            "Refunds are issued to the original card within five days.\n\nInvoices are emailed on the first of the month.".into(),
        ),
        (
            "shipping.md".into(),
            "Parcels ship from the Rotterdam warehouse.\n\nExpress delivery takes one day inside the country.".into(),
        ),
        (
            "accounts.md".into(),
            "Reset a forgotten password from the login page.\n\nTwo-factor codes expire after thirty seconds.".into(),
        ),
    ]
}

/// Packs the documents with `model`'s embeddings and delivers them into `dir/<name>`;
/// returns the digest.
pub fn deliver(dir: &Path, name: &str, model: &str, dims: usize) -> String {
    let docs = documents();
    let chunks = soma_capsule::pack::chunks(&docs, 80);
    let records = chunks
        .iter()
        .map(|c| Embedding {
            id: c.id.clone(),
            vector: soma_capsule::hashed::embed(&c.text, dims),
        })
        .collect();
    let bundle = pack_documents(
        &docs,
        &PackOptions {
            version: "1.2.0".into(),
            policy_hash: format!("sha256:{}", "9".repeat(64)),
            max_bytes: 80,
            embeddings: Some(Embeddings {
                model: model.into(),
                records,
            }),
        },
    )
    .unwrap();
    bundle.open().unwrap().write_into(&dir.join(name)).unwrap();
    bundle.digest
}

/// Rewrites a chunk of the Capsule delivered into `dir` (as a writable folder would allow):
/// the folder no longer holds the content of its digest.
pub fn tamper(dir: &Path) {
    let chunks = dir.join("chunks.jsonl");
    let mut perms = std::fs::metadata(&chunks).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&chunks, perms).unwrap();
    let text = std::fs::read_to_string(&chunks)
        .unwrap()
        .replace("five", "fifty");
    std::fs::write(&chunks, text).unwrap();
}

/// Asks `capsule` about refunds with a vector of the test model, so nothing is embedded and
/// nothing metered.
pub async fn recall_refunds(h: &super::Harness, capsule: &str) -> super::Reply {
    let body = serde_json::json!({"vector": soma_capsule::hashed::embed("refunds", DIMS), "capsules": [capsule]});
    h.post("/v1/recall", &body).await
}
