//! The agentless AWS source: an EBS snapshot read through the EBS direct
//! APIs as a [`BlockSource`], so that an EC2 machine is protected (and moved
//! to another cloud) with nothing installed in it.
//!
//! - `ListSnapshotBlocks` says which 512 KiB blocks hold data: the rest reads
//!   as zeros and is never fetched ([`BlockSource::data_ranges`]).
//! - With a parent snapshot of the same volume, the blocks that changed
//!   between the two (`ListChangedBlocks`, plus the blocks either snapshot
//!   has alone) are the change map: an incremental reads only those.
//! - `GetSnapshotBlock` fetches up to [`IN_FLIGHT`] blocks at once per read,
//!   each checked against its SHA-256 checksum; a small cache keeps the
//!   blocks a read just fetched for the pieces of the next.
//!
//! The point records `ebs:snapshot:ID` as what tracks it (its
//! [`BlockSource::tracking`]), so the next backup of the same source finds
//! its parent snapshot by itself.

use crate::ebs::{BLOCK, get_block, list_blocks};
use crate::{Aws, AwsConfig, Error, Result};
use ferry_agent::source::{BlockSource, ChangeMap};
use futures::stream::{self, StreamExt, TryStreamExt};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// `GetSnapshotBlock` requests one read keeps in flight.
pub const IN_FLIGHT: usize = 16;
/// Blocks kept after a read (32 MiB).
const CACHE_BLOCKS: usize = 64;

/// What tracks a snapshot, as recorded in a point.
pub fn tracking_of(snapshot: &str) -> String {
    format!("ebs:snapshot:{snapshot}")
}

/// The snapshot a point's tracking names, if it is an EBS snapshot.
pub fn snapshot_of(tracking: &str) -> Option<&str> {
    tracking
        .strip_prefix("ebs:snapshot:")
        .filter(|s| s.starts_with("snap-"))
}

/// A completed EBS snapshot, read block by block.
pub struct EbsSource {
    aws: Aws,
    rt: tokio::runtime::Runtime,
    snapshot: String,
    size: u64,
    /// Block index -> token, for every block that holds data.
    tokens: HashMap<i32, String>,
    changes: Option<ChangeMap>,
    cache: Mutex<Cache>,
    /// When the snapshot was taken (its content's instant).
    pub start_time: Option<chrono::DateTime<chrono::Utc>>,
    /// The volume it was taken of.
    pub volume_id: Option<String>,
}

#[derive(Default)]
struct Cache {
    blocks: HashMap<i32, Arc<Vec<u8>>>,
    order: VecDeque<i32>,
}

impl Cache {
    fn get(&self, i: i32) -> Option<Arc<Vec<u8>>> {
        self.blocks.get(&i).cloned()
    }

    fn put(&mut self, i: i32, b: Arc<Vec<u8>>) {
        if self.blocks.insert(i, b).is_none() {
            self.order.push_back(i);
        }
        while self.order.len() > CACHE_BLOCKS {
            if let Some(old) = self.order.pop_front() {
                self.blocks.remove(&old);
            }
        }
    }
}

impl std::fmt::Debug for EbsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbsSource")
            .field("snapshot", &self.snapshot)
            .field("size", &self.size)
            .field("blocks", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl EbsSource {
    /// Opens `snapshot`, which must be completed: what it is and which
    /// blocks hold data. Blocking: call it outside an async runtime.
    pub fn open(cfg: &AwsConfig, snapshot: &str) -> Result<EbsSource> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start the EBS reader's runtime: {e}")))?;
        let (aws, snap, listed) = rt.block_on(async {
            let aws = Aws::connect(cfg).await?;
            let snap = describe(&aws, snapshot).await?;
            let listed = list_blocks(&aws, snapshot).await?;
            Ok::<_, Error>((aws, snap, listed))
        })?;
        Ok(EbsSource {
            aws,
            rt,
            snapshot: snapshot.to_owned(),
            size: listed.volume_gib.saturating_mul(1 << 30),
            tokens: listed.tokens,
            changes: None,
            cache: Mutex::default(),
            start_time: snap.start_time,
            volume_id: snap.volume_id,
        })
    }

    /// Reads only what changed since `parent`, an earlier snapshot of the
    /// same volume: the change map becomes the blocks that differ.
    pub fn since(&mut self, parent: &str) -> Result<()> {
        let blocks = self.rt.block_on(changed_blocks(
            &self.aws,
            parent,
            &self.snapshot,
            &self.tokens,
        ))?;
        self.changes = Some(ChangeMap {
            tracker: format!("ebs:changed-blocks:{parent}"),
            ranges: ranges_of(&blocks, self.size),
        });
        Ok(())
    }

    pub fn snapshot_id(&self) -> &str {
        &self.snapshot
    }

    /// Blocks that hold data.
    pub fn blocks(&self) -> usize {
        self.tokens.len()
    }

    fn source_error(&self, e: Error) -> ferry_agent::Error {
        ferry_agent::Error::Source {
            path: format!("ebs://{}", self.snapshot).into(),
            source: std::io::Error::other(e),
        }
    }

    /// The blocks `[first, last]`, from the cache or fetched at once.
    fn blocks_for(&self, first: i32, last: i32) -> ferry_agent::Result<HashMap<i32, Arc<Vec<u8>>>> {
        let mut have = HashMap::new();
        let mut want = Vec::new();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for i in first..=last {
                match (cache.get(i), self.tokens.get(&i)) {
                    (Some(b), _) => {
                        have.insert(i, b);
                    }
                    (None, Some(t)) => want.push((i, t.clone())),
                    // Never written: zeros, not fetched.
                    (None, None) => {}
                }
            }
        }
        if want.is_empty() {
            return Ok(have);
        }
        let fetched: Vec<(i32, Vec<u8>)> = self
            .rt
            .block_on(
                stream::iter(want)
                    .map(|(i, t)| async move {
                        get_block(&self.aws, &self.snapshot, i, &t)
                            .await
                            .map(|b| (i, b))
                    })
                    .buffer_unordered(IN_FLIGHT)
                    .try_collect(),
            )
            .map_err(|e| self.source_error(e))?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in fetched {
            let b = Arc::new(b);
            cache.put(i, b.clone());
            have.insert(i, b);
        }
        Ok(have)
    }
}

impl BlockSource for EbsSource {
    fn size(&self) -> ferry_agent::Result<u64> {
        Ok(self.size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> ferry_agent::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(ferry_agent::Error::InvalidInput(format!(
                "ebs://{}: a read to {end} past the end ({})",
                self.snapshot, self.size
            )));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let index = |at: u64| i32::try_from(at / BLOCK).unwrap_or(i32::MAX);
        let (first, last) = (index(offset), index(end - 1));
        let blocks = self.blocks_for(first, last)?;
        for i in first..=last {
            let start = i as u64 * BLOCK;
            let from = offset.max(start);
            let to = end.min(start + BLOCK);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match blocks.get(&i) {
                Some(b) => {
                    let a = (from - start) as usize;
                    let avail = b.len().saturating_sub(a).min(dst.len());
                    dst[..avail].copy_from_slice(&b[a..a + avail]);
                    dst[avail..].fill(0);
                }
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn data_ranges(&self) -> ferry_agent::Result<Vec<(u64, u64)>> {
        Ok(ranges_of(
            &self.tokens.keys().copied().collect::<BTreeSet<i32>>(),
            self.size,
        ))
    }

    fn change_map(&self) -> ferry_agent::Result<Option<ChangeMap>> {
        Ok(self.changes.clone())
    }

    fn tracking(&self) -> Option<String> {
        Some(tracking_of(&self.snapshot))
    }
}

/// Merged byte ranges of blocks, within `size`.
fn ranges_of(blocks: &BTreeSet<i32>, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &i in blocks {
        let Ok(i) = u64::try_from(i) else { continue };
        let (a, b) = (i * BLOCK, ((i + 1) * BLOCK).min(size));
        if a >= b {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => out.push((a, b)),
        }
    }
    out
}

struct Described {
    start_time: Option<chrono::DateTime<chrono::Utc>>,
    volume_id: Option<String>,
}

/// The snapshot must exist and be completed: a pending one is not yet a
/// consistent image.
async fn describe(aws: &Aws, id: &str) -> Result<Described> {
    let out = aws
        .ec2
        .describe_snapshots()
        .snapshot_ids(id)
        .send()
        .await
        .map_err(|e| crate::api_error("DescribeSnapshots", &aws.endpoint, e))?;
    let Some(s) = out.snapshots.unwrap_or_default().into_iter().next() else {
        return Err(Error::Invalid(format!("snapshot {id} does not exist")));
    };
    let state = s.state.as_ref().map(|s| s.as_str().to_owned());
    if state.as_deref() != Some("completed") {
        return Err(Error::State(format!(
            "snapshot {id} is {}, not completed: back it up once it is",
            state.as_deref().unwrap_or("in an unknown state")
        )));
    }
    Ok(Described {
        start_time: s
            .start_time
            .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
        volume_id: s.volume_id,
    })
}

/// The blocks that differ between `parent` and `snapshot`: what
/// `ListChangedBlocks` reports, plus the blocks only one of them holds
/// (AWS lists those too; some stand-ins for it do not, and a block missed
/// here would restore stale).
async fn changed_blocks(
    aws: &Aws,
    parent: &str,
    snapshot: &str,
    tokens: &HashMap<i32, String>,
) -> Result<BTreeSet<i32>> {
    let mut changed = BTreeSet::new();
    let mut next: Option<String> = None;
    loop {
        let page = aws
            .ebs
            .list_changed_blocks()
            .first_snapshot_id(parent)
            .second_snapshot_id(snapshot)
            .set_next_token(next.take())
            .send()
            .await
            .map_err(|e| crate::api_error("ListChangedBlocks", &aws.endpoint, e))?;
        changed.extend(
            page.changed_blocks
                .unwrap_or_default()
                .into_iter()
                .filter_map(|b| b.block_index),
        );
        match page.next_token {
            Some(t) if !t.is_empty() => next = Some(t),
            _ => break,
        }
    }
    let before = list_blocks(aws, parent).await?;
    for i in tokens.keys() {
        if !before.tokens.contains_key(i) {
            changed.insert(*i);
        }
    }
    for i in before.tokens.keys() {
        if !tokens.contains_key(i) {
            changed.insert(*i);
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_clip() {
        let b: BTreeSet<i32> = [0, 1, 3, 9].into();
        assert_eq!(
            ranges_of(&b, 9 * BLOCK + 100),
            vec![
                (0, 2 * BLOCK),
                (3 * BLOCK, 4 * BLOCK),
                (9 * BLOCK, 9 * BLOCK + 100)
            ]
        );
        assert_eq!(snapshot_of(&tracking_of("snap-1")), Some("snap-1"));
        assert_eq!(snapshot_of("qemu:dirty-bitmap:x"), None);
    }
}
