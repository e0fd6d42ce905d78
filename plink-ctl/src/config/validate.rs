//! Semantic validation: what serde cannot see (cross references, duplicates,
//! limits). Every check reports the document path of the offending node and a
//! message that says what is wrong and how to fix it; all problems are
//! collected, not just the first.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use super::{BackendState, Config, Family, HealthCheckKind, Role};

/// The datapath's NAT pool holds at most this many addresses per service.
pub const MAX_NAT_ADDRESSES: usize = 8;
/// Largest backend weight; Maglev fills its table in proportion to weights.
pub const MAX_WEIGHT: u32 = 10_000;
/// The smallest MSS every IPv4 host must accept (RFC 9293 §3.7.1): a clamp
/// below it would only slow TCP down.
pub const MIN_MSS_CLAMP: u64 = 536;
/// The largest IPv4 MSS: a 65535-byte packet minus IPv4 and TCP headers.
pub const MAX_MSS_CLAMP: u64 = 65_495;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

fn check_name(p: &mut Problems, path: String, what: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        p.push(
            path,
            format!(
                "invalid {what} name {name:?}: use 1-63 characters from letters, digits, '-', '_' and '.'"
            ),
        );
    }
}

fn check_unicast(p: &mut Problems, path: String, what: &str, a: Ipv4Addr) {
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
        p.push(
            path,
            format!(
                "{what} {a} is not a unicast address: use a host address such as 198.51.100.10"
            ),
        );
    }
}

/// A host address of either family: an endpoint, backend or NAT address.
fn check_host(p: &mut Problems, path: String, what: &str, a: IpAddr) {
    match a {
        IpAddr::V4(a) => check_unicast(p, path, what, a),
        IpAddr::V6(a) => {
            if let Some(why) = super::v6_not_a_host(&a) {
                p.push(
                    path,
                    format!(
                        "{what} {a} is {why}: use a global or unique-local unicast address such as 2001:db8::10"
                    ),
                );
            }
        }
    }
}

/// Records the first path of each key; a second occurrence is reported
/// through `on_dup` with the first path.
fn first_seen<K: std::hash::Hash + Eq>(
    seen: &mut HashMap<K, String>,
    key: K,
    path: &str,
) -> Option<String> {
    match seen.get(&key) {
        Some(first) => Some(first.clone()),
        None => {
            seen.insert(key, path.to_owned());
            None
        }
    }
}

/// "a, b" or "none defined", for messages that list the valid choices.
fn listing(names: &[&str]) -> String {
    if names.is_empty() {
        "none defined".into()
    } else {
        names.join(", ")
    }
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= u64::from(n) {
        if u64::from(n) % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

pub fn validate(cfg: &Config) -> Vec<Problem> {
    let mut p = Problems::default();
    gateway(cfg, &mut p);
    let consumer_networks = interfaces(cfg, &mut p);
    services(cfg, &mut p);
    endpoints(cfg, &consumer_networks, &mut p);
    announce(cfg, &mut p);
    fleet(cfg, &mut p);
    capacity(cfg, &mut p);
    p.0
}

/// What the dataplane's maps hold (their sizes are fixed by the build, see
/// [`crate::plan::Capacities::BUILD`]): a config that needs more is refused
/// here, at the first object that does not fit, rather than by a map write.
fn capacity(cfg: &Config, p: &mut Problems) {
    let caps = crate::plan::Capacities::BUILD;
    // Ids start at 1 (0 means none), so a map of N slots takes N - 1 objects.
    if cfg.interfaces.len() as u64 > u64::from(caps.interfaces) {
        p.push(
            format!("interfaces[{}]", caps.interfaces),
            format!(
                "{} interfaces, the dataplane holds at most {}: remove {}",
                cfg.interfaces.len(),
                caps.interfaces,
                cfg.interfaces.len() as u64 - u64::from(caps.interfaces)
            ),
        );
    }
    let max_services = caps.services - 1;
    if cfg.services.len() as u64 > u64::from(max_services) {
        p.push(
            format!("services[{max_services}]"),
            format!(
                "{} services, the dataplane holds at most {max_services}: remove {}",
                cfg.services.len(),
                cfg.services.len() as u64 - u64::from(max_services)
            ),
        );
    }
    let max_backends = caps.backends - 1;
    let total_backends: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    if total_backends as u64 > u64::from(max_backends) {
        let first_over = cfg
            .services
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (0..s.backends.len()).map(move |j| (i, j)))
            .nth(max_backends as usize);
        if let Some((i, j)) = first_over {
            p.push(
                format!("services[{i}].backends[{j}]"),
                format!(
                    "{total_backends} backends in all services, the dataplane holds at most {max_backends}: remove {}",
                    total_backends as u64 - u64::from(max_backends)
                ),
            );
        }
    }
    let max_endpoints = caps.endpoints - 1;
    if cfg.endpoints.len() as u64 > u64::from(max_endpoints) {
        p.push(
            format!("endpoints[{max_endpoints}]"),
            format!(
                "{} endpoints, the dataplane holds at most {max_endpoints}: remove {}",
                cfg.endpoints.len(),
                cfg.endpoints.len() as u64 - u64::from(max_endpoints)
            ),
        );
    }
    // The endpoint table: one entry per endpoint address and port (a
    // dual-stack NAT64 endpoint has its ports at both), one per address (echo).
    let ports: HashMap<&str, usize> = cfg
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.ports.len()))
        .collect();
    let mut addresses = HashSet::new();
    let mut entries: u64 = 0;
    for (i, e) in cfg.endpoints.iter().enumerate() {
        let n = ports.get(e.service.as_str()).copied().unwrap_or(0) as u64;
        for a in e.addresses() {
            entries += n;
            if n > 0 && addresses.insert((e.network.as_str(), a)) {
                entries += 1;
            }
        }
        if entries > u64::from(caps.endpoint_keys) {
            p.push(
                format!("endpoints[{i}]"),
                format!(
                    "the endpoint table is full here: endpoints need one entry per address and service port, plus one per address for echo, and it holds {}; remove endpoints or service ports",
                    caps.endpoint_keys
                ),
            );
            break;
        }
    }
    // The ARP/neighbour table: one entry per endpoint address (both of a
    // dual-stack NAT64 endpoint), plus the consumer links' next hops.
    let mut neighbours: HashSet<(&str, IpAddr)> = cfg
        .interfaces
        .iter()
        .filter_map(|i| Some((i.network.as_deref()?, IpAddr::V4(i.next_hop?))))
        .collect();
    for (i, e) in cfg.endpoints.iter().enumerate() {
        neighbours.extend(e.addresses().map(|a| (e.network.as_str(), a)));
        if neighbours.len() as u64 > u64::from(caps.endpoint_addresses) {
            p.push(
                format!("endpoints[{i}]"),
                format!(
                    "the neighbour table is full here: it holds {} endpoint addresses (a dual-stack endpoint's two count) and next hops; remove endpoints or their address6",
                    caps.endpoint_addresses
                ),
            );
            break;
        }
    }
}

fn gateway(cfg: &Config, p: &mut Problems) {
    let g = &cfg.gateway;
    if g.conntrack.max_flows == 0 {
        p.push(
            "gateway.conntrack.max_flows",
            "must be at least 1: it sizes the flow table (default 262144)",
        );
    }
    for (field, d) in [
        ("tcp_established", g.timeouts.tcp_established),
        ("tcp_transitory", g.timeouts.tcp_transitory),
        ("udp", g.timeouts.udp),
        ("icmp", g.timeouts.icmp),
    ] {
        if d.0.as_secs() == 0 {
            p.push(
                format!("gateway.timeouts.{field}"),
                format!("timeout {d} is too short: flows expire in whole seconds, use at least 1s"),
            );
        }
    }
    if g.endpoint_defaults.max_flows == Some(0) {
        p.push(
            "gateway.endpoint_defaults.max_flows",
            "must be at least 1 (0 would refuse every flow); leave it out for each endpoint's fair share of its service's NAT pool",
        );
    }
    if g.endpoint_defaults.new_flows_per_second == 0 {
        p.push(
            "gateway.endpoint_defaults.new_flows_per_second",
            "must be at least 1 (0 would refuse every flow); default 10000",
        );
    }
    if g.admin_socket.as_os_str().is_empty() || !g.admin_socket.is_absolute() {
        p.push(
            "gateway.admin_socket",
            "must be an absolute path, e.g. /run/plink/plink.sock",
        );
    }
    if g.state_dir.as_os_str().is_empty() || !g.state_dir.is_absolute() {
        p.push(
            "gateway.state_dir",
            "must be an absolute path, e.g. /var/lib/plink",
        );
    }
    if let Some(crate::config::EventLogTarget::File(path)) = &g.event_log
        && (!path.is_absolute() || path.file_name().is_none())
    {
        p.push(
            "gateway.event_log",
            format!(
                "{:?} is neither `stdout` nor an absolute file path, e.g. /var/log/plink/events.jsonl",
                path.display().to_string()
            ),
        );
    }
    if let Some(f) = &g.flow_logs {
        if f.ipfix.is_none() && f.json.is_none() {
            p.push(
                "gateway.flow_logs",
                "exports nowhere: set ipfix (collector address:port) and/or json (a file path)",
            );
        }
        if let Some(path) = &f.json
            && (!path.is_absolute() || path.file_name().is_none())
        {
            p.push(
                "gateway.flow_logs.json",
                format!(
                    "{:?} is not an absolute file path, e.g. /var/log/plink/flows.jsonl",
                    path.display().to_string()
                ),
            );
        }
        if let Some(a) = f.ipfix
            && (a.port() == 0 || a.ip().is_unspecified())
        {
            p.push(
                "gateway.flow_logs.ipfix",
                format!("{a} is no collector address: give address:port, e.g. 198.51.100.50:4739"),
            );
        }
        if !f.ring_bytes.is_power_of_two() || !(4096..=1 << 30).contains(&f.ring_bytes) {
            p.push(
                "gateway.flow_logs.ring_bytes",
                format!(
                    "{} is no ring size: use a power of two from 4096 to 1073741824 bytes",
                    f.ring_bytes
                ),
            );
        }
    }
}

/// Checks `announce` and the interfaces' next hops.
fn announce(cfg: &Config, p: &mut Problems) {
    if let Some(a) = &cfg.announce
        && a.metric == 0
    {
        p.push(
            "announce.metric",
            "metric 0 is what other routes have: pick a metric no other route on the node uses (e.g. 4242), and match it in FRR's route-map",
        );
    }
    let mut seen: HashMap<(&str, Ipv4Addr), usize> = HashMap::new();
    for (i, iface) in cfg.interfaces.iter().enumerate() {
        let Some(nh) = iface.next_hop else { continue };
        let path = format!("interfaces[{i}].next_hop");
        let Some(net) = iface
            .network
            .as_deref()
            .filter(|_| iface.role == Role::Consumer)
        else {
            p.push(
                path,
                format!(
                    "interface {:?} is not a consumer interface: a next hop is announced on a consumer link only; remove `next_hop`",
                    iface.name
                ),
            );
            continue;
        };
        if nh.is_unspecified() || nh.is_broadcast() || nh.is_multicast() || nh.is_loopback() {
            p.push(
                path.clone(),
                format!("next hop {nh} is not a unicast address: give an unused address of the consumer link"),
            );
        }
        if let Some(first) = seen.insert((net, nh), i) {
            p.push(
                path.clone(),
                format!(
                    "next hop {nh} in network {net:?} is already interfaces[{first}]'s: each link needs its own"
                ),
            );
        }
        if let Some(e) = cfg
            .endpoints
            .iter()
            .find(|e| e.network == net && e.addresses().any(|a| a == IpAddr::V4(nh)))
        {
            p.push(
                path,
                format!(
                    "next hop {nh} is endpoint {:?}'s address in network {net:?}: the next hop must be an address of its own",
                    e.name
                ),
            );
        }
    }
}

/// Checks interfaces; returns the consumer network names that have an interface.
fn interfaces(cfg: &Config, p: &mut Problems) -> BTreeMap<String, String> {
    let mut networks = BTreeMap::new();
    let mut seen: HashMap<&str, (usize, Role)> = HashMap::new();
    let mut providers = Vec::new();
    if cfg.interfaces.is_empty() {
        p.push(
            "interfaces",
            "no interfaces: list one provider interface and at least one consumer interface",
        );
    }
    for (i, iface) in cfg.interfaces.iter().enumerate() {
        let path = format!("interfaces[{i}]");
        if iface.name.is_empty()
            || iface.name.len() > MAX_IFNAME
            || iface.name.contains(['/', ' ', '\t', ':'])
        {
            p.push(
                format!("{path}.name"),
                format!(
                    "invalid interface name {:?}: Linux names are 1-15 characters without '/', ':' or spaces",
                    iface.name
                ),
            );
        }
        match seen.get(iface.name.as_str()) {
            Some(&(first, role)) if role != iface.role => p.push(
                format!("{path}.name"),
                format!(
                    "interface {:?} has two roles: interfaces[{first}] makes it a {role} interface, this entry a {} interface; an interface has exactly one role, remove one entry",
                    iface.name, iface.role
                ),
            ),
            Some(&(first, _)) => p.push(
                format!("{path}.name"),
                format!(
                    "duplicate interface {:?}: already listed at interfaces[{first}]; list each interface once",
                    iface.name
                ),
            ),
            None => {
                seen.insert(&iface.name, (i, iface.role));
            }
        }
        match (iface.role, &iface.network) {
            (Role::Consumer, None) => p.push(
                path.clone(),
                format!(
                    "consumer interface {:?} has no network: add `network: NAME` naming its consumer network",
                    iface.name
                ),
            ),
            (Role::Consumer, Some(net)) => {
                check_name(p, format!("{path}.network"), "network", net);
                networks.entry(net.clone()).or_insert_with(|| iface.name.clone());
            }
            (Role::Provider, network) => {
                providers.push(i);
                if network.is_some() {
                    p.push(
                        format!("{path}.network"),
                        format!(
                            "provider interface {:?} cannot have a network: networks belong to consumer interfaces; remove `network`",
                            iface.name
                        ),
                    );
                }
            }
        }
    }
    match providers.as_slice() {
        [] if !cfg.interfaces.is_empty() => p.push(
            "interfaces",
            "no provider interface: add exactly one `{name: IFACE, role: provider}`",
        ),
        [_, rest @ ..] => {
            for i in rest {
                p.push(
                    format!("interfaces[{i}].role"),
                    format!(
                        "a second provider interface: plink uses exactly one (interfaces[{}]); make this one a consumer or remove it",
                        providers[0]
                    ),
                );
            }
        }
        _ => {}
    }
    networks
}

fn services(cfg: &Config, p: &mut Problems) {
    let mut names: HashMap<&str, String> = HashMap::new();
    let mut nat_owner: HashMap<IpAddr, String> = HashMap::new();
    let backend_addrs: HashMap<IpAddr, String> = cfg
        .services
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.backends
                .iter()
                .enumerate()
                .map(move |(j, b)| (b.address, format!("services[{i}].backends[{j}]")))
        })
        .collect();
    for (i, s) in cfg.services.iter().enumerate() {
        let path = format!("services[{i}]");
        check_name(p, format!("{path}.name"), "service", &s.name);
        if let Some(first) = first_seen(&mut names, s.name.as_str(), &format!("{path}.name")) {
            p.push(
                format!("{path}.name"),
                format!(
                    "duplicate service name {:?}: already used at {first}; service names are unique",
                    s.name
                ),
            );
        }

        if s.ports.is_empty() {
            p.push(
                format!("{path}.ports"),
                "no ports: list at least one `{port: N, target_port: M}`",
            );
        }
        let mut ports: HashMap<u16, String> = HashMap::new();
        for (j, sp) in s.ports.iter().enumerate() {
            let pp = format!("{path}.ports[{j}]");
            if sp.port == 0 {
                p.push(format!("{pp}.port"), "port 0 is not a port: use 1-65535");
            }
            if sp.target_port == Some(0) {
                p.push(
                    format!("{pp}.target_port"),
                    "target_port 0 is not a port: use 1-65535, or leave it out to use `port`",
                );
            }
            if let Some(first) = first_seen(&mut ports, sp.port, &pp) {
                p.push(
                    format!("{pp}.port"),
                    format!(
                        "port {} is listed twice (also at {first}): list it once",
                        sp.port
                    ),
                );
            }
        }

        if s.backends.is_empty() {
            p.push(
                format!("{path}.backends"),
                "empty backend list: add at least one `{address: A.B.C.D}` (mark it `state: down` to keep it idle)",
            );
        }
        // The service's family is its first address's; every other one
        // must agree (a mixed service would need NAT46/64 per backend).
        let family = s.family();
        let family_from = if s.backends.is_empty() {
            format!("{path}.nat.addresses[0]")
        } else {
            format!("{path}.backends[0].address")
        };
        let check_family = |p: &mut Problems, at: String, what: &str, a: IpAddr| {
            if Family::of(&a) != family {
                p.push(
                    at,
                    format!(
                        "{what} {a} is {} but service {:?} is {family} (as {family_from} makes it): a service's backends and NAT addresses are all of one family; use {family} addresses here, or make a second service for {}",
                        Family::of(&a),
                        s.name,
                        Family::of(&a)
                    ),
                );
            }
        };
        let mut seen_backends: HashMap<IpAddr, String> = HashMap::new();
        for (j, b) in s.backends.iter().enumerate() {
            let bp = format!("{path}.backends[{j}]");
            check_host(p, format!("{bp}.address"), "backend address", b.address);
            check_family(p, format!("{bp}.address"), "backend address", b.address);
            if let Some(first) = first_seen(&mut seen_backends, b.address, &bp) {
                p.push(
                    format!("{bp}.address"),
                    format!(
                        "backend {} is listed twice (also at {first}): list it once",
                        b.address
                    ),
                );
            }
            if b.weight == 0 && b.state == BackendState::Active {
                p.push(
                    format!("{bp}.weight"),
                    "weight 0 on an active backend: use a weight of 1 or more, or set `state: draining` (or `down`) to stop sending it new flows",
                );
            }
            if b.weight > MAX_WEIGHT {
                p.push(
                    format!("{bp}.weight"),
                    format!("weight {} is too large: use 1-{MAX_WEIGHT}", b.weight),
                );
            }
        }

        let nat = &s.nat;
        if cfg.fleet.is_some() {
            if !nat.addresses.is_empty() {
                p.push(
                    format!("{path}.nat.addresses"),
                    "in a fleet each node has its own NAT addresses (so that provider replies return to the node holding the flow): move these to `fleet.nodes[].nat` as `{service: NAME, addresses: [...]}` and leave `nat.addresses` out",
                );
            }
        } else if nat.addresses.is_empty() {
            p.push(
                format!("{path}.nat.addresses"),
                "no NAT addresses: list 1 to 8 provider-side addresses that consumers' flows are source-NATed to",
            );
        }
        if nat.addresses.len() > MAX_NAT_ADDRESSES {
            p.push(
                format!("{path}.nat.addresses[{MAX_NAT_ADDRESSES}]"),
                format!(
                    "{} NAT addresses, at most {MAX_NAT_ADDRESSES} per service: remove {}",
                    nat.addresses.len(),
                    nat.addresses.len() - MAX_NAT_ADDRESSES
                ),
            );
        }
        for (j, a) in nat.addresses.iter().enumerate() {
            let ap = format!("{path}.nat.addresses[{j}]");
            check_host(p, ap.clone(), "NAT address", *a);
            check_family(p, ap.clone(), "NAT address", *a);
            if let Some(first) = first_seen(&mut nat_owner, *a, &ap) {
                let same_service = first.starts_with(&format!("{path}."));
                p.push(
                    ap.clone(),
                    if same_service {
                        format!("NAT address {a} is listed twice (also at {first}): list it once")
                    } else {
                        format!(
                            "NAT address {a} is shared by two services (also at {first}): a NAT address belongs to one service, pick another address"
                        )
                    },
                );
            }
            if let Some(b) = backend_addrs.get(a) {
                p.push(
                    ap,
                    format!(
                        "NAT address {a} is also a backend ({b}): replies would loop; use an address no backend has"
                    ),
                );
            }
        }
        // Small pools are legitimate (tests, tightly capped services); a
        // handful of ports is almost certainly a typo.
        if nat.ports.len() < 8 {
            p.push(
                format!("{path}.nat.ports"),
                format!(
                    "NAT port range {} has {} ports, too few to be useful: use at least 8, e.g. 1024-65535",
                    nat.ports,
                    nat.ports.len()
                ),
            );
        }

        let mut vis: HashMap<&str, String> = HashMap::new();
        for (j, t) in s.visibility.iter().enumerate() {
            let tp = format!("{path}.visibility[{j}]");
            if t != "*" {
                check_name(p, tp.clone(), "tenant", t);
            }
            if let Some(first) = first_seen(&mut vis, t.as_str(), &tp) {
                p.push(
                    tp,
                    format!("tenant {t:?} is listed twice (also at {first})"),
                );
            }
        }
        let all_visible = s.visibility.iter().any(|t| t == "*");
        for (j, t) in s.auto_approve.iter().enumerate() {
            let tp = format!("{path}.auto_approve[{j}]");
            if t != "*" && !all_visible && !s.visibility.contains(t) {
                p.push(
                    tp,
                    format!(
                        "tenant {t:?} is auto-approved but not visible: add it to `visibility` (or remove it here)"
                    ),
                );
            }
        }

        if let Some(hc) = &s.health_check {
            let hp = format!("{path}.health_check");
            if hc.interval.0.is_zero() {
                p.push(
                    format!("{hp}.interval"),
                    "interval must be more than 0, e.g. 2s",
                );
            }
            if hc.timeout.0.is_zero() {
                p.push(
                    format!("{hp}.timeout"),
                    "timeout must be more than 0, e.g. 1s",
                );
            } else if hc.timeout >= hc.interval {
                p.push(
                    format!("{hp}.timeout"),
                    format!(
                        "timeout {} is not shorter than interval {}: a probe must finish before the next starts; lower the timeout",
                        hc.timeout, hc.interval
                    ),
                );
            }
            for (field, v) in [("rise", hc.rise), ("fall", hc.fall)] {
                if !(1..=100).contains(&v) {
                    p.push(
                        format!("{hp}.{field}"),
                        format!("{field} {v} is out of range: use 1-100 consecutive probes"),
                    );
                }
            }
            if hc.port == Some(0) {
                p.push(
                    format!("{hp}.port"),
                    "port 0 is not a port: use 1-65535 or leave it out",
                );
            }
            match (hc.kind, &hc.path) {
                (HealthCheckKind::Tcp, Some(_)) => p.push(
                    format!("{hp}.path"),
                    "`path` is for `type: http` only: remove it or change the type",
                ),
                (HealthCheckKind::Http, Some(hp_path)) if !hp_path.starts_with('/') => p.push(
                    format!("{hp}.path"),
                    format!("HTTP path {hp_path:?} must start with '/', e.g. /healthz"),
                ),
                _ => {}
            }
        }

        if let Some(clamp) = s.mss_clamp {
            let mp = format!("{path}.mss_clamp");
            if s.protocol != super::Protocol::Tcp {
                p.push(
                    mp.clone(),
                    format!(
                        "mss_clamp applies to TCP only and this service is {}: remove it",
                        s.protocol
                    ),
                );
            }
            if let super::MssClamp::Bytes(n) = clamp
                && !(MIN_MSS_CLAMP..=MAX_MSS_CLAMP).contains(&n)
            {
                p.push(
                    mp,
                    format!(
                        "mss_clamp {n} is out of range: use {MIN_MSS_CLAMP}-{MAX_MSS_CLAMP} bytes \
                         (e.g. 1360 behind an IPsec tunnel), or `auto`"
                    ),
                );
            }
        }

        // An endpoint reaching this IPv4 service on an IPv6 address: its
        // flows go through NAT64, in the IPv6 datapath.
        let nat64 = cfg
            .endpoints
            .iter()
            .enumerate()
            .filter(|_| family == Family::Ipv4)
            .find_map(|(j, e)| {
                let a = e.addresses().find(IpAddr::is_ipv6)?;
                (e.service == s.name).then(|| {
                    format!(
                        "endpoints[{j}] {:?} reaches this IPv4 service on IPv6 address {a}",
                        e.name
                    )
                })
            });
        if let Some(pp) = s.proxy_protocol {
            let pp_path = format!("{path}.proxy_protocol");
            if family == Family::Ipv6 {
                p.push(
                    pp_path.clone(),
                    "proxy_protocol is not supported on an IPv6 service yet (the datapath builds IPv4 headers only): remove it, or publish the service over IPv4",
                );
            }
            if let Some(e) = &nat64 {
                p.push(
                    pp_path.clone(),
                    format!(
                        "proxy_protocol is not supported through NAT64 yet, and {e} (the IPv6 datapath builds no PROXY header): remove proxy_protocol, or the endpoint's IPv6 address"
                    ),
                );
            }
            if s.protocol != super::Protocol::Tcp {
                p.push(
                    pp_path.clone(),
                    format!(
                        "proxy_protocol applies to TCP only (the header goes in front of a TCP stream's first bytes) and this service is {}: remove it",
                        s.protocol
                    ),
                );
            }
            if pp.version != 2 {
                p.push(
                    format!("{pp_path}.version"),
                    format!(
                        "PROXY protocol version {} is not supported: write `version: 2` (the binary header, which carries the link id TLV)",
                        pp.version
                    ),
                );
            }
            if let super::LinkIdTlvKind::Custom(n) = pp.link_id_tlv
                && pp.link_id_tlv.kernel().is_none()
            {
                p.push(
                    format!("{pp_path}.link_id_tlv"),
                    format!(
                        "TLV type {n:#X} is not a custom type: use one from 0xE0 to 0xEF (PP2_TYPE_MIN_CUSTOM..PP2_TYPE_MAX_CUSTOM), or azure, aws or gcp"
                    ),
                );
            }
        }

        if let Some(f) = s.flow_logs
            && !(1..=u32::from(u16::MAX)).contains(&f.sample)
        {
            p.push(
                format!("{path}.flow_logs.sample"),
                format!(
                    "sample {} is out of range: use 1 (every flow) to 65535 (one flow in 65535)",
                    f.sample
                ),
            );
        }
        if s.flow_logs.is_some() && family == Family::Ipv6 {
            p.push(
                format!("{path}.flow_logs"),
                "flow logs are not supported on an IPv6 service yet (the IPv6 records are not yet checked end to end against a collector): remove flow_logs from this service",
            );
        }
        if let (Some(_), Some(e)) = (s.flow_logs, &nat64) {
            p.push(
                format!("{path}.flow_logs"),
                format!(
                    "flow logs are not supported through NAT64 yet, and {e} (the IPv6 records are not yet checked end to end against a collector): remove flow_logs from this service, or the endpoint's IPv6 address"
                ),
            );
        }
        if s.flow_logs.is_some() && cfg.gateway.flow_logs.is_none() {
            p.push(
                format!("{path}.flow_logs"),
                "flow logs of this service go nowhere: set gateway.flow_logs (ipfix and/or json)",
            );
        }

        let m = s.maglev_table_size;
        let min = (s.backends.len() as u64 * 100).max(101);
        if !is_prime(m) {
            p.push(
                format!("{path}.maglev_table_size"),
                format!("{m} is not a prime: Maglev needs a prime table size, e.g. 65537 (the default) or 251"),
            );
        } else if u64::from(m) < min || m > 16_777_213 {
            p.push(
                format!("{path}.maglev_table_size"),
                format!(
                    "{m} is out of range: use a prime from {min} (100 slots per backend spread load evenly) to 16777213"
                ),
            );
        }
    }
}

fn endpoints(cfg: &Config, consumer_networks: &BTreeMap<String, String>, p: &mut Problems) {
    let services: HashMap<&str, &super::Service> =
        cfg.services.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut names: HashMap<&str, String> = HashMap::new();
    // (network, address, protocol, port) → path of the first endpoint using it.
    let mut listeners: HashMap<(&str, IpAddr, super::Protocol, u16), String> = HashMap::new();
    // Explicit link ids → path of the first endpoint setting it.
    let mut link_ids: HashMap<u64, String> = HashMap::new();
    for (i, e) in cfg.endpoints.iter().enumerate() {
        let path = format!("endpoints[{i}]");
        check_name(p, format!("{path}.name"), "endpoint", &e.name);
        if let Some(first) = first_seen(&mut names, e.name.as_str(), &path) {
            p.push(
                format!("{path}.name"),
                format!(
                    "duplicate endpoint name {:?}: already used at {first}; endpoint names are unique",
                    e.name
                ),
            );
        }
        check_name(p, format!("{path}.tenant"), "tenant", &e.tenant);
        check_host(p, format!("{path}.address"), "endpoint address", e.address);
        if let Some(a6) = e.address6 {
            let ap = format!("{path}.address6");
            check_host(p, ap.clone(), "endpoint address", a6);
            if a6.is_ipv4() {
                p.push(
                    ap,
                    format!(
                        "address6 {a6} is IPv4: address6 is a dual-stack endpoint's IPv6 address; write an IPv6 address, or leave address6 out"
                    ),
                );
            } else if e.address.is_ipv6() {
                p.push(
                    ap,
                    format!(
                        "the endpoint has two IPv6 addresses ({} and {a6}): a dual-stack endpoint has an IPv4 `address` and an IPv6 `address6`; make a second endpoint for the second IPv6 address",
                        e.address
                    ),
                );
            }
        }
        if !consumer_networks.contains_key(&e.network) {
            let known: Vec<&str> = consumer_networks.keys().map(String::as_str).collect();
            p.push(
                format!("{path}.network"),
                format!(
                    "consumer network {:?} has no interface: add `{{name: IFACE, role: consumer, network: {}}}` under `interfaces`, or use a known network ({})",
                    e.network,
                    e.network,
                    listing(&known)
                ),
            );
        }
        for (field, v) in [
            ("max_flows", e.max_flows),
            ("new_flows_per_second", e.new_flows_per_second),
        ] {
            if v == Some(0) {
                p.push(
                    format!("{path}.{field}"),
                    format!("{field} 0 would refuse every flow: use 1 or more, or leave it out for the gateway default"),
                );
            }
        }
        if let Some(id) = e.link_id {
            let lp = format!("{path}.link_id");
            if !(1..=u64::from(u32::MAX)).contains(&id) {
                p.push(
                    lp,
                    format!(
                        "link_id {id} is out of range: use 1 to 4294967295, or leave it out for the one plink allocates"
                    ),
                );
            } else if let Some(first) = first_seen(&mut link_ids, id, &path) {
                p.push(
                    lp,
                    format!(
                        "link_id {id} is already {first}'s: link ids name one endpoint each, pick another (or leave it out for an allocated one)"
                    ),
                );
            }
        }
        let Some(service) = services.get(e.service.as_str()) else {
            let known: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
            p.push(
                format!("{path}.service"),
                format!(
                    "unknown service {:?}: use a service defined under `services` ({})",
                    e.service,
                    listing(&known)
                ),
            );
            continue;
        };
        if let Some(cap) = e.max_flows {
            let pool = match &cfg.fleet {
                None => service.nat_pool_ports(),
                // The smallest node's pool: the cap holds on every node.
                Some(f) => f
                    .nodes
                    .iter()
                    .map(|n| {
                        let addrs = n
                            .nat
                            .iter()
                            .filter(|x| x.service == service.name)
                            .map(|x| x.addresses.len() as u64)
                            .sum::<u64>();
                        addrs * u64::from(service.nat.ports.len())
                    })
                    .min()
                    .unwrap_or(0),
            };
            if u64::from(cap) > pool && pool > 0 {
                p.push(
                    format!("{path}.max_flows"),
                    format!(
                        "max_flows {cap} is more than service {:?}'s NAT pool holds ({pool} ports per protocol): the cap would let this endpoint take every port the service's other endpoints need; use at most {pool}, or leave it out for a fair share",
                        e.service
                    ),
                );
            }
        }
        if service.proxy_protocol.map(|pp| pp.link_id_tlv) == Some(super::LinkIdTlvKind::Aws)
            && e.name.len() > plink_common::proxy::AWS_NAME_MAX
        {
            p.push(
                format!("{path}.name"),
                format!(
                    "endpoint name {:?} is {} bytes, longer than the {} an `aws` link id TLV carries in plink's PROXY header: shorten it, or use another link_id_tlv",
                    e.name,
                    e.name.len(),
                    plink_common::proxy::AWS_NAME_MAX
                ),
            );
        }
        endpoint_family(p, &path, e, service);
        for (field, addr) in [("address", Some(e.address)), ("address6", e.address6)] {
            let Some(addr) = addr else { continue };
            for sp in &service.ports {
                let key = (e.network.as_str(), addr, service.protocol, sp.port);
                if let Some(first) = first_seen(&mut listeners, key, &path) {
                    let shown = match addr {
                        IpAddr::V4(a) => format!("{a}:{}", sp.port),
                        IpAddr::V6(a) => format!("[{a}]:{}", sp.port),
                    };
                    p.push(
                        format!("{path}.{field}"),
                        format!(
                            "{shown}/{} in network {:?} is already taken by {first}: two endpoints in one network cannot share an address, protocol and port; pick another address",
                            service.protocol, e.network
                        ),
                    );
                    break;
                }
            }
        }
    }
}

/// An endpoint's address and its service's family. An IPv6 address in
/// front of an IPv4 service (`address` alone, or a dual-stack `address6`
/// beside an IPv4 `address`) is served through NAT64, RFC 7915: the backend
/// sees the service's IPv4 NAT address. An IPv4 address in front of an IPv6
/// service would need NAT46, which the datapath does not have: refused.
/// (`address6` is IPv6 or already refused, so only `address` can be IPv4.)
fn endpoint_family(p: &mut Problems, path: &str, e: &super::Endpoint, service: &super::Service) {
    if service.family() != Family::Ipv6 || e.address.is_ipv6() {
        return;
    }
    let fix = if e.address6.is_some() {
        "write the IPv6 address as `address` and leave address6 out"
    } else {
        "give the endpoint an IPv6 address, or point it at an IPv4 service"
    };
    p.push(
        format!("{path}.address"),
        format!(
            "endpoint address {} is IPv4 but service {:?} is IPv6: reaching it across families needs NAT46, which plink does not support yet; {fix}",
            e.address, service.name
        ),
    );
}

/// `fleet`: node names, each node's own NAT addresses (one entry per
/// service on every node, no address on two nodes), routing identities and
/// the store.
fn fleet(cfg: &Config, p: &mut Problems) {
    let Some(f) = &cfg.fleet else { return };
    if f.nodes.is_empty() {
        p.push(
            "fleet.nodes",
            "no nodes: list every gateway as `{name: NODE, nat: [{service: NAME, addresses: [...]}]}`, or leave `fleet` out for one gateway",
        );
    }
    if let Some(etcd) = &f.etcd {
        if etcd.endpoints.is_empty() {
            p.push(
                "fleet.etcd.endpoints",
                "no etcd endpoints: list the client URLs, e.g. [http://198.51.100.2:2379]",
            );
        }
        for (i, u) in etcd.endpoints.iter().enumerate() {
            let ok = u
                .strip_prefix("http://")
                .map(|rest| !rest.is_empty() && !rest.contains('/'))
                .unwrap_or(false);
            if !ok {
                p.push(
                    format!("fleet.etcd.endpoints[{i}]"),
                    format!(
                        "invalid etcd endpoint {u:?}: write http://HOST:PORT, e.g. http://198.51.100.2:2379 (TLS is not supported yet)"
                    ),
                );
            }
        }
        let prefix_ok = etcd.prefix.starts_with('/')
            && etcd.prefix.len() > 1
            && !etcd.prefix.ends_with('/')
            && etcd
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'));
        if !prefix_ok {
            p.push(
                "fleet.etcd.prefix",
                format!(
                    "invalid key prefix {:?}: write /NAME (letters, digits, '-', '_', '.', '/'; no trailing '/'), e.g. /plink/fleet-a",
                    etcd.prefix
                ),
            );
        }
        if etcd.timeout.0.is_zero() {
            p.push("fleet.etcd.timeout", "must be more than 0, e.g. 2s");
        }
    }
    let services: HashMap<&str, usize> = cfg
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let known: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    let backend_addrs: HashMap<IpAddr, String> = cfg
        .services
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.backends
                .iter()
                .enumerate()
                .map(move |(j, b)| (b.address, format!("services[{i}].backends[{j}]")))
        })
        .collect();
    let mut names: HashMap<&str, String> = HashMap::new();
    // NAT address → (path, node, service) of its first owner.
    let mut owner: HashMap<IpAddr, (String, &str, &str)> = HashMap::new();
    let mut routing_ids: HashMap<(&str, Ipv4Addr), String> = HashMap::new();
    for (i, n) in f.nodes.iter().enumerate() {
        let path = format!("fleet.nodes[{i}]");
        check_name(p, format!("{path}.name"), "node", &n.name);
        if let Some(first) = first_seen(&mut names, n.name.as_str(), &format!("{path}.name")) {
            p.push(
                format!("{path}.name"),
                format!(
                    "duplicate node name {:?}: already used at {first}; node names are unique",
                    n.name
                ),
            );
        }
        for (field, a) in [
            ("router_id", n.routing.router_id),
            ("next_hop", n.routing.next_hop),
        ] {
            let Some(a) = a else { continue };
            let fp = format!("{path}.routing.{field}");
            check_unicast(p, fp.clone(), field, a);
            if let Some(first) = first_seen(&mut routing_ids, (field, a), &fp) {
                p.push(
                    fp,
                    format!(
                        "{field} {a} is already another node's (at {first}): each node has its own"
                    ),
                );
            }
        }
        let mut seen_services: HashMap<&str, String> = HashMap::new();
        for (j, nat) in n.nat.iter().enumerate() {
            let np = format!("{path}.nat[{j}]");
            if !services.contains_key(nat.service.as_str()) {
                p.push(
                    format!("{np}.service"),
                    format!(
                        "unknown service {:?}: use a service defined under `services` ({})",
                        nat.service,
                        listing(&known)
                    ),
                );
            }
            if let Some(first) = first_seen(&mut seen_services, nat.service.as_str(), &np) {
                p.push(
                    format!("{np}.service"),
                    format!(
                        "service {:?} is listed twice for node {:?} (also at {first}): list its addresses once",
                        nat.service, n.name
                    ),
                );
            }
            if nat.addresses.is_empty() {
                p.push(
                    format!("{np}.addresses"),
                    format!(
                        "node {:?} has no NAT addresses for service {:?}: list 1 to {MAX_NAT_ADDRESSES} provider-side addresses this node source-NATs the service's flows to",
                        n.name, nat.service
                    ),
                );
            }
            if nat.addresses.len() > MAX_NAT_ADDRESSES {
                p.push(
                    format!("{np}.addresses[{MAX_NAT_ADDRESSES}]"),
                    format!(
                        "{} NAT addresses, at most {MAX_NAT_ADDRESSES} per service and node: remove {}",
                        nat.addresses.len(),
                        nat.addresses.len() - MAX_NAT_ADDRESSES
                    ),
                );
            }
            for (k, a) in nat.addresses.iter().enumerate() {
                let ap = format!("{np}.addresses[{k}]");
                check_host(p, ap.clone(), "NAT address", *a);
                if let Some(svc) = services
                    .get(nat.service.as_str())
                    .map(|&i| &cfg.services[i])
                    && Family::of(a) != svc.family()
                {
                    p.push(
                        ap.clone(),
                        format!(
                            "NAT address {a} is {} but service {:?} is {} (by its backends): a service's backends and NAT addresses are all of one family; use {} addresses here",
                            Family::of(a),
                            svc.name,
                            svc.family(),
                            svc.family()
                        ),
                    );
                }
                if let Some(b) = backend_addrs.get(a) {
                    p.push(
                        ap.clone(),
                        format!(
                            "NAT address {a} is also a backend ({b}): replies would loop; use an address no backend has"
                        ),
                    );
                }
                match owner.get(a) {
                    None => {
                        owner.insert(*a, (ap, n.name.as_str(), nat.service.as_str()));
                    }
                    Some((first, node, service)) => {
                        let message = if *node != n.name {
                            format!(
                                "NAT address {a} is already node {node:?}'s (at {first}): each node owns its NAT addresses, so that provider replies return to the node that holds the flow; pick an address no other node has"
                            )
                        } else if *service != nat.service {
                            format!(
                                "NAT address {a} is shared by two services (also at {first}): a NAT address belongs to one service, pick another address"
                            )
                        } else {
                            format!(
                                "NAT address {a} is listed twice (also at {first}): list it once"
                            )
                        };
                        p.push(ap, message);
                    }
                }
            }
        }
        for s in &cfg.services {
            if !seen_services.contains_key(s.name.as_str()) {
                p.push(
                    format!("{path}.name"),
                    format!(
                        "node {:?} has no NAT addresses for service {:?}: add `{{service: {}, addresses: [...]}}` to {path}.nat; every node needs its own addresses for every service",
                        n.name, s.name, s.name
                    ),
                );
            }
        }
    }
}
