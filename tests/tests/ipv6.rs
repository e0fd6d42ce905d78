//! IPv6 end to end (issue 19, phase 1: NAT66 and neighbour discovery in
//! XDP): two consumer networks with the same IPv6 prefix and the same
//! client address, each with its own endpoint at the same address; a
//! routed client; a provider with IPv6 backends behind IPv6 NAT addresses.
//!
//! ```text
//!   ca 2001:db8:c::1 ──── c1 ┐                       ┌ 2001:db8:100::10, ::11  orders6:8080
//!        vnet-a              │                       │ 2001:db8:100::12        billing6:8080
//!   cr 2001:db8:d::10 ─ ra ─ c3 ┤ gw ── p0 ── eth0 pv ┘
//!   cb 2001:db8:c::1 ──── c2 ┘   2001:db8:100::254
//!        vnet-b
//! ```
//! The endpoint 2001:db8:c::50 port 80 is `orders6` in vnet-a and
//! `billing6` in vnet-b. The gateway's consumer interfaces have IPv6
//! disabled (the forwarding contract): only XDP answers there.

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream},
    sync::atomic::Ordering,
    time::Duration,
};

use anyhow::Context as _;
use plink_tests::{
    gateway::{self, Gateway},
    netns::{self, Host, Topology},
    on_both_far_ends,
    privatelink::FarEnds,
    streams::{self, StreamServer},
};

const ENDPOINT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x50);
const ORDERS_BACKENDS: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10),
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x11),
];
const BILLING_BACKEND: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x12);
const ORDERS_NAT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x200);
const BILLING_NAT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x201);

struct Net {
    topo: Topology,
    ca: Host,
    cb: Host,
    ra: Host,
    cr: Host,
    gw: Host,
    pv: Host,
    _servers: Vec<StreamServer>,
}

/// Turns IPv6 on for `dev` (test namespaces start with it off) and adds
/// `addr` without duplicate address detection.
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
    let ra = topo.host("ra")?;
    let cr = topo.host("cr")?;
    let gw = topo.host("gw")?;
    let pv = topo.host("pv")?;
    topo.link(&ca, "eth0", &gw, "c1")?;
    topo.link(&cb, "eth0", &gw, "c2")?;
    topo.link(&ra, "eth0", &gw, "c3")?;
    topo.link(&cr, "eth0", &ra, "eth1")?;
    topo.link(&gw, "p0", &pv, "eth0")?;
    for c in [&ca, &cb] {
        addr6(c, "2001:db8:c::1/64", "eth0")?;
    }
    addr6(&ra, "2001:db8:c::2/64", "eth0")?;
    addr6(&ra, "2001:db8:d::1/64", "eth1")?;
    ra.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    addr6(&cr, "2001:db8:d::10/64", "eth0")?;
    cr.ip(&["-6", "route", "add", "default", "via", "2001:db8:d::1"])?;

    // The gateway: IPv6 on the provider side only; consumer interfaces
    // pass nothing to the kernel (no address, IPv6 off).
    for c in ["c1", "c2", "c3"] {
        gw.sysctl(&format!("net.ipv6.conf.{c}.disable_ipv6"), "1")?;
    }
    addr6(&gw, "2001:db8:100::254/64", "p0")?;
    gw.sysctl("net.ipv6.conf.p0.forwarding", "1")?;
    // `check --host` asks for IPv4 forwarding on the provider side whatever
    // the services' family (a gateway is dual-stack).
    gw.sysctl("net.ipv4.conf.p0.forwarding", "1")?;
    for b in ORDERS_BACKENDS.iter().chain([&BILLING_BACKEND]) {
        addr6(&pv, &format!("{b}/64"), "eth0")?;
    }
    for (host, dev) in [(&ca, "eth0"), (&cb, "eth0"), (&ra, "eth0"), (&pv, "eth0")] {
        match far {
            FarEnds::Xdp => topo.enable_napi(host, dev)?,
            FarEnds::GroOnly => host
                .exec("ethtool", &["-K", dev, "gro", "on"])
                .map(|_| ())?,
        }
    }
    let mut servers = Vec::new();
    for b in ORDERS_BACKENDS.iter().chain([&BILLING_BACKEND]) {
        servers.push(StreamServer::start(
            &pv,
            SocketAddrV6::new(*b, 8080, 0, 0).into(),
        )?);
    }
    Ok(Net {
        topo,
        ca,
        cb,
        ra,
        cr,
        gw,
        pv,
        _servers: servers,
    })
}

fn config(topo: &Topology) -> anyhow::Result<String> {
    Ok(format!(
        "{gw}\
interfaces:
  - {{name: c1, role: consumer, network: vnet-a}}
  - {{name: c3, role: consumer, network: vnet-a}}
  - {{name: c2, role: consumer, network: vnet-b}}
  - {{name: p0, role: provider}}
services:
  - name: orders6
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: '{o0}'}}, {{address: '{o1}'}}]
    nat: {{addresses: ['{orders_nat}']}}
    visibility: ['*']
    auto_approve: ['*']
  - name: billing6
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: '{billing}'}}]
    nat: {{addresses: ['{billing_nat}']}}
    visibility: ['*']
    auto_approve: ['*']
endpoints:
  - {{name: orders-a, tenant: tenant-a, network: vnet-a, address: '{ENDPOINT}', service: orders6}}
  - {{name: billing-b, tenant: tenant-b, network: vnet-b, address: '{ENDPOINT}', service: billing6}}
",
        gw = gateway::gateway_section(topo)?,
        o0 = ORDERS_BACKENDS[0],
        o1 = ORDERS_BACKENDS[1],
        billing = BILLING_BACKEND,
        orders_nat = ORDERS_NAT,
        billing_nat = BILLING_NAT,
    ))
}

fn start(net: &mut Net) -> anyhow::Result<Gateway> {
    let cfg = config(&net.topo)?;
    let gw = net.gw.clone();
    gateway::start(&mut net.topo, &gw, &cfg).context("starting plink")
}

fn endpoint() -> SocketAddr {
    SocketAddrV6::new(ENDPOINT, 80, 0, 0).into()
}

fn ip_of(a: SocketAddr) -> std::net::IpAddr {
    a.ip()
}

/// Both networks' clients (the same address) reach their own service
/// through the same endpoint address; the backends see only NAT addresses.
fn overlapping_ipv6_consumers_reach_their_own_services_through_nat66(far: FarEnds) {
    let mut net = build(far).unwrap();
    let _plink = start(&mut net).unwrap();
    let a = streams::download(&net.ca, endpoint(), 1000).unwrap();
    assert_eq!(ip_of(a.peer), ORDERS_NAT, "vnet-a's flow is NATed: {a:?}");
    assert!(
        ORDERS_BACKENDS.iter().any(|b| ip_of(a.local) == *b),
        "{a:?}"
    );
    let b = streams::download(&net.cb, endpoint(), 1000).unwrap();
    assert_eq!(ip_of(b.peer), BILLING_NAT, "vnet-b's flow is NATed: {b:?}");
    assert_eq!(ip_of(b.local), BILLING_BACKEND, "{b:?}");
    assert_eq!(a.body + b.body, 2000);
}

/// 2 MiB each way through NAT66, from both networks.
fn two_mib_each_way_through_nat66(far: FarEnds) {
    let mut net = build(far).unwrap();
    let _plink = start(&mut net).unwrap();
    for host in [&net.ca, &net.cb] {
        let r = streams::download(host, endpoint(), 2 << 20).unwrap();
        assert_eq!(r.body, 2 << 20);
        streams::upload(host, endpoint(), 2 << 20).unwrap();
    }
}

/// Path MTU discovery through NAT66, consumer side: the gateway's route to
/// the provider prefix has MTU 1400 while every link is 1500, so TCP's MSS
/// does not help. The client's 1500-byte segments are answered with Packet
/// Too Big from the endpoint address; it lowers its path MTU and the 2 MiB
/// upload (and a download) complete.
fn packet_too_big_to_the_client_for_a_small_provider_route(far: FarEnds) {
    let mut net = build(far).unwrap();
    // The kernel's own route (metric 256) replaced, not shadowed; locked,
    // as the FIB lookup honours a route's MTU only then.
    net.gw
        .ip(&[
            "-6",
            "route",
            "replace",
            "2001:db8:100::/64",
            "dev",
            "p0",
            "metric",
            "256",
            "mtu",
            "lock",
            "1400",
        ])
        .unwrap();
    let _plink = start(&mut net).unwrap();
    streams::upload(&net.ca, endpoint(), 2 << 20).unwrap();
    let r = streams::download(&net.ca, endpoint(), 2 << 20).unwrap();
    assert_eq!(r.body, 2 << 20);
    let route = net
        .ca
        .ip(&["-6", "route", "get", &ENDPOINT.to_string()])
        .unwrap();
    assert!(
        route.contains("mtu 1400"),
        "the client learnt the path MTU from the gateway: {route}"
    );
}

/// Path MTU discovery through NAT66, backend side: the routed client's
/// router links to the gateway at MTU 1400 (its own link is 1500, so it
/// announces a 1440-byte MSS). The backend's 1500-byte replies are too big
/// for the consumer interface: it gets Packet Too Big from the NAT address
/// and the 2 MiB download completes; the upload too (the router tells the
/// client).
fn packet_too_big_to_the_backend_for_a_small_consumer_link(far: FarEnds) {
    let mut net = build(far).unwrap();
    net.gw.ip(&["link", "set", "c3", "mtu", "1400"]).unwrap();
    net.ra.ip(&["link", "set", "eth0", "mtu", "1400"]).unwrap();
    let plink = start(&mut net).unwrap();
    let r = streams::download(&net.cr, endpoint(), 2 << 20).unwrap();
    assert_eq!(r.body, 2 << 20);
    streams::upload(&net.cr, endpoint(), 2 << 20).unwrap();
    let scrape = plink.scrape(&net.gw).unwrap();
    let sent = Gateway::sample(
        &scrape,
        "plink_service_frag_needed_sent_total{service=\"orders6\"}",
    );
    assert!(sent > 0, "the backend was told the consumer MTU:\n{scrape}");
}

/// Path MTU discovery through NAT66 behind a consumer-side router: the
/// router's route to the routed client has MTU 1400 (every link is 1500,
/// so the client announces a 1440-byte MSS). The backend's 1500-byte
/// replies reach the router, which sends Packet Too Big to the endpoint
/// address; the gateway translates it for the backend (from the NAT
/// address), which lowers its path MTU, and the 2 MiB download completes.
fn packet_too_big_from_a_consumer_router_reaches_the_backend(far: FarEnds) {
    let mut net = build(far).unwrap();
    net.ra
        .ip(&[
            "-6",
            "route",
            "replace",
            "2001:db8:d::/64",
            "dev",
            "eth1",
            "metric",
            "256",
            "mtu",
            "lock",
            "1400",
        ])
        .unwrap();
    let _plink = start(&mut net).unwrap();
    let r = streams::download(&net.cr, endpoint(), 2 << 20).unwrap();
    assert_eq!(r.body, 2 << 20);
    let route = net
        .pv
        .ip(&[
            "-6",
            "route",
            "get",
            &ORDERS_NAT.to_string(),
            "from",
            &ip_of(r.local).to_string(),
        ])
        .unwrap();
    assert!(
        route.contains("mtu 1400"),
        "the backend learnt the path MTU from the router's error: {route}"
    );
}

/// Health checks reach IPv6 backends: a third orders6 backend with an
/// address but no server fails its TCP check and is taken out; its
/// metric says so, the live ones stay up, and every new flow reaches a
/// live backend.
fn health_checks_take_a_dead_ipv6_backend_out(far: FarEnds) {
    const DEAD: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x13);
    let mut net = build(far).unwrap();
    addr6(&net.pv, &format!("{DEAD}/64"), "eth0").unwrap();
    let cfg = config(&net.topo)
        .unwrap()
        .replace(
            &format!("backends: [{{address: '{}'}}, {{address: '{}'}}]", ORDERS_BACKENDS[0], ORDERS_BACKENDS[1]),
            &format!(
                "backends: [{{address: '{}'}}, {{address: '{}'}}, {{address: '{DEAD}'}}]\n    health_check: {{type: tcp, interval: 300ms, timeout: 200ms, rise: 1, fall: 1}}",
                ORDERS_BACKENDS[0], ORDERS_BACKENDS[1]
            ),
        );
    assert!(
        cfg.contains(&DEAD.to_string()),
        "the config names the dead backend"
    );
    let gw = net.gw.clone();
    let plink = gateway::start(&mut net.topo, &gw, &cfg).unwrap();
    let up = |scrape: &str, b: Ipv6Addr| {
        Gateway::sample(
            scrape,
            &format!("plink_backend_up{{service=\"orders6\",backend=\"{b}\"}}"),
        )
    };
    netns::wait_for(
        "the dead IPv6 backend to be taken out",
        Duration::from_secs(10),
        || {
            let scrape = plink.scrape(&net.gw)?;
            Ok(
                (up(&scrape, DEAD) == 0 && ORDERS_BACKENDS.iter().all(|b| up(&scrape, *b) == 1))
                    .then_some(()),
            )
        },
    )
    .unwrap();
    for _ in 0..20 {
        let r = streams::download(&net.ca, endpoint(), 1000).unwrap();
        assert_ne!(ip_of(r.local), DEAD, "{r:?}");
    }
}

/// A client behind a router in vnet-a: the endpoint is on the router's
/// link, neighbour discovery answered by XDP.
fn a_routed_ipv6_client_reaches_its_endpoint(far: FarEnds) {
    let mut net = build(far).unwrap();
    let _plink = start(&mut net).unwrap();
    let r = streams::download(&net.cr, endpoint(), 4096).unwrap();
    assert_eq!(ip_of(r.peer), ORDERS_NAT, "{r:?}");
}

/// ping6 through the endpoint: echo requests open a flow to a backend
/// and the replies come back translated.
fn ping6_through_an_endpoint(far: FarEnds) {
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
                &ENDPOINT.to_string(),
            ],
        )
        .unwrap();
    assert!(out.contains("3 received"), "{out}");
}

/// Probes from a consumer to the provider's own IPv6 addresses, sent
/// straight to the gateway's MAC, never arrive: only endpoints are
/// reachable.
fn ipv6_probes_to_provider_addresses_never_arrive(far: FarEnds) {
    let mut net = build(far).unwrap();
    let plink = start(&mut net).unwrap();
    let gw_mac = netns::mac_text(net.gw.mac("c1").unwrap());
    let before = Gateway::drops(&plink.scrape(&net.gw).unwrap(), "no_endpoint");
    for target in [
        ORDERS_BACKENDS[0],
        ORDERS_NAT,
        "2001:db8:100::254".parse().unwrap(),
    ] {
        net.ca
            .ip(&[
                "-6",
                "route",
                "replace",
                &format!("{target}/128"),
                "dev",
                "eth0",
            ])
            .unwrap();
        net.ca
            .ip(&[
                "-6",
                "neigh",
                "replace",
                &target.to_string(),
                "lladdr",
                &gw_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])
            .unwrap();
        let dst = SocketAddrV6::new(target, 8080, 0, 0);
        let tried = net.ca.run_in(move || {
            TcpStream::connect_timeout(&dst.into(), Duration::from_millis(500)).is_ok()
        });
        assert!(!tried.unwrap(), "{target} answered a consumer");
    }
    let served: u64 = net
        ._servers
        .iter()
        .map(|s| s.served.load(Ordering::SeqCst))
        .sum();
    assert_eq!(served, 0, "a backend was reached without an endpoint");
    let after = Gateway::drops(&plink.scrape(&net.gw).unwrap(), "no_endpoint");
    assert!(
        after > before,
        "the probes were dropped as no_endpoint ({before} -> {after})"
    );
    let _ = &net.pv;
}

/// At start the gateway announces its IPv6 endpoint and NAT addresses with
/// unsolicited neighbour advertisements (Override set): a consumer and a
/// provider host that cached a wrong link-layer address for them (a
/// gateway replaced, a NIC swapped) relearn the gateway's at once instead
/// of waiting for their neighbour entry to time out.
#[test]
fn neighbours_relearn_the_gateway_from_unsolicited_advertisements() {
    let mut net = build(FarEnds::Xdp).unwrap();
    let stale = "02:00:00:00:de:ad";
    let cached = [
        (net.ca.clone(), ENDPOINT, net.gw.mac("c1").unwrap()),
        (net.pv.clone(), ORDERS_NAT, net.gw.mac("p0").unwrap()),
    ];
    for (host, addr, _) in &cached {
        host.ip(&[
            "-6",
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            stale,
            "dev",
            "eth0",
            "nud",
            "stale",
        ])
        .unwrap();
        let before = host
            .ip(&["-6", "neigh", "show", &addr.to_string(), "dev", "eth0"])
            .unwrap();
        assert!(before.contains(stale), "{before}");
    }
    let _plink = start(&mut net).unwrap();
    for (host, addr, mac) in &cached {
        let want = netns::mac_text(*mac);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = host
                .ip(&["-6", "neigh", "show", &addr.to_string(), "dev", "eth0"])
                .unwrap();
            if now.contains(&want) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{addr}: still {now:?}, want lladdr {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

on_both_far_ends!(
    overlapping_ipv6_consumers_reach_their_own_services_through_nat66,
    two_mib_each_way_through_nat66,
    a_routed_ipv6_client_reaches_its_endpoint,
    ping6_through_an_endpoint,
    ipv6_probes_to_provider_addresses_never_arrive,
    packet_too_big_to_the_client_for_a_small_provider_route,
    packet_too_big_to_the_backend_for_a_small_consumer_link,
    packet_too_big_from_a_consumer_router_reaches_the_backend,
    health_checks_take_a_dead_ipv6_backend_out,
);
