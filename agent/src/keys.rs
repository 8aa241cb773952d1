//! A repository's passwords. Each password has a key file (`keys/<hex>`) that
//! wraps the one master key with a key derived from the password (Argon2id;
//! `docs/formats.md`, Key files). Adding, changing or removing a password
//! writes or removes a key file and nothing else: no data is encrypted again,
//! because the master key does not change.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::crypto::{KdfParams, KeyFile, MasterKey, check_new_password, random_hex};
use crate::lock::Lock;
use crate::repo::{Repository, key_file_object, read_key_file};
use crate::{Error, Result};

/// One key file, as `ferry key list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// The hex after `keys/`: what `ferry key remove` takes.
    pub id: String,
    pub created: DateTime<Utc>,
    /// The host that wrote it.
    pub host: String,
    /// Its Argon2id cost: memory (KiB), passes and lanes.
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// Whether it is the key file the password given opened.
    pub current: bool,
}

/// A key file that cannot be used (damaged, planted, too costly), with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnusableKey {
    pub id: String,
    pub error: String,
}

/// Every key file of a repository.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Keys {
    /// Oldest first.
    pub keys: Vec<KeyInfo>,
    pub unusable: Vec<UnusableKey>,
}

/// What `ferry key passwd` did.
#[derive(Debug, Clone, Serialize)]
pub struct PasswordChange {
    /// The new password's key file.
    pub added: KeyInfo,
    /// The old password's key file, removed: the old password no longer opens
    /// the repository (through this key file).
    pub removed: Option<String>,
    /// Why the old key file stays, when it does (Object Lock): until it can be
    /// removed, the old password still opens the repository.
    pub kept: Option<String>,
}

fn info(id: &str, file: &KeyFile, current: bool) -> KeyInfo {
    KeyInfo {
        id: id.to_string(),
        created: file.created,
        host: file.host.clone(),
        memory_kib: file.kdf.memory_kib,
        iterations: file.kdf.iterations,
        parallelism: file.kdf.parallelism,
        current,
    }
}

/// The id of key file `name` (`keys/ID`): what `ferry key list` shows.
fn id_of(name: &str) -> &str {
    name.trim_start_matches("keys/")
}

/// `keys/ID` for an id as `ferry key list` shows it (32 lowercase hex digits).
fn key_name(id: &str) -> Result<String> {
    if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Error::InvalidInput(format!(
            "{id:?} is not a key id (32 hex digits); `ferry key list` shows them"
        )));
    }
    Ok(format!("keys/{id}"))
}

impl Repository {
    /// Hold the repository's key files still: an exclusive lock (two key
    /// changes, or a key change and a prune, never run at once; two that each
    /// removed the other's password would leave none), taken only once every
    /// replica answers, and then a check that the key file this password
    /// opened is still there.
    fn lock_keys(&self, operation: &str) -> Result<Lock> {
        if let Some(set) = crate::replica::of(&self.store) {
            set.require_all(operation)?;
        }
        let lock = Lock::acquire(self, "key", true)?;
        if !self.store.exists(&self.key_name)? {
            return Err(Error::InvalidInput(format!(
                "{} was removed since the repository was opened: your password no longer opens it; nothing was changed",
                self.key_name
            )));
        }
        Ok(lock)
    }

    /// Wait for every replica to hold what was just written (a key file
    /// present on some replicas only would open some and not others).
    fn settle_keys(&self) {
        if let Some(set) = crate::replica::of(&self.store) {
            set.settle(std::time::Duration::from_secs(120));
        }
    }

    /// The id of the key file the password opened (or `init` wrote).
    pub fn key_id(&self) -> &str {
        id_of(&self.key_name)
    }

    /// Every key file, read and checked (none is unwrapped: that needs its
    /// password).
    pub fn keys(&self) -> Result<Keys> {
        let mut out = Keys::default();
        for (name, _) in self.store.list("keys/")? {
            let id = id_of(&name);
            match read_key_file(&self.store, &name) {
                Ok(file) => out.keys.push(info(id, &file, name == self.key_name)),
                Err(Error::Missing { .. }) => {} // removed since the listing
                Err(e @ (Error::Store { .. } | Error::Unreachable { .. })) => return Err(e),
                Err(e) => out.unusable.push(UnusableKey {
                    id: id.to_string(),
                    error: e.to_string(),
                }),
            }
        }
        out.keys
            .sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Add a password: a new key file wrapping the master key, with the
    /// Argon2id parameters `init` uses today. It is read back and opened with
    /// the password before this returns, so a key file that would not open is
    /// never left as the only way in.
    pub fn add_key(&self, password: &[u8]) -> Result<KeyInfo> {
        check_new_password(password)?;
        let _lock = self.lock_keys("adding a password")?;
        let file = self.key.wrap(password, KdfParams::default())?;
        let name = format!("keys/{}", random_hex(16));
        self.store.put(&name, key_file_object(&file))?;
        self.settle_keys();
        let back = read_key_file(&self.store, &name)?;
        let opens = MasterKey::unwrap(&back, password)?.is_some_and(|k| k.same_secret(&self.key));
        if !opens {
            // Ours, just written, and useless: nothing else refers to it.
            let removed = self.store.delete(&name);
            return Err(Error::corrupt(
                &name,
                format!(
                    "the key file read back does not open with its password ({}); no password was added",
                    match removed {
                        Ok(()) => "it was removed".to_string(),
                        Err(e) => format!("and it could not be removed: {e}"),
                    }
                ),
            ));
        }
        Ok(info(id_of(&name), &back, false))
    }

    /// Remove the key file `id`: its password no longer opens the repository.
    /// The key file the given password opened is refused (change that
    /// password with [`Repository::change_password`]), so a password that
    /// opens the repository always remains.
    pub fn remove_key(&self, id: &str) -> Result<()> {
        let name = key_name(id)?;
        if name == self.key_name {
            return Err(Error::InvalidInput(format!(
                "{name} is the key file your password opened; change that password with `ferry key passwd`, or remove it while opening the repository with another password"
            )));
        }
        if !self.store.exists(&name)? {
            return Err(Error::InvalidInput(format!(
                "{} has no key file {id}; `ferry key list` shows them",
                self.store.location()
            )));
        }
        let _lock = self.lock_keys("removing a password")?;
        self.store.delete(&name)
    }

    /// Change the password that opened the repository: add a key file for
    /// `new`, then remove the old password's. Killed in between, both
    /// passwords open the repository; under Object Lock the old key file stays
    /// until its retention ends (said in [`PasswordChange::kept`]).
    pub fn change_password(&mut self, new: &[u8]) -> Result<PasswordChange> {
        let mut added = self.add_key(new)?;
        let _lock = self.lock_keys("changing a password")?;
        let old = std::mem::replace(&mut self.key_name, format!("keys/{}", added.id));
        added.current = true;
        let (removed, kept) = match self.store.delete(&old) {
            Ok(()) => (Some(id_of(&old).to_string()), None),
            Err(e @ Error::Locked { .. }) => (None, Some(e.to_string())),
            // The new password works already: say so, and how to finish.
            Err(e) => {
                return Err(Error::InvalidInput(format!(
                    "the new password was added (key {}), but the old key file {old} could not be removed, so the old password still opens the repository: {e}; remove it with `ferry key remove {}` once the store answers",
                    added.id,
                    id_of(&old)
                )));
            }
        };
        Ok(PasswordChange {
            added,
            removed,
            kept,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{backup_bytes, memory_repo};

    #[test]
    fn a_password_added_changed_and_removed_opens_exactly_what_it_should() {
        let repo = memory_repo();
        let data = vec![7u8; 300_000];
        let point = backup_bytes(&repo, &data);
        let first = repo.key_id().to_string();
        let keys = repo.keys().unwrap();
        assert_eq!(keys.keys.len(), 1);
        assert!(keys.keys[0].current);
        assert_eq!(keys.keys[0].id, first);

        // A weak password is refused and writes nothing.
        assert!(repo.add_key(b"short").is_err());
        assert_eq!(repo.keys().unwrap().keys.len(), 1);

        let second = repo.add_key(b"a second password").unwrap();
        assert!(!second.current);
        assert_eq!(
            (second.memory_kib, second.iterations, second.parallelism),
            (64 * 1024, 3, 4)
        );
        let store = repo.store().clone();
        let other = Repository::open(store.clone(), b"a second password").unwrap();
        assert_eq!(other.key_id(), second.id);
        assert_eq!(other.point_ids().unwrap(), repo.point_ids().unwrap());

        // The key file in use cannot be removed; nor can one that is not there,
        // nor a name that is not a key id.
        let e = repo.remove_key(&first).unwrap_err().to_string();
        assert!(e.contains("ferry key passwd"), "{e}");
        let e = repo
            .remove_key("0123456789abcdef0123456789abcdef")
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no key file"), "{e}");
        let e = repo.remove_key("../config").unwrap_err().to_string();
        assert!(e.contains("is not a key id"), "{e}");

        // Changing the second password: the old one no longer opens, the new
        // one and the first one do.
        let mut other = other;
        let change = other.change_password(b"the third password").unwrap();
        assert_eq!(change.removed.as_deref(), Some(second.id.as_str()));
        assert!(change.kept.is_none());
        assert!(matches!(
            Repository::open(store.clone(), b"a second password"),
            Err(Error::WrongPassword { .. })
        ));
        let third = Repository::open(store.clone(), b"the third password").unwrap();
        assert_eq!(third.key_id(), change.added.id);
        Repository::open(store.clone(), b"pw").unwrap();

        // Removing the first password with the third.
        third.remove_key(&first).unwrap();
        assert!(matches!(
            Repository::open(store.clone(), b"pw"),
            Err(Error::WrongPassword { .. })
        ));
        let keys = third.keys().unwrap();
        assert_eq!(keys.keys.len(), 1, "{keys:?}");
        assert!(keys.keys[0].current);
        assert_eq!(crate::testing::restore_bytes(&third, &point.id), data);
    }
}
