//! The Soma side of a run: the deterministic fake provider and `soma-proxy` as separate
//! processes on 127.0.0.1, configured like a deployed sidecar, and readings of what the
//! sidecar itself recorded (its `/metrics` and its SQLite outbox).

use std::path::Path;

use serde_json::{Value, json};

use super::load::{Http, Target, get_text};
use super::procs::{Killed, bin_dir, pinned, start_under};

/// The provider key the fake provider accepts.
pub const KEY: &str = "sk-bench-key";
/// The pod token clients present to the sidecar.
pub const TOKEN: &str = "bench-pod-token";
/// The price of `gpt-4o` in every benchmark, micros per million tokens (input, output).
pub const PRICE_PER_MTOK: (u64, u64) = (2_500_000, 10_000_000);

/// A running fake provider.
pub struct Upstream {
    _proc: Killed,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Upstream {
    /// Starts `soma-fake-upstream` on a free port.
    pub fn start() -> Upstream {
        Upstream::start_on(None)
    }

    /// Starts `soma-fake-upstream` on a free port, on core `cpu` only when given.
    pub fn start_on(cpu: Option<usize>) -> Upstream {
        Upstream::start_under(&pinned(cpu))
    }

    /// Starts `soma-fake-upstream` on a free port, run by the command `prefix` (see
    /// [`start_under`]).
    pub fn start_under(prefix: &[String]) -> Upstream {
        let (proc, line) = start_under(
            prefix,
            &bin_dir().join("soma-fake-upstream"),
            &["--listen", "127.0.0.1:0", "--key", KEY],
            &[],
            "listening on",
        );
        let addr = line.trim_start_matches("listening on ").trim().to_owned();
        Upstream { _proc: proc, addr }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self._proc.0.id()
    }

    /// Its chat endpoint, called with the real key.
    pub fn target(&self) -> Target {
        Target::chat(&self.addr, KEY)
    }
}

/// A sidecar configuration as deployed: the key from a file, the price table and the
/// SQLite outbox in `dir`, and `budgets` (each a Budget definition; the first is the one
/// calls are charged to, none means no Budget).
pub fn sidecar_config(upstream: &Upstream, dir: &Path, budgets: &[Value]) -> Value {
    let key_file = dir.join("key");
    std::fs::write(&key_file, KEY).expect("write key file");
    let (input, output) = PRICE_PER_MTOK;
    let mut c = json!({
        "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0",
        "agent": {"namespace": "bench", "name": "bench-agent"},
        "provider": {"kind": "openai", "upstream": format!("http://{}", upstream.addr), "model": "gpt-4o"},
        "credentials": {"file": key_file},
        "clientTokenEnv": "SOMA_POD_UID", "tools": [], "capsules": [],
        "outboxPath": dir.join("outbox.db"),
        "prices": {"gpt-4o": {"inputPerMTok": input, "outputPerMTok": output}},
        "budgets": budgets,
    });
    if let Some(first) = budgets.first() {
        c["budget"] = first["name"].clone();
    }
    c
}

/// A running `soma-proxy`.
pub struct Sidecar {
    _proc: Killed,
    /// Proxy listener.
    pub proxy_addr: String,
    /// `/metrics` listener.
    pub admin_addr: String,
}

impl Sidecar {
    /// Writes `config` to `dir/config.json` and starts the sidecar with it.
    pub fn start(config: &Value, dir: &Path) -> Sidecar {
        Sidecar::start_on(None, config, dir)
    }

    /// Like [`Sidecar::start`], on core `cpu` only when given.
    pub fn start_on(cpu: Option<usize>, config: &Value, dir: &Path) -> Sidecar {
        Sidecar::start_under(&pinned(cpu), config, dir)
    }

    /// Like [`Sidecar::start`], run by the command `prefix` (see [`start_under`]).
    pub fn start_under(prefix: &[String], config: &Value, dir: &Path) -> Sidecar {
        let path = dir.join("config.json");
        let mut config = config.clone();
        // `SOMA_BENCH_SIDECAR_SET` (a JSON object) overrides fields of the sidecar's
        // configuration, for experiments: `{"workerThreads": 2, "foldIntervalMs": 10}`.
        if let Ok(set) = std::env::var("SOMA_BENCH_SIDECAR_SET") {
            let set: Value = serde_json::from_str(&set).expect("SOMA_BENCH_SIDECAR_SET is JSON");
            for (k, v) in set
                .as_object()
                .expect("SOMA_BENCH_SIDECAR_SET is an object")
            {
                config[k] = v.clone();
            }
        }
        std::fs::write(&path, config.to_string()).expect("write config");
        let env = vec![
            ("SOMA_POD_UID", TOKEN),
            ("RUST_LOG", "warn,soma_proxy=info"),
        ];
        let (proc, line) = start_under(
            prefix,
            &bin_dir().join("soma-proxy"),
            &["--config", path.to_str().expect("utf-8 path")],
            &env,
            "soma-proxy serving",
        );
        let v: Value = serde_json::from_str(&line).expect("json log line");
        let field = |k: &str| v["fields"][k].as_str().expect("address").to_owned();
        Sidecar {
            _proc: proc,
            proxy_addr: field("proxy_addr"),
            admin_addr: field("admin_addr"),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self._proc.0.id()
    }

    /// Its chat endpoint, called with the pod token.
    pub fn target(&self) -> Target {
        Target::chat(&self.proxy_addr, TOKEN)
    }

    /// The text of its `/metrics`.
    pub async fn metrics(&self, client: &Http) -> String {
        get_text(client, &format!("http://{}/metrics", self.admin_addr))
            .await
            .expect("GET /metrics")
            .1
    }
}

/// The sum of every series of counter `name` (`name_total{...} v` lines).
pub fn counter_sum(text: &str, name: &str) -> f64 {
    let total = format!("{name}_total");
    text.lines()
        .filter(|l| {
            l.strip_prefix(&total)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sum of the series of counter `name` whose labels include every `key="value"` of
/// `labels`.
pub fn counter_sum_where(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let total = format!("{name}_total{{");
    text.lines()
        .filter(|l| {
            l.starts_with(&total)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Upper bucket bounds (µs) holding the 50th and 99th percentiles of histogram `name` for
/// `endpoint`.
pub fn histogram_quantiles(text: &str, name: &str, endpoint: &str) -> (u64, u64) {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&format!("endpoint=\"{endpoint}\"")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let q = |p: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= total * p)
            .map_or(0, |(le, _)| {
                if le.is_finite() {
                    (le * 1e6).round() as u64
                } else {
                    u64::MAX
                }
            })
    };
    (q(0.5), q(0.99))
}

/// What the outbox holds: settled cost, settled rows, rows still open.
#[derive(Debug, Default, Clone, Copy)]
pub struct OutboxTotals {
    /// Sum of `cost_micros` over settled rows.
    pub settled_micros: u64,
    /// Settled rows.
    pub settled: u64,
    /// Rows not settled.
    pub open: u64,
}

/// Reads the outbox at `path` (read-only; the sidecar may still be running, WAL allows it).
pub fn outbox_totals(path: &Path) -> OutboxTotals {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open outbox");
    conn.query_row(
        "SELECT COALESCE(SUM(CASE WHEN state = 'settled' THEN cost_micros END), 0),
                COALESCE(SUM(state = 'settled'), 0), COALESCE(SUM(state = 'open'), 0)
         FROM usage_outbox",
        [],
        |r| {
            Ok(OutboxTotals {
                settled_micros: r.get::<_, i64>(0)? as u64,
                settled: r.get::<_, i64>(1)? as u64,
                open: r.get::<_, i64>(2)? as u64,
            })
        },
    )
    .expect("query outbox")
}

/// The cost (micros) of the usage an OpenAI-format body reports, at [`PRICE_PER_MTOK`],
/// rounded up as the sidecar does; `None` when it reports none.
pub fn reported_cost_micros(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let u = v.get("usage")?;
    let input = u["prompt_tokens"].as_u64()?;
    let output = u["completion_tokens"].as_u64()?;
    let (pi, po) = PRICE_PER_MTOK;
    Some((input * pi + output * po).div_ceil(1_000_000))
}
