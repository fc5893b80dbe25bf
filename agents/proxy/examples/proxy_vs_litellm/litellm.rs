//! LiteLLM's proxy as the peer: configured against the same fake provider, with everything
//! that would reach the network off, started on a free 127.0.0.1 port, stopped by PID.
//!
//! What is on, the nearest LiteLLM gets to a Budget without its database (its DB-backed
//! budgets need Prisma engines downloaded at run time): the model's price
//! (`model_info.*_cost_per_token`, so every response is costed), the deployment's `rpm`/`tpm`
//! limits counted in memory by `usage-based-routing-v2`, a master key for authentication, and
//! `litellm_settings.max_budget` with `budget_duration` (which LiteLLM accepts but, as it logs at
//! start-up, does not enforce without a database). docs/benchmarks.md says the same.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench_support::load::{Http, Target, get_text};
use crate::bench_support::procs::{Killed, free_port};
use crate::bench_support::soma::{KEY, PRICE_PER_MTOK, Upstream};

/// LiteLLM's master key in the benchmark.
const MASTER_KEY: &str = "sk-bench-litellm-master";

/// A running LiteLLM proxy.
pub struct LiteLlm {
    _proc: Killed,
    port: u16,
}

/// `config.yaml` for LiteLLM, pointing `gpt-4o` at the fake provider.
fn config(upstream: &Upstream) -> String {
    let (input, output) = PRICE_PER_MTOK;
    format!(
        r#"model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: http://{addr}/v1
      api_key: {KEY}
      rpm: 100000000
      tpm: 100000000000
    model_info:
      input_cost_per_token: {in_per_token}
      output_cost_per_token: {out_per_token}
router_settings:
  routing_strategy: usage-based-routing-v2
litellm_settings:
  telemetry: false
  max_budget: 1000000
  budget_duration: 30d
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  master_key: {MASTER_KEY}
  disable_spend_logs: true
"#,
        addr = upstream.addr,
        in_per_token = input as f64 / 1e12,
        out_per_token = output as f64 / 1e12,
    )
}

/// Python logging configuration: warnings only, no per-request access log line (the sidecar
/// logs at `warn` in the same run).
const LOG_CONFIG: &str = r#"{"version": 1, "disable_existing_loggers": false,
 "handlers": {"err": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
 "root": {"level": "WARNING", "handlers": ["err"]},
 "loggers": {"uvicorn.access": {"level": "WARNING", "handlers": ["err"], "propagate": false}}}"#;

impl LiteLlm {
    /// Starts `litellm` (the venv's script) with `workers` uvicorn workers and waits until
    /// `/health/liveliness` answers (LiteLLM takes tens of seconds to import).
    pub async fn start(
        client: &Http,
        litellm: &Path,
        upstream: &Upstream,
        dir: &Path,
        workers: u32,
    ) -> LiteLlm {
        let cfg = dir.join("litellm.yaml");
        std::fs::write(&cfg, config(upstream)).expect("write litellm config");
        let log_cfg = dir.join("litellm-logging.json");
        std::fs::write(&log_cfg, LOG_CONFIG).expect("write logging config");
        let log: PathBuf = dir.join("litellm.log");
        let out = std::fs::File::create(&log).expect("litellm log");
        let port = free_port();
        let child = Command::new(litellm)
            .args(["--config", path_str(&cfg), "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--num_workers", &workers.to_string()])
            .args(["--log_config", path_str(&log_cfg)])
            // Everything that would try the network or a database off.
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_TELEMETRY", "False")
            .env("LITELLM_LOG", "ERROR")
            .env("DISABLE_ADMIN_UI", "True")
            .env("NO_DOCS", "True")
            .env("NO_REDOC", "True")
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_HOST")
            .env_remove("OPENAI_API_KEY")
            .stdout(Stdio::from(out.try_clone().expect("log handle")))
            .stderr(Stdio::from(out))
            .spawn()
            // A panic, not an exit, so the processes already started are stopped on unwind.
            .unwrap_or_else(|e| panic!("{}: {e}", litellm.display()));
        let mut proc = Killed(child);
        let url = format!("http://127.0.0.1:{port}/health/liveliness");
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if matches!(get_text(client, &url).await, Ok((200, _))) {
                break;
            }
            let exited = matches!(proc.0.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "LiteLLM did not become ready ({}):\n{}",
                    if exited { "exited" } else { "timed out" },
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        LiteLlm { _proc: proc, port }
    }

    /// Its chat endpoint, called with the master key.
    pub fn target(&self) -> Target {
        Target::chat(&format!("127.0.0.1:{}", self.port), MASTER_KEY)
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
