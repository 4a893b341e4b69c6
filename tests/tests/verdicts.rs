//! In-kernel verdict tests: crafted frames run through the loaded XDP
//! program with BPF_PROG_TEST_RUN, each with the XDP action and the
//! (verdict, reason) counter it must move. Covers every rule of policy.md
//! §5, VLAN and QinQ, IPv4 options, fragments, IPv6 extension chains,
//! malformed frames, the RSTs of `action: reject`, return traffic (through
//! the TC egress program, also run with BPF_PROG_TEST_RUN) and events.

mod datapath_util;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use datapath_util::*;
use ipguard::{events::EventReader, policy::Proto};
use ipguard_common::*;
use ipguard_common::{IPPROTO_TCP, IPPROTO_UDP};
use ipguard_tests::frames::*;

const H4: &str = "198.51.100.1";
const H6: &str = "2001:db8:1::1";
// Sources, named by what the base policy says of them.
const A: &str = "198.51.100.2"; // host-wide list
const U: &str = "203.0.113.99"; // nothing
const LL6: &str = "fe80::1"; // a link-local neighbour, in no list
const D: &str = "198.51.100.66"; // deny (inside the allowed /25)
const AA: &str = "203.0.113.250"; // always_allow
const S: &str = "203.0.113.10"; // ssh's own list (and web's)
const W: &str = "203.0.113.5"; // web's own list only
const A6: &str = "2001:db8:1::2";
const U6: &str = "2001:db8:9::9";
const W6: &str = "2001:db8:2::5";

const SSH: u8 = 1;
const WEB: u8 = 2;
const METRICS: u8 = 3;

/// allow: [198.51.100.0/25, 2001:db8:1::/64]; deny: 198.51.100.66;
/// always_allow: 203.0.113.250; services ssh tcp/22 {allow: [S]},
/// web tcp/80,443 udp/443 {allow: [203.0.113.0/28, 2001:db8:2::/64]},
/// metrics tcp/9100-9110 (inherits the host-wide list). Values as the
/// compiler merges them (a prefix carries the bits of its containers).
fn base(cfg: PolicyConfig) -> ipguard::policy::CompiledPolicy {
    let host = 1 | 1 << METRICS;
    policy(
        cfg,
        &[
            ("198.51.100.0/25", value(host, 0, 0)),
            ("2001:db8:1::/64", value(host, 0, 1)),
            ("198.51.100.66/32", value(host, FLAG_DENY, 2)),
            ("203.0.113.250/32", value(0, FLAG_ALWAYS_ALLOW, 3)),
            ("203.0.113.10/32", value(1 << SSH | 1 << WEB, 0, 4)),
            ("203.0.113.0/28", value(1 << WEB, 0, 5)),
            ("2001:db8:2::/64", value(1 << WEB, 0, 6)),
        ],
        &[
            (Proto::Tcp, 22, 22, SSH),
            (Proto::Tcp, 80, 80, WEB),
            (Proto::Tcp, 443, 443, WEB),
            (Proto::Udp, 443, 443, WEB),
            (Proto::Tcp, 9100, 9110, METRICS),
        ],
    )
}

fn host_of(src: &str) -> IpAddr {
    if ip(src).is_ipv4() { ip(H4) } else { ip(H6) }
}

fn tcp(src: &str, dport: u16) -> Pkt {
    Pkt::new(ip(src), host_of(src), L4::syn(40000, dport))
}

fn udp(src: &str, sport: u16, dport: u16) -> Pkt {
    Pkt::new(ip(src), host_of(src), L4::udp(sport, dport))
}

fn icmp(src: &str, ty: u8, code: u8) -> Pkt {
    Pkt::new(ip(src), host_of(src), L4::Icmp { ty, code })
}

/// An MLD message (`ty`) with the router alert hop-by-hop header.
fn mld(src: &str, ty: u8, hops: u8) -> Pkt {
    icmp(src, ty, 0).ext(Ext::HopByHop { units: 0 }).hops(hops)
}

fn raw(src: &str, proto: u8, bytes: &[u8]) -> Pkt {
    Pkt::new(
        ip(src),
        host_of(src),
        L4::Raw {
            proto,
            bytes: bytes.to_vec(),
        },
    )
}

/// An IPv4 frame cut inside its IP header.
fn truncated_ip() -> Vec<u8> {
    ether(ETH_P_IP, &[], &[0x45, 0, 0])
}

struct Case {
    name: String,
    frame: Vec<u8>,
    action: u32,
    verdict: u8,
    reason: u8,
}

fn case(name: impl Into<String>, frame: Vec<u8>, action: u32, verdict: u8, reason: u8) -> Case {
    Case {
        name: name.into(),
        frame,
        action,
        verdict,
        reason,
    }
}

fn pass(name: &str, p: Pkt, reason: u8) -> Case {
    case(name, p.build(), XDP_PASS, VERDICT_PASS, reason)
}

fn drop_(name: &str, p: Pkt, reason: u8) -> Case {
    case(name, p.build(), XDP_DROP, VERDICT_DROP, reason)
}

/// Runs every case and reports all the failures at once.
fn check(l: &mut Loaded, cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let j = l.judge(&c.frame);
        if (j.action, j.verdict, j.reason) != (c.action, c.verdict, c.reason) {
            failures.push(format!(
                "{}: got action {} {}/{}, want action {} {}/{}",
                c.name,
                j.action,
                verdict_name(j.verdict),
                reason_name(j.reason),
                c.action,
                verdict_name(c.verdict),
                reason_name(c.reason)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Summed per kernel by `cargo xtask vm-test`.
    println!("vm-report: corpus-frames {}", cases.len());
}

/// The verifier walks every path of a program, up to 1,000,000
/// instructions, and refuses it past that. The programs are kept within a
/// quarter of the limit, so growth fails here long before a kernel refuses
/// them: before the parser's paths met in one state the XDP program took
/// 487,000, and one changed constant in the parser took it past 1,000,000.
/// Kernels before 5.16 do not say (their verifier is the same in this).
#[test]
fn the_verifier_walks_each_program_within_a_quarter_of_its_limit() {
    let l = Loaded::new();
    let mut said = Vec::new();
    for &(prog, insns) in &l.dp.verified_insns {
        let Some(n) = insns else {
            continue;
        };
        assert!(
            n <= 250_000,
            "{prog}: the verifier processed {n} instructions (limit 1,000,000)"
        );
        said.push(format!("{prog} {n}"));
    }
    if !said.is_empty() {
        // Printed per kernel by `cargo xtask vm-test`.
        println!("vm-report: verified instructions: {}", said.join(", "));
    }
}

/// The verifier inlines a lookup of an array map (a bounds check and an
/// address) only where one call site always names the same map; a site
/// reached with two maps keeps the generic helper, a real call through the
/// map's operations on every packet that takes it. LLVM's tail merging
/// once joined the IPv4 and IPv6 leaf lookups into one such call: every
/// allowed packet paid it, 28 ns of +69 over the empty program at 10
/// prefixes (`lookup_v6` keeps them apart now). Every array map's lookup
/// in both programs must be inlined, on every kernel.
#[test]
fn every_array_lookup_is_inlined() {
    let mut l = Loaded::new();
    let xdp = l.xdp_fd(PROG_XDP);
    let egress = l.egress_fd();
    for (prog, fd) in [(PROG_XDP, xdp), (PROG_EGRESS, egress)] {
        let insns = ipguard_tests::prog_xlated(fd).unwrap();
        let missed = not_inlined_array_lookups(&insns);
        assert!(
            missed.is_empty(),
            "{prog}: array lookups left to the generic helper (instruction, map): {missed:?}; \
             `bpftool prog dump xlated` shows the call each reaches"
        );
    }
}

/// The array maps whose pointer a program loads for a lookup the verifier
/// did not inline: (instruction, map name). In a program as the kernel
/// left it (xlated), a map pointer load names the map's id, and an inlined
/// array lookup starts where the call was, with `r1 += offset of the
/// values`; from each load of an array map into r1, the code is followed
/// through unconditional jumps to that addition or to anything else.
fn not_inlined_array_lookups(insns: &[[u8; 8]]) -> Vec<(usize, String)> {
    use aya::maps::{MapInfo, MapType};
    const LD_IMM64: u8 = 0x18;
    const PSEUDO_MAP_FD: u8 = 1;
    const ADD64_IMM: u8 = 0x07;
    const JA: u8 = 0x05;
    const CLASS_JMP: u8 = 0x05;
    const CLASS_JMP32: u8 = 0x06;
    const R1: u8 = 1;
    let dst = |i: &[u8; 8]| i[1] & 0xf;
    let mut missed = Vec::new();
    for (at, i) in insns.iter().enumerate() {
        if i[0] != LD_IMM64 || dst(i) != R1 || i[1] >> 4 != PSEUDO_MAP_FD {
            continue;
        }
        let id = u32::from_le_bytes([i[4], i[5], i[6], i[7]]);
        let Ok(map) = MapInfo::from_id(id) else {
            continue;
        };
        if !matches!(map.map_type(), Ok(MapType::Array)) {
            continue;
        }
        let mut pc = at + 2;
        let mut inlined = false;
        // Bounded: a lookup's call follows its map load closely.
        for _ in 0..64 {
            let Some(n) = insns.get(pc) else {
                break;
            };
            match n[0] {
                ADD64_IMM if dst(n) == R1 => {
                    inlined = true;
                    break;
                }
                JA => {
                    let off = i16::from_le_bytes([n[2], n[3]]);
                    pc = (pc as i64 + 1 + i64::from(off)) as usize;
                }
                // Any other jump, a call or exit; or r1 overwritten.
                c if c & 0x7 == CLASS_JMP || c & 0x7 == CLASS_JMP32 || dst(n) == R1 => break,
                LD_IMM64 => pc += 2,
                _ => pc += 1,
            }
        }
        if !inlined {
            let name = map.name_as_str().unwrap_or("?").to_string();
            missed.push((at, name));
        }
    }
    missed
}

/// The IPv4 lookup a slot holds is the table the image lays out, in both
/// slots (a slot's ranges and leaves lie at its own bases), the status's
/// memory figures are that table's, and a policy over the capacity is
/// refused with the flag that raises it, leaving the running one.
#[test]
fn the_kernel_holds_the_images_lookup_tables_in_either_slot() {
    let mut l = Loaded::with_caps(ipguard::datapath::Capacities {
        v4: 4096,
        v6: 4096,
        flows: 1024,
    });
    let cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    let nets: Vec<String> = (0..3000u32)
        .map(|i| format!("10.{}.{}.0/24", i / 200, i % 200))
        .chain((0..3000u32).map(|i| format!("2001:db8:{:x}::/48", i * 3)))
        .collect();
    let mut prefixes: Vec<(&str, PrefixValue)> = nets
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), value(1, 0, i as u32 % 7)))
        .collect();
    prefixes.push(("0.0.0.0/0", value(0, FLAG_DENY, 9)));
    prefixes.push(("198.51.100.7/32", value(1, 0, 8)));
    prefixes.push(("::/0", value(0, FLAG_DENY, 9)));
    prefixes.push(("2001:db8:ffff::7/128", value(1, 0, 8)));
    let p = policy(cfg, &prefixes, &[]);
    let want4 = ipguard::policy::range4::RangeTable4::build(&p.v4);
    let want6 = ipguard::policy::range6::RangeTable6::build(&p.v6);
    // 6,003 ranges (::/0, each /48 and the /128 start one, the /48s and
    // the /128 end one): 2,001 nodes in 7 levels.
    assert_eq!((want6.nodes.len(), want6.levels()), (2001, 7));
    for _ in 0..2 {
        l.apply(&p);
        let slot = l.dp.maps.active_slot().unwrap();
        assert_eq!(
            l.dp.maps.range_table_v4(slot).unwrap(),
            want4,
            "slot {slot}"
        );
        assert_eq!(
            l.dp.maps.range_table_v6(slot).unwrap(),
            want6,
            "slot {slot}"
        );
        let m = l.dp.maps.memory(slot);
        assert_eq!(
            m.ipv4_policy,
            r4_table_bytes(want4.ranges.len() as u32, want4.leaves.len() as u32)
        );
        assert_eq!(
            m.ipv6_policy,
            r6_table_bytes(want6.nodes.len() as u32, want6.leaves.len() as u32)
        );
        assert!(m.ipv4_allocated >= 2 * m.ipv4_policy, "{m:?}");
        assert!(m.ipv6_allocated >= 2 * m.ipv6_policy, "{m:?}");
        assert_eq!(l.dp.maps.prefix_counts(slot), (3002, 3002));
        for (src, verdict, reason) in [
            ("198.51.100.7", VERDICT_PASS, REASON_ALLOWED),
            ("10.14.199.9", VERDICT_PASS, REASON_ALLOWED),
            ("10.15.0.1", VERDICT_DROP, REASON_DENY),
            ("2001:db8:ffff::7", VERDICT_PASS, REASON_ALLOWED),
            ("2001:db8:ffff::8", VERDICT_DROP, REASON_DENY),
            ("2001:db8:0:ffff::1", VERDICT_PASS, REASON_ALLOWED),
            ("2001:db8:1::1", VERDICT_DROP, REASON_DENY),
            ("2001:db8:2325:ffff::", VERDICT_PASS, REASON_ALLOWED),
            ("2001:db8:2326::", VERDICT_DROP, REASON_DENY),
        ] {
            let j = l.judge(&tcp(src, 7000).build());
            assert_eq!((j.verdict, j.reason), (verdict, reason), "{src}");
        }
    }
    let many: Vec<String> = (0..5000u32)
        .map(|i| format!("172.{}.{}.0/24", 16 + i / 256, i % 256))
        .collect();
    let over: Vec<(&str, PrefixValue)> =
        many.iter().map(|n| (n.as_str(), value(1, 0, 1))).collect();
    let e = l.dp.maps.apply(&policy(cfg, &over, &[])).unwrap_err();
    assert!(e.to_string().contains("--ipv4-capacity"), "{e}");
    let many6: Vec<String> = (0..5000u32)
        .map(|i| format!("2001:db8:{i:x}::/48"))
        .collect();
    let over6: Vec<(&str, PrefixValue)> =
        many6.iter().map(|n| (n.as_str(), value(1, 0, 1))).collect();
    let e = l.dp.maps.apply(&policy(cfg, &over6, &[])).unwrap_err();
    assert!(e.to_string().contains("--ipv6-capacity"), "{e}");
    let j = l.judge(&tcp("198.51.100.7", 7000).build());
    assert_eq!(j.verdict, VERDICT_PASS, "the running policy stays");
    let j = l.judge(&tcp("2001:db8:ffff::7", 7000).build());
    assert_eq!(j.verdict, VERDICT_PASS, "the running policy stays");
}

const FRAG_LATER: u16 = 185; // offset 1480 bytes
const FRAG_FIRST: u16 = 0x2000; // more fragments, offset 0

#[test]
fn policy_rules_of_section_5() {
    let mut l = Loaded::new();
    // Step 0: a slot never written passes everything.
    check(
        &mut l,
        &[
            pass("no policy", tcp(U, 7000), REASON_NO_POLICY),
            case(
                "no policy, malformed",
                truncated_ip(),
                XDP_PASS,
                VERDICT_PASS,
                REASON_NO_POLICY,
            ),
        ],
    );

    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    let arp = ether(ETH_P_ARP, &[], &[0u8; 28]);
    let lldp = ether(ETH_P_LLDP, &[], &[0u8; 32]);
    check(
        &mut l,
        &[
            // Step 1: infrastructure, and frames that are not IP.
            case("arp", arp, XDP_PASS, VERDICT_PASS, REASON_NON_IP),
            case("lldp", lldp, XDP_PASS, VERDICT_PASS, REASON_NON_IP),
            pass("ndp ns", icmp(U6, 135, 0), REASON_INFRASTRUCTURE),
            pass("ndp na", icmp(U6, 136, 0), REASON_INFRASTRUCTURE),
            pass("ndp rs..redirect", icmp(U6, 137, 0), REASON_INFRASTRUCTURE),
            drop_(
                "icmpv6 echo is not ndp",
                icmp(U6, 128, 0),
                REASON_NOT_ALLOWED,
            ),
            pass("dhcp reply", udp(U, 67, 68), REASON_INFRASTRUCTURE),
            drop_(
                "udp from 67 to 69 is not dhcp",
                udp(U, 67, 69),
                REASON_NOT_ALLOWED,
            ),
            drop_(
                "udp from 68 to 67 is a request, not a reply",
                udp(U, 68, 67),
                REASON_NOT_ALLOWED,
            ),
            pass("dhcpv6 reply", udp(U6, 547, 546), REASON_INFRASTRUCTURE),
            pass("pmtu v4", icmp(U, 3, 4), REASON_INFRASTRUCTURE),
            drop_(
                "port unreachable is not pmtu",
                icmp(U, 3, 3),
                REASON_NOT_ALLOWED,
            ),
            pass("pmtu v6", icmp(U6, 2, 0), REASON_INFRASTRUCTURE),
            // MLD: link-local, hop limit 1, behind a hop-by-hop header
            // (the router alert option), as routers and hosts send it.
            pass("mld query", mld(LL6, 130, 1), REASON_INFRASTRUCTURE),
            pass("mldv1 report", mld(LL6, 131, 1), REASON_INFRASTRUCTURE),
            pass("mldv1 done", mld(LL6, 132, 1), REASON_INFRASTRUCTURE),
            pass("mldv2 report", mld(LL6, 143, 1), REASON_INFRASTRUCTURE),
            drop_(
                "mld from a global address is not mld",
                mld(U6, 143, 1),
                REASON_NOT_ALLOWED,
            ),
            drop_(
                "mld with a hop limit above 1 is not mld",
                mld(LL6, 143, 2),
                REASON_NOT_ALLOWED,
            ),
            drop_(
                "icmpv6 echo from link-local stays subject to the lists",
                icmp(LL6, 128, 0).hops(1),
                REASON_NOT_ALLOWED,
            ),
            // Deny wins over the exemptions (they once passed a denied
            // source's DHCP reply and "fragmentation needed").
            drop_("deny beats the dhcp exemption", udp(D, 67, 68), REASON_DENY),
            drop_("deny beats the pmtu exemption", icmp(D, 3, 4), REASON_DENY),
            pass(
                "always_allow before the exemption",
                icmp(AA, 3, 4),
                REASON_ALWAYS_ALLOW,
            ),
            // Step 3 and 4.
            pass("always_allow", tcp(AA, 22), REASON_ALWAYS_ALLOW),
            pass("always_allow udp", udp(AA, 5353, 53), REASON_ALWAYS_ALLOW),
            drop_("deny inside an allowed prefix", tcp(D, 7000), REASON_DENY),
            drop_("deny beats a service", tcp(D, 9105), REASON_DENY),
            // Step 5 to 7, host-wide list.
            pass("allowed v4", tcp(A, 7000), REASON_ALLOWED),
            drop_("unlisted v4", tcp(U, 7000), REASON_NOT_ALLOWED),
            pass("allowed v6", tcp(A6, 7000), REASON_ALLOWED),
            drop_("unlisted v6", tcp(U6, 7000), REASON_NOT_ALLOWED),
            pass("icmp allowed", icmp(A, 8, 0), REASON_ALLOWED),
            drop_("icmp unlisted", icmp(U, 8, 0), REASON_NOT_ALLOWED),
            // Services with their own list replace the host-wide one.
            drop_(
                "ssh refuses the host-wide list",
                tcp(A, 22),
                REASON_NOT_ALLOWED,
            ),
            pass("ssh allows its own", tcp(S, 22), REASON_ALLOWED),
            drop_(
                "ssh's own is not host-wide",
                tcp(S, 7000),
                REASON_NOT_ALLOWED,
            ),
            pass("web tcp/80", tcp(W, 80), REASON_ALLOWED),
            pass("web tcp/443", tcp(W, 443), REASON_ALLOWED),
            pass("web udp/443", udp(W, 40000, 443), REASON_ALLOWED),
            drop_(
                "udp/444 is no service",
                udp(W, 40000, 444),
                REASON_NOT_ALLOWED,
            ),
            drop_(
                "web refuses the host-wide list",
                tcp(A, 80),
                REASON_NOT_ALLOWED,
            ),
            pass("web v6", tcp(W6, 443), REASON_ALLOWED),
            drop_("web v6 unlisted", tcp(U6, 443), REASON_NOT_ALLOWED),
            // A service without a list inherits the host-wide one.
            pass("metrics inherits", tcp(A, 9105), REASON_ALLOWED),
            pass("metrics range end", tcp(A6, 9110), REASON_ALLOWED),
            drop_("metrics refuses others", tcp(W, 9100), REASON_NOT_ALLOWED),
            // Step 5: fragments, judged by the source only.
            pass(
                "later fragment, host-wide",
                tcp(A, 7000).frag(FRAG_LATER),
                REASON_FRAGMENT,
            ),
            pass(
                "later fragment, a service's list",
                tcp(S, 7000).frag(FRAG_LATER),
                REASON_FRAGMENT,
            ),
            pass(
                "later fragment, web's list",
                udp(W, 1, 2).frag(FRAG_LATER),
                REASON_FRAGMENT,
            ),
            drop_(
                "later fragment, unlisted",
                tcp(U, 80).frag(FRAG_LATER),
                REASON_FRAGMENT,
            ),
            drop_(
                "later fragment, denied",
                tcp(D, 80).frag(FRAG_LATER),
                REASON_DENY,
            ),
            pass(
                "later fragment, always_allow",
                tcp(AA, 80).frag(FRAG_LATER),
                REASON_ALWAYS_ALLOW,
            ),
            pass(
                "first fragment, by its ports",
                tcp(W, 80).frag(FRAG_FIRST),
                REASON_ALLOWED,
            ),
            drop_(
                "first fragment, by its ports (refused)",
                tcp(W, 7000).frag(FRAG_FIRST),
                REASON_NOT_ALLOWED,
            ),
            pass(
                "v6 later fragment, allowed",
                tcp(A6, 7000).ext(Ext::Fragment {
                    offset: 100,
                    more: false,
                }),
                REASON_FRAGMENT,
            ),
            drop_(
                "v6 later fragment, unlisted",
                tcp(U6, 80).ext(Ext::Fragment {
                    offset: 100,
                    more: true,
                }),
                REASON_FRAGMENT,
            ),
            pass(
                "v6 first fragment, by its ports",
                tcp(W6, 80).ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                }),
                REASON_ALLOWED,
            ),
            drop_(
                "v6 first fragment, refused by its ports",
                tcp(W6, 7000).ext(Ext::Fragment {
                    offset: 0,
                    more: true,
                }),
                REASON_NOT_ALLOWED,
            ),
            // Protocols without ports.
            pass(
                "esp allowed",
                raw(A6, IPPROTO_ESP, &[0u8; 16]),
                REASON_ALLOWED,
            ),
            drop_(
                "esp unlisted",
                raw(U6, IPPROTO_ESP, &[0u8; 16]),
                REASON_NOT_ALLOWED,
            ),
            pass("no next header", raw(A6, IPPROTO_NONE, &[]), REASON_ALLOWED),
            drop_(
                "gre unlisted",
                raw(U, IPPROTO_GRE, &[0u8; 8]),
                REASON_NOT_ALLOWED,
            ),
        ],
    );

    // Without the infrastructure exemptions, those packets are judged.
    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.infra = 0;
    l.apply(&base(cfg));
    check(
        &mut l,
        &[
            drop_("ndp when not exempt", icmp(U6, 135, 0), REASON_NOT_ALLOWED),
            drop_("dhcp when not exempt", udp(U, 67, 68), REASON_NOT_ALLOWED),
            drop_("pmtu when not exempt", icmp(U, 3, 4), REASON_NOT_ALLOWED),
            drop_("mld when not exempt", mld(LL6, 143, 1), REASON_NOT_ALLOWED),
            pass(
                "ndp from an allowed source",
                icmp(A6, 135, 0),
                REASON_ALLOWED,
            ),
        ],
    );

    // Step 6: scope services.
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_SERVICES)));
    check(
        &mut l,
        &[
            pass(
                "no service, services scope",
                tcp(U, 7000),
                REASON_OUT_OF_SCOPE,
            ),
            pass("icmp, services scope", icmp(U, 8, 0), REASON_OUT_OF_SCOPE),
            drop_("a service still judges", tcp(U, 80), REASON_NOT_ALLOWED),
            pass("a service still allows", tcp(W, 80), REASON_ALLOWED),
            drop_(
                "fragments come before scope",
                tcp(U, 7000).frag(FRAG_LATER),
                REASON_FRAGMENT,
            ),
            drop_("deny comes before scope", tcp(D, 7000), REASON_DENY),
        ],
    );

    // Modes.
    l.apply(&base(config(MODE_MONITOR, ACTION_REJECT, SCOPE_HOST)));
    check(
        &mut l,
        &[
            case(
                "monitor passes",
                tcp(U, 7000).build(),
                XDP_PASS,
                VERDICT_WOULD_DROP,
                REASON_NOT_ALLOWED,
            ),
            case(
                "monitor, deny",
                tcp(D, 80).build(),
                XDP_PASS,
                VERDICT_WOULD_DROP,
                REASON_DENY,
            ),
            case(
                "monitor, malformed",
                truncated_ip(),
                XDP_PASS,
                VERDICT_WOULD_DROP,
                REASON_MALFORMED,
            ),
            pass("monitor, allowed", tcp(A, 7000), REASON_ALLOWED),
        ],
    );
    l.apply(&base(config(MODE_OFF, ACTION_DROP, SCOPE_HOST)));
    check(
        &mut l,
        &[
            pass("off", tcp(U, 7000), REASON_OFF),
            pass("off, deny", tcp(D, 7000), REASON_OFF),
            case(
                "off, malformed",
                truncated_ip(),
                XDP_PASS,
                VERDICT_PASS,
                REASON_OFF,
            ),
            pass(
                "off: infrastructure passes as everything does",
                icmp(U6, 135, 0),
                REASON_OFF,
            ),
        ],
    );
    l.apply(&base(config(MODE_ENFORCE, ACTION_REJECT, SCOPE_HOST)));
    check(
        &mut l,
        &[
            case(
                "reject tcp",
                tcp(U, 7000).build(),
                XDP_TX,
                VERDICT_REJECT,
                REASON_NOT_ALLOWED,
            ),
            case(
                "reject tcp, deny",
                tcp(D, 22).build(),
                XDP_TX,
                VERDICT_REJECT,
                REASON_DENY,
            ),
            case(
                "reject v6",
                tcp(U6, 7000).build(),
                XDP_TX,
                VERDICT_REJECT,
                REASON_NOT_ALLOWED,
            ),
            drop_("reject drops udp", udp(U, 1000, 7000), REASON_NOT_ALLOWED),
            drop_("reject drops icmp", icmp(U, 8, 0), REASON_NOT_ALLOWED),
            drop_(
                "reject drops a later fragment",
                tcp(U, 7000).frag(FRAG_LATER),
                REASON_FRAGMENT,
            ),
            drop_(
                "reject drops a first fragment",
                tcp(U, 7000).frag(FRAG_FIRST),
                REASON_NOT_ALLOWED,
            ),
            pass("reject passes allowed", tcp(A, 7000), REASON_ALLOWED),
        ],
    );
}

#[test]
fn service_and_entry_counters() {
    let mut l = Loaded::new();
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    let slot = l.dp.maps.active_slot().unwrap();
    let svc0 = l.dp.maps.service_counters().unwrap();
    let hits0 = l.dp.maps.entry_hits(slot, 7).unwrap();
    for f in [
        tcp(S, 22),
        tcp(S, 22),
        tcp(A, 22),
        tcp(A, 7000),
        tcp(W, 80),
        tcp(U, 7000),
        tcp(D, 7000),
    ] {
        l.judge(&f.build());
    }
    let svc = l.dp.maps.service_counters().unwrap();
    let hits = l.dp.maps.entry_hits(slot, 7).unwrap();
    let d = |i: usize| (svc[i].0 - svc0[i].0, svc[i].1 - svc0[i].1);
    assert_eq!(d(SSH as usize), (2, 1), "ssh passed/refused");
    assert_eq!(d(WEB as usize), (1, 0), "web passed/refused");
    assert_eq!(d(0), (1, 2), "no service passed/refused");
    let h: Vec<u64> = hits.iter().zip(&hits0).map(|(a, b)| a - b).collect();
    // entries: 0 the /25 (A, to 7000; A to ssh's port is refused and
    // credits no entry although A's prefix matched), 2 deny (D), 4 S,
    // 5 web's /28 (W); U has none.
    assert_eq!(h, vec![1, 0, 1, 0, 2, 1, 0], "hits per entry");
}

#[test]
fn passed_packets_are_sampled_with_their_port_and_refused_ones_never() {
    use ipguard::{daemon::passed, policy::Proto};
    // BPF_PROG_TEST_RUN runs on the calling CPU: one CPU, one counter.
    let mut one = nix::sched::CpuSet::new();
    one.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
    let mut l = Loaded::new();
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    for _ in 0..20 {
        assert_eq!(l.judge(&udp(U, 40000, 7000).build()).verdict, VERDICT_DROP);
    }
    // The first pass of its reason is sampled, then one in
    // PASS_SAMPLE_EVERY.
    l.judge(&udp(A, 40000, 5353).build());
    for _ in 1..PASS_SAMPLE_EVERY {
        l.judge(&tcp(A, 7000).build());
    }
    l.judge(&tcp(A, 7001).build());
    let map = passed::open(&l.pins.path).expect("the pinned sample");
    let mut got: Vec<(u64, passed::Seen)> = passed::read(&map)
        .into_iter()
        .filter(|(_, _, s)| s.seq != 0)
        .map(|(_, _, s)| (s.seq, passed::seen_of(&s)))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (1, (ip(A), Some((Proto::Udp, 5353)))),
            (PASS_SAMPLE_EVERY + 1, (ip(A), Some((Proto::Tcp, 7001)))),
        ]
    );
}

#[test]
fn vlans_options_and_extension_chains() {
    let mut l = Loaded::new();
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    let six = |p: Pkt| {
        p.ext(Ext::HopByHop { units: 0 })
            .ext(Ext::DestOpts { units: 1 })
            .ext(Ext::Routing { units: 2 })
            .ext(Ext::DestOpts { units: 0 })
            .ext(Ext::Ah { len: 4 })
            .ext(Ext::Fragment {
                offset: 0,
                more: false,
            })
    };
    let hbh_loop = |p: Pkt, n: usize| (0..n).fold(p, |p, _| p.ext(Ext::HopByHop { units: 0 }));
    let dst_loop = |p: Pkt, n: usize| (0..n).fold(p, |p, _| p.ext(Ext::DestOpts { units: 0 }));
    check(
        &mut l,
        &[
            pass("802.1Q", tcp(A, 7000).vlan(ETH_P_8021Q, 10), REASON_ALLOWED),
            drop_(
                "802.1Q refused",
                tcp(U, 7000).vlan(ETH_P_8021Q, 10),
                REASON_NOT_ALLOWED,
            ),
            pass(
                "802.1ad alone",
                tcp(W, 80).vlan(ETH_P_8021AD, 7),
                REASON_ALLOWED,
            ),
            pass(
                "QinQ",
                tcp(A6, 7000).vlan(ETH_P_8021AD, 100).vlan(ETH_P_8021Q, 200),
                REASON_ALLOWED,
            ),
            drop_(
                "QinQ refused",
                tcp(U, 80).vlan(ETH_P_8021AD, 100).vlan(ETH_P_8021Q, 200),
                REASON_NOT_ALLOWED,
            ),
            drop_(
                "three tags hide the packet: malformed",
                tcp(A, 7000)
                    .vlan(ETH_P_8021AD, 1)
                    .vlan(ETH_P_8021Q, 2)
                    .vlan(ETH_P_8021Q, 3),
                REASON_MALFORMED,
            ),
            case(
                "arp behind a tag",
                ether(ETH_P_ARP, &[(ETH_P_8021Q, 5)], &[0u8; 28]),
                XDP_PASS,
                VERDICT_PASS,
                REASON_NON_IP,
            ),
            pass(
                "ipv4 options (NOP NOP NOP EOL)",
                tcp(A, 7000).options(&[1, 1, 1, 0]),
                REASON_ALLOWED,
            ),
            pass(
                "ipv4 40 bytes of options (IHL 15)",
                tcp(W, 80).options(&[1; 40]),
                REASON_ALLOWED,
            ),
            drop_(
                "ipv4 options, refused by port",
                tcp(W, 7000).options(&[1; 40]),
                REASON_NOT_ALLOWED,
            ),
            pass(
                "ipv4 options + QinQ + udp",
                udp(W, 1, 443)
                    .options(&[1; 8])
                    .vlan(ETH_P_8021AD, 1)
                    .vlan(ETH_P_8021Q, 2),
                REASON_ALLOWED,
            ),
            pass(
                "hop-by-hop",
                tcp(W6, 80).ext(Ext::HopByHop { units: 0 }),
                REASON_ALLOWED,
            ),
            pass(
                "hop-by-hop, dest opts, routing",
                tcp(W6, 80)
                    .ext(Ext::HopByHop { units: 1 })
                    .ext(Ext::DestOpts { units: 0 })
                    .ext(Ext::Routing { units: 2 }),
                REASON_ALLOWED,
            ),
            drop_(
                "the chain reaches the port: refused",
                tcp(W6, 7000)
                    .ext(Ext::HopByHop { units: 1 })
                    .ext(Ext::Routing { units: 2 }),
                REASON_NOT_ALLOWED,
            ),
            pass(
                "authentication header",
                tcp(W6, 443).ext(Ext::Ah { len: 4 }),
                REASON_ALLOWED,
            ),
            drop_(
                "authentication header, refused",
                tcp(U6, 443).ext(Ext::Ah { len: 1 }),
                REASON_NOT_ALLOWED,
            ),
            pass(
                "six headers reach the port",
                six(tcp(W6, 80)),
                REASON_ALLOWED,
            ),
            drop_(
                "six headers reach the port (refused)",
                six(tcp(W6, 7000)),
                REASON_NOT_ALLOWED,
            ),
            // Seven headers are walked (up to eight are): judged by port.
            drop_(
                "seven headers, web-only source to a host-wide port",
                six(tcp(W6, 7000)).ext(Ext::DestOpts { units: 0 }),
                REASON_NOT_ALLOWED,
            ),
            pass(
                "seven headers, web-only source to web",
                six(tcp(W6, 80)).ext(Ext::DestOpts { units: 0 }),
                REASON_ALLOWED,
            ),
            drop_(
                "seven headers from an unlisted source",
                six(tcp(U6, 80)).ext(Ext::DestOpts { units: 0 }),
                REASON_NOT_ALLOWED,
            ),
            // More headers than the parser walks hide the upper layer: a
            // complete datagram like that is malformed, whoever sends it
            // (it used to be judged like a fragment, by source alone).
            drop_(
                "a loop of hop-by-hop headers (allowed source): malformed",
                hbh_loop(tcp(A6, 7000), 12),
                REASON_MALFORMED,
            ),
            drop_(
                "a loop of hop-by-hop headers (unlisted)",
                hbh_loop(udp(U6, 1, 2), 12),
                REASON_MALFORMED,
            ),
            pass(
                "exactly six in a loop",
                hbh_loop(tcp(A6, 7000), 6),
                REASON_ALLOWED,
            ),
            pass(
                "eight, the most the parser walks",
                hbh_loop(tcp(A6, 7000), 8),
                REASON_ALLOWED,
            ),
            drop_(
                "nine: the upper layer is out of reach",
                hbh_loop(tcp(A6, 7000), 9),
                REASON_MALFORMED,
            ),
            // The side door: ssh allows one admin, web allows W6; nine
            // destination options once got W6's SYN to tcp/22 through.
            drop_(
                "eight destination options to ssh from a web-only source",
                dst_loop(tcp(W6, 22), 8),
                REASON_NOT_ALLOWED,
            ),
            drop_(
                "nine destination options to ssh from a web-only source",
                dst_loop(tcp(W6, 22), 9),
                REASON_MALFORMED,
            ),
            pass(
                "a non-first fragment behind seven headers: judged by source",
                hbh_loop(tcp(A6, 7000), 7).ext(Ext::Fragment {
                    offset: 100,
                    more: false,
                }),
                REASON_FRAGMENT,
            ),
            pass(
                "dhcpv6 behind extension headers",
                udp(U6, 547, 546).ext(Ext::HopByHop { units: 0 }),
                REASON_INFRASTRUCTURE,
            ),
            pass(
                "ndp behind a tag",
                icmp(U6, 135, 0).vlan(ETH_P_8021Q, 4),
                REASON_INFRASTRUCTURE,
            ),
        ],
    );
}

/// Overwrites bytes of a built frame.
fn patch(mut f: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    f[at..at + bytes.len()].copy_from_slice(bytes);
    f
}

#[test]
fn malformed_frames_are_dropped_and_counted() {
    let mut l = Loaded::new();
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    let mal = |name: String, f: Vec<u8>| case(name, f, XDP_DROP, VERDICT_DROP, REASON_MALFORMED);
    let mut cases = Vec::new();
    // Truncated at every length (so at every header boundary): the IP
    // length then exceeds the frame, or a header is cut. The kernel refuses
    // test frames shorter than an Ethernet header, as no NIC delivers them.
    let full = [
        ("v4 tcp", tcp(A, 7000).build()),
        (
            "v4 tcp + options + QinQ",
            tcp(A, 7000)
                .options(&[1; 12])
                .vlan(ETH_P_8021AD, 1)
                .vlan(ETH_P_8021Q, 2)
                .build(),
        ),
        ("v4 udp", udp(A, 1, 2).build()),
        ("v4 icmp", icmp(A, 8, 0).build()),
        ("v6 tcp", tcp(A6, 7000).build()),
        ("v6 udp", udp(A6, 1, 2).build()),
        ("v6 tcp + extensions", six(tcp(A6, 7000)).build()),
        ("v6 udp + vlan", udp(A6, 1, 2).vlan(ETH_P_8021Q, 9).build()),
        ("v6 icmp", icmp(A6, 128, 0).build()),
    ];
    for (name, f) in &full {
        for len in 14..f.len() {
            cases.push(mal(format!("{name} cut to {len} bytes"), f[..len].to_vec()));
        }
    }
    let v4 = tcp(A, 7000).build();
    for ihl in 0..5u8 {
        cases.push(mal(
            format!("IHL {ihl}"),
            patch(v4.clone(), 14, &[0x40 | ihl]),
        ));
    }
    cases.push(mal(
        "IPv4 version 6 in an IPv4 frame".into(),
        patch(v4.clone(), 14, &[0x65]),
    ));
    cases.push(mal(
        "IPv4 total length below IHL".into(),
        patch(v4.clone(), 16, &19u16.to_be_bytes()),
    ));
    cases.push(mal(
        "IPv4 total length past the frame".into(),
        patch(v4.clone(), 16, &1500u16.to_be_bytes()),
    ));
    cases.push(mal(
        "IPv4 total length cuts the TCP header (tiny fragment)".into(),
        patch(v4.clone(), 16, &30u16.to_be_bytes()),
    ));
    cases.push(mal(
        "IPv4 total length cuts the UDP header".into(),
        patch(udp(A, 1, 2).build(), 16, &27u16.to_be_bytes()),
    ));
    cases.push(mal(
        "IPv4 options past the total length".into(),
        patch(patch(v4.clone(), 14, &[0x4f]), 16, &40u16.to_be_bytes()),
    ));
    cases.push(mal(
        "tiny first fragment".into(),
        patch(
            patch(v4.clone(), 16, &28u16.to_be_bytes()),
            20,
            &FRAG_FIRST.to_be_bytes(),
        ),
    ));
    let v6 = tcp(A6, 7000).build();
    cases.push(mal(
        "IPv6 version 4 in an IPv6 frame".into(),
        patch(v6.clone(), 14, &[0x40]),
    ));
    cases.push(mal(
        "IPv6 payload length past the frame".into(),
        patch(v6.clone(), 18, &100u16.to_be_bytes()),
    ));
    cases.push(mal(
        "IPv6 payload length cuts TCP".into(),
        patch(v6.clone(), 18, &10u16.to_be_bytes()),
    ));
    cases.push(mal(
        "IPv6 payload length cuts UDP".into(),
        patch(udp(A6, 1, 2).build(), 18, &7u16.to_be_bytes()),
    ));
    let ext = tcp(A6, 7000).ext(Ext::HopByHop { units: 0 }).build();
    cases.push(mal(
        "extension header length past the datagram".into(),
        patch(ext.clone(), 55, &[200]),
    ));
    cases.push(mal(
        "AH length past the datagram".into(),
        patch(tcp(A6, 7000).ext(Ext::Ah { len: 1 }).build(), 55, &[250]),
    ));
    let f = icmp(A, 8, 0).build();
    cases.push(mal(
        "ICMP cut by its IP length".into(),
        patch(f, 16, &22u16.to_be_bytes()),
    ));
    check(&mut l, &cases);

    // Ethernet padding past the IP datagram is not malformed, nor is a
    // datagram exactly as long as its headers; don't-fragment is no
    // fragment. (These take the parser's short path for plain frames, the
    // cases above its edges into the full parser.)
    let padded = |mut f: Vec<u8>| {
        f.extend_from_slice(&[0u8; 6]);
        f
    };
    let ok = |name: &str, f: Vec<u8>| case(name, f, XDP_PASS, VERDICT_PASS, REASON_ALLOWED);
    check(
        &mut l,
        &[
            ok("padded v4 tcp", padded(tcp(A, 7000).build())),
            ok("padded v4 udp", padded(udp(A, 1, 2).build())),
            ok("padded v6 tcp", padded(tcp(A6, 7000).build())),
            ok("padded v6 udp", padded(udp(A6, 1, 2).build())),
            ok(
                "v4 tcp with don't-fragment",
                patch(v4.clone(), 20, &0x4000u16.to_be_bytes()),
            ),
        ],
    );
}

fn six(p: Pkt) -> Pkt {
    p.ext(Ext::HopByHop { units: 0 })
        .ext(Ext::DestOpts { units: 1 })
        .ext(Ext::Routing { units: 2 })
        .ext(Ext::DestOpts { units: 0 })
        .ext(Ext::Ah { len: 4 })
        .ext(Ext::Fragment {
            offset: 0,
            more: false,
        })
}

#[test]
fn reject_answers_with_a_correct_rst() {
    let mut l = Loaded::new();
    l.apply(&base(config(MODE_ENFORCE, ACTION_REJECT, SCOPE_HOST)));
    let seg = |src: &str, seq: u32, ack: u32, flags: u8, payload: usize| {
        Pkt::new(
            ip(src),
            host_of(src),
            L4::Tcp {
                sport: 40123,
                dport: 7000,
                seq,
                ack,
                flags,
                payload: vec![0xab; payload],
            },
        )
    };
    // (name, frame, expected seq, ack, flags of the RST)
    let cases: Vec<(&str, Pkt, u32, u32, u8)> = vec![
        (
            "v4 syn",
            seg(U, 1_000_000, 0, TCP_SYN, 0),
            0,
            1_000_001,
            TCP_RST | TCP_ACK,
        ),
        (
            "v4 syn with data (fast open)",
            seg(U, 5, 0, TCP_SYN, 20),
            0,
            26,
            TCP_RST | TCP_ACK,
        ),
        (
            "v4 data with ack",
            seg(U, 5000, 777, TCP_ACK | TCP_PSH, 100),
            777,
            0,
            TCP_RST,
        ),
        ("v4 fin", seg(U, 9, 0, TCP_FIN, 3), 0, 13, TCP_RST | TCP_ACK),
        (
            "v4 seq wraps",
            seg(U, u32::MAX, 0, TCP_SYN, 0),
            0,
            0,
            TCP_RST | TCP_ACK,
        ),
        (
            "v4 options and QinQ",
            seg(U, 42, 0, TCP_SYN, 0)
                .options(&[1; 12])
                .vlan(ETH_P_8021AD, 11)
                .vlan(ETH_P_8021Q, 22),
            0,
            43,
            TCP_RST | TCP_ACK,
        ),
        ("v6 syn", seg(U6, 7, 0, TCP_SYN, 0), 0, 8, TCP_RST | TCP_ACK),
        (
            "v6 extension headers and data",
            seg(U6, 100, 55, TCP_ACK, 64)
                .ext(Ext::HopByHop { units: 1 })
                .ext(Ext::DestOpts { units: 0 }),
            55,
            0,
            TCP_RST,
        ),
        (
            "denied source",
            seg(D, 1, 0, TCP_SYN, 0),
            0,
            2,
            TCP_RST | TCP_ACK,
        ),
    ];
    for (name, p, seq, ack, flags) in cases {
        let mut frame = p.build();
        if name == "v4 syn" {
            // Ethernet padding must be cut off too.
            frame.extend_from_slice(&[0u8; 8]);
        }
        let j = l.judge(&frame);
        assert_eq!((j.action, j.verdict), (XDP_TX, VERDICT_REJECT), "{name}");
        let rst = read_tcp(&j.out).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(rst.eth_dst, MAC_PEER, "{name}: MACs swapped");
        assert_eq!(rst.eth_src, MAC_HOST, "{name}: MACs swapped");
        assert_eq!(rst.vlans, p.vlans, "{name}: tags kept");
        assert_eq!(
            (rst.src, rst.dst),
            (p.dst, p.src),
            "{name}: addresses swapped"
        );
        assert_eq!(
            (rst.sport, rst.dport),
            (7000, 40123),
            "{name}: ports swapped"
        );
        assert_eq!(
            (rst.seq, rst.ack, rst.flags),
            (seq, ack, flags),
            "{name}: seq/ack/flags"
        );
        assert_eq!(rst.payload_len, 0, "{name}: payload cut");
        assert_eq!(rst.trailing, 0, "{name}: nothing past the datagram");
        assert!(rst.ip_checksum_ok, "{name}: IPv4 checksum");
        assert!(rst.tcp_checksum_ok, "{name}: TCP checksum");
        assert_eq!(rst.ttl, 64, "{name}: TTL");
        let l3 = 14 + 4 * p.vlans.len();
        let ip_len = if p.src.is_ipv4() { 20 } else { 40 };
        assert_eq!(j.out.len(), l3 + ip_len + 20, "{name}: frame length");
    }
    // Never answer a RST, nor a segment whose header is bogus.
    let rst = seg(U, 1, 2, TCP_RST | TCP_ACK, 0).build();
    let j = l.judge(&rst);
    assert_eq!(
        (j.action, j.verdict),
        (XDP_DROP, VERDICT_DROP),
        "a RST is dropped, not answered"
    );
    let mut bogus = seg(U, 1, 0, TCP_SYN, 0).build();
    bogus[14 + 20 + 12] = 0x40; // data offset 4 words
    let j = l.judge(&bogus);
    assert_eq!(
        (j.action, j.verdict),
        (XDP_DROP, VERDICT_DROP),
        "bogus data offset"
    );
}

/// The TC egress program, run like the XDP one: what it records from a
/// packet leaving the host.
fn egress(l: &mut Loaded, frame: &[u8]) {
    let p = l.dp.egress_program().expect("egress program");
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN of the egress program");
    assert_eq!(
        r.return_value as i32, -1,
        "the egress program only observes (TC_ACT_UNSPEC)"
    );
}

fn seg(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Pkt::new(
        ip(src),
        ip(dst),
        L4::Tcp {
            sport,
            dport,
            seq: 1,
            ack: 0,
            flags,
            payload: Vec::new(),
        },
    )
    .build()
}

fn dgram(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    Pkt::new(ip(src), ip(dst), L4::udp(sport, dport)).build()
}

#[test]
fn return_traffic_of_connections_the_host_opened() {
    let mut l = Loaded::new();
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    let synack = TCP_SYN | TCP_ACK;
    let reply = |l: &mut Loaded, f: Vec<u8>| {
        let j = l.judge(&f);
        (j.action, j.reason)
    };
    // Before the host opens anything, the peer is refused.
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50000, synack)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    egress(&mut l, &seg(H4, U, 50000, 443, TCP_SYN));
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50000, synack)),
        (XDP_PASS, REASON_RETURN_TRAFFIC)
    );
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50000, TCP_ACK)),
        (XDP_PASS, REASON_RETURN_TRAFFIC)
    );
    // Only that exact connection.
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50001, synack)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    assert_eq!(
        reply(&mut l, seg(U, H4, 444, 50000, synack)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    assert_eq!(
        reply(&mut l, seg(U, "198.51.100.9", 443, 50000, synack)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    assert_eq!(
        reply(&mut l, dgram(U, H4, 443, 50000)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    // The peer opening a connection of its own is still refused.
    assert_eq!(
        reply(&mut l, seg(U, H4, 50000, 443, TCP_SYN)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    // Answering an inbound connection is not opening one.
    egress(&mut l, &seg(H4, U, 22, 41000, synack));
    egress(&mut l, &seg(H4, U, 22, 41000, TCP_ACK));
    assert_eq!(
        reply(&mut l, seg(U, H4, 41000, 22, TCP_ACK)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    // UDP: any datagram the host sends (DNS, NTP...).
    egress(&mut l, &dgram(H4, U, 53000, 53));
    assert_eq!(
        reply(&mut l, dgram(U, H4, 53, 53000)),
        (XDP_PASS, REASON_RETURN_TRAFFIC)
    );
    // IPv6, behind a VLAN tag.
    let tagged = |src: &str, dst: &str, sport, dport, flags| {
        Pkt::new(
            ip(src),
            ip(dst),
            L4::Tcp {
                sport,
                dport,
                seq: 1,
                ack: 0,
                flags,
                payload: Vec::new(),
            },
        )
        .vlan(ETH_P_8021Q, 3)
        .build()
    };
    egress(&mut l, &tagged(H6, U6, 50000, 443, TCP_SYN));
    assert_eq!(
        reply(&mut l, tagged(U6, H6, 443, 50000, synack)),
        (XDP_PASS, REASON_RETURN_TRAFFIC)
    );
    assert_eq!(
        reply(&mut l, tagged(U6, H6, 443, 50009, synack)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    // An explicit deny wins over return traffic.
    egress(&mut l, &seg(H4, D, 50000, 443, TCP_SYN));
    assert_eq!(
        reply(&mut l, seg(D, H4, 443, 50000, synack)),
        (XDP_DROP, REASON_DENY)
    );
    // Monitor mode: the reply is a pass, not a would_drop.
    l.apply(&base(config(MODE_MONITOR, ACTION_DROP, SCOPE_HOST)));
    let j = l.judge(&seg(U, H4, 443, 50000, TCP_ACK));
    assert_eq!(
        (j.action, j.verdict, j.reason),
        (XDP_PASS, VERDICT_PASS, REASON_RETURN_TRAFFIC)
    );

    // Turned off: nothing is recorded and replies are judged as any packet.
    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.infra &= !INFRA_RETURN_TRAFFIC;
    l.apply(&base(cfg));
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50000, synack)),
        (XDP_DROP, REASON_NOT_ALLOWED)
    );
    egress(&mut l, &seg(H4, U, 50100, 443, TCP_SYN));
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50100, synack)),
        (XDP_DROP, REASON_NOT_ALLOWED),
        "recorded while return traffic was off"
    );

    // flow_timeout (UDP) and flow_timeout_tcp: a reply after the host
    // last sent plus its protocol's timeout is refused.
    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.flow_timeout_ns = 200_000_000;
    l.apply(&base(cfg));
    egress(&mut l, &seg(H4, U, 50200, 443, TCP_SYN));
    egress(&mut l, &dgram(H4, U, 50200, 53));
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50200, synack)),
        (XDP_PASS, REASON_RETURN_TRAFFIC)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        reply(&mut l, dgram(U, H4, 53, 50200)),
        (XDP_DROP, REASON_NOT_ALLOWED),
        "UDP: past flow_timeout"
    );
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50200, TCP_ACK)),
        (XDP_PASS, REASON_RETURN_TRAFFIC),
        "TCP has its own timeout (1 h by default)"
    );
    cfg.flow_timeout_tcp_ns = 200_000_000;
    l.apply(&base(cfg));
    egress(&mut l, &seg(H4, U, 50201, 443, TCP_SYN));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        reply(&mut l, seg(U, H4, 443, 50201, TCP_ACK)),
        (XDP_DROP, REASON_NOT_ALLOWED),
        "TCP: past flow_timeout_tcp"
    );
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of flow times.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) },
        0
    );
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn flow_key(remote: &str, remote_port: u16, local: &str, local_port: u16, protocol: u8) -> FlowKey {
    let addr = |s: &str| match ip(s) {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    };
    FlowKey {
        remote: addr(remote),
        local: addr(local),
        remote_port,
        local_port,
        protocol,
        family: if ip(remote).is_ipv4() {
            FAMILY_V4
        } else {
            FAMILY_V6
        },
        _pad0: [0; 2],
    }
}

fn flow_map(l: &Loaded) -> aya::maps::HashMap<aya::maps::MapData, FlowKey, u64> {
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
        aya::maps::MapData::from_pin(l.pins.path.join(MAP_FLOWS)).unwrap(),
    ))
    .unwrap()
}

/// Which packets leaving the host record a flow (see `FlowKey`): never an
/// answer from a port that serves (a TCP listener, an unconnected UDP
/// socket outside the ephemeral range, a policy service's port), always a
/// segment of a connection the host opened, even one whose SYN it never
/// saw (evicted, timed out, or opened before ipguard attached). Run in a
/// namespace of its own: socket lookups see the sockets of the namespace
/// the test runs in, and this one has only the test's.
#[test]
fn flows_are_recorded_only_for_connections_the_host_opened() {
    ipguard_tests::require_root();
    let ns = ipguard_tests::Netns::new("ipgflow").unwrap();
    ns.run_in(|| {
        use std::net::{TcpListener, UdpSocket};
        let mut l = Loaded::new();
        let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
        cfg.flow_timeout_ns = 300_000_000;
        l.apply(&base(cfg));
        let _tcp4 = TcpListener::bind("0.0.0.0:7100").unwrap();
        let _tcp6 = TcpListener::bind("[::]:7101").unwrap();
        let _server = UdpSocket::bind("0.0.0.0:5300").unwrap();
        let client = UdpSocket::bind("0.0.0.0:0").unwrap();
        let eph = client.local_addr().unwrap().port();
        let (first, last) = ipguard::datapath::ephemeral_ports();
        assert!((first..=last).contains(&eph), "an ephemeral port");
        let reply = |l: &mut Loaded, f: Vec<u8>| {
            let j = l.judge(&f);
            (j.action, j.reason)
        };
        let refused = (XDP_DROP, REASON_NOT_ALLOWED);
        let passed = (XDP_PASS, REASON_RETURN_TRAFFIC);
        let created = |l: &Loaded| l.dp.maps.flow_stats().unwrap().created;
        let c0 = created(&l);

        // TCP: a listener's answers are not connections the host opened.
        egress(&mut l, &seg(H4, U, 7100, 41000, TCP_SYN | TCP_ACK));
        egress(&mut l, &seg(H4, U, 7100, 41000, TCP_ACK));
        assert_eq!(
            reply(&mut l, seg(U, H4, 41000, 7100, TCP_ACK)),
            refused,
            "listener"
        );
        egress(&mut l, &seg(H6, U6, 7101, 41000, TCP_ACK));
        assert_eq!(
            reply(&mut l, seg(U6, H6, 41000, 7101, TCP_ACK)),
            refused,
            "IPv6 listener"
        );
        // A segment of a connection the host opened without a flow (its
        // SYN was never seen) gets one back; a RST does not.
        egress(&mut l, &seg(H4, U, 50300, 443, TCP_ACK));
        assert_eq!(
            reply(&mut l, seg(U, H4, 443, 50300, TCP_ACK)),
            passed,
            "re-created"
        );
        egress(&mut l, &seg(H6, U6, 50300, 443, TCP_ACK | TCP_FIN));
        assert_eq!(
            reply(&mut l, seg(U6, H6, 443, 50300, TCP_ACK)),
            passed,
            "IPv6 re-created"
        );
        egress(&mut l, &seg(H4, U, 50301, 443, TCP_RST | TCP_ACK));
        assert_eq!(
            reply(&mut l, seg(U, H4, 443, 50301, TCP_ACK)),
            refused,
            "RST"
        );

        // UDP: a server socket's answers are not flows; a client's are,
        // connected or not.
        egress(&mut l, &dgram(H4, U, 5300, 40000));
        assert_eq!(
            reply(&mut l, dgram(U, H4, 40000, 5300)),
            refused,
            "UDP server socket"
        );
        egress(&mut l, &dgram(H4, U, 443, 40000));
        assert_eq!(
            reply(&mut l, dgram(U, H4, 40000, 443)),
            refused,
            "a policy service's port"
        );
        egress(&mut l, &dgram(H4, U, eph, 53));
        assert_eq!(
            reply(&mut l, dgram(U, H4, 53, eph)),
            passed,
            "unconnected client"
        );
        egress(&mut l, &dgram(H4, U, 5301, 53));
        assert_eq!(
            reply(&mut l, dgram(U, H4, 53, 5301)),
            passed,
            "no local socket (forwarded)"
        );
        assert_eq!(
            created(&l) - c0,
            4,
            "exactly the four flows above were created"
        );

        // The same rule decides refreshes: an entry a server's answers
        // recorded (as versions before this one did) ages out while the
        // server keeps answering; a client's is refreshed.
        let mut flows = flow_map(&l);
        let stale = monotonic_ns() - 150_000_000;
        let old_server = flow_key(U, 40001, H4, 5300, IPPROTO_UDP);
        let old_client = flow_key(U, 53, H4, 5302, IPPROTO_UDP);
        flows.insert(old_server, stale, 0).unwrap();
        flows.insert(old_client, stale, 0).unwrap();
        egress(&mut l, &dgram(H4, U, 5300, 40001));
        egress(&mut l, &dgram(H4, U, 5302, 53));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            reply(&mut l, dgram(U, H4, 40001, 5300)),
            refused,
            "not refreshed"
        );
        assert_eq!(reply(&mut l, dgram(U, H4, 53, 5302)), passed, "refreshed");
    })
    .unwrap();
}

/// Pins the calling thread to one CPU: the global event cap is per CPU and
/// BPF_PROG_TEST_RUN runs on the caller's CPU.
fn pin_to_cpu0() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

#[test]
fn events_are_rate_limited_and_every_one_is_counted() {
    pin_to_cpu0();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let mut l = Loaded::new();
    let mut reader = rt
        .block_on(async { EventReader::open(&l.pins.path) })
        .unwrap();
    let drain = |r: &mut EventReader| std::iter::from_fn(|| r.try_next()).collect::<Vec<_>>();
    let counters = |l: &Loaded| {
        let c = l.dp.maps.counters().unwrap();
        [
            c[COUNTER_EVENTS_SENT as usize],
            c[COUNTER_EVENTS_SUPPRESSED_SOURCE as usize],
            c[COUNTER_EVENTS_SUPPRESSED_GLOBAL as usize],
            c[COUNTER_EVENTS_LOST as usize],
        ]
    };
    let delta = |a: [u64; 4], b: [u64; 4]| [b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3]];

    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.event_source_interval_ns = 300_000_000;
    l.apply(&base(cfg));
    let c0 = counters(&l);
    for _ in 0..5 {
        l.judge(&tcp(U, 7000).build());
    }
    l.judge(&udp(U6, 1, 9000).build());
    l.judge(&tcp(A, 7000).build()); // passes: no event
    assert_eq!(
        delta(c0, counters(&l)),
        [2, 4, 0, 0],
        "sent, per source, global, lost"
    );
    let evs = drain(&mut reader);
    assert_eq!(evs.len(), 2, "{evs:?}");
    let e = evs[0];
    assert_eq!(
        (e.family, e.protocol, e.dport, e.service),
        (FAMILY_V4, IPPROTO_TCP, 7000, 0)
    );
    assert_eq!(&e.src[..4], &[203, 0, 113, 99]);
    assert_eq!(
        (e.verdict, e.reason, e.entry, e.suppressed),
        (VERDICT_DROP, REASON_NOT_ALLOWED, ENTRY_NONE, 0)
    );
    assert!(e.timestamp_ns > 0 && e.ifindex > 0, "{e:?}");
    let e = evs[1];
    assert_eq!(
        (e.family, e.protocol, e.dport),
        (FAMILY_V6, IPPROTO_UDP, 9000)
    );
    assert_eq!(std::net::Ipv6Addr::from(e.src), ip(U6));

    // Once the interval is over, the next event tells how many were held.
    std::thread::sleep(Duration::from_millis(350));
    l.judge(&tcp(U, 22).build());
    let evs = drain(&mut reader);
    assert_eq!(evs.len(), 1);
    assert_eq!(
        (evs[0].suppressed, evs[0].dport, evs[0].service),
        (4, 22, SSH)
    );

    // A denied source's event names its entry; monitor mode reports too.
    l.judge(&tcp(D, 7000).build());
    l.apply(&base({
        let mut c = config(MODE_MONITOR, ACTION_DROP, SCOPE_HOST);
        c.event_source_interval_ns = 0;
        c
    }));
    let j = l.judge(&tcp(U, 9101).build());
    assert_eq!(j.action, XDP_PASS);
    let evs = drain(&mut reader);
    assert_eq!(evs.len(), 2);
    assert_eq!((evs[0].reason, evs[0].entry), (REASON_DENY, 2));
    assert_eq!(
        (evs[1].verdict, evs[1].service),
        (VERDICT_WOULD_DROP, METRICS)
    );

    // The global cap: one event per second in all, no per-source limit.
    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.event_source_interval_ns = 0;
    cfg.event_max_per_sec = 1;
    l.apply(&base(cfg));
    std::thread::sleep(Duration::from_millis(1100));
    let c0 = counters(&l);
    for last in 20..30u8 {
        l.judge(&tcp(&format!("203.0.113.{last}"), 7000).build());
    }
    assert_eq!(delta(c0, counters(&l)), [1, 0, 9, 0]);
    assert_eq!(drain(&mut reader).len(), 1);

    // No events at all.
    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.event_max_per_sec = 0;
    l.apply(&base(cfg));
    let c0 = counters(&l);
    l.judge(&tcp(U, 7000).build());
    assert_eq!(delta(c0, counters(&l)), [0, 0, 1, 0]);
    assert!(drain(&mut reader).is_empty());

    // A full ring: what does not fit is lost, and counted.
    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.event_source_interval_ns = 0;
    cfg.event_max_per_sec = u32::MAX;
    l.apply(&base(cfg));
    let c0 = counters(&l);
    let f = tcp(U, 7000).build();
    let n = 25_000u64;
    let p = l.dp.xdp_program(PROG_XDP).unwrap();
    // Bounded in time too, generously: a guest under emulation on a busy
    // host runs these at a few thousand per second.
    let started = Instant::now();
    for i in 0..n {
        p.test_run(TestRunOptions {
            data_in: Some(&f),
            ..Default::default()
        })
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "{i} of {n} runs took 180 s"
        );
    }
    let d = delta(c0, counters(&l));
    assert!(d[3] > 0, "the ring never filled: {d:?}");
    assert_eq!(
        d[0] + d[3],
        n,
        "every refused packet either sent or lost: {d:?}"
    );
    assert_eq!(drain(&mut reader).len() as u64, d[0], "events read back");
}

/// The per-source limiter under a flood from one source on every CPU at
/// once, with an interval of one clock tick so CPUs keep meeting at its
/// end. Two CPUs could both pass the interval check and both subtract
/// what they read: the count wrapped, and an event reported nearly 2^64
/// suppressed packets. Now no event reports more than was sent, and what
/// events carry plus what the map still holds is exactly the count of
/// suppressed packets.
#[test]
fn per_source_suppression_counts_stay_exact_in_a_flood_on_every_cpu() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let mut l = Loaded::new();
    let mut reader = rt
        .block_on(async { EventReader::open(&l.pins.path) })
        .unwrap();
    let mut cfg = config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
    cfg.event_source_interval_ns = 1_000_000;
    cfg.event_max_per_sec = 10_000_000;
    l.apply(&base(cfg));
    let fd = l.xdp_fd(PROG_XDP);
    let counters = |l: &Loaded| {
        let c = l.dp.maps.counters().unwrap();
        [
            c[COUNTER_EVENTS_SENT as usize],
            c[COUNTER_EVENTS_SUPPRESSED_SOURCE as usize],
            c[COUNTER_EVENTS_SUPPRESSED_GLOBAL as usize],
            c[COUNTER_EVENTS_LOST as usize],
        ]
    };
    let before = counters(&l);
    let cpus = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    // Each call runs the program 1,000 times on its CPU; every CPU floods
    // for 1.5 s (bounded also in calls).
    const CALLS: u32 = 5_000;
    const REPEAT: u32 = 1_000;
    let frame = tcp(U, 7000).build();
    std::thread::scope(|s| {
        for cpu in 0..cpus {
            let frame = &frame;
            s.spawn(move || {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu).unwrap();
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                let deadline = std::time::Instant::now() + Duration::from_millis(1500);
                for _ in 0..CALLS {
                    let (a, _) = ipguard_tests::prog_test_run(fd, frame, REPEAT).unwrap();
                    assert_eq!(a, XDP_DROP);
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                }
            });
        }
    });
    let after = counters(&l);
    let d: Vec<u64> = (0..4).map(|i| after[i] - before[i]).collect();
    let events: Vec<DropEvent> = std::iter::from_fn(|| reader.try_next()).collect();
    let sent = d[0];
    let suppressed = d[1];
    assert_eq!((d[2], d[3]), (0, 0), "no global cap, nothing lost: {d:?}");
    assert_eq!(events.len() as u64, sent, "every counted event arrived");
    let total = sent + suppressed;
    for e in &events {
        assert!(
            e.suppressed <= total,
            "an event reports {} suppressed of {total} packets",
            e.suppressed
        );
    }
    let carried: u64 = events.iter().map(|e| e.suppressed).sum();
    let rate: aya::maps::HashMap<_, [u8; 16], SourceRate> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(l.pins.path.join(MAP_EVENT_RATE)).unwrap(),
        ))
        .unwrap();
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[203, 0, 113, 99]);
    let held = rate.get(&rate_key(FAMILY_V4, &src), 0).unwrap().suppressed as i64;
    assert_eq!(
        carried as i64 + held,
        suppressed as i64,
        "what events carried plus what the map holds is every suppression"
    );
    println!(
        "vm-report: event flood: {cpus} CPUs, {total} refused packets, {sent} events carrying {carried} suppressed, {held} held, {suppressed} counted"
    );
}

/// A flood of flows the host opens, from every CPU, into a table smaller
/// than the flood: every flow is counted once (created, or not recorded
/// when the kernel found no free element), the table never holds more
/// than its capacity, evictions are exactly the flows that left it, and a
/// connection whose entry was evicted gets it back from its next segment.
#[test]
fn a_flow_flood_counts_every_eviction_and_connections_come_back() {
    const CAPACITY: u32 = 4096;
    const PER_CPU: u16 = 5_000;
    let mut l = Loaded::with_caps(ipguard::datapath::Capacities {
        v4: 65_536,
        v6: 16_384,
        flows: CAPACITY,
    });
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    // A connection the host opened before the flood (its entry not read
    // since, so the LRU may evict it).
    egress(&mut l, &seg(H4, U, 50400, 443, TCP_SYN));
    let fd = l.egress_fd();
    let cpus = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let deadline = Instant::now() + Duration::from_secs(20);
    let sent: u64 = std::thread::scope(|s| {
        let threads: Vec<_> = (0..cpus)
            .map(|cpu| {
                s.spawn(move || {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(cpu).unwrap();
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                    // Distinct flows: a remote per CPU, a local port per
                    // flow, inside the ephemeral range (a client's).
                    let remote = format!("203.0.113.{}", 100 + cpu);
                    let mut n = 0u64;
                    for i in 0..PER_CPU {
                        if Instant::now() > deadline {
                            break;
                        }
                        let f = dgram(H4, &remote, 33_000 + i, 53);
                        ipguard_tests::prog_test_run(fd, &f, 1).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    let st = l.dp.maps.flow_stats().unwrap();
    let flows = sent + 1;
    assert_eq!(
        st.created + st.not_recorded,
        flows,
        "every flow counted once: {st:?}"
    );
    assert!(st.live <= u64::from(CAPACITY), "{st:?}");
    assert_eq!(st.live, l.dp.maps.flows().unwrap().len() as u64);
    assert_eq!(st.deleted, 0);
    assert_eq!(st.evicted, st.created - st.live, "{st:?}");
    assert!(
        st.evicted >= flows - u64::from(CAPACITY) - st.not_recorded,
        "{st:?}"
    );
    // The early connection: if its entry went, its next segment brings it
    // back.
    let evicted = l.judge(&seg(U, H4, 443, 50400, TCP_ACK)).reason != REASON_RETURN_TRAFFIC;
    egress(&mut l, &seg(H4, U, 50400, 443, TCP_ACK));
    assert_eq!(
        l.judge(&seg(U, H4, 443, 50400, TCP_ACK)).reason,
        REASON_RETURN_TRAFFIC,
        "re-created by the host's next segment"
    );
    println!(
        "vm-report: flow flood: {cpus} CPUs, {flows} flows into {CAPACITY}: {} created, {} not recorded, {} live, {} evicted; early connection evicted: {evicted}",
        st.created, st.not_recorded, st.live, st.evicted
    );
}

/// `action: reject` answers at most `reject_max_per_sec` RSTs a second,
/// shared out per CPU; past this CPU's share a refusal is dropped silently
/// and counted, so a spoofed flood cannot make the host a reflector.
#[test]
fn rsts_are_budgeted_per_cpu_and_the_rest_dropped() {
    pin_to_cpu0();
    let cpus = aya::util::nr_cpus().unwrap() as u32;
    const SHARE: u32 = 10;
    let mut l = Loaded::new();
    let mut cfg = config(MODE_ENFORCE, ACTION_REJECT, SCOPE_HOST);
    cfg.reject_max_per_sec = SHARE * cpus;
    l.apply(&base(cfg));
    let over = |l: &Loaded| l.dp.maps.counters().unwrap()[COUNTER_REJECTS_OVER_BUDGET as usize];
    let c0 = over(&l);
    let started = Instant::now();
    let verdicts: Vec<(u32, u8)> = (0..25)
        .map(|_| {
            let j = l.judge(&tcp(U, 7000).build());
            (j.action, j.verdict)
        })
        .collect();
    // The budget's window is one second from its first RST.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "too slow to test"
    );
    let answered = verdicts
        .iter()
        .filter(|v| **v == (XDP_TX, VERDICT_REJECT))
        .count();
    let dropped = verdicts
        .iter()
        .filter(|v| **v == (XDP_DROP, VERDICT_DROP))
        .count();
    assert_eq!(
        (answered, dropped),
        (SHARE as usize, 25 - SHARE as usize),
        "{verdicts:?}"
    );
    assert_eq!(
        &verdicts[..SHARE as usize],
        &[(XDP_TX, VERDICT_REJECT); SHARE as usize]
    );
    assert_eq!(over(&l) - c0, 25 - u64::from(SHARE));
    // A new second, a new budget.
    std::thread::sleep(Duration::from_millis(1100));
    let j = l.judge(&tcp(U, 7000).build());
    assert_eq!((j.action, j.verdict), (XDP_TX, VERDICT_REJECT));
    // 0: never answer.
    cfg.reject_max_per_sec = 0;
    l.apply(&base(cfg));
    let j = l.judge(&tcp(U, 7000).build());
    assert_eq!(
        (j.action, j.verdict, j.reason),
        (XDP_DROP, VERDICT_DROP, REASON_NOT_ALLOWED)
    );
}

/// `frame` with its IPv4 identification, or its (first) IPv6 fragment
/// header's, set to `id`.
fn with_frag_id(mut frame: Vec<u8>, id: u32) -> Vec<u8> {
    if frame[12..14] == [0x08, 0x00] {
        frame[18..20].copy_from_slice(&(id as u16).to_be_bytes());
    } else {
        // The fragment header right after the IPv6 header.
        frame[14 + 40 + 4..14 + 40 + 8].copy_from_slice(&id.to_be_bytes());
    }
    frame
}

/// A reply that arrives fragmented (a large DNS answer with EDNS): once
/// its first fragment passed as return traffic, its later fragments (no
/// ports in them) pass too, keyed by source, destination, protocol and
/// identification, for FRAGMENT_TIMEOUT_NS; other datagrams' fragments
/// are judged by their source as before.
#[test]
fn later_fragments_of_a_passed_reply_pass_too() {
    let mut l = Loaded::new();
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    let j = |l: &mut Loaded, f: Vec<u8>| {
        let j = l.judge(&f);
        (j.action, j.reason)
    };
    let passed = (XDP_PASS, REASON_RETURN_TRAFFIC);
    let refused = (XDP_DROP, REASON_FRAGMENT);
    let answer = |src: &str, dst: &str| Pkt::new(ip(src), ip(dst), L4::udp(53, 50500));

    // IPv4.
    let later = |id: u32| with_frag_id(answer(U, H4).frag(FRAG_LATER).build(), id);
    assert_eq!(j(&mut l, later(7)), refused, "nothing passed yet");
    egress(&mut l, &dgram(H4, U, 50500, 53));
    assert_eq!(
        j(
            &mut l,
            with_frag_id(answer(U, H4).frag(FRAG_FIRST).build(), 7)
        ),
        passed,
        "the first fragment carries the ports"
    );
    assert_eq!(j(&mut l, later(7)), passed, "a later fragment of it");
    assert_eq!(j(&mut l, later(7)), passed, "and the next");
    assert_eq!(j(&mut l, later(8)), refused, "another datagram");
    let other_src = with_frag_id(answer("203.0.113.98", H4).frag(FRAG_LATER).build(), 7);
    assert_eq!(j(&mut l, other_src), refused, "another source");
    let mut tcp_later = Pkt::new(ip(U), ip(H4), L4::syn(53, 50500))
        .frag(FRAG_LATER)
        .build();
    tcp_later = with_frag_id(tcp_later, 7);
    assert_eq!(j(&mut l, tcp_later), refused, "another protocol");

    // IPv6.
    egress(&mut l, &dgram(H6, U6, 50500, 53));
    let frag6 = |offset: u16, more: bool, id: u32| {
        with_frag_id(
            answer(U6, H6).ext(Ext::Fragment { offset, more }).build(),
            id,
        )
    };
    assert_eq!(j(&mut l, frag6(185, false, 9)), refused, "before its first");
    assert_eq!(j(&mut l, frag6(0, true, 9)), passed);
    assert_eq!(j(&mut l, frag6(185, false, 9)), passed);
    assert_eq!(j(&mut l, frag6(185, false, 10)), refused);

    // Deny still means never, fragments included.
    egress(&mut l, &dgram(H4, D, 50500, 53));
    assert_eq!(
        j(
            &mut l,
            with_frag_id(answer(D, H4).frag(FRAG_FIRST).build(), 11)
        ),
        (XDP_DROP, REASON_DENY)
    );
    assert_eq!(
        j(
            &mut l,
            with_frag_id(answer(D, H4).frag(FRAG_LATER).build(), 11)
        ),
        (XDP_DROP, REASON_DENY)
    );

    // Past FRAGMENT_TIMEOUT_NS a later fragment is judged by its source.
    let mut frags: aya::maps::HashMap<_, FragKey, u64> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(l.pins.path.join(MAP_FRAGMENTS)).unwrap(),
        ))
        .unwrap();
    let key = |id| {
        let k = flow_key(U, 0, H4, 0, IPPROTO_UDP);
        FragKey {
            remote: k.remote,
            local: k.local,
            id,
            protocol: IPPROTO_UDP,
            family: FAMILY_V4,
            _pad0: [0; 2],
        }
    };
    assert!(
        frags.get(&key(7), 0).is_ok(),
        "the key is as the kernel writes it"
    );
    frags
        .insert(
            key(7),
            monotonic_ns() - FRAGMENT_TIMEOUT_NS - 1_000_000_000,
            0,
        )
        .unwrap();
    assert_eq!(j(&mut l, later(7)), refused, "expired");
}

/// `dhcp: [servers]` narrows the DHCP exemption to the servers named:
/// a DHCP reply (udp 67->68, DHCPv6 547->546) from another source is
/// judged by the lists like any packet.
#[test]
fn dhcp_replies_pass_only_from_the_servers_named() {
    let mut l = Loaded::new();
    let dhcp4 = |src: &str| Pkt::new(ip(src), ip(H4), L4::udp(67, 68)).build();
    let dhcp6 = |src: &str| Pkt::new(ip(src), ip(H6), L4::udp(547, 546)).build();
    let j = |l: &mut Loaded, f: Vec<u8>| {
        let j = l.judge(&f);
        (j.action, j.reason)
    };
    let infra = (XDP_PASS, REASON_INFRASTRUCTURE);
    let refused = (XDP_DROP, REASON_NOT_ALLOWED);
    // dhcp: true: any source.
    l.apply(&base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST)));
    assert_eq!(j(&mut l, dhcp4(U)), infra);
    assert_eq!(j(&mut l, dhcp6(U6)), infra);
    // dhcp: [203.0.113.64/30, 2001:db8:9::67]
    let mut p = base(config(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST));
    p.dhcp_servers = vec![
        "203.0.113.64/30".parse().unwrap(),
        "2001:db8:9::67/128".parse().unwrap(),
    ];
    l.apply(&p);
    assert_eq!(j(&mut l, dhcp4("203.0.113.67")), infra, "inside the /30");
    assert_eq!(j(&mut l, dhcp4("203.0.113.68")), refused, "just past it");
    assert_eq!(j(&mut l, dhcp4(U)), refused);
    assert_eq!(j(&mut l, dhcp6("2001:db8:9::67")), infra);
    assert_eq!(j(&mut l, dhcp6(U6)), refused);
    // An IPv4 server does not stand for the IPv6 address of the same bytes.
    assert_eq!(j(&mut l, dhcp6("cb00:7143::")), refused);
    // A listed source the lists allow passes as allowed, as before.
    assert_eq!(j(&mut l, dhcp4(A)), (XDP_PASS, REASON_ALLOWED));
    // Deny still wins over a named server.
    p.dhcp_servers = vec![format!("{D}/32").parse().unwrap()];
    l.apply(&p);
    assert_eq!(j(&mut l, dhcp4(D)), (XDP_DROP, REASON_DENY));
}
