//! The cluster budget authority: many sidecar replicas sharing one Budget chain, with the
//! chain's state in PostgreSQL and the common-case check in memory.
//!
//! Each replica leases a slice of each Budget's window (`src/lease.rs`): the window's
//! `granted` total never passes its cap, and a replica reserves only inside its own lease.
//! A reservation that its lease covers costs no database round trip; one that does not is
//! reserved beyond the lease and waits for a top-up to cover it (one transaction, one at a time
//! per replica): the replica's other requests see that share as used meanwhile, so they cannot
//! spend what the top-up brings for it. If PostgreSQL refuses or cannot be reached, the
//! reservation is released and the request refused (fail closed): nothing is spent that was
//! not granted.
//!
//! ```text
//!  reserve(worst) ─► local: used + worst ≤ lease on every Budget? ─yes─► Ledger::reserve (rates)
//!        └─no─► Ledger::reserve, then top-up (PostgreSQL) to cover it ─granted─► taken
//!                  └─ cap reached ─► 429 naming the Budget      └─ unreachable ─► 503
//!  every ttl/3: report used, renew the lease; idle: give the unused rest back; stop: give back
//! ```
//!
//! What is exact: the period caps (`tokens`, `costMicros`) across all replicas, up to what a
//! provider returns beyond the worst case asked for (as with the embedded authority). What is
//! approximate: the per-minute rate limits, which each replica enforces as its share
//! (`limit / live replicas`, rounded up) of the limit; and a replica cut off from PostgreSQL
//! for longer than the lease TTL plus the reclaim delay has its lease cut back to what it last
//! reported, so spend it made from its slice after that report (at most the slice) is counted
//! when it reports again or its outbox is delivered, possibly past the cap. A replica uses a
//! lease only until just under one TTL after the renewal that timed it started, so it stops
//! spending before anyone may reclaim. `docs/sidecar.md` has the full account.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use soma_metering::budget::LimitKind;
use soma_metering::{Amount, BudgetDef, BudgetKey, Ledger, Refusal, Reservation, Window};
use sqlx::postgres::PgPool;

use crate::authority::{Applied, BudgetState, ChainError, ChainState, Plan, Reserve};
use crate::lease::{self, Ask, Grant, Shortfall, Terms};
use crate::metrics::LeaseTransactions;
use crate::outbox::PastSpend;

/// One Budget as this replica sees it.
#[derive(Debug)]
struct Local {
    /// The definition as configured (full rate limits).
    def: BudgetDef,
    /// This replica's spend and reservations, with its share of the rate limits.
    ledger: Ledger,
    /// The window `lease` is for.
    window: Option<Window>,
    /// This replica's lease in `window`.
    lease: Amount,
    /// A reservation was taken since the last heartbeat.
    touched: bool,
    /// The lease may be used until then: a little less than one TTL after the start of the
    /// renewal that PostgreSQL timed it from. A replica cut off from PostgreSQL stops spending
    /// its slice then, before anyone may reclaim it.
    valid_until: Option<Instant>,
    /// Requests this replica refused (this Budget refusing) in `window`.
    refusals: u64,
    /// Requests this replica sent to the brown-out model (this Budget exhausted) in `window`.
    brownouts: u64,
    /// Replicas holding a live lease at the last grant or report (rates are shared by them).
    live: u64,
}

impl BudgetState for Local {
    fn create(def: BudgetDef) -> Result<Self, ChainError> {
        if def.period.rolling.is_some() {
            return Err(ChainError::Rolling(def.key()));
        }
        Ok(Local {
            ledger: Ledger::new(def.clone())?,
            def,
            window: None,
            lease: Amount::default(),
            touched: false,
            valid_until: None,
            refusals: 0,
            brownouts: 0,
            live: 1,
        })
    }

    fn def(&self) -> &BudgetDef {
        &self.def
    }

    fn redefine(&mut self, def: BudgetDef) -> Result<(), ChainError> {
        if def.period.rolling.is_some() {
            return Err(ChainError::Rolling(def.key()));
        }
        self.ledger.redefine(def.clone())?;
        let lowered = |old: Option<u64>, new: Option<u64>| match (old, new) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(o), Some(n)) => n < o,
        };
        if lowered(self.def.limits.tokens, def.limits.tokens)
            || lowered(self.def.limits.cost_micros, def.limits.cost_micros)
        {
            // A lowered cap: stop spending the slice granted under the old one. The live
            // loop then reports and gives the unused rest back; the next request tops up
            // against the new cap.
            self.valid_until = None;
        }
        self.def = def;
        self.share_rates(self.live);
        Ok(())
    }
}

impl Local {
    fn share_rates(&mut self, live: u64) {
        let live = live.max(1);
        self.live = live;
        let share = |l: Option<u64>| l.map(|v| v.div_ceil(live));
        let l = &self.def.limits;
        let (t, r) = (share(l.tokens_per_minute), share(l.requests_per_minute));
        self.ledger.set_rate_limits(t, r);
    }

    /// Moves to `now`'s window (a new window starts with no lease) and says whether the lease
    /// covers `want` on every period cap.
    fn covers(&mut self, now: Timestamp, want: Amount) -> bool {
        let Ok(w) = self.ledger.window(now) else {
            return false;
        };
        if self.window.map(|x| x.start) != Some(w.start) {
            // A past window's lease constrains nothing any more; it is left as it is.
            self.window = Some(w);
            self.lease = Amount::default();
            self.refusals = 0;
            self.brownouts = 0;
        }
        let Ok(used) = self.ledger.used(now) else {
            return false;
        };
        let l = &self.def.limits;
        let capped = l.tokens.is_some() || l.cost_micros.is_some();
        if capped && self.valid_until.is_none_or(|v| Instant::now() >= v) {
            return false;
        }
        l.tokens
            .is_none_or(|_| used.tokens + want.tokens <= self.lease.tokens)
            && l.cost_micros
                .is_none_or(|_| used.micros + want.micros <= self.lease.micros)
    }

    fn ask(&mut self, now: Timestamp, want: Amount) -> Option<Ask> {
        let w = self.ledger.window(now).ok()?;
        let used = self.ledger.used(now).ok()?;
        Some(Ask {
            budget: self.def.reference(),
            window_start_ms: w.start.as_millisecond(),
            window_end_ms: w.end.as_millisecond(),
            cap_tokens: self.def.limits.tokens,
            cap_micros: self.def.limits.cost_micros,
            used,
            reserved: self.ledger.reserved(),
            want,
            refusals: self.refusals,
            brownouts: self.brownouts,
        })
    }
}

enum Step {
    Taken(Vec<Reservation>),
    Refused(Box<Refusal>),
    Short,
}

/// The authority.
#[derive(Debug)]
pub struct ClusterAuthority {
    chain: Mutex<ChainState<Local>>,
    terms: Terms,
    pool: PgPool,
    topup: tokio::sync::Mutex<()>,
    migrated: tokio::sync::OnceCell<()>,
    /// Lease transactions (top-ups and heartbeats), by outcome.
    transactions: LeaseTransactions,
    /// The last refused top-up: for a second, a request needing more than it left is refused
    /// without asking again (an exhausted Budget would otherwise cost a round trip per request).
    last_short: Mutex<Option<(std::time::Instant, Shortfall)>>,
    /// When a top-up last failed to reach PostgreSQL: for a second, requests that need a
    /// top-up are refused at once instead of each waiting for the connection timeout.
    last_failure: Mutex<Option<Instant>>,
}

/// How long a refused top-up answers for the cluster.
const SHORT_MEMORY: Duration = Duration::from_secs(1);

impl ClusterAuthority {
    /// Enforces `plan`. `terms.holder` names this replica's leases and must stay the same
    /// across restarts on the same outbox (a restarted replica takes its lease back).
    pub fn new(plan: &Plan, pool: PgPool, terms: Terms) -> Result<ClusterAuthority, ChainError> {
        let mut chain = ChainState::default();
        chain.apply(plan)?;
        Ok(ClusterAuthority {
            chain: Mutex::new(chain),
            terms,
            pool,
            topup: tokio::sync::Mutex::new(()),
            migrated: tokio::sync::OnceCell::new(),
            transactions: LeaseTransactions::default(),
            last_short: Mutex::new(None),
            last_failure: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ChainState<Local>> {
        // Each method finishes its arithmetic before returning: a poisoned map is still sound.
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a new plan while running (a Budget edited in the cluster). A lowered cap stops
    /// this replica spending its old slice at once; [`Self::heartbeat`] then gives it back.
    pub fn apply(&self, plan: &Plan) -> Result<Applied, ChainError> {
        let applied = self.lock().apply(plan)?;
        if applied.changed {
            *self
                .last_short
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
        Ok(applied)
    }

    /// The chain as recorded in the outbox.
    pub fn chain_label(&self) -> String {
        self.lock().label()
    }

    /// Whether any Budget applies.
    pub fn is_budgeted(&self) -> bool {
        let c = self.lock();
        !c.refs.is_empty() || c.problem.is_some()
    }

    /// This replica's lease holder name.
    pub fn holder(&self) -> &str {
        &self.terms.holder
    }

    /// Top-ups so far (database round trips on the request path): (granted, refused).
    pub fn top_ups(&self) -> (u64, u64) {
        let t = &self.transactions;
        (t.get("top_up", "granted"), t.get("top_up", "refused"))
    }

    /// The transaction counters, for `/metrics`.
    pub fn transactions(&self) -> &LeaseTransactions {
        &self.transactions
    }

    /// A Budget's definition as configured.
    pub fn def(&self, key: &BudgetKey) -> Option<BudgetDef> {
        self.lock().states.get(key).map(|l| l.def.clone())
    }

    /// Counts a request `key` refused (`brown_out`: sent to the cheaper model instead), for
    /// the next report.
    pub fn count_refusal(&self, key: &BudgetKey, brown_out: bool) {
        if let Some(l) = self.lock().states.get_mut(key) {
            if brown_out {
                l.brownouts += 1;
            } else {
                l.refusals += 1;
            }
            l.touched = true;
        }
    }

    fn try_local(&self, now: Timestamp, want: Amount) -> Step {
        self.take(&mut self.lock(), now, want)
    }

    /// [`Self::try_local`] on a chain the caller has locked.
    fn take(&self, c: &mut ChainState<Local>, now: Timestamp, want: Amount) -> Step {
        self.reserve_in(c, now, want, true)
    }

    /// Reserves `want` on every Budget of the chain, or on none; with `covered`, only if the
    /// leases cover it (the fast path), else beyond them (a top-up then covers it).
    fn reserve_in(
        &self,
        c: &mut ChainState<Local>,
        now: Timestamp,
        want: Amount,
        covered: bool,
    ) -> Step {
        let keys: Vec<BudgetKey> = c.refs.iter().map(|r| r.key.clone()).collect();
        if covered {
            for key in &keys {
                if !c.states.get_mut(key).is_some_and(|l| l.covers(now, want)) {
                    return Step::Short;
                }
            }
        }
        let mut taken: Vec<Reservation> = Vec::with_capacity(keys.len());
        for key in &keys {
            let Some(l) = c.states.get_mut(key) else {
                return Step::Short;
            };
            match l.ledger.reserve(now, want) {
                Ok(r) => {
                    l.touched = true;
                    taken.push(r);
                }
                Err(refusal) => {
                    for r in taken {
                        if let Some(l) = c.states.get_mut(&r.budget) {
                            l.ledger.release(now, r);
                        }
                    }
                    return Step::Refused(refusal);
                }
            }
        }
        Step::Taken(taken)
    }

    async fn migrate(&self) -> Result<(), String> {
        self.migrated
            .get_or_try_init(|| async {
                crate::ledger::MIGRATOR
                    .run(&self.pool)
                    .await
                    .map_err(|e| format!("budget authority migrations failed: {e}"))
            })
            .await
            .map(|_| ())
    }

    /// Records whether PostgreSQL was just unreachable.
    fn failed(&self, now: bool) {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = now.then(Instant::now);
    }

    /// Takes the leases PostgreSQL granted in a transaction started at `started`.
    fn land(&self, grants: &[Grant], started: Instant) {
        self.land_in(&mut self.lock(), grants, started);
    }

    /// [`Self::land`] on a chain the caller has locked. A grant for another incarnation of a
    /// Budget (recreated meanwhile) is not taken.
    fn land_in(&self, c: &mut ChainState<Local>, grants: &[Grant], started: Instant) {
        let valid_until = started + self.terms.ttl - self.terms.ttl / 10;
        for g in grants {
            if let Some(l) = c.states.get_mut(&g.budget.key)
                && l.def.uid == g.budget.uid
            {
                if l.window.map(|w| w.start.as_millisecond()) == Some(g.window_start_ms) {
                    l.lease = g.lease;
                    l.valid_until = Some(valid_until);
                }
                l.share_rates(g.live);
            }
        }
    }

    fn refusal(&self, s: Shortfall) -> Refusal {
        let currency = self
            .def(&s.budget.key)
            .map_or_else(|| "USD".to_owned(), |d| d.currency);
        Refusal {
            budget: s.budget.key,
            currency,
            limit: if s.micros {
                LimitKind::CostMicros
            } else {
                LimitKind::Tokens
            },
            cap: s.cap,
            used: s.cap.saturating_sub(s.remaining),
            requested: s.need,
            remaining: s.remaining,
            resets_at: Timestamp::from_millisecond(s.window_end_ms).unwrap_or(Timestamp::MAX),
        }
    }

    /// A refusal from the last refused top-up, if it is recent and `want` needs more than it
    /// left.
    fn remembered_refusal(&self, want: Amount) -> Option<Refusal> {
        let last = self
            .last_short
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (at, short) = last?;
        let need = if short.micros {
            want.micros
        } else {
            want.tokens
        };
        if at.elapsed() > SHORT_MEMORY || need <= short.remaining {
            return None;
        }
        let mut r = self.refusal(short);
        r.requested = need;
        Some(r)
    }

    /// Reserves `want` on every Budget of the chain, or on none: from the local leases when
    /// they cover it, else after a top-up from PostgreSQL.
    pub async fn reserve(&self, now: Timestamp, want: Amount) -> Reserve {
        if let Some(reason) = self.lock().undefined() {
            return Reserve::Undefined(reason);
        }
        match self.try_local(now, want) {
            Step::Taken(r) => return Reserve::Taken(r),
            Step::Refused(r) => return Reserve::Refused(r),
            Step::Short => {}
        }
        if let Some(r) = self.remembered_refusal(want) {
            return Reserve::Refused(Box::new(r));
        }
        // Boxed: the top-up's PostgreSQL futures are kilobytes, and inline they would make
        // every request's future (moved onto the heap when its task is spawned) that large.
        Box::pin(self.top_up(now, want)).await
    }

    /// The slow path of [`ClusterAuthority::reserve`]: the local leases do not cover `want`,
    /// so a top-up is asked of PostgreSQL (one at a time).
    async fn top_up(&self, now: Timestamp, want: Amount) -> Reserve {
        let unreachable = || {
            Reserve::Unavailable(
                "the cluster budget authority (PostgreSQL) is unreachable and this replica's \
                 budget slice does not cover the request"
                    .into(),
            )
        };
        let failed_recently = |m: &Mutex<Option<Instant>>| {
            m.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|at| at.elapsed() < SHORT_MEMORY)
        };
        if failed_recently(&self.last_failure) {
            return unreachable();
        }
        let _one_at_a_time = self.topup.lock().await;
        if failed_recently(&self.last_failure) {
            return unreachable();
        }
        // A top-up for an earlier request may have brought enough for this one too.
        match self.try_local(now, want) {
            Step::Taken(r) => return Reserve::Taken(r),
            Step::Refused(r) => return Reserve::Refused(r),
            Step::Short => {}
        }
        if let Err(e) = self.migrate().await {
            tracing::warn!(error = %e, "budget authority migrations failed; refusing (fail closed)");
            self.failed(true);
            return unreachable();
        }
        // Reserve first, then ask PostgreSQL to cover the reservation: while the transaction
        // runs, this replica's fast-path requests count this request's share as used and
        // cannot spend it, so what the top-up brings is this request's.
        let (held, asks) = {
            let mut c = self.lock();
            let keys: Vec<BudgetKey> = c.refs.iter().map(|r| r.key.clone()).collect();
            let asks: Vec<Ask> = keys
                .iter()
                .filter_map(|k| c.states.get_mut(k).and_then(|l| l.ask(now, want)))
                .collect();
            match self.reserve_in(&mut c, now, want, false) {
                Step::Taken(held) => (held, asks),
                Step::Refused(r) => return Reserve::Refused(r),
                Step::Short => return unreachable(),
            }
        };
        let started = Instant::now();
        match lease::acquire(&self.pool, &self.terms, &asks).await {
            Ok(Ok(grants)) => {
                self.failed(false);
                self.transactions.count("top_up", "granted");
                self.land(&grants, started);
                Reserve::Taken(held)
            }
            Ok(Err(short)) => {
                self.release(now, held);
                self.transactions.count("top_up", "refused");
                *self
                    .last_short
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some((std::time::Instant::now(), short.clone()));
                Reserve::Refused(Box::new(self.refusal(short)))
            }
            Err(e) => {
                self.release(now, held);
                tracing::warn!(error = %e, "budget lease failed; refusing (fail closed)");
                self.transactions.count("top_up", "failed");
                self.failed(true);
                unreachable()
            }
        }
    }

    /// Settles each reservation with `actual` (local only; the lease learns at the next report).
    pub fn settle(&self, now: Timestamp, reservations: Vec<Reservation>, actual: Amount) {
        let mut c = self.lock();
        for r in reservations {
            if let Some(l) = c.states.get_mut(&r.budget) {
                l.ledger.settle(now, r, actual);
            }
        }
    }

    /// Releases each reservation.
    pub fn release(&self, now: Timestamp, reservations: Vec<Reservation>) {
        let mut c = self.lock();
        for r in reservations {
            if let Some(l) = c.states.get_mut(&r.budget) {
                l.ledger.release(now, r);
            }
        }
    }

    /// The earliest instant whose spend still counts.
    pub fn replay_since(&self, now: Timestamp) -> Timestamp {
        let mut c = self.lock();
        c.states
            .values_mut()
            .filter_map(|l| l.ledger.window(now).ok())
            .map(|w| w.start - jiff::SignedDuration::from_secs(60))
            .min()
            .unwrap_or(now)
    }

    /// Replays this replica's settled spend from its outbox into the Budgets of `only` (all,
    /// when `None`). Its lease is taken back from PostgreSQL at the first top-up, reporting
    /// this spend.
    pub fn replay(&self, rows: &[PastSpend], only: Option<&[soma_metering::BudgetRef]>) {
        let mut c = self.lock();
        for row in rows {
            for l in c.charged_by(&row.budgets) {
                if only.is_none_or(|o| o.contains(&l.def.reference())) {
                    l.ledger.record(row.at, row.amount);
                }
            }
        }
    }

    /// What this replica may still spend under `costMicros` without asking (for metrics).
    pub fn remaining_micros(&self, now: Timestamp) -> Vec<(BudgetKey, Option<u64>)> {
        let mut c = self.lock();
        let keys: Vec<BudgetKey> = c.refs.iter().map(|r| r.key.clone()).collect();
        keys.into_iter()
            .filter_map(|k| {
                let l = c.states.get_mut(&k)?;
                l.def.limits.cost_micros?;
                let used = l.ledger.used(now).ok()?;
                Some((k, Some(l.lease.micros.saturating_sub(used.micros))))
            })
            .collect()
    }

    /// Reports usage and renews every lease held in the current window. With `give_back`, or
    /// when no reservation was taken since the last heartbeat, also gives the unused rest of
    /// every lease back.
    ///
    /// It runs under the top-up lock, so it never interleaves with a top-up. Before giving
    /// back, the local leases are cut to the usage being reported: a request arriving while
    /// the report is in flight then waits for a top-up instead of spending a slice that
    /// PostgreSQL is about to take back.
    pub async fn heartbeat(&self, give_back: bool) -> Result<(), sqlx::Error> {
        let _one_at_a_time = self.topup.lock().await;
        let now = Timestamp::now();
        let (asks, give) = {
            let mut c = self.lock();
            let mut held: Vec<&mut Local> = Vec::new();
            let mut idle = true;
            for l in c.states.values_mut() {
                let current = l.ledger.window(now).ok().map(|w| w.start);
                if l.window.is_none() || l.window.map(|w| w.start) != current {
                    continue;
                }
                idle &= !l.touched;
                l.touched = false;
                held.push(l);
            }
            let give = give_back || idle;
            let mut asks = Vec::with_capacity(held.len());
            for l in held {
                let Some(a) = l.ask(now, Amount::default()) else {
                    continue;
                };
                if give {
                    l.lease.tokens = l.lease.tokens.min(a.used.tokens);
                    l.lease.micros = l.lease.micros.min(a.used.micros);
                }
                asks.push(a);
            }
            (asks, give)
        };
        if asks.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let grants = lease::report(&self.pool, &self.terms, &asks, give)
            .await
            .inspect_err(|_| self.transactions.count("heartbeat", "failed"))?;
        self.transactions.count("heartbeat", "ok");
        self.failed(false);
        self.land(&grants, started);
        Ok(())
    }

    /// Heartbeats every `ttl / 3` until `stop`, then gives every unused slice back.
    pub async fn run(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let every = self.terms.ttl / 3;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.heartbeat(false).await {
                tracing::warn!(error = %e, "budget lease heartbeat failed");
            }
        }
        if let Err(e) = self.heartbeat(true).await {
            tracing::warn!(error = %e, "could not give budget slices back at shutdown; they expire");
        }
    }
}
