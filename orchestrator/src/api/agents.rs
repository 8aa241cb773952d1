//! The fleet over HTTP. Users (by role) create enrollment tokens, list,
//! re-police and revoke agents under `/api/agents`; agents enroll with a
//! token (`POST /api/agents/enroll`) and then use their own credential on
//! `/api/agent/policy`, `/api/agent/status` and `/api/agent/cut` (a
//! consistency group's barrier), which accept nothing else. The logic is
//! [`crate::fleet`] and [`crate::groups`].

use super::{ApiResult, AppState, Body};
use crate::auth::{Identity, Role};
use crate::error::Error;
use crate::exec::now_ms;
use crate::fleet::{self, Agent, NewEnrollToken, PolicyTemplate};
use axum::extract::{Path, State as Ax};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferry_fleet::wire::{AgentStatus, EnrollRequest, Enrolled, GroupCut, Policy};
use serde::Deserialize;

/// A token to make.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NewAgentToken {
    /// How long it may be used (`30m`, `1h`, `7d`; default 1h, at most 30d).
    pub expires: Option<String>,
    /// What the agent it enrolls will do.
    pub policy: PolicyTemplate,
}

#[utoipa::path(post, path = "/api/agent-tokens", request_body = NewAgentToken, responses(
    (status = 201, body = NewEnrollToken, description = "Made; `token` is shown this once and enrolls one machine"),
    (status = 400, body = crate::api::ApiError, description = "A bad lifetime or policy"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 403, body = crate::api::ApiError, description = "Not an operator or admin, or a session request without its CSRF token"),
    (status = 415, body = crate::api::ApiError, description = "The body is not application/json"),
    (status = 422, body = crate::api::ApiError, description = "The body has an unknown field"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn create_token(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Body(b): Body<NewAgentToken>,
) -> ApiResult<(StatusCode, Json<NewEnrollToken>)> {
    who.require(Role::Operator)?;
    let ttl = b
        .expires
        .as_deref()
        .map(crate::auth::parse_duration_ms)
        .transpose()?;
    let t = fleet::create_token(&app.state, &who.name, now_ms(), ttl, b.policy).await?;
    Ok((StatusCode::CREATED, Json(t)))
}

#[utoipa::path(get, path = "/api/agents", responses(
    (status = 200, body = Vec<Agent>, description = "Every agent, revoked ones too: last seen, silent, policy, devices, and its last status (lag, mode per device, errors)"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn list(Ax(app): Ax<AppState>) -> ApiResult<Json<Vec<Agent>>> {
    Ok(Json(fleet::list(&app.state, now_ms()).await?))
}

#[utoipa::path(delete, path = "/api/agents/{id}", params(("id" = String, Path, description = "The agent's id")), responses(
    (status = 204, description = "Revoked: its next poll is refused and it stops"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 403, body = crate::api::ApiError, description = "Not an operator or admin, or a session request without its CSRF token"),
    (status = 404, body = crate::api::ApiError, description = "No such agent"),
    (status = 409, body = crate::api::ApiError, description = "Revoked already"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn revoke(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    who.require(Role::Operator)?;
    fleet::revoke(&app.state, &id, &who.name, now_ms()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(put, path = "/api/agents/{id}/policy", params(("id" = String, Path, description = "The agent's id")), request_body = PolicyTemplate, responses(
    (status = 200, body = Object, description = "The agent's policy now; it applies it at its next poll"),
    (status = 400, body = crate::api::ApiError, description = "A bad source, interval or device"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 403, body = crate::api::ApiError, description = "Not an operator or admin, or a session request without its CSRF token"),
    (status = 404, body = crate::api::ApiError, description = "No such agent"),
    (status = 409, body = crate::api::ApiError, description = "The agent is revoked"),
    (status = 415, body = crate::api::ApiError, description = "The body is not application/json"),
    (status = 422, body = crate::api::ApiError, description = "The body has an unknown field"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn set_policy(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<String>,
    Body(b): Body<PolicyTemplate>,
) -> ApiResult<Json<Policy>> {
    who.require(Role::Operator)?;
    Ok(Json(
        fleet::set_policy(&app.state, &id, b, &who.name).await?,
    ))
}

#[utoipa::path(post, path = "/api/agents/enroll", request_body = Object, responses(
    (status = 201, body = Object, description = "Enrolled: the agent's id, its credential (shown this once) and its policy"),
    (status = 400, body = crate::api::ApiError, description = "A bad host name, machine id or device"),
    (status = 401, body = crate::api::ApiError, description = "The token is unknown, expired or used already; the message says which"),
    (status = 415, body = crate::api::ApiError, description = "The body is not application/json"),
    (status = 422, body = crate::api::ApiError, description = "The body lacks a field"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why"),
    (status = 503, body = crate::api::ApiError, description = "Neither the token nor the server names a repository")),
    security(()))]
pub(super) async fn enroll(
    Ax(app): Ax<AppState>,
    Body(b): Body<EnrollRequest>,
) -> ApiResult<(StatusCode, Json<Enrolled>)> {
    let e = fleet::enroll(&app.state, app.repo.as_deref(), b, now_ms()).await?;
    Ok((StatusCode::CREATED, Json(e)))
}

/// The agent behind the request's `Authorization: Bearer fagent_...`.
async fn agent_of(
    app: &AppState,
    headers: &HeaderMap,
) -> ApiResult<crate::state::agents::AgentRow> {
    let cred = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Error::Unauthenticated("an agent's credential is required".into()))?;
    fleet::authenticate(&app.state, cred).await
}

#[utoipa::path(get, path = "/api/agent/policy", responses(
    (status = 200, body = Object, description = "What this agent protects, how often and where to"),
    (status = 401, body = crate::api::ApiError, description = "No or an unknown agent credential"),
    (status = 403, body = crate::api::ApiError, description = "The agent was revoked: it must stop"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")),
    security(("agent" = [])))]
pub(super) async fn agent_policy(
    Ax(app): Ax<AppState>,
    headers: HeaderMap,
) -> ApiResult<Json<Policy>> {
    let a = agent_of(&app, &headers).await?;
    Ok(Json(fleet::policy(&app.state, &a, now_ms()).await?))
}

#[utoipa::path(post, path = "/api/agent/status", request_body = Object, responses(
    (status = 204, description = "Recorded"),
    (status = 400, body = crate::api::ApiError, description = "The body is not JSON"),
    (status = 401, body = crate::api::ApiError, description = "No or an unknown agent credential"),
    (status = 403, body = crate::api::ApiError, description = "The agent was revoked: it must stop"),
    (status = 413, body = crate::api::ApiError, description = "A status over 1 MiB"),
    (status = 415, body = crate::api::ApiError, description = "The body is not application/json"),
    (status = 422, body = crate::api::ApiError, description = "A field of the wrong type"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")),
    security(("agent" = [])))]
pub(super) async fn agent_status(
    Ax(app): Ax<AppState>,
    headers: HeaderMap,
    Body(b): Body<AgentStatus>,
) -> ApiResult<Response> {
    let a = agent_of(&app, &headers).await?;
    fleet::push_status(&app.state, &a, &b, now_ms()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/api/agent/cut", request_body = Object, responses(
    (status = 200, body = Object, description = "The group's round: every member arrived (`arrived` equals `members`), or the server stopped waiting for the missing after 2 s; `skew_ms` is the spread of arrivals"),
    (status = 400, body = crate::api::ApiError, description = "The body is not JSON"),
    (status = 401, body = crate::api::ApiError, description = "No or an unknown agent credential"),
    (status = 403, body = crate::api::ApiError, description = "The agent was revoked: it must stop"),
    (status = 409, body = crate::api::ApiError, description = "The agent's policy names no group"),
    (status = 413, body = crate::api::ApiError, description = "A body over the server's limit"),
    (status = 415, body = crate::api::ApiError, description = "The body is not application/json"),
    (status = 422, body = crate::api::ApiError, description = "The body is not a JSON object"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")),
    security(("agent" = [])))]
pub(super) async fn agent_cut(
    Ax(app): Ax<AppState>,
    headers: HeaderMap,
    Body(_empty): Body<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<Json<GroupCut>> {
    let a = agent_of(&app, &headers).await?;
    Ok(Json(
        crate::groups::arrive(&app.groups, &app.state, &a, now_ms()).await?,
    ))
}

#[utoipa::path(get, path = "/api/groups", responses(
    (status = 200, body = Vec<crate::groups::GroupView>, description = "Every consistency group the agents' policies name: its members, and its recent coordinated cuts with their skew"),
    (status = 401, body = crate::api::ApiError, description = "No or wrong credentials"),
    (status = 500, body = crate::api::ApiError, description = "The server failed; its log says why")))]
pub(super) async fn groups(
    Ax(app): Ax<AppState>,
) -> ApiResult<Json<Vec<crate::groups::GroupView>>> {
    Ok(Json(app.groups.list(&app.state, now_ms()).await?))
}
