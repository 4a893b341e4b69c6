//! The verdict of docs/policy.md §5 steps 2 to 7, as one pure function.
//!
//! The XDP program and `ipguard explain` both call [`decide`], so the two can
//! only disagree if they disagree on its inputs (the LPM lookup and the
//! service lookup), which the differential tests check.
//!
//! Return traffic (`infrastructure.return_traffic`) is a rule of its own,
//! between steps 4 and 5: a packet answering a connection this host opened
//! passes unless `always_allow` or `deny` decided first. An explicit deny
//! wins because an operator who denies an address means "never", also for
//! connections the host opens to it by mistake. The datapath looks the
//! connection up only when steps 5 to 7 would refuse ([`may_be_return_traffic`]),
//! so the allowed path pays no extra lookup; the verdict is the same as
//! checking first, only an already allowed reply is counted as `allowed`.
//! `explain` does not know the host's connections and never answers
//! `return_traffic`.

use crate::maps::*;

/// What the packet carries for step 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ports {
    /// A TCP or UDP packet with a reachable destination port; `service` is
    /// the service index of (protocol, port), 0 when none. `tcp` is 1 for a
    /// TCP segment that a RST can answer (`action: reject`): the datapath
    /// passes 0 for the first fragment of a fragmented segment, whose length
    /// it cannot know, so such a fragment is dropped rather than answered.
    Port { service: u8, tcp: u8 },
    /// Any other protocol (ICMP, ...): no service can match.
    NoPort,
    /// A non-first fragment (IPv4 or IPv6): judged by source only. (An
    /// unfragmented IPv6 packet whose upper-layer header is beyond the
    /// headers the parser walks is malformed, not a fragment.)
    Fragment,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: u8,
    pub reason: u8,
    /// The service index the packet was judged for (0: none).
    pub service: u8,
}

impl Decision {
    #[inline(always)]
    pub const fn passes(&self) -> bool {
        self.verdict == VERDICT_PASS || self.verdict == VERDICT_WOULD_DROP
    }
}

/// The verdict for a packet whose source matched `value` (None: no prefix
/// of the policy covers it).
#[inline(always)]
pub fn decide(cfg: &PolicyConfig, value: Option<&PrefixValue>, ports: Ports) -> Decision {
    let service = match ports {
        Ports::Port { service, .. } => service,
        _ => 0,
    };
    let pass = |reason| Decision {
        verdict: VERDICT_PASS,
        reason,
        service,
    };
    if cfg.mode == MODE_UNSET {
        return pass(REASON_NO_POLICY);
    }
    if cfg.mode == MODE_OFF {
        return pass(REASON_OFF);
    }
    let (mask, flags) = match value {
        Some(v) => (v.allow_mask, v.flags),
        None => (0, 0),
    };
    if flags & FLAG_ALWAYS_ALLOW != 0 {
        return pass(REASON_ALWAYS_ALLOW);
    }
    let tcp = matches!(ports, Ports::Port { tcp: 1, .. });
    if flags & FLAG_DENY != 0 {
        return refuse(cfg, REASON_DENY, service, tcp);
    }
    match ports {
        Ports::Fragment => {
            if mask != 0 {
                pass(REASON_FRAGMENT)
            } else {
                refuse(cfg, REASON_FRAGMENT, 0, false)
            }
        }
        _ => {
            if service == 0 && cfg.scope == SCOPE_SERVICES {
                return pass(REASON_OUT_OF_SCOPE);
            }
            // service <= 63 by construction of the port table; the mask
            // keeps the shift defined even for a corrupt value.
            if mask & (1u64 << (service & 63)) != 0 {
                pass(REASON_ALLOWED)
            } else {
                refuse(cfg, REASON_NOT_ALLOWED, service, tcp)
            }
        }
    }
}

/// [`decide`] for a packet of an infrastructure class (`infra`: the
/// packet's `INFRA_*` bit, 0 for none). `always_allow` and `deny` decide
/// first, then the exemption, then the lists: an operator's deny means
/// "never", also for a DHCP reply or an ICMP "fragmentation needed" from
/// that source.
#[inline(always)]
pub fn decide_packet(
    cfg: &PolicyConfig,
    value: Option<&PrefixValue>,
    ports: Ports,
    infra: u32,
) -> Decision {
    let listed = value.map_or(0, |v| v.flags) & (FLAG_ALWAYS_ALLOW | FLAG_DENY);
    if infra & cfg.infra != 0 && cfg.mode != MODE_UNSET && cfg.mode != MODE_OFF && listed == 0 {
        let service = match ports {
            Ports::Port { service, .. } => service,
            _ => 0,
        };
        return Decision {
            verdict: VERDICT_PASS,
            reason: REASON_INFRASTRUCTURE,
            service,
        };
    }
    decide(cfg, value, ports)
}

/// Whether a refusal may still be turned into a pass by
/// [`return_traffic`]: the policy enables it, the packet has ports (a
/// connection can be looked up) or is a later fragment (of a reply whose
/// first fragment passed), and neither `deny` nor a malformed header
/// refused it.
#[inline(always)]
pub fn may_be_return_traffic(cfg: &PolicyConfig, d: &Decision, ports: Ports) -> bool {
    cfg.infra & INFRA_RETURN_TRAFFIC != 0
        && d.verdict != VERDICT_PASS
        && d.reason != REASON_DENY
        && d.reason != REASON_MALFORMED
        && matches!(ports, Ports::Port { .. } | Ports::Fragment)
}

/// Whether a decision with this reason was made by a policy entry (the
/// prefix value's `entry`), and so counts as a hit of it.
#[inline(always)]
pub const fn decided_by_entry(reason: u8) -> bool {
    matches!(reason, REASON_ALWAYS_ALLOW | REASON_DENY | REASON_ALLOWED)
}

/// The entry credited with a decision (hit counter, event), given the
/// source's prefix value; `decider(list)` looks the deciding entry of that
/// allow list up in the deciders map, asked only for [`ENTRY_LOOKUP`].
#[inline(always)]
pub fn credited_entry(
    cfg: &PolicyConfig,
    value: &PrefixValue,
    d: &Decision,
    decider: impl FnOnce(u8) -> u32,
) -> u32 {
    if !decided_by_entry(d.reason) {
        return ENTRY_NONE;
    }
    if value.entry != ENTRY_LOOKUP {
        return value.entry;
    }
    if d.reason != REASON_ALLOWED {
        // always_allow and deny are never ambiguous; a corrupt value is
        // credited to nobody.
        return ENTRY_NONE;
    }
    let s = d.service & 63;
    let list = if s != 0 && cfg.decider_keys & (1u64 << s) != 0 {
        s
    } else {
        0
    };
    decider(list)
}

/// The decision for a packet that answers a connection this host opened.
#[inline(always)]
pub const fn return_traffic(service: u8) -> Decision {
    Decision {
        verdict: VERDICT_PASS,
        reason: REASON_RETURN_TRAFFIC,
        service,
    }
}

/// How a refusal is carried out under the policy's mode and action.
#[inline(always)]
pub fn refuse(cfg: &PolicyConfig, reason: u8, service: u8, tcp: bool) -> Decision {
    let verdict = if cfg.mode == MODE_MONITOR {
        VERDICT_WOULD_DROP
    } else if cfg.action == ACTION_REJECT && tcp {
        VERDICT_REJECT
    } else {
        VERDICT_DROP
    };
    Decision {
        verdict,
        reason,
        service,
    }
}

/// A frame that claims to be IP but cannot be parsed: dropped and counted
/// (reported as would_drop in monitor mode, passed when ipguard is off or
/// has no policy, since the kernel's own stack drops such frames anyway).
#[inline(always)]
pub fn decide_malformed(cfg: &PolicyConfig) -> Decision {
    match cfg.mode {
        MODE_UNSET => Decision {
            verdict: VERDICT_PASS,
            reason: REASON_NO_POLICY,
            service: 0,
        },
        MODE_OFF => Decision {
            verdict: VERDICT_PASS,
            reason: REASON_OFF,
            service: 0,
        },
        _ => refuse(cfg, REASON_MALFORMED, 0, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: u32, action: u32, scope: u32) -> PolicyConfig {
        PolicyConfig {
            mode,
            action,
            scope,
            ..Default::default()
        }
    }

    #[test]
    fn precedence_always_allow_over_deny() {
        let c = cfg(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
        let v = PrefixValue {
            allow_mask: 0,
            flags: FLAG_ALWAYS_ALLOW | FLAG_DENY,
            entry: 0,
        };
        let d = decide(&c, Some(&v), Ports::NoPort);
        assert_eq!((d.verdict, d.reason), (VERDICT_PASS, REASON_ALWAYS_ALLOW));
    }

    #[test]
    fn reject_only_for_tcp() {
        let c = cfg(MODE_ENFORCE, ACTION_REJECT, SCOPE_HOST);
        let tcp = decide(&c, None, Ports::Port { service: 0, tcp: 1 });
        let udp = decide(&c, None, Ports::Port { service: 0, tcp: 0 });
        assert_eq!(tcp.verdict, VERDICT_REJECT);
        assert_eq!(udp.verdict, VERDICT_DROP);
    }

    #[test]
    fn monitor_reports_would_drop() {
        let c = cfg(MODE_MONITOR, ACTION_REJECT, SCOPE_HOST);
        let d = decide(&c, None, Ports::Port { service: 0, tcp: 1 });
        assert_eq!(
            (d.verdict, d.reason),
            (VERDICT_WOULD_DROP, REASON_NOT_ALLOWED)
        );
        assert!(d.passes());
    }

    #[test]
    fn services_scope_passes_unmatched_ports() {
        let c = cfg(MODE_ENFORCE, ACTION_DROP, SCOPE_SERVICES);
        let d = decide(&c, None, Ports::Port { service: 0, tcp: 1 });
        assert_eq!(d.reason, REASON_OUT_OF_SCOPE);
        let d = decide(&c, None, Ports::Port { service: 3, tcp: 1 });
        assert_eq!(d.reason, REASON_NOT_ALLOWED);
    }

    #[test]
    fn fragments_pass_when_any_list_allows() {
        let c = cfg(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
        let v = PrefixValue {
            allow_mask: 1 << 5,
            flags: 0,
            entry: 0,
        };
        assert_eq!(
            decide(&c, Some(&v), Ports::Fragment).reason,
            REASON_FRAGMENT
        );
        assert!(decide(&c, Some(&v), Ports::Fragment).passes());
        assert!(!decide(&c, None, Ports::Fragment).passes());
    }

    #[test]
    fn return_traffic_never_overrides_deny_or_a_pass() {
        let mut c = cfg(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
        c.infra = INFRA_RETURN_TRAFFIC;
        let port = Ports::Port { service: 0, tcp: 1 };
        let refused = decide(&c, None, port);
        assert!(may_be_return_traffic(&c, &refused, port));
        assert!(!may_be_return_traffic(&c, &refused, Ports::NoPort));
        assert!(may_be_return_traffic(&c, &refused, Ports::Fragment));
        let deny = PrefixValue {
            allow_mask: 1,
            flags: FLAG_DENY,
            entry: 0,
        };
        assert!(!may_be_return_traffic(
            &c,
            &decide(&c, Some(&deny), port),
            port
        ));
        assert!(!may_be_return_traffic(&c, &decide_malformed(&c), port));
        let allowed = PrefixValue {
            allow_mask: 1,
            flags: 0,
            entry: 0,
        };
        assert!(!may_be_return_traffic(
            &c,
            &decide(&c, Some(&allowed), port),
            port
        ));
        c.infra = 0;
        assert!(!may_be_return_traffic(&c, &refused, port));
        c.mode = MODE_MONITOR;
        c.infra = INFRA_RETURN_TRAFFIC;
        let would = decide(&c, None, port);
        assert!(may_be_return_traffic(&c, &would, port));
    }

    #[test]
    fn rate_keys_separate_families() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[198, 51, 100, 2]);
        assert_ne!(rate_key(FAMILY_V4, &v4), rate_key(FAMILY_V6, &v4));
        assert_eq!(rate_key(FAMILY_V6, &v4), v4);
    }

    #[test]
    fn service_bit_selects_list() {
        let c = cfg(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
        let v = PrefixValue {
            allow_mask: 1 << 2,
            flags: 0,
            entry: 0,
        };
        assert!(decide(&c, Some(&v), Ports::Port { service: 2, tcp: 1 }).passes());
        assert!(!decide(&c, Some(&v), Ports::Port { service: 1, tcp: 1 }).passes());
        assert!(!decide(&c, Some(&v), Ports::NoPort).passes());
    }

    #[test]
    fn deny_and_always_allow_decide_before_the_infrastructure_exemption() {
        let mut c = cfg(MODE_ENFORCE, ACTION_DROP, SCOPE_HOST);
        c.infra = INFRA_DHCP | INFRA_PMTU;
        let port = Ports::Port { service: 0, tcp: 0 };
        let deny = PrefixValue {
            flags: FLAG_DENY,
            ..Default::default()
        };
        let aa = PrefixValue {
            flags: FLAG_ALWAYS_ALLOW,
            ..Default::default()
        };
        assert_eq!(
            decide_packet(&c, Some(&deny), port, INFRA_DHCP).reason,
            REASON_DENY
        );
        assert!(!decide_packet(&c, Some(&deny), port, INFRA_DHCP).passes());
        assert_eq!(
            decide_packet(&c, Some(&aa), Ports::NoPort, INFRA_PMTU).reason,
            REASON_ALWAYS_ALLOW
        );
        assert_eq!(
            decide_packet(&c, None, port, INFRA_DHCP).reason,
            REASON_INFRASTRUCTURE
        );
        // A class the policy does not exempt is judged by the lists.
        assert_eq!(
            decide_packet(&c, None, port, INFRA_NDP).reason,
            REASON_NOT_ALLOWED
        );
        c.mode = MODE_OFF;
        assert_eq!(decide_packet(&c, None, port, INFRA_DHCP).reason, REASON_OFF);
    }
}
