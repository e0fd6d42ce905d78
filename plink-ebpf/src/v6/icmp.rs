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

/// Offsets of an ICMPv6 error's quote: the IPv6 header plink sent and the
/// first 8 transport bytes (ports, or echo type/code/checksum/identifier).
const IN_IP: usize = QUOTE_OFF;
const IN_SADDR: usize = IN_IP + 8;
const IN_DADDR: usize = IN_IP + 24;
const IN_L4: usize = IN_IP + IP6_LEN;
const IN_UDP_CHECK: usize = IN_L4 + 6;
const IN_TCP_CHECK: usize = IN_L4 + 16;
const IN_ICMP_CHECK: usize = IN_L4 + 2;

/// Is this ICMPv6 type an error that quotes a packet (destination
/// unreachable, packet too big, time exceeded, parameter problem)?
#[inline(always)]
pub fn is_error(t: u8) -> bool {
    (1..=4).contains(&t)
}

/// An ICMPv6 error from the provider side to a NAT address (parsed into
/// the scratch slot) about a packet of a live flow: the quote becomes the
/// packet as the client sent it (client → endpoint), the error goes from
/// the endpoint address to the client, out of the flow's consumer
/// interface (RFC 5508 §4.2, for NAT66). Errors do not refresh the flow.
#[inline(never)]
pub fn provider_error(ctx: XdpContext, tot_len: u32) -> u32 {
    match translate(&ctx, tot_len as usize) {
        Ok((ifindex, ep)) => crate::forward::redirect(ifindex, ep),
        Err((r, ep)) => drop(r, ep),
    }
}

#[inline(always)]
fn translate(ctx: &XdpContext, tot_len: usize) -> Result<(u32, u32), (DropReason, u32)> {
    use plink_common::{CtRevKey, IPPROTO_TCP, IPPROTO_UDP, csum, flow_expired};

    use crate::{
        maps::{CT_FWD, CT_REV, GLOBAL},
        parse::store,
        stats::NO_EP,
    };
    let malformed = (DropReason::Malformed, NO_EP);
    let no_flow = (DropReason::IcmpErrorNoFlow, NO_EP);
    if tot_len < IP6_LEN + 8 + IP6_LEN + 8 {
        return Err(malformed);
    }
    let Some(p) = ptr_at::<[u8; IN_L4 + 8]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    // SAFETY: offsets below IN_L4 + 8 are inside the checked region.
    let (ver, proto, hop, out_src, out_dst, q_src, q_dst, l4, ic) = unsafe {
        let a = |off: usize| p.add(off).cast::<Addr>().read_unaligned();
        let h = |off: usize| p.add(off).cast::<u16>().read_unaligned();
        (
            *p.add(IN_IP) >> 4,
            *p.add(IN_IP + 6),
            *p.add(IP6_OFF + 7),
            a(IP6_OFF + 8),
            a(IP6_OFF + 24),
            a(IN_SADDR),
            a(IN_DADDR),
            [h(IN_L4), h(IN_L4 + 2), h(IN_L4 + 4)],
            h(L4_OFF + 2),
        )
    };
    // The quote must be a packet plink sent from the NAT address the error
    // is addressed to.
    if ver != 6 || q_src != out_dst {
        return Err(no_flow);
    }
    let (nat_port, backend_port) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (l4[0], l4[1]),
        IPPROTO_ICMPV6 if l4[0].to_ne_bytes()[0] == super::parse::ICMP6_ECHO_REQUEST => (l4[2], 0),
        _ => return Err(no_flow),
    };
    let rev = CtRevKey {
        nat_addr_be: q_src,
        backend_addr_be: q_dst,
        nat_port_be: nat_port,
        backend_port_be: backend_port,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: map values, read only: an error does not refresh the flow.
    let Some(owner) = (unsafe { CT_REV.get(&rev) }) else {
        return Err(no_flow);
    };
    // SAFETY: as above.
    let Some(v) = (unsafe { CT_FWD.get(&owner.fwd) }) else {
        return Err(no_flow);
    };
    let ep = v.endpoint_id;
    if v.nat_addr_be != q_src
        || v.nat_port_be != nat_port
        || v.backend_addr_be != q_dst
        || v.backend_port_be != backend_port
    {
        return Err((DropReason::CtBroken, ep));
    }
    let Some(g) = GLOBAL.get(0) else {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    };
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() };
    if flow_expired(v, now, &g.timeouts) || !crate::endpoint::current(v) {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    }
    if hop <= 1 {
        return Err((DropReason::TtlExceeded, ep));
    }
    let (client, endpoint) = (owner.fwd.src_addr_be, owner.fwd.dst_addr_be);
    let (client_port, endpoint_port) = (owner.fwd.src_port_be, owner.fwd.dst_port_be);
    // The outer checksum covers the pseudo-header and every quoted byte.
    let mut c = csum::update128(ic, &out_src, &endpoint);
    c = csum::update128(c, &out_dst, &client);
    c = csum::update128(c, &q_src, &client);
    c = csum::update128(c, &q_dst, &endpoint);
    let malformed = (DropReason::Malformed, ep);
    // The quoted transport checksum (where quoted) follows its pseudo-header
    // and ports, as Linux expects of a quote it matches to a socket.
    let inner_off = match proto {
        IPPROTO_TCP => IN_TCP_CHECK,
        IPPROTO_UDP => IN_UDP_CHECK,
        _ => IN_ICMP_CHECK,
    };
    let mut inner = None;
    if IP6_OFF + tot_len >= inner_off + 2
        && let Some(old) = load::<u16>(ctx, inner_off)
    {
        let mut l = csum::update128(old, &q_src, &client);
        l = csum::update128(l, &q_dst, &endpoint);
        if proto == IPPROTO_ICMPV6 {
            l = csum::update16(l, l4[2], client_port);
        } else {
            l = csum::update16(l, l4[0], client_port);
            l = csum::update16(l, l4[1], endpoint_port);
            if proto == IPPROTO_UDP {
                l = csum::udp_finish(old, l);
            }
        }
        c = csum::update16(c, old, l);
        inner = Some(l);
    }
    let stored = if proto == IPPROTO_ICMPV6 {
        c = csum::update16(c, l4[2], client_port);
        store::<u16>(ctx, IN_L4 + 4, client_port)
    } else {
        c = csum::update16(c, l4[0], client_port);
        c = csum::update16(c, l4[1], endpoint_port);
        store::<[u16; 2]>(ctx, IN_L4, [client_port, endpoint_port])
    };
    if !stored {
        return Err(malformed);
    }
    if let Some(l) = inner
        && !store::<u16>(ctx, inner_off, l)
    {
        return Err(malformed);
    }
    let ok = store::<Addr>(ctx, IN_SADDR, client)
        && store::<Addr>(ctx, IN_DADDR, endpoint)
        && store::<Addr>(ctx, IP6_OFF + 8, endpoint)
        && store::<Addr>(ctx, IP6_OFF + 24, client)
        && store::<u8>(ctx, IP6_OFF + 7, hop - 1)
        && store::<u16>(ctx, L4_OFF + 2, c)
        && store::<[u8; 6]>(ctx, 0, v.client_mac)
        && store::<[u8; 6]>(ctx, 6, v.gw_mac);
    if !ok {
        return Err(malformed);
    }
    if !crate::forward::fits_mtu(ctx, v.ingress_ifindex) {
        return Err((DropReason::FragNeeded, ep));
    }
    crate::stats::count_packet(v, tot_len as u64, true);
    Ok((v.ingress_ifindex, ep))
}

/// An ICMPv6 error a consumer-side router sent to an endpoint address
/// (parsed into the scratch slot) about a reply of a live NAT66 flow, e.g.
/// Packet Too Big on the way to a client behind it: the quote becomes the
/// reply as its backend sent it (backend → NAT address/port), the error
/// goes from the NAT address to the backend, routed on the provider side
/// (RFC 5508 §4.2, for NAT66). The flow key includes the ingress network,
/// so a consumer reaches only its own flows. Errors do not refresh flows.
// Inlined into the program, so that the translation and the route each
// have the stack to themselves.
#[inline(always)]
pub fn consumer_error(ctx: XdpContext, tot_len: u32) -> u32 {
    match consumer_translate(&ctx, tot_len as usize) {
        Err((r, ep)) => drop(r, ep),
        // A NAT64 flow's: the error becomes ICMP for its IPv4 backend.
        Ok(true) => match super::nat64::consumer_error(&ctx, tot_len as usize) {
            Err((r, ep)) => drop(r, ep),
            Ok(()) => super::nat64::route_error(ctx, tot_len),
        },
        Ok(false) => route_error(ctx, tot_len),
    }
}

/// Routes the error [`consumer_translate`] rewrote to the flow's backend.
#[inline(never)]
fn route_error(ctx: XdpContext, tot_len: u32) -> u32 {
    use super::{NextHop6, route6};
    use crate::maps::{CT_FWD, GLOBAL, SCRATCH_ICMP};
    // The flow `consumer_translate` found (its key in the scratch slot).
    let (Some(s), Some(g)) = (SCRATCH_ICMP.get_ptr(0), GLOBAL.get(0)) else {
        return drop(DropReason::IcmpErrorNoFlow, crate::stats::NO_EP);
    };
    // SAFETY: this CPU's slot; map value read only.
    let Some(v) = (unsafe { CT_FWD.get(&(*s).fwd) }) else {
        return drop(DropReason::IcmpErrorNoFlow, crate::stats::NO_EP);
    };
    let mut next = NextHop6 {
        src: v.nat_addr_be,
        dst: v.backend_addr_be,
        tot_len: tot_len as u16,
        provider_ifindex: g.provider_ifindex,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        mtu: 0,
    };
    let ep = v.endpoint_id;
    let routed = route6(&ctx, &mut next);
    if !routed.is_next() {
        return routed.finish(ep);
    }
    let ok = crate::parse::store::<[u8; 6]>(&ctx, 0, next.dmac)
        && crate::parse::store::<[u8; 6]>(&ctx, 6, next.smac);
    if !ok {
        return drop(DropReason::Malformed, ep);
    }
    crate::stats::count_packet(v, tot_len as u64, false);
    crate::forward::redirect(next.ifindex, ep)
}

/// The translation of [`consumer_error`], in place but for the MACs; the
/// flow's key is left in `SCRATCH_ICMP`. `Ok(true)`: the flow is a NAT64
/// one, nothing was changed (`v6::nat64::consumer_error` translates).
#[inline(never)]
fn consumer_translate(ctx: &XdpContext, tot_len: usize) -> Result<bool, (DropReason, u32)> {
    use plink_common::{IPPROTO_TCP, IPPROTO_UDP, csum, flow_expired, flow_flags};

    use crate::{
        maps::{CT_FWD, GLOBAL, INTERFACES, SCRATCH_ICMP},
        parse::store,
        stats::NO_EP,
    };
    let malformed = (DropReason::Malformed, NO_EP);
    let no_flow = (DropReason::IcmpErrorNoFlow, NO_EP);
    if tot_len < IP6_LEN + 8 + IP6_LEN + 8 {
        return Err(malformed);
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: map value, read only.
    let Some(network_id) = (unsafe { INTERFACES.get(&ifindex) }).map(|i| i.network_id) else {
        return Err(no_flow);
    };
    let Some(p) = ptr_at::<[u8; IN_L4 + 8]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    // SAFETY: offsets below IN_L4 + 8 are inside the checked region.
    let (ver, proto, hop, out_src, out_dst, q_src, q_dst, l4, ic) = unsafe {
        let a = |off: usize| p.add(off).cast::<Addr>().read_unaligned();
        let h = |off: usize| p.add(off).cast::<u16>().read_unaligned();
        (
            *p.add(IN_IP) >> 4,
            *p.add(IN_IP + 6),
            *p.add(IP6_OFF + 7),
            a(IP6_OFF + 8),
            a(IP6_OFF + 24),
            a(IN_SADDR),
            a(IN_DADDR),
            [h(IN_L4), h(IN_L4 + 2), h(IN_L4 + 4)],
            h(L4_OFF + 2),
        )
    };
    // The quote must be a reply plink sent from the endpoint address the
    // error is addressed to.
    if ver != 6 || q_src != out_dst {
        return Err(no_flow);
    }
    // (client port, endpoint port) as the forward key has them.
    let (client_port, endpoint_port) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (l4[1], l4[0]),
        IPPROTO_ICMPV6 if l4[0].to_ne_bytes()[0] == super::parse::ICMP6_ECHO_REPLY => (l4[2], 0),
        _ => return Err(no_flow),
    };
    // The key is built in the per-CPU scratch slot: the stack is short.
    let Some(s) = SCRATCH_ICMP.get_ptr_mut(0) else {
        return Err(no_flow);
    };
    // SAFETY: this CPU's slot; XDP runs to completion.
    let key = unsafe { &mut (*s).fwd };
    key.src_addr_be = q_dst;
    key.dst_addr_be = q_src;
    key.network_id = network_id;
    key.src_port_be = client_port;
    key.dst_port_be = endpoint_port;
    key.proto = proto;
    key._pad = [0; 3];
    // SAFETY: map value, read only: an error does not refresh the flow.
    let Some(v) = (unsafe { CT_FWD.get(key) }) else {
        return Err(no_flow);
    };
    let ep = v.endpoint_id;
    if v.flags & flow_flags::NAT64 != 0 {
        return Ok(true);
    }
    let Some(g) = GLOBAL.get(0) else {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    };
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() };
    if flow_expired(v, now, &g.timeouts) || !crate::endpoint::current(v) {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    }
    if hop <= 1 {
        return Err((DropReason::TtlExceeded, ep));
    }
    let (nat, backend) = (&v.nat_addr_be, &v.backend_addr_be);
    let (nat_port, backend_port) = (v.nat_port_be, v.backend_port_be);
    // The outer checksum covers the pseudo-header and every quoted byte.
    let mut c = csum::update128(ic, &out_src, nat);
    c = csum::update128(c, &out_dst, backend);
    c = csum::update128(c, &q_src, backend);
    c = csum::update128(c, &q_dst, nat);
    let malformed = (DropReason::Malformed, ep);
    let inner_off = match proto {
        IPPROTO_TCP => IN_TCP_CHECK,
        IPPROTO_UDP => IN_UDP_CHECK,
        _ => IN_ICMP_CHECK,
    };
    let mut inner = None;
    if IP6_OFF + tot_len >= inner_off + 2
        && let Some(old) = load::<u16>(ctx, inner_off)
    {
        let mut l = csum::update128(old, &q_src, backend);
        l = csum::update128(l, &q_dst, nat);
        if proto == IPPROTO_ICMPV6 {
            l = csum::update16(l, l4[2], nat_port);
        } else {
            l = csum::update16(l, l4[0], backend_port);
            l = csum::update16(l, l4[1], nat_port);
            if proto == IPPROTO_UDP {
                l = csum::udp_finish(old, l);
            }
        }
        c = csum::update16(c, old, l);
        inner = Some(l);
    }
    let stored = if proto == IPPROTO_ICMPV6 {
        c = csum::update16(c, l4[2], nat_port);
        store::<u16>(ctx, IN_L4 + 4, nat_port)
    } else {
        c = csum::update16(c, l4[0], backend_port);
        c = csum::update16(c, l4[1], nat_port);
        store::<[u16; 2]>(ctx, IN_L4, [backend_port, nat_port])
    };
    if !stored {
        return Err(malformed);
    }
    if let Some(l) = inner
        && !store::<u16>(ctx, inner_off, l)
    {
        return Err(malformed);
    }
    let ok = store::<Addr>(ctx, IN_SADDR, *backend)
        && store::<Addr>(ctx, IN_DADDR, *nat)
        && store::<Addr>(ctx, IP6_OFF + 8, *nat)
        && store::<Addr>(ctx, IP6_OFF + 24, *backend)
        && store::<u8>(ctx, IP6_OFF + 7, hop - 1)
        && store::<u16>(ctx, L4_OFF + 2, c);
    if !ok {
        return Err(malformed);
    }
    Ok(false)
}
