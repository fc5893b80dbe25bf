//! The cluster authority's lease SQL against a real PostgreSQL 15 (started by this harness on
//! 127.0.0.1; fails, saying how to install it, when it is not installed), and the configurations it refuses.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::time::Duration;

use support::fleet::*;
use support::pg::Pg;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_leases_never_grant_past_the_cap_and_always_add_up() {
    use soma_metering::Amount;
    use soma_proxy::lease::{Ask, Terms, acquire, report};
    let pg = Pg::start();
    let pool = pg.pool().await;
    soma_proxy::ledger::MIGRATOR.run(&pool).await.unwrap();
    let cap = 1_000_000u64;
    let mut tasks = Vec::new();
    for h in 0..12u64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let reclaimable = h % 3 == 0;
            let terms = Terms {
                holder: format!("holder-{h}"),
                namespace: "research".into(),
                agent: "assistant".into(),
                // Short leases, reclaimed at once: reclaim races with the others' top-ups.
                ttl: Duration::from_millis(if reclaimable { 1 } else { 60_000 }),
                reclaim_after: Duration::ZERO,
            };
            let mut rng = Rng::new(h + 1);
            let (mut used, mut lease) = (0u64, 0u64);
            let mut granted_to_me = 0;
            for _ in 0..150 {
                let want = 1 + rng.below(20_000);
                let ask = |used: u64, want: u64| Ask {
                    budget: soma_metering::BudgetRef {
                        key: soma_metering::BudgetKey::new("research", "team"),
                        uid: String::new(),
                    },
                    window_start_ms: 0,
                    window_end_ms: 1,
                    cap_tokens: None,
                    cap_micros: Some(cap),
                    used: Amount {
                        tokens: 0,
                        micros: used,
                    },
                    reserved: Amount::default(),
                    want: Amount {
                        tokens: 0,
                        micros: want,
                    },
                    refusals: 0,
                    brownouts: 0,
                };
                if !reclaimable && used + want <= lease {
                    used += want;
                    continue;
                }
                match rng.below(4) {
                    0 => {
                        let g = report(&pool, &terms, &[ask(used, 0)], true).await.unwrap();
                        lease = g[0].lease.micros;
                    }
                    // A holder whose lease others reclaim at once spends only what each top-up
                    // grants for it (a real replica stops spending when its lease runs out
                    // locally; this one has no time to spend outside a top-up).
                    _ if reclaimable => {
                        match acquire(&pool, &terms, &[ask(used, want)]).await.unwrap() {
                            Ok(g) => {
                                lease = 0; // gone by the next round
                                assert!(used + want <= g[0].lease.micros);
                                used += want;
                                granted_to_me += 1;
                            }
                            Err(short) => assert!(short.need > short.remaining),
                        }
                    }
                    _ => match acquire(&pool, &terms, &[ask(used, want)]).await.unwrap() {
                        Ok(g) => {
                            lease = g[0].lease.micros;
                            assert!(used + want <= lease);
                            used += want;
                            granted_to_me += 1;
                        }
                        Err(short) => assert!(short.need > short.remaining),
                    },
                }
            }
            granted_to_me
        }));
    }
    let mut grants = 0;
    for t in tasks {
        grants += t.await.unwrap();
    }
    assert!(grants > 0);
    let (granted, sum, used): (i64, i64, i64) = sqlx::query_as(
        "SELECT w.granted_micros, COALESCE(SUM(l.granted_micros), 0)::BIGINT,
            COALESCE(SUM(l.used_micros), 0)::BIGINT
         FROM budget_windows w LEFT JOIN budget_leases l USING (budget, budget_uid, window_start_ms)
         WHERE w.budget = 'research/team' GROUP BY w.granted_micros",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(granted as u64 <= cap, "granted {granted} > cap {cap}");
    assert_eq!(
        granted, sum,
        "the window's total is not the sum of its leases"
    );
    assert!(used <= granted);
}

#[tokio::test]
async fn bad_authority_configurations_stop_the_sidecar_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let start = |extra: serde_json::Value| {
        let c = config_json("http://127.0.0.1:9", "openai", dir.path(), extra);
        async move {
            let c = soma_proxy::Config::parse(&c.to_string()).unwrap();
            soma_proxy::start(c, TOKEN.to_owned(), None)
                .await
                .err()
                .map(|e| {
                    // The message with its causes, as the binary prints it.
                    let mut s = e.to_string();
                    let mut cause = std::error::Error::source(&e);
                    while let Some(c) = cause {
                        s.push_str(&format!(": {c}"));
                        cause = c.source();
                    }
                    s
                })
        }
    };
    let no_url = start(
        serde_json::json!({"authority": {"postgres": {}}, "budget": "team",
        "budgets": budgets(1_000, 1_000)}),
    )
    .await;
    assert_eq!(
        no_url.as_deref(),
        Some("authority.postgres needs databaseUrl (the PostgreSQL holding the Budget leases)")
    );
    let rolling = start(serde_json::json!({"authority": {"postgres": {}},
        "databaseUrl": "postgres://soma@127.0.0.1:9/postgres", "budget": "team",
        "budgets": [{"name": "team", "limits": {"costMicros": 5}, "period": {"rolling": "1h"}}]}))
    .await;
    assert_eq!(
        rolling.as_deref(),
        Some(
            "invalid budget definitions: budget research/team has a rolling period, which the \
             postgres budget authority does not support; use a calendar period or the embedded \
             authority"
        )
    );
    let typo = soma_proxy::Config::parse(
        &config_json(
            "http://x",
            "openai",
            dir.path(),
            serde_json::json!({"authority": {"postgres": {"leaseTtl": 5}}}),
        )
        .to_string(),
    );
    assert!(typo.is_err());
}
