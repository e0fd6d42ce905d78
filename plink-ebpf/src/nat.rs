//! NAT port allocation: a port unique per (NAT address, protocol), probed
//! with a per-flow stride over the service's NAT slots, and taken over from
//! an expired flow when every probe failed (no controller needed).
use aya_ebpf::bindings::BPF_NOEXIST;
use plink_common::{
    DropReason, ServiceConfig, flow_expired, nat_flags, nat_probe_port, nat_probe_slot,
};

use crate::{
    conntrack::{EEXIST, entry_is, reverse_key},
    flowlog,
    maps::{CT_FWD, CT_REV, EP_LIMITS, GLOBAL, NAT_PORTS, SCRATCH_VICTIM},
    scratch::NewFlow,
};

/// Claims a NAT port unique per (NAT address, protocol) with bounded
/// probing; fills the NAT fields of `s.v` and the claimed key `s.port`.
#[inline(always)]
pub fn alloc_nat_port(
    svc: &ServiceConfig,
    hash: u32,
    proto: u8,
    now: u64,
    s: &mut NewFlow,
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
    s: &mut NewFlow,
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
fn claimed(s: &mut NewFlow, slot: u32) {
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
fn reclaim_port(s: &mut NewFlow, now: u64) -> bool {
    // Map-value pointers serve as keys and the victim's reverse key is built
    // in its own scratch slot: the BPF stack of the new-flow call chain is
    // nearly full.
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
    // A logged flow's end record, written before its entry goes (with
    // little live here: the chain's stack is full) and sent, by the slow
    // path once this chain returned, only if this CPU removes the flow.
    if flowlog::logged(v) {
        flowlog::stash_end(fwd, v, flowlog::end_reason(v), now);
    }
    let Some(victim) = SCRATCH_VICTIM.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; XDP runs to completion.
    let victim = unsafe { &mut (*victim).rev };
    reverse_key(victim, v);
    let endpoint_id = v.endpoint_id;
    let owns_port = v.nat_addr_be == s.port.addr_be && v.nat_port_be == s.port.port_be;
    if CT_FWD.remove(fwd).is_err() {
        // Another CPU or the GC removed it first, and frees the rest
        // (and writes its end record).
        flowlog::stash_abort();
        return false;
    }
    flowlog::stash_commit();
    let _ = CT_REV.remove(victim);
    let _ = NAT_PORTS.remove(&s.port);
    if let Some(l) = EP_LIMITS.get_ptr_mut(endpoint_id) {
        // SAFETY: shared by all CPUs, hence the atomic add.
        unsafe { crate::atomic_add(&raw mut (*l).flows_reclaimed, 1) };
    }
    owns_port
}
