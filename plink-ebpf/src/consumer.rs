//! Consumer side: only approved endpoint flows are forwarded; everything else
//! is dropped with a reason (never XDP_PASS: the kernel must not route it).
//!
//! The steps of an IPv4 packet, in order: the ingress interface (a consumer
//! interface, which names the consumer network), parse, conntrack (the
//! established fast path), the endpoint (for every other packet), open or
//! restart the flow, the next hop (cached or routed), rewrite, count,
//! redirect.
use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext};
use plink_common::{
    CtFwdKey, CtFwdValue, DropReason, GlobalConfig, IPPROTO_ICMP, IPPROTO_TCP, IfaceInfo,
    flow_expired, flow_hash, icmp_type, last_seen_moved, role, tcp_state, v4_be, v6_prog,
};

use crate::{
    arp, conntrack, endpoint, flowlog,
    forward::{self, NextHop},
    icmp, limits,
    maps::{CT_FWD, GLOBAL, INTERFACES, SCRATCH_ICMP, V6_PROGS},
    mss,
    parse::{
        ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Flow, TCP_SYN, addressed_to_us, ether_type, parse_ipv4,
        store,
    },
    proxy,
    rewrite::{Nat, rewrite},
    stats::{self, NO_EP, drop},
    step::{Step, step},
};

#[inline(always)]
pub fn handle(ctx: &XdpContext, ifindex: u32) -> u32 {
    // One lookup of the ingress interface serves the MAC check and step 0.
    // SAFETY: map value copied out.
    let iface = unsafe { INTERFACES.get(&ifindex) }.copied();
    match ether_type(ctx) {
        Some(t @ (ETH_P_IP | ETH_P_ARP))
            if !addressed_to_us(ctx, iface.as_ref(), role::CONSUMER, t) =>
        {
            drop(DropReason::OtherHost, NO_EP)
        }
        Some(ETH_P_IP) => ipv4(ctx, iface),
        Some(ETH_P_ARP) => arp::handle(XdpContext { ctx: ctx.ctx }, ifindex, role::CONSUMER as u32),
        Some(ETH_P_IPV6) => {
            // SAFETY: tail call into the IPv6 program; returns only when its
            // slot is empty (a controller that did not fill it).
            unsafe { V6_PROGS.tail_call(ctx, v6_prog::CONSUMER) };
            drop(DropReason::Ipv6, NO_EP)
        }
        Some(_) => drop(DropReason::UnsupportedEthertype, NO_EP),
        None => drop(DropReason::Malformed, NO_EP),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, iface: Option<IfaceInfo>) -> u32 {
    // Interface: a consumer interface we were told about.
    let network_id = match iface {
        Some(i) if i.role == role::CONSUMER => i.network_id,
        _ => return drop(DropReason::UnknownInterface, NO_EP),
    };
    // Parse.
    let f = match parse_ipv4(ctx) {
        Ok(f) => f,
        Err(r) => return drop(r, NO_EP),
    };
    // Only echo requests open or use ICMP flows from a consumer; errors about
    // a reply (from a router in front of the client) go on to the backend.
    if f.proto == IPPROTO_ICMP && f.tcp_flags != icmp_type::ECHO_REQUEST {
        if icmp::is_error(f.tcp_flags) {
            return forward_error(ctx, network_id, f.tot_len);
        }
        return drop(DropReason::IcmpUnsupported, NO_EP);
    }
    let key = CtFwdKey {
        src_addr_be: v4_be(f.src_be),
        dst_addr_be: v4_be(f.dst_be),
        network_id,
        src_port_be: f.sport_be,
        dst_port_be: f.dport_be,
        proto: f.proto,
        _pad: [0; 3],
    };
    // Conntrack first: an established flow of an unchanged, approved
    // endpoint answers everything the packet needs.
    let found = CT_FWD.get_ptr_mut(&key);
    if let Some(v) = found {
        step!(established(XdpContext { ctx: ctx.ctx }, &f, &key, v), NO_EP);
    }
    // The slow path: a new, restarted or changed flow, or one whose next
    // hop must be looked up.
    let Some(g) = GLOBAL.get(0) else {
        return drop(DropReason::FibFailed, NO_EP);
    };
    // SAFETY: helper without arguments. The coarse clock (one jiffy) is
    // what the expiry rule's slack allows for.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let opening = open(ctx, &f, &key, found, now, g);
    // End records of logged flows the datapath removed on the way.
    flowlog::flush_victim();
    let (v, opened) = match opening {
        Ok(o) => o,
        Err(action) => return action,
    };
    // SAFETY: map value pointer; concurrent CPUs write the same fields with
    // the same kind of values (benign races, as in every XDP conntrack).
    let v = unsafe { &mut *v };
    // The mapping is read once, then the entry's key is checked: a
    // preallocated hash element deleted by the GC after our lookup can be
    // reused at once by another CPU's insert for another flow, and its
    // mapping must never rewrite this packet. Read first, check second: a
    // reuse after the check can only touch the other flow's freshness below.
    let m = Nat {
        src_be: v.nat_addr_be[0],
        dst_be: v.backend_addr_be[0],
        sport_be: v.nat_port_be,
        dport_be: v.backend_port_be,
        smac: [0; 6],
        dmac: [0; 6],
    };
    let endpoint_id = v.endpoint_id;
    if !conntrack::entry_is(v, flow_hash(&key)) {
        return drop(DropReason::CtBroken, endpoint_id);
    }
    // Next hop, before any rewrite so that a drop leaves the packet
    // untouched: the cached one if current and the packet fits its MTU,
    // else a route lookup (which also answers "fragmentation needed").
    if !hop_cached(v, g, f.tot_len) {
        let mut hop = NextHop {
            src_be: m.src_be,
            dst_be: m.dst_be,
            tot_len: f.tot_len,
            provider_ifindex: g.provider_ifindex,
            ifindex: 0,
            smac: [0; 6],
            dmac: [0; 6],
            mtu: 0,
        };
        let routed = forward::route(ctx, &mut hop);
        if !routed.is_next() {
            // The packet does not leave: the flow it opened is not kept.
            if opened == Opened::Created {
                conntrack::release(&key, endpoint_id);
            }
            if routed.reason() == Some(DropReason::FragNeeded) {
                // Path MTU discovery: the consumer learns the provider side's MTU.
                return icmp::reply_error(
                    XdpContext { ctx: ctx.ctx },
                    icmp::FRAG_NEEDED,
                    hop.mtu as u32,
                    endpoint_id,
                );
            }
            return routed.finish(endpoint_id);
        }
        v.hop_ifindex = hop.ifindex;
        v.hop_mtu = hop.mtu;
        v.hop_smac = hop.smac;
        v.hop_dmac = hop.dmac;
        // Last: a reader that sees the generation sees the hop it names.
        // SAFETY: writing a field of the map value we hold.
        unsafe { core::ptr::write_volatile(&raw mut v.hop_gen, g.hop_gen) };
    }
    // From here on the hop is read from the flow entry whichever way it got
    // there, so that the verifier sees one state, not one per way.
    let fresh = opened != Opened::No;
    // Only a packet that leaves refreshes the flow and moves its TCP state,
    // and it writes the entry only where something changed.
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
        flowlog::fresh(&key, v, opened == Opened::Restarted, now);
        if crate::debug::enabled() {
            crate::debug::opened(v);
        }
    }
    let egress = v.hop_ifindex;
    let nat = Nat {
        smac: v.hop_smac,
        dmac: v.hop_dmac,
        ..m
    };
    emit::<true>(ctx, &f, &key, &nat, v, egress)
}

/// Is the flow's cached next hop current (the provider side's routes and
/// neighbours unchanged since) and does the packet fit its MTU?
#[inline(always)]
pub fn hop_cached(v: &CtFwdValue, g: &GlobalConfig, out_len: u16) -> bool {
    v.hop_gen == g.hop_gen && v.hop_gen != 0 && out_len <= v.hop_mtu
}

/// The fast path: an established flow of an unchanged, approved endpoint
/// whose cached next hop is current and fits the packet is rewritten and
/// redirected with no other lookup; returns the verdict, or `NEXT` (nothing
/// changed) for the slow path to decide.
// Out of line, returning one value for every way it declines: the verifier
// then continues the slow path from one state instead of one per check.
#[inline(never)]
fn established(ctx: XdpContext, f: &Flow, key: &CtFwdKey, v: *mut CtFwdValue) -> Step {
    let Some(g) = GLOBAL.get(0) else {
        return Step::NEXT;
    };
    // SAFETY: map value pointer, valid for this program run; concurrent
    // CPUs write the same fields with the same kind of values.
    let v = unsafe { &mut *v };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if flow_expired(v, now, &g.timeouts)
        || !endpoint::current(v)
        || f.ttl <= 1
        || !hop_cached(v, g, f.tot_len)
        // SYNs (MSS clamping) take the slow path: the option walk's stack
        // does not fit on top of this function's.
        || (f.proto == IPPROTO_TCP && f.tcp_flags & TCP_SYN != 0)
        // So does the segment a PROXY header grows (its MTU check).
        || (v.pp_len != 0 && proxy::growth(XdpContext { ctx: ctx.ctx }, proxy::Seg::of(f), v) != 0)
    {
        return Step::NEXT;
    }
    // Read first, check second (see the slow path).
    let nat = Nat {
        src_be: v.nat_addr_be[0],
        dst_be: v.backend_addr_be[0],
        sport_be: v.nat_port_be,
        dport_be: v.backend_port_be,
        smac: v.hop_smac,
        dmac: v.hop_dmac,
    };
    let egress = v.hop_ifindex;
    if !conntrack::entry_is(v, flow_hash(key)) {
        return Step::NEXT;
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
    Step::verdict(emit::<false>(&ctx, f, key, &nat, v, egress))
}

/// Rewrites the packet with `nat`, counts it against the flow `v` and
/// redirects it to `egress`: the last steps of both paths (`SYNS`: the
/// packet may be a SYN, whose MSS is clamped).
#[inline(always)]
fn emit<const SYNS: bool>(
    ctx: &XdpContext,
    f: &Flow,
    key: &CtFwdKey,
    nat: &Nat,
    v: &mut CtFwdValue,
    egress: u32,
) -> u32 {
    // PROXY protocol (slow path): a client SYN tells the flow where the
    // client's bytes start; the segment that will carry the header must
    // fit the next hop grown. Asked of the client's own segment, before
    // the rewrite (a "fragmentation needed" quotes it).
    if SYNS && (v.pp_len != 0 || f.tcp_flags & TCP_SYN != 0) && f.proto == IPPROTO_TCP {
        let s = proxy::before_rewrite(XdpContext { ctx: ctx.ctx }, proxy::Seg::of(f), v);
        if let Some(mtu) = s.other_code() {
            return icmp::reply_error(
                XdpContext { ctx: ctx.ctx },
                icmp::FRAG_NEEDED,
                mtu,
                v.endpoint_id,
            );
        }
        if !s.is_next() {
            return s.finish(v.endpoint_id);
        }
    }
    if !rewrite(ctx, f, nat) {
        return drop(DropReason::Malformed, v.endpoint_id);
    }
    if v.pp_len != 0 {
        // The slow path may grow the segment; the fast path never does.
        let s = if SYNS {
            proxy::client_segment(XdpContext { ctx: ctx.ctx }, proxy::Seg::of(f), key, v)
        } else {
            proxy::shift_client_seq(ctx, v)
        };
        if !s.is_next() {
            return s.finish(v.endpoint_id);
        }
    }
    if SYNS {
        mss::on_syn(ctx, f, v.service_id, v.endpoint_id, egress, mss::IN, 0);
    }
    stats::count_packet(v, f.tot_len as u64, false);
    if flowlog::logged(v) {
        flowlog::count(v, f.tot_len as u64, false);
    }
    forward::redirect(egress, v.endpoint_id)
}

/// The slow path of a consumer packet that is no established flow: the
/// endpoint it is addressed to decides, then the flow is used (its endpoint
/// is current), restarted (expired) or created (none, or one left by an
/// endpoint that changed, which is removed). Returns the flow entry and what
/// the packet did to conntrack, or the packet's verdict.
#[inline(always)]
fn open(
    ctx: &XdpContext,
    f: &Flow,
    key: &CtFwdKey,
    found: Option<*mut CtFwdValue>,
    now: u64,
    g: &GlobalConfig,
) -> Result<(*mut CtFwdValue, Opened), u32> {
    let ep = endpoint::lookup(f, key).map_err(|(s, ep)| s.finish(ep))?;
    // A packet that cannot be forwarded opens no flow: time exceeded comes
    // back from the endpoint address (the consumer's view of the next hop).
    if f.ttl <= 1 {
        return Err(icmp::reply_error(
            XdpContext { ctx: ctx.ctx },
            icmp::TIME_EXCEEDED,
            0,
            ep.endpoint_id,
        ));
    }
    let opens = conntrack::opens_flow(f.proto, f.tcp_flags);
    if let Some(v) = found {
        // SAFETY: map value pointer, read only here.
        let vr = unsafe { &*v };
        if vr.endpoint_id == ep.endpoint_id && vr.ep_gen == endpoint::generation(ep.endpoint_id) {
            if !flow_expired(vr, now, &g.timeouts) {
                // Current (the generation map lagged the endpoint map).
                return Ok((v, Opened::No));
            }
            if !opens {
                return Err(drop(DropReason::TcpNoFlow, ep.endpoint_id));
            }
            // An expired flow that the GC has not removed yet keeps its
            // mapping (and its place in the caps): it restarts.
            return Ok((v, Opened::Restarted));
        }
        // Left by an endpoint that changed (re-pointed, or its id reused):
        // no flow of this endpoint, and never to be used again.
        conntrack::evict(key, vr, plink_common::flow_end_reason::EVICTED);
    }
    if !opens {
        return Err(drop(DropReason::TcpNoFlow, ep.endpoint_id));
    }
    // The endpoint's caps, here rather than inside `new_flow`: reclaiming an
    // expired flow at the cap takes a call frame the deeper chain lacks.
    if let Err(r) = limits::admit(&ep, now) {
        stats::count_refusal(ep.endpoint_id, ep.service_id, r);
        return Err(drop(r, ep.endpoint_id));
    }
    let created = conntrack::new_flow::<false>(XdpContext { ctx: ctx.ctx }, key, &ep, now);
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

/// What a consumer packet did to conntrack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opened {
    /// Used an established flow.
    No,
    /// Inserted a new flow (released again if the packet cannot leave).
    Created,
    /// Restarted an expired flow the GC had not removed yet.
    Restarted,
}

/// An ICMP error from a consumer-side router about a reply, translated by
/// `icmp::consumer_error`, routed to the backend from here.
#[inline(always)]
fn forward_error(ctx: &XdpContext, network_id: u32, tot_len: u16) -> u32 {
    step!(
        icmp::consumer_error(XdpContext { ctx: ctx.ctx }, network_id, tot_len as u32),
        NO_EP
    );
    let (Some(s), Some(g)) = (SCRATCH_ICMP.get_ptr(0), GLOBAL.get(0)) else {
        return drop(DropReason::FibFailed, NO_EP);
    };
    // SAFETY: this CPU's scratch slot, just written by consumer_error.
    let (src_be, dst_be, ep) = unsafe { ((*s).nat_be, (*s).backend_be, (*s).endpoint_id) };
    let mut hop = NextHop {
        src_be,
        dst_be,
        tot_len,
        provider_ifindex: g.provider_ifindex,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        mtu: 0,
    };
    step!(forward::route(ctx, &mut hop), ep);
    if !(store::<[u8; 6]>(ctx, 0, hop.dmac) && store::<[u8; 6]>(ctx, 6, hop.smac)) {
        return drop(DropReason::Malformed, ep);
    }
    forward::redirect(hop.ifindex, ep)
}
