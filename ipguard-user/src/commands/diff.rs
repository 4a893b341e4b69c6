//! `ipguard diff OLD NEW` (docs/cli.md): what changes from one policy file
//! to another (`policy::diff`), and, when a daemon runs, which of the
//! packets it saw recently would be judged otherwise. The text form is
//! shared with `apply --dry-run`.

use std::{io::Write, process::ExitCode, time::SystemTime};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{
    cli::DiffArgs,
    control::Client,
    error::Diagnostics,
    policy,
    protocol::{Probe, Request, changes_json},
};

pub fn run(args: &DiffArgs) -> Result<ExitCode> {
    let load = |p: &std::path::Path| {
        policy::load_file_with(p, policy::Coverage::Defer).map_err(|e| Diagnostics(e.to_string()))
    };
    let (old, new) = (load(&args.old)?, load(&args.new)?);
    let d = policy::diff(&old.policy, &new.policy);
    let mut v = json!({
        "lists": d.lists,
        "services": d.services,
        "settings": d.settings,
    });
    // The daemon's recent packets, if one answers: a diff of files is
    // still a diff without it.
    let seen: Option<Vec<Probe>> = Client::connect(&args.sock.socket)
        .ok()
        .and_then(|mut c| c.call_as(&Request::Seen {}).ok());
    match seen {
        Some(probes) => {
            let now = SystemTime::now();
            let a = policy::compile(&old.policy, now, &[]);
            let b = policy::compile(&new.policy, now, &[]);
            let queries: Vec<_> = probes.iter().map(Probe::query).collect();
            let changes = policy::verdict_changes(&a, &b, &queries);
            let verdicts = changes_json(&changes, &probes);
            v["judged"] = json!(probes.len());
            v["verdicts"] = json!(verdicts);
        }
        None => {
            v["judged"] = Value::Null;
            v["verdicts"] = Value::Null;
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{v}").context("cannot write to stdout")?;
    } else {
        print(
            &mut out,
            &v,
            &format!("{} -> {}", args.old.display(), args.new.display()),
        );
        if v["verdicts"].is_null() {
            let _ = writeln!(
                out,
                "(no daemon answers at {}: no recent sources judged)",
                args.sock.socket.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The text form of a diff answer (of `diff` or `apply --dry-run`).
pub fn print<W: Write>(out: &mut W, v: &Value, title: &str) {
    let _ = writeln!(out, "{title}");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut same = true;
    for l in v["lists"].as_array().into_iter().flatten() {
        let name = l["list"].as_str().unwrap_or_default();
        for (key, sign) in [
            ("added", "+"),
            ("removed", "-"),
            ("sources_added", "+"),
            ("sources_removed", "-"),
        ] {
            for x in strings(&l[key]) {
                same = false;
                let _ = writeln!(out, "  {name}: {sign}{x}");
            }
        }
    }
    for x in strings(&v["services"])
        .into_iter()
        .chain(strings(&v["settings"]))
    {
        same = false;
        let _ = writeln!(out, "  {x}");
    }
    if same {
        let _ = writeln!(out, "  no difference in lists, services or settings");
    }
    if let Some(vs) = v["verdicts"].as_array() {
        let judged = v["judged"].as_u64().unwrap_or(0);
        if vs.is_empty() {
            let _ = writeln!(
                out,
                "verdicts: none of the {judged} packets the daemon saw recently would change"
            );
        } else {
            let _ = writeln!(
                out,
                "verdicts that would change ({} of {judged} recent packets):",
                vs.len()
            );
        }
        for c in vs {
            let side = |s: &Value| {
                let mut t = format!(
                    "{} ({})",
                    s["verdict"].as_str().unwrap_or_default(),
                    s["reason"].as_str().unwrap_or_default()
                );
                if let Some(w) = s["written"].as_str() {
                    t.push_str(&format!(" by {w:?}"));
                }
                t
            };
            let port = c["port"]
                .as_str()
                .map(|p| format!(" {p}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {}{port} [{}]: {} -> {}",
                c["src"].as_str().unwrap_or_default(),
                c["seen"].as_str().unwrap_or_default(),
                side(&c["old"]),
                side(&c["new"])
            );
        }
    }
    if let Some(cut) = v["cut_sessions"].as_array() {
        for s in cut {
            let guard = if s["lockout_guard"] == true {
                " (lockout guard: apply refuses it without --force)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  would cut the established session {}:{} -> port {}{guard}",
                s["remote"].as_str().unwrap_or_default(),
                s["remote_port"],
                s["local_port"]
            );
        }
    }
}
