//! The end-to-end helpers themselves, over a plain veth pair (no plink).

use std::net::{Ipv4Addr, SocketAddrV4};

use plink_tests::{
    netns::{self, Topology},
    servers,
};

#[test]
fn servers_report_the_peer_and_deliver_intact_bodies() {
    netns::require_root_and_tools();
    let mut topo = Topology::new().unwrap();
    let client = topo.host("cl").unwrap();
    let server = topo.host("sv").unwrap();
    topo.link(&client, "eth0", &server, "eth0").unwrap();
    client
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "eth0"])
        .unwrap();
    server
        .ip(&["addr", "add", "198.51.100.10/24", "dev", "eth0"])
        .unwrap();
    let backend = Ipv4Addr::new(198, 51, 100, 10);
    let _srv = servers::start(&server, backend, 8080, true, true).unwrap();

    let dst = SocketAddrV4::new(backend, 8080);
    let src = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 41000);
    let reply = servers::tcp_request(&client, Some(src), dst, 1 << 20).unwrap();
    assert_eq!(reply.peer, src, "server saw the client's address and port");
    assert_eq!(reply.local, dst);
    assert_eq!(reply.body_len, 1 << 20);

    let usrc = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 41001);
    let reply = servers::udp_request(&client, usrc, dst).unwrap();
    assert_eq!(reply.peer, usrc);
    assert_eq!(reply.local, dst);
}
