//! The XDP program's verdict flow: parse, look up, the one verdict
//! function of `ipguard_common::decide`, return traffic, attribution,
//! events, reject.

use crate::{
    events::{report, room, spend},
    flows::*,
    maps::*,
    prelude::*,
    reject::send_rst,
    util::*,
};

#[inline(always)]
pub(crate) fn try_ipguard(ctx: &XdpContext) -> Result<u32, ()> {
    // The slot index is read once: everything below looks at that slot
    // only, so one packet is judged by one whole policy.
    let slot = active_slot();
    let cfg = IPG_CONFIG.get(slot).ok_or(())?;
    let scratch = IPG_SCRATCH.get_ptr_mut(SCRATCH_XDP).ok_or(())?;

    // SAFETY: a field of the map value `scratch` points to.
    let ip = match parse::<true>(&xdp_packet(ctx), unsafe { &raw mut (*scratch).word }) {
        Parsed::NonIp => {
            count(counter_index(VERDICT_PASS, REASON_NON_IP));
            return Ok(xdp_action::XDP_PASS);
        }
        Parsed::Malformed => return Ok(malformed(cfg)),
        // SAFETY: as above.
        Parsed::Ip(ip) => forget(unsafe { &raw mut (*scratch).ip }, ip).masked(),
    };
    if !ip.offsets_bounded() {
        // Never from `parse`; checked for the verifier's sake.
        return Ok(malformed(cfg));
    }
    let pkt = xdp_packet_again(ctx);
    let value = lookup(slot, cfg, ip.family, &ip.src());
    let ports = match ip.l4() {
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
        let reply = match ip.l4() {
            L4::Port { .. } => is_reply(&pkt, &ip, cfg),
            _ => is_later_fragment_of_reply(&pkt, &ip),
        };
        if reply {
            d = return_traffic(d.service);
            if ip.fragmented && matches!(ip.l4(), L4::Port { .. }) {
                expect_fragments(&pkt, &ip);
            }
        }
    }

    // Only a decision made by a listed entry credits it: a refusal for
    // "not allowed" was made by no entry, whatever prefix the source hit.
    let entry = match value {
        Some(v) => credited_entry(cfg, v, &d, |list| decider(slot, list, ip.family, &ip.src())),
        None => ENTRY_NONE,
    };
    if entry < ENTRY_CAPACITY {
        add(&IPG_ENTRY_HITS, slot * ENTRY_CAPACITY + entry);
    }
    // The decision's paths end in a few dozen constant verdicts, reasons
    // and entries, each of which would walk the refusal's events and RST
    // apart (~190,000 more verified instructions): from here on they are
    // values.
    // SAFETY: a field of the map value `scratch` points to.
    let (mut d, entry) = forget(unsafe { &raw mut (*scratch).judged }, (d, entry));
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
    let n = count_returning(counter_index(d.verdict, d.reason));
    if sampled_pass(d.verdict, d.reason)
        && let Some(i) = pass_sample_slot(n)
    {
        // The packet as the parser left it in the scratch map: keeping
        // `ip` alive until here would take stack the program lacks.
        // SAFETY: a field of the map value `scratch` points to.
        sample_pass(unsafe { &raw const (*scratch).ip }, &d, i, n);
    }
    let refused = d.verdict != VERDICT_PASS;
    add(&IPG_SVC_COUNTERS, d.service as u32 * 2 + refused as u32);
    Ok(action(d.verdict))
}

/// Writes a passed packet into this CPU's slot `i` of the pass sample.
#[inline(always)]
fn sample_pass(ip: *const IpPacket, d: &Decision, i: u32, seq: u64) {
    if let Some(p) = IPG_PASS_SAMPLE.get_ptr_mut(i) {
        // SAFETY: `ip` points into a map value alive for the program run.
        let ip = unsafe { &*ip };
        let dport = match ip.l4() {
            L4::Port { dport, .. } => dport,
            _ => 0,
        };
        // Field by field: a whole `PassSample` built on the stack first
        // would also take stack the program lacks.
        // SAFETY: this CPU's slot of a per-CPU map: no other writer.
        unsafe {
            (*p).seq = seq;
            (*p).src = ip.src();
            (*p).dport = dport;
            (*p).family = ip.family;
            (*p).protocol = ip.proto;
            (*p).service = d.service;
            (*p).reason = d.reason;
        }
    }
}

/// Refuses (and counts) a frame that claims to be IP but cannot be parsed.
#[inline(always)]
fn malformed(cfg: &PolicyConfig) -> u32 {
    let d = decide_malformed(cfg);
    count(counter_index(d.verdict, d.reason));
    action(d.verdict)
}

/// Whether a DHCP reply comes from a server the policy names.
#[inline(always)]
pub(crate) fn from_dhcp_server(slot: u32, ip: &IpPacket) -> bool {
    let key = Key::new(DHCP_KEY_BITS + 128, dhcp_key(slot, ip.family, &ip.src()));
    IPG_DHCP.get(&key).is_some()
}

#[inline(always)]
pub(crate) fn action(verdict: u8) -> u32 {
    match verdict {
        VERDICT_DROP => xdp_action::XDP_DROP,
        VERDICT_REJECT => xdp_action::XDP_TX,
        _ => xdp_action::XDP_PASS,
    }
}

/// The allow entry of `list` that decides for `src`, for a prefix allowed
/// by several lists with different entries (`ENTRY_LOOKUP`); only such
/// packets pay this second lookup.
#[inline(always)]
pub(crate) fn decider(slot: u32, list: u8, family: u8, src: &[u8; 16]) -> u32 {
    let found = if family == FAMILY_V4 {
        let key = Key::new(
            DECIDER_KEY_BITS + 32,
            decider_key_v4(list, &[src[0], src[1], src[2], src[3]]),
        );
        if slot == 0 {
            IPG_DEC_V4_0.get(&key)
        } else {
            IPG_DEC_V4_1.get(&key)
        }
    } else {
        let key = Key::new(DECIDER_KEY_BITS + 128, decider_key_v6(list, src));
        if slot == 0 {
            IPG_DEC_V6_0.get(&key)
        } else {
            IPG_DEC_V6_1.get(&key)
        }
    };
    found.copied().unwrap_or(ENTRY_NONE)
}
