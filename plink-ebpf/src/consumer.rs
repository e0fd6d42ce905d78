//! Consumer side: only approved endpoint flows are forwarded; everything else
//! is dropped with a reason (never XDP_PASS: the kernel must not route it).
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_ns, helpers::generated::bpf_redirect,
    programs::XdpContext,
};
use plink_common::{
    CtFwdKey, CtFwdValue, DropReason, EndpointKey, IPPROTO_ICMP, IPPROTO_TCP, IfaceInfo, ep_state,
    flow_expired, icmp_type, role, tcp_state, v4_be,
};

use crate::{
    arp, conntrack,
    fib::{self, NextHop},
    icmp,
    maps::{CT_FWD, ENDPOINTS, GLOBAL, INTERFACES, SCRATCH},
    mss,
    parse::{ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, addressed_to_us, ether_type, parse_ipv4, store},
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
    // Step 2: endpoint lookup.
    let ep_key = EndpointKey {
        network_id,
        addr_be: v4_be(f.dst_be),
        port_be: f.dport_be,
        proto: f.proto,
        _pad: 0,
    };
    // SAFETY: map value copied out.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ep_key) }).copied() else {
        return drop(DropReason::NoEndpoint, NO_EP);
    };
    match ep.state {
        ep_state::APPROVED => {}
        ep_state::PENDING => return drop(DropReason::EndpointPending, ep.endpoint_id),
        ep_state::REJECTED => return drop(DropReason::EndpointRejected, ep.endpoint_id),
        _ => return drop(DropReason::EndpointRemoved, ep.endpoint_id),
    }
    // A packet that cannot be forwarded opens no flow: time exceeded comes
    // back from the endpoint address (the consumer's view of the next hop).
    if f.ttl <= 1 {
        return icmp::reply_error(
            XdpContext { ctx: ctx.ctx },
            icmp::TIME_EXCEEDED,
            0,
            ep.endpoint_id,
        );
    }
    let Some(g) = GLOBAL.get(0) else {
        return drop(DropReason::FibFailed, ep.endpoint_id);
    };
    // Step 3: conntrack.
    let key = CtFwdKey {
        src_addr_be: v4_be(f.src_be),
        dst_addr_be: v4_be(f.dst_be),
        network_id,
        src_port_be: f.sport_be,
        dst_port_be: f.dport_be,
        proto: f.proto,
        _pad: [0; 3],
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // What this packet did to conntrack: a flow it created is released again
    // if the packet cannot leave (a flow is opened only by a packet that is
    // forwarded); a restarted expired flow is counted only then.
    let mut opened = Opened::No;
    let v: *mut CtFwdValue = match CT_FWD.get_ptr_mut(&key) {
        // SAFETY: map value pointer, valid for this program run.
        Some(v) if !flow_expired(unsafe { &*v }, now, &g.timeouts) => v,
        found => {
            if !conntrack::opens_flow(f.proto, f.tcp_flags) {
                return drop(DropReason::TcpNoFlow, ep.endpoint_id);
            }
            match found {
                // An expired flow that the GC has not removed yet keeps its
                // mapping (and its place in the caps): it restarts.
                Some(v) => {
                    opened = Opened::Restarted;
                    v
                }
                None => {
                    let rc = conntrack::new_flow(XdpContext { ctx: ctx.ctx }, &key, &ep, now);
                    if rc == conntrack::CREATED {
                        opened = Opened::Created;
                    } else if rc != conntrack::RACE_LOST {
                        let r = DropReason::from_index(rc - 1).unwrap_or(DropReason::ConntrackFull);
                        return drop(r, ep.endpoint_id);
                    }
                    match CT_FWD.get_ptr_mut(&key) {
                        Some(v) => v,
                        None => return drop(DropReason::CtBroken, ep.endpoint_id),
                    }
                }
            }
        }
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
    if !conntrack::entry_is(v, &key) {
        return drop(DropReason::CtBroken, ep.endpoint_id);
    }
    // Step 5 before 4: route first, so a drop leaves the packet untouched.
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
            conntrack::release(&key, ep.endpoint_id);
        }
        if rc == DropReason::FragNeeded as u32 + 1 {
            // Path MTU discovery: the consumer learns the provider side's MTU.
            return icmp::reply_error(
                XdpContext { ctx: ctx.ctx },
                icmp::FRAG_NEEDED,
                hop.mtu as u32,
                ep.endpoint_id,
            );
        }
        return match DropReason::from_index(rc - 1) {
            Some(r) => drop(r, ep.endpoint_id),
            None => drop(DropReason::FibFailed, ep.endpoint_id),
        };
    }
    // Only a packet that leaves refreshes the flow and moves its TCP state.
    v.last_seen_ns = now;
    if f.proto == IPPROTO_TCP {
        v.tcp_state = if opened == Opened::No {
            conntrack::tcp_forward(v.tcp_state, f.tcp_flags)
        } else {
            tcp_state::SYN_SENT
        };
    }
    if opened != Opened::No {
        stats::count_flow_created(v);
    }
    // Step 4: rewrite.
    let nat = Nat {
        smac: hop.smac,
        dmac: hop.dmac,
        ..m
    };
    if !rewrite(ctx, &f, &nat) {
        return drop(DropReason::Malformed, ep.endpoint_id);
    }
    mss::on_syn(ctx, &f, v.service_id, ep.endpoint_id, hop.ifindex, mss::IN);
    stats::count_packet(v, f.tot_len as u64, false);
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(hop.ifindex, 0) } as u32;
    if action != xdp_action::XDP_REDIRECT {
        return drop(DropReason::RedirectFailed, ep.endpoint_id);
    }
    action
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
