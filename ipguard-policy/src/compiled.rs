//! What the policy compiler produces: the exact contents of one datapath
//! slot, plus what user space needs to explain and report it. This is the
//! contract between the compiler (`policy`) and the loader (`datapath`).

use std::time::SystemTime;

use ipguard_common::{PolicyConfig, PrefixValue};
use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number (for `ipguard_common::port_index`).
    pub fn protocol(self) -> u8 {
        match self {
            Proto::Tcp => ipguard_common::IPPROTO_TCP,
            Proto::Udp => ipguard_common::IPPROTO_UDP,
        }
    }
}

/// `proto/first-last` belongs to service `service` (1..=63).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub proto: Proto,
    pub first: u16,
    pub last: u16,
    pub service: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// 1..=63, the bit of this service in `PrefixValue::allow_mask`.
    pub index: u8,
    pub name: String,
    /// False: the service inherits the host-wide list.
    pub has_own_list: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListKind {
    Allow,
    Deny,
    AlwaysAllow,
    /// A service's own allow list (service index).
    Service(u8),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// Mode, action, scope, infrastructure, event limits. `generation` is
    /// left 0: the loader sets it.
    pub config: PolicyConfig,
    /// Sorted by address then prefix length, no duplicates.
    pub v4: Vec<(Ipv4Net, PrefixValue)>,
    pub v6: Vec<(Ipv6Net, PrefixValue)>,
    /// The first leaves of the slot: the deadline records and fallback
    /// values that the values with `ipguard_common::FLAG_TIMED` (both
    /// families) point into, by index.
    pub timed: Vec<PrefixValue>,
    /// The deciders maps: (list, prefix, entry) for the prefixes whose
    /// value says `ENTRY_LOOKUP`.
    pub deciders_v4: Vec<(u8, Ipv4Net, u32)>,
    pub deciders_v6: Vec<(u8, Ipv6Net, u32)>,
    pub ports: Vec<PortRange>,
    pub services: Vec<ServiceInfo>,
    /// Indexed by `PrefixValue::entry`; a policy entry is read from the
    /// policy, shared.
    pub entries: crate::Entries,
    /// `dhcp: [...]`: the only sources whose DHCP replies are
    /// infrastructure (empty: any, when DHCP is exempted at all).
    pub dhcp_servers: Vec<ipnet::IpNet>,
    /// TCP port ranges (first, last) of the lockout guard: established
    /// inbound sessions on them are not cut unless forced.
    pub lockout_ports: Vec<(u16, u16)>,
    /// The next moment at which compiling again would give another result
    /// (an `until` or a time-window edge); None if never.
    pub next_change: Option<SystemTime>,
    /// Which entries own each prefix, for `explain` (user space only).
    pub provenance: Provenance,
}

/// An entry that names a prefix exactly. `list`: 0 the host-wide `allow`,
/// 1..=63 that service's list, 64 `deny`, 65 `always_allow`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub list: u8,
    pub entry: u32,
}

/// The owners of each compiled prefix: those of `v4[i]` are
/// `owners[v4_first[i]..v4_first[i + 1]]` (one per list, the entry written
/// first), likewise for `v6`. Every compiled prefix has at least one owner.
/// Kept apart from [`PrefixValue`] so that the kernel's value stays 16
/// bytes; about 12 bytes per prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    pub v4_first: Vec<u32>,
    pub v6_first: Vec<u32>,
    pub owners: Vec<Owner>,
}
