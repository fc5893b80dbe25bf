//! A compiled policy set and its decision.
//!
//! Each template is parsed and prepared once into a `regorus::Engine` (with the inventory as
//! `data.inventory` when its Rego reads it); an evaluation clones that prepared engine, which
//! shares the compiled modules, sets `input` and evaluates `data.<package>.violation`. Engines
//! carry a cooperative execution timer, so a runaway policy stops at the deadline.
//!
//! Soma's built-in templates are also compiled for regorus' register VM, which evaluates them
//! several times faster, but only where the VM is known to answer as the interpreter does:
//!
//! ```text
//!  constraint ──▶ built-in, and params_typed held at load? ──no──▶ interpreter
//!                     │ yes
//!                     ▼
//!                VM: vm_violation ──undefined, an error, or over 25,000 instructions──▶ interpreter
//!                     │ a set
//!                     ▼
//!                the violations (the same set the interpreter returns: tests/vm.rs)
//! ```
//!
//! regorus 0.14's VM differs from the interpreter in ways the built-ins are written around
//! (docs/policies.md, "regorus' VM"): it skips a rule body where the interpreter reports an
//! error (a built-in given a value of the wrong type), `x := <undefined>` does not stop a
//! body, and it loops after a comprehension whose body was undefined (hence the instruction
//! limit). So each built-in declares `params_typed` (checked once per constraint, here) and a
//! `vm_violation` that is undefined unless its fast path holds or every field it reads has
//! the type it expects; anything else is decided by the interpreter.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regorus::rvm::RegoVM;
use regorus::utils::limits::ExecutionTimerConfig;
use serde::Serialize;
use serde_json::Value;

use crate::error::PolicyError;
use crate::matching;
use crate::model::{Action, Constraint, Review, Template};

/// One violated constraint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Violation {
    /// `Kind/name` of the constraint.
    pub policy: String,
    /// What it does.
    pub action: Action,
    /// The policy's message.
    pub msg: String,
    /// The policy's `details`, if any.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

/// A constraint that could not be evaluated (runtime error or deadline).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalFailure {
    /// `Kind/name` of the constraint.
    pub policy: String,
    /// Its action: a failing `deny` constraint denies (fail closed).
    pub action: Action,
    /// What happened.
    pub error: String,
}

/// The outcome of evaluating every matching constraint against one review.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Decision {
    /// Violations, in constraint order.
    pub violations: Vec<Violation>,
    /// Constraints that could not be evaluated.
    pub failures: Vec<EvalFailure>,
    /// How many constraints matched the review.
    pub evaluated: usize,
    /// How many of them regorus' VM decided (the rest: the interpreter).
    #[serde(skip)]
    pub vm_decided: usize,
}

impl Decision {
    /// Allowed unless a `deny` constraint is violated or could not be evaluated.
    pub fn allowed(&self) -> bool {
        !self.violations.iter().any(|v| v.action == Action::Deny)
            && !self.failures.iter().any(|f| f.action == Action::Deny)
    }

    /// Every reason to deny, one line each: `[Kind/name] message`.
    pub fn deny_messages(&self) -> Vec<String> {
        let violations = self
            .violations
            .iter()
            .filter(|v| v.action == Action::Deny)
            .map(|v| format!("[{}] {}", v.policy, v.msg));
        let failures = self
            .failures
            .iter()
            .filter(|f| f.action == Action::Deny)
            .map(|f| format!("[{}] policy could not be evaluated: {}", f.policy, f.error));
        violations.chain(failures).collect()
    }

    /// Messages of `warn` constraints, for AdmissionResponse `warnings`.
    pub fn warnings(&self) -> Vec<String> {
        let violations = self
            .violations
            .iter()
            .filter(|v| v.action == Action::Warn)
            .map(|v| format!("[{}] {}", v.policy, v.msg));
        let failures = self
            .failures
            .iter()
            .filter(|f| f.action == Action::Warn)
            .map(|f| format!("[{}] policy could not be evaluated: {}", f.policy, f.error));
        violations.chain(failures).collect()
    }

    /// Violations of the given action.
    pub fn with_action(&self, action: Action) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(move |v| v.action == action)
    }
}

/// Which engine decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EvalMode {
    /// regorus' VM for the built-ins where it answers as the interpreter does (module docs),
    /// the interpreter for everything else.
    #[default]
    Auto,
    /// The interpreter alone (the reference; what the benchmark compares against).
    InterpreterOnly,
}

/// Entry rule of a built-in for the VM: the violations, or undefined when the VM may not decide.
const VM_ENTRY: &str = "vm_violation";
/// Rule of a built-in that holds when a constraint's parameters have the expected types.
const PARAMS_TYPED: &str = "params_typed";
/// `review`, the key of `input.review`.
static REVIEW_KEY: std::sync::LazyLock<regorus::Value> =
    std::sync::LazyLock::new(|| regorus::Value::from("review"));
/// Instructions the VM may execute for one decision before the interpreter takes over.
const VM_MAX_INSTRUCTIONS: usize = 25_000;

/// A built-in template compiled for regorus' register VM.
struct VmProgram {
    policy: regorus::CompiledPolicy,
    program: Arc<regorus::rvm::Program>,
    data: regorus::Value,
    /// Machines ready for reuse (each execution starts from a clean state: regorus resets
    /// every rule and built-in cache when it starts). Boxed: a machine is a large struct, and
    /// moving it out of the pool and back by value copied it on every execution.
    #[allow(
        clippy::vec_box,
        reason = "a machine moves in and out of the pool per execution"
    )]
    idle: Mutex<Vec<Box<RegoVM>>>,
}

impl VmProgram {
    /// Soma's built-ins that declare a `vm_violation` entry; `None` for anything else.
    fn compile(template: &Template, engine: &regorus::Engine, package: &str) -> Option<Self> {
        let is_builtin = crate::builtin::BUILTINS
            .iter()
            .any(|b| b.template() == *template);
        if !is_builtin || !template.rego.contains(&format!("\n{VM_ENTRY} :=")) {
            return None;
        }
        let entry = format!("{package}.{VM_ENTRY}");
        let mut engine = engine.clone();
        let policy = engine
            .compile_with_entrypoint(&entry.as_str().into())
            .ok()?;
        let program = regorus::languages::rego::compiler::Compiler::compile_from_policy(
            &policy,
            &[entry.as_str()],
        )
        .map_err(
            |e| tracing::warn!(template = %template.kind, error = %e, "not compiled for the VM"),
        )
        .ok()?;
        Some(Self {
            policy,
            program,
            data: engine.get_data(),
            idle: Mutex::new(Vec::new()),
        })
    }

    fn machine(&self) -> Result<Box<RegoVM>, String> {
        if let Some(vm) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            return Ok(vm);
        }
        let mut vm = Box::new(RegoVM::new_with_policy(self.policy.clone()));
        vm.load_program(self.program.clone());
        vm.set_data(self.data.clone()).map_err(|e| e.to_string())?;
        // As the interpreter: a built-in given a value of the wrong type is an error.
        vm.set_strict_builtin_errors(true);
        // A built-in's decision takes at most ~2,500 instructions on the fixtures and their
        // sampled mutations (SomaVault's full checks; the others ~1,200); beyond the limit (a very large object, or regorus 0.14's loop after a
        // comprehension whose body was undefined, docs/policies.md) the interpreter decides.
        vm.set_max_instructions(VM_MAX_INSTRUCTIONS);
        Ok(vm)
    }

    /// The violations, or `None` when the VM may not decide (or failed: the interpreter then
    /// decides, and reports any error itself).
    fn violations(&self, input: regorus::Value, limit: Duration) -> Option<regorus::Value> {
        let mut vm = self.machine().ok()?;
        vm.set_execution_timer_config(Some(timer(limit)));
        vm.set_input(input);
        let result = vm.execute();
        // Only a machine that finished is parked for reuse: regorus 0.14 may leave its stacks
        // as they were when an error stopped it.
        if result.is_ok() {
            // Drop the input (it may be large) before parking the machine.
            vm.set_input(regorus::Value::Undefined);
            if let Ok(mut idle) = self.idle.lock() {
                idle.push(vm);
            }
        }
        match result {
            Ok(v @ (regorus::Value::Set(_) | regorus::Value::Array(_))) => Some(v),
            _ => None,
        }
    }
}

fn timer(limit: Duration) -> ExecutionTimerConfig {
    ExecutionTimerConfig {
        limit,
        check_interval: NonZeroU32::MIN.saturating_add(63),
    }
}

/// A template compiled into a prepared engine (and, for built-ins, a VM program).
#[derive(Clone)]
pub(crate) struct Compiled {
    pub(crate) template: Template,
    engine: regorus::Engine,
    entry: String,
    uses_inventory: bool,
    vm: Option<Arc<VmProgram>>,
}

impl Compiled {
    /// Parses and prepares the template's Rego.
    pub(crate) fn compile(template: &Template, inventory: &Value) -> Result<Self, PolicyError> {
        let fail = |message: String| PolicyError::Compile {
            template: template.kind.clone(),
            message,
        };
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(!template.rego_v1);
        crate::deprecated::register(&mut engine).map_err(|e| fail(e.to_string()))?;
        let package = engine
            .add_policy(format!("{}.rego", template.origin), template.rego.clone())
            .map_err(|e| fail(e.to_string()))?;
        for (i, lib) in template.libs.iter().enumerate() {
            engine
                .add_policy(format!("{}.lib{i}.rego", template.origin), lib.clone())
                .map_err(|e| fail(e.to_string()))?;
        }
        let uses_inventory = template.rego.contains("inventory")
            || template.libs.iter().any(|l| l.contains("inventory"));
        if uses_inventory {
            engine
                .add_data(inventory_data(inventory))
                .map_err(|e| fail(e.to_string()))?;
        }
        let entry = format!("{package}.violation");
        let vm = VmProgram::compile(template, &engine, &package).map(Arc::new);
        let mut compiled = Self {
            template: template.clone(),
            engine,
            entry,
            uses_inventory,
            vm,
        };
        // Prepares the engine (analysis, scheduling) once, so clones start ready; also proves
        // the package has a `violation` rule.
        let probe = regorus::Value::from(serde_json::json!({"review": {}, "parameters": {}}));
        compiled.engine.set_input(probe);
        // The probe is bounded too: a policy that loops regardless of input must not stall a
        // load. Running out of time here still proves the rule exists.
        compiled
            .engine
            .set_execution_timer_config(ExecutionTimerConfig {
                limit: Duration::from_millis(250),
                check_interval: NonZeroU32::MIN.saturating_add(63),
            });
        if let Err(e) = compiled.engine.eval_rule(compiled.entry.clone()) {
            let message = e.to_string();
            if !message.contains("exceeded time limit") {
                return Err(fail(format!(
                    "{message} (a template needs a `violation` rule in its package)"
                )));
            }
        }
        Ok(compiled)
    }

    /// The same template over another inventory.
    fn with_inventory(&self, inventory: &Value) -> Result<Self, PolicyError> {
        if !self.uses_inventory {
            return Ok(self.clone());
        }
        Self::compile(&self.template, inventory)
    }

    /// Whether the VM may decide for a constraint with these parameters (`params_typed`,
    /// evaluated by the interpreter, once per constraint).
    fn vm_accepts(&self, parameters: &regorus::Value) -> bool {
        if self.vm.is_none() {
            return false;
        }
        let mut engine = self.engine.clone();
        let mut input = BTreeMap::new();
        input.insert(regorus::Value::from("parameters"), parameters.clone());
        engine.set_input(regorus::Value::from(input));
        engine.set_execution_timer_config(timer(Duration::from_millis(250)));
        let rule = self
            .entry
            .replace(".violation", &format!(".{PARAMS_TYPED}"));
        matches!(engine.eval_rule(rule), Ok(regorus::Value::Bool(true)))
    }

    /// Evaluates `violation` for one input with the interpreter, or with the VM when `vm`
    /// and the VM may decide; returns `(msg, details)` pairs and whether the VM decided.
    fn violations(
        &self,
        input: regorus::Value,
        limit: Duration,
        vm: bool,
    ) -> Result<(Vec<(String, Value)>, bool), String> {
        let started = Instant::now();
        if vm
            && let Some(program) = &self.vm
            && let Some(result) = program.violations(input.clone(), limit)
        {
            return Ok((collect_violations(result)?, true));
        }
        let mut engine = self.engine.clone();
        engine.set_execution_timer_config(timer(limit.saturating_sub(started.elapsed())));
        engine.set_input(input);
        let result = engine
            .eval_rule(self.entry.clone())
            .map_err(|e| e.to_string())?;
        Ok((collect_violations(result)?, false))
    }
}

/// `(msg, details)` of each violation in `violation`'s value.
fn collect_violations(result: regorus::Value) -> Result<Vec<(String, Value)>, String> {
    let mut out = Vec::new();
    match result {
        regorus::Value::Undefined => {}
        regorus::Value::Set(set) => out.extend(set.iter().map(message_of)),
        regorus::Value::Array(items) => out.extend(items.iter().map(message_of)),
        other => {
            return Err(format!(
                "`violation` must be a set of objects with a msg, got {}",
                other.to_json_str().unwrap_or_default()
            ));
        }
    }
    Ok(out)
}

fn message_of(v: &regorus::Value) -> (String, Value) {
    let json = serde_json::to_value(v).unwrap_or(Value::Null);
    let msg = match json.get("msg") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => json.to_string(),
    };
    let details = json.get("details").cloned().unwrap_or(Value::Null);
    (msg, details)
}

fn inventory_data(inventory: &Value) -> regorus::Value {
    let inv = if inventory.is_object() {
        inventory.clone()
    } else {
        serde_json::json!({})
    };
    regorus::Value::from(serde_json::json!({ "inventory": inv }))
}

/// A compiled, immutable set of templates and constraints. Cheap to share (`Arc`).
#[derive(Clone, Default)]
pub struct PolicySet {
    pub(crate) templates: BTreeMap<String, Arc<Compiled>>,
    pub(crate) constraints: Vec<Constraint>,
    /// Each constraint's parameters, converted once.
    params: Vec<regorus::Value>,
    /// Each constraint's `input` document with `review` still null, built once: a decision
    /// copies it and sets `review` (cheaper than building the document per constraint).
    inputs: Vec<regorus::Value>,
    /// Whether the VM may decide for each constraint (its template has a VM program and its
    /// parameters have the types the template expects).
    vm: Vec<bool>,
    pub(crate) inventory: Value,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("templates", &self.templates.keys().collect::<Vec<_>>())
            .field("constraints", &self.constraint_ids())
            .finish()
    }
}

impl PolicySet {
    /// Compiles templates and pairs them with constraints; every template must compile and
    /// every constraint must name a template (see [`crate::PolicyStore`] for the lenient,
    /// last-good-set loader).
    pub fn compile(
        templates: &[Template],
        constraints: Vec<Constraint>,
        inventory: Value,
    ) -> Result<Self, PolicyError> {
        let mut compiled = BTreeMap::new();
        for t in templates {
            compiled.insert(t.kind.clone(), Arc::new(Compiled::compile(t, &inventory)?));
        }
        for c in &constraints {
            if !compiled.contains_key(&c.kind) {
                return Err(PolicyError::UnknownKind {
                    kind: c.kind.clone(),
                    name: c.name.clone(),
                });
            }
        }
        Ok(Self::from_parts(compiled, constraints, inventory))
    }

    pub(crate) fn from_parts(
        templates: BTreeMap<String, Arc<Compiled>>,
        constraints: Vec<Constraint>,
        inventory: Value,
    ) -> Self {
        let params: Vec<regorus::Value> = constraints
            .iter()
            .map(|c| regorus::Value::from(c.parameters.clone()))
            .collect();
        let vm = vm_flags(&templates, &constraints, &params);
        Self {
            templates,
            constraints,
            inputs: params.iter().map(input_without_review).collect(),
            params,
            vm,
            inventory,
        }
    }

    /// The same policies over another inventory (`data.inventory`: Gatekeeper's layout,
    /// `namespace.<ns>.<groupVersion>.<Kind>.<name>` and `cluster.<groupVersion>.<Kind>.<name>`).
    pub fn with_inventory(&self, inventory: Value) -> Result<Self, PolicyError> {
        let mut templates = BTreeMap::new();
        for (kind, c) in &self.templates {
            templates.insert(kind.clone(), Arc::new(c.with_inventory(&inventory)?));
        }
        Ok(Self {
            vm: vm_flags(&templates, &self.constraints, &self.params),
            templates,
            constraints: self.constraints.clone(),
            params: self.params.clone(),
            inputs: self.inputs.clone(),
            inventory,
        })
    }

    /// `Kind/name` of every constraint.
    pub fn constraint_ids(&self) -> Vec<String> {
        self.constraints.iter().map(Constraint::id).collect()
    }

    /// The template kinds.
    pub fn template_kinds(&self) -> BTreeSet<String> {
        self.templates.keys().cloned().collect()
    }

    /// The constraints.
    pub fn constraints(&self) -> &[Constraint] {
        &self.constraints
    }

    /// Evaluates every constraint whose match selects the review. `deadline` bounds the whole
    /// decision: constraints not finished by then are reported as failures (which deny when
    /// their action is `deny`).
    pub fn evaluate(&self, review: &Review, deadline: Duration) -> Decision {
        self.evaluate_with(review, deadline, EvalMode::Auto)
    }

    /// [`Self::evaluate`] with a choice of engine (the decision is the same; tests and the
    /// benchmark compare them).
    pub fn evaluate_with(&self, review: &Review, deadline: Duration, mode: EvalMode) -> Decision {
        let started = Instant::now();
        // Only a namespaceSelector reads the namespace's labels.
        let ns_labels = self
            .constraints
            .iter()
            .any(|c| c.matches.namespace_selector.is_some())
            .then(|| self.namespace_labels(&review.namespace))
            .flatten();
        let review_value = review.input_value();
        let mut decision = Decision::default();
        for ((constraint, input), vm_ok) in self.constraints.iter().zip(&self.inputs).zip(&self.vm)
        {
            if !matching::selects(&constraint.matches, review, ns_labels) {
                continue;
            }
            decision.evaluated += 1;
            let Some(compiled) = self.templates.get(&constraint.kind) else {
                continue;
            };
            let remaining = deadline.saturating_sub(started.elapsed());
            let outcome = if remaining.is_zero() {
                Err("deadline exceeded before evaluation".to_owned())
            } else {
                compiled.violations(
                    with_review(input, &review_value),
                    remaining,
                    *vm_ok && mode == EvalMode::Auto,
                )
            };
            match outcome {
                Ok((found, by_vm)) => {
                    decision.vm_decided += usize::from(by_vm);
                    decision
                        .violations
                        .extend(found.into_iter().map(|(msg, details)| Violation {
                            policy: constraint.id(),
                            action: constraint.action,
                            msg,
                            details,
                        }));
                }
                Err(error) => decision.failures.push(EvalFailure {
                    policy: constraint.id(),
                    action: constraint.action,
                    error,
                }),
            }
        }
        decision
    }

    fn namespace_labels(&self, ns: &str) -> Option<&serde_json::Map<String, Value>> {
        if ns.is_empty() {
            return None;
        }
        self.inventory
            .get("cluster")?
            .get("v1")?
            .get("Namespace")?
            .get(ns)?
            .pointer("/metadata/labels")?
            .as_object()
    }
}

/// A rule's value as JSON, or the evaluation's error.
pub type RuleValue = Result<Value, String>;

/// Evaluates `violation` of `template` for one `input` document twice: with the interpreter,
/// and with regorus' VM compiled straight from the template (no fast path, no type guard, no
/// fallback). The cross-check for templates Soma does not let the VM decide (Gatekeeper
/// templates a platform team brings): the tests run it over every Suite case, so a
/// divergence shows before anyone would switch such templates to the VM. `Err` when the
/// template does not compile for the interpreter; the VM's own compile or runtime error is
/// the second value's `Err`.
#[doc(hidden)]
pub fn interpreter_and_vm(
    template: &Template,
    inventory: &Value,
    input: &Value,
) -> Result<(RuleValue, RuleValue), PolicyError> {
    let compiled = Compiled::compile(template, inventory)?;
    let input = crate::model::to_regorus(input);
    let mut engine = compiled.engine.clone();
    engine.set_input(input.clone());
    let by_interpreter = engine
        .eval_rule(compiled.entry.clone())
        .map(|v| to_json(&v))
        .map_err(|e| e.to_string());
    let by_vm = (|| {
        let mut engine = compiled.engine.clone();
        let policy = engine
            .compile_with_entrypoint(&compiled.entry.as_str().into())
            .map_err(|e| e.to_string())?;
        let program = regorus::languages::rego::compiler::Compiler::compile_from_policy(
            &policy,
            &[compiled.entry.as_str()],
        )
        .map_err(|e| e.to_string())?;
        let mut vm = RegoVM::new_with_policy(policy);
        vm.load_program(program);
        vm.set_data(engine.get_data()).map_err(|e| e.to_string())?;
        vm.set_strict_builtin_errors(true);
        vm.set_max_instructions(VM_MAX_INSTRUCTIONS);
        vm.set_input(input);
        vm.execute().map(|v| to_json(&v)).map_err(|e| e.to_string())
    })();
    Ok((by_interpreter, by_vm))
}

/// A rule's value as JSON (a set as a sorted array; undefined as an empty array: a
/// `violation` rule with no element).
fn to_json(v: &regorus::Value) -> Value {
    match v {
        regorus::Value::Undefined => Value::Array(Vec::new()),
        other => serde_json::to_value(other).unwrap_or(Value::Null),
    }
}

/// For each constraint: may the VM decide?
fn vm_flags(
    templates: &BTreeMap<String, Arc<Compiled>>,
    constraints: &[Constraint],
    params: &[regorus::Value],
) -> Vec<bool> {
    constraints
        .iter()
        .zip(params)
        .map(|(c, p)| templates.get(&c.kind).is_some_and(|t| t.vm_accepts(p)))
        .collect()
}

/// The `input` document of a constraint, `{"parameters": …, "review": null}`.
fn input_without_review(parameters: &regorus::Value) -> regorus::Value {
    let mut map = BTreeMap::new();
    map.insert(REVIEW_KEY.clone(), regorus::Value::Null);
    map.insert(regorus::Value::from("parameters"), parameters.clone());
    regorus::Value::from(map)
}

/// A copy of a constraint's `input` document (from [`input_without_review`]) with `review`
/// set: the copy shares the parameters and the review, and replaces the value of an existing
/// key, so it allocates only the two-entry object.
fn with_review(input: &regorus::Value, review: &regorus::Value) -> regorus::Value {
    let mut input = input.clone();
    if let Ok(doc) = input.as_object_mut()
        && let Some(slot) = doc.get_mut(&REVIEW_KEY)
    {
        *slot = review.clone();
    }
    input
}
