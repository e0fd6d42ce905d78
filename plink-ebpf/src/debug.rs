//! The datapath's debug messages (aya-log), off unless the controller sets
//! `DEBUG[0]` (`plink-ctl debug on`). Checked off the established fast
//! path only: when a packet was dropped (the reason `count_drop` noted) and
//! when a flow opened.
use aya_log_ebpf::debug;
use plink_common::CtFwdValue;

use crate::maps::{DEBUG, DEBUG_LAST_DROP};

/// Is debug logging switched on? (An array lookup the verifier inlines.)
#[inline(always)]
pub fn enabled() -> bool {
    DEBUG.get(0).is_some_and(|v| *v != 0)
}

/// Notes the reason of this packet's drop for [`dropped`] (debug on only).
#[inline(always)]
pub fn note_drop(reason: u32, endpoint_id: u32) {
    if enabled()
        && let Some(s) = DEBUG_LAST_DROP.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, this packet's.
        unsafe { *s = [reason, endpoint_id] };
    }
}

/// A dropped packet of `program` (0 consumer, 1 provider): the reason and
/// endpoint `note_drop` recorded. (Not the interface: keeping it for this
/// call would take a stack slot from the new-flow chain.)
// Out of line, called from the programs' top level only: the message
// building takes stack the deeper chains do not have.
#[inline(never)]
pub fn dropped(program: u32) {
    let Some(s) = DEBUG_LAST_DROP.get_ptr(0) else {
        return;
    };
    // SAFETY: per-CPU slot.
    let [reason, endpoint_id] = unsafe { *s };
    debug!(
        &(),
        "drop: program {} reason {} endpoint {}", program, reason, endpoint_id
    );
}

/// A flow opened: its endpoint, service, backend and NAT mapping.
#[inline(never)]
pub fn opened(v: *const CtFwdValue) {
    // SAFETY: map value pointer of this packet's flow.
    let v = unsafe { &*v };
    debug!(
        &(),
        "flow opened: endpoint {} service {} backend {} nat {:i}:{} logged {}",
        v.endpoint_id,
        v.service_id,
        v.backend_id,
        u32::from_be(v.nat_addr_be[0]),
        u16::from_be(v.nat_port_be),
        v.flags
    );
}
