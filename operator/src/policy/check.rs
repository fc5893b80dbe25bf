//! The reconcile-time re-check: policies change after admission, so every reconcile evaluates
//! the object against the current set and reports a `PolicyAllowed` condition. Pure apart
//! from the evaluation itself, which is CPU-bound and runs in `spawn_blocking` (carrying the
//! reconcile's span).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use soma_policy::condition::{PolicyCondition, policy_allowed};
use soma_policy::{PolicyStore, Review};
use tracing::Instrument;

/// What the re-check decided for one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyCheck {
    /// The `PolicyAllowed` condition (status, reason, message).
    pub condition: PolicyCondition,
    /// Whether the object must not be started or changed: a `deny` policy is violated, or
    /// one could not be evaluated and the operator fails closed.
    pub blocks: bool,
}

impl PolicyCheck {
    /// From a computed condition: a denial blocks; an evaluation error blocks unless
    /// `fail_open`.
    pub fn from_condition(condition: PolicyCondition, fail_open: bool) -> Self {
        let blocks = match condition.reason {
            "Denied" => true,
            "PolicyError" => !fail_open,
            _ => false,
        };
        Self { condition, blocks }
    }

    /// Whether the block is an evaluation error (worth retrying) rather than a denial.
    pub fn is_error(&self) -> bool {
        self.condition.reason == "PolicyError"
    }
}

/// The policies and how to apply them at reconcile time.
#[derive(Clone, Debug)]
pub struct Checker {
    /// The store the webhook serves from.
    pub store: Arc<PolicyStore>,
    /// Time one decision may take.
    pub deadline: Duration,
    /// Evaluation errors allow instead of blocking.
    pub fail_open: bool,
}

impl Default for Checker {
    /// No policies: everything is allowed (`PolicyAllowed=True`, "0 policies allow …").
    fn default() -> Self {
        Self {
            store: Arc::new(PolicyStore::new()),
            deadline: Duration::from_millis(1500),
            fail_open: false,
        }
    }
}

impl Checker {
    /// Evaluates `object` (any of Soma's kinds) as a CREATE of what is stored now.
    pub async fn check<K: Serialize>(&self, object: &K) -> Result<PolicyCheck, serde_json::Error> {
        let mut value = serde_json::to_value(object)?;
        if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            // What admission would see: no server bookkeeping.
            meta.remove("managedFields");
        }
        let review = Review::of_object(value);
        let set = self.store.current();
        let deadline = self.deadline;
        let span = tracing::Span::current();
        let decision = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            set.evaluate(&review, deadline)
        })
        .instrument(tracing::Span::current())
        .await;
        let condition = match decision {
            Ok(d) => policy_allowed(&d),
            Err(e) => PolicyCondition {
                status: "False",
                reason: "PolicyError",
                message: format!("policy evaluation did not finish: {e}"),
            },
        };
        Ok(PolicyCheck::from_condition(condition, self.fail_open))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use soma_policy::Sources;

    fn agent(image: &str, budget: Option<&str>) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "image": image,
            "model": {"provider": "openai", "name": "gpt-4o-mini"},
        });
        if let Some(b) = budget {
            spec["budgetRef"] = serde_json::json!({"name": b});
        }
        serde_json::json!({"apiVersion": "soma.dev/v1alpha1", "kind": "Agent",
            "metadata": {"name": "a", "namespace": "team"}, "spec": spec})
    }

    fn builtins() -> Checker {
        let (store, report) = PolicyStore::loaded(&Sources::builtins());
        assert!(report.is_clean(), "{:?}", report.errors);
        Checker {
            store: Arc::new(store),
            ..Checker::default()
        }
    }

    #[tokio::test]
    async fn a_compliant_agent_is_allowed() {
        let digest = format!("registry.example.com/a@sha256:{}", "ab".repeat(32));
        let check = builtins()
            .check(&agent(&digest, Some("team")))
            .await
            .expect("serialises");
        assert_eq!(check.condition.status, "True", "{check:?}");
        assert!(!check.blocks);
    }

    #[tokio::test]
    async fn every_violated_policy_is_named_and_blocks() {
        let check = builtins()
            .check(&agent("registry.example.com/a:latest", None))
            .await
            .expect("serialises");
        assert_eq!(
            (check.condition.status, check.condition.reason),
            ("False", "Denied")
        );
        assert!(check.blocks);
        let m = &check.condition.message;
        assert!(
            m.contains("[SomaImages/") && m.contains("[SomaBudgetRef/"),
            "{m}"
        );
    }

    #[test]
    fn evaluation_errors_block_unless_fail_open() {
        let error = PolicyCondition {
            status: "False",
            reason: "PolicyError",
            message: "deadline".into(),
        };
        assert!(PolicyCheck::from_condition(error.clone(), false).blocks);
        assert!(!PolicyCheck::from_condition(error, true).blocks);
        let warn = PolicyCondition {
            status: "True",
            reason: "AllowedWithWarnings",
            message: "w".into(),
        };
        assert!(!PolicyCheck::from_condition(warn, false).blocks);
    }

    /// The real-cluster suite's own Agents (the plain one and the two of the Vault scenario)
    /// must pass the built-ins, or the operator would (rightly) never start them and
    /// `e2e/cluster/run.sh` would fail for the wrong reason.
    #[tokio::test]
    async fn the_cluster_suites_agents_pass_the_builtins() {
        let texts = [
            include_str!("../../../e2e/cluster/fixtures/e2e-agent.yaml"),
            include_str!("../../../e2e/cluster/fixtures/e2e-vault.yaml"),
        ];
        let checker = builtins();
        let mut agents = 0;
        for doc in texts
            .into_iter()
            .flat_map(serde_yaml::Deserializer::from_str)
        {
            let mut v: serde_json::Value =
                serde::Deserialize::deserialize(doc).expect("YAML document");
            if v["kind"] != "Agent" {
                continue;
            }
            v["metadata"]["namespace"] = "soma-e2e".into();
            let check = checker.check(&v).await.expect("serialises");
            assert_eq!(check.condition.reason, "Allowed", "{check:?}");
            agents += 1;
        }
        assert_eq!(agents, 3);
    }

    #[tokio::test]
    async fn no_policies_allow_everything() {
        let check = Checker::default()
            .check(&agent("x", None))
            .await
            .expect("serialises");
        assert_eq!(check.condition.reason, "Allowed");
    }
}
