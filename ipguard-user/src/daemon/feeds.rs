//! The policy's URL feeds (`{ url: https://…, … }` groups): fetched by the
//! daemon, never on the packet path. Each feed is fetched again after its
//! `refresh` (sooner after a failure), with the validators of the copy in
//! force (`If-None-Match`, `If-Modified-Since`), within its timeout, its
//! size cap and its entry cap. A copy is accepted only if it parses whole
//! ([`Feed::parse_body`]); one that drops more than `max_shrink` of the
//! entries at once is held. The copy in force is kept in the state
//! directory and enforced at start before any fetch, so a host that boots
//! without network is protected as before.
//!
//! HTTP is ureq's blocking client on the blocking pool (a feed is fetched
//! every few minutes at most: a thread per fetch costs nothing), over
//! rustls with the system's CA certificates (`SSL_CERT_FILE` and
//! `SSL_CERT_DIR` are honoured, as by OpenSSL's tools).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::rfc3339;
use crate::{
    policy::{self, Feed, Policy},
    protocol::FeedJson,
};

/// The directory of the copies, under the state directory.
const DIR: &str = "feeds";
/// A failed fetch is tried again after at most this long (or the feed's
/// refresh, if shorter).
const RETRY: Duration = Duration::from_secs(300);

/// A copy kept on disk: its body beside this record.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Meta {
    identity: String,
    etag: Option<String>,
    last_modified: Option<String>,
    sha256: String,
    /// RFC 3339.
    changed_at: String,
}

/// A copy in force (or kept for a policy that names it).
#[derive(Clone, Debug)]
struct Copy {
    nets: Arc<[IpNet]>,
    items: usize,
    meta: Meta,
}

/// How a fetch ended.
pub enum Fetched {
    /// 304: the copy in force is current.
    NotModified,
    Body {
        body: Vec<u8>,
        parsed: policy::ParsedFeed,
        etag: Option<String>,
        last_modified: Option<String>,
    },
}

/// One fetch's outcome, sent back to the event loop.
pub struct Outcome {
    pub group: Arc<str>,
    identity: String,
    pub result: std::result::Result<Fetched, String>,
}

struct Tracked {
    feed: Arc<Feed>,
    identity: String,
    /// When to fetch again; None while a fetch runs.
    next: Option<Instant>,
    next_at: Option<SystemTime>,
    fetched_at: Option<SystemTime>,
    held: bool,
    /// The last fetch's failure or hold, until a fetch succeeds.
    last_error: Option<String>,
    /// When a fetch last failed or was held (kept after a success).
    failed_at: Option<SystemTime>,
}

pub struct Feeds {
    dir: PathBuf,
    /// By identity ([`Feed::identity`]); loaded from disk when first asked.
    copies: HashMap<String, Option<Copy>>,
    /// The feeds of the policy in force, by group.
    tracked: HashMap<Arc<str>, Tracked>,
    /// The system's CA certificates, loaded at the first fetch.
    roots: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
    tx: mpsc::Sender<Outcome>,
    rx: Option<mpsc::Receiver<Outcome>>,
}

impl Feeds {
    pub fn new(state_dir: &Path) -> Self {
        // Bounded: at most one fetch per feed runs.
        let (tx, rx) = mpsc::channel(64);
        Self {
            dir: state_dir.join(DIR),
            copies: HashMap::new(),
            tracked: HashMap::new(),
            roots: None,
            tx,
            rx: Some(rx),
        }
    }

    /// The fetches' outcomes, for the event loop (once).
    pub fn outcomes(&mut self) -> mpsc::Receiver<Outcome> {
        self.rx.take().unwrap_or_else(|| mpsc::channel(1).1)
    }

    fn file_stem(identity: &str) -> String {
        policy::sha256_hex(identity.as_bytes())[..16].to_string()
    }

    /// The copy of `feed`, from memory or from the state directory (None:
    /// never fetched, or the kept copy no longer passes the feed's
    /// checks).
    fn copy(&mut self, feed: &Feed) -> Option<&Copy> {
        let identity = feed.identity();
        if !self.copies.contains_key(&identity) {
            let loaded = self.load(feed, &identity);
            self.copies.insert(identity.clone(), loaded);
        }
        self.copies.get(&identity).and_then(Option::as_ref)
    }

    fn load(&self, feed: &Feed, identity: &str) -> Option<Copy> {
        let stem = Self::file_stem(identity);
        let meta_path = self.dir.join(format!("{stem}.json"));
        let body_path = self.dir.join(format!("{stem}.body"));
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).ok()?)
            .map_err(|e| {
                tracing::warn!(
                    "{}: {e}; {feed} starts without its copy",
                    meta_path.display()
                )
            })
            .ok()?;
        if meta.identity != identity {
            return None;
        }
        let body = std::fs::read(&body_path).ok()?;
        if policy::sha256_hex(&body) != meta.sha256 {
            tracing::warn!(
                "{} does not match its record; {feed} starts without its copy",
                body_path.display()
            );
            return None;
        }
        match feed.parse_body(&body) {
            Ok(p) => Some(Copy {
                nets: p.nets.into(),
                items: p.items,
                meta,
            }),
            Err(e) => {
                tracing::warn!(
                    "the kept copy of {feed} no longer passes ({e}); it stands for nothing until a fetch succeeds"
                );
                None
            }
        }
    }

    fn save(&self, body: &[u8], meta: &Meta) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let stem = Self::file_stem(&meta.identity);
        // The body first: a record always names a body that is there.
        crate::state::write_atomic(&self.dir.join(format!("{stem}.body")), body)?;
        let json = serde_json::to_vec_pretty(meta)?;
        crate::state::write_atomic(&self.dir.join(format!("{stem}.json")), &json)
    }

    /// What each feed of `policy` holds now, for the compiler.
    pub fn copies_for(&mut self, policy: &Policy) -> HashMap<Arc<str>, Arc<[IpNet]>> {
        let mut out = HashMap::new();
        for f in &policy.feeds {
            if let Some(c) = self.copy(f) {
                out.insert(f.group.clone(), c.nets.clone());
            }
        }
        out
    }

    /// Follows the feeds `policy` uses: new ones are fetched now, kept
    /// ones keep their schedule; others are forgotten (their copies stay
    /// on disk for a policy that names them again).
    pub fn track(&mut self, policy: &Policy) {
        let mut tracked = HashMap::with_capacity(policy.feeds.len());
        for f in &policy.feeds {
            let identity = f.identity();
            let t = match self.tracked.remove(&f.group) {
                Some(mut t) if t.identity == identity => {
                    // Settings other than the identity may have changed.
                    t.feed = f.clone();
                    t
                }
                _ => {
                    if self.copy(f).is_none() {
                        tracing::warn!(
                            "{f}: no copy yet; it stands for no address until a fetch succeeds"
                        );
                    }
                    Tracked {
                        feed: f.clone(),
                        identity,
                        next: Some(Instant::now()),
                        next_at: Some(SystemTime::now()),
                        fetched_at: None,
                        held: false,
                        last_error: None,
                        failed_at: None,
                    }
                }
            };
            tracked.insert(f.group.clone(), t);
        }
        self.tracked = tracked;
        // Copies of feeds no policy in force names are dropped from
        // memory (they are read again from disk if named again).
        let live: Vec<String> = self.tracked.values().map(|t| t.identity.clone()).collect();
        self.copies.retain(|k, _| live.contains(k));
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.tracked.values().filter_map(|t| t.next).min()
    }

    /// Starts the fetches that are due (each on the blocking pool).
    pub fn start_due(&mut self) {
        let now = Instant::now();
        let due: Vec<Arc<str>> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.next.is_some_and(|n| n <= now))
            .map(|(g, _)| g.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let roots = self.roots.get_or_insert_with(load_roots).clone();
        for g in due {
            let Some(t) = self.tracked.get(&g) else {
                continue;
            };
            let (feed, identity) = (t.feed.clone(), t.identity.clone());
            let validators = self
                .copy(&feed)
                .map(|c| (c.meta.etag.clone(), c.meta.last_modified.clone()));
            if let Some(t) = self.tracked.get_mut(&g) {
                t.next = None;
                t.next_at = None;
            }
            let (tx, roots) = (self.tx.clone(), roots.clone());
            tokio::spawn(async move {
                let f = feed.clone();
                let result = tokio::task::spawn_blocking(move || fetch(&f, &roots, validators))
                    .await
                    .unwrap_or_else(|e| Err(format!("the fetch task failed: {e}")));
                let _ = tx
                    .send(Outcome {
                        group: feed.group.clone(),
                        identity,
                        result,
                    })
                    .await;
            });
        }
    }

    /// Takes a fetch's outcome: whether the copy changed (so the policy
    /// must be compiled again), and the outcome for the metrics: changed,
    /// unchanged, not_modified, held, failure (None: a fetch of a feed
    /// the policy no longer has).
    pub fn outcome(&mut self, o: Outcome) -> (bool, Option<&'static str>) {
        let Some(t) = self.tracked.get(&o.group) else {
            return (false, None);
        };
        if t.identity != o.identity {
            // The policy changed the feed while it was fetched.
            return (false, None);
        }
        let (feed, identity) = (t.feed.clone(), t.identity.clone());
        let now = SystemTime::now();
        let (mut changed, mut held, mut error) = (false, false, None);
        let old = self.copy(&feed).cloned();
        let mut label = "unchanged";
        match o.result {
            Err(e) => {
                label = "failure";
                error = Some(e);
            }
            Ok(Fetched::NotModified) => label = "not_modified",
            Ok(Fetched::Body {
                body,
                parsed,
                etag,
                last_modified,
            }) => {
                let sha256 = policy::sha256_hex(&body);
                let old_items = old.as_ref().map_or(0, |c| c.items);
                let pct = u64::from(feed.max_shrink_percent);
                let shrinks = (parsed.items as u64).saturating_mul(100)
                    < (old_items as u64).saturating_mul(100 - pct);
                if old.as_ref().is_some_and(|c| c.meta.sha256 == sha256) {
                    // The same body (a server without validators): keep
                    // the copy, learn its validators.
                    if let Some(Some(c)) = self.copies.get_mut(&identity) {
                        c.meta.etag = etag;
                        c.meta.last_modified = last_modified;
                    }
                } else if shrinks {
                    held = true;
                    label = "held";
                    error = Some(format!(
                        "held: the fetched copy has {} entries, the one in force {old_items}, a drop of more than max_shrink {pct}% at once (raise max_shrink to accept it)",
                        parsed.items
                    ));
                } else {
                    let meta = Meta {
                        identity: identity.clone(),
                        etag,
                        last_modified,
                        sha256,
                        changed_at: rfc3339(now),
                    };
                    if let Err(e) = self.save(&body, &meta) {
                        tracing::warn!("{e:#}; {feed}'s new copy is in force but not kept");
                    }
                    tracing::info!(
                        feed = %feed.group,
                        entries = parsed.items,
                        prefixes = parsed.nets.len(),
                        before = old_items,
                        "feed changed"
                    );
                    if parsed.host_bits > 0 {
                        tracing::warn!(
                            "{feed}: {} items have host bits set; each is taken as its prefix",
                            parsed.host_bits
                        );
                    }
                    self.copies.insert(
                        identity.clone(),
                        Some(Copy {
                            items: parsed.items,
                            nets: parsed.nets.into(),
                            meta,
                        }),
                    );
                    changed = true;
                    label = "changed";
                }
            }
        }
        let Some(t) = self.tracked.get_mut(&o.group) else {
            return (changed, Some(label));
        };
        let wait = match &error {
            Some(e) => {
                let in_force = old.as_ref().map_or(0, |c| c.items);
                tracing::warn!("{feed}: {e}; the copy in force ({in_force} entries) stays");
                t.last_error = Some(e.clone());
                t.failed_at = Some(now);
                if held {
                    t.fetched_at = Some(now);
                    feed.refresh
                } else {
                    feed.refresh.min(RETRY)
                }
            }
            None => {
                if let Some(e) = t.last_error.take() {
                    tracing::info!("{feed} is fetched again (last failure: {e})");
                }
                t.fetched_at = Some(now);
                feed.refresh
            }
        };
        t.held = held;
        t.next = Some(Instant::now() + wait);
        t.next_at = Some(now + wait);
        (changed, Some(label))
    }

    /// `status`: every feed of the policy in force and its copy.
    pub fn status(&self) -> Vec<FeedJson> {
        let mut v: Vec<FeedJson> = self
            .tracked
            .iter()
            .map(|(g, t)| {
                let c = self.copies.get(&t.identity).and_then(Option::as_ref);
                FeedJson {
                    group: g.to_string(),
                    url: t.feed.url.to_string(),
                    prefixes: c.map_or(0, |c| c.nets.len()),
                    items: c.map_or(0, |c| c.items),
                    sha256: c.map(|c| c.meta.sha256.clone()),
                    changed_at: c.map(|c| c.meta.changed_at.clone()),
                    fetched_at: t.fetched_at.map(rfc3339),
                    next_fetch: t.next_at.map(rfc3339),
                    held: t.held,
                    last_error: t.last_error.clone(),
                    last_failure: t.failed_at.map(rfc3339),
                }
            })
            .collect();
        v.sort_by(|a, b| a.group.cmp(&b.group));
        v
    }
}

/// The system's CA certificates (an empty set, said once, when there are
/// none: every fetch then fails its TLS handshake, and says so).
fn load_roots() -> Arc<Vec<ureq::tls::Certificate<'static>>> {
    let found = rustls_native_certs::load_native_certs();
    for e in found.errors.iter().take(3) {
        tracing::warn!("reading the system's CA certificates: {e}");
    }
    if found.certs.is_empty() {
        tracing::error!(
            "no CA certificates found (install ca-certificates, or set SSL_CERT_FILE): no feed can be fetched"
        );
    }
    Arc::new(
        found
            .certs
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect(),
    )
}

/// One GET of `feed`, with the validators of the copy in force, read
/// within the feed's size cap and parsed whole.
fn fetch(
    feed: &Feed,
    roots: &Arc<Vec<ureq::tls::Certificate<'static>>>,
    validators: Option<(Option<String>, Option<String>)>,
) -> std::result::Result<Fetched, String> {
    use ureq::tls::{RootCerts, TlsConfig};
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(feed.timeout))
        .https_only(true)
        .http_status_as_error(false)
        .max_redirects(5)
        .user_agent(concat!("ipguard/", env!("CARGO_PKG_VERSION")))
        .tls_config(
            TlsConfig::builder()
                .root_certs(RootCerts::Specific(roots.clone()))
                .build(),
        )
        .build()
        .into();
    let mut req = agent.get(&*feed.url);
    if let Some((etag, modified)) = validators {
        if let Some(e) = etag {
            req = req.header("If-None-Match", e);
        }
        if let Some(m) = modified {
            req = req.header("If-Modified-Since", m);
        }
    }
    let mut resp = req.call().map_err(|e| e.to_string())?;
    let status = resp.status();
    if status == 304 {
        return Ok(Fetched::NotModified);
    }
    if !status.is_success() {
        return Err(format!(
            "HTTP {} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .trim_end()
        .to_string());
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (etag, last_modified) = (header("etag"), header("last-modified"));
    if let Some(len) = header("content-length").and_then(|l| l.parse::<u64>().ok())
        && len > feed.max_bytes
    {
        return Err(format!(
            "the body is {len} bytes, over max_bytes {}",
            feed.max_bytes
        ));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(feed.max_bytes)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => {
                format!("the body is over max_bytes {}", feed.max_bytes)
            }
            e => format!("reading the body: {e}"),
        })?;
    let parsed = feed.parse_body(&body)?;
    Ok(Fetched::Body {
        body,
        parsed,
        etag,
        last_modified,
    })
}
