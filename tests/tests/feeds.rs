//! URL feeds in a policy, fetched by the real daemon from a real HTTPS
//! server (rustls, a CA of the test's own) in the test's own namespace: a
//! changed feed moves the allowed source, a 304 rewrites nothing, a feed
//! that shrinks by 90% is held, a malformed line is refused by its number,
//! a restart without the server enforces the kept copy, and each kind of
//! bad feed is one clear line in the log and in `status`.

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use ipguard_tests::{
    https_server::{HttpsServer, TestCa},
    *,
};

/// A directory of the test's own, removed when dropped.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(prefix: &str) -> Self {
        let d = scratch_dir(prefix);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn feed_status(d: &Daemon, group: &str) -> Option<serde_json::Value> {
    let st = d.status().ok()?;
    st["feeds"]
        .as_array()?
        .iter()
        .find(|f| f["group"] == group)
        .cloned()
}

/// `n` addresses of 203.0.113.100 on, one per line, `with` among them.
fn lines(n: u8, with: Option<&str>) -> String {
    let mut s = String::from("# the provider's ranges\n");
    if let Some(w) = with {
        s.push_str(&format!("{w}\n"));
    }
    for i in 0..n - u8::from(with.is_some()) {
        s.push_str(&format!("203.0.113.{}\n", 100 + i));
    }
    s
}

fn within() -> Duration {
    Duration::from_secs(20)
}

#[test]
fn a_feed_is_followed_held_and_outlives_its_server() {
    require_root();
    let pair = Pair::new().unwrap();
    // The server's namespace fetches from itself on its loopback: feed
    // traffic never crosses the filtered link.
    pair.server.ip(&["link", "set", "lo", "up"]).unwrap();
    let ca = TestCa::new("ipguard test CA").unwrap();
    let dir = Dir::new("feeds-");
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let server = HttpsServer::new(&pair.server, addr, &ca).unwrap();
    server.set(
        "/ranges.txt",
        lines(20, Some(CLIENT_V4_ALT)).as_bytes(),
        true,
    );
    let policy = format!(
        "version: 1\ngroups:\n  provider: {{ url: \"{}\", refresh: 1s }}\nallow:\n  - 198.51.100.2\n  - {{ from: provider, label: Provider }}\n",
        server.url("/ranges.txt")
    );
    let port = 21_000 + (std::process::id() % 1000) as u16;
    let maddr = format!("127.0.0.1:{port}");
    let args = ["--metrics", maddr.as_str()];
    // A proxy of the host's environment must not see the test's fetches.
    let env = [
        ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
        ("NO_PROXY", "*"),
    ];
    let mut d = Daemon::start_with_env(&pair, &policy, &args, &env).unwrap();
    let echo = UdpEcho::new(&pair.server, format!("{SERVER_V4}:9999").parse().unwrap()).unwrap();

    // The first copy: the client's other address is in it.
    let f = wait_for(within(), || {
        feed_status(&d, "provider").filter(|f| f["items"] == 20)
    })
    .unwrap_or_else(|| panic!("fetched: {}", d.log()));
    assert!(
        f["changed_at"].is_string() && f["next_fetch"].is_string(),
        "{f}"
    );
    assert!(echo.ask(&pair.client, CLIENT_V4_ALT), "allowed by the feed");
    // `explain --daemon` judges with the copy and names it.
    let out = d
        .client(&["explain", "--daemon", CLIENT_V4_ALT, "--json"])
        .output()
        .unwrap();
    let x: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(x["verdict"], "pass", "{x}");
    assert_eq!(x["label"], "Provider", "{x}");
    assert_eq!(x["feeds"][0]["group"], "provider", "{x}");
    assert_eq!(x["feeds"][0]["items"], 20, "{x}");
    let out = d
        .client(&["explain", "--daemon", CLIENT_V4_ALT])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("feed provider https://127.0.0.1:8443/ranges.txt (20 entries, copy of"),
        "{text}"
    );

    // Unchanged, the server answers 304: nothing is written again.
    let generation = d.generation();
    let before = server.not_modified.load(Ordering::Relaxed);
    wait_for(within(), || {
        (server.not_modified.load(Ordering::Relaxed) >= before + 2).then_some(())
    })
    .expect("conditional requests answered 304");
    assert_eq!(d.generation(), generation, "a 304 rewrote the slot");

    // The feed drops the address: refused within a refresh or two.
    server.set("/ranges.txt", lines(19, None).as_bytes(), true);
    wait_for(within(), || {
        (!echo.ask(&pair.client, CLIENT_V4_ALT)).then_some(())
    })
    .expect("the changed feed applied");
    assert!(d.generation() > generation);
    // And brings it back.
    server.set(
        "/ranges.txt",
        lines(20, Some(CLIENT_V4_ALT)).as_bytes(),
        true,
    );
    wait_for(within(), || {
        echo.ask(&pair.client, CLIENT_V4_ALT).then_some(())
    })
    .expect("allowed again");

    // A copy of 2 entries, 90% fewer: held, the copy in force stays.
    server.set("/ranges.txt", lines(2, None).as_bytes(), true);
    let f = wait_for(within(), || {
        feed_status(&d, "provider").filter(|f| f["held"] == true)
    })
    .expect("the shrunk copy held");
    assert_eq!(f["items"], 20, "{f}");
    assert!(
        f["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("held") && e.contains("2 entries")),
        "{f}"
    );
    assert!(echo.ask(&pair.client, CLIENT_V4_ALT), "the copy in force");
    let text = d.client(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("feed:       provider https://127.0.0.1:8443/ranges.txt (20 entries")
            && text.contains("held"),
        "{text}"
    );

    // A malformed line: refused by its number, nothing applied.
    let generation = d.generation();
    let mut bad = lines(20, Some(CLIENT_V4_ALT));
    bad.push_str("203.0.113.300\n");
    let bad_line = bad.lines().count();
    server.set("/ranges.txt", bad.as_bytes(), true);
    let want = format!("line {bad_line}: ");
    let f = wait_for(within(), || {
        feed_status(&d, "provider")
            .filter(|f| f["last_error"].as_str().is_some_and(|e| e.contains(&want)))
    })
    .unwrap_or_else(|| panic!("the bad line reported: {}", d.log()));
    assert!(
        f["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("203.0.113.300")),
        "{f}"
    );
    assert_eq!(f["held"], false, "{f}");
    assert_eq!(d.generation(), generation, "a malformed feed was applied");
    assert!(echo.ask(&pair.client, CLIENT_V4_ALT));
    assert!(d.log().contains(&want), "{}", d.log());

    let m = get_metrics(&pair, maddr.parse().unwrap()).unwrap_or_default();
    for want in [
        r#"ipguard_feed_entries{feed="provider"} 20"#,
        r#"ipguard_feed_fetches_total{feed="provider",result="changed"}"#,
        r#"ipguard_feed_fetches_total{feed="provider",result="not_modified"}"#,
        r#"ipguard_feed_fetches_total{feed="provider",result="held"}"#,
        r#"ipguard_feed_fetches_total{feed="provider",result="failure"}"#,
        r#"ipguard_feed_success_timestamp_seconds{feed="provider"}"#,
        r#"ipguard_feed_failure_timestamp_seconds{feed="provider"}"#,
        r#"ipguard_feed_next_fetch_timestamp_seconds{feed="provider"}"#,
    ] {
        assert!(m.contains(want), "{want} not in\n{m}");
    }

    // A restart with no server at all enforces the kept copy at once.
    drop(server);
    d.proc
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    d.restart_with(&pair, &args).unwrap();
    let f = feed_status(&d, "provider").unwrap();
    assert_eq!(f["items"], 20, "{f}");
    assert!(echo.ask(&pair.client, CLIENT_V4_ALT), "the kept copy");
    let f = wait_for(within(), || {
        feed_status(&d, "provider").filter(|f| f["last_error"].is_string())
    })
    .expect("the failing fetch reported");
    assert_eq!(f["items"], 20, "{f}");
    assert!(echo.ask(&pair.client, CLIENT_V4_ALT));
}

#[test]
fn each_bad_feed_is_one_clear_line_and_costs_nothing() {
    require_root();
    let pair = Pair::new().unwrap();
    pair.server.ip(&["link", "set", "lo", "up"]).unwrap();
    let ca = TestCa::new("ipguard test CA").unwrap();
    let rogue = TestCa::new("someone else's CA").unwrap();
    let dir = Dir::new("feeds-bad-");
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let server = HttpsServer::new(&pair.server, "127.0.0.1:8443".parse().unwrap(), &ca).unwrap();
    let untrusted =
        HttpsServer::new(&pair.server, "127.0.0.1:8444".parse().unwrap(), &rogue).unwrap();
    untrusted.set("/tls.txt", b"203.0.113.40\n", false);
    // Good first copies, each with one address of its own.
    server.set("/many.txt", format!("{CLIENT_V4_ALT}\n").as_bytes(), true);
    server.set("/big.txt", b"203.0.113.42\n", true);
    server.set("/unsized.txt", b"203.0.113.43\n", true);
    server.set(
        "/shape.json",
        br#"{"prefixes":[{"ip_prefix":"203.0.113.44/32"}]}"#,
        true,
    );
    let policy = format!(
        r#"version: 1
groups:
  many: {{ url: "{}", refresh: 1s, max_entries: 5 }}
  big: {{ url: "{}", refresh: 1s, max_bytes: 64 }}
  unsized: {{ url: "{}", refresh: 1s, max_bytes: 64 }}
  shape: {{ url: "{}", refresh: 1s, format: json, json_path: "$.prefixes[*].ip_prefix" }}
  tls: {{ url: "{}", refresh: 1s }}
allow: [198.51.100.2, many, big, unsized, shape, tls]
"#,
        server.url("/many.txt"),
        server.url("/big.txt"),
        server.url("/unsized.txt"),
        server.url("/shape.json"),
        untrusted.url("/tls.txt"),
    );
    // A proxy of the host's environment must not see the test's fetches.
    let env = [
        ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
        ("NO_PROXY", "*"),
    ];
    let d = Daemon::start_with_env(&pair, &policy, &[], &env).unwrap();
    for g in ["many", "big", "unsized", "shape"] {
        wait_for(within(), || feed_status(&d, g).filter(|f| f["items"] == 1))
            .unwrap_or_else(|| panic!("{g} fetched: {}", d.log()));
    }
    let generation = d.generation();

    // Now each goes wrong in its own way.
    let six: String = (50..56).map(|i| format!("203.0.113.{i}\n")).collect();
    server.set("/many.txt", six.as_bytes(), true);
    let long: String = (60..70).map(|i| format!("203.0.113.{i}\n")).collect();
    server.set("/big.txt", long.as_bytes(), true);
    server.set_unsized("/unsized.txt", long.as_bytes());
    server.set(
        "/shape.json",
        br#"{"ipv4_cidrs":["203.0.113.45/32"]}"#,
        true,
    );
    for (g, want) in [
        ("many", "more than max_entries 5"),
        ("big", "bytes, over max_bytes 64"),
        ("unsized", "the body is over max_bytes 64"),
        ("shape", "json_path $.prefixes[*].ip_prefix matches nothing"),
        ("tls", "certificate"),
    ] {
        let f = wait_for(within(), || {
            feed_status(&d, g)
                .filter(|f| f["last_error"].as_str().is_some_and(|e| e.contains(want)))
        })
        .unwrap_or_else(|| {
            panic!(
                "{g}: {want:?} in status: {:?}\n{}",
                feed_status(&d, g),
                d.log()
            )
        });
        let expect = if g == "tls" { 0 } else { 1 };
        assert_eq!(f["items"], expect, "{g}: the copy in force stays: {f}");
        assert!(
            d.log()
                .lines()
                .any(|l| l.contains(&format!("feed {g} (")) && l.contains(want)),
            "{g}: one line in the log naming it: {}",
            d.log()
        );
    }
    assert_eq!(d.generation(), generation, "nothing was applied");
    let echo = UdpEcho::new(&pair.server, format!("{SERVER_V4}:9999").parse().unwrap()).unwrap();
    assert!(echo.ask(&pair.client, CLIENT_V4), "the literal entry");
    assert!(
        echo.ask(&pair.client, CLIENT_V4_ALT),
        "many's copy in force"
    );
}
