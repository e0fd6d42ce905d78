//! Config validation tests: every error names the right line and column.

use std::path::Path;

use super::*;

const BASE: &str = "\
gateway:
  state_dir: /var/lib/plink
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: c2, role: consumer, network: vnet-b}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10, weight: 1}, {address: 198.51.100.11, weight: 2}]
    nat: {addresses: [198.51.100.200], ports: 1024-65535}
    visibility: [tenant-a, tenant-b]
    auto_approve: [tenant-a]
    health_check: {type: http, path: /healthz, interval: 2s, timeout: 1s, rise: 2, fall: 2}
  - name: billing
    protocol: udp
    ports: [{port: 53}]
    backends: [{address: 198.51.100.20}]
    nat: {addresses: [198.51.100.201]}
    visibility: ['*']
endpoints:
  - {name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}
  - {name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}
";

const FILE: &str = "/etc/plink/test.yaml";

/// Replaces exactly one occurrence of `from`, so a typo in a test fails loudly.
fn edit(from: &str, to: &str) -> String {
    assert_eq!(
        BASE.matches(from).count(),
        1,
        "{from:?} must occur once in BASE"
    );
    BASE.replacen(from, to, 1)
}

/// 1-based line and column of the `nth` occurrence of `needle` in `text`,
/// computed independently of any YAML parser.
fn at(text: &str, needle: &str, nth: usize) -> (usize, usize) {
    let (offset, _) = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} #{nth} not in text"));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match Config::parse(Path::new(FILE), text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => {
            // The rendered error names the file, line and column of each diagnostic.
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

/// Asserts an error at `pos` whose message contains `words`.
#[track_caller]
fn assert_error(diags: &[Diagnostic], pos: (usize, usize), words: &str) {
    assert!(
        diags
            .iter()
            .any(|d| (d.line, d.column) == pos && d.message.contains(words)),
        "no error at {}:{} containing {words:?}; got {diags:#?}",
        pos.0,
        pos.1
    );
}

#[test]
fn base_config_is_valid() {
    let cfg = Config::parse(Path::new(FILE), BASE).expect("BASE is valid");
    assert_eq!(cfg.services.len(), 2);
    assert_eq!(
        cfg.services[1].nat.ports,
        PortRange {
            first: 1024,
            last: 65535
        }
    );
    assert_eq!(cfg.gateway.timeouts.udp, HumanDuration::from_secs(120));
}

#[test]
fn shipped_example_passes_check() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plink.yaml");
    let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<_> = cfg.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["c1", "c2", "p0"]);
}

#[test]
fn yaml_syntax_error() {
    // A key without its colon, followed by more keys.
    let text = edit("    protocol: tcp\n", "    protocol: tcp\n    oops\n");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    // The parser notices at the next key.
    assert_eq!((d[0].line, d[0].column), at(&text, "ports: [", 0), "{d:#?}");
    assert!(
        d[0].message.starts_with("YAML syntax error: "),
        "{}",
        d[0].message
    );
}

#[test]
fn unknown_field() {
    let text = edit("    protocol: tcp", "    protocl: tcp");
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].line, d[0].column), at(&text, "protocl", 0));
    assert!(
        d[0].message.contains("unknown field `protocl`"),
        "{}",
        d[0].message
    );
    assert!(
        d[0].message.contains("fix the spelling"),
        "{}",
        d[0].message
    );
}

#[test]
fn bad_ip_address() {
    let text = edit("198.51.100.11", "198.51.100.311");
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].yaml_path, "services[0].backends[1].address");
    assert_eq!((d[0].line, d[0].column), at(&text, "198.51.100.311", 0));
    assert!(
        d[0].message
            .contains("invalid IP address \"198.51.100.311\"")
    );
}

#[test]
fn bad_ip_in_nat_list() {
    let text = edit("[198.51.100.200]", "[198.51.100.200, 198.51.100.x]");
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    // serde reports the list; the message names the element.
    assert_eq!((d[0].line, d[0].column), at(&text, "198.51.100.x", 0));
    assert!(
        d[0].message.contains("[1]: invalid IP address"),
        "{}",
        d[0].message
    );
}

#[test]
fn bad_port_range() {
    let text = edit("ports: 1024-65535", "ports: 2000-1000");
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].line, d[0].column), at(&text, "2000-1000", 0));
    assert!(d[0].message.contains("invalid port range \"2000-1000\""));
}

#[test]
fn nat_port_range_too_small() {
    let text = edit("ports: 1024-65535", "ports: 2000-2004");
    let d = errors(&text);
    assert_error(&d, at(&text, "2000-2004", 0), "too few");
}

#[test]
fn consumer_network_without_interface() {
    let text = edit("network: vnet-b, address", "network: vnet-c, address");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_error(
        &d,
        at(&text, "vnet-c", 0),
        "consumer network \"vnet-c\" has no interface",
    );
}

#[test]
fn consumer_interface_without_network() {
    let text = edit(
        "{name: c2, role: consumer, network: vnet-b}",
        "{name: c2, role: consumer}",
    );
    let d = errors(&text);
    // Reported at the interface entry; orders-b's network lost its interface too.
    assert_error(&d, at(&text, "{name: c2", 0), "has no network");
    assert_error(&d, at(&text, "vnet-b", 0), "has no interface");
}

#[test]
fn provider_interface_with_network() {
    let text = edit(
        "{name: p0, role: provider}",
        "{name: p0, role: provider, network: vnet-a}",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_error(&d, at(&text, "vnet-a", 1), "cannot have a network");
}

#[test]
fn exactly_one_provider_interface() {
    let none = edit("  - {name: p0, role: provider}\n", "");
    assert_error(
        &errors(&none),
        at(&none, "interfaces:", 0)
            .0
            .checked_add(1)
            .map(|l| (l, 3))
            .unwrap(),
        "no provider interface",
    );
    let two = edit(
        "  - {name: p0, role: provider}\n",
        "  - {name: p0, role: provider}\n  - {name: p1, role: provider}\n",
    );
    let d = errors(&two);
    assert_eq!(d.len(), 1);
    assert_error(&d, at(&two, "provider", 1), "second provider interface");
}

#[test]
fn interface_with_two_roles() {
    let text = edit(
        "  - {name: p0, role: provider}\n",
        "  - {name: p0, role: provider}\n  - {name: c1, role: provider}\n",
    );
    let d = errors(&text);
    assert_error(&d, at(&text, "c1", 1), "has two roles");
}

#[test]
fn duplicate_names() {
    let ifaces = edit("{name: c2, role: consumer", "{name: c1, role: consumer");
    assert_error(
        &errors(&ifaces),
        at(&ifaces, "c1", 1),
        "duplicate interface \"c1\"",
    );

    let services = edit("  - name: billing", "  - name: orders");
    assert_error(
        &errors(&services),
        at(&services, "orders", 1),
        "duplicate service name \"orders\"",
    );

    let endpoints = edit("name: orders-b", "name: orders-a");
    assert_error(
        &errors(&endpoints),
        at(&endpoints, "orders-a", 1),
        "duplicate endpoint name \"orders-a\"",
    );
}

#[test]
fn endpoint_with_unknown_service() {
    let text = edit(
        "address: 192.0.2.50, service: orders}\n  - {name: orders-b",
        "address: 192.0.2.50, service: shipping}\n  - {name: orders-b",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_error(&d, at(&text, "shipping", 0), "unknown service \"shipping\"");
}

#[test]
fn endpoints_sharing_address_protocol_port_in_one_network() {
    let text = edit("tenant-b, network: vnet-b", "tenant-b, network: vnet-a");
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_error(
        &d,
        at(&text, "192.0.2.50", 1),
        "already taken by endpoints[0]",
    );
    // The same address in another network is fine (BASE), and so is another port.
}

#[test]
fn nat_address_shared_by_two_services() {
    let text = edit("[198.51.100.201]", "[198.51.100.200]");
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_error(&d, at(&text, "198.51.100.200", 1), "shared by two services");
}

#[test]
fn nat_address_equal_to_a_backend() {
    let text = edit("[198.51.100.201]", "[198.51.100.10]");
    assert_error(
        &errors(&text),
        at(&text, "198.51.100.10", 1),
        "also a backend",
    );
}

#[test]
fn more_than_eight_nat_addresses() {
    let list: Vec<String> = (200..209).map(|i| format!("198.51.100.{i}")).collect();
    let text = edit("[198.51.100.200]", &format!("[{}]", list.join(", ")))
        .replace("[198.51.100.201]", "[198.51.100.220]");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_error(
        &d,
        at(&text, "198.51.100.208", 0),
        "9 NAT addresses, at most 8",
    );
}

/// Issue 14: what the maps cannot hold is a config error with its position,
/// not a failed map write at apply time.
#[test]
fn capacity_errors_name_the_first_object_that_does_not_fit() {
    // Addresses from the benchmarking range: nothing is ever sent to them.
    let addr = |n: usize| format!("198.18.{}.{}", n / 250, n % 250 + 1);
    let endpoint = |n: usize, service: &str| {
        format!(
            "  - {{name: e{n}, tenant: t, network: vnet-a, address: {}, service: {service}}}\n",
            addr(n)
        )
    };
    let config = |services: &str, endpoints: &str| {
        format!(
            "interfaces:\n  - {{name: c1, role: consumer, network: vnet-a}}\n  - {{name: p0, role: provider}}\nservices:\n{services}endpoints:\n{endpoints}"
        )
    };
    let service = |name: &str, ports: usize, backends: &[String], nat: &str| {
        let ports: Vec<String> = (1..=ports).map(|p| format!("{{port: {p}}}")).collect();
        let backends: Vec<String> = backends
            .iter()
            .map(|b| format!("{{address: {b}}}"))
            .collect();
        format!(
            "  - name: {name}\n    protocol: tcp\n    ports: [{}]\n    backends: [{}]\n    nat: {{addresses: [{nat}]}}\n    visibility: ['*']\n",
            ports.join(", "),
            backends.join(", ")
        )
    };

    // 4096 endpoints: ids 1..4095 fit the per-endpoint maps.
    let svc = service("s", 1, &["198.51.100.10".into()], "198.51.100.200");
    let eps: String = (0..4096).map(|n| endpoint(n, "s")).collect();
    let text = config(&svc, &eps);
    let d = errors(&text);
    assert_error(&d, at(&text, "{name: e4095,", 0), "4096 endpoints");
    assert_error(&d, at(&text, "{name: e4095,", 0), "at most 4095");

    // 7 ports: 8 table entries per endpoint, 16384 entries fill at 2048.
    let svc = service("s", 7, &["198.51.100.10".into()], "198.51.100.200");
    let eps: String = (0..2049).map(|n| endpoint(n, "s")).collect();
    let text = config(&svc, &eps);
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_error(
        &d,
        at(&text, "{name: e2048,", 0),
        "the endpoint table is full here",
    );

    // 256 services: ids 1..255 fit.
    let svcs: String = (0..256)
        .map(|n| service(&format!("s{n}"), 1, &[addr(n)], &addr(1000 + n)))
        .collect();
    let text = config(&svcs, &endpoint(5000, "s0"));
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_error(&d, at(&text, "name: s255\n", 0), "256 services");

    // 4100 backends in 41 services: the 4096th does not fit.
    let svcs: String = (0..41)
        .map(|n| {
            let backends: Vec<String> = (0..100).map(|b| addr(n * 100 + b)).collect();
            service(&format!("s{n}"), 1, &backends, &addr(10_000 + n))
        })
        .collect();
    let text = config(&svcs, &endpoint(12_000, "s0"));
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_error(
        &d,
        at(&text, &format!("{{address: {}}}", addr(4095)), 0),
        "4100 backends",
    );
}

#[test]
fn empty_backend_list() {
    let text = edit(
        "    backends: [{address: 198.51.100.20}]",
        "    backends: []",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 1);
    assert_error(&d, at(&text, "[]", 0), "empty backend list");
}

#[test]
fn weight_zero_only_where_allowed() {
    let active = edit("198.51.100.11, weight: 2", "198.51.100.11, weight: 0");
    let d = errors(&active);
    assert_eq!(d.len(), 1);
    assert_error(&d, at(&active, "0}]", 1), "weight 0 on an active backend");

    let draining = edit(
        "198.51.100.11, weight: 2",
        "198.51.100.11, weight: 0, state: draining",
    );
    assert!(Config::parse(Path::new(FILE), &draining).is_ok());
}

#[test]
fn maglev_table_size_must_be_prime() {
    let text = edit(
        "    visibility: ['*']",
        "    visibility: ['*']\n    maglev_table_size: 65536",
    );
    assert_error(&errors(&text), at(&text, "65536", 0), "not a prime");
}

#[test]
fn mss_clamp_is_auto_or_a_tcp_mss() {
    let with = |v: &str| {
        edit(
            "    auto_approve: [tenant-a]\n",
            &format!("    auto_approve: [tenant-a]\n    mss_clamp: {v}\n"),
        )
    };
    for (v, want) in [("auto", MssClamp::Auto), ("1360", MssClamp::Bytes(1360))] {
        let cfg = Config::parse(Path::new(FILE), &with(v)).unwrap();
        assert_eq!(cfg.services[0].mss_clamp, Some(want), "{v}");
    }
    assert_eq!(
        Config::parse(Path::new(FILE), BASE).unwrap().services[0].mss_clamp,
        None
    );

    for (v, words) in [
        ("100", "mss_clamp 100 is out of range: use 536-65495"),
        ("65535", "mss_clamp 65535 is out of range"),
    ] {
        let text = with(v);
        assert_error(
            &errors(&text),
            value_at(&text, &format!("mss_clamp: {v}")),
            words,
        );
    }
    let text = with("big");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].yaml_path, "services[0].mss_clamp", "{d:#?}");
    assert!(
        d[0].message.contains("write `auto` or an MSS in bytes"),
        "{d:#?}"
    );

    let text = edit(
        "    visibility: ['*']",
        "    visibility: ['*']\n    mss_clamp: auto",
    );
    assert_error(
        &errors(&text),
        value_at(&text, "mss_clamp: auto"),
        "mss_clamp applies to TCP only",
    );
}

/// Position of the value in the one `key: value` line `kv` of `text`.
fn value_at(text: &str, kv: &str) -> (usize, usize) {
    let (line, column) = at(text, kv, 0);
    let key_len = kv.find(": ").map_or(0, |i| i + 2);
    (line, column + key_len)
}

#[test]
fn health_check_sanity() {
    let text = edit(
        "interval: 2s, timeout: 1s, rise: 2, fall: 2",
        "interval: 2s, timeout: 2s, rise: 0, fall: 2",
    );
    let d = errors(&text);
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_error(&d, at(&text, "2s, rise", 0), "not shorter than interval");
    assert_error(&d, at(&text, "0, fall", 0), "rise 0 is out of range");
}

#[test]
fn auto_approved_tenant_must_be_visible() {
    let text = edit("auto_approve: [tenant-a]", "auto_approve: [tenant-c]");
    assert_error(&errors(&text), at(&text, "tenant-c", 0), "not visible");
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let text = edit("[198.51.100.201]", "[198.51.100.200]")
        .replace(
            "service: orders}\n  - {name: orders-b",
            "service: nope}\n  - {name: orders-b",
        )
        .replace(
            "    backends: [{address: 198.51.100.20}]",
            "    backends: []",
        );
    let d = errors(&text);
    assert_eq!(d.len(), 3, "{d:#?}");
    // In document order, each at its own line.
    let lines: Vec<_> = d.iter().map(|d| d.line).collect();
    assert_eq!(lines, [19, 20, 23]);
}

/// Config loading never panics: thousands of mutations of the shipped
/// example (byte flips, truncations, deleted and duplicated lines, swapped
/// characters) each give a config or an error. Seeded, so failures reproduce.
#[test]
fn mutated_configs_never_panic() {
    let example = include_str!("../../../examples/plink.yaml");
    let mut seed: u64 = 0x5eed_c0f1_9a11_0001;
    let mut next = move || {
        // xorshift64*: small, deterministic, good enough to drive mutations.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let alphabet = b" :-[]{},'\"#\n\t*&!|>%@`0123456789abcxyz.";
    let path = std::path::Path::new("fuzz.yaml");
    let mut parsed_ok = 0;
    // `cargo xtask fuzz` raises this for the long run.
    let rounds: u64 = std::env::var("PLINK_FUZZ_CONFIGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for round in 0..rounds {
        let mut bytes = example.as_bytes().to_vec();
        for _ in 0..(1 + next() % 4) {
            if bytes.is_empty() {
                break;
            }
            let at = (next() as usize) % bytes.len();
            match next() % 5 {
                0 => bytes[at] = alphabet[(next() as usize) % alphabet.len()],
                1 => bytes.truncate(at),
                2 => {
                    let end = bytes[at..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(bytes.len(), |p| at + p);
                    bytes.drain(at..end);
                }
                3 => {
                    let line: Vec<u8> = bytes[at..]
                        .iter()
                        .take_while(|&&b| b != b'\n')
                        .copied()
                        .collect();
                    bytes.splice(at..at, line.into_iter().chain([b'\n']));
                }
                _ => {
                    let other = (next() as usize) % bytes.len();
                    bytes.swap(at, other);
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let result = std::panic::catch_unwind(|| Config::parse(path, &text).is_ok());
        match result {
            Ok(true) => parsed_ok += 1,
            Ok(false) => {}
            Err(_) => panic!("round {round}: config parsing panicked on:\n{text}"),
        }
    }
    // Some mutations are harmless (comments, whitespace): the test exercised both paths.
    assert!(parsed_ok > 0, "no mutation parsed: the mutator is broken");
}

/// Issue 14, item 8: input is bounded before it is indexed. Paths grow with
/// depth, so deep nesting used to make position indexing quadratic.
#[test]
fn deep_nesting_and_huge_input_are_refused_before_indexing() {
    let nested =
        |depth: usize| format!("{BASE}extra: {}{}\n", "[".repeat(depth), "]".repeat(depth));
    let text = nested(40);
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    // The 32nd level is the document's mapping plus 31 brackets.
    let (line, _) = at(&text, "extra:", 0);
    assert_eq!(d[0].line, line, "{d:#?}");
    assert!(
        d[0].message.contains("nesting deeper than 32 levels"),
        "{d:#?}"
    );

    let started = std::time::Instant::now();
    let d = errors(&nested(200_000));
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "deep nesting took {:?}",
        started.elapsed()
    );

    let huge = format!("{BASE}# {}\n", "x".repeat(MAX_CONFIG_BYTES));
    let d = errors(&huge);
    assert_eq!((d[0].line, d[0].column), (1, 1));
    assert!(d[0].message.contains("larger than"), "{d:#?}");
}

/// Issue 14, item 7: caps protect the pool. Without a configured cap an
/// endpoint gets a fair share of its service's NAT pool and of the
/// conntrack table; an explicit cap beyond the pool is refused.
#[test]
fn endpoint_caps_follow_the_nat_pool_and_the_table() {
    // Three quarters of the pool, shared by the service's endpoints, and of
    // the table, shared by all; at most 65536 and at least 1.
    assert_eq!(fair_max_flows(16, 2, 262_144, 4), 6);
    assert_eq!(fair_max_flows(64_512, 1, 262_144, 1), 48_384);
    assert_eq!(fair_max_flows(1_000_000, 1, 1_000_000, 1), 65_536);
    assert_eq!(fair_max_flows(16, 4, 16, 4), 3);
    assert_eq!(fair_max_flows(1, 8, 1, 8), 1);

    let small = edit(
        "nat: {addresses: [198.51.100.200], ports: 1024-65535}",
        "nat: {addresses: [198.51.100.200], ports: 20000-20015}",
    );
    let cfg = Config::parse(Path::new(FILE), &small).expect("valid");
    let caps: Vec<u32> = cfg
        .endpoints
        .iter()
        .map(|e| cfg.endpoint_limits(e).max_flows)
        .collect();
    assert_eq!(caps, vec![6, 6], "16 ports shared by two endpoints");
    // A gateway default or an endpoint's own cap wins.
    let explicit = small.replacen(
        "  state_dir: /var/lib/plink\n",
        "  state_dir: /var/lib/plink\n  endpoint_defaults: {max_flows: 10}\n",
        1,
    );
    let cfg = Config::parse(Path::new(FILE), &explicit).expect("valid");
    assert_eq!(cfg.endpoint_limits(&cfg.endpoints[0]).max_flows, 10);
    let own = small.replacen("service: orders}\n", "service: orders, max_flows: 16}\n", 1);
    let cfg = Config::parse(Path::new(FILE), &own).expect("valid");
    assert_eq!(cfg.endpoint_limits(&cfg.endpoints[0]).max_flows, 16);
    assert_eq!(cfg.endpoint_limits(&cfg.endpoints[1]).max_flows, 6);

    // More than the pool holds: refused where it is written.
    let text = small.replacen("service: orders}\n", "service: orders, max_flows: 17}\n", 1);
    assert_error(
        &errors(&text),
        at(&text, "17}", 0),
        "more than service \"orders\"'s NAT pool holds (16 ports per protocol)",
    );
}

#[test]
fn event_log_is_stdout_or_an_absolute_path() {
    let with = |v: &str| {
        edit(
            "  state_dir: /var/lib/plink\n",
            &format!("  state_dir: /var/lib/plink\n  event_log: {v}\n"),
        )
    };
    let cfg = Config::parse(Path::new(FILE), BASE).expect("valid");
    assert_eq!(cfg.gateway.event_log, None, "off by default");
    let cfg = Config::parse(Path::new(FILE), &with("stdout")).expect("valid");
    assert_eq!(cfg.gateway.event_log, Some(EventLogTarget::Stdout));
    let cfg = Config::parse(Path::new(FILE), &with("/var/log/plink/events.jsonl")).expect("valid");
    assert_eq!(
        cfg.gateway.event_log,
        Some(EventLogTarget::File("/var/log/plink/events.jsonl".into()))
    );
    let text = with("events.jsonl");
    assert_error(
        &errors(&text),
        at(&text, "events.jsonl", 0),
        "neither `stdout` nor an absolute file path",
    );
}

#[test]
fn announce_and_next_hop_errors_say_what_is_wrong() {
    let text = edit(
        "  - {name: c1, role: consumer, network: vnet-a}\n  - {name: c2, role: consumer, network: vnet-b}\n  - {name: p0, role: provider}\n",
        "  - {name: c1, role: consumer, network: vnet-a, next_hop: 192.0.2.50}\n  - {name: c2, role: consumer, network: vnet-b, next_hop: 192.0.2.10}\n  - {name: p0, role: provider, next_hop: 198.51.100.9}\nannounce: {metric: 0}\n",
    );
    let d = errors(&text);
    let find = |path: &str| {
        d.iter()
            .find(|d| d.yaml_path == path)
            .unwrap_or_else(|| panic!("no error at {path}: {d:?}"))
    };
    assert!(
        find("interfaces[0].next_hop")
            .message
            .contains("endpoint \"orders-a\"")
    );
    assert!(
        find("interfaces[2].next_hop")
            .message
            .contains("not a consumer interface")
    );
    assert!(find("announce.metric").message.contains("metric 0"));
    assert!(
        d.iter().all(|d| d.yaml_path != "interfaces[1].next_hop"),
        "a next hop of its own is fine: {d:?}"
    );
    // A valid announcement parses.
    let ok = edit(
        "  - {name: c2, role: consumer, network: vnet-b}\n",
        "  - {name: c2, role: consumer, network: vnet-b, next_hop: 192.0.2.10}\n",
    ) + "announce: {metric: 4242}\n";
    let cfg = Config::parse(Path::new(FILE), &ok).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.announce.map(|a| a.metric), Some(4242));
}

#[test]
fn flow_logs_are_per_service_with_a_gateway_exporter() {
    let gw = "  state_dir: /var/lib/plink\n";
    let with = |export: &str, sample: &str| {
        let t = edit(gw, &format!("{gw}{export}"));
        t.replacen(
            "    protocol: tcp\n",
            &format!("    protocol: tcp\n{sample}"),
            1,
        )
    };
    let cfg = Config::parse(Path::new(FILE), BASE).expect("valid");
    assert_eq!(cfg.gateway.flow_logs, None, "off by default");
    assert_eq!(cfg.services[0].flow_logs, None);

    let text = with(
        "  flow_logs: {ipfix: '198.51.100.50:4739', json: /var/log/plink/flows.jsonl}\n",
        "    flow_logs: {sample: 10}\n",
    );
    let cfg = Config::parse(Path::new(FILE), &text).expect("valid");
    let f = cfg.gateway.flow_logs.as_ref().expect("set");
    assert_eq!(f.ipfix, Some("198.51.100.50:4739".parse().unwrap()));
    assert_eq!(f.ring_bytes, plink_common::DEFAULT_FLOW_LOG_RING_BYTES);
    assert_eq!(cfg.services[0].flow_logs.map(|f| f.sample), Some(10));

    let text = with(
        "  flow_logs: {ipfix: '198.51.100.50:4739'}\n",
        "    flow_logs: {sample: 0}\n",
    );
    assert_error(
        &errors(&text),
        at(&text, "0}", 0),
        "sample 0 is out of range",
    );

    let text = with("", "    flow_logs: {sample: 1}\n");
    assert_error(
        &errors(&text),
        at(&text, "{sample: 1}", 0),
        "set gateway.flow_logs",
    );

    let text = with("  flow_logs: {ring_bytes: 4096}\n", "");
    assert_error(
        &errors(&text),
        at(&text, "{ring_bytes", 0),
        "exports nowhere",
    );

    let text = with("  flow_logs: {json: flows.jsonl, ring_bytes: 5000}\n", "");
    let diags = errors(&text);
    assert_error(
        &diags,
        at(&text, "flows.jsonl", 0),
        "not an absolute file path",
    );
    assert_error(&diags, at(&text, "5000", 0), "no ring size");
}

/// Issue 18: `proxy_protocol` and `endpoints[].link_id`, each mistake at
/// its value's line and column.
#[test]
fn proxy_protocol_and_link_ids_are_validated_where_they_are_written() {
    let with = |block: &str| {
        edit(
            "    auto_approve: [tenant-a]\n",
            &format!("    auto_approve: [tenant-a]\n    proxy_protocol:\n{block}"),
        )
    };
    for (tlv, want) in [
        ("azure", LinkIdTlvKind::Azure),
        ("aws", LinkIdTlvKind::Aws),
        ("gcp", LinkIdTlvKind::Gcp),
        ("0xE5", LinkIdTlvKind::Custom(0xE5)),
        ("\"0xef\"", LinkIdTlvKind::Custom(0xEF)),
        ("224", LinkIdTlvKind::Custom(0xE0)),
    ] {
        let text = with(&format!("      version: 2\n      link_id_tlv: {tlv}\n"));
        let cfg = Config::parse(Path::new(FILE), &text).unwrap_or_else(|e| panic!("{tlv}: {e}"));
        let pp = cfg.services[0].proxy_protocol.expect("set");
        assert_eq!((pp.version, pp.link_id_tlv), (2, want), "{tlv}");
        assert!(pp.link_id_tlv.kernel().is_some(), "{tlv}");
        assert_eq!(cfg.services[1].proxy_protocol, None, "off by default");
    }

    let text = with("      version: 1\n      link_id_tlv: azure\n");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].yaml_path, "services[0].proxy_protocol.version");
    assert_error(
        &d,
        value_at(&text, "version: 1"),
        "PROXY protocol version 1 is not supported: write `version: 2`",
    );

    let text = with("      version: 2\n      link_id_tlv: 0xD0\n");
    assert_error(
        &errors(&text),
        value_at(&text, "link_id_tlv: 0xD0"),
        "TLV type 0xD0 is not a custom type: use one from 0xE0 to 0xEF",
    );

    let text = with("      version: 2\n      link_id_tlv: azur\n");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_error(
        &d,
        value_at(&text, "link_id_tlv: azur"),
        "invalid link_id_tlv \"azur\": write azure, aws, gcp, or a custom TLV type from 0xE0 to 0xEF",
    );

    let text = with("      link_id_tlv: azure\n");
    assert!(
        errors(&text)[0]
            .message
            .contains("missing field `version`; add it"),
        "{:#?}",
        errors(&text)
    );

    // UDP service.
    let text = edit(
        "    visibility: ['*']",
        "    visibility: ['*']\n    proxy_protocol: {version: 2, link_id_tlv: gcp}",
    );
    let d = errors(&text);
    assert_eq!(d[0].yaml_path, "services[1].proxy_protocol", "{d:#?}");
    assert_error(
        &d,
        value_at(&text, "proxy_protocol: {"),
        "proxy_protocol applies to TCP only",
    );
}

#[test]
fn an_endpoint_link_id_is_in_range_and_unique() {
    let with = |a: &str, b: &str| {
        edit(
            "service: orders}\n  - {name: orders-b",
            &format!("service: orders{a}}}\n  - {{name: orders-b"),
        )
        .replacen(
            "192.0.2.50, service: orders}\n",
            &format!("192.0.2.50, service: orders{b}}}\n"),
            2,
        )
    };
    let cfg = Config::parse(
        Path::new(FILE),
        &with(", link_id: 7", ", link_id: 4294967295"),
    )
    .unwrap();
    assert_eq!(
        [cfg.endpoints[0].link_id, cfg.endpoints[1].link_id],
        [Some(7), Some(4_294_967_295)]
    );
    assert_eq!(
        Config::parse(Path::new(FILE), BASE).unwrap().endpoints[0].link_id,
        None
    );

    let text = with(", link_id: 7", ", link_id: 7");
    let d = errors(&text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].yaml_path, "endpoints[1].link_id");
    let (line, column) = at(&text, "link_id: 7", 1);
    assert_error(
        &d,
        (line, column + "link_id: ".len()),
        "link_id 7 is already endpoints[0]'s",
    );

    for bad in ["0", "4294967296"] {
        let text = with(&format!(", link_id: {bad}"), "");
        assert_error(
            &errors(&text),
            value_at(&text, &format!("link_id: {bad}")),
            &format!("link_id {bad} is out of range: use 1 to 4294967295"),
        );
    }
}

#[test]
fn an_aws_link_id_carries_the_endpoint_name_which_must_fit() {
    let long = "e".repeat(plink_common::proxy::AWS_NAME_MAX + 1);
    let text = edit(
        "    auto_approve: [tenant-a]\n",
        "    auto_approve: [tenant-a]\n    proxy_protocol: {version: 2, link_id_tlv: aws}\n",
    )
    .replacen("name: orders-a", &format!("name: {long}"), 1);
    let d = errors(&text);
    assert_error(
        &d,
        value_at(&text, &format!("name: {long}")),
        &format!(
            "longer than the {} an `aws` link id TLV carries",
            plink_common::proxy::AWS_NAME_MAX
        ),
    );
}
