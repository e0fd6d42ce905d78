//! What the dataplane should contain, as plain data, and [`Dataplane::apply`],
//! which writes it into the maps as a diff: entries that changed are written,
//! entries that went away are deleted, nothing is ever cleared wholesale, so
//! established flows keep forwarding across a reload.
//!
//! Ids are chosen by the controller and must be stable across reloads: an id
//! names a counter slot. Endpoint ids `< MAX_ENDPOINTS`, service ids
//! `< MAX_SERVICES`, backend ids `< MAX_BACKENDS` (unique across services).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    ops::RangeInclusive,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use plink_common::{
    Addr, BackendInfo, Counters, DropReason, EndpointGen, EndpointKey, EndpointValue, EpLimitState,
    GlobalConfig, IfaceInfo, MAX_NAT_SLOTS, NO_BACKEND, NatAddrInfo, NatSlot, NetAddrKey,
    ServiceConfig, Timeouts, backend_state, ep_state, map_names, nat_addr_flags, nat_flags,
    proxy::ProxyHeader, role, v4, v6,
};

use super::Dataplane;

/// Everything the datapath needs to know, as the controller decided it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataplaneSpec {
    /// Interfaces XDP is attached to (resolved to ifindex by the caller).
    pub interfaces: Vec<InterfaceSpec>,
    /// Conntrack idle timeouts; `Timeouts::default()` is RFC 5382/4787/5508.
    pub timeouts: TimeoutSpec,
    pub services: Vec<ServiceSpec>,
    pub backends: Vec<BackendSpec>,
    pub endpoints: Vec<EndpointSpec>,
    /// NAT addresses that drained and left their service, kept in NAT_ADDRS
    /// for a grace period so late replies to them are dropped (and counted)
    /// rather than passed to the gateway's kernel; not announced by ARP.
    pub retired_nat: BTreeMap<IpAddr, RetiredNat>,
    /// (consumer network id, address): the node's BGP next hops on its
    /// consumer links. ARP is answered for them (`ARP_ENDPOINTS`); no
    /// traffic is addressed to them.
    pub next_hops: BTreeSet<(u32, Ipv4Addr)>,
    /// `PROXY_HEADERS`: endpoint id → the PROXY protocol header its flows
    /// carry (`proxy::build_header`), for the endpoints of services that
    /// send one; every other slot is written empty (no header).
    pub proxy_headers: BTreeMap<u32, ProxyHeader>,
}

/// The service slot a retired NAT address last had (for the record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetiredNat {
    pub service_id: u32,
    pub slot: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterfaceRole {
    /// Carries a consumer network; `network_id` names it.
    Consumer { network_id: u32 },
    /// The provider side. Exactly one interface has this role: FIB lookups
    /// for consumer → service packets are made as if they came in here.
    Provider,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub ifindex: u32,
    pub role: InterfaceRole,
    /// The interface's MAC (source of ARP replies).
    pub mac: [u8; 6],
    /// How frames plink answers itself leave this interface.
    pub answers: AnswerPath,
}

/// How ARP replies and ICMP errors that XDP builds leave their ingress
/// interface (plink-ebpf `answer.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AnswerPath {
    /// XDP_TX: the cheapest way, right on real NICs.
    #[default]
    XdpTx,
    /// A redirect to the ingress interface. On veth, XDP_TX reaches the peer
    /// only when the peer runs an XDP program (the driver wakes its NAPI only
    /// then); a redirect wakes a peer with GRO-only NAPI too.
    Redirect,
}

impl AnswerPath {
    /// The right path for an interface with this driver (`ethtool -i`).
    pub fn for_driver(driver: Option<&str>) -> Self {
        match driver {
            Some("veth") => Self::Redirect,
            _ => Self::XdpTx,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutSpec {
    pub tcp_established: Duration,
    /// SYN seen but not established, and FIN/RST seen.
    pub tcp_transitory: Duration,
    pub udp: Duration,
    pub icmp: Duration,
}

impl Default for TimeoutSpec {
    fn default() -> Self {
        let t = Timeouts::default();
        Self {
            tcp_established: Duration::from_nanos(t.tcp_established_ns),
            tcp_transitory: Duration::from_nanos(t.tcp_transitory_ns),
            udp: Duration::from_nanos(t.udp_ns),
            icmp: Duration::from_nanos(t.icmp_ns),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => plink_common::IPPROTO_TCP,
            Protocol::Udp => plink_common::IPPROTO_UDP,
        }
    }
}

/// A NAT source address of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSpec {
    /// IPv4 or IPv6, the family of the service's backends.
    pub addr: IpAddr,
    /// Source ports handed to flows (host order, inclusive; 0 not allowed).
    pub ports: RangeInclusive<u16>,
    /// No new flows; existing flows and ARP stay until they expire.
    pub draining: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub id: u32,
    /// Up to 8 NAT addresses; their position is the NAT slot (counter index),
    /// keep it stable across reloads.
    pub nat: Vec<NatSpec>,
    /// The backend lookup table (Maglev): backend ids, `NO_BACKEND` for an
    /// empty slot. A flow goes to `lookup[flow_hash % lookup.len()]`; empty
    /// means the service has no backend and new flows are dropped.
    pub lookup: Vec<u32>,
    /// TCP MSS clamp on SYN and SYN-ACK: `plink_common::MSS_CLAMP_OFF`,
    /// `MSS_CLAMP_AUTO`, or the largest MSS let through.
    pub mss_clamp: u16,
    /// Flow logs: 0 = off, N = one flow in N is logged.
    pub flow_log_sample: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Active,
    Draining,
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub id: u32,
    pub service_id: u32,
    pub addr: IpAddr,
    /// For the record: which backends get new flows is decided by the lookup table.
    pub state: BackendState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointState {
    Pending,
    Approved,
    Rejected,
    Removed,
}

/// An endpoint port and the backends' port it maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub port: u16,
    pub target_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub id: u32,
    pub network_id: u32,
    /// IPv4 or IPv6: of its service's family, or IPv6 in front of an IPv4
    /// service (NAT64). An IPv4 address in front of an IPv6 service (NAT46)
    /// is refused.
    pub addr: IpAddr,
    /// A dual-stack endpoint's IPv6 address, served for its IPv4 service
    /// through NAT64 beside an IPv4 `addr`: the same endpoint (id, state,
    /// caps, counters) on a second address, with its own ENDPOINTS keys,
    /// echo key (ICMPv6) and neighbour-discovery entry.
    pub addr6: Option<IpAddr>,
    pub service_id: u32,
    pub protocol: Protocol,
    pub ports: Vec<PortSpec>,
    /// Only `Approved` passes traffic; the others are dropped with their own
    /// reason. ARP is answered for every state but `Removed`. Moving an
    /// endpoint away from `Approved` does not cut its flows: call
    /// [`Dataplane::purge_endpoint`] after `apply`.
    pub state: EndpointState,
    /// Live flows allowed; 0 = unlimited.
    pub max_flows: u32,
    /// New flows per second allowed; 0 = unlimited.
    pub new_flows_per_sec: u32,
}

impl EndpointSpec {
    /// The addresses the endpoint is served on: `addr`, then `addr6`.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.addr).chain(self.addr6)
    }
}

/// The map encoding of an address (see `plink_common::Addr`).
pub fn addr(a: IpAddr) -> Addr {
    match a {
        IpAddr::V4(a) => v4(a.octets()),
        IpAddr::V6(a) => v6(a.octets()),
    }
}

/// The address an `Addr` read from a map encodes: IPv4 when its last three
/// words are zero (`plink_common::Addr`: no IPv6 address plink takes has).
pub fn ip_of(a: &Addr) -> IpAddr {
    if plink_common::addr_is_ambiguous_v6(a) {
        IpAddr::V4(Ipv4Addr::from(a[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (chunk, w) in o.chunks_exact_mut(4).zip(a) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(std::net::Ipv6Addr::from(o))
    }
}

/// The IPv4 address, for what is IPv4-only still (managed
/// neighbours, retired NAT addresses, the planner's NAT bookkeeping).
pub fn v4_only(a: IpAddr) -> Option<Ipv4Addr> {
    match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// An IPv6 address whose last 96 bits are zero: its `Addr` would read as
/// an IPv4 one, and the datapath drops packets from or to it.
pub fn ambiguous_v6(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(_)) && plink_common::addr_is_ambiguous_v6(&addr(a))
}

/// The `EP_GEN` generation of endpoint `e`: a digest (FNV-1a) of what its
/// flows' mappings depend on. The same endpoint gets the same value in every
/// process (a restart keeps its flows); a re-pointed endpoint, other ports
/// or another endpoint on a reused id get another. Never 0 (no endpoint).
pub fn endpoint_gen_id(e: &EndpointSpec) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
    };
    feed(&e.id.to_le_bytes());
    feed(&e.network_id.to_le_bytes());
    // IPv4 feeds its four octets, as before IPv6: generations (and flows)
    // survive the upgrade. A NAT64 `addr6` is fed only when there is one,
    // for the same reason; its flows' replies come from it, so a change
    // moves the generation.
    for a in e.addresses() {
        match a {
            IpAddr::V4(a) => feed(&a.octets()),
            IpAddr::V6(a) => feed(&a.octets()),
        }
    }
    feed(&e.service_id.to_le_bytes());
    feed(&[e.protocol.number()]);
    for p in &e.ports {
        feed(&p.port.to_le_bytes());
        feed(&p.target_port.to_le_bytes());
    }
    h.max(1)
}

/// The next `GlobalConfig::hop_gen`: never 0, which means "no hop cached".
pub fn next_hop_gen(current: u32) -> u32 {
    current.wrapping_add(1).max(1)
}

fn timeouts(t: &TimeoutSpec) -> Timeouts {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Timeouts {
        tcp_established_ns: ns(t.tcp_established),
        tcp_transitory_ns: ns(t.tcp_transitory),
        udp_ns: ns(t.udp),
        icmp_ns: ns(t.icmp),
    }
}

/// Writes `desired` into a hash map: changed entries are written, missing ones deleted.
fn sync_hash<K, V>(
    map: &mut HashMap<&mut MapData, K, V>,
    desired: &BTreeMap<K, V>,
) -> anyhow::Result<()>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let existing: Vec<K> = map.keys().collect::<Result<_, _>>()?;
    for k in existing {
        if !desired.contains_key(&k) {
            map.remove(&k)?;
        }
    }
    for (k, v) in desired {
        if map.get(k, 0).ok().as_ref() != Some(v) {
            map.insert(k, v, 0)?;
        }
    }
    Ok(())
}

impl DataplaneSpec {
    /// Checks ids, sizes and references before anything is written, against
    /// the map sizes of this build.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_within(&crate::plan::Capacities::BUILD)
    }

    /// Checks ids, sizes and references against the given map sizes: a spec
    /// that passes can be written without a map refusing an entry.
    pub fn validate_within(&self, caps: &crate::plan::Capacities) -> anyhow::Result<()> {
        ensure!(
            self.interfaces.len() as u64 <= u64::from(caps.interfaces),
            "{} interfaces, the dataplane holds at most {}",
            self.interfaces.len(),
            caps.interfaces
        );
        let providers = self
            .interfaces
            .iter()
            .filter(|i| i.role == InterfaceRole::Provider)
            .count();
        ensure!(
            providers == 1,
            "exactly one provider interface is needed, got {providers}"
        );
        let mut services = BTreeSet::new();
        for s in &self.services {
            ensure!(
                s.id < caps.services,
                "service id {} is beyond the SERVICES map ({} slots); ids released by this change are reused only by a later one: apply the removal and the addition in two steps, or restart",
                s.id,
                caps.services
            );
            ensure!(services.insert(s.id), "service id {} used twice", s.id);
            ensure!(
                s.nat.len() <= MAX_NAT_SLOTS,
                "service {}: {} NAT addresses, at most {MAX_NAT_SLOTS}",
                s.id,
                s.nat.len()
            );
            for n in &s.nat {
                ensure!(
                    *n.ports.start() > 0 && n.ports.start() <= n.ports.end(),
                    "service {}: NAT port range {:?} is empty or includes 0",
                    s.id,
                    n.ports
                );
            }
        }
        let mut backends = BTreeMap::new();
        for b in &self.backends {
            ensure!(
                b.id < caps.backends,
                "backend id {} is beyond the BACKENDS map ({} slots); ids released by this change are reused only by a later one: apply the removal and the addition in two steps, or restart",
                b.id,
                caps.backends
            );
            ensure!(
                backends.insert(b.id, b.service_id).is_none(),
                "backend id {} used twice",
                b.id
            );
        }
        for s in &self.services {
            for id in &s.lookup {
                if *id != NO_BACKEND {
                    ensure!(
                        backends.get(id) == Some(&s.id),
                        "service {}: lookup table names backend {id}, which is not one of its backends",
                        s.id
                    );
                }
            }
        }
        let mut endpoints = BTreeSet::new();
        for e in &self.endpoints {
            ensure!(
                e.id < caps.endpoints,
                "endpoint id {} is beyond the per-endpoint maps ({} slots); ids released by this change are reused only by a later one: apply the removal and the addition in two steps, or restart",
                e.id,
                caps.endpoints
            );
            ensure!(endpoints.insert(e.id), "endpoint id {} used twice", e.id);
            ensure!(
                services.contains(&e.service_id),
                "endpoint {} names unknown service {}",
                e.id,
                e.service_id
            );
        }
        // One address family per service: its NAT addresses and backends.
        let mut family: BTreeMap<u32, (bool, String)> = BTreeMap::new();
        let mut same_family = |service: u32, a: IpAddr, what: String| -> anyhow::Result<()> {
            ensure!(
                !ambiguous_v6(a),
                "{what}: IPv6 address {a} has a zero interface identifier (its last 96 bits), which plink refuses: use another address"
            );
            let (v6, first) = family.entry(service).or_insert((a.is_ipv6(), what.clone()));
            ensure!(
                *v6 == a.is_ipv6(),
                "service {service}: {what} is {} but {first} is {}: a service's NAT addresses and backends must be one address family",
                if a.is_ipv6() { "IPv6" } else { "IPv4" },
                if *v6 { "IPv6" } else { "IPv4" },
            );
            Ok(())
        };
        for s in &self.services {
            for n in s.nat.iter().filter(|n| !n.addr.is_unspecified()) {
                same_family(s.id, n.addr, format!("NAT address {}", n.addr))?;
            }
        }
        for b in &self.backends {
            same_family(
                b.service_id,
                b.addr,
                format!("backend {} ({})", b.id, b.addr),
            )?;
        }
        // Endpoint addresses are of their service's family, or IPv6 in
        // front of an IPv4 service (NAT64: the datapath translates). A
        // service without NAT address or backend has no family to check
        // against, and no flow to translate.
        for e in &self.endpoints {
            for a in e.addresses() {
                ensure!(
                    !ambiguous_v6(a),
                    "endpoint {} ({a}): IPv6 address {a} has a zero interface identifier (its last 96 bits), which plink refuses: use another address",
                    e.id
                );
                if let Some((true, first)) = family.get(&e.service_id) {
                    ensure!(
                        a.is_ipv6(),
                        "service {}: endpoint {} ({a}) is IPv4 but {first} is IPv6: an IPv4 endpoint address in front of an IPv6 service needs NAT46, which plink does not support",
                        e.service_id,
                        e.id
                    );
                }
            }
            if let Some(a6) = e.addr6 {
                ensure!(
                    a6.is_ipv6() && e.addr.is_ipv4(),
                    "endpoint {}: addr6 {a6} beside addr {}: addr6 is a dual-stack endpoint's IPv6 address, beside an IPv4 addr",
                    e.id,
                    e.addr
                );
            }
            ensure!(
                !(e.addresses().any(|a| a.is_ipv6()) && self.proxy_headers.contains_key(&e.id)),
                "endpoint {} ({}): PROXY protocol headers are IPv4 only for now (the IPv6 datapath, NAT64 included, sends none)",
                e.id,
                e.addresses()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        // Entries of the hash maps: what `apply` will insert, checked for
        // clashes and counted before anything is written.
        let entries = self.endpoint_entries()?;
        ensure!(
            entries.endpoints.len() as u64 <= u64::from(caps.endpoint_keys),
            "the endpoints need {} endpoint-table entries (one per endpoint address and port, one per endpoint address for echo), the table holds {}: remove endpoints or service ports",
            entries.endpoints.len(),
            caps.endpoint_keys
        );
        ensure!(
            entries.neighbours.len() as u64 <= u64::from(caps.endpoint_addresses),
            "{} endpoint addresses, the ARP table holds {}",
            entries.neighbours.len(),
            caps.endpoint_addresses
        );
        let mut nat_owner: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for s in &self.services {
            for n in s.nat.iter().filter(|n| !n.addr.is_unspecified()) {
                if let Some(other) = nat_owner.insert(n.addr, s.id) {
                    bail!(
                        "NAT address {} is used twice (services {other} and {})",
                        n.addr,
                        s.id
                    );
                }
            }
        }
        for a in self.retired_nat.keys() {
            let held = nat_owner.get(a);
            ensure!(
                held.is_none(),
                "NAT address {a} is both retired and held by service {}",
                held.copied().unwrap_or_default()
            );
        }
        for (id, h) in &self.proxy_headers {
            ensure!(
                endpoints.contains(id),
                "a PROXY header for endpoint id {id}, which no endpoint has"
            );
            let len = usize::from(h.len);
            ensure!(
                (plink_common::proxy::FIXED_LEN..=plink_common::proxy::HEADER_MAX).contains(&len)
                    && len % 4 == 0,
                "endpoint {id}: a PROXY header of {len} bytes (it needs a multiple of 4 from {} to {})",
                plink_common::proxy::FIXED_LEN,
                plink_common::proxy::HEADER_MAX
            );
        }
        let nat_entries = nat_owner.len() + self.retired_nat.len();
        ensure!(
            nat_entries as u64 <= u64::from(caps.nat_addresses),
            "{nat_entries} NAT addresses (draining and retired ones included), the NAT address table holds {}",
            caps.nat_addresses
        );
        Ok(())
    }
}

/// The protocol of an endpoint address's echo entry: ICMP, or ICMPv6 for
/// an IPv6 address (whatever the service's family: a NAT64 consumer pings
/// with ICMPv6).
pub(crate) fn echo_proto(a: IpAddr) -> u8 {
    if a.is_ipv6() {
        plink_common::IPPROTO_ICMPV6
    } else {
        plink_common::IPPROTO_ICMP
    }
}

/// The `ENDPOINTS` key of endpoint `e` at its address `a`, at `port` for
/// protocol `proto`.
pub(crate) fn endpoint_key(e: &EndpointSpec, a: IpAddr, port: u16, proto: u8) -> EndpointKey {
    EndpointKey {
        network_id: e.network_id,
        addr_be: addr(a),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    }
}

/// What [`DataplaneSpec::endpoint_entries`] computes for `apply`.
#[derive(Debug, Default, PartialEq)]
pub struct EndpointEntries {
    /// `ENDPOINTS`: one entry per endpoint address and port, one echo entry
    /// per endpoint address.
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    /// `ARP_ENDPOINTS`: the addresses ARP and neighbour discovery answer
    /// for (endpoints' but removed ones', and the next hops).
    pub neighbours: BTreeMap<NetAddrKey, u32>,
}

impl DataplaneSpec {
    /// The endpoint entries `apply` writes, for every address an endpoint
    /// is served on (a dual-stack NAT64 endpoint's two alike); an error if
    /// two endpoints claim one key, or a next hop is an endpoint address.
    pub fn endpoint_entries(&self) -> anyhow::Result<EndpointEntries> {
        let mut out = EndpointEntries::default();
        for e in &self.endpoints {
            let value = |target_port: u16| EndpointValue {
                endpoint_id: e.id,
                service_id: e.service_id,
                target_port_be: target_port.to_be(),
                state: endpoint_state(e.state),
                _pad: 0,
                max_flows: e.max_flows,
                new_flows_per_sec: e.new_flows_per_sec,
            };
            for a in e.addresses() {
                for p in &e.ports {
                    let key = endpoint_key(e, a, p.port, e.protocol.number());
                    if out.endpoints.insert(key, value(p.target_port)).is_some() {
                        bail!(
                            "two endpoints claim {} ({:?}) in network {}",
                            std::net::SocketAddr::new(a, p.port),
                            e.protocol,
                            e.network_id
                        );
                    }
                }
                // Echo ("port" 0) is answered at every endpoint address,
                // whatever its service's protocol, with the endpoint's state
                // and caps. Where endpoints share an address the approved one
                // with the lowest id owns echo (spec endpoints are sorted by id).
                if !e.ports.is_empty() {
                    let key = endpoint_key(e, a, 0, echo_proto(a));
                    let v = value(0);
                    let replace = out.endpoints.get(&key).is_none_or(|old| {
                        old.state != ep_state::APPROVED && v.state == ep_state::APPROVED
                    });
                    if replace {
                        out.endpoints.insert(key, v);
                    }
                }
                if e.state != EndpointState::Removed {
                    let key = NetAddrKey {
                        network_id: e.network_id,
                        addr_be: addr(a),
                    };
                    out.neighbours.insert(key, 1);
                }
            }
        }
        for (network_id, nh) in &self.next_hops {
            let key = NetAddrKey {
                network_id: *network_id,
                addr_be: v4(nh.octets()),
            };
            ensure!(
                out.neighbours.insert(key, 1).is_none(),
                "next hop {nh} in network {network_id} is also an endpoint address"
            );
        }
        Ok(out)
    }
}

impl Dataplane {
    /// Writes `spec` into the maps as a diff. A new endpoint id (one no
    /// endpoint entry carries yet) gets its counter and cap slots zeroed first.
    pub fn apply(&mut self, spec: &DataplaneSpec) -> anyhow::Result<()> {
        self.apply_after(spec, None)
    }

    /// Like [`Dataplane::apply`], knowing that `previous` is what the maps
    /// hold: lookup tables that did not change are not read back slot by
    /// slot (65,537 syscalls per service), which keeps an approval fast.
    pub fn apply_after(
        &mut self,
        spec: &DataplaneSpec,
        previous: Option<&DataplaneSpec>,
    ) -> anyhow::Result<()> {
        spec.validate()?;
        self.apply_interfaces(spec)?;
        self.apply_services(spec, previous)?;
        self.apply_endpoints(spec)?;
        Ok(())
    }

    fn apply_interfaces(&mut self, spec: &DataplaneSpec) -> anyhow::Result<()> {
        let mut desired = BTreeMap::new();
        let mut provider_ifindex = 0;
        for i in &spec.interfaces {
            let (r, network_id) = match i.role {
                InterfaceRole::Consumer { network_id } => (role::CONSUMER, network_id),
                InterfaceRole::Provider => {
                    provider_ifindex = i.ifindex;
                    (role::PROVIDER, 0)
                }
            };
            desired.insert(
                i.ifindex,
                IfaceInfo {
                    network_id,
                    mac: i.mac,
                    role: r,
                    flags: match i.answers {
                        AnswerPath::XdpTx => 0,
                        AnswerPath::Redirect => plink_common::iface_flags::ANSWER_BY_REDIRECT,
                    },
                },
            );
        }
        for i in &spec.interfaces {
            self.register_interface(i.ifindex)?;
        }
        let mut map: HashMap<_, u32, IfaceInfo> =
            HashMap::try_from(self.map_mut(map_names::INTERFACES)?)?;
        sync_hash(&mut map, &desired)?;
        let mut global: Array<_, GlobalConfig> = Array::try_from(self.map_mut(map_names::GLOBAL)?)?;
        let current = global.get(&0, 0)?;
        // Every apply may have moved a route or neighbour of the provider
        // side: flows look their next hop up again.
        let g = GlobalConfig {
            timeouts: timeouts(&spec.timeouts),
            provider_ifindex,
            hop_gen: next_hop_gen(current.hop_gen),
        };
        global.set(0, g, 0)?;
        Ok(())
    }

    fn apply_services(
        &mut self,
        spec: &DataplaneSpec,
        previous: Option<&DataplaneSpec>,
    ) -> anyhow::Result<()> {
        // Backends first: a lookup table never names a backend not yet written.
        {
            let cached = self.written.backends.take();
            let map: Array<_, BackendInfo> = Array::try_from(self.map_mut(map_names::BACKENDS)?)?;
            let desired: BTreeMap<u32, BackendInfo> = spec
                .backends
                .iter()
                .map(|b| {
                    (
                        b.id,
                        BackendInfo {
                            addr_be: addr(b.addr),
                            service_id: b.service_id,
                            state: match b.state {
                                BackendState::Active => backend_state::ACTIVE,
                                BackendState::Draining => backend_state::DRAINING,
                                BackendState::Down => backend_state::DOWN,
                            },
                            enabled: 1,
                            _pad: [0; 2],
                        },
                    )
                })
                .collect();
            // Read the array once per process; afterwards diff against what we wrote.
            let mut current = match cached {
                Some(c) => c,
                None => map.iter().collect::<Result<Vec<_>, _>>()?,
            };
            // An id taken into use (its slot was empty) starts its counters
            // at zero: a reused id must not inherit its last owner's.
            let fresh: Vec<u32> = desired
                .keys()
                .copied()
                .filter(|id| current.get(*id as usize).is_some_and(|s| s.enabled == 0))
                .collect();
            for id in fresh {
                self.zero_counters(map_names::BACKEND_STATS, id)?;
            }
            let mut map: Array<_, BackendInfo> =
                Array::try_from(self.map_mut(map_names::BACKENDS)?)?;
            for (id, slot) in current.iter_mut().enumerate() {
                let want = desired.get(&(id as u32)).copied().unwrap_or_default();
                if *slot != want {
                    map.set(id as u32, want, 0)?;
                    *slot = want;
                }
            }
            self.written.backends = Some(current);
        }

        let services: Array<_, ServiceConfig> =
            Array::try_from(self.map_mut(map_names::SERVICES)?)?;
        let current: Vec<ServiceConfig> = services.iter().collect::<Result<_, _>>()?;
        let lb_len = {
            let lb: Array<_, u32> = Array::try_from(self.map_mut(map_names::LB_TABLE)?)?;
            lb.len()
        };
        // Regions of the shared lookup table in use, to place new tables.
        let mut used: Vec<(u32, u32)> = current
            .iter()
            .filter(|s| s.enabled != 0 && s.lb_size != 0)
            .map(|s| (s.lb_offset, s.lb_size))
            .collect();
        let mut desired: BTreeMap<u32, ServiceConfig> = BTreeMap::new();
        for s in &spec.services {
            let size = u32::try_from(s.lookup.len()).context("lookup table too large")?;
            let old = current.get(s.id as usize).copied().unwrap_or_default();
            // A changed table is never rewritten in place, where a new flow
            // could read a half-written table: it is written whole to a free
            // region, then the service entry is flipped to it (one value
            // update) and the old region becomes free. An unchanged table
            // stays where it is.
            let in_place = old.enabled != 0 && old.lb_size == size && size != 0;
            let unchanged = in_place
                && match previous.and_then(|p| p.services.iter().find(|p| p.id == s.id)) {
                    Some(p) => p.lookup == s.lookup,
                    // Adopted maps: compare with what the region holds.
                    None => {
                        let lb: Array<_, u32> =
                            Array::try_from(self.map_mut(map_names::LB_TABLE)?)?;
                        let mut same = true;
                        for (i, id) in s.lookup.iter().enumerate() {
                            if lb.get(&(old.lb_offset + i as u32), 0)? != *id {
                                same = false;
                                break;
                            }
                        }
                        same
                    }
                };
            let offset = if unchanged {
                old.lb_offset
            } else if size == 0 {
                0
            } else {
                let off = first_fit(&used, size, lb_len).with_context(|| {
                    format!(
                        "the backend lookup table ({lb_len} slots, fixed at start) has no free \
                         region of {size} slots for service {}: restart with fewer or smaller tables",
                        s.id
                    )
                })?;
                used.push((off, size));
                self.written.quiesce(off, size);
                let mut lb: Array<_, u32> = Array::try_from(self.map_mut(map_names::LB_TABLE)?)?;
                for (i, id) in s.lookup.iter().enumerate() {
                    lb.set(off + i as u32, *id, 0)?;
                }
                off
            };
            let mut nat = [NatSlot::default(); MAX_NAT_SLOTS];
            for (slot, n) in nat.iter_mut().zip(&s.nat) {
                *slot = NatSlot {
                    addr_be: addr(n.addr),
                    port_min: *n.ports.start(),
                    port_max: *n.ports.end(),
                    flags: if n.draining { nat_flags::DRAINING } else { 0 },
                    _pad: [0; 3],
                };
            }
            desired.insert(
                s.id,
                ServiceConfig {
                    nat,
                    nat_count: s.nat.len() as u32,
                    lb_offset: offset,
                    lb_size: size,
                    enabled: 1,
                    mss_clamp: s.mss_clamp,
                    flow_log_sample: s.flow_log_sample,
                },
            );
        }
        // Service ids taken into use start their service and NAT counters at zero.
        for id in desired.keys() {
            if current.get(*id as usize).is_some_and(|s| s.enabled == 0) {
                self.zero_counters(map_names::SVC_STATS, *id)?;
                for slot in 0..MAX_NAT_SLOTS as u32 {
                    self.zero_counters(map_names::NAT_STATS, id * MAX_NAT_SLOTS as u32 + slot)?;
                }
            }
        }
        let mut freed: Vec<(u32, u32, std::time::Instant)> = Vec::new();
        let mut services: Array<_, ServiceConfig> =
            Array::try_from(self.map_mut(map_names::SERVICES)?)?;
        for (id, old) in current.iter().enumerate() {
            let id = id as u32;
            let want = desired.get(&id).copied().unwrap_or_default();
            if *old != want {
                services.set(id, want, 0)?;
                if old.enabled != 0
                    && old.lb_size != 0
                    && (old.lb_offset != want.lb_offset || want.enabled == 0)
                {
                    freed.push((old.lb_offset, old.lb_size, std::time::Instant::now()));
                }
            }
        }
        self.written.freed_lb.extend(freed);

        // NAT addresses (draining ones included: their flows and ARP stay).
        let mut nat_desired = BTreeMap::new();
        for s in &spec.services {
            for (slot, n) in s.nat.iter().enumerate() {
                // A vacant slot (its address moved to another service) owns nothing.
                if n.addr.is_unspecified() {
                    continue;
                }
                let prev = nat_desired.insert(
                    addr(n.addr),
                    NatAddrInfo {
                        service_id: s.id,
                        slot: slot as u8,
                        flags: 0,
                        _pad: [0; 2],
                    },
                );
                if prev.is_some() {
                    bail!("NAT address {} is used twice", n.addr);
                }
            }
        }
        for (a, r) in &spec.retired_nat {
            let info = NatAddrInfo {
                service_id: r.service_id,
                slot: r.slot,
                flags: nat_addr_flags::RETIRED,
                _pad: [0; 2],
            };
            if nat_desired.insert(addr(*a), info).is_some() {
                bail!("NAT address {a} is both retired and in use");
            }
        }
        let mut nat_map: HashMap<_, Addr, NatAddrInfo> =
            HashMap::try_from(self.map_mut(map_names::NAT_ADDRS)?)?;
        sync_hash(&mut nat_map, &nat_desired)?;
        Ok(())
    }

    fn apply_endpoints(&mut self, spec: &DataplaneSpec) -> anyhow::Result<()> {
        // Every served address's entries are desired (a NAT64 endpoint's
        // IPv6 one too): whatever else the maps hold is deleted.
        let EndpointEntries {
            endpoints: desired,
            neighbours: arp,
        } = spec.endpoint_entries()?;
        let map: HashMap<_, EndpointKey, EndpointValue> =
            HashMap::try_from(self.map_mut(map_names::ENDPOINTS)?)?;
        let known: BTreeSet<u32> = map
            .iter()
            .map(|r| r.map(|(_, v)| v.endpoint_id))
            .collect::<Result<_, _>>()?;
        let fresh: BTreeSet<u32> = spec
            .endpoints
            .iter()
            .map(|e| e.id)
            .filter(|id| !known.contains(id))
            .collect();
        for id in &fresh {
            self.zero_endpoint_slots(*id)?;
        }
        // Headers before ENDPOINTS: a new endpoint's first flow finds its
        // header (the datapath reads it when a flow opens); a new endpoint
        // without one gets its slot emptied now too, should an apply that
        // failed half way have left a removed endpoint's header in it.
        self.sync_proxy_headers(spec, Some(&fresh))?;
        let mut map: HashMap<_, EndpointKey, EndpointValue> =
            HashMap::try_from(self.map_mut(map_names::ENDPOINTS)?)?;
        sync_hash(&mut map, &desired)?;
        let mut arp_map: HashMap<_, NetAddrKey, u32> =
            HashMap::try_from(self.map_mut(map_names::ARP_ENDPOINTS)?)?;
        sync_hash(&mut arp_map, &arp)?;
        // After ENDPOINTS: a flow created between the two writes carries the
        // old generation and leaves the fast path, never the reverse.
        let desired_gens: BTreeMap<u32, EndpointGen> = spec
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.id,
                    EndpointGen {
                        gen_id: endpoint_gen_id(e),
                        state: endpoint_state(e.state),
                        _pad: [0; 3],
                    },
                )
            })
            .collect();
        let cached = self.written.endpoint_gens.take();
        let mut map: Array<_, EndpointGen> = Array::try_from(self.map_mut(map_names::EP_GEN)?)?;
        let mut current = match cached {
            Some(c) => c,
            None => map.iter().collect::<Result<Vec<_>, _>>()?,
        };
        for (id, slot) in current.iter_mut().enumerate() {
            let want = desired_gens.get(&(id as u32)).copied().unwrap_or_default();
            if *slot != want {
                map.set(id as u32, want, 0)?;
                *slot = want;
            }
        }
        self.written.endpoint_gens = Some(current);
        // Emptied last: no flow of a removed endpoint, or of a service that
        // turned PROXY protocol off, opens with a stale header meanwhile;
        // and a reused id never inherits one.
        self.sync_proxy_headers(spec, None)
    }

    /// Writes `PROXY_HEADERS` as `spec` has it: with `fill` (the endpoint
    /// ids new in this apply), the slots that get a header (or another
    /// one) and the new ids' slots; without, the slots that get none.
    /// Each slot written is read back and compared (the datapath copies
    /// these bytes into flows, a torn or refused write must not pass).
    fn sync_proxy_headers(
        &mut self,
        spec: &DataplaneSpec,
        fill: Option<&BTreeSet<u32>>,
    ) -> anyhow::Result<()> {
        let cached = self.written.proxy_headers.take();
        let mut map: Array<_, ProxyHeader> =
            Array::try_from(self.map_mut(map_names::PROXY_HEADERS)?)?;
        let mut current = match cached {
            Some(c) => c,
            None => map.iter().collect::<Result<Vec<_>, _>>()?,
        };
        for (id, slot) in current.iter_mut().enumerate() {
            let id = id as u32;
            let want = spec.proxy_headers.get(&id).copied().unwrap_or_default();
            let now = match fill {
                Some(fresh) => want.len != 0 || fresh.contains(&id),
                None => want.len == 0,
            };
            if *slot == want || !now {
                continue;
            }
            map.set(id, want, 0)?;
            let back = map.get(&id, 0)?;
            ensure!(
                back == want,
                "PROXY_HEADERS[{id}] reads back other bytes than were written"
            );
            *slot = want;
        }
        self.written.proxy_headers = Some(current);
        Ok(())
    }

    /// Zeroes one slot of a per-CPU counter array.
    fn zero_counters(&mut self, map: &str, index: u32) -> anyhow::Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let mut stats: PerCpuArray<_, Counters> = PerCpuArray::try_from(self.map_mut(map)?)?;
        stats.set(
            index,
            PerCpuValues::try_from(vec![Counters::default(); cpus])?,
            0,
        )?;
        Ok(())
    }

    /// Zeroes an endpoint id's counters and cap state before the id is (re)used.
    fn zero_endpoint_slots(&mut self, id: u32) -> anyhow::Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let mut stats: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.map_mut(map_names::EP_STATS)?)?;
        stats.set(
            id,
            PerCpuValues::try_from(vec![Counters::default(); cpus])?,
            0,
        )?;
        let mut drops: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map_mut(map_names::EP_DROPS)?)?;
        for r in 0..DropReason::COUNT {
            drops.set(
                id * DropReason::COUNT + r,
                PerCpuValues::try_from(vec![0u64; cpus])?,
                0,
            )?;
        }
        let mut limits: Array<_, EpLimitState> =
            Array::try_from(self.map_mut(map_names::EP_LIMITS)?)?;
        limits.set(id, EpLimitState::default(), 0)?;
        let mut freed: Array<_, u64> = Array::try_from(self.map_mut(map_names::EP_GC_FREED)?)?;
        freed.set(id, 0, 0)?;
        Ok(())
    }
}

/// What this process wrote last (see `Dataplane::written`). Only the
/// controller writes these maps, so memory stays true to the kernel.
#[derive(Default)]
pub(crate) struct Written {
    /// The whole BACKENDS array. (Lookup tables need no cache: a changed
    /// table is written whole to a fresh region, see `apply_services`.)
    backends: Option<Vec<BackendInfo>>,
    /// The whole EP_GEN array, read once like `backends`.
    endpoint_gens: Option<Vec<EndpointGen>>,
    /// The whole PROXY_HEADERS array, read once like `backends`.
    proxy_headers: Option<Vec<ProxyHeader>>,
    /// Lookup-table regions a service stopped using, and when. A program that
    /// read the old offset just before the flip may still read the region for
    /// a moment: it is not rewritten until `LB_QUIESCE` has passed.
    freed_lb: Vec<(u32, u32, std::time::Instant)>,
}

/// How long a freed lookup-table region rests before it is rewritten: far
/// longer than one XDP program run (microseconds, preemption off).
const LB_QUIESCE: std::time::Duration = std::time::Duration::from_millis(20);

impl Written {
    /// Waits until no region overlapping `off..off+size` was freed less than
    /// `LB_QUIESCE` ago, then forgets regions that rested long enough.
    fn quiesce(&mut self, off: u32, size: u32) {
        let end = u64::from(off) + u64::from(size);
        let latest = self
            .freed_lb
            .iter()
            .filter(|(o, sz, _)| {
                u64::from(*o) < end && u64::from(*o) + u64::from(*sz) > u64::from(off)
            })
            .map(|(_, _, at)| *at)
            .max();
        if let Some(at) = latest {
            let rested = at.elapsed();
            if rested < LB_QUIESCE {
                std::thread::sleep(LB_QUIESCE - rested);
            }
        }
        self.freed_lb.retain(|(_, _, at)| at.elapsed() < LB_QUIESCE);
    }
}

/// First offset where `size` slots fit in `0..len` without overlapping `used`.
fn first_fit(used: &[(u32, u32)], size: u32, len: u32) -> Option<u32> {
    let mut regions = used.to_vec();
    regions.sort_unstable();
    let mut start = 0u32;
    for (off, sz) in regions {
        if off >= start && off - start >= size {
            return Some(start);
        }
        start = start.max(off.saturating_add(sz));
    }
    (len.checked_sub(start)? >= size).then_some(start)
}

fn endpoint_state(s: EndpointState) -> u8 {
    match s {
        EndpointState::Pending => ep_state::PENDING,
        EndpointState::Approved => ep_state::APPROVED,
        EndpointState::Rejected => ep_state::REJECTED,
        EndpointState::Removed => ep_state::REMOVED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plink_common::MAX_ENDPOINTS;

    #[test]
    fn an_endpoint_keeps_its_generation_until_its_flows_mappings_change() {
        let e = valid().endpoints[0].clone();
        let same = endpoint_gen_id(&e);
        assert_ne!(same, 0, "0 means no endpoint");
        assert_eq!(endpoint_gen_id(&e.clone()), same, "a restart keeps flows");
        // State and caps are not part of a mapping: flows stay theirs.
        let mut capped = e.clone();
        capped.max_flows += 10;
        capped.state = EndpointState::Pending;
        assert_eq!(endpoint_gen_id(&capped), same);
        let changed: Vec<EndpointSpec> = vec![
            EndpointSpec {
                service_id: e.service_id + 1,
                ..e.clone()
            },
            EndpointSpec {
                id: e.id + 1,
                ..e.clone()
            },
            EndpointSpec {
                network_id: e.network_id + 1,
                ..e.clone()
            },
            EndpointSpec {
                addr: Ipv4Addr::new(192, 0, 2, 99).into(),
                ..e.clone()
            },
            // A NAT64 address added, or another one: replies come from it.
            EndpointSpec {
                addr6: Some("2001:db8:c1::50".parse().unwrap()),
                ..e.clone()
            },
            EndpointSpec {
                addr6: Some("2001:db8:c1::51".parse().unwrap()),
                ..e.clone()
            },
            EndpointSpec {
                ports: vec![PortSpec {
                    port: 80,
                    target_port: 9999,
                }],
                ..e.clone()
            },
        ];
        for c in &changed {
            assert_ne!(endpoint_gen_id(c), same, "{c:?}");
        }
        assert_ne!(endpoint_gen_id(&changed[4]), endpoint_gen_id(&changed[5]));
        // Without addr6 the value is the one before NAT64 (an upgrade keeps
        // flows): id, network, address octets, service, protocol, ports.
        let mut h: u32 = 0x811c_9dc5;
        for b in [0u8, 0, 0, 0, 1, 0, 0, 0, 192, 0, 2, 50, 0, 0, 0, 0, 6]
            .into_iter()
            .chain(80u16.to_le_bytes())
            .chain(8080u16.to_le_bytes())
        {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        assert_eq!(same, h.max(1));
        assert_eq!(next_hop_gen(u32::MAX), 1, "the hop generation skips 0");
        assert_eq!(next_hop_gen(0), 1);
    }

    fn valid() -> DataplaneSpec {
        DataplaneSpec {
            interfaces: vec![
                InterfaceSpec {
                    ifindex: 2,
                    role: InterfaceRole::Consumer { network_id: 1 },
                    mac: [2, 0, 0, 0, 0, 1],
                    answers: AnswerPath::XdpTx,
                },
                InterfaceSpec {
                    ifindex: 3,
                    role: InterfaceRole::Provider,
                    mac: [2, 0, 0, 0, 0, 2],
                    answers: AnswerPath::XdpTx,
                },
            ],
            timeouts: TimeoutSpec::default(),
            services: vec![ServiceSpec {
                id: 0,
                nat: vec![NatSpec {
                    addr: Ipv4Addr::new(198, 51, 100, 200).into(),
                    ports: 1024..=65535,
                    draining: false,
                }],
                lookup: vec![0, NO_BACKEND, 0],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 0,
            }],
            backends: vec![BackendSpec {
                id: 0,
                service_id: 0,
                addr: Ipv4Addr::new(198, 51, 100, 10).into(),
                state: BackendState::Active,
            }],
            endpoints: vec![EndpointSpec {
                id: 0,
                network_id: 1,
                addr: Ipv4Addr::new(192, 0, 2, 50).into(),
                addr6: None,
                service_id: 0,
                protocol: Protocol::Tcp,
                ports: vec![PortSpec {
                    port: 80,
                    target_port: 8080,
                }],
                state: EndpointState::Approved,
                max_flows: 0,
                new_flows_per_sec: 0,
            }],
            retired_nat: BTreeMap::new(),
            next_hops: BTreeSet::new(),
            proxy_headers: BTreeMap::new(),
        }
    }

    #[test]
    fn validate_accepts_a_valid_spec_and_names_each_mistake() {
        valid().validate().unwrap();
        let err = |f: fn(&mut DataplaneSpec)| {
            let mut s = valid();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert!(
            err(|s| s.interfaces[0].role = InterfaceRole::Provider)
                .contains("exactly one provider")
        );
        assert!(err(|s| s.services.push(s.services[0].clone())).contains("used twice"));
        assert!(err(|s| s.services[0].nat[0].ports = 0..=10).contains("includes 0"));
        assert!(
            err(|s| s.services[0].nat = vec![s.services[0].nat[0].clone(); 9])
                .contains("at most 8")
        );
        assert!(err(|s| s.services[0].lookup.push(7)).contains("not one of its backends"));
        assert!(err(|s| s.backends[0].service_id = 5).contains("not one of its backends"));
        assert!(err(|s| s.endpoints[0].service_id = 9).contains("unknown service"));
        assert!(err(|s| s.endpoints[0].id = MAX_ENDPOINTS).contains("endpoint id"));
        assert!(err(|s| s.backends.push(s.backends[0].clone())).contains("used twice"));
        let mixed = err(|s| s.backends[0].addr = "2001:db8:100::10".parse().unwrap());
        assert!(mixed.contains("one address family"), "{mixed}");
        assert!(
            err(|s| {
                s.services[0].nat[0].addr = "2001:db8:100::200".parse().unwrap();
                s.backends[0].addr = "2001:db8:100::10".parse().unwrap();
            })
            .contains("endpoint 0 (192.0.2.50) is IPv4")
        );
        assert!(
            err(|s| s.endpoints[0].addr = "2001:db8::".parse().unwrap())
                .contains("zero interface identifier")
        );
        let mut v6 = valid();
        v6.services[0].nat[0].addr = "2001:db8:100::200".parse().unwrap();
        v6.backends[0].addr = "2001:db8:100::10".parse().unwrap();
        v6.endpoints[0].addr = "2001:db8:c1::50".parse().unwrap();
        v6.validate().unwrap();
        let header =
            plink_common::proxy::build_header(plink_common::proxy::LinkIdTlv::Azure, 1, b"")
                .unwrap();
        let mut with_header = valid();
        with_header.proxy_headers.insert(0, header);
        with_header.validate().unwrap();
        assert!(
            err(|s| {
                s.proxy_headers.insert(
                    5,
                    plink_common::proxy::build_header(plink_common::proxy::LinkIdTlv::Gcp, 1, b"")
                        .unwrap(),
                );
            })
            .contains("endpoint id 5, which no endpoint has")
        );
        assert!(
            err(|s| {
                s.proxy_headers.insert(
                    0,
                    plink_common::proxy::ProxyHeader {
                        len: 30,
                        ..Default::default()
                    },
                );
            })
            .contains("a PROXY header of 30 bytes")
        );
    }

    /// `valid()` with its endpoint dual-stack: 192.0.2.50 and, for the IPv4
    /// service through NAT64, 2001:db8:c1::50.
    fn nat64() -> DataplaneSpec {
        let mut s = valid();
        s.endpoints[0].addr6 = Some("2001:db8:c1::50".parse().unwrap());
        s
    }

    #[test]
    fn validate_accepts_nat64_and_refuses_nat46() {
        nat64()
            .validate()
            .expect("dual stack in front of an IPv4 service");
        let mut alone = valid();
        alone.endpoints[0].addr = "2001:db8:c1::50".parse().unwrap();
        alone.validate().expect("an IPv6 address alone: NAT64 too");
        let err = |f: fn(&mut DataplaneSpec)| {
            let mut s = nat64();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        // NAT46: an IPv4 endpoint address in front of an IPv6 service.
        let nat46 = err(|s| {
            s.services[0].nat[0].addr = "2001:db8:100::200".parse().unwrap();
            s.backends[0].addr = "2001:db8:100::10".parse().unwrap();
        });
        assert!(
            nat46.contains(
                "endpoint 0 (192.0.2.50) is IPv4 but NAT address 2001:db8:100::200 is IPv6"
            ),
            "{nat46}"
        );
        assert!(nat46.contains("needs NAT46"), "{nat46}");
        // The NAT address and backends still agree among themselves.
        let mixed = err(|s| s.backends[0].addr = "2001:db8:100::10".parse().unwrap());
        assert!(mixed.contains("one address family"), "{mixed}");
        // addr6 is the IPv6 address beside an IPv4 addr.
        let v4 = err(|s| s.endpoints[0].addr6 = Some(Ipv4Addr::new(192, 0, 2, 51).into()));
        assert!(
            v4.contains("addr6 192.0.2.51 beside addr 192.0.2.50"),
            "{v4}"
        );
        let two = err(|s| s.endpoints[0].addr = "2001:db8:c1::51".parse().unwrap());
        assert!(two.contains("beside an IPv4 addr"), "{two}");
        let zero = err(|s| s.endpoints[0].addr6 = Some("2001:db8::".parse().unwrap()));
        assert!(zero.contains("zero interface identifier"), "{zero}");
        // No PROXY header through NAT64.
        let pp = err(|s| {
            s.proxy_headers.insert(
                0,
                plink_common::proxy::build_header(plink_common::proxy::LinkIdTlv::Azure, 1, b"")
                    .unwrap(),
            );
        });
        assert!(
            pp.contains(
                "endpoint 0 (192.0.2.50, 2001:db8:c1::50): PROXY protocol headers are IPv4 only"
            ),
            "{pp}"
        );
        // Another endpoint on the NAT64 address and port clashes.
        let clash = err(|s| {
            let other = EndpointSpec {
                id: 1,
                addr: "2001:db8:c1::50".parse().unwrap(),
                addr6: None,
                ..s.endpoints[0].clone()
            };
            s.endpoints.push(other);
        });
        assert!(
            clash.contains("two endpoints claim [2001:db8:c1::50]:80 (Tcp) in network 1"),
            "{clash}"
        );
    }

    #[test]
    fn every_served_address_gets_its_keys_echo_and_neighbour_entry() {
        let s = nat64();
        let e = &s.endpoints[0];
        let four: IpAddr = Ipv4Addr::new(192, 0, 2, 50).into();
        let six: IpAddr = "2001:db8:c1::50".parse().unwrap();
        let entries = s.endpoint_entries().expect("entries");
        let value = |target_port: u16| EndpointValue {
            endpoint_id: 0,
            service_id: 0,
            target_port_be: target_port.to_be(),
            state: ep_state::APPROVED,
            _pad: 0,
            max_flows: 0,
            new_flows_per_sec: 0,
        };
        let tcp = plink_common::IPPROTO_TCP;
        let want: BTreeMap<EndpointKey, EndpointValue> = [
            (endpoint_key(e, four, 80, tcp), value(8080)),
            (
                endpoint_key(e, four, 0, plink_common::IPPROTO_ICMP),
                value(0),
            ),
            (endpoint_key(e, six, 80, tcp), value(8080)),
            // The IPv6 address's echo is ICMPv6, in front of an IPv4 service too.
            (
                endpoint_key(e, six, 0, plink_common::IPPROTO_ICMPV6),
                value(0),
            ),
        ]
        .into();
        assert_eq!(entries.endpoints, want);
        let neighbour = |a| NetAddrKey {
            network_id: 1,
            addr_be: addr(a),
        };
        assert_eq!(
            entries.neighbours,
            BTreeMap::from([(neighbour(four), 1), (neighbour(six), 1)])
        );
        // The table counts both addresses' entries.
        let caps = crate::plan::Capacities {
            endpoint_keys: 3,
            ..crate::plan::Capacities::BUILD
        };
        let full = s.validate_within(&caps).unwrap_err().to_string();
        assert!(full.contains("need 4 endpoint-table entries"), "{full}");
        let caps = crate::plan::Capacities {
            endpoint_addresses: 1,
            ..crate::plan::Capacities::BUILD
        };
        let full = s.validate_within(&caps).unwrap_err().to_string();
        assert!(full.contains("2 endpoint addresses"), "{full}");
        // A removed endpoint keeps its keys (its state drops the flows) but
        // neither address is answered for.
        let mut removed = nat64();
        removed.endpoints[0].state = EndpointState::Removed;
        let entries = removed.endpoint_entries().expect("entries");
        assert_eq!(entries.endpoints.len(), 4);
        assert!(entries.neighbours.is_empty());
        // A next hop (IPv4) on the endpoint's IPv4 address is still refused.
        let mut hop = nat64();
        hop.next_hops.insert((1, Ipv4Addr::new(192, 0, 2, 50)));
        let err = hop.validate().unwrap_err().to_string();
        assert!(err.contains("is also an endpoint address"), "{err}");
        // Echo at a shared IPv6 address: the approved endpoint owns it.
        let mut shared = nat64();
        shared.endpoints[0].state = EndpointState::Pending;
        shared.endpoints.push(EndpointSpec {
            id: 1,
            addr: six,
            addr6: None,
            protocol: Protocol::Udp,
            ..valid().endpoints[0].clone()
        });
        let entries = shared.endpoint_entries().expect("entries");
        let echo6 = endpoint_key(e, six, 0, plink_common::IPPROTO_ICMPV6);
        assert_eq!(entries.endpoints[&echo6].endpoint_id, 1);
        let echo4 = endpoint_key(e, four, 0, plink_common::IPPROTO_ICMP);
        assert_eq!(entries.endpoints[&echo4].endpoint_id, 0);
    }

    #[test]
    fn garp_plan_and_managed_neighbours_follow_the_spec() {
        let mut s = valid();
        s.endpoints.push(EndpointSpec {
            id: 1,
            state: EndpointState::Removed,
            addr: Ipv4Addr::new(192, 0, 2, 51).into(),
            ..s.endpoints[0].clone()
        });
        let plan = s.garp_plan();
        assert_eq!(
            plan[0].2,
            vec![IpAddr::from(Ipv4Addr::new(192, 0, 2, 50))],
            "removed endpoints are not announced"
        );
        assert_eq!(
            plan[1].2,
            vec![IpAddr::from(Ipv4Addr::new(198, 51, 100, 200))]
        );
        assert_eq!(
            s.managed_neighbours(),
            vec![(3, IpAddr::from(Ipv4Addr::new(198, 51, 100, 10)))]
        );
        // An IPv6 backend's neighbour is managed too.
        let mut both = s.clone();
        let six: IpAddr = "2001:db8:100::10".parse().unwrap();
        both.backends.push(BackendSpec {
            id: 9,
            addr: six,
            ..both.backends[0].clone()
        });
        assert_eq!(
            both.managed_neighbours(),
            vec![(3, IpAddr::from(Ipv4Addr::new(198, 51, 100, 10))), (3, six)]
        );
        s.backends[0].state = BackendState::Down;
        assert!(s.managed_neighbours().is_empty());
        // A NAT64 address is announced (a neighbour advertisement) beside
        // the IPv4 one.
        let plan = nat64().garp_plan();
        assert_eq!(
            plan[0].2,
            vec![
                IpAddr::from(Ipv4Addr::new(192, 0, 2, 50)),
                "2001:db8:c1::50".parse().unwrap()
            ]
        );
    }

    #[test]
    fn first_fit_finds_gaps() {
        assert_eq!(first_fit(&[], 10, 100), Some(0));
        assert_eq!(first_fit(&[(0, 10)], 10, 100), Some(10));
        assert_eq!(first_fit(&[(20, 10), (0, 10)], 10, 100), Some(10));
        assert_eq!(first_fit(&[(20, 10), (0, 10)], 11, 100), Some(30));
        assert_eq!(first_fit(&[(0, 95)], 10, 100), None);
    }
}
