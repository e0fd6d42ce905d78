//! IPv6 on the provider interface: replies to NAT addresses go back to
//! their consumer (NAT66 undone); neighbour solicitations for NAT addresses
//! are answered; everything else is the gateway's own traffic and passes.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_check_mtu, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use plink_common::{
    Addr, CtRevKey, DropReason, IPPROTO_TCP, NatAddrInfo, flow_expired, last_seen_moved,
    nat_addr_flags, role,
};

use super::{
    ANSWER, icmp, nd,
    parse::{
        DstMac, ICMP6_ECHO_REPLY, IP6_DADDR, IPPROTO_ICMPV6, ND_NEIGHBOR_SOLICIT, dst_mac,
        parse_ipv6,
    },
    rewrite::{Nat6, rewrite6},
};
use crate::{
    conntrack, endpoint, flowlog, forward,
    maps::{CT_FWD, CT_REV, GLOBAL, INTERFACES, NAT_ADDRS, SCRATCH_V6},
    parse::load,
    stats::{self, NO_EP, drop},
};

/// [`handle`]'s verdict for a frame that may be a reply (parsed into the
/// scratch slot): [`reply`] takes it on.
pub const REPLY: u32 = u32::MAX;

/// [`handle`]'s verdict for an ICMPv6 error to a NAT address (parsed into
/// the scratch slot): `v6::icmp::provider_error` takes it on.
pub const ERROR: u32 = u32::MAX - 2;

/// Everything but replies: interface, MAC, parse, neighbour discovery, the
/// gateway's own traffic. Returns the verdict, or [`REPLY`].
// Out of line, as `reply`: each chain gets the 512-byte stack to itself.
#[inline(never)]
pub fn handle(ctx: XdpContext) -> u32 {
    let ctx = &ctx;
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: map value copied out.
    let iface = match unsafe { INTERFACES.get(&ifindex) }.copied() {
        Some(i) if i.role == role::PROVIDER => i,
        // Not an interface plink was told about: the kernel's.
        _ => return xdp_action::XDP_PASS,
    };
    let multicast = match dst_mac(ctx, &iface.mac) {
        DstMac::Us => false,
        DstMac::Multicast => true,
        DstMac::Other => return xdp_action::XDP_PASS,
    };
    // Parsed into this CPU's scratch slot: the reply and neighbour
    // discovery paths each get the stack to themselves.
    let Some(w) = SCRATCH_V6.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch slot; XDP runs to completion.
    let w = unsafe { &mut *w };
    w.f = match parse_ipv6(ctx) {
        Ok(f) => f,
        Err(r) => return not_a_reply(load::<Addr>(ctx, IP6_DADDR), Some(r)),
    };
    let f = &w.f;
    if f.proto == IPPROTO_ICMPV6 && f.tcp_flags == ND_NEIGHBOR_SOLICIT {
        let s = nd::solicitation(
            XdpContext { ctx: ctx.ctx },
            f,
            &iface,
            role::PROVIDER as u32,
        );
        if s.is_next() {
            // The gateway's own addresses: its kernel answers.
            return xdp_action::XDP_PASS;
        }
        return s.finish(NO_EP);
    }
    if multicast {
        return xdp_action::XDP_PASS;
    }
    if f.proto == IPPROTO_ICMPV6 && f.tcp_flags != ICMP6_ECHO_REPLY {
        match nat_addr(&f.dst) {
            None => return xdp_action::XDP_PASS,
            Some(n) if n.flags & nat_addr_flags::RETIRED != 0 => {
                return drop(DropReason::NatRetired, NO_EP);
            }
            // An error about a flow's packet: translated by `v6::icmp`.
            Some(_) if icmp::is_error(f.tcp_flags) => return ERROR,
            Some(_) => return drop(DropReason::IcmpUnsupported, NO_EP),
        }
    }
    REPLY
}

/// A reply of a flow (parsed into the scratch slot), translated back and
/// sent to its consumer, or why not.
#[inline(never)]
pub fn reply(ctx: XdpContext) -> u32 {
    let ctx = &ctx;
    let Some(w) = SCRATCH_V6.get_ptr(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch slot, written by `handle`.
    let f = unsafe { &(*w).f };
    let rev = CtRevKey {
        nat_addr_be: f.dst,
        backend_addr_be: f.src,
        nat_port_be: f.dport_be,
        backend_port_be: f.sport_be,
        proto: f.proto,
        _pad: [0; 3],
    };
    let Some(owner) = CT_REV.get_ptr(&rev) else {
        return not_a_reply(Some(f.dst), None);
    };
    // SAFETY: map value pointer, valid for this program run; read in place.
    let (fwd, key_hash) = unsafe { (&(*owner).fwd, (*owner).key_hash) };
    let Some(v) = CT_FWD.get_ptr_mut(fwd) else {
        return drop(DropReason::CtBroken, NO_EP);
    };
    // SAFETY: map value pointer, benign races as on the consumer side.
    let v = unsafe { &mut *v };
    let nat = Nat6 {
        src: fwd.dst_addr_be,
        dst: fwd.src_addr_be,
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
    if !endpoint::current(v) {
        return drop(DropReason::ReplyEndpointNotApproved, endpoint_id);
    }
    if f.hop <= 1 {
        return drop(DropReason::TtlExceeded, endpoint_id);
    }
    // Too big for the consumer interface (the redirect would be dropped
    // after XDP, invisibly): Packet Too Big to the backend from the NAT
    // address, with the consumer interface's MTU (see `pmtu.rs`).
    if let Some(mtu) = too_big(ctx, v.ingress_ifindex) {
        if mtu == 0 {
            return drop(DropReason::FragNeeded, endpoint_id);
        }
        // SAFETY: this CPU's scratch slot; `f` is not used after this.
        unsafe {
            let w = w.cast_mut();
            (*w).err_type = icmp::PACKET_TOO_BIG;
            (*w).err_mtu = mtu;
            (*w).endpoint_id = endpoint_id;
            (*w).service_id = v.service_id;
        }
        return ANSWER;
    }
    if last_seen_moved(v.last_seen_ns, now) {
        v.last_seen_ns = now;
    }
    if f.proto == IPPROTO_TCP {
        let state = conntrack::tcp_reverse(v.tcp_state, f.tcp_flags);
        if state != v.tcp_state {
            v.tcp_state = state;
        }
    }
    if !rewrite6(ctx, f, &nat) {
        return drop(DropReason::Malformed, endpoint_id);
    }
    crate::mss::on_tcp_syn(
        ctx,
        f.proto,
        f.tcp_flags,
        v.service_id,
        endpoint_id,
        v.ingress_ifindex,
        crate::mss::OUT | crate::mss::V6,
    );
    stats::count_packet(v, f.tot_len as u64, true);
    if flowlog::logged(v) {
        flowlog::count(v, f.tot_len as u64, true);
    }
    forward::redirect(v.ingress_ifindex, endpoint_id)
}

/// `bpf_check_mtu`'s answer for a frame larger than the device's MTU.
const BPF_MTU_CHK_RET_FRAG_NEEDED: i64 = 1;

/// `None` when the frame fits interface `ifindex`'s MTU; else that MTU
/// (0 when the interface is gone).
#[inline(always)]
fn too_big(ctx: &XdpContext, ifindex: u32) -> Option<u32> {
    let mut mtu: u32 = 0;
    // SAFETY: valid ctx and out pointer; 0 = check the frame as it is.
    let rc = unsafe { bpf_check_mtu(ctx.ctx.cast(), ifindex, &mut mtu, 0, 0) };
    match rc {
        0 => None,
        BPF_MTU_CHK_RET_FRAG_NEEDED => Some(mtu),
        _ => Some(0),
    }
}

/// The NAT address `dst`, if plink owns (or just retired) it.
#[inline(always)]
fn nat_addr(dst: &Addr) -> Option<NatAddrInfo> {
    // SAFETY: map value copied out.
    unsafe { NAT_ADDRS.get(dst) }.copied()
}

/// A frame that is no reply of a flow: to a NAT address it is dropped, else
/// it is the gateway's own (see the IPv4 provider's `not_a_reply`).
#[inline(always)]
fn not_a_reply(dst: Option<Addr>, malformed: Option<DropReason>) -> u32 {
    let Some(nat) = dst.as_ref().and_then(nat_addr) else {
        return xdp_action::XDP_PASS;
    };
    if nat.flags & nat_addr_flags::RETIRED != 0 {
        return drop(DropReason::NatRetired, NO_EP);
    }
    drop(malformed.unwrap_or(DropReason::ReplyNoFlow), NO_EP)
}
