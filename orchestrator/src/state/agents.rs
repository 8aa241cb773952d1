//! The fleet, as stored: enrollment tokens and agents. Policies, devices and
//! statuses are opaque JSON here; the fleet service above the state reads them.

use super::State;
use anyhow::Result;
use sqlx::Row;

/// A one-time enrollment token, as stored (its secret only as a hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollTokenRow {
    pub id: String,
    pub secret_hash: String,
    pub created_by: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub policy: String,
    pub used_ms: Option<i64>,
    pub used_by: Option<String>,
}

/// An enrolled agent, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRow {
    pub id: String,
    pub hostname: String,
    pub machine_id: String,
    pub secret_hash: String,
    pub devices: String,
    pub policy: String,
    pub enrolled_ms: i64,
    pub enrolled_with: String,
    pub last_seen_ms: Option<i64>,
    pub status: Option<String>,
    pub revoked_ms: Option<i64>,
    pub revoked_by: Option<String>,
}

fn token_row(r: &sqlx::any::AnyRow) -> Result<EnrollTokenRow> {
    Ok(EnrollTokenRow {
        id: r.try_get("id")?,
        secret_hash: r.try_get("secret_hash")?,
        created_by: r.try_get("created_by")?,
        created_ms: r.try_get("created_ms")?,
        expires_ms: r.try_get("expires_ms")?,
        policy: r.try_get("policy")?,
        used_ms: r.try_get("used_ms")?,
        used_by: r.try_get("used_by")?,
    })
}

fn agent_row(r: &sqlx::any::AnyRow) -> Result<AgentRow> {
    Ok(AgentRow {
        id: r.try_get("id")?,
        hostname: r.try_get("hostname")?,
        machine_id: r.try_get("machine_id")?,
        secret_hash: r.try_get("secret_hash")?,
        devices: r.try_get("devices")?,
        policy: r.try_get("policy")?,
        enrolled_ms: r.try_get("enrolled_ms")?,
        enrolled_with: r.try_get("enrolled_with")?,
        last_seen_ms: r.try_get("last_seen_ms")?,
        status: r.try_get("status")?,
        revoked_ms: r.try_get("revoked_ms")?,
        revoked_by: r.try_get("revoked_by")?,
    })
}

impl State {
    pub async fn add_enroll_token(&self, t: &EnrollTokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO agent_tokens (id, secret_hash, created_by, created_ms, expires_ms, policy) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&t.id)
        .bind(&t.secret_hash)
        .bind(&t.created_by)
        .bind(t.created_ms)
        .bind(t.expires_ms)
        .bind(&t.policy)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRow>> {
        let r = sqlx::query("SELECT * FROM agent_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        r.as_ref().map(token_row).transpose()
    }

    /// Marks a token used by `agent` unless it was used already; true if this
    /// call used it (two enrollments racing with one token: one wins).
    pub async fn use_enroll_token(&self, id: &str, agent: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE agent_tokens SET used_ms = $1, used_by = $2 WHERE id = $3 AND used_ms IS NULL",
        )
        .bind(now_ms)
        .bind(agent)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn add_agent(&self, a: &AgentRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO agents (id, hostname, machine_id, secret_hash, devices, policy, enrolled_ms, enrolled_with) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&a.id)
        .bind(&a.hostname)
        .bind(&a.machine_id)
        .bind(&a.secret_hash)
        .bind(&a.devices)
        .bind(&a.policy)
        .bind(a.enrolled_ms)
        .bind(&a.enrolled_with)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn agent(&self, id: &str) -> Result<Option<AgentRow>> {
        let r = sqlx::query("SELECT * FROM agents WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        r.as_ref().map(agent_row).transpose()
    }

    /// Every agent, revoked ones too, by host name.
    pub async fn agents(&self) -> Result<Vec<AgentRow>> {
        let rows = sqlx::query("SELECT * FROM agents ORDER BY hostname, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_row).collect()
    }

    /// The agent was heard from; with a status when it pushed one.
    pub async fn agent_seen(&self, id: &str, now_ms: i64, status: Option<&str>) -> Result<()> {
        match status {
            Some(s) => {
                sqlx::query("UPDATE agents SET last_seen_ms = $1, status = $2 WHERE id = $3")
                    .bind(now_ms)
                    .bind(s)
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("UPDATE agents SET last_seen_ms = $1 WHERE id = $2")
                    .bind(now_ms)
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(())
    }

    pub async fn set_agent_policy(&self, id: &str, policy: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE agents SET policy = $1 WHERE id = $2 AND revoked_ms IS NULL")
                .bind(policy)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Revokes an agent; false if there is none or it was revoked already.
    pub async fn revoke_agent(&self, id: &str, by: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE agents SET revoked_ms = $1, revoked_by = $2 WHERE id = $3 AND revoked_ms IS NULL",
        )
        .bind(now_ms)
        .bind(by)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
