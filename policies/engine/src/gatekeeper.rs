//! Reading Gatekeeper documents: ConstraintTemplates and constraints, from YAML or JSON,
//! unchanged.

use serde::Deserialize;
use serde_json::Value;

use crate::error::PolicyError;
use crate::model::{Action, Constraint, Match, Template};

/// Every document in a YAML (multi-document) or JSON text. `List` objects are flattened.
pub fn documents(text: &str, origin: &str) -> Result<Vec<Value>, PolicyError> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)
            .map_err(|e| PolicyError::doc(origin, format!("not valid YAML or JSON: {e}")))?;
        match value {
            Value::Null => {}
            Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                if let Some(items) = map.get("items").and_then(Value::as_array) {
                    out.extend(items.iter().cloned());
                }
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Whether a document is a ConstraintTemplate.
pub fn is_template(doc: &Value) -> bool {
    doc.get("kind").and_then(Value::as_str) == Some("ConstraintTemplate")
        && api_group(doc) == "templates.gatekeeper.sh"
}

/// Whether a document is a constraint (`constraints.gatekeeper.sh/*`).
pub fn is_constraint(doc: &Value) -> bool {
    api_group(doc) == "constraints.gatekeeper.sh"
}

fn api_group(doc: &Value) -> &str {
    doc.get("apiVersion")
        .and_then(Value::as_str)
        .and_then(|v| v.split_once('/'))
        .map(|(g, _)| g)
        .unwrap_or_default()
}

fn str_at<'a>(doc: &'a Value, pointer: &str) -> Option<&'a str> {
    doc.pointer(pointer).and_then(Value::as_str)
}

/// Reads a ConstraintTemplate (`templates.gatekeeper.sh/v1`, `v1beta1`, `v1alpha1`).
///
/// The Rego comes from `spec.targets[0].code[engine=Rego].source` when present (its
/// `version: "v1"` selects Rego v1) and from `spec.targets[0].rego` (Rego v0) otherwise.
pub fn template(doc: &Value, origin: &str) -> Result<Template, PolicyError> {
    let name = str_at(doc, "/metadata/name")
        .ok_or_else(|| PolicyError::doc(origin, "ConstraintTemplate has no metadata.name"))?;
    let kind = str_at(doc, "/spec/crd/spec/names/kind").ok_or_else(|| {
        PolicyError::doc(
            origin,
            format!("ConstraintTemplate {name} has no spec.crd.spec.names.kind"),
        )
    })?;
    if name != kind.to_ascii_lowercase() {
        return Err(PolicyError::doc(
            origin,
            format!(
                "ConstraintTemplate {name}: metadata.name must be the lower-cased kind {:?}",
                kind.to_ascii_lowercase()
            ),
        ));
    }
    let targets = doc
        .pointer("/spec/targets")
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            PolicyError::doc(
                origin,
                format!("ConstraintTemplate {name} has no spec.targets"),
            )
        })?;
    if targets.len() > 1 {
        return Err(PolicyError::doc(
            origin,
            format!(
                "ConstraintTemplate {name} has {} targets; exactly one is supported",
                targets.len()
            ),
        ));
    }
    let target = &targets[0];
    if let Some(t) = str_at(target, "/target")
        && t != "admission.k8s.gatekeeper.sh"
    {
        return Err(PolicyError::doc(
            origin,
            format!(
                "ConstraintTemplate {name} targets {t:?}; only admission.k8s.gatekeeper.sh is supported"
            ),
        ));
    }
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let code = target
        .get("code")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|e| str_at(e, "/engine") == Some("Rego")));
    let (rego, libs, rego_v1) = match code {
        Some(entry) => {
            let source = entry.get("source").cloned().unwrap_or(Value::Null);
            let rego = str_at(&source, "/rego").ok_or_else(|| {
                PolicyError::doc(
                    origin,
                    format!("ConstraintTemplate {name}: code[Rego].source.rego is missing"),
                )
            })?;
            let v1 = str_at(&source, "/version").is_some_and(|v| v.eq_ignore_ascii_case("v1"));
            (rego.to_owned(), strings(source.get("libs")), v1)
        }
        None => {
            let rego = str_at(target, "/rego").ok_or_else(|| {
                PolicyError::doc(
                    origin,
                    format!("ConstraintTemplate {name}: spec.targets[0].rego is missing"),
                )
            })?;
            (rego.to_owned(), strings(target.get("libs")), false)
        }
    };
    Ok(Template {
        name: name.to_owned(),
        kind: kind.to_owned(),
        rego,
        libs,
        rego_v1,
        origin: origin.to_owned(),
    })
}

/// Reads a constraint. `enforcementAction` defaults to `deny`; `scoped` takes the action
/// listed for the `validation.gatekeeper.sh` (or `*`) enforcement point.
pub fn constraint(doc: &Value, origin: &str) -> Result<Constraint, PolicyError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| PolicyError::doc(origin, "constraint has no kind"))?;
    let name = str_at(doc, "/metadata/name").ok_or_else(|| {
        PolicyError::doc(origin, format!("{kind} constraint has no metadata.name"))
    })?;
    let spec = doc.get("spec").cloned().unwrap_or(Value::Null);
    let action_text = str_at(&spec, "/enforcementAction").unwrap_or("deny");
    let action = if action_text.eq_ignore_ascii_case("scoped") {
        scoped_action(&spec)
    } else {
        Action::parse(action_text)
    }
    .ok_or_else(|| {
        PolicyError::doc(
            origin,
            format!(
                "{kind}/{name}: enforcementAction {action_text:?} is not one of deny, warn, dryrun"
            ),
        )
    })?;
    let matches = match spec.get("match") {
        Some(m) if !m.is_null() => serde_json::from_value::<Match>(m.clone())
            .map_err(|e| PolicyError::doc(origin, format!("{kind}/{name}: spec.match: {e}")))?,
        _ => Match::default(),
    };
    let parameters = match spec.get("parameters") {
        Some(p) if !p.is_null() => p.clone(),
        _ => Value::Object(serde_json::Map::new()),
    };
    Ok(Constraint {
        kind: kind.to_owned(),
        name: name.to_owned(),
        action,
        matches,
        parameters,
        origin: origin.to_owned(),
    })
}

fn scoped_action(spec: &Value) -> Option<Action> {
    spec.get("scopedEnforcementActions")?
        .as_array()?
        .iter()
        .filter(|entry| {
            entry
                .get("enforcementPoints")
                .and_then(Value::as_array)
                .is_some_and(|points| {
                    points.iter().any(|p| {
                        matches!(str_at(p, "/name"), Some("validation.gatekeeper.sh" | "*"))
                    })
                })
        })
        .filter_map(|entry| str_at(entry, "/action").and_then(Action::parse))
        .min()
}
