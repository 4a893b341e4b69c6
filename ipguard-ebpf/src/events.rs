//! Events of refused packets and the per-CPU budgets that bound them (and
//! the RSTs of `action: reject`).

use crate::{maps::*, prelude::*, util::*};

/// This CPU's share of a per-second budget of `max_per_sec` for the whole
/// host (see `EventBudget`), when it has room left; the caller counts what
/// it uses with [`spend`].
#[inline(always)]
pub(crate) fn room(
    budget: &PerCpuArray<EventBudget>,
    max_per_sec: u32,
) -> Option<*mut EventBudget> {
    if max_per_sec == 0 {
        return None;
    }
    let p = budget.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot: no other writer.
    let b = unsafe { &mut *p };
    // In a flood the share is spent and stays so for the rest of the
    // second: the clock is read once per tick, not per packet (the
    // helper call was about 30 ns of a refused packet's 80 in `cargo
    // xtask bench`; the tick count is a load the verifier inlines). A new
    // window opens at most one tick (1 to 10 ms) late.
    // SAFETY: the helper takes no arguments and touches no memory.
    let tick = unsafe { bpf_jiffies64() };
    if b.spent_tick == tick {
        return None;
    }
    let t = now();
    if t.wrapping_sub(b.window_start_ns) >= NS_PER_SEC {
        b.window_start_ns = t;
        b.used = 0;
    }
    // SAFETY: a read-only global the loader sets.
    let cpus = unsafe { core::ptr::read_volatile(&IPG_NR_CPUS) }.max(1);
    // `used >= ceil(max / cpus)`, multiplied out: the same for integers,
    // without a division on every refused packet of a flood. `used` never
    // passes a u32 (it stops at the share), and bounded so, the product
    // cannot overflow.
    if b.used.min(u32::MAX as u64) * u64::from(cpus) >= u64::from(max_per_sec) {
        b.spent_tick = tick;
        return None;
    }
    Some(p)
}

/// Uses one of the budget [`room`] found room in.
#[inline(always)]
pub(crate) fn spend(b: *mut EventBudget) {
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
pub(crate) fn report(
    ctx: &XdpContext,
    cfg: &PolicyConfig,
    ip: &IpPacket,
    d: &Decision,
    entry: u32,
) {
    let Some(budget) = room(&IPG_EVENT_BUDGET, cfg.event_max_per_sec) else {
        count(COUNTER_EVENTS_SUPPRESSED_GLOBAL);
        return;
    };
    let t = now();
    let per_source = cfg.event_source_interval_ns != 0;
    let key = rate_key(ip.family, &ip.src());
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
                src: ip.src(),
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
pub(crate) fn ports_of(ip: &IpPacket) -> (u16, u16) {
    match ip.l4() {
        L4::Port { sport, dport } => (dport, sport),
        _ => (0, 0),
    }
}
