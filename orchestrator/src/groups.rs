//! Consistency groups across machines: the coordinated cut.
//!
//! Agents whose policies name the same `group` cut together. Each cycle,
//! every member holds its machine's writes (its dm-era devices suspended, or
//! its `pre_cut` hook's freeze) and calls `POST /api/agent/cut`; the server
//! answers all of them at once when the last member arrives, and only then
//! does any member let writes go. Every member was holding its writes at the
//! moment the last one arrived, so no member's point can hold a write that
//! depends on a write another member's point lacks: the points restore to
//! one moment (`SOURCE@group-latest` picks such a set). This is a barrier,
//! not a clock: the members' clocks only decide when they start their cycles
//! (at multiples of the interval), which keeps the wait short.
//!
//! A member that does not arrive within [`GROUP_WAIT_MS`] (slow, stopped,
//! cut off) does not stop the others for longer: the round closes without
//! it, the points record who arrived, and `complete` is false. The skew
//! reported is the spread of arrivals on the server's monotonic clock: how
//! long the first member's writes were held for the last.
//!
//! Rounds live in the server's memory: a restart loses the history shown by
//! `GET /api/groups` (the points keep each round's record) and the members
//! waiting at that moment cut without the group.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use ferry_fleet::wire::{GROUP_WAIT_MS, GroupCut, Policy};
use serde::Serialize;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::state::State;

/// Rounds kept per group for `GET /api/groups`.
const HISTORY: usize = 120;

/// Every group's open round and recent history.
#[derive(Default)]
pub struct Groups {
    inner: Mutex<HashMap<String, Group>>,
}

#[derive(Default)]
struct Group {
    open: Option<Round>,
    history: VecDeque<Closed>,
}

struct Round {
    id: String,
    opened: Instant,
    /// Every member: a cut is complete only when all of them arrived.
    members: Vec<String>,
    /// The members waited for: those not silent. A silent member's absence
    /// leaves the round incomplete but does not hold the others.
    expected: Vec<String>,
    arrived: Vec<(String, Instant)>,
    done: watch::Sender<Option<GroupCut>>,
}

/// A closed round as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Closed {
    /// When it closed (Unix ms, the server's clock).
    pub closed_ms: i64,
    pub complete: bool,
    #[schema(value_type = Object)]
    pub cut: GroupCut,
}

/// A group as `GET /api/groups` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct GroupView {
    pub name: String,
    /// The sources of the agents whose policy names the group (not revoked).
    pub members: Vec<String>,
    /// Rounds in this server's memory (at most the last 120).
    pub rounds: usize,
    pub complete_rounds: usize,
    /// Over those rounds: the median and the largest skew.
    pub skew_ms_p50: Option<f64>,
    pub skew_ms_max: Option<f64>,
    /// The newest first, at most 20.
    pub recent: Vec<Closed>,
}

impl Round {
    fn close(self, name: &str, now_ms: i64) -> Closed {
        let first = self.arrived.iter().map(|a| a.1).min();
        let last = self.arrived.iter().map(|a| a.1).max();
        let skew = match (first, last) {
            (Some(f), Some(l)) => (l - f).as_secs_f64() * 1000.0,
            _ => 0.0,
        };
        let cut = GroupCut {
            name: name.to_string(),
            round: self.id,
            members: self.members,
            arrived: self.arrived.into_iter().map(|a| a.0).collect(),
            skew_ms: (skew * 1000.0).round() / 1000.0,
        };
        let _ = self.done.send(Some(cut.clone()));
        Closed {
            closed_ms: now_ms,
            complete: cut.complete(),
            cut,
        }
    }
}

impl Group {
    fn close(&mut self, name: &str, now_ms: i64) {
        if let Some(r) = self.open.take() {
            let c = r.close(name, now_ms);
            tracing::info!(group = name, round = %c.cut.round, complete = c.complete, skew_ms = c.cut.skew_ms, arrived = c.cut.arrived.len(), members = c.cut.members.len(), "group cut");
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(c);
        }
    }
}

impl Groups {
    /// `source`, a member of `group`, holds its writes: wait for the rest
    /// (`members`, of which `expected` are not silent) for `wait` at most;
    /// the round.
    pub async fn arrive(
        &self,
        group: &str,
        source: &str,
        (members, expected): (Vec<String>, Vec<String>),
        wait: Duration,
    ) -> GroupCut {
        let (id, mut rx, deadline) = {
            let mut all = self.inner.lock().expect("groups");
            let g = all.entry(group.to_string()).or_default();
            // A round whose waiters all went away (their requests dropped)
            // closes when the next one comes.
            if g.open.as_ref().is_some_and(|r| r.opened.elapsed() >= wait) {
                g.close(group, crate::exec::now_ms());
            }
            let r = g.open.get_or_insert_with(|| Round {
                id: format!(
                    "{}-{}",
                    chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
                    ferry_agent::crypto::random_hex(3)
                ),
                opened: Instant::now(),
                members,
                expected,
                arrived: Vec::new(),
                done: watch::channel(None).0,
            });
            for v in [&mut r.members, &mut r.expected] {
                if !v.iter().any(|m| m == source) {
                    v.push(source.to_string());
                }
            }
            // A member that arrives again in one round (it restarted) counts
            // from its latest arrival.
            r.arrived.retain(|a| a.0 != source);
            r.arrived.push((source.to_string(), Instant::now()));
            let (id, rx, deadline) = (r.id.clone(), r.done.subscribe(), r.opened + wait);
            if r.expected
                .iter()
                .all(|m| r.arrived.iter().any(|a| a.0 == *m))
            {
                g.close(group, crate::exec::now_ms());
            }
            (id, rx, deadline)
        };
        let waited = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|cut| cut.clone()));
        if let Some(cut) = waited {
            return cut;
        }
        // Time is up: close the round without those missing (unless another
        // waiter or a later arrival just did). Closing sends the cut on the
        // round's channel, which keeps it after the round is gone.
        {
            let mut all = self.inner.lock().expect("groups");
            let g = all.entry(group.to_string()).or_default();
            if g.open.as_ref().is_some_and(|r| r.id == id) {
                g.close(group, crate::exec::now_ms());
            }
        }
        rx.borrow()
            .clone()
            .expect("a round is closed only by sending its cut")
    }

    /// Every group the agents' policies name, with its rounds.
    pub async fn list(&self, state: &State, now_ms: i64) -> Result<Vec<GroupView>> {
        let mut members: HashMap<String, Vec<String>> = HashMap::new();
        for a in crate::fleet::list(state, now_ms).await? {
            if a.revoked_ms.is_none()
                && let Some(g) = &a.policy.group
            {
                members
                    .entry(g.clone())
                    .or_default()
                    .push(a.policy.source.clone());
            }
        }
        for m in members.values_mut() {
            m.sort();
            m.dedup();
        }
        let all = self.inner.lock().expect("groups");
        let mut names: Vec<&String> = members.keys().chain(all.keys()).collect();
        names.sort();
        names.dedup();
        Ok(names
            .into_iter()
            .map(|name| {
                let h = all.get(name).map(|g| &g.history);
                let mut skews: Vec<f64> = h.into_iter().flatten().map(|c| c.cut.skew_ms).collect();
                skews.sort_by(f64::total_cmp);
                GroupView {
                    name: name.clone(),
                    members: members.get(name).cloned().unwrap_or_default(),
                    rounds: skews.len(),
                    complete_rounds: h.into_iter().flatten().filter(|c| c.complete).count(),
                    skew_ms_p50: skews.get(skews.len() / 2).copied(),
                    skew_ms_max: skews.last().copied(),
                    recent: h.into_iter().flatten().rev().take(20).cloned().collect(),
                }
            })
            .collect())
    }
}

/// The sources of `group` now: its agents that are not revoked, and of
/// those the ones not silent.
pub async fn members(
    state: &State,
    group: &str,
    now_ms: i64,
) -> Result<(Vec<String>, Vec<String>)> {
    let (mut all, mut live) = (Vec::new(), Vec::new());
    for a in crate::fleet::list(state, now_ms).await? {
        if a.revoked_ms.is_none() && a.policy.group.as_deref() == Some(group) {
            if !a.silent {
                live.push(a.policy.source.clone());
            }
            all.push(a.policy.source);
        }
    }
    for v in [&mut all, &mut live] {
        v.sort();
        v.dedup();
    }
    Ok((all, live))
}

/// An agent arrived at its group's barrier.
pub async fn arrive(
    groups: &Groups,
    state: &State,
    a: &crate::state::agents::AgentRow,
    now_ms: i64,
) -> Result<GroupCut> {
    state.agent_seen(&a.id, now_ms, None).await?;
    let p: Policy = serde_json::from_str(&a.policy).map_err(|e| Error::Internal(e.into()))?;
    let Some(group) = p.group else {
        return Err(Error::Conflict(
            "this agent's policy names no group: set one on the server (`ferry agents policy ID --group NAME`)".into(),
        ));
    };
    let members = members(state, &group, now_ms).await?;
    Ok(groups
        .arrive(
            &group,
            &p.source,
            members,
            Duration::from_millis(GROUP_WAIT_MS),
        )
        .await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_round_closes_when_the_last_member_arrives() {
        let g = Arc::new(Groups::default());
        let m = || {
            (
                vec!["db".to_string(), "web".to_string()],
                vec!["db".to_string(), "web".to_string()],
            )
        };
        let w = Duration::from_secs(2);
        let first = tokio::spawn({
            let g = g.clone();
            async move { g.arrive("app", "db", m(), w).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = g.arrive("app", "web", m(), w).await;
        let first = first.await.unwrap();
        assert_eq!(first, second, "both members get the same round");
        assert!(first.complete());
        assert!(
            (first.skew_ms - 300.0).abs() < 1.0,
            "skew is the spread of arrivals: {}",
            first.skew_ms
        );
        // The next cycle is a new round.
        let next = tokio::spawn({
            let g = g.clone();
            async move { g.arrive("app", "web", m(), w).await }
        });
        let db = g.arrive("app", "db", m(), w).await;
        assert_ne!(db.round, first.round);
        assert_eq!(next.await.unwrap().round, db.round);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_member_holds_the_others_for_the_wait_only() {
        let g = Groups::default();
        let both = vec!["db".to_string(), "web".to_string()];
        let m = (both.clone(), both.clone());
        let t = Instant::now();
        let cut = g
            .arrive("app", "db", m.clone(), Duration::from_secs(2))
            .await;
        assert_eq!(t.elapsed(), Duration::from_secs(2));
        assert!(!cut.complete());
        assert_eq!(cut.arrived, vec!["db".to_string()]);
        assert_eq!(cut.members, both);
        // The late member does not join the closed round.
        let late = tokio::time::timeout(
            Duration::from_secs(3),
            g.arrive("app", "web", m.clone(), Duration::from_secs(2)),
        )
        .await
        .unwrap();
        assert_ne!(late.round, cut.round);
        assert_eq!(late.arrived, vec!["web".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_abandoned_by_its_waiters_closes_at_the_next_arrival() {
        let g = Groups::default();
        let both = vec!["db".to_string(), "web".to_string()];
        let m = (both.clone(), both);
        let w = Duration::from_secs(2);
        // The waiter's request is dropped (its connection went away).
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            g.arrive("app", "db", m.clone(), w),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let fresh = tokio::spawn(async move {
            let web = g.arrive("app", "web", m.clone(), w).await;
            (web, g)
        });
        let (web, g) = fresh.await.unwrap();
        assert_eq!(
            web.arrived,
            vec!["web".to_string()],
            "the stale arrival is not in it"
        );
        let hist = &g.inner.lock().unwrap()["app"].history;
        assert_eq!(hist.len(), 2);
        assert_eq!(hist[0].cut.arrived, vec!["db".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_member_is_not_waited_for_but_leaves_the_cut_incomplete() {
        let g = Groups::default();
        let t = Instant::now();
        let cut = g
            .arrive(
                "app",
                "db",
                (vec!["db".into(), "web".into()], vec!["db".into()]),
                Duration::from_secs(2),
            )
            .await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert!(!cut.complete(), "web's point is not of this moment");
    }
}
