//! IPv6, phase 1: neighbour discovery for endpoint and NAT addresses,
//! NAT66 flows (TCP, UDP, echo) both ways, and the IPv6 frames refused on a
//! consumer interface (never passed). The IPv4 entry points tail-call the
//! IPv6 programs, so the cases run the IPv4 programs as every other table.

use std::net::Ipv6Addr;

use plink_common::v6;
use plink_tests::packet::{
    ICMP6_ECHO_REQUEST, IPPROTO_ICMPV6, Ipv6Packet, ND_NEIGHBOR_ADVERT, ND_ROUTER_SOLICIT,
    l4_checksum6_ok, neighbor_advertisement, neighbor_solicitation,
};

use super::*;

pub(super) const fn ip6(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

pub(super) const CLIENT6: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 1]);
pub(super) const EP6_TCP: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x50]);
pub(super) const EP6_UDP: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x51]);
pub(super) const EP6_PENDING: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x52]);
pub(super) const EP6_REJECTED: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x53]);
pub(super) const OTHER6: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x99]);
/// Zero interface identifier: its `Addr` would read as IPv4 (32.1.13.184).
pub(super) const RESERVED6: Ipv6Addr = ip6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]);
pub(super) const GW_P0_6: Ipv6Addr = ip6([0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1]);
pub(super) const BACKEND6: Ipv6Addr = ip6([0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10]);
pub(super) const NAT6_TCP: Ipv6Addr = ip6([0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x200]);
pub(super) const NAT6_UDP: Ipv6Addr = ip6([0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x201]);
pub(super) const ALL_NODES: Ipv6Addr = ip6([0xff02, 0, 0, 0, 0, 0, 0, 1]);

/// Endpoint ids of the IPv6 endpoints added to the common spec.
const EP_ID_TCP: u32 = 9;
const EP_ID_UDP: u32 = 10;
const EP_ID_PENDING: u32 = 11;
const EP_ID_REJECTED: u32 = 12;

/// The common spec plus IPv6 services 3 (TCP 80→8080) and 4 (UDP
/// 53→5353), one backend each (2001:db8:100::10), and their endpoints in
/// network 1.
pub(super) fn spec6(gw: &Gw) -> DataplaneSpec {
    let mut s = spec(gw);
    for (id, nat, ports) in [(3, NAT6_TCP, 1024..=65535), (4, NAT6_UDP, UDP_PORTS)] {
        s.services.push(ServiceSpec {
            id,
            nat: vec![NatSpec {
                addr: nat.into(),
                ports,
                draining: false,
            }],
            lookup: vec![id + 1],
            mss_clamp: plink_common::MSS_CLAMP_OFF,
            flow_log_sample: 0,
        });
        s.backends.push(BackendSpec {
            id: id + 1,
            service_id: id,
            addr: BACKEND6.into(),
            state: BackendState::Active,
        });
    }
    s.endpoints.extend([
        tcp_endpoint(EP_ID_TCP, 1, EP6_TCP, 3),
        EndpointSpec {
            protocol: Protocol::Udp,
            ports: vec![PortSpec {
                port: 53,
                target_port: 5353,
            }],
            ..tcp_endpoint(EP_ID_UDP, 1, EP6_UDP, 4)
        },
        EndpointSpec {
            state: EndpointState::Pending,
            ..tcp_endpoint(EP_ID_PENDING, 1, EP6_PENDING, 3)
        },
        EndpointSpec {
            state: EndpointState::Rejected,
            ..tcp_endpoint(EP_ID_REJECTED, 1, EP6_REJECTED, 3)
        },
    ]);
    s.validate().expect("the IPv6 spec is valid");
    s
}

/// The forward key the datapath builds for an IPv6 consumer packet.
fn fwd_key6(client: (Ipv6Addr, u16), ep: (Ipv6Addr, u16), proto: u8) -> CtFwdKey {
    CtFwdKey {
        src_addr_be: v6(client.0.octets()),
        dst_addr_be: v6(ep.0.octets()),
        network_id: 1,
        src_port_be: client.1.to_be(),
        dst_port_be: ep.1.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// What the provider sees of a consumer packet: NAT66 applied, hop - 1.
fn translated6(
    p: &Ipv6Packet,
    gw_p0: [u8; 6],
    backend: (Ipv6Addr, u16),
    nat: (Ipv6Addr, u16),
) -> Vec<u8> {
    let mut t = p.clone().macs(gw_p0, BACKEND10_MAC);
    t.src = nat.0;
    t.sport = nat.1;
    t.dst = backend.0;
    t.dport = backend.1;
    t.hop -= 1;
    t.build()
}

/// What the consumer sees of a reply: from the endpoint to the client.
fn untranslated6(
    p: &Ipv6Packet,
    gw_mac: [u8; 6],
    ep: (Ipv6Addr, u16),
    client: (Ipv6Addr, u16),
) -> Vec<u8> {
    let mut t = p.clone().macs(gw_mac, CLIENT_MAC);
    t.src = ep.0;
    t.sport = ep.1;
    t.dst = client.0;
    t.dport = client.1;
    t.hop -= 1;
    t.build()
}

/// Redirected with exactly these bytes, whose L4 checksum is valid (the
/// expected frames are built with checksums from scratch).
fn redirect6(want: Vec<u8>) -> Want {
    assert!(l4_checksum6_ok(&want), "the expected frame is valid");
    Want::Redirect(want)
}

fn tx6(want: Vec<u8>) -> Want {
    assert!(l4_checksum6_ok(&want), "the expected frame is valid");
    Want::Tx(want)
}

const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;

/// The ICMPv6 error (code 0, `rest` the MTU field) the gateway answers
/// `offending` with: from its destination to its source, out of the
/// interface `gw_mac` it came in on, quoting as much of it as fits 1280
/// bytes (RFC 4443 2.4 (c)), hop limit 64.
pub(super) fn icmp6_error(offending: &[u8], ty: u8, rest: u32, gw_mac: [u8; 6]) -> Vec<u8> {
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&offending[at..at + 16]).unwrap());
    let plen = u16::from_be_bytes([offending[18], offending[19]]) as usize;
    let quote = &offending[14..14 + (40 + plen).min(1280 - 48)];
    let mac: [u8; 6] = offending[6..12].try_into().unwrap();
    Ipv6Packet::icmp(addr(38), addr(22), ty, 0, rest, quote)
        .macs(gw_mac, mac)
        .build()
}

/// A consumer packet too big for the provider route's MTU: Packet Too Big
/// (with that MTU) from the endpoint address, quoting 1232 bytes; no flow
/// is opened for it.
#[test]
fn golden_ipv6_packet_too_big_to_the_consumer() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "p0", "mtu", "1280"]).unwrap();
    golden(&gw, spec6(&gw), |b, n, _| {
        let client = (CLIENT6, 5000);
        let ep = (EP6_UDP, 53);
        let key = fwd_key6(client, ep, IPPROTO_UDP);
        let nat = (NAT6_UDP, first_port(&key, UDP_PORTS));
        let backend = (BACKEND6, 5353);
        // 40 + 8 + 1232 = 1280 bytes of IPv6: fits exactly.
        let fits = Ipv6Packet::udp(client, ep, &[7; 1232]).macs(CLIENT_MAC, n.c1_mac);
        let big = Ipv6Packet::udp((CLIENT6, 5001), ep, &[7; 1233])
            .macs(CLIENT_MAC, n.c1_mac)
            .build();
        let ptb = icmp6_error(&big, ICMP6_PACKET_TOO_BIG, 1280, n.c1_mac);
        assert_eq!(ptb.len(), 14 + 1280, "the error is 1280 bytes of IPv6");
        let tcp_big = {
            let mut p = Ipv6Packet::tcp((CLIENT6, 40000), (EP6_TCP, 80), TCP_SYN)
                .macs(CLIENT_MAC, n.c1_mac);
            p.payload = vec![9; 1300];
            p.build()
        };
        b.run(vec![
            consumer(
                "1280 bytes fit",
                n.c1,
                fits.build(),
                redirect6(translated6(&fits, n.p0_mac, backend, nat)),
            )
            .deltas(opens(EP_ID_UDP)),
            consumer(
                "1281 bytes: packet too big, MTU 1280, from the endpoint address",
                n.c1,
                &big,
                tx6(ptb),
            )
            .deltas([(Counter::Flows, 0)]),
            consumer(
                "a too-big TCP SYN: packet too big, no flow",
                n.c1,
                &tcp_big,
                tx6(icmp6_error(&tcp_big, ICMP6_PACKET_TOO_BIG, 1280, n.c1_mac)),
            )
            .deltas([(Counter::Flows, 0)]),
            Step::expect("only the flow of the packet that left is open", |b| {
                assert_eq!(b.dp.list_conntrack().unwrap().len(), 1, "one flow");
            }),
        ]);
    });
}

/// A reply too big for the consumer interface: Packet Too Big to the
/// backend from the NAT address, with the consumer interface's MTU,
/// quoting the reply as the backend sent it; the reply is not forwarded.
#[test]
fn golden_ipv6_packet_too_big_to_the_backend() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "c1", "mtu", "1280"]).unwrap();
    golden(&gw, spec6(&gw), |b, n, _| {
        let client = (CLIENT6, 5000);
        let ep = (EP6_UDP, 53);
        let key = fwd_key6(client, ep, IPPROTO_UDP);
        let nat = (NAT6_UDP, first_port(&key, UDP_PORTS));
        let backend = (BACKEND6, 5353);
        let q = Ipv6Packet::udp(client, ep, b"q").macs(CLIENT_MAC, n.c1_mac);
        let reply =
            |len| Ipv6Packet::udp(backend, nat, &vec![7; len]).macs(BACKEND10_MAC, n.p0_mac);
        let fits = reply(1232);
        let too_big = reply(1233).build();
        b.run(vec![
            consumer(
                "the UDP flow",
                n.c1,
                q.build(),
                Want::Verdict(verdict::REDIRECT),
            ),
            provider(
                "a 1280-byte reply fits",
                n.p0,
                fits.build(),
                redirect6(untranslated6(&fits, n.c1_mac, ep, client)),
            ),
            provider(
                "a 1281-byte reply: packet too big to the backend, MTU 1280",
                n.p0,
                &too_big,
                tx6(icmp6_error(&too_big, ICMP6_PACKET_TOO_BIG, 1280, n.p0_mac)),
            )
            .deltas([
                (Counter::Service(4, Field::FragNeededToBackend), 1),
                (Counter::Endpoint(EP_ID_UDP, Field::FragNeededToBackend), 1),
            ]),
            Step::count(Counter::Endpoint(EP_ID_UDP, Field::PacketsOut), 1),
        ]);
    });
}

/// ICMPv6 errors from the provider side about a flow's packet: the quote
/// is translated back (NAT address/port → client, backend → endpoint),
/// the error goes from the endpoint address to the client; an error about
/// no flow is dropped.
#[test]
fn golden_ipv6_provider_errors_about_a_flow() {
    let gw = gateway();
    golden(&gw, spec6(&gw), |b, n, _| {
        let client = (CLIENT6, 5000);
        let ep = (EP6_UDP, 53);
        let key = fwd_key6(client, ep, IPPROTO_UDP);
        let nat = (NAT6_UDP, first_port(&key, UDP_PORTS));
        let backend = (BACKEND6, 5353);
        let q = Ipv6Packet::udp(client, ep, b"query").macs(CLIENT_MAC, n.c1_mac);
        let sent = translated6(&q, n.p0_mac, backend, nat);
        // What the client sees quoted: its packet, hop limit as it arrived.
        let mut own = q.clone();
        own.hop -= 1;
        let error = |ty, code, rest, quote: &[u8]| {
            Ipv6Packet::icmp(BACKEND6, NAT6_UDP, ty, code, rest, quote)
                .macs(BACKEND10_MAC, n.p0_mac)
        };
        let back = |ty, code, rest| {
            let mut e = Ipv6Packet::icmp(EP6_UDP, CLIENT6, ty, code, rest, &own.build()[14..])
                .macs(n.c1_mac, CLIENT_MAC);
            e.hop = 63;
            e.build()
        };
        let mut steps = vec![consumer(
            "the UDP flow",
            n.c1,
            q.build(),
            redirect6(sent.clone()),
        )];
        for (ty, code, rest, name) in [
            (1u8, 4u8, 0u32, "port unreachable"),
            (2, 0, 1280, "packet too big"),
            (3, 0, 0, "time exceeded"),
            (4, 0, 40, "parameter problem"),
        ] {
            steps.push(provider(
                format!("{name}: translated back to the client"),
                n.p0,
                error(ty, code, rest, &sent[14..]).build(),
                redirect6(back(ty, code, rest)),
            ));
        }
        let mut other = sent.clone();
        other[56..58].copy_from_slice(&999u16.to_be_bytes());
        steps.push(provider(
            "an error about no flow: icmp_error_no_flow",
            n.p0,
            error(1, 4, 0, &other[14..]).build(),
            Want::Drop(DropReason::IcmpErrorNoFlow),
        ));
        b.run(steps);
    });
}

/// ICMPv6 errors from a consumer-side router about a flow's reply (a
/// client behind it on a smaller link): the quote becomes the reply as the
/// backend sent it (backend → NAT address/port), the error goes from the
/// NAT address to the backend on the provider side. Only the network the
/// flow belongs to reaches it.
#[test]
fn golden_ipv6_consumer_router_errors_about_a_reply() {
    let gw = gateway();
    golden(&gw, spec6(&gw), |b, n, _| {
        let router = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 2]);
        let client = (CLIENT6, 5000);
        let ep = (EP6_UDP, 53);
        let key = fwd_key6(client, ep, IPPROTO_UDP);
        let nat = (NAT6_UDP, first_port(&key, UDP_PORTS));
        let backend = (BACKEND6, 5353);
        let q = Ipv6Packet::udp(client, ep, b"query").macs(ROUTER_MAC, n.c1_mac);
        let reply = Ipv6Packet::udp(backend, nat, &[5; 300]).macs(BACKEND10_MAC, n.p0_mac);
        let seen = untranslated6(&reply, n.c1_mac, ep, client);
        // What the router quotes has the gateway's hop limit; so does the
        // quote the backend gets back.
        let mut as_sent = reply.clone();
        as_sent.hop -= 1;
        let as_sent = as_sent.build();
        let ptb = |from, to, quote: &[u8]| Ipv6Packet::icmp(from, to, 2, 0, 1280, quote);
        let mut want = ptb(NAT6_UDP, BACKEND6, &as_sent[14..]).macs(n.p0_mac, BACKEND10_MAC);
        want.hop = 63;
        let mut other_ep = seen.clone();
        other_ep[22..38].copy_from_slice(&EP6_TCP.octets());
        b.run(vec![
            consumer(
                "the UDP flow, via the router",
                n.c1,
                q.build(),
                Want::Verdict(verdict::REDIRECT),
            ),
            provider(
                "its reply",
                n.p0,
                reply.build(),
                Want::Verdict(verdict::REDIRECT),
            ),
            consumer(
                "packet too big from the router: to the backend from the NAT address",
                n.c1,
                ptb(router, EP6_UDP, &seen[14..])
                    .macs(ROUTER_MAC, n.c1_mac)
                    .build(),
                redirect6(want.build()),
            ),
            consumer(
                "the same error from the other network: icmp_error_no_flow",
                n.c2,
                ptb(router, EP6_UDP, &seen[14..])
                    .macs(ROUTER_MAC, n.c2_mac)
                    .build(),
                Want::Drop(DropReason::IcmpErrorNoFlow),
            ),
            consumer(
                "an error quoting another endpoint than it is sent to",
                n.c1,
                ptb(router, EP6_UDP, &other_ep[14..])
                    .macs(ROUTER_MAC, n.c1_mac)
                    .build(),
                Want::Drop(DropReason::IcmpErrorNoFlow),
            ),
        ]);
    });
}

/// `frame` (Ethernet/IPv6/TCP without options) with TCP options `opts`
/// after the 20-byte header, lengths and checksum fixed.
pub(super) fn with_tcp_options6(frame: &[u8], opts: &[u8]) -> Vec<u8> {
    assert_eq!(opts.len() % 4, 0, "options fill whole words");
    let mut f = frame[..74].to_vec();
    f.extend_from_slice(opts);
    f.extend_from_slice(&frame[74..]);
    f[66] = (((20 + opts.len()) / 4) << 4) as u8;
    let plen = u16::from_be_bytes([f[18], f[19]]) + opts.len() as u16;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    plink_tests::packet::fix_checksums6(&mut f);
    f
}

/// MSS clamping over NAT66: a SYN's and a SYN-ACK's MSS option above the
/// service's clamp is lowered (checksum over the IPv6 pseudo-header kept
/// valid) and counted; `auto` takes IPv6's 60 bytes of headers off the
/// smaller MTU.
#[test]
fn golden_ipv6_mss_clamp_on_syn_and_syn_ack() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "c1", "mtu", "1400"]).unwrap();
    let mut s = spec6(&gw);
    for svc in s.services.iter_mut().filter(|svc| svc.id == 3) {
        svc.mss_clamp = 1200;
    }
    golden(&gw, s, |b, n, spec| {
        let opts = super::mtu::linux_syn_options;
        let backend = (BACKEND6, 8080);
        let flow = |port: u16| {
            let client = (CLIENT6, port);
            let ep = (EP6_TCP, 80);
            let key = fwd_key6(client, ep, IPPROTO_TCP);
            let nat = (NAT6_TCP, first_port(&key, 1024..=65535));
            (client, ep, nat)
        };
        let syn = |port: u16, mss: u16, out: u16| {
            let (client, ep, nat) = flow(port);
            let p = Ipv6Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
            let want = translated6(&p, n.p0_mac, backend, nat);
            (
                with_tcp_options6(&p.build(), &opts(mss)),
                with_tcp_options6(&want, &opts(out)),
            )
        };
        let syn_ack = |port: u16, mss: u16, out: u16| {
            let (client, ep, nat) = flow(port);
            let p = Ipv6Packet::tcp(backend, nat, TCP_SYN | TCP_ACK).macs(BACKEND10_MAC, n.p0_mac);
            let want = untranslated6(&p, n.c1_mac, ep, client);
            (
                with_tcp_options6(&p.build(), &opts(mss)),
                with_tcp_options6(&want, &opts(out)),
            )
        };
        let mut auto = spec.clone();
        for svc in auto.services.iter_mut().filter(|svc| svc.id == 3) {
            svc.mss_clamp = plink_common::MSS_CLAMP_AUTO;
        }
        let (s1, w1) = syn(42000, 1460, 1200);
        let (a1, x1) = syn_ack(42000, 1460, 1200);
        let (s2, w2) = syn(42001, 1100, 1100);
        let (s3, w3) = syn(42002, 1460, 1340);
        let (a3, x3) = syn_ack(42002, 1460, 1340);
        b.run(vec![
            consumer("SYN with MSS 1460, clamp 1200", n.c1, s1, redirect6(w1))
                .deltas([(Counter::Service(3, Field::MssClampedIn), 1)]),
            provider("SYN-ACK with MSS 1460, clamp 1200", n.p0, a1, redirect6(x1))
                .deltas([(Counter::Service(3, Field::MssClampedOut), 1)]),
            consumer(
                "SYN with MSS 1100, below the clamp: unchanged",
                n.c1,
                s2,
                redirect6(w2),
            )
            .deltas([(Counter::Service(3, Field::MssClampedIn), 0)]),
            Step::Apply(auto),
            consumer(
                "auto: c1's MTU 1400 less 60 bytes of IPv6 and TCP headers",
                n.c1,
                s3,
                redirect6(w3),
            )
            .deltas([(Counter::Service(3, Field::MssClampedIn), 1)]),
            provider("auto on the SYN-ACK", n.p0, a3, redirect6(x3))
                .deltas([(Counter::Service(3, Field::MssClampedOut), 1)]),
        ]);
    });
}

#[test]
fn golden_ipv6_neighbour_discovery() {
    let gw = gateway();
    golden(&gw, spec6(&gw), |b, n, _| {
        // DAD probes come from :: and carry no source link-layer option.
        let dad = neighbor_solicitation(CLIENT_MAC, Ipv6Addr::UNSPECIFIED, EP6_TCP);
        let mut hop64 = neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_TCP);
        hop64[21] = 64;
        plink_tests::packet::fix_checksums6(&mut hop64);
        b.run(vec![
            consumer(
                "NS for an endpoint address: NA to the solicitor",
                n.c1,
                neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_TCP),
                tx6(neighbor_advertisement(
                    n.c1_mac, EP6_TCP, CLIENT_MAC, CLIENT6, true,
                )),
            ),
            consumer(
                "NS for a pending endpoint's address: answered too (as ARP)",
                n.c1,
                neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_PENDING),
                tx6(neighbor_advertisement(
                    n.c1_mac,
                    EP6_PENDING,
                    CLIENT_MAC,
                    CLIENT6,
                    true,
                )),
            ),
            consumer(
                "DAD probe for an endpoint address: NA to all nodes, unsolicited",
                n.c1,
                dad,
                tx6(neighbor_advertisement(
                    n.c1_mac,
                    EP6_TCP,
                    [0x33, 0x33, 0, 0, 0, 1],
                    ALL_NODES,
                    false,
                )),
            ),
            consumer(
                "NS for another address: nd_not_ours",
                n.c1,
                neighbor_solicitation(CLIENT_MAC, CLIENT6, OTHER6),
                Want::Drop(DropReason::NdNotOurs),
            ),
            consumer(
                "NS for the endpoint address in the other network: nd_not_ours",
                n.c2,
                neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_TCP),
                Want::Drop(DropReason::NdNotOurs),
            ),
            consumer(
                "NS with a hop limit below 255 (forwarded): malformed",
                n.c1,
                hop64,
                Want::Drop(DropReason::Malformed),
            ),
            provider(
                "NS for a NAT address: NA from the provider interface",
                n.p0,
                neighbor_solicitation(BACKEND10_MAC, BACKEND6, NAT6_TCP),
                tx6(neighbor_advertisement(
                    n.p0_mac,
                    NAT6_TCP,
                    BACKEND10_MAC,
                    BACKEND6,
                    true,
                )),
            ),
            provider(
                "NS for the gateway's own address: the kernel's",
                n.p0,
                neighbor_solicitation(BACKEND10_MAC, BACKEND6, GW_P0_6),
                Want::Pass,
            ),
        ]);
    });
}

#[test]
fn golden_ipv6_tcp_through_nat66() {
    let gw = gateway();
    golden(&gw, spec6(&gw), |b, n, _| {
        let client = (CLIENT6, 40000);
        let ep = (EP6_TCP, 80);
        let key = fwd_key6(client, ep, IPPROTO_TCP);
        let nat = (NAT6_TCP, first_port(&key, 1024..=65535));
        let backend = (BACKEND6, 8080);
        let syn = Ipv6Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
        let ack = Ipv6Packet::tcp(client, ep, TCP_ACK).macs(CLIENT_MAC, n.c1_mac);
        let mut data = ack.clone();
        data.payload = b"GET / HTTP/1.0\r\n\r\n".to_vec();
        let synack = Ipv6Packet::tcp(backend, nat, TCP_SYN | TCP_ACK).macs(BACKEND10_MAC, n.p0_mac);
        let mut reply = Ipv6Packet::tcp(backend, nat, TCP_ACK).macs(BACKEND10_MAC, n.p0_mac);
        reply.payload = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
        let mut hop1 = ack.clone();
        hop1.hop = 1;
        b.run(vec![
            consumer(
                "SYN: NAT66 to the backend",
                n.c1,
                syn.build(),
                redirect6(translated6(&syn, n.p0_mac, backend, nat)),
            )
            .deltas(opens(EP_ID_TCP)),
            Step::expect("the flow is listed with its IPv6 addresses", move |b| {
                let flows = b.dp.list_conntrack().unwrap();
                assert_eq!(flows.len(), 1, "one flow");
                let f = &flows[0];
                assert_eq!(f.client, (client.0.into(), client.1));
                assert_eq!(f.endpoint, (ep.0.into(), ep.1));
                assert_eq!(f.nat, (nat.0.into(), nat.1));
                assert_eq!(f.backend, (backend.0.into(), backend.1));
                assert_eq!(f.endpoint_id, EP_ID_TCP);
                assert_eq!(f.tcp_state, tcp_state::SYN_SENT);
            }),
            provider(
                "SYN-ACK back to the client",
                n.p0,
                synack.build(),
                redirect6(untranslated6(&synack, n.c1_mac, ep, client)),
            ),
            consumer(
                "ACK",
                n.c1,
                ack.build(),
                redirect6(translated6(&ack, n.p0_mac, backend, nat)),
            )
            .deltas([(Counter::Flows, 0)]),
            consumer(
                "data",
                n.c1,
                data.build(),
                redirect6(translated6(&data, n.p0_mac, backend, nat)),
            ),
            provider(
                "reply data",
                n.p0,
                reply.build(),
                redirect6(untranslated6(&reply, n.c1_mac, ep, client)),
            ),
            consumer(
                "hop limit 1: time exceeded from the endpoint address, no flow",
                n.c1,
                hop1.build(),
                tx6(icmp6_error(&hop1.build(), ICMP6_TIME_EXCEEDED, 0, n.c1_mac)),
            )
            .deltas([(Counter::Flows, 0)]),
            provider(
                "a reply of no flow to a NAT address: reply_no_flow",
                n.p0,
                Ipv6Packet::tcp(backend, (NAT6_TCP, 999), TCP_ACK)
                    .macs(BACKEND10_MAC, n.p0_mac)
                    .build(),
                Want::Drop(DropReason::ReplyNoFlow),
            ),
            provider(
                "to the gateway's own address: the kernel's",
                n.p0,
                Ipv6Packet::tcp(backend, (GW_P0_6, 22), TCP_SYN)
                    .macs(BACKEND10_MAC, n.p0_mac)
                    .build(),
                Want::Pass,
            ),
            Step::count(Counter::Endpoint(EP_ID_TCP, Field::PacketsIn), 3),
            Step::count(Counter::Endpoint(EP_ID_TCP, Field::PacketsOut), 2),
        ]);
    });
}

#[test]
fn golden_ipv6_udp_and_echo_through_nat66() {
    let gw = gateway();
    golden(&gw, spec6(&gw), |b, n, _| {
        let client = (CLIENT6, 5000);
        let ep = (EP6_UDP, 53);
        let key = fwd_key6(client, ep, IPPROTO_UDP);
        let nat = (NAT6_UDP, first_port(&key, UDP_PORTS));
        let backend = (BACKEND6, 5353);
        let q = Ipv6Packet::udp(client, ep, b"query").macs(CLIENT_MAC, n.c1_mac);
        let r = Ipv6Packet::udp(backend, nat, b"answer!").macs(BACKEND10_MAC, n.p0_mac);
        let mut zero = q.build();
        zero[60..62].copy_from_slice(&[0, 0]);

        // Echo: the identifier is translated like a port (the NAT port of
        // the flow keyed by it), the checksum covers the pseudo-header.
        let id = 0x4242;
        let ekey = fwd_key6((CLIENT6, id), (EP6_TCP, 0), IPPROTO_ICMPV6);
        let nat_id = first_port(&ekey, 1024..=65535);
        let req = Ipv6Packet::echo(CLIENT6, EP6_TCP, true, id, 1).macs(CLIENT_MAC, n.c1_mac);
        let mut req_out = req.clone().macs(n.p0_mac, BACKEND10_MAC);
        req_out.src = NAT6_TCP;
        req_out.dst = BACKEND6;
        req_out.seq = ((nat_id as u32) << 16) | 1;
        req_out.hop -= 1;
        let rep =
            Ipv6Packet::echo(BACKEND6, NAT6_TCP, false, nat_id, 1).macs(BACKEND10_MAC, n.p0_mac);
        let mut rep_out = rep.clone().macs(n.c1_mac, CLIENT_MAC);
        rep_out.src = EP6_TCP;
        rep_out.dst = CLIENT6;
        rep_out.seq = ((id as u32) << 16) | 1;
        rep_out.hop -= 1;
        b.run(vec![
            consumer(
                "UDP query: NAT66 to the backend",
                n.c1,
                q.build(),
                redirect6(translated6(&q, n.p0_mac, backend, nat)),
            )
            .deltas(opens(EP_ID_UDP)),
            provider(
                "UDP answer back to the client",
                n.p0,
                r.build(),
                redirect6(untranslated6(&r, n.c1_mac, ep, client)),
            ),
            consumer(
                "UDP checksum 0 (invalid over IPv6): malformed",
                n.c1,
                zero,
                Want::Drop(DropReason::Malformed),
            ),
            consumer(
                "echo request to an endpoint address",
                n.c1,
                req.build(),
                redirect6(req_out.build()),
            )
            .deltas(opens(EP_ID_TCP)),
            provider(
                "echo reply back to the client",
                n.p0,
                rep.build(),
                redirect6(rep_out.build()),
            ),
        ]);
    });
}

#[test]
fn golden_ipv6_refused_frames() {
    let gw = gateway();
    golden(&gw, spec6(&gw), |b, n, _| {
        let syn = |to: Ipv6Addr| {
            Ipv6Packet::tcp((CLIENT6, 40001), (to, 80), TCP_SYN).macs(CLIENT_MAC, n.c1_mac)
        };
        let udp = Ipv6Packet::udp((CLIENT6, 5000), (EP6_UDP, 53), b"q").macs(CLIENT_MAC, n.c1_mac);
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut frame = udp.build();
            f(&mut frame);
            frame
        };
        let mut steps = vec![
            consumer(
                "pending endpoint",
                n.c1,
                syn(EP6_PENDING).build(),
                Want::Drop(DropReason::EndpointPending),
            )
            .deltas([ep_drop(EP_ID_PENDING, DropReason::EndpointPending)]),
            consumer(
                "rejected endpoint",
                n.c1,
                syn(EP6_REJECTED).build(),
                Want::Drop(DropReason::EndpointRejected),
            )
            .deltas([ep_drop(EP_ID_REJECTED, DropReason::EndpointRejected)]),
            consumer(
                "no endpoint",
                n.c1,
                syn(OTHER6).build(),
                Want::Drop(DropReason::NoEndpoint),
            ),
            consumer(
                "the endpoint's port in another network",
                n.c2,
                syn(EP6_TCP).macs(CLIENT_MAC, n.c2_mac).build(),
                Want::Drop(DropReason::NoEndpoint),
            ),
            consumer(
                "TCP ACK of no flow",
                n.c1,
                Ipv6Packet::tcp((CLIENT6, 40002), (EP6_TCP, 80), TCP_ACK)
                    .macs(CLIENT_MAC, n.c1_mac)
                    .build(),
                Want::Drop(DropReason::TcpNoFlow),
            ),
            consumer(
                "zero interface id destination: ipv6_address_reserved",
                n.c1,
                syn(RESERVED6).build(),
                Want::Drop(DropReason::Ipv6AddressReserved),
            ),
            consumer(
                "zero interface id source: ipv6_address_reserved",
                n.c1,
                Ipv6Packet::tcp((RESERVED6, 40001), (EP6_TCP, 80), TCP_SYN)
                    .macs(CLIENT_MAC, n.c1_mac)
                    .build(),
                Want::Drop(DropReason::Ipv6AddressReserved),
            ),
            consumer(
                "another host's frame",
                n.c1,
                syn(EP6_TCP).macs(CLIENT_MAC, [2, 0, 0, 0, 0, 0x77]).build(),
                Want::Drop(DropReason::OtherHost),
            ),
            consumer(
                "router solicitation to all routers (multicast, no NS)",
                n.c1,
                Ipv6Packet::icmp(
                    CLIENT6,
                    ip6([0xff02, 0, 0, 0, 0, 0, 0, 2]),
                    ND_ROUTER_SOLICIT,
                    0,
                    0,
                    &[],
                )
                .macs(CLIENT_MAC, [0x33, 0x33, 0, 0, 0, 2])
                .build(),
                Want::Drop(DropReason::OtherHost),
            ),
            consumer(
                "an unsolicited neighbour advertisement",
                n.c1,
                neighbor_advertisement(CLIENT_MAC, CLIENT6, n.c1_mac, EP6_TCP, false),
                Want::Drop(DropReason::IcmpUnsupported),
            ),
            consumer(
                "truncated (payload length beyond the frame)",
                n.c1,
                edit(&|f| f[18..20].copy_from_slice(&200u16.to_be_bytes())),
                Want::Drop(DropReason::Malformed),
            ),
            consumer(
                "SCTP: unsupported_protocol",
                n.c1,
                edit(&|f| f[20] = 132),
                Want::Drop(DropReason::UnsupportedProtocol),
            ),
        ];
        for nh in [0u8, 43, 44, 60, 51, 50, 135, 139, 140] {
            steps.push(consumer(
                format!("extension header {nh}: ipv6_extension_header"),
                n.c1,
                edit(&|f| f[20] = nh),
                Want::Drop(DropReason::Ipv6ExtensionHeader),
            ));
        }
        b.run(steps);
        // Whatever IPv6 a consumer sends, nothing is passed to the kernel.
        let frames = [
            syn(OTHER6).build(),
            neighbor_solicitation(CLIENT_MAC, CLIENT6, OTHER6),
            Ipv6Packet::echo(CLIENT6, OTHER6, true, 1, 1)
                .macs(CLIENT_MAC, n.c1_mac)
                .build(),
            Ipv6Packet::icmp(CLIENT6, EP6_TCP, ND_NEIGHBOR_ADVERT, 0, 0, &[0; 16])
                .macs(CLIENT_MAC, [0x33, 0x33, 0, 0, 0, 1])
                .build(),
            Ipv6Packet::icmp(CLIENT6, EP6_TCP, ICMP6_ECHO_REQUEST, 0, 0, &[])
                .macs(CLIENT_MAC, n.c1_mac)
                .build()[..60]
                .to_vec(),
        ];
        let before = b.dp.interface_stats().unwrap();
        for (i, f) in frames.iter().enumerate() {
            for ingress in [n.c1, n.c2] {
                let run = b.raw(prog_names::CONSUMER, ingress, f);
                assert_eq!(run.verdict, golden::verdict::DROP, "frame {i} dropped");
            }
        }
        // Counted once each: the frame by the IPv4 entry, the verdict by the
        // IPv6 program it tail-called.
        let after = b.dp.interface_stats().unwrap();
        for ifindex in [n.c1, n.c2] {
            let (a, z) = (after[&ifindex], before[&ifindex]);
            let sent = frames.len() as u64;
            assert_eq!(a.packets - z.packets, sent, "{ifindex}: frames counted");
            assert_eq!(
                a.ipv6_packets - z.ipv6_packets,
                sent,
                "{ifindex}: IPv6 frames"
            );
            assert_eq!(a.ipv4_packets, z.ipv4_packets, "{ifindex}: no IPv4 frame");
            let verdicts: u64 = (0..5).map(|v| a.verdicts[v] - z.verdicts[v]).sum();
            assert_eq!(verdicts, sent, "{ifindex}: one verdict per frame");
            assert_eq!(a.verdicts[1] - z.verdicts[1], sent, "{ifindex}: drops");
        }
    });
}

/// A controller that adopts pinned maps loads new programs and fills the
/// new `V6_PROGS` (it is not pinned): IPv6 is handled again, and a flow
/// opened before the restart keeps translating.
#[test]
fn golden_ipv6_after_an_adopting_load() {
    let gw = gateway();
    let spec = spec6(&gw);
    let n = gw.ifs();
    gw.host
        .run_in(move || {
            struct Unpin(std::path::PathBuf);
            impl Drop for Unpin {
                fn drop(&mut self) {
                    let _ = std::fs::remove_dir_all(&self.0);
                }
            }
            let root = std::path::PathBuf::from(format!(
                "/sys/fs/bpf/plink-test/v6dp-{}",
                std::process::id()
            ));
            let _unpin = Unpin(root.clone());
            let sizes = Sizes {
                conntrack: 1024,
                lb_table: 1024,
                ..Sizes::default()
            };
            let load = || {
                let mut dp = Dataplane::load_with(EBPF_OBJECT, Some(&root), sizes).unwrap();
                dp.apply(&spec).unwrap();
                dp.load_programs().unwrap();
                Bench { dp }
            };
            let client = (CLIENT6, 5001);
            let ep = (EP6_UDP, 53);
            let key = fwd_key6(client, ep, IPPROTO_UDP);
            let nat = (NAT6_UDP, first_port(&key, UDP_PORTS));
            let backend = (BACKEND6, 5353);
            let q = Ipv6Packet::udp(client, ep, b"query").macs(CLIENT_MAC, n.c1_mac);
            let r = Ipv6Packet::udp(backend, nat, b"answer").macs(BACKEND10_MAC, n.p0_mac);
            let mut first = load();
            first.run(vec![
                consumer(
                    "a UDP flow before the restart",
                    n.c1,
                    q.build(),
                    redirect6(translated6(&q, n.p0_mac, backend, nat)),
                )
                .deltas(opens(EP_ID_UDP)),
            ]);
            drop(first);
            let mut second = load();
            second.run(vec![
                consumer(
                    "NS after the adopting load",
                    n.c1,
                    neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_UDP),
                    tx6(neighbor_advertisement(
                        n.c1_mac, EP6_UDP, CLIENT_MAC, CLIENT6, true,
                    )),
                ),
                provider(
                    "the reply of the flow opened before it",
                    n.p0,
                    r.build(),
                    redirect6(untranslated6(&r, n.c1_mac, ep, client)),
                ),
                Step::count(Counter::Flows, 1),
            ]);
        })
        .unwrap();
}

/// The IPv6 established fast path, as for IPv4: the flow caches its next
/// hop, so a neighbour that moves is followed only once the hop generation
/// moves (the controller moves it on neighbour, route and link events); an
/// endpoint rejected without a purge cuts its flows in the datapath itself.
#[test]
fn golden_ipv6_established_flows_use_the_cached_next_hop() {
    let gw = gateway();
    golden(&gw, spec6(&gw), |b, n, spec| {
        let client = (CLIENT6, 40100);
        let ep = (EP6_TCP, 80);
        let key = fwd_key6(client, ep, IPPROTO_TCP);
        let nat = (NAT6_TCP, first_port(&key, 1024..=65535));
        let backend = (BACKEND6, 8080);
        let syn = Ipv6Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
        let ack = Ipv6Packet::tcp(client, ep, TCP_ACK).macs(CLIENT_MAC, n.c1_mac);
        let moved: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x78];
        let to = |p: &Ipv6Packet, mac: [u8; 6]| {
            let mut t = translated6(p, n.p0_mac, backend, nat);
            t[0..6].copy_from_slice(&mac);
            redirect6(t)
        };
        let rejected = {
            let mut s = spec.clone();
            s.endpoints
                .iter_mut()
                .filter(|e| e.id == EP_ID_TCP)
                .for_each(|e| e.state = EndpointState::Rejected);
            s
        };
        b.run(vec![
            consumer("syn", n.c1, syn.build(), to(&syn, BACKEND10_MAC)).deltas(opens(EP_ID_TCP)),
            consumer("established", n.c1, ack.build(), to(&ack, BACKEND10_MAC)),
            Step::act("the backend's neighbour entry moves", move |_| {
                let status = std::process::Command::new("ip")
                    .args(["-6", "neigh", "replace", &BACKEND6.to_string(), "lladdr"])
                    .arg("02:00:00:00:01:78")
                    .args(["dev", "p0", "nud", "permanent"])
                    .status()
                    .unwrap();
                assert!(status.success(), "ip -6 neigh replace");
            }),
            consumer(
                "cached next hop: no route lookup",
                n.c1,
                ack.build(),
                to(&ack, BACKEND10_MAC),
            ),
            Step::act("the hop generation moves", |b| b.dp.bump_hop_gen().unwrap()),
            consumer(
                "next hop looked up again after the generation moved",
                n.c1,
                ack.build(),
                to(&ack, moved),
            ),
            consumer("and cached again", n.c1, ack.build(), to(&ack, moved))
                .deltas([(Counter::Flows, 0)]),
            Step::Apply(rejected),
            consumer(
                "a rejected endpoint's flow, without a purge",
                n.c1,
                ack.build(),
                Want::Drop(DropReason::EndpointRejected),
            ),
            Step::count(Counter::Endpoint(EP_ID_TCP, Field::PacketsIn), 5),
        ]);
    });
}
