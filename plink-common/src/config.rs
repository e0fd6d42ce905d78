//! What the controller writes for the datapath: timeouts, endpoints, NAT
//! addresses, services, backends.
use super::*;

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
    /// Flow logs: 0 = off, N = one flow in N (by flow hash) is logged.
    pub flow_log_sample: u16,
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
/// IPv6 and TCP headers without options or extension headers.
pub const TCP_IPV6_HEADERS: u16 = 60;

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
