//! Users, API tokens, console sessions and the audit log, as stored: only
//! SQL. What they mean (roles, hashing, expiry) is decided in the layer
//! above, which imports this one; nothing here imports it.

use super::State;
use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::Row;

/// A user as stored.
#[derive(Clone, Debug, Serialize)]
pub struct UserRow {
    pub name: String,
    pub role: String,
    #[serde(skip)]
    pub password_hash: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// An API token as stored (never its secret).
#[derive(Clone, Debug, Serialize)]
pub struct TokenRow {
    pub id: String,
    pub user: String,
    pub label: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
}

/// A console session as stored.
#[derive(Clone, Debug)]
pub struct SessionRow {
    pub user: String,
    pub csrf: String,
    pub expires_ms: i64,
}

/// One entry of the audit log.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// Who: a user's name, `api-token` (the server's own token), or
    /// `OSUSER (cli)` for the command line.
    pub actor: String,
    /// What, e.g. `run.start`, `run.approve`, `user.add`, `login.failed`.
    pub action: String,
    /// What it was done to: a run id, a user's name.
    pub subject: String,
    pub detail: String,
}

fn user_row(r: &sqlx::any::AnyRow) -> Result<UserRow> {
    Ok(UserRow {
        name: r.try_get("name")?,
        role: r.try_get("role")?,
        password_hash: r.try_get("password_hash")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

fn token_row(r: &sqlx::any::AnyRow) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.try_get("id")?,
        user: r.try_get("user_name")?,
        label: r.try_get("label")?,
        secret_hash: r.try_get("secret_hash")?,
        created_ms: r.try_get("created_ms")?,
        expires_ms: r.try_get("expires_ms")?,
        last_used_ms: r.try_get("last_used_ms")?,
    })
}

impl State {
    /// Adds a user; false if one of that name exists (nothing changes).
    pub async fn add_user(&self, name: &str, role: &str, hash: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO users (name, role, password_hash, created_ms, updated_ms)
             SELECT $1, $2, $3, $4, $4 WHERE NOT EXISTS (SELECT 1 FROM users WHERE name = $1)",
        )
        .bind(name)
        .bind(role)
        .bind(hash)
        .bind(now)
        .execute(&self.pool)
        .await
        .with_context(|| format!("cannot add user {name}"))?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn user(&self, name: &str) -> Result<Option<UserRow>> {
        let row = sqlx::query("SELECT * FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_row).transpose()
    }

    pub async fn users(&self) -> Result<Vec<UserRow>> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(user_row).collect()
    }

    /// How many users hold `role`.
    pub async fn count_role(&self, role: &str) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM users WHERE role = $1")
            .bind(role)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Sets a user's password hash and ends their sessions; false if no such user.
    pub async fn set_password(&self, name: &str, hash: &str, now: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done =
            sqlx::query("UPDATE users SET password_hash = $1, updated_ms = $2 WHERE name = $3")
                .bind(hash)
                .bind(now)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM sessions WHERE user_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets a user's role; false if no such user.
    pub async fn set_role(&self, name: &str, role: &str, now: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE users SET role = $1, updated_ms = $2 WHERE name = $3")
            .bind(role)
            .bind(now)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes a user with their tokens and sessions; false if no such user.
    pub async fn remove_user(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        for q in [
            "DELETE FROM api_tokens WHERE user_name = $1",
            "DELETE FROM sessions WHERE user_name = $1",
        ] {
            sqlx::query(q).bind(name).execute(&mut *tx).await?;
        }
        let done = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn add_token(&self, t: &TokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, user_name, label, secret_hash, created_ms, expires_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&t.id)
        .bind(&t.user)
        .bind(&t.label)
        .bind(&t.secret_hash)
        .bind(t.created_ms)
        .bind(t.expires_ms)
        .execute(&self.pool)
        .await
        .context("cannot record the token")?;
        Ok(())
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRow>> {
        let row = sqlx::query("SELECT * FROM api_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_row).transpose()
    }

    /// Tokens, of one user or of all, oldest first.
    pub async fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenRow>> {
        let rows = match user {
            Some(u) => {
                sqlx::query("SELECT * FROM api_tokens WHERE user_name = $1 ORDER BY created_ms")
                    .bind(u)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM api_tokens ORDER BY created_ms")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(token_row).collect()
    }

    /// Records a token's use, at most once a minute (a write per request
    /// would make every read a write).
    pub async fn touch_token(&self, id: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE api_tokens SET last_used_ms = $1
             WHERE id = $2 AND (last_used_ms IS NULL OR last_used_ms < $3)",
        )
        .bind(now)
        .bind(id)
        .bind(now - 60_000)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// False if there was no such token.
    pub async fn remove_token(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Starts a session, and drops the ones that expired.
    pub async fn add_session(
        &self,
        id_hash: &str,
        user: &str,
        csrf: &str,
        now: i64,
        expires_ms: i64,
    ) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE expires_ms < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO sessions (id_hash, user_name, csrf, created_ms, expires_ms)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id_hash)
        .bind(user)
        .bind(csrf)
        .bind(now)
        .bind(expires_ms)
        .execute(&self.pool)
        .await
        .context("cannot record the session")?;
        Ok(())
    }

    pub async fn session(&self, id_hash: &str) -> Result<Option<SessionRow>> {
        let row =
            sqlx::query("SELECT user_name, csrf, expires_ms FROM sessions WHERE id_hash = $1")
                .bind(id_hash)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok(SessionRow {
                user: r.try_get("user_name")?,
                csrf: r.try_get("csrf")?,
                expires_ms: r.try_get("expires_ms")?,
            })
        })
        .transpose()
    }

    pub async fn remove_session(&self, id_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Appends to the audit log.
    pub async fn audit(&self, e: &AuditEntry) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit (id, at_ms, actor, action, subject, detail)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(crate::sys::random_hex(8))
        .bind(e.at_ms)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.subject)
        .bind(&e.detail)
        .execute(&self.pool)
        .await
        .context("cannot write the audit log")?;
        Ok(())
    }

    /// The audit log, newest first, before `before_ms` when given.
    pub async fn audit_log(&self, limit: i64, before_ms: Option<i64>) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT at_ms, actor, action, subject, detail FROM audit
             WHERE at_ms < $1 ORDER BY at_ms DESC, id LIMIT $2",
        )
        .bind(before_ms.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at_ms: r.try_get("at_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    subject: r.try_get("subject")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}
