//! The runbook commands: schema, validate, plan, run, drill, resume, runs,
//! report, verified, approve, cancel, rollback. Thin: run control is
//! `crate::control`, shared with the API.

use crate::context::Context;
use crate::control::{self, NewRun, Request};
use crate::error::Error;
use crate::exec::Output;
use crate::report::Report;
use crate::state::{RunRow, State};
use crate::targets::Registry;
use anyhow::{Context as _, Result};
use clap::Args;
use ferry_engine::Mode;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?)
}

async fn open_state(ctx: &Context) -> Result<State> {
    State::open(&ctx.state_url).await
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Runbook files.
    #[arg(required = true)]
    pub runbooks: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub runbook: PathBuf,
    /// A param: NAME=VALUE (repeatable).
    #[arg(short, long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Which of the runbook's `targets` the steps that name none run on
    /// (default: the first): the same runbook plans for local, aws or libvirt.
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// A price table (JSON) for the cost estimate (default:
    /// `$FERRY_HOME/prices.json` if it exists, else the built-in one).
    #[arg(long, value_name = "FILE")]
    pub prices: Option<PathBuf>,
    /// Print the built-in price table (to edit and pass to --prices).
    #[arg(long)]
    pub print_prices: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    pub runbook: PathBuf,
    /// A param: NAME=VALUE (repeatable).
    #[arg(short, long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Which of the runbook's `targets` the steps that name none run on
    /// (default: the first).
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// The run's id (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    /// Where the run keeps images, consoles and pid files (default: FERRY_HOME/work/RUN).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Write the report here when the run ends (.json, .html or .xml for JUnit).
    #[arg(long = "report", value_name = "FILE")]
    pub reports: Vec<PathBuf>,
    /// Start the run and return at once (`ferry resume` or `ferry serve` drives it).
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct RunRef {
    /// A run id (or a unique prefix).
    pub run: String,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// Only this run (default: every unfinished run nobody is running).
    pub run: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// How many, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Json,
    Html,
    Junit,
    Text,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    pub run: String,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write to FILE instead of standard output.
    #[arg(short, long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    pub run: String,
    pub step: String,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    pub run: String,
    /// Queue the request and return; the process running the run (or the next `ferry resume`) does it.
    #[arg(long)]
    pub detach: bool,
}

fn load(path: &Path) -> Result<(String, String)> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::usage(format!("cannot read runbook {}: {e}", path.display())))?;
    if meta.len() > control::MAX_RUNBOOK_BYTES as u64 {
        return Err(Error::TooLarge(format!(
            "runbook {} is {} bytes; the most accepted is {}",
            path.display(),
            meta.len(),
            control::MAX_RUNBOOK_BYTES
        ))
        .into());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("cannot read runbook {}: {e}", path.display())))?;
    Ok((path.display().to_string(), text))
}

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// The schema of one stored event of a run's log instead (a declared format).
    #[arg(long)]
    pub events: bool,
}

pub fn schema(a: &SchemaArgs) -> Result<ExitCode> {
    let schema = if a.events {
        ferry_engine::schema::event_schema()
    } else {
        ferry_engine::schema::schema()
    };
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(ExitCode::SUCCESS)
}

pub fn validate(ctx: &Context, a: &ValidateArgs) -> Result<ExitCode> {
    let registry = Registry::builtin();
    let mut bad = Vec::new();
    let mut all = Vec::new();
    for f in &a.runbooks {
        let (file, text) = load(f)?;
        match control::validate(&registry, &file, &text, None) {
            Ok(rb) => {
                if !ctx.json {
                    println!("{file}: ok ({} steps)", rb.steps.len());
                }
            }
            Err(Error::Invalid(d)) => {
                if !ctx.json {
                    eprintln!("{d}");
                }
                all.extend(d.0);
                bad.push(file);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    if bad.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(Error::usage(format!(
            "{} runbook(s) have problems: {}",
            bad.len(),
            bad.join(", ")
        ))
        .into())
    }
}

#[derive(serde::Serialize)]
struct PlanOut<'a> {
    /// Step ids, wave by wave.
    waves: Vec<Vec<String>>,
    /// Steps with no earlier run on this target to learn from.
    no_history: Vec<String>,
    #[serde(flatten)]
    forecast: &'a crate::forecast::Forecast,
}

/// The history a plan learns from: none when the state does not exist yet
/// (`plan` touches nothing, and does not create it just to find that out).
pub(crate) async fn plan_history(
    ctx: &Context,
    plan: &ferry_engine::Plan,
    target: Option<&str>,
) -> Result<crate::forecast::History> {
    let url = &ctx.state_url;
    let no_state = url
        .strip_prefix("sqlite://")
        .map(|p| p.split('?').next().unwrap_or(p))
        .is_some_and(|p| !Path::new(p).exists());
    if no_state {
        return Ok(Default::default());
    }
    let state = State::open(url).await?;
    control::history(&state, plan, target).await
}

pub fn plan(ctx: &Context, a: &PlanArgs) -> Result<ExitCode> {
    if a.print_prices {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::forecast::PriceTable::default())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (file, text) = load(&a.runbook)?;
    let registry = Registry::builtin();
    let plan = control::plan(
        &registry,
        &file,
        &text,
        &control::parse_params(&a.params)?,
        a.target.as_deref(),
    )?;
    let prices = crate::forecast::PriceTable::load(a.prices.as_deref(), &ctx.home)?;
    let history = runtime()?.block_on(plan_history(ctx, &plan, a.target.as_deref()))?;
    let f = control::forecast(
        ctx,
        &registry,
        &plan,
        a.target.as_deref(),
        &history,
        &prices,
    );
    let out = PlanOut {
        waves: plan
            .waves
            .iter()
            .map(|w| w.iter().map(|&n| plan.nodes[n].id.clone()).collect())
            .collect(),
        no_history: f
            .steps
            .iter()
            .filter(|s| s.basis != crate::forecast::Basis::History)
            .map(|s| s.id.clone())
            .collect(),
        forecast: &f,
    };
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", crate::report::text::forecast(&f, &out.waves));
    println!("nothing was changed");
    Ok(ExitCode::SUCCESS)
}

pub fn run(ctx: &Context, a: &RunArgs, mode: Mode) -> Result<ExitCode> {
    let (file, text) = load(&a.runbook)?;
    let params = control::parse_params(&a.params)?;
    // Read the password now (it is kept): a wrong source fails before
    // anything is recorded.
    ctx.password_if_any()?;
    let registry = Registry::builtin();
    runtime()?.block_on(async {
        let state = open_state(ctx).await?;
        let new = NewRun {
            file,
            text,
            git_commit: control::git_commit(&a.runbook),
            params,
            target: a.target.clone(),
            mode,
            id: a.id.clone(),
            work_dir: a.work_dir.clone(),
        };
        let run = control::create_run(&state, ctx, &registry, new).await?;
        crate::auth::audit(
            &state,
            &who(),
            "run.start",
            &run.id,
            &format!("{} of {}", run.mode, run.runbook),
        )
        .await;
        if !ctx.quiet {
            eprintln!(
                "{} {} of {} started (state {}, work {})",
                run.mode, run.id, run.runbook, state.location, run.work_dir
            );
        }
        if a.detach {
            println!("{}", run.id);
            return Ok(ExitCode::SUCCESS);
        }
        drive_and_report(ctx, &state, run, &registry, &a.reports).await
    })
}

async fn drive_and_report(
    ctx: &Context,
    state: &State,
    run: RunRow,
    registry: &Registry,
    reports: &[PathBuf],
) -> Result<ExitCode> {
    let password = ctx.password_if_any()?;
    let (run, status) = control::drive(
        state,
        run,
        ctx.repo.clone(),
        password,
        registry,
        Output { lines: !ctx.quiet },
    )
    .await?;
    let report = control::report_of(state, &run).await?;
    for path in reports {
        write_report(&report, path, None)?;
    }
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !ctx.quiet {
        print!("{}", crate::report::text(&report));
    }
    Ok(if control::succeeded(status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_report(r: &Report, path: &Path, format: Option<Format>) -> Result<()> {
    let format = format.unwrap_or(match path.extension().and_then(|e| e.to_str()) {
        Some("html" | "htm") => Format::Html,
        Some("xml") => Format::Junit,
        Some("txt") => Format::Text,
        _ => Format::Json,
    });
    let body = render(r, format)?;
    std::fs::write(path, body)
        .with_context(|| format!("cannot write the report to {}", path.display()))?;
    Ok(())
}

fn render(r: &Report, format: Format) -> Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(r)? + "\n",
        Format::Html => crate::report::html(r),
        Format::Junit => crate::report::junit(r),
        Format::Text => crate::report::text(r),
    })
}

pub fn resume(ctx: &Context, a: &ResumeArgs) -> Result<ExitCode> {
    let registry = Registry::builtin();
    runtime()?.block_on(async {
        let state = open_state(ctx).await?;
        let runs = match &a.run {
            Some(id) => vec![state.find_run(id).await?],
            None => state.unfinished().await?,
        };
        if runs.is_empty() {
            eprintln!("no unfinished runs in {}", state.location);
            return Ok(ExitCode::SUCCESS);
        }
        let mut code = ExitCode::SUCCESS;
        for run in runs {
            if run.status != "running" {
                eprintln!("run {} already {}", run.id, run.status);
                continue;
            }
            if !ctx.quiet {
                eprintln!("resuming {} {} of {}", run.mode, run.id, run.runbook);
            }
            if drive_and_report(ctx, &state, run, &registry, &[]).await? != ExitCode::SUCCESS {
                code = ExitCode::FAILURE;
            }
        }
        Ok(code)
    })
}

pub fn runs(ctx: &Context, a: &RunsArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let state = open_state(ctx).await?;
        let runs = state.runs(a.limit).await?;
        if ctx.json {
            println!("{}", serde_json::to_string_pretty(&runs)?);
            return Ok(ExitCode::SUCCESS);
        }
        if runs.is_empty() {
            println!("no runs yet in {}", state.location);
        }
        for r in runs {
            let t = chrono::DateTime::from_timestamp_millis(r.created_ms)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            let took = r
                .finished_ms
                .map(|f| format!("{:.1} s", (f - r.created_ms) as f64 / 1000.0))
                .unwrap_or_default();
            println!(
                "{:<24} {t}  {:<6} {:<12} {:<20} {took}",
                r.id, r.mode, r.status, r.runbook
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn report(ctx: &Context, a: &ReportArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let state = open_state(ctx).await?;
        let r = control::report(&state, &a.run).await?;
        let format = if ctx.json { Format::Json } else { a.format };
        match &a.out {
            Some(p) => write_report(&r, p, Some(format))?,
            None => print!("{}", render(&r, format)?),
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn verified(ctx: &Context) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let state = open_state(ctx).await?;
        let v = state.verified().await?;
        if ctx.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
        if v.is_empty() {
            println!("no point has been proved by a drill yet");
        }
        for x in v {
            let at = chrono::DateTime::from_timestamp_millis(x.at_ms)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            println!(
                "{:<16} {}  taken {}  proved by drill {} at {at}",
                x.source,
                &x.point[..x.point.len().min(12)],
                x.point_time,
                x.run_id
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Debug, Args)]
pub struct SourcesArgs {
    /// A directory of runbooks whose `objectives: rpo` the sources are
    /// measured against (the sources each runbook's restores read).
    #[arg(long, env = "FERRY_RUNBOOKS", value_name = "DIR")]
    pub runbooks: Option<PathBuf>,
}

pub fn sources(ctx: &Context, a: &SourcesArgs) -> Result<ExitCode> {
    ctx.password(false)?;
    let objectives = match &a.runbooks {
        Some(dir) => crate::inventory::runbooks::list(&Registry::builtin(), dir)?.rpo_objectives(),
        None => Default::default(),
    };
    runtime()?.block_on(async {
        let state = open_state(ctx).await?;
        let inv = crate::inventory::Inventory::new(ctx.clone());
        let sources = inv.sources(&state, &objectives).await?;
        if ctx.json {
            println!("{}", serde_json::to_string_pretty(&sources)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:<20} {:>6} {:<20} {:>10} {:>10} {:>10}  status",
            "source", "points", "newest (UTC)", "age", "lag", "objective"
        );
        let secs = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.0} s"));
        for s in &sources {
            println!(
                "{:<20} {:>6} {:<20} {:>10} {:>10} {:>10}  {}",
                s.source,
                s.points,
                s.last_point_time.map_or("-".to_owned(), |t| t
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()),
                secs(s.last_point_age_secs),
                secs(s.protection.as_ref().and_then(|p| p.lag_secs)),
                secs(s.rpo_objective_secs),
                serde_json::to_value(s.rpo_status)?
                    .as_str()
                    .unwrap_or_default()
            );
            for alert in &s.alerts {
                println!("  ! {alert}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Who asks, as the run's log records it: the local user.
fn who() -> String {
    crate::auth::cli_actor()
}

pub fn approve(ctx: &Context, a: &ApproveArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let state = open_state(ctx).await?;
        let run = control::request(
            &state,
            &a.run,
            Request::Approve {
                step: a.step.clone(),
            },
            &who(),
        )
        .await?;
        println!(
            "approved {} of run {}{}",
            a.step,
            run.id,
            if control::is_driven(&run) {
                ""
            } else {
                "; nobody is running it: `ferry resume` continues it"
            }
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn cancel(ctx: &Context, a: &RunRef) -> Result<ExitCode> {
    stop(ctx, &a.run, Request::Cancel, false)
}

pub fn rollback(ctx: &Context, a: &RollbackArgs) -> Result<ExitCode> {
    stop(ctx, &a.run, Request::Rollback, a.detach)
}

/// Queues a cancel or rollback; if no live process drives the run, drives it here.
fn stop(ctx: &Context, id: &str, req: Request, detach: bool) -> Result<ExitCode> {
    let registry = Registry::builtin();
    runtime()?.block_on(async {
        let state = open_state(ctx).await?;
        let run = control::request(&state, id, req, &who()).await?;
        if detach || control::is_driven(&run) {
            println!("requested; the process running {} acts on it", run.id);
            return Ok(ExitCode::SUCCESS);
        }
        drive_and_report(ctx, &state, run, &registry, &[]).await
    })
}
