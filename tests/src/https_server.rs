//! An HTTPS server for tests, inside a namespace the test made: rustls
//! over a certificate of a CA made for the test (rcgen), serving
//! documents the test changes while it runs, with ETags and 304s. Each
//! connection is one request (`Connection: close`). Threads stop when it
//! is dropped.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::Netns;

/// A CA of the test's own and the PEM a client trusts it by.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate for `san` (an address or a name) and its key.
    fn leaf(&self, san: &str) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate()?;
        let params = CertificateParams::new(vec![san.to_string()])?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }
}

/// One document.
#[derive(Clone)]
struct Doc {
    body: Vec<u8>,
    etag: Option<String>,
    /// Served with a wrong Content-Length left out (chunked-like: closed
    /// at the end), to test the cap on the body itself.
    no_length: bool,
}

pub struct HttpsServer {
    pub addr: SocketAddr,
    docs: Arc<Mutex<HashMap<String, Doc>>>,
    stop: Arc<AtomicBool>,
    /// Requests answered, and of them 304s.
    pub requests: Arc<AtomicU64>,
    pub not_modified: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HttpsServer {
    /// Listens on `addr` in `ns` with a certificate of `ca` for `addr`'s IP.
    pub fn new(ns: &Netns, addr: SocketAddr, ca: &TestCa) -> Result<Self> {
        let (cert, key) = ca.leaf(&addr.ip().to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .context("the test server's certificate")?;
        let config = Arc::new(config);
        let listener = ns.run_in(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let docs: Arc<Mutex<HashMap<String, Doc>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (requests, not_modified) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let thread = {
            let (docs, stop, requests, not_modified) = (
                docs.clone(),
                stop.clone(),
                requests.clone(),
                not_modified.clone(),
            );
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (docs, config) = (docs.clone(), config.clone());
                            let (requests, not_modified) = (requests.clone(), not_modified.clone());
                            thread::spawn(move || {
                                if let Some(nm) = serve(s, config, &docs) {
                                    requests.fetch_add(1, Ordering::Relaxed);
                                    if nm {
                                        not_modified.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Ok(Self {
            addr,
            docs,
            stop,
            requests,
            not_modified,
            thread: Some(thread),
        })
    }

    /// `https://ADDR/path`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Serves `body` at `path` from now on, with an ETag of its hash when
    /// `etag`.
    pub fn set(&self, path: &str, body: &[u8], etag: bool) {
        let tag = etag.then(|| format!("\"{:016x}\"", fnv(body)));
        if let Ok(mut d) = self.docs.lock() {
            d.insert(
                path.to_string(),
                Doc {
                    body: body.to_vec(),
                    etag: tag,
                    no_length: false,
                },
            );
        }
    }

    /// As [`HttpsServer::set`], without a Content-Length (the body ends
    /// when the connection does).
    pub fn set_unsized(&self, path: &str, body: &[u8]) {
        if let Ok(mut d) = self.docs.lock() {
            d.insert(
                path.to_string(),
                Doc {
                    body: body.to_vec(),
                    etag: None,
                    no_length: true,
                },
            );
        }
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x100000001b3)
    })
}

/// One request on `s`; Some(answered with 304) when it was answered.
fn serve(
    s: TcpStream,
    config: Arc<rustls::ServerConfig>,
    docs: &Mutex<HashMap<String, Doc>>,
) -> Option<bool> {
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let conn = rustls::ServerConnection::new(config).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    let mut reader = BufReader::new(&mut tls);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut if_none_match = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("if-none-match")
        {
            if_none_match = Some(v.trim().to_string());
        }
    }
    drop(reader);
    let doc = docs.lock().ok()?.get(&path).cloned();
    let (head, body, nm) = match doc {
        None => (
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n".to_string(),
            Vec::new(),
            false,
        ),
        Some(d) if d.etag.is_some() && d.etag == if_none_match => (
            format!(
                "HTTP/1.1 304 Not Modified\r\nETag: {}\r\n",
                d.etag.unwrap_or_default()
            ),
            Vec::new(),
            true,
        ),
        Some(d) => {
            let mut h = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n".to_string();
            if let Some(e) = &d.etag {
                h.push_str(&format!("ETag: {e}\r\n"));
            }
            if !d.no_length {
                h.push_str(&format!("Content-Length: {}\r\n", d.body.len()));
            }
            (h, d.body, false)
        }
    };
    let mut out = head.into_bytes();
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(&body);
    tls.write_all(&out).ok()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Some(nm)
}
