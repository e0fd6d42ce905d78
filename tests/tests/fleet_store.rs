//! The fleet's shared store, end to end with a real etcd (Debian
//! `etcd-server`) on the loopback of a test namespace: an approval on one
//! node is applied by the others within a second; with etcd stopped the
//! nodes keep their last decisions and say the store is down; after a
//! restart they converge; a node joining late converges; etcd unreachable
//! at start is a clear error.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use plink_ctl::{
    approval::{Action, ConnectionState},
    config::Config,
    controller::Controller,
};
use plink_tests::netns::{Host, Topology, require_root_and_tools, wait_for};

const CLIENT: &str = "http://127.0.0.1:23790";

fn config(state_dir: &Path, client: &str) -> String {
    format!(
        "\
gateway:
  state_dir: {state}
interfaces:
  - {{name: c1, role: consumer, network: vnet-a}}
  - {{name: c2, role: consumer, network: vnet-b}}
  - {{name: p0, role: provider}}
services:
  - name: orders
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: 198.51.100.10}}, {{address: 198.51.100.11, weight: 2}}, {{address: 198.51.100.12}}]
    nat: {{ports: 1024-65535}}
    visibility: ['*']
endpoints:
  - {{name: orders-a, tenant: t-a, network: vnet-a, address: 192.0.2.50, service: orders}}
  - {{name: orders-b, tenant: t-b, network: vnet-b, address: 192.0.2.50, service: orders}}
fleet:
  etcd: {{endpoints: ['{client}'], prefix: /plink/test, timeout: 1s}}
  nodes:
    - name: gw1
      nat: [{{service: orders, addresses: [198.51.100.201]}}]
    - name: gw2
      nat: [{{service: orders, addresses: [198.51.100.202]}}]
    - name: gw3
      nat: [{{service: orders, addresses: [198.51.100.203]}}]
",
        state = state_dir.display()
    )
}

fn lock(c: &Mutex<Controller>) -> std::sync::MutexGuard<'_, Controller> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// A node as `plink-ctl run` drives it, without a dataplane: the
/// controller and a thread applying what the other nodes wrote.
fn node(scratch: &Path, name: &str, client: &str) -> anyhow::Result<Arc<Mutex<Controller>>> {
    let dir = scratch.join(name);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("plink.yaml");
    std::fs::write(&path, config(&dir.join("state"), client))?;
    let cfg = Config::load_node(&path, Some(name))?;
    let mut c = Controller::with_config(&path, cfg)?;
    let mut updates = c.take_shared_updates().expect("a fleet store");
    let c = Arc::new(Mutex::new(c));
    let follower = c.clone();
    std::thread::spawn(move || {
        while let Some(u) = updates.blocking_recv() {
            if let Err(e) = lock(&follower).apply_shared(u) {
                eprintln!("apply_shared: {e}");
            }
        }
    });
    Ok(c)
}

fn state_of(c: &Mutex<Controller>, endpoint: &str) -> Option<ConnectionState> {
    lock(c).model().endpoint_by_name(endpoint).map(|e| e.state)
}

fn store_up(c: &Mutex<Controller>) -> bool {
    lock(c).status().fleet.map(|f| f.store_up).unwrap_or(false)
}

/// The ids every node must agree on (they key the flow hash and the maps).
fn ids(c: &Mutex<Controller>) -> String {
    let m = lock(c).model();
    let mut out = format!("{:?}", m.networks);
    for s in m.services.values() {
        out += &format!(" {}={:?}", s.name, s.id);
        for b in &s.backends {
            out += &format!(" {}={:?}", b.address, b.id);
        }
    }
    for e in m.endpoints.values() {
        out += &format!(" {}={:?}", e.name, e.id);
    }
    out
}

fn start_etcd(topo: &mut Topology, host: &Host, data: &Path) -> anyhow::Result<usize> {
    if which("etcd").is_none() {
        panic!("etcd is not installed: run `cargo xtask setup` (Debian package etcd-server)");
    }
    let data = data.display().to_string();
    topo.spawn(
        host,
        "etcd",
        &[
            "--name",
            "t",
            "--data-dir",
            &data,
            "--listen-client-urls",
            CLIENT,
            "--advertise-client-urls",
            CLIENT,
            "--listen-peer-urls",
            "http://127.0.0.1:23800",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:23800",
            "--initial-cluster",
            "t=http://127.0.0.1:23800",
            "--log-level",
            "error",
        ],
    )
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.exists())
    })
}

fn etcd_answers(host: &Host) -> bool {
    host.exec("etcdctl", &["--endpoints", CLIENT, "endpoint", "health"])
        .is_ok()
}

#[test]
fn decisions_are_shared_through_etcd() -> anyhow::Result<()> {
    require_root_and_tools();
    let mut topo = Topology::new()?;
    let host = topo.host("etcd")?;
    let scratch = topo.scratch_dir()?.to_owned();
    let data = scratch.join("etcd-data");
    let etcd = start_etcd(&mut topo, &host, &data)?;
    wait_for("etcd to answer", Duration::from_secs(10), || {
        Ok(etcd_answers(&host).then_some(()))
    })?;

    // Etcd listens on the namespace's loopback: the nodes run on threads
    // that joined it (threads they start inherit it).
    let s = scratch.clone();
    let (a, b) = host.run_in(move || -> anyhow::Result<_> {
        Ok((node(&s, "gw1", CLIENT)?, node(&s, "gw2", CLIENT)?))
    })??;
    assert_eq!(ids(&a), ids(&b), "both nodes run the same ids");
    assert_eq!(state_of(&b, "orders-a"), Some(ConnectionState::Pending));
    assert!(store_up(&a) && store_up(&b));

    // Approve on A; B applies it (measured).
    let t0 = Instant::now();
    lock(&a).act("orders-a", Action::Approve)?;
    wait_for(
        "node gw2 to apply the approval",
        Duration::from_secs(1),
        || Ok((state_of(&b, "orders-a") == Some(ConnectionState::Approved)).then_some(())),
    )?;
    println!(
        "fleet store: approval on gw1 applied by gw2 after {:?}",
        t0.elapsed()
    );

    // Decisions made on both nodes at the same time all land: a write
    // that lost the race (the document moved) is judged again on the newer
    // document and retried.
    let (a2, b2) = (a.clone(), b.clone());
    let ta = std::thread::spawn(move || lock(&a2).act("orders-b", Action::Approve).map(|_| ()));
    let tb = std::thread::spawn(move || lock(&b2).act("orders-a", Action::Reject).map(|_| ()));
    ta.join().expect("thread")?;
    tb.join().expect("thread")?;
    wait_for(
        "both concurrent decisions on both nodes",
        Duration::from_secs(1),
        || {
            let both = |c: &Mutex<Controller>| {
                state_of(c, "orders-b") == Some(ConnectionState::Approved)
                    && state_of(c, "orders-a") == Some(ConnectionState::Rejected)
            };
            Ok((both(&a) && both(&b)).then_some(()))
        },
    )?;
    lock(&a).act("orders-a", Action::Approve)?;
    lock(&a).act("orders-b", Action::Reject)?;
    wait_for("gw2 to follow", Duration::from_secs(1), || {
        Ok((state_of(&b, "orders-a") == Some(ConnectionState::Approved)
            && state_of(&b, "orders-b") == Some(ConnectionState::Rejected))
        .then_some(()))
    })?;

    // Stop etcd: both keep their last decisions and say the store is down.
    let stopped = Instant::now();
    topo.stop(etcd)?;
    wait_for(
        "both nodes to see the store down",
        Duration::from_secs(5),
        || Ok((!store_up(&a) && !store_up(&b)).then_some(())),
    )?;
    println!(
        "fleet store: both nodes reported the store down after {:?}",
        stopped.elapsed()
    );
    assert_eq!(state_of(&a, "orders-a"), Some(ConnectionState::Approved));
    assert_eq!(state_of(&b, "orders-a"), Some(ConnectionState::Approved));
    let refused = lock(&b).act("orders-b", Action::Approve);
    let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        why.contains("does not answer"),
        "approve with the store down: {why:?}"
    );
    assert_eq!(state_of(&b, "orders-b"), Some(ConnectionState::Rejected));
    assert_eq!(
        lock(&b).status().fleet.map(|f| f.store_up),
        Some(false),
        "status says the store is down"
    );

    // Restart etcd (same data): both see it up, and a decision converges.
    let _etcd = start_etcd(&mut topo, &host, &data)?;
    wait_for(
        "both nodes to see the store up",
        Duration::from_secs(10),
        || Ok((store_up(&a) && store_up(&b)).then_some(())),
    )?;
    let t0 = Instant::now();
    lock(&b).act("orders-b", Action::Approve)?;
    lock(&b).act("orders-a", Action::Reject)?;
    wait_for(
        "node gw1 to converge after the restart",
        Duration::from_secs(1),
        || {
            Ok((state_of(&a, "orders-b") == Some(ConnectionState::Approved)
                && state_of(&a, "orders-a") == Some(ConnectionState::Rejected))
            .then_some(()))
        },
    )?;
    println!(
        "fleet store: after the restart, gw2's decisions reached gw1 in {:?}",
        t0.elapsed()
    );

    // A node joining later starts with the fleet's decisions and ids.
    let s = scratch.clone();
    let c = host.run_in(move || node(&s, "gw3", CLIENT))??;
    assert_eq!(state_of(&c, "orders-a"), Some(ConnectionState::Rejected));
    assert_eq!(state_of(&c, "orders-b"), Some(ConnectionState::Approved));
    assert_eq!(ids(&c), ids(&a), "the late joiner runs the same ids");
    Ok(())
}

#[test]
fn etcd_unreachable_at_start_is_a_clear_error() -> anyhow::Result<()> {
    require_root_and_tools();
    let mut topo = Topology::new()?;
    let host = topo.host("noetcd")?;
    let scratch = topo.scratch_dir()?.to_owned();
    let t0 = Instant::now();
    let r = host.run_in(move || node(&scratch, "gw1", CLIENT).map(|_| ()))?;
    let why = format!("{:#}", r.expect_err("a start without etcd must fail"));
    assert!(
        why.contains("does not answer") && why.contains("127.0.0.1:23790"),
        "{why}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "refused within the timeout"
    );
    Ok(())
}

/// Two `plink-ctl run` gateways (each in its own namespaces, with a
/// management link to the etcd namespace's bridge) running one config with
/// their own node sections: `endpoints approve` on gw1 is applied by gw2
/// within a second; with etcd stopped gw2's `status` and `/metrics` say the
/// store is down while it keeps the approval; after a restart it is up again.
#[test]
fn two_gateways_share_an_approval_through_etcd() -> anyhow::Result<()> {
    use plink_tests::gateway::{self, Gateway};
    require_root_and_tools();
    let mut store_topo = Topology::new()?;
    let etcd_host = store_topo.host("etcd")?;
    etcd_host.ip(&["link", "add", "br0", "type", "bridge"])?;
    etcd_host.ip(&["addr", "add", "203.0.113.1/24", "dev", "br0"])?;
    etcd_host.ip(&["link", "set", "br0", "up"])?;
    let data = store_topo.scratch_dir()?.join("etcd-data");
    let client = "http://203.0.113.1:23790";
    let spawn_etcd = |topo: &mut Topology| -> anyhow::Result<usize> {
        let data = data.display().to_string();
        topo.spawn(
            &etcd_host,
            "etcd",
            &[
                "--name",
                "t",
                "--data-dir",
                &data,
                "--listen-client-urls",
                "http://203.0.113.1:23790",
                "--advertise-client-urls",
                "http://203.0.113.1:23790",
                "--listen-peer-urls",
                "http://127.0.0.1:23800",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:23800",
                "--initial-cluster",
                "t=http://127.0.0.1:23800",
                "--log-level",
                "error",
            ],
        )
    };
    if which("etcd").is_none() {
        panic!("etcd is not installed: run `cargo xtask setup` (Debian package etcd-server)");
    }
    let etcd = spawn_etcd(&mut store_topo)?;
    wait_for("etcd to answer", Duration::from_secs(10), || {
        Ok(etcd_host
            .exec("etcdctl", &["--endpoints", client, "endpoint", "health"])
            .is_ok()
            .then_some(()))
    })?;

    let shared = |gateway_section: &str| {
        format!(
            "{gateway_section}\
interfaces:
  - {{name: c1, role: consumer, network: vnet-a}}
  - {{name: p0, role: provider}}
services:
  - name: orders
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: 198.51.100.10}}, {{address: 198.51.100.11}}]
    nat: {{ports: 1024-65535}}
    visibility: ['*']
endpoints:
  - {{name: orders-a, tenant: t-a, network: vnet-a, address: 192.0.2.50, service: orders}}
fleet:
  etcd: {{endpoints: ['{client}'], prefix: /plink/e2e, timeout: 1s}}
  nodes:
    - name: gw1
      nat: [{{service: orders, addresses: [198.51.100.201]}}]
    - name: gw2
      nat: [{{service: orders, addresses: [198.51.100.202]}}]
"
        )
    };
    let mut nodes: Vec<(Topology, Host, Gateway)> = Vec::new();
    for (i, name) in ["gw1", "gw2"].into_iter().enumerate() {
        let mut topo = Topology::new()?;
        let gw = topo.host("gw")?;
        let cn = topo.host("cn")?;
        let pv = topo.host("pv")?;
        topo.link(&gw, "c1", &cn, "eth0")?;
        topo.link(&gw, "p0", &pv, "eth0")?;
        let m = format!("m{i}");
        topo.link(&gw, "m0", &etcd_host, &m)?;
        etcd_host.ip(&["link", "set", &m, "master", "br0"])?;
        gw.ip(&[
            "addr",
            "add",
            &format!("203.0.113.{}/24", 11 + i),
            "dev",
            "m0",
        ])?;
        gw.ip(&["addr", "add", "198.51.100.254/24", "dev", "p0"])?;
        gw.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        gw.sysctl("net.ipv4.conf.c1.forwarding", "0")?;
        let yaml = shared(&gateway::gateway_section(&topo)?);
        let g = gateway::start_with_args(&mut topo, &gw, &yaml, &["--node", name])?;
        nodes.push((topo, gw, g));
    }
    let state = |n: &(Topology, Host, Gateway)| -> anyhow::Result<String> {
        n.2.ctl(&n.1, &["endpoints", "list"])
    };
    assert!(
        state(&nodes[1])?.contains("pending"),
        "{}",
        state(&nodes[1])?
    );

    let t0 = Instant::now();
    nodes[0]
        .2
        .ctl(&nodes[0].1, &["endpoints", "approve", "orders-a"])?;
    wait_for(
        "gw2 to apply gw1's approval",
        Duration::from_secs(1),
        || Ok(state(&nodes[1])?.contains("approved").then_some(())),
    )?;
    println!(
        "fleet (plink-ctl run): approval on gw1 listed as approved on gw2 after {:?}",
        t0.elapsed()
    );
    let scrape = nodes[1].2.scrape(&nodes[1].1)?;
    assert_eq!(
        Gateway::sample(&scrape, "plink_fleet_store_up"),
        1,
        "{scrape}"
    );

    store_topo.stop(etcd)?;
    wait_for(
        "gw2's status to say the store is down",
        Duration::from_secs(5),
        || {
            Ok(nodes[1]
                .2
                .ctl(&nodes[1].1, &["status"])?
                .contains("DOWN")
                .then_some(()))
        },
    )?;
    let scrape = nodes[1].2.scrape(&nodes[1].1)?;
    assert!(scrape.contains("plink_fleet_store_up 0"), "{scrape}");
    assert!(
        state(&nodes[1])?.contains("approved"),
        "gw2 keeps the last decision"
    );
    let refused = nodes[1]
        .2
        .ctl(&nodes[1].1, &["endpoints", "reject", "orders-a"]);
    assert!(
        refused.is_err(),
        "a decision with the store down is refused"
    );

    let _etcd = spawn_etcd(&mut store_topo)?;
    wait_for(
        "gw2 to see the store up again",
        Duration::from_secs(10),
        || {
            let s = nodes[1].2.scrape(&nodes[1].1)?;
            Ok(s.contains("plink_fleet_store_up 1").then_some(()))
        },
    )?;
    // The first write after a restart may still find etcd settling: an
    // operator retries a refused command, and so does the test (measured).
    let t0 = Instant::now();
    wait_for(
        "gw2 to take a decision again",
        Duration::from_secs(10),
        || {
            Ok(nodes[1]
                .2
                .ctl(&nodes[1].1, &["endpoints", "reject", "orders-a"])
                .ok())
        },
    )?;
    println!(
        "fleet (plink-ctl run): after the restart gw2 took a decision after {:?}",
        t0.elapsed()
    );
    wait_for(
        "gw1 to apply gw2's rejection",
        Duration::from_secs(1),
        || Ok(state(&nodes[0])?.contains("rejected").then_some(())),
    )?;
    // Gateways stop before etcd's namespace goes.
    drop(nodes);
    Ok(())
}
