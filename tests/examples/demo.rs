//! `cargo xtask demo`: plink on a network-namespace topology with real traffic.
//!
//! Topology: two consumer networks whose clients use the same address
//! (192.0.2.1), a gateway running `plink-ctl run`, and a provider host.
//! At this stage the datapath counts and passes traffic; the demo shows the
//! per-interface counters moving. Everything is removed on exit.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::Context as _;
use plink_tests::{
    gateway,
    netns::{self, Host, Topology},
};

fn main() -> anyhow::Result<()> {
    netns::require_root_and_tools();
    let mut topo = Topology::new()?;
    println!(
        "building the topology (namespaces prefixed {})",
        netns::NETNS_PREFIX
    );
    let consumer_a = topo.host("ca")?;
    let consumer_b = topo.host("cb")?;
    let gw = topo.host("gw")?;
    let provider = topo.host("pv")?;
    topo.link(&consumer_a, "eth0", &gw, "c1")?;
    topo.link(&consumer_b, "eth0", &gw, "c2")?;
    topo.link(&gw, "p0", &provider, "eth0")?;
    for consumer in [&consumer_a, &consumer_b] {
        // Overlapping address spaces: both consumers are 192.0.2.1.
        consumer.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
        consumer.ip(&["route", "add", "default", "via", "192.0.2.254"])?;
    }
    gw.ip(&["addr", "add", "192.0.2.254/24", "dev", "c1"])?;
    gw.ip(&["addr", "add", "198.51.100.254/24", "dev", "p0"])?;
    gw.sysctl("net.ipv4.ip_forward", "1")?;
    provider.ip(&["addr", "add", "198.51.100.10/24", "dev", "eth0"])?;
    provider.ip(&["route", "add", "192.0.2.0/24", "via", "198.51.100.254"])?;

    let config = format!(
        "{}interfaces:\n  - {{name: c1, role: consumer, network: vnet-a}}\n  - {{name: c2, role: consumer, network: vnet-b}}\n  - {{name: p0, role: provider}}\n",
        gateway::gateway_section(&topo)?
    );
    println!("starting plink-ctl on the gateway with:\n{config}");
    let plink = gateway::start(&mut topo, &gw, &config)?;

    let receiver =
        provider.run_in(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9999)))??;
    receiver.set_read_timeout(Some(Duration::from_secs(2)))?;
    send(&consumer_a, 50)?;
    let mut got = 0;
    let mut buf = [0u8; 1500];
    while receiver.recv(&mut buf).is_ok() {
        got += 1;
        if got == 50 {
            break;
        }
    }
    println!("provider received {got} of 50 UDP datagrams from consumer A (192.0.2.1)");
    println!("\nper-interface counters (plink-ctl stats):");
    print!("{}", plink.ctl(&gw, &["stats"])?);
    let out = topo.stop(plink.child)?;
    println!(
        "\nplink-ctl stopped ({}); removing the topology",
        out.status
    );
    drop(topo);
    println!("done: namespaces and pins removed");
    Ok(())
}

fn send(host: &Host, count: usize) -> anyhow::Result<()> {
    host.run_in(move || -> anyhow::Result<()> {
        let sock = UdpSocket::bind("192.0.2.1:0").context("bind")?;
        for i in 0..count {
            sock.send_to(format!("hello {i}").as_bytes(), "198.51.100.10:9999")?;
        }
        Ok(())
    })?
}
