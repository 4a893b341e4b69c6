//! Network-namespace harness for ipguard's root integration tests (and the
//! demo).
//!
//! Everything it creates lives in namespaces it creates: uniquely named
//! network namespaces joined by a veth pair made inside them, addresses
//! from 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32 only, and pins
//! under a private directory of /sys/fs/bpf. Every object has a guard whose
//! `Drop` removes it, so a failing or panicking test leaves nothing behind.
//! Nothing here touches an interface of the root network namespace.
//!
//! Commands run in a namespace are entered with `nsenter --net=...` (the
//! network namespace only): `ip netns exec` would also give them a fresh
//! mount namespace where /sys/fs/bpf and its pins are not visible.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

pub mod container;
pub mod dns_server;
pub mod frames;
pub mod https_server;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Fails with one clear line unless running as root: these tests create
/// namespaces and load XDP programs. They are never skipped silently.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "the ipguard integration tests need root (network namespaces, XDP): run `sudo cargo xtask test`"
        );
    }
}

/// A short unique name (interface names are limited to 15 bytes).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    format!("{prefix}{pid}x{n}")
}

fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside this network namespace only.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `ip ARGS` inside the namespace; fails on a non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run_checked(self.command("ip").args(args))
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// opens belong to the namespace (and stay usable from any thread).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file =
            File::open(self.path()).with_context(|| format!("open {}", self.path().display()))?;
        let handle = thread::spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Two namespaces joined by a veth pair: `server` is protected by ipguard,
/// `client` sends traffic from several addresses.
#[derive(Debug)]
pub struct Pair {
    // Field order: the client goes first so its half of the veth is gone
    // before the server's namespace is deleted.
    pub client: Netns,
    pub server: Netns,
    pub server_if: String,
    pub client_if: String,
}

/// Addresses of a [`Pair`]; the client has one "allowed" and one
/// "refused" address per family, the policy decides which is which.
pub const SERVER_V4: &str = "198.51.100.1";
pub const CLIENT_V4: &str = "198.51.100.2";
pub const CLIENT_V4_ALT: &str = "203.0.113.9";
pub const SERVER_V4_ALT: &str = "203.0.113.1";
pub const SERVER_V6: &str = "2001:db8:1::1";
pub const CLIENT_V6: &str = "2001:db8:1::2";
pub const CLIENT_V6_ALT: &str = "2001:db8:1::9";

impl Pair {
    pub fn new() -> Result<Self> {
        let server = Netns::new("ipgs")?;
        let client = Netns::new("ipgc")?;
        let server_if = unique("vs");
        let client_if = unique("vc");
        // Created inside the server namespace with the peer sent straight
        // to the client's: the root namespace never sees either end.
        server.ip(&[
            "link",
            "add",
            &server_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &client.name,
        ])?;
        for (ns, ifname, addrs) in [
            (
                &server,
                &server_if,
                [SERVER_V4, SERVER_V4_ALT, SERVER_V6, ""],
            ),
            (
                &client,
                &client_if,
                [CLIENT_V4, CLIENT_V4_ALT, CLIENT_V6, CLIENT_V6_ALT],
            ),
        ] {
            for a in addrs.iter().filter(|a| !a.is_empty()) {
                if a.contains(':') {
                    ns.ip(&[
                        "-6",
                        "addr",
                        "add",
                        &format!("{a}/64"),
                        "dev",
                        ifname,
                        "nodad",
                    ])?;
                } else {
                    ns.ip(&["addr", "add", &format!("{a}/24"), "dev", ifname])?;
                }
            }
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        // The kernel adds an interface's IPv6 multicast route a few hundred
        // milliseconds after the link comes up; until then it discards
        // inbound multicast (Ip6InNoRoutes), neighbour solicitations
        // included, and a first connection to a not yet resolved address
        // waits a whole NDP retransmit (1 s). Wait for it on both sides.
        for (ns, ifname) in [(&server, &server_if), (&client, &client_if)] {
            let ready = wait_for(Duration::from_secs(5), || {
                let out = ns
                    .ip(&["-6", "route", "show", "table", "local", "dev", ifname])
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .contains("ff00::/8")
                    .then_some(())
            });
            ready.with_context(|| format!("IPv6 on {ifname} not up within 5 s"))?;
        }
        Ok(Self {
            client,
            server,
            server_if,
            client_if,
        })
    }
}

/// A directory on the BPF filesystem for one test's pins, removed on drop
/// (links first, which detaches them, then maps).
#[derive(Debug)]
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Result<Self> {
        ensure_bpffs()?;
        let path = Path::new("/sys/fs/bpf").join(unique("ipguard-test-"));
        Ok(Self { path })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        remove_pins(&self.path);
    }
}

/// Removes a pin directory and everything in it.
pub fn remove_pins(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        // Links before maps: unpinning the link detaches the program.
        entries.sort_by_key(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
        });
        for e in entries {
            let _ = std::fs::remove_file(e);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Mounts the BPF filesystem at /sys/fs/bpf if nothing is mounted there
/// (systemd hosts have it; minimal containers and VMs may not).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    run_checked(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mount the BPF filesystem at /sys/fs/bpf")?;
    Ok(())
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard {
    pub child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    /// Sends a signal (SIGTERM, SIGKILL...) and waits for the exit.
    pub fn signal_and_wait(
        &mut self,
        sig: nix::sys::signal::Signal,
    ) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("process already gone")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)?;
        Ok(c.wait()?)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP listener inside `ns` that accepts and closes connections on a
/// background thread for as long as the process lives.
pub fn tcp_listener(ns: &Netns, addr: SocketAddr) -> Result<SocketAddr> {
    let l = ns.run_in(move || TcpListener::bind(addr))??;
    let local = l.local_addr()?;
    thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    Ok(local)
}

/// Whether the pair's client, from `src`, completes a TCP handshake with
/// `dst:port` within 600 ms (a refused source's SYN is dropped: no answer).
pub fn connects(pair: &Pair, src: &str, dst: &str, port: u16) -> bool {
    tcp_connect(
        &pair.client,
        src.parse().expect("an address"),
        SocketAddr::new(dst.parse().expect("an address"), port),
        Duration::from_millis(600),
    )
    .expect("a socket in the client's namespace")
    .is_ok()
}

/// Connects from `src` (an address of `ns`) to `dst`; Ok(true) when the
/// handshake completes within `timeout`, Ok(false) when it times out or is
/// refused.
pub fn tcp_connect(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<io::Result<()>> {
    Ok(tcp_stream(ns, src, dst, timeout)?.map(drop))
}

/// [`tcp_connect`], keeping the connection.
pub fn tcp_stream(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<io::Result<TcpStream>> {
    ns.run_in(move || -> io::Result<TcpStream> {
        let domain = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // std's TcpStream cannot bind before connecting: do it by hand.
        // SAFETY: plain socket(2); the fd is owned by TcpStream below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid socket.
        let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let sa = nix::sys::socket::SockaddrStorage::from(SocketAddr::new(src, 0));
        nix::sys::socket::bind(fd, &sa).map_err(io::Error::from)?;
        stream.set_nonblocking(true)?;
        let da = nix::sys::socket::SockaddrStorage::from(dst);
        match nix::sys::socket::connect(fd, &da) {
            Ok(()) => return Ok(stream),
            Err(nix::errno::Errno::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        let mut pfd = [nix::poll::PollFd::new(
            stream.as_fd(),
            nix::poll::PollFlags::POLLOUT,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let n =
            nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)).map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        match stream.take_error()? {
            None => {
                stream.set_nonblocking(false)?;
                Ok(stream)
            }
            Some(e) => Err(e),
        }
    })
}

/// The `ipguard` binary of this build (cargo puts it beside the test's
/// `deps` directory; `cargo xtask test` builds it with the workspace).
/// A directory of the tests' own under the target directory (beside the
/// `ipguard` binary, so also inside the vm-test guests): nothing of theirs
/// goes into the shared temp directory.
pub fn scratch_dir(prefix: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    target.join("tmp").join(unique(prefix))
}

pub fn ipguard_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join("ipguard");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p ipguard-user`, or run `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// True when a daemon answers a status request on `socket`. A bare
/// connect is not enough: the daemon binds its socket early (to refuse a
/// second daemon at once) and only answers once its event loop runs, with
/// the datapath attached and the policy file watched.
pub fn answers_status(socket: &Path) -> bool {
    use std::io::{BufRead, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"{\"cmd\":\"status\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).is_ok() && line.contains("\"ok\":true")
}

/// A daemon run in the server namespace of a pair, with its own pins,
/// state and socket; killed on drop (its pins go with the `PinDir`).
pub struct Daemon {
    pub proc: ChildGuard,
    pub pins: PinDir,
    pub dir: PathBuf,
    pub policy: PathBuf,
    /// Capabilities the daemon is confined to (see [`Daemon::start_confined`]),
    /// also on restart; None: all of root's.
    caps: Option<Vec<u32>>,
    /// Run in the child before exec (see [`Daemon::start_prepared`]).
    prepare: Option<fn() -> io::Result<()>>,
    /// stdout is a pipe this side never reads (see
    /// [`Daemon::start_with_stdout_unread`]).
    stdout_unread: bool,
    /// Environment variables the daemon gets (also on restart).
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Writes `policy` and starts `ipguard run` on the server side of
    /// `pair`, waiting until it has attached.
    pub fn start(pair: &Pair, policy: &str) -> Result<Self> {
        Self::start_with(pair, policy, &[])
    }

    /// Like [`Daemon::start`], with extra `ipguard run` arguments.
    pub fn start_with(pair: &Pair, policy: &str, extra: &[&str]) -> Result<Self> {
        Self::launch(pair, policy, extra, None, None)
    }

    /// Like [`Daemon::start`], with the daemon's capability bounding set cut
    /// down to `caps` (numbers of linux/capability.h), as a systemd unit's
    /// `CapabilityBoundingSet` does: root keeps only those after exec. The
    /// memlock limit is lifted first, as `LimitMEMLOCK=infinity` does.
    pub fn start_confined(pair: &Pair, policy: &str, caps: &[u32]) -> Result<Self> {
        Self::launch(pair, policy, &[], Some(caps.to_vec()), None)
    }

    /// Like [`Daemon::start`], with `prepare` run in the child between fork
    /// and exec (to give the daemon a mount namespace of its own, say). It
    /// must only make system calls: no allocation, no lock.
    pub fn start_prepared(
        pair: &Pair,
        policy: &str,
        prepare: fn() -> io::Result<()>,
    ) -> Result<Self> {
        Self::launch(pair, policy, &[], None, Some(prepare))
    }

    /// Like [`Daemon::start_with`], with environment variables of its own
    /// (kept for restarts).
    pub fn start_with_env(
        pair: &Pair,
        policy: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut d = Self::unspawned(PinDir::new()?, policy, None, None)?;
        d.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        d.spawn(pair, extra)?;
        Ok(d)
    }

    fn launch(
        pair: &Pair,
        policy: &str,
        extra: &[&str],
        caps: Option<Vec<u32>>,
        prepare: Option<fn() -> io::Result<()>>,
    ) -> Result<Self> {
        let mut d = Self::unspawned(PinDir::new()?, policy, caps, prepare)?;
        d.spawn(pair, extra)?;
        Ok(d)
    }

    /// Like [`Daemon::start`], on pins the caller chose (whose path it
    /// needs to know before the daemon runs).
    pub fn start_on(pins: PinDir, pair: &Pair, policy: &str) -> Result<Self> {
        let mut d = Self::unspawned(pins, policy, None, None)?;
        d.spawn(pair, &[])?;
        Ok(d)
    }

    /// Like [`Daemon::start`], with the daemon's stdout (its event stream)
    /// a pipe that nobody reads: it fills after 64 KiB.
    pub fn start_with_stdout_unread(pair: &Pair, policy: &str) -> Result<Self> {
        let mut d = Self::unspawned(PinDir::new()?, policy, None, None)?;
        d.stdout_unread = true;
        d.spawn(pair, &[])?;
        Ok(d)
    }

    /// The daemon's directory and policy file, not started yet.
    fn unspawned(
        pins: PinDir,
        policy: &str,
        caps: Option<Vec<u32>>,
        prepare: Option<fn() -> io::Result<()>>,
    ) -> Result<Self> {
        let dir = scratch_dir("daemon-");
        std::fs::create_dir_all(&dir)?;
        let policy_path = dir.join("policy.yaml");
        std::fs::write(&policy_path, policy)?;
        Ok(Self {
            proc: ChildGuard { child: None },
            pins,
            dir,
            policy: policy_path,
            caps,
            prepare,
            stdout_unread: false,
            env: Vec::new(),
        })
    }

    /// Starts another `ipguard run` on the same pins, state and socket (a
    /// restart or an upgrade), after the previous process is gone.
    pub fn restart(&mut self, pair: &Pair) -> Result<()> {
        if let Some(c) = self.proc.child.as_mut()
            && c.try_wait()?.is_none()
        {
            bail!("the previous daemon still runs");
        }
        self.spawn(pair, &[])
    }

    /// [`Daemon::restart`] with extra `ipguard run` arguments.
    pub fn restart_with(&mut self, pair: &Pair, extra: &[&str]) -> Result<()> {
        if let Some(c) = self.proc.child.as_mut()
            && c.try_wait()?.is_none()
        {
            bail!("the previous daemon still runs");
        }
        self.spawn(pair, extra)
    }

    /// Runs `ipguard run` in the server namespace and waits until it has
    /// attached and answers on its socket.
    fn spawn(&mut self, pair: &Pair, extra: &[&str]) -> Result<()> {
        let mut cmd = match &self.caps {
            None => pair.server.command(ipguard_bin()),
            Some(keep) => confined(&pair.server, keep)?,
        };
        cmd.args(["run", "--config"])
            .arg(&self.policy)
            .args(["--iface", &pair.server_if, "--pin-dir"])
            .arg(&self.pins.path)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(self.socket())
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(if self.stdout_unread {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            // Kept for `log()`; printed when a test fails.
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("daemon.log"))
                    .context("open the daemon's log")?,
            );
        if let Some(f) = self.prepare {
            use std::os::unix::process::CommandExt;
            // SAFETY: `prepare` only makes system calls (its contract).
            unsafe { cmd.pre_exec(f) };
        }
        self.proc = ChildGuard::new(cmd.spawn().context("spawn ipguard run")?);
        let link = self.pins.path.join(format!("link_{}", pair.server_if));
        let socket = self.socket();
        self.wait_ready(&link, &socket)
    }

    fn wait_ready(&mut self, link: &Path, socket: &Path) -> Result<()> {
        let ok = wait_for(Duration::from_secs(30), || {
            if let Some(c) = self.proc.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                return Some(Err(anyhow::anyhow!("ipguard run exited: {st}")));
            }
            (link.exists() && answers_status(socket)).then_some(Ok(()))
        });
        ok.context("ipguard run did not become ready within 30 s")?
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("ipguard.sock")
    }

    /// `ipguard ARGS --socket ...`: a command that talks to this daemon.
    pub fn client(&self, args: &[&str]) -> Command {
        let mut c = Command::new(ipguard_bin());
        c.args(args).arg("--socket").arg(self.socket());
        c
    }

    /// `ipguard ARGS --pin-dir ... --state-dir ... --socket ...` (status,
    /// unload), from the root namespace.
    pub fn ipguard(&self, args: &[&str]) -> Command {
        let mut c = Command::new(ipguard_bin());
        c.args(args)
            .arg("--pin-dir")
            .arg(&self.pins.path)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(self.socket());
        c
    }

    /// `status --json` as JSON.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = self.ipguard(&["status", "--json"]).output()?;
        if !out.status.success() {
            bail!(
                "ipguard status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Daemon {
    /// The generation of the policy in force, from `status`.
    pub fn generation(&self) -> u64 {
        let s = self.status().expect("status");
        s["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("no generation in status: {s}"))
    }

    /// What the daemon (and its restarts) logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.proc.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!("--- the daemon's log ---\n{}--- end ---", self.log());
        }
        remove_pins(&self.pins.path);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A command for `ipguard` that enters `ns` and then drops every
/// capability but `keep` from its bounding set. Entering the namespace
/// needs CAP_SYS_ADMIN, so the child does both itself, in that order,
/// before exec (`nsenter` could not drop capabilities after entering).
fn confined(ns: &Netns, keep: &[u32]) -> Result<Command> {
    use std::os::unix::process::CommandExt;
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("read /proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .context("parse /proc/sys/kernel/cap_last_cap")?;
    let drop: Vec<libc::c_ulong> = (0..=last)
        .filter(|c| !keep.contains(c))
        .map(libc::c_ulong::from)
        .collect();
    let netns = File::open(ns.path()).with_context(|| format!("open {}", ns.path().display()))?;
    let mut c = Command::new(ipguard_bin());
    // SAFETY: only setns(2) and prctl(2) run between fork and exec: no
    // allocation, no lock; `netns` and `drop` were made before the fork.
    unsafe {
        c.pre_exec(move || {
            use std::os::fd::AsRawFd;
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The unit's LimitMEMLOCK=infinity, which systemd sets before
            // exec while it still has CAP_SYS_RESOURCE: kernels before 5.11
            // charge BPF maps to RLIMIT_MEMLOCK.
            // Where the harness may not raise the hard limit itself (a
            // container without CAP_SYS_RESOURCE), the soft one goes up to
            // it: what systemd would get there too.
            let unlimited = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) != 0 {
                let mut cur = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) != 0 {
                    return Err(io::Error::last_os_error());
                }
                cur.rlim_cur = cur.rlim_max;
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &cur) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for &cap in &drop {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(c)
}

/// `GET /metrics` from the server's namespace (the daemon listens there):
/// the whole answer, or None if there was none.
pub fn get_metrics(pair: &Pair, sa: SocketAddr) -> Option<String> {
    http_get(pair, sa, "/metrics")
}

/// `GET path` from the server's namespace: the whole answer (status line,
/// head and body), or None if there was none.
pub fn http_get(pair: &Pair, sa: SocketAddr, path: &str) -> Option<String> {
    use std::io::Write as _;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    pair.server
        .run_in(move || -> Option<String> {
            let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(2)).ok()?;
            s.write_all(req.as_bytes()).ok()?;
            let mut body = String::new();
            std::io::Read::read_to_string(&mut s, &mut body).ok()?;
            Some(body)
        })
        .ok()
        .flatten()
}

/// Sends `count` UDP datagrams from `src` (an address of `ns`) to `dst`.
pub fn udp_send(ns: &Netns, src: IpAddr, dst: SocketAddr, count: usize) -> Result<()> {
    ns.run_in(move || -> io::Result<()> {
        let s = std::net::UdpSocket::bind(SocketAddr::new(src, 0))?;
        for i in 0..count {
            s.send_to(format!("ipguard test {i}").as_bytes(), dst)?;
        }
        Ok(())
    })??;
    Ok(())
}

/// A UDP socket in a namespace that counts the datagrams it receives per
/// source address, on a background thread.
pub struct UdpCounter {
    pub addr: SocketAddr,
    counts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, u64>>>,
}

impl UdpCounter {
    pub fn new(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let sock = ns.run_in(move || std::net::UdpSocket::bind(addr))??;
        let addr = sock.local_addr()?;
        let counts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let c = counts.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = sock.recv_from(&mut buf) {
                if let Ok(mut m) = c.lock() {
                    *m.entry(from.ip()).or_insert(0) += 1;
                }
            }
        });
        Ok(Self { addr, counts })
    }

    pub fn count(&self, src: &str) -> u64 {
        let ip: IpAddr = src.parse().expect("address");
        self.counts
            .lock()
            .map(|m| m.get(&ip).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// A UDP server in a namespace that answers every datagram with a copy
/// from an unconnected socket (recv_from, send_to: as DNS and NTP servers
/// do), on a thread that stops when this is dropped.
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn new(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let sock = ns.run_in(move || std::net::UdpSocket::bind(addr))??;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl UdpEcho {
    /// Sends a question from `src` in `ns` from an unconnected socket and
    /// waits up to a second for the echo (three tries).
    pub fn ask(&self, ns: &Netns, src: &str) -> bool {
        self.ask_sized(ns, src, 8)
    }

    /// [`UdpEcho::ask`] with a question (and so an answer) of `size`
    /// bytes: past the link's MTU both travel as IP fragments.
    pub fn ask_sized(&self, ns: &Netns, src: &str, size: usize) -> bool {
        let dst = self.addr;
        let Ok(src) = src.parse::<IpAddr>() else {
            return false;
        };
        ns.run_in(move || -> io::Result<bool> {
            let s = std::net::UdpSocket::bind(SocketAddr::new(src, 0))?;
            s.set_read_timeout(Some(Duration::from_millis(330)))?;
            let question = vec![b'q'; size];
            let mut buf = vec![0u8; size + 1];
            for _ in 0..3 {
                s.send_to(&question, dst)?;
                if matches!(s.recv_from(&mut buf), Ok((n, _)) if n == size) {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(false)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP client socket of a namespace connected to one server: every
/// question leaves from the same port, as a resolver's do.
pub struct UdpClient {
    sock: std::net::UdpSocket,
}

impl UdpClient {
    pub fn new(ns: &Netns, src: IpAddr, dst: SocketAddr) -> Result<Self> {
        let sock = ns.run_in(move || -> io::Result<std::net::UdpSocket> {
            let s = std::net::UdpSocket::bind(SocketAddr::new(src, 0))?;
            s.connect(dst)?;
            Ok(s)
        })??;
        Ok(Self { sock })
    }

    /// Sends one question; whether its answer came within `timeout`.
    pub fn ask(&self, timeout: Duration) -> bool {
        let mut buf = [0u8; 64];
        // Answers to earlier questions that came late.
        let _ = self.sock.set_nonblocking(true);
        while self.sock.recv(&mut buf).is_ok() {}
        let _ = self.sock.set_nonblocking(false);
        if self.sock.send(b"ipguard question").is_err() {
            return false;
        }
        let _ = self.sock.set_read_timeout(Some(timeout));
        self.sock.recv(&mut buf).is_ok()
    }
}

/// Creates an array map of the given layout and pins it at `path` (the
/// directory is created): the pinned map an older ipguard left behind.
pub fn pin_array_map(path: &Path, key_size: u32, value_size: u32, entries: u32) -> io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // `union bpf_attr`'s map_create member, the fields this needs, zero
    // past them.
    let mut create = [0u32; 18];
    create[0] = BPF_MAP_TYPE_ARRAY;
    create[1] = key_size;
    create[2] = value_size;
    create[3] = entries;
    // SAFETY: the map's attributes, written nowhere by the kernel.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut create) }?;
    // SAFETY: a descriptor bpf(2) just returned, owned here.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut pin = Pin {
        pathname: c.as_ptr() as u64,
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        file_flags: 0,
    };
    // SAFETY: a BPF_OBJ_PIN attribute; `c` outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut pin) }?;
    Ok(())
}

/// bpf(2) with `attr` as its attribute (the member of `union bpf_attr`
/// that `cmd` reads, of its size). Returns what the call returns.
///
/// # Safety
/// `attr` must be the layout `cmd` expects, and every address in it valid
/// for what the kernel reads and writes there during the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: as the caller promises; `attr` is alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_long,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// BPF_PROG_TEST_RUN on a program given by file descriptor (any thread,
/// any loader: also programs ipguard did not load). Returns the program's
/// return value and the kernel-measured duration of one run in ns (the
/// mean over `repeat` runs).
pub fn prog_test_run(
    prog_fd: std::os::fd::RawFd,
    data: &[u8],
    repeat: u32,
) -> io::Result<(u32, u32)> {
    /// `union bpf_attr`'s `test` member.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut a = TestAttr {
        prog_fd: prog_fd as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: the kernel reads `data` (alive for the call) and writes only
    // into `a`.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut a) }?;
    Ok((a.retval, a.duration))
}

/// The instructions of a loaded program as the verifier left them
/// (`xlated`: after its rewrites, such as inlined map lookups and resolved
/// helper calls), by BPF_OBJ_GET_INFO_BY_FD.
pub fn prog_xlated(prog_fd: std::os::fd::RawFd) -> io::Result<Vec<[u8; 8]>> {
    /// The head of `struct bpf_prog_info`, up to `xlated_prog_insns`: the
    /// kernel accepts a shorter struct than its own and fills what fits.
    #[repr(C)]
    #[derive(Default)]
    struct ProgInfo {
        prog_type: u32,
        id: u32,
        tag: [u8; 8],
        jited_prog_len: u32,
        xlated_prog_len: u32,
        jited_prog_insns: u64,
        xlated_prog_insns: u64,
    }
    /// `union bpf_attr`'s `info` member.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let get = |info: &mut ProgInfo| {
        let mut a = InfoAttr {
            bpf_fd: prog_fd as u32,
            info_len: std::mem::size_of::<ProgInfo>() as u32,
            info: info as *mut ProgInfo as u64,
        };
        // SAFETY: the kernel writes into `info` (and into the buffer it
        // names, of the length it gives), both alive for the call.
        unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a) }.map(|_| ())
    };
    let mut info = ProgInfo::default();
    get(&mut info)?;
    let mut insns = vec![[0u8; 8]; info.xlated_prog_len as usize / 8];
    let mut info = ProgInfo {
        xlated_prog_len: (insns.len() * 8) as u32,
        xlated_prog_insns: insns.as_mut_ptr() as u64,
        ..Default::default()
    };
    get(&mut info)?;
    insns.truncate(info.xlated_prog_len as usize / 8);
    Ok(insns)
}
