//! The maps and load-time globals, one definition for both objects: the
//! names are `ipguard_common::maps`'s, and maps are pinned by name, so the
//! benchmark object shares the product's maps.

use aya_ebpf::macros::map;

use crate::prelude::*;

// Pinned by name under the daemon's pin directory, so a restarted daemon
// adopts the live maps instead of creating empty ones.
// The IPv4 lookup (`ipguard_common::range4`), both slots in each array;
// user space writes them through a memory mapping.
#[map]
pub(crate) static IPG_R4_DIRECT: Array<R4Direct> =
    Array::pinned(SLOTS * R4_DIRECT_SLOT_VALUES, BPF_F_MMAPABLE);
#[map]
pub(crate) static IPG_R4_RANGES: Array<R4Cell> = Array::pinned(
    SLOTS * r4_ranges_capacity(DEFAULT_V4_CAPACITY),
    BPF_F_MMAPABLE,
);
#[map]
pub(crate) static IPG_R4_LEAVES: Array<PrefixValue> = Array::pinned(
    SLOTS * r4_leaves_capacity(DEFAULT_V4_CAPACITY),
    BPF_F_MMAPABLE,
);
// The IPv6 lookup (`ipguard_common::range6`), as the IPv4 one.
#[map]
pub(crate) static IPG_R6_NODES: Array<R6Node> = Array::pinned(
    SLOTS * r6_nodes_capacity(DEFAULT_V6_CAPACITY),
    BPF_F_MMAPABLE,
);
#[map]
pub(crate) static IPG_R6_LEAVES: Array<PrefixValue> = Array::pinned(
    SLOTS * r6_leaves_capacity(DEFAULT_V6_CAPACITY),
    BPF_F_MMAPABLE,
);
#[map]
pub(crate) static IPG_R6_EMPTY: Array<R6Empty> =
    Array::pinned(SLOTS * R6_EMPTY_SLOT_VALUES, BPF_F_MMAPABLE);
#[map]
pub(crate) static IPG_R6_START: Array<R6Start> =
    Array::pinned(SLOTS * R6_START_VALUES, BPF_F_MMAPABLE);
#[map]
pub(crate) static IPG_DEC_V4_0: LpmTrie<[u8; 5], u32> = LpmTrie::pinned(DECIDERS_V4_CAPACITY, 0);
#[map]
pub(crate) static IPG_DEC_V4_1: LpmTrie<[u8; 5], u32> = LpmTrie::pinned(DECIDERS_V4_CAPACITY, 0);
#[map]
pub(crate) static IPG_DEC_V6_0: LpmTrie<[u8; 17], u32> = LpmTrie::pinned(DECIDERS_V6_CAPACITY, 0);
#[map]
pub(crate) static IPG_DEC_V6_1: LpmTrie<[u8; 17], u32> = LpmTrie::pinned(DECIDERS_V6_CAPACITY, 0);
#[map]
pub(crate) static IPG_PORTS: Array<u8> = Array::pinned(PORT_TABLE_LEN, 0);
#[map]
pub(crate) static IPG_CONFIG: Array<PolicyConfig> = Array::pinned(SLOTS, 0);
#[map]
pub(crate) static IPG_ACTIVE: Array<u32> = Array::pinned(1, 0);
#[map]
pub(crate) static IPG_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_LEN, 0);
#[map]
pub(crate) static IPG_SVC_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(SERVICE_COUNTER_LEN, 0);
#[map]
pub(crate) static IPG_ENTRY_HITS: PerCpuArray<u64> = PerCpuArray::pinned(SLOTS * ENTRY_CAPACITY, 0);
#[map]
pub(crate) static IPG_EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
#[map]
pub(crate) static IPG_EVENT_RATE: LruHashMap<[u8; 16], SourceRate> =
    LruHashMap::pinned(EVENT_RATE_CAPACITY, 0);
#[map]
pub(crate) static IPG_EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);
#[map]
pub(crate) static IPG_RST_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);
#[map]
pub(crate) static IPG_FRAGS: LruHashMap<FragKey, u64> = LruHashMap::pinned(FRAGMENTS_CAPACITY, 0);
#[map]
pub(crate) static IPG_DHCP: LpmTrie<[u8; 18], u8> = LpmTrie::pinned(SLOTS * MAX_DHCP_SERVERS, 0);
#[map]
pub(crate) static IPG_FLOWS: LruHashMap<FlowKey, u64> =
    LruHashMap::pinned(DEFAULT_FLOW_CAPACITY, 0);
#[map]
pub(crate) static IPG_PASS_SAMPLE: PerCpuArray<PassSample> =
    PerCpuArray::pinned(PASS_SAMPLE_LEN, 0);

/// What a program passes through map memory to read it back (see
/// `util::forget`): the parser's offsets, the parse result, and the
/// decision with the entry it credits.
// The benchmark object, which shares this module, uses the word only.
#[allow(dead_code)]
pub(crate) struct Scratch {
    pub ip: IpPacket,
    pub judged: (Decision, u32),
    /// The parser's (see `parse::merge`).
    pub word: u64,
}

/// One entry per program kind, so the egress program never shares the
/// ingress one's. Per load, never pinned: it holds nothing between two
/// packets (`ipguard_common::PRIVATE_MAPS`).
#[map]
pub(crate) static IPG_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(2, 0);
pub(crate) const SCRATCH_XDP: u32 = 0;
#[allow(dead_code)] // as above: the benchmark object has no egress program
pub(crate) const SCRATCH_EGRESS: u32 = 1;

/// Possible CPUs, set by the loader (`GLOBAL_NR_CPUS`); 1 until then.
#[unsafe(no_mangle)]
pub(crate) static IPG_NR_CPUS: u32 = 1;
/// Whether the kernel has the coarse clock, set by the loader
/// (`GLOBAL_COARSE_CLOCK`).
#[unsafe(no_mangle)]
pub(crate) static IPG_COARSE_CLOCK: u32 = 0;
