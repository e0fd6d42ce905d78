use std::path::Path;

use plink_common::{CtFwdKey, CtFwdValue, IPPROTO_TCP, v4};

use super::*;
use crate::{
    approval::{self, Action},
    config::Config,
    model::Model,
    state::{PersistedState, reconcile},
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
    backends: [{address: 198.51.100.10}, {address: 198.51.100.11}]
    nat: {addresses: [198.51.100.200]}
    visibility: [tenant-a, tenant-b]
    auto_approve: [tenant-a]
  - name: billing
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.12}]
    nat: {addresses: [198.51.100.201]}
    visibility: ['*']
    auto_approve: ['*']
endpoints:
  - {name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}
  - {name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}
  - {name: billing-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.51, service: billing}
";

fn a(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

fn step(state: &mut PersistedState, text: &str) -> Model {
    let c = Config::parse(Path::new("test.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
    *state = reconcile(&c, state).expect("ids");
    Model::build(&c, state).expect("model")
}

fn host() -> Observed {
    let mut interfaces = BTreeMap::new();
    for (i, name) in ["c1", "c2", "p0"].into_iter().enumerate() {
        interfaces.insert(
            name.to_owned(),
            HostInterface {
                ifindex: 10 + i as u32,
                mac: [2, 0, 0, 0, 0, i as u8],
                answers: crate::dataplane::AnswerPath::XdpTx,
            },
        );
    }
    Observed {
        interfaces,
        ..Default::default()
    }
}

fn svc<'a>(spec: &'a DataplaneSpec, model: &Model, name: &str) -> &'a ServiceSpec {
    let id = model
        .services
        .values()
        .find(|s| s.name == name)
        .expect("service")
        .id
        .0;
    spec.services.iter().find(|s| s.id == id).expect("spec")
}

#[test]
fn nat_slots_stay_put_and_removed_addresses_drain() {
    let none = BTreeMap::new();
    let (first, left) =
        nat_slots(&[a(200), a(201), a(202)], (1024, 2047), None, &none).expect("slots");
    assert!(left.is_empty());
    // Remove the middle address, add a new one.
    let (next, left) =
        nat_slots(&[a(200), a(202), a(203)], (1024, 2047), Some(&first), &none).expect("slots");
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
    // It became draining in this change: it drains at least until the next
    // one, even with no port counted (a flow may have started meanwhile).
    assert!(left.is_empty());
}

/// Issue 14, item 6: a draining address leaves its slot only once it holds
/// no port, and then stays in NAT_ADDRS as retired.
#[test]
fn a_draining_nat_address_leaves_only_once_its_last_flow_is_gone() {
    let mut state = PersistedState::default();
    let two = BASE.replacen("[198.51.100.200]", "[198.51.100.200, 198.51.100.202]", 1);
    let model = step(&mut state, &two);
    let mut observed = host();
    let first = plan(&model, &observed, &AllHealthy).expect("plan");
    observed.hold(&first);
    let model = step(&mut state, BASE);
    observed.nat_ports_in_use.insert(a(202), 1);
    let spec = plan(&model, &observed, &AllHealthy).expect("plan");
    let slots = |spec: &DataplaneSpec| -> Vec<(IpAddr, bool)> {
        svc(spec, &model, "orders")
            .nat
            .iter()
            .map(|n| (n.addr, n.draining))
            .collect()
    };
    assert_eq!(slots(&spec), vec![(a(200), false), (a(202), true)]);
    assert!(spec.retired_nat.is_empty());
    // Still one flow: still draining, however many applies.
    observed.hold(&spec);
    let spec = plan(&model, &observed, &AllHealthy).expect("plan");
    assert_eq!(slots(&spec), vec![(a(200), false), (a(202), true)]);
    // The last flow is gone: the slot is vacant, the address retired.
    observed.nat_ports_in_use.clear();
    observed.hold(&spec);
    let spec = plan(&model, &observed, &AllHealthy).expect("plan");
    assert_eq!(
        slots(&spec),
        vec![(a(200), false), (Ipv4Addr::UNSPECIFIED.into(), true)]
    );
    let orders = svc(&spec, &model, "orders").id;
    assert_eq!(
        spec.retired_nat.get(&a(202)),
        Some(&RetiredNat {
            service_id: orders,
            slot: 1
        })
    );
    spec.validate().expect("a retired address can be written");
    // Retired stays retired while the caller keeps it in its grace ...
    observed.hold(&spec);
    let again = plan(&model, &observed, &AllHealthy).expect("plan");
    assert!(again.retired_nat.contains_key(&a(202)));
    // Retired addresses give way when NAT_ADDRS is short of room.
    let mut cramped = observed.clone();
    cramped.capacities.nat_addresses = 2;
    let spec = plan(&model, &cramped, &AllHealthy).expect("retired addresses never refuse a plan");
    assert!(spec.retired_nat.is_empty(), "{:?}", spec.retired_nat);
    // ... and is no longer retired once a service holds it again.
    let back = step(&mut state, &two);
    let spec = plan(&back, &observed, &AllHealthy).expect("plan");
    assert!(spec.retired_nat.is_empty());
    let slots: Vec<_> = svc(&spec, &back, "orders")
        .nat
        .iter()
        .map(|n| (n.addr, n.draining))
        .collect();
    assert_eq!(slots, vec![(a(200), false), (a(202), false)]);
}

/// Issue 14, item 6: an adopting start learns the draining addresses from
/// the pins (`nat_held` read from SERVICES), so a restart does not drop
/// them, and a service removed from the config retires its addresses.
#[test]
fn draining_addresses_held_by_the_pins_keep_draining_after_a_restart() {
    let mut state = PersistedState::default();
    let model = step(&mut state, BASE);
    let orders = model
        .services
        .values()
        .find(|s| s.name == "orders")
        .expect("orders")
        .id
        .0;
    let billing = model
        .services
        .values()
        .find(|s| s.name == "billing")
        .expect("billing")
        .id
        .0;
    let mut observed = host();
    // What the pins say: .202 drains in orders' slot 0 with a flow on it.
    observed.nat_held.insert(
        orders,
        vec![
            NatSpec {
                addr: a(202),
                ports: 1024..=2047,
                draining: true,
            },
            NatSpec {
                addr: a(200),
                ports: 1024..=65535,
                draining: false,
            },
        ],
    );
    // A service no longer in the config (its flows are purged).
    observed.nat_held.insert(
        40,
        vec![NatSpec {
            addr: a(220),
            ports: 1024..=65535,
            draining: false,
        }],
    );
    observed.nat_ports_in_use.insert(a(202), 2);
    let spec = plan(&model, &observed, &AllHealthy).expect("plan");
    let slots: Vec<_> = svc(&spec, &model, "orders")
        .nat
        .iter()
        .map(|n| (n.addr, n.ports.clone(), n.draining))
        .collect();
    assert_eq!(
        slots,
        vec![(a(202), 1024..=2047, true), (a(200), 1024..=65535, false)]
    );
    assert_eq!(
        spec.retired_nat.keys().copied().collect::<Vec<_>>(),
        vec![a(220)]
    );
    // Billing cannot take the draining address while it carries flows.
    let moved = BASE.replacen(
        "nat: {addresses: [198.51.100.201]}",
        "nat: {addresses: [198.51.100.201, 198.51.100.202]}",
        1,
    );
    let model = step(&mut state, &moved);
    let err = plan(&model, &observed, &AllHealthy).unwrap_err();
    assert!(
        matches!(err, PlanError::NatAddressDraining { addr, flows: 2, .. } if addr == a(202)),
        "{err}"
    );
    let _ = billing;
}

/// Issue 14, item 6: with every slot taken, a draining address that still
/// carries flows is never replaced; the plan refuses, naming them.
#[test]
fn a_draining_address_with_flows_is_never_replaced() {
    let mut state = PersistedState::default();
    let eight: Vec<String> = (210..218).map(|i| format!("198.51.100.{i}")).collect();
    let text = BASE.replacen("[198.51.100.200]", &format!("[{}]", eight.join(", ")), 1);
    let model = step(&mut state, &text);
    let mut observed = host();
    let first = plan(&model, &observed, &AllHealthy).expect("plan");
    observed.hold(&first);
    // .217 leaves (draining, one flow), .220 comes: slots are all taken.
    let swapped = text.replacen("198.51.100.217]", "198.51.100.220]", 1);
    let model = step(&mut state, &swapped);
    observed.nat_ports_in_use.insert(a(217), 1);
    let err = plan(&model, &observed, &AllHealthy).unwrap_err();
    assert_eq!(
        err,
        PlanError::NatSlotsFull {
            service: "orders".into(),
            addr: a(220),
            draining: vec![(a(217), 1)],
        }
    );
    assert!(
        err.to_string().contains("198.51.100.217: 1 NAT port"),
        "{err}"
    );
    // Its last flow gone, it gives the slot up to the new address.
    observed.nat_ports_in_use.clear();
    let spec = plan(&model, &observed, &AllHealthy).expect("plan");
    let orders = svc(&spec, &model, "orders");
    assert_eq!(orders.nat[7].addr, a(220));
    assert!(spec.retired_nat.contains_key(&a(217)));
}

/// Issue 14's red-team case, found by the plan: the old controller wrote
/// SERVICES and then failed on `NAT address … used twice`.
#[test]
fn a_nat_address_moves_only_once_its_old_service_holds_no_port_on_it() {
    let mut state = PersistedState::default();
    let model = step(&mut state, BASE);
    let mut observed = host();
    let first = plan(&model, &observed, &AllHealthy).expect("plan");
    observed.hold(&first);
    let moved = BASE
        .replacen(
            "nat: {addresses: [198.51.100.200]}",
            "nat: {addresses: [198.51.100.210]}",
            1,
        )
        .replacen(
            "nat: {addresses: [198.51.100.201]}",
            "nat: {addresses: [198.51.100.201, 198.51.100.200]}",
            1,
        );
    let model = step(&mut state, &moved);

    // orders' flows still hold ports on .200: refused, by name.
    observed.nat_ports_in_use.insert(a(200), 3);
    let err = plan(&model, &observed, &AllHealthy).unwrap_err();
    assert_eq!(
        err,
        PlanError::NatAddressDraining {
            addr: a(200),
            from: "orders".into(),
            to: "billing".into(),
            flows: 3
        }
    );
    assert!(err.to_string().contains("198.51.100.200"), "{err}");

    // Once they are gone, billing takes it; orders' slot stays in place,
    // vacant, so its other slots keep their index.
    observed.nat_ports_in_use.clear();
    let spec = plan(&model, &observed, &AllHealthy).expect("plan");
    let orders: Vec<_> = svc(&spec, &model, "orders")
        .nat
        .iter()
        .map(|n| (n.addr, n.draining))
        .collect();
    assert_eq!(
        orders,
        vec![(Ipv4Addr::UNSPECIFIED.into(), true), (a(210), false)]
    );
    let billing: Vec<_> = svc(&spec, &model, "billing")
        .nat
        .iter()
        .map(|n| (n.addr, n.draining))
        .collect();
    assert_eq!(billing, vec![(a(201), false), (a(200), false)]);
    spec.validate().expect("the moved spec can be written");
    // A vacant slot is the first one reused.
    observed.hold(&spec);
    let again = moved.replacen("[198.51.100.210]", "[198.51.100.210, 198.51.100.211]", 1);
    let model = step(&mut state, &again);
    let spec = plan(&model, &observed, &AllHealthy).expect("plan");
    let orders: Vec<_> = svc(&spec, &model, "orders")
        .nat
        .iter()
        .map(|n| n.addr)
        .collect();
    assert_eq!(orders, vec![a(211), a(210)]);
}

#[test]
fn the_plan_refuses_what_the_maps_cannot_hold_before_anything_is_written() {
    let mut state = PersistedState::default();
    let model = step(&mut state, BASE);
    // A missing interface, by name.
    let mut observed = host();
    observed.interfaces.remove("c2");
    assert_eq!(
        plan(&model, &observed, &AllHealthy).unwrap_err(),
        PlanError::MissingInterface("c2".into())
    );
    let small = |f: fn(&mut Capacities)| {
        let mut observed = host();
        f(&mut observed.capacities);
        plan(&model, &observed, &AllHealthy)
            .unwrap_err()
            .to_string()
    };
    // 3 endpoints, 2 addresses per network... 3 port entries + 3 echo entries.
    let e = small(|c| c.endpoint_keys = 5);
    assert!(
        e.contains("need 6 endpoint-table entries") && e.contains("holds 5"),
        "{e}"
    );
    let e = small(|c| c.endpoint_addresses = 2);
    assert!(e.contains("3 endpoint addresses"), "{e}");
    let e = small(|c| c.nat_addresses = 1);
    assert!(e.contains("2 NAT addresses"), "{e}");
    let e = small(|c| c.endpoints = 3);
    assert!(e.contains("endpoint id 3 is beyond"), "{e}");
    let e = small(|c| c.backends = 2);
    assert!(e.contains("backend id 2 is beyond"), "{e}");
    let e = small(|c| c.services = 2);
    assert!(e.contains("service id 2 is beyond"), "{e}");
    let e = small(|c| c.interfaces = 2);
    assert!(e.contains("3 interfaces"), "{e}");
    // The same model fits the build's maps.
    plan(&model, &host(), &AllHealthy).expect("fits");
}

/// The maps' sizes the plan assumes are the ones the embedded eBPF object
/// declares.
#[test]
fn build_capacities_match_the_ebpf_object() {
    let obj = aya_obj::Object::parse(crate::EBPF_OBJECT).expect("object");
    let size = |name: &str| obj.maps[name].max_entries();
    let c = Capacities::BUILD;
    assert_eq!(c.interfaces, size(plink_common::map_names::INTERFACES));
    assert_eq!(c.endpoint_keys, size(plink_common::map_names::ENDPOINTS));
    assert_eq!(
        c.endpoint_addresses,
        size(plink_common::map_names::ARP_ENDPOINTS)
    );
    assert_eq!(c.endpoints, size(plink_common::map_names::EP_STATS));
    assert_eq!(c.services, size(plink_common::map_names::SERVICES));
    assert_eq!(c.backends, size(plink_common::map_names::BACKENDS));
    assert_eq!(c.nat_addresses, size(plink_common::map_names::NAT_ADDRS));
}

/// A flow of `endpoint` to `backend` as the datapath would have created it.
fn flow(model: &Model, endpoint: &str, backend: IpAddr) -> (CtFwdKey, CtFwdValue) {
    let e = model.endpoint_by_name(endpoint).expect("endpoint");
    let b = model.services[&e.service_id]
        .backends
        .iter()
        .find(|b| b.address == backend)
        .expect("backend");
    let key = CtFwdKey {
        src_addr_be: v4([192, 0, 2, 1]),
        dst_addr_be: match e.address {
            IpAddr::V4(a) => v4(a.octets()),
            IpAddr::V6(a) => plink_common::v6(a.octets()),
        },
        network_id: e.network_id.0,
        src_port_be: 40000u16.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let value = CtFwdValue {
        backend_addr_be: crate::dataplane::spec::addr(backend),
        backend_port_be: 8080u16.to_be(),
        endpoint_id: e.id.0,
        service_id: e.service_id.0,
        backend_id: b.id.0,
        proto: IPPROTO_TCP,
        ..Default::default()
    };
    (key, value)
}

fn judge(
    model: &Model,
    retired: &BTreeSet<(u32, IpAddr)>,
    f: &(CtFwdKey, CtFwdValue),
) -> Option<Stale> {
    judge_with(model, retired, f, &AllHealthy)
}

fn judge_with(
    model: &Model,
    retired: &BTreeSet<(u32, IpAddr)>,
    f: &(CtFwdKey, CtFwdValue),
    health: &dyn Health,
) -> Option<Stale> {
    let spec = plan(model, &host(), health).expect("plan");
    FlowPolicy::new(&spec, model, retired).judge(&f.0, &f.1)
}

/// Issue 14, item 2: every live flow is judged against the desired spec,
/// whatever the previous spec was (an adopting start has none).
#[test]
fn flows_are_allowed_only_by_the_desired_spec() {
    let none = BTreeSet::new();
    let mut state = PersistedState::default();
    let model = step(&mut state, BASE);
    let orders_a = flow(&model, "orders-a", a(10));
    let orders_b = flow(&model, "orders-b", a(11));
    assert_eq!(judge(&model, &none, &orders_a), None, "approved: kept");
    assert_eq!(
        judge(&model, &none, &orders_b),
        Some(Stale::NotApproved),
        "orders-b starts pending"
    );

    // Approved, then rejected.
    let id = state
        .decisions
        .keys()
        .find(|k| k.name == "orders-b")
        .expect("decision")
        .clone();
    let access = approval::Access {
        tenant: "tenant-b".into(),
        service: "orders".into(),
        visible: true,
        auto_approved: false,
    };
    let d = approval::apply(state.decisions[&id], Action::Approve, &access)
        .expect("allowed")
        .expect("changed");
    state.decisions.insert(id.clone(), d);
    let c = Config::parse(Path::new("test.yaml"), BASE).expect("config");
    let approved = Model::build(&c, &state).expect("model");
    assert_eq!(judge(&approved, &none, &orders_b), None);
    let d = approval::apply(d, Action::Reject, &access)
        .expect("allowed")
        .expect("changed");
    state.decisions.insert(id, d);
    let rejected = Model::build(&c, &state).expect("model");
    assert_eq!(judge(&rejected, &none, &orders_b), Some(Stale::NotApproved));

    // Deleted from the config: no endpoint there any more.
    let deleted = step(
        &mut state,
        &BASE.replacen(
            "  - {name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}\n",
            "",
            1,
        ),
    );
    assert_eq!(judge(&deleted, &none, &orders_a), Some(Stale::NoEndpoint));

    // Re-pointed to another service: a new endpoint (new id) at the same key.
    let mut state = PersistedState::default();
    let model = step(&mut state, BASE);
    let orders_a = flow(&model, "orders-a", a(10));
    let repointed = step(
        &mut state,
        &BASE.replacen(
            "address: 192.0.2.50, service: orders}\n  - {name: orders-b",
            "address: 192.0.2.50, service: billing}\n  - {name: orders-b",
            1,
        ),
    );
    assert_eq!(judge(&repointed, &none, &orders_a), Some(Stale::Repointed));

    // The service's target port changed.
    let mut state = PersistedState::default();
    let model = step(&mut state, BASE);
    let orders_a = flow(&model, "orders-a", a(10));
    let other_port = step(
        &mut state,
        &BASE.replacen("target_port: 8080", "target_port: 8081", 1),
    );
    assert_eq!(
        judge(&other_port, &none, &orders_a),
        Some(Stale::TargetPortChanged)
    );

    // Backends: gone, down in the config, unhealthy, drained then removed.
    let mut state = PersistedState::default();
    let model = step(&mut state, BASE);
    let orders_a = flow(&model, "orders-a", a(10));
    let backend_id = orders_a.1.backend_id;
    let down = step(
        &mut state,
        &BASE.replacen(
            "{address: 198.51.100.10}",
            "{address: 198.51.100.10, state: down}",
            1,
        ),
    );
    assert_eq!(judge(&down, &none, &orders_a), Some(Stale::BackendDown));
    struct Sick(u32);
    impl Health for Sick {
        fn healthy(&self, b: BackendId) -> bool {
            b.0 != self.0
        }
    }
    let model = step(&mut state, BASE);
    assert_eq!(
        judge_with(&model, &none, &orders_a, &Sick(backend_id)),
        None,
        "a failed health check keeps established flows"
    );
    let gone = step(
        &mut state,
        &BASE.replacen(
            "[{address: 198.51.100.10}, {address: 198.51.100.11}]",
            "[{address: 198.51.100.11}]",
            1,
        ),
    );
    assert_eq!(judge(&gone, &none, &orders_a), Some(Stale::BackendGone));
    let retired = BTreeSet::from([(backend_id, a(10))]);
    assert_eq!(
        judge(&gone, &retired, &orders_a),
        None,
        "a backend drained before it left keeps its flows"
    );
    let spec = plan(&gone, &host(), &AllHealthy).expect("plan");
    assert_eq!(
        FlowPolicy::new(&spec, &gone, &retired).via_retired(&orders_a.1),
        Some((backend_id, a(10)))
    );
}

/// Issue 18: every endpoint of a PROXY protocol service gets its header
/// (its link id, or its name for `aws`) in PROXY_HEADERS; no other does,
/// so the apply empties their slots.
#[test]
fn proxy_headers_follow_the_services_and_the_link_ids() {
    use plink_common::proxy::{LinkIdTlv, build_header};
    let headers = |model: &Model| -> BTreeMap<String, plink_common::proxy::ProxyHeader> {
        let spec = plan(model, &host(), &AllHealthy).expect("plan");
        spec.proxy_headers
            .iter()
            .map(|(id, h)| {
                (
                    model.endpoints[&crate::model::EndpointId(*id)].name.clone(),
                    *h,
                )
            })
            .collect()
    };
    let mut state = PersistedState::default();
    let off = step(&mut state, BASE);
    assert!(headers(&off).is_empty(), "off by default");

    let azure = BASE.replacen(
        "    auto_approve: [tenant-a]\n",
        "    auto_approve: [tenant-a]\n    proxy_protocol: {version: 2, link_id_tlv: azure}\n",
        1,
    );
    let model = step(&mut state, &azure);
    let got = headers(&model);
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(names, ["orders-a", "orders-b"], "billing sends none");
    for (name, h) in &got {
        let e = model.endpoint_by_name(name).unwrap();
        assert_ne!(e.link_id, 0);
        assert_eq!(
            *h,
            build_header(LinkIdTlv::Azure, e.link_id, b"").unwrap(),
            "{name}"
        );
    }
    assert_ne!(got["orders-a"], got["orders-b"], "each its own link id");

    // A configured link id is the one sent; the endpoint id stays.
    let pinned = azure.replacen(
        "service: orders}",
        "service: orders, link_id: 4000000000}",
        1,
    );
    let before = model.endpoint_by_name("orders-a").unwrap().id;
    let model = step(&mut state, &pinned);
    let a = model.endpoint_by_name("orders-a").unwrap();
    assert_eq!((a.id, a.link_id), (before, 4_000_000_000));
    assert_eq!(
        headers(&model)["orders-a"],
        build_header(LinkIdTlv::Azure, 4_000_000_000, b"").unwrap()
    );

    // aws: the name; a custom type: that type.
    for (tlv, kind) in [("aws", LinkIdTlv::Aws), ("0xE7", LinkIdTlv::Custom(0xE7))] {
        let model = step(
            &mut state,
            &pinned.replacen("link_id_tlv: azure", &format!("link_id_tlv: {tlv}"), 1),
        );
        let b = model.endpoint_by_name("orders-b").unwrap();
        assert_eq!(
            headers(&model)["orders-b"],
            build_header(kind, b.link_id, b"orders-b").unwrap(),
            "{tlv}"
        );
    }

    // Removed endpoint and service turned off: no header left in the spec.
    let without_b = pinned.replacen(
        "  - {name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}\n",
        "",
        1,
    );
    let model = step(&mut state, &without_b);
    let names: Vec<String> = headers(&model).into_keys().collect();
    assert_eq!(names, ["orders-a"]);
    assert!(headers(&step(&mut state, BASE)).is_empty());
}

/// A config past serde only: validation refuses what these tests need
/// (NAT46), the model and plan must still handle it.
fn unvalidated(state: &mut PersistedState, text: &str) -> Model {
    let c: Config = serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
    *state = reconcile(&c, state).expect("ids");
    Model::build(&c, state).expect("model")
}

const V6: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: c2, role: consumer, network: vnet-b}
  - {name: p0, role: provider}
services:
  - name: web6
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 2001:db8:100::10}, {address: 2001:db8:100::11}]
    nat: {addresses: [2001:db8:100::200]}
    visibility: ['*']
    auto_approve: ['*']
endpoints:
  - {name: e6, tenant: t, network: vnet-a, address: 2001:db8:c1::50, service: web6}
";

#[test]
fn an_ipv6_service_is_modelled_and_planned_with_its_addresses() {
    let mut state = PersistedState::default();
    let m = step(&mut state, V6);
    let svc = m.services.values().next().unwrap();
    assert_eq!(svc.family, crate::config::Family::Ipv6);
    let six = |s: &str| -> IpAddr { s.parse().unwrap() };
    assert_eq!(
        svc.backends.iter().map(|b| b.address).collect::<Vec<_>>(),
        [six("2001:db8:100::10"), six("2001:db8:100::11")]
    );
    assert_eq!(svc.nat.addresses, [six("2001:db8:100::200")]);
    let e = m.endpoint_by_name("e6").unwrap();
    assert_eq!(e.served_addresses(svc.family), [six("2001:db8:c1::50")]);
    assert!(e.passes_traffic());
    // The spec carries the IPv6 addresses as they are.
    let spec = plan(&m, &host(), &AllHealthy).expect("plan");
    assert_eq!(spec.endpoints[0].addr, six("2001:db8:c1::50"));
    assert_eq!(spec.services[0].nat[0].addr, six("2001:db8:100::200"));
    assert!(spec.backends.iter().all(|b| b.addr.is_ipv6()));
    spec.validate().expect("a valid IPv6 spec");
    // Maglev spreads over IPv6 backends like IPv4 ones.
    let table = maglev::build_table(
        &svc.backends
            .iter()
            .map(|b| MaglevBackend {
                address: b.address,
                port: 8080,
                weight: 1,
            })
            .collect::<Vec<_>>(),
        svc.maglev_table_size,
    )
    .unwrap();
    let first = table.iter().filter(|&&i| i == 0).count() as f64 / table.len() as f64;
    assert!((0.4..0.6).contains(&first), "{first}");
}

#[test]
fn a_dual_stack_endpoint_of_an_ipv4_service_is_one_endpoint_served_on_both_addresses() {
    let text = BASE.replace(
        "address: 192.0.2.51, service: billing}",
        "address: 192.0.2.51, address6: '2001:db8:c2::51', service: billing}",
    );
    let mut state = PersistedState::default();
    let m = step(&mut state, &text);
    let e = m.endpoint_by_name("billing-b").unwrap();
    let six: IpAddr = "2001:db8:c2::51".parse().unwrap();
    assert_eq!(e.address, IpAddr::from([192, 0, 2, 51]));
    assert_eq!(e.address6, Some(six));
    // One identity: one id, one decision, one link id for both addresses.
    assert_eq!(state.endpoints.iter().count(), 3);
    assert_eq!(state.decisions.len(), 3);
    let family = m.services[&e.service_id].family;
    assert_eq!(
        e.served_addresses(family),
        [IpAddr::from([192, 0, 2, 51]), six]
    );
    let spec = plan(&m, &host(), &AllHealthy).unwrap_or_else(|e| panic!("{e}"));
    let served: Vec<_> = spec.endpoints.iter().filter(|s| s.id == e.id.0).collect();
    // One spec endpoint, the IPv6 address beside the IPv4 one (NAT64).
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].addr, IpAddr::from([192, 0, 2, 51]));
    assert_eq!(served[0].addr6, Some(six));
    spec.validate().expect("a valid NAT64 spec");
    // An IPv6 address alone in front of the IPv4 service: NAT64 too.
    let text = BASE.replace(
        "address: 192.0.2.51, service: billing}",
        "address: '2001:db8:c2::51', service: billing}",
    );
    let m = step(&mut PersistedState::default(), &text);
    let spec = plan(&m, &host(), &AllHealthy).unwrap_or_else(|e| panic!("{e}"));
    let e = m.endpoint_by_name("billing-b").unwrap();
    let s = spec.endpoints.iter().find(|s| s.id == e.id.0).unwrap();
    assert_eq!((s.addr, s.addr6), (six, None));
    assert!(spec.backends.iter().all(|b| b.addr.is_ipv4()));
    spec.validate().expect("a valid NAT64 spec");
}

#[test]
fn an_ipv4_endpoint_of_an_ipv6_service_is_a_plan_error() {
    // NAT46, which validation refuses: never a silently unserved endpoint.
    let text = V6.replace("address: 2001:db8:c1::50", "address: 192.0.2.50");
    let m = unvalidated(&mut PersistedState::default(), &text);
    let err = plan(&m, &host(), &AllHealthy).unwrap_err();
    assert!(
        matches!(err, PlanError::NoServedAddress { ref endpoint, .. } if endpoint == "e6"),
        "{err}"
    );
    assert!(err.to_string().contains("needs NAT46"), "{err}");
}

/// NAT64 flows (and NAT66 ones) are keyed by the consumer's IPv6 packet:
/// the policy knows the IPv6 address's port and ICMPv6 echo keys, or it
/// would purge those flows after every apply.
#[test]
fn flows_at_a_nat64_address_are_allowed_like_the_ipv4_ones() {
    let text = BASE.replace(
        "address: 192.0.2.51, service: billing}",
        "address: 192.0.2.51, address6: '2001:db8:c2::51', service: billing}",
    );
    let none = BTreeSet::new();
    let mut state = PersistedState::default();
    let model = step(&mut state, &text);
    let v4_flow = flow(&model, "billing-b", a(12));
    assert_eq!(judge(&model, &none, &v4_flow), None);
    let six: IpAddr = "2001:db8:c2::51".parse().unwrap();
    let mut tcp6 = v4_flow;
    tcp6.0.src_addr_be = crate::dataplane::spec::addr("2001:db8:c2::99".parse().unwrap());
    tcp6.0.dst_addr_be = crate::dataplane::spec::addr(six);
    assert_eq!(judge(&model, &none, &tcp6), None, "TCP at the IPv6 address");
    let mut echo6 = tcp6;
    echo6.0.proto = plink_common::IPPROTO_ICMPV6;
    echo6.0.dst_port_be = 0;
    echo6.0.src_port_be = 77u16.to_be();
    echo6.1.proto = plink_common::IPPROTO_ICMP;
    echo6.1.backend_port_be = 77u16.to_be();
    assert_eq!(judge(&model, &none, &echo6), None, "ICMPv6 echo");
    // The address taken away: its flows go. address6 is part of the
    // endpoint's identity, so the IPv4 address is a new endpoint's now.
    let model = step(&mut state, BASE);
    assert_eq!(judge(&model, &none, &tcp6), Some(Stale::NoEndpoint));
    assert_eq!(judge(&model, &none, &echo6), Some(Stale::NoEndpoint));
    assert_eq!(judge(&model, &none, &v4_flow), Some(Stale::Repointed));
}
