//! The model the datapath consumes: one plain value computed from a config
//! and the persisted state, with the stable ids the maps are keyed by. Two
//! models compare with `==`, and [`Model::diff`] says what a reload changes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use serde::{Deserialize, Serialize};

use crate::{
    approval::{ConnectionState, Reason},
    config::{
        BackendState, Config, EndpointLimits, Family, HealthCheck, LinkIdTlvKind, MssClamp,
        PortRange, Protocol, Role, Timeouts, XdpMode,
    },
    state::{BackendKey, EndpointIdentity, PersistedState},
};

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A consumer network's id: part of the endpoint and conntrack keys.
    NetworkId
);
id_type!(ServiceId);
id_type!(BackendId);
id_type!(EndpointId);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub gateway: GatewayModel,
    /// Consumer networks by name.
    pub networks: BTreeMap<String, NetworkId>,
    /// Interfaces by name.
    pub interfaces: BTreeMap<String, InterfaceModel>,
    /// Services by id.
    pub services: BTreeMap<ServiceId, ServiceModel>,
    /// Endpoints by id, in every state (only `approved` ones pass traffic).
    pub endpoints: BTreeMap<EndpointId, EndpointModel>,
}

/// Gateway-wide settings the datapath needs. Sizing fields (conntrack size)
/// take effect on a fresh start only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayModel {
    pub xdp_mode: XdpMode,
    pub conntrack_max_flows: u32,
    pub timeouts: Timeouts,
    /// `announce.metric`: the metric of the announced routes (docs/FLEET.md).
    #[serde(default)]
    pub announce_metric: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceModel {
    pub name: String,
    pub role: Role,
    /// Set for consumer interfaces.
    pub network: Option<NetworkId>,
    /// The BGP next hop announced on this consumer link (ARP answered by XDP).
    #[serde(default)]
    pub next_hop: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    /// The port consumers connect to on the endpoint address.
    pub port: u16,
    /// The port on the backends.
    pub target_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceModel {
    pub id: ServiceId,
    pub name: String,
    pub protocol: Protocol,
    /// IPv4 or IPv6, as its backends and NAT addresses are.
    #[serde(default = "ipv4")]
    pub family: Family,
    pub ports: Vec<PortMap>,
    /// In config order.
    pub backends: Vec<BackendModel>,
    pub nat: NatModel,
    pub health_check: Option<HealthCheck>,
    pub maglev_table_size: u32,
    #[serde(default)]
    pub mss_clamp: Option<MssClamp>,
    /// Flow logs: 0 = off, N = one flow in N (`flow_logs.sample`).
    #[serde(default)]
    pub flow_log_sample: u16,
    /// PROXY protocol v2 headers with this link id TLV; `None`: off.
    #[serde(default)]
    pub proxy_protocol: Option<LinkIdTlvKind>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendModel {
    pub id: BackendId,
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatModel {
    /// At most 8, in config order, all of the service's family.
    pub addresses: Vec<IpAddr>,
    pub ports: PortRange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointModel {
    pub id: EndpointId,
    pub name: String,
    pub tenant: String,
    pub network: String,
    pub network_id: NetworkId,
    pub address: IpAddr,
    /// A dual-stack endpoint's IPv6 address (same decision, caps, link id).
    #[serde(default)]
    pub address6: Option<IpAddr>,
    pub service: String,
    pub service_id: ServiceId,
    /// The service's protocol and ports, repeated for the endpoint table.
    pub protocol: Protocol,
    pub ports: Vec<PortMap>,
    pub state: ConnectionState,
    pub reason: Reason,
    pub limits: EndpointLimits,
    /// The endpoint's link id (`link_id` in the config, else allocated):
    /// what its service's PROXY protocol header carries.
    #[serde(default)]
    pub link_id: u32,
    /// The service's PROXY protocol link id TLV, repeated for the header;
    /// `None`: the service sends no header.
    #[serde(default)]
    pub proxy_protocol: Option<LinkIdTlvKind>,
}

fn ipv4() -> Family {
    Family::Ipv4
}

impl EndpointModel {
    /// Only approved endpoints pass traffic.
    pub fn passes_traffic(&self) -> bool {
        self.state == ConnectionState::Approved
    }

    /// The endpoint's addresses: `address`, then a dual-stack `address6`.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.address).chain(self.address6)
    }

    /// The addresses the datapath serves the endpoint on, for its service's
    /// `family`: both of a dual-stack endpoint of an IPv4 service (the IPv6
    /// one through NAT64), IPv6 ones only for an IPv6 service (NAT46 is
    /// refused by validation). `address` first.
    pub fn served_addresses(&self, family: Family) -> Vec<IpAddr> {
        crate::config::served(self.addresses(), family)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the saved state has no {what} id for {key}; the state does not match this config (reconcile first)"
)]
pub struct ModelError {
    what: &'static str,
    key: String,
}

fn missing(what: &'static str, key: impl std::fmt::Debug) -> ModelError {
    ModelError {
        what,
        key: format!("{key:?}"),
    }
}

impl Model {
    /// Builds the model. `state` must be `state::reconcile(config, ..)`'s
    /// result, which holds an id and a decision for everything in `config`.
    pub fn build(config: &Config, state: &PersistedState) -> Result<Model, ModelError> {
        let networks: BTreeMap<String, NetworkId> = state
            .networks
            .iter()
            .map(|(name, id)| (name.clone(), NetworkId(id)))
            .collect();
        let network_id = |name: &str| {
            networks
                .get(name)
                .copied()
                .ok_or_else(|| missing("network", name))
        };

        let mut interfaces = BTreeMap::new();
        for i in &config.interfaces {
            let network = match (&i.role, &i.network) {
                (Role::Consumer, Some(n)) => Some(network_id(n)?),
                _ => None,
            };
            interfaces.insert(
                i.name.clone(),
                InterfaceModel {
                    name: i.name.clone(),
                    role: i.role,
                    network,
                    // The interface's own, else the node's (fleet.nodes[].routing).
                    next_hop: i.next_hop.or_else(|| {
                        network
                            .and(config.this_node())
                            .and_then(|n| n.routing.next_hop)
                    }),
                },
            );
        }

        let mut services = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for s in &config.services {
            let id = ServiceId(
                state
                    .services
                    .get(&s.name)
                    .ok_or_else(|| missing("service", &s.name))?,
            );
            let mut backends = Vec::new();
            for b in &s.backends {
                let key = BackendKey {
                    service: s.name.clone(),
                    address: b.address,
                };
                let bid = state
                    .backends
                    .get(&key)
                    .ok_or_else(|| missing("backend", &key))?;
                backends.push(BackendModel {
                    id: BackendId(bid),
                    address: b.address,
                    weight: b.weight,
                    state: b.state,
                });
            }
            let model = ServiceModel {
                id,
                name: s.name.clone(),
                protocol: s.protocol,
                family: s.family(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| PortMap {
                        port: p.port,
                        target_port: p.target_port.unwrap_or(p.port),
                    })
                    .collect(),
                backends,
                nat: NatModel {
                    addresses: s.nat.addresses.clone(),
                    ports: s.nat.ports,
                },
                health_check: s.health_check.clone(),
                maglev_table_size: s.maglev_table_size,
                mss_clamp: s.mss_clamp,
                flow_log_sample: s
                    .flow_logs
                    .map_or(0, |f| u16::try_from(f.sample).unwrap_or(u16::MAX)),
                proxy_protocol: s.proxy_protocol.map(|p| p.link_id_tlv),
            };
            by_name.insert(s.name.as_str(), id);
            services.insert(id, model);
        }

        let mut endpoints = BTreeMap::new();
        for e in &config.endpoints {
            let identity = EndpointIdentity::of(e);
            let id = EndpointId(
                state
                    .endpoints
                    .get(&identity)
                    .ok_or_else(|| missing("endpoint", &identity))?,
            );
            let decision = state
                .decisions
                .get(&identity)
                .ok_or_else(|| missing("endpoint decision", &identity))?;
            let link_id = state
                .link_ids
                .get(&identity)
                .ok_or_else(|| missing("link", &identity))?;
            let service_id = *by_name
                .get(e.service.as_str())
                .ok_or_else(|| missing("service", &e.service))?;
            let service = &services[&service_id];
            endpoints.insert(
                id,
                EndpointModel {
                    id,
                    name: e.name.clone(),
                    tenant: e.tenant.clone(),
                    network: e.network.clone(),
                    network_id: network_id(&e.network)?,
                    address: e.address,
                    address6: e.address6,
                    service: e.service.clone(),
                    service_id,
                    protocol: service.protocol,
                    ports: service.ports.clone(),
                    state: decision.state,
                    reason: decision.reason,
                    limits: config.endpoint_limits(e),
                    link_id,
                    proxy_protocol: service.proxy_protocol,
                },
            );
        }

        Ok(Model {
            gateway: GatewayModel {
                xdp_mode: config.gateway.xdp_mode,
                conntrack_max_flows: config.gateway.conntrack.max_flows,
                timeouts: config.gateway.timeouts.clone(),
                announce_metric: config.announce.as_ref().map(|a| a.metric),
            },
            networks,
            interfaces,
            services,
            endpoints,
        })
    }

    pub fn endpoint_by_name(&self, name: &str) -> Option<&EndpointModel> {
        self.endpoints.values().find(|e| e.name == name)
    }

    /// What changed from `old` to `new`. Objects are matched by id: an
    /// endpoint whose identity changed has a new id, so it shows up as one
    /// removed and one added.
    pub fn diff(old: &Model, new: &Model) -> ModelDiff {
        let backends = |m: &Model| -> BTreeMap<BackendId, (ServiceId, BackendModel)> {
            m.services
                .values()
                .flat_map(|s| s.backends.iter().map(move |b| (b.id, (s.id, b.clone()))))
                .collect()
        };
        let nat = |m: &Model| -> BTreeMap<(ServiceId, IpAddr), ()> {
            m.services
                .values()
                .flat_map(|s| s.nat.addresses.iter().map(move |a| ((s.id, *a), ())))
                .collect()
        };
        let nat_changes = changes(&nat(old), &nat(new));
        ModelDiff {
            gateway_changed: old.gateway != new.gateway,
            interfaces: changes(&old.interfaces, &new.interfaces),
            networks: changes(&old.networks, &new.networks),
            services: changes(&old.services, &new.services),
            backends: changes(&backends(old), &backends(new)),
            nat_addresses: NatChanges {
                added: nat_changes
                    .added
                    .into_iter()
                    .map(|((s, a), ())| (s, a))
                    .collect(),
                removed: nat_changes
                    .removed
                    .into_iter()
                    .map(|((s, a), ())| (s, a))
                    .collect(),
            },
            endpoints: changes(&old.endpoints, &new.endpoints),
        }
    }
}

/// Changes of one kind of object, each list in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes<K, T> {
    pub added: Vec<(K, T)>,
    pub removed: Vec<(K, T)>,
    /// (key, old, new)
    pub changed: Vec<(K, T, T)>,
}

impl<K, T> Changes<K, T> {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

fn changes<K: Ord + Clone, T: Clone + PartialEq>(
    old: &BTreeMap<K, T>,
    new: &BTreeMap<K, T>,
) -> Changes<K, T> {
    let mut c = Changes {
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
    };
    for (k, v) in old {
        match new.get(k) {
            None => c.removed.push((k.clone(), v.clone())),
            Some(n) if n != v => c.changed.push((k.clone(), v.clone(), n.clone())),
            Some(_) => {}
        }
    }
    for (k, v) in new {
        if !old.contains_key(k) {
            c.added.push((k.clone(), v.clone()));
        }
    }
    c
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatChanges {
    pub added: Vec<(ServiceId, IpAddr)>,
    /// Removed NAT addresses drain: no new flows, existing flows and their
    /// ARP answers kept until they expire (SPEC §4).
    pub removed: Vec<(ServiceId, IpAddr)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDiff {
    pub gateway_changed: bool,
    pub interfaces: Changes<String, InterfaceModel>,
    pub networks: Changes<String, NetworkId>,
    /// A changed service carries its new backends and NAT pool too; the
    /// finer lists below say which of those changed.
    pub services: Changes<ServiceId, ServiceModel>,
    pub backends: Changes<BackendId, (ServiceId, BackendModel)>,
    pub nat_addresses: NatChanges,
    pub endpoints: Changes<EndpointId, EndpointModel>,
}

impl ModelDiff {
    pub fn is_empty(&self) -> bool {
        !self.gateway_changed
            && self.interfaces.is_empty()
            && self.networks.is_empty()
            && self.services.is_empty()
            && self.backends.is_empty()
            && self.nat_addresses.added.is_empty()
            && self.nat_addresses.removed.is_empty()
            && self.endpoints.is_empty()
    }

    /// One line per kind that changed, for logs and `reload` output.
    pub fn summary(&self) -> Vec<String> {
        fn line<K, T>(what: &str, c: &Changes<K, T>) -> Option<String> {
            (!c.is_empty()).then(|| {
                format!(
                    "{what}: {} added, {} removed, {} changed",
                    c.added.len(),
                    c.removed.len(),
                    c.changed.len()
                )
            })
        }
        let mut out: Vec<String> = [
            line("interfaces", &self.interfaces),
            line("networks", &self.networks),
            line("services", &self.services),
            line("backends", &self.backends),
            line("endpoints", &self.endpoints),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !self.nat_addresses.added.is_empty() || !self.nat_addresses.removed.is_empty() {
            out.push(format!(
                "NAT addresses: {} added, {} removed (draining)",
                self.nat_addresses.added.len(),
                self.nat_addresses.removed.len()
            ));
        }
        if self.gateway_changed {
            out.push("gateway settings changed".into());
        }
        out
    }
}

#[cfg(test)]
mod tests;
