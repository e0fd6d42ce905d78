//! The reconcile contract (SPEC §9): an admin command answers only once the
//! kernel holds its result, a change that cannot be applied is refused with
//! its reason before anything is written, an adopting start purges the flows
//! the config no longer allows, and pins are never combined with a state file
//! from another dataplane.

use std::{
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use plink_tests::{
    gateway,
    netns::{self, wait_for},
    privatelink::{self as pl, PrivateLink},
    servers,
};

/// Flows as `plink-ctl conntrack --json` lists them.
fn flows(plink: &gateway::Gateway, net: &PrivateLink) -> Vec<serde_json::Value> {
    let out = plink.ctl(&net.gw, &["conntrack", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["data"]["flows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn connects(host: &netns::Host, dst: SocketAddrV4) -> bool {
    host.run_in(move || TcpStream::connect_timeout(&dst.into(), Duration::from_millis(200)).is_ok())
        .unwrap()
}

/// The red-team case of issue 14: a reload that moves a NAT address from one
/// service to another passes `check`, but the address still drains flows in
/// its old service. The old controller acknowledged the reload, failed to
/// apply it in the background, and from then on acknowledged every admin
/// command without applying it (`endpoints reject` printed `rejected` while
/// the endpoint kept serving).
#[test]
fn a_change_the_kernel_cannot_take_is_refused_and_admin_answers_stay_true() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    // A flow on orders' NAT address: it drains there once orders lets it go.
    let reply = servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), 0).unwrap();
    assert_eq!(*reply.peer.ip(), pl::ORDERS_NAT);
    assert!(
        connects(&net.consumer_b, pl::endpoint_tcp()),
        "billing-b serves"
    );

    let original = std::fs::read_to_string(&plink.config_path).unwrap();
    let moved = original
        .replacen(
            "nat: {addresses: [198.51.100.200], ports: 20000-29999}",
            "nat: {addresses: [198.51.100.210], ports: 20000-29999}",
            1,
        )
        .replacen(
            "nat: {addresses: [198.51.100.201], ports: 20000-29999}",
            "nat: {addresses: [198.51.100.201, 198.51.100.200], ports: 20000-29999}",
            1,
        );
    assert_ne!(moved, original, "the NAT pools were found in the config");
    std::fs::write(&plink.config_path, &moved).unwrap();
    let bin = gateway::plink_ctl_bin();
    let config = plink.config_path.to_str().unwrap().to_owned();
    let check = net
        .gw
        .exec(bin.to_str().unwrap(), &["check", "--config", &config]);
    assert!(
        check.is_ok(),
        "the moved config is valid on its own: {check:?}"
    );
    let reload = plink.ctl(&net.gw, &["reload"]);

    // Whatever the reload answered, an acknowledged reject must be true.
    let reject = plink.ctl(&net.gw, &["endpoints", "reject", "billing-b"]);
    if reject.is_ok() {
        let cut = wait_for("billing-b to stop serving", Duration::from_secs(2), || {
            Ok((!connects(&net.consumer_b, pl::endpoint_tcp())).then_some(()))
        });
        assert!(
            cut.is_ok(),
            "`endpoints reject billing-b` answered {reject:?}, yet billing-b still serves"
        );
    }

    // The reload could not be applied while orders' flow holds the address:
    // it is refused with the reason, and nothing of it was applied.
    let err = match reload {
        Ok(out) => panic!("the reload was acknowledged though it cannot be applied: {out}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("198.51.100.200") && err.contains("orders"),
        "the refusal names the address and the service still holding it: {err}"
    );
    assert!(reject.is_ok(), "reject after a refused reload: {reject:?}");
    let reply = servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), 0).unwrap();
    assert_eq!(
        *reply.peer.ip(),
        pl::ORDERS_NAT,
        "the refused reload changed orders' NAT pool"
    );
    let status = plink.ctl(&net.gw, &["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["data"]["dataplane"]["in_sync"], true,
        "nothing diverged: {status}"
    );
    let scrape = plink.scrape(&net.gw).unwrap();
    assert_eq!(
        gateway::Gateway::sample(&scrape, "plink_dataplane_in_sync"),
        1,
        "{scrape}"
    );
    assert!(
        scrape.contains("plink_apply_failures_total 0"),
        "a refusal found by the plan is no failed apply"
    );
}

/// The red-team case of issue 14: flows of an endpoint deleted (or rejected)
/// while the controller was down survived the adopting start.
#[test]
fn an_adopting_start_purges_the_flows_the_config_no_longer_allows() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let dns_a = SocketAddrV4::new(pl::CLIENT, 42001);
    let dns_b = SocketAddrV4::new(pl::CLIENT, 42002);
    servers::udp_request(&net.consumer_a, dns_a, pl::endpoint_udp()).unwrap();
    servers::udp_request(&net.consumer_b, dns_b, pl::endpoint_udp()).unwrap();
    servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), 0).unwrap();
    let before = flows(&plink, &net);
    for name in ["dns-a", "dns-b", "orders-a"] {
        assert!(
            before.iter().any(|f| f["endpoint"] == name),
            "{name} has a flow before the restart: {before:?}"
        );
    }
    let config = std::fs::read_to_string(&plink.config_path).unwrap();
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success(), "SIGTERM exit: {:?}", out.status);

    // While the controller is down: dns-a leaves the config, and orders no
    // longer shows itself to tenant-a (orders-a becomes rejected).
    let edited = config
        .replacen(
            "  - {name: dns-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.53, service: dns}\n",
            "",
            1,
        )
        .replacen(
            "visibility: [tenant-a, tenant-b]\n    auto_approve: [tenant-a]",
            "visibility: [tenant-b]\n    auto_approve: [tenant-b]",
            1,
        );
    assert_ne!(edited, config);
    let gw = net.gw.clone();
    let plink = gateway::start(&mut net.topo, &gw, &edited).unwrap();
    let after = flows(&plink, &net);
    let vnet_a: Vec<_> = after.iter().filter(|f| f["network"] == "vnet-a").collect();
    assert!(
        vnet_a.is_empty(),
        "flows of the deleted dns-a and the rejected orders-a survived the adopting start: {vnet_a:?}"
    );
    assert!(
        after
            .iter()
            .any(|f| f["endpoint"] == "dns-b" && f["client"] == "192.0.2.1:42002"),
        "dns-b's flow is still allowed and was kept: {after:?}"
    );
    // The deleted endpoint's address is no endpoint any more.
    assert!(
        servers::udp_probe(
            &net.consumer_a,
            dns_a,
            pl::endpoint_udp(),
            Duration::from_millis(300)
        )
        .is_err(),
        "dns-a still answers"
    );
}

/// Ids in the pins are the state file's: a start that finds pins with a state
/// file from another dataplane (here: none) refuses, and says what to do.
#[test]
fn pins_and_a_state_file_from_another_dataplane_are_never_combined() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    servers::udp_request(
        &net.consumer_a,
        SocketAddrV4::new(pl::CLIENT, 42003),
        pl::endpoint_udp(),
    )
    .unwrap();
    let config = plink.config_path.clone();
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success());
    let state_dir = net.topo.scratch_dir().unwrap().join("state");
    std::fs::remove_file(state_dir.join("state.json")).unwrap();

    let err = match net.start_plink() {
        Ok(_) => panic!("plink adopted pins with a state file that does not belong to them"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("plink-ctl down") && err.contains("state"),
        "the refusal says what is wrong and what to do: {err}"
    );
    // Forwarding went on meanwhile: the refusal touched nothing.
    servers::udp_request(
        &net.consumer_a,
        SocketAddrV4::new(pl::CLIENT, 42004),
        pl::endpoint_udp(),
    )
    .unwrap();

    // What the message says works: down, then a fresh start.
    let bin = gateway::plink_ctl_bin();
    net.gw
        .exec(
            bin.to_str().unwrap(),
            &["down", "--config", config.to_str().unwrap()],
        )
        .unwrap();
    let plink = net.start_plink().unwrap();
    servers::udp_request(
        &net.consumer_a,
        SocketAddrV4::new(pl::CLIENT, 42005),
        pl::endpoint_udp(),
    )
    .unwrap();
    // A second start with the now matching state adopts.
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success());
    let plink = net.start_plink().unwrap();
    assert!(
        flows(&plink, &net)
            .iter()
            .any(|f| f["client"] == "192.0.2.1:42005"),
        "the matching state adopted the pins and kept the flow"
    );
}

/// One controller per dataplane: a second `run` on the same pins (with its
/// own state directory, socket and metrics address) and a `down` while a
/// controller runs are refused, naming the process that holds the pins.
#[test]
fn a_second_controller_or_down_on_running_pins_is_refused_naming_the_holder() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let pid = net.topo.child_mut(plink.child).id();
    let first = std::fs::read_to_string(&plink.config_path).unwrap();
    let scratch = net.topo.scratch_dir().unwrap().to_owned();
    let second = first
        .replacen(
            &format!("admin_socket: {}/admin.sock", scratch.display()),
            &format!(
                "admin_socket: {}/second.sock\n  metrics: 127.0.0.1:9431",
                scratch.display()
            ),
            1,
        )
        .replacen(
            &format!("state_dir: {}/state", scratch.display()),
            &format!("state_dir: {}/second-state", scratch.display()),
            1,
        );
    assert_ne!(second, first);
    let second_path = scratch.join("second.yaml");
    std::fs::write(&second_path, &second).unwrap();
    let bin = gateway::plink_ctl_bin();
    let bin = bin.to_str().unwrap();
    // Bounded: a controller that is not refused would run until killed.
    let err = net
        .gw
        .exec(
            "timeout",
            &["20", bin, "run", "--config", second_path.to_str().unwrap()],
        )
        .expect_err("a second controller adopted pins another one runs");
    let err = format!("{err:#}");
    assert!(
        err.contains("in use by") && err.contains(&format!("pid {pid}")),
        "the refusal names the holder (pid {pid}): {err}"
    );
    let err = net
        .gw
        .exec(
            bin,
            &["down", "--config", plink.config_path.to_str().unwrap()],
        )
        .expect_err("down removed the pins of a running controller");
    assert!(
        format!("{err:#}").contains(&format!("pid {pid}")),
        "{err:#}"
    );
    // The running controller was left alone.
    servers::udp_request(
        &net.consumer_a,
        SocketAddrV4::new(pl::CLIENT, 42006),
        pl::endpoint_udp(),
    )
    .unwrap();
    plink.ctl(&net.gw, &["status"]).unwrap();
}

/// SIGHUP's default action kills a process: one that arrives while
/// `plink-ctl run` starts must neither kill it nor be lost (the reload runs
/// once the controller is up).
#[test]
fn a_sighup_during_start_up_neither_kills_nor_is_lost() {
    use std::io::{BufRead as _, BufReader};
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let config = pl::config(&net.topo, &pl::Options::default()).unwrap();
    let path = net.topo.scratch_dir().unwrap().join("hup.yaml");
    std::fs::write(&path, &config).unwrap();
    let bin = gateway::plink_ctl_bin();
    let gw = net.gw.clone();
    let index = net
        .topo
        .spawn(
            &gw,
            bin.to_str().unwrap(),
            &["run", "--config", path.to_str().unwrap()],
        )
        .unwrap();
    let child = net.topo.child_mut(index);
    let pid = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim() == "ready" {
                let _ = ready_tx.send(());
            }
        }
    });
    let (log_tx, log_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[plink-ctl] {line}");
            let _ = log_tx.send(line);
        }
    });
    // Mid start-up: the config was read, the programs are being attached.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .expect("plink-ctl never reached the attach step");
        let line = log_rx.recv_timeout(left).expect("plink-ctl log");
        if line.contains("XDP attached") {
            break;
        }
    }
    let edited = config.replacen(
        "endpoints:\n",
        "endpoints:\n  - {name: orders-a2, tenant: tenant-a, network: vnet-a, address: 192.0.2.51, service: orders}\n",
        1,
    );
    std::fs::write(&path, edited).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a SIGHUP during start-up killed plink-ctl");
    let plink = gateway::Gateway {
        config_path: path,
        child: index,
        stderr: log_rx,
    };
    wait_for(
        "the reload asked for during start-up",
        Duration::from_secs(5),
        || {
            let list = plink.ctl(&net.gw, &["endpoints", "list", "--json"])?;
            Ok(list.contains("orders-a2").then_some(()))
        },
    )
    .unwrap();
    let reply = servers::tcp_request(
        &net.consumer_a,
        None,
        SocketAddrV4::new(std::net::Ipv4Addr::new(192, 0, 2, 51), 80),
        0,
    )
    .unwrap();
    assert_eq!(*reply.peer.ip(), pl::ORDERS_NAT);
}

/// Whether `host` resolves `addr` on `dev` by ARP now: its neighbour entry is
/// flushed, one ping makes the kernel ask, and the entry has an address
/// only if someone answered.
fn arp_answered(host: &netns::Host, dev: &str, addr: std::net::Ipv4Addr) -> bool {
    let a = addr.to_string();
    let _ = host.ip(&["neigh", "flush", "to", &a, "dev", dev]);
    // The echo itself is not answered (plink serves no echo on NAT
    // addresses); it only makes the kernel resolve the address.
    let _ = host.exec("ping", &["-c", "1", "-W", "1", &a]);
    host.ip(&["neigh", "show", "to", &a, "dev", dev])
        .is_ok_and(|out| out.contains("lladdr"))
}

/// Issue 14, item 6: a NAT address removed from the config drains: its flow
/// keeps getting replies and the address keeps answering ARP across a
/// controller restart (the adopting start reads it back from the pins),
/// with no new flow on it. Once its last flow expired it is retired: ARP is
/// no longer answered and replies to it are dropped and counted, also after
/// another restart, never passed to the gateway's kernel.
#[test]
fn a_draining_nat_address_keeps_its_flows_across_a_restart_then_retires() {
    netns::require_root_and_tools();
    const DRAINING: std::net::Ipv4Addr = pl::DNS_NAT;
    const NEW_NAT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 203);
    let mut net = PrivateLink::build().unwrap();
    let opts = pl::Options {
        gateway_extra: "  timeouts: {udp: 8s}\n".into(),
        ..Default::default()
    };
    let plink = net.start_plink_with(&opts).unwrap();
    let old_flow = SocketAddrV4::new(pl::CLIENT, 42010);
    let first = servers::udp_request(&net.consumer_a, old_flow, pl::endpoint_udp()).unwrap();
    assert_eq!(*first.peer.ip(), DRAINING);
    let config = std::fs::read_to_string(&plink.config_path).unwrap();
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success(), "SIGTERM exit: {:?}", out.status);

    // While the controller is down, dns's NAT address is replaced.
    let edited = config.replacen(
        "nat: {addresses: [198.51.100.202], ports: 20000-29999}",
        "nat: {addresses: [198.51.100.203], ports: 20000-29999}",
        1,
    );
    assert_ne!(edited, config, "dns's NAT pool was found in the config");
    let gw = net.gw.clone();
    let plink = gateway::start(&mut net.topo, &gw, &edited).unwrap();

    // The old flow keeps its mapping and its replies, and the backend's
    // kernel can still resolve the draining address.
    assert!(
        arp_answered(&net.provider, "eth0", DRAINING),
        "the draining address no longer answers ARP after the restart"
    );
    let again = servers::udp_request(&net.consumer_a, old_flow, pl::endpoint_udp()).unwrap();
    assert_eq!(
        again.peer, first.peer,
        "the flow lost its NAT mapping on the draining address"
    );
    let fresh = servers::udp_request(
        &net.consumer_a,
        SocketAddrV4::new(pl::CLIENT, 42011),
        pl::endpoint_udp(),
    )
    .unwrap();
    assert_eq!(
        *fresh.peer.ip(),
        NEW_NAT,
        "a new flow went to the draining address"
    );

    // A reload changes nothing of that.
    plink.ctl(&net.gw, &["reload"]).unwrap();
    let again = servers::udp_request(&net.consumer_a, old_flow, pl::endpoint_udp()).unwrap();
    assert_eq!(
        again.peer, first.peer,
        "the reload dropped the draining address"
    );

    // Its last flow expires: the address is retired.
    let nat = format!("{}", first.peer);
    wait_for(
        "the draining flow to expire",
        Duration::from_secs(30),
        || Ok((!flows(&plink, &net).iter().any(|f| f["nat"] == nat.as_str())).then_some(())),
    )
    .unwrap();
    wait_for(
        "the drained address to stop answering ARP",
        Duration::from_secs(15),
        || Ok((!arp_answered(&net.provider, "eth0", DRAINING)).then_some(())),
    )
    .unwrap();

    // A late reply to it (the backend's kernel still knows the gateway's
    // MAC) is dropped and counted, not handed to the gateway's kernel.
    let mac = net.gw.mac("p0").unwrap();
    net.provider
        .neigh_permanent("198.51.100.202", mac, "eth0")
        .unwrap();
    let late = |plink: &gateway::Gateway| {
        let before =
            gateway::Gateway::drops(&plink.scrape(&net.gw).unwrap(), "nat_address_retired");
        let to = std::net::SocketAddr::V4(first.peer);
        wait_for(
            "a late reply to be dropped as retired",
            Duration::from_secs(5),
            || {
                net.provider
                    .run_in(move || {
                        let s = std::net::UdpSocket::bind("198.51.100.20:5454")?;
                        s.send_to(b"late\n", to)
                    })
                    .unwrap()
                    .unwrap();
                let now =
                    gateway::Gateway::drops(&plink.scrape(&net.gw).unwrap(), "nat_address_retired");
                Ok((now > before).then_some(()))
            },
        )
        .unwrap();
    };
    late(&plink);

    // Retired survives a restart too (read back from NAT_ADDRS).
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success(), "SIGTERM exit: {:?}", out.status);
    let plink = gateway::start(&mut net.topo, &gw, &edited).unwrap();
    late(&plink);
    net.provider
        .ip(&["neigh", "del", "198.51.100.202", "dev", "eth0"])
        .unwrap();
    assert!(
        !arp_answered(&net.provider, "eth0", DRAINING),
        "a retired address answers ARP after a restart"
    );
}
