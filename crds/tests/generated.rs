//! The committed CRD YAML is exactly what `crdgen` generates from the Rust types.

mod common;

#[test]
fn committed_crd_yaml_matches_generated() {
    let root = common::repo_root();
    for dir in ["crds", "charts/soma/crds"] {
        for (file, crd) in soma_crds::all_crds() {
            let path = root.join(dir).join(file);
            let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{} is missing ({e}); run `cargo run -p soma-crds --bin crdgen`",
                    path.display()
                )
            });
            let generated = soma_crds::crd_yaml(&crd).expect("CRD serialises");
            assert!(
                committed == generated,
                "{} differs from what crdgen generates; run `cargo run -p soma-crds --bin crdgen` and commit the result",
                path.display()
            );
        }
    }
}

#[test]
fn every_crd_has_status_printer_columns_short_names_and_category() {
    for (file, crd) in soma_crds::all_crds() {
        assert_eq!(crd.spec.group, "soma.dev", "{file}");
        assert_eq!(crd.spec.scope, "Namespaced", "{file}");
        let names = &crd.spec.names;
        assert!(
            names.short_names.as_ref().is_some_and(|s| !s.is_empty()),
            "{file}: short names"
        );
        assert_eq!(
            names.categories.as_deref(),
            Some(&["soma".to_owned()][..]),
            "{file}: category"
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{file}: status subresource"
        );
        let columns = version
            .additional_printer_columns
            .as_ref()
            .expect("printer columns");
        assert!(
            columns.iter().any(|c| c.name == "Age"),
            "{file}: Age column"
        );
        let schema = serde_json::to_value(
            version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref()),
        )
        .expect("schema");
        let conditions = &schema["properties"]["status"]["properties"]["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{file}: conditions is a list-map"
        );
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"]),
            "{file}"
        );
        assert!(
            schema["properties"]["status"]["properties"]["observedGeneration"].is_object(),
            "{file}: observedGeneration"
        );
    }
}
