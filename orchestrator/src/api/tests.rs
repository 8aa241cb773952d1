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
            app: AppState {
                state,
                repo: None,
                password: None,
                token: Arc::new(TOKEN.into()),
                registry: Arc::new(Registry::builtin()),
                home: dir.path().to_path_buf(),
            },
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
