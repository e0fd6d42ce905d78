//! Path MTU in both directions (fragmentation needed, or a counted drop
//! without DF) and TCP MSS clamping.

use plink_common::{MSS_CLAMP_AUTO, MSS_CLAMP_OFF};

use super::*;

/// `frame` (Ethernet/IPv4/TCP without options) with TCP options `opts`
/// inserted after the 20-byte header, lengths and checksums fixed.
pub(super) fn with_tcp_options(frame: &[u8], opts: &[u8]) -> Vec<u8> {
    assert_eq!(opts.len() % 4, 0, "options fill whole words");
    let mut f = frame[..54].to_vec();
    f.extend_from_slice(opts);
    f.extend_from_slice(&frame[54..]);
    f[46] = (((20 + opts.len()) / 4) << 4) as u8;
    let tot_len = u16::from_be_bytes([f[16], f[17]]) + opts.len() as u16;
    f[16..18].copy_from_slice(&tot_len.to_be_bytes());
    fix_checksums(&mut f);
    f
}

/// Options as Linux sends them on a SYN: MSS first, then SACK permitted,
/// timestamps, NOP and window scale.
pub(super) fn linux_syn_options(mss: u16) -> Vec<u8> {
    let m = mss.to_be_bytes();
    vec![
        2, 4, m[0], m[1], 4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7,
    ]
}

/// The MSS option after a NOP: its value sits at an odd offset of the TCP
/// header and straddles two checksum words.
fn odd_mss_options(mss: u16) -> Vec<u8> {
    let m = mss.to_be_bytes();
    vec![1, 2, 4, m[0], m[1], 1, 1, 0]
}

/// Too big for the provider side's MTU: fragmentation needed (with the
/// MTU) back to the consumer for DF packets; a counted drop without DF.
#[test]
fn golden_frag_needed_on_the_forward_path() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "p0", "mtu", "1000"]).unwrap();
    golden(&gw, spec(&gw), |b, n, _| {
        let client = (CLIENT, 5000);
        let ep = (EP_UDP, 53);
        let key = fwd_key(1, client, ep, IPPROTO_UDP);
        let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
        let fits = Ipv4Packet::udp(client, ep, &[7; 972]).macs(CLIENT_MAC, n.c1_mac);
        let big = Ipv4Packet::udp(client, ep, &[7; 973])
            .macs(CLIENT_MAC, n.c1_mac)
            .build();
        let mut no_df = big.clone();
        no_df[20] = 0;
        fix_checksums(&mut no_df);
        b.run(vec![
            consumer(
                "1000 bytes fit",
                n.c1,
                fits.build(),
                Want::Redirect(translated(
                    &fits,
                    n.p0_mac,
                    (BACKEND10, 5353, BACKEND10_MAC),
                    nat,
                )),
            ),
            consumer(
                "1001 bytes with DF",
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
            consumer(
                "1001 bytes without DF",
                n.c1,
                no_df,
                Want::Drop(DropReason::FragNeeded),
            ),
        ]);
    });
}

/// A reply too big for the consumer interface: the backend gets
/// fragmentation needed with that interface's MTU, from the NAT address it
/// sent to, quoting its packet as sent (so its PMTUD works); the reply is
/// not forwarded. Without DF it is a counted drop.
#[test]
fn golden_frag_needed_on_the_reverse_path() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "c1", "mtu", "1000"]).unwrap();
    golden(&gw, spec(&gw), |b, n, _| {
        let redirect = || Want::Verdict(verdict::REDIRECT);
        let frag_needed = |frame: &[u8]| {
            Want::Tx(error_reply(
                frame,
                ICMP_DEST_UNREACH,
                ICMP_FRAG_NEEDED,
                1000,
                n.p0_mac,
            ))
        };
        let sent_back = |service, endpoint| {
            [
                (Counter::Service(service, Field::FragNeededToBackend), 1),
                (Counter::Endpoint(endpoint, Field::FragNeededToBackend), 1),
            ]
        };
        let client = (CLIENT, 5000);
        let ep = (EP_UDP, 53);
        let key = fwd_key(1, client, ep, IPPROTO_UDP);
        let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
        let q = Ipv4Packet::udp(client, ep, b"q").macs(CLIENT_MAC, n.c1_mac);
        let reply = |len| {
            Ipv4Packet::udp((BACKEND10, 5353), nat, &vec![7; len])
                .macs(BACKEND10_MAC, n.p0_mac)
                .build()
        };
        let too_big = reply(973);
        let mut no_df = too_big.clone();
        no_df[20] = 0;
        fix_checksums(&mut no_df);

        // TCP: a full-size data segment of an established flow.
        let tclient = (CLIENT, 40000);
        let tep = (EP_TCP, 80);
        let tkey = fwd_key(1, tclient, tep, IPPROTO_TCP);
        let (backend, backend_mac) = service0_backend(&tkey);
        let tnat = (NAT_TCP, first_port(&tkey, 1024..=65535));
        let syn = Ipv4Packet::tcp(tclient, tep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
        let mut seg = Ipv4Packet::tcp((backend, 8080), tnat, TCP_ACK).macs(backend_mac, n.p0_mac);
        seg.payload = vec![9; 1460];
        let seg = seg.build();
        b.run(vec![
            consumer("the UDP flow", n.c1, q.build(), redirect()),
            // 20 + 8 + 972 = 1000 bytes of IP: fits c1's MTU exactly.
            provider("a reply that fits", n.p0, reply(972), redirect()),
            provider(
                "UDP reply larger than the consumer interface's MTU, DF",
                n.p0,
                &too_big,
                frag_needed(&too_big),
            )
            .deltas(sent_back(1, 1)),
            Step::count(Counter::Service(1, Field::FragNeededToBackend), 1),
            Step::count(Counter::Endpoint(1, Field::FragNeededToBackend), 1),
            provider(
                "UDP reply larger than the MTU without DF",
                n.p0,
                no_df,
                Want::Drop(DropReason::FragNeeded),
            )
            .deltas([(Counter::Service(1, Field::FragNeededToBackend), 0)]),
            Step::count(Counter::Service(1, Field::FragNeededToBackend), 1),
            consumer("the TCP flow", n.c1, syn.build(), redirect()),
            provider(
                "TCP segment of 1500 bytes towards a 1000-byte consumer link",
                n.p0,
                &seg,
                frag_needed(&seg),
            )
            .deltas(sent_back(0, 0)),
            Step::count(Counter::Service(0, Field::FragNeededToBackend), 1),
        ]);
    });
}

/// A SYN from `port` with `opts`, and what the provider sees of it with
/// `out_opts`; and the flow's (backend, backend MAC, NAT mapping).
type Syn = (Vec<u8>, Vec<u8>, (Ipv4Addr, [u8; 6], (Ipv4Addr, u16)));

/// `mss_clamp`: a SYN's or SYN-ACK's MSS above the clamp is lowered to it
/// (wherever the option sits), one at or below it is left alone, checksums
/// stay exactly as (in)valid as they came; `auto` takes the smaller MTU of
/// the two interfaces minus 40; off changes nothing.
#[test]
fn golden_mss_clamp_on_syn_and_syn_ack() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "c1", "mtu", "1400"]).unwrap();
    let mut spec = spec(&gw);
    spec.services[0].mss_clamp = 1200;
    golden(&gw, spec, |b, n, spec| {
        let syn = |port: u16, opts: &[u8], out_opts: &[u8]| -> Syn {
            let client = (CLIENT, port);
            let ep = (EP_TCP, 80);
            let key = fwd_key(1, client, ep, IPPROTO_TCP);
            let (backend, backend_mac) = service0_backend(&key);
            let nat = (NAT_TCP, first_port(&key, 1024..=65535));
            let p = Ipv4Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, n.c1_mac);
            let want = translated(&p, n.p0_mac, (backend, 8080, backend_mac), nat);
            (
                with_tcp_options(&p.build(), opts),
                with_tcp_options(&want, out_opts),
                (backend, backend_mac, nat),
            )
        };
        let clamped_syn = |name: &str, (frame, want, _): Syn, clamped: i64| {
            consumer(name, n.c1, frame, Want::Redirect(want))
                .deltas([(Counter::Service(0, Field::MssClampedIn), clamped)])
        };
        let behind = |mss: u16| {
            let m = mss.to_be_bytes();
            // Window scale, NOP, then MSS: the walk skips a 3-byte option.
            vec![3, 3, 7, 1, 2, 4, m[0], m[1]]
        };
        // An invalid TCP checksum stays invalid by the same amount.
        let (mut bad, _, _) = syn(41004, &linux_syn_options(1460), &[]);
        bad[50] ^= 0x5a;
        // SYN-ACK from the backend, on the way to the consumer.
        let (frame41005, _, (backend, backend_mac, nat)) =
            syn(41005, &linux_syn_options(1100), &[]);
        let syn_ack = |mss: u16| {
            let p = Ipv4Packet::tcp((backend, 8080), nat, TCP_SYN | TCP_ACK)
                .macs(backend_mac, n.p0_mac);
            with_tcp_options(&p.build(), &linux_syn_options(mss))
        };
        let seen = |mss: u16| {
            let mut p = Ipv4Packet::tcp((EP_TCP, 80), (CLIENT, 41005), TCP_SYN | TCP_ACK)
                .macs(n.c1_mac, CLIENT_MAC);
            p.ttl = 63;
            with_tcp_options(&p.build(), &linux_syn_options(mss))
        };
        let clamped_syn_ack = |name: &str, mss: u16, out: u16, clamped: i64| {
            provider(name, n.p0, syn_ack(mss), Want::Redirect(seen(out)))
                .deltas([(Counter::Service(0, Field::MssClampedOut), clamped)])
        };
        let mut auto = spec.clone();
        auto.services[0].mss_clamp = MSS_CLAMP_AUTO;
        let mut off = spec.clone();
        off.services[0].mss_clamp = MSS_CLAMP_OFF;
        let counts = |inward, outward| {
            [
                Step::count(Counter::Service(0, Field::MssClampedIn), inward),
                Step::count(Counter::Service(0, Field::MssClampedOut), outward),
            ]
        };
        let mut steps = vec![
            clamped_syn(
                "SYN with MSS 1460 (first option), clamp 1200",
                syn(41000, &linux_syn_options(1460), &linux_syn_options(1200)),
                1,
            ),
            clamped_syn(
                "SYN with MSS 1460 at an odd offset, clamp 1200",
                syn(41001, &odd_mss_options(1460), &odd_mss_options(1200)),
                1,
            ),
            clamped_syn(
                "SYN with MSS 1460 after other options, clamp 1200",
                syn(41008, &behind(1460), &behind(1200)),
                1,
            ),
            clamped_syn(
                "SYN with MSS 1100, below the clamp: unchanged",
                syn(41002, &linux_syn_options(1100), &linux_syn_options(1100)),
                0,
            ),
            clamped_syn(
                "SYN with MSS equal to the clamp: unchanged",
                syn(41003, &linux_syn_options(1200), &linux_syn_options(1200)),
                0,
            ),
            Step::count(Counter::Service(0, Field::MssClampedIn), 3),
            consumer(
                "SYN with a bad checksum, clamped",
                n.c1,
                bad,
                Want::RedirectWith(Box::new(|input, out| {
                    assert_eq!(&out[56..58], &1200u16.to_be_bytes(), "clamped");
                    assert_ne!(l4_checksum_error(input), 0);
                    assert_eq!(
                        l4_checksum_error(out),
                        l4_checksum_error(input),
                        "the checksum error is carried, not repaired"
                    );
                })),
            ),
            consumer(
                "the SYN-ACK's flow",
                n.c1,
                frame41005,
                Want::Verdict(verdict::REDIRECT),
            ),
            clamped_syn_ack("SYN-ACK with MSS 1460, clamp 1200", 1460, 1200, 1),
            clamped_syn_ack(
                "retransmitted SYN-ACK with MSS 1000: unchanged",
                1000,
                1000,
                0,
            ),
        ];
        steps.extend(counts(4, 1));
        steps.extend([
            // auto: c1 has MTU 1400, p0 1500: 1400 - 40.
            Step::Apply(auto),
            clamped_syn(
                "SYN with MSS 1460, clamp auto (MTU 1400)",
                syn(41006, &linux_syn_options(1460), &linux_syn_options(1360)),
                1,
            ),
            clamped_syn_ack("SYN-ACK with MSS 1460, clamp auto", 1460, 1360, 1),
            // Off: nothing changes.
            Step::Apply(off),
            clamped_syn(
                "SYN with MSS 8960, clamping off",
                syn(41007, &linux_syn_options(8960), &linux_syn_options(8960)),
                0,
            ),
        ]);
        steps.extend(counts(5, 2));
        b.run(steps);
    });
}
