//! Computes an Agent's status from what the reconcile observed: a pure function, so every
//! branch is a table test. `lastTransitionTime` is kept unless a condition's status flips,
//! and the result equals the old status when nothing changed, so the controller can skip
//! the write (a no-op write would only cost an API call; an unneeded change would loop).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use soma_crds::agent::AgentStatus;
use soma_crds::common::condition_types::{READY, RECONCILING, STALLED};
use soma_policy::condition::POLICY_ALLOWED;

use super::brownout::BROWN_OUT;
use super::credentials::CREDENTIALS_UNAVAILABLE;
use super::image::{IMAGE_NOT_VERIFIED, ImageRejection, VerifiedImage, image_status};
use super::scaling::SCALING;
use crate::kstatus::{Verdict, conditions, verdict};
use crate::policy::check::PolicyCheck;

/// The outcome of the image signature check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ImageCheck {
    /// Signed images are not required (or the check was not reached): no `status.image`.
    #[default]
    NotRequired,
    /// `reference` (`spec.image`) resolved to a digest whose signature verified.
    Verified {
        /// `spec.image`.
        reference: String,
        /// The verification.
        verified: VerifiedImage,
    },
    /// The image is not verified: the Agent waits (permanent) or retries (transient).
    Rejected(ImageRejection),
}

impl ImageCheck {
    /// The rejection, if the image was rejected.
    pub fn rejection(&self) -> Option<&ImageRejection> {
        match self {
            ImageCheck::Rejected(r) => Some(r),
            _ => None,
        }
    }
}

/// A reference the Agent (directly or through a Budget's parent) names that does not exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingRef {
    /// `Budget` or `Capsule`.
    pub kind: &'static str,
    /// The namespace it was looked for in.
    pub namespace: String,
    /// The name that was given.
    pub name: String,
    /// Where the name was given: `spec.budgetRef`, `spec.capsules`, or
    /// `spec.parentRef of Budget "team"`.
    pub field: String,
}

impl MissingRef {
    /// The condition reason: `BudgetNotFound`, `CapsuleNotFound`.
    pub fn reason(&self) -> String {
        format!("{}NotFound", self.kind)
    }

    /// A message a user can act on.
    pub fn message(&self) -> String {
        format!(
            "{} {:?} does not exist in namespace {:?}; create it or correct {}. The agent's pods are not started or changed until it exists.",
            self.kind, self.name, self.namespace, self.field
        )
    }
}

/// What the Deployment reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeploymentState {
    /// `metadata.generation` of the Deployment.
    pub generation: i64,
    /// `status.observedGeneration` of the Deployment.
    pub observed_generation: i64,
    /// Pods that exist.
    pub replicas: i32,
    /// Pods running the current template.
    pub updated: i32,
    /// Pods that are ready.
    pub ready: i32,
}

/// A failure only a change by a person can fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    /// Condition reason.
    pub reason: String,
    /// Message for the user.
    pub message: String,
}

/// Everything the status is computed from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The Agent's `metadata.generation`.
    pub generation: Option<i64>,
    /// The Agent's namespace (for messages).
    pub namespace: String,
    /// References that do not exist.
    pub missing: Vec<MissingRef>,
    /// A permanent failure, if any.
    pub stall: Option<Stall>,
    /// The Deployment, when it exists.
    pub deployment: Option<DeploymentState>,
    /// Replicas Soma wants.
    pub desired_replicas: i32,
    /// The reconcile-time policy re-check (`None`: not evaluated, no `PolicyAllowed`).
    pub policy: Option<PolicyCheck>,
    /// The image signature check.
    pub image: ImageCheck,
    /// The share of the Agent's Budget used (`42%`), from the Budget's status.
    pub budget_used: Option<String>,
    /// With a Budget: whether it is enforced across all replicas through the ledger
    /// (`BudgetScope`); `None` without a Budget.
    pub budget_cluster_wide: Option<bool>,
    /// Whether the Agent autoscales: `status.scaling` and the `Scaling` condition (written
    /// by the scaling loop) are kept, else dropped.
    pub autoscaled: bool,
    /// Whether the provider key comes from Vault: the `CredentialsUnavailable` condition
    /// (written by the credentials check) is kept, else dropped.
    pub vault_credentials: bool,
}

/// Condition type: whether the Agent's Budget is enforced across replicas.
pub const BUDGET_SCOPE: &str = "BudgetScope";

/// Ready, Reconciling and Stalled in the kstatus sense, then `PolicyAllowed` when checked.
fn verdicts(obs: &Observed) -> Vec<Verdict> {
    let mut out = kstatus_verdicts(obs).to_vec();
    if let Some(p) = &obs.policy {
        out.push(verdict(
            POLICY_ALLOWED,
            p.condition.status == "True",
            p.condition.reason,
            p.condition.message.clone(),
        ));
    }
    match obs.budget_cluster_wide {
        Some(true) => out.push(verdict(
            BUDGET_SCOPE,
            true,
            "ClusterWide",
            "the Budget is enforced across all replicas through the usage ledger, and spend survives pod restarts",
        )),
        Some(false) => out.push(verdict(
            BUDGET_SCOPE,
            false,
            "PerReplica",
            "no usage ledger is configured (the operator's --ledger-url): each replica enforces the Budget alone, so N replicas may spend up to N times its caps, and a replaced pod forgets what it spent",
        )),
        None => {}
    }
    out
}

/// The message of `Ready=False` when a policy blocks the Agent.
fn policy_block_message(p: &PolicyCheck) -> String {
    format!(
        "{}. The agent's pods are not started or changed until the policies allow it.",
        p.condition.message
    )
}

fn kstatus_verdicts(obs: &Observed) -> [Verdict; 3] {
    // A registry that did not answer is retried, so the Agent is reconciling, not stalled.
    if let Some(r) = obs.image.rejection().filter(|r| r.transient)
        && obs.missing.is_empty()
        && obs.stall.is_none()
    {
        return [
            verdict(READY, false, IMAGE_NOT_VERIFIED, r.message.clone()),
            verdict(RECONCILING, true, IMAGE_NOT_VERIFIED, r.message.clone()),
            verdict(
                STALLED,
                false,
                IMAGE_NOT_VERIFIED,
                "retrying the image verification",
            ),
        ];
    }
    // An evaluation error is retried, so the Agent is reconciling, not stalled.
    if let Some(p) = obs.policy.as_ref().filter(|p| p.blocks && p.is_error())
        && obs.missing.is_empty()
        && obs.stall.is_none()
    {
        let message = policy_block_message(p);
        return [
            verdict(READY, false, "PolicyError", message.clone()),
            verdict(RECONCILING, true, "PolicyError", message),
            verdict(
                STALLED,
                false,
                "PolicyError",
                "retrying the policy evaluation",
            ),
        ];
    }
    let blocked = obs
        .missing
        .first()
        .map(|m| (m.reason(), m.message()))
        .or_else(|| {
            obs.image
                .rejection()
                .map(|r| (IMAGE_NOT_VERIFIED.to_owned(), r.message.clone()))
        })
        .or_else(|| {
            obs.policy
                .as_ref()
                .filter(|p| p.blocks)
                .map(|p| ("PolicyDenied".to_owned(), policy_block_message(p)))
        })
        .or_else(|| {
            obs.stall
                .as_ref()
                .map(|s| (s.reason.clone(), s.message.clone()))
        });
    if let Some((reason, message)) = blocked {
        return [
            verdict(READY, false, reason.clone(), message.clone()),
            verdict(
                RECONCILING,
                false,
                reason.clone(),
                "waiting for a change to the Agent or what it references",
            ),
            verdict(STALLED, true, reason, message),
        ];
    }
    let want = obs.desired_replicas;
    let progress = match obs.deployment {
        None => Some((
            "DeploymentPending",
            "the Deployment has not been created yet".to_owned(),
        )),
        Some(d) if d.observed_generation < d.generation => Some((
            "RolloutPending",
            "the Deployment controller has not yet seen the latest pod template".to_owned(),
        )),
        Some(d) if d.updated < want || d.ready < want || d.replicas > want => Some((
            "Progressing",
            format!(
                "{} of {want} replicas ready and up to date ({} running)",
                d.ready.min(d.updated),
                d.replicas
            ),
        )),
        Some(_) => None,
    };
    match progress {
        Some((reason, message)) => [
            verdict(READY, false, reason, message.clone()),
            verdict(RECONCILING, true, reason, message),
            verdict(STALLED, false, "Progressing", "making progress"),
        ],
        None => {
            let (reason, message) = if want == 0 {
                (
                    "ScaledToZero",
                    "scaled to zero (scaling.minReplicas is 0): a Soma Job whose spec.agentRef names this Agent wakes it".to_owned(),
                )
            } else {
                ("Available", format!("{want} of {want} replicas ready"))
            };
            [
                verdict(READY, true, reason, message),
                verdict(
                    RECONCILING,
                    false,
                    reason,
                    "the Agent is in its desired state",
                ),
                verdict(STALLED, false, reason, "the Agent is in its desired state"),
            ]
        }
    }
}

/// The status the Agent should have, given its old status and what was observed at `now`.
pub fn agent_status(old: Option<&AgentStatus>, obs: &Observed, now: &Time) -> AgentStatus {
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let (replicas, ready) = obs.deployment.map_or((0, 0), |d| (d.replicas, d.ready));
    let mut conditions = conditions(old_conditions, &verdicts(obs), obs.generation, now);
    // The conditions the loops write, kept as they wrote them while they apply.
    conditions.extend(
        old_conditions
            .iter()
            .filter(|c| {
                (obs.autoscaled && (c.type_ == SCALING || c.type_ == BROWN_OUT))
                    || (obs.vault_credentials && c.type_ == CREDENTIALS_UNAVAILABLE)
            })
            .cloned(),
    );
    AgentStatus {
        observed_generation: obs.generation,
        conditions,
        scaling: old
            .and_then(|s| s.scaling.clone())
            .filter(|_| obs.autoscaled),
        replicas,
        ready_replicas: ready,
        desired_replicas: obs.desired_replicas,
        replica_summary: Some(format!("{ready}/{}", obs.desired_replicas)),
        budget_used: obs.budget_used.clone(),
        image: match &obs.image {
            ImageCheck::NotRequired => None,
            ImageCheck::Verified {
                reference,
                verified,
            } => Some(image_status(
                old.and_then(|s| s.image.as_ref()),
                reference,
                verified,
            )),
            // What still runs was verified: keep it while the registry does not answer.
            ImageCheck::Rejected(r) if r.transient => old.and_then(|s| s.image.clone()),
            ImageCheck::Rejected(_) => None,
        },
    }
}

/// The Ready condition of a status, if present.
pub fn ready_condition(status: &AgentStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == READY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    fn ready_deployment(n: i32) -> Option<DeploymentState> {
        Some(DeploymentState {
            generation: 2,
            observed_generation: 2,
            replicas: n,
            updated: n,
            ready: n,
        })
    }

    fn observed(deployment: Option<DeploymentState>, desired: i32) -> Observed {
        Observed {
            generation: Some(3),
            namespace: "team".into(),
            deployment,
            desired_replicas: desired,
            ..Observed::default()
        }
    }

    fn get<'a>(s: &'a AgentStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition present")
    }

    #[test]
    fn table_of_states() {
        let missing_budget = Observed {
            missing: vec![MissingRef {
                kind: "Budget",
                namespace: "team".into(),
                name: "b".into(),
                field: "spec.budgetRef".into(),
            }],
            ..observed(None, 1)
        };
        let stalled = Observed {
            stall: Some(Stall {
                reason: "ApplyRejected".into(),
                message: "Deployment invalid".into(),
            }),
            ..observed(ready_deployment(1), 1)
        };
        let behind = observed(
            Some(DeploymentState {
                generation: 3,
                observed_generation: 2,
                replicas: 1,
                updated: 1,
                ready: 1,
            }),
            1,
        );
        let scaling = observed(
            Some(DeploymentState {
                generation: 2,
                observed_generation: 2,
                replicas: 3,
                updated: 3,
                ready: 1,
            }),
            3,
        );
        let surplus = observed(
            Some(DeploymentState {
                generation: 2,
                observed_generation: 2,
                replicas: 4,
                updated: 3,
                ready: 3,
            }),
            3,
        );
        // (name, observed, Ready, Reconciling, Stalled, Ready reason)
        let rows: Vec<(&str, Observed, &str, &str, &str, &str)> = vec![
            (
                "no deployment yet",
                observed(None, 1),
                "False",
                "True",
                "False",
                "DeploymentPending",
            ),
            (
                "rollout not observed",
                behind,
                "False",
                "True",
                "False",
                "RolloutPending",
            ),
            (
                "scaling up",
                scaling,
                "False",
                "True",
                "False",
                "Progressing",
            ),
            (
                "old pods terminating",
                surplus,
                "False",
                "True",
                "False",
                "Progressing",
            ),
            (
                "all ready",
                observed(ready_deployment(2), 2),
                "True",
                "False",
                "False",
                "Available",
            ),
            (
                "scaled to zero",
                observed(ready_deployment(0), 0),
                "True",
                "False",
                "False",
                "ScaledToZero",
            ),
            (
                "missing budget",
                missing_budget,
                "False",
                "False",
                "True",
                "BudgetNotFound",
            ),
            (
                "permanent failure",
                stalled,
                "False",
                "False",
                "True",
                "ApplyRejected",
            ),
        ];
        for (name, obs, ready, reconciling, stalled, reason) in rows {
            let s = agent_status(None, &obs, &at(100));
            assert_eq!(get(&s, READY).status, ready, "{name}: Ready");
            assert_eq!(
                get(&s, RECONCILING).status,
                reconciling,
                "{name}: Reconciling"
            );
            assert_eq!(get(&s, STALLED).status, stalled, "{name}: Stalled");
            assert_eq!(get(&s, READY).reason, reason, "{name}: reason");
            assert_eq!(s.observed_generation, Some(3), "{name}");
            assert!(
                s.conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(3)),
                "{name}"
            );
        }
    }

    #[test]
    fn missing_reference_message_says_what_to_do() {
        let m = MissingRef {
            kind: "Capsule",
            namespace: "team".into(),
            name: "kb".into(),
            field: "spec.capsules".into(),
        };
        let msg = m.message();
        assert!(
            msg.contains("\"kb\"") && msg.contains("\"team\"") && msg.contains("spec.capsules"),
            "{msg}"
        );
        assert_eq!(m.reason(), "CapsuleNotFound");
    }

    #[test]
    fn transition_time_kept_unless_status_flips() {
        let obs = observed(ready_deployment(1), 1);
        let first = agent_status(None, &obs, &at(100));
        let again = agent_status(Some(&first), &obs, &at(200));
        assert_eq!(
            first, again,
            "same observation, same status: no write needed"
        );

        let degraded = observed(
            Some(DeploymentState {
                ready: 0,
                ..ready_deployment(1).expect("some")
            }),
            1,
        );
        let later = agent_status(Some(&again), &degraded, &at(300));
        assert_eq!(
            get(&later, READY).last_transition_time,
            at(300),
            "Ready flipped"
        );
        assert_eq!(
            get(&later, STALLED).last_transition_time,
            at(100),
            "Stalled stayed False"
        );
    }

    #[test]
    fn replica_counts_come_from_the_deployment() {
        let s = agent_status(
            None,
            &observed(
                Some(DeploymentState {
                    generation: 1,
                    observed_generation: 1,
                    replicas: 3,
                    updated: 3,
                    ready: 2,
                }),
                3,
            ),
            &at(1),
        );
        assert_eq!(
            (s.replicas, s.ready_replicas, s.desired_replicas),
            (3, 2, 3)
        );
        assert_eq!(s.replica_summary.as_deref(), Some("2/3"));
    }

    fn rejected(transient: bool) -> ImageCheck {
        ImageCheck::Rejected(ImageRejection {
            reason: "WrongKey".into(),
            message: "image r:1 is not verified (WrongKey): sign it".into(),
            transient,
        })
    }

    #[test]
    fn image_checks_set_status_image_and_conditions() {
        let verified = ImageCheck::Verified {
            reference: "r:1".into(),
            verified: VerifiedImage {
                digest: "sha256:aa".into(),
                signer: "key:sha256:bb".into(),
                verified_at: "2026-01-01T00:00:00Z".into(),
            },
        };
        let ok = agent_status(
            None,
            &Observed {
                image: verified.clone(),
                ..observed(ready_deployment(1), 1)
            },
            &at(1),
        );
        let image = ok.image.clone().expect("status.image");
        assert_eq!(
            (
                image.reference.as_str(),
                image.digest.as_str(),
                image.signer.as_str()
            ),
            ("r:1", "sha256:aa", "key:sha256:bb")
        );
        assert_eq!(get(&ok, READY).status, "True");

        // Permanent: stalled with the rejection's text; no verified image is claimed.
        let bad = agent_status(
            Some(&ok),
            &Observed {
                image: rejected(false),
                ..observed(ready_deployment(1), 1)
            },
            &at(2),
        );
        assert_eq!(bad.image, None);
        let ready = get(&bad, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ImageNotVerified")
        );
        assert!(ready.message.contains("WrongKey"), "{}", ready.message);
        assert_eq!(get(&bad, STALLED).status, "True");

        // Transient: reconciling, not stalled, and the image that runs stays recorded.
        let later = agent_status(
            Some(&ok),
            &Observed {
                image: rejected(true),
                ..observed(ready_deployment(1), 1)
            },
            &at(3),
        );
        assert_eq!(later.image, ok.image);
        assert_eq!(get(&later, READY).reason, "ImageNotVerified");
        assert_eq!(get(&later, RECONCILING).status, "True");
        assert_eq!(get(&later, STALLED).status, "False");

        // A missing reference is reported before the image.
        let missing = agent_status(
            None,
            &Observed {
                image: rejected(false),
                missing: vec![MissingRef {
                    kind: "Budget",
                    namespace: "team".into(),
                    name: "b".into(),
                    field: "spec.budgetRef".into(),
                }],
                ..observed(None, 1)
            },
            &at(4),
        );
        assert_eq!(get(&missing, READY).reason, "BudgetNotFound");
    }

    #[test]
    fn the_scaling_loops_status_is_kept_while_the_agent_autoscales() {
        let scaling = Condition {
            type_: SCALING.into(),
            status: "True".into(),
            reason: "ErlangFloor".into(),
            message: "3 replicas".into(),
            observed_generation: Some(3),
            last_transition_time: at(5),
        };
        let old = AgentStatus {
            conditions: vec![scaling.clone()],
            scaling: Some(soma_crds::agent::ScalingStatus {
                desired_replicas: 3,
                ..Default::default()
            }),
            ..AgentStatus::default()
        };
        let autoscaled = Observed {
            autoscaled: true,
            ..observed(ready_deployment(3), 3)
        };
        let kept = agent_status(Some(&old), &autoscaled, &at(60));
        assert_eq!(kept.scaling, old.scaling);
        assert_eq!(get(&kept, SCALING), &scaling);
        // Autoscaling turned off: both go.
        let dropped = agent_status(Some(&old), &observed(ready_deployment(3), 3), &at(60));
        assert_eq!(dropped.scaling, None);
        assert!(dropped.conditions.iter().all(|c| c.type_ != SCALING));
    }
}
