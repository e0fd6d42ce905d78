//! Every map the datapath uses, defined in one place. Sizes marked "sized at
//! load" are overridden by the controller (`EbpfLoader::map_max_entries`).
use crate::{
    proxy::ProxyWork,
    scratch::{IcmpWork, NewFlow, Victim, Work6},
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
};
use plink_common::{
    Addr, BackendInfo, Counters, CtFwdKey, CtFwdValue, CtOwner, CtRevKey,
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_FLOW_LOG_RING_BYTES, DEFAULT_LB_TABLE_ENTRIES, DropReason,
    EP_RECENT_FLOWS, EndpointGen, EndpointKey, EndpointValue, EpLimitState, GlobalConfig, IfStats,
    IfaceInfo, MAX_BACKENDS, MAX_ENDPOINTS, MAX_INTERFACES, MAX_NAT_COUNTERS, MAX_SERVICES,
    NatAddrInfo, NatPortKey, NetAddrKey, ServiceConfig, proxy::ProxyHeader,
};

/// Per-interface counters keyed by ifindex. The controller inserts a zeroed
/// entry for each interface it attaches to; frames on other interfaces are not counted.
#[map(name = "IF_STATS")]
pub static IF_STATS: PerCpuHashMap<u32, IfStats> =
    PerCpuHashMap::with_max_entries(MAX_INTERFACES, 0);

/// ifindex → role, consumer network, MAC.
#[map(name = "INTERFACES")]
pub static INTERFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_INTERFACES, 0);

/// Timeouts and the provider ifindex (one entry).
#[map(name = "GLOBAL")]
pub static GLOBAL: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// (network, endpoint addr, proto, port) → endpoint.
#[map(name = "ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointValue> =
    HashMap::with_max_entries(MAX_ENDPOINTS * 4, 0);

/// (network, endpoint addr) the consumer program answers ARP for; value unused.
#[map(name = "ARP_ENDPOINTS")]
pub static ARP_ENDPOINTS: HashMap<NetAddrKey, u32> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// NAT address → owning service slot; the provider program handles traffic
/// and ARP for these addresses only.
#[map(name = "NAT_ADDRS")]
pub static NAT_ADDRS: HashMap<Addr, NatAddrInfo> = HashMap::with_max_entries(MAX_NAT_COUNTERS, 0);

#[map(name = "SERVICES")]
pub static SERVICES: Array<ServiceConfig> = Array::with_max_entries(MAX_SERVICES, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Backend ids, each service owning `lb_size` slots from `lb_offset`. Sized at load.
#[map(name = "LB_TABLE")]
pub static LB_TABLE: Array<u32> = Array::with_max_entries(DEFAULT_LB_TABLE_ENTRIES, 0);

/// Forward conntrack. Plain hash (not LRU): a full table refuses new flows
/// instead of silently evicting a live one. Sized at load.
#[map(name = "CT_FWD")]
pub static CT_FWD: HashMap<CtFwdKey, CtFwdValue> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Reverse conntrack → owning forward key. Sized at load.
#[map(name = "CT_REV")]
pub static CT_REV: HashMap<CtRevKey, CtOwner> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// NAT ports in use → owning forward key. Sized at load.
#[map(name = "NAT_PORTS")]
pub static NAT_PORTS: HashMap<NatPortKey, CtOwner> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Per-endpoint cap state, shared by all CPUs (atomic updates).
#[map(name = "EP_LIMITS")]
pub static EP_LIMITS: Array<EpLimitState> = Array::with_max_entries(MAX_ENDPOINTS, 0);

/// The keys of each endpoint's last `EP_RECENT_FLOWS` flows, a ring indexed
/// by `endpoint_id * EP_RECENT_FLOWS + flows_created % EP_RECENT_FLOWS`
/// (see `limits::reclaim_recent`). Not pinned: a hint, rebuilt by new flows.
#[map(name = "EP_RECENT")]
pub static EP_RECENT: Array<CtFwdKey> = Array::with_max_entries(MAX_ENDPOINTS * EP_RECENT_FLOWS, 0);

/// Per-endpoint flows freed by the controller's GC (written by userspace only).
#[map(name = "EP_GC_FREED")]
pub static EP_GC_FREED: Array<u64> = Array::with_max_entries(MAX_ENDPOINTS, 0);

/// Per-endpoint generation and state, checked by established flows (one
/// array read instead of the `ENDPOINTS` hash lookup).
#[map(name = "EP_GEN")]
pub static EP_GEN: Array<EndpointGen> = Array::with_max_entries(MAX_ENDPOINTS, 0);

#[map(name = "EP_STATS")]
pub static EP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_ENDPOINTS, 0);

#[map(name = "SVC_STATS")]
pub static SVC_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Indexed by `service_id * MAX_NAT_SLOTS + slot`.
#[map(name = "NAT_STATS")]
pub static NAT_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_NAT_COUNTERS, 0);

/// Drops by reason.
#[map(name = "DROPS")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// Drops by endpoint and reason: `endpoint_id * DropReason::COUNT + reason`.
#[map(name = "EP_DROPS")]
pub static EP_DROPS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_ENDPOINTS * DropReason::COUNT, 0);

/// PROXY protocol v2 header of each endpoint (`len` 0: none), written by the
/// controller; `proxy.rs` inserts it in front of a flow's first client byte.
#[map(name = "PROXY_HEADERS")]
pub static PROXY_HEADERS: Array<ProxyHeader> = Array::with_max_entries(MAX_ENDPOINTS, 0);

/// Per-CPU scratch areas of the slow paths, one per use (`scratch.rs`):
/// working sets built here instead of on the 512-byte BPF stack.
#[map(name = "SCRATCH_NEW_FLOW")]
pub static SCRATCH_NEW_FLOW: PerCpuArray<NewFlow> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SCRATCH_VICTIM")]
pub static SCRATCH_VICTIM: PerCpuArray<Victim> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SCRATCH_PROXY")]
pub static SCRATCH_PROXY: PerCpuArray<ProxyWork> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SCRATCH_ICMP")]
pub static SCRATCH_ICMP: PerCpuArray<IcmpWork> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SCRATCH_V6")]
pub static SCRATCH_V6: PerCpuArray<Work6> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 programs, by `plink_common::v6_prog` slot: the IPv4 entry points
/// tail-call them. Filled by the controller after loading; not pinned.
#[map(name = "V6_PROGS")]
pub static V6_PROGS: ProgramArray = ProgramArray::with_max_entries(plink_common::v6_prog::COUNT, 0);

/// Flow-log records (`flowlog.rs`) for the controller. Sized at load
/// (`gateway.flow_logs.ring_bytes`); not pinned.
#[map(name = "FLOW_LOG")]
pub static FLOW_LOG: RingBuf = RingBuf::with_byte_size(DEFAULT_FLOW_LOG_RING_BYTES, 0);

/// Flow-log records lost to a full ring (one slot, per CPU).
#[map(name = "FLOW_LOG_LOST")]
pub static FLOW_LOG_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Debug messages on (non-zero) or off: written by the controller
/// (`plink-ctl debug on|off`); not pinned, so off at every start.
#[map(name = "DEBUG")]
pub static DEBUG: Array<u32> = Array::with_max_entries(1, 0);

/// The last drop's reason and endpoint, per CPU, while debug is on.
#[map(name = "DEBUG_LAST_DROP")]
pub static DEBUG_LAST_DROP: PerCpuArray<[u32; 2]> = PerCpuArray::with_max_entries(1, 0);
