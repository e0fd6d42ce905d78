//! The endpoint a consumer packet is addressed to: looked up (new flows and
//! the slow path) or checked through the generation the flow carries
//! (established flows).
use plink_common::{CtFwdKey, CtFwdValue, DropReason, EndpointKey, EndpointValue, ep_state};

use crate::{
    maps::{ENDPOINTS, EP_GEN},
    parse::Flow,
    stats::NO_EP,
    step::Step,
};

/// The approved endpoint the packet `f` (forward key `key`) is addressed
/// to, or the drop: no endpoint, or one that is pending, rejected or removed
/// (counted against it).
#[inline(always)]
pub fn lookup(f: &Flow, key: &CtFwdKey) -> Result<EndpointValue, (Step, u32)> {
    lookup_by(key, f.dport_be, f.proto)
}

/// [`lookup`] for a packet whose port and protocol are those of its key
/// (IPv6: `v6::consumer`).
#[inline(always)]
pub fn lookup_key(key: &CtFwdKey) -> Result<EndpointValue, (Step, u32)> {
    lookup_by(key, key.dst_port_be, key.proto)
}

#[inline(always)]
fn lookup_by(key: &CtFwdKey, port_be: u16, proto: u8) -> Result<EndpointValue, (Step, u32)> {
    let ep_key = EndpointKey {
        network_id: key.network_id,
        addr_be: key.dst_addr_be,
        port_be,
        proto,
        _pad: 0,
    };
    // SAFETY: map value copied out.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ep_key) }).copied() else {
        return Err((Step::drop(DropReason::NoEndpoint), NO_EP));
    };
    let refused = match ep.state {
        ep_state::APPROVED => return Ok(ep),
        ep_state::PENDING => DropReason::EndpointPending,
        ep_state::REJECTED => DropReason::EndpointRejected,
        _ => DropReason::EndpointRemoved,
    };
    Err((Step::drop(refused), ep.endpoint_id))
}

/// The generation of endpoint `endpoint_id` (0: none).
#[inline(always)]
pub fn generation(endpoint_id: u32) -> u32 {
    EP_GEN.get(endpoint_id).map_or(0, |g| g.gen_id)
}

/// Is the endpoint `v` was created through still the same and approved?
/// One array read replaces the endpoint lookup for established flows: a
/// re-pointed, rejected or removed endpoint (or a reused id) is noticed on
/// the next packet, without waiting for the controller's purge.
#[inline(always)]
pub fn current(v: &CtFwdValue) -> bool {
    EP_GEN
        .get(v.endpoint_id)
        .is_some_and(|g| g.gen_id == v.ep_gen && g.gen_id != 0 && g.state == ep_state::APPROVED)
}
