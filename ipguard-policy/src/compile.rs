//! The compiler: a policy and a moment in time in, the exact contents of
//! the datapath maps out.
//!
//! An LPM trie answers with the most specific prefix only, so each prefix's
//! value must already say what every prefix containing it says. The
//! compiler sorts all prefixes of all active entries by (address, length):
//! a prefix then comes after every prefix that contains it, and the
//! containing prefixes of the current one are exactly a stack that a single
//! sweep maintains. Each prefix ORs its own bits into the bits of the top of
//! that stack. O(n log n) for the sort, O(n) for the sweep.

use std::collections::{HashMap, HashSet};
use std::{sync::Arc, time::SystemTime};

use ipguard_common::*;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use jiff::Timestamp;

use super::{
    CompiledPolicy, Entries, ListKind, Owner, PortRange, Provenance, Resolved, ServiceInfo,
    Written,
    model::{Action, Entry, Mode, Policy, Scope},
};

/// Owner list ids (see [`Owner::list`]): 0 the host-wide `allow`, 1..=63 a
/// service's list, then these two.
pub const LIST_DENY: u8 = 64;
pub const LIST_ALWAYS_ALLOW: u8 = 65;

/// A runtime entry (docs/policy.md §6): an allow, merged into the
/// host-wide `allow` or into the list of service `service`, or a deny,
/// merged into `deny` (it wins over every allow entry and loses only to
/// `always_allow`, as the policy's own denies; a deny has no service).
///
/// For a service without a list of its own, an allow extends what the
/// service inherits: the service then allows the host-wide list plus its
/// runtime entries, and other services are unaffected. A runtime entry
/// naming a service the current policy does not define is kept by the
/// daemon but compiles to nothing until such a service exists again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeEntry {
    pub kind: RuntimeKind,
    pub net: IpNet,
    pub service: Option<String>,
    pub label: Option<String>,
    pub until: Option<SystemTime>,
}

/// What a runtime entry does.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// `ipguard allow`.
    #[default]
    Allow,
    /// `ipguard deny`.
    Deny,
}

/// Unix nanoseconds of `t`, clamped to the kernel's u64 (before 1970: 0).
fn unix_ns(t: Timestamp) -> u64 {
    u64::try_from(t.as_nanosecond().max(0)).unwrap_or(NEVER - 1)
}

pub(crate) fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(if t < SystemTime::UNIX_EPOCH {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

/// The order in which owners of one exact prefix claim `PrefixValue::entry`:
/// always_allow, deny, the host-wide allow, then services by index.
fn rank(list: u8) -> u8 {
    match list {
        LIST_ALWAYS_ALLOW => 0,
        LIST_DENY => 1,
        s => s + 2,
    }
}

fn unrank(r: u8) -> u8 {
    match r {
        0 => LIST_ALWAYS_ALLOW,
        1 => LIST_DENY,
        r => r - 2,
    }
}

/// An address family's prefix key.
trait Key: Copy + Ord + std::hash::Hash {
    const BITS: u8;
    fn contains(net: Self, len: u8, addr: Self) -> bool;
}

impl Key for u32 {
    const BITS: u8 = 32;
    #[inline]
    fn contains(net: u32, len: u8, addr: u32) -> bool {
        len == 0 || (net ^ addr) >> (32 - u32::from(len)) == 0
    }
}

impl Key for u128 {
    const BITS: u8 = 128;
    #[inline]
    fn contains(net: u128, len: u8, addr: u128) -> bool {
        len == 0 || (net ^ addr) >> (128 - u32::from(len)) == 0
    }
}

/// One claim of an entry on a prefix, sorted into place.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Claim<K> {
    key: K,
    len: u8,
    rank: u8,
    entry: u32,
}

/// Unix nanoseconds of "never" in [`Builder::expiry`].
const NEVER: u64 = u64::MAX;

/// The deadline records and fallback values of the time-limited entries:
/// the first leaves of a slot ([`CompiledPolicy::timed`]), interned.
#[derive(Default)]
struct Timed {
    leaves: Vec<PrefixValue>,
    interned: HashMap<PrefixValue, u32, foldhash::fast::RandomState>,
}

impl Timed {
    fn intern(&mut self, v: PrefixValue) -> u32 {
        *self.interned.entry(v).or_insert_with(|| {
            self.leaves.push(v);
            (self.leaves.len() - 1) as u32
        })
    }

    /// `now` (the value at compile time) with its deadlines: `chain` holds
    /// (deadline, value from then on, None for no prefix), in time order.
    /// Returns `now` unchanged when the chain is empty or the records
    /// would not be addressable.
    fn link(&mut self, now: PrefixValue, chain: &[(u64, Option<PrefixValue>)]) -> PrefixValue {
        if chain.is_empty() || self.leaves.len() + 2 * chain.len() > TIMED_MAX_RECORD as usize {
            return now;
        }
        // From the last link back: each value points at the record of its
        // own deadline, which names the next value.
        let mut next = chain
            .last()
            .and_then(|(_, v)| *v)
            .map_or(R4_LEAF_NONE, |v| self.intern(v));
        for k in (0..chain.len()).rev() {
            let record = self.intern(
                Deadline {
                    at_unix_ns: chain[k].0,
                    fallback: next,
                    _pad0: 0,
                }
                .to_leaf(),
            );
            let timed = |v: PrefixValue| PrefixValue {
                flags: timed_flags(v.flags, record),
                ..v
            };
            if k == 0 {
                return timed(now);
            }
            next = match chain[k - 1].1 {
                Some(v) => self.intern(timed(v)),
                // Nothing holds the source from the previous deadline on:
                // later deadlines cannot matter (nothing can start again).
                None => R4_LEAF_NONE,
            };
        }
        now
    }
}

/// What a claim of `list` sets in a prefix value's mask or flags.
fn add_claim(list: u8, mask: &mut u64, flags: &mut u32) {
    match list {
        LIST_ALWAYS_ALLOW => *flags |= FLAG_ALWAYS_ALLOW,
        LIST_DENY => *flags |= FLAG_DENY,
        s => *mask |= 1u64 << s,
    }
}

/// The value's allow mask: services without a list of their own
/// (`inherit`) allow what the host-wide list (bit 0) allows.
fn allow_mask(mask: u64, inherit: u64) -> u64 {
    if mask & 1 != 0 { mask | inherit } else { mask }
}

/// One claim of a compiled prefix's level: (list, entry, expiry).
type LevelClaim = (u8, u32, u64);

/// The value a prefix holds from `at` on (Unix ns) as far as the kernel
/// can know it: the claims of the prefix and of those containing it
/// (`levels`, least specific first) that are still active then. With
/// `terminal`, also every timed claim except deny's is dropped: the end of
/// a chain longer than the kernel follows refuses rather than allows.
/// Attribution that needs the deciders map (several lists, different
/// entries) is answered as nobody's: the map holds today's deciders.
fn value_at<K: Key>(
    levels: &[(K, u8)],
    claims: &[Vec<LevelClaim>],
    at: u64,
    terminal: bool,
    inherit: u64,
    merged: u64,
) -> Option<PrefixValue> {
    let keep = |&(list, _, exp): &LevelClaim| {
        if terminal {
            exp == NEVER || (list == LIST_DENY && exp > at)
        } else {
            exp > at
        }
    };
    let (mut mask, mut flags, mut any) = (0u64, 0u32, false);
    let mut here: Vec<Decider<K>> = Vec::new();
    for (&(key, len), cl) in levels.iter().zip(claims).rev() {
        for c in cl.iter().filter(|c| keep(c)) {
            any = true;
            add_claim(c.0, &mut mask, &mut flags);
            // Deepest level first, and a level's claims of one list by
            // entry: the first one found decides, as in the sweep.
            if !here.iter().any(|d| d.list == c.0) {
                here.push(Decider {
                    list: c.0,
                    key,
                    len,
                    entry: c.1,
                });
            }
        }
    }
    if !any {
        return None;
    }
    let mut classes = Vec::new();
    decision_classes(&here, merged, &mut classes);
    let entry = match decider_of(&here, &classes, flags) {
        ENTRY_LOOKUP => ENTRY_NONE,
        e => e,
    };
    Some(PrefixValue {
        allow_mask: allow_mask(mask, inherit),
        flags,
        entry,
    })
}

/// The deadlines of a prefix whose levels hold timed claims, and the value
/// after each, at most [`DEADLINE_STEPS`] links; equal neighbours merged.
fn chain_of<K: Key>(
    now: PrefixValue,
    levels: &[(K, u8)],
    claims: &[Vec<LevelClaim>],
    inherit: u64,
    merged: u64,
) -> Vec<(u64, Option<PrefixValue>)> {
    let mut deadlines: Vec<u64> = claims
        .iter()
        .flatten()
        .map(|c| c.2)
        .filter(|&e| e != NEVER)
        .collect();
    deadlines.sort_unstable();
    deadlines.dedup();
    let steps = DEADLINE_STEPS as usize;
    let mut chain: Vec<(u64, Option<PrefixValue>)> = Vec::with_capacity(steps);
    let mut last = Some(now);
    for (k, &at) in deadlines.iter().enumerate().take(steps) {
        let terminal = k + 1 == steps && deadlines.len() > steps;
        let v = value_at(levels, claims, at, terminal, inherit, merged);
        if v != last {
            chain.push((at, v));
            last = v;
        }
        if v.is_none() {
            break;
        }
    }
    chain
}

/// The propagated prefixes of one family, in (address, length) order.
struct Swept<K> {
    prefixes: Vec<(K, u8, PrefixValue)>,
    first: Vec<u32>,
    /// The deciders map's contents: (list, key, len, entry).
    deciders: Vec<(u8, K, u8, u32)>,
}

/// The deciding entry of one list at a prefix: the most specific prefix of
/// the list containing it, and its first entry.
#[derive(Clone, Copy)]
struct Decider<K> {
    list: u8,
    key: K,
    len: u8,
    entry: u32,
}

/// `merged`: services that use the host-wide list and also have runtime
/// entries of their own; their packets are decided by the more specific of
/// the two lists' entries.
fn sweep<K: Key>(
    mut claims: Vec<Claim<K>>,
    expiry: &[u64],
    inherit: u64,
    merged: u64,
    decider_capacity: usize,
    owners: &mut Vec<Owner>,
    timed: &mut Timed,
) -> Swept<K> {
    claims.sort_unstable();
    let mut prefixes: Vec<(K, u8, PrefixValue)> = Vec::with_capacity(claims.len());
    let mut first: Vec<u32> = Vec::with_capacity(claims.len() + 1);
    // The prefixes containing the current one: (key, len, mask, flags), and
    // beside it, per level, the deciding entry of every list at that prefix,
    // kept in buffers reused across prefixes so that the sweep allocates
    // only per nesting depth.
    let mut stack: Vec<(K, u8, u64, u32)> = Vec::with_capacity(usize::from(K::BITS) + 1);
    let mut deciders: Vec<Vec<Decider<K>>> = Vec::new();
    // Per level, the claims there with their expiry, and whether this
    // level or one containing it has a timed claim (only those prefixes
    // get deadlines).
    let mut level_claims: Vec<Vec<LevelClaim>> = Vec::new();
    let mut level_timed: Vec<bool> = Vec::new();
    let mut levels: Vec<(K, u8)> = Vec::new();
    let expiry_of = |e: u32| expiry.get(e as usize).copied().unwrap_or(NEVER);
    // A policy without time-limited entries keeps no levels at all.
    let any_timed = expiry.iter().any(|&e| e != NEVER);
    let mut own: Vec<Decider<K>> = Vec::new();
    let mut classes: Vec<Decider<K>> = Vec::new();
    let mut needed: Vec<(u8, K, u8, u32)> = Vec::new();
    let mut needed_set: HashSet<(u8, K, u8)> = HashSet::new();
    let mut i = 0;
    while i < claims.len() {
        let (key, len) = (claims[i].key, claims[i].len);
        let (mut mask, mut flags) = (0u64, 0u32);
        first.push(u32::try_from(owners.len()).unwrap_or(u32::MAX));
        own.clear();
        let mut last_rank = None;
        let start = i;
        while i < claims.len() && claims[i].key == key && claims[i].len == len {
            let c = claims[i];
            let list = unrank(c.rank);
            add_claim(list, &mut mask, &mut flags);
            // Claims of one list are sorted by entry: the first is the one
            // written first.
            if last_rank != Some(c.rank) {
                owners.push(Owner {
                    list,
                    entry: c.entry,
                });
                own.push(Decider {
                    list,
                    key,
                    len,
                    entry: c.entry,
                });
                last_rank = Some(c.rank);
            }
            i += 1;
        }
        while let Some(&(k, l, _, _)) = stack.last() {
            if K::contains(k, l, key) && l < len {
                break;
            }
            stack.pop();
        }
        let depth = stack.len();
        if let Some(&(_, _, m, f)) = stack.last() {
            mask |= m;
            flags |= f;
        }
        stack.push((key, len, mask, flags));
        if any_timed {
            if level_claims.len() <= depth {
                level_claims.resize_with(depth + 1, Vec::new);
            }
            level_timed.truncate(depth);
            levels.truncate(depth);
            let mine = &mut level_claims[depth];
            mine.clear();
            mine.extend(
                claims[start..i]
                    .iter()
                    .map(|c| (unrank(c.rank), c.entry, expiry_of(c.entry))),
            );
            let own_timed = mine.iter().any(|c| c.2 != NEVER);
            level_timed.push(own_timed || depth > 0 && level_timed[depth - 1]);
            levels.push((key, len));
        }
        if deciders.len() <= depth {
            deciders.resize_with(depth + 1, Vec::new);
        }
        let (outer, inner) = deciders.split_at_mut(depth);
        let here = &mut inner[0];
        here.clear();
        here.extend_from_slice(&own);
        if let Some(parent) = outer.last() {
            here.extend(
                parent
                    .iter()
                    .filter(|p| !own.iter().any(|o| o.list == p.list)),
            );
        }
        decision_classes(here, merged, &mut classes);
        let mut entry = decider_of(here, &classes, flags);
        if entry == ENTRY_LOOKUP {
            // The packet's service picks the list; the deciders map answers
            // for each list that allows the prefix. See `decider_of` for why
            // a subset of the map (when it is full) still answers exactly.
            let fresh: Vec<_> = classes
                .iter()
                .filter(|d| !needed_set.contains(&(d.list, d.key, d.len)))
                .map(|d| (d.list, d.key, d.len, d.entry))
                .collect();
            if needed.len() + fresh.len() <= decider_capacity {
                for f in fresh {
                    needed_set.insert((f.0, f.1, f.2));
                    needed.push(f);
                }
            } else {
                entry = ENTRY_NONE;
            }
        }
        let mut value = PrefixValue {
            allow_mask: allow_mask(mask, inherit),
            flags,
            entry,
        };
        if any_timed && level_timed[depth] {
            let chain = chain_of(value, &levels, &level_claims[..=depth], inherit, merged);
            value = timed.link(value, &chain);
        }
        prefixes.push((key, len, value));
    }
    first.push(u32::try_from(owners.len()).unwrap_or(u32::MAX));
    Swept {
        prefixes,
        first,
        deciders: needed,
    }
}

/// The allow decisions possible at a prefix, one per key of the deciders
/// map (`Decider::list` is the key): the host-wide list (also for services
/// that use it), each service's own list, and for a `merged` service the
/// more specific of the host-wide entry and its runtime entry.
fn decision_classes<K: Key>(here: &[Decider<K>], merged: u64, out: &mut Vec<Decider<K>>) {
    out.clear();
    out.extend(
        here.iter()
            .filter(|d| d.list < LIST_DENY && merged & (1u64 << d.list) == 0),
    );
    let mut m = merged;
    while m != 0 {
        let s = m.trailing_zeros() as u8;
        m &= m - 1;
        let host = here.iter().find(|d| d.list == 0);
        let own = here.iter().find(|d| d.list == s);
        let best = match (host, own) {
            // On the same prefix the host-wide entry comes first, as in `explain`.
            (Some(h), Some(o)) => Some(if o.len > h.len { o } else { h }),
            (h, o) => h.or(o),
        };
        if let Some(b) = best {
            out.push(Decider { list: s, ..*b });
        }
    }
}

/// The entry the datapath credits (hit counter, event) for a packet whose
/// most specific prefix has these deciders: always_allow or deny decide
/// alone when set; otherwise the packet is allowed by one of the allow
/// lists, and which one depends on its port. When all the lists that allow
/// the prefix are decided by the same entry, that entry; when they differ (a
/// service's own list nested in the host-wide one, say), [`ENTRY_LOOKUP`]:
/// the datapath then looks up (list, source) in the deciders map, which
/// holds each needed list's deciding prefix. That second lookup is exact
/// even though the map holds only some prefixes of each list: any prefix of
/// list L in it that contains the source also contains the source's most
/// specific compiled prefix P (else it would be more specific than P), so
/// it is no more specific than P's decider for L, which the map holds.
fn decider_of<K>(deciders: &[Decider<K>], classes: &[Decider<K>], flags: u32) -> u32 {
    let of = |list: u8| deciders.iter().find(|d| d.list == list).map(|d| d.entry);
    if flags & FLAG_ALWAYS_ALLOW != 0 {
        return of(LIST_ALWAYS_ALLOW).unwrap_or(ENTRY_NONE);
    }
    if flags & FLAG_DENY != 0 {
        return of(LIST_DENY).unwrap_or(ENTRY_NONE);
    }
    let mut allow = classes.iter().map(|d| d.entry);
    match allow.next() {
        Some(e) if allow.all(|o| o == e) => e,
        Some(_) => ENTRY_LOOKUP,
        None => ENTRY_NONE,
    }
}

/// Collects the claims of the active entries and their descriptions.
struct Builder {
    entries: Entries,
    /// Per entry, when it stops being active (Unix ns; [`NEVER`]).
    expiry: Vec<u64>,
    v4: Vec<Claim<u32>>,
    v6: Vec<Claim<u128>>,
    now: Timestamp,
    next_change: Option<Timestamp>,
    /// Bit `l`: allow list `l` (0..=63) claimed at least one prefix.
    claimed: u64,
}

impl Builder {
    fn note_change(&mut self, t: Option<Timestamp>) {
        if let Some(t) = t
            && self.next_change.is_none_or(|n| t < n)
        {
            self.next_change = Some(t);
        }
    }

    fn claim(&mut self, net: &IpNet, list: u8, entry: u32) {
        if list < LIST_DENY {
            self.claimed |= 1u64 << list;
        }
        let rank = rank(list);
        match net {
            IpNet::V4(n) => self.v4.push(Claim {
                key: u32::from(n.network()),
                len: n.prefix_len(),
                rank,
                entry,
            }),
            IpNet::V6(n) => self.v6.push(Claim {
                key: u128::from(n.network()),
                len: n.prefix_len(),
                rank,
                entry,
            }),
        }
    }

    /// `list` is the policy's list `kind` (which `Entries` reads again).
    fn list(&mut self, list: &[Entry], kind: ListKind, id: u8, dns: &Resolved) {
        let first = self.entries.push_list(kind) as usize;
        debug_assert_eq!(self.entries.len(), first + list.len());
        for (k, e) in list.iter().enumerate() {
            let idx = u32::try_from(first + k).unwrap_or(ENTRY_NONE - 1);
            self.note_change(e.next_change(self.now));
            let active = e.is_active(self.now);
            self.expiry.push(if active {
                e.active_until(self.now).map_or(NEVER, unix_ns)
            } else {
                NEVER
            });
            if active {
                for n in &e.nets {
                    self.claim(n, id, idx);
                }
                for name in e.dns() {
                    for a in dns.addresses(name) {
                        self.claim(&IpNet::from(a), id, idx);
                    }
                }
                for f in e.feeds() {
                    for n in dns.feed(f) {
                        self.claim(n, id, idx);
                    }
                }
            }
        }
    }
}

/// The datapath contents of `policy` at `at`, with the runtime entries
/// merged in. Never fails: everything that can be wrong was refused when
/// the policy was loaded.
pub fn compile(policy: &Arc<Policy>, at: SystemTime, runtime: &[RuntimeEntry]) -> CompiledPolicy {
    compile_with(policy, at, runtime, &Resolved::default())
}

/// [`compile`] with the addresses the policy's DNS names resolved to
/// (the daemon's resolver's last answers) and the prefixes of its feeds'
/// last good copies; a name or feed without one adds nothing.
pub fn compile_with(
    policy: &Arc<Policy>,
    at: SystemTime,
    runtime: &[RuntimeEntry],
    dns: &Resolved,
) -> CompiledPolicy {
    let now = timestamp(at);
    let total: usize = policy.allow.len()
        + policy.deny.len()
        + policy.always_allow.len()
        + policy
            .services
            .iter()
            .map(|s| s.allow.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
        + runtime.len();
    let mut b = Builder {
        entries: Entries::new(policy),
        expiry: Vec::with_capacity(total),
        v4: Vec::new(),
        v6: Vec::new(),
        now,
        next_change: None,
        claimed: 0,
    };
    b.list(&policy.allow, ListKind::Allow, 0, dns);
    let mut services = Vec::with_capacity(policy.services.len());
    let mut ports = Vec::new();
    let mut inherit = 0u64;
    for (i, s) in policy.services.iter().enumerate().take(MAX_SERVICES) {
        let index = (i + 1) as u8;
        services.push(ServiceInfo {
            index,
            name: s.name.clone(),
            has_own_list: s.allow.is_some(),
        });
        for p in &s.ports {
            ports.push(PortRange {
                proto: p.proto,
                first: p.first,
                last: p.last,
                service: index,
            });
        }
        match &s.allow {
            Some(l) => b.list(l, ListKind::Service(index), index, dns),
            None => inherit |= 1u64 << index,
        }
    }
    b.list(&policy.deny, ListKind::Deny, LIST_DENY, dns);
    b.list(
        &policy.always_allow,
        ListKind::AlwaysAllow,
        LIST_ALWAYS_ALLOW,
        dns,
    );
    for r in runtime {
        let (kind, id) = match (r.kind, &r.service) {
            (RuntimeKind::Deny, _) => (ListKind::Deny, LIST_DENY),
            (RuntimeKind::Allow, None) => (ListKind::Allow, 0),
            (RuntimeKind::Allow, Some(name)) => match services.iter().find(|s| &s.name == name) {
                Some(s) => (ListKind::Service(s.index), s.index),
                None => continue,
            },
        };
        let until = r.until.map(timestamp);
        let idx = b
            .entries
            .push_runtime(
                kind,
                // As runtime entries have always been shown (`ADDR/LEN`).
                Written::from(r.net.trunc().to_string().as_str()),
                r.label.as_deref().map(Arc::from),
            )
            .min(ENTRY_NONE - 1);
        b.note_change(until.filter(|u| *u > now));
        b.expiry.push(until.map_or(NEVER, unix_ns));
        if until.is_none_or(|u| now < u) {
            b.claim(&r.net.trunc(), id, idx);
        }
    }
    ports.sort_by_key(|p: &PortRange| (p.proto, p.first));

    let Builder {
        entries,
        expiry,
        v4,
        v6,
        next_change,
        claimed,
        ..
    } = b;
    let merged = inherit & claimed;
    let mut owners = Vec::new();
    let mut timed = Timed::default();
    let s4 = sweep(
        v4,
        &expiry,
        inherit,
        merged,
        DECIDERS_V4_CAPACITY as usize,
        &mut owners,
        &mut timed,
    );
    let s6 = sweep(
        v6,
        &expiry,
        inherit,
        merged,
        DECIDERS_V6_CAPACITY as usize,
        &mut owners,
        &mut timed,
    );
    let deciders_v4 = s4
        .deciders
        .iter()
        .map(|&(list, k, l, e)| (list, Ipv4Net::new_assert(k.into(), l), e))
        .collect();
    let deciders_v6 = s6
        .deciders
        .iter()
        .map(|&(list, k, l, e)| (list, Ipv6Net::new_assert(k.into(), l), e))
        .collect();
    let decider_keys = merged
        | services
            .iter()
            .filter(|s| s.has_own_list)
            .fold(0u64, |m, s| m | 1u64 << s.index);
    let v4 = s4
        .prefixes
        .into_iter()
        .map(|(k, l, v)| (Ipv4Net::new_assert(k.into(), l), v))
        .collect();
    let v6 = s6
        .prefixes
        .into_iter()
        .map(|(k, l, v)| (Ipv6Net::new_assert(k.into(), l), v))
        .collect();

    CompiledPolicy {
        config: PolicyConfig {
            decider_keys,
            ..config(policy)
        },
        v4,
        v6,
        timed: timed.leaves,
        deciders_v4,
        deciders_v6,
        ports,
        services,
        entries,
        dhcp_servers: policy.infrastructure.dhcp_servers.clone(),
        lockout_ports: lockout_ports(policy),
        next_change: next_change.map(SystemTime::from),
        provenance: Provenance {
            v4_first: s4.first,
            v6_first: s6.first,
            owners,
        },
    }
}

/// The lockout guard's TCP ports: as the policy says, else port 22 and the
/// TCP ports of a service named `ssh`.
fn lockout_ports(p: &Policy) -> Vec<(u16, u16)> {
    let ports: Vec<(u16, u16)> = match &p.lockout_ports {
        Some(list) => list.iter().map(|s| (s.first, s.last)).collect(),
        None => std::iter::once((22, 22))
            .chain(
                p.services
                    .iter()
                    .filter(|s| s.name == "ssh")
                    .flat_map(|s| s.ports.iter())
                    .filter(|s| s.proto == super::Proto::Tcp)
                    .map(|s| (s.first, s.last)),
            )
            .collect(),
    };
    let mut ports = ports;
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn config(p: &Policy) -> PolicyConfig {
    let infra = &p.infrastructure;
    let bit = |on: bool, b: u32| if on { b } else { 0 };
    PolicyConfig {
        mode: match p.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Monitor => MODE_MONITOR,
            Mode::Off => MODE_OFF,
        },
        action: match p.action {
            Action::Drop => ACTION_DROP,
            Action::Reject => ACTION_REJECT,
        },
        scope: match p.scope {
            Scope::Host => SCOPE_HOST,
            Scope::Services => SCOPE_SERVICES,
        },
        infra: bit(infra.ndp, INFRA_NDP)
            | bit(infra.dhcp, INFRA_DHCP)
            | bit(infra.pmtu, INFRA_PMTU)
            | bit(infra.mld, INFRA_MLD)
            | bit(infra.return_traffic, INFRA_RETURN_TRAFFIC),
        flow_timeout_ns: u64::try_from(infra.flow_timeout.as_nanos()).unwrap_or(u64::MAX),
        event_source_interval_ns: u64::try_from(p.events.per_source_interval.as_nanos())
            .unwrap_or(u64::MAX),
        event_max_per_sec: p.events.max_per_sec,
        // Where the slot's lookup lies, and its size: the loader's.
        r4_range_base: 0,
        generation: 0,
        decider_keys: 0,
        flow_timeout_tcp_ns: u64::try_from(infra.flow_timeout_tcp.as_nanos()).unwrap_or(u64::MAX),
        // The host's, not the policy's: the loader fills them in.
        ephemeral_first: 0,
        ephemeral_last: 0,
        reject_max_per_sec: p.reject_max_per_sec,
        dhcp_servers: u32::try_from(infra.dhcp_servers.len()).unwrap_or(u32::MAX),
        r4_leaf_base: 0,
        v4_prefixes: 0,
        r4_ranges: 0,
        r4_leaves: 0,
        timed_leaves: 0,
        unix_at_boot_ns: 0,
        r6_node_base: 0,
        r6_nodes: 0,
        r6_leaf_base: 0,
        r6_leaves: 0,
        v6_prefixes: 0,
        // Of the tables the loader writes: the loader's.
        format: 0,
        r6_window: ipguard_common::R6Window::default(),
        r4_frequent: [ipguard_common::R4_LEAF_NONE; ipguard_common::FREQUENT],
        r6_frequent: [ipguard_common::R4_LEAF_NONE; ipguard_common::FREQUENT],
    }
}
