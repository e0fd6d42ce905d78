//! Flow logs end to end (issue 20 item 2): 100 TCP flows through two
//! overlapping consumers (the same client address in vnet-a and vnet-b)
//! reach a real IPFIX collector (nfdump's `nfcapd`) with their NAT mapping
//! and byte counts once they ended, and the same records are in the JSON
//! lines file; a flood of new flows beyond a small ring counts the records
//! it lost and forwards every packet.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use plink_tests::{
    flowlogs::{Collector, read_json_lines, u},
    gateway::Gateway,
    netns::{self, wait_for},
    packet::Ipv4Packet,
    privatelink::{self as pl, PrivateLink},
    servers,
};
use serde_json::Value;

const COLLECTOR: &str = "198.51.100.10";
const COLLECTOR_PORT: u16 = 4739;

#[test]
fn flows_reach_nfcapd_with_their_nat_mapping_and_byte_counts() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let json = net.topo.scratch_dir().unwrap().join("flows.jsonl");
    let provider = net.provider.clone();
    let collector = Collector::start(
        &mut net.topo,
        &provider,
        format!("{COLLECTOR}:{COLLECTOR_PORT}").parse().unwrap(),
    )
    .unwrap();
    let plink = net
        .start_plink_with(&pl::Options {
            gateway_extra: format!(
                "  flow_logs: {{ipfix: '{COLLECTOR}:{COLLECTOR_PORT}', json: {}}}\n  timeouts: {{tcp_transitory: 2s}}\n",
                json.display()
            ),
            orders_extra: "    flow_logs: {sample: 1}\n".into(),
            billing_extra: "    flow_logs: {sample: 1}\n".into(),
            ..Default::default()
        })
        .unwrap();

    // 50 flows from each consumer, the same client address and ports in
    // both networks: 100 flows, 50 pairs of identical 5-tuples.
    let mut expected: BTreeMap<(&str, u16), (SocketAddrV4, usize)> = BTreeMap::new();
    for i in 0..50u16 {
        let src = SocketAddrV4::new(pl::CLIENT, 42000 + i);
        for (net_name, host) in [("a", &net.consumer_a), ("b", &net.consumer_b)] {
            let body = 1000 + usize::from(i) * 37;
            let r = servers::tcp_request(host, Some(src), pl::endpoint_tcp(), body).unwrap();
            assert_eq!(r.body_len, body);
            expected.insert((net_name, src.port()), (r.peer, body));
        }
    }

    // Their end records come once the GC removed them (closed, 2 s).
    let ends = wait_for(
        "100 end records in the JSON flow log",
        Duration::from_secs(30),
        || {
            let ends: Vec<Value> = read_json_lines(&json)
                .into_iter()
                .filter(|r| r["event"] == "end")
                .collect();
            Ok((ends.len() >= 100).then_some(ends))
        },
    )
    .unwrap();
    let records = read_json_lines(&json);
    let starts = records.iter().filter(|r| r["event"] == "start").count();
    assert_eq!(starts, 100, "one start record per flow");
    assert_eq!(ends.len(), 100, "one end record per flow: {ends:?}");

    // Every flow's NAT mapping is the one its server saw; the bytes each
    // way add up to the endpoints' counters (all their flows are logged).
    let scrape = plink.scrape(&net.gw).unwrap();
    let mut by_endpoint: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for e in &ends {
        assert_eq!(e["v"], 1);
        assert_eq!(e["reason"], "closed", "{e}");
        let client: SocketAddrV4 = e["client"].as_str().unwrap().parse().unwrap();
        let nat: SocketAddrV4 = e["nat"].as_str().unwrap().parse().unwrap();
        let net_name = if nat.ip() == &pl::ORDERS_NAT {
            "a"
        } else {
            "b"
        };
        let (peer, body) = expected[&(net_name, client.port())];
        assert_eq!(nat, peer, "NAT mapping of {e}");
        assert!(u(&e["bytes_out"]) > body as u64, "{e}");
        assert!(u(&e["packets_in"]) >= 3 && u(&e["packets_out"]) >= 3, "{e}");
        let t = by_endpoint.entry(u(&e["endpoint_id"])).or_default();
        t.0 += u(&e["bytes_in"]);
        t.1 += u(&e["bytes_out"]);
    }
    let counter = |ep: &str, dir: &str| {
        Gateway::sample(
            &scrape,
            &format!(
                "plink_endpoint_bytes_total{{endpoint=\"{ep}\",service=\"{}\",direction=\"{dir}\"}}",
                if ep == "orders-a" {
                    "orders"
                } else {
                    "billing"
                }
            ),
        )
    };
    let mut sums: Vec<(u64, u64)> = by_endpoint.values().copied().collect();
    sums.sort();
    let mut want = vec![
        (counter("orders-a", "in"), counter("orders-a", "out")),
        (counter("billing-b", "in"), counter("billing-b", "out")),
    ];
    want.sort();
    assert_eq!(sums, want, "per-flow bytes add up to the endpoint counters");
    assert_eq!(
        Gateway::sample(&scrape, "plink_flow_log_lost_total{where=\"ring\"}"),
        0
    );

    // The collector: stopping nfcapd writes its file out.
    wait_for(
        "the IPFIX records to be sent",
        Duration::from_secs(10),
        || {
            let s = plink.scrape(&net.gw)?;
            Ok(
                (Gateway::sample(&s, "plink_flow_log_records_exported_total{sink=\"ipfix\"}")
                    >= 200)
                    .then_some(()),
            )
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stored = collector.stop(&mut net.topo).unwrap();
    eprintln!("first nfdump record: {}", stored[0]);
    let ends_json: BTreeMap<(String, u16), &Value> = ends
        .iter()
        .map(|e| {
            let client: SocketAddrV4 = e["client"].as_str().unwrap().parse().unwrap();
            ((e["nat"].as_str().unwrap().to_owned(), client.port()), e)
        })
        .collect();
    let mut matched = 0;
    for r in &stored {
        let nat = format!(
            "{}:{}",
            r["src4_xlt_ip"].as_str().unwrap_or_default(),
            u(&r["src_xlt_port"])
        );
        let Some(e) = ends_json.get(&(nat.clone(), u(&r["src_port"]) as u16)) else {
            continue;
        };
        // The end record of that flow (start records carry no bytes).
        if u(&r["in_bytes"]) == 0 {
            continue;
        }
        assert_eq!(u(&r["in_bytes"]), u(&e["bytes_in"]), "{r} vs {e}");
        assert_eq!(u(&r["out_bytes"]), u(&e["bytes_out"]), "{r} vs {e}");
        assert_eq!(r["src4_addr"], pl::CLIENT.to_string(), "{r}");
        matched += 1;
    }
    assert_eq!(
        matched, 100,
        "every ended flow is in nfcapd's store with its NAT mapping and bytes; first record: {}",
        stored[0]
    );
}

#[test]
fn a_flood_beyond_the_ring_counts_lost_records_and_forwards_every_packet() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let json = net.topo.scratch_dir().unwrap().join("flows.jsonl");
    let plink = net
        .start_plink_with(&pl::Options {
            gateway_extra: format!(
                "  flow_logs: {{json: {}, ring_bytes: 4096}}\n",
                json.display()
            ),
            dns_extra: "    flow_logs: {sample: 1}\n".into(),
            ..Default::default()
        })
        .unwrap();
    let gw_c1 = net.gw.mac("c1").unwrap();
    let ca = net.consumer_a.mac("eth0").unwrap();
    // 3000 new UDP flows in one burst: the ring holds about 28 records.
    const FLOWS: u16 = 3000;
    let frames: Vec<Vec<u8>> = (0..FLOWS)
        .map(|i| {
            Ipv4Packet::udp((pl::CLIENT, 10000 + i), (pl::DNS_ENDPOINT, 53), b"flood")
                .macs(ca, gw_c1)
                .build()
        })
        .collect();
    let before = plink.scrape(&net.gw).unwrap();
    let pkts = |s: &str| {
        Gateway::sample(
            s,
            "plink_endpoint_packets_total{endpoint=\"dns-a\",service=\"dns\",direction=\"in\"}",
        )
    };
    // Datagrams delivered to the backend's host, queued or not (a burst
    // overflows the test server's socket buffer: InErrors).
    let udp_in = || -> anyhow::Result<u64> {
        Ok(net.provider.snmp("Udp", "InDatagrams")? + net.provider.snmp("Udp", "InErrors")?)
    };
    let backend_before = udp_in().unwrap();
    // Bursts of 250 new flows, each many times what the ring holds, one
    // after the other has reached the backend: a single burst of 3000 can
    // overflow the veth's queue in front of XDP on a loaded machine, a loss
    // that is neither plink's nor what this test is about.
    let mut sent = 0u64;
    for burst in frames.chunks(250) {
        net.consumer_a.send_frames("eth0", burst.to_vec()).unwrap();
        sent += burst.len() as u64;
        // Every datagram reached the backend (whose replies the client's
        // kernel answers with a few rate-limited port unreachables, which
        // count as endpoint packets too).
        wait_for(
            "every datagram at the backend",
            Duration::from_secs(10),
            || Ok((udp_in()? >= backend_before + sent).then_some(())),
        )
        .unwrap();
    }
    assert_eq!(udp_in().unwrap() - backend_before, u64::from(FLOWS));
    let after = plink.scrape(&net.gw).unwrap();
    assert!(pkts(&after) - pkts(&before) >= u64::from(FLOWS));
    let dropped: u64 = after
        .lines()
        .filter(|l| l.starts_with("plink_drops_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(dropped, 0, "nothing dropped:\n{after}");
    // Every flow's start record was exported or counted as lost.
    let (exported, lost) = wait_for(
        "every start record exported or counted lost",
        Duration::from_secs(10),
        || {
            let s = plink.scrape(&net.gw)?;
            let lost = Gateway::sample(&s, "plink_flow_log_lost_total{where=\"ring\"}");
            let starts = read_json_lines(&json)
                .iter()
                .filter(|r| r["event"] == "start")
                .count() as u64;
            Ok((starts + lost >= u64::from(FLOWS)).then_some((starts, lost)))
        },
    )
    .unwrap();
    eprintln!("flood of {FLOWS} flows: {exported} start records exported, {lost} lost");
    assert!(
        lost > 0,
        "a 4 KiB ring cannot take a burst of {FLOWS} records"
    );
    assert!(exported > 0, "the ring's records were exported");
    assert_eq!(exported + lost, u64::from(FLOWS));
}
