//! What is protected and how well: sources and their recovery points (read
//! from the repository), their protection status (written to the state by
//! `ferry protect`), which drills verified which points, the repository's
//! size, cost and check results, and the runbooks of a directory with the
//! objectives they set. The API, `/metrics` and `ferry sources` read these
//! views; they never change anything.
//!
//! Reading every point of a repository costs one GET per point (cached after
//! the first: points are immutable), and its statistics a read of the whole
//! index, so a server keeps one [`Inventory`] that reuses its open
//! repository and serves a listing at most [`POINTS_TTL`] old and statistics
//! at most [`STATS_TTL`] old.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::state::State;
use crate::state::health::CheckRow;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod runbooks;

/// How old a served listing of points may be.
pub const POINTS_TTL: Duration = Duration::from_secs(10);
/// How old served repository statistics may be.
pub const STATS_TTL: Duration = Duration::from_secs(60);
/// A protection status not rewritten for this long is stale: its writer
/// stopped or cannot reach the state.
pub const STALE_AFTER_MS: i64 = 60_000;

/// One disk of a recovery point.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PointDisk {
    pub name: String,
    pub size: u64,
    /// Bytes that held data (not zero).
    pub data_bytes: u64,
    /// Keyed BLAKE3 Merkle root over the disk's chunk lists.
    pub digest: String,
    /// The change tracker an incremental read through, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<String>,
}

/// A drill that restored a point and passed its checks.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct VerifiedBy {
    pub run_id: String,
    pub at_ms: i64,
}

/// A recovery point, as the console shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Point {
    pub id: String,
    pub source: String,
    pub time: DateTime<Utc>,
    pub parent: Option<String>,
    /// crash, app or fuzzy.
    pub consistency: String,
    pub host: String,
    /// Sum of the disks' sizes: what a restore writes.
    pub size: u64,
    pub data_bytes: u64,
    pub disks: Vec<PointDisk>,
    /// The coordinated cut across machines it was taken in, if any.
    #[schema(value_type = Option<Object>)]
    pub group: Option<ferry_agent::point::GroupCut>,
    /// Drills that proved this point, newest first.
    pub verified_by: Vec<VerifiedBy>,
}

/// What a protecting process last reported of a source.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Protection {
    /// `HOST:PID` of the process.
    pub reporter: String,
    pub updated_ms: i64,
    /// Not rewritten for a minute: the process stopped or lost the state.
    pub stale: bool,
    /// Age of the newest committed point's instant, now (the live RPO).
    pub lag_secs: Option<f64>,
    /// Bytes written since that instant.
    pub backlog_bytes: u64,
    pub throughput_bytes_per_sec: f64,
    pub last_cycle_secs: f64,
    pub last_mode: Option<String>,
    pub cycles_ok: u64,
    pub cycles_failed: u64,
    pub last_error: Option<String>,
}

/// How a source stands against its recovery point objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RpoStatus {
    /// Its newest point is at most 3/4 of the objective old.
    Ok,
    /// Between 3/4 of the objective and the objective.
    Warning,
    /// Older than the objective, or no point at all.
    Breach,
    /// No runbook restoring it sets an objective.
    Unknown,
}

/// A protected source: a machine or disk set whose points share a name.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Source {
    pub source: String,
    /// The newest point's disks.
    pub disks: Vec<PointDisk>,
    pub points: usize,
    pub first_point_time: Option<DateTime<Utc>>,
    pub last_point: Option<String>,
    pub last_point_time: Option<DateTime<Utc>>,
    /// Seconds since the newest point's instant.
    pub last_point_age_secs: Option<f64>,
    /// The newest point's size: what a recovery restores.
    pub bytes_protected: u64,
    pub protection: Option<Protection>,
    /// The smallest RPO objective of the runbooks that restore this source.
    pub rpo_objective_secs: Option<f64>,
    /// The runbook that sets it.
    pub rpo_objective_runbook: Option<String>,
    pub rpo_status: RpoStatus,
    /// The newest drill that verified any point of this source.
    pub last_verified: Option<VerifiedBy>,
    /// What needs attention, in words (stale or failing protection, an
    /// objective missed).
    pub alerts: Vec<String>,
}

/// A `ferry check` as recorded.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Check {
    pub at_ms: i64,
    pub ok: bool,
    /// Whether every pack's data was read and verified, not just the index.
    pub read_data: bool,
    pub points: i64,
    pub packs: i64,
    pub chunks: i64,
    pub bytes_read: i64,
    pub problems: i64,
    pub damaged_points: i64,
}

impl From<CheckRow> for Check {
    fn from(c: CheckRow) -> Check {
        Check {
            at_ms: c.at_ms,
            ok: c.ok,
            read_data: c.read_data,
            points: c.points,
            packs: c.packs,
            chunks: c.chunks,
            bytes_read: c.bytes_read,
            problems: c.problems,
            damaged_points: c.damaged_points,
        }
    }
}

/// Which points drills proved restorable.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Coverage {
    pub points_total: usize,
    pub points_verified: usize,
    pub bytes_total: u64,
    pub bytes_verified: u64,
    /// Sources whose newest point a drill verified.
    pub sources_latest_verified: usize,
    pub newest_verification_ms: Option<i64>,
}

/// The repository's size, cost and health.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Repository {
    /// Where it is, without credentials.
    pub location: String,
    pub points: usize,
    pub sources: usize,
    /// Sum of every point's disk sizes.
    pub logical_bytes: u64,
    /// Unique chunk bytes (after deduplication, before compression).
    pub unique_bytes: u64,
    /// Every object as stored.
    pub stored_bytes: u64,
    /// logical / stored.
    pub reduction: f64,
    pub storage_class: String,
    pub monthly_storage_cost: f64,
    /// When the statistics were read (they are cached for a minute).
    pub stats_time: DateTime<Utc>,
    /// The newest checks, newest first.
    pub checks: Vec<Check>,
    pub coverage: Coverage,
    /// Points that cannot be read (damaged or of a newer format).
    pub unreadable: Vec<String>,
}

/// Statistics, when they were read (monotonic, and for the client).
type StatsAt = (Instant, DateTime<Utc>, Arc<ferry_agent::stats::Stats>);

/// A listing of the repository's points, taken at one moment.
struct Listing {
    taken: Instant,
    points: Arc<Vec<ferry_agent::point::Point>>,
    unreadable: Arc<Vec<String>>,
}

/// Opens the repository once and keeps it open.
struct Opener {
    ctx: Context,
    repo: Mutex<Option<Arc<ferry_agent::Repository>>>,
}

impl Opener {
    /// The open repository (blocking).
    fn repo(&self) -> Result<Arc<ferry_agent::Repository>> {
        let mut slot = self.repo.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = &*slot {
            return Ok(r.clone());
        }
        if self.ctx.repo.is_none() {
            return Err(Error::Unavailable(
                "this server has no repository: start `ferry serve` with -r/--repo (or FERRY_REPO) and its password".into(),
            ));
        }
        let r = Arc::new(self.ctx.open_repo(true).map_err(Error::from)?);
        *slot = Some(r.clone());
        Ok(r)
    }
}

impl Drop for Opener {
    /// The repository's store owns a runtime, which must not be dropped on an
    /// async worker (where a server drops its state): drop it on a thread.
    fn drop(&mut self) {
        let repo = self
            .repo
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(r) = repo {
            std::thread::spawn(move || drop(r));
        }
    }
}

/// The views of one repository, for a long-lived server.
pub struct Inventory {
    opener: Arc<Opener>,
    listing: tokio::sync::Mutex<Option<Listing>>,
    stats: tokio::sync::Mutex<Option<StatsAt>>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory").finish_non_exhaustive()
    }
}

impl Inventory {
    /// `ctx` names the repository and holds its password (never a prompt).
    pub fn new(ctx: Context) -> Inventory {
        Inventory {
            opener: Arc::new(Opener {
                ctx,
                repo: Mutex::new(None),
            }),
            listing: tokio::sync::Mutex::new(None),
            stats: tokio::sync::Mutex::new(None),
        }
    }

    /// The repository's location, without credentials, if one is set.
    pub fn location(&self) -> Option<String> {
        self.opener.ctx.repo.as_deref().map(crate::redact::redact)
    }

    /// Lists the points and reads the statistics once, so the first person
    /// to open the console does not wait for a repository of thousands of
    /// points to be read (a server calls this at start, in the background).
    /// Returns how long it took; a failure is only logged, since every view
    /// reports it again when asked.
    pub async fn warm(&self) -> Duration {
        let t = Instant::now();
        if self.opener.ctx.repo.is_none() {
            return t.elapsed();
        }
        if let Err(e) = self.listing().await {
            tracing::warn!("cannot list the repository's points: {e}");
            return t.elapsed();
        }
        if let Err(e) = self.stats().await {
            tracing::warn!("cannot read the repository's statistics: {e}");
        }
        t.elapsed()
    }

    /// Every readable point (at most [`POINTS_TTL`] old) and the problems
    /// of those that cannot be read.
    async fn listing(&self) -> Result<(Arc<Vec<ferry_agent::point::Point>>, Arc<Vec<String>>)> {
        let mut slot = self.listing.lock().await;
        if let Some(l) = &*slot
            && l.taken.elapsed() < POINTS_TTL
        {
            return Ok((l.points.clone(), l.unreadable.clone()));
        }
        let opener = self.opener.clone();
        let (points, bad) =
            tokio::task::spawn_blocking(move || Ok::<_, Error>(opener.repo()?.points()?))
                .await
                .map_err(|e| Error::Internal(anyhow::anyhow!("listing points stopped: {e}")))??;
        let l = Listing {
            taken: Instant::now(),
            points: Arc::new(points),
            unreadable: Arc::new(bad.iter().map(ToString::to_string).collect()),
        };
        let out = (l.points.clone(), l.unreadable.clone());
        *slot = Some(l);
        Ok(out)
    }

    async fn stats(&self) -> Result<(DateTime<Utc>, Arc<ferry_agent::stats::Stats>)> {
        let mut slot = self.stats.lock().await;
        if let Some((at, time, s)) = &*slot
            && at.elapsed() < STATS_TTL
        {
            return Ok((*time, s.clone()));
        }
        let opener = self.opener.clone();
        let s = tokio::task::spawn_blocking(move || {
            let repo = opener.repo()?;
            Ok::<_, Error>(ferry_agent::stats::stats(
                &repo,
                &ferry_agent::stats::Prices::default(),
                None,
            )?)
        })
        .await
        .map_err(|e| Error::Internal(anyhow::anyhow!("repository statistics stopped: {e}")))??;
        let (s, time) = (Arc::new(s), Utc::now());
        *slot = Some((Instant::now(), time, s.clone()));
        Ok((time, s))
    }

    /// Every source, by name, with its protection and objective.
    pub async fn sources(
        &self,
        state: &State,
        objectives: &BTreeMap<String, (f64, String)>,
    ) -> Result<Vec<Source>> {
        let (points, _) = self.listing().await?;
        let protection = state.protection().await?;
        let verified = state.verified().await?;
        Ok(sources(
            &points,
            &protection,
            &verified,
            objectives,
            Utc::now(),
        ))
    }

    /// A source's points, newest first; `None` if it has none.
    pub async fn points(&self, state: &State, source: &str) -> Result<Vec<Point>> {
        let (points, _) = self.listing().await?;
        let verified = state.verified().await?;
        let by_point = verified_by_point(&verified);
        let mut out: Vec<Point> = points
            .iter()
            .filter(|p| p.meta.source == source)
            .map(|p| point_view(p, &by_point))
            .collect();
        if out.is_empty() {
            return Err(Error::NotFound(format!(
                "no recovery point of source {source:?} in the repository"
            )));
        }
        out.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Size, cost, checks and verification coverage.
    pub async fn repository(&self, state: &State) -> Result<Repository> {
        let (points, unreadable) = self.listing().await?;
        let (stats_time, stats) = self.stats().await?;
        let location = self.location().unwrap_or_default();
        let checks = state
            .checks(
                &repo_key(self.opener.ctx.repo.as_deref().unwrap_or_default()),
                20,
            )
            .await?;
        let verified = state.verified().await?;
        Ok(Repository {
            location,
            points: points.len(),
            sources: stats.sources,
            logical_bytes: stats.logical_bytes,
            unique_bytes: stats.unique_bytes,
            stored_bytes: stats.total_bytes,
            reduction: if stats.total_bytes == 0 {
                0.0
            } else {
                stats.logical_bytes as f64 / stats.total_bytes as f64
            },
            storage_class: stats.storage_class.clone(),
            monthly_storage_cost: stats.monthly_storage_cost,
            stats_time,
            checks: checks.into_iter().map(Check::from).collect(),
            coverage: coverage(&points, &verified),
            unreadable: unreadable.to_vec(),
        })
    }
}

/// A check's outcome as the state keeps it (`repo_checks`), for the
/// repository at `location`.
pub fn check_row(id: &str, location: &str, r: &ferry_agent::check::Report) -> CheckRow {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    CheckRow {
        id: id.to_owned(),
        repo: repo_key(location),
        at_ms: Utc::now().timestamp_millis(),
        ok: r.ok,
        read_data: r.read_data,
        points: n(r.points),
        packs: n(r.packs),
        chunks: n(r.chunks),
        bytes_read: n(r.bytes_read),
        problems: n(r.problems.len() as u64),
        damaged_points: n(r.damaged_points.len() as u64),
    }
}

/// The key checks of a repository are recorded under: a path made absolute
/// (so `-r repo` and `-r /abs/repo` agree), a URL without credentials.
pub fn repo_key(location: &str) -> String {
    if location.contains("://") {
        crate::redact::redact(location)
    } else {
        std::path::absolute(location)
            .map_or_else(|_| location.to_owned(), |p| p.display().to_string())
    }
}

fn verified_by_point(verified: &[crate::state::Verified]) -> BTreeMap<&str, Vec<VerifiedBy>> {
    let mut m: BTreeMap<&str, Vec<VerifiedBy>> = BTreeMap::new();
    // `verified` is newest first, and so is each point's list.
    for v in verified {
        m.entry(v.point.as_str()).or_default().push(VerifiedBy {
            run_id: v.run_id.clone(),
            at_ms: v.at_ms,
        });
    }
    m
}

fn disk_view(d: &ferry_agent::point::DiskMeta) -> PointDisk {
    PointDisk {
        name: d.name.clone(),
        size: d.size,
        data_bytes: d.data_bytes,
        digest: d.digest.clone(),
        changes: d.changes.clone(),
    }
}

fn point_view(p: &ferry_agent::point::Point, verified: &BTreeMap<&str, Vec<VerifiedBy>>) -> Point {
    Point {
        id: p.id.clone(),
        source: p.meta.source.clone(),
        time: p.meta.time,
        parent: p.meta.parent.clone(),
        consistency: p.meta.consistency.to_string(),
        host: p.meta.host.clone(),
        size: p.meta.disks.iter().map(|d| d.size).sum(),
        data_bytes: p.meta.disks.iter().map(|d| d.data_bytes).sum(),
        disks: p.meta.disks.iter().map(disk_view).collect(),
        group: p.meta.group.clone(),
        verified_by: verified.get(p.id.as_str()).cloned().unwrap_or_default(),
    }
}

/// The protection status as stored, with the lag measured at `now`.
fn protection_view(row: &crate::state::health::ProtectionRow, now: DateTime<Utc>) -> Protection {
    let s: ferry_connectors::protect::SourceStatus = serde_json::from_str(&row.status)
        .unwrap_or_else(|_| ferry_connectors::protect::SourceStatus {
            source: row.source.clone(),
            last_error: Some("the stored status cannot be read".into()),
            ..Default::default()
        });
    Protection {
        reporter: row.reporter.clone(),
        updated_ms: row.updated_ms,
        // An agent reports once per cycle: silent after three of them.
        stale: now.timestamp_millis() - row.updated_ms
            > s.report_every_secs.map_or(STALE_AFTER_MS, |e| {
                (e.max(s.last_cycle_secs) * 3000.0) as i64
            }),
        lag_secs: s
            .last_cut
            .map(|c| (now - c).num_milliseconds().max(0) as f64 / 1000.0),
        backlog_bytes: s.backlog_bytes,
        throughput_bytes_per_sec: s.throughput_bytes_per_sec,
        last_cycle_secs: s.last_cycle_secs,
        last_mode: s.last_mode,
        cycles_ok: s.cycles_ok,
        cycles_failed: s.cycles_failed,
        last_error: s.last_error.map(|e| crate::redact::redact(&e)),
    }
}

/// Where `age` stands against `objective` (seconds).
pub fn rpo_status(age: Option<f64>, objective: Option<f64>) -> RpoStatus {
    match (age, objective) {
        (_, None) => RpoStatus::Unknown,
        (None, Some(_)) => RpoStatus::Breach,
        (Some(a), Some(o)) if a > o => RpoStatus::Breach,
        (Some(a), Some(o)) if a > o * 0.75 => RpoStatus::Warning,
        _ => RpoStatus::Ok,
    }
}

/// The sources of `points` (and of protection rows with no point yet).
fn sources(
    points: &[ferry_agent::point::Point],
    protection: &[crate::state::health::ProtectionRow],
    verified: &[crate::state::Verified],
    objectives: &BTreeMap<String, (f64, String)>,
    now: DateTime<Utc>,
) -> Vec<Source> {
    let mut by_source: BTreeMap<&str, Vec<&ferry_agent::point::Point>> = BTreeMap::new();
    for p in points {
        by_source.entry(p.meta.source.as_str()).or_default().push(p);
    }
    for r in protection {
        by_source.entry(r.source.as_str()).or_default();
    }
    for name in objectives.keys() {
        by_source.entry(name.as_str()).or_default();
    }
    by_source
        .into_iter()
        .map(|(name, pts)| {
            let last = pts
                .iter()
                .max_by(|a, b| a.meta.time.cmp(&b.meta.time).then_with(|| a.id.cmp(&b.id)));
            let first = pts.iter().map(|p| p.meta.time).min();
            let protection = protection
                .iter()
                .find(|r| r.source == name)
                .map(|r| protection_view(r, now));
            let age = last.map(|p| (now - p.meta.time).num_milliseconds().max(0) as f64 / 1000.0);
            let (objective, runbook) = objectives
                .get(name)
                .map_or((None, None), |(o, rb)| (Some(*o), Some(rb.clone())));
            let status = rpo_status(age, objective);
            let ids: std::collections::HashSet<&str> = pts.iter().map(|p| p.id.as_str()).collect();
            let last_verified = verified
                .iter()
                .find(|v| ids.contains(v.point.as_str()))
                .map(|v| VerifiedBy {
                    run_id: v.run_id.clone(),
                    at_ms: v.at_ms,
                });
            let mut alerts = Vec::new();
            if pts.is_empty() {
                alerts.push("no recovery point yet".to_owned());
            }
            if let Some(p) = &protection {
                if p.stale {
                    alerts.push(format!(
                        "protection by {} has not reported for {} s",
                        p.reporter,
                        (now.timestamp_millis() - p.updated_ms) / 1000
                    ));
                }
                if let Some(e) = &p.last_error {
                    alerts.push(format!("last cycle failed: {e}"));
                }
            }
            if status == RpoStatus::Breach
                && let (Some(o), Some(rb)) = (objective, &runbook)
            {
                alerts.push(format!(
                    "newest point is older than the {} s RPO of runbook {rb}",
                    o
                ));
            }
            Source {
                source: name.to_owned(),
                disks: last
                    .map(|p| p.meta.disks.iter().map(disk_view).collect())
                    .unwrap_or_default(),
                points: pts.len(),
                first_point_time: first,
                last_point: last.map(|p| p.id.clone()),
                last_point_time: last.map(|p| p.meta.time),
                last_point_age_secs: age,
                bytes_protected: last.map_or(0, |p| p.meta.disks.iter().map(|d| d.size).sum()),
                protection,
                rpo_objective_secs: objective,
                rpo_objective_runbook: runbook,
                rpo_status: status,
                last_verified,
                alerts,
            }
        })
        .collect()
}

fn coverage(points: &[ferry_agent::point::Point], verified: &[crate::state::Verified]) -> Coverage {
    let ids: std::collections::HashSet<&str> = verified.iter().map(|v| v.point.as_str()).collect();
    let mut c = Coverage {
        points_total: points.len(),
        ..Default::default()
    };
    let mut latest: BTreeMap<&str, &ferry_agent::point::Point> = BTreeMap::new();
    for p in points {
        let size: u64 = p.meta.disks.iter().map(|d| d.size).sum();
        c.bytes_total += size;
        if ids.contains(p.id.as_str()) {
            c.points_verified += 1;
            c.bytes_verified += size;
        }
        let e = latest.entry(p.meta.source.as_str()).or_insert(p);
        if p.meta.time > e.meta.time {
            *e = p;
        }
    }
    c.sources_latest_verified = latest
        .values()
        .filter(|p| ids.contains(p.id.as_str()))
        .count();
    let present: std::collections::HashSet<&str> = points.iter().map(|p| p.id.as_str()).collect();
    c.newest_verification_ms = verified
        .iter()
        .filter(|v| present.contains(v.point.as_str()))
        .map(|v| v.at_ms)
        .max();
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpo_status_against_the_objective() {
        assert_eq!(rpo_status(Some(10.0), None), RpoStatus::Unknown);
        assert_eq!(rpo_status(None, Some(60.0)), RpoStatus::Breach);
        assert_eq!(rpo_status(Some(30.0), Some(60.0)), RpoStatus::Ok);
        assert_eq!(rpo_status(Some(50.0), Some(60.0)), RpoStatus::Warning);
        assert_eq!(rpo_status(Some(61.0), Some(60.0)), RpoStatus::Breach);
    }
}
