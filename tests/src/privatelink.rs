//! The reference Private Link topology used by end-to-end tests and the demo.
//!
//! ```text
//!   ca 192.0.2.1 ──(eth0)──── c1 ┐                        ┌ 198.51.100.10  orders:8080
//!                   vnet-a       │                        │ 198.51.100.11  orders:8080
//!   cr 203.0.113.10 ── ra ─── c3 ┤ gw ── p0 ──── eth0 pv ─┤ 198.51.100.12  billing:8080
//!       (behind a router)        │  198.51.100.254        │ 198.51.100.20  dns:5353
//!   cb 192.0.2.1 ──(eth0)──── c2 ┘                        └
//!                   vnet-b
//! ```
//!
//! Both consumer networks use 192.0.2.0/24 and the same client address. In
//! vnet-a the endpoint 192.0.2.50:80 is the `orders` service; in vnet-b the
//! same address and port is `billing`. 192.0.2.53:53/udp is `dns` in both.
//! Consumer interfaces carry no gateway address and have forwarding off.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Context as _;

use crate::{
    gateway::{self, Gateway},
    netns::{Host, Topology},
    servers::{self, Server},
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const ROUTED_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const ENDPOINT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
pub const DNS_ENDPOINT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
pub const ORDERS_BACKENDS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 10),
    Ipv4Addr::new(198, 51, 100, 11),
];
pub const BILLING_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 12);
pub const DNS_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
pub const GATEWAY_PROVIDER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
pub const ORDERS_NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
pub const BILLING_NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 201);
pub const DNS_NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 202);

/// Knobs of the reference config.
#[derive(Clone, Debug)]
pub struct Options {
    /// Appended to the `gateway:` section (e.g. short timeouts), indented.
    pub gateway_extra: String,
    /// Owner of `billing-b`: `tenant-b` is auto-approved, others start pending.
    pub billing_b_tenant: String,
    /// NAT port range of the `dns` service.
    pub dns_nat_ports: String,
    /// Backends of the `dns` service (a YAML flow list).
    pub dns_backends: String,
    /// Extra lines of the `orders` service (e.g. a `health_check`), indented.
    pub orders_extra: String,
    /// Extra lines of the `billing` service, indented.
    pub billing_extra: String,
    /// Extra lines of the `dns` service, indented.
    pub dns_extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            gateway_extra: String::new(),
            billing_b_tenant: "tenant-b".into(),
            dns_nat_ports: "20000-29999".into(),
            dns_backends: "[{address: 198.51.100.20}]".into(),
            orders_extra: String::new(),
            billing_extra: String::new(),
            dns_extra: String::new(),
        }
    }
}

/// Services and endpoints of the reference topology.
pub fn config(topo: &Topology, opts: &Options) -> anyhow::Result<String> {
    let gateway_extra = &opts.gateway_extra;
    let orders_b_tenant = &opts.billing_b_tenant;
    let dns_nat_ports = &opts.dns_nat_ports;
    let dns_backends = &opts.dns_backends;
    let orders_extra = &opts.orders_extra;
    let billing_extra = &opts.billing_extra;
    let dns_extra = &opts.dns_extra;
    Ok(format!(
        "{gw}{gateway_extra}\
interfaces:
  - {{name: c1, role: consumer, network: vnet-a}}
  - {{name: c3, role: consumer, network: vnet-a}}
  - {{name: c2, role: consumer, network: vnet-b}}
  - {{name: p0, role: provider}}
services:
  - name: orders
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: 198.51.100.10}}, {{address: 198.51.100.11}}]
    nat: {{addresses: [198.51.100.200], ports: 20000-29999}}
    visibility: [tenant-a, tenant-b]
    auto_approve: [tenant-a]
{orders_extra}  - name: billing
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: 198.51.100.12}}]
    nat: {{addresses: [198.51.100.201], ports: 20000-29999}}
    visibility: ['*']
    auto_approve: [tenant-b]
{billing_extra}  - name: dns
    protocol: udp
    ports: [{{port: 53, target_port: 5353}}]
    backends: {dns_backends}
    nat: {{addresses: [198.51.100.202], ports: {dns_nat_ports}}}
    visibility: ['*']
    auto_approve: ['*']
{dns_extra}endpoints:
  - {{name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}}
  - {{name: billing-b, tenant: {orders_b_tenant}, network: vnet-b, address: 192.0.2.50, service: billing}}
  - {{name: dns-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.53, service: dns}}
  - {{name: dns-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.53, service: dns}}
",
        gw = gateway::gateway_section(topo)?
    ))
}

/// What the far ends of the gateway's veths run, which decides whether
/// frames XDP sends into the pair are delivered (SPEC §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FarEnds {
    /// A pass-everything XDP program (NAPI through XDP).
    Xdp,
    /// GRO on and no XDP program: what the README tells users to set up,
    /// and what containers' veths often are.
    GroOnly,
}

/// Runs each named test body (`fn name(far: FarEnds)`) on both far-end
/// set-ups, as `xdp_peers::name` and `gro_peers::name`.
#[macro_export]
macro_rules! on_both_far_ends {
    ($($name:ident),* $(,)?) => {
        mod xdp_peers {
            $(#[test]
            fn $name() {
                super::$name($crate::privatelink::FarEnds::Xdp)
            })*
        }
        mod gro_peers {
            $(#[test]
            fn $name() {
                super::$name($crate::privatelink::FarEnds::GroOnly)
            })*
        }
    };
}

/// The hosts of the reference topology.
pub struct PrivateLink {
    pub topo: Topology,
    pub consumer_a: Host,
    pub consumer_b: Host,
    pub router_a: Host,
    pub routed_client: Host,
    pub gw: Host,
    pub provider: Host,
    pub servers: Vec<Server>,
}

impl PrivateLink {
    /// Builds the namespaces, links, addresses and servers (plink not
    /// started), with XDP programs on the far ends.
    pub fn build() -> anyhow::Result<Self> {
        Self::build_with(FarEnds::Xdp)
    }

    /// Like [`PrivateLink::build`], with the far ends set up as `far`.
    pub fn build_with(far: FarEnds) -> anyhow::Result<Self> {
        let mut topo = Topology::new()?;
        let consumer_a = topo.host("ca")?;
        let consumer_b = topo.host("cb")?;
        let router_a = topo.host("ra")?;
        let routed_client = topo.host("cr")?;
        let gw = topo.host("gw")?;
        let provider = topo.host("pv")?;
        topo.link(&consumer_a, "eth0", &gw, "c1")?;
        topo.link(&consumer_b, "eth0", &gw, "c2")?;
        topo.link(&router_a, "eth0", &gw, "c3")?;
        topo.link(&routed_client, "eth0", &router_a, "eth1")?;
        topo.link(&gw, "p0", &provider, "eth0")?;

        for c in [&consumer_a, &consumer_b] {
            c.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
        }
        router_a.ip(&["addr", "add", "192.0.2.2/24", "dev", "eth0"])?;
        router_a.ip(&["addr", "add", "203.0.113.1/24", "dev", "eth1"])?;
        router_a.sysctl("net.ipv4.ip_forward", "1")?;
        routed_client.ip(&["addr", "add", "203.0.113.10/24", "dev", "eth0"])?;
        routed_client.ip(&["route", "add", "default", "via", "203.0.113.1"])?;

        // Gateway: the provider side forwards; consumer interfaces never do.
        gw.ip(&["addr", "add", "198.51.100.254/24", "dev", "p0"])?;
        gw.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        for c in ["c1", "c2", "c3"] {
            gw.sysctl(&format!("net.ipv4.conf.{c}.forwarding"), "0")?;
        }

        for addr in [
            "198.51.100.10",
            "198.51.100.11",
            "198.51.100.12",
            "198.51.100.20",
        ] {
            provider.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        }

        // Frames that XDP redirects or transmits into a veth are delivered
        // only when the peer runs NAPI: a pass program or GRO (SPEC §7).
        for (host, dev) in [
            (&consumer_a, "eth0"),
            (&consumer_b, "eth0"),
            (&router_a, "eth0"),
            (&provider, "eth0"),
        ] {
            match far {
                FarEnds::Xdp => topo.enable_napi(host, dev)?,
                FarEnds::GroOnly => host
                    .exec("ethtool", &["-K", dev, "gro", "on"])
                    .map(|_| ())?,
            }
        }

        let mut servers = Vec::new();
        for b in ORDERS_BACKENDS.iter().chain([&BILLING_BACKEND]) {
            servers.push(servers::start(&provider, *b, 8080, true, false)?);
        }
        servers.push(servers::start(&provider, DNS_BACKEND, 5353, false, true)?);
        Ok(Self {
            topo,
            consumer_a,
            consumer_b,
            router_a,
            routed_client,
            gw,
            provider,
            servers,
        })
    }

    /// Starts plink on the gateway with the reference config.
    pub fn start_plink(&mut self) -> anyhow::Result<Gateway> {
        self.start_plink_with(&Options::default())
    }

    /// Starts plink with a variant of the reference config.
    pub fn start_plink_with(&mut self, opts: &Options) -> anyhow::Result<Gateway> {
        let cfg = config(&self.topo, opts)?;
        let gw = self.gw.clone();
        gateway::start(&mut self.topo, &gw, &cfg).context("starting plink")
    }
}

/// The endpoint's TCP service address.
pub fn endpoint_tcp() -> SocketAddrV4 {
    SocketAddrV4::new(ENDPOINT, 80)
}

/// The DNS endpoint's address.
pub fn endpoint_udp() -> SocketAddrV4 {
    SocketAddrV4::new(DNS_ENDPOINT, 53)
}
