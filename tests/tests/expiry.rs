//! Flow expiry and NAT ports: with short timeouts an idle flow's entries and
//! NAT port are freed; a port held by a live flow is never handed out, and a
//! full pool refuses new flows (counted) until timeouts return ports.

use std::{net::SocketAddrV4, time::Duration};

use plink_tests::{
    gateway::Gateway,
    netns::{self, wait_for},
    privatelink::{self as pl, PrivateLink},
    servers,
};

const SHORT_TIMEOUTS: &str =
    "  timeouts: {udp: 2s, tcp_transitory: 2s, tcp_established: 10s, icmp: 2s}\n";

fn flows_of(plink: &plink_tests::gateway::Gateway, net: &PrivateLink) -> Vec<serde_json::Value> {
    let out = plink.ctl(&net.gw, &["conntrack", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["data"]["flows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn nat_in_use(scrape: &str) -> u64 {
    Gateway::sample(
        scrape,
        "plink_nat_ports_in_use{service=\"dns\",nat_address=\"198.51.100.202\",protocol=\"udp\"}",
    )
}

#[test]
fn idle_flows_expire_and_free_their_nat_ports() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net
        .start_plink_with(&pl::Options {
            gateway_extra: SHORT_TIMEOUTS.into(),
            ..Default::default()
        })
        .unwrap();
    let src = SocketAddrV4::new(pl::CLIENT, 43000);
    servers::udp_request(&net.consumer_a, src, pl::endpoint_udp()).unwrap();
    let flows = flows_of(&plink, &net);
    assert_eq!(flows.len(), 1, "one flow: {flows:?}");
    // Gauges come from the GC sweep (once a second) after the flow opened.
    wait_for("the NAT port to be counted", Duration::from_secs(3), || {
        Ok((nat_in_use(&plink.scrape(&net.gw)?) == 1).then_some(()))
    })
    .unwrap();

    // Idle for longer than the UDP timeout: the GC removes the flow and its port.
    wait_for("the idle flow to expire", Duration::from_secs(8), || {
        Ok(flows_of(&plink, &net).is_empty().then_some(()))
    })
    .unwrap();
    // Gauges come from the GC sweep that removed it, or the next one.
    wait_for("the NAT port to be freed", Duration::from_secs(3), || {
        Ok((nat_in_use(&plink.scrape(&net.gw)?) == 0).then_some(()))
    })
    .unwrap();
}

#[test]
fn a_full_nat_pool_refuses_new_flows_until_ports_expire() {
    netns::require_root_and_tools();
    // At most 32 ports: a new flow probes 32 ports, so the whole pool is
    // searched and capacity is exact (larger pools: see the README).
    const POOL: u16 = 16;
    let mut net = PrivateLink::build().unwrap();
    let plink = net
        .start_plink_with(&pl::Options {
            // Long enough that no flow expires while the pool fills.
            // One endpoint fills the pool: no fair-share cap.
            gateway_extra: "  timeouts: {udp: 6s}\n  endpoint_defaults: {max_flows: 65536}\n"
                .into(),
            dns_nat_ports: format!("30000-{}", 30000 + POOL - 1),
            ..Default::default()
        })
        .unwrap();
    // Fill the pool.
    for i in 0..POOL {
        let src = SocketAddrV4::new(pl::CLIENT, 44000 + i);
        servers::udp_request(&net.consumer_a, src, pl::endpoint_udp()).unwrap();
    }
    // Every live flow holds its own port of the range.
    let flows = flows_of(&plink, &net);
    assert_eq!(flows.len(), usize::from(POOL), "all flows live");
    let ports: std::collections::BTreeSet<u16> = flows
        .iter()
        .map(|f| {
            let nat = f["nat"].as_str().unwrap();
            nat.rsplit(':').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(
        ports.len(),
        usize::from(POOL),
        "a NAT port is held by two live flows"
    );
    assert!(ports.iter().all(|p| (30000..30000 + POOL).contains(p)));

    // One more flow: refused and counted, not given a live flow's port.
    let before = plink.scrape(&net.gw).unwrap();
    let extra = SocketAddrV4::new(pl::CLIENT, 45000);
    assert!(
        servers::udp_request(&net.consumer_a, extra, pl::endpoint_udp()).is_err(),
        "a flow got through a full NAT pool"
    );
    let after = plink.scrape(&net.gw).unwrap();
    let failures = |s: &str| {
        Gateway::sample(
            s,
            "plink_nat_port_allocation_failures_total{service=\"dns\"}",
        )
    };
    assert!(
        failures(&after) > failures(&before),
        "allocation failure counted"
    );

    // After the UDP timeout the ports come back and new flows succeed again.
    wait_for("NAT ports to return", Duration::from_secs(10), || {
        Ok(servers::udp_request(&net.consumer_a, extra, pl::endpoint_udp()).ok())
    })
    .unwrap();
}
