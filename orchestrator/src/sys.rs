//! What the orchestrator asks of the operating system: this host's name,
//! whether a process lives, signals, and random ids. One place, through
//! `rustix` and `ring`, instead of `kill(1)` and `/proc` parsing in several.

use rustix::process::{Pid, Signal};

/// This host's name (as `uname -n` prints it).
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn pid(pid: i32) -> Option<Pid> {
    Pid::from_raw(pid)
}

/// Whether a process with this id exists (a zombie counts as alive).
pub fn pid_alive(p: i32) -> bool {
    match pid(p) {
        Some(p) => match rustix::process::test_kill_process(p) {
            Ok(()) => true,
            // It exists, but is not ours to signal.
            Err(e) => e == rustix::io::Errno::PERM,
        },
        None => false,
    }
}

/// Sends SIGTERM (`force` false) or SIGKILL. A process that is already gone
/// is not an error.
pub fn signal(p: i32, force: bool) -> std::io::Result<()> {
    let Some(p) = pid(p) else {
        return Ok(());
    };
    let sig = if force { Signal::KILL } else { Signal::TERM };
    match rustix::process::kill_process(p, sig) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Ends this process at once, as `kill -9` would (a test hook).
pub fn kill_self() -> ! {
    let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::KILL);
    // SIGKILL cannot be caught; this is never reached in practice.
    std::process::abort()
}

/// Makes this process non-dumpable: other processes of the same user can no
/// longer read its memory or `/proc/PID/environ` (where `FERRY_PASSWORD`
/// lives), nor attach a debugger. Runbook commands and VMs run as the same
/// user, so this is what keeps Ferry's secrets from them.
pub fn harden_process() {
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!("cannot make this process non-dumpable: {e}");
    }
}

/// `n` random bytes as lowercase hex, from the system's secure generator.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    // The system generator does not fail on Linux once booted; if it ever
    // did, an all-zero id would collide, so fail loudly instead.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .unwrap_or_else(|_| panic!("the system's random generator failed"));
    hex::encode(b)
}

/// Random bytes for secrets (tokens); an error rather than a panic.
pub fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("the system's random generator failed"))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(pid_alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = child.id() as i32;
        child.wait().unwrap();
        assert!(!pid_alive(id));
        assert!(signal(id, false).is_ok(), "a gone process is not an error");
        assert!(!hostname().is_empty());
        assert_eq!(random_hex(4).len(), 8);
        assert_ne!(random_hex(8), random_hex(8));
    }
}
