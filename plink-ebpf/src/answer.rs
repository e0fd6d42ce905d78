//! Sending frames plink answers itself (ARP replies, ICMP errors) back out of
//! the interface they came in on.
//!
//! XDP_TX is the cheap way, but on veth it is delivered only when the peer
//! runs an XDP program: the driver's XDP_TX flush wakes the peer's NAPI only
//! then, so with GRO-only NAPI on the peer the answer sits in the queue until
//! some unrelated redirect flushes it (a first ARP or ping stalls). A
//! redirect to the ingress interface goes through `ndo_xdp_xmit`, which wakes
//! the peer whenever it has NAPI. The controller sets the flag per interface
//! from its driver; everything else keeps XDP_TX.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use plink_common::iface_flags;

use crate::{forward, maps::INTERFACES};

/// Sends the frame, rewritten in place, back out of its ingress interface
/// whose [`iface_flags`] are `flags`.
#[inline(always)]
pub fn back_out(ctx: &XdpContext, flags: u8, endpoint_id: u32) -> u32 {
    if flags & iface_flags::ANSWER_BY_REDIRECT == 0 {
        return xdp_action::XDP_TX;
    }
    forward::redirect(ctx.ingress_ifindex() as u32, endpoint_id)
}

/// The [`iface_flags`] of the ingress interface (0 when unknown).
#[inline(always)]
pub fn ingress_flags(ctx: &XdpContext) -> u8 {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: map value, read only.
    unsafe { INTERFACES.get(&ifindex) }.map_or(0, |i| i.flags)
}
