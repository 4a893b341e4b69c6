//! What the daemon and the commands say to each other over the control
//! socket, typed: the requests, the response envelope and the payloads
//! they carry. The daemon and the commands both depend on this module and
//! never on each other; a field renamed here is renamed for both, and a
//! misspelled one does not compile.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::error::Exit;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Struct variants (not unit ones) so that unknown fields are refused
    // for every request.
    Status {},
    Apply {
        /// Where the client read the policy (for status and logs).
        path: String,
        /// The policy text itself: the daemon never reads a client's file.
        text: String,
        /// The list files it names (`{ file: PATH }` groups), by the path
        /// the policy writes, read by the client for the same reason.
        #[serde(default)]
        lists: Vec<ListText>,
        confirm_secs: Option<u64>,
        force: bool,
        /// Say what it would change (lists, services, settings, verdicts of
        /// the sources seen recently, sessions it would cut); apply nothing.
        #[serde(default)]
        dry_run: bool,
    },
    Confirm {},
    Events {
        follow: bool,
    },
    Allow {
        addr: String,
        for_secs: Option<u64>,
        service: Option<String>,
        label: Option<String>,
    },
    Revoke {
        addr: String,
    },
    /// `ipguard deny`: one source, or many (`--stdin`) in one swap.
    Deny {
        entries: Vec<DenyItem>,
    },
    Undeny {
        addr: String,
    },
    /// Marks a refused source's access request rejected; with `deny`, also
    /// denies it (for `for_secs`).
    Reject {
        addr: String,
        deny: bool,
        for_secs: Option<u64>,
        label: Option<String>,
    },
    Blocked {},
    /// The applied policies kept (`ipguard history`).
    History {},
    /// `ipguard rollback`: apply an earlier policy again.
    Rollback {
        generation: Option<u64>,
        force: bool,
    },
    /// The packets the daemon saw recently, for `ipguard diff`: each refused
    /// source (at its service's first port) and each established inbound
    /// session.
    Seen {},
    /// `ipguard explain --daemon`: a packet judged by the policy in force.
    Explain {
        src: String,
        port: Option<String>,
    },
}

/// One source of `deny`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DenyItem {
    pub addr: String,
    pub for_secs: Option<u64>,
    pub label: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    /// One readable line when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exit code the client should use when `ok` is false (docs/cli.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<u8>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            exit: None,
            data,
        }
    }
    pub fn err(exit: Exit, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            exit: Some(exit as u8),
            data: serde_json::Value::Null,
        }
    }
}

/// `status`: what is enforced and what it has done.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// False when `status` read the pinned maps itself (no daemon runs).
    #[serde(default = "yes")]
    pub daemon: bool,
    /// The running kernel and the datapath features it lacks.
    pub kernel: crate::kernel::Kernel,
    pub attached: Vec<AttachedJson>,
    pub mode: String,
    pub action: String,
    pub scope: String,
    pub generation: u64,
    pub policy: Option<PolicyJson>,
    pub prefixes: Prefixes,
    pub capacity: Prefixes,
    /// Kernel memory of the source lookup.
    #[serde(default)]
    pub memory: Memory,
    pub counters: Counters,
    /// Every verdict and reason with a non-zero count.
    pub verdicts: BTreeMap<String, u64>,
    pub services: BTreeMap<String, ServiceJson>,
    pub top_entries: Vec<EntryHits>,
    pub events: EventCounters,
    /// Return-traffic flows (connections the host opened); None when the
    /// table could not be read.
    pub flows: Option<crate::datapath::FlowStats>,
    /// Filled by the daemon from relayed events; empty without a daemon.
    pub top_blocked: Vec<BlockedSource>,
    pub runtime_entries: usize,
    /// The list files the policy file read (filled by the daemon).
    #[serde(default)]
    pub lists: Vec<ListJson>,
    /// The policy's DNS names (filled by the daemon).
    #[serde(default)]
    pub dns: Vec<DnsNameJson>,
    /// The policy's URL feeds (filled by the daemon).
    #[serde(default)]
    pub feeds: Vec<FeedJson>,
}

/// A URL feed of the policy in force and the copy of it in force.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeedJson {
    /// The group it defines.
    pub group: String,
    pub url: String,
    /// Prefixes of the copy in force (0 without one).
    pub prefixes: usize,
    /// Address items of that copy.
    pub items: usize,
    /// SHA-256 of that copy's body.
    pub sha256: Option<String>,
    /// When that copy was fetched (RFC 3339); None: never.
    pub changed_at: Option<String>,
    /// The last fetch that succeeded, whether or not it changed the copy
    /// (a 304, or the same body).
    pub fetched_at: Option<String>,
    /// When it is fetched next; None while a fetch runs.
    pub next_fetch: Option<String>,
    /// True while a fetched copy is held by the shrink guard.
    pub held: bool,
    /// The last fetch's failure (or hold), until one succeeds.
    pub last_error: Option<String>,
    /// When a fetch last failed or was held (kept after a success).
    pub last_failure: Option<String>,
}

/// A DNS name of the policy in force and what it stands for now.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DnsNameJson {
    pub name: String,
    /// The last good answer (A and AAAA), in force.
    pub addresses: Vec<std::net::IpAddr>,
    /// When that answer came (RFC 3339); None: never resolved.
    pub resolved_at: Option<String>,
    /// When it is asked next; None while a lookup runs.
    pub next_lookup: Option<String>,
    /// The last lookup's failure, until one succeeds.
    pub last_error: Option<String>,
    pub last_failure: Option<String>,
}

/// A list file of the policy in force, as the daemon last read it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListJson {
    pub file: String,
    pub prefixes: usize,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachedJson {
    pub iface: String,
    pub mode: Option<String>,
    /// How `action: reject` fares on this interface, when it needs saying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyJson {
    pub path: String,
    pub sha256: String,
    pub applied_at: String,
}

/// A list file sent with `apply`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListText {
    /// As the policy writes it.
    pub path: String,
    pub text: String,
}

/// Bytes of kernel memory the source lookup takes.
#[derive(Clone, Debug, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct Memory {
    /// The IPv4 lookup's arrays as allocated, both slots
    /// (`--ipv4-capacity`).
    pub ipv4_allocated: u64,
    /// What the active policy's IPv4 table fills of its slot.
    pub ipv4_policy: u64,
    /// The same for IPv6 (`--ipv6-capacity`).
    #[serde(default)]
    pub ipv6_allocated: u64,
    #[serde(default)]
    pub ipv6_policy: u64,
    /// Of the leaves in `ipv4_policy`, those that hold the deadlines of
    /// time-limited entries (both families) and the values after them.
    #[serde(default)]
    pub deadline_leaves: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct Prefixes {
    pub ipv4: usize,
    pub ipv6: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct Counters {
    pub passed: u64,
    pub dropped: u64,
    pub would_drop: u64,
    pub rejected: u64,
    pub malformed: u64,
    /// Refusals of `action: reject` dropped without a RST: the second's
    /// RST budget (`reject_max_rate`) was spent. Counted in `dropped`.
    pub rejects_over_budget: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceJson {
    pub passed: u64,
    pub refused: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryHits {
    pub list: String,
    pub entry: String,
    pub label: Option<String>,
    pub hits: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventCounters {
    pub sent: u64,
    pub suppressed_per_source: u64,
    pub suppressed_global: u64,
    pub lost: u64,
}

fn yes() -> bool {
    true
}

/// One relayed event, as printed on stdout and by `ipguard events --json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventLine {
    pub time: String,
    pub iface: String,
    pub src: IpAddr,
    pub protocol: String,
    pub dport: Option<u16>,
    pub service: Option<String>,
    pub verdict: String,
    pub reason: String,
    /// The most specific policy entry covering the source, if any.
    pub entry: Option<String>,
    pub label: Option<String>,
    /// Events from this source the rate limit suppressed since the last one.
    pub suppressed: u64,
}

/// A refused source.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockedSource {
    pub src: IpAddr,
    /// Refused packets seen: relayed events plus the ones the rate limit
    /// suppressed.
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub service: Option<String>,
    /// Its access request: pending, approved or rejected.
    #[serde(default)]
    pub status: crate::requests::RequestStatus,
    /// Order of the last refusal (the table's LRU clock).
    #[serde(skip)]
    pub(crate) last_seq: u64,
}

/// The answer to `apply` (and what the daemon logs for a reload).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplyAnswer {
    pub generation: u64,
    pub prefixes: Prefixes,
    pub sha256: String,
    pub cut_sessions: usize,
    /// One line per established session the policy cut, then the
    /// policy's own warnings.
    pub warnings: Vec<String>,
    /// `apply --confirm N`: the policy rolls back after N s unless
    /// confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_within_secs: Option<u64>,
}

/// The answer to `deny`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DenyAnswer {
    pub denied: usize,
    /// One line per established session the denial cut.
    pub warnings: Vec<String>,
}

/// The answer to `revoke` and `undeny`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokeAnswer {
    pub revoked: usize,
    /// One line per established session the revocation cut.
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::Allow {
            addr: "203.0.113.9".into(),
            for_secs: Some(2),
            service: None,
            label: Some("ticket".into()),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}

/// A packet a change of policy is judged on (`diff`, `apply --dry-run`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Probe {
    pub src: std::net::IpAddr,
    /// `tcp/22`; None: a packet of no service port.
    pub port: Option<String>,
    /// Why it is judged: `refused` (the daemon refused it recently),
    /// `session` (an established inbound session) or `passed` (in the
    /// datapath's sample of passed packets).
    pub seen: String,
}

impl Probe {
    pub fn query(&self) -> (std::net::IpAddr, Option<(crate::policy::Proto, u16)>) {
        (
            self.src,
            self.port
                .as_deref()
                .and_then(|p| crate::policy::parse_port_query(p).ok()),
        )
    }
}

/// A port of a query, as `tcp/22`.
pub fn port_text(p: Option<(crate::policy::Proto, u16)>) -> Option<String> {
    p.map(|(proto, n)| match proto {
        crate::policy::Proto::Tcp => format!("tcp/{n}"),
        crate::policy::Proto::Udp => format!("udp/{n}"),
    })
}

/// The verdicts a change of policy changes, for JSON answers, each with
/// why its packet was judged (from `probes`).
pub fn changes_json(
    changes: &[crate::policy::VerdictChange],
    probes: &[Probe],
) -> Vec<serde_json::Value> {
    changes
        .iter()
        .map(|c| {
            let seen = probes
                .iter()
                .find(|p| p.query() == (c.src, c.port))
                .map_or("refused", |p| p.seen.as_str());
            change_json(c, seen)
        })
        .collect()
}

/// One verdict that a change of policy changes, for JSON answers.
fn change_json(c: &crate::policy::VerdictChange, seen: &str) -> serde_json::Value {
    let side = |e: &crate::policy::Explanation| {
        serde_json::json!({
            "verdict": e.verdict_name(),
            "reason": e.reason_name(),
            "entry": e.entry,
            "label": e.label,
            "written": e.written,
        })
    };
    serde_json::json!({
        "src": c.src,
        "port": port_text(c.port),
        "seen": seen,
        "old": side(&c.old),
        "new": side(&c.new),
    })
}
