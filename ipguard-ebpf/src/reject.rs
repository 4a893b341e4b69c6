//! `action: reject`: the RST that answers a refused TCP segment.

use crate::prelude::*;

/// One's-complement sum of big-endian 16-bit words.
#[inline(always)]
pub(crate) fn sum16<const N: usize>(b: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

#[inline(always)]
pub(crate) fn fold(mut s: u32) -> u16 {
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
pub(crate) fn send_rst(ctx: &XdpContext, pkt: &Packet, ip: &IpPacket) -> bool {
    let l3 = ip.l3;
    // First, so no later check implies it: LLVM drops a check it can
    // prove from an earlier one, and the verifier, which knows only the
    // checks it sees, would refuse the MAC swap's reads.
    let Some(eth) = pkt.bytes_mut::<ETH_HLEN>(0) else {
        return false;
    };
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
