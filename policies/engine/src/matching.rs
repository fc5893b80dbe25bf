//! Whether a constraint's `spec.match` selects a review (Gatekeeper's semantics).

use serde_json::Value;

use crate::model::{Match, Review};

/// Whether `m` selects `review`; `namespace_labels` are the labels of the review's namespace
/// when the inventory knows it.
pub(crate) fn selects(
    m: &Match,
    review: &Review,
    namespace_labels: Option<&serde_json::Map<String, Value>>,
) -> bool {
    kinds_match(m, review)
        && scope_matches(m, review)
        && namespaces_match(m, review)
        && m.name.as_deref().is_none_or(|n| glob(n, &review.name))
        && m.label_selector
            .as_ref()
            .is_none_or(|sel| selector_matches(sel, review.labels()))
        && m.namespace_selector.as_ref().is_none_or(|sel| {
            if review.kind == "Namespace" && review.group.is_empty() {
                selector_matches(sel, review.labels())
            } else {
                !review.namespace.is_empty() && selector_matches(sel, namespace_labels)
            }
        })
}

fn kinds_match(m: &Match, review: &Review) -> bool {
    m.kinds.is_empty()
        || m.kinds.iter().any(|k| {
            (k.api_groups.is_empty() || k.api_groups.iter().any(|g| g == "*" || *g == review.group))
                && (k.kinds.is_empty() || k.kinds.iter().any(|x| x == "*" || *x == review.kind))
        })
}

fn scope_matches(m: &Match, review: &Review) -> bool {
    match m.scope.as_deref() {
        Some("Cluster") => review.namespace.is_empty(),
        Some("Namespaced") => !review.namespace.is_empty(),
        _ => true,
    }
}

fn namespaces_match(m: &Match, review: &Review) -> bool {
    // Gatekeeper applies namespaces/excludedNamespaces to namespaced objects and to
    // Namespace objects themselves (by name); other cluster-scoped objects are unaffected.
    let ns = if review.kind == "Namespace" && review.group.is_empty() {
        review.name.as_str()
    } else {
        review.namespace.as_str()
    };
    if ns.is_empty() {
        return true;
    }
    (m.namespaces.is_empty() || m.namespaces.iter().any(|p| glob(p, ns)))
        && !m.excluded_namespaces.iter().any(|p| glob(p, ns))
}

/// Gatekeeper's namespace and name patterns: exact, or a prefix ending in `*` (and a
/// leading `*` for a suffix).
fn glob(pattern: &str, value: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

/// A metav1.LabelSelector: `matchLabels` and `matchExpressions` (In, NotIn, Exists,
/// DoesNotExist).
fn selector_matches(selector: &Value, labels: Option<&serde_json::Map<String, Value>>) -> bool {
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    let labels_ok = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .is_none_or(|want| want.iter().all(|(k, v)| get(k) == v.as_str()));
    let exprs_ok = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_none_or(|exprs| {
            exprs.iter().all(|e| {
                let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
                let values: Vec<&str> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|v| v.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                match e.get("operator").and_then(Value::as_str) {
                    Some("In") => get(key).is_some_and(|v| values.contains(&v)),
                    Some("NotIn") => get(key).is_none_or(|v| !values.contains(&v)),
                    Some("Exists") => get(key).is_some(),
                    Some("DoesNotExist") => get(key).is_none(),
                    _ => false,
                }
            })
        });
    labels_ok && exprs_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(kind: &str, ns: &str, labels: Value) -> Review {
        Review::of_object(json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": kind,
            "metadata": {"name": "x", "namespace": ns, "labels": labels}
        }))
    }

    fn m(v: Value) -> Match {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn kinds_namespaces_and_selectors() {
        let r = review("Agent", "team-a", json!({"tier": "prod"}));
        assert!(selects(&Match::default(), &r, None));
        assert!(selects(
            &m(json!({"kinds": [{"apiGroups": ["soma.dev"], "kinds": ["Agent"]}]})),
            &r,
            None
        ));
        assert!(!selects(
            &m(json!({"kinds": [{"apiGroups": [""], "kinds": ["Agent"]}]})),
            &r,
            None
        ));
        assert!(selects(
            &m(json!({"kinds": [{"apiGroups": ["*"], "kinds": ["*"]}]})),
            &r,
            None
        ));
        assert!(selects(&m(json!({"namespaces": ["team-*"]})), &r, None));
        assert!(!selects(
            &m(json!({"excludedNamespaces": ["team-a"]})),
            &r,
            None
        ));
        assert!(!selects(&m(json!({"scope": "Cluster"})), &r, None));
        assert!(selects(
            &m(json!({"labelSelector": {"matchLabels": {"tier": "prod"}}})),
            &r,
            None
        ));
        assert!(!selects(
            &m(
                json!({"labelSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["prod"]}]}})
            ),
            &r,
            None
        ));
        let ns_labels = json!({"env": "prod"});
        let sel = m(json!({"namespaceSelector": {"matchLabels": {"env": "prod"}}}));
        assert!(selects(&sel, &r, ns_labels.as_object()));
        assert!(!selects(&sel, &r, None));
    }
}
