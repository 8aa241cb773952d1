//! The runbook commands: schema, validate, plan, run, drill, resume, runs,
//! report, approve, cancel, rollback.

use crate::cli::{Global, UsageError};
use crate::exec::{self, Output, Runner};
use crate::state::{Command, RunRow, State};
use anyhow::{Context, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Where Ferry keeps its state and work files: $FERRY_HOME, else
/// $XDG_CONFIG_HOME/ferry, else ~/.config/ferry.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("FERRY_HOME") {
        return h.into();
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(x).join("ferry");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".config/ferry")
}

pub fn state_url(g: &Global) -> String {
    g.state
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", home().join("state.db").display()))
}

pub async fn open_state(g: &Global) -> Result<State> {
    State::open(&state_url(g)).await
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?)
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
}

#[derive(Debug, Args)]
pub struct RunArgs {
    pub runbook: PathBuf,
    /// A param: NAME=VALUE (repeatable).
    #[arg(short, long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
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

fn parse_params(raw: &[String]) -> Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
                .ok_or_else(|| UsageError(format!("--param {p}: write NAME=VALUE")).into())
        })
        .collect()
}

fn load(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read runbook {}: {e}", path.display())))?;
    Ok((path.display().to_string(), text))
}

fn validate_text(file: &str, text: &str) -> Result<ferry_engine::Runbook> {
    ferry_engine::parse(file, text).map_err(|d| UsageError(d.to_string()).into())
}

pub fn schema() -> Result<ExitCode> {
    println!(
        "{}",
        serde_json::to_string_pretty(&ferry_engine::schema::schema())?
    );
    Ok(ExitCode::SUCCESS)
}

pub fn validate(g: &Global, a: &ValidateArgs) -> Result<ExitCode> {
    let mut bad = Vec::new();
    let mut all = Vec::new();
    for f in &a.runbooks {
        let (file, text) = load(f)?;
        match ferry_engine::parse(&file, &text) {
            Ok(rb) => {
                if !g.json {
                    println!("{file}: ok ({} steps)", rb.steps.len());
                }
            }
            Err(d) => {
                if !g.json {
                    eprintln!("{d}");
                }
                all.extend(d.0.clone());
                bad.push(file);
            }
        }
    }
    if g.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    if bad.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(UsageError(format!(
            "{} runbook(s) have problems: {}",
            bad.len(),
            bad.join(", ")
        ))
        .into())
    }
}

/// `git rev-parse HEAD` of the checkout holding `path`, with `-dirty` if the
/// file has uncommitted changes.
fn git_commit(path: &Path) -> Option<String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let name = path.file_name()?;
    let dirty = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--"])
        .arg(name)
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

fn new_run_id() -> String {
    let mut b = [0u8; 3];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%d-%H%M%S"),
        hex::encode(b)
    )
}

/// The password for actions that read the repository, if one is set; runs
/// without a repository need none.
fn password_if_any(g: &Global) -> Result<Option<Arc<Vec<u8>>>> {
    if g.repo.is_none() && g.password_file.is_none() && std::env::var_os("FERRY_PASSWORD").is_none()
    {
        return Ok(None);
    }
    Ok(crate::cli::password_quiet(g)?.map(Arc::new))
}

#[derive(serde::Serialize)]
struct PlanOut {
    runbook: String,
    waves: Vec<Vec<PlanStep>>,
    predicted_rto_secs: Option<f64>,
    rto_objective_secs: Option<f64>,
    history_runs: usize,
    /// Steps that never finished in past runs (skipped or new): counted as 0 s.
    no_history: Vec<String>,
}

#[derive(serde::Serialize)]
struct PlanStep {
    id: String,
    uses: String,
    needs: Vec<String>,
    predicted_secs: Option<f64>,
    /// For volume.restore: the recovery point it will use (if the repository can be read).
    point: Option<serde_json::Value>,
    condition: Option<String>,
}

pub fn plan(g: &Global, a: &PlanArgs) -> Result<ExitCode> {
    let (file, text) = load(&a.runbook)?;
    let rb = validate_text(&file, &text)?;
    let plan = ferry_engine::plan(rb, &parse_params(&a.params)?).map_err(UsageError)?;
    let rt = runtime()?;
    // `plan` touches nothing: a SQLite state that does not exist yet has no
    // history, and is not created just to find that out.
    let url = state_url(g);
    let no_state = url
        .strip_prefix("sqlite://")
        .map(|p| p.split('?').next().unwrap_or(p))
        .is_some_and(|p| !Path::new(p).exists());
    let history = if no_state {
        Default::default()
    } else {
        rt.block_on(async {
            let state = State::open(&url).await?;
            state.step_history(&plan.runbook.name, 10).await
        })?
    };
    let history_runs = history.values().map(Vec::len).max().unwrap_or(0);
    let predict = |id: &str| -> Option<f64> {
        let v = history.get(id)?;
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    // Recovery points: resolved read-only, only when a repository is given.
    let repo = if g.repo.is_some() {
        crate::cli::open(g).ok()
    } else {
        None
    };
    let mut finish = vec![0.0f64; plan.nodes.len()];
    let known = history_runs > 0;
    let mut unknown_steps = Vec::new();
    for &n in &plan.order {
        let p = predict(&plan.nodes[n].id);
        if p.is_none() {
            unknown_steps.push(plan.nodes[n].id.clone());
        }
        let start = plan.deps(n).map(|d| finish[d]).fold(0.0, f64::max);
        finish[n] = start + p.unwrap_or(0.0);
    }
    let engine = ferry_engine::Engine::new(
        Arc::new(plan.clone()),
        ferry_engine::Mode::Run,
        serde_json::Map::new(),
    );
    let waves: Vec<Vec<PlanStep>> = plan
        .waves
        .iter()
        .map(|w| {
            w.iter()
                .map(|&n| {
                    let step = plan.step_of(n);
                    let point = (step.uses == "volume.restore").then(|| {
                        let reference = engine.inputs(n).ok().and_then(|i| i.get("point").cloned()).map(|v| ferry_engine::expr::to_text(&v));
                        match (&repo, reference) {
                            (Some(r), Some(reference)) => match r.resolve(&reference) {
                                Ok(p) => serde_json::json!({"ref": reference, "id": p.id, "time": p.meta.time.to_rfc3339(),
                                    "age_secs": (chrono::Utc::now() - p.meta.time).num_milliseconds() as f64 / 1000.0}),
                                Err(e) => serde_json::json!({"ref": reference, "error": e.to_string()}),
                            },
                            (None, Some(reference)) => serde_json::json!({"ref": reference, "error": "no repository given (-r)"}),
                            (_, None) => serde_json::json!({"error": "the point depends on another step's output"}),
                        }
                    });
                    PlanStep {
                        id: plan.nodes[n].id.clone(),
                        uses: step.uses.clone(),
                        needs: plan.deps(n).map(|d| plan.nodes[d].id.clone()).collect(),
                        predicted_secs: predict(&plan.nodes[n].id),
                        point,
                        condition: step.cond.clone(),
                    }
                })
                .collect()
        })
        .collect();
    let out = PlanOut {
        runbook: plan.runbook.name.clone(),
        waves,
        predicted_rto_secs: known.then(|| finish.iter().copied().fold(0.0, f64::max)),
        rto_objective_secs: plan.runbook.objectives.rto_secs,
        history_runs,
        no_history: if known { unknown_steps } else { Vec::new() },
    };
    if g.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "plan for {} ({}): {} steps in {} waves",
        out.runbook,
        file,
        plan.nodes.len(),
        out.waves.len()
    );
    for (i, w) in out.waves.iter().enumerate() {
        println!("wave {}:", i + 1);
        for s in w {
            let pred = s
                .predicted_secs
                .map(|p| format!("  ~{p:.1} s"))
                .unwrap_or_default();
            let cond = s
                .condition
                .as_deref()
                .map(|c| format!("  if {c}"))
                .unwrap_or_default();
            println!("  {:<24} {:<16}{pred}{cond}", s.id, s.uses);
            if let Some(p) = &s.point {
                match (p.get("id"), p.get("error")) {
                    (Some(id), _) => println!(
                        "      point {} = {} taken {} ({:.0} s ago)",
                        p["ref"].as_str().unwrap_or(""),
                        &id.as_str().unwrap_or("")[..12.min(id.as_str().unwrap_or("").len())],
                        p["time"].as_str().unwrap_or(""),
                        p["age_secs"].as_f64().unwrap_or(0.0)
                    ),
                    (_, Some(e)) => println!(
                        "      point {}: {}",
                        p.get("ref").and_then(|r| r.as_str()).unwrap_or("?"),
                        e.as_str().unwrap_or("")
                    ),
                    _ => {}
                }
            }
        }
    }
    match out.predicted_rto_secs {
        Some(p) => println!(
            "predicted RTO: {p:.1} s (median of the last {} runs per step)",
            out.history_runs
        ),
        None => println!(
            "predicted RTO: unknown (no finished runs of {} yet)",
            out.runbook
        ),
    }
    if let Some(o) = out.rto_objective_secs {
        println!("RTO objective: {o:.0} s");
    }
    println!("nothing was changed");
    Ok(ExitCode::SUCCESS)
}

/// A run to create.
#[derive(Debug, Default)]
pub struct NewRun<'a> {
    pub file: &'a str,
    pub text: &'a str,
    /// The runbook file, for its git commit.
    pub path: Option<&'a Path>,
    pub params: BTreeMap<String, String>,
    pub mode: &'a str,
    pub id: Option<String>,
    pub work_dir: Option<PathBuf>,
}

/// Creates a run of a runbook in the state and returns it.
pub async fn create_run(state: &State, g: &Global, new: NewRun<'_>) -> Result<RunRow> {
    let NewRun {
        file,
        text,
        path,
        params,
        mode,
        id,
        work_dir,
    } = new;
    let rb = validate_text(file, text)?;
    // Params are checked now, not when the run is resumed.
    ferry_engine::plan(rb.clone(), &params).map_err(UsageError)?;
    let id = id.unwrap_or_else(new_run_id);
    let work_dir = work_dir.unwrap_or_else(|| home().join("work").join(&id));
    let work_dir = std::path::absolute(&work_dir).unwrap_or(work_dir);
    let run = RunRow {
        id,
        runbook: rb.name.clone(),
        file: file.to_owned(),
        source: text.to_owned(),
        params,
        mode: mode.to_owned(),
        status: "running".into(),
        git_commit: path.and_then(git_commit),
        repo: g.repo.clone(),
        work_dir: work_dir.display().to_string(),
        created_ms: exec::now_ms(),
        finished_ms: None,
        owner: None,
        lease_ms: None,
    };
    state.create_run(&run).await?;
    Ok(run)
}

pub fn run(g: &Global, a: &RunArgs, mode: &str) -> Result<ExitCode> {
    let (file, text) = load(&a.runbook)?;
    let params = parse_params(&a.params)?;
    let password = password_if_any(g)?;
    let rt = runtime()?;
    rt.block_on(async {
        let state = open_state(g).await?;
        let new = NewRun {
            file: &file,
            text: &text,
            path: Some(&a.runbook),
            params,
            mode,
            id: a.id.clone(),
            work_dir: a.work_dir.clone(),
        };
        let run = create_run(&state, g, new).await?;
        if !g.quiet {
            eprintln!(
                "{mode} {} of {} started (state {}, work {})",
                run.id, run.runbook, state.location, run.work_dir
            );
        }
        if a.detach {
            println!("{}", run.id);
            return Ok(ExitCode::SUCCESS);
        }
        drive_and_report(g, state, run, password, &a.reports).await
    })
}

async fn drive_and_report(
    g: &Global,
    state: State,
    run: RunRow,
    password: Option<Arc<Vec<u8>>>,
    reports: &[PathBuf],
) -> Result<ExitCode> {
    let runner = Runner::claim(
        state.clone(),
        run,
        g.repo.clone(),
        password,
        Output { lines: !g.quiet },
    )
    .await?;
    let (run, status) = runner.drive().await?;
    let log = state.events(&run.id).await?;
    let engine = exec::rebuild(&run, &log)?;
    let report = crate::report::build(&run, &log, &engine);
    for path in reports {
        write_report(&report, path, None)?;
    }
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !g.quiet {
        print_text(&report);
    }
    Ok(
        if status == ferry_engine::RunStatus::Succeeded
            || status == ferry_engine::RunStatus::RolledBack
        {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn write_report(r: &crate::report::Report, path: &Path, format: Option<Format>) -> Result<()> {
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

fn render(r: &crate::report::Report, format: Format) -> Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(r)? + "\n",
        Format::Html => crate::report::html(r),
        Format::Junit => crate::report::junit(r),
        Format::Text => text(r),
    })
}

fn text(r: &crate::report::Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{} {} of {}: {}", r.mode, r.run, r.runbook, r.status);
    if let Some(c) = &r.git_commit {
        let _ = writeln!(s, "  runbook {} at git commit {c}", r.file);
    }
    let verdict = |m: Option<bool>| match m {
        Some(true) => " (met)",
        Some(false) => " (MISSED)",
        None => "",
    };
    match r.rto_secs {
        Some(rto) => {
            let _ = writeln!(
                s,
                "  RTO {rto:.2} s{}{}",
                r.rto_objective_secs
                    .map(|o| format!(", objective {o:.0} s"))
                    .unwrap_or_default(),
                verdict(r.rto_met)
            );
        }
        None => {
            let _ = writeln!(s, "  RTO not reached (the stack was not verified)");
        }
    }
    for p in &r.points {
        let _ = writeln!(
            s,
            "  RPO {:.1} s{}{}: point {} of {} taken {}",
            p.rpo_secs,
            p.objective_secs
                .map(|o| format!(", objective {o:.0} s"))
                .unwrap_or_default(),
            verdict(p.met),
            &p.point[..p.point.len().min(12)],
            p.source,
            p.point_time
        );
    }
    let _ = writeln!(
        s,
        "  checks: {} passed, {} failed",
        r.checks_passed, r.checks_failed
    );
    let _ = writeln!(
        s,
        "  {:<22} {:<16} {:<10} {:>8} {:>9}",
        "step", "action", "status", "start", "duration"
    );
    for st in &r.steps {
        let _ = writeln!(
            s,
            "  {:<22} {:<16} {:<10} {:>8} {:>9}{}{}",
            format!("{}{}", st.id, if st.critical { " *" } else { "" }),
            st.uses,
            st.status,
            st.start_secs
                .map(|v| format!("{v:.2}s"))
                .unwrap_or_default(),
            st.duration_secs
                .map(|v| format!("{v:.2}s"))
                .unwrap_or_default(),
            st.undo
                .as_deref()
                .map(|u| format!("  [{u}]"))
                .unwrap_or_default(),
            st.error
                .as_deref()
                .map(|e| format!("\n      {e}"))
                .unwrap_or_default()
        );
    }
    if !r.critical_path.is_empty() {
        let sum: f64 = r
            .critical_path
            .iter()
            .map(|c| c.wait_secs + c.duration_secs)
            .sum();
        let waits: f64 = r.critical_path.iter().map(|c| c.wait_secs).sum();
        let _ = writeln!(
            s,
            "  critical path (*): {} = {sum:.2} s ({waits:.3} s of it scheduling)",
            r.critical_path
                .iter()
                .map(|c| format!("{} {:.2}s", c.id, c.duration_secs))
                .collect::<Vec<_>>()
                .join(" + ")
        );
    }
    if let Some(t) = r.teardown_secs {
        let _ = writeln!(
            s,
            "  teardown {t:.2} s{}",
            if r.left_behind.is_empty() {
                String::new()
            } else {
                format!("; LEFT BEHIND: {}", r.left_behind.join(", "))
            }
        );
    }
    s
}

fn print_text(r: &crate::report::Report) {
    print!("{}", text(r));
}

pub fn resume(g: &Global, a: &ResumeArgs) -> Result<ExitCode> {
    let password = password_if_any(g)?;
    let rt = runtime()?;
    rt.block_on(async {
        let state = open_state(g).await?;
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
            if !g.quiet {
                eprintln!("resuming {} {} of {}", run.mode, run.id, run.runbook);
            }
            if drive_and_report(g, state.clone(), run, password.clone(), &[]).await?
                != ExitCode::SUCCESS
            {
                code = ExitCode::FAILURE;
            }
        }
        Ok(code)
    })
}

pub fn runs(g: &Global, a: &RunsArgs) -> Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let state = open_state(g).await?;
        let runs = state.runs(a.limit).await?;
        if g.json {
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

pub fn report(g: &Global, a: &ReportArgs) -> Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let state = open_state(g).await?;
        let run = state.find_run(&a.run).await?;
        let log = state.events(&run.id).await?;
        let engine = exec::rebuild(&run, &log)?;
        let r = crate::report::build(&run, &log, &engine);
        let format = if g.json { Format::Json } else { a.format };
        match &a.out {
            Some(p) => write_report(&r, p, Some(format))?,
            None => print!("{}", render(&r, format)?),
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn verified(g: &Global) -> Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let state = open_state(g).await?;
        let v = state.verified().await?;
        if g.json {
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

fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user} (cli)")
}

async fn queue(state: &State, run: &RunRow, cmd: Command) -> Result<()> {
    let id = new_run_id();
    state.push_command(&run.id, &id, exec::now_ms(), &cmd).await
}

/// Whether a live process is driving the run.
fn driven(run: &RunRow) -> bool {
    run.owner
        .as_deref()
        .is_some_and(|o| !exec::owner_is_dead(o))
        && run.lease_ms.is_some_and(|l| l > exec::now_ms())
}

pub fn approve(g: &Global, a: &ApproveArgs) -> Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let state = open_state(g).await?;
        let run = state.find_run(&a.run).await?;
        if run.status != "running" {
            return Err(UsageError(format!(
                "run {} is {}; there is nothing to approve",
                run.id, run.status
            ))
            .into());
        }
        let log = state.events(&run.id).await?;
        let engine = exec::rebuild(&run, &log)?;
        let Some(node) = engine.node(&a.step) else {
            return Err(UsageError(format!("run {} has no step `{}`", run.id, a.step)).into());
        };
        if *engine.state(node) != ferry_engine::StepState::Waiting {
            return Err(UsageError(format!(
                "step `{}` of run {} is not waiting for approval",
                a.step, run.id
            ))
            .into());
        }
        queue(
            &state,
            &run,
            Command::Approve {
                step: a.step.clone(),
                by: who(),
            },
        )
        .await?;
        println!(
            "approved {} of run {}{}",
            a.step,
            run.id,
            if driven(&run) {
                ""
            } else {
                "; nobody is running it: `ferry resume` continues it"
            }
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn cancel(g: &Global, a: &RunRef) -> Result<ExitCode> {
    stop(g, &a.run, Command::Cancel { by: who() }, false)
}

pub fn rollback(g: &Global, a: &RollbackArgs) -> Result<ExitCode> {
    stop(g, &a.run, Command::Rollback { by: who() }, a.detach)
}

/// Queues a cancel or rollback; if no live process drives the run, drives it here.
fn stop(g: &Global, id: &str, cmd: Command, detach: bool) -> Result<ExitCode> {
    let password = password_if_any(g)?;
    let rt = runtime()?;
    rt.block_on(async {
        let state = open_state(g).await?;
        let run = state.find_run(id).await?;
        let is_rollback = matches!(cmd, Command::Rollback { .. });
        if run.status != "running" && !is_rollback {
            return Err(UsageError(format!("run {} already {}", run.id, run.status)).into());
        }
        if run.status == "rolled_back" {
            return Err(UsageError(format!("run {} is already rolled back", run.id)).into());
        }
        if run.status != "running" {
            state.reopen(&run.id).await?;
        }
        queue(&state, &run, cmd).await?;
        if detach || driven(&run) {
            println!("requested; the process running {} acts on it", run.id);
            return Ok(ExitCode::SUCCESS);
        }
        let run = state.find_run(&run.id).await?;
        drive_and_report(g, state, run, password, &[]).await
    })
}
