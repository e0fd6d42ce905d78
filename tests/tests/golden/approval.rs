//! An endpoint's approval: pending drops, approved forwards, rejected cuts
//! its flows (by the controller's purge, or in the datapath itself before
//! any purge), and a re-pointed endpoint's flows are no flows.

use super::*;

fn with_endpoint0(spec: &DataplaneSpec, f: impl Fn(&mut EndpointSpec)) -> DataplaneSpec {
    let mut spec = spec.clone();
    spec.endpoints.iter_mut().filter(|e| e.id == 0).for_each(f);
    spec
}

#[test]
fn golden_approval_cycle() {
    let gw = gateway();
    let pending = with_endpoint0(&spec(&gw), |e| e.state = EndpointState::Pending);
    golden(&gw, pending, |b, n, spec| {
        let TcpFlow {
            backend,
            backend_mac,
            nat,
            syn,
            ack,
            ..
        } = tcp_flow(&n, 40000);
        let to_backend =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (backend, 8080, backend_mac), nat);
        let reply = Ipv4Packet::tcp((backend, 8080), nat, TCP_ACK).macs(backend_mac, n.p0_mac);
        b.run(vec![
            consumer(
                "pending drops",
                n.c1,
                syn.build(),
                Want::Drop(DropReason::EndpointPending),
            )
            .deltas([ep_drop(0, DropReason::EndpointPending), (Counter::Flows, 0)]),
            Step::Apply(with_endpoint0(&spec, |e| e.state = EndpointState::Approved)),
            consumer(
                "approved passes",
                n.c1,
                syn.build(),
                Want::Redirect(to_backend(&syn)),
            )
            .deltas(opens(0)),
            consumer(
                "established",
                n.c1,
                ack.build(),
                Want::Redirect(to_backend(&ack)),
            ),
            // Reject: the state first (no new flow can appear), then the purge.
            Step::Apply(with_endpoint0(&spec, |e| e.state = EndpointState::Rejected)),
            Step::Purge(0, 1, None),
            Step::count(Counter::Flows, 0),
            Step::Expect(Expect::NatPorts(NAT_TCP, None)),
            consumer(
                "rejected cuts the established flow",
                n.c1,
                ack.build(),
                Want::Drop(DropReason::EndpointRejected),
            )
            .deltas([ep_drop(0, DropReason::EndpointRejected)]),
            provider(
                "its replies no longer reach the consumer",
                n.p0,
                reply.build(),
                Want::Drop(DropReason::ReplyNoFlow),
            ),
            Step::count(Counter::EndpointDrops(0, DropReason::EndpointPending), 1),
            Step::count(Counter::EndpointDrops(0, DropReason::EndpointRejected), 1),
        ]);
    });
}

/// The established fast path: one flow lookup answers, validated by the
/// endpoint's generation and the provider side's hop generation. A changed
/// neighbour is followed once the hop generation moves (the controller moves
/// it on neighbour, route and link events and on every apply); an endpoint
/// re-pointed or rejected cuts its flows in the datapath itself, before (and
/// without) the controller's purge.
#[test]
fn golden_established_flows_follow_changes_without_a_purge() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, spec| {
        let TcpFlow {
            backend,
            backend_mac,
            nat,
            syn,
            ack,
            ..
        } = tcp_flow(&n, 41000);
        let to = |p: &Ipv4Packet, mac| translated(p, n.p0_mac, (backend, 8080, mac), nat);
        let moved: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x77];
        let reply = Ipv4Packet::tcp((backend, 8080), nat, TCP_ACK).macs(moved, n.p0_mac);
        let not_approved = || Want::Drop(DropReason::ReplyEndpointNotApproved);
        b.run(vec![
            consumer(
                "syn",
                n.c1,
                syn.build(),
                Want::Redirect(to(&syn, backend_mac)),
            ),
            consumer(
                "established",
                n.c1,
                ack.build(),
                Want::Redirect(to(&ack, backend_mac)),
            ),
            // The backend moves to another MAC: the cached hop serves until
            // the generation moves, then the new neighbour is used.
            Step::act("the backend's neighbour entry moves", move |_| {
                let status = std::process::Command::new("ip")
                    .args(["neigh", "replace", &backend.to_string(), "lladdr"])
                    .arg("02:00:00:00:01:77")
                    .args(["dev", "p0", "nud", "permanent"])
                    .status()
                    .unwrap();
                assert!(status.success(), "ip neigh replace");
            }),
            consumer(
                "cached next hop",
                n.c1,
                ack.build(),
                Want::Redirect(to(&ack, backend_mac)),
            ),
            // A GC round is no neighbour event: the cache stays (re-routing
            // every flow each round costs a FIB lookup and a write per flow).
            Step::Gc(0),
            consumer(
                "a GC round keeps the cached next hop",
                n.c1,
                ack.build(),
                Want::Redirect(to(&ack, backend_mac)),
            ),
            Step::act("the hop generation moves", |b| b.dp.bump_hop_gen().unwrap()),
            consumer(
                "next hop looked up again after the generation moved",
                n.c1,
                ack.build(),
                Want::Redirect(to(&ack, moved)),
            ),
            // Re-pointed to service 1 without a purge: the backend's replies
            // to the old mapping are dropped, and the flow is no flow.
            Step::Apply(with_endpoint0(&spec, |e| e.service_id = 1)),
            provider(
                "reply of a re-pointed endpoint's flow",
                n.p0,
                reply.build(),
                not_approved(),
            )
            .deltas([ep_drop(0, DropReason::ReplyEndpointNotApproved)]),
            consumer(
                "a re-pointed endpoint's flow is no flow",
                n.c1,
                ack.build(),
                Want::Drop(DropReason::TcpNoFlow),
            ),
            // The stale flow was removed by the datapath.
            Step::count(Counter::Flows, 0),
            Step::Expect(Expect::NatPorts(NAT_TCP, None)),
            // Back to service 0, a new flow, then rejected without a purge.
            Step::Apply(spec.clone()),
            consumer(
                "syn again",
                n.c1,
                syn.build(),
                Want::Redirect(to(&syn, moved)),
            )
            .deltas(opens(0)),
            Step::Apply(with_endpoint0(&spec, |e| e.state = EndpointState::Rejected)),
            provider(
                "reply of a rejected endpoint's flow",
                n.p0,
                reply.build(),
                not_approved(),
            )
            .deltas([ep_drop(0, DropReason::ReplyEndpointNotApproved)]),
            consumer(
                "a rejected endpoint's flow",
                n.c1,
                ack.build(),
                Want::Drop(DropReason::EndpointRejected),
            )
            .deltas([ep_drop(0, DropReason::EndpointRejected)]),
            Step::count(
                Counter::EndpointDrops(0, DropReason::ReplyEndpointNotApproved),
                2,
            ),
        ]);
    });
}
