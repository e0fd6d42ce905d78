//! Conntrack: a full table refuses new flows only, an entry reused under
//! another flow's key is never trusted, and a flow opens only when its
//! first packet leaves.

use super::*;

#[test]
fn golden_conntrack_full_refuses_new_flows() {
    let gw = gateway();
    golden_sized(&gw, spec(&gw), 4, |b, n, _| {
        let q = |port| {
            Ipv4Packet::udp((CLIENT, port), (EP_UDP, 53), b"q")
                .macs(CLIENT_MAC, n.c1_mac)
                .build()
        };
        let fwd =
            |name: String, port| consumer(name, n.c1, q(port), Want::Verdict(verdict::REDIRECT));
        let mut steps: Vec<Step> = (1..=4)
            .map(|port| fwd(format!("flow {port} fits"), port).deltas(opens(1)))
            .collect();
        steps.push(
            consumer(
                "conntrack full",
                n.c1,
                q(5),
                Want::Drop(DropReason::ConntrackFull),
            )
            .deltas([(Counter::Flows, 0)]),
        );
        // Live flows are untouched by the refusal.
        steps.extend((1..=4).map(|port| fwd(format!("flow {port} still forwarded"), port)));
        steps.extend([
            Step::count(Counter::Flows, 4),
            Step::Expect(Expect::NatPorts(NAT_UDP, Some(4))),
        ]);
        b.run(steps);
    });
}

/// The state a freed and reused flow entry leaves behind: the entry found
/// under one flow's key holds another flow's values (a preallocated hash
/// element deleted by the GC and reused at once by another CPU's insert, seen
/// through the pointer a program still holds). The datapath must not
/// rewrite the packet with the other flow's mapping. The state is written
/// from userspace here, since the race itself cannot be timed on demand.
#[test]
fn golden_a_reused_flow_entry_never_rewrites_another_flows_packet() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| {
        let ep = (EP_UDP, 53);
        let q = |port| {
            Ipv4Packet::udp((CLIENT, port), ep, b"q")
                .macs(CLIENT_MAC, n.c1_mac)
                .build()
        };
        let redirect = Want::Verdict(verdict::REDIRECT);
        b.run(vec![
            consumer(
                "flow from 5000",
                n.c1,
                q(5000),
                Want::Verdict(verdict::REDIRECT),
            ),
            consumer(
                "flow from 5001",
                n.c1,
                q(5001),
                Want::Verdict(verdict::REDIRECT),
            ),
            Step::act(
                "flow a's entry now holds the other flow's values",
                move |b| {
                    let mut ct = ct_fwd(b);
                    let a = fwd_key(1, (CLIENT, 5000), ep, IPPROTO_UDP);
                    let other = fwd_key(1, (CLIENT, 5001), ep, IPPROTO_UDP);
                    let other_value = ct.get(&other, 0).unwrap();
                    assert_eq!(
                        other_value.key_hash,
                        flow_hash(&other),
                        "entries carry their key's hash"
                    );
                    ct.insert(a, other_value, 0).unwrap();
                },
            ),
            consumer(
                "a packet whose entry was reused by another flow",
                n.c1,
                q(5000),
                Want::Drop(DropReason::CtBroken),
            ),
            consumer("the other flow is unharmed", n.c1, q(5001), redirect),
        ]);
    });
}

/// The CT_FWD map the consumer program uses, through its own descriptor.
fn ct_fwd(
    b: &mut Bench,
) -> aya::maps::HashMap<aya::maps::MapData, CtFwdKey, plink_common::CtFwdValue> {
    let prog_maps =
        b.dp.program(prog_names::CONSUMER)
            .unwrap()
            .info()
            .unwrap()
            .map_ids()
            .unwrap()
            .unwrap();
    let map_id = prog_maps
        .into_iter()
        .find(|id| {
            aya::maps::MapInfo::from_id(*id)
                .ok()
                .and_then(|i| i.name_as_str().map(|n| n == "CT_FWD"))
                .unwrap_or(false)
        })
        .expect("plink_consumer uses CT_FWD");
    let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_id(map_id).unwrap()).unwrap();
    aya::maps::HashMap::try_from(map).unwrap()
}

/// A packet that cannot leave opens no flow: no conntrack entry, no NAT
/// port, no cap slot and no connection counted, whatever the FIB said
/// (no neighbour, no route, fragmentation needed).
#[test]
fn golden_a_flow_opens_only_when_its_packet_leaves() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "p0", "mtu", "1000"]).unwrap();
    let mut spec = spec(&gw);
    // Service 3: one backend outside every route of the gateway.
    spec.services.push(ServiceSpec {
        id: 3,
        nat: vec![NatSpec {
            addr: Ipv4Addr::new(198, 51, 100, 203).into(),
            ports: 1024..=65535,
            draining: false,
        }],
        lookup: vec![4],
        mss_clamp: plink_common::MSS_CLAMP_OFF,
        flow_log_sample: 0,
    });
    spec.backends.push(BackendSpec {
        id: 4,
        service_id: 3,
        addr: Ipv4Addr::new(198, 18, 0, 1).into(),
        state: BackendState::Active,
    });
    spec.endpoints.push(EndpointSpec {
        max_flows: 1,
        ..tcp_endpoint(9, 1, EP_NOROUTE, 3)
    });
    for e in spec.endpoints.iter_mut().filter(|e| e.id == 6 || e.id == 1) {
        // One flow at most: a slot held by a dropped packet would refuse the next.
        e.max_flows = 1;
    }
    golden(&gw, spec, |b, n, _| b.run(opens_only_when_it_leaves(n)));
}

const EP_NOROUTE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 63);

fn opens_only_when_it_leaves(n: Ifs) -> Vec<Step> {
    let nothing_held = |name: &str| {
        let name = name.to_string();
        Step::expect("nothing held", move |b| {
            assert!(
                b.dp.list_conntrack().unwrap().is_empty(),
                "{name}: no flow kept"
            );
            assert!(
                b.dp.nat_ports_in_use().unwrap().values().all(|n| *n == 0),
                "{name}: no NAT port held"
            );
        })
    };
    let client = (CLIENT, 5000);
    let syn = |ep| {
        Ipv4Packet::tcp(client, (ep, 80), TCP_SYN)
            .macs(CLIENT_MAC, n.c1_mac)
            .build()
    };
    let big = Ipv4Packet::udp(client, (EP_UDP, 53), &[7; 973])
        .macs(CLIENT_MAC, n.c1_mac)
        .build();
    let mut steps = Vec::new();
    for attempt in ["first", "second (the cap slot was not kept)"] {
        steps.extend([
            consumer(
                format!("{attempt} SYN to an unresolved backend"),
                n.c1,
                syn(EP_NONEIGH),
                Want::Drop(DropReason::FibNoNeigh),
            ),
            nothing_held("no neighbour"),
            consumer(
                format!("{attempt} SYN to an unrouted backend"),
                n.c1,
                syn(EP_NOROUTE),
                Want::Drop(DropReason::FibFailed),
            ),
            nothing_held("no route"),
            consumer(
                format!("{attempt} datagram too big for the provider MTU"),
                n.c1,
                &big,
                Want::Tx(error_reply(
                    &big,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1000,
                    n.c1_mac,
                )),
            ),
            nothing_held("fragmentation needed"),
        ]);
    }
    // No connection counted on endpoints 1, 6 and 9.
    for id in [1, 6, 9] {
        steps.push(Step::count(Counter::Endpoint(id, Field::FlowsCreated), 0));
    }
    // The same datagram that fits opens the flow (and the cap allows it).
    let key = fwd_key(1, client, (EP_UDP, 53), IPPROTO_UDP);
    let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
    let fits = Ipv4Packet::udp(client, (EP_UDP, 53), &[7; 972]).macs(CLIENT_MAC, n.c1_mac);
    steps.extend([
        consumer(
            "a datagram that fits",
            n.c1,
            fits.build(),
            Want::Redirect(translated(
                &fits,
                n.p0_mac,
                (BACKEND10, 5353, BACKEND10_MAC),
                nat,
            )),
        ),
        Step::count(Counter::Flows, 1),
        Step::count(Counter::Endpoint(1, Field::FlowsCreated), 1),
    ]);
    steps
}

/// The GC judges a table of several batches (BPF_MAP_LOOKUP_BATCH reads
/// 4,096 entries a call): every expired flow goes, every live one stays, and
/// the batch walk sees each entry exactly once.
#[test]
fn golden_gc_walks_a_table_of_many_batches() {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let gw = gateway();
    golden_sized(&gw, spec(&gw), 16384, |b, _, _| {
        let now = plink_ctl::dataplane::conntrack::monotonic_ns();
        let (live, expired) = (6000u16, 5000u16);
        let mut ct = ct_fwd(b);
        for i in 0..live + expired {
            let k = fwd_key(1, (CLIENT, 10000 + i), (EP_UDP, 53), IPPROTO_UDP);
            let v = plink_common::CtFwdValue {
                endpoint_id: 1,
                // Expired flows were last seen at boot.
                last_seen_ns: if i < live { now } else { 1 },
                key_hash: flow_hash(&k),
                ..Default::default()
            };
            ct.insert(k, v, 0).unwrap();
        }
        let fd = aya::maps::IterableMap::map(&ct).fd().as_fd().as_raw_fd();
        let mut seen = std::collections::BTreeSet::new();
        let batched =
            plink_ctl::dataplane::batch::walk(fd, |k: &CtFwdKey, _: &plink_common::CtFwdValue| {
                assert!(seen.insert(*k), "an entry seen twice: {k:?}");
            })
            .unwrap();
        assert!(batched, "this kernel has batch lookups (5.6+)");
        assert_eq!(seen.len(), usize::from(live + expired), "entries walked");
        let r = b.dp.gc_conntrack().unwrap();
        assert_eq!(
            (r.flows, r.remaining),
            (u64::from(expired), u64::from(live)),
            "flows removed and left"
        );
        assert_eq!(b.dp.list_conntrack().unwrap().len(), usize::from(live));
    });
}

/// A table larger than one GC round's share (32 batches of 4,096) is swept
/// over several rounds, each going on where the last stopped: the first
/// round removes some of the expired flows, the next ones the rest, and
/// the flow count is published once a sweep is complete.
#[test]
fn golden_gc_sweeps_a_large_table_over_rounds() {
    let gw = gateway();
    golden_sized(&gw, spec(&gw), 262_144, |b, _, _| {
        let now = plink_ctl::dataplane::conntrack::monotonic_ns();
        let total: u32 = 150_000;
        let mut ct = ct_fwd(b);
        let mut expired = 0u64;
        for i in 0..total {
            // Clients 192.0.2.x, ports spread: 150k distinct keys.
            let client = Ipv4Addr::new(192, 0, 2, (i / 60_000) as u8 + 1);
            let k = fwd_key(
                1,
                (client, 1024 + (i % 60_000) as u16),
                (EP_UDP, 53),
                IPPROTO_UDP,
            );
            let old = i % 3 == 0;
            expired += u64::from(old);
            let v = plink_common::CtFwdValue {
                endpoint_id: 1,
                last_seen_ns: if old { 1 } else { now },
                key_hash: flow_hash(&k),
                ..Default::default()
            };
            ct.insert(k, v, 0).unwrap();
        }
        let live = u64::from(total) - expired;
        let first = b.dp.gc_conntrack().unwrap();
        assert!(
            first.flows > 0 && first.flows < expired,
            "one round removes part of the expired flows: {} of {expired}",
            first.flows
        );
        assert_eq!(first.remaining, 0, "no sweep is complete after one round");
        let mut removed = first.flows;
        let mut rounds = 1;
        let last = loop {
            let r = b.dp.gc_conntrack().unwrap();
            removed += r.flows;
            rounds += 1;
            if r.remaining > 0 || rounds > 10 {
                break r;
            }
        };
        assert_eq!(removed, expired, "every expired flow removed once");
        assert_eq!(last.remaining, live, "the complete sweep's count");
        assert_eq!(
            last.nat_in_use.values().sum::<u64>(),
            live,
            "one NAT port per live flow"
        );
        assert_eq!(b.dp.list_conntrack().unwrap().len() as u64, live);
    });
}
