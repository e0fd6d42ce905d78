//! Flow logs: start and end records of logged flows (`CtFwdValue::flags`
//! has `flow_flags::LOGGED`, decided per flow from its hash when it is
//! created) written in place into the `FLOW_LOG` ring buffer, and the
//! per-flow counters their end records carry. A full ring loses the record
//! (counted in `FLOW_LOG_LOST`); the packet is forwarded all the same.
//! Flows that are not logged pay one flag test per packet, nothing else.
use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, maps::ring_buf::RingBufEntry};

use crate::maps::SCRATCH_VICTIM;
use plink_common::{
    CtFwdKey, CtFwdValue, FlowLogRecord, flow_end_reason, flow_flags, flow_log_kind,
    flow_log_sampled, tcp_state,
};

use crate::maps::{FLOW_LOG, FLOW_LOG_LOST, SERVICES};

/// Is flow `v` logged?
#[inline(always)]
pub fn logged(v: &CtFwdValue) -> bool {
    v.flags & flow_flags::LOGGED != 0
}

/// Adds one packet of `bytes` to logged flow `v`'s counters (atomic: the
/// two directions of a flow may run on two CPUs).
#[inline(always)]
pub fn count(v: *const CtFwdValue, bytes: u64, out: bool) {
    // SAFETY: a map value pointer; the counters are only ever updated
    // atomically, by every CPU alike.
    unsafe {
        if out {
            crate::atomic_add((&raw const (*v).log_packets_out).cast_mut(), 1);
            crate::atomic_add((&raw const (*v).log_bytes_out).cast_mut(), bytes);
        } else {
            crate::atomic_add((&raw const (*v).log_packets_in).cast_mut(), 1);
            crate::atomic_add((&raw const (*v).log_bytes_in).cast_mut(), bytes);
        }
    }
}

/// A flow just opened and its packet is about to leave: a created flow is
/// picked for logging or not (its service's `flow_log_sample`, its hash);
/// a logged one gets its start record (restarted after it expired: the old
/// flow's end record first, then its counters start again). Before the
/// packet leaves, so before any reply can count.
// Out of line: one call per new flow, off the new-flow chain's stack.
#[inline(never)]
pub fn fresh(key: &CtFwdKey, v: *mut CtFwdValue, restarted: bool, now: u64) {
    // SAFETY: map value pointer of this packet's flow.
    let v = unsafe { &mut *v };
    if !restarted {
        let sample = SERVICES.get(v.service_id).map_or(0, |s| s.flow_log_sample);
        if !flow_log_sampled(v.key_hash, sample) {
            return;
        }
        v.flags |= flow_flags::LOGGED;
    } else if !logged(v) {
        return;
    }
    if restarted {
        let reason = end_reason(v);
        if let Some(mut e) = reserve() {
            fill(e.as_mut_ptr(), key, v, flow_log_kind::END, reason, now);
            e.submit(0);
        }
        v.log_packets_in = 0;
        v.log_bytes_in = 0;
        v.log_packets_out = 0;
        v.log_bytes_out = 0;
    }
    if let Some(mut e) = reserve() {
        fill(e.as_mut_ptr(), key, v, flow_log_kind::START, 0, now);
        e.submit(0);
    }
}

/// Why an expired flow ended: closed (FIN or RST seen) or idle.
#[inline(always)]
pub fn end_reason(v: &CtFwdValue) -> u8 {
    if v.tcp_state == tcp_state::CLOSING {
        flow_end_reason::CLOSED
    } else {
        flow_end_reason::EXPIRED
    }
}

#[inline(always)]
fn copy_addr(dst: *mut plink_common::Addr, src: &plink_common::Addr) {
    // SAFETY: a valid destination, per the caller; volatile keeps LLVM
    // from merging the stores into a memmove.
    unsafe {
        let d = dst.cast::<u32>();
        core::ptr::write_volatile(d, src[0]);
        core::ptr::write_volatile(d.add(1), src[1]);
        core::ptr::write_volatile(d.add(2), src[2]);
        core::ptr::write_volatile(d.add(3), src[3]);
    }
}

/// A slot of the ring, or `None` (counted as lost) when it is full.
#[inline(always)]
pub fn reserve() -> Option<RingBufEntry<FlowLogRecord>> {
    let e = FLOW_LOG.reserve::<FlowLogRecord>(0);
    if e.is_none() {
        count_lost();
    }
    e
}

/// The current time for an end record.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Writes the record of flow `key` / `v` to `r` (a reserved ring slot or
/// this CPU's victim slot).
#[inline(always)]
pub fn fill(r: *mut FlowLogRecord, key: &CtFwdKey, v: &CtFwdValue, kind: u8, reason: u8, now: u64) {
    // SAFETY: a reserved ring slot or this CPU's scratch slot, ours until
    // submitted; every field is written.
    unsafe {
        (*r).kind = kind;
        (*r).proto = key.proto;
        (*r).reason = reason;
        (*r).tcp_state = v.tcp_state;
        (*r).network_id = key.network_id;
        // Word by word: an array copy becomes a memmove call, a frame
        // more on a call chain without room for it.
        copy_addr(&raw mut (*r).client_addr_be, &key.src_addr_be);
        copy_addr(&raw mut (*r).endpoint_addr_be, &key.dst_addr_be);
        copy_addr(&raw mut (*r).nat_addr_be, &v.nat_addr_be);
        copy_addr(&raw mut (*r).backend_addr_be, &v.backend_addr_be);
        (*r).client_port_be = key.src_port_be;
        (*r).endpoint_port_be = key.dst_port_be;
        (*r).nat_port_be = v.nat_port_be;
        (*r).backend_port_be = v.backend_port_be;
        (*r).endpoint_id = v.endpoint_id;
        (*r).service_id = v.service_id;
        (*r).time_ns = now;
        (*r).last_seen_ns = v.last_seen_ns;
        (*r).packets_in = v.log_packets_in;
        (*r).bytes_in = v.log_bytes_in;
        (*r).packets_out = v.log_packets_out;
        (*r).bytes_out = v.log_bytes_out;
    }
}

/// The end record of logged flow `key` / `v`, about to be removed by the
/// datapath deep in the new-flow chain: written to this CPU's victim slot,
/// sent by [`flush_victim`]. A record still pending there is lost (counted).
#[inline(always)]
pub fn stash_end(key: &CtFwdKey, v: &CtFwdValue, reason: u8, now: u64) {
    let Some(s) = SCRATCH_VICTIM.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; XDP runs to completion.
    unsafe {
        if (*s).pending != 0 {
            // Two in one packet's chain: the first is lost.
            count_lost();
            (*s).pending = 0;
        }
        fill(
            &raw mut (*s).record,
            key,
            v,
            flow_log_kind::END,
            reason,
            now,
        );
        (*s).stashed = 1;
    }
}

/// The flow was removed (by this CPU): a record [`stash_end`] wrote for it
/// is to be sent. Called for every removal, logged or not, and looks the
/// slot up again: nothing more stays live across the removal (the stack
/// of the new-flow chain is nearly full).
#[inline(always)]
pub fn stash_commit() {
    if let Some(s) = SCRATCH_VICTIM.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch slot.
        unsafe {
            if (*s).stashed != 0 {
                (*s).stashed = 0;
                (*s).pending = 1;
            }
        }
    }
}

/// The removal failed (another CPU or the GC removed the flow first and
/// accounts for it): a record [`stash_end`] wrote is not sent.
#[inline(always)]
pub fn stash_abort() {
    if let Some(s) = SCRATCH_VICTIM.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch slot.
        unsafe { (*s).stashed = 0 };
    }
}

/// Sends the end record [`stash_end`] left in this CPU's victim slot, if
/// any (the slow path calls this after a new flow's chain returned).
#[inline(never)]
pub fn flush_victim() {
    let Some(s) = SCRATCH_VICTIM.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot.
    unsafe {
        if (*s).pending == 0 {
            return;
        }
        (*s).pending = 0;
        if let Some(mut e) = reserve() {
            core::ptr::copy_nonoverlapping(&raw const (*s).record, e.as_mut_ptr(), 1);
            e.submit(0);
        }
    }
}

#[inline(always)]
fn count_lost() {
    if let Some(c) = FLOW_LOG_LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        unsafe { *c += 1 };
    }
}
