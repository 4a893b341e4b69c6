//! What the kernel holds for one compiled policy, built by one function:
//! the IPv4 range table, the IPv6 range tree, its port table, its
//! deciders,
//! its DHCP servers and its config, laid out by the formulas of
//! `ipguard_common` (`port_index`, `decider_key_v4`, ...). The loader only
//! diffs the image against what the slot holds and writes the difference;
//! `explain` looks "who decided" up in the same deciders.

use ipguard_common::*;
use ipnet::IpNet;

use super::{CompiledPolicy, range4::RangeTable4, range6::RangeTable6};

/// An LPM trie key as the kernel's `bpf_lpm_trie_key_u8` holds it: the
/// data, and the prefix length in bits. Sorted by data, then length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrieKey<const N: usize> {
    pub data: [u8; N],
    pub len: u32,
}

/// One slot's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotImage {
    /// `generation`, the ephemeral ports and the DHCP server count are the
    /// loader's to fill.
    pub config: PolicyConfig,
    /// How many IPv4 prefixes `range4` holds (the operator's measure of
    /// capacity).
    pub v4_prefixes: usize,
    pub range4: RangeTable4,
    /// How many IPv6 prefixes `range6` holds.
    pub v6_prefixes: usize,
    pub range6: RangeTable6,
    pub deciders_v4: Vec<(TrieKey<5>, u32)>,
    pub deciders_v6: Vec<(TrieKey<17>, u32)>,
    /// The slot's part of `IPG_PORTS`: [`PORT_SLOT_STRIDE`] service
    /// indexes, at `port_index(0, protocol, port)`.
    pub ports: Vec<u8>,
    /// (family, address, prefix length); the loader keys them by slot
    /// (`dhcp_key`).
    pub dhcp: Vec<(u8, [u8; 16], u8)>,
}

impl SlotImage {
    pub fn build(c: &CompiledPolicy) -> Self {
        Self {
            config: c.config,
            range4: RangeTable4::of_policy(c),
            // Sorted and unique by the compiler's promise (the table
            // keeps the last of a duplicate).
            v4_prefixes: c.v4.len(),
            v6_prefixes: c.v6.len(),
            range6: RangeTable6::build(&c.v6),
            deciders_v4: Self::deciders_v4(c),
            deciders_v6: Self::deciders_v6(c),
            ports: Self::ports(c),
            dhcp: Self::dhcp(c),
        }
    }

    /// The port table part of [`SlotImage::build`].
    pub fn ports(c: &CompiledPolicy) -> Vec<u8> {
        let mut ports = vec![0u8; PORT_SLOT_STRIDE as usize];
        for r in &c.ports {
            for p in r.first..=r.last {
                if let Some(i) = port_index(0, r.proto.protocol(), p) {
                    ports[i as usize] = r.service;
                }
            }
        }
        ports
    }

    /// The IPv4 deciders part of [`SlotImage::build`].
    pub fn deciders_v4(c: &CompiledPolicy) -> Vec<(TrieKey<5>, u32)> {
        c.deciders_v4
            .iter()
            .map(|(list, n, e)| {
                (
                    TrieKey {
                        data: decider_key_v4(*list, &n.trunc().network().octets()),
                        len: DECIDER_KEY_BITS + u32::from(n.prefix_len()),
                    },
                    *e,
                )
            })
            .collect()
    }

    /// The IPv6 deciders part of [`SlotImage::build`].
    pub fn deciders_v6(c: &CompiledPolicy) -> Vec<(TrieKey<17>, u32)> {
        c.deciders_v6
            .iter()
            .map(|(list, n, e)| {
                (
                    TrieKey {
                        data: decider_key_v6(*list, &n.trunc().network().octets()),
                        len: DECIDER_KEY_BITS + u32::from(n.prefix_len()),
                    },
                    *e,
                )
            })
            .collect()
    }

    /// The DHCP servers part of [`SlotImage::build`].
    pub fn dhcp(c: &CompiledPolicy) -> Vec<(u8, [u8; 16], u8)> {
        c.dhcp_servers
            .iter()
            .map(|n| match n {
                IpNet::V4(n) => {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&n.network().octets());
                    (FAMILY_V4, a, n.prefix_len())
                }
                IpNet::V6(n) => (FAMILY_V6, n.network().octets(), n.prefix_len()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{compile, parse_str};

    #[test]
    fn the_image_lays_a_policy_out_by_the_shared_formulas() {
        let text = "version: 1\nallow: [10.0.0.0/8, \"2001:db8::/32\"]\n\
                    services:\n  ssh: { ports: [tcp/22], allow: [10.0.0.2] }\n  dns: { ports: [udp/53] }\n\
                    infrastructure: { dhcp: [10.0.0.67] }\n";
        let c = compile(
            &parse_str("t.yaml", text).unwrap().policy,
            SystemTime::now(),
            &[],
        );
        let img = SlotImage::build(&c);
        let at = |proto, port| img.ports[port_index(0, proto, port).unwrap() as usize];
        assert_eq!((at(IPPROTO_TCP, 22), at(IPPROTO_UDP, 53)), (1, 2));
        assert_eq!((at(IPPROTO_UDP, 22), at(IPPROTO_TCP, 53)), (0, 0));
        assert_eq!(img.ports.len(), PORT_SLOT_STRIDE as usize);
        assert_eq!(img.v4_prefixes, c.v4.len());
        let host = u32::from(std::net::Ipv4Addr::new(10, 9, 9, 9));
        assert_eq!(
            img.range4.lookup(host).map(|v| v.allow_mask & 1),
            Some(1),
            "10.0.0.0/8 is in the range table"
        );
        assert!(
            img.range4
                .lookup(u32::from(std::net::Ipv4Addr::new(11, 0, 0, 0)))
                .is_none()
        );
        assert_eq!(img.v6_prefixes, c.v6.len());
        assert!(img.range6.lookup("2001:db8::1".parse().unwrap()).is_some());
        assert!(img.range6.lookup("2001:db9::1".parse().unwrap()).is_none());
        // 10.0.0.2 is allowed by ssh's own list and the host-wide /8 with
        // other entries: its deciders are keyed by list, as the kernel
        // looks them up.
        let keys: Vec<TrieKey<5>> = img.deciders_v4.iter().map(|(k, _)| *k).collect();
        for want in [
            TrieKey {
                data: decider_key_v4(0, &[10, 0, 0, 0]),
                len: DECIDER_KEY_BITS + 8,
            },
            TrieKey {
                data: decider_key_v4(1, &[10, 0, 0, 2]),
                len: DECIDER_KEY_BITS + 32,
            },
        ] {
            assert!(keys.contains(&want), "{want:?} in {keys:?}");
        }
        assert_eq!(
            img.dhcp,
            [(
                FAMILY_V4,
                [10, 0, 0, 67, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                32
            )]
        );
    }
}
