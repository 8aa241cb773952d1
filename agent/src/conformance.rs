//! Conformance suites for the data plane's seams: what every [`Store`] (and its
//! [`Versioned`](crate::store::Versioned) side) and every [`BlockSource`] must do, written once and called
//! by each implementation's tests (the memory and directory stores here, S3 on
//! moto and Azure on Azurite in `tests/tests/conformance.rs`, the NBD source in
//! `ferry-connectors`), like `object_store`'s own `integration` module.
//!
//! Each suite returns the first broken promise as a [`Failure`] naming the check,
//! so a test can also assert that a deliberately broken implementation fails.
//! Public behind the `conformance` feature (tests of other crates enable it).

use std::fmt;

use bytes::Bytes;
use chrono::Utc;

use crate::error::Error;
use crate::sink::BlockSink;
use crate::source::BlockSource;
use crate::store::{LockMode, MULTIPART_THRESHOLD, PART_SIZE, Retention, Store};

/// A promise an implementation broke.
#[derive(Debug)]
pub struct Failure {
    /// Which check, e.g. `store.ranged_get`.
    pub check: &'static str,
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conformance check {} failed: {}",
            self.check, self.detail
        )
    }
}

impl std::error::Error for Failure {}

type Outcome = Result<(), Failure>;

fn fail(check: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        check,
        detail: detail.into(),
    }
}

/// `Ok` of an operation, or the failure of `check`.
fn ok<T>(check: &'static str, r: crate::Result<T>) -> Result<T, Failure> {
    r.map_err(|e| fail(check, format!("unexpected error: {e}")))
}

fn ensure(check: &'static str, cond: bool, detail: impl FnOnce() -> String) -> Outcome {
    if cond {
        Ok(())
    } else {
        Err(fail(check, detail()))
    }
}

/// Bytes that differ at every offset of a 251-byte period, so a read from the
/// wrong offset cannot match.
fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed)
        .collect::<Vec<_>>()
        .into()
}

/// What every [`Store`] promises, run under `prefix` (give a fresh one per run;
/// the suite deletes what it wrote when it passes):
///
/// - `get` returns what `put` wrote; `size` is its length; `exists` agrees.
/// - An object that is not there is typed: `get` and `get_range` return
///   [`Error::Missing`], `size` returns `None`; never a generic store error.
/// - `get_range` returns exactly the bytes asked for, at any offset; a range that
///   ends past the end of the object is [`Error::Corrupt`] naming the object
///   ("the object has only N bytes"), and is not retried.
/// - A second `put` of a name replaces the object whole (new bytes and size).
/// - `list(p)` returns every object under the directory `p/` (not `px`), sorted,
///   with its size, names relative to the store.
/// - `delete` removes an object; deleting a missing object succeeds.
/// - Objects of [`MULTIPART_THRESHOLD`] bytes or more (uploaded in parts) read
///   back whole and by ranges across part boundaries; with `large` false this
///   check is skipped (slow emulators).
pub fn store(store: &Store, prefix: &str, large: bool) -> Outcome {
    let name = |n: &str| format!("{prefix}/{n}");

    // Missing objects are typed.
    let missing = name("missing");
    match store.get(&missing) {
        Err(Error::Missing { .. }) => {}
        other => return Err(fail("store.missing_get", format!("{other:?}"))),
    }
    match store.get_range(&missing, 0..1) {
        Err(Error::Missing { .. }) => {}
        other => return Err(fail("store.missing_range", format!("{other:?}"))),
    }
    let size = ok("store.missing_size", store.size(&missing))?;
    ensure("store.missing_size", size.is_none(), || format!("{size:?}"))?;

    // Put, get, size.
    let a = name("a");
    let data = pattern(100_003, 0);
    ok("store.put", store.put(&a, data.clone()))?;
    let got = ok("store.get", store.get(&a))?;
    ensure("store.get", got == data, || {
        format!(
            "read {} bytes that differ from the {} written",
            got.len(),
            data.len()
        )
    })?;
    let size = ok("store.size", store.size(&a))?;
    ensure("store.size", size == Some(data.len() as u64), || {
        format!("size {size:?}, wrote {}", data.len())
    })?;
    ensure(
        "store.exists",
        ok("store.exists", store.exists(&a))?,
        || "exists is false after a put".into(),
    )?;

    // Ranged gets at odd offsets.
    let len = data.len() as u64;
    for r in [
        0..1,
        1..2,
        3..1000,
        4095..4097,
        65_537..100_000,
        len - 1..len,
        0..len,
    ] {
        let got = ok("store.ranged_get", store.get_range(&a, r.clone()))?;
        ensure(
            "store.ranged_get",
            got[..] == data[r.start as usize..r.end as usize],
            || format!("bytes {r:?} differ from what was written"),
        )?;
    }

    // A range past the end is a typed, unretried error.
    let retries = store.requests().retries;
    for r in [len - 10..len + 10, len + 5..len + 10] {
        match store.get_range(&a, r.clone()) {
            Err(Error::Corrupt { object, detail }) if object == a => {
                ensure("store.range_past_end", detail.contains("only"), || {
                    format!("the error does not give the object's size: {detail}")
                })?;
            }
            other => {
                return Err(fail(
                    "store.range_past_end",
                    format!("range {r:?} of a {len}-byte object: {other:?}"),
                ));
            }
        }
    }
    let more = store.requests().retries - retries;
    ensure("store.range_past_end", more == 0, || {
        format!("a range past the end was retried {more} times")
    })?;

    // Overwrite replaces whole.
    let shorter = pattern(777, 9);
    ok("store.overwrite", store.put(&a, shorter.clone()))?;
    let got = ok("store.overwrite", store.get(&a))?;
    ensure("store.overwrite", got == shorter, || {
        format!(
            "after a second put, read {} bytes, not the 777 written",
            got.len()
        )
    })?;
    let size = ok("store.overwrite", store.size(&a))?;
    ensure("store.overwrite", size == Some(777), || {
        format!("size {size:?}")
    })?;

    // An empty object is an object.
    let empty = name("empty");
    ok("store.empty", store.put(&empty, Bytes::new()))?;
    let got = ok("store.empty", store.get(&empty))?;
    ensure("store.empty", got.is_empty(), || {
        format!("{} bytes", got.len())
    })?;
    let size = ok("store.empty", store.size(&empty))?;
    ensure("store.empty", size == Some(0), || format!("size {size:?}"))?;

    // List under a directory prefix.
    let under = [name("list/x"), name("list/y/z")];
    for (i, n) in under.iter().enumerate() {
        ok("store.list", store.put(n, pattern(10 + i, 1)))?;
    }
    ok("store.list", store.put(&name("listed"), pattern(5, 2)))?;
    let listed = ok("store.list", store.list(&name("list")))?;
    let want = vec![(under[0].clone(), 10), (under[1].clone(), 11)];
    ensure("store.list", listed == want, || {
        format!("list({}) gave {listed:?}, want {want:?}", name("list"))
    })?;
    let none = ok("store.list", store.list(&name("nothing-here")))?;
    ensure("store.list", none.is_empty(), || {
        format!("an empty prefix lists {none:?}")
    })?;

    // Delete, twice.
    ok("store.delete", store.delete(&a))?;
    let size = ok("store.delete", store.size(&a))?;
    ensure("store.delete", size.is_none(), || {
        format!("the object is still there after delete ({size:?})")
    })?;
    match store.delete(&a) {
        Ok(()) => {}
        Err(e) => return Err(fail("store.delete_missing", format!("{e}"))),
    }
    match store.get(&a) {
        Err(Error::Missing { .. }) => {}
        other => return Err(fail("store.delete", format!("get after delete: {other:?}"))),
    }

    if large {
        // Large objects go up in parts and come back whole.
        let big = name("big");
        let data = pattern(MULTIPART_THRESHOLD + 12_345, 3);
        ok("store.multipart", store.put(&big, data.clone()))?;
        let size = ok("store.multipart", store.size(&big))?;
        ensure("store.multipart", size == Some(data.len() as u64), || {
            format!("size {size:?}, wrote {}", data.len())
        })?;
        let edge = PART_SIZE as u64;
        let r = edge - 3..edge + 5;
        let got = ok("store.multipart", store.get_range(&big, r.clone()))?;
        ensure(
            "store.multipart",
            got[..] == data[r.start as usize..r.end as usize],
            || "a range across a part boundary differs".into(),
        )?;
        let got = ok("store.multipart", store.get(&big))?;
        ensure("store.multipart", got == data, || {
            format!("read back {} bytes that differ", got.len())
        })?;
        ok("store.multipart", store.delete(&big))?;

        // A spilled pack goes up from its file in parts, and a short one whole.
        for (check, what, len) in [
            ("store.put_file", "file", 2 * PART_SIZE + 4_321),
            ("store.put_small_file", "small_file", 70_001),
        ] {
            let data = pattern(len, 5);
            let io = |e: std::io::Error| fail(check, format!("temporary file: {e}"));
            let mut file = tempfile::tempfile().map_err(io)?;
            std::io::Write::write_all(&mut file, &data).map_err(io)?;
            // Bytes past `len` are not part of the object.
            std::io::Write::write_all(&mut file, b"tail").map_err(io)?;
            let obj = name(what);
            let before = store.requests().puts;
            ok(check, store.put_file(&obj, &file, len as u64))?;
            let puts = store.requests().puts - before;
            let want = if len > PART_SIZE {
                len.div_ceil(PART_SIZE) as u64 + 2
            } else {
                1
            };
            ensure(check, puts == want, || {
                format!("{puts} put requests counted, want {want}")
            })?;
            let got = ok(check, store.get(&obj))?;
            ensure(check, got == data, || {
                format!(
                    "read back {} bytes that differ from the {len} written",
                    got.len()
                )
            })?;
            ok(check, store.delete(&obj))?;
        }
    }

    for n in under.iter().chain([&name("listed"), &empty]) {
        ok("store.cleanup", store.delete(n))?;
    }
    Ok(())
}

/// What a store with versions and Object Lock promises ([`Versioned`](crate::store::Versioned), through
/// [`Store`]), on a versioned bucket with Object Lock enabled, under a fresh
/// `prefix`. Retention set here is GOVERNANCE for one day: the bucket must let
/// the test's credentials bypass it, or be thrown away (an emulator).
///
/// - The bucket reports Object Lock enabled.
/// - `versions` lists every version of a name, newest first, the newest marked
///   latest, with sizes.
/// - A plain delete (through `object_store`, not `Store::delete`) leaves a
///   delete marker that `versions` shows as the latest, and the older versions
///   stay readable with `get_version`.
/// - Writing an old version's bytes back makes it current again (undelete).
/// - A retention set on a put reads back (mode and date, to the second), and a
///   later date can be set with `extend_retention`.
/// - A multipart upload started with a retention (`put_retained_parts`) shows
///   no object until it completes, then the parts' bytes in order, locked; a
///   part sent again under its number replaces the bytes sent before; an
///   aborted one leaves nothing.
pub fn versioned(store: &Store, plain_delete: impl Fn(&str), prefix: &str) -> Outcome {
    let Some(v) = store.versioned() else {
        return Err(fail("versioned.present", "the store has no versioned side"));
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail("versioned.runtime", e.to_string()))?;
    let lock = rt
        .block_on(v.lock_enabled())
        .map_err(|e| fail("versioned.lock_enabled", e.to_string()))?;
    ensure("versioned.lock_enabled", lock, || {
        "the bucket does not report Object Lock".into()
    })?;

    let name = format!("{prefix}/doc");
    let (one, two) = (pattern(300, 1), pattern(200, 2));
    ok("versioned.put", store.put(&name, one.clone()))?;
    ok("versioned.put", store.put(&name, two.clone()))?;
    let vs: Vec<_> = ok("versioned.versions", store.versions(&name))?
        .into_iter()
        .filter(|x| x.name == name)
        .collect();
    ensure("versioned.versions", vs.len() == 2, || {
        format!("two puts give {} versions: {vs:?}", vs.len())
    })?;
    ensure(
        "versioned.newest_first",
        vs[0].latest && !vs[1].latest && vs[0].size == 200 && vs[1].size == 300,
        || format!("versions are not newest first: {vs:?}"),
    )?;
    ensure(
        "versioned.newest_first",
        vs[0].modified >= vs[1].modified,
        || format!("the first version is older than the second: {vs:?}"),
    )?;

    // A plain delete hides the object behind a marker.
    plain_delete(&name);
    match store.get(&name) {
        Err(Error::Missing { .. }) => {}
        other => return Err(fail("versioned.delete_marker", format!("get: {other:?}"))),
    }
    let vs: Vec<_> = ok("versioned.delete_marker", store.versions(&name))?
        .into_iter()
        .filter(|x| x.name == name)
        .collect();
    ensure(
        "versioned.delete_marker",
        vs.len() == 3 && vs[0].delete_marker && vs[0].latest,
        || format!("no delete marker on top: {vs:?}"),
    )?;
    let oldest = &vs[2];
    let got = ok(
        "versioned.get_version",
        store.get_version(&name, &oldest.version),
    )?;
    ensure("versioned.get_version", got == one, || {
        "the oldest version's bytes differ".into()
    })?;

    // Put an old version back.
    ok("versioned.put_back", store.put(&name, got))?;
    let current = ok("versioned.put_back", store.get(&name))?;
    ensure("versioned.put_back", current == one, || {
        "the put-back version is not current".into()
    })?;

    // Retention set and read back.
    let locked = format!("{prefix}/locked");
    let until = Utc::now() + chrono::Duration::days(1);
    let until = until - chrono::Duration::nanoseconds(i64::from(until.timestamp_subsec_nanos()));
    let want = Retention {
        mode: LockMode::Governance,
        until,
    };
    rt.block_on(v.put_retained(&locked, pattern(10, 3), want, None))
        .map_err(|e| fail("versioned.retention", e.to_string()))?;
    let got = ok("versioned.retention", store.retention(&locked))?;
    ensure("versioned.retention", got == Some(want), || {
        format!("set {want:?}, read back {got:?}")
    })?;
    let later = Retention {
        until: until + chrono::Duration::days(1),
        ..want
    };
    ok("versioned.extend", store.extend_retention(&locked, later))?;
    let got = ok("versioned.extend", store.retention(&locked))?;
    ensure("versioned.extend", got == Some(later), || {
        format!("extended to {later:?}, read back {got:?}")
    })?;
    // A retention set on a multipart upload: the object appears whole, and
    // locked, only once the upload completes.
    let parted = format!("{prefix}/parted");
    let (first, last) = (pattern(5 << 20, 4), pattern(1000, 5));
    let parts = rt.block_on(async {
        let upload = v.put_retained_parts(&parted, want, None).await?;
        // The last part goes first, and then again with other bytes: a part
        // sent again under its number replaces the first try's bytes.
        upload.put_part(1, pattern(1000, 9).into()).await?;
        let (a, b) = futures::join!(
            upload.put_part(0, first.clone().into()),
            upload.put_part(1, last.clone().into())
        );
        Ok::<_, object_store::Error>((upload, vec![a?, b?]))
    });
    let (upload, ids) = ok(
        "versioned.retained_parts",
        parts.map_err(|e| Error::InvalidInput(e.to_string())),
    )?;
    ensure(
        "versioned.retained_parts",
        !ok("versioned.retained_parts", store.exists(&parted))?,
        || "the object is visible before its upload completes".into(),
    )?;
    let sent = rt.block_on(upload.complete(ids));
    ok(
        "versioned.retained_parts",
        sent.map_err(|e| Error::InvalidInput(e.to_string())),
    )?;
    let got = ok("versioned.retained_parts", store.get(&parted))?;
    ensure(
        "versioned.retained_parts",
        got.len() == first.len() + last.len()
            && got[..first.len()] == first[..]
            && got[first.len()..] == last[..],
        || {
            format!(
                "{} bytes read back, {} sent, or in another order",
                got.len(),
                first.len() + last.len()
            )
        },
    )?;
    let kept = ok("versioned.retained_parts", store.retention(&parted))?;
    ensure("versioned.retained_parts", kept == Some(want), || {
        format!("uploaded with {want:?}, read back {kept:?}")
    })?;
    // An aborted upload leaves nothing.
    let dropped = format!("{prefix}/dropped");
    let aborted = rt.block_on(async {
        let upload = v.put_retained_parts(&dropped, want, None).await?;
        upload.put_part(0, pattern(1000, 6).into()).await?;
        upload.abort().await
    });
    ok(
        "versioned.retained_parts_abort",
        aborted.map_err(|e| Error::InvalidInput(e.to_string())),
    )?;
    ensure(
        "versioned.retained_parts_abort",
        !ok("versioned.retained_parts_abort", store.exists(&dropped))?,
        || "an aborted upload left an object".into(),
    )?;

    // A locked version cannot be removed for good.
    match store.delete(&locked) {
        Err(Error::Locked { .. }) => {}
        other => {
            return Err(fail(
                "versioned.locked_delete",
                format!("deleting a version under retention: {other:?}"),
            ));
        }
    }
    Ok(())
}

/// What every [`BlockSource`] promises, given the bytes it should hold
/// (`expected`, the whole disk):
///
/// - `size` is the disk's length.
/// - `read_exact_at` returns the disk's bytes at any offset and length inside it,
///   odd ones included; a read that crosses the end (or starts past it) is an
///   error, never a short or zero-filled buffer.
/// - `read_many` fills every buffer exactly as single reads would.
/// - `data_ranges` are sorted, non-overlapping, non-empty, inside the size, and
///   cover every non-zero byte.
/// - `change_map`, when it has one, has sorted, non-overlapping, non-empty ranges
///   inside the size and names its tracker; `tracking`, when set, is not empty.
pub fn block_source(source: &dyn BlockSource, expected: &[u8]) -> Outcome {
    let size = ok("source.size", source.size())?;
    ensure("source.size", size == expected.len() as u64, || {
        format!("size {size}, the disk has {}", expected.len())
    })?;
    let len = expected.len();
    let mut spots = vec![
        (0, 1),
        (1, 1),
        (3, 4093),
        (4095, 2),
        (len - 1, 1),
        (len - 513, 513),
    ];
    spots.push((len / 2 + 7, 65_541.min(len / 2 - 7)));
    spots.push((0, len));
    for &(off, n) in &spots {
        let mut buf = vec![0xA5; n];
        ok("source.read", source.read_exact_at(&mut buf, off as u64))?;
        ensure("source.read", buf[..] == expected[off..off + n], || {
            format!("{n} bytes at {off} differ from the disk")
        })?;
    }
    for (off, n) in [(len - 10, 20), (len, 1), (len + 4096, 512)] {
        let mut buf = vec![0; n];
        if source.read_exact_at(&mut buf, off as u64).is_ok() {
            return Err(fail(
                "source.read_past_end",
                format!("a read of {n} bytes at {off} of a {len}-byte disk succeeded"),
            ));
        }
    }

    // read_many equals single reads.
    let mut bufs: Vec<Vec<u8>> = spots.iter().map(|&(_, n)| vec![0x5A; n]).collect();
    let mut reqs: Vec<(u64, &mut [u8])> = spots
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&(off, _), b)| (off as u64, b.as_mut_slice()))
        .collect();
    ok("source.read_many", source.read_many(&mut reqs))?;
    for (&(off, n), b) in spots.iter().zip(&bufs) {
        ensure("source.read_many", b[..] == expected[off..off + n], || {
            format!("read_many: {n} bytes at {off} differ from the disk")
        })?;
    }

    // Data ranges.
    let ranges = ok("source.data_ranges", source.data_ranges())?;
    check_ranges("source.data_ranges", &ranges, size)?;
    let mut pos = 0usize;
    for &(start, end) in &ranges {
        let hole = &expected[pos..start as usize];
        if let Some(i) = hole.iter().position(|&b| b != 0) {
            return Err(fail(
                "source.data_ranges",
                format!("byte {} is not zero but lies in no data range", pos + i),
            ));
        }
        pos = end as usize;
    }
    if let Some(i) = expected[pos..].iter().position(|&b| b != 0) {
        return Err(fail(
            "source.data_ranges",
            format!(
                "byte {} is not zero but lies after every data range",
                pos + i
            ),
        ));
    }

    // Change map.
    if let Some(map) = ok("source.change_map", source.change_map())? {
        ensure("source.change_map", !map.tracker.is_empty(), || {
            "a change map names no tracker".into()
        })?;
        check_ranges("source.change_map", &map.ranges, size)?;
    }
    if let Some(t) = source.tracking() {
        ensure("source.tracking", !t.is_empty(), || {
            "an empty tracker".into()
        })?;
    }
    Ok(())
}

fn check_ranges(check: &'static str, ranges: &[(u64, u64)], size: u64) -> Outcome {
    let mut prev = 0;
    for &(start, end) in ranges {
        ensure(check, start >= prev && start < end && end <= size, || {
            format!("ranges not sorted, empty, overlapping or past the size {size}: {ranges:?}")
        })?;
        prev = end;
    }
    Ok(())
}

/// The `BlockSink` promises a restore relies on, on a new sink of `size`
/// bytes (`size` at least 64 KiB); `read_back` gives the finished disk's
/// bytes (the renamed file, the completed snapshot):
/// - it holds at least `size` bytes, and a new sink is `fresh`;
/// - writes at odd offsets, up to the last byte, land where they were asked;
/// - `zero` makes a range read as zeros (a restore zeroes only ranges it does
///   not write; on a fresh sink they read as zeros already);
/// - a write past the end is an error, never a silent truncation;
/// - `flush` and `finish` succeed, and after `finish` the disk reads exactly
///   as written, zeros wherever nothing was written.
pub fn block_sink(sink: &dyn BlockSink, size: u64, read_back: &dyn Fn() -> Vec<u8>) -> Outcome {
    ensure("sink.size", sink.size() >= size, || {
        format!("it holds {} bytes, the disk has {size}", sink.size())
    })?;
    ensure("sink.fresh", sink.fresh() && !sink.resumed(), || {
        "a new sink is not fresh".into()
    })?;
    let len = size as usize;
    let mut model = vec![0u8; len];
    let pattern = |n: usize, seed: u8| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    };
    for (i, &(off, n)) in [
        (1usize, 4093usize),
        (4096, 65_536),
        (len - 1, 1),
        (len / 2 + 3, 777),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(n, i as u8);
        ok("sink.write", sink.write_at(&data, off as u64))?;
        model[off..off + n].copy_from_slice(&data);
    }
    ok("sink.zero", sink.zero(200_000, 5000))?;
    model[200_000..205_000].fill(0);
    ensure(
        "sink.write_past_end",
        sink.write_at(&[1, 2, 3], size - 1).is_err() || sink.size() > size,
        || "a write past the end succeeded".into(),
    )?;
    ok("sink.flush", sink.flush())?;
    ok("sink.finish", sink.finish())?;
    let got = read_back();
    ensure("sink.read_back", got.len() as u64 >= size, || {
        format!("the finished disk has {} bytes, wanted {size}", got.len())
    })?;
    match got[..len].iter().zip(&model).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(at) => Err(fail(
            "sink.read_back",
            format!(
                "byte {at} reads {}, it was written as {}",
                got[at], model[at]
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{FileSource, MemSource};
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    #[test]
    fn the_memory_store_conforms() {
        store(&Store::memory(), "conformance", true).unwrap();
    }

    #[test]
    fn a_directory_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let s = Store::new(Arc::new(fs), dir.path().display().to_string());
        store(&s, "conformance", true).unwrap();
    }

    /// A disk with data, zeros written as data, and holes.
    fn disk() -> Vec<u8> {
        let mut d = vec![0u8; 3 << 20];
        d[..70_000].copy_from_slice(&pattern(70_000, 1));
        d[(2 << 20) + 5..(2 << 20) + 100_005].copy_from_slice(&pattern(100_000, 2));
        let n = d.len();
        d[n - 3..].copy_from_slice(b"end");
        d
    }

    #[test]
    fn the_memory_source_conforms() {
        let d = disk();
        block_source(&MemSource(d.clone()), &d).unwrap();
    }

    #[test]
    fn a_sparse_file_source_conforms() {
        let d = disk();
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(d.len() as u64).unwrap();
        // Write only the non-zero regions: the rest stays holes.
        for (start, end) in [(0, 70_000), ((2 << 20) + 5, (2 << 20) + 100_005)] {
            f.as_file()
                .write_all_at(&d[start..end], start as u64)
                .unwrap();
        }
        f.as_file()
            .write_all_at(b"end", d.len() as u64 - 3)
            .unwrap();
        let s = FileSource::open(f.path()).unwrap();
        block_source(&s, &d).unwrap();
    }

    /// A source whose data ranges forget everything after the first.
    struct ForgetsRanges(MemSource);

    impl BlockSource for ForgetsRanges {
        fn size(&self) -> crate::Result<u64> {
            self.0.size()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            self.0.read_exact_at(buf, offset)
        }
        fn data_ranges(&self) -> crate::Result<Vec<(u64, u64)>> {
            Ok(vec![(0, 70_000)])
        }
    }

    /// A source that zero-fills reads past its end.
    struct PadsPastEnd(MemSource);

    impl BlockSource for PadsPastEnd {
        fn size(&self) -> crate::Result<u64> {
            self.0.size()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            buf.fill(0);
            let len = self.0.0.len() as u64;
            let end = (offset + buf.len() as u64).min(len);
            if offset < end {
                let n = (end - offset) as usize;
                self.0.read_exact_at(&mut buf[..n], offset)?;
            }
            Ok(())
        }
    }

    #[test]
    fn the_source_suite_catches_broken_sources() {
        let d = disk();
        let e = block_source(&ForgetsRanges(MemSource(d.clone())), &d).unwrap_err();
        assert_eq!(e.check, "source.data_ranges", "{e}");
        let e = block_source(&PadsPastEnd(MemSource(d.clone())), &d).unwrap_err();
        assert_eq!(e.check, "source.read_past_end", "{e}");
    }

    /// An object store whose ranged gets ignore the start of the range.
    #[derive(Debug)]
    struct IgnoresOffset(object_store::memory::InMemory);

    impl fmt::Display for IgnoresOffset {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "IgnoresOffset")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for IgnoresOffset {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.0.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.0.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            mut options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            if let Some(object_store::GetRange::Bounded(r)) = &options.range {
                options.range = Some(object_store::GetRange::Bounded(0..r.end - r.start));
            }
            self.0.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.0.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.0.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.0.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.0.copy_opts(from, to, options).await
        }
    }

    #[test]
    fn the_store_suite_catches_a_ranged_get_that_ignores_the_offset() {
        let broken = Store::new(
            Arc::new(IgnoresOffset(object_store::memory::InMemory::new())),
            "broken:",
        );
        let e = store(&broken, "conformance", false).unwrap_err();
        assert_eq!(e.check, "store.ranged_get", "{e}");
    }

    #[test]
    fn the_memory_sink_conforms() {
        let size = 1 << 20;
        let sink = crate::sink::MemSink::new(size);
        block_sink(&sink, size, &|| sink.bytes()).unwrap();
        assert!(sink.finished());
    }

    #[test]
    fn a_file_sink_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let size = (1 << 20) + 4095;
        let sink = crate::sink::FileSink::open(&path, size, false, false).unwrap();
        block_sink(&sink, size, &|| std::fs::read(&path).unwrap()).unwrap();
    }

    /// A sink that loses writes at odd offsets: the suite must say so.
    struct Lossy(crate::sink::MemSink);

    impl BlockSink for Lossy {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn fresh(&self) -> bool {
            true
        }
        fn resumed(&self) -> bool {
            false
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> crate::Result<()> {
            if offset % 2 == 1 {
                return Ok(());
            }
            self.0.write_at(buf, offset)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn zero(&self, offset: u64, len: u64) -> crate::Result<()> {
            self.0.zero(offset, len)
        }
        fn flush(&self) -> crate::Result<()> {
            Ok(())
        }
        fn finish(&self) -> crate::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_sink_suite_catches_a_sink_that_loses_writes() {
        let size = 1 << 20;
        let sink = Lossy(crate::sink::MemSink::new(size));
        let e = block_sink(&sink, size, &|| sink.0.bytes()).unwrap_err();
        // Its lost past-the-end write is caught first; either check names it.
        assert!(
            matches!(e.check, "sink.read_back" | "sink.write_past_end"),
            "{e}"
        );
    }
}
