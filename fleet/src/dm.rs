//! The device-mapper operations dm-era tracking needs, as ioctls on
//! `/dev/mapper/control` (the `devicemapper` crate) from the agent's own
//! process. Each used to be a `dmsetup` process: about thirteen per cycle,
//! which under software emulation cost more CPU than the rest of an idle
//! cycle and held the cut's suspension longest.
//!
//! Tables are written and read in `dmsetup`'s text form (`START LENGTH
//! TARGET ARGS`, one line per target), so what the agent logs and compares
//! is what an operator sees with `dmsetup table`. No operation waits for
//! udev: devices are named by `MAJOR:MINOR` and read through `/dev/dm-N`,
//! which devtmpfs makes.

use anyhow::{Context as _, Result, anyhow, bail};
use devicemapper::{DM, DevId, DmFlags, DmName, DmOptions, DmUuid};

/// The control node every operation goes through.
pub const CONTROL: &str = "/dev/mapper/control";

fn dm() -> Result<DM> {
    DM::new().map_err(|e| {
        anyhow!("cannot open {CONTROL} ({e}): load the dm_mod module and run the agent as root")
    })
}

fn name(n: &str) -> Result<&DmName> {
    DmName::new(n).map_err(|e| anyhow!("{n:?} cannot name a device-mapper device: {e}"))
}

/// A table in `dmsetup`'s text form, as the ioctl takes it.
fn parse_table(text: &str) -> Result<Vec<(u64, u64, String, String)>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.trim().splitn(4, char::is_whitespace);
            let (Some(start), Some(len), Some(target)) = (w.next(), w.next(), w.next()) else {
                bail!("device-mapper table line {l:?}: expected START LENGTH TARGET ARGS");
            };
            let num = |s: &str| {
                s.parse::<u64>()
                    .map_err(|_| anyhow!("device-mapper table line {l:?}: {s:?} is not a number"))
            };
            Ok((
                num(start)?,
                num(len)?,
                target.to_string(),
                w.next().unwrap_or("").trim().to_string(),
            ))
        })
        .collect()
}

fn format_table(lines: &[(u64, u64, String, String)]) -> String {
    lines
        .iter()
        .map(|(s, l, t, a)| format!("{s} {l} {t} {a}\n"))
        .collect()
}

/// The active table of `n` (`dmsetup table`).
pub fn table(n: &str) -> Result<String> {
    let opts = DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE);
    let (_, lines) = dm()?
        .table_status(&DevId::Name(name(n)?), opts)
        .with_context(|| format!("reading the table of {n}"))?;
    Ok(format_table(&lines))
}

/// The status line of `n`'s targets (`dmsetup status`).
pub fn status(n: &str) -> Result<String> {
    let (_, lines) = dm()?
        .table_status(&DevId::Name(name(n)?), DmOptions::default())
        .with_context(|| format!("reading the status of {n}"))?;
    Ok(format_table(&lines))
}

/// Loads `text` as `n`'s inactive table; the next resume makes it active.
pub fn load(n: &str, text: &str) -> Result<()> {
    dm()?
        .table_load(
            &DevId::Name(name(n)?),
            &parse_table(text)?,
            DmOptions::default(),
        )
        .with_context(|| format!("loading a table into {n}: {}", text.trim()))?;
    Ok(())
}

/// Creates `n` with `text` as its table, active (`dmsetup create`).
pub fn create(n: &str, uuid: Option<&str>, text: &str) -> Result<()> {
    let dm = dm()?;
    let uuid = uuid
        .map(|u| DmUuid::new(u).map_err(|e| anyhow!("{u:?} cannot be a device-mapper uuid: {e}")))
        .transpose()?;
    let table = parse_table(text)?;
    dm.device_create(name(n)?, uuid, DmOptions::default())
        .with_context(|| format!("creating {n}"))?;
    let id = DevId::Name(name(n)?);
    let made = dm
        .table_load(&id, &table, DmOptions::default())
        .and_then(|_| dm.device_suspend(&id, DmOptions::default()));
    if let Err(e) = made {
        let _ = dm.device_remove(&id, DmOptions::default());
        return Err(anyhow!(e).context(format!("creating {n} as {}", text.trim())));
    }
    Ok(())
}

/// Removes `n` (`dmsetup remove`).
pub fn remove(n: &str) -> Result<()> {
    dm()?
        .device_remove(&DevId::Name(name(n)?), DmOptions::default())
        .with_context(|| format!("removing {n}"))?;
    Ok(())
}

/// Suspends `n`: its I/O is held, and its file system frozen unless
/// `nolockfs`.
pub fn suspend(n: &str, nolockfs: bool) -> Result<()> {
    let mut flags = DmFlags::DM_SUSPEND;
    if nolockfs {
        flags |= DmFlags::DM_SKIP_LOCKFS;
    }
    dm()?
        .device_suspend(
            &DevId::Name(name(n)?),
            DmOptions::default().set_flags(flags),
        )
        .with_context(|| format!("suspending {n}"))?;
    Ok(())
}

/// Resumes `n`, making a loaded table active.
pub fn resume(n: &str) -> Result<()> {
    dm()?
        .device_suspend(&DevId::Name(name(n)?), DmOptions::default())
        .with_context(|| format!("resuming {n}"))?;
    Ok(())
}

/// Sends `msg` to the target at sector 0 of `n` (`dmsetup message N 0 MSG`).
pub fn message(n: &str, msg: &str) -> Result<()> {
    dm()?
        .target_msg(&DevId::Name(name(n)?), Some(0), msg)
        .with_context(|| format!("sending {msg:?} to {n}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_go_both_ways_in_dmsetups_form() {
        let text = "0 131072 era 254:3 254:4 128\n131072 8 linear 8:16 2048\n";
        let t = parse_table(text).unwrap();
        assert_eq!(t[0], (0, 131072, "era".into(), "254:3 254:4 128".into()));
        assert_eq!(t[1].3, "8:16 2048");
        assert_eq!(format_table(&t), text);
        assert_eq!(parse_table("0 8 error").unwrap()[0].3, "");
        assert!(parse_table("0 x linear 8:16 0").is_err());
        assert!(parse_table("0 8").is_err());
    }
}
