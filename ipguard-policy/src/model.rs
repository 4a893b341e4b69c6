//! A checked policy: every value parsed, groups expanded, ranges and
//! wildcards turned into prefixes. What it means at a given moment is the
//! compiler's business (`compile`).

use std::{net::IpAddr, sync::Arc, time::Duration};

use ipnet::IpNet;
use jiff::Timestamp;
use smallvec::SmallVec;

use super::{DnsName, Pos, Proto, Written, time::Window};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Monitor,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Drop,
    Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Host,
    Services,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
            Mode::Off => "off",
        }
    }
}
impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Drop => "drop",
            Action::Reject => "reject",
        }
    }
}
impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Host => "host",
            Scope::Services => "services",
        }
    }
}

/// One entry of a list, with its address items expanded.
#[derive(Clone, Debug)]
pub struct Entry {
    /// As written: `office`, `198.51.100.10-198.51.100.20`, `[a, b]`.
    /// Shared with the compiled policy's [`crate::EntryInfo`] (a million
    /// entries would hold each text twice).
    pub text: Written,
    /// The prefixes it covers, sorted, without duplicates (a range is its
    /// minimal prefix set, a group all of its members'). One prefix, the
    /// usual case, is held inline: a million entries would otherwise cost
    /// a million allocations and 32 MB for them.
    pub nets: SmallVec<[IpNet; 1]>,
    /// What most entries have none of: a label, an `until`, a window, DNS
    /// names. Boxed: inline they would add 128 bytes to each entry, and a
    /// million entries are held (a label alone, inline, took 16 of 96).
    pub extras: Option<Box<Extras>>,
    /// Where the entry starts in the file.
    pub pos: Option<Pos>,
}

/// An entry's label, `until`, `when` and DNS names.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    pub label: Option<Arc<str>>,
    /// Inactive from this moment on.
    pub until: Option<Timestamp>,
    /// Active only inside this window.
    pub when: Option<Window>,
    /// `dns:` items, sorted, without duplicates: the entry also covers
    /// what they resolve to.
    pub dns: Vec<DnsName>,
    /// The groups of the feeds it names (`{ url: … }` groups), sorted,
    /// without duplicates: the entry also covers what they hold.
    pub feeds: Vec<Arc<str>>,
}

// A million entries are held: 16 bytes more each is 16 MB of the
// daemon's memory.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Entry>() == 80);

/// Window edges [`Entry::active_until`] steps over.
const ACTIVE_EDGES: usize = 64;

impl Entry {
    pub fn label(&self) -> Option<&str> {
        self.extras.as_ref()?.label.as_deref()
    }

    /// Inactive from this moment on.
    pub fn until(&self) -> Option<Timestamp> {
        self.extras.as_ref().and_then(|t| t.until)
    }

    /// Active only inside this window.
    pub fn when(&self) -> Option<&Window> {
        self.extras.as_ref().and_then(|t| t.when.as_ref())
    }

    /// The DNS names it covers the addresses of.
    pub fn dns(&self) -> &[DnsName] {
        self.extras.as_ref().map_or(&[], |t| &t.dns)
    }

    /// The feeds (by group) it covers the prefixes of.
    pub fn feeds(&self) -> &[Arc<str>] {
        self.extras.as_ref().map_or(&[], |t| &t.feeds)
    }

    pub fn is_active(&self, at: Timestamp) -> bool {
        self.until().is_none_or(|u| at < u) && self.when().is_none_or(|w| w.contains(at))
    }

    pub fn covers(&self, addr: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&addr))
    }

    /// When an entry active at `at` stops being active: its `until` or the
    /// end of the open `when` window, whichever comes first; None if never.
    /// A window's edges at which it stays active (adjacent parts) are
    /// stepped over, at most [`ACTIVE_EDGES`] of them; past those the last
    /// one is answered, which is early, never late.
    pub fn active_until(&self, at: Timestamp) -> Option<Timestamp> {
        let mut t = at;
        for _ in 0..ACTIVE_EDGES {
            let next = self.next_change(t)?;
            if !self.is_active(next) {
                return Some(next);
            }
            t = next;
        }
        Some(t)
    }

    /// The next moment after `at` at which [`Entry::is_active`] may change.
    pub fn next_change(&self, at: Timestamp) -> Option<Timestamp> {
        let until = self.until().filter(|u| *u > at);
        let edge = self.when().and_then(|w| w.next_edge(at));
        match (until, edge) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `tcp/22`, `udp/60000-61000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub proto: Proto,
    pub first: u16,
    pub last: u16,
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        if self.first == self.last {
            write!(f, "{p}/{}", self.first)
        } else {
            write!(f, "{p}/{}-{}", self.first, self.last)
        }
    }
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub ports: Vec<PortSpec>,
    /// None: the service uses the host-wide `allow`. Some(empty): nobody.
    pub allow: Option<Vec<Entry>>,
    pub pos: Option<Pos>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Infrastructure {
    pub ndp: bool,
    pub dhcp: bool,
    /// `dhcp: [servers]`: the exemption holds only for these (at most
    /// `MAX_DHCP_SERVERS`); empty: for any source.
    pub dhcp_servers: Vec<ipnet::IpNet>,
    pub pmtu: bool,
    pub mld: bool,
    pub return_traffic: bool,
    /// UDP flows (and the default of nothing else: only TCP and UDP have
    /// flows).
    pub flow_timeout: Duration,
    pub flow_timeout_tcp: Duration,
}

impl Default for Infrastructure {
    fn default() -> Self {
        Self {
            ndp: true,
            dhcp: true,
            dhcp_servers: Vec::new(),
            pmtu: true,
            mld: true,
            return_traffic: true,
            flow_timeout: Duration::from_secs(120),
            // An idle SSH or database session of the host's own lives
            // this long without a keepalive (conntrack's established
            // timeout is 5 days; most stateful middleboxes use 1 h).
            flow_timeout_tcp: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Events {
    /// At most one event per source this often (`per_source: 1/s`).
    pub per_source_interval: Duration,
    /// Events per second in all (`max_rate: 1000/s`); 0: none.
    pub max_per_sec: u32,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            per_source_interval: Duration::from_secs(1),
            max_per_sec: 1000,
        }
    }
}

/// `reject_max_rate` when the file does not say: a RST is 54 to 74 bytes,
/// so a spoofed flood reflects at most about 0.6 Mbit/s.
pub const DEFAULT_REJECT_MAX_PER_SEC: u32 = 1000;

/// A valid policy file (policy.md), ready to compile at any moment.
#[derive(Clone, Debug)]
pub struct Policy {
    pub mode: Mode,
    pub action: Action,
    pub scope: Scope,
    pub interfaces: Vec<String>,
    /// Names of the groups, in file order.
    pub groups: Vec<String>,
    pub allow: Vec<Entry>,
    /// In file order; service `i` has index `i + 1` in the datapath.
    pub services: Vec<Service>,
    pub deny: Vec<Entry>,
    pub always_allow: Vec<Entry>,
    pub infrastructure: Infrastructure,
    pub events: Events,
    /// RSTs per second `action: reject` sends in all (`reject_max_rate`);
    /// past it, refusals are dropped silently.
    pub reject_max_per_sec: u32,
    /// `lockout_guard: { ports: [...] }`: the TCP ports whose established
    /// sessions a new policy may not cut unless forced. None: port 22 and
    /// the ports of a service named `ssh`.
    pub lockout_ports: Option<Vec<PortSpec>>,
    pub dns: DnsSettings,
    /// Every DNS name its entries use, once, sorted: found when the policy
    /// is read, since the daemon asks at every compile.
    pub(crate) dns_names: Vec<DnsName>,
    /// The feeds (`{ url: … }` groups) its entries use, in the order the
    /// policy defines them; the daemon fetches them.
    pub feeds: Vec<Arc<crate::Feed>>,
}

/// `dns:`: a name is resolved again when its answer's TTL runs out,
/// clamped to [`min_ttl`, `max_ttl`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(3600),
        }
    }
}

impl Policy {
    /// Every DNS name its entries use, once, sorted.
    pub fn dns_names(&self) -> &[DnsName] {
        &self.dns_names
    }

    /// [`Policy::dns_names`] found in the lists.
    pub(crate) fn find_dns_names(&self) -> Vec<DnsName> {
        let mut v: Vec<DnsName> = self
            .allow
            .iter()
            .chain(&self.deny)
            .chain(&self.always_allow)
            .chain(self.services.iter().flat_map(|s| s.allow.iter().flatten()))
            .flat_map(|e| e.dns().iter().cloned())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The entry of list `list` written at `line` as `text` (what an
    /// [`crate::EntryInfo`] names): its DNS names and feeds, say.
    pub fn entry_at(
        &self,
        list: crate::ListKind,
        line: usize,
        text: &crate::Written,
    ) -> Option<&Entry> {
        let entries: &[Entry] = match list {
            crate::ListKind::Allow => &self.allow,
            crate::ListKind::Deny => &self.deny,
            crate::ListKind::AlwaysAllow => &self.always_allow,
            crate::ListKind::Service(i) => self
                .services
                .get(usize::from(i))
                .and_then(|s| s.allow.as_deref())?,
        };
        entries
            .iter()
            .find(|e| e.pos.is_some_and(|p| p.line as usize == line) && &e.text == text)
    }

    /// Of [`Policy::feeds`], the one group `group` defines.
    pub fn feed(&self, group: &str) -> Option<&Arc<crate::Feed>> {
        self.feeds.iter().find(|f| &*f.group == group)
    }

    /// The feeds of `feeds` that its lists use.
    pub(crate) fn used_feeds(&self, feeds: Vec<Arc<crate::Feed>>) -> Vec<Arc<crate::Feed>> {
        let mut used: Vec<&Arc<str>> = self
            .allow
            .iter()
            .chain(&self.deny)
            .chain(&self.always_allow)
            .chain(self.services.iter().flat_map(|s| s.allow.iter().flatten()))
            .flat_map(|e| e.feeds().iter())
            .collect();
        used.sort_unstable();
        used.dedup();
        feeds
            .into_iter()
            .filter(|f| used.binary_search(&&f.group).is_ok())
            .collect()
    }

    /// The service whose ports hold (proto, port), as an index into
    /// `services`.
    pub fn service_for(&self, proto: Proto, port: u16) -> Option<usize> {
        self.services.iter().position(|s| {
            s.ports
                .iter()
                .any(|p| p.proto == proto && p.first <= port && port <= p.last)
        })
    }
}
