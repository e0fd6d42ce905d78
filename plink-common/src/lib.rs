//! Keys and values that cross the kernel boundary.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a compile-time
//! size assertion, so the eBPF object and the controller always agree on the
//! layout. Fields in network byte order carry a `_be` suffix. Addresses are
//! [`Addr`]: four big-endian words so IPv6 fits later; IPv4 lives in word 0 and
//! the other words are zero.
//!
//! The pure functions (flow hash, expiry rule, checksum arithmetic) are here so
//! that the datapath and the controller compute exactly the same thing.
#![no_std]

pub mod csum;

/// Version of the map layout. Pins live under `/sys/fs/bpf/plink/v<LAYOUT_VERSION>/`
/// so that an incompatible build never adopts maps it cannot read.
pub const LAYOUT_VERSION: u32 = 6;

/// Maximum number of interfaces XDP may be attached to.
pub const MAX_INTERFACES: u32 = 64;
/// Endpoint ids are `0..MAX_ENDPOINTS` (indexes of the per-endpoint arrays).
pub const MAX_ENDPOINTS: u32 = 4096;
/// Service ids are `0..MAX_SERVICES`.
pub const MAX_SERVICES: u32 = 256;
/// Backend ids are `0..MAX_BACKENDS`, unique across services.
pub const MAX_BACKENDS: u32 = 4096;
/// NAT address slots per service.
pub const MAX_NAT_SLOTS: usize = 8;
/// NAT address counters: `service_id * MAX_NAT_SLOTS + slot`.
pub const MAX_NAT_COUNTERS: u32 = MAX_SERVICES * MAX_NAT_SLOTS as u32;
/// Ports probed (bounded) when allocating a NAT port for a new flow.
pub const NAT_PORT_PROBES: u32 = 32;
/// Default entries of the conntrack maps (flows; each flow has one forward,
/// one reverse and one NAT-port entry).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Default entries of the backend lookup table shared by all services.
pub const DEFAULT_LB_TABLE_ENTRIES: u32 = 65_537 * 16;
/// Backend id stored in lookup-table slots that have no backend.
pub const NO_BACKEND: u32 = u32::MAX;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// ICMP types plink translates.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACH: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// Destination-unreachable code "fragmentation needed and DF set".
    pub const CODE_FRAG_NEEDED: u8 = 4;
}

/// Names of the maps, shared so userspace never spells one differently.
pub mod map_names {
    pub const IF_STATS: &str = "IF_STATS";
    pub const INTERFACES: &str = "INTERFACES";
    pub const GLOBAL: &str = "GLOBAL";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const ARP_ENDPOINTS: &str = "ARP_ENDPOINTS";
    pub const NAT_ADDRS: &str = "NAT_ADDRS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const LB_TABLE: &str = "LB_TABLE";
    pub const CT_FWD: &str = "CT_FWD";
    pub const CT_REV: &str = "CT_REV";
    pub const NAT_PORTS: &str = "NAT_PORTS";
    pub const EP_LIMITS: &str = "EP_LIMITS";
    pub const EP_GC_FREED: &str = "EP_GC_FREED";
    pub const EP_GEN: &str = "EP_GEN";
    pub const EP_STATS: &str = "EP_STATS";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const NAT_STATS: &str = "NAT_STATS";
    pub const DROPS: &str = "DROPS";
    pub const EP_DROPS: &str = "EP_DROPS";

    /// Every map, in the order the controller pins them.
    pub const ALL: &[&str] = &[
        IF_STATS,
        INTERFACES,
        GLOBAL,
        ENDPOINTS,
        ARP_ENDPOINTS,
        NAT_ADDRS,
        SERVICES,
        BACKENDS,
        LB_TABLE,
        CT_FWD,
        CT_REV,
        NAT_PORTS,
        EP_LIMITS,
        EP_GC_FREED,
        EP_GEN,
        EP_STATS,
        SVC_STATS,
        BACKEND_STATS,
        NAT_STATS,
        DROPS,
        EP_DROPS,
    ];
}

/// Names of the XDP programs, one per interface role.
pub mod prog_names {
    pub const CONSUMER: &str = "plink_consumer";
    pub const PROVIDER: &str = "plink_provider";
    /// Passes everything: enables NAPI on the far end of a veth pair.
    pub const PASS: &str = "plink_pass";
    /// The minimal forwarder `cargo xtask bench` compares plink against;
    /// never attached by `plink-ctl`.
    pub const BENCH_FWD: &str = "plink_bench_fwd";
}

/// An address: four words in network byte order. IPv4 is word 0, rest zero.
pub type Addr = [u32; 4];

/// The [`Addr`] of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn v4_be(addr_be: u32) -> Addr {
    [addr_be, 0, 0, 0]
}

/// The [`Addr`] of an IPv4 address given as its four octets.
#[inline(always)]
pub const fn v4(octets: [u8; 4]) -> Addr {
    v4_be(u32::from_ne_bytes(octets))
}

/// XDP verdicts in the order of `xdp_action` (index of [`IfStats::verdicts`]).
pub const XDP_VERDICT_NAMES: [&str; 5] = ["aborted", "drop", "pass", "tx", "redirect"];

/// Per-interface, per-CPU packet counters (value of `IF_STATS`, keyed by ifindex).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    /// Every frame XDP saw on this interface.
    pub packets: u64,
    /// Bytes of every frame XDP saw (link-layer length).
    pub bytes: u64,
    /// Frames that carried IPv4.
    pub ipv4_packets: u64,
    /// Frames that carried ARP.
    pub arp_packets: u64,
    /// Frames by the verdict the program returned, indexed by `xdp_action`
    /// (names in [`XDP_VERDICT_NAMES`]); they add up to `packets`.
    pub verdicts: [u64; 5],
}
const _: () = assert!(core::mem::size_of::<IfStats>() == 72);

impl IfStats {
    /// Sums per-CPU values into one total.
    pub fn add(&mut self, other: &IfStats) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.ipv4_packets = self.ipv4_packets.wrapping_add(other.ipv4_packets);
        self.arp_packets = self.arp_packets.wrapping_add(other.arp_packets);
        for (mine, theirs) in self.verdicts.iter_mut().zip(other.verdicts) {
            *mine = mine.wrapping_add(theirs);
        }
    }
}

/// Role of an interface (`IfaceInfo::role`).
pub mod role {
    pub const CONSUMER: u8 = 1;
    pub const PROVIDER: u8 = 2;
}

/// Bits of `IfaceInfo::flags`.
pub mod iface_flags {
    /// Send frames plink answers itself (ARP replies, ICMP errors) with a
    /// redirect to the ingress interface instead of XDP_TX. On veth, XDP_TX
    /// wakes the peer only when the peer runs an XDP program; a redirect
    /// (`ndo_xdp_xmit`) wakes it whenever it has NAPI, GRO included.
    pub const ANSWER_BY_REDIRECT: u8 = 1;
}

/// Value of `INTERFACES`, keyed by ifindex (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// Consumer network id (consumer interfaces only).
    pub network_id: u32,
    /// The interface's own MAC: source of ARP replies and forwarded frames.
    pub mac: [u8; 6],
    /// [`role`] constant.
    pub role: u8,
    /// [`iface_flags`] bits.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 12);

/// Conntrack timeouts in nanoseconds (part of [`GlobalConfig`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established_ns: u64,
    /// SYN seen but not established, or FIN/RST seen.
    pub tcp_transitory_ns: u64,
    pub udp_ns: u64,
    pub icmp_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Timeouts>() == 32);

const SEC: u64 = 1_000_000_000;

impl Default for Timeouts {
    /// RFC 5382 (TCP), RFC 4787 (UDP), RFC 5508 (ICMP).
    fn default() -> Self {
        Self {
            tcp_established_ns: (2 * 3600 + 4 * 60) * SEC,
            tcp_transitory_ns: 4 * 60 * SEC,
            udp_ns: 2 * 60 * SEC,
            icmp_ns: 60 * SEC,
        }
    }
}

/// The single entry of `GLOBAL` (an array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    pub timeouts: Timeouts,
    /// ifindex handed to `bpf_fib_lookup`: routes are looked up as if the
    /// packet came in on the provider side, and only provider egress is accepted.
    pub provider_ifindex: u32,
    /// Generation of the provider side's routes and neighbours: a flow's
    /// cached next hop is used only while its `hop_gen` equals this. The
    /// controller bumps it on every apply and every GC round (each second),
    /// so a changed route or neighbour is followed within a second. Never 0
    /// once written (0 marks a flow without a cached hop).
    pub hop_gen: u32,
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 40);

/// Value of `EP_GEN`, indexed by endpoint id: what an established flow
/// checks instead of looking its endpoint up again. The controller writes it
/// after `ENDPOINTS`, so a flow created between the two writes carries the
/// old generation and is dropped from the fast path, never the reverse.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointGen {
    /// Digest of everything a flow's mapping depends on (consumer network,
    /// address, service, ports): a re-pointed endpoint or a reused id gets
    /// another one, a restart the same one. 0 = no endpoint.
    pub gen_id: u32,
    /// [`ep_state`] constant.
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<EndpointGen>() == 8);

/// Endpoint connection states (`EndpointValue::state`).
pub mod ep_state {
    pub const PENDING: u8 = 0;
    pub const APPROVED: u8 = 1;
    pub const REJECTED: u8 = 2;
    pub const REMOVED: u8 = 3;
}

/// Key of `ENDPOINTS`: one entry per endpoint address, protocol and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub network_id: u32,
    pub addr_be: Addr,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 24);

/// Value of `ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub endpoint_id: u32,
    pub service_id: u32,
    /// Destination port on the backends.
    pub target_port_be: u16,
    /// [`ep_state`] constant; only `APPROVED` passes traffic.
    pub state: u8,
    pub _pad: u8,
    /// Live flows allowed for this endpoint; 0 = unlimited.
    pub max_flows: u32,
    /// New flows per second allowed for this endpoint; 0 = unlimited.
    pub new_flows_per_sec: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 20);

/// Key of `ARP_ENDPOINTS`: addresses the consumer program answers ARP for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetAddrKey {
    pub network_id: u32,
    pub addr_be: Addr,
}
const _: () = assert!(core::mem::size_of::<NetAddrKey>() == 20);

/// Value of `NAT_ADDRS` (keyed by [`Addr`]): which service slot owns a NAT address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatAddrInfo {
    pub service_id: u32,
    /// The service's NAT slot (`0..MAX_NAT_SLOTS`). Was a `u32` before
    /// `flags` existed: on little-endian hosts old entries read as the same
    /// slot with no flags.
    pub slot: u8,
    /// [`nat_addr_flags`] bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<NatAddrInfo>() == 8);

/// Bits of [`NatAddrInfo::flags`].
pub mod nat_addr_flags {
    /// The address left plink after its last flow drained; kept for a grace
    /// period so late replies to it are dropped (`DropReason::NatRetired`)
    /// rather than passed to the gateway's kernel, and ARP for it is not
    /// answered.
    pub const RETIRED: u8 = 1;
}

/// NAT slot flags.
pub mod nat_flags {
    /// No new flows on this address; existing flows and ARP stay.
    pub const DRAINING: u8 = 1;
}

/// One NAT source address of a service with its port range (inclusive).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatSlot {
    pub addr_be: Addr,
    pub port_min: u16,
    pub port_max: u16,
    /// [`nat_flags`] bits.
    pub flags: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<NatSlot>() == 24);

/// Value of `SERVICES`, indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceConfig {
    pub nat: [NatSlot; MAX_NAT_SLOTS],
    /// Slots `0..nat_count` of `nat` are in use.
    pub nat_count: u32,
    /// Backend lookup table: `LB_TABLE[lb_offset + flow_hash % lb_size]`.
    pub lb_offset: u32,
    /// 0 = no backend (new flows are dropped).
    pub lb_size: u32,
    /// Non-zero once the controller filled this slot.
    pub enabled: u32,
    /// TCP MSS clamp on SYN and SYN-ACK: [`MSS_CLAMP_OFF`], [`MSS_CLAMP_AUTO`]
    /// or the largest MSS let through (host order).
    pub mss_clamp: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceConfig>() == 24 * 8 + 20);

/// [`ServiceConfig::mss_clamp`]: SYN and SYN-ACK pass unchanged.
pub const MSS_CLAMP_OFF: u16 = 0;
/// [`ServiceConfig::mss_clamp`]: clamp to the smaller MTU of the two
/// interfaces the segment crosses (where it came in, where it leaves),
/// minus the IPv4 and TCP headers. Read per segment, so an MTU change or a
/// second consumer interface with another MTU needs no reload.
pub const MSS_CLAMP_AUTO: u16 = u16::MAX;
/// IPv4 and TCP headers without options: MTU - MSS.
pub const TCP_IPV4_HEADERS: u16 = 40;

/// Backend states (`BackendInfo::state`); the lookup table only names active
/// backends, the state is for the record and for the controller.
pub mod backend_state {
    pub const ACTIVE: u8 = 0;
    pub const DRAINING: u8 = 1;
    pub const DOWN: u8 = 2;
}

/// Value of `BACKENDS`, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    pub addr_be: Addr,
    pub service_id: u32,
    /// [`backend_state`] constant.
    pub state: u8,
    /// Non-zero once the controller filled this slot.
    pub enabled: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 24);

/// TCP states kept in conntrack, enough to pick the timeout.
pub mod tcp_state {
    /// SYN seen from the consumer.
    pub const SYN_SENT: u8 = 1;
    /// SYN+ACK seen from the backend.
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    /// FIN or RST seen in either direction.
    pub const CLOSING: u8 = 4;
}

/// Key of `CT_FWD`: the flow as the consumer sends it. The consumer network
/// is part of it so identical 5-tuples from overlapping networks are two flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtFwdKey {
    pub src_addr_be: Addr,
    /// The endpoint address.
    pub dst_addr_be: Addr,
    pub network_id: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtFwdKey>() == 44);

/// Value of `CT_FWD`: the NAT mapping, everything the reverse path needs,
/// and the cached next hop of the forward direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtFwdValue {
    pub backend_addr_be: Addr,
    pub nat_addr_be: Addr,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last packet
    /// either way, written at most once per [`LAST_SEEN_TICK_NS`] so that an
    /// established flow does not dirty its entry's cache line per packet.
    pub last_seen_ns: u64,
    pub backend_port_be: u16,
    pub nat_port_be: u16,
    /// Consumer interface the flow came in on; replies leave through it.
    pub ingress_ifindex: u32,
    /// Link-layer source of the consumer's packets (client or its router).
    pub client_mac: [u8; 6],
    /// Link-layer destination of the consumer's packets (this gateway).
    pub gw_mac: [u8; 6],
    pub endpoint_id: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// [`tcp_state`] constant (TCP), 0 otherwise.
    pub tcp_state: u8,
    pub nat_slot: u8,
    pub proto: u8,
    pub _pad: u8,
    /// `EP_GEN[endpoint_id].gen_id` when the flow was created: a flow whose
    /// endpoint changed since is no flow.
    pub ep_gen: u32,
    /// `flow_hash` of the key this entry was inserted under. A program
    /// holding a pointer into a preallocated hash map can see the element
    /// freed by the GC and reused by another CPU's insert for another flow;
    /// comparing this with the hash of the key it looked up tells the two
    /// apart (see `entry_is`). A hash, not a copy of the key: 40 bytes less
    /// per flow keeps an established packet's entry to fewer cache lines.
    pub key_hash: u32,
    /// `GlobalConfig::hop_gen` the cached next hop below was looked up
    /// under; 0 = none cached.
    pub hop_gen: u32,
    /// Cached next hop towards the backend: egress ifindex, its MTU and the
    /// link-layer addresses `bpf_fib_lookup` returned.
    pub hop_ifindex: u32,
    pub hop_mtu: u16,
    pub hop_smac: [u8; 6],
    pub hop_dmac: [u8; 6],
    pub _pad2: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<CtFwdValue>() == 112);

/// Key of `CT_REV`: a reply as the backend sends it, seen from the NAT side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtRevKey {
    pub nat_addr_be: Addr,
    pub backend_addr_be: Addr,
    pub nat_port_be: u16,
    pub backend_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtRevKey>() == 40);

/// Key of `NAT_PORTS`: a NAT port is unique per (NAT address, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatPortKey {
    pub addr_be: Addr,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<NatPortKey>() == 20);

/// Value of `CT_REV` and of `NAT_PORTS`: the forward key of the flow that owns
/// the entry. The flow's state lives in its forward entry only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtOwner {
    pub fwd: CtFwdKey,
    /// `flow_hash(fwd)`, as in the owner's `CtFwdValue::key_hash`: the
    /// element-reuse check without hashing the key again.
    pub key_hash: u32,
    /// When the entry was inserted; the controller only removes an orphan
    /// (owner gone) after a grace period, so it never races an insertion.
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtOwner>() == 56);

/// Value of `EP_LIMITS`, indexed by endpoint id; written by the datapath only
/// (atomically, shared by all CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpLimitState {
    /// Flows created since the slot was zeroed. Live flows =
    /// `flows_created - EP_GC_FREED[endpoint] - flows_reclaimed` (the
    /// controller writes EP_GC_FREED).
    pub flows_created: u64,
    /// Second (`now_ns / 1e9`) the rate window counts.
    pub window_sec: u64,
    /// New flows admitted in that second.
    pub window_count: u64,
    /// Expired flows of this endpoint that the datapath removed itself to
    /// reuse their NAT port or cap slot (no controller needed; atomic adds).
    pub flows_reclaimed: u64,
    /// Next entry of the endpoint's `EP_RECENT` ring a refused new flow
    /// checks for an expired flow to reclaim.
    pub recent_cursor: u64,
}
const _: () = assert!(core::mem::size_of::<EpLimitState>() == 40);

/// Flows per endpoint whose keys the datapath remembers (`EP_RECENT`, a ring
/// written at creation): where the max-flows cap refuses a new flow, the
/// datapath looks there for an expired flow of the endpoint to reclaim, so
/// the cap frees itself without the controller's GC.
pub const EP_RECENT_FLOWS: u32 = 8;

/// Per-CPU traffic counters, used per endpoint, service, backend and NAT
/// address. Bytes are IP packet lengths; `in` = consumer → service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub flows_created: u64,
    /// New flows refused by the max-flows cap.
    pub refused_max_flows: u64,
    /// New flows refused by the new-flows-per-second cap.
    pub refused_rate: u64,
    /// New flows refused because no NAT port was free.
    pub nat_alloc_failures: u64,
    /// SYNs (consumer → service) whose MSS option was lowered to the clamp.
    pub mss_clamped_in: u64,
    /// SYN-ACKs (service → consumer) whose MSS option was lowered.
    pub mss_clamped_out: u64,
    /// Fragmentation-needed errors sent to a backend about a reply too big
    /// for the consumer interface (the reply itself is not forwarded).
    pub frag_needed_to_backend: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 88);

impl Counters {
    /// Sums per-CPU values into one total.
    pub fn add(&mut self, o: &Counters) {
        self.packets_in = self.packets_in.wrapping_add(o.packets_in);
        self.bytes_in = self.bytes_in.wrapping_add(o.bytes_in);
        self.packets_out = self.packets_out.wrapping_add(o.packets_out);
        self.bytes_out = self.bytes_out.wrapping_add(o.bytes_out);
        self.flows_created = self.flows_created.wrapping_add(o.flows_created);
        self.refused_max_flows = self.refused_max_flows.wrapping_add(o.refused_max_flows);
        self.refused_rate = self.refused_rate.wrapping_add(o.refused_rate);
        self.nat_alloc_failures = self.nat_alloc_failures.wrapping_add(o.nat_alloc_failures);
        self.mss_clamped_in = self.mss_clamped_in.wrapping_add(o.mss_clamped_in);
        self.mss_clamped_out = self.mss_clamped_out.wrapping_add(o.mss_clamped_out);
        self.frag_needed_to_backend = self
            .frag_needed_to_backend
            .wrapping_add(o.frag_needed_to_backend);
    }
}

macro_rules! drop_reasons {
    ($($variant:ident = $value:literal => $name:literal,)*) => {
        /// Why the datapath dropped a packet; index of the `DROPS` per-CPU array
        /// (and of `EP_DROPS` at `endpoint_id * DropReason::COUNT + reason`).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DropReason {
            $($variant = $value,)*
        }

        impl DropReason {
            /// Every reason, in index order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];

            /// snake_case name, used as a metric label.
            pub fn name(&self) -> &'static str {
                match self {
                    $(DropReason::$variant => $name,)*
                }
            }

            /// The reason stored at `index`.
            pub fn from_index(index: u32) -> Option<DropReason> {
                match index {
                    $($value => Some(DropReason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

drop_reasons! {
    Malformed = 0 => "malformed",
    UnsupportedEthertype = 1 => "unsupported_ethertype",
    Ipv6 = 2 => "ipv6",
    IpOptions = 3 => "ip_options",
    Fragment = 4 => "fragment",
    UnsupportedProtocol = 5 => "unsupported_protocol",
    UnknownInterface = 6 => "unknown_interface",
    NoEndpoint = 7 => "no_endpoint",
    EndpointPending = 8 => "endpoint_pending",
    EndpointRejected = 9 => "endpoint_rejected",
    EndpointRemoved = 10 => "endpoint_removed",
    TcpNoFlow = 11 => "tcp_no_flow",
    CapMaxFlows = 12 => "cap_max_flows",
    CapNewFlowRate = 13 => "cap_new_flow_rate",
    NoBackend = 14 => "no_backend",
    NatPortsExhausted = 15 => "nat_ports_exhausted",
    ConntrackFull = 16 => "conntrack_full",
    TtlExceeded = 17 => "ttl_exceeded",
    FibNoNeigh = 18 => "fib_no_neigh",
    FibNotProvider = 19 => "fib_not_provider",
    FibFailed = 20 => "fib_failed",
    FragNeeded = 21 => "frag_needed",
    RedirectFailed = 22 => "redirect_failed",
    ArpNotOurs = 23 => "arp_not_ours",
    ReplyNoFlow = 24 => "reply_no_flow",
    CtBroken = 25 => "conntrack_broken",
    ServiceMissing = 26 => "service_missing",
    FibForwardingDisabled = 27 => "fib_forwarding_disabled",
    IcmpUnsupported = 28 => "icmp_unsupported",
    IcmpErrorNoFlow = 29 => "icmp_error_no_flow",
    OtherHost = 30 => "other_host",
    ReplyEndpointNotApproved = 31 => "reply_endpoint_not_approved",
    NatRetired = 32 => "nat_address_retired",
}

impl DropReason {
    pub const COUNT: u32 = 33;
}
const _: () = assert!(DropReason::ALL.len() == DropReason::COUNT as usize);

/// The flow hash that picks a backend: `LB_TABLE[lb_offset + flow_hash(k) % lb_size]`.
/// Over the whole forward key (consumer network included), so userspace can
/// predict a flow's backend. A murmur3-style mix: cheap in BPF, no loops.
#[inline(always)]
pub fn flow_hash(k: &CtFwdKey) -> u32 {
    let ports = ((k.src_port_be as u32) << 16) | k.dst_port_be as u32;
    let mut h: u32 = 0x9747_b28c ^ k.proto as u32;
    h = mix(h, k.src_addr_be[0]);
    h = mix(h, k.src_addr_be[1]);
    h = mix(h, k.src_addr_be[2]);
    h = mix(h, k.src_addr_be[3]);
    h = mix(h, k.dst_addr_be[0]);
    h = mix(h, k.dst_addr_be[1]);
    h = mix(h, k.dst_addr_be[2]);
    h = mix(h, k.dst_addr_be[3]);
    h = mix(h, k.network_id);
    h = mix(h, ports);
    fmix(h ^ 44)
}

#[inline(always)]
fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// NAT slot tried at probe `i` of a new flow: `(hash + i) % nat_count`.
/// Probing is deterministic so that tests and the controller can predict it.
#[inline(always)]
pub fn nat_probe_slot(hash: u32, i: u32, nat_count: u32) -> u32 {
    // checked_rem: no panic path for the BPF target even if nat_count is 0.
    hash.wrapping_add(i).checked_rem(nat_count).unwrap_or(0)
}

/// NAT port (host order) tried at probe `i` in a slot with range `min..=max`.
///
/// Each flow walks the range with its own stride: probing linearly from the
/// hash (one stride for everyone) builds runs of taken ports, and a new flow
/// landing in a run longer than the probe budget fails while half the range
/// is free. With per-flow strides a probe fails with the pool's utilisation as
/// its chance, nearly independently of the others. The stride is a prime
/// that does not divide the range, so it is coprime with it and the first
/// `min(range, NAT_PORT_PROBES)` probes are distinct ports. A range that the
/// probe budget covers is walked linearly, so its last free port is found.
#[inline(always)]
pub fn nat_probe_port(hash: u32, i: u32, min: u16, max: u16) -> u16 {
    let range = (max as u32).wrapping_sub(min as u32).wrapping_add(1);
    let stride = if range <= NAT_PORT_PROBES {
        1
    } else {
        nat_probe_stride(hash, range)
    };
    let step = (i as u64).wrapping_mul(stride as u64);
    let off = ((hash >> 8) as u64)
        .wrapping_add(step)
        .checked_rem(range as u64)
        .unwrap_or(0);
    min.wrapping_add(off as u16)
}

/// Primes above [`NAT_PORT_PROBES`], spread over the port space. A range of
/// at most 65,536 ports has at most three distinct prime factors this large
/// (37 × 41 × 43 × 47 > 65,536), so of four consecutive entries one never
/// divides the range.
const NAT_PROBE_STRIDES: [u32; 32] = [
    37, 101, 211, 401, 809, 1201, 1601, 2003, 2411, 3203, 4001, 4801, 5623, 6397, 7207, 8009, 9001,
    10007, 12007, 14009, 16001, 18013, 20011, 24007, 28001, 32003, 36007, 40009, 44017, 48017,
    54001, 60013,
];

/// The probe stride of a flow: a prime chosen by the hash, skipping (at most
/// three) primes that divide `range`. `range` must be above 1.
#[inline(always)]
pub fn nat_probe_stride(hash: u32, range: u32) -> u32 {
    let sel = (hash.wrapping_mul(0x9E37_79B1) >> 27) as usize;
    let mut k = 0;
    while k < 4 {
        let p = NAT_PROBE_STRIDES[(sel + k) & 31];
        if range.checked_rem(p).unwrap_or(0) != 0 {
            return p;
        }
        k += 1;
    }
    // Unreachable for ranges up to 65,536 (see above); 1 is coprime with all.
    1
}

/// Idle timeout of a flow in its current state.
#[inline(always)]
pub fn flow_timeout_ns(proto: u8, tcp_state: u8, t: &Timeouts) -> u64 {
    match proto {
        IPPROTO_TCP => {
            if tcp_state == tcp_state::ESTABLISHED {
                t.tcp_established_ns
            } else {
                t.tcp_transitory_ns
            }
        }
        IPPROTO_UDP => t.udp_ns,
        _ => t.icmp_ns,
    }
}

/// The datapath writes a flow's `last_seen_ns` only when it moved by more
/// than this (2^24 ns, about 17 ms): an established flow then dirties its
/// entry once per tick, not once per packet.
pub const LAST_SEEN_TICK_NS: u64 = 1 << 24;

/// What the expiry rule adds to a flow's timeout: the stored `last_seen_ns`
/// may lag the last packet by one tick, and the datapath's coarse clock
/// (CLOCK_MONOTONIC_COARSE, one jiffy of at most 10 ms behind) lags the
/// controller's CLOCK_MONOTONIC.
pub const LAST_SEEN_SLACK_NS: u64 = 2 * LAST_SEEN_TICK_NS;

/// The one expiry rule, applied by the datapath (`bpf_ktime_get_coarse_ns`)
/// and the controller's GC (CLOCK_MONOTONIC, never behind the coarse clock).
/// A `last_seen_ns` in the future (another CPU refreshed it after `now_ns`
/// was read) is not expired.
#[inline(always)]
pub fn flow_expired(v: &CtFwdValue, now_ns: u64, t: &Timeouts) -> bool {
    now_ns > v.last_seen_ns
        && now_ns - v.last_seen_ns
            > flow_timeout_ns(v.proto, v.tcp_state, t).saturating_add(LAST_SEEN_SLACK_NS)
}

/// Should a packet seen at `now_ns` write the flow's `last_seen_ns`? Only
/// when it moved by more than a tick (and never backwards).
#[inline(always)]
pub fn last_seen_moved(last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns > last_seen_ns && now_ns - last_seen_ns > LAST_SEEN_TICK_NS
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C) with all padding spelled out as fields, so
    // every byte is initialised and every bit pattern is valid.
    unsafe impl aya::Pod for IfStats {}
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for NetAddrKey {}
    unsafe impl aya::Pod for NatAddrInfo {}
    unsafe impl aya::Pod for ServiceConfig {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for CtFwdKey {}
    unsafe impl aya::Pod for CtFwdValue {}
    unsafe impl aya::Pod for CtRevKey {}
    unsafe impl aya::Pod for NatPortKey {}
    unsafe impl aya::Pod for CtOwner {}
    unsafe impl aya::Pod for EpLimitState {}
    unsafe impl aya::Pod for EndpointGen {}
    unsafe impl aya::Pod for Counters {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    /// Fills a full-size port range with flows of pseudo-random hashes until
    /// the first allocation fails. With 32 independent probes the first
    /// failure is expected near 80% (where the chances 0.8^32 summed over the
    /// allocations reach one); linear probing failed near 55%.
    #[test]
    fn nat_probing_fills_most_of_a_large_range() {
        let (min, max) = (1024u16, 65535u16);
        let range = usize::from(max - min) + 1;
        let mut taken = vec![false; range];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for used in 0..range {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let hash = (state >> 32) as u32;
            let free = (0..NAT_PORT_PROBES)
                .map(|i| usize::from(nat_probe_port(hash, i, min, max) - min))
                .find(|&p| !taken[p]);
            match free {
                Some(p) => taken[p] = true,
                None => {
                    assert!(
                        used * 4 >= range * 3,
                        "allocation failed with {used} of {range} ports taken"
                    );
                    return;
                }
            }
        }
    }

    #[test]
    fn nat_probes_are_distinct_for_every_stride_and_range() {
        // The stride depends on the hash only through its selector (five
        // bits) and the skip over primes dividing the range: hashes that
        // hit each selector with each offset class cover every stride.
        let mut hashes: Vec<u32> = Vec::new();
        let mut h: u32 = 1;
        while hashes.len() < 1024 {
            h = h.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            hashes.push(h);
        }
        let selectors: std::collections::BTreeSet<u32> = hashes
            .iter()
            .map(|h| h.wrapping_mul(0x9E37_79B1) >> 27)
            .collect();
        assert_eq!(selectors.len(), 32, "the hashes reach every stride");
        let mut ranges: Vec<u32> = (2..=400).collect();
        // Ranges made of the table's own primes, odd and even.
        ranges.extend([
            37 * 101,
            37 * 101 * 2,
            401 * 101,
            37 * 41 * 43,
            65_536,
            65_535,
        ]);
        for range in ranges {
            let min = (65_536 - range).min(1024) as u16;
            let max = (min as u32 + range - 1) as u16;
            let probes = NAT_PORT_PROBES.min(range);
            for &hash in &hashes {
                let mut seen = std::collections::BTreeSet::new();
                for i in 0..probes {
                    let port = nat_probe_port(hash, i, min, max);
                    assert!((min..=max).contains(&port));
                    seen.insert(port);
                }
                assert_eq!(
                    seen.len() as u32,
                    probes,
                    "range {range}, hash {hash:#x}: stride {}",
                    nat_probe_stride(hash, range)
                );
            }
        }
    }

    #[test]
    fn nat_probing_finds_the_last_free_port_of_a_small_range() {
        for range in 1..=NAT_PORT_PROBES as u16 {
            for hash in [0, 1, 0xdead_beef, u32::MAX] {
                for free in 0..range {
                    let found = (0..NAT_PORT_PROBES)
                        .any(|i| nat_probe_port(hash, i, 2000, 2000 + range - 1) == 2000 + free);
                    assert!(
                        found,
                        "range {range}, hash {hash:#x}: port {free} never probed"
                    );
                }
            }
        }
    }

    #[test]
    fn drop_reason_names_are_unique_snake_case() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            assert_eq!(DropReason::from_index(i as u32), Some(*r));
            assert!(
                r.name()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            );
            for other in &DropReason::ALL[..i] {
                assert_ne!(other.name(), r.name());
            }
        }
        assert_eq!(DropReason::from_index(DropReason::COUNT), None);
    }

    #[test]
    fn expiry_rule() {
        let t = Timeouts::default();
        let slack = LAST_SEEN_SLACK_NS;
        let mut v = CtFwdValue {
            proto: IPPROTO_UDP,
            last_seen_ns: 1000,
            ..Default::default()
        };
        assert!(!flow_expired(&v, 1000 + t.udp_ns + slack, &t));
        assert!(flow_expired(&v, 1001 + t.udp_ns + slack, &t));
        // Refreshed by another CPU after `now` was read.
        assert!(!flow_expired(&v, 999, &t));
        v.proto = IPPROTO_TCP;
        v.tcp_state = tcp_state::SYN_SENT;
        assert!(flow_expired(&v, 1001 + t.tcp_transitory_ns + slack, &t));
        v.tcp_state = tcp_state::ESTABLISHED;
        assert!(!flow_expired(&v, 1001 + t.tcp_transitory_ns + slack, &t));
        assert_eq!(t.tcp_established_ns, 7440 * 1_000_000_000);
    }

    #[test]
    fn last_seen_is_written_once_per_tick_and_never_backwards() {
        assert!(!last_seen_moved(1000, 1000 + LAST_SEEN_TICK_NS));
        assert!(last_seen_moved(1000, 1001 + LAST_SEEN_TICK_NS));
        assert!(!last_seen_moved(5 * LAST_SEEN_TICK_NS, 1000));
        // A flow whose last write lags by a whole tick still is not expired
        // by the GC's clock (the slack covers the tick and the coarse clock).
        let t = Timeouts::default();
        let v = CtFwdValue {
            proto: IPPROTO_UDP,
            last_seen_ns: 1000,
            ..Default::default()
        };
        assert!(!flow_expired(&v, 1000 + LAST_SEEN_TICK_NS + t.udp_ns, &t));
    }

    #[test]
    fn flow_hash_depends_on_network() {
        let a = CtFwdKey {
            src_addr_be: v4([192, 0, 2, 1]),
            dst_addr_be: v4([192, 0, 2, 50]),
            network_id: 1,
            src_port_be: 1234u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let b = CtFwdKey { network_id: 2, ..a };
        assert_ne!(flow_hash(&a), flow_hash(&b));
        assert_eq!(flow_hash(&a), flow_hash(&a.clone()));
    }
}
