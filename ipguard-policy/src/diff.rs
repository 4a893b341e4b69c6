//! What changes from one policy to another: the addresses each list gains
//! and loses, the DNS names and feeds it starts or stops naming, the
//! services and settings that differ, and the verdicts of given packets.
//! What `ipguard diff` and `ipguard apply --dry-run` show.
//!
//! Lists are compared by the addresses they cover, not by how they are
//! written: `203.0.113.0/24` and its two /25s are the same list, and a
//! range that grows by one address shows that address. Entries' `until`
//! and `when` are not compared as moments (a diff is of what is written);
//! a changed window shows as a changed setting of no list, so it is said
//! in the entries' texts only when their addresses change. Compare the
//! verdicts at a moment for that ([`verdict_changes`]).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};
use serde::Serialize;

use crate::{CompiledPolicy, Entry, Explainer, Explanation, Policy, Proto};

/// The differences of one list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ListDiff {
    /// `allow`, `deny`, `always_allow`, or `service NAME` (its own list).
    pub list: String,
    /// Addresses the new policy's list covers and the old one's does not,
    /// as the fewest prefixes.
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    /// DNS names (`dns:NAME`) and feeds (`feed GROUP`) it starts or stops
    /// naming (what they stand for is the daemon's to know).
    pub sources_added: Vec<String>,
    pub sources_removed: Vec<String>,
}

/// Everything that differs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    /// Only the lists that differ.
    pub lists: Vec<ListDiff>,
    /// One line per service change: added, removed, ports, own list.
    pub services: Vec<String>,
    /// One line per top-level setting that differs (`mode: enforce ->
    /// monitor`).
    pub settings: Vec<String>,
}

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty() && self.services.is_empty() && self.settings.is_empty()
    }
}

/// A packet whose verdict differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictChange {
    pub src: IpAddr,
    pub port: Option<(Proto, u16)>,
    pub old: Explanation,
    pub new: Explanation,
}

/// Address intervals, [first, last] as numbers, sorted and disjoint, of one
/// family.
fn intervals(mut v: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            // Overlapping or adjacent: one interval.
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Of sorted disjoint `a`, what `b` does not cover.
fn minus(a: &[(u128, u128)], b: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(mut lo, hi) in a {
        while j < b.len() && b[j].1 < lo {
            j += 1;
        }
        let mut k = j;
        let mut whole = true;
        while k < b.len() && b[k].0 <= hi {
            if b[k].0 > lo {
                out.push((lo, b[k].0 - 1));
            }
            if b[k].1 >= hi {
                whole = false;
                break;
            }
            lo = b[k].1 + 1;
            k += 1;
        }
        if whole {
            out.push((lo, hi));
        }
    }
    out
}

/// Sorted disjoint [first, last] address intervals of one family.
type Intervals = Vec<(u128, u128)>;

/// The addresses of `list` (IPv4, IPv6) and its DNS names and feeds.
fn coverage(list: &[Entry]) -> (Intervals, Intervals, BTreeSet<String>) {
    let (mut v4, mut v6, mut sources) = (Vec::new(), Vec::new(), BTreeSet::new());
    for e in list {
        for n in &e.nets {
            match n {
                IpNet::V4(n) => v4.push((
                    u128::from(u32::from(n.network())),
                    u128::from(u32::from(n.broadcast())),
                )),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        for d in e.dns() {
            sources.insert(d.to_string());
        }
        for f in e.feeds() {
            sources.insert(format!("feed {f}"));
        }
    }
    (intervals(v4), intervals(v6), sources)
}

/// The fewest prefixes of IPv4 intervals (`v4`) or IPv6 ones.
fn prefixes(iv: &[(u128, u128)], v4: bool) -> Vec<IpNet> {
    let mut out = Vec::new();
    for &(a, b) in iv {
        if v4 {
            let (a, b) = (Ipv4Addr::from(a as u32), Ipv4Addr::from(b as u32));
            out.extend(Ipv4Subnets::new(a, b, 0).map(IpNet::V4));
        } else {
            out.extend(Ipv6Subnets::new(Ipv6Addr::from(a), Ipv6Addr::from(b), 0).map(IpNet::V6));
        }
    }
    out
}

fn list_diff(name: String, old: &[Entry], new: &[Entry]) -> Option<ListDiff> {
    let (o4, o6, os) = coverage(old);
    let (n4, n6, ns) = coverage(new);
    let mut added = prefixes(&minus(&n4, &o4), true);
    added.extend(prefixes(&minus(&n6, &o6), false));
    let mut removed = prefixes(&minus(&o4, &n4), true);
    removed.extend(prefixes(&minus(&o6, &n6), false));
    let d = ListDiff {
        list: name,
        added,
        removed,
        sources_added: ns.difference(&os).cloned().collect(),
        sources_removed: os.difference(&ns).cloned().collect(),
    };
    let empty = d.added.is_empty()
        && d.removed.is_empty()
        && d.sources_added.is_empty()
        && d.sources_removed.is_empty();
    (!empty).then_some(d)
}

fn ports(s: &crate::Service) -> String {
    let p: Vec<String> = s.ports.iter().map(|p| p.to_string()).collect();
    p.join(", ")
}

/// What differs from `old` to `new`.
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    let mut d = PolicyDiff::default();
    for (name, o, n) in [
        ("allow", &old.allow, &new.allow),
        ("deny", &old.deny, &new.deny),
        ("always_allow", &old.always_allow, &new.always_allow),
    ] {
        d.lists.extend(list_diff(name.to_string(), o, n));
    }
    for s in &new.services {
        match old.services.iter().find(|o| o.name == s.name) {
            None => {
                let own = if s.allow.is_some() {
                    "its own allow list"
                } else {
                    "the host-wide allow list"
                };
                d.services
                    .push(format!("service {}: added ({}; {own})", s.name, ports(s)));
                if let Some(l) = &s.allow {
                    d.lists
                        .extend(list_diff(format!("service {}", s.name), &[], l));
                }
            }
            Some(o) => {
                if o.ports != s.ports {
                    d.services.push(format!(
                        "service {}: ports {} -> {}",
                        s.name,
                        ports(o),
                        ports(s)
                    ));
                }
                match (&o.allow, &s.allow) {
                    (None, Some(_)) => d.services.push(format!(
                        "service {}: now has its own allow list (was the host-wide one)",
                        s.name
                    )),
                    (Some(_), None) => d.services.push(format!(
                        "service {}: now uses the host-wide allow list (had its own)",
                        s.name
                    )),
                    _ => {}
                }
                let empty: Vec<Entry> = Vec::new();
                if o.allow.is_some() || s.allow.is_some() {
                    d.lists.extend(list_diff(
                        format!("service {}", s.name),
                        o.allow.as_ref().unwrap_or(&empty),
                        s.allow.as_ref().unwrap_or(&empty),
                    ));
                }
            }
        }
    }
    for o in &old.services {
        if !new.services.iter().any(|s| s.name == o.name) {
            d.services
                .push(format!("service {}: removed ({})", o.name, ports(o)));
            if let Some(l) = &o.allow {
                d.lists
                    .extend(list_diff(format!("service {}", o.name), l, &[]));
            }
        }
    }
    let mut setting = |key: &str, a: String, b: String| {
        if a != b {
            d.settings.push(format!("{key}: {a} -> {b}"));
        }
    };
    setting("mode", old.mode.as_str().into(), new.mode.as_str().into());
    setting(
        "action",
        old.action.as_str().into(),
        new.action.as_str().into(),
    );
    setting(
        "scope",
        old.scope.as_str().into(),
        new.scope.as_str().into(),
    );
    setting(
        "interfaces",
        format!("{:?}", old.interfaces),
        format!("{:?}", new.interfaces),
    );
    setting(
        "reject_max_rate",
        format!("{}/s", old.reject_max_per_sec),
        format!("{}/s", new.reject_max_per_sec),
    );
    setting(
        "infrastructure",
        format!("{:?}", old.infrastructure),
        format!("{:?}", new.infrastructure),
    );
    setting(
        "events",
        format!("{:?}", old.events),
        format!("{:?}", new.events),
    );
    let guard = |p: &Option<Vec<crate::PortSpec>>| match p {
        None => "tcp/22 and the ports of service ssh (the default)".to_string(),
        Some(v) => v
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    setting(
        "lockout_guard",
        guard(&old.lockout_ports),
        guard(&new.lockout_ports),
    );
    setting("dns", format!("{:?}", old.dns), format!("{:?}", new.dns));
    d
}

/// Of `probes`, the packets whose verdict differs between the two
/// compiled policies (reason and deciding entry aside: only pass versus
/// refuse, and the kind of refusal, count).
pub fn verdict_changes(
    old: &CompiledPolicy,
    new: &CompiledPolicy,
    probes: &[(IpAddr, Option<(Proto, u16)>)],
) -> Vec<VerdictChange> {
    let (a, b) = (Explainer::new(old), Explainer::new(new));
    probes
        .iter()
        .filter_map(|&(src, port)| {
            let (o, n) = (a.explain(src, port), b.explain(src, port));
            (o.verdict != n.verdict).then_some(VerdictChange {
                src,
                port,
                old: o,
                new: n,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_of_intervals() {
        let a = [(0, 10), (20, 30)];
        assert_eq!(minus(&a, &[]), a);
        assert_eq!(minus(&a, &[(5, 25)]), [(0, 4), (26, 30)]);
        assert_eq!(minus(&a, &[(0, 30)]), []);
        assert_eq!(
            minus(&a, &[(2, 3), (6, 7)]),
            [(0, 1), (4, 5), (8, 10), (20, 30)]
        );
        assert_eq!(minus(&[(0, u128::MAX)], &[(0, 5)]), [(6, u128::MAX)]);
        assert_eq!(
            intervals(vec![(5, 9), (0, 4), (20, 21), (8, 12)]),
            [(0, 12), (20, 21)]
        );
    }
}
