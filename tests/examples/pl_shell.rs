//! Builds the reference Private Link topology with plink running and waits
//! until /tmp/pl_shell.stop exists: for poking at it by hand while debugging.

fn main() -> anyhow::Result<()> {
    plink_tests::netns::require_root_and_tools();
    let mut net = plink_tests::privatelink::PrivateLink::build()?;
    let plink = net.start_plink()?;
    println!(
        "gateway ns: {}  config: {}",
        net.gw.name,
        plink.config_path.display()
    );
    println!(
        "consumer a: {}  provider: {}",
        net.consumer_a.name, net.provider.name
    );
    while !std::path::Path::new("/tmp/pl_shell.stop").exists() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}
