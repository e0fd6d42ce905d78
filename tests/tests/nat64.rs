//! NAT64 end to end: IPv6 consumers reach an IPv4 service through IPv6
//! endpoint addresses; the backends see only the IPv4 NAT address.
//!
//! ```text
//!   ca 2001:db8:c::1 (IPv6 only) ──── c1 ┐                       ┌ 198.51.100.10, .11  orders:8080
//!        vnet-a                         │ gw ── p0 ── eth0 pv ──┘
//!   cb 192.0.2.1 + 2001:db8:c::1 ───── c2 ┘   198.51.100.254
//!        vnet-b
//! ```
//! `orders-a` (vnet-a) is IPv6 only: 2001:db8:c::50. `orders-b` (vnet-b)
//! is dual stack: 192.0.2.50 and 2001:db8:c::50, one endpoint (one
//! approval state). Both NAT to 198.51.100.200.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use anyhow::Context as _;
use plink_tests::{
    gateway::{self, Gateway},
    netns::{self, Host, Topology},
    on_both_far_ends,
    privatelink::FarEnds,
    streams::{self, StreamServer},
};

const ENDPOINT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x50);
const ENDPOINT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
const BACKENDS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 10),
    Ipv4Addr::new(198, 51, 100, 11),
];
const NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);

struct Net {
    topo: Topology,
    ca: Host,
    cb: Host,
    gw: Host,
    _servers: Vec<StreamServer>,
}

/// IPv6 on for `dev` (test namespaces start with it off), `addr` added
/// without duplicate address detection.
fn addr6(host: &Host, addr: &str, dev: &str) -> anyhow::Result<()> {
    host.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "0")?;
    host.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"])
        .map(|_| ())
}

fn build(far: FarEnds) -> anyhow::Result<Net> {
    netns::require_root_and_tools();
    let mut topo = Topology::new()?;
    let ca = topo.host("ca")?;
    let cb = topo.host("cb")?;
    let gw = topo.host("gw")?;
    let pv = topo.host("pv")?;
    topo.link(&ca, "eth0", &gw, "c1")?;
    topo.link(&cb, "eth0", &gw, "c2")?;
    topo.link(&gw, "p0", &pv, "eth0")?;
    for c in [&ca, &cb] {
        addr6(c, "2001:db8:c::1/64", "eth0")?;
    }
    cb.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;

    // The gateway: consumer interfaces pass nothing to the kernel (no
    // address, IPv6 off, no forwarding); the provider side is IPv4 only.
    for c in ["c1", "c2"] {
        gw.sysctl(&format!("net.ipv6.conf.{c}.disable_ipv6"), "1")?;
        gw.sysctl(&format!("net.ipv4.conf.{c}.forwarding"), "0")?;
    }
    gw.ip(&["addr", "add", "198.51.100.254/24", "dev", "p0"])?;
    gw.sysctl("net.ipv4.conf.p0.forwarding", "1")?;
    for b in BACKENDS {
        pv.ip(&["addr", "add", &format!("{b}/24"), "dev", "eth0"])?;
    }
    for (host, dev) in [(&ca, "eth0"), (&cb, "eth0"), (&pv, "eth0")] {
        match far {
            FarEnds::Xdp => topo.enable_napi(host, dev)?,
            FarEnds::GroOnly => host
                .exec("ethtool", &["-K", dev, "gro", "on"])
                .map(|_| ())?,
        }
    }
    let mut servers = Vec::new();
    for b in BACKENDS {
        servers.push(StreamServer::start(&pv, SocketAddrV4::new(b, 8080).into())?);
    }
    Ok(Net {
        topo,
        ca,
        cb,
        gw,
        _servers: servers,
    })
}

fn config(topo: &Topology) -> anyhow::Result<String> {
    Ok(format!(
        "{gw}\
interfaces:
  - {{name: c1, role: consumer, network: vnet-a}}
  - {{name: c2, role: consumer, network: vnet-b}}
  - {{name: p0, role: provider}}
services:
  - name: orders
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: {b0}}}, {{address: {b1}}}]
    nat: {{addresses: [{NAT}]}}
    visibility: ['*']
    auto_approve: ['*']
endpoints:
  - {{name: orders-a, tenant: tenant-a, network: vnet-a, address: '{ENDPOINT6}', service: orders}}
  - {{name: orders-b, tenant: tenant-b, network: vnet-b, address: {ENDPOINT4}, address6: '{ENDPOINT6}', service: orders}}
",
        gw = gateway::gateway_section(topo)?,
        b0 = BACKENDS[0],
        b1 = BACKENDS[1],
    ))
}

fn start(net: &mut Net) -> anyhow::Result<Gateway> {
    let cfg = config(&net.topo)?;
    let gw = net.gw.clone();
    gateway::start(&mut net.topo, &gw, &cfg).context("starting plink")
}

fn endpoint6() -> SocketAddr {
    SocketAddrV6::new(ENDPOINT6, 80, 0, 0).into()
}

fn endpoint4() -> SocketAddr {
    SocketAddrV4::new(ENDPOINT4, 80).into()
}

/// 2 MiB each way between an IPv6-only client and an IPv4 backend, which
/// sees the IPv4 NAT address.
fn two_mib_each_way_through_nat64(far: FarEnds) {
    let mut net = build(far).unwrap();
    let plink = start(&mut net).unwrap();
    let r = streams::download(&net.ca, endpoint6(), 2 << 20).unwrap();
    assert_eq!(r.body, 2 << 20);
    assert_eq!(r.peer.ip(), NAT, "the backend sees the NAT address: {r:?}");
    assert!(BACKENDS.iter().any(|b| r.local.ip() == *b), "{r:?}");
    streams::upload(&net.ca, endpoint6(), 2 << 20).unwrap();
    let scrape = plink.scrape(&net.gw).unwrap();
    let bytes_out = Gateway::sample(
        &scrape,
        "plink_endpoint_bytes_total{endpoint=\"orders-a\",service=\"orders\",direction=\"out\"}",
    );
    assert!(
        bytes_out > 2 << 20,
        "the endpoint's bytes out count the download:\n{scrape}"
    );
    // The families differ on the two sides: IPv6 frames on the consumer
    // interface, IPv4 ones on the provider interface.
    let frames = |i: &str, f: &str| {
        Gateway::sample(
            &scrape,
            &format!("plink_interface_frames_total{{interface=\"{i}\",family=\"{f}\"}}"),
        )
    };
    assert!(frames("c1", "ipv6") > 1000, "consumer side IPv6:\n{scrape}");
    assert!(frames("p0", "ipv4") > 1000, "provider side IPv4:\n{scrape}");
}

/// Path MTU discovery through NAT64: the gateway's IPv4 route to the
/// provider prefix has MTU 1400 while every link is 1500. The client's
/// 1500-byte IPv6 segments (1480 as IPv4) are answered with Packet Too Big
/// carrying 1420 (the IPv4 MTU plus the 20 bytes IPv6 adds); the client
/// lowers its path MTU and the 2 MiB upload completes.
fn packet_too_big_through_nat64_for_a_small_ipv4_route(far: FarEnds) {
    let mut net = build(far).unwrap();
    net.gw
        .ip(&[
            "route",
            "replace",
            "198.51.100.0/24",
            "dev",
            "p0",
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            "198.51.100.254",
            "mtu",
            "lock",
            "1400",
        ])
        .unwrap();
    let _plink = start(&mut net).unwrap();
    streams::upload(&net.ca, endpoint6(), 2 << 20).unwrap();
    let route = net
        .ca
        .ip(&["-6", "route", "get", &ENDPOINT6.to_string()])
        .unwrap();
    assert!(
        route.contains("mtu 1420"),
        "the client learnt the translated path MTU from the gateway: {route}"
    );
}

/// ping6 to a NAT64 endpoint: ICMPv6 echo becomes ICMP echo to a backend
/// and the replies come back as ICMPv6.
fn ping6_through_a_nat64_endpoint(far: FarEnds) {
    let mut net = build(far).unwrap();
    let _plink = start(&mut net).unwrap();
    let out = net
        .ca
        .exec(
            "ping",
            &[
                "-6",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "2",
                &ENDPOINT6.to_string(),
            ],
        )
        .unwrap();
    assert!(out.contains("3 received"), "{out}");
}

/// A dual-stack endpoint serves the same service on both addresses, and
/// they share its approval state: rejected, neither passes traffic.
fn a_dual_stack_endpoint_serves_both_families_under_one_approval(far: FarEnds) {
    let mut net = build(far).unwrap();
    let plink = start(&mut net).unwrap();
    for dst in [endpoint4(), endpoint6()] {
        let r = streams::download(&net.cb, dst, 64 << 10).unwrap();
        assert_eq!(r.peer.ip(), NAT, "through {dst}: {r:?}");
    }
    plink
        .ctl(&net.gw, &["endpoints", "reject", "orders-b"])
        .unwrap();
    for dst in [endpoint4(), endpoint6()] {
        assert!(
            streams::download(&net.cb, dst, 1000).is_err(),
            "the rejected endpoint still answers on {dst}"
        );
    }
    // The other network's IPv6-only endpoint is another endpoint.
    streams::download(&net.ca, endpoint6(), 1000).unwrap();
}

on_both_far_ends!(
    two_mib_each_way_through_nat64,
    packet_too_big_through_nat64_for_a_small_ipv4_route,
    ping6_through_a_nat64_endpoint,
    a_dual_stack_endpoint_serves_both_families_under_one_approval,
);
