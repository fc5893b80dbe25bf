//! Budget identity and the one resolver of a Budget chain.
//!
//! A Budget is `namespace/name` everywhere ([`BudgetKey`]): in the sidecar's configuration, in
//! lease windows, usage records, NATS subjects and metric labels. Two tenants that both call
//! their Budget `team` never share anything. A recreated Budget (same name, new `uid`) starts
//! with fresh windows: the uid travels beside the key ([`BudgetRef`]) wherever spend is kept.
//!
//! An Agent (or Job) names one Budget; each Budget may name a parent, possibly in another
//! namespace when the parent grants it (`allowedChildNamespaces`, in the spirit of Gateway
//! API's ReferenceGrant). [`resolve`] walks that chain with one set of rules, used by the
//! operator's reconcile, by `soma-operator render` and by the sidecar:
//!
//! ```text
//!  start ─► lookup ─found─► parent? ─no─► done
//!             │                └─yes─► grant allows child's namespace? ─no─► NotGranted
//!             │                            └─yes─► seen? ─yes─► Loop ; depth > 8 ─► TooDeep
//!             └─missing─► Missing { key, field to fix }
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::budget::BudgetDef;

/// Budgets followed before a chain is called too deep.
pub const MAX_CHAIN: usize = 8;

/// A Budget's identity: its namespace and name. Written `namespace/name` (a Kubernetes
/// namespace never holds a `/`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetKey {
    /// The Budget's namespace.
    pub namespace: String,
    /// The Budget's name.
    pub name: String,
}

impl BudgetKey {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> BudgetKey {
        BudgetKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Reads `namespace/name`, or a bare `name` in `default_namespace` (a reference without a
    /// namespace means the referrer's own, as in the CRDs).
    pub fn parse_in(default_namespace: &str, text: &str) -> Result<BudgetKey, KeyError> {
        match text.split_once('/') {
            Some((ns, name)) => BudgetKey::checked(ns, name, text),
            None => BudgetKey::checked(default_namespace, text, text),
        }
    }

    fn checked(namespace: &str, name: &str, text: &str) -> Result<BudgetKey, KeyError> {
        let ok = |s: &str| !s.is_empty() && !s.contains(['/', ',', '@', ' ']);
        if ok(namespace) && ok(name) {
            Ok(BudgetKey::new(namespace, name))
        } else {
            Err(KeyError(text.to_owned()))
        }
    }
}

impl fmt::Display for BudgetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for BudgetKey {
    type Err = KeyError;

    /// Only the full `namespace/name`.
    fn from_str(s: &str) -> Result<BudgetKey, KeyError> {
        match s.split_once('/') {
            Some((ns, name)) => BudgetKey::checked(ns, name, s),
            None => Err(KeyError(s.to_owned())),
        }
    }
}

impl Serialize for BudgetKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BudgetKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BudgetKey, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A Budget key that does not read as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Budget reference of the form namespace/name")]
pub struct KeyError(pub String);

/// One incarnation of a Budget: its key and the uid Kubernetes gave it. Spend, windows and
/// leases belong to the incarnation, so a Budget deleted and created again under the same name
/// does not inherit the old one's spend. The uid is empty where none is known (a manifest
/// rendered offline, a local configuration).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetRef {
    /// `namespace/name`.
    pub key: BudgetKey,
    /// `metadata.uid`, or empty.
    pub uid: String,
}

impl BudgetRef {
    /// How a usage record names the Budget it was charged to: `namespace/name@uid`, or
    /// `namespace/name` without a uid.
    pub fn label(&self) -> String {
        if self.uid.is_empty() {
            self.key.to_string()
        } else {
            format!("{}@{}", self.key, self.uid)
        }
    }

    /// Reads [`BudgetRef::label`] back.
    pub fn parse_label(text: &str) -> Result<BudgetRef, KeyError> {
        let (key, uid) = text.split_once('@').unwrap_or((text, ""));
        Ok(BudgetRef {
            key: key.parse()?,
            uid: uid.to_owned(),
        })
    }

    /// The comma-separated chain label a usage record carries (`a/team@u1,platform/tenant@u2`).
    pub fn chain_label<'a>(chain: impl IntoIterator<Item = &'a BudgetRef>) -> String {
        chain
            .into_iter()
            .map(BudgetRef::label)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Reads [`BudgetRef::chain_label`] back (an empty label is an empty chain).
    pub fn parse_chain(text: &str) -> Result<Vec<BudgetRef>, KeyError> {
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(BudgetRef::parse_label)
            .collect()
    }
}

impl fmt::Display for BudgetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Why a chain cannot be enforced. Each names the Budget and the field a user fixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainProblem {
    /// A Budget the chain names does not exist (or is not known here).
    Missing {
        /// The Budget named.
        key: BudgetKey,
        /// Where it is named: `spec.budgetRef`, or `spec.parentRef of Budget "ns/name"`.
        field: String,
    },
    /// A parent in another namespace does not list the child's namespace in
    /// `spec.allowedChildNamespaces`.
    NotGranted {
        /// The child Budget.
        child: BudgetKey,
        /// The parent it names.
        parent: BudgetKey,
    },
    /// `parentRef`s come back to a Budget already in the chain.
    Loop {
        /// The chain up to and including the repeated Budget.
        path: Vec<BudgetKey>,
    },
    /// More than [`MAX_CHAIN`] Budgets.
    TooDeep {
        /// The first [`MAX_CHAIN`] Budgets.
        path: Vec<BudgetKey>,
    },
}

impl ChainProblem {
    /// The condition reason: `BudgetNotFound`, `BudgetParentNotGranted`, `BudgetChainInvalid`.
    pub fn reason(&self) -> &'static str {
        match self {
            ChainProblem::Missing { .. } => "BudgetNotFound",
            ChainProblem::NotGranted { .. } => "BudgetParentNotGranted",
            ChainProblem::Loop { .. } | ChainProblem::TooDeep { .. } => "BudgetChainInvalid",
        }
    }

    /// The Budget the problem is about: the missing one, or the child whose parent refuses.
    pub fn key(&self) -> Option<&BudgetKey> {
        match self {
            ChainProblem::Missing { key, .. } => Some(key),
            ChainProblem::NotGranted { child, .. } => Some(child),
            _ => None,
        }
    }
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = |p: &[BudgetKey]| {
            p.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" -> ")
        };
        match self {
            ChainProblem::Missing { key, field } => write!(
                f,
                "Budget {:?} does not exist in namespace {:?}; create it or correct {field}",
                key.name, key.namespace
            ),
            ChainProblem::NotGranted { child, parent } => write!(
                f,
                "Budget {parent} does not allow children from namespace {:?}: add {:?} to its spec.allowedChildNamespaces, or correct spec.parentRef of Budget {child}",
                child.namespace, child.namespace
            ),
            ChainProblem::Loop { path: p } => write!(
                f,
                "the Budget parent chain {} loops; correct a Budget's spec.parentRef",
                path(p)
            ),
            ChainProblem::TooDeep { path: p } => write!(
                f,
                "the Budget parent chain {} is deeper than {MAX_CHAIN}; correct a Budget's spec.parentRef",
                path(p)
            ),
        }
    }
}

/// A walked chain: the Budgets found, in order from the one named first, and what stopped the
/// walk, if anything. Even a broken chain lists what it found, so that callers can watch every
/// Budget it passed through.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    /// The Budgets found, the named one first, then each parent.
    pub budgets: Vec<BudgetDef>,
    /// Why the chain cannot be enforced.
    pub problem: Option<ChainProblem>,
}

impl Resolution {
    /// Every Budget the walk looked at, found, missing or refusing its child: what a
    /// controller watches.
    pub fn touched(&self) -> Vec<BudgetKey> {
        let mut keys: Vec<BudgetKey> = self.budgets.iter().map(BudgetDef::key).collect();
        keys.extend(self.stopped_at().cloned());
        keys
    }

    /// The Budget the walk stopped at outside the chain: missing, or a parent that does not
    /// grant its child's namespace.
    pub fn stopped_at(&self) -> Option<&BudgetKey> {
        match &self.problem {
            Some(ChainProblem::Missing { key, .. }) => Some(key),
            Some(ChainProblem::NotGranted { parent, .. }) => Some(parent),
            _ => None,
        }
    }

    /// The chain when it has no problem.
    pub fn valid(&self) -> Option<&[BudgetDef]> {
        self.problem.is_none().then_some(self.budgets.as_slice())
    }
}

/// Whether `parent` lets a Budget in `child_namespace` name it: always within its own
/// namespace; across namespaces only when listed in `allowedChildNamespaces` (or `*`).
pub fn grants(parent: &BudgetDef, child_namespace: &str) -> bool {
    parent.namespace == child_namespace
        || parent
            .allowed_child_namespaces
            .iter()
            .any(|n| n == "*" || n == child_namespace)
}

/// Walks the chain from `start` (named in `field`), looking each Budget up with `lookup`.
pub fn resolve(
    start: &BudgetKey,
    field: &str,
    mut lookup: impl FnMut(&BudgetKey) -> Option<BudgetDef>,
) -> Resolution {
    let mut out = Resolution::default();
    let mut next = Some((start.clone(), field.to_owned()));
    while let Some((key, field)) = next.take() {
        let seen: Vec<BudgetKey> = out.budgets.iter().map(BudgetDef::key).collect();
        if seen.contains(&key) {
            let mut path = seen;
            path.push(key);
            out.problem = Some(ChainProblem::Loop { path });
            break;
        }
        if seen.len() >= MAX_CHAIN {
            out.problem = Some(ChainProblem::TooDeep { path: seen });
            break;
        }
        let Some(def) = lookup(&key) else {
            out.problem = Some(ChainProblem::Missing { key, field });
            break;
        };
        if let Some(child) = out.budgets.last()
            && !grants(&def, &child.namespace)
        {
            out.problem = Some(ChainProblem::NotGranted {
                child: child.key(),
                parent: key,
            });
            break;
        }
        next = def
            .parent_key()
            .map(|p| (p, format!("spec.parentRef of Budget {key}")));
        out.budgets.push(def);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Limits, ParentRef};

    fn def(ns: &str, name: &str, parent: Option<(&str, &str)>, grants: &[&str]) -> BudgetDef {
        BudgetDef {
            namespace: ns.into(),
            name: name.into(),
            limits: Limits {
                tokens: Some(1),
                ..Limits::default()
            },
            parent_ref: parent.map(|(pns, pname)| ParentRef {
                namespace: (!pns.is_empty()).then(|| pns.to_owned()),
                name: pname.into(),
            }),
            allowed_child_namespaces: grants.iter().map(|s| (*s).to_owned()).collect(),
            ..BudgetDef::default()
        }
    }

    fn run(defs: &[BudgetDef], start: &str) -> Resolution {
        resolve(&start.parse().unwrap(), "spec.budgetRef", |k| {
            defs.iter().find(|d| d.key() == *k).cloned()
        })
    }

    fn names(r: &Resolution) -> Vec<String> {
        r.budgets.iter().map(|d| d.key().to_string()).collect()
    }

    #[test]
    fn table() {
        let world = vec![
            def("a", "team", Some(("", "dept")), &[]),
            def("a", "dept", Some(("platform", "tenant")), &[]),
            def("platform", "tenant", None, &["a"]),
            def("b", "team", Some(("platform", "tenant")), &[]),
            def("b", "team2", Some(("platform", "open")), &[]),
            def("platform", "open", None, &["*"]),
            def("c", "x", Some(("", "y")), &[]),
            def("c", "y", Some(("", "x")), &[]),
            def("d", "orphan", Some(("", "gone")), &[]),
            def("e", "self", Some(("", "self")), &[]),
        ];
        type Case = (&'static str, &'static [&'static str], Option<&'static str>);
        let cases: &[Case] = &[
            // Same-namespace parent, then a granted cross-namespace parent.
            ("a/team", &["a/team", "a/dept", "platform/tenant"], None),
            // Namespace b is not granted by platform/tenant.
            ("b/team", &["b/team"], Some("BudgetParentNotGranted")),
            // `*` grants every namespace.
            ("b/team2", &["b/team2", "platform/open"], None),
            ("c/x", &["c/x", "c/y"], Some("BudgetChainInvalid")),
            ("e/self", &["e/self"], Some("BudgetChainInvalid")),
            ("d/orphan", &["d/orphan"], Some("BudgetNotFound")),
            ("z/none", &[], Some("BudgetNotFound")),
        ];
        for (start, chain, problem) in cases {
            let r = run(&world, start);
            assert_eq!(names(&r), *chain, "{start}");
            assert_eq!(
                r.problem.as_ref().map(ChainProblem::reason),
                *problem,
                "{start}: {:?}",
                r.problem
            );
        }
    }

    #[test]
    fn missing_links_name_the_field_and_are_watched() {
        let world = vec![def("d", "orphan", Some(("", "gone")), &[])];
        let r = run(&world, "d/orphan");
        assert_eq!(
            r.problem,
            Some(ChainProblem::Missing {
                key: BudgetKey::new("d", "gone"),
                field: "spec.parentRef of Budget d/orphan".into()
            })
        );
        assert_eq!(
            r.touched(),
            vec![BudgetKey::new("d", "orphan"), BudgetKey::new("d", "gone")]
        );
        let msg = r.problem.unwrap().to_string();
        assert!(msg.contains("\"gone\"") && msg.contains("spec.parentRef of Budget d/orphan"));
    }

    #[test]
    fn not_granted_says_what_to_add() {
        let world = vec![
            def("b", "team", Some(("platform", "tenant")), &[]),
            def("platform", "tenant", None, &["a"]),
        ];
        let msg = run(&world, "b/team").problem.unwrap().to_string();
        assert!(
            msg.contains("allowedChildNamespaces") && msg.contains("\"b\""),
            "{msg}"
        );
    }

    #[test]
    fn too_deep() {
        let world: Vec<BudgetDef> = (0..12)
            .map(|i| {
                let parent = format!("b{}", i + 1);
                let mut d = def("n", &format!("b{i}"), None, &[]);
                d.parent_ref = Some(ParentRef {
                    namespace: None,
                    name: parent,
                });
                d
            })
            .collect();
        let r = run(&world, "n/b0");
        assert_eq!(r.budgets.len(), MAX_CHAIN);
        assert!(matches!(r.problem, Some(ChainProblem::TooDeep { .. })));
    }

    #[test]
    fn keys_and_labels_round_trip() {
        let k = BudgetKey::parse_in("research", "team").unwrap();
        assert_eq!(k.to_string(), "research/team");
        assert_eq!(
            BudgetKey::parse_in("x", "platform/tenant").unwrap(),
            BudgetKey::new("platform", "tenant")
        );
        for bad in ["", "/", "a/", "/b", "a/b/c", "a b", "a,b"] {
            assert!(bad.parse::<BudgetKey>().is_err(), "{bad}");
        }
        assert!("team".parse::<BudgetKey>().is_err());
        let chain = vec![
            BudgetRef {
                key: BudgetKey::new("a", "team"),
                uid: "u1".into(),
            },
            BudgetRef {
                key: BudgetKey::new("platform", "tenant"),
                uid: String::new(),
            },
        ];
        let label = BudgetRef::chain_label(&chain);
        assert_eq!(label, "a/team@u1,platform/tenant");
        assert_eq!(BudgetRef::parse_chain(&label).unwrap(), chain);
        assert_eq!(BudgetRef::parse_chain("").unwrap(), vec![]);
        let json = serde_json::to_string(&BudgetKey::new("a", "b")).unwrap();
        assert_eq!(json, "\"a/b\"");
        assert!(serde_json::from_str::<BudgetKey>("\"nobare\"").is_err());
    }
}
