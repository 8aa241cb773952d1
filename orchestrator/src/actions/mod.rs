//! What each runbook action does on a target. The local target (image files
//! and QEMU VMs on this host) is the embedded default.
//!
//! Every action is idempotent under its step's key: running it again after a
//! crash finds what the interrupted try made (a finished image, a VM still
//! running under its name) instead of making it twice.

mod checks;
mod local;

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
            Some(fe) if fe.is_usage() => ErrorClass::Permanent,
            Some(ferry_agent::Error::Corrupt { .. } | ferry_agent::Error::DamagedChunk { .. }) => {
                ErrorClass::Permanent
            }
            Some(ferry_agent::Error::Cancelled { .. }) => ErrorClass::Cancelled,
            _ => ErrorClass::Transient,
        };
        ActionError {
            class,
            message: crate::output::error_chain(&e),
        }
    }
}

impl From<ferry_agent::Error> for ActionError {
    fn from(e: ferry_agent::Error) -> ActionError {
        ActionError::from(anyhow::Error::from(e))
    }
}

/// What every action of one run shares.
pub struct Ctx {
    pub run_id: String,
    pub work_dir: PathBuf,
    pub drill: bool,
    /// When the run started (ms since the epoch): the instant RPO is measured at.
    pub started_ms: i64,
    /// The run's repository (`-r`), for actions whose `repo` input is empty.
    pub repo: Option<String>,
    /// The repository password, read once when the run started or resumed.
    pub password: Option<Arc<Vec<u8>>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("run_id", &self.run_id)
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
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

/// Runs one try of an action.
pub async fn perform(ctx: Arc<Ctx>, call: Call) -> Result<Outputs, ActionError> {
    match call.uses.as_str() {
        "volume.restore" => local::volume_restore(ctx, call).await,
        "volume.create" => local::volume_create(&ctx, &call).await,
        "instance.launch" => local::instance_launch(&ctx, &call).await,
        "instance.stop" => local::instance_stop(&ctx, &call.need("name")?)
            .await
            .map(|()| Outputs::new()),
        "command.run" => command_run(&ctx, &call).await,
        "wait" => {
            tokio::time::sleep(call.duration("duration", Duration::ZERO)?).await;
            Ok(Outputs::new())
        }
        "noop" => Ok(match call.inputs.get("outputs") {
            Some(Value::Object(m)) => m.clone(),
            _ => Outputs::new(),
        }),
        "check.tcp" | "check.http" | "check.command" | "check.sql" | "check.disk" => {
            checks::run(ctx, call).await
        }
        other => Err(ActionError::permanent(format!(
            "no target here implements `{other}`"
        ))),
    }
}

/// Undoes what a node created. `uses` is the undo's action (the step's own
/// for built-in undos); `outputs` are the step's, if it finished.
pub async fn undo(
    ctx: Arc<Ctx>,
    node: &str,
    key: &str,
    uses: &str,
    inputs: Outputs,
) -> Result<(), String> {
    match uses {
        "volume.restore" | "volume.create" => local::volume_delete(&ctx, node)
            .await
            .map_err(|e| e.message),
        "instance.launch" => local::instance_stop(&ctx, node)
            .await
            .map_err(|e| e.message),
        _ => {
            let call = Call {
                node: node.to_owned(),
                key: key.to_owned(),
                uses: uses.to_owned(),
                inputs,
            };
            perform(ctx, call).await.map(|_| ()).map_err(|e| e.message)
        }
    }
}

/// Builds the process for `run`: a list is argv, a string runs under `sh -c`.
pub(crate) fn command(ctx: &Ctx, call: &Call) -> Result<tokio::process::Command, ActionError> {
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
    cmd.args(args)
        .envs(call.map("env"))
        // Secrets of the orchestrator are not the command's business.
        .env_remove("FERRY_PASSWORD")
        .env_remove("FERRY_API_TOKEN")
        .env("FERRY_RUN_ID", &ctx.run_id)
        .env("FERRY_IDEMPOTENCY_KEY", &call.key)
        .env("FERRY_WORK_DIR", &ctx.work_dir)
        .env("FERRY_STEP", &call.node)
        .current_dir(&ctx.work_dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

/// Output kept from a command (the rest is dropped).
const OUTPUT_LIMIT: usize = 64 * 1024;

pub(crate) fn clip(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_LIMIT)]);
    s.trim().to_owned()
}

/// `command.run`: exit 75 (EX_TEMPFAIL) is a transient failure, any other
/// unexpected code a permanent one.
async fn command_run(ctx: &Ctx, call: &Call) -> Result<Outputs, ActionError> {
    let want = call.int("exit", 0)?;
    let out = command(ctx, call)?.output().await.map_err(|e| {
        ActionError::permanent(format!(
            "cannot start `{}`: {e}",
            call.list("run").join(" ")
        ))
    })?;
    let code = out.status.code().map_or(-1, i64::from);
    let stdout = clip(&out.stdout);
    if code != want {
        let err = clip(&out.stderr);
        let msg = format!(
            "exited with {code} (wanted {want}){}",
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        );
        return Err(if code == 75 {
            ActionError::transient(msg)
        } else {
            ActionError::permanent(msg)
        });
    }
    let mut o = Outputs::new();
    o.insert("stdout".into(), Value::String(stdout));
    o.insert("exit".into(), Value::from(code));
    Ok(o)
}

/// A node id as a file name (`disk[1]` -> `disk+1`: `+` is never in a step
/// id, so no two nodes share a name).
pub(crate) fn file_stem(node: &str) -> String {
    node.replace('[', "+").replace(']', "")
}
