//! TLS for the NBD server (`NBD_OPT_STARTTLS`, as QEMU and libnbd speak it with
//! x509 credentials), on rustls with the `ring` provider.
//!
//! The server's connection is read by one thread (requests) and written by
//! several (replies), so [`TlsStream`] shares one rustls connection behind a
//! mutex: the reader waits for ciphertext on the socket without the lock, then
//! takes it to decrypt; a writer takes it to encrypt and send.
//! PSK credentials are not offered: rustls has no TLS-PSK.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::client::Stream;

/// The files that make the server's TLS identity, in PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// With a CA, clients must present a certificate it signed.
    pub ca: Option<PathBuf>,
}

/// Why the TLS credentials could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} {}: {source}; check the file (PEM)", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the TLS {what} {} holds no {expect}; give a PEM file with one", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        expect: &'static str,
    },
    #[error("the TLS credentials ({}, {}) cannot be used: {source}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the CA certificate {} cannot be used to check clients: {detail}", path.display())]
    Ca { path: PathBuf, detail: String },
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expect: "certificate",
        });
    }
    Ok(certs)
}

impl TlsFiles {
    /// The server's rustls configuration: TLS 1.2 and 1.3 with rustls's safe
    /// defaults, and client certificates required when a CA is given.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs("certificate", &self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|source| match source {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
                what: "key",
                path: self.key.clone(),
                expect: "private key",
            },
            source => TlsError::Read {
                what: "key",
                path: self.key.clone(),
                source,
            },
        })?;
        let config_err = |source| TlsError::Config {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?;
        let builder = match &self.ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certs("CA certificate", ca)? {
                    roots.add(c).map_err(|e| TlsError::Ca {
                        path: ca.clone(),
                        detail: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::Ca {
                            path: ca.clone(),
                            detail: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        Ok(Arc::new(
            builder.with_single_cert(chain, key).map_err(config_err)?,
        ))
    }
}

/// One side of a TLS connection; clones share the session.
pub(crate) struct TlsStream {
    conn: Arc<Mutex<ServerConnection>>,
    sock: Stream,
    /// Ciphertext read from the socket that rustls has not taken yet.
    raw: Vec<u8>,
    raw_at: usize,
}

/// The TLS handshake on `sock`, within the socket's current timeouts.
pub(crate) fn accept(mut sock: Stream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        match conn.complete_io(&mut sock) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client left during the TLS handshake",
                ));
            }
            Ok(_) => {}
            Err(e) => {
                // Tell the client why (an alert), when rustls has one to send.
                let _ = conn.write_tls(&mut sock);
                return Err(e);
            }
        }
    }
    Ok(TlsStream {
        conn: Arc::new(Mutex::new(conn)),
        sock,
        raw: Vec::new(),
        raw_at: 0,
    })
}

impl TlsStream {
    pub(crate) fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            conn: self.conn.clone(),
            sock: self.sock.try_clone()?,
            raw: Vec::new(),
            raw_at: 0,
        })
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, ServerConnection>> {
        lock(&self.conn)
    }
}

fn lock(conn: &Mutex<ServerConnection>) -> io::Result<MutexGuard<'_, ServerConnection>> {
    conn.lock()
        .map_err(|_| io::Error::other("a thread using this TLS connection panicked"))
}

/// Send whatever rustls has queued (records, alerts, key updates).
fn drain(conn: &mut ServerConnection, sock: &mut Stream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut c = self.lock()?;
                match c.reader().read(buf) {
                    // Data, or 0 after the client's close_notify.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if self.raw_at == self.raw.len() {
                // Wait for ciphertext without the lock, so writers go on.
                self.raw.clear();
                self.raw_at = 0;
                self.raw.resize(32 * 1024, 0);
                let n = match self.sock.read(&mut self.raw) {
                    Ok(n) => n,
                    Err(e) => {
                        // Nothing was read: a timeout may be retried.
                        self.raw.clear();
                        return Err(e);
                    }
                };
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection without a TLS close_notify",
                    ));
                }
                self.raw.truncate(n);
                self.raw_at = 0;
            }
            let mut c = lock(&self.conn)?;
            let mut rest = &self.raw[self.raw_at..];
            let before = rest.len();
            c.read_tls(&mut rest)?;
            self.raw_at += before - rest.len();
            if let Err(e) = c.process_new_packets() {
                let _ = drain(&mut c, &mut self.sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            drain(&mut c, &mut self.sock)?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut c = lock(&self.conn)?;
        let n = c.writer().write(buf)?;
        drain(&mut c, &mut self.sock)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut c = lock(&self.conn)?;
        c.writer().flush()?;
        drain(&mut c, &mut self.sock)
    }
}
