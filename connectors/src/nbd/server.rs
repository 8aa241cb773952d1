//! A small NBD server: fixed-newstyle negotiation (`NBD_OPT_GO`, `INFO`,
//! `EXPORT_NAME`, `LIST`, `STARTTLS`, structured replies, `base:allocation`), and
//! reads, writes, flushes, trims and block status. `ferry serve-nbd` puts a
//! recovery point behind it.
//!
//! Clients are not trusted: option and payload lengths are bounded, a request
//! past the end of the export or larger than the advertised maximum block size
//! is refused with `EINVAL` before anything is allocated for it, and a client
//! that breaks the protocol is disconnected without affecting the others.
//! What clients can make the server hold is bounded by [`Limits`]: the number of
//! connections, the bytes of request and reply payloads in memory at once (a
//! shared budget: a request waits for its share), the threads (one per
//! connection for its requests, plus one pool that serves reads for all), and
//! how long a handshake or an idle client may take.
//! With a TLS configuration the server requires TLS (`NBD_OPT_STARTTLS`) before
//! it says anything about the export.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tracing::{debug, info, warn};

use super::client::Stream;
use super::proto::*;
use super::tls::{self, TlsStream};

/// Why an [`Export`] could not serve a request; the server answers `EPERM` for
/// [`ExportError::ReadOnly`] and `EIO` otherwise, with this message.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the export is read-only")]
    ReadOnly,
    /// The data behind the export failed (a recovery point's chunk, a file).
    #[error("{doing} at offset {offset}: {source}")]
    Backing {
        doing: &'static str,
        offset: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// What the server exports.
pub trait Export: Send + Sync {
    fn size(&self) -> u64;
    fn writable(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError>;
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), ExportError> {
        Err(ExportError::ReadOnly)
    }
    fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
    /// `(length, holds data)` runs from `offset`, covering at least one byte.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError>;
}

/// The NBD error number and message for an export's failure.
fn errno_of(e: ExportError) -> (u32, String) {
    let errno = match e {
        ExportError::ReadOnly => EPERM,
        ExportError::Backing { .. } => EIO,
    };
    (errno, e.to_string())
}

/// Where the server listens.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }
}

/// Bounds on what clients can make the server hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; one more is refused with a message.
    pub max_connections: usize,
    /// From accepting a connection to the end of its negotiation.
    pub handshake_timeout: Duration,
    /// A client that sends no request for this long (with none in flight), or
    /// takes no reply for this long, is disconnected.
    pub idle_timeout: Duration,
    /// The largest read or write one request may carry; advertised as the
    /// maximum block size. Clamped to the budget and to the protocol's bound.
    pub max_request: u32,
    /// Bytes of request and reply payloads held in memory at once, over all
    /// connections; a request waits until its bytes fit.
    pub buffer_budget: u64,
    /// Threads that serve reads and block status, shared by all connections.
    pub threads: usize,
    /// Reads and block-status requests one connection may have in flight.
    pub per_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_request: MAX_PAYLOAD,
            buffer_budget: 256 << 20,
            threads: 8,
            per_connection: 4,
        }
    }
}

impl Limits {
    fn normalized(mut self) -> Limits {
        self.max_connections = self.max_connections.max(1);
        self.threads = self.threads.max(1);
        self.per_connection = self.per_connection.max(1);
        self.buffer_budget = self.buffer_budget.max(4096);
        self.max_request = self
            .max_request
            .min(MAX_PAYLOAD)
            .min(self.buffer_budget.min(u32::MAX as u64) as u32)
            .max(4096);
        self
    }
}

/// How the server runs: its limits, and TLS (required when given).
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub limits: Limits,
    pub tls: Option<Arc<ServerConfig>>,
}

/// What the server holds and has done, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections being served now.
    pub connections: usize,
    /// Connections refused because `max_connections` were being served.
    pub refused: u64,
    /// Connections dropped because the handshake took too long.
    pub handshake_timeouts: u64,
    /// Connections dropped because the client was idle too long.
    pub idle_timeouts: u64,
    /// Payload bytes held now, and the most ever held at once.
    pub buffered: u64,
    pub peak_buffered: u64,
}

/// A counting semaphore over bytes (or slots): `acquire` waits until the
/// amount fits, and the returned lease gives it back when dropped.
struct Budget {
    limit: u64,
    /// (in use, most ever in use)
    state: Mutex<(u64, u64)>,
    freed: Condvar,
}

struct Lease {
    budget: Arc<Budget>,
    n: u64,
}

impl Budget {
    fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            state: Mutex::new((0, 0)),
            freed: Condvar::new(),
        })
    }

    /// Callers never ask for more than `limit`, so the wait ends once the
    /// other leases are dropped.
    fn acquire(self: &Arc<Self>, n: u64) -> Lease {
        let n = n.min(self.limit);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.0 + n > self.limit {
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 += n;
        st.1 = st.1.max(st.0);
        Lease {
            budget: self.clone(),
            n,
        }
    }

    fn snapshot(&self) -> (u64, u64) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until nothing is in use.
    fn wait_idle(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.0 > 0 {
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.budget.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 -= self.n;
        drop(st);
        self.budget.freed.notify_all();
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The read threads, shared by every connection.
struct Pool {
    tx: mpsc::SyncSender<Job>,
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let (tx, rx) = mpsc::sync_channel::<Job>(threads * 2);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads {
            let rx = rx.clone();
            std::thread::spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            });
        }
        Pool { tx }
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        self.tx
            .send(job)
            .map_err(|_| io::Error::other("the read threads stopped"))
    }
}

/// A connection, plain or under TLS; clones share the socket (and the session).
enum Conn {
    Plain(Stream),
    Tls(TlsStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Plain(s) => Conn::Plain(s.try_clone()?),
            Conn::Tls(s) => Conn::Tls(s.try_clone()?),
        })
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Reads that fail once the handshake's deadline has passed, however slowly
/// the client trickles bytes.
struct Deadline<'a, R> {
    inner: &'a mut R,
    sock: &'a Stream,
    until: Instant,
}

fn handshake_timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the handshake took too long")
}

impl<R: Read> Read for Deadline<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(handshake_timed_out());
        }
        self.sock.set_read_timeout(Some(left))?;
        self.inner.read(buf).map_err(|e| {
            if is_timeout(&e) {
                handshake_timed_out()
            } else {
                e
            }
        })
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Context id of `base:allocation` on this server.
const CTX_ALLOC_ID: u32 = 1;
/// What one block-status reply may hold; charged to the budget while it is built.
const MAX_STATUS_BODY: usize = (1 << 20) + 64;
/// Refusals answered at once (each on a short-lived thread); more are just closed.
const MAX_REFUSING: usize = 4;
/// How long a refused client gets to read why.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);

struct Shared {
    export: Arc<dyn Export>,
    name: String,
    limits: Limits,
    tls: Option<Arc<ServerConfig>>,
    budget: Arc<Budget>,
    pool: Pool,
    connections: AtomicUsize,
    refusing: AtomicUsize,
    refused: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
}

/// An NBD server of one export.
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Starts the read threads; [`Server::serve`] accepts connections.
    pub fn new(export: Arc<dyn Export>, name: String, opts: ServeOptions) -> Server {
        let limits = opts.limits.normalized();
        Server {
            shared: Arc::new(Shared {
                export,
                name,
                budget: Budget::new(limits.buffer_budget),
                pool: Pool::new(limits.threads),
                limits,
                tls: opts.tls,
                connections: AtomicUsize::new(0),
                refusing: AtomicUsize::new(0),
                refused: AtomicU64::new(0),
                handshake_timeouts: AtomicU64::new(0),
                idle_timeouts: AtomicU64::new(0),
            }),
        }
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        let (buffered, peak_buffered) = s.budget.snapshot();
        Stats {
            connections: s.connections.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            handshake_timeouts: s.handshake_timeouts.load(Ordering::SeqCst),
            idle_timeouts: s.idle_timeouts.load(Ordering::SeqCst),
            buffered,
            peak_buffered,
        }
    }

    /// Serve until `stop` is set (checked between connections).
    pub fn serve(&self, listener: Listener, stop: &AtomicBool) -> io::Result<()> {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    // Out of file descriptors, say: do not spin.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            n += 1;
            let shared = self.shared.clone();
            let max = shared.limits.max_connections;
            if shared.connections.fetch_add(1, Ordering::SeqCst) >= max {
                shared.connections.fetch_sub(1, Ordering::SeqCst);
                shared.refused.fetch_add(1, Ordering::SeqCst);
                warn!(
                    conn = n,
                    max, "refused a client: {max} connections are open (--max-connections)"
                );
                if shared.refusing.fetch_add(1, Ordering::SeqCst) < MAX_REFUSING {
                    std::thread::spawn(move || {
                        let _ = refuse(stream, max);
                        shared.refusing.fetch_sub(1, Ordering::SeqCst);
                    });
                } else {
                    shared.refusing.fetch_sub(1, Ordering::SeqCst);
                    stream.shutdown();
                }
                continue;
            }
            std::thread::spawn(move || {
                debug!(conn = n, "client connected");
                match handle(stream, &shared) {
                    Ok(()) => debug!(conn = n, "client left"),
                    Err(e) => info!(conn = n, error = %e, "client dropped"),
                }
                shared.connections.fetch_sub(1, Ordering::SeqCst);
            });
        }
        Ok(())
    }
}

/// Tell a client beyond the connection cap why it cannot come in: every option
/// it sends is answered `NBD_REP_ERR_POLICY` with the reason, which clients show.
fn refuse(stream: Stream, max: usize) -> io::Result<()> {
    stream.set_read_timeout(Some(REFUSE_TIMEOUT))?;
    stream.set_write_timeout(Some(REFUSE_TIMEOUT))?;
    let msg = format!(
        "too many connections: the server serves at most {max} at once (ferry serve-nbd --max-connections); try again later"
    );
    let mut rd = BufReader::new(stream.try_clone()?);
    let mut wr = BufWriter::new(stream);
    greet(&mut wr)?;
    read_u32(&mut rd)?;
    let until = Instant::now() + REFUSE_TIMEOUT;
    // A few options, then good-bye: a refused client costs little.
    for _ in 0..8 {
        if Instant::now() > until || read_u64(&mut rd)? != IHAVEOPT {
            break;
        }
        let opt = read_u32(&mut rd)?;
        let len = read_u32(&mut rd)?;
        read_bounded(&mut rd, len, MAX_OPTION_LEN, "an option")?;
        if opt == OPT_EXPORT_NAME || opt == OPT_ABORT {
            break;
        }
        write_opt_reply(&mut wr, opt, REP_ERR_POLICY, msg.as_bytes())?;
        wr.flush()?;
    }
    wr.get_ref().shutdown();
    Ok(())
}

struct Session {
    structured: bool,
    alloc_ctx: bool,
}

/// How a round of option haggling ended.
enum Outcome {
    Go(Session),
    Abort,
    StartTls,
}

fn greet(wr: &mut impl Write) -> io::Result<()> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&hello)?;
    wr.flush()
}

fn handle(stream: Stream, sh: &Shared) -> io::Result<()> {
    let sock = stream.try_clone()?;
    let until = Instant::now() + sh.limits.handshake_timeout;
    sock.set_write_timeout(Some(sh.limits.handshake_timeout))?;
    type Negotiated = Option<(BufReader<Conn>, BufWriter<Conn>, Session)>;
    let r = (|| -> io::Result<Negotiated> {
        let mut conn = Conn::Plain(stream);
        let mut wr = BufWriter::new(conn.try_clone()?);
        greet(&mut wr)?;
        let mut rd = BufReader::new(conn.try_clone()?);
        let cflags = read_u32(&mut Deadline {
            inner: &mut rd,
            sock: &sock,
            until,
        })?;
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(invalid("unknown client flags"));
        }
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        let mut tls_active = false;
        loop {
            let mut d = Deadline {
                inner: &mut rd,
                sock: &sock,
                until,
            };
            match negotiate(&mut d, &mut wr, sh, no_zeroes, tls_active)? {
                Outcome::Go(s) => return Ok(Some((rd, wr, s))),
                Outcome::Abort => return Ok(None),
                Outcome::StartTls => {
                    // Bytes sent before the TLS handshake must not be taken as
                    // said under TLS (the STARTTLS injection attack).
                    if !rd.buffer().is_empty() {
                        return Err(invalid(
                            "data after NBD_OPT_STARTTLS before the TLS handshake",
                        ));
                    }
                    let config = sh
                        .tls
                        .clone()
                        .ok_or_else(|| invalid("TLS is not configured"))?;
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(handshake_timed_out());
                    }
                    sock.set_read_timeout(Some(left))?;
                    let plain = match conn {
                        Conn::Plain(s) => s,
                        Conn::Tls(_) => return Err(invalid("STARTTLS twice")),
                    };
                    drop((rd, wr));
                    let t = tls::accept(plain, config).map_err(|e| {
                        if is_timeout(&e) {
                            handshake_timed_out()
                        } else {
                            e
                        }
                    })?;
                    conn = Conn::Tls(t);
                    rd = BufReader::new(conn.try_clone()?);
                    wr = BufWriter::new(conn.try_clone()?);
                    tls_active = true;
                }
            }
        }
    })();
    let (rd, wr, session) = match r {
        Ok(Some(x)) => x,
        Ok(None) => return Ok(()),
        Err(e) => {
            if e.kind() == io::ErrorKind::TimedOut {
                sh.handshake_timeouts.fetch_add(1, Ordering::SeqCst);
                info!(
                    "dropped a client that did not finish its handshake within {:?}",
                    sh.limits.handshake_timeout
                );
            }
            sock.shutdown();
            return Err(e);
        }
    };
    // From here a quiet client is idle, and a client that takes no replies is stuck.
    sock.set_read_timeout(Some(sh.limits.idle_timeout))?;
    sock.set_write_timeout(Some(sh.limits.idle_timeout))?;
    transmit(rd, wr, sock, sh, session)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn transmission_flags(export: &dyn Export) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_DF;
    if export.writable() {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    } else {
        f |= TFLAG_READ_ONLY;
    }
    f
}

const TLS_REQUIRED: &str =
    "this server requires TLS: connect with TLS credentials (nbds://, or tls-creds in QEMU)";

/// One round of option haggling, until the client goes, aborts or starts TLS.
fn negotiate(
    rd: &mut impl Read,
    wr: &mut impl Write,
    sh: &Shared,
    no_zeroes: bool,
    tls_active: bool,
) -> io::Result<Outcome> {
    let export = sh.export.as_ref();
    let name = sh.name.as_str();
    let tls_missing = sh.tls.is_some() && !tls_active;
    let mut s = Session {
        structured: false,
        alloc_ctx: false,
    };
    let known = |n: &str| n.is_empty() || n == name;
    loop {
        if read_u64(rd)? != IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let opt = read_u32(rd)?;
        let len = read_u32(rd)?;
        let data = read_bounded(rd, len, MAX_OPTION_LEN, "an option")?;
        let mut c = Cursor(&data);
        match opt {
            OPT_STARTTLS if sh.tls.is_none() => write_opt_reply(wr, opt, REP_ERR_POLICY, &[])?,
            OPT_STARTTLS if tls_active || len != 0 => {
                write_opt_reply(wr, opt, REP_ERR_INVALID, &[])?
            }
            OPT_STARTTLS => {
                write_opt_reply(wr, opt, REP_ACK, &[])?;
                wr.flush()?;
                return Ok(Outcome::StartTls);
            }
            // Without TLS there is no way to refuse EXPORT_NAME but to hang up.
            OPT_EXPORT_NAME if tls_missing => return Err(invalid(TLS_REQUIRED)),
            OPT_ABORT => {
                write_opt_reply(wr, opt, REP_ACK, &[])?;
                wr.flush()?;
                return Ok(Outcome::Abort);
            }
            _ if tls_missing => {
                write_opt_reply(wr, opt, REP_ERR_TLS_REQD, TLS_REQUIRED.as_bytes())?
            }
            OPT_EXPORT_NAME => {
                let n = String::from_utf8_lossy(&data);
                if !known(&n) {
                    return Err(invalid("unknown export"));
                }
                wr.write_all(&export.size().to_be_bytes())?;
                wr.write_all(&transmission_flags(export).to_be_bytes())?;
                if !no_zeroes {
                    wr.write_all(&[0u8; 124])?;
                }
                wr.flush()?;
                return Ok(Outcome::Go(s));
            }
            OPT_LIST => {
                if len != 0 {
                    write_opt_reply(wr, opt, REP_ERR_INVALID, &[])?;
                } else {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    write_opt_reply(wr, opt, REP_SERVER, &d)?;
                    write_opt_reply(wr, opt, REP_ACK, &[])?;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    write_opt_reply(wr, opt, REP_ERR_INVALID, &[])?;
                } else {
                    s.structured = true;
                    write_opt_reply(wr, opt, REP_ACK, &[])?;
                }
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                let parsed = (|| {
                    let n = c.string(MAX_NAME_LEN)?;
                    let count = c.u32()?;
                    let mut qs = Vec::new();
                    for _ in 0..count.min(64) {
                        qs.push(c.string(MAX_NAME_LEN)?);
                    }
                    (c.is_empty() && count <= 64).then_some((n, qs))
                })();
                match parsed {
                    None => write_opt_reply(wr, opt, REP_ERR_INVALID, &[])?,
                    Some(_) if opt == OPT_SET_META_CONTEXT && !s.structured => {
                        write_opt_reply(wr, opt, REP_ERR_INVALID, &[])?
                    }
                    Some((n, _)) if !known(&n) => write_opt_reply(wr, opt, REP_ERR_UNKNOWN, &[])?,
                    Some((_, qs)) => {
                        let wants = qs.iter().any(|q| {
                            q == CTX_BASE_ALLOCATION
                                || (opt == OPT_LIST_META_CONTEXT && (q == "base:" || q.is_empty()))
                        }) || (opt == OPT_LIST_META_CONTEXT && qs.is_empty());
                        if wants {
                            let mut d = CTX_ALLOC_ID.to_be_bytes().to_vec();
                            d.extend_from_slice(CTX_BASE_ALLOCATION.as_bytes());
                            write_opt_reply(wr, opt, REP_META_CONTEXT, &d)?;
                        }
                        if opt == OPT_SET_META_CONTEXT {
                            s.alloc_ctx = wants;
                        }
                        write_opt_reply(wr, opt, REP_ACK, &[])?;
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| {
                    let n = c.string(MAX_NAME_LEN)?;
                    let k = c.u16()?;
                    for _ in 0..k {
                        c.u16()?;
                    }
                    c.is_empty().then_some(n)
                })();
                match parsed {
                    None => write_opt_reply(wr, opt, REP_ERR_INVALID, &[])?,
                    Some(n) if !known(&n) => write_opt_reply(wr, opt, REP_ERR_UNKNOWN, &[])?,
                    Some(_) => {
                        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                        d.extend_from_slice(&export.size().to_be_bytes());
                        d.extend_from_slice(&transmission_flags(export).to_be_bytes());
                        write_opt_reply(wr, opt, REP_INFO, &d)?;
                        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        b.extend_from_slice(&1u32.to_be_bytes());
                        b.extend_from_slice(&4096u32.to_be_bytes());
                        b.extend_from_slice(&sh.limits.max_request.to_be_bytes());
                        write_opt_reply(wr, opt, REP_INFO, &b)?;
                        write_opt_reply(wr, opt, REP_ACK, &[])?;
                        if opt == OPT_GO {
                            wr.flush()?;
                            return Ok(Outcome::Go(s));
                        }
                    }
                }
            }
            _ => write_opt_reply(wr, opt, REP_ERR_UNSUP, &[])?,
        }
        wr.flush()?;
    }
}

type Writer = Arc<Mutex<BufWriter<Conn>>>;

fn lock_writer(wr: &Writer) -> io::Result<std::sync::MutexGuard<'_, BufWriter<Conn>>> {
    wr.lock()
        .map_err(|_| io::Error::other("a thread writing replies panicked"))
}

struct Request {
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Wait for the next request; `false` when the client hung up. A client with
/// nothing in flight that stays quiet past the idle timeout is dropped; one
/// whose reads are still being served is waited for.
fn next_request(rd: &mut BufReader<Conn>, inflight: &Budget, sh: &Shared) -> io::Result<bool> {
    let mut quiet_since = Instant::now();
    loop {
        // `fill_buf` consumes nothing when it fails, so a timeout here is safe to retry.
        match rd.fill_buf() {
            Ok(b) => return Ok(!b.is_empty()),
            Err(e) if is_timeout(&e) => {
                if inflight.snapshot().0 > 0 {
                    quiet_since = Instant::now();
                    continue;
                }
                if quiet_since.elapsed() + Duration::from_millis(1) >= sh.limits.idle_timeout {
                    sh.idle_timeouts.fetch_add(1, Ordering::SeqCst);
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the client sent nothing for {:?} (the idle timeout)",
                            sh.limits.idle_timeout
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn transmit(
    mut rd: BufReader<Conn>,
    wr: BufWriter<Conn>,
    sock: Stream,
    sh: &Shared,
    s: Session,
) -> io::Result<()> {
    let wr: Writer = Arc::new(Mutex::new(wr));
    let structured = s.structured;
    let export = sh.export.clone();
    let size = export.size();
    let max = sh.limits.max_request;
    // Slots for this connection's requests on the shared read threads.
    let inflight = Budget::new(sh.limits.per_connection as u64);
    let sock = Arc::new(sock);
    let result = (|| -> io::Result<()> {
        loop {
            if !next_request(&mut rd, &inflight, sh)? {
                return Ok(());
            }
            if read_u32(&mut rd)? != REQUEST_MAGIC {
                return Err(invalid("bad request magic"));
            }
            let req = Request {
                flags: read_u16(&mut rd)?,
                cmd: read_u16(&mut rd)?,
                cookie: read_u64(&mut rd)?,
                offset: read_u64(&mut rd)?,
                len: read_u32(&mut rd)?,
            };
            let in_range = req
                .offset
                .checked_add(req.len as u64)
                .is_some_and(|e| e <= size);
            let too_large =
                || format!("the request is larger than the maximum block size ({max} bytes)");
            match req.cmd {
                CMD_DISC => return Ok(()),
                CMD_READ | CMD_BLOCK_STATUS if !in_range => reply_error(
                    &wr,
                    structured,
                    req.cookie,
                    EINVAL,
                    "past the end of the export",
                )?,
                // Refused before anything is allocated for it.
                CMD_READ if req.len > max => {
                    reply_error(&wr, structured, req.cookie, EINVAL, &too_large())?
                }
                CMD_BLOCK_STATUS if !s.alloc_ctx => reply_error(
                    &wr,
                    structured,
                    req.cookie,
                    EINVAL,
                    "no metadata context was negotiated",
                )?,
                CMD_READ | CMD_BLOCK_STATUS => {
                    let slot = inflight.acquire(1);
                    let bytes = if req.cmd == CMD_READ {
                        req.len as u64
                    } else {
                        MAX_STATUS_BODY as u64
                    };
                    let lease = sh.budget.acquire(bytes);
                    let (wr, export, sock) = (wr.clone(), export.clone(), sock.clone());
                    sh.pool.submit(Box::new(move || {
                        let r = match req.cmd {
                            CMD_READ => do_read(&wr, export.as_ref(), &req, structured),
                            _ => do_status(&wr, export.as_ref(), &req),
                        };
                        drop(lease);
                        if r.is_err() {
                            // The client is gone or stuck: wake the request reader.
                            sock.shutdown();
                        }
                        drop(slot);
                    }))?;
                }
                CMD_WRITE => {
                    // The payload must be consumed whatever the answer; one too
                    // large to hold can only be refused by hanging up.
                    if req.len > max {
                        return Err(invalid(&too_large()));
                    }
                    let _lease = sh.budget.acquire(req.len as u64);
                    let mut data = vec![0u8; req.len as usize];
                    rd.read_exact(&mut data)?;
                    let r = if !in_range {
                        Err((EINVAL, "past the end of the export".to_string()))
                    } else if !export.writable() {
                        Err((EPERM, "the export is read-only".to_string()))
                    } else {
                        export.write_at(&data, req.offset).map_err(errno_of)
                    };
                    finish(&wr, structured, req.cookie, r)?;
                }
                CMD_WRITE_ZEROES | CMD_TRIM => {
                    let r = if !in_range {
                        Err((EINVAL, "past the end of the export".to_string()))
                    } else if !export.writable() {
                        Err((EPERM, "the export is read-only".to_string()))
                    } else {
                        let _lease = sh.budget.acquire(ZEROES_CHUNK as u64);
                        write_zeroes(export.as_ref(), req.offset, req.len).map_err(errno_of)
                    };
                    finish(&wr, structured, req.cookie, r)?;
                }
                CMD_FLUSH => {
                    let r = export.flush().map_err(errno_of);
                    finish(&wr, structured, req.cookie, r)?;
                }
                CMD_CACHE => finish(&wr, structured, req.cookie, Ok(()))?,
                _ => reply_error(&wr, structured, req.cookie, EINVAL, "unknown command")?,
            }
        }
    })();
    if result.is_err() {
        sock.shutdown();
    }
    // Replies in flight are finished (or fail on the closed socket) before the
    // connection's slot is given back.
    inflight.wait_idle();
    match result {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        r => r,
    }
}

/// The zeros written at a time for `WRITE_ZEROES` and `TRIM`.
const ZEROES_CHUNK: usize = 1 << 20;

fn write_zeroes(export: &dyn Export, mut offset: u64, len: u32) -> Result<(), ExportError> {
    let zeros = vec![0u8; (len as usize).min(ZEROES_CHUNK)];
    let end = offset + len as u64;
    while offset < end {
        let n = ((end - offset) as usize).min(zeros.len());
        export.write_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

fn finish(
    wr: &Writer,
    structured: bool,
    cookie: u64,
    r: Result<(), (u32, String)>,
) -> io::Result<()> {
    match r {
        Ok(()) => {
            let mut w = lock_writer(wr)?;
            if structured {
                w.write_all(&structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    cookie,
                    0,
                ))?;
            } else {
                w.write_all(&simple_header(0, cookie))?;
            }
            w.flush()
        }
        Err((errno, msg)) => reply_error(wr, structured, cookie, errno, &msg),
    }
}

fn simple_header(errno: u32, cookie: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&errno.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

fn reply_error(
    wr: &Writer,
    structured: bool,
    cookie: u64,
    errno: u32,
    msg: &str,
) -> io::Result<()> {
    let mut w = lock_writer(wr)?;
    if structured {
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        w.write_all(&structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            6 + msg.len() as u32,
        ))?;
        w.write_all(&errno.to_be_bytes())?;
        w.write_all(&(msg.len() as u16).to_be_bytes())?;
        w.write_all(msg)?;
    } else {
        w.write_all(&simple_header(errno, cookie))?;
    }
    w.flush()
}

fn do_read(wr: &Writer, export: &dyn Export, req: &Request, structured: bool) -> io::Result<()> {
    // Allocated per request, under the budget lease the caller holds.
    let mut buf = vec![0u8; req.len as usize];
    if let Err(e) = export.read_at(&mut buf, req.offset) {
        warn!(offset = req.offset, len = req.len, error = %e, "read failed");
        return reply_error(wr, structured, req.cookie, EIO, &e.to_string());
    }
    let mut w = lock_writer(wr)?;
    if structured {
        w.write_all(&structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.cookie,
            8 + req.len,
        ))?;
        w.write_all(&req.offset.to_be_bytes())?;
    } else {
        w.write_all(&simple_header(0, req.cookie))?;
    }
    w.write_all(&buf)?;
    w.flush()
}

fn do_status(wr: &Writer, export: &dyn Export, req: &Request) -> io::Result<()> {
    let runs = match export.allocation(req.offset, req.len as u64) {
        Ok(r) if !r.is_empty() => r,
        Ok(_) => return reply_error(wr, true, req.cookie, EINVAL, "empty range"),
        Err(e) => return reply_error(wr, true, req.cookie, EIO, &e.to_string()),
    };
    let mut body = CTX_ALLOC_ID.to_be_bytes().to_vec();
    for (len, data) in runs {
        let mut left = len;
        while left > 0 {
            let n = left.min(u32::MAX as u64 & !4095) as u32;
            body.extend_from_slice(&n.to_be_bytes());
            let flags = if data { 0 } else { STATE_HOLE | STATE_ZERO };
            body.extend_from_slice(&flags.to_be_bytes());
            left -= n as u64;
        }
        if req.flags & CMD_FLAG_REQ_ONE != 0 || body.len() > MAX_STATUS_BODY - 64 {
            break;
        }
    }
    let mut w = lock_writer(wr)?;
    w.write_all(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        body.len() as u32,
    ))?;
    w.write_all(&body)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{Addr, Client, NbdUrl};
    use std::net::TcpStream;

    /// A read-only export whose byte at `o` is `o % 251`, slow on purpose so
    /// that reads of several clients overlap.
    struct Pattern {
        size: u64,
        delay: Duration,
    }

    fn byte(o: u64) -> u8 {
        (o % 251) as u8
    }

    impl Export for Pattern {
        fn size(&self) -> u64 {
            self.size
        }
        fn writable(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
            std::thread::sleep(self.delay);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = byte(offset + i as u64);
            }
            Ok(())
        }
        fn allocation(&self, _offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
            Ok(vec![(len, true)])
        }
    }

    /// A server on a free loopback port, serving until the test ends.
    fn start(limits: Limits, tls: Option<Arc<ServerConfig>>, size: u64) -> (Arc<Server>, NbdUrl) {
        start_slow(limits, tls, size, Duration::from_millis(20))
    }

    fn start_slow(
        limits: Limits,
        tls: Option<Arc<ServerConfig>>,
        size: u64,
        delay: Duration,
    ) -> (Arc<Server>, NbdUrl) {
        let export = Arc::new(Pattern { size, delay });
        let server = Arc::new(Server::new(
            export,
            "disk".into(),
            ServeOptions { limits, tls },
        ));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = server.clone();
        std::thread::spawn(move || s.serve(Listener::Tcp(l), &AtomicBool::new(false)));
        let url = NbdUrl {
            addr: Addr::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            export: "disk".into(),
            bitmap: None,
        };
        (server, url)
    }

    fn port(url: &NbdUrl) -> u16 {
        match url.addr {
            Addr::Tcp { port, .. } => port,
            Addr::Unix(_) => unreachable!(),
        }
    }

    /// Poll `f` for up to 5 s.
    fn eventually(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(5), "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_connection_beyond_the_cap_is_refused_and_told_why() {
        let (server, url) = start(
            Limits {
                max_connections: 2,
                ..Limits::default()
            },
            None,
            1 << 20,
        );
        let a = Client::connect(&url, &[]).unwrap();
        let _b = Client::connect(&url, &[]).unwrap();
        let e = Client::connect(&url, &[])
            .err()
            .expect("a third client is refused");
        assert!(e.to_string().contains("too many connections"), "{e}");
        assert!(e.to_string().contains("--max-connections"), "{e}");
        assert_eq!(server.stats().refused, 1);
        assert_eq!(server.stats().connections, 2);
        // A slot freed is a slot taken again.
        drop(a);
        eventually("the slot is freed", || server.stats().connections == 1);
        let mut c = Client::connect(&url, &[]).unwrap();
        let mut buf = vec![0u8; 4096];
        c.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf[0], byte(4096));
    }

    #[test]
    fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let (server, url) = start(
            Limits {
                handshake_timeout: Duration::from_millis(300),
                ..Limits::default()
            },
            None,
            1 << 20,
        );
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port(&url))).unwrap();
        // Without the timeout the server would wait for ever; the test would fail here.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("the server hangs up");
        assert_eq!(got.len(), 18, "only the greeting");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        eventually("the drop is counted", || {
            server.stats().handshake_timeouts == 1 && server.stats().connections == 0
        });

        // A client that trickles a byte at a time is held to the same deadline.
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port(&url))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        for b in IHAVEOPT.to_be_bytes().iter().cycle().take(200) {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            if t.elapsed() > Duration::from_secs(4) {
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a trickling client kept the handshake open for {:?}",
            t.elapsed()
        );
        eventually("the drop is counted", || {
            server.stats().handshake_timeouts == 2
        });
    }

    #[test]
    fn an_idle_client_is_dropped_after_the_idle_timeout() {
        let (server, url) = start_slow(
            Limits {
                idle_timeout: Duration::from_millis(300),
                ..Limits::default()
            },
            None,
            1 << 20,
            Duration::from_millis(700),
        );
        let mut c = Client::connect(&url, &[]).unwrap();
        let mut buf = vec![0u8; 4096];
        // Waiting for the server is not idle: a read slower than the timeout is answered.
        c.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[5], byte(5));
        assert_eq!(server.stats().connections, 1);
        eventually("the idle client is dropped", || {
            server.stats().idle_timeouts == 1 && server.stats().connections == 0
        });
        assert!(c.read_at(&mut buf, 0).is_err());
    }

    #[test]
    fn reads_of_many_clients_stay_within_the_buffer_budget() {
        const MIB: u64 = 1 << 20;
        let (server, url) = start(
            Limits {
                // Room for two of the clients' 2 MiB requests at a time.
                buffer_budget: 5 * MIB,
                max_request: 2 * MIB as u32,
                ..Limits::default()
            },
            None,
            64 * MIB,
        );
        let clients: Vec<_> = (0..6u64)
            .map(|i| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let mut c = Client::connect(&url, &[]).unwrap();
                    assert_eq!(c.info.max_block, Some(2 * MIB as u32), "advertised");
                    let mut buf = vec![0u8; (16 * MIB) as usize];
                    let at = i * 8 * MIB;
                    c.read_at(&mut buf, at).unwrap();
                    for (k, b) in buf.iter().enumerate().step_by(4093) {
                        assert_eq!(*b, byte(at + k as u64), "byte {k}");
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        let st = server.stats();
        assert!(st.peak_buffered <= 5 * MIB, "{st:?}");
        assert!(st.peak_buffered >= 2 * MIB, "{st:?}");
        eventually("every buffer is given back", || {
            server.stats().buffered == 0
        });
    }

    /// Negotiate with `NBD_OPT_GO` by hand (simple replies), returning the export size.
    fn go(s: &mut (impl Read + Write), greeted: bool) -> io::Result<u64> {
        if !greeted {
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello)?;
            s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        }
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&0u16.to_be_bytes());
        send_option(s, OPT_GO, &data)?;
        let mut size = 0;
        loop {
            let (kind, payload) = option_reply(s)?;
            match kind {
                REP_ACK => return Ok(size),
                REP_INFO if payload[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = u64::from_be_bytes(payload[2..10].try_into().unwrap());
                }
                REP_INFO => {}
                k => {
                    return Err(io::Error::other(format!(
                        "refused {k:#x}: {}",
                        String::from_utf8_lossy(&payload)
                    )));
                }
            }
        }
    }

    fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<()> {
        s.write_all(&IHAVEOPT.to_be_bytes())?;
        s.write_all(&opt.to_be_bytes())?;
        s.write_all(&(data.len() as u32).to_be_bytes())?;
        s.write_all(data)?;
        s.flush()
    }

    fn option_reply(s: &mut impl Read) -> io::Result<(u32, Vec<u8>)> {
        assert_eq!(read_u64(s)?, OPT_REPLY_MAGIC);
        read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        Ok((kind, read_bounded(s, len, MAX_OPTION_LEN, "reply")?))
    }

    /// One read request with a simple reply: the errno, and the data when it is 0.
    fn raw_read(s: &mut (impl Read + Write), offset: u64, len: u32) -> io::Result<(u32, Vec<u8>)> {
        let mut req = Vec::new();
        encode_request(&mut req, 0, CMD_READ, 7, offset, len);
        s.write_all(&req)?;
        s.flush()?;
        assert_eq!(read_u32(s)?, SIMPLE_REPLY_MAGIC);
        let errno = read_u32(s)?;
        assert_eq!(read_u64(s)?, 7);
        let mut data = vec![0u8; if errno == 0 { len as usize } else { 0 }];
        s.read_exact(&mut data)?;
        Ok((errno, data))
    }

    #[test]
    fn a_request_larger_than_the_maximum_is_refused_without_allocating() {
        let (server, url) = start(
            Limits {
                max_request: 1 << 20,
                ..Limits::default()
            },
            None,
            1 << 30,
        );
        let mut s = TcpStream::connect(("127.0.0.1", port(&url))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(go(&mut s, false).unwrap(), 1 << 30);
        let (errno, _) = raw_read(&mut s, 0, 512 << 20).unwrap();
        assert_eq!(errno, EINVAL);
        assert_eq!(server.stats().peak_buffered, 0, "nothing was allocated");
        // The connection goes on.
        let (errno, data) = raw_read(&mut s, 1000, 4096).unwrap();
        assert_eq!(errno, 0);
        assert_eq!(data[0], byte(1000));
    }

    /// A CA, a server certificate for 127.0.0.1 it signed, and a client
    /// certificate it signed: (ca pem, server cert pem, server key pem, client cert pem, client key pem).
    pub(crate) fn test_pki() -> (String, String, String, String, String) {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca.self_signed(&ca_key).unwrap();
        let sk = KeyPair::generate().unwrap();
        let mut sp =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let sc = sp.signed_by(&sk, &ca, &ca_key).unwrap();
        let ck = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::new(vec!["client".to_string()]).unwrap();
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cc = cp.signed_by(&ck, &ca, &ca_key).unwrap();
        (
            ca.pem(),
            sc.pem(),
            sk.serialize_pem(),
            cc.pem(),
            ck.serialize_pem(),
        )
    }

    #[test]
    fn with_tls_a_tls_client_reads_and_a_plain_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key, ccert, ckey) = test_pki();
        let w = |n: &str, s: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, s).unwrap();
            p
        };
        let files = tls::TlsFiles {
            cert: w("server-cert.pem", &cert),
            key: w("server-key.pem", &key),
            ca: Some(w("ca-cert.pem", &ca)),
        };
        let (_server, url) = start(
            Limits::default(),
            Some(files.server_config().unwrap()),
            1 << 20,
        );
        // A client without TLS learns nothing about the export.
        let e = Client::connect(&url, &[])
            .err()
            .expect("plain text is refused");
        assert!(e.to_string().contains("requires TLS"), "{e}");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
        let client_tls = |with_cert: bool| {
            let b = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone());
            let config = if with_cert {
                b.with_client_auth_cert(
                    vec![
                        rustls::pki_types::CertificateDer::from_pem_slice(ccert.as_bytes())
                            .unwrap(),
                    ],
                    rustls::pki_types::PrivateKeyDer::from_pem_slice(ckey.as_bytes()).unwrap(),
                )
                .unwrap()
            } else {
                b.with_no_client_auth()
            };
            let mut s = TcpStream::connect(("127.0.0.1", port(&url))).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).unwrap();
            s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
            send_option(&mut s, OPT_STARTTLS, &[]).unwrap();
            assert_eq!(option_reply(&mut s).unwrap().0, REP_ACK);
            let conn =
                rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().unwrap())
                    .unwrap();
            rustls::StreamOwned::new(conn, s)
        };
        let mut t = client_tls(true);
        assert_eq!(go(&mut t, true).unwrap(), 1 << 20);
        for (off, len) in [(0u64, 4096u32), (12345, 100_000), (0, 1 << 20)] {
            let (errno, data) = raw_read(&mut t, off, len).unwrap();
            assert_eq!(errno, 0);
            assert!(
                data.iter()
                    .enumerate()
                    .all(|(i, b)| *b == byte(off + i as u64))
            );
        }
        // Without a certificate the CA signed, the TLS handshake fails.
        let mut t = client_tls(false);
        assert!(
            go(&mut t, true).is_err(),
            "a client without a certificate got in"
        );
    }
}
