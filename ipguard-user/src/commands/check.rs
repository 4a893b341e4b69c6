//! `ipguard check FILE [--json]` (docs/cli.md): validate a policy and summarize
//! what it compiles to now.
use std::{io::Write, process::ExitCode, time::SystemTime};

use anyhow::{Context, Result};
use serde_json::json;

use crate::{
    cli::CheckArgs,
    error::Exit,
    policy::{self, CompiledPolicy, Diagnostic, LoadedPolicy},
};

fn diag_json(d: &[Diagnostic]) -> serde_json::Value {
    d.iter()
        .map(|d| json!({"line": d.line(), "column": d.column(), "message": d.message}))
        .collect()
}

/// RFC 3339 to the second: what an operator reads and types.
fn timestamp(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .and_then(|t| jiff::Timestamp::from_second(t.as_second()))
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

pub fn run(args: &CheckArgs) -> Result<ExitCode> {
    let name = args.file.display().to_string();
    let mut stdout = std::io::stdout().lock();
    match policy::load_file(&args.file) {
        Err(errs) => {
            let mut stderr = std::io::stderr().lock();
            for d in errs.errors.iter().chain(&errs.warnings) {
                let _ = writeln!(stderr, "{d}");
            }
            if args.json {
                let out = json!({
                    "valid": false,
                    "file": name,
                    "errors": diag_json(&errs.errors),
                    "warnings": diag_json(&errs.warnings),
                    "prefixes": {"ipv4": 0, "ipv6": 0},
                });
                writeln!(stdout, "{out}").context("cannot write to stdout")?;
            } else {
                let n = errs.errors.len();
                let _ = writeln!(
                    stderr,
                    "{name}: invalid ({n} error{})",
                    if n == 1 { "" } else { "s" }
                );
            }
            Ok(Exit::Refused.into())
        }
        Ok(loaded) => {
            let now = SystemTime::now();
            let names = names_of(args, &loaded.policy)?;
            let mut answers = policy::Resolved::default();
            for (n, r) in &names {
                if let Some(Ok(a)) = r {
                    answers.names.insert(n.name.clone(), a.clone());
                }
            }
            let compiled = policy::compile_with(&loaded.policy, now, &[], &answers);
            let mut stderr = std::io::stderr().lock();
            for w in &loaded.warnings {
                let _ = writeln!(stderr, "{w}");
            }
            if args.json {
                let mut out = summary_json(&name, &loaded, &compiled);
                out["dns"] = names_json(&names);
                writeln!(stdout, "{out}").context("cannot write to stdout")?;
            } else {
                write!(stdout, "{}", summary_text(&name, &loaded, &compiled, now))
                    .context("cannot write to stdout")?;
                write!(stdout, "{}", names_text(&names)).context("cannot write to stdout")?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A DNS name of the policy and, with `--resolve`, what it resolved to
/// (None: not looked up).
type NameAnswer = (
    policy::DnsName,
    Option<std::result::Result<Vec<std::net::IpAddr>, String>>,
);

/// The policy's names, looked up once with `--resolve`.
fn names_of(args: &CheckArgs, p: &policy::Policy) -> Result<Vec<NameAnswer>> {
    let names = p.dns_names();
    if !args.resolve || names.is_empty() {
        return Ok(names.iter().map(|n| (n.clone(), None)).collect());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the resolver's runtime")?;
    let answers = rt.block_on(crate::daemon::dns::resolve_once(p, &args.resolv_conf));
    Ok(answers
        .into_iter()
        .map(|(n, r)| {
            // What this item takes of the name's A and AAAA records.
            let r = r.map(|a| a.into_iter().filter(|x| n.wants(x)).collect());
            (n, Some(r))
        })
        .collect())
}

fn names_text(names: &[NameAnswer]) -> String {
    let mut out = String::new();
    for (n, r) in names {
        let what = match r {
            None => "not resolved (`check --resolve` resolves it)".to_string(),
            Some(Ok(a)) => format!(
                "[{}]",
                a.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(Err(e)) => format!("lookup failed: {e}"),
        };
        out.push_str(&format!("  {n} -> {what}\n"));
    }
    out
}

fn names_json(names: &[NameAnswer]) -> serde_json::Value {
    names
        .iter()
        .map(|(n, r)| {
            json!({
                "name": n.to_string(),
                "resolved": matches!(r, Some(Ok(_))),
                "addresses": match r { Some(Ok(a)) => a.clone(), _ => Vec::new() },
                "error": match r { Some(Err(e)) => Some(e.clone()), _ => None },
            })
        })
        .collect()
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

fn ports_text(s: &policy::Service) -> String {
    s.ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn summary_text(name: &str, l: &LoadedPolicy, c: &CompiledPolicy, now: SystemTime) -> String {
    let p = &l.policy;
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("{name}: valid"));
    line(format!(
        "  mode {}, action {}, scope {}",
        p.mode.as_str(),
        p.action.as_str(),
        p.scope.as_str()
    ));
    if !p.interfaces.is_empty() {
        line(format!("  interfaces: {}", p.interfaces.join(", ")));
    }
    line(format!(
        "  allow: {}; deny: {}; always_allow: {}; groups: {}",
        plural(p.allow.len(), "entry").replace("entrys", "entries"),
        plural(p.deny.len(), "entry").replace("entrys", "entries"),
        plural(p.always_allow.len(), "entry").replace("entrys", "entries"),
        p.groups.len()
    ));
    if p.services.is_empty() {
        line("  services: none".to_string());
    } else {
        line(format!("  services ({}):", p.services.len()));
        let w_name = p.services.iter().map(|s| s.name.len()).max().unwrap_or(0);
        let w_ports = p
            .services
            .iter()
            .map(|s| ports_text(s).len())
            .max()
            .unwrap_or(0);
        for s in &p.services {
            let list = match &s.allow {
                Some(a) => format!(
                    "own allowlist, {}",
                    plural(a.len(), "entry").replace("entrys", "entries")
                ),
                None => "host-wide allowlist".to_string(),
            };
            line(format!(
                "    {:w_name$}  {:w_ports$}  {list}",
                s.name,
                ports_text(s)
            ));
        }
    }
    line(format!(
        "  compiled at {}: {} IPv4 and {} IPv6 prefixes",
        timestamp(now),
        c.v4.len(),
        c.v6.len(),
    ));
    for f in &l.lists {
        line(format!(
            "  list file {}: {}",
            f.name,
            plural(f.prefixes, "prefix").replace("prefixs", "prefixes")
        ));
    }
    let m = kernel_memory(c);
    line(format!(
        "  kernel memory: IPv4 lookup {} per slot, IPv6 lookup {} per slot",
        crate::report::mib(m.ipv4_policy),
        crate::report::mib(m.ipv6_policy)
    ));
    if let Some(t) = c.next_change {
        line(format!(
            "  next change: {} (an `until` or a time window)",
            timestamp(t)
        ));
    }
    line(format!("  warnings: {}", l.warnings.len()));
    out
}

/// What the policy takes in the kernel: its IPv4 and IPv6 tables exactly,
/// as the loader builds them. The arrays themselves are allocated at `run
/// --ipv4-capacity` and `--ipv6-capacity`, whatever the policy.
fn kernel_memory(c: &CompiledPolicy) -> crate::protocol::Memory {
    let t = crate::policy::range4::RangeTable4::of_policy(c);
    let sat = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    crate::protocol::Memory {
        // The daemon's to say: it depends on `run --ipv4-capacity`.
        ipv4_allocated: 0,
        ipv4_policy: ipguard_common::r4_table_bytes(sat(t.ranges.len()), sat(t.leaves.len())),
        ipv6_allocated: 0,
        ipv6_policy: {
            let t = crate::policy::range6::RangeTable6::build(&c.v6);
            ipguard_common::r6_table_bytes(sat(t.nodes.len()), sat(t.leaves.len()))
        },
        deadline_leaves: c.timed.len() as u64,
    }
}

fn summary_json(name: &str, l: &LoadedPolicy, c: &CompiledPolicy) -> serde_json::Value {
    let p = &l.policy;
    let m = kernel_memory(c);
    json!({
        "valid": true,
        "file": name,
        "sha256": l.sha256,
        "errors": [],
        "warnings": diag_json(&l.warnings),
        "prefixes": {"ipv4": c.v4.len(), "ipv6": c.v6.len()},
        "lists": l.lists.iter().map(|f| json!({
            "file": f.name,
            "prefixes": f.prefixes,
            "sha256": f.sha256,
        })).collect::<Vec<_>>(),
        "memory": {
            "ipv4_policy": m.ipv4_policy,
            "ipv6_policy": m.ipv6_policy,
        },
        "mode": p.mode.as_str(),
        "action": p.action.as_str(),
        "scope": p.scope.as_str(),
        "interfaces": p.interfaces,
        "entries": {
            "allow": p.allow.len(),
            "deny": p.deny.len(),
            "always_allow": p.always_allow.len(),
        },
        "groups": p.groups.len(),
        "services": p.services.iter().zip(&c.services).map(|(s, i)| json!({
            "name": s.name,
            "index": i.index,
            "ports": s.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "own_list": s.allow.is_some(),
            "entries": s.allow.as_ref().map(Vec::len),
        })).collect::<Vec<_>>(),
        "next_change": c.next_change.map(timestamp),
    })
}
