//! The YAML configuration: schema, parsing and validation.
//!
//! The schema mirrors SPEC §4 and is documented field by field in
//! `docs/CONFIG.md`. Every struct denies unknown fields so that a misspelt
//! key is an error, never silently ignored. Loading is two passes: serde
//! checks syntax and types (and gives a position), then [`validate`] checks
//! meaning (cross references, duplicates, limits) and reports every problem
//! it finds, each mapped back to a line and column through [`positions`].

mod positions;
mod units;
mod validate;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
pub use units::{HumanDuration, PortRange};
pub use validate::MAX_NAT_ADDRESSES;

/// One problem in a config file, with the position it refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Where in the document, e.g. `services[1].nat.addresses[0]`; empty for
    /// syntax errors.
    pub yaml_path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}", render_diagnostics(path, diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

impl ConfigError {
    /// The problems found, empty for a read error.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { diagnostics, .. } => diagnostics,
        }
    }
}

fn render_diagnostics(path: &Path, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diagnostics {
        out.push_str(&format!("{}:{}:{}: ", path.display(), d.line, d.column));
        if !d.yaml_path.is_empty() {
            out.push_str(&format!("{}: ", d.yaml_path));
        }
        out.push_str(&d.message);
        out.push('\n');
    }
    let n = diagnostics.len();
    out.push_str(&format!(
        "{}: {n} error{} found",
        path.display(),
        if n == 1 { "" } else { "s" }
    ));
    out
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: Gateway,
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Route announcement through FRR (docs/FLEET.md); unset: nothing is
    /// announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<Announce>,
    /// Several gateways sharing this file (docs/FLEET.md); absent for one
    /// gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Fleet>,
    /// The node of `fleet.nodes` this config was resolved for (by
    /// [`Config::load_node`]); `None` for the shared file or no fleet.
    #[serde(skip)]
    pub node: Option<String>,
}

/// `announce:` — plink keeps a blackhole /32 route (protocol 245, the
/// configured metric) in the main table for every endpoint address it can
/// serve; FRR redistributes exactly those (`redistribute kernel route-map`
/// with `match metric N`). An address is announced while one of its
/// endpoints is approved and its service has a backend up, and the node is
/// not draining. (Kernel routes, not zebra's own: a crashed zebra leaves
/// nothing behind that a restarted one would prefer.)
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    /// The routes' metric, which FRR's route-map matches (`match metric`).
    pub metric: u32,
}

/// `fleet`: the same YAML on every gateway, plus one section per node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// The shared store of decisions and ids; without it each node keeps its
    /// own `state.json` (decisions are then not shared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdConfig>,
    /// Every gateway of the fleet; a node picks its own by name.
    pub nodes: Vec<FleetNode>,
}

/// `fleet.etcd`: where approval decisions and stable ids live for a fleet.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://198.51.100.2:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet's keys (several fleets may share one etcd).
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Deadline of one request (connect, read, transaction) to etcd.
    #[serde(default = "default_etcd_timeout")]
    pub timeout: HumanDuration,
}

fn default_etcd_prefix() -> String {
    "/plink".into()
}
fn default_etcd_timeout() -> HumanDuration {
    HumanDuration::from_secs(2)
}

/// `fleet.nodes[]`: what differs between gateways. Extended by the routing
/// part (announcement) under `routing`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetNode {
    /// The node's name; `plink-ctl run --node NAME` (or `PLINK_NODE`, or
    /// the host name) selects it.
    pub name: String,
    /// The node's own NAT addresses, per service: every service needs an
    /// entry on every node, and no two nodes share an address, so that a
    /// provider reply comes back to the node holding the flow.
    #[serde(default)]
    pub nat: Vec<NodeNat>,
    /// The node's routing identity (used by the announcement part).
    #[serde(default)]
    pub routing: NodeRouting,
}

/// `fleet.nodes[].nat[]`: one service's NAT addresses on one node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeNat {
    pub service: String,
    #[serde(deserialize_with = "ip_list")]
    pub addresses: Vec<IpAddr>,
}

/// `fleet.nodes[].routing`: how the node is known to routers.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeRouting {
    /// BGP router id of the node's FRR.
    #[serde(default, deserialize_with = "ipv4_opt")]
    pub router_id: Option<Ipv4Addr>,
    /// The next-hop address the node announces its endpoints with.
    #[serde(default, deserialize_with = "ipv4_opt")]
    pub next_hop: Option<Ipv4Addr>,
}

impl Config {
    /// This node's section, once resolved by [`Config::load_node`].
    pub fn this_node(&self) -> Option<&FleetNode> {
        let name = self.node.as_deref()?;
        self.fleet.as_ref()?.nodes.iter().find(|n| n.name == name)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode: the fast path. The default.
    #[default]
    Native,
    /// skb mode: a fallback for NICs without native XDP (turn GRO/GSO/TSO off).
    Generic,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    pub xdp_mode: XdpMode,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
    /// The admin API's Unix socket (mode 0600).
    pub admin_socket: PathBuf,
    /// Where approval decisions and id assignments persist.
    pub state_dir: PathBuf,
    /// Root of the bpffs pins; the layout version is appended.
    pub bpffs_root: PathBuf,
    pub conntrack: ConntrackConfig,
    pub timeouts: Timeouts,
    /// Per-endpoint caps applied where an endpoint sets none.
    pub endpoint_defaults: EndpointDefaults,
    /// Where the event log (docs/EVENTS.md) is written: an absolute file
    /// path or `stdout`. Unset: events are kept in memory only (for
    /// `plink-ctl events`).
    pub event_log: Option<EventLogTarget>,
    /// Where flow logs (the datapath's per-flow records of services with
    /// `flow_logs`) are exported; none: not collected.
    pub flow_logs: Option<FlowLogExport>,
}

impl Default for Gateway {
    fn default() -> Self {
        Self {
            xdp_mode: XdpMode::Native,
            metrics: SocketAddr::from(([127, 0, 0, 1], 9430)),
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            state_dir: PathBuf::from("/var/lib/plink"),
            bpffs_root: PathBuf::from("/sys/fs/bpf/plink"),
            conntrack: ConntrackConfig::default(),
            timeouts: Timeouts::default(),
            endpoint_defaults: EndpointDefaults::default(),
            event_log: None,
            flow_logs: None,
        }
    }
}

/// `gateway.event_log`: a file (opened for appending) or stdout (for
/// journald under systemd). Any string other than `stdout` is a path; the
/// validation requires it to be absolute.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(from = "String", into = "String")]
pub enum EventLogTarget {
    Stdout,
    File(PathBuf),
}

impl From<String> for EventLogTarget {
    fn from(s: String) -> Self {
        if s == "stdout" {
            EventLogTarget::Stdout
        } else {
            EventLogTarget::File(PathBuf::from(s))
        }
    }
}

impl From<EventLogTarget> for String {
    fn from(t: EventLogTarget) -> Self {
        match t {
            EventLogTarget::Stdout => "stdout".into(),
            EventLogTarget::File(p) => p.display().to_string(),
        }
    }
}

/// Where the admin socket is when no config says otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/plink/plink.sock";
/// Largest config accepted (a config of 4,095 endpoints is about 400 KB):
/// input is bounded before it is indexed.
pub const MAX_CONFIG_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Maximum number of flows (each flow takes a forward and a reverse entry).
    pub max_flows: u32,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self { max_flows: 262_144 }
    }
}

/// Per-endpoint caps, so that one consumer cannot exhaust a service's NAT
/// pool or the conntrack table.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointLimits {
    /// Live flows through one endpoint.
    pub max_flows: u32,
    /// New flows per second through one endpoint.
    pub new_flows_per_second: u32,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        Self {
            max_flows: 65_536,
            new_flows_per_second: 10_000,
        }
    }
}

/// `gateway.endpoint_defaults`: caps for endpoints that set none.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointDefaults {
    /// Live flows through one endpoint. Unset: the endpoint's fair share of
    /// its service's NAT pool and of the conntrack table
    /// ([`fair_max_flows`]), so that no consumer can take the ports or table
    /// room another one needs.
    pub max_flows: Option<u32>,
    /// New flows per second through one endpoint.
    pub new_flows_per_second: u32,
}

impl Default for EndpointDefaults {
    fn default() -> Self {
        Self {
            max_flows: None,
            new_flows_per_second: EndpointLimits::default().new_flows_per_second,
        }
    }
}

/// The live-flow cap of an endpoint for which neither it nor the gateway
/// sets one: its share of three quarters of its service's NAT ports (per
/// protocol: `pool_ports`, shared by `service_endpoints`) and of the
/// conntrack table (`conntrack`, shared by `all_endpoints`), at most 65536.
/// NAT port probing starts refusing at about 80% use, so with every
/// endpoint at its cap a new consumer still finds ports.
pub fn fair_max_flows(
    pool_ports: u64,
    service_endpoints: u64,
    conntrack: u64,
    all_endpoints: u64,
) -> u32 {
    let share = |total: u64, n: u64| total.saturating_mul(3) / 4 / n.max(1);
    let cap = share(pool_ports, service_endpoints)
        .min(share(conntrack, all_endpoints))
        .min(u64::from(EndpointLimits::default().max_flows))
        .max(1);
    u32::try_from(cap).unwrap_or(u32::MAX)
}

impl Service {
    /// NAT ports of this service per protocol: addresses × range size.
    pub fn nat_pool_ports(&self) -> u64 {
        let range = u64::from(self.nat.ports.last) - u64::from(self.nat.ports.first) + 1;
        range * self.nat.addresses.len() as u64
    }
}

impl Config {
    /// The caps of endpoint `e` as the datapath applies them.
    pub fn endpoint_limits(&self, e: &Endpoint) -> EndpointLimits {
        let d = &self.gateway.endpoint_defaults;
        let fair = || {
            let pool = self
                .services
                .iter()
                .find(|s| s.name == e.service)
                .map(Service::nat_pool_ports)
                .unwrap_or(0);
            let sharing = self
                .endpoints
                .iter()
                .filter(|o| o.service == e.service)
                .count() as u64;
            fair_max_flows(
                pool,
                sharing,
                u64::from(self.gateway.conntrack.max_flows),
                self.endpoints.len() as u64,
            )
        };
        EndpointLimits {
            max_flows: e.max_flows.or(d.max_flows).unwrap_or_else(fair),
            new_flows_per_second: e.new_flows_per_second.unwrap_or(d.new_flows_per_second),
        }
    }
}

/// Flow timeouts; defaults per RFC 5382 (TCP), 4787 (UDP) and 5508 (ICMP).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub tcp_established: HumanDuration,
    pub tcp_transitory: HumanDuration,
    pub udp: HumanDuration,
    pub icmp: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: HumanDuration::from_secs(2 * 3600 + 4 * 60),
            tcp_transitory: HumanDuration::from_secs(4 * 60),
            udp: HumanDuration::from_secs(2 * 60),
            icmp: HumanDuration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Consumer,
    Provider,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Consumer => "consumer",
            Role::Provider => "provider",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    pub role: Role,
    /// Consumer network name; required for consumer interfaces, refused on
    /// the provider interface.
    #[serde(default)]
    pub network: Option<String>,
    /// Consumer interfaces only: the address this node gives its router as
    /// the BGP next hop on this link (docs/FLEET.md). XDP answers ARP for it
    /// and nothing else; the interface still carries no address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// Port on the backends; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new flows.
    #[default]
    Active,
    /// Keeps its flows, takes no new ones.
    Draining,
    /// Takes nothing; its flows are reset.
    Down,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Down => "down",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    #[serde(deserialize_with = "ip")]
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub state: BackendState,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatPool {
    /// Required for one gateway; left out in a fleet, where each node lists
    /// its own under `fleet.nodes[].nat`.
    #[serde(default, deserialize_with = "ip_list")]
    pub addresses: Vec<IpAddr>,
    #[serde(default = "default_nat_ports")]
    pub ports: PortRange,
}

fn default_nat_ports() -> PortRange {
    PortRange {
        first: 1024,
        last: 65535,
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// A TCP connect to the backend.
    Tcp,
    /// An HTTP GET that must answer 2xx or 3xx.
    Http,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: HealthCheckKind,
    /// HTTP path; only for `type: http`, defaults to `/`.
    #[serde(default)]
    pub path: Option<String>,
    /// Port to probe; defaults to the service's first target port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_hc_interval")]
    pub interval: HumanDuration,
    #[serde(default = "default_hc_timeout")]
    pub timeout: HumanDuration,
    #[serde(default = "default_hc_threshold")]
    pub rise: u32,
    #[serde(default = "default_hc_threshold")]
    pub fall: u32,
}

fn default_hc_interval() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_hc_timeout() -> HumanDuration {
    HumanDuration::from_secs(2)
}
fn default_hc_threshold() -> u32 {
    2
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    pub ports: Vec<ServicePort>,
    pub backends: Vec<Backend>,
    pub nat: NatPool,
    /// Tenants that may have endpoints to this service; `*` for all.
    #[serde(default)]
    pub visibility: Vec<String>,
    /// Visible tenants whose endpoints are approved without an admin; `*` for all.
    #[serde(default)]
    pub auto_approve: Vec<String>,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Maglev table size; a prime.
    #[serde(default = "default_maglev_size")]
    pub maglev_table_size: u32,
    /// TCP MSS clamping on SYN and SYN-ACK; off when absent.
    #[serde(default)]
    pub mss_clamp: Option<MssClamp>,
    /// Flow logs of this service's flows (exported as `gateway.flow_logs`
    /// says); off when absent.
    #[serde(default)]
    pub flow_logs: Option<ServiceFlowLogs>,
    /// A PROXY protocol header in front of each flow's first client bytes
    /// (TCP only); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// `services[].proxy_protocol`: the backends learn each flow's client
/// address and port and its endpoint's link id from a PROXY protocol header.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocol {
    /// The protocol version; only 2 (the binary header) is supported,
    /// `validate` says so for any other.
    pub version: u64,
    /// How the endpoint's link id is carried.
    pub link_id_tlv: LinkIdTlvKind,
}

/// `proxy_protocol.link_id_tlv`: the TLV carrying the endpoint's link id,
/// as one of the clouds writes it, or a custom type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkIdTlvKind {
    /// Azure Private Link's 0xEE TLV (the link id, little-endian).
    Azure,
    /// AWS PrivateLink's 0xEA TLV (the endpoint's name as the id string).
    Aws,
    /// GCP Private Service Connect's 0xE0 TLV (the link id as 8 bytes).
    Gcp,
    /// A type of its own (`validate` checks 0xE0-0xEF), the link id as 4
    /// bytes big-endian.
    Custom(u64),
}

const LINK_ID_TLV_HINT: &str =
    "write azure, aws, gcp, or a custom TLV type from 0xE0 to 0xEF (e.g. 0xE5)";

impl LinkIdTlvKind {
    /// The datapath's encoding; `None` for a custom type out of range
    /// (which validation refuses).
    pub fn kernel(self) -> Option<plink_common::proxy::LinkIdTlv> {
        use plink_common::proxy::{LinkIdTlv, tlv};
        Some(match self {
            LinkIdTlvKind::Azure => LinkIdTlv::Azure,
            LinkIdTlvKind::Aws => LinkIdTlv::Aws,
            LinkIdTlvKind::Gcp => LinkIdTlv::Gcp,
            LinkIdTlvKind::Custom(n) => {
                let ty = u8::try_from(n).ok()?;
                if !(tlv::CUSTOM_MIN..=tlv::CUSTOM_MAX).contains(&ty) {
                    return None;
                }
                LinkIdTlv::Custom(ty)
            }
        })
    }
}

impl fmt::Display for LinkIdTlvKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkIdTlvKind::Azure => f.write_str("azure"),
            LinkIdTlvKind::Aws => f.write_str("aws"),
            LinkIdTlvKind::Gcp => f.write_str("gcp"),
            LinkIdTlvKind::Custom(n) => write!(f, "{n:#04X}"),
        }
    }
}

impl Serialize for LinkIdTlvKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for LinkIdTlvKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = LinkIdTlvKind;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("azure, aws, gcp, or a TLV type 0xE0-0xEF")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<LinkIdTlvKind, E> {
                Ok(LinkIdTlvKind::Custom(n))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<LinkIdTlvKind, E> {
                u64::try_from(n).map(LinkIdTlvKind::Custom).map_err(|_| {
                    E::custom(format!("invalid link_id_tlv \"{n}\": {LINK_ID_TLV_HINT}"))
                })
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LinkIdTlvKind, E> {
                let t = v.trim();
                let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"));
                let parsed = match (t, hex) {
                    ("azure", _) => Some(LinkIdTlvKind::Azure),
                    ("aws", _) => Some(LinkIdTlvKind::Aws),
                    ("gcp", _) => Some(LinkIdTlvKind::Gcp),
                    (_, Some(h)) => u64::from_str_radix(h, 16).ok().map(LinkIdTlvKind::Custom),
                    _ => t.parse().ok().map(LinkIdTlvKind::Custom),
                };
                parsed.ok_or_else(|| {
                    E::custom(format!("invalid link_id_tlv {v:?}: {LINK_ID_TLV_HINT}"))
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `services[].flow_logs`: which of the service's flows are logged.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceFlowLogs {
    /// One flow in `sample` is logged (1 = every flow), picked by the flow
    /// hash so that a logged flow has its start and its end record.
    pub sample: u32,
}

/// `gateway.flow_logs`: where flow-log records go, and the datapath ring.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlowLogExport {
    /// IPFIX collector (`address:port`, UDP).
    #[serde(default)]
    pub ipfix: Option<SocketAddr>,
    /// JSON-lines file (absolute path, appended to).
    #[serde(default)]
    pub json: Option<PathBuf>,
    /// Size of the datapath's ring buffer in bytes: a power of two, at
    /// least 4096 (restart only).
    #[serde(default = "default_flow_log_ring_bytes")]
    pub ring_bytes: u32,
    /// IPFIX observation domain id.
    #[serde(default)]
    pub observation_domain: u32,
}

fn default_flow_log_ring_bytes() -> u32 {
    plink_common::DEFAULT_FLOW_LOG_RING_BYTES
}

/// `mss_clamp` of a TCP service: the largest MSS option a SYN or SYN-ACK
/// keeps through plink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MssClamp {
    /// The smaller MTU of the two interfaces a segment crosses, minus 40
    /// (IPv4 and TCP headers), read by the datapath per segment.
    Auto,
    /// A fixed MSS in bytes; `validate` checks the range.
    Bytes(u64),
}

impl fmt::Display for MssClamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MssClamp::Auto => f.write_str("auto"),
            MssClamp::Bytes(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for MssClamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MssClamp::Auto => s.serialize_str("auto"),
            MssClamp::Bytes(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for MssClamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MssClamp;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`auto` or an MSS in bytes, e.g. 1360")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<MssClamp, E> {
                Ok(MssClamp::Bytes(n))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<MssClamp, E> {
                u64::try_from(n).map(MssClamp::Bytes).map_err(|_| {
                    E::custom(format!(
                        "invalid mss_clamp \"{n}\": write `auto` or an MSS in bytes, e.g. 1360"
                    ))
                })
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MssClamp, E> {
                if v.trim() == "auto" {
                    return Ok(MssClamp::Auto);
                }
                Err(E::custom(format!(
                    "invalid mss_clamp {v:?}: write `auto` or an MSS in bytes, e.g. 1360"
                )))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn default_maglev_size() -> u32 {
    65_537
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub name: String,
    pub tenant: String,
    pub network: String,
    /// The endpoint's address, IPv4 or IPv6.
    #[serde(deserialize_with = "ip")]
    pub address: IpAddr,
    /// A dual-stack endpoint's IPv6 address, beside an IPv4 `address`: one
    /// endpoint (one decision, caps, link id) reachable on both. Parsed as
    /// any family so that `validate` can say where an IPv4 one is wrong.
    #[serde(
        default,
        deserialize_with = "ip_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub address6: Option<IpAddr>,
    pub service: String,
    /// Cap on live flows through this endpoint; default `gateway.endpoint_defaults`.
    #[serde(default)]
    pub max_flows: Option<u32>,
    /// Cap on new flows per second; default `gateway.endpoint_defaults`.
    #[serde(default)]
    pub new_flows_per_second: Option<u32>,
    /// The link id its service's PROXY protocol header carries (1 to
    /// 4294967295, unique); unset: the one plink allocated and keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<u64>,
}

/// Parses an IPv4 address with a message that says how to write one.
fn parse_ipv4<E: serde::de::Error>(s: &str) -> Result<Ipv4Addr, E> {
    s.trim().parse().map_err(|_| {
        E::custom(format!(
            "invalid IPv4 address {s:?}: write four decimal numbers 0-255 separated by dots, e.g. 198.51.100.10 (IPv6 is not supported here yet)"
        ))
    })
}

/// Parses an IPv4 or IPv6 address with a message that says how to write one.
fn parse_ip<E: serde::de::Error>(s: &str) -> Result<IpAddr, E> {
    s.trim().parse().map_err(|_| {
        E::custom(format!(
            "invalid IP address {s:?}: write an IPv4 address (four decimal numbers 0-255 separated by dots, e.g. 198.51.100.10) or an IPv6 address (e.g. 2001:db8::10)"
        ))
    })
}

fn ip<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_ip(&s)
}

fn ip_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_ip(&s).map(Some)
}

fn ipv4_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_ipv4(&s).map(Some)
}

fn ip_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    // Each element goes through `parse_ip` for the helpful message; serde
    // then reports the sequence's position, the validator cannot help here.
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .enumerate()
        .map(|(i, s)| parse_ip::<D::Error>(s).map_err(|e| D::Error::custom(format!("[{i}]: {e}"))))
        .collect()
}

/// The address family of a service, set by its backends and NAT addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(a: &IpAddr) -> Family {
        match a {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

impl Service {
    /// The service's family: its first backend's (validation makes every
    /// backend and NAT address agree), else its first NAT address's, else
    /// IPv4.
    pub fn family(&self) -> Family {
        self.backends
            .first()
            .map(|b| b.address)
            .or_else(|| self.nat.addresses.first().copied())
            .map_or(Family::Ipv4, |a| Family::of(&a))
    }
}

impl Endpoint {
    /// The endpoint's addresses: `address`, then a dual-stack `address6`.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.address).chain(self.address6)
    }

    /// The addresses this endpoint is served on, for a service of `family`:
    /// every address in front of an IPv4 service (an IPv6 one through
    /// NAT64), only IPv6 ones in front of an IPv6 service (NAT46 is refused).
    pub fn served_addresses(&self, family: Family) -> Vec<IpAddr> {
        served(self.addresses(), family)
    }
}

/// The addresses of `addresses` an endpoint serves a service of `family`
/// on (see [`Endpoint::served_addresses`]).
pub fn served(addresses: impl Iterator<Item = IpAddr>, family: Family) -> Vec<IpAddr> {
    addresses
        .filter(|a| family == Family::Ipv4 || Family::of(a) == Family::Ipv6)
        .collect()
}

/// Why an IPv6 address cannot be a host's (an endpoint, backend or NAT
/// address), or `None` if it can.
pub fn v6_not_a_host(a: &Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    Some(if a.is_unspecified() {
        "the unspecified address"
    } else if a.is_loopback() {
        "the loopback address"
    } else if a.is_multicast() {
        "a multicast address"
    } else if s[0] & 0xffc0 == 0xfe80 {
        "a link-local address (fe80::/10), which names no host beyond one link"
    } else if a.to_ipv4_mapped().is_some() {
        "an IPv4-mapped address (::ffff:0:0/96): write the IPv4 address itself"
    } else if s[..6].iter().all(|&w| w == 0) {
        "an IPv4-compatible address (::/96, deprecated by RFC 4291): write the IPv4 address itself"
    } else if s[2..].iter().all(|&w| w == 0) {
        // plink-common `Addr`: such an address would read as an IPv4 one.
        "a Subnet-Router anycast address (its last 96 bits are zero), never a host's"
    } else {
        return None;
    })
}

impl Config {
    /// Slots of the shared backend lookup table this config needs: room for
    /// two tables per service (a changed table is written to a free region
    /// and the service flipped to it), at least the default size. The table
    /// is sized once, at start; a reload must fit in it.
    pub fn lb_table_slots(&self) -> u64 {
        self.services
            .iter()
            .map(|s| u64::from(s.maglev_table_size) * 2)
            .sum::<u64>()
            .max(u64::from(plink_common::DEFAULT_LB_TABLE_ENTRIES))
    }

    /// Reads, parses and validates a config file (at most `MAX_CONFIG_BYTES`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read = |cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        // Bounded before reading: one byte more than allowed says "too big".
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(file, MAX_CONFIG_BYTES as u64 + 1),
            &mut text,
        )
        .map_err(read)?;
        Self::parse(path, &text)
    }

    /// Like [`Config::load`], then resolved for one node of a fleet: the
    /// node named `node`, or (`None`) the one named like this host. Each
    /// service's NAT addresses become the node's own. A config without a
    /// `fleet` is returned as it is (naming a node is then an error).
    pub fn load_node(path: &Path, node: Option<&str>) -> Result<Config, ConfigError> {
        let read = |cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(file, MAX_CONFIG_BYTES as u64 + 1),
            &mut text,
        )
        .map_err(read)?;
        Self::parse_node(path, &text, node)
    }

    /// [`Config::parse`] and node selection, as [`Config::load_node`].
    pub fn parse_node(path: &Path, text: &str, node: Option<&str>) -> Result<Config, ConfigError> {
        let config = Self::parse(path, text)?;
        let invalid = |yaml_path: &str, message: String| {
            let (line, column) = positions::PositionIndex::build(text)
                .map(|i| i.locate(yaml_path))
                .unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_owned(),
                diagnostics: vec![Diagnostic {
                    line,
                    column,
                    yaml_path: yaml_path.to_owned(),
                    message,
                }],
            }
        };
        let Some(fleet) = &config.fleet else {
            return match node {
                Some(n) => Err(invalid(
                    "",
                    format!(
                        "node {n:?} was asked for (--node or PLINK_NODE) but this config has no `fleet` section: leave the node out, or add `fleet.nodes` (docs/FLEET.md)"
                    ),
                )),
                None => Ok(config),
            };
        };
        let (name, from) = match node {
            Some(n) => (n.to_owned(), "--node or PLINK_NODE"),
            None => (short_hostname(), "the host name"),
        };
        let Some(index) = fleet.nodes.iter().position(|n| n.name == name) else {
            let known: Vec<&str> = fleet.nodes.iter().map(|n| n.name.as_str()).collect();
            return Err(invalid(
                "fleet.nodes",
                format!(
                    "no node named {name:?} (from {from}) in fleet.nodes ({}): pass `--node NAME` (or PLINK_NODE) naming this gateway's section",
                    known.join(", ")
                ),
            ));
        };
        Ok(config.resolved_for(index))
    }

    /// The config as node `fleet.nodes[index]` runs it: each service's NAT
    /// addresses are the node's. `index` must be in range.
    fn resolved_for(mut self, index: usize) -> Config {
        let Some(node) = self
            .fleet
            .as_ref()
            .and_then(|f| f.nodes.get(index))
            .cloned()
        else {
            return self;
        };
        for s in &mut self.services {
            s.nat.addresses = node
                .nat
                .iter()
                .filter(|n| n.service == s.name)
                .flat_map(|n| n.addresses.iter().copied())
                .collect();
        }
        self.node = Some(node.name);
        self
    }

    /// Parses and validates config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |diagnostics| ConfigError::Invalid {
            path: path.to_owned(),
            diagnostics,
        };
        if text.len() > MAX_CONFIG_BYTES {
            return Err(invalid(vec![Diagnostic {
                line: 1,
                column: 1,
                yaml_path: String::new(),
                message: format!(
                    "the config is larger than {MAX_CONFIG_BYTES} bytes, which no plink config needs"
                ),
            }]));
        }
        // The marked parser runs first: it locates syntax errors precisely
        // (serde_yaml may report a type error found before a later syntax
        // error), and its index locates everything else.
        let index = positions::PositionIndex::build(text).map_err(|e| {
            invalid(vec![Diagnostic {
                line: e.line,
                column: e.column,
                yaml_path: String::new(),
                message: format!(
                    "YAML syntax error: {}; check the indentation, the colons after keys and that every [ and {{ is closed",
                    e.message
                ),
            }])
        })?;
        let config: Config =
            serde_yaml::from_str(text).map_err(|e| invalid(vec![serde_diagnostic(&e, &index)]))?;
        let problems = validate::validate(&config);
        if problems.is_empty() {
            return Ok(config);
        }
        let mut diagnostics: Vec<Diagnostic> = problems
            .into_iter()
            .map(|p| {
                let (line, column) = index.locate(&p.path);
                Diagnostic {
                    line,
                    column,
                    yaml_path: p.path,
                    message: p.message,
                }
            })
            .collect();
        // In document order, as an editor would walk them.
        diagnostics.sort_by_key(|d| (d.line, d.column));
        Err(invalid(diagnostics))
    }
}

/// This host's name up to the first dot, as `--node` defaults to it.
pub fn short_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates (we take up to the first NUL either way).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let full = String::from_utf8_lossy(&buf[..end]).into_owned();
    full.split('.').next().unwrap_or("").to_owned()
}

/// Turns a serde_yaml error into a diagnostic: its message without the
/// trailing position, which the diagnostic carries instead.
fn serde_diagnostic(e: &serde_yaml::Error, index: &positions::PositionIndex) -> Diagnostic {
    let full = e.to_string();
    let message = match full.find(" at line ") {
        Some(at) => {
            // Keep what follows the position (libyaml adds context like
            // ", while parsing a block mapping ...").
            let rest = &full[at + 1..];
            let tail = rest.find(", ").map(|i| &rest[i..]).unwrap_or("");
            format!("{}{}", &full[..at], tail)
        }
        None => full,
    };
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    // serde_yaml prefixes the document path as "a.b[0].c: "; split it off so
    // the diagnostic renders the same way as the validator's.
    let (yaml_path, message) = match message.split_once(": ") {
        Some((p, m)) if looks_like_yaml_path(p) => (p.to_owned(), m.to_owned()),
        _ => (String::new(), message),
    };
    // For a value our parsers refused (`invalid IPv4 address "x"`), serde
    // points at the enclosing mapping; the index finds the value itself.
    if let Some(bad) = quoted_value(&message)
        && let Some((path, (line, column))) = index.find_scalar(&yaml_path, bad)
    {
        return Diagnostic {
            line,
            column,
            yaml_path: path.to_owned(),
            message: hint_for_serde(message),
        };
    }
    Diagnostic {
        line,
        column,
        yaml_path,
        message: hint_for_serde(message),
    }
}

/// The first double-quoted string in a message, as our parse errors write
/// the offending value.
fn quoted_value(message: &str) -> Option<&str> {
    let start = message.find('"')? + 1;
    let len = message[start..].find('"')?;
    Some(&message[start..start + len])
}

fn looks_like_yaml_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'))
}

/// Adds a fix to serde's terse messages where it has none.
fn hint_for_serde(message: String) -> String {
    if message.starts_with("unknown field") {
        format!(
            "{message}; fix the spelling or remove the field (docs/CONFIG.md lists every field)"
        )
    } else if message.starts_with("missing field") {
        format!("{message}; add it (docs/CONFIG.md lists every field)")
    } else if message.starts_with("unknown variant") {
        format!("{message}; use one of the listed values")
    } else {
        message
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fleet_tests;

#[cfg(test)]
mod ipv6_tests;
