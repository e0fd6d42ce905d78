//! End to end: ICMP through plink (issue 6) on the reference topology
//! (`plink_tests::privatelink`).

use std::{
    io::ErrorKind,
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use plink_tests::{
    netns::{self, Host},
    privatelink::{self as pl, FarEnds, PrivateLink},
    servers,
};

fn ping(host: &Host, dst: &str) -> anyhow::Result<String> {
    host.exec("ping", &["-n", "-c", "5", "-i", "0.2", "-W", "2", dst])
}

fn ping_through_an_endpoint_from_both_overlapping_consumers_at_once(far: FarEnds) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    let _plink = net.start_plink().unwrap();
    let (a, b) = (net.consumer_a.clone(), net.consumer_b.clone());
    let ta = std::thread::spawn(move || ping(&a, "192.0.2.50"));
    let tb = std::thread::spawn(move || ping(&b, "192.0.2.50"));
    for (name, out) in [
        ("vnet-a", ta.join().unwrap()),
        ("vnet-b", tb.join().unwrap()),
    ] {
        let out = out.unwrap_or_else(|e| panic!("{name}: ping failed: {e:#}"));
        assert!(
            out.contains("5 received") && out.contains("from 192.0.2.50"),
            "{name}: every echo answered by the endpoint address:\n{out}"
        );
    }
    // Every endpoint address answers echo, whatever its service's protocol.
    let out = ping(&net.consumer_a, "192.0.2.53").unwrap();
    assert!(out.contains("5 received"), "dns endpoint:\n{out}");
    // Not an endpoint: dropped, never answered by the gateway's kernel.
    assert!(
        net.consumer_a
            .exec("ping", &["-n", "-c", "1", "-W", "1", "192.0.2.99"])
            .is_err()
    );
}

/// Sends one datagram to the DNS endpoint from `src` in `host` and returns
/// what the connected socket reads: the error tells whether an ICMP port
/// unreachable came back to this very socket.
fn udp_probe(host: &Host, src: SocketAddrV4, send: bool) -> std::io::Result<usize> {
    host.run_in(move || {
        let socket = UdpSocket::bind(src)?;
        socket.connect(pl::endpoint_udp())?;
        socket.set_read_timeout(Some(Duration::from_millis(1500)))?;
        if send {
            socket.send(b"anyone?")?;
        }
        let mut buf = [0u8; 64];
        socket.recv(&mut buf)
    })
    .unwrap()
}

fn closed_backend_port_yields_port_unreachable_at_the_right_client(far: FarEnds) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    // The dns backend (the last server) stops: its port is closed.
    drop(net.servers.pop());
    net.provider.sysctl("net.ipv4.icmp_ratelimit", "0").unwrap();
    let _plink = net.start_plink().unwrap();
    let src = SocketAddrV4::new(pl::CLIENT, 42000);
    // Neighbours may need a moment: retry until the first error arrives.
    let got = netns::wait_for(
        "port unreachable in vnet-a",
        Duration::from_secs(10),
        || {
            Ok(match udp_probe(&net.consumer_a, src, true) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            })
        },
    );
    got.unwrap();
    // vnet-b's identical socket, silent while vnet-a probes again, gets
    // nothing; then its own probe is refused too.
    let b = net.consumer_b.clone();
    let listener = std::thread::spawn(move || udp_probe(&b, src, false));
    std::thread::sleep(Duration::from_millis(200));
    let again = udp_probe(&net.consumer_a, src, true);
    assert_eq!(
        again.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused)
    );
    let silent = listener.join().unwrap();
    assert!(
        matches!(&silent, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "vnet-b got someone else's error: {silent:?}"
    );
    assert_eq!(
        udp_probe(&net.consumer_b, src, true).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused)
    );
}

fn ttl_limited_probes_see_the_endpoint_then_the_service(far: FarEnds) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    let _plink = net.start_plink().unwrap();
    // Warm the neighbours so the TTL-1 probe is the only thing under test.
    ping(&net.consumer_a, "192.0.2.50").unwrap();
    // TTL 1: the gateway answers time exceeded, from the endpoint address.
    let out = net
        .consumer_a
        .command("ping")
        .args(["-n", "-c", "1", "-W", "2", "-t", "1", "192.0.2.50"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("From 192.0.2.50") && text.contains("Time to live exceeded"),
        "time exceeded from the endpoint:\n{text}"
    );
    // TTL 2 reaches the backend: an echo reply.
    let out = net
        .consumer_a
        .exec(
            "ping",
            &["-n", "-c", "1", "-W", "2", "-t", "2", "192.0.2.50"],
        )
        .unwrap();
    assert!(out.contains("1 received"), "{out}");
}

/// A provider-side path with a smaller MTU than the consumer's: the gateway
/// tells the consumer (fragmentation needed), the consumer's kernel lowers
/// its path MTU, and a large upload completes instead of black-holing.
fn path_mtu_discovery_across_a_smaller_provider_mtu(far: FarEnds) {
    use std::io::{Read, Write};
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    // The orders backends become upload sinks that answer with the byte count.
    net.servers.drain(..2);
    for b in pl::ORDERS_BACKENDS {
        let listener = net
            .provider
            .run_in(move || std::net::TcpListener::bind(SocketAddrV4::new(b, 8080)))
            .unwrap()
            .unwrap();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut n = 0usize;
                    let mut buf = vec![0u8; 65536];
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                        n += k;
                    }
                    let _ = s.write_all(format!("{n}\n").as_bytes());
                });
            }
        });
    }
    // Only the gateway's route to the backends has the small MTU: the backends'
    // SYN-ACK still offers MSS 1460, so only PMTUD can fix the size.
    net.gw
        .ip(&[
            "route",
            "replace",
            "198.51.100.0/24",
            "dev",
            "p0",
            "src",
            "198.51.100.254",
            "mtu",
            "lock",
            "1200",
        ])
        .unwrap();
    let _plink = net.start_plink().unwrap();
    const SIZE: usize = 2 << 20;
    let got = net
        .consumer_a
        .run_in(move || -> anyhow::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(
                &pl::endpoint_tcp().into(),
                Duration::from_secs(5),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.set_write_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(&vec![0x5a; SIZE])?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })
        .unwrap()
        .unwrap();
    assert_eq!(got.trim(), SIZE.to_string(), "the whole upload arrived");
    let cache = net
        .consumer_a
        .exec("ip", &["route", "get", "192.0.2.50"])
        .unwrap();
    assert!(
        cache.contains("mtu 1200"),
        "consumer learned the path MTU: {cache}"
    );
}

/// A client behind a router whose last link has a smaller MTU: the router's
/// fragmentation-needed about the backend's large segments reaches the
/// backend through plink, and the download completes.
fn frag_needed_from_a_consumer_router_reaches_the_backend(far: FarEnds) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    // Only the router's side of the last link shrinks: the client still
    // offers MSS 1460, so only PMTUD can fix the backend's segment size.
    net.router_a
        .ip(&["link", "set", "eth1", "mtu", "1200"])
        .unwrap();
    let _plink = net.start_plink().unwrap();
    let reply = servers::tcp_request(&net.routed_client, None, pl::endpoint_tcp(), 1 << 20)
        .expect("the download completes");
    assert_eq!(reply.body_len, 1 << 20);
    let backend = reply.local.ip().to_string();
    let cache = net
        .provider
        .exec(
            "ip",
            &[
                "route",
                "get",
                &pl::ORDERS_NAT.to_string(),
                "from",
                &backend,
            ],
        )
        .unwrap();
    assert!(
        cache.contains("mtu 1200"),
        "the backend learned the path MTU: {cache}"
    );
}

plink_tests::on_both_far_ends!(
    ping_through_an_endpoint_from_both_overlapping_consumers_at_once,
    closed_backend_port_yields_port_unreachable_at_the_right_client,
    ttl_limited_probes_see_the_endpoint_then_the_service,
    frag_needed_from_a_consumer_router_reaches_the_backend,
    path_mtu_discovery_across_a_smaller_provider_mtu,
);
