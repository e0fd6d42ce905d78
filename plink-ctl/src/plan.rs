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
    net::{IpAddr, Ipv4Addr},
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
        InterfaceRole, InterfaceSpec, NatSpec, PortSpec, Protocol, RetiredNat, ServiceSpec,
        TimeoutSpec,
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
    /// `ENDPOINTS`: one entry per endpoint address and port, plus one echo
    /// entry per endpoint address (a dual-stack NAT64 endpoint has two).
    pub endpoint_keys: u32,
    /// `ARP_ENDPOINTS`: one per endpoint address, and per next hop.
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
    /// The NAT slots the dataplane holds, by service id: from the spec last
    /// applied, or read back from the pinned SERVICES map on an adopting
    /// start. Keeps slots stable and draining addresses draining across
    /// reloads and restarts.
    pub nat_held: BTreeMap<u32, Vec<NatSpec>>,
    /// Retired NAT addresses still in their grace period (the caller drops
    /// the ones whose grace ran out).
    pub nat_retired: BTreeMap<IpAddr, RetiredNat>,
    /// NAT ports held per NAT address (all protocols).
    pub nat_ports_in_use: BTreeMap<IpAddr, u64>,
    pub capacities: Capacities,
}

impl Observed {
    /// Records `spec` as what the dataplane holds (its NAT slots and retired
    /// addresses), as after a successful apply.
    pub fn hold(&mut self, spec: &DataplaneSpec) {
        self.nat_held = spec
            .services
            .iter()
            .map(|s| (s.id, s.nat.clone()))
            .collect();
        self.nat_retired = spec.retired_nat.clone();
    }
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
        addr: IpAddr,
        from: String,
        to: String,
        flows: u64,
    },
    #[error(
        "service {service:?} cannot take NAT address {addr}: its {MAX_NAT_SLOTS} NAT slots are taken and every draining address still carries flows ({}). Wait until one has drained (`plink-ctl conntrack` lists the flows), or take another address out of the config",
        draining_list(.draining)
    )]
    NatSlotsFull {
        service: String,
        addr: IpAddr,
        /// Draining addresses and the NAT ports their flows hold.
        draining: Vec<(IpAddr, u64)>,
    },
    #[error(
        "endpoint {endpoint:?} has no address its {family} service is served on: an IPv4 endpoint address in front of an IPv6 service needs NAT46, which plink does not support"
    )]
    NoServedAddress {
        endpoint: String,
        family: crate::config::Family,
    },
    #[error("building the Maglev table of service {service:?}: {why}")]
    Maglev { service: String, why: String },
    /// The spec breaks a map limit or an invariant (see `DataplaneSpec::validate_within`).
    #[error("{0}")]
    Invalid(String),
}

fn draining_list(d: &[(IpAddr, u64)]) -> String {
    let items: Vec<String> = d
        .iter()
        .map(|(a, n)| format!("{a}: {n} NAT port(s)"))
        .collect();
    items.join(", ")
}

fn service_name(model: &Model, id: u32) -> String {
    model
        .services
        .get(&ServiceId(id))
        .map(|s| s.name.clone())
        .unwrap_or_else(|| format!("#{id}"))
}

/// A service's NAT slots, and the addresses that left theirs (with the slot).
/// A NAT slot's address as the planner keeps it: the model is IPv4 only
/// (an IPv6 address, which it never plans, reads as unspecified).
type NatSlots = (Vec<NatSpec>, Vec<(IpAddr, u8)>);

/// Keeps each NAT address in the slot it had, so counters and flows keyed by
/// slot survive reloads; addresses that left the config stay as draining
/// (no new flows, existing flows keep their port) in their slot while flows
/// hold ports on them. A draining address that was draining already (so no
/// flow can have started on it since `in_use` was counted) and holds no port
/// gives its slot up: the slot becomes vacant (0.0.0.0, kept so the other
/// slots keep their index) and is reused first. Returns the slots and the
/// addresses that left them. A draining address that still carries flows is
/// never replaced: `Err` names the wanted address that found no slot and
/// the draining addresses in the way.
fn nat_slots(
    wanted: &[IpAddr],
    ports: (u16, u16),
    held: Option<&[NatSpec]>,
    in_use: &BTreeMap<IpAddr, u64>,
) -> Result<NatSlots, (IpAddr, Vec<IpAddr>)> {
    let flows = |a: &IpAddr| in_use.get(a).copied().unwrap_or(0);
    let mut left = Vec::new();
    let mut slots: Vec<NatSpec> = Vec::new();
    for (i, n) in held.unwrap_or_default().iter().enumerate() {
        let slot = if n.addr.is_unspecified() {
            n.clone()
        } else if wanted.contains(&n.addr) {
            NatSpec {
                addr: n.addr,
                ports: ports.0..=ports.1,
                draining: false,
            }
        } else if n.draining && flows(&n.addr) == 0 {
            left.push((n.addr, i as u8));
            NatSpec {
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ports: n.ports.clone(),
                draining: true,
            }
        } else {
            NatSpec {
                addr: n.addr,
                ports: n.ports.clone(),
                draining: true,
            }
        };
        slots.push(slot);
    }
    for addr in wanted {
        if slots.iter().any(|s| s.addr == *addr) {
            continue;
        }
        let fresh = NatSpec {
            addr: *addr,
            ports: ports.0..=ports.1,
            draining: false,
        };
        if let Some(slot) = slots.iter_mut().find(|s| s.addr.is_unspecified()) {
            *slot = fresh;
        } else if slots.len() < MAX_NAT_SLOTS {
            slots.push(fresh);
        } else if let Some((i, slot)) = slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.draining && flows(&s.addr) == 0)
        {
            // All slots taken: a draining address without flows (it became
            // draining in this very change) gives its slot up.
            left.push((slot.addr, i as u8));
            *slot = fresh;
        } else {
            let draining = slots
                .iter()
                .filter(|s| s.draining && !s.addr.is_unspecified())
                .map(|s| s.addr)
                .collect();
            return Err((*addr, draining));
        }
    }
    Ok((slots, left))
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
    // NAT addresses that leave the slots they were held in (drained,
    // replaced, or their service is gone) stay in NAT_ADDRS as retired.
    let mut leaving: BTreeMap<IpAddr, RetiredNat> = BTreeMap::new();
    for (id, slots) in &observed.nat_held {
        if model.services.contains_key(&ServiceId(*id)) {
            continue;
        }
        for (i, n) in slots.iter().enumerate() {
            if !n.addr.is_unspecified() {
                leaving.insert(
                    n.addr,
                    RetiredNat {
                        service_id: *id,
                        slot: i as u8,
                    },
                );
            }
        }
    }
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
        let (nat, left) = nat_slots(
            &svc.nat.addresses,
            (svc.nat.ports.first, svc.nat.ports.last),
            observed.nat_held.get(&svc.id.0).map(Vec::as_slice),
            &observed.nat_ports_in_use,
        )
        .map_err(|(addr, draining)| PlanError::NatSlotsFull {
            service: svc.name.clone(),
            addr,
            draining: draining
                .into_iter()
                .map(|a| (a, observed.nat_ports_in_use.get(&a).copied().unwrap_or(0)))
                .collect(),
        })?;
        for (addr, slot) in left {
            leaving.insert(
                addr,
                RetiredNat {
                    service_id: svc.id.0,
                    slot,
                },
            );
        }
        services.push(ServiceSpec {
            id: svc.id.0,
            nat,
            lookup,
            mss_clamp: match svc.mss_clamp {
                None => plink_common::MSS_CLAMP_OFF,
                Some(MssClamp::Auto) => plink_common::MSS_CLAMP_AUTO,
                // Validated to 536-65495, below the AUTO marker.
                Some(MssClamp::Bytes(n)) => {
                    u16::try_from(n).map_or(plink_common::MSS_CLAMP_OFF, |n| n.min(u16::MAX - 1))
                }
            },
            flow_log_sample: svc.flow_log_sample,
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
    let active: BTreeMap<IpAddr, u32> = services
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
            n.addr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        }
    }
    // Retired: what left a slot now, and what retired before and is still in
    // its grace, unless a service holds the address again.
    let held: BTreeSet<IpAddr> = services
        .iter()
        .flat_map(|s| s.nat.iter().map(|n| n.addr))
        .filter(|a| !a.is_unspecified())
        .collect();
    let mut retired_nat = observed.nat_retired.clone();
    retired_nat.extend(leaving);
    retired_nat.retain(|a, _| !held.contains(a));
    // Retired addresses are a courtesy (late replies dropped rather than
    // passed): they give way when NAT_ADDRS is short of room, never the
    // addresses in use.
    let room = usize::try_from(observed.capacities.nat_addresses)
        .unwrap_or(usize::MAX)
        .saturating_sub(held.len());
    while retired_nat.len() > room {
        retired_nat.pop_last();
    }
    let mut endpoints = Vec::new();
    for e in model.endpoints.values() {
        // Every address the endpoint is served on: an IPv4 service's
        // endpoint may have an IPv6 one (NAT64), beside its IPv4 one or
        // alone; an IPv6 service's only IPv6 (NAT46 is refused).
        let family = model
            .services
            .get(&e.service_id)
            .map_or(crate::config::Family::Ipv4, |s| s.family);
        let served = e.served_addresses(family);
        let Some(&addr) = served.first() else {
            return Err(PlanError::NoServedAddress {
                endpoint: e.name.clone(),
                family,
            });
        };
        endpoints.push(EndpointSpec {
            id: e.id.0,
            network_id: e.network_id.0,
            addr,
            addr6: served.get(1).copied(),
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
        });
    }
    let mut proxy_headers = BTreeMap::new();
    for e in model.endpoints.values() {
        let Some(kind) = e.proxy_protocol else {
            continue;
        };
        let header = kind
            .kernel()
            .ok_or_else(|| format!("link_id_tlv {kind} is no TLV type plink can send"))
            .and_then(|k| {
                plink_common::proxy::build_header(k, e.link_id, e.name.as_bytes())
                    .map_err(|why| format!("{why:?}"))
            })
            .map_err(|why| {
                PlanError::Invalid(format!(
                    "endpoint {:?}: no PROXY protocol header: {why}",
                    e.name
                ))
            })?;
        proxy_headers.insert(e.id.0, header);
    }
    let next_hops = model
        .interfaces
        .values()
        .filter_map(|i| Some((i.network?.0, i.next_hop?)))
        .collect();
    let spec = DataplaneSpec {
        next_hops,
        interfaces,
        timeouts,
        services,
        backends,
        endpoints,
        retired_nat,
        proxy_headers,
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
    retired: BTreeSet<(u32, IpAddr)>,
}

impl FlowPolicy {
    /// The policy of `spec` (as applied), with `model` saying which backends
    /// the config has `down` (a health-check failure keeps its flows) and
    /// `retired` the drained backends that left the config.
    pub fn new(spec: &DataplaneSpec, model: &Model, retired: &BTreeSet<(u32, IpAddr)>) -> Self {
        use crate::dataplane::spec::{echo_proto, endpoint_key};
        let mut endpoints = BTreeMap::new();
        for e in &spec.endpoints {
            let approved = e.state == EndpointState::Approved;
            for a in e.addresses() {
                for p in &e.ports {
                    let key = endpoint_key(e, a, p.port, e.protocol.number());
                    endpoints.insert(key, (e.id, e.service_id, p.target_port, approved));
                }
            }
        }
        // Echo: the approved endpoint with the lowest id at an address owns it
        // (as `apply_endpoints` writes it), keyed ICMPv6 at an IPv6 address
        // (NAT66 and NAT64 alike: the flow key is the consumer's packet's).
        for e in &spec.endpoints {
            if e.ports.is_empty() {
                continue;
            }
            let approved = e.state == EndpointState::Approved;
            for a in e.addresses() {
                let key = endpoint_key(e, a, 0, echo_proto(a));
                let replace = endpoints
                    .get(&key)
                    .is_none_or(|&(_, _, _, was)| !was && approved);
                if replace {
                    endpoints.insert(key, (e.id, e.service_id, 0, approved));
                }
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
                        crate::dataplane::spec::addr(b.addr),
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
        // An echo flow's backend "port" is its echo id, no target port.
        let echo = k.proto == IPPROTO_ICMP || k.proto == plink_common::IPPROTO_ICMPV6;
        if !echo && u16::from_be(v.backend_port_be) != target_port {
            return Some(Stale::TargetPortChanged);
        }
        match self.backends.get(&v.backend_id) {
            Some(&(svc, addr, down)) if svc == v.service_id && addr == v.backend_addr_be => {
                down.then_some(Stale::BackendDown)
            }
            _ => {
                let addr = crate::dataplane::spec::ip_of(&v.backend_addr_be);
                (!self.retired.contains(&(v.backend_id, addr))).then_some(Stale::BackendGone)
            }
        }
    }

    /// Whether the flow is kept only because its backend is a retired one.
    pub fn via_retired(&self, v: &CtFwdValue) -> Option<(u32, IpAddr)> {
        let addr = crate::dataplane::spec::ip_of(&v.backend_addr_be);
        self.retired
            .contains(&(v.backend_id, addr))
            .then_some((v.backend_id, addr))
    }
}

#[cfg(test)]
mod tests;
