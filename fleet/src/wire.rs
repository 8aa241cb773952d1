//! What `ferry-agent` and `ferry serve` say to each other, as JSON over
//! HTTP(S): enrollment with a one-time token, the policy the agent polls, the
//! status it pushes. Both ends build on these types, so the protocol has one
//! definition.
//!
//! The agent authenticates with its own credential
//! (`Authorization: Bearer fagent_ID_SECRET`), given once at enrollment and
//! stored by the server only as a hash. Nothing here carries a repository
//! password or cloud credentials: the agent gets those from its own machine
//! (its config file's `password_file` or `FERRY_PASSWORD`; the object store's
//! usual credential chain), never from the server.

use serde::{Deserialize, Serialize};

/// Every agent credential starts with this.
pub const CREDENTIAL_PREFIX: &str = "fagent_";
/// Every enrollment token starts with this.
pub const ENROLL_PREFIX: &str = "fenroll_";
/// The shortest interval a policy may ask for.
pub const MIN_INTERVAL_SECS: u64 = 1;
/// An agent that has not been heard from for this many intervals is silent.
pub const SILENT_AFTER_INTERVALS: u64 = 3;

/// A block device or image file the machine has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub path: String,
    pub size: u64,
}

/// `POST /api/agents/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The one-time token from `ferry agent-token create`.
    pub token: String,
    pub hostname: String,
    /// Stable across restarts (`/etc/machine-id`).
    pub machine_id: String,
    pub devices: Vec<Device>,
}

/// The answer to an enrollment: who the agent is and what it does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    pub agent_id: String,
    /// The agent's own credential; shown this once.
    pub credential: String,
    pub policy: Policy,
}

/// What an agent protects, how often and where to. The server keeps one per
/// agent; the agent polls it each interval and applies changes at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The source its points are recorded as.
    pub source: String,
    /// The devices (paths on the machine) cut into each point, in order.
    pub devices: Vec<String>,
    /// Between the starts of two cycles.
    pub interval_secs: u64,
    /// The repository's location (a directory, `s3://...`, ...); the password
    /// and the store's credentials come from the agent's machine.
    pub repository: String,
    /// Keep this many newest points of the source (retention after each cycle).
    #[serde(default)]
    pub keep_last: Option<u32>,
    /// The consistency group this machine cuts with: agents of one group
    /// cut together (`POST /api/agent/cut`), at the same wall-clock
    /// multiples of the interval, so an application's machines restore to
    /// one moment (`SOURCE@group-latest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// How long the server holds a group's round open for members that have not
/// arrived: arrived members keep their writes held that long at most, then
/// cut without the others.
pub const GROUP_WAIT_MS: u64 = 2_000;

/// `POST /api/agent/cut`: the agent has held its writes and waits for the
/// rest of its group. The answer is the round ([`GroupCut`]) once every
/// member arrived, or when [`GROUP_WAIT_MS`] passed.
pub use ferry_agent::point::GroupCut;

/// How a device's changes are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Read the whole device each cycle and find unchanged chunks by id.
    Scan,
    /// Changed blocks from a dm-era target under the device.
    DmEra,
}

impl Mode {
    /// As it is written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Scan => "scan",
            Mode::DmEra => "dm-era",
        }
    }
}

/// One device's protection, as the agent last saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceStatus {
    pub path: String,
    /// Its name in the points.
    pub disk: String,
    pub mode: Option<Mode>,
    /// Why this mode (e.g. "an image file: no device-mapper under it").
    pub mode_reason: String,
    pub bytes_read: u64,
    /// Bytes the change tracker (dm-era) marked as written since the last
    /// point, which is what an incremental cycle reads; absent when the
    /// cycle read the device whole.
    pub changed_bytes: Option<u64>,
}

/// `POST /api/agent/status`: what the agent pushes after every cycle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentStatus {
    pub version: String,
    pub cycles_ok: u64,
    pub cycles_failed: u64,
    pub last_point: Option<String>,
    /// The instant the newest committed point captured (RFC 3339).
    pub last_cut: Option<chrono::DateTime<chrono::Utc>>,
    /// Seconds from that instant to the commit: the RPO the agent achieved.
    pub lag_secs: Option<f64>,
    /// The consistency the last point recorded (`crash`, `fuzzy`, ...).
    pub consistency: Option<String>,
    pub last_cycle_secs: f64,
    pub throughput_bytes_per_sec: f64,
    pub stored_bytes: u64,
    /// How long the last cut held the dm-era devices suspended (their file
    /// systems frozen); absent when no device runs in dm-era mode.
    pub pause_secs: Option<f64>,
    pub last_error: Option<String>,
    /// The last cycle's hook failure (`pre_cut` or `post_cut` of the agent's
    /// config), if any; a failed pre hook leaves the point crash-consistent.
    pub hook_error: Option<String>,
    /// The last cycle's coordinated cut with its group: who arrived, the skew.
    pub group_cut: Option<GroupCut>,
    /// Why the last cycle cut without its group (the server could not be
    /// reached, or the agent's writes could not be held), if it did.
    pub group_error: Option<String>,
    pub devices: Vec<DeviceStatus>,
}

/// An error body from the server (`{"error": "..."}`).
#[derive(Debug, Clone, Deserialize)]
pub struct ApiError {
    pub error: String,
}
