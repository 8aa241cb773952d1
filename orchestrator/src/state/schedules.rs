//! Schedules, as stored: only SQL. Their cron expressions and jobs are
//! opaque text here; the schedule service above the state reads them.

use super::State;
use anyhow::Result;
use sqlx::Row;

/// One schedule as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleRow {
    pub name: String,
    pub cron: String,
    /// The job as JSON.
    pub job: String,
    pub created_by: String,
    pub created_ms: i64,
    pub next_ms: i64,
    pub last_fired_ms: Option<i64>,
    pub last_outcome: Option<String>,
}

fn row(r: &sqlx::any::AnyRow) -> Result<ScheduleRow> {
    Ok(ScheduleRow {
        name: r.try_get("name")?,
        cron: r.try_get("cron")?,
        job: r.try_get("job")?,
        created_by: r.try_get("created_by")?,
        created_ms: r.try_get("created_ms")?,
        next_ms: r.try_get("next_ms")?,
        last_fired_ms: r.try_get("last_fired_ms")?,
        last_outcome: r.try_get("last_outcome")?,
    })
}

impl State {
    /// Adds a schedule; false if one of that name exists.
    pub async fn add_schedule(&self, s: &ScheduleRow) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO schedules (name, cron, job, created_by, created_ms, next_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&s.name)
        .bind(&s.cron)
        .bind(&s.job)
        .bind(&s.created_by)
        .bind(s.created_ms)
        .bind(s.next_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Every schedule, by name.
    pub async fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        let rows = sqlx::query("SELECT * FROM schedules ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row).collect()
    }

    /// Removes a schedule; false if there was none.
    pub async fn remove_schedule(&self, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM schedules WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The schedules due at `now_ms`, soonest first.
    pub async fn due_schedules(&self, now_ms: i64) -> Result<Vec<ScheduleRow>> {
        let rows =
            sqlx::query("SELECT * FROM schedules WHERE next_ms <= $1 ORDER BY next_ms, name")
                .bind(now_ms)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(row).collect()
    }

    /// Claims the firing of `name` that was due at `due_ms`: moves it to
    /// `next_ms` unless another process did first. True if this one won.
    pub async fn claim_schedule(
        &self,
        name: &str,
        due_ms: i64,
        fired_ms: i64,
        next_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE schedules SET next_ms = $1, last_fired_ms = $2 WHERE name = $3 AND next_ms = $4",
        )
        .bind(next_ms)
        .bind(fired_ms)
        .bind(name)
        .bind(due_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records what a firing started, or why it could not.
    pub async fn schedule_outcome(&self, name: &str, outcome: &str) -> Result<()> {
        sqlx::query("UPDATE schedules SET last_outcome = $1 WHERE name = $2")
            .bind(outcome)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
