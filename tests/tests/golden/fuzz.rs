//! Packet fuzzing through BPF_PROG_TEST_RUN: random frames, mutated valid
//! frames (bytes, header fields, IP options, fragments, TCP data offset,
//! forged or cut ICMP error quotes, replies to flows that do not exist; for
//! IPv6 the version and traffic class, payload length, next header and
//! extension headers, reserved interface identifiers, hop limit) and every
//! truncation of every template, IPv4 and IPv6 (flows through NAT66 and
//! NAT64, neighbour solicitations for endpoint and NAT addresses, duplicate
//! address detection, extension headers, reserved addresses; ICMP errors
//! both ways, translated between the families for NAT64). A model of the
//! flows the programs opened checks each verdict:
//!
//! - the verdict is a valid one, never XDP_ABORTED; a consumer interface
//!   never passes a frame to the host;
//! - a frame redirected to the provider belongs to an approved endpoint's
//!   service (a backend of that service, its target port, one of its NAT
//!   addresses and ports, the endpoint's address family or, for an IPv6
//!   endpoint of an IPv4 service, IPv4: NAT64) or is an ICMP error about
//!   one of the model's flows, quoting the flow's packet as the backend
//!   sent it;
//! - a frame redirected to a consumer is the reverse of one of the model's
//!   flows, out of that flow's interface to that flow's client (IPv6 for a
//!   NAT64 flow), an ICMP error quoting the client's own packet;
//! - a forwarded frame keeps its length and the (in)validity of its IPv4
//!   header and L4 checksums (for IPv6, the L4 checksum over the IPv6
//!   pseudo-header, and every IPv6 header field but the addresses and the hop
//!   limit); it is plain IPv4 without options or fragments, or IPv6 without
//!   extension headers;
//! - a frame translated between the families (NAT64, RFC 7915) is 20 bytes
//!   shorter or longer (40 for an ICMP error: outer and quoted header), its
//!   TTL or hop limit one less, its traffic class or TOS carried over, an
//!   IPv4 header with a valid checksum, DF and identification 0; its L4
//!   checksum exactly as (in)valid as it came, over each side's own
//!   pseudo-header (none for ICMP); an ICMP error's type and code mapped as
//!   RFC 7915 4.2 and 5.2 say, its quote translated too (header rebuilt,
//!   the quoted transport checksum as (in)valid as it came when the whole
//!   packet is quoted, the other quoted bytes unchanged);
//! - a frame the gateway answers itself goes back to its sender with valid
//!   checksums; for IPv6 that is a neighbour advertisement answering a
//!   solicitation for one of the ingress network's endpoint addresses (NAT
//!   addresses on the provider), to all nodes for duplicate address
//!   detection;
//! - per interface, the programs' verdict counters add up to the frames sent
//!   and match the verdicts the test saw; drop reasons add up to the drops.
//!
//! The suite runs a seeded 50,000 rounds; `cargo xtask fuzz` runs 1,000,000
//! (`PLINK_FUZZ_PACKETS`); `PLINK_FUZZ_SEED` picks another seed.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
};

use plink_common::XDP_VERDICT_NAMES;
use plink_tests::packet::{
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP6_ECHO_REPLY, ICMP6_ECHO_REQUEST, IPPROTO_ICMPV6,
    Ipv6Packet, ND_NEIGHBOR_ADVERT, ND_NEIGHBOR_SOLICIT, ND_ROUTER_SOLICIT, fix_checksums6,
    ip_checksum_error, l4_checksum6_error, neighbor_advertisement, neighbor_solicitation,
};

use super::{
    ipv6::{
        BACKEND6, CLIENT6, EP6_PENDING, EP6_REJECTED, EP6_TCP, EP6_UDP, GW_P0_6, NAT6_TCP, OTHER6,
        RESERVED6, ip6, spec6,
    },
    *,
};

/// The forward key of a flow: (network, protocol, client, client port or
/// echo id, endpoint, endpoint port or 0 for echo).
type FwdKey = (u32, u8, IpAddr, u16, IpAddr, u16);
/// The reverse key: (protocol, backend, backend port or 0, NAT address, NAT
/// port or echo id).
type RevKey = (u8, IpAddr, u16, IpAddr, u16);

/// NAT64 endpoints (IPv6 addresses in front of the common spec's IPv4
/// services): TCP 80 (service 0) and UDP 53 (service 1) in network 1, a
/// pending one; and a dual-stack TCP endpoint in network 2 (service 0) on
/// `EP_DUAL4` and `EP64_DUAL`.
const EP64_TCP: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x64]);
const EP64_UDP: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x65]);
const EP64_DUAL: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x66]);
const EP64_PENDING: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x67]);
const EP_DUAL4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 64);
/// A router on the consumer side, sending ICMPv6 errors about replies.
const ROUTER6: Ipv6Addr = ip6([0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 2]);

/// The NAT64 endpoints added to the fuzz spec.
fn nat64_endpoints() -> [EndpointSpec; 4] {
    [
        tcp_endpoint(20, 1, EP64_TCP, 0),
        EndpointSpec {
            protocol: Protocol::Udp,
            ports: vec![PortSpec {
                port: 53,
                target_port: 5353,
            }],
            ..tcp_endpoint(21, 1, EP64_UDP, 1)
        },
        EndpointSpec {
            state: EndpointState::Pending,
            ..tcp_endpoint(22, 1, EP64_PENDING, 0)
        },
        EndpointSpec {
            addr6: Some(EP64_DUAL.into()),
            ..tcp_endpoint(23, 2, EP_DUAL4, 0)
        },
    ]
}

#[derive(Clone, Debug)]
struct Flow {
    consumer_if: u32,
    /// Source MACs the client used on this flow's forwarded frames.
    client_macs: Vec<[u8; 6]>,
    nat: (IpAddr, u16),
    backend: (IpAddr, u16),
}

const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
/// Next-header values of IPv6 extension headers (RFC 8200 4, RFC 7045).
const EXTENSION_HEADERS: [u8; 9] = [0, 43, 44, 60, 51, 50, 135, 139, 140];
/// An all-nodes destination MAC (33:33::1), where DAD answers go.
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

fn is_ipv6(frame: &[u8]) -> bool {
    frame.len() >= 54 && frame[12..14] == ETH_P_IPV6
}

fn ip6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let o: [u8; 16] = b[at..at + 16].try_into().unwrap();
    Ipv6Addr::from(o)
}

/// The addresses and ports of a TCP, UDP or ICMP(v6) echo header at `ip`
/// (an IPv4 header without options, or an IPv6 header followed directly by
/// L4): (protocol, src, src port, dst, dst port), with an echo request's id
/// as its source port and a reply's as its destination port. None for
/// anything else.
fn ports(ip: &[u8]) -> Option<(u8, IpAddr, u16, IpAddr, u16)> {
    if ip.len() >= 48 && ip[0] >> 4 == 6 {
        let (src, dst) = (ip6_at(ip, 8).into(), ip6_at(ip, 24).into());
        let a = u16::from_be_bytes([ip[40], ip[41]]);
        let b = u16::from_be_bytes([ip[42], ip[43]]);
        let id = u16::from_be_bytes([ip[44], ip[45]]);
        return match ip[6] {
            IPPROTO_TCP | IPPROTO_UDP => Some((ip[6], src, a, dst, b)),
            IPPROTO_ICMPV6 if ip[40] == ICMP6_ECHO_REQUEST => {
                Some((IPPROTO_ICMPV6, src, id, dst, 0))
            }
            IPPROTO_ICMPV6 if ip[40] == ICMP6_ECHO_REPLY => Some((IPPROTO_ICMPV6, src, 0, dst, id)),
            _ => None,
        };
    }
    if ip.len() < 28 || ip[0] != 0x45 {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).into();
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]).into();
    let a = u16::from_be_bytes([ip[20], ip[21]]);
    let b = u16::from_be_bytes([ip[22], ip[23]]);
    let id = u16::from_be_bytes([ip[24], ip[25]]);
    match ip[9] {
        IPPROTO_TCP | IPPROTO_UDP => Some((ip[9], src, a, dst, b)),
        IPPROTO_ICMP if ip[20] == ICMP_ECHO_REQUEST => Some((IPPROTO_ICMP, src, id, dst, 0)),
        IPPROTO_ICMP if ip[20] == ICMP_ECHO_REPLY => Some((IPPROTO_ICMP, src, 0, dst, id)),
        _ => None,
    }
}

/// (source, destination) of an IPv4 or IPv6 frame the caller checked.
fn addrs(frame: &[u8]) -> (IpAddr, IpAddr) {
    if is_ipv6(frame) {
        (ip6_at(frame, 22).into(), ip6_at(frame, 38).into())
    } else {
        let a = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
        (a(26).into(), a(30).into())
    }
}

/// The quoted IP header of an ICMP or ICMPv6 error frame, if the frame is
/// one (up to the frame's end: Ethernet padding included).
fn icmp_error_quote(frame: &[u8]) -> Option<&[u8]> {
    if is_ipv6(frame) {
        let is_error =
            frame.len() >= 62 && frame[20] == IPPROTO_ICMPV6 && (1..=4).contains(&frame[54]);
        return is_error.then(|| &frame[62..]);
    }
    let is_error = frame.len() >= 14 + 28
        && frame[12..14] == [8, 0]
        && frame[23] == IPPROTO_ICMP
        && matches!(frame[34], 3 | 4 | 5 | 11 | 12);
    is_error.then(|| &frame[42..])
}

/// IPv6 the programs may forward: no extension header, TCP, UDP or ICMPv6.
fn is_plain_ipv6(frame: &[u8]) -> bool {
    is_ipv6(frame)
        && frame[14] >> 4 == 6
        && matches!(frame[20], IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6)
}

fn is_plain_ipv4(frame: &[u8]) -> bool {
    frame.len() >= 34
        && frame[12..14] == [8, 0]
        && frame[14] == 0x45
        && u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff == 0
}

fn mac(frame: &[u8], at: usize) -> [u8; 6] {
    frame[at..at + 6].try_into().unwrap()
}

/// Recomputes the checksums of a frame whose headers make that possible.
fn try_fix_checksums(f: &mut [u8]) {
    if is_ipv6(f) {
        let plen = usize::from(u16::from_be_bytes([f[18], f[19]]));
        let l4_min = match f[20] {
            IPPROTO_TCP => 20,
            IPPROTO_UDP => 8,
            IPPROTO_ICMPV6 => 4,
            _ => return,
        };
        if plen >= l4_min && 54 + plen <= f.len() {
            fix_checksums6(f);
        }
        return;
    }
    if f.len() < 34 || f[12..14] != [8, 0] {
        return;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let l4_min = match f[23] {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        IPPROTO_ICMP => 4,
        _ => return,
    };
    if ihl >= 20 && tot >= ihl + l4_min && 14 + tot <= f.len() {
        fix_checksums(f);
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// `b[from..to]`, or a panic naming the case.
fn span<'a>(what: &str, b: &'a [u8], from: usize, to: usize) -> &'a [u8] {
    b.get(from..to)
        .unwrap_or_else(|| panic!("{what}: {from}..{to} past the frame's {} bytes", b.len()))
}

/// The traffic class of the IPv6 header at `ip`.
fn traffic_class(ip: &[u8]) -> u8 {
    (ip[0] << 4) | (ip[1] >> 4)
}

/// The ICMP echo type of an ICMPv6 echo type (RFC 7915 4.2, 5.2).
fn echo6_to_4(ty6: u8) -> Option<u8> {
    match ty6 {
        ICMP6_ECHO_REQUEST => Some(ICMP_ECHO_REQUEST),
        ICMP6_ECHO_REPLY => Some(ICMP_ECHO_REPLY),
        _ => None,
    }
}

/// The provider interface's MTU, IPv4 (veth's default: the fuzz leaves
/// it).
const PROVIDER_MTU: u32 = 1500;

/// RFC 7915 4.2: the ICMPv6 error (type, code, 4-byte rest) an ICMP error
/// about a NAT64 flow's packet becomes; None where it is dropped (unknown
/// codes, a frag needed without MTU, a parameter problem pointing at a
/// field IPv6 does not have). Packet Too Big carries the advertised MTU + 20, no more than
/// the IPv6 next hop's MTU (`mtu6`) or the IPv4 one's + 20 (without
/// `mtu6`: uncapped).
fn icmp4_to_6(ty: u8, code: u8, rest: u32, mtu6: Option<u32>) -> Option<(u8, u8, u32)> {
    Some(match (ty, code) {
        (ICMP_DEST_UNREACH, 0 | 1 | 5..=8 | 11 | 12) => (1, 0, 0),
        (ICMP_DEST_UNREACH, 9 | 10 | 13 | 15) => (1, 1, 0),
        // Protocol unreachable: parameter problem at the next header.
        (ICMP_DEST_UNREACH, 2) => (4, 1, 6),
        (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH) => (1, 4, 0),
        (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED) if rest & 0xffff != 0 => {
            let advertised = (rest & 0xffff) + 20;
            let mtu = match mtu6 {
                Some(m) => advertised.min(m).min(PROVIDER_MTU + 20),
                None => advertised,
            };
            (2, 0, mtu)
        }
        (ICMP_TIME_EXCEEDED, 0 | 1) => (3, code, 0),
        // Parameter problem (pointer, bad length): erroneous header field
        // at the IPv6 field the pointer moves to (RFC 7915 figure 3).
        (12, 0 | 2) => {
            let pointer = match rest >> 24 {
                0 => 0,
                1 => 1,
                2 | 3 => 4,
                8 => 7,
                9 => 6,
                12..=15 => 8,
                16..=19 => 24,
                _ => return None,
            };
            (4, 0, pointer)
        }
        _ => return None,
    })
}

/// RFC 7915 5.2: the ICMP error (type, code, 4-byte rest) an ICMPv6 error
/// about a NAT64 flow's reply becomes; None where it is dropped (a
/// parameter problem pointing at a field IPv4 does not have, or of another
/// code than 0 and 1).
/// Frag needed carries the advertised MTU - 20, no more than the IPv4 next
/// hop's MTU or the IPv6 one's (`mtu6`) - 20 (without `mtu6`: no more than
/// its 16 bits hold), and no less than IPv4's
/// minimum of 68.
fn icmp6_to_4(ty: u8, code: u8, rest: u32, mtu6: Option<u32>) -> Option<(u8, u8, u32)> {
    Some(match (ty, code) {
        (1, 0 | 2 | 3) => (ICMP_DEST_UNREACH, 1, 0),
        (1, 1) => (ICMP_DEST_UNREACH, 10, 0),
        (1, 4) => (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0),
        (2, 0) => {
            let advertised = rest.saturating_sub(20);
            let mtu = match mtu6 {
                Some(m) => advertised.min(PROVIDER_MTU).min(m - 20),
                None => advertised.min(0xffff),
            };
            let mtu = mtu.max(68);
            (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu)
        }
        (3, 0 | 1) => (ICMP_TIME_EXCEEDED, code, 0),
        // Erroneous header field: the pointer moves to the IPv4 field
        // (RFC 7915 figure 6), in the first byte.
        (4, 0) => {
            let pointer: u32 = match rest {
                0 => 0,
                1 => 1,
                4 | 5 => 2,
                6 => 9,
                7 => 8,
                8..=23 => 12,
                24..=39 => 16,
                _ => return None,
            };
            (12, 0, pointer << 24)
        }
        (4, 1) => (ICMP_DEST_UNREACH, 2, 0),
        _ => return None,
    })
}

/// The quote of a translated ICMP error against the quote it came with:
/// `q6` the IPv6 one, `q4` the IPv4 one (each as long as its error's IP
/// length says); `rebuilt4` when the IPv4 header is the datapath's own
/// (IPv6 → IPv4), else the IPv6 one is. Header fields carried over, the
/// transport bytes past the ports unchanged but for the checksum, which,
/// when the whole packet is quoted, is exactly as (in)valid as it came
/// over each side's pseudo-header. TCP and UDP quotes only.
fn quote6_as_4(what: &str, q6: &[u8], q4: &[u8], rebuilt4: bool) {
    assert!(
        q4.len() >= 28 && q6.len() == q4.len() + 20,
        "{what}: quotes of {} (IPv6) and {} (IPv4) bytes",
        q6.len(),
        q4.len()
    );
    assert_eq!(q4[0], 0x45, "{what}: quoted IPv4 header with options");
    assert_eq!(q6[0] >> 4, 6, "{what}: quoted IPv6 version");
    if rebuilt4 {
        assert_eq!(q4[4..8], [0, 0, 0x40, 0], "{what}: quoted id 0, DF");
        assert_eq!(
            plink_tests::packet::checksum(&q4[..20]),
            0,
            "{what}: quoted IPv4 header checksum"
        );
    } else {
        assert_eq!(q6[1] & 0x0f, 0, "{what}: quoted flow label 0");
        assert_eq!(q6[2..4], [0, 0], "{what}: quoted flow label 0");
    }
    assert_eq!(traffic_class(q6), q4[1], "{what}: quoted traffic class");
    assert_eq!(
        be16(q6, 4).wrapping_add(20),
        be16(q4, 2),
        "{what}: quoted lengths"
    );
    assert_eq!(q6[6], q4[9], "{what}: quoted protocol");
    assert_eq!(q6[7], q4[8], "{what}: quoted hop limit and TTL");
    let check = match q4[9] {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        p => panic!("{what}: a quote of protocol {p} translated"),
    };
    let (l6, l4) = (&q6[40..], &q4[20..]);
    for i in (4..l4.len()).filter(|&i| i != check && i != check + 1) {
        assert_eq!(l6[i], l4[i], "{what}: quoted transport byte {i} changed");
    }
    let whole = usize::from(be16(q4, 2));
    let no_checksum = q4[9] == IPPROTO_UDP && l4[6..8] == [0, 0];
    if whole <= q4.len() && whole >= 20 + check + 2 && !no_checksum {
        let frame4 = [&[0u8; 14][..], &q4[..whole]].concat();
        let frame6 = [&[0u8; 14][..], &q6[..whole + 20]].concat();
        assert_eq!(
            l4_checksum6_error(&frame6),
            l4_checksum_error(&frame4),
            "{what}: quoted transport checksum (in)validity kept"
        );
    }
}

struct Checker<'a> {
    spec: &'a DataplaneSpec,
    c1: u32,
    c2: u32,
    p0: u32,
    macs: HashMap<u32, [u8; 6]>,
    backend_macs: HashMap<IpAddr, [u8; 6]>,
    fwd: HashMap<FwdKey, Flow>,
    rev: HashMap<RevKey, FwdKey>,
    /// The consumer interfaces' MTU (veth's default: the fuzz leaves it).
    consumer_mtu: u32,
    /// Verdicts seen, by (ifindex, verdict).
    verdicts: BTreeMap<(u32, u32), u64>,
    forwarded: u64,
    /// IPv6 frames forwarded to the provider and to a consumer.
    forwarded6: [u64; 2],
    /// Neighbour advertisements sent, by the consumer and provider programs.
    advertised: [u64; 2],
    /// NAT64 translations: IPv6 → IPv4 and IPv4 → IPv6 packets, then ICMP
    /// errors the same two ways.
    translated: [u64; 4],
}

impl Checker<'_> {
    fn network(&self, ifindex: u32) -> u32 {
        if ifindex == self.c1 { 1 } else { 2 }
    }

    /// Checks one run of `prog` on `f`; panics with `what` on a violation.
    fn check(&mut self, what: &str, prog: &str, ifindex: u32, f: &[u8], run: &XdpRun) {
        let o = &run.output;
        *self.verdicts.entry((ifindex, run.verdict)).or_default() += 1;
        let consumer = prog == prog_names::CONSUMER;
        match run.verdict {
            verdict::DROP => {}
            verdict::PASS => {
                assert!(!consumer, "{what}: a consumer interface passed a frame");
                assert_eq!(o, f, "{what}: a passed frame changed");
            }
            verdict::TX if is_ipv6(f) => self.answered6(what, consumer, ifindex, f, o),
            verdict::TX => {
                // ARP answers the request's sender hardware address.
                let sender = if f[12..14] == [8, 6] {
                    mac(f, 22)
                } else {
                    mac(f, 6)
                };
                assert_eq!(mac(o, 0), sender, "{what}: answer not to the sender");
                assert_eq!(
                    mac(o, 6),
                    self.macs[&ifindex],
                    "{what}: answer not from the ingress interface"
                );
                if o[12..14] == [8, 0] {
                    assert!(ip_checksum_ok(o), "{what}: answer's IP checksum");
                    assert!(l4_checksum_ok(o), "{what}: answer's L4 checksum");
                    assert_eq!(o[30..34], f[26..30], "{what}: answer to another address");
                }
            }
            // Another family out than in: NAT64.
            verdict::REDIRECT if o.len() >= 14 && o[12..14] != f[12..14] => {
                self.translated(what, consumer, ifindex, f, o)
            }
            verdict::REDIRECT if is_ipv6(f) => {
                self.forwarded += 1;
                self.forwarded6[usize::from(!consumer)] += 1;
                assert!(
                    is_plain_ipv6(f) && is_plain_ipv6(o),
                    "{what}: forwarded IPv6 with an extension header, or not as IPv6"
                );
                assert_eq!(o.len(), f.len(), "{what}: length kept");
                assert_eq!(
                    o[21],
                    f[21].wrapping_sub(1),
                    "{what}: hop limit decremented"
                );
                assert_eq!(
                    o[14..21],
                    f[14..21],
                    "{what}: version, class, flow label, length, next header kept"
                );
                assert_eq!(
                    l4_checksum6_error(o),
                    l4_checksum6_error(f),
                    "{what}: L4 checksum (in)validity kept"
                );
                if consumer {
                    self.forwarded_to_provider(what, ifindex, f, o);
                } else {
                    self.forwarded_to_consumer(what, f, o);
                }
            }
            verdict::REDIRECT => {
                self.forwarded += 1;
                assert!(
                    is_plain_ipv4(f) && is_plain_ipv4(o),
                    "{what}: forwarded something else than unfragmented IPv4 without options"
                );
                assert_eq!(o.len(), f.len(), "{what}: length kept");
                assert_eq!(o[22], f[22].wrapping_sub(1), "{what}: TTL decremented");
                assert_eq!(
                    ip_checksum_error(o),
                    ip_checksum_error(f),
                    "{what}: IP checksum (in)validity kept"
                );
                let udp_none = f[23] == IPPROTO_UDP && f[40..42] == [0, 0];
                if udp_none {
                    assert_eq!(o[40..42], [0, 0], "{what}: UDP checksum 0 stays 0");
                } else {
                    assert_eq!(
                        l4_checksum_error(o),
                        l4_checksum_error(f),
                        "{what}: L4 checksum (in)validity kept"
                    );
                }
                if consumer {
                    self.forwarded_to_provider(what, ifindex, f, o);
                } else {
                    self.forwarded_to_consumer(what, f, o);
                }
            }
            v => panic!("{what}: verdict {v}"),
        }
    }

    /// An IPv6 frame the gateway answered itself: only a neighbour
    /// advertisement for one of its addresses, answering a solicitation.
    fn answered6(&mut self, what: &str, consumer: bool, ifindex: u32, f: &[u8], o: &[u8]) {
        assert!(
            o.len() >= 86 && o[12..14] == ETH_P_IPV6 && o[20] == IPPROTO_ICMPV6,
            "{what}: answered with something else than ICMPv6"
        );
        let plen = usize::from(u16::from_be_bytes([o[18], o[19]]));
        assert!(54 + plen <= o.len(), "{what}: answer's payload length");
        assert!(
            l4_checksum6_error(o) == 0,
            "{what}: answer's ICMPv6 checksum"
        );
        assert_eq!(
            mac(o, 6),
            self.macs[&ifindex],
            "{what}: answer not from the ingress interface"
        );
        // ICMPv6 errors of the gateway's own (packet too big, time
        // exceeded) answer any frame of a flow; checked on their own.
        if (1..=4).contains(&o[54]) {
            return self.error6(what, consumer, ifindex, f, o);
        }
        assert_eq!(f[20], IPPROTO_ICMPV6, "{what}: answered a non-ICMPv6 frame");
        assert_eq!(
            f[54], ND_NEIGHBOR_SOLICIT,
            "{what}: answered no solicitation"
        );
        assert_eq!(
            o[54], ND_NEIGHBOR_ADVERT,
            "{what}: answered with no advertisement"
        );
        assert_eq!(o[21], 255, "{what}: advertisement's hop limit");
        let (src, dst) = addrs(o);
        let (solicitor, _) = addrs(f);
        // Duplicate address detection (from ::) is answered to all nodes.
        if solicitor == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            assert_eq!(
                mac(o, 0),
                ALL_NODES_MAC,
                "{what}: DAD answer not to all nodes"
            );
            assert_eq!(
                dst,
                IpAddr::V6(super::ipv6::ALL_NODES),
                "{what}: DAD answer"
            );
        } else {
            assert_eq!(mac(o, 0), mac(f, 6), "{what}: answer not to the sender");
            assert_eq!(dst, solicitor, "{what}: answer to another address");
        }
        let target = IpAddr::V6(ip6_at(o, 62));
        assert_eq!(src, target, "{what}: advertised from another address");
        assert_eq!(
            target,
            IpAddr::V6(ip6_at(f, 62)),
            "{what}: advertised another target than solicited"
        );
        let mut tlla = vec![2, 1];
        tlla.extend_from_slice(&self.macs[&ifindex]);
        assert_eq!(o[78..86], tlla[..], "{what}: target link-layer option");
        let ours = if consumer {
            let network = self.network(ifindex);
            self.spec
                .endpoints
                .iter()
                .any(|e| e.network_id == network && e.addresses().any(|a| a == target))
        } else {
            self.spec
                .services
                .iter()
                .any(|s| s.nat.iter().any(|n| n.addr == target))
        };
        assert!(
            ours,
            "{what}: advertised {target}, none of this interface's"
        );
        self.advertised[usize::from(!consumer)] += 1;
    }

    /// An ICMPv6 error the gateway sent about the frame `f` (RFC 4443):
    /// back to its sender, from the address it was sent to (one of this
    /// interface's: an endpoint of the network, or a NAT address), no
    /// larger than 1280 bytes, quoting `f` as it came; time exceeded only
    /// for a hop limit of 1 or less.
    fn error6(&mut self, what: &str, consumer: bool, ifindex: u32, f: &[u8], o: &[u8]) {
        assert!(o.len() <= 14 + 1280, "{what}: ICMPv6 error over 1280 bytes");
        assert!(
            matches!(o[54], 2 | 3),
            "{what}: the gateway sent ICMPv6 error type {}",
            o[54]
        );
        if o[54] == 3 {
            assert!(f[21] <= 1, "{what}: time exceeded for hop limit {}", f[21]);
        }
        let (src, dst) = addrs(o);
        let (fsrc, fdst) = addrs(f);
        assert_eq!(dst, fsrc, "{what}: error not to the sender");
        assert_eq!(src, fdst, "{what}: error not from the address sent to");
        assert_eq!(
            mac(o, 0),
            mac(f, 6),
            "{what}: error not to the sender's MAC"
        );
        let quote = &o[62..];
        assert!(
            !quote.is_empty() && f.len() >= 14 + quote.len() && quote == &f[14..14 + quote.len()],
            "{what}: the error does not quote the frame as it came"
        );
        let ours = if consumer {
            let network = self.network(ifindex);
            self.spec
                .endpoints
                .iter()
                .any(|e| e.network_id == network && e.addresses().any(|a| a == src))
        } else {
            self.spec
                .services
                .iter()
                .any(|s| s.nat.iter().any(|n| n.addr == src))
        };
        assert!(ours, "{what}: error from {src}, none of this interface's");
    }

    /// A frame NAT64 translated (RFC 7915): IPv6 from a consumer to IPv4
    /// towards a backend, or an IPv4 reply back to IPv6; ICMP errors both
    /// ways. Header fields and checksums here, the flow model after.
    fn translated(&mut self, what: &str, consumer: bool, ifindex: u32, f: &[u8], o: &[u8]) {
        self.forwarded += 1;
        let error = icmp_error_quote(f).is_some();
        if is_ipv6(f) {
            // IPv6 → IPv4: a consumer's packet (or its ICMPv6 error about a
            // reply) towards the provider; never NAT46 the other way.
            assert!(consumer, "{what}: IPv6 from the provider side left as IPv4");
            assert!(
                is_plain_ipv6(f) && is_plain_ipv4(o),
                "{what}: translated IPv6 with an extension header, or not to plain IPv4"
            );
            assert_eq!(o[22], f[21].wrapping_sub(1), "{what}: TTL = hop limit - 1");
            assert_eq!(ip_checksum_error(o), 0, "{what}: translated IP checksum");
            assert_eq!(o[18..22], [0, 0, 0x40, 0], "{what}: identification 0, DF");
            let plen = be16(f, 18);
            if error {
                assert_eq!(o.len() + 40, f.len(), "{what}: error 40 bytes shorter");
                assert_eq!(be16(o, 16), plen, "{what}: total length");
                assert_eq!(o[23], IPPROTO_ICMP, "{what}: ICMPv6 error as ICMP");
                let got = Some((o[34], o[35], be32(o, 38)));
                let (ty, code, rest) = (f[54], f[55], be32(f, 58));
                assert_eq!(
                    got,
                    icmp6_to_4(ty, code, rest, Some(self.consumer_mtu)),
                    "{what}: ICMPv6 error {ty}/{code} mapped as RFC 7915 5.2 (MTU capped by the links')"
                );
                assert_eq!(
                    l4_checksum_error(o),
                    l4_checksum6_error(f),
                    "{what}: ICMP checksum (in)validity kept (ICMPv6 pseudo-header out)"
                );
                let q6 = span(what, f, 62, 54 + usize::from(plen));
                let q4 = span(what, o, 42, 14 + usize::from(be16(o, 16)));
                quote6_as_4(what, q6, q4, true);
                self.translated[2] += 1;
            } else {
                assert_eq!(o.len() + 20, f.len(), "{what}: 20 bytes shorter");
                assert_eq!(be16(o, 16), plen + 20, "{what}: total length");
                assert_eq!(
                    o[15],
                    traffic_class(&f[14..]),
                    "{what}: TOS = traffic class"
                );
                let proto = if f[20] == IPPROTO_ICMPV6 {
                    IPPROTO_ICMP
                } else {
                    f[20]
                };
                assert_eq!(o[23], proto, "{what}: protocol");
                if proto == IPPROTO_ICMP {
                    assert_eq!(
                        Some(o[34]),
                        echo6_to_4(f[54]),
                        "{what}: echo type translated"
                    );
                }
                assert_eq!(
                    l4_checksum_error(o),
                    l4_checksum6_error(f),
                    "{what}: L4 checksum (in)validity kept across the translation"
                );
                self.translated[0] += 1;
            }
            return self.forwarded_to_provider(what, ifindex, f, o);
        }
        // IPv4 → IPv6: a NAT64 flow's reply (or an ICMP error about its
        // packet) towards the client.
        assert!(
            !consumer,
            "{what}: IPv4 from a consumer left as IPv6 (NAT46)"
        );
        assert!(
            is_plain_ipv4(f) && is_plain_ipv6(o),
            "{what}: translated IPv4 with options or fragments, or not to plain IPv6"
        );
        assert_eq!(o[14] >> 4, 6, "{what}: IPv6 version");
        assert_eq!(o[21], f[22].wrapping_sub(1), "{what}: hop limit = TTL - 1");
        let tot = be16(f, 16);
        if error {
            assert_eq!(o.len(), f.len() + 40, "{what}: error 40 bytes longer");
            assert_eq!(be16(o, 18), tot, "{what}: payload length");
            assert_eq!(o[20], IPPROTO_ICMPV6, "{what}: ICMP error as ICMPv6");
            assert!(
                40 + usize::from(tot) <= 1280,
                "{what}: a translated ICMPv6 error over 1280 bytes"
            );
            let got = Some((o[54], o[55], be32(o, 58)));
            let (ty, code, rest) = (f[34], f[35], be32(f, 38));
            assert_eq!(
                got,
                icmp4_to_6(ty, code, rest, Some(self.consumer_mtu)),
                "{what}: ICMP error {ty}/{code} mapped as RFC 7915 4.2 (MTU capped by the links')"
            );
            assert_eq!(
                l4_checksum6_error(o),
                l4_checksum_error(f),
                "{what}: ICMPv6 checksum (in)validity kept (ICMPv6 pseudo-header in)"
            );
            let q4 = span(what, f, 42, 14 + usize::from(tot));
            let q6 = span(what, o, 62, 54 + usize::from(tot));
            quote6_as_4(what, q6, q4, false);
            self.translated[3] += 1;
        } else {
            assert_eq!(o.len(), f.len() + 20, "{what}: 20 bytes longer");
            assert_eq!(be16(o, 18) + 20, tot, "{what}: payload length");
            assert_eq!(
                traffic_class(&o[14..]),
                f[15],
                "{what}: traffic class = TOS"
            );
            assert_eq!(o[15] & 0x0f, 0, "{what}: flow label 0");
            assert_eq!(o[16..18], [0, 0], "{what}: flow label 0");
            let proto = if f[23] == IPPROTO_ICMP {
                IPPROTO_ICMPV6
            } else {
                f[23]
            };
            assert_eq!(o[20], proto, "{what}: next header");
            if proto == IPPROTO_ICMPV6 {
                assert_eq!(
                    echo6_to_4(o[54]),
                    Some(f[34]),
                    "{what}: echo type translated"
                );
            }
            // IPv6 requires a UDP checksum: one the IPv4 reply did not
            // carry cannot be carried over incrementally.
            assert!(
                !(f[23] == IPPROTO_UDP && f[40..42] == [0, 0]),
                "{what}: a UDP reply without checksum translated"
            );
            assert_eq!(
                l4_checksum6_error(o),
                l4_checksum_error(f),
                "{what}: L4 checksum (in)validity kept across the translation"
            );
            self.translated[1] += 1;
        }
        self.forwarded_to_consumer(what, f, o)
    }

    fn forwarded_to_provider(&mut self, what: &str, ifindex: u32, f: &[u8], o: &[u8]) {
        let network = self.network(ifindex);
        assert_eq!(mac(o, 6), self.macs[&self.p0], "{what}: not out of p0");
        if let Some(quote) = icmp_error_quote(f) {
            // An error about a reply the client got: the reverse of a flow.
            let (proto, ep, eport, client, cport) =
                ports(quote).unwrap_or_else(|| panic!("{what}: forwarded an unparsable quote"));
            let key = (network, proto, client, cport, ep, eport);
            let flow = self
                .fwd
                .get(&key)
                .unwrap_or_else(|| panic!("{what}: forwarded an error about no flow {key:?}"));
            let (src, dst) = addrs(o);
            assert_eq!(dst, flow.backend.0, "{what}: error to another backend");
            assert_eq!(src, flow.nat.0, "{what}: error from another NAT address");
            // The quote is the reply as the backend sent it.
            let quoted = icmp_error_quote(o).and_then(ports);
            assert_eq!(
                quoted.map(|(_, s, sp, d, dp)| (s, sp, d, dp)),
                Some((flow.backend.0, flow.backend.1, flow.nat.0, flow.nat.1)),
                "{what}: the error does not quote the backend's packet"
            );
            return;
        }
        let (proto, client, cport, ep_addr, eport) =
            ports(&f[14..]).unwrap_or_else(|| panic!("{what}: forwarded an unknown protocol"));
        // The protocol out (ICMP for a NAT64 flow's ICMPv6 echo) keys the
        // reverse direction.
        let (proto_out, nat, nport, backend, bport) =
            ports(&o[14..]).unwrap_or_else(|| panic!("{what}: output unparsable"));
        // The endpoint the frame was addressed to, approved, on its network.
        let endpoint = self
            .spec
            .endpoints
            .iter()
            .find(|e| {
                e.network_id == network
                    && e.addresses().any(|a| a == ep_addr)
                    && match proto {
                        IPPROTO_ICMP | IPPROTO_ICMPV6 => true,
                        p => {
                            let want = if p == IPPROTO_TCP {
                                Protocol::Tcp
                            } else {
                                Protocol::Udp
                            };
                            e.protocol == want && e.ports.iter().any(|m| m.port == eport)
                        }
                    }
            })
            .unwrap_or_else(|| panic!("{what}: forwarded to {ep_addr}:{eport}, no endpoint"));
        assert_eq!(
            endpoint.state,
            EndpointState::Approved,
            "{what}: forwarded for an endpoint that is not approved"
        );
        let service = endpoint.service_id;
        assert!(
            self.spec
                .backends
                .iter()
                .any(|b| b.service_id == service && b.addr == backend),
            "{what}: {backend} is no backend of service {service}"
        );
        if proto != IPPROTO_ICMP && proto != IPPROTO_ICMPV6 {
            let target = endpoint.ports.iter().find(|m| m.port == eport).unwrap();
            assert_eq!(bport, target.target_port, "{what}: target port");
        }
        let svc = self.spec.services.iter().find(|s| s.id == service).unwrap();
        assert!(
            svc.nat
                .iter()
                .any(|n| n.addr == nat && n.ports.contains(&nport)),
            "{what}: source {nat}:{nport} is no NAT port of service {service}"
        );
        assert_eq!(
            Some(&mac(o, 0)),
            self.backend_macs.get(&backend),
            "{what}: not to the backend's MAC"
        );
        // The model: a new mapping for a known key replaces the old one.
        let key = (network, proto, client, cport, ep_addr, eport);
        let rev = (proto_out, backend, bport, nat, nport);
        let client_mac = mac(f, 6);
        let flow = self.fwd.entry(key).or_insert_with(|| Flow {
            consumer_if: ifindex,
            client_macs: Vec::new(),
            nat: (nat, nport),
            backend: (backend, bport),
        });
        if flow.nat != (nat, nport) || flow.backend != (backend, bport) {
            let old = (
                proto_out,
                flow.backend.0,
                flow.backend.1,
                flow.nat.0,
                flow.nat.1,
            );
            self.rev.remove(&old);
            flow.nat = (nat, nport);
            flow.backend = (backend, bport);
            flow.client_macs.clear();
        }
        if !flow.client_macs.contains(&client_mac) {
            flow.client_macs.push(client_mac);
        }
        if let Some(previous) = self.rev.insert(rev, key)
            && previous != key
        {
            // The NAT port was handed to a new flow: the old one is gone.
            self.fwd.remove(&previous);
        }
    }

    fn forwarded_to_consumer(&mut self, what: &str, f: &[u8], o: &[u8]) {
        let (key, inner_out) = if let Some(quote) = icmp_error_quote(f) {
            let (proto, nat, nport, backend, bport) =
                ports(quote).unwrap_or_else(|| panic!("{what}: forwarded an unparsable quote"));
            ((proto, backend, bport, nat, nport), true)
        } else {
            let (proto, backend, bport, nat, nport) =
                ports(&f[14..]).unwrap_or_else(|| panic!("{what}: forwarded an unknown protocol"));
            ((proto, backend, bport, nat, nport), false)
        };
        let fwd = *self
            .rev
            .get(&key)
            .unwrap_or_else(|| panic!("{what}: sent to a consumer, reverse of no flow {key:?}"));
        let flow = &self.fwd[&fwd];
        let (network, _, client, cport, ep, eport) = fwd;
        assert_eq!(
            mac(o, 6),
            self.macs[&flow.consumer_if],
            "{what}: out of another interface than the flow's (network {network})"
        );
        assert!(
            flow.client_macs.contains(&mac(o, 0)),
            "{what}: to a MAC the client never used"
        );
        let (src, dst) = addrs(o);
        assert_eq!(dst, client, "{what}: to another address");
        assert_eq!(src, ep, "{what}: from another address");
        if inner_out {
            // The quote is the client's own packet.
            let quoted = icmp_error_quote(o).and_then(ports);
            assert_eq!(
                quoted.map(|(_, s, sp, d, dp)| (s, sp, d, dp)),
                Some((client, cport, ep, eport)),
                "{what}: the error does not quote the client's packet"
            );
        } else {
            let (_, src, sport, dst, dport) = ports(&o[14..]).unwrap();
            assert_eq!(
                (src, sport, dst, dport),
                (ep, eport, client, cport),
                "{what}: ports"
            );
        }
    }
}

#[test]
fn golden_fuzz_keeps_the_invariants() {
    let gw = gateway();
    // The IPv6 spec of golden/ipv6.rs (services 3 and 4 behind IPv6
    // endpoints in network 1), plus network 2 reusing network 1's IPv6 TCP
    // endpoint address: overlapping IPv6 consumers through NAT66.
    let mut spec = spec6(&gw);
    spec.endpoints.push(tcp_endpoint(13, 2, EP6_TCP, 3));
    // NAT64: IPv6 endpoints of the IPv4 services 0 and 1 in network 1, a
    // dual-stack one (IPv4 and IPv6 address) of service 0 in network 2.
    spec.endpoints.extend(nat64_endpoints());
    spec.validate().expect("the fuzz spec is valid");
    // MSS clamping on, so that mutated TCP options and data offsets go
    // through the option walk and its checksum update too.
    spec.services[0].mss_clamp = 1200;
    let (c1, c2, p0) = (gw.c1, gw.c2, gw.p0);
    let macs = HashMap::from([(c1, gw.c1_mac), (c2, gw.c2_mac), (p0, gw.p0_mac)]);
    gw.host
        .run_in(move || fuzz_in_gateway(&spec, c1, c2, p0, &macs))
        .unwrap();
}

/// The fuzz run, inside the gateway namespace (FIB lookups see its routes).
fn fuzz_in_gateway(spec: &DataplaneSpec, c1: u32, c2: u32, p0: u32, macs: &HashMap<u32, [u8; 6]>) {
    let mut b = Bench::with_conntrack(spec, 16_384);
    let mut model = Checker {
        spec,
        c1,
        c2,
        p0,
        macs: macs.clone(),
        backend_macs: HashMap::from([
            (BACKEND10.into(), BACKEND10_MAC),
            (BACKEND11.into(), BACKEND11_MAC),
            (BACKEND6.into(), BACKEND10_MAC),
        ]),
        fwd: HashMap::new(),
        rev: HashMap::new(),
        consumer_mtu: 1500,
        verdicts: BTreeMap::new(),
        forwarded: 0,
        forwarded6: [0; 2],
        advertised: [0; 2],
        translated: [0; 4],
    };
    let ifstats0 = b.dp.interface_stats().unwrap();
    let drops0: u64 = b.drops().values().sum();
    let (c1_mac, c2_mac, p0_mac) = (macs[&c1], macs[&c2], macs[&p0]);

    // Flows for the provider-side templates to answer.
    let mut opened = Vec::new();
    for (ifindex, frame) in [
        (
            c1,
            Ipv4Packet::tcp((CLIENT, 40000), (EP_TCP, 80), TCP_SYN).macs(CLIENT_MAC, c1_mac),
        ),
        (
            c1,
            Ipv4Packet::udp((CLIENT, 5000), (EP_UDP, 53), b"query").macs(CLIENT_MAC, c1_mac),
        ),
        (
            c1,
            Ipv4Packet::echo(CLIENT, EP_TCP, true, 0x77, 1).macs(CLIENT_MAC, c1_mac),
        ),
        (
            c2,
            Ipv4Packet::tcp((CLIENT, 40000), (EP_TCP, 80), TCP_SYN).macs(CLIENT_MAC, c2_mac),
        ),
        // The dual-stack endpoint's IPv4 address.
        (
            c2,
            Ipv4Packet::tcp((CLIENT, 40001), (EP_DUAL4, 80), TCP_SYN).macs(CLIENT_MAC, c2_mac),
        ),
    ] {
        let f = frame.build();
        let run = b.raw(prog_names::CONSUMER, ifindex, &f);
        model.check("setup", prog_names::CONSUMER, ifindex, &f, &run);
        assert_eq!(run.verdict, verdict::REDIRECT, "setup flow opened");
        opened.push(run.output);
    }
    // The same over IPv6, the TCP one from both networks (the same client
    // and endpoint addresses).
    for (ifindex, frame) in [
        (
            c1,
            Ipv6Packet::tcp((CLIENT6, 40000), (EP6_TCP, 80), TCP_SYN).macs(CLIENT_MAC, c1_mac),
        ),
        (
            c1,
            Ipv6Packet::udp((CLIENT6, 5000), (EP6_UDP, 53), b"query").macs(CLIENT_MAC, c1_mac),
        ),
        (
            c1,
            Ipv6Packet::echo(CLIENT6, EP6_TCP, true, 0x77, 1).macs(CLIENT_MAC, c1_mac),
        ),
        (
            c2,
            Ipv6Packet::tcp((CLIENT6, 40000), (EP6_TCP, 80), TCP_SYN).macs(CLIENT_MAC, c2_mac),
        ),
    ] {
        let f = frame.build();
        let run = b.raw(prog_names::CONSUMER, ifindex, &f);
        model.check("setup", prog_names::CONSUMER, ifindex, &f, &run);
        assert_eq!(run.verdict, verdict::REDIRECT, "setup flow opened");
        opened.push(run.output);
    }
    // NAT64 flows, IPv6 in front and IPv4 behind: TCP, UDP and echo in
    // network 1, TCP to the dual-stack endpoint's IPv6 address in network 2.
    let mut opened64 = Vec::new();
    for (ifindex, frame) in [
        (
            c1,
            Ipv6Packet::tcp((CLIENT6, 40000), (EP64_TCP, 80), TCP_SYN).macs(CLIENT_MAC, c1_mac),
        ),
        (
            c1,
            Ipv6Packet::udp((CLIENT6, 5000), (EP64_UDP, 53), b"query").macs(CLIENT_MAC, c1_mac),
        ),
        (
            c1,
            Ipv6Packet::echo(CLIENT6, EP64_TCP, true, 0x77, 1).macs(CLIENT_MAC, c1_mac),
        ),
        (
            c2,
            Ipv6Packet::tcp((CLIENT6, 40000), (EP64_DUAL, 80), TCP_SYN).macs(CLIENT_MAC, c2_mac),
        ),
    ] {
        let f = frame.build();
        let run = b.raw(prog_names::CONSUMER, ifindex, &f);
        model.check("setup", prog_names::CONSUMER, ifindex, &f, &run);
        assert_eq!(run.verdict, verdict::REDIRECT, "setup NAT64 flow opened");
        assert!(!is_ipv6(&run.output), "setup NAT64 flow leaves as IPv4");
        opened64.push((ifindex, run.output));
    }
    // A backend's answer to each forwarded frame.
    let answer = |sent: &[u8]| -> Vec<u8> {
        let (proto, nat, nport, backend, bport) = ports(&sent[14..]).unwrap();
        if let (IpAddr::V6(backend), IpAddr::V6(nat)) = (backend, nat) {
            let p = match proto {
                IPPROTO_TCP => Ipv6Packet::tcp((backend, bport), (nat, nport), TCP_SYN | TCP_ACK),
                IPPROTO_UDP => Ipv6Packet::udp((backend, bport), (nat, nport), b"answer"),
                _ => Ipv6Packet::echo(backend, nat, false, nport, 1),
            };
            return p.macs(mac(sent, 0), p0_mac).build();
        }
        let (IpAddr::V4(backend), IpAddr::V4(nat)) = (backend, nat) else {
            panic!("a flow across address families");
        };
        let p = match proto {
            IPPROTO_TCP => Ipv4Packet::tcp((backend, bport), (nat, nport), TCP_SYN | TCP_ACK),
            IPPROTO_UDP => Ipv4Packet::udp((backend, bport), (nat, nport), b"answer"),
            _ => Ipv4Packet::echo(backend, nat, false, nport, 1),
        };
        p.macs(mac(sent, 0), p0_mac).build()
    };
    let mut templates: Vec<(&str, u32, Vec<u8>)> = Vec::new();
    for sent in opened.iter().filter(|s| is_ipv6(s)) {
        templates.push((prog_names::PROVIDER, p0, answer(sent)));
        // An ICMPv6 time exceeded about the forwarded frame, from a router.
        let router = ip6([0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0xfe]);
        let nat = ip6_at(sent, 22);
        templates.push((
            prog_names::PROVIDER,
            p0,
            Ipv6Packet::icmp(router, nat, 3, 0, 0, &sent[14..62])
                .macs(mac(sent, 0), p0_mac)
                .build(),
        ));
        // A reply to a flow that does not exist (another NAT port or id).
        let mut stray = answer(sent);
        let at = if stray[20] == IPPROTO_ICMPV6 { 58 } else { 56 };
        stray[at] ^= 0x5a;
        try_fix_checksums(&mut stray);
        templates.push((prog_names::PROVIDER, p0, stray));
    }
    for sent in opened.iter().filter(|s| !is_ipv6(s)) {
        templates.push((prog_names::PROVIDER, p0, answer(sent)));
        // An ICMP error about the forwarded frame, from a router.
        let router = Ipv4Addr::new(198, 51, 100, 254);
        let nat = Ipv4Addr::new(sent[26], sent[27], sent[28], sent[29]);
        // (sent is IPv4 here: the IPv6 ones were handled above.)
        templates.push((
            prog_names::PROVIDER,
            p0,
            Ipv4Packet::icmp(router, nat, ICMP_TIME_EXCEEDED, 0, 0, &sent[14..42])
                .macs(mac(sent, 0), p0_mac)
                .build(),
        ));
        // A reply to a flow that does not exist (another NAT port).
        let mut stray = answer(sent);
        stray[36] ^= 0x5a;
        try_fix_checksums(&mut stray);
        templates.push((prog_names::PROVIDER, p0, stray));
    }
    // NAT64: the backend's answers and ICMP errors about what it was sent;
    // the consumer side's routers' ICMPv6 errors about the answers as the
    // client got them (each answer goes through once here to get those).
    for (consumer_if, sent) in &opened64 {
        let reply = answer(sent);
        templates.push((prog_names::PROVIDER, p0, reply.clone()));
        let run = b.raw(prog_names::PROVIDER, p0, &reply);
        model.check("setup: NAT64 reply", prog_names::PROVIDER, p0, &reply, &run);
        assert_eq!(
            run.verdict,
            verdict::REDIRECT,
            "setup NAT64 reply forwarded"
        );
        let seen = run.output;
        assert!(is_ipv6(&seen), "setup NAT64 reply arrives as IPv6");
        let (proto, nat, nport, backend, bport) = ports(&sent[14..]).unwrap();
        let (IpAddr::V4(nat), IpAddr::V4(backend)) = (nat, backend) else {
            panic!("a NAT64 flow to an IPv6 backend");
        };
        // A reply to a flow that does not exist (another NAT port or id).
        let mut stray = reply.clone();
        stray[if proto == IPPROTO_ICMP { 38 } else { 36 }] ^= 0x5a;
        try_fix_checksums(&mut stray);
        templates.push((prog_names::PROVIDER, p0, stray));
        if proto == IPPROTO_UDP {
            // No UDP checksum: IPv6 needs one (dropped).
            let mut none = reply.clone();
            none[40..42].copy_from_slice(&[0, 0]);
            templates.push((prog_names::PROVIDER, p0, none));
        }
        if proto == IPPROTO_TCP && *consumer_if == c1 {
            let mut data = Ipv4Packet::tcp((backend, bport), (nat, nport), TCP_ACK);
            data.payload = b"reply data!".to_vec();
            templates.push((
                prog_names::PROVIDER,
                p0,
                data.macs(mac(sent, 0), p0_mac).build(),
            ));
        }
        let router = Ipv4Addr::new(198, 51, 100, 254);
        let error4 = |ty, code, rest, quoted: usize| {
            Ipv4Packet::icmp(router, nat, ty, code, rest, &sent[14..14 + quoted])
                .macs(mac(sent, 0), p0_mac)
                .build()
        };
        let ep = ip6_at(&seen, 22);
        let error6 = |ty, code, rest, quoted: usize| {
            Ipv6Packet::icmp(ROUTER6, ep, ty, code, rest, &seen[14..14 + quoted])
                .macs(ROUTER_MAC, macs[consumer_if])
                .build()
        };
        let (whole4, whole6) = (sent.len() - 14, seen.len() - 14);
        let (errors4, errors6) = match proto {
            IPPROTO_TCP if *consumer_if == c1 => (
                vec![
                    error4(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 28),
                    error4(ICMP_DEST_UNREACH, 1, 0, 28),
                    error4(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1400, whole4),
                    error4(ICMP_TIME_EXCEEDED, 0, 0, 28),
                ],
                vec![
                    error6(2, 0, 1280, whole6),
                    error6(1, 4, 0, 48),
                    error6(3, 0, 0, 48),
                ],
            ),
            IPPROTO_TCP => (
                vec![
                    error4(ICMP_DEST_UNREACH, 13, 0, 28),
                    error4(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1280, whole4),
                ],
                vec![error6(2, 0, 1400, whole6), error6(1, 3, 0, 48)],
            ),
            IPPROTO_UDP => (
                vec![
                    error4(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, whole4),
                    error4(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 1400, 28),
                ],
                vec![error6(1, 4, 0, whole6)],
            ),
            // Errors quoting an echo (not translated: dropped).
            _ => (
                vec![error4(ICMP_DEST_UNREACH, 1, 0, 28)],
                vec![error6(1, 0, 0, 48)],
            ),
        };
        for e in errors4 {
            templates.push((prog_names::PROVIDER, p0, e));
        }
        for e in errors6 {
            templates.push((prog_names::CONSUMER, *consumer_if, e));
        }
    }
    let mut data = Ipv4Packet::tcp((CLIENT, 40000), (EP_TCP, 80), TCP_ACK).macs(CLIENT_MAC, c1_mac);
    data.payload = b"payload!".to_vec();
    // What the client got from the endpoint, quoted in its own error.
    let reply_seen = Ipv4Packet::tcp((EP_TCP, 80), (CLIENT, 40000), TCP_SYN | TCP_ACK).build();
    let mut with_options = Ipv4Packet::udp((CLIENT, 5001), (EP_UDP, 53), b"query")
        .macs(CLIENT_MAC, c1_mac)
        .build();
    with_options.splice(34..34, [1, 1, 1, 0]);
    with_options[14] = 0x46;
    let tot = u16::from_be_bytes([with_options[16], with_options[17]]) + 4;
    with_options[16..18].copy_from_slice(&tot.to_be_bytes());
    try_fix_checksums(&mut with_options);
    let mut fragment = data.build();
    fragment[20] |= 0x20;
    try_fix_checksums(&mut fragment);
    let on = |ifindex: u32, p: Ipv4Packet| {
        let mac = if ifindex == c1 { c1_mac } else { c2_mac };
        (ifindex, p.macs(CLIENT_MAC, mac).build())
    };
    let syn = |sport: u16, dst: Ipv4Addr| Ipv4Packet::tcp((CLIENT, sport), (dst, 80), TCP_SYN);
    let query = |sport: u16, dst: Ipv4Addr| Ipv4Packet::udp((CLIENT, sport), (dst, 53), b"q");
    let client_error = Ipv4Packet::icmp(
        CLIENT,
        EP_TCP,
        ICMP_DEST_UNREACH,
        ICMP_PORT_UNREACH,
        0,
        &reply_seen[14..42],
    );
    for (ifindex, frame) in [
        on(c1, data),
        on(c1, syn(40001, EP_TCP)),
        on(c1, query(5000, EP_UDP)),
        on(c1, Ipv4Packet::echo(CLIENT, EP_TCP, true, 0x78, 1)),
        on(c1, syn(40002, EP_PENDING)),
        on(c1, syn(40003, EP_REJECTED)),
        on(c1, syn(40004, EP_CAPPED)),
        on(c1, syn(40005, EP_RATED)),
        on(c1, query(5002, Ipv4Addr::new(192, 0, 2, 99))),
        on(c1, client_error),
        (c1, arp_request(CLIENT_MAC, CLIENT, EP_TCP)),
        (c1, with_options),
        (c1, fragment),
        (
            c1,
            super::mtu::with_tcp_options(
                &syn(40006, EP_TCP).macs(CLIENT_MAC, c1_mac).build(),
                &super::mtu::linux_syn_options(1460),
            ),
        ),
        on(c2, syn(40010, EP_TCP)),
        on(c2, query(5000, EP_UDP)),
        (c2, arp_request(CLIENT_MAC, CLIENT, EP_TCP)),
    ] {
        templates.push((prog_names::CONSUMER, ifindex, frame));
    }
    templates.extend(ipv6_templates(c1, c2, p0, macs));
    templates.extend(nat64_templates(c1, c2, macs));
    templates.push((
        prog_names::PROVIDER,
        p0,
        arp_request(BACKEND10_MAC, BACKEND10, NAT_TCP),
    ));
    templates.push((
        prog_names::PROVIDER,
        p0,
        Ipv4Packet::udp(
            (BACKEND10, 9000),
            (Ipv4Addr::new(198, 51, 100, 1), 9000),
            b"to the host",
        )
        .macs(BACKEND10_MAC, p0_mac)
        .build(),
    ));

    // Every truncation of every template.
    for (prog, ifindex, t) in &templates {
        for n in 14..t.len() {
            let f = &t[..n];
            let run = b.raw(prog, *ifindex, f);
            model.check(
                &format!("{prog} truncated to {n}: {}", hex(f)),
                prog,
                *ifindex,
                f,
                &run,
            );
        }
    }

    // xorshift64: reproducible without a dependency; `PLINK_FUZZ_SEED`
    // (nonzero) explores another sequence.
    let mut seed: u64 = std::env::var("PLINK_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s| s != 0)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    eprintln!("seed {seed}");
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let rounds: u64 = std::env::var("PLINK_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let started = std::time::Instant::now();
    let mut kinds = [0u64; 8];
    for round in 0..rounds {
        let (prog, ifindex, f) = if rnd().is_multiple_of(10) {
            // Random bytes; a third of them look like IPv4 and a third like
            // IPv6 (TCP, UDP or ICMPv6, often the right length) to get
            // deeper.
            let ifindex = [c1, c2, p0][(rnd() % 3) as usize];
            let prog = if ifindex == p0 {
                prog_names::PROVIDER
            } else {
                prog_names::CONSUMER
            };
            let len = 14 + (rnd() % 140) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            match rnd() % 3 {
                0 if len > 14 => {
                    f[12..14].copy_from_slice(&[8, 0]);
                    f[14] = 0x45;
                }
                1 if len > 54 => {
                    f[12..14].copy_from_slice(&ETH_P_IPV6);
                    f[14] = 0x60;
                    f[20] = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6][(rnd() % 3) as usize];
                    if rnd().is_multiple_of(2) {
                        f[18..20].copy_from_slice(&(len as u16 - 54).to_be_bytes());
                    }
                }
                _ => {}
            }
            kinds[0] += 1;
            (prog, ifindex, f)
        } else {
            let (prog, ifindex, t) = &templates[(rnd() % templates.len() as u64) as usize];
            let mut f = t.clone();
            for _ in 0..1 + rnd() % 3 {
                let kind = (1 + rnd() % 7) as usize;
                kinds[kind] += 1;
                mutate(&mut f, kind, &mut rnd);
            }
            if rnd().is_multiple_of(2) {
                try_fix_checksums(&mut f);
            }
            if rnd().is_multiple_of(4) {
                let n = 14 + (rnd() % (f.len() as u64 - 13)) as usize;
                f.truncate(n);
            }
            (*prog, *ifindex, f)
        };
        let run = b.raw(prog, ifindex, &f);
        model.check(
            &format!("round {round} ({prog}, {}): {}", ifindex, hex(&f)),
            prog,
            ifindex,
            &f,
            &run,
        );
        if round % 10_000 == 9_999 || round + 1 == rounds {
            check_counters(&mut b, &model, &ifstats0, drops0);
        }
    }
    check_counters(&mut b, &model, &ifstats0, drops0);
    let sent: u64 = model.verdicts.values().sum();
    eprintln!(
        "{sent} frames ({} templates, {} IPv6) in {:?}: {} forwarded, {} flows in the model; mutations by kind {kinds:?}",
        templates.len(),
        templates.iter().filter(|(_, _, t)| is_ipv6(t)).count(),
        started.elapsed(),
        model.forwarded,
        model.fwd.len()
    );
    for ((ifindex, v), n) in &model.verdicts {
        eprintln!(
            "  ifindex {ifindex} {:<8} {n}",
            XDP_VERDICT_NAMES[*v as usize]
        );
    }
    eprintln!(
        "  IPv6: {:?} forwarded (to provider, to consumer), {:?} advertisements (consumer, provider)",
        model.forwarded6, model.advertised
    );
    assert!(
        model.forwarded > rounds / 100,
        "enough frames stayed forwardable ({})",
        model.forwarded
    );
    // The IPv6 paths were reached both ways, and ND on both sides.
    assert!(
        model.forwarded6.iter().all(|&n| n > rounds / 1000),
        "enough IPv6 frames forwarded each way ({:?})",
        model.forwarded6
    );
    assert!(
        model.advertised.iter().all(|&n| n > 0),
        "neighbour advertisements on both sides ({:?})",
        model.advertised
    );
    eprintln!(
        "  NAT64: {:?} translated (IPv6 to IPv4, IPv4 to IPv6; errors the same)",
        model.translated
    );
    // NAT64 was reached both ways, for packets and for ICMP errors.
    assert!(
        model.translated[..2].iter().all(|&n| n > rounds / 1000),
        "enough NAT64 packets translated each way ({:?})",
        model.translated
    );
    assert!(
        model.translated[2..].iter().all(|&n| n > 0),
        "ICMP errors translated each way ({:?})",
        model.translated
    );
    let clamped =
        b.dp.counters(CounterKind::Service, 0)
            .unwrap()
            .mss_clamped_in;
    assert!(clamped > 0, "some SYNs went through MSS clamping");
}

/// The IPv6 templates besides the replies: flows to IPv6 endpoints (data of
/// the open TCP flow, new ones, to endpoints not approved, to no endpoint),
/// reserved addresses, extension headers, trailing Ethernet padding, neighbour
/// solicitations (for endpoint addresses, a NAT address, another address,
/// duplicate address detection), other ND and ICMPv6 messages, and the
/// gateway's own IPv6 traffic on the provider side.
fn ipv6_templates(
    c1: u32,
    c2: u32,
    p0: u32,
    macs: &HashMap<u32, [u8; 6]>,
) -> Vec<(&'static str, u32, Vec<u8>)> {
    let on = |ifindex: u32, p: Ipv6Packet| (ifindex, p.macs(CLIENT_MAC, macs[&ifindex]).build());
    let syn = |sport: u16, dst: Ipv6Addr| Ipv6Packet::tcp((CLIENT6, sport), (dst, 80), TCP_SYN);
    let query = |sport: u16| Ipv6Packet::udp((CLIENT6, sport), (EP6_UDP, 53), b"query");
    let mut data = Ipv6Packet::tcp((CLIENT6, 40000), (EP6_TCP, 80), TCP_ACK);
    data.payload = b"payload!".to_vec();
    // An extension header of type `nh` (8 bytes, a PadN option: valid for
    // hop-by-hop and destination options) before the UDP header.
    let with_extension = |nh: u8| {
        let mut f = query(5003).macs(CLIENT_MAC, macs[&c1]).build();
        let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        f[20] = nh;
        f.splice(54..54, [IPPROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
        (c1, f)
    };
    let mut padded = query(5004).macs(CLIENT_MAC, macs[&c1]).build();
    padded.extend_from_slice(&[0; 12]);
    let reply_seen = Ipv6Packet::tcp((EP6_TCP, 80), (CLIENT6, 40000), TCP_SYN | TCP_ACK).build();
    let out = vec![
        on(c1, data),
        on(c1, syn(40001, EP6_TCP)),
        on(c1, query(5000)),
        on(c1, query(5001)),
        on(c1, Ipv6Packet::echo(CLIENT6, EP6_TCP, true, 0x78, 1)),
        on(c1, Ipv6Packet::echo(CLIENT6, EP6_UDP, true, 0x79, 1)),
        on(c1, syn(40002, EP6_PENDING)),
        on(c1, syn(40003, EP6_REJECTED)),
        on(c1, syn(40004, OTHER6)),
        on(c1, syn(40005, RESERVED6)),
        on(
            c1,
            Ipv6Packet::tcp((RESERVED6, 40006), (EP6_TCP, 80), TCP_SYN),
        ),
        (c1, padded),
        with_extension(0),
        with_extension(43),
        with_extension(44),
        with_extension(60),
        // A client's ICMPv6 error about a reply it got.
        on(
            c1,
            Ipv6Packet::icmp(CLIENT6, EP6_TCP, 1, 4, 0, &reply_seen[14..74]),
        ),
        (c1, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_TCP)),
        (c1, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_PENDING)),
        (c1, neighbor_solicitation(CLIENT_MAC, CLIENT6, OTHER6)),
        (
            c1,
            neighbor_solicitation(CLIENT_MAC, Ipv6Addr::UNSPECIFIED, EP6_UDP),
        ),
        (
            c1,
            neighbor_advertisement(CLIENT_MAC, CLIENT6, macs[&c1], EP6_TCP, false),
        ),
        (
            c1,
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
        ),
        on(c2, syn(40010, EP6_TCP)),
        on(c2, query(5000)),
        (c2, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_TCP)),
        (c2, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP6_UDP)),
    ];
    let mut templates: Vec<_> = out
        .into_iter()
        .map(|(i, f)| (prog_names::CONSUMER, i, f))
        .collect();
    let p0_mac = macs[&p0];
    for f in [
        neighbor_solicitation(BACKEND10_MAC, BACKEND6, NAT6_TCP),
        neighbor_solicitation(BACKEND10_MAC, Ipv6Addr::UNSPECIFIED, NAT6_TCP),
        neighbor_solicitation(BACKEND10_MAC, BACKEND6, GW_P0_6),
        Ipv6Packet::udp((BACKEND6, 9000), (GW_P0_6, 9000), b"to the host")
            .macs(BACKEND10_MAC, p0_mac)
            .build(),
        Ipv6Packet::echo(BACKEND6, NAT6_TCP, true, 9, 1)
            .macs(BACKEND10_MAC, p0_mac)
            .build(),
    ] {
        templates.push((prog_names::PROVIDER, p0, f));
    }
    templates
}

/// The NAT64 templates besides the replies and errors: flows to the NAT64
/// endpoints (data of the open flows, new ones, TCP with the options Linux
/// sends, UDP, echo), to the pending one, to another network's or a UDP
/// endpoint, the dual-stack endpoint on both its addresses, neighbour
/// solicitations and ARP for them in their network and the other.
fn nat64_templates(
    c1: u32,
    c2: u32,
    macs: &HashMap<u32, [u8; 6]>,
) -> Vec<(&'static str, u32, Vec<u8>)> {
    let on = |ifindex: u32, p: Ipv6Packet| (ifindex, p.macs(CLIENT_MAC, macs[&ifindex]).build());
    let on4 = |ifindex: u32, p: Ipv4Packet| (ifindex, p.macs(CLIENT_MAC, macs[&ifindex]).build());
    let syn = |sport: u16, dst: Ipv6Addr| Ipv6Packet::tcp((CLIENT6, sport), (dst, 80), TCP_SYN);
    let query = |sport: u16, dst: Ipv6Addr| Ipv6Packet::udp((CLIENT6, sport), (dst, 53), b"query");
    let data = |dst: Ipv6Addr| {
        let mut d = Ipv6Packet::tcp((CLIENT6, 40000), (dst, 80), TCP_ACK);
        d.payload = b"payload!".to_vec();
        d
    };
    // A SYN with the options Linux sends (MSS first).
    let mut with_options = syn(40022, EP64_TCP).macs(CLIENT_MAC, macs[&c1]).build();
    let opts = super::mtu::linux_syn_options(1440);
    with_options.splice(74..74, opts.iter().copied());
    with_options[66] = (((20 + opts.len()) / 4) << 4) as u8;
    let plen = u16::from_be_bytes([with_options[18], with_options[19]]) + opts.len() as u16;
    with_options[18..20].copy_from_slice(&plen.to_be_bytes());
    fix_checksums6(&mut with_options);
    let out = vec![
        on(c1, data(EP64_TCP)),
        on(c1, syn(40021, EP64_TCP)),
        (c1, with_options),
        on(c1, query(5000, EP64_UDP)),
        on(c1, query(5011, EP64_UDP)),
        on(c1, Ipv6Packet::echo(CLIENT6, EP64_TCP, true, 0x78, 1)),
        on(c1, Ipv6Packet::echo(CLIENT6, EP64_UDP, true, 0x79, 1)),
        on(c1, syn(40023, EP64_PENDING)),
        // Network 2's endpoint; TCP to a UDP endpoint.
        on(c1, syn(40024, EP64_DUAL)),
        on(
            c1,
            Ipv6Packet::tcp((CLIENT6, 40025), (EP64_UDP, 53), TCP_SYN),
        ),
        (c1, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP64_TCP)),
        (c1, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP64_PENDING)),
        (c1, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP64_DUAL)),
        (
            c1,
            neighbor_solicitation(CLIENT_MAC, Ipv6Addr::UNSPECIFIED, EP64_UDP),
        ),
        on(c2, data(EP64_DUAL)),
        on(c2, syn(40001, EP64_DUAL)),
        on(c2, Ipv6Packet::echo(CLIENT6, EP64_DUAL, true, 0x7a, 1)),
        // UDP to the TCP endpoint; network 1's endpoint.
        on(c2, query(5012, EP64_DUAL)),
        on(c2, syn(40026, EP64_TCP)),
        on4(
            c2,
            Ipv4Packet::tcp((CLIENT, 40002), (EP_DUAL4, 80), TCP_SYN),
        ),
        on4(c2, Ipv4Packet::echo(CLIENT, EP_DUAL4, true, 0x7b, 1)),
        (c2, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP64_DUAL)),
        (c2, neighbor_solicitation(CLIENT_MAC, CLIENT6, EP64_TCP)),
        (c2, arp_request(CLIENT_MAC, CLIENT, EP_DUAL4)),
    ];
    out.into_iter()
        .map(|(i, f)| (prog_names::CONSUMER, i, f))
        .collect()
}

/// Verdict counters per interface add up to the frames sent and match the
/// verdicts seen; drop reasons add up to the drops.
fn check_counters(
    b: &mut Bench,
    model: &Checker,
    before: &BTreeMap<u32, plink_common::IfStats>,
    drops_before: u64,
) {
    let now = b.dp.interface_stats().unwrap();
    for ifindex in [model.c1, model.c2, model.p0] {
        let (n, b0) = (now[&ifindex], before[&ifindex]);
        let sent: u64 = model
            .verdicts
            .iter()
            .filter(|((i, _), _)| *i == ifindex)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(
            n.packets - b0.packets,
            sent,
            "ifindex {ifindex}: frames counted"
        );
        for (v, name) in XDP_VERDICT_NAMES.iter().enumerate() {
            let seen = model
                .verdicts
                .get(&(ifindex, v as u32))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                n.verdicts[v] - b0.verdicts[v],
                seen,
                "ifindex {ifindex}: {name} verdicts counted"
            );
        }
    }
    let drops: u64 = model
        .verdicts
        .iter()
        .filter(|((_, v), _)| *v == verdict::DROP)
        .map(|(_, n)| n)
        .sum();
    let counted: u64 = b.drops().values().sum::<u64>() - drops_before;
    assert_eq!(counted, drops, "every drop has exactly one reason counted");
}

/// One mutation of a frame of kind 1..=7.
fn mutate(f: &mut Vec<u8>, kind: usize, rnd: &mut impl FnMut() -> u64) {
    if is_ipv6(f) {
        return mutate6(f, kind, rnd);
    }
    let ipv4 = f.len() >= 34 && f[12..14] == [8, 0];
    match kind {
        // IHL
        2 if ipv4 => f[14] = 0x40 | (rnd() as u8 & 0x0f),
        // Total length: anything, or off by a little.
        3 if ipv4 => {
            let tot = u16::from_be_bytes([f[16], f[17]]);
            let new = if rnd().is_multiple_of(2) {
                rnd() as u16
            } else {
                tot.wrapping_add((rnd() % 9) as u16).wrapping_sub(4)
            };
            f[16..18].copy_from_slice(&new.to_be_bytes());
        }
        // Fragment bits and offset.
        4 if ipv4 => {
            let frag = match rnd() % 3 {
                0 => 0x2000,
                1 => (rnd() as u16) & 0x1fff,
                _ => rnd() as u16,
            };
            f[20..22].copy_from_slice(&frag.to_be_bytes());
        }
        // IP options (NOPs and an end), length fields kept consistent.
        5 if ipv4 && f[14] == 0x45 => {
            let words = 1 + (rnd() % 10) as usize;
            let mut opts = vec![1u8; words * 4];
            opts[words * 4 - 1] = 0;
            f.splice(34..34, opts);
            f[14] = 0x45 + words as u8;
            let tot = u16::from_be_bytes([f[16], f[17]]).wrapping_add(words as u16 * 4);
            f[16..18].copy_from_slice(&tot.to_be_bytes());
        }
        // TCP data offset, or an ICMP error quote's bytes.
        6 if ipv4 && f.len() >= 47 => {
            if f[23] == IPPROTO_TCP {
                f[46] = (rnd() as u8) & 0xf0 | (f[46] & 0x0f);
            } else {
                let i = 34 + (rnd() % (f.len() as u64 - 34)) as usize;
                f[i] = rnd() as u8;
            }
        }
        // TTL near its end.
        7 if ipv4 => f[22] = (rnd() % 3) as u8,
        // Any byte.
        _ => {
            let i = (rnd() % f.len() as u64) as usize;
            f[i] = rnd() as u8;
        }
    }
}

/// One mutation of an IPv6 frame of kind 1..=7 (as [`mutate`]).
fn mutate6(f: &mut Vec<u8>, kind: usize, rnd: &mut impl FnMut() -> u64) {
    match kind {
        // Version and traffic class: another version, or another class.
        2 => {
            f[14] = if rnd().is_multiple_of(2) {
                rnd() as u8
            } else {
                0x60 | (rnd() as u8 & 0x0f)
            }
        }
        // Payload length: anything, or off by a little.
        3 => {
            let plen = u16::from_be_bytes([f[18], f[19]]);
            let new = if rnd().is_multiple_of(2) {
                rnd() as u16
            } else {
                plen.wrapping_add((rnd() % 9) as u16).wrapping_sub(4)
            };
            f[18..20].copy_from_slice(&new.to_be_bytes());
        }
        // Next header: an extension header's, another protocol, anything.
        4 => {
            f[20] = match rnd() % 3 {
                0 => EXTENSION_HEADERS[(rnd() % EXTENSION_HEADERS.len() as u64) as usize],
                1 => [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6, IPPROTO_ICMP][(rnd() % 4) as usize],
                _ => rnd() as u8,
            }
        }
        // An extension header inserted (lengths kept consistent), or an
        // address's interface identifier zeroed (reserved: it would read as
        // IPv4), or the source made unspecified (as DAD).
        5 => match rnd() % 4 {
            0 | 1 => {
                let nh = EXTENSION_HEADERS[(rnd() % EXTENSION_HEADERS.len() as u64) as usize];
                f.splice(54..54, [f[20], 0, 1, 4, 0, 0, 0, 0]);
                f[20] = nh;
                let plen = u16::from_be_bytes([f[18], f[19]]).wrapping_add(8);
                f[18..20].copy_from_slice(&plen.to_be_bytes());
            }
            2 => {
                let at = if rnd().is_multiple_of(2) { 30 } else { 46 };
                f[at..at + 8].fill(0);
            }
            _ => f[22..38].fill(0),
        },
        // TCP data offset, or a byte of the L4 header or payload (ICMPv6
        // type and code, ND target and options, ports).
        6 if f.len() > 54 => {
            if f[20] == IPPROTO_TCP && f.len() >= 67 {
                f[66] = (rnd() as u8) & 0xf0 | (f[66] & 0x0f);
            } else {
                let i = 54 + (rnd() % (f.len() as u64 - 54)) as usize;
                f[i] = rnd() as u8;
            }
        }
        // Hop limit near its end, or just below ND's 255.
        7 => f[21] = [0, 1, 2, 254, 255][(rnd() % 5) as usize],
        // Any byte.
        _ => {
            let i = (rnd() % f.len() as u64) as usize;
            f[i] = rnd() as u8;
        }
    }
}
