//! Run control, the one implementation the command line and the API share:
//! validating a runbook against the targets this build has, creating a run,
//! queueing approve/cancel/rollback for the process that drives a run,
//! deciding whether anyone drives it, driving it, and building its report.

use crate::context::{Context, Password};
use crate::error::{Error, Result};
use crate::exec::{self, Output, Runner};
use crate::report::Report;
use crate::state::{Command, RunRow, State};
use crate::targets::Registry;
use ferry_engine::{Diagnostics, Mode, RunStatus, Runbook, StepState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The most a runbook's text may be: far above any real runbook, and a
/// bound on what one request can make the server parse.
pub const MAX_RUNBOOK_BYTES: usize = 1 << 20;

/// Validates a runbook: the engine's rules, then the targets (every type
/// exists, its settings are ones it takes, and it implements the actions its
/// steps use). Every problem at once. With `target`, the steps that name no
/// target of their own are checked, and later run, on that one.
pub fn validate(
    registry: &Registry,
    file: &str,
    text: &str,
    target: Option<&str>,
) -> Result<Runbook> {
    if text.len() > MAX_RUNBOOK_BYTES {
        return Err(Error::TooLarge(format!(
            "{file}: the runbook is {} bytes; the most accepted is {MAX_RUNBOOK_BYTES}",
            text.len()
        )));
    }
    let mut rb = ferry_engine::parse(file, text).map_err(Error::Invalid)?;
    let problems = match target {
        Some(t) => {
            rb.retarget(t).map_err(Error::usage)?;
            registry.check(&rb)
        }
        None => registry.check_every_target(&rb),
    };
    if problems.is_empty() {
        Ok(rb)
    } else {
        Err(Error::Invalid(Diagnostics(problems)))
    }
}

/// Validates and plans (params bound and type-checked, the DAG built).
pub fn plan(
    registry: &Registry,
    file: &str,
    text: &str,
    params: &BTreeMap<String, String>,
    target: Option<&str>,
) -> Result<ferry_engine::Plan> {
    let rb = validate(registry, file, text, target)?;
    ferry_engine::plan(rb, params).map_err(Error::Usage)
}

/// Forecasts a plan (blocking: it reads the repository, when one is given,
/// read-only: the points the restores name, the index for what they read,
/// the listing for what standby stores). A repository that cannot be read
/// leaves those parts out, and the forecast's notes say why.
pub fn forecast(
    ctx: &Context,
    registry: &Registry,
    plan: &ferry_engine::Plan,
    target: Option<&str>,
    history: &crate::forecast::History,
    prices: &crate::forecast::PriceTable,
) -> crate::forecast::Forecast {
    let mut problem = None;
    let repo = match ctx.password_if_any() {
        _ if ctx.repo.is_none() => None,
        Ok(None) => {
            problem = Some("the repository was not read: no password given".to_owned());
            None
        }
        Err(e) => {
            problem = Some(format!("the repository was not read: {e}"));
            None
        }
        Ok(Some(_)) => match ctx.open_repo(false) {
            Ok(r) => Some(r),
            Err(e) => {
                problem = Some(format!("the repository could not be read: {e:#}"));
                None
            }
        },
    };
    let index = repo
        .as_ref()
        .and_then(|r| ferry_agent::index::load(r.store(), r.key()).ok())
        .map(|(i, _)| i);
    let stored_bytes = repo
        .as_ref()
        .and_then(|r| r.store().list("").ok())
        .map(|l| l.iter().map(|(_, size)| size).sum());
    let location = ctx.repo.clone().unwrap_or_default();
    let view = repo.as_ref().map(|r| crate::forecast::RepoView {
        repo: r,
        index: index.as_ref(),
        location: &location,
        stored_bytes,
    });
    let mut f = crate::forecast::forecast(registry, plan, target, history, view.as_ref(), prices);
    if let Some(p) = problem {
        f.notes.insert(0, crate::redact::redact(&p));
    }
    f
}

/// `NAME=VALUE` pairs from the command line.
pub fn parse_params(raw: &[String]) -> Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                .ok_or_else(|| Error::usage(format!("--param {p}: write NAME=VALUE")))
        })
        .collect()
}

/// A new run's id: its start time and 6 random hex digits.
pub fn new_run_id() -> String {
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%d-%H%M%S"),
        crate::sys::random_hex(3)
    )
}

/// `git rev-parse HEAD` of the checkout holding `path`, with `-dirty` if the
/// file has uncommitted changes.
pub fn git_commit(path: &Path) -> Option<String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let name = path.file_name()?;
    let dirty = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--"])
        .arg(name)
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// A run to create.
#[derive(Debug)]
pub struct NewRun {
    /// The runbook's name in diagnostics and reports.
    pub file: String,
    pub text: String,
    /// The runbook's git commit, if it sat in a checkout.
    pub git_commit: Option<String>,
    pub params: BTreeMap<String, String>,
    /// `--target`: where the steps that name no target run.
    pub target: Option<String>,
    pub mode: Mode,
    pub id: Option<String>,
    pub work_dir: Option<PathBuf>,
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Run => "run",
        Mode::Drill => "drill",
    }
}

/// Validates and plans a runbook (params are checked now, not when the run
/// resumes), then records the run. Nothing is stored for a runbook that
/// cannot be planned.
pub async fn create_run(
    state: &State,
    ctx: &Context,
    registry: &Registry,
    new: NewRun,
) -> Result<RunRow> {
    let plan = plan(
        registry,
        &new.file,
        &new.text,
        &new.params,
        new.target.as_deref(),
    )?;
    let id = new.id.unwrap_or_else(new_run_id);
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || id.starts_with('.')
    {
        return Err(Error::usage(format!(
            "run id {id:?}: use up to 128 letters, digits, `-`, `_` or `.`"
        )));
    }
    if state.run(&id).await?.is_some() {
        return Err(Error::conflict(format!(
            "a run with id {id} exists already"
        )));
    }
    let work_dir = new
        .work_dir
        .unwrap_or_else(|| ctx.home.join("work").join(&id));
    let work_dir = std::path::absolute(&work_dir).unwrap_or(work_dir);
    let run = RunRow {
        id,
        runbook: plan.runbook.name.clone(),
        file: new.file,
        source: new.text,
        params: new.params,
        mode: mode_name(new.mode).into(),
        status: "running".into(),
        git_commit: new.git_commit,
        repo: ctx.repo.clone(),
        work_dir: work_dir.display().to_string(),
        created_ms: exec::now_ms(),
        finished_ms: None,
        owner: None,
        lease_ms: None,
        target: new.target,
    };
    state.create_run(&run).await?;
    record_forecast(state, ctx, registry, &plan, &run).await;
    Ok(run)
}

/// What a forecast of `plan` on `target` (`--target`, else the runbook's
/// first) learns from: the last ten successful runs of the runbook there.
pub async fn history(
    state: &State,
    plan: &ferry_engine::Plan,
    target: Option<&str>,
) -> anyhow::Result<crate::forecast::History> {
    let first = plan
        .runbook
        .targets
        .first()
        .map(|t| t.name.as_str())
        .unwrap_or_default();
    state
        .step_history(&plan.runbook.name, target.unwrap_or(first), first, 10)
        .await
}

/// Stores what planning predicts for a new run, for its report to set
/// against what it measures. A forecast that cannot be made (a broken price
/// table, an unreadable repository) does not stop the run: the report then
/// has no prediction, and the log says why.
async fn record_forecast(
    state: &State,
    ctx: &Context,
    registry: &Registry,
    plan: &ferry_engine::Plan,
    run: &RunRow,
) {
    let target = run.target.clone();
    let history = match history(state, plan, target.as_deref()).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(run = %run.id, "no forecast: the run history could not be read: {e:#}");
            return;
        }
    };
    let prices = match crate::forecast::PriceTable::load(None, &ctx.home) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(run = %run.id, "no forecast: {e}");
            return;
        }
    };
    // Without the repository: reading its index and lists would delay the
    // run's start, and so its RTO (`ferry plan -r` reads them). Restores are
    // predicted from history and the table.
    let mut ctx = ctx.clone();
    ctx.repo = None;
    let (registry, plan) = (registry.clone(), plan.clone());
    let made = tokio::task::spawn_blocking(move || {
        let mut f = forecast(&ctx, &registry, &plan, target.as_deref(), &history, &prices);
        f.notes.retain(|n| !n.starts_with("no repository given"));
        f.notes.push(
            "made when the run was created, without reading the repository (restores from history and the table)"
                .into(),
        );
        f
    })
    .await;
    let text = match made.map(|f| serde_json::to_string(&f)) {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::warn!(run = %run.id, "no forecast: {e}");
            return;
        }
        Err(e) => {
            tracing::warn!(run = %run.id, "no forecast: planning stopped: {e}");
            return;
        }
    };
    if let Err(e) = state.set_forecast(&run.id, &text).await {
        tracing::warn!(run = %run.id, "the forecast could not be stored: {e:#}");
    }
}

/// Whether a live process is driving the run.
pub fn is_driven(run: &RunRow) -> bool {
    run.owner
        .as_deref()
        .is_some_and(|o| !exec::owner_is_dead(o))
        && run.lease_ms.is_some_and(|l| l > exec::now_ms())
}

/// Unfinished runs nobody drives (their process died or its lease ran out).
pub async fn orphans(state: &State) -> Result<Vec<RunRow>> {
    Ok(state
        .unfinished()
        .await?
        .into_iter()
        .filter(|r| !is_driven(r))
        .collect())
}

/// What another process may ask of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Approve { step: String },
    Cancel,
    Rollback,
}

/// Queues a request for the process that drives the run, after checking it
/// fits the run's state, and records it in the audit log as done `by`. Returns the run as it is now; the caller drives it
/// if [`is_driven`] says nobody does.
pub async fn request(state: &State, id: &str, req: Request, by: &str) -> Result<RunRow> {
    let run = state.find_run(id).await?;
    let by = by.to_owned();
    let cmd = match req {
        Request::Approve { step } => {
            if run.status != "running" {
                return Err(Error::conflict(format!(
                    "run {} is {}; there is nothing to approve",
                    run.id, run.status
                )));
            }
            let log = state.events(&run.id).await?;
            let engine = exec::rebuild(&run, &log)?;
            let Some(node) = engine.node(&step) else {
                return Err(Error::not_found(format!(
                    "run {} has no step `{step}`",
                    run.id
                )));
            };
            if *engine.state(node) != StepState::Waiting {
                return Err(Error::conflict(format!(
                    "step `{step}` of run {} is not waiting for approval",
                    run.id
                )));
            }
            Command::Approve { step, by }
        }
        Request::Cancel => {
            if run.status != "running" {
                return Err(Error::conflict(format!(
                    "run {} already {}",
                    run.id, run.status
                )));
            }
            Command::Cancel { by }
        }
        Request::Rollback => {
            if run.status == "rolled_back" {
                return Err(Error::conflict(format!(
                    "run {} is already rolled back",
                    run.id
                )));
            }
            if run.status != "running" {
                state.reopen(&run.id).await?;
            }
            Command::Rollback { by }
        }
    };
    let (action, detail) = match &cmd {
        Command::Approve { step, .. } => ("run.approve", step.clone()),
        Command::Cancel { .. } => ("run.cancel", String::new()),
        Command::Rollback { .. } => ("run.rollback", String::new()),
    };
    state
        .push_command(&run.id, &new_run_id(), exec::now_ms(), &cmd)
        .await?;
    crate::auth::audit(state, &by_name(&cmd), action, &run.id, &detail).await;
    Ok(state.find_run(&run.id).await?)
}

fn by_name(cmd: &Command) -> String {
    match cmd {
        Command::Approve { by, .. } | Command::Cancel { by } | Command::Rollback { by } => {
            by.clone()
        }
    }
}

/// Claims a run and drives it to its end. A stored run that can no longer
/// be planned (its runbook fails validation under this build, or its log
/// does not replay) is finished as failed with the reason logged: it must not
/// come back at every start of the server.
pub async fn drive(
    state: &State,
    run: RunRow,
    repo: Option<String>,
    password: Option<Password>,
    registry: &Registry,
    out: Output,
) -> Result<(RunRow, RunStatus)> {
    let log = state.events(&run.id).await?;
    if let Err(e) = exec::rebuild(&run, &log) {
        let why = crate::error::anyhow_chain(&e);
        tracing::error!(run = %run.id, "the run cannot be continued and is marked failed: {why}");
        state
            .finish(&run.id, RunStatus::Failed.name(), exec::now_ms())
            .await?;
        return Err(Error::Invalid(Diagnostics(vec![
            ferry_engine::Diagnostic {
                file: run.file.clone(),
                line: 0,
                column: 0,
                message: format!("run {} cannot be continued: {why}", run.id),
                hint: Some("it is marked failed; start a new run".into()),
            },
        ])));
    }
    let runner = Runner::claim(state.clone(), run, repo, password, registry, out).await?;
    Ok(runner.drive().await?)
}

/// A run's report, built from its log.
pub async fn report(state: &State, id: &str) -> Result<Report> {
    let run = state.find_run(id).await?;
    report_of(state, &run).await
}

pub async fn report_of(state: &State, run: &RunRow) -> Result<Report> {
    let log = state.events(&run.id).await?;
    let engine = exec::rebuild(run, &log)?;
    let mut report = crate::report::build(run, &log, &engine);
    // A forecast that no longer reads (an older format) is left out.
    if let Some(f) = state
        .forecast(&run.id)
        .await?
        .and_then(|t| serde_json::from_str::<crate::forecast::Forecast>(&t).ok())
    {
        let finished = report
            .steps
            .iter()
            .filter_map(|s| Some((s.id.clone(), s.end_secs?)))
            .collect();
        report.forecast = Some(crate::forecast::measured(&f, &finished, report.rto_secs));
    }
    Ok(report)
}

/// Whether a finished run counts as a success for the exit code.
pub fn succeeded(status: RunStatus) -> bool {
    matches!(status, RunStatus::Succeeded | RunStatus::RolledBack)
}
