//! A blocking NBD client: fixed-newstyle handshake, `NBD_OPT_GO`, structured
//! replies, metadata contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`) with
//! `NBD_CMD_BLOCK_STATUS`, and pipelined reads (up to [`WINDOW`] requests in
//! flight) over TCP or a unix socket.
//!
//! The peer is not trusted: every length is bounded before anything is allocated,
//! every reply chunk must fall inside the request it answers and must not overlap
//! another, and a reply that breaks the protocol is an error, never a panic.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::proto::*;
use super::{Addr, NbdError, NbdUrl};

/// Requests in flight during a read.
pub const WINDOW: usize = 64;
/// The size of one read request unless the server prefers less.
pub const REQUEST_SIZE: u32 = 2 << 20;
/// How long a reply may take before the server is considered gone.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest block-status reply accepted (each descriptor is 8 bytes).
const MAX_STATUS_REPLY: u32 = 16 << 20;

pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}
impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl Stream {
    /// The socket's receive timeout (`SO_RCVTIMEO`): shared by every clone.
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// The socket's send timeout (`SO_SNDTIMEO`): shared by every clone.
    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Ends both directions, waking any thread blocked on the socket.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// Preferred and maximum request sizes, when the server said.
    pub preferred_block: Option<u32>,
    pub max_block: Option<u32>,
}

/// One connection to one export.
pub struct Client {
    rd: BufReader<Stream>,
    wr: BufWriter<Stream>,
    /// `nbd://…` without secrets, for messages.
    pub label: String,
    pub info: ExportInfo,
    structured: bool,
    contexts: HashMap<String, u32>,
    next_cookie: u64,
}

struct Pending {
    /// Which of the caller's buffers it fills.
    buf: usize,
    /// Where the request starts on the export, and where in the caller's buffer.
    offset: u64,
    at: usize,
    len: usize,
    /// Byte ranges of the request already filled, relative to `offset`.
    filled: Vec<(usize, usize)>,
    error: Option<NbdError>,
}

impl Client {
    /// Connect, negotiate, and open the export; `contexts` are metadata contexts
    /// to ask for (each must be granted, except `base:allocation`, which is optional).
    pub fn connect(url: &NbdUrl, contexts: &[String]) -> Result<Client, NbdError> {
        let label = url.to_string();
        let io_err = |e: io::Error| NbdError::io(&label, "connecting", e);
        let stream = match &url.addr {
            Addr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).map_err(io_err)?;
                s.set_nodelay(true).map_err(io_err)?;
                s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io_err)?;
                Stream::Tcp(s)
            }
            Addr::Unix(path) => {
                let s = UnixStream::connect(path).map_err(io_err)?;
                s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io_err)?;
                Stream::Unix(s)
            }
        };
        let wr = BufWriter::new(stream.try_clone().map_err(io_err)?);
        let mut c = Client {
            rd: BufReader::with_capacity(256 * 1024, stream),
            wr,
            label,
            info: ExportInfo {
                size: 0,
                flags: 0,
                preferred_block: None,
                max_block: None,
            },
            structured: false,
            contexts: HashMap::new(),
            next_cookie: 1,
        };
        c.handshake(&url.export, contexts)
            .map_err(|e| e.during(&c.label, "the handshake"))?;
        Ok(c)
    }

    fn proto(&self, what: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            server: self.label.clone(),
            detail: what.into(),
        }
    }

    fn handshake(&mut self, export: &str, contexts: &[String]) -> Result<(), NbdError> {
        let magic = read_u64(&mut self.rd)?;
        if magic != NBDMAGIC {
            return Err(self.proto("it is not an NBD server (no NBDMAGIC)"));
        }
        let style = read_u64(&mut self.rd)?;
        if style != IHAVEOPT {
            return Err(self.proto(
                "the server speaks the old-style handshake, which has no export names or block status",
            ));
        }
        let hflags = read_u16(&mut self.rd)?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.proto("the server does not speak fixed-newstyle negotiation"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.wr.write_all(&cflags.to_be_bytes())?;

        // Structured replies: needed for block status and sparse reads.
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        self.structured = kind == REP_ACK;

        if !contexts.is_empty() && self.structured {
            let mut data = Vec::new();
            put_string(&mut data, export);
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                put_string(&mut data, q);
            }
            self.send_option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (kind, payload) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_ACK => break,
                    REP_META_CONTEXT => {
                        let mut cur = Cursor(&payload);
                        let id = cur
                            .u32()
                            .ok_or_else(|| self.proto("short NBD_REP_META_CONTEXT"))?;
                        let name = String::from_utf8(cur.rest().to_vec())
                            .map_err(|_| self.proto("a context name that is not UTF-8"))?;
                        self.contexts.insert(name, id);
                    }
                    k if k & (1 << 31) != 0 => break,
                    k => return Err(self.proto(format!("unexpected option reply {k}"))),
                }
            }
        }
        for q in contexts {
            if q != CTX_BASE_ALLOCATION && !self.contexts.contains_key(q) {
                return Err(NbdError::NoContext {
                    server: self.label.clone(),
                    context: q.clone(),
                });
            }
        }

        // NBD_OPT_GO, asking for block sizes.
        let mut data = Vec::new();
        put_string(&mut data, export);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut got_export = false;
        loop {
            let (kind, payload) = self.option_reply(OPT_GO)?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    let mut cur = Cursor(&payload);
                    match cur.u16() {
                        Some(INFO_EXPORT) => {
                            let (Some(size), Some(flags)) = (cur.u64(), cur.u16()) else {
                                return Err(self.proto("short NBD_INFO_EXPORT"));
                            };
                            self.info.size = size;
                            self.info.flags = flags;
                            got_export = true;
                        }
                        Some(INFO_BLOCK_SIZE) => {
                            let (Some(_min), Some(pref), Some(max)) =
                                (cur.u32(), cur.u32(), cur.u32())
                            else {
                                return Err(self.proto("short NBD_INFO_BLOCK_SIZE"));
                            };
                            self.info.preferred_block = Some(pref);
                            self.info.max_block = Some(max);
                        }
                        _ => {}
                    }
                }
                REP_ERR_UNKNOWN => {
                    return Err(NbdError::NoExport {
                        server: self.label.clone(),
                        export: export.to_string(),
                    });
                }
                REP_ERR_TLS_REQD => {
                    return Err(
                        self.proto("the server requires TLS, which ferry does not speak yet")
                    );
                }
                REP_ERR_POLICY => {
                    // The server's own words say why (e.g. too many connections).
                    let msg = String::from_utf8_lossy(&payload);
                    return Err(self.proto(format!(
                        "the server refused export {export:?} by policy: {msg}"
                    )));
                }
                k if k & (1 << 31) != 0 => {
                    let msg = String::from_utf8_lossy(&payload).into_owned();
                    return Err(self.proto(format!("NBD_OPT_GO was refused ({k:#x}): {msg}")));
                }
                k => return Err(self.proto(format!("unexpected option reply {k}"))),
            }
        }
        if !got_export {
            return Err(self.proto("NBD_OPT_GO finished without the export's size"));
        }
        Ok(())
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.wr.write_all(&b)?;
        self.wr.flush()?;
        Ok(())
    }

    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), NbdError> {
        if read_u64(&mut self.rd)? != OPT_REPLY_MAGIC {
            return Err(self.proto("bad option reply magic"));
        }
        let got = read_u32(&mut self.rd)?;
        if got != opt {
            return Err(self.proto(format!("a reply to option {got} when {opt} was asked")));
        }
        let kind = read_u32(&mut self.rd)?;
        let len = read_u32(&mut self.rd)?;
        let data = read_bounded(&mut self.rd, len, MAX_OPTION_LEN, "an option reply")?;
        Ok((kind, data))
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.contains_key(name)
    }

    fn request_size(&self) -> u32 {
        let mut n = REQUEST_SIZE;
        if let Some(max) = self.info.max_block.filter(|m| *m >= 512) {
            n = n.min(max);
        }
        n.min(MAX_PAYLOAD)
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    /// Fill `buf` from `offset`, with many requests in flight.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        self.read_many(&mut [(offset, buf)])
    }

    /// Fill each buffer from its offset, with up to [`WINDOW`] requests in flight
    /// across all of them.
    pub fn read_many(&mut self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), NbdError> {
        for (offset, buf) in reqs.iter() {
            if offset
                .checked_add(buf.len() as u64)
                .is_none_or(|e| e > self.info.size)
            {
                return Err(NbdError::OutOfRange {
                    server: self.label.clone(),
                    offset: *offset,
                    len: buf.len() as u64,
                    size: self.info.size,
                });
            }
        }
        let step = self.request_size() as usize;
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        // The next request to send: which buffer, and how far into it.
        let (mut next_buf, mut next_at) = (0usize, 0usize);
        let mut first_error: Option<NbdError> = None;
        loop {
            // Keep the window full.
            let mut out = Vec::new();
            while pending.len() < WINDOW && next_buf < reqs.len() {
                let (offset, buf) = &reqs[next_buf];
                if next_at >= buf.len() {
                    next_buf += 1;
                    next_at = 0;
                    continue;
                }
                let len = step.min(buf.len() - next_at);
                let cookie = self.cookie();
                let off = offset + next_at as u64;
                encode_request(&mut out, 0, CMD_READ, cookie, off, len as u32);
                pending.insert(
                    cookie,
                    Pending {
                        buf: next_buf,
                        offset: off,
                        at: next_at,
                        len,
                        filled: Vec::new(),
                        error: None,
                    },
                );
                next_at += len;
            }
            if !out.is_empty() {
                self.wr.write_all(&out)?;
                self.wr.flush()?;
            }
            if pending.is_empty() {
                break;
            }
            let (cookie, done) = self.read_reply(&mut pending, reqs)?;
            if done {
                let p = pending.remove(&cookie).expect("pending request");
                if let Some(e) = p.error {
                    first_error.get_or_insert(e);
                } else {
                    let got: usize = p.filled.iter().map(|(a, b)| b - a).sum();
                    if got != p.len {
                        return Err(self.proto(format!(
                            "the read at {} was answered with {got} of {} bytes",
                            p.offset, p.len
                        )));
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Read one reply chunk for a pending read; returns its cookie and whether the
    /// request is complete.
    fn read_reply(
        &mut self,
        pending: &mut HashMap<u64, Pending>,
        reqs: &mut [(u64, &mut [u8])],
    ) -> Result<(u64, bool), NbdError> {
        let magic = read_u32(&mut self.rd)?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let errno = read_u32(&mut self.rd)?;
                let cookie = read_u64(&mut self.rd)?;
                let Some(p) = pending.get_mut(&cookie) else {
                    return Err(self.proto(format!("a reply for unknown request {cookie}")));
                };
                if errno != 0 {
                    p.error = Some(NbdError::Server {
                        server: self.label.clone(),
                        errno,
                        message: format!("reading {} bytes at {}", p.len, p.offset),
                    });
                    return Ok((cookie, true));
                }
                if self.structured {
                    return Err(
                        self.proto("a simple reply with data after structured replies were agreed")
                    );
                }
                let (at, len) = (p.at, p.len);
                self.rd.read_exact(&mut reqs[p.buf].1[at..at + len])?;
                p.filled.push((0, len));
                Ok((cookie, true))
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = read_u16(&mut self.rd)?;
                let kind = read_u16(&mut self.rd)?;
                let cookie = read_u64(&mut self.rd)?;
                let len = read_u32(&mut self.rd)?;
                let done = flags & REPLY_FLAG_DONE != 0;
                let label = self.label.clone();
                let proto = |d: String| NbdError::Protocol {
                    server: label.clone(),
                    detail: d,
                };
                let Some(p) = pending.get_mut(&cookie) else {
                    return Err(proto(format!("a reply for unknown request {cookie}")));
                };
                match kind {
                    REPLY_TYPE_NONE => {
                        if len != 0 || !done {
                            return Err(proto(
                                "a NONE chunk with a payload or without DONE".into(),
                            ));
                        }
                    }
                    REPLY_TYPE_OFFSET_DATA => {
                        if len < 8 {
                            return Err(proto("a short OFFSET_DATA chunk".into()));
                        }
                        let off = read_u64(&mut self.rd)?;
                        let n = (len - 8) as usize;
                        let rel = fit(p, off, n as u64).ok_or_else(|| {
                            proto(format!(
                                "data for {n} bytes at {off}, outside the read of {} bytes at {}, or overlapping",
                                p.len, p.offset
                            ))
                        })?;
                        let at = p.at + rel;
                        self.rd.read_exact(&mut reqs[p.buf].1[at..at + n])?;
                        p.filled.push((rel, rel + n));
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        if len != 12 {
                            return Err(proto("an OFFSET_HOLE chunk that is not 12 bytes".into()));
                        }
                        let off = read_u64(&mut self.rd)?;
                        let n = read_u32(&mut self.rd)? as usize;
                        let rel = fit(p, off, n as u64).ok_or_else(|| {
                            proto(format!(
                                "a hole of {n} bytes at {off}, outside the read of {} bytes at {}, or overlapping",
                                p.len, p.offset
                            ))
                        })?;
                        let at = p.at + rel;
                        reqs[p.buf].1[at..at + n].fill(0);
                        p.filled.push((rel, rel + n));
                    }
                    REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                        let body =
                            read_bounded(&mut self.rd, len, MAX_OPTION_LEN, "an error chunk")?;
                        let (errno, msg) = parse_error(&body)
                            .ok_or_else(|| proto("a malformed error chunk".into()))?;
                        p.error.get_or_insert(NbdError::Server {
                            server: self.label.clone(),
                            errno,
                            message: if msg.is_empty() {
                                format!("reading {} bytes at {}", p.len, p.offset)
                            } else {
                                msg
                            },
                        });
                    }
                    k => {
                        return Err(proto(format!("unexpected reply chunk type {k} to a read")));
                    }
                }
                Ok((cookie, done))
            }
            m => Err(self.proto(format!("bad reply magic {m:#x}"))),
        }
    }

    /// The extents of `context` over `[offset, offset + len)`, as `(start, end,
    /// flags)` in order, merged where neighbours have the same flags.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, u32)>, NbdError> {
        let Some(&ctx) = self.contexts.get(context) else {
            return Err(NbdError::NoContext {
                server: self.label.clone(),
                context: context.to_string(),
            });
        };
        let end = offset.saturating_add(len).min(self.info.size);
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(1 << 30) as u32;
            let cookie = self.cookie();
            let mut req = Vec::new();
            encode_request(&mut req, 0, CMD_BLOCK_STATUS, cookie, pos, ask);
            self.wr.write_all(&req)?;
            self.wr.flush()?;
            let mut covered = 0u64;
            let mut error = None;
            loop {
                let magic = read_u32(&mut self.rd)?;
                if magic == SIMPLE_REPLY_MAGIC {
                    let errno = read_u32(&mut self.rd)?;
                    let c = read_u64(&mut self.rd)?;
                    if c != cookie {
                        return Err(self.proto("a reply for an unknown request"));
                    }
                    if errno == 0 {
                        return Err(self.proto("a simple reply to NBD_CMD_BLOCK_STATUS"));
                    }
                    return Err(NbdError::Server {
                        server: self.label.clone(),
                        errno,
                        message: format!("block status of {context}"),
                    });
                }
                if magic != STRUCTURED_REPLY_MAGIC {
                    return Err(self.proto(format!("bad reply magic {magic:#x}")));
                }
                let flags = read_u16(&mut self.rd)?;
                let kind = read_u16(&mut self.rd)?;
                let c = read_u64(&mut self.rd)?;
                let n = read_u32(&mut self.rd)?;
                if c != cookie {
                    return Err(self.proto("a reply for an unknown request"));
                }
                let body = read_bounded(&mut self.rd, n, MAX_STATUS_REPLY, "a block status reply")?;
                match kind {
                    REPLY_TYPE_BLOCK_STATUS => {
                        let descs = parse_block_status(&body)
                            .ok_or_else(|| self.proto("a malformed block status chunk"))?;
                        if descs.0 == ctx && covered == 0 {
                            let mut at = pos;
                            for (l, f) in descs.1 {
                                if at >= pos + ask as u64 {
                                    break;
                                }
                                let e = (at + l as u64).min(pos + ask as u64);
                                push_merged(&mut out, at, e, f);
                                at = e;
                            }
                            covered = at - pos;
                        }
                    }
                    REPLY_TYPE_NONE => {}
                    REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                        let (errno, msg) = parse_error(&body)
                            .ok_or_else(|| self.proto("a malformed error chunk"))?;
                        error.get_or_insert(NbdError::Server {
                            server: self.label.clone(),
                            errno,
                            message: msg,
                        });
                    }
                    k => {
                        return Err(
                            self.proto(format!("unexpected chunk type {k} to block status"))
                        );
                    }
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            if let Some(e) = error {
                return Err(e);
            }
            if covered == 0 {
                return Err(self.proto(format!(
                    "block status of {context} at {pos} described no bytes"
                )));
            }
            pos += covered;
        }
        Ok(out)
    }

    /// Whether the server lets this client write (the export is not read-only).
    pub fn writable(&self) -> bool {
        self.info.flags & TFLAG_READ_ONLY == 0
    }

    /// Write `buf` at `offset`, with up to [`WINDOW`] requests in flight.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), NbdError> {
        self.check_write(offset, buf.len() as u64)?;
        let step = self.request_size() as usize;
        let cmds = buf.chunks(step).enumerate().map(|(i, part)| {
            let off = offset + (i * step) as u64;
            (CMD_WRITE, off, part.len() as u32, Some(part))
        });
        self.commands("writing", cmds)
    }

    /// Make `[offset, offset + len)` read as zeros: `NBD_CMD_WRITE_ZEROES`
    /// where the server offers it, else written zeros.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_write(offset, len)?;
        if self.info.flags & TFLAG_SEND_WRITE_ZEROES != 0 {
            let step = u64::from(self.request_size());
            let cmds = (0..len.div_ceil(step)).map(|i| {
                let off = offset + i * step;
                (
                    CMD_WRITE_ZEROES,
                    off,
                    (len - i * step).min(step) as u32,
                    None,
                )
            });
            return self.commands("zeroing", cmds);
        }
        let zeros = vec![0u8; (self.request_size() as u64).min(len) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Ask the server to make what was written durable (`NBD_CMD_FLUSH`,
    /// when it offers it).
    pub fn flush(&mut self) -> Result<(), NbdError> {
        if self.info.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.commands("flushing", std::iter::once((CMD_FLUSH, 0, 0, None)))
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        if !self.writable() {
            return Err(NbdError::Protocol {
                server: self.label.clone(),
                detail: "the export is read-only; export it writable (qemu-nbd without -r)".into(),
            });
        }
        if offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(NbdError::OutOfRange {
                server: self.label.clone(),
                offset,
                len,
                size: self.info.size,
            });
        }
        Ok(())
    }

    /// Sends commands that answer with no data (write, write zeroes, flush),
    /// up to [`WINDOW`] in flight, and waits for every answer; the first
    /// error the server reports is returned.
    fn commands<'b>(
        &mut self,
        doing: &str,
        cmds: impl Iterator<Item = (u16, u64, u32, Option<&'b [u8]>)>,
    ) -> Result<(), NbdError> {
        let mut cmds = cmds.peekable();
        let mut pending: HashMap<u64, (u64, u32)> = HashMap::new();
        let mut first_error: Option<NbdError> = None;
        loop {
            while pending.len() < WINDOW
                && let Some((cmd, off, len, data)) = cmds.next()
            {
                let cookie = self.cookie();
                let mut head = Vec::with_capacity(28);
                encode_request(&mut head, 0, cmd, cookie, off, len);
                self.wr.write_all(&head)?;
                if let Some(d) = data {
                    self.wr.write_all(d)?;
                }
                pending.insert(cookie, (off, len));
            }
            self.wr.flush()?;
            if pending.is_empty() {
                break;
            }
            let (cookie, done, errno, msg) = self.read_ack()?;
            let Some(&(off, len)) = pending.get(&cookie) else {
                return Err(self.proto(format!("a reply for unknown request {cookie}")));
            };
            if errno != 0 {
                first_error.get_or_insert(NbdError::Server {
                    server: self.label.clone(),
                    errno,
                    message: if msg.is_empty() {
                        format!("{doing} {len} bytes at {off}")
                    } else {
                        msg
                    },
                });
            }
            if done {
                pending.remove(&cookie);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One reply to a command that returns no data: its cookie, whether it is
    /// the last chunk, and the error it reports (0 for none).
    fn read_ack(&mut self) -> Result<(u64, bool, u32, String), NbdError> {
        match read_u32(&mut self.rd)? {
            SIMPLE_REPLY_MAGIC => {
                let errno = read_u32(&mut self.rd)?;
                let cookie = read_u64(&mut self.rd)?;
                Ok((cookie, true, errno, String::new()))
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = read_u16(&mut self.rd)?;
                let kind = read_u16(&mut self.rd)?;
                let cookie = read_u64(&mut self.rd)?;
                let len = read_u32(&mut self.rd)?;
                let body = read_bounded(&mut self.rd, len, MAX_OPTION_LEN, "a reply chunk")?;
                let done = flags & REPLY_FLAG_DONE != 0;
                match kind {
                    REPLY_TYPE_NONE if body.is_empty() => Ok((cookie, done, 0, String::new())),
                    REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                        let (errno, msg) = parse_error(&body)
                            .ok_or_else(|| self.proto("a malformed error chunk"))?;
                        Ok((cookie, done, errno.max(1), msg))
                    }
                    k => Err(self.proto(format!(
                        "unexpected reply chunk type {k} to a command without data"
                    ))),
                }
            }
            m => Err(self.proto(format!("bad reply magic {m:#x}"))),
        }
    }

    /// Say goodbye; the server closes the connection.
    pub fn disconnect(mut self) {
        let mut req = Vec::new();
        let cookie = self.cookie();
        encode_request(&mut req, 0, CMD_DISC, cookie, 0, 0);
        let _ = self.wr.write_all(&req);
        let _ = self.wr.flush();
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Where a reply chunk of `n` bytes at export offset `off` lands inside the
/// request, if it lies inside it and overlaps nothing already filled.
fn fit(p: &Pending, off: u64, n: u64) -> Option<usize> {
    let rel = off.checked_sub(p.offset)?;
    let end = rel.checked_add(n)?;
    if end > p.len as u64 || n == 0 {
        return None;
    }
    let (rel, end) = (rel as usize, end as usize);
    if p.filled.iter().any(|&(a, b)| rel < b && a < end) {
        return None;
    }
    Some(rel)
}

/// An error chunk: errno, then a message of a given length (and maybe an offset).
pub(crate) fn parse_error(body: &[u8]) -> Option<(u32, String)> {
    let mut c = Cursor(body);
    let errno = c.u32()?;
    let n = c.u16()? as usize;
    let msg = String::from_utf8_lossy(c.take(n)?).into_owned();
    Some((errno, msg))
}

/// A block status chunk: the context id, then (length, flags) descriptors.
pub(crate) fn parse_block_status(body: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    let mut c = Cursor(body);
    let ctx = c.u32()?;
    if c.rest().is_empty() || c.rest().len() % 8 != 0 {
        return None;
    }
    let mut v = Vec::with_capacity(c.rest().len() / 8);
    while !c.is_empty() {
        let l = c.u32()?;
        let f = c.u32()?;
        if l == 0 {
            return None;
        }
        v.push((l, f));
    }
    Some((ctx, v))
}

fn push_merged(out: &mut Vec<(u64, u64, u32)>, a: u64, b: u64, f: u32) {
    if let Some(last) = out.last_mut()
        && last.1 == a
        && last.2 == f
    {
        last.1 = b;
        return;
    }
    out.push((a, b, f));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::TcpListener;

    /// A server that answers the client's negotiation as a good server would
    /// (when `good_handshake`), then sends `tail` and hangs up. It never reads
    /// what the client says: the answers are the same whatever it asks.
    fn fake(good_handshake: bool, tail: Vec<u8>) -> NbdUrl {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut out = Vec::new();
            out.extend_from_slice(&NBDMAGIC.to_be_bytes());
            if good_handshake {
                out.extend_from_slice(&IHAVEOPT.to_be_bytes());
                out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                write_opt_reply(&mut out, OPT_STRUCTURED_REPLY, REP_ACK, &[]).unwrap();
                let mut ctx = 7u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(CTX_BASE_ALLOCATION.as_bytes());
                write_opt_reply(&mut out, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx).unwrap();
                write_opt_reply(&mut out, OPT_SET_META_CONTEXT, REP_ACK, &[]).unwrap();
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
                write_opt_reply(&mut out, OPT_GO, REP_INFO, &info).unwrap();
                write_opt_reply(&mut out, OPT_GO, REP_ACK, &[]).unwrap();
            }
            out.extend_from_slice(&tail);
            let _ = s.write_all(&out);
            // Let the client read everything before the connection closes.
            std::thread::sleep(Duration::from_millis(20));
        });
        NbdUrl {
            addr: Addr::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            export: "x".into(),
            bitmap: None,
        }
    }

    fn exercise(url: &NbdUrl) {
        let Ok(mut c) = Client::connect(url, &[CTX_BASE_ALLOCATION.to_string()]) else {
            return;
        };
        let mut buf = vec![0u8; 3 << 20];
        let _ = c.read_at(&mut buf, 0);
        let _ = c.block_status(CTX_BASE_ALLOCATION, 0, 1 << 20);
    }

    /// Structured reply chunks with the right magic and hostile fields, for the
    /// cookies the client uses first (1, 2, …).
    fn chunk() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u16>(),
            prop_oneof![
                Just(0u16),
                Just(1),
                Just(2),
                Just(5),
                Just(32769),
                Just(32770),
                any::<u16>()
            ],
            0u64..4,
            prop_oneof![Just(0u32), Just(8), Just(12), Just(4104), any::<u32>()],
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(flags, kind, cookie, len, body)| {
                let mut v = structured_header(flags, kind, cookie, len).to_vec();
                v.extend_from_slice(&body);
                v
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn hostile_handshakes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            exercise(&fake(false, tail));
        }

        #[test]
        fn hostile_replies_never_panic(
            chunks in proptest::collection::vec(chunk(), 0..6),
            junk in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let mut tail: Vec<u8> = chunks.concat();
            tail.extend_from_slice(&junk);
            exercise(&fake(true, tail));
        }
    }

    #[test]
    fn a_reply_outside_its_request_is_refused() {
        // OFFSET_DATA for cookie 1 that claims bytes past the request.
        let mut tail =
            structured_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, 8 + 16).to_vec();
        tail.extend_from_slice(&((3u64 << 20) - 8).to_be_bytes());
        tail.extend_from_slice(&[0u8; 16]);
        let mut c = Client::connect(&fake(true, tail), &[CTX_BASE_ALLOCATION.to_string()]).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = c.read_at(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("outside the read"), "{e}");
    }

    #[test]
    fn a_block_status_reply_is_parsed_and_merged() {
        let mut body = 7u32.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 0u32), (4096, 0), (8192, 3)] {
            body.extend_from_slice(&l.to_be_bytes());
            body.extend_from_slice(&f.to_be_bytes());
        }
        let mut tail = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            1,
            body.len() as u32,
        )
        .to_vec();
        tail.extend_from_slice(&body);
        let mut c = Client::connect(&fake(true, tail), &[CTX_BASE_ALLOCATION.to_string()]).unwrap();
        let got = c.block_status(CTX_BASE_ALLOCATION, 0, 16384).unwrap();
        assert_eq!(got, vec![(0, 8192, 0), (8192, 16384, 3)]);
    }
}
