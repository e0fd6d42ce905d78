//! Stable small numeric ids for the datapath's maps.
//!
//! An id is assigned to a key (a network name, a service name, a backend, an
//! endpoint identity) the first time the key appears and kept while the key
//! lives, across reloads and restarts (the table persists). When a key goes
//! away its id is released with the generation it was released in, and only
//! handed out again in a later generation: one reload's diff never shows the
//! same id both removed and added for two different objects. Free ids are
//! reused lowest first so the ids stay small. Id 0 is never assigned, so the
//! datapath can use it for "none".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("all {0} ids are in use")]
pub struct IdsExhausted(pub u32);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTable<K: Ord> {
    assigned: BTreeMap<K, u32>,
    /// Released id → generation it was released in.
    released: BTreeMap<u32, u64>,
    /// Ids below this have been handed out at least once.
    next: u32,
}

impl<K: Ord> Default for IdTable<K> {
    fn default() -> Self {
        Self {
            assigned: BTreeMap::new(),
            released: BTreeMap::new(),
            next: 1,
        }
    }
}

/// JSON form: maps with non-string keys become lists.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Repr<K> {
    assigned: Vec<Assigned<K>>,
    released: Vec<Released>,
    next: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Assigned<K> {
    key: K,
    id: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Released {
    id: u32,
    generation: u64,
}

impl<K: Ord + Clone> IdTable<K> {
    pub fn get(&self, key: &K) -> Option<u32> {
        self.assigned.get(key).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, u32)> {
        self.assigned.iter().map(|(k, id)| (k, *id))
    }

    /// Keeps the ids of `live` keys, releases the others at `generation`, and
    /// assigns ids to new keys (never one released at `generation`).
    pub fn reconcile<'a>(
        &mut self,
        live: impl IntoIterator<Item = &'a K>,
        generation: u64,
    ) -> Result<(), IdsExhausted>
    where
        K: 'a,
    {
        let live: std::collections::BTreeSet<&K> = live.into_iter().collect();
        let gone: Vec<K> = self
            .assigned
            .keys()
            .filter(|k| !live.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(id) = self.assigned.remove(&k) {
                self.released.insert(id, generation);
            }
        }
        for k in live {
            if self.assigned.contains_key(k) {
                continue;
            }
            let reusable = self
                .released
                .iter()
                .find(|&(_, &released_in)| released_in < generation)
                .map(|(&id, _)| id);
            let id = match reusable {
                Some(id) => {
                    self.released.remove(&id);
                    id
                }
                None => {
                    let id = self.next;
                    self.next = self.next.checked_add(1).ok_or(IdsExhausted(u32::MAX))?;
                    id
                }
            };
            self.assigned.insert(k.clone(), id);
        }
        Ok(())
    }

    /// Checks what a state file said: ids unique, non-zero and below `next`.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for &id in self.assigned.values().chain(self.released.keys()) {
            if id == 0 || id >= self.next {
                return Err(format!("id {id} is out of range (1..{})", self.next));
            }
            if !seen.insert(id) {
                return Err(format!("id {id} appears twice"));
            }
        }
        Ok(())
    }
}

impl<K: Ord + Clone + Serialize> Serialize for IdTable<K> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Repr {
            assigned: self
                .assigned
                .iter()
                .map(|(k, &id)| Assigned { key: k.clone(), id })
                .collect(),
            released: self
                .released
                .iter()
                .map(|(&id, &generation)| Released { id, generation })
                .collect(),
            next: self.next,
        }
        .serialize(s)
    }
}

impl<'de, K: Ord + Clone + DeserializeOwned> Deserialize<'de> for IdTable<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = Repr::<K>::deserialize(d)?;
        let table = Self {
            assigned: r.assigned.into_iter().map(|a| (a.key, a.id)).collect(),
            released: r
                .released
                .into_iter()
                .map(|x| (x.id, x.generation))
                .collect(),
            next: r.next,
        };
        table.check().map_err(serde::de::Error::custom)?;
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ids_are_stable_small_and_not_reused_in_the_same_generation() {
        let mut t = IdTable::<String>::default();
        t.reconcile(&keys(&["a", "b", "c"]), 1).unwrap();
        assert_eq!(
            [t.get(&"a".into()), t.get(&"b".into()), t.get(&"c".into())],
            [Some(1), Some(2), Some(3)]
        );
        // b goes and d comes in the same generation: d must not get b's id.
        t.reconcile(&keys(&["a", "c", "d"]), 2).unwrap();
        assert_eq!(t.get(&"a".into()), Some(1));
        assert_eq!(t.get(&"c".into()), Some(3));
        assert_eq!(t.get(&"d".into()), Some(4));
        assert_eq!(t.get(&"b".into()), None);
        // A later generation reuses the lowest free id.
        t.reconcile(&keys(&["a", "c", "d", "e"]), 3).unwrap();
        assert_eq!(t.get(&"e".into()), Some(2));
    }

    #[test]
    fn round_trips_through_json_and_refuses_bad_tables() {
        let mut t = IdTable::<String>::default();
        t.reconcile(&keys(&["a", "b"]), 1).unwrap();
        t.reconcile(&keys(&["b"]), 2).unwrap();
        let json = serde_json::to_string(&t).unwrap();
        let back: IdTable<String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        let dup = r#"{"assigned":[{"key":"a","id":1},{"key":"b","id":1}],"released":[],"next":2}"#;
        let err = serde_json::from_str::<IdTable<String>>(dup).unwrap_err();
        assert!(err.to_string().contains("id 1 appears twice"), "{err}");
        let zero = r#"{"assigned":[{"key":"a","id":0}],"released":[],"next":2}"#;
        assert!(serde_json::from_str::<IdTable<String>>(zero).is_err());
    }
}
