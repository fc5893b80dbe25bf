//! Withdrawing a revoked Capsule's files from the agent container, and putting them back
//! when the revocation is lifted.
//!
//! The operator gives the pod one Capsule volume. The sidecar mounts all of it (read-write);
//! the agent container mounts only its `visible/` folder, read-only, at `/capsules`. A
//! Capsule's folder is `visible/<name>/` while it may be used and `withheld/<name>/` while it
//! is revoked: one `rename(2)` on one filesystem each way, so the agent sees the whole folder
//! or none of it, never a half-moved one.
//!
//! ```text
//!  volume/visible/<name>/ ◄── agent: /capsules/<name>/ (subPath visible, read-only)
//!         withheld/<name>/    (the sidecar only)
//!  revoked (file or ledger) ──► place ──► visible/<name> ─rename─► withheld/<name>
//!  lifted                   ──► place ──► withheld/<name> ─digest checked again─rename─► visible/<name>
//! ```
//!
//! The live loop ([`crate::live`]) calls [`place`] whenever it has read the revocations, so
//! a move that failed is tried again at the next read. A folder that fails its check on the
//! way back stays withheld and recall refuses it (409 with the reason). A process in the
//! agent container that opened or copied a file before the move keeps what it has: the move
//! takes the path away, not the bytes already read.

use std::path::{Component, Path, PathBuf};

use soma_contract::recall::RecallSettings;

use crate::state::AppState;

/// Whether a placement may move folders back into view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only withdraw: the revocations known may be incomplete (a sidecar with a ledger that
    /// has not been read yet must not put back what the ledger revokes).
    WithdrawOnly,
    /// Withdraw the revoked, put back the others.
    Full,
}

/// What placing one Capsule did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Moved {
    /// Moved out of the agent's view.
    Withdrawn,
    /// Checked and moved back into view.
    Reinstated,
}

/// The two folders of the Capsule volume.
#[derive(Clone, Debug)]
pub struct Folders {
    visible: PathBuf,
    withheld: PathBuf,
}

/// Why a folder could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// A name that is not one plain path component.
    #[error("{0:?} is not a plain folder name")]
    Name(String),
    /// The rename (or preparing it) failed.
    #[error("moving {from} to {to}: {source}")]
    Io {
        /// From.
        from: String,
        /// To.
        to: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The withheld folder no longer holds the verified content.
    #[error("its withheld folder no longer holds the verified content: {0}")]
    Check(String),
}

fn plain(name: &str) -> Result<&str, PlaceError> {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) if !name.contains('/') => Ok(name),
        _ => Err(PlaceError::Name(name.to_owned())),
    }
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

impl Folders {
    /// The folders of `settings`, when withdrawal is configured (`recall.withheldDir`).
    pub fn new(settings: &RecallSettings) -> Option<Folders> {
        Some(Folders {
            visible: settings.capsules_dir.clone(),
            withheld: settings.withheld_dir.clone()?,
        })
    }

    /// Where `name`'s folder is: in view, or withheld (a sidecar restarted while its Capsule
    /// was revoked finds it there).
    pub fn locate(settings: &RecallSettings, name: &str) -> PathBuf {
        let visible = settings.capsules_dir.join(name);
        match Folders::new(settings) {
            Some(f) if !exists(&visible) && exists(&f.withheld.join(name)) => f.withheld.join(name),
            _ => visible,
        }
    }

    fn rename(from: &Path, to: &Path) -> Result<(), PlaceError> {
        let io = |source| PlaceError::Io {
            from: from.display().to_string(),
            to: to.display().to_string(),
            source,
        };
        // Moving a folder to another parent rewrites its `..`: it must be writable by its
        // owner (the fetch leaves it so; make sure).
        let meta = std::fs::metadata(from).map_err(io)?;
        let mut perms = meta.permissions();
        {
            use std::os::unix::fs::PermissionsExt;
            if perms.mode() & 0o200 == 0 {
                perms.set_mode(perms.mode() | 0o200);
                std::fs::set_permissions(from, perms).map_err(io)?;
            }
        }
        std::fs::rename(from, to).map_err(io)
    }

    /// Moves `name` out of view; `Ok(false)` when it is not in view.
    pub fn withdraw(&self, name: &str) -> Result<bool, PlaceError> {
        let name = plain(name)?;
        let from = self.visible.join(name);
        if !exists(&from) {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.withheld).map_err(|source| PlaceError::Io {
            from: from.display().to_string(),
            to: self.withheld.display().to_string(),
            source,
        })?;
        Folders::rename(&from, &self.withheld.join(name))?;
        Ok(true)
    }

    /// Moves `name` back into view once `check` accepts the withheld folder; `Ok(false)`
    /// when it is not withheld (or already in view).
    pub fn reinstate(
        &self,
        name: &str,
        check: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<bool, PlaceError> {
        let name = plain(name)?;
        let from = self.withheld.join(name);
        let to = self.visible.join(name);
        if !exists(&from) || exists(&to) {
            return Ok(false);
        }
        check(&from).map_err(PlaceError::Check)?;
        Folders::rename(&from, &to)?;
        Ok(true)
    }
}

/// Checks a withheld folder against the digest it was verified at: for a bundle, the same
/// check recall makes at load (`manifest.json` hashes to the digest; the Capsule manifest,
/// chunks and embeddings are the blobs it names); for a ConfigMap Capsule (`file`), the
/// folder holds that one file and it hashes to the digest.
fn recheck(dir: &Path, digest: &str, file: Option<&str>) -> Result<(), String> {
    let Some(file) = file else {
        return soma_capsule::delivered::open_delivered(dir, digest)
            .map(|_| ())
            .map_err(|e| format!("{} ({e})", e.reason()));
    };
    let entries: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("reading {}: {e}", dir.display()))?;
    if entries != [file] {
        return Err(format!(
            "the folder holds {entries:?}, the Capsule is the one file {file:?}"
        ));
    }
    let bytes = std::fs::read(dir.join(file)).map_err(|e| format!("reading {file}: {e}"))?;
    let actual = soma_capsule::sha256_digest(&bytes);
    if actual != digest {
        return Err(format!(
            "{file} hashes to {actual}, the verified digest is {digest}"
        ));
    }
    Ok(())
}

/// Puts each Capsule the pod holds (by name and digest) where the revocations in force say;
/// returns what moved. Blocking (renames, and hashing a folder before it goes back).
pub fn place(state: &AppState, mode: Mode) -> Vec<(String, Moved)> {
    let Some(folders) = Folders::new(&state.config.recall) else {
        return Vec::new();
    };
    let mut moved = Vec::new();
    for (name, digest) in state.capsules.held() {
        let result = if let Some(reason) = state.capsules.revocation(&name, &digest) {
            folders.withdraw(&name).map(|m| {
                if m {
                    tracing::warn!(capsule = %name, digest = %digest, reason = %reason, "Capsule withdrawn from the agent container");
                }
                m.then_some(Moved::Withdrawn)
            })
        } else if mode == Mode::Full {
            folders
                .reinstate(&name, |dir| {
                    recheck(dir, &digest, state.capsules.single_file(&name))
                })
                .map(|m| {
                    if m {
                        tracing::info!(capsule = %name, digest = %digest, "Capsule back in the agent container (its digest checked again)");
                    }
                    m.then_some(Moved::Reinstated)
                })
        } else {
            Ok(None)
        };
        match result {
            Ok(Some(m)) => {
                state.capsules.set_withheld_problem(&name, None);
                moved.push((name, m));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(capsule = %name, error = %e, "placing the Capsule's folder failed; tried again at the next read of the revocations");
                state.metrics.error("capsule_withdraw");
                if let PlaceError::Check(_) = e {
                    state
                        .capsules
                        .set_withheld_problem(&name, Some(e.to_string()));
                }
            }
        }
    }
    moved
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_plain_names_are_moved() {
        let dir = tempfile::tempdir().unwrap();
        let f = Folders {
            visible: dir.path().join("visible"),
            withheld: dir.path().join("withheld"),
        };
        for bad in ["..", "../x", "a/b", "/abs", ""] {
            assert!(
                matches!(f.withdraw(bad), Err(PlaceError::Name(_))),
                "{bad:?}"
            );
        }
        std::fs::create_dir_all(dir.path().join("visible/kb")).unwrap();
        std::fs::write(dir.path().join("visible/kb/a"), "x").unwrap();
        assert!(f.withdraw("kb").unwrap());
        assert!(!f.withdraw("kb").unwrap(), "already withheld");
        assert!(dir.path().join("withheld/kb/a").exists());
        assert!(
            matches!(f.reinstate("kb", |_| Err("changed".into())), Err(PlaceError::Check(m)) if m == "changed")
        );
        assert!(
            dir.path().join("withheld/kb/a").exists(),
            "a refused folder stays withheld"
        );
        assert!(f.reinstate("kb", |_| Ok(())).unwrap());
        assert!(dir.path().join("visible/kb/a").exists());
    }

    #[test]
    fn a_single_file_capsule_goes_back_only_as_the_verified_file() {
        let dir = tempfile::tempdir().unwrap();
        let faq = dir.path().join("faq");
        std::fs::create_dir_all(&faq).unwrap();
        std::fs::write(faq.join("faq.jsonl"), "{\"q\": 1}\n").unwrap();
        let digest = soma_capsule::sha256_digest(b"{\"q\": 1}\n");
        recheck(&faq, &digest, Some("faq.jsonl")).unwrap();
        let other = soma_capsule::sha256_digest(b"other");
        assert!(
            recheck(&faq, &other, Some("faq.jsonl"))
                .unwrap_err()
                .contains("hashes to")
        );
        assert!(recheck(&faq, &digest, Some("other.jsonl")).is_err());
        // A file added beside it is not the verified content either.
        std::fs::write(faq.join("extra"), "x").unwrap();
        assert!(
            recheck(&faq, &digest, Some("faq.jsonl"))
                .unwrap_err()
                .contains("the folder holds")
        );
        // Not a bundle: the bundle check refuses it.
        std::fs::remove_file(faq.join("extra")).unwrap();
        assert!(recheck(&faq, &digest, None).is_err());
    }
}
