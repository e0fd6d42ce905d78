//! ICMPv6 errors plink sends itself (RFC 4443): Packet Too Big and Time
//! Exceeded, answered to the sender of the offending packet from the
//! address it was sent to, back out of the interface it came in on
//! (`answer::back_out`), as `icmp::reply_error` does for IPv4.
//!
//! The frame is reused in place: trimmed to the quote and grown at the head
//! by the new headers. The quote is as much of the offending packet as fits
//! a minimum-MTU (1280) error.
use aya_ebpf::{
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use plink_common::{Addr, DropReason};

use super::parse::{IP6_LEN, IP6_OFF, IPPROTO_ICMPV6, L4_OFF};
use crate::{
    parse::{load, ptr_at},
    stats::drop,
};

/// ICMPv6 error types plink sends.
pub const PACKET_TOO_BIG: u32 = 2;
pub const TIME_EXCEEDED: u32 = 3;

/// An error must not exceed the minimum IPv6 MTU (RFC 4443 2.4 (c)).
const MIN_MTU: usize = 1280;
const QUOTE_MAX: usize = MIN_MTU - IP6_LEN - 8;
/// Where the quote starts in the error frame.
const QUOTE_OFF: usize = L4_OFF + 8;
const QUOTE_WORDS: usize = QUOTE_MAX / 8;

/// Answers the IPv6 packet in `ctx` (`tot_len` bytes of IPv6 as parsed, at
/// least 48) with ICMPv6 error `ty` (code 0; `mtu` in the Packet Too Big
/// MTU field) from its destination to its source. A frame that cannot be
/// reshaped is a counted drop (`frag_needed` or `ttl_exceeded`).
#[inline(never)]
pub fn answer_error(ctx: XdpContext, ty: u32, mtu: u32, tot_len: u32, endpoint_id: u32) -> u32 {
    let reason = if ty == PACKET_TOO_BIG {
        DropReason::FragNeeded
    } else {
        DropReason::TtlExceeded
    };
    let Some(old) = ptr_at::<[u8; L4_OFF]>(&ctx, 0) else {
        return drop(reason, endpoint_id);
    };
    // SAFETY: inside the checked region.
    let (macs, src, dst) = unsafe {
        let o = old.cast::<u8>();
        (
            o.cast::<[u8; 12]>().read_unaligned(),
            o.add(IP6_OFF + 8).cast::<Addr>().read_unaligned(),
            o.add(IP6_OFF + 24).cast::<Addr>().read_unaligned(),
        )
    };
    let mut quote = tot_len as usize;
    if quote > QUOTE_MAX {
        quote = QUOTE_MAX;
    }
    if quote < IP6_LEN + 8 {
        return drop(reason, endpoint_id);
    }
    let len = ctx.data_end() - ctx.data();
    let keep = IP6_OFF + quote;
    // SAFETY: plain helper calls on this program's context.
    let resized = unsafe {
        (len <= keep || bpf_xdp_adjust_tail(ctx.ctx.cast(), keep as i32 - len as i32) == 0)
            && bpf_xdp_adjust_head(ctx.ctx.cast(), -((QUOTE_OFF - IP6_OFF) as i32)) == 0
    };
    // No check of the new length against `quote`: LLVM would fold the
    // bounds checks below into it, which the verifier cannot follow.
    if !resized {
        return drop(reason, endpoint_id);
    }
    let Some(p) = ptr_at::<[u8; QUOTE_OFF]>(&ctx, 0) else {
        return drop(reason, endpoint_id);
    };
    let plen = ((8 + quote) as u16).to_be_bytes();
    let m = mtu.to_be_bytes();
    let icmp = [ty as u8, 0, 0, 0, m[0], m[1], m[2], m[3]];
    let p = p.cast::<u8>();
    // SAFETY: every offset is inside the checked QUOTE_OFF bytes.
    unsafe {
        // Back to where it came from: the MACs swap.
        p.cast::<[u8; 6]>()
            .write_unaligned([macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]]);
        p.add(6)
            .cast::<[u8; 6]>()
            .write_unaligned([macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]]);
        p.add(12).cast::<[u8; 2]>().write_unaligned([0x86, 0xdd]);
        p.add(IP6_OFF).cast::<[u8; 8]>().write_unaligned([
            0x60,
            0,
            0,
            0,
            plen[0],
            plen[1],
            IPPROTO_ICMPV6,
            64,
        ]);
        p.add(IP6_OFF + 8).cast::<Addr>().write_unaligned(dst);
        p.add(IP6_OFF + 24).cast::<Addr>().write_unaligned(src);
        p.add(L4_OFF).cast::<[u8; 8]>().write_unaligned(icmp);
    }
    // Pseudo-header (RFC 8200 8.1) and the ICMPv6 header, in native-order
    // 16-bit words as the packet holds them; then the quote, 8 bytes at a
    // time (the frame ends exactly where the quote does).
    let w = |a: u8, b: u8| u16::from_ne_bytes([a, b]) as u64;
    let mut sum: u64 = 0;
    for a in [&src, &dst] {
        sum += a
            .iter()
            .map(|x| (x & 0xffff) as u64 + (x >> 16) as u64)
            .sum::<u64>();
    }
    sum += w(plen[0], plen[1]) + w(0, IPPROTO_ICMPV6) + w(ty as u8, 0);
    sum += w(m[0], m[1]) + w(m[2], m[3]);
    let mut off = QUOTE_OFF;
    for _ in 0..QUOTE_WORDS {
        let Some(x) = load::<u64>(&ctx, off) else {
            break;
        };
        sum += (x & 0xffff_ffff) + (x >> 32);
        off += 8;
    }
    // The last 0..7 bytes; an odd one is padded with zero (RFC 1071).
    if let Some(x) = load::<u32>(&ctx, off) {
        sum += (x & 0xffff) as u64 + (x >> 16) as u64;
        off += 4;
    }
    if let Some(x) = load::<u16>(&ctx, off) {
        sum += x as u64;
        off += 2;
    }
    if let Some(b) = load::<u8>(&ctx, off) {
        sum += w(b, 0);
    }
    let check = !fold(sum);
    if !crate::parse::store::<u16>(&ctx, L4_OFF + 2, check) {
        return drop(reason, endpoint_id);
    }
    crate::answer::back_out(&ctx, crate::answer::ingress_flags(&ctx), endpoint_id)
}

#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}
