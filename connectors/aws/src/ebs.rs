//! A recovery point's disk written straight into an EBS snapshot through the
//! EBS direct APIs: `StartSnapshot`, `PutSnapshotBlock` of 512 KiB blocks in
//! parallel with SHA-256 checksums (blocks of zeros are never sent: a new
//! snapshot reads as zeros where nothing was put), then `CompleteSnapshot`.
//!
//! The restore writes chunks of any size at any offset from several threads;
//! [`EbsSink`] stages them in a private sparse file, counts how much of each
//! 512 KiB block is covered, and hands a block to the uploaders as soon as it
//! is whole (the restore writes every data byte and zeroes every other byte
//! exactly once, so coverage is a count). An uploaded block's range is
//! punched out of the staging file, so the local disk used stays near the
//! blocks in flight, whatever the size of the disk.
//!
//! **Resume.** A journal beside the staging file names the snapshot and lists
//! every block put, fsynced as the restore flushes. A killed restore started
//! again with the same idempotency key finds the journal, sees the snapshot
//! still `pending`, and does not put those blocks again (block puts are
//! idempotent anyway). `StartSnapshot` carries a client token derived from the
//! key, so a kill between the call and the journal's first write also ends in
//! the same snapshot. A snapshot is completed only after every block of the
//! disk was accounted for; until then it stays `pending`, which no volume or
//! image can be made from, so a half-written snapshot never looks complete.

use crate::{Aws, Error, Result, TAG_KEY, TAG_RUN, api_error, client_token};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAlgorithm, Tag};
use base64::Engine as _;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The EBS direct block size.
pub const BLOCK: u64 = 512 * 1024;
const GIB: u64 = 1 << 30;
/// Uploads in flight at once.
const UPLOADERS: usize = 16;
const JOURNAL: &str = "ebs.journal";
const STAGING: &str = "ebs.staging";

/// What [`EbsSink::open`] found.
#[derive(Debug)]
pub enum Opened {
    /// An earlier try under the same key completed this snapshot: there is
    /// nothing to write.
    Complete(String),
    /// A snapshot to write (new, or resumed from the journal).
    Writer(EbsSink),
}

/// What a finished restore into EBS did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub snapshot_id: String,
    /// Blocks put by this try.
    pub blocks_put: u64,
    /// Blocks an earlier, interrupted try had put (from the journal).
    pub blocks_resumed: u64,
    /// Blocks of zeros never sent.
    pub blocks_zero: u64,
    /// `PutSnapshotBlock` requests, including retries.
    pub requests: u64,
}

/// A disk being restored into a new EBS snapshot.
pub struct EbsSink {
    inner: Arc<Inner>,
    tx: Mutex<Option<tokio::sync::mpsc::Sender<u64>>>,
    workers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    rt: tokio::runtime::Handle,
    /// Bytes of each block not complete yet that some write covered.
    partial: Mutex<HashMap<u64, u64>>,
}

impl std::fmt::Debug for EbsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbsSink")
            .field("snapshot_id", &self.inner.snapshot_id)
            .field("size", &self.inner.size)
            .finish()
    }
}

struct Inner {
    aws: Aws,
    snapshot_id: String,
    size: u64,
    staging: File,
    staging_path: PathBuf,
    journal: Mutex<Journal>,
    failed: Mutex<Option<String>>,
    put: AtomicU64,
    zero: AtomicU64,
    requests: AtomicU64,
}

/// `ebs.journal`: a header line naming the snapshot and the disk's size, then
/// `put N` for every block put and `complete` once the snapshot is complete.
/// A torn last line (a kill mid-write) is ignored.
struct Journal {
    file: File,
    path: PathBuf,
    done: BTreeSet<u64>,
    resumed: u64,
}

struct Recorded {
    snapshot_id: String,
    size: u64,
    done: BTreeSet<u64>,
    /// `CompleteSnapshot` was called (every block accounted for).
    completing: bool,
    complete: bool,
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn read_journal(path: &Path) -> Result<Option<Recorded>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("cannot read the restore journal", path)(e)),
    };
    // A journal holds one short line per block: bound what is read by the
    // largest EBS volume (64 TiB of 512 KiB blocks).
    let mut lines = std::io::BufReader::new(file).lines();
    let Some(Ok(header)) = lines.next() else {
        return Ok(None);
    };
    let mut parts = header.split(' ');
    let (Some("ferry-ebs-journal"), Some("1"), Some(id), Some(size)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::State(format!(
            "{} is not a Ferry restore journal; remove it to start the restore over",
            path.display()
        )));
    };
    let Ok(size) = size.parse::<u64>() else {
        return Ok(None);
    };
    let mut rec = Recorded {
        snapshot_id: id.to_owned(),
        size,
        done: BTreeSet::new(),
        completing: false,
        complete: false,
    };
    let blocks = size.div_ceil(BLOCK);
    for line in lines {
        let Ok(line) = line else { break };
        match line.split_once(' ') {
            Some(("put", n)) => match n.parse::<u64>() {
                Ok(n) if n < blocks => {
                    rec.done.insert(n);
                }
                _ => break,
            },
            None if line == "completing" => rec.completing = true,
            None if line == "complete" => rec.complete = true,
            _ => break,
        }
    }
    Ok(Some(rec))
}

fn private_file(path: &Path, truncate: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .append(!truncate)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

impl EbsSink {
    /// Opens the snapshot that restore `key` writes a disk of `size` bytes
    /// into, staging in `dir` (private to this user; it holds decrypted
    /// data while blocks are in flight). Resumes what the journal in `dir`
    /// records, or starts a new snapshot tagged with the run and the key.
    pub async fn open(
        aws: &Aws,
        key: &str,
        size: u64,
        description: &str,
        dir: &Path,
    ) -> Result<Opened> {
        if size == 0 {
            return Err(Error::Invalid(
                "an empty disk cannot become an EBS snapshot".into(),
            ));
        }
        let journal_path = dir.join(JOURNAL);
        let mut resumed = BTreeSet::new();
        let mut snapshot_id = None;
        if let Some(rec) = read_journal(&journal_path)? {
            // The journal, not EC2's view of the snapshot, says how far an
            // earlier try got: only this writer completes the snapshot, and
            // only after every block was accounted for.
            let state = snapshot_state(aws, &rec.snapshot_id).await?;
            match state.as_deref() {
                Some("pending" | "completed") if rec.size == size && rec.complete => {
                    return Ok(Opened::Complete(rec.snapshot_id));
                }
                Some("pending" | "completed") if rec.size == size && rec.completing => {
                    // Killed between CompleteSnapshot and its record: every
                    // block was put; completing again is harmless.
                    complete_snapshot(aws, &rec.snapshot_id, rec.done.len()).await?;
                    let mut f = private_file(&journal_path, false)
                        .map_err(io("cannot write the restore journal", &journal_path))?;
                    f.write_all(b"complete\n")
                        .and_then(|()| f.sync_data())
                        .map_err(io("cannot write the restore journal", &journal_path))?;
                    return Ok(Opened::Complete(rec.snapshot_id));
                }
                Some("pending" | "completed") if rec.size == size => {
                    tracing::info!(
                        snapshot = %rec.snapshot_id,
                        blocks = rec.done.len(),
                        "resuming the restore into an EBS snapshot that was never completed"
                    );
                    resumed = rec.done;
                    snapshot_id = Some(rec.snapshot_id);
                }
                other => {
                    tracing::warn!(
                        snapshot = %rec.snapshot_id,
                        state = ?other,
                        "the journal's snapshot cannot be resumed; starting a new one"
                    );
                }
            }
        }
        let fresh = snapshot_id.is_none();
        let snapshot_id = match snapshot_id {
            Some(id) => id,
            None => start_snapshot(aws, key, size, description).await?,
        };
        let journal_file = private_file(&journal_path, fresh)
            .map_err(io("cannot write the restore journal", &journal_path))?;
        let mut journal = Journal {
            file: journal_file,
            path: journal_path,
            resumed: resumed.len() as u64,
            done: resumed,
        };
        if fresh {
            let header = format!("ferry-ebs-journal 1 {snapshot_id} {size}\n");
            journal
                .file
                .write_all(header.as_bytes())
                .and_then(|()| journal.file.sync_data())
                .map_err(io("cannot write the restore journal", &journal.path))?;
        }
        let staging_path = dir.join(STAGING);
        let staging = private_file(&staging_path, true)
            .map_err(io("cannot create the staging file", &staging_path))?;
        staging
            .set_len(size)
            .map_err(io("cannot size the staging file", &staging_path))?;
        let inner = Arc::new(Inner {
            aws: aws.clone(),
            snapshot_id,
            size,
            staging,
            staging_path,
            journal: Mutex::new(journal),
            failed: Mutex::new(None),
            put: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let (tx, rx) = tokio::sync::mpsc::channel::<u64>(UPLOADERS * 2);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let workers = (0..UPLOADERS)
            .map(|_| {
                let inner = inner.clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    loop {
                        let Some(block) = rx.lock().await.recv().await else {
                            break;
                        };
                        if let Err(e) = inner.upload(block).await {
                            let mut f = inner.failed.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert_with(|| e.to_string());
                        }
                    }
                })
            })
            .collect();
        Ok(Opened::Writer(EbsSink {
            inner,
            tx: Mutex::new(Some(tx)),
            workers: Mutex::new(workers),
            rt: tokio::runtime::Handle::current(),
            partial: Mutex::new(HashMap::new()),
        }))
    }

    pub fn snapshot_id(&self) -> &str {
        &self.inner.snapshot_id
    }

    /// What this try did so far.
    pub fn written(&self) -> Written {
        let j = self.inner.journal.lock().unwrap_or_else(|p| p.into_inner());
        Written {
            snapshot_id: self.inner.snapshot_id.clone(),
            blocks_put: self.inner.put.load(Ordering::Relaxed),
            blocks_resumed: j.resumed,
            blocks_zero: self.inner.zero.load(Ordering::Relaxed),
            requests: self.inner.requests.load(Ordering::Relaxed),
        }
    }

    fn sink_error(&self, e: impl std::fmt::Display) -> ferry_agent::Error {
        ferry_agent::Error::Target {
            path: PathBuf::from(format!("ebs://{}", self.inner.snapshot_id)),
            source: std::io::Error::other(e.to_string()),
        }
    }

    fn check_failed(&self) -> ferry_agent::Result<()> {
        let f = self.inner.failed.lock().unwrap_or_else(|p| p.into_inner());
        match &*f {
            Some(e) => Err(self.sink_error(e)),
            None => Ok(()),
        }
    }

    /// Counts `[offset, offset + len)` as covered; sends every block that
    /// became whole to the uploaders.
    fn cover(&self, offset: u64, len: u64) -> ferry_agent::Result<()> {
        let end = (offset + len).min(self.inner.size);
        let mut ready = Vec::new();
        {
            let mut partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
            let mut at = offset;
            while at < end {
                let block = at / BLOCK;
                let block_end = ((block + 1) * BLOCK).min(self.inner.size);
                let upto = end.min(block_end);
                let whole = block_end - block * BLOCK;
                let c = partial.entry(block).or_insert(0);
                *c += upto - at;
                if *c >= whole {
                    partial.remove(&block);
                    ready.push(block);
                }
                at = upto;
            }
        }
        if ready.is_empty() {
            return Ok(());
        }
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| self.sink_error("written to after finish"))?;
        for block in ready {
            tx.blocking_send(block)
                .map_err(|_| self.sink_error("the uploaders stopped"))?;
        }
        self.check_failed()
    }
}

impl Inner {
    /// Puts one whole block from the staging file, unless it is zeros or
    /// an earlier try put it; then frees its space in the staging file.
    async fn upload(&self, block: u64) -> Result<()> {
        let start = block * BLOCK;
        let len = BLOCK.min(self.size - start) as usize;
        let done = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .done
            .contains(&block);
        if !done {
            // EBS blocks are always 512 KiB: the tail of the last one reads
            // as zeros past the disk's end.
            let mut data = vec![0u8; BLOCK as usize];
            self.staging
                .read_exact_at(&mut data[..len], start)
                .map_err(io("cannot read the staging file", &self.staging_path))?;
            if data.iter().all(|&b| b == 0) {
                self.zero.fetch_add(1, Ordering::Relaxed);
            } else {
                self.put_block(block, data).await?;
                let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
                j.done.insert(block);
                let path = j.path.clone();
                j.file
                    .write_all(format!("put {block}\n").as_bytes())
                    .map_err(io("cannot write the restore journal", &path))?;
            }
        }
        // Give the space back: only blocks in flight stay on local disk.
        let _ = rustix::fs::fallocate(
            &self.staging,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            start,
            len as u64,
        );
        Ok(())
    }

    async fn put_block(&self, block: u64, data: Vec<u8>) -> Result<()> {
        let index = i32::try_from(block)
            .map_err(|_| Error::Invalid(format!("block {block} is past what EBS addresses")))?;
        let sum = base64::engine::general_purpose::STANDARD
            .encode(ring::digest::digest(&ring::digest::SHA256, &data).as_ref());
        let mut tries = 0;
        loop {
            tries += 1;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let r = self
                .aws
                .ebs
                .put_snapshot_block()
                .snapshot_id(&self.snapshot_id)
                .block_index(index)
                .data_length(BLOCK as i32)
                .block_data(ByteStream::from(data.clone()))
                .checksum(&sum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .send()
                .await;
            match r {
                Ok(_) => {
                    self.put.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    let e = api_error("PutSnapshotBlock", &self.aws.endpoint, e);
                    if !e.retry() || tries >= 5 {
                        return Err(e);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200 << tries)).await;
                }
            }
        }
    }
}

impl ferry_agent::sink::BlockSink for EbsSink {
    fn size(&self) -> u64 {
        self.inner.size
    }
    /// Not fresh: the restore then zeroes every range it does not write,
    /// which is how [`EbsSink`] knows a block is whole.
    fn fresh(&self) -> bool {
        false
    }
    fn resumed(&self) -> bool {
        false
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> ferry_agent::Result<()> {
        self.inner
            .staging
            .write_all_at(buf, offset)
            .map_err(|source| ferry_agent::Error::Target {
                path: self.inner.staging_path.clone(),
                source,
            })?;
        self.cover(offset, buf.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> ferry_agent::Result<()> {
        self.inner
            .staging
            .read_exact_at(buf, offset)
            .map_err(|source| ferry_agent::Error::Target {
                path: self.inner.staging_path.clone(),
                source,
            })
    }
    fn zero(&self, offset: u64, len: u64) -> ferry_agent::Result<()> {
        // The staging file is sparse and new: its unwritten ranges are zeros.
        self.cover(offset, len)
    }
    fn flush(&self) -> ferry_agent::Result<()> {
        let j = self.inner.journal.lock().unwrap_or_else(|p| p.into_inner());
        j.file
            .sync_data()
            .map_err(|source| ferry_agent::Error::Target {
                path: j.path.clone(),
                source,
            })?;
        drop(j);
        self.check_failed()
    }
    /// Waits for the last uploads, then completes the snapshot, if and only
    /// if every block of the disk was accounted for.
    fn finish(&self) -> ferry_agent::Result<()> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(tx);
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        self.rt.block_on(async {
            for w in workers {
                let _ = w.await;
            }
        });
        self.check_failed()?;
        let left = self.partial.lock().unwrap_or_else(|p| p.into_inner()).len();
        if left > 0 {
            return Err(self.sink_error(format!(
                "{left} blocks were never fully written; the snapshot stays pending"
            )));
        }
        let count = {
            let j = self.inner.journal.lock().unwrap_or_else(|p| p.into_inner());
            j.file
                .sync_data()
                .map_err(|source| ferry_agent::Error::Target {
                    path: j.path.clone(),
                    source,
                })?;
            j.done.len()
        };
        {
            let mut j = self.inner.journal.lock().unwrap_or_else(|p| p.into_inner());
            let path = j.path.clone();
            j.file
                .write_all(b"completing\n")
                .and_then(|()| j.file.sync_data())
                .map_err(|source| ferry_agent::Error::Target { path, source })?;
        }
        let aws = &self.inner.aws;
        self.rt
            .block_on(complete_snapshot(aws, &self.inner.snapshot_id, count))
            .map_err(|e| self.sink_error(e))?;
        let mut j = self.inner.journal.lock().unwrap_or_else(|p| p.into_inner());
        let path = j.path.clone();
        j.file
            .write_all(b"complete\n")
            .and_then(|()| j.file.sync_data())
            .map_err(|source| ferry_agent::Error::Target { path, source })?;
        drop(j);
        let _ = std::fs::remove_file(&self.inner.staging_path);
        Ok(())
    }
}

async fn complete_snapshot(aws: &Aws, id: &str, blocks: usize) -> Result<()> {
    let count = i32::try_from(blocks)
        .map_err(|_| Error::Invalid(format!("{blocks} blocks are more than EBS counts")))?;
    aws.ebs
        .complete_snapshot()
        .snapshot_id(id)
        .changed_blocks_count(count)
        .send()
        .await
        .map_err(|e| api_error("CompleteSnapshot", &aws.endpoint, e))?;
    Ok(())
}

async fn start_snapshot(aws: &Aws, key: &str, size: u64, description: &str) -> Result<String> {
    let gib = i64::try_from(size.div_ceil(GIB))
        .map_err(|_| Error::Invalid(format!("a disk of {size} bytes is too large for EBS")))?;
    let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let out = aws
        .ebs
        .start_snapshot()
        .volume_size(gib)
        .client_token(client_token(key, "snapshot"))
        .description(description)
        .tags(tag(TAG_RUN, crate::run_of(key)))
        .tags(tag(TAG_KEY, key))
        .tags(tag("Name", &crate::display_name(key)))
        .send()
        .await
        .map_err(|e| api_error("StartSnapshot", &aws.endpoint, e))?;
    out.snapshot_id
        .ok_or_else(|| Error::State("StartSnapshot returned no snapshot id".into()))
}

/// A snapshot's state (`pending`, `completed`, `error`), or `None` when
/// there is no such snapshot.
pub async fn snapshot_state(aws: &Aws, id: &str) -> Result<Option<String>> {
    match aws.ec2.describe_snapshots().snapshot_ids(id).send().await {
        Ok(out) => Ok(out
            .snapshots
            .unwrap_or_default()
            .first()
            .and_then(|s| s.state.as_ref())
            .map(|s| s.as_str().to_owned())),
        Err(e) => {
            let e = api_error("DescribeSnapshots", &aws.endpoint, e);
            if e.is_not_found() { Ok(None) } else { Err(e) }
        }
    }
}

/// Waits until snapshot `id` is `completed` (an EBS direct snapshot turns
/// completed some time after `CompleteSnapshot`).
pub async fn wait_completed(aws: &Aws, id: &str, timeout: std::time::Duration) -> Result<()> {
    let until = std::time::Instant::now() + timeout;
    loop {
        match snapshot_state(aws, id).await?.as_deref() {
            Some("completed") => return Ok(()),
            Some("pending") if std::time::Instant::now() < until => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Some("pending") => {
                return Err(Error::State(format!(
                    "snapshot {id} is still pending after {}s",
                    timeout.as_secs()
                )));
            }
            other => {
                return Err(Error::State(format!(
                    "snapshot {id} is {}",
                    other.unwrap_or("gone")
                )));
            }
        }
    }
}

/// A snapshot's blocks that hold data, as `ListSnapshotBlocks` lists them.
pub(crate) struct Listed {
    /// Block index -> token.
    pub tokens: HashMap<i32, String>,
    /// The volume size in GiB.
    pub volume_gib: u64,
}

/// Every block of a snapshot that was put, with its token.
pub(crate) async fn list_blocks(aws: &Aws, id: &str) -> Result<Listed> {
    let mut listed = Listed {
        tokens: HashMap::new(),
        volume_gib: 0,
    };
    let mut next: Option<String> = None;
    loop {
        let page = aws
            .ebs
            .list_snapshot_blocks()
            .snapshot_id(id)
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| api_error("ListSnapshotBlocks", &aws.endpoint, e))?;
        if let Some(g) = page.volume_size.and_then(|g| u64::try_from(g).ok()) {
            listed.volume_gib = g;
        }
        // Blocks are 512 KiB ([`BLOCK`]) by the API's definition; its
        // `BlockSize` is not read (moto reports it in KiB).
        for b in page.blocks.unwrap_or_default() {
            if let (Some(i), Some(t)) = (b.block_index, b.block_token) {
                listed.tokens.insert(i, t);
            }
        }
        match page.next_token {
            Some(t) if !t.is_empty() => next = Some(t),
            _ => break,
        }
    }
    Ok(listed)
}

/// One block, checked against the SHA-256 checksum the service returns.
pub(crate) async fn get_block(aws: &Aws, id: &str, index: i32, token: &str) -> Result<Vec<u8>> {
    let r = aws
        .ebs
        .get_snapshot_block()
        .snapshot_id(id)
        .block_index(index)
        .block_token(token)
        .send()
        .await
        .map_err(|e| api_error("GetSnapshotBlock", &aws.endpoint, e))?;
    let want = r.checksum.clone();
    let data = r
        .block_data
        .collect()
        .await
        .map_err(|e| Error::State(format!("block {index} of {id}: {e}")))?
        .into_bytes()
        .to_vec();
    if let Some(want) = want {
        let got = base64::engine::general_purpose::STANDARD
            .encode(ring::digest::digest(&ring::digest::SHA256, &data).as_ref());
        if got != want {
            return Err(Error::State(format!(
                "block {index} of snapshot {id} does not match its checksum"
            )));
        }
    }
    Ok(data)
}

/// Reads a snapshot back, block by block (`ListSnapshotBlocks`, then
/// `GetSnapshotBlock` for each block that was put), into `out`, which gets
/// the first `size` bytes: blocks never put read as zeros. Each block's
/// SHA-256 checksum is verified.
pub async fn read_snapshot(aws: &Aws, id: &str, size: u64, out: &mut File) -> Result<u64> {
    let listed = list_blocks(aws, id).await?;
    out.set_len(size)
        .map_err(io("cannot size", Path::new("the read-back file")))?;
    let mut read = 0u64;
    let mut indexes: Vec<_> = listed.tokens.into_iter().collect();
    indexes.sort();
    for (index, token) in indexes {
        let start = index as u64 * BLOCK;
        if start >= size {
            continue;
        }
        let data = get_block(aws, id, index, &token).await?;
        let n = (data.len() as u64).min(size - start) as usize;
        out.write_all_at(&data[..n], start)
            .map_err(io("cannot write", Path::new("the read-back file")))?;
        read += n as u64;
    }
    Ok(read)
}

/// Deletes a snapshot; one already gone is success.
pub async fn delete_snapshot(aws: &Aws, id: &str) -> Result<()> {
    match aws.ec2.delete_snapshot().snapshot_id(id).send().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = api_error("DeleteSnapshot", &aws.endpoint, e);
            if e.is_not_found() { Ok(()) } else { Err(e) }
        }
    }
}
