//! The datapath benchmark behind `cargo xtask bench` (IPGUARD_BENCH=1),
//! and, without that variable, a small run of the same code as a test.
//!
//! Every number is BPF_PROG_TEST_RUN's own measurement of one run
//! (`repeat` = 1) of one packet, summed over 65,536 packets with distinct
//! source addresses spread over the prefix set, in random order: the lookup
//! paths are as cold as the kernel keeps them between packets, not the warm
//! path of one packet repeated. Five passes, the programs taking turns in
//! each; each program's median pass is reported, and ipguard's cost over
//! the empty program as the median of their difference within a pass.
//!
//! Programs: `ipguard_bench_empty` (XDP_PASS only), `ipguard_bench_parse`
//! (the parser), `ipguard_bench_lookup` (parser, active slot, the source
//! lookup: the IPv4 range table or the IPv6 range tree), `ipguard`
//! (everything); the first three are the bench object's, on the product's
//! pinned maps; and xdp-filter from
//! Debian's xdp-tools, loaded onto a veth in a throw-away namespace and
//! run by id on the same packets.
//!
//! Each IPv4 row's sources are also split by where their lookup ends
//! (`v4_ends`) and the lookup timed over each group on its own.
//!
//! The frames never reach any interface (test runs stay in the kernel's
//! test harness), so the sources may be drawn from all of IPv4.

mod datapath_util;

use std::{
    collections::HashSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::Command,
    time::{Duration, Instant},
};

use datapath_util::*;
use ipguard::{
    datapath::Capacities,
    policy::{
        CompiledPolicy,
        range4::{RangeTable4, Reads},
    },
};
use ipguard_common::*;
use ipguard_tests::{
    Pair,
    frames::{L4, Pkt},
    prog_test_run,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Set {
    policy: CompiledPolicy,
    allowed: Vec<Vec<u8>>,
    refused: Vec<Vec<u8>>,
}

fn frame(src: IpAddr) -> Vec<u8> {
    let dst: IpAddr = if src.is_ipv4() {
        "198.51.100.1".parse().unwrap()
    } else {
        "2001:db8:ffff::1".parse().unwrap()
    };
    Pkt::new(src, dst, L4::syn(40000, 443)).build()
}

fn bench_config() -> PolicyConfig {
    config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)
}

/// `n` distinct IPv4 prefixes; small sets are /16s (room for 65,536
/// distinct sources), large ones a mix like a real table: 70% /24, 10% /22,
/// 10% /20, 5% /16, 5% /32. Sources: `sources` allowed (inside a random
/// prefix each) and as many refused (covered by none).
fn v4_set(n: usize, sources: usize, seed: u64) -> Set {
    let mut r = Rng(seed);
    const LENS: [u8; 5] = [16, 20, 22, 24, 32];
    let mut sets: [HashSet<u32>; 5] = Default::default();
    let mut prefixes: Vec<(u32, u8)> = Vec::with_capacity(n);
    while prefixes.len() < n {
        let len = if n <= 1000 {
            16
        } else {
            match r.below(100) {
                0..70 => 24,
                70..80 => 22,
                80..90 => 20,
                90..95 => 16,
                _ => 32,
            }
        };
        let a = (r.next() as u32) & (u32::MAX << (32 - len));
        let k = LENS.iter().position(|&l| l == len).unwrap_or(0);
        if sets[k].insert(a) {
            prefixes.push((a, len));
        }
    }
    let covered = |a: u32| {
        LENS.iter()
            .zip(&sets)
            .any(|(&len, s)| s.contains(&(a & (u32::MAX << (32 - len)))))
    };
    let mut policy = CompiledPolicy {
        config: bench_config(),
        ..Default::default()
    };
    policy.v4 = prefixes
        .iter()
        .map(|&(a, len)| {
            (
                ipnet::Ipv4Net::new(Ipv4Addr::from(a), len).unwrap(),
                value(1, 0, 0),
            )
        })
        .collect();
    policy.v4.sort_by_key(|e| (e.0.network(), e.0.prefix_len()));
    let mut seen = HashSet::new();
    let mut allowed = Vec::with_capacity(sources);
    while allowed.len() < sources {
        let (a, len) = prefixes[r.below(prefixes.len() as u64) as usize];
        let host = if len == 32 {
            0
        } else {
            (r.next() as u32) & (u32::MAX >> len)
        };
        let src = a | host;
        if seen.insert(src) {
            allowed.push(frame(Ipv4Addr::from(src).into()));
        }
    }
    let mut refused = Vec::with_capacity(sources);
    while refused.len() < sources {
        let src = r.next() as u32;
        if !covered(src) && seen.insert(src) {
            refused.push(frame(Ipv4Addr::from(src).into()));
        }
    }
    Set {
        policy,
        allowed,
        refused,
    }
}

/// `n` distinct IPv6 prefixes in 2001:db8::/32: 50% /48, 20% /56, 25% /64,
/// 5% /128.
fn v6_set(n: usize, sources: usize, seed: u64) -> Set {
    let mut r = Rng(seed);
    const LENS: [u8; 4] = [48, 56, 64, 128];
    let base: u128 = 0x2001_0db8 << 96;
    let mask = |len: u8| u128::MAX << (128 - len as u32);
    let mut sets: [HashSet<u128>; 4] = Default::default();
    let mut prefixes: Vec<(u128, u8)> = Vec::with_capacity(n);
    let rand =
        |r: &mut Rng| base | ((((r.next() as u128) << 64) | r.next() as u128) & (u128::MAX >> 32));
    while prefixes.len() < n {
        let len = match r.below(100) {
            0..50 => 48,
            50..70 => 56,
            70..95 => 64,
            _ => 128,
        };
        let a = rand(&mut r) & mask(len);
        let k = LENS.iter().position(|&l| l == len).unwrap_or(0);
        if sets[k].insert(a) {
            prefixes.push((a, len));
        }
    }
    let mut policy = CompiledPolicy {
        config: bench_config(),
        ..Default::default()
    };
    policy.v6 = prefixes
        .iter()
        .map(|&(a, len)| {
            (
                ipnet::Ipv6Net::new(Ipv6Addr::from(a), len).unwrap(),
                value(1, 0, 0),
            )
        })
        .collect();
    policy.v6.sort_by_key(|e| (e.0.network(), e.0.prefix_len()));
    let mut seen = HashSet::new();
    let mut allowed = Vec::with_capacity(sources);
    while allowed.len() < sources {
        let (a, len) = prefixes[r.below(prefixes.len() as u64) as usize];
        let src = a | (rand(&mut r) & !mask(len));
        if seen.insert(src) {
            allowed.push(frame(Ipv6Addr::from(src).into()));
        }
    }
    let mut refused = Vec::with_capacity(sources);
    while refused.len() < sources {
        let src = rand(&mut r);
        let covered = LENS
            .iter()
            .zip(&sets)
            .any(|(&len, s)| s.contains(&(src & mask(len))));
        if !covered && seen.insert(src) {
            refused.push(frame(Ipv6Addr::from(src).into()));
        }
    }
    Set {
        policy,
        allowed,
        refused,
    }
}

/// Where the IPv4 lookup of each of `frames` ends, by what the kernel's
/// search reads for it (`RangeTable4::find`, over `policy`'s table): the
/// /16's class only, its direct word (a leaf, or with a pair /16's
/// intervals), its uncovered mask, its /24's whole bit, or its chunk's
/// cells. The frames of each, in their order.
fn v4_ends(policy: &CompiledPolicy, frames: &[Vec<u8>]) -> [(&'static str, Vec<Vec<u8>>); 5] {
    let t = RangeTable4::of_policy(policy);
    let mut ends: [(&str, Vec<Vec<u8>>); 5] = [
        ("class", Vec::new()),
        ("direct word", Vec::new()),
        ("uncovered mask", Vec::new()),
        ("whole bit", Vec::new()),
        ("chunk", Vec::new()),
    ];
    for f in frames {
        // The IPv4 source of an untagged frame.
        let addr = u32::from_be_bytes(f[26..30].try_into().unwrap());
        let read = t.find(addr).1;
        let pair = t.direct[(addr >> 16) as usize] & R4_PAIR_FLAG != 0;
        let k = match read {
            Reads { cells: true, .. } => 4,
            Reads { whole: true, .. } => 3,
            Reads { mask: true, .. } if !pair => 2,
            Reads { word: true, .. } => 1,
            _ => 0,
        };
        ends[k].1.push(f.clone());
    }
    ends
}

/// ns per packet of each program of `progs` (fd, the action every packet
/// must get): each packet once per pass, the kernel's durations summed.
/// The programs take turns within a pass, so a slow spell of the host
/// falls on all of them alike. Returns, per program, its mean of each
/// pass.
fn measure(progs: &[(RawFd, Option<u32>)], packets: &[Vec<u8>], passes: usize) -> Vec<Vec<f64>> {
    let mut means = vec![Vec::with_capacity(passes); progs.len()];
    for _ in 0..passes {
        for (k, &(fd, want)) in progs.iter().enumerate() {
            let mut total = 0u64;
            for p in packets {
                let (action, ns) = prog_test_run(fd, p, 1).expect("BPF_PROG_TEST_RUN");
                if let Some(w) = want {
                    assert_eq!(action, w, "unexpected action");
                }
                total += ns as u64;
            }
            means[k].push(total as f64 / packets.len() as f64);
        }
    }
    means
}

fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// ns per run of one packet repeated in the kernel's own loop: the warm
/// path (for comparison only).
fn measure_warm(fd: RawFd, packet: &[u8]) -> f64 {
    let mut v: Vec<u32> = (0..5)
        .map(|_| {
            prog_test_run(fd, packet, 10_000)
                .expect("BPF_PROG_TEST_RUN")
                .1
        })
        .collect();
    v.sort();
    v[2] as f64
}

/// Pins the thread to one CPU: stable timings, and one per-CPU event
/// budget.
fn pin_to_cpu0() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

struct Row {
    label: String,
    sources: &'static str,
    parse: f64,
    lookup: f64,
    full: f64,
    /// The median over passes of (ipguard - empty) in the same pass.
    over_empty: f64,
    xdp_filter: Option<f64>,
}

/// xdp-filter (xdp-tools) loaded without its dispatcher onto the server's
/// end of a veth in throw-away namespaces, in allowlist mode (`-p deny`).
/// Its maps are pinned in the root of the BPF filesystem; it refuses to
/// run if an xdp-filter is already there, and unloads (which removes them)
/// on drop.
struct XdpFilter {
    pair: Pair,
    fd: OwnedFd,
}

const XDP_FILTER_PINS: &str = "/sys/fs/bpf/xdp-filter";

impl XdpFilter {
    fn load() -> Self {
        assert!(
            !std::path::Path::new(XDP_FILTER_PINS).exists(),
            "{XDP_FILTER_PINS} exists: an xdp-filter is in use on this host; the bench will not touch it"
        );
        let pair = Pair::new().unwrap();
        let out = pair
            .server
            .command("xdp-filter")
            .env("LIBXDP_SKIP_DISPATCHER", "1")
            .args([
                "load",
                &pair.server_if,
                "-m",
                "skb",
                "-f",
                "ipv4,ipv6,tcp,udp",
                "-p",
                "deny",
            ])
            .output()
            .expect("xdp-filter (cargo xtask bench installs xdp-tools)");
        let me = |pair| Self {
            pair,
            fd: std::fs::File::open("/dev/null").unwrap().into(),
        };
        let mut f = me(pair);
        assert!(
            out.status.success(),
            "xdp-filter load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let link = f
            .pair
            .server
            .ip(&["-j", "-d", "link", "show", "dev", &f.pair.server_if])
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&link.stdout).unwrap();
        let id = v[0]["xdp"]["prog"]["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no XDP program id in {v}"));
        f.fd = prog_fd_by_id(id as u32);
        f
    }

    /// Fills its IPv4 and IPv6 source maps with up to their capacity
    /// (10,000 each) of the allowed sources.
    fn allow(&self, frames: &[Vec<u8>]) {
        for name in ["filter_ipv4", "filter_ipv6"] {
            let data = aya::maps::MapData::from_pin(format!("{XDP_FILTER_PINS}/{name}")).unwrap();
            let map = aya::maps::Map::from_map_data(data).unwrap();
            let ncpu = aya::util::nr_cpus().unwrap();
            // Bit 1 is "match as source" (what `xdp-filter ip ADDR -m src`
            // writes).
            let flags = || aya::maps::PerCpuValues::try_from(vec![1u64; ncpu]).unwrap();
            let cap = 10_000;
            if name == "filter_ipv4" {
                let mut m: aya::maps::PerCpuHashMap<_, [u8; 4], u64> = map.try_into().unwrap();
                for f in frames.iter().filter(|f| f[12..14] == [8, 0]).take(cap) {
                    let k: [u8; 4] = f[26..30].try_into().unwrap();
                    m.insert(k, flags(), 0).unwrap();
                }
            } else {
                let mut m: aya::maps::PerCpuHashMap<_, [u8; 16], u64> = map.try_into().unwrap();
                for f in frames
                    .iter()
                    .filter(|f| f[12..14] == [0x86, 0xdd])
                    .take(cap)
                {
                    let k: [u8; 16] = f[22..38].try_into().unwrap();
                    m.insert(k, flags(), 0).unwrap();
                }
            }
        }
    }

    fn clear(&self) {
        for name in ["filter_ipv4", "filter_ipv6"] {
            let data = aya::maps::MapData::from_pin(format!("{XDP_FILTER_PINS}/{name}")).unwrap();
            let map = aya::maps::Map::from_map_data(data).unwrap();
            if name == "filter_ipv4" {
                let mut m: aya::maps::PerCpuHashMap<_, [u8; 4], u64> = map.try_into().unwrap();
                let keys: Vec<[u8; 4]> = m.keys().filter_map(Result::ok).collect();
                for k in keys {
                    let _ = m.remove(&k);
                }
            } else {
                let mut m: aya::maps::PerCpuHashMap<_, [u8; 16], u64> = map.try_into().unwrap();
                let keys: Vec<[u8; 16]> = m.keys().filter_map(Result::ok).collect();
                for k in keys {
                    let _ = m.remove(&k);
                }
            }
        }
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = self
            .pair
            .server
            .command("xdp-filter")
            .args(["unload", &self.pair.server_if])
            .output();
        if std::path::Path::new(XDP_FILTER_PINS).exists() {
            ipguard_tests::remove_pins(std::path::Path::new(XDP_FILTER_PINS));
        }
    }
}

fn prog_fd_by_id(id: u32) -> OwnedFd {
    #[repr(C)]
    struct GetFd {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    let mut a = GetFd {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: a valid bpf_attr member of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            &mut a as *mut GetFd,
            size_of::<GetFd>() as libc::c_long,
        )
    };
    assert!(
        fd >= 0,
        "BPF_PROG_GET_FD_BY_ID {id}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Capacities for the largest sets (the defaults hold 131,072 IPv4 and
/// 65,536 IPv6 prefixes).
fn bench_caps() -> Capacities {
    Capacities {
        v4: 1 << 20,
        v6: 1 << 17,
        ..Capacities::default()
    }
}

/// Time from compiled policy to live in a fresh datapath, and of a swap in
/// steady state: the third policy, which differs by 1% of its prefixes
/// from the first, goes into the slot the first one left (the second
/// filled the other slot). Both build the IPv4 range table and copy it in.
fn load_times(set: &Set) -> (Duration, Duration) {
    let mut l = Loaded::with_caps(bench_caps());
    let t = Instant::now();
    l.apply(&set.policy);
    let first = t.elapsed();
    let mut second = set.policy.clone();
    let n = second.v4.len() / 100;
    second.v4.drain(..n);
    l.apply(&second);
    let mut third = set.policy.clone();
    third.v4.drain(n..2 * n);
    let t = Instant::now();
    l.apply(&third);
    (first, t.elapsed())
}

#[test]
fn bench() {
    let full = std::env::var_os("IPGUARD_BENCH").is_some();
    pin_to_cpu0();
    let (sources, passes) = if full { (65_536, 5) } else { (4096, 1) };
    let v4_sizes: &[usize] = if full {
        &[10, 1000, 100_000, 1_000_000]
    } else {
        &[1000]
    };
    let v6_sizes: &[usize] = if full { &[100_000] } else { &[1000] };
    // Rows to run, for comparing one change on a noisy host without the
    // whole table: a comma list of prefix counts, empty for none.
    let only = |var: &str, d: &[usize]| -> Vec<usize> {
        match std::env::var(var) {
            Ok(v) => v
                .split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|x| {
                    x.parse().unwrap_or_else(|_| {
                        panic!("{var}={v}: {x:?} is not a prefix count; give e.g. {var}=10,1000")
                    })
                })
                .collect(),
            Err(_) => d.to_vec(),
        }
    };
    let v4_sizes = &only("IPGUARD_BENCH_V4", v4_sizes)[..];
    let v6_sizes = &only("IPGUARD_BENCH_V6", v6_sizes)[..];
    let mut l = Loaded::with_caps(bench_caps());
    let xf = full.then(XdpFilter::load);
    let mut rows = Vec::new();
    let mut empty = Vec::new();
    let mut load = String::new();
    let mut warm = Vec::new();
    let mut split = Vec::new();
    let sets = v4_sizes
        .iter()
        .map(|&n| (format!("{n} IPv4"), n, true))
        .chain(v6_sizes.iter().map(|&n| (format!("{n} IPv6"), n, false)));
    for (label, n, is_v4) in sets {
        let started = Instant::now();
        let set = if is_v4 {
            v4_set(n, sources, 0x5eed ^ n as u64)
        } else {
            v6_set(n, sources, 0xbeef ^ n as u64)
        };
        if full && n == 1_000_000 {
            let (fresh, swap) = load_times(&set);
            let _ = writeln!(
                load,
                "| 1,000,000 IPv4 prefixes (range table built, then copied in) | {:.3} s | {:.3} s |",
                fresh.as_secs_f64(),
                swap.as_secs_f64(),
            );
        }
        l.apply(&set.policy);
        eprintln!(
            "{label}: {} allowed, {} refused sources ready in {:?}",
            set.allowed.len(),
            set.refused.len(),
            started.elapsed()
        );
        if let Some(x) = &xf {
            x.clear();
            x.allow(&set.allowed);
        }
        for (which, packets, action) in [
            ("allowed", &set.allowed, XDP_PASS),
            ("refused", &set.refused, XDP_DROP),
        ] {
            let e = l.xdp_fd(PROG_BENCH_EMPTY);
            let mut progs = vec![
                (e, Some(XDP_PASS)),
                (l.xdp_fd(PROG_BENCH_PARSE), Some(XDP_PASS)),
                (l.xdp_fd(PROG_BENCH_LOOKUP), Some(action)),
                (l.xdp_fd(PROG_XDP), Some(action)),
            ];
            if let Some(x) = &xf {
                progs.push((x.fd.as_raw_fd(), None));
            }
            let m = measure(&progs, packets, passes);
            empty.push(median(m[0].iter().copied()));
            let (parse, lookup, full_prog) = (
                median(m[1].iter().copied()),
                median(m[2].iter().copied()),
                median(m[3].iter().copied()),
            );
            let over_empty = median(m[3].iter().zip(&m[0]).map(|(f, e)| f - e));
            let xdp_filter = m.get(4).map(|x| median(x.iter().copied()));
            let p0 = &packets[0];
            warm.push(format!(
                "| {label} | {which} | {:.1} | {:.1} | {:.1} | {:.1} |",
                measure_warm(e, p0),
                measure_warm(l.xdp_fd(PROG_BENCH_PARSE), p0),
                measure_warm(l.xdp_fd(PROG_BENCH_LOOKUP), p0),
                measure_warm(l.xdp_fd(PROG_XDP), p0)
            ));
            rows.push(Row {
                label: label.clone(),
                sources: which,
                parse,
                lookup,
                full: full_prog,
                over_empty,
                xdp_filter,
            });
        }
        if is_v4 {
            // The lookup's cost by where it ends, each group on its own:
            // what a row's average is made of (`docs/bench.md`).
            for (which, packets, action) in [
                ("allowed", &set.allowed, XDP_PASS),
                ("refused", &set.refused, XDP_DROP),
            ] {
                for (ends, frames) in v4_ends(&set.policy, packets) {
                    if frames.is_empty() {
                        continue;
                    }
                    let m = measure(
                        &[
                            (l.xdp_fd(PROG_BENCH_PARSE), Some(XDP_PASS)),
                            (l.xdp_fd(PROG_BENCH_LOOKUP), Some(action)),
                        ],
                        &frames,
                        passes,
                    );
                    split.push(format!(
                        "| {label} | {which} | {ends} | {} | {:.0}% | {:.1} |",
                        frames.len(),
                        100.0 * frames.len() as f64 / packets.len() as f64,
                        median(m[1].iter().zip(&m[0]).map(|(k, p)| k - p)),
                    ));
                }
            }
        }
    }
    empty.sort_by(f64::total_cmp);
    let e = empty[empty.len() / 2];
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Kernel {}, {} distinct sources per row, ns per packet (median of {passes} passes, \
         the programs taking turns in each; ipguard − empty: the median of the two's difference \
         in each pass). Empty XDP program: **{e:.1} ns**.\n",
        kernel(),
        sources
    );
    let _ = writeln!(
        t,
        "| prefixes | sources | parse | parse + lookup | ipguard | ipguard − empty | xdp-filter |\n|---|---|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        let _ = writeln!(
            t,
            "| {} | {} | {:.1} | {:.1} | {:.1} | **{:+.1}** | {} |",
            r.label,
            r.sources,
            r.parse,
            r.lookup,
            r.full,
            r.over_empty,
            r.xdp_filter
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "–".into())
        );
    }
    let _ = writeln!(
        t,
        "\nFor comparison only, one packet repeated 10,000 times in the kernel's loop (warm caches, what the target is not about):\n\n\
         | prefixes | source | empty | parse | parse + lookup | ipguard |\n|---|---|---:|---:|---:|---:|\n{}",
        warm.join("\n")
    );
    if !split.is_empty() {
        let _ = writeln!(
            t,
            "\nWhere the IPv4 sources' lookups end, each group measured on its own \
             (parse + lookup − parse, the median of the difference in each pass; alone, a \
             group's lines stay in cache more than among the others):\n\n\
             | prefixes | sources | ends at | count | share | lookup |\n|---|---|---|---:|---:|---:|\n{}",
            split.join("\n")
        );
    }
    if !load.is_empty() {
        let _ = writeln!(
            t,
            "\n| writing a policy | fresh slot | swap (1% changed) |\n|---|---:|---:|\n{load}"
        );
    }
    println!("{t}");
    if let Some(path) = std::env::var_os("IPGUARD_BENCH_OUT") {
        std::fs::write(path, &t).unwrap();
    }
    // Sanity of the measurement itself: each part costs at least what the
    // smaller one does (with noise), and nothing is free.
    assert!(e > 0.0);
    for r in &rows {
        assert!(
            r.full > 0.0 && r.lookup > 0.0 && r.parse > 0.0,
            "zero durations in {}",
            r.label
        );
    }
}

fn kernel() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
