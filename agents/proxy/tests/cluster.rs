//! The cluster budget authority: several sidecars sharing one Budget chain through a real
//! PostgreSQL 15, usage delivered to the ledger and to a real nats-server with JetStream, all
//! started by this harness on 127.0.0.1. Skips, saying so, when either is not installed
//! (`scripts/test-deps/servers.sh` installs both).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use soma_proxy::budgets::Budgets;
use soma_proxy::fake_upstream::FakeUpstream;
use soma_proxy::outbox::Sink;
use support::fleet::*;
use support::nats::Nats;
use support::pg::Pg;
use support::*;

const REPLICAS: usize = 3;
const CLIENTS: usize = 64;
const REQUESTS: usize = 10_000;
/// Exhausted partway: the requests below cost about twice this.
const CAP_MICROS: u64 = 8_000_000;
const TENANT_TOKENS: u64 = 100_000_000;

#[derive(Default)]
struct Seen {
    ok: u64,
    refused: u64,
    cost: u64,
    by_budget: std::collections::BTreeMap<String, u64>,
}

async fn wait_drained(replicas: &[soma_proxy::Running]) {
    for r in replicas {
        for sink in [Sink::Ledger, Sink::Events] {
            let mut left = u64::MAX;
            for _ in 0..1200 {
                left = r.state.outbox.pending_delivery(sink).await.unwrap();
                if left == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(left, 0, "{sink:?} never drained");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_sharing_a_budget_never_overspend_and_the_ledger_matches_the_clients() {
    let Some(pg) = Pg::start() else { return };
    let Some(nats) = Nats::start() else { return };
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let chain = budgets(CAP_MICROS, TENANT_TOKENS);
    let mut dirs = Vec::new();
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let dir = tempfile::tempdir().unwrap();
        let extra = replica_config(&pg.url(), &nats.url(), &chain, 30_000);
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

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let urls = urls.clone();
        clients.push(tokio::spawn(async move {
            let http = http();
            let mut seen = Seen::default();
            let mut i = c;
            while i < REQUESTS {
                let mut rng = Rng::new(0x5eed_0000 + i as u64);
                let body = request(&mut rng, c % 2 == 0);
                let auth = format!("Bearer {TOKEN}");
                let r = send(
                    &http,
                    "POST",
                    &urls[i % REPLICAS],
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    body.to_string(),
                )
                .await;
                match r.status.as_u16() {
                    200 => {
                        seen.ok += 1;
                        seen.cost += observed_cost(&r);
                    }
                    429 => {
                        seen.refused += 1;
                        let b = r.json();
                        assert_eq!(b["error"]["code"], "budget_exceeded", "{b}");
                        let budget = b["soma_budget"]["budget"].as_str().unwrap().to_owned();
                        assert!(b["error"]["message"].as_str().unwrap().contains(&budget));
                        *seen.by_budget.entry(budget).or_default() += 1;
                    }
                    s => panic!("unexpected {s}: {}", r.text()),
                }
                i += CLIENTS;
            }
            seen
        }));
    }
    let mut seen = Seen::default();
    for c in clients {
        let s = c.await.unwrap();
        seen.ok += s.ok;
        seen.refused += s.refused;
        seen.cost += s.cost;
        for (b, n) in s.by_budget {
            *seen.by_budget.entry(b).or_default() += n;
        }
    }
    assert_eq!(seen.ok + seen.refused, REQUESTS as u64);
    assert!(seen.refused > 0, "the cap was never reached");
    assert!(seen.ok > 0);
    assert!(seen.by_budget.contains_key("team"), "{:?}", seen.by_budget);

    wait_drained(&replicas).await;
    let pool = pg.pool().await;
    let (rows, distinct, settled, tokens) = ledger(&pool).await;
    // Zero overspend, on both Budgets of the chain.
    assert!(
        settled as u64 <= CAP_MICROS,
        "settled {settled} > cap {CAP_MICROS}"
    );
    assert!(tokens as u64 <= TENANT_TOKENS);
    for (budget, cap_t, cap_m, granted_t, granted_m) in windows(&pool).await {
        assert!(
            cap_t.is_none_or(|c| granted_t <= c),
            "{budget}: {granted_t} > {cap_t:?}"
        );
        assert!(
            cap_m.is_none_or(|c| granted_m <= c),
            "{budget}: {granted_m} > {cap_m:?}"
        );
    }
    // The ledger is exactly what the clients saw: one row per answered request, by id.
    assert_eq!((rows, distinct), (seen.ok as i64, seen.ok as i64));
    assert_eq!(settled as u64, seen.cost);
    let mut outbox_ids = BTreeSet::new();
    for r in &replicas {
        for row in r.state.outbox.rows().await.unwrap() {
            assert_eq!(row["state"], "settled");
            outbox_ids.insert(row["id"].as_str().unwrap().to_owned());
        }
    }
    let ledger_ids: BTreeSet<String> = sqlx::query_scalar("SELECT id FROM usage_records")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ledger_ids, outbox_ids);
    // The per-minute rollup equals the per-request rows.
    assert_eq!(rollup(&pool).await, (rows, settled, tokens));
    // JetStream holds one message per request.
    nats.wait_for(seen.ok).await;

    let mut trips = (0, 0);
    for r in &replicas {
        if let Budgets::Cluster(c) = &r.state.authority {
            let (g, f) = c.top_ups();
            trips = (trips.0 + g, trips.1 + f);
        }
    }
    // The common case stays off the database: far fewer top-ups than answered requests.
    assert!(
        trips.0 * 5 < seen.ok,
        "top-ups {trips:?} for {} requests",
        seen.ok
    );
    println!(
        "cluster: replicas={REPLICAS} clients={CLIENTS} requests={REQUESTS} ok={} refused={} \
         refused_by={:?} cap_micros={CAP_MICROS} settled_micros={settled} client_micros={} \
         top_ups_granted={} top_ups_refused={}",
        seen.ok, seen.refused, seen.by_budget, seen.cost, trips.0, trips.1
    );
    for r in replicas {
        r.stop().await;
    }
    // Shutdown gave every unused slice back: granted equals what was used.
    let (_, _, settled_after, _) = ledger(&pool).await;
    let team = windows(&pool)
        .await
        .into_iter()
        .find(|w| w.0 == "team")
        .unwrap();
    assert_eq!(
        team.4, settled_after,
        "team window after shutdown: {team:?}"
    );
}
