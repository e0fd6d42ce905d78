//! The approval cycle end to end: a pending endpoint drops, approving it
//! opens it within a second, rejecting it cuts its established flows.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use plink_tests::{
    gateway::Gateway,
    netns::{self, wait_for},
    privatelink::{self as pl, PrivateLink},
    servers,
};

#[test]
fn pending_drops_approve_opens_reject_cuts() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net
        .start_plink_with(&pl::Options {
            billing_b_tenant: "tenant-x".into(),
            ..Default::default()
        })
        .unwrap();
    let list = plink
        .ctl(&net.gw, &["endpoints", "list", "--json"])
        .unwrap();
    assert!(list.contains("pending"), "billing-b starts pending: {list}");

    // Pending: the SYN is dropped and counted.
    let before = plink.scrape(&net.gw).unwrap();
    let refused = net.consumer_b.run_in(|| {
        TcpStream::connect_timeout(&pl::endpoint_tcp().into(), Duration::from_millis(500))
    });
    assert!(
        refused.unwrap().is_err(),
        "a pending endpoint passed traffic"
    );
    let after = plink.scrape(&net.gw).unwrap();
    assert!(
        Gateway::drops(&after, "endpoint_pending") > Gateway::drops(&before, "endpoint_pending"),
        "pending drops are counted"
    );

    // Approve: traffic passes within a second of the command returning.
    plink
        .ctl(&net.gw, &["endpoints", "approve", "billing-b"])
        .unwrap();
    let approved_at = Instant::now();
    // Fresh connections with short SYN timeouts: a dropped SYN is not
    // retransmitted a second later, the next attempt is a new flow.
    wait_for(
        "the approved endpoint to pass",
        Duration::from_secs(1),
        || {
            let attempt = net.consumer_b.run_in(|| {
                TcpStream::connect_timeout(&pl::endpoint_tcp().into(), Duration::from_millis(100))
            })?;
            Ok(attempt.ok().map(|_| ()))
        },
    )
    .unwrap();
    let opened_after = approved_at.elapsed();
    assert!(
        opened_after < Duration::from_secs(1),
        "opened after {opened_after:?}"
    );
    let reply = servers::tcp_request(&net.consumer_b, None, pl::endpoint_tcp(), 0).unwrap();
    assert_eq!(*reply.local.ip(), pl::BILLING_BACKEND);

    // An established stream, then reject: the stream is cut.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let stream = net
        .consumer_b
        .run_in(|| TcpStream::connect_timeout(&pl::endpoint_tcp().into(), Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    let reader = std::thread::spawn(move || -> (usize, bool) {
        let mut stream = stream;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        // Far more than the socket buffers hold: the backend is still sending.
        stream.write_all(b"GET 100000000\n").unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < 256 * 1024 {
            total += stream.read(&mut buf).unwrap();
        }
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return (total, true),
                Ok(n) => total += n,
                Err(_) => return (total, false),
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    plink
        .ctl(&net.gw, &["endpoints", "reject", "billing-b"])
        .unwrap();
    go_tx.send(()).unwrap();
    let (total, clean_eof) = reader.join().unwrap();
    assert!(
        total < 100_000_000 && !clean_eof,
        "the rejected endpoint's stream kept flowing: {total} bytes, clean EOF {clean_eof}"
    );
    let flows = plink.ctl(&net.gw, &["conntrack", "--json"]).unwrap();
    assert!(
        !flows.contains("\"billing-b\""),
        "the rejected endpoint still has flows: {flows}"
    );
    let _ = SocketAddrV4::new(pl::CLIENT, 0);
}
