//! The verdict of a compiled policy for one packet, found the way the XDP
//! program finds it: a longest-prefix match over the compiled (prefix,
//! value) pairs, the service from the compiled port table, and
//! [`ipguard_common::decide`]. Nothing here reads the policy file again, so
//! `explain` can only disagree with the kernel if the compiled tables do.
//!
//! The longest-prefix match is a binary search over the prefixes sorted by
//! (address, length), then a walk up to the nearest prefix that contains the
//! address. Prefixes of a policy nest (any two are disjoint or one contains
//! the other), so the last prefix starting at or before the address is
//! either the answer or inside it: the answer is its nearest ancestor that
//! contains the address. One search of ~20 steps for a million prefixes,
//! then rarely more than a step or two up.

use std::{collections::HashMap, net::IpAddr};

use ipguard_common::*;
use ipnet::IpNet;
use serde::Serialize;

use super::{
    CompiledPolicy, EntryInfo, Owner, Proto,
    compile::{LIST_ALWAYS_ALLOW, LIST_DENY},
    image::{SlotImage, TrieKey},
};

const NONE: u32 = u32::MAX;

/// `tcp/22`, `udp/53`.
pub fn parse_port_query(s: &str) -> Result<(Proto, u16), String> {
    let bad = || format!("{s:?} is not a protocol and port: write e.g. tcp/22 or udp/53");
    let (p, n) = s.trim().split_once('/').ok_or_else(bad)?;
    let proto = match p {
        "tcp" | "TCP" => Proto::Tcp,
        "udp" | "UDP" => Proto::Udp,
        _ => return Err(bad()),
    };
    if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = n.parse().map_err(|_| bad())?;
    Ok((proto, port))
}

/// Why a packet gets its verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// `VERDICT_*` of ipguard_common.
    pub verdict: u8,
    /// `REASON_*` of ipguard_common.
    pub reason: u8,
    /// The service the packet was judged for.
    pub service: Option<String>,
    /// The prefix that decided, e.g. `203.0.113.0/24`.
    pub entry: Option<String>,
    /// That entry's label.
    pub label: Option<String>,
    /// That entry as written in the policy (`office`, a range, ...).
    pub written: Option<String>,
    /// That entry's line in the policy file (None: a runtime entry).
    pub line: Option<usize>,
}

impl Explanation {
    /// Refused (dropped or rejected) in enforce mode; `would_drop` passes.
    pub fn refuses(&self) -> bool {
        self.verdict == VERDICT_DROP || self.verdict == VERDICT_REJECT
    }
    pub fn verdict_name(&self) -> &'static str {
        verdict_name(self.verdict)
    }
    pub fn reason_name(&self) -> &'static str {
        reason_name(self.reason)
    }

    /// The object of docs/cli.md for this query.
    pub fn to_json(&self, src: &str, port: Option<&str>) -> serde_json::Value {
        serde_json::json!({
            "src": src,
            "port": port,
            "verdict": self.verdict_name(),
            "reason": self.reason_name(),
            "service": self.service,
            "entry": self.entry,
            "label": self.label,
            "written": self.written,
            "line": self.line,
        })
    }
}

/// The answer before anything is copied out of the compiled policy.
#[derive(Clone, Copy, Debug)]
pub struct ExplainRef<'a> {
    pub decision: Decision,
    pub service: Option<&'a str>,
    /// The deciding prefix and the entry that owns it.
    pub decider: Option<(IpNet, EntryInfo<'a>)>,
    /// Whether the service (if any) has a list of its own.
    pub service_own_list: bool,
}

impl ExplainRef<'_> {
    pub fn to_owned(&self) -> Explanation {
        Explanation {
            verdict: self.decision.verdict,
            reason: self.decision.reason,
            service: self.service.map(str::to_string),
            entry: self.decider.map(|(n, _)| n.to_string()),
            label: self.decider.and_then(|(_, e)| e.label.map(str::to_string)),
            written: self.decider.map(|(_, e)| e.text.to_string()),
            line: self.decider.and_then(|(_, e)| e.line),
        }
    }

    /// Writes the docs/cli.md JSON object (one line, no newline) for a query.
    pub fn write_json<W: std::io::Write>(
        &self,
        w: &mut W,
        src: &str,
        port: Option<&str>,
    ) -> serde_json::Result<()> {
        #[derive(Serialize)]
        struct Out<'a> {
            src: &'a str,
            port: Option<&'a str>,
            verdict: &'static str,
            reason: &'static str,
            service: Option<&'a str>,
            entry: Option<IpNet>,
            label: Option<&'a str>,
            written: Option<&'a crate::Written>,
            line: Option<usize>,
        }
        serde_json::to_writer(
            w,
            &Out {
                src,
                port,
                verdict: verdict_name(self.decision.verdict),
                reason: reason_name(self.decision.reason),
                service: self.service,
                entry: self.decider.map(|(n, _)| n),
                label: self.decider.and_then(|(_, e)| e.label),
                written: self.decider.map(|(_, e)| e.text),
                line: self.decider.and_then(|(_, e)| e.line),
            },
        )
    }

    /// The readable line of docs/cli.md, without the query in front:
    /// `drop (not in the allowlist of service ssh)`.
    pub fn describe(&self, port: Option<&str>) -> String {
        let d = &self.decision;
        let decider = || match self.decider {
            Some((n, e)) => match &e.label {
                Some(l) => format!("{n} {l:?}"),
                None => n.to_string(),
            },
            None => "an entry".to_string(),
        };
        let list = match self.service {
            None => "the host-wide allowlist".to_string(),
            Some(s) if self.service_own_list => format!("the allowlist of service {s}"),
            Some(s) => format!("the host-wide allowlist, which service {s} uses"),
        };
        let why = match d.reason {
            REASON_OFF => "mode: off".to_string(),
            REASON_ALWAYS_ALLOW => format!("always_allow {}", decider()),
            REASON_DENY => format!("denied by {}", decider()),
            REASON_OUT_OF_SCOPE => match port {
                Some(p) => format!("no service on {p}, and scope: services"),
                None => "no service port, and scope: services".to_string(),
            },
            REASON_ALLOWED => format!("allowed by {} in {list}", decider()),
            REASON_NOT_ALLOWED => format!("not in {list}"),
            REASON_FRAGMENT if d.verdict == VERDICT_PASS => {
                "a fragment without port, from a source some list allows".to_string()
            }
            REASON_FRAGMENT => "a fragment without port, allowed by no list".to_string(),
            r => reason_name(r).to_string(),
        };
        format!("{} ({why})", verdict_name(d.verdict))
    }
}

/// Answers queries from a compiled policy; see the module documentation.
pub struct Explainer<'a> {
    c: &'a CompiledPolicy,
    v4_keys: Vec<u32>,
    /// `v4_bucket[b]`: the first prefix whose address's top 16 bits are
    /// `>= b`, so that a search touches only the prefixes of one /16.
    v4_bucket: Vec<u32>,
    v4_parent: Vec<u32>,
    v6_keys: Vec<u128>,
    v6_parent: Vec<u32>,
    /// The slot image's port table (`port_index(0, ..)` -> service).
    ports: Vec<u8>,
    names: [Option<&'a str>; 64],
    own_list: u64,
    /// The slot image's deciders, as the kernel's tries hold them, asked
    /// longest prefix first like an LPM lookup.
    dec4: HashMap<TrieKey<5>, u32>,
    dec6: HashMap<TrieKey<17>, u32>,
}

/// The nearest strictly containing prefix of each prefix, by a stack sweep
/// over the sorted prefixes.
fn parents<K: Copy>(
    keys: &[K],
    lens: impl Iterator<Item = u8>,
    contains: impl Fn(K, u8, K) -> bool,
) -> Vec<u32> {
    let mut parent = Vec::with_capacity(keys.len());
    let mut stack: Vec<(K, u8, u32)> = Vec::new();
    for (i, len) in lens.enumerate() {
        let key = keys[i];
        while let Some(&(k, l, _)) = stack.last() {
            if l < len && contains(k, l, key) {
                break;
            }
            stack.pop();
        }
        parent.push(stack.last().map_or(NONE, |&(_, _, p)| p));
        stack.push((key, len, i as u32));
    }
    parent
}

fn contains4(net: u32, len: u8, a: u32) -> bool {
    len == 0 || (net ^ a) >> (32 - u32::from(len)) == 0
}
fn contains6(net: u128, len: u8, a: u128) -> bool {
    len == 0 || (net ^ a) >> (128 - u32::from(len)) == 0
}

impl<'a> Explainer<'a> {
    pub fn new(c: &'a CompiledPolicy) -> Self {
        let v4_keys: Vec<u32> = c.v4.iter().map(|(n, _)| u32::from(n.network())).collect();
        let v4_parent = parents(
            &v4_keys,
            c.v4.iter().map(|(n, _)| n.prefix_len()),
            contains4,
        );
        let mut v4_bucket = Vec::with_capacity(65537);
        let mut i = 0usize;
        for b in 0..=65536u32 {
            while i < v4_keys.len() && (v4_keys[i] >> 16) < b {
                i += 1;
            }
            v4_bucket.push(i as u32);
        }
        let v6_keys: Vec<u128> = c.v6.iter().map(|(n, _)| u128::from(n.network())).collect();
        let v6_parent = parents(
            &v6_keys,
            c.v6.iter().map(|(n, _)| n.prefix_len()),
            contains6,
        );
        let ports = SlotImage::ports(c);
        let mut names = [None; 64];
        let mut own_list = 0u64;
        for s in &c.services {
            if let Some(slot) = names.get_mut(s.index as usize) {
                *slot = Some(s.name.as_str());
            }
            if s.has_own_list && s.index < 64 {
                own_list |= 1 << s.index;
            }
        }
        let dec4 = SlotImage::deciders_v4(c).into_iter().collect();
        let dec6 = SlotImage::deciders_v6(c).into_iter().collect();
        Self {
            c,
            v4_keys,
            v4_bucket,
            v4_parent,
            v6_keys,
            v6_parent,
            ports,
            names,
            own_list,
            dec4,
            dec6,
        }
    }

    /// Index of the longest compiled prefix containing `src`, with its
    /// family (true: IPv6).
    pub fn lookup(&self, src: IpAddr) -> Option<(bool, usize)> {
        match src {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                // Prefixes of lower /16s all start before `a`, those of
                // higher ones after it: the answer's start is in this /16's
                // slice or is the last prefix before it.
                let top = (a >> 16) as usize;
                let (lo, hi) = (
                    self.v4_bucket[top] as usize,
                    self.v4_bucket[top + 1] as usize,
                );
                let end = lo + self.v4_keys[lo..hi].partition_point(|&k| k <= a);
                let mut i = end.checked_sub(1)? as u32;
                loop {
                    let (n, _) = &self.c.v4[i as usize];
                    if contains4(self.v4_keys[i as usize], n.prefix_len(), a) {
                        return Some((false, i as usize));
                    }
                    i = self.v4_parent[i as usize];
                    if i == NONE {
                        return None;
                    }
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                let mut i = self.v6_keys.partition_point(|&k| k <= a).checked_sub(1)? as u32;
                loop {
                    let (n, _) = &self.c.v6[i as usize];
                    if contains6(self.v6_keys[i as usize], n.prefix_len(), a) {
                        return Some((true, i as usize));
                    }
                    i = self.v6_parent[i as usize];
                    if i == NONE {
                        return None;
                    }
                }
            }
        }
    }

    /// The value the datapath's LPM lookup returns for `src`.
    pub fn value(&self, src: IpAddr) -> Option<&'a PrefixValue> {
        let c: &'a CompiledPolicy = self.c;
        self.lookup(src)
            .map(|(v6, i)| if v6 { &c.v6[i].1 } else { &c.v4[i].1 })
    }

    /// The service index of (proto, port): 0 for none.
    pub fn service_of(&self, proto: Proto, port: u16) -> u8 {
        port_index(0, proto.protocol(), port)
            .and_then(|i| self.ports.get(i as usize).copied())
            .unwrap_or(0)
    }

    /// [`decide`] for a source and what the packet carries.
    pub fn decide(&self, src: IpAddr, ports: Ports) -> Decision {
        decide(&self.c.config, self.value(src), ports)
    }

    fn owners(&self, v6: bool, i: usize) -> &'a [Owner] {
        let c: &'a CompiledPolicy = self.c;
        let first = if v6 {
            &c.provenance.v6_first
        } else {
            &c.provenance.v4_first
        };
        let (Some(&a), Some(&b)) = (first.get(i), first.get(i + 1)) else {
            return &[];
        };
        c.provenance
            .owners
            .get(a as usize..b as usize)
            .unwrap_or(&[])
    }

    /// What the kernel's deciders trie answers for (`list`, `src`): the
    /// entry of the longest prefix of that list containing it.
    fn decider_lookup(&self, list: u8, src: IpAddr) -> u32 {
        let found = match src {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                (0..=32u32).rev().find_map(|len| {
                    let net = if len == 0 {
                        0
                    } else {
                        a & (u32::MAX << (32 - len))
                    };
                    let key = TrieKey {
                        data: decider_key_v4(list, &net.to_be_bytes()),
                        len: DECIDER_KEY_BITS + len,
                    };
                    self.dec4.get(&key).copied()
                })
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                (0..=128u32).rev().find_map(|len| {
                    let net = if len == 0 {
                        0
                    } else {
                        a & (u128::MAX << (128 - len))
                    };
                    let key = TrieKey {
                        data: decider_key_v6(list, &net.to_be_bytes()),
                        len: DECIDER_KEY_BITS + len,
                    };
                    self.dec6.get(&key).copied()
                })
            }
        };
        found.unwrap_or(ENTRY_NONE)
    }

    /// The most specific prefix containing prefix `i` (itself included)
    /// that entry `entry` owns, and the entry.
    fn owned_by(&self, v6: bool, i: usize, entry: u32) -> Option<(IpNet, EntryInfo<'a>)> {
        let c: &'a CompiledPolicy = self.c;
        let mut i = i as u32;
        loop {
            if let Some(o) = self
                .owners(v6, i as usize)
                .iter()
                .find(|o| o.entry == entry)
            {
                let net = if v6 {
                    IpNet::V6(c.v6[i as usize].0)
                } else {
                    IpNet::V4(c.v4[i as usize].0)
                };
                return c.entries.get(o.entry as usize).map(|e| (net, e));
            }
            i = if v6 {
                self.v6_parent[i as usize]
            } else {
                self.v4_parent[i as usize]
            };
            if i == NONE {
                return None;
            }
        }
    }

    /// The most specific prefix containing prefix `i` (itself included)
    /// owned by a list `want` accepts, and its entry.
    fn owner_of_list(
        &self,
        v6: bool,
        i: usize,
        want: impl Fn(u8) -> bool,
    ) -> Option<(IpNet, EntryInfo<'a>)> {
        let c: &'a CompiledPolicy = self.c;
        let mut i = i as u32;
        loop {
            if let Some(o) = self.owners(v6, i as usize).iter().find(|o| want(o.list)) {
                let net = if v6 {
                    IpNet::V6(c.v6[i as usize].0)
                } else {
                    IpNet::V4(c.v4[i as usize].0)
                };
                return c.entries.get(o.entry as usize).map(|e| (net, e));
            }
            i = if v6 {
                self.v6_parent[i as usize]
            } else {
                self.v4_parent[i as usize]
            };
            if i == NONE {
                return None;
            }
        }
    }

    /// Who decides by the policy's text, derived from which entries wrote
    /// which prefixes (not from the compiled values the kernel reads): the
    /// most specific always_allow or deny entry, or the most specific entry
    /// of the list that judged the packet. Tests compare it with the
    /// credited entry ([`ExplainRef::decider`]), which comes from the
    /// compiled values and deciders.
    pub fn written_decider(&self, src: IpAddr, ports: Ports) -> Option<(IpNet, EntryInfo<'a>)> {
        let (v6, i) = self.lookup(src)?;
        let d = self.decide(src, ports);
        let s = d.service;
        let own = s != 0 && self.own_list & (1u64 << (s & 63)) != 0;
        match d.reason {
            REASON_ALWAYS_ALLOW => self.owner_of_list(v6, i, |l| l == LIST_ALWAYS_ALLOW),
            REASON_DENY => self.owner_of_list(v6, i, |l| l == LIST_DENY),
            REASON_ALLOWED if own => self.owner_of_list(v6, i, |l| l == s),
            REASON_ALLOWED => self.owner_of_list(v6, i, |l| l == 0 || l == s),
            _ => None,
        }
    }

    /// The full answer for a packet from `src` carrying `ports`.
    pub fn explain_ports(&self, src: IpAddr, ports: Ports) -> ExplainRef<'a> {
        let found = self.lookup(src);
        let value = found.map(|(v6, i)| {
            let c: &'a CompiledPolicy = self.c;
            if v6 { &c.v6[i].1 } else { &c.v4[i].1 }
        });
        let d = decide(&self.c.config, value, ports);
        let s = d.service;
        let own = s != 0 && self.own_list & (1u64 << (s & 63)) != 0;
        // The kernel's answer to "who decided" (its hit counters and
        // events), by the same function over the same deciders: one
        // attribution rule for both.
        let credited = value.map_or(ENTRY_NONE, |v| {
            credited_entry(&self.c.config, v, &d, |list| self.decider_lookup(list, src))
        });
        let decider = match (found, credited) {
            (_, ENTRY_NONE) | (None, _) => None,
            (Some((v6, i)), e) => self.owned_by(v6, i, e),
        };
        ExplainRef {
            decision: d,
            service: self.names.get(s as usize).copied().flatten(),
            decider,
            service_own_list: own,
        }
    }

    /// The answer for a packet from `src` to `port` (None: a packet that
    /// matches no service port, e.g. ICMP), borrowed from the policy.
    pub fn explain_ref(&self, src: IpAddr, port: Option<(Proto, u16)>) -> ExplainRef<'a> {
        let ports = match port {
            None => Ports::NoPort,
            Some((proto, p)) => Ports::Port {
                service: self.service_of(proto, p),
                tcp: u8::from(proto == Proto::Tcp),
            },
        };
        self.explain_ports(src, ports)
    }

    pub fn explain(&self, src: IpAddr, port: Option<(Proto, u16)>) -> Explanation {
        self.explain_ref(src, port).to_owned()
    }
}
