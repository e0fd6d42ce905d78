//! Who gets an answer: endpoint states, addresses that are no endpoint,
//! one consumer network's endpoints invisible from another, frames for other
//! hosts, and ARP on both sides.

use super::*;

/// A SYN from the client on c1 to `dst:port`.
fn syn(n: Ifs, dst: Ipv4Addr, port: u16) -> Ipv4Packet {
    Ipv4Packet::tcp((CLIENT, 40000), (dst, port), TCP_SYN).macs(CLIENT_MAC, n.c1_mac)
}

#[test]
fn golden_endpoint_lookup_and_isolation() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| {
        let mut steps = Vec::new();
        for (name, ep, reason, id) in [
            (
                "pending endpoint",
                EP_PENDING,
                DropReason::EndpointPending,
                2,
            ),
            (
                "rejected endpoint",
                EP_REJECTED,
                DropReason::EndpointRejected,
                3,
            ),
            (
                "removed endpoint",
                EP_REMOVED,
                DropReason::EndpointRemoved,
                4,
            ),
        ] {
            steps.extend([
                consumer(name, n.c1, syn(n, ep, 80).build(), Want::Drop(reason))
                    .deltas([ep_drop(id, reason), (Counter::Flows, 0)]),
                // Counted per endpoint.
                Step::count(Counter::EndpointDrops(id, reason), 1),
            ]);
        }
        let no_endpoint = |name, ingress, frame: Vec<u8>| {
            consumer(name, ingress, frame, Want::Drop(DropReason::NoEndpoint))
                .deltas([(Counter::Flows, 0)])
        };
        let mut arp_unicast_elsewhere = arp_request(CLIENT_MAC, CLIENT, EP_TCP);
        arp_unicast_elsewhere[..6].copy_from_slice(&n.c2_mac);
        let other_host = |name, ingress, frame: Vec<u8>| {
            consumer(name, ingress, frame, Want::Drop(DropReason::OtherHost))
        };
        steps.extend([
            no_endpoint(
                "unknown destination",
                n.c1,
                syn(n, Ipv4Addr::new(192, 0, 2, 99), 80).build(),
            ),
            no_endpoint("wrong port", n.c1, syn(n, EP_TCP, 81).build()),
            no_endpoint(
                "provider address from a consumer",
                n.c1,
                syn(n, BACKEND10, 8080).build(),
            ),
            no_endpoint(
                "nat address from a consumer",
                n.c1,
                syn(n, NAT_TCP, 1024).build(),
            ),
            no_endpoint(
                "wrong protocol",
                n.c1,
                Ipv4Packet::udp((CLIENT, 40000), (EP_TCP, 80), b"x")
                    .macs(CLIENT_MAC, n.c1_mac)
                    .build(),
            ),
            no_endpoint(
                "endpoint of network 1 seen on network 2",
                n.c2,
                syn(n, EP_UDP, 53).macs(CLIENT_MAC, n.c2_mac).build(),
            ),
            // Frames for another host's MAC (veth and promiscuous NICs hand
            // them to XDP): never forwarded or answered.
            other_host(
                "consumer frame to another MAC",
                n.c2,
                syn(n, EP_TCP, 80).build(),
            ),
            other_host(
                "consumer frame to a multicast MAC",
                n.c1,
                syn(n, EP_TCP, 80)
                    .macs(CLIENT_MAC, [0x01, 0, 0x5e, 0, 0, 1])
                    .build(),
            ),
            other_host(
                "ARP request unicast to another MAC",
                n.c1,
                arp_unicast_elsewhere,
            ),
            provider(
                "provider frame to another MAC passes to the kernel",
                n.p0,
                Ipv4Packet::tcp((BACKEND10, 8080), (NAT_TCP, 1024), TCP_ACK)
                    .macs(BACKEND10_MAC, n.c1_mac)
                    .build(),
                Want::Pass,
            ),
            consumer(
                "unknown ingress interface",
                n.p0,
                syn(n, EP_TCP, 80).build(),
                Want::Drop(DropReason::UnknownInterface),
            ),
        ]);
        b.run(steps);
    });
}

#[test]
fn golden_arp() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| {
        let gw_ip = Ipv4Addr::new(198, 51, 100, 1);
        let not_ours = |name, ingress, frame: Vec<u8>| {
            consumer(name, ingress, frame, Want::Drop(DropReason::ArpNotOurs))
        };
        b.run(vec![
            consumer(
                "arp for an endpoint",
                n.c1,
                arp_request(CLIENT_MAC, CLIENT, EP_TCP),
                Want::Tx(arp_reply(n.c1_mac, EP_TCP, CLIENT_MAC, CLIENT)),
            ),
            consumer(
                "arp for a pending endpoint",
                n.c1,
                arp_request(CLIENT_MAC, CLIENT, EP_PENDING),
                Want::Tx(arp_reply(n.c1_mac, EP_PENDING, CLIENT_MAC, CLIENT)),
            ),
            not_ours(
                "arp for a removed endpoint",
                n.c1,
                arp_request(CLIENT_MAC, CLIENT, EP_REMOVED),
            ),
            not_ours(
                "arp for another address",
                n.c1,
                arp_request(CLIENT_MAC, CLIENT, Ipv4Addr::new(192, 0, 2, 99)),
            ),
            not_ours(
                "arp for network 1's endpoint on network 2",
                n.c2,
                arp_request(CLIENT_MAC, CLIENT, EP_UDP),
            ),
            consumer(
                "arp truncated",
                n.c1,
                &arp_request(CLIENT_MAC, CLIENT, EP_TCP)[..30],
                Want::Drop(DropReason::Malformed),
            ),
            provider(
                "arp for a nat address",
                n.p0,
                arp_request(BACKEND10_MAC, BACKEND10, NAT_TCP),
                Want::Tx(arp_reply(n.p0_mac, NAT_TCP, BACKEND10_MAC, BACKEND10)),
            ),
            provider(
                "arp for the gateway's own address passes",
                n.p0,
                arp_request(BACKEND10_MAC, BACKEND10, gw_ip),
                Want::Pass,
            ),
        ]);
    });
}
