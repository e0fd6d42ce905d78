//! Link ids through the state: restarts, reordered YAML, removed and
//! re-added endpoints, old state files, the fleet's shared document.

use std::path::Path;

use super::*;

const BASE: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
  - name: web
    protocol: tcp
    ports: [{port: 80}]
    backends: [{address: 198.51.100.10}]
    nat: {addresses: [198.51.100.200]}
    visibility: ['*']
    proxy_protocol: {version: 2, link_id_tlv: azure}
endpoints:
";
const A: &str =
    "  - {name: web-a, tenant: t, network: vnet-a, address: 192.0.2.50, service: web}\n";
const B: &str =
    "  - {name: web-b, tenant: t, network: vnet-a, address: 192.0.2.51, service: web}\n";
const C: &str =
    "  - {name: web-c, tenant: t, network: vnet-a, address: 192.0.2.52, service: web}\n";

fn cfg(endpoints: &[&str]) -> Config {
    let text = format!("{BASE}{}", endpoints.concat());
    Config::parse(Path::new("t.yaml"), &text).unwrap_or_else(|e| panic!("{e}"))
}

fn link_ids(state: &PersistedState, config: &Config) -> Vec<(String, u32)> {
    config
        .endpoints
        .iter()
        .map(|e| {
            let id = state.link_ids.get(&EndpointIdentity::of(e));
            (e.name.clone(), id.expect("every endpoint has a link id"))
        })
        .collect()
}

fn sorted(mut v: Vec<(String, u32)>) -> Vec<(String, u32)> {
    v.sort();
    v
}

#[test]
fn link_ids_survive_a_restart_and_a_reordered_config() {
    let dir = tempfile::tempdir().unwrap();
    let first = cfg(&[A, B, C]);
    let state = {
        let store = StateStore::open(dir.path()).unwrap();
        let state = reconcile(&first, &store.load().unwrap().unwrap_or_default()).unwrap();
        store.save(&state).unwrap();
        state
    };
    let before = link_ids(&state, &first);
    assert_eq!(
        before,
        [
            ("web-a".into(), 1),
            ("web-b".into(), 2),
            ("web-c".into(), 3)
        ]
    );
    // A restart (the file read back) with the endpoints in another order.
    let store = StateStore::open(dir.path()).unwrap();
    let loaded = store.load().unwrap().expect("saved");
    assert_eq!(loaded.link_ids, state.link_ids);
    let reordered = cfg(&[C, A, B]);
    let after = reconcile(&reordered, &loaded).unwrap();
    assert_eq!(sorted(link_ids(&after, &reordered)), before);
    // A fresh start with the reordered YAML allocates the same ids too:
    // allocation follows the identities, not the YAML order.
    let fresh = reconcile(&reordered, &PersistedState::default()).unwrap();
    assert_eq!(sorted(link_ids(&fresh, &reordered)), before);
}

#[test]
fn a_removed_endpoint_re_added_gets_a_new_link_id_unless_it_sets_one() {
    let s1 = reconcile(&cfg(&[A, B, C]), &PersistedState::default()).unwrap();
    let s2 = reconcile(&cfg(&[A, C]), &s1).unwrap();
    let s3 = reconcile(&cfg(&[A, B, C]), &s2).unwrap();
    assert_eq!(
        link_ids(&s3, &cfg(&[A, B, C])),
        [
            ("web-a".into(), 1),
            ("web-b".into(), 4),
            ("web-c".into(), 3)
        ],
        "a re-added endpoint is a new endpoint: its old id is never reused"
    );
    // Pinned in the config, it keeps the id across removal and re-adding.
    let pinned = B.replace("service: web}", "service: web, link_id: 2}");
    let s4 = reconcile(&cfg(&[A, C]), &s3).unwrap();
    let s5 = reconcile(&cfg(&[A, &pinned, C]), &s4).unwrap();
    assert_eq!(
        s5.link_ids
            .get(&EndpointIdentity::of(&cfg(&[&pinned]).endpoints[0])),
        Some(2)
    );
    // Another endpoint's id is refused, naming both.
    let clash = B.replace("service: web}", "service: web, link_id: 1}");
    let err = reconcile(&cfg(&[A, &clash, C]), &s3).unwrap_err();
    assert!(
        err.to_string()
            .contains("endpoint \"web-b\": link_id 1 is endpoint \"web-a\"'s link id already"),
        "{err}"
    );
}

#[test]
fn a_version_2_state_file_is_read_and_gets_link_ids() {
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(&[A, B]);
    let old = reconcile(&config, &PersistedState::default()).unwrap();
    // What plink-ctl of state version 2 wrote: no link ids.
    let mut json = serde_json::to_value(&old).unwrap();
    json["version"] = 2.into();
    json.as_object_mut().unwrap().remove("link_ids");
    std::fs::write(dir.path().join(store::STATE_FILE), json.to_string()).unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let loaded = store.load().unwrap().expect("read");
    assert_eq!(loaded.version, STATE_VERSION);
    assert_eq!(loaded.link_ids, LinkIds::default());
    assert_eq!(loaded.endpoints, old.endpoints, "the other ids are kept");
    let next = reconcile(&config, &loaded).unwrap();
    assert_eq!(
        link_ids(&next, &config),
        [("web-a".into(), 1), ("web-b".into(), 2)]
    );
    // The fleet: a document without link ids adds to the shared state, so
    // the first upgraded node writes them for every node.
    assert!(crate::fleet::adds_to(&next, &loaded));
    assert!(!crate::fleet::same_shared(&next, &loaded));
    assert!(!crate::fleet::adds_to(
        &reconcile(&config, &next).unwrap(),
        &next
    ));
}
