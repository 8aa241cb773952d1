//! Who may do what: users with roles, their passwords (Argon2id), API
//! tokens, console sessions, the login rate limit, and the audit log's
//! entries. The API and the command line share it; the state stores only
//! hashes of secrets.
//!
//! Roles are ordered: a viewer reads; an operator also starts drills and
//! runs, plans, approves, cancels and rolls back; an admin also manages users
//! and tokens. The server's own token (`FERRY_HOME/api-token`) acts as an
//! admin named `api-token`.

use crate::error::Error;
use crate::state::State;
use crate::state::users::{AuditEntry, TokenRow};
use argon2::{PasswordHasher as _, PasswordVerifier as _};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a user may do; each role may do what the ones before it may.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but users and tokens.
    Viewer,
    /// Also starts drills and runs, approves, cancels and rolls back.
    Operator,
    /// Also manages users and tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a request or command acts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// A user's name, or `api-token` for the server's own token.
    pub name: String,
    pub role: Role,
}

impl Identity {
    /// Refuses (403) unless the identity holds `role` or a higher one.
    pub fn require(&self, role: Role) -> Result<(), Error> {
        if self.role >= role {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "{} is a {} and this needs the {role} role; an admin can change it with `ferry user role {} {role}`",
                self.name, self.role, self.name
            )))
        }
    }
}

/// The name the server's own token acts under.
pub const SERVER_TOKEN_IDENTITY: &str = "api-token";
/// The shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// The longest: Argon2 hashes any length, but a bound keeps a request cheap.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// How long a console session lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// The prefix of API tokens, so that scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "ferry_";

/// A user name: 1 to 64 letters, digits, `.`, `_`, `-` and `@`, not
/// starting with `-`; `api-token` and `cli:*` are taken.
pub fn check_user_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
        && name != SERVER_TOKEN_IDENTITY;
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "user name {name:?}: use 1 to 64 letters, digits, ., _, - and @ (not starting with -; `{SERVER_TOKEN_IDENTITY}` is taken)"
        )))
    }
}

/// Refuses a password too short or too long to use.
pub fn check_password(password: &str) -> Result<(), Error> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(Error::usage(format!(
            "the password is too short: use at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::usage(format!(
            "the password is longer than {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Argon2id with the RFC 9106 "second recommended" cost OWASP gives for
/// passwords (19 MiB, 2 passes, 1 lane); one hash adds 40-130 ms to a
/// `ferry user passwd` here.
fn hasher() -> argon2::Argon2<'static> {
    argon2::Argon2::default()
}

/// The PHC string of `password` under a fresh salt.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = crate::sys::random_bytes(16)?;
    Ok(hasher()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?
        .to_string())
}

/// [`hash_password`] on the blocking pool (it is deliberately slow: never on
/// the async workers).
pub async fn hash_password_blocking(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| anyhow::anyhow!("password hashing stopped: {e}"))?
}

/// Whether `password` matches the PHC string `hash` (false for a hash this
/// build cannot read).
pub fn verify_password(password: &str, hash: &str) -> bool {
    hasher().verify_password(password.as_bytes(), hash).is_ok()
}

/// A hash no password matches, verified when a user does not exist so that
/// a failed login takes as long whether or not the name is known.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        hash_password(&crate::sys::random_hex(16))
            .unwrap_or_else(|_| "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$AAAA".into())
    })
}

/// SHA-256 of a secret, in hex (tokens and session ids are random and long:
/// a fast hash is enough, and lets them be looked up).
pub fn secret_hash(secret: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        secret.as_bytes(),
    ))
}

/// Equal in time that does not depend on where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The user a name and password log in as, or why not. Every failure says
/// the same thing, so that the message does not tell which names exist.
pub async fn login(state: &State, name: &str, password: &str) -> anyhow::Result<Option<Identity>> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Ok(None);
    }
    let user = state.user(name).await?;
    let hash = user
        .as_ref()
        .map_or_else(|| decoy_hash().to_owned(), |u| u.password_hash.clone());
    let pw = password.to_owned();
    let ok = tokio::task::spawn_blocking(move || verify_password(&pw, &hash)).await?;
    Ok(match (user, ok) {
        (Some(u), true) => Role::parse(&u.role).map(|role| Identity { name: u.name, role }),
        _ => None,
    })
}

/// A new credential `PREFIXID_SECRET` (API tokens, agents' enrollment
/// tokens and credentials): what to give its holder (shown once), its id,
/// and the hash of its secret to store.
pub struct Minted {
    pub credential: String,
    pub id: String,
    pub secret_hash: String,
}

pub fn mint(prefix: &str) -> anyhow::Result<Minted> {
    let id = crate::sys::random_hex(6);
    let secret = hex::encode(crate::sys::random_bytes(24)?);
    Ok(Minted {
        credential: format!("{prefix}{id}_{secret}"),
        secret_hash: secret_hash(&secret),
        id,
    })
}

/// The id and secret of a credential minted with `prefix`.
pub fn split_credential<'a>(credential: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    credential.strip_prefix(prefix)?.split_once('_')
}

/// Whether `secret` hashes to `stored`, compared in constant time.
pub fn secret_matches(secret: &str, stored: &str) -> bool {
    same(secret_hash(secret).as_bytes(), stored.as_bytes())
}

/// A new API token for `user`: what to give its holder (shown once) and what
/// to store.
pub fn new_token(
    user: &str,
    label: &str,
    now_ms: i64,
    expires_ms: Option<i64>,
) -> anyhow::Result<(String, TokenRow)> {
    let m = mint(TOKEN_PREFIX)?;
    Ok((
        m.credential,
        TokenRow {
            id: m.id,
            user: user.to_owned(),
            label: label.to_owned(),
            secret_hash: m.secret_hash,
            created_ms: now_ms,
            expires_ms,
            last_used_ms: None,
        },
    ))
}

/// The identity an API token (`ferry_ID_SECRET`) acts as: its user's, with
/// the user's current role; None for a token that is unknown, expired,
/// revoked, or whose user is gone.
pub async fn token_identity(
    state: &State,
    token: &str,
    now_ms: i64,
) -> anyhow::Result<Option<Identity>> {
    let Some((id, secret)) = split_credential(token, TOKEN_PREFIX) else {
        return Ok(None);
    };
    let Some(row) = state.token(id).await? else {
        return Ok(None);
    };
    if !secret_matches(secret, &row.secret_hash) || row.expires_ms.is_some_and(|e| e <= now_ms) {
        return Ok(None);
    }
    let Some(user) = state.user(&row.user).await? else {
        return Ok(None);
    };
    state.touch_token(id, now_ms).await?;
    Ok(Role::parse(&user.role).map(|role| Identity {
        name: user.name,
        role,
    }))
}

/// A console session: the cookie's value (given to the browser once) and
/// the CSRF token every state-changing request must carry.
pub struct NewSession {
    pub cookie: String,
    pub csrf: String,
    pub expires_ms: i64,
}

pub async fn start_session(state: &State, user: &str, now_ms: i64) -> anyhow::Result<NewSession> {
    let cookie = hex::encode(crate::sys::random_bytes(32)?);
    let csrf = hex::encode(crate::sys::random_bytes(16)?);
    let expires_ms = now_ms + SESSION_LIFETIME.as_millis() as i64;
    state
        .add_session(&secret_hash(&cookie), user, &csrf, now_ms, expires_ms)
        .await?;
    Ok(NewSession {
        cookie,
        csrf,
        expires_ms,
    })
}

/// The identity behind a session cookie and the session's CSRF token; None
/// when it is unknown, expired, or its user is gone.
pub async fn session_identity(
    state: &State,
    cookie: &str,
    now_ms: i64,
) -> anyhow::Result<Option<(Identity, String)>> {
    let Some(s) = state.session(&secret_hash(cookie)).await? else {
        return Ok(None);
    };
    if s.expires_ms <= now_ms {
        return Ok(None);
    }
    let Some(user) = state.user(&s.user).await? else {
        return Ok(None);
    };
    Ok(Role::parse(&user.role).map(|role| {
        (
            Identity {
                name: user.name,
                role,
            },
            s.csrf,
        )
    }))
}

/// Failed logins per key (a client address, a user name) in a sliding
/// window: after `limit` failures, refused until the window has passed.
/// Bounded: at most `MAX_KEYS` keys are tracked, the oldest dropped first.
pub struct LoginLimiter {
    window: Duration,
    limit: u32,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

const MAX_KEYS: usize = 10_000;

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter::new(Duration::from_secs(15 * 60), 5)
    }
}

impl LoginLimiter {
    pub fn new(window: Duration, limit: u32) -> LoginLimiter {
        LoginLimiter {
            window,
            limit,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// How long until `keys` may try again; None if they may now.
    pub fn wait(&self, keys: &[String]) -> Option<Duration> {
        let now = Instant::now();
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.iter()
            .filter_map(|k| {
                let times = f.get_mut(k)?;
                times.retain(|t| now.duration_since(*t) < self.window);
                (times.len() >= self.limit as usize)
                    .then(|| self.window.saturating_sub(now.duration_since(times[0])))
            })
            .max()
    }

    pub fn failed(&self, keys: &[String]) {
        let now = Instant::now();
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.len() >= MAX_KEYS {
            f.retain(|_, times| {
                times
                    .last()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
            if f.len() >= MAX_KEYS
                && let Some(oldest) = f
                    .iter()
                    .min_by_key(|(_, t)| t.last().copied())
                    .map(|(k, _)| k.clone())
            {
                f.remove(&oldest);
            }
        }
        for k in keys {
            let times = f.entry(k.clone()).or_default();
            times.push(now);
            if times.len() > self.limit as usize {
                times.remove(0);
            }
        }
    }

    pub fn succeeded(&self, keys: &[String]) {
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for k in keys {
            f.remove(k);
        }
    }
}

/// `30d`, `12h`, `90m`, `45s` in milliseconds (a token's lifetime).
pub fn parse_duration_ms(s: &str) -> Result<i64, Error> {
    let bad = || Error::usage(format!("{s:?} is not a duration like 30d, 12h or 90m"));
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let per = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(per).filter(|&ms| ms > 0).ok_or_else(bad)
}

/// Records an action in the audit log. A failure to write it is logged and
/// does not undo the action (which already happened).
pub async fn audit(state: &State, actor: &str, action: &str, subject: &str, detail: &str) {
    let e = AuditEntry {
        at_ms: chrono::Utc::now().timestamp_millis(),
        actor: actor.to_owned(),
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail: crate::redact::redact(detail),
    };
    if let Err(err) = state.audit(&e).await {
        tracing::error!(action, subject, "cannot write the audit log: {err:#}");
    }
}

/// The command line's identity in run logs and the audit log: the OS user
/// and `(cli)`.
pub fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user} (cli)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a hash"));
        assert_ne!(h, hash_password("correct horse battery").unwrap(), "salted");
    }

    #[test]
    fn a_password_hash_stored_by_earlier_builds_still_verifies() {
        // Made by argon2 0.5.3 (builds before 2026-12-07) from a 16-byte salt.
        let stored = "$argon2id$v=19$m=19456,t=2,p=1$CQkJCQkJCQkJCQkJCQkJCQ$pOqQirULkxHWuAH8qBQTRDGbdpw4foY2az6Q+vq2uvM";
        assert!(verify_password("correct horse battery", stored));
        assert!(!verify_password("correct horse batterY", stored));
        // New hashes keep the same cost and form.
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
    }

    #[test]
    fn roles_are_ordered_and_refusals_say_what_is_needed() {
        let v = Identity {
            name: "ann".into(),
            role: Role::Viewer,
        };
        assert!(v.require(Role::Viewer).is_ok());
        let e = v.require(Role::Operator).unwrap_err().to_string();
        assert!(e.contains("needs the operator role"), "{e}");
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse("admin"), Some(Role::Admin));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn names_and_passwords_are_checked() {
        assert!(check_user_name("ann.o-b_c@x").is_ok());
        for bad in ["", "-x", "a b", "api-token", &"x".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
        assert!(check_password("short").is_err());
        assert!(check_password("long enough pw").is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_duration_ms("90m").unwrap(), 90 * 60_000);
        for bad in ["", "d", "30", "30w", "0h", "-1h"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_limiter_refuses_after_the_limit_and_forgets_on_success() {
        let l = LoginLimiter::new(Duration::from_secs(60), 3);
        let keys = vec!["ip:1".to_owned(), "user:ann".to_owned()];
        for _ in 0..3 {
            assert!(l.wait(&keys).is_none());
            l.failed(&keys);
        }
        let w = l.wait(&keys).unwrap();
        assert!(
            w > Duration::from_secs(50) && w <= Duration::from_secs(60),
            "{w:?}"
        );
        // Another user from another address is not held up.
        assert!(
            l.wait(&["ip:2".to_owned(), "user:bob".to_owned()])
                .is_none()
        );
        l.succeeded(&keys);
        assert!(l.wait(&keys).is_none());
    }
}
