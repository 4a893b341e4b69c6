//! The policy's DNS names (`dns:NAME`): resolved by the daemon, never on
//! the packet path. Each name is asked again when its answer's TTL runs
//! out (clamped to the policy's `dns: { min_ttl, max_ttl }`); a failure
//! keeps the last good answer, which is also kept in the state directory
//! so that a restart without DNS enforces it. A name that never resolved
//! stands for no address.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use hickory_resolver::{
    Resolver, TokioResolver,
    config::{LookupIpStrategy, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::rfc3339;
use crate::{
    policy::{DnsSettings, Policy, Resolved},
    protocol::DnsNameJson,
};

/// The state file of the last good answers.
const STATE_FILE: &str = "dns.json";

/// One lookup's outcome, sent back to the event loop.
pub struct Answer {
    pub name: Arc<str>,
    /// The addresses and how long they hold (the records' TTL).
    pub result: Result<(Vec<IpAddr>, Duration), String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Saved {
    addresses: Vec<IpAddr>,
    /// RFC 3339.
    resolved_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedFile {
    names: BTreeMap<String, Saved>,
}

struct Name {
    addresses: Vec<IpAddr>,
    resolved_at: Option<SystemTime>,
    /// When to ask again; None while a lookup runs.
    next: Option<Instant>,
    next_at: Option<SystemTime>,
    last_error: Option<(SystemTime, String)>,
}

pub struct Dns {
    path: PathBuf,
    resolv_conf: PathBuf,
    /// Made at the first lookup: a policy without names never reads the
    /// resolver configuration (a container may have none). Err: why it
    /// could not be made (each lookup fails with that).
    resolver: Option<std::result::Result<Arc<TokioResolver>, String>>,
    settings: DnsSettings,
    names: HashMap<Arc<str>, Name>,
    /// The answers the state file holds (names the policy may name later).
    saved: BTreeMap<String, Saved>,
    tx: mpsc::Sender<Answer>,
    /// Taken by the event loop.
    rx: Option<mpsc::Receiver<Answer>>,
}

/// A resolver with `resolv_conf`'s servers and options, asking for A and
/// AAAA and caching nothing (the daemon keeps the answers and asks again
/// at their TTL).
pub fn resolver(resolv_conf: &Path) -> std::result::Result<TokioResolver, String> {
    let text = std::fs::read(resolv_conf)
        .map_err(|e| format!("cannot read {}: {e}", resolv_conf.display()))?;
    let (config, mut opts): (ResolverConfig, ResolverOpts) =
        hickory_resolver::system_conf::parse_resolv_conf(text)
            .map_err(|e| format!("{}: {e}", resolv_conf.display()))?;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.cache_size = 0;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("the resolver of {}: {e}", resolv_conf.display()))
}

impl Dns {
    /// The last good answers from `state_dir` and a resolver configured by
    /// `resolv_conf`.
    pub fn new(state_dir: &Path, resolv_conf: &Path) -> Self {
        // Bounded: at most one lookup per name runs.
        let (tx, rx) = mpsc::channel(256);
        let path = state_dir.join(STATE_FILE);
        let saved = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<SavedFile>(&b) {
                Ok(f) => f.names,
                Err(e) => {
                    tracing::warn!(
                        "{} is corrupt ({e}); names start without their last answers",
                        path.display()
                    );
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        Self {
            path,
            resolv_conf: resolv_conf.to_path_buf(),
            resolver: None,
            settings: DnsSettings::default(),
            names: HashMap::new(),
            saved,
            tx,
            rx: Some(rx),
        }
    }

    /// The lookups' outcomes, for the event loop (once; later calls get a
    /// channel that stays empty).
    pub fn answers(&mut self) -> mpsc::Receiver<Answer> {
        self.rx.take().unwrap_or_else(|| mpsc::channel(1).1)
    }

    /// Follows the names `policy` uses: new ones start from their saved
    /// answer (if any) and are asked now; others are forgotten.
    pub fn track(&mut self, policy: &Policy) {
        self.settings = policy.dns;
        let wanted = policy.dns_names();
        let mut names = HashMap::with_capacity(wanted.len());
        let now = Instant::now();
        for n in wanted {
            if names.contains_key(&n.name) {
                continue;
            }
            let entry = self.names.remove(&n.name).unwrap_or_else(|| {
                let saved = self.saved.get(&*n.name);
                if saved.is_none() {
                    tracing::warn!(
                        "{n}: no answer yet; it stands for no address until it resolves"
                    );
                }
                Name {
                    addresses: saved.map(|s| s.addresses.clone()).unwrap_or_default(),
                    resolved_at: saved.and_then(|s| {
                        s.resolved_at
                            .parse::<jiff::Timestamp>()
                            .ok()
                            .map(SystemTime::from)
                    }),
                    next: Some(now),
                    next_at: Some(SystemTime::now()),
                    last_error: None,
                }
            });
            names.insert(n.name.clone(), entry);
        }
        self.names = names;
    }

    /// What each name of `policy` stands for now, for the compiler: the
    /// current answer, else the saved one (a policy not applied yet may
    /// name others than the one in force).
    pub fn answers_for(&self, policy: &Policy) -> Resolved {
        let mut r = Resolved::default();
        for n in policy.dns_names() {
            let addrs = match self.names.get(&n.name) {
                Some(known) => known.addresses.clone(),
                None => self
                    .saved
                    .get(&*n.name)
                    .map(|s| s.addresses.clone())
                    .unwrap_or_default(),
            };
            r.names.insert(n.name.clone(), addrs);
        }
        r
    }

    /// When the next lookup is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.names.values().filter_map(|n| n.next).min()
    }

    /// Starts the lookups that are due (each its own task).
    pub fn start_due(&mut self) {
        let now = Instant::now();
        for (name, n) in &mut self.names {
            if n.next.is_none_or(|t| t > now) {
                continue;
            }
            n.next = None;
            n.next_at = None;
            let name = name.clone();
            let tx = self.tx.clone();
            let resolver = self
                .resolver
                .get_or_insert_with(|| {
                    let r = resolver(&self.resolv_conf).map(Arc::new);
                    if let Err(e) = &r {
                        tracing::error!("DNS names cannot be resolved: {e}");
                    }
                    r
                })
                .clone();
            tokio::spawn(async move {
                let result = match resolver {
                    Ok(r) => lookup(&r, &name).await,
                    Err(e) => Err(e),
                };
                let _ = tx.send(Answer { name, result }).await;
            });
        }
    }

    /// Takes a lookup's outcome; true when what the name stands for
    /// changed (the policy must be compiled again).
    pub fn answer(&mut self, a: Answer) -> bool {
        let s = self.settings;
        let Some(n) = self.names.get_mut(&a.name) else {
            return false;
        };
        let (changed, wait) = match a.result {
            Ok((mut addrs, ttl)) => {
                addrs.sort_unstable();
                addrs.dedup();
                let changed = addrs != n.addresses;
                if changed {
                    tracing::info!(
                        name = %a.name,
                        addresses = ?addrs,
                        "DNS name resolved to new addresses"
                    );
                }
                if let Some((_, e)) = n.last_error.take() {
                    tracing::info!(name = %a.name, "DNS name resolves again (last failure: {e})");
                }
                n.addresses = addrs;
                n.resolved_at = Some(SystemTime::now());
                (changed, ttl.clamp(s.min_ttl, s.max_ttl))
            }
            Err(e) => {
                tracing::warn!(
                    name = %a.name,
                    "DNS lookup failed ({e}); the last answer ({} addresses) stays in force",
                    n.addresses.len()
                );
                n.last_error = Some((SystemTime::now(), e));
                (false, s.min_ttl)
            }
        };
        n.next = Some(Instant::now() + wait);
        n.next_at = Some(SystemTime::now() + wait);
        if changed && let Err(e) = self.save() {
            tracing::warn!("{e:#}");
        }
        changed
    }

    /// Writes the answers of the names in use (and keeps the others the
    /// file held: a policy that names them again starts from them).
    fn save(&mut self) -> Result<()> {
        for (k, n) in &self.names {
            if let Some(at) = n.resolved_at {
                self.saved.insert(
                    k.to_string(),
                    Saved {
                        addresses: n.addresses.clone(),
                        resolved_at: rfc3339(at),
                    },
                );
            }
        }
        let file = SavedFile {
            names: self.saved.clone(),
        };
        let json = serde_json::to_vec_pretty(&file)?;
        crate::state::write_atomic(&self.path, &json)
            .with_context(|| format!("cannot save the DNS answers to {}", self.path.display()))
    }

    /// `status`: every name, its addresses, when it resolved, when it is
    /// asked next and its last failure.
    pub fn status(&self) -> Vec<DnsNameJson> {
        let mut v: Vec<DnsNameJson> = self
            .names
            .iter()
            .map(|(k, n)| DnsNameJson {
                name: k.to_string(),
                addresses: n.addresses.clone(),
                resolved_at: n.resolved_at.map(rfc3339),
                next_lookup: n.next_at.map(rfc3339),
                last_error: n.last_error.as_ref().map(|(_, e)| e.clone()),
                last_failure: n.last_error.as_ref().map(|(t, _)| rfc3339(*t)),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// Each of `policy`'s names looked up once, at the same time: what
/// `check --resolve` shows and compiles with.
pub async fn resolve_once(
    policy: &Policy,
    resolv_conf: &Path,
) -> Vec<(
    crate::policy::DnsName,
    std::result::Result<Vec<IpAddr>, String>,
)> {
    let names = policy.dns_names();
    let r = resolver(resolv_conf).map(Arc::new);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, n) in names.iter().enumerate() {
        let (r, name) = (r.clone(), n.name.clone());
        tasks.spawn(async move {
            let out = match r {
                Ok(r) => lookup(&r, &name).await.map(|(a, _)| a),
                Err(e) => Err(e),
            };
            (i, out)
        });
    }
    let mut out: Vec<_> = names
        .iter()
        .map(|n| (n.clone(), Err("not looked up".to_string())))
        .collect();
    while let Some(Ok((i, res))) = tasks.join_next().await {
        if let Some(slot) = out.get_mut(i) {
            slot.1 = res.map(|mut a| {
                a.sort_unstable();
                a.dedup();
                a
            });
        }
    }
    out
}

/// A and AAAA of `name` (absolute: no search domains) and their TTL.
async fn lookup(
    r: &TokioResolver,
    name: &str,
) -> std::result::Result<(Vec<IpAddr>, Duration), String> {
    let fqdn = format!("{name}.");
    let l = r
        .lookup_ip(fqdn.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let ttl = l.valid_until().saturating_duration_since(Instant::now());
    Ok((l.iter().collect(), ttl))
}
