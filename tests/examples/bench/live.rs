//! Live forwarding: client namespace → gateway namespace → server namespace
//! over veth pairs, one such line per gateway, all built alike:
//!
//! ```text
//!   client 198.18.0.1 ── b?c ═ b?in ── gateway ── b?out ═ b?s ── server 198.19.0.1
//!   (generator, CPU 0)      (GRO, threaded NAPI     198.19.0.254    (nft counter in a raw
//!                            pinned to CPU 1)                         prerouting chain)
//! ```
//!
//! Gateways: `kernel` (ip_forward, no NAT), `nftables` (DNAT + SNAT with
//! conntrack), `nftables + flowtable` (skipped, with the reason in the
//! results, on kernels without flowtables), `bench_fwd` (the minimal
//! native-XDP forwarder on b?in) and `plink` (a real `plink-ctl run`); plus
//! a generator-ceiling line whose peer drops everything. Every veth has tx checksum offload off
//! (the harness's `link`), and both far ends run plink_pass so that they
//! have NAPI (SPEC §7), whichever gateway forwards into them.
//!
//! Packets are counted where they arrive: an nftables counter (then drop) in
//! a raw prerouting chain of the server namespace. Gateway CPU is the CPU
//! time of the gateway ingress's NAPI kthread (/proc/PID/schedstat) over the
//! run; it includes handing the frame to the server's veth and that veth's
//! NAPI (which runs in the same softirq context), the same for every gateway.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use std::process::Command;

use anyhow::{Context as _, anyhow, bail, ensure};
use plink_common::prog_names;
use plink_tests::{
    gateway::{self, Gateway},
    netns::{self, Host, Topology, sh},
    packet::Ipv4Packet,
};

use crate::{
    Settings, Spread,
    generator::{self, Sent, pin_pid},
};

/// CPU of the generator (and the TCP client); the gateway's NAPI kthreads get the other.
const GEN_CPU: usize = 0;
const GW_CPU: usize = 1;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const TCP_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const FLOWS: u32 = 1024;

pub struct Output {
    pub markdown: String,
    pub json: serde_json::Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Kernel,
    Nft,
    /// nftables as above plus a flowtable (the software fast path).
    NftFt,
    XdpFwd,
    Plink,
    /// The generator's own ceiling: the peer has no route and drops.
    Sink,
    /// plink with 2M-flow conntrack and four services, for the scale runs.
    PlinkScale,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Kernel => "k",
            Kind::Nft => "n",
            Kind::NftFt => "f",
            Kind::XdpFwd => "x",
            Kind::Plink => "p",
            Kind::Sink => "g",
            Kind::PlinkScale => "s",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel routing (no NAT)",
            Kind::Nft => "nftables DNAT+SNAT, conntrack",
            Kind::NftFt => "nftables DNAT+SNAT, conntrack + flowtable",
            Kind::XdpFwd => "bench_fwd (minimal native XDP forwarder)",
            Kind::Plink => "plink",
            Kind::Sink => "generator ceiling (peer drops, no route)",
            Kind::PlinkScale => "plink (scale config)",
        }
    }
    fn nat(self) -> bool {
        matches!(
            self,
            Kind::Nft | Kind::NftFt | Kind::Plink | Kind::PlinkScale
        )
    }
}

/// One client → gateway → server line.
struct Line {
    kind: Kind,
    client: Host,
    gw: Host,
    server: Host,
    in_if: String,
    out_if: String,
    cl_ifindex: u32,
    cl_mac: [u8; 6],
    in_mac: [u8; 6],
    /// The minimal forwarder, attached while this lives.
    xdp: Option<aya::Ebpf>,
    plink: Option<Gateway>,
}

fn ns_exec_sysfs(host: &Host, script: &str) -> anyhow::Result<()> {
    // `ip netns exec` remounts /sys for the namespace: its /sys/class/net
    // shows this namespace's devices (nsenter --net would show the host's).
    sh("ip", &["netns", "exec", &host.name, "sh", "-c", script])?;
    Ok(())
}

/// Threaded NAPI on `dev` in `host`; returns the pids of its kthreads.
fn threaded_napi(host: &Host, dev: &str) -> anyhow::Result<Vec<i32>> {
    ns_exec_sysfs(host, &format!("echo 1 > /sys/class/net/{dev}/threaded"))?;
    let prefix = format!("napi/{dev}-");
    netns::wait_for(
        &format!("the NAPI kthread of {dev}"),
        Duration::from_secs(5),
        || {
            let mut pids = Vec::new();
            for e in std::fs::read_dir("/proc")? {
                let e = e?;
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                if comm.trim().starts_with(&prefix) {
                    pids.push(pid);
                }
            }
            Ok((!pids.is_empty()).then_some(pids))
        },
    )
}

/// CPU time of a task (a kthread) in ns, from /proc/PID/schedstat.
fn cpu_ns(pid: i32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .with_context(|| format!("reading /proc/{pid}/schedstat"))?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("bad /proc/{pid}/schedstat: {s:?}"))
}

/// CPU time of a whole process (all its threads) in ns, from /proc/PID/stat.
fn process_cpu_ns(pid: i32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the `(comm)`: utime and stime are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(ticks * 1_000_000_000 / hz)
}

fn cpu_sum(pids: &[i32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| cpu_ns(*p)).sum()
}

/// The server's counter of UDP packets to port 5353.
fn server_count(server: &Host) -> anyhow::Result<u64> {
    let out = server.exec("nft", &["list", "chain", "ip", "bench", "pre"])?;
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no counter in {out:?}"))
}

fn plink_config(topo: &Topology, line: &Line, scale: bool) -> anyhow::Result<String> {
    let gw = gateway::gateway_section(topo)?;
    let (in_if, out_if) = (&line.in_if, &line.out_if);
    if !scale {
        return Ok(format!(
            "{gw}  endpoint_defaults: {{max_flows: 1000000, new_flows_per_second: 10000000}}
interfaces:
  - {{name: {in_if}, role: consumer, network: bench}}
  - {{name: {out_if}, role: provider}}
services:
  - name: udp
    protocol: udp
    ports: [{{port: 53, target_port: 5353}}]
    backends: [{{address: 198.19.0.1}}]
    nat: {{addresses: [198.19.0.200], ports: 1024-65535}}
    visibility: ['*']
    auto_approve: ['*']
  - name: tcp
    protocol: tcp
    ports: [{{port: 80, target_port: 8080}}]
    backends: [{{address: 198.19.0.1}}]
    nat: {{addresses: [198.19.0.210, 198.19.0.211], ports: 1024-65535}}
    visibility: ['*']
    auto_approve: ['*']
endpoints:
  - {{name: udp, tenant: bench, network: bench, address: {VIP}, service: udp}}
  - {{name: tcp, tenant: bench, network: bench, address: {TCP_VIP}, service: tcp}}
"
        ));
    }
    // Scale: four services of eight NAT addresses each (2.06M NAT ports for
    // 1.1M flows, so the 32-port probe never runs out), one endpoint each.
    let mut cfg = format!(
        "{gw}  conntrack: {{max_flows: 2097152}}
  timeouts: {{udp: 1h}}
  endpoint_defaults: {{max_flows: 2000000, new_flows_per_second: 10000000}}
interfaces:
  - {{name: {in_if}, role: consumer, network: bench}}
  - {{name: {out_if}, role: provider}}
services:
"
    );
    for s in 0..4u32 {
        let nats: Vec<String> = (0..8)
            .map(|n| format!("198.19.1.{}", 1 + s * 8 + n))
            .collect();
        cfg.push_str(&format!(
            "  - name: udp{s}
    protocol: udp
    ports: [{{port: 53, target_port: 5353}}]
    backends: [{{address: 198.19.0.1}}]
    nat: {{addresses: [{}], ports: 1024-65535}}
    visibility: ['*']
    auto_approve: ['*']
",
            nats.join(", ")
        ));
    }
    cfg.push_str("endpoints:\n");
    for s in 0..4u32 {
        cfg.push_str(&format!(
            "  - {{name: udp{s}, tenant: bench, network: bench, address: 198.18.0.{}, service: udp{s}}}\n",
            100 + s
        ));
    }
    Ok(cfg)
}

fn build_line(topo: &mut Topology, kind: Kind) -> anyhow::Result<Line> {
    let t = kind.tag();
    let client = topo.host(&format!("{t}cl"))?;
    let gw = topo.host(&format!("{t}gw"))?;
    let server = topo.host(&format!("{t}sv"))?;
    let (cl_if, in_if, out_if, sv_if) = (
        format!("b{t}c"),
        format!("b{t}in"),
        format!("b{t}out"),
        format!("b{t}s"),
    );
    topo.link(&client, &cl_if, &gw, &in_if)?;
    client.ip(&["addr", "add", "198.18.0.1/24", "dev", &cl_if])?;
    topo.enable_napi(&client, &cl_if)?;
    if kind != Kind::Sink {
        topo.link(&gw, &out_if, &server, &sv_if)?;
        server.ip(&["addr", "add", "198.19.0.1/24", "dev", &sv_if])?;
        server.ip(&["route", "add", "198.18.0.0/15", "via", "198.19.0.254"])?;
        topo.enable_napi(&server, &sv_if)?;
        server.exec(
            "nft",
            &[
                "add table ip bench; \
                 add chain ip bench pre { type filter hook prerouting priority raw; policy accept; }; \
                 add rule ip bench pre udp dport 5353 counter drop",
            ],
        )?;
        gw.ip(&["addr", "add", "198.19.0.254/24", "dev", &out_if])?;
        gw.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        client.ip(&["route", "add", "198.19.0.0/16", "via", "198.18.0.254"])?;
    }
    match kind {
        Kind::Plink | Kind::PlinkScale => {
            // The forwarding contract: no address, no forwarding on the consumer side.
            gw.sysctl(&format!("net.ipv4.conf.{in_if}.forwarding"), "0")?;
        }
        Kind::Sink => {}
        _ => {
            gw.ip(&["addr", "add", "198.18.0.254/24", "dev", &in_if])?;
            gw.neigh_permanent("198.19.0.1", server.mac(&sv_if)?, &out_if)?;
        }
    }
    if matches!(kind, Kind::Nft | Kind::NftFt) {
        gw.ip(&["addr", "add", "198.18.0.100/24", "dev", &in_if])?;
        gw.ip(&["addr", "add", "198.18.0.101/24", "dev", &in_if])?;
        gw.ip(&["addr", "add", "198.19.0.200/24", "dev", &out_if])?;
        gw.exec(
            "nft",
            &[&format!(
                "add table ip nat; \
                 add chain ip nat pre {{ type nat hook prerouting priority dstnat; policy accept; }}; \
                 add rule ip nat pre ip daddr {VIP} udp dport 53 dnat to 198.19.0.1:5353; \
                 add rule ip nat pre ip daddr {TCP_VIP} tcp dport 80 dnat to 198.19.0.1:8080; \
                 add chain ip nat post {{ type nat hook postrouting priority srcnat; policy accept; }}; \
                 add rule ip nat post oifname \"{out_if}\" snat to 198.19.0.200"
            )],
        )?;
    }
    if kind == Kind::NftFt {
        // Connections conntrack has confirmed (UDP: from the second packet;
        // TCP: established) move to the flowtable, which forwards and NATs
        // them from the ingress hook, before the rest of the stack.
        gw.exec(
            "nft",
            &[&format!(
                "add table inet ft; \
                 add flowtable inet ft f {{ hook ingress priority 0; devices = {{ {in_if}, {out_if} }}; }}; \
                 add chain inet ft fastpath {{ type filter hook forward priority 0; policy accept; }}; \
                 add rule inet ft fastpath meta l4proto {{ tcp, udp }} flow add @f"
            )],
        )?;
    }
    // The gateway's veths: GRO on (NAPI on veth without XDP), like plink's.
    for dev in [&in_if, &out_if] {
        if kind != Kind::Sink || dev == &in_if {
            gw.exec("ethtool", &["-K", dev, "gro", "on"])?;
        }
    }
    let mut line = Line {
        kind,
        cl_ifindex: client.ifindex(&cl_if)?,
        cl_mac: client.mac(&cl_if)?,
        in_mac: gw.mac(&in_if)?,
        client,
        gw,
        server,
        in_if,
        out_if,
        xdp: None,
        plink: None,
    };
    match kind {
        Kind::XdpFwd => {
            let ebpf = netns::attach_standalone(&line.gw, &line.in_if, prog_names::BENCH_FWD)?;
            line.xdp = Some(ebpf);
        }
        Kind::Plink | Kind::PlinkScale => {
            let cfg = plink_config(topo, &line, kind == Kind::PlinkScale)?;
            let gw = line.gw.clone();
            line.plink = Some(gateway::start(topo, &gw, &cfg).context("starting plink")?);
        }
        _ => {}
    }
    Ok(line)
}

impl Line {
    fn netns(&self) -> std::path::PathBuf {
        self.client.netns_path()
    }

    /// 60-byte UDP frames of `n` flows starting at flow `base`.
    fn frames(&self, n: u32, base: u32) -> Arc<Vec<Vec<u8>>> {
        let frames = (base..base + n)
            .map(|i| {
                let (src, sport, dst, dport) = match self.kind {
                    Kind::PlinkScale => (
                        // Distinct (source, port) per flow, spread over the four endpoints.
                        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i / 8192),
                        10_000 + (i % 8192) as u16,
                        Ipv4Addr::new(198, 18, 0, 100 + (i % 4) as u8),
                        53,
                    ),
                    k if k.nat() => (CLIENT, 20_000 + i as u16, VIP, 53),
                    _ => (CLIENT, 20_000 + i as u16, SERVER, 5353),
                };
                Ipv4Packet::udp((src, sport), (dst, dport), &[0x5a; 18])
                    .macs(self.cl_mac, self.in_mac)
                    .build()
            })
            .collect();
        Arc::new(frames)
    }

    fn send(
        &self,
        frames: &Arc<Vec<Vec<u8>>>,
        d: Duration,
        passes: Option<u32>,
    ) -> anyhow::Result<Sent> {
        generator::send(
            self.netns(),
            self.cl_ifindex,
            frames.clone(),
            GEN_CPU,
            d,
            passes,
        )
    }

    /// The id of the XDP program attached to the gateway's ingress.
    fn xdp_prog_id(&self) -> anyhow::Result<u32> {
        self.xdp_prog_id_on(&self.in_if)
    }

    /// The id of the XDP program attached to the gateway's `dev`.
    fn xdp_prog_id_on(&self, dev: &str) -> anyhow::Result<u32> {
        let out = self.gw.ip(&["-d", "link", "show", "dev", dev])?;
        out.split_whitespace()
            .skip_while(|w| *w != "prog/xdp")
            .nth(2)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no XDP program on {dev}: {out}"))
    }
}

/// Program run time and count by id (needs run-time stats enabled).
fn prog_stats(id: u32) -> anyhow::Result<(Duration, u64)> {
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok((info.run_time(), info.run_count()));
        }
    }
    bail!("program {id} not loaded")
}

/// One measured UDP run.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    offered_pps: f64,
    sent_pps: f64,
    received_pps: f64,
    /// Gateway NAPI kthread CPU, fraction of one CPU.
    gw_cpu: f64,
    /// Gateway CPU ns per received packet.
    gw_ns_per_pkt: f64,
}

fn udp_run(
    line: &Line,
    frames: &Arc<Vec<Vec<u8>>>,
    napi: &[i32],
    d: Duration,
) -> anyhow::Result<Run> {
    // A short warm-up: conntrack entries exist, caches and queues are warm.
    line.send(frames, Duration::from_millis(300), None)?;
    std::thread::sleep(Duration::from_millis(100));
    let rx0 = if line.kind == Kind::Sink {
        0
    } else {
        server_count(&line.server)?
    };
    let cpu0 = cpu_sum(napi)?;
    let sent = line.send(frames, d, None)?;
    // Let the queues drain before reading the counter.
    std::thread::sleep(Duration::from_millis(100));
    let cpu1 = cpu_sum(napi)?;
    let rx1 = if line.kind == Kind::Sink {
        0
    } else {
        server_count(&line.server)?
    };
    let secs = sent.elapsed.as_secs_f64();
    let received = (rx1 - rx0) as f64;
    Ok(Run {
        offered_pps: sent.offered_pps(),
        sent_pps: sent.sent_pps(),
        received_pps: received / secs,
        gw_cpu: (cpu1 - cpu0) as f64 / 1e9 / secs,
        gw_ns_per_pkt: if received > 0.0 {
            (cpu1 - cpu0) as f64 / received
        } else {
            f64::NAN
        },
    })
}

/// A TCP server in `host` on 198.19.0.1:8080: reads a 16-byte request,
/// answers 64 bytes and closes. Stopped by `stop` plus one wake-up connect.
fn tcp_server(host: &Host, stop: Arc<AtomicBool>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let path = host.netns_path();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let listener = (|| -> anyhow::Result<TcpListener> {
            netns::enter_netns(&path)?;
            Ok(TcpListener::bind(SocketAddrV4::new(SERVER, 8080))?)
        })();
        let listener = match listener {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut s) = conn else { continue };
            let mut req = [0u8; 16];
            if s.read_exact(&mut req).is_ok() {
                let _ = s.write_all(&[b'r'; 64]);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("TCP server did not start"))??;
    Ok(handle)
}

/// Sequential connections (connect, 16-byte request, 64-byte response,
/// close) from the client namespace, pinned to the generator's CPU.
fn tcp_client(line: &Line, d: Duration) -> anyhow::Result<Vec<Duration>> {
    let path = line.netns();
    // Kernel routing has no NAT: the client talks to the server itself.
    let target = if line.kind == Kind::Kernel {
        SocketAddrV4::new(SERVER, 8080)
    } else {
        SocketAddrV4::new(TCP_VIP, 80)
    };
    let handle = std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
        netns::enter_netns(&path)?;
        generator::pin_thread(GEN_CPU)?;
        let mut lat = Vec::new();
        let started = Instant::now();
        while started.elapsed() < d {
            let t0 = Instant::now();
            let mut s = TcpStream::connect_timeout(&target.into(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(&[b'q'; 16])?;
            let mut resp = Vec::with_capacity(64);
            s.read_to_end(&mut resp)?;
            ensure!(resp.len() == 64, "short response ({} bytes)", resp.len());
            lat.push(t0.elapsed());
        }
        Ok(lat)
    });
    handle
        .join()
        .map_err(|_| anyhow!("TCP client thread panicked"))?
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

pub fn run(settings: &Settings) -> anyhow::Result<Output> {
    let d = settings.run;
    let rounds = settings.rounds;
    let mut topo = Topology::new()?;
    let mut kinds = Vec::new();
    let mut lines = Vec::new();
    let mut napi = Vec::new();
    let mut frames = Vec::new();
    let mut skipped = Vec::new();
    for kind in [
        Kind::Kernel,
        Kind::Nft,
        Kind::NftFt,
        Kind::XdpFwd,
        Kind::Plink,
        Kind::Sink,
    ] {
        eprintln!("live: building the {} line", kind.name());
        let line = match build_line(&mut topo, kind) {
            Ok(line) => line,
            // A kernel without flowtables (CONFIG_NF_FLOW_TABLE) cannot run
            // this variant: say so in the results instead of failing.
            Err(e) if kind == Kind::NftFt => {
                eprintln!("live: skipping {}: {e:#}", kind.name());
                skipped.push(format!(
                    "{}: not run, the kernel refused the flowtable ({})",
                    kind.name(),
                    flowtable_config()
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        kinds.push(kind);
        // After XDP/GRO set NAPI up: threaded, its kthread on the gateway CPU.
        let pids = threaded_napi(&line.gw, &line.in_if)?;
        for p in &pids {
            pin_pid(*p, GW_CPU)?;
        }
        frames.push(line.frames(FLOWS, 0));
        napi.push(pids);
        lines.push(line);
    }

    // Interleaved rounds: kernel, nftables, bench_fwd, plink, ceiling, kernel, ...
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); kinds.len()];
    for r in 0..rounds {
        for (k, line) in lines.iter().enumerate() {
            let run = udp_run(line, &frames[k], &napi[k], d)
                .with_context(|| format!("{} round {}", line.kind.name(), r + 1))?;
            eprintln!(
                "live round {} {}: offered {:.0} sent {:.0} received {:.0} pps, gw CPU {:.2}",
                r + 1,
                line.kind.name(),
                run.offered_pps,
                run.sent_pps,
                run.received_pps,
                run.gw_cpu
            );
            runs[k].push(run);
        }
    }
    // Did the flowtable take the flows over? conntrack marks them [OFFLOAD].
    let offloaded = kinds
        .iter()
        .position(|k| *k == Kind::NftFt)
        .and_then(|i| lines[i].gw.exec("cat", &["/proc/net/nf_conntrack"]).ok())
        .map(|t| t.lines().filter(|l| l.contains("[OFFLOAD]")).count());
    eprintln!("nftables + flowtable: conntrack entries marked [OFFLOAD]: {offloaded:?}");
    // Sanity: every gateway delivered traffic.
    for (k, kind) in kinds.iter().enumerate() {
        if *kind != Kind::Sink {
            ensure!(
                runs[k].iter().all(|r| r.received_pps > 1000.0),
                "{}: the server received (almost) nothing: {:?}",
                kind.name(),
                runs[k]
            );
        }
    }

    let mut md = String::from(
        "### Live forwarding, 60-byte UDP, 1,024 flows (client → gateway → server over veth)\n\n",
    );
    md.push_str(&format!(
        "{rounds} interleaved rounds of {} s per gateway; median (min–max). Received = counted by an nftables \
         rule in the server namespace's raw prerouting chain. Gateway CPU = the gateway ingress NAPI \
         kthread (threaded, pinned to CPU {GW_CPU}; generator pinned to CPU {GEN_CPU}).\n\n",
        d.as_secs()
    ));
    md.push_str("| gateway | offered Mpps | sent Mpps | received Mpps | gateway CPU (of one core) | gateway CPU ns/packet |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- |\n");
    let mut json_gw = Vec::new();
    for (k, kind) in kinds.iter().enumerate() {
        let col = |f: fn(&Run) -> f64| Spread::of(&runs[k].iter().map(f).collect::<Vec<_>>());
        let (off, sent, rx, cpu, nspp) = (
            col(|r| r.offered_pps),
            col(|r| r.sent_pps),
            col(|r| r.received_pps),
            col(|r| r.gw_cpu),
            col(|r| r.gw_ns_per_pkt),
        );
        let rx_s = if *kind == Kind::Sink {
            "—".to_string()
        } else {
            rx.fmt(1e6, 3)
        };
        let ns_s = if *kind == Kind::Sink {
            "—".to_string()
        } else {
            nspp.fmt(1.0, 0)
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            kind.name(),
            off.fmt(1e6, 3),
            sent.fmt(1e6, 3),
            rx_s,
            cpu.fmt(1.0, 2),
            ns_s
        ));
        json_gw.push(serde_json::json!({
            "gateway": kind.name(),
            "offered_pps": off.json(),
            "sent_pps": sent.json(),
            "received_pps": rx.json(),
            "gateway_cpu": cpu.json(),
            "gateway_cpu_ns_per_packet": nspp.json(),
            "rounds": runs[k].iter().map(|r| serde_json::json!({
                "offered_pps": r.offered_pps, "sent_pps": r.sent_pps,
                "received_pps": r.received_pps, "gateway_cpu": r.gw_cpu,
            })).collect::<Vec<_>>(),
        }));
    }
    // Ratios within each round, then medianed.
    let idx = |k: Kind| kinds.iter().position(|x| *x == k).unwrap_or(0);
    let ratio = |a: Kind, b: Kind, f: fn(&Run) -> f64| {
        Spread::of(
            &runs[idx(a)]
                .iter()
                .zip(&runs[idx(b)])
                .map(|(x, y)| f(x) / f(y))
                .collect::<Vec<_>>(),
        )
    };
    let plink_vs_xdp = ratio(Kind::Plink, Kind::XdpFwd, |r| r.received_pps);
    let plink_vs_nft = ratio(Kind::Plink, Kind::Nft, |r| r.received_pps);
    let has_ft = kinds.contains(&Kind::NftFt);
    let plink_vs_nftft = if has_ft {
        ratio(Kind::Plink, Kind::NftFt, |r| r.received_pps)
    } else {
        Spread::of(&[])
    };
    let plink_vs_kernel = ratio(Kind::Plink, Kind::Kernel, |r| r.received_pps);
    let xdp_vs_kernel = ratio(Kind::XdpFwd, Kind::Kernel, |r| r.received_pps);
    let cpu_plink_vs_xdp = ratio(Kind::Plink, Kind::XdpFwd, |r| r.gw_ns_per_pkt);
    if kinds.contains(&Kind::NftFt) {
        md.push_str(&format!(
            "\nnftables + flowtable: conntrack entries marked `[OFFLOAD]` after the rounds: {} (of {FLOWS} flows).\n",
            offloaded.map_or("unknown".to_string(), |n| n.to_string())
        ));
    }
    for s in &skipped {
        md.push_str(&format!("\nNot measured — {s}.\n"));
    }
    md.push_str("\n| ratio (within each round, median (min–max)) | value | target | met |\n| --- | --- | --- | --- |\n");
    md.push_str(&format!(
        "| plink ÷ bench_fwd, received pps | {} | ≥ 0.9 | {} |\n",
        plink_vs_xdp.fmt(1.0, 2),
        yes_no(plink_vs_xdp.median >= 0.9)
    ));
    md.push_str(&format!(
        "| plink ÷ nftables, received pps | {} | reported (≈ 1.5 expected on veth) | — |\n",
        plink_vs_nft.fmt(1.0, 2)
    ));
    if has_ft {
        md.push_str(&format!(
            "| plink ÷ nftables + flowtable, received pps | {} | reported | — |\n",
            plink_vs_nftft.fmt(1.0, 2)
        ));
    }
    md.push_str(&format!(
        "| plink ÷ kernel routing, received pps | {} | — | — |\n",
        plink_vs_kernel.fmt(1.0, 2)
    ));
    md.push_str(&format!(
        "| bench_fwd ÷ kernel routing, received pps | {} | — | — |\n",
        xdp_vs_kernel.fmt(1.0, 2)
    ));
    md.push_str(&format!(
        "| plink ÷ bench_fwd, gateway CPU ns per packet | {} | — | — |\n\n",
        cpu_plink_vs_xdp.fmt(1.0, 2)
    ));

    // Program run time per packet on live traffic (stats on only here: the
    // accounting itself costs time, so the pps rounds above run without it).
    let mut live_prog = Vec::new();
    {
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| anyhow!("bpf_enable_stats: {e}"))?;
        for kind in [Kind::XdpFwd, Kind::Plink] {
            let k = idx(kind);
            let id = lines[k].xdp_prog_id()?;
            let mut per_round = Vec::new();
            for _ in 0..rounds.min(3) {
                let (t0, c0) = prog_stats(id)?;
                lines[k].send(&frames[k], d, None)?;
                let (t1, c1) = prog_stats(id)?;
                per_round.push((t1 - t0).as_nanos() as f64 / (c1 - c0).max(1) as f64);
            }
            live_prog.push((kind, Spread::of(&per_round)));
        }
    }
    md.push_str(
        "### XDP program run time per packet on live traffic (1,024 flows, bpf_enable_stats)\n\n",
    );
    md.push_str("| program | ns/packet median (min–max) | ratio to bench_fwd | target | met |\n| --- | --- | --- | --- | --- |\n");
    let fwd_ns = live_prog[0].1.median;
    for (kind, s) in &live_prog {
        let ratio = s.median / fwd_ns;
        let (target, met) = if *kind == Kind::Plink {
            ("≤ 1.5× bench_fwd (established)", yes_no(ratio <= 1.5))
        } else {
            ("—", "—")
        };
        md.push_str(&format!(
            "| {} | {} | {:.2} | {target} | {met} |\n",
            kind.name(),
            s.fmt(1.0, 1),
            ratio
        ));
    }
    md.push('\n');
    let json_live_prog: Vec<_> = live_prog
        .iter()
        .map(|(k, s)| serde_json::json!({"program": k.name(), "ns_per_packet": s.json()}))
        .collect();

    // TCP connections through an endpoint: nftables vs plink.
    let tcp = tcp_bench(&lines, &kinds, rounds, d)?;
    md.push_str(&tcp.0);

    // Scale: plink's established-path run time over 1k, 100k, 1M flows.
    // The other lines are idle; the scale line gets its own topology (its
    // own pins, admin socket and state) and its own plink.
    let scale = scale_bench(settings)?;
    md.push_str(&scale.0);

    Ok(Output {
        markdown: md,
        json: serde_json::json!({
            "udp_1024_flows": json_gw,
            "nftables_flowtable_offloaded_entries": offloaded,
            "ratios": {
                "plink_over_bench_fwd_pps": plink_vs_xdp.json(),
                "plink_over_nftables_pps": plink_vs_nft.json(),
                "plink_over_nftables_flowtable_pps": plink_vs_nftft.json(),
                "plink_over_kernel_pps": plink_vs_kernel.json(),
                "bench_fwd_over_kernel_pps": xdp_vs_kernel.json(),
                "plink_over_bench_fwd_gw_cpu_ns_per_packet": cpu_plink_vs_xdp.json(),
            },
            "live_program_run_time": json_live_prog,
            "tcp_connections": tcp.1,
            "scale": scale.1,
        }),
    })
}

/// What the running kernel's config says about flowtables, if readable.
fn flowtable_config() -> String {
    let out = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null | grep NF_FLOW_TABLE",
        ])
        .output();
    match out {
        Ok(o) if !o.stdout.is_empty() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .collect::<Vec<_>>()
            .join(", "),
        _ => "kernel config not readable".into(),
    }
}

/// The scale runs alone (development: PLINK_BENCH_ONLY=scale).
pub fn scale_only(settings: &Settings) -> anyhow::Result<Output> {
    let (markdown, json) = scale_bench(settings)?;
    Ok(Output {
        markdown,
        json: serde_json::json!({ "scale": json }),
    })
}

/// One TCP round: connections/s, gateway CPU µs per connection, latency
/// p50 and p99 µs, plink's XDP µs per connection.
type TcpRow = (f64, f64, f64, f64, f64);

/// Gateway CPU per TCP connection and request latency, nftables vs plink.
fn tcp_bench(
    lines: &[Line],
    kinds: &[Kind],
    rounds: usize,
    d: Duration,
) -> anyhow::Result<(String, serde_json::Value)> {
    let pick: Vec<Kind> = [Kind::Kernel, Kind::Nft, Kind::NftFt, Kind::Plink]
        .into_iter()
        .filter(|k| kinds.contains(k))
        .collect();
    let at = |k: Kind| pick.iter().position(|x| *x == k);
    let mut servers = Vec::new();
    let mut pids: Vec<Vec<i32>> = Vec::new();
    for &kind in &pick {
        let line = &lines[kinds.iter().position(|k| *k == kind).unwrap_or(0)];
        // Both gateway veths threaded and pinned: the gateway's work in
        // both directions lands in its own kthreads. The far ends get
        // their own (unpinned) kthreads, so the client's and server's TCP
        // receive work is not counted as the gateway's.
        let mut p = threaded_napi(&line.gw, &line.in_if)?;
        p.extend(threaded_napi(&line.gw, &line.out_if)?);
        for pid in &p {
            pin_pid(*pid, GW_CPU)?;
        }
        threaded_napi(&line.client, &format!("b{}c", kind.tag()))?;
        threaded_napi(&line.server, &format!("b{}s", kind.tag()))?;
        pids.push(p);
        let stop = Arc::new(AtomicBool::new(false));
        servers.push((tcp_server(&line.server, stop.clone())?, stop, line));
    }
    // plink's own XDP run time per connection (both programs), from the
    // kernel's run-time stats (on for the TCP rounds; a few sched_clock
    // reads per packet, charged to plink only).
    let plink_line = &lines[kinds.iter().position(|k| *k == Kind::Plink).unwrap_or(0)];
    let plink_progs = [
        plink_line.xdp_prog_id_on(&plink_line.in_if)?,
        plink_line.xdp_prog_id_on(&plink_line.out_if)?,
    ];
    let plink_run_time = || -> anyhow::Result<Duration> {
        let mut t = Duration::ZERO;
        for id in plink_progs {
            t += prog_stats(id)?.0;
        }
        Ok(t)
    };
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("bpf_enable_stats: {e}"))?;
    let mut res: Vec<Vec<TcpRow>> = vec![Vec::new(); pick.len()];
    for r in 0..rounds {
        for (k, kind) in pick.iter().enumerate() {
            let line = servers[k].2;
            tcp_client(line, Duration::from_millis(200))?;
            let c0 = cpu_sum(&pids[k])?;
            let x0 = plink_run_time()?;
            let t0 = Instant::now();
            let mut lat = tcp_client(line, d)
                .with_context(|| format!("TCP through {} round {}", kind.name(), r + 1))?;
            let secs = t0.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_millis(50));
            let c1 = cpu_sum(&pids[k])?;
            let x1 = plink_run_time()?;
            lat.sort();
            let n = lat.len() as f64;
            let row = (
                n / secs,
                (c1 - c0) as f64 / 1e3 / n,
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                if *kind == Kind::Plink {
                    (x1 - x0).as_nanos() as f64 / 1e3 / n
                } else {
                    f64::NAN
                },
            );
            eprintln!(
                "tcp round {} {}: {:.0} conn/s, {:.1} µs gateway CPU/conn, p50 {:.0} µs, p99 {:.0} µs",
                r + 1,
                kind.name(),
                row.0,
                row.1,
                row.2,
                row.3
            );
            res[k].push(row);
        }
    }
    for (handle, stop, line) in servers {
        stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept from inside the server's namespace.
        let path = line.server.netns_path();
        let _ = std::thread::spawn(move || {
            if netns::enter_netns(&path).is_ok() {
                let _ = TcpStream::connect_timeout(
                    &SocketAddrV4::new(SERVER, 8080).into(),
                    Duration::from_secs(1),
                );
            }
        })
        .join();
        let _ = handle.join();
    }
    // plink against each nftables variant, within each round.
    let vs = |n: Option<usize>| match (at(Kind::Plink), n) {
        (Some(p), Some(n)) => Spread::of(
            &res[p]
                .iter()
                .zip(&res[n])
                .map(|(p, x)| p.1 / x.1)
                .collect::<Vec<_>>(),
        ),
        _ => Spread::of(&[]),
    };
    let (ratio, ratio_ft) = (vs(at(Kind::Nft)), vs(at(Kind::NftFt)));
    let mut md = String::from(
        "### TCP connections through an endpoint (connect, 16-byte request, 64-byte response, close)\n\n",
    );
    md.push_str(&format!(
        "Sequential connections from one client thread for {} s per round, {rounds} interleaved rounds. \
         Gateway CPU = both gateway veths' NAPI kthreads (threaded, pinned to CPU {GW_CPU}); the client's \
         and server's veths have their own kthreads.\n\n",
        d.as_secs()
    ));
    md.push_str("| gateway | connections/s | gateway CPU µs per connection | of which plink's XDP programs, µs | latency p50 µs | latency p99 µs |\n| --- | --- | --- | --- | --- | --- |\n");
    let mut json = Vec::new();
    for (k, kind) in pick.iter().enumerate() {
        let col = |f: fn(&TcpRow) -> f64| Spread::of(&res[k].iter().map(f).collect::<Vec<_>>());
        let (rate, cpu, p50, p99, xdp) = (
            col(|r| r.0),
            col(|r| r.1),
            col(|r| r.2),
            col(|r| r.3),
            col(|r| r.4),
        );
        let name = if *kind == Kind::Kernel {
            "kernel routing (no NAT; reference)"
        } else {
            kind.name()
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            rate.fmt(1.0, 0),
            cpu.fmt(1.0, 1),
            if *kind == Kind::Plink {
                xdp.fmt(1.0, 2)
            } else {
                "—".into()
            },
            p50.fmt(1.0, 0),
            p99.fmt(1.0, 0)
        ));
        json.push(serde_json::json!({
            "gateway": kind.name(), "connections_per_second": rate.json(),
            "gateway_cpu_us_per_connection": cpu.json(),
            "latency_p50_us": p50.json(), "latency_p99_us": p99.json(),
            "plink_xdp_us_per_connection": xdp.json(),
        }));
    }
    md.push_str(&format!(
        "\n| ratio | value | target | met |\n| --- | --- | --- | --- |\n| plink ÷ nftables, gateway CPU per connection | {} | ≤ 0.5 | {} |\n",
        ratio.fmt(1.0, 2),
        yes_no(ratio.median <= 0.5)
    ));
    // What each gateway adds to kernel routing's CPU per connection, within
    // each round: the part of the cost that is the gateway's own.
    let above = |n: Option<usize>| match (at(Kind::Kernel), n) {
        (Some(k), Some(n)) => Spread::of(
            &res[n]
                .iter()
                .zip(&res[k])
                .map(|(x, r)| x.1 - r.1)
                .collect::<Vec<_>>(),
        ),
        _ => Spread::of(&[]),
    };
    let (plink_above, nft_above) = (above(at(Kind::Plink)), above(at(Kind::Nft)));
    md.push_str(&format!(
        "| plink, gateway CPU per connection above kernel routing, µs | {} | reported | — |\n\
         | nftables, gateway CPU per connection above kernel routing, µs | {} | reported | — |\n",
        plink_above.fmt(1.0, 1),
        nft_above.fmt(1.0, 1),
    ));
    if at(Kind::NftFt).is_some() {
        md.push_str(&format!(
            "| plink ÷ nftables + flowtable, gateway CPU per connection | {} | ≤ 0.5 | {} |\n",
            ratio_ft.fmt(1.0, 2),
            yes_no(ratio_ft.median <= 0.5)
        ));
    }
    md.push('\n');
    Ok((
        md,
        serde_json::json!({
            "gateways": json,
            "plink_over_nftables_cpu_per_connection": ratio.json(),
            "plink_over_nftables_flowtable_cpu_per_connection": ratio_ft.json(),
            "plink_cpu_us_per_connection_above_routing": plink_above.json(),
            "nftables_cpu_us_per_connection_above_routing": nft_above.json(),
        }),
    ))
}

/// plink's consumer-program run time per packet with live traffic over
/// 1k, 100k and 1M established flows (conntrack sized for 2M).
fn scale_bench(settings: &Settings) -> anyhow::Result<(String, serde_json::Value)> {
    let d = settings.run;
    eprintln!("live: building the scale line");
    let mut topo = Topology::new()?;
    let line = build_line(&mut topo, Kind::PlinkScale)?;
    let pids = threaded_napi(&line.gw, &line.in_if)?;
    for p in &pids {
        pin_pid(*p, GW_CPU)?;
    }
    // Flows created, summed over services, read from the pinned counters:
    // scraping /metrics while both CPUs are saturated can stall for seconds.
    let svc_stats =
        plink_ctl::dataplane::pin_dir(topo.bpffs_root()).join(plink_common::map_names::SVC_STATS);
    let connections = || -> anyhow::Result<u64> {
        let data = aya::maps::MapData::from_pin(&svc_stats)
            .with_context(|| format!("opening {}", svc_stats.display()))?;
        let arr: aya::maps::PerCpuArray<_, plink_common::Counters> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
        let mut total = 0;
        for i in 0..plink_common::MAX_SERVICES {
            for c in arr.get(&i, 0)?.iter() {
                total += c.flows_created;
            }
        }
        Ok(total)
    };
    // Disjoint flow sets, each opened (warmed) until every flow exists.
    let mut sets = Vec::new();
    let mut refused = Vec::new();
    let mut base = 0u32;
    for &n in &settings.scale_flows {
        let frames = line.frames(n, base);
        base += n;
        let want = u64::from(base);
        let mut passes = 0;
        let mut have = connections()?;
        // Until every flow is open, or a pass opens nothing more (a few
        // flows can be refused by the 32-port NAT probe; they are reported).
        while have < want && passes < 30 {
            line.send(&frames, Duration::ZERO, Some(1))?;
            passes += 1;
            std::thread::sleep(Duration::from_millis(100));
            let now = connections()?;
            if now == have && passes > 2 {
                break;
            }
            have = now;
        }
        let missing = want.saturating_sub(have);
        ensure!(
            missing * 1000 <= u64::from(n),
            "{n} flows: {missing} not opened after {passes} passes"
        );
        eprintln!("scale: {n} flows open after {passes} passes ({missing} refused)");
        refused.push(missing);
        sets.push((n, frames));
    }
    let id = line.xdp_prog_id()?;
    let ctl_pid = {
        let gw = line
            .plink
            .as_ref()
            .ok_or_else(|| anyhow!("plink not started"))?;
        // nsenter execs plink-ctl: the child's pid is plink-ctl's.
        topo.child_mut(gw.child).id() as i32
    };
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("bpf_enable_stats: {e}"))?;
    let mut res: Vec<Vec<(f64, f64, u64, f64)>> = vec![Vec::new(); sets.len()];
    for r in 0..settings.rounds {
        for (k, (n, frames)) in sets.iter().enumerate() {
            let conn0 = connections()?;
            let (t0, c0) = prog_stats(id)?;
            let ctl0 = process_cpu_ns(ctl_pid)?;
            let sent = line.send(frames, d, None)?;
            let (t1, c1) = prog_stats(id)?;
            let ctl1 = process_cpu_ns(ctl_pid)?;
            let conn1 = connections()?;
            let ctl = (ctl1 - ctl0) as f64 / 1e9 / sent.elapsed.as_secs_f64();
            let ns = (t1 - t0).as_nanos() as f64 / (c1 - c0).max(1) as f64;
            let pps = (c1 - c0) as f64 / sent.elapsed.as_secs_f64();
            eprintln!(
                "scale round {} {n} flows: {ns:.1} ns/packet over {} packets ({pps:.0} pps), {} new flows",
                r + 1,
                c1 - c0,
                conn1 - conn0
            );
            res[k].push((ns, pps, conn1 - conn0, ctl));
        }
    }
    let mut md = String::from(
        "### Scale: plink's established-path run time over many flows (live traffic)\n\n",
    );
    md.push_str(&format!(
        "plink_consumer run time per packet (bpf_enable_stats: Δrun_time_ns ÷ Δrun_cnt) while the generator \
         cycles through N already-open UDP flows (four endpoints, 32 NAT addresses, \
         `conntrack.max_flows: 2097152` for every N), {} rounds of {} s, interleaved.\n\n",
        settings.rounds,
        d.as_secs()
    ));
    md.push_str("| flows | ns/packet median (min–max) | ratio to 1k | packets/s through XDP | plink-ctl CPU (of one core) | flows never opened | new flows during runs | target | met |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let mut json = Vec::new();
    let res_1k_median = Spread::of(&res[0].iter().map(|r| r.0).collect::<Vec<_>>()).median;
    for (k, (n, _)) in sets.iter().enumerate() {
        let ns = Spread::of(&res[k].iter().map(|r| r.0).collect::<Vec<_>>());
        let pps = Spread::of(&res[k].iter().map(|r| r.1).collect::<Vec<_>>());
        let ctl = Spread::of(&res[k].iter().map(|r| r.3).collect::<Vec<_>>());
        let ratio = Spread::of(
            &res[k]
                .iter()
                .zip(&res[0])
                .map(|(a, b)| a.0 / b.0)
                .collect::<Vec<_>>(),
        );
        let new: u64 = res[k].iter().map(|r| r.2).sum();
        let (target, met) = if *n >= 1_000_000 {
            ("≤ 1.3× 1k", yes_no(ratio.median <= 1.3))
        } else {
            ("—", "—")
        };
        md.push_str(&format!(
            "| {n} | {} | {} | {} | {} | {} | {new} | {target} | {met} |\n",
            ns.fmt(1.0, 1),
            ratio.fmt(1.0, 2),
            pps.fmt(1e6, 3),
            ctl.fmt(1.0, 2),
            refused[k],
        ));
        json.push(serde_json::json!({
            "flows": n, "ns_per_packet": ns.json(), "ratio_to_1k": ratio.json(),
            "pps": pps.json(), "new_flows_during_runs": new, "flows_never_opened": refused[k],
            "plink_ctl_cpu": ctl.json(),
        }));
    }
    // What one cache miss costs here, measured on the gateway's CPU after
    // the rounds: the scale rows' extra cost per packet is read against it.
    crate::generator::pin_pid(0, GW_CPU)?;
    let cached = crate::memlat::dependent_load_ns(1 << 20, 20_000_000);
    let dram = crate::memlat::dependent_load_ns(256 << 20, 20_000_000);
    md.push_str(&format!(
        "\nMemory latency on CPU {GW_CPU} (a dependent load per 64-byte line, random cycle): \
         {cached:.1} ns within 1 MiB, {dram:.1} ns within 256 MiB. A packet of a flow the \
         cache no longer holds waits for at least one such miss (the hash bucket, then the \
         element): the 1M row can be at most 1.3x the 1k row only if that costs less than \
         {:.0} ns here.\n",
        0.3 * res_1k_median
    ));
    md.push('\n');
    Ok((
        md,
        serde_json::json!({
            "rows": json,
            "memory_latency_ns": { "within_1MiB": cached, "within_256MiB": dram },
        }),
    ))
}
