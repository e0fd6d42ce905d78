//! `cargo xtask fleet`: three plink gateways, each with its FRR (bgpd +
//! bfdd, 100 ms × 3 BFD), behind a consumer router doing L4-hash ECMP
//! through a resilient nexthop group (docs/FLEET.md). Opens long-lived
//! streams, kills a node, drains another, and prints what broke.

use std::time::Duration;

use plink_tests::fleet::{self, Fleet, Prober, RouterMode, open_streams};

fn main() -> anyhow::Result<()> {
    plink_tests::netns::require_root_and_tools();
    println!("starting 3 gateways, their FRR and the router ...");
    let mut f = Fleet::start(3, RouterMode::Resilient)?;
    println!("router's paths to {}: {:?}", fleet::ENDPOINT, f.paths()?);
    println!(
        "{}",
        f.router_frr
            .vtysh("show bfd peers brief")
            .unwrap_or_default()
    );
    let prober = Prober::start(&f.client)?;

    let r = fleet::measure_loss(&mut f, 0, 30)?;
    println!(
        "node loss: killed gw{} holding {} of {} streams; {} broke, {} of them on surviving nodes; router withdrew it in {:.2}s (BFD)",
        r.killed,
        r.owned_by_killed,
        r.streams,
        r.broken,
        r.survivors_broken,
        r.withdrawal.as_secs_f64()
    );
    f.start_node(0)?;
    f.wait_paths(3, Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(1));

    let (streams, per) = open_streams(&f, 30)?;
    println!("drain: 30 streams over the nodes {per:?}; `plink-ctl drain` on gw2 ...");
    let g2 = &f.nodes[1];
    let out = {
        let host = g2.host.clone();
        let cfg = g2.plink.as_ref().map(|p| p.config_path.clone());
        let bin = plink_tests::gateway::plink_ctl_bin();
        std::thread::spawn(move || {
            let cfg = cfg.unwrap_or_default();
            host.exec(
                &bin.display().to_string(),
                &[
                    "drain",
                    "--deadline",
                    "30s",
                    "--quiet",
                    "3s",
                    "--config",
                    &cfg.display().to_string(),
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_secs(4));
    let broken = streams.iter().filter(|s| s.is_broken()).count();
    println!("drain: after 4 s withdrawn, {broken} of 30 streams broken; closing them");
    drop(streams);
    let out = out.join().map_err(|_| anyhow::anyhow!("drain thread"))??;
    print!("{out}");
    f.kill_node(1)?;
    let (ok, failed) = prober.counts();
    println!(
        "new connections meanwhile: {ok} succeeded, {failed} failed (failures fall in the node-loss convergence window)"
    );
    Ok(())
}
