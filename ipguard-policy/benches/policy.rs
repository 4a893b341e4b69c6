//! Policy compiler and explain benchmarks (criterion).
//!
//! `cargo bench -p ipguard-user --bench policy` runs:
//! - `compile/1M_v4_100k_v6`: `policy::compile` of a policy of 1,000,000
//!   IPv4 and 100,000 IPv6 prefixes (allow, deny through a group, services);
//! - `compile/1M_v4_100k_v6_from_yaml`: the same from its YAML text
//!   (parse, validate, compile);
//! - `explain/1M_queries`: 1,000,000 `Explainer` lookups against it,
//!   written as the JSON lines of `explain --stdin --json`;
//! - `list_file/1M_lines_to_slot_image`: a policy whose group is a list
//!   file of 1,000,000 lines, from the files to the slot image the daemon
//!   copies into the kernel (read, parse, compile, both range tables).
//!
//! `IPGUARD_BENCH_PHASES=1 cargo bench -p ipguard-user --bench policy`
//! instead times each phase once (parse, validate+compile, explain) and
//! prints the peak resident memory of the process, which criterion does not
//! measure. `IPGUARD_BENCH_WRITE=DIR` also writes the policy and a query
//! file there, for timing the real `ipguard check` / `explain --stdin`.

use std::{
    hint::black_box,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant, SystemTime},
};

use criterion::{Criterion, criterion_group};
use ipguard_policy::{self as policy, Explainer, Proto};

// The tests' generator (`below` is theirs only).
#[allow(dead_code)]
#[path = "../tests/support/rng.rs"]
mod rng;
use rng::Rng;

fn v4(r: &mut Rng) -> String {
    let len = if r.next() % 10 < 7 {
        32
    } else {
        20 + (r.next() % 12) as u32
    };
    let a = (r.next() as u32) & (u32::MAX << (32 - len));
    if len == 32 {
        Ipv4Addr::from(a).to_string()
    } else {
        format!("{}/{len}", Ipv4Addr::from(a))
    }
}

fn v6(r: &mut Rng) -> String {
    let lens = [128u32, 64, 56, 48, 96];
    let len = lens[(r.next() % lens.len() as u64) as usize];
    let a = (0x2001_0db8u128 << 96) | (u128::from(r.next()) << 32) | u128::from(r.next() as u32);
    let a = a & (u128::MAX << (128 - len));
    format!("\"{}/{len}\"", Ipv6Addr::from(a))
}

/// 60% of the prefixes in a `blocklist` group denied as one entry, 40% as
/// individual allow entries (every tenth with a label), two services.
pub fn policy_text(n4: usize, n6: usize) -> String {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut s = String::with_capacity(n4 * 26 + n6 * 50);
    s.push_str("version: 1\nservices:\n  ssh: { ports: [tcp/22], allow: [admins] }\n  web: { ports: [tcp/443] }\n");
    s.push_str("groups:\n  admins: [203.0.113.0/24]\n  blocklist:\n");
    let (d4, d6) = (n4 * 6 / 10, n6 * 6 / 10);
    for _ in 0..d4 {
        s.push_str(&format!("    - {}\n", v4(&mut r)));
    }
    for _ in 0..d6 {
        s.push_str(&format!("    - {}\n", v6(&mut r)));
    }
    s.push_str("deny:\n  - blocklist\nallow:\n");
    for i in 0..n4 - d4 {
        if i % 10 == 0 {
            s.push_str(&format!(
                "  - {{from: {}, label: customer {i}}}\n",
                v4(&mut r)
            ));
        } else {
            s.push_str(&format!("  - {}\n", v4(&mut r)));
        }
    }
    for _ in 0..n6 - d6 {
        s.push_str(&format!("  - {}\n", v6(&mut r)));
    }
    s
}

/// A policy allowing a group read from a list file of `n` lines (IPv4 of
/// mixed lengths, every tenth line IPv6, a comment every 1,000 lines),
/// written under the target directory; returns the policy's path.
fn list_file_policy(n: usize) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-list-file");
    std::fs::create_dir_all(&dir).expect("bench directory");
    let mut r = Rng(0x51ed_270b_27a4_4f3c);
    let mut lines = String::with_capacity(n * 20);
    for i in 0..n {
        if i % 1000 == 0 {
            lines.push_str("# generated\n");
        }
        if i % 10 == 9 {
            lines.push_str(v6(&mut r).trim_matches('"'));
        } else {
            lines.push_str(&v4(&mut r));
        }
        lines.push('\n');
    }
    std::fs::write(dir.join("feed.txt"), lines).expect("write the list file");
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\ngroups:\n  feed: { file: feed.txt }\nservices:\n  ssh: { ports: [tcp/22], allow: [203.0.113.0/24] }\nallow: [feed]\n",
    )
    .expect("write the policy");
    policy
}

/// A parsed query and its `SRC [PROTO/PORT]` line.
pub type Query = (IpAddr, Option<(Proto, u16)>, String);

/// `SRC [PROTO/PORT]` lines: a mix of addresses inside and outside the
/// policy's prefixes, IPv4 and IPv6, with and without ports.
pub fn queries(n: usize) -> Vec<Query> {
    let mut r = Rng(0x1234_5678_9abc_def1);
    (0..n)
        .map(|i| {
            let addr = if i % 10 == 9 {
                IpAddr::V6(Ipv6Addr::from(
                    (0x2001_0db8u128 << 96) | u128::from(r.next()),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(r.next() as u32))
            };
            let port = match i % 4 {
                0 => None,
                1 => Some((Proto::Tcp, 22)),
                2 => Some((Proto::Tcp, 443)),
                _ => Some((Proto::Udp, 53)),
            };
            let text = match port {
                None => addr.to_string(),
                Some((Proto::Tcp, p)) => format!("{addr} tcp/{p}"),
                Some((Proto::Udp, p)) => format!("{addr} udp/{p}"),
            };
            (addr, port, text)
        })
        .collect()
}

fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes into the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

fn phases() {
    let t = Instant::now();
    let text = policy_text(1_000_000, 100_000);
    println!(
        "generate: {:?} ({} MiB of YAML)",
        t.elapsed(),
        text.len() >> 20
    );
    if let Ok(dir) = std::env::var("IPGUARD_BENCH_WRITE") {
        let dir = std::path::Path::new(&dir);
        std::fs::write(dir.join("policy-1m.yaml"), &text).expect("write policy");
        let mut q = String::new();
        for (_, _, line) in queries(1_000_000) {
            q.push_str(&line);
            q.push('\n');
        }
        std::fs::write(dir.join("queries-1m.txt"), q).expect("write queries");
    }
    let rss0 = peak_rss_mib();
    let t = Instant::now();
    let loaded = policy::parse_str("bench.yaml", &text).expect("valid policy");
    println!(
        "parse+validate: {:?} ({} warnings)",
        t.elapsed(),
        loaded.warnings.len()
    );
    drop(text);
    let t = Instant::now();
    let compiled = policy::compile(&loaded.policy, SystemTime::now(), &[]);
    println!(
        "compile: {:?} ({} IPv4 + {} IPv6 prefixes)",
        t.elapsed(),
        compiled.v4.len(),
        compiled.v6.len()
    );
    println!(
        "peak RSS: {:.0} MiB (before parsing: {:.0} MiB)",
        peak_rss_mib(),
        rss0
    );
    let t = Instant::now();
    let table = policy::range4::RangeTable4::build(&compiled.v4);
    println!(
        "range table (IPv4): {:?}, {} KiB: {} chunks, {} ranges, {} leaves",
        t.elapsed(),
        table.bytes() >> 10,
        table.chunks(),
        table.ranges.len(),
        table.leaves.len()
    );
    let qs = queries(1_000_000);
    let t = Instant::now();
    let mut found = 0usize;
    for (addr, _, _) in &qs {
        if let std::net::IpAddr::V4(a) = addr {
            found += usize::from(table.lookup(u32::from(*a)).is_some());
        }
    }
    println!(
        "range table: 1M lookups in {:?} ({found} found)",
        t.elapsed()
    );
    let t = Instant::now();
    let ex = Explainer::new(&compiled);
    println!("explainer: {:?}", t.elapsed());
    let t = Instant::now();
    let mut out = Vec::with_capacity(200 << 20);
    for (addr, port, _) in &qs {
        ex.explain_ref(*addr, *port)
            .write_json(&mut out, "x", None)
            .expect("json");
        out.push(b'\n');
    }
    println!(
        "explain 1M queries as JSON: {:?} ({} MiB)",
        t.elapsed(),
        out.len() >> 20
    );
}

fn list_file_phases() {
    let path = list_file_policy(1_000_000);
    let t = Instant::now();
    let loaded = policy::load_file(&path).expect("valid policy");
    println!(
        "list file of 1,000,000 lines: read+parse+validate {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let compiled = policy::compile(&loaded.policy, SystemTime::now(), &[]);
    println!(
        "  compile {:?} ({} IPv4 + {} IPv6 prefixes)",
        t.elapsed(),
        compiled.v4.len(),
        compiled.v6.len()
    );
    let t = Instant::now();
    let image = policy::SlotImage::build(&compiled);
    println!(
        "  slot image (both range tables) {:?}: {} ranges, {} IPv6 nodes",
        t.elapsed(),
        image.range4.ranges.len(),
        image.range6.nodes.len()
    );
}

fn benches(c: &mut Criterion) {
    let path = list_file_policy(1_000_000);
    let mut g = c.benchmark_group("list_file");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("1M_lines_to_slot_image", |b| {
        b.iter(|| {
            let l = policy::load_file(&path).expect("valid policy");
            let c = policy::compile(&l.policy, SystemTime::now(), &[]);
            black_box(policy::SlotImage::build(&c))
        })
    });
    g.finish();

    let text = policy_text(1_000_000, 100_000);
    let loaded = policy::parse_str("bench.yaml", &text).expect("valid policy");
    let now = SystemTime::now();
    let mut g = c.benchmark_group("compile");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("1M_v4_100k_v6", |b| {
        b.iter(|| black_box(policy::compile(&loaded.policy, now, &[])))
    });
    // What `ipguard check`, `run` and every reload pay: the YAML text to
    // the datapath's tables.
    g.measurement_time(Duration::from_secs(40));
    g.bench_function("1M_v4_100k_v6_from_yaml", |b| {
        b.iter(|| {
            let l = policy::parse_str("bench.yaml", &text).expect("valid policy");
            black_box(policy::compile(&l.policy, now, &[]))
        })
    });
    g.finish();
    drop(text);

    let compiled = policy::compile(&loaded.policy, now, &[]);
    let qs = queries(1_000_000);
    let mut g = c.benchmark_group("explain");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("1M_queries", |b| {
        let mut out: Vec<u8> = Vec::with_capacity(200 << 20);
        b.iter(|| {
            out.clear();
            let ex = Explainer::new(&compiled);
            for (addr, port, text) in &qs {
                ex.explain_ref(*addr, *port)
                    .write_json(&mut out, text, None)
                    .expect("json");
                out.push(b'\n');
            }
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(policy_benches, benches);

fn main() {
    if std::env::var_os("IPGUARD_BENCH_PHASES").is_some() {
        phases();
        list_file_phases();
        let _ = std::io::stdout().flush();
        return;
    }
    policy_benches();
    Criterion::default().configure_from_args().final_summary();
}
