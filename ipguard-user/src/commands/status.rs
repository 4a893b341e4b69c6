//! `ipguard status`: what is enforced and what it has done, from the
//! daemon, or read from the pinned maps when no daemon runs.
use std::{fmt::Write, process::ExitCode};

use anyhow::Result;

use crate::{
    cli::StatusArgs,
    datapath::{self, Maps},
    error::CliError,
    protocol::StatusReport,
    report,
};

pub fn run(args: &StatusArgs) -> Result<ExitCode> {
    // The daemon knows more (refused sources); the pinned maps answer
    // when it is not running.
    let st = match super::client::status_from_daemon(&args.sock.socket) {
        Some(st) => st,
        None => {
            datapath::ensure_root().map_err(|e| CliError::system(e.to_string()))?;
            let maps =
                Maps::open(&args.loc.pin_dir).map_err(|e| CliError::system(e.to_string()))?;
            let mut st = report::collect(&maps, &args.loc.state_dir)?;
            st.daemon = false;
            st
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", render(&st));
    }
    Ok(ExitCode::SUCCESS)
}

/// The text form of a status report.
pub fn render(st: &StatusReport) -> String {
    let mut o = String::new();
    let att: Vec<String> = st
        .attached
        .iter()
        .map(|a| format!("{} ({})", a.iface, a.mode.as_deref().unwrap_or("?")))
        .collect();
    let daemon = if st.daemon {
        ""
    } else {
        " (daemon not running: read from the pinned maps)"
    };
    let _ = writeln!(
        o,
        "kernel:     {}{}",
        st.kernel.release,
        if st.kernel.missing.is_empty() {
            String::new()
        } else {
            format!(" (missing: {})", st.kernel.missing.join("; "))
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
    for a in &st.attached {
        if let Some(note) = &a.note {
            let _ = writeln!(o, "            {}: {note}", a.iface);
        }
    }
    let _ = writeln!(
        o,
        "mode:       {}, action {}, scope {}",
        st.mode, st.action, st.scope
    );
    match &st.policy {
        Some(p) => {
            let _ = writeln!(
                o,
                "policy:     {} (sha256 {}, applied {}, generation {})",
                p.path,
                &p.sha256[..p.sha256.len().min(12)],
                p.applied_at,
                st.generation
            );
        }
        None => {
            let _ = writeln!(
                o,
                "policy:     generation {} (no record of its file)",
                st.generation
            );
        }
    }
    let _ = writeln!(
        o,
        "prefixes:   {} IPv4 of {}, {} IPv6 of {}; {} runtime entries",
        st.prefixes.ipv4, st.capacity.ipv4, st.prefixes.ipv6, st.capacity.ipv6, st.runtime_entries
    );
    let m = &st.memory;
    let deadlines = if m.deadline_leaves > 0 {
        format!(
            " ({} leaves hold deadlines of time-limited entries)",
            m.deadline_leaves
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "memory:     IPv4 lookup {} allocated (both slots), {} for this policy{deadlines}; IPv6 lookup {} allocated, {} for this policy",
        crate::report::mib(m.ipv4_allocated),
        crate::report::mib(m.ipv4_policy),
        crate::report::mib(m.ipv6_allocated),
        crate::report::mib(m.ipv6_policy)
    );
    let c = &st.counters;
    let _ = writeln!(
        o,
        "packets:    {} passed, {} dropped, {} rejected, {} would_drop ({} malformed{})",
        c.passed,
        c.dropped,
        c.rejected,
        c.would_drop,
        c.malformed,
        match c.rejects_over_budget {
            0 => String::new(),
            k => format!("; {k} rejects dropped over the RST budget"),
        }
    );
    for (k, v) in &st.verdicts {
        let _ = writeln!(o, "            {k:<28} {v}");
    }
    if !st.services.is_empty() {
        let _ = writeln!(o, "services:");
        for (name, s) in &st.services {
            let _ = writeln!(
                o,
                "            {name:<20} {} passed, {} refused",
                s.passed, s.refused
            );
        }
    }
    if !st.top_entries.is_empty() {
        let _ = writeln!(o, "top entries:");
        for e in &st.top_entries {
            let label = e
                .label
                .as_deref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "            {:<8} {}{} in {}",
                e.hits, e.entry, label, e.list
            );
        }
    }
    let ev = &st.events;
    let _ = writeln!(
        o,
        "events:     {} relayed, {} suppressed per source, {} over the global cap, {} lost",
        ev.sent, ev.suppressed_per_source, ev.suppressed_global, ev.lost
    );
    if let Some(f) = &st.flows {
        let _ = writeln!(
            o,
            "flows:      {} of {} (return traffic); {} created, {} deleted, {} evicted, {} not recorded",
            f.live, f.capacity, f.created, f.deleted, f.evicted, f.not_recorded
        );
    }
    for n in &st.dns {
        let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
        let when = match &n.resolved_at {
            Some(t) => format!("resolved {t}"),
            None => "never resolved".to_string(),
        };
        let failed = match (&n.last_error, &n.last_failure) {
            (Some(e), Some(t)) => format!("; failing since {t}: {e}"),
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "dns name:   {} -> [{}] ({when}{failed})",
            n.name,
            addrs.join(", ")
        );
    }
    for f in &st.feeds {
        let copy = match &f.changed_at {
            Some(t) => format!("{} entries, {} prefixes, copy of {t}", f.items, f.prefixes),
            None => "no copy yet: stands for no address".to_string(),
        };
        let fetched = f
            .fetched_at
            .as_ref()
            .map(|t| format!("; fetched {t}"))
            .unwrap_or_default();
        let failed = match (&f.last_error, &f.last_failure) {
            (Some(e), Some(t)) if f.held => format!("; {e} (at {t})"),
            (Some(e), Some(t)) => format!("; last fetch failed at {t}: {e}"),
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "feed:       {} {} ({copy}{fetched}{failed})",
            f.group, f.url
        );
    }
    for l in &st.lists {
        let _ = writeln!(
            o,
            "list file:  {} ({} prefixes, sha256 {})",
            l.file,
            l.prefixes,
            l.sha256.get(..12).unwrap_or(&l.sha256)
        );
    }
    if !st.top_blocked.is_empty() {
        let _ = writeln!(o, "top refused sources:");
        for b in &st.top_blocked {
            let svc = b
                .service
                .as_deref()
                .map(|s| format!(" service {s}"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "            {:<8} {}{} (first {}, last {})",
                b.count, b.src, svc, b.first_seen, b.last_seen
            );
        }
    }
    o
}
