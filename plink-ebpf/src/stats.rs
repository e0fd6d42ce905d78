//! Per-CPU counters and drop accounting.
use aya_ebpf::bindings::xdp_action;
use plink_common::{Counters, CtFwdValue, DropReason, MAX_NAT_SLOTS};

use crate::maps::{BACKEND_STATS, DROPS, EP_DROPS, EP_STATS, NAT_STATS, SVC_STATS};

/// Endpoint id meaning "no endpoint matched".
pub const NO_EP: u32 = u32::MAX;

/// Counts the drop and returns XDP_DROP.
#[inline(always)]
pub fn drop(reason: DropReason, endpoint_id: u32) -> u32 {
    count_drop(reason as u32, endpoint_id);
    xdp_action::XDP_DROP
}

// Out of line: every drop site shares one copy.
#[inline(never)]
fn count_drop(reason: u32, endpoint_id: u32) {
    crate::debug::note_drop(reason, endpoint_id);
    if let Some(c) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        unsafe { *c += 1 };
    }
    if endpoint_id != NO_EP {
        let idx = endpoint_id
            .wrapping_mul(DropReason::COUNT)
            .wrapping_add(reason);
        if let Some(c) = EP_DROPS.get_ptr_mut(idx) {
            // SAFETY: as above.
            unsafe { *c += 1 };
        }
    }
}

#[inline(always)]
fn bump(c: *mut Counters, f: impl FnOnce(&mut Counters)) {
    // SAFETY: per-CPU map value, no other writer on this CPU.
    f(unsafe { &mut *c })
}

/// Counts one forwarded packet of `bytes` (IP length) against the flow's
/// endpoint, backend and NAT address, in direction in or out. The service's
/// packets and bytes are the sum of its NAT addresses' (summed in userspace):
/// one counter less to touch per packet.
#[inline(always)]
pub fn count_packet(v: &CtFwdValue, bytes: u64, out: bool) {
    let nat_idx = v
        .service_id
        .wrapping_mul(MAX_NAT_SLOTS as u32)
        .wrapping_add(v.nat_slot as u32);
    let add = |c: &mut Counters| {
        if out {
            c.packets_out += 1;
            c.bytes_out += bytes;
        } else {
            c.packets_in += 1;
            c.bytes_in += bytes;
        }
    };
    if let Some(c) = EP_STATS.get_ptr_mut(v.endpoint_id) {
        bump(c, add);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(v.backend_id) {
        bump(c, add);
    }
    if let Some(c) = NAT_STATS.get_ptr_mut(nat_idx) {
        bump(c, add);
    }
}

/// Counts a flow created for the flow's endpoint, service, backend and NAT address.
#[inline(never)]
pub fn count_flow_created(v: &CtFwdValue) {
    let nat_idx = v
        .service_id
        .wrapping_mul(MAX_NAT_SLOTS as u32)
        .wrapping_add(v.nat_slot as u32);
    if let Some(c) = EP_STATS.get_ptr_mut(v.endpoint_id) {
        bump(c, |c| c.flows_created += 1);
    }
    if let Some(c) = SVC_STATS.get_ptr_mut(v.service_id) {
        bump(c, |c| c.flows_created += 1);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(v.backend_id) {
        bump(c, |c| c.flows_created += 1);
    }
    if let Some(c) = NAT_STATS.get_ptr_mut(nat_idx) {
        bump(c, |c| c.flows_created += 1);
    }
}

/// Counts a refused new flow against the endpoint (and service for NAT failures).
#[inline(always)]
pub fn count_refusal(endpoint_id: u32, service_id: u32, reason: DropReason) {
    if let Some(c) = EP_STATS.get_ptr_mut(endpoint_id) {
        bump(c, |c| match reason {
            DropReason::CapMaxFlows => c.refused_max_flows += 1,
            DropReason::CapNewFlowRate => c.refused_rate += 1,
            _ => c.nat_alloc_failures += 1,
        });
    }
    if reason == DropReason::NatPortsExhausted
        && let Some(c) = SVC_STATS.get_ptr_mut(service_id)
    {
        bump(c, |c| c.nat_alloc_failures += 1);
    }
}
