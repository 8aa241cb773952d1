//! The API in-process: `router().oneshot(...)` against a fresh SQLite state
//! per test, asserting the statuses and bodies the contract promises.

use super::*;
use axum::body::Body as HttpBody;
use axum::http::{Method, Request as Req};
use http_body_util::BodyExt;
use tower::ServiceExt;

const TOKEN: &str = "test-token-0123456789abcdef";

struct Api {
    app: AppState,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn new() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let state = State::open(&url).await.unwrap();
        Api {
            app: AppState::new(
                state,
                None,
                None,
                TOKEN.into(),
                dir.path().to_path_buf(),
                None,
            ),
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let mut b = Req::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        let body = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                HttpBody::from(v.to_string())
            }
            None => HttpBody::empty(),
        };
        let resp = router(self.app.clone())
            .oneshot(b.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
            String::from_utf8_lossy(&bytes).into_owned(),
        ));
        (status, json)
    }
}

const GATE: &str = "name: gate\nsteps:\n  - id: ok\n    uses: approval\n";

#[tokio::test(flavor = "multi_thread")]
async fn unknown_ids_are_404_and_conflicts_409() {
    let api = Api::new().await;
    let (s, body) = api.call(Method::GET, "/api/runs/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no run `nope`"));
    let (s, _) = api.call(Method::POST, "/api/runs/nope/cancel", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api.call(Method::GET, "/api/nothing-here", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, run) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"runbook": GATE, "mode": "run"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{run}");
    assert_eq!(run["mode"], "run");
    assert_eq!(run["status"], "running");
    let id = run["id"].as_str().unwrap().to_owned();
    // Wait for the gate to be asked.
    for _ in 0..100 {
        let (_, log) = api
            .call(Method::GET, &format!("/api/runs/{id}/events"), None)
            .await;
        if log.to_string().contains("approval_requested") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, body) = api
        .call(
            Method::POST,
            &format!("/api/runs/{id}/approve"),
            Some(serde_json::json!({"step": "nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    let (s, _) = api
        .call(
            Method::POST,
            &format!("/api/runs/{id}/approve"),
            Some(serde_json::json!({"step": "ok"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // Once finished, a cancel does not fit: 409.
    for _ in 0..200 {
        let (_, r) = api
            .call(Method::GET, &format!("/api/runs/{id}"), None)
            .await;
        if r["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, body) = api
        .call(Method::POST, &format!("/api/runs/{id}/cancel"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    // The approval names the authenticated identity, whatever the body said.
    let (_, log) = api
        .call(Method::GET, &format!("/api/runs/{id}/events"), None)
        .await;
    let approved = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"]["type"] == "approved")
        .unwrap();
    assert_eq!(approved["event"]["by"], "api-token");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_bodies_are_400_or_422_with_an_error_body() {
    let api = Api::new().await;
    let resp = router(api.app.clone())
        .oneshot(
            Req::builder()
                .method(Method::POST)
                .uri("/api/runs")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(HttpBody::from("{not json"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (s, body) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"mode": "run"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"].is_string());
    let (s, body) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"runbook": "name: x\nsteps:\n  - id: a\n    uses: nope\n", "mode": "run"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["diagnostics"][0]["line"], 4);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("api.yaml:4:11: error: unknown action `nope`")
    );
    let (s, _) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"runbook": GATE, "mode": "sideways"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // Nothing was stored for the bad requests.
    let (_, runs) = api.call(Method::GET, "/api/runs", None).await;
    assert_eq!(runs.as_array().unwrap().len(), 0);
    let (s, _) = api
        .call(Method::GET, "/api/runs/x/report?format=pdf", None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_do_not_leak_internals() {
    let resp = Error::Internal(anyhow::anyhow!(
        "secret path /etc/ferry/x and password hunter2"
    ))
    .into_response();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("hunter2") && !text.contains("/etc/ferry"),
        "{text}"
    );
    assert!(text.contains("reference"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_no_api() {
    let api = Api::new().await;
    let resp = router(api.app.clone())
        .oneshot(
            Req::builder()
                .uri("/api/runs")
                .body(HttpBody::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = router(api.app.clone())
        .oneshot(
            Req::builder()
                .uri("/api/health")
                .body(HttpBody::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_event_streams_stop_polling() {
    let api = Api::new().await;
    let (_, run) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"runbook": GATE, "mode": "run"})),
        )
        .await;
    let id = run["id"].as_str().unwrap().to_owned();
    // Let the run reach its gate and settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for _ in 0..40 {
        let resp = router(api.app.clone())
            .oneshot(
                Req::builder()
                    .uri(format!("/api/runs/{id}/stream"))
                    .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                    .body(HttpBody::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        // The first event arrives; then the client goes away.
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
        drop(body);
    }
    // Every stream's poller notices within a poll interval, although the
    // run waits on its approval and writes no new event.
    let mut alive = metrics.num_alive_tasks();
    for _ in 0..50 {
        if alive <= before + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        alive = metrics.num_alive_tasks();
    }
    assert!(
        alive <= before + 2,
        "{} pollers still run after their clients left (before: {before})",
        alive.saturating_sub(before)
    );
}

/// The whole body of a finished run's stream, asked with `Last-Event-ID`.
async fn stream_after(api: &Api, id: &str, last: Option<&str>) -> String {
    let mut b = Req::builder()
        .uri(format!("/api/runs/{id}/stream"))
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    if let Some(l) = last {
        b = b.header("last-event-id", l);
    }
    let resp = router(api.app.clone())
        .oneshot(b.body(HttpBody::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The stream of a finished run ends by itself.
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the stream of a finished run did not end")
        .unwrap()
        .to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_names_its_last_event_and_a_reconnecting_stream_resumes_after_it() {
    let api = Api::new().await;
    let (_, run) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"runbook": GATE, "mode": "run"})),
        )
        .await;
    let id = run["id"].as_str().unwrap().to_owned();
    let waiting = loop {
        let (_, r) = api
            .call(Method::GET, &format!("/api/runs/{id}"), None)
            .await;
        if r["steps"][0]["status"] == "waiting" {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let at_gate = waiting["last_seq"].as_i64().unwrap();
    assert!(
        at_gate >= 0,
        "a report built from events names the last one"
    );
    api.call(
        Method::POST,
        &format!("/api/runs/{id}/approve"),
        Some(serde_json::json!({"step": "ok"})),
    )
    .await;
    let done = loop {
        let (_, r) = api
            .call(Method::GET, &format!("/api/runs/{id}"), None)
            .await;
        if r["status"] != "running" {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let last = done["last_seq"].as_i64().unwrap();
    assert!(last > at_gate);

    let all = stream_after(&api, &id, None).await;
    assert!(all.contains("event: approval_requested"), "{all}");
    assert!(all.contains("event: run_finished"), "{all}");
    // Resumed after the gate: the approval and the end, not the request again.
    let rest = stream_after(&api, &id, Some(&at_gate.to_string())).await;
    assert!(!rest.contains("approval_requested"), "{rest}");
    assert!(rest.contains("event: approved"), "{rest}");
    assert!(rest.contains("event: run_finished"), "{rest}");
    let ids: Vec<i64> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
        .collect();
    assert!(ids.iter().all(|&n| n > at_gate && n <= last), "{ids:?}");
    // After the last event, the stream ends at once with nothing in it;
    // an id that is not a number is ignored.
    let none = stream_after(&api, &id, Some(&last.to_string())).await;
    assert!(!none.contains("event:"), "{none}");
    let junk = stream_after(&api, &id, Some("not-a-number")).await;
    assert_eq!(junk, all);
}

#[test]
fn weak_or_shared_token_files_are_refused_and_new_ones_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("home");
    let t = load_or_create_token(&dir).unwrap();
    assert!(t.len() >= 32);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("api-token")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(load_or_create_token(&dir).unwrap(), t, "the token is kept");
    std::fs::write(dir.join("api-token"), "aaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
    let e = load_or_create_token(&dir).unwrap_err().to_string();
    assert!(e.contains("weak token"), "{e}");
}

/// A request with the given credentials: `("bearer", TOKEN)`, or a session
/// `("cookie", VALUE)` with an optional CSRF token.
#[derive(Clone, Default)]
struct As {
    bearer: Option<String>,
    cookie: Option<String>,
    csrf: Option<String>,
    forwarded_https: bool,
}

impl As {
    fn token(t: &str) -> As {
        As {
            bearer: Some(t.into()),
            ..As::default()
        }
    }
}

impl Api {
    async fn call_as(
        &self,
        who: &As,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let mut b = Req::builder().method(method).uri(path);
        if let Some(t) = &who.bearer {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(c) = &who.cookie {
            b = b.header(header::COOKIE, format!("other=1; ferry_session={c}"));
        }
        if let Some(c) = &who.csrf {
            b = b.header("x-csrf-token", c);
        }
        if who.forwarded_https {
            b = b.header("x-forwarded-proto", "https");
        }
        let body = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                HttpBody::from(v.to_string())
            }
            None => HttpBody::empty(),
        };
        let resp = router(self.app.clone())
            .oneshot(b.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    /// Adds a user as the server's token (an admin) and makes a token for them.
    async fn user_with_token(&self, name: &str, role: &str) -> String {
        let admin = As::token(TOKEN);
        let (s, _, b) = self
            .call_as(
                &admin,
                Method::POST,
                "/api/users",
                Some(serde_json::json!({"name": name, "role": role, "password": format!("{name} has a long password")})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        let (s, _, b) = self
            .call_as(
                &admin,
                Method::POST,
                "/api/tokens",
                Some(serde_json::json!({"user": name, "label": "test"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["token"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_decide_who_may_act_and_the_audit_log_names_them() {
    let api = Api::new().await;
    let viewer = As::token(&api.user_with_token("vera", "viewer").await);
    let operator = As::token(&api.user_with_token("otto", "operator").await);

    // A viewer reads, and is refused what changes anything, with the role it needs.
    let (s, _, _) = api.call_as(&viewer, Method::GET, "/api/runs", None).await;
    assert_eq!(s, StatusCode::OK);
    let start = serde_json::json!({"runbook": GATE, "mode": "run"});
    let (s, _, b) = api
        .call_as(&viewer, Method::POST, "/api/runs", Some(start.clone()))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b["error"].as_str().unwrap().contains("operator"), "{b}");
    let (s, _, _) = api.call_as(&viewer, Method::GET, "/api/users", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = api.call_as(&viewer, Method::GET, "/api/audit", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // An operator starts a run and approves its gate; the log names them.
    let (s, _, run) = api
        .call_as(&operator, Method::POST, "/api/runs", Some(start))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{run}");
    let id = run["id"].as_str().unwrap().to_owned();
    for _ in 0..100 {
        let (_, _, log) = api
            .call_as(
                &operator,
                Method::GET,
                &format!("/api/runs/{id}/events"),
                None,
            )
            .await;
        if log.to_string().contains("approval_requested") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let approve = serde_json::json!({"step": "ok"});
    let (s, _, _) = api
        .call_as(
            &viewer,
            Method::POST,
            &format!("/api/runs/{id}/approve"),
            Some(approve.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a viewer cannot approve");
    let (s, _, b) = api
        .call_as(
            &operator,
            Method::POST,
            &format!("/api/runs/{id}/approve"),
            Some(approve),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    // The process driving the run turns the request into an event.
    let mut approved = None;
    for _ in 0..200 {
        let (_, _, log) = api
            .call_as(
                &operator,
                Method::GET,
                &format!("/api/runs/{id}/events"),
                None,
            )
            .await;
        approved = log
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event"]["type"] == "approved")
            .cloned();
        if approved.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(approved.expect("approved")["event"]["by"], "otto");

    let (s, _, audit) = api
        .call_as(&operator, Method::GET, "/api/audit", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{audit}");
    let seen: Vec<(String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("api-token", "user.add", "vera"),
        ("api-token", "token.create", "otto"),
        ("otto", "run.start", id.as_str()),
        ("otto", "run.approve", id.as_str()),
    ] {
        assert!(
            seen.iter()
                .any(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()) == want),
            "{want:?} not in {seen:?}"
        );
    }

    // A revoked token and an expired one no longer work; a made-up one never did.
    let (_, _, tokens) = api.call_as(&viewer, Method::GET, "/api/tokens", None).await;
    assert_eq!(
        tokens.as_array().unwrap().len(),
        1,
        "a viewer sees only their own: {tokens}"
    );
    let vid = tokens[0]["id"].as_str().unwrap().to_owned();
    let (s, _, _) = api
        .call_as(
            &operator,
            Method::DELETE,
            &format!("/api/tokens/{vid}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "not someone else's token");
    let (s, _, _) = api
        .call_as(&viewer, Method::DELETE, &format!("/api/tokens/{vid}"), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, _) = api.call_as(&viewer, Method::GET, "/api/runs", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (secret, mut row) = crate::auth::new_token("otto", "old", 0, None).unwrap();
    row.expires_ms = Some(crate::exec::now_ms() - 1);
    api.app.state.add_token(&row).await.unwrap();
    let (s, _, _) = api
        .call_as(&As::token(&secret), Method::GET, "/api/runs", None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "expired");
    let forged = format!("ferry_{}_{}", row.id, "0".repeat(48));
    let (s, _, _) = api
        .call_as(&As::token(&forged), Method::GET, "/api/runs", None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // A removed user's tokens stop working at once.
    let (s, _, _) = api
        .call_as(&As::token(TOKEN), Method::DELETE, "/api/users/otto", None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, _) = api.call_as(&operator, Method::GET, "/api/runs", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_need_their_csrf_token_and_failed_logins_are_limited() {
    let api = Api::new().await;
    let _ = api.user_with_token("ann", "operator").await;
    let password = "ann has a long password";
    let login = |pw: &str| serde_json::json!({"name": "ann", "password": pw});
    let nobody = As::default();

    let (s, _, b) = api
        .call_as(
            &nobody,
            Method::POST,
            "/api/login",
            Some(login("wrong password!")),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert_eq!(b["error"], "wrong name or password");
    let (s, _, nope) = api
        .call_as(
            &nobody,
            Method::POST,
            "/api/login",
            Some(serde_json::json!({"name": "nobody", "password": password})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(nope["error"], b["error"], "an unknown name reads the same");

    let (s, headers, me) = api
        .call_as(&nobody, Method::POST, "/api/login", Some(login(password)))
        .await;
    assert_eq!(s, StatusCode::OK, "{me}");
    assert_eq!(me["name"], "ann");
    assert_eq!(me["role"], "operator");
    let set = headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    let cookie = set
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("ferry_session=")
        .unwrap()
        .to_owned();
    let csrf = me["csrf_token"].as_str().unwrap().to_owned();
    let session = As {
        cookie: Some(cookie.clone()),
        ..As::default()
    };
    let (s, _, me2) = api.call_as(&session, Method::GET, "/api/me", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me2["csrf_token"], csrf.as_str());

    // A state-changing request needs the session's CSRF token.
    let start = serde_json::json!({"runbook": GATE, "mode": "drill"});
    let (s, _, b) = api
        .call_as(&session, Method::POST, "/api/runs", Some(start.clone()))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    assert!(b["error"].as_str().unwrap().contains("CSRF"), "{b}");
    let wrong = As {
        csrf: Some("0".repeat(32)),
        ..session.clone()
    };
    let (s, _, _) = api
        .call_as(&wrong, Method::POST, "/api/runs", Some(start.clone()))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let with_csrf = As {
        csrf: Some(csrf.clone()),
        ..session.clone()
    };
    let (s, _, run) = api
        .call_as(&with_csrf, Method::POST, "/api/runs", Some(start))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{run}");
    let id = run["id"].as_str().unwrap();
    let (s, _, _) = api
        .call_as(
            &with_csrf,
            Method::POST,
            &format!("/api/runs/{id}/cancel"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);

    // Logging out ends the session.
    let (s, headers, _) = api
        .call_as(&with_csrf, Method::POST, "/api/logout", None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(
        headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let (s, _, _) = api.call_as(&session, Method::GET, "/api/me", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Behind a TLS proxy the cookie is Secure.
    let https = As {
        forwarded_https: true,
        ..As::default()
    };
    let (s, headers, _) = api
        .call_as(&https, Method::POST, "/api/login", Some(login(password)))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );

    // Five failures lock the name out, even for the right password, for a while.
    for _ in 0..5 {
        let (s, _, _) = api
            .call_as(
                &nobody,
                Method::POST,
                "/api/login",
                Some(login("not the password")),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, headers, b) = api
        .call_as(&nobody, Method::POST, "/api/login", Some(login(password)))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{b}");
    let wait: u64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait > 0 && wait <= 900, "{wait}");

    // The audit log has the failures, with the name tried.
    let (_, _, audit) = api
        .call_as(
            &As::token(TOKEN),
            Method::GET,
            "/api/audit?limit=1000",
            None,
        )
        .await;
    let failed = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "login.failed" && e["subject"] == "ann")
        .count();
    assert_eq!(failed, 6, "{audit}");
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_are_stored_as_argon2id_and_the_last_admin_stays() {
    let api = Api::new().await;
    let admin = As::token(TOKEN);
    let (s, _, b) = api
        .call_as(
            &admin,
            Method::POST,
            "/api/users",
            Some(serde_json::json!({"name": "root1", "role": "admin", "password": "short"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b["error"].as_str().unwrap().contains("at least 12"), "{b}");
    let pw = "a very secret passphrase";
    let (s, _, _) = api
        .call_as(
            &admin,
            Method::POST,
            "/api/users",
            Some(serde_json::json!({"name": "root1", "role": "admin", "password": pw})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, _) = api
        .call_as(
            &admin,
            Method::POST,
            "/api/users",
            Some(serde_json::json!({"name": "root1", "role": "viewer", "password": pw})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let u = api.app.state.user("root1").await.unwrap().unwrap();
    assert!(
        u.password_hash.starts_with("$argon2id$"),
        "{}",
        u.password_hash
    );
    // The plaintext is nowhere in the state's files.
    for f in std::fs::read_dir(api._dir.path()).unwrap().flatten() {
        let bytes = std::fs::read(f.path()).unwrap_or_default();
        assert!(
            !bytes.windows(pw.len()).any(|w| w == pw.as_bytes()),
            "{}",
            f.path().display()
        );
    }
    let (s, _, b) = api
        .call_as(&admin, Method::DELETE, "/api/users/root1", None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, _, _) = api
        .call_as(
            &admin,
            Method::PUT,
            "/api/users/root1/role",
            Some(serde_json::json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _, _) = api
        .call_as(
            &admin,
            Method::PUT,
            "/api/users/nobody/role",
            Some(serde_json::json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A repository with points of two sources, a runbook directory (a git
/// checkout) that sets an RPO on them, protection status as `ferry protect`
/// writes it, a drill's verification and a check: what the console shows.
#[tokio::test(flavor = "multi_thread")]
async fn sources_points_repository_runbooks_drills_and_metrics() {
    use chrono::{Duration as Age, Utc};
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let pw = b"correct horse battery staple".to_vec();
    let disk = dir.path().join("disk0");
    // The data plane's store blocks on its own runtime: off the test's.
    let ids = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut ids = std::collections::BTreeMap::new();
                let store =
                    ferry_connectors::store::open(repo_dir.to_str().unwrap(), true).unwrap();
                let repo = ferry_agent::Repository::init(store, &pw, Default::default()).unwrap();
                let backup = |source: &str, fill: u8, age_mins: i64| {
                    std::fs::write(&disk, vec![fill; 3 << 20]).unwrap();
                    let opts = ferry_agent::backup::BackupOptions {
                        source: source.into(),
                        disks: vec![ferry_agent::backup::DiskSpec::from_path(&disk)],
                        consistency: None,
                        time: Some(Utc::now() - Age::minutes(age_mins)),
                        group: None,
                    };
                    ferry_agent::backup::backup(&repo, &opts, &Default::default())
                        .unwrap()
                        .point
                };
                ids.insert("web-old", backup("web", 1, 30));
                ids.insert("web-new", backup("web", 2, 1));
                ids.insert("db", backup("db", 3, 120));
                ids
            })
            .join()
            .unwrap()
    });
    let books = dir.path().join("runbooks");
    std::fs::create_dir(&books).unwrap();
    std::fs::write(
        books.join("stack.yaml"),
        "name: stack\nobjectives: { rto: 5m, rpo: 1h }\nparams:\n  web: { type: point, default: web@latest }\nsteps:\n  - id: web-disk\n    uses: volume.restore\n    with: { point: \"${{ params.web }}\" }\n  - id: db-disk\n    uses: volume.restore\n    with: { point: db@latest }\n  - id: ready\n    uses: approval\n    needs: [web-disk, db-disk]\n",
    )
    .unwrap();
    std::fs::write(
        books.join("quick.yaml"),
        "name: quick\nsteps:\n  - id: pause\n    uses: wait\n    with: { duration: 100ms }\n",
    )
    .unwrap();
    std::fs::write(
        books.join("broken.yaml"),
        "name: broken\nsteps:\n  - id: a\n    uses: no.such.action\n",
    )
    .unwrap();
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(&books)
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "runbooks"]);

    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let state = State::open(&url).await.unwrap();
    let now = Utc::now();
    let status = |src: &str, cut_secs: i64, err: Option<&str>| {
        serde_json::json!({"source": src, "last_cut": now - Age::seconds(cut_secs), "backlog_bytes": 4096,
            "throughput_bytes_per_sec": 1e6, "last_cycle_secs": 0.5, "cycles_ok": 7, "cycles_failed": u64::from(err.is_some()),
            "last_error": err, "last_point": null, "lag_secs": null, "last_mode": "incremental"})
        .to_string()
    };
    state
        .put_protection(&[
            crate::state::health::ProtectionRow {
                source: "web".into(),
                repo: "r".into(),
                reporter: "host:1".into(),
                updated_ms: now.timestamp_millis(),
                status: status("web", 5, None),
            },
            crate::state::health::ProtectionRow {
                source: "ghost".into(),
                repo: "r".into(),
                reporter: "host:2".into(),
                updated_ms: (now - Age::minutes(10)).timestamp_millis(),
                status: status(
                    "ghost",
                    900,
                    Some("QMP socket /run/q.sock: connection refused"),
                ),
            },
        ])
        .await
        .unwrap();
    state
        .mark_verified(&crate::state::Verified {
            repo: "r".into(),
            point: ids["web-old"].clone(),
            source: "web".into(),
            point_time: String::new(),
            run_id: "drill-1".into(),
            at_ms: now.timestamp_millis(),
        })
        .await
        .unwrap();
    state
        .record_check(&crate::state::health::CheckRow {
            id: "c1".into(),
            repo: crate::inventory::repo_key(repo_dir.to_str().unwrap()),
            at_ms: now.timestamp_millis(),
            ok: true,
            read_data: true,
            points: 3,
            packs: 1,
            chunks: 3,
            bytes_read: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let api = Api {
        app: AppState::new(
            state,
            Some(repo_dir.display().to_string()),
            Some(Password::new(pw)),
            TOKEN.into(),
            dir.path().to_path_buf(),
            Some(books.clone()),
        ),
        _dir: tempfile::tempdir().unwrap(),
    };

    let (s, src) = api.call(Method::GET, "/api/sources", None).await;
    assert_eq!(s, StatusCode::OK, "{src}");
    let names: Vec<_> = src
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["source"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "ghost", "web"]);
    let (db, ghost, web) = (&src[0], &src[1], &src[2]);
    assert_eq!(web["points"], 2);
    assert_eq!(web["last_point"], ids["web-new"]);
    assert_eq!(web["rpo_objective_secs"], 3600.0);
    assert_eq!(web["rpo_objective_runbook"], "stack");
    assert_eq!(web["rpo_status"], "ok");
    assert_eq!(web["bytes_protected"], 3 << 20);
    assert_eq!(web["last_verified"]["run_id"], "drill-1");
    let lag = web["protection"]["lag_secs"].as_f64().unwrap();
    assert!((5.0..60.0).contains(&lag), "{lag}");
    assert_eq!(web["protection"]["stale"], false);
    // Two hours old against a one-hour objective.
    assert_eq!(db["rpo_status"], "breach");
    assert!(
        db["alerts"][0]
            .as_str()
            .unwrap()
            .contains("RPO of runbook stack"),
        "{db}"
    );
    // Protection that stopped reporting, with its last error, and no point.
    assert_eq!(ghost["points"], 0);
    assert_eq!(ghost["protection"]["stale"], true);
    let alerts = ghost["alerts"].to_string();
    assert!(
        alerts.contains("no recovery point yet")
            && alerts.contains("has not reported")
            && alerts.contains("connection refused"),
        "{alerts}"
    );

    let (s, pts) = api.call(Method::GET, "/api/sources/web/points", None).await;
    assert_eq!(s, StatusCode::OK, "{pts}");
    assert_eq!(pts[0]["id"], ids["web-new"]);
    assert_eq!(pts[1]["verified_by"][0]["run_id"], "drill-1");
    assert_eq!(pts[0]["verified_by"].as_array().unwrap().len(), 0);
    assert_eq!(pts[0]["disks"][0]["size"], 3 << 20);
    assert_eq!(pts[0]["disks"][0]["digest"].as_str().unwrap().len(), 64);
    let (s, _) = api
        .call(Method::GET, "/api/sources/nope/points", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, r) = api.call(Method::GET, "/api/repository", None).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["points"], 3);
    assert_eq!(r["coverage"]["points_verified"], 1);
    assert_eq!(r["coverage"]["bytes_verified"], 3 << 20);
    assert_eq!(r["checks"][0]["ok"], true);
    // 9 MiB of one-byte fills compress to almost nothing.
    assert!(r["reduction"].as_f64().unwrap() > 10.0, "{r}");

    let (s, l) = api.call(Method::GET, "/api/runbooks", None).await;
    assert_eq!(s, StatusCode::OK, "{l}");
    let head = l["commit"].as_str().unwrap().to_owned();
    assert_eq!(head.len(), 40);
    let files: Vec<_> = l["runbooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["file"].as_str().unwrap(), r["valid"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        files,
        [
            ("broken.yaml", false),
            ("quick.yaml", true),
            ("stack.yaml", true)
        ]
    );
    assert_eq!(
        l["runbooks"][2]["sources"],
        serde_json::json!(["db", "web"])
    );
    let (s, b) = api
        .call(Method::GET, "/api/runbooks/broken.yaml", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["diagnostics"][0]["line"], 4, "{b}");
    let (s, d) = api
        .call(Method::GET, "/api/runbooks/stack.yaml", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let waves: Vec<_> = d["graph"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["id"].as_str().unwrap(), g["wave"].as_u64().unwrap()))
        .collect();
    assert_eq!(waves, [("web-disk", 0), ("db-disk", 0), ("ready", 1)]);
    assert_eq!(d["graph"][2]["approval"], true);
    for bad in ["..%2Fstate.db", "notes.txt", "nope.yaml"] {
        let (s, _) = api
            .call(Method::GET, &format!("/api/runbooks/{bad}"), None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{bad}");
    }

    // A drill started from the directory by name records its commit, and
    // the drill history measures it.
    let (s, run) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"path": "quick.yaml", "mode": "drill"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{run}");
    assert_eq!(run["git_commit"], head.as_str());
    let id = run["id"].as_str().unwrap().to_owned();
    let mut drills = serde_json::Value::Null;
    for _ in 0..200 {
        (_, drills) = api.call(Method::GET, "/api/drills", None).await;
        if drills.as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(drills[0]["run"], id.as_str(), "{drills}");
    assert_eq!(drills[0]["status"], "succeeded");
    assert!(drills[0]["rto_secs"].as_f64().unwrap() >= 0.1, "{drills}");
    let (s, _) = api.call(Method::GET, "/api/drills?limit=0", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A newer drill of another runbook does not push quick's out of its
    // own history: the runbook is chosen before the limit.
    let (_, other) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"runbook": "name: other\nsteps:\n  - id: n\n    uses: noop\n", "mode": "drill"})),
        )
        .await;
    for _ in 0..200 {
        (_, drills) = api.call(Method::GET, "/api/drills", None).await;
        if drills[0]["run"] == other["id"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(drills[0]["run"], other["id"], "{drills}");
    let (_, quick) = api
        .call(Method::GET, "/api/drills?runbook=quick&limit=1", None)
        .await;
    assert_eq!(quick.as_array().map(Vec::len), Some(1), "{quick}");
    assert_eq!(quick[0]["run"], id.as_str(), "{quick}");
    let (s, e) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(serde_json::json!({"path": "quick.yaml", "runbook": GATE, "mode": "drill"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");

    let (s, m) = api.call(Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let m = m.as_str().unwrap().to_owned();
    for want in [
        "ferry_repository_up 1",
        "ferry_source_points{source=\"web\"} 2",
        "ferry_source_rpo_objective_seconds{source=\"db\"} 3600",
        "ferry_runs{mode=\"drill\",status=\"succeeded\"} 2",
        "ferry_api_request_duration_seconds_count{method=\"GET\",route=\"/api/sources\",status=\"200\"} 1",
    ] {
        assert!(m.contains(want), "{want} not in\n{m}");
    }
    assert!(m.contains("ferry_source_protection_lag_seconds{source=\"web\"}"));
    // A stale report is not a live lag.
    assert!(!m.contains("ferry_source_protection_lag_seconds{source=\"ghost\"}"));

    // Without credentials, nothing.
    let resp = router(api.app.clone())
        .oneshot(Req::get("/metrics").body(HttpBody::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // A scheduled check of the repository, with nobody watching, lands
    // where `ferry check` does: in the repository view.
    let (_, r) = api.call(Method::GET, "/api/repository", None).await;
    let checks_before = r["checks"].as_array().unwrap().len();
    let (s, e) = api
        .call(
            Method::POST,
            "/api/schedules",
            Some(serde_json::json!({"name": "weekly-check", "cron": "0 4 * * 0", "job": {"check": {"read_data": true}}})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    let due = e["next_ms"].as_i64().unwrap();
    let fired = schedules::fire_due(&api.app, due).await.unwrap();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert!(fired[0].1.ends_with("started"), "{fired:?}");
    let mut outcome = String::new();
    for _ in 0..400 {
        let (_, list) = api.call(Method::GET, "/api/schedules", None).await;
        outcome = list[0]["last_outcome"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if outcome.ends_with("no damage") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(outcome.ends_with("no damage"), "{outcome}");
    let (_, r) = api.call(Method::GET, "/api/repository", None).await;
    let checks = r["checks"].as_array().unwrap();
    assert_eq!(checks.len(), checks_before + 1, "{r}");
    // Newest first: this one read the three points' data.
    assert_eq!(
        (
            &checks[0]["read_data"],
            &checks[0]["ok"],
            &checks[0]["points"]
        ),
        (
            &serde_json::json!(true),
            &serde_json::json!(true),
            &serde_json::json!(3)
        ),
        "{r}"
    );
    assert!(checks[0]["bytes_read"].as_i64() > Some(100), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_repository_or_runbooks_the_views_say_how_to_give_them() {
    let api = Api::new().await;
    let (s, e) = api.call(Method::GET, "/api/sources", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(e["error"].as_str().unwrap().contains("--repo"), "{e}");
    let (s, e) = api.call(Method::GET, "/api/runbooks", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(e["error"].as_str().unwrap().contains("--runbooks"), "{e}");
    let (s, m) = api.call(Method::GET, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(m.as_str().unwrap().contains("ferry_repository_up 0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn guessing_ones_own_current_password_is_limited_like_logins() {
    let api = Api::new().await;
    let bob = As::token(&api.user_with_token("bob", "viewer").await);
    let change = |current: &str| serde_json::json!({"current_password": current, "password": "bob's brand new password"});
    for _ in 0..5 {
        let (s, _, b) = api
            .call_as(
                &bob,
                Method::PUT,
                "/api/users/bob/password",
                Some(change("a guess at it")),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    }
    // Even the right password waits now, and so does a login.
    let (s, headers, b) = api
        .call_as(
            &bob,
            Method::PUT,
            "/api/users/bob/password",
            Some(change("bob has a long password")),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{b}");
    assert!(headers.contains_key(header::RETRY_AFTER));
    let (s, _, _) = api
        .call_as(
            &As::default(),
            Method::POST,
            "/api/login",
            Some(serde_json::json!({"name": "bob", "password": "bob has a long password"})),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(flavor = "multi_thread")]
async fn schedules_fire_once_at_their_time_whoever_else_is_looking() {
    let dir = tempfile::tempdir().unwrap();
    let books = dir.path().join("runbooks");
    std::fs::create_dir(&books).unwrap();
    std::fs::write(
        books.join("quick.yaml"),
        "name: quick\nsteps:\n  - id: pause\n    uses: wait\n    with: { duration: 10ms }\n",
    )
    .unwrap();
    std::fs::write(
        books.join("gated.yaml"),
        "name: gated\nsteps:\n  - id: ok\n    uses: approval\n",
    )
    .unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let server = |state: State| {
        AppState::new(
            state,
            None,
            None,
            TOKEN.into(),
            dir.path().to_path_buf(),
            Some(books.clone()),
        )
    };
    let api = Api {
        app: server(State::open(&url).await.unwrap()),
        _dir: tempfile::tempdir().unwrap(),
    };
    // A second server on the same state, as after a failover of the server.
    let other = server(State::open(&url).await.unwrap());

    let add = |name: &str, cron: &str, job: serde_json::Value| serde_json::json!({"name": name, "cron": cron, "job": job});
    let (s, nightly) = api
        .call(
            Method::POST,
            "/api/schedules",
            Some(add(
                "nightly",
                "0 3 * * *",
                serde_json::json!({"drill": {"path": "quick.yaml"}}),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{nightly}");
    let due = nightly["next_ms"].as_i64().unwrap();
    let at = chrono::DateTime::from_timestamp_millis(due).unwrap();
    assert_eq!(at.format("%H:%M:%S").to_string(), "03:00:00");
    assert!(due > chrono::Utc::now().timestamp_millis());
    for (body, want) in [
        (
            add("bad", "61 * * * *", serde_json::json!({"check": {}})),
            StatusCode::BAD_REQUEST,
        ),
        (
            add("bad", "* * * *", serde_json::json!({"check": {}})),
            StatusCode::BAD_REQUEST,
        ),
        (
            add("bad/name", "* * * * *", serde_json::json!({"check": {}})),
            StatusCode::BAD_REQUEST,
        ),
        (
            add(
                "bad",
                "* * * * *",
                serde_json::json!({"drill": {"path": "../x.yaml"}}),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            add("bad", "* * * * *", serde_json::json!({"backup": {}})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            add("nightly", "* * * * *", serde_json::json!({"check": {}})),
            StatusCode::CONFLICT,
        ),
    ] {
        let (s, e) = api
            .call(Method::POST, "/api/schedules", Some(body.clone()))
            .await;
        assert_eq!(s, want, "{body}: {e}");
    }

    // Not yet: nothing fires.
    assert!(
        schedules::fire_due(&api.app, due - 1)
            .await
            .unwrap()
            .is_empty()
    );
    // At its time, on two servers at once: one run.
    let (a, b) = tokio::join!(
        schedules::fire_due(&api.app, due),
        schedules::fire_due(&other, due)
    );
    let fired: Vec<_> = a.unwrap().into_iter().chain(b.unwrap()).collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    let (name, outcome) = &fired[0];
    assert_eq!(name, "nightly");
    let run = outcome.strip_prefix("run ").expect(outcome).to_owned();
    let (_, r) = api
        .call(Method::GET, &format!("/api/runs/{run}"), None)
        .await;
    assert_eq!(
        (r["mode"].as_str(), r["runbook"].as_str()),
        (Some("drill"), Some("quick"))
    );
    // The same time again: already fired.
    assert!(schedules::fire_due(&api.app, due).await.unwrap().is_empty());
    // (The drill ends first: a firing waits for the last one to end.)
    for _ in 0..200 {
        let (_, r) = api
            .call(Method::GET, &format!("/api/runs/{run}"), None)
            .await;
        if r["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Down for three days: one firing, not three, then the next 03:00.
    let later = due + 3 * 86_400_000 + 3_600_000;
    assert_eq!(schedules::fire_due(&api.app, later).await.unwrap().len(), 1);
    let (_, list) = api.call(Method::GET, "/api/schedules", None).await;
    assert_eq!(
        list[0]["next_ms"].as_i64(),
        Some(due + 4 * 86_400_000),
        "{list}"
    );
    assert_eq!(list[0]["last_fired_ms"].as_i64(), Some(later));
    assert!(
        list[0]["last_outcome"]
            .as_str()
            .unwrap()
            .starts_with("run "),
        "{list}"
    );

    // What cannot start says why, on the schedule, and the schedule moves on.
    for (name, job) in [
        (
            "gone",
            serde_json::json!({"drill": {"path": "missing.yaml"}}),
        ),
        ("check", serde_json::json!({"check": {"read_data": true}})),
    ] {
        let (s, e) = api
            .call(
                Method::POST,
                "/api/schedules",
                Some(add(name, "*/5 * * * *", job)),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{e}");
    }
    let soon = chrono::Utc::now().timestamp_millis() + 600_000;
    let fired = schedules::fire_due(&api.app, soon).await.unwrap();
    let outcome = |n: &str| fired.iter().find(|(f, _)| f == n).unwrap().1.clone();
    assert!(
        outcome("gone").contains("not started") && outcome("gone").contains("missing.yaml"),
        "{fired:?}"
    );
    assert!(
        outcome("check").contains("not started") && outcome("check").contains("no repository"),
        "{fired:?}"
    );
    let (_, list) = api.call(Method::GET, "/api/schedules", None).await;
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["check", "gone", "nightly"]);
    assert!(list[0]["next_ms"].as_i64().unwrap() > soon);

    // The audit names who added it, and the schedule as who started the run.
    let (_, audit) = api.call(Method::GET, "/api/audit", None).await;
    let audit = audit.to_string();
    assert!(
        audit.contains("schedule.add") && audit.contains("schedule:nightly"),
        "{audit}"
    );

    let (s, _) = api.call(Method::DELETE, "/api/schedules/gone", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api.call(Method::DELETE, "/api/schedules/gone", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api
        .call(Method::DELETE, "/api/schedules/nightly", None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // A firing does not pile onto the last one while it runs: a drill
    // waiting at its gate holds the next firing back, until it ends.
    let (_, g) = api
        .call(
            Method::POST,
            "/api/schedules",
            Some(add(
                "gated",
                "*/10 * * * *",
                serde_json::json!({"drill": {"path": "gated.yaml"}}),
            )),
        )
        .await;
    let t1 = g["next_ms"].as_i64().unwrap();
    let fired = schedules::fire_due(&api.app, t1).await.unwrap();
    let first = fired.iter().find(|(n, _)| n == "gated").unwrap().1.clone();
    let first = first.strip_prefix("run ").expect(&first).to_owned();
    let t2 = t1 + 600_000;
    let fired = schedules::fire_due(&api.app, t2).await.unwrap();
    let skipped = &fired.iter().find(|(n, _)| n == "gated").unwrap().1;
    assert!(
        skipped.starts_with("skipped") && skipped.contains(&first),
        "{fired:?}"
    );
    let (_, runs) = api.call(Method::GET, "/api/runs", None).await;
    let gated = |runs: &serde_json::Value| {
        runs.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["runbook"] == "gated")
            .count()
    };
    assert_eq!(gated(&runs), 1, "{runs}");
    // Still held back on the next firing (the skip names the same run).
    let fired = schedules::fire_due(&api.app, t2 + 600_000).await.unwrap();
    assert!(
        fired
            .iter()
            .any(|(n, o)| n == "gated" && o.contains(&first)),
        "{fired:?}"
    );
    api.call(
        Method::POST,
        &format!("/api/runs/{first}/approve"),
        Some(serde_json::json!({"step": "ok"})),
    )
    .await;
    for _ in 0..200 {
        let (_, r) = api
            .call(Method::GET, &format!("/api/runs/{first}"), None)
            .await;
        if r["status"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fired = schedules::fire_due(&api.app, t2 + 1_200_000).await.unwrap();
    let next = &fired.iter().find(|(n, _)| n == "gated").unwrap().1;
    assert!(
        next.starts_with("run ") && !next.contains(&first),
        "{fired:?}"
    );
    // A check still running in this server holds its schedule back too.
    api.app.busy_jobs.lock().unwrap().insert("check".into());
    let later = t2 + 3_600_000;
    let fired = schedules::fire_due(&api.app, later).await.unwrap();
    assert!(
        fired
            .iter()
            .any(|(n, o)| n == "check" && o.contains("still running")),
        "{fired:?}"
    );
    api.app.busy_jobs.lock().unwrap().clear();
    let fired = schedules::fire_due(&api.app, later + 600_000)
        .await
        .unwrap();
    assert!(
        fired
            .iter()
            .any(|(n, o)| n == "check" && o.contains("no repository")),
        "{fired:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn alertmanager_starts_one_run_per_incident_into_an_approval_gate() {
    let dir = tempfile::tempdir().unwrap();
    let books = dir.path().join("runbooks");
    std::fs::create_dir(&books).unwrap();
    std::fs::write(
        books.join("failover.yaml"),
        "name: failover\nparams:\n  site: { default: none }\nsteps:\n  - id: confirm\n    uses: approval\n  - id: go\n    uses: noop\n    needs: confirm\n",
    )
    .unwrap();
    std::fs::write(
        books.join("ungated.yaml"),
        "name: ungated\nsteps:\n  - id: go\n    uses: noop\n",
    )
    .unwrap();
    let routes = crate::alerts::Routes::parse(
        "routes.yaml",
        "routes:\n  - match: { alertname: SiteDown, site: eu }\n    runbook: failover.yaml\n    params: { site: eu }\n  - match: { alertname: DiskSlow }\n    runbook: ungated.yaml\n  - match: { alertname: Drill }\n    runbook: ungated.yaml\n    mode: drill\n",
    )
    .unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let api = Api {
        app: AppState::new(
            State::open(&url).await.unwrap(),
            None,
            None,
            TOKEN.into(),
            dir.path().to_path_buf(),
            Some(books.clone()),
        )
        .with_alert_routes(routes),
        _dir: tempfile::tempdir().unwrap(),
    };
    let am = As::token(&api.user_with_token("alertmanager", "operator").await);
    let viewer = As::token(&api.user_with_token("vera", "viewer").await);
    let note = |key: &str, status: &str, labels: serde_json::Value| {
        // As Alertmanager sends it, with fields Ferry does not read.
        serde_json::json!({"version": "4", "groupKey": key, "status": status, "receiver": "ferry",
            "groupLabels": {"alertname": labels["alertname"]}, "commonLabels": labels,
            "commonAnnotations": {}, "externalURL": "http://am", "truncatedAlerts": 0,
            "alerts": [{"status": status, "labels": labels, "annotations": {}, "startsAt": "2026-12-05T10:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": "abc"}]})
    };
    let site_down =
        serde_json::json!({"alertname": "SiteDown", "site": "eu", "severity": "critical"});
    let hook = "/api/hooks/alertmanager";

    // Only operators may start runs this way.
    let (s, _, _) = api
        .call_as(
            &viewer,
            Method::POST,
            hook,
            Some(note(
                "{}:{alertname=\"SiteDown\"}",
                "firing",
                site_down.clone(),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The first firing notification starts the run; it waits at its gate.
    let key = "{}:{alertname=\"SiteDown\"}";
    let (s, _, first) = api
        .call_as(
            &am,
            Method::POST,
            hook,
            Some(note(key, "firing", site_down.clone())),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(first["action"], "started", "{first}");
    let run = first["run"].as_str().unwrap().to_owned();
    let mut report = serde_json::Value::Null;
    for _ in 0..200 {
        (_, report) = api
            .call(Method::GET, &format!("/api/runs/{run}"), None)
            .await;
        if report["steps"][0]["status"] == "waiting" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(report["steps"][0]["status"], "waiting", "{report}");
    assert_eq!(
        (report["mode"].as_str(), report["params"]["site"].as_str()),
        (Some("run"), Some("eu"))
    );

    // Repeats, even racing each other, start nothing more.
    let (a, b) = tokio::join!(
        api.call_as(
            &am,
            Method::POST,
            hook,
            Some(note(key, "firing", site_down.clone()))
        ),
        api.call_as(
            &am,
            Method::POST,
            hook,
            Some(note(key, "firing", site_down.clone()))
        )
    );
    for (s, _, o) in [a, b] {
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            (o["action"].as_str(), o["run"].as_str()),
            (Some("already_started"), Some(run.as_str())),
            "{o}"
        );
    }
    // Resolved: closed, nothing started.
    let (_, _, o) = api
        .call_as(
            &am,
            Method::POST,
            hook,
            Some(note(key, "resolved", site_down.clone())),
        )
        .await;
    assert_eq!(
        (o["action"].as_str(), o["run"].as_str()),
        (Some("resolved"), Some(run.as_str())),
        "{o}"
    );
    let (_, _, o) = api
        .call_as(
            &am,
            Method::POST,
            hook,
            Some(note(key, "resolved", site_down.clone())),
        )
        .await;
    assert_eq!(o["action"], "resolved");
    let (_, runs) = api.call(Method::GET, "/api/runs", None).await;
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    // The same group firing again later is a new incident.
    let (_, _, again) = api
        .call_as(
            &am,
            Method::POST,
            hook,
            Some(note(key, "firing", site_down.clone())),
        )
        .await;
    assert_eq!(again["action"], "started", "{again}");
    assert_ne!(again["run"], first["run"]);

    // No route: nothing. A failover with no gate: refused, and no incident
    // kept, so a retry after the fix starts it. A drill needs no gate.
    let (s, _, o) = api
        .call_as(
            &am,
            Method::POST,
            hook,
            Some(note(
                "k2",
                "firing",
                serde_json::json!({"alertname": "Other"}),
            )),
        )
        .await;
    assert_eq!(
        (s, o["action"].as_str()),
        (StatusCode::OK, Some("ignored")),
        "{o}"
    );
    let slow = serde_json::json!({"alertname": "DiskSlow"});
    for _ in 0..2 {
        let (s, _, e) = api
            .call_as(
                &am,
                Method::POST,
                hook,
                Some(note("k3", "firing", slow.clone())),
            )
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{e}");
        assert!(e["error"].as_str().unwrap().contains("approval"), "{e}");
    }
    let (_, _, o) = api
        .call_as(
            &am,
            Method::POST,
            hook,
            Some(note(
                "k4",
                "firing",
                serde_json::json!({"alertname": "Drill"}),
            )),
        )
        .await;
    assert_eq!(o["action"], "started", "{o}");

    // Not a notification: refused.
    for bad in [
        serde_json::json!({"status": "firing"}),
        serde_json::json!({"groupKey": "", "status": "firing"}),
        serde_json::json!({"groupKey": "k", "status": "exploded"}),
    ] {
        let (s, _, _) = api
            .call_as(&am, Method::POST, hook, Some(bad.clone()))
            .await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {s}"
        );
    }

    // The audit names the token's user for each start, and the incidents.
    let (_, audit) = api.call(Method::GET, "/api/audit", None).await;
    let audit = audit.to_string();
    assert!(
        audit.contains("alert.fired") && audit.contains("alert.resolved"),
        "{audit}"
    );
}

/// A scheduled backup is an admin's to add (the server reads whatever its
/// user may), fires at its time, and its point lands in the repository; a
/// relative path or an empty disk list is refused when it is added.
#[tokio::test(flavor = "multi_thread")]
async fn scheduled_backups_are_admins_and_land_in_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let disk = dir.path().join("nas.img");
    std::fs::write(&disk, vec![7u8; 2 << 20]).unwrap();
    let pw = b"correct horse battery staple".to_vec();
    {
        let (repo_dir, pw) = (repo_dir.clone(), pw.clone());
        std::thread::spawn(move || {
            let store = ferry_connectors::store::open(repo_dir.to_str().unwrap(), true).unwrap();
            ferry_agent::Repository::init(store, &pw, Default::default()).unwrap();
        })
        .join()
        .unwrap();
    }
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let api = Api {
        app: AppState::new(
            State::open(&url).await.unwrap(),
            Some(repo_dir.display().to_string()),
            Some(Password::new(pw)),
            TOKEN.into(),
            dir.path().to_path_buf(),
            None,
        ),
        _dir: tempfile::tempdir().unwrap(),
    };
    let job = |disks: serde_json::Value| {
        serde_json::json!({"name": "nas", "cron": "0 1 * * *",
            "job": {"backup": {"source": "nas", "disks": disks}}})
    };
    let good = job(serde_json::json!([disk.display().to_string()]));
    let operator = api.user_with_token("olga", "operator").await;
    let (s, _, e) = api
        .call_as(
            &As::token(&operator),
            Method::POST,
            "/api/schedules",
            Some(good.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    for bad in [serde_json::json!([]), serde_json::json!(["nas.img"])] {
        let (s, e) = api
            .call(Method::POST, "/api/schedules", Some(job(bad)))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    }
    let (s, added) = api.call(Method::POST, "/api/schedules", Some(good)).await;
    assert_eq!(s, StatusCode::CREATED, "{added}");
    let due = added["next_ms"].as_i64().unwrap();
    let fired = schedules::fire_due(&api.app, due).await.unwrap();
    assert!(
        fired[0].1.starts_with("backup ") && fired[0].1.ends_with(" started"),
        "{fired:?}"
    );
    // It runs in the background; its outcome names the point.
    let mut outcome = String::new();
    for _ in 0..500 {
        let (_, list) = api.call(Method::GET, "/api/schedules", None).await;
        outcome = list[0]["last_outcome"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if outcome.contains("point") || outcome.contains("failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(outcome.contains(": point "), "{outcome}");
    let (_, points) = api.call(Method::GET, "/api/sources/nas/points", None).await;
    let id = points[0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{points}"));
    assert!(outcome.contains(id), "{outcome} names {id}");
}
