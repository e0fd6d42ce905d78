//! TCP: a flow's life from SYN to purge, both directions, overlapping
//! consumer networks, checksums carried as (in)valid as they came, and what
//! is refused without a flow.

use super::*;

#[test]
fn golden_tcp_flow_lifecycle() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| b.run(tcp_lifecycle(n)));
}

/// The TCP state of the flow of consumer network `network_id`.
fn flow_state(network_id: u32, state: u8) -> Step {
    Step::expect("tcp state", move |b| {
        let flows = b.dp.list_conntrack().unwrap();
        let f = flows.iter().find(|f| f.network_id == network_id).unwrap();
        assert_eq!(f.tcp_state, state, "network {network_id}'s flow");
    })
}

fn tcp_lifecycle(n: Ifs) -> Vec<Step> {
    let (c1, c2, p0) = (n.c1, n.c2, n.p0);
    let TcpFlow {
        client,
        ep,
        backend,
        backend_mac,
        nat,
        syn,
        ack,
    } = tcp_flow(&n, 40000);
    let to_backend = |p: &Ipv4Packet| translated(p, n.p0_mac, (backend, 8080, backend_mac), nat);
    let to_client = |p: &Ipv4Packet| untranslated(p, n.c1_mac, CLIENT_MAC, ep, client);

    let mut synack =
        Ipv4Packet::tcp((backend, 8080), nat, TCP_SYN | TCP_ACK).macs(backend_mac, n.p0_mac);
    synack.seq = 5000;
    let mut data = ack.clone();
    data.payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    let mut bad_l4 = data.build();
    let last = bad_l4.len() - 1;
    bad_l4[last] ^= 0x5a;
    let mut bad_ip = data.build();
    bad_ip[24] ^= 0x01;
    let data_out = to_backend(&data);

    // Overlapping network 2: the identical 5-tuple is another flow.
    let key2 = fwd_key(2, client, ep, IPPROTO_TCP);
    let (backend2, backend2_mac) = service0_backend(&key2);
    let nat2 = (NAT_TCP, first_port(&key2, 1024..=65535));
    assert_ne!(
        nat2, nat,
        "the two networks' flows hash apart (else pick other ports)"
    );
    let syn2 = Ipv4Packet::tcp(client, ep, TCP_SYN).macs(ROUTER_MAC, n.c2_mac);
    let mut synack2 =
        Ipv4Packet::tcp((backend2, 8080), nat2, TCP_SYN | TCP_ACK).macs(backend2_mac, n.p0_mac);
    synack2.seq = 7000;
    let to_client2 = |p: &Ipv4Packet| untranslated(p, n.c2_mac, ROUTER_MAC, ep, client);

    let fin = Ipv4Packet::tcp(client, ep, TCP_FIN | TCP_ACK).macs(CLIENT_MAC, n.c1_mac);
    let rst =
        Ipv4Packet::tcp((backend2, 8080), nat2, TCP_RST | TCP_ACK).macs(backend2_mac, n.p0_mac);
    let no_flow = |flags| {
        Ipv4Packet::tcp((CLIENT, 40001), ep, flags)
            .macs(CLIENT_MAC, n.c1_mac)
            .build()
    };
    let reply = Ipv4Packet::tcp((backend, 8080), nat, TCP_ACK).macs(backend_mac, n.p0_mac);

    vec![
        // New flow: only a SYN opens it.
        consumer(
            "tcp syn new flow",
            c1,
            syn.build(),
            Want::Redirect(to_backend(&syn)),
        )
        .deltas(opens(0)),
        Step::expect("the flow as predicted", move |b| {
            let flows = b.dp.list_conntrack().unwrap();
            assert_eq!(flows.len(), 1);
            assert_eq!(
                flows[0].nat,
                (nat.0.into(), nat.1),
                "NAT mapping as predicted"
            );
            assert_eq!(flows[0].backend, (backend.into(), 8080));
            assert_eq!(flows[0].tcp_state, tcp_state::SYN_SENT);
            assert_eq!(flows[0].ingress_ifindex, c1);
        }),
        // Reverse: the backend's SYN-ACK goes back to the client's MAC on c1.
        provider(
            "reverse translation",
            p0,
            synack.build(),
            Want::Redirect(to_client(&synack)),
        ),
        flow_state(1, tcp_state::SYN_RECV),
        // Established: the ACK and data reuse the mapping.
        consumer(
            "established reuse (ack)",
            c1,
            ack.build(),
            Want::Redirect(to_backend(&ack)),
        )
        .deltas([
            (Counter::Flows, 0),
            (Counter::Endpoint(0, Field::FlowsCreated), 0),
        ]),
        flow_state(1, tcp_state::ESTABLISHED),
        consumer(
            "established reuse (data)",
            c1,
            data.build(),
            Want::Redirect(data_out.clone()),
        ),
        // A bad L4 checksum stays bad by the same amount; same for the IP header.
        consumer(
            "bad L4 checksum stays bad",
            c1,
            bad_l4,
            Want::RedirectWith(Box::new(|input, out| {
                assert_ne!(l4_checksum_error(input), 0);
                assert_eq!(
                    l4_checksum_error(out),
                    l4_checksum_error(input),
                    "bad L4 checksum stays bad"
                );
                assert!(ip_checksum_ok(out));
            })),
        ),
        consumer(
            "bad IP checksum stays bad",
            c1,
            bad_ip,
            Want::RedirectWith(Box::new(move |_, out| {
                assert!(!ip_checksum_ok(out), "bad IP checksum stays bad");
                let mut fixed = out.to_vec();
                fix_checksums(&mut fixed);
                assert_eq!(fixed, data_out, "only the checksum differs");
            })),
        ),
        consumer(
            "same 5-tuple from network 2",
            c2,
            syn2.build(),
            Want::Redirect(translated(
                &syn2,
                n.p0_mac,
                (backend2, 8080, backend2_mac),
                nat2,
            )),
        )
        .deltas(opens(5)),
        provider(
            "network 2 reply goes to c2, to its router",
            p0,
            synack2.build(),
            Want::Redirect(to_client2(&synack2)),
        ),
        Step::count(Counter::Flows, 2),
        // FIN moves the flow to closing (transitory timeout).
        consumer("fin", c1, fin.build(), Want::Redirect(to_backend(&fin))),
        flow_state(1, tcp_state::CLOSING),
        Step::expect("closing uses the transitory timeout", |b| {
            let flows = b.dp.list_conntrack().unwrap();
            let f = flows.iter().find(|f| f.network_id == 1).unwrap();
            assert!(
                f.expires_in
                    <= Duration::from_secs(240)
                        + Duration::from_nanos(plink_common::LAST_SEEN_SLACK_NS),
                "closing uses the transitory timeout"
            );
        }),
        // RST from the backend on network 2's flow.
        provider("rst", p0, rst.build(), Want::Redirect(to_client2(&rst))),
        flow_state(2, tcp_state::CLOSING),
        // No flow: non-SYN packets are dropped, nothing is created.
        consumer(
            "ack without flow",
            c1,
            no_flow(TCP_ACK),
            Want::Drop(DropReason::TcpNoFlow),
        )
        .deltas([(Counter::Flows, 0)]),
        consumer(
            "syn-ack without flow",
            c1,
            no_flow(TCP_SYN | TCP_ACK),
            Want::Drop(DropReason::TcpNoFlow),
        )
        .deltas([(Counter::Flows, 0)]),
        consumer(
            "rst without flow",
            c1,
            no_flow(TCP_RST),
            Want::Drop(DropReason::TcpNoFlow),
        )
        .deltas([(Counter::Flows, 0)]),
        Step::count(Counter::Flows, 2),
        // Forged replies to a NAT address with no flow never reach a consumer.
        provider(
            "forged reply to a NAT port without flow",
            p0,
            Ipv4Packet::tcp((BACKEND10, 8080), (NAT_TCP, 1), TCP_SYN | TCP_ACK)
                .macs(BACKEND10_MAC, n.p0_mac)
                .build(),
            Want::Drop(DropReason::ReplyNoFlow),
        ),
        provider(
            "reply to a live NAT port from the wrong peer",
            p0,
            Ipv4Packet::tcp((BACKEND11, 9999), nat, TCP_ACK)
                .macs(BACKEND11_MAC, n.p0_mac)
                .build(),
            Want::Drop(DropReason::ReplyNoFlow),
        ),
        // The gateway's own traffic on the provider side passes.
        provider(
            "provider traffic to the gateway itself",
            p0,
            Ipv4Packet::tcp(
                (BACKEND10, 8080),
                (Ipv4Addr::new(198, 51, 100, 1), 5555),
                TCP_ACK,
            )
            .macs(BACKEND10_MAC, n.p0_mac)
            .build(),
            Want::Pass,
        ),
        // Counters: bytes are IP lengths, per direction. In: syn, ack, data,
        // bad l4, bad ip, fin.
        Step::count(Counter::Endpoint(0, Field::FlowsCreated), 1),
        Step::count(Counter::Endpoint(0, Field::PacketsIn), 6),
        Step::count(Counter::Endpoint(0, Field::PacketsOut), 1),
        Step::count(Counter::Endpoint(0, Field::BytesOut), 40),
        Step::count(Counter::Service(0, Field::FlowsCreated), 2),
        Step::count(Counter::Service(0, Field::PacketsOut), 3),
        Step::expect("NAT address counters", |b| {
            let nat_c = b.dp.nat_counters(0, 0).unwrap();
            assert_eq!(nat_c.packets_in + nat_c.packets_out, 10);
        }),
        Step::Expect(Expect::NatPorts(NAT_TCP, Some(2))),
        // Purging endpoint 0 removes its flow and frees its port, not network 2's.
        Step::Purge(0, 1, Some(1)),
        Step::Expect(Expect::NatPorts(NAT_TCP, Some(1))),
        consumer(
            "data after purge",
            c1,
            ack.build(),
            Want::Drop(DropReason::TcpNoFlow),
        ),
        provider(
            "reply after purge",
            p0,
            reply.build(),
            Want::Drop(DropReason::ReplyNoFlow),
        ),
    ]
}
