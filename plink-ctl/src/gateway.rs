//! The running gateway: turns the controller's [`Model`] into the
//! dataplane's [`DataplaneSpec`], applies it, purges flows the model no
//! longer allows, and reads counters for metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use std::{
    process::Command,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};

use crate::{
    approval::ConnectionState,
    config::{BackendState as CfgBackendState, Config, MssClamp, Protocol as CfgProtocol, Role},
    dataplane::CounterKind,
    dataplane::{
        AnswerPath, BackendSpec, BackendState, Dataplane, DataplaneSpec, EndpointSpec,
        EndpointState, GcReport, InterfaceRole, InterfaceSpec, NatSpec, PortSpec, Protocol,
        ServiceSpec, Sizes, TimeoutSpec, garp,
    },
    devstats,
    maglev::{self, MaglevBackend},
    metrics,
    model::{BackendId, Model},
};

/// The MAC address of an interface in the current network namespace.
///
/// Read with an ioctl rather than from /sys: under `nsenter --net`, /sys
/// still shows the namespace it was mounted in.
pub fn interface_mac(name: &str) -> anyhow::Result<[u8; 6]> {
    if name.len() >= libc::IF_NAMESIZE {
        bail!("interface name {name:?} is too long");
    }
    // SAFETY: a plain datagram socket used only for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is open and req is a valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("reading the MAC address of {name}: {err}");
    }
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

/// Backend health as the health checker sees it; every backend is healthy
/// until a checker says otherwise.
pub trait Health {
    fn healthy(&self, backend: BackendId) -> bool;
}

/// All backends healthy (no health checks configured or run).
pub struct AllHealthy;

impl Health for AllHealthy {
    fn healthy(&self, _: BackendId) -> bool {
        true
    }
}

/// Keeps each NAT address in the slot it had, so counters and flows keyed by
/// slot survive reloads; addresses that left the config stay as draining
/// (no new flows, existing flows keep their port) in their slot.
fn nat_slots(
    wanted: &[Ipv4Addr],
    ports: (u16, u16),
    previous: Option<&ServiceSpec>,
) -> Vec<NatSpec> {
    let mut slots: Vec<Option<NatSpec>> = match previous {
        Some(prev) => prev
            .nat
            .iter()
            .map(|n| {
                Some(NatSpec {
                    addr: n.addr,
                    ports: n.ports.clone(),
                    draining: !wanted.contains(&n.addr),
                })
            })
            .collect(),
        None => Vec::new(),
    };
    for s in slots.iter_mut().flatten() {
        if !s.draining {
            s.ports = ports.0..=ports.1;
        }
    }
    for addr in wanted {
        if slots.iter().flatten().any(|s| s.addr == *addr) {
            continue;
        }
        let fresh = NatSpec {
            addr: *addr,
            ports: ports.0..=ports.1,
            draining: false,
        };
        // Reuse a draining slot only when we would otherwise exceed the limit.
        if slots.len() < plink_common::MAX_NAT_SLOTS {
            slots.push(Some(fresh));
        } else if let Some(free) = slots
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|s| s.draining))
        {
            *free = Some(fresh);
        }
    }
    slots.into_iter().flatten().collect()
}

/// Computes the dataplane spec for `model`. `previous` is the spec applied
/// before (keeps NAT slots stable); `health` filters backends out of the
/// lookup tables.
pub fn spec_from_model(
    model: &Model,
    previous: Option<&DataplaneSpec>,
    health: &dyn Health,
) -> anyhow::Result<DataplaneSpec> {
    let mut interfaces = Vec::new();
    for iface in model.interfaces.values() {
        let ifindex = crate::dataplane::ifindex(&iface.name)?;
        let role = match (iface.role, iface.network) {
            (Role::Consumer, Some(n)) => InterfaceRole::Consumer { network_id: n.0 },
            (Role::Consumer, None) => bail!("consumer interface {} has no network", iface.name),
            (Role::Provider, _) => InterfaceRole::Provider,
        };
        let driver = crate::devstats::driver_name(&iface.name)?;
        interfaces.push(InterfaceSpec {
            ifindex,
            role,
            mac: interface_mac(&iface.name)?,
            answers: AnswerPath::for_driver(driver.as_deref()),
        });
    }
    let t = &model.gateway.timeouts;
    let timeouts = TimeoutSpec {
        tcp_established: t.tcp_established.0,
        tcp_transitory: t.tcp_transitory.0,
        udp: t.udp.0,
        icmp: t.icmp.0,
    };
    let prev_services: BTreeMap<u32, &ServiceSpec> = previous
        .map(|p| p.services.iter().map(|s| (s.id, s)).collect())
        .unwrap_or_default();
    let mut services = Vec::new();
    let mut backends = Vec::new();
    for svc in model.services.values() {
        let port = svc.ports.first().map(|p| p.target_port).unwrap_or(0);
        // Only active, healthy backends with weight take new flows.
        let candidates: Vec<(BackendId, MaglevBackend)> = svc
            .backends
            .iter()
            .filter(|b| b.state == CfgBackendState::Active && health.healthy(b.id))
            .map(|b| {
                (
                    b.id,
                    MaglevBackend {
                        address: b.address,
                        port,
                        weight: b.weight,
                    },
                )
            })
            .collect();
        let table_input: Vec<MaglevBackend> = candidates.iter().map(|(_, b)| *b).collect();
        let lookup = maglev::build_table(&table_input, svc.maglev_table_size)
            .with_context(|| format!("building the Maglev table of service {}", svc.name))?
            .into_iter()
            .map(|i| candidates[i as usize].0.0)
            .collect();
        services.push(ServiceSpec {
            id: svc.id.0,
            nat: nat_slots(
                &svc.nat.addresses,
                (svc.nat.ports.first, svc.nat.ports.last),
                prev_services.get(&svc.id.0).copied(),
            ),
            lookup,
            mss_clamp: match svc.mss_clamp {
                None => plink_common::MSS_CLAMP_OFF,
                Some(MssClamp::Auto) => plink_common::MSS_CLAMP_AUTO,
                // Validated to 536-65495, below the AUTO marker.
                Some(MssClamp::Bytes(n)) => {
                    u16::try_from(n).map_or(plink_common::MSS_CLAMP_OFF, |n| n.min(u16::MAX - 1))
                }
            },
        });
        for b in &svc.backends {
            backends.push(BackendSpec {
                id: b.id.0,
                service_id: svc.id.0,
                addr: b.address,
                state: match b.state {
                    CfgBackendState::Active if health.healthy(b.id) => BackendState::Active,
                    CfgBackendState::Active | CfgBackendState::Down => BackendState::Down,
                    CfgBackendState::Draining => BackendState::Draining,
                },
            });
        }
    }
    let endpoints = model
        .endpoints
        .values()
        .map(|e| EndpointSpec {
            id: e.id.0,
            network_id: e.network_id.0,
            addr: e.address,
            service_id: e.service_id.0,
            protocol: match e.protocol {
                CfgProtocol::Tcp => Protocol::Tcp,
                CfgProtocol::Udp => Protocol::Udp,
            },
            ports: e
                .ports
                .iter()
                .map(|p| PortSpec {
                    port: p.port,
                    target_port: p.target_port,
                })
                .collect(),
            state: match e.state {
                ConnectionState::Pending => EndpointState::Pending,
                ConnectionState::Approved => EndpointState::Approved,
                ConnectionState::Rejected => EndpointState::Rejected,
                ConnectionState::Removed => EndpointState::Removed,
            },
            max_flows: e.limits.max_flows,
            new_flows_per_sec: e.limits.new_flows_per_second,
        })
        .collect();
    Ok(DataplaneSpec {
        interfaces,
        timeouts,
        services,
        backends,
        endpoints,
    })
}

/// The dataplane with the spec it last applied.
pub struct Gateway {
    pub dp: Dataplane,
    pub spec: Option<DataplaneSpec>,
    /// Flows at the last GC sweep (gauges are served from it, not a scan per scrape).
    pub last_gc: GcReport,
    /// NAT ports held per NAT address at the last GC sweep.
    pub nat_in_use: BTreeMap<Ipv4Addr, u64>,
    pub conntrack_capacity: u64,
}

/// Keeps the next hop of every backend resolved with a managed neighbour
/// entry, so the datapath's FIB lookups find a neighbour (NO_NEIGH is a drop).
/// Returns the next hops.
pub fn manage_neighbours(provider: &str, addrs: &BTreeSet<Ipv4Addr>) -> BTreeSet<Ipv4Addr> {
    let mut hops = BTreeSet::new();
    for addr in addrs {
        let a = addr.to_string();
        let route = Command::new("ip")
            .args(["-o", "-4", "route", "get", &a])
            .output();
        // A backend behind a router: the router is the neighbour to keep.
        let hop = match route {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let words: Vec<&str> = text.split_whitespace().collect();
                words
                    .windows(2)
                    .find(|w| w[0] == "via")
                    .and_then(|w| w[1].parse().ok())
                    .unwrap_or(*addr)
            }
            _ => *addr,
        };
        hops.insert(hop);
    }
    let ifindex = match crate::dataplane::ifindex(provider) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("managed neighbours: {e:#}");
            return hops;
        }
    };
    for hop in &hops {
        if let Err(e) = crate::dataplane::neigh::ensure_managed(ifindex, *hop) {
            tracing::warn!(next_hop = %hop, "cannot keep the next hop resolved: {e:#}");
        }
    }
    hops
}

/// Waits (bounded) until the kernel has resolved `hops` on `provider`, so the
/// first packets after start are not NO_NEIGH drops. Unresolved hops are
/// logged: their backends answer once they appear.
pub fn wait_for_neighbours(
    provider: &str,
    hops: &BTreeSet<Ipv4Addr>,
    timeout: std::time::Duration,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let out = Command::new("ip")
            .args(["-4", "neigh", "show", "dev", provider])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let unresolved: Vec<&Ipv4Addr> = hops
            .iter()
            .filter(|h| {
                !text.lines().any(|l| {
                    l.split_whitespace().next() == Some(h.to_string().as_str())
                        && l.contains("lladdr")
                })
            })
            .collect();
        if unresolved.is_empty() {
            return;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                ?unresolved,
                "next hops not resolved yet; their flows drop as fib_no_neigh until they are"
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Gateway {
    /// Loads the programs with maps sized from the config, pinned under
    /// `gateway.bpffs_root`, and attaches them to every configured interface.
    pub fn start(config: &Config) -> anyhow::Result<Self> {
        let lb_table: u32 = config
            .lb_table_slots()
            .try_into()
            .context("the Maglev tables of all services exceed 2^32 slots")?;
        let sizes = Sizes {
            conntrack: config.gateway.conntrack.max_flows,
            lb_table,
        };
        let mut dp =
            Dataplane::load_with(crate::EBPF_OBJECT, Some(&config.gateway.bpffs_root), sizes)?;
        dp.attach_all(config)?;
        Ok(Self {
            dp,
            spec: None,
            last_gc: GcReport::default(),
            nat_in_use: BTreeMap::new(),
            conntrack_capacity: u64::from(sizes.conntrack),
        })
    }

    /// Backends that the running dataplane (adopted from its pins) records
    /// as down while the config has them active: a previous controller's
    /// health checks took them out, and they stay out until they pass again.
    pub fn adopted_down_backends(&mut self, model: &Model) -> Vec<BackendId> {
        let Ok(map) = self.dp.map_mut(plink_common::map_names::BACKENDS) else {
            return Vec::new();
        };
        let Ok(map) = aya::maps::Array::<_, plink_common::BackendInfo>::try_from(map) else {
            return Vec::new();
        };
        model
            .services
            .values()
            .filter(|s| s.health_check.is_some())
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.state == CfgBackendState::Active)
            .filter(|b| {
                map.get(&b.id.0, 0)
                    .is_ok_and(|i| i.enabled != 0 && i.state == plink_common::backend_state::DOWN)
            })
            .map(|b| b.id)
            .collect()
    }

    /// Sends gratuitous ARP for every endpoint and NAT address.
    pub fn announce(&self) {
        let Some(spec) = &self.spec else { return };
        for (ifindex, mac, addrs) in spec.garp_plan() {
            if let Err(e) = garp::announce(ifindex, mac, &addrs) {
                tracing::warn!("gratuitous ARP: {e:#}");
            }
        }
    }

    /// Removes expired flows; remembers the flow count and the NAT ports in
    /// use for metrics (gauges come from this sweep, not a scan per scrape).
    pub fn gc(&mut self) -> anyhow::Result<()> {
        self.last_gc = self.dp.gc_conntrack()?;
        self.nat_in_use = self.dp.nat_ports_in_use()?;
        Ok(())
    }

    /// Applies `model` as a diff, then purges the flows it no longer allows:
    /// endpoints that stopped passing traffic or left, and backends that left
    /// the config without being drained first.
    pub fn apply_model(&mut self, model: &Model, health: &dyn Health) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let spec = spec_from_model(model, self.spec.as_ref(), health)?;
        self.dp.apply_after(&spec, self.spec.as_ref())?;
        tracing::debug!(elapsed = ?started.elapsed(), "model applied to the maps");
        if let Some(provider) = model.interfaces.values().find(|i| i.role == Role::Provider) {
            let backends: BTreeSet<Ipv4Addr> = spec
                .backends
                .iter()
                .filter(|b| b.state != BackendState::Down)
                .map(|b| b.addr)
                .collect();
            let hops = manage_neighbours(&provider.name, &backends);
            if self.spec.is_none() {
                wait_for_neighbours(&provider.name, &hops, std::time::Duration::from_secs(3));
            }
        }
        if let Some(old) = &self.spec {
            let approved: BTreeSet<u32> = spec
                .endpoints
                .iter()
                .filter(|e| e.state == EndpointState::Approved)
                .map(|e| e.id)
                .collect();
            for e in &old.endpoints {
                if e.state == EndpointState::Approved && !approved.contains(&e.id) {
                    let report = self.dp.purge_endpoint(e.id)?;
                    tracing::info!(endpoint_id = e.id, ?report, "flows purged");
                }
            }
            let kept: BTreeSet<u32> = spec.backends.iter().map(|b| b.id).collect();
            for b in &old.backends {
                if !kept.contains(&b.id) && b.state != BackendState::Draining {
                    let report = self.dp.purge_backend(b.id)?;
                    tracing::info!(backend_id = b.id, ?report, "backend removed: flows reset");
                }
            }
        }
        self.spec = Some(spec);
        Ok(())
    }
}

impl Gateway {
    /// Reads every counter for `/metrics`. Per-CPU values are summed here, at
    /// scrape time; the flow count comes from the last GC sweep.
    pub fn snapshot(&mut self, model: &Model) -> anyhow::Result<metrics::Snapshot> {
        let mut snap = metrics::Snapshot {
            conntrack_entries: self.last_gc.remaining,
            conntrack_capacity: self.conntrack_capacity,
            ..Default::default()
        };
        for e in model.endpoints.values() {
            if e.state == ConnectionState::Removed {
                continue;
            }
            let c = self.dp.counters(CounterKind::Endpoint, e.id.0)?;
            for (reason, count) in self.dp.endpoint_drop_counts(e.id.0)? {
                // Only reasons that happened: endpoints x reasons is a lot of zeros.
                if count > 0 {
                    snap.endpoint_drops.push(metrics::EndpointDropSample {
                        endpoint: e.name.clone(),
                        service: e.service.clone(),
                        reason: reason.name().to_owned(),
                        count,
                    });
                }
            }
            snap.endpoints.push(metrics::EndpointSample {
                endpoint: e.name.clone(),
                service: e.service.clone(),
                state: e.state.to_string(),
                protocol: protocol_name(e.protocol).to_owned(),
                packets_in: c.packets_in,
                bytes_in: c.bytes_in,
                packets_out: c.packets_out,
                bytes_out: c.bytes_out,
                connections: c.flows_created,
                refused_max_flows: c.refused_max_flows,
                refused_rate: c.refused_rate,
            });
        }
        let in_use = &self.nat_in_use;
        let up: BTreeSet<u32> = self
            .spec
            .iter()
            .flat_map(|s| s.services.iter())
            .flat_map(|s| s.lookup.iter().copied())
            .collect();
        for svc in model.services.values() {
            let c = self.dp.counters(CounterKind::Service, svc.id.0)?;
            snap.services.push(metrics::ServiceSample {
                service: svc.name.clone(),
                packets_in: c.packets_in,
                bytes_in: c.bytes_in,
                packets_out: c.packets_out,
                bytes_out: c.bytes_out,
                nat_port_allocation_failures: c.nat_alloc_failures,
                mss_clamped_in: c.mss_clamped_in,
                mss_clamped_out: c.mss_clamped_out,
                frag_needed_to_backend: c.frag_needed_to_backend,
            });
            for b in &svc.backends {
                let c = self.dp.counters(CounterKind::Backend, b.id.0)?;
                snap.backends.push(metrics::BackendSample {
                    service: svc.name.clone(),
                    backend: b.address.to_string(),
                    bytes: c.bytes_in + c.bytes_out,
                    connections: c.flows_created,
                    up: up.contains(&b.id.0),
                });
            }
            let spec_nat = self
                .spec
                .iter()
                .flat_map(|s| s.services.iter())
                .find(|s| s.id == svc.id.0)
                .map(|s| s.nat.clone())
                .unwrap_or_default();
            for n in spec_nat {
                snap.nat.push(metrics::NatSample {
                    service: svc.name.clone(),
                    nat_address: n.addr.to_string(),
                    ports_in_use: in_use.get(&n.addr).copied().unwrap_or(0),
                    ports_capacity: u64::from(*n.ports.end()) - u64::from(*n.ports.start()) + 1,
                });
            }
        }
        for (reason, count) in self.dp.drop_counts()? {
            snap.drops.push((reason.name().to_owned(), count));
        }
        for (index, stats) in self.dp.interface_stats()? {
            let interface = crate::dataplane::ifname(index).unwrap_or_else(|| index.to_string());
            snap.interfaces.push(metrics::InterfaceSample {
                interface,
                verdicts: stats.verdicts,
            });
        }
        for iface in model.interfaces.values() {
            // A device we cannot read is left out, not a failed scrape.
            match devstats::read(&iface.name) {
                Ok(d) => snap.devices.push(metrics::DeviceSample {
                    device: iface.name.clone(),
                    xdp_tx_errors: d.tx_errors,
                    xdp_redirect_errors: d.redirect_errors,
                    tx_dropped: d.tx_dropped,
                }),
                Err(e) => tracing::debug!(device = %iface.name, "device counters: {e:#}"),
            }
        }
        Ok(snap)
    }

    /// Live flows with their NAT mapping and the names the model gives them.
    pub fn conntrack_json(&mut self, model: &Model) -> anyhow::Result<serde_json::Value> {
        let flows = self.dp.list_conntrack()?;
        let rows: Vec<serde_json::Value> = flows
            .iter()
            .map(|f| {
                let endpoint = model
                    .endpoints
                    .values()
                    .find(|e| e.id.0 == f.endpoint_id)
                    .map(|e| e.name.clone());
                let network = model
                    .networks
                    .iter()
                    .find(|(_, id)| id.0 == f.network_id)
                    .map(|(n, _)| n.clone());
                serde_json::json!({
                    "endpoint": endpoint,
                    "network": network,
                    "network_id": f.network_id,
                    "protocol": match f.protocol {
                        plink_common::IPPROTO_TCP => "tcp",
                        plink_common::IPPROTO_UDP => "udp",
                        plink_common::IPPROTO_ICMP => "icmp",
                        _ => "other",
                    },
                    "client": format!("{}:{}", f.client.0, f.client.1),
                    "endpoint_address": format!("{}:{}", f.endpoint.0, f.endpoint.1),
                    "nat": format!("{}:{}", f.nat.0, f.nat.1),
                    "backend": format!("{}:{}", f.backend.0, f.backend.1),
                    "backend_id": f.backend_id,
                    "tcp_state": f.tcp_state,
                    "ingress_ifindex": f.ingress_ifindex,
                    "expires_in_ms": f.expires_in.as_millis() as u64,
                })
            })
            .collect();
        Ok(serde_json::json!({ "flows": rows }))
    }
}

fn protocol_name(p: CfgProtocol) -> &'static str {
    match p {
        CfgProtocol::Tcp => "tcp",
        CfgProtocol::Udp => "udp",
    }
}

/// The admin API's view of a running gateway.
pub struct GatewayQueries {
    pub gateway: Arc<Mutex<Gateway>>,
    pub models: tokio::sync::watch::Receiver<Arc<Model>>,
}

impl crate::controller::DataplaneQueries for GatewayQueries {
    fn conntrack(&self) -> anyhow::Result<serde_json::Value> {
        let model = self.models.borrow().clone();
        lock(&self.gateway).conntrack_json(&model)
    }
}

/// Locks the gateway; its state stays coherent if a holder panicked.
pub fn lock(g: &Mutex<Gateway>) -> std::sync::MutexGuard<'_, Gateway> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, last)
    }

    #[test]
    fn nat_slots_stay_put_and_removed_addresses_drain() {
        let first = nat_slots(&[a(200), a(201), a(202)], (1024, 2047), None);
        let prev = ServiceSpec {
            id: 1,
            nat: first.clone(),
            lookup: vec![],
            mss_clamp: 0,
        };
        // Remove the middle address, add a new one.
        let next = nat_slots(&[a(200), a(202), a(203)], (1024, 2047), Some(&prev));
        let addrs: Vec<_> = next.iter().map(|n| (n.addr, n.draining)).collect();
        assert_eq!(
            addrs,
            vec![
                (a(200), false),
                (a(201), true),
                (a(202), false),
                (a(203), false)
            ]
        );
    }
}
