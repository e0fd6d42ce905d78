//! Per-endpoint caps on new flows: live flows and new flows per second.
use plink_common::{CtFwdKey, DropReason, EP_RECENT_FLOWS, EndpointValue, flow_expired};

use crate::{
    conntrack,
    maps::{CT_FWD, EP_GC_FREED, EP_LIMITS, EP_RECENT, GLOBAL},
};

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
        if created.wrapping_sub(freed).wrapping_sub(reclaimed) >= ep.max_flows as u64
            && !reclaim_recent(ep.endpoint_id, now)
        {
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

/// Entries of the endpoint's ring a refused new flow checks.
const RECLAIM_CHECKS: u32 = 1;

/// The endpoint is at its max-flows cap: reclaims an expired flow of it from
/// its ring of recent flows (the next `RECLAIM_CHECKS` entries from its
/// cursor), crediting the cap slot. Without a controller's GC an endpoint's
/// expired flows would hold its cap forever; with this, an endpoint that
/// opens short connections keeps opening them (at least the last
/// `EP_RECENT_FLOWS` flows recycle). Returns whether a slot was freed.
// Out of line: the refusal path only, kept off the new-flow walk.
#[inline(never)]
fn reclaim_recent(endpoint_id: u32, now: u64) -> bool {
    let (Some(l), Some(g)) = (EP_LIMITS.get_ptr_mut(endpoint_id), GLOBAL.get(0)) else {
        return false;
    };
    for _ in 0..RECLAIM_CHECKS {
        // SAFETY: shared by all CPUs, hence the atomic add; the value read
        // before it may be stale, which only moves the cursor on.
        let cursor = unsafe { (*l).recent_cursor };
        unsafe { crate::atomic_add(&raw mut (*l).recent_cursor, 1) };
        let idx = endpoint_id
            .wrapping_mul(EP_RECENT_FLOWS)
            .wrapping_add(cursor as u32 % EP_RECENT_FLOWS);
        let Some(key) = EP_RECENT.get_ptr(idx) else {
            continue;
        };
        // SAFETY: map value pointer, read only, used as the lookup key.
        let key: &CtFwdKey = unsafe { &*key };
        let Some(v) = CT_FWD.get_ptr(key) else {
            continue;
        };
        // SAFETY: map value pointer, read only.
        let v = unsafe { &*v };
        if v.endpoint_id == endpoint_id && flow_expired(v, now, &g.timeouts) {
            // Credits the endpoint's slot (or another CPU or the GC did).
            conntrack::evict(key, v, crate::flowlog::end_reason(v));
            return true;
        }
    }
    false
}

/// Remembers the flow `key` just created for `endpoint_id` in its ring.
#[inline(always)]
pub fn remember(endpoint_id: u32, created: u64, key: &CtFwdKey) {
    let idx = endpoint_id
        .wrapping_mul(EP_RECENT_FLOWS)
        .wrapping_add(created as u32 % EP_RECENT_FLOWS);
    let _ = EP_RECENT.set(idx, key, 0);
}
