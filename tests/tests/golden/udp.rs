//! UDP: a flow both ways, the checksum's special values, NAT ports handed
//! out once each until they run out, and expiry freeing them.

use std::{cell::RefCell, collections::BTreeSet, rc::Rc};

use super::*;

#[test]
fn golden_udp_and_checksums() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, spec| b.run(udp_flow(n, &spec)));
}

fn udp_flow(n: Ifs, spec: &DataplaneSpec) -> Vec<Step> {
    let client = (CLIENT, 5000);
    let ep = (EP_UDP, 53);
    let key = fwd_key(1, client, ep, IPPROTO_UDP);
    let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
    let to_backend =
        |p: &Ipv4Packet| translated(p, n.p0_mac, (BACKEND10, 5353, BACKEND10_MAC), nat);
    let q = Ipv4Packet::udp(client, ep, b"query").macs(CLIENT_MAC, n.c1_mac);
    let r = Ipv4Packet::udp((BACKEND10, 5353), nat, b"answer!").macs(BACKEND10_MAC, n.p0_mac);
    let mut back = r.clone().macs(n.c1_mac, CLIENT_MAC);
    back.src = EP_UDP;
    back.sport = 53;
    back.dst = CLIENT;
    back.dport = 5000;
    back.ttl -= 1;

    // Checksum 0 ("none") stays 0.
    let mut zero = q.build();
    zero[40..42].copy_from_slice(&[0, 0]);
    let mut zero_out = to_backend(&q);
    zero_out[40..42].copy_from_slice(&[0, 0]);

    // A payload word chosen so that the translated checksum computes to 0:
    // it must leave as 0xffff. The word completes the sum of the translated
    // packet (zero payload, checksum field zeroed) to 0xffff.
    let mut probe = q.clone();
    probe.payload = vec![0, 0];
    let mut zeroed = to_backend(&probe);
    zeroed[40..42].copy_from_slice(&[0, 0]);
    let tot = zeroed.len();
    let s = plink_tests::packet::fold(
        plink_tests::packet::sum16(&zeroed[26..34])
            + IPPROTO_UDP as u32
            + (tot - 34) as u32
            + plink_tests::packet::sum16(&zeroed[34..]),
    );
    probe.payload = (!s).to_be_bytes().to_vec();
    let ffff_in = probe.build();
    let ffff_out = to_backend(&probe);
    assert_eq!(
        ffff_out[40..42],
        [0xff, 0xff],
        "the case really computes to zero"
    );
    assert_ne!(ffff_in[40..42], [0, 0]);

    let mut steps = vec![
        consumer(
            "udp new flow",
            n.c1,
            q.build(),
            Want::Redirect(to_backend(&q)),
        )
        .deltas(opens(1))
        .deltas([(Counter::NatPorts(NAT_UDP), 1)]),
        provider("udp reply", n.p0, r.build(), Want::Redirect(back.build())),
        consumer("udp checksum 0 stays 0", n.c1, zero, exactly(zero_out)),
        consumer(
            "udp checksum that becomes 0 leaves as 0xffff",
            n.c1,
            ffff_in,
            Want::Redirect(ffff_out),
        ),
    ];

    // Ten NAT ports, ten flows: all distinct; the eleventh is refused.
    let seen = Rc::new(RefCell::new(BTreeSet::from([nat.1])));
    for port in 5001..5010u16 {
        let p = Ipv4Packet::udp((CLIENT, port), ep, b"q").macs(CLIENT_MAC, n.c1_mac);
        let seen = seen.clone();
        steps.push(
            consumer(
                format!("flow from port {port}"),
                n.c1,
                p.build(),
                Want::RedirectWith(Box::new(move |_, out| {
                    assert!(ip_checksum_ok(out) && l4_checksum_ok(out));
                    let nat_port = u16::from_be_bytes([out[34], out[35]]);
                    assert!(UDP_PORTS.contains(&nat_port));
                    assert!(
                        seen.borrow_mut().insert(nat_port),
                        "NAT port {nat_port} handed out twice"
                    );
                })),
            )
            .deltas(opens(1)),
        );
    }
    let mut short = spec.clone();
    short.timeouts.udp = Duration::from_secs(1);
    let mut shorter = spec.clone();
    shorter.timeouts.udp = Duration::from_millis(50);
    steps.extend([
        consumer(
            "nat ports exhausted",
            n.c1,
            Ipv4Packet::udp((CLIENT, 6000), ep, b"q")
                .macs(CLIENT_MAC, n.c1_mac)
                .build(),
            Want::Drop(DropReason::NatPortsExhausted),
        )
        .deltas([
            (Counter::Service(1, Field::NatAllocFailures), 1),
            (Counter::Flows, 0),
        ]),
        Step::count(Counter::Service(1, Field::NatAllocFailures), 1),
        Step::Expect(Expect::NatPorts(NAT_UDP, Some(10))),
        // Expiry: with a short UDP timeout the GC frees flows and ports (the
        // datapath refuses replies to them first).
        Step::Apply(short),
        // Nothing expires before its timeout.
        Step::Gc(0),
        Step::Apply(shorter),
        // The datapath applies the rule itself before any GC ran.
        Step::wait_for("UDP flows to pass their timeout", |b| {
            Ok(b.dp
                .list_conntrack()?
                .iter()
                .all(|f| f.expires_in.is_zero()))
        }),
        provider(
            "reply to an expired flow (before GC)",
            n.p0,
            r.build(),
            Want::Drop(DropReason::ReplyNoFlow),
        ),
        Step::wait_for("UDP flows to expire", |b| {
            Ok(b.dp.gc_conntrack()?.remaining == 0)
        }),
        // Ports freed.
        Step::Expect(Expect::NatPorts(NAT_UDP, None)),
        provider(
            "reply after expiry",
            n.p0,
            r.build(),
            Want::Drop(DropReason::ReplyNoFlow),
        ),
        Step::Apply(spec.clone()),
        consumer(
            "a freed port is handed out again",
            n.c1,
            q.build(),
            Want::Redirect(to_backend(&q)),
        )
        .deltas(opens(1)),
    ]);
    steps
}
