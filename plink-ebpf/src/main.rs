//! plink's XDP programs: one entry point per interface role.
//!
//! The entry points stay thin and call named steps, as in Katran; maps live in
//! `maps.rs`, one module per concern.
#![no_std]
#![no_main]

mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Consumer-facing interfaces.
#[xdp]
pub fn plink_consumer(ctx: XdpContext) -> u32 {
    count_interface(&ctx);
    xdp_action::XDP_PASS
}

/// Provider-facing interface.
#[xdp]
pub fn plink_provider(ctx: XdpContext) -> u32 {
    count_interface(&ctx);
    xdp_action::XDP_PASS
}

/// Counts the frame against its ingress interface.
#[inline(always)]
fn count_interface(ctx: &XdpContext) {
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let len = (ctx.data_end() - ctx.data()) as u64;
    let kind = parse::ether_kind(ctx);
    if let Some(stats) = maps::IF_STATS.get_ptr_mut(ifindex) {
        // Per-CPU slot: plain adds are race-free.
        let stats = unsafe { &mut *stats };
        stats.packets += 1;
        stats.bytes += len;
        match kind {
            parse::EtherKind::Ipv4 => stats.ipv4_packets += 1,
            parse::EtherKind::Arp => stats.arp_packets += 1,
            parse::EtherKind::Other => {}
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
