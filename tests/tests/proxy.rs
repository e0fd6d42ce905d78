//! PROXY protocol v2 end to end (issue 18): plink inserts the header in
//! front of a TCP flow's first client bytes, and backends whose parsers were
//! not written here read it: HAProxy (Debian's, `accept-proxy`) and a server
//! built on the `ppp` crate (`plink_tests::proxy`).
//!
//! Topology: the reference one (`plink_tests::privatelink`: two consumer
//! networks both using 192.0.2.0/24 and the same client address 192.0.2.1)
//! with this file's own services:
//!
//! ```text
//!   endpoint                    service       backend                   link id TLV
//!   vnet-a 192.0.2.50:80,81     web           HAProxy 198.51.100.30     azure
//!   vnet-b 192.0.2.50:80,81     web           (8080 http, 8081 tcp)     azure
//!   vnet-a 192.0.2.51:80        echo          ppp 198.51.100.31:9000    azure
//!   vnet-b 192.0.2.51:80        echo          ppp 198.51.100.31:9000    azure
//!   vnet-a 192.0.2.52:80        echo-aws      ppp 198.51.100.31:9001    aws
//!   vnet-b 192.0.2.52:80        echo-gcp      ppp 198.51.100.31:9002    gcp
//!   vnet-a 192.0.2.53:80        echo-custom   ppp 198.51.100.31:9003    0xE7
//!   vnet-a 192.0.2.54:80        plain         198.51.100.10:8080        (none)
//! ```
//!
//! With health checks on (one test), `web` has an http check and `echo` a
//! tcp one: both start with a PROXY v2 LOCAL header.
//!
//! HAProxy's tcp frontend relays to the ppp backend's 127.0.0.1:9100 with
//! its own v2 header, so the client address HAProxy parsed is checked by
//! a second parser too. HAProxy 2.6 (Debian 12) has no sample fetch for
//! arbitrary TLVs (`fc_pp_tlv` came in 2.9): the link ids are checked by the
//! ppp backend.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use plink_common::proxy::tlv;
use plink_tests::{
    gateway::{self, Gateway},
    netns::{self, Host},
    privatelink::{CLIENT, FarEnds, PrivateLink},
    proxy::{self, Haproxy, PpBackend, PpHeader, Request},
    servers,
};

const HAPROXY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const PP_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 31);
const PLAIN_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const RELAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100);

const WEB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
const ECHO: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 51);
/// echo-aws in vnet-a, echo-gcp in vnet-b.
const ECHO_AWS_GCP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 52);
const ECHO_CUSTOM: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const PLAIN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 54);

const ECHO_PORT: u16 = 9000;
const AWS_PORT: u16 = 9001;
const GCP_PORT: u16 = 9002;
const CUSTOM_PORT: u16 = 9003;
const CUSTOM_TYPE: u8 = 0xE7;

/// Explicit link ids (`endpoints[].link_id`); the others are allocated.
/// High bit set and all bytes distinct: a byte-order mistake shows.
const WEB_A_LINK_ID: u32 = 1001;
const ECHO_A_LINK_ID: u32 = 0xDEAD_BE17;
const GCP_LINK_ID: u32 = 4_000_000_001;
const CUSTOM_LINK_ID: u32 = 0x0102_0304;

const NAT_WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 210);
const NAT_ECHO: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 211);
const NAT_PLAIN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 215);

const BIG: usize = 2 << 20;

fn service(
    name: &str,
    ports: &str,
    backend: Ipv4Addr,
    nat: u8,
    pp: Option<&str>,
    health: Option<&str>,
) -> String {
    let pp = pp
        .map(|kind| format!("    proxy_protocol: {{version: 2, link_id_tlv: {kind}}}\n"))
        .unwrap_or_default()
        + &health
            .map(|h| {
                format!("    health_check: {{{h}, interval: 300ms, timeout: 200ms, rise: 1}}\n")
            })
            .unwrap_or_default();
    format!(
        "  - name: {name}
    protocol: tcp
    ports: [{ports}]
    backends: [{{address: {backend}}}]
    nat: {{addresses: [198.51.100.{nat}], ports: 20000-29999}}
    visibility: ['*']
    auto_approve: ['*']
{pp}"
    )
}

/// With `health`, `web` (HAProxy) has an http health check and `echo` (the
/// ppp backend) a tcp one.
fn config(net: &PrivateLink, health: bool) -> String {
    let check = |c: &'static str| health.then_some(c);
    let gw = gateway::gateway_section(&net.topo).unwrap();
    let services = [
        service(
            "web",
            "{port: 80, target_port: 8080}, {port: 81, target_port: 8081}",
            HAPROXY,
            210,
            Some("azure"),
            check("type: http, path: /"),
        ),
        service(
            "echo",
            "{port: 80, target_port: 9000}",
            PP_BACKEND,
            211,
            Some("azure"),
            check("type: tcp"),
        ),
        service(
            "echo-aws",
            "{port: 80, target_port: 9001}",
            PP_BACKEND,
            212,
            Some("aws"),
            None,
        ),
        service(
            "echo-gcp",
            "{port: 80, target_port: 9002}",
            PP_BACKEND,
            213,
            Some("gcp"),
            None,
        ),
        service(
            "echo-custom",
            "{port: 80, target_port: 9003}",
            PP_BACKEND,
            214,
            Some("0xE7"),
            None,
        ),
        service(
            "plain",
            "{port: 80, target_port: 8080}",
            PLAIN_BACKEND,
            215,
            None,
            None,
        ),
    ]
    .concat();
    let ep = |name: &str, net: &str, addr: Ipv4Addr, svc: &str, link: Option<u32>| {
        let link = link.map(|l| format!(", link_id: {l}")).unwrap_or_default();
        let tenant = if net == "vnet-a" {
            "tenant-a"
        } else {
            "tenant-b"
        };
        format!(
            "  - {{name: {name}, tenant: {tenant}, network: {net}, address: {addr}, service: {svc}{link}}}\n"
        )
    };
    let endpoints = [
        ep("web-a", "vnet-a", WEB, "web", Some(WEB_A_LINK_ID)),
        ep("web-b", "vnet-b", WEB, "web", None),
        ep("echo-a", "vnet-a", ECHO, "echo", Some(ECHO_A_LINK_ID)),
        ep("echo-b", "vnet-b", ECHO, "echo", None),
        ep("echo-aws-a", "vnet-a", ECHO_AWS_GCP, "echo-aws", None),
        ep(
            "echo-gcp-b",
            "vnet-b",
            ECHO_AWS_GCP,
            "echo-gcp",
            Some(GCP_LINK_ID),
        ),
        ep(
            "echo-custom-a",
            "vnet-a",
            ECHO_CUSTOM,
            "echo-custom",
            Some(CUSTOM_LINK_ID),
        ),
        ep("plain-a", "vnet-a", PLAIN, "plain", None),
    ]
    .concat();
    format!(
        "{gw}interfaces:
  - {{name: c1, role: consumer, network: vnet-a}}
  - {{name: c3, role: consumer, network: vnet-a}}
  - {{name: c2, role: consumer, network: vnet-b}}
  - {{name: p0, role: provider}}
services:
{services}endpoints:
{endpoints}"
    )
}

/// The reference namespaces with this file's backends and plink running.
struct Setup {
    net: PrivateLink,
    plink: Gateway,
    haproxy: Haproxy,
    pp: PpBackend,
    /// HAProxy's relay target: the same parser, on loopback.
    _relay: PpBackend,
}

fn setup(far: FarEnds) -> Setup {
    setup_with(far, false)
}

fn setup_with(far: FarEnds, health: bool) -> Setup {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build_with(far).unwrap();
    for a in [HAPROXY, PP_BACKEND] {
        net.provider
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .unwrap();
    }
    let pp = PpBackend::start(
        &net.provider,
        PP_BACKEND,
        &[ECHO_PORT, AWS_PORT, GCP_PORT, CUSTOM_PORT],
    )
    .unwrap();
    let relay = PpBackend::start(&net.provider, *RELAY.ip(), &[RELAY.port()]).unwrap();
    let provider = net.provider.clone();
    let haproxy = Haproxy::start(&mut net.topo, &provider, HAPROXY, RELAY).unwrap();
    let cfg = config(&net, health);
    let gw = net.gw.clone();
    let plink = gateway::start(&mut net.topo, &gw, &cfg).unwrap();
    Setup {
        net,
        plink,
        haproxy,
        pp,
        _relay: relay,
    }
}

/// The link id `plink-ctl endpoints list` shows for `name`.
fn link_id(s: &Setup, name: &str) -> u32 {
    let out = s
        .plink
        .ctl(&s.net.gw, &["endpoints", "list", "--json"])
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ep = json["data"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no endpoint {name} in {out}"));
    let id = ep["link_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("endpoint {name} shows no link_id: {ep}"));
    u32::try_from(id).unwrap_or_else(|_| panic!("link id {id} of {name} is not a u32"))
}

/// What every header plink sends has, whatever the TLV: v2 PROXY, TCP over
/// IPv4, the client's own address, the endpoint's, a length that is a
/// multiple of 4, and the link-id TLV followed by at most a NOOP.
fn assert_header(h: &PpHeader, src: SocketAddrV4, dst: SocketAddrV4, kind: u8) {
    assert_eq!(h.version, ppp::v2::Version::Two, "{h:?}");
    assert_eq!(h.command, ppp::v2::Command::Proxy, "{h:?}");
    assert_eq!(h.family, ppp::v2::AddressFamily::IPv4, "{h:?}");
    assert_eq!(h.protocol, ppp::v2::Protocol::Stream, "{h:?}");
    assert_eq!(h.src, Some(src), "the client's own address: {h:?}");
    assert_eq!(h.dst, Some(dst), "the endpoint's address: {h:?}");
    assert_eq!(h.len % 4, 0, "padded to 4 bytes: {h:?}");
    let kinds: Vec<u8> = h.tlvs.iter().map(|(k, _)| *k).collect();
    assert!(
        kinds == [kind] || kinds == [kind, tlv::NOOP],
        "the link-id TLV {kind:#04x}, then NOOP padding only: {kinds:02x?}"
    );
}

fn azure(link_id: u32) -> Vec<u8> {
    let mut v = vec![tlv::AZURE_LINKID];
    v.extend_from_slice(&link_id.to_le_bytes());
    v
}

/// A record's header, or the test fails with the reason it did not parse.
fn header(r: &proxy::PpRecord) -> &PpHeader {
    r.header
        .as_ref()
        .unwrap_or_else(|e| panic!("the backend read no valid header: {e}"))
}

/// Both overlapping consumers at once, the same client address and port,
/// to HAProxy and to the ppp backend: each backend learns the client's own
/// address and the endpoint it came through; the ppp backend sees each
/// endpoint's own link id. conntrack shows the flows' header length, the
/// client's MSS is lower by it, and the service without proxy_protocol
/// beside them gets no header (and counts none).
fn overlapping_consumers_each_send_their_own_header(far: FarEnds) {
    let s = setup(far);
    let (echo_b_id, web_b_id) = (link_id(&s, "echo-b"), link_id(&s, "web-b"));
    assert_eq!(link_id(&s, "echo-a"), ECHO_A_LINK_ID, "the configured id");
    assert_eq!(link_id(&s, "web-a"), WEB_A_LINK_ID, "the configured id");
    assert_ne!(echo_b_id, ECHO_A_LINK_ID);
    assert_ne!(web_b_id, WEB_A_LINK_ID);

    let src = SocketAddrV4::new(CLIENT, 40000);
    let web = SocketAddrV4::new(WEB, 80);
    let echo = SocketAddrV4::new(ECHO, 80);
    let mut threads = Vec::new();
    for host in [s.net.consumer_a.clone(), s.net.consumer_b.clone()] {
        threads.push(std::thread::spawn(move || {
            let h = proxy::http_get(&host, Some(src), web);
            let e = proxy::get(&host, Some(SocketAddrV4::new(CLIENT, 40001)), echo, 4096);
            (h, e)
        }));
    }
    for t in threads {
        let (h, e) = t.join().unwrap();
        let (local, status, body) = h.unwrap();
        assert_eq!(local, src);
        assert!(status.contains("200"), "{status}");
        assert_eq!(
            body.trim(),
            format!("haproxy saw client={src} dst={web}"),
            "HAProxy parsed plink's header"
        );
        let e = e.unwrap();
        assert_eq!(e.info.src, "192.0.2.1:40001");
        assert_eq!(e.info.dst, echo.to_string());
        assert_eq!(e.body_len, 4096);
    }
    // HAProxy logged both (same client address and port, two networks).
    let logs: Vec<_> = s
        .haproxy
        .logs()
        .into_iter()
        .filter(|l| l.kind == "http" && l.client == src.to_string())
        .collect();
    assert_eq!(logs.len(), 2, "one log line per consumer: {logs:?}");
    for l in &logs {
        assert_eq!(l.frontend, web.to_string());
        assert_eq!(l.field("st"), Some("200"));
    }

    // The ppp backend: two connections from 192.0.2.1:40001, one per
    // endpoint, each with its own link id.
    let src = SocketAddrV4::new(CLIENT, 40001);
    let mut seen: Vec<Vec<u8>> = Vec::new();
    netns::wait_for("both echo records", Duration::from_secs(10), || {
        let n =
            s.pp.records()
                .iter()
                .filter(|r| r.local_port == ECHO_PORT)
                .count();
        Ok((n >= 2).then_some(()))
    })
    .unwrap();
    for r in s.pp.records().iter().filter(|r| r.local_port == ECHO_PORT) {
        let h = header(r);
        assert_header(h, src, echo, tlv::AZURE);
        assert_eq!(r.request, Request::Get(4096));
        assert_eq!(
            r.peer.ip(),
            std::net::IpAddr::V4(NAT_ECHO),
            "the TCP peer stays the NAT address"
        );
        seen.push(h.tlv(tlv::AZURE).unwrap().to_vec());
    }
    seen.sort();
    let mut want = vec![azure(ECHO_A_LINK_ID), azure(echo_b_id)];
    want.sort();
    assert_eq!(seen, want, "each endpoint's link id, little-endian");

    // The flows show their header's length (the gateway's own account).
    let out = s.plink.ctl(&s.net.gw, &["conntrack", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let flows = json["data"]["flows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let pp_len = header(&s.pp.records()[0]).len;
    for ep in ["echo-a", "echo-b"] {
        let f = flows
            .iter()
            .find(|f| f["endpoint"] == ep && f["client"] == "192.0.2.1:40001")
            .unwrap_or_else(|| panic!("no {ep} flow in {out}"));
        assert_eq!(f["proxy_header_len"], pp_len, "{f}");
    }

    // The service without proxy_protocol: the harness's server would
    // answer garbage to a header in front of `GET`.
    let reply = servers::tcp_request(
        &s.net.consumer_a,
        None,
        SocketAddrV4::new(PLAIN, 80),
        64 * 1024,
    )
    .unwrap();
    assert_eq!(*reply.local.ip(), PLAIN_BACKEND);
    assert_eq!(*reply.peer.ip(), NAT_PLAIN);
    assert_eq!(reply.body_len, 64 * 1024);
    assert_eq!(headers_inserted(&s, "plain"), 0);

    // The backend's SYN-ACK MSS reaches the client lowered by the header,
    // so a full segment plus the header still fits the backend's MSS.
    let mss = |dst: SocketAddrV4| -> u32 {
        s.net
            .consumer_a
            .run_in(move || -> anyhow::Result<u32> {
                use std::os::fd::AsRawFd as _;
                let stream =
                    std::net::TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))?;
                let mut v: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: getsockopt into a c_int of the size given.
                let rc = unsafe {
                    libc::getsockopt(
                        stream.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_MAXSEG,
                        (&mut v as *mut libc::c_int).cast(),
                        &mut len,
                    )
                };
                anyhow::ensure!(rc == 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
                Ok(v as u32)
            })
            .unwrap()
            .unwrap()
    };
    let (plain_mss, echo_mss) = (mss(SocketAddrV4::new(PLAIN, 80)), mss(echo));
    assert_eq!(
        plain_mss - echo_mss,
        pp_len as u32,
        "MSS without a header {plain_mss}, with {echo_mss}"
    );
    assert!(headers_inserted(&s, "echo") >= 2);
    assert!(headers_inserted(&s, "web") >= 2);
    let _ = NAT_WEB;
}

/// The aws (0xEA: 0x01 + the endpoint's name), gcp (0xE0: 8-byte big-endian)
/// and custom-type (4-byte big-endian) encodings, as the ppp backend reads them.
fn aws_gcp_and_custom_tlvs(far: FarEnds) {
    let s = setup(far);
    let aws_id = link_id(&s, "echo-aws-a");
    assert_eq!(link_id(&s, "echo-gcp-b"), GCP_LINK_ID);
    let cases: [(&Host, Ipv4Addr, u16, u8, Vec<u8>); 3] = [
        (&s.net.consumer_a, ECHO_AWS_GCP, AWS_PORT, tlv::AWS, {
            let mut v = vec![tlv::AWS_VPCE_ID];
            v.extend_from_slice(b"echo-aws-a");
            v
        }),
        (
            &s.net.consumer_b,
            ECHO_AWS_GCP,
            GCP_PORT,
            tlv::GCP,
            u64::from(GCP_LINK_ID).to_be_bytes().to_vec(),
        ),
        (
            &s.net.consumer_a,
            ECHO_CUSTOM,
            CUSTOM_PORT,
            CUSTOM_TYPE,
            CUSTOM_LINK_ID.to_be_bytes().to_vec(),
        ),
    ];
    for (host, addr, port, kind, value) in cases {
        let dst = SocketAddrV4::new(addr, 80);
        let reply = proxy::get(host, None, dst, 1000).unwrap();
        let r = s.pp.wait_record(port, reply.local).unwrap();
        let h = header(&r);
        assert_header(h, reply.local, dst, kind);
        assert_eq!(
            h.tlv(kind),
            Some(value.as_slice()),
            "TLV {kind:#04x} to port {port}"
        );
        assert_eq!(r.request, Request::Get(1000));
    }
    eprintln!("echo-aws-a's allocated link id: {aws_id} (not on the wire: aws sends the name)");
}

/// Netstat counters of `host` (/proc/net/netstat and /proc/net/snmp).
fn tcp_counter(host: &Host, section: &str, field: &str) -> u64 {
    let text = host.exec("cat", &["/proc/net/netstat"]).unwrap()
        + &host.exec("cat", &["/proc/net/snmp"]).unwrap();
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(head), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no {section} in netstat");
    };
    let i = head
        .split_whitespace()
        .position(|h| h == field)
        .unwrap_or_else(|| panic!("no {section} {field}"));
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// 2 MiB each way, to the ppp backend directly and through HAProxy's tcp
/// frontend (which relays with its own header to the ppp parser).
fn transfers(s: &Setup, seed: u64) {
    let echo = SocketAddrV4::new(ECHO, 80);
    let relay = SocketAddrV4::new(WEB, 81);
    for (host, name) in [(&s.net.consumer_a, "vnet-a"), (&s.net.consumer_b, "vnet-b")] {
        let up =
            proxy::put(host, echo, BIG, seed).unwrap_or_else(|e| panic!("{name} upload: {e:#}"));
        assert_eq!(up.info.src, up.local.to_string());
        let down =
            proxy::get(host, None, echo, BIG).unwrap_or_else(|e| panic!("{name} download: {e:#}"));
        assert_eq!(down.info.src, down.local.to_string());
        for (c, want) in [
            (
                up.local,
                Request::Put {
                    got: BIG,
                    fnv: up.info.fnv.unwrap_or_default(),
                },
            ),
            (down.local, Request::Get(BIG)),
        ] {
            let r = s.pp.wait_record(ECHO_PORT, c).unwrap();
            assert_header(header(&r), c, echo, tlv::AZURE);
            assert_eq!(r.request, want, "{name}");
        }
        // Through HAProxy: the relay target sees the client HAProxy learned.
        let up = proxy::put(host, relay, BIG, seed + 1)
            .unwrap_or_else(|e| panic!("{name} upload via HAProxy: {e:#}"));
        assert_eq!(
            up.info.src,
            up.local.to_string(),
            "HAProxy relayed the client"
        );
        assert_eq!(up.info.dst, relay.to_string());
        let down = proxy::get(host, None, relay, BIG)
            .unwrap_or_else(|e| panic!("{name} download via HAProxy: {e:#}"));
        assert_eq!(down.info.src, down.local.to_string());
        for c in [up.local, down.local] {
            let log = s.haproxy.wait_log("tcp", c).unwrap();
            assert_eq!(log.frontend, relay.to_string());
        }
    }
}

/// plink_service_proxy_headers_total of `service`: headers inserted
/// (first segments and their retransmissions).
fn headers_inserted(s: &Setup, service: &str) -> u64 {
    let scrape = s.plink.scrape(&s.net.gw).unwrap();
    Gateway::sample(
        &scrape,
        &format!("plink_service_proxy_headers_total{{service=\"{service}\"}}"),
    )
}

fn scrape_drops(s: &Setup) -> Vec<(String, u64)> {
    let scrape = s.plink.scrape(&s.net.gw).unwrap();
    ["proxy_syn_data", "proxy_no_room", "proxy_header_changed"]
        .iter()
        .map(|r| (r.to_string(), Gateway::drops(&scrape, r)))
        .collect()
}

fn two_mib_each_way_arrive_intact(far: FarEnds) {
    let s = setup(far);
    transfers(&s, 7);
    // Two hosts × upload and download, to echo and through HAProxy.
    assert!(headers_inserted(&s, "echo") >= 4);
    assert!(headers_inserted(&s, "web") >= 4);
    for (reason, n) in scrape_drops(&s) {
        assert_eq!(n, 0, "{reason} drops");
    }
}

/// The same transfers with 5% loss each way (gateway → backend and
/// gateway → client), and every first data segment (the one carrying the
/// header) dropped once on its way to the backend:
/// retransmissions of the first segment and SACK blocks cross the shifted
/// sequence space. Data arrives intact and the clients never see a SACK
/// block they must discard.
fn two_mib_each_way_survive_loss_and_first_segment_retransmission(far: FarEnds) {
    let s = setup(far);
    // Warm up neighbours without loss.
    proxy::get(&s.net.consumer_a, None, SocketAddrV4::new(ECHO, 80), 10).unwrap();
    let p = &s.net.provider;
    let (a, b) = (&s.net.consumer_a, &s.net.consumer_b);
    // Loss is made where frames arrive, by nftables in the receiving
    // namespace: this kernel has no netem, a sender's own qdisc or output
    // drop is local congestion to TCP (not loss), and on the gateway XDP
    // sees every frame before the kernel. Gateway → backend: the provider's
    // input, first data segments (the PROXY signature at the start of the
    // payload) every other one, and 5% of the rest. Gateway → client: 5% at
    // each client's input.
    let provider_rules = "table inet pptest {
  chain input {
    type filter hook prerouting priority raw; policy accept;
    tcp dport { 9000, 8081 } @ih,0,96 0x0d0a0d0a000d0a515549540a numgen inc mod 2 == 0 counter drop
    tcp dport { 9000, 8081 } numgen random mod 100 < 5 counter drop
  }
}
";
    let client_rules = "table inet pptest {
  chain input {
    type filter hook prerouting priority raw; policy accept;
    tcp sport { 80, 81 } numgen random mod 100 < 5 counter drop
  }
}
";
    for (host, rules, name) in [
        (p, provider_rules, "provider"),
        (a, client_rules, "vnet-a"),
        (b, client_rules, "vnet-b"),
    ] {
        let file = s
            .net
            .topo
            .scratch_dir()
            .unwrap()
            .join(format!("loss-{name}.nft"));
        std::fs::write(&file, rules).unwrap();
        host.exec("nft", &["-f", file.to_str().unwrap()]).unwrap();
    }

    let retrans = |h: &Host| tcp_counter(h, "Tcp", "RetransSegs");
    let (ra, rb, rp) = (retrans(a), retrans(b), retrans(p));
    let inserted0 = headers_inserted(&s, "echo") + headers_inserted(&s, "web");
    let discard = |h: &Host| tcp_counter(h, "TcpExt", "TCPSACKDiscard");
    let recoveries = |h: &Host| tcp_counter(h, "TcpExt", "TCPSackRecovery");
    let (da, db) = ((discard(a), recoveries(a)), (discard(b), recoveries(b)));
    transfers(&s, 11);
    let ruleset = p.exec("nft", &["list", "table", "inet", "pptest"]).unwrap();
    eprintln!("{ruleset}");
    let first_drops: u64 = ruleset
        .lines()
        .find(|l| l.contains("numgen inc"))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        first_drops >= 4,
        "first segments with a header dropped once each: {first_drops}"
    );
    // Each dropped first segment was sent again, with the header again.
    let inserted = headers_inserted(&s, "echo") + headers_inserted(&s, "web");
    assert!(
        inserted >= inserted0 + 8 + first_drops,
        "headers inserted: {inserted0} before, {inserted} after 8 connections and {first_drops} lost first segments"
    );
    assert!(retrans(a) > ra, "vnet-a's client retransmitted");
    assert!(retrans(b) > rb, "vnet-b's client retransmitted");
    assert!(retrans(p) > rp, "the backends retransmitted");
    for (h, (d0, s0), name) in [(a, da, "vnet-a"), (b, db, "vnet-b")] {
        let (d, r) = (discard(h), recoveries(h));
        eprintln!(
            "{name}: SACK recoveries {}, SACK blocks discarded {}",
            r - s0,
            d - d0
        );
        assert!(r > s0, "{name}'s client recovered with SACK");
        assert_eq!(
            d, d0,
            "{name}'s client discarded SACK blocks (not moved back?)"
        );
    }
    for (reason, n) in scrape_drops(&s) {
        assert_eq!(n, 0, "{reason} drops");
    }
}

/// A client that connects and closes without a byte: the header goes in
/// front of its FIN. The ppp backend reads a valid header, then EOF;
/// HAProxy logs the connection with the client's address.
fn a_client_closing_before_sending_still_sends_a_header(far: FarEnds) {
    let s = setup(far);
    let echo = SocketAddrV4::new(ECHO, 80);
    for host in [&s.net.consumer_a, &s.net.consumer_b] {
        let (local, answer) = proxy::connect_and_close(host, echo).unwrap();
        assert!(answer.is_empty(), "no answer to no request: {answer:?}");
        let r = s.pp.wait_record(ECHO_PORT, local).unwrap();
        assert_header(header(&r), local, echo, tlv::AZURE);
        assert_eq!(r.request, Request::Eof, "EOF right after the header");
    }
    let web = SocketAddrV4::new(WEB, 80);
    let (local, answer) = proxy::connect_and_close(&s.net.consumer_a, web).unwrap();
    // HAProxy answers a connection without a request with a 400.
    eprintln!("haproxy answered {:?}", String::from_utf8_lossy(&answer));
    let log = s.haproxy.wait_log("err", local).unwrap();
    assert_eq!(log.frontend, web.to_string(), "{log:?}");
    let (local, _) =
        proxy::connect_and_close(&s.net.consumer_b, SocketAddrV4::new(WEB, 81)).unwrap();
    s.haproxy.wait_log("tcp", local).unwrap();
}

/// A SYN carrying data (TCP Fast Open, no cookie needed: `tcp_fastopen=5`
/// in the client's namespace) would put the client's bytes ahead of the
/// header: plink drops it (`proxy_syn_data`); the client's retransmitted
/// SYN carries no data, and the data that follows the handshake gets the
/// header.
fn a_syn_with_data_is_refused_and_the_retry_gets_a_header(far: FarEnds) {
    let s = setup(far);
    let a = &s.net.consumer_a;
    a.sysctl("net.ipv4.tcp_fastopen", "5").unwrap();
    let before = Gateway::drops(&s.plink.scrape(&s.net.gw).unwrap(), "proxy_syn_data");
    // Counted when the SYN's data is not acknowledged.
    let active = |h: &Host| tcp_counter(h, "TcpExt", "TCPFastOpenActiveFail");
    let tfo_before = active(a);
    let dst = SocketAddrV4::new(ECHO, 80);
    let (local, line) = a
        .run_in(move || -> anyhow::Result<(SocketAddrV4, String)> {
            use std::io::{BufRead as _, Write as _};
            use std::os::fd::FromRawFd as _;
            // SAFETY: plain socket calls on a descriptor owned by the
            // TcpStream right after creation; errors are checked.
            let mut stream = unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                let stream = std::net::TcpStream::from_raw_fd(fd);
                let one: libc::c_int = 1;
                let rc = libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_FASTOPEN_CONNECT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
                anyhow::ensure!(
                    rc == 0,
                    "TCP_FASTOPEN_CONNECT: {}",
                    std::io::Error::last_os_error()
                );
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: dst.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(dst.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // With TCP_FASTOPEN_CONNECT, connect returns at once and
                // the first write sends the SYN with the data.
                let rc = libc::connect(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                anyhow::ensure!(rc == 0, "connect: {}", std::io::Error::last_os_error());
                stream
            };
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET 100\n")?;
            let local = match stream.local_addr()? {
                std::net::SocketAddr::V4(l) => l,
                other => anyhow::bail!("not IPv4: {other}"),
            };
            let mut reader = std::io::BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut body)?;
            anyhow::ensure!(body.len() == 100, "{} body bytes", body.len());
            Ok((local, line))
        })
        .unwrap()
        .unwrap();
    let after = Gateway::drops(&s.plink.scrape(&s.net.gw).unwrap(), "proxy_syn_data");
    assert!(
        after > before,
        "the SYN with data was refused: {before} -> {after}"
    );
    assert!(
        active(a) > tfo_before,
        "the client's SYN data was not acknowledged"
    );
    let info = proxy::parse_info(&line).unwrap();
    assert_eq!(info.src, local.to_string());
    let r = s.pp.wait_record(ECHO_PORT, local).unwrap();
    assert_header(header(&r), local, dst, tlv::AZURE);
    assert_eq!(r.request, Request::Get(100));
}

/// Health checks of a proxy-protocol service start with a PROXY v2 LOCAL
/// header (as a proxy's own checks do): HAProxy answers the http check
/// without logging a bad header, the ppp backend reads LOCAL, both
/// backends are up, and client flows still carry PROXY headers.
#[test]
fn health_checks_send_a_local_header() {
    let s = setup_with(FarEnds::Xdp, true);
    for backend in [
        "web\",backend=\"198.51.100.30",
        "echo\",backend=\"198.51.100.31",
    ] {
        let series = format!("plink_backend_up{{service=\"{backend}\"}} 1");
        netns::wait_for(&series, Duration::from_secs(10), || {
            Ok(s.plink
                .scrape(&s.net.gw)?
                .lines()
                .any(|l| l == series)
                .then_some(()))
        })
        .unwrap();
    }
    let local = netns::wait_for(
        "a LOCAL header at the ppp backend",
        Duration::from_secs(10),
        || {
            Ok(s.pp.records().into_iter().find(|r| {
                r.local_port == ECHO_PORT
                    && r.header
                        .as_ref()
                        .is_ok_and(|h| h.command == ppp::v2::Command::Local)
            }))
        },
    )
    .unwrap();
    eprintln!("health check header: {:?}", local.header);
    let bad: Vec<_> =
        s.pp.records()
            .into_iter()
            .filter(|r| r.local_port == ECHO_PORT && r.header.is_err())
            .collect();
    assert!(bad.is_empty(), "checks without a valid header: {bad:?}");
    let checks = netns::wait_for(
        "HAProxy to log the http checks",
        Duration::from_secs(10),
        || {
            let l: Vec<_> = s
                .haproxy
                .logs()
                .into_iter()
                .filter(|l| l.kind == "http")
                .collect();
            Ok((!l.is_empty()).then_some(l))
        },
    )
    .unwrap();
    assert!(
        checks.iter().all(|l| l.field("st") == Some("200")),
        "{checks:?}"
    );
    let errors: Vec<_> = s
        .haproxy
        .logs()
        .into_iter()
        .filter(|l| l.kind == "err")
        .collect();
    assert!(errors.is_empty(), "HAProxy saw bad connections: {errors:?}");

    let echo = SocketAddrV4::new(ECHO, 80);
    let reply = proxy::get(&s.net.consumer_a, None, echo, 100).unwrap();
    let r = s.pp.wait_record(ECHO_PORT, reply.local).unwrap();
    assert_header(header(&r), reply.local, echo, tlv::AZURE);
}

plink_tests::on_both_far_ends!(
    overlapping_consumers_each_send_their_own_header,
    aws_gcp_and_custom_tlvs,
    two_mib_each_way_arrive_intact,
    two_mib_each_way_survive_loss_and_first_segment_retransmission,
    a_client_closing_before_sending_still_sends_a_header,
    a_syn_with_data_is_refused_and_the_retry_gets_a_header,
);
