//! The index at terabyte scale: memory and lookup throughput of a synthetic
//! index, kept whole in memory and kept mostly on disk, measured in one run.
//!
//! `cargo bench -p ferry-agent --bench index` builds an index of
//! `FERRY_BENCH_CHUNKS` chunks (16,777,216 by default: a 1 TiB disk of unique
//! data at 64 KiB) in packs of 256 entries, as `index::load` does, once with
//! every chunk in memory and once with the default limit, each in a child
//! process of its own so that peak memory is measured alone. It prints a
//! Markdown table; `bench/index.sh` keeps it in `bench/results/index-latest.md`.

use std::time::Instant;

use ferry_agent::crypto::ChunkId;
use ferry_agent::index::Index;
use ferry_agent::pack::BlobEntry;

const PACK_ENTRIES: u64 = 256;

fn id(n: u64) -> ChunkId {
    ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

/// Kilobytes from a line of /proc/self/status.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A small deterministic generator for lookups (SplitMix64).
struct Mix(u64);
impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Lookups per second over `threads` threads, each looking up `per_thread`
/// ids drawn at random (known ones for hits, others for misses); the ids are
/// hashed before the clock starts.
fn lookups(index: &Index, chunks: u64, threads: u64, per_thread: u64, hits: bool) -> f64 {
    let work: Vec<Vec<ChunkId>> = (0..threads)
        .map(|t| {
            let mut rng = Mix(t * 7919 + u64::from(hits));
            (0..per_thread)
                .map(|_| {
                    let n = rng.next() % chunks;
                    id(if hits { n } else { n + chunks })
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        for ids in &work {
            s.spawn(move || {
                let found = ids
                    .iter()
                    .filter(|i| index.contains(i).expect("lookup"))
                    .count();
                assert_eq!(found, if hits { ids.len() } else { 0 });
            });
        }
    });
    (threads * per_thread) as f64 / started.elapsed().as_secs_f64()
}

fn measure(chunks: u64, limit: usize) {
    let rss_before = status_kib("VmRSS:");
    let started = Instant::now();
    let mut index = Index::with_memory_limit(limit);
    let mut entries = Vec::with_capacity(PACK_ENTRIES as usize);
    for pack in 0..chunks.div_ceil(PACK_ENTRIES) {
        entries.clear();
        for n in pack * PACK_ENTRIES..((pack + 1) * PACK_ENTRIES).min(chunks) {
            entries.push(BlobEntry {
                id: id(n),
                offset: 16 + (n % PACK_ENTRIES) as u32 * 30_000,
                length: 30_000,
                raw_len: 65_536,
                inner: 0,
            });
        }
        let pack_id = *blake3::hash(&pack.to_be_bytes()).as_bytes();
        index
            .add_pack(pack_id, 8 << 20, &entries)
            .expect("add a pack");
    }
    let build = started.elapsed().as_secs_f64();
    let rss = status_kib("VmRSS:").saturating_sub(rss_before);
    let hwm = status_kib("VmHWM:");
    let per = 200_000;
    let hit1 = lookups(&index, chunks, 1, per, true);
    let miss1 = lookups(&index, chunks, 1, per, false);
    let hit2 = lookups(&index, chunks, 2, per, true);
    let miss2 = lookups(&index, chunks, 2, per, false);
    println!(
        "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
        if limit == usize::MAX {
            "all in memory".to_string()
        } else {
            format!("{limit} in memory, the rest on disk")
        },
        build,
        index.memory_bytes() as f64 / chunks as f64,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss as f64 * 1024.0 / chunks as f64,
        hit1 / 1e3,
        miss1 / 1e3,
        hit2 / 1e3,
        miss2 / 1e3,
    );
}

fn main() {
    let chunks: u64 = std::env::var("FERRY_BENCH_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16 << 20);
    // `cargo bench` passes `--bench`; a child is asked for one variant.
    let args: Vec<String> = std::env::args().collect();
    if let Some(limit) = args
        .iter()
        .position(|a| a == "--child")
        .map(|i| &args[i + 1])
    {
        measure(chunks, limit.parse().expect("a limit"));
        return;
    }
    println!(
        "Index of {chunks} chunks ({:.2} TiB of unique data at 64 KiB), packs of {PACK_ENTRIES} entries; \
         runs in `{}`.\n",
        chunks as f64 * 65536.0 / (1u64 << 40) as f64,
        ferry_agent::spill::spill_dir().display()
    );
    println!(
        "| index | build, s | index memory, B/chunk | RSS after build, MiB | peak RSS, MiB | RSS, B/chunk | hits/s, 1 thread (k) | misses/s, 1 thread (k) | hits/s, 2 threads (k) | misses/s, 2 threads (k) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let me = std::env::current_exe().expect("this program");
    for limit in [usize::MAX, ferry_agent::table::DEFAULT_MEMORY_ENTRIES] {
        let status = std::process::Command::new(&me)
            .args(["--child", &limit.to_string()])
            .status()
            .expect("run a measurement");
        assert!(status.success());
    }
}
