//! `POST /api/hooks/alertmanager`: Alertmanager's webhook starts the
//! runbook its route names, once per incident (see `crate::alerts`).
//! Alertmanager authenticates with an operator's token
//! (`http_config.authorization.credentials`); it retries what does not
//! answer 2xx, so a run that could not start answers an error and leaves no
//! incident behind, and the next notification tries again.

use super::{ApiResult, AppState, Body, Runbook};
use crate::alerts::{Action, Mode, Notification, Outcome};
use crate::auth::{Identity, Role};
use crate::error::Error;
use axum::Extension;
use axum::Json;
use axum::extract::State as Ax;

#[utoipa::path(post, path = "/api/hooks/alertmanager", request_body = Notification, responses(
    (status = 200, body = Outcome, description = "What the notification did: started a run, nothing more for an open incident, closed it (resolved), or nothing (no route matches)"),
    (status = 400, body = crate::api::ApiError, description = "Not an Alertmanager notification"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 403, body = crate::api::ApiError, description = "Not an operator or admin"),
    (status = 404, body = crate::api::ApiError, description = "The route's runbook is not in the runbook directory"),
    (status = 409, body = crate::api::ApiError, description = "The route would fail over with no approval gate and does not say `unattended: true`"),
    (status = 415, body = crate::api::ApiError, description = "The body is not application/json"),
    (status = 422, body = crate::api::ApiError, description = "The body lacks a field, or the route's runbook has problems"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why"),
    (status = 503, body = crate::api::ApiError, description = "The server has no route file or no runbook directory")))]
pub(super) async fn alertmanager(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Body(n): Body<Notification>,
) -> ApiResult<Json<Outcome>> {
    who.require(Role::Operator)?;
    n.validate()?;
    let routes = app.alert_routes.clone().ok_or_else(|| {
        Error::Unavailable(
            "this server has no alert routes: start `ferry serve --alert-routes FILE`".into(),
        )
    })?;
    let now = crate::exec::now_ms();
    if n.status == "resolved" {
        let closed = app.state.resolve_incident(&n.group_key, now).await?;
        if closed {
            crate::auth::audit(&app.state, &who.name, "alert.resolved", &n.group_key, "").await;
        }
        let run = app.state.incident_run_id(&n.group_key).await?;
        return Ok(Json(Outcome {
            action: Action::Resolved,
            run,
            detail: if closed {
                "incident closed".into()
            } else {
                "no open incident for this group".into()
            },
        }));
    }
    let labels = n.labels();
    let Some(route) = routes.find(&labels) else {
        return Ok(Json(Outcome {
            action: Action::Ignored,
            run: None,
            detail: format!("no route matches {labels:?}"),
        }));
    };
    if !app
        .state
        .open_incident(&n.group_key, &route.runbook, now)
        .await?
    {
        let run = app.state.incident_run_id(&n.group_key).await?;
        return Ok(Json(Outcome {
            action: Action::AlreadyStarted,
            run,
            detail: "the incident is open: its run was started by an earlier notification".into(),
        }));
    }
    // This notification opened the incident: start its run, or leave no
    // incident behind so Alertmanager's retry tries again.
    let started = start(&app, &who, &n, route).await;
    match started {
        Ok(run) => {
            app.state.incident_run(&n.group_key, &run).await?;
            crate::auth::audit(
                &app.state,
                &who.name,
                "alert.fired",
                &n.group_key,
                &format!("run {run}"),
            )
            .await;
            Ok(Json(Outcome {
                action: Action::Started,
                run: Some(run),
                detail: format!(
                    "{} of {}",
                    match route.mode {
                        Mode::Run => "run",
                        Mode::Drill => "drill",
                    },
                    route.runbook
                ),
            }))
        }
        Err(e) => {
            if let Err(d) = app.state.drop_incident(&n.group_key).await {
                tracing::warn!("cannot forget the incident {}: {d:#}", n.group_key);
            }
            Err(e)
        }
    }
}

async fn start(
    app: &AppState,
    who: &Identity,
    n: &Notification,
    route: &crate::alerts::Route,
) -> ApiResult<String> {
    // Read once: what is checked for a gate is what runs.
    let (file, text, commit) = super::read_runbook(app, route.runbook.clone()).await?;
    if route.mode == Mode::Run && !route.unattended && !crate::alerts::has_approval(&file, &text) {
        return Err(Error::Conflict(format!(
            "the alert route to {} would fail over with nobody confirming it: add an approval step to the runbook, or `unattended: true` to the route",
            route.runbook
        )));
    }
    let run = super::launch(
        app,
        &who.name,
        Runbook::Read { file, text, commit },
        route.params.clone(),
        route.target.clone(),
        match route.mode {
            Mode::Run => ferry_engine::Mode::Run,
            Mode::Drill => ferry_engine::Mode::Drill,
        },
    )
    .await?;
    tracing::info!(run = %run.id, group = %n.group_key, "alert started a {}", run.mode);
    Ok(run.id)
}
