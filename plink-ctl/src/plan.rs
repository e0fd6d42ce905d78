//! Plan: the pure half of the reconcile loop (SPEC §9). [`plan`] turns the
//! controller's [`Model`] and what was observed of the host and the running
//! dataplane ([`Observed`]) into the [`DataplaneSpec`] to apply, and finds
//! everything that would make the apply fail (a NAT address still draining
//! in another service, ids or entries beyond the map sizes) before anything
//! is written. [`FlowPolicy`] says which live flows the spec still allows.
//!
//! Nothing here touches the system; the observing (interfaces, pinned maps)
//! and the applying live in [`crate::gateway`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use plink_common::{
    CtFwdKey, CtFwdValue, EndpointKey, IPPROTO_ICMP, MAX_BACKENDS, MAX_ENDPOINTS, MAX_INTERFACES,
    MAX_NAT_COUNTERS, MAX_NAT_SLOTS, MAX_SERVICES,
};

use crate::{
    approval::ConnectionState,
    config::{BackendState as CfgBackendState, MssClamp, Protocol as CfgProtocol, Role},
    dataplane::{
        AnswerPath, BackendSpec, BackendState, DataplaneSpec, EndpointSpec, EndpointState,
        InterfaceRole, InterfaceSpec, NatSpec, PortSpec, Protocol, ServiceSpec, TimeoutSpec,
    },
    maglev::{self, MaglevBackend},
    model::{BackendId, Model, ServiceId},
};

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

/// An interface as the host has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInterface {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// How XDP's own answers leave it (chosen from its driver).
    pub answers: AnswerPath,
}

/// The entries each map holds (its `max_entries`). [`Capacities::BUILD`] is
/// what this build's eBPF object declares; a running dataplane reports its
/// own (`Dataplane::capacities`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub interfaces: u32,
    /// `ENDPOINTS`: one entry per endpoint port, plus one echo entry per
    /// endpoint address.
    pub endpoint_keys: u32,
    /// `ARP_ENDPOINTS`: one per endpoint address.
    pub endpoint_addresses: u32,
    /// Endpoint ids are `0..endpoints` (per-endpoint arrays).
    pub endpoints: u32,
    pub services: u32,
    pub backends: u32,
    /// `NAT_ADDRS`, draining addresses included.
    pub nat_addresses: u32,
}

impl Capacities {
    /// The sizes `plink-ebpf/src/maps.rs` gives the maps (a unit test checks
    /// them against the embedded object).
    pub const BUILD: Capacities = Capacities {
        interfaces: MAX_INTERFACES,
        endpoint_keys: MAX_ENDPOINTS * 4,
        endpoint_addresses: MAX_ENDPOINTS,
        endpoints: MAX_ENDPOINTS,
        services: MAX_SERVICES,
        backends: MAX_BACKENDS,
        nat_addresses: MAX_NAT_COUNTERS,
    };
}

impl Default for Capacities {
    fn default() -> Self {
        Self::BUILD
    }
}

/// What the plan is computed from besides the model: the host's interfaces
/// and what the running dataplane holds.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Interfaces by name.
    pub interfaces: BTreeMap<String, HostInterface>,
    /// The spec the dataplane holds (keeps NAT slots stable); `None` on a
    /// fresh or adopting start.
    pub previous: Option<DataplaneSpec>,
    /// NAT ports held per NAT address (all protocols).
    pub nat_ports_in_use: BTreeMap<Ipv4Addr, u64>,
    pub capacities: Capacities,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "interface {0:?} does not exist on this host (in this network namespace): create it, or take it out of the config"
    )]
    MissingInterface(String),
    #[error("consumer interface {0:?} has no network")]
    NoNetwork(String),
    #[error(
        "NAT address {addr} cannot move to service {to:?}: service {from:?} still drains {flows} NAT port(s) on it (its flows keep the address until they expire). Give {to:?} another address, or move this one once {from:?}'s flows on it are gone (`plink-ctl conntrack` lists them)"
    )]
    NatAddressDraining {
        addr: Ipv4Addr,
        from: String,
        to: String,
        flows: u64,
    },
    #[error("building the Maglev table of service {service:?}: {why}")]
    Maglev { service: String, why: String },
    /// The spec breaks a map limit or an invariant (see `DataplaneSpec::validate_within`).
    #[error("{0}")]
    Invalid(String),
}

fn service_name(model: &Model, id: u32) -> String {
    model
        .services
        .get(&ServiceId(id))
        .map(|s| s.name.clone())
        .unwrap_or_else(|| format!("#{id}"))
}

/// Keeps each NAT address in the slot it had, so counters and flows keyed by
/// slot survive reloads; addresses that left the config stay as draining
/// (no new flows, existing flows keep their port) in their slot. A vacant
/// slot (address 0.0.0.0) is reused first.
fn nat_slots(
    wanted: &[Ipv4Addr],
    ports: (u16, u16),
    previous: Option<&ServiceSpec>,
    in_use: &BTreeMap<Ipv4Addr, u64>,
) -> Vec<NatSpec> {
    let mut slots: Vec<NatSpec> = match previous {
        Some(prev) => prev
            .nat
            .iter()
            .map(|n| NatSpec {
                addr: n.addr,
                ports: if wanted.contains(&n.addr) {
                    ports.0..=ports.1
                } else {
                    n.ports.clone()
                },
                draining: !wanted.contains(&n.addr),
            })
            .collect(),
        None => Vec::new(),
    };
    for addr in wanted {
        if slots.iter().any(|s| s.addr == *addr) {
            continue;
        }
        let fresh = NatSpec {
            addr: *addr,
            ports: ports.0..=ports.1,
            draining: false,
        };
        let vacant = slots.iter_mut().find(|s| s.addr.is_unspecified());
        if let Some(slot) = vacant {
            *slot = fresh;
        } else if slots.len() < MAX_NAT_SLOTS {
            slots.push(fresh);
        } else if let Some(slot) = slots
            .iter_mut()
            .filter(|s| s.draining)
            .min_by_key(|s| in_use.get(&s.addr).copied().unwrap_or(0))
        {
            // All slots taken: the draining address with the fewest flows
            // gives its slot up (config validation allows 8 addresses, so
            // there is always a draining one here).
            *slot = fresh;
        }
    }
    slots
}

/// Computes the dataplane spec for `model` on the observed host and
/// dataplane, and checks it against the map sizes: an `Ok` spec can be
/// written. `health` takes backends out of the lookup tables.
pub fn plan(
    model: &Model,
    observed: &Observed,
    health: &dyn Health,
) -> Result<DataplaneSpec, PlanError> {
    let mut interfaces = Vec::new();
    for iface in model.interfaces.values() {
        let host = observed
            .interfaces
            .get(&iface.name)
            .ok_or_else(|| PlanError::MissingInterface(iface.name.clone()))?;
        let role = match (iface.role, iface.network) {
            (Role::Consumer, Some(n)) => InterfaceRole::Consumer { network_id: n.0 },
            (Role::Consumer, None) => return Err(PlanError::NoNetwork(iface.name.clone())),
            (Role::Provider, _) => InterfaceRole::Provider,
        };
        interfaces.push(InterfaceSpec {
            ifindex: host.ifindex,
            role,
            mac: host.mac,
            answers: host.answers,
        });
    }
    let t = &model.gateway.timeouts;
    let timeouts = TimeoutSpec {
        tcp_established: t.tcp_established.0,
        tcp_transitory: t.tcp_transitory.0,
        udp: t.udp.0,
        icmp: t.icmp.0,
    };
    let prev_services: BTreeMap<u32, &ServiceSpec> = observed
        .previous
        .iter()
        .flat_map(|p| p.services.iter().map(|s| (s.id, s)))
        .collect();
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
            .map_err(|e| PlanError::Maglev {
                service: svc.name.clone(),
                why: format!("{e:#}"),
            })?
            .into_iter()
            .map(|i| candidates[i as usize].0.0)
            .collect();
        services.push(ServiceSpec {
            id: svc.id.0,
            nat: nat_slots(
                &svc.nat.addresses,
                (svc.nat.ports.first, svc.nat.ports.last),
                prev_services.get(&svc.id.0).copied(),
                &observed.nat_ports_in_use,
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
    // A NAT address another service now wants leaves its draining slot, if
    // no flow holds a port on it any more; otherwise the move must wait.
    let active: BTreeMap<Ipv4Addr, u32> = services
        .iter()
        .flat_map(|s| s.nat.iter().filter(|n| !n.draining).map(|n| (n.addr, s.id)))
        .collect();
    for s in &mut services {
        for n in s.nat.iter_mut().filter(|n| n.draining) {
            let Some(&to) = active.get(&n.addr) else {
                continue;
            };
            let flows = observed.nat_ports_in_use.get(&n.addr).copied().unwrap_or(0);
            if flows > 0 {
                return Err(PlanError::NatAddressDraining {
                    addr: n.addr,
                    from: service_name(model, s.id),
                    to: service_name(model, to),
                    flows,
                });
            }
            n.addr = Ipv4Addr::UNSPECIFIED;
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
    let spec = DataplaneSpec {
        interfaces,
        timeouts,
        services,
        backends,
        endpoints,
    };
    spec.validate_within(&observed.capacities)
        .map_err(|e| PlanError::Invalid(format!("{e:#}")))?;
    Ok(spec)
}

/// Why a live flow is no longer allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stale {
    /// No endpoint (any more) at the flow's network, address, protocol and port.
    NoEndpoint,
    /// The endpoint entry there is another endpoint, or points to another service.
    Repointed,
    /// Its endpoint is pending, rejected or removed.
    NotApproved,
    /// The endpoint's port now maps to another backend port.
    TargetPortChanged,
    /// The backend left the service (without having been drained first).
    BackendGone,
    /// The backend is `down` in the config.
    BackendDown,
}

impl Stale {
    pub fn name(self) -> &'static str {
        match self {
            Stale::NoEndpoint => "endpoint_gone",
            Stale::Repointed => "endpoint_repointed",
            Stale::NotApproved => "endpoint_not_approved",
            Stale::TargetPortChanged => "target_port_changed",
            Stale::BackendGone => "backend_gone",
            Stale::BackendDown => "backend_down",
        }
    }
}

/// Which live flows a spec allows (SPEC §9: after every apply and every
/// adopting start, each live flow is allowed by the desired spec or purged).
pub struct FlowPolicy {
    endpoints: BTreeMap<EndpointKey, (u32, u32, u16, bool)>,
    /// Backend id → (service id, address, down in the config).
    backends: BTreeMap<u32, (u32, [u32; 4], bool)>,
    /// Backends removed from the config after being drained: their flows
    /// run out on their own.
    retired: BTreeSet<(u32, Ipv4Addr)>,
}

impl FlowPolicy {
    /// The policy of `spec` (as applied), with `model` saying which backends
    /// the config has `down` (a health-check failure keeps its flows) and
    /// `retired` the drained backends that left the config.
    pub fn new(spec: &DataplaneSpec, model: &Model, retired: &BTreeSet<(u32, Ipv4Addr)>) -> Self {
        let mut endpoints = BTreeMap::new();
        for e in &spec.endpoints {
            let approved = e.state == EndpointState::Approved;
            for p in &e.ports {
                let key = crate::dataplane::spec::endpoint_key(e, p.port, e.protocol.number());
                endpoints.insert(key, (e.id, e.service_id, p.target_port, approved));
            }
        }
        // Echo: the approved endpoint with the lowest id at an address owns it
        // (as `apply_endpoints` writes it).
        for e in &spec.endpoints {
            if e.ports.is_empty() {
                continue;
            }
            let key = crate::dataplane::spec::endpoint_key(e, 0, IPPROTO_ICMP);
            let approved = e.state == EndpointState::Approved;
            let replace = endpoints
                .get(&key)
                .is_none_or(|&(_, _, _, was)| !was && approved);
            if replace {
                endpoints.insert(key, (e.id, e.service_id, 0, approved));
            }
        }
        let down: BTreeSet<u32> = model
            .services
            .values()
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.state == CfgBackendState::Down)
            .map(|b| b.id.0)
            .collect();
        let backends = spec
            .backends
            .iter()
            .map(|b| {
                (
                    b.id,
                    (
                        b.service_id,
                        plink_common::v4(b.addr.octets()),
                        down.contains(&b.id),
                    ),
                )
            })
            .collect();
        Self {
            endpoints,
            backends,
            retired: retired.clone(),
        }
    }

    /// `None` if the flow may stay, else why it must go.
    pub fn judge(&self, k: &CtFwdKey, v: &CtFwdValue) -> Option<Stale> {
        let key = EndpointKey {
            network_id: k.network_id,
            addr_be: k.dst_addr_be,
            port_be: k.dst_port_be,
            proto: k.proto,
            _pad: 0,
        };
        let Some(&(endpoint_id, service_id, target_port, approved)) = self.endpoints.get(&key)
        else {
            return Some(Stale::NoEndpoint);
        };
        if endpoint_id != v.endpoint_id || service_id != v.service_id {
            return Some(Stale::Repointed);
        }
        if !approved {
            return Some(Stale::NotApproved);
        }
        if k.proto != IPPROTO_ICMP && u16::from_be(v.backend_port_be) != target_port {
            return Some(Stale::TargetPortChanged);
        }
        match self.backends.get(&v.backend_id) {
            Some(&(svc, addr, down)) if svc == v.service_id && addr == v.backend_addr_be => {
                down.then_some(Stale::BackendDown)
            }
            _ => {
                let addr = Ipv4Addr::from(v.backend_addr_be[0].to_ne_bytes());
                (!self.retired.contains(&(v.backend_id, addr))).then_some(Stale::BackendGone)
            }
        }
    }

    /// Whether the flow is kept only because its backend is a retired one.
    pub fn via_retired(&self, v: &CtFwdValue) -> Option<(u32, Ipv4Addr)> {
        let addr = Ipv4Addr::from(v.backend_addr_be[0].to_ne_bytes());
        self.retired
            .contains(&(v.backend_id, addr))
            .then_some((v.backend_id, addr))
    }
}

#[cfg(test)]
mod tests;
