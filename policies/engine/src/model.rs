//! The nouns: templates, constraints, their match, enforcement actions, and the review a
//! decision is about.

use std::collections::BTreeMap;

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

    /// The `input.review` document as regorus evaluates it, built once per review (and
    /// converted straight from the JSON: the object is not copied first).
    pub fn input_value(&self) -> regorus::Value {
        let s = |v: &str| regorus::Value::from(v);
        let mut kind = BTreeMap::new();
        kind.insert(s("group"), s(&self.group));
        kind.insert(s("version"), s(&self.version));
        kind.insert(s("kind"), s(&self.kind));
        let mut review = BTreeMap::new();
        review.insert(s("kind"), regorus::Value::from(kind));
        review.insert(s("operation"), s(&self.operation));
        review.insert(s("namespace"), s(&self.namespace));
        review.insert(s("name"), s(&self.name));
        review.insert(s("object"), to_regorus(&self.object));
        review.insert(s("userInfo"), to_regorus(&self.user_info));
        review.insert(s("dryRun"), regorus::Value::from(self.dry_run));
        if let Some(old) = &self.old_object {
            review.insert(s("oldObject"), to_regorus(old));
        }
        regorus::Value::from(review)
    }

    /// The object's labels.
    pub(crate) fn labels(&self) -> Option<&serde_json::Map<String, Value>> {
        self.object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
    }
}

/// `regorus::Value::from(v.clone())` without the clone (and without serde in between): the
/// same numbers (unsigned, signed, float, as regorus' deserializer reads them), strings,
/// arrays and objects.
pub(crate) fn to_regorus(v: &Value) -> regorus::Value {
    match v {
        Value::Null => regorus::Value::Null,
        Value::Bool(b) => regorus::Value::from(*b),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                regorus::Value::from(u)
            } else if let Some(i) = n.as_i64() {
                regorus::Value::from(i)
            } else {
                regorus::Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => regorus::Value::from(s.as_str()),
        Value::Array(items) => {
            regorus::Value::from(items.iter().map(to_regorus).collect::<Vec<_>>())
        }
        Value::Object(map) => regorus::Value::from(
            map.iter()
                .map(|(k, v)| (regorus::Value::from(k.as_str()), to_regorus(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_value_is_the_converted_input_document() {
        let object = json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": "Agent",
            "metadata": {"name": "a", "namespace": "n", "labels": {"x": "y"}},
            "spec": {"n": [0, 1, -1, 1.5, 18446744073709551615_u64, -9223372036854775808_i64, 1e300],
                     "s": "", "b": true, "z": null, "o": {}, "a": []}
        });
        let mut review = Review::of_object(object.clone());
        assert_eq!(
            review.input_value(),
            regorus::Value::from(review.to_input())
        );
        review.old_object = Some(object);
        review.dry_run = true;
        assert_eq!(
            review.input_value(),
            regorus::Value::from(review.to_input())
        );
    }
}
