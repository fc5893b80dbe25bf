//! The policy set the webhook serves, and reloading it without ever serving a broken one.
//!
//! A reload compiles every template it is given. A template that fails to compile keeps its
//! previous compiled version (if it had one) and is reported; its constraints keep working
//! against the last good Rego. A constraint whose document is broken keeps its previous
//! version too. The errors come back in a [`LoadReport`] for Events and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::builtin::BUILTINS;
use crate::error::PolicyError;
use crate::gatekeeper;
use crate::model::{Constraint, Template};
use crate::set::{Compiled, PolicySet};

/// Where policies come from: the built-ins, plus documents (ConstraintTemplates and
/// constraints) from ConfigMaps or a directory.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// Include Soma's built-in policies.
    pub builtins: bool,
    /// `(origin, document)` pairs.
    pub documents: Vec<(String, Value)>,
    /// Documents that could not be read at all.
    pub unreadable: Vec<(String, String)>,
}

impl Sources {
    /// The built-ins alone.
    pub fn builtins() -> Self {
        Self {
            builtins: true,
            ..Self::default()
        }
    }

    /// Adds every document of a YAML or JSON text.
    pub fn add_text(&mut self, origin: &str, text: &str) {
        match gatekeeper::documents(text, origin) {
            Ok(docs) => self
                .documents
                .extend(docs.into_iter().map(|d| (origin.to_owned(), d))),
            Err(e) => self.unreadable.push((origin.to_owned(), e.to_string())),
        }
    }

    /// Adds a ConfigMap's data (each key a YAML or JSON file).
    pub fn add_config_map(&mut self, namespace: &str, name: &str, data: &BTreeMap<String, String>) {
        for (key, text) in data {
            self.add_text(&format!("configmap/{namespace}/{name}/{key}"), text);
        }
    }

    /// Adds every `.yaml`, `.yml` and `.json` file under `dir` (recursively, in name order).
    pub fn add_dir(&mut self, dir: &Path) {
        let mut files = Vec::new();
        collect_files(dir, &mut files, &mut self.unreadable);
        files.sort();
        for path in files {
            match std::fs::read_to_string(&path) {
                Ok(text) => self.add_text(&path.display().to_string(), &text),
                Err(e) => self
                    .unreadable
                    .push((path.display().to_string(), e.to_string())),
            }
        }
    }
}

fn collect_files(
    dir: &Path,
    out: &mut Vec<std::path::PathBuf>,
    errors: &mut Vec<(String, String)>,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push((dir.display().to_string(), e.to_string()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out, errors);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(path);
        }
    }
}

/// What a load did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Template kinds now served.
    pub templates: Vec<String>,
    /// Constraints now served (`Kind/name`).
    pub constraints: Vec<String>,
    /// Templates or constraints still served in their previous version because the new one
    /// is broken.
    pub kept_previous: Vec<String>,
    /// Everything that went wrong.
    pub errors: Vec<PolicyError>,
}

impl LoadReport {
    /// Whether everything loaded.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// The current policy set, swapped atomically on reload.
#[derive(Debug)]
pub struct PolicyStore {
    current: RwLock<Arc<PolicySet>>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl PolicyStore {
    /// An empty store (no policies: everything is allowed until a load).
    pub fn new() -> Self {
        Self {
            current: RwLock::new(Arc::new(PolicySet::default())),
        }
    }

    /// A store loaded from `sources`.
    pub fn loaded(sources: &Sources) -> (Self, LoadReport) {
        let store = Self::new();
        let report = store.load(sources);
        (store, report)
    }

    /// The set to evaluate against.
    pub fn current(&self) -> Arc<PolicySet> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, set: PolicySet) {
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(set),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(set),
        }
    }

    /// Replaces the inventory (`data.inventory`) the policies see.
    pub fn set_inventory(&self, inventory: Value) -> Result<(), PolicyError> {
        let next = self.current().with_inventory(inventory)?;
        self.replace(next);
        Ok(())
    }

    /// Loads `sources`, keeping the previous version of anything broken. Never leaves the
    /// store without a set.
    pub fn load(&self, sources: &Sources) -> LoadReport {
        let previous = self.current();
        let inventory = previous.inventory.clone();
        let mut report = LoadReport::default();
        for (origin, message) in &sources.unreadable {
            report
                .errors
                .push(PolicyError::doc(origin, message.clone()));
        }

        // Templates.
        let mut templates: Vec<Template> = Vec::new();
        if sources.builtins {
            templates.extend(BUILTINS.iter().map(|b| b.template()));
        }
        let mut broken_template_kinds = BTreeSet::new();
        for (origin, doc) in sources
            .documents
            .iter()
            .filter(|(_, d)| gatekeeper::is_template(d))
        {
            match gatekeeper::template(doc, origin) {
                Ok(t) if templates.iter().any(|x| x.kind == t.kind) => {
                    report.errors.push(PolicyError::doc(
                        origin,
                        format!(
                            "a template for kind {} is already loaded; ignoring this one",
                            t.kind
                        ),
                    ));
                }
                Ok(t) => templates.push(t),
                Err(e) => {
                    if let Some(kind) = doc
                        .pointer("/spec/crd/spec/names/kind")
                        .and_then(Value::as_str)
                    {
                        broken_template_kinds.insert(kind.to_owned());
                    }
                    report.errors.push(e);
                }
            }
        }
        let mut compiled: BTreeMap<String, Arc<Compiled>> = BTreeMap::new();
        for t in &templates {
            if let Some(old) = previous.templates.get(&t.kind)
                && old.template == *t
            {
                compiled.insert(t.kind.clone(), old.clone());
                continue;
            }
            match Compiled::compile(t, &inventory) {
                Ok(c) => {
                    compiled.insert(t.kind.clone(), Arc::new(c));
                }
                Err(e) => {
                    broken_template_kinds.insert(t.kind.clone());
                    report.errors.push(e);
                }
            }
        }
        for kind in &broken_template_kinds {
            if let Some(old) = previous.templates.get(kind)
                && !compiled.contains_key(kind)
            {
                compiled.insert(kind.clone(), old.clone());
                report.kept_previous.push(format!("template {kind}"));
            }
        }

        // Constraints.
        let mut constraints: Vec<Constraint> = Vec::new();
        for (origin, doc) in sources
            .documents
            .iter()
            .filter(|(_, d)| gatekeeper::is_constraint(d))
        {
            match gatekeeper::constraint(doc, origin) {
                Ok(c) => constraints.push(c),
                Err(e) => {
                    let kind = doc.get("kind").and_then(Value::as_str);
                    let name = doc.pointer("/metadata/name").and_then(Value::as_str);
                    if let (Some(kind), Some(name)) = (kind, name)
                        && let Some(old) = previous
                            .constraints
                            .iter()
                            .find(|c| c.kind == kind && c.name == name)
                    {
                        constraints.push(old.clone());
                        report
                            .kept_previous
                            .push(format!("constraint {kind}/{name}"));
                    }
                    report.errors.push(e);
                }
            }
        }
        if sources.builtins {
            for b in BUILTINS {
                if constraints.iter().any(|c| c.kind == b.kind) {
                    continue;
                }
                match b.default_constraint() {
                    Ok(c) => constraints.push(c),
                    Err(e) => report.errors.push(e),
                }
            }
        }
        constraints.retain(|c| {
            let known = compiled.contains_key(&c.kind);
            if !known && !broken_template_kinds.contains(&c.kind) {
                report.errors.push(PolicyError::UnknownKind {
                    kind: c.kind.clone(),
                    name: c.name.clone(),
                });
            }
            known
        });

        report.templates = compiled.keys().cloned().collect();
        report.constraints = constraints.iter().map(Constraint::id).collect();
        self.replace(PolicySet::from_parts(compiled, constraints, inventory));
        report
    }
}
