//! IPv6 in the config (issue 19: NAT66, then NAT64): families of services
//! and endpoints, dual-stack endpoints, addresses no host has. Every error
//! is checked at its line and column.

use std::{
    net::{IpAddr, Ipv6Addr},
    path::Path,
};

use super::*;

const BASE: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
  - name: web4
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10}]
    nat: {addresses: [198.51.100.200]}
    visibility: ['*']
  - name: web6
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 2001:db8:100::10}, {address: '2001:db8:100::11', weight: 2}]
    nat: {addresses: [2001:db8:100::200, 2001:db8:100::201]}
    visibility: ['*']
endpoints:
  - {name: e4, tenant: t, network: vnet-a, address: 192.0.2.50, service: web4}
  - {name: e6, tenant: t, network: vnet-a, address: 2001:db8:c1::50, service: web6}
";

const FILE: &str = "/etc/plink/v6.yaml";

fn edit(from: &str, to: &str) -> String {
    assert_eq!(BASE.matches(from).count(), 1, "{from:?} must occur once");
    BASE.replacen(from, to, 1)
}

/// 1-based line and column of the first `needle` in `text`.
fn at(text: &str, needle: &str) -> (usize, usize) {
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in text"));
    let before = &text[..offset];
    (
        before.matches('\n').count() + 1,
        offset - before.rfind('\n').map_or(0, |i| i + 1) + 1,
    )
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match Config::parse(Path::new(FILE), text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => {
            let rendered = e.to_string();
            for d in e.diagnostics() {
                assert!(
                    rendered.contains(&format!("{FILE}:{}:{}: ", d.line, d.column)),
                    "{rendered}"
                );
            }
            e.diagnostics().to_vec()
        }
    }
}

/// Asserts an error at `path`, at the position of `needle` in `text`,
/// whose message contains `words`.
#[track_caller]
fn assert_error(text: &str, path: &str, needle: &str, words: &str) {
    let d = errors(text);
    let pos = at(text, needle);
    assert!(
        d.iter()
            .any(|d| d.yaml_path == path && (d.line, d.column) == pos && d.message.contains(words)),
        "no error at {path} {}:{} containing {words:?}; got {d:#?}",
        pos.0,
        pos.1
    );
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

#[test]
fn an_ipv6_service_and_endpoint_are_valid() {
    let cfg = Config::parse(Path::new(FILE), BASE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.services[0].family(), Family::Ipv4);
    assert_eq!(cfg.services[1].family(), Family::Ipv6);
    // Unquoted and quoted IPv6 addresses both parse.
    assert_eq!(cfg.services[1].backends[0].address, v6("2001:db8:100::10"));
    assert_eq!(cfg.services[1].backends[1].address, v6("2001:db8:100::11"));
    assert_eq!(
        cfg.services[1].nat.addresses,
        [v6("2001:db8:100::200"), v6("2001:db8:100::201")]
    );
    assert_eq!(cfg.endpoints[1].address, v6("2001:db8:c1::50"));
    assert_eq!(cfg.endpoints[1].address6, None);
    // Without `address6` a config serializes as before (no new key).
    assert!(!serde_yaml::to_string(&cfg).unwrap().contains("address6"));
}

#[test]
fn a_service_mixing_families_is_refused() {
    let text = edit(
        "{address: '2001:db8:100::11', weight: 2}",
        "{address: 198.51.100.11}",
    );
    assert_error(
        &text,
        "services[1].backends[1].address",
        "198.51.100.11",
        "backend address 198.51.100.11 is IPv4 but service \"web6\" is IPv6 (as services[1].backends[0].address makes it)",
    );
    let text = edit("2001:db8:100::201]", "198.51.100.201]");
    assert_error(
        &text,
        "services[1].nat.addresses[1]",
        "198.51.100.201",
        "NAT address 198.51.100.201 is IPv4 but service \"web6\" is IPv6",
    );
}

#[test]
fn an_ipv6_endpoint_of_an_ipv4_service_is_served_through_nat64() {
    let text = edit(
        "address: 192.0.2.50, service: web4",
        "address: 2001:db8:c1::51, service: web4",
    );
    let cfg = Config::parse(Path::new(FILE), &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.endpoints[0].address, v6("2001:db8:c1::51"));
    assert_eq!(
        cfg.endpoints[0].served_addresses(cfg.services[0].family()),
        [v6("2001:db8:c1::51")]
    );
    // The other way round, NAT46, is refused where the address is.
    let text = edit(
        "address: 2001:db8:c1::50, service: web6",
        "address: 192.0.2.51, service: web6",
    );
    assert_error(
        &text,
        "endpoints[1].address",
        "192.0.2.51",
        "endpoint address 192.0.2.51 is IPv4 but service \"web6\" is IPv6: reaching it across families needs NAT46, which plink does not support yet; give the endpoint an IPv6 address, or point it at an IPv4 service",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 1, "only the address is wrong: {d:#?}");
}

#[test]
fn a_dual_stack_endpoint_of_an_ipv4_service_is_served_on_both_and_nat46_is_refused() {
    // The IPv6 half of an endpoint of an IPv4 service is served through NAT64.
    let text = edit(
        "address: 192.0.2.50, service: web4",
        "address: 192.0.2.50, address6: 2001:db8:c1::60, service: web4",
    );
    let cfg = Config::parse(Path::new(FILE), &text).unwrap_or_else(|e| panic!("{e}"));
    let e = &cfg.endpoints[0];
    assert_eq!(
        e.served_addresses(Family::Ipv4),
        [IpAddr::from([192, 0, 2, 50]), v6("2001:db8:c1::60")]
    );
    // An IPv6 service is served on the IPv6 address only.
    assert_eq!(e.served_addresses(Family::Ipv6), [v6("2001:db8:c1::60")]);
    // The IPv4 half of an endpoint of an IPv6 service needs NAT46.
    let text = edit(
        "address: 2001:db8:c1::50, service: web6",
        "address: 192.0.2.60, address6: 2001:db8:c1::50, service: web6",
    );
    assert_error(
        &text,
        "endpoints[1].address",
        "192.0.2.60",
        "needs NAT46, which plink does not support yet; write the IPv6 address as `address`",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 1, "only the IPv4 address is wrong: {d:#?}");
    // A NAT64 address clashes with another endpoint's like any address.
    let text = edit(
        "address: 192.0.2.50, service: web4",
        "address: 192.0.2.50, address6: 2001:db8:c1::50, service: web4",
    );
    assert_error(
        &text,
        "endpoints[1].address",
        "2001:db8:c1::50, service: web6",
        "[2001:db8:c1::50]:80/tcp in network \"vnet-a\" is already taken by endpoints[0]",
    );
    // address6 must be IPv6, and beside an IPv4 address.
    let text = edit(
        "address: 192.0.2.50, service: web4",
        "address: 192.0.2.50, address6: 192.0.2.61, service: web4",
    );
    assert_error(
        &text,
        "endpoints[0].address6",
        "192.0.2.61",
        "address6 192.0.2.61 is IPv4: address6 is a dual-stack endpoint's IPv6 address",
    );
    let text = edit(
        "address: 2001:db8:c1::50, service: web6",
        "address: 2001:db8:c1::50, address6: 2001:db8:c1::62, service: web6",
    );
    assert_error(
        &text,
        "endpoints[1].address6",
        "2001:db8:c1::62",
        "the endpoint has two IPv6 addresses",
    );
}

#[test]
fn ipv6_addresses_no_host_has_are_refused() {
    for (bad, why) in [
        ("'fe80::10'", "a link-local address"),
        ("'ff02::1'", "a multicast address"),
        ("'::1'", "the loopback address"),
        ("'::'", "the unspecified address"),
        ("'::ffff:198.51.100.9'", "an IPv4-mapped address"),
        ("'::198.51.100.9'", "an IPv4-compatible address"),
        (
            "'2001:db8::'",
            "a Subnet-Router anycast address (its last 96 bits are zero)",
        ),
        ("'3fff::'", "last 96 bits are zero"),
    ] {
        let text = edit(
            "{address: 2001:db8:100::10}",
            &format!("{{address: {bad}}}"),
        );
        assert_error(&text, "services[1].backends[0].address", bad, why);
        let text = edit("[2001:db8:100::200,", &format!("[{bad},"));
        assert_error(&text, "services[1].nat.addresses[0]", bad, why);
        let text = edit("address: 2001:db8:c1::50", &format!("address: {bad}"));
        assert_error(&text, "endpoints[1].address", bad, why);
    }
    // Zeros in the last 96 bits are fine as long as one bit there is set.
    let ok = edit("address: 2001:db8:c1::50", "address: '2001:db8:1::'");
    Config::parse(Path::new(FILE), &ok).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn duplicates_are_found_in_ipv6_too() {
    // Two endpoints at one IPv6 address, protocol and port in one network.
    let text = edit(
        "  - {name: e6, tenant: t, network: vnet-a, address: 2001:db8:c1::50, service: web6}\n",
        "  - {name: e6, tenant: t, network: vnet-a, address: 2001:db8:c1::50, service: web6}\n  - {name: e7, tenant: t, network: vnet-a, address: '2001:db8:c1::50', service: web6}\n",
    );
    assert_error(
        &text,
        "endpoints[2].address",
        "'2001:db8:c1::50'",
        "[2001:db8:c1::50]:80/tcp in network \"vnet-a\" is already taken by endpoints[1]",
    );
    // A NAT address that is a backend, and one listed twice.
    let text = edit("[2001:db8:100::200,", "[2001:db8:100::11,");
    assert_error(
        &text,
        "services[1].nat.addresses[0]",
        "2001:db8:100::11,",
        "NAT address 2001:db8:100::11 is also a backend (services[1].backends[1])",
    );
    let text = edit("2001:db8:100::201]", "'2001:db8:100:0::200']");
    assert_error(
        &text,
        "services[1].nat.addresses[1]",
        "'2001:db8:100:0::200'",
        "NAT address 2001:db8:100::200 is listed twice",
    );
}

#[test]
fn proxy_protocol_is_ipv4_only() {
    let text = edit(
        "    nat: {addresses: [2001:db8:100::200, 2001:db8:100::201]}\n",
        "    nat: {addresses: [2001:db8:100::200, 2001:db8:100::201]}\n    proxy_protocol: {version: 2, link_id_tlv: azure}\n",
    );
    assert_error(
        &text,
        "services[1].proxy_protocol",
        "{version: 2, link_id_tlv: azure}",
        "proxy_protocol is not supported on an IPv6 service yet",
    );
}

/// Flow-log records carry IPv4 addresses: an IPv6 service's would be wrong.
#[test]
fn flow_logs_are_ipv4_only() {
    let text = edit(
        "    nat: {addresses: [2001:db8:100::200, 2001:db8:100::201]}\n",
        "    nat: {addresses: [2001:db8:100::200, 2001:db8:100::201]}\n    flow_logs: {sample: 1}\n",
    );
    let d = errors(&text);
    let v6 = d
        .iter()
        .find(|d| {
            d.message
                .contains("flow logs are not supported on an IPv6 service")
        })
        .unwrap_or_else(|| panic!("{d:#?}"));
    assert_eq!(v6.yaml_path, "services[1].flow_logs");
    assert_eq!((v6.line, v6.column), at(&text, "{sample: 1}"));
}

/// NAT64 flows take the IPv6 datapath, which has neither PROXY protocol
/// headers nor flow logs yet: an IPv4 service with an IPv6 endpoint address
/// refuses both, at the service's setting, naming the endpoint.
#[test]
fn proxy_protocol_and_flow_logs_are_refused_through_nat64() {
    let nat64 = "address: 192.0.2.50, address6: 2001:db8:c1::60, service: web4";
    let text = edit(
        "    nat: {addresses: [198.51.100.200]}\n",
        "    nat: {addresses: [198.51.100.200]}\n    proxy_protocol: {version: 2, link_id_tlv: azure}\n",
    )
    .replacen("address: 192.0.2.50, service: web4", nat64, 1);
    assert_error(
        &text,
        "services[0].proxy_protocol",
        "{version: 2, link_id_tlv: azure}",
        "proxy_protocol is not supported through NAT64 yet, and endpoints[0] \"e4\" reaches this IPv4 service on IPv6 address 2001:db8:c1::60 (the IPv6 datapath builds no PROXY header): remove proxy_protocol, or the endpoint's IPv6 address",
    );
    assert_eq!(errors(&text).len(), 1);
    // Without the IPv6 address the same service is fine.
    let plain = text.replacen(nat64, "address: 192.0.2.50, service: web4", 1);
    Config::parse(Path::new(FILE), &plain).unwrap_or_else(|e| panic!("{e}"));

    let text = edit(
        "    nat: {addresses: [198.51.100.200]}\n",
        "    nat: {addresses: [198.51.100.200]}\n    flow_logs: {sample: 1}\n",
    )
    .replacen(
        "address: 192.0.2.50, service: web4",
        "address: 2001:db8:c1::61, service: web4",
        1,
    );
    let d = errors(&text);
    let nat64 = d
        .iter()
        .find(|d| {
            d.message
                .contains("flow logs are not supported through NAT64")
        })
        .unwrap_or_else(|| panic!("{d:#?}"));
    assert_eq!(nat64.yaml_path, "services[0].flow_logs");
    assert_eq!((nat64.line, nat64.column), at(&text, "{sample: 1}"));
    assert!(
        nat64.message.contains(
            "endpoints[0] \"e4\" reaches this IPv4 service on IPv6 address 2001:db8:c1::61"
        ),
        "{}",
        nat64.message
    );
    assert!(nat64.message.contains("remove flow_logs from this service"));
}

/// Both addresses of a dual-stack endpoint take a neighbour-table entry and
/// their own endpoint-table entries.
#[test]
fn a_dual_stack_endpoints_addresses_count_against_the_tables() {
    let endpoints: String = (0..2049)
        .map(|n| {
            format!(
                "  - {{name: d{n}, tenant: t, network: vnet-a, address: 198.18.{}.{}, address6: '2001:db8:c1::1:{n:x}', service: web4}}\n",
                n / 250,
                n % 250 + 1
            )
        })
        .collect();
    let head = BASE.split("endpoints:\n").next().unwrap_or_default();
    let text = format!("{head}endpoints:\n{endpoints}");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].yaml_path, "endpoints[2048]");
    assert_eq!((d[0].line, d[0].column), at(&text, "{name: d2048,"));
    assert!(
        d[0].message.contains("the neighbour table is full here"),
        "{}",
        d[0].message
    );
}

#[test]
fn a_malformed_address_names_both_families() {
    let text = edit("2001:db8:c1::50", "2001:db8:c1:::50");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].yaml_path, "endpoints[1].address");
    assert_eq!((d[0].line, d[0].column), at(&text, "2001:db8:c1:::50"));
    assert!(
        d[0].message
            .contains("or an IPv6 address (e.g. 2001:db8::10)"),
        "{}",
        d[0].message
    );
}

#[test]
fn a_fleet_node_nat_address_has_its_services_family() {
    let fleet = "\
fleet:
  nodes:
    - name: gw1
      nat:
        - {service: web4, addresses: [198.51.100.200]}
        - {service: web6, addresses: [198.51.100.210]}
";
    let text = format!(
        "{}{fleet}",
        BASE.replace("    nat: {addresses: [198.51.100.200]}\n", "")
            .replace("    nat: {addresses: [2001:db8:100::200, 2001:db8:100::201]}\n", "    nat: {}\n")
            .replace("    ports: [{port: 80, target_port: 8080}]\n    backends: [{address: 198.51.100.10}]\n", "    ports: [{port: 80, target_port: 8080}]\n    backends: [{address: 198.51.100.10}]\n    nat: {}\n")
    );
    assert_error(
        &text,
        "fleet.nodes[0].nat[1].addresses[0]",
        "198.51.100.210",
        "NAT address 198.51.100.210 is IPv4 but service \"web6\" is IPv6",
    );
}
