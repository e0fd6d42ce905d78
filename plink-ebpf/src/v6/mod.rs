//! IPv6: NAT66, NAT64 (`nat64`) and neighbour discovery. The IPv4 entry points
//! tail-call these programs (`V6_PROGS`) for EtherType 0x86dd, so each has
//! its own stack and verifier budget. The interface's frame and byte counts
//! were taken by the IPv4 entry before the tail call; the verdict is counted
//! here (the IPv4 entry's count never runs after a tail call).
mod consumer;
mod icmp;
pub mod nat64;
mod nd;
mod parse;
mod provider;
mod rewrite;

pub use parse::{Flow6, L4_OFF as L4_OFF6};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action,
    },
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
    macros::xdp,
    programs::XdpContext,
};
use plink_common::{Addr, DropReason, role};

use crate::{
    maps::{EP_STATS, IF_STATS, INTERFACES, SCRATCH_V6, SVC_STATS},
    step::Step,
};

/// IPv6 frames of consumer interfaces (tail call from `plink_consumer`).
#[xdp]
pub fn plink_consumer6(ctx: XdpContext) -> u32 {
    let mut verdict = consumer::handle(XdpContext { ctx: ctx.ctx });
    if verdict == consumer::FORWARD {
        verdict = consumer::forward(&ctx);
    } else if verdict == consumer::ERROR {
        verdict = icmp::consumer_error(XdpContext { ctx: ctx.ctx }, scratch_tot_len());
    }
    if verdict == consumer::NAT64 {
        verdict = nat64::forward(XdpContext { ctx: ctx.ctx });
    }
    if verdict == ANSWER {
        verdict = answer(XdpContext { ctx: ctx.ctx }, false);
    }
    if verdict == xdp_action::XDP_DROP && crate::debug::enabled() {
        crate::debug::dropped(0);
    }
    count_verdict(&ctx, verdict)
}

/// IPv6 frames of the provider interface (tail call from `plink_provider`).
#[xdp]
pub fn plink_provider6(ctx: XdpContext) -> u32 {
    let mut verdict = provider::handle(XdpContext { ctx: ctx.ctx });
    if verdict == provider::REPLY {
        verdict = provider::reply(XdpContext { ctx: ctx.ctx });
    } else if verdict == provider::ERROR {
        verdict = icmp::provider_error(XdpContext { ctx: ctx.ctx }, scratch_tot_len());
    }
    if verdict == ANSWER {
        verdict = answer(XdpContext { ctx: ctx.ctx }, true);
    }
    if verdict == xdp_action::XDP_DROP && crate::debug::enabled() {
        crate::debug::dropped(1);
    }
    count_verdict(&ctx, verdict)
}

/// ICMP errors from the provider side about NAT64 flows' packets (tail
/// call from `plink_provider`, which parsed the frame and found the flow):
/// translated to ICMPv6 for the client (`nat64::provider_error`).
#[xdp]
pub fn plink_nat64_error(ctx: XdpContext) -> u32 {
    let tot_len =
        crate::parse::load::<[u8; 2]>(&ctx, crate::parse::IP_OFF + 2).map_or(0, u16::from_be_bytes);
    let verdict = nat64::provider_error(XdpContext { ctx: ctx.ctx }, tot_len as u32);
    if verdict == xdp_action::XDP_DROP && crate::debug::enabled() {
        crate::debug::dropped(1);
    }
    count_verdict(&ctx, verdict)
}

/// The IPv6 length of the packet `handle` parsed into this CPU's scratch
/// slot.
#[inline(always)]
fn scratch_tot_len() -> u32 {
    // SAFETY: this CPU's scratch slot, written by `handle`.
    SCRATCH_V6
        .get_ptr(0)
        .map_or(0, |w| unsafe { (*w).f.tot_len } as u32)
}

/// A verdict of the steps: answer the packet (parsed into `SCRATCH_V6`)
/// with the ICMPv6 error the scratch slot names. Sent from the top, so the
/// error builder does not stack on the flow path's frames.
pub const ANSWER: u32 = u32::MAX - 1;

/// Sends the error the scratch slot describes; on the provider side a
/// Packet Too Big to a backend counts as `frag_needed_to_backend`.
#[inline(always)]
fn answer(ctx: XdpContext, provider_side: bool) -> u32 {
    let Some(w) = SCRATCH_V6.get_ptr(0) else {
        return crate::stats::drop(DropReason::Malformed, crate::stats::NO_EP);
    };
    // SAFETY: this CPU's scratch slot, written by the steps before.
    let (ty, mtu, tot_len, ep, svc) = unsafe {
        let w = &*w;
        (
            w.err_type,
            w.err_mtu,
            w.f.tot_len as u32,
            w.endpoint_id,
            w.service_id,
        )
    };
    let verdict = icmp::answer_error(ctx, ty, mtu, tot_len, ep);
    if provider_side && ty == icmp::PACKET_TOO_BIG && verdict != xdp_action::XDP_DROP {
        for c in [SVC_STATS.get_ptr_mut(svc), EP_STATS.get_ptr_mut(ep)]
            .into_iter()
            .flatten()
        {
            // SAFETY: per-CPU slot, no other writer on this CPU.
            unsafe { (*c).frag_needed_to_backend += 1 };
        }
    }
    verdict
}

/// Counts the verdict against the ingress interface (its frame was counted
/// by the IPv4 entry, which only tail-calls for registered interfaces).
#[inline(always)]
fn count_verdict(ctx: &XdpContext, verdict: u32) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    if let Some(s) = IF_STATS.get_ptr_mut(&ifindex) {
        // SAFETY: per-CPU slot: plain adds are race-free.
        let s = unsafe { &mut *s };
        if let Some(c) = s.verdicts.get_mut(verdict as usize) {
            *c += 1;
        }
    }
    verdict
}

const AF_INET6: u8 = 10;

/// An IPv6 route query (`forward::NextHop` for IPv6).
pub struct NextHop6 {
    pub src: Addr,
    pub dst: Addr,
    pub tot_len: u16,
    pub provider_ifindex: u32,
    /// Out: egress ifindex and link-layer addresses.
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Out: the egress MTU (on success and on `FragNeeded`).
    pub mtu: u16,
}

/// `forward::route` for IPv6: the route from `hop.src` to `hop.dst` as if
/// the packet arrived on the provider interface; the egress must be a
/// provider interface and the neighbour resolved.
#[inline(never)]
pub fn route6(ctx: &XdpContext, hop: &mut NextHop6) -> Step {
    match lookup6(ctx, hop) {
        Ok(()) => Step::NEXT,
        Err(r) => Step::drop(r),
    }
}

#[inline(always)]
fn lookup6(ctx: &XdpContext, out: &mut NextHop6) -> Result<(), DropReason> {
    // SAFETY: plain C struct, all-zero is a valid value.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.__bindgen_anon_1.tot_len = out.tot_len;
    p.ifindex = out.provider_ifindex;
    p.__bindgen_anon_3.ipv6_src = out.src;
    p.__bindgen_anon_4.ipv6_dst = out.dst;
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
