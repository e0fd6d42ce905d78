//! Flow creation (the slow path) and TCP state tracking.
//!
//! A flow owns three entries: forward (`CT_FWD`, the state), reverse
//! (`CT_REV`) and its NAT port (`NAT_PORTS`). They are inserted with
//! BPF_NOEXIST in the order port → forward → reverse, and whoever fails
//! removes what it inserted, so a lost race leaves nothing behind.
use aya_ebpf::{bindings::BPF_NOEXIST, programs::XdpContext};
use plink_common::{
    CtFwdKey, CtFwdValue, CtOwner, CtRevKey, DropReason, EndpointValue, IPPROTO_TCP, NO_BACKEND,
    NatPortKey, ServiceConfig, ep_state, flow_expired, flow_hash, nat_flags, nat_probe_port,
    nat_probe_slot, tcp_state,
};

use crate::{
    maps::{
        BACKENDS, CT_FWD, CT_REV, EP_GC_FREED, EP_GEN, EP_LIMITS, GLOBAL, LB_TABLE, NAT_PORTS,
        SCRATCH, SERVICES,
    },
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, load},
    stats,
};

/// `new_flow` results other than a drop reason.
pub const CREATED: u32 = 0;
/// Another CPU inserted the same forward key first: use its entry.
pub const RACE_LOST: u32 = 0xffff;

const EEXIST: i32 = 17;

/// May this packet open a flow? For TCP only a bare SYN does.
#[inline(always)]
pub fn opens_flow(proto: u8, tcp_flags: u8) -> bool {
    proto != IPPROTO_TCP || tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// The slow path's working set (in the per-CPU `SCRATCH` map).
#[repr(C)]
pub struct Scratch {
    pub v: CtFwdValue,
    pub owner: CtOwner,
    pub rev: CtRevKey,
    pub port: NatPortKey,
}

/// Creates the flow `key` for endpoint `ep` from the packet in `ctx`.
/// Returns [`CREATED`], [`RACE_LOST`] or `DropReason as u32 + 1`.
#[inline(never)]
pub fn new_flow(ctx: XdpContext, key: &CtFwdKey, ep: &EndpointValue, now: u64) -> u32 {
    match create(&ctx, key, ep, now) {
        Ok(()) => CREATED,
        Err(None) => RACE_LOST,
        Err(Some(r)) => r as u32 + 1,
    }
}

#[inline(always)]
fn create(
    ctx: &XdpContext,
    key: &CtFwdKey,
    ep: &EndpointValue,
    now: u64,
) -> Result<(), Option<DropReason>> {
    admit(ep, now).map_err(|r| {
        stats::count_refusal(ep.endpoint_id, ep.service_id, r);
        Some(r)
    })?;
    let svc = SERVICES
        .get(ep.service_id)
        .filter(|s| s.enabled != 0)
        .ok_or(Some(DropReason::ServiceMissing))?;
    let hash = flow_hash(key);
    let (backend_id, backend_addr) =
        select_backend(svc, ep.service_id, hash).ok_or(Some(DropReason::NoBackend))?;
    let (Some(gw_mac), Some(client_mac)) = (load::<[u8; 6]>(ctx, 0), load::<[u8; 6]>(ctx, 6))
    else {
        return Err(Some(DropReason::Malformed));
    };
    let s = SCRATCH
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
    v.proto = key.proto;
    v.tcp_state = if key.proto == IPPROTO_TCP {
        tcp_state::SYN_SENT
    } else {
        0
    };
    v._pad = 0;
    v.ep_gen = EP_GEN.get(ep.endpoint_id).map_or(0, |g| g.gen_id);
    v.key_hash = hash;
    // Filled by the caller's route lookup.
    v.hop_gen = 0;
    v.hop_ifindex = 0;
    v.hop_mtu = 0;
    v.hop_smac = [0; 6];
    v.hop_dmac = [0; 6];
    v._pad2 = [0; 6];
    s.owner.fwd = *key;
    s.owner.key_hash = hash;
    s.owner.created_ns = now;
    alloc_nat_port(svc, hash, key.proto, now, s).map_err(|r| {
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
    s.rev.nat_addr_be = s.v.nat_addr_be;
    s.rev.backend_addr_be = s.v.backend_addr_be;
    s.rev.nat_port_be = s.v.nat_port_be;
    s.rev.backend_port_be = s.v.backend_port_be;
    s.rev.proto = key.proto;
    s.rev._pad = [0; 3];
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
        // SAFETY: shared by all CPUs, hence the atomic add.
        unsafe { crate::atomic_add(&raw mut (*l).flows_created, 1) };
    }
    // Counted as created by the caller, once the packet is known to leave.
    Ok(())
}

/// Removes the flow this CPU's [`new_flow`] just created for `key` (its
/// packet could not be forwarded): reverse entry, forward entry, NAT port
/// and cap slot. The scratch slot still holds what `new_flow` inserted.
#[inline(never)]
pub fn release(key: &CtFwdKey, endpoint_id: u32) {
    let Some(s) = SCRATCH.get_ptr(0) else {
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

/// Is the endpoint `v` was created through still the same and approved?
/// One array read replaces the endpoint lookup for established flows: a
/// re-pointed, rejected or removed endpoint (or a reused id) is noticed on
/// the next packet, without waiting for the controller's purge.
#[inline(always)]
pub fn endpoint_current(v: &CtFwdValue) -> bool {
    EP_GEN
        .get(v.endpoint_id)
        .is_some_and(|g| g.gen_id == v.ep_gen && g.gen_id != 0 && g.state == ep_state::APPROVED)
}

/// Removes the flow at `v` (looked up under `key`) whose endpoint changed
/// since it was created: forward, reverse and port entries, crediting a
/// cap slot to the endpoint it was counted against. Whoever deletes the
/// forward entry first frees the rest, so a flow is freed once.
#[inline(never)]
pub fn evict(key: &CtFwdKey, v: &CtFwdValue) {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, no flow being created yet.
    let s = unsafe { &mut *s };
    s.rev.nat_addr_be = v.nat_addr_be;
    s.rev.backend_addr_be = v.backend_addr_be;
    s.rev.nat_port_be = v.nat_port_be;
    s.rev.backend_port_be = v.backend_port_be;
    s.rev.proto = v.proto;
    s.rev._pad = [0; 3];
    s.port.addr_be = v.nat_addr_be;
    s.port.port_be = v.nat_port_be;
    s.port.proto = v.proto;
    s.port._pad = 0;
    let endpoint_id = v.endpoint_id;
    if CT_FWD.remove(key).is_err() {
        return;
    }
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

/// Per-endpoint caps: live flows and new flows per second.
#[inline(always)]
fn admit(ep: &EndpointValue, now: u64) -> Result<(), DropReason> {
    if ep.max_flows == 0 && ep.new_flows_per_sec == 0 {
        return Ok(());
    }
    let Some(l) = EP_LIMITS.get_ptr_mut(ep.endpoint_id) else {
        return Ok(());
    };
    if ep.max_flows != 0 {
        let freed = EP_GC_FREED.get(ep.endpoint_id).copied().unwrap_or(0);
        // SAFETY: map value pointer; a torn read only makes the cap approximate.
        let (created, reclaimed) = unsafe { ((*l).flows_created, (*l).flows_reclaimed) };
        if created.wrapping_sub(freed).wrapping_sub(reclaimed) >= ep.max_flows as u64 {
            return Err(DropReason::CapMaxFlows);
        }
    }
    if ep.new_flows_per_sec != 0 {
        let sec = now / 1_000_000_000;
        // SAFETY: map value pointer. Two CPUs may both reset a new window;
        // that admits at most a few extra flows at the boundary.
        unsafe {
            if (*l).window_sec != sec {
                (*l).window_sec = sec;
                (*l).window_count = 0;
            }
            if (*l).window_count >= ep.new_flows_per_sec as u64 {
                return Err(DropReason::CapNewFlowRate);
            }
            crate::atomic_add(&raw mut (*l).window_count, 1);
        }
    }
    Ok(())
}

/// `backend = LB_TABLE[lb_offset + hash % lb_size]` (Maglev fills the table).
#[inline(always)]
fn select_backend(
    svc: &ServiceConfig,
    service_id: u32,
    hash: u32,
) -> Option<(u32, plink_common::Addr)> {
    if svc.lb_size == 0 {
        return None;
    }
    let id = *LB_TABLE.get(svc.lb_offset.wrapping_add(hash.checked_rem(svc.lb_size)?))?;
    if id == NO_BACKEND {
        return None;
    }
    let b = BACKENDS.get(id)?;
    // The service check also covers a table read while the controller moved it.
    if b.enabled == 0 || b.service_id != service_id {
        return None;
    }
    Some((id, b.addr_be))
}

/// Claims a NAT port unique per (NAT address, protocol) with bounded
/// probing; fills the NAT fields of `s.v` and the claimed key `s.port`.
#[inline(always)]
fn alloc_nat_port(
    svc: &ServiceConfig,
    hash: u32,
    proto: u8,
    now: u64,
    s: &mut Scratch,
) -> Result<(), DropReason> {
    let count = svc.nat_count;
    if count == 0 || count > plink_common::MAX_NAT_SLOTS as u32 {
        return Err(DropReason::NatPortsExhausted);
    }
    let mut result = Err(DropReason::NatPortsExhausted);
    for i in 0..plink_common::NAT_PORT_PROBES {
        let Some(slot) = probe(svc, hash, i, count, proto, s) else {
            continue;
        };
        match NAT_PORTS.insert(&s.port, &s.owner, BPF_NOEXIST as u64) {
            Ok(()) => {
                claimed(s, slot);
                return Ok(());
            }
            // Taken: probe on.
            Err(e) if e == -EEXIST => {}
            // The table is full (E2BIG): probing cannot help.
            Err(_) => {
                result = Err(DropReason::ConntrackFull);
                break;
            }
        }
    }
    // Every probe failed. Ports (and table entries) held by expired flows
    // that no GC removed (the controller may be gone) are taken over: the
    // first probes' owners are checked. Only here, not at every probe: one
    // call site per candidate keeps the verifier's walk small.
    for i in 0..RECLAIM_CANDIDATES {
        let Some(slot) = probe(svc, hash, i, count, proto, s) else {
            continue;
        };
        if reclaim_port(s, now)
            && NAT_PORTS
                .insert(&s.port, &s.owner, BPF_NOEXIST as u64)
                .is_ok()
        {
            claimed(s, slot);
            return Ok(());
        }
    }
    result
}

/// Probes whose owners a new flow checks for expiry when all probes failed.
const RECLAIM_CANDIDATES: u32 = 2;

/// Writes probe `i`'s port key into `s.port`; returns its NAT slot, or
/// `None` when the slot takes no new flows.
#[inline(always)]
fn probe(
    svc: &ServiceConfig,
    hash: u32,
    i: u32,
    count: u32,
    proto: u8,
    s: &mut Scratch,
) -> Option<u32> {
    let slot = nat_probe_slot(hash, i, count);
    // LLVM proves slot < 8 and drops the bounds check, but the verifier
    // cannot follow a modulo: re-bound it where LLVM cannot see.
    // SAFETY: reading a local.
    let slot = unsafe { core::ptr::read_volatile(&slot) } & 7;
    let n = svc.nat.get(slot as usize)?;
    if n.flags & nat_flags::DRAINING != 0 || n.port_max < n.port_min || n.port_min == 0 {
        return None;
    }
    let port = nat_probe_port(hash, i, n.port_min, n.port_max);
    s.port.addr_be = n.addr_be;
    s.port.port_be = port.to_be();
    s.port.proto = proto;
    s.port._pad = 0;
    Some(slot)
}

/// Fills the NAT fields of the new flow from the port just claimed.
#[inline(always)]
fn claimed(s: &mut Scratch, slot: u32) {
    s.v.nat_addr_be = s.port.addr_be;
    s.v.nat_port_be = s.port.port_be;
    s.v.nat_slot = slot as u8;
}

/// A port entry whose owner flow is missing is removed only after this
/// long: flows are inserted port first, so a young one may be mid-insertion
/// on another CPU. (The controller's orphan sweep waits longer.)
const ORPHAN_PORT_GRACE_NS: u64 = 1_000_000_000;

/// Frees NAT port `port` if the flow holding it has expired (the rule and
/// clock of `flow_expired`, as the GC) or is gone: forward, reverse and port
/// entries are removed and the flow's endpoint is credited a cap slot. The
/// datapath thus reclaims what it needs without the controller's GC, and
/// forwarding without a controller has no time limit (SPEC §9). Whoever
/// deletes the forward entry first (this CPU, another, or the GC) accounts
/// for the flow, so it is freed once. Returns whether the port is free.
// Out of line: inlined into each of the unrolled probes it doubled the
// instructions the verifier walks.
#[inline(never)]
fn reclaim_port(s: &mut Scratch, now: u64) -> bool {
    // Map-value pointers serve as keys and the reverse key is built in the
    // scratch slot (unused until the forward entry is in): the BPF stack of
    // the new-flow call chain is nearly full.
    let Some(owner) = NAT_PORTS.get_ptr(&s.port) else {
        // Freed since the insert failed.
        return true;
    };
    let Some(g) = GLOBAL.get(0) else {
        return false;
    };
    // SAFETY: map value pointer, read only.
    let (fwd, created_ns, key_hash) =
        unsafe { (&(*owner).fwd, (*owner).created_ns, (*owner).key_hash) };
    let Some(v) = CT_FWD.get_ptr(fwd) else {
        return now > created_ns
            && now - created_ns > ORPHAN_PORT_GRACE_NS
            && NAT_PORTS.remove(&s.port).is_ok();
    };
    // SAFETY: map value pointer; only the fields below are read.
    let v = unsafe { &*v };
    if !flow_expired(v, now, &g.timeouts) || !entry_is(v, key_hash) {
        return false;
    }
    s.rev.nat_addr_be = v.nat_addr_be;
    s.rev.backend_addr_be = v.backend_addr_be;
    s.rev.nat_port_be = v.nat_port_be;
    s.rev.backend_port_be = v.backend_port_be;
    s.rev.proto = v.proto;
    s.rev._pad = [0; 3];
    let endpoint_id = v.endpoint_id;
    let owns_port = v.nat_addr_be == s.port.addr_be && v.nat_port_be == s.port.port_be;
    if CT_FWD.remove(fwd).is_err() {
        // Another CPU or the GC removed it first, and frees the rest.
        return false;
    }
    let _ = CT_REV.remove(&s.rev);
    let _ = NAT_PORTS.remove(&s.port);
    if let Some(l) = EP_LIMITS.get_ptr_mut(endpoint_id) {
        // SAFETY: shared by all CPUs, hence the atomic add.
        unsafe { crate::atomic_add(&raw mut (*l).flows_reclaimed, 1) };
    }
    owns_port
}

/// TCP state on a consumer → service packet.
#[inline(always)]
pub fn tcp_forward(state: u8, flags: u8) -> u8 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection on a closing tuple reuses the mapping.
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
