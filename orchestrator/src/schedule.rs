//! Schedules: drills, repository checks and backups that `ferry serve`
//! starts at the times a cron expression names (five fields, UTC), with
//! nobody watching.
//!
//! A schedule stores when it fires next. A server's scheduler asks every
//! second which schedules are due ([`claim_due`]) and claims each firing by
//! moving `next` forward from the value it read, so two servers on one state
//! fire it once. A server that was down when a schedule was due fires it
//! once when it comes back, not once per time it missed. What a firing does
//! is the API's (`api::schedules`): it has the repository and the runbooks.
//! The clock is a parameter, so tests move time instead of waiting for it.

use crate::error::{Error, Result};
use crate::state::State;
use crate::state::schedules::ScheduleRow;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::str::FromStr as _;

/// What a schedule starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Job {
    /// A drill of a runbook of the server's runbook directory.
    Drill {
        /// The runbook's file in the directory (`ferry serve --runbooks`).
        path: String,
        /// The target every step that names none runs on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    /// A check of the server's repository.
    Check {
        /// Read and verify every byte, not only the structure.
        #[serde(default)]
        read_data: bool,
    },
    /// A backup into the server's repository of disks the server's machine
    /// reads (absolute paths of image files or devices, or `nbd://` URLs),
    /// as `ferry backup --source SOURCE DISK...`. Only admins add these: the
    /// server reads whatever its user may.
    Backup { source: String, disks: Vec<String> },
}

impl Job {
    /// Refuses a job that can never run, whatever the server has.
    pub fn validate(&self) -> Result<()> {
        match self {
            Job::Drill { path, .. } if !crate::inventory::runbooks::valid_name(path) => {
                Err(Error::usage(format!(
                    "drill {path:?}: name a runbook file of the server's runbook directory (*.yaml or *.yml, no path)"
                )))
            }
            Job::Backup { source, disks } => {
                crate::backups::check_source(source)?;
                if disks.is_empty() || disks.len() > 64 {
                    return Err(Error::usage("a backup names 1 to 64 disks"));
                }
                match disks.iter().find_map(|d| crate::backups::disk_problem(d)) {
                    Some(p) => Err(Error::usage(format!("backup: {p}"))),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Whether only admins may schedule it.
    pub fn admin_only(&self) -> bool {
        matches!(self, Job::Backup { .. })
    }

    /// In words, for lists and the audit log.
    pub fn describe(&self) -> String {
        match self {
            Job::Drill { path, target: None } => format!("drill {path}"),
            Job::Drill {
                path,
                target: Some(t),
            } => format!("drill {path} on {t}"),
            Job::Check { read_data: false } => "check".into(),
            Job::Check { read_data: true } => "check --read-data".into(),
            Job::Backup { source, disks } => format!("backup {source} of {}", disks.join(" ")),
        }
    }
}

/// A schedule, as the API and `ferry schedule list` show it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Schedule {
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week), in UTC.
    pub cron: String,
    pub job: Job,
    pub created_by: String,
    pub created_ms: i64,
    /// When it fires next (ms since the epoch).
    pub next_ms: i64,
    pub last_fired_ms: Option<i64>,
    /// What its last firing started (a run or check id), or why it could not.
    pub last_outcome: Option<String>,
}

impl TryFrom<ScheduleRow> for Schedule {
    type Error = Error;
    fn try_from(r: ScheduleRow) -> Result<Schedule> {
        let job = serde_json::from_str(&r.job).map_err(|e| {
            Error::Internal(anyhow::anyhow!(
                "schedule {}: its stored job does not read: {e}",
                r.name
            ))
        })?;
        Ok(Schedule {
            name: r.name,
            cron: r.cron,
            job,
            created_by: r.created_by,
            created_ms: r.created_ms,
            next_ms: r.next_ms,
            last_fired_ms: r.last_fired_ms,
            last_outcome: r.last_outcome,
        })
    }
}

/// A cron expression of five fields, checked.
pub fn parse_cron(expr: &str) -> Result<croner::Cron> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(Error::usage(format!(
            "cron {expr:?}: give five fields (minute hour day-of-month month day-of-week, in UTC), not {fields}; e.g. \"0 3 * * *\" for 03:00 every day"
        )));
    }
    croner::Cron::from_str(expr).map_err(|e| Error::usage(format!("cron {expr:?}: {e}")))
}

/// The first time the expression names strictly after `after_ms`.
pub fn next_after(cron: &croner::Cron, after_ms: i64) -> Result<i64> {
    let after = DateTime::<Utc>::from_timestamp_millis(after_ms)
        .ok_or_else(|| Error::usage(format!("{after_ms} ms is not a time")))?;
    let next = cron
        .find_next_occurrence(&after, false)
        .map_err(|e| Error::usage(format!("cron {}: no time matches it: {e}", cron.pattern)))?;
    Ok(next.timestamp_millis())
}

/// A schedule's name: 1 to 64 letters, digits, `.`, `_` and `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "schedule name {name:?}: use 1 to 64 letters, digits, ., _ and - (not starting with -)"
        )))
    }
}

/// Adds a schedule that fires first at the next time its expression names
/// after `now_ms`. Audited as `schedule.add`.
pub async fn add(
    state: &State,
    name: &str,
    cron: &str,
    job: Job,
    by: &str,
    now_ms: i64,
) -> Result<Schedule> {
    check_name(name)?;
    let parsed = parse_cron(cron)?;
    job.validate()?;
    let row = ScheduleRow {
        name: name.to_owned(),
        cron: cron.split_whitespace().collect::<Vec<_>>().join(" "),
        job: serde_json::to_string(&job).map_err(anyhow::Error::from)?,
        created_by: by.to_owned(),
        created_ms: now_ms,
        next_ms: next_after(&parsed, now_ms)?,
        last_fired_ms: None,
        last_outcome: None,
    };
    if !state.add_schedule(&row).await? {
        return Err(Error::Conflict(format!(
            "a schedule named {name} exists; remove it first"
        )));
    }
    crate::auth::audit(
        state,
        by,
        "schedule.add",
        name,
        &format!("{} at \"{}\"", job.describe(), row.cron),
    )
    .await;
    Schedule::try_from(row)
}

/// Every schedule, by name.
pub async fn list(state: &State) -> Result<Vec<Schedule>> {
    state
        .schedules()
        .await?
        .into_iter()
        .map(Schedule::try_from)
        .collect()
}

/// Removes a schedule. Audited as `schedule.remove`.
pub async fn remove(state: &State, name: &str, by: &str) -> Result<()> {
    if !state.remove_schedule(name).await? {
        return Err(Error::NotFound(format!("no schedule named {name}")));
    }
    crate::auth::audit(state, by, "schedule.remove", name, "").await;
    Ok(())
}

/// Claims every schedule due at `now_ms` and returns them, each moved on to
/// its next time after `now_ms` (one firing however many times were missed).
/// A schedule another server claimed first is left out; one whose stored
/// expression or job no longer reads is moved on a day and reported.
pub async fn claim_due(state: &State, now_ms: i64) -> Result<Vec<Schedule>> {
    let mut out = Vec::new();
    for row in state.due_schedules(now_ms).await? {
        let (name, due) = (row.name.clone(), row.next_ms);
        let next = parse_cron(&row.cron).and_then(|c| next_after(&c, now_ms));
        let next_ms = next.as_ref().map_or(now_ms + 86_400_000, |n| *n);
        if !state.claim_schedule(&name, due, now_ms, next_ms).await? {
            continue;
        }
        let schedule = next.and_then(|_| Schedule::try_from(row));
        match schedule {
            Ok(mut s) => {
                s.next_ms = next_ms;
                s.last_fired_ms = Some(now_ms);
                out.push(s);
            }
            Err(e) => {
                tracing::warn!(schedule = %name, "schedule cannot fire: {e}");
                state
                    .schedule_outcome(&name, &format!("not started: {e}"))
                    .await?;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn cron_names_the_next_time_strictly_after() {
        let c = parse_cron("0 3 * * *").unwrap();
        assert_eq!(
            next_after(&c, at("2026-12-05T02:59:59Z")).unwrap(),
            at("2026-12-05T03:00:00Z")
        );
        // At the time itself, the next one is a day later.
        assert_eq!(
            next_after(&c, at("2026-12-05T03:00:00Z")).unwrap(),
            at("2026-12-06T03:00:00Z")
        );
        let every_15 = parse_cron("*/15 * * * *").unwrap();
        assert_eq!(
            next_after(&every_15, at("2026-12-05T10:07:00Z")).unwrap(),
            at("2026-12-05T10:15:00Z")
        );
    }

    #[test]
    fn bad_expressions_names_and_jobs_are_refused_with_the_reason() {
        for bad in ["", "* * * *", "0 0 * * * *", "61 * * * *", "x y z w v"] {
            let e = parse_cron(bad).unwrap_err().to_string();
            assert!(e.contains("cron"), "{bad:?}: {e}");
        }
        assert!(check_name("nightly-drill").is_ok());
        for bad in ["", "-x", "a/b", "with space", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "../state.db", "sub/shop.yaml", ".hidden.yaml"] {
            let j = Job::Drill {
                path: bad.into(),
                target: None,
            };
            assert!(j.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn jobs_are_stored_as_tagged_json() {
        let j = Job::Drill {
            path: "shop.yaml".into(),
            target: None,
        };
        assert_eq!(
            serde_json::to_string(&j).unwrap(),
            r#"{"drill":{"path":"shop.yaml"}}"#
        );
        let c: Job = serde_json::from_str(r#"{"check":{}}"#).unwrap();
        assert_eq!(c, Job::Check { read_data: false });
        assert!(serde_json::from_str::<Job>(r#"{"backup":{}}"#).is_err());
    }
}
