//! The datapath's debug messages (issue 20 item 3): off at start, switched
//! on and off at runtime with `plink-ctl debug on|off` (no rebuild, no
//! restart), forwarded to the controller's log with the drop reason.

use std::time::{Duration, Instant};

use plink_common::DropReason;
use plink_tests::{
    netns::{self, wait_for},
    packet::Ipv4Packet,
    privatelink::{self as pl, PrivateLink},
};

#[test]
fn debug_messages_are_switched_at_runtime() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let gw_c1 = net.gw.mac("c1").unwrap();
    let ca = net.consumer_a.mac("eth0").unwrap();
    // UDP to the endpoint address on a port no endpoint has: no_endpoint.
    let frame = Ipv4Packet::udp((pl::CLIENT, 40200), (pl::ENDPOINT, 9), b"x")
        .macs(ca, gw_c1)
        .build();
    let reason = DropReason::NoEndpoint as u32;
    let want = format!("drop: program 0 reason {reason} endpoint {}", u32::MAX);
    // Lines of the controller's log from now on that carry `want`.
    let seen = |for_: Duration| -> usize {
        let deadline = Instant::now() + for_;
        let mut n = 0;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match plink.stderr.recv_timeout(left) {
                Ok(line) if line.contains(&want) => n += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        n
    };

    let status = plink.ctl(&net.gw, &["debug"]).unwrap();
    assert!(status.contains("off"), "off at start: {status}");
    net.consumer_a
        .send_frames("eth0", vec![frame.clone()])
        .unwrap();
    assert_eq!(seen(Duration::from_secs(2)), 0, "no message while off");

    let on = plink.ctl(&net.gw, &["debug", "on"]).unwrap();
    assert!(on.contains("on"), "{on}");
    net.consumer_a
        .send_frames("eth0", vec![frame.clone()])
        .unwrap();
    wait_for("the drop's debug message", Duration::from_secs(5), || {
        Ok((seen(Duration::from_millis(200)) > 0).then_some(()))
    })
    .unwrap();

    let off = plink.ctl(&net.gw, &["debug", "off"]).unwrap();
    assert!(off.contains("off"), "{off}");
    seen(Duration::from_millis(500));
    net.consumer_a.send_frames("eth0", vec![frame]).unwrap();
    assert_eq!(seen(Duration::from_secs(2)), 0, "no message once off again");
}
