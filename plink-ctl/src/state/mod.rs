//! What the controller remembers between runs: approval decisions and the
//! datapath ids. [`reconcile`] folds a config into it (pure); [`store`]
//! persists it atomically.

mod ids;
mod link_ids;
pub mod store;

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

pub use ids::{IdTable, IdsExhausted};
pub use link_ids::{LinkIdError, LinkIds};
pub use store::{StateError, StateStore};

use crate::{
    approval::{self, Access, Decision},
    config::{Config, Endpoint, Role},
};

/// Version of the state file's format; bumped on incompatible changes.
/// Version 2 added `dataplane`, version 3 `link_ids`, version 4 IPv6
/// addresses and dual-stack identities (`address6`); older files are read
/// as version 4 without them (the link ids are then allocated). An older
/// plink-ctl would fail on an IPv6 address as on a corrupt file; the
/// version makes it say that it is too old instead.
pub const STATE_VERSION: u32 = 4;
/// Older versions this build reads (and rewrites as `STATE_VERSION`).
pub const STATE_VERSIONS_READ: &[u32] = &[1, 2, 3, 4];

/// Why a config cannot be folded into the state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Ids(#[from] IdsExhausted),
    #[error(transparent)]
    LinkIds(#[from] LinkIdError),
}

/// An endpoint's identity (SPEC §4): changing any of these makes a new
/// endpoint, with a new id and no inherited decision. The tenant is not part
/// of it; a tenant change is judged against visibility on reload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointIdentity {
    pub name: String,
    pub network: String,
    /// An IPv4 address reads and writes as it did in format 3, so older
    /// identities (and their ids, decisions and link ids) stay the same.
    pub address: IpAddr,
    /// A dual-stack endpoint's IPv6 address; absent (and not written) for
    /// one address, so single-address identities keep their format-3 form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<IpAddr>,
    pub service: String,
}

impl EndpointIdentity {
    pub fn of(e: &Endpoint) -> Self {
        Self {
            name: e.name.clone(),
            network: e.network.clone(),
            address: e.address,
            address6: e.address6,
            service: e.service.clone(),
        }
    }
}

/// A backend is the same backend while its service and address stay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendKey {
    pub service: String,
    pub address: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    pub endpoint: EndpointIdentity,
    #[serde(flatten)]
    pub decision: Decision,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedState {
    pub version: u32,
    /// Bumped by every reconcile; ids released in one generation are reused
    /// only in a later one.
    pub generation: u64,
    pub networks: IdTable<String>,
    pub services: IdTable<String>,
    pub backends: IdTable<BackendKey>,
    pub endpoints: IdTable<EndpointIdentity>,
    /// The endpoints' link ids (PROXY protocol), never reused.
    #[serde(default)]
    pub link_ids: LinkIds,
    /// Decisions of the endpoints in the config, by identity.
    #[serde(with = "decisions_as_list")]
    pub decisions: BTreeMap<EndpointIdentity, Decision>,
    /// The identity of the dataplane (pins) these ids and decisions belong
    /// to; pins with another identity are never adopted with this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<String>,
}

impl Default for PersistedState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            generation: 0,
            networks: IdTable::default(),
            services: IdTable::default(),
            backends: IdTable::default(),
            endpoints: IdTable::default(),
            link_ids: LinkIds::default(),
            decisions: BTreeMap::new(),
            dataplane: None,
        }
    }
}

impl PersistedState {
    /// Checks a state read from the fleet store: a version this build
    /// reads (an older one is taken as this one: a node upgraded first folds
    /// its additions in), ids sound.
    pub fn check_shared(&self) -> Result<(), String> {
        if !STATE_VERSIONS_READ.contains(&self.version) {
            return Err(format!(
                "format version {}, this plink-ctl writes {STATE_VERSION}: run the same plink-ctl version on every node",
                self.version
            ));
        }
        self.networks
            .check()
            .map_err(|e| format!("networks: {e}"))?;
        self.services
            .check()
            .map_err(|e| format!("services: {e}"))?;
        self.backends
            .check()
            .map_err(|e| format!("backends: {e}"))?;
        self.endpoints
            .check()
            .map_err(|e| format!("endpoints: {e}"))?;
        self.link_ids
            .check()
            .map_err(|e| format!("link_ids: {e}"))?;
        Ok(())
    }
}

mod decisions_as_list {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        m: &BTreeMap<EndpointIdentity, Decision>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let v: Vec<DecisionRecord> = m
            .iter()
            .map(|(k, d)| DecisionRecord {
                endpoint: k.clone(),
                decision: *d,
            })
            .collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<EndpointIdentity, Decision>, D::Error> {
        let v = Vec::<DecisionRecord>::deserialize(d)?;
        let mut m = BTreeMap::new();
        for r in v {
            if m.insert(r.endpoint.clone(), r.decision).is_some() {
                return Err(serde::de::Error::custom(format!(
                    "endpoint {:?} has two decisions",
                    r.endpoint.name
                )));
            }
        }
        Ok(m)
    }
}

/// Folds a (validated) config into the state: ids for new objects, ids of
/// vanished ones released, initial decisions for new endpoints, kept ones
/// re-judged against the reloaded visibility, decisions of endpoints no
/// longer in the config dropped. Pure: the result depends on the inputs only.
pub fn reconcile(config: &Config, prev: &PersistedState) -> Result<PersistedState, ReconcileError> {
    let mut next = prev.clone();
    next.generation = prev.generation + 1;
    let generation = next.generation;

    let networks: Vec<String> = config
        .interfaces
        .iter()
        .filter(|i| i.role == Role::Consumer)
        .filter_map(|i| i.network.clone())
        .collect();
    next.networks.reconcile(&networks, generation)?;

    let services: Vec<String> = config.services.iter().map(|s| s.name.clone()).collect();
    next.services.reconcile(&services, generation)?;

    let backends: Vec<BackendKey> = config
        .services
        .iter()
        .flat_map(|s| {
            s.backends.iter().map(|b| BackendKey {
                service: s.name.clone(),
                address: b.address,
            })
        })
        .collect();
    next.backends.reconcile(&backends, generation)?;

    let identities: Vec<EndpointIdentity> =
        config.endpoints.iter().map(EndpointIdentity::of).collect();
    next.endpoints.reconcile(&identities, generation)?;
    // Validation keeps configured link ids within 1..=u32::MAX.
    let configured = config
        .endpoints
        .iter()
        .map(|e| e.link_id.and_then(|id| u32::try_from(id).ok()));
    next.link_ids.reconcile(identities.iter().zip(configured))?;

    let by_name: BTreeMap<&str, &crate::config::Service> = config
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut decisions = BTreeMap::new();
    for (e, identity) in config.endpoints.iter().zip(identities) {
        let access = match by_name.get(e.service.as_str()) {
            Some(s) => Access::of(s, &e.tenant),
            // Validation refuses this; judge it invisible rather than panic.
            None => Access {
                tenant: e.tenant.clone(),
                service: e.service.clone(),
                visible: false,
                auto_approved: false,
            },
        };
        let decision = match prev.decisions.get(&identity) {
            Some(&kept) => approval::on_reload(kept, &access),
            None => approval::initial(&access),
        };
        decisions.insert(identity, decision);
    }
    next.decisions = decisions;
    Ok(next)
}

#[cfg(test)]
mod tests;
