//! Stateful NAT64 (RFC 6146 style; header translation per RFC 7915): an
//! IPv6 consumer reaches an IPv4 service through the endpoint's IPv6
//! address. The flow is an IPv6 key in front of an IPv4 NAT address and
//! backend (`flow_flags::NAT64`, set by `conntrack::new_flow`).
//!
//! Forward, the packet becomes IPv4 from the NAT address to the backend:
//! the 40-byte IPv6 header gives way to a 20-byte IPv4 one at the head of
//! the frame, the transport header stays where it is. Back, the IPv4 reply
//! becomes IPv6 from the endpoint address to the client. Checksums are
//! updated incrementally: the TCP and UDP pseudo-headers of both families
//! sum the same length and protocol words, so only the addresses change;
//! ICMPv6 covers a pseudo-header that ICMP does not, so it leaves or joins
//! the sum, with the echo type.
//!
//! ICMP errors about a flow's packets are translated both ways
//! ([`provider_error`], [`consumer_error`]); established flows take the fast
//! path with the cached next hop ([`rewrite_cached`]). Not translated:
//! IPv4 fragments (the parser refuses them), echo quotes. The IPv4 header
//! is sent with Don't Fragment and identification 0 (RFC 6864).
use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use plink_common::{
    Addr, CtFwdKey, CtFwdValue, DropReason, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    csum, flow_hash, icmp_type, v4_be,
};

use super::{
    ANSWER, Flow6, icmp,
    parse::{ICMP6_ECHO_REPLY, ICMP6_ECHO_REQUEST},
};
use crate::{
    conntrack, flowlog,
    forward::{self, NextHop},
    maps::{CT_FWD, GLOBAL, SCRATCH_V6},
    parse::{self as p4, Flow, IP_OFF, load, ptr_at, store},
    stats::{self, NO_EP, drop},
};

/// An IPv4 header is this much shorter than an IPv6 one: what a packet
/// shrinks by on its way to the backend and grows by on its way back.
pub const GROWTH: u32 = (super::parse::IP6_LEN - p4::IP_LEN) as u32;

/// The open NAT64 flow's consumer packet (parsed into `SCRATCH_V6` by
/// `v6::consumer`): IPv4 route, flow state, translation, redirect.
#[inline(never)]
pub fn forward(ctx: XdpContext) -> u32 {
    let Some(w) = SCRATCH_V6.get_ptr_mut(0) else {
        return drop(DropReason::Malformed, NO_EP);
    };
    // SAFETY: this CPU's scratch slot; XDP runs to completion.
    let w = unsafe { &mut *w };
    let (f, key, now, endpoint_id, opened) = (&w.f, &w.key, w.now, w.endpoint_id, w.opened);
    let Some(v) = CT_FWD.get_ptr_mut(key) else {
        return drop(DropReason::CtBroken, endpoint_id);
    };
    let Some(g) = GLOBAL.get(0) else {
        return drop(DropReason::FibFailed, endpoint_id);
    };
    // SAFETY: map value pointer; benign races as in the IPv4 path.
    let v = unsafe { &mut *v };
    // Read first, check second (see the IPv4 consumer).
    let mut hop = NextHop {
        src_be: v.nat_addr_be[0],
        dst_be: v.backend_addr_be[0],
        tot_len: f.tot_len.wrapping_sub(GROWTH as u16),
        provider_ifindex: g.provider_ifindex,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        mtu: 0,
    };
    let (sport_be, dport_be) = (v.nat_port_be, v.backend_port_be);
    if v.endpoint_id != endpoint_id || !conntrack::entry_is(v, flow_hash(key)) {
        return drop(DropReason::CtBroken, endpoint_id);
    }
    let routed = forward::route(&ctx, &mut hop);
    if !routed.is_next() {
        // The packet does not leave: the flow it opened is not kept.
        if opened == super::consumer::Opened::Created as u8 {
            conntrack::release(key, endpoint_id);
        }
        if routed.reason() == Some(DropReason::FragNeeded) {
            // The consumer learns the IPv4 path's MTU as an IPv6 one.
            w.err_type = icmp::PACKET_TOO_BIG;
            w.err_mtu = hop.mtu as u32 + GROWTH;
            return ANSWER;
        }
        return routed.finish(endpoint_id);
    }
    // Cached for the fast path (`v6::consumer::established`).
    super::consumer::cache_hop(v, g.hop_gen, hop.ifindex, hop.mtu, hop.smac, hop.dmac);
    super::consumer::commit(v, f, key, opened, now);
    let out = To4 {
        src_be: hop.src_be,
        dst_be: hop.dst_be,
        sport_be,
        dport_be,
        smac: hop.smac,
        dmac: hop.dmac,
    };
    if !to_v4(&ctx, f, &out) {
        return drop(DropReason::Malformed, endpoint_id);
    }
    // An IPv4 segment now; the backend's answers reach the client as IPv6.
    crate::mss::on_tcp_syn(
        &ctx,
        f.proto,
        f.tcp_flags,
        v.service_id,
        endpoint_id,
        hop.ifindex,
        crate::mss::IN | crate::mss::V4 | crate::mss::AUTO_V6,
    );
    super::consumer::leave(v, f.tot_len, hop.ifindex, endpoint_id)
}

/// The fast path's translation of an established NAT64 flow's packet,
/// from the flow's mapping and cached next hop (`nat`: the IPv4 NAT
/// address and backend in word 0 of its addresses).
#[inline(always)]
pub fn rewrite_cached(ctx: &XdpContext, f: &Flow6, nat: &super::rewrite::Nat6) -> bool {
    let out = To4 {
        src_be: nat.src[0],
        dst_be: nat.dst[0],
        sport_be: nat.sport_be,
        dport_be: nat.dport_be,
        smac: nat.smac,
        dmac: nat.dmac,
    };
    to_v4(ctx, f, &out)
}

/// The IPv4 packet's new addresses, ports (raw) and link-layer addresses.
struct To4 {
    src_be: u32,
    dst_be: u32,
    sport_be: u16,
    dport_be: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// IPv6 (parsed as `f`, hop limit > 1) → IPv4 in place. False if the frame
/// could not be resized (never for a parsed packet).
#[inline(always)]
fn to_v4(ctx: &XdpContext, f: &Flow6, n: &To4) -> bool {
    use super::parse::{ICMP6_CHECK, IP6_OFF, TCP_CHECK, UDP_CHECK};
    let Some(vtc) = load::<[u8; 2]>(ctx, IP6_OFF) else {
        return false;
    };
    let tos = (vtc[0] << 4) | (vtc[1] >> 4);
    let check_off6 = match f.proto {
        IPPROTO_TCP => TCP_CHECK,
        IPPROTO_UDP => UDP_CHECK,
        _ => ICMP6_CHECK,
    };
    let Some(check) = load::<u16>(ctx, check_off6) else {
        return false;
    };
    let icmp = f.proto == IPPROTO_ICMPV6;
    let plen = f.tot_len.wrapping_sub(super::parse::IP6_LEN as u16);
    // ICMP has no pseudo-header: the addresses leave the sum.
    let (src, dst) = if icmp {
        ([0; 4], [0; 4])
    } else {
        (v4_be(n.src_be), v4_be(n.dst_be))
    };
    let mut c = csum::update128(check, &f.src, &src);
    c = csum::update128(c, &f.dst, &dst);
    let (proto, ty) = if icmp {
        let (ty6, ty4) = if f.tcp_flags == ICMP6_ECHO_REQUEST {
            (ICMP6_ECHO_REQUEST, icmp_type::ECHO_REQUEST)
        } else {
            (ICMP6_ECHO_REPLY, icmp_type::ECHO_REPLY)
        };
        c = csum::update16(c, plen.to_be(), 0);
        c = csum::update16(c, u16::from_ne_bytes([0, IPPROTO_ICMPV6]), 0);
        c = csum::update16(
            c,
            u16::from_ne_bytes([ty6, 0]),
            u16::from_ne_bytes([ty4, 0]),
        );
        let (old_id, new_id) = (f.sport_be | f.dport_be, n.sport_be | n.dport_be);
        c = csum::update16(c, old_id, new_id);
        (IPPROTO_ICMP, ty4)
    } else {
        c = csum::update16(c, f.sport_be, n.sport_be);
        c = csum::update16(c, f.dport_be, n.dport_be);
        if f.proto == IPPROTO_UDP {
            c = csum::udp_finish(check, c);
        }
        (f.proto, 0)
    };
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), GROWTH as i32) } != 0 {
        return false;
    }
    let Some(p) = ptr_at::<[u8; p4::L4_OFF + 8]>(ctx, 0) else {
        return false;
    };
    let p = p.cast::<u8>();
    let tot = (plen.wrapping_add(p4::IP_LEN as u16)).to_be_bytes();
    let mut ip: [u8; p4::IP_LEN] = [
        0x45,
        tos,
        tot[0],
        tot[1],
        0,
        0,
        0x40,
        0,
        f.hop - 1,
        proto,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    ip[12..16].copy_from_slice(&n.src_be.to_ne_bytes());
    ip[16..20].copy_from_slice(&n.dst_be.to_ne_bytes());
    let ip_check = header_checksum(&ip).to_ne_bytes();
    ip[10] = ip_check[0];
    ip[11] = ip_check[1];
    // SAFETY: every offset is inside the checked L4_OFF + 8 bytes.
    unsafe {
        p.cast::<[u8; 6]>().write_unaligned(n.dmac);
        p.add(6).cast::<[u8; 6]>().write_unaligned(n.smac);
        p.add(12).cast::<[u8; 2]>().write_unaligned([0x08, 0x00]);
        p.add(IP_OFF).cast::<[u8; p4::IP_LEN]>().write_unaligned(ip);
        if icmp {
            p.add(p4::L4_OFF).write(ty);
            p.add(p4::ICMP_ID)
                .cast::<u16>()
                .write_unaligned(n.sport_be | n.dport_be);
            p.add(p4::ICMP_CHECK).cast::<u16>().write_unaligned(c);
        } else {
            p.add(p4::L4_OFF)
                .cast::<[u16; 2]>()
                .write_unaligned([n.sport_be, n.dport_be]);
            if f.proto == IPPROTO_UDP {
                p.add(p4::UDP_CHECK).cast::<u16>().write_unaligned(c);
            }
        }
    }
    f.proto != IPPROTO_TCP || store::<u16>(ctx, p4::TCP_CHECK, c)
}

/// The IPv4 header checksum of `ip` (its checksum field zero).
#[inline(always)]
fn header_checksum(ip: &[u8; p4::IP_LEN]) -> u16 {
    let mut s: u32 = 0;
    let mut i = 0;
    while i < p4::IP_LEN {
        s += u16::from_ne_bytes([ip[i], ip[i + 1]]) as u32;
        i += 2;
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// A NAT64 flow's IPv4 reply (parsed as `f`; the provider checked the
/// flow, its endpoint, the TTL and the consumer interface's MTU for the
/// grown packet, and moved the flow's state): translated to IPv6 from the
/// endpoint address to the client and redirected to the consumer. (The
/// caller clamps a SYN-ACK's MSS: one frame less on the stack here.)
#[inline(never)]
pub fn reply(ctx: XdpContext, f: &Flow, v: &CtFwdValue, fwd: &CtFwdKey) -> u32 {
    let endpoint_id = v.endpoint_id;
    let back = To6 {
        src: fwd.dst_addr_be,
        dst: fwd.src_addr_be,
        sport_be: fwd.dst_port_be,
        dport_be: fwd.src_port_be,
        smac: v.gw_mac,
        dmac: v.client_mac,
    };
    if let Err(r) = to_v6(&ctx, f, &back) {
        return drop(r, endpoint_id);
    }
    stats::count_packet(v, f.tot_len as u64, true);
    if flowlog::logged(v) {
        flowlog::count(v, f.tot_len as u64, true);
    }
    forward::redirect(v.ingress_ifindex, endpoint_id)
}

/// The IPv6 packet's new addresses, ports (raw) and link-layer addresses.
struct To6 {
    src: Addr,
    dst: Addr,
    sport_be: u16,
    dport_be: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// IPv4 (parsed as `f`: no options, no fragment, TTL > 1) → IPv6 in place.
#[inline(always)]
fn to_v6(ctx: &XdpContext, f: &Flow, n: &To6) -> Result<(), DropReason> {
    use super::parse::{ICMP6_CHECK, ICMP6_ID, IP6_OFF, L4_OFF, TCP_CHECK, UDP_CHECK};
    let Some(tos) = load::<u8>(ctx, IP_OFF + 1) else {
        return Err(DropReason::Malformed);
    };
    let check_off4 = match f.proto {
        IPPROTO_TCP => p4::TCP_CHECK,
        IPPROTO_UDP => p4::UDP_CHECK,
        _ => p4::ICMP_CHECK,
    };
    let Some(check) = load::<u16>(ctx, check_off4) else {
        return Err(DropReason::Malformed);
    };
    let icmp = f.proto == IPPROTO_ICMP;
    if f.proto == IPPROTO_UDP && check == 0 {
        return Err(DropReason::Nat64UdpNoChecksum);
    }
    let plen = f.tot_len.wrapping_sub(p4::IP_LEN as u16);
    let (src, dst) = if icmp {
        ([0; 4], [0; 4])
    } else {
        (v4_be(f.src_be), v4_be(f.dst_be))
    };
    // ICMPv6 covers a pseudo-header: the addresses, length and next header
    // join the sum.
    let mut c = csum::update128(check, &src, &n.src);
    c = csum::update128(c, &dst, &n.dst);
    let proto = if icmp {
        c = csum::update16(c, 0, plen.to_be());
        c = csum::update16(c, 0, u16::from_ne_bytes([0, IPPROTO_ICMPV6]));
        c = csum::update16(
            c,
            u16::from_ne_bytes([icmp_type::ECHO_REPLY, 0]),
            u16::from_ne_bytes([ICMP6_ECHO_REPLY, 0]),
        );
        c = csum::update16(c, f.sport_be | f.dport_be, n.sport_be | n.dport_be);
        IPPROTO_ICMPV6
    } else {
        c = csum::update16(c, f.sport_be, n.sport_be);
        c = csum::update16(c, f.dport_be, n.dport_be);
        if f.proto == IPPROTO_UDP {
            c = csum::udp_finish(check, c);
        }
        f.proto
    };
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -(GROWTH as i32)) } != 0 {
        return Err(DropReason::Malformed);
    }
    let Some(p) = ptr_at::<[u8; L4_OFF + 8]>(ctx, 0) else {
        return Err(DropReason::Malformed);
    };
    let p = p.cast::<u8>();
    let len = plen.to_be_bytes();
    let head: [u8; 8] = [
        0x60 | (tos >> 4),
        tos << 4,
        0,
        0,
        len[0],
        len[1],
        proto,
        f.ttl - 1,
    ];
    // SAFETY: every offset is inside the checked L4_OFF + 8 bytes.
    unsafe {
        p.cast::<[u8; 6]>().write_unaligned(n.dmac);
        p.add(6).cast::<[u8; 6]>().write_unaligned(n.smac);
        p.add(12).cast::<[u8; 2]>().write_unaligned([0x86, 0xdd]);
        p.add(IP6_OFF).cast::<[u8; 8]>().write_unaligned(head);
        p.add(IP6_OFF + 8).cast::<Addr>().write_unaligned(n.src);
        p.add(IP6_OFF + 24).cast::<Addr>().write_unaligned(n.dst);
        if icmp {
            p.add(L4_OFF).write(ICMP6_ECHO_REPLY);
            p.add(ICMP6_ID)
                .cast::<u16>()
                .write_unaligned(n.sport_be | n.dport_be);
            p.add(ICMP6_CHECK).cast::<u16>().write_unaligned(c);
        } else {
            p.add(L4_OFF)
                .cast::<[u16; 2]>()
                .write_unaligned([n.sport_be, n.dport_be]);
            if f.proto == IPPROTO_UDP {
                p.add(UDP_CHECK).cast::<u16>().write_unaligned(c);
            }
        }
    }
    if f.proto == IPPROTO_TCP && !store::<u16>(ctx, TCP_CHECK, c) {
        return Err(DropReason::Malformed);
    }
    Ok(())
}

/// [`crate::icmp::provider_error`]'s verdict for an ICMP error about a
/// NAT64 flow's packet: [`provider_error`] takes it on.
pub const ICMP_ERROR: u32 = u32::MAX - 5;

/// Offsets in an IPv4 ICMP error frame: the outer header, the ICMP
/// header, the quoted (inner) IPv4 header, the quoted transport header.
const OUT_ICMP: usize = p4::L4_OFF;
const IN_IP4: usize = OUT_ICMP + 8;
const IN_L4_4: usize = IN_IP4 + p4::IP_LEN;
/// The same in the translated ICMPv6 error frame.
const OUT_ICMP6: usize = super::parse::L4_OFF;
const IN_IP6: usize = OUT_ICMP6 + 8;
const IN_L4_6: usize = IN_IP6 + super::parse::IP6_LEN;
/// The translated error grows by twice the header difference: outer and
/// quoted header.
const ERROR_GROWTH: usize = 2 * GROWTH as usize;
/// An ICMPv6 error must not exceed the minimum IPv6 MTU (RFC 4443 2.4 (c)).
const MAX_ERROR6: usize = 1280;

/// An ICMP error from the provider side to a NAT address about a NAT64
/// flow's packet (the IPv4 provider parsed it: `tot_len` bytes of IPv4)
/// becomes the ICMPv6 error the client would get from the endpoint
/// address (RFC 7915 4.2): type and code mapped, Packet Too Big with the
/// IPv4 MTU + 20, the quote translated back to the client's IPv6 packet.
/// Only TCP and UDP quotes; errors that RFC 7915 does not map (parameter
/// problem, unknown codes), echo quotes and errors whose translation would
/// exceed 1280 bytes are dropped as `icmp_unsupported`.
#[inline(never)]
pub fn provider_error(ctx: XdpContext, tot_len: u32) -> u32 {
    match error_to_v6(&ctx, tot_len as usize) {
        Ok((ifindex, ep)) => forward::redirect(ifindex, ep),
        Err((r, ep)) => drop(r, ep),
    }
}

/// One's-complement word sum (unfolded) of an `Addr`.
#[inline(always)]
fn addr_sum(a: &Addr) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < 4 {
        s += (a[i] & 0xffff) + (a[i] >> 16);
        i += 1;
    }
    s
}

/// RFC 7915 4.2: the ICMPv6 type, code and 4-byte rest (raw) of an ICMPv4
/// error; `None` for what is not translated.
#[inline(always)]
fn map_error(ty: u8, code: u8, rest_be: u32) -> Option<(u8, u8, u32)> {
    match (ty, code) {
        (icmp_type::DEST_UNREACH, 0 | 1 | 5..=8 | 11 | 12) => Some((1, 0, 0)),
        (icmp_type::DEST_UNREACH, 9 | 10 | 13 | 15) => Some((1, 1, 0)),
        (icmp_type::DEST_UNREACH, 3) => Some((1, 4, 0)),
        // Protocol unreachable: parameter problem, pointing at next header.
        (icmp_type::DEST_UNREACH, 2) => Some((4, 1, 6u32.to_be())),
        (icmp_type::DEST_UNREACH, icmp_type::CODE_FRAG_NEEDED) => {
            let mtu = u32::from_be(rest_be) & 0xffff;
            // A router that sends no MTU (RFC 1191 predecessors): no
            // number to translate.
            if mtu == 0 {
                return None;
            }
            Some((2, 0, (mtu + GROWTH).to_be()))
        }
        (icmp_type::TIME_EXCEEDED, 0 | 1) => Some((3, code, 0)),
        // Pointer indicates the error, or bad length: erroneous header
        // field, the pointer moved to the IPv6 field (RFC 7915 figure 3).
        (icmp_type::PARAMETER_PROBLEM, 0 | 2) => {
            let pointer6 = match u32::from_be(rest_be) >> 24 {
                0 => 0,
                1 => 1,
                2 | 3 => 4,
                8 => 7,
                9 => 6,
                12..=15 => 8,
                16..=19 => 24,
                // Identification, flags, fragment offset, checksum: no
                // IPv6 field (RFC 7915: silently dropped).
                _ => return None,
            };
            Some((4, 0, u32::to_be(pointer6)))
        }
        _ => None,
    }
}

#[inline(always)]
fn error_to_v6(ctx: &XdpContext, tot_len: usize) -> Result<(u32, u32), (DropReason, u32)> {
    use crate::maps::{CT_REV, SCRATCH_ICMP};
    let malformed = (DropReason::Malformed, NO_EP);
    let no_flow = (DropReason::IcmpErrorNoFlow, NO_EP);
    let unsupported = (DropReason::IcmpUnsupported, NO_EP);
    // The quote holds the inner header and 8 transport bytes.
    if tot_len < p4::IP_LEN + 8 + p4::IP_LEN + 8 {
        return Err(malformed);
    }
    if tot_len + ERROR_GROWTH > MAX_ERROR6 {
        return Err(unsupported);
    }
    let Some(p) = ptr_at::<[u8; IN_L4_4 + 8]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    // SAFETY: every offset is inside the checked IN_L4_4 + 8 bytes.
    let (ttl, ty, code, ic, rest, vihl, q_tos, q_len, q_ttl, q_proto, q_src, q_dst, ports) = unsafe {
        let h = |off: usize| p.add(off).cast::<u16>().read_unaligned();
        let w = |off: usize| p.add(off).cast::<u32>().read_unaligned();
        (
            *p.add(p4::IP_TTL),
            *p.add(OUT_ICMP),
            *p.add(OUT_ICMP + 1),
            h(OUT_ICMP + 2),
            w(OUT_ICMP + 4),
            *p.add(IN_IP4),
            *p.add(IN_IP4 + 1),
            u16::from_be(h(IN_IP4 + 2)),
            *p.add(IN_IP4 + 8),
            *p.add(IN_IP4 + 9),
            w(IN_IP4 + 12),
            w(IN_IP4 + 16),
            [h(IN_L4_4), h(IN_L4_4 + 2)],
        )
    };
    if vihl != 0x45 || !(q_proto == IPPROTO_TCP || q_proto == IPPROTO_UDP) {
        return Err(unsupported);
    }
    let Some((ty6, code6, rest6)) = map_error(ty, code, rest) else {
        return Err(unsupported);
    };
    // The flow whose packet is quoted (NAT address/port → backend), keyed
    // in the scratch slot: the stack is short here.
    let Some(s) = SCRATCH_ICMP.get_ptr_mut(0) else {
        return Err(no_flow);
    };
    // SAFETY: this CPU's slot; XDP runs to completion.
    let rev = unsafe { &mut (*s).rev };
    rev.nat_addr_be = v4_be(q_src);
    rev.backend_addr_be = v4_be(q_dst);
    rev.nat_port_be = ports[0];
    rev.backend_port_be = ports[1];
    rev.proto = q_proto;
    rev._pad = [0; 3];
    // SAFETY: map values, read only: an error does not refresh the flow.
    let Some(owner) = (unsafe { CT_REV.get(rev) }) else {
        return Err(no_flow);
    };
    // SAFETY: as above.
    let Some(v) = (unsafe { CT_FWD.get(&owner.fwd) }) else {
        return Err(no_flow);
    };
    let ep = v.endpoint_id;
    if v.flags & plink_common::flow_flags::NAT64 == 0
        || v.nat_addr_be[0] != q_src
        || v.nat_port_be != ports[0]
        || v.backend_addr_be[0] != q_dst
        || v.backend_port_be != ports[1]
    {
        return Err((DropReason::CtBroken, ep));
    }
    let Some(g) = GLOBAL.get(0) else {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    };
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() };
    if plink_common::flow_expired(v, now, &g.timeouts) || !crate::endpoint::current(v) {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    }
    if ttl <= 1 {
        return Err((DropReason::TtlExceeded, ep));
    }
    // RFC 7915 4.2: Packet Too Big carries the smallest of the ICMP MTU
    // + 20, the consumer link's MTU and the provider link's MTU + 20.
    let rest6 = if ty6 == 2 {
        let mut mtu = u32::from_be(rest6);
        if let Some(m) = crate::mss::device_mtu(ctx, v.ingress_ifindex) {
            mtu = mtu.min(m);
        }
        if let Some(m) = crate::mss::device_mtu(ctx, 0) {
            mtu = mtu.min(m + GROWTH);
        }
        mtu.to_be()
    } else {
        rest6
    };
    let fwd = &owner.fwd;
    let (client, endpoint) = (&fwd.src_addr_be, &fwd.dst_addr_be);
    let (client_port, endpoint_port) = (fwd.src_port_be, fwd.dst_port_be);
    // The ICMPv6 length: the ICMP message, its quoted header 20 bytes longer.
    let plen6 = tot_len - p4::IP_LEN + GROWTH as usize;
    let q_plen = q_len.wrapping_sub(p4::IP_LEN as u16);
    let q_head = [
        0x60 | (q_tos >> 4),
        q_tos << 4,
        0,
        0,
        (q_plen >> 8) as u8,
        q_plen as u8,
        q_proto,
        q_ttl,
    ];
    // The quoted transport checksum, where quoted, follows its
    // pseudo-header (IPv4 NAT → backend to IPv6 client → endpoint) and
    // ports, as the client's stack expects of a quote it matches.
    let inner_off4 = if q_proto == IPPROTO_TCP {
        IN_L4_4 + 16
    } else {
        IN_L4_4 + 6
    };
    let inner = if p4::IP_OFF + tot_len >= inner_off4 + 2 {
        load::<u16>(ctx, inner_off4)
    } else {
        None
    };
    // The new checksum, from the old one: data removed (as complements)
    // and data added, in one sum (RFC 1624).
    let mut sum: u32 = 0;
    let mut q4 = [0u16; 10];
    // SAFETY: the quoted IPv4 header is inside the checked region.
    unsafe {
        let mut i = 0;
        while i < 10 {
            q4[i] = p.add(IN_IP4 + 2 * i).cast::<u16>().read_unaligned();
            i += 1;
        }
    }
    for w in q4 {
        sum += (!w) as u32;
    }
    sum += (!u16::from_ne_bytes([ty, code])) as u32 + u16::from_ne_bytes([ty6, code6]) as u32;
    sum += (!(rest as u16)) as u32 + (!((rest >> 16) as u16)) as u32;
    sum += (rest6 & 0xffff) + (rest6 >> 16);
    // Pseudo-header: both addresses, the length, the next header (58).
    sum += addr_sum(endpoint) + addr_sum(client);
    sum += (plen6 as u16).to_be() as u32 + u16::from_ne_bytes([0, IPPROTO_ICMPV6]) as u32;
    // The quoted IPv6 header.
    let mut i = 0;
    while i < 8 {
        sum += u16::from_ne_bytes([q_head[i], q_head[i + 1]]) as u32;
        i += 2;
    }
    sum += addr_sum(client) + addr_sum(endpoint);
    // Quoted ports and transport checksum.
    sum += (!ports[0]) as u32 + (!ports[1]) as u32 + client_port as u32 + endpoint_port as u32;
    let new_inner = inner.map(|l| {
        let mut n = csum::update128(l, &v4_be(q_src), client);
        n = csum::update128(n, &v4_be(q_dst), endpoint);
        n = csum::update16(n, ports[0], client_port);
        n = csum::update16(n, ports[1], endpoint_port);
        if q_proto == IPPROTO_UDP {
            n = csum::udp_finish(l, n);
        }
        n
    });
    if let (Some(l), Some(n)) = (inner, new_inner) {
        sum += (!l) as u32 + n as u32;
    }
    let c = csum::add(ic, sum);
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), -(ERROR_GROWTH as i32)) } != 0 {
        return Err(malformed);
    }
    let Some(p) = ptr_at::<[u8; IN_L4_6 + 4]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    let len = (plen6 as u16).to_be_bytes();
    // SAFETY: every offset is inside the checked IN_L4_6 + 4 bytes.
    unsafe {
        p.cast::<[u8; 6]>().write_unaligned(v.client_mac);
        p.add(6).cast::<[u8; 6]>().write_unaligned(v.gw_mac);
        p.add(12).cast::<[u8; 2]>().write_unaligned([0x86, 0xdd]);
        p.add(IP_OFF).cast::<[u8; 8]>().write_unaligned([
            0x60,
            0,
            0,
            0,
            len[0],
            len[1],
            IPPROTO_ICMPV6,
            ttl - 1,
        ]);
        p.add(IP_OFF + 8).cast::<Addr>().write_unaligned(*endpoint);
        p.add(IP_OFF + 24).cast::<Addr>().write_unaligned(*client);
        p.add(OUT_ICMP6)
            .cast::<[u8; 2]>()
            .write_unaligned([ty6, code6]);
        p.add(OUT_ICMP6 + 2).cast::<u16>().write_unaligned(c);
        p.add(OUT_ICMP6 + 4).cast::<u32>().write_unaligned(rest6);
        p.add(IN_IP6).cast::<[u8; 8]>().write_unaligned(q_head);
        p.add(IN_IP6 + 8).cast::<Addr>().write_unaligned(*client);
        p.add(IN_IP6 + 24).cast::<Addr>().write_unaligned(*endpoint);
        p.add(IN_L4_6)
            .cast::<[u16; 2]>()
            .write_unaligned([client_port, endpoint_port]);
    }
    if let Some(n) = new_inner {
        let off6 = inner_off4 + ERROR_GROWTH;
        if !store::<u16>(ctx, off6, n) {
            return Err(malformed);
        }
    }
    if !forward::fits_mtu(ctx, v.ingress_ifindex) {
        return Err((DropReason::FragNeeded, ep));
    }
    stats::count_packet(v, tot_len as u64, true);
    Ok((v.ingress_ifindex, ep))
}

/// One's-complement sum (unfolded) of the complements of an `Addr`'s
/// words: adding it removes the address from a sum.
#[inline(always)]
fn addr_neg_sum(a: &Addr) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < 4 {
        s += (!(a[i] as u16)) as u32 + (!((a[i] >> 16) as u16)) as u32;
        i += 1;
    }
    s
}

/// RFC 7915 5.2: the ICMP type, code and 4-byte rest (host order: its
/// bytes are `to_be_bytes()`; the MTU of frag needed, the pointer of
/// parameter problem) of an ICMPv6 error; `None` for what is not
/// translated.
#[inline(always)]
fn map_error6(ty: u8, code: u8, rest_be: u32) -> Option<(u8, u8, u32)> {
    match (ty, code) {
        (1, 0 | 2 | 3) => Some((icmp_type::DEST_UNREACH, 1, 0)),
        (1, 1) => Some((icmp_type::DEST_UNREACH, 10, 0)),
        (1, 4) => Some((icmp_type::DEST_UNREACH, 3, 0)),
        (2, 0) => {
            let mtu = u32::from_be(rest_be)
                .saturating_sub(GROWTH)
                .clamp(68, 0xffff);
            Some((icmp_type::DEST_UNREACH, icmp_type::CODE_FRAG_NEEDED, mtu))
        }
        (3, 0 | 1) => Some((icmp_type::TIME_EXCEEDED, code, 0)),
        // Erroneous header field: the pointer moved to the IPv4 field
        // (RFC 7915 figure 6), in the rest's first byte.
        (4, 0) => {
            let pointer4: u32 = match u32::from_be(rest_be) {
                0 => 0,
                1 => 1,
                4 | 5 => 2,
                6 => 9,
                7 => 8,
                8..=23 => 12,
                24..=39 => 16,
                // The flow label, or past the header: no IPv4 field.
                _ => return None,
            };
            Some((icmp_type::PARAMETER_PROBLEM, 0, pointer4 << 24))
        }
        // Unrecognised next header: protocol unreachable.
        (4, 1) => Some((icmp_type::DEST_UNREACH, 2, 0)),
        _ => None,
    }
}

/// An ICMPv6 error from a consumer-side router about a NAT64 flow's reply
/// (`v6::icmp::consumer_error` found the flow, its key in `SCRATCH_ICMP`)
/// becomes the ICMP error its IPv4 backend would get from the NAT address
/// (RFC 7915 5.2), quoting the reply as the backend sent it; the frame
/// shrinks by 40 bytes. [`route_error`] sends it.
#[inline(never)]
pub fn consumer_error(ctx: &XdpContext, tot_len: usize) -> Result<(), (DropReason, u32)> {
    use super::parse::{IP6_LEN, IP6_OFF};
    use crate::maps::SCRATCH_ICMP;
    let malformed = (DropReason::Malformed, NO_EP);
    let no_flow = (DropReason::IcmpErrorNoFlow, NO_EP);
    let Some(s) = SCRATCH_ICMP.get_ptr(0) else {
        return Err(no_flow);
    };
    // SAFETY: this CPU's slot, the key the caller looked the flow up by.
    let key = unsafe { &(*s).fwd };
    // SAFETY: map value, read only: an error does not refresh the flow.
    let Some(v) = (unsafe { CT_FWD.get(key) }) else {
        return Err(no_flow);
    };
    let ep = v.endpoint_id;
    let unsupported = (DropReason::IcmpUnsupported, ep);
    if key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP {
        return Err(unsupported);
    }
    let Some(g) = GLOBAL.get(0) else {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    };
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() };
    if plink_common::flow_expired(v, now, &g.timeouts) || !crate::endpoint::current(v) {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    }
    let Some(p) = ptr_at::<[u8; IN_L4_6 + 8]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    // SAFETY: every offset is inside the checked IN_L4_6 + 8 bytes.
    let (hop, ty, code, ic, rest, q_head, ports) = unsafe {
        let h = |off: usize| p.add(off).cast::<u16>().read_unaligned();
        (
            *p.add(IP6_OFF + 7),
            *p.add(OUT_ICMP6),
            *p.add(OUT_ICMP6 + 1),
            h(OUT_ICMP6 + 2),
            p.add(OUT_ICMP6 + 4).cast::<u32>().read_unaligned(),
            p.add(IN_IP6).cast::<[u16; 4]>().read_unaligned(),
            [h(IN_L4_6), h(IN_L4_6 + 2)],
        )
    };
    if hop <= 1 {
        return Err((DropReason::TtlExceeded, ep));
    }
    let Some((ty4, code4, rest4)) = map_error6(ty, code, rest) else {
        return Err(unsupported);
    };
    // RFC 7915 5.2: frag needed carries the smallest of the ICMPv6 MTU
    // - 20, the provider link's MTU and the consumer link's MTU - 20.
    let rest4 = if code4 == icmp_type::CODE_FRAG_NEEDED && ty4 == icmp_type::DEST_UNREACH {
        let mut mtu = rest4;
        if let Some(m) = crate::mss::device_mtu(ctx, g.provider_ifindex) {
            mtu = mtu.min(m);
        }
        if let Some(m) = crate::mss::device_mtu(ctx, 0) {
            mtu = mtu.min(m.saturating_sub(GROWTH));
        }
        mtu.max(68)
    } else {
        rest4
    };
    let (nat, backend) = (v.nat_addr_be[0], v.backend_addr_be[0]);
    let (nat_port, backend_port) = (v.nat_port_be, v.backend_port_be);
    // The quoted reply as the endpoint sent it: endpoint → client.
    let (endpoint, client) = (&key.dst_addr_be, &key.src_addr_be);
    let plen6 = tot_len - IP6_LEN;
    let qh = q_head.map(u16::to_ne_bytes);
    let q_tos = (qh[0][0] << 4) | (qh[0][1] >> 4);
    let q_plen = u16::from_be_bytes(qh[2]);
    let (q_proto, q_hop) = (qh[3][0], qh[3][1]);
    // The quoted transport checksum, where quoted.
    let inner_off6 = if q_proto == IPPROTO_TCP {
        IN_L4_6 + 16
    } else {
        IN_L4_6 + 6
    };
    let inner = if IP6_OFF + tot_len >= inner_off6 + 2 {
        load::<u16>(ctx, inner_off6)
    } else {
        None
    };
    let new_inner = inner.map(|l| {
        let mut n = csum::update128(l, endpoint, &v4_be(backend));
        n = csum::update128(n, client, &v4_be(nat));
        n = csum::update16(n, ports[0], backend_port);
        n = csum::update16(n, ports[1], nat_port);
        if q_proto == IPPROTO_UDP {
            n = csum::udp_finish(l, n);
        }
        n
    });
    // Everything ICMPv6 sums that ICMP does not, removed (as complements):
    // the pseudo-header, the type, the rest, the quoted IPv6 header; the
    // ICMP words added once written below.
    let Some(outer) = load::<[Addr; 2]>(ctx, IP6_OFF + 8) else {
        return Err(malformed);
    };
    let mut sum: u32 = addr_neg_sum(&outer[0]) + addr_neg_sum(&outer[1]);
    sum += (!(plen6 as u16).to_be()) as u32 + (!u16::from_ne_bytes([0, IPPROTO_ICMPV6])) as u32;
    sum += (!u16::from_ne_bytes([ty, code])) as u32 + u16::from_ne_bytes([ty4, code4]) as u32;
    sum += (!(rest as u16)) as u32 + (!((rest >> 16) as u16)) as u32;
    let rest4 = rest4.to_be();
    sum += (rest4 & 0xffff) + (rest4 >> 16);
    for w in q_head {
        sum += (!w) as u32;
    }
    sum += addr_neg_sum(endpoint) + addr_neg_sum(client);
    sum += (!ports[0]) as u32 + (!ports[1]) as u32 + backend_port as u32 + nat_port as u32;
    if let (Some(l), Some(n)) = (inner, new_inner) {
        sum += (!l) as u32 + n as u32;
    }
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx.cast(), ERROR_GROWTH as i32) } != 0 {
        return Err(malformed);
    }
    let Some(p) = ptr_at::<[u8; IN_L4_4 + 4]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    let tot4 = (plen6 as u16).to_be_bytes();
    let qlen4 = q_plen.wrapping_add(p4::IP_LEN as u16).to_be_bytes();
    let r = rest4.to_ne_bytes();
    // SAFETY: every offset is inside the checked IN_L4_4 + 4 bytes.
    unsafe {
        p.add(12).cast::<[u8; 2]>().write_unaligned([0x08, 0x00]);
        p.add(IP_OFF).cast::<[u8; 12]>().write_unaligned([
            0x45,
            0,
            tot4[0],
            tot4[1],
            0,
            0,
            // DF, as the gateway's own errors (`icmp::reply_error`).
            0x40,
            0,
            hop - 1,
            IPPROTO_ICMP,
            0,
            0,
        ]);
        p.add(IP_OFF + 12).cast::<u32>().write_unaligned(nat);
        p.add(IP_OFF + 16).cast::<u32>().write_unaligned(backend);
        p.add(OUT_ICMP)
            .cast::<[u8; 8]>()
            .write_unaligned([ty4, code4, 0, 0, r[0], r[1], r[2], r[3]]);
        p.add(IN_IP4).cast::<[u8; 12]>().write_unaligned([
            0x45, q_tos, qlen4[0], qlen4[1], 0, 0, 0x40, 0, q_hop, q_proto, 0, 0,
        ]);
        p.add(IN_IP4 + 12).cast::<u32>().write_unaligned(backend);
        p.add(IN_IP4 + 16).cast::<u32>().write_unaligned(nat);
        p.add(IN_L4_4)
            .cast::<[u16; 2]>()
            .write_unaligned([backend_port, nat_port]);
        let words = |from: usize| {
            let mut s: u32 = 0;
            let mut i = 0;
            while i < 10 {
                s += p.add(from + 2 * i).cast::<u16>().read_unaligned() as u32;
                i += 1;
            }
            s
        };
        let fold = |mut s: u32| {
            s = (s & 0xffff) + (s >> 16);
            s = (s & 0xffff) + (s >> 16);
            s as u16
        };
        let outer_check = !fold(words(IP_OFF));
        p.add(IP_OFF + 10)
            .cast::<u16>()
            .write_unaligned(outer_check);
        let quoted_check = !fold(words(IN_IP4));
        p.add(IN_IP4 + 10)
            .cast::<u16>()
            .write_unaligned(quoted_check);
        // The quoted IPv4 header, checksum included, joins the ICMP sum.
        sum += words(IN_IP4);
        p.add(OUT_ICMP + 2)
            .cast::<u16>()
            .write_unaligned(csum::add(ic, sum));
    }
    if let Some(n) = new_inner
        && !store::<u16>(ctx, inner_off6 - ERROR_GROWTH, n)
    {
        return Err(malformed);
    }
    Ok(())
}

/// Routes the ICMP error [`consumer_error`] built to the flow's backend
/// (NAT address → backend, on the provider side) and sends it.
#[inline(never)]
pub fn route_error(ctx: XdpContext, tot_len6: u32) -> u32 {
    use crate::maps::SCRATCH_ICMP;
    let (Some(s), Some(g)) = (SCRATCH_ICMP.get_ptr(0), GLOBAL.get(0)) else {
        return drop(DropReason::IcmpErrorNoFlow, NO_EP);
    };
    // SAFETY: this CPU's slot; map value read only.
    let Some(v) = (unsafe { CT_FWD.get(&(*s).fwd) }) else {
        return drop(DropReason::IcmpErrorNoFlow, NO_EP);
    };
    let tot_len4 = tot_len6 - super::parse::IP6_LEN as u32;
    let mut hop = NextHop {
        src_be: v.nat_addr_be[0],
        dst_be: v.backend_addr_be[0],
        tot_len: tot_len4 as u16,
        provider_ifindex: g.provider_ifindex,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        mtu: 0,
    };
    let ep = v.endpoint_id;
    let routed = forward::route(&ctx, &mut hop);
    if !routed.is_next() {
        return routed.finish(ep);
    }
    if !(store::<[u8; 6]>(&ctx, 0, hop.dmac) && store::<[u8; 6]>(&ctx, 6, hop.smac)) {
        return drop(DropReason::Malformed, ep);
    }
    stats::count_packet(v, tot_len4 as u64, false);
    forward::redirect(hop.ifindex, ep)
}
