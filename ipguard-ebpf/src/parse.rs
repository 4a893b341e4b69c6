//! Frame parsing with explicit bounds checks the verifier can follow.
//!
//! Every read goes through [`Packet::bytes`], which checks
//! `start + offset + N <= end` against an offset bounded by [`MAX_OFFSET`];
//! anything that does not fit is `Malformed`, never a read out of bounds
//! and never XDP_ABORTED. The same parser serves the XDP program (ingress,
//! `STRICT`: the IP lengths must agree with the frame) and the TC egress
//! program (whose GSO packets carry a total length larger than the linear
//! data it can see).

use ipguard_common::*;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_MIN: usize = 4;

/// IPv6 extension headers walked before giving up: RFC 8200 section 4.1
/// orders at most hop-by-hop, destination options, routing, fragment,
/// authentication, ESP and destination options again, so 8 holds any
/// chain real traffic uses (one header to spare). A complete datagram
/// whose upper-layer header lies beyond is malformed: it is refused
/// whatever the lists say, never judged by its source like a fragment
/// (which let it past a service's own list).
pub const MAX_EXT_HEADERS: usize = 8;
/// No header offset beyond this is ever read; keeps every offset bounded
/// for the verifier. Larger than any XDP frame (one page), so it never
/// refuses a real packet.
const MAX_OFFSET: usize = 4096;
/// Bounds an offset known to be at most MAX_OFFSET for the verifier.
const OFFSET_MASK: usize = 2 * MAX_OFFSET - 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The packet's bytes, `start..end` (the context's data pointers, read
/// once: nothing between parsing and the last read moves the packet).
#[derive(Clone, Copy)]
pub struct Packet {
    pub start: usize,
    pub end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn bytes<const N: usize>(&self, off: usize) -> Option<&[u8; N]> {
        if off > MAX_OFFSET {
            return None;
        }
        if self.start + off + N > self.end {
            return None;
        }
        // SAFETY: [start+off, start+off+N) lies inside the packet (checked
        // just above); packet memory is plain bytes.
        Some(unsafe { &*((self.start + off) as *const [u8; N]) })
    }

    // The bytes belong to the packet, not to this view of it: a shared
    // view handing out a mutable borrow is the point.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub fn bytes_mut<const N: usize>(&self, off: usize) -> Option<&mut [u8; N]> {
        if off > MAX_OFFSET {
            return None;
        }
        if self.start + off + N > self.end {
            return None;
        }
        // SAFETY: as in `bytes`; XDP and TC packet data is writable and no
        // other reference to these bytes is alive while the caller holds it.
        Some(unsafe { &mut *((self.start + off) as *mut [u8; N]) })
    }

    /// Whether the first `len` bytes are all inside the packet (a pointer
    /// comparison the verifier understands).
    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.start + len <= self.end
    }
}

/// Hides `x` from the optimizer. After `holds(ip_end)`, LLVM would
/// otherwise drop a later `bytes(off)` check it can prove from
/// `off + N <= ip_end`, and the verifier, which does not track that
/// relation, would refuse the read.
#[inline(always)]
fn opaque(x: usize) -> usize {
    let v = x;
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&v) }
}

/// A 16-bit length field of the packet, as a value every verifier can
/// bound. A big-endian read compiles to a byte swap (or to shifts and an
/// or), and verifiers before Linux 6.18 treat the result of either as a
/// wholly unknown 64-bit value, so it could never be added to a packet
/// pointer ("math between pkt pointer and register with unbounded min
/// value"). An AND with a constant is what all of them track; `opaque`
/// keeps LLVM from dropping the AND as redundant.
#[inline(always)]
fn len16(b: &[u8], i: usize) -> usize {
    opaque(be16(b, i) as usize) & 0xffff
}

/// `ip_end` when the lengths are not checked (TC egress): larger than any
/// offset the parser reads, so only the frame bounds limit it.
const NO_END: usize = MAX_OFFSET + 64;

#[inline(always)]
pub fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

#[inline(always)]
pub fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[derive(Clone, Copy)]
pub enum L4 {
    /// TCP or UDP with its header reachable.
    Port { sport: u16, dport: u16 },
    /// Another upper-layer protocol (ICMP, ESP, ...), or none.
    NoPort,
    /// A non-first fragment (IPv4 offset, or an IPv6 fragment header with
    /// an offset): judged by the source only.
    Fragment,
}

pub struct IpPacket {
    pub family: u8,
    /// The upper-layer protocol (for a fragment or an unreachable header,
    /// the last one named).
    pub proto: u8,
    /// The source address as the packet has it (IPv4 in the first 4
    /// bytes, the rest zero), as two words: the packet goes through map
    /// memory (`util::forget`) field by field, and 16 single bytes there
    /// took 16 stores, 16 loads and the shifts and ors to put an address
    /// together again (238 instructions fewer in the object, 5 ns less
    /// per allowed packet in the bench's warm loop). [`IpPacket::src`]
    /// gives the bytes.
    pub src_words: [u64; 2],
    /// [`IpPacket::l4`] as plain numbers, every one set on every path.
    /// Held as the enum, the ports of `NoPort` and `Fragment` are undefined
    /// bytes, and where LLVM merges the parser's paths it stores whatever
    /// a register holds for them: with the short path of `parse_plain`,
    /// on one path a pointer, which the verifier refuses to store as 16
    /// bits ("invalid size of register spill").
    l4_kind: u8,
    sport: u16,
    dport: u16,
    /// The `INFRA_*` bit this packet would be exempted by, or 0.
    pub infra: u32,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the upper-layer header (meaningful for `L4::Port`).
    pub l4_off: usize,
    /// Offset just past the IP datagram (from its length field; unbounded
    /// when not `STRICT`).
    pub ip_end: usize,
    /// Part of a fragmented datagram (more fragments follow, or an offset).
    pub fragmented: bool,
    /// The datagram's identification (IPv4's 16 bits, IPv6's fragment
    /// header's 32), meaningful when `fragmented`.
    pub frag_id: u32,
}

const L4_NO_PORT: u8 = 0;
const L4_PORT: u8 = 1;
const L4_FRAGMENT: u8 = 2;

impl IpPacket {
    /// What the upper-layer header gave.
    #[inline(always)]
    pub fn l4(&self) -> L4 {
        match self.l4_kind {
            L4_PORT => L4::Port {
                sport: self.sport,
                dport: self.dport,
            },
            L4_FRAGMENT => L4::Fragment,
            _ => L4::NoPort,
        }
    }

    #[inline(always)]
    fn set_l4(&mut self, l4: L4) {
        (self.l4_kind, self.sport, self.dport) = match l4 {
            L4::Port { sport, dport } => (L4_PORT, sport, dport),
            L4::NoPort => (L4_NO_PORT, 0, 0),
            L4::Fragment => (L4_FRAGMENT, 0, 0),
        };
    }

    /// The source address's 16 bytes (IPv4 in the first 4).
    #[inline(always)]
    pub fn src(&self) -> [u8; 16] {
        // SAFETY: two u64s are 16 plain bytes, in memory order.
        unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(self.src_words) }
    }

    /// The parser's bounds on the offsets, checked again for a packet the
    /// verifier no longer follows from the parser (see `util::forget`):
    /// it must see every offset bounded before adding it to a packet
    /// pointer. Always true for what `parse` returns.
    #[inline(always)]
    pub fn offsets_bounded(&self) -> bool {
        self.l3 <= MAX_OFFSET && self.l4_off <= MAX_OFFSET && self.ip_end <= NO_END
    }

    /// The packet with its header offsets masked to their bound, for a
    /// packet read back from map memory (`util::forget`). The checks of
    /// [`IpPacket::offsets_bounded`] and `Packet::bytes` bound the register
    /// they test, but LLVM, short of registers, reloads an offset from its
    /// stack copy after the check, and verifiers before 6.x do not carry a
    /// check over to the copy ("math between pkt pointer and register with
    /// unbounded min value"). Masked as soon as it is read, the value is
    /// bounded in every copy. Changes nothing for what `parse` returns.
    #[inline(always)]
    pub fn masked(mut self) -> Self {
        self.l3 &= OFFSET_MASK;
        self.l4_off &= OFFSET_MASK;
        self
    }
}

/// An address's 16 bytes as [`IpPacket::src_words`] holds them. The
/// parsers fill the byte array as they always did and convert it here:
/// built straight from the header's bytes (`u64::from_ne_bytes`), the
/// words let LLVM read the packet through a pointer the verifier had not
/// seen checked ("invalid access to packet").
#[inline(always)]
fn words(a: [u8; 16]) -> [u64; 2] {
    // SAFETY: 16 plain bytes are two u64s, in memory order.
    unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(a) }
}

pub enum Parsed {
    NonIp,
    Malformed,
    Ip(IpPacket),
}

/// Passes `v` through the map word at `w`, so the verifier knows only
/// what the caller checks of it afterwards (see `util::forget`): the
/// parser's paths (no tag, one, two; each extension header of a chain)
/// then meet in one state instead of going on apart.
#[inline(always)]
fn merge(w: *mut u64, v: u64) -> u64 {
    crate::util::forget(w, v)
}

/// `word`: a per-CPU map word the parser may use (see `merge`).
#[inline(always)]
pub fn parse<const STRICT: bool>(pkt: &Packet, word: *mut u64) -> Parsed {
    if let Some(ip) = parse_plain::<STRICT>(pkt) {
        return Parsed::Ip(ip);
    }
    let Some(eth) = pkt.bytes::<ETH_HLEN>(0) else {
        return Parsed::Malformed;
    };
    let mut ethertype = be16(eth, 12);
    let mut l3 = ETH_HLEN;
    // Up to two tags: 802.1ad outer and 802.1Q inner (QinQ), or one of
    // either.
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(tag) = pkt.bytes::<4>(l3) else {
                return Parsed::Malformed;
            };
            ethertype = be16(tag, 2);
            l3 += 4;
        }
    }
    let v = merge(word, (l3 as u64) << 16 | ethertype as u64);
    // Masks, not comparisons, bound what comes back: LLVM may fold a
    // comparison into one of the packed word, which bounds nothing the
    // verifier can see; a mask it keeps. l3 is at most 22 here.
    let (l3, ethertype) = (((v >> 16) & 0x1f) as usize, v as u16);
    match ethertype {
        ETH_P_IP => match parse_v4::<STRICT>(pkt, l3) {
            Some(p) => Parsed::Ip(p),
            None => Parsed::Malformed,
        },
        ETH_P_IPV6 => match parse_v6::<STRICT>(pkt, l3, word) {
            Some(p) => Parsed::Ip(p),
            None => Parsed::Malformed,
        },
        // A third tag would hide an IP packet from the policy while a stack
        // of VLAN devices could still deliver it: refuse it as malformed.
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Malformed,
        _ => Parsed::NonIp,
    }
}

/// The frame nearly all traffic is, on a short path: no VLAN tag, and
/// TCP or UDP right after an IPv4 header without options that is no
/// fragment, or right after the IPv6 header. None for any other frame, and
/// for one that any check of the full parser would refuse: the full
/// parser then decides, so this path only ever gives what it would give.
///
/// Why a second path: the full parser's generality (tags, options,
/// extension chains, fragments) cost 32 to 35 ns over the empty program
/// on the bench's host for such a frame, this path 15 to 18
/// (docs/bench.md). Here every offset is a constant, so the frame's fixed
/// part is bounds-checked once, the source is read as numbers, and
/// nothing goes through `merge`.
#[inline(always)]
fn parse_plain<const STRICT: bool>(pkt: &Packet) -> Option<IpPacket> {
    const L3: usize = ETH_HLEN;
    let f = pkt.bytes::<{ ETH_HLEN + 20 }>(0)?;
    match be16(f, 12) {
        ETH_P_IP => {
            // Version 4 with the minimal header length: no options.
            if f[L3] != 0x45 {
                return None;
            }
            // Neither more fragments nor an offset (don't-fragment may be
            // set).
            let frag = be16(f, L3 + 6);
            if frag & 0x3fff != 0 {
                return None;
            }
            let proto = f[L3 + 9];
            // As numbers: a zeroed byte array filled in costs a call of
            // LLVM's byte-by-byte memset. Safe here, where every byte read
            // is at a constant offset inside the one range checked above;
            // in the full parser, with its variable offsets, LLVM re-derived
            // a pointer the verifier refused (see `words`).
            let src = u32::from_ne_bytes([f[L3 + 12], f[L3 + 13], f[L3 + 14], f[L3 + 15]]);
            plain_l4::<STRICT>(
                pkt,
                IpPacket {
                    family: FAMILY_V4,
                    proto,
                    src_words: [src as u64, 0],
                    l4_kind: L4_NO_PORT,
                    sport: 0,
                    dport: 0,
                    infra: 0,
                    l3: L3,
                    l4_off: L3 + 20,
                    ip_end: 0,
                    fragmented: false,
                    frag_id: be16(f, L3 + 4) as u32,
                },
                len16(f, L3 + 2),
            )
        }
        ETH_P_IPV6 => {
            let h = pkt.bytes::<IPV6_HLEN>(L3)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let word = |i: usize| {
                u64::from_ne_bytes([
                    h[i],
                    h[i + 1],
                    h[i + 2],
                    h[i + 3],
                    h[i + 4],
                    h[i + 5],
                    h[i + 6],
                    h[i + 7],
                ])
            };
            plain_l4::<STRICT>(
                pkt,
                IpPacket {
                    family: FAMILY_V6,
                    proto: h[6],
                    src_words: [word(8), word(16)],
                    l4_kind: L4_NO_PORT,
                    sport: 0,
                    dport: 0,
                    infra: 0,
                    l3: L3,
                    l4_off: L3 + IPV6_HLEN,
                    ip_end: 0,
                    fragmented: false,
                    frag_id: 0,
                },
                IPV6_HLEN + len16(h, 4),
            )
        }
        _ => None,
    }
}

/// The TCP or UDP ports of a [`parse_plain`] packet whose IP datagram is
/// `total` bytes long (from its length fields), with `ip_end` set; None
/// for another protocol or when a length check fails.
#[inline(always)]
fn plain_l4<const STRICT: bool>(pkt: &Packet, mut ip: IpPacket, total: usize) -> Option<IpPacket> {
    let need = match ip.proto {
        IPPROTO_TCP => TCP_HLEN,
        IPPROTO_UDP => UDP_HLEN,
        _ => return None,
    };
    // The full parser's checks: the datagram holds its IP header, and
    // when the lengths count (STRICT), it fits the frame and holds the
    // upper-layer header's fixed part.
    let header = ip.l4_off - ip.l3;
    if total < header {
        return None;
    }
    ip.ip_end = if STRICT {
        if total < header + need || !pkt.holds(ip.l3 + total) {
            return None;
        }
        opaque(ip.l3 + total)
    } else {
        NO_END
    };
    let p = if ip.proto == IPPROTO_TCP {
        pkt.bytes::<TCP_HLEN>(ip.l4_off)
            .map(|t| [t[0], t[1], t[2], t[3]])
    } else {
        pkt.bytes::<UDP_HLEN>(ip.l4_off)
            .map(|u| [u[0], u[1], u[2], u[3]])
    }?;
    let (sport, dport) = (be16(&p, 0), be16(&p, 2));
    ip.set_l4(L4::Port { sport, dport });
    if ip.proto == IPPROTO_UDP {
        ip.infra = dhcp_infra(ip.family, sport, dport);
    }
    Some(ip)
}

/// [`INFRA_DHCP`] for a UDP datagram from a DHCP server's port to a
/// client's, 0 otherwise.
#[inline(always)]
fn dhcp_infra(family: u8, sport: u16, dport: u16) -> u32 {
    let dhcp = if family == FAMILY_V4 {
        sport == 67 && dport == 68
    } else {
        sport == 547 && dport == 546
    };
    if dhcp { INFRA_DHCP } else { 0 }
}

#[inline(always)]
fn parse_v4<const STRICT: bool>(pkt: &Packet, l3: usize) -> Option<IpPacket> {
    let h = pkt.bytes::<20>(l3)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let ihl = (h[0] & 0x0f) as usize * 4;
    if ihl < 20 {
        return None;
    }
    let total = len16(h, 2);
    if total < ihl {
        return None;
    }
    let ip_end = if STRICT {
        if !pkt.holds(l3 + total) {
            return None;
        }
        opaque(l3 + total)
    } else {
        NO_END
    };
    let mut src = [0u8; 16];
    src[0] = h[12];
    src[1] = h[13];
    src[2] = h[14];
    src[3] = h[15];
    let frag = be16(h, 6);
    let proto = h[9];
    let l4_off = l3 + ihl;
    // Options are skipped, but they must lie inside the datagram.
    if l4_off > ip_end {
        return None;
    }
    let mut ip = IpPacket {
        family: FAMILY_V4,
        proto,
        src_words: words(src),
        l4_kind: L4_NO_PORT,
        sport: 0,
        dport: 0,
        infra: 0,
        l3,
        l4_off,
        ip_end,
        fragmented: frag & 0x3fff != 0,
        frag_id: be16(h, 4) as u32,
    };
    if frag & 0x1fff != 0 {
        ip.set_l4(L4::Fragment);
        return Some(ip);
    }
    l4_info(pkt, proto, &mut ip)?;
    Some(ip)
}

#[inline(always)]
fn parse_v6<const STRICT: bool>(pkt: &Packet, l3: usize, word: *mut u64) -> Option<IpPacket> {
    let h = pkt.bytes::<IPV6_HLEN>(l3)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let payload = len16(h, 4);
    let ip_end = if STRICT {
        if !pkt.holds(l3 + IPV6_HLEN + payload) {
            return None;
        }
        opaque(l3 + IPV6_HLEN + payload)
    } else {
        NO_END
    };
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let mut ip = IpPacket {
        family: FAMILY_V6,
        proto: h[6],
        src_words: words(src),
        l4_kind: L4_NO_PORT,
        sport: 0,
        dport: 0,
        infra: 0,
        l3,
        l4_off: l3 + IPV6_HLEN,
        ip_end,
        fragmented: false,
        frag_id: 0,
    };
    let mut next = h[6];
    let mut off = l3 + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            // hop-by-hop, routing, destination options
            0 | 43 | 60 => {
                let e = pkt.bytes::<2>(off)?;
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            // fragment
            44 => {
                let e = pkt.bytes::<8>(off)?;
                let offset_flags = be16(e, 2);
                if offset_flags & 0xfff9 != 0 {
                    ip.fragmented = true;
                    ip.frag_id = be32(e, 4);
                }
                if offset_flags >> 3 != 0 {
                    ip.proto = e[0];
                    ip.set_l4(L4::Fragment);
                    return Some(ip);
                }
                next = e[0];
                off += 8;
            }
            // authentication header
            51 => {
                let e = pkt.bytes::<2>(off)?;
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            // The upper-layer header: read once, after the loop.
            _ => break,
        }
        // A header length pointing past the datagram is a bogus length,
        // not an unreachable header.
        if off > ip_end || off > MAX_OFFSET {
            return None;
        }
        // A mask, as for `l3` in `parse`: `off` is at most MAX_OFFSET here.
        let v = merge(word, (off as u64) << 8 | next as u64);
        (off, next) = (((v >> 8) as usize) & OFFSET_MASK, v as u8);
    }
    ip.proto = next;
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        // Still an extension header after the last one walked: the
        // upper-layer header is out of reach, malformed.
        return None;
    }
    ip.l4_off = off;
    l4_info(pkt, next, &mut ip)?;
    Some(ip)
}

/// Reads the ports (TCP, UDP) or the infrastructure class (ICMP, DHCP) of
/// the upper-layer header at `ip.l4_off`. Its fixed part must lie inside
/// the datagram: a first fragment too short to hold it (RFC 1858's tiny
/// fragment) is malformed.
#[inline(always)]
fn l4_info(pkt: &Packet, proto: u8, ip: &mut IpPacket) -> Option<()> {
    let off = ip.l4_off;
    match proto {
        IPPROTO_TCP => {
            if off + TCP_HLEN > ip.ip_end {
                return None;
            }
            let t = pkt.bytes::<TCP_HLEN>(off)?;
            ip.set_l4(L4::Port {
                sport: be16(t, 0),
                dport: be16(t, 2),
            });
        }
        IPPROTO_UDP => {
            if off + UDP_HLEN > ip.ip_end {
                return None;
            }
            let u = pkt.bytes::<UDP_HLEN>(off)?;
            let sport = be16(u, 0);
            let dport = be16(u, 2);
            ip.set_l4(L4::Port { sport, dport });
            ip.infra = dhcp_infra(ip.family, sport, dport);
        }
        IPPROTO_ICMP if ip.family == FAMILY_V4 => {
            if off + ICMP_MIN > ip.ip_end {
                return None;
            }
            let i = pkt.bytes::<ICMP_MIN>(off)?;
            if i[0] == 3 && i[1] == 4 {
                ip.infra = INFRA_PMTU;
            }
        }
        IPPROTO_ICMPV6 if ip.family == FAMILY_V6 => {
            if off + ICMP_MIN > ip.ip_end {
                return None;
            }
            let i = pkt.bytes::<ICMP_MIN>(off)?;
            if (133..=137).contains(&i[0]) {
                ip.infra = INFRA_NDP;
            } else if i[0] == 2 {
                ip.infra = INFRA_PMTU;
            } else if matches!(i[0], 130 | 131 | 132 | 143)
                && matches!(ip.src(), [0xfe, b, ..] if b & 0xc0 == 0x80)
                && pkt.bytes::<8>(ip.l3)?[7] == 1
            {
                // MLD is link-local by RFC 2710/3810 (fe80::/10, hop
                // limit 1): a listener report from elsewhere is no MLD
                // this host needs.
                ip.infra = INFRA_MLD;
            }
        }
        _ => {}
    }
    Some(())
}
