//! Schedules over HTTP (`/api/schedules`), and what a firing does: a drill
//! starts like `POST /api/runs` with the runbook's `path` (audited as
//! `schedule:NAME`), a check runs against the server's repository and lands
//! where `ferry check` records its outcome, a backup (admins only) reads the
//! server machine's disks into its repository. `spawn_scheduler` fires what is
//! due once a second; tests call [`fire_due`] with a time of their own.

use super::{ApiResult, AppState, Body, Runbook};
use crate::auth::{Identity, Role};
use crate::error::Error;
use crate::exec::now_ms;
use crate::schedule::{self, Job, Schedule};
use axum::Json;
use axum::extract::{Path, State as Ax};
use axum::http::StatusCode;
use axum::{Extension, response::IntoResponse, response::Response};
use serde::Deserialize;
use std::time::Duration;

/// A schedule to add.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSchedule {
    /// 1 to 64 letters, digits, `.`, `_` and `-`.
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week), in UTC.
    pub cron: String,
    pub job: Job,
}

#[utoipa::path(get, path = "/api/schedules", responses(
    (status = 200, body = Vec<Schedule>, description = "Every schedule, by name, with when it fires next and what its last firing started"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn list(Ax(app): Ax<AppState>) -> ApiResult<Json<Vec<Schedule>>> {
    Ok(Json(schedule::list(&app.state).await?))
}

#[utoipa::path(post, path = "/api/schedules", request_body = NewSchedule, responses(
    (status = 201, body = Schedule, description = "Added; it fires first at `next_ms`"),
    (status = 400, body = crate::api::ApiError, description = "A bad name, cron expression or job"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 403, body = crate::api::ApiError, description = "Not an operator or admin (an admin for a backup), or a session request without its CSRF token"),
    (status = 409, body = crate::api::ApiError, description = "A schedule of that name exists"),
    (status = 415, body = crate::api::ApiError, description = "The body is not application/json"),
    (status = 422, body = crate::api::ApiError, description = "The body lacks a field"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn add(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Body(b): Body<NewSchedule>,
) -> ApiResult<(StatusCode, Json<Schedule>)> {
    who.require(if b.job.admin_only() {
        Role::Admin
    } else {
        Role::Operator
    })?;
    let s = schedule::add(&app.state, &b.name, &b.cron, b.job, &who.name, now_ms()).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[utoipa::path(delete, path = "/api/schedules/{name}", params(("name" = String, Path, description = "The schedule's name")), responses(
    (status = 204, description = "Removed"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 403, body = crate::api::ApiError, description = "Not an operator or admin, or a session request without its CSRF token"),
    (status = 404, body = crate::api::ApiError, description = "No such schedule"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn remove(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    who.require(Role::Operator)?;
    schedule::remove(&app.state, &name, &who.name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Fires every schedule due at `now_ms` and returns each one's name with
/// what it started (`run ID`, `check ID`) or why it could not. A check runs
/// in the background; its outcome is recorded when it ends.
pub async fn fire_due(app: &AppState, now_ms: i64) -> crate::error::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for s in schedule::claim_due(&app.state, now_ms).await? {
        let actor = format!("schedule:{}", s.name);
        // A firing does not pile onto the last one while it still runs (a
        // drill every 10 minutes that takes 20, a check of a large
        // repository every hour).
        if let Some(busy) = still_running(app, &s).await? {
            tracing::info!(schedule = %s.name, "{busy}");
            app.state.schedule_outcome(&s.name, &busy).await?;
            out.push((s.name, busy));
            continue;
        }
        let started = match &s.job {
            Job::Drill { path, target } => super::launch(
                app,
                &actor,
                Runbook::Dir(path.clone()),
                Default::default(),
                target.clone(),
                ferry_engine::Mode::Drill,
            )
            .await
            .map(|run| format!("run {}", run.id)),
            Job::Check { read_data } => start_check(app, &s.name, *read_data),
            Job::Backup { source, disks } => start_backup(app, &s.name, source, disks),
        };
        let outcome = started.unwrap_or_else(|e| {
            tracing::warn!(schedule = %s.name, "not started: {e}");
            format!("not started: {e}")
        });
        app.state.schedule_outcome(&s.name, &outcome).await?;
        out.push((s.name, outcome));
    }
    Ok(out)
}

/// Why this firing of `s` is skipped, if the last one still runs: its drill
/// (found by the run id its outcome names, in the state, so it holds across
/// restarts) or its check (in this server's memory: a check dies with it).
async fn still_running(app: &AppState, s: &Schedule) -> crate::error::Result<Option<String>> {
    if let Job::Check { .. } | Job::Backup { .. } = s.job {
        let busy = app
            .busy_jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&s.name);
        let what = if let Job::Check { .. } = s.job {
            "check"
        } else {
            "backup"
        };
        return Ok(
            busy.then(|| format!("skipped: the last {what} of this schedule is still running"))
        );
    }
    let Some(run) = s.last_outcome.as_deref().and_then(last_run) else {
        return Ok(None);
    };
    let running = app
        .state
        .run(run)
        .await?
        .is_some_and(|r| r.status == "running");
    Ok(running.then(|| format!("skipped: run {run} of this schedule is still running")))
}

/// The run a schedule's outcome names (`run ID`, or a skip because of it).
fn last_run(outcome: &str) -> Option<&str> {
    let rest = outcome
        .strip_prefix("run ")
        .or_else(|| outcome.strip_prefix("skipped: run "))?;
    rest.split_whitespace().next()
}

/// Runs `work` on the server's repository on a blocking thread, the
/// schedule marked busy meanwhile; its outcome (or failure, prefixed with
/// `what ID`) lands on the schedule.
fn start_job(
    app: &AppState,
    name: &str,
    what: &'static str,
    work: impl FnOnce(&ferry_agent::Repository, &str) -> anyhow::Result<String> + Send + 'static,
) -> ApiResult<String> {
    if app.repo.is_none() {
        return Err(Error::Unavailable(
            "this server has no repository: start `ferry serve` with -r/--repo and its password"
                .into(),
        ));
    }
    let id = crate::control::new_run_id();
    let (app, name, job_id) = (app.clone(), name.to_owned(), id.clone());
    app.busy_jobs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(name.clone());
    tokio::spawn(async move {
        // Not busy any more when this task ends, however it ends.
        let _busy = Busy(app.busy_jobs.clone(), name.clone());
        let ctx = app.context();
        let for_work = job_id.clone();
        let done = tokio::task::spawn_blocking(move || {
            let repo = ctx.open_repo(false)?;
            let r = work(&repo, &for_work);
            // The store owns a runtime: dropped here, off the async workers.
            drop(repo);
            r
        })
        .await;
        let outcome = match done {
            Ok(Ok(said)) => format!("{what} {job_id}: {said}"),
            Ok(Err(e)) => format!(
                "{what} {job_id} failed: {}",
                crate::error::chain(e.as_ref())
            ),
            Err(e) => format!("{what} {job_id} stopped: {e}"),
        };
        if let Err(e) = app.state.schedule_outcome(&name, &outcome).await {
            tracing::warn!(schedule = %name, "cannot record the outcome: {e:#}");
        }
    });
    Ok(format!("{what} {id} started"))
}

/// Checks the server's repository in the background; records the check
/// where `ferry check` does, and its outcome on the schedule.
fn start_check(app: &AppState, name: &str, read_data: bool) -> ApiResult<String> {
    let (state, location) = (app.state.clone(), app.repo.clone().unwrap_or_default());
    let rt = tokio::runtime::Handle::current();
    start_job(app, name, "check", move |repo, id| {
        let progress = ferry_agent::progress::Progress::default();
        let r = ferry_agent::check::check(
            repo,
            ferry_agent::check::CheckOptions { read_data },
            &progress,
        )?;
        let row = crate::inventory::check_row(id, &location, &r);
        if let Err(e) = rt.block_on(state.record_check(&row)) {
            tracing::warn!("cannot record check {}: {e:#}", row.id);
        }
        Ok(if r.ok { "no damage" } else { "damage found" }.to_owned())
    })
}

/// Backs up `disks` as `source` into the server's repository in the background.
fn start_backup(app: &AppState, name: &str, source: &str, disks: &[String]) -> ApiResult<String> {
    let (source, disks) = (source.to_owned(), disks.to_vec());
    start_job(app, name, "backup", move |repo, _| {
        let s = crate::backups::backup(repo, &source, &disks)?;
        Ok(format!(
            "point {} (read {} bytes, stored {})",
            s.point, s.bytes_read, s.stored_bytes
        ))
    })
}

/// Takes a schedule off the busy list when dropped.
struct Busy(
    std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    String,
);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.1);
    }
}

/// Fires due schedules once a second until the server stops.
pub fn spawn_scheduler(app: &AppState) {
    let app = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = fire_due(&app, now_ms()).await {
                tracing::warn!("schedules: {e}");
            }
        }
    });
}
