//! What the API sends and accepts: typed, documented, and separate from the
//! database rows (a column can change without changing the contract).

use crate::state::{RunRow, Stored, Verified};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// What a run does with what it builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunMode {
    /// A failover, migration cutover or failback: what it builds stays.
    Run,
    /// Build, verify, tear everything down.
    Drill,
}

impl From<RunMode> for ferry_engine::Mode {
    fn from(m: RunMode) -> ferry_engine::Mode {
        match m {
            RunMode::Run => ferry_engine::Mode::Run,
            RunMode::Drill => ferry_engine::Mode::Drill,
        }
    }
}

/// Where a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    RolledBack,
}

impl RunStatus {
    pub fn parse(s: &str) -> RunStatus {
        match s {
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            "rolled_back" => RunStatus::RolledBack,
            // `running` and anything a newer ferry wrote: not finished here.
            _ => RunStatus::Running,
        }
    }
}

/// A run.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Run {
    pub id: String,
    /// The runbook's `name`.
    pub runbook: String,
    /// The runbook's file name as given.
    pub file: String,
    /// Params as given, before defaults.
    pub params: BTreeMap<String, String>,
    pub mode: RunMode,
    pub status: RunStatus,
    /// `COMMIT` or `COMMIT-dirty` when the runbook sat in a git checkout.
    pub git_commit: Option<String>,
    /// The repository, with any password removed.
    pub repo: Option<String>,
    pub work_dir: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// `HOST:PID:NONCE` of the runner driving it.
    pub owner: Option<String>,
    pub lease_ms: Option<i64>,
    /// The runbook target steps run on unless they name their own; `null`:
    /// the runbook's first.
    pub target: Option<String>,
}

impl From<RunRow> for Run {
    fn from(r: RunRow) -> Run {
        Run {
            id: r.id,
            runbook: r.runbook,
            file: r.file,
            params: r.params,
            mode: if r.mode == "drill" {
                RunMode::Drill
            } else {
                RunMode::Run
            },
            status: RunStatus::parse(&r.status),
            git_commit: r.git_commit,
            repo: r.repo.as_deref().map(crate::redact::redact),
            work_dir: r.work_dir,
            created_ms: r.created_ms,
            finished_ms: r.finished_ms,
            owner: r.owner,
            lease_ms: r.lease_ms,
            target: r.target,
        }
    }
}

/// One entry of a run's event log.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LogEntry {
    pub seq: i64,
    pub at_ms: i64,
    /// The event: `{"type": "step_started", ...}` (the log's JSON, a declared format).
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

impl From<Stored> for LogEntry {
    fn from(s: Stored) -> LogEntry {
        LogEntry {
            seq: s.seq,
            at_ms: s.at_ms,
            event: serde_json::to_value(&s.event).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A recovery point a drill proved.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct VerifiedPoint {
    pub repo: String,
    pub point: String,
    pub source: String,
    pub point_time: String,
    pub run_id: String,
    pub at_ms: i64,
}

impl From<Verified> for VerifiedPoint {
    fn from(v: Verified) -> VerifiedPoint {
        VerifiedPoint {
            repo: v.repo,
            point: v.point,
            source: v.source,
            point_time: v.point_time,
            run_id: v.run_id,
            at_ms: v.at_ms,
        }
    }
}

/// Start a run of a runbook.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// The runbook's YAML text; or give `path`.
    #[serde(default)]
    pub runbook: Option<String>,
    /// A runbook of the server's runbook directory (`GET /api/runbooks`),
    /// by file name, instead of `runbook`: the run records the checkout's
    /// git commit.
    #[serde(default)]
    pub path: Option<String>,
    /// A name for it in diagnostics and reports (default `api.yaml`).
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    pub mode: RunMode,
    /// One of the runbook's `targets`: where the steps that name no target
    /// run (default: the runbook's first).
    #[serde(default)]
    pub target: Option<String>,
}

/// Let a run past an approval step. The approver recorded is the
/// authenticated identity, never a name the client sends.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Approve {
    pub step: String,
}

/// Plan a runbook without running it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub runbook: String,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// As in a run: where the steps that name no target would run.
    #[serde(default)]
    pub target: Option<String>,
}

/// The waves a plan would run, each a list of step ids, and its forecast:
/// what each step makes on its target, the predicted RTO and what a drill
/// and a month of standby cost (the server's price table:
/// `$FERRY_HOME/prices.json`, else the built-in one).
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanResponse {
    pub runbook: String,
    pub waves: Vec<Vec<String>>,
    pub forecast: crate::forecast::Forecast,
}

/// One problem in a runbook.
#[derive(Debug, Serialize, ToSchema)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

/// Every error body: what went wrong and, for a runbook with problems, each
/// of them with its position.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Vec<Diagnostic>>,
}

/// `/api/health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub ok: bool,
}

/// A runbook of the server's runbook directory, in brief.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunbookSummary {
    /// Its file name in the directory.
    pub file: String,
    /// Its `name`, when it parses.
    pub name: Option<String>,
    pub description: Option<String>,
    /// Valid against every target this server has.
    pub valid: bool,
    pub problems: usize,
    /// The checkout's commit, `COMMIT-dirty` when the file has changes.
    pub commit: Option<String>,
    pub rto_objective_secs: Option<f64>,
    pub rpo_objective_secs: Option<f64>,
    /// Its targets, by name (the first is the default).
    pub targets: Vec<String>,
    pub steps: usize,
    /// The sources its restores read.
    pub sources: Vec<String>,
}

/// The runbook directory.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunbookList {
    pub directory: String,
    /// `git rev-parse HEAD` of the checkout, if it is one.
    pub commit: Option<String>,
    pub runbooks: Vec<RunbookSummary>,
    /// Files left out, and why.
    pub skipped: Vec<String>,
}

/// A param a runbook takes.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunbookParam {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub default: Option<serde_json::Value>,
    pub description: Option<String>,
}

/// A step of a runbook's DAG.
#[derive(Debug, Serialize, ToSchema)]
pub struct GraphStep {
    pub id: String,
    pub name: Option<String>,
    pub uses: String,
    /// The target it runs on (the default target unless it names one).
    pub target: String,
    /// The steps it waits for.
    pub needs: Vec<String>,
    /// Its column when drawn left to right: one more than the latest of its needs.
    pub wave: usize,
    pub line: usize,
    /// A gate a person approves.
    pub approval: bool,
    /// A check (verifies, creates nothing).
    pub check: bool,
    /// Repeated per item of a list.
    pub for_each: bool,
}

/// One runbook of the directory, in full.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunbookDetail {
    pub summary: RunbookSummary,
    /// The YAML text.
    pub text: String,
    /// Every problem, each at its line (empty when valid).
    pub diagnostics: Vec<Diagnostic>,
    pub params: Vec<RunbookParam>,
    pub graph: Vec<GraphStep>,
}

impl From<&ferry_engine::Diagnostic> for Diagnostic {
    fn from(d: &ferry_engine::Diagnostic) -> Diagnostic {
        Diagnostic {
            file: d.file.clone(),
            line: d.line,
            column: d.column,
            message: d.message.clone(),
            hint: d.hint.clone(),
        }
    }
}

/// A finished drill's measurements against its objectives.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Drill {
    pub run: String,
    pub runbook: String,
    pub target: Option<String>,
    pub created_ms: i64,
    pub status: RunStatus,
    pub rto_secs: Option<f64>,
    pub rto_objective_secs: Option<f64>,
    pub rto_met: Option<bool>,
    /// The oldest restored point's age when the drill started.
    pub rpo_secs: Option<f64>,
    pub rpo_objective_secs: Option<f64>,
    /// Whether every restored point met its objective.
    pub rpo_met: Option<bool>,
    pub checks_passed: usize,
    pub checks_failed: usize,
}
