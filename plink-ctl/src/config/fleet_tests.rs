//! The `fleet` section: node sections, node selection and their errors.

use std::path::Path;

use super::*;

const FILE: &str = "/etc/plink/fleet.yaml";

const FLEET: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10}, {address: 198.51.100.11, weight: 2}]
    nat: {ports: 1024-65535}
    visibility: ['*']
  - name: billing
    protocol: udp
    ports: [{port: 53}]
    backends: [{address: 198.51.100.20}]
    nat: {}
    visibility: ['*']
endpoints:
  - {name: orders-a, tenant: t, network: vnet-a, address: 192.0.2.50, service: orders}
fleet:
  etcd: {endpoints: ['http://198.51.100.2:2379'], prefix: /plink/test}
  nodes:
    - name: gw1
      routing: {router_id: 203.0.113.1, next_hop: 203.0.113.11}
      nat:
        - {service: orders, addresses: [198.51.100.201, 198.51.100.202]}
        - {service: billing, addresses: [198.51.100.211]}
    - name: gw2
      routing: {router_id: 203.0.113.2, next_hop: 203.0.113.12}
      nat:
        - {service: orders, addresses: [198.51.100.203]}
        - {service: billing, addresses: [198.51.100.212]}
";

fn edit(from: &str, to: &str) -> String {
    assert_eq!(FLEET.matches(from).count(), 1, "{from:?} must occur once");
    FLEET.replacen(from, to, 1)
}

/// 1-based line and column of the first `needle`.
fn at(text: &str, needle: &str) -> (usize, usize) {
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in text"));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

#[track_caller]
fn assert_error(result: Result<Config, ConfigError>, pos: (usize, usize), words: &str) {
    let e = match result {
        Ok(_) => panic!("accepted, wanted an error containing {words:?}"),
        Err(e) => e,
    };
    let rendered = e.to_string();
    assert!(
        rendered.contains(&format!("{FILE}:{}:{}: ", pos.0, pos.1)) && rendered.contains(words),
        "wanted {words:?} at {pos:?}, got:\n{rendered}"
    );
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new(FILE), text)
}

#[test]
fn a_valid_fleet_resolves_each_node_to_its_own_nat_addresses() {
    let shared = parse(FLEET).expect("valid");
    assert!(shared.node.is_none());
    assert!(shared.services.iter().all(|s| s.nat.addresses.is_empty()));
    let gw1 = Config::parse_node(Path::new(FILE), FLEET, Some("gw1")).expect("gw1");
    let gw2 = Config::parse_node(Path::new(FILE), FLEET, Some("gw2")).expect("gw2");
    assert_eq!(gw1.node.as_deref(), Some("gw1"));
    assert_eq!(
        gw1.services[0].nat.addresses,
        [
            "198.51.100.201".parse::<Ipv4Addr>().unwrap(),
            "198.51.100.202".parse().unwrap()
        ]
    );
    assert_eq!(
        gw2.services[1].nat.addresses,
        ["198.51.100.212".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(
        gw2.this_node().and_then(|n| n.routing.next_hop),
        Some("203.0.113.12".parse().unwrap())
    );
    // Everything but the NAT addresses is the same on both nodes.
    assert_eq!(gw1.services[0].backends, gw2.services[0].backends);
    assert_eq!(gw1.services[0].nat.ports, gw2.services[0].nat.ports);
    let etcd = gw1
        .fleet
        .as_ref()
        .and_then(|f| f.etcd.as_ref())
        .expect("etcd");
    assert_eq!(etcd.prefix, "/plink/test");
    assert_eq!(etcd.timeout, HumanDuration::from_secs(2));
}

#[test]
fn an_unknown_node_name_lists_the_nodes() {
    let r = Config::parse_node(Path::new(FILE), FLEET, Some("gw9"));
    assert_error(r, at(FLEET, "- name: gw1"), "no node named \"gw9\"");
    let r = Config::parse_node(Path::new(FILE), FLEET, Some("gw9"));
    assert!(
        r.err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("(gw1, gw2)")
    );
}

#[test]
fn a_node_without_a_fleet_is_an_error() {
    let text = FLEET.split("fleet:\n").next().unwrap_or("").replace(
        "nat: {ports: 1024-65535}",
        "nat: {addresses: [198.51.100.201]}",
    );
    let text = text.replace("nat: {}", "nat: {addresses: [198.51.100.211]}");
    assert!(Config::parse_node(Path::new(FILE), &text, None).is_ok());
    let r = Config::parse_node(Path::new(FILE), &text, Some("gw1"));
    assert_error(r, (1, 1), "has no `fleet` section");
}

#[test]
fn a_nat_address_of_another_node_is_refused() {
    let text = edit(
        "{service: orders, addresses: [198.51.100.203]}",
        "{service: orders, addresses: [198.51.100.202]}",
    );
    let pos = at(
        &text,
        "198.51.100.202]}\n        - {service: billing, addresses: [198.51.100.212]",
    );
    assert_error(parse(&text), pos, "is already node \"gw1\"'s");
}

#[test]
fn a_nat_address_shared_by_two_services_of_one_node_is_refused() {
    let text = edit("[198.51.100.211]", "[198.51.100.201]");
    let pos = at(&text, "198.51.100.201]}\n    - name: gw2");
    assert_error(parse(&text), pos, "shared by two services");
}

#[test]
fn a_node_without_nat_addresses_for_a_service_is_refused() {
    let text = edit(
        "        - {service: billing, addresses: [198.51.100.212]}\n",
        "",
    );
    assert_error(
        parse(&text),
        at(&text, "gw2"),
        "node \"gw2\" has no NAT addresses for service \"billing\"",
    );
    let text = edit("[198.51.100.212]", "[]");
    assert_error(
        parse(&text),
        at(&text, "[]"),
        "has no NAT addresses for service",
    );
}

#[test]
fn a_node_naming_an_unknown_service_is_refused() {
    let text = edit(
        "{service: billing, addresses: [198.51.100.212]}",
        "{service: biling, addresses: [198.51.100.212]}",
    );
    assert_error(
        parse(&text),
        at(&text, "biling"),
        "unknown service \"biling\"",
    );
}

#[test]
fn service_nat_addresses_are_refused_in_a_fleet() {
    let text = edit(
        "nat: {ports: 1024-65535}",
        "nat: {addresses: [198.51.100.240]}",
    );
    assert_error(
        parse(&text),
        at(&text, "[198.51.100.240]"),
        "each node has its own NAT addresses",
    );
}

#[test]
fn duplicate_nodes_and_routing_ids_are_refused() {
    let text = edit("- name: gw2", "- name: gw1");
    assert_error(
        parse(&text),
        at(&text, "gw1\n      routing: {router_id: 203.0.113.2"),
        "duplicate node name",
    );
    let text = edit("router_id: 203.0.113.2", "router_id: 203.0.113.1");
    assert_error(
        parse(&text),
        at(&text, "203.0.113.1, next_hop: 203.0.113.12"),
        "already another node's",
    );
}

#[test]
fn a_nat_address_that_is_a_backend_is_refused() {
    let text = edit("[198.51.100.203]", "[198.51.100.20]");
    assert_error(
        parse(&text),
        at(&text, "198.51.100.20]"),
        "is also a backend",
    );
}

#[test]
fn etcd_endpoints_and_prefix_are_checked() {
    let text = edit("['http://198.51.100.2:2379']", "['198.51.100.2:2379']");
    assert_error(
        parse(&text),
        at(&text, "'198.51.100.2:2379'"),
        "write http://HOST:PORT",
    );
    let text = edit("prefix: /plink/test", "prefix: plink/");
    assert_error(parse(&text), at(&text, "plink/}"), "invalid key prefix");
}

#[test]
fn an_empty_node_list_is_refused() {
    let start = FLEET.find("  nodes:").unwrap_or(0);
    let text = format!("{}  nodes: []\n", &FLEET[..start]);
    assert_error(parse(&text), at(&text, "[]\n"), "no nodes");
}
