//! Crafted Ethernet frames for BPF_PROG_TEST_RUN (verdict corpus,
//! differential tests, benchmarks), and a checker for the TCP RSTs the
//! datapath builds.
//!
//! Lengths and checksums are right unless a test breaks them on purpose:
//! the builders produce what a real stack would send, and each malformed
//! case is a well-formed frame with one field changed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const MAC_HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_LLDP: u16 = 0x88CC;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_GRE: u8 = 47;

/// The upper layer of a [`Pkt`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// ICMP for IPv4 sources, ICMPv6 for IPv6 ones.
    Icmp { ty: u8, code: u8 },
    /// Any protocol, its bytes as given.
    Raw { proto: u8, bytes: Vec<u8> },
}

impl L4 {
    pub fn syn(sport: u16, dport: u16) -> Self {
        L4::Tcp {
            sport,
            dport,
            seq: 1_000_000,
            ack: 0,
            flags: TCP_SYN,
            payload: Vec::new(),
        }
    }

    pub fn udp(sport: u16, dport: u16) -> Self {
        L4::Udp {
            sport,
            dport,
            payload: b"ipguard".to_vec(),
        }
    }
}

/// An IPv6 extension header before the upper layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    HopByHop {
        units: u8,
    },
    Routing {
        units: u8,
    },
    DestOpts {
        units: u8,
    },
    /// `offset` in 8-byte units.
    Fragment {
        offset: u16,
        more: bool,
    },
    /// `len` as in the header: (len + 2) * 4 bytes.
    Ah {
        len: u8,
    },
}

impl Ext {
    fn proto(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => IPPROTO_HOPOPTS,
            Ext::Routing { .. } => IPPROTO_ROUTING,
            Ext::DestOpts { .. } => IPPROTO_DSTOPTS,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
            Ext::Ah { .. } => IPPROTO_AH,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match *self {
            Ext::HopByHop { units } | Ext::Routing { units } | Ext::DestOpts { units } => {
                let mut b = vec![0u8; (units as usize + 1) * 8];
                b[0] = next;
                b[1] = units;
                if let Ext::HopByHop { .. } | Ext::DestOpts { .. } = self {
                    // PadN over the rest.
                    b[2] = 1;
                    b[3] = (b.len() - 4) as u8;
                }
                b
            }
            Ext::Fragment { offset, more } => {
                let of = (offset << 3) | more as u16;
                let mut b = vec![next, 0];
                b.extend_from_slice(&of.to_be_bytes());
                b.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                b
            }
            Ext::Ah { len } => {
                let mut b = vec![0u8; (len as usize + 2) * 4];
                b[0] = next;
                b[1] = len;
                b
            }
        }
    }
}

/// A packet from `src` to `dst`, with what a test varies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// (TPID, VLAN id), outermost first.
    pub vlans: Vec<(u16, u16)>,
    /// IPv4 options (padded to 4 bytes by the builder).
    pub options: Vec<u8>,
    /// IPv4 flags and fragment offset field (host order), e.g. 0x2000 for
    /// a first fragment, 185 for a later one.
    pub frag: u16,
    pub exts: Vec<Ext>,
    /// IPv6 hop limit (64 unless set).
    pub hop_limit: u8,
}

impl Pkt {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            vlans: Vec::new(),
            options: Vec::new(),
            frag: 0,
            exts: Vec::new(),
            hop_limit: 64,
        }
    }

    pub fn hops(mut self, h: u8) -> Self {
        self.hop_limit = h;
        self
    }

    pub fn vlan(mut self, tpid: u16, id: u16) -> Self {
        self.vlans.push((tpid, id));
        self
    }

    pub fn options(mut self, o: &[u8]) -> Self {
        self.options = o.to_vec();
        self
    }

    pub fn frag(mut self, f: u16) -> Self {
        self.frag = f;
        self
    }

    pub fn ext(mut self, e: Ext) -> Self {
        self.exts.push(e);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let (proto, l4) = l4_bytes(&self.l4, self.src, self.dst);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let ip = ipv4(s, d, proto, &self.options, self.frag, &l4);
                ether(ETH_P_IP, &self.vlans, &ip)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut payload = Vec::new();
                let mut next = proto;
                for e in self.exts.iter().rev() {
                    let mut b = e.bytes(next);
                    b.extend_from_slice(&payload);
                    payload = b;
                    next = e.proto();
                }
                payload.extend_from_slice(&l4);
                let mut ip = ipv6(s, d, next, &payload);
                ip[7] = self.hop_limit;
                ether(ETH_P_IPV6, &self.vlans, &ip)
            }
            _ => panic!("mixed address families in {self:?}"),
        }
    }
}

fn l4_bytes(l4: &L4, src: IpAddr, dst: IpAddr) -> (u8, Vec<u8>) {
    match l4 {
        L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
            payload,
        } => (
            IPPROTO_TCP,
            tcp(src, dst, *sport, *dport, *seq, *ack, *flags, payload),
        ),
        L4::Udp {
            sport,
            dport,
            payload,
        } => (IPPROTO_UDP, udp(src, dst, *sport, *dport, payload)),
        L4::Icmp { ty, code } => {
            let proto = if src.is_ipv4() {
                IPPROTO_ICMP
            } else {
                IPPROTO_ICMPV6
            };
            let mut b = vec![*ty, *code, 0, 0, 0, 0, 0, 0];
            let c = if src.is_ipv4() {
                fold(sum(&b))
            } else {
                fold(pseudo(src, dst, proto, b.len()) + sum(&b))
            };
            b[2..4].copy_from_slice(&c.to_be_bytes());
            (proto, b)
        }
        L4::Raw { proto, bytes } => (*proto, bytes.clone()),
    }
}

pub fn ether(ethertype: u16, vlans: &[(u16, u16)], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * vlans.len() + payload.len());
    f.extend_from_slice(&MAC_HOST);
    f.extend_from_slice(&MAC_PEER);
    for (tpid, id) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: &[u8],
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = 20 + opts.len();
    let total = ihl + payload.len();
    let mut h = vec![0u8; ihl];
    h[0] = 0x40 | (ihl / 4) as u8;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h[20..].copy_from_slice(&opts);
    let c = fold(sum(&h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

#[allow(clippy::too_many_arguments)]
pub fn tcp(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 0x50;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = fold(pseudo(src, dst, IPPROTO_TCP, t.len()) + sum(&t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    let c = fold(pseudo(src, dst, IPPROTO_UDP, u.len()) + sum(&u));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// One's-complement sum of big-endian 16-bit words (odd length padded).
pub fn sum(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

pub fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let addr = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    sum(&addr(src)) + sum(&addr(dst)) + proto as u32 + len as u32
}

/// A TCP segment read back from a frame, with its checksums checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSeen {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload_len: usize,
    /// Bytes past the IP datagram (must be none).
    pub trailing: usize,
    pub ip_checksum_ok: bool,
    pub tcp_checksum_ok: bool,
}

/// Parses an Ethernet frame carrying TCP (no options, no extension
/// headers: what the datapath's RST looks like).
pub fn read_tcp(f: &[u8]) -> Result<TcpSeen, String> {
    let short = || format!("frame too short: {} bytes", f.len());
    let mut eth_dst = [0u8; 6];
    let mut eth_src = [0u8; 6];
    eth_dst.copy_from_slice(f.get(0..6).ok_or_else(short)?);
    eth_src.copy_from_slice(f.get(6..12).ok_or_else(short)?);
    let mut off = 12;
    let mut vlans = Vec::new();
    let mut et = u16::from_be_bytes([f[off], f[off + 1]]);
    while et == ETH_P_8021Q || et == ETH_P_8021AD {
        let id = u16::from_be_bytes([
            *f.get(off + 2).ok_or_else(short)?,
            *f.get(off + 3).ok_or_else(short)?,
        ]);
        vlans.push((et, id));
        off += 4;
        et = u16::from_be_bytes([
            *f.get(off).ok_or_else(short)?,
            *f.get(off + 1).ok_or_else(short)?,
        ]);
    }
    let l3 = off + 2;
    let (src, dst, ttl, l4, ip_end, ip_ok) = match et {
        ETH_P_IP => {
            let h = f.get(l3..l3 + 20).ok_or_else(short)?;
            if h[0] != 0x45 || h[9] != IPPROTO_TCP {
                return Err(format!("not a plain IPv4/TCP header: {h:02x?}"));
            }
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            let s = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let d = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            (
                IpAddr::V4(s),
                IpAddr::V4(d),
                h[8],
                l3 + 20,
                l3 + total,
                fold(sum(h)) == 0,
            )
        }
        ETH_P_IPV6 => {
            let h = f.get(l3..l3 + 40).ok_or_else(short)?;
            if h[0] >> 4 != 6 || h[6] != IPPROTO_TCP {
                return Err(format!("not a plain IPv6/TCP header: {h:02x?}"));
            }
            let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&h[8..24]);
            d.copy_from_slice(&h[24..40]);
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                h[7],
                l3 + 40,
                l3 + 40 + payload,
                true,
            )
        }
        other => return Err(format!("ethertype {other:#06x} is not IP")),
    };
    if ip_end > f.len() {
        return Err(format!("IP length {ip_end} past the frame ({})", f.len()));
    }
    let t = f.get(l4..l4 + 20).ok_or_else(short)?;
    let seg = &f[l4..ip_end];
    let doff = (t[12] >> 4) as usize * 4;
    Ok(TcpSeen {
        eth_dst,
        eth_src,
        vlans,
        src,
        dst,
        ttl,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        flags: t[13],
        payload_len: seg.len().saturating_sub(doff),
        trailing: f.len() - ip_end,
        ip_checksum_ok: ip_ok,
        tcp_checksum_ok: fold(pseudo(src, dst, IPPROTO_TCP, seg.len()) + sum(seg)) == 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_segments_read_back_with_good_checksums() {
        for (s, d) in [
            ("198.51.100.2", "198.51.100.1"),
            ("2001:db8:1::2", "2001:db8:1::1"),
        ] {
            let p = Pkt::new(
                s.parse().unwrap(),
                d.parse().unwrap(),
                L4::Tcp {
                    sport: 40000,
                    dport: 22,
                    seq: 7,
                    ack: 9,
                    flags: TCP_ACK | TCP_PSH,
                    payload: vec![1, 2, 3],
                },
            )
            .vlan(ETH_P_8021AD, 10)
            .vlan(ETH_P_8021Q, 20);
            let seen = read_tcp(&p.build()).unwrap();
            assert!(seen.ip_checksum_ok && seen.tcp_checksum_ok, "{seen:?}");
            assert_eq!(
                (seen.sport, seen.dport, seen.seq, seen.ack, seen.payload_len),
                (40000, 22, 7, 9, 3)
            );
            assert_eq!(seen.vlans, vec![(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)]);
            assert_eq!(seen.trailing, 0);
        }
    }

    #[test]
    fn extension_headers_chain_in_order() {
        let p = Pkt::new(
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            L4::udp(1, 2),
        )
        .ext(Ext::HopByHop { units: 0 })
        .ext(Ext::Fragment {
            offset: 0,
            more: true,
        });
        let f = p.build();
        assert_eq!(f[14 + 6], IPPROTO_HOPOPTS);
        assert_eq!(f[54], IPPROTO_FRAGMENT);
        assert_eq!(f[62], IPPROTO_UDP);
    }
}
