//! The nouns: templates, constraints, their match, enforcement actions, and the review a
//! decision is about.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What happens when a constraint is violated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Refuse the request (the default).
    Deny,
    /// Allow it, and return the message to the client as a warning.
    Warn,
    /// Allow it silently; record the violation in audit annotations, logs and metrics.
    Dryrun,
}

impl Action {
    /// Parses Gatekeeper's spelling (`deny`, `warn`, `dryrun`; case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "deny" => Some(Self::Deny),
            "warn" => Some(Self::Warn),
            "dryrun" => Some(Self::Dryrun),
            _ => None,
        }
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Warn => "warn",
            Self::Dryrun => "dryrun",
        }
    }
}

/// A Rego template: the policy logic, with a `violation` rule in its package.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    /// `metadata.name` (Gatekeeper requires the lower-cased kind).
    pub name: String,
    /// The constraint kind it defines, such as `K8sRequiredLabels` or `SomaImages`.
    pub kind: String,
    /// The main Rego module.
    pub rego: String,
    /// Library modules (`package lib.…`).
    pub libs: Vec<String>,
    /// Rego v1 syntax (`if`, `contains`); Gatekeeper's `rego` field is v0.
    pub rego_v1: bool,
    /// Where it came from, for messages.
    pub origin: String,
}

/// One `apiGroups` × `kinds` entry of a match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KindMatch {
    /// API groups; `*` for any, `""` for the core group.
    #[serde(default)]
    pub api_groups: Vec<String>,
    /// Kinds; `*` for any.
    #[serde(default)]
    pub kinds: Vec<String>,
}

/// Gatekeeper's `spec.match`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    /// Kinds the constraint applies to; empty means all.
    #[serde(default)]
    pub kinds: Vec<KindMatch>,
    /// Namespaces (a trailing `*` is a prefix match); empty means all.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Namespaces excluded.
    #[serde(default)]
    pub excluded_namespaces: Vec<String>,
    /// `*`, `Cluster` or `Namespaced`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Object name (a trailing `*` is a prefix match).
    #[serde(default)]
    pub name: Option<String>,
    /// A label selector on the object.
    #[serde(default)]
    pub label_selector: Option<Value>,
    /// A label selector on the object's namespace (read from the inventory).
    #[serde(default)]
    pub namespace_selector: Option<Value>,
}

/// A constraint: a template instantiated with parameters, a match and an action.
#[derive(Clone, Debug, PartialEq)]
pub struct Constraint {
    /// The template's kind.
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// What a violation does.
    pub action: Action,
    /// What it applies to.
    pub matches: Match,
    /// `spec.parameters`, handed to Rego as `input.parameters`.
    pub parameters: Value,
    /// Where it came from, for messages.
    pub origin: String,
}

impl Constraint {
    /// `Kind/name`, the policy's name in messages, warnings and annotations.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// What a decision is about: Gatekeeper's `input.review`.
#[derive(Clone, Debug, PartialEq)]
pub struct Review {
    /// `CREATE`, `UPDATE`, `DELETE`, `CONNECT`.
    pub operation: String,
    /// API group of the object's kind (`soma.dev`).
    pub group: String,
    /// API version (`v1alpha1`).
    pub version: String,
    /// Kind (`Agent`).
    pub kind: String,
    /// Namespace; empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The object as it would be stored.
    pub object: Value,
    /// The object before an UPDATE.
    pub old_object: Option<Value>,
    /// Who asks (`userInfo`).
    pub user_info: Value,
    /// A dry-run request.
    pub dry_run: bool,
}

impl Review {
    /// A CREATE review of `object`, taking kind, namespace and name from the object itself
    /// (what `gator` and the reconcile-time re-check do).
    pub fn of_object(object: Value) -> Self {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), api_version.to_owned()),
        };
        let meta = |k: &str| {
            object
                .pointer(&format!("/metadata/{k}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Self {
            operation: "CREATE".to_owned(),
            group,
            version,
            kind: object
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            namespace: meta("namespace"),
            name: meta("name"),
            old_object: None,
            user_info: json!({}),
            dry_run: false,
            object,
        }
    }

    /// The `input.review` document.
    pub fn to_input(&self) -> Value {
        let mut review = json!({
            "kind": {"group": self.group, "version": self.version, "kind": self.kind},
            "operation": self.operation,
            "namespace": self.namespace,
            "name": self.name,
            "object": self.object,
            "userInfo": self.user_info,
            "dryRun": self.dry_run,
        });
        if let (Some(old), Some(map)) = (&self.old_object, review.as_object_mut()) {
            map.insert("oldObject".to_owned(), old.clone());
        }
        review
    }

    /// The object's labels.
    pub(crate) fn labels(&self) -> Option<&serde_json::Map<String, Value>> {
        self.object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
    }
}
