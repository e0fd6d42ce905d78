//! A fleet of plink gateways behind a consumer router doing L4-hash ECMP,
//! announced by FRR (bgpd + bfdd, 100 ms × 3 BFD): the topology of
//! docs/FLEET.md, used by `tests/tests/fleet.rs` and `cargo xtask fleet`.
//!
//! ```text
//!  cl 203.0.113.10 ─ rt ─┬─ cN 192.0.2.(8N+1)/29 ── c1 gwN (next hop 192.0.2.(8N+2), ARP by XDP)
//!   (clients)      (FRR) └─ mN 192.0.2.(64+8N+1)/29 ── m0 gwN 192.0.2.(64+8N+2) (BGP+BFD, FRR)
//!                                         gwN p0 198.51.100.(240+N) ── br0 pv: backends .10 .11
//! ```
//!
//! The endpoint 192.0.2.100:80 is `orders`; gateway N source-NATs to
//! 198.51.100.(200+N), so replies return to the node that holds the flow.
//! The peering runs on the `m0` link: the consumer link `c1` keeps the
//! forwarding contract (no address, nothing passed to the kernel).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    gateway::{self, Gateway},
    netns::{Host, Topology, sh, wait_for},
};

pub const ENDPOINT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const BACKENDS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 10),
    Ipv4Addr::new(198, 51, 100, 11),
];
/// The metric of plink's routes on each gateway (FRR's route-map matches it).
pub const METRIC: u32 = 4242;
/// The router's table for the helper's resilient route.
const HELPER_TABLE: u32 = 200;
/// The helper's nexthop ids, far from zebra's (which counts up from 1).
const HELPER_NH_BASE: u32 = 90_000;
const HELPER_GROUP: u32 = 90_100;
const FRR: &str = "/usr/lib/frr";

/// One gateway's addresses.
#[derive(Clone, Copy, Debug)]
pub struct Node {
    pub n: u8,
}

impl Node {
    pub fn name(&self) -> String {
        format!("gw{}", self.n)
    }
    /// The router's address on the consumer link.
    pub fn router_consumer(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 8 * self.n + 1)
    }
    /// The node's next hop on the consumer link (answered by XDP).
    pub fn next_hop(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 8 * self.n + 2)
    }
    pub fn router_peering(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 64 + 8 * self.n + 1)
    }
    pub fn peering(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 64 + 8 * self.n + 2)
    }
    pub fn nat(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 200 + self.n)
    }
    pub fn provider(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 240 + self.n)
    }
}

/// Fails with what to install when FRR is missing.
pub fn require_frr() {
    for d in ["zebra", "bgpd", "bfdd"] {
        assert!(
            Path::new(FRR).join(d).exists(),
            "{FRR}/{d} is missing: the fleet tests need FRR (`cargo xtask setup` installs Debian `frr`)"
        );
    }
    assert!(
        std::process::Command::new("which")
            .arg("vtysh")
            .output()
            .is_ok_and(|o| o.status.success()),
        "vtysh is missing: `cargo xtask setup` installs Debian `frr`"
    );
}

const BFD_PROFILE: &str = "bfd
 profile fast
  detect-multiplier 3
  receive-interval 100
  transmit-interval 100
";

/// One FRR instance (zebra, bgpd, bfdd) with paths of its own.
pub struct Frr {
    pub dir: PathBuf,
    pub children: Vec<usize>,
}

impl Frr {
    /// Starts zebra, bfdd and bgpd in `host` with `config`. Each daemon has
    /// its own pid file, vty and zserv sockets, and a private `/var/tmp`
    /// (FRR 8.4 writes `/var/tmp/frr` itself).
    pub fn start(
        topo: &mut Topology,
        host: &Host,
        name: &str,
        config: &str,
    ) -> anyhow::Result<Frr> {
        let dir = topo.scratch_dir()?.join(format!("frr-{name}"));
        std::fs::create_dir_all(dir.join("vartmp"))?;
        std::fs::write(dir.join("frr.conf"), config)?;
        sh("chown", &["-R", "frr:frr", dir.to_str().context("path")?])?;
        let d = dir.display().to_string();
        let mut children = Vec::new();
        for daemon in ["zebra", "bfdd", "bgpd"] {
            let extra = if daemon == "bfdd" {
                format!("--bfdctl {d}/bfdd.sock")
            } else {
                String::new()
            };
            let script = format!(
                "mount --bind {d}/vartmp /var/tmp && exec {FRR}/{daemon} -f {d}/frr.conf -i {d}/{daemon}.pid --vty_socket {d} -z {d}/zserv.api {extra} --log file:{d}/{daemon}.log"
            );
            children.push(topo.spawn(host, "unshare", &["-m", "sh", "-c", &script])?);
            if daemon == "zebra" {
                let sock = dir.join("zserv.api");
                wait_for("zebra's socket", Duration::from_secs(10), || {
                    Ok(sock.exists().then_some(()))
                })?;
            }
        }
        Ok(Frr { dir, children })
    }

    /// Runs `vtysh -c CMD` against this instance.
    pub fn vtysh(&self, cmd: &str) -> anyhow::Result<String> {
        let out = sh(
            "vtysh",
            &[
                "--vty_socket",
                self.dir.to_str().context("path")?,
                "-c",
                cmd,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn vtysh_json(&self, cmd: &str) -> anyhow::Result<serde_json::Value> {
        let text = self.vtysh(cmd)?;
        serde_json::from_str(&text).with_context(|| format!("vtysh {cmd}: {text}"))
    }
}

/// The router's FRR config: one eBGP peer per gateway with fast BFD,
/// multipath over all of them.
pub fn router_frr_config(nodes: &[Node]) -> String {
    let mut c = format!(
        "frr defaults datacenter\nhostname router\n{BFD_PROFILE}router bgp 65000\n bgp router-id 192.0.2.73\n no bgp ebgp-requires-policy\n neighbor gws peer-group\n neighbor gws remote-as 65001\n neighbor gws bfd profile fast\n neighbor gws timers connect 1\n"
    );
    for n in nodes {
        c.push_str(&format!(" neighbor {} peer-group gws\n", n.peering()));
    }
    c.push_str(" address-family ipv4 unicast\n  maximum-paths 8\n exit-address-family\nexit\n");
    c
}

/// A gateway's FRR config: redistribute plink's routes (the kernel routes
/// with plink's metric), announced with the node's next hop on the
/// consumer link. The same text as docs/FLEET.md's example.
pub fn gateway_frr_config(node: Node) -> String {
    format!(
        "frr defaults datacenter\nhostname {name}\n{BFD_PROFILE}route-map plink-routes permit 10\n match metric {METRIC}\nexit\nroute-map plink-next-hop permit 10\n set ip next-hop {nh}\n set metric 0\nexit\nrouter bgp 65001\n bgp router-id {id}\n no bgp ebgp-requires-policy\n neighbor {peer} remote-as 65000\n neighbor {peer} bfd profile fast\n neighbor {peer} timers connect 1\n address-family ipv4 unicast\n  redistribute kernel route-map plink-routes\n  neighbor {peer} route-map plink-next-hop out\n exit-address-family\nexit\n",
        name = node.name(),
        nh = node.next_hop(),
        id = node.peering(),
        peer = node.router_peering(),
    )
}

/// plink's config on one node: the shared services, endpoints and fleet
/// section (every node's NAT address and next hop), with this node's own
/// paths (the nodes share one machine here). Started with `--node gwN`.
pub fn plink_config(topo: &Topology, node: Node, all: &[Node]) -> anyhow::Result<String> {
    let scratch = topo.scratch_dir()?.join(node.name());
    std::fs::create_dir_all(&scratch)?;
    let mut nodes = String::new();
    for n in all {
        nodes.push_str(&format!(
            "    - name: {name}\n      routing: {{router_id: {id}, next_hop: {nh}}}\n      nat:\n        - {{service: orders, addresses: [{nat}]}}\n",
            name = n.name(),
            id = n.peering(),
            nh = n.next_hop(),
            nat = n.nat(),
        ));
    }
    Ok(format!(
        "gateway:
  bpffs_root: {bpf}/{name}
  admin_socket: {s}/admin.sock
  state_dir: {s}/state
interfaces:
  - {{name: c1, role: consumer, network: vnet-a}}
  - {{name: p0, role: provider}}
announce: {{metric: {METRIC}}}
services:
  - name: orders
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: 198.51.100.10}}, {{address: 198.51.100.11}}]
    nat: {{ports: 20000-29999}}
    visibility: ['*']
    auto_approve: ['*']
endpoints:
  - {{name: orders-a, tenant: tenant-a, network: vnet-a, address: {ENDPOINT}, service: orders}}
fleet:
  nodes:
{nodes}",
        bpf = topo.bpffs_root().display(),
        name = node.name(),
        s = scratch.display(),
    ))
}

/// How the router spreads flows over the gateways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterMode {
    /// FRR's own ECMP route (Linux hash-threshold multipath).
    HashThreshold,
    /// A kernel resilient nexthop group managed by [`ResilientHelper`] from
    /// FRR's view of which gateways are up and which announce.
    Resilient,
}

pub struct GatewayNode {
    pub node: Node,
    pub host: Host,
    pub plink: Option<Gateway>,
    pub frr: Option<Frr>,
}

pub struct Fleet {
    pub topo: Topology,
    pub router: Host,
    pub client: Host,
    pub provider: Host,
    pub nodes: Vec<GatewayNode>,
    pub router_frr: Frr,
    pub echo: EchoServers,
    pub helper: Option<ResilientHelper>,
}

impl Fleet {
    /// Builds the topology and starts every gateway (plink + FRR) and the
    /// router's FRR; returns once the router has a path through each.
    pub fn start(gateways: u8, mode: RouterMode) -> anyhow::Result<Fleet> {
        require_frr();
        let mut topo = Topology::new()?;
        let router = topo.host("rt")?;
        let client = topo.host("cl")?;
        let provider = topo.host("pv")?;
        let nodes: Vec<Node> = (1..=gateways).map(|n| Node { n }).collect();

        topo.link(&client, "eth0", &router, "cl")?;
        client.ip(&["addr", "add", "203.0.113.10/24", "dev", "eth0"])?;
        client.ip(&["route", "add", "default", "via", "203.0.113.1"])?;
        router.ip(&["addr", "add", "203.0.113.1/24", "dev", "cl"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        provider.ip(&["link", "add", "br0", "type", "bridge"])?;
        provider.ip(&["link", "set", "br0", "up"])?;
        for b in BACKENDS {
            provider.ip(&["addr", "add", &format!("{b}/24"), "dev", "br0"])?;
        }

        let mut gws = Vec::new();
        for node in &nodes {
            let host = topo.host(&node.name())?;
            let (cr, mr, pp) = (
                format!("c{}", node.n),
                format!("m{}", node.n),
                format!("p{}", node.n),
            );
            topo.link(&router, &cr, &host, "c1")?;
            topo.link(&router, &mr, &host, "m0")?;
            topo.link(&provider, &pp, &host, "p0")?;
            provider.ip(&["link", "set", &pp, "master", "br0"])?;
            router.ip(&[
                "addr",
                "add",
                &format!("{}/29", node.router_consumer()),
                "dev",
                &cr,
            ])?;
            router.ip(&[
                "addr",
                "add",
                &format!("{}/29", node.router_peering()),
                "dev",
                &mr,
            ])?;
            host.ip(&[
                "addr",
                "add",
                &format!("{}/29", node.peering()),
                "dev",
                "m0",
            ])?;
            host.ip(&[
                "addr",
                "add",
                &format!("{}/24", node.provider()),
                "dev",
                "p0",
            ])?;
            host.sysctl("net.ipv4.conf.all.forwarding", "1")?;
            host.sysctl("net.ipv4.conf.c1.forwarding", "0")?;
            host.sysctl("net.ipv4.conf.m0.forwarding", "0")?;
            // XDP answers (ARP) and redirects reach the far ends (SPEC §7).
            topo.enable_napi(&router, &cr)?;
            topo.enable_napi(&provider, &pp)?;
            gws.push(GatewayNode {
                node: *node,
                host,
                plink: None,
                frr: None,
            });
        }
        let echo = EchoServers::start(&provider)?;
        let router_frr = Frr::start(&mut topo, &router, "router", &router_frr_config(&nodes))?;
        let mut fleet = Fleet {
            topo,
            router,
            client,
            provider,
            nodes: gws,
            router_frr,
            echo,
            helper: None,
        };
        for i in 0..fleet.nodes.len() {
            fleet.start_node(i)?;
        }
        fleet.wait_paths(gateways as usize, Duration::from_secs(30))?;
        if mode == RouterMode::Resilient {
            fleet.helper = Some(ResilientHelper::start(&fleet)?);
            let helper = fleet.helper.as_ref().context("helper")?;
            wait_for("the resilient group", Duration::from_secs(10), || {
                Ok((helper.members() == gateways as usize).then_some(()))
            })?;
        }
        Ok(fleet)
    }

    /// Starts plink and FRR on node `i`.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.nodes[i].node;
        let host = self.nodes[i].host.clone();
        let all: Vec<Node> = self.nodes.iter().map(|g| g.node).collect();
        let cfg = plink_config(&self.topo, node, &all)?;
        let plink =
            gateway::start_with_args(&mut self.topo, &host, &cfg, &["--node", &node.name()])
                .with_context(|| format!("starting plink on {}", node.name()))?;
        let frr = Frr::start(
            &mut self.topo,
            &host,
            &node.name(),
            &gateway_frr_config(node),
        )?;
        self.nodes[i].plink = Some(plink);
        self.nodes[i].frr = Some(frr);
        Ok(())
    }

    /// Takes node `i` down as a host failure would: FRR is frozen
    /// (SIGSTOP: no BGP notification, no TCP FIN, only BFD can tell), plink
    /// is killed and its XDP programs detached (nothing forwards); once the
    /// router has withdrawn the node, FRR is killed too.
    pub fn kill_node(&mut self, i: usize) -> anyhow::Result<()> {
        let frr = self.nodes[i].frr.take().context("node not running")?;
        let plink = self.nodes[i].plink.take().context("node not running")?;
        for c in &frr.children {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(self.topo.child_mut(*c).id() as i32, libc::SIGSTOP) };
        }
        let _ = self.topo.child_mut(plink.child).kill();
        let _ = self.topo.child_mut(plink.child).wait();
        // The XDP programs outlive the controller: detach them as a dead
        // host would be (no forwarding).
        plink.ctl(&self.nodes[i].host, &["down"])?;
        let hop = self.nodes[i].node.next_hop();
        let gone = wait_for(
            "the router to withdraw the node",
            Duration::from_secs(5),
            || Ok((!self.paths()?.contains(&hop)).then_some(())),
        );
        for c in &frr.children {
            let _ = self.topo.child_mut(*c).kill();
            let _ = self.topo.child_mut(*c).wait();
        }
        gone
    }

    /// The gateways whose path the router's FRR route has now.
    pub fn paths(&self) -> anyhow::Result<Vec<Ipv4Addr>> {
        let v = self
            .router_frr
            .vtysh_json(&format!("show ip route {ENDPOINT}/32 json"))?;
        let mut out = Vec::new();
        if let Some(routes) = v.get(format!("{ENDPOINT}/32")).and_then(|r| r.as_array()) {
            for r in routes {
                for nh in r
                    .get("nexthops")
                    .and_then(|n| n.as_array())
                    .into_iter()
                    .flatten()
                {
                    if let Some(ip) = nh.get("ip").and_then(|i| i.as_str())
                        && nh.get("active").and_then(|a| a.as_bool()) == Some(true)
                    {
                        out.push(ip.parse()?);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn wait_paths(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        wait_for(&format!("{n} paths to {ENDPOINT}"), timeout, || {
            Ok((self.paths()?.len() == n).then_some(()))
        })
        .map_err(|e| {
            let mut why = format!(
                "{e:#}\nrouter: {}",
                self.router_frr
                    .vtysh("show bgp summary")
                    .unwrap_or_default()
            );
            why.push_str(&self.router_frr.vtysh("show ip route").unwrap_or_default());
            for g in &self.nodes {
                if let Some(frr) = &g.frr {
                    why.push_str(&format!(
                        "\n{}: {}",
                        g.node.name(),
                        frr.vtysh("show ip route").unwrap_or_default()
                    ));
                    why.push_str(&frr.vtysh("show bgp ipv4 unicast").unwrap_or_default());
                }
            }
            anyhow!(why)
        })
    }

    /// The node whose NAT address is `nat`.
    pub fn owner_of(&self, nat: Ipv4Addr) -> Option<u8> {
        self.nodes
            .iter()
            .find(|g| g.node.nat() == nat)
            .map(|g| g.node.n)
    }
}

// ---------------------------------------------------------------- helper

/// The router-side helper: FRR decides which gateways are alive (BGP
/// session up, kept by BFD) and which announce the endpoint; the helper
/// mirrors that into a kernel resilient nexthop group (which FRR 8.4 cannot
/// install for BGP routes), so that a gateway leaving moves only its own
/// buckets. A gateway whose session is up but which withdrew (a drain)
/// stays in the group with the smallest weight: its busy buckets keep
/// their flows, idle ones move (idle timer 1 s).
pub struct ResilientHelper {
    stop: Arc<AtomicBool>,
    members: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl ResilientHelper {
    pub fn start(fleet: &Fleet) -> anyhow::Result<ResilientHelper> {
        let router = fleet.router.clone();
        let frr_dir = fleet.router_frr.dir.clone();
        let nodes: Vec<Node> = fleet.nodes.iter().map(|g| g.node).collect();
        for n in &nodes {
            router.ip(&[
                "nexthop",
                "replace",
                "id",
                &(HELPER_NH_BASE + u32::from(n.n)).to_string(),
                "via",
                &n.next_hop().to_string(),
                "dev",
                &format!("c{}", n.n),
            ])?;
        }
        router.ip(&[
            "rule",
            "add",
            "pref",
            "100",
            "to",
            &format!("{ENDPOINT}/32"),
            "lookup",
            &HELPER_TABLE.to_string(),
        ])?;
        let stop = Arc::new(AtomicBool::new(false));
        let members = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), members.clone());
        let handle = std::thread::spawn(move || {
            let frr = Frr {
                dir: frr_dir,
                children: Vec::new(),
            };
            let mut last: Option<Vec<(u8, u32)>> = None;
            while !s.load(Ordering::SeqCst) {
                if let Ok(want) = helper_view(&frr, &nodes)
                    && last.as_ref() != Some(&want)
                    && helper_apply(&router, &want).is_ok()
                {
                    m.store(want.len() as u64, Ordering::SeqCst);
                    last = Some(want);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Ok(ResilientHelper {
            stop,
            members,
            handle: Some(handle),
        })
    }

    /// Gateways in the group now.
    pub fn members(&self) -> usize {
        self.members.load(Ordering::SeqCst) as usize
    }
}

impl Drop for ResilientHelper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// (node, weight) for every gateway whose session is up: announcing ones
/// weigh 255, withdrawn ones (draining) 1, which rounds to no bucket of
/// 128: the drained node's buckets move as they go idle, busy ones stay.
fn helper_view(frr: &Frr, nodes: &[Node]) -> anyhow::Result<Vec<(u8, u32)>> {
    let summary = frr.vtysh_json("show bgp ipv4 unicast summary json")?;
    let route = frr.vtysh_json(&format!("show ip route {ENDPOINT}/32 json"))?;
    let mut announcing = Vec::new();
    if let Some(routes) = route
        .get(format!("{ENDPOINT}/32"))
        .and_then(|r| r.as_array())
    {
        for r in routes {
            for nh in r
                .get("nexthops")
                .and_then(|n| n.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(ip) = nh.get("ip").and_then(|i| i.as_str()) {
                    announcing.push(ip.to_owned());
                }
            }
        }
    }
    let mut out = Vec::new();
    for n in nodes {
        let state = summary
            .get("peers")
            .and_then(|p| p.get(n.peering().to_string()))
            .and_then(|p| p.get("state"))
            .and_then(|s| s.as_str());
        if state != Some("Established") {
            continue;
        }
        let w = if announcing.contains(&n.next_hop().to_string()) {
            255
        } else {
            1
        };
        out.push((n.n, w));
    }
    // Nobody announces: nothing to route.
    if out.iter().all(|(_, w)| *w == 1) {
        out.clear();
    }
    Ok(out)
}

fn helper_apply(router: &Host, want: &[(u8, u32)]) -> anyhow::Result<()> {
    let table = HELPER_TABLE.to_string();
    if want.is_empty() {
        let _ = router.ip(&["route", "del", &format!("{ENDPOINT}/32"), "table", &table]);
        return Ok(());
    }
    let group = want
        .iter()
        .map(|(n, w)| format!("{},{w}", HELPER_NH_BASE + u32::from(*n)))
        .collect::<Vec<_>>()
        .join("/");
    router.ip(&[
        "nexthop",
        "replace",
        "id",
        &HELPER_GROUP.to_string(),
        "group",
        &group,
        "type",
        "resilient",
        "buckets",
        "128",
        "idle_timer",
        "1",
    ])?;
    router.ip(&[
        "route",
        "replace",
        &format!("{ENDPOINT}/32"),
        "nhid",
        &HELPER_GROUP.to_string(),
        "table",
        &table,
    ])?;
    Ok(())
}

// ---------------------------------------------------------------- traffic

/// With `PLINK_FLEET_HOLD=1`, a failure keeps the topology up for 5 minutes
/// so that it can be inspected (a debugging aid; the test still fails).
fn hold() {
    if std::env::var_os("PLINK_FLEET_HOLD").is_some() {
        eprintln!("PLINK_FLEET_HOLD: holding the topology for 300 s");
        std::thread::sleep(Duration::from_secs(300));
    }
}

/// Echo servers on the backends: each connection is first told the peer
/// address the backend sees (the NAT address: which node holds the flow),
/// then every byte is echoed.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl EchoServers {
    pub fn start(provider: &Host) -> anyhow::Result<EchoServers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for b in BACKENDS {
            let bind = SocketAddrV4::new(b, 8080);
            let listener = provider
                .run_in(move || TcpListener::bind(bind))?
                .with_context(|| format!("binding {bind}"))?;
            listener.set_nonblocking(true)?;
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, peer)) => {
                            std::thread::spawn(move || {
                                let _ = echo(s, peer);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        Ok(EchoServers { stop, handles })
    }
}

fn echo(mut s: TcpStream, peer: std::net::SocketAddr) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("{peer}\n").as_bytes())?;
    let mut buf = [0u8; 256];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n])?;
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A long-lived TCP stream: a byte every 100 ms, each echoed back. It is
/// broken when an echo is late by more than 2 s or the connection fails.
pub struct Stream {
    /// The node holding the flow (from the NAT address the backend saw).
    pub owner: u8,
    pub broken: Arc<AtomicBool>,
    pub echoes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

const STREAM_STALL: Duration = Duration::from_secs(2);

impl Stream {
    pub fn open(fleet: &Fleet) -> anyhow::Result<Stream> {
        let dst = SocketAddrV4::new(ENDPOINT, 80);
        let mut s = fleet
            .client
            .run_in(move || TcpStream::connect_timeout(&dst.into(), Duration::from_secs(2)))?
            .with_context(|| format!("connecting to {dst}"))
            .inspect_err(|_| hold())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            s.read_exact(&mut byte).context("reading the greeting")?;
            line.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&line);
        let nat: std::net::SocketAddr = text.trim().parse()?;
        let std::net::IpAddr::V4(nat) = nat.ip() else {
            bail!("greeting {text:?}");
        };
        let owner = fleet
            .owner_of(nat)
            .ok_or_else(|| anyhow!("backend saw {nat}, no node's NAT address"))?;
        let broken = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, e, st) = (broken.clone(), echoes.clone(), stop.clone());
        s.set_read_timeout(Some(STREAM_STALL))?;
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            let mut i = 0u8;
            while !st.load(Ordering::SeqCst) {
                i = i.wrapping_add(1);
                let ok = s.write_all(&[i]).is_ok() && s.read_exact(&mut buf).is_ok() && buf[0] == i;
                if !ok {
                    b.store(true, Ordering::SeqCst);
                    return;
                }
                e.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
        });
        Ok(Stream {
            owner,
            broken,
            echoes,
            stop,
            handle: Some(handle),
        })
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Ends the stream cleanly (FIN); returns whether it was still whole.
    pub fn close(mut self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        !self.is_broken()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Opens `n` streams; returns them with how many landed on each node.
pub fn open_streams(fleet: &Fleet, n: usize) -> anyhow::Result<(Vec<Stream>, BTreeMap<u8, usize>)> {
    let mut streams = Vec::new();
    let mut per = BTreeMap::new();
    for _ in 0..n {
        let s = Stream::open(fleet)?;
        *per.entry(s.owner).or_insert(0) += 1;
        streams.push(s);
    }
    Ok((streams, per))
}

/// New connections made continuously on a thread: each connects, reads the
/// greeting, echoes one byte and closes. Counts successes and failures.
pub struct Prober {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    /// When each failed connection was started.
    pub failures: Arc<std::sync::Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Prober {
    pub fn start(client: &Host) -> anyhow::Result<Prober> {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, f, st, times) = (ok.clone(), failed.clone(), stop.clone(), failures.clone());
        let client = client.clone();
        let handle = std::thread::spawn(move || {
            let _ = client.run_in(move || {
                while !st.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    if probe_once().is_ok() {
                        o.fetch_add(1, Ordering::SeqCst);
                    } else {
                        f.fetch_add(1, Ordering::SeqCst);
                        times.lock().unwrap_or_else(|p| p.into_inner()).push(t);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        });
        Ok(Prober {
            ok,
            failed,
            failures,
            stop,
            handle: Some(handle),
        })
    }

    /// Failed connections started outside every `[from, to]` window.
    pub fn failures_outside(&self, windows: &[(Instant, Instant)]) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|t| !windows.iter().any(|(a, b)| *t >= a && *t <= b))
            .count()
    }

    /// (succeeded, failed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

fn probe_once() -> anyhow::Result<()> {
    let dst = SocketAddrV4::new(ENDPOINT, 80);
    let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte)?;
    }
    s.write_all(b"x")?;
    s.read_exact(&mut byte)?;
    if byte[0] != b'x' {
        bail!("bad echo");
    }
    Ok(())
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What one node loss did to the live streams.
#[derive(Debug, Clone)]
pub struct LossReport {
    pub killed: u8,
    pub streams: usize,
    pub owned_by_killed: usize,
    pub broken: usize,
    /// Broken streams that a surviving node held.
    pub survivors_broken: usize,
    /// Time from the kill until the router's FRR route lost the node.
    pub withdrawal: Duration,
    pub killed_at: Instant,
    /// When the router's group no longer had the node.
    pub converged_at: Instant,
}

/// Opens `streams` streams, kills node `i`, waits, and counts the broken.
pub fn measure_loss(fleet: &mut Fleet, i: usize, streams: usize) -> anyhow::Result<LossReport> {
    let (open, _) = open_streams(fleet, streams)?;
    std::thread::sleep(Duration::from_millis(500));
    let killed = fleet.nodes[i].node.n;
    let before = fleet.paths()?.len();
    let t0 = Instant::now();
    fleet.kill_node(i)?;
    let withdrawal = t0.elapsed();
    fleet.wait_paths(before - 1, Duration::from_secs(5))?;
    if let Some(h) = &fleet.helper {
        wait_for("the group to drop the node", Duration::from_secs(5), || {
            Ok((h.members() == before - 1).then_some(()))
        })?;
    }
    let converged_at = Instant::now();
    // Long enough for a stalled stream to count as broken.
    std::thread::sleep(STREAM_STALL + Duration::from_secs(2));
    let owned_by_killed = open.iter().filter(|s| s.owner == killed).count();
    let broken = open.iter().filter(|s| s.is_broken()).count();
    let survivors_broken = open
        .iter()
        .filter(|s| s.is_broken() && s.owner != killed)
        .count();
    drop(open);
    Ok(LossReport {
        killed,
        streams,
        owned_by_killed,
        broken,
        survivors_broken,
        withdrawal,
        killed_at: t0,
        converged_at,
    })
}
