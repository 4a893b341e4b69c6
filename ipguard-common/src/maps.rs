//! Map names, sizes and value layouts of the datapath.
//!
//! The policy lives twice in the kernel: slot 0 and slot 1, each a complete
//! IPv4 range table (`range4`), IPv6 range tree (`range6`), port table and
//! config. The XDP program reads
//! [`ACTIVE_SLOT`](MAP_ACTIVE) once per packet and then looks only at that
//! slot, so a packet is always judged by one whole policy. The daemon writes a
//! new policy into the inactive slot, flips the index, and later reuses the
//! retired slot for the policy after that. Two fixed sets (rather than
//! map-in-map with a fresh trie per policy) mean a swap never frees a trie:
//! the kernel frees an LPM trie in O(entries x depth) and a multi-million
//! entry free has stalled a CPU for seconds in production.

/// Number of policy slots (double buffering).
pub const SLOTS: u32 = 2;

/// Map names as they appear in the object file and under the pin directory.
/// Maps an earlier version pinned that this one has no more (the LPM
/// tries the range tables replaced); the loader removes their pins.
pub const OBSOLETE_MAPS: &[&str] = &["IPG_V4_0", "IPG_V4_1", "IPG_V6_0", "IPG_V6_1"];
/// Per slot, the allow entries that decide for sources whose prefix is
/// allowed by several lists with different deciding entries (see
/// [`ENTRY_LOOKUP`]). Key: the list (0 host-wide, 1..=63 a service's own
/// list) then the address; prefix length 8 + the address prefix's.
pub const MAP_DECIDERS_V4: [&str; 2] = ["IPG_DEC_V4_0", "IPG_DEC_V4_1"];
pub const MAP_DECIDERS_V6: [&str; 2] = ["IPG_DEC_V6_0", "IPG_DEC_V6_1"];
pub const MAP_PORTS: &str = "IPG_PORTS";
pub const MAP_CONFIG: &str = "IPG_CONFIG";
pub const MAP_ACTIVE: &str = "IPG_ACTIVE";
pub const MAP_COUNTERS: &str = "IPG_COUNTERS";
pub const MAP_SERVICE_COUNTERS: &str = "IPG_SVC_COUNTERS";
pub const MAP_ENTRY_HITS: &str = "IPG_ENTRY_HITS";
pub const MAP_EVENTS: &str = "IPG_EVENTS";
pub const MAP_EVENT_RATE: &str = "IPG_EVENT_RATE";
pub const MAP_EVENT_BUDGET: &str = "IPG_EVENT_BUDGET";
pub const MAP_FLOWS: &str = "IPG_FLOWS";
pub const MAP_REJECT_BUDGET: &str = "IPG_RST_BUDGET";
pub const MAP_FRAGMENTS: &str = "IPG_FRAGS";
/// The DHCP servers the policies of both slots name (`dhcp: [...]`), at
/// most [`MAX_DHCP_SERVERS`] per slot; keyed by [`dhcp_key`].
pub const MAP_DHCP_SERVERS: &str = "IPG_DHCP";
/// A sample of passed packets (one [`PassSample`] ring per CPU), for the
/// verdicts `diff` and `apply --dry-run` say would change.
pub const MAP_PASS_SAMPLE: &str = "IPG_PASS_SAMPLE";
pub const MAX_DHCP_SERVERS: u32 = 8;

/// Every map of the object as the kernel sees it: (name, key size, value
/// size). LPM trie keys carry a 4-byte prefix length before the address;
/// the ring buffer has neither. The loader's test checks both objects
/// against this table, so a map declared with another type in the
/// program, or a renamed one, fails before any kernel sees it.
pub const MAP_LAYOUTS: &[(&str, u32, u32)] = &[
    (
        crate::MAP_R4_DIRECT,
        4,
        core::mem::size_of::<crate::R4Direct>() as u32,
    ),
    (
        crate::MAP_R4_RANGES,
        4,
        core::mem::size_of::<crate::R4Cell>() as u32,
    ),
    (crate::MAP_R4_LEAVES, 4, PREFIX_VALUE_SIZE),
    (
        crate::MAP_R6_NODES,
        4,
        core::mem::size_of::<crate::R6Node>() as u32,
    ),
    (crate::MAP_R6_LEAVES, 4, PREFIX_VALUE_SIZE),
    (
        crate::MAP_R6_EMPTY,
        4,
        core::mem::size_of::<crate::R6Empty>() as u32,
    ),
    (
        crate::MAP_R6_START,
        4,
        core::mem::size_of::<crate::R6Start>() as u32,
    ),
    (MAP_DECIDERS_V4[0], 4 + 5, 4),
    (MAP_DECIDERS_V4[1], 4 + 5, 4),
    (MAP_DECIDERS_V6[0], 4 + 17, 4),
    (MAP_DECIDERS_V6[1], 4 + 17, 4),
    (MAP_PORTS, 4, 1),
    (MAP_CONFIG, 4, core::mem::size_of::<PolicyConfig>() as u32),
    (MAP_ACTIVE, 4, 4),
    (MAP_COUNTERS, 4, 8),
    (MAP_SERVICE_COUNTERS, 4, 8),
    (MAP_ENTRY_HITS, 4, 8),
    (MAP_EVENTS, 0, 0),
    (
        MAP_EVENT_RATE,
        16,
        core::mem::size_of::<SourceRate>() as u32,
    ),
    (
        MAP_EVENT_BUDGET,
        4,
        core::mem::size_of::<EventBudget>() as u32,
    ),
    (
        MAP_REJECT_BUDGET,
        4,
        core::mem::size_of::<EventBudget>() as u32,
    ),
    (MAP_FRAGMENTS, core::mem::size_of::<FragKey>() as u32, 8),
    (MAP_DHCP_SERVERS, 4 + 18, 1),
    (MAP_FLOWS, core::mem::size_of::<FlowKey>() as u32, 8),
    (
        MAP_PASS_SAMPLE,
        4,
        core::mem::size_of::<PassSample>() as u32,
    ),
];
/// Maps of the programs' own that user space never opens nor pins (their
/// layout is the program's): the per-CPU scratch values the verifier
/// merges paths through.
pub const PRIVATE_MAPS: &[&str] = &["IPG_SCRATCH"];
const PREFIX_VALUE_SIZE: u32 = core::mem::size_of::<PrefixValue>() as u32;

/// Program names in the object files. The daemon loads the first two; the
/// `ipguard_bench_*` programs are a second object (`ipguard-bench-xdp`)
/// that shares the maps and exists only so that `cargo xtask bench` can
/// time the parts of [`PROG_XDP`] (they are never attached).
pub const PROG_XDP: &str = "ipguard";
pub const PROG_EGRESS: &str = "ipguard_egress";
/// What the names of the bench object's programs start with.
pub const PROG_BENCH_PREFIX: &str = "ipguard_bench_";
/// Returns XDP_PASS and nothing else: the floor of any XDP program.
pub const PROG_BENCH_EMPTY: &str = "ipguard_bench_empty";
/// The parser of [`PROG_XDP`] and nothing else.
pub const PROG_BENCH_PARSE: &str = "ipguard_bench_parse";
/// Parser, active slot and the source's LPM lookup, nothing else.
pub const PROG_BENCH_LOOKUP: &str = "ipguard_bench_lookup";
/// Tests only: the source's prefix value as the active slot's lookup finds
/// it, written over the frame's first 16 bytes (allow mask, flags, entry,
/// native endian; zeros for none), XDP_PASS; XDP_DROP for a frame that is
/// not IP. What the lookup differential compares with the compiler's.
pub const PROG_BENCH_VALUE: &str = "ipguard_bench_value";

/// Read-only global of the object, set at load time to the number of
/// possible CPUs: the global event cap is shared out per CPU (see
/// [`EventBudget`]).
pub const GLOBAL_NR_CPUS: &str = "IPG_NR_CPUS";
/// Read-only global of the object, set at load time: 1 when the kernel has
/// `bpf_ktime_get_coarse_ns` (5.11+), 0 to read `bpf_ktime_get_ns`. The
/// verifier knows a frozen read-only value, so it never sees the call the
/// kernel lacks (the branch is dead code to it).
pub const GLOBAL_COARSE_CLOCK: &str = "IPG_COARSE_CLOCK";

/// Default capacities in prefixes (`ipguard run --ipv4-capacity`,
/// `--ipv6-capacity`). The lookups' arrays are allocated whole (see
/// `r4_ranges_capacity`, `r6_nodes_capacity`): about 28 bytes per IPv4
/// prefix and 59 per IPv6 prefix, per slot.
pub const DEFAULT_V4_CAPACITY: u32 = 131_072;
pub const DEFAULT_V6_CAPACITY: u32 = 65_536;
/// Flows of connections this host opened (see [`FlowKey`]); `ipguard run
/// --flow-capacity` sets another size. About 100 bytes each in the kernel.
pub const DEFAULT_FLOW_CAPACITY: u32 = 262_144;
pub const EVENT_RATE_CAPACITY: u32 = 65_536;
/// Per slot; a policy needing more deciders than this credits the
/// remaining ambiguous prefixes to no entry (enforcement is unaffected).
pub const DECIDERS_V4_CAPACITY: u32 = 65_536;
pub const DECIDERS_V6_CAPACITY: u32 = 16_384;
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Fragmented replies whose later fragments may still come ([`FragKey`]).
pub const FRAGMENTS_CAPACITY: u32 = 16_384;
/// How long after its first fragment passed as return traffic the later
/// fragments of a datagram pass too. Fragments of one datagram leave the
/// sender back to back; Linux gives up reassembling after 30 s.
pub const FRAGMENT_TIMEOUT_NS: u64 = 5_000_000_000;
/// A flow's timestamp is rewritten at most this often: a busy connection
/// does not bounce the entry's cache line between CPUs on every segment.
pub const FLOW_REFRESH_NS: u64 = 100_000_000;

/// Highest service index; index 0 means "no service" and is the bit of the
/// host-wide list in [`PrefixValue::allow_mask`].
pub const MAX_SERVICES: usize = 63;

/// Port table layout: `slot * PORT_SLOT_STRIDE + proto_index * 65536 + port`,
/// value the service index (0 = none).
pub const PORT_PROTOS: u32 = 2;
pub const PORT_SLOT_STRIDE: u32 = PORT_PROTOS * 65_536;
pub const PORT_TABLE_LEN: u32 = SLOTS * PORT_SLOT_STRIDE;
pub const PROTO_INDEX_TCP: u32 = 0;
pub const PROTO_INDEX_UDP: u32 = 1;

/// Index in [`MAP_PORTS`] of a TCP or UDP port of a slot; None for other
/// protocols.
#[inline(always)]
pub const fn port_index(slot: u32, protocol: u8, port: u16) -> Option<u32> {
    let proto = match protocol {
        IPPROTO_TCP => PROTO_INDEX_TCP,
        IPPROTO_UDP => PROTO_INDEX_UDP,
        _ => return None,
    };
    Some(slot * PORT_SLOT_STRIDE + proto * 65_536 + port as u32)
}

/// Policy entries counted per slot in [`MAP_ENTRY_HITS`]; entries past this
/// many are still enforced but their hits are not counted per entry.
pub const ENTRY_CAPACITY: u32 = 16_384;
/// "No entry" in [`PrefixValue::entry`].
pub const ENTRY_NONE: u32 = u32::MAX;
/// In [`PrefixValue::entry`]: the allow lists that allow this prefix are
/// decided by different entries; which one decides depends on the packet's
/// service, and the deciders maps ([`MAP_DECIDERS_V4`]) answer it.
pub const ENTRY_LOOKUP: u32 = u32::MAX - 1;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// The value of every LPM-trie prefix: everything steps 3 to 7 of the
/// verdict need, already merged with what the prefixes containing this one
/// say (a longest-prefix match returns only the most specific prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixValue {
    /// Bit 0: the host-wide list allows the prefix. Bit `s` (1..=63): the
    /// effective list of service `s` allows it (a service without a list of
    /// its own has the host-wide bit copied in by the compiler).
    pub allow_mask: u64,
    /// [`FLAG_ALWAYS_ALLOW`], [`FLAG_DENY`], and [`crate::FLAG_TIMED`] with
    /// the index of a deadline record above [`crate::TIMED_SHIFT`].
    pub flags: u32,
    /// The policy entry that decides for this prefix, for hit counters and
    /// events: the most specific always_allow entry containing it when
    /// [`FLAG_ALWAYS_ALLOW`], else the most specific deny entry when
    /// [`FLAG_DENY`], else the entry deciding every allow list that allows
    /// it, or [`ENTRY_LOOKUP`] when those lists are decided by different
    /// entries (which one decides depends on the port).
    pub entry: u32,
}
pub const FLAG_ALWAYS_ALLOW: u32 = 1;
pub const FLAG_DENY: u32 = 2;

/// Mode of a policy. 0 is a slot never written: the program passes.
pub const MODE_UNSET: u32 = 0;
pub const MODE_ENFORCE: u32 = 1;
pub const MODE_MONITOR: u32 = 2;
pub const MODE_OFF: u32 = 3;

pub const ACTION_DROP: u32 = 1;
pub const ACTION_REJECT: u32 = 2;

pub const SCOPE_HOST: u32 = 1;
pub const SCOPE_SERVICES: u32 = 2;

/// Bits of [`PolicyConfig::infra`].
pub const INFRA_NDP: u32 = 1;
pub const INFRA_DHCP: u32 = 2;
pub const INFRA_PMTU: u32 = 4;
pub const INFRA_RETURN_TRAFFIC: u32 = 8;
/// MLD (ICMPv6 130, 131, 132, 143) from a link-local source with hop
/// limit 1: what a router's multicast listener queries and a snooping
/// switch need answered.
pub const INFRA_MLD: u32 = 16;

/// The layout of a slot's lookup tables as this version writes and reads
/// them, recorded in [`PolicyConfig::format`]. A change of what the
/// tables' words mean that keeps the maps' sizes raises it: a pinned
/// policy set written in another format is replaced at start, as one of
/// other sizes is, so that no program reads tables laid out for another
/// (the daemon writes its policy before it attaches its program, and the
/// old program reads the slot meanwhile). Never reused.
/// 1: IPv4 uncovered masks per /22 and single-interval /16s; 2: pair
/// /16s (one or two intervals of one leaf, the leaf in the direct word);
/// 3: IPv4 presence bits per /16 after the masks; 4: IPv4 chunks as a
/// head, packed starts and packed leaves ([`crate::R4Cell`]); 5: two
/// class bits per /16 instead of the presence bit, per IPv6 bucket after
/// its masks, and frequent leaves ([`crate::class`]); 6: IPv4 whole bits
/// per /24 after the classes ([`crate::r4_whole_key`]).
pub const TABLE_FORMAT: u32 = 6;

/// One per slot, in [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    pub mode: u32,
    pub action: u32,
    pub scope: u32,
    pub infra: u32,
    /// Replies to a UDP flow this host opened pass for this long after the
    /// host last sent on it.
    pub flow_timeout_ns: u64,
    /// Minimum time between two events of one source (0: no limit).
    pub event_source_interval_ns: u64,
    /// Events per second in all (0: none are sent).
    pub event_max_per_sec: u32,
    /// Where this slot's IPv4 ranges start in [`crate::MAP_R4_RANGES`]
    /// (both slots share the array; set by the loader).
    pub r4_range_base: u32,
    /// Increases with every policy the daemon writes; shown by status.
    pub generation: u64,
    /// Bit `s`: the deciders map keys service `s`'s decisions by `s`: it
    /// has an allow list of its own, or runtime entries beside the
    /// host-wide list it uses. Other services are keyed by 0 (host-wide).
    pub decider_keys: u64,
    /// As `flow_timeout_ns`, for TCP connections.
    pub flow_timeout_tcp_ns: u64,
    /// The host's ephemeral port range (`net.ipv4.ip_local_port_range`),
    /// set by the loader at every apply: an unconnected UDP socket on a
    /// port in it is a client's, elsewhere a server's (see [`FlowKey`]).
    pub ephemeral_first: u16,
    pub ephemeral_last: u16,
    /// RSTs `action: reject` sends per second in all, shared out per CPU
    /// like the event cap ([`EventBudget`]); a refusal past it is dropped
    /// silently (0: never answer).
    pub reject_max_per_sec: u32,
    /// How many server prefixes this slot has in [`MAP_DHCP_SERVERS`]: 0
    /// exempts DHCP replies from any source (`dhcp: true`), N only from
    /// those servers.
    pub dhcp_servers: u32,
    /// Where this slot's IPv4 leaves start in [`crate::MAP_R4_LEAVES`]
    /// (set by the loader).
    pub r4_leaf_base: u32,
    /// IPv4 prefixes of the policy, and the ranges and leaves the lookup
    /// built from them holds (set by the loader; for `status`).
    pub v4_prefixes: u32,
    pub r4_ranges: u32,
    pub r4_leaves: u32,
    /// Of those leaves, the deadline records and fallback values of
    /// time-limited entries ([`crate::deadline`]; for `status`).
    pub timed_leaves: u32,
    /// Unix time of boot in nanoseconds (CLOCK_REALTIME minus
    /// CLOCK_BOOTTIME when the loader wrote the slot): the kernel's
    /// deadlines are Unix times, its clock counts from boot.
    pub unix_at_boot_ns: u64,
    /// Where this slot's IPv6 tree nodes and leaves start in
    /// [`crate::MAP_R6_NODES`] and [`crate::MAP_R6_LEAVES`], and how many
    /// it has (set by the loader; the node count bounds the search).
    pub r6_node_base: u32,
    pub r6_nodes: u32,
    pub r6_leaf_base: u32,
    pub r6_leaves: u32,
    /// IPv6 prefixes of the policy (for `status`).
    pub v6_prefixes: u32,
    /// The layout of the slot's lookup tables, [`TABLE_FORMAT`] of the
    /// version that wrote it (0: a version that recorded none).
    pub format: u32,
    /// The window before this slot's IPv6 tree ([`crate::R6Window`]).
    pub r6_window: crate::R6Window,
    /// The leaves of the /16s and of the IPv6 buckets whose class is
    /// [`crate::CLASS_FREQUENT`] and the one after it ([`crate::class`];
    /// set by the loader).
    pub r4_frequent: [u32; crate::FREQUENT],
    pub r6_frequent: [u32; crate::FREQUENT],
}

/// Key data of [`MAP_DECIDERS_V4`]: the list, then the address. A prefix
/// of length `l` is stored with length [`DECIDER_KEY_BITS`] + `l`.
#[inline(always)]
pub const fn decider_key_v4(list: u8, addr: &[u8; 4]) -> [u8; 5] {
    [list, addr[0], addr[1], addr[2], addr[3]]
}

/// Key data of [`MAP_DECIDERS_V6`], as [`decider_key_v4`].
#[inline(always)]
pub const fn decider_key_v6(list: u8, addr: &[u8; 16]) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = list;
    let mut i = 0;
    while i < 16 {
        k[1 + i] = addr[i];
        i += 1;
    }
    k
}
pub const DECIDER_KEY_BITS: u32 = 8;

/// Key of [`MAP_DHCP_SERVERS`], an LPM trie of both slots' servers: the
/// slot, the family, then the address as in [`FlowKey`]; a server prefix
/// of length `l` is stored with length [`DHCP_KEY_BITS`] + `l`, a source
/// looked up with [`DHCP_KEY_BITS`] + 128. One lookup, whatever the
/// number of servers.
#[inline(always)]
pub const fn dhcp_key(slot: u32, family: u8, addr: &[u8; 16]) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[0] = slot as u8;
    k[1] = family;
    let mut i = 0;
    while i < 16 {
        k[2 + i] = addr[i];
        i += 1;
    }
    k
}
pub const DHCP_KEY_BITS: u32 = 16;

/// Verdicts, also the first coordinate of [`MAP_COUNTERS`].
pub const VERDICT_PASS: u8 = 0;
pub const VERDICT_DROP: u8 = 1;
pub const VERDICT_REJECT: u8 = 2;
pub const VERDICT_WOULD_DROP: u8 = 3;
pub const VERDICT_COUNT: u32 = 4;

/// Reasons, the second coordinate of [`MAP_COUNTERS`].
pub const REASON_INFRASTRUCTURE: u8 = 0;
pub const REASON_OFF: u8 = 1;
pub const REASON_ALWAYS_ALLOW: u8 = 2;
pub const REASON_DENY: u8 = 3;
pub const REASON_FRAGMENT: u8 = 4;
pub const REASON_OUT_OF_SCOPE: u8 = 5;
pub const REASON_ALLOWED: u8 = 6;
pub const REASON_NOT_ALLOWED: u8 = 7;
pub const REASON_RETURN_TRAFFIC: u8 = 8;
pub const REASON_MALFORMED: u8 = 9;
pub const REASON_NON_IP: u8 = 10;
pub const REASON_NO_POLICY: u8 = 11;
pub const REASON_SLOTS: u32 = 16;

/// The stable name of a verdict, as `explain --json`, events, status and
/// metrics spell it (docs/cli.md).
pub const fn verdict_name(v: u8) -> &'static str {
    match v {
        VERDICT_PASS => "pass",
        VERDICT_DROP => "drop",
        VERDICT_REJECT => "reject",
        VERDICT_WOULD_DROP => "would_drop",
        _ => "unknown",
    }
}

/// The stable name of a reason (docs/cli.md), as [`verdict_name`].
pub const fn reason_name(r: u8) -> &'static str {
    match r {
        REASON_INFRASTRUCTURE => "infrastructure",
        REASON_OFF => "off",
        REASON_ALWAYS_ALLOW => "always_allow",
        REASON_DENY => "deny",
        REASON_FRAGMENT => "fragment",
        REASON_OUT_OF_SCOPE => "out_of_scope",
        REASON_ALLOWED => "allowed",
        REASON_NOT_ALLOWED => "not_allowed",
        REASON_RETURN_TRAFFIC => "return_traffic",
        REASON_MALFORMED => "malformed",
        REASON_NON_IP => "non_ip",
        REASON_NO_POLICY => "no_policy",
        _ => "unknown",
    }
}

/// [`MAP_COUNTERS`] index of a verdict and reason.
#[inline(always)]
pub const fn counter_index(verdict: u8, reason: u8) -> u32 {
    verdict as u32 * REASON_SLOTS + reason as u32
}
/// Counters past the verdict matrix.
pub const COUNTER_EVENTS_SENT: u32 = VERDICT_COUNT * REASON_SLOTS;
pub const COUNTER_EVENTS_SUPPRESSED_SOURCE: u32 = COUNTER_EVENTS_SENT + 1;
pub const COUNTER_EVENTS_SUPPRESSED_GLOBAL: u32 = COUNTER_EVENTS_SENT + 2;
pub const COUNTER_EVENTS_LOST: u32 = COUNTER_EVENTS_SENT + 3;
/// Flows the egress program created in [`MAP_FLOWS`] (inserts that added
/// an element).
pub const COUNTER_FLOWS_CREATED: u32 = COUNTER_EVENTS_SENT + 4;
/// Flows the daemon deleted (sources a new policy refuses). Written by
/// user space only, in CPU 0's slot: the kernel never touches it. Every
/// other flow that left the map was evicted, so evictions are
/// `created - deleted - live`.
pub const COUNTER_FLOWS_DELETED: u32 = COUNTER_EVENTS_SENT + 5;
/// Flows the map could not take (the kernel found no free element), so
/// their replies are judged as any packet.
pub const COUNTER_FLOWS_NOT_RECORDED: u32 = COUNTER_EVENTS_SENT + 6;
/// `action: reject` refusals dropped without a RST because this second's
/// RST budget was spent (a spoofed flood must not make the host a
/// reflector). Their verdict counts as drop.
pub const COUNTER_REJECTS_OVER_BUDGET: u32 = COUNTER_EVENTS_SENT + 7;
pub const COUNTER_LEN: u32 = COUNTER_EVENTS_SENT + 16;

/// Slots of each CPU's ring in [`MAP_PASS_SAMPLE`].
pub const PASS_SAMPLE_LEN: u32 = 64;
/// One passed packet in this many is sampled, per CPU and reason, the
/// first one included: a source that sent a single packet to a quiet host
/// is in the sample; on a busy one the ring holds the last
/// `PASS_SAMPLE_LEN * PASS_SAMPLE_EVERY` passes of each CPU, and the
/// daemon keeps what it read each second for longer.
pub const PASS_SAMPLE_EVERY: u64 = 16;

/// Whether a decision's packet may go into the pass sample: a pass the
/// policy's lists or mode decided, which another policy may decide
/// otherwise (infrastructure, return traffic and non-IP frames pass
/// whatever the lists say).
#[inline(always)]
pub const fn sampled_pass(verdict: u8, reason: u8) -> bool {
    verdict == VERDICT_PASS
        && matches!(
            reason,
            REASON_ALLOWED | REASON_ALWAYS_ALLOW | REASON_OUT_OF_SCOPE | REASON_OFF
        )
}

/// The [`MAP_PASS_SAMPLE`] slot a sampled pass goes to, from its verdict
/// and reason counter on this CPU after counting it (1 for the first):
/// None for the packets between two samples.
#[inline(always)]
pub const fn pass_sample_slot(count: u64) -> Option<u32> {
    let n = count.wrapping_sub(1);
    if n.is_multiple_of(PASS_SAMPLE_EVERY) {
        Some(((n / PASS_SAMPLE_EVERY) % PASS_SAMPLE_LEN as u64) as u32)
    } else {
        None
    }
}

/// A passed packet in [`MAP_PASS_SAMPLE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassSample {
    /// The counter value it was taken at (0: the slot was never written):
    /// a reader tells a new sample from one it has read by this.
    pub seq: u64,
    /// IPv4 in the first 4 bytes, the rest zero.
    pub src: [u8; 16],
    /// Destination port in host order, 0 when the packet carries none.
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    pub service: u8,
    pub reason: u8,
    pub _pad0: [u8; 2],
}

/// [`MAP_SERVICE_COUNTERS`]: `service * 2 + (0 passed | 1 refused)`.
pub const SERVICE_COUNTER_LEN: u32 = (MAX_SERVICES as u32 + 1) * 2;

/// A refused packet, sent to user space through the [`MAP_EVENTS`] ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC at tick resolution.
    pub timestamp_ns: u64,
    /// Refused packets of this source that sent no event since the last
    /// one sent, held back by the per-source limit or lost to a full ring.
    /// (Packets held back by the global cap are counted only globally: the
    /// cap is checked before any per-source state, so that a flood of new
    /// sources stays cheap.)
    pub suppressed: u64,
    /// IPv4 in the first 4 bytes, the rest zero.
    pub src: [u8; 16],
    pub ifindex: u32,
    pub entry: u32,
    /// Destination port in host order, 0 when the packet carries none.
    pub dport: u16,
    pub family: u8,
    pub protocol: u8,
    pub service: u8,
    pub verdict: u8,
    pub reason: u8,
    pub _pad0: u8,
}

/// Per-source event limiter state in [`MAP_EVENT_RATE`], keyed by
/// [`rate_key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRate {
    pub last_sent_ns: u64,
    pub suppressed: u64,
}

/// Global event budget in [`MAP_EVENT_BUDGET`] (one per CPU): the per-second
/// window and how many events it has used. The RST budget of
/// [`MAP_REJECT_BUDGET`] works the same way. Each CPU may send
/// `ceil(event_max_per_sec / possible CPUs)` per window, so the whole host
/// never sends more than the cap (rounded up per CPU) and a flood never
/// makes CPUs contend on one shared counter. Traffic spread over fewer CPUs
/// gets a lower cap: the limit errs on the side of sparing user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub used: u64,
    /// The kernel's tick count (jiffies) at which this CPU last found its
    /// share spent: within that tick the share counts as spent without a
    /// read of the clock (0 at first).
    pub spent_tick: u64,
}

/// A connection this host opened, as seen leaving it (TC egress), keyed
/// from the point of view of the reply that will come back: `remote` is the
/// reply's source, `local` its destination, ports in host byte order, IPv4
/// in the first 4 bytes of each address. The value in [`MAP_FLOWS`] is the
/// CLOCK_MONOTONIC time (tick resolution) at which the host last sent on it
/// (a `u64`).
///
/// Which packets leaving the host record a flow:
/// - a TCP SYN without ACK: the host opens a connection;
/// - any other TCP segment but a RST, and any UDP datagram, unless it is
///   sent from a local port that serves: a TCP or UDP port of a service of
///   the active policy, a port with a TCP listener, or a UDP port with an
///   unconnected socket bound to it outside the ephemeral port range (a
///   server's socket; a client's unconnected socket gets an ephemeral
///   port). So a server's answers never make its clients "replies", and a
///   connection the host opened gets its entry back from its next segment
///   after an eviction, a timeout, or an attach after it was opened.
///
/// The same rule decides whether a packet refreshes an existing flow (at
/// most every [`FLOW_REFRESH_NS`]), so an entry that a serving port keeps
/// using ages out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub remote: [u8; 16],
    pub local: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub _pad0: [u8; 2],
}

/// A fragmented datagram whose first fragment passed as return traffic
/// (a large DNS answer with EDNS, say): its later fragments carry no ports,
/// so they pass by this key, [`FRAGMENT_TIMEOUT_NS`] from the first. The
/// value in [`MAP_FRAGMENTS`] is the time the first passed (a `u64`).
/// Addresses as in [`FlowKey`], from the fragment's point of view
/// (`remote` its source). A later fragment that arrives before the first
/// is judged by its source alone, as any fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub remote: [u8; 16],
    pub local: [u8; 16],
    /// IPv4's identification (zero-extended) or IPv6's fragment header's.
    pub id: u32,
    pub protocol: u8,
    pub family: u8,
    pub _pad0: [u8; 2],
}

/// Key of [`MAP_EVENT_RATE`]: the source as in [`DropEvent::src`], with
/// the family in the last byte (unused by IPv4), so that an IPv4 source
/// does not share its limit with the IPv6 address made of the same four
/// bytes followed by zeros.
#[inline(always)]
pub const fn rate_key(family: u8, src: &[u8; 16]) -> [u8; 16] {
    let mut k = *src;
    if family == FAMILY_V4 {
        k[15] = FAMILY_V4;
    }
    k
}

const _: () = assert!(core::mem::size_of::<PrefixValue>() == 16);
const _: () = assert!(core::mem::size_of::<PolicyConfig>() == 168);
const _: () = assert!(core::mem::size_of::<DropEvent>() == 48);
const _: () = assert!(core::mem::size_of::<SourceRate>() == 16);
const _: () = assert!(core::mem::size_of::<EventBudget>() == 24);
const _: () = assert!(core::mem::size_of::<PassSample>() == 32);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), made only of integers and integer
    // arrays, with every padding byte an explicit field (asserted above).
    unsafe impl aya::Pod for PrefixValue {}
    unsafe impl aya::Pod for PolicyConfig {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for SourceRate {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for PassSample {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_pass_and_every_sixteenth_are_sampled_round_the_ring() {
        assert_eq!(pass_sample_slot(0), None, "never counted");
        assert_eq!(pass_sample_slot(1), Some(0));
        assert!((2..=16).all(|n| pass_sample_slot(n).is_none()));
        assert_eq!(pass_sample_slot(17), Some(1));
        let lap = PASS_SAMPLE_EVERY * u64::from(PASS_SAMPLE_LEN);
        assert_eq!(pass_sample_slot(lap + 1), Some(0));
        assert_eq!(
            pass_sample_slot(lap - PASS_SAMPLE_EVERY + 1),
            Some(PASS_SAMPLE_LEN - 1)
        );
        assert!(sampled_pass(VERDICT_PASS, REASON_ALLOWED));
        assert!(!sampled_pass(VERDICT_PASS, REASON_RETURN_TRAFFIC));
        assert!(!sampled_pass(VERDICT_PASS, REASON_INFRASTRUCTURE));
        assert!(!sampled_pass(VERDICT_DROP, REASON_NOT_ALLOWED));
    }
}
