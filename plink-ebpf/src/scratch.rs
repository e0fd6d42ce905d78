//! The per-CPU scratch areas of the slow paths (one per use, each in its own
//! per-CPU map in `maps.rs`): working sets too large for the 512-byte BPF
//! stack. XDP runs to completion on its CPU, so a slot is this packet's.
use plink_common::{CtFwdKey, CtFwdValue, CtOwner, CtRevKey, FlowLogRecord, NatPortKey};

/// A new flow's three entries as they are built and inserted
/// (`conntrack::new_flow`); `conntrack::release` reads them back.
#[repr(C)]
pub struct NewFlow {
    pub v: CtFwdValue,
    pub owner: CtOwner,
    pub rev: CtRevKey,
    pub port: NatPortKey,
}

/// The keys of a flow the datapath removes itself (an endpoint's changed
/// flow, an expired NAT port owner).
#[repr(C)]
pub struct Victim {
    pub rev: CtRevKey,
    pub port: NatPortKey,
    /// Non-zero: `record` is the end record of a logged flow removed deep
    /// in the new-flow call chain (no stack left there for the ring
    /// buffer), written out by `flowlog::flush_victim` at the top.
    pub pending: u32,
    /// Non-zero: `record` was written for a flow about to be removed; it
    /// becomes pending once the removal succeeded.
    pub stashed: u32,
    pub record: FlowLogRecord,
}

/// An IPv6 consumer packet as parsed, and its forward key (`v6::consumer`):
/// kept off the stack the new-flow call chain needs.
#[repr(C)]
pub struct Work6 {
    pub f: crate::v6::Flow6,
    pub key: CtFwdKey,
    /// The clock the packet's flow was opened at.
    pub now: u64,
    /// `v6::consumer::Opened` as u8.
    pub opened: u8,
    pub _pad: [u8; 3],
    pub endpoint_id: u32,
    /// An ICMPv6 error to answer the packet with (`v6::icmp`): its type
    /// and MTU field, and the flow's service (provider side, for counting).
    pub err_type: u32,
    pub err_mtu: u32,
    pub service_id: u32,
}

/// ICMP error translation: the quoted packet's conntrack keys, and where a
/// consumer-side error is routed to.
#[repr(C)]
pub struct IcmpWork {
    pub rev: CtRevKey,
    pub fwd: CtFwdKey,
    /// Out (consumer-side errors): the flow's NAT address and backend, the
    /// outer source and destination of the translated error.
    pub nat_be: u32,
    pub backend_be: u32,
    pub endpoint_id: u32,
}
