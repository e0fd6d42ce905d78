use std::path::Path;

use super::*;
use crate::{
    approval::{self, Action, Decision},
    state::reconcile,
};

const BASE: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: c2, role: consumer, network: vnet-b}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10}, {address: 198.51.100.11, weight: 2}]
    nat: {addresses: [198.51.100.200]}
    visibility: [tenant-a, tenant-b]
    auto_approve: [tenant-a]
endpoints:
  - {name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}
  - {name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}
";

fn cfg(text: &str) -> Config {
    Config::parse(Path::new("test.yaml"), text).unwrap_or_else(|e| panic!("{e}"))
}

/// Reconciles `text` into `state` and returns the new model.
fn step(state: &mut PersistedState, text: &str) -> Model {
    let c = cfg(text);
    *state = reconcile(&c, state).expect("ids");
    Model::build(&c, state).expect("model")
}

/// Approves `name` the way the controller does.
fn approve(state: &mut PersistedState, model: &Model, name: &str) {
    let e = model.endpoint_by_name(name).expect("endpoint");
    let identity = state
        .decisions
        .keys()
        .find(|k| k.name == name)
        .expect("decision")
        .clone();
    let access = approval::Access {
        tenant: e.tenant.clone(),
        service: e.service.clone(),
        visible: true,
        auto_approved: false,
    };
    let current = state.decisions[&identity];
    let next: Decision = approval::apply(current, Action::Approve, &access)
        .expect("allowed")
        .expect("changed");
    state.decisions.insert(identity, next);
}

fn state_of(m: &Model, name: &str) -> ConnectionState {
    m.endpoint_by_name(name).expect("endpoint").state
}

#[test]
fn model_from_config_and_state() {
    let mut s = PersistedState::default();
    let m = step(&mut s, BASE);
    assert_eq!(m.networks["vnet-a"], NetworkId(1));
    assert_eq!(m.networks["vnet-b"], NetworkId(2));
    assert_eq!(m.interfaces["c2"].network, Some(NetworkId(2)));
    assert_eq!(m.interfaces["p0"].network, None);
    let orders = &m.services[&ServiceId(1)];
    assert_eq!(
        orders.ports,
        [PortMap {
            port: 80,
            target_port: 8080
        }]
    );
    let ids: Vec<_> = orders.backends.iter().map(|b| (b.id, b.weight)).collect();
    assert_eq!(ids, [(BackendId(1), 1), (BackendId(2), 2)]);
    let a = m.endpoint_by_name("orders-a").unwrap();
    assert_eq!(
        (a.id, a.network_id, a.service_id),
        (EndpointId(1), NetworkId(1), ServiceId(1))
    );
    assert_eq!(
        (a.state, a.reason),
        (ConnectionState::Approved, Reason::AutoApproved)
    );
    assert!(a.passes_traffic());
    let b = m.endpoint_by_name("orders-b").unwrap();
    assert_eq!(
        (b.state, b.reason),
        (ConnectionState::Pending, Reason::AwaitingApproval)
    );
    // Neither the endpoint nor the gateway sets a cap: a fair share of
    // orders' 64512 NAT ports (two endpoints) and of the conntrack table.
    assert_eq!(
        b.limits.max_flows,
        crate::config::fair_max_flows(64_512, 2, 262_144, 2)
    );
    assert_eq!(b.limits.max_flows, 64_512 * 3 / 4 / 2);
}

#[test]
fn unchanged_config_gives_an_equal_model_and_an_empty_diff() {
    let mut s = PersistedState::default();
    let m1 = step(&mut s, BASE);
    let m2 = step(&mut s, BASE);
    assert_eq!(m1, m2);
    let d = Model::diff(&m1, &m2);
    assert!(d.is_empty(), "{d:#?}");
    assert!(d.summary().is_empty());
}

#[test]
fn diff_reports_backends_nat_addresses_and_services() {
    let mut s = PersistedState::default();
    let m1 = step(&mut s, BASE);
    let text = BASE
        .replace(
            "{address: 198.51.100.11, weight: 2}",
            "{address: 198.51.100.11, weight: 3}, {address: 198.51.100.12}",
        )
        .replace("[198.51.100.200]", "[198.51.100.201]")
        .replace("{address: 198.51.100.10}, ", "");
    let m2 = step(&mut s, &text);
    let d = Model::diff(&m1, &m2);
    let ids = |v: &[(BackendId, (ServiceId, BackendModel))]| {
        v.iter().map(|(id, _)| id.0).collect::<Vec<_>>()
    };
    assert_eq!(ids(&d.backends.removed), [1]);
    assert_eq!(
        ids(&d.backends.added),
        [3],
        "a new backend never gets a just-released id"
    );
    assert_eq!(d.backends.changed.len(), 1);
    assert_eq!(
        (
            d.backends.changed[0].1.1.weight,
            d.backends.changed[0].2.1.weight
        ),
        (2, 3)
    );
    assert_eq!(
        d.nat_addresses.added,
        [(ServiceId(1), "198.51.100.201".parse().unwrap())]
    );
    assert_eq!(
        d.nat_addresses.removed,
        [(ServiceId(1), "198.51.100.200".parse().unwrap())]
    );
    assert_eq!(d.services.changed.len(), 1);
    assert!(
        d.endpoints.is_empty(),
        "endpoints keep their ids and decisions"
    );
    assert!(!d.is_empty());
}

#[test]
fn decisions_survive_reloads() {
    let mut s = PersistedState::default();
    let m1 = step(&mut s, BASE);
    approve(&mut s, &m1, "orders-b");
    let m2 = step(&mut s, BASE);
    assert_eq!(state_of(&m2, "orders-b"), ConnectionState::Approved);
    let d = Model::diff(&m1, &m2);
    assert_eq!(d.endpoints.changed.len(), 1);
    assert_eq!(d.endpoints.changed[0].2.state, ConnectionState::Approved);
}

#[test]
fn identity_changes_do_not_inherit_decisions() {
    // Each of name, network, address and service is part of the identity.
    let extra_service = "  - name: billing
    protocol: tcp
    ports: [{port: 443}]
    backends: [{address: 198.51.100.20}]
    nat: {addresses: [198.51.100.210]}
    visibility: [tenant-b]
endpoints:";
    let base = BASE.replace("endpoints:", extra_service);
    let ep =
        "{name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}";
    for changed in [
        "{name: orders-b2, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}",
        "{name: orders-b, tenant: tenant-b, network: vnet-a, address: 192.0.2.51, service: orders}",
        "{name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.51, service: orders}",
        "{name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: billing}",
    ] {
        let mut s = PersistedState::default();
        let m1 = step(&mut s, &base);
        approve(&mut s, &m1, "orders-b");
        let old = m1.endpoint_by_name("orders-b").unwrap().clone();
        let m2 = step(&mut s, &base.replace(ep, changed));
        let new = m2
            .endpoints
            .values()
            .find(|e| e.tenant == "tenant-b")
            .unwrap();
        assert_eq!(
            new.state,
            ConnectionState::Pending,
            "{changed}: a new endpoint starts over"
        );
        assert_ne!(new.id, old.id, "{changed}: a new endpoint gets a new id");
        let d = Model::diff(&m1, &m2);
        assert_eq!(d.endpoints.removed.len(), 1, "{changed}");
        assert_eq!(d.endpoints.added.len(), 1, "{changed}");
        // Changing it back is a new endpoint again: the approval is gone.
        let m3 = step(&mut s, &base);
        assert_eq!(
            state_of(&m3, "orders-b"),
            ConnectionState::Pending,
            "{changed}"
        );
    }
}

#[test]
fn tenant_is_not_identity_but_is_judged_on_reload() {
    let mut s = PersistedState::default();
    let m1 = step(&mut s, BASE);
    approve(&mut s, &m1, "orders-b");
    let m2 = step(
        &mut s,
        &BASE.replace("tenant: tenant-b", "tenant: tenant-c"),
    );
    let b = m2.endpoint_by_name("orders-b").unwrap();
    assert_eq!(b.id, m1.endpoint_by_name("orders-b").unwrap().id);
    assert_eq!(
        (b.state, b.reason),
        (ConnectionState::Rejected, Reason::VisibilityNarrowed)
    );
}

#[test]
fn reload_narrowing_visibility_rejects_approved_endpoints() {
    let mut s = PersistedState::default();
    let m1 = step(&mut s, BASE);
    approve(&mut s, &m1, "orders-b");
    let m2 = step(
        &mut s,
        &BASE.replace("visibility: [tenant-a, tenant-b]", "visibility: [tenant-a]"),
    );
    let b = m2.endpoint_by_name("orders-b").unwrap();
    assert_eq!(
        (b.state, b.reason),
        (ConnectionState::Rejected, Reason::VisibilityNarrowed)
    );
    assert_eq!(state_of(&m2, "orders-a"), ConnectionState::Approved);
    // Widening it again decides nothing: an admin approves.
    let m3 = step(&mut s, BASE);
    assert_eq!(state_of(&m3, "orders-b"), ConnectionState::Rejected);
}

#[test]
fn endpoint_removed_from_config_loses_its_decision() {
    let mut s = PersistedState::default();
    let m1 = step(&mut s, BASE);
    approve(&mut s, &m1, "orders-b");
    let without = BASE.replace(
        "  - {name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}\n",
        "",
    );
    let m2 = step(&mut s, &without);
    assert!(m2.endpoint_by_name("orders-b").is_none());
    assert_eq!(s.decisions.len(), 1);
    let m3 = step(&mut s, BASE);
    assert_eq!(state_of(&m3, "orders-b"), ConnectionState::Pending);
    // Its old id (2) was released a generation ago, so it may be reused now.
    assert_eq!(m3.endpoint_by_name("orders-b").unwrap().id, EndpointId(2));
}
