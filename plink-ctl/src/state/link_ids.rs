//! Link ids: the number a PROXY protocol header gives a backend for the
//! endpoint a flow came through (issue 18).
//!
//! Unlike the datapath ids ([`super::IdTable`]), a link id is never handed
//! out twice: backends may grant access by it, so an endpoint that goes
//! away takes its id with it, and one added later (the same one re-added
//! included: a new endpoint, like its decision) gets a fresh one. Allocated
//! ids count up from 1 in the order of the endpoints' identities (not of the
//! YAML), skipping any id in use. An endpoint's `link_id` in the config
//! overrides the allocated one; its id is recorded like an allocated one,
//! so removing the override later keeps it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::EndpointIdentity;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkIdError {
    #[error("all link ids below 4294967295 have been handed out")]
    Exhausted,
    #[error(
        "endpoint {endpoint:?}: link_id {link_id} is endpoint {holder:?}'s link id already (allocated to it, or set on it before): give {endpoint:?} another link_id, or set {holder:?}'s link_id to another value in the same change"
    )]
    Taken {
        endpoint: String,
        link_id: u32,
        holder: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkIds {
    assigned: BTreeMap<EndpointIdentity, u32>,
    /// The next id to allocate: allocated ids only grow.
    next: u32,
    /// Ids at or above `next` that a configured `link_id` gave an endpoint:
    /// allocation skips them even once that endpoint is gone (ids below
    /// `next` are never allocated again anyway).
    reserved: BTreeSet<u32>,
}

impl Default for LinkIds {
    fn default() -> Self {
        Self {
            assigned: BTreeMap::new(),
            next: 1,
            reserved: BTreeSet::new(),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Repr {
    assigned: Vec<Assigned>,
    next: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    reserved: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Assigned {
    key: EndpointIdentity,
    id: u32,
}

impl LinkIds {
    pub fn get(&self, key: &EndpointIdentity) -> Option<u32> {
        self.assigned.get(key).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&EndpointIdentity, u32)> {
        self.assigned.iter().map(|(k, id)| (k, *id))
    }

    /// Keeps the ids of the `live` endpoints (each with its configured
    /// `link_id`, if any), forgets the others for good, and allocates ids
    /// to new endpoints without one.
    pub fn reconcile<'a>(
        &mut self,
        live: impl IntoIterator<Item = (&'a EndpointIdentity, Option<u32>)>,
    ) -> Result<(), LinkIdError> {
        let live: BTreeMap<&EndpointIdentity, Option<u32>> = live.into_iter().collect();
        self.assigned.retain(|k, _| live.contains_key(k));
        for (k, explicit) in &live {
            if let Some(id) = explicit {
                self.assigned.insert((*k).clone(), *id);
                if *id >= self.next {
                    self.reserved.insert(*id);
                }
            }
        }
        // Configured ids are unique (validation), allocated ones skip every
        // id in use: a clash is a configured id another endpoint holds.
        let mut holders: BTreeMap<u32, &EndpointIdentity> = BTreeMap::new();
        for (k, id) in &self.assigned {
            if let Some(other) = holders.insert(*id, k) {
                let (endpoint, holder) = if live.get(k).copied().flatten() == Some(*id) {
                    (k, other)
                } else {
                    (other, k)
                };
                return Err(LinkIdError::Taken {
                    endpoint: endpoint.name.clone(),
                    link_id: *id,
                    holder: holder.name.clone(),
                });
            }
        }
        let used: BTreeSet<u32> = holders.into_keys().collect();
        for k in live.keys() {
            if self.assigned.contains_key(*k) {
                continue;
            }
            let id = loop {
                let id = self.next;
                if id == u32::MAX {
                    return Err(LinkIdError::Exhausted);
                }
                self.next = id + 1;
                if !used.contains(&id) && !self.reserved.contains(&id) {
                    break id;
                }
            };
            self.assigned.insert((*k).clone(), id);
        }
        let next = self.next;
        self.reserved.retain(|id| *id >= next);
        Ok(())
    }

    /// Checks what a state file said: ids unique and non-zero.
    pub fn check(&self) -> Result<(), String> {
        if self.next == 0 {
            return Err("next link id 0 (ids start at 1)".into());
        }
        let mut seen = BTreeSet::new();
        for (k, &id) in &self.assigned {
            if id == 0 {
                return Err(format!("endpoint {:?} has link id 0", k.name));
            }
            if !seen.insert(id) {
                return Err(format!("link id {id} appears twice"));
            }
        }
        Ok(())
    }
}

impl Serialize for LinkIds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Repr {
            assigned: self
                .assigned
                .iter()
                .map(|(k, &id)| Assigned { key: k.clone(), id })
                .collect(),
            next: self.next,
            reserved: self.reserved.iter().copied().collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for LinkIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = Repr::deserialize(d)?;
        let mut assigned = BTreeMap::new();
        for a in r.assigned {
            if assigned.insert(a.key.clone(), a.id).is_some() {
                return Err(serde::de::Error::custom(format!(
                    "endpoint {:?} has two link ids",
                    a.key.name
                )));
            }
        }
        let ids = Self {
            assigned,
            next: r.next,
            reserved: r.reserved.into_iter().collect(),
        };
        ids.check().map_err(serde::de::Error::custom)?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ep(name: &str, last: u8) -> EndpointIdentity {
        EndpointIdentity {
            name: name.into(),
            network: "vnet-a".into(),
            address: Ipv4Addr::new(192, 0, 2, last).into(),
            address6: None,
            service: "web".into(),
        }
    }

    #[test]
    fn ids_are_allocated_in_identity_order_and_never_handed_out_twice() {
        let (a, b, c) = (ep("a", 1), ep("b", 2), ep("c", 3));
        let mut t = LinkIds::default();
        // The order given (the YAML's) does not matter.
        t.reconcile([(&c, None), (&a, None), (&b, None)]).unwrap();
        assert_eq!(
            [t.get(&a), t.get(&b), t.get(&c)],
            [Some(1), Some(2), Some(3)]
        );
        let before = t.clone();
        t.reconcile([(&b, None), (&c, None), (&a, None)]).unwrap();
        assert_eq!(t, before, "reordering changes nothing");
        // b goes; re-added later it is a new endpoint with a new id.
        t.reconcile([(&a, None), (&c, None)]).unwrap();
        assert_eq!(t.get(&b), None);
        t.reconcile([(&a, None), (&b, None), (&c, None)]).unwrap();
        assert_eq!(t.get(&b), Some(4));
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<LinkIds>(&json).unwrap(), t);
    }

    /// A configured id above the allocation point, whose endpoint then
    /// goes: the id is still never allocated to another endpoint (a
    /// backend's access rule for it must not admit someone else).
    #[test]
    fn a_configured_id_is_never_allocated_to_another_endpoint_after_it_goes() {
        let (a, b) = (ep("a", 1), ep("b", 2));
        let mut t = LinkIds::default();
        t.reconcile([(&a, None), (&b, Some(3))]).unwrap();
        assert_eq!([t.get(&a), t.get(&b)], [Some(1), Some(3)]);
        t.reconcile([(&a, None)]).unwrap();
        let t = serde_json::from_str::<LinkIds>(&serde_json::to_string(&t).unwrap()).unwrap();
        let mut t = t;
        let others: Vec<EndpointIdentity> = (10..14).map(|i| ep(&format!("n{i}"), i)).collect();
        let mut live: Vec<(&EndpointIdentity, Option<u32>)> = vec![(&a, None)];
        live.extend(others.iter().map(|e| (e, None)));
        t.reconcile(live).unwrap();
        let given: BTreeSet<u32> = others.iter().filter_map(|e| t.get(e)).collect();
        assert_eq!(given.len(), others.len());
        assert!(!given.contains(&3), "3 was b's: {given:?}");
    }

    #[test]
    fn a_configured_id_overrides_stays_after_the_override_goes_and_is_skipped() {
        let (a, b, c) = (ep("a", 1), ep("b", 2), ep("c", 3));
        let mut t = LinkIds::default();
        t.reconcile([(&a, Some(2)), (&b, None)]).unwrap();
        assert_eq!([t.get(&a), t.get(&b)], [Some(2), Some(1)]);
        // c would get 2 next: a holds it, so c gets 3.
        t.reconcile([(&a, Some(2)), (&b, None), (&c, None)])
            .unwrap();
        assert_eq!(t.get(&c), Some(3));
        // The override goes: a keeps its id.
        t.reconcile([(&a, None), (&b, None), (&c, None)]).unwrap();
        assert_eq!(t.get(&a), Some(2));
        // Moving b to a chosen id frees nothing for reuse, moves nothing else.
        t.reconcile([(&a, None), (&b, Some(77)), (&c, None)])
            .unwrap();
        assert_eq!(
            [t.get(&a), t.get(&b), t.get(&c)],
            [Some(2), Some(77), Some(3)]
        );
    }

    #[test]
    fn a_configured_id_another_endpoint_holds_is_refused_naming_both() {
        let (a, b) = (ep("a", 1), ep("b", 2));
        let mut t = LinkIds::default();
        t.reconcile([(&a, None), (&b, None)]).unwrap();
        let before = t.clone();
        let err = t.reconcile([(&a, None), (&b, Some(1))]).unwrap_err();
        assert_eq!(
            err,
            LinkIdError::Taken {
                endpoint: "b".into(),
                link_id: 1,
                holder: "a".into()
            }
        );
        assert!(
            err.to_string().contains("give \"b\" another link_id"),
            "{err}"
        );
        // Both moved in one change is fine.
        t = before;
        t.reconcile([(&a, Some(5)), (&b, Some(1))]).unwrap();
        assert_eq!([t.get(&a), t.get(&b)], [Some(5), Some(1)]);
    }

    #[test]
    fn a_bad_table_is_refused() {
        let dup = serde_json::json!({
            "assigned": [
                {"key": ep("a", 1), "id": 1},
                {"key": ep("b", 2), "id": 1}
            ],
            "next": 2
        });
        let err = serde_json::from_value::<LinkIds>(dup).unwrap_err();
        assert!(err.to_string().contains("link id 1 appears twice"), "{err}");
        let zero = serde_json::json!({"assigned": [{"key": ep("a", 1), "id": 0}], "next": 2});
        assert!(serde_json::from_value::<LinkIds>(zero).is_err());
    }
}
