//! Conntrack: the flow's entries, their insertion order, their removal by
//! the datapath, and TCP state tracking.
//!
//! A flow owns three entries: forward (`CT_FWD`, the state), reverse
//! (`CT_REV`) and its NAT port (`NAT_PORTS`). They are inserted with
//! BPF_NOEXIST in the order port → forward → reverse, and whoever fails
//! removes what it inserted, so a lost race leaves nothing behind.
use aya_ebpf::{bindings::BPF_NOEXIST, programs::XdpContext};
use plink_common::{
    Addr, CtFwdKey, CtFwdValue, CtRevKey, DropReason, EndpointValue, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, flow_flags, flow_hash, tcp_state,
};

use crate::{
    endpoint, flowlog, lb, limits,
    maps::{CT_FWD, CT_REV, EP_LIMITS, NAT_PORTS, SCRATCH_NEW_FLOW, SCRATCH_VICTIM, SERVICES},
    nat,
    parse::{IP_OFF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, load},
    proxy, stats,
    step::Step,
};

/// Another CPU inserted the same forward key first: use its entry (a
/// [`new_flow`] outcome besides `NEXT`, created, and drops).
pub const RACE_LOST: Step = Step::other(1);

pub const EEXIST: i32 = 17;

/// May this packet open a flow? For TCP only a bare SYN does.
#[inline(always)]
pub fn opens_flow(proto: u8, tcp_flags: u8) -> bool {
    proto != IPPROTO_TCP || tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// Creates the flow `key` for endpoint `ep` (admitted by its caps) from the
/// packet in `ctx`:
/// `NEXT` (created), [`RACE_LOST`], or the drop (not yet counted).
/// `V6`: an IPv6 flow (no PROXY protocol, whose checks read IPv4 headers).
#[inline(never)]
pub fn new_flow<const V6: bool>(
    ctx: XdpContext,
    key: &CtFwdKey,
    ep: &EndpointValue,
    now: u64,
) -> Step {
    match create::<V6>(&ctx, key, ep, now) {
        Ok(()) => Step::NEXT,
        Err(None) => RACE_LOST,
        Err(Some(r)) => Step::drop(r),
    }
}

#[inline(always)]
fn create<const V6: bool>(
    ctx: &XdpContext,
    key: &CtFwdKey,
    ep: &EndpointValue,
    now: u64,
) -> Result<(), Option<DropReason>> {
    let svc = SERVICES
        .get(ep.service_id)
        .filter(|s| s.enabled != 0)
        .ok_or(Some(DropReason::ServiceMissing))?;
    // A PROXY service's flow is never opened by a SYN carrying data: those
    // bytes would reach the backend before the header (TCP Fast Open).
    if !V6 && key.proto == IPPROTO_TCP && proxy::header_len(ep.endpoint_id) != 0 {
        let tot_len = load::<[u8; 2]>(ctx, IP_OFF + 2).map(u16::from_be_bytes);
        match tot_len.and_then(|t| proxy::syn_payload(ctx, t)) {
            Some(0) => {}
            Some(_) => return Err(Some(DropReason::ProxySynData)),
            None => return Err(Some(DropReason::Malformed)),
        }
    }
    let hash = flow_hash(key);
    let (backend_id, backend_addr) =
        lb::select_backend(svc, ep.service_id, hash).ok_or(Some(DropReason::NoBackend))?;
    let (Some(gw_mac), Some(client_mac)) = (load::<[u8; 6]>(ctx, 0), load::<[u8; 6]>(ctx, 6))
    else {
        return Err(Some(DropReason::Malformed));
    };
    // NAT64: an IPv6 key (`V6`) whose backend is IPv4. Its reverse entry
    // and NAT port are IPv4's, so an echo flow takes ICMP's id space.
    let nat64 = V6 && is_v4(&backend_addr);
    let proto = if nat64 && key.proto == IPPROTO_ICMPV6 {
        IPPROTO_ICMP
    } else {
        key.proto
    };
    let s = SCRATCH_NEW_FLOW
        .get_ptr_mut(0)
        .ok_or(Some(DropReason::ConntrackFull))?;
    // SAFETY: this CPU's scratch slot; XDP runs to completion without preemption.
    let s = unsafe { &mut *s };
    // Every field is written: the slot holds the previous flow's bytes.
    let v = &mut s.v;
    v.backend_addr_be = backend_addr;
    v.backend_port_be = ep.target_port_be;
    v.ingress_ifindex = ctx.ingress_ifindex() as u32;
    v.client_mac = client_mac;
    v.gw_mac = gw_mac;
    v.endpoint_id = ep.endpoint_id;
    v.service_id = ep.service_id;
    v.backend_id = backend_id;
    v.last_seen_ns = now;
    v.proto = proto;
    v.tcp_state = if key.proto == IPPROTO_TCP {
        tcp_state::SYN_SENT
    } else {
        0
    };
    // LOGGED is set by `flowlog::fresh` once the packet is known to leave.
    v.flags = if nat64 { flow_flags::NAT64 } else { 0 };
    v.log_packets_in = 0;
    v.log_bytes_in = 0;
    v.log_packets_out = 0;
    v.log_bytes_out = 0;
    v.ep_gen = endpoint::generation(ep.endpoint_id);
    v.key_hash = hash;
    // Filled by the caller's route lookup.
    v.hop_gen = 0;
    v.hop_ifindex = 0;
    v.hop_mtu = 0;
    v.hop_smac = [0; 6];
    v.hop_dmac = [0; 6];
    // Set by `proxy::on_client_syn` for a PROXY protocol service.
    v.pp_len = 0;
    v.pp_flags = 0;
    v.pp_first_seq = 0;
    s.owner.fwd = *key;
    s.owner.key_hash = hash;
    s.owner.created_ns = now;
    nat::alloc_nat_port(svc, hash, proto, now, s).map_err(|r| {
        if r == DropReason::NatPortsExhausted {
            stats::count_refusal(ep.endpoint_id, ep.service_id, r);
        }
        Some(r)
    })?;
    if let Err(e) = CT_FWD.insert(key, &s.v, BPF_NOEXIST as u64) {
        let _ = NAT_PORTS.remove(&s.port);
        if e == -EEXIST {
            return Err(None);
        }
        return Err(Some(DropReason::ConntrackFull));
    }
    reverse_key(&mut s.rev, &s.v);
    if let Err(e) = CT_REV.insert(&s.rev, &s.owner, BPF_NOEXIST as u64) {
        let _ = CT_FWD.remove(key);
        let _ = NAT_PORTS.remove(&s.port);
        // The port was free, so an existing reverse entry is a leftover the
        // controller's GC has not swept yet.
        return Err(Some(if e == -EEXIST {
            DropReason::CtBroken
        } else {
            DropReason::ConntrackFull
        }));
    }
    if let Some(l) = EP_LIMITS.get_ptr_mut(ep.endpoint_id) {
        // SAFETY: shared by all CPUs, hence the atomic add; the count read
        // before it only picks a ring slot.
        let created = unsafe { (*l).flows_created };
        unsafe { crate::atomic_add(&raw mut (*l).flows_created, 1) };
        if ep.max_flows != 0 {
            limits::remember(ep.endpoint_id, created, key);
        }
    }
    // Counted as created by the caller, once the packet is known to leave.
    Ok(())
}

/// Is `a` an IPv4 address (word 0 only; the IPv6 parser refuses
/// addresses that would read so)?
#[inline(always)]
pub fn is_v4(a: &Addr) -> bool {
    a[1] | a[2] | a[3] == 0
}

/// Removes the flow this CPU's [`new_flow`] just created for `key` (its
/// packet could not be forwarded): reverse entry, forward entry, NAT port
/// and cap slot. The scratch slot still holds what `new_flow` inserted.
#[inline(never)]
pub fn release(key: &CtFwdKey, endpoint_id: u32) {
    let Some(s) = SCRATCH_NEW_FLOW.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, written by new_flow in this run.
    let s = unsafe { &*s };
    let _ = CT_REV.remove(&s.rev);
    let _ = CT_FWD.remove(key);
    let _ = NAT_PORTS.remove(&s.port);
    if let Some(l) = EP_LIMITS.get_ptr_mut(endpoint_id) {
        // SAFETY: shared by all CPUs, hence the atomic add (of -1).
        unsafe { crate::atomic_add(&raw mut (*l).flows_created, u64::MAX) };
    }
}

/// Writes the reverse key of flow `v` (a reply as its backend sends it,
/// seen from the NAT side) into `rev`.
#[inline(always)]
pub fn reverse_key(rev: &mut CtRevKey, v: &CtFwdValue) {
    rev.nat_addr_be = v.nat_addr_be;
    rev.backend_addr_be = v.backend_addr_be;
    rev.nat_port_be = v.nat_port_be;
    rev.backend_port_be = v.backend_port_be;
    rev.proto = v.proto;
    rev._pad = [0; 3];
}

/// Removes the flow at `v` (looked up under `key`) that the datapath gives
/// up on (its endpoint changed, or it expired and its endpoint needs the
/// cap slot): forward, reverse and port entries, crediting a cap slot to the
/// endpoint it was counted against. Whoever deletes the
/// forward entry first frees the rest, so a flow is freed once.
/// A logged flow gets its end record (`reason`, a `flow_end_reason`).
#[inline(never)]
pub fn evict(key: &CtFwdKey, v: &CtFwdValue, reason: u8) {
    let Some(s) = SCRATCH_VICTIM.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; XDP runs to completion.
    let s = unsafe { &mut *s };
    reverse_key(&mut s.rev, v);
    s.port.addr_be = v.nat_addr_be;
    s.port.port_be = v.nat_port_be;
    s.port.proto = v.proto;
    s.port._pad = 0;
    let endpoint_id = v.endpoint_id;
    // The end record is written before the entry goes (its element may be
    // reused at once) and sent only if this CPU removed the flow.
    if flowlog::logged(v) {
        flowlog::stash_end(key, v, reason, flowlog::now());
    }
    if CT_FWD.remove(key).is_err() {
        flowlog::stash_abort();
        return;
    }
    flowlog::stash_commit();
    let _ = CT_REV.remove(&s.rev);
    let _ = NAT_PORTS.remove(&s.port);
    if let Some(l) = EP_LIMITS.get_ptr_mut(endpoint_id) {
        // SAFETY: shared by all CPUs, hence the atomic add.
        unsafe { crate::atomic_add(&raw mut (*l).flows_reclaimed, 1) };
    }
}

/// Is `v` (looked up under the key whose `flow_hash` is `key_hash`) still
/// that key's entry? See `CtFwdValue::key_hash`: the element may have been
/// freed and reused.
#[inline(always)]
pub fn entry_is(v: &CtFwdValue, key_hash: u32) -> bool {
    // Volatile: the comparison must read the entry after the mapping was read.
    // SAFETY: reading a field of a map value the caller holds a pointer to.
    unsafe { core::ptr::read_volatile(&raw const v.key_hash) == key_hash }
}

/// TCP state on a consumer → service packet.
#[inline(always)]
pub fn tcp_forward(state: u8, flags: u8) -> u8 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN && state != tcp_state::ESTABLISHED {
        // A new connection on a closing tuple reuses the mapping. A stray SYN
        // on an established one does not end it: the backend answers with a
        // challenge ACK (RFC 5961) and the connection goes on.
        tcp_state::SYN_SENT
    } else if flags & TCP_ACK != 0 && state == tcp_state::SYN_RECV {
        tcp_state::ESTABLISHED
    } else {
        state
    }
}

/// TCP state on a service → consumer packet.
#[inline(always)]
pub fn tcp_reverse(state: u8, flags: u8) -> u8 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) && state == tcp_state::SYN_SENT {
        tcp_state::SYN_RECV
    } else {
        state
    }
}
