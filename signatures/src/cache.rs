//! Verified digests, keyed by (artifact digest, policy fingerprint): a digest verified under a
//! policy is not verified again until the policy (its keys or identities) changes. Only successes
//! are cached; a rejection is checked afresh every time, so a newly pushed signature is seen.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::Verified;

type Key = ([u8; 32], [u8; 32]);

/// A bounded map of successful verifications.
#[derive(Debug)]
pub(crate) struct VerifiedCache {
    entries: RwLock<HashMap<Key, Verified>>,
    capacity: usize,
}

impl VerifiedCache {
    pub(crate) fn new(capacity: usize) -> Self {
        VerifiedCache {
            entries: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    pub(crate) fn get(&self, digest: [u8; 32], policy: [u8; 32]) -> Option<Verified> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.get(&(digest, policy)).cloned()
    }

    pub(crate) fn insert(&self, digest: [u8; 32], policy: [u8; 32], verified: Verified) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        // Full: start over rather than track recency. Re-verifying is correct, only slower, and
        // a cache this size holds every Capsule and image of a large cluster.
        if entries.len() >= self.capacity && !entries.contains_key(&(digest, policy)) {
            entries.clear();
        }
        entries.insert((digest, policy), verified);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn clear(&self) {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(n: u8) -> Verified {
        Verified {
            digest: format!("sha256:{n:064x}"),
            signer: "key:sha256:00".into(),
            at: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn keyed_by_digest_and_policy_and_bounded() {
        let cache = VerifiedCache::new(2);
        cache.insert([1; 32], [9; 32], verified(1));
        assert_eq!(cache.get([1; 32], [9; 32]), Some(verified(1)));
        assert_eq!(cache.get([1; 32], [8; 32]), None, "another policy misses");
        assert_eq!(cache.get([2; 32], [9; 32]), None, "another digest misses");
        cache.insert([2; 32], [9; 32], verified(2));
        cache.insert([2; 32], [9; 32], verified(2));
        assert_eq!(
            cache.len(),
            2,
            "re-inserting a key does not grow or clear the cache"
        );
        cache.insert([3; 32], [9; 32], verified(3));
        assert_eq!(cache.len(), 1, "full: emptied, then the new entry kept");
        assert_eq!(cache.get([3; 32], [9; 32]), Some(verified(3)));

        let off = VerifiedCache::new(0);
        off.insert([1; 32], [9; 32], verified(1));
        assert_eq!(off.get([1; 32], [9; 32]), None);
    }
}
