//! A fleet of three gateways behind an L4-hash ECMP router, announced by
//! FRR with 100 ms × 3 BFD (docs/FLEET.md): announcement follows approval,
//! backend health and drain; a node loss breaks only that node's streams
//! (router-side resilient nexthop group); a drain breaks none; new
//! connections keep succeeding. The figures are printed.

use std::time::{Duration, Instant};

use plink_tests::{
    fleet::{self, Fleet, Prober, RouterMode, open_streams},
    netns::{require_root_and_tools, wait_for},
};

const STREAMS: usize = 30;

/// The fleet tests run one at a time: each is timing-sensitive (BFD,
/// stall detection) and three fleets at once would share 2 CPUs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prints a figure and appends it to target/tmp/fleet-figures.txt, which
/// `cargo xtask test` prints after the run (test output is captured).
fn figure(line: String) {
    use std::io::Write as _;
    println!("{line}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-figures.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Announcement: each node announces the endpoint with its own next hop,
/// withdraws it when the endpoint is rejected, and announces it again.
#[test]
fn each_node_announces_its_endpoints_and_withdraws_on_reject() {
    let _serial = serial();
    require_root_and_tools();
    let f = Fleet::start(3, RouterMode::HashThreshold).expect("fleet");
    let hops: Vec<_> = f.nodes.iter().map(|g| g.node.next_hop()).collect();
    assert_eq!(f.paths().expect("paths"), hops, "one path per gateway");
    // Traffic flows over the fleet.
    let (streams, per) = open_streams(&f, 12).expect("streams");
    assert!(
        per.len() >= 2,
        "L4 hash spreads streams over nodes: {per:?}"
    );
    drop(streams);
    // Rejecting on node 2 withdraws its route only.
    let g2 = &f.nodes[1];
    g2.plink
        .as_ref()
        .expect("plink")
        .ctl(&g2.host, &["endpoints", "reject", "orders-a"])
        .expect("reject");
    f.wait_paths(2, Duration::from_secs(5)).expect("withdrawn");
    assert!(!f.paths().expect("paths").contains(&g2.node.next_hop()));
    g2.plink
        .as_ref()
        .expect("plink")
        .ctl(&g2.host, &["endpoints", "approve", "orders-a"])
        .expect("approve");
    f.wait_paths(3, Duration::from_secs(5))
        .expect("announced again");
}

fn report(label: &str, r: &fleet::LossReport) {
    figure(format!(
        "FLEET {label}: killed gw{} ({} of {} streams on it): {} broken ({:.0}%), {} of them on surviving nodes; router withdrew in {:.2}s",
        r.killed,
        r.owned_by_killed,
        r.streams,
        r.broken,
        100.0 * r.broken as f64 / r.streams as f64,
        r.survivors_broken,
        r.withdrawal.as_secs_f64()
    ));
}

/// Node loss with the router-side resilient group: every member in turn
/// (edge members are the ones hash-threshold ECMP gets wrong), then a
/// drain; new connections are probed throughout.
#[test]
fn node_loss_breaks_only_its_flows_and_drain_breaks_none() {
    let _serial = serial();
    require_root_and_tools();
    let mut f = Fleet::start(3, RouterMode::Resilient).expect("fleet");
    let prober = Prober::start(&f.client).expect("prober");
    let mut reports = Vec::new();
    for i in 0..3 {
        let r = fleet::measure_loss(&mut f, i, STREAMS).expect("node loss");
        report("node loss (resilient group)", &r);
        f.start_node(i).expect("restart");
        f.wait_paths(3, Duration::from_secs(30)).expect("back");
        let helper = f.helper.as_ref().expect("helper");
        wait_for("the group to hold 3", Duration::from_secs(10), || {
            Ok((helper.members() == 3).then_some(()))
        })
        .expect("group");
        reports.push(r);
    }

    // Drain node 2: withdraw, keep its flows, end them, stop it.
    let (streams, per) = open_streams(&f, STREAMS).expect("streams");
    let on_drained = per.get(&2).copied().unwrap_or(0);
    let g2 = &f.nodes[1];
    let plink = g2.plink.as_ref().expect("plink");
    let host = g2.host.clone();
    let drain_cmd = {
        let bin = plink_tests::gateway::plink_ctl_bin();
        let cfg = plink.config_path.clone();
        std::thread::spawn(move || {
            host.exec(
                bin.to_str().expect("path"),
                &[
                    "drain",
                    "--deadline",
                    "30s",
                    "--config",
                    cfg.to_str().expect("path"),
                ],
            )
        })
    };
    f.wait_paths(2, Duration::from_secs(5))
        .expect("drain withdraws");
    // The drained node keeps forwarding its flows meanwhile.
    std::thread::sleep(Duration::from_secs(4));
    let broken_while_draining = streams.iter().filter(|s| s.is_broken()).count();
    // The streams end (FIN): the drain completes, then the node stops.
    let t = Instant::now();
    let whole = streams
        .into_iter()
        .filter(|s| !s.is_broken())
        .map(|s| s.close())
        .filter(|w| *w)
        .count();
    let out = drain_cmd.join().expect("drain thread").expect("drain");
    assert!(out.contains("drained"), "{out}");
    let drain_secs = t.elapsed().as_secs_f64();
    let (streams2, _) = open_streams(&f, STREAMS).expect("streams");
    f.kill_node(1).expect("stop drained node");
    std::thread::sleep(Duration::from_secs(4));
    let broken_after_stop = streams2
        .iter()
        .filter(|s| s.is_broken() && s.owner == 2)
        .count();
    drop(streams2);
    figure(format!(
        "FLEET drain gw2 ({on_drained} of {STREAMS} streams on it): {broken_while_draining} broken while draining, {whole} ended whole; drain finished {drain_secs:.1}s after the streams closed; streams opened after the drain and broken when it stopped: {broken_after_stop}"
    ));

    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed) = prober.counts();
    // A failure counts against convergence while a node is going away
    // (kill until the router's group lost it, plus a connect timeout).
    let windows: Vec<_> = reports
        .iter()
        .map(|r| (r.killed_at, r.converged_at + Duration::from_secs(1)))
        .collect();
    let after_convergence = prober.failures_outside(&windows);
    drop(prober);
    figure(format!(
        "FLEET new connections throughout: {ok} succeeded, {failed} failed, {after_convergence} of the failures outside the node-loss convergence windows"
    ));

    for r in &reports {
        assert_eq!(
            r.survivors_broken, 0,
            "a surviving node's stream broke: {r:?}"
        );
    }
    assert_eq!(broken_while_draining, 0, "a drain broke streams");
    assert_eq!(
        broken_after_stop, 0,
        "streams opened after the drain landed on the drained node"
    );
    assert!(ok > 0);
    assert_eq!(
        after_convergence, 0,
        "new connections failed after convergence"
    );
}

/// The same node loss under FRR's own ECMP route (Linux hash-threshold
/// multipath), for comparison: killing an edge member re-hashes some of the
/// survivors' flows onto nodes without their state (SPEC §10). Reported,
/// and the killed node's own streams must all break (nobody else holds them).
#[test]
fn node_loss_under_hash_threshold_ecmp_is_measured() {
    let _serial = serial();
    require_root_and_tools();
    let mut f = Fleet::start(3, RouterMode::HashThreshold).expect("fleet");
    for i in [0, 2] {
        let r = fleet::measure_loss(&mut f, i, STREAMS).expect("node loss");
        report("node loss (hash-threshold ECMP)", &r);
        assert_eq!(
            r.broken - r.survivors_broken,
            r.owned_by_killed,
            "every stream of the dead node breaks, no other: {r:?}"
        );
        f.start_node(i).expect("restart");
        f.wait_paths(3, Duration::from_secs(30)).expect("back");
    }
}
