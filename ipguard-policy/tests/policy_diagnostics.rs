//! One test per error and per warning of the policy language (docs/policy.md
//! §1-§4): each asserts the message, the line and the column.

use std::time::SystemTime;

use ipguard_policy::{self as policy, Diagnostic, PolicyErrors};

/// 2025-06-15T12:00:00Z: a fixed "now" for `until` warnings.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_749_988_800)
}

fn check(text: &str) -> Result<Vec<Diagnostic>, PolicyErrors> {
    policy::parse_str_at("policy.yaml", text, now()).map(|l| l.warnings)
}

/// The only error of `text`, as (line, column, message).
fn error(text: &str) -> (Option<u32>, Option<u32>, String) {
    let errs = check(text).expect_err("the policy must be refused");
    assert_eq!(errs.errors.len(), 1, "exactly one error expected: {errs}");
    let e = &errs.errors[0];
    (e.line(), e.column(), e.message.clone())
}

/// The only warning of a valid `text`.
fn warning(text: &str) -> (Option<u32>, Option<u32>, String) {
    let warns = check(text).unwrap_or_else(|e| panic!("the policy must be valid: {e}"));
    assert_eq!(warns.len(), 1, "exactly one warning expected: {warns:?}");
    let w = &warns[0];
    (w.line(), w.column(), w.message.clone())
}

fn at(line: u32, col: u32, msg: &str) -> (Option<u32>, Option<u32>, String) {
    (Some(line), Some(col), msg.to_string())
}

#[test]
fn bad_ipv4_address() {
    let p = "version: 1\nallow:\n  - 203.0.113.0/24\n  - 198.51.100.300\n";
    assert_eq!(
        error(p),
        at(4, 5, "\"198.51.100.300\" is not an IPv4 address")
    );
}

#[test]
fn bad_ipv6_address() {
    let p = "version: 1\nallow: [\"2001:db8::1\", \"2001:db8:::2\"]\n";
    assert_eq!(
        error(p),
        at(2, 24, "\"2001:db8:::2\" is not an IPv6 address")
    );
}

#[test]
fn bad_address_in_a_group_is_reported_where_it_is_written() {
    let p = "version: 1\ngroups:\n  office: [203.0.113.0/24, 203.0.113.256]\nallow: [office]\n";
    assert_eq!(
        error(p),
        at(3, 28, "\"203.0.113.256\" is not an IPv4 address")
    );
}

#[test]
fn bad_prefix_length() {
    let p = "version: 1\nallow:\n  - from: 10.0.0.0/33\n";
    assert_eq!(
        error(p),
        at(
            3,
            11,
            "\"10.0.0.0/33\": \"33\" is not a prefix length for IPv4 (0-32)"
        )
    );
    let p = "version: 1\nallow: [\"2001:db8::/129\"]\n";
    assert_eq!(
        error(p),
        at(
            2,
            9,
            "\"2001:db8::/129\": \"129\" is not a prefix length for IPv6 (0-128)"
        )
    );
}

#[test]
fn reversed_range() {
    let p = "version: 1\ndeny:\n  - 10.0.0.20-10.0.0.10\n";
    assert_eq!(
        error(p),
        at(
            3,
            5,
            "range \"10.0.0.20-10.0.0.10\" is reversed: 10.0.0.20 comes after 10.0.0.10"
        )
    );
}

#[test]
fn mixed_family_range() {
    let p = "version: 1\nallow:\n  - \"10.0.0.1 - 2001:db8::1\"\n";
    assert_eq!(
        error(p),
        at(
            3,
            5,
            "range \"10.0.0.1 - 2001:db8::1\" mixes IPv4 and IPv6: both ends must be of one family"
        )
    );
}

#[test]
fn wildcard_in_the_wrong_place() {
    let p = "version: 1\nallow:\n  - 10.*.1.*\n";
    assert_eq!(
        error(p),
        at(
            3,
            5,
            "\"10.*.1.*\": a wildcard may only replace trailing octets, e.g. 10.15.*.*"
        )
    );
}

#[test]
fn wildcard_in_ipv6() {
    let p = "version: 1\nallow: [\"2001:db8::*\"]\n";
    assert_eq!(
        error(p),
        at(
            2,
            9,
            "\"2001:db8::*\": wildcards are for IPv4 only; write an IPv6 prefix as a CIDR such as 2001:db8::/32"
        )
    );
}

#[test]
fn unquoted_leading_wildcard_gets_a_hint() {
    let p = "version: 1\nallow: [*.*.*.*]\n";
    assert_eq!(
        error(p),
        at(
            2,
            9,
            "\"*.*.*.*\": a value that starts with `*` must be quoted in YAML (`*` starts an alias): write \"*.*.*.*\""
        )
    );
}

#[test]
fn unknown_group() {
    let p = "version: 1\ngroups:\n  office: [203.0.113.0/24]\nallow:\n  - offfice\n";
    assert_eq!(error(p), at(5, 5, "unknown group \"offfice\""));
}

#[test]
fn unknown_group_inside_a_group() {
    let p =
        "version: 1\ngroups:\n  staff: [office, vpn]\n  office: [203.0.113.0/24]\nallow: [staff]\n";
    assert_eq!(error(p), at(3, 19, "unknown group \"vpn\""));
}

#[test]
fn cyclic_group() {
    let p = "version: 1\ngroups:\n  a: [10.0.0.1, b]\n  b: [c]\n  c: [a]\nallow: [a]\n";
    assert_eq!(
        error(p),
        at(5, 7, "group \"a\" is part of a cycle: a -> b -> c -> a")
    );
}

#[test]
fn group_naming_itself() {
    let p = "version: 1\ngroups:\n  a: [a]\nallow: [a]\n";
    assert_eq!(error(p), at(3, 7, "group \"a\" is part of a cycle: a -> a"));
}

#[test]
fn duplicate_group() {
    let p = "version: 1\ngroups:\n  office: [203.0.113.0/24]\n  vpn: [198.51.100.0/24]\n  office: [192.0.2.0/24]\nallow: [office]\n";
    assert_eq!(
        error(p),
        at(5, 3, "group \"office\" is defined twice (first at line 3)")
    );
}

#[test]
fn invalid_group_name() {
    let p = "version: 1\ngroups:\n  Office: [203.0.113.0/24]\n";
    assert_eq!(
        error(p),
        at(
            3,
            3,
            "\"Office\" is not a valid group name: use a lowercase letter, then up to 62 lowercase letters, digits, `_` or `-`"
        )
    );
    let p = "version: 1\ngroups:\n  any: [203.0.113.0/24]\n";
    assert_eq!(
        error(p),
        at(3, 3, "\"any\" is a keyword and cannot name a group")
    );
}

#[test]
fn port_overlap_between_services() {
    let p = "version: 1\nallow: [any]\nservices:\n  web: { ports: [tcp/80, tcp/443] }\n  api:\n    ports: [tcp/8080, tcp/400-500]\n";
    assert_eq!(
        error(p),
        at(
            6,
            23,
            "\"tcp/400-500\" of service \"api\" overlaps \"tcp/443\" of service \"web\" (line 4): a port belongs to one service only"
        )
    );
}

#[test]
fn same_port_of_another_protocol_is_no_overlap() {
    let p = "version: 1\nallow: [any]\nservices:\n  dns: { ports: [udp/53] }\n  dnstcp: { ports: [tcp/53] }\n";
    assert!(check(p).is_ok());
}

#[test]
fn port_out_of_range() {
    let p = "version: 1\nallow: [any]\nservices:\n  web: { ports: [tcp/80, tcp/70000] }\n";
    assert_eq!(
        error(p),
        at(4, 26, "\"tcp/70000\": port 70000 is out of range (1-65535)")
    );
    let p = "version: 1\nallow: [any]\nservices:\n  web: { ports: [udp/0] }\n";
    assert_eq!(
        error(p),
        at(4, 18, "\"udp/0\": port 0 is out of range (1-65535)")
    );
}

#[test]
fn bad_port_protocol_and_reversed_port_range() {
    let p = "version: 1\nallow: [any]\nservices:\n  ping: { ports: [icmp/8] }\n";
    assert_eq!(
        error(p),
        at(4, 19, "\"icmp/8\": the protocol must be tcp or udp")
    );
    let p = "version: 1\nallow: [any]\nservices:\n  web: { ports: [tcp/90-80] }\n";
    assert_eq!(
        error(p),
        at(4, 18, "\"tcp/90-80\": the port range is reversed")
    );
}

#[test]
fn more_than_63_services() {
    let mut p = String::from("version: 1\nallow: [any]\nservices:\n");
    for i in 0..64 {
        p.push_str(&format!("  s{i}: {{ ports: [tcp/{}] }}\n", 1000 + i));
    }
    assert_eq!(
        error(&p),
        at(
            67,
            3,
            "too many services: \"s63\" is number 64, at most 63 are allowed"
        )
    );
    // 63 are fine.
    let p63: String = p.lines().take(66).map(|l| format!("{l}\n")).collect();
    assert!(check(&p63).is_ok());
}

#[test]
fn bad_time_window_days() {
    let p = "version: 1\nallow:\n  - from: 10.0.0.1\n    when: { days: mon-fry }\n";
    assert_eq!(
        error(p),
        at(
            4,
            19,
            "\"mon-fry\": \"fry\" is not a day (mon, tue, wed, thu, fri, sat, sun)"
        )
    );
}

#[test]
fn bad_time_window_time() {
    let p = "version: 1\nallow:\n  - from: 10.0.0.1\n    when: { days: [sat, sun], time: \"22:00-25:00\" }\n";
    assert_eq!(
        error(p),
        at(
            4,
            37,
            "\"22:00-25:00\" is not a time window: write HH:MM-HH:MM, e.g. \"22:00-06:00\""
        )
    );
    let p = "version: 1\nallow:\n  - from: 10.0.0.1\n    when: { time: \"08:00-08:00\" }\n";
    assert_eq!(
        error(p),
        at(
            4,
            19,
            "\"08:00-08:00\" is an empty time window: for the whole day leave `time` out or write \"00:00-24:00\""
        )
    );
}

#[test]
fn bad_time_zone() {
    let p = "version: 1\nallow:\n  - from: 10.0.0.1\n    when: { time: \"22:00-06:00\", tz: Europe/Helsinky }\n";
    assert_eq!(
        error(p),
        at(
            4,
            38,
            "\"Europe/Helsinky\" is not a known time zone (an IANA name such as Europe/Helsinki, or UTC)"
        )
    );
}

#[test]
fn empty_when() {
    let p = "version: 1\nallow:\n  - from: 10.0.0.1\n    when: { tz: UTC }\n";
    assert_eq!(error(p), at(4, 11, "`when` needs `days`, `time` or both"));
}

#[test]
fn bad_until() {
    let p = "version: 1\nallow:\n  - from: 192.0.2.77\n    label: Contractor laptop\n    until: 2026-12-01\n";
    assert_eq!(
        error(p),
        at(
            5,
            12,
            "\"2026-12-01\" is not an RFC 3339 time: write e.g. 2026-12-01T00:00:00Z"
        )
    );
}

#[test]
fn wrong_version() {
    let p = "version: 2\nallow: [any]\n";
    assert_eq!(
        error(p),
        at(
            1,
            10,
            "unsupported version \"2\": this ipguard reads policy version 1"
        )
    );
    let p = "version: 1.0\nallow: [any]\n";
    assert_eq!(
        error(p),
        at(
            1,
            10,
            "unsupported version \"1.0\": this ipguard reads policy version 1"
        )
    );
}

#[test]
fn missing_version_has_no_line() {
    let p = "allow: [any]\n";
    assert_eq!(
        error(p),
        (
            None,
            None,
            "missing key `version`: the first line of a policy is `version: 1`".to_string()
        )
    );
}

#[test]
fn unknown_key() {
    let p = "version: 1\nalow: [any]\n";
    let (l, c, m) = error(p);
    assert_eq!((l, c), (Some(2), Some(1)));
    assert!(
        m.starts_with("unknown key `alow`, expected one of version, mode"),
        "{m}"
    );
    let p = "version: 1\nallow:\n  - from: 10.0.0.1\n    lable: typo\n";
    let (l, c, m) = error(p);
    assert_eq!((l, c), (Some(4), Some(5)));
    assert_eq!(
        m,
        "unknown key `lable`, expected one of from, label, until, when"
    );
    let p = "version: 1\nallow: [any]\nservices:\n  ssh: { ports: [tcp/22], alow: [any] }\n";
    let (l, c, m) = error(p);
    assert_eq!((l, c), (Some(4), Some(27)));
    assert_eq!(m, "unknown key `alow`, expected one of ports, allow");
}

#[test]
fn duplicate_key() {
    let p = "version: 1\nallow: [any]\nallow: [10.0.0.1]\n";
    assert_eq!(
        error(p),
        at(3, 1, "duplicate key `allow`: each key may appear once")
    );
}

#[test]
fn bad_mode() {
    let p = "version: 1\nmode: enforced\nallow: [any]\n";
    assert_eq!(
        error(p),
        at(
            2,
            7,
            "\"enforced\" is not a mode: use enforce, monitor, off"
        )
    );
}

#[test]
fn label_too_long() {
    let label = "x".repeat(129);
    let p = format!("version: 1\nallow:\n  - {{ from: 10.0.0.1, label: {label} }}\n");
    assert_eq!(
        error(&p),
        at(
            3,
            30,
            &format!("label {label:?} is 129 characters long; at most 128 are allowed")
        )
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let p = "version: 1\nallow:\n  - 10.0.0.300\n  - nosuchgroup\n  - 10.0.0.9-10.0.0.1\n";
    let errs = check(p).unwrap_err();
    let lines: Vec<_> = errs.errors.iter().map(|e| e.line()).collect();
    assert_eq!(lines, [Some(3), Some(4), Some(5)]);
    assert_eq!(
        errs.to_string().lines().next(),
        Some("policy.yaml:3:5: error: \"10.0.0.300\" is not an IPv4 address")
    );
}

#[test]
fn yaml_syntax_error_is_positioned() {
    let p = "version: 1\nallow: [10.0.0.1\n";
    let errs = check(p).unwrap_err();
    assert_eq!(errs.errors.len(), 1);
    assert!(errs.errors[0].line().is_some(), "{errs}");
}

// ---- warnings ----

#[test]
fn warning_host_bits_set() {
    let p = "version: 1\nallow:\n  - 203.0.113.7/24\n";
    assert_eq!(
        warning(p),
        at(
            3,
            5,
            "\"203.0.113.7/24\" has host bits set: it means 203.0.113.0/24"
        )
    );
}

#[test]
fn warning_entry_covered_by_another_of_the_same_list() {
    let p = "version: 1\ngroups:\n  office: [203.0.113.0/24]\nallow:\n  - office\n  - { from: 203.0.113.10, label: Alice }\n";
    assert_eq!(
        warning(p),
        at(
            6,
            5,
            "entry \"203.0.113.10\" is fully covered by entry \"office\" (line 5) of the same list (allow)"
        )
    );
}

#[test]
fn covered_check_per_list_and_respects_time() {
    // Same prefix in allow and deny: different lists, no warning.
    let p = "version: 1\nallow: [10.0.0.0/8]\ndeny: [10.1.0.0/16]\n";
    assert_eq!(check(p).unwrap().len(), 0);
    // Covered only by an entry that expires: not redundant.
    let p = "version: 1\nallow:\n  - { from: 10.0.0.0/8, until: 2030-01-01T00:00:00Z }\n  - 10.1.0.0/16\n";
    assert_eq!(check(p).unwrap().len(), 0);
    // Two identical entries: only the later one is redundant.
    let p = "version: 1\nservices:\n  ssh:\n    ports: [tcp/22]\n    allow: [10.0.0.1, 10.0.0.1]\n";
    assert_eq!(
        warning(p),
        at(
            5,
            23,
            "entry \"10.0.0.1\" is fully covered by entry \"10.0.0.1\" (line 5) of the same list (allow of service ssh)"
        )
    );
    // A range covered by two entries together, but by neither alone: no
    // warning (the rule is "covered by another entry").
    let p = "version: 1\nallow:\n  - 10.0.0.0/25\n  - 10.0.0.128/25\n  - 10.0.0.100-10.0.0.200\n";
    assert_eq!(check(p).unwrap().len(), 0);
}

#[test]
fn warning_expired_until() {
    let p = "version: 1\nallow:\n  - office\n  - from: 192.0.2.77\n    until: 2025-01-01T00:00:00Z\ngroups:\n  office: [203.0.113.0/24]\n";
    assert_eq!(
        warning(p),
        at(
            5,
            12,
            "until \"2025-01-01T00:00:00Z\" has passed: this entry is no longer active"
        )
    );
}

#[test]
fn warning_allows_nobody() {
    let p = "version: 1\nmode: enforce\ndeny: [10.0.0.1]\n";
    assert_eq!(
        warning(p),
        at(
            2,
            7,
            "with mode: enforce and scope: host this policy allows nobody: every packet but infrastructure traffic is refused"
        )
    );
    // Without `mode:` the default applies; the warning belongs to no line.
    let (l, c, _) = warning("version: 1\n");
    assert_eq!((l, c), (None, None));
    // Monitor mode, services scope, or anyone allowed: no warning.
    assert!(check("version: 1\nmode: monitor\n").unwrap().is_empty());
    assert!(check("version: 1\nscope: services\n").unwrap().is_empty());
    assert!(
        check("version: 1\nservices:\n  web: { ports: [tcp/443], allow: [any] }\n")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn display_format() {
    let errs = check("version: 1\nallow: [10.0.0.256]\n").unwrap_err();
    assert_eq!(
        errs.to_string(),
        "policy.yaml:2:9: error: \"10.0.0.256\" is not an IPv4 address"
    );
    let w = check("version: 1\nallow: [10.0.0.1/8]\n").unwrap();
    assert_eq!(
        w[0].to_string(),
        "policy.yaml:2:9: warning: \"10.0.0.1/8\" has host bits set: it means 10.0.0.0/8"
    );
}

#[test]
fn not_a_mapping() {
    assert_eq!(
        error("- 10.0.0.1\n"),
        at(1, 1, "expected a mapping (`key: value` lines) here")
    );
    assert_eq!(
        error("version: 1\nallow:\n  - from: [[10.0.0.1]]\n"),
        at(
            3,
            12,
            "expected a single value here, not a list or a mapping"
        )
    );
}

#[test]
fn empty_file() {
    assert_eq!(
        error(""),
        (
            None,
            None,
            "the policy is empty: it needs at least `version: 1`".to_string()
        )
    );
    // Only comments: a YAML document without keys.
    let (l, c, m) = error("# nothing yet\n");
    assert_eq!((l, c), (None, None));
    assert!(m.starts_with("missing key `version`"), "{m}");
}

#[test]
fn flow_timeout_tcp_too_short() {
    let p = "version: 1\nallow: [any]\ninfrastructure:\n  flow_timeout_tcp: 500ms\n";
    let (line, _, msg) = error(p);
    assert_eq!(line, Some(4), "{msg}");
    assert!(msg.contains("flow_timeout_tcp"), "{msg}");
}

#[test]
fn reject_max_rate_is_a_rate() {
    let p = "version: 1\nallow: [any]\nreject_max_rate: fast\n";
    let (line, _, msg) = error(p);
    assert_eq!(line, Some(3), "{msg}");
    assert!(msg.contains("is not a rate"), "{msg}");
}

#[test]
fn dhcp_servers_are_addresses_and_few() {
    let (line, _, msg) = error(
        "version: 1\nallow: [any]\ngroups: { g: [10.0.0.1] }\ninfrastructure:\n  dhcp: [g]\n",
    );
    assert_eq!(line, Some(5), "{msg}");
    assert!(msg.contains("not an address or CIDR"), "{msg}");
    let (_, _, msg) = error("version: 1\nallow: [any]\ninfrastructure:\n  dhcp: []\n");
    assert!(msg.contains("dhcp: false"), "{msg}");
    let nine: Vec<String> = (1..=9).map(|i| format!("10.0.0.{i}")).collect();
    let (_, _, msg) = error(&format!(
        "version: 1\nallow: [any]\ninfrastructure:\n  dhcp: [{}]\n",
        nine.join(", ")
    ));
    assert!(msg.contains("at most 8"), "{msg}");
    let (_, _, msg) = error("version: 1\nallow: [any]\ninfrastructure:\n  dhcp: sometimes\n");
    assert!(msg.contains("write true, false or a list"), "{msg}");
}

#[test]
fn lockout_guard_ports_are_tcp() {
    let (line, col, msg) =
        error("version: 1\nallow: [any]\nlockout_guard:\n  ports: [tcp/22, udp/53]\n");
    assert_eq!((line, col), (Some(4), Some(19)), "{msg}");
    assert!(msg.contains("write tcp/PORT"), "{msg}");
}

#[test]
fn covered_entry_warnings_can_be_found_later() {
    let p = "version: 1\nallow:\n  - 203.0.113.0/24\n  - 203.0.113.7\n  - { from: 198.51.100.1, until: 2020-01-01T00:00:00Z }\n";
    let all = check(p).unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let deferred = policy::parse_checked(
        "policy.yaml",
        p,
        now(),
        &policy::GivenLists::default(),
        policy::Coverage::Defer,
    )
    .unwrap();
    assert_eq!(deferred.warnings.len(), 1, "{:?}", deferred.warnings);
    assert!(deferred.warnings[0].message.contains("has passed"));
    let later = policy::covered_warnings("policy.yaml", &deferred.policy);
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(later[0].line(), Some(4));
    assert!(later[0].message.contains("is fully covered by entry"));
    let mut both: Vec<String> = deferred
        .warnings
        .iter()
        .chain(&later)
        .map(|d| d.to_string())
        .collect();
    let mut want: Vec<String> = all.iter().map(|d| d.to_string()).collect();
    both.sort();
    want.sort();
    assert_eq!(both, want);
}
