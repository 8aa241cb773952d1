//! Forecasts: what a plan will make on its target, how long it will take
//! (the predicted RTO), and what a drill and a month of standby cost, before
//! anything runs. `ferry plan`, the API's plan and every run's report use it;
//! a run stores its forecast so the report can set it against what was
//! measured.
//!
//! Each step's time comes from the first of:
//! 1. **history**: the median of the step's last successful runs on the same
//!    target;
//! 2. **throughput** (`volume.restore` of a point the repository holds): the
//!    point's disk size over the restore throughput measured by earlier runs
//!    of this runbook on the target, else the price table's figure for the
//!    target type;
//! 3. **default**: what the target type says its action takes
//!    ([`Target::forecast`](crate::targets::Target::forecast)), or a fixed
//!    figure for checks and commands.
//!
//! Costs come from an editable [`PriceTable`] with its date: what leaves the
//! repository's store (GET requests, egress when the target is in another
//! cloud), what the target charges per request (EBS direct PUTs), and per
//! hour for what exists while the run goes on (instances, snapshots,
//! volumes), and the repository's storage for a month of standby. These are
//! list prices and estimates: no provider bill is read.

use crate::step::Call;
use crate::targets::{DiskSize, Placement, Planned, PlannedResource, Registry, TargetAction};
/// A target type's prices live beside the `Target` trait that reads them.
pub use crate::targets::{HOURS_PER_MONTH, TargetPrices};
use ferry_agent::stats::{Prices, RestoreReads};
use ferry_engine::expr;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The date the built-in prices were read off the providers' price lists.
pub const PRICES_DATE: &str = "2026-11-01";

const GB: f64 = 1e9;

/// Prices and planning figures per target type. Edit a copy
/// (`ferry plan --print-prices > prices.json`) and pass it with `--prices`,
/// or keep it as `$FERRY_HOME/prices.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    /// What the figures describe.
    pub name: String,
    /// When they were read off the price lists (YYYY-MM-DD): prices change.
    pub date: String,
    pub currency: String,
    /// The repository's store, as in `ferry stats --prices`.
    pub repository: Prices,
    /// By target type (`local`, `aws`, `libvirt`).
    pub targets: BTreeMap<String, TargetPrices>,
}

impl Default for PriceTable {
    fn default() -> PriceTable {
        let own_hardware = |boot_secs| TargetPrices {
            cloud: "onprem".into(),
            instance_hour: BTreeMap::from([("default".into(), 0.0)]),
            unit: BTreeMap::new(),
            // Measured: `ferry restore` of the 2 GiB benchmark image to a
            // local file (docs/performance.md), rounded down.
            restore_bytes_per_sec: 400e6,
            boot_secs,
        };
        PriceTable {
            name: "list prices, AWS us-east-1 on demand; own hardware at 0 (edit for yours)".into(),
            date: PRICES_DATE.into(),
            currency: "USD".into(),
            repository: Prices::default(),
            targets: BTreeMap::from([
                // The example app's Debian guests print their ready line
                // 12-14 s after QEMU starts under TCG on an idle machine
                // here, up to 40 s on a loaded one (docs/example-app.md).
                ("local".into(), own_hardware(20.0)),
                ("libvirt".into(), own_hardware(20.0)),
                (
                    "aws".into(),
                    TargetPrices {
                        cloud: "aws".into(),
                        instance_hour: BTreeMap::from([
                            ("t3.micro".into(), 0.0104),
                            ("t3.small".into(), 0.0208),
                            ("t3.medium".into(), 0.0416),
                            ("m6i.large".into(), 0.096),
                            ("m6i.xlarge".into(), 0.192),
                            ("m6i.2xlarge".into(), 0.384),
                            ("m6i.4xlarge".into(), 0.768),
                            ("r6i.4xlarge".into(), 1.008),
                            ("m6i.16xlarge".into(), 3.072),
                            ("default".into(), 0.096),
                            // RDS for MySQL/MariaDB, single-AZ.
                            ("db.t3.micro".into(), 0.017),
                            ("db.t3.small".into(), 0.034),
                            ("db.t3.medium".into(), 0.068),
                            ("db.m6i.large".into(), 0.171),
                            ("db.m6i.xlarge".into(), 0.342),
                            ("db.m6i.2xlarge".into(), 0.684),
                            ("db.m6i.4xlarge".into(), 1.368),
                            ("db.r6i.4xlarge".into(), 2.0),
                            ("db.m6i.16xlarge".into(), 5.472),
                        ]),
                        unit: BTreeMap::from([
                            ("ebs_direct_put_per_1000".into(), 0.006),
                            ("ebs_direct_get_per_1000".into(), 0.003),
                            ("snapshot_gb_month".into(), 0.05),
                            ("gp3_gb_month".into(), 0.08),
                            // Per hour, before capacity units.
                            ("alb_hour".into(), 0.0225),
                            ("nlb_hour".into(), 0.0225),
                            ("health_check_month".into(), 0.50),
                        ]),
                        // EBS direct: 16 PutSnapshotBlock of 512 KiB in
                        // flight; AWS documents about 1,000 puts/s per
                        // snapshot as the ceiling. A cautious figure until
                        // a run measures one.
                        restore_bytes_per_sec: 100e6,
                        // Launch to running and reachable for a Linux AMI.
                        boot_secs: 60.0,
                    },
                ),
            ]),
        }
    }
}

impl PriceTable {
    /// `--prices FILE`, else `$FERRY_HOME/prices.json` when it exists, else
    /// the built-in table.
    pub fn load(file: Option<&Path>, home: &Path) -> crate::Result<PriceTable> {
        let at_home = home.join("prices.json");
        let path = match file {
            Some(f) => f.to_path_buf(),
            None if at_home.exists() => at_home,
            None => return Ok(PriceTable::default()),
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| crate::Error::usage(format!("price table {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| {
            crate::Error::usage(format!(
                "price table {} is not valid: {e}; start from `ferry plan --print-prices`",
                path.display()
            ))
        })
    }

    fn target(&self, kind: &str) -> TargetPrices {
        self.targets.get(kind).cloned().unwrap_or_default()
    }
}

/// Where a repository's bytes sit, for egress: from its URL's scheme.
pub fn repository_cloud(location: &str) -> &'static str {
    let endpoint = location.contains("endpoint=");
    if location.starts_with("s3://") && !endpoint {
        "aws"
    } else if location.starts_with("gs://") {
        "gcp"
    } else if location.starts_with("az://") || location.starts_with("azure://") {
        "azure"
    } else {
        // A directory, or an S3-compatible server of one's own.
        "onprem"
    }
}

pub use crate::state::{History, StepTime};

/// A recovery point a step restores, as far as the repository tells.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PointInfo {
    /// The reference as written (`web@latest`).
    #[serde(rename = "ref")]
    pub reference: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The disk's size and the bytes that hold data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<u64>,
    /// What the restore reads from the repository's store: `gets` (GET
    /// requests) and `bytes` (stored bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub reads: Option<RestoreReads>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a step's predicted time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The median of the step's earlier runs on this target.
    History,
    /// Bytes to restore over a throughput measured by earlier runs.
    MeasuredThroughput,
    /// Bytes to restore over the price table's throughput for the target type.
    TableThroughput,
    /// The target type's or the action's default figure.
    Default,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepForecast {
    pub id: String,
    pub uses: String,
    pub target: String,
    pub target_type: String,
    pub needs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    pub predicted_secs: f64,
    pub basis: Basis,
    /// Seconds from the run's start, on the critical path of what it needs.
    pub start_secs: f64,
    pub finish_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<PointInfo>,
    pub resources: Vec<PlannedResource>,
    /// One-off charges of the step: requests to the target and reads from
    /// the repository.
    pub once_cost: f64,
    /// What its resources cost per hour while they exist.
    pub hourly_cost: f64,
}

/// A line of a cost estimate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CostLine {
    pub what: String,
    pub amount: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Forecast {
    pub runbook: String,
    /// The target the steps that name none run on.
    pub target: String,
    pub target_type: String,
    pub prices: String,
    pub prices_date: String,
    pub currency: String,
    pub steps: Vec<StepForecast>,
    pub predicted_rto_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rto_objective_secs: Option<f64>,
    /// Successful runs on this target the prediction learnt from.
    pub history_runs: usize,
    /// A drill: every one-off charge, and every resource from the moment its
    /// step finishes until the drill's predicted end.
    pub drill_cost: f64,
    pub drill_cost_lines: Vec<CostLine>,
    /// Keeping the stack recoverable for a month: the repository's storage
    /// and what the target charges while nothing runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_month_cost: Option<f64>,
    pub standby_cost_lines: Vec<CostLine>,
    /// Once the stack runs (after a failover): per hour.
    pub running_hourly_cost: f64,
    /// What the estimate leaves out.
    pub notes: Vec<String>,
}

/// What the repository tells a forecast: recovery points and their reads.
pub struct RepoView<'a> {
    pub repo: &'a ferry_agent::Repository,
    pub index: Option<&'a ferry_agent::index::Index>,
    /// The repository's location as given (for its cloud).
    pub location: &'a str,
    /// Its stored bytes, for standby storage.
    pub stored_bytes: Option<u64>,
}

/// Fixed figures for the actions no target runs.
fn builtin_secs(uses: &str, inputs: &Map<String, Value>) -> f64 {
    match uses {
        "wait" => inputs
            .get("duration")
            .map(expr::to_text)
            .and_then(|d| ferry_engine::catalog::parse_duration_ms(&d))
            .map_or(0.0, |ms| ms as f64 / 1000.0),
        "noop" | "approval" => 0.0,
        "command.run" => 5.0,
        // A check polls until the service answers; once what it checks is
        // ready, about one try.
        u if u.starts_with("check.") => 2.0,
        _ => 1.0,
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Forecasts `plan`, already moved to `target` (`--target`; else the
/// runbook's first target).
pub fn forecast(
    registry: &Registry,
    plan: &ferry_engine::Plan,
    target: Option<&str>,
    history: &History,
    repo: Option<&RepoView<'_>>,
    prices: &PriceTable,
) -> Forecast {
    let engine =
        ferry_engine::Engine::new(Arc::new(plan.clone()), ferry_engine::Mode::Run, Map::new());
    let default_target = target
        .and_then(|name| plan.runbook.targets.iter().find(|t| t.name == name))
        .or_else(|| plan.runbook.targets.first());
    let (target_name, target_type) = default_target
        .map(|t| (t.name.clone(), t.kind.clone()))
        .unwrap_or_default();
    let mut notes = Vec::new();
    // Restore throughput measured by this runbook's earlier runs on the target.
    let mut rates: Vec<f64> = history
        .steps
        .values()
        .flatten()
        .filter_map(|t| Some(t.bytes? as f64 / t.secs).filter(|r| r.is_finite() && *r > 0.0))
        .collect();
    let measured_rate = median(&mut rates);
    let repo_cloud = repo.map(|r| repository_cloud(r.location));
    let mut steps: Vec<StepForecast> = Vec::with_capacity(plan.nodes.len());
    let mut finish = vec![0.0f64; plan.nodes.len()];
    let mut waits_for_people = Vec::new();
    for &n in &plan.order {
        let step = plan.step_of(n);
        let node = &plan.nodes[n];
        let t = plan.runbook.targets.get(step.target);
        let (t_name, t_kind) = t
            .map(|t| (t.name.clone(), t.kind.clone()))
            .unwrap_or_default();
        let tprices = prices.target(&t_kind);
        // Inputs as far as planning can know them: those that depend on
        // another step's outputs are left out.
        let scope = engine.scope(n);
        let inputs: Map<String, Value> = step
            .with
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), expr::render(v, &scope).ok()?)))
            .collect();
        let call = Call {
            node: node.id.clone(),
            key: format!("plan/{}", node.id),
            uses: step.uses.clone(),
            inputs,
        };
        let point = (step.uses == "volume.restore")
            .then(|| point_info(repo, &call))
            .flatten();
        let disk = point.as_ref().and_then(|p| {
            Some(DiskSize {
                size: p.size?,
                data_bytes: p.data_bytes.unwrap_or(0),
            })
        });
        let action = TargetAction::from_name(&step.uses);
        let planned = match (action, t, registry.get(&t_kind)) {
            (Some(a), Some(t), Some(target)) => {
                target.forecast(&Placement::of(t), a, &call, disk.as_ref(), &tprices)
            }
            _ => Planned {
                resources: Vec::new(),
                secs: builtin_secs(&step.uses, &call.inputs),
                once_cost: 0.0,
            },
        };
        if step.uses == "approval" {
            waits_for_people.push(node.id.clone());
        }
        let past = history.steps.get(&node.id).map(|v| {
            let mut s: Vec<f64> = v.iter().map(|t| t.secs).collect();
            median(&mut s).unwrap_or(0.0)
        });
        let (secs, basis) = match (past, &disk) {
            (_, Some(d))
                if action == Some(TargetAction::VolumeRestore) && measured_rate.is_some() =>
            {
                (
                    d.size as f64 / measured_rate.unwrap_or(1.0),
                    Basis::MeasuredThroughput,
                )
            }
            (Some(p), _) => (p, Basis::History),
            (None, Some(d))
                if action == Some(TargetAction::VolumeRestore)
                    && tprices.restore_bytes_per_sec > 0.0 =>
            {
                (
                    d.size as f64 / tprices.restore_bytes_per_sec,
                    Basis::TableThroughput,
                )
            }
            (None, _) => (planned.secs, Basis::Default),
        };
        // What leaves the repository's store for a restore.
        let mut once = planned.once_cost;
        // (A repository on one's own disks or servers charges nothing.)
        if let (Some(reads), Some(rc)) = (point.as_ref().and_then(|p| p.reads), repo_cloud)
            && rc != "onprem"
        {
            once += reads.gets as f64 / 1000.0 * prices.repository.get_per_1000;
            if rc != tprices.cloud {
                once += reads.bytes as f64 / GB * prices.repository.egress_gb;
            }
        }
        let start = plan.deps(n).map(|d| finish[d]).fold(0.0, f64::max);
        finish[n] = start + secs;
        steps.push(StepForecast {
            id: node.id.clone(),
            uses: step.uses.clone(),
            target: t_name,
            target_type: t_kind,
            needs: plan.deps(n).map(|d| plan.nodes[d].id.clone()).collect(),
            condition: step.cond.clone(),
            predicted_secs: secs,
            basis,
            start_secs: start,
            finish_secs: start + secs,
            point,
            hourly_cost: planned.resources.iter().map(|r| r.hourly).sum::<f64>() + 0.0,
            resources: planned.resources,
            once_cost: once,
        });
    }
    let rto = finish.iter().copied().fold(0.0, f64::max);
    // Report order: the plan's waves.
    let position: BTreeMap<&str, usize> = plan
        .waves
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, &n)| (plan.nodes[n].id.as_str(), i))
        .collect();
    steps.sort_by_key(|s| position.get(s.id.as_str()).copied().unwrap_or(usize::MAX));
    let drill = drill_lines(&steps, rto);
    let standby = standby_lines(&steps, repo, prices);
    if !waits_for_people.is_empty() {
        notes.push(format!(
            "approvals ({}) wait for a person: their wait is not in the RTO",
            waits_for_people.join(", ")
        ));
    }
    if repo.is_none() {
        notes.push("no repository given (-r): restores are not sized, and neither repository reads nor standby storage are counted".into());
    }
    notes.push("teardown time and provider minimum charges are not counted".into());
    Forecast {
        runbook: plan.runbook.name.clone(),
        target: target_name,
        target_type,
        prices: prices.name.clone(),
        prices_date: prices.date.clone(),
        currency: prices.currency.clone(),
        predicted_rto_secs: rto,
        rto_objective_secs: plan.runbook.objectives.rto_secs,
        history_runs: history.runs,
        drill_cost: total(&drill),
        drill_cost_lines: drill,
        standby_month_cost: standby.as_ref().map(|l| l.iter().map(|l| l.amount).sum()),
        standby_cost_lines: standby.unwrap_or_default(),
        running_hourly_cost: steps.iter().map(|s| s.hourly_cost).sum::<f64>() + 0.0,
        steps,
        notes,
    }
}

/// A sum of costs (an empty sum of floats is -0.0, which prints as such).
fn total(lines: &[CostLine]) -> f64 {
    lines.iter().map(|l| l.amount).sum::<f64>() + 0.0
}

fn lines(m: BTreeMap<String, f64>) -> Vec<CostLine> {
    m.into_iter()
        .map(|(what, amount)| CostLine { what, amount })
        .collect()
}

/// A drill's cost lines: one-off charges, and every resource from the
/// moment its step finishes until the run ends (`end_secs` from its start).
fn drill_lines(steps: &[StepForecast], end_secs: f64) -> Vec<CostLine> {
    let mut drill: BTreeMap<String, f64> = BTreeMap::new();
    for s in steps {
        if s.once_cost > 0.0 {
            *drill
                .entry(format!("{} requests and reads", s.uses))
                .or_default() += s.once_cost;
        }
        let held_hours = (end_secs - s.finish_secs).max(0.0) / 3600.0;
        for r in &s.resources {
            if r.hourly > 0.0 {
                *drill.entry(r.kind.clone()).or_default() += r.hourly * held_hours;
            }
        }
    }
    lines(drill)
}

/// A standby month's cost lines; `None` when the repository's size is not
/// known.
fn standby_lines(
    steps: &[StepForecast],
    repo: Option<&RepoView<'_>>,
    prices: &PriceTable,
) -> Option<Vec<CostLine>> {
    let stored = repo.and_then(|r| r.stored_bytes)?;
    let mut standby: BTreeMap<String, f64> = BTreeMap::new();
    standby.insert(
        "repository storage".into(),
        stored as f64 / GB * prices.repository.storage(None),
    );
    for r in steps.iter().flat_map(|s| &s.resources) {
        if r.monthly_standby > 0.0 {
            *standby.entry(r.kind.clone()).or_default() += r.monthly_standby;
        }
    }
    Some(lines(standby))
}

/// The point a `volume.restore` step will use, resolved read-only.
fn point_info(repo: Option<&RepoView<'_>>, call: &Call) -> Option<PointInfo> {
    let reference = call.str("point")?;
    let mut info = PointInfo {
        reference: reference.clone(),
        id: None,
        time: None,
        age_secs: None,
        disk: None,
        size: None,
        data_bytes: None,
        reads: None,
        error: None,
    };
    let Some(view) = repo else {
        info.error = Some("no repository given (-r)".into());
        return Some(info);
    };
    let p = match view.repo.resolve(&reference) {
        Ok(p) => p,
        Err(e) => {
            info.error = Some(e.to_string());
            return Some(info);
        }
    };
    let wanted = call.str("disk").filter(|d| !d.is_empty());
    let d = match &wanted {
        None => (p.meta.disks.len() == 1).then_some(0),
        Some(name) => p.meta.disks.iter().position(|d| &d.name == name),
    };
    info.id = Some(p.id.clone());
    info.time = Some(p.meta.time.to_rfc3339());
    info.age_secs = Some((chrono::Utc::now() - p.meta.time).num_milliseconds() as f64 / 1000.0);
    match d {
        None => {
            info.error = Some(format!(
                "the point has disks {}: name one with `disk`",
                p.meta
                    .disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Some(d) => {
            let m = &p.meta.disks[d];
            info.disk = Some(m.name.clone());
            info.size = Some(m.size);
            info.data_bytes = Some(m.data_bytes);
            info.reads = view
                .index
                .map(|idx| ferry_agent::stats::restore_reads(view.repo, idx, &[(&p, d)]));
        }
    }
    Some(info)
}

/// What a finished run measured, set against its forecast.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Measured {
    pub predicted_rto_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_rto_secs: Option<f64>,
    pub predicted_drill_cost: f64,
    /// The forecast's cost model with the measured step times: what the
    /// drill cost at the table's prices.
    pub measured_drill_cost: f64,
    pub currency: String,
    pub prices_date: String,
}

/// Sets `f` against measured step times (seconds from the run's start to
/// each step's end, by id) and the measured RTO.
pub fn measured(f: &Forecast, finished: &BTreeMap<String, f64>, rto: Option<f64>) -> Measured {
    let end = rto.unwrap_or(f.predicted_rto_secs);
    let steps: Vec<StepForecast> = f
        .steps
        .iter()
        .map(|s| {
            let mut s = s.clone();
            if let Some(&t) = finished.get(&s.id) {
                s.finish_secs = t;
            }
            s
        })
        .collect();
    let drill = drill_lines(&steps, end);
    Measured {
        predicted_rto_secs: f.predicted_rto_secs,
        measured_rto_secs: rto,
        predicted_drill_cost: f.drill_cost,
        measured_drill_cost: total(&drill),
        currency: f.currency.clone(),
        prices_date: f.prices_date.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str, target: Option<&str>) -> ferry_engine::Plan {
        let mut rb = ferry_engine::parse("t.yaml", text).expect("runbook parses");
        if let Some(t) = target {
            rb.retarget(t).expect("target exists");
        }
        ferry_engine::plan(rb, &BTreeMap::new()).expect("plans")
    }

    const STACK: &str = "version: 1\nname: t\ntargets:\n  here: {type: local}\n  cloud: {type: aws, region: us-east-1}\nsteps:\n  - id: vol\n    uses: volume.create\n    with: {size: 10G}\n  - id: vm\n    uses: instance.launch\n    needs: vol\n    with: {cpus: 2, memory: 2048, disks: [\"${{ steps.vol.outputs.path }}\"]}\n  - id: up\n    uses: check.tcp\n    needs: vm\n    with: {address: \"${{ steps.vm.outputs.addr }}\"}\n";

    #[test]
    fn a_plan_with_no_history_uses_the_targets_figures_and_prices() {
        let prices = PriceTable::default();
        let r = Registry::builtin();
        let p = plan(STACK, Some("cloud"));
        let f = forecast(&r, &p, Some("cloud"), &History::default(), None, &prices);
        assert_eq!(
            (f.target.as_str(), f.target_type.as_str()),
            ("cloud", "aws")
        );
        let vm = f.steps.iter().find(|s| s.id == "vm").expect("vm");
        assert_eq!(vm.basis, Basis::Default);
        assert_eq!(vm.predicted_secs, prices.targets["aws"].boot_secs);
        assert_eq!(vm.resources[0].kind, "EC2 instance");
        assert!(
            vm.resources[0].detail.starts_with("t3.small"),
            "{:?}",
            vm.resources
        );
        assert_eq!(vm.hourly_cost, 0.0208);
        // vol (10 s) then vm (60 s) then the check (2 s).
        assert_eq!(f.predicted_rto_secs, 72.0);
        // The 10 GiB volume is held for 62 s, the instance for 2 s.
        let expect = 10.0 * 0.08 / HOURS_PER_MONTH * 62.0 / 3600.0 + 0.0208 * 2.0 / 3600.0;
        assert!(
            (f.drill_cost - expect).abs() < 1e-12,
            "{} vs {expect}",
            f.drill_cost
        );
        assert_eq!(f.standby_month_cost, None, "no repository: unknown");
        // The same runbook on local: nothing charged, QEMU boot figure.
        let p = plan(STACK, None);
        let f = forecast(&r, &p, None, &History::default(), None, &prices);
        assert_eq!(f.target_type, "local");
        assert_eq!(f.drill_cost, 0.0);
        let vm = f.steps.iter().find(|s| s.id == "vm").expect("vm");
        assert_eq!(vm.resources[0].kind, "QEMU VM");
    }

    #[test]
    fn history_wins_over_figures_and_measured_throughput_sizes_restores() {
        let text = "version: 1\nname: t\ntargets:\n  here: {type: local}\nsteps:\n  - id: disk\n    uses: volume.restore\n    with: {point: web@latest}\n  - id: vm\n    uses: instance.launch\n    needs: disk\n    with: {kernel: /k, disks: [\"${{ steps.disk.outputs.path }}\"]}\n";
        let p = plan(text, None);
        let mut h = History {
            runs: 3,
            ..History::default()
        };
        h.steps.insert(
            "vm".into(),
            [30.0, 10.0, 20.0]
                .map(|secs| StepTime { secs, bytes: None })
                .to_vec(),
        );
        // Restores of 1 GB in 4 s and 2 s: 250 and 500 MB/s measured.
        h.steps.insert(
            "disk".into(),
            vec![
                StepTime {
                    secs: 4.0,
                    bytes: Some(1_000_000_000),
                },
                StepTime {
                    secs: 2.0,
                    bytes: Some(1_000_000_000),
                },
            ],
        );
        let f = forecast(
            &Registry::builtin(),
            &p,
            None,
            &h,
            None,
            &PriceTable::default(),
        );
        let vm = f.steps.iter().find(|s| s.id == "vm").expect("vm");
        assert_eq!((vm.basis, vm.predicted_secs), (Basis::History, 20.0));
        // Without the repository the point's size is unknown: the restore's
        // own history is used.
        let disk = f.steps.iter().find(|s| s.id == "disk").expect("disk");
        assert_eq!(disk.basis, Basis::History);
        assert_eq!(f.history_runs, 3);
        assert!(f.notes.iter().any(|n| n.contains("no repository")));
    }

    #[test]
    fn measured_costs_follow_the_measured_times() {
        let p = plan(STACK, Some("cloud"));
        let f = forecast(
            &Registry::builtin(),
            &p,
            Some("cloud"),
            &History::default(),
            None,
            &PriceTable::default(),
        );
        // A run that took an hour longer than predicted after the instance
        // was up costs an instance-hour more.
        let finished: BTreeMap<String, f64> = [
            ("vol".into(), 10.0),
            ("vm".into(), 70.0),
            ("up".into(), 3672.0),
        ]
        .into();
        let m = measured(&f, &finished, Some(3672.0));
        assert_eq!(m.measured_rto_secs, Some(3672.0));
        let extra = m.measured_drill_cost - m.predicted_drill_cost;
        assert!(extra > 0.0208 && extra < 0.0208 + 0.02, "{m:?}");
    }

    #[test]
    fn the_repository_cloud_decides_egress() {
        assert_eq!(repository_cloud("s3://bucket/prefix"), "aws");
        assert_eq!(
            repository_cloud("s3://b/p?endpoint=http://127.0.0.1:9000"),
            "onprem"
        );
        assert_eq!(repository_cloud("gs://b"), "gcp");
        assert_eq!(repository_cloud("az://c/p"), "azure");
        assert_eq!(repository_cloud("/var/backups/repo"), "onprem");
    }

    #[test]
    fn the_builtin_price_table_round_trips_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = PriceTable::default();
        let text = serde_json::to_string_pretty(&t).expect("json");
        std::fs::write(dir.path().join("prices.json"), &text).expect("write");
        assert_eq!(PriceTable::load(None, dir.path()).expect("loads"), t);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, text.replace("\"date\"", "\"dated\"")).expect("write");
        let e = PriceTable::load(Some(&bad), dir.path())
            .expect_err("unknown field")
            .to_string();
        assert!(
            e.contains("bad.json") && e.contains("--print-prices"),
            "{e}"
        );
    }
}
