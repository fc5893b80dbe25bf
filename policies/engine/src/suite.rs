//! Runs Gatekeeper `Suite` files (`test.gatekeeper.sh/v1alpha1`, the format `gator verify`
//! reads) offline: each test pairs a ConstraintTemplate with a constraint, each case reviews
//! an object (with optional inventory objects) and asserts on the violations.
//!
//! ```yaml
//! kind: Suite
//! apiVersion: test.gatekeeper.sh/v1alpha1
//! tests:
//! - name: required-labels
//!   template: template.yaml          # paths are relative to the suite file
//!   constraint: constraint.yaml
//!   cases:
//!   - name: allowed
//!     object: samples/allowed.yaml
//!     assertions: [{violations: no}]
//!   - name: disallowed
//!     object: samples/disallowed.yaml
//!     inventory: [samples/namespace.yaml]
//!     assertions: [{violations: 1, message: "must have label"}]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::error::PolicyError;
use crate::gatekeeper;
use crate::inventory;
use crate::model::Review;
use crate::set::PolicySet;

#[derive(Debug, Deserialize)]
struct SuiteDoc {
    #[serde(default)]
    tests: Vec<TestDoc>,
    #[serde(default)]
    skip: bool,
}

#[derive(Debug, Deserialize)]
struct TestDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    template: String,
    #[serde(default)]
    constraint: String,
    #[serde(default)]
    cases: Vec<CaseDoc>,
    #[serde(default)]
    skip: bool,
}

#[derive(Debug, Deserialize)]
struct CaseDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    object: String,
    #[serde(default)]
    inventory: Vec<String>,
    #[serde(default)]
    assertions: Vec<Assertion>,
    #[serde(default)]
    skip: bool,
}

#[derive(Debug, Deserialize)]
struct Assertion {
    #[serde(default)]
    violations: Option<Value>,
    #[serde(default)]
    message: Option<String>,
}

/// A suite's outcome.
#[derive(Debug)]
pub struct SuiteResult {
    /// The suite file.
    pub path: PathBuf,
    /// Whether the suite is marked `skip`.
    pub skipped: bool,
    /// An error reading the suite itself.
    pub error: Option<String>,
    /// Its tests.
    pub tests: Vec<TestResult>,
}

/// A test's outcome.
#[derive(Debug)]
pub struct TestResult {
    /// The test's name.
    pub name: String,
    /// Marked `skip`.
    pub skipped: bool,
    /// The template or constraint could not be loaded or compiled.
    pub error: Option<String>,
    /// Its cases.
    pub cases: Vec<CaseResult>,
}

/// A case's outcome.
#[derive(Debug)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Marked `skip`.
    pub skipped: bool,
    /// Why it failed; `None` when it passed.
    pub failure: Option<String>,
}

impl SuiteResult {
    /// Whether nothing failed.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.tests.iter().all(TestResult::passed)
    }
}

impl TestResult {
    /// Whether nothing failed.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.cases.iter().all(|c| c.failure.is_none())
    }
}

/// Every Suite file at `path`: the file itself, or every YAML file under a directory whose
/// `kind` is `Suite`. A trailing `/...` (as in `gator verify ./...`) is accepted.
pub fn find_suites(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let text = path.to_string_lossy();
    let path = match text
        .strip_suffix("/...")
        .or_else(|| text.strip_suffix("..."))
    {
        Some("") => PathBuf::from("."),
        Some(p) => PathBuf::from(p),
        None => path.to_path_buf(),
    };
    let meta = std::fs::metadata(&path).map_err(|source| PolicyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if meta.is_file() {
        return Ok(vec![path]);
    }
    let mut out = Vec::new();
    walk(&path, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), PolicyError> {
    let io = |source| PolicyError::Io {
        path: dir.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml"))
            && std::fs::read_to_string(&path).is_ok_and(|t| is_suite(&t))
        {
            out.push(path);
        }
    }
    Ok(())
}

fn is_suite(text: &str) -> bool {
    gatekeeper::documents(text, "").is_ok_and(|docs| {
        docs.iter().any(|d| {
            d.get("kind").and_then(Value::as_str) == Some("Suite")
                && d.get("apiVersion")
                    .and_then(Value::as_str)
                    .is_some_and(|v| v.starts_with("test.gatekeeper.sh/"))
        })
    })
}

/// Runs one suite file. `filter` selects tests and cases whose `test/case` name matches.
pub fn run_file(path: &Path, filter: Option<&regex::Regex>) -> SuiteResult {
    let mut result = SuiteResult {
        path: path.to_path_buf(),
        skipped: false,
        error: None,
        tests: Vec::new(),
    };
    let suite = match read_suite(path) {
        Ok(s) => s,
        Err(e) => {
            result.error = Some(e);
            return result;
        }
    };
    if suite.skip {
        result.skipped = true;
        return result;
    }
    let base = path.parent().unwrap_or(Path::new("."));
    for test in &suite.tests {
        result.tests.push(run_test(base, test, filter));
    }
    result
}

fn read_suite(path: &Path) -> Result<SuiteDoc, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let docs =
        gatekeeper::documents(&text, &path.display().to_string()).map_err(|e| e.to_string())?;
    let doc = docs
        .into_iter()
        .find(|d| d.get("kind").and_then(Value::as_str) == Some("Suite"))
        .ok_or_else(|| format!("{}: no document of kind Suite", path.display()))?;
    serde_json::from_value(doc).map_err(|e| format!("{}: not a valid Suite: {e}", path.display()))
}

fn read_docs(base: &Path, file: &str) -> Result<Vec<Value>, String> {
    if file.is_empty() {
        return Err("a file path is missing".to_owned());
    }
    let path = base.join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    gatekeeper::documents(&text, &path.display().to_string()).map_err(|e| e.to_string())
}

fn read_one(base: &Path, file: &str) -> Result<Value, String> {
    let mut docs = read_docs(base, file)?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        0 => Err(format!("{file}: no object")),
        n => Err(format!(
            "{file}: holds {n} objects; a case reviews exactly one"
        )),
    }
}

fn run_test(base: &Path, test: &TestDoc, filter: Option<&regex::Regex>) -> TestResult {
    let mut result = TestResult {
        name: test.name.clone(),
        skipped: test.skip,
        error: None,
        cases: Vec::new(),
    };
    if test.skip {
        return result;
    }
    let set = match load_test(base, test) {
        Ok(set) => set,
        Err(e) => {
            result.error = Some(e);
            return result;
        }
    };
    for case in &test.cases {
        let full = format!("{}/{}", test.name, case.name);
        if filter.is_some_and(|f| !f.is_match(&full)) {
            continue;
        }
        let failure = if case.skip {
            None
        } else {
            run_case(base, &set, case).err()
        };
        result.cases.push(CaseResult {
            name: case.name.clone(),
            skipped: case.skip,
            failure,
        });
    }
    result
}

fn load_test(base: &Path, test: &TestDoc) -> Result<PolicySet, String> {
    let template_doc = read_one(base, &test.template).map_err(|e| format!("template: {e}"))?;
    let template =
        gatekeeper::template(&template_doc, &test.template).map_err(|e| e.to_string())?;
    let constraint_doc =
        read_one(base, &test.constraint).map_err(|e| format!("constraint: {e}"))?;
    let constraint =
        gatekeeper::constraint(&constraint_doc, &test.constraint).map_err(|e| e.to_string())?;
    if constraint.kind != template.kind {
        return Err(format!(
            "constraint {} is of kind {}, but the template defines {}",
            constraint.name, constraint.kind, template.kind
        ));
    }
    PolicySet::compile(&[template], vec![constraint], Value::Null).map_err(|e| e.to_string())
}

fn run_case(base: &Path, set: &PolicySet, case: &CaseDoc) -> Result<(), String> {
    let object = read_one(base, &case.object).map_err(|e| format!("object: {e}"))?;
    let mut objects = Vec::new();
    for file in &case.inventory {
        objects.extend(read_docs(base, file).map_err(|e| format!("inventory: {e}"))?);
    }
    let set = if objects.is_empty() {
        set.clone()
    } else {
        set.with_inventory(inventory::from_objects(&objects))
            .map_err(|e| e.to_string())?
    };
    // gator reviews the object as a bare AdmissionRequest: kind, name, namespace, object; the
    // operation is empty.
    let mut review = Review::of_object(object);
    review.operation = String::new();
    let decision = set.evaluate(&review, Duration::from_secs(10));
    if let Some(f) = decision.failures.first() {
        return Err(format!("evaluation failed: {}", f.error));
    }
    let messages: Vec<&str> = decision.violations.iter().map(|v| v.msg.as_str()).collect();
    let default = [Assertion {
        violations: None,
        message: None,
    }];
    let assertions = if case.assertions.is_empty() {
        &default[..]
    } else {
        &case.assertions[..]
    };
    for (i, a) in assertions.iter().enumerate() {
        check(a, &messages)
            .map_err(|e| format!("assertion {i}: {e}; got messages {messages:?}"))?;
    }
    Ok(())
}

fn check(a: &Assertion, messages: &[&str]) -> Result<(), String> {
    let matching = match &a.message {
        Some(pattern) => {
            let re = regex::Regex::new(pattern).map_err(|e| {
                format!("message {pattern:?} is not a valid regular expression: {e}")
            })?;
            messages.iter().filter(|m| re.is_match(m)).count()
        }
        None => messages.len(),
    };
    let what = a
        .message
        .as_deref()
        .map(|m| format!(" matching {m:?}"))
        .unwrap_or_default();
    match &a.violations {
        None | Some(Value::Bool(true)) => expect_some(matching, &what),
        Some(Value::Bool(false)) => expect_none(matching, &what),
        Some(Value::String(s)) if s == "yes" => expect_some(matching, &what),
        Some(Value::String(s)) if s == "no" => expect_none(matching, &what),
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            let want = n.as_u64().unwrap_or_default() as usize;
            if want == matching {
                Ok(())
            } else {
                Err(format!("got {matching} violations{what} but want {want}"))
            }
        }
        Some(other) => Err(format!(
            "violations must be a non-negative integer, \"yes\" or \"no\"; got {other}"
        )),
    }
}

fn expect_some(matching: usize, what: &str) -> Result<(), String> {
    if matching == 0 {
        Err(format!("want at least one violation{what}, got none"))
    } else {
        Ok(())
    }
}

fn expect_none(matching: usize, what: &str) -> Result<(), String> {
    if matching == 0 {
        Ok(())
    } else {
        Err(format!("want no violations{what}, got {matching}"))
    }
}
