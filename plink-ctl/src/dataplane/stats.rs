//! Reading the datapath's per-CPU counters, summed over CPUs.

use std::collections::BTreeMap;

use aya::maps::{PerCpuArray, PerCpuHashMap};
use plink_common::{Counters, DropReason, IfStats, MAX_NAT_SLOTS, map_names};

use super::Dataplane;

/// Which per-CPU counter array to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    Endpoint,
    Service,
    Backend,
}

impl Dataplane {
    fn sum_counters(&mut self, map: &str, index: u32) -> anyhow::Result<Counters> {
        let arr: PerCpuArray<_, Counters> = PerCpuArray::try_from(self.map_mut(map)?)?;
        let mut total = Counters::default();
        for v in arr.get(&index, 0)?.iter() {
            total.add(v);
        }
        Ok(total)
    }

    /// Counters of one endpoint, service or backend id.
    pub fn counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<Counters> {
        let map = match kind {
            CounterKind::Endpoint => map_names::EP_STATS,
            CounterKind::Service => return self.service_counters(id),
            CounterKind::Backend => map_names::BACKEND_STATS,
        };
        self.sum_counters(map, id)
    }

    /// A service's counters: the datapath counts its packets and bytes only
    /// per NAT address (one counter less per packet), the rest per service.
    fn service_counters(&mut self, id: u32) -> anyhow::Result<Counters> {
        let mut total = self.sum_counters(map_names::SVC_STATS, id)?;
        let mut traffic = Counters::default();
        for slot in 0..MAX_NAT_SLOTS as u32 {
            traffic.add(&self.nat_counters(id, slot)?);
        }
        total.packets_in = traffic.packets_in;
        total.bytes_in = traffic.bytes_in;
        total.packets_out = traffic.packets_out;
        total.bytes_out = traffic.bytes_out;
        Ok(total)
    }

    /// Counters of a service's NAT address in `slot`.
    pub fn nat_counters(&mut self, service_id: u32, slot: u32) -> anyhow::Result<Counters> {
        self.sum_counters(
            map_names::NAT_STATS,
            service_id * MAX_NAT_SLOTS as u32 + slot,
        )
    }

    fn sum_u64(&mut self, map: &str, index: u32) -> anyhow::Result<u64> {
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map_mut(map)?)?;
        Ok(arr
            .get(&index, 0)?
            .iter()
            .fold(0u64, |a, v| a.wrapping_add(*v)))
    }

    /// Per-interface counters by ifindex, summed over CPUs.
    pub fn interface_stats(&mut self) -> anyhow::Result<BTreeMap<u32, IfStats>> {
        let map: PerCpuHashMap<_, u32, IfStats> =
            PerCpuHashMap::try_from(self.map_mut(map_names::IF_STATS)?)?;
        super::sum_interface_stats(&map)
    }

    /// Drops by reason, over all endpoints.
    pub fn drop_counts(&mut self) -> anyhow::Result<BTreeMap<DropReason, u64>> {
        let mut out = BTreeMap::new();
        for r in DropReason::ALL {
            out.insert(*r, self.sum_u64(map_names::DROPS, *r as u32)?);
        }
        Ok(out)
    }

    /// Drops by reason attributed to one endpoint.
    pub fn endpoint_drop_counts(
        &mut self,
        endpoint_id: u32,
    ) -> anyhow::Result<BTreeMap<DropReason, u64>> {
        let mut out = BTreeMap::new();
        for r in DropReason::ALL {
            let idx = endpoint_id * DropReason::COUNT + *r as u32;
            out.insert(*r, self.sum_u64(map_names::EP_DROPS, idx)?);
        }
        Ok(out)
    }
}
