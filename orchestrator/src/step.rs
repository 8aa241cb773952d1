//! What every action gets and gives back: the run's context, one try's
//! identity and inputs (with typed accessors), the error that says whether
//! another try could help, and the process builder for runbook commands.
//! Targets, checks and the action dispatcher all build on this module.

use crate::context::Password;
use crate::error::anyhow_chain;
use ferry_engine::runbook::ErrorClass;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub type Outputs = Map<String, Value>;

/// Why an action failed, and whether another try could help.
#[derive(Debug, Clone)]
pub struct ActionError {
    pub class: ErrorClass,
    pub message: String,
}

impl ActionError {
    pub fn permanent(m: impl Into<String>) -> ActionError {
        ActionError {
            class: ErrorClass::Permanent,
            message: m.into(),
        }
    }

    pub fn transient(m: impl Into<String>) -> ActionError {
        ActionError {
            class: ErrorClass::Transient,
            message: m.into(),
        }
    }
}

impl From<anyhow::Error> for ActionError {
    fn from(e: anyhow::Error) -> ActionError {
        let class = match e.downcast_ref::<ferry_agent::Error>() {
            Some(fe) => crate::error::class_of(fe),
            None => ErrorClass::Transient,
        };
        ActionError {
            class,
            message: anyhow_chain(&e),
        }
    }
}

impl From<ferry_agent::Error> for ActionError {
    fn from(e: ferry_agent::Error) -> ActionError {
        ActionError::from(anyhow::Error::from(e))
    }
}

/// What every action of one run shares.
#[derive(Debug)]
pub struct Ctx {
    pub run_id: String,
    pub work_dir: PathBuf,
    pub drill: bool,
    /// When the run started (ms since the epoch): the instant RPO is measured at.
    pub started_ms: i64,
    /// The run's repository (`-r`), for actions whose `repo` input is empty.
    pub repo: Option<String>,
    /// The repository password, read once when the run started or resumed.
    pub password: Option<Password>,
    /// The runbook's declared `secrets`: name and value, read from the
    /// orchestrator's environment when the run started or resumed.
    pub secrets: Vec<(String, String)>,
}

impl Ctx {
    /// The value of a secret the runbook declares; any other name is refused.
    pub fn secret(&self, name: &str) -> Result<&str, ActionError> {
        match self.secrets.iter().find(|(n, _)| n == name) {
            Some((_, v)) if !v.is_empty() => Ok(v),
            Some(_) => Err(ActionError::permanent(format!(
                "the secret {name} is not set in the orchestrator's environment"
            ))),
            None => Err(ActionError::permanent(format!(
                "`{name}` is not one of the runbook's `secrets`"
            ))),
        }
    }

    /// `text` with every secret value (and the repository password) replaced
    /// by `***`: what a step returns or fails with is stored and shown.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        let password = self
            .password
            .as_ref()
            .and_then(|p| std::str::from_utf8(p.bytes()).ok().map(str::to_owned));
        for v in self
            .secrets
            .iter()
            .map(|(_, v)| v.clone())
            .chain(password)
            .filter(|v| v.len() >= 4)
        {
            if out.contains(&v) {
                out = out.replace(&v, "***");
            }
        }
        out
    }

    /// [`Ctx::scrub`] of every string in outputs.
    pub fn scrub_value(&self, v: &mut Value) {
        match v {
            Value::String(s) => {
                let clean = self.scrub(s);
                if clean != *s {
                    *s = clean;
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.scrub_value(x)),
            Value::Object(m) => m.values_mut().for_each(|x| self.scrub_value(x)),
            _ => {}
        }
    }

    /// Opens the repository named by the call's `repo` input, else the run's.
    pub fn open_repo(&self, call: &Call) -> Result<ferry_agent::Repository, ActionError> {
        self.open_repo_at(call.str("repo").as_deref())
    }

    /// Opens the repository at `location` if given (and not empty), else the run's.
    pub fn open_repo_at(
        &self,
        location: Option<&str>,
    ) -> Result<ferry_agent::Repository, ActionError> {
        let location = location
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| self.repo.clone())
            .ok_or_else(|| {
                ActionError::permanent(
                    "no repository: pass -r/--repo (or FERRY_REPO), or give the step a `repo` input",
                )
            })?;
        let password = self.password.clone().ok_or_else(|| {
            ActionError::permanent(
                "no repository password: set FERRY_PASSWORD or pass --password-file",
            )
        })?;
        let store = ferry_connectors::store::open(&location, false).map_err(ActionError::from)?;
        ferry_agent::Repository::open(store, password.bytes()).map_err(ActionError::from)
    }
}

/// The index of the disk `name` in a point (its only disk when `None`).
pub fn disk_index(
    point: &ferry_agent::point::Point,
    name: Option<&str>,
) -> Result<usize, ActionError> {
    let names: Vec<&str> = point.meta.disks.iter().map(|d| d.name.as_str()).collect();
    match name {
        Some(n) => names.iter().position(|d| *d == n).ok_or_else(|| {
            ActionError::permanent(format!(
                "point {} has no disk `{n}`; it has {}",
                point.short_id(),
                names.join(", ")
            ))
        }),
        None if names.len() == 1 => Ok(0),
        None => Err(ActionError::permanent(format!(
            "point {} has {} disks ({}); say which with `disk:`",
            point.short_id(),
            names.len(),
            names.join(", ")
        ))),
    }
}

/// Asks a blocking operation to stop when the try that started it is
/// dropped (its timeout, a cancelled run).
pub struct CancelOnDrop(pub Arc<ferry_agent::progress::Progress>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// One try of one step.
#[derive(Debug, Clone)]
pub struct Call {
    /// The node's id (`disk`, `disk[1]`), unique in the run.
    pub node: String,
    pub key: String,
    pub uses: String,
    pub inputs: Outputs,
}

impl Call {
    pub fn str(&self, name: &str) -> Option<String> {
        self.inputs.get(name).and_then(|v| match v {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
    }

    pub fn need(&self, name: &str) -> Result<String, ActionError> {
        self.str(name)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ActionError::permanent(format!("input `{name}` is empty")))
    }

    pub fn int(&self, name: &str, default: i64) -> Result<i64, ActionError> {
        match self.inputs.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| ActionError::permanent(format!("`{name}` must be a whole number"))),
            Some(Value::String(s)) => s.trim().parse().map_err(|_| {
                ActionError::permanent(format!("`{name}` must be a whole number, not `{s}`"))
            }),
            Some(v) => Err(ActionError::permanent(format!(
                "`{name}` must be a whole number, not {v}"
            ))),
        }
    }

    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.inputs.get(name)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) => Some(s == "true" || s == "yes"),
            _ => None,
        }
    }

    pub fn duration(&self, name: &str, default: Duration) -> Result<Duration, ActionError> {
        match self.inputs.get(name) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => {
                Duration::try_from_secs_f64(n.as_f64().unwrap_or(0.0).max(0.0)).map_err(|_| {
                    ActionError::permanent(format!("`{name}` is not a usable duration: {n}"))
                })
            }
            Some(Value::String(s)) => ferry_engine::catalog::parse_duration_ms(s)
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    ActionError::permanent(format!("`{name}` is not a duration: `{s}`"))
                }),
            Some(v) => Err(ActionError::permanent(format!(
                "`{name}` is not a duration: {v}"
            ))),
        }
    }

    pub fn map(&self, name: &str) -> Vec<(String, String)> {
        match self.inputs.get(name) {
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| (k.clone(), ferry_engine::expr::to_text(v)))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn list(&self, name: &str) -> Vec<String> {
        match self.inputs.get(name) {
            Some(Value::Array(a)) => a.iter().map(ferry_engine::expr::to_text).collect(),
            Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
            _ => Vec::new(),
        }
    }
}

/// Builds the process for `run`: a list is argv, a string runs under `sh -c`.
pub fn command(ctx: &Ctx, call: &Call) -> Result<tokio::process::Command, ActionError> {
    let argv: Vec<String> = match call.inputs.get("run") {
        Some(Value::Array(a)) => a.iter().map(ferry_engine::expr::to_text).collect(),
        Some(Value::String(s)) => vec!["sh".into(), "-c".into(), s.clone()],
        _ => {
            return Err(ActionError::permanent(
                "`run` must be a list of arguments or a shell command",
            ));
        }
    };
    let Some((prog, args)) = argv.split_first() else {
        return Err(ActionError::permanent("`run` is empty"));
    };
    let mut cmd = tokio::process::Command::new(prog);
    scrub_env(&mut cmd);
    cmd.args(args)
        .envs(call.map("env"))
        .env("FERRY_RUN_ID", &ctx.run_id)
        .env("FERRY_IDEMPOTENCY_KEY", &call.key)
        .env("FERRY_WORK_DIR", &ctx.work_dir)
        .env("FERRY_STEP", &call.node)
        .current_dir(&ctx.work_dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

/// The variables of Ferry's own environment a child process may see. Every
/// other one is dropped: Ferry's secrets (`FERRY_PASSWORD`,
/// `FERRY_PASSWORD_FILE`, `FERRY_API_TOKEN`, cloud credentials, the state
/// URL) are not a runbook command's or a VM's business. A runbook passes
/// what a command needs through the step's `env`.
pub const ENV_ALLOWED: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "TERM",
];

/// Clears a child's environment down to [`ENV_ALLOWED`].
pub fn scrub_env(cmd: &mut tokio::process::Command) {
    cmd.env_clear();
    for k in ENV_ALLOWED {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
}

/// Output kept from a command (the rest is dropped).
const OUTPUT_LIMIT: usize = 64 * 1024;

pub fn clip(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_LIMIT)]);
    s.trim().to_owned()
}

/// A node id as a file name (`disk[1]` -> `disk+1`: `+` is never in a step
/// id, so no two nodes share a name).
pub fn file_stem(node: &str) -> String {
    node.replace('[', "+").replace(']', "")
}
