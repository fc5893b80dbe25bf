//! The sidecar's live configuration: the Budget definitions it enforces and the brown-out
//! the operator's autoscaler asks for, followed while it runs, so that an edited Budget
//! (caps, thresholds, action, period, parent) or a brown-out takes effect without restarting
//! any pod, and the Capsules the pod may no longer recall from.
//!
//! Two sources feed one [`Book`] of Budget definitions, which resolves the chain with the same
//! rules as the operator ([`crate::authority::plan`]) and hands the plan to the budget
//! authority, and one [`HeldBrownOut`], which feeds the brown-out gate
//! ([`crate::brownout::BrownOutGate`]):
//!
//! ```text
//!  ledger: LISTEN soma_live ─┬─notify 'ns/name'──────► read the chain's soma_budgets rows ─┐
//!                            └─notify 'agent:ns/name'─► read this Agent's soma_agent_live row ┤
//!          (both, every ledgerPollMs, for a notification missed while reconnecting)         ├─► Book ─► plan ─► authority.apply
//!  file:   the configuration file, looked at every fileCheckMs (a ConfigMap volume) ───────┘   HeldBrownOut ─► brown-out gate
//! ```
//!
//! Capsule revocations come from both sources too: the file's `revokedCapsules` and the
//! ledger's `soma_capsule_revocations` rows for the Capsules this pod holds (notification
//! `capsule:<ns>/<name>`, and every poll); recall refuses a Capsule either names, and its
//! folder is moved out of the agent container's view ([`crate::withdraw`]) until neither does.
//!
//! With a ledger an edit arrives in milliseconds; without one, when the kubelet refreshes the
//! ConfigMap volume (about a minute). A definition replaces the one held only when it is newer:
//! the same Budget (uid) at a higher generation, or, from the ledger, the Budget's current
//! incarnation; a brown-out at a higher `brownOutRevision`. Spend and reservations survive
//! every change; a Budget new to the chain has its spend replayed from the outbox; a lowered
//! cap makes the cluster authority give its unused slice back at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use soma_contract::load::BrownOut;
use soma_metering::{BudgetDef, BudgetKey};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, watch};

use crate::authority::{Plan, plan};
use crate::budgets::Budgets;
use crate::config::Config;
use crate::state::AppState;

/// Where a definition came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The configuration file.
    File,
    /// The ledger's `soma_budgets` table (the operator's current view).
    Ledger,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Ledger => "ledger",
        }
    }
}

/// The definitions the sidecar knows, newest first.
#[derive(Clone, Debug, Default)]
pub struct Book {
    start: Option<BudgetKey>,
    defs: BTreeMap<BudgetKey, (BudgetDef, Source)>,
}

impl Book {
    /// The book of a configuration file.
    pub fn new(config: &Config) -> Book {
        let mut book = Book {
            start: config.budget_key(),
            defs: BTreeMap::new(),
        };
        book.take(config.budgets.iter().cloned(), Source::File);
        book
    }

    /// Takes definitions from `source`; returns whether anything changed.
    pub fn take(&mut self, defs: impl IntoIterator<Item = BudgetDef>, source: Source) -> bool {
        let mut changed = false;
        for def in defs {
            let key = def.key();
            let newer = match self.defs.get(&key) {
                None => true,
                Some((known, _)) if known.uid == def.uid => {
                    def.generation > known.generation
                        || (def.generation == known.generation && def != *known)
                }
                // Another incarnation: the ledger holds the operator's current one; a file
                // only replaces what another file said.
                Some((_, from)) => source == Source::Ledger || *from == Source::File,
            };
            if newer {
                self.defs.insert(key, (def, source));
                changed = true;
            }
        }
        changed
    }

    /// The chain as these definitions resolve it.
    pub fn plan(&self) -> Plan {
        let defs: Vec<BudgetDef> = self.defs.values().map(|(d, _)| d.clone()).collect();
        plan(self.start.as_ref(), &defs)
    }
}

/// The brown-out the sidecar holds: what the operator decided at `revision`, and where it
/// came from.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldBrownOut {
    revision: i64,
    spec: Option<BrownOut>,
    source: Source,
}

impl HeldBrownOut {
    /// The brown-out of a configuration file.
    pub fn new(config: &Config) -> HeldBrownOut {
        HeldBrownOut {
            revision: config.brown_out_revision,
            spec: config.brown_out.clone(),
            source: Source::File,
        }
    }

    /// Takes the brown-out decided at `revision` from `source` when it is newer than the one
    /// held; returns whether the brown-out in force changed. At the same revision the
    /// ledger's word replaces the file's, and a file only replaces what a file said (a
    /// hand-written file has no revisions: a changed `brownOut` is taken).
    pub fn take(&mut self, revision: i64, spec: Option<BrownOut>, source: Source) -> bool {
        let newer = revision > self.revision
            || (revision == self.revision
                && spec != self.spec
                && (source == Source::Ledger || self.source == Source::File));
        if !newer {
            return false;
        }
        let changed = spec != self.spec;
        *self = HeldBrownOut {
            revision,
            spec,
            source,
        };
        changed
    }

    /// The brown-out in force.
    pub fn spec(&self) -> Option<&BrownOut> {
        self.spec.as_ref()
    }
}

/// Puts the held brown-out in force.
fn enforce_brown_out(state: &AppState, held: &HeldBrownOut, source: Source) {
    match state
        .brown_out
        .set_checked(held.spec.clone(), &state.load, state.config.prices.as_ref())
    {
        Ok(true) => {
            tracing::info!(source = source.label(), revision = held.revision, brown_out = ?held.spec, "brown-out updated");
            state.metrics.live_update(source.label(), "applied");
        }
        Ok(false) => {}
        Err(why) => {
            tracing::warn!(source = source.label(), revision = held.revision, reason = %why, "brown-out refused; the one in force stays");
            state.metrics.live_update(source.label(), "refused");
        }
    }
}

/// Reads this Agent's live row; returns whether the brown-out in force changed.
async fn read_agent(pool: &PgPool, state: &AppState, held: &mut HeldBrownOut) -> bool {
    let agent = &state.config.agent;
    match soma_ledger::live::agent_live(pool, &agent.namespace, &agent.name).await {
        Ok(Some(live)) => held.take(live.revision, live.brown_out, Source::Ledger),
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(error = %e, "reading this Agent's live brown-out failed; the one in force stays");
            if matches!(e, sqlx::Error::Decode(_)) {
                state.metrics.live_update(Source::Ledger.label(), "refused");
            }
            false
        }
    }
}

/// Takes the book's plan into the authority: replays the spend of Budgets new to the chain
/// and, when a cap changed under the cluster authority, reports and gives unused slices back.
async fn enforce(state: &AppState, book: &Book, source: Source) {
    let plan = book.plan();
    let applied = match state.authority.apply(&plan) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, source = source.label(), "a live Budget definition was refused; the previous ones stay in force");
            state.metrics.live_update(source.label(), "refused");
            return;
        }
    };
    if !applied.changed {
        return;
    }
    state.metrics.live_update(source.label(), "applied");
    if !applied.added.is_empty() {
        let now = jiff::Timestamp::now();
        match state
            .outbox
            .spend_since(state.authority.replay_since(now))
            .await
        {
            Ok(rows) => state.authority.replay(&rows, Some(&applied.added)),
            Err(e) => tracing::warn!(error = %e, "replaying the outbox for a new Budget failed"),
        }
    }
    let generations: Vec<String> = plan
        .defs
        .iter()
        .map(|d| format!("{}@{}", d.key(), d.generation))
        .collect();
    tracing::info!(source = source.label(), chain = ?generations, problem = ?plan.problem.as_ref().map(ToString::to_string), "budget definitions updated");
    if applied.caps_changed
        && let Budgets::Cluster(c) = &state.authority
        && let Err(e) = c.heartbeat(true).await
    {
        tracing::warn!(error = %e, "could not give budget slices back after a lowered cap; they are not spent and expire");
    }
}

/// Reads the ledger rows of the chain's Budgets, following parents the rows add.
async fn read_ledger(pool: &PgPool, book: &mut Book) -> Result<bool, sqlx::Error> {
    let mut changed = false;
    let mut asked: Vec<BudgetKey> = Vec::new();
    for _ in 0..=soma_metering::chain::MAX_CHAIN {
        let keys: Vec<BudgetKey> = book
            .plan()
            .keys()
            .into_iter()
            .chain(book.start.clone())
            .filter(|k| !asked.contains(k))
            .collect();
        if keys.is_empty() {
            break;
        }
        let defs = soma_ledger::live::budgets(pool, &keys).await?;
        asked.extend(keys);
        changed |= book.take(defs, Source::Ledger);
    }
    Ok(changed)
}

/// Forwards notifications on `soma_live` until the receiver is gone; reconnects with backoff.
async fn listen(pool: PgPool, tx: mpsc::Sender<String>) {
    let mut wait = Duration::from_millis(500);
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(soma_ledger::live::CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        match listener {
            Ok(mut l) => {
                wait = Duration::from_millis(500);
                // A reconnect may have missed notifications: read everything once.
                if tx.send(String::new()).await.is_err() {
                    return;
                }
                loop {
                    match l.try_recv().await {
                        Ok(Some(n)) => {
                            if tx.send(n.payload().to_owned()).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "live configuration listener lost");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "live configuration listener cannot connect"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// The revocations of both sources, applied to the recall shelf and to the Capsule folders.
struct Revocations {
    file: Vec<soma_contract::recall::RevokedCapsule>,
    ledger: Vec<soma_contract::recall::RevokedCapsule>,
    /// Whether the ledger's revocations are known (read at least once, or no ledger): until
    /// then a folder is withdrawn but never put back.
    ledger_known: bool,
}

impl Revocations {
    async fn apply(&self, state: &Arc<AppState>, source: Source) {
        let mut all = self.file.clone();
        all.extend(self.ledger.iter().cloned());
        if state.capsules.set_revoked(&all) {
            tracing::info!(
                source = source.label(),
                revoked = all.len(),
                "Capsule revocations updated"
            );
            state.metrics.live_update(source.label(), "applied");
        }
        // Every read places the folders (a no-op when they are where they belong), so a move
        // that failed is tried again.
        let mode = if self.ledger_known {
            crate::withdraw::Mode::Full
        } else {
            crate::withdraw::Mode::WithdrawOnly
        };
        let state = state.clone();
        let span = tracing::Span::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            crate::withdraw::place(&state, mode)
        })
        .await;
    }
}

/// Reads the ledger's revocations of the Capsules this pod holds.
async fn read_revocations(
    pool: &PgPool,
    state: &AppState,
) -> Result<Vec<soma_contract::recall::RevokedCapsule>, sqlx::Error> {
    let held = state.capsules.held();
    let rows =
        soma_ledger::live::capsule_revocations(pool, &state.config.agent.namespace, &held).await?;
    Ok(rows
        .into_iter()
        .map(|r| soma_contract::recall::RevokedCapsule {
            name: r.name,
            digest: r.digest,
            reason: r.reason,
        })
        .collect())
}

/// What woke the live loop.
enum Wake {
    /// The file changed and reads.
    File(Box<Config>),
    /// The ledger is to be read: this Agent's row, the Budget rows, the Capsule revocations.
    Ledger {
        agent: bool,
        budgets: bool,
        revocations: bool,
    },
}

/// Follows the file (when `path` is given) and the ledger (when `pool` is given) until `stop`.
pub async fn run(
    state: Arc<AppState>,
    path: Option<PathBuf>,
    pool: Option<PgPool>,
    mut stop: watch::Receiver<bool>,
) {
    let settings = state.config.live;
    let mut book = Book::new(&state.config);
    let mut held = HeldBrownOut::new(&state.config);
    let me = format!(
        "{}{}/{}",
        soma_ledger::live::AGENT_NOTE,
        state.config.agent.namespace,
        state.config.agent.name
    );
    let mut revocations = Revocations {
        file: state.config.revoked_capsules.clone(),
        ledger: Vec::new(),
        ledger_known: pool.is_none(),
    };
    let capsule_note = format!(
        "{}{}/",
        soma_ledger::live::CAPSULE_NOTE_PREFIX,
        state.config.agent.namespace
    );
    let mut last_text = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
    let (tx, mut notes) = mpsc::channel::<String>(64);
    let listener = pool.clone().map(|p| tokio::spawn(listen(p, tx)));
    let every = |ms: u64| {
        if ms == 0 {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_millis(ms)
        }
    };
    let mut file_tick = tokio::time::interval(every(settings.file_check_ms));
    let mut poll_tick = tokio::time::interval(every(settings.ledger_poll_ms));
    file_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // What woke the loop: a changed file, or what the ledger is read for (this Agent's
        // row, the Budget rows). Awaiting is done after the select, which holds `stop`'s guard.
        let wake = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = file_tick.tick(), if path.is_some() && settings.file_check_ms > 0 => {
                let Some(p) = &path else { continue };
                let Ok(text) = std::fs::read_to_string(p) else { continue };
                if last_text.as_deref() == Some(text.as_str()) {
                    continue;
                }
                last_text = Some(text.clone());
                match Config::parse(&text) {
                    Ok(c) => Wake::File(Box::new(c)),
                    Err(e) => {
                        tracing::warn!(error = %e, cause = ?std::error::Error::source(&e).map(ToString::to_string), "the changed configuration file does not read; the previous Budgets and brown-out stay in force");
                        state.metrics.live_update("file", "refused");
                        continue;
                    }
                }
            }
            note = notes.recv(), if pool.is_some() => {
                let Some(note) = note else { continue };
                if note.is_empty() {
                    Wake::Ledger { agent: true, budgets: true, revocations: true }
                } else if note.starts_with(soma_ledger::live::AGENT_NOTE) {
                    Wake::Ledger { agent: note == me, budgets: false, revocations: false }
                } else if note.starts_with(soma_ledger::live::CAPSULE_NOTE_PREFIX) {
                    let ours = note.strip_prefix(&capsule_note).is_some_and(|name| {
                        state.capsules.held().iter().any(|(n, _)| n == name)
                    });
                    Wake::Ledger { agent: false, budgets: false, revocations: ours }
                } else {
                    let keys = book.plan().keys();
                    let relevant = note.parse::<BudgetKey>().map_or(true, |k| keys.contains(&k) || book.start.as_ref() == Some(&k));
                    Wake::Ledger { agent: false, budgets: relevant, revocations: false }
                }
            }
            _ = poll_tick.tick(), if pool.is_some() && settings.ledger_poll_ms > 0 => Wake::Ledger { agent: true, budgets: true, revocations: true },
        };
        let (agent_row, budget_rows) = match wake {
            Wake::File(c) => {
                let c = *c;
                if held.take(c.brown_out_revision, c.brown_out.clone(), Source::File) {
                    enforce_brown_out(&state, &held, Source::File);
                }
                revocations.file = c.revoked_capsules;
                revocations.apply(&state, Source::File).await;
                if book.take(c.budgets, Source::File) {
                    enforce(&state, &book, Source::File).await;
                }
                continue;
            }
            Wake::Ledger {
                agent,
                budgets,
                revocations: revoked,
            } => {
                if revoked && let Some(p) = &pool {
                    match read_revocations(p, &state).await {
                        Ok(r) => {
                            revocations.ledger = r;
                            revocations.ledger_known = true;
                            revocations.apply(&state, Source::Ledger).await;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "reading Capsule revocations failed; retrying at the next poll")
                        }
                    }
                }
                (agent, budgets)
            }
        };
        let Some(p) = &pool else { continue };
        if agent_row && read_agent(p, &state, &mut held).await {
            enforce_brown_out(&state, &held, Source::Ledger);
        }
        if budget_rows {
            match read_ledger(p, &mut book).await {
                Ok(false) => {}
                Ok(true) => enforce(&state, &book, Source::Ledger).await,
                Err(e) => {
                    tracing::debug!(error = %e, "reading live Budget definitions failed; retrying at the next poll");
                }
            }
        }
    }
    if let Some(l) = listener {
        l.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use soma_metering::budget::Limits;

    fn def(name: &str, uid: &str, generation: i64, tokens: u64) -> BudgetDef {
        BudgetDef {
            namespace: "a".into(),
            name: name.into(),
            uid: uid.into(),
            generation,
            limits: Limits {
                tokens: Some(tokens),
                ..Limits::default()
            },
            ..BudgetDef::default()
        }
    }

    fn tokens(book: &Book, name: &str) -> Option<u64> {
        book.defs
            .get(&BudgetKey::new("a", name))
            .and_then(|(d, _)| d.limits.tokens)
    }

    fn shed(fraction: f64) -> Option<BrownOut> {
        Some(BrownOut {
            fraction,
            action: soma_contract::load::BrownOutAction::Shed,
            model: None,
            message: "m".into(),
        })
    }

    #[test]
    fn a_newer_brown_out_wins_and_an_older_one_never_returns() {
        let mut held = HeldBrownOut {
            revision: 0,
            spec: None,
            source: Source::File,
        };
        // The ledger engages at revision 10; the kubelet then brings the file at 10: nothing
        // changes.
        assert!(held.take(10, shed(0.3), Source::Ledger));
        assert!(!held.take(10, shed(0.3), Source::File));
        // It clears at 20; a stale file (10, engaged) does not bring it back, nor does a file
        // at the same revision that disagrees with the ledger.
        assert!(held.take(20, None, Source::Ledger));
        assert!(!held.take(10, shed(0.3), Source::File));
        assert!(!held.take(20, shed(0.3), Source::File));
        assert_eq!(held.spec(), None);
        // A file ahead of the ledger (a ledger write that failed) is newer: taken.
        assert!(held.take(30, shed(0.5), Source::File));
        assert!(!held.take(25, None, Source::Ledger));
        assert_eq!(held.spec(), shed(0.5).as_ref());
        // A newer revision with the same brown-out is recorded, and changes nothing in force.
        assert!(!held.take(31, shed(0.5), Source::Ledger));
        assert_eq!(held.revision, 31);
        // Hand-written files (no revision): a changed brown-out is taken.
        let mut local = HeldBrownOut {
            revision: 0,
            spec: None,
            source: Source::File,
        };
        assert!(local.take(0, shed(0.2), Source::File));
        assert!(local.take(0, None, Source::File));
    }

    #[test]
    fn newer_definitions_win_whatever_their_source() {
        let mut book = Book {
            start: Some(BudgetKey::new("a", "team")),
            defs: BTreeMap::new(),
        };
        assert!(book.take([def("team", "u1", 1, 100)], Source::File));
        // The ledger has generation 2: it wins.
        assert!(book.take([def("team", "u1", 2, 50)], Source::Ledger));
        // The kubelet then refreshes the file to generation 2: nothing changes; a stale file
        // (generation 1) does not take the old cap back.
        assert!(!book.take([def("team", "u1", 2, 50)], Source::File));
        assert!(!book.take([def("team", "u1", 1, 100)], Source::File));
        assert_eq!(tokens(&book, "team"), Some(50));
        // A recreated Budget: the ledger's incarnation wins, a file cannot bring the old back.
        assert!(book.take([def("team", "u2", 1, 7)], Source::Ledger));
        assert!(!book.take([def("team", "u1", 3, 100)], Source::File));
        assert_eq!(tokens(&book, "team"), Some(7));
        // Hand-written files without generations: a changed definition is taken.
        let mut local = Book::default();
        assert!(local.take([def("x", "", 0, 1)], Source::File));
        assert!(local.take([def("x", "", 0, 2)], Source::File));
        assert!(!local.take([def("x", "", 0, 2)], Source::File));
    }
}
