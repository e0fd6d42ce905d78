//! Per-endpoint caps (max flows, new flows per second) and the NAT address
//! lifecycle: draining, retired, and a port held until its flow is gone.

use std::{cell::Cell, rc::Rc, time::Instant};

use super::*;

/// A SYN from `port` to the endpoint capped at one live flow.
fn capped(n: Ifs, port: u16) -> Vec<u8> {
    Ipv4Packet::tcp((CLIENT, port), (EP_CAPPED, 80), TCP_SYN)
        .macs(CLIENT_MAC, n.c1_mac)
        .build()
}

/// Caps: one live flow on endpoint 7; one new flow per second on 8.
#[test]
fn golden_caps() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| {
        let redirect = || Want::Verdict(verdict::REDIRECT);
        b.run(vec![
            consumer(
                "the capped endpoint's flow",
                n.c1,
                capped(n, 100),
                redirect(),
            )
            .deltas(opens(7)),
            consumer(
                "max flows cap",
                n.c1,
                capped(n, 101),
                Want::Drop(DropReason::CapMaxFlows),
            )
            .deltas([
                (Counter::Endpoint(7, Field::RefusedMaxFlows), 1),
                (Counter::Flows, 0),
            ]),
            consumer(
                "the live flow is untouched",
                n.c1,
                capped(n, 100),
                redirect(),
            ),
            Step::count(Counter::Endpoint(7, Field::RefusedMaxFlows), 1),
            // Three SYNs within microseconds cross at most one second
            // boundary: which of them is refused is not golden, the count is.
            Step::expect("rate cap", move |b| {
                let rated = |port| {
                    Ipv4Packet::tcp((CLIENT, port), (EP_RATED, 80), TCP_SYN)
                        .macs(CLIENT_MAC, n.c1_mac)
                        .build()
                };
                let verdicts: Vec<u32> = (200..203)
                    .map(|p| b.raw(prog_names::CONSUMER, n.c1, &rated(p)).verdict)
                    .collect();
                let refused = verdicts.iter().filter(|v| **v == verdict::DROP).count();
                assert!(refused >= 1, "rate cap refused none of {verdicts:?}");
                assert_eq!(
                    Counter::Endpoint(8, Field::RefusedRate).read(b),
                    refused as u64
                );
            }),
        ]);
    });
}

#[test]
fn golden_draining_nat_and_caps_after_gc() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, spec| {
        let client = (CLIENT, 5000);
        let ep = (EP_UDP, 53);
        let key = fwd_key(1, client, ep, IPPROTO_UDP);
        let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
        let q = Ipv4Packet::udp(client, ep, b"q").macs(CLIENT_MAC, n.c1_mac);
        let to_backend =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (BACKEND10, 5353, BACKEND10_MAC), nat);
        let r = Ipv4Packet::udp((BACKEND10, 5353), nat, b"a").macs(BACKEND10_MAC, n.p0_mac);
        let q2 = Ipv4Packet::udp((CLIENT, 5001), ep, b"q").macs(CLIENT_MAC, n.c1_mac);
        let mut draining = spec.clone();
        draining.services[1].nat[0].draining = true;
        let mut short = draining.clone();
        short.timeouts.tcp_transitory = Duration::from_millis(50);
        let redirect = || Want::Verdict(verdict::REDIRECT);
        b.run(vec![
            consumer(
                "before draining",
                n.c1,
                q.build(),
                Want::Redirect(to_backend(&q)),
            ),
            // Draining the NAT address: its flow and ARP stay, new flows do not start.
            Step::Apply(draining.clone()),
            consumer(
                "a draining address keeps its flow",
                n.c1,
                q.build(),
                Want::Redirect(to_backend(&q)),
            ),
            provider("and its replies", n.p0, r.build(), redirect()),
            provider(
                "and its ARP",
                n.p0,
                arp_request(BACKEND10_MAC, BACKEND10, NAT_UDP),
                Want::Tx(arp_reply(n.p0_mac, NAT_UDP, BACKEND10_MAC, BACKEND10)),
            ),
            consumer(
                "no new flow on a draining address",
                n.c1,
                q2.build(),
                Want::Drop(DropReason::NatPortsExhausted),
            )
            .deltas([(Counter::Flows, 0)]),
            // Max flows: the GC's frees make room again.
            consumer(
                "the capped endpoint's flow",
                n.c1,
                capped(n, 100),
                redirect(),
            ),
            consumer(
                "cap reached",
                n.c1,
                capped(n, 101),
                Want::Drop(DropReason::CapMaxFlows),
            ),
            Step::Apply(short),
            Step::wait_for("the capped flow to expire and be collected", |b| {
                b.dp.gc_conntrack()?;
                Ok(!b.dp.list_conntrack()?.iter().any(|f| f.endpoint_id == 7))
            }),
            Step::Apply(draining),
            consumer("room again after GC", n.c1, capped(n, 101), redirect()).deltas(opens(7)),
            consumer(
                "cap reached again",
                n.c1,
                capped(n, 102),
                Want::Drop(DropReason::CapMaxFlows),
            ),
        ]);
    });
}

/// Issue 14, item 6: a NAT address that drained and left its service is
/// retired: replies to it are dropped and counted, never passed to the
/// gateway's kernel, and ARP for it is no longer answered (passed on, as
/// for any address plink does not own).
#[test]
fn golden_a_retired_nat_address_drops_replies_and_is_not_announced() {
    let gw = gateway();
    let mut retired = spec(&gw);
    retired.services[1].nat[0].addr = Ipv4Addr::UNSPECIFIED.into();
    retired.services[1].nat[0].draining = true;
    retired.retired_nat.insert(
        NAT_UDP.into(),
        RetiredNat {
            service_id: retired.services[1].id,
            slot: 0,
        },
    );
    golden(&gw, retired, |b, n, retired| {
        let late = Ipv4Packet::udp((BACKEND10, 5353), (NAT_UDP, *UDP_PORTS.start()), b"a")
            .macs(BACKEND10_MAC, n.p0_mac)
            .build();
        let mut gone = retired.clone();
        gone.retired_nat.clear();
        b.run(vec![
            provider(
                "a late reply to a retired address",
                n.p0,
                &late,
                Want::Drop(DropReason::NatRetired),
            ),
            provider(
                "ARP for a retired address is not answered",
                n.p0,
                arp_request(BACKEND10_MAC, BACKEND10, NAT_UDP),
                Want::Pass,
            ),
            // Once its grace is over it is no address of plink's at all.
            Step::Apply(gone),
            provider(
                "after the grace: the gateway's own traffic",
                n.p0,
                &late,
                Want::Pass,
            ),
        ]);
    });
}

/// The NAT port of a forwarded frame.
fn nat_port_is(port: u16) -> Want {
    Want::RedirectWith(Box::new(move |_, out| {
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), port, "NAT port");
    }))
}

/// A TCP packet from `port` to the TCP endpoint.
fn tcp(n: Ifs, port: u16, flags: u8) -> Vec<u8> {
    Ipv4Packet::tcp((CLIENT, port), (EP_TCP, 80), flags)
        .macs(CLIENT_MAC, n.c1_mac)
        .build()
}

#[test]
fn golden_nat_port_is_not_reused_before_the_closing_timeout() {
    let gw = gateway();
    let mut spec = spec(&gw);
    // One NAT port: whoever holds it blocks every other flow.
    spec.services[0].nat[0].ports = 30000..=30000;
    golden(&gw, spec, |b, n, spec| {
        let mut short = spec.clone();
        short.timeouts.tcp_transitory = Duration::from_millis(50);
        b.run(vec![
            consumer(
                "the only port",
                n.c1,
                tcp(n, 40000, TCP_SYN),
                nat_port_is(30000),
            ),
            consumer(
                "its fin",
                n.c1,
                tcp(n, 40000, TCP_FIN | TCP_ACK),
                Want::Verdict(verdict::REDIRECT),
            ),
            Step::expect("closing", |b| {
                assert_eq!(
                    b.dp.list_conntrack().unwrap()[0].tcp_state,
                    tcp_state::CLOSING
                );
            }),
            // Closing, not expired: the port stays with its flow.
            Step::Gc(0),
            consumer(
                "port held by a closing flow",
                n.c1,
                tcp(n, 40001, TCP_SYN),
                Want::Drop(DropReason::NatPortsExhausted),
            ),
            // Once the closing timeout has passed and the GC collected the
            // flow, the port is handed out again.
            Step::Apply(short),
            Step::wait_for("the closing flow to be collected", |b| {
                Ok(b.dp.gc_conntrack()?.remaining == 0)
            }),
            Step::Apply(spec),
            consumer(
                "the port again",
                n.c1,
                tcp(n, 40001, TCP_SYN),
                nat_port_is(30000),
            ),
        ]);
    });
}

/// Without any GC (no controller), an expired flow's NAT port is reclaimed
/// by the datapath when a new flow needs it, and only once it has expired.
#[test]
fn golden_expired_flows_free_their_nat_port_without_a_controller() {
    let gw = gateway();
    let mut spec = spec(&gw);
    // One NAT port: whoever holds it blocks every other flow.
    spec.services[0].nat[0].ports = 30000..=30000;
    spec.timeouts.tcp_transitory = Duration::from_millis(200);
    golden(&gw, spec, |b, n, _| {
        let started = Rc::new(Cell::new(Instant::now()));
        let (s1, s2, s3) = (started.clone(), started.clone(), started);
        b.run(vec![
            Step::act("the clock starts", move |_| s1.set(Instant::now())),
            consumer(
                "the only port",
                n.c1,
                tcp(n, 40000, TCP_SYN),
                nat_port_is(30000),
            ),
            // Live: the port stays with its flow (only checkable while the
            // flow has surely not expired yet).
            Step::expect("a live flow keeps its port", move |b| {
                let refused = b.raw(prog_names::CONSUMER, n.c1, &tcp(n, 40001, TCP_SYN));
                if s2.get().elapsed() < Duration::from_millis(200) {
                    assert_eq!(refused.verdict, verdict::DROP, "a live flow keeps its port");
                }
            }),
            // Expired (SYN_SENT: the transitory timeout) and never collected:
            // the next new flow takes the port over.
            Step::wait_for("a new flow to reclaim the expired flow's port", move |b| {
                let run = b.raw(prog_names::CONSUMER, n.c1, &tcp(n, 40002, TCP_SYN));
                if run.verdict != verdict::REDIRECT {
                    return Ok(false);
                }
                assert_eq!(u16::from_be_bytes([run.output[34], run.output[35]]), 30000);
                assert!(s3.get().elapsed() >= Duration::from_millis(200));
                Ok(true)
            }),
            Step::expect("the expired flow is gone", |b| {
                let flows = b.dp.list_conntrack().unwrap();
                assert_eq!(flows.len(), 1, "the expired flow is gone: {flows:?}");
                assert_eq!(flows[0].client, (CLIENT.into(), 40002));
                assert_eq!(
                    b.dp.nat_ports_in_use().unwrap().values().sum::<u64>(),
                    1,
                    "one port entry, the new flow's"
                );
            }),
        ]);
    });
}

/// Without any GC (no controller), an endpoint at its max-flows cap gets its
/// slot back from an expired flow of its own: the datapath reclaims it from
/// the endpoint's ring of recent flows when the cap refuses. Short
/// connections keep being accepted, round after round, and a live flow
/// still holds the cap.
#[test]
fn golden_an_endpoint_at_its_cap_reclaims_its_expired_flows_without_a_controller() {
    let gw = gateway();
    let mut spec = spec(&gw);
    spec.timeouts.tcp_transitory = Duration::from_millis(200);
    golden(&gw, spec, |b, n, _| {
        let syn = move |port| capped(n, port);
        let mut steps = Vec::new();
        // EP_CAPPED allows one live flow.
        for round in 0..4u16 {
            let port = 42000 + round * 2;
            let started = Rc::new(Cell::new(Instant::now()));
            let (s1, s2) = (started.clone(), started);
            steps.extend([
                Step::act("the round's clock starts", move |_| s1.set(Instant::now())),
                // The first round's slot is free; later rounds' is held by
                // the previous round's expired flow until it is reclaimed.
                Step::wait_for(
                    "a new flow to get the cap slot of the expired one",
                    move |b| {
                        Ok(b.raw(prog_names::CONSUMER, n.c1, &syn(port)).verdict
                            == verdict::REDIRECT)
                    },
                ),
                // Only checkable while the new flow has surely not expired.
                Step::expect("a live flow holds the cap", move |b| {
                    let refused = b.raw(prog_names::CONSUMER, n.c1, &syn(port + 1));
                    if s2.get().elapsed() < Duration::from_millis(200) {
                        assert_eq!(refused.verdict, verdict::DROP, "a live flow holds the cap");
                    }
                }),
                Step::expect("one flow of the capped endpoint", move |b| {
                    let flows = b.dp.list_conntrack().unwrap();
                    assert_eq!(
                        flows.iter().filter(|f| f.endpoint_id == 7).count(),
                        1,
                        "round {round}: one flow of the capped endpoint: {flows:?}"
                    );
                }),
            ]);
        }
        steps.extend([
            Step::expect("the cap refused at least once", |b| {
                let drops = b.dp.endpoint_drop_counts(7).unwrap();
                assert!(drops[&DropReason::CapMaxFlows] >= 1, "{drops:?}");
            }),
            Step::count(Counter::Endpoint(7, Field::FlowsCreated), 4),
        ]);
        b.run(steps);
    });
}
