//! `ferry serve` and `ferry openapi`: the HTTP API on 127.0.0.1 unless told
//! otherwise. Runs whose process died are driven again at start.

use crate::api::{self, AppState};
use crate::context::Context;
use crate::state::State;
use crate::targets::Registry;
use anyhow::{Context as _, Result};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub listen: String,
}

pub fn print_openapi() -> Result<ExitCode> {
    println!("{}", api::openapi_json());
    Ok(ExitCode::SUCCESS)
}

pub fn serve(ctx: &Context, a: &ServeArgs) -> Result<ExitCode> {
    let password = ctx.password_if_any()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let state = State::open(&ctx.state_url).await?;
        let app = AppState {
            state: state.clone(),
            repo: ctx.repo.clone(),
            password,
            token: Arc::new(api::load_or_create_token(&ctx.home)?),
            limiter: Arc::new(crate::auth::LoginLimiter::default()),
            registry: Arc::new(Registry::builtin()),
            home: ctx.home.clone(),
        };
        // Continue runs whose process died. One that cannot even be planned
        // any more fails on its own; the server stays up.
        for run in crate::control::orphans(&state).await? {
            eprintln!("resuming {} {} of {}", run.mode, run.id, run.runbook);
            api::spawn_run(&app, run);
        }
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let addr = listener.local_addr()?;
        let token_file = ctx.home.join("api-token");
        if ctx.json {
            println!(
                "{}",
                serde_json::json!({"url": format!("http://{addr}"), "token_file": token_file})
            );
        } else {
            eprintln!(
                "ferry serve: http://{addr}/api (state {}; token in {})",
                state.location,
                token_file.display()
            );
        }
        // Each connection's address: the login rate limit counts per client.
        axum::serve(
            listener,
            api::router(app).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(ExitCode::SUCCESS)
    })
}
