//! Who is asking, and the endpoints for users, tokens, sessions and the audit
//! log.
//!
//! Every request but `/api/health` and `/api/login` carries an identity,
//! found by [`authenticate`]: the server's own token (an admin named
//! `api-token`), a user's API token (`ferry token create`), or a console
//! session cookie. A session's state-changing requests (anything but GET and
//! HEAD) must also carry its CSRF token in `X-CSRF-Token`; bearer requests
//! need none (a browser never adds that header by itself). Handlers then ask
//! for the role they need ([`Identity::require`]).

use super::dto::ApiError;
use super::{ApiResult, AppState, Body};
use crate::auth::{self, Identity, Role};
use crate::error::Error;
use crate::exec::now_ms;
use crate::state::users::AuditEntry;
use axum::extract::{ConnectInfo, Path, Query, Request as HttpRequest, State as Ax};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use utoipa::ToSchema;

/// The console's session cookie.
pub const SESSION_COOKIE: &str = "ferry_session";
/// The header a session's state-changing requests carry their CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session a request came with (cookie requests only).
#[derive(Clone, Debug)]
pub struct Session {
    cookie: String,
    csrf: String,
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn unauthenticated() -> Error {
    Error::Unauthenticated(
        "missing or wrong credentials: send `Authorization: Bearer TOKEN` (the server's token in FERRY_HOME/api-token, or one from `ferry token create`), or log in (POST /api/login)".into(),
    )
}

/// Finds who a request is from and puts its [`Identity`] (and [`Session`])
/// in the request's extensions; 401 without one, 403 for a session request
/// that changes something without the session's CSRF token.
pub(super) async fn authenticate(
    Ax(app): Ax<AppState>,
    mut req: HttpRequest,
    next: Next,
) -> Response {
    // The parts needed, not the request (its body is not `Sync`).
    let (method, headers) = (req.method().clone(), req.headers().clone());
    match identify(&app, &method, &headers).await {
        Ok((who, session)) => {
            req.extensions_mut().insert(who);
            if let Some(s) = session {
                req.extensions_mut().insert(s);
            }
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

async fn identify(
    app: &AppState,
    method: &Method,
    headers: &HeaderMap,
) -> ApiResult<(Identity, Option<Session>)> {
    let now = now_ms();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(given) = bearer {
        if auth::same(given.as_bytes(), app.token.as_bytes()) {
            return Ok((
                Identity {
                    name: auth::SERVER_TOKEN_IDENTITY.into(),
                    role: Role::Admin,
                },
                None,
            ));
        }
        return match auth::token_identity(&app.state, given, now).await? {
            Some(who) => Ok((who, None)),
            None => Err(unauthenticated()),
        };
    }
    let Some(c) = cookie(headers, SESSION_COOKIE) else {
        return Err(unauthenticated());
    };
    let Some((who, csrf)) = auth::session_identity(&app.state, &c, now).await? else {
        return Err(Error::Unauthenticated(
            "the session has ended; log in again".into(),
        ));
    };
    if !matches!(*method, Method::GET | Method::HEAD) {
        let given = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !auth::same(given.as_bytes(), csrf.as_bytes()) {
            return Err(Error::Forbidden(format!(
                "missing or wrong CSRF token: send the one login returned in `{CSRF_HEADER}`"
            )));
        }
    }
    Ok((who, Some(Session { cookie: c, csrf })))
}

#[derive(Deserialize, ToSchema)]
pub struct Login {
    pub name: String,
    pub password: String,
}

/// Who is logged in.
#[derive(Serialize, ToSchema)]
pub struct Me {
    pub name: String,
    pub role: Role,
    /// The token state-changing requests of this session carry in
    /// `X-CSRF-Token` (absent for bearer tokens, which need none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf_token: Option<String>,
}

/// Whether the client reached us over TLS (`ferry serve --tls-cert`, or a
/// proxy that says so): then the cookie is `Secure`.
fn over_tls(tls: Option<Extension<super::OverTls>>, headers: &HeaderMap) -> bool {
    tls.is_some()
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn session_cookie(value: &str, max_age_secs: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("ferry_session=; Max-Age=0"))
}

#[utoipa::path(post, path = "/api/login", security(()), request_body = Login, responses(
    (status = 200, body = Me, description = "Logged in: the session cookie is set (HttpOnly, SameSite=Strict) and the body carries the CSRF token"),
    (status = 400, body = ApiError, description = "The body is not JSON"),
    (status = 401, body = ApiError, description = "Wrong name or password"),
    (status = 415, body = ApiError, description = "The body is not application/json"),
    (status = 422, body = ApiError, description = "The body lacks a field"),
    (status = 429, body = ApiError, description = "Too many failed logins for this name or from this address; Retry-After says when to try again"),
    (status = 500, body = ApiError, description = "The server failed; its log says why")))]
pub(super) async fn login(
    Ax(app): Ax<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    tls: Option<Extension<super::OverTls>>,
    headers: HeaderMap,
    Body(b): Body<Login>,
) -> ApiResult<Response> {
    let mut keys = vec![format!("user:{}", b.name)];
    if let Some(Extension(ConnectInfo(addr))) = peer {
        keys.push(format!("ip:{}", addr.ip()));
    }
    if let Some(wait) = app.limiter.wait(&keys) {
        return Err(Error::TooMany(
            "too many failed logins; wait before trying again".into(),
            wait.as_secs().max(1),
        ));
    }
    let Some(who) = auth::login(&app.state, &b.name, &b.password).await? else {
        app.limiter.failed(&keys);
        // The name tried, when it could be one (not whatever was sent).
        let tried = if auth::check_user_name(&b.name).is_ok() {
            b.name.as_str()
        } else {
            "(not a user name)"
        };
        let from = peer
            .map(|Extension(ConnectInfo(a))| a.ip().to_string())
            .unwrap_or_default();
        auth::audit(&app.state, tried, "login.failed", tried, &from).await;
        return Err(Error::Unauthenticated("wrong name or password".into()));
    };
    app.limiter.succeeded(&keys[..1]);
    let s = auth::start_session(&app.state, &who.name, now_ms()).await?;
    auth::audit(&app.state, &who.name, "login", &who.name, "").await;
    let max_age = auth::SESSION_LIFETIME.as_secs() as i64;
    let mut resp = Json(Me {
        name: who.name,
        role: who.role,
        csrf_token: Some(s.csrf),
    })
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&s.cookie, max_age, over_tls(tls, &headers)),
    );
    Ok(resp)
}

#[utoipa::path(post, path = "/api/logout", responses(
    (status = 204, description = "The session has ended and its cookie is cleared"),
    (status = 401, body = ApiError, description = "Not logged in"),
    (status = 403, body = ApiError, description = "No or a wrong CSRF token")))]
pub(super) async fn logout(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    session: Option<Extension<Session>>,
    tls: Option<Extension<super::OverTls>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(Extension(s)) = session {
        app.state
            .remove_session(&auth::secret_hash(&s.cookie))
            .await?;
        auth::audit(&app.state, &who.name, "logout", &who.name, "").await;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie("", 0, over_tls(tls, &headers)),
    );
    Ok(resp)
}

#[utoipa::path(get, path = "/api/me", responses(
    (status = 200, body = Me, description = "Who the request is from"),
    (status = 401, body = ApiError, description = "No or wrong credentials")))]
pub(super) async fn me(
    Extension(who): Extension<Identity>,
    session: Option<Extension<Session>>,
) -> Json<Me> {
    Json(Me {
        name: who.name,
        role: who.role,
        csrf_token: session.map(|Extension(s)| s.csrf),
    })
}

/// A user, as the API shows one.
#[derive(Serialize, ToSchema)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub created_ms: i64,
}

#[derive(Deserialize, ToSchema)]
pub struct NewUser {
    pub name: String,
    pub role: Role,
    /// At least 12 characters.
    pub password: String,
}

#[derive(Deserialize, ToSchema)]
pub struct SetRole {
    pub role: Role,
}

#[derive(Deserialize, ToSchema)]
pub struct SetPassword {
    /// At least 12 characters.
    pub password: String,
    /// The user's current password: needed when users change their own.
    #[serde(default)]
    pub current_password: Option<String>,
}

#[utoipa::path(get, path = "/api/users", responses(
    (status = 200, body = Vec<User>, description = "Every user"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an admin")))]
pub(super) async fn list_users(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
) -> ApiResult<Json<Vec<User>>> {
    who.require(Role::Admin)?;
    let users = app.state.users().await?;
    Ok(Json(
        users
            .into_iter()
            .filter_map(|u| {
                Some(User {
                    role: Role::parse(&u.role)?,
                    name: u.name,
                    created_ms: u.created_ms,
                })
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/users", request_body = NewUser, responses(
    (status = 400, body = ApiError, description = "The body is not JSON, a bad name or a weak password"),
    (status = 415, body = ApiError, description = "The body is not application/json"),
    (status = 422, body = ApiError, description = "The body lacks a field or has one of the wrong type"),
    (status = 201, body = User, description = "Added"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an admin"),
    (status = 409, body = ApiError, description = "The user exists")))]
pub(super) async fn add_user(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Body(b): Body<NewUser>,
) -> ApiResult<(StatusCode, Json<User>)> {
    who.require(Role::Admin)?;
    auth::check_user_name(&b.name)?;
    auth::check_password(&b.password)?;
    let hash = auth::hash_password_blocking(b.password).await?;
    let now = now_ms();
    if !app
        .state
        .add_user(&b.name, b.role.as_str(), &hash, now)
        .await?
    {
        return Err(Error::conflict(format!("user {} exists", b.name)));
    }
    auth::audit(&app.state, &who.name, "user.add", &b.name, b.role.as_str()).await;
    Ok((
        StatusCode::CREATED,
        Json(User {
            name: b.name,
            role: b.role,
            created_ms: now,
        }),
    ))
}

/// Refuses a change that would leave no admin user while admins exist (the
/// server's token still works, but the console would have nobody to manage
/// it).
async fn keep_an_admin(app: &AppState, name: &str) -> ApiResult<()> {
    let target = app.state.user(name).await?;
    if target.is_some_and(|u| u.role == Role::Admin.as_str())
        && app.state.count_role(Role::Admin.as_str()).await? <= 1
    {
        return Err(Error::conflict(format!(
            "{name} is the last admin; make another admin first"
        )));
    }
    Ok(())
}

#[utoipa::path(delete, path = "/api/users/{name}", params(("name" = String, Path, description = "The user's name")), responses(
    (status = 204, description = "Removed, with their tokens and sessions"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an admin"),
    (status = 404, body = ApiError, description = "No such user"),
    (status = 409, body = ApiError, description = "The last admin")))]
pub(super) async fn remove_user(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    who.require(Role::Admin)?;
    keep_an_admin(&app, &name).await?;
    if !app.state.remove_user(&name).await? {
        return Err(Error::not_found(format!("no user {name}")));
    }
    auth::audit(&app.state, &who.name, "user.remove", &name, "").await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/api/users/{name}/role", params(("name" = String, Path, description = "The user's name")), request_body = SetRole, responses(
    (status = 400, body = ApiError, description = "The body is not JSON"),
    (status = 415, body = ApiError, description = "The body is not application/json"),
    (status = 422, body = ApiError, description = "The body lacks a field or has one of the wrong type"),
    (status = 200, body = User, description = "Changed"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an admin"),
    (status = 404, body = ApiError, description = "No such user"),
    (status = 409, body = ApiError, description = "The last admin would lose the role")))]
pub(super) async fn set_role(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
    Body(b): Body<SetRole>,
) -> ApiResult<Json<User>> {
    who.require(Role::Admin)?;
    if b.role != Role::Admin {
        keep_an_admin(&app, &name).await?;
    }
    if !app.state.set_role(&name, b.role.as_str(), now_ms()).await? {
        return Err(Error::not_found(format!("no user {name}")));
    }
    auth::audit(&app.state, &who.name, "user.role", &name, b.role.as_str()).await;
    let u = app
        .state
        .user(&name)
        .await?
        .ok_or_else(|| Error::not_found(format!("no user {name}")))?;
    Ok(Json(User {
        name: u.name,
        role: b.role,
        created_ms: u.created_ms,
    }))
}

#[utoipa::path(put, path = "/api/users/{name}/password", params(("name" = String, Path, description = "The user's name")), request_body = SetPassword, responses(
    (status = 400, body = ApiError, description = "The body is not JSON, or a weak password"),
    (status = 415, body = ApiError, description = "The body is not application/json"),
    (status = 422, body = ApiError, description = "The body lacks a field or has one of the wrong type"),
    (status = 204, description = "Set; the user's console sessions have ended"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Another user's password and not an admin, or a wrong current password"),
    (status = 404, body = ApiError, description = "No such user"),
    (status = 429, body = ApiError, description = "Too many wrong current passwords for this user; Retry-After says when to try again")))]
pub(super) async fn set_password(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
    Body(b): Body<SetPassword>,
) -> ApiResult<StatusCode> {
    if who.name == name {
        // The same budget as logins: a stolen session cannot guess the
        // current password faster than a login could.
        let keys = [format!("user:{name}")];
        if let Some(wait) = app.limiter.wait(&keys) {
            return Err(Error::TooMany(
                "too many wrong passwords; wait before trying again".into(),
                wait.as_secs().max(1),
            ));
        }
        let current = b.current_password.as_deref().unwrap_or("");
        if auth::login(&app.state, &name, current).await?.is_none() {
            app.limiter.failed(&keys);
            auth::audit(&app.state, &name, "passwd.failed", &name, "").await;
            return Err(Error::Forbidden(
                "give your current password in `current_password`".into(),
            ));
        }
        app.limiter.succeeded(&keys);
    } else {
        who.require(Role::Admin)?;
    }
    auth::check_password(&b.password)?;
    let hash = auth::hash_password_blocking(b.password).await?;
    if !app.state.set_password(&name, &hash, now_ms()).await? {
        return Err(Error::not_found(format!("no user {name}")));
    }
    auth::audit(&app.state, &who.name, "user.passwd", &name, "").await;
    Ok(StatusCode::NO_CONTENT)
}

/// An API token, without its secret.
#[derive(Serialize, ToSchema)]
pub struct Token {
    pub id: String,
    pub user: String,
    pub label: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
}

#[derive(Deserialize, ToSchema)]
pub struct NewToken {
    /// Whose (default: the caller's; another user's needs an admin).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    /// How long it is valid: 30d, 12h, 90m (default: until revoked).
    #[serde(default)]
    pub expires: Option<String>,
}

/// A token just made: `token` is shown this once.
#[derive(Serialize, ToSchema)]
pub struct CreatedToken {
    pub id: String,
    pub user: String,
    pub token: String,
    pub expires_ms: Option<i64>,
}

#[utoipa::path(get, path = "/api/tokens", responses(
    (status = 200, body = Vec<Token>, description = "The caller's tokens (an admin's: everyone's)"),
    (status = 401, body = ApiError, description = "No or wrong credentials")))]
pub(super) async fn list_tokens(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
) -> ApiResult<Json<Vec<Token>>> {
    let only = (who.role < Role::Admin).then_some(who.name.as_str());
    let tokens = app.state.tokens(only).await?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|t| Token {
                id: t.id,
                user: t.user,
                label: t.label,
                created_ms: t.created_ms,
                expires_ms: t.expires_ms,
                last_used_ms: t.last_used_ms,
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/tokens", request_body = NewToken, responses(
    (status = 400, body = ApiError, description = "The body is not JSON, or a bad duration"),
    (status = 415, body = ApiError, description = "The body is not application/json"),
    (status = 422, body = ApiError, description = "The body lacks a field or has one of the wrong type"),
    (status = 201, body = CreatedToken, description = "Made; the token is shown only now"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Another user's token and not an admin"),
    (status = 404, body = ApiError, description = "No such user")))]
pub(super) async fn create_token(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Body(b): Body<NewToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let user = b.user.unwrap_or_else(|| who.name.clone());
    if user != who.name {
        who.require(Role::Admin)?;
    }
    if app.state.user(&user).await?.is_none() {
        return Err(Error::not_found(format!(
            "no user {user} (the server's own token is not a user: make a user first)"
        )));
    }
    let now = now_ms();
    let expires_ms = b
        .expires
        .as_deref()
        .map(auth::parse_duration_ms)
        .transpose()?
        .map(|d| now + d);
    let (secret, row) = auth::new_token(&user, b.label.as_deref().unwrap_or(""), now, expires_ms)?;
    app.state.add_token(&row).await?;
    auth::audit(&app.state, &who.name, "token.create", &user, &row.id).await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: row.id,
            user,
            token: secret,
            expires_ms,
        }),
    ))
}

#[utoipa::path(delete, path = "/api/tokens/{id}", params(("id" = String, Path, description = "The token's id")), responses(
    (status = 204, description = "Revoked"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Another user's token and not an admin"),
    (status = 404, body = ApiError, description = "No such token")))]
pub(super) async fn revoke_token(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let Some(t) = app.state.token(&id).await? else {
        return Err(Error::not_found(format!("no token {id}")));
    };
    if t.user != who.name {
        who.require(Role::Admin)?;
    }
    app.state.remove_token(&id).await?;
    auth::audit(&app.state, &who.name, "token.revoke", &t.user, &id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The latest `before` accepted: 2100-01-01 in milliseconds.
const MAX_BEFORE_MS: i64 = 4_102_444_800_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// At most this many entries (default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only entries before this time (milliseconds since the epoch): the
    /// oldest `at_ms` of the previous page.
    #[serde(default)]
    #[param(minimum = 0, maximum = 4_102_444_800_000_i64)]
    before: Option<i64>,
}

#[utoipa::path(get, path = "/api/audit", params(AuditQuery), responses(
    (status = 400, body = ApiError, description = "A query parameter is not a number"),
    (status = 200, body = Vec<AuditEntry>, description = "Who did what, newest first"),
    (status = 401, body = ApiError, description = "No or wrong credentials"),
    (status = 403, body = ApiError, description = "Not an operator or admin")))]
pub(super) async fn audit_log(
    Ax(app): Ax<AppState>,
    Extension(who): Extension<Identity>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    who.require(Role::Operator)?;
    let Query(q) = query.map_err(|e| {
        Error::usage(format!(
            "{}; limit and before are whole numbers",
            e.body_text()
        ))
    })?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::usage(format!("limit {limit}: give 1 to 1000")));
    }
    if let Some(b) = q.before
        && !(0..=MAX_BEFORE_MS).contains(&b)
    {
        return Err(Error::usage(format!(
            "before {b}: give milliseconds since the epoch (0 to {MAX_BEFORE_MS})"
        )));
    }
    Ok(Json(app.state.audit_log(limit, q.before).await?))
}
