//! The YAML configuration: schema, parsing and validation.
//!
//! The schema mirrors SPEC §4. Every struct denies unknown fields so that a
//! misspelt key is an error, never silently ignored.

mod units;

use std::{net::Ipv4Addr, net::SocketAddr, path::Path, path::PathBuf};

use serde::Deserialize;
pub use units::{HumanDuration, PortRange};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    InvalidNoLocation { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: Gateway,
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode: the fast path. The default.
    #[default]
    Native,
    /// skb mode: a fallback for NICs without native XDP (turn GRO/GSO/TSO off).
    Generic,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    pub xdp_mode: XdpMode,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
    /// The admin API's Unix socket (mode 0600).
    pub admin_socket: PathBuf,
    /// Where approval decisions persist.
    pub state_dir: PathBuf,
    /// Root of the bpffs pins; the layout version is appended.
    pub bpffs_root: PathBuf,
    pub conntrack: ConntrackConfig,
    pub timeouts: Timeouts,
}

impl Default for Gateway {
    fn default() -> Self {
        Self {
            xdp_mode: XdpMode::Native,
            metrics: SocketAddr::from(([127, 0, 0, 1], 9430)),
            admin_socket: PathBuf::from("/run/plink/plink.sock"),
            state_dir: PathBuf::from("/var/lib/plink"),
            bpffs_root: PathBuf::from("/sys/fs/bpf/plink"),
            conntrack: ConntrackConfig::default(),
            timeouts: Timeouts::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

/// Flow timeouts; defaults per RFC 5382 (TCP), 4787 (UDP) and 5508 (ICMP).
#[derive(Debug, Clone, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Consumer,
    Provider,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    pub role: Role,
    /// Consumer network id; required for consumer interfaces.
    #[serde(default)]
    pub network: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// Port on the backends; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    Draining,
    Down,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: Ipv4Addr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub state: BackendState,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatPool {
    pub addresses: Vec<Ipv4Addr>,
    #[serde(default = "default_nat_ports")]
    pub ports: PortRange,
}

fn default_nat_ports() -> PortRange {
    PortRange {
        first: 1024,
        last: 65535,
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    Tcp,
    Http,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: HealthCheckKind,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    pub interval: HumanDuration,
    pub timeout: HumanDuration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    pub ports: Vec<ServicePort>,
    pub backends: Vec<Backend>,
    pub nat: NatPool,
    #[serde(default)]
    pub visibility: Vec<String>,
    #[serde(default)]
    pub auto_approve: Vec<String>,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Maglev table size; a prime.
    #[serde(default = "default_maglev_size")]
    pub maglev_table_size: u32,
}

fn default_maglev_size() -> u32 {
    65_537
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub name: String,
    pub tenant: String,
    pub network: String,
    pub address: Ipv4Addr,
    pub service: String,
    /// Cap on live flows through this endpoint.
    #[serde(default)]
    pub max_flows: Option<u32>,
    /// Cap on new flows per second through this endpoint.
    #[serde(default)]
    pub new_flows_per_second: Option<u32>,
}

impl Config {
    /// Reads and parses a config file. Semantic validation is in `validate`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| match e.location() {
            Some(loc) => ConfigError::Invalid {
                path: path.to_owned(),
                line: loc.line(),
                column: loc.column(),
                message: e.to_string(),
            },
            None => ConfigError::InvalidNoLocation {
                path: path.to_owned(),
                message: e.to_string(),
            },
        })
    }
}
