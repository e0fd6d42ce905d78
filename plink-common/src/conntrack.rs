//! Conntrack entries (forward, reverse, NAT port) and the one expiry rule.
use super::*;

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
    /// The protocol of the reverse entry and NAT port: the key's, except
    /// for a NAT64 echo flow (ICMP, 1, where the key has ICMPv6).
    pub proto: u8,
    /// [`flow_flags`] bits (0 before flow logs existed).
    pub flags: u8,
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
    /// PROXY protocol: the header's length (`ProxyHeader::len`) inserted in
    /// front of the client's first byte; 0 = no header for this flow.
    pub pp_len: u8,
    /// PROXY protocol: [`proxy::pp_flags`] bits.
    pub pp_flags: u8,
    /// PROXY protocol: sequence number (host order) of the client's first
    /// byte (its SYN's + 1); later client bytes are `pp_len` higher at the
    /// backend, the backend's acknowledgements `pp_len` lower at the client.
    pub pp_first_seq: u32,
    /// Per-flow counters, kept only for flows with [`flow_flags::LOGGED`]
    /// (their end record carries them; other flows never touch them).
    /// `in` = consumer → service, `out` = service → consumer; IP lengths.
    pub log_packets_in: u64,
    pub log_bytes_in: u64,
    pub log_packets_out: u64,
    pub log_bytes_out: u64,
}
const _: () = assert!(core::mem::size_of::<CtFwdValue>() == 144);

/// Bits of [`CtFwdValue::flags`].
pub mod flow_flags {
    /// The flow is flow-logged (its service samples flow logs and the flow
    /// hash picked it): start and end records, per-flow counters.
    pub const LOGGED: u8 = 1;
    /// A stateful NAT64 flow (RFC 6146 style): an IPv6 consumer key in
    /// front of an IPv4 backend and NAT address. The reverse entry and NAT
    /// port are IPv4 ones (an echo flow's protocol is ICMP, 1, in the value,
    /// ICMPv6 in the key), and replies are translated back to IPv6.
    pub const NAT64: u8 = 2;
}

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
