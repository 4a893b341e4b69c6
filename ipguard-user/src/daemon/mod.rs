//! The daemon's state and its one event loop.
//!
//! One task owns the datapath and the policy; the control socket, the file
//! watcher, the event relay and the timers talk to it through channels, so
//! policy changes are serialized without locks around kernel objects.

pub mod blocked;
pub mod dns;
pub mod feeds;
pub mod history;
pub mod passed;
pub mod server;
pub mod stdout;
pub mod watch;

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use ipguard_common::*;
use serde_json::json;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Mutex, broadcast, mpsc, oneshot},
};

use crate::{
    datapath::{Capacities, Datapath},
    error::{CliError, Exit},
    metrics::{Metrics, Snapshot},
    policy::{self, CompiledPolicy, Explainer, Proto, RuntimeKind},
    protocol::{Request, Response},
    runtime::RuntimeStore,
    sessions,
    state::{self, AppliedState, Attached},
};

use crate::protocol::{ApplyAnswer, EventLine, Prefixes, RevokeAnswer};
use blocked::Blocked;

/// A control request with the channel its answer goes back on.
pub struct Call {
    pub req: Request,
    pub reply: oneshot::Sender<Response>,
    /// The client's uid (SO_PEERCRED).
    pub peer_uid: Option<u32>,
}

/// Where the current policy came from.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    pub sha256: String,
    /// Shared: a runtime change or a time edge recompiles the current
    /// policy, and a copy of a million entries costs 120 MB.
    pub policy: Arc<policy::Policy>,
}

/// A policy file being read and checked off the event loop.
struct Loading {
    why: &'static str,
    force: bool,
    task: tokio::task::JoinHandle<Result<policy::LoadedPolicy, policy::PolicyErrors>>,
}

/// An `apply --confirm` waiting for `ipguard confirm`.
pub(crate) struct Pending {
    previous: Source,
    deadline: Instant,
}

pub struct Daemon {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub caps: Capacities,
    pub attached: Vec<Attached>,
    pub dp: Datapath,
    pub current: Source,
    /// The hash of the policy file as last read (with its list files: see
    /// `policy::policy_sha256`): a directory event reloads only when the
    /// content differs, so a policy pushed with `apply` is not replaced by
    /// an unchanged file.
    pub file_sha256: String,
    /// The list files the policy file read when last loaded.
    pub lists: Vec<policy::ListFile>,
    /// The watch on the policy's and the list files' directories.
    pub watch: Option<watch::Watch>,
    pub compiled: CompiledPolicy,
    pub runtime: RuntimeStore,
    /// Rejected access requests (`ipguard reject`).
    pub rejections: crate::requests::Rejections,
    pub(crate) pending: Option<Pending>,
    pub metrics: Arc<Mutex<Metrics>>,
    pub blocked: Arc<Mutex<Blocked>>,
    /// Sources the datapath passed recently (its sample).
    pub passed: Arc<Mutex<passed::Passed>>,
    pub events_tx: broadcast::Sender<EventLine>,
    /// The event stream on stdout (a thread of its own).
    pub stdout: stdout::EventOut,
    /// The policy's DNS names and their answers.
    pub dns: dns::Dns,
    /// The policy's URL feeds and their copies.
    pub feeds: feeds::Feeds,
    /// The applied policies (`ipguard history`, `rollback`).
    pub history: history::History,
    /// The uid of the client whose request is being handled.
    pub peer: Option<u32>,
    /// What `/ready` answers (shared with the metrics server).
    pub ready: crate::metrics::Ready,
}

/// A moment as status, records and metrics show it: RFC 3339, to the
/// second.
pub fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_default()
}

/// How many of a policy file's warnings a reload writes to the log.
const LOGGED_WARNINGS: usize = 20;

/// Logs a policy file's warnings. A large feed can carry tens of
/// thousands (entries covered by others): the log gets the first
/// [`LOGGED_WARNINGS`] and a count, `check` lists them all.
pub fn log_warnings(path: &std::path::Path, warnings: &[policy::Diagnostic]) {
    for w in warnings.iter().take(LOGGED_WARNINGS) {
        tracing::warn!("{w}");
    }
    if warnings.len() > LOGGED_WARNINGS {
        tracing::warn!(
            "{} more warnings in {}: `ipguard check {}` lists them all",
            warnings.len() - LOGGED_WARNINGS,
            path.display(),
            path.display()
        );
    }
}

/// Logs the warnings about entries covered by others of their list
/// ([`policy::Coverage::Defer`]) for the policy file `src` holds, from a
/// thread of its own at the lowest priority: they never change what is enforced, and at a
/// million entries finding them takes 0.4 s that the policy need not wait
/// for.
pub fn log_covered_later(src: &Source) {
    let (path, policy) = (src.path.clone(), src.policy.clone());
    in_background("covered-entries", move || {
        let w = policy::covered_warnings(&path.display().to_string(), &policy);
        drop(policy);
        log_warnings(&path, &w);
    });
}

/// Runs `work` on a thread of its own at the lowest priority (below the
/// reload and the event loop, which share the cores), then hands what it
/// freed in its malloc arena back to the system. For work that never
/// changes what is enforced: the covered-entry warnings, the history's
/// copies.
pub fn in_background(name: &str, work: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // SAFETY: setpriority only changes this thread's nice value.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            }
            work();
            release_freed_memory();
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the {name} thread: {e}");
    }
}

/// Hands the memory freed by a policy change back to the system. A large
/// policy is read on a blocking thread (its own malloc arena) and the
/// previous one is freed here: without this the daemon keeps both peaks
/// resident (at a million entries, about 130 MB more after every reload).
/// It costs a walk of the free lists, a few ms, once per change.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only reorganizes the allocator's free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sessions a policy would cut: (those on the lockout guard's ports,
/// others).
pub type Cuts = (Vec<sessions::Session>, Vec<sessions::Session>);

/// Established inbound TCP sessions whose source the new policy refuses,
/// split by whether their port is one of the lockout guard's
/// (`lockout_guard.ports`; by default 22 and the ports of a service named
/// `ssh`).
pub fn lockout_check(compiled: &CompiledPolicy, ex: &Explainer) -> Cuts {
    let list = match sessions::inbound_sessions() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("cannot read established sessions for the lockout guard: {e}");
            return (Vec::new(), Vec::new());
        }
    };
    let is_ssh = |port: u16| {
        compiled
            .lockout_ports
            .iter()
            .any(|&(first, last)| (first..=last).contains(&port))
    };
    let mut ssh = Vec::new();
    let mut other = Vec::new();
    for s in list {
        let e = ex.explain(s.remote, Some((Proto::Tcp, s.local_port)));
        if e.refuses() {
            if is_ssh(s.local_port) {
                ssh.push(s);
            } else {
                other.push(s);
            }
        }
    }
    (ssh, other)
}

/// Deletes the flows (return traffic, see [`FlowKey`]) whose remote `old`
/// let in on the flow's local port and `new` refuses there: a flow a
/// server's answers recorded before this version, or one of a port that
/// became a service, must not keep a refused client in. Flows of
/// connections the host opened to sources neither policy allows stay; one
/// deleted here comes back with the host's next segment on it.
pub fn delete_refused_flows(
    maps: &mut crate::datapath::Maps,
    old: &CompiledPolicy,
    new: &Explainer,
) -> Result<u64, crate::datapath::DatapathError> {
    // The first policy of this process: what the previous one enforced is
    // unknown, and deleting every flow of a refused remote would drop the
    // host's own connections' entries too (they come back, but an idle
    // UDP flow only when the host sends again). Flows a serving port
    // refreshes age out by themselves.
    if old.config.mode == MODE_UNSET || maps.flows()?.is_empty() {
        return Ok(0);
    }
    let old = Explainer::new(old);
    maps.delete_flows(|k| {
        let Some(src) = flow_remote(k) else {
            return false;
        };
        let proto = if k.protocol == IPPROTO_TCP {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        let judged = |e: &Explainer| {
            e.decide(
                src,
                Ports::Port {
                    service: e.service_of(proto, k.local_port),
                    tcp: 0,
                },
            )
        };
        judged(&old).verdict == VERDICT_PASS && !judged(new).passes()
    })
}

fn flow_remote(k: &FlowKey) -> Option<IpAddr> {
    crate::datapath::map_addr(k.family, &k.remote)
}

fn describe(list: &[sessions::Session]) -> String {
    list.iter()
        .map(|s| format!("{} -> port {}", s.remote, s.local_port))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Daemon {
    /// Compiles `src` with the runtime entries at `now`, checks it against
    /// established sessions, writes it into the datapath and logs it.
    pub fn install(
        &mut self,
        src: Source,
        force: bool,
        why: &str,
    ) -> Result<ApplyAnswer, CliError> {
        let (stats, answer) = self.write_policy(src, force)?;
        self.log_applied(why, &stats);
        if let Err(e) = self.record() {
            tracing::warn!("{e:#}");
        }
        self.remember(why, stats.generation);
        Ok(answer)
    }

    /// Adds the policy in force, made live as `why`, to the history.
    pub fn remember(&mut self, why: &str, generation: u64) {
        let Some(origin) = history::origin_of(why) else {
            return;
        };
        let r = history::History::record(
            generation,
            &self.current.sha256,
            origin,
            &self.current.path,
            self.peer,
        );
        if let Err(e) = self.history.push(r) {
            tracing::warn!("{e:#}");
        }
    }

    /// Logs a policy [`Daemon::write_policy`] made live.
    pub fn log_applied(&self, why: &str, stats: &crate::datapath::ApplyStats) {
        tracing::info!(
            policy = %self.current.path.display(),
            sha256 = %self.current.sha256,
            generation = stats.generation,
            ipv4 = stats.v4,
            ipv6 = stats.v6,
            runtime_entries = self.runtime.entries.len(),
            "{why}: policy applied"
        );
    }

    /// [`Daemon::install`] without the log line and the state record: `run`
    /// logs and records its first policy only once the program is attached,
    /// so a start that fails later says only why it failed and records
    /// nothing.
    pub fn write_policy(
        &mut self,
        src: Source,
        force: bool,
    ) -> Result<(crate::datapath::ApplyStats, ApplyAnswer), CliError> {
        let mut found = self.dns.answers_for(&src.policy);
        found.feeds = self.feeds.copies_for(&src.policy);
        let compiled = policy::compile_with(
            &src.policy,
            SystemTime::now(),
            &self.runtime.policy_entries(),
            &found,
        );
        drop(found);
        // One explainer of the new policy serves the lockout guard and the
        // flow pruning (at a million prefixes it takes tens of ms).
        let ex = Explainer::new(&compiled);
        let (ssh, other) = lockout_check(&compiled, &ex);
        if !ssh.is_empty() && !force {
            return Err(CliError::refused(format!(
                "refused: {} would cut established sessions on the lockout guard's ports from {} (lockout); allow those sources or use --force",
                src.path.display(),
                describe(&ssh)
            )));
        }
        for s in ssh.iter().chain(&other) {
            tracing::warn!(source = %s.remote, port = s.local_port, "the new policy cuts this established session");
        }
        // Forced (or nothing guarded): every cut session is a warning.
        let cut: Vec<String> = ssh
            .iter()
            .chain(&other)
            .map(|s| {
                format!(
                    "cuts the established session {} -> port {}",
                    s.remote, s.local_port
                )
            })
            .collect();
        let stats = self
            .dp
            .maps
            .apply(&compiled)
            .map_err(|e| CliError::system(e.to_string()))?;
        match delete_refused_flows(&mut self.dp.maps, &self.compiled, &ex) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                flows = n,
                "deleted the return-traffic flows of sources the new policy refuses"
            ),
            Err(e) => tracing::warn!("cannot prune the flow table: {e}"),
        }
        drop(ex);
        self.compiled = compiled;
        self.dns.track(&src.policy);
        self.feeds.track(&src.policy);
        self.current = src;
        release_freed_memory();
        let answer = ApplyAnswer {
            generation: stats.generation,
            prefixes: Prefixes {
                ipv4: stats.v4,
                ipv6: stats.v6,
            },
            sha256: self.current.sha256.clone(),
            cut_sessions: cut.len(),
            warnings: cut,
            confirm_within_secs: None,
        };
        Ok((stats, answer))
    }

    pub fn record(&self) -> Result<()> {
        let slot = self.dp.maps.active_slot()?;
        let generation = self.dp.maps.config(slot)?.generation;
        let st = AppliedState::describe(
            &self.compiled,
            &self.current.path,
            &self.current.sha256,
            generation,
            slot,
            self.attached.clone(),
        );
        state::write_applied(&self.state_dir, &st)?;
        if let Ok(m) = self.metrics.try_lock() {
            m.set_policy(
                &self.current.path.display().to_string(),
                &self.current.sha256,
                generation,
            );
            m.set_lists(&self.lists_in_force());
        }
        self.ready.set(self.readiness());
        Ok(())
    }

    /// Why the policy file's policy is not the one in force (None: it is):
    /// what `/ready` answers.
    fn readiness(&self) -> Option<String> {
        if self.file_in_force() {
            return None;
        }
        if self.current.path != self.config {
            return Some(format!(
                "the policy in force (sha256 {}) came from {}, not from the policy file {}",
                self.current.sha256,
                self.current.path.display(),
                self.config.display()
            ));
        }
        Some(format!(
            "the policy file {} (sha256 {}) is not the policy in force (sha256 {}): see the log for why it was not applied",
            self.config.display(),
            self.file_sha256,
            self.current.sha256
        ))
    }

    /// Sets `/ready` to `problem`, or to what [`Daemon::readiness`] says.
    fn set_ready(&self, problem: Option<String>) {
        self.ready.set(problem.or_else(|| self.readiness()));
    }

    /// Whether what the policy file holds now is in force (not a policy
    /// sent with `apply`, nor one the file held before a refused reload).
    fn file_in_force(&self) -> bool {
        self.current.path == self.config && self.current.sha256 == self.file_sha256
    }

    /// The list files of the policy in force, and their prefixes.
    fn lists_in_force(&self) -> Vec<(String, usize)> {
        if !self.file_in_force() {
            return Vec::new();
        }
        self.lists
            .iter()
            .map(|l| (l.name.clone(), l.prefixes))
            .collect()
    }

    async fn count_reload(&self, ok: bool) {
        self.metrics.lock().await.reload(ok);
    }

    /// Whether a reload has anything to read: always when `force` (SIGHUP,
    /// which also replaces a policy pushed with `apply`); for a directory
    /// event only when the policy file or a list file it read changed
    /// since it was last read. Most events (the start's own re-check, a
    /// neighbour's file, a touch) leave the content as it was: the hash
    /// tells so in a read (60 ms at a million entries) where parsing takes
    /// a second.
    fn reload_wanted(&self, force: bool) -> bool {
        force
            || policy::current_sha256(&self.config, &self.lists).as_deref()
                != Some(self.file_sha256.as_str())
    }

    /// Reads and checks the policy file on a blocking thread, so that the
    /// event loop answers `status` and relays events meanwhile; the result
    /// comes back to [`Daemon::reload_finish`].
    fn reload_start(&self, why: &'static str, force: bool) -> Loading {
        let (path, state_dir) = (self.config.clone(), self.state_dir.clone());
        Loading {
            why,
            force,
            task: tokio::task::spawn_blocking(move || {
                let loaded = policy::load_file_with(&path, policy::Coverage::Defer)?;
                history::store_file_copy_later(&state_dir, &path, &loaded);
                Ok(loaded)
            }),
        }
    }

    /// Installs a policy file read by [`Daemon::reload_start`] if its content
    /// changed since it was last read, or always when `force`. An invalid
    /// or locking-out file is refused and the running policy stays.
    async fn reload_finish(
        &mut self,
        why: &str,
        force: bool,
        result: Result<policy::LoadedPolicy, policy::PolicyErrors>,
    ) {
        let loaded = match result {
            Ok(l) => l,
            Err(errs) => {
                // The same broken file is reported once, not at every
                // event in its directory.
                let sha = policy::current_sha256(&self.config, &self.lists).unwrap_or_default();
                if !force && !sha.is_empty() && sha == self.file_sha256 {
                    return;
                }
                self.file_sha256 = sha;
                for line in errs.to_string().lines() {
                    tracing::error!("{line}");
                }
                tracing::error!(
                    "{why}: {} is invalid; the running policy stays in force",
                    self.config.display()
                );
                let first = errs
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                self.set_ready(Some(format!(
                    "the policy file is invalid ({} errors; the first: {first}); the previous policy stays in force",
                    errs.errors.len()
                )));
                self.count_reload(false).await;
                return;
            }
        };
        self.follow_lists(&loaded.lists);
        if !force && loaded.sha256 == self.file_sha256 {
            return;
        }
        self.file_sha256 = loaded.sha256.clone();
        if loaded.sha256 == self.current.sha256 && self.current.path == self.config {
            // Back to the policy in force (after an invalid edit, say).
            self.set_ready(None);
            if force {
                tracing::info!(
                    "{why}: {} is the policy in force (sha256 {}); nothing to do",
                    self.config.display(),
                    loaded.sha256
                );
            }
            return;
        }
        log_warnings(&self.config, &loaded.warnings);
        // A new file on disk supersedes a pending `apply --confirm`.
        self.pending = None;
        let src = Source {
            path: self.config.clone(),
            sha256: loaded.sha256,
            policy: loaded.policy,
        };
        match self.install(src, false, why) {
            Ok(_) => {
                log_covered_later(&self.current);
                self.count_reload(true).await
            }
            Err(e) => {
                tracing::error!("{why}: {e}; the running policy stays in force");
                self.set_ready(Some(format!(
                    "the policy file was not applied ({e}); the previous policy stays in force"
                )));
                self.count_reload(false).await;
            }
        }
    }

    /// Remembers the list files the policy file read, and watches their
    /// directories.
    pub fn follow_lists(&mut self, lists: &[policy::ListFile]) {
        self.lists = lists.to_vec();
        let disk = policy::DiskLists::beside(&self.config);
        let paths: Vec<PathBuf> = lists.iter().map(|l| disk.path_of(&l.written)).collect();
        if let Some(w) = self.watch.as_mut() {
            w.follow(&paths);
        }
    }

    /// Recompiles the current policy (time edge, runtime entry change).
    /// Makes a change of the runtime entries (already made in memory;
    /// `before` is what they were) take effect: the datapath first, then
    /// the state file. After an error the change is undone wherever it was
    /// made, so memory, disk and kernel agree, and the answer says so.
    /// Returns the warnings of the install (sessions it cut).
    fn commit_runtime(
        &mut self,
        why: &str,
        before: Vec<crate::runtime::RuntimeRecord>,
    ) -> Result<Vec<String>, String> {
        let src = self.current.clone();
        let answer = match self.install(src.clone(), true, why) {
            Ok(a) => a,
            Err(e) => {
                self.runtime.entries = before;
                return Err(format!(
                    "{why}: the datapath was not updated ({e}); nothing changed"
                ));
            }
        };
        if let Err(e) = self.runtime.save() {
            self.runtime.entries = before;
            if let Err(u) = self.install(src, true, "undo of a failed save") {
                tracing::error!(
                    "{why}: cannot undo the datapath write ({u}); the kernel enforces the change until the next reload"
                );
            }
            return Err(format!(
                "{why}: cannot save the runtime entries ({e:#}); nothing changed"
            ));
        }
        Ok(answer.warnings)
    }

    async fn refresh(&mut self, why: &str) {
        match self.runtime.expire(SystemTime::now()) {
            Ok(gone) => {
                for e in gone {
                    tracing::info!(addr = %e.addr, "runtime entry expired");
                }
            }
            Err(e) => tracing::error!("runtime entries: {e:#}"),
        }
        let src = self.current.clone();
        // Time and revocations are the operator's decisions: never refused.
        if let Err(e) = self.install(src, true, why) {
            tracing::error!("{why}: {e}");
            self.count_reload(false).await;
        }
    }

    /// The next time edge of the policy or the runtime entries.
    fn next_edge(&self) -> Option<Instant> {
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let to_instant = |t: SystemTime| now + t.duration_since(now_sys).unwrap_or_default();
        [
            self.compiled.next_change.map(to_instant),
            self.runtime.next_expiry().map(to_instant),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn next_wakeup(&self) -> Option<Instant> {
        [
            self.next_edge(),
            self.pending.as_ref().map(|p| p.deadline),
            self.dns.next_due(),
            self.feeds.next_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The packets a change is judged on: each source refused recently (at
    /// its service's first port, as the policy in force has it), each
    /// established inbound session and each passed packet of the
    /// datapath's recent sample, once.
    async fn seen(&self) -> Vec<crate::protocol::Probe> {
        let mut out: Vec<crate::protocol::Probe> = Vec::new();
        let top = self.blocked.lock().await.top(usize::MAX);
        for b in top {
            let port = b.service.as_ref().and_then(|name| {
                self.current
                    .policy
                    .services
                    .iter()
                    .find(|s| &s.name == name)
                    .and_then(|s| s.ports.first())
                    .map(|p| (p.proto, p.first))
            });
            out.push(crate::protocol::Probe {
                src: b.src,
                port: crate::protocol::port_text(port),
                seen: "refused".into(),
            });
        }
        match sessions::inbound_sessions() {
            Ok(list) => {
                for s in list {
                    let p = crate::protocol::Probe {
                        src: s.remote,
                        port: Some(format!("tcp/{}", s.local_port)),
                        seen: "session".into(),
                    };
                    if !out.iter().any(|o| o.src == p.src && o.port == p.port) {
                        out.push(p);
                    }
                }
            }
            Err(e) => tracing::warn!("cannot read the established sessions: {e}"),
        }
        for (src, port) in self.passed.lock().await.recent() {
            let p = crate::protocol::Probe {
                src,
                port: crate::protocol::port_text(port),
                seen: "passed".into(),
            };
            if !out.iter().any(|o| o.src == p.src && o.port == p.port) {
                out.push(p);
            }
        }
        out
    }

    /// `ipguard rollback`: the policy of `generation` (default: the one
    /// before the policy in force) from the history's copy, through the
    /// lockout guard unless `force`.
    async fn rollback(&mut self, generation: Option<u64>, force: bool) -> Response {
        let (record, copy) = match self.history.target(generation, &self.current.sha256) {
            Ok(t) => t,
            Err(e) => return Response::err(Exit::Refused, e),
        };
        let given = policy::GivenLists(
            copy.lists
                .into_iter()
                .map(|l| (l.path, l.text.into_bytes()))
                .collect(),
        );
        let loaded = match policy::parse_with(&copy.path, &copy.text, SystemTime::now(), &given) {
            Ok(l) => l,
            Err(errs) => {
                return Response::err(
                    Exit::Refused,
                    format!(
                        "the copy of generation {} is no longer valid: {}",
                        record.generation,
                        errs.to_string().trim_end().replace('\n', "; ")
                    ),
                );
            }
        };
        let src = Source {
            path: PathBuf::from(&copy.path),
            sha256: loaded.sha256,
            policy: loaded.policy,
        };
        match self.install(src, force, "rollback") {
            Ok(answer) => {
                self.pending = None;
                self.count_reload(true).await;
                let mut v = json!(answer);
                v["rolled_back_to"] = json!(record.generation);
                Response::ok(v)
            }
            Err(e) => {
                self.count_reload(false).await;
                Response::err(e.exit, e.message)
            }
        }
    }

    /// `apply --dry-run`: what `loaded` would change against the policy in
    /// force, judged as it would be installed (runtime entries, DNS
    /// answers, feed copies); nothing is applied.
    async fn dry_run(&mut self, loaded: &policy::LoadedPolicy) -> Response {
        let mut found = self.dns.answers_for(&loaded.policy);
        found.feeds = self.feeds.copies_for(&loaded.policy);
        let new = policy::compile_with(
            &loaded.policy,
            SystemTime::now(),
            &self.runtime.policy_entries(),
            &found,
        );
        let diff = policy::diff(&self.current.policy, &loaded.policy);
        let probes = self.seen().await;
        let queries: Vec<_> = probes.iter().map(|p| p.query()).collect();
        let changes = policy::verdict_changes(&self.compiled, &new, &queries);
        let verdicts = crate::protocol::changes_json(&changes, &probes);
        let ex = Explainer::new(&new);
        let (guarded, other) = lockout_check(&new, &ex);
        let cut: Vec<serde_json::Value> = guarded
            .iter()
            .map(|s| (s, true))
            .chain(other.iter().map(|s| (s, false)))
            .map(|(s, g)| {
                json!({
                    "remote": s.remote,
                    "remote_port": s.remote_port,
                    "local_port": s.local_port,
                    "lockout_guard": g,
                })
            })
            .collect();
        Response::ok(json!({
            "dry_run": true,
            "lists": diff.lists,
            "services": diff.services,
            "settings": diff.settings,
            "judged": probes.len(),
            "verdicts": verdicts,
            "cut_sessions": cut,
            "refused_without_force": !guarded.is_empty(),
            "warnings": loaded.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
        }))
    }

    /// `explain --daemon`: the packet judged by the policy in force, with
    /// the DNS names and feeds of the deciding entry as they stand now.
    fn explain(&self, src: &str, port: Option<&str>) -> Response {
        let Ok(addr) = src.trim().parse::<std::net::IpAddr>() else {
            return Response::err(
                Exit::Usage,
                format!("{src:?} is not an IPv4 or IPv6 address"),
            );
        };
        let query = match port.map(policy::parse_port_query).transpose() {
            Ok(q) => q,
            Err(e) => return Response::err(Exit::Usage, e),
        };
        let ex = Explainer::new(&self.compiled);
        let r = ex.explain_ref(addr, query);
        let mut buf = Vec::new();
        if let Err(e) = r.write_json(&mut buf, src, port) {
            return Response::err(Exit::System, format!("cannot write the answer: {e}"));
        }
        let mut v: serde_json::Value = serde_json::from_slice(&buf).unwrap_or_default();
        v["text"] = json!(r.describe(port));
        let entry = r.decider.and_then(|(_, info)| {
            info.line
                .and_then(|l| self.current.policy.entry_at(info.list, l, info.text))
        });
        let (mut names, mut feeds) = (Vec::new(), Vec::new());
        if let Some(e) = entry {
            names = self
                .dns
                .status()
                .into_iter()
                .filter(|n| e.dns().iter().any(|d| *d.name == *n.name))
                .collect();
            feeds = self
                .feeds
                .status()
                .into_iter()
                .filter(|f| e.feeds().iter().any(|g| **g == *f.group))
                .collect();
        }
        v["dns"] = json!(names);
        v["feeds"] = json!(feeds);
        Response::ok(v)
    }

    async fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Status {} => match crate::report::collect(&self.dp.maps, &self.state_dir) {
                Ok(mut st) => {
                    st.top_blocked = self.blocked.lock().await.top(10);
                    self.rejections
                        .status_of(&mut st.top_blocked, &self.runtime.entries);
                    st.runtime_entries = self.runtime.entries.len();
                    // The file's lists, while what the file holds now is
                    // in force (not a policy sent with `apply`, nor one the
                    // file held before a refused reload).
                    if self.file_in_force() {
                        st.lists = self
                            .lists
                            .iter()
                            .map(|l| crate::protocol::ListJson {
                                file: l.name.clone(),
                                prefixes: l.prefixes,
                                sha256: l.sha256.clone(),
                            })
                            .collect();
                    }
                    st.dns = self.dns.status();
                    st.feeds = self.feeds.status();
                    Response::ok(serde_json::to_value(st).unwrap_or_default())
                }
                Err(e) => Response::err(Exit::System, format!("{e:#}")),
            },
            Request::Apply {
                path,
                text,
                lists,
                confirm_secs,
                force,
                dry_run,
            } => {
                let copied_lists = lists.clone();
                let given = policy::GivenLists(
                    lists
                        .into_iter()
                        .map(|l| (l.path, l.text.into_bytes()))
                        .collect(),
                );
                let loaded = match policy::parse_with(&path, &text, SystemTime::now(), &given) {
                    Ok(l) => l,
                    Err(errs) => {
                        return Response::err(
                            Exit::Refused,
                            errs.to_string().trim_end().replace('\n', "; "),
                        );
                    }
                };
                if dry_run {
                    return self.dry_run(&loaded).await;
                }
                let copy = history::Copy {
                    path: path.clone(),
                    text,
                    lists: copied_lists,
                };
                if let Err(e) = history::store_copy(&self.state_dir, &loaded.sha256, &copy) {
                    tracing::warn!("{e:#}; the history keeps no copy of this policy");
                }
                drop(copy);
                let previous = self.current.clone();
                let src = Source {
                    path: PathBuf::from(&path),
                    sha256: loaded.sha256,
                    policy: loaded.policy,
                };
                if let Some(secs) = confirm_secs
                    && let Err(e) = crate::runtime::check_confirm(secs)
                {
                    return Response::err(Exit::Refused, e);
                }
                match self.install(src, force, "apply") {
                    Ok(mut answer) => {
                        self.count_reload(true).await;
                        if let Some(secs) = confirm_secs {
                            // Keep the oldest good policy if applies stack up.
                            let previous =
                                self.pending.take().map(|p| p.previous).unwrap_or(previous);
                            self.pending = Some(Pending {
                                previous,
                                // In range (checked above): at most a day.
                                deadline: Instant::now() + Duration::from_secs(secs),
                            });
                            tracing::info!(
                                "applied; rolls back in {secs} s unless `ipguard confirm`"
                            );
                            answer.confirm_within_secs = Some(secs);
                        } else {
                            self.pending = None;
                        }
                        answer
                            .warnings
                            .extend(loaded.warnings.iter().map(|w| w.to_string()));
                        Response::ok(json!(answer))
                    }
                    Err(e) => {
                        self.count_reload(false).await;
                        Response::err(e.exit, e.message)
                    }
                }
            }
            Request::Confirm {} => match self.pending.take() {
                Some(_) => {
                    tracing::info!("policy confirmed");
                    Response::ok(json!({"confirmed": true}))
                }
                None => Response::err(
                    Exit::Refused,
                    "nothing to confirm: no `apply --confirm` is pending",
                ),
            },
            Request::Events { .. } => Response::ok(json!(self.blocked.lock().await.recent())),
            Request::Explain { src, port } => self.explain(&src, port.as_deref()),
            Request::Seen {} => Response::ok(json!(self.seen().await)),
            Request::History {} => Response::ok(json!(self.history.records())),
            Request::Rollback { generation, force } => self.rollback(generation, force).await,
            Request::Blocked {} => {
                let mut top = self.blocked.lock().await.top(usize::MAX);
                self.rejections.status_of(&mut top, &self.runtime.entries);
                Response::ok(json!(top))
            }
            Request::Allow {
                addr,
                for_secs,
                service,
                label,
            } => {
                let net = match crate::runtime::parse_net(&addr) {
                    Ok(n) => n,
                    Err(e) => return Response::err(Exit::Refused, e),
                };
                if let Some(s) = &service
                    && !self.compiled.services.iter().any(|x| &x.name == s)
                {
                    return Response::err(
                        Exit::Refused,
                        format!(
                            "unknown service {s:?}: the policy defines {}",
                            self.compiled
                                .services
                                .iter()
                                .map(|x| x.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
                if let Some(secs) = for_secs
                    && let Err(e) = crate::runtime::check_for(Duration::from_secs(secs))
                {
                    return Response::err(Exit::Refused, e);
                }
                let before = self.runtime.entries.clone();
                let rec = match self.runtime.allow(
                    net,
                    for_secs.map(Duration::from_secs),
                    service,
                    label,
                    SystemTime::now(),
                ) {
                    Ok(r) => r,
                    Err(e) => return Response::err(Exit::System, format!("{e:#}")),
                };
                if let Err(e) = self.commit_runtime("runtime allow", before) {
                    return Response::err(Exit::System, e);
                }
                tracing::info!(addr = %rec.addr, until = ?rec.until, "runtime allow");
                // An approval takes a rejection of the address back.
                if self.rejections.take_back(rec.addr)
                    && let Err(e) = self.rejections.save()
                {
                    tracing::warn!("cannot save the rejected access requests: {e:#}");
                }
                Response::ok(json!(rec))
            }
            Request::Revoke { addr } => self.remove_runtime(RuntimeKind::Allow, &addr),
            Request::Undeny { addr } => self.remove_runtime(RuntimeKind::Deny, &addr),
            Request::Deny { entries } => self.deny(entries),
            Request::Reject {
                addr,
                deny,
                for_secs,
                label,
            } => self.reject(addr, deny, for_secs, label),
        }
    }

    /// `ipguard deny`: every entry checked first, then all of them in one
    /// swap (a bulk deny from fail2ban or CrowdSec is one policy write).
    fn deny(&mut self, entries: Vec<crate::protocol::DenyItem>) -> Response {
        let now = SystemTime::now();
        let mut recs = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let which = || {
                if i == 0 {
                    String::new()
                } else {
                    format!("entry {}: ", i + 1)
                }
            };
            let net = match crate::runtime::parse_net(&e.addr) {
                Ok(n) => n,
                Err(m) => return Response::err(Exit::Refused, format!("{}{m}", which())),
            };
            match crate::runtime::record(
                RuntimeKind::Deny,
                net,
                e.for_secs.map(Duration::from_secs),
                None,
                e.label,
                now,
            ) {
                Ok(r) => recs.push(r),
                Err(m) => return Response::err(Exit::Refused, format!("{}{m:#}", which())),
            }
        }
        if recs.is_empty() {
            return Response::err(Exit::Refused, "no source to deny");
        }
        let n = recs.len();
        let before = self.runtime.entries.clone();
        self.runtime.add(recs);
        // A denial is the operator's decision: never refused by the lockout
        // guard, but every session it cuts is said.
        let warnings = match self.commit_runtime("runtime deny", before) {
            Ok(w) => w,
            Err(e) => return Response::err(Exit::System, e),
        };
        tracing::info!(sources = n, "runtime deny");
        Response::ok(json!(crate::protocol::DenyAnswer {
            denied: n,
            warnings,
        }))
    }

    /// `ipguard reject`: the access request of `addr` is rejected (kept in
    /// the state directory), and with `deny` the source denied as `ipguard
    /// deny` would.
    fn reject(
        &mut self,
        addr: String,
        deny: bool,
        for_secs: Option<u64>,
        label: Option<String>,
    ) -> Response {
        let net = match crate::runtime::parse_net(&addr) {
            Ok(n) => n,
            Err(e) => return Response::err(Exit::Refused, e),
        };
        let mut warnings = Vec::new();
        if deny {
            let resp = self.deny(vec![crate::protocol::DenyItem {
                addr: addr.clone(),
                for_secs,
                label: label.clone(),
            }]);
            if !resp.ok {
                return resp;
            }
            if let Some(w) = resp.data["warnings"].as_array() {
                warnings.extend(w.iter().filter_map(|x| x.as_str().map(str::to_string)));
            }
        }
        let before = self.rejections.list.clone();
        self.rejections.reject(net, label, jiff::Timestamp::now());
        if let Err(e) = self.rejections.save() {
            self.rejections.list = before;
            return Response::err(
                Exit::System,
                format!("cannot save the rejected access requests ({e:#}); not rejected"),
            );
        }
        tracing::info!(addr = %net, deny, "access request rejected");
        Response::ok(json!({ "rejected": net, "denied": deny, "warnings": warnings }))
    }

    /// `revoke` (allows) and `undeny` (denies) of an address.
    fn remove_runtime(&mut self, kind: RuntimeKind, addr: &str) -> Response {
        let net = match crate::runtime::parse_net(addr) {
            Ok(n) => n,
            Err(e) => return Response::err(Exit::Refused, e),
        };
        let before = self.runtime.entries.clone();
        let (what, verb) = match kind {
            RuntimeKind::Allow => ("allow", "revoke"),
            RuntimeKind::Deny => ("deny", "undeny"),
        };
        match self.runtime.remove(kind, net) {
            0 => Response::err(
                Exit::Refused,
                format!(
                    "{addr} has no runtime {what} entry (see `ipguard status`); entries of the policy file are changed in the file"
                ),
            ),
            n => {
                // The operator's decision: never refused by the lockout
                // guard, but every session it cuts is said, to the log and
                // to the caller.
                let warnings = match self.commit_runtime(&format!("runtime {verb}"), before) {
                    Ok(w) => w,
                    Err(e) => return Response::err(Exit::System, e),
                };
                tracing::info!(addr = %net, "runtime {what} entry removed");
                Response::ok(json!(RevokeAnswer {
                    revoked: n,
                    warnings,
                }))
            }
        }
    }

    /// Runs until SIGTERM or SIGINT. The datapath stays attached after.
    pub async fn serve(
        mut self,
        mut calls: mpsc::Receiver<Call>,
        mut file_changes: mpsc::Receiver<()>,
        mut events: mpsc::Receiver<DropEvent>,
    ) -> Result<()> {
        let mut dns_answers = self.dns.answers();
        let mut feed_outcomes = self.feeds.outcomes();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        // The reload asked for (why, forced) and the one being read.
        let mut want: Option<(&'static str, bool)> = None;
        let mut loading: Option<Loading> = None;
        loop {
            let wake = self.next_wakeup();
            let timer = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let loaded = async {
                match loading.as_mut() {
                    Some(l) => (&mut l.task).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => want = Some(("SIGHUP", true)),
                Some(()) = file_changes.recv() => {
                    // Editors and ConfigMap swaps write in several steps:
                    // let them settle, then read once.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while file_changes.try_recv().is_ok() {}
                    if want.is_none() {
                        want = Some(("policy file changed", false));
                    }
                }
                result = loaded => {
                    if let Some(l) = loading.take() {
                        match result {
                            Ok(r) => self.reload_finish(l.why, l.force, r).await,
                            Err(e) => tracing::error!("{}: reading the policy failed: {e}", l.why),
                        }
                    }
                }
                Some(call) = calls.recv() => {
                    self.peer = call.peer_uid;
                    let resp = self.handle(call.req).await;
                    self.peer = None;
                    let _ = call.reply.send(resp);
                }
                Some(ev) = events.recv() => self.relay(ev).await,
                Some(a) = dns_answers.recv() => {
                    let (name, ok) = (a.name.clone(), a.result.is_ok());
                    let changed = self.dns.answer(a);
                    self.metrics.lock().await.dns_lookup(&name, ok, &self.dns.status());
                    if changed {
                        self.refresh("DNS answer changed").await;
                    }
                }
                Some(o) = feed_outcomes.recv() => {
                    let group = o.group.clone();
                    let (changed, result) = self.feeds.outcome(o);
                    if let Some(result) = result {
                        self.metrics.lock().await.feed_fetch(&group, result, &self.feeds.status());
                    }
                    if changed {
                        self.refresh("feed changed").await;
                    }
                }
                _ = timer => {
                    let now = Instant::now();
                    self.dns.start_due();
                    self.feeds.start_due();
                    if let Some(p) = self.pending.take_if(|p| p.deadline <= now) {
                        tracing::warn!("no `ipguard confirm` in time: rolling back to {}", p.previous.path.display());
                        if let Err(e) = self.install(p.previous, true, "rollback: no confirm in time") {
                            tracing::error!("rollback failed: {e}");
                        }
                    } else if self.next_edge().is_some_and(|t| t <= Instant::now()) {
                        self.refresh("time edge").await;
                    }
                }
            }
            // One read at a time; a change during a read is read after it.
            if loading.is_none()
                && let Some((why, force)) = want.take()
                && self.reload_wanted(force)
            {
                loading = Some(self.reload_start(why, force));
            }
        }
        tracing::info!(
            "exiting; the datapath stays attached and enforcing until `ipguard unload` or the next `ipguard run`"
        );
        Ok(())
    }

    async fn relay(&mut self, ev: DropEvent) {
        let line = EventLine::from_event(&ev, &self.compiled);
        // One JSON object per line on stdout: the daemon's event stream.
        if let Ok(text) = serde_json::to_string(&line) {
            self.stdout.send(text);
        }
        self.blocked.lock().await.record(&line);
        let _ = self.events_tx.send(line);
    }

    pub fn snapshot(&self) -> Option<Snapshot> {
        snapshot(&self.dp.maps, &self.compiled)
    }
}

pub fn snapshot(maps: &crate::datapath::Maps, compiled: &CompiledPolicy) -> Option<Snapshot> {
    let counters = maps.counters().ok()?;
    let per = maps.service_counters().ok()?;
    let mut services = vec![("(none)".to_string(), per[0].0, per[0].1)];
    for s in &compiled.services {
        if let Some((p, r)) = per.get(s.index as usize) {
            services.push((s.name.clone(), *p, *r));
        }
    }
    Some(Snapshot {
        counters,
        services,
        flows: maps.flow_stats().ok(),
    })
}
