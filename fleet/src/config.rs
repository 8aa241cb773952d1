//! The agent's config file (TOML), written by `ferry-agent enroll` with mode
//! 0600 because it holds the agent's credential. It never holds the
//! repository password (only where to read it) nor cloud credentials.
//!
//! ```toml
//! server = "https://ferry.example.net:8443"
//! agent_id = "3f0c9a1be2d4"
//! credential = "fagent_3f0c9a1be2d4_..."
//! # ca_cert = "/etc/ferry/ca.pem"        # the server's CA, if not a public one
//! # password_file = "/etc/ferry/repo-password"   # else FERRY_PASSWORD
//! # pre_cut = "fsfreeze -f /srv/db"     # the point is labelled app when it succeeds
//! # post_cut = "fsfreeze -u /srv/db"
//!
//! # dm-era change tracking for a device-mapper device (an LVM volume): the
//! # agent puts an era target under it live and reads only the blocks written
//! # since the last point, through a snapshot. Both extra devices are
//! # overwritten: give empty volumes.
//! # [[dm_era]]
//! # device = "/dev/vg0/data"
//! # metadata = "/dev/vg0/data_era"     # at least 4 MiB
//! # cow = "/dev/vg0/data_cow"          # holds what is overwritten during a cycle's read
//! # block_kib = 64                     # tracking granularity
//! ```
//!
//! Beside it, `NAME.policy.json` caches the last policy the server gave, so an
//! agent restarted while the server is down goes on protecting.

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::wire::Policy;

/// Where the config lives unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/ferry/agent.toml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The `ferry serve` this agent reports to.
    pub server: String,
    pub agent_id: String,
    pub credential: String,
    /// A PEM file of the CA that signed the server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// The repository password's file (else `FERRY_PASSWORD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// A shell command run before each cycle reads the devices (e.g.
    /// `fsfreeze -f /srv/db` or a database's flush and lock). When it
    /// succeeds the point is labelled `app`; when it fails the cycle goes on
    /// and the point keeps the label its read earns (`crash` or `fuzzy`).
    /// Hooks live here, on the machine, never in the server's policy: a
    /// server must not be able to run commands on its agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_cut: Option<String>,
    /// Run whenever `pre_cut` ran (e.g. `fsfreeze -u /srv/db`): as soon as
    /// the snapshots exist when every device runs in dm-era mode (the
    /// application is held for the cut only), else after the read.
    /// `FERRY_VIEWS` names the snapshots (the devices as they were at the
    /// cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_cut: Option<String>,
    /// Devices tracked with dm-era. Like the hooks, this is the machine's
    /// decision, never the server's: it names devices the agent overwrites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dm_era: Vec<EraConfig>,
}

/// A device tracked by dm-era, with the two devices that takes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EraConfig {
    /// The device protected (a device-mapper device: an LVM volume).
    pub device: PathBuf,
    /// The era target's metadata (at least 4 MiB; overwritten).
    pub metadata: PathBuf,
    /// The snapshot's copy-on-write store during a cycle's read: it must hold
    /// what the machine overwrites while a cycle reads (overwritten).
    pub cow: PathBuf,
    /// The tracking granularity in KiB (a power of two, default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_kib: Option<u32>,
}

impl Config {
    /// The dm-era entry of a device of the policy, matched by path or by
    /// the block device both paths name (`/dev/vg0/data` is
    /// `/dev/mapper/vg0-data`).
    pub fn era_for(&self, device: &str) -> Option<&EraConfig> {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        let rdev = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .filter(|m| m.file_type().is_block_device())
                .map(|m| m.rdev())
        };
        let same = |a: &Path, b: &Path| a == b || rdev(a).is_some_and(|x| rdev(b) == Some(x));
        self.dm_era
            .iter()
            .find(|e| same(&e.device, Path::new(device)))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the agent's config {}; enroll first with `ferry-agent enroll --server URL --token TOKEN`",
                path.display()
            )
        })?;
        warn_if_readable_by_others(path);
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid agent config", path.display()))
    }

    /// Writes the config readable by its owner only, replacing any old one
    /// atomically (a crash leaves the old or the new, never half of one).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self)?;
        write_private(path, text.as_bytes())
    }

    /// The cached policy's file.
    pub fn policy_path(path: &Path) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(".policy.json");
        PathBuf::from(s)
    }

    pub fn load_policy(path: &Path) -> Option<Policy> {
        let bytes = std::fs::read(Config::policy_path(path)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn save_policy(path: &Path, p: &Policy) -> Result<()> {
        write_private(&Config::policy_path(path), &serde_json::to_vec_pretty(p)?)
    }
}

/// Writes `bytes` to `path` through a 0600 temporary file and a rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "{} holds the agent's credential but others can read it; run chmod 600 on it",
            path.display()
        );
    }
}

/// Reads the repository password: the config's `password_file`, else
/// `FERRY_PASSWORD`.
pub fn repository_password(cfg: &Config) -> Result<Vec<u8>> {
    if let Some(file) = &cfg.password_file {
        let mut s = std::fs::read(file)
            .with_context(|| format!("cannot read the password file {}", file.display()))?;
        while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            s.pop();
        }
        return Ok(s);
    }
    match std::env::var_os("FERRY_PASSWORD") {
        Some(p) if !p.is_empty() => Ok(p.into_encoded_bytes()),
        _ => bail!(
            "no repository password: set password_file in the agent's config or FERRY_PASSWORD in its environment"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/agent.toml");
        let cfg = Config {
            server: "http://127.0.0.1:1".into(),
            agent_id: "abc".into(),
            credential: "fagent_abc_s3cret".into(),
            ca_cert: None,
            password_file: Some("/etc/ferry/pw".into()),
            pre_cut: Some("sync".into()),
            post_cut: None,
            dm_era: vec![EraConfig {
                device: "/dev/vg0/data".into(),
                metadata: "/dev/vg0/meta".into(),
                cow: "/dev/vg0/cow".into(),
                block_kib: None,
            }],
        };
        cfg.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Config::load(&path).unwrap(), cfg);
        // An unknown key is a mistake the operator should hear about.
        std::fs::write(
            &path,
            "server = \"x\"\nagent_id = \"a\"\ncredential = \"c\"\npasword_file = \"/p\"\n",
        )
        .unwrap();
        let e = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(e.contains("pasword_file"), "{e}");
        let e = format!(
            "{:#}",
            Config::load(&dir.path().join("none.toml")).unwrap_err()
        );
        assert!(e.contains("ferry-agent enroll"), "{e}");
    }
}
