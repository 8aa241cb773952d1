//! Protection status and repository checks, as stored: only SQL. `ferry
//! protect` writes one row per source every few seconds and `ferry check`
//! one row per check; the API and `/metrics` read them.

use super::State;
use anyhow::Result;
use sqlx::Row;

/// A source's protection status as its protecting process last wrote it.
#[derive(Clone, Debug)]
pub struct ProtectionRow {
    pub source: String,
    pub repo: String,
    /// `HOST:PID` of the writer.
    pub reporter: String,
    pub updated_ms: i64,
    /// The status as JSON (`ferry_connectors::protect::SourceStatus`).
    pub status: String,
}

/// The outcome of one `ferry check`.
#[derive(Clone, Debug, Default)]
pub struct CheckRow {
    pub id: String,
    pub repo: String,
    pub at_ms: i64,
    pub ok: bool,
    pub read_data: bool,
    pub points: i64,
    pub packs: i64,
    pub chunks: i64,
    pub bytes_read: i64,
    pub problems: i64,
    pub damaged_points: i64,
}

impl State {
    /// Writes (or rewrites) each source's protection status.
    pub async fn put_protection(&self, rows: &[ProtectionRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO protection (source, repo, reporter, updated_ms, status) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (source) DO UPDATE SET repo = excluded.repo, reporter = excluded.reporter, \
                 updated_ms = excluded.updated_ms, status = excluded.status",
            )
            .bind(&r.source)
            .bind(&r.repo)
            .bind(&r.reporter)
            .bind(r.updated_ms)
            .bind(&r.status)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every source's last written protection status.
    pub async fn protection(&self) -> Result<Vec<ProtectionRow>> {
        let rows = sqlx::query("SELECT * FROM protection ORDER BY source")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ProtectionRow {
                    source: r.try_get("source")?,
                    repo: r.try_get("repo")?,
                    reporter: r.try_get("reporter")?,
                    updated_ms: r.try_get("updated_ms")?,
                    status: r.try_get("status")?,
                })
            })
            .collect()
    }

    pub async fn record_check(&self, c: &CheckRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO repo_checks (id, repo, at_ms, ok, read_data, points, packs, chunks, bytes_read, problems, damaged_points) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&c.id)
        .bind(&c.repo)
        .bind(c.at_ms)
        .bind(i32::from(c.ok))
        .bind(i32::from(c.read_data))
        .bind(c.points)
        .bind(c.packs)
        .bind(c.chunks)
        .bind(c.bytes_read)
        .bind(c.problems)
        .bind(c.damaged_points)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest checks of a repository, newest first.
    pub async fn checks(&self, repo: &str, limit: i64) -> Result<Vec<CheckRow>> {
        let rows =
            sqlx::query("SELECT * FROM repo_checks WHERE repo = $1 ORDER BY at_ms DESC LIMIT $2")
                .bind(repo)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(CheckRow {
                    id: r.try_get("id")?,
                    repo: r.try_get("repo")?,
                    at_ms: r.try_get("at_ms")?,
                    ok: r.try_get::<i32, _>("ok")? != 0,
                    read_data: r.try_get::<i32, _>("read_data")? != 0,
                    points: r.try_get("points")?,
                    packs: r.try_get("packs")?,
                    chunks: r.try_get("chunks")?,
                    bytes_read: r.try_get("bytes_read")?,
                    problems: r.try_get("problems")?,
                    damaged_points: r.try_get("damaged_points")?,
                })
            })
            .collect()
    }

    /// How many runs ended in each (mode, status), for `/metrics`.
    pub async fn run_outcomes(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT mode, status, COUNT(*) AS n FROM runs GROUP BY mode, status ORDER BY mode, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("mode")?, r.try_get("status")?, r.try_get("n")?)))
            .collect()
    }
}
