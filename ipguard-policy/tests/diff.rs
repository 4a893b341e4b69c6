//! `diff` of two policies whose differences are known: lists compared by
//! the addresses they cover, DNS names and feeds, services, settings, and
//! the verdicts of given packets.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use ipguard_policy::{self as policy, Proto};

fn load(text: &str) -> Arc<policy::Policy> {
    policy::parse_str("policy.yaml", text)
        .unwrap_or_else(|e| panic!("{e}"))
        .policy
}

const OLD: &str = r#"version: 1
groups:
  office: [203.0.113.0/24]
  ranges: { url: "https://ranges.test/v4" }
allow: [office, 198.51.100.10-198.51.100.20, dns:vpn.test]
services:
  ssh: { ports: [tcp/22], allow: [203.0.113.10] }
  web: { ports: [tcp/80] }
  old: { ports: [udp/5000] }
deny: [203.0.113.66, ranges]
"#;

const NEW: &str = r#"version: 1
action: reject
groups:
  office: [203.0.113.0/25, 203.0.113.128/25]
allow: [office, 198.51.100.10-198.51.100.21]
services:
  ssh: { ports: [tcp/22, tcp/2222], allow: [203.0.113.10, "2001:db8::/64"] }
  web: { ports: [tcp/80], allow: [any] }
deny: []
lockout_guard: { ports: [tcp/22, tcp/2222] }
"#;

fn strings<T: ToString>(v: &[T]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn lists_differ_by_the_addresses_they_cover() {
    let d = policy::diff(&load(OLD), &load(NEW));
    let by = |name: &str| d.lists.iter().find(|l| l.list == name).cloned();
    let allow = by("allow").unwrap();
    // The /24 split into two /25s is the same list.
    assert_eq!(strings(&allow.added), ["198.51.100.21/32"]);
    assert!(allow.removed.is_empty(), "{allow:?}");
    assert_eq!(allow.sources_removed, ["dns:vpn.test"]);
    let deny = by("deny").unwrap();
    assert_eq!(strings(&deny.removed), ["203.0.113.66/32"]);
    assert_eq!(deny.sources_removed, ["feed ranges"]);
    assert_eq!(
        strings(&by("service ssh").unwrap().added),
        ["2001:db8::/64"]
    );
    assert_eq!(
        strings(&by("service web").unwrap().added),
        ["0.0.0.0/0", "::/0"]
    );
    assert!(by("always_allow").is_none());
    assert_eq!(
        d.services,
        [
            "service ssh: ports tcp/22 -> tcp/22, tcp/2222",
            "service web: now has its own allow list (was the host-wide one)",
            "service old: removed (udp/5000)",
        ]
    );
    assert_eq!(
        d.settings,
        [
            "action: drop -> reject",
            "lockout_guard: tcp/22 and the ports of service ssh (the default) -> tcp/22, tcp/2222",
        ]
    );
    assert!(policy::diff(&load(OLD), &load(OLD)).is_empty());
}

#[test]
fn a_range_that_shrinks_in_the_middle_shows_the_hole() {
    let a = load("version: 1\nallow: [198.51.100.0-198.51.100.255]\n");
    let b =
        load("version: 1\nallow: [198.51.100.0-198.51.100.127, 198.51.100.129-198.51.100.255]\n");
    let d = policy::diff(&a, &b);
    assert_eq!(strings(&d.lists[0].removed), ["198.51.100.128/32"]);
    assert!(d.lists[0].added.is_empty());
}

#[test]
fn verdicts_that_change_are_listed() {
    let now = SystemTime::now();
    let (a, b) = (load(OLD), load(NEW));
    let (a, b) = (policy::compile(&a, now, &[]), policy::compile(&b, now, &[]));
    let q = |s: &str, p: Option<(Proto, u16)>| (s.parse::<IpAddr>().unwrap(), p);
    let probes = [
        q("203.0.113.66", None),
        q("203.0.113.7", Some((Proto::Tcp, 80))),
        q("198.51.100.21", None),
        q("192.0.2.1", Some((Proto::Tcp, 80))),
        q("198.51.100.15", None),
    ];
    let changes = policy::verdict_changes(&a, &b, &probes);
    let srcs: Vec<String> = changes.iter().map(|c| c.src.to_string()).collect();
    // Denied, then allowed by office; refused, then allowed by the wider
    // range; refused on web's port, then allowed (web allows any now).
    // 203.0.113.7 passes under both, 198.51.100.15 too.
    assert_eq!(srcs, ["203.0.113.66", "198.51.100.21", "192.0.2.1"]);
    assert_eq!(changes[0].old.verdict_name(), "drop");
    assert_eq!(changes[0].new.verdict_name(), "pass");
    assert_eq!(changes[2].new.verdict_name(), "pass");
}
