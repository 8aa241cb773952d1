//! Ferry's web console: a page, a script and a style sheet, compiled into
//! the binary (`include_str!`), so `cargo build` alone makes a `ferry` whose
//! `ferry serve` shows the console, with nothing fetched from elsewhere (no
//! CDN, no web font).
//!
//! The console is a client of the public API: it signs in with `POST
//! /api/login` (an HttpOnly, SameSite=Strict session cookie), reads every
//! datum from `/api/...` and sends the session's CSRF token on every change.
//! The assets hold no data, so they are served without authentication; the
//! API decides what each role may see and do.
//!
//! Every response carries a Content Security Policy that allows only this
//! origin's script and style (no inline script, no `eval`), so text that
//! comes from runbooks, runs or users can never run as code; the script
//! builds the page with DOM calls and `textContent`, never from HTML strings.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::OnceLock;

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("../assets/index.html"),
    content_type: "text/html; charset=utf-8",
};
const SCRIPT: Asset = Asset {
    body: include_str!("../assets/console.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE: Asset = Asset {
    body: include_str!("../assets/console.css"),
    content_type: "text/css; charset=utf-8",
};
const ICON: Asset = Asset {
    body: include_str!("../assets/icon.svg"),
    content_type: "image/svg+xml",
};

/// What a page of the console may load and do: only this origin's files and
/// API; no inline script, no framing by other sites.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The assets' strong validator: a hash of all of them, so one changed
/// file invalidates every cached copy.
fn etag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let mut h = blake3::Hasher::new();
        for a in [&INDEX, &SCRIPT, &STYLE, &ICON] {
            h.update(a.body.as_bytes());
        }
        format!("\"{}\"", &h.finalize().to_hex()[..20])
    })
}

fn serve(asset: &'static Asset, req: &HeaderMap) -> Response {
    let tag = etag();
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(tag));
    // Revalidated on every load: a new ferry's console is used at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// The console's routes: `/` (the page) and `/console/*` (its files). Merge
/// into the API's router; the console's views live behind `#/...` in the
/// page, so no other path is needed.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route(
            "/console/console.js",
            get(|h: HeaderMap| async move { serve(&SCRIPT, &h) }),
        )
        .route(
            "/console/console.css",
            get(|h: HeaderMap| async move { serve(&STYLE, &h) }),
        )
        .route(
            "/console/icon.svg",
            get(|h: HeaderMap| async move { serve(&ICON, &h) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, etag: Option<&str>) -> Response {
        let mut req = Request::get(path);
        if let Some(t) = etag {
            req = req.header(header::IF_NONE_MATCH, t);
        }
        router::<()>()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn assets_are_served_with_a_strict_policy_and_revalidated() {
        let page = get("/", None).await;
        assert_eq!(page.status(), StatusCode::OK);
        let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"));
        let tag = page.headers()[header::ETAG].to_str().unwrap().to_owned();
        assert_eq!(
            get("/console/console.js", Some(&tag)).await.status(),
            StatusCode::NOT_MODIFIED
        );
        let js = get("/console/console.js", None).await;
        assert_eq!(
            js.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_runs_no_inline_script() {
        for a in [&INDEX, &SCRIPT, &STYLE, &ICON] {
            for bad in ["http://", "https://", "//cdn", "@import", "url(http"] {
                // The SVG namespace is an identifier, not a fetch.
                let body = a.body.replace("http://www.w3.org/2000/svg", "");
                assert!(!body.contains(bad), "an asset names {bad}");
            }
        }
        assert!(!INDEX.body.contains("<script>") && !INDEX.body.contains("style="));
        // No inline event handler (`onload=`, `onclick=`...) anywhere in the page.
        for (i, _) in INDEX.body.match_indices(" on") {
            let word: String = INDEX.body[i + 3..]
                .chars()
                .take_while(char::is_ascii_alphabetic)
                .collect();
            assert!(
                !INDEX.body[i + 3 + word.len()..].starts_with('='),
                "inline handler on{word}"
            );
        }
        assert!(!SCRIPT.body.contains("innerHTML") && !SCRIPT.body.contains("eval("));
    }
}
