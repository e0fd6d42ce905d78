//! End-to-end through plink in network namespaces: private endpoints with
//! overlapping consumers, NAT, isolation and the approval cycle (issue 5).
//! The topology is `plink_tests::privatelink` (see its diagram).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use plink_tests::{
    netns::{self, Host},
    privatelink::{self as pl, FarEnds, PrivateLink},
    servers,
};

/// Reads one counter of /proc/net/snmp (`Ip: ForwDatagrams`, ...) in `host`.
fn snmp(host: &Host, section: &str, field: &str) -> u64 {
    let text = host.exec("cat", &["/proc/net/snmp"]).unwrap();
    let mut lines = text
        .lines()
        .filter(|l| l.starts_with(&format!("{section}:")));
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let i = header.iter().position(|h| *h == field).unwrap();
    values[i].parse().unwrap()
}

fn overlapping_consumers_reach_their_own_services_through_nat(far: FarEnds) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    let _plink = net.start_plink().unwrap();

    // The identical 5-tuple from both consumers, at the same time.
    let src = SocketAddrV4::new(pl::CLIENT, 40000);
    let (a, b) = (net.consumer_a.clone(), net.consumer_b.clone());
    let ta = std::thread::spawn(move || {
        servers::tcp_request(&a, Some(src), pl::endpoint_tcp(), 1 << 20)
    });
    let tb = std::thread::spawn(move || {
        servers::tcp_request(&b, Some(src), pl::endpoint_tcp(), 1 << 20)
    });
    let ra = ta.join().unwrap().unwrap();
    let rb = tb.join().unwrap().unwrap();
    assert!(
        pl::ORDERS_BACKENDS.contains(ra.local.ip()),
        "vnet-a reached orders: {ra:?}"
    );
    assert_eq!(
        *ra.peer.ip(),
        pl::ORDERS_NAT,
        "orders backend sees only its NAT address"
    );
    assert_eq!(
        *rb.local.ip(),
        pl::BILLING_BACKEND,
        "vnet-b reached billing: {rb:?}"
    );
    assert_eq!(
        *rb.peer.ip(),
        pl::BILLING_NAT,
        "billing backend sees only its NAT address"
    );
    assert_eq!((ra.body_len, rb.body_len), (1 << 20, 1 << 20));

    // UDP request/reply from both consumers, same source port.
    let usrc = SocketAddrV4::new(pl::CLIENT, 41000);
    let ua = servers::udp_request(&net.consumer_a, usrc, pl::endpoint_udp()).unwrap();
    let ub = servers::udp_request(&net.consumer_b, usrc, pl::endpoint_udp()).unwrap();
    for u in [&ua, &ub] {
        assert_eq!(*u.local.ip(), pl::DNS_BACKEND);
        assert_eq!(*u.peer.ip(), pl::DNS_NAT);
    }
    assert_ne!(ua.peer.port(), ub.peer.port(), "two flows, two NAT ports");

    // A client behind a router in vnet-a.
    let rc = servers::tcp_request(&net.routed_client, None, pl::endpoint_tcp(), 64 * 1024).unwrap();
    assert!(pl::ORDERS_BACKENDS.contains(rc.local.ip()));
    assert_eq!(*rc.peer.ip(), pl::ORDERS_NAT);
}

fn the_fast_path_bypasses_the_kernel_stack(far: FarEnds) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    let _plink = net.start_plink().unwrap();
    // Warm up (neighbours), then measure.
    servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), 1024).unwrap();
    let forwarded_before = snmp(&net.gw, "Ip", "ForwDatagrams");
    let redirects = |dev: &str| -> u64 {
        let stats = net.gw.exec("ethtool", &["-S", dev]).unwrap();
        stats
            .lines()
            .filter(|l| l.trim_start().starts_with("rx_queue_") && l.contains("_xdp_redirect:"))
            .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
            .sum()
    };
    let (c1_before, p0_before) = (redirects("c1"), redirects("p0"));
    for _ in 0..5 {
        servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), 256 * 1024).unwrap();
        servers::udp_request(
            &net.consumer_b,
            SocketAddrV4::new(pl::CLIENT, 0),
            pl::endpoint_udp(),
        )
        .unwrap();
    }
    let forwarded_after = snmp(&net.gw, "Ip", "ForwDatagrams");
    // The kernel's own evidence that XDP moved the packets: redirect
    // counters on both sides grew.
    assert!(redirects("c1") > c1_before, "no XDP redirects on c1");
    assert!(redirects("p0") > p0_before, "no XDP redirects on p0");
    assert_eq!(
        forwarded_before, forwarded_after,
        "the gateway kernel forwarded packets: the flows did not stay in XDP"
    );
    let ruleset = net.gw.exec("nft", &["list", "ruleset"]).unwrap();
    assert!(
        ruleset.trim().is_empty(),
        "the gateway has nftables rules: {ruleset}"
    );
    // No kernel conntrack either (the table is absent or empty).
    let ct = net
        .gw
        .exec("cat", &["/proc/net/nf_conntrack"])
        .unwrap_or_default();
    assert!(ct.trim().is_empty(), "kernel conntrack entries: {ct}");
}

fn conntrack_lists_flows_with_their_nat_mapping(far: FarEnds) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    let plink = net.start_plink().unwrap();
    let src = SocketAddrV4::new(pl::CLIENT, 42000);
    servers::udp_request(&net.consumer_a, src, pl::endpoint_udp()).unwrap();
    let out = plink.ctl(&net.gw, &["conntrack", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let flows = json["data"]["flows"].as_array().unwrap();
    let flow = flows
        .iter()
        .find(|f| f["client"] == "192.0.2.1:42000")
        .unwrap_or_else(|| panic!("no flow for the client in {out}"));
    assert_eq!(flow["endpoint"], "dns-a");
    assert_eq!(flow["network"], "vnet-a");
    assert_eq!(flow["protocol"], "udp");
    assert_eq!(flow["backend"], "198.51.100.20:5353");
    assert!(flow["nat"].as_str().unwrap().starts_with("198.51.100.202:"));
    let _ = Duration::ZERO;
    let _ = Ipv4Addr::UNSPECIFIED;
}

/// ARP answers from XDP on both sides arrive without any other traffic to
/// flush them: the consumer resolves the endpoint address, the backend the
/// NAT address, within the first request (on veth, XDP_TX alone stalls
/// until some redirect wakes a GRO-only peer).
fn first_answers_arrive_without_other_traffic(far: FarEnds) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    let _plink = net.start_plink().unwrap();
    let neighbour = |host: &Host, addr: &str, dev: &str| -> Option<[u8; 6]> {
        let out = host.ip(&["neigh", "show", addr, "dev", dev]).ok()?;
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)?;
        netns::parse_mac(mac).ok()
    };
    assert_eq!(neighbour(&net.consumer_a, "192.0.2.53", "eth0"), None);
    assert_eq!(neighbour(&net.provider, "198.51.100.202", "eth0"), None);
    let started = std::time::Instant::now();
    let reply = servers::udp_request(
        &net.consumer_a,
        SocketAddrV4::new(pl::CLIENT, 0),
        pl::endpoint_udp(),
    )
    .unwrap();
    assert_eq!(*reply.local.ip(), pl::DNS_BACKEND);
    // udp_request retries every 500 ms; a stalled answer shows as retries.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the first request took {:?}: answers stalled",
        started.elapsed()
    );
    assert_eq!(
        neighbour(&net.consumer_a, "192.0.2.53", "eth0"),
        Some(net.gw.mac("c1").unwrap()),
        "the consumer resolved the endpoint address to the gateway's c1"
    );
    assert_eq!(
        neighbour(&net.provider, "198.51.100.202", "eth0"),
        Some(net.gw.mac("p0").unwrap()),
        "the backend resolved the NAT address to the gateway's p0"
    );
    // A ping answered end to end on its first try.
    net.consumer_a
        .exec("ping", &["-n", "-c", "1", "-W", "2", "192.0.2.50"])
        .unwrap();
}

plink_tests::on_both_far_ends!(
    overlapping_consumers_reach_their_own_services_through_nat,
    the_fast_path_bypasses_the_kernel_stack,
    conntrack_lists_flows_with_their_nat_mapping,
    first_answers_arrive_without_other_traffic,
);
