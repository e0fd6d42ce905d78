//! ICMP the gateway handles itself: echo through an endpoint, time exceeded
//! from the endpoint's address, and answers leaving by redirect where the
//! interface wants it.

use std::{cell::Cell, rc::Rc};

use super::*;

/// An echo request or reply with TTL 63 (after one hop).
fn echo63(src: Ipv4Addr, dst: Ipv4Addr, request: bool, id: u16, seq: u16) -> Ipv4Packet {
    let mut p = Ipv4Packet::echo(src, dst, request, id, seq);
    p.ttl = 63;
    p
}

/// Echo through an endpoint: the identifier is translated like a port,
/// per (NAT address, ICMP), separately for overlapping consumers; any
/// approved endpoint answers echo whatever its service's protocol.
#[test]
fn golden_icmp_echo() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, spec| {
        let (c1, c2, p0) = (n.c1, n.c2, n.p0);
        let id = 0x4242;
        let key = fwd_key(1, (CLIENT, id), (EP_TCP, 0), IPPROTO_ICMP);
        let (backend, backend_mac) = service0_backend(&key);
        let nat_id = first_port(&key, 1024..=65535);
        let req = Ipv4Packet::echo(CLIENT, EP_TCP, true, id, 1).macs(CLIENT_MAC, n.c1_mac);
        let reply =
            Ipv4Packet::echo(backend, NAT_TCP, false, nat_id, 1).macs(backend_mac, n.p0_mac);
        let key2 = fwd_key(2, (CLIENT, id), (EP_TCP, 0), IPPROTO_ICMP);
        let (backend2, backend2_mac) = service0_backend(&key2);
        // Network 2's identifier is whatever free one the probe found.
        let nat_id2 = Rc::new(Cell::new(0));
        let got_id2 = nat_id2.clone();
        let p0_mac = n.p0_mac;
        b.run(vec![
            consumer(
                "echo request opens an ICMP flow",
                c1,
                req.build(),
                Want::Redirect(
                    echo63(NAT_TCP, backend, true, nat_id, 1)
                        .macs(n.p0_mac, backend_mac)
                        .build(),
                ),
            )
            .deltas(opens(0)),
            Step::expect("the echo flow", move |b| {
                let flows = b.dp.list_conntrack().unwrap();
                assert_eq!(flows.len(), 1);
                assert_eq!(flows[0].nat, (NAT_TCP.into(), nat_id));
                assert_eq!(flows[0].backend, (backend.into(), 0));
            }),
            provider(
                "echo reply translated back",
                p0,
                reply.build(),
                Want::Redirect(
                    echo63(EP_TCP, CLIENT, false, id, 1)
                        .macs(n.c1_mac, CLIENT_MAC)
                        .build(),
                ),
            ),
            consumer(
                "second echo of the same flow",
                c1,
                Ipv4Packet::echo(CLIENT, EP_TCP, true, id, 2)
                    .macs(CLIENT_MAC, n.c1_mac)
                    .build(),
                Want::Redirect(
                    echo63(NAT_TCP, backend, true, nat_id, 2)
                        .macs(n.p0_mac, backend_mac)
                        .build(),
                ),
            )
            .deltas([(Counter::Flows, 0)]),
            // The identical echo from network 2: its own flow and identifier.
            consumer(
                "the same echo from network 2",
                c2,
                Ipv4Packet::echo(CLIENT, EP_TCP, true, id, 1)
                    .macs(CLIENT_MAC, n.c2_mac)
                    .build(),
                Want::RedirectWith(Box::new(move |_, out| {
                    let nat_id2 = u16::from_be_bytes([out[38], out[39]]);
                    assert_ne!(nat_id2, nat_id, "one identifier per flow on NAT_TCP");
                    let want2 =
                        echo63(NAT_TCP, backend2, true, nat_id2, 1).macs(p0_mac, backend2_mac);
                    assert_eq!(hex(out), hex(&want2.build()));
                    got_id2.set(nat_id2);
                })),
            )
            .deltas(opens(5)),
        ]);
        let nat_id2 = nat_id2.get();

        // A UDP endpoint answers echo too (its own NAT range).
        let ukey = fwd_key(1, (CLIENT, id), (EP_UDP, 0), IPPROTO_ICMP);
        let uwant = echo63(NAT_UDP, BACKEND10, true, first_port(&ukey, UDP_PORTS), 1)
            .macs(n.p0_mac, BACKEND10_MAC);
        let mut truncated = req.build();
        truncated.truncate(14 + 20 + 6);
        truncated[16..18].copy_from_slice(&26u16.to_be_bytes());
        fix_ip_checksum(&mut truncated);
        // Its own timeout: ICMP flows expire on timeouts.icmp, not udp.
        let mut short = spec.clone();
        short.timeouts.icmp = Duration::from_millis(50);
        let from_c1 = |p: Ipv4Packet| p.macs(CLIENT_MAC, n.c1_mac).build();
        let from_backend = |p: Ipv4Packet| p.macs(backend_mac, n.p0_mac).build();
        let no_flow = || [(Counter::Flows, 0)];
        b.run(vec![
            provider(
                "network 2's echo reply goes back to network 2",
                p0,
                Ipv4Packet::echo(backend2, NAT_TCP, false, nat_id2, 1)
                    .macs(backend2_mac, n.p0_mac)
                    .build(),
                Want::Redirect(
                    echo63(EP_TCP, CLIENT, false, id, 1)
                        .macs(n.c2_mac, CLIENT_MAC)
                        .build(),
                ),
            ),
            consumer(
                "echo to a UDP endpoint",
                c1,
                from_c1(Ipv4Packet::echo(CLIENT, EP_UDP, true, id, 1)),
                Want::Redirect(uwant.build()),
            )
            .deltas(opens(1)),
            consumer(
                "echo to a pending endpoint",
                c1,
                from_c1(Ipv4Packet::echo(CLIENT, EP_PENDING, true, id, 1)),
                Want::Drop(DropReason::EndpointPending),
            )
            .deltas(no_flow()),
            consumer(
                "echo to an address that is no endpoint",
                c1,
                from_c1(Ipv4Packet::echo(
                    CLIENT,
                    Ipv4Addr::new(192, 0, 2, 99),
                    true,
                    id,
                    1,
                )),
                Want::Drop(DropReason::NoEndpoint),
            )
            .deltas(no_flow()),
            consumer(
                "timestamp request from a consumer",
                c1,
                from_c1(Ipv4Packet::icmp(CLIENT, EP_TCP, 13, 0, 0, &[0; 12])),
                Want::Drop(DropReason::IcmpUnsupported),
            )
            .deltas(no_flow()),
            consumer(
                "echo reply from a consumer",
                c1,
                from_c1(Ipv4Packet::echo(CLIENT, EP_TCP, false, id, 1)),
                Want::Drop(DropReason::IcmpUnsupported),
            )
            .deltas(no_flow()),
            provider(
                "echo reply with an unknown identifier",
                p0,
                from_backend(Ipv4Packet::echo(backend, NAT_TCP, false, nat_id ^ 1, 1)),
                Want::Drop(DropReason::ReplyNoFlow),
            ),
            provider(
                "echo request to a NAT address",
                p0,
                from_backend(Ipv4Packet::echo(backend, NAT_TCP, true, 7, 1)),
                Want::Drop(DropReason::IcmpUnsupported),
            ),
            consumer(
                "echo shorter than an ICMP header",
                c1,
                truncated,
                Want::Drop(DropReason::Malformed),
            )
            .deltas(no_flow()),
            Step::Apply(short),
            Step::Sleep(Duration::from_millis(120)),
            provider(
                "echo reply after the ICMP timeout",
                p0,
                reply.build(),
                Want::Drop(DropReason::ReplyNoFlow),
            ),
            // The three echo flows expired, nothing else.
            Step::Gc(3),
        ]);
    });
}

/// TTL ≤ 1 on the forward path: time exceeded from the endpoint address,
/// no flow opened.
#[test]
fn golden_ttl_exceeded_answers_from_the_endpoint() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| {
        let exceeded = |name: String, p: Ipv4Packet| {
            let frame = p.build();
            let want = Want::Tx(error_reply(&frame, ICMP_TIME_EXCEEDED, 0, 0, n.c1_mac));
            consumer(name, n.c1, frame, want).deltas([(Counter::Flows, 0)])
        };
        let mut steps = Vec::new();
        for ttl in [1, 0] {
            let mut q =
                Ipv4Packet::udp((CLIENT, 5000), (EP_UDP, 53), b"query").macs(CLIENT_MAC, n.c1_mac);
            q.ttl = ttl;
            steps.push(exceeded(format!("udp with ttl {ttl}"), q));
        }
        let mut syn =
            Ipv4Packet::tcp((CLIENT, 40000), (EP_TCP, 80), TCP_SYN).macs(ROUTER_MAC, n.c1_mac);
        syn.ttl = 1;
        syn.payload = vec![1; 100];
        let mut ping = Ipv4Packet::echo(CLIENT, EP_TCP, true, 9, 1).macs(CLIENT_MAC, n.c1_mac);
        ping.ttl = 1;
        let mut pending =
            Ipv4Packet::tcp((CLIENT, 40000), (EP_PENDING, 80), TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
        pending.ttl = 1;
        steps.extend([
            exceeded("tcp syn with ttl 1 from behind a router".into(), syn),
            exceeded("echo with ttl 1".into(), ping),
            // No flow opened.
            Step::count(Counter::Flows, 0),
            consumer(
                "ttl 1 to a pending endpoint: no answer",
                n.c1,
                pending.build(),
                Want::Drop(DropReason::EndpointPending),
            ),
        ]);
        b.run(steps);
    });
}

/// On interfaces whose answers leave by redirect (veth), ARP replies and
/// ICMP errors are the same bytes as with XDP_TX, sent with XDP_REDIRECT.
#[test]
fn golden_answers_leave_by_redirect_where_xdp_tx_stalls() {
    let gw = gateway();
    let mut spec = spec(&gw);
    for i in &mut spec.interfaces {
        i.answers = AnswerPath::Redirect;
    }
    golden(&gw, spec, |b, n, _| {
        let mut ttl1 =
            Ipv4Packet::udp((CLIENT, 5000), (EP_UDP, 53), b"q").macs(CLIENT_MAC, n.c1_mac);
        ttl1.ttl = 1;
        let ttl1 = ttl1.build();
        b.run(vec![
            consumer(
                "ARP for an endpoint address",
                n.c1,
                arp_request(CLIENT_MAC, CLIENT, EP_TCP),
                Want::Redirect(arp_reply(n.c1_mac, EP_TCP, CLIENT_MAC, CLIENT)),
            ),
            provider(
                "ARP for a NAT address",
                n.p0,
                arp_request(BACKEND10_MAC, BACKEND10, NAT_TCP),
                Want::Redirect(arp_reply(n.p0_mac, NAT_TCP, BACKEND10_MAC, BACKEND10)),
            ),
            consumer(
                "TTL 1 to an endpoint",
                n.c1,
                &ttl1,
                Want::Redirect(error_reply(&ttl1, ICMP_TIME_EXCEEDED, 0, 0, n.c1_mac)),
            ),
        ]);
    });
}
