//! Durable state through sqlx: SQLite by default (a file created on first
//! use), PostgreSQL by URL. The only module that knows SQL.
//!
//! A run is a row in `runs` plus its append-only log in `events`; the engine's
//! state is the log folded by `Engine::apply`. Other processes (`ferry
//! approve`, `cancel`, `rollback`, the API) never write a run's log: they queue
//! a row in `commands`, which the process running the run turns into events,
//! so each log has one writer, the holder of the run's lease.

use crate::error::Error;
use anyhow::{Context, Result};
use ferry_engine::Event;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyPoolOptions;
use std::collections::BTreeMap;

/// Schema migrations (`orchestrator/migrations/*.sql`), shipped in the binary
/// and applied in order, each once.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A run as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRow {
    pub id: String,
    pub runbook: String,
    pub file: String,
    /// The runbook's text as it was when the run started.
    #[serde(skip_serializing)]
    pub source: String,
    /// Params as given (`--param k=v`), before defaults.
    pub params: BTreeMap<String, String>,
    pub mode: String,
    /// `running` until it finishes: then succeeded, failed, cancelled or rolled_back.
    pub status: String,
    /// `COMMIT` or `COMMIT-dirty` when the runbook sat in a git checkout.
    pub git_commit: Option<String>,
    pub repo: Option<String>,
    pub work_dir: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// `HOST:PID:NONCE` of the runner driving it.
    pub owner: Option<String>,
    pub lease_ms: Option<i64>,
    /// The runbook target its steps run on unless they name their own
    /// (`--target`); `None`: the runbook's first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One entry of a run's log.
#[derive(Clone, Debug, Serialize)]
pub struct Stored {
    pub seq: i64,
    pub at_ms: i64,
    pub event: Event,
}

/// A request from another process for a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Approve { step: String, by: String },
    Cancel { by: String },
    Rollback { by: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    pub repo: String,
    pub point: String,
    pub source: String,
    pub point_time: String,
    pub run_id: String,
    pub at_ms: i64,
}

#[derive(Clone, Debug)]
pub struct State {
    pool: AnyPool,
    /// Where it is, without credentials.
    pub location: String,
    /// Woken whenever this process appends events or queues a command, so a
    /// runner and the event streams of the same process act at once instead
    /// of at their next poll (writes by other processes are still polled).
    changed: std::sync::Arc<tokio::sync::Notify>,
}

pub use crate::redact::redact;

pub mod agents;
pub mod health;
pub mod incidents;
pub mod schedules;
pub mod users;

impl State {
    /// Opens (creating on first use) the state at `url`: `sqlite://PATH`
    /// or `postgres://...`. Applies pending migrations.
    pub async fn open(url: &str) -> Result<State> {
        sqlx::any::install_default_drivers();
        let location = redact(url);
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_owned()
        };
        let sqlite_path = sqlite
            .then(|| {
                url.strip_prefix("sqlite://")
                    .and_then(|p| p.split('?').next())
            })
            .flatten()
            .filter(|p| !p.is_empty() && *p != ":memory:")
            .map(std::path::PathBuf::from);
        if let Some(dir) = sqlite_path.as_deref().and_then(std::path::Path::parent) {
            crate::fsutil::create_private_dir(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        if let Some(db) = &sqlite_path {
            // Created private before SQLite creates it (its -wal and -shm
            // files take the database's mode): it holds runbook sources,
            // params and step outputs.
            crate::fsutil::private_file(db)
                .with_context(|| format!("cannot create the state database {}", db.display()))?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .acquire_timeout(std::time::Duration::from_secs(15))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL: readers never block the writer; NORMAL is durable
                        // across process crashes (not power loss of the last commits).
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .with_context(|| format!("cannot open the state database {location}"))?;
        let state = State {
            pool,
            location,
            changed: std::sync::Arc::default(),
        };
        state.migrate(sqlite_path.as_deref()).await?;
        Ok(state)
    }

    /// Applies pending migrations. Processes opening a new state at the same
    /// moment wait for each other instead of failing: PostgreSQL through the
    /// migrator's advisory lock, SQLite through an exclusive `flock` on a file
    /// beside the database (SQLite's own locks cannot span the migrator's
    /// transactions).
    async fn migrate(&self, sqlite_path: Option<&std::path::Path>) -> Result<()> {
        let _guard = match sqlite_path {
            Some(db) => Some(migration_lock(db).await?),
            None => None,
        };
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(v) => anyhow::anyhow!(
                "the state database {} has schema migration {v}, which this ferry does not know: it was written by a newer ferry; upgrade ferry",
                self.location
            ),
            other => anyhow::Error::from(other)
                .context(format!("cannot set up the tables of {}", self.location)),
        })
    }

    pub async fn create_run(&self, r: &RunRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO runs (id, runbook, file, source, params, mode, status, git_commit, repo, work_dir, created_ms, owner, lease_ms, target)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&r.id)
        .bind(&r.runbook)
        .bind(&r.file)
        .bind(&r.source)
        .bind(serde_json::to_string(&r.params)?)
        .bind(&r.mode)
        .bind(&r.status)
        .bind(r.git_commit.clone())
        .bind(r.repo.clone())
        .bind(&r.work_dir)
        .bind(r.created_ms)
        .bind(r.owner.clone())
        .bind(r.lease_ms)
        .bind(r.target.clone())
        .execute(&self.pool)
        .await
        .with_context(|| format!("cannot record run {}", r.id))?;
        Ok(())
    }

    fn row(row: &sqlx::any::AnyRow) -> Result<RunRow> {
        let params: String = row.try_get("params")?;
        Ok(RunRow {
            id: row.try_get("id")?,
            runbook: row.try_get("runbook")?,
            file: row.try_get("file")?,
            source: row.try_get("source")?,
            params: serde_json::from_str(&params).unwrap_or_default(),
            mode: row.try_get("mode")?,
            status: row.try_get("status")?,
            git_commit: row.try_get("git_commit")?,
            repo: row.try_get("repo")?,
            work_dir: row.try_get("work_dir")?,
            created_ms: row.try_get("created_ms")?,
            finished_ms: row.try_get("finished_ms")?,
            owner: row.try_get("owner")?,
            lease_ms: row.try_get("lease_ms")?,
            target: row.try_get("target")?,
        })
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunRow>> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(State::row).transpose()
    }

    /// A run by id, or by a unique prefix of it.
    /// Records what planning predicted for a run (JSON of a `Forecast`).
    pub async fn set_forecast(&self, id: &str, forecast: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET forecast = $1 WHERE id = $2")
            .bind(forecast)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// What planning predicted for a run, if it was recorded.
    pub async fn forecast(&self, id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT forecast FROM runs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|r| r.try_get::<Option<String>, _>("forecast").ok().flatten()))
    }

    pub async fn find_run(&self, id: &str) -> Result<RunRow> {
        if let Some(r) = self.run(id).await? {
            return Ok(r);
        }
        let rows =
            sqlx::query("SELECT * FROM runs WHERE id LIKE $1 ORDER BY created_ms DESC LIMIT 3")
                .bind(format!("{}%", id.replace(['%', '_'], "")))
                .fetch_all(&self.pool)
                .await?;
        match rows.len() {
            1 => State::row(&rows[0]),
            0 => Err(Error::not_found(format!(
                "no run `{id}` in {}; list them with `ferry runs`",
                self.location
            ))
            .into()),
            _ => Err(
                Error::usage(format!("`{id}` matches several runs; give more of the id")).into(),
            ),
        }
    }

    /// Runs, newest first.
    pub async fn runs(&self, limit: i64) -> Result<Vec<RunRow>> {
        let rows = sqlx::query("SELECT * FROM runs ORDER BY created_ms DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(State::row).collect()
    }

    /// Finished runs of one mode (`drill`, `run`), newest first.
    /// The newest `limit` finished runs of a mode, of one runbook (by name)
    /// or of all.
    pub async fn finished_runs(
        &self,
        mode: &str,
        runbook: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunRow>> {
        let rows = match runbook {
            Some(name) => sqlx::query(
                "SELECT * FROM runs WHERE mode = $1 AND status <> 'running' AND runbook = $2 ORDER BY created_ms DESC LIMIT $3",
            )
            .bind(mode)
            .bind(name)
            .bind(limit),
            None => sqlx::query(
                "SELECT * FROM runs WHERE mode = $1 AND status <> 'running' ORDER BY created_ms DESC LIMIT $2",
            )
            .bind(mode)
            .bind(limit),
        }
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(State::row).collect()
    }

    /// Runs not finished, oldest first.
    pub async fn unfinished(&self) -> Result<Vec<RunRow>> {
        let rows = sqlx::query("SELECT * FROM runs WHERE status = 'running' ORDER BY created_ms")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(State::row).collect()
    }

    /// Resolves at the next append or queued command of this process.
    /// Create it before reading what it guards, so nothing falls in between.
    pub fn changed(&self) -> tokio::sync::futures::OwnedNotified {
        self.changed.clone().notified_owned()
    }

    /// Appends events `first_seq..` in one transaction. Fails if another
    /// process wrote the same sequence numbers.
    pub async fn append(&self, run: &str, first_seq: i64, events: &[(i64, &Event)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (i, (at, ev)) in events.iter().enumerate() {
            sqlx::query("INSERT INTO events (run_id, seq, at_ms, body) VALUES ($1, $2, $3, $4)")
                .bind(run)
                .bind(first_seq + i as i64)
                .bind(*at)
                .bind(serde_json::to_string(ev)?)
                .execute(&mut *tx)
                .await
                .with_context(|| {
                    format!("cannot append to the log of run {run} (is another ferry running it?)")
                })?;
        }
        tx.commit()
            .await
            .with_context(|| format!("cannot commit to the log of run {run}"))?;
        self.changed.notify_waiters();
        Ok(())
    }

    pub async fn events(&self, run: &str) -> Result<Vec<Stored>> {
        self.events_after(run, -1).await
    }

    pub async fn events_after(&self, run: &str, seq: i64) -> Result<Vec<Stored>> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, body FROM events WHERE run_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(run)
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let body: String = r.try_get("body")?;
                let seq: i64 = r.try_get("seq")?;
                let event = serde_json::from_str(&body).with_context(|| {
                    format!("event {seq} of run {run} is not readable by this ferry")
                })?;
                Ok(Stored {
                    seq,
                    at_ms: r.try_get("at_ms")?,
                    event,
                })
            })
            .collect()
    }

    pub async fn finish(&self, run: &str, status: &str, at_ms: i64) -> Result<()> {
        sqlx::query("UPDATE runs SET status = $1, finished_ms = $2, owner = NULL, lease_ms = NULL WHERE id = $3")
            .bind(status)
            .bind(at_ms)
            .bind(run)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks a finished run running again (a rollback requested after it ended).
    pub async fn reopen(&self, run: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET status = 'running', finished_ms = NULL WHERE id = $1")
            .bind(run)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes or renews the lease on a run: succeeds when nobody holds it,
    /// the holder is `owner`, the lease ran out, or `dead_owner` held it.
    pub async fn claim(
        &self,
        run: &str,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        dead_owner: Option<&str>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE runs SET owner = $1, lease_ms = $2
             WHERE id = $3 AND (owner IS NULL OR owner = $1 OR lease_ms < $4 OR (owner = $5 AND $5 <> ''))",
        )
        .bind(owner)
        .bind(now_ms + lease_ms)
        .bind(run)
        .bind(now_ms)
        .bind(dead_owner.unwrap_or(""))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn push_command(&self, run: &str, id: &str, at_ms: i64, cmd: &Command) -> Result<()> {
        sqlx::query("INSERT INTO commands (id, run_id, at_ms, body) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(run)
            .bind(at_ms)
            .bind(serde_json::to_string(cmd)?)
            .execute(&self.pool)
            .await?;
        self.changed.notify_waiters();
        Ok(())
    }

    /// Commands not yet turned into events, oldest first.
    pub async fn open_commands(&self, run: &str) -> Result<Vec<(String, Command)>> {
        let rows = sqlx::query("SELECT id, body FROM commands WHERE run_id = $1 AND done_ms IS NULL ORDER BY at_ms, id")
            .bind(run)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let body: String = r.try_get("body")?;
            if let Ok(c) = serde_json::from_str(&body) {
                out.push((r.try_get("id")?, c));
            }
        }
        Ok(out)
    }

    pub async fn command_done(&self, id: &str, at_ms: i64) -> Result<()> {
        sqlx::query("UPDATE commands SET done_ms = $1 WHERE id = $2")
            .bind(at_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn mark_verified(&self, v: &Verified) -> Result<()> {
        sqlx::query(
            "INSERT INTO verified_points (repo, point, source, point_time, run_id, at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&v.repo)
        .bind(&v.point)
        .bind(&v.source)
        .bind(&v.point_time)
        .bind(&v.run_id)
        .bind(v.at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Verified points, newest verification first.
    pub async fn verified(&self) -> Result<Vec<Verified>> {
        let rows = sqlx::query("SELECT * FROM verified_points ORDER BY at_ms DESC")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Verified {
                    repo: r.try_get("repo")?,
                    point: r.try_get("point")?,
                    source: r.try_get("source")?,
                    point_time: r.try_get("point_time")?,
                    run_id: r.try_get("run_id")?,
                    at_ms: r.try_get("at_ms")?,
                })
            })
            .collect()
    }

    /// Durations (seconds) of each step's successful tries in the last
    /// finished runs of a runbook, for `ferry plan`'s prediction.
    /// How long each step took in the last `runs` successful runs of
    /// `runbook` on `target` (the run's `--target`, or `first` — the
    /// runbook's first target — when it gave none), with the restored
    /// disk's size for restores.
    pub async fn step_history(
        &self,
        runbook: &str,
        target: &str,
        first: &str,
        runs: i64,
    ) -> Result<History> {
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM runs WHERE runbook = $1 AND COALESCE(target, $2) = $3 AND status IN ('succeeded', 'rolled_back') ORDER BY created_ms DESC LIMIT $4",
        )
        .bind(runbook)
        .bind(first)
        .bind(target)
        .bind(runs)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .filter_map(|r| r.try_get::<String, _>("id").ok())
        .collect();
        let mut out = History {
            runs: ids.len(),
            ..Default::default()
        };
        for id in ids {
            let mut started = BTreeMap::new();
            for s in self.events(&id).await? {
                match s.event {
                    Event::StepStarted { step, delay_ms, .. } => {
                        started.insert(step, s.at_ms + delay_ms as i64);
                    }
                    Event::StepSucceeded { step, outputs } => {
                        if let Some(t) = started.get(&step) {
                            // A restore's outputs name its point and size.
                            let bytes = outputs
                                .get("point")
                                .and(outputs.get("size"))
                                .and_then(serde_json::Value::as_u64);
                            out.steps.entry(step).or_default().push(StepTime {
                                secs: (s.at_ms - t) as f64 / 1000.0,
                                bytes,
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

/// One past try of a step that succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTime {
    pub secs: f64,
    /// For `volume.restore`: the disk's size, from the step's outputs.
    pub bytes: Option<u64>,
}

/// Past successful runs of a runbook on one target.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// By step (node) id.
    pub steps: BTreeMap<String, Vec<StepTime>>,
    pub runs: usize,
}

/// Holds an exclusive lock on `DB.lock` while migrations run.
async fn migration_lock(db: &std::path::Path) -> Result<std::fs::File> {
    let path = db.with_extension("lock");
    let file = crate::fsutil::private_file(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let file = tokio::task::spawn_blocking(move || {
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map(|()| file)
    })
    .await
    .context("migration lock")?
    .with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_state_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home");
        let db = home.join("state.db");
        State::open(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&home), 0o700, "FERRY_HOME");
        assert_eq!(
            mode(&db),
            0o600,
            "state.db holds runbook sources and outputs"
        );
    }
}
