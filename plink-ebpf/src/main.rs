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

mod arp;
mod bench_fwd;
mod conntrack;
mod consumer;
mod fib;
mod icmp;
mod maps;
mod parse;
mod provider;
mod rewrite;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Consumer-facing interfaces.
#[xdp]
pub fn plink_consumer(ctx: XdpContext) -> u32 {
    let ifindex = count_interface(&ctx);
    consumer::handle(&ctx, ifindex)
}

/// Provider-facing interface.
#[xdp]
pub fn plink_provider(ctx: XdpContext) -> u32 {
    let ifindex = count_interface(&ctx);
    provider::handle(&ctx, ifindex)
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

/// Counts the frame against its ingress interface; returns the ifindex.
#[inline(always)]
fn count_interface(ctx: &XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    let len = (ctx.data_end() - ctx.data()) as u64;
    let ether_type = parse::ether_type(ctx);
    if let Some(stats) = maps::IF_STATS.get_ptr_mut(ifindex) {
        // SAFETY: per-CPU slot: plain adds are race-free.
        let stats = unsafe { &mut *stats };
        stats.packets += 1;
        stats.bytes += len;
        match ether_type {
            Some(parse::ETH_P_IP) => stats.ipv4_packets += 1,
            Some(parse::ETH_P_ARP) => stats.arp_packets += 1,
            _ => {}
        }
    }
    ifindex
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
