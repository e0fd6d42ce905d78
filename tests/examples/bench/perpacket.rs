//! Per-packet cost of each datapath path, with BPF_PROG_TEST_RUN.
//!
//! Why not one call with `repeat = N`: plink rewrites the packet in place
//! (addresses, ports, TTL), so a repeated run sees its own output from the
//! second repetition on; and BPF_F_TEST_XDP_LIVE_FRAMES does not help:
//! recycled pages keep the rewritten content (Documentation/bpf/bpf_prog_run.rst:
//! "the page content is not rewritten"). So every run here is one call with
//! `repeat = 1` on a pristine copy of the frame it is meant to measure, the
//! verdict of every single run is asserted, the datapath's counters are
//! checked to have moved exactly as the path implies, and the cost is the
//! kernel's own accounting of program run time (`bpf_enable_stats
//! (BPF_STATS_RUN_TIME)`: Δrun_time_ns ÷ Δrun_cnt of the program), which
//! excludes the syscall and the copy of the frame.
//!
//! Rows, interleaved in each round (fresh dataplane per round):
//! - `bench_fwd`: the minimal forwarder (plink_bench_fwd), ingress c1 →
//!   fib lookup → redirect to p0;
//! - `forward established`: plink_consumer, a packet of one of 1,024 live
//!   UDP flows (round-robin) to an approved endpoint → redirect to p0;
//! - `reverse established`: plink_provider, the backend's reply of one of
//!   those flows → redirect to c1;
//! - `new flow`: plink_consumer, a packet of a flow never seen (conntrack
//!   miss, admission caps, Maglev, NAT port allocation, three inserts) and
//!   then the whole forward path;
//! - `drop`: plink_consumer, a packet to an address with no endpoint
//!   (counted as `no_endpoint`); an IPv6 frame with a hop-by-hop header
//!   (the tail call to the IPv6 program, dropped at its next header); a TCP ACK to an approved endpoint without a flow (endpoint
//!   hit, conntrack miss). The drop rows are a ladder: each adds a known
//!   set of steps of the established path, so their differences say where
//!   the established path's time goes;
//! - `TCP ... proxy protocol off / on` (issue 18): the same TCP segment
//!   shapes (18 bytes of payload, no options) of 1,024 established flows
//!   through two endpoints of one service, one sending PROXY v2 headers:
//!   forward (a later client segment, its sequence number moved up when on),
//!   reverse (the backend's segment, its ack moved down when on), and the
//!   first data segment again (a retransmission: the header is inserted
//!   with `xdp_adjust_head`). `PLINK_BENCH_ONLY=proxy` runs only these rows
//!   and `bench_fwd`;
//! - `IPv6 forward / reverse established` (issue 19): the UDP established
//!   rows over IPv6 (NAT66; 80-byte frames for IPv4's 60, the same 18
//!   bytes of payload), through the tail-called IPv6 programs;
//! - `NAT64 forward / reverse established`: the same over NAT64 (an IPv6
//!   endpoint of the IPv4 service: 80-byte IPv6 frames out as 60-byte
//!   IPv4 ones, and back). `PLINK_BENCH_ONLY=ipv6` runs only these rows,
//!   the IPv6 ones, the IPv4 established
//!   rows they are compared with, and `bench_fwd`.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use plink_common::{DropReason, prog_names};
use plink_ctl::{
    EBPF_OBJECT,
    dataplane::{
        AnswerPath, BackendSpec, BackendState, CounterKind, Dataplane, DataplaneSpec, EndpointSpec,
        EndpointState, InterfaceRole, InterfaceSpec, NatSpec, PortSpec, Protocol, ServiceSpec,
        Sizes, TimeoutSpec,
    },
};
use plink_tests::{
    golden::verdict,
    netns::{Host, Topology},
    packet::{Ipv4Packet, Ipv6Packet, TCP_ACK, TCP_SYN},
};

use crate::{Settings, Spread, generator::pin_thread};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x10];
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const NOT_AN_ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 1);
const ENDPOINT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x100);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
/// Endpoint id of the IPv6 endpoint (UDP 53, service 2).
const ENDPOINT6_ID: u32 = 4;
/// The NAT64 endpoint: an IPv6 address of the IPv4 service 0 (UDP 53).
const ENDPOINT64: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 0x101);
const ENDPOINT64_ID: u32 = 5;
/// Established flows of the established rows.
const FLOWS: u16 = 1024;
/// CPU the measuring thread is pinned to.
const CPU: usize = 0;

pub struct Output {
    pub markdown: String,
    pub json: serde_json::Value,
}

const ROWS: [&str; 18] = [
    "bench_fwd (minimal forwarder)",
    "forward established",
    "reverse established",
    "new flow",
    "drop (no endpoint)",
    "drop (IPv6 extension header)",
    "drop (TCP without a flow)",
    "forward established, flow logs on",
    "reverse established, flow logs on",
    "TCP forward established, proxy protocol off",
    "TCP forward established, proxy protocol on",
    "TCP reverse established, proxy protocol off",
    "TCP reverse established, proxy protocol on",
    "TCP first data segment again, proxy protocol on (header inserted)",
    "IPv6 forward established",
    "IPv6 reverse established",
    "NAT64 forward established",
    "NAT64 reverse established",
];
/// Index of the first proxy-protocol row.
const PROXY_ROWS: usize = 9;
/// Index of the first IPv6 row (after the five proxy-protocol rows).
const IPV6_ROWS: usize = 14;

/// Which rows a run measures (`PLINK_BENCH_ONLY`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Only {
    All,
    /// `proxy`: bench_fwd and the proxy-protocol rows.
    Proxy,
    /// `ipv6`: bench_fwd, the IPv4 and IPv6 established rows.
    Ipv6,
}
/// Endpoint ports of the TCP rows: without and with PROXY headers.
const TCP_PORT_OFF: u16 = 80;
const TCP_PORT_ON: u16 = 81;
/// Endpoint id of the proxy-protocol endpoint.
const PROXY_ENDPOINT: u32 = 3;
/// Endpoint port of the flow-logged service (every flow logged).
const LOGGED_PORT: u16 = 54;

struct Ifaces {
    c1: u32,
    p0: u32,
    c1_mac: [u8; 6],
    p0_mac: [u8; 6],
}

fn build() -> anyhow::Result<(Topology, Host, Ifaces)> {
    let mut topo = Topology::new()?;
    let gw = topo.host("ppgw")?;
    let cn = topo.host("ppcn")?;
    let pv = topo.host("pppv")?;
    topo.link(&gw, "c1", &cn, "eth0")?;
    topo.link(&gw, "p0", &pv, "eth0")?;
    gw.ip(&["addr", "add", "198.18.0.254/24", "dev", "c1"])?;
    gw.ip(&["addr", "add", "198.19.0.254/24", "dev", "p0"])?;
    // bpf_fib_lookup from an ingress device needs forwarding on it (the
    // minimal forwarder looks up from c1, plink from p0).
    gw.sysctl("net.ipv4.conf.all.forwarding", "1")?;
    // IPv6 on the provider side only (test hosts start with it off), as in
    // the golden tests: p0 forwards (bpf_fib_lookup needs it), the IPv6
    // backend's neighbour is permanent.
    gw.sysctl("net.ipv6.conf.p0.disable_ipv6", "0")?;
    gw.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:100::254/64",
        "dev",
        "p0",
        "nodad",
    ])?;
    gw.sysctl("net.ipv6.conf.p0.forwarding", "1")?;
    gw.ip(&[
        "-6",
        "neigh",
        "replace",
        &BACKEND6.to_string(),
        "lladdr",
        "02:00:00:00:01:10",
        "dev",
        "p0",
        "nud",
        "permanent",
    ])?;
    gw.ip(&[
        "neigh",
        "replace",
        &BACKEND.to_string(),
        "lladdr",
        "02:00:00:00:01:10",
        "dev",
        "p0",
        "nud",
        "permanent",
    ])?;
    let ifaces = Ifaces {
        c1: gw.ifindex("c1")?,
        p0: gw.ifindex("p0")?,
        c1_mac: gw.mac("c1")?,
        p0_mac: gw.mac("p0")?,
    };
    Ok((topo, gw, ifaces))
}

/// One UDP service (53 → 5353, one backend, eight NAT addresses with the
/// full port range) behind one approved endpoint. Caps are set (as
/// `plink-ctl run` always sets them) but never reached.
fn spec(i: &Ifaces) -> DataplaneSpec {
    DataplaneSpec {
        interfaces: vec![
            InterfaceSpec {
                ifindex: i.c1,
                role: InterfaceRole::Consumer { network_id: 1 },
                mac: i.c1_mac,
                answers: AnswerPath::XdpTx,
            },
            InterfaceSpec {
                ifindex: i.p0,
                role: InterfaceRole::Provider,
                mac: i.p0_mac,
                answers: AnswerPath::XdpTx,
            },
        ],
        timeouts: TimeoutSpec::default(),
        services: vec![
            ServiceSpec {
                id: 0,
                nat: (0..8)
                    .map(|n| NatSpec {
                        addr: Ipv4Addr::new(198, 19, 0, 200 + n).into(),
                        ports: 1024..=65535,
                        draining: false,
                    })
                    .collect(),
                lookup: vec![0],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 0,
            },
            // The same service with every flow logged: the flow-logs rows.
            ServiceSpec {
                id: 1,
                nat: vec![NatSpec {
                    addr: Ipv4Addr::new(198, 19, 1, 200).into(),
                    ports: 1024..=65535,
                    draining: false,
                }],
                lookup: vec![1],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 1,
            },
            // The IPv6 rows: the same service shape over NAT66.
            ServiceSpec {
                id: 2,
                nat: (0..8)
                    .map(|n| NatSpec {
                        addr: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x200 + n).into(),
                        ports: 1024..=65535,
                        draining: false,
                    })
                    .collect(),
                lookup: vec![2],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 0,
            },
        ],
        backends: vec![
            BackendSpec {
                id: 0,
                service_id: 0,
                addr: BACKEND.into(),
                state: BackendState::Active,
            },
            BackendSpec {
                id: 1,
                service_id: 1,
                addr: BACKEND.into(),
                state: BackendState::Active,
            },
            BackendSpec {
                id: 2,
                service_id: 2,
                addr: BACKEND6.into(),
                state: BackendState::Active,
            },
        ],
        endpoints: vec![
            EndpointSpec {
                id: 0,
                network_id: 1,
                addr: ENDPOINT.into(),
                addr6: None,
                service_id: 0,
                protocol: Protocol::Udp,
                ports: vec![PortSpec {
                    port: 53,
                    target_port: 5353,
                }],
                state: EndpointState::Approved,
                max_flows: 100_000_000,
                new_flows_per_sec: 100_000_000,
            },
            EndpointSpec {
                id: 2,
                service_id: 1,
                ports: vec![PortSpec {
                    port: LOGGED_PORT,
                    target_port: 5353,
                }],
                ..EndpointSpec {
                    id: 0,
                    network_id: 1,
                    addr: ENDPOINT.into(),
                    addr6: None,
                    service_id: 0,
                    protocol: Protocol::Udp,
                    ports: Vec::new(),
                    state: EndpointState::Approved,
                    max_flows: 100_000_000,
                    new_flows_per_sec: 100_000_000,
                }
            },
            // For the `TCP without a flow` row: an ACK that opens nothing.
            EndpointSpec {
                id: 1,
                protocol: Protocol::Tcp,
                ports: vec![PortSpec {
                    port: 80,
                    target_port: 8080,
                }],
                ..EndpointSpec {
                    id: 0,
                    network_id: 1,
                    addr: ENDPOINT.into(),
                    addr6: None,
                    service_id: 0,
                    protocol: Protocol::Udp,
                    ports: Vec::new(),
                    state: EndpointState::Approved,
                    max_flows: 100_000_000,
                    new_flows_per_sec: 100_000_000,
                }
            },
            // The proxy-protocol rows: TCP 81 of the same service, with
            // a PROXY v2 header (Azure link id TLV, 36 bytes).
            EndpointSpec {
                id: PROXY_ENDPOINT,
                protocol: Protocol::Tcp,
                ports: vec![PortSpec {
                    port: TCP_PORT_ON,
                    target_port: 8081,
                }],
                ..EndpointSpec {
                    id: 0,
                    network_id: 1,
                    addr: ENDPOINT.into(),
                    addr6: None,
                    service_id: 0,
                    protocol: Protocol::Udp,
                    ports: Vec::new(),
                    state: EndpointState::Approved,
                    max_flows: 100_000_000,
                    new_flows_per_sec: 100_000_000,
                }
            },
            EndpointSpec {
                id: ENDPOINT6_ID,
                network_id: 1,
                addr: ENDPOINT6.into(),
                addr6: None,
                service_id: 2,
                protocol: Protocol::Udp,
                ports: vec![PortSpec {
                    port: 53,
                    target_port: 5353,
                }],
                state: EndpointState::Approved,
                max_flows: 100_000_000,
                new_flows_per_sec: 100_000_000,
            },
            // The NAT64 rows: IPv6 in front of the IPv4 service 0.
            EndpointSpec {
                id: ENDPOINT64_ID,
                network_id: 1,
                addr: ENDPOINT64.into(),
                addr6: None,
                service_id: 0,
                protocol: Protocol::Udp,
                ports: vec![PortSpec {
                    port: 53,
                    target_port: 5353,
                }],
                state: EndpointState::Approved,
                max_flows: 100_000_000,
                new_flows_per_sec: 100_000_000,
            },
        ],
        retired_nat: Default::default(),
        next_hops: Default::default(),
        proxy_headers: [(PROXY_ENDPOINT, proxy_header())].into_iter().collect(),
    }
}

fn proxy_header() -> plink_common::proxy::ProxyHeader {
    plink_common::proxy::build_header(plink_common::proxy::LinkIdTlv::Azure, 0x0102_0304, b"")
        .expect("an Azure header always fits")
}

/// TCP flags ACK|PSH.
const TCP_PSH_ACK: u8 = TCP_ACK | 0x08;

/// Frames of established TCP flows through the endpoint port `port`.
struct TcpFrames {
    /// A later client segment (18 bytes), per flow.
    fwd: Vec<Vec<u8>>,
    /// The backend's segment (18 bytes, acking everything), per flow.
    rev: Vec<Vec<u8>>,
    /// The client's first data segment (18 bytes), per flow.
    first: Vec<Vec<u8>>,
}

/// Opens `FLOWS` TCP flows to `port` from client ports `base..`: SYN,
/// SYN-ACK, ACK and the first data segment, each verdict checked, as a
/// client and backend would; returns the frames the rows measure.
fn tcp_flows(
    dp: &mut Dataplane,
    i: &Ifaces,
    port: u16,
    base: u16,
    pp_len: u32,
) -> anyhow::Result<TcpFrames> {
    let mut out = TcpFrames {
        fwd: Vec::new(),
        rev: Vec::new(),
        first: Vec::new(),
    };
    let isn = 1000u32;
    let backend_isn = 5000u32;
    let seg = |src, dst, flags, seq, ack, smac, dmac| {
        let mut p = Ipv4Packet::tcp(src, dst, flags).macs(smac, dmac);
        p.seq = seq;
        p.ack = ack;
        p
    };
    let step = |dp: &mut Dataplane, prog: &str, ifindex: u32, f: Vec<u8>, what: &str| {
        let r = plink_tests::golden::run(dp.program(prog)?, ifindex, &f)?;
        ensure!(
            r.verdict == verdict::REDIRECT,
            "opening a TCP flow to port {port}, {what}: verdict {}",
            r.verdict
        );
        Ok::<_, anyhow::Error>(r.output)
    };
    for n in 0..FLOWS {
        let client = (CLIENT, base + n);
        let ep = (ENDPOINT, port);
        let syn = seg(client, ep, TCP_SYN, isn, 0, CLIENT_MAC, i.c1_mac);
        let o = step(dp, prog_names::CONSUMER, i.c1, syn.build(), "SYN")?;
        let nat = (
            Ipv4Addr::new(o[26], o[27], o[28], o[29]),
            u16::from_be_bytes([o[34], o[35]]),
        );
        let backend = (BACKEND, u16::from_be_bytes([o[36], o[37]]));
        let synack = seg(
            backend,
            nat,
            TCP_SYN | TCP_ACK,
            backend_isn,
            isn + 1,
            BACKEND_MAC,
            i.p0_mac,
        );
        step(dp, prog_names::PROVIDER, i.p0, synack.build(), "SYN-ACK")?;
        let ack = seg(
            client,
            ep,
            TCP_ACK,
            isn + 1,
            backend_isn + 1,
            CLIENT_MAC,
            i.c1_mac,
        );
        step(dp, prog_names::CONSUMER, i.c1, ack.build(), "ACK")?;
        let mut first = seg(
            client,
            ep,
            TCP_PSH_ACK,
            isn + 1,
            backend_isn + 1,
            CLIENT_MAC,
            i.c1_mac,
        );
        first.payload = vec![0x5a; 18];
        let o = step(dp, prog_names::CONSUMER, i.c1, first.build(), "first data")?;
        ensure!(
            o.len() == first.build().len() + pp_len as usize,
            "first data segment to port {port}: {} bytes out, expected {} + {pp_len}",
            o.len(),
            first.build().len()
        );
        let mut later = first.clone();
        later.seq = isn + 1 + 18;
        let mut rev = seg(
            backend,
            nat,
            TCP_PSH_ACK,
            backend_isn + 1,
            isn + 1 + pp_len + 36,
            BACKEND_MAC,
            i.p0_mac,
        );
        rev.payload = vec![0xa5; 18];
        // What the rows measure: the client's sequence numbers moved up and
        // the backend's acks moved down by the header's length (0 when off).
        let o = step(dp, prog_names::CONSUMER, i.c1, later.build(), "later data")?;
        let seq = u32::from_be_bytes([o[38], o[39], o[40], o[41]]);
        ensure!(
            seq == later.seq + pp_len,
            "port {port}: later segment's seq {seq}, expected {} + {pp_len}",
            later.seq
        );
        let o = step(dp, prog_names::PROVIDER, i.p0, rev.build(), "backend data")?;
        let ack = u32::from_be_bytes([o[42], o[43], o[44], o[45]]);
        ensure!(
            ack == rev.ack - pp_len,
            "port {port}: backend segment's ack {ack}, expected {} - {pp_len}",
            rev.ack
        );
        out.fwd.push(later.build());
        out.rev.push(rev.build());
        out.first.push(first.build());
    }
    Ok(out)
}

/// 80-byte IPv6 UDP frame (18 bytes of payload).
fn udp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    Ipv6Packet::udp(src, dst, &[0x5a; 18])
        .macs(smac, dmac)
        .build()
}

/// 60-byte UDP frame (18 bytes of payload).
fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    Ipv4Packet::udp(src, dst, &[0x5a; 18])
        .macs(smac, dmac)
        .build()
}

/// The `xdp_md` context: data_end = the frame's length (the kernel checks
/// it), the ingress ifindex set.
fn ctx(ifindex: u32, len: usize) -> [u8; 24] {
    let mut c = [0u8; 24];
    c[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    c[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// Runs `runs` frames (frame `i` = `frame(i)`) through `prog` one call each,
/// asserting every verdict; returns ns per run from the kernel's run-time
/// stats and the mean of the calls' own `duration`.
fn measure(
    prog: &Xdp,
    ifindex: u32,
    runs: u32,
    want: u32,
    mut frame: impl FnMut(u32) -> std::borrow::Cow<'static, [u8]>,
) -> anyhow::Result<(f64, f64)> {
    let before = prog.info()?;
    let mut duration_ns = 0u128;
    for i in 0..runs {
        let f = frame(i);
        let ctx = ctx(ifindex, f.len());
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&f),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        if r.return_value != want {
            bail!("run {i}: verdict {} instead of {want}", r.return_value);
        }
        duration_ns += r.duration.as_nanos();
    }
    let after = prog.info()?;
    let cnt = after.run_count() - before.run_count();
    ensure!(
        cnt == u64::from(runs),
        "run_cnt moved by {cnt}, not {runs}: are run-time stats enabled?"
    );
    let ns = (after.run_time() - before.run_time()).as_nanos() as f64 / cnt as f64;
    Ok((ns, duration_ns as f64 / f64::from(runs)))
}

/// The frame of new flow number `n` (distinct source address and port).
fn new_flow_frame(n: u32, c1_mac: [u8; 6]) -> Vec<u8> {
    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + n / 50_000);
    udp(
        (src, 10_000 + (n % 50_000) as u16),
        (ENDPOINT, 53),
        CLIENT_MAC,
        c1_mac,
    )
}

/// One round: a fresh dataplane, 1,024 established flows, every row.
/// Returns ns per packet (run-time stats) and per-call duration per row.
fn round(i: &Ifaces, runs: u32, new_flow_base: u32, only: Only) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut dp = Dataplane::load_with(
        EBPF_OBJECT,
        None,
        Sizes {
            conntrack: 1 << 20,
            lb_table: 1024,
            ..Sizes::default()
        },
    )?;
    dp.apply(&spec(i))?;
    dp.load_programs()?;
    dp.program(prog_names::BENCH_FWD)?.load()?;

    // The established flows, and the replies their NAT mappings imply.
    let fwd: Vec<Vec<u8>> = (0..FLOWS)
        .map(|n| udp((CLIENT, 20_000 + n), (ENDPOINT, 53), CLIENT_MAC, i.c1_mac))
        .collect();
    let mut rev = Vec::with_capacity(fwd.len());
    for f in &fwd {
        let r = plink_tests::golden::run(dp.program(prog_names::CONSUMER)?, i.c1, f)?;
        ensure!(
            r.verdict == verdict::REDIRECT,
            "opening a flow: verdict {}",
            r.verdict
        );
        let o = &r.output;
        let nat = Ipv4Addr::new(o[26], o[27], o[28], o[29]);
        let nat_port = u16::from_be_bytes([o[34], o[35]]);
        rev.push(udp((BACKEND, 5353), (nat, nat_port), BACKEND_MAC, i.p0_mac));
    }
    // The same for flows of the flow-logged service (their start records
    // fill part of the ring, which nobody reads here).
    let logged_fwd: Vec<Vec<u8>> = (0..FLOWS)
        .map(|n| {
            udp(
                (CLIENT, 20_000 + n),
                (ENDPOINT, LOGGED_PORT),
                CLIENT_MAC,
                i.c1_mac,
            )
        })
        .collect();
    let mut logged_rev = Vec::with_capacity(logged_fwd.len());
    for f in &logged_fwd {
        let r = plink_tests::golden::run(dp.program(prog_names::CONSUMER)?, i.c1, f)?;
        ensure!(
            r.verdict == verdict::REDIRECT,
            "opening a logged flow: verdict {}",
            r.verdict
        );
        let o = &r.output;
        let nat = Ipv4Addr::new(o[26], o[27], o[28], o[29]);
        let nat_port = u16::from_be_bytes([o[34], o[35]]);
        logged_rev.push(udp((BACKEND, 5353), (nat, nat_port), BACKEND_MAC, i.p0_mac));
    }
    let ref_frames: Vec<Vec<u8>> = (0..FLOWS)
        .map(|n| udp((CLIENT, 20_000 + n), (BACKEND, 5353), CLIENT_MAC, i.c1_mac))
        .collect();
    let drop_frames: Vec<Vec<u8>> = (0..FLOWS)
        .map(|n| {
            udp(
                (CLIENT, 20_000 + n),
                (NOT_AN_ENDPOINT, 53),
                CLIENT_MAC,
                i.c1_mac,
            )
        })
        .collect();

    // A 60-byte IPv6 frame (header only, next header 0): the IPv6 program
    // drops it as soon as it reads the next header (hop-by-hop options).
    let mut v6 = vec![0u8; 60];
    v6[..6].copy_from_slice(&i.c1_mac);
    v6[6..12].copy_from_slice(&CLIENT_MAC);
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    v6[14] = 0x60;
    let v6_frames = vec![v6];
    let ack_frames: Vec<Vec<u8>> = (0..FLOWS)
        .map(|n| {
            Ipv4Packet::tcp((CLIENT, 30_000 + n), (ENDPOINT, 80), TCP_ACK)
                .macs(CLIENT_MAC, i.c1_mac)
                .build()
        })
        .collect();
    let pick = |v: &[Vec<u8>], n: u32| std::borrow::Cow::Owned(v[n as usize % v.len()].clone());

    let mut out = Vec::new();
    // bench_fwd.
    out.push(measure(
        dp.program(prog_names::BENCH_FWD)?,
        i.c1,
        runs,
        verdict::REDIRECT,
        |n| pick(&ref_frames, n),
    )?);
    let not_run = |out: &mut Vec<(f64, f64)>, rows: usize| {
        out.extend(std::iter::repeat_n((f64::NAN, f64::NAN), rows));
    };
    if only == Only::Proxy {
        not_run(&mut out, PROXY_ROWS - 1);
    } else {
        other_rows(
            &mut dp,
            i,
            runs,
            new_flow_base,
            &mut out,
            &fwd,
            &rev,
            &logged_fwd,
            &logged_rev,
            &drop_frames,
            &v6_frames,
            &ack_frames,
            only == Only::Ipv6,
        )?;
    }
    if only == Only::Ipv6 {
        not_run(&mut out, IPV6_ROWS - PROXY_ROWS);
    } else {
        proxy_rows(&mut dp, i, runs, &mut out)?;
    }
    if only == Only::Proxy {
        not_run(&mut out, ROWS.len() - IPV6_ROWS);
    } else {
        ipv6_rows(&mut dp, i, runs, &mut out, false)?;
        ipv6_rows(&mut dp, i, runs, &mut out, true)?;
    }
    Ok(out)
}

/// The IPv6 established rows: 1,024 UDP flows through NAT66 (or, `nat64`,
/// through NAT64 to the IPv4 service), opened in this round's dataplane,
/// then the client's packets and the backend's replies measured as the
/// IPv4 established rows.
fn ipv6_rows(
    dp: &mut Dataplane,
    i: &Ifaces,
    runs: u32,
    out: &mut Vec<(f64, f64)>,
    nat64: bool,
) -> anyhow::Result<()> {
    let (endpoint, endpoint_id) = if nat64 {
        (ENDPOINT64, ENDPOINT64_ID)
    } else {
        (ENDPOINT6, ENDPOINT6_ID)
    };
    let fwd: Vec<Vec<u8>> = (0..FLOWS)
        .map(|n| udp6((CLIENT6, 20_000 + n), (endpoint, 53), CLIENT_MAC, i.c1_mac))
        .collect();
    let mut rev = Vec::with_capacity(fwd.len());
    for f in &fwd {
        let r = plink_tests::golden::run(dp.program(prog_names::CONSUMER)?, i.c1, f)?;
        ensure!(
            r.verdict == verdict::REDIRECT,
            "opening an IPv6 flow: verdict {}",
            r.verdict
        );
        let o = &r.output;
        if nat64 {
            // The translated packet: IPv4 from the NAT address.
            let nat: [u8; 4] = o[26..30].try_into()?;
            let nat_port = u16::from_be_bytes([o[34], o[35]]);
            rev.push(udp(
                (BACKEND, 5353),
                (Ipv4Addr::from(nat), nat_port),
                BACKEND_MAC,
                i.p0_mac,
            ));
        } else {
            let nat: [u8; 16] = o[22..38].try_into()?;
            let nat_port = u16::from_be_bytes([o[54], o[55]]);
            rev.push(udp6(
                (BACKEND6, 5353),
                (Ipv6Addr::from(nat), nat_port),
                BACKEND_MAC,
                i.p0_mac,
            ));
        }
    }
    let created = |dp: &mut Dataplane| -> anyhow::Result<u64> {
        Ok(dp
            .counters(CounterKind::Endpoint, endpoint_id)?
            .flows_created)
    };
    let drops =
        |dp: &mut Dataplane| -> anyhow::Result<u64> { Ok(dp.drop_counts()?.values().sum()) };
    let pick = |v: &[Vec<u8>], n: u32| std::borrow::Cow::Owned(v[n as usize % v.len()].clone());
    let (c0, d0) = (created(dp)?, drops(dp)?);
    for (prog, ifindex, frames) in [
        (prog_names::CONSUMER, i.c1, &fwd),
        (prog_names::PROVIDER, i.p0, &rev),
    ] {
        out.push(measure(
            dp.program(prog)?,
            ifindex,
            runs,
            verdict::REDIRECT,
            |n| pick(frames, n),
        )?);
    }
    ensure!(
        created(dp)? == c0,
        "IPv6 established created flows (NAT64: {nat64})"
    );
    ensure!(
        drops(dp)? == d0,
        "IPv6 established dropped packets (NAT64: {nat64})"
    );
    Ok(())
}

/// Rows 1 to 8: the UDP established paths, new flows, drops, flow logs;
/// with `established_only` rows 1 and 2 only (the others not run).
#[allow(clippy::too_many_arguments)]
fn other_rows(
    dp: &mut Dataplane,
    i: &Ifaces,
    runs: u32,
    new_flow_base: u32,
    out: &mut Vec<(f64, f64)>,
    fwd: &[Vec<u8>],
    rev: &[Vec<u8>],
    logged_fwd: &[Vec<u8>],
    logged_rev: &[Vec<u8>],
    drop_frames: &[Vec<u8>],
    v6_frames: &[Vec<u8>],
    ack_frames: &[Vec<u8>],
    established_only: bool,
) -> anyhow::Result<()> {
    let created = |dp: &mut Dataplane| -> anyhow::Result<u64> {
        Ok(dp.counters(CounterKind::Endpoint, 0)?.flows_created)
    };
    let drops =
        |dp: &mut Dataplane| -> anyhow::Result<u64> { Ok(dp.drop_counts()?.values().sum()) };
    let reason = |dp: &mut Dataplane, r: DropReason| -> anyhow::Result<u64> {
        Ok(dp.drop_counts()?.get(&r).copied().unwrap_or(0))
    };
    let pick = |v: &[Vec<u8>], n: u32| std::borrow::Cow::Owned(v[n as usize % v.len()].clone());
    // Forward established: no flow created, nothing dropped.
    let (c0, d0) = (created(dp)?, drops(dp)?);
    out.push(measure(
        dp.program(prog_names::CONSUMER)?,
        i.c1,
        runs,
        verdict::REDIRECT,
        |n| pick(fwd, n),
    )?);
    ensure!(created(dp)? == c0, "forward established created flows");
    ensure!(drops(dp)? == d0, "forward established dropped packets");
    // Reverse established.
    out.push(measure(
        dp.program(prog_names::PROVIDER)?,
        i.p0,
        runs,
        verdict::REDIRECT,
        |n| pick(rev, n),
    )?);
    ensure!(drops(dp)? == d0, "reverse established dropped packets");
    if established_only {
        out.extend(std::iter::repeat_n((f64::NAN, f64::NAN), PROXY_ROWS - 3));
        return Ok(());
    }
    // New flows: every run creates exactly one.
    out.push(measure(
        dp.program(prog_names::CONSUMER)?,
        i.c1,
        runs,
        verdict::REDIRECT,
        |n| std::borrow::Cow::Owned(new_flow_frame(new_flow_base + n, i.c1_mac)),
    )?);
    ensure!(
        created(dp)? == c0 + u64::from(runs),
        "new flow: not every run created a flow"
    );
    ensure!(drops(dp)? == d0, "new flow dropped packets");
    // Drops: every run counted under its reason.
    let e0 = reason(dp, DropReason::NoEndpoint)?;
    out.push(measure(
        dp.program(prog_names::CONSUMER)?,
        i.c1,
        runs,
        verdict::DROP,
        |n| pick(drop_frames, n),
    )?);
    ensure!(
        reason(dp, DropReason::NoEndpoint)? == e0 + u64::from(runs),
        "drop: not every run counted as no_endpoint"
    );
    for (frames, r) in [
        (v6_frames, DropReason::Ipv6ExtensionHeader),
        (ack_frames, DropReason::TcpNoFlow),
    ] {
        let before = reason(dp, r)?;
        out.push(measure(
            dp.program(prog_names::CONSUMER)?,
            i.c1,
            runs,
            verdict::DROP,
            |n| pick(frames, n),
        )?);
        ensure!(
            reason(dp, r)? == before + u64::from(runs),
            "drop: not every run counted as {r:?}"
        );
    }
    // Established flows with flow logs on (their per-flow counters).
    let d0 = drops(dp)?;
    let logged_created = |dp: &mut Dataplane| -> anyhow::Result<u64> {
        Ok(dp.counters(CounterKind::Endpoint, 2)?.flows_created)
    };
    let l0 = logged_created(dp)?;
    out.push(measure(
        dp.program(prog_names::CONSUMER)?,
        i.c1,
        runs,
        verdict::REDIRECT,
        |n| pick(logged_fwd, n),
    )?);
    out.push(measure(
        dp.program(prog_names::PROVIDER)?,
        i.p0,
        runs,
        verdict::REDIRECT,
        |n| pick(logged_rev, n),
    )?);
    ensure!(
        logged_created(dp)? == l0,
        "logged established created flows"
    );
    ensure!(drops(dp)? == d0, "logged established dropped packets");
    Ok(())
}

/// The proxy-protocol rows: TCP flows with and without headers, opened in
/// this round's dataplane, then measured alike.
fn proxy_rows(
    dp: &mut Dataplane,
    i: &Ifaces,
    runs: u32,
    out: &mut Vec<(f64, f64)>,
) -> anyhow::Result<()> {
    let pp_len = u32::from(proxy_header().len);
    let off = tcp_flows(dp, i, TCP_PORT_OFF, 40_000, 0)?;
    let on = tcp_flows(dp, i, TCP_PORT_ON, 42_000, pp_len)?;
    let drops =
        |dp: &mut Dataplane| -> anyhow::Result<u64> { Ok(dp.drop_counts()?.values().sum()) };
    let created = |dp: &mut Dataplane| -> anyhow::Result<u64> {
        Ok(dp.counters(CounterKind::Endpoint, 1)?.flows_created
            + dp.counters(CounterKind::Endpoint, PROXY_ENDPOINT)?
                .flows_created)
    };
    let pick = |v: &[Vec<u8>], n: u32| std::borrow::Cow::Owned(v[n as usize % v.len()].clone());
    let (d0, c0) = (drops(dp)?, created(dp)?);
    for (prog, ifindex, frames) in [
        (prog_names::CONSUMER, i.c1, &off.fwd),
        (prog_names::CONSUMER, i.c1, &on.fwd),
        (prog_names::PROVIDER, i.p0, &off.rev),
        (prog_names::PROVIDER, i.p0, &on.rev),
        (prog_names::CONSUMER, i.c1, &on.first),
    ] {
        out.push(measure(
            dp.program(prog)?,
            ifindex,
            runs,
            verdict::REDIRECT,
            |n| pick(frames, n),
        )?);
    }
    ensure!(drops(dp)? == d0, "the TCP rows dropped packets");
    ensure!(created(dp)? == c0, "the TCP rows created flows");
    Ok(())
}

/// All rows, or those `only` names (`PLINK_BENCH_ONLY=proxy|ipv6`).
pub fn run(settings: &Settings, only: Only) -> anyhow::Result<Output> {
    let (_topo, gw, ifaces) = build()?;
    let rounds = settings.rounds;
    let runs = settings.runs_per_round;
    let results = gw.run_in(move || -> anyhow::Result<Vec<Vec<(f64, f64)>>> {
        pin_thread(CPU)?;
        // Held for the whole measurement: the kernel accounts run time
        // while at least one such fd is open.
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| anyhow!("bpf_enable_stats(BPF_STATS_RUN_TIME): {e}"))?;
        let mut all = Vec::new();
        for r in 0..rounds {
            let res = round(&ifaces, runs, 0, only)?;
            eprintln!(
                "per-packet round {}: {}",
                r + 1,
                res.iter()
                    .zip(ROWS)
                    .filter(|((ns, _), _)| ns.is_finite())
                    .map(|((ns, _), name)| format!("{name} {ns:.1} ns"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            all.push(res);
        }
        Ok(all)
    })??;

    let mut md =
        String::from("### Per-packet cost (BPF_PROG_TEST_RUN, one pristine frame per call)\n\n");
    md.push_str(&format!(
        "{} runs per path per round × {} rounds; ns per packet = Δrun_time_ns ÷ Δrun_cnt \
         (bpf_enable_stats); ratio = row ÷ bench_fwd within each round, then medianed.\n\n",
        runs, rounds
    ));
    md.push_str("| path | ns/packet median (min–max) | ratio to bench_fwd | call duration ns (kernel timer) | target | met |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- |\n");
    let mut json_rows = Vec::new();
    for (k, name) in ROWS.iter().enumerate() {
        let ns: Vec<f64> = results.iter().map(|r| r[k].0).collect();
        let dur: Vec<f64> = results.iter().map(|r| r[k].1).collect();
        let ratio: Vec<f64> = results.iter().map(|r| r[k].0 / r[0].0).collect();
        let (ns, dur, ratio) = (Spread::of(&ns), Spread::of(&dur), Spread::of(&ratio));
        if !ns.median.is_finite() {
            // Not run (PLINK_BENCH_ONLY=proxy or ipv6).
            continue;
        }
        let (target, met) = match k {
            1 | 2 => (
                "≤ 1.5× bench_fwd",
                if ratio.median <= 1.5 { "yes" } else { "no" },
            ),
            // The cost of flow logs: these rows against rows 1 and 2.
            7 | 8 => ("reported (vs. the row without)", "—"),
            k if k >= IPV6_ROWS + 2 => ("reported (NAT64 ÷ IPv4 below)", "—"),
            IPV6_ROWS.. => ("reported (IPv6 ÷ IPv4 below)", "—"),
            PROXY_ROWS.. => ("reported (on ÷ off below)", "—"),
            _ => ("—", "—"),
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {target} | {met} |\n",
            ns.fmt(1.0, 1),
            ratio.fmt(1.0, 2),
            dur.fmt(1.0, 0)
        ));
        json_rows.push(serde_json::json!({
            "path": name,
            "ns_per_packet": ns.json(),
            "ratio_to_bench_fwd": ratio.json(),
            "call_duration_ns": dur.json(),
            "target": target,
            "met": met,
        }));
    }
    // Flow logs on ÷ off, per direction, within each round.
    let mut flow_logs = Vec::new();
    if only == Only::All {
        for (on, off, what) in [(7, 1, "forward"), (8, 2, "reverse")] {
            let r: Vec<f64> = results.iter().map(|x| x[on].0 / x[off].0).collect();
            let r = Spread::of(&r);
            md.push_str(&format!(
                "\nFlow logs on ÷ off, {what} established: {} (per-flow counters: two atomic adds per packet of a logged flow; other flows pay one flag test).",
                r.fmt(1.0, 2)
            ));
            flow_logs.push(serde_json::json!({"direction": what, "ratio_on_to_off": r.json()}));
        }
    }
    // Proxy protocol on ÷ off, same segment shapes, within each round.
    let mut proxy = Vec::new();
    let p = PROXY_ROWS;
    let proxy_pairs = if only == Only::Ipv6 {
        &[][..]
    } else {
        &[
            (
                p + 1,
                p,
                "TCP forward established (sequence number moved up)",
            ),
            (p + 3, p + 2, "TCP reverse established (ack moved down)"),
            (
                p + 4,
                p,
                "TCP first data segment, header inserted, against a forward established segment without",
            ),
        ][..]
    };
    for &(on, off, what) in proxy_pairs {
        let r: Vec<f64> = results.iter().map(|x| x[on].0 / x[off].0).collect();
        let r = Spread::of(&r);
        md.push_str(&format!(
            "\nProxy protocol on ÷ off, {what}: {}.",
            r.fmt(1.0, 2)
        ));
        proxy.push(serde_json::json!({"path": what, "ratio_on_to_off": r.json()}));
    }
    // IPv6 ÷ IPv4, established, per direction, within each round.
    let mut ipv6 = Vec::new();
    if only != Only::Proxy {
        let notes = [
            "; both families' forward paths read the flow's cached next hop",
            "",
        ];
        for ((v6, v4, what), note) in [(IPV6_ROWS, 1, "forward"), (IPV6_ROWS + 1, 2, "reverse")]
            .into_iter()
            .zip(notes)
        {
            let r: Vec<f64> = results.iter().map(|x| x[v6].0 / x[v4].0).collect();
            let r = Spread::of(&r);
            md.push_str(&format!(
                "\nIPv6 ÷ IPv4, {what} established: {} (UDP, 80- vs. 60-byte frames{note}).",
                r.fmt(1.0, 2)
            ));
            ipv6.push(serde_json::json!({"direction": what, "ratio_ipv6_to_ipv4": r.json()}));
        }
        for (v64, v4, what) in [(IPV6_ROWS + 2, 1, "forward"), (IPV6_ROWS + 3, 2, "reverse")] {
            let r: Vec<f64> = results.iter().map(|x| x[v64].0 / x[v4].0).collect();
            let r = Spread::of(&r);
            md.push_str(&format!(
                "\nNAT64 ÷ IPv4, {what} established: {} (UDP; the header translated, the frame 20 bytes shorter or longer).",
                r.fmt(1.0, 2)
            ));
            ipv6.push(serde_json::json!({"direction": what, "nat64": true, "ratio_nat64_to_ipv4": r.json()}));
        }
    }
    md.push('\n');
    Ok(Output {
        markdown: md,
        json: serde_json::json!({"runs_per_round": runs, "rounds": rounds, "rows": json_rows, "flow_logs": flow_logs, "proxy_protocol": proxy, "ipv6": ipv6}),
    })
}
