//! What every command and the server need to find their things: where the
//! repository is and how to get its password (read once), where the state
//! is, and Ferry's home directory. Built from the command line by the binary,
//! or from the server's configuration; nothing below it knows about `clap`.

use crate::error::{Error, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A repository password. Its bytes never reach `Debug` output.
#[derive(Clone)]
pub struct Password(Arc<Vec<u8>>);

impl Password {
    pub fn new(bytes: Vec<u8>) -> Password {
        Password(Arc::new(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Where the password comes from, in the order restic users expect.
#[derive(Clone, Debug, Default)]
pub enum PasswordSource {
    /// `--password-file FILE` (or `FERRY_PASSWORD_FILE`).
    File(PathBuf),
    /// `FERRY_PASSWORD`, taken as bytes: a password need not be UTF-8.
    Env(Vec<u8>),
    /// Ask on the terminal, if there is one.
    #[default]
    Prompt,
    /// Never ask: a server started without a password.
    Unavailable,
}

impl PasswordSource {
    /// `--password-file` if given, else `FERRY_PASSWORD` if set, else a prompt.
    pub fn from_env(file: Option<PathBuf>) -> PasswordSource {
        PasswordSource::from_file_or_var(file, "FERRY_PASSWORD")
    }

    /// `file` if given, else the variable `var` if set, else a prompt.
    pub fn from_file_or_var(file: Option<PathBuf>, var: &str) -> PasswordSource {
        if let Some(f) = file {
            return PasswordSource::File(f);
        }
        match std::env::var_os(var) {
            Some(v) => {
                use std::os::unix::ffi::OsStrExt;
                PasswordSource::Env(v.as_bytes().to_vec())
            }
            None => PasswordSource::Prompt,
        }
    }

    fn explicit(&self) -> bool {
        matches!(self, PasswordSource::File(_) | PasswordSource::Env(_))
    }
}

/// What a command runs with.
#[derive(Debug)]
pub struct Context {
    /// The repository location as the user typed it (`-r`, `FERRY_REPO`).
    pub repo: Option<String>,
    pub password_source: PasswordSource,
    /// The state database's URL (always a URL: a plain path became `sqlite://`).
    pub state_url: String,
    /// Ferry's home: state, API token, work directories.
    pub home: PathBuf,
    /// Machine-readable output on stdout.
    pub json: bool,
    /// No progress bars or chatter.
    pub quiet: bool,
    /// Read a replicated repository from this replica alone (`--read-replica`).
    pub read_replica: Option<String>,
    /// The password, once read.
    password: Mutex<Option<Password>>,
}

/// Ferry's home: $FERRY_HOME, else $XDG_CONFIG_HOME/ferry, else ~/.config/ferry.
pub fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("FERRY_HOME") {
        return h.into();
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(x).join("ferry");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".config/ferry")
}

/// The state URL for what the user gave: a URL as it is, a plain path (or
/// nothing, meaning `HOME/state.db`) as SQLite.
pub fn state_url(given: Option<&str>, home: &Path) -> String {
    match given.map(str::trim).filter(|s| !s.is_empty()) {
        None => format!("sqlite://{}", home.join("state.db").display()),
        Some(s) if s.contains("://") || s.starts_with("sqlite:") => s.to_owned(),
        Some(path) => {
            let p = Path::new(path);
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            format!("sqlite://{}", abs.display())
        }
    }
}

impl Clone for Context {
    /// A copy that shares nothing but what was read already (the password).
    fn clone(&self) -> Context {
        Context {
            repo: self.repo.clone(),
            password_source: self.password_source.clone(),
            state_url: self.state_url.clone(),
            home: self.home.clone(),
            json: self.json,
            quiet: self.quiet,
            read_replica: self.read_replica.clone(),
            password: Mutex::new(
                self.password
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone(),
            ),
        }
    }
}

impl Context {
    /// A context for work a server does: the password it read at start, if
    /// any, and never a prompt.
    pub fn for_server(
        repo: Option<String>,
        password: Option<Password>,
        state: Option<&str>,
        home: PathBuf,
    ) -> Context {
        let ctx = Context::new(repo, PasswordSource::Unavailable, state, home);
        *ctx.password
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = password;
        Context { quiet: true, ..ctx }
    }

    pub fn new(
        repo: Option<String>,
        password_source: PasswordSource,
        state: Option<&str>,
        home: PathBuf,
    ) -> Context {
        Context {
            repo: repo.filter(|r| !r.is_empty()),
            password_source,
            state_url: state_url(state, &home),
            home,
            json: false,
            quiet: false,
            read_replica: None,
            password: Mutex::new(None),
        }
    }

    /// The repository location, or the error that says how to give one.
    pub fn repo_location(&self) -> Result<&str> {
        self.repo.as_deref().ok_or_else(|| {
            Error::usage("no repository given: pass -r/--repo PATH or set FERRY_REPO")
        })
    }

    /// The password, read once from its source (`confirm`: ask twice on a
    /// terminal, for `init`).
    pub fn password(&self, confirm: bool) -> Result<Password> {
        let mut slot = self
            .password
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = &*slot {
            return Ok(p.clone());
        }
        let p = Password::new(read_password(
            &self.password_source,
            confirm,
            "repository password: ",
            "set FERRY_PASSWORD or pass --password-file FILE",
        )?);
        *slot = Some(p.clone());
        Ok(p)
    }

    /// The password when one was given or can be asked for; `None` for work
    /// that may not need a repository (a runbook without restores).
    pub fn password_if_any(&self) -> Result<Option<Password>> {
        if let Some(p) = &*self
            .password
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            return Ok(Some(p.clone()));
        }
        if self.password_source.explicit()
            || (self.repo.is_some()
                && matches!(self.password_source, PasswordSource::Prompt)
                && std::io::stdin().is_terminal())
        {
            return self.password(false).map(Some);
        }
        Ok(None)
    }

    /// Opens the store at the repository location.
    pub fn store(&self, create: bool) -> anyhow::Result<ferry_agent::Store> {
        Ok(
            ferry_connectors::store::open(self.repo_location()?, create)?
                .with_read_replica(self.read_replica.clone()),
        )
    }

    /// Opens the repository; `long_lived` keeps the immutable objects it reads
    /// (index objects, points) for a process that backs up again and again.
    pub fn open_repo(&self, long_lived: bool) -> anyhow::Result<ferry_agent::Repository> {
        let mut store = self.store(false)?;
        if long_lived {
            store = store.with_immutable_cache();
        }
        let pw = self.password(false)?;
        Ok(ferry_agent::Repository::open(store, pw.bytes())?)
    }
}

/// A new password for a repository (`ferry key add`, `ferry key passwd`):
/// `--new-password-file` if given, else `FERRY_NEW_PASSWORD` if set, else asked
/// twice on the terminal.
pub fn new_password(file: Option<PathBuf>) -> Result<Password> {
    let source = PasswordSource::from_file_or_var(file, "FERRY_NEW_PASSWORD");
    Ok(Password::new(read_password(
        &source,
        true,
        "new repository password: ",
        "set FERRY_NEW_PASSWORD or pass --new-password-file FILE",
    )?))
}

/// The password from `source`; `label` is the prompt, `how` says how to give
/// one without a terminal.
fn read_password(
    source: &PasswordSource,
    confirm: bool,
    label: &str,
    how: &str,
) -> Result<Vec<u8>> {
    match source {
        PasswordSource::File(file) => {
            let mut s = std::fs::read(file).map_err(|e| {
                Error::usage(format!("cannot read password file {}: {e}", file.display()))
            })?;
            while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                s.pop();
            }
            Ok(s)
        }
        PasswordSource::Env(bytes) => Ok(bytes.clone()),
        PasswordSource::Prompt if std::io::stdin().is_terminal() => {
            let p = rpassword::prompt_password(label).map_err(|e| Error::Internal(e.into()))?;
            if confirm
                && rpassword::prompt_password("again: ").map_err(|e| Error::Internal(e.into()))?
                    != p
            {
                return Err(Error::usage("the passwords differ; nothing was created"));
            }
            Ok(p.into_bytes())
        }
        PasswordSource::Prompt => Err(Error::usage(format!("no password: {how}"))),
        PasswordSource::Unavailable => Err(Error::usage(
            "the server has no repository password: restart it with FERRY_PASSWORD or --password-file",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_path_is_sqlite() {
        let home = Path::new("/h");
        assert_eq!(state_url(None, home), "sqlite:///h/state.db");
        assert_eq!(
            state_url(Some("/var/lib/ferry/state.db"), home),
            "sqlite:///var/lib/ferry/state.db"
        );
        assert_eq!(
            state_url(Some("postgres://u@h/db"), home),
            "postgres://u@h/db"
        );
        assert_eq!(state_url(Some("sqlite:///x.db"), home), "sqlite:///x.db");
        let rel = state_url(Some("rel/state.db"), home);
        assert!(
            rel.starts_with("sqlite:///") && rel.ends_with("/rel/state.db"),
            "{rel}"
        );
    }

    #[test]
    fn passwords_do_not_print() {
        let p = Password::new(b"s3cret".to_vec());
        assert!(!format!("{p:?}").contains("s3cret"));
    }
}
