//! `dns:` names in a policy, resolved by the real daemon against a real DNS
//! server (UDP and TCP) in the test's own namespace: an answer that
//! changes moves the allowed source, a failing server keeps the last
//! answer, and a restart without any server enforces the saved one.

use std::{net::SocketAddr, time::Duration};

use ipguard_tests::{dns_server::DnsServer, *};

/// A directory of the test's own, removed when dropped.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// TTLs of 1 s, re-resolved at most every 2 s: the test waits seconds.
const POLICY: &str = "version: 1
dns: { min_ttl: 1s, max_ttl: 2s }
allow:
  - 198.51.100.2
  - { from: dns:office.test, label: Office }
  - dns4:big.test
  - dns:missing.test
";

/// The status entry of `name`.
fn name_status(d: &Daemon, name: &str) -> Option<serde_json::Value> {
    let st = d.status().ok()?;
    st["dns"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
}

fn addresses(d: &Daemon, name: &str) -> Vec<String> {
    name_status(d, name)
        .and_then(|n| {
            n["addresses"].as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[test]
fn names_follow_their_answers_and_outlive_the_server() {
    require_root();
    let pair = Pair::new().unwrap();
    // The server's namespace answers itself on its loopback: DNS traffic
    // never crosses the filtered link.
    pair.server.ip(&["link", "set", "lo", "up"]).unwrap();
    let dns_addr: SocketAddr = "127.0.0.1:53".parse().unwrap();
    let server = DnsServer::new(&pair.server, dns_addr, 1).unwrap();
    server.set("office.test", &["203.0.113.50", "2001:db8:1::50"]);
    server.set("big.test", &["203.0.113.60", "203.0.113.61"]);
    server.tcp_only("big.test");
    let dir = Dir(scratch_dir("dns-"));
    std::fs::create_dir_all(&dir.0).unwrap();
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .unwrap();
    let resolv = resolv.to_str().unwrap().to_string();
    let port = 20_000 + (std::process::id() % 1000) as u16;
    let maddr = format!("127.0.0.1:{port}");
    let args = [
        "--resolv-conf",
        resolv.as_str(),
        "--metrics",
        maddr.as_str(),
    ];
    let mut d = Daemon::start_with(&pair, POLICY, &args).unwrap();
    let echo = UdpEcho::new(&pair.server, format!("{SERVER_V4}:9999").parse().unwrap()).unwrap();
    let within = Duration::from_secs(15);

    // First answers: the client's other address is not among them.
    wait_for(within, || {
        (addresses(&d, "office.test").len() == 2).then_some(())
    })
    .expect("office.test resolved");
    assert_eq!(
        addresses(&d, "office.test"),
        ["203.0.113.50", "2001:db8:1::50"]
    );
    assert!(echo.ask(&pair.client, CLIENT_V4), "the literal entry");
    assert!(!echo.ask(&pair.client, CLIENT_V4_ALT), "not in any answer");
    // big.test is answered over TCP only, and dns4: takes its A records.
    wait_for(within, || {
        (addresses(&d, "big.test").len() == 2).then_some(())
    })
    .expect("big.test resolved over TCP");
    assert!(
        server
            .tcp_queries
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // A name nobody answers for: an empty set, its failure said, and the
    // rest of the policy in force.
    let missing = wait_for(within, || {
        name_status(&d, "missing.test").filter(|n| n["last_error"].is_string())
    })
    .expect("the failure of missing.test reported");
    assert!(missing["resolved_at"].is_null(), "{missing}");
    assert_eq!(missing["addresses"], serde_json::json!([]), "{missing}");
    assert!(
        d.log().contains("dns:missing.test: no answer yet"),
        "{}",
        d.log()
    );

    // The answer changes: the allowed source moves within a TTL or two.
    server.set("office.test", &[CLIENT_V4_ALT]);
    wait_for(within, || {
        echo.ask(&pair.client, CLIENT_V4_ALT).then_some(())
    })
    .expect("the new address allowed");
    assert_eq!(addresses(&d, "office.test"), [CLIENT_V4_ALT]);
    // `explain --daemon` judges with the answer in force and shows it.
    let out = d
        .client(&["explain", "--daemon", CLIENT_V4_ALT])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pass") && text.contains("dns name office.test -> [203.0.113.9] (resolved "),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = name_status(&d, "office.test").unwrap();
    assert!(
        n["resolved_at"].is_string() && n["next_lookup"].is_string(),
        "{n}"
    );

    // `check --resolve` asks the same server once; plain `check` does not.
    let check = |extra: &[&str]| -> serde_json::Value {
        let out = pair
            .server
            .command(ipguard_bin())
            .arg("check")
            .arg(&d.policy)
            .arg("--json")
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let c = check(&["--resolve", "--resolv-conf", resolv.as_str()]);
    let by_name = |c: &serde_json::Value, n: &str| {
        c["dns"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == n).cloned())
            .unwrap_or_default()
    };
    assert_eq!(
        by_name(&c, "dns:office.test")["addresses"],
        serde_json::json!([CLIENT_V4_ALT]),
        "{c}"
    );
    assert_eq!(
        by_name(&c, "dns4:big.test")["addresses"],
        serde_json::json!(["203.0.113.60", "203.0.113.61"]),
        "{c}"
    );
    assert!(by_name(&c, "dns:missing.test")["error"].is_string(), "{c}");
    // The literal entry, office.test and big.test's two.
    assert_eq!(c["prefixes"]["ipv4"], 4, "{c}");
    let c = check(&[]);
    assert_eq!(by_name(&c, "dns:office.test")["resolved"], false, "{c}");
    assert_eq!(c["prefixes"]["ipv4"], 1, "{c}");

    // The server fails: the failure is reported, the last answer stays.
    server.failing(true);
    wait_for(within, || {
        name_status(&d, "office.test").and_then(|n| n["last_error"].as_str().map(str::to_string))
    })
    .expect("the failure reported");
    assert_eq!(addresses(&d, "office.test"), [CLIENT_V4_ALT]);
    assert!(
        echo.ask(&pair.client, CLIENT_V4_ALT),
        "the last answer holds"
    );
    let text = d.client(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("dns name:   office.test -> [203.0.113.9]") && text.contains("failing since"),
        "{text}"
    );
    let m = get_metrics(&pair, maddr.parse().unwrap()).unwrap_or_default();
    for want in [
        r#"ipguard_dns_addresses{name="office.test"} 1"#,
        r#"ipguard_dns_addresses{name="big.test"} 2"#,
        r#"ipguard_dns_lookups_total{name="office.test",result="failure"}"#,
        r#"ipguard_dns_lookups_total{name="office.test",result="success"}"#,
        r#"ipguard_dns_resolved_timestamp_seconds{name="office.test"}"#,
        r#"ipguard_dns_failure_timestamp_seconds{name="office.test"}"#,
        r#"ipguard_dns_next_lookup_timestamp_seconds{name="office.test"}"#,
    ] {
        assert!(m.contains(want), "{want} not in\n{m}");
    }

    // A restart with no server at all enforces the saved answers.
    drop(server);
    d.proc
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    d.restart_with(&pair, &args).unwrap();
    assert_eq!(addresses(&d, "office.test"), [CLIENT_V4_ALT]);
    assert!(
        echo.ask(&pair.client, CLIENT_V4_ALT),
        "saved answer enforced"
    );
    let n = name_status(&d, "office.test").unwrap();
    assert!(n["resolved_at"].is_string(), "{n}");
}

/// A host without a resolver configuration (a container may have none)
/// hears about it only once its policy names a host, then in one line of
/// the log and in each name's status.
#[test]
fn the_resolver_configuration_is_read_only_for_names() {
    require_root();
    let pair = Pair::new().unwrap();
    let d = Daemon::start_with(
        &pair,
        "version: 1\nallow: [198.51.100.2]\n",
        &["--resolv-conf", "/nonexistent/resolv.conf"],
    )
    .unwrap();
    assert!(!d.log().contains("resolv.conf"), "{}", d.log());
    let before = d.generation();
    std::fs::write(
        &d.policy,
        "version: 1\nallow: [198.51.100.2, dns:office.test]\n",
    )
    .unwrap();
    wait_for(Duration::from_secs(15), || {
        (d.generation() > before).then_some(())
    })
    .expect("the policy with a name applied");
    let n = wait_for(Duration::from_secs(15), || {
        name_status(&d, "office.test").filter(|n| n["last_error"].is_string())
    })
    .expect("the failure reported");
    assert!(
        n["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot read /nonexistent/resolv.conf")),
        "{n}"
    );
    let log = d.log();
    assert_eq!(
        log.matches("DNS names cannot be resolved").count(),
        1,
        "{log}"
    );
}
