//! Isolation: nothing reaches the provider from a consumer unless it belongs
//! to an approved endpoint's flow, nothing reaches a consumer unless it is the
//! reverse of its own flow, and every refusal is counted by reason.

use std::{net::Ipv4Addr, time::Duration};

use plink_tests::{
    gateway::Gateway,
    netns::{self, wait_for},
    packet::{Ipv4Packet, TCP_ACK, TCP_SYN},
    privatelink::{self as pl, PrivateLink},
};

const REPEAT: usize = 10;

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

#[test]
fn consumers_cannot_reach_anything_but_their_endpoints() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let gw_c1 = net.gw.mac("c1").unwrap();
    let ca = net.consumer_a.mac("eth0").unwrap();
    let client = pl::CLIENT;
    let tcp = |dst: Ipv4Addr, port: u16, flags: u8| {
        Ipv4Packet::tcp((client, 40100), (dst, port), flags)
            .macs(ca, gw_c1)
            .build()
    };
    let udp = |dst: Ipv4Addr, port: u16| {
        Ipv4Packet::udp((client, 40101), (dst, port), b"probe")
            .macs(ca, gw_c1)
            .build()
    };
    // Not endpoints: backends, the gateway's own address, NAT addresses,
    // other ports and protocols of the endpoint address.
    let no_endpoint = [
        tcp(ip([198, 51, 100, 10]), 8080, TCP_SYN),
        udp(ip([198, 51, 100, 20]), 5353),
        tcp(pl::GATEWAY_PROVIDER_ADDR, 22, TCP_SYN),
        udp(pl::ORDERS_NAT, 20000),
        tcp(pl::ENDPOINT, 81, TCP_SYN),
        udp(pl::ENDPOINT, 80),
        tcp(pl::DNS_ENDPOINT, 53, TCP_SYN),
    ];
    // A TCP segment that opens no flow.
    let no_flow = tcp(pl::ENDPOINT, 80, TCP_ACK);
    // A non-first fragment of a datagram to the DNS endpoint.
    let mut fragment = udp(pl::DNS_ENDPOINT, 53);
    fragment[20] = 0x00;
    fragment[21] = 0x10; // offset 16 x 8 bytes, DF clear
    plink_tests::packet::fix_checksums(&mut fragment);
    // IPv6 from and to :: (an address that would read as IPv4, see
    // `plink_common::Addr`): dropped, never passed to the kernel.
    let mut ipv6 = vec![0u8; 14 + 40 + 8];
    ipv6[..6].copy_from_slice(&gw_c1);
    ipv6[6..12].copy_from_slice(&ca);
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    ipv6[14] = 0x60;
    ipv6[18..20].copy_from_slice(&8u16.to_be_bytes());
    ipv6[20] = 17;
    ipv6[21] = 64;
    // A non-zero UDP checksum (zero is invalid over IPv6).
    ipv6[60] = 0xff;

    // Counts what XDP passes up the gateway's stack from c1 (netdev ingress
    // runs after XDP): it must stay at zero.
    for cmd in [
        "add table netdev isolation",
        "add chain netdev isolation c1 { type filter hook ingress device \"c1\" priority 0 ; }",
        "add rule netdev isolation c1 counter",
    ] {
        net.gw.exec("nft", &[cmd]).unwrap();
    }
    let before = plink.scrape(&net.gw).unwrap();
    let provider_in = net.provider.snmp("Ip", "InReceives").unwrap();

    let mut frames = Vec::new();
    for _ in 0..REPEAT {
        frames.extend(no_endpoint.iter().cloned());
        frames.push(no_flow.clone());
        frames.push(fragment.clone());
        frames.push(ipv6.clone());
    }
    net.consumer_a.send_frames("eth0", frames).unwrap();

    let expected = [
        ("no_endpoint", no_endpoint.len() * REPEAT),
        ("tcp_no_flow", REPEAT),
        ("fragment", REPEAT),
        ("ipv6_address_reserved", REPEAT),
    ];
    let after = wait_for("drops to be counted", Duration::from_secs(5), || {
        let now = plink.scrape(&net.gw)?;
        let done = expected.iter().all(|(reason, n)| {
            Gateway::drops(&now, reason) >= Gateway::drops(&before, reason) + *n as u64
        });
        Ok(done.then_some(now))
    })
    .unwrap();
    for (reason, n) in expected {
        assert_eq!(
            Gateway::drops(&after, reason) - Gateway::drops(&before, reason),
            n as u64,
            "drops counted as {reason}"
        );
    }
    assert_eq!(
        net.provider.snmp("Ip", "InReceives").unwrap(),
        provider_in,
        "a consumer packet reached the provider namespace"
    );
    let counter = net
        .gw
        .exec("nft", &["list", "chain", "netdev", "isolation", "c1"])
        .unwrap();
    assert!(
        counter.contains("counter packets 0 bytes 0"),
        "a consumer packet was passed to the gateway's kernel: {counter}"
    );
}

#[test]
fn forged_replies_never_reach_a_consumer() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let gw_p0 = net.gw.mac("p0").unwrap();
    let pv = net.provider.mac("eth0").unwrap();
    let forged = [
        Ipv4Packet::udp((pl::DNS_BACKEND, 5353), (pl::DNS_NAT, 25000), b"forged")
            .macs(pv, gw_p0)
            .build(),
        Ipv4Packet::tcp(
            (pl::ORDERS_BACKENDS[0], 8080),
            (pl::ORDERS_NAT, 20001),
            TCP_SYN | TCP_ACK,
        )
        .macs(pv, gw_p0)
        .build(),
    ];
    let before = plink.scrape(&net.gw).unwrap();
    let consumers_in: Vec<u64> = [&net.consumer_a, &net.consumer_b, &net.router_a]
        .iter()
        .map(|h| h.snmp("Ip", "InReceives").unwrap())
        .collect();
    let mut frames = Vec::new();
    for _ in 0..REPEAT {
        frames.extend(forged.iter().cloned());
    }
    net.provider.send_frames("eth0", frames).unwrap();
    let want = Gateway::drops(&before, "reply_no_flow") + (forged.len() * REPEAT) as u64;
    wait_for(
        "forged replies to be counted",
        Duration::from_secs(5),
        || {
            let now = plink.scrape(&net.gw)?;
            Ok((Gateway::drops(&now, "reply_no_flow") >= want).then_some(()))
        },
    )
    .unwrap();
    let now: Vec<u64> = [&net.consumer_a, &net.consumer_b, &net.router_a]
        .iter()
        .map(|h| h.snmp("Ip", "InReceives").unwrap())
        .collect();
    assert_eq!(now, consumers_in, "a forged reply reached a consumer");
}
