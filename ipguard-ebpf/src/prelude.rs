//! What every module of the programs uses; both object roots (the
//! product's `main.rs`, the benchmark's `bench.rs`) include it.

pub(crate) use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST, bpf_sock_tuple, xdp_action},
    helpers::generated::{
        bpf_jiffies64, bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns,
        bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_skb_pull_data,
        bpf_xdp_adjust_tail,
    },
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
pub(crate) use ipguard_common::*;

pub(crate) use crate::parse::{
    ETH_HLEN, IPV6_HLEN, IpPacket, L4, Packet, Parsed, TCP_ACK, TCP_FIN, TCP_HLEN, TCP_RST,
    TCP_SYN, be32, parse,
};
