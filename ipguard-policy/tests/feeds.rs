//! Groups that are URL feeds (`{ url: https://…, … }`): what the policy
//! accepts and refuses, and how a feed's copy reaches the compiled policy.

use std::{net::IpAddr, sync::Arc, time::Duration, time::SystemTime};

use ipguard_common::VERDICT_PASS;
use ipguard_policy::{self as policy, Explainer, FeedFormat, Proto};

fn load(text: &str) -> Arc<policy::Policy> {
    policy::parse_str("policy.yaml", text)
        .unwrap_or_else(|e| panic!("{e}"))
        .policy
}

/// The only error of `text`: (line, message).
fn error(text: &str) -> (Option<u32>, String) {
    let errs = policy::parse_str("policy.yaml", text).expect_err("must be refused");
    assert_eq!(errs.errors.len(), 1, "one error expected: {errs}");
    (errs.errors[0].line(), errs.errors[0].message.clone())
}

fn passes(c: &policy::CompiledPolicy, addr: &str) -> bool {
    let e = Explainer::new(c).explain(addr.parse::<IpAddr>().unwrap(), Some((Proto::Tcp, 443)));
    e.verdict == VERDICT_PASS
}

const POLICY: &str = r#"version: 1
groups:
  aws:
    url: https://ranges.test/ip-ranges.json
    format: json
    json_path: ["$.prefixes[*].ip_prefix", "$.ipv6_prefixes[*].ipv6_prefix"]
    refresh: 15m
    max_entries: 20_000
    max_bytes: 4MiB
    timeout: 10s
    max_shrink: 20%
  cf: { url: "https://ranges.test/ips-v4" }
  unused: { url: "https://ranges.test/unused" }
  edge: [cf, 198.51.100.0/28]
allow:
  - { from: aws, label: AWS }
  - edge
"#;

#[test]
fn a_feed_group_is_described_not_read() {
    let p = load(POLICY);
    let groups: Vec<&str> = p.feeds.iter().map(|f| &*f.group).collect();
    assert_eq!(groups, ["aws", "cf"], "an unused feed is not fetched");
    let aws = p.feed("aws").unwrap();
    assert_eq!(aws.format, FeedFormat::Json);
    assert_eq!(aws.json_paths.len(), 2);
    assert_eq!(aws.refresh, Duration::from_secs(900));
    assert_eq!(aws.max_entries, 20_000);
    assert_eq!(aws.max_bytes, 4 << 20);
    assert_eq!(aws.timeout, Duration::from_secs(10));
    assert_eq!(aws.max_shrink_percent, 20);
    let cf = p.feed("cf").unwrap();
    assert_eq!(cf.format, FeedFormat::Lines);
    assert_eq!(cf.refresh, policy::DEFAULT_FEED_REFRESH);
    assert_eq!(
        cf.max_shrink_percent,
        policy::DEFAULT_FEED_MAX_SHRINK_PERCENT
    );
    assert_eq!(p.allow[0].feeds(), [Arc::from("aws")]);
    assert_eq!(
        p.allow[1].feeds(),
        [Arc::from("cf")],
        "through a group of groups"
    );
}

#[test]
fn a_feed_covers_what_its_copy_holds() {
    let p = load(POLICY);
    // Without a copy a feed stands for nothing: only the literal /28.
    let c = policy::compile(&p, SystemTime::now(), &[]);
    assert!(!passes(&c, "203.0.113.9"));
    assert!(passes(&c, "198.51.100.3"));
    let aws = p.feed("aws").unwrap();
    let body = br#"{"prefixes":[{"ip_prefix":"203.0.113.0/25"}],"ipv6_prefixes":[{"ipv6_prefix":"2001:db8:5::/48"}]}"#;
    let parsed = aws.parse_body(body).unwrap();
    let mut r = policy::Resolved::default();
    r.feeds.insert(aws.group.clone(), parsed.nets.into());
    let c = policy::compile_with(&p, SystemTime::now(), &[], &r);
    assert!(passes(&c, "203.0.113.9"));
    assert!(passes(&c, "2001:db8:5::1"));
    assert!(!passes(&c, "203.0.113.200"));
    let x = Explainer::new(&c).explain("203.0.113.9".parse().unwrap(), None);
    assert_eq!(x.written.as_deref(), Some("aws"), "{x:?}");
}

#[test]
fn feeds_are_https_only() {
    let (line, m) = error("version: 1\ngroups:\n  f: { url: http://ranges.test/x }\nallow: [f]\n");
    assert_eq!(line, Some(3));
    assert!(m.contains("plain HTTP") && m.contains("https only"), "{m}");
    let (_, m) = error("version: 1\ngroups:\n  f: { url: \"ftp://ranges.test/x\" }\nallow: [f]\n");
    assert!(m.contains("not an https URL"), "{m}");
    let (_, m) =
        error("version: 1\ngroups:\n  f: { url: \"https://user:pw@ranges.test/x\" }\nallow: [f]\n");
    assert!(m.contains("credentials"), "{m}");
}

#[test]
fn feed_settings_are_checked() {
    for (group, want) in [
        (
            "{ url: https://r.test/x, format: xml }",
            "not a feed format",
        ),
        ("{ url: https://r.test/x, format: json }", "needs json_path"),
        (
            "{ url: https://r.test/x, json_path: $.a }",
            "json_path is for format: json",
        ),
        (
            "{ url: https://r.test/x, format: json, json_path: \"$[\" }",
            "not a JSONPath",
        ),
        ("{ url: https://r.test/x, refresh: 0s }", "from 1s to 7d"),
        ("{ url: https://r.test/x, timeout: 1h }", "from 1s to 10m"),
        ("{ url: https://r.test/x, max_entries: 0 }", "max_entries"),
        ("{ url: https://r.test/x, max_bytes: 2GiB }", "max_bytes"),
        ("{ url: https://r.test/x, max_shrink: 150% }", "max_shrink"),
        ("{ url: https://r.test/x, sha256: abc }", "64 hex digits"),
        (
            "{ file: x.txt, url: https://r.test/x }",
            "both `file:` and `url:`",
        ),
        ("{ file: x.txt, refresh: 1h }", "belong to a `url:` feed"),
        ("{ refresh: 1h }", "needs `file: PATH` or `url:"),
        ("{ url: https://r.test/x, proxy: y }", "proxy"),
    ] {
        let text = format!("version: 1\ngroups:\n  f: {group}\nallow: [f]\n");
        let errs = policy::parse_str("policy.yaml", &text).expect_err(group);
        let all = errs.to_string();
        assert!(all.contains(want), "{group}: {all}");
        assert!(
            errs.errors.iter().all(|e| e.line() == Some(3)),
            "{group}: {all}"
        );
    }
}
