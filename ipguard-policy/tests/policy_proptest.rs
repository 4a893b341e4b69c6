//! Property tests of the policy compiler.
//!
//! `compiled_lookup_agrees_with_reference`: random policies (nested groups,
//! overlapping allow / deny / always_allow, ranges, wildcards, keywords,
//! services with and without lists of their own, IPv4 and IPv6, modes,
//! actions, scopes, `until`, `when`, runtime entries) are written out as
//! YAML, loaded and compiled by the real code, and queried the way the
//! datapath does (longest-prefix match over the compiled pairs, port table,
//! `ipguard_common::decide`). A deliberately naive reference matcher walks
//! the steps of docs/policy.md §5 over the generated entries themselves (ranges
//! as bounds, wildcards as octets, groups by name) and must agree on every
//! query.
//!
//! Cases default to 384 for the main property; `PROPTEST_CASES=N` runs more.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use ipguard_common::*;
use ipguard_policy::{
    self as policy, CompiledPolicy, Explainer, Proto, RuntimeEntry, RuntimeKind, range_v4, range_v6,
};
use ipnet::{IpNet, Ipv6Net};
use jiff::{Timestamp, tz::TimeZone};
use proptest::prelude::*;

// ---------------------------------------------------------------- model

/// An address in a small universe, so that random items overlap often:
/// 10.1.x.y (x < 4) and 2001:db8::x:y.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum A {
    V4(u32),
    V6(u128),
}

impl A {
    fn ip(self) -> IpAddr {
        match self {
            A::V4(a) => IpAddr::V4(Ipv4Addr::from(a)),
            A::V6(a) => IpAddr::V6(Ipv6Addr::from(a)),
        }
    }
}

#[derive(Clone, Debug)]
enum Item {
    Addr(A),
    /// Address, prefix length; written as given (host bits and all).
    Cidr(A, u8),
    Range(A, A),
    /// 10.1.x.y with the last `4 - fixed` octets as `*`.
    Wild(u32, u8),
    Any,
    Any4,
    Any6,
    Group(usize),
}

#[derive(Clone, Debug)]
struct Window {
    days: u8,
    start: u16,
    end: u16,
    tz: &'static str,
}

#[derive(Clone, Debug)]
struct TEntry {
    items: Vec<Item>,
    label: Option<u16>,
    /// Seconds relative to the compile moment.
    until: Option<i64>,
    when: Option<Window>,
}

#[derive(Clone, Debug)]
struct TService {
    ports: Vec<(Proto, u16, u16)>,
    allow: Option<Vec<TEntry>>,
}

#[derive(Clone, Debug)]
struct TRuntime {
    net: A,
    len: u8,
    /// None: host-wide; Some(i): service `s{i}` (may not exist).
    service: Option<usize>,
    until: Option<i64>,
    /// `ipguard deny` rather than `allow` (a deny has no service).
    deny: bool,
}

#[derive(Clone, Debug)]
struct TPolicy {
    mode: u8,
    action: u8,
    scope: u8,
    /// Group `i` may name only groups after it: no cycles.
    groups: Vec<Vec<Item>>,
    allow: Vec<TEntry>,
    deny: Vec<TEntry>,
    always_allow: Vec<TEntry>,
    services: Vec<TService>,
    runtime: Vec<TRuntime>,
    /// Seconds after BASE at which to compile and judge.
    at: i64,
    /// Seconds after `at` at which the kernel judges what was compiled at
    /// `at`, with no daemon to compile again: entries active at `at` end
    /// at their `until` or when their window first closes; nothing starts.
    later: i64,
}

/// 2025-03-24T00:00:00Z, a Monday; `at` ranges over two weeks around the
/// March DST change of Europe (30 March).
const BASE: i64 = 1_742_774_400;
const TZS: [&str; 3] = ["UTC", "Europe/Helsinki", "America/New_York"];

// ---------------------------------------------------------------- strategies

fn addr() -> impl Strategy<Value = A> {
    prop_oneof![
        4 => (0u32..4, any::<u8>()).prop_map(|(x, y)| A::V4(0x0a01_0000 | (x << 8) | u32::from(y))),
        1 => (0u128..4, any::<u8>()).prop_map(|(x, y)| A::V6((0x2001_0db8u128 << 96) | (x << 16) | u128::from(y))),
    ]
}

fn item(groups_after: std::ops::Range<usize>) -> impl Strategy<Value = Item> {
    let has_groups = !groups_after.is_empty();
    let groups = if has_groups { groups_after } else { 0..1 };
    prop_oneof![
        6 => addr().prop_map(Item::Addr),
        6 => (addr(), any::<u8>()).prop_map(|(a, l)| match a {
            A::V4(_) => Item::Cidr(a, [16, 20, 22, 23, 24, 25, 26, 28, 30, 31, 32][l as usize % 11]),
            A::V6(_) => Item::Cidr(a, [0, 64, 104, 110, 112, 116, 120, 124, 127, 128][l as usize % 10]),
        }),
        4 => (addr(), addr()).prop_filter_map("one family", |(a, b)| match (a, b) {
            (A::V4(x), A::V4(y)) => Some(Item::Range(A::V4(x.min(y)), A::V4(x.max(y)))),
            (A::V6(x), A::V6(y)) => Some(Item::Range(A::V6(x.min(y)), A::V6(x.max(y)))),
            _ => None,
        }),
        2 => ((0u32..4, any::<u8>()), prop_oneof![Just(2u8), Just(3u8), Just(0u8)])
            .prop_map(|((x, y), f)| Item::Wild(0x0a01_0000 | (x << 8) | u32::from(y), f)),
        1 => prop_oneof![Just(Item::Any), Just(Item::Any4), Just(Item::Any6)],
        (if has_groups { 4 } else { 0 }) => groups.prop_map(Item::Group),
    ]
}

fn window() -> impl Strategy<Value = Window> {
    (1u8..128, 0u16..48, 1u16..49, 0usize..3)
        .prop_filter("non-empty", |(_, s, e, _)| s != e)
        .prop_map(|(days, s, e, tz)| Window {
            days,
            start: s * 30,
            end: e * 30,
            tz: TZS[tz],
        })
}

fn entry(ngroups: usize) -> impl Strategy<Value = TEntry> {
    (
        prop::collection::vec(item(0..ngroups), 1..4),
        prop::option::weighted(0.3, any::<u16>()),
        prop::option::weighted(0.15, -7200i64..7200),
        prop::option::weighted(0.15, window()),
    )
        .prop_map(|(items, label, until, when)| TEntry {
            items,
            label,
            until,
            when,
        })
}

fn entries(ngroups: usize, max: usize) -> impl Strategy<Value = Vec<TEntry>> {
    prop::collection::vec(entry(ngroups), 0..max)
}

fn groups() -> impl Strategy<Value = Vec<Vec<Item>>> {
    (0usize..5).prop_flat_map(|n| {
        (0..n)
            .map(|i| prop::collection::vec(item(i + 1..n), 0..4).boxed())
            .collect::<Vec<_>>()
    })
}

fn services(ngroups: usize) -> impl Strategy<Value = Vec<TService>> {
    (0usize..5).prop_flat_map(move |n| {
        (0..n)
            .map(move |i| {
                let base = 1000 + 100 * i as u16;
                (
                    prop::collection::vec(
                        (any::<bool>(), 0u16..50, 0u16..10).prop_map(move |(tcp, a, b)| {
                            let proto = if tcp { Proto::Tcp } else { Proto::Udp };
                            (proto, base + a, base + a + b)
                        }),
                        1..3,
                    ),
                    prop::option::weighted(0.6, entries(ngroups, 4)),
                )
                    .prop_map(|(ports, allow)| TService { ports, allow })
                    .boxed()
            })
            .collect::<Vec<_>>()
    })
}

fn runtime() -> impl Strategy<Value = Vec<TRuntime>> {
    prop::collection::vec(
        (
            addr(),
            any::<u8>(),
            prop::option::of(0usize..6),
            prop::option::weighted(0.3, -7200i64..7200),
            prop::bool::weighted(0.25),
        )
            .prop_map(|(net, l, service, until, deny)| TRuntime {
                net,
                len: match net {
                    A::V4(_) => [24, 28, 32][l as usize % 3],
                    A::V6(_) => [112, 120, 128][l as usize % 3],
                },
                service: if deny { None } else { service },
                until,
                deny,
            }),
        0..3,
    )
}

fn policy() -> impl Strategy<Value = TPolicy> {
    groups().prop_flat_map(|groups| {
        let n = groups.len();
        (
            (0u8..10, 0u8..2, 0u8..2),
            Just(groups),
            entries(n, 6),
            entries(n, 3),
            entries(n, 3),
            services(n),
            runtime(),
            0i64..14 * 86_400,
        )
            .prop_map(
                |(
                    (mode, action, scope),
                    groups,
                    allow,
                    deny,
                    always_allow,
                    services,
                    runtime,
                    at,
                )| {
                    TPolicy {
                        // Mostly enforce: it exercises every step.
                        mode: match mode {
                            0 => 2,
                            1 => 1,
                            _ => 0,
                        },
                        action,
                        scope,
                        groups,
                        allow,
                        deny,
                        always_allow,
                        services,
                        runtime,
                        at,
                        later: 0,
                    }
                },
            )
    })
}

// ---------------------------------------------------------------- YAML

fn a_text(a: A) -> String {
    a.ip().to_string()
}

fn item_text(i: &Item) -> String {
    match i {
        Item::Addr(a) => a_text(*a),
        Item::Cidr(a, l) => format!("{}/{l}", a_text(*a)),
        Item::Range(a, b) => format!("{}-{}", a_text(*a), a_text(*b)),
        Item::Wild(a, fixed) => {
            let o = a.to_be_bytes();
            (0..4)
                .map(|k| {
                    if k < *fixed as usize {
                        o[k].to_string()
                    } else {
                        "*".to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(".")
        }
        Item::Any => "any".into(),
        Item::Any4 => "any4".into(),
        Item::Any6 => "any6".into(),
        Item::Group(g) => format!("g{g}"),
    }
}

fn quoted(items: &[Item]) -> String {
    let v: Vec<String> = items
        .iter()
        .map(|i| format!("\"{}\"", item_text(i)))
        .collect();
    format!("[{}]", v.join(", "))
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn hhmm(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

fn rfc3339(secs: i64) -> String {
    Timestamp::from_second(secs).unwrap().to_string()
}

fn entry_yaml(e: &TEntry, at: i64, indent: &str) -> String {
    if e.label.is_none() && e.until.is_none() && e.when.is_none() && e.items.len() == 1 {
        return format!("{indent}- \"{}\"\n", item_text(&e.items[0]));
    }
    let mut s = format!("{indent}- from: {}\n", quoted(&e.items));
    if let Some(l) = e.label {
        s.push_str(&format!("{indent}  label: \"L{l}\"\n"));
    }
    if let Some(u) = e.until {
        s.push_str(&format!(
            "{indent}  until: \"{}\"\n",
            rfc3339(BASE + at + u)
        ));
    }
    if let Some(w) = &e.when {
        let days: Vec<&str> = (0..7)
            .filter(|d| w.days & (1 << d) != 0)
            .map(|d| DAYS[d])
            .collect();
        s.push_str(&format!(
            "{indent}  when: {{ days: [{}], time: \"{}-{}\", tz: {} }}\n",
            days.join(", "),
            hhmm(w.start),
            hhmm(w.end),
            w.tz
        ));
    }
    s
}

fn list_yaml(key: &str, list: &[TEntry], at: i64) -> String {
    let mut s = format!("{key}:\n");
    if list.is_empty() {
        return format!("{key}: []\n");
    }
    for e in list {
        s.push_str(&entry_yaml(e, at, "  "));
    }
    s
}

fn yaml(p: &TPolicy) -> String {
    let mut s = String::from("version: 1\n");
    s.push_str(["mode: enforce\n", "mode: monitor\n", "mode: off\n"][p.mode as usize]);
    s.push_str(["action: drop\n", "action: reject\n"][p.action as usize]);
    s.push_str(["scope: host\n", "scope: services\n"][p.scope as usize]);
    if !p.groups.is_empty() {
        s.push_str("groups:\n");
        for (i, g) in p.groups.iter().enumerate() {
            s.push_str(&format!("  g{i}: {}\n", quoted(g)));
        }
    }
    s.push_str(&list_yaml("allow", &p.allow, p.at));
    s.push_str(&list_yaml("deny", &p.deny, p.at));
    s.push_str(&list_yaml("always_allow", &p.always_allow, p.at));
    if !p.services.is_empty() {
        s.push_str("services:\n");
        for (i, svc) in p.services.iter().enumerate() {
            let ports: Vec<String> = svc
                .ports
                .iter()
                .map(|(pr, a, b)| {
                    let pr = if *pr == Proto::Tcp { "tcp" } else { "udp" };
                    if a == b {
                        format!("{pr}/{a}")
                    } else {
                        format!("{pr}/{a}-{b}")
                    }
                })
                .collect();
            s.push_str(&format!("  s{i}:\n    ports: [{}]\n", ports.join(", ")));
            if let Some(l) = &svc.allow {
                if l.is_empty() {
                    s.push_str("    allow: []\n");
                } else {
                    s.push_str("    allow:\n");
                    for e in l {
                        s.push_str(&entry_yaml(e, p.at, "      "));
                    }
                }
            }
        }
    }
    s
}

// ---------------------------------------------------------------- reference

fn mask_match(net: u128, len: u32, bits: u32, a: u128) -> bool {
    len == 0 || (net >> (bits - len)) == (a >> (bits - len))
}

fn item_covers(p: &TPolicy, i: &Item, s: A) -> bool {
    match (i, s) {
        (Item::Addr(a), _) => *a == s,
        (Item::Cidr(A::V4(n), l), A::V4(x)) => {
            mask_match(u128::from(*n), u32::from(*l), 32, u128::from(x))
        }
        (Item::Cidr(A::V6(n), l), A::V6(x)) => mask_match(*n, u32::from(*l), 128, x),
        (Item::Range(A::V4(a), A::V4(b)), A::V4(x)) => *a <= x && x <= *b,
        (Item::Range(A::V6(a), A::V6(b)), A::V6(x)) => *a <= x && x <= *b,
        (Item::Wild(a, fixed), A::V4(x)) => {
            let (o, q) = (a.to_be_bytes(), x.to_be_bytes());
            (0..*fixed as usize).all(|k| o[k] == q[k])
        }
        (Item::Any, _) => true,
        (Item::Any4, A::V4(_)) => true,
        (Item::Any6, A::V6(_)) => true,
        (Item::Group(g), _) => p.groups[*g].iter().any(|i| item_covers(p, i, s)),
        _ => false,
    }
}

/// The window on the wall clock, written out without the production code.
fn window_open(w: &Window, t: i64) -> bool {
    let tz = TimeZone::get(w.tz).unwrap();
    let z = Timestamp::from_second(t).unwrap().to_zoned(tz);
    let wd = z.weekday().to_monday_zero_offset() as u8;
    let now = i64::from(z.hour()) * 3600 + i64::from(z.minute()) * 60 + i64::from(z.second());
    let (s, e) = (i64::from(w.start) * 60, i64::from(w.end) * 60);
    let day = |d: u8| w.days & (1 << d) != 0;
    if s < e {
        day(wd) && s <= now && now < e
    } else {
        (day(wd) && now >= s) || (day((wd + 6) % 7) && now < e)
    }
}

fn active(e: &TEntry, at: i64) -> bool {
    let t = BASE + at;
    e.until.is_none_or(|u| t < BASE + at + u) && e.when.as_ref().is_none_or(|w| window_open(w, t))
}

/// Window edges fall on whole half hours of UTC (the zones' offsets and
/// DST changes are whole hours).
const EDGE_GRID: i64 = 1800;

/// The window open at `from` and at every edge up to `to`: it never closed.
fn window_stays_open(w: &Window, from: i64, to: i64) -> bool {
    let mut t = (from / EDGE_GRID + 1) * EDGE_GRID;
    while t < to {
        if !window_open(w, t) {
            return false;
        }
        t += EDGE_GRID;
    }
    window_open(w, from) && window_open(w, to)
}

/// Active when compiled at `p.at` and still active `p.later` seconds on.
fn active_until_later(e: &TEntry, p: &TPolicy) -> bool {
    let t = BASE + p.at;
    e.until.is_none_or(|u| p.later < u)
        && e.when
            .as_ref()
            .is_none_or(|w| window_stays_open(w, t, t + p.later))
}

fn list_covers(p: &TPolicy, l: &[TEntry], s: A) -> bool {
    l.iter()
        .any(|e| active_until_later(e, p) && e.items.iter().any(|i| item_covers(p, i, s)))
}

fn runtime_covers(p: &TPolicy, service: Option<usize>, s: A) -> bool {
    p.runtime.iter().any(|r| {
        let live = r.until.is_none_or(|u| u > p.later);
        let known = r.service.is_none_or(|i| i < p.services.len());
        !r.deny
            && live
            && known
            && r.service == service
            && item_covers(p, &Item::Cidr(r.net, r.len), s)
    })
}

/// A runtime deny holds `s` (it wins as the policy's `deny` does).
fn runtime_denies(p: &TPolicy, s: A) -> bool {
    p.runtime.iter().any(|r| {
        r.deny
            && r.until.is_none_or(|u| u > p.later)
            && item_covers(p, &Item::Cidr(r.net, r.len), s)
    })
}

/// Does the effective list of service `svc` (None: host-wide) allow `s`?
fn allows(p: &TPolicy, svc: Option<usize>, s: A) -> bool {
    let host = list_covers(p, &p.allow, s) || runtime_covers(p, None, s);
    match svc {
        None => host,
        Some(i) => match &p.services[i].allow {
            Some(own) => list_covers(p, own, s) || runtime_covers(p, Some(i), s),
            None => host || runtime_covers(p, Some(i), s),
        },
    }
}

#[derive(Clone, Copy, Debug)]
enum Q {
    Port(Proto, u16),
    NoPort,
    Fragment,
}

/// docs/policy.md §5, steps 2 to 7, one by one.
fn reference(p: &TPolicy, s: A, q: Q) -> (u8, u8, u8) {
    let svc = match q {
        Q::Port(proto, port) => p.services.iter().position(|x| {
            x.ports
                .iter()
                .any(|(pr, a, b)| *pr == proto && *a <= port && port <= *b)
        }),
        _ => None,
    };
    let svc_id = svc.map_or(0, |i| i as u8 + 1);
    let tcp = matches!(q, Q::Port(Proto::Tcp, _));
    let refuse = |reason: u8, service: u8, tcp: bool| {
        let v = if p.mode == 1 {
            VERDICT_WOULD_DROP
        } else if p.action == 1 && tcp {
            VERDICT_REJECT
        } else {
            VERDICT_DROP
        };
        (v, reason, service)
    };
    if p.mode == 2 {
        return (VERDICT_PASS, REASON_OFF, svc_id);
    }
    if list_covers(p, &p.always_allow, s) {
        return (VERDICT_PASS, REASON_ALWAYS_ALLOW, svc_id);
    }
    if list_covers(p, &p.deny, s) || runtime_denies(p, s) {
        return refuse(REASON_DENY, svc_id, tcp);
    }
    if let Q::Fragment = q {
        let any = allows(p, None, s) || (0..p.services.len()).any(|i| allows(p, Some(i), s));
        return if any {
            (VERDICT_PASS, REASON_FRAGMENT, 0)
        } else {
            refuse(REASON_FRAGMENT, 0, false)
        };
    }
    if svc.is_none() && p.scope == 1 {
        return (VERDICT_PASS, REASON_OUT_OF_SCOPE, 0);
    }
    if allows(p, svc, s) {
        (VERDICT_PASS, REASON_ALLOWED, svc_id)
    } else {
        refuse(REASON_NOT_ALLOWED, svc_id, tcp)
    }
}

fn query() -> impl Strategy<Value = (A, Q)> {
    let q = prop_oneof![
        6 => (any::<bool>(), 0usize..6, 0u16..62).prop_map(|(tcp, i, k)| {
            Q::Port(if tcp { Proto::Tcp } else { Proto::Udp }, 1000 + 100 * i as u16 + k)
        }),
        1 => any::<u16>().prop_map(|p| Q::Port(Proto::Tcp, p)),
        2 => Just(Q::NoPort),
        1 => Just(Q::Fragment),
    ];
    let a = prop_oneof![
        8 => addr(),
        1 => any::<u32>().prop_map(A::V4),
        1 => any::<u128>().prop_map(A::V6),
    ];
    (a, q)
}

fn secs(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64)
}

fn runtime_entries(p: &TPolicy) -> Vec<RuntimeEntry> {
    p.runtime
        .iter()
        .map(|r| RuntimeEntry {
            kind: if r.deny {
                RuntimeKind::Deny
            } else {
                RuntimeKind::Allow
            },
            net: IpNet::new(r.net.ip(), r.len).unwrap(),
            service: r.service.map(|i| format!("s{i}")),
            label: Some("runtime".into()),
            until: r.until.map(|u| secs(BASE + p.at + u)),
        })
        .collect()
}

/// What the datapath passes `decide` for query `q`.
fn ports_of(ex: &Explainer, q: Q) -> Ports {
    match q {
        Q::Port(proto, port) => Ports::Port {
            service: ex.service_of(proto, port),
            tcp: u8::from(proto == Proto::Tcp),
        },
        Q::NoPort => Ports::NoPort,
        Q::Fragment => Ports::Fragment,
    }
}

/// The YAML of `p`, loaded and compiled at `p.at` with its runtime entries.
fn compile_case(p: &TPolicy) -> Result<(String, CompiledPolicy), TestCaseError> {
    let text = yaml(p);
    let now = secs(BASE + p.at);
    let loaded = policy::parse_str_at("prop.yaml", &text, now)
        .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
    let compiled = policy::compile(&loaded.policy, now, &runtime_entries(p));
    Ok((text, compiled))
}

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

/// The deciders map as the kernel's LPM trie answers it: the longest
/// prefix of `list` containing `src`.
fn deciders_lookup(c: &CompiledPolicy, list: u8, src: IpAddr) -> u32 {
    let best = match src {
        IpAddr::V4(a) => c
            .deciders_v4
            .iter()
            .filter(|(l, n, _)| *l == list && n.contains(&a))
            .max_by_key(|(_, n, _)| n.prefix_len())
            .map(|&(_, _, e)| e),
        IpAddr::V6(a) => c
            .deciders_v6
            .iter()
            .filter(|(l, n, _)| *l == list && n.contains(&a))
            .max_by_key(|(_, n, _)| n.prefix_len())
            .map(|&(_, _, e)| e),
    };
    best.unwrap_or(ENTRY_NONE)
}

proptest! {
    #![proptest_config(cases(384))]

    #[test]
    fn compiled_lookup_agrees_with_reference(
        p in policy(),
        queries in prop::collection::vec(query(), 48),
    ) {
        let (text, compiled) = compile_case(&p)?;
        let ex = Explainer::new(&compiled);
        for (s, q) in queries {
            let want = reference(&p, s, q);
            let r = match q {
                Q::Port(proto, port) => ex.explain_ref(s.ip(), Some((proto, port))),
                Q::NoPort => ex.explain_ref(s.ip(), None),
                Q::Fragment => ex.explain_ports(s.ip(), Ports::Fragment),
            };
            let d = r.decision;
            prop_assert_eq!(
                (d.verdict, d.reason, d.service), want,
                "{} {:?}\n{}", s.ip(), q, text
            );
            // The deciding prefix covers the source, for the reasons that
            // have one (a fragment has none: the kernel credits no entry).
            let decides = matches!(d.reason, REASON_ALLOWED | REASON_DENY | REASON_ALWAYS_ALLOW);
            match r.decider {
                Some((net, _)) => {
                    prop_assert!(decides);
                    prop_assert!(net.contains(&s.ip()), "{} does not contain {}", net, s.ip());
                }
                None => prop_assert!(!decides, "no decider for {:?}\n{}", d, text),
            }
            // What the datapath credits (hit counter, event entry), through
            // the same function and a longest match over the deciders map,
            // is explain's decider, for every decision an entry makes.
            let credited = ex.value(s.ip()).map_or(ENTRY_NONE, |v| {
                credited_entry(&compiled.config, v, &d, |list| deciders_lookup(&compiled, list, s.ip()))
            });
            if decided_by_entry(d.reason) {
                let (_, e) = r.decider.expect("a decider");
                // ... and the entry the policy's text names, derived from
                // the prefixes' owners rather than the compiled values.
                let ports = ports_of(&ex, q);
                let (_, written) = ex.written_decider(s.ip(), ports).expect("a written decider");
                // The same entry (not only an equal one): its text is the
                // one the policy holds.
                prop_assert!(
                    std::ptr::eq(e.text, written.text),
                    "{} {:?}: credited {:?}, the text says {:?}\n{}",
                    s.ip(), q, e, written, text
                );
                prop_assert!(credited != ENTRY_NONE, "{} {:?}: nothing credited\n{}", s.ip(), q, text);
                let got = compiled.entries.get(credited as usize).expect("a credited entry");
                prop_assert!(
                    std::ptr::eq(e.text, got.text),
                    "{} {:?}: credited {:?}, explain says {:?}\n{}",
                    s.ip(), q, got, e, text
                );
            } else {
                prop_assert_eq!(credited, ENTRY_NONE);
            }
        }
        // Every compiled prefix: sorted, unique, and its `entry` names an
        // entry of the policy or none.
        let keys: Vec<(u32, u8)> = compiled.v4.iter().map(|(n, _)| (u32::from(n.network()), n.prefix_len())).collect();
        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]));
        let keys6: Vec<(u128, u8)> = compiled.v6.iter().map(|(n, _)| (u128::from(n.network()), n.prefix_len())).collect();
        prop_assert!(keys6.windows(2).all(|w| w[0] < w[1]));
        let values = compiled.v4.iter().map(|(_, v)| v).chain(compiled.v6.iter().map(|(_, v)| v));
        for v in values {
            prop_assert!(
                v.entry == ENTRY_NONE
                    || v.entry == ENTRY_LOOKUP
                    || (v.entry as usize) < compiled.entries.len()
            );
            if v.flags != 0 {
                prop_assert!(v.entry != ENTRY_NONE);
            }
        }
    }

    #[test]
    fn result_is_constant_until_next_change(
        w in window(),
        until in prop::option::of(0i64..200_000),
        at in 0i64..14 * 86_400,
        fractions in prop::collection::vec(0.0f64..1.0, 3),
    ) {
        let e = TEntry { items: vec![Item::Addr(A::V4(0x0a01_0001))], label: None, until, when: Some(w) };
        let p = TPolicy {
            mode: 0, action: 0, scope: 0, groups: vec![], allow: vec![e], deny: vec![],
            always_allow: vec![], services: vec![], runtime: vec![], at, later: 0,
        };
        let text = yaml(&p);
        let loaded = policy::parse_str_at("p.yaml", &text, secs(BASE + at)).unwrap();
        let first = policy::compile(&loaded.policy, secs(BASE + at), &[]);
        let end = first.next_change.map_or(BASE + at + 9 * 86_400, |t| {
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
        });
        prop_assert!(end > BASE + at);
        for f in fractions {
            let t = BASE + at + ((end - BASE - at) as f64 * f) as i64;
            let c = policy::compile(&loaded.policy, secs(t), &[]);
            prop_assert_eq!(&c.v4, &first.v4, "at {} (next change {}):\n{}", rfc3339(t), rfc3339(end), text);
        }
        // Just before the edge still the same; the window reference agrees.
        let c = policy::compile(&loaded.policy, secs(end - 1), &[]);
        prop_assert_eq!(&c.v4, &first.v4);
        let expected = until.is_none_or(|u| u > 0) && window_open(p.allow[0].when.as_ref().unwrap(), BASE + at);
        prop_assert_eq!(!first.v4.is_empty(), expected);
    }
}

/// Entries active at `p.at` that cover `s` and end some day (an `until`, a
/// window): an upper bound of the source's distinct deadlines.
fn timed_cover(p: &TPolicy, s: A) -> usize {
    let lists = [&p.allow, &p.deny, &p.always_allow]
        .into_iter()
        .chain(p.services.iter().filter_map(|x| x.allow.as_ref()));
    let listed = lists
        .flatten()
        .filter(|e| e.until.is_some() || e.when.is_some())
        .filter(|e| active(e, p.at) && e.items.iter().any(|i| item_covers(p, i, s)))
        .count();
    let runtime = p
        .runtime
        .iter()
        .filter(|r| r.until.is_some_and(|u| u > 0))
        .filter(|r| item_covers(p, &Item::Cidr(r.net, r.len), s))
        .count();
    listed + runtime
}

proptest! {
    #![proptest_config(cases(256))]

    /// What the kernel judges by after the compiled deadlines, with no
    /// daemon compiling again, is the policy with the entries that ended
    /// taken out: `until`s and runtime grants passed, windows closed since
    /// (and none opened). Sources under more timed entries than the kernel
    /// follows deadlines are left to `past_the_last_deadline_...`.
    #[test]
    fn the_kernels_deadlines_end_exactly_the_entries_that_ended(
        p in policy(),
        pick in any::<u32>(),
        queries in prop::collection::vec(query(), 48),
    ) {
        let (text, compiled) = compile_case(&p)?;
        let table = policy::range4::RangeTable4::of_policy(&compiled);
        let ex = Explainer::new(&compiled);
        // Judge at a random moment, or right at (or a second around) an
        // entry's `until`, where an off-by-one would show.
        let untils: Vec<i64> = [&p.allow, &p.deny, &p.always_allow]
            .into_iter()
            .flatten()
            .filter_map(|e| e.until)
            .chain(p.runtime.iter().filter_map(|r| r.until))
            .filter(|u| *u > 0)
            .collect();
        let later = match (pick % 3, untils.is_empty()) {
            (0, _) | (_, true) => i64::from(pick % 9000),
            _ => untils[(pick / 3) as usize % untils.len()] + i64::from(pick / 7 % 3) - 1,
        };
        let p = TPolicy { later, ..p };
        let t_ns = u64::try_from(BASE + p.at + later).unwrap() * 1_000_000_000;
        for (s, q) in queries {
            if later > 0 && timed_cover(&p, s) > DEADLINE_STEPS as usize {
                continue;
            }
            let ports = ports_of(&ex, q);
            let value = ex.value(s.ip()).and_then(|v| table.expire(v, t_ns));
            let d = decide(&compiled.config, value, ports);
            prop_assert_eq!(
                (d.verdict, d.reason, d.service), reference(&p, s, q),
                "{} {:?} {} s after compiling\n{}", s.ip(), q, later, text
            );
            // A fallback credits only entries that still decide.
            if let Some(v) = value
                && v.entry != ENTRY_NONE && v.entry != ENTRY_LOOKUP && decided_by_entry(d.reason)
            {
                prop_assert!((v.entry as usize) < compiled.entries.len());
            }
        }
    }
}

// ---------------------------------------------------------------- ranges

/// Exact cover and minimality: the prefixes are disjoint, in order, cover
/// `start..=end` exactly, and no two of them are siblings (two siblings
/// could merge into their parent; without any, the set is the unique
/// minimal one).
fn check_cover(
    start: u128,
    end: u128,
    bits: u32,
    nets: &[(u128, u32)],
) -> Result<(), TestCaseError> {
    prop_assert!(!nets.is_empty());
    let mut next = start;
    for (i, &(n, len)) in nets.iter().enumerate() {
        let size_m1 = if len == 0 {
            u128::MAX >> (128 - bits)
        } else {
            (1u128 << (bits - len)) - 1
        };
        prop_assert_eq!(n & size_m1, 0, "not a network address");
        prop_assert_eq!(n, next, "gap or overlap before prefix {}", i);
        let last = n + size_m1;
        prop_assert!(last <= end, "past the end");
        if last == end {
            prop_assert_eq!(i, nets.len() - 1);
        }
        next = last.wrapping_add(1);
    }
    let (n, len) = *nets.last().unwrap();
    let size_m1 = if len == 0 {
        u128::MAX >> (128 - bits)
    } else {
        (1u128 << (bits - len)) - 1
    };
    prop_assert_eq!(n + size_m1, end);
    for w in nets.windows(2) {
        let ((a, la), (b, lb)) = (w[0], w[1]);
        let siblings = la == lb && la > 0 && (a >> (bits - la + 1)) == (b >> (bits - lb + 1));
        prop_assert!(!siblings, "mergeable siblings");
    }
    Ok(())
}

/// The naive count: split recursively from the whole space.
fn naive_count(lo: u128, hi: u128, net: u128, len: u32, bits: u32) -> usize {
    let size_m1 = if len == 0 {
        u128::MAX >> (128 - bits)
    } else {
        (1u128 << (bits - len)) - 1
    };
    let last = net + size_m1;
    if last < lo || net > hi {
        0
    } else if lo <= net && last <= hi {
        1
    } else {
        let half = 1u128 << (bits - len - 1);
        naive_count(lo, hi, net, len + 1, bits) + naive_count(lo, hi, net + half, len + 1, bits)
    }
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn ranges_v4_are_exact_and_minimal(a in any::<u32>(), b in any::<u32>()) {
        let (s, e) = (a.min(b), a.max(b));
        let nets: Vec<(u128, u32)> = range_v4(Ipv4Addr::from(s), Ipv4Addr::from(e))
            .iter().map(|n| (u128::from(u32::from(n.network())), u32::from(n.prefix_len()))).collect();
        check_cover(u128::from(s), u128::from(e), 32, &nets)?;
        prop_assert_eq!(nets.len(), naive_count(u128::from(s), u128::from(e), 0, 0, 32));
    }

    #[test]
    fn ranges_v4_small(a in any::<u32>(), d in 0u32..600) {
        let (s, e) = (a, a.saturating_add(d));
        let nets: Vec<(u128, u32)> = range_v4(Ipv4Addr::from(s), Ipv4Addr::from(e))
            .iter().map(|n| (u128::from(u32::from(n.network())), u32::from(n.prefix_len()))).collect();
        check_cover(u128::from(s), u128::from(e), 32, &nets)?;
        prop_assert_eq!(nets.len(), naive_count(u128::from(s), u128::from(e), 0, 0, 32));
    }

    #[test]
    fn ranges_v6_are_exact_and_minimal(a in any::<u128>(), b in any::<u128>(), small in any::<bool>(), d in 0u128..100_000) {
        let (s, e) = if small { (a, a.saturating_add(d)) } else { (a.min(b), a.max(b)) };
        let nets: Vec<(u128, u32)> = range_v6(Ipv6Addr::from(s), Ipv6Addr::from(e))
            .iter().map(|n: &Ipv6Net| (u128::from(n.network()), u32::from(n.prefix_len()))).collect();
        check_cover(s, e, 128, &nets)?;
        prop_assert_eq!(nets.len(), naive_count(s, e, 0, 0, 128));
    }
}

#[test]
fn ranges_edges() {
    assert_eq!(
        range_v4(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST).len(),
        1
    );
    assert_eq!(
        range_v6(Ipv6Addr::UNSPECIFIED, Ipv6Addr::from(u128::MAX)).len(),
        1
    );
    assert_eq!(
        range_v4(Ipv4Addr::new(0, 0, 0, 1), Ipv4Addr::BROADCAST).len(),
        32
    );
    assert_eq!(
        range_v6(Ipv6Addr::from(1u128), Ipv6Addr::from(u128::MAX - 1)).len(),
        254
    );
}

proptest! {
    #![proptest_config(cases(256))]

    /// The explainer's longest-prefix match against a brute-force one, over
    /// prefixes spread across the whole IPv4 space (the per-/16 index and
    /// the walk up to a containing prefix).
    #[test]
    fn lookup_is_the_longest_match(
        nets in prop::collection::vec((any::<u32>(), 0u8..=32), 1..40),
        probes in prop::collection::vec(any::<u32>(), 64),
    ) {
        let items: Vec<String> = nets
            .iter()
            .map(|(a, l)| {
                let n = ipnet::Ipv4Net::new(Ipv4Addr::from(*a), *l).unwrap().trunc();
                format!("\"{n}\"")
            })
            .collect();
        let text = format!("version: 1\nallow: [{}]\n", items.join(", "));
        let loaded = policy::parse_str("lpm.yaml", &text).unwrap();
        let c = policy::compile(&loaded.policy, SystemTime::now(), &[]);
        let ex = Explainer::new(&c);
        // Probe inside each prefix and at its edges too.
        let mut addrs = probes;
        for (n, _) in &c.v4 {
            addrs.push(u32::from(n.network()));
            addrs.push(u32::from(n.broadcast()));
            addrs.push(u32::from(n.network()).wrapping_sub(1));
            addrs.push(u32::from(n.broadcast()).wrapping_add(1));
        }
        for a in addrs {
            let ip = Ipv4Addr::from(a);
            let want = c.v4.iter().filter(|(n, _)| n.contains(&ip)).max_by_key(|(n, _)| n.prefix_len()).map(|(n, _)| *n);
            let got = ex.lookup(IpAddr::V4(ip)).map(|(v6, i)| {
                assert!(!v6);
                c.v4[i].0
            });
            prop_assert_eq!(got, want, "{}", ip);
        }
    }
}
