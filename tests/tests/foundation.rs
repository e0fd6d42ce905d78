//! Foundation tests: the harnesses themselves, a golden-packet case through
//! BPF_PROG_TEST_RUN, and end-to-end traffic through a gateway namespace.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use aya::maps::{PerCpuHashMap, PerCpuValues};
use plink_common::{IfStats, map_names, prog_names};
use plink_tests::{
    gateway,
    golden::{self, verdict},
    netns::{self, Topology, wait_for},
};

/// A minimal Ethernet/IPv4/UDP frame with valid checksums.
fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = 20 + 8 + payload.len();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    pseudo.extend_from_slice(&udp);
    let c = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&udp);
    f
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn golden_packet_harness_runs_a_frame_with_ingress_ifindex() {
    netns::require_root_and_tools();
    let mut topo = Topology::new().unwrap();
    let gw = topo.host("gw").unwrap();
    let peer = topo.host("peer").unwrap();
    topo.link(&gw, "c1", &peer, "eth0").unwrap();
    let ifindex = gw.ifindex("c1").unwrap();

    let frame = udp_frame(
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(198, 51, 100, 10),
        40000,
        9999,
        b"golden",
    );
    // (name, input, expected verdict, expected output)
    type Case = (&'static str, Vec<u8>, u32, Option<Vec<u8>>);
    let cases: Vec<Case> = vec![
        (
            "udp passes unchanged",
            frame.clone(),
            verdict::PASS,
            Some(frame.clone()),
        ),
        (
            "truncated IPv4 passes",
            frame[..20].to_vec(),
            verdict::PASS,
            Some(frame[..20].to_vec()),
        ),
    ];
    let inputs: Vec<Vec<u8>> = cases.iter().map(|c| c.1.clone()).collect();
    let results = gw
        .run_in(move || -> anyhow::Result<(Vec<golden::XdpRun>, IfStats)> {
            let mut ebpf = golden::load_unpinned()?;
            {
                let map = ebpf.map_mut(map_names::IF_STATS).expect("IF_STATS");
                let mut stats: PerCpuHashMap<_, u32, IfStats> = PerCpuHashMap::try_from(map)?;
                let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
                stats.insert(
                    ifindex,
                    PerCpuValues::try_from(vec![IfStats::default(); cpus])?,
                    0,
                )?;
            }
            // The provider program passes traffic that is not for a NAT
            // address unchanged (the consumer one now drops it by contract).
            let prog = golden::xdp_program(&mut ebpf, prog_names::PROVIDER)?;
            let mut runs = Vec::new();
            for input in &inputs {
                runs.push(golden::run(prog, ifindex, input)?);
            }
            let map = ebpf.map(map_names::IF_STATS).expect("IF_STATS");
            let stats: PerCpuHashMap<_, u32, IfStats> = PerCpuHashMap::try_from(map)?;
            let mut total = IfStats::default();
            for v in stats.get(&ifindex, 0)?.iter() {
                total.add(v);
            }
            Ok((runs, total))
        })
        .unwrap()
        .unwrap();
    let (runs, stats) = results;
    assert_eq!(runs.len(), cases.len());
    for ((name, _, want_verdict, want_output), run) in cases.iter().zip(&runs) {
        assert_eq!(run.verdict, *want_verdict, "{name}: verdict");
        if let Some(out) = want_output {
            assert_eq!(&run.output, out, "{name}: output bytes");
        }
    }
    assert_eq!(
        stats.packets, 2,
        "both frames counted on the ingress ifindex"
    );
    assert_eq!(
        stats.ipv4_packets, 2,
        "both frames carry the IPv4 ether type"
    );
    assert_eq!(stats.arp_packets, 0);
}

/// consumer — gateway — provider, with `plink-ctl run` on the gateway: the
/// per-interface IPv4 counter equals exactly what was sent.
/// consumer — gateway — provider, with `plink-ctl run` on the gateway and one
/// UDP endpoint: the per-interface IPv4 counter equals exactly what was sent.
#[test]
fn end_to_end_counts_every_udp_packet_through_the_gateway() {
    netns::require_root_and_tools();
    let mut topo = Topology::new().unwrap();
    let client = topo.host("cl").unwrap();
    let gw = topo.host("gw").unwrap();
    let server = topo.host("sv").unwrap();
    topo.link(&client, "eth0", &gw, "c1").unwrap();
    topo.link(&gw, "p0", &server, "eth0").unwrap();
    client
        .ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])
        .unwrap();
    gw.ip(&["addr", "add", "198.51.100.254/24", "dev", "p0"])
        .unwrap();
    gw.sysctl("net.ipv4.conf.all.forwarding", "1").unwrap();
    gw.sysctl("net.ipv4.conf.c1.forwarding", "0").unwrap();
    server
        .ip(&["addr", "add", "198.51.100.10/24", "dev", "eth0"])
        .unwrap();
    topo.enable_napi(&client, "eth0").unwrap();
    topo.enable_napi(&server, "eth0").unwrap();

    let config = format!(
        "{}interfaces:
  - {{name: c1, role: consumer, network: vnet-a}}
  - {{name: p0, role: provider}}
services:
  - name: sink
    protocol: udp
    ports: [{{port: 9999}}]
    backends: [{{address: 198.51.100.10}}]
    nat: {{addresses: [198.51.100.200]}}
    visibility: ['*']
    auto_approve: ['*']
endpoints:
  - {{name: sink-a, tenant: t, network: vnet-a, address: 192.0.2.50, service: sink}}
",
        gateway::gateway_section(&topo).unwrap()
    );
    let gwp = gateway::start(&mut topo, &gw, &config).unwrap();
    // The endpoint answers ARP from XDP: resolve it before counting.
    client
        .exec("ping", &["-c", "1", "-W", "2", "192.0.2.50"])
        .ok();
    client
        .ip(&["neigh", "show", "192.0.2.50"])
        .map(|n| assert!(n.contains("lladdr"), "endpoint ARP unanswered: {n}"))
        .unwrap();
    let before = wait_for("counters", Duration::from_secs(5), || {
        let out = gwp.ctl(&gw, &["stats", "--json"])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        Ok(json["interfaces"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == "c1"))
            .and_then(|i| i["ipv4_packets"].as_u64()))
    })
    .unwrap();

    // Receiver in the provider namespace counts what arrives.
    const COUNT: usize = 200;
    const PAYLOAD: usize = 100;
    let receiver = server
        .run_in(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9999)))
        .unwrap()
        .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Lock-step: each datagram is sent once the previous one arrived, so no
    // queue on the path can overflow and the counts must be exact.
    let (arrived_tx, arrived_rx) = std::sync::mpsc::channel::<usize>();
    let receiving = std::thread::spawn(move || {
        let mut sizes = Vec::new();
        let mut buf = [0u8; 2048];
        while sizes.len() < COUNT {
            match receiver.recv(&mut buf) {
                Ok(n) => {
                    sizes.push(n);
                    let _ = arrived_tx.send(n);
                }
                Err(_) => break,
            }
        }
        sizes
    });
    client
        .run_in(move || -> std::io::Result<()> {
            let sock = UdpSocket::bind("192.0.2.1:40000")?;
            for i in 0..COUNT {
                let mut payload = [0u8; PAYLOAD];
                payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
                sock.send_to(&payload, "192.0.2.50:9999")?;
                if arrived_rx.recv_timeout(Duration::from_secs(5)).is_err() {
                    break;
                }
            }
            Ok(())
        })
        .unwrap()
        .unwrap();
    let sizes = receiving.join().unwrap();
    if sizes.len() != COUNT {
        let scrape = gwp.scrape(&gw).unwrap_or_default();
        let drops: Vec<&str> = scrape
            .lines()
            .filter(|l| l.starts_with("plink_drops_total") && !l.ends_with(" 0"))
            .collect();
        panic!(
            "{} of {COUNT} datagrams received in the provider namespace; drops: {drops:?}; neighbours: {}",
            sizes.len(),
            gw.ip(&["neigh"]).unwrap_or_default()
        );
    }
    assert!(sizes.iter().all(|&n| n == PAYLOAD));

    let c1 = gw.ifindex("c1").unwrap();
    let p0 = gw.ifindex("p0").unwrap();
    let stats = wait_for(
        "counters to show every packet",
        Duration::from_secs(5),
        || {
            let out = gwp.ctl(&gw, &["stats", "--json"])?;
            let json: serde_json::Value = serde_json::from_str(&out)?;
            let find = |index: u32| {
                json["interfaces"]
                    .as_array()
                    .and_then(|a| a.iter().find(|i| i["ifindex"] == index).cloned())
            };
            let (Some(c1s), Some(p0s)) = (find(c1), find(p0)) else {
                return Ok(None);
            };
            Ok((c1s["ipv4_packets"] == before + COUNT as u64).then_some((c1s, p0s)))
        },
    )
    .unwrap();
    let (c1s, p0s) = stats;
    assert_eq!(
        c1s["ipv4_packets"],
        before + COUNT as u64,
        "consumer interface IPv4 count"
    );
    assert_eq!(c1s["name"], "c1");
    // Nothing came back from the provider but the reply to the ARP warm-up
    // ping (endpoints answer echo through their service since issue 6).
    assert_eq!(p0s["ipv4_packets"], 1u64, "provider interface IPv4 count");
    for s in [&c1s, &p0s] {
        let verdicts: u64 = s["verdicts"]
            .as_object()
            .map(|v| v.values().filter_map(|n| n.as_u64()).sum())
            .unwrap_or(0);
        assert_eq!(
            Some(verdicts),
            s["packets"].as_u64(),
            "verdicts add up: {s}"
        );
    }
    assert!(
        c1s["verdicts"]["redirect"].as_u64() >= Some(COUNT as u64),
        "the consumer frames were redirected: {c1s}"
    );
    let ip_len = (20 + 8 + PAYLOAD) as u64;
    assert!(
        c1s["bytes"].as_u64().unwrap() >= COUNT as u64 * (14 + ip_len),
        "bytes cover every frame: {c1s}"
    );

    // SIGTERM: the controller exits cleanly.
    let out = topo.stop(gwp.child).unwrap();
    assert!(
        out.status.success(),
        "plink-ctl exit status {:?}",
        out.status
    );
}

/// A test that fails half-way must still leave no namespace, link or pin behind.
#[test]
fn a_failing_test_leaves_nothing_behind() {
    netns::require_root_and_tools();
    let mut names = Vec::new();
    let mut pin_root = None;
    let mut scratch = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut topo = Topology::new().unwrap();
        let a = topo.host("a").unwrap();
        let b = topo.host("b").unwrap();
        topo.link(&a, "c1", &b, "eth0").unwrap();
        topo.link(&a, "p0", &b, "eth1").unwrap();
        names.push(a.name.clone());
        names.push(b.name.clone());
        pin_root = Some(topo.bpffs_root().to_path_buf());
        let config = format!(
            "{}interfaces:\n  - {{name: c1, role: consumer, network: vnet-a}}\n  - {{name: p0, role: provider}}\n",
            gateway::gateway_section(&topo).unwrap()
        );
        scratch = Some(topo.scratch_dir().unwrap().to_path_buf());
        let _gw = gateway::start(&mut topo, &a, &config).unwrap();
        assert!(topo.bpffs_root().exists(), "plink pinned its maps");
        panic!("deliberate failure with a running gateway");
    }));
    assert!(result.is_err(), "the inner test was meant to fail");
    let listed = netns::sh("ip", &["netns", "list"]).unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "namespace {name} left behind"
        );
    }
    let pin_root = pin_root.expect("topology was built");
    assert!(!pin_root.exists(), "pins left at {}", pin_root.display());
    let scratch = scratch.expect("topology was built");
    assert!(
        !scratch.exists(),
        "scratch dir left at {}",
        scratch.display()
    );
}
