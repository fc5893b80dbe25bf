//! OPA built-ins that OPA deprecated but Gatekeeper templates still use (Rego v0 keeps them:
//! the gatekeeper-library's `re_match`, `any`, `all`, `set_diff`, `cast_*`). regorus does not
//! ship them, so they are added as extensions to every template's engine.

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use regorus::{Engine, Value};

fn items(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.iter().cloned().collect(),
        Value::Set(s) => s.iter().cloned().collect(),
        Value::Object(o) => o.values().cloned().collect(),
        _ => Vec::new(),
    }
}

fn arg(args: &[Value], i: usize, name: &str) -> Result<Value> {
    match args.get(i) {
        Some(v) => Ok(v.clone()),
        None => bail!("{name}: missing argument {i}"),
    }
}

/// Registers the deprecated built-ins on `engine`.
pub(crate) fn register(engine: &mut Engine) -> Result<()> {
    engine.add_extension(
        "re_match".to_owned(),
        2,
        Box::new(|args: Vec<Value>| -> Result<Value> {
            let pattern = arg(&args, 0, "re_match")?;
            let value = arg(&args, 1, "re_match")?;
            let re = regex::Regex::new(pattern.as_string()?.as_ref())?;
            Ok(Value::from(re.is_match(value.as_string()?.as_ref())))
        }),
    )?;
    engine.add_extension(
        "any".to_owned(),
        1,
        Box::new(|args: Vec<Value>| -> Result<Value> {
            let c = arg(&args, 0, "any")?;
            Ok(Value::from(
                items(&c).iter().any(|v| *v == Value::from(true)),
            ))
        }),
    )?;
    engine.add_extension(
        "all".to_owned(),
        1,
        Box::new(|args: Vec<Value>| -> Result<Value> {
            let c = arg(&args, 0, "all")?;
            Ok(Value::from(
                items(&c).iter().all(|v| *v == Value::from(true)),
            ))
        }),
    )?;
    engine.add_extension(
        "set_diff".to_owned(),
        2,
        Box::new(|args: Vec<Value>| -> Result<Value> {
            let a: BTreeSet<Value> = items(&arg(&args, 0, "set_diff")?).into_iter().collect();
            let b: BTreeSet<Value> = items(&arg(&args, 1, "set_diff")?).into_iter().collect();
            Ok(Value::from(
                a.difference(&b).cloned().collect::<BTreeSet<_>>(),
            ))
        }),
    )?;
    engine.add_extension(
        "cast_array".to_owned(),
        1,
        Box::new(|args: Vec<Value>| -> Result<Value> {
            Ok(Value::from(items(&arg(&args, 0, "cast_array")?)))
        }),
    )?;
    engine.add_extension(
        "cast_set".to_owned(),
        1,
        Box::new(|args: Vec<Value>| -> Result<Value> {
            Ok(Value::from(
                items(&arg(&args, 0, "cast_set")?)
                    .into_iter()
                    .collect::<BTreeSet<_>>(),
            ))
        }),
    )?;
    for (name, check) in [
        (
            "cast_string",
            (|v: &Value| matches!(v, Value::String(_))) as fn(&Value) -> bool,
        ),
        ("cast_boolean", |v: &Value| matches!(v, Value::Bool(_))),
        ("cast_object", |v: &Value| matches!(v, Value::Object(_))),
        ("cast_null", |v: &Value| matches!(v, Value::Null)),
    ] {
        engine.add_extension(
            name.to_owned(),
            1,
            Box::new(move |args: Vec<Value>| -> Result<Value> {
                let v = arg(&args, 0, name)?;
                if check(&v) {
                    Ok(v)
                } else {
                    bail!("{name}: wrong type")
                }
            }),
        )?;
    }
    Ok(())
}
