//! Runs Rego unit tests: every rule named `test_…` in a test module, evaluated with the
//! policy it tests (what `opa test` does, without OPA).

use crate::error::PolicyError;

/// One test's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// `data.<package>.<rule>`.
    pub name: String,
    /// Whether the rule evaluated to `true`.
    pub passed: bool,
    /// An evaluation error, if any.
    pub error: Option<String>,
}

/// Runs every `test_` rule of `tests` against `modules` (path, Rego v1 source).
pub fn run(modules: &[(&str, &str)], tests: (&str, &str)) -> Result<Vec<TestOutcome>, PolicyError> {
    let mut engine = regorus::Engine::new();
    for (path, rego) in modules.iter().chain(std::iter::once(&tests)) {
        engine
            .add_policy((*path).to_owned(), (*rego).to_owned())
            .map_err(|e| PolicyError::Compile {
                template: (*path).to_owned(),
                message: e.to_string(),
            })?;
    }
    let package =
        package_of(tests.1).ok_or_else(|| PolicyError::doc(tests.0, "no package line"))?;
    let mut names: Vec<String> = tests
        .1
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            l.starts_with("test_").then(|| {
                l.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
        })
        .collect();
    names.dedup();
    let mut out = Vec::new();
    for rule in names {
        let name = format!("data.{package}.{rule}");
        let result = engine.eval_rule(name.clone());
        out.push(match result {
            Ok(v) => TestOutcome {
                name,
                passed: v == regorus::Value::from(true),
                error: None,
            },
            Err(e) => TestOutcome {
                name,
                passed: false,
                error: Some(e.to_string()),
            },
        });
    }
    Ok(out)
}

fn package_of(rego: &str) -> Option<String> {
    rego.lines()
        .find_map(|l| l.trim().strip_prefix("package "))
        .map(|p| p.trim().to_owned())
}
