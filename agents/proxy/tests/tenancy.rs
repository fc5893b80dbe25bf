//! Tenants stay apart (PRODUCT.md invariant 8): two namespaces that both have a Budget called
//! `team`, charged by sidecars sharing one real PostgreSQL ledger, each get their own cap,
//! window, leases and records. The server is started by the harness on 127.0.0.1; a missing
//! one fails the test.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use serde_json::json;
use soma_proxy::fake_upstream::FakeUpstream;
use soma_proxy::outbox::Sink;
use support::pg::Pg;
use support::*;

const CAP: u64 = 40_000;

async fn spend_until_refused(url: &str) -> (u64, serde_json::Value) {
    let body = json!({"model": "gpt-4o", "max_tokens": 100,
        "messages": [{"role": "user", "content": "how much is left?"}]});
    let auth = format!("Bearer {TOKEN}");
    let mut ok = 0;
    loop {
        let r = send(
            &http(),
            "POST",
            url,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body.to_string(),
        )
        .await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => return (ok, r.json()),
            s => panic!("unexpected {s}: {}", r.text()),
        }
        assert!(ok < 10_000, "never refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_namespaces_with_a_budget_called_team_share_nothing() {
    let pg = Pg::start();
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let mut sidecars = Vec::new();
    let mut dirs = Vec::new();
    for ns in ["tenant-a", "tenant-b"] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_json(
            &upstream.url(),
            "openai",
            dir.path(),
            json!({
                "databaseUrl": pg.url(),
                "deliveryIntervalMs": 50,
                "authority": {"postgres": {}},
                "budget": "team",
                "budgets": [{"name": "team", "uid": format!("uid-{ns}"),
                             "limits": {"costMicros": CAP}, "period": {"calendar": "day"}}],
            }),
        );
        config["agent"] = json!({"namespace": ns, "name": "assistant"});
        sidecars.push(start_proxy(&config).await);
        dirs.push(dir);
    }
    let url = |i: usize| format!("http://{}/v1/chat/completions", sidecars[i].proxy_addr);
    // Tenant A uses its whole cap...
    let (a_ok, a_refusal) = spend_until_refused(&url(0)).await;
    assert_eq!(a_refusal["soma_budget"]["budget"], "tenant-a/team");
    // ...which leaves tenant B's untouched: B gets as many requests as A did.
    let (b_ok, b_refusal) = spend_until_refused(&url(1)).await;
    assert_eq!(b_refusal["soma_budget"]["budget"], "tenant-b/team");
    assert!(a_ok > 0 && b_ok > 0);
    assert_eq!(a_ok, b_ok, "the two tenants' caps are independent");
    for s in &sidecars {
        for _ in 0..400 {
            if s.state.outbox.pending_delivery(Sink::Ledger).await.unwrap() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
    let pool = pg.pool().await;
    let windows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT budget, budget_uid, granted_micros FROM budget_windows ORDER BY budget",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(windows.len(), 2, "{windows:?}");
    assert_eq!(
        (windows[0].0.as_str(), windows[0].1.as_str()),
        ("tenant-a/team", "uid-tenant-a")
    );
    assert_eq!(
        (windows[1].0.as_str(), windows[1].1.as_str()),
        ("tenant-b/team", "uid-tenant-b")
    );
    for (_, _, granted) in &windows {
        assert!(*granted as u64 <= CAP, "{windows:?}");
    }
    let spent: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT namespace, budgets, COUNT(*), SUM(cost_micros)::BIGINT FROM usage_records
          GROUP BY 1, 2 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        spent
            .iter()
            .map(|s| (s.0.as_str(), s.1.as_str(), s.2))
            .collect::<Vec<_>>(),
        vec![
            ("tenant-a", "tenant-a/team@uid-tenant-a", a_ok as i64),
            ("tenant-b", "tenant-b/team@uid-tenant-b", b_ok as i64)
        ]
    );
    for s in &spent {
        assert!(s.3 as u64 <= CAP, "{spent:?}");
    }
    for s in sidecars {
        s.stop().await;
    }
    drop(dirs);
}
