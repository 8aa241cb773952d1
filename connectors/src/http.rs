//! The HTTP client under every `object_store` cloud client (S3, GCS, Azure):
//! `object_store`'s own retries turned off, and failures given typed causes.
//!
//! Ferry's `Store` retries every request itself (one retry layer, with its own
//! bounds and counters), so `object_store`'s `RetryConfig` is set to zero retries.
//! Without its retries `object_store` hands a throttled or failed request back as
//! its catch-all `Generic` error, whose only trace of the status is text. This
//! client puts the facts in the cause chain instead: a 408, 429 or 5xx answer
//! becomes a [`ServerAnswer`] with its status, and a request or body that got no
//! complete answer a [`NoAnswer`] around the transport error, so that
//! `ferry_agent::store::retry_of` decides by type.

use std::time::Duration;

use async_trait::async_trait;
use ferry_agent::store::{NoAnswer, ServerAnswer};
use http_body_util::BodyExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
    ReqwestConnector,
};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

/// `object_store` must not retry: Ferry's `Store` does.
pub fn no_retries() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 0,
        retry_timeout: Duration::ZERO,
    }
}

/// Builds the reqwest client `object_store` would, wrapped in [`Typed`].
#[derive(Debug)]
pub struct TypedConnector {
    /// Which service this client talks to, for messages.
    pub store: &'static str,
}

impl HttpConnector for TypedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Typed {
            store: self.store,
            inner,
        }))
    }
}

/// An [`HttpService`] that turns retryable statuses and transport failures into
/// typed errors (see the module's documentation).
#[derive(Debug)]
struct Typed {
    store: &'static str,
    inner: HttpClient,
}

/// Whether a status is one `object_store` would have retried, and Ferry retries.
fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || (500..600).contains(&status) && status != 501
}

#[async_trait]
impl HttpService for Typed {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let store = self.store;
        let response = self.inner.execute(req).await.map_err(|e| {
            let kind = e.kind();
            HttpError::new(
                kind,
                NoAnswer {
                    store,
                    source: Box::new(e),
                },
            )
        })?;
        let status = response.status().as_u16();
        if retryable_status(status) {
            // The error code is in the body (S3's `<Code>SlowDown</Code>`); it is
            // kept for the message only, the status decides.
            let body = response.into_body().collect().await.map(|b| b.to_bytes());
            let code = body.ok().and_then(|b| error_code(&b)).unwrap_or_default();
            return Err(HttpError::new(
                object_store::client::HttpErrorKind::Request,
                ServerAnswer {
                    store,
                    status,
                    code,
                },
            ));
        }
        let (parts, body) = response.into_parts();
        let body = body.map_err(move |e| {
            let kind = e.kind();
            HttpError::new(
                kind,
                NoAnswer {
                    store,
                    source: Box::new(e),
                },
            )
        });
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// The `<Code>` of an S3 or Azure XML error body, or GCS's JSON `"status"`.
fn error_code(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let end = start + text[start..].find("</Code>")?;
    Some(text[start..end].chars().take(64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_worth_a_retry() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [200, 206, 301, 400, 401, 403, 404, 409, 412, 416, 501] {
            assert!(!retryable_status(s), "{s}");
        }
    }

    #[test]
    fn error_codes_are_read_from_xml_bodies() {
        let body =
            b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Reduce</Message></Error>";
        assert_eq!(error_code(body).as_deref(), Some("SlowDown"));
        assert_eq!(error_code(b"{}"), None);
    }
}
