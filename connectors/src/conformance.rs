//! The conformance suite of the NBD [`Export`] seam: what every export promises
//! the server, written once and run by each implementation's tests
//! ([`PointExport`](crate::nbd::point_export::PointExport) read-only and with an
//! overlay here). Public behind the `conformance` feature; failures are
//! `ferry_agent::conformance::Failure`, naming the broken check.

use ferry_agent::conformance::Failure;

use crate::nbd::server::Export;

type Outcome = Result<(), Failure>;

fn fail(check: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        check,
        detail: detail.into(),
    }
}

fn ensure(check: &'static str, cond: bool, detail: impl FnOnce() -> String) -> Outcome {
    if cond {
        Ok(())
    } else {
        Err(fail(check, detail()))
    }
}

fn read(export: &dyn Export, offset: usize, len: usize) -> Result<Vec<u8>, Failure> {
    let mut buf = vec![0xA5; len];
    export
        .read_at(&mut buf, offset as u64)
        .map_err(|e| fail("export.read", format!("{len} bytes at {offset}: {e}")))?;
    Ok(buf)
}

/// What every [`Export`] promises, given the bytes it holds (`expected`, at
/// least 64 KiB). The server checks bounds before it calls the export, so the
/// suite asks only for reads and writes inside the export.
///
/// - `size` is the disk's length; `read_at` returns its bytes at any offset and
///   length, odd and unaligned ones included.
/// - `allocation(offset, len)` returns runs that are not empty, cover at least
///   one byte and at most `len`, and never call a run with a non-zero byte a hole.
/// - Read-only (`writable` false): `write_at` is refused and changes nothing;
///   `flush` succeeds.
/// - Writable: a write (unaligned, across 4 KiB blocks) reads back exactly and
///   leaves its neighbours alone; zeros written the way the server trims and
///   writes zeroes (`write_at` of a zero buffer) read back as zeros; `flush`
///   succeeds; and `allocation` never calls a written non-zero byte a hole.
///   The suite writes near the start of the export and puts nothing back.
pub fn export(export: &dyn Export, expected: &[u8]) -> Outcome {
    let len = expected.len();
    ensure("export.size", export.size() == len as u64, || {
        format!("size {}, the disk has {len}", export.size())
    })?;
    for (off, n) in [
        (0, 1),
        (1, 4097),
        (4095, 2),
        (len - 1, 1),
        (len / 2 + 3, 9000),
        (0, len),
    ] {
        let got = read(export, off, n)?;
        ensure("export.read", got[..] == expected[off..off + n], || {
            format!("{n} bytes at {off} differ from the disk")
        })?;
    }
    allocation_honest(export, expected)?;

    if !export.writable() {
        ensure(
            "export.read_only",
            export.write_at(b"nope", 10).is_err(),
            || "a read-only export accepted a write".into(),
        )?;
        let got = read(export, 0, 64)?;
        ensure("export.read_only", got[..] == expected[..64], || {
            "a refused write changed the export".into()
        })?;
        return export
            .flush()
            .map_err(|e| fail("export.flush", format!("{e}")));
    }

    let mut disk = expected.to_vec();
    let data: Vec<u8> = (0..9000u32).map(|i| (i % 253) as u8 + 1).collect();
    let at = 4090;
    export
        .write_at(&data, at as u64)
        .map_err(|e| fail("export.write", format!("9000 bytes at {at}: {e}")))?;
    disk[at..at + data.len()].copy_from_slice(&data);
    let got = read(export, 0, 16384)?;
    ensure("export.write", got[..] == disk[..16384], || {
        "a write does not read back, or changed its neighbours".into()
    })?;
    let zeros = vec![0u8; 5000];
    export
        .write_at(&zeros, 6000)
        .map_err(|e| fail("export.trim", format!("zeros at 6000: {e}")))?;
    disk[6000..11000].fill(0);
    let got = read(export, 0, 16384)?;
    ensure("export.trim", got[..] == disk[..16384], || {
        "zeroed bytes do not read back as zeros".into()
    })?;
    export
        .flush()
        .map_err(|e| fail("export.flush", format!("{e}")))?;
    allocation_honest(export, &disk)
}

/// Block status never calls a non-zero byte a hole, and its runs are well formed.
fn allocation_honest(export: &dyn Export, disk: &[u8]) -> Outcome {
    let len = disk.len() as u64;
    for (off, n) in [(0, len), (1, 8191), (len / 2, len / 2), (len - 1, 1)] {
        let runs = export
            .allocation(off, n)
            .map_err(|e| fail("export.allocation", format!("{n} bytes at {off}: {e}")))?;
        let total: u64 = runs.iter().map(|r| r.0).sum();
        ensure(
            "export.allocation",
            !runs.is_empty() && runs.iter().all(|r| r.0 > 0) && total >= 1 && total <= n,
            || format!("allocation({off}, {n}) gave malformed runs {runs:?}"),
        )?;
        let mut pos = off;
        for (rlen, data) in runs {
            let span = &disk[pos as usize..(pos + rlen) as usize];
            if let Some(i) = span.iter().position(|&b| b != 0).filter(|_| !data) {
                return Err(fail(
                    "export.allocation",
                    format!(
                        "byte {} is not zero but is reported as a hole",
                        pos + i as u64
                    ),
                ));
            }
            pos += rlen;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::point_export::PointExport;
    use crate::nbd::server::ExportError;
    use ferry_agent::Repository;
    use ferry_agent::Store;
    use ferry_agent::backup::{BackupOptions, DiskSpec, backup_sources};
    use ferry_agent::crypto::KdfParams;
    use ferry_agent::instant::DiskReader;
    use ferry_agent::progress::Progress;
    use ferry_agent::repo::InitOptions;
    use ferry_agent::source::MemSource;

    /// A disk with data and long zero runs (holes in the point).
    fn disk() -> Vec<u8> {
        let mut d = vec![0u8; 8 << 20];
        for (i, b) in d[..300_000].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let n = d.len();
        d[n - 5000..].fill(7);
        d
    }

    fn reader(d: &[u8]) -> DiskReader {
        let kdf = KdfParams {
            memory_kib: 64,
            iterations: 1,
            ..KdfParams::default()
        };
        let repo = Repository::init(
            Store::memory(),
            b"pw",
            InitOptions {
                kdf,
                ..InitOptions::default()
            },
        )
        .unwrap();
        let opts = BackupOptions {
            source: "vm".into(),
            disks: vec![DiskSpec::from_path("/dev/vda")],
            consistency: None,
            time: None,
            group: None,
        };
        let s = backup_sources(
            &repo,
            &opts,
            &[&MemSource(d.to_vec())],
            &Progress::default(),
        )
        .unwrap();
        let point = repo.load_point(&s.point).unwrap();
        DiskReader::open(repo, &point, 0, 16 << 20).unwrap()
    }

    #[test]
    fn a_read_only_point_export_conforms() {
        let d = disk();
        export(&PointExport::read_only(reader(&d)), &d).unwrap();
    }

    #[test]
    fn a_point_export_with_an_overlay_conforms() {
        let d = disk();
        let dir = tempfile::tempdir().unwrap();
        let e = PointExport::with_overlay(reader(&d), &dir.path().join("overlay")).unwrap();
        export(&e, &d).unwrap();
    }

    /// The NBD client and server together: a point served by `server::serve`
    /// and read back by `NbdSource` is a conforming `BlockSource`.
    #[test]
    fn an_nbd_source_on_a_served_point_conforms() {
        use crate::nbd::server::{Listener, ServeOptions, Server};
        use crate::nbd::{NbdSource, NbdUrl};
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;

        let d = disk();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let listener = Listener::Unix(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let export = Arc::new(PointExport::read_only(reader(&d)));
        let server = Server::new(export, "vda".into(), ServeOptions::default());
        // The server thread ends with the test process.
        std::thread::spawn(move || {
            let stop = AtomicBool::new(false);
            server.serve(listener, &stop)
        });
        let url = NbdUrl::parse(&format!("nbd+unix:///vda?socket={}", sock.display())).unwrap();
        let source = NbdSource::open(&url).unwrap();
        ferry_agent::conformance::block_source(&source, &d).unwrap();
    }

    /// An export that calls everything a hole.
    struct AllHoles(PointExport);

    impl Export for AllHoles {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn writable(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
            self.0.read_at(buf, offset)
        }
        fn allocation(&self, _offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
            Ok(vec![(len, false)])
        }
    }

    /// A writable export that drops writes.
    struct DropsWrites(PointExport);

    impl Export for DropsWrites {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn writable(&self) -> bool {
            true
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), ExportError> {
            Ok(())
        }
        fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
            self.0.allocation(offset, len)
        }
    }

    #[test]
    fn the_export_suite_catches_broken_exports() {
        let d = disk();
        let e = export(&AllHoles(PointExport::read_only(reader(&d))), &d).unwrap_err();
        assert_eq!(e.check, "export.allocation", "{e}");
        let e = export(&DropsWrites(PointExport::read_only(reader(&d))), &d).unwrap_err();
        assert_eq!(e.check, "export.write", "{e}");
    }
}
