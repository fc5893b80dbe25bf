//! Building `data.inventory` (Gatekeeper's layout) from objects.
//!
//! ```text
//! inventory.namespace.<namespace>.<apiVersion>.<Kind>.<name> = object   (namespaced)
//! inventory.cluster.<apiVersion>.<Kind>.<name>               = object   (cluster-scoped)
//! ```

use serde_json::{Map, Value};

/// The inventory holding `objects`. Objects without kind, apiVersion or name are skipped.
pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Value>) -> Value {
    let mut root = Value::Object(Map::new());
    for obj in objects {
        insert(&mut root, obj);
    }
    root
}

/// Adds (or replaces) one object.
pub fn insert(inventory: &mut Value, obj: &Value) {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let (Some(api_version), Some(kind), Some(name)) =
        (s("/apiVersion"), s("/kind"), s("/metadata/name"))
    else {
        return;
    };
    let path: Vec<&str> = match s("/metadata/namespace") {
        Some(ns) => vec!["namespace", ns, api_version, kind],
        None => vec!["cluster", api_version, kind],
    };
    let mut node = inventory;
    for key in path {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let Some(map) = node.as_object_mut() else {
            return;
        };
        node = map
            .entry(key.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if let Some(map) = node.as_object_mut() {
        map.insert(name.to_owned(), obj.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layout_matches_gatekeeper() {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}});
        let b = json!({"apiVersion": "soma.dev/v1alpha1", "kind": "Budget", "metadata": {"name": "t", "namespace": "a"}});
        let inv = from_objects([&ns, &b, &json!({"kind": "Broken"})]);
        assert_eq!(inv["cluster"]["v1"]["Namespace"]["a"], ns);
        assert_eq!(inv["namespace"]["a"]["soma.dev/v1alpha1"]["Budget"]["t"], b);
    }
}
