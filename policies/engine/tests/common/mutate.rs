//! Deterministic single-point mutations of fixture objects and constraint parameters, for
//! differential tests (one policy against another, the VM against the interpreter).
#![allow(dead_code)]

use serde_json::{Value, json};

/// Values any node may be replaced with.
fn generic() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(65536),
        json!(""),
        json!("x"),
        json!([]),
        json!({}),
    ]
}

const HEX: &str = "0d7c1f5e2b8a4c3d9e6f7a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d";

/// Strings a string leaf may be replaced with: shapes the built-ins treat specially.
fn strings() -> Vec<Value> {
    let digest = format!("sha256:{HEX}");
    [
        "A".to_owned(),
        "*".to_owned(),
        "-".to_owned(),
        "*.example.com".to_owned(),
        "example.com".to_owned(),
        "github.com".to_owned(),
        "API.github.com".to_owned(),
        "api.github.com:443".to_owned(),
        "https://api.github.com".to_owned(),
        "a..b.com".to_owned(),
        "-a.com".to_owned(),
        "a.c".to_owned(),
        "a.c0m".to_owned(),
        "1.2.3.4".to_owned(),
        format!("{}.com", "a".repeat(64)),
        "10.0.0.0/8".to_owned(),
        "10.1.0.0/16".to_owned(),
        "0.0.0.0/0".to_owned(),
        "169.254.169.254/32".to_owned(),
        "10.96.0.1/32".to_owned(),
        "::1/128".to_owned(),
        "fe80::1/64".to_owned(),
        "10.0.0.0/33".to_owned(),
        "nginx".to_owned(),
        "library/nginx:1".to_owned(),
        "localhost:5000/a".to_owned(),
        format!("registry.example.com/a@{digest}"),
        format!("registry.example.com.evil.io/a@{digest}"),
        format!("ghcr.io/acme/a:1@{digest}"),
        format!("ghcr.io/acme/a@sha256:{}", &HEX[1..]),
        format!("ghcr.io/acme/a@sha256:{}", HEX.to_uppercase()),
        "ghcr.io/acme/a:latest".to_owned(),
        digest,
        "sha256:xyz".to_owned(),
        "gvisor".to_owned(),
        "runc".to_owned(),
        "hour".to_owned(),
        "day".to_owned(),
        "month".to_owned(),
        "5m".to_owned(),
        "2h".to_owned(),
        "40d".to_owned(),
        "EUR".to_owned(),
        "research".to_owned(),
        "platform".to_owned(),
        "secure".to_owned(),
        "acme".to_owned(),
        "acme-tenant".to_owned(),
        "closed".to_owned(),
        "research-assistant".to_owned(),
        "unbudgeted".to_owned(),
        "restricted".to_owned(),
        "Bad_Name".to_owned(),
        "https://token.actions.githubusercontent.com".to_owned(),
        "https://github.com/acme/kb/.github/workflows/publish.yaml@refs/heads/main".to_owned(),
        "capsule-signers".to_owned(),
        "cosign.pub".to_owned(),
        "secret".to_owned(),
        "kubernetes".to_owned(),
        "appRole".to_owned(),
        "research/openai".to_owned(),
        "secret/data/research/openai".to_owned(),
        "research/../secure/openai".to_owned(),
        "a/%2e%2e/b".to_owned(),
        "{namespace}".to_owned(),
        "secret/data/{namespace}/".to_owned(),
        "https://vault.vault.svc:8200".to_owned(),
        "Agent".to_owned(),
        "Job".to_owned(),
        "Capsule".to_owned(),
        "Budget".to_owned(),
    ]
    .into_iter()
    .map(Value::String)
    .collect()
}

fn numbers() -> Vec<Value> {
    vec![
        json!(1),
        json!(7),
        json!(8),
        json!(443),
        json!(900),
        json!(3601),
        json!(7200),
        json!(1_000_001),
        json!(3_000_000_000_u64),
        json!(1e30),
    ]
}

/// Elements appended to arrays (egress rules, ports, trusted signers, namespaces).
fn elements() -> Vec<Value> {
    vec![
        json!({"host": "api.github.com"}),
        json!({"host": "*.example.com"}),
        json!({"host": "evil.io"}),
        json!({"cidr": "10.2.0.0/16"}),
        json!({"cidr": "169.254.169.254/32"}),
        json!({"cidr": "10.0.0.0/8", "host": "a.example.com"}),
        json!({}),
        json!(443),
        json!("*"),
        json!("research"),
    ]
}

/// Every JSON pointer under `v` (not the root).
fn pointers(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = format!("{prefix}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(child, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let p = format!("{prefix}/{i}");
                out.push(p.clone());
                pointers(child, &p, out);
            }
        }
        _ => {}
    }
}

fn replaced(root: &Value, pointer: &str, with: Option<Value>) -> Value {
    let mut out = root.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    let key = key.replace("~1", "/").replace("~0", "~");
    let Some(node) = out.pointer_mut(parent) else {
        return out;
    };
    match (node, with) {
        (Value::Object(m), None) => {
            m.remove(&key);
        }
        (Value::Object(m), Some(v)) => {
            m.insert(key, v);
        }
        (Value::Array(a), None) => {
            if let Ok(i) = key.parse::<usize>()
                && i < a.len()
            {
                a.remove(i);
            }
        }
        (Value::Array(a), Some(v)) => {
            if let Ok(i) = key.parse::<usize>()
                && i < a.len()
            {
                a[i] = v;
            }
        }
        _ => {}
    }
    out
}

/// How thorough: `Full` tries every replacement at every node; `Quick` a smaller pool.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Depth {
    Quick,
    Full,
}

/// Single-point variants of `v`: each node deleted or replaced (by other types, and by
/// strings and numbers the policies treat specially), and elements appended to arrays.
pub fn variants(v: &Value, depth: Depth) -> Vec<Value> {
    let mut ptrs = Vec::new();
    pointers(v, "", &mut ptrs);
    let strings = strings();
    let generic = generic();
    let mut out = Vec::new();
    for p in &ptrs {
        out.push(replaced(v, p, None));
        let node = v.pointer(p).cloned().unwrap_or(Value::Null);
        let pool: Vec<Value> = match (&node, depth) {
            (_, Depth::Full) => generic
                .iter()
                .cloned()
                .chain(if node.is_string() {
                    strings.clone()
                } else if node.is_number() {
                    numbers()
                } else {
                    Vec::new()
                })
                .collect(),
            (Value::String(_), Depth::Quick) => {
                let mut pool = vec![Value::Null, json!(0), json!("")];
                pool.extend(strings.iter().step_by(3).cloned());
                pool
            }
            (Value::Number(_), Depth::Quick) => {
                vec![Value::Null, json!("1"), json!(0), json!(-1), json!(1e30)]
            }
            (_, Depth::Quick) => vec![Value::Null, json!(false), json!([]), json!({}), json!("x")],
        };
        for with in pool {
            if with != node {
                out.push(replaced(v, p, Some(with)));
            }
        }
        if let Value::Array(a) = &node {
            for e in elements() {
                let mut longer = a.clone();
                longer.push(e);
                out.push(replaced(v, p, Some(Value::Array(longer))));
            }
        }
    }
    out
}
