//! Per-endpoint caps on new flows: live flows and new flows per second.
use plink_common::{DropReason, EndpointValue};

use crate::maps::{EP_GC_FREED, EP_LIMITS};

/// Per-endpoint caps: live flows and new flows per second.
#[inline(always)]
pub fn admit(ep: &EndpointValue, now: u64) -> Result<(), DropReason> {
    if ep.max_flows == 0 && ep.new_flows_per_sec == 0 {
        return Ok(());
    }
    let Some(l) = EP_LIMITS.get_ptr_mut(ep.endpoint_id) else {
        return Ok(());
    };
    if ep.max_flows != 0 {
        let freed = EP_GC_FREED.get(ep.endpoint_id).copied().unwrap_or(0);
        // SAFETY: map value pointer; a torn read only makes the cap approximate.
        let (created, reclaimed) = unsafe { ((*l).flows_created, (*l).flows_reclaimed) };
        if created.wrapping_sub(freed).wrapping_sub(reclaimed) >= ep.max_flows as u64 {
            return Err(DropReason::CapMaxFlows);
        }
    }
    if ep.new_flows_per_sec != 0 {
        let sec = now / 1_000_000_000;
        // SAFETY: map value pointer. Two CPUs may both reset a new window;
        // that admits at most a few extra flows at the boundary.
        unsafe {
            if (*l).window_sec != sec {
                (*l).window_sec = sec;
                (*l).window_count = 0;
            }
            if (*l).window_count >= ep.new_flows_per_sec as u64 {
                return Err(DropReason::CapNewFlowRate);
            }
            crate::atomic_add(&raw mut (*l).window_count, 1);
        }
    }
    Ok(())
}
