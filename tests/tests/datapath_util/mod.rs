//! Shared by the datapath tests: load the datapath without any interface
//! (BPF_PROG_TEST_RUN needs none), build policies by hand, run frames and
//! read which verdict and reason each one was counted under.
#![allow(dead_code)]

use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, RawFd},
};

use aya::programs::{TestRun, TestRunOptions};
use ipguard::{
    datapath::{Capacities, Datapath},
    policy::{CompiledPolicy, PortRange, Proto, ServiceInfo},
};
use ipguard_common::*;
use ipguard_tests::PinDir;

/// A datapath loaded into the kernel with its maps pinned in a private
/// directory (removed on drop, after the programs are unloaded).
pub struct Loaded {
    pub dp: Datapath,
    pub pins: PinDir,
}

impl Loaded {
    pub fn new() -> Self {
        Self::with_caps(Capacities {
            v4: 65_536,
            v6: 16_384,
            flows: 65_536,
        })
    }

    pub fn with_caps(caps: Capacities) -> Self {
        ipguard_tests::require_root();
        let pins = PinDir::new().expect("pin dir");
        let dp = Datapath::load(&pins.path, caps).expect("load the datapath");
        Self { dp, pins }
    }

    pub fn apply(&mut self, p: &CompiledPolicy) {
        self.dp.maps.apply(p).expect("apply");
    }

    /// The file descriptor of the loaded XDP program `prog` (for raw
    /// bpf(2) calls: test runs from other threads, its instructions).
    pub fn xdp_fd(&mut self, prog: &str) -> RawFd {
        let p = self.dp.xdp_program(prog).expect("program");
        p.fd().expect("program fd").as_fd().as_raw_fd()
    }

    /// The file descriptor of the loaded TC egress program.
    pub fn egress_fd(&mut self) -> RawFd {
        let p = self.dp.egress_program().expect("egress program");
        p.fd().expect("program fd").as_fd().as_raw_fd()
    }

    /// Runs `frame` through the XDP program `prog` once: (XDP action, the
    /// frame as the program left it).
    pub fn run_prog(&mut self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let p = self.dp.xdp_program(prog).expect("program");
        let mut out = vec![0u8; frame.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Runs `frame` through `ipguard` and returns the action, the output
    /// frame and the one (verdict, reason) counter it moved.
    pub fn judge(&mut self, frame: &[u8]) -> Judged {
        let before = self.dp.maps.counters().expect("counters");
        let (action, out) = self.run_prog(PROG_XDP, frame);
        let after = self.dp.maps.counters().expect("counters");
        let moved: Vec<(u8, u8)> = (0..VERDICT_COUNT * REASON_SLOTS)
            .filter(|&i| after[i as usize] != before[i as usize])
            .map(|i| ((i / REASON_SLOTS) as u8, (i % REASON_SLOTS) as u8))
            .collect();
        assert_eq!(
            moved.len(),
            1,
            "one verdict counter must move per packet, moved {moved:?}"
        );
        Judged {
            action,
            verdict: moved[0].0,
            reason: moved[0].1,
            out,
        }
    }
}

#[derive(Debug)]
pub struct Judged {
    pub action: u32,
    pub verdict: u8,
    pub reason: u8,
    pub out: Vec<u8>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// A policy config with the defaults of policy.md.
pub fn config(mode: u32, action: u32, scope: u32) -> PolicyConfig {
    PolicyConfig {
        mode,
        action,
        scope,
        infra: INFRA_NDP | INFRA_DHCP | INFRA_PMTU | INFRA_MLD | INFRA_RETURN_TRAFFIC,
        flow_timeout_ns: 120_000_000_000,
        flow_timeout_tcp_ns: 3_600_000_000_000,
        // Tests of the verdicts answer every reject; the budget has a test
        // of its own.
        reject_max_per_sec: u32::MAX,
        event_source_interval_ns: 1_000_000_000,
        event_max_per_sec: 1000,
        ..Default::default()
    }
}

pub fn value(allow_mask: u64, flags: u32, entry: u32) -> PrefixValue {
    PrefixValue {
        allow_mask,
        flags,
        entry,
    }
}

/// A policy from (prefix, value) pairs of both families and port ranges
/// ((proto, first, last, service)); services get names `svcN`.
pub fn policy(
    cfg: PolicyConfig,
    prefixes: &[(&str, PrefixValue)],
    ports: &[(Proto, u16, u16, u8)],
) -> CompiledPolicy {
    let mut p = CompiledPolicy {
        config: cfg,
        ..Default::default()
    };
    for (net, v) in prefixes {
        match net.parse::<ipnet::IpNet>().expect("prefix") {
            ipnet::IpNet::V4(n) => p.v4.push((n, *v)),
            ipnet::IpNet::V6(n) => p.v6.push((n, *v)),
        }
    }
    p.v4.sort_by_key(|e| (e.0.network(), e.0.prefix_len()));
    p.v6.sort_by_key(|e| (e.0.network(), e.0.prefix_len()));
    for &(proto, first, last, service) in ports {
        p.ports.push(PortRange {
            proto,
            first,
            last,
            service,
        });
        if !p.services.iter().any(|s| s.index == service) {
            p.services.push(ServiceInfo {
                index: service,
                name: format!("svc{service}"),
                has_own_list: true,
            });
        }
    }
    p
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}
