//! Golden cases not yet in tables.

use super::*;

/// RFC 5508 errors from the provider side back to the flow's consumer:
/// outer and quoted headers translated, every checksum valid.
#[test]
fn golden_icmp_errors_from_the_provider() {
    let gw = gateway();
    let spec = spec(&gw);
    let (c1, c2, p0, c1_mac, c2_mac, p0_mac) =
        (gw.c1, gw.c2, gw.p0, gw.c1_mac, gw.c2_mac, gw.p0_mac);
    let router = Ipv4Addr::new(198, 51, 100, 254);
    gw.host
        .run_in(move || {
            let mut b = Bench::new(&spec);
            // A UDP flow.
            let client = (CLIENT, 5000);
            let ep = (EP_UDP, 53);
            let key = fwd_key(1, client, ep, IPPROTO_UDP);
            let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
            let q = Ipv4Packet::udp(client, ep, b"query").macs(CLIENT_MAC, c1_mac);
            let sent = translated(&q, p0_mac, (BACKEND10, 5353, BACKEND10_MAC), nat);
            assert_eq!(
                b.raw(prog_names::CONSUMER, c1, &q.build()).verdict,
                verdict::REDIRECT
            );
            // What the consumer sent, as the backend saw it (TTL 63).
            let mut q63 = q.clone();
            q63.ttl = 63;
            let as_sent = q63.build();

            let err = icmp_error(
                BACKEND10,
                NAT_UDP,
                ICMP_DEST_UNREACH,
                ICMP_PORT_UNREACH,
                0,
                &sent[14..],
            )
            .macs(BACKEND10_MAC, p0_mac);
            let mut want = icmp_error(
                EP_UDP,
                CLIENT,
                ICMP_DEST_UNREACH,
                ICMP_PORT_UNREACH,
                0,
                &as_sent[14..],
            )
            .macs(c1_mac, CLIENT_MAC);
            want.ttl = 63;
            let run = b.case(
                "port unreachable, whole packet quoted",
                prog_names::PROVIDER,
                p0,
                &err.build(),
                Want::Redirect(want.build()),
            );
            // The quoted packet is again exactly what the consumer sent.
            assert!(l4_checksum_ok(
                &[&run.output[..14], &run.output[42..]].concat()
            ));

            // Quote of 8 transport bytes (RFC 792 minimum): the UDP checksum is among them.
            let err8 = icmp_error(router, NAT_UDP, ICMP_TIME_EXCEEDED, 0, 0, &sent[14..42])
                .macs(BACKEND10_MAC, p0_mac);
            let mut want8 = icmp_error(EP_UDP, CLIENT, ICMP_TIME_EXCEEDED, 0, 0, &as_sent[14..42])
                .macs(c1_mac, CLIENT_MAC);
            want8.ttl = 63;
            b.case(
                "time exceeded from a router, 8 bytes quoted",
                prog_names::PROVIDER,
                p0,
                &err8.build(),
                Want::Redirect(want8.build()),
            );

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
            assert_eq!(
                b.raw(prog_names::CONSUMER, c2, &syn.build()).verdict,
                verdict::REDIRECT
            );
            let mut syn63 = syn.clone();
            syn63.ttl = 63;
            let tas_sent = syn63.build();
            for (name, n) in [
                ("frag needed quoting the TCP checksum", 14 + 20 + 20),
                ("frag needed quoting 8 TCP bytes", 14 + 20 + 8),
            ] {
                let e = icmp_error(
                    router,
                    NAT_TCP,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1400,
                    &tsent[14..n],
                )
                .macs(backend_mac, p0_mac);
                let mut w = icmp_error(
                    EP_TCP,
                    CLIENT,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1400,
                    &tas_sent[14..n],
                )
                .macs(c2_mac, CLIENT_MAC);
                w.ttl = 63;
                b.case(
                    name,
                    prog_names::PROVIDER,
                    p0,
                    &e.build(),
                    Want::Redirect(w.build()),
                );
            }

            // An echo flow: time exceeded quoting the echo request.
            let id = 0x77;
            let ekey = fwd_key(1, (CLIENT, id), (EP_TCP, 0), IPPROTO_ICMP);
            let (eb, eb_mac) = service0_backend(&ekey);
            let enat = first_port(&ekey, 1024..=65535);
            let req = Ipv4Packet::echo(CLIENT, EP_TCP, true, id, 1).macs(CLIENT_MAC, c1_mac);
            let run = b.raw(prog_names::CONSUMER, c1, &req.build());
            assert_eq!(run.verdict, verdict::REDIRECT);
            let mut req63 = req.clone();
            req63.ttl = 63;
            let e = icmp_error(
                router,
                NAT_TCP,
                ICMP_TIME_EXCEEDED,
                0,
                0,
                &run.output[14..42],
            )
            .macs(eb_mac, p0_mac);
            let mut w = icmp_error(
                EP_TCP,
                CLIENT,
                ICMP_TIME_EXCEEDED,
                0,
                0,
                &req63.build()[14..42],
            )
            .macs(c1_mac, CLIENT_MAC);
            w.ttl = 63;
            let _ = (eb, enat);
            b.case(
                "time exceeded quoting an echo request",
                prog_names::PROVIDER,
                p0,
                &e.build(),
                Want::Redirect(w.build()),
            );

            // Errors that match no flow, forged or truncated ones.
            let mut other_port = sent.clone();
            other_port[34..36].copy_from_slice(&(nat.1 ^ 0x100).to_be_bytes());
            let mut forged_src = sent.clone();
            forged_src[26..30].copy_from_slice(&NAT_TCP.octets());
            let mut options = sent.clone();
            options[14] = 0x46;
            let drops: Vec<(&str, Vec<u8>, DropReason)> = vec![
                (
                    "error quoting a port of no flow",
                    icmp_error(BACKEND10, NAT_UDP, 3, 3, 0, &other_port[14..42])
                        .macs(BACKEND10_MAC, p0_mac)
                        .build(),
                    DropReason::IcmpErrorNoFlow,
                ),
                (
                    "error quoting another NAT address than it is sent to",
                    icmp_error(BACKEND10, NAT_UDP, 3, 3, 0, &forged_src[14..42])
                        .macs(BACKEND10_MAC, p0_mac)
                        .build(),
                    DropReason::IcmpErrorNoFlow,
                ),
                (
                    "error quoting a header with options",
                    icmp_error(BACKEND10, NAT_UDP, 3, 3, 0, &options[14..42])
                        .macs(BACKEND10_MAC, p0_mac)
                        .build(),
                    DropReason::IcmpErrorNoFlow,
                ),
                (
                    "error quoting only an IP header",
                    icmp_error(BACKEND10, NAT_UDP, 3, 3, 0, &sent[14..34])
                        .macs(BACKEND10_MAC, p0_mac)
                        .build(),
                    DropReason::Malformed,
                ),
                (
                    "error quoting 4 transport bytes",
                    icmp_error(BACKEND10, NAT_UDP, 3, 3, 0, &sent[14..38])
                        .macs(BACKEND10_MAC, p0_mac)
                        .build(),
                    DropReason::Malformed,
                ),
                (
                    "redirect (type 5) to a NAT address",
                    icmp_error(BACKEND10, NAT_UDP, 5, 0, 0, &sent[14..42])
                        .macs(BACKEND10_MAC, p0_mac)
                        .build(),
                    DropReason::IcmpUnsupported,
                ),
            ];
            for (name, frame, reason) in drops {
                b.case(name, prog_names::PROVIDER, p0, &frame, Want::Drop(reason));
            }
            // A quote cut short by the frame, not the IP length: IP says more
            // than the frame holds.
            let mut cut = err.build();
            cut.truncate(14 + 20 + 8 + 20 + 4);
            b.case(
                "error frame shorter than its IP length",
                prog_names::PROVIDER,
                p0,
                &cut,
                Want::Drop(DropReason::Malformed),
            );
            let _ = c2;
        })
        .unwrap();
}

/// Too big for the provider side's MTU: fragmentation needed (with the
/// MTU) back to the consumer for DF packets; a counted drop without DF.
#[test]
fn golden_frag_needed_on_the_forward_path() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "p0", "mtu", "1000"]).unwrap();
    let spec = spec(&gw);
    let (c1, p0_mac, c1_mac) = (gw.c1, gw.p0_mac, gw.c1_mac);
    gw.host
        .run_in(move || {
            let mut b = Bench::new(&spec);
            let client = (CLIENT, 5000);
            let ep = (EP_UDP, 53);
            let key = fwd_key(1, client, ep, IPPROTO_UDP);
            let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
            let fits = Ipv4Packet::udp(client, ep, &[7; 972]).macs(CLIENT_MAC, c1_mac);
            b.case(
                "1000 bytes fit",
                prog_names::CONSUMER,
                c1,
                &fits.build(),
                Want::Redirect(translated(
                    &fits,
                    p0_mac,
                    (BACKEND10, 5353, BACKEND10_MAC),
                    nat,
                )),
            );
            let big = Ipv4Packet::udp(client, ep, &[7; 973]).macs(CLIENT_MAC, c1_mac);
            let frame = big.build();
            b.case(
                "1001 bytes with DF",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Tx(error_reply(
                    &frame,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1000,
                    c1_mac,
                )),
            );
            let mut no_df = frame.clone();
            no_df[20] = 0;
            fix_checksums(&mut no_df);
            b.case(
                "1001 bytes without DF",
                prog_names::CONSUMER,
                c1,
                &no_df,
                Want::Drop(DropReason::FragNeeded),
            );
        })
        .unwrap();
}

/// Fragmentation needed (and other errors) from a router in front of a
/// client, about a reply: on to the backend, quote as the backend sent it.
#[test]
fn golden_icmp_errors_from_a_consumer_router() {
    let gw = gateway();
    let spec = spec(&gw);
    let (c1, c2, p0, c1_mac, c2_mac, p0_mac) =
        (gw.c1, gw.c2, gw.p0, gw.c1_mac, gw.c2_mac, gw.p0_mac);
    let router = Ipv4Addr::new(192, 0, 2, 2);
    let far_client = Ipv4Addr::new(203, 0, 113, 10);
    gw.host
        .run_in(move || {
            let mut b = Bench::new(&spec);
            let client = (far_client, 40000);
            let ep = (EP_TCP, 80);
            let key = fwd_key(1, client, ep, IPPROTO_TCP);
            let (backend, backend_mac) = service0_backend(&key);
            let nat = (NAT_TCP, first_port(&key, 1024..=65535));
            let syn = Ipv4Packet::tcp(client, ep, TCP_SYN).macs(ROUTER_MAC, c1_mac);
            assert_eq!(
                b.raw(prog_names::CONSUMER, c1, &syn.build()).verdict,
                verdict::REDIRECT
            );
            // The backend's reply, and what the consumer side saw of it.
            let mut reply =
                Ipv4Packet::tcp((backend, 8080), nat, TCP_SYN | TCP_ACK).macs(backend_mac, p0_mac);
            reply.payload = vec![3; 40];
            let run = b.raw(prog_names::PROVIDER, p0, &reply.build());
            assert_eq!(run.verdict, verdict::REDIRECT);
            let seen = run.output;
            let mut as_sent = reply.clone();
            as_sent.ttl = 63;
            let as_sent = as_sent.build();
            for (name, n) in [
                (
                    "frag needed from a consumer router, TCP checksum quoted",
                    14 + 40,
                ),
                (
                    "frag needed from a consumer router, 8 bytes quoted",
                    14 + 28,
                ),
            ] {
                let e = Ipv4Packet::icmp(
                    router,
                    EP_TCP,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1280,
                    &seen[14..n],
                )
                .macs(ROUTER_MAC, c1_mac);
                let mut w = Ipv4Packet::icmp(
                    NAT_TCP,
                    backend,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1280,
                    &as_sent[14..n],
                )
                .macs(p0_mac, backend_mac);
                w.ttl = 63;
                b.case(
                    name,
                    prog_names::CONSUMER,
                    c1,
                    &e.build(),
                    Want::Redirect(w.build()),
                );
            }
            // Network 2 has no such flow: isolation holds for errors too.
            let e = Ipv4Packet::icmp(
                router,
                EP_TCP,
                ICMP_DEST_UNREACH,
                ICMP_FRAG_NEEDED,
                1280,
                &seen[14..42],
            )
            .macs(ROUTER_MAC, c2_mac);
            b.case(
                "the same error from the other network",
                prog_names::CONSUMER,
                c2,
                &e.build(),
                Want::Drop(DropReason::IcmpErrorNoFlow),
            );
            let mut forged = seen.clone();
            forged[26..30].copy_from_slice(&EP_UDP.octets());
            let e = Ipv4Packet::icmp(
                router,
                EP_TCP,
                ICMP_DEST_UNREACH,
                ICMP_FRAG_NEEDED,
                1280,
                &forged[14..42],
            )
            .macs(ROUTER_MAC, c1_mac);
            b.case(
                "error quoting another endpoint than it is sent to",
                prog_names::CONSUMER,
                c1,
                &e.build(),
                Want::Drop(DropReason::IcmpErrorNoFlow),
            );
            let e = Ipv4Packet::icmp(
                router,
                EP_TCP,
                ICMP_DEST_UNREACH,
                ICMP_FRAG_NEEDED,
                1280,
                &seen[14..40],
            )
            .macs(ROUTER_MAC, c1_mac);
            b.case(
                "consumer error with a truncated quote",
                prog_names::CONSUMER,
                c1,
                &e.build(),
                Want::Drop(DropReason::Malformed),
            );
        })
        .unwrap();
}
