//! Provider side: replies to NAT addresses go back to their consumer; ARP for
//! NAT addresses is answered; everything else is the gateway's own traffic
//! and passes to the kernel.
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext,
};
use plink_common::{
    CtRevKey, DropReason, IPPROTO_ICMP, IPPROTO_TCP, NatAddrInfo, flow_expired, flow_flags,
    icmp_type, last_seen_moved, nat_addr_flags, role, v4_be, v6_prog,
};

use crate::{
    arp, conntrack, endpoint, flowlog, forward, icmp,
    maps::{CT_FWD, CT_REV, GLOBAL, INTERFACES, NAT_ADDRS, V6_PROGS},
    mss,
    parse::{
        ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IP_DADDR, addressed_to_us, ether_type, load, parse_ipv4,
    },
    pmtu, proxy,
    rewrite::{Nat, rewrite},
    stats::{self, NO_EP, drop},
};

#[inline(always)]
pub fn handle(ctx: &XdpContext, ifindex: u32) -> u32 {
    // Copied out: a map-value pointer kept in an Option is a tagged pointer
    // to LLVM, and the verifier refuses arithmetic on it.
    // SAFETY: map value copied out.
    let iface = unsafe { INTERFACES.get(&ifindex) }.copied();
    match ether_type(ctx) {
        // Not ours to translate or answer: the kernel decides (and drops
        // frames for other hosts).
        Some(t @ (ETH_P_IP | ETH_P_ARP))
            if !addressed_to_us(ctx, iface.as_ref(), role::PROVIDER, t) =>
        {
            xdp_action::XDP_PASS
        }
        Some(ETH_P_IP) => ipv4(ctx),
        Some(ETH_P_ARP) => arp::handle(XdpContext { ctx: ctx.ctx }, ifindex, role::PROVIDER as u32),
        Some(ETH_P_IPV6) => {
            // SAFETY: tail call into the IPv6 program; returns only when its
            // slot is empty: the kernel's, as before IPv6 was handled.
            unsafe { V6_PROGS.tail_call(ctx, v6_prog::PROVIDER) };
            xdp_action::XDP_PASS
        }
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext) -> u32 {
    // Replies are looked up first (one CT_REV lookup on the established
    // path); whether the destination is a NAT address at all is asked only
    // of the frames that are no reply.
    let f = match parse_ipv4(ctx) {
        Ok(f) => f,
        Err(r) => return not_a_reply(load::<u32>(ctx, IP_DADDR), Some(r)),
    };
    if f.proto == IPPROTO_ICMP && f.tcp_flags != icmp_type::ECHO_REPLY {
        match nat_addr(f.dst_be) {
            None => return xdp_action::XDP_PASS,
            Some(n) if n.flags & nat_addr_flags::RETIRED != 0 => {
                return drop(DropReason::NatRetired, NO_EP);
            }
            Some(_) => {}
        }
        if icmp::is_error(f.tcp_flags) {
            let v = icmp::provider_error(XdpContext { ctx: ctx.ctx }, f.tot_len as u32);
            if v == crate::v6::nat64::ICMP_ERROR {
                // SAFETY: tail call into the NAT64 error program (its own
                // stack); returns only when its slot is empty.
                unsafe { V6_PROGS.tail_call(ctx, v6_prog::NAT64_ERROR) };
                return drop(DropReason::IcmpUnsupported, NO_EP);
            }
            return v;
        }
        return drop(DropReason::IcmpUnsupported, NO_EP);
    }
    let rev = CtRevKey {
        nat_addr_be: v4_be(f.dst_be),
        backend_addr_be: v4_be(f.src_be),
        nat_port_be: f.dport_be,
        backend_port_be: f.sport_be,
        proto: f.proto,
        _pad: [0; 3],
    };
    // SAFETY: map value pointer, valid for this program run.
    let Some(owner) = CT_REV.get_ptr(&rev) else {
        return not_a_reply(Some(f.dst_be), None);
    };
    // SAFETY: as above; the key is read in place (no copy on the stack).
    let (fwd, key_hash) = unsafe { (&(*owner).fwd, (*owner).key_hash) };
    let Some(v) = CT_FWD.get_ptr_mut(fwd) else {
        return drop(DropReason::CtBroken, NO_EP);
    };
    // SAFETY: map value pointer, benign races as on the consumer side.
    let v = unsafe { &mut *v };
    // The owner may have been replaced by a new flow with another mapping,
    // or its element freed and reused for another key (`conntrack::entry_is`).
    let nat = Nat {
        src_be: fwd.dst_addr_be[0],
        dst_be: fwd.src_addr_be[0],
        sport_be: fwd.dst_port_be,
        dport_be: fwd.src_port_be,
        smac: v.gw_mac,
        dmac: v.client_mac,
    };
    let endpoint_id = v.endpoint_id;
    if !conntrack::entry_is(v, key_hash)
        || v.nat_addr_be != rev.nat_addr_be
        || v.nat_port_be != rev.nat_port_be
        || v.backend_addr_be != rev.backend_addr_be
        || v.backend_port_be != rev.backend_port_be
    {
        return drop(DropReason::CtBroken, endpoint_id);
    }
    let Some(g) = GLOBAL.get(0) else {
        return drop(DropReason::ReplyNoFlow, endpoint_id);
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if flow_expired(v, now, &g.timeouts) {
        return drop(DropReason::ReplyNoFlow, endpoint_id);
    }
    // The datapath does not rely on the controller's purge: a reply of a
    // flow whose endpoint was rejected, removed or re-pointed is dropped.
    if !endpoint::current(v) {
        return drop(DropReason::ReplyEndpointNotApproved, endpoint_id);
    }
    if f.ttl <= 1 {
        return drop(DropReason::TtlExceeded, endpoint_id);
    }
    // A NAT64 reply grows by the IPv6 header's extra bytes on the way.
    let nat64 = v.flags & flow_flags::NAT64 != 0;
    let growth = if nat64 { crate::v6::nat64::GROWTH } else { 0 };
    if let Some(action) =
        pmtu::reply_too_big(ctx, v.ingress_ifindex, v.service_id, endpoint_id, growth)
    {
        return action;
    }
    // Only a packet that leaves refreshes the flow and moves its TCP state,
    // and it writes the entry only where something changed.
    if last_seen_moved(v.last_seen_ns, now) {
        v.last_seen_ns = now;
    }
    if f.proto == IPPROTO_TCP {
        let state = conntrack::tcp_reverse(v.tcp_state, f.tcp_flags);
        if state != v.tcp_state {
            v.tcp_state = state;
        }
    }
    if nat64 {
        let verdict = crate::v6::nat64::reply(XdpContext { ctx: ctx.ctx }, &f, v, fwd);
        if verdict == xdp_action::XDP_REDIRECT {
            // An IPv6 segment now (the redirect leaves once this returns).
            mss::on_tcp_syn(
                ctx,
                f.proto,
                f.tcp_flags,
                v.service_id,
                endpoint_id,
                v.ingress_ifindex,
                mss::OUT | mss::V6,
            );
        }
        return verdict;
    }
    if !rewrite(ctx, &f, &nat) {
        return drop(DropReason::Malformed, endpoint_id);
    }
    if v.pp_len != 0 {
        let s = proxy::backend_segment(ctx, &f, v);
        if !s.is_next() {
            return s.finish(endpoint_id);
        }
    }
    // A SYN-ACK of a PROXY flow offers `pp_len` less: the client's first
    // segment grows by that much on its way to the backend.
    mss::on_syn(
        ctx,
        &f,
        v.service_id,
        endpoint_id,
        v.ingress_ifindex,
        mss::OUT,
        v.pp_len,
    );
    stats::count_packet(v, f.tot_len as u64, true);
    if flowlog::logged(v) {
        flowlog::count(v, f.tot_len as u64, true);
    }
    forward::redirect(v.ingress_ifindex, endpoint_id)
}

/// The NAT address `dst_be`, if plink owns (or just retired) it.
#[inline(always)]
fn nat_addr(dst_be: u32) -> Option<NatAddrInfo> {
    // SAFETY: map value copied out.
    unsafe { NAT_ADDRS.get(&v4_be(dst_be)) }.copied()
}

/// A frame that is no reply of a flow: to a NAT address it is dropped (as
/// malformed when it did not parse, else as a reply without flow; to a
/// drained address plink gave up, as retired: late replies are not the
/// kernel's); anything else is the gateway's own traffic and goes to its
/// kernel.
#[inline(always)]
fn not_a_reply(dst_be: Option<u32>, malformed: Option<DropReason>) -> u32 {
    let Some(nat) = dst_be.and_then(nat_addr) else {
        return xdp_action::XDP_PASS;
    };
    if nat.flags & nat_addr_flags::RETIRED != 0 {
        return drop(DropReason::NatRetired, NO_EP);
    }
    drop(malformed.unwrap_or(DropReason::ReplyNoFlow), NO_EP)
}
