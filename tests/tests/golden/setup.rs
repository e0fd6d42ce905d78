//! The gateway namespace every golden case runs in, the dataplane spec it
//! loads, and builders for the frames the cases expect.

use super::*;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const BACKEND10_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x10];
pub const BACKEND11_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x11];

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const EP_TCP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
pub const EP_UDP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 51);
pub const EP_PENDING: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 52);
pub const EP_REJECTED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
pub const EP_REMOVED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 54);
pub const EP_NONEIGH: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 60);
pub const EP_CAPPED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 61);
pub const EP_RATED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 62);
pub const BACKEND10: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const BACKEND11: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
pub const BACKEND_NONEIGH: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
pub const NAT_TCP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
pub const NAT_UDP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 201);
pub const NAT_NONEIGH: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 202);
pub const UDP_PORTS: std::ops::RangeInclusive<u16> = 20000..=20009;

/// The gateway namespace and what the cases need to know about it.
pub struct Gw {
    _topo: Topology,
    pub host: Host,
    pub c1: u32,
    pub c2: u32,
    pub p0: u32,
    pub c1_mac: [u8; 6],
    pub c2_mac: [u8; 6],
    pub p0_mac: [u8; 6],
}

/// The gateway's interfaces as the cases address them (Copy, to move into
/// the namespace's thread).
#[derive(Clone, Copy)]
pub struct Ifs {
    pub c1: u32,
    pub c2: u32,
    pub p0: u32,
    pub c1_mac: [u8; 6],
    pub c2_mac: [u8; 6],
    pub p0_mac: [u8; 6],
}

impl Gw {
    pub fn ifs(&self) -> Ifs {
        Ifs {
            c1: self.c1,
            c2: self.c2,
            p0: self.p0,
            c1_mac: self.c1_mac,
            c2_mac: self.c2_mac,
            p0_mac: self.p0_mac,
        }
    }
}

pub fn gateway() -> Gw {
    netns::require_root_and_tools();
    let mut topo = Topology::new().unwrap();
    let host = topo.host("gw").unwrap();
    let cn1 = topo.host("cn1").unwrap();
    let cn2 = topo.host("cn2").unwrap();
    let pv = topo.host("pv").unwrap();
    topo.link(&host, "c1", &cn1, "eth0").unwrap();
    topo.link(&host, "c2", &cn2, "eth0").unwrap();
    topo.link(&host, "p0", &pv, "eth0").unwrap();
    host.ip(&["addr", "add", "198.51.100.1/24", "dev", "p0"])
        .unwrap();
    // bpf_fib_lookup refuses to route for an input device without forwarding;
    // consumer interfaces keep it off (the forwarding contract).
    host.sysctl("net.ipv4.conf.p0.forwarding", "1").unwrap();
    // IPv6 on the provider side as well (golden/ipv6.rs): p0 forwards,
    // the backend's neighbour is permanent. Test hosts start with IPv6
    // off (tests/src/netns.rs); only p0 gets it.
    host.sysctl("net.ipv6.conf.p0.disable_ipv6", "0").unwrap();
    host.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:100::1/64",
        "dev",
        "p0",
        "nodad",
    ])
    .unwrap();
    host.sysctl("net.ipv6.conf.p0.forwarding", "1").unwrap();
    for (ip, mac) in [
        ("198.51.100.10", BACKEND10_MAC),
        ("198.51.100.11", BACKEND11_MAC),
        ("2001:db8:100::10", BACKEND10_MAC),
    ] {
        host.neigh_permanent(ip, mac, "p0").unwrap();
    }
    Gw {
        c1: host.ifindex("c1").unwrap(),
        c2: host.ifindex("c2").unwrap(),
        p0: host.ifindex("p0").unwrap(),
        c1_mac: host.mac("c1").unwrap(),
        c2_mac: host.mac("c2").unwrap(),
        p0_mac: host.mac("p0").unwrap(),
        host,
        _topo: topo,
    }
}

pub fn tcp_endpoint(
    id: u32,
    network_id: u32,
    addr: impl Into<std::net::IpAddr>,
    service_id: u32,
) -> EndpointSpec {
    EndpointSpec {
        id,
        network_id,
        addr: addr.into(),
        addr6: None,
        service_id,
        protocol: Protocol::Tcp,
        ports: vec![PortSpec {
            port: 80,
            target_port: 8080,
        }],
        state: EndpointState::Approved,
        max_flows: 0,
        new_flows_per_sec: 0,
    }
}

/// Service 0 (TCP 80→8080, backends 0 and 1), service 1 (UDP 53→5353,
/// backend 2, ten NAT ports), service 2 (TCP, an unresolved backend).
pub fn spec(gw: &Gw) -> DataplaneSpec {
    let backend = |id, service_id, addr: Ipv4Addr| BackendSpec {
        id,
        service_id,
        addr: addr.into(),
        state: BackendState::Active,
    };
    let nat = |addr: Ipv4Addr, ports| NatSpec {
        addr: addr.into(),
        ports,
        draining: false,
    };
    let mut endpoints = vec![
        tcp_endpoint(0, 1, EP_TCP, 0),
        EndpointSpec {
            protocol: Protocol::Udp,
            ports: vec![PortSpec {
                port: 53,
                target_port: 5353,
            }],
            ..tcp_endpoint(1, 1, EP_UDP, 1)
        },
        EndpointSpec {
            state: EndpointState::Pending,
            ..tcp_endpoint(2, 1, EP_PENDING, 0)
        },
        EndpointSpec {
            state: EndpointState::Rejected,
            ..tcp_endpoint(3, 1, EP_REJECTED, 0)
        },
        EndpointSpec {
            state: EndpointState::Removed,
            ..tcp_endpoint(4, 1, EP_REMOVED, 0)
        },
        // Network 2 reuses network 1's endpoint address.
        tcp_endpoint(5, 2, EP_TCP, 0),
        tcp_endpoint(6, 1, EP_NONEIGH, 2),
        EndpointSpec {
            max_flows: 1,
            ..tcp_endpoint(7, 1, EP_CAPPED, 0)
        },
        EndpointSpec {
            new_flows_per_sec: 1,
            ..tcp_endpoint(8, 1, EP_RATED, 0)
        },
    ];
    endpoints.sort_by_key(|e| e.id);
    DataplaneSpec {
        interfaces: vec![
            InterfaceSpec {
                ifindex: gw.c1,
                role: InterfaceRole::Consumer { network_id: 1 },
                mac: gw.c1_mac,
                answers: AnswerPath::XdpTx,
            },
            InterfaceSpec {
                ifindex: gw.c2,
                role: InterfaceRole::Consumer { network_id: 2 },
                mac: gw.c2_mac,
                answers: AnswerPath::XdpTx,
            },
            InterfaceSpec {
                ifindex: gw.p0,
                role: InterfaceRole::Provider,
                mac: gw.p0_mac,
                answers: AnswerPath::XdpTx,
            },
        ],
        timeouts: TimeoutSpec::default(),
        services: vec![
            ServiceSpec {
                id: 0,
                nat: vec![nat(NAT_TCP, 1024..=65535)],
                lookup: vec![0, 1, 0, 1, 0, 1, 0],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 0,
            },
            ServiceSpec {
                id: 1,
                nat: vec![nat(NAT_UDP, UDP_PORTS)],
                lookup: vec![2],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 0,
            },
            ServiceSpec {
                id: 2,
                nat: vec![nat(NAT_NONEIGH, 1024..=65535)],
                lookup: vec![3],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 0,
            },
        ],
        backends: vec![
            backend(0, 0, BACKEND10),
            backend(1, 0, BACKEND11),
            backend(2, 1, BACKEND10),
            backend(3, 2, BACKEND_NONEIGH),
        ],
        endpoints,
        retired_nat: Default::default(),
        next_hops: Default::default(),
        proxy_headers: Default::default(),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The forward key the datapath builds for a consumer packet.
pub fn fwd_key(
    network_id: u32,
    client: (Ipv4Addr, u16),
    ep: (Ipv4Addr, u16),
    proto: u8,
) -> CtFwdKey {
    CtFwdKey {
        src_addr_be: v4(client.0.octets()),
        dst_addr_be: v4(ep.0.octets()),
        network_id,
        src_port_be: client.1.to_be(),
        dst_port_be: ep.1.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// (backend address, backend MAC) that service 0's table gives this flow.
pub fn service0_backend(key: &CtFwdKey) -> (Ipv4Addr, [u8; 6]) {
    let table = [0, 1, 0, 1, 0, 1, 0];
    match table[(flow_hash(key) % 7) as usize] {
        0 => (BACKEND10, BACKEND10_MAC),
        _ => (BACKEND11, BACKEND11_MAC),
    }
}

/// A TCP flow from `CLIENT` to the TCP endpoint (network 1, service 0) as
/// the cases see it: the backend and NAT port it gets, and its SYN
/// and ACK as the client sends them.
pub struct TcpFlow {
    pub client: (Ipv4Addr, u16),
    pub ep: (Ipv4Addr, u16),
    pub backend: Ipv4Addr,
    pub backend_mac: [u8; 6],
    pub nat: (Ipv4Addr, u16),
    pub syn: Ipv4Packet,
    pub ack: Ipv4Packet,
}

/// [`TcpFlow`] from client port `port`, on an empty NAT table.
pub fn tcp_flow(n: &Ifs, port: u16) -> TcpFlow {
    let client = (CLIENT, port);
    let ep = (EP_TCP, 80);
    let key = fwd_key(1, client, ep, IPPROTO_TCP);
    let (backend, backend_mac) = service0_backend(&key);
    TcpFlow {
        client,
        ep,
        backend,
        backend_mac,
        nat: (NAT_TCP, first_port(&key, 1024..=65535)),
        syn: Ipv4Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac),
        ack: Ipv4Packet::tcp(client, ep, TCP_ACK).macs(CLIENT_MAC, n.c1_mac),
    }
}

/// The NAT port the first probe gives a flow (the table is empty).
pub fn first_port(key: &CtFwdKey, range: std::ops::RangeInclusive<u16>) -> u16 {
    nat_probe_port(flow_hash(key), 0, *range.start(), *range.end())
}

/// What the provider sees for a consumer packet, translated.
pub fn translated(
    p: &Ipv4Packet,
    gw_p0: [u8; 6],
    backend: (Ipv4Addr, u16, [u8; 6]),
    nat: (Ipv4Addr, u16),
) -> Vec<u8> {
    let mut t = p.clone().macs(gw_p0, backend.2);
    t.src = nat.0;
    t.sport = nat.1;
    t.dst = backend.0;
    t.dport = backend.1;
    t.ttl -= 1;
    t.build()
}

pub fn fix_ip_checksum(f: &mut [u8]) {
    f[24..26].copy_from_slice(&[0, 0]);
    let c = plink_tests::packet::checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// The ICMP error `from` sends to `to` quoting `quoted` (IP bytes, possibly
/// truncated), built from scratch.
pub fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    ty: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Ipv4Packet {
    Ipv4Packet::icmp(from, to, ty, code, rest, quoted)
}

/// The ICMP error the gateway sends back to a consumer about `offending`
/// (a frame it received): from the address it was sent to, quoting its IP
/// header and 8 bytes, TTL 64, id 0.
pub fn error_reply(offending: &[u8], ty: u8, code: u8, mtu: u16, gw_mac: [u8; 6]) -> Vec<u8> {
    let src = Ipv4Addr::new(offending[30], offending[31], offending[32], offending[33]);
    let dst = Ipv4Addr::new(offending[26], offending[27], offending[28], offending[29]);
    let mut p = Ipv4Packet::icmp(src, dst, ty, code, mtu as u32, &offending[14..42]);
    p.ip_id = 0;
    let mac: [u8; 6] = offending[6..12].try_into().unwrap();
    p.macs(gw_mac, mac).build()
}

/// What the consumer sees of a provider packet, translated back: from the
/// endpoint `ep` to the client `client`, out of the gateway's consumer
/// interface (`gw_mac`) to `client_mac`.
pub fn untranslated(
    p: &Ipv4Packet,
    gw_mac: [u8; 6],
    client_mac: [u8; 6],
    ep: (Ipv4Addr, u16),
    client: (Ipv4Addr, u16),
) -> Vec<u8> {
    let mut t = p.clone().macs(gw_mac, client_mac);
    t.src = ep.0;
    t.sport = ep.1;
    t.dst = client.0;
    t.dport = client.1;
    t.ttl -= 1;
    t.build()
}
