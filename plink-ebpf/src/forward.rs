//! Forwarding: the route lookup for consumer → service packets (constrained
//! to the provider side), the MTU check of the reverse path, and the one
//! redirect every forwarded or answered frame leaves by.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action,
    },
    helpers::generated::{bpf_check_mtu, bpf_fib_lookup as fib_lookup_helper, bpf_redirect},
    programs::XdpContext,
};
use plink_common::{DropReason, role};

use crate::{maps::INTERFACES, stats, step::Step};

/// Redirects the frame to `ifindex`; a refused redirect is a drop counted
/// against `endpoint_id` (or `NO_EP`).
#[inline(always)]
pub fn redirect(ifindex: u32, endpoint_id: u32) -> u32 {
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
    if action != xdp_action::XDP_REDIRECT {
        return stats::drop(DropReason::RedirectFailed, endpoint_id);
    }
    action
}

const AF_INET: u8 = 2;

/// A route query and, on success, where to send the rewritten packet.
pub struct NextHop {
    pub src_be: u32,
    pub dst_be: u32,
    pub tot_len: u16,
    pub provider_ifindex: u32,
    /// Out: egress ifindex and link-layer addresses.
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Out: the egress MTU (on success and on `FragNeeded`).
    pub mtu: u16,
}

/// Looks up the route from `src_be` to `dst_be` as if the packet arrived on
/// `provider_ifindex`; the egress must be a provider interface and the
/// neighbour resolved (the controller keeps backends' neighbours managed).
/// `NEXT` with the hop filled in, or the drop (`FragNeeded` with `hop.mtu`).
#[inline(never)]
pub fn route(ctx: &XdpContext, hop: &mut NextHop) -> Step {
    match lookup_inner(ctx, hop) {
        Ok(()) => Step::NEXT,
        Err(r) => Step::drop(r),
    }
}

#[inline(always)]
fn lookup_inner(ctx: &XdpContext, out: &mut NextHop) -> Result<(), DropReason> {
    // SAFETY: plain C struct, all-zero is a valid value.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.__bindgen_anon_1.tot_len = out.tot_len;
    p.ifindex = out.provider_ifindex;
    p.__bindgen_anon_3.ipv4_src = out.src_be;
    p.__bindgen_anon_4.ipv4_dst = out.dst_be;
    // SAFETY: p is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.ctx.cast(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(DropReason::FibNoNeigh),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: on FRAG_NEEDED the kernel wrote mtu_result over tot_len.
            out.mtu = unsafe { p.__bindgen_anon_1.mtu_result };
            return Err(DropReason::FragNeeded);
        }
        BPF_FIB_LKUP_RET_FWD_DISABLED => return Err(DropReason::FibForwardingDisabled),
        _ => return Err(DropReason::FibFailed),
    }
    // The route usually leaves where it was looked up from: no map lookup
    // needed to know that egress is a provider interface.
    if p.ifindex != out.provider_ifindex {
        // SAFETY: map value, read only.
        match unsafe { INTERFACES.get(&p.ifindex) } {
            Some(i) if i.role == role::PROVIDER => {}
            _ => return Err(DropReason::FibNotProvider),
        }
    }
    out.ifindex = p.ifindex;
    // SAFETY: on success the kernel wrote the route's MTU over tot_len.
    out.mtu = unsafe { p.__bindgen_anon_1.mtu_result };
    out.smac = p.smac;
    out.dmac = p.dmac;
    Ok(())
}

/// Does the frame fit the MTU of `ifindex`? The reverse path redirects
/// without a route lookup; an oversized frame would be dropped by the driver
/// after XDP returned, invisibly, so it is checked and counted here.
#[inline(always)]
pub fn fits_mtu(ctx: &XdpContext, ifindex: u32) -> bool {
    let mut mtu_len: u32 = 0;
    // SAFETY: valid ctx and out pointer; 0 = check the frame as it is.
    let rc = unsafe { bpf_check_mtu(ctx.ctx.cast(), ifindex, &mut mtu_len, 0, 0) };
    rc == 0
}
