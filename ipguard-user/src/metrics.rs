//! `ipguard run --metrics ADDR`: a Prometheus text endpoint.
//!
//! Datapath counters live in per-CPU maps; at each scrape they are read and
//! the registry's counters advanced by the difference, so the exported
//! series are true counters (monotonic, reset only when the datapath is
//! unloaded). The HTTP side is a few lines on tokio: one GET route does not
//! justify a web framework in a firewall daemon.

use std::{collections::HashMap, sync::Arc};

use anyhow::Result;
use ipguard_common::*;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::Mutex,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    sha256: String,
    generation: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FileLabels {
    file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeedLabels {
    feed: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    feed: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    name: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    outcome: &'static str,
}

/// What the datapath counted, as read from the maps.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Indexed like `IPG_COUNTERS`.
    pub counters: Vec<u64>,
    /// (service name, passed, refused).
    pub services: Vec<(String, u64, u64)>,
    /// The flow table (return traffic); None when it could not be read.
    pub flows: Option<crate::datapath::FlowStats>,
}

pub struct Metrics {
    registry: Registry,
    packets: Family<PacketLabels, Counter>,
    services: Family<ServiceLabels, Counter>,
    events: Family<EventLabels, Counter>,
    flows: Family<FlowLabels, Counter>,
    flow_entries: Gauge,
    flow_capacity: Gauge,
    reloads: Family<ResultLabels, Counter>,
    policy: Family<PolicyLabels, Gauge>,
    dns_addresses: Family<NameLabels, Gauge>,
    dns_resolved: Family<NameLabels, Gauge>,
    dns_lookups: Family<LookupLabels, Counter>,
    dns_failure: Family<NameLabels, Gauge>,
    dns_next: Family<NameLabels, Gauge>,
    list_prefixes: Family<FileLabels, Gauge>,
    ready: Ready,
    feed_entries: Family<FeedLabels, Gauge>,
    feed_success: Family<FeedLabels, Gauge>,
    feed_failure: Family<FeedLabels, Gauge>,
    feed_next: Family<FeedLabels, Gauge>,
    feed_fetches: Family<FetchLabels, Counter>,
    last: HashMap<String, u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ipguard");
        let packets = Family::<PacketLabels, Counter>::default();
        let services = Family::<ServiceLabels, Counter>::default();
        let events = Family::<EventLabels, Counter>::default();
        let flows = Family::<FlowLabels, Counter>::default();
        let flow_entries = Gauge::default();
        let flow_capacity = Gauge::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let policy = Family::<PolicyLabels, Gauge>::default();
        let dns_addresses = Family::<NameLabels, Gauge>::default();
        let dns_resolved = Family::<NameLabels, Gauge>::default();
        let dns_lookups = Family::<LookupLabels, Counter>::default();
        let dns_failure = Family::<NameLabels, Gauge>::default();
        let dns_next = Family::<NameLabels, Gauge>::default();
        let list_prefixes = Family::<FileLabels, Gauge>::default();
        let ready_gauge = Gauge::default();
        registry.register(
            "ready",
            "1 while the policy file's policy is the one in force (GET /ready answers 200), 0 while it is not (invalid, refused, or another policy pushed with apply or rollback)",
            ready_gauge.clone(),
        );
        registry.register(
            "dns_failure_timestamp_seconds",
            "When the last lookup of a DNS name failed (Unix time; absent: its last lookup succeeded)",
            dns_failure.clone(),
        );
        registry.register(
            "dns_next_lookup_timestamp_seconds",
            "When a DNS name is asked next (Unix time)",
            dns_next.clone(),
        );
        registry.register(
            "list_file_prefixes",
            "Prefixes a list file of the policy in force holds (by the path read)",
            list_prefixes.clone(),
        );
        let feed_entries = Family::<FeedLabels, Gauge>::default();
        let feed_success = Family::<FeedLabels, Gauge>::default();
        let feed_failure = Family::<FeedLabels, Gauge>::default();
        let feed_next = Family::<FeedLabels, Gauge>::default();
        let feed_fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "feed_entries",
            "Address items of a URL feed's copy in force (by the group it defines)",
            feed_entries.clone(),
        );
        registry.register(
            "feed_success_timestamp_seconds",
            "When a URL feed was last fetched without failure (Unix time)",
            feed_success.clone(),
        );
        registry.register(
            "feed_failure_timestamp_seconds",
            "When a URL feed's fetch last failed or was held (Unix time; absent: its last fetch succeeded)",
            feed_failure.clone(),
        );
        registry.register(
            "feed_next_fetch_timestamp_seconds",
            "When a URL feed is fetched next (Unix time)",
            feed_next.clone(),
        );
        registry.register(
            "feed_fetches",
            "Fetches of a URL feed by result: changed, unchanged, not_modified, held (shrink guard), failure",
            feed_fetches.clone(),
        );
        registry.register(
            "dns_addresses",
            "Addresses a DNS name of the policy stands for now (its last good answer)",
            dns_addresses.clone(),
        );
        registry.register(
            "dns_resolved_timestamp_seconds",
            "When a DNS name's answer in force came (Unix time; absent: never resolved)",
            dns_resolved.clone(),
        );
        registry.register(
            "dns_lookups",
            "Lookups of a DNS name of the policy, by result",
            dns_lookups.clone(),
        );
        registry.register(
            "packets",
            "Packets judged by the XDP program, by verdict and reason",
            packets.clone(),
        );
        registry.register(
            "service_packets",
            "Packets per service, passed or refused",
            services.clone(),
        );
        registry.register(
            "events",
            "Refused-packet events: relayed to user space, suppressed by the per-source or global limit, lost",
            events.clone(),
        );
        registry.register(
            "flows",
            "Return-traffic flows of connections the host opened: created by the egress program, deleted by the daemon (sources a new policy refuses), evicted by newer ones (the table was full), not recorded (no free element)",
            flows.clone(),
        );
        registry.register(
            "flow_entries",
            "Flows in the table now",
            flow_entries.clone(),
        );
        registry.register(
            "flow_capacity",
            "Size of the flow table (--flow-capacity)",
            flow_capacity.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy loads (file change, SIGHUP, apply, time edge) by result",
            reloads.clone(),
        );
        registry.register(
            "policy_info",
            "The applied policy (value 1), its content hash as a label",
            policy.clone(),
        );
        Self {
            registry,
            packets,
            services,
            events,
            flows,
            flow_entries,
            flow_capacity,
            reloads,
            policy,
            dns_addresses,
            dns_resolved,
            dns_lookups,
            dns_failure,
            dns_next,
            list_prefixes,
            ready: Ready {
                gauge: ready_gauge,
                why: Arc::new(std::sync::Mutex::new(Some("starting".into()))),
            },
            feed_entries,
            feed_success,
            feed_failure,
            feed_next,
            feed_fetches,
            last: HashMap::new(),
        }
    }

    /// One fetch of feed `group` and the state of every feed after it.
    pub fn feed_fetch(
        &self,
        group: &str,
        result: &'static str,
        feeds: &[crate::protocol::FeedJson],
    ) {
        self.feed_fetches
            .get_or_create(&FetchLabels {
                feed: group.to_string(),
                result,
            })
            .inc();
        let secs = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| t.as_second())
        };
        for g in [
            &self.feed_entries,
            &self.feed_success,
            &self.feed_failure,
            &self.feed_next,
        ] {
            g.clear();
        }
        for f in feeds {
            let l = FeedLabels {
                feed: f.group.clone(),
            };
            self.feed_entries
                .get_or_create(&l)
                .set(i64::try_from(f.items).unwrap_or(i64::MAX));
            for (gauge, t) in [
                (&self.feed_success, &f.fetched_at),
                (&self.feed_failure, &f.last_failure),
                (&self.feed_next, &f.next_fetch),
            ] {
                if let Some(s) = secs(t) {
                    gauge.get_or_create(&l).set(s);
                }
            }
        }
    }

    /// One lookup of `name` and what every name stands for after it.
    pub fn dns_lookup(&self, name: &str, ok: bool, names: &[crate::protocol::DnsNameJson]) {
        self.dns_lookups
            .get_or_create(&LookupLabels {
                name: name.to_string(),
                result: if ok { "success" } else { "failure" },
            })
            .inc();
        // Names the policy no longer uses disappear.
        self.dns_addresses.clear();
        self.dns_resolved.clear();
        self.dns_failure.clear();
        self.dns_next.clear();
        for n in names {
            let l = NameLabels {
                name: n.name.clone(),
            };
            self.dns_addresses
                .get_or_create(&l)
                .set(i64::try_from(n.addresses.len()).unwrap_or(i64::MAX));
            if let Some(t) = n
                .resolved_at
                .as_deref()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            {
                self.dns_resolved.get_or_create(&l).set(t.as_second());
            }
            let secs = |t: &Option<String>| {
                t.as_deref()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map(|t| t.as_second())
            };
            if n.last_error.is_some()
                && let Some(t) = secs(&n.last_failure)
            {
                self.dns_failure.get_or_create(&l).set(t);
            }
            if let Some(t) = secs(&n.next_lookup) {
                self.dns_next.get_or_create(&l).set(t);
            }
        }
    }

    fn advance(&mut self, key: String, now: u64, counter: &Counter) {
        let before = self.last.insert(key, now).unwrap_or(0);
        // A smaller value means the datapath was reloaded from scratch:
        // count everything it has seen since.
        let delta = if now >= before { now - before } else { now };
        counter.inc_by(delta);
    }

    pub fn update(&mut self, snap: &Snapshot) {
        for v in 0..VERDICT_COUNT as u8 {
            for r in 0..REASON_SLOTS as u8 {
                let Some(&n) = snap.counters.get(counter_index(v, r) as usize) else {
                    continue;
                };
                if n == 0 && !self.last.contains_key(&format!("p{v}/{r}")) {
                    continue;
                }
                let c = self.packets.get_or_create_owned(&PacketLabels {
                    verdict: verdict_name(v),
                    reason: reason_name(r),
                });
                self.advance(format!("p{v}/{r}"), n, &c);
            }
        }
        for (idx, outcome) in [
            (COUNTER_EVENTS_SENT, "relayed"),
            (COUNTER_EVENTS_SUPPRESSED_SOURCE, "suppressed_per_source"),
            (COUNTER_EVENTS_SUPPRESSED_GLOBAL, "suppressed_global"),
            (COUNTER_EVENTS_LOST, "lost"),
        ] {
            let n = snap.counters.get(idx as usize).copied().unwrap_or(0);
            let c = self.events.get_or_create_owned(&EventLabels { outcome });
            self.advance(format!("e{idx}"), n, &c);
        }
        if let Some(f) = &snap.flows {
            for (outcome, n) in [
                ("created", f.created),
                ("deleted", f.deleted),
                ("evicted", f.evicted),
                ("not_recorded", f.not_recorded),
            ] {
                let c = self.flows.get_or_create_owned(&FlowLabels { outcome });
                self.advance(format!("f{outcome}"), n, &c);
            }
            self.flow_entries
                .set(i64::try_from(f.live).unwrap_or(i64::MAX));
            self.flow_capacity.set(i64::from(f.capacity));
        }
        for (name, passed, refused) in &snap.services {
            for (result, n) in [("passed", *passed), ("refused", *refused)] {
                let c = self.services.get_or_create_owned(&ServiceLabels {
                    service: name.clone(),
                    result,
                });
                self.advance(format!("s{name}/{result}"), n, &c);
            }
        }
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    /// The list files of the policy in force (none for a policy sent with
    /// `apply`) and their prefixes.
    pub fn set_lists(&self, lists: &[(String, usize)]) {
        self.list_prefixes.clear();
        for (file, n) in lists {
            self.list_prefixes
                .get_or_create(&FileLabels { file: file.clone() })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    pub fn set_policy(&self, path: &str, sha256: &str, generation: u64) {
        self.policy.clear();
        self.policy
            .get_or_create(&PolicyLabels {
                sha256: sha256.to_string(),
                generation: generation.to_string(),
                path: path.to_string(),
            })
            .set(1);
    }

    /// What `/ready` answers, shared with the daemon (which sets it
    /// without waiting for a scrape to end).
    pub fn ready(&self) -> Ready {
        self.ready.clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Whether the policy file's policy is the one in force: `GET /ready` and
/// `ipguard_ready`.
#[derive(Clone, Debug)]
pub struct Ready {
    gauge: Gauge,
    /// None: ready; else why not.
    why: Arc<std::sync::Mutex<Option<String>>>,
}

impl Ready {
    pub fn set(&self, problem: Option<String>) {
        self.gauge.set(i64::from(problem.is_none()));
        if let Ok(mut w) = self.why.lock() {
            *w = problem;
        }
    }

    pub fn why_not(&self) -> Option<String> {
        self.why.lock().ok().and_then(|w| w.clone())
    }
}

/// Serves GET /metrics on a bound listener; `refresh` is called before
/// each scrape to read the datapath.
/// Metrics connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a connection may take to send its request, and to take the
/// answer.
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn serve_on<F>(
    listener: TcpListener,
    metrics: Arc<Mutex<Metrics>>,
    refresh: F,
) -> Result<()>
where
    F: Fn() -> Option<Snapshot> + Send + Sync + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    }
    let refresh = Arc::new(refresh);
    // A scraper needs one connection at a time; a few more cover several.
    // Beyond, connections are closed at once: idle or slow clients cannot
    // pile up tasks and file descriptors in the daemon.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(sock);
            continue;
        };
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head, bounded in size and time.
            let head = tokio::time::timeout(IO_TIMEOUT, async {
                while len < buf.len() {
                    let n = sock.read(&mut buf[len..]).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        return Some(());
                    }
                }
                None
            })
            .await;
            if !matches!(head, Ok(Some(()))) {
                return;
            }
            let req = String::from_utf8_lossy(&buf[..len]);
            let (status, body) = if req.starts_with("GET /metrics ") || req.starts_with("GET / ") {
                let snap = (refresh)();
                let mut m = metrics.lock().await;
                if let Some(s) = snap {
                    m.update(&s);
                }
                ("200 OK", m.render())
            } else if req.starts_with("GET /ready ") {
                // Kubernetes' readiness probe: a node whose file did not
                // take shows as not ready, with the reason.
                let ready = metrics.lock().await.ready();
                match ready.why_not() {
                    None => ("200 OK", "ready\n".to_string()),
                    Some(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
                }
            } else if req.starts_with("GET /live ") {
                ("200 OK", "alive\n".to_string())
            } else {
                (
                    "404 Not Found",
                    "served here: /metrics, /ready, /live\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(IO_TIMEOUT, sock.write_all(resp.as_bytes())).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_advance_by_deltas_and_survive_resets() {
        let mut m = Metrics::new();
        let mut counters = vec![0u64; COUNTER_LEN as usize];
        counters[counter_index(VERDICT_DROP, REASON_NOT_ALLOWED) as usize] = 5;
        counters[COUNTER_EVENTS_LOST as usize] = 2;
        let mut snap = Snapshot {
            counters: counters.clone(),
            services: vec![("ssh".into(), 3, 1)],
            flows: Some(crate::datapath::FlowStats {
                capacity: 4096,
                live: 4000,
                created: 10_000,
                deleted: 1,
                evicted: 5_999,
                not_recorded: 0,
            }),
        };
        m.update(&snap);
        snap.counters[counter_index(VERDICT_DROP, REASON_NOT_ALLOWED) as usize] = 8;
        m.update(&snap);
        m.set_policy("/etc/ipguard/policy.yaml", "abc123", 7);
        m.reload(true);
        m.reload(false);
        let text = m.render();
        assert!(
            text.contains(r#"ipguard_packets_total{verdict="drop",reason="not_allowed"} 8"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ipguard_events_total{outcome="lost"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ipguard_service_packets_total{service="ssh",result="passed"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ipguard_policy_info{sha256="abc123",generation="7",path="/etc/ipguard/policy.yaml"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"ipguard_policy_reloads_total{result="failure"} 1"#),
            "{text}"
        );
        for line in [
            r#"ipguard_flows_total{outcome="evicted"} 5999"#,
            r#"ipguard_flows_total{outcome="created"} 10000"#,
            "ipguard_flow_entries 4000",
            "ipguard_flow_capacity 4096",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        // The datapath was reloaded: counts restart from 2.
        snap.counters[counter_index(VERDICT_DROP, REASON_NOT_ALLOWED) as usize] = 2;
        m.update(&snap);
        assert!(
            m.render()
                .contains(r#"ipguard_packets_total{verdict="drop",reason="not_allowed"} 10"#)
        );
    }
}
