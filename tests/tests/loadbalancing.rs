//! Load balancing end to end: the backend of every flow is the one the
//! userspace Maglev table and the shared flow hash predict; a drained backend
//! keeps its streams and gets no new ones; health checks take a dead backend
//! out of the table and bring it back, without moving other flows; a service
//! with no backend drops new flows with its own reason.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use plink_common::{CtFwdKey, IPPROTO_UDP, flow_hash, v4};
use plink_ctl::maglev::{self, MaglevBackend};
use plink_tests::{
    gateway::Gateway,
    netns::{self, Host, wait_for},
    privatelink::{self as pl, PrivateLink},
    servers,
};

fn flows_of(plink: &Gateway, net: &PrivateLink) -> Vec<serde_json::Value> {
    let out = plink.ctl(&net.gw, &["conntrack", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["data"]["flows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Rewrites the running config with `edit` and reloads it.
fn reload_with(plink: &Gateway, net: &PrivateLink, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&plink.config_path).unwrap();
    let new = edit(text.clone());
    assert_ne!(text, new, "the edit changed nothing");
    std::fs::write(&plink.config_path, new).unwrap();
    let out = plink.ctl(&net.gw, &["reload"]).unwrap();
    eprintln!("reload: {out}");
}

/// Waits until the tables the running gateway applied no longer give `backend`
/// new flows (`reload` answers once the change is committed; the dataplane
/// applies it right after).
fn wait_backend_out(plink: &Gateway, net: &PrivateLink, backend: Ipv4Addr) {
    let series = format!("plink_backend_up{{service=\"orders\",backend=\"{backend}\"}} 0");
    wait_for(
        "the backend to leave the table",
        Duration::from_secs(10),
        || {
            Ok(plink
                .scrape(&net.gw)?
                .lines()
                .any(|l| l == series)
                .then_some(()))
        },
    )
    .unwrap();
}

/// A TCP stream through the endpoint that a test keeps open, reading the
/// pattern body slowly until released, then to the end.
struct SlowStream {
    backend: Ipv4Addr,
    release: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<usize>>,
}

const SLOW_BODY: usize = 64 << 20;

impl SlowStream {
    /// Opens streams until one lands on `want` (any backend if `None`).
    fn open(host: &Host, want: Option<Ipv4Addr>) -> anyhow::Result<Self> {
        for _ in 0..64 {
            let (tx, rx) = std::sync::mpsc::channel();
            let release = Arc::new(AtomicBool::new(false));
            let r = release.clone();
            let host = host.clone();
            let handle = std::thread::spawn(move || -> anyhow::Result<usize> {
                host.run_in(move || -> anyhow::Result<usize> {
                    let mut s = TcpStream::connect_timeout(
                        &pl::endpoint_tcp().into(),
                        Duration::from_secs(5),
                    )?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    s.write_all(format!("GET {SLOW_BODY}\n").as_bytes())?;
                    let mut reader = BufReader::new(s);
                    let mut line = String::new();
                    reader.read_line(&mut line)?;
                    let local: SocketAddrV4 = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("local="))
                        .context("no local= in the header")?
                        .parse()?;
                    let _ = tx.send(*local.ip());
                    let mut got = 0usize;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = reader.read(&mut buf).context("reading the stream")?;
                        if n == 0 {
                            break;
                        }
                        for (i, b) in buf[..n].iter().enumerate() {
                            if *b != servers::pattern_byte(got + i) {
                                bail!("byte {} corrupted", got + i);
                            }
                        }
                        got += n;
                        if !r.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    Ok(got)
                })?
            });
            let backend = rx
                .recv_timeout(Duration::from_secs(10))
                .context("the stream did not start")?;
            let stream = Self {
                backend,
                release,
                handle,
            };
            if want.is_none_or(|w| w == backend) {
                return Ok(stream);
            }
            // Wrong backend: let it finish quickly in the background.
            stream.release.store(true, Ordering::SeqCst);
        }
        bail!("no stream landed on {want:?}")
    }

    /// Lets the stream run to its end; returns the bytes received.
    fn finish(self) -> anyhow::Result<usize> {
        self.release.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))?
    }
}

/// One short request through the orders endpoint: the backend that answered.
fn orders_backend(host: &Host) -> anyhow::Result<Ipv4Addr> {
    Ok(*servers::tcp_request(host, None, pl::endpoint_tcp(), 100)?
        .local
        .ip())
}

#[test]
fn every_flow_goes_to_the_backend_the_userspace_table_predicts() {
    netns::require_root_and_tools();
    const FLOWS: u16 = 1200;
    const FIRST_PORT: u16 = 40000;
    let weights = [(20u8, 1u32), (21, 2), (22, 3)];
    let mut net = PrivateLink::build().unwrap();
    let mut extra = Vec::new();
    for (last, _) in &weights[1..] {
        let addr = Ipv4Addr::new(198, 51, 100, *last);
        net.provider
            .ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])
            .unwrap();
        extra.push(servers::start(&net.provider, addr, 5353, false, true).unwrap());
    }
    let list: Vec<String> = weights
        .iter()
        .map(|(l, w)| format!("{{address: 198.51.100.{l}, weight: {w}}}"))
        .collect();
    let plink = net
        .start_plink_with(&pl::Options {
            dns_backends: format!("[{}]", list.join(", ")),
            ..Default::default()
        })
        .unwrap();

    // Many flows from one client: one datagram from each source port.
    let answered = net
        .consumer_a
        .run_in(move || -> anyhow::Result<Vec<(u16, Ipv4Addr)>> {
            let mut sockets = Vec::new();
            for port in FIRST_PORT..FIRST_PORT + FLOWS {
                let s = UdpSocket::bind(SocketAddrV4::new(pl::CLIENT, port))?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                s.send_to(b"GET 0\n", pl::endpoint_udp())?;
                sockets.push((port, s));
            }
            let mut out = Vec::new();
            let mut buf = [0u8; 512];
            for (port, s) in &sockets {
                if let Ok(n) = s.recv(&mut buf) {
                    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if let Some(local) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("local="))
                        .and_then(|l| l.parse::<SocketAddrV4>().ok())
                    {
                        out.push((*port, *local.ip()));
                    }
                }
            }
            Ok(out)
        })
        .unwrap()
        .unwrap();

    // The table userspace builds, and the hash the datapath uses.
    let backends: Vec<MaglevBackend> = weights
        .iter()
        .map(|(l, w)| MaglevBackend {
            address: Ipv4Addr::new(198, 51, 100, *l).into(),
            port: 5353,
            weight: *w,
        })
        .collect();
    let table = maglev::build_table(&backends, maglev::DEFAULT_TABLE_SIZE).unwrap();
    let flows: Vec<serde_json::Value> = flows_of(&plink, &net)
        .into_iter()
        .filter(|f| f["endpoint"] == "dns-a")
        .collect();
    assert!(
        flows.len() >= usize::from(FLOWS) - 5,
        "{} dns-a flows in conntrack, sent {FLOWS}",
        flows.len()
    );
    let network_id = flows[0]["network_id"].as_u64().unwrap() as u32;
    let predict = |port: u16| -> std::net::IpAddr {
        let key = CtFwdKey {
            src_addr_be: v4(pl::CLIENT.octets()),
            dst_addr_be: v4(pl::DNS_ENDPOINT.octets()),
            network_id,
            src_port_be: port.to_be(),
            dst_port_be: 53u16.to_be(),
            proto: IPPROTO_UDP,
            _pad: [0; 3],
        };
        let slot = flow_hash(&key) % maglev::DEFAULT_TABLE_SIZE;
        backends[table[slot as usize] as usize].address
    };
    let mut per_backend = std::collections::BTreeMap::new();
    let mut mismatches = Vec::new();
    for f in &flows {
        let client: SocketAddrV4 = f["client"].as_str().unwrap().parse().unwrap();
        let backend: SocketAddrV4 = f["backend"].as_str().unwrap().parse().unwrap();
        assert_eq!(backend.port(), 5353);
        let want = predict(client.port());
        if *backend.ip() != want {
            mismatches.push((client.port(), *backend.ip(), want));
        }
        *per_backend.entry(*backend.ip()).or_insert(0u32) += 1;
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} flows not on the predicted backend, e.g. (port, got, predicted) {:?}",
        mismatches.len(),
        flows.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    // The backends that answered agree with the prediction too.
    assert!(
        answered.len() >= usize::from(FLOWS) * 9 / 10,
        "{} answers",
        answered.len()
    );
    for (port, local) in &answered {
        assert_eq!(*local, predict(*port), "answer to source port {port}");
    }
    // Weights 1:2:3 show in the spread (loosely: 1,200 flows).
    eprintln!("flows per backend: {per_backend:?}");
    let share =
        |l: u8| f64::from(per_backend[&Ipv4Addr::new(198, 51, 100, l)]) / flows.len() as f64;
    assert!(
        share(20) < share(21) && share(21) < share(22),
        "{per_backend:?}"
    );
    drop(extra);
}

#[test]
fn a_drained_backend_keeps_its_streams_and_gets_no_new_connections() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let stream = SlowStream::open(&net.consumer_a, None).unwrap();
    let drained = stream.backend;
    let other = pl::ORDERS_BACKENDS
        .into_iter()
        .find(|b| *b != drained)
        .unwrap();
    reload_with(&plink, &net, |t| {
        t.replace(
            &format!("{{address: {drained}}}"),
            &format!("{{address: {drained}, state: draining}}"),
        )
    });
    wait_backend_out(&plink, &net, drained);
    // New connections go to the other backend only, and all succeed.
    for i in 0..40 {
        let b = orders_backend(&net.consumer_a)
            .unwrap_or_else(|e| panic!("connection {i} after the drain failed: {e:#}"));
        assert_eq!(b, other, "connection {i} went to the drained backend");
    }
    // The drained backend's flow is still in conntrack, on its backend.
    let flows = flows_of(&plink, &net);
    assert!(
        flows
            .iter()
            .any(|f| f["backend"] == format!("{drained}:8080") && f["protocol"] == "tcp"),
        "the drained stream's flow is gone: {flows:?}"
    );
    let got = stream.finish().unwrap();
    assert_eq!(got, SLOW_BODY, "the drained stream lost bytes");
}

/// Health check of the `orders` service in the health test.
const INTERVAL_MS: u64 = 300;
const TIMEOUT_MS: u64 = 200;
const RISE: u64 = 2;
const FALL: u64 = 2;

#[test]
fn health_checks_take_a_dead_backend_out_and_bring_it_back() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net
        .start_plink_with(&pl::Options {
            orders_extra: format!(
                "    health_check: {{type: tcp, interval: {INTERVAL_MS}ms, timeout: {TIMEOUT_MS}ms, rise: {RISE}, fall: {FALL}}}\n    maglev_table_size: 1009\n"
            ),
            ..Default::default()
        })
        .unwrap();
    let [dead, alive] = pl::ORDERS_BACKENDS;
    // Both backends take connections at first.
    wait_for(
        "both orders backends to answer",
        Duration::from_secs(10),
        || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..20 {
                seen.insert(orders_backend(&net.consumer_a)?);
            }
            Ok((seen.len() == 2).then_some(()))
        },
    )
    .unwrap();
    // A stream to the backend that stays up must not notice anything.
    let stream = SlowStream::open(&net.consumer_a, Some(alive)).unwrap();

    // Stop the dead backend's server (servers[0] serves 198.51.100.10).
    let server = net.servers.remove(0);
    drop(server);
    let stopped = Instant::now();
    // The detection window of the issue, plus the time the controller takes
    // to rebuild and swap the lookup table once it decided (a small table
    // here; loaded CI machines still need a margin: 400 ms was missed by
    // 30 ms while benchmarks pinned both CPUs).
    const APPLY_MS: u64 = 1000;
    let window = Duration::from_millis((FALL + 1) * INTERVAL_MS + TIMEOUT_MS + APPLY_MS);
    // Inside the window connections may fail (they are counted and reported);
    // after it every connection succeeds and goes to the live backend.
    let mut early_failures = 0;
    let mut after = 0;
    while after < 40 {
        let in_window = stopped.elapsed() < window;
        match orders_backend(&net.consumer_a) {
            Ok(b) if !in_window => {
                assert_eq!(
                    b, alive,
                    "a connection after the window went to the dead backend"
                );
                after += 1;
            }
            Ok(_) => {}
            Err(e) if in_window => {
                early_failures += 1;
                eprintln!("inside the window: {e:#}");
            }
            Err(e) => panic!(
                "a connection {:?} after the backend stopped failed (window {window:?}): {e:#}",
                stopped.elapsed()
            ),
        }
    }
    eprintln!("connections failed inside the {window:?} window: {early_failures}");
    let scrape = plink.scrape(&net.gw).unwrap();
    let series = |b: Ipv4Addr| format!("plink_backend_up{{service=\"orders\",backend=\"{b}\"}} ");
    assert!(
        scrape.lines().any(|l| l == format!("{}0", series(dead))),
        "plink_backend_up of the dead backend is not 0:\n{scrape}"
    );
    assert!(
        scrape.lines().any(|l| l == format!("{}1", series(alive))),
        "plink_backend_up of the live backend is not 1"
    );

    // Restart it: it rejoins after `rise` successful probes.
    let restarted = Instant::now();
    net.servers
        .push(servers::start(&net.provider, dead, 8080, true, false).unwrap());
    let rejoin = Duration::from_millis(RISE * INTERVAL_MS + TIMEOUT_MS);
    wait_for(
        "the restarted backend to take connections",
        rejoin + Duration::from_secs(3),
        || Ok((orders_backend(&net.consumer_a)? == dead).then_some(())),
    )
    .unwrap();
    eprintln!(
        "rejoined after {:?} (rise × interval = {:?})",
        restarted.elapsed(),
        Duration::from_millis(RISE * INTERVAL_MS)
    );
    assert!(
        restarted.elapsed() >= Duration::from_millis((RISE - 1) * INTERVAL_MS),
        "rejoined before `rise` probes could pass"
    );

    // The stream to the live backend went on untouched.
    assert_eq!(stream.backend, alive);
    assert_eq!(stream.finish().unwrap(), SLOW_BODY);
}

#[test]
fn with_every_backend_down_new_flows_are_dropped_as_no_backend() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    orders_backend(&net.consumer_a).unwrap();
    reload_with(&plink, &net, |t| {
        t.replace(
            "backends: [{address: 198.51.100.10}, {address: 198.51.100.11}]",
            "backends: [{address: 198.51.100.10, state: down}, {address: 198.51.100.11, state: down}]",
        )
    });
    for b in pl::ORDERS_BACKENDS {
        wait_backend_out(&plink, &net, b);
    }
    let before = Gateway::drops(&plink.scrape(&net.gw).unwrap(), "no_backend");
    let refused = net
        .consumer_a
        .run_in(|| {
            TcpStream::connect_timeout(&pl::endpoint_tcp().into(), Duration::from_millis(1500))
        })
        .unwrap();
    assert!(refused.is_err(), "a connection got through with no backend");
    wait_for(
        "no_backend drops to be counted",
        Duration::from_secs(5),
        || {
            let now = Gateway::drops(&plink.scrape(&net.gw)?, "no_backend");
            Ok((now > before).then_some(now))
        },
    )
    .unwrap();
    // Other services are unaffected.
    servers::udp_request(
        &net.consumer_a,
        SocketAddrV4::new(pl::CLIENT, 0),
        pl::endpoint_udp(),
    )
    .unwrap();
}

/// Atomicity of the table swap, at the datapath: a writer rewrites service
/// 0's lookup table again and again (generation `g` sends every slot to
/// backend `g % 8`) through `Dataplane::apply`, while a BPF_PROG_TEST_RUN
/// loop sends new flows (hashes all over the table) through the consumer
/// program of a second handle on the same pinned maps. If a table were
/// rewritten in place, a flow hashing to a slot not yet rewritten would see
/// the previous generation after another flow saw the new one; with the
/// swap, the generations the flows see never go back.
#[test]
fn every_choice_comes_from_one_generation_while_the_table_is_rewritten() {
    use plink_common::prog_names;
    use plink_ctl::{
        EBPF_OBJECT,
        dataplane::{
            AnswerPath, BackendSpec, BackendState, Dataplane, DataplaneSpec, EndpointSpec,
            EndpointState, InterfaceRole, InterfaceSpec, NatSpec, PortSpec, Protocol, ServiceSpec,
            Sizes, TimeoutSpec,
        },
    };
    use plink_tests::{golden, packet::Ipv4Packet};

    const BACKENDS: u32 = 8;
    const TABLE: usize = 4099;
    netns::require_root_and_tools();
    let mut topo = netns::Topology::new().unwrap();
    let gw = topo.host("gw").unwrap();
    let cn = topo.host("cn").unwrap();
    let pv = topo.host("pv").unwrap();
    topo.link(&gw, "c1", &cn, "eth0").unwrap();
    topo.link(&gw, "p0", &pv, "eth0").unwrap();
    gw.ip(&["addr", "add", "198.51.100.1/24", "dev", "p0"])
        .unwrap();
    gw.sysctl("net.ipv4.conf.p0.forwarding", "1").unwrap();
    let backend_addr = |id: u32| Ipv4Addr::new(198, 51, 100, 10 + id as u8);
    for id in 0..BACKENDS {
        gw.ip(&[
            "neigh",
            "replace",
            &backend_addr(id).to_string(),
            "lladdr",
            &format!("02:00:00:00:01:{:02x}", 0x10 + id),
            "dev",
            "p0",
            "nud",
            "permanent",
        ])
        .unwrap();
    }
    let (c1, p0) = (gw.ifindex("c1").unwrap(), gw.ifindex("p0").unwrap());
    let (c1_mac, p0_mac) = (gw.mac("c1").unwrap(), gw.mac("p0").unwrap());
    let endpoint = Ipv4Addr::new(192, 0, 2, 51);
    let spec = move |generation: u32| DataplaneSpec {
        interfaces: vec![
            InterfaceSpec {
                ifindex: c1,
                role: InterfaceRole::Consumer { network_id: 1 },
                mac: c1_mac,
                answers: AnswerPath::Redirect,
            },
            InterfaceSpec {
                ifindex: p0,
                role: InterfaceRole::Provider,
                mac: p0_mac,
                answers: AnswerPath::Redirect,
            },
        ],
        timeouts: TimeoutSpec::default(),
        services: vec![ServiceSpec {
            id: 0,
            nat: vec![NatSpec {
                addr: Ipv4Addr::new(198, 51, 100, 200).into(),
                ports: 1024..=65535,
                draining: false,
            }],
            lookup: vec![generation % BACKENDS; TABLE],
            mss_clamp: plink_common::MSS_CLAMP_OFF,
            flow_log_sample: 0,
        }],
        backends: (0..BACKENDS)
            .map(|id| BackendSpec {
                id,
                service_id: 0,
                addr: backend_addr(id).into(),
                state: BackendState::Active,
            })
            .collect(),
        endpoints: vec![EndpointSpec {
            id: 0,
            network_id: 1,
            addr: endpoint.into(),
            addr6: None,
            service_id: 0,
            protocol: Protocol::Udp,
            ports: vec![PortSpec {
                port: 53,
                target_port: 5353,
            }],
            state: EndpointState::Approved,
            max_flows: 0,
            new_flows_per_sec: 0,
        }],
        retired_nat: Default::default(),
        next_hops: Default::default(),
        proxy_headers: Default::default(),
    };
    let sizes = Sizes {
        conntrack: 131_072,
        lb_table: 4 * TABLE as u32,
        ..Sizes::default()
    };
    let root = topo.bpffs_root().to_path_buf();

    // The writer: the product's apply path, on the pinned maps.
    let mut writer_dp = {
        let root = root.clone();
        gw.run_in(move || -> anyhow::Result<Dataplane> {
            let mut dp = Dataplane::load_with(EBPF_OBJECT, Some(&root), sizes)?;
            dp.apply(&spec(0))?;
            Ok(dp)
        })
        .unwrap()
        .unwrap()
    };
    // Writer and reader are paced against each other, not against the clock:
    // the writer starts generation g+1 only after the reader has run
    // FLOWS_PER_GENERATION flows since generation g was complete, so a loaded
    // machine slows the test down but cannot change what it sees.
    const GENERATIONS: u32 = 12;
    const FLOWS_PER_GENERATION: u32 = 40;
    const MAX_FLOWS_PER_GENERATION: u32 = 3000;
    let deadline = Instant::now() + Duration::from_secs(120);
    let completed = Arc::new(AtomicU32::new(0));
    let flows_run = Arc::new(AtomicU32::new(0));
    let abort = Arc::new(AtomicBool::new(false));
    let writer = {
        let (completed, flows_run, abort) = (completed.clone(), flows_run.clone(), abort.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            for generation in 1..=GENERATIONS {
                let wait_for = flows_run.load(Ordering::SeqCst) + FLOWS_PER_GENERATION;
                while flows_run.load(Ordering::SeqCst) < wait_for {
                    if abort.load(Ordering::SeqCst) || Instant::now() > deadline {
                        bail!("the reader stopped before generation {generation}");
                    }
                    std::thread::yield_now();
                }
                writer_dp.apply(&spec(generation))?;
                completed.store(generation, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    // The reader: a second handle on the same maps, running new flows. For
    // each flow it notes the last generation completed before the flow ran.
    let reader_result = {
        let (completed, flows_run) = (completed.clone(), flows_run.clone());
        gw.run_in(move || -> anyhow::Result<Vec<(u32, u32)>> {
            let mut dp = Dataplane::load_with(EBPF_OBJECT, Some(&root), sizes)?;
            dp.load_programs()?;
            let program = dp.program(prog_names::CONSUMER)?;
            let mut seen = Vec::new();
            let mut after_last = 0;
            let (mut current, mut flows_in_current) = (0, 0);
            for i in 0u32.. {
                if Instant::now() > deadline {
                    bail!(
                        "only {} generations written by the deadline",
                        completed.load(Ordering::SeqCst)
                    );
                }
                let mut before = completed.load(Ordering::SeqCst);
                // Bound the flows per generation (conntrack and NAT ports
                // are finite) by waiting for a slow writer.
                if before != current {
                    (current, flows_in_current) = (before, 0);
                }
                flows_in_current += 1;
                while flows_in_current > MAX_FLOWS_PER_GENERATION && before == current {
                    if Instant::now() > deadline {
                        bail!("generation {} was not written by the deadline", current + 1);
                    }
                    std::thread::yield_now();
                    before = completed.load(Ordering::SeqCst);
                }
                if before == GENERATIONS {
                    after_last += 1;
                    if after_last > FLOWS_PER_GENERATION {
                        break;
                    }
                }
                let src = Ipv4Addr::new(192, 0, 2, 1 + (i / 60_000) as u8);
                let frame =
                    Ipv4Packet::udp((src, 1024 + (i % 60_000) as u16), (endpoint, 53), b"q")
                        .macs([2, 0, 0, 0, 0, 1], c1_mac)
                        .build();
                let run = golden::run(program, c1, &frame)?;
                if run.verdict != golden::verdict::REDIRECT {
                    bail!("flow {i}: verdict {} instead of a redirect", run.verdict);
                }
                let backend = u32::from(run.output[33]) - 10;
                seen.push((before, backend));
                flows_run.fetch_add(1, Ordering::SeqCst);
            }
            Ok(seen)
        })
        .unwrap()
    };
    abort.store(true, Ordering::SeqCst);
    let writer_result = writer.join().unwrap();
    let seen = reader_result.unwrap();
    writer_result.unwrap();
    // A flow that ran while generation g+1 was being written sees g or g+1
    // (at most one write is in progress, by the pacing); once it has seen
    // g+1, no later flow may see g.
    let mut last_generation = 0;
    let mut changes = 0;
    for (i, &(completed_before, backend)) in seen.iter().enumerate() {
        let generation = if backend == completed_before % BACKENDS {
            completed_before
        } else if backend == (completed_before + 1) % BACKENDS {
            completed_before + 1
        } else {
            panic!(
                "flow {i} saw backend {backend} while generation {completed_before} was the last complete one"
            );
        };
        assert!(
            generation >= last_generation,
            "flow {i} saw generation {generation} after an earlier flow saw {last_generation}: \
             an older table after a newer one"
        );
        changes += usize::from(generation != last_generation);
        last_generation = generation;
    }
    eprintln!(
        "{} flows, {GENERATIONS} table generations written, {changes} generation changes seen",
        seen.len()
    );
    assert_eq!(
        last_generation, GENERATIONS,
        "the flows after the last write did not see it"
    );
    assert_eq!(
        changes, GENERATIONS as usize,
        "every generation is seen by the flows run while it is current"
    );
}
