//! `cargo xtask demo`: the real daemon between two throw-away network
//! namespaces, real TCP connections through it, and `ipguard status`.
//! Guards remove every namespace, veth and pin, also on Ctrl-C and failure.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use ipguard_tests::*;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const POLICY: &str = include_str!("../../examples/demo-policy.yaml");

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn snapshot() -> (String, Vec<String>) {
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    pins.sort();
    (netns, pins)
}

pub fn run() -> Result<()> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")?;
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads XDP: run `sudo -E cargo xtask demo`");
    }
    let bin = crate::build_release()?;
    ensure_bpffs()?;
    let before = snapshot();
    let result = demo(&bin);
    let after = snapshot();
    if before != after {
        eprintln!(
            "xtask: warning: something was left behind: namespaces {:?} -> {:?}, /sys/fs/bpf {:?} -> {:?}",
            before.0, after.0, before.1, after.1
        );
    } else {
        println!("\ncleaned up: `ip netns list` and /sys/fs/bpf are as before the demo");
    }
    result
}

fn demo(bin: &Path) -> Result<()> {
    // Under the target directory: nothing of ipguard's in the shared temp
    // directory.
    let tmp = TempDir(
        crate::setup::workspace_root()?
            .join("target/tmp")
            .join(unique("demo-")),
    );
    std::fs::create_dir_all(&tmp.0)?;
    let policy = tmp.0.join("policy.yaml");
    std::fs::write(&policy, POLICY)?;
    let state = tmp.0.join("state");
    let socket = tmp.0.join("ipguard.sock");

    let pair = Pair::new()?;
    let pins = PinDir::new()?;
    println!(
        "== two network namespaces: {} (server, protected) and {} (client), veth {} <-> {}",
        pair.server.name, pair.client.name, pair.server_if, pair.client_if
    );
    println!(
        "== the policy ({}):\n{}",
        policy.display(),
        POLICY.trim_end()
    );
    check_interrupted()?;

    let ipguard = |args: &[&str]| {
        let mut c = Command::new(bin);
        c.args(args)
            .arg("--pin-dir")
            .arg(&pins.path)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket);
        c
    };
    println!(
        "\n== ipguard run --iface {} (in the server namespace)",
        pair.server_if
    );
    let mut daemon_cmd = pair.server.command(bin);
    daemon_cmd
        .args(["run", "--config"])
        .arg(&policy)
        .args(["--iface", &pair.server_if, "--pin-dir"])
        .arg(&pins.path)
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null());
    let mut daemon = ChildGuard::new(daemon_cmd.spawn().context("cannot start ipguard run")?);
    let ready = wait_for(Duration::from_secs(20), || {
        if let Some(c) = daemon.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            return Some(Err(anyhow::anyhow!("ipguard run exited early: {st}")));
        }
        (pins.path.join(format!("link_{}", pair.server_if)).exists()
            && state.join("applied.json").exists())
        .then_some(Ok(()))
    });
    ready.context("ipguard run did not attach within 20 s")??;
    check_interrupted()?;

    let v4: IpAddr = SERVER_V4.parse()?;
    let v4_alt: IpAddr = SERVER_V4_ALT.parse()?;
    let v6: IpAddr = SERVER_V6.parse()?;
    for addr in [v4, v4_alt, v6] {
        tcp_listener(&pair.server, SocketAddr::new(addr, 9000))?;
        tcp_listener(&pair.server, SocketAddr::new(addr, 8080))?;
    }
    println!("\n== TCP connections from the client namespace (1 s timeout each)");
    let cases: [(&str, IpAddr, u16, bool, &str); 5] = [
        (CLIENT_V4, v4, 9000, true, "in the host-wide allowlist"),
        (CLIENT_V4_ALT, v4_alt, 9000, false, "not in the allowlist"),
        (CLIENT_V4_ALT, v4_alt, 8080, true, "service web allows any"),
        (CLIENT_V6, v6, 9000, true, "in the host-wide allowlist"),
        (CLIENT_V6_ALT, v6, 9000, false, "not in the allowlist"),
    ];
    let mut wrong = 0;
    for (src, dst, port, expect, why) in cases {
        check_interrupted()?;
        let got = tcp_connect(
            &pair.client,
            src.parse()?,
            SocketAddr::new(dst, port),
            Duration::from_secs(1),
        )?;
        let ok = got.is_ok();
        let shown = if ok {
            "connected".to_string()
        } else {
            format!(
                "refused ({})",
                got.err().map(|e| e.to_string()).unwrap_or_default()
            )
        };
        let mark = if ok == expect {
            "ok "
        } else {
            wrong += 1;
            "BAD"
        };
        println!(
            "  [{mark}] {src:>15} -> {dst} tcp/{port}: {shown:<40} expected {} ({why})",
            if expect { "pass" } else { "drop" }
        );
    }

    println!("\n== ipguard status");
    let out = ipguard(&["status"]).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "ipguard status failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    check_interrupted()?;

    println!("\n== SIGTERM to the daemon: the datapath stays attached and keeps enforcing");
    daemon.signal_and_wait(nix::sys::signal::Signal::SIGTERM)?;
    let after = tcp_connect(
        &pair.client,
        CLIENT_V4_ALT.parse()?,
        SocketAddr::new(v4_alt, 9000),
        Duration::from_secs(1),
    )?;
    let still = after.is_err();
    if !still {
        wrong += 1;
    }
    println!(
        "  [{}] 203.0.113.9 -> 203.0.113.1 tcp/9000 with no daemon running: {}",
        if still { "ok " } else { "BAD" },
        if still { "still dropped" } else { "connected" }
    );

    println!("\n== ipguard unload");
    let out = ipguard(&["unload"]).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "ipguard unload failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if wrong > 0 {
        bail!("{wrong} connection(s) did not get the verdict the policy gives");
    }
    Ok(())
}
