//! The dataplane outlives the controller: maps and XDP links are pinned, a
//! killed or stopped controller leaves forwarding running, and a new one
//! adopts the pins (same map and link ids, same flows).

use std::time::Duration;

use plink_tests::{
    gateway,
    netns::{self, Host},
    privatelink::{self as pl, PrivateLink},
    servers,
};

/// The ids of a pinned BPF object (`bpftool {map|link} show pinned PATH`).
fn pinned_id(host: &Host, kind: &str, path: &std::path::Path) -> u64 {
    let out = host
        .exec(
            "bpftool",
            &["-j", kind, "show", "pinned", path.to_str().unwrap()],
        )
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id in {out}"))
}

/// Pinned map and link ids, in a stable order.
fn pinned_ids(net: &PrivateLink) -> Vec<(String, u64)> {
    let dir = net
        .topo
        .bpffs_root()
        .join(format!("v{}", plink_common::LAYOUT_VERSION));
    let mut ids = Vec::new();
    for name in plink_common::map_names::ALL {
        ids.push((
            format!("map {name}"),
            pinned_id(&net.gw, "map", &dir.join(name)),
        ));
    }
    for link in ["c1", "c2", "c3", "p0"] {
        ids.push((
            format!("link {link}"),
            pinned_id(&net.gw, "link", &dir.join("links").join(link)),
        ));
    }
    ids
}

/// A slow reader: the stream spans the controller's restart.
fn start_stream(host: &Host, bytes: usize) -> std::thread::JoinHandle<Result<usize, String>> {
    servers::slow_stream(host, pl::endpoint_tcp(), bytes, Duration::from_millis(2)).unwrap()
}

fn survives(kill: bool) {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let ids_before = pinned_ids(&net);
    const BYTES: usize = 24 * 1024 * 1024;
    let stream = start_stream(&net.consumer_a, BYTES);
    std::thread::sleep(Duration::from_millis(300));
    if kill {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(net.topo.child_mut(plink.child).id() as i32, libc::SIGKILL) };
        let _ = net.topo.child_mut(plink.child).wait();
    } else {
        let out = net.topo.stop(plink.child).unwrap();
        assert!(out.status.success(), "SIGTERM exit: {:?}", out.status);
    }
    // No controller: a new connection still goes through.
    let reply = servers::tcp_request(&net.consumer_b, None, pl::endpoint_tcp(), 4096).unwrap();
    assert_eq!(*reply.local.ip(), pl::BILLING_BACKEND);
    assert!(!stream.is_finished(), "the stream should still be running");

    // A new controller adopts the same objects.
    let cfg = pl::config(&net.topo, &pl::Options::default()).unwrap();
    let gw = net.gw.clone();
    let plink2 = gateway::start(&mut net.topo, &gw, &cfg).unwrap();
    assert_eq!(
        pinned_ids(&net),
        ids_before,
        "maps and links were replaced, not adopted"
    );
    let flows = plink2.ctl(&net.gw, &["conntrack", "--json"]).unwrap();
    assert!(
        flows.contains("orders-a"),
        "the stream's flow was lost: {flows}"
    );

    let got = stream.join().unwrap();
    assert_eq!(got, Ok(BYTES), "the stream did not finish intact");
}

#[test]
fn forwarding_survives_kill_9_and_a_new_controller_adopts() {
    survives(true);
}

#[test]
fn forwarding_survives_sigterm_and_a_new_controller_adopts() {
    survives(false);
}

#[test]
fn a_pinned_map_with_another_layout_is_refused() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let dir = net
        .topo
        .bpffs_root()
        .join(format!("v{}", plink_common::LAYOUT_VERSION));
    std::fs::create_dir_all(&dir).unwrap();
    // IF_STATS with the wrong value size, as an older build might have left it.
    let pin = dir.join(plink_common::map_names::IF_STATS);
    net.gw
        .exec(
            "bpftool",
            &[
                "map",
                "create",
                pin.to_str().unwrap(),
                "type",
                "percpu_hash",
                "key",
                "4",
                "value",
                "8",
                "entries",
                "64",
                "name",
                "IF_STATS",
            ],
        )
        .unwrap();
    let err = match net.start_plink() {
        Ok(_) => panic!("plink adopted an incompatible map"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("IF_STATS") && err.contains("value size") && err.contains("plink-ctl down"),
        "the refusal says what differs and what to do: {err}"
    );
}

/// A TCP stream runs across five reloads that each change something real; it
/// sees no reset and every byte arrives.
#[test]
fn a_stream_survives_five_reloads() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    const BYTES: usize = 24 * 1024 * 1024;
    // The backend the reloads add is a real one: new flows hash to it too.
    let added = std::net::Ipv4Addr::new(198, 51, 100, 13);
    net.provider
        .ip(&["addr", "add", &format!("{added}/24"), "dev", "eth0"])
        .unwrap();
    net.servers
        .push(servers::start(&net.provider, added, 8080, true, false).unwrap());
    let stream = start_stream(&net.consumer_a, BYTES);
    let original = std::fs::read_to_string(&plink.config_path).unwrap();
    let edits: [(&str, &str, &str); 5] = [
        (
            "add an endpoint",
            "endpoints:\n",
            "endpoints:\n  - {name: orders-a2, tenant: tenant-a, network: vnet-a, address: 192.0.2.51, service: orders}\n",
        ),
        (
            "add a backend",
            "backends: [{address: 198.51.100.10}, {address: 198.51.100.11}]",
            "backends: [{address: 198.51.100.10}, {address: 198.51.100.11}, {address: 198.51.100.13}]",
        ),
        (
            "change a weight",
            "{address: 198.51.100.11}, {address: 198.51.100.13}",
            "{address: 198.51.100.11, weight: 3}, {address: 198.51.100.13}",
        ),
        (
            "remove an unrelated endpoint",
            "  - {name: dns-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.53, service: dns}\n",
            "",
        ),
        (
            "add a NAT address",
            "addresses: [198.51.100.200]",
            "addresses: [198.51.100.200, 198.51.100.210]",
        ),
    ];
    let mut text = original;
    for (what, from, to) in edits {
        assert!(text.contains(from), "{what}: pattern missing");
        text = text.replacen(from, to, 1);
        std::fs::write(&plink.config_path, &text).unwrap();
        let out = plink
            .ctl(&net.gw, &["reload"])
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert!(
            !out.contains("no changes"),
            "{what}: the reload changed nothing: {out}"
        );
        assert!(!stream.is_finished(), "the stream ended during '{what}'");
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = stream.join().unwrap();
    assert_eq!(got, Ok(BYTES), "the stream did not survive the reloads");
    // The new endpoint works too, on every backend and both NAT addresses
    // (enough connections that each backend takes some).
    let mut backends = std::collections::BTreeSet::new();
    let mut nats = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let reply = servers::tcp_request(
            &net.consumer_a,
            None,
            std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(192, 0, 2, 51), 80),
            1024,
        )
        .unwrap();
        backends.insert(*reply.local.ip());
        nats.insert(*reply.peer.ip());
    }
    assert!(
        backends.contains(&added),
        "no connection reached the added backend: {backends:?}"
    );
    for nat in &nats {
        assert!(
            *nat == pl::ORDERS_NAT || nat.octets()[3] == 210,
            "a backend saw a source that is no NAT address: {nat}"
        );
    }
}

/// `plink-ctl down` detaches XDP and removes every pin.
#[test]
fn down_detaches_and_removes_the_pins() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let config = plink.config_path.clone();
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success());
    let link = net.gw.ip(&["link", "show", "dev", "c1"]).unwrap();
    assert!(
        link.contains("xdp"),
        "XDP stays attached after SIGTERM: {link}"
    );
    let bin = gateway::plink_ctl_bin();
    net.gw
        .exec(
            bin.to_str().unwrap(),
            &["down", "--config", config.to_str().unwrap()],
        )
        .unwrap();
    for dev in ["c1", "c2", "c3", "p0"] {
        let link = net.gw.ip(&["link", "show", "dev", dev]).unwrap();
        assert!(
            !link.contains("prog/xdp"),
            "{dev} still has XDP after down: {link}"
        );
    }
    let dir = net
        .topo
        .bpffs_root()
        .join(format!("v{}", plink_common::LAYOUT_VERSION));
    assert!(!dir.exists(), "pins left at {}", dir.display());
}

/// Interfaces changed while the controller was down: c1 deleted and
/// re-created (its pinned link is defunct), c3 dropped from the config. A new
/// controller attaches anew to c1, detaches c3 and forwards.
#[test]
fn a_restart_follows_interfaces_that_changed_while_down() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success(), "SIGTERM exit: {:?}", out.status);
    let xdp_on = |dev: &str| {
        net.gw
            .ip(&["-d", "link", "show", "dev", dev])
            .unwrap()
            .contains("prog/xdp")
    };

    net.gw.ip(&["link", "del", "c1"]).unwrap();
    let (ca, gw) = (net.consumer_a.clone(), net.gw.clone());
    net.topo.link(&ca, "eth0", &gw, "c1").unwrap();
    ca.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])
        .unwrap();
    gw.sysctl("net.ipv4.conf.c1.forwarding", "0").unwrap();
    net.topo.enable_napi(&ca, "eth0").unwrap();
    assert!(!xdp_on("c1"), "the re-created c1 starts without XDP");
    assert!(xdp_on("c3"), "c3 still runs the old controller's program");

    let cfg = pl::config(&net.topo, &pl::Options::default())
        .unwrap()
        .replace("  - {name: c3, role: consumer, network: vnet-a}\n", "");
    assert!(!cfg.contains("c3"), "c3 left the config");
    let _plink2 = gateway::start(&mut net.topo, &gw, &cfg).unwrap();
    assert!(xdp_on("c1"), "the re-created c1 got plink's program");
    assert!(!xdp_on("c3"), "c3, no longer configured, was detached");
    let links = net
        .topo
        .bpffs_root()
        .join(format!("v{}", plink_common::LAYOUT_VERSION))
        .join("links");
    assert!(links.join("c1").exists() && !links.join("c3").exists());
    let reply = servers::tcp_request(&ca, None, pl::endpoint_tcp(), 4096).unwrap();
    assert!(pl::ORDERS_BACKENDS.contains(reply.local.ip()));
}

/// A consumer interface deleted and re-created while plink runs (what a
/// container restart does to its veth) gets its program back and serves
/// again, without a restart or reload.
#[test]
fn a_running_gateway_follows_an_interface_re_created() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let _plink = net.start_plink().unwrap();
    let (ca, gw) = (net.consumer_a.clone(), net.gw.clone());
    servers::tcp_request(&ca, None, pl::endpoint_tcp(), 1024).unwrap();
    let xdp_on = |dev: &str| {
        gw.ip(&["-d", "link", "show", "dev", dev])
            .is_ok_and(|out| out.contains("prog/xdp"))
    };

    gw.ip(&["link", "del", "c1"]).unwrap();
    net.topo.link(&ca, "eth0", &gw, "c1").unwrap();
    ca.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])
        .unwrap();
    gw.sysctl("net.ipv4.conf.c1.forwarding", "0").unwrap();
    net.topo.enable_napi(&ca, "eth0").unwrap();

    netns::wait_for(
        "plink to attach to the re-created c1",
        Duration::from_secs(10),
        || Ok(xdp_on("c1").then_some(())),
    )
    .unwrap();
    let reply = netns::wait_for(
        "a request through the re-created c1",
        Duration::from_secs(10),
        || Ok(servers::tcp_request(&ca, None, pl::endpoint_tcp(), 1024).ok()),
    )
    .unwrap();
    assert!(pl::ORDERS_BACKENDS.contains(reply.local.ip()));
}
