//! The command line of docs/cli.md (clap).
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ipguard";
pub const DEFAULT_SOCKET: &str = "/run/ipguard/ipguard.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ipguard";

#[derive(Debug, Parser)]
#[command(
    name = "ipguard",
    version,
    about = "An IP allowlist firewall enforced at the NIC with XDP",
    long_about = "ipguard judges every inbound packet by its source address at the network \
card (XDP), against a YAML policy of allowlists, per-service lists, deny and \
always_allow entries.\n\nWithout root: `check` and `explain` a policy file.\n\
With root: `run` the daemon, then `status`."
)]
pub struct Cli {
    /// Log format of the daemon and of errors (text on a terminal, or JSON lines).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Check(CheckArgs),
    Explain(ExplainArgs),
    Diff(DiffArgs),
    Run(RunArgs),
    Apply(ApplyArgs),
    Confirm(ConfirmArgs),
    Status(StatusArgs),
    Events(EventsArgs),
    Allow(AllowArgs),
    Revoke(RevokeArgs),
    Deny(DenyArgs),
    Undeny(UndenyArgs),
    Reject(RejectArgs),
    Blocked(BlockedArgs),
    History(HistoryArgs),
    Rollback(RollbackArgs),
    Unload(UnloadArgs),
    Completions(CompletionsArgs),
    Manpage(ManpageArgs),
}

/// Print the shell completions (generated from these definitions).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ipguard completions bash > /usr/share/bash-completion/completions/ipguard\n  \
ipguard completions zsh > /usr/share/zsh/vendor-completions/_ipguard\n  \
ipguard completions fish > /usr/share/fish/vendor_completions.d/ipguard.fish"
)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

/// Write the manual pages (roff, generated from these definitions).
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard manpage --dir /usr/share/man/man1 && man ipguard")]
pub struct ManpageArgs {
    /// Write ipguard.1 and one page per subcommand (ipguard-run.1, ...)
    /// into this directory; without it, print ipguard.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The daemon's control socket.
#[derive(Debug, Args, Clone)]
pub struct SocketArg {
    /// Control socket of the daemon.
    #[arg(long, env = "IPGUARD_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Push a policy file to the running daemon, atomically.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ipguard apply new-policy.yaml --dry-run   # what it would change; nothing applied\n  \
ipguard apply new-policy.yaml\n  \
ipguard apply new-policy.yaml --confirm 60   # rolls back by itself unless `ipguard confirm` follows"
)]
pub struct ApplyArgs {
    /// The policy file.
    pub file: PathBuf,
    /// Roll back to the previous policy unless `ipguard confirm` comes
    /// within this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub confirm: Option<u64>,
    /// Apply even if it would cut an established SSH session (lockout).
    #[arg(long)]
    pub force: bool,
    /// Say what it would change against the policy in force (lists,
    /// services, settings, the verdicts of sources the daemon saw
    /// recently, the sessions it would cut); apply nothing.
    #[arg(long, conflicts_with_all = ["confirm", "force"])]
    pub dry_run: bool,
    /// With --dry-run: the answer as one JSON object.
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// What changes from one policy file to another.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard diff /etc/ipguard/policy.yaml new-policy.yaml")]
pub struct DiffArgs {
    /// The policy as it is.
    pub old: PathBuf,
    /// The policy as it would be.
    pub new: PathBuf,
    /// One JSON object: lists (added and removed prefixes, DNS names and
    /// feeds), services, settings, verdicts.
    #[arg(long)]
    pub json: bool,
    /// The daemon whose recently seen sources are judged under both (none
    /// running: only the files are compared).
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Keep the policy pushed with `apply --confirm`.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard apply new.yaml --confirm 60 && ipguard confirm")]
pub struct ConfirmArgs {
    #[command(flatten)]
    pub sock: SocketArg,
}

/// The refused-packet events the daemon relayed.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard events --follow")]
pub struct EventsArgs {
    /// Keep printing new events as they come.
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per event and line, as the daemon relays them.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Allow a source at runtime (an approved access request), optionally for
/// a limited time; kept across restarts, never written into the policy file.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ipguard allow 203.0.113.9 --for 8h --label \"ticket 4711\"\n  \
ipguard allow 2001:db8:5::/64 --service ssh"
)]
pub struct AllowArgs {
    /// An address or CIDR.
    pub addr: String,
    /// How long, e.g. 30m, 8h, 2d (default: until revoked).
    #[arg(long = "for", value_name = "DURATION")]
    pub duration: Option<String>,
    /// Add it to this service's list instead of the host-wide one.
    #[arg(long)]
    pub service: Option<String>,
    /// Shown by status, events and explain, e.g. the ticket it answers.
    #[arg(long)]
    pub label: Option<String>,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Remove the runtime entries of an address.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard revoke 203.0.113.9")]
pub struct RevokeArgs {
    /// The address or CIDR as it was given to `ipguard allow`.
    pub addr: String,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Refuse a source at runtime (a ban from fail2ban or CrowdSec, a lost
/// laptop): it wins over every allow entry and loses only to
/// `always_allow`; kept across restarts, never written into the policy file.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ipguard deny 203.0.113.66 --for 1h --label \"fail2ban sshd\"\n  \
printf '203.0.113.66 1h sshd\\n198.51.100.0/24\\n' | ipguard deny --stdin   # one swap"
)]
pub struct DenyArgs {
    /// An address or CIDR (not with --stdin).
    #[arg(required_unless_present = "stdin", conflicts_with = "stdin")]
    pub addr: Option<String>,
    /// How long, e.g. 30m, 8h, 2d (default: until `ipguard undeny`).
    #[arg(long = "for", value_name = "DURATION", conflicts_with = "stdin")]
    pub duration: Option<String>,
    /// Shown by status, events and explain, e.g. the jail that banned it.
    #[arg(long, conflicts_with = "stdin")]
    pub label: Option<String>,
    /// Read `ADDR [DURATION] [LABEL]` lines from standard input (`-` for no
    /// duration; `#` comments), all denied in one policy swap.
    #[arg(long)]
    pub stdin: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Remove the runtime deny of an address.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard undeny 203.0.113.66")]
pub struct UndenyArgs {
    /// The address or CIDR as it was given to `ipguard deny`.
    pub addr: String,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Reject a refused source's access request: `blocked` shows it rejected
/// instead of pending (kept across restarts); with --deny, also deny it.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  ipguard reject 203.0.113.77\n  \
ipguard reject 203.0.113.0/24 --deny --for 7d --label \"scanner\"")]
pub struct RejectArgs {
    /// An address or CIDR.
    pub addr: String,
    /// Also deny it (as `ipguard deny`).
    #[arg(long)]
    pub deny: bool,
    /// With --deny: how long, e.g. 30m, 8h, 2d (default: until undenied).
    #[arg(long = "for", value_name = "DURATION", requires = "deny")]
    pub duration: Option<String>,
    /// Shown by `blocked`, and with --deny by status, events and explain.
    #[arg(long)]
    pub label: Option<String>,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// The sources refused most, to decide on (see `ipguard allow`).
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard blocked --json")]
pub struct BlockedArgs {
    /// The list as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Validate a policy file and summarize what it compiles to.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard check /etc/ipguard/policy.yaml")]
pub struct CheckArgs {
    /// The policy file.
    pub file: PathBuf,
    /// Print the result as JSON on stdout (also when the policy is invalid).
    #[arg(long)]
    pub json: bool,
    /// Resolve the policy's DNS names once (without it they stand for no
    /// address) and show what they resolve to.
    #[arg(long)]
    pub resolve: bool,
    /// The resolver configuration for `--resolve`.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/resolv.conf",
        requires = "resolve"
    )]
    pub resolv_conf: PathBuf,
}

/// Give the verdict of a policy for a packet, with the rule that decided.
#[derive(Debug, Args)]
#[command(
    override_usage = "ipguard explain FILE SRC [PROTO/PORT] [--at TIME] [--json]\n       \
ipguard explain FILE --stdin [--at TIME] --json\n       \
ipguard explain --daemon SRC [PROTO/PORT] [--json]",
    after_help = "Examples:\n  ipguard explain policy.yaml 203.0.113.9 tcp/22\n  \
printf '203.0.113.9 tcp/22\\n2001:db8::1\\n' | ipguard explain policy.yaml --stdin --json\n  \
ipguard explain --daemon 203.0.113.9 tcp/22   # as the running daemon judges it now"
)]
pub struct ExplainArgs {
    /// The policy file (with --daemon: the source address).
    #[arg(required_unless_present = "daemon", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Source address of the packet.
    #[arg(
        required_unless_present_any = ["stdin", "daemon"],
        conflicts_with = "stdin"
    )]
    pub src: Option<String>,
    /// Protocol and destination port, e.g. tcp/22 (without it: a packet
    /// that matches no service port).
    #[arg(conflicts_with = "stdin")]
    pub port: Option<String>,
    /// Read one query per line (`SRC [PROTO/PORT]`) and answer one JSON
    /// object per line.
    #[arg(long, requires = "json")]
    pub stdin: bool,
    /// The moment to judge at (RFC 3339), default now.
    #[arg(long)]
    pub at: Option<String>,
    /// One JSON object per answer (fields: src, port, verdict, reason,
    /// service, entry, label).
    #[arg(long)]
    pub json: bool,
    /// Ask the running daemon instead of reading a file: its policy in
    /// force with its runtime entries, the DNS answers and the feed copies
    /// it holds now (and, for the deciding entry, those names and feeds).
    #[arg(long, conflicts_with_all = ["stdin", "at"])]
    pub daemon: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode where the driver has it, else generic.
    Auto,
    /// Native (driver) mode only: fails where the driver lacks it.
    Native,
    /// Generic (skb) mode: works on every interface, slower.
    Skb,
}

impl From<XdpModeArg> for crate::datapath::XdpModeRequest {
    fn from(m: XdpModeArg) -> Self {
        match m {
            XdpModeArg::Auto => Self::Auto,
            XdpModeArg::Native => Self::Native,
            XdpModeArg::Skb => Self::Skb,
        }
    }
}

/// Where the daemon's kernel objects, socket and state live.
#[derive(Debug, Args, Clone)]
pub struct Locations {
    /// Directory of the pinned maps and links (on a BPF filesystem).
    #[arg(long, env = "IPGUARD_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Where the daemon keeps its state (applied policy, runtime entries).
    #[arg(long, env = "IPGUARD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// The daemon: load and attach the XDP program and enforce the policy.
///
/// The policy is written into the maps before the program is attached.
/// Refused-packet events go to stdout as JSON lines, logs to stderr. The
/// policy file reloads when it changes (edit, rename, ConfigMap symlink
/// swap) and on SIGHUP; an invalid one is refused, its errors logged, and
/// the running policy stays. On SIGTERM, or if the daemon dies, the
/// datapath stays attached and enforcing; the next `run` adopts it without
/// a gap, and only `ipguard unload` removes it.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard run --config /etc/ipguard/policy.yaml --iface eth0")]
pub struct RunArgs {
    /// The policy file.
    #[arg(long, default_value = "/etc/ipguard/policy.yaml")]
    pub config: PathBuf,
    /// Interface to protect (repeatable); overrides the policy's `interfaces`.
    #[arg(long = "iface")]
    pub ifaces: Vec<String>,
    /// How to attach the XDP program.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    #[command(flatten)]
    pub loc: Locations,
    #[command(flatten)]
    pub sock: SocketArg,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Start even if the policy would cut an established SSH session.
    #[arg(long)]
    pub force: bool,
    /// IPv4 prefixes a policy may have. The IPv4 lookup's arrays are
    /// allocated whole at this size, about 28 bytes per prefix for each of
    /// the two policy slots (131,072: 14.8 MiB in all); a policy with more
    /// is refused. A new size replaces the arrays at start.
    #[arg(long = "ipv4-capacity", value_name = "N", default_value_t = ipguard_common::DEFAULT_V4_CAPACITY,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(ipguard_common::R4_MAX_PREFIXES)))]
    pub ipv4_capacity: u32,
    /// IPv6 prefixes a policy may have. As for IPv4, the arrays are
    /// allocated whole, about 59 bytes per prefix for each slot (65,536:
    /// 8.9 MiB in all).
    #[arg(long = "ipv6-capacity", value_name = "N", default_value_t = ipguard_common::DEFAULT_V6_CAPACITY,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(ipguard_common::R6_MAX_PREFIXES)))]
    pub ipv6_capacity: u32,
    /// Entries of the flow table (return traffic of connections the host
    /// opened), about 100 bytes of kernel memory each. A new size replaces
    /// the table; the host's connections get their entries back from their
    /// next outgoing packet.
    #[arg(long, value_name = "N", default_value_t = ipguard_common::DEFAULT_FLOW_CAPACITY,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub flow_capacity: u32,

    /// The resolver configuration for the policy's `dns:` names (servers,
    /// timeout, attempts).
    #[arg(long, value_name = "FILE", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// Applied policies `ipguard history` keeps (with a copy of each
    /// distinct policy, for `ipguard rollback`).
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub history: u32,
}

/// The policies the daemon applied, newest last.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard history --json")]
pub struct HistoryArgs {
    /// The records as one JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Apply an earlier policy again, from the history's copy (through the
/// lockout guard).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ipguard rollback          # the policy before the one in force\n  \
ipguard rollback 41       # the policy of generation 41"
)]
pub struct RollbackArgs {
    /// The generation to go back to (`ipguard history` lists them);
    /// default: the newest one with another policy than the one in force.
    pub generation: Option<u64>,
    /// Apply even if it would cut an established session on the lockout
    /// guard's ports.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Show what is enforced and what it has done.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard status --json")]
pub struct StatusArgs {
    #[command(flatten)]
    pub loc: Locations,
    #[command(flatten)]
    pub sock: SocketArg,
    /// The status as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Detach the XDP program and remove the pinned objects: the only way
/// protection goes away.
#[derive(Debug, Args)]
#[command(after_help = "Example:\n  ipguard unload")]
pub struct UnloadArgs {
    #[command(flatten)]
    pub loc: Locations,
    #[command(flatten)]
    pub sock: SocketArg,
    /// Detach from this interface only (repeatable).
    #[arg(long = "iface")]
    pub ifaces: Vec<String>,
}
