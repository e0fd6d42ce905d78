//! `plink-ctl check --host` reports each broken part of the forwarding
//! contract when it is introduced in a test namespace.

use std::process::Command;

use plink_tests::{
    gateway::{self, plink_ctl_bin},
    netns::{self, Host, Topology},
};

/// Runs `check --host --json` in `host` (through nsenter unless `ip_netns_exec`).
fn check(host: &Host, config: &str, ip_netns_exec: bool) -> (bool, Vec<serde_json::Value>) {
    let bin = plink_ctl_bin();
    let args = ["check", "--host", "--json", "--config", config];
    let out = if ip_netns_exec {
        Command::new("ip")
            .args(["netns", "exec", &host.name])
            .arg(&bin)
            .args(args)
            .output()
            .unwrap()
    } else {
        host.command(bin.to_str().unwrap())
            .args(args)
            .output()
            .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The first line is the config verdict; the JSON follows.
    let json = stdout.split_once('\n').map(|(_, j)| j).unwrap_or_default();
    let findings: Vec<serde_json::Value> = serde_json::from_str(json).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), findings)
}

fn has(findings: &[serde_json::Value], severity: &str, check: &str) -> bool {
    findings
        .iter()
        .any(|f| f["severity"] == severity && f["check"] == check)
}

#[test]
fn check_host_reports_each_problem() {
    netns::require_root_and_tools();
    let mut topo = Topology::new().unwrap();
    let gw = topo.host("gw").unwrap();
    let peer = topo.host("pr").unwrap();
    topo.link(&gw, "c1", &peer, "eth0").unwrap();
    topo.link(&gw, "p0", &peer, "eth1").unwrap();
    gw.ip(&["addr", "add", "198.51.100.254/24", "dev", "p0"])
        .unwrap();
    gw.sysctl("net.ipv4.conf.all.forwarding", "1").unwrap();
    gw.sysctl("net.ipv4.conf.c1.forwarding", "0").unwrap();
    let config_path = topo.scratch_dir().unwrap().join("plink.yaml");
    std::fs::write(
        &config_path,
        format!(
            "{}interfaces:\n  - {{name: c1, role: consumer, network: vnet-a}}\n  - {{name: p0, role: provider}}\n",
            gateway::gateway_section(&topo).unwrap()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(topo.bpffs_root()).unwrap();
    let config = config_path.to_str().unwrap();

    // A correct host: no failure.
    let (ok, findings) = check(&gw, config, false);
    assert!(ok, "a correct host failed: {findings:#?}");
    assert!(has(&findings, "ok", "bpffs"));
    assert!(has(&findings, "ok", "native_xdp"));

    // Each problem in turn.
    gw.sysctl("net.ipv4.conf.c1.forwarding", "1").unwrap();
    let (ok, findings) = check(&gw, config, false);
    assert!(
        !ok && has(&findings, "fail", "consumer_forwarding"),
        "{findings:#?}"
    );
    gw.sysctl("net.ipv4.conf.c1.forwarding", "0").unwrap();

    gw.ip(&["addr", "add", "192.0.2.254/24", "dev", "c1"])
        .unwrap();
    let (ok, findings) = check(&gw, config, false);
    assert!(
        !ok && has(&findings, "fail", "consumer_address"),
        "{findings:#?}"
    );
    gw.ip(&["addr", "flush", "dev", "c1"]).unwrap();

    gw.sysctl("net.ipv4.conf.p0.forwarding", "0").unwrap();
    let (ok, findings) = check(&gw, config, false);
    assert!(
        !ok && has(&findings, "fail", "provider_forwarding"),
        "{findings:#?}"
    );
    gw.sysctl("net.ipv4.conf.p0.forwarding", "1").unwrap();

    gw.ip(&["link", "set", "dev", "p0", "mtu", "4000"]).unwrap();
    let (ok, findings) = check(&gw, config, false);
    assert!(!ok && has(&findings, "fail", "mtu"), "{findings:#?}");
    gw.ip(&["link", "set", "dev", "p0", "mtu", "1500"]).unwrap();

    gw.exec("ethtool", &["-K", "c1", "tx", "on"]).unwrap();
    let (ok, findings) = check(&gw, config, false);
    assert!(ok && has(&findings, "warn", "tx_checksum"), "{findings:#?}");
    gw.exec("ethtool", &["-K", "c1", "tx", "off"]).unwrap();

    // Under `ip netns exec`, /sys is remounted and bpffs hidden.
    let (ok, findings) = check(&gw, config, true);
    assert!(!ok && has(&findings, "fail", "bpffs"), "{findings:#?}");
    let msg = findings
        .iter()
        .find(|f| f["check"] == "bpffs")
        .and_then(|f| f["message"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        msg.contains("nsenter"),
        "the bpffs message says what to do: {msg}"
    );

    // Back to a correct host.
    let (ok, findings) = check(&gw, config, false);
    assert!(ok, "{findings:#?}");
}

/// `plink-ctl run` refuses a host that breaks the forwarding contract and
/// says how to fix it; the explicit override starts it anyway.
#[test]
fn run_refuses_a_broken_forwarding_contract() {
    netns::require_root_and_tools();
    let mut topo = Topology::new().unwrap();
    let gw = topo.host("gw").unwrap();
    let peer = topo.host("pr").unwrap();
    topo.link(&gw, "c1", &peer, "eth0").unwrap();
    topo.link(&gw, "p0", &peer, "eth1").unwrap();
    topo.enable_napi(&peer, "eth0").unwrap();
    gw.ip(&["addr", "add", "198.51.100.254/24", "dev", "p0"])
        .unwrap();
    // A consumer interface created after the global switch inherits it.
    gw.sysctl("net.ipv4.conf.all.forwarding", "1").unwrap();
    gw.sysctl("net.ipv4.conf.c1.forwarding", "1").unwrap();
    let config = format!(
        "{}interfaces:\n  - {{name: c1, role: consumer, network: vnet-a}}\n  - {{name: p0, role: provider}}\n",
        gateway::gateway_section(&topo).unwrap()
    );
    let refused = match gateway::start(&mut topo, &gw, &config) {
        Ok(_) => panic!("plink-ctl run started with forwarding on for consumer interface c1"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("forwarding contract")
            && refused.contains("sysctl -w net.ipv4.conf.c1.forwarding=0"),
        "the refusal names the violation and its fix: {refused}"
    );
    assert!(
        !topo
            .bpffs_root()
            .join(format!("v{}", plink_common::LAYOUT_VERSION))
            .exists(),
        "nothing was pinned before the refusal"
    );
    let started = gateway::start_with_args(&mut topo, &gw, &config, &["--allow-broken-contract"]);
    assert!(started.is_ok(), "the override starts: {:?}", started.err());
}
