//! The fleet: one-time enrollment tokens, the agents they enroll
//! (`ferry-agent` inside protected machines), each agent's policy, the status
//! it pushes, and revocation. The protocol's types are
//! [`ferry_fleet::wire`], shared with the agent.
//!
//! Security: tokens and credentials are random (192 bits) and stored only as
//! SHA-256 hashes; a token enrolls one machine (compare and set in the
//! state), expires (one hour by default, 30 days at most), and every
//! enrollment and revocation is audited. An agent's credential reaches only
//! its own endpoints (`/api/agent/*`), never the users' API. The server never
//! sends an agent a repository password or cloud credentials.

use crate::auth::{audit, mint, secret_matches, split_credential};
use crate::error::{Error, Result};
use crate::state::State;
use crate::state::agents::{AgentRow, EnrollTokenRow};
use ferry_fleet::wire::{
    AgentStatus, CREDENTIAL_PREFIX, Device, ENROLL_PREFIX, EnrollRequest, Enrolled,
    MIN_INTERVAL_SECS, Policy, SILENT_AFTER_INTERVALS,
};
use serde::{Deserialize, Serialize};

/// A token's life unless given: long enough to log in to a machine and
/// enroll it, short enough that a leaked one soon stops working.
pub const DEFAULT_TOKEN_TTL_MS: i64 = 3_600_000;
pub const MAX_TOKEN_TTL_MS: i64 = 30 * 86_400_000;
/// Between cycles unless the token says.
pub const DEFAULT_INTERVAL_SECS: u64 = 60;
/// What an enrollment may report: bounds on what a stranger holding a token
/// can make the server store.
const MAX_DEVICES: usize = 256;
const MAX_FIELD: usize = 4096;

/// What an agent enrolled with a token will do; what is left out is decided
/// at enrollment (source: the host name; devices: every one it reports;
/// repository: the server's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyTemplate {
    pub source: Option<String>,
    pub devices: Vec<String>,
    #[schema(minimum = 1, maximum = 2_592_000)]
    pub interval_secs: Option<u64>,
    pub repository: Option<String>,
    #[schema(maximum = 1_000_000)]
    pub keep_last: Option<u32>,
    /// The consistency group the agent cuts with (`""` takes it out of its
    /// group).
    pub group: Option<String>,
}

/// The longest interval a policy may ask for: 30 days.
const MAX_INTERVAL_SECS: u64 = 2_592_000;
/// The most points `keep_last` may keep.
const MAX_KEEP_LAST: u32 = 1_000_000;

impl PolicyTemplate {
    fn check(&self) -> Result<()> {
        if let Some(s) = &self.source {
            crate::backups::check_source(s)?;
        }
        if self
            .interval_secs
            .is_some_and(|i| !(MIN_INTERVAL_SECS..=MAX_INTERVAL_SECS).contains(&i))
        {
            return Err(Error::usage(format!(
                "the interval must be {MIN_INTERVAL_SECS} s to 30 days"
            )));
        }
        if let Some(g) = self.group.as_deref().filter(|g| !g.is_empty()) {
            crate::backups::check_source(g).map_err(|_| {
                Error::usage(format!(
                    "group {g:?}: 1 to 128 characters, without '@' or '/'"
                ))
            })?;
        }
        if self.keep_last.is_some_and(|k| k > MAX_KEEP_LAST) {
            return Err(Error::usage(format!(
                "keep_last keeps at most {MAX_KEEP_LAST} points"
            )));
        }
        if self.devices.len() > MAX_DEVICES
            || self
                .devices
                .iter()
                .any(|d| !d.starts_with('/') || d.len() > MAX_FIELD)
        {
            return Err(Error::usage(
                "devices must be absolute paths on the agent's machine",
            ));
        }
        Ok(())
    }
}

/// A token made: what to give the machine (shown once) and its record.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewEnrollToken {
    /// `fenroll_ID_SECRET`; shown this once.
    pub token: String,
    pub id: String,
    pub expires_ms: i64,
    pub policy: PolicyTemplate,
}

pub async fn create_token(
    state: &State,
    actor: &str,
    now_ms: i64,
    ttl_ms: Option<i64>,
    policy: PolicyTemplate,
) -> Result<NewEnrollToken> {
    let ttl = ttl_ms.unwrap_or(DEFAULT_TOKEN_TTL_MS);
    if !(1..=MAX_TOKEN_TTL_MS).contains(&ttl) {
        return Err(Error::usage("an enrollment token lives 1 ms to 30 days"));
    }
    policy.check()?;
    let m = mint(ENROLL_PREFIX).map_err(Error::Internal)?;
    let id = m.id;
    let row = EnrollTokenRow {
        id: id.clone(),
        secret_hash: m.secret_hash,
        created_by: actor.to_owned(),
        created_ms: now_ms,
        expires_ms: now_ms + ttl,
        policy: serde_json::to_string(&policy).map_err(|e| Error::Internal(e.into()))?,
        used_ms: None,
        used_by: None,
    };
    state.add_enroll_token(&row).await?;
    audit(
        state,
        actor,
        "agent-token.create",
        &id,
        &format!("expires {}", row.expires_ms),
    )
    .await;
    Ok(NewEnrollToken {
        token: m.credential,
        id,
        expires_ms: row.expires_ms,
        policy,
    })
}

/// A time for messages and lists.
pub(crate) fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// A host name as a source name: what a point may be called.
fn source_of(hostname: &str) -> String {
    let s: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if s.is_empty() { "agent".into() } else { s }
}

/// Enrolls a machine: checks its token (unknown, expired and used tokens
/// are refused, each saying so), uses it up, and records the agent with its
/// policy. `server_repo` is the repository the server itself reads.
pub async fn enroll(
    state: &State,
    server_repo: Option<&str>,
    req: EnrollRequest,
    now_ms: i64,
) -> Result<Enrolled> {
    let unknown = || {
        Error::Unauthenticated(
            "unknown enrollment token; create one on the server with `ferry agent-token create`"
                .into(),
        )
    };
    let (id, secret) = split_credential(&req.token, ENROLL_PREFIX).ok_or_else(unknown)?;
    let t = state.enroll_token(id).await?.ok_or_else(unknown)?;
    if !secret_matches(secret, &t.secret_hash) {
        return Err(unknown());
    }
    if let (Some(at), Some(by)) = (t.used_ms, &t.used_by) {
        return Err(Error::Unauthenticated(format!(
            "enrollment token {id} was used already (agent {by}, {}); a token enrolls one machine: create another with `ferry agent-token create`",
            when(at)
        )));
    }
    if t.expires_ms <= now_ms {
        return Err(Error::Unauthenticated(format!(
            "enrollment token {id} expired at {}; create another with `ferry agent-token create`",
            when(t.expires_ms)
        )));
    }
    let printable = |s: &str| !s.chars().any(char::is_control);
    if req.hostname.is_empty()
        || req.hostname.len() > 253
        || req.machine_id.len() > 128
        || !printable(&req.hostname)
        || !printable(&req.machine_id)
        || req.devices.iter().any(|d| !printable(&d.path))
        || req.devices.len() > MAX_DEVICES
        || req
            .devices
            .iter()
            .any(|d| d.path.len() > MAX_FIELD || !d.path.starts_with('/'))
    {
        return Err(Error::usage(
            "the enrollment names a bad host name, machine id or device (too long, too many, or not an absolute path)",
        ));
    }
    let tpl: PolicyTemplate =
        serde_json::from_str(&t.policy).map_err(|e| Error::Internal(e.into()))?;
    let repository = tpl
        .repository
        .clone()
        .or_else(|| server_repo.map(str::to_owned))
        .ok_or_else(|| {
            Error::Unavailable(
                "no repository for the agent: create the token with --repo, or start `ferry serve` with -r".into(),
            )
        })?;
    let policy = Policy {
        source: tpl
            .source
            .clone()
            .unwrap_or_else(|| source_of(&req.hostname)),
        devices: if tpl.devices.is_empty() {
            req.devices.iter().map(|d| d.path.clone()).collect()
        } else {
            tpl.devices.clone()
        },
        interval_secs: tpl.interval_secs.unwrap_or(DEFAULT_INTERVAL_SECS),
        repository,
        keep_last: tpl.keep_last,
        group: tpl.group.clone().filter(|g| !g.is_empty()),
    };
    let cred = mint(CREDENTIAL_PREFIX).map_err(Error::Internal)?;
    let agent_id = cred.id;
    if !state.use_enroll_token(id, &agent_id, now_ms).await? {
        return Err(Error::Unauthenticated(format!(
            "enrollment token {id} was used already; a token enrolls one machine: create another with `ferry agent-token create`"
        )));
    }
    state
        .add_agent(&AgentRow {
            id: agent_id.clone(),
            hostname: req.hostname.clone(),
            machine_id: req.machine_id.clone(),
            secret_hash: cred.secret_hash,
            devices: to_json(&req.devices)?,
            policy: to_json(&policy)?,
            enrolled_ms: now_ms,
            enrolled_with: id.to_owned(),
            last_seen_ms: None,
            status: None,
            revoked_ms: None,
            revoked_by: None,
        })
        .await?;
    audit(
        state,
        &format!("agent:{agent_id}"),
        "agent.enroll",
        &agent_id,
        &format!("host {} with token {id}", req.hostname),
    )
    .await;
    Ok(Enrolled {
        agent_id: agent_id.clone(),
        credential: cred.credential,
        policy,
    })
}

/// JSON for the state's opaque columns.
fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.into()))
}

/// The agent a credential (`fagent_ID_SECRET`) belongs to; a revoked agent
/// is refused with when and by whom, so that it stops.
pub async fn authenticate(state: &State, credential: &str) -> Result<AgentRow> {
    let unknown =
        || Error::Unauthenticated("unknown agent credential; enroll the agent again".into());
    let (id, secret) = split_credential(credential, CREDENTIAL_PREFIX).ok_or_else(unknown)?;
    let a = state.agent(id).await?.ok_or_else(unknown)?;
    if !secret_matches(secret, &a.secret_hash) {
        return Err(unknown());
    }
    if let Some(at) = a.revoked_ms {
        return Err(Error::Forbidden(format!(
            "agent {id} was revoked at {} by {}",
            when(at),
            a.revoked_by.as_deref().unwrap_or("?")
        )));
    }
    Ok(a)
}

/// An agent polled its policy.
pub async fn policy(state: &State, a: &AgentRow, now_ms: i64) -> Result<Policy> {
    state.agent_seen(&a.id, now_ms, None).await?;
    serde_json::from_str(&a.policy).map_err(|e| Error::Internal(e.into()))
}

/// An agent pushed its status: kept with the agent, and as its source's
/// protection row, where the dashboard, its alerts and `/metrics` read every
/// protector's status (stale after three of the agent's intervals).
pub async fn push_status(
    state: &State,
    a: &AgentRow,
    status: &AgentStatus,
    now_ms: i64,
) -> Result<()> {
    let policy: Policy = serde_json::from_str(&a.policy).map_err(|e| Error::Internal(e.into()))?;
    let text = to_json(status)?;
    if text.len() > 1 << 20 {
        return Err(Error::TooLarge("a status over 1 MiB".into()));
    }
    state.agent_seen(&a.id, now_ms, Some(&text)).await?;
    let mode = status
        .devices
        .iter()
        .map(|d| {
            let m = d.mode.map_or("unknown", ferry_fleet::wire::Mode::as_str);
            format!("{}: {m} ({})", d.disk, d.mode_reason)
        })
        .collect::<Vec<_>>()
        .join("; ");
    let row = ferry_connectors::protect::SourceStatus {
        source: policy.source.clone(),
        last_point: status.last_point.clone(),
        last_cut: status.last_cut,
        lag_secs: status.lag_secs,
        backlog_bytes: 0,
        throughput_bytes_per_sec: status.throughput_bytes_per_sec,
        last_cycle_secs: status.last_cycle_secs,
        last_mode: Some(mode),
        cycles_ok: status.cycles_ok,
        cycles_failed: status.cycles_failed,
        last_error: status.last_error.clone(),
        report_every_secs: Some(policy.interval_secs.max(1) as f64),
    };
    state
        .put_protection(&[crate::state::health::ProtectionRow {
            source: policy.source,
            repo: crate::inventory::repo_key(&policy.repository),
            reporter: format!("agent {} ({})", a.id, a.hostname),
            updated_ms: now_ms,
            status: to_json(&row)?,
        }])
        .await?;
    Ok(())
}

/// An agent as the API and `ferry agents` show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Agent {
    pub id: String,
    pub hostname: String,
    pub machine_id: String,
    pub enrolled_ms: i64,
    pub last_seen_ms: Option<i64>,
    /// Not heard from for three of its intervals (and not revoked).
    pub silent: bool,
    pub revoked_ms: Option<i64>,
    pub revoked_by: Option<String>,
    #[schema(value_type = Object)]
    pub policy: Policy,
    #[schema(value_type = Vec<Object>)]
    pub devices: Vec<Device>,
    /// The last status it pushed: lag, mode per device, errors.
    #[schema(value_type = Option<Object>)]
    pub status: Option<AgentStatus>,
}

fn view(a: AgentRow, now_ms: i64) -> Agent {
    let mut policy: Policy = serde_json::from_str(&a.policy).unwrap_or(Policy {
        source: String::new(),
        devices: Vec::new(),
        interval_secs: DEFAULT_INTERVAL_SECS,
        repository: String::new(),
        keep_last: None,
        group: None,
    });
    // Shown to viewers: no password may ride along in a location or an error.
    policy.repository = crate::redact::redact(&policy.repository);
    let mut status: Option<AgentStatus> = a
        .status
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok());
    if let Some(e) = status.as_mut().and_then(|s| s.last_error.as_mut()) {
        *e = crate::redact::redact(e);
    }
    let every_ms = (policy.interval_secs.max(1) as f64)
        .max(status.as_ref().map_or(0.0, |s| s.last_cycle_secs))
        * 1000.0;
    let seen = a.last_seen_ms.unwrap_or(a.enrolled_ms);
    let silent =
        a.revoked_ms.is_none() && (now_ms - seen) as f64 > every_ms * SILENT_AFTER_INTERVALS as f64;
    Agent {
        id: a.id,
        hostname: a.hostname,
        machine_id: a.machine_id,
        enrolled_ms: a.enrolled_ms,
        last_seen_ms: a.last_seen_ms,
        silent,
        revoked_ms: a.revoked_ms,
        revoked_by: a.revoked_by,
        policy,
        devices: serde_json::from_str(&a.devices).unwrap_or_default(),
        status,
    }
}

pub async fn list(state: &State, now_ms: i64) -> Result<Vec<Agent>> {
    Ok(state
        .agents()
        .await?
        .into_iter()
        .map(|a| view(a, now_ms))
        .collect())
}

/// Revokes an agent: its next poll is refused and it stops.
pub async fn revoke(state: &State, id: &str, actor: &str, now_ms: i64) -> Result<()> {
    if !state.revoke_agent(id, actor, now_ms).await? {
        return Err(match state.agent(id).await? {
            Some(_) => Error::Conflict(format!("agent {id} is revoked already")),
            None => Error::NotFound(format!("no agent {id}; see `ferry agents list`")),
        });
    }
    audit(state, actor, "agent.revoke", id, "").await;
    Ok(())
}

/// Changes an agent's policy: the fields the template sets replace the
/// agent's; it applies them at its next poll.
pub async fn set_policy(
    state: &State,
    id: &str,
    tpl: PolicyTemplate,
    actor: &str,
) -> Result<Policy> {
    tpl.check()?;
    let a = state
        .agent(id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no agent {id}; see `ferry agents list`")))?;
    let mut p: Policy = serde_json::from_str(&a.policy).map_err(|e| Error::Internal(e.into()))?;
    if let Some(s) = tpl.source {
        p.source = s;
    }
    if !tpl.devices.is_empty() {
        p.devices = tpl.devices;
    }
    if let Some(i) = tpl.interval_secs {
        p.interval_secs = i;
    }
    if let Some(r) = tpl.repository {
        p.repository = r;
    }
    if tpl.keep_last.is_some() {
        p.keep_last = tpl.keep_last;
    }
    if let Some(g) = tpl.group {
        p.group = Some(g).filter(|g| !g.is_empty());
    }
    if !state.set_agent_policy(id, &to_json(&p)?).await? {
        return Err(Error::Conflict(format!("agent {id} is revoked")));
    }
    audit(
        state,
        actor,
        "agent.policy",
        id,
        &format!("{} every {} s", p.source, p.interval_secs),
    )
    .await;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(token: &str, host: &str) -> EnrollRequest {
        EnrollRequest {
            token: token.into(),
            hostname: host.into(),
            machine_id: "m".into(),
            devices: vec![Device {
                path: "/dev/vdb".into(),
                size: 1 << 30,
            }],
        }
    }

    /// Ten machines racing with one token: exactly one is enrolled, the
    /// others are told the token was used; the policy is filled in from what
    /// the winner reported; its credential works and stops working when
    /// revoked.
    #[tokio::test]
    async fn a_token_enrolls_one_machine_even_in_a_race() {
        let d = tempfile::tempdir().unwrap();
        let state = State::open(&format!("sqlite://{}", d.path().join("s.db").display()))
            .await
            .unwrap();
        let t = create_token(&state, "ann", 1_000, None, PolicyTemplate::default())
            .await
            .unwrap();
        let results = futures::future::join_all((0..10).map(|i| {
            let (state, token) = (state.clone(), t.token.clone());
            async move {
                enroll(
                    &state,
                    Some("/srv/repo"),
                    request(&token, &format!("host {i}")),
                    2_000,
                )
                .await
            }
        }))
        .await;
        let won: Vec<&Enrolled> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "{results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(r.to_string().contains("was used already"), "{r}");
        }
        let e = won[0];
        assert!(e.policy.source.starts_with("host-"), "{:?}", e.policy);
        assert_eq!(e.policy.devices, ["/dev/vdb"]);
        assert_eq!(e.policy.repository, "/srv/repo");
        assert_eq!(e.policy.interval_secs, DEFAULT_INTERVAL_SECS);
        let a = authenticate(&state, &e.credential).await.unwrap();
        assert_eq!(a.id, e.agent_id);
        // A guessed secret for a real id is as unknown as a made-up one.
        let forged = format!("{CREDENTIAL_PREFIX}{}_00", e.agent_id);
        assert!(matches!(
            authenticate(&state, &forged).await,
            Err(Error::Unauthenticated(_))
        ));
        revoke(&state, &e.agent_id, "ann", 3_000).await.unwrap();
        match authenticate(&state, &e.credential).await {
            Err(Error::Forbidden(m)) => assert!(m.contains("revoked") && m.contains("ann"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            revoke(&state, &e.agent_id, "ann", 4_000).await,
            Err(Error::Conflict(_))
        ));
        // An expired token says so; one without a repository anywhere is refused
        // before it is used up.
        let t = create_token(&state, "ann", 1_000, Some(10), PolicyTemplate::default())
            .await
            .unwrap();
        let e = enroll(&state, Some("/r"), request(&t.token, "h"), 1_011)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("expired at"), "{e}");
        let t = create_token(&state, "ann", 1_000, None, PolicyTemplate::default())
            .await
            .unwrap();
        let e = enroll(&state, None, request(&t.token, "h"), 1_001)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        enroll(&state, Some("/r"), request(&t.token, "h"), 1_002)
            .await
            .unwrap();
    }

    /// Silent after three intervals unheard (or three cycles, when a cycle
    /// takes longer than the interval); a revoked agent is not silent.
    #[tokio::test]
    async fn an_agent_unheard_for_three_intervals_is_silent() {
        let d = tempfile::tempdir().unwrap();
        let state = State::open(&format!("sqlite://{}", d.path().join("s.db").display()))
            .await
            .unwrap();
        let tpl = PolicyTemplate {
            interval_secs: Some(10),
            ..Default::default()
        };
        let t = create_token(&state, "ann", 0, None, tpl).await.unwrap();
        let e = enroll(&state, Some("/r"), request(&t.token, "h"), 1_000)
            .await
            .unwrap();
        let silent = |now| {
            let state = state.clone();
            async move { list(&state, now).await.unwrap()[0].silent }
        };
        assert!(!silent(31_000).await);
        assert!(silent(31_001).await);
        let a = authenticate(&state, &e.credential).await.unwrap();
        let st = AgentStatus {
            last_cycle_secs: 20.0,
            ..Default::default()
        };
        push_status(&state, &a, &st, 40_000).await.unwrap();
        assert!(!silent(99_000).await, "three 20 s cycles");
        assert!(silent(100_001).await);
        revoke(&state, &a.id, "ann", 100_002).await.unwrap();
        assert!(!silent(200_000).await);
    }
}
