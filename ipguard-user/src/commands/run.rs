//! `ipguard run`: the daemon.
use std::{fs::File, path::Path, process::ExitCode, sync::Arc};

use anyhow::{Context, Result};
use tokio::sync::{Mutex, broadcast, mpsc};

use crate::{
    cli::RunArgs,
    daemon::{self, Daemon, Source, blocked::Blocked, server, watch},
    datapath::{self, Capacities, Datapath},
    error::{CliError, Diagnostics},
    metrics::Metrics,
    policy,
    runtime::RuntimeStore,
    state::Attached,
};

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let loaded = load_policy(&args.config)?;
    let ifaces = if args.ifaces.is_empty() {
        loaded.policy.interfaces.clone()
    } else {
        args.ifaces.clone()
    };
    if ifaces.is_empty() {
        return Err(CliError::usage(
            "no interface to protect: pass --iface IF or set `interfaces:` in the policy",
        )
        .into());
    }
    let sys = |e: datapath::DatapathError| CliError::system(e.to_string());
    datapath::ensure_root().map_err(sys)?;
    // Before anything is created: a kernel too old is refused with nothing
    // left behind.
    crate::kernel::check_supported(&crate::kernel::Release::current())
        .map_err(|e| CliError::system(e.to_string()))?;
    for i in &ifaces {
        datapath::if_index(i).map_err(sys)?;
    }
    datapath::ensure_bpffs(&args.loc.pin_dir).map_err(sys)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(start(args, loaded, ifaces))?;
    Ok(ExitCode::SUCCESS)
}

/// Reads and validates a policy file; its diagnostics are logged one per
/// line (those about covered entries once it is in force), and an invalid
/// file is refused (exit 1).
fn load_policy(path: &Path) -> Result<policy::LoadedPolicy> {
    match policy::load_file_with(path, policy::Coverage::Defer) {
        Ok(loaded) => {
            crate::daemon::log_warnings(path, &loaded.warnings);
            Ok(loaded)
        }
        Err(errors) => Err(Diagnostics(errors.to_string()).into()),
    }
}

/// One daemon per pin directory: an exclusive lock on the directory itself,
/// held for the life of the process (released by the kernel even on kill -9).
fn lock_pin_dir(dir: &Path) -> Result<nix::fcntl::Flock<File>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let f = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        CliError::system(format!(
            "another `ipguard run` is already running on {}: stop it first (systemctl stop ipguard), or give this one its own --pin-dir",
            dir.display()
        ))
        .into()
    })
}

async fn start(args: &RunArgs, loaded: policy::LoadedPolicy, ifaces: Vec<String>) -> Result<()> {
    let _lock = lock_pin_dir(&args.loc.pin_dir)?;
    let listener = server::bind(&args.sock.socket)?;
    // Watch first, then look at the file once more when the event loop
    // starts: a change made while the datapath was being set up is not lost.
    let (file_tx, file_rx) = mpsc::channel(1);
    let watcher = watch::Watch::new(&args.config, file_tx.clone())?;
    let _ = file_tx.try_send(());
    let runtime = RuntimeStore::load(&args.loc.state_dir)?;
    let (events_tx, _) = broadcast::channel(1024);
    // A first start that fails (an interface another program holds, a
    // verifier refusal) leaves nothing behind: no pinned map, no link. A
    // start that adopts a running datapath never removes it.
    let fresh = !datapath::is_loaded(&args.loc.pin_dir);
    // The history's copy of the first policy, as the file holds it.
    daemon::history::store_file_copy_later(&args.loc.state_dir, &args.config, &loaded);
    let (mut d, stats) = match bring_up(args, loaded, &ifaces, runtime, events_tx.clone()) {
        Ok(up) => up,
        Err(e) => {
            if fresh {
                match datapath::unload(&args.loc.pin_dir, &[]) {
                    Ok(_) | Err(datapath::DatapathError::NotLoaded(_)) => {}
                    Err(u) => tracing::warn!("cannot remove what the failed start pinned: {u}"),
                }
            }
            return Err(e);
        }
    };
    d.watch = Some(watcher);
    let lists = d.lists.clone();
    d.follow_lists(&lists);
    d.log_applied("start", &stats);
    crate::daemon::log_covered_later(&d.current);
    d.record()?;
    d.remember("start", stats.generation);
    d.metrics.lock().await.reload(true);

    let (calls_tx, calls_rx) = mpsc::channel(64);
    let (ev_tx, ev_rx) = mpsc::channel(4096);
    tokio::spawn(server::serve(listener, calls_tx, events_tx));
    crate::events::spawn_reader(&args.loc.pin_dir, ev_tx)?;
    daemon::passed::spawn_reader(&args.loc.pin_dir, d.passed.clone());
    if let Some(addr) = args.metrics {
        let maps = crate::datapath::Maps::open(&args.loc.pin_dir)
            .map_err(|e| CliError::system(e.to_string()))?;
        let state_dir = args.loc.state_dir.clone();
        let metrics = d.metrics.clone();
        // The metrics task reads counters through its own handles on the
        // pinned maps; names come from the last applied record.
        let refresh = move || {
            let names = crate::state::read_applied(&state_dir)?;
            let compiled = crate::policy::CompiledPolicy {
                services: names
                    .services
                    .iter()
                    .enumerate()
                    .map(|(i, n)| crate::policy::ServiceInfo {
                        index: (i + 1) as u8,
                        name: n.clone(),
                        has_own_list: true,
                    })
                    .collect(),
                ..Default::default()
            };
            daemon::snapshot(&maps, &compiled)
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::system(format!("cannot listen on --metrics {addr}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve_on(listener, metrics, refresh).await {
                tracing::error!("metrics: {e:#}");
            }
        });
    }
    let socket = args.sock.socket.clone();
    let r = d.serve(calls_rx, file_rx, ev_rx).await;
    let _ = std::fs::remove_file(&socket);
    r
}

/// Loads the datapath (or adopts the pinned one), writes the policy into
/// it and attaches it to every interface.
fn bring_up(
    args: &RunArgs,
    loaded: policy::LoadedPolicy,
    ifaces: &[String],
    runtime: RuntimeStore,
    events_tx: broadcast::Sender<crate::protocol::EventLine>,
) -> Result<(Daemon, crate::datapath::ApplyStats)> {
    let caps = Capacities {
        v4: args.ipv4_capacity,
        v6: args.ipv6_capacity,
        flows: args.flow_capacity,
    };
    let dp =
        Datapath::load(&args.loc.pin_dir, caps).map_err(|e| CliError::system(e.to_string()))?;
    let src = Source {
        path: args.config.clone(),
        sha256: loaded.sha256.clone(),
        policy: loaded.policy,
    };
    let metrics = Metrics::new();
    let mut d = Daemon {
        config: args.config.clone(),
        state_dir: args.loc.state_dir.clone(),
        caps,
        attached: Vec::new(),
        dp,
        // Replaced by the write below (a shared copy of the policy until
        // then).
        current: src.clone(),
        file_sha256: loaded.sha256.clone(),
        lists: loaded.lists.clone(),
        watch: None,
        compiled: Default::default(),
        rejections: crate::requests::Rejections::load(&args.loc.state_dir)?,
        runtime,
        pending: None,
        ready: metrics.ready(),
        metrics: Arc::new(Mutex::new(metrics)),
        blocked: Arc::new(Mutex::new(Blocked::default())),
        passed: Default::default(),
        events_tx,
        stdout: daemon::stdout::EventOut::spawn()?,
        dns: daemon::dns::Dns::new(&args.loc.state_dir, &args.resolv_conf),
        feeds: daemon::feeds::Feeds::new(&args.loc.state_dir),
        history: daemon::history::History::load(&args.loc.state_dir, args.history as usize),
        peer: None,
    };
    // The policy goes in before the program is attached: a fresh install
    // never passes a packet the policy would refuse.
    // The modes the previous run recorded (links do not say theirs).
    let previous = crate::state::read_applied(&args.loc.state_dir);
    let (stats, _) = d.write_policy(src, args.force)?;
    for iface in ifaces {
        let recorded = previous
            .as_ref()
            .and_then(|a| a.attached.iter().find(|x| &x.iface == iface))
            .map(|x| x.mode);
        let (mode, adopted) =
            d.dp.attach(iface, args.xdp_mode.into(), recorded)
                .map_err(|e| CliError::system(e.to_string()))?;
        if adopted {
            tracing::info!(%iface, mode = mode.as_str(), "took over the running datapath without a gap");
        } else {
            tracing::info!(%iface, mode = mode.as_str(), "attached");
        }
        if let Some(note) = crate::datapath::reject_note(iface, mode) {
            if d.compiled.config.action == ipguard_common::ACTION_REJECT {
                tracing::warn!(%iface, "{note}");
            } else {
                tracing::info!(%iface, "{note}");
            }
        }
        d.attached.push(Attached {
            iface: iface.clone(),
            mode,
        });
    }
    // Said once the start has succeeded: a refused start prints its one
    // error line and nothing else.
    if d.dp.kernel.missing.is_empty() {
        tracing::info!("{}", d.dp.kernel.summary());
    } else {
        tracing::warn!("{}", d.dp.kernel.summary());
    }
    Ok((d, stats))
}
