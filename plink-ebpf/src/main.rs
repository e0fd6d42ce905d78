//! plink's XDP programs: one entry point per interface role.
//!
//! The entry points stay thin and call named steps, as in Katran; maps live in
//! `maps.rs`, one module per concern. Slow paths (new flow, ARP, drop
//! accounting, FIB) are out-of-line BPF functions so the verifier checks each
//! once.
#![no_std]
#![no_main]
// The BPF target has no AtomicU64::fetch_add; the intrinsic lowers to BPF_ATOMIC add.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Passing a map key or value by value copies it onto the 512-byte stack;
// references keep the scratch-map structs where they are.
#![allow(clippy::needless_borrows_for_generic_args)]

mod answer;
mod arp;
mod bench_fwd;
mod conntrack;
mod consumer;
mod debug;
mod endpoint;
mod flowlog;
mod forward;
mod icmp;
mod lb;
mod limits;
mod maps;
mod mss;
mod nat;
mod parse;
mod pmtu;
mod provider;
mod proxy;
mod rewrite;
mod scratch;
mod stats;
mod step;
mod v6;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use plink_common::IfStats;

/// Consumer-facing interfaces.
#[xdp]
pub fn plink_consumer(ctx: XdpContext) -> u32 {
    let Some((ifindex, stats)) = count_interface(&ctx) else {
        return stats::drop(plink_common::DropReason::UnknownInterface, stats::NO_EP);
    };
    let verdict = consumer::handle(&ctx, ifindex);
    if verdict == xdp_action::XDP_DROP && debug::enabled() {
        debug::dropped(0);
    }
    count_verdict(stats, verdict)
}

/// Provider-facing interface.
#[xdp]
pub fn plink_provider(ctx: XdpContext) -> u32 {
    let Some((ifindex, stats)) = count_interface(&ctx) else {
        // Not an interface plink was told about: the kernel's.
        return xdp_action::XDP_PASS;
    };
    let verdict = provider::handle(&ctx, ifindex);
    if verdict == xdp_action::XDP_DROP && debug::enabled() {
        debug::dropped(1);
    }
    count_verdict(stats, verdict)
}

/// Passes every frame. Attached to the far end of a veth pair, it turns on
/// NAPI there, without which frames that XDP redirects or transmits into the
/// pair are dropped (test topologies use it; see the README).
#[xdp]
pub fn plink_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The benchmark reference forwarder (see `bench_fwd.rs`): never loaded or
/// attached by `plink-ctl`, only by `cargo xtask bench`.
#[xdp]
pub fn plink_bench_fwd(ctx: XdpContext) -> u32 {
    bench_fwd::forward(&ctx)
}

/// Counts the frame against its ingress interface; returns the ifindex and
/// the interface's counters, or `None` for an interface plink did not
/// register (its frames are not plink's). The pointer is never null past
/// this point: a maybe-null pointer kept across the handler would double
/// the states the verifier walks.
#[inline(always)]
fn count_interface(ctx: &XdpContext) -> Option<(u32, *mut IfStats)> {
    let ifindex = ctx.ingress_ifindex() as u32;
    let len = (ctx.data_end() - ctx.data()) as u64;
    let ether_type = parse::ether_type(ctx);
    let stats = maps::IF_STATS.get_ptr_mut(ifindex)?;
    // SAFETY: per-CPU slot: plain adds are race-free.
    let s = unsafe { &mut *stats };
    s.packets += 1;
    s.bytes += len;
    match ether_type {
        Some(parse::ETH_P_IP) => s.ipv4_packets += 1,
        Some(parse::ETH_P_ARP) => s.arp_packets += 1,
        Some(parse::ETH_P_IPV6) => s.ipv6_packets += 1,
        _ => {}
    }
    Some((ifindex, stats))
}

/// Counts the verdict against the interface, so that verdicts add up to
/// the frames seen; returns it.
#[inline(always)]
fn count_verdict(stats: *mut IfStats, verdict: u32) -> u32 {
    // SAFETY: the per-CPU slot count_interface returned.
    let s = unsafe { &mut *stats };
    // An unknown verdict stays uncounted: the sum then falls short of
    // `packets`, which the fuzz test checks.
    if let Some(c) = s.verdicts.get_mut(verdict as usize) {
        *c += 1;
    }
    verdict
}

/// `*dst += n` atomically across CPUs (result unused: a plain BPF atomic add).
///
/// # Safety
/// `dst` must point into a map value.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, n: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: per the caller.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, n) };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
