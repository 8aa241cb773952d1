//! Where `serve-nbd` listens, and so who can connect to it.
//!
//! The export is the decrypted disk (and, with an overlay, writable), so the
//! default is a unix socket only its owner can use: mode 0600, in a new private
//! directory (0700). `--socket PATH` puts the socket at PATH, still 0600; it
//! never deletes what is there unless it is a socket nobody listens on. TCP is
//! served only with TLS (`NBD_OPT_STARTTLS`, x509; with a CA, clients need a
//! certificate it signed), or without any access control when the user says
//! `--insecure`, with a warning.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;

use super::server::Listener;
use super::tls::{TlsError, TlsFiles};

/// Where to listen, as the user asked.
#[derive(Debug, Clone, Default)]
pub struct ListenOptions {
    /// A unix socket at this path (default: a new private directory).
    pub socket: Option<PathBuf>,
    /// A TCP address (`HOST:PORT`; port 0 picks a free one).
    pub tcp: Option<String>,
    /// TLS credentials; with them every client must speak TLS.
    pub tls: Option<TlsFiles>,
    /// Serve TCP without TLS: anyone who can reach the port can connect.
    pub insecure: bool,
}

impl ListenOptions {
    /// The checks that need no socket, so a command can fail before it does
    /// any slow work: TCP needs TLS or an explicit `--insecure`.
    pub fn check(&self) -> Result<(), ListenError> {
        match &self.tcp {
            Some(addr) if self.tls.is_none() && !self.insecure => {
                Err(ListenError::TcpNeedsTls { addr: addr.clone() })
            }
            _ => Ok(()),
        }
    }
}

/// Why the server could not listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "refusing to serve on TCP {addr} without access control: anyone who can reach it could read the decrypted disk. \
         Give --tls-cert and --tls-key (and --tls-ca to require client certificates), \
         or --insecure to serve without TLS anyway, \
         or leave out --listen to serve on a unix socket only you can use (or --socket PATH)"
    )]
    TcpNeedsTls { addr: String },
    #[error(
        "{} exists and is {kind}, not a socket; ferry will not delete it: choose another --socket path, or remove it yourself",
        path.display()
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("another server is listening on {}; stop it or choose another --socket path", path.display())]
    SocketInUse { path: PathBuf },
    #[error("cannot tell whether the socket {} is still in use: {source}; remove it yourself if it is stale", path.display())]
    SocketCheck {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {what}: {source}")]
    Bind {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl ListenError {
    /// Whether the user asked for something that cannot be done (exit code 2),
    /// rather than the system failing.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ListenError::TcpNeedsTls { .. }
                | ListenError::NotASocket { .. }
                | ListenError::SocketInUse { .. }
                | ListenError::Tls(_)
        )
    }
}

/// A listening socket, ready for [`super::server::Server::serve`].
pub struct Bound {
    pub listener: Listener,
    /// The URL clients use (`nbd`, `nbds`, `nbd+unix` or `nbds+unix`).
    pub url: String,
    /// The TLS configuration the server must require, if any.
    pub tls: Option<Arc<ServerConfig>>,
    /// What to tell the user on stderr before serving.
    pub warning: Option<String>,
    /// The unix socket's path.
    pub socket: Option<PathBuf>,
    /// The private directory made for the default socket (removed on drop).
    _dir: Option<tempfile::TempDir>,
}

/// Listen as `opts` says, for an export named `name`.
pub fn bind(opts: &ListenOptions, name: &str) -> Result<Bound, ListenError> {
    opts.check()?;
    let tls = opts.tls.as_ref().map(|t| t.server_config()).transpose()?;
    let s = if tls.is_some() { "s" } else { "" };
    if let Some(addr) = &opts.tcp {
        let l = std::net::TcpListener::bind(addr).map_err(|source| ListenError::Bind {
            what: addr.clone(),
            source,
        })?;
        let local = l.local_addr().map_err(|source| ListenError::Bind {
            what: addr.clone(),
            source,
        })?;
        let url = format!("nbd{s}://{local}/{name}");
        let warning = tls.is_none().then(|| {
            format!(
                "warning: serving {url} over TCP without TLS (--insecure): anyone who can reach {local} \
                 can read the decrypted disk, and write to it when it is served with --overlay"
            )
        });
        return Ok(Bound {
            listener: Listener::Tcp(l),
            url,
            tls,
            warning,
            socket: None,
            _dir: None,
        });
    }
    let (path, dir) = match &opts.socket {
        Some(p) => {
            clear_stale(p)?;
            (p.clone(), None)
        }
        None => {
            let base = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .filter(|d| d.is_dir())
                .unwrap_or_else(std::env::temp_dir);
            let dir = tempfile::Builder::new()
                .prefix("ferry-nbd-")
                .permissions(std::fs::Permissions::from_mode(0o700))
                .tempdir_in(&base)
                .map_err(|source| ListenError::Bind {
                    what: format!("a new directory in {}", base.display()),
                    source,
                })?;
            (dir.path().join("nbd.sock"), Some(dir))
        }
    };
    let listener = bind_private(&path)?;
    Ok(Bound {
        listener: Listener::Unix(listener),
        url: format!("nbd{s}+unix:///{name}?socket={}", path.display()),
        tls,
        warning: None,
        socket: Some(path),
        _dir: dir,
    })
}

/// Make room at `path`: nothing there, or a socket nobody listens on (left by
/// a server that is gone), which is removed. Anything else stays untouched.
fn clear_stale(path: &Path) -> Result<(), ListenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenError::SocketCheck {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let t = meta.file_type();
    if !t.is_socket() {
        let kind = if t.is_file() {
            "a regular file"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_symlink() {
            "a symbolic link"
        } else {
            "not a socket"
        };
        return Err(ListenError::NotASocket {
            path: path.to_path_buf(),
            kind,
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ListenError::SocketInUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| ListenError::SocketCheck {
                path: path.to_path_buf(),
                source,
            }),
        Err(source) => Err(ListenError::SocketCheck {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Bind a unix socket at `path` that only its owner can connect to, without a
/// moment when it is open to others: it is bound in a private directory
/// beside `path`, made 0600, then linked into place (`link` never replaces
/// what may have appeared at `path` meanwhile).
fn bind_private(path: &Path) -> Result<UnixListener, ListenError> {
    let bind_err = |source| ListenError::Bind {
        what: path.display().to_string(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".ferry-nbd-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(bind_err)?;
    let staged = tmp.path().join("s");
    let l = UnixListener::bind(&staged).map_err(bind_err)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    match std::fs::hard_link(&staged, path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(ListenError::NotASocket {
                path: path.to_path_buf(),
                kind: "something created while the server started",
            });
        }
        Err(e) => return Err(bind_err(e)),
    }
    // The staged name and its directory go; the socket stays at `path`.
    let _ = std::fs::remove_file(&staged);
    drop(tmp);
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn the_default_is_a_private_unix_socket() {
        let b = bind(&ListenOptions::default(), "disk0").unwrap();
        let sock = b.socket.clone().unwrap();
        assert_eq!(mode(&sock), 0o600, "socket mode");
        assert_eq!(mode(sock.parent().unwrap()), 0o700, "directory mode");
        assert!(b.url.starts_with("nbd+unix:///disk0?socket="), "{}", b.url);
        assert!(b.warning.is_none());
        UnixStream::connect(&sock).unwrap();
    }

    #[test]
    fn an_explicit_socket_is_0600_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.sock");
        // A socket left by a server that is gone.
        drop(UnixListener::bind(&p).unwrap());
        let b = bind(
            &ListenOptions {
                socket: Some(p.clone()),
                ..Default::default()
            },
            "d",
        )
        .unwrap();
        assert_eq!(mode(&p), 0o600);
        UnixStream::connect(&p).unwrap();
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // While it listens, a second server is refused.
        let e = bind(
            &ListenOptions {
                socket: Some(p.clone()),
                ..Default::default()
            },
            "d",
        )
        .err()
        .unwrap();
        assert!(matches!(e, ListenError::SocketInUse { .. }), "{e}");
        drop(b);
    }

    #[test]
    fn a_file_at_the_socket_path_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("precious.img");
        std::fs::write(&p, b"do not delete").unwrap();
        let e = bind(
            &ListenOptions {
                socket: Some(p.clone()),
                ..Default::default()
            },
            "d",
        )
        .err()
        .unwrap();
        let msg = e.to_string();
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(msg.contains("a regular file, not a socket"), "{msg}");
        assert!(e.is_usage());
        assert_eq!(std::fs::read(&p).unwrap(), b"do not delete");
        // A symbolic link is not followed or removed either.
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = bind(
            &ListenOptions {
                socket: Some(link.clone()),
                ..Default::default()
            },
            "d",
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("a symbolic link"), "{e}");
        assert!(std::fs::symlink_metadata(&link).is_ok());
    }

    #[test]
    fn tcp_without_tls_needs_insecure() {
        let e = bind(
            &ListenOptions {
                tcp: Some("127.0.0.1:0".into()),
                ..Default::default()
            },
            "d",
        )
        .err()
        .unwrap();
        let msg = e.to_string();
        for choice in ["--tls-cert", "--tls-key", "--insecure", "--socket"] {
            assert!(msg.contains(choice), "{msg}");
        }
        let b = bind(
            &ListenOptions {
                tcp: Some("127.0.0.1:0".into()),
                insecure: true,
                ..Default::default()
            },
            "d",
        )
        .unwrap();
        assert!(b.url.starts_with("nbd://127.0.0.1:"), "{}", b.url);
        assert!(b.warning.unwrap().contains("without TLS"));
    }
}
