//! Return traffic: the flows the TC egress program records for the
//! connections this host opens (see `ipguard_common::FlowKey`), and the
//! later fragments of replies.

use crate::{maps::*, prelude::*, util::*};

/// Whether the packet answers a connection this host opened recently
/// enough (see `FlowKey`).
#[inline(always)]
pub(crate) fn is_reply(pkt: &Packet, ip: &IpPacket, cfg: &PolicyConfig) -> bool {
    let L4::Port { sport, dport } = ip.l4() else {
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
        remote: ip.src(),
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
pub(crate) fn frag_key(pkt: &Packet, ip: &IpPacket) -> Option<FragKey> {
    Some(FragKey {
        remote: ip.src(),
        local: dst_addr(pkt, ip)?,
        id: ip.frag_id,
        protocol: ip.proto,
        family: ip.family,
        _pad0: [0; 2],
    })
}

/// The first fragment of a reply passed: let its later fragments pass too.
#[inline(always)]
pub(crate) fn expect_fragments(pkt: &Packet, ip: &IpPacket) {
    if let Some(key) = frag_key(pkt, ip) {
        let _ = IPG_FRAGS.insert(key, now(), 0);
    }
}

/// Whether a later fragment belongs to a datagram whose first fragment
/// passed as return traffic, recently enough.
#[inline(always)]
pub(crate) fn is_later_fragment_of_reply(pkt: &Packet, ip: &IpPacket) -> bool {
    if !matches!(ip.l4(), L4::Fragment) {
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
pub(crate) fn dst_addr(pkt: &Packet, ip: &IpPacket) -> Option<[u8; 16]> {
    if ip.family == FAMILY_V4 {
        let d = pkt.bytes::<4>(ip.l3 + 16)?;
        // As a number, not a zeroed array filled in: LLVM turns the
        // zeroing into a call of a byte-by-byte memset loop, which the
        // verifier walks byte by byte on every path that gets here.
        Some((u32::from_le_bytes(*d) as u128).to_le_bytes())
    } else {
        Some(*pkt.bytes::<16>(ip.l3 + 24)?)
    }
}

#[inline(always)]
pub(crate) fn record_flow(ctx: &TcContext) -> Option<()> {
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
    let scratch = IPG_SCRATCH.get_ptr_mut(SCRATCH_EGRESS)?;
    // SAFETY: a field of the map value `scratch` points to.
    let Parsed::Ip(ip) = parse::<false>(&pkt, unsafe { &raw mut (*scratch).word }) else {
        return None;
    };
    let L4::Port { sport, dport } = ip.l4() else {
        return None;
    };
    let local = ip.src();
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

pub(crate) const EEXIST: i32 = 17;
/// `bpf_sk_lookup_*`: the network namespace of the packet's device.
pub(crate) const CURRENT_NETNS: u64 = u64::MAX;

/// Whether the packet leaves from a local port that serves: a port of a
/// service of the policy in `slot`, or one a listening socket is bound to
/// (for UDP, an unconnected socket outside the ephemeral range). Only
/// called for packets that have no flow yet.
#[inline(always)]
pub(crate) fn serves(
    ctx: &TcContext,
    slot: u32,
    cfg: &PolicyConfig,
    ip: &IpPacket,
    key: &FlowKey,
) -> bool {
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
