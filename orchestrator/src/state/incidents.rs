//! Incidents from Alertmanager, as stored: only SQL. What opens one is
//! decided above the state, by the alert routes.

use super::State;
use anyhow::Result;
use sqlx::Row;

impl State {
    /// Opens an incident for `group_key` unless one is open: true if this
    /// call opened it (a new group, or one resolved before), false if an
    /// open one exists. Atomic, so two notifications racing open one.
    pub async fn open_incident(&self, group_key: &str, runbook: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO incidents (group_key, runbook, opened_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (group_key) DO UPDATE SET runbook = excluded.runbook, opened_ms = excluded.opened_ms, \
             run_id = NULL, resolved_ms = NULL WHERE incidents.resolved_ms IS NOT NULL",
        )
        .bind(group_key)
        .bind(runbook)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the run an incident started.
    pub async fn incident_run(&self, group_key: &str, run_id: &str) -> Result<()> {
        sqlx::query("UPDATE incidents SET run_id = $1 WHERE group_key = $2")
            .bind(run_id)
            .bind(group_key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets an incident whose run could not start, so the next
    /// notification tries again.
    pub async fn drop_incident(&self, group_key: &str) -> Result<()> {
        sqlx::query("DELETE FROM incidents WHERE group_key = $1 AND run_id IS NULL")
            .bind(group_key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks an open incident resolved; false if none was open.
    pub async fn resolve_incident(&self, group_key: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE incidents SET resolved_ms = $1 WHERE group_key = $2 AND resolved_ms IS NULL",
        )
        .bind(now_ms)
        .bind(group_key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The run an incident started, if it has one.
    pub async fn incident_run_id(&self, group_key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT run_id FROM incidents WHERE group_key = $1")
            .bind(group_key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("run_id")).transpose()?.flatten())
    }
}
