//! `ferry serve` and `ferry openapi`: the HTTP API on 127.0.0.1 unless told
//! otherwise. Runs whose process died are driven again at start.

use crate::api::{self, AppState};
use crate::context::Context;
use crate::state::State;
use anyhow::{Context as _, Result};
use axum::Router;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub listen: String,
    /// A directory of runbooks (normally a git checkout) the console and
    /// `GET /api/runbooks` show, and runs may start from by name.
    #[arg(long, env = "FERRY_RUNBOOKS", value_name = "DIR")]
    pub runbooks: Option<std::path::PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM). Session cookies are
    /// then `Secure`.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Accept only clients with a certificate this CA signed (PEM): mutual
    /// TLS, on top of tokens and sessions.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Alertmanager routes: which alert labels start which runbook of
    /// --runbooks, through `POST /api/hooks/alertmanager` (YAML; see
    /// ARCHITECTURE.md).
    #[arg(
        long,
        env = "FERRY_ALERT_ROUTES",
        value_name = "FILE",
        requires = "runbooks"
    )]
    pub alert_routes: Option<PathBuf>,
}

pub fn print_openapi() -> Result<ExitCode> {
    println!("{}", api::openapi_json());
    Ok(ExitCode::SUCCESS)
}

pub fn serve(ctx: &Context, a: &ServeArgs) -> Result<ExitCode> {
    let password = ctx.password_if_any()?;
    // Bad credentials stop the server before it listens, with the file named.
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => {
            let files = ferry_connectors::nbd::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: a.tls_client_ca.clone(),
            };
            let mut config = (*files.server_config()?).clone();
            // The API speaks HTTP/1.1 (its event streams too).
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(config))
        }
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let state = State::open(&ctx.state_url).await?;
        if let Some(dir) = &a.runbooks
            && !dir.is_dir()
        {
            return Err(crate::error::Error::usage(format!(
                "--runbooks {}: not a directory",
                dir.display()
            ))
            .into());
        }
        let mut app = AppState::new(
            state.clone(),
            ctx.repo.clone(),
            password,
            api::load_or_create_token(&ctx.home)?,
            ctx.home.clone(),
            a.runbooks.clone(),
        );
        if let Some(file) = &a.alert_routes {
            app = app.with_alert_routes(crate::alerts::Routes::load(file)?);
        }
        // Continue runs whose process died. One that cannot even be planned
        // any more fails on its own; the server stays up.
        for run in crate::control::orphans(&state).await? {
            eprintln!("resuming {} {} of {}", run.mode, run.id, run.runbook);
            api::spawn_run(&app, run);
        }
        // Schedules fire from any server on this state; each firing once.
        api::schedules::spawn_scheduler(&app);
        let inventory = app.inventory.clone();
        tokio::spawn(async move {
            let took = inventory.warm().await;
            tracing::info!("repository read in {:.1} s", took.as_secs_f64());
        });
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && tls.is_none() {
            eprintln!(
                "ferry serve: warning: listening on {addr} without TLS: passwords, tokens and session cookies cross the network in clear; give --tls-cert and --tls-key, or put a TLS proxy in front"
            );
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let token_file = ctx.home.join("api-token");
        if ctx.json {
            println!(
                "{}",
                serde_json::json!({"url": format!("{scheme}://{addr}"), "token_file": token_file})
            );
        } else {
            eprintln!(
                "ferry serve: console {scheme}://{addr}/, API {scheme}://{addr}/api (state {}; token in {})",
                state.location,
                token_file.display()
            );
        }
        let router = api::router(app).merge(ferry_web::router());
        match tls {
            Some(config) => serve_tls(listener, router, config).await,
            // Each connection's address: the login rate limit counts per client.
            None => axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(anyhow::Error::from),
        }?;
        Ok(ExitCode::SUCCESS)
    })
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTPS: each connection's handshake, then HTTP/1.1 over it, with the
/// client's address and the fact of TLS in every request's extensions (the
/// login rate limit counts per address; the session cookie is `Secure`).
/// Stops accepting at Ctrl-C.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                // Out of descriptors, or a connection reset before accept:
                // the server stays up.
                Err(e) => {
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => return Ok(()),
        };
        let (acceptor, app) = (
            acceptor.clone(),
            router
                .clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer)))
                .layer(axum::Extension(api::OverTls)),
        );
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}
