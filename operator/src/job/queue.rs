//! Who may start when no Kueue queue is named: at most `--job-concurrency` task Jobs run at
//! once per namespace, and a freed slot goes to the waiting Job with the highest `priority`,
//! then the oldest, then by name. Pure: the reconcile counts the running batch/v1 Jobs and
//! lists the waiting Jobs, this decides. (Where Kueue runs, name a queue: Kueue's quotas,
//! fair sharing and preemption apply, and none of this.)

/// A Job waiting for a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contender {
    /// Its name.
    pub name: String,
    /// `spec.priority`.
    pub priority: i32,
    /// `metadata.creationTimestamp` (RFC 3339, so it sorts as text).
    pub created: String,
}

/// Why a Job may not start yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoSlot {
    /// Jobs running.
    pub running: usize,
    /// The limit.
    pub limit: usize,
    /// Jobs ahead of it.
    pub ahead: usize,
}

/// Whether `me` (one of `contenders`) may start while `running` Jobs of the namespace run
/// under a limit of `limit` (0: no limit).
pub fn may_start(
    me: &str,
    contenders: &[Contender],
    running: usize,
    limit: usize,
) -> Result<(), NoSlot> {
    if limit == 0 {
        return Ok(());
    }
    let mut order: Vec<&Contender> = contenders.iter().collect();
    order.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.created.cmp(&b.created))
            .then_with(|| a.name.cmp(&b.name))
    });
    let ahead = order.iter().take_while(|c| c.name != me).count();
    let free = limit.saturating_sub(running);
    if ahead < free {
        Ok(())
    } else {
        Err(NoSlot {
            running,
            limit,
            ahead,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, priority: i32, created: &str) -> Contender {
        Contender {
            name: name.into(),
            priority,
            created: created.into(),
        }
    }

    #[test]
    fn slots_go_by_priority_then_age_then_name() {
        let waiting = [
            c("old-low", 0, "2026-12-01T00:00:00Z"),
            c("new-high", 10, "2026-12-02T00:00:00Z"),
            c("old-high", 10, "2026-12-01T00:00:00Z"),
            c("b-twin", 10, "2026-12-01T00:00:00Z"),
        ];
        // One free slot of two: only the first in order starts.
        assert_eq!(may_start("b-twin", &waiting, 1, 2), Ok(()));
        for other in ["old-high", "new-high", "old-low"] {
            assert!(may_start(other, &waiting, 1, 2).is_err(), "{other}");
        }
        // Two free: the first two.
        assert_eq!(may_start("old-high", &waiting, 0, 2), Ok(()));
        assert_eq!(
            may_start("new-high", &waiting, 0, 2),
            Err(NoSlot {
                running: 0,
                limit: 2,
                ahead: 2
            })
        );
        // Full: nobody; no limit: everybody.
        assert!(may_start("b-twin", &waiting, 2, 2).is_err());
        assert!(may_start("b-twin", &waiting, 5, 2).is_err());
        assert_eq!(may_start("old-low", &waiting, 100, 0), Ok(()));
    }
}
