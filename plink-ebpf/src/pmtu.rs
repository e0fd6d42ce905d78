//! Path MTU on the reverse path. The reply leaves by a redirect without a
//! route lookup, and a frame too big for the consumer interface would be
//! dropped by the driver after XDP returned, invisibly. Instead the backend
//! gets fragmentation needed (RFC 1191) with the consumer interface's MTU,
//! from the NAT address it sent to: it lowers its path MTU for that address
//! and resends smaller segments, as it would behind any router.
use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_check_mtu, programs::XdpContext};
use plink_common::DropReason;

use crate::{
    icmp,
    maps::{EP_STATS, SVC_STATS},
    stats::drop,
};

/// `bpf_check_mtu`'s answer for a frame larger than the device's MTU.
const BPF_MTU_CHK_RET_FRAG_NEEDED: i64 = 1;

/// If the frame in `ctx`, grown by `growth` bytes on the way (NAT64), does
/// not fit the MTU of the flow's consumer interface `ifindex`, answers it
/// (or counts its drop) and returns the XDP action; `None` when it fits.
#[inline(always)]
pub fn reply_too_big(
    ctx: &XdpContext,
    ifindex: u32,
    service_id: u32,
    endpoint_id: u32,
    growth: u32,
) -> Option<u32> {
    let mut mtu: u32 = 0;
    // SAFETY: valid ctx and out pointer; the frame as it will leave. The
    // helper writes the device's MTU into `mtu` whatever the outcome.
    let rc = unsafe { bpf_check_mtu(ctx.ctx.cast(), ifindex, &mut mtu, growth as i32, 0) };
    if rc == 0 {
        return None;
    }
    // The backend's packets may be this big (before they grow).
    let mtu = mtu.saturating_sub(growth);
    if rc != BPF_MTU_CHK_RET_FRAG_NEEDED || mtu == 0 {
        // The interface is gone: nothing to tell the backend.
        return Some(drop(DropReason::FragNeeded, endpoint_id));
    }
    // From the reply's destination (the NAT address) to its source (the
    // backend), quoting the reply as the backend sent it; without DF it is
    // a counted drop (XDP cannot fragment).
    let action = icmp::reply_error(
        XdpContext { ctx: ctx.ctx },
        icmp::FRAG_NEEDED,
        mtu,
        endpoint_id,
    );
    if action != xdp_action::XDP_DROP {
        for c in [
            SVC_STATS.get_ptr_mut(service_id),
            EP_STATS.get_ptr_mut(endpoint_id),
        ]
        .into_iter()
        .flatten()
        {
            // SAFETY: per-CPU slot, no other writer on this CPU.
            unsafe { (*c).frag_needed_to_backend += 1 };
        }
    }
    Some(action)
}
