//! Backend selection: the flow hash indexes the service's Maglev table.
use plink_common::{NO_BACKEND, ServiceConfig};

use crate::maps::{BACKENDS, LB_TABLE};

/// `backend = LB_TABLE[lb_offset + hash % lb_size]` (Maglev fills the table).
#[inline(always)]
pub fn select_backend(
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
