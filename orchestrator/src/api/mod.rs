//! The HTTP API (axum): runs, drills, reports, approvals and their live
//! events (server-sent events), described by an OpenAPI document generated
//! from these handlers (utoipa). [`router`] is the whole API, for
//! `ferry serve` and for tests (`router(state).oneshot(request)`); the web
//! console merges its own routes into it.
//!
//! Contract: unknown ids are 404, requests that do not fit a run's state
//! 409, malformed bodies 400 (unreadable JSON) or 422 (well-formed but
//! invalid, including runbooks with problems), oversized ones 413; every
//! status and body is in the OpenAPI document; 5xx bodies say only that
//! something failed and where to look (the server's log), never internals.

pub mod agents;
pub mod dto;
pub mod hooks;
pub mod inventory;
pub mod schedules;
pub mod users;

use crate::auth::{Identity, Role};
use crate::context::Password;
use crate::control::{self, NewRun, Request};
use crate::error::Error;
use crate::exec::Output;
use crate::state::State;
use crate::targets::Registry;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request as HttpRequest, State as Ax};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use dto::{ApiError, Approve, LogEntry, PlanRequest, PlanResponse, Run, StartRun, VerifiedPoint};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use utoipa::OpenApi;

/// What the API's handlers share.
#[derive(Clone)]
pub struct AppState {
    pub state: State,
    /// The repository runs read recovery points from (the server's `-r`).
    pub repo: Option<String>,
    pub password: Option<Password>,
    /// The server's own bearer token (an admin), beside users' tokens and
    /// sessions.
    pub token: Arc<String>,
    /// Failed logins, per name and per client address.
    pub limiter: Arc<crate::auth::LoginLimiter>,
    pub registry: Arc<Registry>,
    /// Ferry's home (work directories of runs started here).
    pub home: std::path::PathBuf,
    /// The runbook directory (`ferry serve --runbooks`), if any.
    pub runbooks: Option<std::path::PathBuf>,
    /// Sources, points and repository health, cached between requests.
    pub inventory: Arc<crate::inventory::Inventory>,
    pub metrics: Arc<inventory::Metrics>,
    /// Finished drills' measurements by run id (a finished drill's report
    /// does not change), so the history does not replay every log each time.
    drills: Arc<tokio::sync::Mutex<std::collections::HashMap<String, dto::Drill>>>,
    /// What Alertmanager's notifications start (`ferry serve --alert-routes`).
    pub alert_routes: Option<Arc<crate::alerts::Routes>>,
    /// Schedules whose check or backup is running in this server.
    busy_jobs: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// The agents' consistency groups: open rounds and recent ones.
    pub groups: Arc<crate::groups::Groups>,
}

impl AppState {
    /// A server's state: `token` is its own (admin) token.
    pub fn new(
        state: State,
        repo: Option<String>,
        password: Option<Password>,
        token: String,
        home: std::path::PathBuf,
        runbooks: Option<std::path::PathBuf>,
    ) -> AppState {
        let ctx = crate::context::Context::for_server(
            repo.clone(),
            password.clone(),
            Some(&state.location),
            home.clone(),
        );
        AppState {
            state,
            repo,
            password,
            token: Arc::new(token),
            limiter: Arc::new(crate::auth::LoginLimiter::default()),
            registry: Arc::new(Registry::builtin()),
            home,
            runbooks,
            inventory: Arc::new(crate::inventory::Inventory::new(ctx)),
            metrics: Arc::default(),
            drills: Arc::default(),
            alert_routes: None,
            busy_jobs: Arc::default(),
            groups: Arc::default(),
        }
    }

    /// With the routes Alertmanager's notifications follow.
    #[must_use]
    pub fn with_alert_routes(mut self, routes: crate::alerts::Routes) -> AppState {
        self.alert_routes = Some(Arc::new(routes));
        self
    }
}

impl AppState {
    /// What control needs to act for a request: the server's repository and
    /// password (never a prompt).
    fn context(&self) -> crate::context::Context {
        crate::context::Context::for_server(
            self.repo.clone(),
            self.password.clone(),
            Some(&self.state.location),
            self.home.clone(),
        )
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("state", &self.state.location)
            .finish_non_exhaustive()
    }
}

/// The most a request body may be: a 1 MiB runbook, JSON-escaped.
pub const MAX_BODY_BYTES: usize = 4 << 20;

#[derive(OpenApi)]
#[openapi(
    info(title = "Ferry API", description = "Runs, drills, reports and their live events; users, tokens and the audit log. Authenticate with `Authorization: Bearer TOKEN` (the server's own token, an admin, is in FERRY_HOME/api-token or FERRY_API_TOKEN; users' tokens come from `ferry token create` or POST /api/tokens), or with the session cookie POST /api/login sets, sending the CSRF token it returns in `X-CSRF-Token` on every request but GET. Roles: viewers read; operators also start, approve, cancel and roll back runs; admins also manage users."),
    paths(health, drills, inventory::list_sources, inventory::source_points, inventory::repository, inventory::list_runbooks, inventory::get_runbook, inventory::metrics, list_runs, start_run, get_run, run_events, run_report, approve, cancel, rollback, stream, verified, plan, users::login, users::logout, users::me, users::list_users, users::add_user, users::remove_user, users::set_role, users::set_password, users::list_tokens, users::create_token, users::revoke_token, users::audit_log, schedules::list, schedules::add, schedules::remove, hooks::alertmanager, agents::create_token, agents::list, agents::revoke, agents::set_policy, agents::enroll, agents::agent_policy, agents::agent_status, agents::agent_cut, agents::groups),
    components(schemas(dto::Drill, crate::inventory::Source, crate::inventory::Point, crate::inventory::PointDisk, crate::inventory::VerifiedBy, crate::inventory::Protection, crate::inventory::RpoStatus, crate::inventory::Repository, crate::inventory::Check, crate::inventory::Coverage, dto::RunbookList, dto::RunbookSummary, dto::RunbookDetail, dto::RunbookParam, dto::GraphStep, Run, dto::RunMode, dto::RunStatus, LogEntry, VerifiedPoint, crate::report::Report, crate::report::StepReport, crate::report::PointReport, crate::report::CriticalStep, StartRun, Approve, PlanRequest, PlanResponse, ApiError, dto::Diagnostic, dto::Health, ReportFormat, Role, users::Login, users::Me, users::User, users::NewUser, users::SetRole, users::SetPassword, users::Token, users::NewToken, users::CreatedToken, crate::state::users::AuditEntry, crate::schedule::Schedule, crate::schedule::Job, schedules::NewSchedule, crate::alerts::Notification, crate::alerts::Outcome, crate::alerts::Action, crate::fleet::Agent, crate::fleet::PolicyTemplate, crate::fleet::NewEnrollToken, agents::NewAgentToken, crate::groups::GroupView, crate::groups::Closed)),
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
        // An agent's own credential (`fagent_ID_SECRET`), good only on /api/agent/*.
        components.add_security_scheme(
            "agent",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        api.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// The OpenAPI document of the API, as served and as kept in `docs/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"the OpenAPI document cannot be built: {e}\"}}"))
}

/// The whole API.
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/api/runs", get(list_runs).post(start_run))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/events", get(run_events))
        .route("/api/runs/{id}/report", get(run_report))
        .route("/api/runs/{id}/approve", post(approve))
        .route("/api/runs/{id}/cancel", post(cancel))
        .route("/api/runs/{id}/rollback", post(rollback))
        .route("/api/runs/{id}/stream", get(stream))
        .route("/api/verified", get(verified))
        .route("/api/drills", get(drills))
        .route("/api/sources", get(inventory::list_sources))
        .route(
            "/api/sources/{source}/points",
            get(inventory::source_points),
        )
        .route("/api/repository", get(inventory::repository))
        .route("/api/runbooks", get(inventory::list_runbooks))
        .route("/api/runbooks/{file}", get(inventory::get_runbook))
        .route("/metrics", get(inventory::metrics))
        .route("/api/plan", post(plan))
        .route("/api/logout", post(users::logout))
        .route("/api/me", get(users::me))
        .route("/api/users", get(users::list_users).post(users::add_user))
        .route(
            "/api/users/{name}",
            axum::routing::delete(users::remove_user),
        )
        .route(
            "/api/users/{name}/role",
            axum::routing::put(users::set_role),
        )
        .route(
            "/api/users/{name}/password",
            axum::routing::put(users::set_password),
        )
        .route(
            "/api/tokens",
            get(users::list_tokens).post(users::create_token),
        )
        .route(
            "/api/tokens/{id}",
            axum::routing::delete(users::revoke_token),
        )
        .route("/api/audit", get(users::audit_log))
        .route("/api/hooks/alertmanager", post(hooks::alertmanager))
        .route("/api/schedules", get(schedules::list).post(schedules::add))
        .route(
            "/api/schedules/{name}",
            axum::routing::delete(schedules::remove),
        )
        .route("/api/agent-tokens", post(agents::create_token))
        .route("/api/agents", get(agents::list))
        .route("/api/groups", get(agents::groups))
        .route("/api/agents/{id}", axum::routing::delete(agents::revoke))
        .route(
            "/api/agents/{id}/policy",
            axum::routing::put(agents::set_policy),
        )
        .route(
            "/api/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            users::authenticate,
        ))
        .route("/api/health", get(health))
        .route("/api/login", post(users::login))
        // Agents authenticate with their own credentials, not as users.
        .route("/api/agents/enroll", post(agents::enroll))
        .route("/api/agent/policy", get(agents::agent_policy))
        .route("/api/agent/status", post(agents::agent_status))
        .route("/api/agent/cut", post(agents::agent_cut))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            inventory::track,
        ))
        .fallback(|| async {
            error_response(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /api/openapi.json",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

fn error_response(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: msg.into(),
            diagnostics: None,
        }),
    )
        .into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() && !matches!(self, Error::Unavailable(_)) {
            // The details go to the server's log, not to the client.
            let reference = crate::sys::random_hex(4);
            tracing::error!(
                reference,
                "API request failed: {}",
                crate::error::chain(&self)
            );
            return error_response(
                status,
                format!("the server could not do this (reference {reference}); its log says why"),
            );
        }
        let diagnostics = match &self {
            Error::Invalid(d) => Some(d.0.iter().map(dto::Diagnostic::from).collect()),
            _ => None,
        };
        let error = match &self {
            Error::Invalid(d) => format!("the runbook has problems:\n{d}"),
            other => other.to_string(),
        };
        let mut resp = (status, Json(ApiError { error, diagnostics })).into_response();
        if let Error::TooMany(_, secs) = &self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(*secs));
        }
        resp
    }
}

type ApiResult<T> = Result<T, Error>;

/// A JSON body whose rejection (unreadable, wrong type, too large) is an
/// [`ApiError`] like every other error.
struct Body<T>(T);

impl<S, T> FromRequest<S> for Body<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: HttpRequest, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(error_response(rejection.status(), rejection.body_text())),
        }
    }
}

/// The API token: FERRY_API_TOKEN, else HOME/api-token (made on first use,
/// mode 0600). A token under 16 characters, or of one repeated character, is
/// refused; a token file others can read is warned about.
pub fn load_or_create_token(home: &std::path::Path) -> anyhow::Result<String> {
    fn weak(t: &str) -> bool {
        t.len() < 16 || t.chars().all(|c| t.starts_with(c))
    }
    if let Ok(t) = std::env::var("FERRY_API_TOKEN") {
        if weak(&t) {
            anyhow::bail!(
                "FERRY_API_TOKEN is too weak: use at least 16 random characters (e.g. `openssl rand -hex 24`)"
            );
        }
        return Ok(t);
    }
    let path = home.join("api-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(&path)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "{} can be read by other users (mode {:o}); run `chmod 600 {}`",
                path.display(),
                m.permissions().mode() & 0o777,
                path.display()
            );
            eprintln!(
                "warning: {} can be read by other users; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        let t = t.trim().to_owned();
        if weak(&t) {
            anyhow::bail!(
                "{} holds a weak token (under 16 characters, or one repeated); delete it and a new one is made",
                path.display()
            );
        }
        return Ok(t);
    }
    let t = hex::encode(crate::sys::random_bytes(24)?);
    crate::fsutil::create_private_dir(home)?;
    crate::fsutil::write_private(&path, t.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    Ok(t)
}

/// In the extensions of a request that came over `ferry serve`'s own TLS.
#[derive(Clone, Copy, Debug)]
pub struct OverTls;

/// Drives a run in the background until it ends (or this server stops).
pub fn spawn_run(app: &AppState, run: crate::state::RunRow) {
    let app = app.clone();
    tokio::spawn(async move {
        let id = run.id.clone();
        let result = control::drive(
            &app.state,
            run,
            app.repo.clone(),
            app.password.clone(),
            &app.registry,
            Output { lines: false },
        )
        .await;
        if let Err(e) = result {
            tracing::error!(run = %id, "run stopped: {}", crate::error::chain(&e));
        }
    });
}

#[utoipa::path(get, path = "/api/health", security(()), responses((status = 200, body = dto::Health, description = "The server is up")))]
async fn health() -> Json<dto::Health> {
    Json(dto::Health { ok: true })
}

#[utoipa::path(get, path = "/api/runs", responses(
    (status = 200, body = Vec<Run>, description = "The newest 200 runs, newest first"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn list_runs(Ax(app): Ax<AppState>) -> ApiResult<Json<Vec<Run>>> {
    let runs = app.state.runs(200).await?;
    Ok(Json(runs.into_iter().map(Run::from).collect()))
}

#[utoipa::path(post, path = "/api/runs", request_body = StartRun, responses(
    (status = 202, body = Run, description = "Started"),
    (status = 400, body = ApiError, description = "The body is not JSON, or a param is wrong"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an operator or admin, or a session request without its CSRF token"),
    (status = 404, body = ApiError, description = "`path` names no runbook of the runbook directory"),
    (status = 409, body = ApiError, description = "A run with that id exists"),
    (status = 413, body = ApiError, description = "The runbook is too large"),
    (status = 415, body = ApiError, description = "The body is not application/json"),
    (status = 422, body = ApiError, description = "The runbook has problems (each with its line and column), or the body gives neither or both of `runbook` and `path`"),
    (status = 500, body = ApiError, description = "The server failed; its log says why"),
    (status = 503, body = ApiError, description = "`path` was given but the server has no runbook directory")))]
async fn start_run(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Body(body): Body<StartRun>,
) -> ApiResult<(StatusCode, Json<Run>)> {
    who.require(Role::Operator)?;
    let runbook = match (body.runbook, body.path) {
        (Some(text), None) => Runbook::Text {
            file: body.file.unwrap_or_else(|| "api.yaml".into()),
            text,
        },
        (None, Some(path)) => Runbook::Dir(path),
        _ => {
            return Err(Error::Invalid(ferry_engine::Diagnostics(vec![
                ferry_engine::Diagnostic {
                    file: "request".into(),
                    line: 1,
                    column: 1,
                    message: "give the runbook's text in `runbook` or a runbook of the server's directory in `path`, not both".into(),
                    hint: None,
                },
            ])));
        }
    };
    let run = launch(
        &app,
        &who.name,
        runbook,
        body.params,
        body.target,
        body.mode.into(),
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(Run::from(run))))
}

/// Where a new run's runbook comes from.
pub(crate) enum Runbook {
    /// Sent with the request.
    Text { file: String, text: String },
    /// A file of the server's runbook directory (its git commit is recorded).
    Dir(String),
    /// A file of the directory already read (`read_runbook`).
    Read {
        file: String,
        text: String,
        commit: Option<String>,
    },
}

/// Reads a runbook of the server's directory: its file name, its text and
/// the checkout's commit.
pub(crate) async fn read_runbook(
    app: &AppState,
    path: String,
) -> ApiResult<(String, String, Option<String>)> {
    let dir = inventory::runbook_dir(app)?;
    let registry = app.registry.clone();
    let (e, commit) = tokio::task::spawn_blocking(move || {
        crate::inventory::runbooks::read(&registry, &dir, &path)
    })
    .await
    .map_err(|e| Error::Internal(anyhow::anyhow!("reading a runbook stopped: {e}")))??;
    Ok((e.file, e.text, commit))
}

/// Creates a run, audits it as `actor`'s `run.start`, and drives it in the
/// background: what `POST /api/runs` and a firing schedule do.
pub(crate) async fn launch(
    app: &AppState,
    actor: &str,
    runbook: Runbook,
    params: std::collections::BTreeMap<String, String>,
    target: Option<String>,
    mode: ferry_engine::Mode,
) -> ApiResult<crate::state::RunRow> {
    let ctx = app.context();
    let (file, text, git_commit) = match runbook {
        Runbook::Text { file, text } => (file, text, None),
        Runbook::Dir(path) => read_runbook(app, path).await?,
        Runbook::Read { file, text, commit } => (file, text, commit),
    };
    let new = NewRun {
        file,
        text,
        git_commit,
        params,
        target,
        mode,
        id: None,
        work_dir: None,
    };
    // Validation and planning are CPU work bounded by the engine's limits:
    // off the async workers.
    let registry = app.registry.clone();
    let state = app.state.clone();
    let run = tokio::task::spawn_blocking(move || {
        tokio::runtime::Handle::current()
            .block_on(control::create_run(&state, &ctx, &registry, new))
    })
    .await
    .map_err(|e| Error::Internal(anyhow::anyhow!("run creation stopped: {e}")))??;
    crate::auth::audit(
        &app.state,
        actor,
        "run.start",
        &run.id,
        &format!("{} of {}", run.mode, run.runbook),
    )
    .await;
    spawn_run(app, run.clone());
    Ok(run)
}

#[utoipa::path(get, path = "/api/runs/{id}", params(("id" = String, Path, description = "A run id or a unique prefix")), responses(
    (status = 200, body = crate::report::Report, description = "The run's report so far"),
    (status = 400, body = ApiError, description = "The id matches several runs"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 404, body = ApiError, description = "No such run"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn get_run(
    Ax(app): Ax<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::report::Report>> {
    Ok(Json(control::report(&app.state, &id).await?))
}

#[utoipa::path(get, path = "/api/runs/{id}/events", params(("id" = String, Path, description = "A run id or a unique prefix")), responses(
    (status = 200, body = Vec<LogEntry>, description = "The run's log"),
    (status = 400, body = ApiError, description = "The id matches several runs"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 404, body = ApiError, description = "No such run"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn run_events(
    Ax(app): Ax<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<LogEntry>>> {
    let run = app.state.find_run(&id).await?;
    let log = app.state.events(&run.id).await?;
    Ok(Json(log.into_iter().map(LogEntry::from).collect()))
}

/// The format of a report.
#[derive(Clone, Copy, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum ReportFormat {
    #[default]
    Json,
    Html,
    Junit,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ReportQuery {
    /// json (default), html or junit.
    #[serde(default)]
    format: Option<ReportFormat>,
}

#[utoipa::path(get, path = "/api/runs/{id}/report", params(("id" = String, Path, description = "A run id or a unique prefix"), ReportQuery), responses(
    (status = 200, description = "The report as JSON, HTML or JUnit XML", content(
        (crate::report::Report = "application/json"),
        (String = "text/html"),
        (String = "application/xml"))),
    (status = 400, body = ApiError, description = "An unknown format, or an id that matches several runs"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 404, body = ApiError, description = "No such run"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn run_report(
    Ax(app): Ax<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query
        .map_err(|e| Error::usage(format!("{}; format is json, html or junit", e.body_text())))?;
    let r = control::report(&app.state, &id).await?;
    Ok(match q.format.unwrap_or_default() {
        ReportFormat::Html => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::report::html(&r),
        )
            .into_response(),
        ReportFormat::Junit => (
            [(header::CONTENT_TYPE, "application/xml")],
            crate::report::junit(&r),
        )
            .into_response(),
        ReportFormat::Json => Json(r).into_response(),
    })
}

/// Queues a request for the run, as `who` (an operator), and drives it here
/// if nobody does.
async fn command(
    app: &AppState,
    who: &Identity,
    id: &str,
    req: Request,
) -> ApiResult<(StatusCode, Json<Run>)> {
    who.require(Role::Operator)?;
    let run = control::request(&app.state, id, req, &who.name).await?;
    if !control::is_driven(&run) {
        spawn_run(app, run.clone());
    }
    Ok((StatusCode::ACCEPTED, Json(Run::from(run))))
}

#[utoipa::path(post, path = "/api/runs/{id}/approve", params(("id" = String, Path, description = "A run id or a unique prefix")), request_body = Approve, responses(
    (status = 202, body = Run, description = "Queued for the process driving the run"),
    (status = 400, body = ApiError, description = "The body is not JSON, or the id matches several runs"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an operator or admin, or a session request without its CSRF token"),
    (status = 404, body = ApiError, description = "No such run, or no such step in it"),
    (status = 409, body = ApiError, description = "The run is finished, or the step is not waiting for approval"),
    (status = 415, body = ApiError, description = "The body is not application/json"),
    (status = 422, body = ApiError, description = "The body lacks `step`"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn approve(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<String>,
    Body(b): Body<Approve>,
) -> ApiResult<(StatusCode, Json<Run>)> {
    command(&app, &who, &id, Request::Approve { step: b.step }).await
}

#[utoipa::path(post, path = "/api/runs/{id}/cancel", params(("id" = String, Path, description = "A run id or a unique prefix")), responses(
    (status = 202, body = Run, description = "Queued for the process driving the run"),
    (status = 400, body = ApiError, description = "The id matches several runs"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an operator or admin, or a session request without its CSRF token"),
    (status = 404, body = ApiError, description = "No such run"),
    (status = 409, body = ApiError, description = "The run is finished"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn cancel(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Run>)> {
    command(&app, &who, &id, Request::Cancel).await
}

#[utoipa::path(post, path = "/api/runs/{id}/rollback", params(("id" = String, Path, description = "A run id or a unique prefix")), responses(
    (status = 202, body = Run, description = "Queued for the process driving the run"),
    (status = 400, body = ApiError, description = "The id matches several runs"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an operator or admin, or a session request without its CSRF token"),
    (status = 404, body = ApiError, description = "No such run"),
    (status = 409, body = ApiError, description = "The run is already rolled back"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn rollback(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Run>)> {
    command(&app, &who, &id, Request::Rollback).await
}

/// Every event of the run so far, then each new one as it is written; the
/// stream ends after the run finishes, and stops polling as soon as the
/// client goes away. Event names are the event types, event ids their
/// sequence numbers: a client that reconnects with `Last-Event-ID` (as a
/// browser's `EventSource` does) gets only the events after it.
#[utoipa::path(get, path = "/api/runs/{id}/stream", params(("id" = String, Path, description = "A run id or a unique prefix"), ("Last-Event-ID" = Option<i64>, Header, description = "Only the events after this sequence number")), responses(
    (status = 200, content_type = "text/event-stream", body = String, description = "Server-sent events, one per log entry"),
    (status = 400, body = ApiError, description = "The id matches several runs"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 404, body = ApiError, description = "No such run"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn stream(
    Ax(app): Ax<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let run = app.state.find_run(&id).await?;
    // An id that does not parse is ignored: the client gets the whole log.
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .unwrap_or(-1);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let mut seq = after;
        // A client resuming after the run's last event gets nothing more.
        let mut first = after >= 0;
        loop {
            // Armed before the read: an append in between still wakes us.
            let changed = app.state.changed();
            let Ok(batch) = app.state.events_after(&run.id, seq).await else {
                break;
            };
            let mut finished = std::mem::take(&mut first) && batch.is_empty();
            for s in batch {
                seq = s.seq;
                let entry = LogEntry::from(s);
                let kind = entry
                    .event
                    .get("type")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_owned();
                finished |= kind == "run_finished";
                let data = serde_json::to_string(&entry).unwrap_or_default();
                let ev = SseEvent::default()
                    .event(kind)
                    .id(entry.seq.to_string())
                    .data(data);
                if tx.send(Ok(ev)).await.is_err() {
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
            // Wait for the next poll, or for the client to go: a closed
            // stream must not keep polling the state until the run's next
            // event. (`closed` is cancel-safe.) Appends of this process wake
            // it at once; those of another (`ferry drill` in a terminal) are
            // found by the poll, one indexed read every 100 ms per stream.
            tokio::select! {
                () = tx.closed() => return,
                () = changed => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// How many drill summaries a server keeps (a few hundred bytes each).
const DRILL_CACHE: usize = 10_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DrillQuery {
    /// Only drills of the runbook with this `name`.
    runbook: Option<String>,
    /// At most this many, newest first (1 to 1000; default 200).
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/drills", params(DrillQuery), responses(
    (status = 200, body = Vec<dto::Drill>, description = "Finished drills, newest first, with RTO and RPO against their objectives"),
    (status = 400, body = ApiError, description = "A limit out of range"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn drills(
    Ax(app): Ax<AppState>,
    query: Result<Query<DrillQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<dto::Drill>>> {
    let Query(q) =
        query.map_err(|e| Error::usage(format!("{}; limit is a whole number", e.body_text())))?;
    let limit = q.limit.unwrap_or(200);
    if !(1..=1000).contains(&limit) {
        return Err(Error::usage("limit is from 1 to 1000"));
    }
    let runs = app
        .state
        .finished_runs("drill", q.runbook.as_deref(), limit)
        .await?;
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        if let Some(d) = app.drills.lock().await.get(&run.id) {
            out.push(d.clone());
            continue;
        }
        let r = match control::report_of(&app.state, &run).await {
            Ok(r) => r,
            Err(e) => {
                // One unreadable log does not hide the others.
                tracing::warn!(run = %run.id, "drill history skips a run: {}", crate::error::chain(&e));
                continue;
            }
        };
        let rpo = r.points.iter().map(|p| p.rpo_secs).reduce(f64::max);
        let d = dto::Drill {
            run: run.id.clone(),
            runbook: run.runbook.clone(),
            target: run.target.clone(),
            created_ms: run.created_ms,
            status: dto::RunStatus::parse(&run.status),
            rto_secs: r.rto_secs,
            rto_objective_secs: r.rto_objective_secs,
            rto_met: r.rto_met,
            rpo_secs: rpo,
            rpo_objective_secs: r
                .points
                .iter()
                .filter_map(|p| p.objective_secs)
                .reduce(f64::min),
            rpo_met: r.points.iter().filter_map(|p| p.met).reduce(|a, b| a && b),
            checks_passed: r.checks_passed,
            checks_failed: r.checks_failed,
        };
        let mut cache = app.drills.lock().await;
        // Bounded: a server up for years of drills starts over now and then.
        if cache.len() >= DRILL_CACHE {
            cache.clear();
        }
        cache.insert(run.id, d.clone());
        out.push(d);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/verified", responses(
    (status = 200, body = Vec<VerifiedPoint>, description = "Recovery points proved by drills"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn verified(Ax(app): Ax<AppState>) -> ApiResult<Json<Vec<VerifiedPoint>>> {
    let v = app.state.verified().await?;
    Ok(Json(v.into_iter().map(VerifiedPoint::from).collect()))
}

#[utoipa::path(post, path = "/api/plan", request_body = PlanRequest, responses(
    (status = 200, body = PlanResponse, description = "The waves (step ids)"),
    (status = 400, body = ApiError, description = "The body is not JSON, or a param is wrong"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 413, body = ApiError, description = "The runbook is too large"),
    (status = 415, body = ApiError, description = "The body is not application/json"),
    (status = 422, body = ApiError, description = "The runbook has problems, each with its file, line and column"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
async fn plan(Ax(app): Ax<AppState>, Body(b): Body<PlanRequest>) -> ApiResult<Json<PlanResponse>> {
    let file = b.file.unwrap_or_else(|| "api.yaml".into());
    let registry = app.registry.clone();
    let target = b.target.clone();
    let p = tokio::task::spawn_blocking(move || {
        control::plan(&registry, &file, &b.runbook, &b.params, b.target.as_deref())
    })
    .await
    .map_err(|e| Error::Internal(anyhow::anyhow!("planning stopped: {e}")))??;
    let history = control::history(&app.state, &p, target.as_deref()).await?;
    let prices = crate::forecast::PriceTable::load(None, &app.home)?;
    let (ctx, registry) = (app.context(), app.registry.clone());
    let (p, forecast) = tokio::task::spawn_blocking(move || {
        let f = control::forecast(&ctx, &registry, &p, target.as_deref(), &history, &prices);
        (p, f)
    })
    .await
    .map_err(|e| Error::Internal(anyhow::anyhow!("forecasting stopped: {e}")))?;
    let waves = p
        .waves
        .iter()
        .map(|w| w.iter().map(|&n| p.nodes[n].id.clone()).collect())
        .collect();
    Ok(Json(PlanResponse {
        runbook: p.runbook.name.clone(),
        waves,
        forecast,
    }))
}

#[cfg(test)]
mod tests;
