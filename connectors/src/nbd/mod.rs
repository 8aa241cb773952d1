//! NBD: a client that reads exports (a backup source with change tracking through
//! `qemu:dirty-bitmap:NAME`), and a server that exports recovery points
//! (instant restore, [`server`]).
//!
//! URLs follow the NBD URI convention:
//! `nbd://HOST[:PORT][/EXPORT][?bitmap=NAME]` and
//! `nbd+unix:///EXPORT?socket=PATH[&bitmap=NAME]`.

pub mod client;
pub mod listen;
pub mod point_export;
pub mod proto;
pub mod server;
pub mod sink;
pub mod tls;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

use ferry_agent::source::{BlockSource, ChangeMap};
use ferry_agent::{Error, Result};

pub use client::Client;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed `nbd://` or `nbd+unix://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    pub addr: Addr,
    pub export: String,
    /// The dirty bitmap that holds the changes since the source's latest point.
    pub bitmap: Option<String>,
}

pub const DEFAULT_PORT: u16 = 10809;

impl NbdUrl {
    pub fn is_nbd(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    pub fn parse(s: &str) -> std::result::Result<NbdUrl, String> {
        let bad = |why: &str| {
            format!(
                "{s:?} is not a valid NBD URL: {why} (nbd://HOST[:PORT]/EXPORT[?bitmap=NAME] or nbd+unix:///EXPORT?socket=PATH)"
            )
        };
        let (unix, rest) = if let Some(r) = s.strip_prefix("nbd+unix://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("nbd://") {
            (false, r)
        } else {
            return Err(bad("it must start with nbd:// or nbd+unix://"));
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in the export"))?;
        let mut bitmap = None;
        let mut socket = None;
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v).ok_or_else(|| bad("bad %-escape in the query"))?;
            match k {
                "bitmap" if !v.is_empty() => bitmap = Some(v),
                "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => return Err(bad(&format!("unknown or empty parameter {k:?}"))),
            }
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(bad("nbd+unix:// takes no host"));
            }
            Addr::Unix(socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?)
        } else {
            if socket.is_some() {
                return Err(bad("?socket= is for nbd+unix://"));
            }
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                    h,
                    p.parse::<u16>()
                        .map_err(|_| bad("the port is not a number"))?,
                ),
                _ => (authority, DEFAULT_PORT),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad("the host is missing"));
            }
            Addr::Tcp {
                host: host.to_string(),
                port,
            }
        };
        Ok(NbdUrl {
            addr,
            export,
            bitmap,
        })
    }

    /// The metadata context of the bitmap, if any.
    pub fn bitmap_context(&self) -> Option<String> {
        self.bitmap
            .as_ref()
            .map(|b| format!("{}{b}", proto::CTX_DIRTY_PREFIX))
    }
}

impl fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            Addr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)?
            }
            Addr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export)?,
            Addr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display())?,
        }
        Ok(())
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What went wrong talking to an NBD server.
#[derive(Debug)]
pub enum NbdError {
    Io {
        server: String,
        doing: String,
        source: io::Error,
    },
    /// The server broke the protocol (or is not an NBD server).
    Protocol {
        server: String,
        detail: String,
    },
    /// The server answered a request with an error.
    Server {
        server: String,
        errno: u32,
        message: String,
    },
    NoExport {
        server: String,
        export: String,
    },
    NoContext {
        server: String,
        context: String,
    },
    OutOfRange {
        server: String,
        offset: u64,
        len: u64,
        size: u64,
    },
}

impl NbdError {
    fn io(server: &str, doing: &str, source: io::Error) -> Self {
        NbdError::Io {
            server: server.to_string(),
            doing: doing.to_string(),
            source,
        }
    }

    /// Fill in the server and the phase of an error raised by a bare `?`.
    fn during(self, server: &str, doing: &str) -> Self {
        match self {
            NbdError::Io {
                server: s, source, ..
            } if s.is_empty() => NbdError::io(server, doing, source),
            e => e,
        }
    }
}

impl From<io::Error> for NbdError {
    fn from(source: io::Error) -> Self {
        NbdError::Io {
            server: String::new(),
            doing: String::new(),
            source,
        }
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdError::Io {
                server,
                doing,
                source,
            } => {
                let server = if server.is_empty() {
                    "the NBD server"
                } else {
                    server
                };
                let doing = if doing.is_empty() {
                    "talking to it"
                } else {
                    doing
                };
                if source.kind() == io::ErrorKind::UnexpectedEof {
                    write!(
                        f,
                        "{server} closed the connection during {doing}; is the export still there?"
                    )
                } else if matches!(
                    source.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    write!(
                        f,
                        "{server} did not answer within {} s during {doing}",
                        client::REPLY_TIMEOUT.as_secs()
                    )
                } else {
                    write!(f, "{server}: {doing}: {source}")
                }
            }
            NbdError::Protocol { server, detail } => {
                write!(f, "{server} broke the NBD protocol: {detail}")
            }
            NbdError::Server {
                server,
                errno,
                message,
            } => write!(
                f,
                "{server} answered {}: {message}",
                proto::errno_name(*errno)
            ),
            NbdError::NoExport { server, export } => write!(
                f,
                "{server} has no export named {export:?}; list them with `nbdinfo --list`"
            ),
            NbdError::NoContext { server, context } => write!(
                f,
                "{server} does not offer {context}; export the bitmap (qemu-nbd -B NAME, or `bitmaps` in block-export-add) and check its name"
            ),
            NbdError::OutOfRange {
                server,
                offset,
                len,
                size,
            } => write!(
                f,
                "a read of {len} bytes at {offset} is past the end of {server} ({size} bytes)"
            ),
        }
    }
}

impl std::error::Error for NbdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NbdError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl NbdError {
    /// As the data plane's error: a source that cannot be read.
    pub fn into_source_error(self, url: &str) -> Error {
        Error::Source {
            path: PathBuf::from(url),
            source: io::Error::other(self),
        }
    }
}

/// An NBD export as a backup source, with its allocation map and, given a
/// bitmap, its change map.
pub struct NbdSource {
    url: NbdUrl,
    label: String,
    client: Mutex<Client>,
    size: u64,
}

impl NbdSource {
    pub fn open(url: &NbdUrl) -> Result<NbdSource> {
        let label = url.to_string();
        let mut contexts = vec![proto::CTX_BASE_ALLOCATION.to_string()];
        contexts.extend(url.bitmap_context());
        let client = Client::connect(url, &contexts).map_err(|e| e.into_source_error(&label))?;
        Ok(NbdSource {
            url: url.clone(),
            size: client.size(),
            label,
            client: Mutex::new(client),
        })
    }

    fn err(&self, e: NbdError) -> Error {
        e.into_source_error(&self.label)
    }

    /// Extents of a context over the whole export.
    pub fn extents(&self, context: &str) -> Result<Vec<(u64, u64, u32)>> {
        self.client
            .lock()
            .expect("nbd client")
            .block_status(context, 0, self.size)
            .map_err(|e| self.err(e))
    }
}

impl BlockSource for NbdSource {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.client
            .lock()
            .expect("nbd client")
            .read_at(buf, offset)
            .map_err(|e| self.err(e))
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        self.client
            .lock()
            .expect("nbd client")
            .read_many(reqs)
            .map_err(|e| self.err(e))
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        if !self
            .client
            .lock()
            .expect("nbd client")
            .has_context(proto::CTX_BASE_ALLOCATION)
        {
            return Ok(vec![(0, self.size)]);
        }
        Ok(self
            .extents(proto::CTX_BASE_ALLOCATION)?
            .into_iter()
            // A hole that reads as zeros holds nothing; a hole that does not
            // (NBD_STATE_HOLE without NBD_STATE_ZERO) must still be read.
            .filter(|&(_, _, f)| f & proto::STATE_ZERO == 0)
            .map(|(a, b, _)| (a, b))
            .collect())
    }

    fn change_map(&self) -> Result<Option<ChangeMap>> {
        let Some(ctx) = self.url.bitmap_context() else {
            return Ok(None);
        };
        let ranges = self
            .extents(&ctx)?
            .into_iter()
            .filter(|&(_, _, f)| f & 1 != 0)
            .map(|(a, b, _)| (a, b))
            .collect();
        Ok(Some(ChangeMap {
            tracker: ctx,
            ranges,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = NbdUrl::parse("nbd://127.0.0.1:10900/disk0?bitmap=gen1").unwrap();
        assert_eq!(
            u.addr,
            Addr::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "disk0");
        assert_eq!(u.bitmap.as_deref(), Some("gen1"));
        assert_eq!(u.bitmap_context().unwrap(), "qemu:dirty-bitmap:gen1");
        let u = NbdUrl::parse("nbd://localhost").unwrap();
        assert_eq!(
            u.addr,
            Addr::Tcp {
                host: "localhost".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUrl::parse("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(
            u.addr,
            Addr::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        assert_eq!(u.export, "a b");
        let u = NbdUrl::parse("nbd+unix:///vda?socket=/run/x.sock&bitmap=b").unwrap();
        assert_eq!(u.addr, Addr::Unix("/run/x.sock".into()));
        assert_eq!(u.to_string(), "nbd+unix:///vda?socket=/run/x.sock");
        for bad in [
            "nbd+unix:///vda",
            "nbd://h:notaport/x",
            "nbd://h/x?what=1",
            "nbd:///x",
            "nbd://h/x?socket=/s",
            "http://h/x",
        ] {
            assert!(NbdUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
