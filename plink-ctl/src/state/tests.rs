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

/// A format-3 file as plink-ctl before IPv6 wrote it (literal JSON, so a
/// change of the identity's serde form cannot hide behind a round trip):
/// it loads, every id, decision and link id is kept, and a reconcile with
/// the same config changes nothing but the generation. Rewritten, an IPv4
/// identity keeps its format-3 form (no `address6` key).
#[test]
fn a_version_3_state_file_keeps_its_ids_decisions_and_link_ids() {
    let text = r#"{
  "version": 3,
  "generation": 4,
  "networks": {"assigned": [{"key": "vnet-a", "id": 1}], "released": [], "next": 2},
  "services": {"assigned": [{"key": "web", "id": 1}], "released": [], "next": 2},
  "backends": {"assigned": [{"key": {"service": "web", "address": "198.51.100.10"}, "id": 3}], "released": [], "next": 4},
  "endpoints": {"assigned": [
      {"key": {"name": "web-a", "network": "vnet-a", "address": "192.0.2.50", "service": "web"}, "id": 2},
      {"key": {"name": "web-b", "network": "vnet-a", "address": "192.0.2.51", "service": "web"}, "id": 5}],
    "released": [], "next": 6},
  "link_ids": {"assigned": [
      {"key": {"name": "web-a", "network": "vnet-a", "address": "192.0.2.50", "service": "web"}, "id": 7},
      {"key": {"name": "web-b", "network": "vnet-a", "address": "192.0.2.51", "service": "web"}, "id": 9}],
    "next": 10},
  "decisions": [
    {"endpoint": {"name": "web-a", "network": "vnet-a", "address": "192.0.2.50", "service": "web"}, "state": "approved", "reason": "approved_by_admin"},
    {"endpoint": {"name": "web-b", "network": "vnet-a", "address": "192.0.2.51", "service": "web"}, "state": "rejected", "reason": "rejected_by_admin"}
  ]
}"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(store::STATE_FILE), text).unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let loaded = store
        .load()
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("read");
    assert_eq!(loaded.version, STATE_VERSION);
    let config = cfg(&[A, B]);
    let next = reconcile(&config, &loaded).unwrap();
    let ids: Vec<Option<u32>> = config
        .endpoints
        .iter()
        .map(|e| next.endpoints.get(&EndpointIdentity::of(e)))
        .collect();
    assert_eq!(ids, [Some(2), Some(5)]);
    assert_eq!(
        link_ids(&next, &config),
        [("web-a".into(), 7), ("web-b".into(), 9)]
    );
    let states: Vec<_> = config
        .endpoints
        .iter()
        .map(|e| next.decisions[&EndpointIdentity::of(e)].state)
        .collect();
    assert_eq!(
        states,
        [
            crate::approval::ConnectionState::Approved,
            crate::approval::ConnectionState::Rejected
        ]
    );
    let key = BackendKey {
        service: "web".into(),
        address: "198.51.100.10".parse().unwrap(),
    };
    assert_eq!(next.backends.get(&key), Some(3));
    store.save(&next).unwrap();
    let written = std::fs::read_to_string(store.path()).unwrap();
    assert!(!written.contains("address6"), "{written}");
    assert!(written.contains("\"address\": \"192.0.2.50\""), "{written}");
}

/// An IPv6 and a dual-stack identity round-trip through the file; the
/// dual-stack endpoint has one id, one decision and one link id.
#[test]
fn ipv6_and_dual_stack_identities_round_trip() {
    let text = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
  - name: web6
    protocol: tcp
    ports: [{port: 80}]
    backends: [{address: 2001:db8:100::10}]
    nat: {addresses: [2001:db8:100::200]}
    visibility: ['*']
endpoints:
  - {name: e6, tenant: t, network: vnet-a, address: 2001:db8:c1::50, service: web6}
";
    let mut config = Config::parse(Path::new("t.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
    // Dual-stack (refused by validation in phase 1, kept by the state).
    let mut dual = config.endpoints[0].clone();
    dual.name = "e46".into();
    dual.address = "192.0.2.50".parse().unwrap();
    dual.address6 = Some("2001:db8:c1::51".parse().unwrap());
    config.endpoints.push(dual);
    let state = reconcile(&config, &PersistedState::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    store.save(&state).unwrap();
    let loaded = store.load().unwrap().expect("read");
    assert_eq!(loaded, state);
    let dual_id = EndpointIdentity::of(&config.endpoints[1]);
    assert_eq!(dual_id.address6, Some("2001:db8:c1::51".parse().unwrap()));
    assert!(loaded.endpoints.get(&dual_id).is_some());
    assert!(loaded.link_ids.get(&dual_id).is_some());
    assert!(loaded.decisions.contains_key(&dual_id));
    // Dropping address6 is an identity change (a new endpoint), as any
    // address change is.
    let mut single = dual_id.clone();
    single.address6 = None;
    assert!(loaded.endpoints.get(&single).is_none());
}
