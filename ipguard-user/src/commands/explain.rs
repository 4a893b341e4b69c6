//! `ipguard explain` (docs/cli.md): the verdict of a policy for a packet, from
//! the compiled tables as the datapath holds them (see `policy::Explainer`).
use std::{
    io::{BufRead, BufWriter, Write},
    net::IpAddr,
    process::ExitCode,
    time::SystemTime,
};

use anyhow::{Context, Result};

use crate::{
    cli::ExplainArgs,
    error::{CliError, Diagnostics, Exit},
    policy::{self, Explainer, parse_port_query},
};

fn parse_src(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address"))
}

pub fn run(args: &ExplainArgs) -> Result<ExitCode> {
    if args.daemon {
        return ask_daemon(args);
    }
    let Some(file) = &args.file else {
        return Err(CliError::usage("give FILE SRC [PROTO/PORT], or --daemon SRC").into());
    };
    let at = match &args.at {
        None => SystemTime::now(),
        Some(t) => t
            .trim()
            .parse::<jiff::Timestamp>()
            .map(SystemTime::from)
            .map_err(|_| {
                CliError::usage(format!(
                    "--at {t:?} is not an RFC 3339 time: write e.g. 2026-12-01T08:00:00Z"
                ))
            })?,
    };
    // Check the query before reading the policy: a typo in it is a usage
    // error whatever the file holds.
    let query = match (&args.src, args.stdin) {
        (Some(src), false) => {
            let addr = parse_src(src).map_err(CliError::usage)?;
            let port = match &args.port {
                Some(p) => Some(parse_port_query(p).map_err(CliError::usage)?),
                None => None,
            };
            Some((addr, port))
        }
        (None, true) => None,
        _ => return Err(CliError::usage("give SRC [PROTO/PORT], or --stdin --json").into()),
    };
    let loaded = policy::load_file(file).map_err(|e| Diagnostics(e.to_string()))?;
    let compiled = policy::compile(&loaded.policy, at, &[]);
    let ex = Explainer::new(&compiled);
    let stdout = std::io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 16, stdout);
    match query {
        Some((addr, port)) => {
            let r = ex.explain_ref(addr, port);
            let src = args.src.as_deref().unwrap_or_default();
            let port_text = args.port.as_deref();
            if args.json {
                r.write_json(&mut out, src, port_text)
                    .context("cannot write to stdout")?;
                writeln!(out).context("cannot write to stdout")?;
            } else {
                let mut q = src.to_string();
                if let Some(p) = port_text {
                    q.push(' ');
                    q.push_str(p);
                }
                writeln!(out, "{q} -> {}", r.describe(port_text))
                    .context("cannot write to stdout")?;
            }
            out.flush().context("cannot write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let bad = stream(&ex, &mut out)?;
            out.flush().context("cannot write to stdout")?;
            if bad > 0 {
                eprintln!(
                    "ipguard: error: {bad} query line(s) could not be read (see their \"error\" field)"
                );
                return Ok(Exit::Refused.into());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `explain --daemon SRC [PROTO/PORT]`: the first two positionals are
/// the query (there is no file).
fn ask_daemon(args: &ExplainArgs) -> Result<ExitCode> {
    if args.port.is_some() {
        return Err(CliError::usage("with --daemon give SRC [PROTO/PORT], no file").into());
    }
    let src = args
        .file
        .as_ref()
        .map(|f| f.display().to_string())
        .unwrap_or_default();
    let port = args.src.clone();
    parse_src(&src).map_err(CliError::usage)?;
    if let Some(p) = &port {
        parse_port_query(p).map_err(CliError::usage)?;
    }
    let mut c = crate::control::Client::connect(&args.sock.socket)?;
    let v = c.call(&crate::protocol::Request::Explain {
        src: src.clone(),
        port: port.clone(),
    })?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{v}").context("cannot write to stdout")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut q = src;
    if let Some(p) = &port {
        q.push(' ');
        q.push_str(p);
    }
    writeln!(out, "{q} -> {}", v["text"].as_str().unwrap_or_default())
        .context("cannot write to stdout")?;
    let names: Vec<crate::protocol::DnsNameJson> =
        serde_json::from_value(v["dns"].clone()).unwrap_or_default();
    for n in names {
        let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
        let when = n
            .resolved_at
            .map_or("never resolved".to_string(), |t| format!("resolved {t}"));
        writeln!(
            out,
            "  dns name {} -> [{}] ({when})",
            n.name,
            addrs.join(", ")
        )
        .context("cannot write to stdout")?;
    }
    let feeds: Vec<crate::protocol::FeedJson> =
        serde_json::from_value(v["feeds"].clone()).unwrap_or_default();
    for f in feeds {
        let copy = f.changed_at.map_or("no copy yet".to_string(), |t| {
            format!("{} entries, copy of {t}", f.items)
        });
        writeln!(out, "  feed {} {} ({copy})", f.group, f.url).context("cannot write to stdout")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Answers `SRC [PROTO/PORT]` lines from stdin, one JSON object per query
/// line in order; blank lines and `#` comments are skipped. A line that is
/// not a query gets an object with an `error` field. Returns how many.
fn stream<W: Write>(ex: &Explainer<'_>, out: &mut W) -> Result<usize> {
    let stdin = std::io::stdin().lock();
    let mut input = std::io::BufReader::with_capacity(1 << 16, stdin);
    let mut line = String::new();
    let mut bad = 0usize;
    loop {
        line.clear();
        let n = input.read_line(&mut line).context("cannot read stdin")?;
        if n == 0 {
            break;
        }
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let mut words = text.split_whitespace();
        let src = words.next().unwrap_or_default();
        let port = words.next();
        let parsed = (|| {
            if let Some(extra) = words.next() {
                return Err(format!(
                    "unexpected {extra:?}: a query is `SRC [PROTO/PORT]`"
                ));
            }
            let addr = parse_src(src)?;
            let port = port.map(parse_port_query).transpose()?;
            Ok((addr, port))
        })();
        match parsed {
            Ok((addr, p)) => {
                ex.explain_ref(addr, p)
                    .write_json(out, src, port)
                    .context("cannot write to stdout")?;
            }
            Err(msg) => {
                bad += 1;
                serde_json::to_writer(
                    &mut *out,
                    &serde_json::json!({"src": src, "port": port, "error": msg}),
                )
                .context("cannot write to stdout")?;
            }
        }
        out.write_all(b"\n").context("cannot write to stdout")?;
    }
    Ok(bad)
}
