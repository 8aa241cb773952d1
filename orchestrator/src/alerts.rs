//! Alert-triggered runs: Alertmanager's webhook (`POST
//! /api/hooks/alertmanager`) starts the runbook that a route file maps from
//! the alert group's labels, once per incident.
//!
//! The route file (`ferry serve --alert-routes FILE`) is YAML:
//!
//! ```yaml
//! routes:
//!   - match: { alertname: SiteDown, site: eu-west }  # every label must be equal
//!     runbook: shop.yaml     # a file of `ferry serve --runbooks DIR`
//!     mode: run              # run (failover, the default) or drill
//!     target: aws            # optional
//!     params: { web_point: "shop-web@latest" }
//! ```
//!
//! The first route whose labels all equal the group's (its common and group
//! labels) wins. An incident is an Alertmanager group key: its first firing
//! notification starts the run, repeated ones start nothing, a resolved one
//! closes it (and starts nothing); a firing after that is a new incident. A
//! failover (`mode: run`) must stop at an approval gate, so a human confirms
//! it, unless its route says `unattended: true`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The most a route file may be.
pub const MAX_ROUTES_BYTES: u64 = 256 << 10;
/// The most a group key may be.
pub const MAX_GROUP_KEY: usize = 1024;

/// What a route starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Run,
    Drill,
}

/// One route of the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Labels that must all be equal to the group's.
    #[serde(rename = "match")]
    pub labels: BTreeMap<String, String>,
    pub runbook: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// A failover without an approval gate: nobody confirms it.
    #[serde(default)]
    pub unattended: bool,
}

/// The route file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    pub routes: Vec<Route>,
}

impl Routes {
    /// Reads and checks a route file; the error names the file and what to fix.
    pub fn load(path: &Path) -> Result<Routes> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::usage(format!("--alert-routes {}: {e}", path.display())))?;
        if meta.len() > MAX_ROUTES_BYTES {
            return Err(Error::usage(format!(
                "--alert-routes {}: {} bytes; a route file holds at most {MAX_ROUTES_BYTES}",
                path.display(),
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::usage(format!("--alert-routes {}: {e}", path.display())))?;
        Routes::parse(&path.display().to_string(), &text)
    }

    /// Parses and checks a route file's text (`name` is for messages).
    pub fn parse(name: &str, text: &str) -> Result<Routes> {
        let routes: Routes = marked_yaml::from_yaml(0, text).map_err(|e| {
            Error::usage(format!(
                "{name}: {e}; a route file is `routes:` with a list of {{match, runbook, mode, target, params, unattended}}"
            ))
        })?;
        for (i, r) in routes.routes.iter().enumerate() {
            let n = i + 1;
            if r.labels.is_empty() {
                return Err(Error::usage(format!(
                    "{name}: route {n} matches every alert: give it at least one label in `match`"
                )));
            }
            if !crate::inventory::runbooks::valid_name(&r.runbook) {
                return Err(Error::usage(format!(
                    "{name}: route {n}: runbook {:?} must be a file of the server's runbook directory (*.yaml or *.yml, no path)",
                    r.runbook
                )));
            }
        }
        Ok(routes)
    }

    /// The first route whose labels all equal those given.
    pub fn find(&self, labels: &BTreeMap<String, String>) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// Alertmanager's webhook body (version 4); fields Ferry does not use are
/// ignored.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
pub struct Notification {
    /// Identifies the alert group: one incident.
    #[serde(rename = "groupKey")]
    pub group_key: String,
    /// `firing` or `resolved`.
    pub status: String,
    #[serde(rename = "groupLabels", default)]
    pub group_labels: BTreeMap<String, String>,
    #[serde(rename = "commonLabels", default)]
    pub common_labels: BTreeMap<String, String>,
}

impl Notification {
    /// The labels routes match: the group's and those all its alerts share.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = self.common_labels.clone();
        l.extend(self.group_labels.clone());
        l
    }

    /// Refuses what Alertmanager never sends.
    pub fn validate(&self) -> Result<()> {
        if self.group_key.is_empty() || self.group_key.len() > MAX_GROUP_KEY {
            return Err(Error::usage(format!(
                "groupKey must be 1 to {MAX_GROUP_KEY} bytes"
            )));
        }
        if !matches!(self.status.as_str(), "firing" | "resolved") {
            return Err(Error::usage(format!(
                "status {:?}: Alertmanager sends firing or resolved",
                self.status
            )));
        }
        Ok(())
    }
}

/// What a notification did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A new incident: its run started.
    Started,
    /// The incident is open and has its run: nothing more.
    AlreadyStarted,
    /// The incident is closed; nothing started.
    Resolved,
    /// No route matches these labels; nothing started.
    Ignored,
}

/// The answer to a notification.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Outcome {
    pub action: Action,
    /// The incident's run, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub detail: String,
}

/// Whether a runbook stops at an approval gate somewhere.
pub fn has_approval(file: &str, text: &str) -> bool {
    ferry_engine::runbook::parse(file, text)
        .map(|r| r.steps.iter().any(|s| s.uses == "approval"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_on_every_label_first_route_first() {
        let r = Routes::parse(
            "routes.yaml",
            "routes:\n  - match: { alertname: SiteDown, site: eu }\n    runbook: eu.yaml\n  - match: { alertname: SiteDown }\n    runbook: any.yaml\n    mode: drill\n",
        )
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        let eu = r.find(&labels(&[
            ("alertname", "SiteDown"),
            ("site", "eu"),
            ("x", "y"),
        ]));
        assert_eq!(eu.map(|r| r.runbook.as_str()), Some("eu.yaml"));
        assert_eq!(eu.map(|r| r.mode), Some(Mode::Run));
        let us = r.find(&labels(&[("alertname", "SiteDown"), ("site", "us")]));
        assert_eq!(
            us.map(|r| (r.runbook.as_str(), r.mode)),
            Some(("any.yaml", Mode::Drill))
        );
        assert!(r.find(&labels(&[("alertname", "DiskFull")])).is_none());
    }

    #[test]
    fn bad_route_files_say_what_to_fix() {
        for (text, want) in [
            (
                "routes:\n  - match: {}\n    runbook: a.yaml\n",
                "matches every alert",
            ),
            (
                "routes:\n  - match: { a: b }\n    runbook: ../a.yaml\n",
                "no path",
            ),
            (
                "routes:\n  - match: { a: b }\n    runbook: a.yaml\n    mode: sometimes\n",
                "routes.yaml",
            ),
            (
                "routes:\n  - match: { a: b }\n    runbok: a.yaml\n",
                "routes.yaml",
            ),
            ("- just a list\n", "routes.yaml"),
        ] {
            let e = Routes::parse("routes.yaml", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn approval_gates_are_found() {
        assert!(has_approval(
            "a.yaml",
            "name: a\nsteps:\n  - id: go\n    uses: approval\n  - id: n\n    uses: noop\n    needs: go\n"
        ));
        assert!(!has_approval(
            "b.yaml",
            "name: b\nsteps:\n  - id: n\n    uses: noop\n"
        ));
    }
}
