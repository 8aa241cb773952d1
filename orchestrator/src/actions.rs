//! Which code runs a step: every catalog action is a target action (through
//! the step's [`Target`]), a check, or one the executor runs itself
//! (`command.run`, `wait`, `noop`). The choice is made once, by enum, not by
//! matching strings at each call.

use crate::checks::{self, Check};
use crate::step::{ActionError, Call, Ctx, Outputs, clip, command};
use crate::targets::{self, Bound, StepCx, TargetAction};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Actions the executor runs itself, on the orchestrator's host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    CommandRun,
    Wait,
    Noop,
    /// Never executed: the engine waits for `ferry approve`.
    Approval,
}

impl Builtin {
    pub fn from_name(name: &str) -> Option<Builtin> {
        Some(match name {
            "command.run" => Builtin::CommandRun,
            "wait" => Builtin::Wait,
            "noop" => Builtin::Noop,
            "approval" => Builtin::Approval,
            _ => return None,
        })
    }
}

/// What a step's `uses:` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Target(TargetAction),
    Check(Check),
    Builtin(Builtin),
}

impl Kind {
    pub fn of(uses: &str) -> Option<Kind> {
        TargetAction::from_name(uses)
            .map(Kind::Target)
            .or_else(|| Check::from_name(uses).map(Kind::Check))
            .or_else(|| Builtin::from_name(uses).map(Kind::Builtin))
    }
}

/// Runs one try of a step on `target` (the step's).
pub async fn perform(ctx: Arc<Ctx>, target: Bound, call: Call) -> Result<Outputs, ActionError> {
    let Some(kind) = Kind::of(&call.uses) else {
        return Err(ActionError::permanent(format!(
            "`{}` is not an action this build knows",
            call.uses
        )));
    };
    match kind {
        Kind::Target(action) => {
            let cx = StepCx {
                run: ctx,
                place: target.place.clone(),
                node: call.node.clone(),
                key: call.key.clone(),
            };
            targets::perform(target.target.as_ref(), action, &cx, &call).await
        }
        Kind::Check(check) => checks::run(check, ctx, call).await,
        Kind::Builtin(Builtin::CommandRun) => command_run(&ctx, &call).await,
        Kind::Builtin(Builtin::Wait) => {
            tokio::time::sleep(call.duration("duration", Duration::ZERO)?).await;
            Ok(Outputs::new())
        }
        Kind::Builtin(Builtin::Noop) => Ok(match call.inputs.get("outputs") {
            Some(Value::Object(m)) => m.clone(),
            _ => Outputs::new(),
        }),
        Kind::Builtin(Builtin::Approval) => Err(ActionError::permanent(
            "an approval step is answered with `ferry approve`, not run",
        )),
    }
}

/// Undoes what a node created. `call.uses` is the undo's action: for an
/// action that creates something it is the action itself (its built-in
/// undo: delete, terminate), else the runbook's `undo:` step, run as any
/// other action.
pub async fn undo(ctx: Arc<Ctx>, target: Bound, call: Call) -> Result<(), String> {
    if let Some(Kind::Target(action)) = Kind::of(&call.uses)
        && ferry_engine::catalog::action(action.name()).is_some_and(|a| a.creates)
    {
        let cx = StepCx {
            run: ctx,
            place: target.place.clone(),
            node: call.node.clone(),
            key: call.key.clone(),
        };
        return targets::undo(target.target.as_ref(), action, &cx)
            .await
            .map_err(|e| e.message);
    }
    perform(ctx, target, call)
        .await
        .map(|_| ())
        .map_err(|e| e.message)
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
