//! Subcommands that talk to the running daemon over its control socket.
use std::{net::IpAddr, process::ExitCode};

use anyhow::Result;

use crate::{
    cli::{AllowArgs, ApplyArgs, BlockedArgs, ConfirmArgs, EventsArgs, RevokeArgs},
    control::Client,
    error::CliError,
    protocol::{ApplyAnswer, EventLine, ListText, Request, RevokeAnswer},
    runtime::parse_duration,
    runtime::parse_net,
};

pub fn apply(args: &ApplyArgs) -> Result<ExitCode> {
    let bytes = crate::policy::read_policy_bytes(&args.file)
        .map_err(|e| CliError::refused(format!("{}: {e}", args.file.display())))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        CliError::refused(format!(
            "{}: the policy is not UTF-8 (`ipguard check` shows where)",
            args.file.display()
        ))
    })?;
    if let Some(secs) = args.confirm {
        crate::runtime::check_confirm(secs).map_err(CliError::refused)?;
    }
    let path = std::fs::canonicalize(&args.file).unwrap_or_else(|_| args.file.clone());
    let lists = list_files(args, &text)?;
    let mut c = Client::connect(&args.sock.socket)?;
    let answer: ApplyAnswer = c.call_as(&Request::Apply {
        path: path.display().to_string(),
        text,
        lists,
        confirm_secs: args.confirm,
        force: args.force,
    })?;
    for w in &answer.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "applied {} (generation {}, {} IPv4 and {} IPv6 prefixes)",
        args.file.display(),
        answer.generation,
        answer.prefixes.ipv4,
        answer.prefixes.ipv6
    );
    if let Some(secs) = args.confirm {
        println!(
            "run `ipguard confirm` within {secs} s to keep it; otherwise the previous policy comes back"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The list files the policy names, read here: the daemon never opens a
/// file a client names. Only a policy that names some is checked here
/// first (to find them); the daemon checks every policy again.
fn list_files(args: &ApplyArgs, text: &str) -> Result<Vec<ListText>> {
    if !text.contains("file:") {
        return Ok(Vec::new());
    }
    let loaded = crate::policy::load_file(&args.file)
        .map_err(|e| crate::error::Diagnostics(e.to_string()))?;
    let disk = crate::policy::DiskLists::beside(&args.file);
    loaded
        .lists
        .iter()
        .map(|l| {
            let path = disk.path_of(&l.written);
            let bytes = crate::policy::read_list_bytes(&path)
                .map_err(|e| CliError::refused(format!("{}: {e}", path.display())))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                CliError::refused(format!(
                    "{}: the list file is not UTF-8 (`ipguard check` shows where)",
                    path.display()
                ))
            })?;
            Ok(ListText {
                path: l.written.clone(),
                text,
            })
        })
        .collect()
}

pub fn confirm(args: &ConfirmArgs) -> Result<ExitCode> {
    Client::connect(&args.sock.socket)?.call(&Request::Confirm {})?;
    println!("confirmed: the applied policy stays");
    Ok(ExitCode::SUCCESS)
}

fn print_event(e: &EventLine, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
    } else {
        let port = e.dport.map(|p| format!("/{p}")).unwrap_or_default();
        let svc = e
            .service
            .as_deref()
            .map(|s| format!(" service {s}"))
            .unwrap_or_default();
        let sup = if e.suppressed > 0 {
            format!(" (+{} suppressed)", e.suppressed)
        } else {
            String::new()
        };
        println!(
            "{} {} {} -> {}{}{} {} ({}){}",
            e.time, e.iface, e.src, e.protocol, port, svc, e.verdict, e.reason, sup
        );
    }
    Ok(())
}

pub fn events(args: &EventsArgs) -> Result<ExitCode> {
    let mut c = Client::connect(&args.sock.socket)?;
    let data = c.call(&Request::Events {
        follow: args.follow,
    })?;
    let list: Vec<EventLine> = serde_json::from_value(data)
        .map_err(|e| CliError::system(format!("malformed answer: {e}")))?;
    for e in &list {
        print_event(e, args.json)?;
    }
    if args.follow {
        while let Some(line) = c.read_line()? {
            match serde_json::from_str::<EventLine>(&line) {
                Ok(e) => print_event(&e, args.json)?,
                Err(_) => eprintln!("ipguard: {line}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn allow(args: &AllowArgs) -> Result<ExitCode> {
    parse_net(&args.addr).map_err(CliError::refused)?;
    let for_secs = match &args.duration {
        Some(d) => {
            let d = parse_duration(d).map_err(CliError::usage)?;
            crate::runtime::check_for(d).map_err(CliError::refused)?;
            Some(d.as_secs())
        }
        None => None,
    };
    let data = Client::connect(&args.sock.socket)?.call(&Request::Allow {
        addr: args.addr.clone(),
        for_secs,
        service: args.service.clone(),
        label: args.label.clone(),
    })?;
    let until = data["until"]
        .as_str()
        .map(|u| format!(" until {u}"))
        .unwrap_or_else(|| " until revoked".into());
    let scope = args
        .service
        .as_deref()
        .map(|s| format!("service {s}"))
        .unwrap_or_else(|| "the host-wide list".into());
    println!(
        "allowed {} in {scope}{until}",
        data["addr"].as_str().unwrap_or(&args.addr)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn revoke(args: &RevokeArgs) -> Result<ExitCode> {
    parse_net(&args.addr).map_err(CliError::refused)?;
    let answer: RevokeAnswer = Client::connect(&args.sock.socket)?.call_as(&Request::Revoke {
        addr: args.addr.clone(),
    })?;
    for w in &answer.warnings {
        eprintln!("warning: {w}");
    }
    println!("revoked {}", args.addr);
    Ok(ExitCode::SUCCESS)
}

pub fn blocked(args: &BlockedArgs) -> Result<ExitCode> {
    let data = Client::connect(&args.sock.socket)?.call(&Request::Blocked {})?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(ExitCode::SUCCESS);
    }
    let list = data.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no refused sources seen since the daemon started");
    }
    for b in list {
        let src: IpAddr = serde_json::from_value(b["src"].clone())
            .map_err(|e| CliError::system(e.to_string()))?;
        let svc = b["service"]
            .as_str()
            .map(|s| format!(" service {s}"))
            .unwrap_or_default();
        println!(
            "{:>8}  {src:<39} first {} last {}{svc}   (approve: ipguard allow {src} --for 8h)",
            b["count"],
            b["first_seen"].as_str().unwrap_or(""),
            b["last_seen"].as_str().unwrap_or(""),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `status` through the daemon; None when no daemon answers.
pub fn status_from_daemon(socket: &std::path::Path) -> Option<crate::protocol::StatusReport> {
    let mut c = Client::connect(socket).ok()?;
    c.set_timeout(Some(std::time::Duration::from_secs(10)));
    c.call_as(&Request::Status {}).ok()
}
