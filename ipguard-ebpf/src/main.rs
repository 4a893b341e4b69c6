//! The ipguard datapath: an XDP program that judges every inbound frame by
//! its source address against the active policy slot (see
//! `ipguard_common::maps`), a TC egress program that records the
//! connections this host opens so their replies pass, and three bench-only
//! XDP programs that time the parts of the first (`cargo xtask bench`).
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write types in core; the
// intrinsic lowers to BPF's atomic add (with the result unused, as here,
// even on the oldest instruction set).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod parse;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock_tuple, xdp_action},
    helpers::generated::{
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release, bpf_skb_pull_data, bpf_xdp_adjust_tail,
    },
    macros::{classifier, map, xdp},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use ipguard_common::*;
use parse::{
    ETH_HLEN, IPV6_HLEN, IpPacket, L4, Packet, Parsed, TCP_ACK, TCP_FIN, TCP_HLEN, TCP_RST,
    TCP_SYN, be32, parse,
};

// Pinned by name under the daemon's pin directory, so a restarted daemon
// adopts the live maps instead of creating empty ones.
#[map]
static IPG_V4_0: LpmTrie<[u8; 4], PrefixValue> = LpmTrie::pinned(DEFAULT_V4_CAPACITY, 0);
#[map]
static IPG_V4_1: LpmTrie<[u8; 4], PrefixValue> = LpmTrie::pinned(DEFAULT_V4_CAPACITY, 0);
#[map]
static IPG_V6_0: LpmTrie<[u8; 16], PrefixValue> = LpmTrie::pinned(DEFAULT_V6_CAPACITY, 0);
#[map]
static IPG_V6_1: LpmTrie<[u8; 16], PrefixValue> = LpmTrie::pinned(DEFAULT_V6_CAPACITY, 0);
#[map]
static IPG_DEC_V4_0: LpmTrie<[u8; 5], u32> = LpmTrie::pinned(DECIDERS_V4_CAPACITY, 0);
#[map]
static IPG_DEC_V4_1: LpmTrie<[u8; 5], u32> = LpmTrie::pinned(DECIDERS_V4_CAPACITY, 0);
#[map]
static IPG_DEC_V6_0: LpmTrie<[u8; 17], u32> = LpmTrie::pinned(DECIDERS_V6_CAPACITY, 0);
#[map]
static IPG_DEC_V6_1: LpmTrie<[u8; 17], u32> = LpmTrie::pinned(DECIDERS_V6_CAPACITY, 0);
#[map]
static IPG_PORTS: Array<u8> = Array::pinned(PORT_TABLE_LEN, 0);
#[map]
static IPG_CONFIG: Array<PolicyConfig> = Array::pinned(SLOTS, 0);
#[map]
static IPG_ACTIVE: Array<u32> = Array::pinned(1, 0);
#[map]
static IPG_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_LEN, 0);
#[map]
static IPG_SVC_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(SERVICE_COUNTER_LEN, 0);
#[map]
static IPG_ENTRY_HITS: PerCpuArray<u64> = PerCpuArray::pinned(SLOTS * ENTRY_CAPACITY, 0);
#[map]
static IPG_EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
#[map]
static IPG_EVENT_RATE: LruHashMap<[u8; 16], SourceRate> =
    LruHashMap::pinned(EVENT_RATE_CAPACITY, 0);
#[map]
static IPG_EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);
#[map]
static IPG_RST_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);
#[map]
static IPG_FRAGS: LruHashMap<FragKey, u64> = LruHashMap::pinned(FRAGMENTS_CAPACITY, 0);
#[map]
static IPG_DHCP: LpmTrie<[u8; 18], u8> = LpmTrie::pinned(SLOTS * MAX_DHCP_SERVERS, 0);
#[map]
static IPG_FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::pinned(DEFAULT_FLOW_CAPACITY, 0);

/// Possible CPUs, set by the loader (`GLOBAL_NR_CPUS`); 1 until then.
#[unsafe(no_mangle)]
static IPG_NR_CPUS: u32 = 1;
/// Whether the kernel has the coarse clock, set by the loader
/// (`GLOBAL_COARSE_CLOCK`).
#[unsafe(no_mangle)]
static IPG_COARSE_CLOCK: u32 = 0;

const NS_PER_SEC: u64 = 1_000_000_000;
/// TC "no opinion": the next program or the default action decides. The
/// egress program only observes.
const TC_ACT_UNSPEC: i32 = -1;

#[xdp]
pub fn ipguard(ctx: XdpContext) -> u32 {
    match try_ipguard(&ctx) {
        Ok(action) => action,
        // Unreachable in practice (a missing config slot); fail open rather
        // than XDP_ABORTED so a broken install never cuts a host off.
        Err(()) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn active_slot() -> u32 {
    match IPG_ACTIVE.get(0) {
        Some(s) => *s & 1,
        None => 0,
    }
}

#[inline(always)]
fn xdp_packet(ctx: &XdpContext) -> Packet {
    Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    }
}

#[inline(always)]
fn try_ipguard(ctx: &XdpContext) -> Result<u32, ()> {
    // The slot index is read once: everything below looks at that slot
    // only, so one packet is judged by one whole policy.
    let slot = active_slot();
    let cfg = IPG_CONFIG.get(slot).ok_or(())?;
    let pkt = xdp_packet(ctx);

    let ip = match parse::<true>(&pkt) {
        Parsed::NonIp => {
            count(counter_index(VERDICT_PASS, REASON_NON_IP));
            return Ok(xdp_action::XDP_PASS);
        }
        Parsed::Malformed => {
            let d = decide_malformed(cfg);
            count(counter_index(d.verdict, d.reason));
            return Ok(action(d.verdict));
        }
        Parsed::Ip(ip) => ip,
    };
    let value = lookup(slot, ip.family, &ip.src);
    let ports = match ip.l4 {
        L4::Port { dport, .. } => {
            let service = service_of(slot, ip.proto, dport);
            Ports::Port {
                service,
                // A fragment's segment length is unknown: no RST for it.
                tcp: (ip.proto == IPPROTO_TCP && !ip.fragmented) as u8,
            }
        }
        L4::NoPort => Ports::NoPort,
        L4::Fragment => Ports::Fragment,
    };
    let mut infra = ip.infra;
    if infra == INFRA_DHCP && cfg.dhcp_servers != 0 && !from_dhcp_server(slot, &ip) {
        infra = 0;
    }
    let mut d = decide_packet(cfg, value, ports, infra);
    if may_be_return_traffic(cfg, &d, ports) {
        let reply = match ip.l4 {
            L4::Port { .. } => is_reply(&pkt, &ip, cfg),
            _ => is_later_fragment_of_reply(&pkt, &ip),
        };
        if reply {
            d = return_traffic(d.service);
            if ip.fragmented && matches!(ip.l4, L4::Port { .. }) {
                expect_fragments(&pkt, &ip);
            }
        }
    }

    // Only a decision made by a listed entry credits it: a refusal for
    // "not allowed" was made by no entry, whatever prefix the source hit.
    let entry = match value {
        Some(v) => credited_entry(cfg, v, &d, |list| decider(slot, list, ip.family, &ip.src)),
        None => ENTRY_NONE,
    };
    if entry < ENTRY_CAPACITY {
        add(&IPG_ENTRY_HITS, slot * ENTRY_CAPACITY + entry);
    }
    if d.verdict == VERDICT_REJECT {
        match room(&IPG_RST_BUDGET, cfg.reject_max_per_sec) {
            Some(b) => spend(b),
            None => {
                d.verdict = VERDICT_DROP;
                count(COUNTER_REJECTS_OVER_BUDGET);
            }
        }
    }
    if d.verdict != VERDICT_PASS {
        report(ctx, cfg, &ip, &d, entry);
    }
    if d.verdict == VERDICT_REJECT && !send_rst(ctx, &pkt, &ip) {
        // Not answerable (a RST, a bogus TCP header, no room): the refusal
        // still holds, silently.
        d.verdict = VERDICT_DROP;
    }
    count(counter_index(d.verdict, d.reason));
    let refused = d.verdict != VERDICT_PASS;
    add(&IPG_SVC_COUNTERS, d.service as u32 * 2 + refused as u32);
    Ok(action(d.verdict))
}

/// Whether a DHCP reply comes from a server the policy names.
#[inline(always)]
fn from_dhcp_server(slot: u32, ip: &IpPacket) -> bool {
    let key = Key::new(DHCP_KEY_BITS + 128, dhcp_key(slot, ip.family, &ip.src));
    IPG_DHCP.get(&key).is_some()
}

/// The service of a local TCP or UDP port in `slot` (0: none).
#[inline(always)]
fn service_of(slot: u32, protocol: u8, port: u16) -> u8 {
    match port_index(slot, protocol, port) {
        Some(i) => IPG_PORTS.get(i).copied().unwrap_or(0),
        None => 0,
    }
}

#[inline(always)]
fn action(verdict: u8) -> u32 {
    match verdict {
        VERDICT_DROP => xdp_action::XDP_DROP,
        VERDICT_REJECT => xdp_action::XDP_TX,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn lookup(slot: u32, family: u8, src: &[u8; 16]) -> Option<&'static PrefixValue> {
    if family == FAMILY_V4 {
        let key = Key::new(32, [src[0], src[1], src[2], src[3]]);
        if slot == 0 {
            IPG_V4_0.get(&key)
        } else {
            IPG_V4_1.get(&key)
        }
    } else {
        let key = Key::new(128, *src);
        if slot == 0 {
            IPG_V6_0.get(&key)
        } else {
            IPG_V6_1.get(&key)
        }
    }
}

/// The allow entry of `list` that decides for `src`, for a prefix allowed
/// by several lists with different entries (`ENTRY_LOOKUP`); only such
/// packets pay this second lookup.
#[inline(always)]
fn decider(slot: u32, list: u8, family: u8, src: &[u8; 16]) -> u32 {
    let found = if family == FAMILY_V4 {
        let key = Key::new(8 + 32, [list, src[0], src[1], src[2], src[3]]);
        if slot == 0 {
            IPG_DEC_V4_0.get(&key)
        } else {
            IPG_DEC_V4_1.get(&key)
        }
    } else {
        let mut data = [0u8; 17];
        data[0] = list;
        data[1..].copy_from_slice(src);
        let key = Key::new(8 + 128, data);
        if slot == 0 {
            IPG_DEC_V6_0.get(&key)
        } else {
            IPG_DEC_V6_1.get(&key)
        }
    };
    found.copied().unwrap_or(ENTRY_NONE)
}

/// Whether the packet answers a connection this host opened recently
/// enough (see `FlowKey`).
#[inline(always)]
fn is_reply(pkt: &Packet, ip: &IpPacket, cfg: &PolicyConfig) -> bool {
    let L4::Port { sport, dport } = ip.l4 else {
        return false;
    };
    // A SYN without ACK opens a connection, it never answers one: a SYN
    // flood from refused sources costs no flow lookup.
    if ip.proto == IPPROTO_TCP {
        match pkt.bytes::<TCP_HLEN>(ip.l4_off) {
            Some(t) if t[13] & (TCP_SYN | TCP_ACK) != TCP_SYN => {}
            _ => return false,
        }
    }
    let Some(local) = dst_addr(pkt, ip) else {
        return false;
    };
    let key = FlowKey {
        remote: ip.src,
        local,
        remote_port: sport,
        local_port: dport,
        protocol: ip.proto,
        family: ip.family,
        _pad0: [0; 2],
    };
    match IPG_FLOWS.get_ptr(key) {
        Some(t) => {
            // SAFETY: a value pointer the map just returned; a racing
            // egress update rewrites the whole u64 at once.
            let last = unsafe { core::ptr::read_volatile(t) };
            let timeout = if ip.proto == IPPROTO_TCP {
                cfg.flow_timeout_tcp_ns
            } else {
                cfg.flow_timeout_ns
            };
            now().saturating_sub(last) <= timeout
        }
        None => false,
    }
}

#[inline(always)]
fn frag_key(pkt: &Packet, ip: &IpPacket) -> Option<FragKey> {
    Some(FragKey {
        remote: ip.src,
        local: dst_addr(pkt, ip)?,
        id: ip.frag_id,
        protocol: ip.proto,
        family: ip.family,
        _pad0: [0; 2],
    })
}

/// The first fragment of a reply passed: let its later fragments pass too.
#[inline(always)]
fn expect_fragments(pkt: &Packet, ip: &IpPacket) {
    if let Some(key) = frag_key(pkt, ip) {
        let _ = IPG_FRAGS.insert(key, now(), 0);
    }
}

/// Whether a later fragment belongs to a datagram whose first fragment
/// passed as return traffic, recently enough.
#[inline(always)]
fn is_later_fragment_of_reply(pkt: &Packet, ip: &IpPacket) -> bool {
    if !matches!(ip.l4, L4::Fragment) {
        return false;
    }
    let Some(key) = frag_key(pkt, ip) else {
        return false;
    };
    match IPG_FRAGS.get_ptr(key) {
        Some(t) => {
            // SAFETY: a value pointer the map just returned; whole-u64
            // stores only.
            let first = unsafe { core::ptr::read_volatile(t) };
            now().saturating_sub(first) <= FRAGMENT_TIMEOUT_NS
        }
        None => false,
    }
}

#[inline(always)]
fn dst_addr(pkt: &Packet, ip: &IpPacket) -> Option<[u8; 16]> {
    let mut a = [0u8; 16];
    if ip.family == FAMILY_V4 {
        let d = pkt.bytes::<4>(ip.l3 + 16)?;
        a[..4].copy_from_slice(d);
    } else {
        a.copy_from_slice(pkt.bytes::<16>(ip.l3 + 24)?);
    }
    Some(a)
}

/// CLOCK_MONOTONIC at tick resolution: rate windows, flow timeouts and
/// event times need milliseconds, not nanoseconds, and the coarse clock is
/// a plain read where the precise one reads the hardware clock (costly in
/// virtual machines).
/// On kernels before 5.11 (no coarse helper) it is the precise clock: same
/// base, same unit.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a read-only global the loader sets; the helpers take no
    // arguments and touch no memory.
    unsafe {
        if core::ptr::read_volatile(&IPG_COARSE_CLOCK) != 0 {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

#[inline(always)]
fn count(index: u32) {
    add(&IPG_COUNTERS, index);
}

#[inline(always)]
fn add(map: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot the map returned: no other writer, so no
        // atomic is needed.
        unsafe { *p += 1 };
    }
}

/// Adds to a counter other CPUs may update at the same time.
#[inline(always)]
fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: `p` points into a map value (8-byte aligned, alive for the
    // program run).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// This CPU's share of a per-second budget of `max_per_sec` for the whole
/// host (see `EventBudget`), when it has room left; the caller counts what
/// it uses with [`spend`].
#[inline(always)]
fn room(budget: &PerCpuArray<EventBudget>, max_per_sec: u32) -> Option<*mut EventBudget> {
    if max_per_sec == 0 {
        return None;
    }
    let p = budget.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot: no other writer.
    let b = unsafe { &mut *p };
    let t = now();
    if t.wrapping_sub(b.window_start_ns) >= NS_PER_SEC {
        b.window_start_ns = t;
        b.used = 0;
    }
    // SAFETY: a read-only global the loader sets.
    let cpus = unsafe { core::ptr::read_volatile(&IPG_NR_CPUS) }.max(1);
    if b.used >= max_per_sec.div_ceil(cpus) as u64 {
        return None;
    }
    Some(p)
}

/// Uses one of the budget [`room`] found room in.
#[inline(always)]
fn spend(b: *mut EventBudget) {
    // SAFETY: this CPU's slot, as `room` returned it: no other writer.
    unsafe { (*b).used += 1 };
}

/// Sends a `DropEvent` for a refused packet unless the global cap or the
/// per-source limit holds it back; every packet that sends none is counted.
///
/// The global cap is checked first and touches only this CPU's budget: a
/// flood of millions of new sources costs one per-CPU read per packet once
/// the second's budget is spent, and never an insert into the per-source
/// map (which only sources that actually got an event enter).
#[inline(always)]
fn report(ctx: &XdpContext, cfg: &PolicyConfig, ip: &IpPacket, d: &Decision, entry: u32) {
    let Some(budget) = room(&IPG_EVENT_BUDGET, cfg.event_max_per_sec) else {
        count(COUNTER_EVENTS_SUPPRESSED_GLOBAL);
        return;
    };
    let t = now();
    let per_source = cfg.event_source_interval_ns != 0;
    let key = rate_key(ip.family, &ip.src);
    let rate = if per_source {
        IPG_EVENT_RATE.get_ptr_mut(key)
    } else {
        None
    };
    let mut carried = 0;
    if let Some(r) = rate {
        // SAFETY: a value pointer the map just returned (LRU values stay
        // valid for the program run even if evicted meanwhile).
        let last = unsafe { core::ptr::read_volatile(&(*r).last_sent_ns) };
        if t.wrapping_sub(last) < cfg.event_source_interval_ns {
            // SAFETY: as above.
            atomic_add(unsafe { &raw mut (*r).suppressed }, 1);
            count(COUNTER_EVENTS_SUPPRESSED_SOURCE);
            return;
        }
        // SAFETY: as above.
        let held = unsafe { core::ptr::read_volatile(&(*r).suppressed) };
        // Two CPUs may pass the interval check together and both subtract
        // what they read below: the count then dips under zero until the
        // next suppressions make it up. Read as signed and saturated, the
        // dip is never reported (as 2^64 - n), and over time every
        // suppression is reported once: the sum of what events carry plus
        // what the map holds is exact. (5.10 has no atomic exchange to do
        // better: its only atomic is add.)
        carried = if (held as i64) < 0 { 0 } else { held };
    }
    spend(budget);
    let sent = match IPG_EVENTS.reserve::<DropEvent>(0) {
        Some(mut e) => {
            let (dport, _) = ports_of(ip);
            e.write(DropEvent {
                timestamp_ns: t,
                suppressed: carried,
                src: ip.src,
                ifindex: ctx.ingress_ifindex() as u32,
                entry,
                dport,
                family: ip.family,
                protocol: ip.proto,
                service: d.service,
                verdict: d.verdict,
                reason: d.reason,
                _pad0: 0,
            });
            e.submit(0);
            count(COUNTER_EVENTS_SENT);
            true
        }
        None => {
            count(COUNTER_EVENTS_LOST);
            false
        }
    };
    if !per_source {
        return;
    }
    match rate {
        Some(r) => {
            if sent {
                // SAFETY: as above. Subtracting what the event carried
                // keeps suppressions other CPUs add meanwhile.
                unsafe { core::ptr::write_volatile(&raw mut (*r).last_sent_ns, t) };
                atomic_add(unsafe { &raw mut (*r).suppressed }, carried.wrapping_neg());
            } else {
                atomic_add(unsafe { &raw mut (*r).suppressed }, 1);
            }
        }
        None => {
            let fresh = SourceRate {
                last_sent_ns: if sent { t } else { 0 },
                suppressed: (!sent) as u64,
            };
            // Only if no other CPU inserted it meanwhile: overwriting
            // would wipe the suppressions counted into its entry.
            if IPG_EVENT_RATE
                .insert(key, fresh, BPF_NOEXIST as u64)
                .is_err()
                && !sent
                && let Some(r) = IPG_EVENT_RATE.get_ptr_mut(key)
            {
                // SAFETY: as above.
                atomic_add(unsafe { &raw mut (*r).suppressed }, 1);
            }
        }
    }
}

#[inline(always)]
fn ports_of(ip: &IpPacket) -> (u16, u16) {
    match ip.l4 {
        L4::Port { sport, dport } => (dport, sport),
        _ => (0, 0),
    }
}

/// One's-complement sum of big-endian 16-bit words.
#[inline(always)]
fn sum16<const N: usize>(b: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Turns the TCP segment into the RST its sender's stack accepts
/// (RFC 9293 3.10.7.1, as Linux's own tcp_v4_send_reset does): addresses,
/// ports and MACs swapped, IP options and IPv6 extension headers dropped,
/// payload cut off with `bpf_xdp_adjust_tail`, both checksums computed.
/// Returns false when the segment cannot be answered; the packet must then
/// be dropped (it may already be half rewritten).
#[inline(always)]
fn send_rst(ctx: &XdpContext, pkt: &Packet, ip: &IpPacket) -> bool {
    let l3 = ip.l3;
    let Some(t) = pkt.bytes::<TCP_HLEN>(ip.l4_off) else {
        return false;
    };
    let (sport, dport) = ([t[0], t[1]], [t[2], t[3]]);
    let seq = be32(t, 4);
    let ack = be32(t, 8);
    let doff = (t[12] >> 4) as usize * 4;
    let flags = t[13];
    if flags & TCP_RST != 0 || doff < TCP_HLEN || ip.l4_off + doff > ip.ip_end {
        return false;
    }
    let seg_len = (ip.ip_end - ip.l4_off - doff) as u32
        + (flags & TCP_SYN != 0) as u32
        + (flags & TCP_FIN != 0) as u32;
    let (r_seq, r_ack, r_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        (0, seq.wrapping_add(seg_len), TCP_RST | TCP_ACK)
    };

    let Some(eth) = pkt.bytes_mut::<ETH_HLEN>(0) else {
        return false;
    };
    for i in 0..6 {
        eth.swap(i, i + 6);
    }

    let tcp_off;
    let pseudo;
    if ip.family == FAMILY_V4 {
        let Some(h) = pkt.bytes_mut::<20>(l3) else {
            return false;
        };
        let src = [h[12], h[13], h[14], h[15]];
        let dst = [h[16], h[17], h[18], h[19]];
        *h = [
            0x45,
            0,
            0,
            40,
            0,
            0,
            0x40,
            0,
            64,
            IPPROTO_TCP,
            0,
            0,
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            src[0],
            src[1],
            src[2],
            src[3],
        ];
        let c = fold(sum16(h)).to_be_bytes();
        h[10] = c[0];
        h[11] = c[1];
        tcp_off = l3 + 20;
        pseudo = sum16(&src) + sum16(&dst) + IPPROTO_TCP as u32 + TCP_HLEN as u32;
    } else {
        let Some(h) = pkt.bytes_mut::<IPV6_HLEN>(l3) else {
            return false;
        };
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        dst.copy_from_slice(&h[24..40]);
        h[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, TCP_HLEN as u8, IPPROTO_TCP, 64]);
        h[8..24].copy_from_slice(&dst);
        h[24..40].copy_from_slice(&src);
        tcp_off = l3 + IPV6_HLEN;
        pseudo = sum16(&src) + sum16(&dst) + IPPROTO_TCP as u32 + TCP_HLEN as u32;
    }
    let Some(t) = pkt.bytes_mut::<TCP_HLEN>(tcp_off) else {
        return false;
    };
    let s = r_seq.to_be_bytes();
    let a = r_ack.to_be_bytes();
    *t = [
        dport[0], dport[1], sport[0], sport[1], s[0], s[1], s[2], s[3], a[0], a[1], a[2], a[3],
        0x50, r_flags, 0, 0, 0, 0, 0, 0,
    ];
    let c = fold(pseudo + sum16(t)).to_be_bytes();
    t[16] = c[0];
    t[17] = c[1];

    let len = pkt.end - pkt.start;
    let new_len = tcp_off + TCP_HLEN;
    if len > new_len {
        // SAFETY: the context is the program's own; packet pointers are
        // not used after this call.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - new_len) as i32)) } != 0 {
            return false;
        }
    }
    true
}

/// Records the connections this host opens, keyed as their replies will
/// arrive, while the active policy wants return traffic.
#[classifier]
pub fn ipguard_egress(ctx: TcContext) -> i32 {
    record_flow(&ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn record_flow(ctx: &TcContext) -> Option<()> {
    let slot = active_slot();
    let cfg = IPG_CONFIG.get(slot)?;
    if cfg.infra & INFRA_RETURN_TRAFFIC == 0 || cfg.mode == MODE_UNSET {
        return None;
    }
    // Headers of locally built packets are in the linear part; pull only
    // when they are not (a pull may copy the packet).
    let linear = ctx.data_end() - ctx.data();
    let total = ctx.len() as usize;
    if linear < 128 && total > linear {
        // SAFETY: the program's own context; pointers are re-read below.
        unsafe { bpf_skb_pull_data(ctx.skb.skb, total.min(128) as u32) };
    }
    let pkt = Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Parsed::Ip(ip) = parse::<false>(&pkt) else {
        return None;
    };
    let L4::Port { sport, dport } = ip.l4 else {
        return None;
    };
    let local = ip.src;
    let remote = dst_addr(&pkt, &ip)?;
    let key = FlowKey {
        remote,
        local,
        remote_port: dport,
        local_port: sport,
        protocol: ip.proto,
        family: ip.family,
        _pad0: [0; 2],
    };
    let t = now();
    let existing = IPG_FLOWS.get_ptr_mut(key);
    if let Some(p) = existing {
        // SAFETY: a value pointer the map just returned.
        if t.wrapping_sub(unsafe { core::ptr::read_volatile(p) }) <= FLOW_REFRESH_NS {
            return Some(());
        }
    }
    // Record or refresh only a connection this host opened (see
    // `FlowKey`). Checked at most once per refresh interval of a flow, so
    // an entry an older version recorded for a server's answers ages out.
    let opens = if ip.proto == IPPROTO_TCP {
        let flags = pkt.bytes::<TCP_HLEN>(ip.l4_off)?[13];
        if flags & TCP_RST != 0 {
            return None;
        }
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    } else {
        false
    };
    if !opens && serves(ctx, slot, cfg, &ip, &key) {
        return None;
    }
    if let Some(p) = existing {
        // SAFETY: as above; a whole-u64 store, so the XDP side never reads
        // a torn time.
        unsafe { core::ptr::write_volatile(p, t) };
        return Some(());
    }
    // Only a new element counts: another CPU may insert the same flow.
    match IPG_FLOWS.insert(key, t, BPF_NOEXIST as u64) {
        Ok(()) => count(COUNTER_FLOWS_CREATED),
        Err(e) if e == -EEXIST => {}
        Err(_) => count(COUNTER_FLOWS_NOT_RECORDED),
    }
    Some(())
}

const EEXIST: i32 = 17;
/// `bpf_sk_lookup_*`: the network namespace of the packet's device.
const CURRENT_NETNS: u64 = u64::MAX;

/// Whether the packet leaves from a local port that serves: a port of a
/// service of the policy in `slot`, or one a listening socket is bound to
/// (for UDP, an unconnected socket outside the ephemeral range). Only
/// called for packets that have no flow yet.
#[inline(always)]
fn serves(ctx: &TcContext, slot: u32, cfg: &PolicyConfig, ip: &IpPacket, key: &FlowKey) -> bool {
    let port = key.local_port;
    if service_of(slot, ip.proto, port) != 0 {
        return true;
    }
    if ip.proto == IPPROTO_UDP && cfg.ephemeral_first <= port && port <= cfg.ephemeral_last {
        return false;
    }
    // The socket an inbound packet from the remote address to this port
    // would reach, from remote port 0: no connected or established socket
    // has that peer, so only a listener (TCP) or an unconnected socket
    // (UDP) can match.
    let mut tuple = [0u8; 36];
    let port = port.to_be_bytes();
    let size = if ip.family == FAMILY_V4 {
        tuple[0..4].copy_from_slice(&key.remote[..4]);
        tuple[4..8].copy_from_slice(&key.local[..4]);
        tuple[10..12].copy_from_slice(&port);
        12
    } else {
        tuple[0..16].copy_from_slice(&key.remote);
        tuple[16..32].copy_from_slice(&key.local);
        tuple[34..36].copy_from_slice(&port);
        36
    };
    let ptr = tuple.as_mut_ptr() as *mut bpf_sock_tuple;
    let skb = ctx.skb.skb as *mut core::ffi::c_void;
    // SAFETY: `tuple` is a stack buffer of at least `size` bytes laid out
    // as `struct bpf_sock_tuple`; a socket returned is released below.
    let sk = unsafe {
        if ip.proto == IPPROTO_TCP {
            bpf_sk_lookup_tcp(skb, ptr, size, CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(skb, ptr, size, CURRENT_NETNS, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket reference the lookup returned, released once.
    unsafe { bpf_sk_release(sk as *mut core::ffi::c_void) };
    true
}

/// Bench only: the cost of running any XDP program at all.
#[xdp]
pub fn ipguard_bench_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Bench only: the parser of `ipguard` alone.
#[xdp]
pub fn ipguard_bench_parse(ctx: XdpContext) -> u32 {
    match parse::<true>(&xdp_packet(&ctx)) {
        Parsed::Ip(ip) => {
            // The source must count as used, as in `ipguard`, or the
            // compiler would skip copying it.
            let mut sink = 0u8;
            for b in ip.src {
                sink ^= b;
            }
            // SAFETY: a local.
            unsafe { core::ptr::write_volatile(&mut sink, sink) };
            match ip.l4 {
                L4::Port { .. } => xdp_action::XDP_PASS,
                _ => xdp_action::XDP_DROP,
            }
        }
        Parsed::NonIp => xdp_action::XDP_PASS,
        Parsed::Malformed => xdp_action::XDP_DROP,
    }
}

/// Bench only: parser, active slot and config, and the LPM lookup.
#[xdp]
pub fn ipguard_bench_lookup(ctx: XdpContext) -> u32 {
    let slot = active_slot();
    if IPG_CONFIG.get(slot).is_none() {
        return xdp_action::XDP_PASS;
    }
    match parse::<true>(&xdp_packet(&ctx)) {
        Parsed::Ip(ip) => match lookup(slot, ip.family, &ip.src) {
            Some(v) if v.allow_mask != 0 => xdp_action::XDP_PASS,
            _ => xdp_action::XDP_DROP,
        },
        Parsed::NonIp => xdp_action::XDP_PASS,
        Parsed::Malformed => xdp_action::XDP_DROP,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
