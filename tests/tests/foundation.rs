//! The first datapath proof: the real daemon in a namespace, real TCP from
//! allowed and refused sources over IPv4 and IPv6, and the errors a user
//! meets first.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::unix::process::CommandExt,
    process::Output,
    time::Duration,
};

use ipguard_tests::*;

const POLICY: &str = r#"
version: 1
allow:
  - from: 198.51.100.2
    label: client v4
  - from: "2001:db8:1::2"
    label: client v6
"#;

/// A pair whose server listens on port 7000 at both of its IPv4
/// addresses.
fn listening_pair() -> Pair {
    require_root();
    let pair = Pair::new().unwrap();
    for a in [SERVER_V4, SERVER_V4_ALT] {
        tcp_listener(&pair.server, SocketAddr::new(a.parse().unwrap(), 7000)).unwrap();
    }
    pair
}

/// The kernel's id of the map pinned at `p`.
fn map_id(p: &std::path::Path) -> u32 {
    aya::maps::MapData::from_pin(p)
        .unwrap()
        .info()
        .unwrap()
        .id()
}

fn connect(pair: &Pair, src: &str, dst: &str, port: u16) -> bool {
    let dst: IpAddr = dst.parse().unwrap();
    tcp_connect(
        &pair.client,
        src.parse().unwrap(),
        SocketAddr::new(dst, port),
        Duration::from_millis(700),
    )
    .unwrap()
    .is_ok()
}

#[test]
fn allowed_sources_connect_and_refused_sources_are_dropped() {
    require_root();
    let pair = Pair::new().unwrap();
    for a in [SERVER_V4, SERVER_V4_ALT, SERVER_V6] {
        tcp_listener(&pair.server, SocketAddr::new(a.parse().unwrap(), 7000)).unwrap();
    }
    // Before ipguard: everyone connects (the refusals below are ipguard's).
    assert!(connect(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    assert!(connect(&pair, CLIENT_V6_ALT, SERVER_V6, 7000));

    let daemon = Daemon::start(&pair, POLICY).unwrap();
    assert!(
        connect(&pair, CLIENT_V4, SERVER_V4, 7000),
        "allowed IPv4 source refused"
    );
    assert!(
        connect(&pair, CLIENT_V6, SERVER_V6, 7000),
        "allowed IPv6 source refused"
    );
    assert!(
        !connect(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "refused IPv4 source connected"
    );
    assert!(
        !connect(&pair, CLIENT_V6_ALT, SERVER_V6, 7000),
        "refused IPv6 source connected"
    );

    let out = daemon.ipguard(&["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["attached"][0]["iface"], pair.server_if.as_str());
    assert_eq!(st["mode"], "enforce");
    assert_eq!(st["prefixes"]["ipv4"], 1);
    assert_eq!(st["prefixes"]["ipv6"], 1);
    // Each refused connect retransmits its SYN a few times: at least one
    // drop per refused family.
    assert!(st["counters"]["dropped"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["counters"]["passed"].as_u64().unwrap() >= 4, "{st}");
    let sha = st["policy"]["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64);
}

fn one_error_line(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

fn policy_file() -> (tempdir::Dir, std::path::PathBuf) {
    let d = tempdir::Dir::new();
    let p = d.0.join("policy.yaml");
    std::fs::write(&p, POLICY).unwrap();
    (d, p)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p = ipguard_tests::scratch_dir("foundation-");
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn missing_interface_is_one_clear_line() {
    require_root();
    let (d, policy) = policy_file();
    let ns = Netns::new("ipge").unwrap();
    let pins = PinDir::new().unwrap();
    let out = ns
        .command(ipguard_bin())
        .args(["run", "--iface", "nosuch0", "--config"])
        .arg(&policy)
        .arg("--pin-dir")
        .arg(&pins.path)
        .arg("--state-dir")
        .arg(d.0.join("state"))
        .output()
        .unwrap();
    one_error_line(&out, 3, "interface \"nosuch0\" not found");
    assert!(
        !pins.path.exists(),
        "nothing may be pinned for a failed start"
    );
}

#[test]
fn missing_privilege_is_one_clear_line() {
    require_root();
    let (d, policy) = policy_file();
    // In a namespace of its own: even a regression that attached without
    // privilege would only reach that namespace's loopback.
    let ns = Netns::new("ipgp").unwrap();
    let out = ns
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(ipguard_bin())
        .args(["run", "--iface", "lo", "--config"])
        .arg(&policy)
        .arg("--state-dir")
        .arg(d.0.join("state"))
        .output()
        .unwrap();
    one_error_line(&out, 3, "needs root");
}

#[test]
fn missing_bpffs_is_one_clear_line() {
    require_root();
    let (d, policy) = policy_file();
    let ns = Netns::new("ipgf").unwrap();
    let out = ns
        .command(ipguard_bin())
        .args(["run", "--iface", "lo", "--config"])
        .arg(&policy)
        .arg("--pin-dir")
        .arg(d.0.join("not-bpffs"))
        .arg("--state-dir")
        .arg(d.0.join("state"))
        .output()
        .unwrap();
    one_error_line(&out, 3, "not on a BPF filesystem");
}

/// personality(2)'s UNAME26: the kernel reports its release to the process
/// as 2.6.(40 + minor), as it does for old programs that cannot parse 3.x.
/// The real kernel, the real uname(2), a release older than any ipguard
/// supports.
const UNAME26: libc::c_ulong = 0x0020000;

#[test]
fn unsupported_kernel_is_one_clear_line() {
    require_root();
    let (d, policy) = policy_file();
    let ns = Netns::new("ipgk").unwrap();
    let pins = PinDir::new().unwrap();
    let mut c = ns.command(ipguard_bin());
    c.args(["run", "--iface", "lo", "--config"])
        .arg(&policy)
        .arg("--pin-dir")
        .arg(&pins.path)
        .arg("--state-dir")
        .arg(d.0.join("state"));
    // SAFETY: one system call between fork and exec; the personality is
    // inherited by nsenter's exec of ipguard.
    unsafe {
        c.pre_exec(|| {
            if libc::personality(UNAME26) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = c.output().unwrap();
    one_error_line(
        &out,
        3,
        "is not supported: ipguard needs Linux 5.10 or newer; this kernel lacks",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Linux 2.6."), "{stderr}");
    assert!(stderr.contains("the BPF ring buffer (5.8)"), "{stderr}");
    assert!(
        !pins.path.exists(),
        "nothing may be pinned for a refused start"
    );
}

/// Hides the kernel's BTF from the daemon: a mount namespace of its own
/// with an empty tmpfs over /sys/kernel/btf (what a kernel built without
/// CONFIG_DEBUG_INFO_BTF shows). The BPF filesystem stays visible.
fn without_kernel_btf() -> io::Result<()> {
    // SAFETY: plain system calls on static NUL-terminated strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let dir = c"/sys/kernel/btf";
        if libc::access(dir.as_ptr(), libc::F_OK) == 0
            && libc::mount(
                c"none".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// ipguard's program has no CO-RE relocations, so a kernel without BTF
/// enforces exactly as one with it; the daemon says the BTF is absent.
#[test]
fn a_kernel_without_btf_still_enforces_and_says_so() {
    let pair = listening_pair();
    let d = Daemon::start_prepared(&pair, POLICY, without_kernel_btf).unwrap();
    assert!(connect(&pair, CLIENT_V4, SERVER_V4, 7000));
    assert!(!connect(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000));
    let st = d.status().unwrap();
    assert_eq!(st["kernel"]["btf"], false, "{st}");
    let missing = st["kernel"]["missing"].to_string();
    assert!(missing.contains("kernel BTF"), "{missing}");
}

/// What the daemon reports of the running kernel: its release, and the
/// features it lacks (printed for `cargo xtask vm-test`'s per-kernel
/// summary).
#[test]
fn status_names_the_kernel_and_what_it_lacks() {
    require_root();
    let pair = Pair::new().unwrap();
    let d = Daemon::start(&pair, POLICY).unwrap();
    let st = d.status().unwrap();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(st["kernel"]["release"], release.trim(), "{st}");
    let missing: Vec<String> = st["kernel"]["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        st["kernel"]["coarse_clock"] == false,
        missing
            .iter()
            .any(|m| m.starts_with("bpf_ktime_get_coarse_ns")),
        "{st}"
    );
    assert_eq!(
        st["kernel"]["tcx"] == false,
        missing.iter().any(|m| m.starts_with("TCX")),
        "{st}"
    );
    println!(
        "vm-report: daemon reports missing: {}",
        if missing.is_empty() {
            "nothing".to_string()
        } else {
            missing.join("; ")
        }
    );
}

/// A new version of ipguard meets the pins an older one left: a map whose
/// layout changed (here `IPG_CONFIG` with the 56-byte value of before) is
/// replaced by one the program can use, not adopted and misread (the
/// verifier would refuse the program, and the host would stay on the old
/// one), and with it every map of the policy set, the slot index too (or
/// the daemon's flip would have the old program, until it is replaced,
/// read the new config beside its own stale slot); the policy is then
/// written into the new maps before attaching.
#[test]
fn a_pinned_map_of_an_older_layout_is_replaced_at_start() {
    let pair = listening_pair();
    let pins = PinDir::new().unwrap();
    let config = pins.path.join("IPG_CONFIG");
    pin_array_map(&config, 4, 56, 2).unwrap();
    // Of this version's layout, but of the old policy set: replaced with
    // the config, so an old program would keep reading its own.
    let active = pins.path.join("IPG_ACTIVE");
    pin_array_map(&active, 4, 4, 1).unwrap();
    let old_active = map_id(&active);
    let daemon = Daemon::start_on(pins, &pair, POLICY).unwrap();
    assert_ne!(
        map_id(&active),
        old_active,
        "the slot index went with the config"
    );
    let info = aya::maps::MapData::from_pin(&config)
        .unwrap()
        .info()
        .unwrap();
    assert_eq!(
        info.value_size() as usize,
        std::mem::size_of::<ipguard_common::PolicyConfig>(),
        "the pinned config map has this version's layout"
    );
    assert!(connect(&pair, CLIENT_V4, SERVER_V4, 7000), "allowed");
    assert!(
        !connect(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "refused"
    );
    drop(daemon);
}

/// Tables can change what their words mean and keep their sizes: a policy
/// set an older version wrote (here a config slot whose tables are of
/// format 0, the sizes this version's) is replaced with the slot index,
/// as one of another size is, never adopted: this version's program
/// would misread the old slot in the moment between the daemon's write
/// and its attach, and the old program this one's.
#[test]
fn a_pinned_policy_set_of_another_table_format_is_replaced_at_start() {
    use nix::sys::signal::Signal;
    let pair = listening_pair();
    let pins = PinDir::new().unwrap();
    let config = pins.path.join(ipguard_common::MAP_CONFIG);
    let size = std::mem::size_of::<ipguard_common::PolicyConfig>() as u32;
    pin_array_map(&config, 4, size, ipguard_common::SLOTS).unwrap();
    let active = pins.path.join(ipguard_common::MAP_ACTIVE);
    pin_array_map(&active, 4, 4, 1).unwrap();
    let (old_config, old_active) = (map_id(&config), map_id(&active));
    {
        let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&config).unwrap());
        let mut c: aya::maps::Array<_, ipguard_common::PolicyConfig> =
            aya::maps::Array::try_from(map.unwrap()).unwrap();
        let older = ipguard_common::PolicyConfig {
            generation: 7,
            format: 0,
            ..Default::default()
        };
        c.set(1, older, 0).unwrap();
    }
    let mut daemon = Daemon::start_on(pins, &pair, POLICY).unwrap();
    assert_ne!(map_id(&config), old_config, "the config was replaced");
    assert_ne!(map_id(&active), old_active, "the slot index went with it");
    assert!(connect(&pair, CLIENT_V4, SERVER_V4, 7000), "allowed");
    assert!(
        !connect(&pair, CLIENT_V4_ALT, SERVER_V4_ALT, 7000),
        "refused"
    );
    // A restart of the same version adopts its own pins.
    let (config_id, active_id) = (map_id(&config), map_id(&active));
    daemon.proc.signal_and_wait(Signal::SIGTERM).unwrap();
    daemon.restart(&pair).unwrap();
    assert_eq!(
        (map_id(&config), map_id(&active)),
        (config_id, active_id),
        "the same version adopts"
    );
    drop(daemon);
}
