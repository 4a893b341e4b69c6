//! Subcommands that talk to the running daemon over its control socket.
use std::{net::IpAddr, process::ExitCode};

use anyhow::Result;

use crate::{
    cli::{
        AllowArgs, ApplyArgs, BlockedArgs, ConfirmArgs, DenyArgs, EventsArgs, RejectArgs,
        RevokeArgs, UndenyArgs,
    },
    control::Client,
    error::CliError,
    protocol::{ApplyAnswer, DenyAnswer, DenyItem, EventLine, ListText, Request, RevokeAnswer},
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
    if args.dry_run {
        let v = c.call(&Request::Apply {
            path: path.display().to_string(),
            text,
            lists,
            confirm_secs: None,
            force: false,
            dry_run: true,
        })?;
        let mut out = std::io::stdout().lock();
        if args.json {
            use std::io::Write;
            let _ = writeln!(out, "{v}");
        } else {
            super::diff::print(
                &mut out,
                &v,
                &format!("the policy in force -> {}", args.file.display()),
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let answer: ApplyAnswer = c.call_as(&Request::Apply {
        path: path.display().to_string(),
        text,
        lists,
        confirm_secs: args.confirm,
        force: args.force,
        dry_run: false,
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

pub fn deny(args: &DenyArgs) -> Result<ExitCode> {
    let entries = if args.stdin {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| CliError::system(format!("cannot read standard input: {e}")))?;
        deny_lines(&text).map_err(CliError::refused)?
    } else {
        let addr = args.addr.clone().unwrap_or_default();
        vec![
            deny_item(&addr, args.duration.as_deref(), args.label.clone())
                .map_err(CliError::refused)?,
        ]
    };
    let n = entries.len();
    let one = (!args.stdin).then(|| entries[0].clone());
    let answer: DenyAnswer =
        Client::connect(&args.sock.socket)?.call_as(&Request::Deny { entries })?;
    for w in &answer.warnings {
        eprintln!("warning: {w}");
    }
    match one {
        Some(e) => println!(
            "denied {}{}",
            e.addr,
            e.for_secs
                .map(|s| format!(" for {s} s"))
                .unwrap_or_else(|| " until undenied".into())
        ),
        None => println!("denied {n} sources in one swap"),
    }
    Ok(ExitCode::SUCCESS)
}

/// One source of `deny`, checked here so that a typo is a usage error
/// before the daemon is asked.
fn deny_item(
    addr: &str,
    duration: Option<&str>,
    label: Option<String>,
) -> Result<DenyItem, String> {
    parse_net(addr)?;
    let for_secs = match duration {
        Some(d) => {
            let d = parse_duration(d)?;
            crate::runtime::check_for(d)?;
            Some(d.as_secs())
        }
        None => None,
    };
    Ok(DenyItem {
        addr: addr.to_string(),
        for_secs,
        label,
    })
}

/// `ADDR [DURATION] [LABEL]` lines (`-` for no duration, the label the rest
/// of the line); blank lines and `#` comments skipped. Any bad line refuses
/// the whole batch, naming the first ten.
pub fn deny_lines(text: &str) -> Result<Vec<DenyItem>, String> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        // Fields apart by any run of blanks; the label is the rest.
        let field = |s: &str| -> (String, String) {
            let s = s.trim_start();
            match s.find(char::is_whitespace) {
                Some(i) => (s[..i].to_string(), s[i..].trim_start().to_string()),
                None => (s.to_string(), String::new()),
            }
        };
        let (addr, rest) = field(line);
        let (duration, label) = field(&rest);
        let duration = Some(duration.as_str()).filter(|d| !d.is_empty() && *d != "-");
        let label = Some(label.trim().to_string()).filter(|l| !l.is_empty());
        match deny_item(&addr, duration, label) {
            Ok(item) => out.push(item),
            Err(e) => bad.push(format!("line {}: {e}", i + 1)),
        }
    }
    if !bad.is_empty() {
        let more = bad.len().saturating_sub(10);
        bad.truncate(10);
        let mut msg = format!("standard input: nothing denied: {}", bad.join("; "));
        if more > 0 {
            msg.push_str(&format!("; and {more} more bad lines"));
        }
        return Err(msg);
    }
    if out.is_empty() {
        return Err(
            "standard input: no source to deny (lines of `ADDR [DURATION] [LABEL]`)".into(),
        );
    }
    Ok(out)
}

pub fn reject(args: &RejectArgs) -> Result<ExitCode> {
    // The same checks as `deny`, before the daemon is asked.
    let item = deny_item(&args.addr, args.duration.as_deref(), args.label.clone())
        .map_err(CliError::refused)?;
    let data = Client::connect(&args.sock.socket)?.call(&Request::Reject {
        addr: item.addr,
        deny: args.deny,
        for_secs: item.for_secs,
        label: item.label,
    })?;
    for w in data["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
    let denied = if args.deny { " and denied it" } else { "" };
    println!(
        "rejected the access request of {}{denied}",
        data["rejected"].as_str().unwrap_or(&args.addr)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn undeny(args: &UndenyArgs) -> Result<ExitCode> {
    parse_net(&args.addr).map_err(CliError::refused)?;
    let answer: RevokeAnswer = Client::connect(&args.sock.socket)?.call_as(&Request::Undeny {
        addr: args.addr.clone(),
    })?;
    for w in &answer.warnings {
        eprintln!("warning: {w}");
    }
    println!("undenied {}", args.addr);
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
        let status = b["status"].as_str().unwrap_or("pending");
        let hint = if status == "pending" {
            format!("   (approve: ipguard allow {src} --for 8h; reject: ipguard reject {src})")
        } else {
            String::new()
        };
        println!(
            "{:>8}  {src:<39} {status:<8} first {} last {}{svc}{hint}",
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

pub fn history(args: &crate::cli::HistoryArgs) -> Result<ExitCode> {
    let mut c = Client::connect(&args.sock.socket)?;
    let v = c.call(&Request::History {})?;
    if args.json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let records: Vec<crate::daemon::history::Record> =
        serde_json::from_value(v).unwrap_or_default();
    if records.is_empty() {
        println!("no applied policy recorded yet");
    }
    for r in records {
        let who = match (&r.user, r.uid) {
            (Some(u), _) => format!(" by {u}"),
            (None, Some(uid)) => format!(" by uid {uid}"),
            _ => String::new(),
        };
        let copy = if r.copy { "" } else { " (no copy kept)" };
        println!(
            "{:>8}  {}  {}{who}  {}  sha256 {}{copy}",
            r.generation,
            r.applied_at,
            r.origin,
            r.path,
            r.sha256.get(..12).unwrap_or(&r.sha256)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rollback(args: &crate::cli::RollbackArgs) -> Result<ExitCode> {
    let mut c = Client::connect(&args.sock.socket)?;
    let v = c.call(&Request::Rollback {
        generation: args.generation,
        force: args.force,
    })?;
    let answer: ApplyAnswer = serde_json::from_value(v.clone())
        .map_err(|e| CliError::system(format!("unexpected answer from the daemon: {e}")))?;
    for w in &answer.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "rolled back to the policy of generation {} (now generation {}, {} IPv4 and {} IPv6 prefixes)",
        v["rolled_back_to"], answer.generation, answer.prefixes.ipv4, answer.prefixes.ipv6
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_lines_take_an_address_a_duration_and_the_rest_as_label() {
        let got = deny_lines(
            "# bans\n203.0.113.9   1h   fail2ban sshd  \n\n  2001:db8::/64\n198.51.100.0/24 - web # scan\n",
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                DenyItem {
                    addr: "203.0.113.9".into(),
                    for_secs: Some(3600),
                    label: Some("fail2ban sshd".into()),
                },
                DenyItem {
                    addr: "2001:db8::/64".into(),
                    for_secs: None,
                    label: None,
                },
                DenyItem {
                    addr: "198.51.100.0/24".into(),
                    for_secs: None,
                    label: Some("web".into()),
                },
            ]
        );
        let e = deny_lines("203.0.113.9\nbad\n203.0.113.10 1y\n").unwrap_err();
        assert!(
            e.contains("line 2:") && e.contains("line 3:") && !e.contains("line 1:"),
            "{e}"
        );
        let many: String = (0..15).map(|_| "x\n").collect();
        assert!(
            deny_lines(&many)
                .unwrap_err()
                .ends_with("and 5 more bad lines")
        );
        assert!(deny_lines("# nothing\n").is_err());
    }
}
