//! A small NBD server: fixed-newstyle negotiation (`NBD_OPT_GO`, `INFO`,
//! `EXPORT_NAME`, `LIST`, structured replies, `base:allocation`), and reads,
//! writes, flushes, trims and block status, with reads of one connection served
//! by several threads. `ferry serve-nbd` puts a recovery point behind it.
//!
//! Clients are not trusted: option and payload lengths are bounded, a request
//! past the end of the export is refused with `EINVAL`, and a client that
//! breaks the protocol is disconnected without affecting the others.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use tracing::{debug, info, warn};

use super::client::Stream;
use super::proto::*;

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

/// Threads that serve reads for one connection.
const READ_THREADS: usize = 4;
/// Context id of `base:allocation` on this server.
const CTX_ALLOC_ID: u32 = 1;

/// Serve `export` under `name` until `stop` is set (checked between connections).
pub fn serve(
    listener: Listener,
    export: Arc<dyn Export>,
    name: String,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let conns = AtomicU64::new(0);
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let n = conns.fetch_add(1, Ordering::Relaxed);
        let (export, name) = (export.clone(), name.clone());
        std::thread::spawn(move || {
            debug!(conn = n, "client connected");
            match handle(stream, export, &name) {
                Ok(()) => debug!(conn = n, "client left"),
                Err(e) => info!(conn = n, error = %e, "client dropped"),
            }
        });
    }
    Ok(())
}

struct Session {
    structured: bool,
    alloc_ctx: bool,
}

fn handle(stream: Stream, export: Arc<dyn Export>, name: &str) -> io::Result<()> {
    let mut rd = BufReader::new(stream.try_clone()?);
    let mut wr = BufWriter::new(stream);
    let Some(session) = negotiate(&mut rd, &mut wr, export.as_ref(), name)? else {
        return Ok(());
    };
    transmit(rd, wr, export, session)
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

/// The handshake; `None` when the client aborted.
fn negotiate(
    rd: &mut impl Read,
    wr: &mut impl Write,
    export: &dyn Export,
    name: &str,
) -> io::Result<Option<Session>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&hello)?;
    wr.flush()?;
    let cflags = read_u32(rd)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid("unknown client flags"));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
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
                return Ok(Some(s));
            }
            OPT_ABORT => {
                write_opt_reply(wr, opt, REP_ACK, &[])?;
                wr.flush()?;
                return Ok(None);
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
                        b.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        write_opt_reply(wr, opt, REP_INFO, &b)?;
                        write_opt_reply(wr, opt, REP_ACK, &[])?;
                        if opt == OPT_GO {
                            wr.flush()?;
                            return Ok(Some(s));
                        }
                    }
                }
            }
            OPT_STARTTLS => write_opt_reply(wr, opt, REP_ERR_POLICY, &[])?,
            _ => write_opt_reply(wr, opt, REP_ERR_UNSUP, &[])?,
        }
        wr.flush()?;
    }
}

type Writer = Arc<Mutex<BufWriter<Stream>>>;

struct Request {
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

fn transmit(
    mut rd: BufReader<Stream>,
    wr: BufWriter<Stream>,
    export: Arc<dyn Export>,
    s: Session,
) -> io::Result<()> {
    let wr: Writer = Arc::new(Mutex::new(wr));
    let structured = s.structured;
    let (tx, rx) = mpsc::sync_channel::<Request>(64);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..READ_THREADS {
        let (rx, wr, export) = (rx.clone(), wr.clone(), export.clone());
        workers.push(std::thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                let Ok(req) = rx.lock().expect("request queue").recv() else {
                    return;
                };
                let r = match req.cmd {
                    CMD_READ => do_read(&wr, export.as_ref(), &req, structured, &mut buf),
                    _ => do_status(&wr, export.as_ref(), &req),
                };
                if r.is_err() {
                    return;
                }
            }
        }));
    }
    let size = export.size();
    let result = (|| -> io::Result<()> {
        loop {
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
            match req.cmd {
                CMD_DISC => return Ok(()),
                CMD_READ | CMD_BLOCK_STATUS if !in_range => reply_error(
                    &wr,
                    structured,
                    req.cookie,
                    EINVAL,
                    "past the end of the export",
                )?,
                CMD_READ if req.len > MAX_PAYLOAD => {
                    reply_error(&wr, structured, req.cookie, EOVERFLOW, "request too large")?
                }
                CMD_READ => tx.send(req).map_err(|_| invalid("workers stopped"))?,
                CMD_BLOCK_STATUS if !s.alloc_ctx => reply_error(
                    &wr,
                    structured,
                    req.cookie,
                    EINVAL,
                    "no metadata context was negotiated",
                )?,
                CMD_BLOCK_STATUS => tx.send(req).map_err(|_| invalid("workers stopped"))?,
                CMD_WRITE => {
                    // The payload must be consumed whatever the answer.
                    if req.len > MAX_PAYLOAD {
                        return Err(invalid("write payload too large"));
                    }
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
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    match result {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        r => r,
    }
}

fn write_zeroes(export: &dyn Export, mut offset: u64, len: u32) -> Result<(), ExportError> {
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
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
            let mut w = wr.lock().expect("writer");
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
    let mut w = wr.lock().expect("writer");
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

fn do_read(
    wr: &Writer,
    export: &dyn Export,
    req: &Request,
    structured: bool,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    buf.clear();
    buf.resize(req.len as usize, 0);
    if let Err(e) = export.read_at(buf, req.offset) {
        warn!(offset = req.offset, len = req.len, error = %e, "read failed");
        return reply_error(wr, structured, req.cookie, EIO, &e.to_string());
    }
    let mut w = wr.lock().expect("writer");
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
    w.write_all(buf)?;
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
        if req.flags & CMD_FLAG_REQ_ONE != 0 || body.len() > (1 << 20) {
            break;
        }
    }
    let mut w = wr.lock().expect("writer");
    w.write_all(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        body.len() as u32,
    ))?;
    w.write_all(&body)?;
    w.flush()
}
