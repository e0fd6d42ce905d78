//! Reloads: a new spec keeps established flows on their backend and NAT
//! port while new flows follow the new table; a no-op apply changes nothing.

use super::*;

/// XDP_REDIRECT to backend `addr` (the rest of the frame is another case's).
fn to_backend_addr(addr: Ipv4Addr) -> Want {
    Want::RedirectWith(Box::new(move |_, out| {
        assert_eq!(
            Ipv4Addr::new(out[30], out[31], out[32], out[33]),
            addr,
            "backend"
        );
    }))
}

#[test]
fn golden_reload_keeps_established_flows() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, spec| {
        let TcpFlow {
            ep,
            backend,
            backend_mac,
            nat,
            syn,
            ack,
            ..
        } = tcp_flow(&n, 40000);
        let to_backend =
            |p: &Ipv4Packet| translated(p, n.p0_mac, (backend, 8080, backend_mac), nat);
        let new_syn = |port| {
            Ipv4Packet::tcp((CLIENT, port), ep, TCP_SYN)
                .macs(CLIENT_MAC, n.c1_mac)
                .build()
        };
        // Reload: service 0's table changes size (a new region) and names
        // only the other backend; endpoint 1 disappears.
        let other = if backend == BACKEND10 { 1 } else { 0 };
        let other_addr = if other == 1 { BACKEND11 } else { BACKEND10 };
        // Same table size first: rewritten in place, slot by slot.
        let mut same_size = spec.clone();
        same_size.services[0].lookup = vec![other; 7];
        let mut next = spec.clone();
        next.services[0].lookup = vec![other; 11];
        next.endpoints.retain(|e| e.id != 1);
        let mut steps = vec![
            consumer(
                "flow before reload",
                n.c1,
                syn.build(),
                Want::Redirect(to_backend(&syn)),
            ),
            Step::Apply(same_size),
        ];
        for port in 41000..41004 {
            steps.push(consumer(
                format!("in-place table: new flow from {port}"),
                n.c1,
                new_syn(port),
                to_backend_addr(other_addr),
            ));
        }
        let q = Ipv4Packet::udp((CLIENT, 5000), (EP_UDP, 53), b"q").macs(CLIENT_MAC, n.c1_mac);
        steps.extend([
            Step::Apply(next.clone()),
            consumer(
                "established flow keeps its backend and NAT port",
                n.c1,
                ack.build(),
                Want::Redirect(to_backend(&ack)),
            ),
            consumer(
                "a new flow follows the new table",
                n.c1,
                new_syn(40100),
                to_backend_addr(other_addr),
            ),
            consumer(
                "removed endpoint is gone",
                n.c1,
                q.build(),
                Want::Drop(DropReason::NoEndpoint),
            ),
            // Applying the same spec twice writes nothing and changes nothing.
            Step::Apply(next),
            consumer(
                "still forwarded after a no-op apply",
                n.c1,
                ack.build(),
                Want::Redirect(to_backend(&ack)),
            ),
        ]);
        b.run(steps);
    });
}
