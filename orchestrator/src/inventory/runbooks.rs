//! The runbooks of a directory (normally a git checkout), as `ferry serve
//! --runbooks DIR` shows them: each file validated against the targets this
//! build has, the sources its restores read, and the objectives it sets.
//!
//! Only `*.yaml` and `*.yml` regular files directly in the directory are
//! read (no symbolic links, no subdirectories, nothing hidden), at most
//! [`MAX_FILES`] of them, each at most [`crate::control::MAX_RUNBOOK_BYTES`]:
//! a name from a request can never reach outside the directory.

use crate::control;
use crate::error::{Error, Result};
use crate::targets::Registry;
use ferry_engine::{Diagnostics, Runbook};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// The most runbook files a directory listing reads.
pub const MAX_FILES: usize = 500;

/// One runbook file of the directory.
#[derive(Debug)]
pub struct Entry {
    /// Its name in the directory.
    pub file: String,
    pub text: String,
    /// The validated runbook, or every problem with its line.
    pub runbook: std::result::Result<Runbook, Diagnostics>,
    /// Changed since the directory's commit (or not in git at all).
    pub dirty: bool,
}

/// The directory's runbooks.
#[derive(Debug)]
pub struct Listing {
    pub directory: PathBuf,
    /// `git rev-parse HEAD` of the checkout, if it is one.
    pub commit: Option<String>,
    pub entries: Vec<Entry>,
    /// Files left out, and why (too large, unreadable, over the limit).
    pub skipped: Vec<String>,
}

impl Listing {
    /// The commit an entry's text is, `COMMIT-dirty` if it has changes.
    pub fn commit_of(&self, e: &Entry) -> Option<String> {
        self.commit.as_ref().map(|c| {
            if e.dirty {
                format!("{c}-dirty")
            } else {
                c.clone()
            }
        })
    }

    /// For each source a valid runbook restores, the smallest RPO objective
    /// set on it and the runbook that sets it.
    pub fn rpo_objectives(&self) -> BTreeMap<String, (f64, String)> {
        let mut out: BTreeMap<String, (f64, String)> = BTreeMap::new();
        for e in &self.entries {
            let Ok(rb) = &e.runbook else { continue };
            let Some(rpo) = rb.objectives.rpo_secs else {
                continue;
            };
            for s in sources(rb) {
                let slot = out.entry(s).or_insert((rpo, rb.name.clone()));
                if rpo < slot.0 {
                    *slot = (rpo, rb.name.clone());
                }
            }
        }
        out
    }
}

/// Whether `name` may name a runbook of the directory.
/// Whether `name` can be a runbook of the directory: a `*.yaml` or `*.yml`
/// file name, not hidden, no path.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Reads one file, refusing what is not a regular file and what is too large.
fn read_bounded(path: &Path) -> std::result::Result<String, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file (symbolic links are not followed)".into());
    }
    let limit = control::MAX_RUNBOOK_BYTES as u64;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > limit {
        return Err(format!("larger than the {limit} bytes a runbook may be"));
    }
    Ok(text)
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The checkout's commit and the files of `dir` that differ from it
/// (changed, staged or untracked), by name.
fn git_state(dir: &Path) -> (Option<String>, BTreeSet<String>) {
    let Some(head) = git(dir, &["rev-parse", "HEAD"]) else {
        return (None, BTreeSet::new());
    };
    let mut dirty = BTreeSet::new();
    for out in [
        git(
            dir,
            &["diff", "HEAD", "--name-only", "--relative", "-z", "--", "."],
        ),
        git(
            dir,
            &[
                "ls-files",
                "--others",
                "--exclude-standard",
                "-z",
                "--",
                ".",
            ],
        ),
    ]
    .into_iter()
    .flatten()
    {
        dirty.extend(out.split('\0').filter(|s| !s.is_empty()).map(str::to_owned));
    }
    (Some(head.trim().to_owned()), dirty)
}

fn entry(registry: &Registry, file: String, text: String, dirty: bool) -> Entry {
    let runbook = match control::validate(registry, &file, &text, None) {
        Ok(rb) => Ok(rb),
        Err(Error::Invalid(d)) => Err(d),
        Err(other) => Err(Diagnostics(vec![ferry_engine::Diagnostic {
            file: file.clone(),
            line: 1,
            column: 1,
            message: other.to_string(),
            hint: None,
        }])),
    };
    Entry {
        file,
        text,
        runbook,
        dirty,
    }
}

/// Every runbook of `dir`, validated (blocking: reads files, runs git).
pub fn list(registry: &Registry, dir: &Path) -> Result<Listing> {
    let read = std::fs::read_dir(dir).map_err(|e| {
        Error::Unavailable(format!(
            "the runbook directory {} cannot be read: {e}",
            dir.display()
        ))
    })?;
    let mut names: Vec<String> = read
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_name(n))
        .collect();
    names.sort();
    let (commit, dirty) = git_state(dir);
    let mut skipped = Vec::new();
    if names.len() > MAX_FILES {
        skipped.push(format!(
            "{} more runbook file(s) beyond the first {MAX_FILES} are not shown",
            names.len() - MAX_FILES
        ));
        names.truncate(MAX_FILES);
    }
    let mut entries = Vec::new();
    for name in names {
        match read_bounded(&dir.join(&name)) {
            Ok(text) => {
                let d = commit.is_some() && dirty.contains(&name);
                entries.push(entry(registry, name, text, d));
            }
            Err(why) => skipped.push(format!("{name}: {why}")),
        }
    }
    Ok(Listing {
        directory: dir.to_path_buf(),
        commit,
        entries,
        skipped,
    })
}

/// One runbook of `dir` by its file name (blocking).
pub fn read(registry: &Registry, dir: &Path, file: &str) -> Result<(Entry, Option<String>)> {
    if !valid_name(file) {
        return Err(Error::NotFound(format!(
            "no runbook {file:?}: runbooks are the *.yaml and *.yml files of the runbook directory"
        )));
    }
    let path = dir.join(file);
    if std::fs::symlink_metadata(&path).is_err() {
        return Err(Error::NotFound(format!(
            "no runbook {file:?} in the runbook directory"
        )));
    }
    let text = read_bounded(&path).map_err(|why| Error::Usage(format!("runbook {file}: {why}")))?;
    let (commit, dirty) = git_state(dir);
    let d = commit.is_some() && dirty.contains(file);
    let e = entry(registry, file.to_owned(), text, d);
    let commit = commit.map(|c| if d { format!("{c}-dirty") } else { c });
    Ok((e, commit))
}

/// The source a point reference names (`SOURCE@latest`, `SOURCE@2026-...`);
/// `None` for a bare point id.
fn source_of(point: &str) -> Option<String> {
    point
        .split_once('@')
        .map(|(s, _)| s.trim().to_owned())
        .filter(|s| !s.is_empty() && !s.contains("${{"))
}

/// The sources a runbook's restores read: literal points, and params a
/// restore's `point` names whole (`${{ params.NAME }}`), by their defaults.
pub fn sources(rb: &Runbook) -> Vec<String> {
    let mut out = BTreeSet::new();
    for s in rb.steps.iter().filter(|s| s.uses == "volume.restore") {
        let Some(point) = s.with.get("point").and_then(|v| v.as_str()) else {
            continue;
        };
        let p = point.trim();
        let resolved = match p
            .strip_prefix("${{")
            .and_then(|r| r.strip_suffix("}}"))
            .map(str::trim)
            .and_then(|e| e.strip_prefix("params."))
        {
            Some(param) => rb
                .params
                .iter()
                .find(|x| x.name == param)
                .and_then(|x| x.default.as_ref())
                .and_then(|d| d.as_str())
                .map(str::to_owned),
            None => Some(p.to_owned()),
        };
        if let Some(src) = resolved.as_deref().and_then(source_of) {
            out.insert(src);
        }
    }
    out.into_iter().collect()
}

/// Each step's wave: 0 for steps that need nothing, else one more than the
/// latest wave it needs (the DAG drawn left to right).
pub fn waves(rb: &Runbook) -> Vec<usize> {
    // Validation guarantees the needs form a DAG; steps may be listed in
    // any order, so settle by rounds (at most one per step).
    let mut wave = vec![0usize; rb.steps.len()];
    for _ in 0..rb.steps.len() {
        let mut changed = false;
        for (i, s) in rb.steps.iter().enumerate() {
            let w = s
                .needs
                .iter()
                .filter_map(|&n| wave.get(n).map(|w| w + 1))
                .max()
                .unwrap_or(0);
            if w != wave[i] {
                wave[i] = w;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    wave
}

#[cfg(test)]
mod tests {
    use super::*;

    const RB: &str = r#"
version: 1
name: two
params:
  web_point: { type: point, default: web@latest }
objectives: { rpo: 15m }
targets:
  local: { type: local }
steps:
  - id: a
    uses: volume.restore
    with: { point: "${{ params.web_point }}" }
  - id: b
    uses: volume.restore
    with: { point: db@latest }
  - id: c
    uses: wait
    needs: [a, b]
    with: { duration: 1s }
  - id: d
    uses: wait
    needs: [c]
    with: { duration: 1s }
"#;

    #[test]
    fn sources_waves_and_objectives_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("two.yaml"), RB).unwrap();
        std::fs::write(dir.path().join("broken.yml"), "version: 1\nname: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a runbook").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), RB).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link.yaml")).unwrap();
        let registry = Registry::builtin();
        let l = list(&registry, dir.path()).unwrap();
        let names: Vec<_> = l.entries.iter().map(|e| e.file.as_str()).collect();
        assert_eq!(names, ["broken.yml", "two.yaml"]);
        assert!(
            l.skipped.iter().any(|s| s.starts_with("link.yaml")),
            "{:?}",
            l.skipped
        );
        assert!(
            l.entries[0]
                .runbook
                .as_ref()
                .is_err_and(|d| d.0[0].line >= 1)
        );
        let rb = l.entries[1].runbook.as_ref().unwrap();
        assert_eq!(sources(rb), ["db", "web"]);
        assert_eq!(waves(rb), [0, 0, 1, 2]);
        let o = l.rpo_objectives();
        assert_eq!(o.get("web"), Some(&(900.0, "two".to_owned())));
        // Names from a request never leave the directory.
        for bad in [
            "../x.yaml",
            "/etc/passwd",
            "link.yaml",
            ".hidden.yaml",
            "notes.txt",
        ] {
            assert!(read(&registry, dir.path(), bad).is_err(), "{bad}");
        }
        assert!(read(&registry, dir.path(), "two.yaml").is_ok());
    }
}
