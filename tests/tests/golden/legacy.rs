//! Golden cases not yet in tables.

use super::*;

/// Too big for the provider side's MTU: fragmentation needed (with the
/// MTU) back to the consumer for DF packets; a counted drop without DF.
#[test]
fn golden_frag_needed_on_the_forward_path() {
    let gw = gateway();
    gw.host.ip(&["link", "set", "p0", "mtu", "1000"]).unwrap();
    let spec = spec(&gw);
    let (c1, p0_mac, c1_mac) = (gw.c1, gw.p0_mac, gw.c1_mac);
    gw.host
        .run_in(move || {
            let mut b = Bench::new(&spec);
            let client = (CLIENT, 5000);
            let ep = (EP_UDP, 53);
            let key = fwd_key(1, client, ep, IPPROTO_UDP);
            let nat = (NAT_UDP, first_port(&key, UDP_PORTS));
            let fits = Ipv4Packet::udp(client, ep, &[7; 972]).macs(CLIENT_MAC, c1_mac);
            b.case(
                "1000 bytes fit",
                prog_names::CONSUMER,
                c1,
                &fits.build(),
                Want::Redirect(translated(
                    &fits,
                    p0_mac,
                    (BACKEND10, 5353, BACKEND10_MAC),
                    nat,
                )),
            );
            let big = Ipv4Packet::udp(client, ep, &[7; 973]).macs(CLIENT_MAC, c1_mac);
            let frame = big.build();
            b.case(
                "1001 bytes with DF",
                prog_names::CONSUMER,
                c1,
                &frame,
                Want::Tx(error_reply(
                    &frame,
                    ICMP_DEST_UNREACH,
                    ICMP_FRAG_NEEDED,
                    1000,
                    c1_mac,
                )),
            );
            let mut no_df = frame.clone();
            no_df[20] = 0;
            fix_checksums(&mut no_df);
            b.case(
                "1001 bytes without DF",
                prog_names::CONSUMER,
                c1,
                &no_df,
                Want::Drop(DropReason::FragNeeded),
            );
        })
        .unwrap();
}
