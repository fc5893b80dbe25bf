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
    let pg = Pg::start();
    let nats = Nats::start();
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
    assert!(
        seen.by_budget.contains_key("research/team"),
        "{:?}",
        seen.by_budget
    );

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
            // `/metrics` reports the same top-ups.
            let text = r.state.metrics.encode().unwrap();
            for (outcome, n) in [("granted", g), ("refused", f)] {
                let line = format!(
                    "soma_proxy_budget_lease_transactions_total{{kind=\"top_up\",outcome=\"{outcome}\"}} {n}"
                );
                assert!(n == 0 || text.contains(&line), "{line} not in {text}");
            }
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
        .find(|w| w.0 == "research/team")
        .unwrap();
    assert_eq!(
        team.4, settled_after,
        "team window after shutdown: {team:?}"
    );
}

/// Sends one chat request to a sidecar at `addr`; returns the reply.
async fn chat(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    addr: &str,
    body: &serde_json::Value,
) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    send(
        client,
        "POST",
        &format!("http://{addr}/v1/chat/completions"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await
}

/// `n` requests of random sizes alternating between `addrs`; returns the cost the clients saw.
async fn traffic(addrs: &[&str], n: usize, seed: u64) -> u64 {
    let (cost, unavailable) = traffic_in_outage(addrs, n, seed, false).await;
    assert_eq!(unavailable, 0);
    cost
}

/// Like [`traffic`]; with `outage`, a 503 `budget_unavailable` (fail closed) is counted
/// instead of failing. Returns the cost the clients saw and the 503 count.
async fn traffic_in_outage(addrs: &[&str], n: usize, seed: u64, outage: bool) -> (u64, u64) {
    let client = http();
    let mut cost = 0;
    let mut unavailable = 0;
    for i in 0..n {
        let mut rng = Rng::new(seed + i as u64);
        let r = chat(
            &client,
            addrs[i % addrs.len()],
            &request(&mut rng, i % 2 == 0),
        )
        .await;
        if outage && r.status == 503 {
            assert_eq!(r.json()["error"]["code"], "budget_unavailable");
            unavailable += 1;
            continue;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        cost += observed_cost(&r);
    }
    (cost, unavailable)
}

/// Settled rows and their cost in an outbox file (opened beside the running binary).
async fn outbox_totals(path: &std::path::Path) -> (u64, u64, Vec<serde_json::Value>) {
    let outbox = soma_proxy::outbox::Outbox::open(path).await.unwrap();
    let t = outbox.totals().await.unwrap();
    let rows = outbox.rows().await.unwrap();
    outbox.close().await;
    assert_eq!(t.open, 0);
    (t.rows, t.micros, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_database_and_nats_outages_lose_nothing_and_double_count_nothing() {
    use http_body_util::BodyExt;
    use support::sidecar::{spawn, write_config};

    let mut pg = Pg::start();
    let mut nats = Nats::start();
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let cap = 50_000_000;
    let chain = budgets(cap, TENANT_TOKENS);
    let mut extra = replica_config(&pg.url(), &nats.url(), &chain, 3_000);
    extra["authority"]["postgres"]["reclaimAfterMs"] = serde_json::json!(1_000);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ca, cb) = (
        write_config(da.path(), &upstream.url(), "openai", extra.clone()),
        write_config(db.path(), &upstream.url(), "openai", extra),
    );
    let a = spawn(&ca, "info");
    let b = spawn(&cb, "info");
    let mut seen = traffic(&[&a.addr, &b.addr], 40, 1_000).await;

    // kill -9 A in the middle of a stream.
    let client = http();
    let req = hyper::Request::post(format!("http://{}/v1/chat/completions", a.addr))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            serde_json::json!({"model": "gpt-4o", "max_tokens": 200, "stream": true,
                "messages": [{"role": "user", "content": "SCENARIO:slow"}]})
            .to_string(),
        )))
        .unwrap();
    let mut body = client.request(req).await.unwrap().into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    a.kill();
    drop(body);

    // While A is down past its lease's TTL and the reclaim delay, B tops up with a request
    // its own slice cannot cover: A's unused slice is cut back to what A last reported.
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    let pool = pg.pool().await;
    let big = serde_json::json!({"model": "gpt-4o", "max_tokens": 1_500_000,
        "messages": [{"role": "user", "content": "top up"}]});
    let r = chat(&client, &b.addr, &big).await;
    assert_eq!(r.status, 200, "{}", r.text());
    seen += observed_cost(&r);
    let leases: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT holder, granted_micros, used_micros FROM budget_leases WHERE budget = 'research/team'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(leases.len(), 2, "{leases:?}");
    assert!(
        leases.iter().any(|(_, g, u)| g == u),
        "A's lease was not reclaimed: {leases:?}"
    );

    // A restarts on the same outbox: same holder, its interrupted stream settled at worst case.
    let a = spawn(&ca, "info");
    seen += traffic(&[&a.addr, &b.addr], 20, 2_000).await;

    // PostgreSQL and NATS go away. Requests the leased slices cover are still served and
    // recorded; one that needs a top-up is refused (fail closed), in the client's format.
    pool.close().await;
    pg.stop();
    nats.stop();
    // (A machine slow enough to pass the lease's TTL during these gets 503s instead.)
    let (cost, unavailable) = traffic_in_outage(&[&a.addr, &b.addr], 30, 3_000, true).await;
    assert!(
        unavailable < 30,
        "nothing was served from the leased slices"
    );
    seen += cost;
    let r = chat(&client, &a.addr, &big).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "budget_unavailable");
    // Past the lease TTL, a replica cut off from PostgreSQL stops using its slice.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let small = serde_json::json!({"model": "gpt-4o", "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}]});
    let r = chat(&client, &b.addr, &small).await;
    if r.status != 503 {
        let logs: Vec<String> = b.lines.try_iter().collect();
        panic!("{} {}\n{}", r.status, r.text(), logs.join("\n"));
    }

    // Both come back (same data folder, same JetStream store).
    pg.run();
    nats.run();
    let pool = pg.pool().await;
    // Each replica refuses top-ups for a second after PostgreSQL last failed it; then serves.
    for addr in [&a.addr, &b.addr] {
        let mut served = false;
        for _ in 0..100 {
            let r = chat(&client, addr, &small).await;
            if r.status == 200 {
                seen += observed_cost(&r);
                served = true;
                break;
            }
            assert_eq!(r.json()["error"]["code"], "budget_unavailable");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(served, "{addr} never served again");
    }
    seen += traffic(&[&a.addr, &b.addr], 10, 4_000).await;

    // Exact totals once the outboxes drain: every row once in the ledger, once in JetStream.
    let (mut rows, mut micros, mut interrupted) = (0, 0, 0);
    for dir in [&da, &db] {
        let path = dir.path().join("outbox.db");
        for _ in 0..600 {
            let o = soma_proxy::outbox::Outbox::open(&path).await.unwrap();
            let pending = o.pending_delivery(Sink::Ledger).await.unwrap()
                + o.pending_delivery(Sink::Events).await.unwrap();
            o.close().await;
            if pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (n, c, all) = outbox_totals(&path).await;
        rows += n;
        micros += c;
        for r in all.iter().filter(|r| r["outcome"] == "interrupted") {
            interrupted += r["cost_micros"].as_u64().unwrap();
        }
    }
    assert!(interrupted > 0, "the killed stream was not recorded");
    assert_eq!(micros, seen + interrupted);
    let (n, distinct, settled, tokens) = ledger(&pool).await;
    assert_eq!(
        (n as u64, distinct as u64, settled as u64),
        (rows, rows, micros)
    );
    assert_eq!(rollup(&pool).await, (n, settled, tokens));
    nats.wait_for(rows).await;
    for (budget, cap_t, cap_m, granted_t, granted_m) in windows(&pool).await {
        assert!(cap_t.is_none_or(|c| granted_t <= c), "{budget}");
        assert!(cap_m.is_none_or(|c| granted_m <= c), "{budget}");
    }
    println!(
        "crash+outage: rows={rows} settled_micros={settled} interrupted_micros={interrupted} cap={cap}"
    );
    a.kill();
    b.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_per_minute_limits() {
    let pg = Pg::start();
    let nats = Nats::start();
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let chain = serde_json::json!([{"name": "team",
        "limits": {"costMicros": 1_000_000_000, "requestsPerMinute": 4},
        "period": {"calendar": "month"}}]);
    let mut dirs = Vec::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let extra = replica_config(&pg.url(), &nats.url(), &chain, 900);
        replicas
            .push(start_proxy(&config_json(&upstream.url(), "openai", dir.path(), extra)).await);
        dirs.push(dir);
    }
    let client = http();
    let small = serde_json::json!({"model": "gpt-4o", "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}]});
    let a = replicas[0].proxy_addr.to_string();
    let b = replicas[1].proxy_addr.to_string();
    // A minute boundary inside a round resets the counters: such a round is run again. A round
    // takes a few seconds, so one that could reach the end of its minute starts at the next
    // minute instead, and so does a rerun: the requests its predecessor sent after the boundary
    // count in the current minute (a rerun that started at once found its warm-up call refused).
    let mut checked = false;
    for round in 0..3 {
        let into = jiff::Timestamp::now().as_second().rem_euclid(60);
        if round > 0 || into > 50 {
            let rest = u64::try_from(60 - into).unwrap_or(60);
            tokio::time::sleep(Duration::from_secs(rest) + Duration::from_millis(200)).await;
        }
        let minute = jiff::Timestamp::now().as_second() / 60;
        // Both replicas hold a lease; after a heartbeat each knows there are two.
        for replica in [&b, &a] {
            let r = chat(&client, replica, &small).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let mut answered = 0;
        let mut refusal = None;
        for _ in 0..6 {
            let r = chat(&client, &a, &small).await;
            match r.status.as_u16() {
                200 => answered += 1,
                429 => {
                    refusal = Some(r.json());
                    break;
                }
                s => panic!("unexpected {s}: {}", r.text()),
            }
        }
        if jiff::Timestamp::now().as_second() / 60 != minute {
            continue;
        }
        // A's share is half of 4: one more after the first, then refused as a rate limit.
        assert_eq!(answered, 1);
        let refusal = refusal.unwrap();
        assert_eq!(refusal["error"]["code"], "rate_limit_exceeded");
        assert_eq!(refusal["soma_budget"]["limit"], "requestsPerMinute");
        assert_eq!(refusal["soma_budget"]["cap"], 2);
        checked = true;
        break;
    }
    assert!(checked, "every round crossed a minute boundary");
    for r in replicas {
        r.stop().await;
    }
}
