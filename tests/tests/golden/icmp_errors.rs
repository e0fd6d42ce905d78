//! ICMP errors about a flow (RFC 5508): from the provider side back to the
//! flow's consumer, and from a router in front of a client on to the
//! backend, outer and quoted headers translated, every checksum valid;
//! errors that match no flow, forged or truncated ones are dropped.

use super::*;

/// XDP_REDIRECT with exactly `want` (checksums valid), and the packet it
/// quotes is again a valid one: what the other side sent, untranslated.
fn redirect_quoting_valid(want: Vec<u8>) -> Want {
    Want::RedirectWith(Box::new(move |_, out| {
        assert_eq!(hex(out), hex(&want), "output bytes (got, want)");
        assert!(
            ip_checksum_ok(out) && l4_checksum_ok(out),
            "outer checksums"
        );
        assert!(
            l4_checksum_ok(&[&out[..14], &out[42..]].concat()),
            "quoted checksum"
        );
    }))
}

/// RFC 5508 errors from the provider side back to the flow's consumer.
#[test]
fn golden_icmp_errors_from_the_provider() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| {
        let (c1, c2, p0, c1_mac, c2_mac, p0_mac) = (n.c1, n.c2, n.p0, n.c1_mac, n.c2_mac, n.p0_mac);
        let router = Ipv4Addr::new(198, 51, 100, 254);
        // A UDP flow, and what the consumer sent as the backend saw it (TTL 63).
        let client = (CLIENT, 5000);
        let ep = (EP_UDP, 53);
        let key = fwd_key(1, client, ep, IPPROTO_UDP);
        let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
        let q = Ipv4Packet::udp(client, ep, b"query").macs(CLIENT_MAC, c1_mac);
        let sent = translated(&q, p0_mac, (BACKEND10, 5353, BACKEND10_MAC), nat);
        let mut q63 = q.clone();
        q63.ttl = 63;
        let as_sent = q63.build();
        let from_backend = |p: Ipv4Packet| p.macs(BACKEND10_MAC, p0_mac).build();
        let to_client = |mut p: Ipv4Packet| {
            p.ttl = 63;
            p.macs(c1_mac, CLIENT_MAC).build()
        };
        let err = from_backend(icmp_error(
            BACKEND10,
            NAT_UDP,
            ICMP_DEST_UNREACH,
            ICMP_PORT_UNREACH,
            0,
            &sent[14..],
        ));
        let mut steps = vec![
            consumer("the UDP flow", c1, q.build(), Want::Redirect(sent.clone())),
            provider(
                "port unreachable, whole packet quoted",
                p0,
                &err,
                redirect_quoting_valid(to_client(icmp_error(
                    EP_UDP,
                    CLIENT,
                    ICMP_DEST_UNREACH,
                    ICMP_PORT_UNREACH,
                    0,
                    &as_sent[14..],
                ))),
            ),
            // Quote of 8 transport bytes (RFC 792 minimum): the UDP checksum is among them.
            provider(
                "time exceeded from a router, 8 bytes quoted",
                p0,
                from_backend(icmp_error(
                    router,
                    NAT_UDP,
                    ICMP_TIME_EXCEEDED,
                    0,
                    0,
                    &sent[14..42],
                )),
                Want::Redirect(to_client(icmp_error(
                    EP_UDP,
                    CLIENT,
                    ICMP_TIME_EXCEEDED,
                    0,
                    0,
                    &as_sent[14..42],
                ))),
            ),
        ];

        // A TCP flow from network 2: fragmentation needed with the TCP
        // checksum quoted, and with only 8 bytes (checksum not quoted).
        let tclient = (CLIENT, 40000);
        let tep = (EP_TCP, 80);
        let tkey = fwd_key(2, tclient, tep, IPPROTO_TCP);
        let (backend, backend_mac) = service0_backend(&tkey);
        let tnat = (NAT_TCP, first_port(&tkey, 1024..=65535));
        let mut syn = Ipv4Packet::tcp(tclient, tep, TCP_SYN).macs(CLIENT_MAC, c2_mac);
        syn.payload = vec![9; 40];
        let tsent = translated(&syn, p0_mac, (backend, 8080, backend_mac), tnat);
        let mut syn63 = syn.clone();
        syn63.ttl = 63;
        let tas_sent = syn63.build();
        steps.push(consumer(
            "the TCP flow",
            c2,
            syn.build(),
            Want::Redirect(tsent.clone()),
        ));
        for (name, len) in [
            ("frag needed quoting the TCP checksum", 14 + 20 + 20),
            ("frag needed quoting 8 TCP bytes", 14 + 20 + 8),
        ] {
            let frag_needed = |from, to, quoted: &[u8]| {
                icmp_error(from, to, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1400, quoted)
            };
            let mut w = frag_needed(EP_TCP, CLIENT, &tas_sent[14..len]).macs(c2_mac, CLIENT_MAC);
            w.ttl = 63;
            steps.push(provider(
                name,
                p0,
                frag_needed(router, NAT_TCP, &tsent[14..len])
                    .macs(backend_mac, p0_mac)
                    .build(),
                Want::Redirect(w.build()),
            ));
        }

        // An echo flow: time exceeded quoting the echo request.
        let id = 0x77;
        let ekey = fwd_key(1, (CLIENT, id), (EP_TCP, 0), IPPROTO_ICMP);
        let (eb, eb_mac) = service0_backend(&ekey);
        let enat = first_port(&ekey, 1024..=65535);
        let req = Ipv4Packet::echo(CLIENT, EP_TCP, true, id, 1).macs(CLIENT_MAC, c1_mac);
        let mut esent = Ipv4Packet::echo(NAT_TCP, eb, true, enat, 1).macs(p0_mac, eb_mac);
        esent.ttl = 63;
        let esent = esent.build();
        let mut req63 = req.clone();
        req63.ttl = 63;
        steps.extend([
            consumer(
                "the echo flow",
                c1,
                req.build(),
                Want::Redirect(esent.clone()),
            ),
            provider(
                "time exceeded quoting an echo request",
                p0,
                icmp_error(router, NAT_TCP, ICMP_TIME_EXCEEDED, 0, 0, &esent[14..42])
                    .macs(eb_mac, p0_mac)
                    .build(),
                Want::Redirect(to_client(icmp_error(
                    EP_TCP,
                    CLIENT,
                    ICMP_TIME_EXCEEDED,
                    0,
                    0,
                    &req63.build()[14..42],
                ))),
            ),
        ]);

        // Errors that match no flow, forged or truncated ones.
        let mut other_port = sent.clone();
        other_port[34..36].copy_from_slice(&(nat.1 ^ 0x100).to_be_bytes());
        let mut forged_src = sent.clone();
        forged_src[26..30].copy_from_slice(&NAT_TCP.octets());
        let mut options = sent.clone();
        options[14] = 0x46;
        let error =
            |ty, quoted: &[u8]| from_backend(icmp_error(BACKEND10, NAT_UDP, ty, 3, 0, quoted));
        let redirect = from_backend(icmp_error(BACKEND10, NAT_UDP, 5, 0, 0, &sent[14..42]));
        // A quote cut short by the frame, not the IP length: IP says more
        // than the frame holds.
        let mut cut = err.clone();
        cut.truncate(14 + 20 + 8 + 20 + 4);
        for (name, frame, reason) in [
            (
                "error quoting a port of no flow",
                error(3, &other_port[14..42]),
                DropReason::IcmpErrorNoFlow,
            ),
            (
                "error quoting another NAT address than it is sent to",
                error(3, &forged_src[14..42]),
                DropReason::IcmpErrorNoFlow,
            ),
            (
                "error quoting a header with options",
                error(3, &options[14..42]),
                DropReason::IcmpErrorNoFlow,
            ),
            (
                "error quoting only an IP header",
                error(3, &sent[14..34]),
                DropReason::Malformed,
            ),
            (
                "error quoting 4 transport bytes",
                error(3, &sent[14..38]),
                DropReason::Malformed,
            ),
            (
                "redirect (type 5) to a NAT address",
                redirect,
                DropReason::IcmpUnsupported,
            ),
            (
                "error frame shorter than its IP length",
                cut,
                DropReason::Malformed,
            ),
        ] {
            steps.push(provider(name, p0, frame, Want::Drop(reason)));
        }
        b.run(steps);
    });
}

/// Fragmentation needed (and other errors) from a router in front of a
/// client, about a reply: on to the backend, quote as the backend sent it.
#[test]
fn golden_icmp_errors_from_a_consumer_router() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| {
        let (c1, c2, p0, c1_mac, c2_mac, p0_mac) = (n.c1, n.c2, n.p0, n.c1_mac, n.c2_mac, n.p0_mac);
        let router = Ipv4Addr::new(192, 0, 2, 2);
        let far_client = Ipv4Addr::new(203, 0, 113, 10);
        let client = (far_client, 40000);
        let ep = (EP_TCP, 80);
        let key = fwd_key(1, client, ep, IPPROTO_TCP);
        let (backend, backend_mac) = service0_backend(&key);
        let nat = (NAT_TCP, first_port(&key, 1024..=65535));
        let syn = Ipv4Packet::tcp(client, ep, TCP_SYN).macs(ROUTER_MAC, c1_mac);
        // The backend's reply, and what the consumer side saw of it.
        let mut reply =
            Ipv4Packet::tcp((backend, 8080), nat, TCP_SYN | TCP_ACK).macs(backend_mac, p0_mac);
        reply.payload = vec![3; 40];
        let seen = untranslated(&reply, c1_mac, ROUTER_MAC, ep, client);
        let mut as_sent = reply.clone();
        as_sent.ttl = 63;
        let as_sent = as_sent.build();
        let frag_needed = |from, to, quoted: &[u8]| {
            Ipv4Packet::icmp(from, to, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1280, quoted)
        };
        let mut steps = vec![
            consumer(
                "the flow",
                c1,
                syn.build(),
                Want::Redirect(translated(&syn, p0_mac, (backend, 8080, backend_mac), nat)),
            ),
            provider("its reply", p0, reply.build(), Want::Redirect(seen.clone())),
        ];
        for (name, len) in [
            (
                "frag needed from a consumer router, TCP checksum quoted",
                14 + 40,
            ),
            (
                "frag needed from a consumer router, 8 bytes quoted",
                14 + 28,
            ),
        ] {
            let mut w = frag_needed(NAT_TCP, backend, &as_sent[14..len]).macs(p0_mac, backend_mac);
            w.ttl = 63;
            steps.push(consumer(
                name,
                c1,
                frag_needed(router, EP_TCP, &seen[14..len])
                    .macs(ROUTER_MAC, c1_mac)
                    .build(),
                Want::Redirect(w.build()),
            ));
        }
        let mut forged = seen.clone();
        forged[26..30].copy_from_slice(&EP_UDP.octets());
        steps.extend([
            // Network 2 has no such flow: isolation holds for errors too.
            consumer(
                "the same error from the other network",
                c2,
                frag_needed(router, EP_TCP, &seen[14..42])
                    .macs(ROUTER_MAC, c2_mac)
                    .build(),
                Want::Drop(DropReason::IcmpErrorNoFlow),
            ),
            consumer(
                "error quoting another endpoint than it is sent to",
                c1,
                frag_needed(router, EP_TCP, &forged[14..42])
                    .macs(ROUTER_MAC, c1_mac)
                    .build(),
                Want::Drop(DropReason::IcmpErrorNoFlow),
            ),
            consumer(
                "consumer error with a truncated quote",
                c1,
                frag_needed(router, EP_TCP, &seen[14..40])
                    .macs(ROUTER_MAC, c1_mac)
                    .build(),
                Want::Drop(DropReason::Malformed),
            ),
        ]);
        b.run(steps);
    });
}
