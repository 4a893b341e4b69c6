//! The daemon's part of `cargo xtask bench` (IPGUARD_BENCH=1): how long
//! policies take from the files on disk (or a client's batch) to the
//! kernel, and what the daemon holds in memory meanwhile, measured on the
//! real `ipguard run` in a namespace pair, as an operator sees it. Without
//! the variable, a small run of the same code is a test.
//!
//! Each figure is one run, from the write (or the command) until `status`
//! reports the next generation; a reload includes the daemon's 200 ms
//! wait for a write to settle, which the table says.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::Stdio,
    time::{Duration, Instant},
};

use ipguard_tests::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }
}

/// An IPv4 prefix of mixed length (70% /32, the rest /20 to /31),
/// anywhere but 198.51.100.0/24 (the namespace pair's own).
fn prefix(r: &mut Rng) -> String {
    let v = r.next();
    let len = if v % 10 < 7 { 32 } else { 20 + v % 12 };
    let mut a = r.next() & (u32::MAX << (32 - len));
    if a >> 8 == 0x00c6_3364 {
        a ^= 1 << 31;
    }
    let a = std::net::Ipv4Addr::from(a);
    if len == 32 {
        a.to_string()
    } else {
        format!("{a}/{len}")
    }
}

const BASE: &str = "version: 1\nallow:\n  - 198.51.100.2\nservices:\n  ssh: { ports: [tcp/22] }\n";

/// Runs `change` and waits until the daemon has applied one more
/// generation; returns how long that took.
fn until_applied(d: &Daemon, change: impl FnOnce()) -> Duration {
    let before = d.generation();
    let t = Instant::now();
    change();
    wait_for(Duration::from_secs(300), || {
        (d.generation() > before).then_some(())
    })
    .expect("the change was applied");
    t.elapsed()
}

/// Resident and peak memory of the daemon, in MB (VmRSS, VmHWM).
fn memory_mb(d: &Daemon) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", d.proc.pid())).unwrap_or_default();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (kb("VmRSS:") / 1000, kb("VmHWM:") / 1000)
}

/// [`memory_mb`] once the resident size holds still (within 2 MB over a
/// second, at most 10 s): a change hands background work on (the
/// covered-entry warnings, the history's copy) whose memory goes back
/// when it ends; read while it runs, the same load measured 175 and 254
/// MB. The peak keeps the transient.
fn settled_memory_mb(d: &Daemon) -> (u64, u64) {
    let start = std::time::Instant::now();
    let mut last = memory_mb(d);
    let mut still = 0;
    while still < 5 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        let now = memory_mb(d);
        still = if now.0.abs_diff(last.0) <= 2 {
            still + 1
        } else {
            0
        };
        last = now;
    }
    last
}

#[test]
fn bench() {
    require_root();
    let full = std::env::var_os("IPGUARD_BENCH").is_some();
    let (lines, entries, denies) = if full {
        (1_000_000, 1_000_000, 10_000)
    } else {
        (10_000, 10_000, 100)
    };
    let pair = Pair::new().unwrap();
    let d = Daemon::start_with(&pair, BASE, &["--ipv4-capacity", "1048576"]).unwrap();
    let mut r = Rng(0x0bad_5eed_1234_5678);
    let mut rows = String::new();
    let mut row = |what: String, t: Duration, d: &Daemon| {
        // The small run (a test in `cargo xtask test`) does not wait.
        let (rss, peak) = if full {
            settled_memory_mb(d)
        } else {
            memory_mb(d)
        };
        let _ = writeln!(
            rows,
            "| {what} | {:.2} s | {rss} MB | {peak} MB |",
            t.as_secs_f64()
        );
    };

    // One `ipguard deny --stdin` of `batch`, until applied.
    let deny = |d: &Daemon, batch: &str| {
        until_applied(d, || {
            let mut c = d.client(&["deny", "--stdin"]);
            c.stdin(Stdio::piped()).stdout(Stdio::null());
            let mut child = c.spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(batch.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "deny --stdin");
        })
    };
    // The denies first with the small policy in force (what a fail2ban or
    // CrowdSec host runs), for 3 s: they are gone before the next row.
    let mut small_batch = String::new();
    for i in 0..denies {
        let a = std::net::Ipv4Addr::from(0x0b00_0000 | (i as u32 & 0x00ff_ffff));
        let _ = writeln!(small_batch, "{a} 3s bench");
    }
    let t = deny(&d, &small_batch);
    row(
        format!("{denies} denies from one `deny --stdin` (a small policy in force)"),
        t,
        &d,
    );
    wait_for(Duration::from_secs(30), || {
        (d.status().ok()?["runtime_entries"] == 0).then_some(())
    })
    .expect("the denies expired");

    // A list file of `lines` lines, named by the policy.
    let mut list = String::with_capacity(lines * 18);
    for _ in 0..lines {
        list.push_str(&prefix(&mut r));
        list.push('\n');
    }
    std::fs::write(d.dir.join("feed.txt"), &list).unwrap();
    let with_list = BASE.replace(
        "version: 1\n",
        "version: 1\ngroups:\n  feed: { file: feed.txt }\n",
    ) + "always_allow: [feed]\n";
    let t = until_applied(&d, || std::fs::write(&d.policy, &with_list).unwrap());
    row(format!("policy naming a list file of {lines} lines"), t, &d);
    // One more line in it, renamed over (as config management writes).
    let t = until_applied(&d, || {
        let tmp = d.dir.join(".feed.tmp");
        std::fs::write(&tmp, format!("{list}203.0.113.77\n")).unwrap();
        std::fs::rename(&tmp, d.dir.join("feed.txt")).unwrap();
    });
    row(format!("that list file changed ({lines} lines)"), t, &d);

    // The same number of entries written in the YAML policy itself.
    let mut yaml = String::with_capacity(entries * 22);
    yaml.push_str(BASE);
    yaml.push_str("always_allow:\n");
    for _ in 0..entries {
        let _ = writeln!(yaml, "  - {}", prefix(&mut r));
    }
    let t = until_applied(&d, || std::fs::write(&d.policy, &yaml).unwrap());
    // The covered-entry warnings are found once the policy is in force:
    // its memory is read once they are logged (the load is over). A
    // million random prefixes have tens of thousands; the small run may
    // have too few for the count line.
    if full {
        wait_for(Duration::from_secs(60), || {
            d.log().contains("more warnings in").then_some(())
        })
        .expect("the covered-entry warnings logged");
    }
    row(format!("YAML policy of {entries} entries"), t, &d);

    // A batch of denies from one `ipguard deny --stdin`.
    let mut batch = String::new();
    for _ in 0..denies {
        let a = std::net::Ipv4Addr::from(0x0a00_0000 | (r.next() & 0x00ff_ffff));
        let _ = writeln!(batch, "{a} 1h bench");
    }
    let t = deny(&d, &batch);
    row(
        format!("{denies} denies from one `deny --stdin` (with the YAML policy in force)"),
        t,
        &d,
    );

    let table = format!(
        "\n| daemon: from disk or client to applied | time | resident after | peak so far |\n|---|---:|---:|---:|\n{rows}\nA change of a file includes the daemon's 200 ms wait for the write to settle.\n"
    );
    print!("{table}");
    if let Some(path) = std::env::var_os("IPGUARD_BENCH_OUT") {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .expect("the bench table");
        f.write_all(table.as_bytes())
            .expect("write the bench table");
    }
}
