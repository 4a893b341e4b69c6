//! The status report, read from the pinned maps and the state directory:
//! built by the daemon (which adds what only it knows) and by `status`
//! when no daemon runs.
use std::collections::BTreeMap;

use anyhow::Result;
use ipguard_common::*;

use crate::{
    datapath::{self, Maps},
    protocol::{
        AttachedJson, Counters, EntryHits, EventCounters, PolicyJson, Prefixes, ServiceJson,
        StatusReport,
    },
    state,
};

fn mode_name(m: u32) -> &'static str {
    match m {
        MODE_ENFORCE => "enforce",
        MODE_MONITOR => "monitor",
        MODE_OFF => "off",
        _ => "none",
    }
}

pub fn collect(maps: &Maps, state_dir: &std::path::Path) -> Result<StatusReport> {
    let slot = maps.active_slot()?;
    let cfg = maps.config(slot)?;
    let applied = state::read_applied(state_dir).filter(|a| a.generation == cfg.generation);
    let raw = maps.counters()?;
    let mut counters = Counters::default();
    let mut verdicts = BTreeMap::new();
    for v in 0..VERDICT_COUNT as u8 {
        for r in 0..REASON_SLOTS as u8 {
            let n = raw[counter_index(v, r) as usize];
            if n == 0 {
                continue;
            }
            verdicts.insert(format!("{}/{}", verdict_name(v), reason_name(r)), n);
            match v {
                VERDICT_PASS => counters.passed += n,
                VERDICT_DROP => counters.dropped += n,
                VERDICT_REJECT => counters.rejected += n,
                _ => counters.would_drop += n,
            }
            if r == REASON_MALFORMED {
                counters.malformed += n;
            }
        }
    }
    counters.rejects_over_budget = raw[COUNTER_REJECTS_OVER_BUDGET as usize];
    let mut services = BTreeMap::new();
    for (i, (passed, refused)) in maps.service_counters()?.into_iter().enumerate() {
        let name = match (i, &applied) {
            (0, _) => Some("(no service)".to_string()),
            (i, Some(a)) => a.service_name(i).map(str::to_string),
            _ => None,
        };
        match name {
            Some(n) => {
                services.insert(n, ServiceJson { passed, refused });
            }
            None if passed + refused > 0 => {
                services.insert(format!("#{i}"), ServiceJson { passed, refused });
            }
            None => {}
        }
    }
    let mut top_entries = Vec::new();
    if let Some(a) = &applied {
        let hits = maps.entry_hits(slot, a.entries.len())?;
        let mut ranked: Vec<(u64, usize)> = hits
            .into_iter()
            .enumerate()
            .map(|(i, h)| (h, i))
            .filter(|(h, _)| *h > 0)
            .collect();
        ranked.sort_by(|a, b| b.cmp(a));
        for (h, i) in ranked.into_iter().take(10) {
            let e = &a.entries[i];
            top_entries.push(EntryHits {
                list: e.list.clone(),
                entry: e.text.clone(),
                label: e.label.clone(),
                hits: h,
            });
        }
    }
    let (prefixes, attached_modes) = match &applied {
        Some(a) => (
            Prefixes {
                ipv4: a.prefixes_v4,
                ipv6: a.prefixes_v6,
            },
            a.attached.clone(),
        ),
        None => {
            let (v4, v6) = maps.prefix_counts(slot);
            (Prefixes { ipv4: v4, ipv6: v6 }, Vec::new())
        }
    };
    let attached = datapath::pinned_links(&maps.pin_dir)
        .into_iter()
        .map(|iface| {
            let mode = attached_modes
                .iter()
                .find(|a| a.iface == iface)
                .map(|a| a.mode);
            AttachedJson {
                note: mode
                    .and_then(|m| datapath::reject_note(&iface, m))
                    .map(str::to_string),
                mode: mode.map(|m| m.as_str().to_string()),
                iface,
            }
        })
        .collect();
    let caps = maps.capacities();
    Ok(StatusReport {
        dns: Vec::new(),
        feeds: Vec::new(),
        daemon: true,
        kernel: crate::kernel::probe(),
        attached,
        mode: mode_name(cfg.mode).to_string(),
        action: if cfg.action == ACTION_REJECT {
            "reject"
        } else {
            "drop"
        }
        .to_string(),
        scope: if cfg.scope == SCOPE_SERVICES {
            "services"
        } else {
            "host"
        }
        .to_string(),
        generation: cfg.generation,
        policy: applied.as_ref().map(|a| PolicyJson {
            path: a.path.clone(),
            sha256: a.sha256.clone(),
            applied_at: a.applied_at.clone(),
        }),
        prefixes,
        capacity: Prefixes {
            ipv4: caps.v4 as usize,
            ipv6: caps.v6 as usize,
        },
        memory: maps.memory(slot),
        counters,
        verdicts,
        services,
        top_entries,
        events: EventCounters {
            sent: raw[COUNTER_EVENTS_SENT as usize],
            suppressed_per_source: raw[COUNTER_EVENTS_SUPPRESSED_SOURCE as usize],
            suppressed_global: raw[COUNTER_EVENTS_SUPPRESSED_GLOBAL as usize],
            lost: raw[COUNTER_EVENTS_LOST as usize],
        },
        flows: maps.flow_stats().ok(),
        top_blocked: Vec::new(),
        runtime_entries: 0,
        lists: Vec::new(),
    })
}

/// Bytes as MiB with one decimal ("9.5 MiB"), or KiB below one MiB.
pub fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{} KiB", bytes.div_ceil(1024))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}
