//! NAT64: IPv6 endpoint addresses in front of the IPv4 services of the
//! common spec. A consumer's IPv6 packet leaves as IPv4 from the NAT
//! address (RFC 7915 header translation: TTL = hop limit - 1, DF, ID 0,
//! ICMPv6 echo as ICMP echo); the IPv4 reply comes back as IPv6 from the
//! endpoint address. Every expected frame is built from scratch with its
//! own checksums, so a translation that got one wrong fails here.

use std::net::Ipv6Addr;

use plink_tests::packet::{
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPPROTO_ICMPV6, Ipv6Packet, ip_checksum_ok, l4_checksum6_ok,
};

use super::{
    ipv6::{CLIENT6, icmp6_error, ip6},
    *,
};

/// NAT64 endpoint addresses: TCP 80 → service 0, UDP 53 → service 1.
const EP64_TCP: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x64]);
const EP64_UDP: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x65]);
const EP_ID_TCP64: u32 = 20;
const EP_ID_UDP64: u32 = 21;

/// The common (IPv4) spec plus two IPv6 endpoints of its IPv4 services.
fn spec64(gw: &Gw) -> DataplaneSpec {
    let mut s = spec(gw);
    s.endpoints.extend([
        tcp_endpoint(EP_ID_TCP64, 1, EP64_TCP, 0),
        EndpointSpec {
            protocol: Protocol::Udp,
            ports: vec![PortSpec {
                port: 53,
                target_port: 5353,
            }],
            ..tcp_endpoint(EP_ID_UDP64, 1, EP64_UDP, 1)
        },
    ]);
    s.validate().expect("the NAT64 spec is valid");
    s
}

fn fwd_key64(client: (Ipv6Addr, u16), ep: (Ipv6Addr, u16), proto: u8) -> CtFwdKey {
    CtFwdKey {
        src_addr_be: plink_common::v6(client.0.octets()),
        dst_addr_be: plink_common::v6(ep.0.octets()),
        network_id: 1,
        src_port_be: client.1.to_be(),
        dst_port_be: ep.1.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// The IPv4 packet a translated IPv6 one becomes: same transport header
/// and payload, TTL one less than the hop limit, DF, identification 0.
fn as_v4(p: &Ipv6Packet, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Ipv4Packet {
    let mut t = Ipv4Packet::tcp(src, dst, p.tcp_flags);
    t.proto = match p.proto {
        IPPROTO_ICMPV6 => IPPROTO_ICMP,
        other => other,
    };
    if t.proto == IPPROTO_ICMP {
        t.tcp_flags = if p.tcp_flags == 128 {
            ICMP_ECHO_REQUEST
        } else {
            ICMP_ECHO_REPLY
        };
        t.icmp_code = p.icmp_code;
    }
    t.seq = p.seq;
    t.ack = p.ack;
    t.ttl = p.hop - 1;
    t.ip_id = 0;
    t.payload = p.payload.clone();
    t
}

/// The IPv6 packet a translated IPv4 reply becomes.
fn as_v6(p: &Ipv4Packet, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Ipv6Packet {
    let mut t = Ipv6Packet::tcp(src, dst, p.tcp_flags);
    t.proto = match p.proto {
        IPPROTO_ICMP => IPPROTO_ICMPV6,
        other => other,
    };
    if t.proto == IPPROTO_ICMPV6 {
        t.tcp_flags = if p.tcp_flags == ICMP_ECHO_REQUEST {
            128
        } else {
            129
        };
        t.icmp_code = p.icmp_code;
    }
    t.seq = p.seq;
    t.ack = p.ack;
    t.hop = p.ttl - 1;
    t.payload = p.payload.clone();
    t
}

fn redirect4(want: Vec<u8>) -> Want {
    assert!(
        ip_checksum_ok(&want) && l4_checksum_ok(&want),
        "the expected IPv4 frame is valid"
    );
    Want::Redirect(want)
}

fn redirect6(want: Vec<u8>) -> Want {
    assert!(l4_checksum6_ok(&want), "the expected IPv6 frame is valid");
    Want::Redirect(want)
}

#[test]
fn golden_nat64_tcp_udp_and_echo() {
    let gw = gateway();
    golden(&gw, spec64(&gw), |b, n, _| {
        // TCP: SYN, SYN-ACK, data both ways.
        let client = (CLIENT6, 40000);
        let ep = (EP64_TCP, 80);
        let key = fwd_key64(client, ep, IPPROTO_TCP);
        let (backend_addr, backend_mac) = service0_backend(&key);
        let backend = (backend_addr, 8080);
        let nat = (NAT_TCP, first_port(&key, 1024..=65535));
        let syn = Ipv6Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
        let mut data = Ipv6Packet::tcp(client, ep, TCP_ACK).macs(CLIENT_MAC, n.c1_mac);
        data.payload = b"GET / HTTP/1.0\r\n\r\n".to_vec();
        let synack = Ipv4Packet::tcp(backend, nat, TCP_SYN | TCP_ACK).macs(backend_mac, n.p0_mac);
        let mut reply = Ipv4Packet::tcp(backend, nat, TCP_ACK).macs(backend_mac, n.p0_mac);
        reply.payload = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();

        // UDP, to service 1's one backend.
        let uclient = (CLIENT6, 5000);
        let uep = (EP64_UDP, 53);
        let ukey = fwd_key64(uclient, uep, IPPROTO_UDP);
        let unat = (NAT_UDP, first_port(&ukey, UDP_PORTS));
        let ubackend = (BACKEND10, 5353);
        let query = Ipv6Packet::udp(uclient, uep, b"query").macs(CLIENT_MAC, n.c1_mac);
        let answer = Ipv4Packet::udp(ubackend, unat, b"answer!").macs(BACKEND10_MAC, n.p0_mac);
        let mut no_checksum = answer.build();
        no_checksum[40..42].copy_from_slice(&[0, 0]);

        // Echo: the identifier is translated like a port; ICMPv6 and ICMP
        // differ in type and pseudo-header.
        let id = 0x4242;
        let ekey = fwd_key64((CLIENT6, id), (EP64_TCP, 0), IPPROTO_ICMPV6);
        let (eb_addr, eb_mac) = service0_backend(&ekey);
        let nat_id = first_port(&ekey, 1024..=65535);
        let ping = Ipv6Packet::echo(CLIENT6, EP64_TCP, true, id, 7).macs(CLIENT_MAC, n.c1_mac);
        let mut ping_out = as_v4(&ping, (NAT_TCP, 0), (eb_addr, 0)).macs(n.p0_mac, eb_mac);
        ping_out.seq = ((nat_id as u32) << 16) | 7;
        let mut pong = Ipv4Packet::echo(eb_addr, NAT_TCP, false, nat_id, 7).macs(eb_mac, n.p0_mac);
        pong.payload = ping.payload.clone();
        let mut pong_back = as_v6(&pong, (EP64_TCP, 0), (CLIENT6, 0)).macs(n.c1_mac, CLIENT_MAC);
        pong_back.seq = ((id as u32) << 16) | 7;

        // IPv4 errors about the TCP flow's packet (as the gateway sent it)
        // become ICMPv6 errors from the endpoint address, quoting the
        // client's own IPv6 packet (hop limit as the gateway sent it).
        let sent = as_v4(&syn, nat, backend)
            .macs(n.p0_mac, backend_mac)
            .build();
        let mut own = syn.clone();
        own.hop -= 1;
        let own = own.build();
        let router4 = Ipv4Addr::new(198, 51, 100, 1);
        let error4 = |ty, code, rest, quoted: usize| {
            Ipv4Packet::icmp(router4, NAT_TCP, ty, code, rest, &sent[14..14 + quoted])
                .macs(backend_mac, n.p0_mac)
                .build()
        };
        let error6 = |ty, code, rest, quoted: usize| {
            let mut e = Ipv6Packet::icmp(EP64_TCP, CLIENT6, ty, code, rest, &own[14..14 + quoted])
                .macs(n.c1_mac, CLIENT_MAC);
            e.hop = 63;
            redirect6(e.build())
        };
        // ICMPv6 errors from a consumer-side router about the SYN-ACK as
        // the client got it become ICMP errors to the backend from the NAT
        // address, quoting the SYN-ACK as the backend sent it.
        let router6 = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 2]);
        let seen = as_v6(&synack, ep, client)
            .macs(n.c1_mac, CLIENT_MAC)
            .build();
        let mut synack_sent = synack.clone();
        synack_sent.ttl -= 1;
        synack_sent.ip_id = 0;
        let synack_sent = synack_sent.build();
        let error6_in = |ty, code, rest, quoted: usize| {
            Ipv6Packet::icmp(router6, EP64_TCP, ty, code, rest, &seen[14..14 + quoted])
                .macs(CLIENT_MAC, n.c1_mac)
                .build()
        };
        let error4_out = |ty, code, rest, quoted: usize| {
            let mut e = Ipv4Packet::icmp(
                NAT_TCP,
                backend_addr,
                ty,
                code,
                rest,
                &synack_sent[14..14 + quoted],
            )
            .macs(n.p0_mac, backend_mac);
            e.ttl = 63;
            e.ip_id = 0;
            redirect4(e.build())
        };
        b.run(vec![
            consumer(
                "IPv6 SYN: IPv4 from the NAT address to the backend",
                n.c1,
                syn.build(),
                redirect4(
                    as_v4(&syn, nat, backend)
                        .macs(n.p0_mac, backend_mac)
                        .build(),
                ),
            )
            .deltas(opens(EP_ID_TCP64)),
            Step::expect("the flow is listed IPv6 in front, IPv4 behind", move |b| {
                let flows = b.dp.list_conntrack().unwrap();
                assert_eq!(flows.len(), 1, "one flow");
                let f = &flows[0];
                assert_eq!(f.client, (client.0.into(), client.1));
                assert_eq!(f.endpoint, (ep.0.into(), ep.1));
                assert_eq!(f.nat, (nat.0.into(), nat.1));
                assert_eq!(f.backend, (backend.0.into(), backend.1));
                assert_eq!(f.endpoint_id, EP_ID_TCP64);
            }),
            provider(
                "IPv4 SYN-ACK: IPv6 from the endpoint address to the client",
                n.p0,
                synack.build(),
                redirect6(
                    as_v6(&synack, ep, client)
                        .macs(n.c1_mac, CLIENT_MAC)
                        .build(),
                ),
            ),
            consumer(
                "packet too big (1280) from a consumer router: frag needed (1260) to the backend",
                n.c1,
                error6_in(2, 0, 1280, 60),
                error4_out(3, 4, 1260, 40),
            ),
            consumer(
                "port unreachable from a consumer router, 8 quoted bytes",
                n.c1,
                error6_in(1, 4, 0, 48),
                error4_out(3, 3, 0, 28),
            ),
            consumer(
                "hop limit exceeded from a consumer router: time exceeded",
                n.c1,
                error6_in(3, 0, 0, 48),
                error4_out(11, 0, 0, 28),
            ),
            consumer(
                "parameter problem at the source address: at IPv4's (RFC 7915 figure 6)",
                n.c1,
                error6_in(4, 0, 8, 48),
                error4_out(12, 0, 12 << 24, 28),
            ),
            consumer(
                "parameter problem at the flow label (no IPv4 field): icmp_unsupported",
                n.c1,
                error6_in(4, 0, 2, 48),
                Want::Drop(DropReason::IcmpUnsupported),
            ),
            consumer(
                "IPv6 data",
                n.c1,
                data.build(),
                redirect4(
                    as_v4(&data, nat, backend)
                        .macs(n.p0_mac, backend_mac)
                        .build(),
                ),
            )
            .deltas([(Counter::Flows, 0)]),
            provider(
                "IPv4 reply data",
                n.p0,
                reply.build(),
                redirect6(as_v6(&reply, ep, client).macs(n.c1_mac, CLIENT_MAC).build()),
            ),
            consumer(
                "UDP query",
                n.c1,
                query.build(),
                redirect4(
                    as_v4(&query, unat, ubackend)
                        .macs(n.p0_mac, BACKEND10_MAC)
                        .build(),
                ),
            )
            .deltas(opens(EP_ID_UDP64)),
            provider(
                "UDP answer",
                n.p0,
                answer.build(),
                redirect6(
                    as_v6(&answer, uep, uclient)
                        .macs(n.c1_mac, CLIENT_MAC)
                        .build(),
                ),
            ),
            provider(
                "a UDP answer without checksum (IPv6 needs one): nat64_udp_no_checksum",
                n.p0,
                no_checksum,
                Want::Drop(DropReason::Nat64UdpNoChecksum),
            ),
            consumer(
                "echo request: ICMP echo from the NAT address",
                n.c1,
                ping.build(),
                redirect4(ping_out.build()),
            )
            .deltas(opens(EP_ID_TCP64)),
            provider(
                "echo reply: ICMPv6 echo reply from the endpoint address",
                n.p0,
                pong.build(),
                redirect6(pong_back.build()),
            ),
            provider(
                "port unreachable: ICMPv6 port unreachable, 8 quoted bytes",
                n.p0,
                error4(3, 3, 0, 28),
                error6(1, 4, 0, 48),
            ),
            provider(
                "frag needed, MTU 1400: packet too big, MTU 1420, the TCP checksum quoted",
                n.p0,
                error4(3, 4, 1400, 40),
                error6(2, 0, 1420, 60),
            ),
            provider(
                "time exceeded: ICMPv6 time exceeded",
                n.p0,
                error4(11, 0, 0, 28),
                error6(3, 0, 0, 48),
            ),
            provider(
                "parameter problem at the protocol byte: at the next header (RFC 7915 figure 3)",
                n.p0,
                error4(12, 0, 9 << 24, 28),
                error6(4, 0, 6, 48),
            ),
            provider(
                "parameter problem at the identification (no IPv6 field): icmp_unsupported",
                n.p0,
                error4(12, 0, 4 << 24, 28),
                Want::Drop(DropReason::IcmpUnsupported),
            ),
            // SYN, data, echo request and the four translated errors.
            Step::count(Counter::Endpoint(EP_ID_TCP64, Field::PacketsIn), 7),
            // SYN-ACK, reply data, echo reply and the four translated errors.
            Step::count(Counter::Endpoint(EP_ID_TCP64, Field::PacketsOut), 7),
            Step::count(Counter::Endpoint(EP_ID_UDP64, Field::PacketsOut), 1),
        ]);
    });
}

/// The provider route's MTU (IPv4) is 20 bytes more as an IPv6 one: a
/// packet that would be too big once translated is answered with Packet
/// Too Big carrying that MTU; a reply too big for the consumer interface
/// once grown gets fragmentation needed with 20 bytes less.
#[test]
fn golden_nat64_path_mtu_counts_the_header_difference() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "p0", "mtu", "1280"]).unwrap();
    gw.host.ip(&["link", "set", "c1", "mtu", "1300"]).unwrap();
    golden(&gw, spec64(&gw), |b, n, _| {
        let client = (CLIENT6, 5000);
        let ep = (EP64_UDP, 53);
        let key = fwd_key64(client, ep, IPPROTO_UDP);
        let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
        let backend = (BACKEND10, 5353);
        // 1300 bytes of IPv6 are 1280 of IPv4: fits p0 exactly.
        let fits = Ipv6Packet::udp(client, ep, &[7; 1252]).macs(CLIENT_MAC, n.c1_mac);
        let big = Ipv6Packet::udp((CLIENT6, 5001), ep, &[7; 1253])
            .macs(CLIENT_MAC, n.c1_mac)
            .build();
        // 1280 bytes of IPv4 grow to 1300 of IPv6: fit c1 exactly.
        let reply =
            |len| Ipv4Packet::udp(backend, nat, &vec![9; len]).macs(BACKEND10_MAC, n.p0_mac);
        let reply_fits = reply(1252);
        let reply_big = reply(1253).build();
        b.run(vec![
            consumer(
                "1300 bytes of IPv6 fit an IPv4 MTU of 1280",
                n.c1,
                fits.build(),
                redirect4(
                    as_v4(&fits, nat, backend)
                        .macs(n.p0_mac, BACKEND10_MAC)
                        .build(),
                ),
            )
            .deltas(opens(EP_ID_UDP64)),
            consumer(
                "1301 bytes: packet too big with MTU 1300 (IPv4's 1280 + 20), no flow",
                n.c1,
                &big,
                Want::Tx(icmp6_error(&big, 2, 1300, n.c1_mac)),
            )
            .deltas([(Counter::Flows, 0)]),
            provider(
                "a 1280-byte IPv4 reply grows to 1300 and fits c1",
                n.p0,
                reply_fits.build(),
                redirect6(
                    as_v6(&reply_fits, ep, client)
                        .macs(n.c1_mac, CLIENT_MAC)
                        .build(),
                ),
            ),
            provider(
                "a 1281-byte IPv4 reply: fragmentation needed with MTU 1280 (c1's 1300 - 20)",
                n.p0,
                &reply_big,
                Want::Tx(error_reply(
                    &reply_big,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1280,
                    n.p0_mac,
                )),
            )
            .deltas([
                (Counter::Service(1, Field::FragNeededToBackend), 1),
                (
                    Counter::Endpoint(EP_ID_UDP64, Field::FragNeededToBackend),
                    1,
                ),
            ]),
        ]);
    });
}

/// Established NAT64 flows take the fast path: the next hop the first
/// packet's route lookup cached is used until the hop generation moves
/// (a neighbour change alone does not reach them), as for IPv4 and NAT66;
/// a rejected endpoint's flow is cut without a purge.
#[test]
fn golden_nat64_established_flows_use_the_cached_next_hop() {
    let gw = gateway();
    golden(&gw, spec64(&gw), |b, n, spec| {
        let client = (CLIENT6, 5100);
        let ep = (EP64_UDP, 53);
        let key = fwd_key64(client, ep, IPPROTO_UDP);
        let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
        let backend = (BACKEND10, 5353);
        let q = Ipv6Packet::udp(client, ep, b"query").macs(CLIENT_MAC, n.c1_mac);
        let moved: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x78];
        let to = |mac: [u8; 6]| redirect4(as_v4(&q, nat, backend).macs(n.p0_mac, mac).build());
        let rejected = {
            let mut s = spec.clone();
            s.endpoints
                .iter_mut()
                .filter(|e| e.id == EP_ID_UDP64)
                .for_each(|e| e.state = EndpointState::Rejected);
            s
        };
        b.run(vec![
            consumer("the first packet", n.c1, q.build(), to(BACKEND10_MAC))
                .deltas(opens(EP_ID_UDP64)),
            consumer("established", n.c1, q.build(), to(BACKEND10_MAC)),
            Step::act("the backend's neighbour entry moves", move |_| {
                let status = std::process::Command::new("ip")
                    .args(["neigh", "replace", &BACKEND10.to_string(), "lladdr"])
                    .arg("02:00:00:00:01:78")
                    .args(["dev", "p0", "nud", "permanent"])
                    .status()
                    .unwrap();
                assert!(status.success(), "ip neigh replace");
            }),
            consumer(
                "cached next hop: no route lookup",
                n.c1,
                q.build(),
                to(BACKEND10_MAC),
            ),
            Step::act("the hop generation moves", |b| b.dp.bump_hop_gen().unwrap()),
            consumer(
                "next hop looked up again after the generation moved",
                n.c1,
                q.build(),
                to(moved),
            ),
            consumer("and cached again", n.c1, q.build(), to(moved)).deltas([(Counter::Flows, 0)]),
            Step::Apply(rejected),
            consumer(
                "a rejected endpoint's flow, without a purge",
                n.c1,
                q.build(),
                Want::Drop(DropReason::EndpointRejected),
            ),
            Step::count(Counter::Endpoint(EP_ID_UDP64, Field::PacketsIn), 5),
        ]);
    });
}

/// MSS clamping through NAT64: the SYN leaves as IPv4 with its MSS
/// clamped, the SYN-ACK comes back as IPv6 with its MSS clamped; `auto`
/// takes 60 bytes of headers off the smaller MTU both ways (the client's
/// side is IPv6).
#[test]
fn golden_nat64_mss_clamp_on_syn_and_syn_ack() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "c1", "mtu", "1400"]).unwrap();
    let mut s = spec64(&gw);
    s.services[0].mss_clamp = 1200;
    golden(&gw, s, |b, n, spec| {
        let opts = super::mtu::linux_syn_options;
        let flow = |port: u16| {
            let client = (CLIENT6, port);
            let ep = (EP64_TCP, 80);
            let key = fwd_key64(client, ep, IPPROTO_TCP);
            let (backend, mac) = service0_backend(&key);
            let nat = (NAT_TCP, first_port(&key, 1024..=65535));
            (client, ep, nat, (backend, 8080), mac)
        };
        let syn = |port: u16, mss: u16, out: u16| {
            let (client, ep, nat, backend, mac) = flow(port);
            let p = Ipv6Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
            let want = as_v4(&p, nat, backend).macs(n.p0_mac, mac).build();
            (
                super::ipv6::with_tcp_options6(&p.build(), &opts(mss)),
                super::mtu::with_tcp_options(&want, &opts(out)),
            )
        };
        let syn_ack = |port: u16, mss: u16, out: u16| {
            let (client, ep, nat, backend, mac) = flow(port);
            let p = Ipv4Packet::tcp(backend, nat, TCP_SYN | TCP_ACK).macs(mac, n.p0_mac);
            let want = as_v6(&p, ep, client).macs(n.c1_mac, CLIENT_MAC).build();
            (
                super::mtu::with_tcp_options(&p.build(), &opts(mss)),
                super::ipv6::with_tcp_options6(&want, &opts(out)),
            )
        };
        let mut auto = spec.clone();
        auto.services[0].mss_clamp = plink_common::MSS_CLAMP_AUTO;
        let (s1, w1) = syn(43000, 1460, 1200);
        let (a1, x1) = syn_ack(43000, 1460, 1200);
        let (s3, w3) = syn(43002, 1460, 1340);
        let (a3, x3) = syn_ack(43002, 1460, 1340);
        b.run(vec![
            consumer(
                "IPv6 SYN with MSS 1460, clamp 1200: IPv4 SYN with 1200",
                n.c1,
                s1,
                redirect4(w1),
            )
            .deltas([(Counter::Service(0, Field::MssClampedIn), 1)]),
            provider(
                "IPv4 SYN-ACK with MSS 1460: IPv6 SYN-ACK with 1200",
                n.p0,
                a1,
                redirect6(x1),
            )
            .deltas([(Counter::Service(0, Field::MssClampedOut), 1)]),
            Step::Apply(auto),
            consumer(
                "auto: c1's MTU 1400 less 60 bytes (the client's side is IPv6)",
                n.c1,
                s3,
                redirect4(w3),
            )
            .deltas([(Counter::Service(0, Field::MssClampedIn), 1)]),
            provider("auto on the SYN-ACK", n.p0, a3, redirect6(x3))
                .deltas([(Counter::Service(0, Field::MssClampedOut), 1)]),
        ]);
    });
}
