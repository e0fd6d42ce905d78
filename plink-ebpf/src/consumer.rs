//! Consumer side: only approved endpoint flows are forwarded; everything else
//! is dropped with a reason (never XDP_PASS: the kernel must not route it).
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns,
    helpers::generated::bpf_redirect, programs::XdpContext,
};
use plink_common::{
    CtFwdKey, CtFwdValue, DropReason, EndpointKey, GlobalConfig, IPPROTO_ICMP, IPPROTO_TCP,
    IfaceInfo, ep_state, flow_expired, flow_hash, icmp_type, last_seen_moved, role, tcp_state,
    v4_be,
};

use crate::{
    arp, conntrack,
    fib::{self, NextHop},
    icmp,
    maps::{CT_FWD, ENDPOINTS, EP_GEN, GLOBAL, INTERFACES, SCRATCH},
    mss,
    parse::{
        ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Flow, TCP_SYN, addressed_to_us, ether_type, parse_ipv4,
        store,
    },
    rewrite::{Nat, rewrite},
    stats::{self, NO_EP, drop},
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
        Some(ETH_P_IPV6) => drop(DropReason::Ipv6, NO_EP),
        Some(_) => drop(DropReason::UnsupportedEthertype, NO_EP),
        None => drop(DropReason::Malformed, NO_EP),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, iface: Option<IfaceInfo>) -> u32 {
    // Step 0: the interface must be a consumer interface we were told about.
    let network_id = match iface {
        Some(i) if i.role == role::CONSUMER => i.network_id,
        _ => return drop(DropReason::UnknownInterface, NO_EP),
    };
    // Step 1: parse.
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
    // Step 2: conntrack first, keyed by (consumer network, 5-tuple). An
    // established flow of an unchanged, approved endpoint answers everything
    // the packet needs; the endpoint is looked up only for the others.
    let key = CtFwdKey {
        src_addr_be: v4_be(f.src_be),
        dst_addr_be: v4_be(f.dst_be),
        network_id,
        src_port_be: f.sport_be,
        dst_port_be: f.dport_be,
        proto: f.proto,
        _pad: [0; 3],
    };
    let Some(g) = GLOBAL.get(0) else {
        return drop(DropReason::FibFailed, NO_EP);
    };
    // SAFETY: helper without arguments. The coarse clock (one jiffy) is
    // what the expiry rule's slack allows for.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let found = CT_FWD.get_ptr_mut(&key);
    if let Some(v) = found {
        let action = established(XdpContext { ctx: ctx.ctx }, &f, &key, v);
        if action != NOT_ESTABLISHED {
            return action;
        }
    }
    // Step 2b, the slow path: a new, restarted or changed flow, or one
    // whose next hop must be looked up.
    let (v, opened) = match open(ctx, &f, &key, found, now, g) {
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
    // Step 3: the next hop, before any rewrite so that a drop leaves the
    // packet untouched: the flow's cached hop while the provider side's
    // routes and neighbours are unchanged and the packet fits its MTU,
    // else a route lookup (which also answers "fragmentation needed").
    if !(v.hop_gen == g.hop_gen && v.hop_gen != 0 && f.tot_len <= v.hop_mtu) {
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
        let rc = fib::lookup(ctx, &mut hop);
        if rc != 0 {
            // The packet does not leave: the flow it opened is not kept.
            if opened == Opened::Created {
                conntrack::release(&key, endpoint_id);
            }
            if rc == DropReason::FragNeeded as u32 + 1 {
                // Path MTU discovery: the consumer learns the provider side's MTU.
                return icmp::reply_error(
                    XdpContext { ctx: ctx.ctx },
                    icmp::FRAG_NEEDED,
                    hop.mtu as u32,
                    endpoint_id,
                );
            }
            return match DropReason::from_index(rc - 1) {
                Some(r) => drop(r, endpoint_id),
                None => drop(DropReason::FibFailed, endpoint_id),
            };
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
    }
    // Step 4: rewrite and redirect.
    let egress = v.hop_ifindex;
    let nat = Nat {
        smac: v.hop_smac,
        dmac: v.hop_dmac,
        ..m
    };
    emit::<true>(ctx, &f, &nat, v, egress)
}

/// [`established`]'s answer for a packet it leaves to the slow path.
const NOT_ESTABLISHED: u32 = u32::MAX;

/// The fast path: an established flow of an unchanged, approved endpoint
/// whose cached next hop is current and fits the packet is rewritten and
/// redirected with no other lookup; returns the verdict, or
/// [`NOT_ESTABLISHED`] (nothing changed) for the slow path to decide.
// Out of line, returning one value for every way it declines: the verifier
// then continues the slow path from one state instead of one per check.
#[inline(never)]
fn established(ctx: XdpContext, f: &Flow, key: &CtFwdKey, v: *mut CtFwdValue) -> u32 {
    let Some(g) = GLOBAL.get(0) else {
        return NOT_ESTABLISHED;
    };
    // SAFETY: map value pointer, valid for this program run; concurrent
    // CPUs write the same fields with the same kind of values.
    let v = unsafe { &mut *v };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if flow_expired(v, now, &g.timeouts)
        || !conntrack::endpoint_current(v)
        || f.ttl <= 1
        || v.hop_gen != g.hop_gen
        || v.hop_gen == 0
        || f.tot_len > v.hop_mtu
        // SYNs (MSS clamping) take the slow path: the option walk's stack
        // does not fit on top of this function's.
        || (f.proto == IPPROTO_TCP && f.tcp_flags & TCP_SYN != 0)
    {
        return NOT_ESTABLISHED;
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
        return NOT_ESTABLISHED;
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
    emit::<false>(&ctx, f, &nat, v, egress)
}

/// Rewrites the packet with `nat`, counts it against the flow `v` and
/// redirects it to `egress`: the last steps of both paths (`SYNS`: the
/// packet may be a SYN, whose MSS is clamped).
#[inline(always)]
fn emit<const SYNS: bool>(
    ctx: &XdpContext,
    f: &Flow,
    nat: &Nat,
    v: &CtFwdValue,
    egress: u32,
) -> u32 {
    if !rewrite(ctx, f, nat) {
        return drop(DropReason::Malformed, v.endpoint_id);
    }
    if SYNS {
        mss::on_syn(ctx, f, v.service_id, v.endpoint_id, egress, mss::IN);
    }
    stats::count_packet(v, f.tot_len as u64, false);
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(egress, 0) } as u32;
    if action != xdp_action::XDP_REDIRECT {
        return drop(DropReason::RedirectFailed, v.endpoint_id);
    }
    action
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
    let ep_key = EndpointKey {
        network_id: key.network_id,
        addr_be: key.dst_addr_be,
        port_be: f.dport_be,
        proto: f.proto,
        _pad: 0,
    };
    // SAFETY: map value copied out.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ep_key) }).copied() else {
        return Err(drop(DropReason::NoEndpoint, NO_EP));
    };
    match ep.state {
        ep_state::APPROVED => {}
        ep_state::PENDING => return Err(drop(DropReason::EndpointPending, ep.endpoint_id)),
        ep_state::REJECTED => return Err(drop(DropReason::EndpointRejected, ep.endpoint_id)),
        _ => return Err(drop(DropReason::EndpointRemoved, ep.endpoint_id)),
    }
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
        let gen_id = EP_GEN.get(ep.endpoint_id).map_or(0, |e| e.gen_id);
        if vr.endpoint_id == ep.endpoint_id && vr.ep_gen == gen_id {
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
        conntrack::evict(key, vr);
    }
    if !opens {
        return Err(drop(DropReason::TcpNoFlow, ep.endpoint_id));
    }
    let rc = conntrack::new_flow(XdpContext { ctx: ctx.ctx }, key, &ep, now);
    let opened = if rc == conntrack::CREATED {
        Opened::Created
    } else if rc == conntrack::RACE_LOST {
        Opened::No
    } else {
        let r = DropReason::from_index(rc - 1).unwrap_or(DropReason::ConntrackFull);
        return Err(drop(r, ep.endpoint_id));
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
    let rc = icmp::consumer_error(XdpContext { ctx: ctx.ctx }, network_id, tot_len as u32);
    if rc != 0 {
        return rc;
    }
    let (Some(s), Some(g)) = (SCRATCH.get_ptr(0), GLOBAL.get(0)) else {
        return drop(DropReason::FibFailed, NO_EP);
    };
    // SAFETY: this CPU's scratch slot, just written by consumer_error.
    let (src_be, dst_be, ep) = unsafe {
        (
            (*s).rev.nat_addr_be[0],
            (*s).rev.backend_addr_be[0],
            (*s).v.endpoint_id,
        )
    };
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
    let rc = fib::lookup(ctx, &mut hop);
    if rc != 0 {
        return drop(
            DropReason::from_index(rc - 1).unwrap_or(DropReason::FibFailed),
            ep,
        );
    }
    if !(store::<[u8; 6]>(ctx, 0, hop.dmac) && store::<[u8; 6]>(ctx, 6, hop.smac)) {
        return drop(DropReason::Malformed, ep);
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(hop.ifindex, 0) } as u32;
    if action != xdp_action::XDP_REDIRECT {
        return drop(DropReason::RedirectFailed, ep);
    }
    action
}
