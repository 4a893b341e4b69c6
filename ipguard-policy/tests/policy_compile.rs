//! The compiler and `explain` on hand-written policies: the worked example
//! of docs/policy.md §5 row by row, propagation, the kernel value's fields,
//! runtime entries, time, and what explain reports.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use ipguard_common::*;
use ipguard_policy::{
    self as policy, CompiledPolicy, Explainer, ListKind, Policy, Proto, RuntimeEntry, RuntimeKind,
};

fn ts(s: &str) -> SystemTime {
    s.parse::<jiff::Timestamp>().unwrap().into()
}

fn now() -> SystemTime {
    ts("2025-06-15T12:00:00Z")
}

fn load(text: &str) -> std::sync::Arc<Policy> {
    policy::parse_str_at("test.yaml", text, now())
        .unwrap_or_else(|e| panic!("{e}"))
        .policy
}

fn compile(text: &str) -> CompiledPolicy {
    policy::compile(&load(text), now(), &[])
}

fn port(q: &str) -> Option<(Proto, u16)> {
    (q != "-").then(|| policy::parse_port_query(q).unwrap())
}

/// (verdict, reason) as the JSON strings.
fn verdict(c: &CompiledPolicy, src: &str, q: &str) -> (&'static str, &'static str) {
    let e = Explainer::new(c).explain(src.parse().unwrap(), port(q));
    (verdict_name(e.verdict), reason_name(e.reason))
}

const WORKED_EXAMPLE: &str = r#"
version: 1
allow: ["10.15.1.*"]
services:
  admin:  { ports: [tcp/8443], allow: [10.15.1.10, 10.15.1.11, 10.15.1.12] }
  mobile: { ports: [tcp/443], allow: ["*.*.*.*"] }
  member: { ports: [tcp/8080] }
"#;

#[test]
fn worked_example_of_section_5() {
    let c = compile(WORKED_EXAMPLE);
    let pass = ("pass", "allowed");
    let refuse = ("drop", "not_allowed");
    // | source | tcp/8443 | tcp/443 | tcp/8080 |
    let table = [
        ("10.15.1.55", [refuse, pass, pass]),
        ("10.15.1.11", [pass, pass, pass]),
        ("67.25.19.198", [refuse, pass, refuse]),
    ];
    for (src, row) in table {
        for (q, want) in ["tcp/8443", "tcp/443", "tcp/8080"].iter().zip(row) {
            assert_eq!(verdict(&c, src, q), want, "{src} {q}");
        }
    }
}

#[test]
fn worked_example_compiled_values() {
    let c = compile(WORKED_EXAMPLE);
    let v4: Vec<(String, u64)> =
        c.v4.iter()
            .map(|(n, v)| (n.to_string(), v.allow_mask))
            .collect();
    // bit 0 host-wide, 1 admin, 2 mobile, 3 member (inherits bit 0).
    assert_eq!(
        v4,
        [
            ("0.0.0.0/0".to_string(), 0b0100),
            ("10.15.1.0/24".to_string(), 0b1101),
            ("10.15.1.10/32".to_string(), 0b1111),
            ("10.15.1.11/32".to_string(), 0b1111),
            ("10.15.1.12/32".to_string(), 0b1111),
        ]
    );
    assert!(c.v6.is_empty());
    let services: Vec<_> = c
        .services
        .iter()
        .map(|s| (s.index, s.name.as_str(), s.has_own_list))
        .collect();
    assert_eq!(
        services,
        [
            (1, "admin", true),
            (2, "mobile", true),
            (3, "member", false)
        ]
    );
    let ports: Vec<_> = c
        .ports
        .iter()
        .map(|p| (p.proto, p.first, p.last, p.service))
        .collect();
    assert_eq!(
        ports,
        [
            (Proto::Tcp, 443, 443, 2),
            (Proto::Tcp, 8080, 8080, 3),
            (Proto::Tcp, 8443, 8443, 1)
        ]
    );
    assert_eq!(c.config.mode, MODE_ENFORCE);
    assert_eq!(c.config.action, ACTION_DROP);
    assert_eq!(c.config.scope, SCOPE_HOST);
    assert_eq!(
        c.config.infra,
        INFRA_NDP | INFRA_DHCP | INFRA_PMTU | INFRA_MLD | INFRA_RETURN_TRAFFIC
    );
    assert_eq!(c.config.flow_timeout_ns, 120_000_000_000);
    assert_eq!(c.config.flow_timeout_tcp_ns, 3_600_000_000_000);
    assert_eq!(c.config.reject_max_per_sec, 1000);
    assert_eq!(c.config.event_source_interval_ns, 1_000_000_000);
    assert_eq!(c.config.event_max_per_sec, 1000);
    assert_eq!(c.config.generation, 0);
    assert_eq!(c.next_change, None);
}

#[test]
fn deny_and_always_allow_propagate_to_contained_prefixes() {
    let c = compile(
        "version: 1\nallow: [10.0.0.0/8]\ndeny: [10.1.0.0/16]\nalways_allow: [10.1.2.0/24]\n\
         services:\n  ssh: { ports: [tcp/22], allow: [10.1.2.3] }\n",
    );
    let get = |s: &str| c.v4.iter().find(|(n, _)| n.to_string() == s).unwrap().1;
    assert_eq!(
        get("10.0.0.0/8"),
        PrefixValue {
            allow_mask: 1,
            flags: 0,
            entry: 0
        }
    );
    assert_eq!(get("10.1.0.0/16").flags, FLAG_DENY);
    assert_eq!(get("10.1.2.0/24").flags, FLAG_DENY | FLAG_ALWAYS_ALLOW);
    let v = get("10.1.2.3/32");
    assert_eq!(
        (v.allow_mask, v.flags),
        (0b11, FLAG_DENY | FLAG_ALWAYS_ALLOW)
    );
    assert_eq!(verdict(&c, "10.1.9.9", "-"), ("drop", "deny"));
    assert_eq!(verdict(&c, "10.1.2.9", "tcp/22"), ("pass", "always_allow"));
    assert_eq!(verdict(&c, "10.2.0.1", "tcp/22"), ("drop", "not_allowed"));
    assert_eq!(verdict(&c, "10.2.0.1", "udp/53"), ("pass", "allowed"));
    assert_eq!(verdict(&c, "11.0.0.1", "-"), ("drop", "not_allowed"));
}

#[test]
fn entry_field_names_the_deciding_entry_with_list_ties() {
    let c = compile(
        "version: 1\nallow:\n  - 10.0.0.0/8\n  - 10.1.1.1\n\
         services:\n  web: { ports: [tcp/443], allow: [10.1.1.1, 10.9.9.9] }\n\
         deny: [10.9.9.9]\nalways_allow: [10.1.1.1]\n",
    );
    // Entries: allow 0, 1; web 2, 3; deny 4; always_allow 5.
    let lists: Vec<ListKind> = c.entries.iter().map(|e| e.list).collect();
    assert_eq!(
        lists,
        [
            ListKind::Allow,
            ListKind::Allow,
            ListKind::Service(1),
            ListKind::Service(1),
            ListKind::Deny,
            ListKind::AlwaysAllow
        ]
    );
    let get = |s: &str| {
        c.v4.iter()
            .find(|(n, _)| n.to_string() == s)
            .unwrap()
            .1
            .entry
    };
    assert_eq!(get("10.0.0.0/8"), 0);
    assert_eq!(get("10.1.1.1/32"), 5, "always_allow wins the tie");
    assert_eq!(get("10.9.9.9/32"), 4, "deny before a service list");
    assert_eq!(c.entries.get(0).unwrap().line, Some(3));
}

#[test]
fn entry_field_is_the_decider_not_just_the_most_specific_prefix() {
    let c = compile(
        "version: 1\nallow: [10.0.0.0/8, 10.3.0.0/16, 10.5.5.0/24]\n\
         deny: [10.5.0.0/16]\nalways_allow: [172.16.0.0/12]\n\
         services:\n  web: { ports: [tcp/443] }\n  ssh: { ports: [tcp/22], allow: [10.2.0.0/16, 172.16.1.0/24] }\n",
    );
    let get = |s: &str| {
        let e =
            c.v4.iter()
                .find(|(n, _)| n.to_string() == s)
                .unwrap()
                .1
                .entry;
        c.entries.get(e as usize).map(|e| e.text.to_string())
    };
    // Host-wide nesting, and web uses the host-wide list: one decider.
    assert_eq!(get("10.3.0.0/16").as_deref(), Some("10.3.0.0/16"));
    // Inside a deny, a more specific allow decides nothing: the deny does.
    assert_eq!(get("10.5.5.0/24").as_deref(), Some("10.5.0.0/16"));
    // Inside an always_allow, a service's prefix decides nothing.
    assert_eq!(get("172.16.1.0/24").as_deref(), Some("172.16.0.0/12"));
    // ssh's own 10.2/16 decides ssh packets, the host-wide 10/8 every other
    // port: the datapath asks the deciders map, keyed by list.
    let v =
        c.v4.iter()
            .find(|(n, _)| n.to_string() == "10.2.0.0/16")
            .unwrap()
            .1;
    assert_eq!(v.entry, ENTRY_LOOKUP);
    let ssh = c.services.iter().find(|s| s.name == "ssh").unwrap().index;
    assert_eq!(c.config.decider_keys, 1u64 << ssh);
    let mut deciders: Vec<(u8, String, String)> = c
        .deciders_v4
        .iter()
        .map(|(l, n, e)| {
            (
                *l,
                n.to_string(),
                c.entries.get(*e as usize).unwrap().text.to_string(),
            )
        })
        .collect();
    deciders.sort();
    assert_eq!(
        deciders,
        [
            (0, "10.0.0.0/8".to_string(), "10.0.0.0/8".to_string()),
            (ssh, "10.2.0.0/16".to_string(), "10.2.0.0/16".to_string()),
        ]
    );
    // explain, knowing the port, names each.
    let e = Explainer::new(&c);
    let entry = |src: &str, q: &str| e.explain(src.parse().unwrap(), port(q)).entry;
    assert_eq!(entry("10.2.0.1", "tcp/22").as_deref(), Some("10.2.0.0/16"));
    assert_eq!(entry("10.2.0.1", "tcp/443").as_deref(), Some("10.0.0.0/8"));
    assert_eq!(entry("10.5.5.1", "tcp/443").as_deref(), Some("10.5.0.0/16"));
    assert_eq!(
        entry("10.9.0.1", "tcp/22"),
        None,
        "not allowed: no entry decided"
    );
}

#[test]
fn ipv6_is_treated_alike() {
    let c = compile(
        "version: 1\nallow: [\"2001:db8::/32\", any4]\ndeny: [\"2001:db8:bad::-2001:db8:bad::ff\"]\n\
         services:\n  ssh: { ports: [tcp/22], allow: [\"2001:db8:1::/48\"] }\n",
    );
    assert_eq!(verdict(&c, "2001:db8::1", "-"), ("pass", "allowed"));
    assert_eq!(verdict(&c, "2001:db8:bad::80", "-"), ("drop", "deny"));
    assert_eq!(verdict(&c, "2001:db8:bad::100", "-"), ("pass", "allowed"));
    assert_eq!(verdict(&c, "2001:db8:1::5", "tcp/22"), ("pass", "allowed"));
    assert_eq!(
        verdict(&c, "2001:db8:2::5", "tcp/22"),
        ("drop", "not_allowed")
    );
    assert_eq!(verdict(&c, "2001:db9::1", "-"), ("drop", "not_allowed"));
    assert_eq!(verdict(&c, "192.0.2.1", "-"), ("pass", "allowed"));
    assert_eq!(
        c.v6.iter().filter(|(n, _)| n.prefix_len() == 120).count(),
        1
    );
}

#[test]
fn modes_actions_and_scope() {
    let c = compile("version: 1\nmode: monitor\naction: reject\nallow: [10.0.0.1]\n");
    assert_eq!(
        verdict(&c, "10.0.0.2", "tcp/80"),
        ("would_drop", "not_allowed")
    );
    let c = compile("version: 1\naction: reject\nallow: [10.0.0.1]\n");
    assert_eq!(verdict(&c, "10.0.0.2", "tcp/80"), ("reject", "not_allowed"));
    assert_eq!(verdict(&c, "10.0.0.2", "udp/80"), ("drop", "not_allowed"));
    assert_eq!(verdict(&c, "10.0.0.2", "-"), ("drop", "not_allowed"));
    let c = compile("version: 1\nmode: off\ndeny: [any]\n");
    assert_eq!(verdict(&c, "10.0.0.2", "tcp/80"), ("pass", "off"));
    let c = compile(
        "version: 1\nscope: services\nservices:\n  ssh: { ports: [tcp/22], allow: [10.0.0.1] }\n",
    );
    assert_eq!(verdict(&c, "10.0.0.2", "tcp/80"), ("pass", "out_of_scope"));
    assert_eq!(verdict(&c, "10.0.0.2", "-"), ("pass", "out_of_scope"));
    assert_eq!(verdict(&c, "10.0.0.2", "tcp/22"), ("drop", "not_allowed"));
    assert_eq!(verdict(&c, "10.0.0.1", "tcp/22"), ("pass", "allowed"));
}

#[test]
fn fragments_pass_when_any_list_allows() {
    let c = compile(
        "version: 1\nallow: [10.0.0.1]\nservices:\n  ssh: { ports: [tcp/22], allow: [10.0.0.2] }\n",
    );
    let ex = Explainer::new(&c);
    let frag = |s: &str| ex.explain_ports(s.parse().unwrap(), Ports::Fragment);
    assert_eq!(frag("10.0.0.1").decision.verdict, VERDICT_PASS);
    let r = frag("10.0.0.2");
    assert_eq!(
        (r.decision.verdict, r.decision.reason),
        (VERDICT_PASS, REASON_FRAGMENT)
    );
    // The kernel credits a fragment to no entry (it passed because some
    // list holds the source, not by an entry's decision); explain says
    // the same.
    assert!(r.decider.is_none(), "{:?}", r.decider);
    assert_eq!(frag("10.0.0.3").decision.verdict, VERDICT_DROP);
}

#[test]
fn explain_names_the_deciding_prefix_and_label() {
    let text = r#"
version: 1
groups:
  vpn: ["198.51.100.10-198.51.100.20"]
allow:
  - { from: 198.51.100.0/24, label: Lab }
  - { from: vpn, label: Corporate VPN }
deny:
  - { from: 198.51.100.13, label: Lost laptop }
always_allow:
  - { from: 198.51.100.250, label: Bastion }
"#;
    let c = compile(text);
    let ex = Explainer::new(&c);
    let e = |s: &str| ex.explain(s.parse().unwrap(), Some((Proto::Tcp, 22)));
    let x = e("198.51.100.15");
    assert_eq!(x.entry.as_deref(), Some("198.51.100.12/30"));
    assert_eq!(x.label.as_deref(), Some("Corporate VPN"));
    assert_eq!(x.written.as_deref(), Some("vpn"));
    assert_eq!(x.line, Some(7));
    let x = e("198.51.100.99");
    assert_eq!(
        (x.entry.as_deref(), x.label.as_deref()),
        (Some("198.51.100.0/24"), Some("Lab"))
    );
    let x = e("198.51.100.13");
    assert_eq!(reason_name(x.reason), "deny");
    assert_eq!(
        (x.entry.as_deref(), x.label.as_deref()),
        (Some("198.51.100.13/32"), Some("Lost laptop"))
    );
    let x = e("198.51.100.250");
    assert_eq!(reason_name(x.reason), "always_allow");
    assert_eq!(x.label.as_deref(), Some("Bastion"));
    let x = e("192.0.2.1");
    assert_eq!(reason_name(x.reason), "not_allowed");
    assert_eq!((x.entry, x.label, x.service), (None, None, None));
    let json = ex
        .explain("198.51.100.13".parse().unwrap(), None)
        .to_json("198.51.100.13", None);
    assert_eq!(
        json,
        serde_json::json!({"src": "198.51.100.13", "port": null, "verdict": "drop", "reason": "deny",
            "service": null, "entry": "198.51.100.13/32", "label": "Lost laptop",
            "written": "198.51.100.13", "line": 9})
    );
    let line = ex
        .explain_ref("203.0.113.9".parse().unwrap(), Some((Proto::Tcp, 22)))
        .describe(Some("tcp/22"));
    assert_eq!(line, "drop (not in the host-wide allowlist)");
}

#[test]
fn readable_line_of_cli_md() {
    let c = compile(
        "version: 1\nallow: [any]\nservices:\n  ssh: { ports: [tcp/22], allow: [10.0.0.1] }\n",
    );
    let ex = Explainer::new(&c);
    let r = ex.explain_ref("203.0.113.9".parse().unwrap(), Some((Proto::Tcp, 22)));
    assert_eq!(
        r.describe(Some("tcp/22")),
        "drop (not in the allowlist of service ssh)"
    );
}

#[test]
fn a_runtime_deny_wins_over_every_allow_and_loses_to_always_allow() {
    let p = load(
        "version: 1\nallow: [10.0.0.0/8]\nservices:\n  ssh: { ports: [tcp/22], allow: [10.0.0.0/24] }\n\
         always_allow: [10.0.0.9]\n",
    );
    let rt = |kind, net: &str, until: Option<SystemTime>| RuntimeEntry {
        kind,
        net: net.parse().unwrap(),
        service: None,
        label: Some(format!("rt {net}")),
        until,
    };
    let runtime = [
        rt(RuntimeKind::Deny, "10.0.0.0/28", None),
        rt(RuntimeKind::Allow, "10.0.0.5/32", None),
        rt(
            RuntimeKind::Deny,
            "10.1.0.0/16",
            Some(now() + Duration::from_secs(60)),
        ),
        rt(
            RuntimeKind::Deny,
            "10.2.0.0/16",
            Some(now() - Duration::from_secs(1)),
        ),
    ];
    let c = policy::compile(&p, now(), &runtime);
    let v = |s: &str, q: &str| verdict(&c, s, q);
    // The deny beats the host-wide list, ssh's own list and a runtime allow.
    assert_eq!(v("10.0.0.1", "-").0, "drop");
    assert_eq!(v("10.0.0.1", "tcp/22").0, "drop");
    assert_eq!(v("10.0.0.5", "tcp/22").0, "drop");
    assert_eq!(v("10.0.0.16", "tcp/22").0, "pass");
    // always_allow beats it.
    assert_eq!(v("10.0.0.9", "tcp/22").0, "pass");
    // Until its end; an ended one is nothing.
    assert_eq!(v("10.1.2.3", "-").0, "drop");
    assert_eq!(v("10.2.2.3", "-").0, "pass");
    let later = policy::compile(&p, now() + Duration::from_secs(61), &runtime);
    assert_eq!(verdict(&later, "10.1.2.3", "-").0, "pass");
    // Credited to the deny, as a policy deny would be.
    let ex = Explainer::new(&c);
    let e = ex.explain("10.0.0.1".parse().unwrap(), None);
    assert_eq!(e.reason, REASON_DENY);
    assert_eq!(e.label.as_deref(), Some("rt 10.0.0.0/28"));
}

#[test]
fn runtime_entries_merge_into_the_right_list() {
    let p = load(
        "version: 1\nallow: [10.0.0.1]\nservices:\n  ssh: { ports: [tcp/22], allow: [10.0.0.2] }\n  \
         web: { ports: [tcp/443] }\n",
    );
    let rt = |net: &str, svc: Option<&str>, until: Option<SystemTime>| RuntimeEntry {
        kind: RuntimeKind::Allow,
        net: net.parse().unwrap(),
        service: svc.map(str::to_string),
        label: Some(format!("rt {net}")),
        until,
    };
    let runtime = [
        rt("192.0.2.1/32", None, None),
        rt("192.0.2.2/32", Some("ssh"), None),
        rt("192.0.2.3/32", Some("web"), None),
        rt("192.0.2.4/32", Some("nosuch"), None),
        rt("192.0.2.5/32", None, Some(now() - Duration::from_secs(1))),
        rt(
            "192.0.2.6/32",
            None,
            Some(now() + Duration::from_secs(3600)),
        ),
    ];
    let c = policy::compile(&p, now(), &runtime);
    let v = |s: &str, q: &str| verdict(&c, s, q).0;
    // Host-wide: every service inheriting it, not ssh.
    assert_eq!(
        (
            v("192.0.2.1", "-"),
            v("192.0.2.1", "tcp/443"),
            v("192.0.2.1", "tcp/22")
        ),
        ("pass", "pass", "drop")
    );
    // ssh only.
    assert_eq!(
        (
            v("192.0.2.2", "tcp/22"),
            v("192.0.2.2", "-"),
            v("192.0.2.2", "tcp/443")
        ),
        ("pass", "drop", "drop")
    );
    // A service without a list of its own: that service only, on top of
    // what it inherits.
    assert_eq!(
        (
            v("192.0.2.3", "tcp/443"),
            v("192.0.2.3", "-"),
            v("192.0.2.3", "tcp/22")
        ),
        ("pass", "drop", "drop")
    );
    assert_eq!(v("10.0.0.1", "tcp/443"), "pass");
    // Unknown service: nothing. Expired: nothing. Running: until then.
    assert_eq!(v("192.0.2.4", "-"), "drop");
    assert_eq!(v("192.0.2.5", "-"), "drop");
    assert_eq!(v("192.0.2.6", "-"), "pass");
    assert_eq!(c.next_change, Some(now() + Duration::from_secs(3600)));
    let ex = Explainer::new(&c);
    let x = ex.explain("192.0.2.3".parse().unwrap(), Some((Proto::Tcp, 443)));
    assert_eq!(
        (x.label.as_deref(), x.line),
        (Some("rt 192.0.2.3/32"), None)
    );
    let e = c
        .entries
        .iter()
        .find(|e| *e.text == *"192.0.2.2/32")
        .unwrap();
    assert_eq!(e.list, ListKind::Service(1));
}

#[test]
fn until_and_windows_change_the_result_at_next_change() {
    let text = r#"
version: 1
allow:
  - { from: 10.0.0.1, until: "2025-06-15T13:00:00Z" }
  - from: 10.0.0.2
    when: { days: mon-fri, time: "22:00-06:00", tz: Europe/Helsinki }
"#;
    let p = load(text);
    // 2025-06-15 is a Sunday; 12:00Z is 15:00 in Helsinki.
    let c = policy::compile(&p, now(), &[]);
    let src =
        |c: &CompiledPolicy, s: &str| Explainer::new(c).explain(s.parse().unwrap(), None).verdict;
    assert_eq!(src(&c, "10.0.0.1"), VERDICT_PASS);
    assert_eq!(src(&c, "10.0.0.2"), VERDICT_DROP);
    assert_eq!(c.next_change, Some(ts("2025-06-15T13:00:00Z")));
    let later = policy::compile(&p, ts("2025-06-15T13:00:00Z"), &[]);
    assert_eq!(src(&later, "10.0.0.1"), VERDICT_DROP);
    // Sunday night has no window (it starts on weekdays); Monday 22:00
    // Helsinki is 19:00Z.
    assert_eq!(later.next_change, Some(ts("2025-06-16T19:00:00Z")));
    let night = policy::compile(&p, ts("2025-06-16T19:00:00Z"), &[]);
    assert_eq!(src(&night, "10.0.0.2"), VERDICT_PASS);
    assert_eq!(night.next_change, Some(ts("2025-06-17T03:00:00Z")));
}

#[test]
fn compiled_prefixes_are_sorted_unique_and_owned() {
    let c = compile(
        "version: 1\ngroups:\n  a: [10.0.0.0/8, 10.1.0.0/16]\n  b: [a, 10.1.0.0/16, \"2001:db8::/32\"]\n\
         allow: [a, b, 10.1.2.3]\ndeny: [b]\n",
    );
    let keys: Vec<_> =
        c.v4.iter()
            .map(|(n, _)| (u32::from(n.network()), n.prefix_len()))
            .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted);
    assert_eq!(c.v4.len(), 3);
    assert_eq!(c.provenance.v4_first.len(), c.v4.len() + 1);
    assert_eq!(c.provenance.v6_first.len(), c.v6.len() + 1);
    let owners = |i: usize| {
        &c.provenance.owners
            [c.provenance.v4_first[i] as usize..c.provenance.v4_first[i + 1] as usize]
    };
    for (i, (net, v)) in c.v4.iter().enumerate() {
        assert!(!owners(i).is_empty());
        // The credited entry owns this prefix or one containing it.
        let e = c.entries.get(v.entry as usize).unwrap();
        let found = c.v4.iter().enumerate().any(|(j, (outer, _))| {
            outer.contains(net) && owners(j).iter().any(|o| o.entry == v.entry)
        });
        assert!(found, "{net}: {e:?}");
    }
}

#[test]
fn explainer_lookup_is_longest_prefix_match() {
    let c = compile(
        "version: 1\nallow: [0.0.0.0/1, 10.0.0.0/8, 10.0.0.0/24, 10.0.0.128/25, 10.0.1.0/24, 255.255.255.255]\n",
    );
    let ex = Explainer::new(&c);
    let lpm = |s: &str| {
        ex.lookup(s.parse::<IpAddr>().unwrap())
            .map(|(_, i)| c.v4[i].0.to_string())
    };
    assert_eq!(lpm("10.0.0.200").as_deref(), Some("10.0.0.128/25"));
    assert_eq!(lpm("10.0.0.5").as_deref(), Some("10.0.0.0/24"));
    assert_eq!(lpm("10.0.2.5").as_deref(), Some("10.0.0.0/8"));
    assert_eq!(lpm("10.0.1.255").as_deref(), Some("10.0.1.0/24"));
    assert_eq!(lpm("11.0.0.0").as_deref(), Some("0.0.0.0/1"));
    assert_eq!(lpm("128.0.0.0"), None);
    assert_eq!(
        lpm("255.255.255.255").as_deref(),
        Some("255.255.255.255/32")
    );
    assert_eq!(lpm("::1"), None);
}

#[test]
fn empty_service_allow_means_nobody() {
    for list in ["allow: []", "allow:"] {
        let c = compile(&format!(
            "version: 1\nallow: [any]\nservices:\n  legacy:\n    ports: [tcp/8080]\n    {list}\n"
        ));
        assert!(c.services[0].has_own_list, "{list}");
        assert_eq!(
            verdict(&c, "10.0.0.1", "tcp/8080"),
            ("drop", "not_allowed"),
            "{list}"
        );
        assert_eq!(
            verdict(&c, "10.0.0.1", "tcp/8081"),
            ("pass", "allowed"),
            "{list}"
        );
    }
}

/// The YAML examples of docs/policy.md: every complete policy in them is
/// valid, and the worked example there gives the table there.
#[test]
fn docs_examples_are_valid_policies() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy.md"))
        .expect("docs/policy.md");
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in doc.lines() {
        match (&mut cur, line.trim_start().starts_with("```")) {
            (None, true) if line.trim() == "```yaml" => cur = Some(String::new()),
            (Some(b), true) => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            (Some(b), false) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    let complete: Vec<&String> = blocks
        .iter()
        .filter(|b| b.starts_with("version: 1"))
        .collect();
    assert!(complete.len() >= 3, "{} complete examples", complete.len());
    for b in &complete {
        policy::parse_str_at("docs.yaml", b, now()).unwrap_or_else(|e| panic!("{e}\n{b}"));
    }
    let worked = complete
        .iter()
        .find(|b| b.contains("10.15.1.*"))
        .expect("the worked example");
    assert_eq!(worked.as_str(), WORKED_EXAMPLE.trim_start());
}

#[test]
fn each_infrastructure_exemption_can_be_turned_off() {
    let all = INFRA_NDP | INFRA_DHCP | INFRA_PMTU | INFRA_MLD | INFRA_RETURN_TRAFFIC;
    for (key, bit) in [
        ("ndp", INFRA_NDP),
        ("dhcp", INFRA_DHCP),
        ("pmtu", INFRA_PMTU),
        ("mld", INFRA_MLD),
        ("return_traffic", INFRA_RETURN_TRAFFIC),
    ] {
        let c = compile(&format!(
            "version: 1\nallow: [203.0.113.0/24]\ninfrastructure: {{ {key}: false }}\n"
        ));
        assert_eq!(c.config.infra, all & !bit, "{key}: false");
    }
}

#[test]
fn flow_timeouts_are_set_per_protocol() {
    let c = compile(
        "version: 1\nallow: [10.0.0.0/8]\ninfrastructure: { flow_timeout: 30s, flow_timeout_tcp: 2h30m }\n",
    );
    assert_eq!(c.config.flow_timeout_ns, 30_000_000_000);
    assert_eq!(c.config.flow_timeout_tcp_ns, 9_000_000_000_000);
}

#[test]
fn the_rst_budget_is_per_second() {
    let rate = |r: &str| {
        compile(&format!(
            "version: 1\naction: reject\nallow: [10.0.0.0/8]\nreject_max_rate: {r}\n"
        ))
        .config
        .reject_max_per_sec
    };
    assert_eq!(rate("50/s"), 50);
    assert_eq!(rate("0/s"), 0);
    assert_eq!(rate("120/m"), 2);
    assert_eq!(
        rate("1/h"),
        1,
        "rounded up: a budget below one a second still answers"
    );
}

#[test]
fn dhcp_may_name_its_servers() {
    let c = compile(
        "version: 1\nallow: [10.0.0.0/8]\ninfrastructure:\n  dhcp: [198.51.100.1, 198.51.100.8/29, \"2001:db8::67\"]\n",
    );
    assert_ne!(c.config.infra & INFRA_DHCP, 0);
    assert_eq!(c.config.dhcp_servers, 3);
    let names: Vec<String> = c.dhcp_servers.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        names,
        ["198.51.100.1/32", "198.51.100.8/29", "2001:db8::67/128"]
    );
    let any = compile("version: 1\nallow: [10.0.0.0/8]\ninfrastructure: { dhcp: true }\n");
    assert_ne!(any.config.infra & INFRA_DHCP, 0);
    assert_eq!((any.config.dhcp_servers, any.dhcp_servers.len()), (0, 0));
    let off = compile("version: 1\nallow: [10.0.0.0/8]\ninfrastructure: { dhcp: false }\n");
    assert_eq!(off.config.infra & INFRA_DHCP, 0);
}

#[test]
fn the_lockout_guard_watches_22_and_ssh_unless_told_otherwise() {
    let c = compile(
        "version: 1\nallow: [10.0.0.0/8]\nservices:\n  ssh: { ports: [tcp/2222, udp/60001] }\n",
    );
    assert_eq!(c.lockout_ports, [(22, 22), (2222, 2222)]);
    let c = compile(
        "version: 1\nallow: [10.0.0.0/8]\nlockout_guard: { ports: [tcp/6443, tcp/10250, tcp/2379-2380] }\n",
    );
    assert_eq!(
        c.lockout_ports,
        [(2379, 2380), (6443, 6443), (10250, 10250)]
    );
    let c = compile("version: 1\nallow: [10.0.0.0/8]\nlockout_guard: { ports: [] }\n");
    assert!(c.lockout_ports.is_empty(), "an empty list guards nothing");
}

/// What the kernel judges `src` by `secs` after `now()` (no daemon).
fn kernel_verdict(c: &CompiledPolicy, src: &str, secs: u64) -> (&'static str, &'static str) {
    let table = policy::range4::RangeTable4::of_policy(c);
    let ex = Explainer::new(c);
    let t = now() + Duration::from_secs(secs);
    let t_ns = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let v = ex
        .value(src.parse().unwrap())
        .and_then(|v| table.expire(v, t_ns));
    let d = decide(&c.config, v, Ports::NoPort);
    (verdict_name(d.verdict), reason_name(d.reason))
}

#[test]
fn time_limited_entries_carry_their_deadlines_into_the_kernel() {
    let text = "version: 1\nallow:\n  - 10.0.0.0/8\n  - { from: 203.0.113.0/24, until: 2025-06-15T13:00:00Z }\n\
                deny:\n  - { from: 10.9.0.0/16, until: 2025-06-15T12:30:00Z }\n";
    let grant = |net: &str, secs: u64| RuntimeEntry {
        kind: RuntimeKind::Allow,
        net: net.parse().unwrap(),
        service: None,
        label: None,
        until: Some(now() + Duration::from_secs(secs)),
    };
    let c = policy::compile(&load(text), now(), &[grant("198.51.100.7/32", 3)]);
    // The untimed prefix has no deadline; the timed ones do.
    let flags = |net: &str| {
        let n: ipnet::IpNet = net.parse().unwrap();
        match n {
            ipnet::IpNet::V4(n) => c.v4.iter().find(|(p, _)| *p == n).unwrap().1.flags,
            ipnet::IpNet::V6(_) => unreachable!(),
        }
    };
    assert_eq!(flags("10.0.0.0/8") & FLAG_TIMED, 0);
    assert_ne!(flags("10.9.0.0/16") & FLAG_TIMED, 0);
    assert_ne!(flags("198.51.100.7/32") & FLAG_TIMED, 0);
    assert!(!c.timed.is_empty());

    let k = |src, secs| kernel_verdict(&c, src, secs);
    assert_eq!(k("198.51.100.7", 2), ("pass", "allowed"));
    assert_eq!(k("198.51.100.7", 3), ("drop", "not_allowed"));
    assert_eq!(k("198.51.100.8", 2), ("drop", "not_allowed"));
    assert_eq!(k("203.0.113.5", 3599), ("pass", "allowed"));
    assert_eq!(k("203.0.113.5", 3600), ("drop", "not_allowed"));
    // A timed deny inside an untimed allow: refused, then allowed.
    assert_eq!(k("10.9.1.1", 1799), ("drop", "deny"));
    assert_eq!(k("10.9.1.1", 1800), ("pass", "allowed"));
    assert_eq!(k("10.8.1.1", 1800), ("pass", "allowed"));
}

#[test]
fn past_the_last_deadline_the_kernel_follows_it_refuses_rather_than_allows() {
    // Six grants nested over one source, each ending a minute later than
    // the one inside it, and a timed deny that ends last: the kernel
    // follows four deadlines; from the fourth on it keeps only untimed
    // entries and timed denies, so the source is refused until a daemon
    // compiles again.
    let text = "version: 1\nallow: [10.0.0.0/8]\n\
                deny:\n  - { from: 198.51.96.0/20, until: 2025-06-15T14:00:00Z }\n\
                always_allow:\n  - { from: 198.51.96.0/19, until: 2025-06-15T12:30:00Z }\n";
    let lens = [32u8, 31, 30, 29, 28, 27];
    let grants: Vec<RuntimeEntry> = lens
        .iter()
        .enumerate()
        .map(|(i, l)| RuntimeEntry {
            kind: RuntimeKind::Allow,
            net: format!("198.51.100.7/{l}")
                .parse::<ipnet::IpNet>()
                .unwrap()
                .trunc(),
            service: None,
            label: None,
            until: Some(now() + Duration::from_secs(60 * (i as u64 + 1))),
        })
        .collect();
    let c = policy::compile(&load(text), now(), &grants);
    let k = |secs| kernel_verdict(&c, "198.51.100.7", secs);
    // always_allow (until 12:30) wins over the deny first.
    assert_eq!(k(0), ("pass", "always_allow"));
    assert_eq!(k(59), ("pass", "always_allow"));
    // Deadlines: 60, 120, 180, 240, 300, 360 (grants), 1800 (always_allow),
    // 7200 (deny). The fourth is 240: from there on the kernel keeps the
    // deny and drops every timed allow, including always_allow.
    assert_eq!(k(239), ("pass", "always_allow"));
    assert_eq!(k(240), ("drop", "deny"));
    assert_eq!(k(7200), ("drop", "deny"));
    // A source under fewer deadlines is exact to its last one.
    assert_eq!(
        kernel_verdict(&c, "198.51.97.1", 1799),
        ("pass", "always_allow")
    );
    assert_eq!(kernel_verdict(&c, "198.51.97.1", 1800), ("drop", "deny"));
    assert_eq!(
        kernel_verdict(&c, "198.51.97.1", 7200),
        ("drop", "not_allowed")
    );
}

#[test]
fn dns_names_cover_what_they_resolved_to() {
    let p = load(
        r#"
version: 1
dns: { min_ttl: 2s, max_ttl: 10m }
groups:
  office: [dns:office.test, 203.0.113.0/28]
allow:
  - { from: office, label: Office }
  - dns6:v6only.test
deny:
  - dns4:bad.test
"#,
    );
    assert_eq!(p.dns.min_ttl, Duration::from_secs(2));
    assert_eq!(p.dns.max_ttl, Duration::from_secs(600));
    let names: Vec<String> = p.dns_names().iter().map(|n| n.to_string()).collect();
    assert_eq!(
        names,
        ["dns4:bad.test", "dns:office.test", "dns6:v6only.test"]
    );
    // Before any answer a name stands for nothing: only the group's CIDR.
    let c = policy::compile(&p, now(), &[]);
    assert_eq!(verdict(&c, "198.51.100.7", "-"), ("drop", "not_allowed"));
    assert_eq!(verdict(&c, "203.0.113.3", "-"), ("pass", "allowed"));
    let mut dns = policy::Resolved::default();
    let addrs = |v: &[&str]| v.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect();
    dns.names.insert(
        "office.test".into(),
        addrs(&["198.51.100.7", "2001:db8::7"]),
    );
    dns.names.insert(
        "v6only.test".into(),
        addrs(&["198.51.100.8", "2001:db8::8"]),
    );
    dns.names
        .insert("bad.test".into(), addrs(&["198.51.100.7", "2001:db8::9"]));
    let c = policy::compile_with(&p, now(), &[], &dns);
    let ex = Explainer::new(&c);
    let x = ex.explain("2001:db8::7".parse().unwrap(), None);
    assert_eq!(verdict_name(x.verdict), "pass");
    assert_eq!(x.label.as_deref(), Some("Office"));
    assert_eq!(x.written.as_deref(), Some("office"));
    assert_eq!(x.entry.as_deref(), Some("2001:db8::7/128"));
    // The deny's dns4: takes the name's A record only, and wins.
    assert_eq!(verdict(&c, "198.51.100.7", "-"), ("drop", "deny"));
    assert_eq!(verdict(&c, "2001:db8::9", "-"), ("drop", "not_allowed"));
    // dns6: takes the AAAA record only.
    assert_eq!(verdict(&c, "2001:db8::8", "-"), ("pass", "allowed"));
    assert_eq!(verdict(&c, "198.51.100.8", "-"), ("drop", "not_allowed"));
}

#[test]
fn dns_settings_and_names_are_checked() {
    for (text, want) in [
        ("version: 1\nallow: [\"dns:a..test\"]\n", "empty label"),
        (
            "version: 1\ndns: { min_ttl: 0s }\nallow: [10.0.0.1]\n",
            "from 1s to 24h",
        ),
        (
            "version: 1\ndns: { min_ttl: 2h, max_ttl: 1h }\nallow: [10.0.0.1]\n",
            "longer than max_ttl",
        ),
        (
            "version: 1\ndns: { ttl: 1h }\nallow: [10.0.0.1]\n",
            "unknown",
        ),
    ] {
        let e = policy::parse_str_at("test.yaml", text, now())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{text}: {e}");
    }
    // A policy whose only allow entry is a name allows someone (once it
    // resolves): no "allows nobody" warning.
    let l =
        policy::parse_str_at("t.yaml", "version: 1\nallow: [dns:office.test]\n", now()).unwrap();
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
}
