//! Flow logs: a logged flow's first packet writes its start record into the
//! ring (every field), later packets write none and count in the flow's own
//! counters each way; a flow of a service without flow logs writes nothing
//! and keeps its counters at zero.

use super::*;
use plink_common::{FlowLogRecord, flow_flags, flow_log_kind, v4};

fn records(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<FlowLogRecord> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), std::mem::size_of::<FlowLogRecord>());
        // SAFETY: the datapath writes whole records; read unaligned.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowLogRecord>()) });
    }
    out
}

#[test]
fn golden_a_logged_flow_writes_its_start_record_and_counts_its_packets() {
    let gw = gateway();
    let mut spec = spec(&gw);
    // The UDP service logs every flow; the TCP service none.
    spec.services[1].flow_log_sample = 1;
    golden(&gw, spec, |b, n, _| {
        let mut ring = b.dp.take_flow_log_ring().unwrap();
        let client = (CLIENT, 5000);
        let ep = (EP_UDP, 53);
        let key = fwd_key(1, client, ep, IPPROTO_UDP);
        let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
        let q = Ipv4Packet::udp(client, ep, b"query").macs(CLIENT_MAC, n.c1_mac);
        let r = Ipv4Packet::udp((BACKEND10, 5353), nat, b"answer!").macs(BACKEND10_MAC, n.p0_mac);
        let (q_len, r_len) = (q.build().len() as u64 - 14, r.build().len() as u64 - 14);
        let redirect = verdict::REDIRECT;

        assert_eq!(
            b.raw(prog_names::CONSUMER, n.c1, &q.build()).verdict,
            redirect
        );
        let got = records(&mut ring);
        assert_eq!(got.len(), 1, "one start record: {got:?}");
        let s = got[0];
        let flow = b.dp.flow(&key).unwrap().expect("the flow");
        assert_eq!(
            s,
            FlowLogRecord {
                kind: flow_log_kind::START,
                proto: IPPROTO_UDP,
                reason: 0,
                tcp_state: 0,
                network_id: 1,
                client_addr_be: v4(CLIENT.octets()),
                endpoint_addr_be: v4(EP_UDP.octets()),
                nat_addr_be: v4(NAT_UDP.octets()),
                backend_addr_be: v4(BACKEND10.octets()),
                client_port_be: 5000u16.to_be(),
                endpoint_port_be: 53u16.to_be(),
                nat_port_be: nat.1.to_be(),
                backend_port_be: 5353u16.to_be(),
                endpoint_id: 1,
                service_id: 1,
                time_ns: flow.last_seen_ns,
                last_seen_ns: flow.last_seen_ns,
                // Written before the first packet is counted.
                packets_in: 0,
                bytes_in: 0,
                packets_out: 0,
                bytes_out: 0,
            }
        );
        assert_eq!(flow.flags & flow_flags::LOGGED, flow_flags::LOGGED);

        // The established path: no record, the flow's own counters.
        assert_eq!(
            b.raw(prog_names::CONSUMER, n.c1, &q.build()).verdict,
            redirect
        );
        assert_eq!(
            b.raw(prog_names::PROVIDER, n.p0, &r.build()).verdict,
            redirect
        );
        assert!(records(&mut ring).is_empty(), "no record per packet");
        let flow = b.dp.flow(&key).unwrap().expect("the flow");
        assert_eq!(
            (flow.log_packets_in, flow.log_bytes_in),
            (2, 2 * q_len),
            "both packets in"
        );
        assert_eq!((flow.log_packets_out, flow.log_bytes_out), (1, r_len));

        // A flow of a service without flow logs: nothing.
        let tcp = |port, flags| {
            Ipv4Packet::tcp((CLIENT, port), (EP_TCP, 80), flags)
                .macs(CLIENT_MAC, n.c1_mac)
                .build()
        };
        assert_eq!(
            b.raw(prog_names::CONSUMER, n.c1, &tcp(40000, TCP_SYN))
                .verdict,
            redirect
        );
        assert_eq!(
            b.raw(prog_names::CONSUMER, n.c1, &tcp(40000, TCP_ACK))
                .verdict,
            redirect
        );
        assert!(records(&mut ring).is_empty(), "a service without flow logs");
        let tcp_key = fwd_key(1, (CLIENT, 40000), (EP_TCP, 80), IPPROTO_TCP);
        let flow = b.dp.flow(&tcp_key).unwrap().expect("the TCP flow");
        assert_eq!(flow.flags & flow_flags::LOGGED, 0);
        assert_eq!(
            (flow.log_packets_in, flow.log_bytes_in, flow.log_packets_out),
            (0, 0, 0)
        );
    });
}
