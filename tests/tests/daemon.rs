//! The daemon and the operator commands, with real traffic in the netns
//! harness.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    process::Output,
    thread,
    time::{Duration, Instant},
};

use ipguard_tests::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// The client's main addresses are allowed; its alternates are not. A
/// service `app` on udp/5000 has its own list (the main IPv4 address only),
/// so its passed/refused counters count exactly the datagrams sent.
const POLICY: &str = r#"
version: 1
allow:
  - from: 198.51.100.2
    label: client
  - from: "2001:db8:1::2"
    label: client v6
services:
  app: { ports: [udp/5000], allow: [198.51.100.2] }
  ssh: { ports: [tcp/22] }
"#;

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the alternative client gets through to the alternative server
/// within `limit` (a reload taking effect).
fn alt_connects_within(pair: &Pair, limit: Duration) -> bool {
    wait_for(limit, || {
        connects(pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000).then_some(())
    })
    .is_some()
}

fn setup() -> (Pair, Daemon) {
    require_root();
    let pair = Pair::new().unwrap();
    for a in [SERVER_V4, SERVER_V4_ALT, SERVER_V6] {
        tcp_listener(&pair.server, SocketAddr::new(a.parse().unwrap(), 7000)).unwrap();
    }
    let d = Daemon::start(&pair, POLICY).unwrap();
    (pair, d)
}

/// Whether the client's alternate address is refused at the latest
/// `within` from now (an expiry that the datapath applies on its own).
fn refused_within(pair: &Pair, within: Duration) -> bool {
    wait_for(within, || {
        (!connects(pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000)).then_some(())
    })
    .is_some()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn status_counts_the_traffic_sent() {
    let (pair, d) = setup();
    let counter = UdpCounter::new(
        &pair.server,
        SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 5000),
    )
    .unwrap();
    udp_send(&pair.client, CLIENT_V4.parse().unwrap(), counter.addr, 37).unwrap();
    udp_send(
        &pair.client,
        CLIENT_V4_ALT.parse().unwrap(),
        counter.addr,
        23,
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || (counter.count(CLIENT_V4) == 37)
            .then_some(()))
        .is_some()
    );
    let st = d.status().unwrap();
    assert_eq!(n(&st["services"]["app"]["passed"]), 37, "{st}");
    assert_eq!(n(&st["services"]["app"]["refused"]), 23, "{st}");
    assert_eq!(counter.count(CLIENT_V4_ALT), 0);
    assert!(n(&st["counters"]["dropped"]) >= 23);
    assert!(n(&st["counters"]["passed"]) >= 37);
    assert_eq!(st["attached"][0]["iface"], pair.server_if.as_str());
    assert!(st["attached"][0]["mode"].is_string());
    assert_eq!(st["policy"]["path"], d.policy.display().to_string());
    assert_eq!(st["policy"]["sha256"].as_str().unwrap().len(), 64);
    assert!(st["policy"]["applied_at"].as_str().unwrap().contains('T'));
    assert!(st["counters"]["would_drop"].is_number());
    // The refused source, as the relayed events name it.
    let blocked = wait_for(Duration::from_secs(5), || {
        let st = d.status().ok()?;
        st["top_blocked"]
            .as_array()?
            .iter()
            .find(|b| b["src"] == CLIENT_V4_ALT)
            .cloned()
    })
    .expect("the refused source in top_blocked");
    assert_eq!(blocked["service"], "app", "{blocked}");
    assert!(n(&blocked["count"]) >= 1, "{blocked}");
    for k in ["first_seen", "last_seen"] {
        assert!(blocked[k].as_str().unwrap().contains('T'), "{blocked}");
    }
}

#[test]
fn events_report_refusals_with_the_suppressed_count() {
    let (pair, d) = setup();
    let dst = SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 5000);
    // The default limit is one event per source per second: the first
    // datagram is reported, the next 19 are suppressed and counted in the
    // event that follows a second later.
    udp_send(&pair.client, CLIENT_V4_ALT.parse().unwrap(), dst, 20).unwrap();
    thread::sleep(Duration::from_millis(1200));
    udp_send(&pair.client, CLIENT_V4_ALT.parse().unwrap(), dst, 1).unwrap();
    let events = wait_for(Duration::from_secs(5), || {
        let out = d.client(&["events", "--json"]).output().ok()?;
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|e: &Value| e["src"] == CLIENT_V4_ALT)
            .collect();
        (lines.len() >= 2).then_some(lines)
    })
    .expect("two events for the refused source");
    assert_eq!(events[0]["service"], "app");
    assert_eq!(events[0]["dport"], 5000);
    assert_eq!(events[0]["protocol"], "udp");
    assert_eq!(events[0]["verdict"], "drop");
    assert_eq!(events[0]["iface"], pair.server_if.as_str());
    assert_eq!(n(&events[0]["suppressed"]), 0);
    assert_eq!(n(&events[1]["suppressed"]), 19, "{events:?}");
    let blocked: Value =
        serde_json::from_str(&ok(d.client(&["blocked", "--json"]).output().unwrap())).unwrap();
    assert_eq!(blocked[0]["src"], CLIENT_V4_ALT);
    assert_eq!(n(&blocked[0]["count"]), 21);
    let st = d.status().unwrap();
    assert_eq!(st["top_blocked"][0]["src"], CLIENT_V4_ALT);
}

#[test]
fn runtime_allow_lets_a_source_in_until_it_expires() {
    let (pair, d) = setup();
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    ok(d.client(&[
        "allow",
        CLIENT_V4_ALT,
        "--for",
        "3s",
        "--label",
        "ticket 42",
    ])
    .output()
    .unwrap());
    let granted = Instant::now();
    assert!(
        connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "allowed at runtime"
    );
    let st = d.status().unwrap();
    assert_eq!(n(&st["runtime_entries"]), 1);
    // The grant's deadline record, in the kernel (no other entry holds
    // the source, so no value follows it).
    assert_eq!(n(&st["memory"]["deadline_leaves"]), 1, "{st}");
    let wait = Duration::from_millis(3500).saturating_sub(granted.elapsed());
    thread::sleep(wait);
    assert!(
        refused_within(&pair, Duration::from_secs(3)),
        "refused again after the expiry"
    );
    let st = d.status().unwrap();
    assert_eq!(n(&st["runtime_entries"]), 0);
    assert_eq!(n(&st["memory"]["deadline_leaves"]), 0, "{st}");
    // revoke of an address without a runtime entry: refused input.
    let out = d.client(&["revoke", CLIENT_V4_ALT]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn runtime_deny_wins_over_allow_entries_and_undeny_lifts_it() {
    let (pair, d) = setup();
    assert!(
        connects(&pair, CLIENT_V4, SERVER_V4, 7000),
        "allowed by the file"
    );
    ok(d.client(&["deny", CLIENT_V4, "--label", "lost laptop"])
        .output()
        .unwrap());
    assert!(
        !connects(&pair, CLIENT_V4, SERVER_V4, 7000),
        "a runtime deny wins over the file's allow"
    );
    // An allow of the same source at runtime does not lift it either.
    ok(d.client(&["allow", CLIENT_V4]).output().unwrap());
    assert!(!connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    assert_eq!(n(&d.status().unwrap()["runtime_entries"]), 2);
    // revoke removes the allow only; undeny the deny.
    ok(d.client(&["revoke", CLIENT_V4]).output().unwrap());
    assert!(!connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    ok(d.client(&["undeny", CLIENT_V4]).output().unwrap());
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000), "undenied");
    let out = d.client(&["undeny", CLIENT_V4]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "nothing left to undeny");

    // In bulk from standard input: one swap for all, and one bad line
    // refuses them all, naming the line.
    let deny_stdin = |text: &str| {
        let mut c = d.client(&["deny", "--stdin"]);
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let before = d.generation();
    let out =
        deny_stdin("# bans\n203.0.113.200 1h sshd\n198.51.100.2 - web scan\n\n2001:db8:9::/48\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("denied 3 sources in one swap"));
    assert_eq!(d.generation(), before + 1, "one policy write for the batch");
    assert!(!connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    let out = deny_stdin("203.0.113.201\nnot-an-address 1h\n203.0.113.202 5y\n");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2:") && err.contains("line 3:"), "{err}");
    assert_eq!(d.generation(), before + 1, "nothing denied");
}

/// The seeds' access requests: a refused source is pending until it is
/// approved (a runtime allow) or rejected (kept across restarts).
#[test]
fn access_requests_are_pending_approved_or_rejected() {
    let (pair, mut d) = setup();
    let status_of = |d: &Daemon, src: &str| -> Option<String> {
        let v: Value =
            serde_json::from_str(&ok(d.client(&["blocked", "--json"]).output().unwrap())).unwrap();
        v.as_array()?
            .iter()
            .find(|b| b["src"] == src)
            .map(|b| b["status"].as_str().unwrap_or_default().to_string())
    };
    let seen_as = |d: &Daemon, src: &str, want: &str| {
        wait_for(Duration::from_secs(5), || {
            (status_of(d, src).as_deref() == Some(want)).then_some(())
        })
        .is_some()
    };
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    assert!(seen_as(&d, CLIENT_V4_ALT, "pending"));
    let text = ok(d.client(&["blocked"]).output().unwrap());
    assert!(
        text.contains("pending") && text.contains("ipguard reject"),
        "{text}"
    );
    ok(d.client(&["reject", CLIENT_V4_ALT, "--label", "unknown"])
        .output()
        .unwrap());
    assert!(seen_as(&d, CLIENT_V4_ALT, "rejected"));
    assert!(
        !connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "a rejection alone changes no verdict"
    );

    // Kept across a restart: refused again, it is shown rejected.
    d.proc.signal_and_wait(Signal::SIGTERM).unwrap();
    d.restart(&pair).unwrap();
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    assert!(seen_as(&d, CLIENT_V4_ALT, "rejected"));

    // Approved after all: the allow takes the rejection back.
    ok(d.client(&["allow", CLIENT_V4_ALT]).output().unwrap());
    assert!(connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    assert!(seen_as(&d, CLIENT_V4_ALT, "approved"));
    let kept = std::fs::read_to_string(d.dir.join("state/rejected.json")).unwrap();
    assert!(!kept.contains(CLIENT_V4_ALT), "{kept}");

    // reject --deny refuses the source too.
    ok(d.client(&["reject", CLIENT_V4, "--deny", "--for", "1h"])
        .output()
        .unwrap());
    assert!(!connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    assert!(seen_as(&d, CLIENT_V4, "rejected"));
    let out = d
        .client(&["reject", CLIENT_V4, "--for", "1h"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--for needs --deny");
}

/// The fail2ban action file and the CrowdSec bouncer script of packaging/,
/// their commands run as fail2ban and the bouncer run them.
#[test]
fn fail2ban_and_crowdsec_ban_and_unban_through_the_daemon() {
    let (pair, d) = setup();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = ipguard_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sh = |cmd: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("PATH", &path)
            .env("IPGUARD_SOCKET", d.socket())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let action = std::fs::read_to_string(root.join("packaging/fail2ban/ipguard.conf")).unwrap();
    let tag = |key: &str| {
        action
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim_start_matches([' ', '=']).trim().to_string())
            .unwrap_or_else(|| panic!("{key} in the action file"))
    };
    let fill = |cmd: &str, bantime: &str| {
        cmd.replace("<ip>", CLIENT_V4)
            .replace("<bantime>", bantime)
            .replace("<name>", "sshd")
    };
    let (ban, unban) = (tag("actionban"), tag("actionunban"));
    sh(&fill(&ban, "600"));
    assert!(!connects(&pair, CLIENT_V4, SERVER_V4, 7000), "banned");
    let st = d.status().unwrap();
    assert_eq!(n(&st["runtime_entries"]), 1);
    // The ban ends in the kernel: its deadline record, and the value after
    // it (the file's allow of the source).
    assert_eq!(n(&st["memory"]["deadline_leaves"]), 2, "{st}");
    sh(&fill(&unban, "600"));
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000), "unbanned");
    // A permanent ban (bantime -1) has no end; unbanning twice is fine.
    sh(&fill(&ban, "-1"));
    assert!(!connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    assert_eq!(n(&d.status().unwrap()["memory"]["deadline_leaves"]), 0);
    sh(&fill(&unban, "-1"));
    sh(&fill(&unban, "-1"));
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000));

    let bouncer = root.join("packaging/crowdsec/crowdsec-ipguard");
    let b = bouncer.display();
    sh(&format!(
        "sh {b} add {CLIENT_V4} 3600 crowdsecurity/ssh-bf '{{}}'"
    ));
    assert!(
        !connects(&pair, CLIENT_V4, SERVER_V4, 7000),
        "banned by CrowdSec"
    );
    sh(&format!(
        "sh {b} del {CLIENT_V4} 3600 crowdsecurity/ssh-bf '{{}}'"
    ));
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000));
}

/// A time-boxed grant ends in the kernel: with the daemon frozen (SIGSTOP,
/// as a hung daemon is) a 3 s grant is honoured, then refused after its
/// deadline; the daemon, resumed, agrees that it ended.
#[test]
fn a_grant_ends_on_time_with_the_daemon_stopped() {
    let (pair, d) = setup();
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    ok(d.client(&["allow", CLIENT_V4_ALT, "--for", "3s"])
        .output()
        .unwrap());
    let granted = Instant::now();
    let pid = nix::unistd::Pid::from_raw(d.proc.pid() as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    let before = granted.elapsed();
    let honoured = connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000);
    let checked = granted.elapsed();
    assert!(
        checked < Duration::from_secs(3),
        "the grant could not be checked before its deadline ({before:?} to {checked:?} after it)"
    );
    assert!(honoured, "the grant is honoured with the daemon stopped");
    thread::sleep(Duration::from_millis(3000).saturating_sub(granted.elapsed()));
    assert!(
        refused_within(&pair, Duration::from_secs(3)),
        "refused after the deadline, with the daemon still stopped"
    );
    let refused_at = granted.elapsed();
    assert!(
        refused_at < Duration::from_millis(6500),
        "refused {refused_at:?} after a 3 s grant"
    );
    assert!(
        connects(&pair, CLIENT_V4, SERVER_V4, 7000),
        "the policy holds"
    );
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || (d
            .status()
            .is_ok_and(|s| s["runtime_entries"] == 0))
        .then_some(()))
        .is_some(),
        "the resumed daemon drops the ended grant"
    );
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
}

#[test]
fn apply_with_confirm_rolls_back_by_itself() {
    let (pair, d) = setup();
    let wider = POLICY.replace("label: client\n", "label: client\n  - 203.0.113.0/24\n");
    let file = d.dir.join("wider.yaml");
    std::fs::write(&file, wider).unwrap();
    ok(
        d.client(&["apply", file.to_str().unwrap(), "--confirm", "2"])
            .output()
            .unwrap(),
    );
    assert!(
        connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "the applied policy is live"
    );
    thread::sleep(Duration::from_millis(2500));
    assert!(
        wait_for(Duration::from_secs(3), || (!connects(
            &pair,
            CLIENT_V4_ALT,
            SERVER_V4_ALT,
            7000
        ))
        .then_some(()))
        .is_some(),
        "rolled back"
    );
    // Confirmed, it stays.
    ok(
        d.client(&["apply", file.to_str().unwrap(), "--confirm", "2"])
            .output()
            .unwrap(),
    );
    ok(d.client(&["confirm"]).output().unwrap());
    thread::sleep(Duration::from_millis(2500));
    assert!(
        connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "confirmed policy stays"
    );
    let out = d.client(&["confirm"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "nothing left to confirm");
}

/// A large policy is read and checked off the daemon's event loop:
/// `status` answers (with the policy still in force) while it is read.
#[test]
fn status_answers_while_a_large_policy_is_read() {
    let (pair, d) = setup();
    let before = d.generation();
    // A group of items naming 256 addresses over and over (a group keeps
    // each once), well within the default capacity: seconds to read and
    // check. The daemon is built as this test is; in a release build
    // 600,000 items were read before the first question.
    let items: u32 = if cfg!(debug_assertions) {
        600_000
    } else {
        6_000_000
    };
    let mut group = String::with_capacity(items as usize * 18);
    for i in 0..items {
        group.push_str(&format!("    - 10.0.0.{}\n", i & 255));
    }
    let big = POLICY.replacen(
        "allow:\n",
        &format!("groups:\n  many:\n{group}allow:\n  - many\n"),
        1,
    );
    let written = Instant::now();
    std::fs::write(&d.policy, big).unwrap();
    // The directory event, its 200 ms to settle, and the read begun.
    thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    assert_eq!(
        d.generation(),
        before,
        "status answered while the new policy was still being read"
    );
    let answered = asked.elapsed();
    assert!(
        wait_for(Duration::from_secs(120), || (d.generation() == before + 1)
            .then_some(()))
        .is_some(),
        "the large policy goes in after"
    );
    let read = written.elapsed();
    // Relative, not a fixed time: waiting for the read would take most
    // of it.
    assert!(
        answered * 4 < read,
        "status took {answered:?} of a {read:?} reload"
    );
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000));
}

#[test]
fn an_invalid_reload_leaves_the_old_policy_enforcing() {
    let (pair, d) = setup();
    let before = d.status().unwrap()["policy"]["sha256"].clone();
    std::fs::write(&d.policy, "version: 1\nallow: [198.51.100.300]\n").unwrap();
    thread::sleep(Duration::from_millis(800));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.proc.pid() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    thread::sleep(Duration::from_millis(500));
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    assert_eq!(d.status().unwrap()["policy"]["sha256"], before);
    // A valid edit is picked up by the watch.
    std::fs::write(
        &d.policy,
        POLICY.replace("label: client\n", "label: client\n  - 203.0.113.9\n"),
    )
    .unwrap();
    assert!(
        alt_connects_within(&pair, Duration::from_secs(5)),
        "edited file reloaded"
    );
}

#[test]
fn a_configmap_style_symlink_swap_reloads() {
    require_root();
    let pair = Pair::new().unwrap();
    tcp_listener(
        &pair.server,
        SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 7000),
    )
    .unwrap();
    // Kubernetes' layout: cfg/policy.yaml -> ..data/policy.yaml,
    // ..data -> ..v1; an update writes ..v2 and renames a new ..data over
    // the old one.
    let mut d = Daemon::start(&pair, POLICY).unwrap();
    let cfg = d.dir.join("cfg");
    std::fs::create_dir_all(cfg.join("..v1")).unwrap();
    std::fs::write(cfg.join("..v1/policy.yaml"), POLICY).unwrap();
    std::os::unix::fs::symlink("..v1", cfg.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", cfg.join("policy.yaml")).unwrap();
    d.proc.signal_and_wait(Signal::SIGTERM).unwrap();
    d.policy = cfg.join("policy.yaml");
    d.restart(&pair).unwrap();
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));

    std::fs::create_dir_all(cfg.join("..v2")).unwrap();
    std::fs::write(
        cfg.join("..v2/policy.yaml"),
        POLICY.replace("label: client\n", "label: client\n  - 203.0.113.9\n"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", cfg.join("..data_tmp")).unwrap();
    std::fs::rename(cfg.join("..data_tmp"), cfg.join("..data")).unwrap();
    assert!(
        alt_connects_within(&pair, Duration::from_secs(5)),
        "the swapped policy is enforced"
    );
}

#[test]
fn a_reload_logs_the_first_warnings_and_counts_the_rest() {
    require_root();
    let pair = Pair::new().unwrap();
    let d = Daemon::start(&pair, POLICY).unwrap();
    // 25 entries of always_allow, each covered by the first one.
    let mut p = format!("{POLICY}always_allow:\n  - 203.0.113.0/24\n");
    for i in 1..=25 {
        p.push_str(&format!("  - 203.0.113.{i}\n"));
    }
    let before = d.generation();
    std::fs::write(&d.policy, &p).unwrap();
    wait_for(Duration::from_secs(20), || {
        (d.generation() > before).then_some(())
    })
    .expect("the policy with warnings was applied");
    // Covered entries are found once the policy is in force, on a thread
    // of their own.
    let log = wait_for(Duration::from_secs(10), || {
        let log = d.log();
        log.contains("lists them all").then_some(log)
    })
    .unwrap_or_else(|| d.log());
    assert_eq!(
        log.matches("is fully covered by entry").count(),
        20,
        "{log}"
    );
    assert!(
        log.contains("5 more warnings in ") && log.contains("lists them all"),
        "{log}"
    );
}

#[test]
fn a_changed_list_file_reloads() {
    require_root();
    let pair = Pair::new().unwrap();
    tcp_listener(
        &pair.server,
        SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 7000),
    )
    .unwrap();
    // The list file in a directory of its own: its directory is watched
    // once the policy names it.
    let mut d = Daemon::start(&pair, POLICY).unwrap();
    let lists = d.dir.join("lists");
    std::fs::create_dir_all(&lists).unwrap();
    std::fs::write(lists.join("feed.txt"), "# partners\n198.51.100.77\n").unwrap();
    let with_list = POLICY.replace(
        "version: 1\n",
        "version: 1\ngroups:\n  feed: { file: lists/feed.txt }\n",
    ) + "deny: []\nalways_allow: [feed]\n";
    std::fs::write(&d.policy, &with_list).unwrap();
    d.proc.signal_and_wait(Signal::SIGTERM).unwrap();
    let maddr = format!("127.0.0.1:{}", 22_000 + (std::process::id() % 1000) as u16);
    pair.server.ip(&["link", "set", "lo", "up"]).unwrap();
    d.restart_with(&pair, &["--metrics", maddr.as_str()])
        .unwrap();
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    let sha = d.status().unwrap()["policy"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();

    // Replaced by rename, as config management writes files.
    std::fs::write(
        lists.join(".feed.tmp"),
        "198.51.100.77\n203.0.113.9  # new\n",
    )
    .unwrap();
    std::fs::rename(lists.join(".feed.tmp"), lists.join("feed.txt")).unwrap();
    assert!(
        alt_connects_within(&pair, Duration::from_secs(5)),
        "the changed list file is enforced"
    );
    let st = d.status().unwrap();
    assert_ne!(st["policy"]["sha256"].as_str().unwrap(), sha);
    assert_eq!(st["lists"][0]["prefixes"], 2, "{st}");
    assert!(
        st["lists"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("lists/feed.txt"),
        "{st}"
    );
    let m = get_metrics(&pair, maddr.parse().unwrap()).unwrap_or_default();
    let want = format!(
        "ipguard_list_file_prefixes{{file=\"{}\"}} 2",
        st["lists"][0]["file"].as_str().unwrap()
    );
    assert!(m.contains(&want), "{want} not in\n{m}");

    // A broken line: refused with its place, the running policy stays.
    std::fs::write(lists.join("feed.txt"), "203.0.113.9\n203.0.113.999\n").unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || d
            .log()
            .contains("feed.txt:2:1: error:")
            .then_some(()))
        .is_some(),
        "the error names the list file's line"
    );
    assert!(connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));

    // `apply` sends the list files it names: the client reads them, from
    // beside the applied file.
    let other = d.dir.join("other");
    std::fs::create_dir_all(other.join("lists")).unwrap();
    std::fs::write(other.join("lists/feed.txt"), "198.51.100.77\n").unwrap();
    let applied = other.join("policy.yaml");
    std::fs::write(&applied, &with_list).unwrap();
    ok(d.client(&["apply", applied.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(
        !connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "the applied policy's list file, not the daemon's, is enforced"
    );
    // A broken list file is refused on the client, with its line.
    std::fs::write(other.join("lists/feed.txt"), "198.51.100.777\n").unwrap();
    let out = d
        .client(&["apply", applied.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("feed.txt:1:1: error:"), "{err}");
}

#[test]
fn kill_9_and_restart_keep_enforcing_without_a_gap() {
    let (pair, mut d) = setup();
    let counter = UdpCounter::new(
        &pair.server,
        SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 5000),
    )
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Sockets opened in the client namespace work from any thread.
    let (a, b) = pair
        .client
        .run_in(|| {
            let a =
                std::net::UdpSocket::bind(SocketAddr::new(CLIENT_V4.parse::<IpAddr>().unwrap(), 0))
                    .unwrap();
            let b = std::net::UdpSocket::bind(SocketAddr::new(
                CLIENT_V4_ALT.parse::<IpAddr>().unwrap(),
                0,
            ))
            .unwrap();
            (a, b)
        })
        .unwrap();
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let dst = counter.addr;
        thread::spawn(move || {
            // Bounded: at most 4000 rounds of 2 ms.
            for _ in 0..4000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                a.send_to(b"a", dst).unwrap();
                b.send_to(b"b", dst).unwrap();
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    d.proc.signal_and_wait(Signal::SIGKILL).unwrap();
    thread::sleep(Duration::from_millis(500));
    d.restart(&pair).unwrap();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sender.join().unwrap();
    let total = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        total > 200,
        "traffic flowed during the restart ({total} rounds)"
    );
    assert!(
        wait_for(Duration::from_secs(3), || (counter.count(CLIENT_V4)
            == total)
            .then_some(()))
        .is_some(),
        "every allowed datagram arrived: {} of {total}",
        counter.count(CLIENT_V4)
    );
    assert_eq!(
        counter.count(CLIENT_V4_ALT),
        0,
        "no refused datagram got through"
    );
    let st = d.status().unwrap();
    assert_eq!(n(&st["services"]["app"]["passed"]), total, "{st}");
    assert_eq!(n(&st["services"]["app"]["refused"]), total, "{st}");
}

#[test]
fn the_lockout_guard_refuses_to_cut_ssh_unless_forced() {
    let (pair, d) = setup();
    // This listener keeps what it accepts: the server side of the session
    // must stay ESTABLISHED for the guard to see it.
    let ssh = SocketAddr::new(SERVER_V4.parse().unwrap(), 22);
    let listener = pair
        .server
        .run_in(move || std::net::TcpListener::bind(ssh))
        .unwrap()
        .unwrap();
    // An SSH-like session from the allowed client, held open.
    let held = pair
        .client
        .run_in(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::new(SERVER_V4.parse().unwrap(), 22),
                Duration::from_secs(2),
            )
        })
        .unwrap();
    let _held = held.expect("ssh-like session");
    let _accepted = listener.accept().expect("accept the ssh-like session");
    let cut = POLICY.replace("  - from: 198.51.100.2\n    label: client\n", "");
    let file = d.dir.join("cut.yaml");
    std::fs::write(&file, cut).unwrap();
    let out = d
        .client(&["apply", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("198.51.100.2"), "names the source: {err}");
    assert!(err.contains("lockout"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        connects(&pair, CLIENT_V4, SERVER_V4, 7000),
        "the old policy stays"
    );
    ok(d.client(&["apply", file.to_str().unwrap(), "--force"])
        .output()
        .unwrap());
    assert!(
        !connects(&pair, CLIENT_V4, SERVER_V4, 7000),
        "forced policy applied"
    );
}

#[test]
fn metrics_are_served() {
    require_root();
    let pair = Pair::new().unwrap();
    let port = 19_000 + (std::process::id() % 1000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&pair, POLICY, &["--metrics", &addr]).unwrap();
    let dst = SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 5000);
    udp_send(&pair.client, CLIENT_V4_ALT.parse().unwrap(), dst, 5).unwrap();
    let body = get_metrics(&pair, addr.parse().unwrap()).expect("an answer from /metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(r#"ipguard_service_packets_total{service="app",result="refused"} 5"#),
        "{body}"
    );
    assert!(body.contains("ipguard_policy_info{sha256=\""), "{body}");
    assert!(
        body.contains(r#"ipguard_policy_reloads_total{result="success"} 1"#),
        "{body}"
    );
    assert!(body.contains("ipguard_events_total"), "{body}");
    drop(d);
}

fn one_line(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

/// A second `ipguard run` on the interface `d` protects, with `pins` and
/// a state directory and socket of its own; it is expected to be refused.
fn another_run(pair: &Pair, d: &Daemon, pins: &std::path::Path) -> Output {
    pair.server
        .command(ipguard_bin())
        .args(["run", "--config"])
        .arg(&d.policy)
        .args(["--iface", &pair.server_if, "--pin-dir"])
        .arg(pins)
        .arg("--state-dir")
        .arg(d.dir.join("other-state"))
        .arg("--socket")
        .arg(d.dir.join("other.sock"))
        .output()
        .unwrap()
}

#[test]
fn bad_input_gets_one_clear_line() {
    let (pair, d) = setup();
    // A second daemon on the same pins.
    let out = another_run(&pair, &d, &d.pins.path);
    one_line(&out, 3, "already running");
    // An invalid policy.
    let bad = d.dir.join("bad.yaml");
    std::fs::write(&bad, "version: 1\nallow: [198.51.100.300]\n").unwrap();
    let out = d
        .client(&["apply", bad.to_str().unwrap()])
        .output()
        .unwrap();
    one_line(&out, 1, "198.51.100.300");
    let out = pair
        .server
        .command(ipguard_bin())
        .args(["run", "--iface", &pair.server_if, "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    one_line(&out, 1, "bad.yaml:2:");
    // An unreadable one.
    let out = d
        .client(&["apply", "/nonexistent/policy.yaml"])
        .output()
        .unwrap();
    one_line(&out, 1, "/nonexistent/policy.yaml");
    // No daemon behind the socket.
    let out = std::process::Command::new(ipguard_bin())
        .args(["allow", "203.0.113.9", "--socket"])
        .arg(d.dir.join("nobody.sock"))
        .output()
        .unwrap();
    one_line(&out, 3, "not running");
    // Not an address.
    let out = d.client(&["allow", "203.0.113.300"]).output().unwrap();
    one_line(&out, 1, "not an IP address");
    // A malformed request on the socket: answered, and the daemon lives on.
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    s.write_all(b"{\"cmd\":\"reboot\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let resp: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(resp["ok"], false);
    assert!(
        resp["error"]
            .as_str()
            .unwrap()
            .contains("malformed request")
    );
    assert!(d.status().is_ok(), "daemon still answers");
    // unload refuses while the daemon runs.
    let out = d.ipguard(&["unload"]).output().unwrap();
    one_line(&out, 3, "daemon is running");
}

#[test]
fn status_reads_the_pins_when_no_daemon_runs_and_unload_removes_them() {
    let (pair, mut d) = setup();
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    d.proc.signal_and_wait(Signal::SIGTERM).unwrap();
    assert!(
        !connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "still enforcing without the daemon"
    );
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    let st = d.status().unwrap();
    assert_eq!(st["daemon"], false);
    assert!(n(&st["counters"]["dropped"]) >= 1);
    assert_eq!(st["attached"][0]["iface"], pair.server_if.as_str());
    ok(d.ipguard(&["unload"]).output().unwrap());
    assert!(!d.pins.path.exists(), "pins removed");
    assert!(
        connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "protection gone after unload"
    );
}

/// The capabilities of packaging/ipguard.service's `CapabilityBoundingSet`,
/// as numbers of linux/capability.h.
fn unit_capabilities() -> Vec<u32> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/ipguard.service"
    ))
    .unwrap();
    let set = |key: &str| -> Vec<String> {
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("the unit has no {key}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    // The harness lifts RLIMIT_MEMLOCK as this line does (needed before
    // 5.11, where maps are charged to it and CAP_SYS_RESOURCE is gone).
    assert_eq!(set("LimitMEMLOCK="), ["infinity"], "the unit lifts memlock");
    let bounding = set("CapabilityBoundingSet=");
    assert_eq!(
        bounding,
        set("AmbientCapabilities="),
        "the unit grants what it bounds"
    );
    bounding
        .iter()
        .map(|name| match name.as_str() {
            "CAP_NET_ADMIN" => 12,
            "CAP_SYS_ADMIN" => 21,
            "CAP_SYS_RESOURCE" => 24,
            "CAP_PERFMON" => 38,
            "CAP_BPF" => 39,
            other => panic!("add {other} to this table"),
        })
        .collect()
}

/// The systemd unit's capability set is enough for everything the daemon
/// does: a fresh load and attach, enforcing, `apply`, and adopting the
/// pinned datapath after kill -9.
#[test]
fn the_daemon_runs_with_only_the_units_capabilities() {
    require_root();
    let pair = Pair::new().unwrap();
    for a in [SERVER_V4, SERVER_V4_ALT] {
        tcp_listener(&pair.server, SocketAddr::new(a.parse().unwrap(), 7000)).unwrap();
    }
    let caps = unit_capabilities();
    let mut d = Daemon::start_confined(&pair, POLICY, &caps).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.proc.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let want = caps.iter().fold(0u64, |m, c| m | 1 << c);
    assert_eq!(eff, want, "the daemon runs with exactly the unit's set");
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));

    let file = d.dir.join("wider.yaml");
    std::fs::write(&file, "version: 1\nallow: [198.51.100.2, 203.0.113.9]\n").unwrap();
    ok(d.client(&["apply", file.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));

    d.proc.signal_and_wait(Signal::SIGKILL).unwrap();
    d.restart(&pair).unwrap();
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    assert!(
        !connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "the restarted daemon enforces its policy file again"
    );
}

/// The id of the XDP program attached to `iface` in `ns`, from `ip link`.
fn xdp_prog_id(ns: &Netns, iface: &str) -> Option<u64> {
    let out = ns.ip(&["-j", "-d", "link", "show", "dev", iface]).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["xdp"]["prog"]["id"].as_u64()
}

/// An XDP program that another owner (here: a second ipguard with other
/// pins, which knows nothing of the first) finds on the interface is
/// reported, left in place, and nothing of the refused start stays behind.
#[test]
fn an_xdp_program_attached_by_something_else_is_reported_never_replaced() {
    let (pair, d) = setup();
    let before = xdp_prog_id(&pair.server, &pair.server_if).expect("ipguard attached");
    let other = PinDir::new().unwrap();
    let out = another_run(&pair, &d, &other.path);
    one_line(
        &out,
        3,
        &format!(
            "interface {} already has an XDP program that ipguard did not attach",
            pair.server_if
        ),
    );
    assert_eq!(
        xdp_prog_id(&pair.server, &pair.server_if),
        Some(before),
        "the program already there stays attached"
    );
    let left: Vec<_> = std::fs::read_dir(&other.path)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the refused start left pins: {left:?}");
    assert!(
        !d.dir.join("other-state/applied.json").exists(),
        "the refused start recorded a policy as applied"
    );
    assert!(connects(&pair, CLIENT_V4, SERVER_V4, 7000));
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
}

/// Sends one raw request line on the daemon's socket and returns the
/// answer: what a client that skips the CLI's checks can send.
fn raw_request(d: &Daemon, line: &str) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

/// A duration past what the clock can hold killed the daemon (a panic on
/// `SystemTime + Duration`); it is refused in one line, from the CLI and
/// from a raw request alike, and the daemon goes on.
#[test]
fn out_of_range_durations_are_refused_and_the_daemon_lives_on() {
    let (_pair, d) = setup();
    let huge = u64::MAX.to_string();
    let out = d
        .client(&["allow", "203.0.113.9", "--for", &format!("{huge}s")])
        .output()
        .unwrap();
    one_line(&out, 1, "longer than a time-boxed entry may be");
    let file = d.dir.join("same.yaml");
    std::fs::write(&file, POLICY).unwrap();
    let out = d
        .client(&["apply", file.to_str().unwrap(), "--confirm", &huge])
        .output()
        .unwrap();
    one_line(&out, 1, "--confirm 18446744073709551615 is out of range");

    let r = raw_request(
        &d,
        &format!(
            r#"{{"cmd":"allow","addr":"203.0.113.9","for_secs":{huge},"service":null,"label":null}}"#
        ),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["exit"], 1, "{r}");
    let policy = serde_json::to_string(POLICY).unwrap();
    let r = raw_request(
        &d,
        &format!(
            r#"{{"cmd":"apply","path":"x.yaml","text":{policy},"confirm_secs":{huge},"force":false}}"#
        ),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["exit"], 1, "{r}");

    // The daemon itself answers (not the pinned maps of a dead one), and
    // the refused requests recorded nothing.
    let st = d.status().unwrap();
    assert_ne!(st["daemon"], false, "the daemon died: {st}");
    assert_eq!(st["runtime_entries"], 0, "{st}");
}

/// Removes a planted file in the shared temp directory, also when the
/// test fails.
struct Planted(std::path::PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(d) = self.0.parent() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The attach mode used to be written to $TMPDIR/ipguard-link-modes/, by
/// root, following symbolic links: anyone could plant a link there and
/// have any file overwritten with "native". The mode now lives in the
/// state directory; nothing is written to the shared temp directory, and
/// an adopted link still reports the mode it was attached in.
#[test]
fn the_attach_mode_is_kept_in_the_state_directory_not_in_shared_temp() {
    require_root();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    // Where the old scheme wrote for these pins and this interface.
    let name = pins
        .path
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    let planted_dir = std::env::temp_dir().join("ipguard-link-modes");
    let _ = std::fs::create_dir(&planted_dir);
    let planted = Planted(planted_dir.join(format!("{name}__{}", pair.server_if)));
    let victim_dir = scratch_dir("victim-");
    std::fs::create_dir_all(&victim_dir).unwrap();
    let victim = victim_dir.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, &planted.0).unwrap();

    let mut d = Daemon::start_on(pins, &pair, POLICY).unwrap();
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious\n",
        "the daemon wrote through a link planted in the shared temp directory"
    );
    let st = d.status().unwrap();
    assert_eq!(st["attached"][0]["mode"], "native", "{st}");
    d.proc.signal_and_wait(Signal::SIGKILL).unwrap();
    d.restart(&pair).unwrap();
    let st = d.status().unwrap();
    assert_eq!(st["attached"][0]["mode"], "native", "adopted: {st}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let _ = std::fs::remove_dir_all(&victim_dir);
}

/// The event stream on stdout used to be written from the event loop: a
/// reader that stops reading (a full pipe) stopped the loop, so the control
/// socket went unanswered and runtime entries never expired. Here stdout is
/// a pipe nobody reads while refused traffic makes several pipes' worth of
/// events; the daemon still answers, and an entry still expires on time.
#[test]
fn a_stalled_stdout_never_stops_the_daemon() {
    require_root();
    let pair = Pair::new().unwrap();
    let policy = format!("{POLICY}events: {{ per_source: 1000/s, max_rate: 1000/s }}\n");
    let d = Daemon::start_with_stdout_unread(&pair, &policy).unwrap();
    let src: IpAddr = CLIENT_V4_ALT.parse().unwrap();
    let dst = SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 9);
    // About 600 events of some 230 bytes: more than twice a 64 KiB pipe.
    let start = Instant::now();
    for _ in 0..600 {
        udp_send(&pair.client, src, dst, 1).unwrap();
        thread::sleep(Duration::from_millis(2));
        if start.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let st = d.status().unwrap();
    assert_ne!(st["daemon"], false, "the daemon did not answer: {st}");
    assert!(n(&st["events"]["sent"]) > 300, "{}", st["events"]);
    ok(d.client(&["allow", "203.0.113.77", "--for", "1s"])
        .output()
        .unwrap());
    thread::sleep(Duration::from_millis(2500));
    let st = d.status().unwrap();
    assert_ne!(st["daemon"], false, "the daemon did not answer: {st}");
    assert_eq!(st["runtime_entries"], 0, "the entry did not expire: {st}");
}

/// Open descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The metrics endpoint held every connection up to 5 s, without a bound:
/// idle clients piled up descriptors and tasks in the daemon. 200 idle
/// connections now cost at most MAX_CONNECTIONS descriptors, the control
/// socket answers meanwhile, and /metrics is served once they are gone.
#[test]
fn idle_metrics_connections_are_bounded() {
    require_root();
    let pair = Pair::new().unwrap();
    let port = 20_000 + (std::process::id() % 1000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&pair, POLICY, &["--metrics", &addr]).unwrap();
    let pid = d.proc.pid();
    let base = open_fds(pid);
    let sa: SocketAddr = addr.parse().unwrap();
    let idle = pair
        .server
        .run_in(move || {
            (0..200)
                .filter_map(|_| {
                    std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(2)).ok()
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let held = open_fds(pid);
    assert!(
        // MAX_CONNECTIONS (8) and a little slack, far from 200.
        held <= base + 16,
        "{} idle connections: the daemon holds {held} descriptors, {base} before",
        idle.len()
    );
    let st = d.status().unwrap();
    assert_ne!(st["daemon"], false, "{st}");
    drop(idle);
    // The slots free as the daemon sees the closes (or after its 5 s
    // timeout at most).
    let served = wait_for(Duration::from_secs(8), || {
        get_metrics(&pair, sa)?
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
    assert!(
        served.is_some(),
        "/metrics not served after the idle ones left"
    );
}

/// `allow` whose state file cannot be written answered with an error but
/// kept the entry in memory: the next reload put it into the kernel, and
/// the source the operator was told had not been added got in. The answer
/// now follows the datapath write and the state save, and a failure undoes
/// the change everywhere.
#[test]
fn a_failed_runtime_allow_changes_nothing_anywhere() {
    let (pair, d) = setup();
    assert!(!connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    // The store is written to runtime.tmp and renamed: a directory there
    // makes every save fail.
    let state = d.dir.join("state");
    std::fs::create_dir_all(state.join("runtime.tmp")).unwrap();
    let out = d.client(&["allow", CLIENT_V4_ALT]).output().unwrap();
    assert_ne!(out.status.code(), Some(0), "the allow must fail");
    // (Now "cannot save the runtime entries ...; nothing changed".)
    one_line(&out, 3, "runtime");
    // A reload recompiles from what the daemon holds in memory.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.proc.pid() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    thread::sleep(Duration::from_millis(700));
    assert!(
        !connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "the refused allow was enforced after a reload"
    );
    let st = d.status().unwrap();
    assert_eq!(st["runtime_entries"], 0, "{st}");
    // Once the state can be written again, allow works end to end.
    std::fs::remove_dir(state.join("runtime.tmp")).unwrap();
    ok(d.client(&["allow", CLIENT_V4_ALT]).output().unwrap());
    assert!(connects(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
}

/// A revoke (as a new policy or an expiry) deletes the flows of the source
/// it refuses: here a UDP server on a port in the ephemeral range, whose
/// answers count as a client's and record flows, must not keep answering
/// the revoked client as "return traffic".
#[test]
fn a_revoke_deletes_the_flows_of_the_refused_source() {
    let (pair, d) = setup();
    let echo = UdpEcho::new(
        &pair.server,
        SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 40_000),
    )
    .unwrap();
    let client = UdpClient::new(&pair.client, CLIENT_V4_ALT.parse().unwrap(), echo.addr).unwrap();
    assert!(!client.ask(Duration::from_millis(600)), "refused at first");
    ok(d.client(&["allow", CLIENT_V4_ALT]).output().unwrap());
    assert!(
        client.ask(Duration::from_millis(1500)),
        "answered once allowed"
    );
    let flows = d.status().unwrap()["flows"].clone();
    assert!(
        n(&flows["live"]) >= 1,
        "the answer recorded a flow: {flows}"
    );
    ok(d.client(&["revoke", CLIENT_V4_ALT]).output().unwrap());
    assert!(
        !client.ask(Duration::from_millis(600)),
        "the revoked client was answered"
    );
    let flows = d.status().unwrap()["flows"].clone();
    assert!(n(&flows["deleted"]) >= 1, "{flows}");
}

/// On a veth attached in native mode, the RSTs of `action: reject` reach
/// the peer only if it runs NAPI: `status` says so beside the interface
/// (here the harness's veth, as `run` attaches it: native). The text form
/// also shows the flow table.
#[test]
fn status_notes_how_rejects_fare_on_a_native_veth() {
    let (_pair, d) = setup();
    let st = d.status().unwrap();
    let att = &st["attached"][0];
    assert_eq!(att["mode"], "native", "{st}");
    let note = att["note"]
        .as_str()
        .unwrap_or_else(|| panic!("no note: {st}"));
    assert!(note.contains("veth") && note.contains("GRO"), "{note}");
    let text = ok(d.client(&["status"]).output().unwrap());
    assert!(text.contains(note), "{text}");
    assert!(text.contains("flows:"), "{text}");
}

/// A TCP session from `src` to `dst` held open on both ends (the
/// listener keeps what it accepts, so the server side stays ESTABLISHED
/// for the lockout guard to see).
fn held_session(
    pair: &Pair,
    src: &str,
    dst: SocketAddr,
) -> (
    std::net::TcpListener,
    std::net::TcpStream,
    std::net::TcpStream,
) {
    let listener = pair
        .server
        .run_in(move || std::net::TcpListener::bind(dst))
        .unwrap()
        .unwrap();
    let client = tcp_stream(
        &pair.client,
        src.parse().unwrap(),
        dst,
        Duration::from_secs(2),
    )
    .unwrap()
    .expect("the session opens");
    let (accepted, _) = listener.accept().expect("accept the session");
    (listener, client, accepted)
}

/// `lockout_guard.ports` replaces the guarded ports (by default 22 and the
/// ssh service's); a session on another port is cut with a warning. A
/// revoke and an expiry are never refused, and say which sessions they
/// cut: to the caller and in the log.
#[test]
fn the_lockout_guard_watches_its_ports_and_every_cut_is_said() {
    require_root();
    let pair = Pair::new().unwrap();
    let policy = format!("{POLICY}lockout_guard: {{ ports: [tcp/7100] }}\n");
    let d = Daemon::start(&pair, &policy).unwrap();
    let v4 = |a: &str, p: u16| SocketAddr::new(a.parse().unwrap(), p);
    let _ssh = held_session(&pair, CLIENT_V4, v4(SERVER_V4, 22));
    let _guarded = held_session(&pair, CLIENT_V4, v4(SERVER_V4, 7100));
    let cut = policy.replace("  - from: 198.51.100.2\n    label: client\n", "");
    let file = d.dir.join("cut.yaml");
    std::fs::write(&file, &cut).unwrap();
    let out = d
        .client(&["apply", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("198.51.100.2 -> port 7100"), "{err}");
    assert!(!err.contains("port 22"), "22 is not guarded here: {err}");
    let out = d
        .client(&["apply", file.to_str().unwrap(), "--force"])
        .output()
        .unwrap();
    ok(out.clone());
    let err = String::from_utf8_lossy(&out.stderr);
    for port in [22, 7100] {
        assert!(
            err.contains(&format!(
                "warning: cuts the established session 198.51.100.2 -> port {port}"
            )),
            "{err}"
        );
    }

    // A revoke of one's own runtime entry.
    ok(d.client(&["allow", CLIENT_V4_ALT]).output().unwrap());
    let _mine = held_session(&pair, CLIENT_V4_ALT, v4(SERVER_V4_ALT, 7101));
    let out = d.client(&["revoke", CLIENT_V4_ALT]).output().unwrap();
    ok(out.clone());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: cuts the established session 203.0.113.9 -> port 7101"),
        "{err}"
    );
    // An expiry: nobody to answer, the log says it.
    ok(d.client(&["allow", CLIENT_V4_ALT, "--for", "2s"])
        .output()
        .unwrap());
    let warned = |d: &Daemon| {
        d.log()
            .lines()
            .filter(|l| l.contains("cuts this established session") && l.contains("203.0.113.9"))
            .count()
    };
    let before = warned(&d);
    assert!(
        wait_for(Duration::from_secs(6), || (warned(&d) > before)
            .then_some(()))
        .is_some(),
        "the expiry's cut is logged: {}",
        d.log()
    );
}

/// `apply --dry-run` and `diff` say what a new policy would change: the
/// lists, services and settings, the verdict of a source the daemon
/// refused recently, and the sessions it would cut; nothing is applied.
#[test]
fn a_dry_run_and_a_diff_judge_what_the_daemon_saw() {
    require_root();
    let pair = Pair::new().unwrap();
    let d = Daemon::start(&pair, POLICY).unwrap();
    // A refused source, seen on the app service's port.
    let dst = SocketAddr::new(SERVER_V4_ALT.parse().unwrap(), 5000);
    udp_send(&pair.client, CLIENT_V4_ALT.parse().unwrap(), dst, 1).unwrap();
    wait_for(Duration::from_secs(5), || {
        let st = d.status().ok()?;
        st["top_blocked"]
            .as_array()?
            .iter()
            .any(|b| b["src"] == CLIENT_V4_ALT)
            .then_some(())
    })
    .expect("the refused source seen");
    // An established session of the allowed client on ssh's port.
    let _ssh = held_session(
        &pair,
        CLIENT_V4,
        SocketAddr::new(SERVER_V4.parse().unwrap(), 22),
    );
    // Passed datagrams of the allowed client to a port of no service, in
    // the datapath's sample (one in PASS_SAMPLE_EVERY per CPU and reason,
    // so enough of them for each CPU to take one).
    let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
    udp_send(
        &pair.client,
        CLIENT_V4.parse().unwrap(),
        SocketAddr::new(SERVER_V4.parse().unwrap(), 6000),
        16 * (cpus + 1),
    )
    .unwrap();
    // The new policy lets the refused source into app and drops the
    // client from the host-wide list (so from ssh).
    let new = POLICY
        .replace(
            "  - from: 198.51.100.2\n    label: client\n",
            "  - from: 198.51.100.3\n    label: other\n",
        )
        .replace(
            "allow: [198.51.100.2] }",
            "allow: [198.51.100.2, 203.0.113.9] }",
        );
    assert_ne!(new, POLICY);
    let file = d.dir.join("new.yaml");
    std::fs::write(&file, &new).unwrap();
    let generation = d.generation();
    let dry_run = || -> Value {
        let out = ok(d
            .client(&["apply", file.to_str().unwrap(), "--dry-run", "--json"])
            .output()
            .unwrap());
        serde_json::from_str(&out).unwrap()
    };
    // The daemon reads the sample once a second.
    let passed = |v: &Value| {
        v["verdicts"].as_array().and_then(|a| {
            a.iter()
                .find(|c| c["src"] == CLIENT_V4 && c["port"] == "udp/6000")
                .cloned()
        })
    };
    let v = wait_for(Duration::from_secs(5), || {
        let v = dry_run();
        passed(&v).is_some().then_some(v)
    })
    .unwrap_or_else(|| panic!("the passed datagrams judged: {}", dry_run()));
    let p = passed(&v).unwrap();
    assert_eq!(p["seen"], "passed", "{v}");
    assert_eq!(p["old"]["verdict"], "pass", "{v}");
    assert_eq!(p["new"]["verdict"], "drop", "{v}");
    assert_eq!(d.generation(), generation, "a dry run applied: {v}");
    assert_eq!(v["lists"][0]["list"], "allow", "{v}");
    assert_eq!(
        v["lists"][0]["added"],
        serde_json::json!(["198.51.100.3/32"]),
        "{v}"
    );
    assert_eq!(
        v["lists"][0]["removed"],
        serde_json::json!(["198.51.100.2/32"]),
        "{v}"
    );
    assert_eq!(v["lists"][1]["list"], "service app", "{v}");
    assert_eq!(
        v["lists"][1]["added"],
        serde_json::json!(["203.0.113.9/32"]),
        "{v}"
    );
    let verdicts = v["verdicts"].as_array().unwrap();
    let refused = verdicts
        .iter()
        .find(|c| c["src"] == CLIENT_V4_ALT)
        .unwrap_or_else(|| panic!("the refused source judged: {v}"));
    assert_eq!(refused["port"], "udp/5000", "{v}");
    assert_eq!(refused["seen"], "refused", "{v}");
    assert_eq!(refused["old"]["verdict"], "drop", "{v}");
    assert_eq!(refused["new"]["verdict"], "pass", "{v}");
    let session = verdicts
        .iter()
        .find(|c| c["src"] == CLIENT_V4)
        .unwrap_or_else(|| panic!("the session's source judged: {v}"));
    assert_eq!(session["port"], "tcp/22", "{v}");
    assert_eq!(session["seen"], "session", "{v}");
    assert_eq!(session["new"]["verdict"], "drop", "{v}");
    let cut = &v["cut_sessions"][0];
    assert_eq!(cut["remote"], CLIENT_V4, "{v}");
    assert_eq!(cut["local_port"], 22, "{v}");
    assert_eq!(cut["lockout_guard"], true, "{v}");
    assert_eq!(v["refused_without_force"], true, "{v}");
    // The text form says the same.
    let text = ok(d
        .client(&["apply", file.to_str().unwrap(), "--dry-run"])
        .output()
        .unwrap());
    for want in [
        "allow: +198.51.100.3/32",
        "allow: -198.51.100.2/32",
        "service app: +203.0.113.9/32",
        "203.0.113.9 udp/5000 [refused]: drop (not_allowed) -> pass",
        "198.51.100.2 tcp/22 [session]: pass",
        "would cut the established session 198.51.100.2:",
        "(lockout guard: apply refuses it without --force)",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    assert_eq!(d.generation(), generation);

    // `diff` of the two files judges the same packets.
    let old_file = d.dir.join("old.yaml");
    std::fs::write(&old_file, POLICY).unwrap();
    let out = ok(d
        .client(&[
            "diff",
            old_file.to_str().unwrap(),
            file.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap());
    let v: Value = serde_json::from_str(&out).unwrap();
    let srcs: Vec<&str> = v["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["src"].as_str())
        .collect();
    assert!(
        srcs.contains(&CLIENT_V4_ALT) && srcs.contains(&CLIENT_V4),
        "{v}"
    );
    assert_eq!(
        v["lists"][1]["added"],
        serde_json::json!(["203.0.113.9/32"]),
        "{v}"
    );
}

/// Every applied policy is in `history` (where it came from, who asked,
/// its hash, a copy), across a restart; `rollback` applies one again,
/// through the lockout guard, and is itself recorded.
#[test]
fn history_and_rollback_survive_a_restart() {
    require_root();
    let pair = Pair::new().unwrap();
    let mut d = Daemon::start(&pair, POLICY).unwrap();
    let records = |d: &Daemon| -> Vec<Value> {
        serde_json::from_str(&ok(d.client(&["history", "--json"]).output().unwrap())).unwrap()
    };
    let sha = |d: &Daemon| {
        d.status().unwrap()["policy"]["sha256"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = sha(&d);
    let h = records(&d);
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0]["origin"], "start");
    assert_eq!(h[0]["sha256"], first.as_str());
    assert_eq!(h[0]["copy"], true);

    // A policy pushed with apply: who asked is recorded.
    let applied = POLICY.replace("198.51.100.2]", "198.51.100.2, 198.51.100.9]");
    assert_ne!(applied, POLICY);
    let file = d.dir.join("applied.yaml");
    std::fs::write(&file, &applied).unwrap();
    ok(d.client(&["apply", file.to_str().unwrap()])
        .output()
        .unwrap());
    let second = sha(&d);
    // The file changes: a reload.
    let before = d.generation();
    let third_text = format!("{POLICY}deny: [203.0.113.66]\n");
    std::fs::write(&d.policy, &third_text).unwrap();
    wait_for(Duration::from_secs(10), || {
        (d.generation() > before).then_some(())
    })
    .expect("the changed file applied");
    let third = sha(&d);
    let h = records(&d);
    let origins: Vec<&str> = h.iter().filter_map(|r| r["origin"].as_str()).collect();
    assert_eq!(origins, ["start", "apply", "policy file changed"], "{h:?}");
    assert_eq!(h[1]["uid"], 0, "{h:?}");
    assert_eq!(h[1]["user"], "root", "{h:?}");
    assert_eq!(h[1]["sha256"], second.as_str());
    assert!(
        h[1]["path"].as_str().unwrap().ends_with("applied.yaml"),
        "{h:?}"
    );
    assert_eq!(h[2]["sha256"], third.as_str());
    let text = ok(d.client(&["history"]).output().unwrap());
    assert!(text.contains("apply by root"), "{text}");

    // Across a restart the records stay (and the start adds one).
    d.proc.signal_and_wait(Signal::SIGTERM).unwrap();
    d.restart(&pair).unwrap();
    let h = records(&d);
    assert_eq!(h.len(), 4, "{h:?}");
    assert_eq!(h[3]["origin"], "start");
    let applied_generation = h[1]["generation"].as_u64().unwrap();

    // Back to what apply pushed, by its generation.
    let out = ok(d
        .client(&["rollback", &applied_generation.to_string()])
        .output()
        .unwrap());
    assert!(
        out.contains(&format!(
            "rolled back to the policy of generation {applied_generation}"
        )),
        "{out}"
    );
    assert_eq!(sha(&d), second);
    let h = records(&d);
    assert_eq!(h.last().unwrap()["origin"], "rollback", "{h:?}");
    // Without a generation: the policy before the one in force.
    ok(d.client(&["rollback"]).output().unwrap());
    assert_eq!(sha(&d), third);

    // One that is not kept: one clear line.
    let out = d.client(&["rollback", "999999"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("generation 999999 is not in the history"),
        "{err}"
    );
    assert_eq!(sha(&d), third);
    let _ = first;
}

/// `/ready` answers 200 only while the policy file's policy is the one in
/// force: an invalid file, or a policy pushed with apply, make it 503 with
/// the reason (what a Kubernetes readiness probe shows per node), and
/// `ipguard_policy_info` names the hash and generation in force.
#[test]
fn readiness_follows_the_policy_file() {
    require_root();
    let pair = Pair::new().unwrap();
    pair.server.ip(&["link", "set", "lo", "up"]).unwrap();
    let maddr = format!("127.0.0.1:{}", 23_000 + (std::process::id() % 1000) as u16);
    let d = Daemon::start_with(&pair, POLICY, &["--metrics", maddr.as_str()]).unwrap();
    let sa: SocketAddr = maddr.parse().unwrap();
    let ready = || http_get(&pair, sa, "/ready").unwrap_or_default();
    assert!(ready().starts_with("HTTP/1.1 200"), "{}", ready());
    assert!(
        http_get(&pair, sa, "/live")
            .unwrap_or_default()
            .starts_with("HTTP/1.1 200")
    );
    let st = d.status().unwrap();
    let m = get_metrics(&pair, sa).unwrap_or_default();
    let info = format!(
        "ipguard_policy_info{{sha256=\"{}\",generation=\"{}\",",
        st["policy"]["sha256"].as_str().unwrap(),
        d.generation()
    );
    assert!(m.contains(&info), "{info} not in\n{m}");
    assert!(m.contains("ipguard_ready 1"), "{m}");

    // An invalid file: not ready, and why; the policy stays.
    std::fs::write(&d.policy, "version: 1\nallow: [198.51.100.300]\n").unwrap();
    let r = wait_for(Duration::from_secs(10), || {
        let r = ready();
        r.starts_with("HTTP/1.1 503").then_some(r)
    })
    .expect("not ready after an invalid file");
    assert!(
        r.contains("the policy file is invalid") && r.contains("198.51.100.300"),
        "{r}"
    );
    assert!(
        get_metrics(&pair, sa)
            .unwrap_or_default()
            .contains("ipguard_ready 0")
    );
    // Fixed: ready again.
    std::fs::write(&d.policy, POLICY).unwrap();
    wait_for(Duration::from_secs(10), || {
        ready().starts_with("HTTP/1.1 200").then_some(())
    })
    .expect("ready once the file is the policy in force again");

    // A policy pushed with apply is not the file's.
    let other = d.dir.join("other.yaml");
    std::fs::write(&other, format!("{POLICY}deny: [203.0.113.66]\n")).unwrap();
    ok(d.client(&["apply", other.to_str().unwrap()])
        .output()
        .unwrap());
    let r = ready();
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("other.yaml"),
        "{r}"
    );
    // SIGHUP reads the file again: ready.
    let before = d.generation();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.proc.pid() as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        (d.generation() > before).then_some(())
    })
    .expect("SIGHUP applied the file");
    assert!(ready().starts_with("HTTP/1.1 200"), "{}", ready());
}
