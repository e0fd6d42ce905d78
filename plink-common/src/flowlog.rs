//! Flow-log records: what the datapath writes into the `FLOW_LOG` ring
//! buffer when a logged flow opens or when it removes one itself, and what
//! the controller produces from the flows its GC and purges remove.
use super::*;

/// [`FlowLogRecord::kind`].
pub mod flow_log_kind {
    pub const START: u8 = 1;
    pub const END: u8 = 2;
}

/// [`FlowLogRecord::reason`] of an end record.
pub mod flow_end_reason {
    /// Idle longer than its timeout (removed by the GC or the datapath).
    pub const EXPIRED: u8 = 1;
    /// Removed by the controller before it expired (endpoint rejected,
    /// removed or re-pointed, backend removed, adoption).
    pub const PURGED: u8 = 2;
    /// Expired after a FIN or RST was seen (TCP closing state).
    pub const CLOSED: u8 = 3;
    /// Left by an endpoint that changed, removed by the datapath.
    pub const EVICTED: u8 = 4;
}

/// One record of the `FLOW_LOG` ring buffer (written in place with
/// reserve / submit). Times are `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowLogRecord {
    /// [`flow_log_kind`] constant.
    pub kind: u8,
    pub proto: u8,
    /// [`flow_end_reason`] constant (end records), 0 for starts.
    pub reason: u8,
    /// [`tcp_state`] constant when the record was written.
    pub tcp_state: u8,
    pub network_id: u32,
    pub client_addr_be: Addr,
    pub endpoint_addr_be: Addr,
    pub nat_addr_be: Addr,
    pub backend_addr_be: Addr,
    pub client_port_be: u16,
    pub endpoint_port_be: u16,
    pub nat_port_be: u16,
    pub backend_port_be: u16,
    pub endpoint_id: u32,
    pub service_id: u32,
    /// When the flow opened (start) or when it was removed (end).
    pub time_ns: u64,
    /// The flow's last packet (end records; the start's `time_ns` otherwise).
    pub last_seen_ns: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
}
const _: () = assert!(core::mem::size_of::<FlowLogRecord>() == 136);

/// Is the flow with `hash` logged under a service sampling one in `sample`
/// flows (0 = off)? Deterministic per flow, so a flow gets both records.
#[inline(always)]
pub fn flow_log_sampled(hash: u32, sample: u16) -> bool {
    sample != 0 && hash.is_multiple_of(u32::from(sample))
}

/// Default size of the `FLOW_LOG` ring in bytes (a power of two).
pub const DEFAULT_FLOW_LOG_RING_BYTES: u32 = 1 << 20;
