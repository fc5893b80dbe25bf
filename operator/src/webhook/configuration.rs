//! The ValidatingWebhookConfiguration: a pure builder, and applying it only when the live one
//! lacks something desired (a converged operator writes nothing).

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    RuleWithOperations, ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use std::collections::BTreeMap;

use super::WebhookOptions;
use crate::apply::contains;
use crate::error::{Error, Result};

/// Field manager of the configuration.
pub const FIELD_MANAGER: &str = "soma.dev/webhook";

/// Name of the one webhook in the configuration.
pub const WEBHOOK_NAME: &str = "policy.soma.dev";

/// Path the webhook serves AdmissionReviews on.
pub const PATH: &str = "/validate";

/// `timeoutSeconds`: the deadline rounded up, plus a second for the network, within the API
/// server's 1–30 s.
pub fn timeout_seconds(options: &WebhookOptions) -> i32 {
    let secs = options.deadline.as_millis().div_ceil(1000) + 1;
    i32::try_from(secs).unwrap_or(30).clamp(1, 30)
}

/// The configuration for `ca_pem` (the CA that signed the serving certificate).
pub fn desired(options: &WebhookOptions, ca_pem: &str) -> ValidatingWebhookConfiguration {
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(options.configuration_name.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "soma-operator".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: WEBHOOK_NAME.to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            side_effects: "None".to_owned(),
            failure_policy: Some(if options.fail_open { "Ignore" } else { "Fail" }.to_owned()),
            match_policy: Some("Equivalent".to_owned()),
            timeout_seconds: Some(timeout_seconds(options)),
            client_config: WebhookClientConfig {
                ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
                service: Some(ServiceReference {
                    name: options.service.clone(),
                    namespace: options.namespace.clone(),
                    path: Some(PATH.to_owned()),
                    port: Some(options.service_port),
                }),
                url: None,
            },
            namespace_selector: Some(namespace_selector(options)),
            // The main resources only, not `*/status`: the operator's status writes are never
            // held up by its own webhook.
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["soma.dev".to_owned()]),
                api_versions: Some(vec!["v1alpha1".to_owned()]),
                operations: Some(vec!["CREATE".to_owned(), "UPDATE".to_owned()]),
                resources: Some(vec![
                    "agents".to_owned(),
                    "budgets".to_owned(),
                    "capsules".to_owned(),
                    "jobs".to_owned(),
                ]),
                scope: Some("Namespaced".to_owned()),
            }]),
            match_conditions: None,
            object_selector: None,
        }]),
    }
}

/// The operator's own namespace is always exempt, so a broken webhook can always be repaired;
/// an operator watching some namespaces judges only those.
fn namespace_selector(options: &WebhookOptions) -> LabelSelector {
    let (operator, values) = if options.watched.is_empty() {
        ("NotIn", vec![options.namespace.clone()])
    } else {
        let mut only: Vec<String> = options
            .watched
            .iter()
            .filter(|n| **n != options.namespace)
            .cloned()
            .collect();
        only.sort();
        if only.is_empty() {
            // Watching only its own namespace: judge nothing (every namespace has this label).
            ("DoesNotExist", only)
        } else {
            ("In", only)
        }
    };
    LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".to_owned(),
            operator: operator.to_owned(),
            values: (!values.is_empty()).then_some(values),
        }]),
        match_labels: None,
    }
}

/// Whether `live` already holds everything `desired` sets.
pub fn converged(
    live: Option<&ValidatingWebhookConfiguration>,
    desired: &ValidatingWebhookConfiguration,
) -> bool {
    let (Some(live), Ok(want)) = (live, serde_json::to_value(desired)) else {
        return false;
    };
    serde_json::to_value(live).is_ok_and(|have| contains(&have, &want))
}

/// Reads the configuration and applies `desired` if it differs. Returns whether it wrote.
pub async fn ensure(client: &Client, desired: &ValidatingWebhookConfiguration) -> Result<bool> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let name = desired.metadata.name.clone().unwrap_or_default();
    let live = api.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("ValidatingWebhookConfiguration {name}"),
        source,
    })?;
    if converged(live.as_ref(), desired) {
        return Ok(false);
    }
    let mut body = serde_json::to_value(desired).map_err(|source| Error::Serialize {
        what: "ValidatingWebhookConfiguration",
        source,
    })?;
    body["apiVersion"] = "admissionregistration.k8s.io/v1".into();
    body["kind"] = "ValidatingWebhookConfiguration".into();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: "ValidatingWebhookConfiguration",
        name: name.clone(),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_configuration_says_what_the_docs_promise() {
        let options = WebhookOptions {
            namespace: "soma-system".into(),
            deadline: Duration::from_millis(1500),
            ..WebhookOptions::default()
        };
        let v = serde_json::to_value(desired(&options, "CA PEM")).expect("json");
        let w = &v["webhooks"][0];
        assert_eq!(w["failurePolicy"], "Fail");
        assert_eq!(w["sideEffects"], "None");
        assert_eq!(w["admissionReviewVersions"], serde_json::json!(["v1"]));
        assert_eq!(w["timeoutSeconds"], 3);
        assert_eq!(
            w["rules"][0]["resources"],
            serde_json::json!(["agents", "budgets", "capsules", "jobs"])
        );
        assert_eq!(
            w["rules"][0]["operations"],
            serde_json::json!(["CREATE", "UPDATE"])
        );
        assert_eq!(w["clientConfig"]["caBundle"], "Q0EgUEVN"); // base64("CA PEM")
        assert_eq!(
            w["namespaceSelector"]["matchExpressions"][0]["values"],
            serde_json::json!(["soma-system"])
        );
        let scoped = WebhookOptions {
            watched: vec!["team-b".into(), "soma-system".into(), "team-a".into()],
            ..options.clone()
        };
        assert_eq!(
            serde_json::to_value(desired(&scoped, "x")).expect("json")["webhooks"][0]["namespaceSelector"]
                ["matchExpressions"][0],
            serde_json::json!({"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]})
        );
        let open = WebhookOptions {
            fail_open: true,
            ..options
        };
        assert_eq!(
            serde_json::to_value(desired(&open, "x")).expect("json")["webhooks"][0]["failurePolicy"],
            "Ignore"
        );
    }

    #[test]
    fn timeout_stays_above_the_deadline_and_within_the_api_limits() {
        let t = |ms| {
            timeout_seconds(&WebhookOptions {
                deadline: Duration::from_millis(ms),
                ..WebhookOptions::default()
            })
        };
        assert_eq!((t(200), t(1000), t(2500), t(60_000)), (2, 2, 4, 30));
    }

    #[test]
    fn converged_ignores_server_defaults_but_not_a_new_ca() {
        let options = WebhookOptions::default();
        let want = desired(&options, "CA1");
        let mut live = serde_json::to_value(&want).expect("json");
        live["webhooks"][0]["objectSelector"] = serde_json::json!({});
        live["metadata"]["resourceVersion"] = "7".into();
        let live: ValidatingWebhookConfiguration = serde_json::from_value(live).expect("vwc");
        assert!(converged(Some(&live), &want));
        assert!(!converged(Some(&live), &desired(&options, "CA2")));
        assert!(!converged(None, &want));
    }
}
