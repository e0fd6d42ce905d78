//! What the parser refuses (fragments, options, other protocols and
//! ethertypes, every truncation) and the forward path's own refusals (TTL,
//! no neighbour).

use super::*;

#[test]
fn golden_malformed_and_unsupported_frames() {
    let gw = gateway();
    golden(&gw, spec(&gw), |b, n, _| {
        let syn = |dst: Ipv4Addr| {
            Ipv4Packet::tcp((CLIENT, 40000), (dst, 80), TCP_SYN).macs(CLIENT_MAC, n.c1_mac)
        };
        let good = syn(EP_TCP).build();
        let edit = |f: fn(&mut Vec<u8>)| {
            let mut frame = good.clone();
            f(&mut frame);
            frame
        };
        let refused = |name: &str, frame: Vec<u8>, reason| {
            consumer(name, n.c1, frame, Want::Drop(reason)).deltas([(Counter::Flows, 0)])
        };
        let mut ttl1 = syn(EP_TCP);
        ttl1.ttl = 1;
        let ttl1 = ttl1.build();
        let mut steps = vec![
            refused(
                "fragment",
                edit(|f| {
                    f[20] |= 0x20; // more fragments
                    fix_checksums(f);
                }),
                DropReason::Fragment,
            ),
            refused(
                "non-first fragment",
                edit(|f| {
                    f[21] = 8; // offset
                    fix_checksums(f);
                }),
                DropReason::Fragment,
            ),
            refused("ip options", edit(|f| f[14] = 0x46), DropReason::IpOptions),
            refused("gre", edit(|f| f[23] = 47), DropReason::UnsupportedProtocol),
            // The IPv6 program parses it: version 4 is no IPv6 header.
            refused(
                "ipv4 bytes under the ipv6 ethertype",
                edit(|f| f[12..14].copy_from_slice(&[0x86, 0xdd])),
                DropReason::Malformed,
            ),
            refused(
                "vlan",
                edit(|f| f[12..14].copy_from_slice(&[0x81, 0x00])),
                DropReason::UnsupportedEthertype,
            ),
            consumer(
                "ttl 1: time exceeded back to the sender",
                n.c1,
                &ttl1,
                Want::Tx(error_reply(&ttl1, ICMP_TIME_EXCEEDED, 0, 0, n.c1_mac)),
            ),
            refused(
                "no neighbour for the backend",
                syn(EP_NONEIGH).build(),
                DropReason::FibNoNeigh,
            ),
        ];

        // Every truncation of a valid packet (with payload) is dropped as
        // malformed on the consumer side and creates no flow.
        let mut p =
            Ipv4Packet::tcp((CLIENT, 41000), (EP_TCP, 80), TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
        p.payload = b"0123456789".to_vec();
        let full = p.build();
        let short = full.clone();
        steps.push(Step::expect("no frame shorter than Ethernet", move |b| {
            for n_bytes in 0..14 {
                // The kernel never hands XDP a frame shorter than Ethernet.
                assert!(
                    golden::run(
                        b.dp.program(prog_names::CONSUMER).unwrap(),
                        n.c1,
                        &short[..n_bytes]
                    )
                    .is_err()
                );
            }
        }));
        for len in 14..full.len() {
            steps.push(refused(
                &format!("truncated to {len} bytes"),
                full[..len].to_vec(),
                DropReason::Malformed,
            ));
        }
        steps.push(Step::expect("no flow from a truncated frame", |b| {
            assert!(
                b.dp.list_conntrack()
                    .unwrap()
                    .iter()
                    .all(|f| f.client.1 != 41000)
            );
        }));
        // Provider side: a truncated reply to a NAT address is dropped once
        // its destination is readable, passed before.
        let r = Ipv4Packet::tcp((BACKEND10, 8080), (NAT_TCP, 3000), TCP_ACK)
            .macs(BACKEND10_MAC, n.p0_mac)
            .build();
        for len in 14..r.len() {
            let want = if len < 34 {
                Want::Pass
            } else {
                Want::Drop(DropReason::Malformed)
            };
            steps.push(provider(
                format!("provider truncated to {len}"),
                n.p0,
                &r[..len],
                want,
            ));
        }
        b.run(steps);
    });
}
