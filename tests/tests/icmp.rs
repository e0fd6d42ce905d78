//! End to end: ICMP through plink (issue 6) on the reference topology
//! (`plink_tests::privatelink`).

use std::{
    io::ErrorKind,
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use plink_tests::{
    netns::{self, Host},
    privatelink::{self as pl, PrivateLink},
};

fn ping(host: &Host, dst: &str) -> anyhow::Result<String> {
    host.exec("ping", &["-n", "-c", "5", "-i", "0.2", "-W", "2", dst])
}

#[test]
fn ping_through_an_endpoint_from_both_overlapping_consumers_at_once() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
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

#[test]
fn closed_backend_port_yields_port_unreachable_at_the_right_client() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
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
