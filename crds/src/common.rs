//! Small types shared by several resources: references and kstatus condition helpers.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A reference to another Soma object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct LocalRef {
    /// Name of the referenced object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key inside a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// A key inside a ConfigMap in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the ConfigMap.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// kstatus condition types every Soma resource reports.
pub mod condition_types {
    /// The resource is serving / usable.
    pub const READY: &str = "Ready";
    /// Soma is still working towards the desired state.
    pub const RECONCILING: &str = "Reconciling";
    /// Soma cannot make progress without a change by the user.
    pub const STALLED: &str = "Stalled";
    /// A Job finished successfully.
    pub const COMPLETE: &str = "Complete";
    /// A Job finished unsuccessfully.
    pub const FAILED: &str = "Failed";
}

/// The schema extension that makes `conditions` a list-map keyed by `type`, so that
/// server-side apply merges conditions by type instead of replacing the list.
pub(crate) fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema =
        generator.subschema_for::<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// An object whose fields the API server keeps as given (`x-kubernetes-preserve-unknown-fields`).
pub(crate) fn preserved_object_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}
