//! Pure: the documents one policy load reads, and which ConfigMap each load error belongs to
//! (so its Warning Event lands on the object a person must fix).

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use serde_json::Value;
use soma_policy::{PolicyError, Sources, gatekeeper};

/// Built-ins, then every ConfigMap (in name order, each key a YAML or JSON file), then `dir`.
pub fn sources(config_maps: &[ConfigMap], dir: Option<&Path>) -> Sources {
    let mut sources = Sources::builtins();
    let mut sorted: Vec<&ConfigMap> = config_maps.iter().collect();
    sorted.sort_by_key(|c| c.name_any());
    for cm in sorted {
        let empty = BTreeMap::new();
        let data = cm.data.as_ref().unwrap_or(&empty);
        sources.add_config_map(&cm.namespace().unwrap_or_default(), &cm.name_any(), data);
    }
    if let Some(dir) = dir {
        sources.add_dir(dir);
    }
    sources
}

/// The ConfigMap name an origin (`configmap/<ns>/<name>/<key>`) points at.
fn config_map_of(origin: &str) -> Option<&str> {
    let mut parts = origin.strip_prefix("configmap/")?.splitn(3, '/');
    let _namespace = parts.next()?;
    parts.next()
}

/// Groups load errors by the ConfigMap that caused them. Errors of documents from elsewhere
/// (the directory, the built-ins) are returned under `None`.
pub fn errors_by_config_map<'a>(
    sources: &Sources,
    errors: &'a [PolicyError],
) -> BTreeMap<Option<String>, Vec<&'a PolicyError>> {
    // Where each template kind and constraint was defined.
    let mut template_origin: BTreeMap<&str, &str> = BTreeMap::new();
    let mut constraint_origin: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for (origin, doc) in &sources.documents {
        if gatekeeper::is_template(doc) {
            if let Some(kind) = doc
                .pointer("/spec/crd/spec/names/kind")
                .and_then(Value::as_str)
            {
                template_origin.insert(kind, origin);
            }
        } else if let (Some(kind), Some(name)) = (
            doc.get("kind").and_then(Value::as_str),
            doc.pointer("/metadata/name").and_then(Value::as_str),
        ) {
            constraint_origin.insert((kind, name), origin);
        }
    }
    let mut out: BTreeMap<Option<String>, Vec<&PolicyError>> = BTreeMap::new();
    for e in errors {
        let origin = match e {
            PolicyError::Document { origin, .. } => Some(origin.as_str()),
            PolicyError::Compile { template, .. } => {
                template_origin.get(template.as_str()).copied()
            }
            PolicyError::UnknownKind { kind, name } => constraint_origin
                .get(&(kind.as_str(), name.as_str()))
                .copied(),
            PolicyError::Io { path, .. } => Some(path.as_str()),
        };
        let cm = origin.and_then(config_map_of).map(str::to_owned);
        out.entry(cm).or_default().push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn cm(name: &str, key: &str, text: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("soma-system".into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(key.to_owned(), text.to_owned())])),
            ..ConfigMap::default()
        }
    }

    const BROKEN_TEMPLATE: &str = r#"
apiVersion: templates.gatekeeper.sh/v1
kind: ConstraintTemplate
metadata: {name: k8sbroken}
spec:
  crd: {spec: {names: {kind: K8sBroken}}}
  targets:
    - target: admission.k8s.gatekeeper.sh
      rego: |
        package k8sbroken
        violation[{"msg": msg}] { this is not rego
"#;

    #[test]
    fn errors_are_attributed_to_the_config_map_that_caused_them() {
        let maps = [
            cm(
                "good",
                "c.yaml",
                "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: SomaImages\nmetadata: {name: strict}\nspec: {parameters: {requireDigest: true}}\n",
            ),
            cm("bad-yaml", "x.yaml", "a: [unclosed"),
            cm("bad-rego", "t.yaml", BROKEN_TEMPLATE),
            cm(
                "orphan",
                "c.yaml",
                "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: NoSuchKind\nmetadata: {name: x}\nspec: {}\n",
            ),
        ];
        let s = sources(&maps, None);
        let store = soma_policy::PolicyStore::new();
        let report = store.load(&s);
        let by_cm = errors_by_config_map(&s, &report.errors);
        let labels = |name: &str| -> Vec<&str> {
            by_cm
                .get(&Some(name.to_owned()))
                .map(|v| v.iter().map(|e| e.label()).collect())
                .unwrap_or_default()
        };
        assert_eq!(labels("bad-yaml"), ["InvalidPolicyDocument"]);
        assert_eq!(labels("bad-rego"), ["PolicyCompileError"]);
        assert_eq!(labels("orphan"), ["UnknownConstraintKind"]);
        assert!(labels("good").is_empty());
        assert!(!by_cm.contains_key(&None), "{by_cm:?}");
        // The good ConfigMap's constraint is served beside the built-ins.
        assert!(report.constraints.contains(&"SomaImages/strict".to_owned()));
    }

    #[test]
    fn origin_parsing() {
        assert_eq!(config_map_of("configmap/ns/name/key.yaml"), Some("name"));
        assert_eq!(config_map_of("/etc/policies/a.yaml"), None);
    }
}
