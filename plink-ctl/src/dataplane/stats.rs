//! Reading the datapath's per-CPU counters, summed over CPUs.

use std::collections::BTreeMap;

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
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
        let own = self.sum_counters(map_names::SVC_STATS, id)?;
        let mut slots = Vec::with_capacity(MAX_NAT_SLOTS);
        for slot in 0..MAX_NAT_SLOTS as u32 {
            slots.push(self.nat_counters(id, slot)?);
        }
        Ok(service_total(own, &slots))
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

/// A service's counters from its own slot (flows, refusals, MSS, PMTU) and
/// its NAT addresses' slots, whose traffic (packets, bytes) is the
/// service's: the datapath counts traffic once per packet, per NAT address.
pub fn service_total(own: Counters, nat_slots: &[Counters]) -> Counters {
    let mut traffic = Counters::default();
    for c in nat_slots {
        traffic.add(c);
    }
    Counters {
        packets_in: traffic.packets_in,
        bytes_in: traffic.bytes_in,
        packets_out: traffic.packets_out,
        bytes_out: traffic.bytes_out,
        ..own
    }
}

/// The counters `/metrics` reads; the dataplane itself, or a
/// [`CounterReader`] that needs no lock on it.
pub trait CounterSource {
    /// Counters of one endpoint, service or backend id.
    fn counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<Counters>;
    /// Drops by reason attributed to one endpoint.
    fn endpoint_drop_counts(
        &mut self,
        endpoint_id: u32,
    ) -> anyhow::Result<BTreeMap<DropReason, u64>>;
    /// Drops by reason, over all endpoints.
    fn drop_counts(&mut self) -> anyhow::Result<BTreeMap<DropReason, u64>>;
    /// Per-interface counters by ifindex.
    fn interface_stats(&mut self) -> anyhow::Result<BTreeMap<u32, IfStats>>;
}

impl CounterSource for Dataplane {
    fn counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<Counters> {
        Dataplane::counters(self, kind, id)
    }
    fn endpoint_drop_counts(
        &mut self,
        endpoint_id: u32,
    ) -> anyhow::Result<BTreeMap<DropReason, u64>> {
        Dataplane::endpoint_drop_counts(self, endpoint_id)
    }
    fn drop_counts(&mut self) -> anyhow::Result<BTreeMap<DropReason, u64>> {
        Dataplane::drop_counts(self)
    }
    fn interface_stats(&mut self) -> anyhow::Result<BTreeMap<u32, IfStats>> {
        Dataplane::interface_stats(self)
    }
}

/// Reads the counters through its own descriptors of the pinned maps, so a
/// scrape neither waits for nor holds up applies and the GC.
pub struct CounterReader {
    ep: PerCpuArray<MapData, Counters>,
    svc: PerCpuArray<MapData, Counters>,
    nat: PerCpuArray<MapData, Counters>,
    backend: PerCpuArray<MapData, Counters>,
    drops: PerCpuArray<MapData, u64>,
    ep_drops: PerCpuArray<MapData, u64>,
    ifaces: PerCpuHashMap<MapData, u32, IfStats>,
}

impl CounterReader {
    /// Opens the maps pinned under `bpffs_root`.
    pub fn open(bpffs_root: &std::path::Path) -> anyhow::Result<Self> {
        let dir = super::pin_dir(bpffs_root);
        let open = |name: &str| {
            let pin = dir.join(name);
            MapData::from_pin(&pin)
                .with_context(|| format!("opening the pinned map {}", pin.display()))
        };
        let array = |name: &str| open(name).map(aya::maps::Map::PerCpuArray);
        Ok(Self {
            ep: PerCpuArray::try_from(array(map_names::EP_STATS)?)?,
            svc: PerCpuArray::try_from(array(map_names::SVC_STATS)?)?,
            nat: PerCpuArray::try_from(array(map_names::NAT_STATS)?)?,
            backend: PerCpuArray::try_from(array(map_names::BACKEND_STATS)?)?,
            drops: PerCpuArray::try_from(array(map_names::DROPS)?)?,
            ep_drops: PerCpuArray::try_from(array(map_names::EP_DROPS)?)?,
            ifaces: PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(open(
                map_names::IF_STATS,
            )?))?,
        })
    }
}

fn sum_u64_at(arr: &PerCpuArray<MapData, u64>, index: u32) -> anyhow::Result<u64> {
    Ok(arr
        .get(&index, 0)?
        .iter()
        .fold(0u64, |a, v| a.wrapping_add(*v)))
}

fn sum_counters_at(arr: &PerCpuArray<MapData, Counters>, index: u32) -> anyhow::Result<Counters> {
    let mut total = Counters::default();
    for v in arr.get(&index, 0)?.iter() {
        total.add(v);
    }
    Ok(total)
}

impl CounterSource for CounterReader {
    fn counters(&mut self, kind: CounterKind, id: u32) -> anyhow::Result<Counters> {
        match kind {
            CounterKind::Endpoint => sum_counters_at(&self.ep, id),
            CounterKind::Backend => sum_counters_at(&self.backend, id),
            CounterKind::Service => {
                let mut slots = Vec::with_capacity(MAX_NAT_SLOTS);
                for slot in 0..MAX_NAT_SLOTS as u32 {
                    slots.push(sum_counters_at(
                        &self.nat,
                        id * MAX_NAT_SLOTS as u32 + slot,
                    )?);
                }
                Ok(service_total(sum_counters_at(&self.svc, id)?, &slots))
            }
        }
    }
    fn endpoint_drop_counts(
        &mut self,
        endpoint_id: u32,
    ) -> anyhow::Result<BTreeMap<DropReason, u64>> {
        let mut out = BTreeMap::new();
        for r in DropReason::ALL {
            let idx = endpoint_id * DropReason::COUNT + *r as u32;
            out.insert(*r, sum_u64_at(&self.ep_drops, idx)?);
        }
        Ok(out)
    }
    fn drop_counts(&mut self) -> anyhow::Result<BTreeMap<DropReason, u64>> {
        let mut out = BTreeMap::new();
        for r in DropReason::ALL {
            out.insert(*r, sum_u64_at(&self.drops, *r as u32)?);
        }
        Ok(out)
    }
    fn interface_stats(&mut self) -> anyhow::Result<BTreeMap<u32, IfStats>> {
        super::sum_interface_stats(&self.ifaces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_traffic_is_the_sum_of_its_nat_addresses() {
        let own = Counters {
            packets_in: 999,
            flows_created: 3,
            refused_rate: 2,
            ..Default::default()
        };
        let slot = |p, b| Counters {
            packets_in: p,
            bytes_in: b,
            packets_out: p + 1,
            bytes_out: b + 1,
            flows_created: 100,
            ..Default::default()
        };
        let t = service_total(own, &[slot(1, 10), slot(2, 20), Counters::default()]);
        assert_eq!((t.packets_in, t.bytes_in), (3, 30));
        assert_eq!((t.packets_out, t.bytes_out), (5, 32));
        // Flows and refusals are the service's own, not the slots'.
        assert_eq!((t.flows_created, t.refused_rate), (3, 2));
    }
}
