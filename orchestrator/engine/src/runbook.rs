//! Runbooks: YAML parsed into a raw tree with positions, then validated into
//! a typed [`Runbook`]. Validation reports every problem at once.

use crate::catalog::{self, Ty};
use crate::diag::{Diagnostics, Pos, Sink};
use crate::expr::{self, Expr, Seg};
use crate::limits::Limits;
use marked_yaml::Node;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Error classes a retry can be limited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Worth trying again: a connection refused, a 503, a busy resource.
    Transient,
    /// The step ran past its `timeout`.
    Timeout,
    /// The step failed for a reason that another try will not fix.
    Permanent,
    /// The run was cancelled while the step ran.
    Cancelled,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamTy {
    String,
    Integer,
    Boolean,
    Duration,
    List,
}

impl ParamTy {
    fn parse(s: &str) -> Option<ParamTy> {
        Some(match s {
            "string" | "point" => ParamTy::String,
            "integer" => ParamTy::Integer,
            "boolean" => ParamTy::Boolean,
            "duration" => ParamTy::Duration,
            "list" => ParamTy::List,
            _ => return None,
        })
    }

    /// Converts a value given as text (`--param k=v`) or from YAML.
    pub fn coerce(self, v: &Value) -> Result<Value, String> {
        let bad = || format!("`{}` is not a {}", expr::to_text(v), self.name());
        match (self, v) {
            (ParamTy::String, Value::String(_)) => Ok(v.clone()),
            (ParamTy::String, Value::Number(_) | Value::Bool(_)) => {
                Ok(Value::String(expr::to_text(v)))
            }
            (ParamTy::Integer, Value::Number(n)) if n.is_i64() => Ok(v.clone()),
            (ParamTy::Integer, Value::String(s)) => {
                s.trim().parse::<i64>().map(Value::from).map_err(|_| bad())
            }
            (ParamTy::Boolean, Value::Bool(_)) => Ok(v.clone()),
            (ParamTy::Boolean, Value::String(s)) => match s.as_str() {
                "true" | "yes" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "0" => Ok(Value::Bool(false)),
                _ => Err(bad()),
            },
            (ParamTy::Duration, Value::String(s)) if catalog::parse_duration_ms(s).is_some() => {
                Ok(v.clone())
            }
            (ParamTy::Duration, Value::Number(_)) => Ok(v.clone()),
            (ParamTy::List, Value::Array(_)) => Ok(v.clone()),
            (ParamTy::List, Value::String(s)) => Ok(Value::Array(
                s.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(|x| Value::String(x.into()))
                    .collect(),
            )),
            _ => Err(bad()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ParamTy::String => "string",
            ParamTy::Integer => "integer",
            ParamTy::Boolean => "boolean",
            ParamTy::Duration => "duration",
            ParamTy::List => "list",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ParamTy,
    pub default: Option<Value>,
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Objectives {
    /// Recovery time objective: from the start of the run to a verified stack.
    pub rto_secs: Option<f64>,
    /// Recovery point objective: the oldest acceptable recovery point, at the start of the run.
    pub rpo_secs: Option<f64>,
    /// The longest acceptable outage, measured as the runbook's `downtime:` says.
    #[serde(default)]
    pub downtime_secs: Option<f64>,
}

/// Where a cutover or failback's outage starts and ends: from the earliest
/// start of the `from` steps (the ones that stop the service) to the latest
/// end of the `to` steps (the checks that prove it serves again).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Downtime {
    pub from: Vec<String>,
    pub to: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Steps on this target that may run at once.
    pub parallelism: usize,
    /// Everything else the runbook says of the target (`region`,
    /// `mapping`, ...): the target type, not the engine, knows what these
    /// mean, and the orchestrator's registry checks them.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub settings: Map<String, Value>,
    #[serde(default)]
    pub line: usize,
    #[serde(default)]
    pub column: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Undo what the run created, in reverse dependency order.
    Rollback,
    /// Leave everything as it is for an operator (`ferry rollback` later).
    Stop,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Retry {
    /// Tries in all (1: no retry).
    pub attempts: u32,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub on: Vec<ErrorClass>,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            attempts: 1,
            backoff_ms: 1000,
            max_backoff_ms: 60_000,
            on: vec![ErrorClass::Transient, ErrorClass::Timeout],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Undo {
    pub uses: String,
    pub with: Map<String, Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    pub id: String,
    pub name: Option<String>,
    pub uses: String,
    /// Index into [`Runbook::targets`].
    pub target: usize,
    pub with: Map<String, Value>,
    /// Indexes into [`Runbook::steps`].
    pub needs: Vec<usize>,
    #[serde(rename = "if")]
    pub cond: Option<String>,
    /// A literal list, or a template that yields one from params.
    pub for_each: Option<Value>,
    pub retry: Retry,
    pub timeout_ms: Option<u64>,
    /// The step names its target (`target:`); else it runs on the run's
    /// default target, which `--target` picks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub target_named: bool,
    /// What removes what the step created: the action's own undo for
    /// `volume.*` and `instance.launch`, or the runbook's `undo:`.
    pub undo: Option<Undo>,
    pub line: usize,
    pub column: usize,
}

impl Step {
    pub fn action(&self) -> &'static catalog::Action {
        catalog::action(&self.uses).unwrap_or(&catalog::ACTIONS[0])
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Runbook {
    pub file: String,
    pub name: String,
    pub description: Option<String>,
    pub params: Vec<Param>,
    pub objectives: Objectives,
    pub targets: Vec<Target>,
    pub on_failure: OnFailure,
    pub steps: Vec<Step>,
    /// Environment variables of the orchestrator the steps may read (a
    /// `check.sql` step's `password_env`); nothing else of its environment
    /// reaches a step, and these values are redacted from what is stored.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// What the report measures as the outage (`downtime:`), if anything.
    #[serde(default)]
    pub downtime: Option<Downtime>,
}

impl Runbook {
    pub fn step(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }

    /// Makes `name` the run's default target: every step that does not name
    /// its own target runs there (`ferry run --target NAME`). The same
    /// runbook then rebuilds on `local`, `aws` or `libvirt`.
    pub fn retarget(&mut self, name: &str) -> Result<(), String> {
        let Some(index) = self.targets.iter().position(|t| t.name == name) else {
            let known: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
            return Err(format!(
                "runbook `{}` has no target `{name}`; its targets are: {}",
                self.name,
                known.join(", ")
            ));
        };
        for step in self.steps.iter_mut().filter(|s| !s.target_named) {
            step.target = index;
        }
        Ok(())
    }
}

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "description",
    "params",
    "objectives",
    "targets",
    "on_failure",
    "secrets",
    "downtime",
    "steps",
];
const STEP_KEYS: &[&str] = &[
    "id", "name", "uses", "target", "with", "needs", "if", "for_each", "retry", "timeout", "undo",
];
const RETRY_KEYS: &[&str] = &["attempts", "backoff", "max_backoff", "on"];

/// Parses and validates a runbook with the default [`Limits`]. `file` names
/// it in diagnostics.
pub fn parse(file: &str, text: &str) -> Result<Runbook, Diagnostics> {
    parse_with(file, text, &Limits::default())
}

/// Parses and validates a runbook within `limits`.
pub fn parse_with(file: &str, text: &str, limits: &Limits) -> Result<Runbook, Diagnostics> {
    // Editors on Windows may start UTF-8 files with a byte order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut sink = Sink::new(file, limits.max_diagnostics);
    if text.len() > limits.max_bytes {
        sink.error(
            Pos { line: 1, column: 1 },
            format!(
                "the runbook is {} bytes, more than the limit of {} bytes",
                text.len(),
                limits.max_bytes
            ),
            Some("split it into smaller runbooks".into()),
        );
        return Err(sink.finish().err().unwrap_or_default());
    }
    // marked-yaml builds its tree by recursing once per level of nesting
    // (and dropping the tree recurses too), so the depth and the number of
    // documents are checked on the event stream before any tree exists.
    if let Err((pos, msg, hint)) = screen_yaml(text, limits) {
        sink.error(pos, msg, hint);
        return Err(sink.finish().err().unwrap_or_default());
    }
    // Duplicate keys would let a reviewer read `uses: noop` while the last
    // `uses:` runs; quoted scalars stay strings (`run: "true"`).
    let options = marked_yaml::LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let root = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(n) => n,
        Err(e) => {
            let (pos, msg) = load_error(&e);
            sink.error(
                pos,
                msg,
                Some("fix the YAML syntax first; nothing else was checked".into()),
            );
            return Err(sink.finish().err().unwrap_or_default());
        }
    };
    let Some(top) = root.as_mapping() else {
        sink.error(
            Pos::of(root.span()),
            "a runbook is a mapping with `name` and `steps`",
            None,
        );
        return Err(sink.finish().err().unwrap_or_default());
    };
    let rb = Validator {
        sink: &mut sink,
        limits,
        pending: Vec::new(),
        hint_budget: HINT_BUDGET,
    }
    .runbook(file, top);
    sink.finish()?;
    Ok(rb)
}

/// Walks the YAML event stream (the parser's own state machine, no
/// recursion) and refuses what the tree builder must not see: nesting deeper
/// than `limits.max_depth`, a second document, aliases.
fn screen_yaml(text: &str, limits: &Limits) -> Result<(), (Pos, String, Option<String>)> {
    use yaml_rust2::parser::{Event, Parser};
    let at = |m: &yaml_rust2::scanner::Marker| Pos {
        line: m.line(),
        column: m.col() + 1,
    };
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    let mut documents = 0usize;
    loop {
        let (ev, mark) = match parser.next_token() {
            Ok(x) => x,
            Err(e) => {
                return Err((
                    at(e.marker()),
                    format!("YAML syntax: {}", e.info()),
                    Some("fix the YAML syntax first; nothing else was checked".into()),
                ));
            }
        };
        match ev {
            Event::StreamEnd => return Ok(()),
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err((
                        at(&mark),
                        "a second YAML document: a runbook file holds exactly one".into(),
                        Some("remove the `---` and what follows, or put it in its own file".into()),
                    ));
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                depth += 1;
                if depth > limits.max_depth {
                    return Err((
                        at(&mark),
                        format!(
                            "nesting deeper than {} levels of mappings and lists",
                            limits.max_depth
                        ),
                        Some("a runbook needs only a few levels; flatten this value".into()),
                    ));
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            Event::Alias(_) => {
                return Err((
                    at(&mark),
                    "YAML aliases are not supported in runbooks".into(),
                    None,
                ));
            }
            _ => {}
        }
    }
}

fn load_error(e: &marked_yaml::LoadError) -> (Pos, String) {
    use marked_yaml::LoadError as L;
    let at = |m: &marked_yaml::Marker| Pos {
        line: m.line(),
        column: m.column(),
    };
    match e {
        L::ScanError(m, se) => (at(m), format!("YAML syntax: {}", se.info())),
        L::DuplicateKey(d) => {
            let first = Pos::of(d.prev_key.span());
            (
                Pos::of(d.key.span()),
                format!(
                    "`{}` appears twice in one mapping (first at line {}, column {})",
                    d.key.as_str(),
                    first.line,
                    first.column
                ),
            )
        }
        L::TopLevelMustBeMapping(m) => (
            at(m),
            "a runbook is a mapping with `name` and `steps`".into(),
        ),
        L::TopLevelMustBeSequence(m) => (at(m), "expected a sequence".into()),
        L::UnexpectedAnchor(m) => (at(m), "YAML anchors are not supported in runbooks".into()),
        L::MappingKeyMustBeScalar(m) => (at(m), "mapping keys must be plain strings".into()),
        L::UnexpectedTag(m) => (at(m), "YAML tags are not supported in runbooks".into()),
        #[allow(unreachable_patterns)]
        _ => (Pos::default(), e.to_string()),
    }
}

/// Comparison cells (character pairs) that typo hints may spend on one
/// runbook: about a tenth of a second.
const HINT_BUDGET: usize = 20_000_000;

struct Validator<'a> {
    sink: &'a mut Sink,
    limits: &'a Limits,
    /// References to a step that is not a direct need, checked at the end in
    /// one pass over the graph (see [`reachable`]).
    pending: Vec<Pending>,
    /// What is left of [`HINT_BUDGET`].
    hint_budget: usize,
}

/// `steps.ID...` read by a step that does not list `ID` in its `needs`: fine
/// if `ID` is upstream through other steps.
struct Pending {
    /// The reading step and the step read.
    reader: usize,
    read: usize,
    at: Pos,
    path: Vec<Seg>,
}

/// A step as read, before references are resolved.
struct RawStep<'n> {
    node: &'n MarkedMappingNode,
    id: String,
    pos: Pos,
    needs: Vec<(String, Pos)>,
}

fn key_pos(map: &MarkedMappingNode, key: &str) -> Pos {
    map.keys()
        .find(|k| k.as_str() == key)
        .map(|k| Pos::of(k.span()))
        .unwrap_or_else(|| Pos::of(map.span()))
}

/// A YAML scalar as JSON: unquoted `true`, `12`, `null` keep their types.
fn scalar_value(s: &MarkedScalarNode) -> Value {
    if s.may_coerce() {
        if let Some(b) = s.as_bool() {
            return Value::Bool(b);
        }
        if let Ok(i) = s.as_str().parse::<i64>() {
            return Value::from(i);
        }
        if let Ok(f) = s.as_str().parse::<f64>()
            && f.is_finite()
            && s.as_str().contains('.')
        {
            return Value::from(f);
        }
        if matches!(s.as_str(), "null" | "~") {
            return Value::Null;
        }
    }
    Value::String(s.as_str().to_owned())
}

pub(crate) fn to_json(n: &Node) -> Value {
    match n {
        Node::Scalar(s) => scalar_value(s),
        Node::Sequence(s) => Value::Array(s.iter().map(to_json).collect()),
        Node::Mapping(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
    }
}

/// Where the value of `key` starts (else the mapping).
fn val_pos(map: &MarkedMappingNode, key: &str) -> Pos {
    map.get_node(key)
        .map(|n| Pos::of(n.span()))
        .unwrap_or_else(|| Pos::of(map.span()))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && id.starts_with(|c: char| c.is_ascii_lowercase())
}

impl Validator<'_> {
    fn err(&mut self, at: Pos, msg: impl Into<String>, hint: Option<String>) {
        self.sink.error(at, msg, hint);
    }

    /// A typo hint against a list as long as the runbook, within the budget.
    fn hint<'c>(
        &mut self,
        word: &str,
        candidates: impl IntoIterator<Item = &'c str>,
    ) -> Option<&'c str> {
        crate::diag::suggest_within(word, candidates, &mut self.hint_budget)
    }

    fn unknown_keys(&mut self, map: &MarkedMappingNode, allowed: &[&str], what: &str) {
        for k in map.keys() {
            if !allowed.contains(&k.as_str()) {
                let hint = match self.hint(k.as_str(), allowed.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("{what} takes {}", allowed.join(", ")),
                };
                self.err(
                    Pos::of(k.span()),
                    format!("unknown key `{}` in {what}", k.as_str()),
                    Some(hint),
                );
            }
        }
    }

    fn string(&mut self, map: &MarkedMappingNode, key: &str, what: &str) -> Option<String> {
        let node = map.get_node(key)?;
        match node.as_scalar() {
            Some(s) => Some(s.as_str().to_owned()),
            None => {
                self.err(
                    Pos::of(node.span()),
                    format!("`{key}` of {what} must be a string"),
                    None,
                );
                None
            }
        }
    }

    fn duration(&mut self, map: &MarkedMappingNode, key: &str, what: &str) -> Option<u64> {
        let node = map.get_node(key)?;
        let text = node
            .as_scalar()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        match catalog::parse_duration_ms(&text) {
            Some(ms) => Some(ms),
            None => {
                self.err(
                    Pos::of(node.span()),
                    format!("`{key}` of {what} is not a duration: `{text}`"),
                    Some("write it like 500ms, 30s, 5m or 2h".into()),
                );
                None
            }
        }
    }

    fn runbook(&mut self, file: &str, top: &MarkedMappingNode) -> Runbook {
        self.unknown_keys(top, TOP_KEYS, "a runbook");
        if let Some(v) = top.get_node("version")
            && v.as_scalar().map(|s| s.as_str()) != Some("1")
        {
            self.err(
                Pos::of(v.span()),
                "unsupported runbook version",
                Some("this Ferry reads `version: 1`".into()),
            );
        }
        let name = self.string(top, "name", "the runbook").unwrap_or_default();
        if !top.contains_key("name") {
            self.err(
                Pos::of(top.span()),
                "the runbook has no `name`",
                Some("add `name: my-stack` at the top".into()),
            );
        }
        let description = self.string(top, "description", "the runbook");
        let params = self.params(top);
        let objectives = self.objectives(top);
        let targets = self.targets(top);
        let on_failure = match self.string(top, "on_failure", "the runbook").as_deref() {
            None | Some("rollback") => OnFailure::Rollback,
            Some("stop") => OnFailure::Stop,
            Some(other) => {
                self.err(
                    val_pos(top, "on_failure"),
                    format!("unknown on_failure `{other}`"),
                    Some("use rollback or stop".into()),
                );
                OnFailure::Rollback
            }
        };
        let steps = self.steps(top, &params, &targets);
        let secrets = self.secrets(top);
        let downtime = self.downtime(top, &steps, &objectives);
        // A step may read only a secret the runbook declares: a reviewer sees
        // every variable of the orchestrator a runbook can reach.
        for step in &steps {
            if let Some(Value::String(var)) = step.with.get("password_env")
                && !var.contains("${{")
                && !secrets.iter().any(|s| s == var)
            {
                self.err(
                    Pos {
                        line: step.line,
                        column: step.column,
                    },
                    format!(
                        "step `{}` reads the environment variable `{var}`, which `secrets` does not declare",
                        step.id
                    ),
                    Some(format!("add `secrets: [{var}]` at the top of the runbook")),
                );
            }
        }
        Runbook {
            secrets,
            downtime,
            file: file.to_owned(),
            name,
            description,
            params,
            objectives,
            targets,
            on_failure,
            steps,
        }
    }

    /// `secrets: [NAME, ...]`: environment variable names, never Ferry's own.
    fn secrets(&mut self, top: &MarkedMappingNode) -> Vec<String> {
        let Some(node) = top.get_node("secrets") else {
            return Vec::new();
        };
        let Some(seq) = node.as_sequence() else {
            self.err(
                Pos::of(node.span()),
                "`secrets` must be a list of environment variable names",
                None,
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in seq.iter() {
            let Some(name) = item.as_scalar().map(|s| s.as_str().to_owned()) else {
                self.err(
                    Pos::of(item.span()),
                    "a secret must be a variable name",
                    None,
                );
                continue;
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.err(
                    Pos::of(item.span()),
                    format!("`{name}` is not an environment variable name"),
                    None,
                );
            } else if name.to_ascii_uppercase().starts_with("FERRY_") {
                self.err(
                    Pos::of(item.span()),
                    format!("`{name}` is one of Ferry's own variables; a runbook may not read it"),
                    Some("give the step's secret a name of its own".into()),
                );
            } else {
                out.push(name);
            }
        }
        out
    }

    fn params(&mut self, top: &MarkedMappingNode) -> Vec<Param> {
        let Some(node) = top.get_node("params") else {
            return Vec::new();
        };
        let Some(map) = node.as_mapping() else {
            self.err(
                Pos::of(node.span()),
                "`params` must be a mapping of names to definitions",
                None,
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in map.iter() {
            let name = k.as_str().to_owned();
            let (ty, default, description) = match v {
                Node::Mapping(m) => {
                    self.unknown_keys(m, &["type", "default", "description"], "a param");
                    let ty = match self.string(m, "type", "a param") {
                        None => ParamTy::String,
                        Some(t) => ParamTy::parse(&t).unwrap_or_else(|| {
                            self.err(
                                key_pos(m, "type"),
                                format!("unknown param type `{t}`"),
                                Some(
                                    "use string, integer, boolean, duration, list or point".into(),
                                ),
                            );
                            ParamTy::String
                        }),
                    };
                    (
                        ty,
                        m.get_node("default").map(to_json),
                        self.string(m, "description", "a param"),
                    )
                }
                other => (ParamTy::String, Some(to_json(other)), None),
            };
            let default = match default {
                Some(Value::Null) | None => None,
                Some(d) => match ty.coerce(&d) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        self.err(
                            Pos::of(v.span()),
                            format!("default of param `{name}`: {e}"),
                            None,
                        );
                        None
                    }
                },
            };
            out.push(Param {
                name,
                ty,
                default,
                description,
            });
        }
        out
    }

    fn objectives(&mut self, top: &MarkedMappingNode) -> Objectives {
        let Some(node) = top.get_node("objectives") else {
            return Objectives::default();
        };
        let Some(map) = node.as_mapping() else {
            self.err(
                Pos::of(node.span()),
                "`objectives` must be a mapping with `rto` and `rpo`",
                None,
            );
            return Objectives::default();
        };
        self.unknown_keys(map, &["rto", "rpo", "downtime"], "objectives");
        Objectives {
            rto_secs: self
                .duration(map, "rto", "objectives")
                .map(|ms| ms as f64 / 1000.0),
            rpo_secs: self
                .duration(map, "rpo", "objectives")
                .map(|ms| ms as f64 / 1000.0),
            downtime_secs: self
                .duration(map, "downtime", "objectives")
                .map(|ms| ms as f64 / 1000.0),
        }
    }

    /// `downtime: { from: STEP|[STEPS], to: STEP|[STEPS] }`: the steps whose
    /// start takes the service down and whose end proves it back.
    fn downtime(
        &mut self,
        top: &MarkedMappingNode,
        steps: &[Step],
        objectives: &Objectives,
    ) -> Option<Downtime> {
        let Some(node) = top.get_node("downtime") else {
            if objectives.downtime_secs.is_some()
                && let Some(o) = top.get_node("objectives")
            {
                self.err(
                    Pos::of(o.span()),
                    "`objectives` has a `downtime` but the runbook does not say what the downtime is",
                    Some("add `downtime: { from: STEP, to: STEP }`: the step that stops the service and the check that proves it back".into()),
                );
            }
            return None;
        };
        let Some(map) = node.as_mapping() else {
            self.err(
                Pos::of(node.span()),
                "`downtime` must be a mapping with `from` and `to`",
                Some("e.g. `downtime: { from: stop-source, to: [orders] }`".into()),
            );
            return None;
        };
        self.unknown_keys(map, &["from", "to"], "downtime");
        let ends = |key: &str, p: &mut Self| -> Vec<String> {
            let Some(n) = map.get_node(key) else {
                p.err(
                    Pos::of(node.span()),
                    format!("`downtime` has no `{key}`"),
                    Some(if key == "from" {
                        "name the step(s) that stop the service: the downtime starts when the first of them starts".into()
                    } else {
                        "name the check(s) that prove the service back: the downtime ends when the last of them ends".into()
                    }),
                );
                return Vec::new();
            };
            let items: Vec<(String, Pos)> = match n {
                Node::Scalar(s) => vec![(s.as_str().to_owned(), Pos::of(s.span()))],
                Node::Sequence(seq) => seq
                    .iter()
                    .filter_map(|i| {
                        i.as_scalar()
                            .map(|s| (s.as_str().to_owned(), Pos::of(s.span())))
                    })
                    .collect(),
                other => {
                    p.err(
                        Pos::of(other.span()),
                        format!("`downtime.{key}` must be a step id or a list of them"),
                        None,
                    );
                    Vec::new()
                }
            };
            let mut out = Vec::new();
            for (id, at) in items {
                if steps.iter().any(|s| s.id == id) {
                    out.push(id);
                } else {
                    let hint = p
                        .hint(&id, steps.iter().map(|s| s.id.as_str()))
                        .map(|s| format!("did you mean `{s}`?"));
                    p.err(
                        at,
                        format!(
                            "`downtime.{key}` names `{id}`, which is not a step of this runbook"
                        ),
                        hint,
                    );
                }
            }
            if out.is_empty()
                && map
                    .get_node(key)
                    .is_some_and(|n| n.as_sequence().is_some_and(|s| s.is_empty()))
            {
                p.err(
                    Pos::of(node.span()),
                    format!("`downtime.{key}` is empty"),
                    None,
                );
            }
            out
        };
        let from = ends("from", self);
        let to = ends("to", self);
        (!from.is_empty() && !to.is_empty()).then_some(Downtime { from, to })
    }

    fn targets(&mut self, top: &MarkedMappingNode) -> Vec<Target> {
        let default = || {
            vec![Target {
                name: "local".into(),
                kind: "local".into(),
                parallelism: 4,
                settings: Map::new(),
                line: 0,
                column: 0,
            }]
        };
        let Some(node) = top.get_node("targets") else {
            return default();
        };
        let Some(map) = node.as_mapping() else {
            self.err(
                Pos::of(node.span()),
                "`targets` must be a mapping of names to targets",
                None,
            );
            return default();
        };
        let mut out = Vec::new();
        for (k, v) in map.iter() {
            let Some(m) = v.as_mapping() else {
                self.err(
                    Pos::of(v.span()),
                    format!("target `{}` must be a mapping with `type`", k.as_str()),
                    None,
                );
                continue;
            };
            // Which types exist, and what settings each takes, is the
            // orchestrator's registry's to say: the engine knows no target.
            let kind = self
                .string(m, "type", "a target")
                .unwrap_or_else(|| "local".into());
            let settings = m
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "type" | "parallelism"))
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect();
            let parallelism = match m.get_scalar("parallelism") {
                None => 4,
                Some(s) => match s.as_str().parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        self.err(
                            Pos::of(s.span()),
                            "`parallelism` must be a whole number of at least 1",
                            None,
                        );
                        4
                    }
                },
            };
            let pos = Pos::of(k.span());
            out.push(Target {
                name: k.as_str().to_owned(),
                kind,
                parallelism,
                settings,
                line: pos.line,
                column: pos.column,
            });
        }
        if out.is_empty() {
            self.err(
                Pos::of(node.span()),
                "`targets` is empty",
                Some("remove it to use the local target".into()),
            );
            return default();
        }
        out
    }

    fn steps(
        &mut self,
        top: &MarkedMappingNode,
        params: &[Param],
        targets: &[Target],
    ) -> Vec<Step> {
        let Some(node) = top.get_node("steps") else {
            self.err(
                Pos::of(top.span()),
                "the runbook has no `steps`",
                Some("add `steps:` with at least one step".into()),
            );
            return Vec::new();
        };
        let Some(seq) = node.as_sequence() else {
            self.err(
                Pos::of(node.span()),
                "`steps` must be a list of steps",
                Some("start each step with `- id: NAME`".into()),
            );
            return Vec::new();
        };
        if seq.is_empty() {
            self.err(Pos::of(node.span()), "`steps` is empty", None);
        }
        if seq.len() > self.limits.max_steps {
            self.err(
                Pos::of(node.span()),
                format!(
                    "the runbook lists {} steps, more than the limit of {}",
                    seq.len(),
                    self.limits.max_steps
                ),
                Some("split it into smaller runbooks".into()),
            );
            return Vec::new();
        }
        // Pass 1: ids and edges.
        let mut raws: Vec<RawStep<'_>> = Vec::new();
        let mut ids = BTreeMap::new();
        for item in seq.iter() {
            let Some(m) = item.as_mapping() else {
                self.err(
                    Pos::of(item.span()),
                    "a step must be a mapping with `id` and `uses`",
                    None,
                );
                continue;
            };
            let pos = m
                .get_node("id")
                .map(|n| Pos::of(n.span()))
                .unwrap_or_else(|| Pos::of(m.span()));
            let id = match self.string(m, "id", "a step") {
                Some(id) => id,
                None => {
                    self.err(
                        pos,
                        "a step has no `id`",
                        Some("give every step a unique `id: NAME`".into()),
                    );
                    continue;
                }
            };
            if !valid_id(&id) {
                self.err(
                    pos,
                    format!("step id `{id}` is not valid"),
                    Some("use lowercase letters, digits, - and _, starting with a letter".into()),
                );
            }
            if let Some(first) = ids.insert(id.clone(), raws.len()) {
                let line = raws[first].pos.line;
                self.err(
                    pos,
                    format!("step id `{id}` is used twice (first at line {line})"),
                    None,
                );
                continue;
            }
            let needs = match m.get_node("needs") {
                None => Vec::new(),
                Some(Node::Scalar(s)) => vec![(s.as_str().to_owned(), Pos::of(s.span()))],
                Some(Node::Sequence(items)) => items
                    .iter()
                    .filter_map(|n| match n.as_scalar() {
                        Some(s) => Some((s.as_str().to_owned(), Pos::of(s.span()))),
                        None => {
                            self.err(Pos::of(n.span()), "`needs` lists step ids", None);
                            None
                        }
                    })
                    .collect(),
                Some(other) => {
                    self.err(
                        Pos::of(other.span()),
                        "`needs` must be a step id or a list of them",
                        None,
                    );
                    Vec::new()
                }
            };
            raws.push(RawStep {
                node: m,
                id,
                pos,
                needs,
            });
        }
        let mut edges: Vec<Vec<usize>> = vec![Vec::new(); raws.len()];
        // The same needs, sorted, to look references up in.
        let mut needs_sorted: Vec<Vec<usize>> = vec![Vec::new(); raws.len()];
        for (i, r) in raws.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for (need, at) in &r.needs {
                match ids.get(need) {
                    Some(&j) if j == i => {
                        self.err(*at, format!("step `{}` needs itself", r.id), None)
                    }
                    Some(&j) => {
                        if seen.insert(j) {
                            edges[i].push(j);
                        }
                    }
                    None => {
                        let hint = self
                            .hint(need, ids.keys().map(String::as_str))
                            .map(|s| format!("did you mean `{s}`?"));
                        self.err(
                            *at,
                            format!(
                                "step `{}` needs `{need}`, which is not a step of this runbook",
                                r.id
                            ),
                            hint,
                        );
                    }
                }
            }
            needs_sorted[i] = seen.into_iter().collect();
        }
        let comp = self.cycles(&raws, &edges);
        // Pass 2: everything else.
        let mut steps = Vec::new();
        for (i, r) in raws.iter().enumerate() {
            let step = self.step(
                i,
                r,
                &edges[i],
                &needs_sorted[i],
                &raws,
                &ids,
                params,
                targets,
            );
            steps.push(step);
        }
        // References to steps that are not direct needs: one pass over the
        // graph answers them all.
        let pending = std::mem::take(&mut self.pending);
        let pairs: Vec<(usize, usize)> = pending.iter().map(|p| (p.reader, p.read)).collect();
        let upstream = reachable(&edges, &comp, &pairs);
        for (p, ok) in pending.iter().zip(upstream) {
            let text = expr::path_text(&p.path);
            let (reader, id) = (&raws[p.reader].id, &raws[p.read].id);
            if !ok {
                self.err(
                    p.at,
                    format!("step `{reader}` reads `{text}`, but `{id}` is not upstream of it"),
                    Some(format!("add `{id}` to the `needs` of `{reader}`")),
                );
                continue;
            }
            self.check_output(&p.path, &text, p.read, p.at, &raws);
        }
        steps
    }

    /// Reports every cycle, step by step. Returns the strongly connected
    /// component of each step (steps on one cycle share one). Kosaraju's
    /// algorithm in petgraph is iterative: a 20,000-step chain does not
    /// recurse 20,000 deep.
    fn cycles(&mut self, raws: &[RawStep<'_>], edges: &[Vec<usize>]) -> Vec<usize> {
        let mut g = petgraph::graph::DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..raws.len()).map(|i| g.add_node(i)).collect();
        for (i, deps) in edges.iter().enumerate() {
            for &d in deps {
                g.add_edge(nodes[d], nodes[i], ());
            }
        }
        let mut comp = vec![0; raws.len()];
        let mut sccs: Vec<Vec<usize>> = petgraph::algo::kosaraju_scc(&g)
            .into_iter()
            .map(|scc| scc.iter().map(|n| g[*n]).collect())
            .collect();
        for (c, scc) in sccs.iter().enumerate() {
            for &i in scc {
                comp[i] = c;
            }
        }
        // Report cycles in file order.
        sccs.retain(|scc| scc.len() > 1);
        sccs.iter_mut().for_each(|scc| scc.sort_unstable());
        sccs.sort();
        for members in sccs {
            let start = members[0];
            let c = comp[start];
            // Walk `needs` edges inside the component until a step repeats.
            let mut path = vec![start];
            let mut at_index = std::collections::HashMap::from([(start, 0usize)]);
            let mut cur = start;
            while let Some(&next) = edges[cur].iter().find(|&&d| comp[d] == c) {
                if let Some(&at) = at_index.get(&next) {
                    path.drain(..at);
                    path.push(next);
                    break;
                }
                at_index.insert(next, path.len());
                path.push(next);
                cur = next;
            }
            let names: Vec<&str> = path.iter().map(|&i| raws[i].id.as_str()).collect();
            let first = path[0];
            self.err(
                raws[first].pos,
                format!(
                    "steps form a cycle: {} (each needs the next)",
                    names.join(" → ")
                ),
                Some("a runbook is a DAG: remove one of these `needs`".into()),
            );
        }
        comp
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        index: usize,
        r: &RawStep<'_>,
        needs: &[usize],
        needs_sorted: &[usize],
        raws: &[RawStep<'_>],
        ids: &BTreeMap<String, usize>,
        params: &[Param],
        targets: &[Target],
    ) -> Step {
        let m = r.node;
        let what = format!("step `{}`", r.id);
        self.unknown_keys(m, STEP_KEYS, &what);
        let uses = self.string(m, "uses", &what).unwrap_or_default();
        let action = catalog::action(&uses);
        match (m.contains_key("uses"), action) {
            (false, _) => self.err(
                r.pos,
                format!("{what} has no `uses`"),
                Some("name the action it runs, e.g. `uses: volume.restore`".into()),
            ),
            (true, None) => {
                let hint = match self.hint(&uses, catalog::ACTIONS.iter().map(|a| a.name)) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!(
                        "available actions: {}",
                        catalog::ACTIONS
                            .iter()
                            .map(|a| a.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                self.err(
                    val_pos(m, "uses"),
                    format!("unknown action `{uses}` in {what}"),
                    Some(hint),
                );
            }
            _ => {}
        }
        let target_named = m.contains_key("target");
        let target = match self.string(m, "target", &what) {
            None => 0,
            Some(t) => targets.iter().position(|x| x.name == t).unwrap_or_else(|| {
                let hint = self
                    .hint(&t, targets.iter().map(|x| x.name.as_str()))
                    .map(|s| format!("did you mean `{s}`?"));
                self.err(
                    val_pos(m, "target"),
                    format!("{what} names target `{t}`, which `targets` does not define"),
                    hint,
                );
                0
            }),
        };
        let has_each = m.contains_key("for_each");
        let refs = RefCtx {
            step: &r.id,
            index,
            needs: needs_sorted,
            own: false,
            raws,
            ids,
            params,
            has_each,
        };
        // with
        let mut with = Map::new();
        if let Some(node) = m.get_node("with") {
            match node.as_mapping() {
                None => self.err(
                    Pos::of(node.span()),
                    format!("`with` of {what} must be a mapping of inputs"),
                    None,
                ),
                Some(wm) => {
                    for (k, v) in wm.iter() {
                        let value = to_json(v);
                        if let Some(a) = action {
                            match a.input(k.as_str()) {
                                None => {
                                    let hint = match self
                                        .hint(k.as_str(), a.inputs.iter().map(|i| i.name))
                                    {
                                        Some(s) => format!("did you mean `{s}`?"),
                                        None if a.inputs.is_empty() => {
                                            format!("`{}` takes no inputs", a.name)
                                        }
                                        None => format!(
                                            "`{}` takes {}",
                                            a.name,
                                            a.inputs
                                                .iter()
                                                .map(|i| i.name)
                                                .collect::<Vec<_>>()
                                                .join(", ")
                                        ),
                                    };
                                    self.err(
                                        Pos::of(k.span()),
                                        format!("`{}` has no input `{}`", a.name, k.as_str()),
                                        Some(hint),
                                    );
                                }
                                Some(input) => {
                                    let what = format!("input `{}`", input.name);
                                    if self.check_literal(v, &value, input.ty, &what)
                                        && let Err(e) = catalog::check_format(input.format, &value)
                                    {
                                        self.err(Pos::of(v.span()), format!("{what}: {e}"), None);
                                    }
                                }
                            }
                        }
                        self.check_templates(v, &refs);
                        with.insert(k.as_str().to_owned(), value);
                    }
                }
            }
        }
        if let Some(a) = action {
            for message in a.check_rules(|name| with.contains_key(name)) {
                self.err(
                    key_pos(
                        m,
                        if m.contains_key("with") {
                            "with"
                        } else {
                            "uses"
                        },
                    ),
                    format!("{what}: {message}"),
                    None,
                );
            }
            for input in a.inputs.iter().filter(|i| i.required) {
                if !with.contains_key(input.name) {
                    self.err(
                        key_pos(
                            m,
                            if m.contains_key("with") {
                                "with"
                            } else {
                                "uses"
                            },
                        ),
                        format!(
                            "{what}: `{}` needs input `{}` ({})",
                            a.name, input.name, input.doc
                        ),
                        Some(format!("add `{}:` under `with:`", input.name)),
                    );
                }
            }
        }
        // if
        let cond = self.string(m, "if", &what);
        if let (Some(c), Some(node)) = (&cond, m.get_node("if")) {
            let text = c.trim();
            let inner = text
                .strip_prefix("${{")
                .and_then(|t| t.strip_suffix("}}"))
                .unwrap_or(text);
            match expr::parse_expr(inner) {
                Ok(e) => self.check_expr(&e, Pos::of(node.span()), &refs),
                Err((_, msg)) => {
                    self.err(Pos::of(node.span()), format!("`if` of {what}: {msg}"), None)
                }
            }
        }
        // for_each
        let for_each = m.get_node("for_each").map(|n| {
            let v = to_json(n);
            match &v {
                Value::Array(_) => {}
                Value::String(s) if s.contains("${{") => {
                    self.check_templates(
                        n,
                        &RefCtx {
                            has_each: false,
                            ..refs
                        },
                    );
                    let mut paths = Vec::new();
                    let exprs = expr::exprs_in(&v);
                    exprs.iter().for_each(|e| e.paths(&mut paths));
                    if paths
                        .iter()
                        .any(|p| !matches!(p.first(), Some(Seg::Key(k)) if k == "params"))
                    {
                        self.err(
                            Pos::of(n.span()),
                            format!("`for_each` of {what} may only use params"),
                            Some("the plan expands for_each before anything runs".into()),
                        );
                    }
                }
                _ => self.err(
                    Pos::of(n.span()),
                    format!("`for_each` of {what} must be a list or `${{{{ params.NAME }}}}`"),
                    None,
                ),
            }
            v
        });
        let retry = self.retry(m, &what);
        let timeout_ms = self.duration(m, "timeout", &what);
        let undo = self.undo(m, &what, action, &refs);
        Step {
            id: r.id.clone(),
            name: self.string(m, "name", &what),
            uses,
            target,
            with,
            needs: needs.to_vec(),
            cond,
            for_each,
            retry,
            timeout_ms,
            target_named,
            undo,
            line: r.pos.line,
            column: r.pos.column,
        }
    }

    fn undo(
        &mut self,
        m: &MarkedMappingNode,
        what: &str,
        action: Option<&'static catalog::Action>,
        refs: &RefCtx<'_>,
    ) -> Option<Undo> {
        let Some(node) = m.get_node("undo") else {
            return action.filter(|a| a.creates).map(|a| Undo {
                uses: a.name.to_owned(),
                with: Map::new(),
            });
        };
        let Some(um) = node.as_mapping() else {
            self.err(
                Pos::of(node.span()),
                format!("`undo` of {what} must be a mapping with `uses` and `with`"),
                None,
            );
            return None;
        };
        self.unknown_keys(um, &["uses", "with"], "an undo");
        let uses = self.string(um, "uses", "an undo").unwrap_or_default();
        let ok = matches!(uses.as_str(), "command.run" | "instance.stop" | "noop");
        if !ok {
            self.err(
                val_pos(um, "uses"),
                format!("`undo` of {what} uses `{uses}`"),
                Some("an undo runs command.run, instance.stop or noop".into()),
            );
        }
        let mut with = Map::new();
        if let Some(wm) = um.get_mapping("with") {
            for (k, v) in wm.iter() {
                // The undo may read the step's own outputs.
                self.check_templates(v, &RefCtx { own: true, ..*refs });
                with.insert(k.as_str().to_owned(), to_json(v));
            }
        }
        Some(Undo { uses, with })
    }

    fn retry(&mut self, m: &MarkedMappingNode, what: &str) -> Retry {
        let mut retry = Retry::default();
        let Some(node) = m.get_node("retry") else {
            return retry;
        };
        let attempts_of = |s: &MarkedScalarNode| {
            s.as_str()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=100).contains(n))
        };
        match node {
            Node::Scalar(s) => match attempts_of(s) {
                Some(n) => retry.attempts = n,
                None => self.err(
                    Pos::of(s.span()),
                    format!("`retry` of {what} must be a number of tries from 1 to 100"),
                    None,
                ),
            },
            Node::Mapping(rm) => {
                self.unknown_keys(rm, RETRY_KEYS, "retry");
                if let Some(s) = rm.get_scalar("attempts") {
                    match attempts_of(s) {
                        Some(n) => retry.attempts = n,
                        None => self.err(
                            Pos::of(s.span()),
                            "`attempts` must be a number of tries from 1 to 100",
                            None,
                        ),
                    }
                }
                if let Some(ms) = self.duration(rm, "backoff", "retry") {
                    retry.backoff_ms = ms;
                }
                if let Some(ms) = self.duration(rm, "max_backoff", "retry") {
                    retry.max_backoff_ms = ms;
                }
                if let Some(on) = rm.get_node("on") {
                    let items: Vec<&Node> = match on {
                        Node::Sequence(s) => s.iter().collect(),
                        other => vec![other],
                    };
                    retry.on.clear();
                    for it in items {
                        let text = it.as_scalar().map(|s| s.as_str()).unwrap_or("");
                        match text {
                            "transient" => retry.on.push(ErrorClass::Transient),
                            "timeout" => retry.on.push(ErrorClass::Timeout),
                            "permanent" | "any" => {
                                retry.on.push(ErrorClass::Permanent);
                                if text == "any" {
                                    retry
                                        .on
                                        .extend([ErrorClass::Transient, ErrorClass::Timeout]);
                                }
                            }
                            _ => self.err(
                                Pos::of(it.span()),
                                format!("unknown error class `{text}` in `retry.on`"),
                                Some("use transient, timeout, permanent or any".into()),
                            ),
                        }
                    }
                }
            }
            Node::Sequence(s) => self.err(
                Pos::of(s.span()),
                format!("`retry` of {what} must be a number or a mapping"),
                None,
            ),
        }
        retry
    }

    /// Type-checks a literal input (templates are checked when rendered);
    /// false when it does not fit, so its format is not judged as well.
    fn check_literal(&mut self, node: &Node, v: &Value, ty: Ty, what: &str) -> bool {
        if let Value::String(s) = v
            && s.contains("${{")
        {
            return true;
        }
        let ok = match ty {
            Ty::Any => true,
            Ty::String => matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)),
            Ty::Integer => v.is_i64() || v.as_str().is_some_and(|s| s.parse::<i64>().is_ok()),
            Ty::Bool => v.is_boolean(),
            Ty::Duration => {
                v.is_number() || v.as_str().and_then(catalog::parse_duration_ms).is_some()
            }
            Ty::List => v.is_array(),
            Ty::Map => v.is_object(),
        };
        if !ok {
            let hint =
                (ty == Ty::Duration).then(|| "write it like 500ms, 30s, 5m or 2h".to_owned());
            self.err(
                Pos::of(node.span()),
                format!("{what} must be a {}, not `{}`", ty.name(), expr::to_text(v)),
                hint,
            );
        }
        ok
    }

    /// Parses every `${{ }}` inside a node and checks what it references.
    fn check_templates(&mut self, node: &Node, refs: &RefCtx<'_>) {
        match node {
            Node::Scalar(s) if s.as_str().contains("${{") => match expr::parse_template(s.as_str())
            {
                Err((_, msg)) => self.err(
                    Pos::of(s.span()),
                    format!("in `{}`: {msg}", s.as_str()),
                    None,
                ),
                Ok(parts) => {
                    for p in parts {
                        if let expr::Part::Expr(e) = p {
                            self.check_expr(&e, Pos::of(s.span()), refs);
                        }
                    }
                }
            },
            Node::Scalar(_) => {}
            Node::Sequence(items) => items.iter().for_each(|n| self.check_templates(n, refs)),
            Node::Mapping(m) => m.values().for_each(|n| self.check_templates(n, refs)),
        }
    }

    /// `steps.ID.outputs.NAME` once `ID` is known to be upstream: the shape
    /// of the path and whether the action has that output.
    fn check_output(&mut self, p: &[Seg], text: &str, j: usize, at: Pos, raws: &[RawStep<'_>]) {
        let key = |i: usize| match p.get(i) {
            Some(Seg::Key(k)) => Some(k.as_str()),
            _ => None,
        };
        let id = &raws[j].id;
        if key(2) != Some("outputs") || p.len() < 4 {
            self.err(
                at,
                format!("`{text}`: write `steps.{id}.outputs.NAME`"),
                None,
            );
            return;
        }
        let uses = raws[j]
            .node
            .get_scalar("uses")
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        if let (Some(a), Some(out)) = (catalog::action(&uses), key(3))
            && !a.has_output(out)
        {
            let list: Vec<&str> = a.outputs.iter().map(|(o, _)| *o).collect();
            let hint = match self.hint(out, list.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None if list.is_empty() => format!("`{uses}` has no outputs"),
                None => format!("`{uses}` outputs {}", list.join(", ")),
            };
            self.err(
                at,
                format!("`{text}`: `{uses}` has no output `{out}`"),
                Some(hint),
            );
        }
    }

    fn check_expr(&mut self, e: &Expr, at: Pos, refs: &RefCtx<'_>) {
        let mut paths = Vec::new();
        e.paths(&mut paths);
        for p in paths {
            let text = expr::path_text(p);
            let key = |i: usize| match p.get(i) {
                Some(Seg::Key(k)) => Some(k.as_str()),
                _ => None,
            };
            match key(0) {
                Some("params") => match key(1) {
                    Some(name) if refs.params.iter().any(|x| x.name == name) => {}
                    Some(name) => {
                        let hint = match self
                            .hint(name, refs.params.iter().map(|x| x.name.as_str()))
                        {
                            Some(s) => format!("did you mean `params.{s}`?"),
                            None => {
                                format!("declare it under `params:` (`{name}: {{ type: string }}`)")
                            }
                        };
                        self.err(
                            at,
                            format!("`{text}`: the runbook has no param `{name}`"),
                            Some(hint),
                        );
                    }
                    None => self.err(
                        at,
                        format!("`{text}`: name a param, e.g. `params.NAME`"),
                        None,
                    ),
                },
                Some("steps") => {
                    let Some(id) = key(1) else {
                        self.err(at, format!("`{text}`: write `steps.ID.outputs.NAME`"), None);
                        continue;
                    };
                    let Some(&j) = refs.ids.get(id) else {
                        let hint = self
                            .hint(id, refs.ids.keys().map(String::as_str))
                            .map(|s| format!("did you mean `{s}`?"));
                        self.err(
                            at,
                            format!("`{text}` refers to step `{id}`, which does not exist"),
                            hint,
                        );
                        continue;
                    };
                    let direct = if j == refs.index {
                        refs.own
                    } else {
                        refs.needs.binary_search(&j).is_ok()
                    };
                    if direct {
                        self.check_output(p, &text, j, at, refs.raws);
                    } else if j == refs.index {
                        self.err(
                            at,
                            format!("step `{}` reads `{text}`, its own outputs", refs.step),
                            Some("a step reads its own outputs only in its `undo`".into()),
                        );
                    } else {
                        // Upstream through other steps? Answered for all
                        // such references at once when every step is read.
                        self.pending.push(Pending {
                            reader: refs.index,
                            read: j,
                            at,
                            path: p.to_vec(),
                        });
                    }
                }
                Some("each") => {
                    if !refs.has_each {
                        self.err(
                            at,
                            format!("`{text}` is only defined in a step with `for_each`"),
                            None,
                        );
                    } else if !matches!(key(1), Some("value" | "index")) {
                        self.err(
                            at,
                            format!("`{text}`: use `each.value` or `each.index`"),
                            None,
                        );
                    }
                }
                Some("run")
                    if !matches!(
                        key(1),
                        Some("id" | "mode" | "work_dir" | "target" | "target_type")
                    ) =>
                {
                    self.err(
                        at,
                        format!("`{text}`: use `run.id`, `run.mode`, `run.work_dir`, `run.target` or `run.target_type`"),
                        None,
                    );
                }
                Some(other) => self.err(
                    at,
                    format!("`{text}`: unknown name `{other}`"),
                    Some("expressions read params.*, steps.ID.outputs.*, each.* and run.*".into()),
                ),
                None => {}
            }
        }
    }
}

#[derive(Clone, Copy)]
struct RefCtx<'a> {
    step: &'a str,
    /// The step's index in `raws`.
    index: usize,
    /// The steps it lists in `needs`, sorted.
    needs: &'a [usize],
    /// Whether it may read its own outputs (in its `undo`).
    own: bool,
    raws: &'a [RawStep<'a>],
    ids: &'a BTreeMap<String, usize>,
    params: &'a [Param],
    has_each: bool,
}

/// For each `(reader, read)` pair, whether `read` is upstream of `reader`
/// (reachable through `needs`). `comp` gives each step's strongly connected
/// component; steps on one cycle reach each other.
///
/// The components are visited in dependency order once per 64 distinct
/// `read` steps, carrying one bit per such step: O((steps + needs) × reads /
/// 64) time and O(steps) memory, where a transitive closure per step is
/// quadratic in both (a 20,000-step chain took 8 GB).
fn reachable(edges: &[Vec<usize>], comp: &[usize], pairs: &[(usize, usize)]) -> Vec<bool> {
    if pairs.is_empty() {
        return Vec::new();
    }
    let n_comp = comp.iter().map(|&c| c + 1).max().unwrap_or(0);
    // The condensation: edges between components, and a topological order
    // (Kahn's algorithm; it has no cycles).
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_comp];
    for (i, &c) in comp.iter().enumerate() {
        members[c].push(i);
    }
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n_comp];
    let mut indegree = vec![0usize; n_comp];
    for (i, deps) in edges.iter().enumerate() {
        for &d in deps {
            if comp[d] != comp[i] {
                dependents[comp[d]].push(comp[i]);
                indegree[comp[i]] += 1;
            }
        }
    }
    let mut order: Vec<usize> = (0..n_comp).filter(|&c| indegree[c] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        let c = order[next];
        next += 1;
        for &d in &dependents[c] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                order.push(d);
            }
        }
    }
    let mut reads: Vec<usize> = pairs.iter().map(|&(_, r)| r).collect();
    reads.sort_unstable();
    reads.dedup();
    let mut answers = vec![false; pairs.len()];
    let mut bits = vec![0u64; n_comp];
    for chunk in reads.chunks(64) {
        bits.iter_mut().for_each(|b| *b = 0);
        for (k, &r) in chunk.iter().enumerate() {
            bits[comp[r]] |= 1 << k;
        }
        for &c in &order {
            let mut b = bits[c];
            for &i in &members[c] {
                for &d in &edges[i] {
                    b |= bits[comp[d]];
                }
            }
            bits[c] = b;
        }
        for (a, &(reader, read)) in answers.iter_mut().zip(pairs) {
            if let Ok(k) = chunk.binary_search(&read) {
                *a = reader != read && bits[comp[reader]] & (1 << k) != 0;
            }
        }
    }
    answers
}
