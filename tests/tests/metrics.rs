//! Metrics (SPEC §5, §7): a real scrape passes `promtool check metrics`; a
//! real Prometheus server scraping plink sees exact endpoint and service
//! bytes and packets; NAT port gauges and allocation failures are exact;
//! counters stay monotonic across a reload and an adopting restart; a removed
//! endpoint's series disappear; a redirect the device fails is counted.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddrV4, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use plink_tests::{
    gateway,
    netns::{self, Host, wait_for},
    privatelink::{self as pl, PrivateLink},
    servers,
};

/// A scrape as series (`name{labels}` exactly as printed) to values.
fn parse(scrape: &str) -> BTreeMap<String, f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Names of the counter families in a scrape.
fn counter_families(scrape: &str) -> Vec<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .map(str::to_owned)
        .collect()
}

/// Counter series of a scrape with their values.
fn counters(scrape: &str) -> BTreeMap<String, f64> {
    let families = counter_families(scrape);
    parse(scrape)
        .into_iter()
        .filter(|(series, _)| {
            let name = series.split('{').next().unwrap_or(series);
            families.iter().any(|f| f == name)
        })
        .collect()
}

fn value(scrape: &str, series: &str) -> Option<f64> {
    parse(scrape).get(series).copied()
}

/// Every counter of `before` is still there in `after` and did not go down.
fn assert_monotonic(before: &str, after: &str, what: &str) {
    check_monotonic(&counters(before), &counters(after), what);
}

fn check_monotonic(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, what: &str) {
    assert!(
        before.len() > 10,
        "{what}: too few counters scraped: {before:?}"
    );
    for (series, v) in before {
        let now = after
            .get(series)
            .unwrap_or_else(|| panic!("{what}: series {series} disappeared"));
        assert!(now >= v, "{what}: {series} went from {v} to {now}");
    }
}

fn require_prometheus_tools() {
    for tool in ["promtool", "prometheus"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "`{tool}` is missing: run `cargo xtask setup` (installs Debian's `prometheus` package)"
        );
    }
}

fn promtool_check(scrape: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.trim().is_empty(), text)
}

#[test]
fn promtool_accepts_a_real_scrape_with_device_counters() {
    netns::require_root_and_tools();
    require_prometheus_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    // Some traffic so that every family has samples, drops included.
    servers::udp_request(
        &net.consumer_a,
        SocketAddrV4::new(pl::CLIENT, 41000),
        pl::endpoint_udp(),
    )
    .unwrap();
    servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), 1000).unwrap();
    let scrape = plink.scrape(&net.gw).unwrap();
    let (ok, report) = promtool_check(&scrape);
    assert!(
        ok,
        "promtool check metrics:\n{report}\n--- scrape:\n{scrape}"
    );

    // The checker must catch what it is here to catch.
    let (bad, _) = promtool_check("# TYPE plink_x counter\nplink_x{a=\"1\"} 1\n");
    assert!(!bad, "promtool accepted a counter without _total");

    // Device counters for every attached interface, equal to `ethtool -S`.
    for dev in ["c1", "c2", "c3", "p0"] {
        let stats = net.gw.exec("ethtool", &["-S", dev]).unwrap();
        let sum = |suffix: &str| -> f64 {
            stats
                .lines()
                .filter_map(|l| l.trim().split_once(": "))
                .filter(|(k, _)| k.ends_with(suffix))
                .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
                .sum()
        };
        for (family, suffix) in [
            ("plink_device_xdp_tx_errors_total", "_xdp_tx_errors"),
            ("plink_device_xdp_redirect_errors_total", "_xdp_xmit_errors"),
        ] {
            let series = format!("{family}{{device=\"{dev}\"}}");
            assert_eq!(
                value(&scrape, &series),
                Some(sum(suffix)),
                "{series} in:\n{scrape}"
            );
        }
        let dropped = format!("plink_device_tx_dropped_total{{device=\"{dev}\"}}");
        assert!(value(&scrape, &dropped).is_some(), "{dropped} missing");
    }
}

/// Percent-encodes a query parameter.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` from 127.0.0.1:`port` inside `host` (HTTP/1.0: no chunking).
fn http_get(host: &Host, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    host.run_in(move || -> anyhow::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        Ok((status, body.to_owned()))
    })?
}

const PROM_PORT: u16 = 9090;

/// Starts Debian's Prometheus in `host`, scraping plink every second.
fn start_prometheus(net: &mut PrivateLink) -> anyhow::Result<()> {
    let dir = net.topo.scratch_dir()?.join("prometheus");
    std::fs::create_dir_all(dir.join("data"))?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: plink\n    static_configs:\n      - targets: ['127.0.0.1:9430']\n",
    )?;
    let arg = |flag: &str, p: &Path| format!("--{flag}={}", p.display());
    let gw = net.gw.clone();
    net.topo.spawn(
        &gw,
        "prometheus",
        &[
            &arg("config.file", &config),
            &arg("storage.tsdb.path", &dir.join("data")),
            &format!("--web.listen-address=127.0.0.1:{PROM_PORT}"),
            "--log.level=error",
        ],
    )?;
    wait_for("Prometheus to be ready", Duration::from_secs(30), || {
        Ok(http_get(&net.gw, PROM_PORT, "/-/ready")
            .ok()
            .filter(|(code, _)| *code == 200))
    })?;
    Ok(())
}

/// The single value of an instant query, if it returns exactly one series.
fn prom_query(host: &Host, query: &str) -> anyhow::Result<Option<f64>> {
    let (code, body) = http_get(
        host,
        PROM_PORT,
        &format!("/api/v1/query?query={}", urlencode(query)),
    )?;
    if code != 200 {
        bail!("query {query}: HTTP {code}: {body}");
    }
    let json: serde_json::Value = serde_json::from_str(&body)?;
    let result = json["data"]["result"]
        .as_array()
        .context("no result array")?;
    match result.as_slice() {
        [] => Ok(None),
        [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
        more => bail!("query {query} returned {} series", more.len()),
    }
}

/// Waits until Prometheus reports exactly `want` for `query`.
fn prom_expect(host: &Host, query: &str, want: f64) {
    let mut last = None;
    let got = wait_for(
        &format!("Prometheus to report {query} = {want}"),
        Duration::from_secs(20),
        || {
            last = prom_query(host, query)?;
            Ok((last == Some(want)).then_some(()))
        },
    );
    assert!(got.is_ok(), "{query}: wanted {want}, last seen {last:?}");
}

#[test]
fn prometheus_sees_exact_endpoint_and_service_bytes_and_packets() {
    netns::require_root_and_tools();
    require_prometheus_tools();
    let mut net = PrivateLink::build().unwrap();
    let _plink = net.start_plink().unwrap();
    start_prometheus(&mut net).unwrap();
    prom_expect(&net.gw, "up{job=\"plink\"}", 1.0);

    // Datagrams of known sizes through dns-a, one flow; each waits for its reply.
    const SIZES: [usize; 5] = [1, 100, 512, 1000, 1400];
    let replies: Vec<usize> = net
        .consumer_a
        .run_in(|| -> anyhow::Result<Vec<usize>> {
            let socket = UdpSocket::bind(SocketAddrV4::new(pl::CLIENT, 41500))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buf = [0u8; 2048];
            let mut replies = Vec::new();
            for size in SIZES {
                socket.send_to(&vec![b'x'; size], pl::endpoint_udp())?;
                let (n, _) = socket
                    .recv_from(&mut buf)
                    .with_context(|| format!("no reply to the {size}-byte datagram"))?;
                replies.push(n);
            }
            Ok(replies)
        })
        .unwrap()
        .unwrap();
    // IP packet lengths: 20 bytes of IPv4 header, 8 of UDP, the payload.
    let bytes_in: usize = SIZES.iter().map(|s| 28 + s).sum();
    let bytes_out: usize = replies.iter().map(|s| 28 + s).sum();
    let packets = SIZES.len() as f64;

    let ep = "endpoint=\"dns-a\",service=\"dns\"";
    for (dir, bytes) in [("in", bytes_in), ("out", bytes_out)] {
        prom_expect(
            &net.gw,
            &format!("plink_endpoint_bytes_total{{{ep},direction=\"{dir}\"}}"),
            bytes as f64,
        );
        prom_expect(
            &net.gw,
            &format!("plink_endpoint_packets_total{{{ep},direction=\"{dir}\"}}"),
            packets,
        );
        // dns-b sent nothing: the service saw exactly dns-a's traffic.
        prom_expect(
            &net.gw,
            &format!("plink_service_bytes_total{{service=\"dns\",direction=\"{dir}\"}}"),
            bytes as f64,
        );
        prom_expect(
            &net.gw,
            &format!("plink_service_packets_total{{service=\"dns\",direction=\"{dir}\"}}"),
            packets,
        );
    }
    prom_expect(
        &net.gw,
        &format!("plink_endpoint_connections_total{{{ep},protocol=\"udp\"}}"),
        1.0,
    );
    prom_expect(
        &net.gw,
        "plink_backend_connections_total{service=\"dns\",backend=\"198.51.100.20\"}",
        1.0,
    );
    prom_expect(
        &net.gw,
        "plink_backend_bytes_total{service=\"dns\",backend=\"198.51.100.20\"}",
        (bytes_in + bytes_out) as f64,
    );
    prom_expect(
        &net.gw,
        "plink_endpoint_state{endpoint=\"dns-a\",service=\"dns\",state=\"approved\"}",
        1.0,
    );
}

fn nat_series(metric: &str) -> String {
    format!("{metric}{{service=\"dns\",nat_address=\"198.51.100.202\",protocol=\"udp\"}}")
}

#[test]
fn nat_ports_in_use_equal_the_live_flows() {
    netns::require_root_and_tools();
    const FLOWS: u16 = 5;
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let idle = plink.scrape(&net.gw).unwrap();
    assert_eq!(
        value(&idle, &nat_series("plink_nat_ports_in_use")),
        Some(0.0)
    );
    for i in 0..FLOWS {
        let src = SocketAddrV4::new(pl::CLIENT, 42000 + i);
        servers::udp_request(&net.consumer_a, src, pl::endpoint_udp()).unwrap();
    }
    // Gauges come from the GC sweep (once a second), not a scan per scrape.
    let mut last = String::new();
    let seen = wait_for(
        "the GC sweep to count the flows",
        Duration::from_secs(5),
        || {
            last = plink.scrape(&net.gw)?;
            Ok(
                (value(&last, &nat_series("plink_nat_ports_in_use")) == Some(f64::from(FLOWS))
                    && value(&last, "plink_conntrack_entries") == Some(f64::from(FLOWS)))
                .then_some(()),
            )
        },
    );
    assert!(seen.is_ok(), "{last}");
    assert_eq!(
        value(&last, &nat_series("plink_nat_ports_capacity")),
        Some(10000.0)
    );
    assert_eq!(value(&last, "plink_conntrack_capacity"), Some(262144.0));
    // Other NAT addresses hold nothing.
    assert_eq!(
        value(
            &last,
            "plink_nat_ports_in_use{service=\"orders\",nat_address=\"198.51.100.200\",protocol=\"tcp\"}"
        ),
        Some(0.0)
    );
}

#[test]
fn a_16_port_pool_under_32_new_flows_counts_16_failures() {
    netns::require_root_and_tools();
    const POOL: u16 = 16;
    let mut net = PrivateLink::build().unwrap();
    let plink = net
        .start_plink_with(&pl::Options {
            dns_nat_ports: format!("30000-{}", 30000 + POOL - 1),
            // One endpoint fills the pool: no fair-share cap.
            gateway_extra: "  endpoint_defaults: {max_flows: 65536}\n".into(),
            ..Default::default()
        })
        .unwrap();
    // The consumer knows the endpoint's MAC already: no datagram waits on ARP.
    let mac = net.gw.mac("c1").unwrap();
    net.consumer_a
        .neigh_permanent("192.0.2.53", mac, "eth0")
        .unwrap();
    // One datagram per flow, no retries: 32 new flows, sockets kept open.
    let _sockets = net
        .consumer_a
        .run_in(|| -> anyhow::Result<Vec<UdpSocket>> {
            (0..2 * POOL)
                .map(|i| {
                    let s = UdpSocket::bind(SocketAddrV4::new(pl::CLIENT, 43000 + i))?;
                    s.send_to(b"GET 0\n", pl::endpoint_udp())?;
                    Ok(s)
                })
                .collect()
        })
        .unwrap()
        .unwrap();
    let failures = "plink_nat_port_allocation_failures_total{service=\"dns\"}";
    let mut last = String::new();
    let seen = wait_for("16 flows and 16 failures", Duration::from_secs(5), || {
        last = plink.scrape(&net.gw)?;
        Ok(
            (value(&last, &nat_series("plink_nat_ports_in_use")) == Some(16.0)
                && value(&last, failures) == Some(16.0))
            .then_some(()),
        )
    });
    assert!(seen.is_ok(), "{last}");
    assert_eq!(
        value(&last, &nat_series("plink_nat_ports_capacity")),
        Some(16.0)
    );
    assert_eq!(
        value(
            &last,
            "plink_endpoint_connections_total{endpoint=\"dns-a\",service=\"dns\",protocol=\"udp\"}"
        ),
        Some(16.0)
    );
}

#[test]
fn counters_are_monotonic_across_reload_and_restart_and_removed_endpoints_vanish() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let traffic = |net: &PrivateLink, port: u16| {
        for c in [&net.consumer_a, &net.consumer_b] {
            servers::udp_request(c, SocketAddrV4::new(pl::CLIENT, port), pl::endpoint_udp())
                .unwrap();
            servers::tcp_request(c, None, pl::endpoint_tcp(), 2000).unwrap();
        }
    };
    traffic(&net, 44000);
    let first = plink.scrape(&net.gw).unwrap();
    let dns_a_in =
        "plink_endpoint_bytes_total{endpoint=\"dns-a\",service=\"dns\",direction=\"in\"}";
    assert!(value(&first, dns_a_in).unwrap_or(0.0) > 0.0, "{first}");

    // Reload with a changed config (a backend weight).
    let cfg = std::fs::read_to_string(&plink.config_path).unwrap();
    let changed = cfg.replace(
        "backends: [{address: 198.51.100.12}]",
        "backends: [{address: 198.51.100.12, weight: 3}]",
    );
    assert_ne!(cfg, changed, "the config change did not apply");
    std::fs::write(&plink.config_path, &changed).unwrap();
    plink.ctl(&net.gw, &["reload"]).unwrap();
    let reloaded = plink.scrape(&net.gw).unwrap();
    assert_monotonic(&first, &reloaded, "reload");
    traffic(&net, 44001);
    let more = plink.scrape(&net.gw).unwrap();
    assert_monotonic(&reloaded, &more, "traffic after reload");
    assert!(value(&more, dns_a_in) > value(&reloaded, dns_a_in));

    // Adopting restart: SIGTERM leaves the pinned dataplane; a new controller adopts it.
    let stopped = net.topo.stop(plink.child).unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    let gw_host = net.gw.clone();
    let plink = gateway::start(&mut net.topo, &gw_host, &changed).unwrap();
    let adopted = plink.scrape(&net.gw).unwrap();
    assert_monotonic(&more, &adopted, "adopting restart");
    traffic(&net, 44002);
    let after = plink.scrape(&net.gw).unwrap();
    assert_monotonic(&adopted, &after, "traffic after restart");
    assert!(value(&after, dns_a_in) > value(&more, dns_a_in));

    // A removed endpoint's series disappear; the others stay.
    assert!(after.contains("endpoint=\"dns-b\""));
    plink
        .ctl(&net.gw, &["endpoints", "remove", "dns-b"])
        .unwrap();
    let mut last = String::new();
    let gone = wait_for(
        "dns-b's series to disappear",
        Duration::from_secs(5),
        || {
            last = plink.scrape(&net.gw)?;
            Ok((!last.contains("endpoint=\"dns-b\"")).then_some(()))
        },
    );
    assert!(gone.is_ok(), "{last}");
    assert!(value(&last, dns_a_in).is_some());
    // Every other counter stays, still monotonic.
    let kept: BTreeMap<String, f64> = counters(&after)
        .into_iter()
        .filter(|(s, _)| !s.contains("endpoint=\"dns-b\""))
        .collect();
    check_monotonic(&kept, &counters(&last), "endpoint removal");
}

#[test]
fn a_redirect_the_consumer_device_refuses_is_counted() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let series = "plink_device_xdp_redirect_errors_total{device=\"c1\"}";
    let before = plink.scrape(&net.gw).unwrap();
    assert_eq!(value(&before, series), Some(0.0), "{before}");
    // Open a TCP flow with a 1460-byte MSS, then shrink the client's MTU: the
    // backend's full-size segments, redirected into c1, no longer fit the
    // peer and veth refuses them after the XDP program returned.
    let stream = net
        .consumer_a
        .run_in(|| {
            std::net::TcpStream::connect_timeout(&pl::endpoint_tcp().into(), Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
    net.consumer_a
        .ip(&["link", "set", "eth0", "mtu", "576"])
        .unwrap();
    let mut stream = stream;
    stream.write_all(b"GET 20000\n").unwrap();
    let mut last = String::new();
    let counted = wait_for(
        "the refused redirects to be counted",
        Duration::from_secs(5),
        || {
            last = plink.scrape(&net.gw)?;
            Ok((value(&last, series).unwrap_or(0.0) > 0.0).then_some(()))
        },
    );
    assert!(counted.is_ok(), "{last}");
    // The same count `ethtool -S c1` shows (read around the scrape).
    let ethtool = || -> f64 {
        net.gw
            .exec("ethtool", &["-S", "c1"])
            .unwrap()
            .lines()
            .filter_map(|l| l.trim().split_once(": "))
            .filter(|(k, _)| k.ends_with("_xdp_xmit_errors"))
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum()
    };
    let low = ethtool();
    let metric = value(&plink.scrape(&net.gw).unwrap(), series).unwrap();
    let high = ethtool();
    assert!(
        low <= metric && metric <= high,
        "ethtool {low}..{high}, metric {metric}"
    );
}

/// Every metric name a full snapshot renders.
fn rendered_metric_names() -> Vec<String> {
    use plink_ctl::metrics::*;
    let snap = Snapshot {
        endpoints: vec![EndpointSample::default()],
        services: vec![ServiceSample::default()],
        backends: vec![BackendSample::default()],
        nat: vec![NatSample::default()],
        drops: vec![("x".into(), 0)],
        endpoint_drops: vec![EndpointDropSample::default()],
        devices: vec![DeviceSample::default()],
        ..Default::default()
    };
    render(&snap)
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_plink_serves() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let names = rendered_metric_names();
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    assert!(exprs.len() >= 6, "too few queries: {exprs:?}");
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        let idents: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("plink_"))
            .collect();
        assert!(!idents.is_empty(), "query names no plink metric: {expr}");
        for id in idents {
            assert!(
                names.iter().any(|n| n == id),
                "{expr}: {id} is not a metric plink serves ({names:?})"
            );
            used.insert(id.to_owned());
        }
    }
    for wanted in [
        "plink_endpoint_bytes_total",
        "plink_endpoint_connections_total",
        "plink_nat_ports_in_use",
        "plink_drops_total",
        "plink_backend_up",
    ] {
        assert!(
            used.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
}

/// Issue 14, item 8: a backend id released by one reload and given to a
/// new backend by the next starts its counters at zero, not at what its
/// last owner counted.
#[test]
fn a_reused_backend_id_starts_its_counters_at_zero() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let plink = net.start_plink().unwrap();
    let series = |backend: &str, metric: &str| {
        format!("{metric}{{service=\"orders\",backend=\"{backend}\"}}")
    };
    // Enough connections that both orders backends count some.
    for _ in 0..20 {
        servers::tcp_request(&net.consumer_a, None, pl::endpoint_tcp(), 1024).unwrap();
    }
    let before = plink.scrape(&net.gw).unwrap();
    let old = series("198.51.100.11", "plink_backend_connections_total");
    assert!(value(&before, &old).unwrap_or(0.0) > 0.0, "{before}");

    let original = std::fs::read_to_string(&plink.config_path).unwrap();
    let both = "backends: [{address: 198.51.100.10}, {address: 198.51.100.11}]";
    assert!(original.contains(both));
    std::fs::write(
        &plink.config_path,
        original.replacen(both, "backends: [{address: 198.51.100.10}]", 1),
    )
    .unwrap();
    plink.ctl(&net.gw, &["reload"]).unwrap();
    // The next reload hands the released id to a new backend.
    std::fs::write(
        &plink.config_path,
        original.replacen(
            both,
            "backends: [{address: 198.51.100.10}, {address: 198.51.100.13}]",
            1,
        ),
    )
    .unwrap();
    plink.ctl(&net.gw, &["reload"]).unwrap();
    let list = plink.ctl(&net.gw, &["status", "--json"]).unwrap();
    assert!(list.contains("\"ok\": true"), "{list}");
    let after = plink.scrape(&net.gw).unwrap();
    for metric in [
        "plink_backend_connections_total",
        "plink_backend_bytes_total",
    ] {
        assert_eq!(
            value(&after, &series("198.51.100.13", metric)),
            Some(0.0),
            "{metric} of the new backend: {after}"
        );
    }
}
