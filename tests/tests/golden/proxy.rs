//! PROXY protocol v2: the endpoint's header in front of the client's first
//! byte, sequence and acknowledgement numbers (SACK edges included) moved
//! by its length both ways, the SYN-ACK's MSS lowered by it, a SYN with
//! data refused. Every expected frame is built from scratch (lengths and
//! checksums computed anew), so an incremental update that went wrong
//! shows as a byte difference.

use plink_common::proxy::{ADDRS_OFF, LinkIdTlv, ProxyHeader, build_header};

use super::{
    mtu::{linux_syn_options, with_tcp_options},
    *,
};

const LINK_ID: u32 = 0x0A0B_0C0D;

fn proxied_spec(gw: &Gw, header: ProxyHeader) -> DataplaneSpec {
    let mut s = spec(gw);
    // Endpoint 0 (network 1) sends headers; endpoint 5 (network 2, same
    // address, same service) does not: a per-endpoint setting.
    s.proxy_headers.insert(0, header);
    s
}

/// The header as the backend must read it for `client` → `ep`.
fn header_for(h: &ProxyHeader, client: (Ipv4Addr, u16), ep: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut b = h.bytes[..h.len as usize].to_vec();
    let a = &mut b[ADDRS_OFF..ADDRS_OFF + 12];
    a[0..4].copy_from_slice(&client.0.octets());
    a[4..8].copy_from_slice(&ep.0.octets());
    a[8..10].copy_from_slice(&client.1.to_be_bytes());
    a[10..12].copy_from_slice(&ep.1.to_be_bytes());
    b
}

/// SACK option with one block, NOP-padded to 12 bytes.
fn sack(left: u32, right: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 5, 10];
    o.extend_from_slice(&left.to_be_bytes());
    o.extend_from_slice(&right.to_be_bytes());
    o
}

#[test]
fn golden_proxy_header_and_sequence_shifts() {
    let gw = gateway();
    let h = build_header(LinkIdTlv::Azure, LINK_ID, b"").unwrap();
    golden(&gw, proxied_spec(&gw, h), move |b, n, _| {
        let TcpFlow {
            client,
            ep,
            backend,
            backend_mac,
            nat,
            syn,
            ack,
        } = tcp_flow(&n, 40100);
        let len = h.len as u32;
        let header = header_for(&h, client, ep);
        assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
        let to_backend =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (backend, 8080, backend_mac), nat);
        let to_client = |p: &Ipv4Packet| untranslated(p, n.c1_mac, CLIENT_MAC, ep, client);
        let first = syn.seq + 1;
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let n_req = request.len() as u32;

        // The backend's SYN-ACK offers 1460; the client is told 1460 - len.
        let mut synack =
            Ipv4Packet::tcp((backend, 8080), nat, TCP_SYN | TCP_ACK).macs(backend_mac, n.p0_mac);
        synack.seq = 5000;
        synack.ack = first;
        let synack_in = with_tcp_options(&synack.build(), &linux_syn_options(1460));
        let synack_out =
            with_tcp_options(&to_client(&synack), &linux_syn_options(1460 - len as u16));

        let mut hs_ack = ack.clone();
        hs_ack.seq = first;
        hs_ack.ack = 5001;
        let mut data = hs_ack.clone();
        data.payload = request.clone();
        let mut grown = data.clone();
        grown.payload = [header.clone(), request.clone()].concat();
        let mut more = hs_ack.clone();
        more.seq = first + n_req;
        more.payload = b"more bytes".to_vec();
        let mut more_out = more.clone();
        more_out.seq = first + n_req + len;

        let reply_ack = |ack_no: u32| {
            let mut r = Ipv4Packet::tcp((backend, 8080), nat, TCP_ACK).macs(backend_mac, n.p0_mac);
            r.seq = 5001;
            r.ack = ack_no;
            r
        };
        let acked_all = reply_ack(first + len + n_req);
        let mut acked_all_out = acked_all.clone();
        acked_all_out.ack = first + n_req;
        let inside_header = reply_ack(first + 10);
        let mut inside_header_out = inside_header.clone();
        inside_header_out.ack = first;
        // The backend got the request and a later segment, not `more`.
        let (l, r) = (first + len + n_req + 100, first + len + n_req + 200);
        let sacked = with_tcp_options(&acked_all.build(), &sack(l, r));
        let sacked_out = with_tcp_options(&to_client(&acked_all_out), &sack(l - len, r - len));

        // A router behind the gateway: fragmentation needed about `more`
        // as the backend side carried it (seq moved up); the client must get
        // its own seq back in the quote, or it ignores the error.
        let router = Ipv4Addr::new(198, 51, 100, 254);
        let more_sent = to_backend(&more_out);
        let frag = icmp_error(
            router,
            NAT_TCP,
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            1400,
            &more_sent[14..42],
        )
        .macs(backend_mac, n.p0_mac)
        .build();
        let mut more63 = more.clone();
        more63.ttl = 63;
        let more_as_sent = more63.build();
        let mut frag_out = icmp_error(
            EP_TCP,
            CLIENT,
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            1400,
            &more_as_sent[14..42],
        );
        frag_out.ttl = 63;
        let frag_out = frag_out.macs(n.c1_mac, CLIENT_MAC).build();

        // A SYN with data (TCP Fast Open) for this endpoint opens nothing.
        let mut syn_data = Ipv4Packet::tcp((CLIENT, 40101), ep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
        syn_data.payload = b"early".to_vec();

        b.run(vec![
            consumer("syn", n.c1, syn.build(), Want::Redirect(to_backend(&syn))).deltas(opens(0)),
            provider(
                "syn-ack: the MSS leaves room for the header",
                n.p0,
                synack_in,
                Want::Redirect(synack_out),
            ),
            consumer(
                "handshake ack: no byte of the client's yet, unchanged",
                n.c1,
                hs_ack.build(),
                Want::Redirect(to_backend(&hs_ack)),
            ),
            consumer(
                "first data segment: the header in front of it",
                n.c1,
                data.build(),
                Want::Redirect(to_backend(&grown)),
            )
            .deltas([
                (Counter::Service(0, Field::ProxyHeaders), 1),
                (Counter::Endpoint(0, Field::ProxyHeaders), 1),
            ]),
            consumer(
                "retransmitted first segment: the same header again",
                n.c1,
                data.build(),
                Want::Redirect(to_backend(&grown)),
            ),
            consumer(
                "later segment: its sequence number moved up",
                n.c1,
                more.build(),
                Want::Redirect(to_backend(&more_out)),
            )
            .deltas([(Counter::Service(0, Field::ProxyHeaders), 0)]),
            provider(
                "fragmentation needed from a router: the quote's seq as the client sent it",
                n.p0,
                frag,
                Want::Redirect(frag_out),
            ),
            provider(
                "backend ack of everything: moved down",
                n.p0,
                acked_all.build(),
                Want::Redirect(to_client(&acked_all_out)),
            ),
            provider(
                "backend ack inside the header: none of the client's bytes",
                n.p0,
                inside_header.build(),
                Want::Redirect(to_client(&inside_header_out)),
            ),
            provider(
                "sack edges moved down like acks",
                n.p0,
                sacked,
                Want::Redirect(sacked_out),
            ),
            consumer(
                "syn with data",
                n.c1,
                syn_data.build(),
                Want::Drop(DropReason::ProxySynData),
            )
            .deltas([(Counter::Flows, 0), ep_drop(0, DropReason::ProxySynData)]),
        ]);
    });
}

/// A client that closes before sending anything: its FIN carries the
/// header, so the backend still learns who connected. Endpoint 5 (network
/// 2, no header) is untouched by endpoint 0's setting.
#[test]
fn golden_proxy_header_on_a_bare_fin_and_only_for_its_endpoint() {
    let gw = gateway();
    let h = build_header(LinkIdTlv::Aws, 0, b"vpce-0123456789abcdef0").unwrap();
    golden(&gw, proxied_spec(&gw, h), move |b, n, _| {
        let TcpFlow {
            client,
            ep,
            backend,
            backend_mac,
            nat,
            syn,
            ..
        } = tcp_flow(&n, 40200);
        let header = header_for(&h, client, ep);
        let to_backend =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (backend, 8080, backend_mac), nat);
        let mut fin = Ipv4Packet::tcp(client, ep, TCP_FIN | TCP_ACK).macs(CLIENT_MAC, n.c1_mac);
        fin.seq = syn.seq + 1;
        let mut fin_out = fin.clone();
        fin_out.payload = header;

        // Network 2's flow to the same address and service: no header.
        let key2 = fwd_key(2, client, ep, IPPROTO_TCP);
        let (backend2, backend2_mac) = service0_backend(&key2);
        let nat2 = (NAT_TCP, first_port(&key2, 1024..=65535));
        let syn2 = Ipv4Packet::tcp(client, ep, TCP_SYN).macs(ROUTER_MAC, n.c2_mac);
        let mut data2 = Ipv4Packet::tcp(client, ep, TCP_ACK).macs(ROUTER_MAC, n.c2_mac);
        data2.seq = syn2.seq + 1;
        data2.payload = b"no header here".to_vec();
        let to_backend2 =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (backend2, 8080, backend2_mac), nat2);

        b.run(vec![
            consumer("syn", n.c1, syn.build(), Want::Redirect(to_backend(&syn))),
            consumer(
                "fin before any data: it carries the header",
                n.c1,
                fin.build(),
                Want::Redirect(to_backend(&fin_out)),
            ),
            consumer(
                "other endpoint's syn",
                n.c2,
                syn2.build(),
                Want::Redirect(to_backend2(&syn2)),
            ),
            consumer(
                "other endpoint's data: unchanged",
                n.c2,
                data2.build(),
                Want::Redirect(to_backend2(&data2)),
            ),
        ]);
    });
}

/// A first segment that fits the provider MTU but not with the header:
/// fragmentation needed, with the MTU less the header, quoting the
/// client's own segment; the segment that then fits grows and leaves.
#[test]
fn golden_proxy_first_segment_too_big_once_grown() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "p0", "mtu", "1000"]).unwrap();
    let h = build_header(LinkIdTlv::Gcp, LINK_ID, b"").unwrap();
    golden(&gw, proxied_spec(&gw, h), move |b, n, _| {
        let TcpFlow {
            client,
            ep,
            backend,
            backend_mac,
            nat,
            syn,
            ack,
        } = tcp_flow(&n, 40300);
        let len = h.len as usize;
        let to_backend =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (backend, 8080, backend_mac), nat);
        let mut big = ack.clone();
        big.seq = syn.seq + 1;
        big.payload = vec![b'x'; 1000 - 40];
        let big_frame = big.build();
        let mut fits = big.clone();
        fits.payload = vec![b'y'; 1000 - 40 - len];
        let mut fits_out = fits.clone();
        fits_out.payload = [header_for(&h, client, ep), fits.payload.clone()].concat();
        b.run(vec![
            consumer("syn", n.c1, syn.build(), Want::Redirect(to_backend(&syn))),
            consumer(
                "1000 bytes, 1000 + header once grown",
                n.c1,
                &big_frame,
                Want::Tx(error_reply(
                    &big_frame,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    (1000 - len) as u16,
                    n.c1_mac,
                )),
            ),
            consumer(
                "the smaller segment grows to exactly 1000",
                n.c1,
                fits.build(),
                Want::Redirect(to_backend(&fits_out)),
            ),
        ]);
    });
}

/// What the review of the first version found, each as a case: a long
/// upload (past 2^31 bytes the signed comparison with the first byte turns
/// around), a stray SYN on an established flow, fragmentation needed about
/// the grown segment, and the service's encoding changed between a
/// connection's SYN and its first byte.
#[test]
fn golden_proxy_long_uploads_stray_syns_and_changes_before_the_first_byte() {
    let gw = gateway();
    let azure = build_header(LinkIdTlv::Azure, LINK_ID, b"").unwrap();
    let aws = build_header(
        LinkIdTlv::Aws,
        0,
        b"a-much-longer-endpoint-name-than-before",
    )
    .unwrap();
    assert_ne!(azure.len, aws.len);
    let later_spec = proxied_spec(&gw, aws);
    golden(&gw, proxied_spec(&gw, azure), move |b, n, _| {
        let TcpFlow {
            client,
            ep,
            backend,
            backend_mac,
            nat,
            syn,
            ack,
        } = tcp_flow(&n, 40400);
        let len = azure.len as u32;
        let to_backend =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (backend, 8080, backend_mac), nat);
        let to_client = |p: &Ipv4Packet| untranslated(p, n.c1_mac, CLIENT_MAC, ep, client);
        let first = syn.seq + 1;
        let seg = |offset: u32, data: &[u8]| {
            let mut p = ack.clone();
            p.seq = first.wrapping_add(offset);
            p.payload = data.to_vec();
            p
        };
        let shifted = |p: &Ipv4Packet| {
            let mut o = p.clone();
            o.seq = o.seq.wrapping_add(len);
            o
        };
        let data = seg(0, b"hello");
        let mut grown = data.clone();
        grown.payload = [header_for(&azure, client, ep), b"hello".to_vec()].concat();

        // Fragmentation needed from a router about the grown segment: the
        // client is told 1400 - len, the size its own segment must have.
        let router = Ipv4Addr::new(198, 51, 100, 254);
        let grown_sent = to_backend(&grown);
        let frag = icmp_error(
            router,
            NAT_TCP,
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            1400,
            &grown_sent[14..42],
        )
        .macs(backend_mac, n.p0_mac)
        .build();
        let mut data63 = data.clone();
        data63.ttl = 63;
        let data_as_sent = data63.build();
        let mut frag_out = icmp_error(
            EP_TCP,
            CLIENT,
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            1400 - len,
            &data_as_sent[14..42],
        );
        frag_out.ttl = 63;
        let frag_out = frag_out.macs(n.c1_mac, CLIENT_MAC).build();

        // A stray SYN (another sequence number) on the established flow.
        let mut stray = syn.clone();
        stray.seq = 777_777;
        let after_stray = seg(5, b"still shifted");

        // The upload passes 1 GiB, then 2 GiB and 4 GiB.
        let gib1 = seg((1 << 30) + 100, b"x");
        let gib2 = seg((1 << 31) + 100, b"y");
        let gib4 = seg(((1u64 << 32) + 100) as u32, b"z");
        let reply_ack = |ack_no: u32| {
            let mut r = Ipv4Packet::tcp((backend, 8080), nat, TCP_ACK).macs(backend_mac, n.p0_mac);
            r.seq = 5001;
            r.ack = ack_no;
            r
        };
        let ack_2g = reply_ack(first.wrapping_add((1u32 << 31) + 101 + len));
        let mut ack_2g_out = ack_2g.clone();
        ack_2g_out.ack = first.wrapping_add((1u32 << 31) + 101);

        // A second connection whose service changes encoding (another
        // header length) between its SYN and its first byte.
        let TcpFlow {
            client: client2,
            ep: ep2,
            backend: backend2,
            backend_mac: backend2_mac,
            nat: nat2,
            syn: syn2,
            ack: ack2,
        } = tcp_flow(&n, 40401);
        let to_backend2 =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (backend2, 8080, backend2_mac), nat2);
        let mut data2 = ack2.clone();
        data2.seq = syn2.seq + 1;
        data2.payload = b"first".to_vec();
        let mut grown2 = data2.clone();
        grown2.payload = [header_for(&aws, client2, ep2), b"first".to_vec()].concat();

        let mut synack =
            Ipv4Packet::tcp((backend, 8080), nat, TCP_SYN | TCP_ACK).macs(backend_mac, n.p0_mac);
        synack.seq = 5000;
        synack.ack = first;
        b.run(vec![
            consumer("syn", n.c1, syn.build(), Want::Redirect(to_backend(&syn))),
            provider(
                "syn-ack (no MSS option: left alone)",
                n.p0,
                synack.build(),
                Want::Redirect(to_client(&synack)),
            ),
            consumer(
                "first segment (with the handshake's ack)",
                n.c1,
                data.build(),
                Want::Redirect(to_backend(&grown)),
            ),
            provider(
                "fragmentation needed about the grown segment: its MTU less the header",
                n.p0,
                frag,
                Want::Redirect(frag_out),
            ),
            consumer(
                "a stray SYN on the established flow passes, mapped like any client segment",
                n.c1,
                stray.build(),
                Want::Redirect(to_backend(&shifted(&stray))),
            ),
            Step::expect("and the flow stays established", |b| {
                let flows = b.dp.list_conntrack().unwrap();
                assert!(flows.iter().all(|f| f.tcp_state == tcp_state::ESTABLISHED));
            }),
            consumer(
                "and changed nothing: still shifted from the first byte",
                n.c1,
                after_stray.build(),
                Want::Redirect(to_backend(&shifted(&after_stray))),
            ),
            consumer(
                "past 1 GiB",
                n.c1,
                gib1.build(),
                Want::Redirect(to_backend(&shifted(&gib1))),
            ),
            consumer(
                "past 2 GiB: still shifted",
                n.c1,
                gib2.build(),
                Want::Redirect(to_backend(&shifted(&gib2))),
            ),
            provider(
                "an ack past 2 GiB: still moved down",
                n.p0,
                ack_2g.build(),
                Want::Redirect(to_client(&ack_2g_out)),
            ),
            consumer(
                "past 4 GiB, at the first byte's number again: shifted, no header",
                n.c1,
                gib4.build(),
                Want::Redirect(to_backend(&shifted(&gib4))),
            ),
            consumer(
                "second connection's syn",
                n.c1,
                syn2.build(),
                Want::Redirect(to_backend2(&syn2)),
            ),
            Step::act("the service's link-id encoding changes", move |b| {
                b.dp.apply(&later_spec).unwrap()
            }),
            consumer(
                "its first byte gets the header as it is now",
                n.c1,
                data2.build(),
                Want::Redirect(to_backend2(&grown2)),
            ),
        ]);
    });
}
