//! `ferry serve`: the HTTP API (axum), with a live event stream (server-sent
//! events) and an OpenAPI description generated from these handlers
//! (utoipa). Binds 127.0.0.1 unless told otherwise; every route but
//! `/api/health` needs the bearer token.

use crate::cli::Global;
use crate::exec::{self, Output, Runner};
use crate::state::{Command, RunRow, State, Stored, Verified};
use anyhow::{Context, Result};
use axum::extract::{Path, Query, Request, State as Ax};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub listen: String,
}

#[derive(Clone)]
struct App {
    state: State,
    g: Arc<GlobalLite>,
    token: Arc<String>,
}

/// What runs started through the API need from the command line.
struct GlobalLite {
    repo: Option<String>,
    password: Option<Arc<Vec<u8>>>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Ferry API", description = "Runs, drills, reports and their live events. Authenticate with `Authorization: Bearer TOKEN` (the token is in FERRY_HOME/api-token, or FERRY_API_TOKEN)."),
    paths(health, list_runs, start_run, get_run, run_events, run_report, approve, cancel, rollback, stream, verified, plan),
    components(schemas(RunRow, Stored, Verified, crate::report::Report, crate::report::StepReport, crate::report::PointReport, crate::report::CriticalStep, StartRun, ApproveBody, PlanBody, ApiError)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        api.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

pub fn openapi_json() -> Result<String> {
    Ok(ApiDoc::openapi().to_pretty_json()?)
}

pub fn print_openapi() -> Result<ExitCode> {
    println!("{}", openapi_json()?);
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct ApiError {
    error: String,
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

fn internal(e: anyhow::Error) -> Response {
    let msg = crate::output::error_chain(&e);
    if e.downcast_ref::<crate::cli::UsageError>().is_some() {
        err(StatusCode::BAD_REQUEST, msg)
    } else {
        err(StatusCode::INTERNAL_SERVER_ERROR, msg)
    }
}

/// The API token: FERRY_API_TOKEN, else FERRY_HOME/api-token (made on first use, mode 0600).
fn token() -> Result<String> {
    if let Ok(t) = std::env::var("FERRY_API_TOKEN") {
        if t.len() >= 16 {
            return Ok(t);
        }
        anyhow::bail!("FERRY_API_TOKEN is too short: use at least 16 characters");
    }
    let path = crate::runs::home().join("api-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if t.len() >= 16 {
            return Ok(t);
        }
        anyhow::bail!(
            "{} holds no usable token (under 16 characters); delete it and a new one is made",
            path.display()
        );
    }
    let mut b = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    let t = hex::encode(b);
    std::fs::create_dir_all(crate::runs::home())?;
    // Written whole to a temporary file, then renamed: never an empty token file.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, t.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(t)
}

async fn auth(Ax(app): Ax<App>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = app.token.as_bytes();
    let ok = given.len() == want.len()
        && given
            .bytes()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !ok {
        return err(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see FERRY_HOME/api-token)",
        );
    }
    next.run(req).await
}

pub fn serve(g: &Global, a: &ServeArgs) -> Result<ExitCode> {
    let password = crate::cli::password_quiet(g)?.map(Arc::new);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let state = crate::runs::open_state(g).await?;
        let app = App { state: state.clone(), g: Arc::new(GlobalLite { repo: g.repo.clone(), password }), token: Arc::new(token()?) };
        // Continue runs whose process died.
        for run in state.unfinished().await? {
            if run.owner.as_deref().is_none_or(exec::owner_is_dead) || run.lease_ms.is_some_and(|l| l < exec::now_ms()) {
                eprintln!("resuming {} {} of {}", run.mode, run.id, run.runbook);
                spawn_run(&app, run);
            }
        }
        let api = Router::new()
            .route("/api/runs", get(list_runs).post(start_run))
            .route("/api/runs/{id}", get(get_run))
            .route("/api/runs/{id}/events", get(run_events))
            .route("/api/runs/{id}/report", get(run_report))
            .route("/api/runs/{id}/approve", post(approve))
            .route("/api/runs/{id}/cancel", post(cancel))
            .route("/api/runs/{id}/rollback", post(rollback))
            .route("/api/runs/{id}/stream", get(stream))
            .route("/api/verified", get(verified))
            .route("/api/plan", post(plan))
            .route("/api/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json().unwrap_or_default()) }))
            .route_layer(axum::middleware::from_fn_with_state(app.clone(), auth))
            .route("/api/health", get(health))
            .with_state(app);
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        if g.json {
            println!("{}", serde_json::json!({"url": format!("http://{addr}"), "token_file": crate::runs::home().join("api-token")}));
        } else {
            eprintln!("ferry serve: http://{addr}/api (state {}; token in {})", state.location, crate::runs::home().join("api-token").display());
        }
        axum::serve(listener, api)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn spawn_run(app: &App, run: RunRow) {
    let app = app.clone();
    tokio::spawn(async move {
        let id = run.id.clone();
        let result = async {
            let runner = Runner::claim(
                app.state.clone(),
                run,
                app.g.repo.clone(),
                app.g.password.clone(),
                Output { lines: false },
            )
            .await?;
            runner.drive().await
        }
        .await;
        if let Err(e) = result {
            tracing::error!(run = %id, "run stopped: {}", crate::output::error_chain(&e));
        }
    });
}

#[utoipa::path(get, path = "/api/health", security(()), responses((status = 200, description = "The server is up")))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"ok": true}))
}

#[utoipa::path(get, path = "/api/runs", responses((status = 200, body = Vec<RunRow>)))]
async fn list_runs(Ax(app): Ax<App>) -> Response {
    match app.state.runs(200).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
struct StartRun {
    /// The runbook's YAML text.
    runbook: String,
    /// A name for it in diagnostics and reports.
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, String>,
    /// `run` or `drill`.
    mode: String,
}

#[utoipa::path(post, path = "/api/runs", request_body = StartRun,
    responses((status = 202, body = RunRow, description = "Started"), (status = 400, body = ApiError, description = "The runbook or params have problems")))]
async fn start_run(Ax(app): Ax<App>, Json(body): Json<StartRun>) -> Response {
    if body.mode != "run" && body.mode != "drill" {
        return err(StatusCode::BAD_REQUEST, "mode must be run or drill");
    }
    let g = Global {
        repo: app.g.repo.clone(),
        password_file: None,
        json: false,
        quiet: true,
        verbose: 0,
        state: None,
    };
    let file = body.file.clone().unwrap_or_else(|| "api.yaml".into());
    let new = crate::runs::NewRun {
        file: &file,
        text: &body.runbook,
        params: body.params,
        mode: &body.mode,
        ..Default::default()
    };
    match crate::runs::create_run(&app.state, &g, new).await {
        Ok(run) => {
            spawn_run(&app, run.clone());
            (StatusCode::ACCEPTED, Json(run)).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn report_of(app: &App, id: &str) -> Result<crate::report::Report> {
    let run = app.state.find_run(id).await?;
    let log = app.state.events(&run.id).await?;
    let engine = exec::rebuild(&run, &log)?;
    Ok(crate::report::build(&run, &log, &engine))
}

#[utoipa::path(get, path = "/api/runs/{id}", params(("id" = String, Path)), responses((status = 200, body = crate::report::Report), (status = 400, body = ApiError)))]
async fn get_run(Ax(app): Ax<App>, Path(id): Path<String>) -> Response {
    match report_of(&app, &id).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

#[utoipa::path(get, path = "/api/runs/{id}/events", params(("id" = String, Path)), responses((status = 200, body = Vec<Stored>)))]
async fn run_events(Ax(app): Ax<App>, Path(id): Path<String>) -> Response {
    match async { app.state.events(&app.state.find_run(&id).await?.id).await }.await {
        Ok(ev) => Json(ev).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ReportQuery {
    /// json (default), html or junit.
    format: Option<String>,
}

#[utoipa::path(get, path = "/api/runs/{id}/report", params(("id" = String, Path), ReportQuery),
    responses((status = 200, description = "The report as JSON, HTML or JUnit XML")))]
async fn run_report(
    Ax(app): Ax<App>,
    Path(id): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Response {
    let r = match report_of(&app, &id).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    match q.format.as_deref() {
        Some("html") => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::report::html(&r),
        )
            .into_response(),
        Some("junit") => (
            [(header::CONTENT_TYPE, "application/xml")],
            crate::report::junit(&r),
        )
            .into_response(),
        None | Some("json") => Json(r).into_response(),
        Some(other) => err(
            StatusCode::BAD_REQUEST,
            format!("format {other}: use json, html or junit"),
        ),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
struct ApproveBody {
    step: String,
    #[serde(default)]
    by: Option<String>,
}

async fn command(app: &App, id: &str, cmd: Command) -> Response {
    let result = async {
        let run = app.state.find_run(id).await?;
        let rollback = matches!(cmd, Command::Rollback { .. });
        if run.status != "running" && !(rollback && run.status != "rolled_back") {
            return Err(
                crate::cli::UsageError(format!("run {} already {}", run.id, run.status)).into(),
            );
        }
        let idle = run.status != "running";
        if idle {
            app.state.reopen(&run.id).await?;
        }
        let cid = exec::owner_id();
        app.state
            .push_command(&run.id, &cid, exec::now_ms(), &cmd)
            .await?;
        let run = app.state.find_run(&run.id).await?;
        let driven = run
            .owner
            .as_deref()
            .is_some_and(|o| !exec::owner_is_dead(o))
            && run.lease_ms.is_some_and(|l| l > exec::now_ms());
        if idle || !driven {
            spawn_run(app, run.clone());
        }
        anyhow::Ok(run)
    }
    .await;
    match result {
        Ok(run) => (StatusCode::ACCEPTED, Json(run)).into_response(),
        Err(e) => internal(e),
    }
}

#[utoipa::path(post, path = "/api/runs/{id}/approve", params(("id" = String, Path)), request_body = ApproveBody, responses((status = 202, body = RunRow)))]
async fn approve(Ax(app): Ax<App>, Path(id): Path<String>, Json(b): Json<ApproveBody>) -> Response {
    let by = b.by.unwrap_or_else(|| "api".into());
    command(&app, &id, Command::Approve { step: b.step, by }).await
}

#[utoipa::path(post, path = "/api/runs/{id}/cancel", params(("id" = String, Path)), responses((status = 202, body = RunRow)))]
async fn cancel(Ax(app): Ax<App>, Path(id): Path<String>) -> Response {
    command(&app, &id, Command::Cancel { by: "api".into() }).await
}

#[utoipa::path(post, path = "/api/runs/{id}/rollback", params(("id" = String, Path)), responses((status = 202, body = RunRow)))]
async fn rollback(Ax(app): Ax<App>, Path(id): Path<String>) -> Response {
    command(&app, &id, Command::Rollback { by: "api".into() }).await
}

/// Every event of the run so far, then each new one as it is written; the
/// stream ends after the run finishes. Event names are the event types.
#[utoipa::path(get, path = "/api/runs/{id}/stream", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", description = "Server-sent events, one per log entry")))]
async fn stream(Ax(app): Ax<App>, Path(id): Path<String>) -> Response {
    let run = match app.state.find_run(&id).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let mut seq = -1;
        loop {
            let Ok(batch) = app.state.events_after(&run.id, seq).await else {
                break;
            };
            let mut finished = false;
            for s in batch {
                seq = s.seq;
                let kind = serde_json::to_value(&s.event)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                finished |= kind == "run_finished";
                let data = serde_json::to_string(&s).unwrap_or_default();
                if tx
                    .send(Ok(SseEvent::default()
                        .event(kind)
                        .id(s.seq.to_string())
                        .data(data)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if finished {
                let still = app
                    .state
                    .run(&run.id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.status == "running");
                if !still {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[utoipa::path(get, path = "/api/verified", responses((status = 200, body = Vec<Verified>, description = "Recovery points proved by drills")))]
async fn verified(Ax(app): Ax<App>) -> Response {
    match app.state.verified().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
struct PlanBody {
    runbook: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, String>,
}

#[utoipa::path(post, path = "/api/plan", request_body = PlanBody,
    responses((status = 200, description = "The waves (step ids)"), (status = 400, description = "Diagnostics, each with file, line and column")))]
async fn plan(Json(b): Json<PlanBody>) -> Response {
    let file = b.file.unwrap_or_else(|| "api.yaml".into());
    let rb =
        match ferry_engine::parse(&file, &b.runbook) {
            Ok(rb) => rb,
            Err(d) => return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": "the runbook has problems", "diagnostics": d.0})),
            )
                .into_response(),
        };
    match ferry_engine::plan(rb, &b.params) {
        Ok(p) => {
            let waves: Vec<Vec<&str>> = p
                .waves
                .iter()
                .map(|w| w.iter().map(|&n| p.nodes[n].id.as_str()).collect())
                .collect();
            Json(serde_json::json!({"runbook": p.runbook.name, "waves": waves})).into_response()
        }
        Err(e) => err(StatusCode::BAD_REQUEST, e),
    }
}
