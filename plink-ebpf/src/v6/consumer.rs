//! IPv6 on consumer interfaces: neighbour solicitations for endpoint
//! addresses are answered, approved endpoint flows are translated (NAT66)
//! and routed to the provider side; everything else is dropped with a
//! reason (never XDP_PASS, as for IPv4).
//!
//! As for IPv4, conntrack comes first: an established flow of an unchanged,
//! approved endpoint whose cached next hop is current is rewritten and
//! redirected with no endpoint or route lookup ([`established`]); every
//! other packet takes the slow path (endpoint, open, route, which caches
//! the next hop in the flow). No PROXY protocol for IPv6. A packet that
//! cannot be forwarded is answered (Packet Too Big, Time Exceeded:
//! `v6::icmp`).
use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext};
use plink_common::{
    CtFwdKey, CtFwdValue, DropReason, EndpointValue, GlobalConfig, IPPROTO_TCP, flow_expired,
    flow_flags, flow_hash, last_seen_moved, role, tcp_state,
};

use super::{
    ANSWER, Flow6, NextHop6, icmp, nd,
    parse::{DstMac, ICMP6_ECHO_REQUEST, IPPROTO_ICMPV6, ND_NEIGHBOR_SOLICIT, dst_mac, parse_ipv6},
    rewrite::{Nat6, rewrite6},
    route6,
};
use crate::{
    conntrack, endpoint, flowlog, forward, limits,
    maps::{CT_FWD, GLOBAL, INTERFACES, SCRATCH_V6},
    scratch::Work6,
    stats::{self, NO_EP, drop},
};

/// [`handle`]'s verdict for a packet of an endpoint flow, parsed into this
/// CPU's `SCRATCH_V6`: [`forward`] takes it on.
pub const FORWARD: u32 = u32::MAX;

/// [`forward`]'s verdict for a packet of a NAT64 flow (its backend is
/// IPv4), open and parsed into this CPU's `SCRATCH_V6`: `v6::nat64` takes
/// it on.
pub const NAT64: u32 = u32::MAX - 3;

/// [`handle`]'s verdict for an ICMPv6 error (parsed into the scratch
/// slot): `v6::icmp::consumer_error` takes it on.
pub const ERROR: u32 = u32::MAX - 2;

/// Everything but the flow: interface, MAC, parse, neighbour discovery.
/// Returns the verdict, or [`FORWARD`].
// Out of line, as the steps of `forward`: each call chain (this one, the
// new-flow one, the route one) then has the 512-byte stack to itself.
#[inline(never)]
pub fn handle(ctx: XdpContext) -> u32 {
    let ctx = &ctx;
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: map value copied out.
    let iface = match unsafe { INTERFACES.get(&ifindex) }.copied() {
        Some(i) if i.role == role::CONSUMER => i,
        _ => return drop(DropReason::UnknownInterface, NO_EP),
    };
    // Multicast frames are let through for neighbour solicitations only.
    let multicast = match dst_mac(ctx, &iface.mac) {
        DstMac::Us => false,
        DstMac::Multicast => true,
        DstMac::Other => return drop(DropReason::OtherHost, NO_EP),
    };
    let Some(w) = SCRATCH_V6.get_ptr_mut(0) else {
        return drop(DropReason::Malformed, NO_EP);
    };
    // SAFETY: this CPU's scratch slot; XDP runs to completion.
    let w = unsafe { &mut *w };
    w.f = match parse_ipv6(ctx) {
        Ok(f) => f,
        Err(r) => return drop(r, NO_EP),
    };
    let f = &w.f;
    if f.proto == IPPROTO_ICMPV6 {
        if f.tcp_flags == ND_NEIGHBOR_SOLICIT {
            let s = nd::solicitation(
                XdpContext { ctx: ctx.ctx },
                f,
                &iface,
                role::CONSUMER as u32,
            );
            if s.is_next() {
                return nd::not_ours_consumer();
            }
            return s.finish(NO_EP);
        }
        if multicast {
            return drop(DropReason::OtherHost, NO_EP);
        }
        if icmp::is_error(f.tcp_flags) {
            // From a consumer-side router, about a reply.
            return ERROR;
        }
        if f.tcp_flags != ICMP6_ECHO_REQUEST {
            return drop(DropReason::IcmpUnsupported, NO_EP);
        }
    } else if multicast {
        return drop(DropReason::OtherHost, NO_EP);
    }
    w.key = CtFwdKey {
        src_addr_be: f.src,
        dst_addr_be: f.dst,
        network_id: iface.network_id,
        src_port_be: f.sport_be,
        dst_port_be: f.dport_be,
        proto: f.proto,
        _pad: [0; 3],
    };
    FORWARD
}

/// An endpoint flow's packet: the endpoint and the flow (used, restarted
/// or created), then the route, the rewrite and the redirect.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    let v = established(XdpContext { ctx: ctx.ctx });
    if v != FORWARD {
        return v;
    }
    let v = open_flow(XdpContext { ctx: ctx.ctx });
    if v != FORWARD {
        return v;
    }
    emit_flow(XdpContext { ctx: ctx.ctx })
}

/// The fast path (the IPv4 consumer's `established`): an established IPv6
/// flow (NAT66) of an unchanged, approved endpoint whose cached next hop is
/// current and fits the packet is rewritten and redirected with no endpoint
/// or route lookup. Returns the verdict, or [`FORWARD`] (nothing changed)
/// for the slow path.
#[inline(never)]
fn established(ctx: XdpContext) -> u32 {
    let Some(w) = work() else {
        return FORWARD;
    };
    let Some(v) = CT_FWD.get_ptr_mut(&w.key) else {
        return FORWARD;
    };
    let Some(g) = GLOBAL.get(0) else {
        return FORWARD;
    };
    // SAFETY: map value pointer; benign races as in the IPv4 path.
    let v = unsafe { &mut *v };
    let f = &w.f;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // A NAT64 flow's packet leaves as IPv4, 20 bytes shorter.
    let nat64 = v.flags & flow_flags::NAT64 != 0;
    let out_len = if nat64 {
        f.tot_len.wrapping_sub(super::nat64::GROWTH as u16)
    } else {
        f.tot_len
    };
    if flow_expired(v, now, &g.timeouts)
        || !endpoint::current(v)
        || f.hop <= 1
        || !crate::consumer::hop_cached(v, g, out_len)
        // SYNs take the slow path (as for IPv4).
        || (f.proto == IPPROTO_TCP && f.tcp_flags & crate::parse::TCP_SYN != 0)
    {
        return FORWARD;
    }
    // Read first, check second (see the IPv4 consumer).
    let nat = Nat6 {
        src: v.nat_addr_be,
        dst: v.backend_addr_be,
        sport_be: v.nat_port_be,
        dport_be: v.backend_port_be,
        smac: v.hop_smac,
        dmac: v.hop_dmac,
    };
    let egress = v.hop_ifindex;
    if !conntrack::entry_is(v, flow_hash(&w.key)) {
        return FORWARD;
    }
    if last_seen_moved(v.last_seen_ns, now) {
        v.last_seen_ns = now;
    }
    if f.proto == IPPROTO_TCP {
        let state = conntrack::tcp_forward(v.tcp_state, f.tcp_flags);
        if state != v.tcp_state {
            v.tcp_state = state;
        }
    }
    let rewritten = if nat64 {
        super::nat64::rewrite_cached(&ctx, f, &nat)
    } else {
        rewrite6(&ctx, f, &nat)
    };
    if !rewritten {
        return drop(DropReason::Malformed, v.endpoint_id);
    }
    leave(v, f.tot_len, egress, v.endpoint_id)
}

/// The scratch slot `handle` filled.
#[inline(always)]
fn work() -> Option<&'static mut Work6> {
    // SAFETY: this CPU's scratch slot; XDP runs to completion.
    SCRATCH_V6.get_ptr_mut(0).map(|w| unsafe { &mut *w })
}

/// The endpoint and the flow: [`FORWARD`] with the flow open (what the
/// packet did to conntrack in the scratch slot), or the verdict.
#[inline(never)]
fn open_flow(ctx: XdpContext) -> u32 {
    let Some(w) = work() else {
        return drop(DropReason::Malformed, NO_EP);
    };
    let ep = match endpoint::lookup_key(&w.key) {
        Ok(ep) => ep,
        Err((s, id)) => return s.finish(id),
    };
    // A packet that cannot be forwarded opens no flow: time exceeded comes
    // back from the endpoint address (the consumer's view of the next hop).
    if w.f.hop <= 1 {
        w.err_type = icmp::TIME_EXCEEDED;
        w.err_mtu = 0;
        w.endpoint_id = ep.endpoint_id;
        return ANSWER;
    }
    let Some(g) = GLOBAL.get(0) else {
        return drop(DropReason::FibFailed, ep.endpoint_id);
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let opening = open(&ctx, w.f.proto, w.f.tcp_flags, &w.key, &ep, now, g);
    // End records of logged flows the datapath removed on the way.
    flowlog::flush_victim();
    match opening {
        Ok((_, opened)) => {
            w.now = now;
            w.opened = opened as u8;
            w.endpoint_id = ep.endpoint_id;
            FORWARD
        }
        Err(action) => action,
    }
}

/// The open flow's packet: route, rewrite, count, redirect.
#[inline(never)]
fn emit_flow(ctx: XdpContext) -> u32 {
    let Some(w) = work() else {
        return drop(DropReason::Malformed, NO_EP);
    };
    let (f, key, now, endpoint_id) = (&w.f, &w.key, w.now, w.endpoint_id);
    let opened = w.opened;
    let Some(v) = CT_FWD.get_ptr_mut(key) else {
        return drop(DropReason::CtBroken, endpoint_id);
    };
    let Some(g) = GLOBAL.get(0) else {
        return drop(DropReason::FibFailed, endpoint_id);
    };
    // SAFETY: map value pointer; benign races as in the IPv4 path.
    let v = unsafe { &mut *v };
    // Read first, check second (see the IPv4 consumer).
    let mut hop = NextHop6 {
        src: v.nat_addr_be,
        dst: v.backend_addr_be,
        tot_len: f.tot_len,
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
    if v.flags & flow_flags::NAT64 != 0 {
        return NAT64;
    }
    let routed = route6(&ctx, &mut hop);
    if !routed.is_next() {
        // The packet does not leave: the flow it opened is not kept.
        if opened == Opened::Created as u8 {
            conntrack::release(key, endpoint_id);
        }
        if routed.reason() == Some(DropReason::FragNeeded) {
            // Path MTU discovery: the consumer learns the provider side's
            // MTU (Packet Too Big from the endpoint address).
            w.err_type = icmp::PACKET_TOO_BIG;
            w.err_mtu = hop.mtu as u32;
            return ANSWER;
        }
        return routed.finish(endpoint_id);
    }
    cache_hop(v, g.hop_gen, hop.ifindex, hop.mtu, hop.smac, hop.dmac);
    commit(v, f, key, opened, now);
    let nat = Nat6 {
        src: hop.src,
        dst: hop.dst,
        sport_be,
        dport_be,
        smac: hop.smac,
        dmac: hop.dmac,
    };
    if !rewrite6(&ctx, f, &nat) {
        return drop(DropReason::Malformed, endpoint_id);
    }
    crate::mss::on_tcp_syn(
        &ctx,
        f.proto,
        f.tcp_flags,
        v.service_id,
        endpoint_id,
        hop.ifindex,
        crate::mss::IN | crate::mss::V6,
    );
    leave(v, f.tot_len, hop.ifindex, endpoint_id)
}

/// Caches a flow's next hop for the fast path ([`established`]): the
/// generation last, so a reader that sees it sees the hop it names.
#[inline(always)]
pub fn cache_hop(
    v: &mut CtFwdValue,
    hop_gen: u32,
    ifindex: u32,
    mtu: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
) {
    v.hop_ifindex = ifindex;
    v.hop_mtu = mtu;
    v.hop_smac = smac;
    v.hop_dmac = dmac;
    // SAFETY: writing a field of the map value we hold.
    unsafe { core::ptr::write_volatile(&raw mut v.hop_gen, hop_gen) };
}

/// A consumer packet of flow `v` (`tot_len` bytes as it came) leaves by
/// `egress`: counted (and flow-logged) and redirected.
#[inline(always)]
pub fn leave(v: &CtFwdValue, tot_len: u16, egress: u32, endpoint_id: u32) -> u32 {
    stats::count_packet(v, tot_len as u64, false);
    if flowlog::logged(v) {
        flowlog::count(v, tot_len as u64, false);
    }
    forward::redirect(egress, endpoint_id)
}

/// What a packet that leaves does to its open flow (`opened`, an
/// [`Opened`]): last seen, TCP state, and a fresh flow's count and log.
#[inline(always)]
pub fn commit(v: &mut CtFwdValue, f: &Flow6, key: &CtFwdKey, opened: u8, now: u64) {
    let fresh = opened != Opened::No as u8;
    if fresh || last_seen_moved(v.last_seen_ns, now) {
        v.last_seen_ns = now;
    }
    if f.proto == IPPROTO_TCP {
        let state = if fresh {
            tcp_state::SYN_SENT
        } else {
            conntrack::tcp_forward(v.tcp_state, f.tcp_flags)
        };
        if state != v.tcp_state {
            v.tcp_state = state;
        }
    }
    if fresh {
        stats::count_flow_created(v);
        flowlog::fresh(key, v, opened == Opened::Restarted as u8, now);
    }
}

/// What a consumer packet did to conntrack (as in the IPv4 consumer).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opened {
    No,
    Created,
    Restarted,
}

/// The flow of `key` for endpoint `ep`: used (current), restarted
/// (expired, not yet collected) or created; or the packet's verdict. The
/// IPv4 consumer's `open`, for a flow looked up here.
#[inline(always)]
fn open(
    ctx: &XdpContext,
    proto: u8,
    tcp_flags: u8,
    key: &CtFwdKey,
    ep: &EndpointValue,
    now: u64,
    g: &GlobalConfig,
) -> Result<(*mut CtFwdValue, Opened), u32> {
    let opens = conntrack::opens_flow(proto, tcp_flags);
    if let Some(v) = CT_FWD.get_ptr_mut(key) {
        // SAFETY: map value pointer, read only here.
        let vr = unsafe { &*v };
        if vr.endpoint_id == ep.endpoint_id && vr.ep_gen == endpoint::generation(ep.endpoint_id) {
            if !flow_expired(vr, now, &g.timeouts) {
                return Ok((v, Opened::No));
            }
            if !opens {
                return Err(drop(DropReason::TcpNoFlow, ep.endpoint_id));
            }
            return Ok((v, Opened::Restarted));
        }
        conntrack::evict(key, vr, plink_common::flow_end_reason::EVICTED);
    }
    if !opens {
        return Err(drop(DropReason::TcpNoFlow, ep.endpoint_id));
    }
    if let Err(r) = limits::admit(ep, now) {
        stats::count_refusal(ep.endpoint_id, ep.service_id, r);
        return Err(drop(r, ep.endpoint_id));
    }
    let created = conntrack::new_flow::<true>(XdpContext { ctx: ctx.ctx }, key, ep, now);
    let opened = if created.is_next() {
        Opened::Created
    } else if created == conntrack::RACE_LOST {
        Opened::No
    } else {
        return Err(created.finish(ep.endpoint_id));
    };
    match CT_FWD.get_ptr_mut(key) {
        Some(v) => Ok((v, opened)),
        None => Err(drop(DropReason::CtBroken, ep.endpoint_id)),
    }
}
