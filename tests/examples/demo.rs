//! `cargo xtask demo`: plink runs the commented example config
//! (examples/plink.yaml) on a network-namespace topology with real traffic.
//!
//! ```text
//!   consumer A 192.0.2.1 ── c1 (vnet-a) ┐                  ┌ 198.51.100.10, .11  orders (HTTP :8080)
//!                                       ├ gateway ── p0 ── ┤
//!   consumer B 192.0.2.1 ── c2 (vnet-b) ┘                  └ 198.51.100.20, .21  dns (UDP :53)
//! ```
//!
//! Both consumers use the same address; each sees the endpoint 192.0.2.50 of
//! its own network. Everything is removed on exit, also on failure.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::Context as _;
use plink_tests::{
    gateway::{self, Gateway},
    netns::{self, Topology},
    servers,
};

fn section(title: &str) {
    println!("\n=== {title}");
}

fn main() -> anyhow::Result<()> {
    netns::require_root_and_tools();
    let mut topo = Topology::new()?;
    section("building the topology");
    let ca = topo.host("ca")?;
    let cb = topo.host("cb")?;
    let gw = topo.host("gw")?;
    let pv = topo.host("pv")?;
    topo.link(&ca, "eth0", &gw, "c1")?;
    topo.link(&cb, "eth0", &gw, "c2")?;
    topo.link(&gw, "p0", &pv, "eth0")?;
    for c in [&ca, &cb] {
        c.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
        topo.enable_napi(c, "eth0")?;
    }
    // Consumer A is dual stack (orders-a has an IPv6 address: NAT64).
    ca.sysctl("net.ipv6.conf.eth0.disable_ipv6", "0")?;
    ca.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:c::1/64",
        "dev",
        "eth0",
        "nodad",
    ])?;
    // The gateway's consumer interfaces take no IPv6 themselves: XDP
    // answers neighbour discovery for the endpoint address.
    for c in ["c1", "c2"] {
        gw.sysctl(&format!("net.ipv6.conf.{c}.disable_ipv6"), "1")?;
    }
    gw.ip(&["addr", "add", "198.51.100.254/24", "dev", "p0"])?;
    gw.sysctl("net.ipv4.conf.all.forwarding", "1")?;
    for c in ["c1", "c2"] {
        gw.sysctl(&format!("net.ipv4.conf.{c}.forwarding"), "0")?;
    }
    for a in [
        "198.51.100.10",
        "198.51.100.11",
        "198.51.100.20",
        "198.51.100.21",
    ] {
        pv.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
    }
    topo.enable_napi(&pv, "eth0")?;
    let mut backends = Vec::new();
    for last in [10, 11] {
        backends.push(servers::start(
            &pv,
            Ipv4Addr::new(198, 51, 100, last),
            8080,
            true,
            false,
        )?);
    }
    for last in [20, 21] {
        backends.push(servers::start(
            &pv,
            Ipv4Addr::new(198, 51, 100, last),
            53,
            false,
            true,
        )?);
    }
    println!(
        "consumers {} and {} (both 192.0.2.1), gateway {}, provider {}",
        ca.name, cb.name, gw.name, pv.name
    );

    // The shipped example, with its paths moved into this demo's own directories.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plink.yaml");
    let text = std::fs::read_to_string(&example)
        .with_context(|| format!("reading {}", example.display()))?;
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let scratch = topo.scratch_dir()?.to_path_buf();
    let g = config["gateway"]
        .as_mapping_mut()
        .context("the example has a gateway section")?;
    g.insert(
        "bpffs_root".into(),
        topo.bpffs_root().display().to_string().into(),
    );
    g.insert(
        "admin_socket".into(),
        scratch.join("admin.sock").display().to_string().into(),
    );
    g.insert(
        "state_dir".into(),
        scratch.join("state").display().to_string().into(),
    );
    section(&format!("starting plink-ctl with {}", example.display()));
    let plink = gateway::start(&mut topo, &gw, &serde_yaml::to_string(&config)?)?;
    print!("{}", plink.ctl(&gw, &["endpoints", "list"])?);

    let orders = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 50), 80);
    let dns = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 53), 53);

    section("consumer A (vnet-a) -> http://192.0.2.50/ (orders-a, auto-approved)");
    for _ in 0..3 {
        let (status, body) = servers::http_get(&ca, orders, "/")?;
        print!("  {status}: {body}");
    }

    section(
        "consumer A over IPv6 -> [2001:db8:c::50]:80 (orders-a's address6: NAT64 to the IPv4 backends)",
    );
    let orders6: std::net::SocketAddr = "[2001:db8:c::50]:80".parse()?;
    let r = plink_tests::streams::download(&ca, orders6, 64 << 10)?;
    println!(
        "  {} bytes from backend {}, which saw the IPv4 NAT address {}",
        r.body, r.local, r.peer
    );

    section("consumer B (vnet-b) -> http://192.0.2.50/ (orders-b, pending)");
    match servers::http_get(&cb, orders, "/") {
        Ok((status, _)) => println!("  unexpected answer {status}"),
        Err(e) => println!("  no answer, as expected for a pending endpoint: {e:#}"),
    }

    section("the provider approves orders-b and dns-b");
    print!("{}", plink.ctl(&gw, &["endpoints", "approve", "orders-b"])?);
    print!("{}", plink.ctl(&gw, &["endpoints", "approve", "dns-b"])?);

    section("consumer B (vnet-b) -> http://192.0.2.50/ and udp 192.0.2.53:53");
    let (status, body) = netns::wait_for(
        "orders-b to open",
        std::time::Duration::from_secs(2),
        || Ok(servers::http_get(&cb, orders, "/").ok()),
    )?;
    print!("  {status}: {body}");
    let reply = servers::udp_request(
        &cb,
        SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 5353),
        dns,
    )?;
    println!(
        "  dns answered from backend {} (the draining .21 takes no new flows); it saw us as {}",
        reply.local, reply.peer
    );

    section("load balancing: 30 requests from consumer A (weights 1:2)");
    let mut per_backend = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let (_, body) = servers::http_get(&ca, orders, "/")?;
        let backend = body
            .split_whitespace()
            .nth(3)
            .unwrap_or("?")
            .trim_end_matches(';')
            .to_owned();
        *per_backend.entry(backend).or_insert(0) += 1;
    }
    for (backend, n) in &per_backend {
        println!("  {backend}: {n}");
    }

    section("plink-ctl conntrack (first rows)");
    let table = plink.ctl(&gw, &["conntrack"])?;
    let lines: Vec<&str> = table.lines().collect();
    for line in lines.iter().take(6) {
        println!("{line}");
    }
    if let Some(last) = lines.last() {
        println!("... {last}");
    }

    section("metrics (non-zero endpoint, NAT and drop series)");
    // The NAT-port gauges come from the GC's sweep (once a second): wait
    // for the sweep that has seen the flows just listed.
    let flows: u64 = lines
        .last()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let ports_in_use = |scrape: &str| -> u64 {
        scrape
            .lines()
            .filter(|l| l.starts_with("plink_nat_ports_in_use{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let scrape = netns::wait_for(
        "the NAT-port gauges to count the flows",
        std::time::Duration::from_secs(5),
        || {
            let scrape = plink.scrape(&gw)?;
            Ok((ports_in_use(&scrape) >= flows).then_some(scrape))
        },
    )
    .or_else(|_| plink.scrape(&gw))?;
    for line in scrape.lines() {
        let interesting = [
            "plink_endpoint_bytes_total",
            "plink_endpoint_connections_total",
            "plink_nat_ports_in_use",
            "plink_drops_total",
            "plink_endpoint_state",
        ]
        .iter()
        .any(|m| line.starts_with(m));
        if interesting && !line.ends_with(" 0") {
            println!("  {line}");
        }
    }
    let bytes_in = Gateway::sample(
        &scrape,
        "plink_endpoint_bytes_total{endpoint=\"orders-a\",service=\"orders\",direction=\"in\"}",
    );
    anyhow::ensure!(bytes_in > 0, "orders-a counted no bytes");

    section("cleaning up");
    let out = topo.stop(plink.child)?;
    println!("plink-ctl stopped ({})", out.status);
    drop(backends);
    drop(topo);
    println!("namespaces, links and pins removed");
    Ok(())
}
