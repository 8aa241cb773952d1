//! What the console's read-only views need: sources and their recovery
//! points, the repository's health, the runbook directory, and Prometheus
//! metrics. Every handler here reads; none needs more than the viewer role.

use super::dto::{self, GraphStep, RunbookDetail, RunbookList, RunbookParam, RunbookSummary};
use super::{ApiResult, AppState};
use crate::error::Error;
use crate::inventory::{self, runbooks};
use axum::Json;
use axum::extract::{MatchedPath, Path, Request, State as Ax};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How old the runbook directory's objectives may be when sources and
/// metrics use them (listing it validates every file and runs git).
const OBJECTIVES_TTL: Duration = Duration::from_secs(10);

type Objectives = Arc<BTreeMap<String, (f64, String)>>;

/// The server's metrics that live between scrapes (request latency), and
/// the cached objectives of the runbook directory.
pub struct Metrics {
    latency: Family<RequestLabels, Histogram, fn() -> Histogram>,
    objectives: tokio::sync::Mutex<Option<(Instant, Objectives)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        fn histogram() -> Histogram {
            // 1 ms to about 16 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        }
        Metrics {
            latency: Family::new_with_constructor(histogram),
            objectives: tokio::sync::Mutex::new(None),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    mode: String,
    status: String,
}

/// Times every routed request, by route template (never by raw path, so
/// ids do not explode the label set). The event stream is left out: it
/// lasts as long as its run.
pub async fn track(Ax(app): Ax<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    if !route.ends_with("/stream") {
        app.metrics
            .latency
            .get_or_create(&RequestLabels {
                method,
                route,
                status: resp.status().as_u16().to_string(),
            })
            .observe(start.elapsed().as_secs_f64());
    }
    resp
}

/// The smallest RPO objective per source, from the runbook directory (none
/// without one; a directory that cannot be read sets none).
async fn objectives(app: &AppState) -> Objectives {
    let Some(dir) = app.runbooks.clone() else {
        return Arc::default();
    };
    let mut slot = app.metrics.objectives.lock().await;
    if let Some((at, o)) = &*slot
        && at.elapsed() < OBJECTIVES_TTL
    {
        return o.clone();
    }
    let registry = app.registry.clone();
    let o: Objectives = tokio::task::spawn_blocking(move || runbooks::list(&registry, &dir))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|l| Arc::new(l.rpo_objectives()))
        .unwrap_or_default();
    *slot = Some((Instant::now(), o.clone()));
    o
}

#[utoipa::path(get, path = "/api/sources", responses(
    (status = 200, body = Vec<inventory::Source>, description = "Every source with points or protection, by name, with its newest point, protection status and RPO against the runbooks' objectives"),
    (status = 401, body = dto::ApiError, description = "No or wrong credentials"),
    (status = 500, body = dto::ApiError, description = "The server failed; its log says why"),
    (status = 502, body = dto::ApiError, description = "The repository cannot be read; the server's log says why"),
    (status = 503, body = dto::ApiError, description = "The server has no repository")))]
pub(super) async fn list_sources(Ax(app): Ax<AppState>) -> ApiResult<Json<Vec<inventory::Source>>> {
    let o = objectives(&app).await;
    Ok(Json(app.inventory.sources(&app.state, &o).await?))
}

#[utoipa::path(get, path = "/api/sources/{source}/points", params(("source" = String, Path, description = "A source's name")), responses(
    (status = 200, body = Vec<inventory::Point>, description = "The source's points, newest first, each with the drills that verified it"),
    (status = 401, body = dto::ApiError, description = "No or wrong credentials"),
    (status = 404, body = dto::ApiError, description = "The source has no point"),
    (status = 500, body = dto::ApiError, description = "The server failed; its log says why"),
    (status = 502, body = dto::ApiError, description = "The repository cannot be read; the server's log says why"),
    (status = 503, body = dto::ApiError, description = "The server has no repository")))]
pub(super) async fn source_points(
    Ax(app): Ax<AppState>,
    Path(source): Path<String>,
) -> ApiResult<Json<Vec<inventory::Point>>> {
    Ok(Json(app.inventory.points(&app.state, &source).await?))
}

#[utoipa::path(get, path = "/api/repository", responses(
    (status = 200, body = inventory::Repository, description = "Size, deduplication, cost, checks and verification coverage"),
    (status = 401, body = dto::ApiError, description = "No or wrong credentials"),
    (status = 500, body = dto::ApiError, description = "The server failed; its log says why"),
    (status = 502, body = dto::ApiError, description = "The repository cannot be read; the server's log says why"),
    (status = 503, body = dto::ApiError, description = "The server has no repository")))]
pub(super) async fn repository(Ax(app): Ax<AppState>) -> ApiResult<Json<inventory::Repository>> {
    Ok(Json(app.inventory.repository(&app.state).await?))
}

pub(super) fn runbook_dir(app: &AppState) -> ApiResult<std::path::PathBuf> {
    app.runbooks.clone().ok_or_else(|| {
        Error::Unavailable(
            "this server has no runbook directory: start `ferry serve --runbooks DIR`".into(),
        )
    })
}

fn summary(e: &runbooks::Entry, commit: Option<String>) -> RunbookSummary {
    match &e.runbook {
        Ok(rb) => RunbookSummary {
            file: e.file.clone(),
            name: Some(rb.name.clone()),
            description: rb.description.clone(),
            valid: true,
            problems: 0,
            commit,
            rto_objective_secs: rb.objectives.rto_secs,
            rpo_objective_secs: rb.objectives.rpo_secs,
            targets: rb.targets.iter().map(|t| t.name.clone()).collect(),
            steps: rb.steps.len(),
            sources: runbooks::sources(rb),
        },
        Err(d) => RunbookSummary {
            file: e.file.clone(),
            name: None,
            description: None,
            valid: false,
            problems: d.0.len(),
            commit,
            rto_objective_secs: None,
            rpo_objective_secs: None,
            targets: Vec::new(),
            steps: 0,
            sources: Vec::new(),
        },
    }
}

#[utoipa::path(get, path = "/api/runbooks", responses(
    (status = 200, body = RunbookList, description = "The runbook directory's runbooks, each validated"),
    (status = 401, body = dto::ApiError, description = "No or wrong credentials"),
    (status = 500, body = dto::ApiError, description = "The server failed; its log says why"),
    (status = 503, body = dto::ApiError, description = "The server has no runbook directory, or cannot read it")))]
pub(super) async fn list_runbooks(Ax(app): Ax<AppState>) -> ApiResult<Json<RunbookList>> {
    let dir = runbook_dir(&app)?;
    let registry = app.registry.clone();
    let l = tokio::task::spawn_blocking(move || runbooks::list(&registry, &dir))
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!("listing runbooks stopped: {e}")))??;
    Ok(Json(RunbookList {
        directory: l.directory.display().to_string(),
        commit: l.commit.clone(),
        runbooks: l
            .entries
            .iter()
            .map(|e| summary(e, l.commit_of(e)))
            .collect(),
        skipped: l.skipped,
    }))
}

#[utoipa::path(get, path = "/api/runbooks/{file}", params(("file" = String, Path, description = "A runbook's file name in the directory")), responses(
    (status = 200, body = RunbookDetail, description = "The runbook: text, problems at their lines, params and DAG"),
    (status = 400, body = dto::ApiError, description = "The file is too large or unreadable"),
    (status = 401, body = dto::ApiError, description = "No or wrong credentials"),
    (status = 404, body = dto::ApiError, description = "No such runbook in the directory"),
    (status = 500, body = dto::ApiError, description = "The server failed; its log says why"),
    (status = 503, body = dto::ApiError, description = "The server has no runbook directory")))]
pub(super) async fn get_runbook(
    Ax(app): Ax<AppState>,
    Path(file): Path<String>,
) -> ApiResult<Json<RunbookDetail>> {
    let dir = runbook_dir(&app)?;
    let registry = app.registry.clone();
    let (e, commit) = tokio::task::spawn_blocking(move || runbooks::read(&registry, &dir, &file))
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!("reading a runbook stopped: {e}")))??;
    let (diagnostics, params, graph) = match &e.runbook {
        Err(d) => (
            d.0.iter().map(dto::Diagnostic::from).collect(),
            Vec::new(),
            Vec::new(),
        ),
        Ok(rb) => {
            let waves = runbooks::waves(rb);
            let params = rb
                .params
                .iter()
                .map(|p| RunbookParam {
                    name: p.name.clone(),
                    ty: p.ty.name().to_owned(),
                    default: p.default.clone(),
                    description: p.description.clone(),
                })
                .collect();
            let graph = rb
                .steps
                .iter()
                .zip(&waves)
                .map(|(s, &wave)| {
                    let action = s.action();
                    GraphStep {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        uses: s.uses.clone(),
                        target: rb
                            .targets
                            .get(s.target)
                            .map(|t| t.name.clone())
                            .unwrap_or_default(),
                        needs: s
                            .needs
                            .iter()
                            .filter_map(|&n| rb.steps.get(n))
                            .map(|n| n.id.clone())
                            .collect(),
                        wave,
                        line: s.line,
                        approval: action.approval,
                        check: action.check,
                        for_each: s.for_each.is_some(),
                    }
                })
                .collect();
            (Vec::new(), params, graph)
        }
    };
    Ok(Json(RunbookDetail {
        summary: summary(&e, commit),
        text: e.text,
        diagnostics,
        params,
        graph,
    }))
}

/// Prometheus metrics (text exposition format): per source the age of its
/// newest point, its protection lag and backlog, and its RPO objective;
/// runs by mode and outcome; API latency by route.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, content_type = "application/openmetrics-text", body = String, description = "OpenMetrics text, which Prometheus reads"),
    (status = 401, body = dto::ApiError, description = "No or wrong credentials"),
    (status = 500, body = dto::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn metrics(Ax(app): Ax<AppState>) -> ApiResult<Response> {
    let mut reg = prometheus_client::registry::Registry::with_prefix("ferry");
    type SourceGauge = Family<SourceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>;
    let gauge = SourceGauge::default;
    let (age, lag, backlog, objective, points, failing) =
        (gauge(), gauge(), gauge(), gauge(), gauge(), gauge());
    let o = objectives(&app).await;
    let sources = app.inventory.sources(&app.state, &o).await;
    let up: Gauge = Gauge::default();
    up.set(i64::from(sources.is_ok()));
    if let Err(e) = &sources {
        tracing::warn!("metrics without the repository: {}", crate::error::chain(e));
    }
    for s in sources.iter().flatten() {
        let l = SourceLabels {
            source: s.source.clone(),
        };
        points.get_or_create(&l).set(s.points as f64);
        if let Some(a) = s.last_point_age_secs {
            age.get_or_create(&l).set(a);
        }
        if let Some(p) = s.protection.as_ref().filter(|p| !p.stale) {
            if let Some(x) = p.lag_secs {
                lag.get_or_create(&l).set(x);
            }
            backlog.get_or_create(&l).set(p.backlog_bytes as f64);
            failing
                .get_or_create(&l)
                .set(if p.last_error.is_some() { 1.0 } else { 0.0 });
        }
        if let Some(x) = s.rpo_objective_secs {
            objective.get_or_create(&l).set(x);
        }
    }
    reg.register(
        "repository_up",
        "Whether the repository could be read for this scrape",
        up,
    );
    reg.register("source_points", "Recovery points of the source", points);
    reg.register(
        "source_last_point_age_seconds",
        "Age of the source's newest recovery point",
        age,
    );
    reg.register(
        "source_protection_lag_seconds",
        "Live RPO reported by the process protecting the source",
        lag,
    );
    reg.register(
        "source_protection_backlog_bytes",
        "Bytes written to the source since its newest point's instant",
        backlog,
    );
    reg.register(
        "source_protection_failing",
        "1 when the source's last protection cycle failed",
        failing,
    );
    reg.register(
        "source_rpo_objective_seconds",
        "The smallest RPO objective of the runbooks restoring the source",
        objective,
    );
    let runs: Family<RunLabels, Gauge> = Family::default();
    for (mode, status, n) in app.state.run_outcomes().await? {
        runs.get_or_create(&RunLabels { mode, status }).set(n);
    }
    reg.register(
        "runs",
        "Runs by mode and status (running, succeeded, failed, cancelled, rolled_back)",
        runs,
    );
    // Enrolled agents that are not revoked: silent ones (three intervals
    // unheard) and how long since each was heard from.
    let silent: Family<AgentLabels, Gauge> = Family::default();
    let seen: Family<AgentLabels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    let now = crate::exec::now_ms();
    for a in crate::fleet::list(&app.state, now).await? {
        if a.revoked_ms.is_some() {
            continue;
        }
        let l = AgentLabels {
            agent: a.id,
            host: a.hostname,
        };
        silent.get_or_create(&l).set(i64::from(a.silent));
        let last = a.last_seen_ms.unwrap_or(a.enrolled_ms);
        seen.get_or_create(&l)
            .set((now - last).max(0) as f64 / 1000.0);
    }
    reg.register(
        "agent_silent",
        "1 when the agent has not been heard from for three of its intervals",
        silent,
    );
    reg.register(
        "agent_last_seen_age_seconds",
        "Seconds since the agent last polled or reported (since enrollment if never)",
        seen,
    );
    reg.register(
        "api_request_duration_seconds",
        "API request latency by route template and status",
        app.metrics.latency.clone(),
    );
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &reg)
        .map_err(|e| Error::Internal(anyhow::anyhow!("encoding metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}
