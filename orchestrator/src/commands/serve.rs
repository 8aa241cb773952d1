//! `ferry serve` and `ferry openapi`: the HTTP API on 127.0.0.1 unless told
//! otherwise. Runs whose process died are driven again at start.

use crate::api::{self, AppState};
use crate::context::Context;
use crate::state::State;
use anyhow::{Context as _, Result};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub listen: String,
    /// A directory of runbooks (normally a git checkout) the console and
    /// `GET /api/runbooks` show, and runs may start from by name.
    #[arg(long, env = "FERRY_RUNBOOKS", value_name = "DIR")]
    pub runbooks: Option<std::path::PathBuf>,
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
        if let Some(dir) = &a.runbooks
            && !dir.is_dir()
        {
            return Err(crate::error::Error::usage(format!(
                "--runbooks {}: not a directory",
                dir.display()
            ))
            .into());
        }
        let app = AppState::new(
            state.clone(),
            ctx.repo.clone(),
            password,
            api::load_or_create_token(&ctx.home)?,
            ctx.home.clone(),
            a.runbooks.clone(),
        );
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
                "ferry serve: console http://{addr}/, API http://{addr}/api (state {}; token in {})",
                state.location,
                token_file.display()
            );
        }
        // Each connection's address: the login rate limit counts per client.
        axum::serve(
            listener,
            api::router(app)
                .merge(ferry_web::router())
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(ExitCode::SUCCESS)
    })
}
