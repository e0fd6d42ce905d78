//! The datapath end to end over veths, without the controller: the test
//! loads the programs in a gateway namespace, attaches them natively, fills
//! the maps through `Dataplane::apply`, and sends real traffic.
//!
//! ```text
//!  cn1 (192.0.2.1) ── c1 ┐                 ┌ p0 ── pv: 198.51.100.10 (service A)
//!                        ├─ gw (XDP) ──────┤           198.51.100.11 (service B)
//!  cn2 (192.0.2.1) ── c2 ┘                 └ 198.51.100.1/24
//!   └─ router for cl3 (203.0.113.10)
//! ```
//!
//! cn1 and cn2 have the same address and reach the same endpoint address,
//! which is service A in network 1 and service B in network 2.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::programs::XdpMode;
use plink_common::DropReason;
use plink_ctl::{
    EBPF_OBJECT,
    dataplane::{
        AnswerPath, BackendSpec, BackendState, CounterKind, Dataplane, DataplaneSpec, EndpointSpec,
        EndpointState, InterfaceRole, InterfaceSpec, NatSpec, PortSpec, Protocol, ServiceSpec,
        Sizes, TimeoutSpec, garp, neigh,
    },
};
use plink_tests::{
    netns::{self, Host, Topology},
    servers,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CL3: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const NAT_A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
const NAT_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 201);

/// Sum of a veth's per-queue ethtool counters ending in `suffix`.
fn ethtool_sum(host: &Host, dev: &str, suffix: &str) -> u64 {
    host.exec("ethtool", &["-S", dev])
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.ends_with(suffix))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// `Ip: ForwDatagrams` from a namespace's /proc/net/snmp.
fn forwarded(host: &Host) -> u64 {
    let snmp = host.exec("cat", &["/proc/net/snmp"]).unwrap();
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        panic!("no Ip: lines in /proc/net/snmp");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .expect("ForwDatagrams");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Frames a veth with an XDP program received (every frame passes through
/// the program). Not /sys/class/net: `nsenter --net` keeps the caller's /sys.
fn rx_packets(host: &Host, dev: &str) -> u64 {
    ethtool_sum(host, dev, "_xdp_packets")
}

/// An XDP program that passes everything, attached in another namespace
/// and kept there until dropped.
struct PassXdp {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PassXdp {
    fn attach(host: &Host, dev: &str) -> Self {
        let ifindex = host.ifindex(dev).unwrap();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let host = host.clone();
        let thread = std::thread::spawn(move || {
            host.run_in(move || {
                let attached = (|| -> anyhow::Result<Dataplane> {
                    let small = Sizes {
                        conntrack: 16,
                        lb_table: 16,
                        ..Sizes::default()
                    };
                    let mut dp = Dataplane::load_with(EBPF_OBJECT, None, small)?;
                    dp.attach(ifindex, InterfaceRole::Provider, XdpMode::Driver)?;
                    Ok(dp)
                })();
                match attached {
                    Ok(dp) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stopped.recv();
                        drop(dp);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .unwrap();
        });
        ready.recv().unwrap().unwrap();
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for PassXdp {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn overlapping_consumers_reach_their_services_over_xdp() {
    netns::require_root_and_tools();
    let mut topo = Topology::new().unwrap();
    let gw = topo.host("gw").unwrap();
    let cn1 = topo.host("cn1").unwrap();
    let cn2 = topo.host("cn2").unwrap();
    let cl3 = topo.host("cl3").unwrap();
    let pv = topo.host("pv").unwrap();
    topo.link(&gw, "c1", &cn1, "eth0").unwrap();
    topo.link(&gw, "c2", &cn2, "eth0").unwrap();
    topo.link(&gw, "p0", &pv, "eth0").unwrap();
    topo.link(&cn2, "eth1", &cl3, "eth0").unwrap();

    // Far ends of redirect / XDP_TX targets need NAPI (SPEC §7). GRO alone
    // did not deliver XDP_TX frames on 6.18 here: attach an XDP program
    // that passes everything (plink's provider program with empty maps).
    let _far_ends: Vec<PassXdp> = [(&cn1, "eth0"), (&cn2, "eth0"), (&pv, "eth0")]
        .into_iter()
        .map(|(h, dev)| PassXdp::attach(h, dev))
        .collect();
    cn1.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])
        .unwrap();
    cn2.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])
        .unwrap();
    cn2.ip(&["addr", "add", "203.0.113.1/24", "dev", "eth1"])
        .unwrap();
    cn2.sysctl("net.ipv4.ip_forward", "1").unwrap();
    cl3.ip(&["addr", "add", "203.0.113.10/24", "dev", "eth0"])
        .unwrap();
    cl3.ip(&["route", "add", "default", "via", "203.0.113.1"])
        .unwrap();
    cn1.sysctl("net.ipv4.conf.eth0.arp_accept", "1").unwrap();
    pv.ip(&["addr", "add", "198.51.100.10/24", "dev", "eth0"])
        .unwrap();
    pv.ip(&["addr", "add", "198.51.100.11/24", "dev", "eth0"])
        .unwrap();
    gw.ip(&["addr", "add", "198.51.100.1/24", "dev", "p0"])
        .unwrap();
    gw.sysctl("net.ipv4.conf.p0.forwarding", "1").unwrap();
    // Isolation probes from cn1 need a next hop into the gateway.
    let c1_mac = gw.mac("c1").unwrap();
    cn1.neigh_permanent("192.0.2.254", c1_mac, "eth0").unwrap();
    cn1.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.254"])
        .unwrap();

    let _srv_a = servers::start(&pv, BACKEND_A, 8080, true, true).unwrap();
    let srv_b = servers::start(&pv, BACKEND_B, 8080, true, true).unwrap();

    let ep = |id, network_id, service_id, protocol, port| EndpointSpec {
        id,
        network_id,
        addr: EP.into(),
        addr6: None,
        service_id,
        protocol,
        ports: vec![PortSpec {
            port,
            target_port: 8080,
        }],
        state: EndpointState::Approved,
        max_flows: 0,
        new_flows_per_sec: 0,
    };
    let spec = DataplaneSpec {
        interfaces: vec![
            InterfaceSpec {
                ifindex: gw.ifindex("c1").unwrap(),
                role: InterfaceRole::Consumer { network_id: 1 },
                mac: c1_mac,
                answers: AnswerPath::Redirect,
            },
            InterfaceSpec {
                ifindex: gw.ifindex("c2").unwrap(),
                role: InterfaceRole::Consumer { network_id: 2 },
                mac: gw.mac("c2").unwrap(),
                answers: AnswerPath::Redirect,
            },
            InterfaceSpec {
                ifindex: gw.ifindex("p0").unwrap(),
                role: InterfaceRole::Provider,
                mac: gw.mac("p0").unwrap(),
                answers: AnswerPath::Redirect,
            },
        ],
        timeouts: TimeoutSpec::default(),
        services: vec![
            ServiceSpec {
                id: 0,
                nat: vec![NatSpec {
                    addr: NAT_A.into(),
                    ports: 1024..=65535,
                    draining: false,
                }],
                lookup: vec![0; 13],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 0,
            },
            ServiceSpec {
                id: 1,
                nat: vec![NatSpec {
                    addr: NAT_B.into(),
                    ports: 1024..=65535,
                    draining: false,
                }],
                lookup: vec![1; 13],
                mss_clamp: plink_common::MSS_CLAMP_OFF,
                flow_log_sample: 0,
            },
        ],
        backends: vec![
            BackendSpec {
                id: 0,
                service_id: 0,
                addr: BACKEND_A.into(),
                state: BackendState::Active,
            },
            BackendSpec {
                id: 1,
                service_id: 1,
                addr: BACKEND_B.into(),
                state: BackendState::Active,
            },
        ],
        endpoints: vec![
            ep(0, 1, 0, Protocol::Tcp, 80),
            ep(1, 1, 0, Protocol::Udp, 53),
            ep(2, 2, 1, Protocol::Tcp, 80),
        ],
        retired_nat: Default::default(),
        next_hops: Default::default(),
        proxy_headers: Default::default(),
    };

    // The dataplane lives on a thread inside the gateway namespace for the
    // whole test; the test body drives it through a channel.
    let (to_gw, gw_rx) = std::sync::mpsc::channel::<Cmd>();
    let (gw_tx, from_gw) = std::sync::mpsc::channel::<Answer>();
    enum Cmd {
        Report,
        Stop,
    }
    struct Answer {
        ep_counters: Vec<plink_common::Counters>,
        drops: std::collections::BTreeMap<DropReason, u64>,
        flows: usize,
    }
    let gw_thread = {
        let gw = gw.clone();
        let spec = spec.clone();
        std::thread::spawn(move || {
            gw.run_in(move || -> anyhow::Result<()> {
                let mut dp = Dataplane::load_with(EBPF_OBJECT, None, Sizes::default())?;
                dp.apply(&spec)?;
                for i in &spec.interfaces {
                    dp.attach(i.ifindex, i.role, XdpMode::Driver)?;
                }
                // Managed neighbours: the kernel keeps the backends resolved.
                for (ifindex, addr) in spec.managed_neighbours() {
                    neigh::ensure_managed(ifindex, addr)?;
                }
                for (ifindex, mac, addrs) in spec.garp_plan() {
                    garp::announce(ifindex, mac, &addrs)?;
                }
                gw_tx.send(Answer {
                    ep_counters: vec![],
                    drops: Default::default(),
                    flows: 0,
                })?;
                while let Ok(cmd) = gw_rx.recv() {
                    match cmd {
                        Cmd::Stop => break,
                        Cmd::Report => gw_tx.send(Answer {
                            ep_counters: (0..3)
                                .map(|i| dp.counters(CounterKind::Endpoint, i))
                                .collect::<Result<_, _>>()?,
                            drops: dp.drop_counts()?,
                            flows: dp.list_conntrack()?.len(),
                        })?,
                    }
                }
                Ok(())
            })
        })
    };
    from_gw
        .recv_timeout(Duration::from_secs(30))
        .expect("dataplane up");

    // Gratuitous ARP taught cn1 the endpoint's MAC (it accepts GARP).
    netns::wait_for(
        "cn1 to learn the endpoint from GARP",
        Duration::from_secs(5),
        || {
            let neigh = cn1.ip(&["neigh", "show", "192.0.2.50"])?;
            Ok(neigh.contains(&netns::mac_text(c1_mac)).then_some(()))
        },
    )
    .unwrap();

    netns::wait_for(
        "managed neighbours to resolve",
        Duration::from_secs(5),
        || {
            let n = gw.ip(&["neigh", "show", "dev", "p0"])?;
            let ok = |ip: &str| {
                n.lines().any(|l| {
                    l.starts_with(&format!("{ip} "))
                        && l.contains("managed")
                        && l.contains("REACHABLE")
                })
            };
            Ok((ok("198.51.100.10") && ok("198.51.100.11")).then_some(()))
        },
    )
    .unwrap();
    let fwd_before = forwarded(&gw);
    let redirects_before = ethtool_sum(&gw, "c1", "xdp_redirect");
    let pv_rx_before = rx_packets(&pv, "eth0");

    // Identical 5-tuples from both consumer networks at the same time.
    let dst = SocketAddrV4::new(EP, 80);
    let src = SocketAddrV4::new(CLIENT, 40000);
    let (h1, h2) = (cn1.clone(), cn2.clone());
    let t1 = std::thread::spawn(move || servers::tcp_request(&h1, Some(src), dst, 1 << 20));
    let t2 = std::thread::spawn(move || servers::tcp_request(&h2, Some(src), dst, 1 << 20));
    let r1 = t1.join().unwrap().unwrap();
    let r2 = t2.join().unwrap().unwrap();
    assert_eq!(r1.body_len, 1 << 20);
    assert_eq!(r2.body_len, 1 << 20);
    assert_eq!(*r1.local.ip(), BACKEND_A, "network 1 reaches service A");
    assert_eq!(*r2.local.ip(), BACKEND_B, "network 2 reaches service B");
    assert_eq!(*r1.peer.ip(), NAT_A, "backend A sees only its NAT address");
    assert_eq!(*r2.peer.ip(), NAT_B, "backend B sees only its NAT address");

    // UDP request/reply through the same endpoint address.
    let u = servers::udp_request(
        &cn1,
        SocketAddrV4::new(CLIENT, 40001),
        SocketAddrV4::new(EP, 53),
    )
    .unwrap();
    assert_eq!(*u.local.ip(), BACKEND_A);
    assert_eq!(*u.peer.ip(), NAT_A);

    // A client behind a router in network 2.
    let r3 = servers::tcp_request(&cl3, None, dst, 100_000).unwrap();
    assert_eq!(r3.body_len, 100_000);
    assert_eq!(*r3.local.ip(), BACKEND_B);
    assert_eq!(*r3.peer.ip(), NAT_B);
    let _ = CL3;

    // Kernel evidence: nothing was forwarded by the gateway's stack, XDP redirected.
    assert_eq!(
        forwarded(&gw),
        fwd_before,
        "the gateway kernel forwarded nothing"
    );
    assert!(
        ethtool_sum(&gw, "c1", "xdp_redirect") > redirects_before,
        "c1's XDP redirect counter grew"
    );

    // Isolation: provider addresses, other ports, the gateway, NAT addresses.
    let served_b = srv_b.served.load(std::sync::atomic::Ordering::SeqCst);
    let pv_rx = rx_packets(&pv, "eth0");
    assert!(pv_rx > pv_rx_before, "{pv_rx} > {pv_rx_before}");
    to_gw.send(Cmd::Report).unwrap();
    let before = from_gw.recv_timeout(Duration::from_secs(10)).unwrap();
    let probes = [
        SocketAddrV4::new(BACKEND_A, 8080),
        SocketAddrV4::new(BACKEND_B, 8080),
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 1), 22),
        SocketAddrV4::new(NAT_A, 1024),
        SocketAddrV4::new(EP, 81),
    ];
    for p in probes {
        cn1.run_in(move || {
            let s = std::net::UdpSocket::bind("192.0.2.1:0").unwrap();
            s.send_to(b"GET 0\n", p).unwrap();
        })
        .unwrap();
    }
    // XDP runs in the receiver's softirq: wait until all probes were seen.
    let report = || {
        to_gw.send(Cmd::Report).unwrap();
        from_gw.recv_timeout(Duration::from_secs(10)).unwrap()
    };
    let no_ep = |a: &Answer| a.drops[&DropReason::NoEndpoint];
    let after = netns::wait_for("the probes to be dropped", Duration::from_secs(5), || {
        let a = report();
        Ok((no_ep(&a) - no_ep(&before) >= probes.len() as u64).then_some(a))
    })
    .unwrap();
    assert_eq!(
        after.drops[&DropReason::NoEndpoint] - before.drops[&DropReason::NoEndpoint],
        probes.len() as u64,
        "every probe dropped as no_endpoint"
    );
    assert_eq!(
        rx_packets(&pv, "eth0"),
        pv_rx,
        "no probe reached the provider"
    );
    assert_eq!(
        srv_b.served.load(std::sync::atomic::Ordering::SeqCst),
        served_b
    );

    // Forged "replies" from the provider side to a NAT port without a flow
    // never reach a consumer.
    let cn1_rx = rx_packets(&cn1, "eth0");
    let forged_before = after.drops[&DropReason::ReplyNoFlow];
    pv.run_in(|| {
        let s = std::net::UdpSocket::bind("198.51.100.10:9999").unwrap();
        s.send_to(b"forged", "198.51.100.200:1").unwrap();
    })
    .unwrap();
    let after = netns::wait_for(
        "the forged reply to be dropped",
        Duration::from_secs(5),
        || {
            let a = report();
            Ok((a.drops[&DropReason::ReplyNoFlow] > forged_before).then_some(a))
        },
    )
    .unwrap();
    assert_eq!(after.drops[&DropReason::ReplyNoFlow], forged_before + 1);
    assert_eq!(rx_packets(&cn1, "eth0"), cn1_rx, "nothing reached cn1");

    // No kernel NAT on the gateway: no nftables rules, no conntrack entries.
    let rules = gw.exec("nft", &["list", "ruleset"]).unwrap();
    assert!(rules.trim().is_empty(), "nftables ruleset: {rules}");
    if let Ok(count) = gw.exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"]) {
        assert_eq!(count.trim(), "0", "kernel conntrack entries on the gateway");
    }

    // Per-endpoint counters saw both directions; flows are in conntrack.
    let c = &after.ep_counters;
    assert!(
        c[0].bytes_out > 1 << 20,
        "endpoint 0 carried the 1 MB response"
    );
    assert!(
        c[2].bytes_out > 1 << 20,
        "endpoint 2 carried the 1 MB response"
    );
    assert_eq!(c[0].flows_created, 1);
    assert_eq!(c[1].flows_created, 1);
    assert_eq!(c[2].flows_created, 2);
    assert_eq!(after.flows, 4);

    to_gw.send(Cmd::Stop).unwrap();
    gw_thread.join().unwrap().unwrap().unwrap();
}
