//! Path MTU on the reverse path and TCP MSS clamping, as golden cases.

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

fn service_counters(b: &mut Bench, id: u32) -> plink_common::Counters {
    b.dp.counters(CounterKind::Service, id).unwrap()
}

/// A reply too big for the consumer interface: the backend gets
/// fragmentation needed with that interface's MTU, from the NAT address it
/// sent to, quoting its packet as sent (so its PMTUD works); the reply is
/// not forwarded. Without DF it is a counted drop.
#[test]
fn golden_frag_needed_on_the_reverse_path() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "c1", "mtu", "1000"]).unwrap();
    let spec = spec(&gw);
    let (c1, p0, p0_mac, c1_mac) = (gw.c1, gw.p0, gw.p0_mac, gw.c1_mac);
    gw.host
        .run_in(move || {
            let mut b = Bench::new(&spec);
            let client = (CLIENT, 5000);
            let ep = (EP_UDP, 53);
            let key = fwd_key(1, client, ep, IPPROTO_UDP);
            let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
            let q = Ipv4Packet::udp(client, ep, b"q").macs(CLIENT_MAC, c1_mac);
            assert_eq!(
                b.raw(prog_names::CONSUMER, c1, &q.build()).verdict,
                verdict::REDIRECT
            );
            // 20 + 8 + 972 = 1000 bytes of IP: fits c1's MTU exactly.
            let fits =
                Ipv4Packet::udp((BACKEND10, 5353), nat, &[7; 972]).macs(BACKEND10_MAC, p0_mac);
            assert_eq!(
                b.raw(prog_names::PROVIDER, p0, &fits.build()).verdict,
                verdict::REDIRECT
            );
            let too_big = Ipv4Packet::udp((BACKEND10, 5353), nat, &[7; 973])
                .macs(BACKEND10_MAC, p0_mac)
                .build();
            b.case(
                "UDP reply larger than the consumer interface's MTU, DF",
                prog_names::PROVIDER,
                p0,
                &too_big,
                Want::Tx(error_reply(
                    &too_big,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1000,
                    p0_mac,
                )),
            );
            assert_eq!(service_counters(&mut b, 1).frag_needed_to_backend, 1);
            assert_eq!(
                b.dp.counters(CounterKind::Endpoint, 1)
                    .unwrap()
                    .frag_needed_to_backend,
                1
            );
            let mut no_df = too_big.clone();
            no_df[20] = 0;
            fix_checksums(&mut no_df);
            b.case(
                "UDP reply larger than the MTU without DF",
                prog_names::PROVIDER,
                p0,
                &no_df,
                Want::Drop(DropReason::FragNeeded),
            );
            assert_eq!(service_counters(&mut b, 1).frag_needed_to_backend, 1);

            // TCP: a full-size data segment of an established flow.
            let client = (CLIENT, 40000);
            let ep = (EP_TCP, 80);
            let key = fwd_key(1, client, ep, IPPROTO_TCP);
            let (backend, backend_mac) = service0_backend(&key);
            let nat = (NAT_TCP, first_port(&key, 1024..=65535));
            let syn = Ipv4Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, c1_mac);
            assert_eq!(
                b.raw(prog_names::CONSUMER, c1, &syn.build()).verdict,
                verdict::REDIRECT
            );
            let mut seg = Ipv4Packet::tcp((backend, 8080), nat, TCP_ACK).macs(backend_mac, p0_mac);
            seg.payload = vec![9; 1460];
            let seg = seg.build();
            b.case(
                "TCP segment of 1500 bytes towards a 1000-byte consumer link",
                prog_names::PROVIDER,
                p0,
                &seg,
                Want::Tx(error_reply(
                    &seg,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1000,
                    p0_mac,
                )),
            );
            assert_eq!(service_counters(&mut b, 0).frag_needed_to_backend, 1);
        })
        .unwrap();
}

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
    let (c1, p0, p0_mac, c1_mac) = (gw.c1, gw.p0, gw.p0_mac, gw.c1_mac);
    gw.host
        .run_in(move || {
            let mut b = Bench::new(&spec);
            // A SYN from `port` with `opts`, and what the provider sees of
            // it with `out_opts`.
            let syn = |port: u16, opts: &[u8], out_opts: &[u8]| {
                let client = (CLIENT, port);
                let ep = (EP_TCP, 80);
                let key = fwd_key(1, client, ep, IPPROTO_TCP);
                let (backend, backend_mac) = service0_backend(&key);
                let nat = (NAT_TCP, first_port(&key, 1024..=65535));
                let p = Ipv4Packet::tcp(client, ep, TCP_SYN).macs(CLIENT_MAC, c1_mac);
                let want = translated(&p, p0_mac, (backend, 8080, backend_mac), nat);
                (
                    with_tcp_options(&p.build(), opts),
                    with_tcp_options(&want, out_opts),
                    (backend, backend_mac, nat),
                )
            };
            let (frame, want, _) = syn(41000, &linux_syn_options(1460), &linux_syn_options(1200));
            b.case(
                "SYN with MSS 1460 (first option), clamp 1200",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Redirect(want),
            );
            let (frame, want, _) = syn(41001, &odd_mss_options(1460), &odd_mss_options(1200));
            b.case(
                "SYN with MSS 1460 at an odd offset, clamp 1200",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Redirect(want),
            );
            let behind = |mss: u16| {
                let m = mss.to_be_bytes();
                // Window scale, NOP, then MSS: the walk skips a 3-byte option.
                vec![3, 3, 7, 1, 2, 4, m[0], m[1]]
            };
            let (frame, want, _) = syn(41008, &behind(1460), &behind(1200));
            b.case(
                "SYN with MSS 1460 after other options, clamp 1200",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Redirect(want),
            );
            let (frame, want, _) = syn(41002, &linux_syn_options(1100), &linux_syn_options(1100));
            b.case(
                "SYN with MSS 1100, below the clamp: unchanged",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Redirect(want),
            );
            let (frame, want, _) = syn(41003, &linux_syn_options(1200), &linux_syn_options(1200));
            b.case(
                "SYN with MSS equal to the clamp: unchanged",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Redirect(want),
            );
            assert_eq!(service_counters(&mut b, 0).mss_clamped_in, 3);

            // An invalid TCP checksum stays invalid by the same amount.
            let (mut frame, _, _) = syn(41004, &linux_syn_options(1460), &[]);
            frame[50] ^= 0x5a;
            let run = b.raw(prog_names::CONSUMER, c1, &frame);
            assert_eq!(run.verdict, verdict::REDIRECT);
            assert_eq!(&run.output[56..58], &1200u16.to_be_bytes(), "clamped");
            assert_ne!(l4_checksum_error(&frame), 0);
            assert_eq!(
                l4_checksum_error(&run.output),
                l4_checksum_error(&frame),
                "the checksum error is carried, not repaired"
            );

            // SYN-ACK from the backend, on the way to the consumer.
            let (frame, _, (backend, backend_mac, nat)) = syn(41005, &linux_syn_options(1100), &[]);
            assert_eq!(
                b.raw(prog_names::CONSUMER, c1, &frame).verdict,
                verdict::REDIRECT
            );
            let syn_ack = |mss: u16| {
                let p = Ipv4Packet::tcp((backend, 8080), nat, TCP_SYN | TCP_ACK)
                    .macs(backend_mac, p0_mac);
                with_tcp_options(&p.build(), &linux_syn_options(mss))
            };
            let seen = |mss: u16| {
                let mut p = Ipv4Packet::tcp((EP_TCP, 80), (CLIENT, 41005), TCP_SYN | TCP_ACK)
                    .macs(c1_mac, CLIENT_MAC);
                p.ttl = 63;
                with_tcp_options(&p.build(), &linux_syn_options(mss))
            };
            b.case(
                "SYN-ACK with MSS 1460, clamp 1200",
                prog_names::PROVIDER,
                p0,
                &syn_ack(1460),
                Want::Redirect(seen(1200)),
            );
            b.case(
                "retransmitted SYN-ACK with MSS 1000: unchanged",
                prog_names::PROVIDER,
                p0,
                &syn_ack(1000),
                Want::Redirect(seen(1000)),
            );
            let c = service_counters(&mut b, 0);
            assert_eq!((c.mss_clamped_in, c.mss_clamped_out), (4, 1));

            // auto: c1 has MTU 1400, p0 1500: 1400 - 40.
            let mut auto = spec.clone();
            auto.services[0].mss_clamp = MSS_CLAMP_AUTO;
            b.dp.apply(&auto).unwrap();
            let (frame, want, _) = syn(41006, &linux_syn_options(1460), &linux_syn_options(1360));
            b.case(
                "SYN with MSS 1460, clamp auto (MTU 1400)",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Redirect(want),
            );
            b.case(
                "SYN-ACK with MSS 1460, clamp auto",
                prog_names::PROVIDER,
                p0,
                &syn_ack(1460),
                Want::Redirect(seen(1360)),
            );

            // Off: nothing changes.
            let mut off = spec.clone();
            off.services[0].mss_clamp = MSS_CLAMP_OFF;
            b.dp.apply(&off).unwrap();
            let (frame, want, _) = syn(41007, &linux_syn_options(8960), &linux_syn_options(8960));
            b.case(
                "SYN with MSS 8960, clamping off",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Redirect(want),
            );
            let c = service_counters(&mut b, 0);
            assert_eq!((c.mss_clamped_in, c.mss_clamped_out), (5, 2));
        })
        .unwrap();
}
