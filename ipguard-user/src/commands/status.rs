//! `ipguard status`: what is enforced and what it has done, read from the
//! pinned maps (so it works whether or not the daemon runs).
use std::{collections::BTreeMap, process::ExitCode};

use anyhow::Result;
use ipguard_common::*;
use serde::Serialize;

use crate::{
    cli::StatusArgs,
    datapath::{self, Maps},
    error::CliError,
    state,
};

#[derive(Debug, Serialize)]
pub struct Status {
    /// The running kernel and the datapath features it lacks.
    pub kernel: crate::kernel::Kernel,
    pub attached: Vec<AttachedJson>,
    pub mode: &'static str,
    pub action: &'static str,
    pub scope: &'static str,
    pub generation: u64,
    pub policy: Option<PolicyJson>,
    pub prefixes: Prefixes,
    pub capacity: Prefixes,
    pub counters: Counters,
    /// Every verdict and reason with a non-zero count.
    pub verdicts: BTreeMap<String, u64>,
    pub services: BTreeMap<String, ServiceJson>,
    pub top_entries: Vec<EntryHits>,
    pub events: EventCounters,
    /// Return-traffic flows (connections the host opened); None when the
    /// table could not be read.
    pub flows: Option<datapath::FlowStats>,
    /// Filled by the daemon from relayed events; empty without a daemon.
    pub top_blocked: Vec<crate::daemon::blocked::BlockedSource>,
    pub runtime_entries: usize,
}

#[derive(Debug, Serialize)]
pub struct AttachedJson {
    pub iface: String,
    pub mode: Option<&'static str>,
    /// How `action: reject` fares on this interface, when it needs saying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct PolicyJson {
    pub path: String,
    pub sha256: String,
    pub applied_at: String,
}

#[derive(Debug, Serialize, Default)]
pub struct Prefixes {
    pub ipv4: usize,
    pub ipv6: usize,
}

#[derive(Debug, Serialize, Default)]
pub struct Counters {
    pub passed: u64,
    pub dropped: u64,
    pub would_drop: u64,
    pub rejected: u64,
    pub malformed: u64,
    /// Refusals of `action: reject` dropped without a RST: the second's
    /// RST budget (`reject_max_rate`) was spent. Counted in `dropped`.
    pub rejects_over_budget: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceJson {
    pub passed: u64,
    pub refused: u64,
}

#[derive(Debug, Serialize)]
pub struct EntryHits {
    pub list: String,
    pub entry: String,
    pub label: Option<String>,
    pub hits: u64,
}

#[derive(Debug, Serialize)]
pub struct EventCounters {
    pub sent: u64,
    pub suppressed_per_source: u64,
    pub suppressed_global: u64,
    pub lost: u64,
}

fn mode_name(m: u32) -> &'static str {
    match m {
        MODE_ENFORCE => "enforce",
        MODE_MONITOR => "monitor",
        MODE_OFF => "off",
        _ => "none",
    }
}

pub fn collect(maps: &Maps, state_dir: &std::path::Path) -> Result<Status> {
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
                note: mode.and_then(|m| datapath::reject_note(&iface, m)),
                mode: mode.map(|m| m.as_str()),
                iface,
            }
        })
        .collect();
    let caps = maps.capacities();
    Ok(Status {
        kernel: crate::kernel::probe(),
        attached,
        mode: mode_name(cfg.mode),
        action: if cfg.action == ACTION_REJECT {
            "reject"
        } else {
            "drop"
        },
        scope: if cfg.scope == SCOPE_SERVICES {
            "services"
        } else {
            "host"
        },
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
    })
}

pub fn run(args: &StatusArgs) -> Result<ExitCode> {
    // The daemon knows more (refused sources); the pinned maps answer
    // when it is not running.
    let value = match super::client::status_from_daemon(&args.sock.socket) {
        Some(v) => v,
        None => {
            datapath::ensure_root().map_err(|e| CliError::system(e.to_string()))?;
            let maps =
                Maps::open(&args.loc.pin_dir).map_err(|e| CliError::system(e.to_string()))?;
            let mut v = serde_json::to_value(collect(&maps, &args.loc.state_dir)?)?;
            v["daemon"] = serde_json::json!(false);
            v
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", render(&value));
    }
    Ok(ExitCode::SUCCESS)
}

fn render(st: &serde_json::Value) -> String {
    use std::fmt::Write;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let t = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    let mut o = String::new();
    let att: Vec<String> = st["attached"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| format!("{} ({})", t(&a["iface"]), t(&a["mode"])))
        .collect();
    let notes: Vec<String> = st["attached"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["note"].is_string())
        .map(|a| format!("            {}: {}", t(&a["iface"]), t(&a["note"])))
        .collect();
    let daemon = if st["daemon"] == serde_json::json!(false) {
        " (daemon not running: read from the pinned maps)"
    } else {
        ""
    };
    let missing: Vec<String> = st["kernel"]["missing"]
        .as_array()
        .into_iter()
        .flatten()
        .map(t)
        .collect();
    let _ = writeln!(
        o,
        "kernel:     {}{}",
        t(&st["kernel"]["release"]),
        if missing.is_empty() {
            String::new()
        } else {
            format!(" (missing: {})", missing.join("; "))
        }
    );
    let _ = writeln!(
        o,
        "attached:   {}{daemon}",
        if att.is_empty() {
            "nothing".into()
        } else {
            att.join(", ")
        }
    );
    for line in notes {
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(
        o,
        "mode:       {}, action {}, scope {}",
        t(&st["mode"]),
        t(&st["action"]),
        t(&st["scope"])
    );
    let p = &st["policy"];
    if p.is_object() {
        let sha = t(&p["sha256"]);
        let _ = writeln!(
            o,
            "policy:     {} (sha256 {}, applied {}, generation {})",
            t(&p["path"]),
            &sha[..sha.len().min(12)],
            t(&p["applied_at"]),
            n(&st["generation"])
        );
    } else {
        let _ = writeln!(
            o,
            "policy:     generation {} (no record of its file)",
            n(&st["generation"])
        );
    }
    let _ = writeln!(
        o,
        "prefixes:   {} IPv4 of {}, {} IPv6 of {}; {} runtime entries",
        n(&st["prefixes"]["ipv4"]),
        n(&st["capacity"]["ipv4"]),
        n(&st["prefixes"]["ipv6"]),
        n(&st["capacity"]["ipv6"]),
        n(&st["runtime_entries"])
    );
    let c = &st["counters"];
    let _ = writeln!(
        o,
        "packets:    {} passed, {} dropped, {} rejected, {} would_drop ({} malformed{})",
        n(&c["passed"]),
        n(&c["dropped"]),
        n(&c["rejected"]),
        n(&c["would_drop"]),
        n(&c["malformed"]),
        match n(&c["rejects_over_budget"]) {
            0 => String::new(),
            k => format!("; {k} rejects dropped over the RST budget"),
        }
    );
    for (k, v) in st["verdicts"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "            {k:<28} {}", n(v));
    }
    if let Some(svcs) = st["services"].as_object().filter(|m| !m.is_empty()) {
        let _ = writeln!(o, "services:");
        for (name, s) in svcs {
            let _ = writeln!(
                o,
                "            {name:<20} {} passed, {} refused",
                n(&s["passed"]),
                n(&s["refused"])
            );
        }
    }
    if let Some(top) = st["top_entries"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(o, "top entries:");
        for e in top {
            let label = e["label"]
                .as_str()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "            {:<8} {}{} in {}",
                n(&e["hits"]),
                t(&e["entry"]),
                label,
                t(&e["list"])
            );
        }
    }
    let ev = &st["events"];
    let _ = writeln!(
        o,
        "events:     {} relayed, {} suppressed per source, {} over the global cap, {} lost",
        n(&ev["sent"]),
        n(&ev["suppressed_per_source"]),
        n(&ev["suppressed_global"]),
        n(&ev["lost"])
    );
    let f = &st["flows"];
    if f.is_object() {
        let _ = writeln!(
            o,
            "flows:      {} of {} (return traffic); {} created, {} deleted, {} evicted, {} not recorded",
            n(&f["live"]),
            n(&f["capacity"]),
            n(&f["created"]),
            n(&f["deleted"]),
            n(&f["evicted"]),
            n(&f["not_recorded"])
        );
    }
    if let Some(top) = st["top_blocked"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(o, "top refused sources:");
        for b in top {
            let svc = b["service"]
                .as_str()
                .map(|s| format!(" service {s}"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "            {:<8} {}{} (first {}, last {})",
                n(&b["count"]),
                t(&b["src"]),
                svc,
                t(&b["first_seen"]),
                t(&b["last_seen"])
            );
        }
    }
    o
}
