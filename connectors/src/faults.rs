//! A fault-injecting object store, for tests and for rehearsing bad days.
//!
//! Wraps any store and, on a fraction of requests chosen by a seeded generator,
//! fails them the ways cloud storage fails: a 500, a 503 SlowDown, a connection
//! reset, a response body cut short, a put that landed but whose answer was lost,
//! a request that hangs past the client's timeout, or a whole outage after N
//! requests or from the first request for a given kind of object. The parts of
//! a multipart upload and its completion are requests like any other. Enabled by `FERRY_FAULTS` (see [`FaultSpec::parse`]); never on by
//! default.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartId, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

/// The kinds of fault, each picked with equal odds when a request is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 500 InternalError before the request is served.
    Error,
    /// 503 SlowDown before the request is served.
    SlowDown,
    /// The connection is reset before the request is served.
    Reset,
    /// A read returns fewer bytes than the range it claims.
    Partial,
    /// A write lands, but its answer is lost: the client sees a reset.
    Lost,
    /// The request hangs for [`FaultSpec::hang`] before being served.
    Hang,
}

impl Fault {
    fn parse(s: &str) -> Option<Fault> {
        Some(match s {
            "error" => Fault::Error,
            "slowdown" => Fault::SlowDown,
            "reset" => Fault::Reset,
            "partial" => Fault::Partial,
            "lost" => Fault::Lost,
            "hang" => Fault::Hang,
            _ => return None,
        })
    }
}

/// What to inject.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// Fraction of requests that fail (0 to 1).
    pub rate: f64,
    pub seed: u64,
    pub kinds: Vec<Fault>,
    /// Added to every request.
    pub latency: Duration,
    /// Added to every put (on top of `latency`): slow uploads, quick reads.
    pub put_latency: Duration,
    /// Added to every read of a byte range (pack data), on top of
    /// `latency`: a slow data path behind quick metadata reads.
    pub range_latency: Duration,
    /// How long a `hang` fault stalls.
    pub hang: Duration,
    /// After this many requests every request fails with a reset (an outage).
    pub outage_after: Option<u64>,
    /// From the first request for an object whose name starts with this
    /// (`index/`, `points/`), every request fails with a reset: an outage at a
    /// chosen step of a backup, whatever order its concurrent requests take.
    pub outage_from: Option<String>,
    /// Only stores whose location contains this (one replica of several).
    pub at: Option<String>,
}

impl FaultSpec {
    /// Parse `rate=0.05 seed=7 kinds=error+slowdown+reset+partial+lost+hang
    /// latency=2ms put-latency=1s range-latency=1s hang=3s outage-after=100 outage-from=index/ at=LOCATION-PART` (every
    /// field optional; spaces or
    /// commas between fields).
    pub fn parse(s: &str) -> Result<FaultSpec, String> {
        let mut spec = FaultSpec {
            rate: 0.0,
            seed: 1,
            kinds: vec![
                Fault::Error,
                Fault::SlowDown,
                Fault::Reset,
                Fault::Partial,
                Fault::Lost,
            ],
            latency: Duration::ZERO,
            put_latency: Duration::ZERO,
            range_latency: Duration::ZERO,
            hang: Duration::from_secs(3),
            outage_after: None,
            outage_from: None,
            at: None,
        };
        let dur = |v: &str| -> Result<Duration, String> {
            let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
            let n: f64 = num.parse().map_err(|_| format!("bad duration {v:?}"))?;
            Ok(Duration::from_secs_f64(match unit {
                "ms" => n / 1000.0,
                "s" | "" => n,
                _ => return Err(format!("bad duration unit in {v:?} (ms or s)")),
            }))
        };
        for field in s.split([' ', ',']).filter(|f| !f.is_empty()) {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| format!("FERRY_FAULTS: {field:?} is not key=value"))?;
            match k {
                "rate" => {
                    spec.rate = v
                        .parse()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| format!("FERRY_FAULTS: rate {v:?} is not in 0..1"))?
                }
                "seed" => spec.seed = v.parse().map_err(|_| format!("bad seed {v:?}"))?,
                "kinds" => {
                    spec.kinds = v
                        .split('+')
                        .map(|k| Fault::parse(k).ok_or_else(|| format!("FERRY_FAULTS: unknown fault {k:?} (error, slowdown, reset, partial, lost, hang)")))
                        .collect::<Result<_, _>>()?
                }
                "latency" => spec.latency = dur(v)?,
                "put-latency" => spec.put_latency = dur(v)?,
                "range-latency" => spec.range_latency = dur(v)?,
                "hang" => spec.hang = dur(v)?,
                "outage-after" => {
                    spec.outage_after = Some(v.parse().map_err(|_| format!("bad count {v:?}"))?)
                }
                "outage-from" => spec.outage_from = Some(v.to_string()),
                "at" => spec.at = Some(v.to_string()),
                _ => return Err(format!("FERRY_FAULTS: unknown field {k:?}")),
            }
        }
        Ok(spec)
    }
}

/// Counts of what was injected, for tests and logs.
#[derive(Debug, Default)]
pub struct Injected {
    pub requests: AtomicU64,
    pub faults: AtomicU64,
    /// An `outage-from` outage has begun.
    pub outage: AtomicBool,
    /// Multipart uploads started (each counts as one request too).
    pub multipart: AtomicU64,
    /// Parts sent in multipart uploads (each counts as one request too).
    pub parts: AtomicU64,
}

/// A store that fails on purpose, and its multipart API when given one.
pub struct Faulty {
    inner: Arc<dyn ObjectStore>,
    parts: Option<Arc<dyn MultipartStore>>,
    dice: Arc<Dice>,
    pub injected: Arc<Injected>,
}

impl fmt::Debug for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faulty")
            .field("inner", &self.inner)
            .field("parts", &self.parts.is_some())
            .field("dice", &self.dice)
            .finish()
    }
}

/// What decides each request's fate, shared by the store and the multipart
/// uploads it starts (whose parts outlive the call that made them).
#[derive(Debug)]
struct Dice {
    spec: FaultSpec,
    injected: Arc<Injected>,
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A number in [0, 1) from a generator output.
fn unit(r: u64) -> f64 {
    (r >> 11) as f64 / (1u64 << 53) as f64
}

/// What an injected fault looks like to the store: the typed causes real
/// clients give (see `crate::http`), so retries are decided as in production.
#[derive(Debug, Clone, Copy)]
enum InjectedFault {
    /// The connection was reset (an I/O error).
    Reset,
    /// HTTP 500 InternalError.
    ServerError,
    /// HTTP 503 SlowDown.
    SlowDown,
}

fn injected(what: InjectedFault) -> object_store::Error {
    use ferry_agent::store::ServerAnswer;
    let source: Box<dyn std::error::Error + Send + Sync> = match what {
        InjectedFault::Reset => Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer (injected)",
        )),
        InjectedFault::ServerError => Box::new(ServerAnswer {
            store: "faults",
            status: 500,
            code: "InternalError".into(),
        }),
        InjectedFault::SlowDown => Box::new(ServerAnswer {
            store: "faults",
            status: 503,
            code: "SlowDown".into(),
        }),
    };
    object_store::Error::Generic {
        store: "faults",
        source,
    }
}

impl Faulty {
    pub fn new(inner: Arc<dyn ObjectStore>, spec: FaultSpec) -> Faulty {
        let injected = Arc::<Injected>::default();
        Faulty {
            inner,
            parts: None,
            dice: Arc::new(Dice {
                spec,
                injected: injected.clone(),
            }),
            injected,
        }
    }
}

impl Faulty {
    /// Fail the requests of `parts`, the multipart API of the same store, with
    /// the same dice.
    pub fn with_parts(mut self, parts: Arc<dyn MultipartStore>) -> Faulty {
        self.parts = Some(parts);
        self
    }

    pub fn has_parts(&self) -> bool {
        self.parts.is_some()
    }

    fn parts(&self) -> object_store::Result<&Arc<dyn MultipartStore>> {
        self.parts
            .as_ref()
            .ok_or_else(|| object_store::Error::NotImplemented {
                operation: "multipart API of a store without one".into(),
                implementer: "Faulty".into(),
            })
    }
}

/// The multipart API, failing as requests do: creating an upload, each part
/// and the completion can fail before they are sent, or land with the answer
/// lost. Aborting is never failed, so what a test finds left over is the
/// caller's.
#[async_trait]
impl MultipartStore for Faulty {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        self.create_multipart_opts(path, PutMultipartOptions::default())
            .await
    }

    async fn create_multipart_opts(
        &self,
        path: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<MultipartId> {
        let parts = self.parts()?;
        self.dice
            .write(Some(path), async {
                self.injected.multipart.fetch_add(1, Ordering::Relaxed);
                parts.create_multipart_opts(path, opts).await
            })
            .await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let parts = self.parts()?;
        self.injected.parts.fetch_add(1, Ordering::Relaxed);
        self.dice
            .write(Some(path), parts.put_part(path, id, part_idx, data))
            .await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let store = self.parts()?;
        self.dice
            .write(Some(path), store.complete_multipart(path, id, parts))
            .await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.parts()?.abort_multipart(path, id).await
    }
}

impl Dice {
    /// Whether the request numbered `n`, for `location` (an object or a
    /// listed prefix), falls in an outage.
    fn in_outage(&self, n: u64, location: Option<&Path>) -> bool {
        if self.spec.outage_after.is_some_and(|after| n >= after) {
            return true;
        }
        if let (Some(from), Some(at)) = (&self.spec.outage_from, location)
            && at.as_ref().starts_with(from.as_str())
        {
            self.injected.outage.store(true, Ordering::SeqCst);
        }
        self.injected.outage.load(Ordering::SeqCst)
    }

    /// A request that writes: `op`, unless the dice fail it before it is
    /// sent; with a lost answer it lands and the caller sees a reset.
    async fn write<T>(
        &self,
        location: Option<&Path>,
        op: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let fault = self.roll(location).await?;
        let r = op.await?;
        if fault == Some(Fault::Lost) {
            return Err(injected(InjectedFault::Reset));
        }
        Ok(r)
    }

    /// Decide the fate of the next request, for `location`.
    async fn roll(&self, location: Option<&Path>) -> Result<Option<Fault>, object_store::Error> {
        let n = self.injected.requests.fetch_add(1, Ordering::Relaxed);
        if !self.spec.latency.is_zero() {
            tokio::time::sleep(self.spec.latency).await;
        }
        if self.in_outage(n, location) {
            self.injected.faults.fetch_add(1, Ordering::Relaxed);
            return Err(injected(InjectedFault::Reset));
        }
        let r = splitmix(self.spec.seed ^ splitmix(n));
        if self.spec.kinds.is_empty() || unit(r) >= self.spec.rate {
            return Ok(None);
        }
        self.injected.faults.fetch_add(1, Ordering::Relaxed);
        let kind = self.spec.kinds[(r % self.spec.kinds.len() as u64) as usize];
        match kind {
            Fault::Error => Err(injected(InjectedFault::ServerError)),
            Fault::SlowDown => Err(injected(InjectedFault::SlowDown)),
            Fault::Reset => Err(injected(InjectedFault::Reset)),
            Fault::Hang => {
                tokio::time::sleep(self.spec.hang).await;
                Ok(None)
            }
            Fault::Partial | Fault::Lost => Ok(Some(kind)),
        }
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if !self.dice.spec.put_latency.is_zero() {
            tokio::time::sleep(self.dice.spec.put_latency).await;
        }
        self.dice
            .write(Some(location), self.inner.put_opts(location, payload, opts))
            .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.dice.roll(Some(location)).await?;
        self.injected.multipart.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            dice: self.dice.clone(),
            location: location.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.range.is_some() && !self.dice.spec.range_latency.is_zero() {
            tokio::time::sleep(self.dice.spec.range_latency).await;
        }
        let fault = self.dice.roll(Some(location)).await?;
        let head = options.head;
        let r = self.inner.get_opts(location, options).await?;
        if fault != Some(Fault::Partial) || head {
            return Ok(r);
        }
        let GetResult {
            payload,
            meta,
            range,
            attributes,
            extensions,
        } = r;
        let whole = GetResult {
            payload,
            meta: meta.clone(),
            range: range.clone(),
            attributes: attributes.clone(),
            extensions: extensions.clone(),
        }
        .bytes()
        .await?;
        let cut: Bytes = whole.slice(..whole.len() / 2);
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::once(async { Ok(cut) }).boxed()),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        if !self.dice.spec.range_latency.is_zero() {
            tokio::time::sleep(self.dice.spec.range_latency).await;
        }
        self.dice.roll(Some(location)).await?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let n = self.injected.requests.fetch_add(1, Ordering::Relaxed);
        let outage = self.dice.in_outage(n, prefix);
        let r = splitmix(self.dice.spec.seed ^ splitmix(n));
        if outage || unit(r) < self.dice.spec.rate {
            self.injected.faults.fetch_add(1, Ordering::Relaxed);
            return futures::stream::once(async { Err(injected(InjectedFault::SlowDown)) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.dice.roll(prefix).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.dice.roll(Some(from)).await?;
        self.inner.copy_opts(from, to, options).await
    }
}

/// A multipart upload whose parts and completion fail as requests do: a part
/// or a completion can fail before it is sent, or land with its answer lost.
/// Aborting is never failed, so what a test finds left over is the caller's.
#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    dice: Arc<Dice>,
    location: Path,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        // The part takes its number now, in the order the caller sent it.
        let part = self.inner.put_part(data);
        let (dice, location) = (self.dice.clone(), self.location.clone());
        Box::pin(async move {
            dice.injected.parts.fetch_add(1, Ordering::Relaxed);
            dice.write(Some(&location), part).await
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.dice
            .write(Some(&self.location), self.inner.complete())
            .await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s = FaultSpec::parse(
            "rate=0.05 seed=9 kinds=error+hang latency=2ms range-latency=1s hang=1.5s outage-after=10 outage-from=index/",
        )
        .unwrap();
        assert_eq!(s.rate, 0.05);
        assert_eq!(s.seed, 9);
        assert_eq!(s.kinds, vec![Fault::Error, Fault::Hang]);
        assert_eq!(s.latency, Duration::from_millis(2));
        assert_eq!(s.range_latency, Duration::from_secs(1));
        assert_eq!(s.hang, Duration::from_millis(1500));
        assert_eq!(s.outage_after, Some(10));
        assert_eq!(s.outage_from.as_deref(), Some("index/"));
        for (bad, says) in [
            ("rate=2", "rate"),
            ("kinds=error+fire", "fire"),
            ("colour=red", "colour"),
            ("rate", "key=value"),
            ("latency=3h", "unit"),
        ] {
            let e = FaultSpec::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A store in memory, and its multipart API, behind faults as `spec` says.
    fn over_memory(spec: &str) -> Faulty {
        let memory = Arc::new(object_store::memory::InMemory::new());
        Faulty::new(memory.clone(), FaultSpec::parse(spec).unwrap()).with_parts(memory)
    }

    #[test]
    fn an_outage_from_a_prefix_starts_at_its_first_request_and_stays() {
        let rt = runtime();
        let f = over_memory("outage-from=index/");
        let put = |name: &'static str| {
            let p = Path::from(name);
            rt.block_on(f.put_opts(&p, PutPayload::from_static(b"x"), PutOptions::default()))
                .is_ok()
        };
        assert!(put("packs/aa"));
        assert!(put("packs/bb"));
        assert!(
            !put("index/cc"),
            "the outage starts with the first index put"
        );
        assert!(!put("packs/dd"), "and every request after it fails");
        assert!(!put("points/ee"));
        assert!(
            rt.block_on(f.get_opts(&Path::from("packs/aa"), GetOptions::default()))
                .is_err()
        );
    }

    #[test]
    fn packs_go_up_in_one_put_and_other_large_objects_in_parts() {
        use ferry_agent::store::{MULTIPART_THRESHOLD, Store};
        let f = Arc::new(over_memory("rate=0"));
        let injected = f.injected.clone();
        let store = Store::new(f, "memory:");
        let big = Bytes::from(vec![7u8; MULTIPART_THRESHOLD + 4096]);
        // A pack this large is atomic on every store only as one PUT.
        store.put("packs/00ff", big.clone()).unwrap();
        assert_eq!(injected.multipart.load(Ordering::Relaxed), 0);
        assert_eq!(store.get("packs/00ff").unwrap(), big);
        store.put("replicas/big", big.clone()).unwrap();
        assert_eq!(injected.multipart.load(Ordering::Relaxed), 1);
        assert_eq!(store.get("replicas/big").unwrap(), big);
    }

    #[test]
    fn a_file_sent_in_parts_through_faults_arrives_whole_each_part_retried_alone() {
        use ferry_agent::store::{PART_SIZE, RetryPolicy, Store};
        let len = 2 * PART_SIZE + 1000;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        let mut part_faults = 0;
        for seed in 1..=6 {
            // Creating the upload, its parts and its completion fail as other
            // requests do, lost answers included (the part or the object
            // landed; the client saw a reset).
            let f = Arc::new(over_memory(&format!(
                "rate=0.25 seed={seed} kinds=error+reset+lost"
            )));
            let injected = f.injected.clone();
            let store = Store::new(f.clone(), "faulty:")
                .with_parts(f)
                .with_retry(RetryPolicy {
                    attempts: 20,
                    base: Duration::from_millis(1),
                    max: Duration::from_millis(2),
                    timeout: Duration::from_secs(30),
                });
            store.put_file("packs/ab/big", &file, len as u64).unwrap();
            assert_eq!(store.get("packs/ab/big").unwrap(), data, "seed {seed}");
            let parts = injected.parts.load(Ordering::Relaxed);
            let retries = store.requests().retries;
            // Three parts, and one more for each that failed: never the whole
            // upload again (that would send three parts per failure).
            assert!(
                parts <= 3 + retries,
                "seed {seed}: {parts} parts sent, {retries} retries"
            );
            if parts > 3 {
                part_faults += 1;
            }
        }
        assert!(
            part_faults >= 2,
            "faults hit the parts of only {part_faults} of 6 uploads"
        );
    }

    #[test]
    fn about_the_asked_fraction_of_requests_fail() {
        let rt = runtime();
        let f = over_memory("rate=0.1 kinds=error");
        let p = Path::from("x");
        let failed = rt.block_on(async {
            let mut failed = 0;
            for _ in 0..2000 {
                if f.put_opts(&p, PutPayload::from_static(b"x"), PutOptions::default())
                    .await
                    .is_err()
                {
                    failed += 1;
                }
            }
            failed
        });
        assert!((140..260).contains(&failed), "{failed} of 2000 failed");
    }
}
