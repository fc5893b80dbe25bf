//! Live Budget edits: a running sidecar takes a changed cap without a restart.
//!
//! - Three replicas sharing a Budget through a real PostgreSQL, under 64 concurrent clients:
//!   the operator's live definition (`soma_budgets`, the row the Budget controller writes) is
//!   lowered mid-run; every replica takes it from the ledger's notification, refuses what no
//!   longer fits, and the ledger's total never passes the new cap.
//! - One sidecar without a ledger follows its configuration file (a ConfigMap volume).
//! - A brown-out the operator's scaling loop publishes in the ledger (`soma_agent_live`)
//!   reaches two running sidecars of the Agent by notification: low-priority requests get the
//!   brown-out 503, high-priority ones never; an older revision does not bring it back once
//!   cleared, and clearing it restores service, without a restart.
//!
//! Servers are started by the harness on 127.0.0.1 (`scripts/test-deps/servers.sh` installs
//! them); a missing one fails the test.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use soma_metering::BudgetDef;
use soma_proxy::fake_upstream::FakeUpstream;
use soma_proxy::outbox::Sink;
use support::fleet::{Rng, observed_cost, request};
use support::pg::Pg;
use support::*;

const REPLICAS: usize = 3;
const CLIENTS: usize = 64;
const REQUESTS: u64 = 10_000;
/// Far above what the run can spend: only the lowered cap can refuse.
const FIRST_CAP: u64 = 400_000_000;
/// The lowered cap, well below what the run asks for.
const LOWERED_CAP: u64 = 6_000_000;
/// The edit happens once this many requests have been answered.
const EDIT_AFTER: u64 = 1_500;

fn definition(cap: u64, generation: i64) -> BudgetDef {
    serde_json::from_value(json!({
        "namespace": "research", "name": "team", "uid": "uid-team", "generation": generation,
        "limits": {"costMicros": cap}, "period": {"calendar": "month"}
    }))
    .unwrap()
}

async fn wait_drained(replicas: &[soma_proxy::Running]) {
    for r in replicas {
        let mut left = u64::MAX;
        for _ in 0..1200 {
            left = r.state.outbox.pending_delivery(Sink::Ledger).await.unwrap();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(left, 0, "ledger delivery never drained");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lowered_cap_reaches_running_replicas_under_load_without_overspend() {
    let pg = Pg::start();
    let pool = pg.pool().await;
    soma_ledger::MIGRATOR.run(&pool).await.unwrap();
    // What the operator's Budget controller publishes.
    assert!(
        soma_ledger::live::upsert_budget(&pool, &definition(FIRST_CAP, 1))
            .await
            .unwrap()
    );
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let mut dirs = Vec::new();
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let dir = tempfile::tempdir().unwrap();
        let extra = json!({
            "databaseUrl": pg.url(),
            "deliveryIntervalMs": 50,
            "authority": {"postgres": {"leaseTtlMs": 30_000}},
            "budget": "team",
            "budgets": [definition(FIRST_CAP, 1)],
            "live": {"fileCheckMs": 0, "ledgerPollMs": 1_000},
        });
        let config = config_json(&upstream.url(), "openai", dir.path(), extra);
        replicas.push(start_proxy(&config).await);
        dirs.push(dir);
    }
    let urls: Arc<Vec<String>> = Arc::new(
        replicas
            .iter()
            .map(|r| format!("http://{}/v1/chat/completions", r.proxy_addr))
            .collect(),
    );
    let answered = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let edited_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (urls, answered, next) = (urls.clone(), answered.clone(), next.clone());
        let edited_at = edited_at.clone();
        clients.push(tokio::spawn(async move {
            let http = http();
            // (ok, refused, cost seen by clients, refusals naming the lowered cap, first of them)
            let mut out = (0u64, 0u64, 0u64, 0u64, None::<Duration>);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= REQUESTS {
                    return out;
                }
                let mut rng = Rng::new(0x11fe_0000 + i);
                let body = request(&mut rng, c % 2 == 0);
                let auth = format!("Bearer {TOKEN}");
                let r = send(
                    &http,
                    "POST",
                    &urls[i as usize % REPLICAS],
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    body.to_string(),
                )
                .await;
                answered.fetch_add(1, Ordering::Relaxed);
                match r.status.as_u16() {
                    200 => {
                        out.0 += 1;
                        out.2 += observed_cost(&r);
                    }
                    429 => {
                        out.1 += 1;
                        let b = &r.json()["soma_budget"];
                        assert_eq!(b["budget"], "research/team", "{}", r.text());
                        if b["cap"] == LOWERED_CAP {
                            out.3 += 1;
                            if out.4.is_none()
                                && let Some(t) = *edited_at.lock().unwrap()
                            {
                                out.4 = Some(t.elapsed());
                            }
                        }
                    }
                    s => panic!("unexpected {s}: {}", r.text()),
                }
            }
        }));
    }
    // Mid-run, the Budget is edited: its cap drops far below what the clients still ask for.
    while answered.load(Ordering::Relaxed) < EDIT_AFTER {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        soma_ledger::live::upsert_budget(&pool, &definition(LOWERED_CAP, 2))
            .await
            .unwrap()
    );
    let edit = Instant::now();
    *edited_at.lock().unwrap() = Some(edit);
    // How long until every replica enforces the new cap.
    let key = soma_metering::BudgetKey::new("research", "team");
    let mut taken = [None; REPLICAS];
    while taken.iter().any(Option::is_none) {
        for (i, r) in replicas.iter().enumerate() {
            if taken[i].is_none()
                && r.state
                    .authority
                    .def(&key)
                    .and_then(|d| d.limits.cost_micros)
                    == Some(LOWERED_CAP)
            {
                taken[i] = Some(edit.elapsed());
            }
        }
        assert!(
            edit.elapsed() < Duration::from_secs(10),
            "not every replica took the edit: {taken:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let propagation = taken.iter().flatten().max().copied().unwrap_or_default();
    let (mut ok, mut refused, mut cost, mut new_cap_refusals) = (0, 0, 0, 0);
    let mut first_refusal: Option<Duration> = None;
    for c in clients {
        let (o, r, co, n, f) = c.await.unwrap();
        (ok, refused, cost, new_cap_refusals) =
            (ok + o, refused + r, cost + co, new_cap_refusals + n);
        first_refusal = match (first_refusal, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    assert_eq!(ok + refused, REQUESTS);
    assert!(
        new_cap_refusals > 0,
        "no request was refused by the lowered cap ({ok} ok, {refused} refused, {cost} spent): {}",
        replicas[0].state.metrics.encode().unwrap()
    );
    // Every replica took the edit live, from the ledger, without a restart.
    for r in &replicas {
        let metrics = r.state.metrics.encode().unwrap();
        assert!(
            metrics
                .contains("soma_proxy_live_updates_total{source=\"ledger\",outcome=\"applied\"}"),
            "{metrics}"
        );
    }
    wait_drained(&replicas).await;
    let (records, spent): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(cost_micros), 0)::BIGINT FROM usage_records
          WHERE 'research/team@uid-team' = ANY (string_to_array(budgets, ','))",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let granted: i64 = sqlx::query_scalar(
        "SELECT granted_micros FROM budget_windows WHERE budget = 'research/team' AND budget_uid = 'uid-team'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!(
        "live edit: every replica enforced it {propagation:?} after it was written; {ok} ok, {refused} refused ({new_cap_refusals} by the lowered cap, the first {first_refusal:?} after the edit); \
         ledger: {records} records, {spent} micros spent under a lowered cap of {LOWERED_CAP}; granted {granted}; clients saw {cost}"
    );
    assert_eq!(
        records as u64, ok,
        "every answered request is in the ledger once"
    );
    assert_eq!(
        spent as u64, cost,
        "the ledger matches what the clients were told"
    );
    assert!(
        spent as u64 <= LOWERED_CAP,
        "overspend after the live edit: {spent} > {LOWERED_CAP}"
    );
    for r in replicas {
        r.stop().await;
    }
    drop(dirs);
}

#[tokio::test]
async fn without_a_ledger_a_sidecar_follows_its_configuration_file() {
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let write = |cap: u64, generation: i64| {
        let mut def = definition(cap, generation);
        def.limits.cost_micros = None;
        def.limits.tokens = Some(cap);
        let config = config_json(
            &upstream.url(),
            "openai",
            dir.path(),
            json!({"budget": "team", "budgets": [def], "live": {"fileCheckMs": 100}}),
        );
        std::fs::write(&path, config.to_string()).unwrap();
        config
    };
    let config = write(100_000, 1);
    let proxy = soma_proxy::start(
        soma_proxy::Config::parse(&config.to_string()).unwrap(),
        TOKEN.to_owned(),
        Some(path.clone()),
    )
    .await
    .unwrap();
    let url = format!("http://{}/v1/chat/completions", proxy.proxy_addr);
    let body = json!({"model": "gpt-4o", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hello there"}]});
    let post = || async {
        let auth = format!("Bearer {TOKEN}");
        send(
            &http(),
            "POST",
            &url,
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await
    };
    assert_eq!(post().await.status, 200);
    // The kubelet refreshes the ConfigMap volume: the cap is now below what was spent.
    write(10, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal: Value = loop {
        let r = post().await;
        if r.status == 429 {
            break r.json();
        }
        assert!(Instant::now() < deadline, "the edited file was never taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refusal["soma_budget"]["cap"], 10, "{refusal}");
    assert_eq!(refusal["soma_budget"]["limit"], "tokens");
    // Spend survived the edit: what was used before still counts.
    assert!(refusal["soma_budget"]["used"].as_u64().unwrap() > 10);
    // A broken edit changes nothing: the sidecar keeps the last good Budgets.
    std::fs::write(&path, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(post().await.status, 429);
    let metrics = proxy.state.metrics.encode().unwrap();
    assert!(
        metrics.contains("soma_proxy_live_updates_total{source=\"file\",outcome=\"refused\"} 1"),
        "{metrics}"
    );
    proxy.stop().await;
}

fn brown_out(fraction: f64) -> soma_contract::load::BrownOut {
    soma_contract::load::BrownOut {
        fraction,
        action: soma_contract::load::BrownOutAction::Shed,
        model: None,
        message: "P95 wait ≤ 0.5s at 9.00 req/s needs 6 replicas, but maxReplicas is 2".into(),
    }
}

async fn post_priority(url: &str, priority: &str) -> support::Reply {
    let auth = format!("Bearer {TOKEN}");
    let body = json!({"model": "gpt-4o", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hello there"}]});
    send(
        &http(),
        "POST",
        url,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("x-soma-priority", priority),
        ],
        body.to_string(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brown_out_published_in_the_ledger_reaches_running_sidecars_and_clears() {
    let pg = Pg::start();
    let pool = pg.pool().await;
    soma_ledger::MIGRATOR.run(&pool).await.unwrap();
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let mut dirs = Vec::new();
    let mut sidecars = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        // No Budget, no file checks, and a poll far beyond the test: only the notification
        // can deliver the brown-out in time.
        let extra =
            json!({"databaseUrl": pg.url(), "live": {"fileCheckMs": 0, "ledgerPollMs": 600_000}});
        sidecars
            .push(start_proxy(&config_json(&upstream.url(), "openai", dir.path(), extra)).await);
        dirs.push(dir);
    }
    // Another Agent's brown-out, in the same ledger: not this Agent's sidecars' business.
    let other = soma_ledger::live::AgentLive {
        revision: 5,
        brown_out: Some(brown_out(1.0)),
    };
    assert!(
        soma_ledger::live::publish_agent(&pool, "other-team", "assistant", &other)
            .await
            .unwrap()
    );
    let urls: Vec<String> = sidecars
        .iter()
        .map(|s| format!("http://{}/v1/chat/completions", s.proxy_addr))
        .collect();
    // No wait for the listeners: one that connects after the write below reads the row once
    // connected, one already listening is notified.
    for url in &urls {
        assert_eq!(post_priority(url, "low").await.status, 200);
    }

    // The scaling loop engages: shed half the traffic, lowest priority first.
    let engaged = soma_ledger::live::AgentLive {
        revision: 1_000,
        brown_out: Some(brown_out(0.5)),
    };
    assert!(
        soma_ledger::live::publish_agent(&pool, "research", "assistant", &engaged)
            .await
            .unwrap()
    );
    let written = Instant::now();
    let mut taken = [None; 2];
    while taken.iter().any(Option::is_none) {
        for (i, s) in sidecars.iter().enumerate() {
            if taken[i].is_none() && s.state.brown_out.spec().is_some() {
                taken[i] = Some(written.elapsed());
            }
        }
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "not every sidecar took the brown-out: {taken:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!(
        "brown-out from the ledger in force on both sidecars after {:?}",
        taken.iter().flatten().max().unwrap()
    );
    assert_eq!(sidecars[0].state.brown_out.spec(), Some(brown_out(0.5)));
    // All traffic so far is low: half of it is shed (error diffusion: exactly, give or take
    // one per sidecar), in the client's wire format with the autoscaler's reason.
    let mut low_shed = 0;
    for i in 0..40 {
        let low = post_priority(&urls[i % 2], "low").await;
        if low.status == 503 {
            low_shed += 1;
            let e = low.json();
            assert_eq!(e["error"]["code"], "brown_out", "{e}");
            assert!(
                e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("maxReplicas is 2"),
                "{e}"
            );
        } else {
            assert_eq!(low.status, 200, "{}", low.text());
        }
    }
    assert!(
        (18..=22).contains(&low_shed),
        "{low_shed} of 40 low requests shed at fraction 0.5"
    );
    // High priority is never shed.
    for i in 0..20 {
        assert_eq!(post_priority(&urls[i % 2], "high").await.status, 200);
    }

    // An older decision (a deposed leader) changes neither the row nor the sidecars.
    let stale = soma_ledger::live::AgentLive {
        revision: 999,
        brown_out: None,
    };
    assert!(
        !soma_ledger::live::publish_agent(&pool, "research", "assistant", &stale)
            .await
            .unwrap()
    );
    // A brown-out the sidecars could not enforce is refused before any write.
    let bad = soma_ledger::live::AgentLive {
        revision: 1_001,
        brown_out: Some(soma_contract::load::BrownOut {
            fraction: 1.5,
            ..brown_out(0.5)
        }),
    };
    assert!(
        soma_ledger::live::publish_agent(&pool, "research", "assistant", &bad)
            .await
            .is_err()
    );
    let row = soma_ledger::live::agent_live(&pool, "research", "assistant")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row, engaged);

    // The load falls: the loop clears it, and service is restored without a restart.
    let cleared = soma_ledger::live::AgentLive {
        revision: 2_000,
        brown_out: None,
    };
    assert!(
        soma_ledger::live::publish_agent(&pool, "research", "assistant", &cleared)
            .await
            .unwrap()
    );
    let written = Instant::now();
    while sidecars.iter().any(|s| s.state.brown_out.spec().is_some()) {
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "the cleared brown-out was never taken"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!("cleared on both sidecars after {:?}", written.elapsed());
    for i in 0..20 {
        assert_eq!(post_priority(&urls[i % 2], "low").await.status, 200);
    }
    for s in &sidecars {
        let metrics = s.state.metrics.encode().unwrap();
        assert!(
            metrics
                .contains("soma_proxy_live_updates_total{source=\"ledger\",outcome=\"applied\"} 2"),
            "engaged and cleared, from the ledger: {metrics}"
        );
    }
    for s in sidecars {
        s.stop().await;
    }
    drop(dirs);
}
