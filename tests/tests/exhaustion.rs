//! Exhaustion and fairness: one consumer flooding new flows hits its own
//! endpoint caps without hurting another consumer or established flows; a
//! full conntrack table refuses new flows (counted) and loses no live one.

use std::{net::SocketAddrV4, time::Duration};

use plink_tests::{
    gateway::Gateway,
    netns,
    privatelink::{self as pl, PrivateLink},
    servers,
};

/// Neighbours are resolved by the first flows: a refused probe needs no retry.
const PROBE: Duration = Duration::from_millis(300);

#[test]
fn a_flooding_consumer_hits_its_own_caps_only() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    const CAP: u16 = 20;
    let plink = net
        .start_plink_with(&pl::Options {
            gateway_extra: format!(
                "  endpoint_defaults: {{max_flows: {CAP}, new_flows_per_second: 10000}}\n"
            ),
            ..Default::default()
        })
        .unwrap();
    // An established flow of consumer A before the flood, and one of B.
    let keep_a = SocketAddrV4::new(pl::CLIENT, 46000);
    let keep_b = SocketAddrV4::new(pl::CLIENT, 46001);
    servers::udp_request(&net.consumer_a, keep_a, pl::endpoint_udp()).unwrap();
    servers::udp_request(&net.consumer_b, keep_b, pl::endpoint_udp()).unwrap();

    // Consumer A floods new flows to dns-a: the cap admits CAP flows in all.
    // The datapath's own count decides (a slow answer on a loaded machine
    // would make a probe look refused); the probes must not see more.
    let mut answered = 1; // keep_a
    for i in 0..(2 * CAP) {
        let src = SocketAddrV4::new(pl::CLIENT, 47000 + i);
        if servers::udp_probe(&net.consumer_a, src, pl::endpoint_udp(), PROBE).is_ok() {
            answered += 1;
        }
    }
    let scrape = plink.scrape(&net.gw).unwrap();
    let created = Gateway::sample(
        &scrape,
        "plink_endpoint_connections_total{endpoint=\"dns-a\",service=\"dns\",protocol=\"udp\"}",
    );
    assert_eq!(
        created,
        u64::from(CAP),
        "dns-a opened {created} flows, cap {CAP}"
    );
    assert!(answered <= CAP, "{answered} flows answered, cap {CAP}");
    let refused = Gateway::sample(
        &scrape,
        "plink_endpoint_refused_flows_total{endpoint=\"dns-a\",service=\"dns\",cap=\"max_flows\"}",
    );
    assert!(
        refused > u64::from(CAP),
        "refusals counted per endpoint: {refused} (2 × {CAP} tried, {CAP} fit)"
    );

    // A's established flow still works; B's established and new flows too.
    servers::udp_request(&net.consumer_a, keep_a, pl::endpoint_udp()).unwrap();
    servers::udp_request(&net.consumer_b, keep_b, pl::endpoint_udp()).unwrap();
    for i in 0..5 {
        let src = SocketAddrV4::new(pl::CLIENT, 48000 + i);
        servers::udp_request(&net.consumer_b, src, pl::endpoint_udp())
            .unwrap_or_else(|e| panic!("consumer B's new flow {i} was refused: {e:#}"));
    }
    let b_refused = Gateway::sample(
        &plink.scrape(&net.gw).unwrap(),
        "plink_endpoint_refused_flows_total{endpoint=\"dns-b\",service=\"dns\",cap=\"max_flows\"}",
    );
    assert_eq!(b_refused, 0, "consumer B paid for consumer A's flood");
}

#[test]
fn a_full_conntrack_refuses_new_flows_and_keeps_live_ones() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    const TABLE: u16 = 16;
    let plink = net
        .start_plink_with(&pl::Options {
            // One consumer fills the table: no fair-share cap.
            gateway_extra: format!(
                "  conntrack: {{max_flows: {TABLE}}}\n  endpoint_defaults: {{max_flows: 65536}}\n"
            ),
            ..Default::default()
        })
        .unwrap();
    let mut live = Vec::new();
    for i in 0..TABLE {
        let src = SocketAddrV4::new(pl::CLIENT, 49000 + i);
        if servers::udp_request(&net.consumer_a, src, pl::endpoint_udp()).is_ok() {
            live.push(src);
        }
    }
    assert!(!live.is_empty());
    let before = plink.scrape(&net.gw).unwrap();
    // Beyond the table: refused and counted.
    let mut refused = 0;
    for i in 0..8 {
        let src = SocketAddrV4::new(pl::CLIENT, 50000 + i);
        if servers::udp_probe(&net.consumer_b, src, pl::endpoint_udp(), PROBE).is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0, "a full table admitted every new flow");
    let after = plink.scrape(&net.gw).unwrap();
    assert!(
        Gateway::drops(&after, "conntrack_full") > Gateway::drops(&before, "conntrack_full"),
        "conntrack_full drops counted"
    );
    // Every flow that was admitted still works.
    for src in &live {
        servers::udp_request(&net.consumer_a, *src, pl::endpoint_udp())
            .unwrap_or_else(|e| panic!("live flow from {src} lost: {e:#}"));
    }
}

/// Issue 14, item 7: with no cap configured, one consumer flooding new
/// flows cannot take the NAT ports another consumer of the same service
/// needs. Two consumers share one NAT address of 16 ports (searched whole by
/// every new flow): consumer A's flood stops at its fair share, and
/// consumer B's first flow gets a port. Before, A took all 16.
#[test]
fn a_flood_with_default_caps_leaves_nat_ports_for_another_consumer() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    const POOL: u16 = 16;
    let plink = net
        .start_plink_with(&pl::Options {
            dns_nat_ports: format!("30000-{}", 30000 + POOL - 1),
            ..Default::default()
        })
        .unwrap();
    let mut admitted = 0;
    for i in 0..POOL + 4 {
        let src = SocketAddrV4::new(pl::CLIENT, 47000 + i);
        if servers::udp_probe(&net.consumer_a, src, pl::endpoint_udp(), PROBE).is_ok() {
            admitted += 1;
        }
    }
    // dns-a and dns-b share the 16 ports: three quarters of them, halved.
    assert_eq!(admitted, 6, "consumer A's flood was capped at its share");
    let scrape = plink.scrape(&net.gw).unwrap();
    assert!(
        Gateway::sample(
            &scrape,
            "plink_endpoint_refused_flows_total{endpoint=\"dns-a\",service=\"dns\",cap=\"max_flows\"}"
        ) > 0,
        "the refusals are counted against dns-a's cap"
    );
    let reply = servers::udp_request(
        &net.consumer_b,
        SocketAddrV4::new(pl::CLIENT, 47100),
        pl::endpoint_udp(),
    )
    .expect("consumer B's first flow gets a NAT port");
    assert_eq!(*reply.peer.ip(), pl::DNS_NAT);
}
