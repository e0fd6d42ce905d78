//! Prometheus metrics: a plain snapshot of what the dataplane counted, its
//! rendering in the text exposition format, and the `/metrics` HTTP server.
//!
//! Kernel counters are absolute values read at scrape time, so they are
//! rendered through a snapshot rather than accumulated in client-side
//! counters; Prometheus handles the reset of a fresh start.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

/// Per-endpoint counters and state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointSample {
    pub endpoint: String,
    pub service: String,
    /// `pending`, `approved`, `rejected` (removed endpoints have no series).
    pub state: String,
    /// Transport protocol of the service, the `protocol` label of connections.
    pub protocol: String,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub connections: u64,
    /// New flows refused by this endpoint's caps, by cap.
    pub refused_max_flows: u64,
    pub refused_rate: u64,
    /// The endpoint's link id (what PROXY protocol headers carry).
    pub link_id: u32,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceSample {
    pub service: String,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub nat_port_allocation_failures: u64,
    /// SYNs (in) and SYN-ACKs (out) whose MSS option was clamped.
    pub mss_clamped_in: u64,
    pub mss_clamped_out: u64,
    /// Fragmentation-needed errors sent to backends about replies too big
    /// for the consumer interface.
    pub frag_needed_to_backend: u64,
    /// PROXY protocol headers inserted in front of client bytes.
    pub proxy_headers: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendSample {
    pub service: String,
    pub backend: String,
    pub bytes: u64,
    pub connections: u64,
    pub up: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NatSample {
    pub service: String,
    pub nat_address: String,
    /// `tcp`, `udp` or `icmp`: ports are unique per address and protocol.
    pub protocol: String,
    pub ports_in_use: u64,
    pub ports_capacity: u64,
}

/// XDP transmit errors of a device: redirects and XDP_TX that failed after
/// the program returned, which the program itself cannot see.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSample {
    pub device: String,
    pub xdp_tx_errors: u64,
    pub xdp_redirect_errors: u64,
    /// Packets the device dropped on transmit; on veth this includes frames
    /// redirected into it while its peer runs no NAPI.
    pub tx_dropped: u64,
}

/// Frames plink's XDP program saw on an interface, by the verdict it returned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InterfaceSample {
    pub interface: String,
    /// Indexed like `plink_common::XDP_VERDICT_NAMES`.
    pub verdicts: [u64; 5],
    /// Frames by EtherType family: IPv4, IPv6, ARP (others are the rest
    /// of the verdicts' sum).
    pub ipv4: u64,
    pub ipv6: u64,
    pub arp: u64,
}

/// Drops attributed to an endpoint (the packet matched it), by reason.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointDropSample {
    pub endpoint: String,
    pub service: String,
    pub reason: String,
    pub count: u64,
}

/// Everything `/metrics` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub endpoints: Vec<EndpointSample>,
    pub services: Vec<ServiceSample>,
    pub backends: Vec<BackendSample>,
    pub nat: Vec<NatSample>,
    /// Flows (not map entries), from the last GC sweep.
    pub conntrack_entries: u64,
    pub conntrack_capacity: u64,
    /// Drops by reason name; every reason appears, zero or not.
    pub drops: Vec<(String, u64)>,
    /// Drops with the endpoint they matched; reasons that never happened are left out.
    pub endpoint_drops: Vec<EndpointDropSample>,
    pub devices: Vec<DeviceSample>,
    pub interfaces: Vec<InterfaceSample>,
    /// The kernel holds the committed configuration (false: diverged).
    pub dataplane_in_sync: bool,
    /// Applies that failed part way since the controller started.
    pub apply_failures: u64,
    /// In a fleet with a shared store: whether it answers.
    pub fleet_store_up: Option<bool>,
    /// Flow-log records lost, by where (`ring`: the datapath's ring was
    /// full; `queue`: the exporter's queue from the GC was full).
    pub flow_log_lost: Vec<(String, u64)>,
    /// Flow-log records exported, by sink (`ipfix`, `json`).
    pub flow_log_exported: Vec<(String, u64)>,
    /// Flow-log export errors (a send or write failed), by sink.
    pub flow_log_errors: Vec<(String, u64)>,
}

struct FamilyBuilder {
    family: MetricFamily,
}

impl FamilyBuilder {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        family.set_help(help.to_owned());
        family.set_field_type(kind);
        Self { family }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut metric = Metric::default();
        metric.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut pair = LabelPair::default();
                    pair.set_name((*k).to_owned());
                    pair.set_value((*v).to_owned());
                    pair
                })
                .collect(),
        );
        match self.family.get_field_type() {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                metric.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                metric.set_gauge(g);
            }
        }
        self.family.mut_metric().push(metric);
    }
}

/// Renders a snapshot in the Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    use MetricType::{COUNTER, GAUGE};
    let mut families = Vec::new();
    let mut push = |b: FamilyBuilder| {
        families.push(b.family);
    };

    let mut ep_bytes = FamilyBuilder::new(
        "plink_endpoint_bytes_total",
        "IP bytes forwarded through the endpoint (in = consumer to service, out = service to consumer).",
        COUNTER,
    );
    let mut ep_packets = FamilyBuilder::new(
        "plink_endpoint_packets_total",
        "Packets forwarded through the endpoint.",
        COUNTER,
    );
    let mut ep_conns = FamilyBuilder::new(
        "plink_endpoint_connections_total",
        "Flows created through the endpoint.",
        COUNTER,
    );
    let mut ep_refused = FamilyBuilder::new(
        "plink_endpoint_refused_flows_total",
        "New flows refused by the endpoint's caps.",
        COUNTER,
    );
    let mut ep_state = FamilyBuilder::new(
        "plink_endpoint_state",
        "Connection state of the endpoint (value 1; the state is in the label).",
        GAUGE,
    );
    let mut ep_info = FamilyBuilder::new(
        "plink_endpoint_info",
        "The endpoint's link id, as its service's PROXY protocol headers carry it (value 1; the id is in the label).",
        GAUGE,
    );
    for e in &s.endpoints {
        let base = [
            ("endpoint", e.endpoint.as_str()),
            ("service", e.service.as_str()),
        ];
        for (dir, bytes, packets) in [
            ("in", e.bytes_in, e.packets_in),
            ("out", e.bytes_out, e.packets_out),
        ] {
            let labels = [base[0], base[1], ("direction", dir)];
            ep_bytes.sample(&labels, bytes as f64);
            ep_packets.sample(&labels, packets as f64);
        }
        ep_conns.sample(
            &[base[0], base[1], ("protocol", &e.protocol)],
            e.connections as f64,
        );
        ep_refused.sample(
            &[base[0], base[1], ("cap", "max_flows")],
            e.refused_max_flows as f64,
        );
        ep_refused.sample(
            &[base[0], base[1], ("cap", "new_flows_per_second")],
            e.refused_rate as f64,
        );
        ep_state.sample(&[base[0], base[1], ("state", &e.state)], 1.0);
        let link_id = e.link_id.to_string();
        ep_info.sample(&[base[0], base[1], ("link_id", link_id.as_str())], 1.0);
    }
    push(ep_bytes);
    push(ep_packets);
    push(ep_conns);
    push(ep_refused);
    push(ep_state);
    push(ep_info);

    let mut svc_bytes = FamilyBuilder::new(
        "plink_service_bytes_total",
        "IP bytes forwarded for the service, all endpoints together.",
        COUNTER,
    );
    let mut svc_packets = FamilyBuilder::new(
        "plink_service_packets_total",
        "Packets forwarded for the service.",
        COUNTER,
    );
    let mut nat_fail = FamilyBuilder::new(
        "plink_nat_port_allocation_failures_total",
        "New flows refused because no NAT port was free.",
        COUNTER,
    );
    let mut mss_clamped = FamilyBuilder::new(
        "plink_service_mss_clamped_total",
        "TCP SYNs (in) and SYN-ACKs (out) whose MSS option was lowered to the service's mss_clamp.",
        COUNTER,
    );
    let mut frag_needed = FamilyBuilder::new(
        "plink_service_frag_needed_sent_total",
        "Fragmentation-needed errors sent to backends about replies too big for the consumer interface.",
        COUNTER,
    );
    let mut proxy_headers = FamilyBuilder::new(
        "plink_service_proxy_headers_total",
        "PROXY protocol v2 headers inserted in front of a flow's first client bytes (retransmissions of that segment included).",
        COUNTER,
    );
    for v in &s.services {
        proxy_headers.sample(&[("service", &v.service)], v.proxy_headers as f64);
        for (dir, bytes, packets, clamped) in [
            ("in", v.bytes_in, v.packets_in, v.mss_clamped_in),
            ("out", v.bytes_out, v.packets_out, v.mss_clamped_out),
        ] {
            let labels = [("service", v.service.as_str()), ("direction", dir)];
            svc_bytes.sample(&labels, bytes as f64);
            svc_packets.sample(&labels, packets as f64);
            mss_clamped.sample(&labels, clamped as f64);
        }
        frag_needed.sample(&[("service", &v.service)], v.frag_needed_to_backend as f64);
        nat_fail.sample(
            &[("service", &v.service)],
            v.nat_port_allocation_failures as f64,
        );
    }
    push(svc_bytes);
    push(svc_packets);
    push(nat_fail);
    push(mss_clamped);
    push(frag_needed);
    push(proxy_headers);

    let mut be_bytes = FamilyBuilder::new(
        "plink_backend_bytes_total",
        "IP bytes forwarded to and from the backend.",
        COUNTER,
    );
    let mut be_conns = FamilyBuilder::new(
        "plink_backend_connections_total",
        "Flows assigned to the backend.",
        COUNTER,
    );
    let mut be_up = FamilyBuilder::new(
        "plink_backend_up",
        "1 when the backend takes new flows (healthy and active), else 0.",
        GAUGE,
    );
    for b in &s.backends {
        let labels = [
            ("service", b.service.as_str()),
            ("backend", b.backend.as_str()),
        ];
        be_bytes.sample(&labels, b.bytes as f64);
        be_conns.sample(&labels, b.connections as f64);
        be_up.sample(&labels, if b.up { 1.0 } else { 0.0 });
    }
    push(be_bytes);
    push(be_conns);
    push(be_up);

    let mut nat_used = FamilyBuilder::new(
        "plink_nat_ports_in_use",
        "NAT ports held by live flows, per protocol (comparable with plink_nat_ports_capacity).",
        GAUGE,
    );
    let mut nat_cap = FamilyBuilder::new(
        "plink_nat_ports_capacity",
        "NAT ports available per protocol on the address.",
        GAUGE,
    );
    for n in &s.nat {
        let labels = [
            ("service", n.service.as_str()),
            ("nat_address", n.nat_address.as_str()),
            ("protocol", n.protocol.as_str()),
        ];
        nat_used.sample(&labels, n.ports_in_use as f64);
        nat_cap.sample(&labels, n.ports_capacity as f64);
    }
    push(nat_used);
    push(nat_cap);

    let mut ct = FamilyBuilder::new(
        "plink_conntrack_entries",
        "Live flows in the conntrack table.",
        GAUGE,
    );
    ct.sample(&[], s.conntrack_entries as f64);
    push(ct);
    let mut ct_cap = FamilyBuilder::new(
        "plink_conntrack_capacity",
        "Flows the conntrack table can hold.",
        GAUGE,
    );
    ct_cap.sample(&[], s.conntrack_capacity as f64);
    push(ct_cap);

    let mut in_sync = FamilyBuilder::new(
        "plink_dataplane_in_sync",
        "1 while the kernel holds the configuration the controller committed, 0 when it diverged (an apply failed part way and could not be undone).",
        GAUGE,
    );
    in_sync.sample(&[], if s.dataplane_in_sync { 1.0 } else { 0.0 });
    push(in_sync);
    if let Some(up) = s.fleet_store_up {
        let mut store = FamilyBuilder::new(
            "plink_fleet_store_up",
            "1 while the fleet's shared store (etcd) answers; 0: forwarding goes on with the last decisions, approvals are refused until it is back.",
            GAUGE,
        );
        store.sample(&[], if up { 1.0 } else { 0.0 });
        push(store);
    }
    let mut failures = FamilyBuilder::new(
        "plink_apply_failures_total",
        "Changes the dataplane did not take (a map write failed part way) since the controller started.",
        COUNTER,
    );
    failures.sample(&[], s.apply_failures as f64);
    push(failures);

    for (name, help, samples, label) in [
        (
            "plink_flow_log_lost_total",
            "Flow-log records lost (the packets were forwarded), by where: ring (the datapath's ring buffer was full), queue (the exporter's queue was full).",
            &s.flow_log_lost,
            "where",
        ),
        (
            "plink_flow_log_records_exported_total",
            "Flow-log records exported, by sink.",
            &s.flow_log_exported,
            "sink",
        ),
        (
            "plink_flow_log_export_errors_total",
            "Flow-log messages or writes that failed, by sink.",
            &s.flow_log_errors,
            "sink",
        ),
    ] {
        let mut f = FamilyBuilder::new(name, help, COUNTER);
        for (l, v) in samples {
            f.sample(&[(label, l)], *v as f64);
        }
        push(f);
    }

    let mut drops = FamilyBuilder::new(
        "plink_drops_total",
        "Packets dropped by the datapath, by reason.",
        COUNTER,
    );
    for (reason, count) in &s.drops {
        drops.sample(&[("reason", reason)], *count as f64);
    }
    push(drops);

    let mut ep_drops = FamilyBuilder::new(
        "plink_endpoint_drops_total",
        "Packets dropped after matching an endpoint, by reason (also in plink_drops_total).",
        COUNTER,
    );
    for d in &s.endpoint_drops {
        ep_drops.sample(
            &[
                ("endpoint", &d.endpoint),
                ("service", &d.service),
                ("reason", &d.reason),
            ],
            d.count as f64,
        );
    }
    push(ep_drops);

    let mut dev_tx = FamilyBuilder::new(
        "plink_device_xdp_tx_errors_total",
        "XDP_TX transmissions the device failed after the program returned.",
        COUNTER,
    );
    let mut dev_redir = FamilyBuilder::new(
        "plink_device_xdp_redirect_errors_total",
        "XDP redirects into the device that it failed to transmit, after the redirecting program returned.",
        COUNTER,
    );
    let mut dev_dropped = FamilyBuilder::new(
        "plink_device_tx_dropped_total",
        "Packets the device dropped on transmit (veth: includes redirects into it while its peer runs no NAPI).",
        COUNTER,
    );
    for d in &s.devices {
        dev_tx.sample(&[("device", &d.device)], d.xdp_tx_errors as f64);
        dev_redir.sample(&[("device", &d.device)], d.xdp_redirect_errors as f64);
        dev_dropped.sample(&[("device", &d.device)], d.tx_dropped as f64);
    }
    push(dev_tx);
    push(dev_redir);
    push(dev_dropped);

    let mut if_packets = FamilyBuilder::new(
        "plink_interface_xdp_packets_total",
        "Frames plink's XDP program saw on the interface, by the verdict it returned (drop reasons are in plink_drops_total).",
        COUNTER,
    );
    for i in &s.interfaces {
        for (verdict, n) in plink_common::XDP_VERDICT_NAMES.iter().zip(i.verdicts) {
            if_packets.sample(
                &[("interface", &i.interface), ("verdict", verdict)],
                n as f64,
            );
        }
    }
    push(if_packets);
    let mut if_families = FamilyBuilder::new(
        "plink_interface_frames_total",
        "Frames plink's XDP program saw on the interface, by family (ipv4, ipv6, arp; other EtherTypes are the rest of plink_interface_xdp_packets_total).",
        COUNTER,
    );
    for i in &s.interfaces {
        for (family, n) in [("ipv4", i.ipv4), ("ipv6", i.ipv6), ("arp", i.arp)] {
            if_families.sample(&[("interface", &i.interface), ("family", family)], n as f64);
        }
    }
    push(if_families);

    // Empty families would print HELP/TYPE with no samples; leave them out.
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = Vec::new();
    // Encoding plain structs into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&families, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Produces the snapshot at scrape time.
pub type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn handle(
    req: Request<Incoming>,
    snapshot: SnapshotFn,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: plink serves /metrics\n",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET\n",
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let body = tokio::task::spawn_blocking(move || render(&snapshot()))
        .await
        .unwrap_or_default();
    let mut resp = text(StatusCode::OK, &body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

/// Binds the metrics address; serving happens in [`serve`].
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr} (gateway.metrics)"))
}

/// What one client may hold of the metrics server.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once; more are closed on accept, so a client
    /// opening many cannot exhaust the controller's file descriptors.
    pub max_connections: usize,
    /// Time for a request's headers to arrive (slow-loris clients).
    pub header_timeout: Duration,
    /// Time a connection may live, response included (clients that never
    /// read their response).
    pub connection_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `/metrics` forever with the default [`ServeLimits`].
pub async fn serve(listener: tokio::net::TcpListener, snapshot: SnapshotFn) {
    serve_with(listener, snapshot, ServeLimits::default()).await
}

/// Serves `/metrics` forever. Slow or broken clients only cost their own
/// connection, within `limits`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    snapshot: SnapshotFn,
    limits: ServeLimits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: connection limit reached, closing");
            drop(stream);
            continue;
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, snapshot.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_snapshot() -> Snapshot {
        Snapshot {
            endpoints: vec![EndpointSample {
                endpoint: "orders-a".into(),
                service: "orders".into(),
                state: "approved".into(),
                protocol: "tcp".into(),
                packets_in: 3,
                bytes_in: 300,
                packets_out: 2,
                bytes_out: 1200,
                connections: 1,
                link_id: 7,
                ..Default::default()
            }],
            services: vec![ServiceSample {
                service: "orders".into(),
                bytes_in: 300,
                mss_clamped_out: 4,
                frag_needed_to_backend: 6,
                ..Default::default()
            }],
            backends: vec![BackendSample {
                service: "orders".into(),
                backend: "198.51.100.10".into(),
                up: true,
                ..Default::default()
            }],
            nat: vec![NatSample {
                service: "orders".into(),
                nat_address: "198.51.100.200".into(),
                protocol: "tcp".into(),
                ports_in_use: 1,
                ports_capacity: 64512,
            }],
            conntrack_entries: 1,
            conntrack_capacity: 1024,
            drops: vec![("no_endpoint".into(), 7)],
            endpoint_drops: vec![EndpointDropSample {
                endpoint: "orders-a".into(),
                service: "orders".into(),
                reason: "endpoint_max_flows".into(),
                count: 2,
            }],
            devices: vec![DeviceSample {
                device: "c1".into(),
                xdp_tx_errors: 0,
                xdp_redirect_errors: 5,
                tx_dropped: 1,
            }],
            interfaces: vec![InterfaceSample {
                interface: "c1".into(),
                verdicts: [0, 4, 0, 1, 9],
                ipv4: 8,
                ipv6: 5,
                arp: 1,
            }],
            dataplane_in_sync: false,
            apply_failures: 2,
            fleet_store_up: Some(false),
            flow_log_lost: vec![("ring".into(), 3), ("queue".into(), 0)],
            flow_log_exported: vec![("ipfix".into(), 5), ("json".into(), 0)],
            flow_log_errors: vec![("ipfix".into(), 0), ("json".into(), 0)],
        }
    }

    #[test]
    fn renders_names_labels_and_values() {
        let text = render(&sample_snapshot());
        for line in [
            "plink_endpoint_bytes_total{endpoint=\"orders-a\",service=\"orders\",direction=\"in\"} 300",
            "plink_interface_xdp_packets_total{interface=\"c1\",verdict=\"redirect\"} 9",
            "plink_interface_xdp_packets_total{interface=\"c1\",verdict=\"aborted\"} 0",
            "plink_interface_frames_total{interface=\"c1\",family=\"ipv6\"} 5",
            "plink_interface_frames_total{interface=\"c1\",family=\"ipv4\"} 8",
            "plink_interface_frames_total{interface=\"c1\",family=\"arp\"} 1",
            "plink_endpoint_bytes_total{endpoint=\"orders-a\",service=\"orders\",direction=\"out\"} 1200",
            "plink_endpoint_connections_total{endpoint=\"orders-a\",service=\"orders\",protocol=\"tcp\"} 1",
            "plink_endpoint_state{endpoint=\"orders-a\",service=\"orders\",state=\"approved\"} 1",
            "plink_endpoint_info{endpoint=\"orders-a\",service=\"orders\",link_id=\"7\"} 1",
            "plink_nat_ports_capacity{service=\"orders\",nat_address=\"198.51.100.200\",protocol=\"tcp\"} 64512",
            "plink_nat_ports_in_use{service=\"orders\",nat_address=\"198.51.100.200\",protocol=\"tcp\"} 1",
            "plink_drops_total{reason=\"no_endpoint\"} 7",
            "plink_flow_log_lost_total{where=\"ring\"} 3",
            "plink_flow_log_records_exported_total{sink=\"ipfix\"} 5",
            "plink_conntrack_capacity 1024",
            "# TYPE plink_backend_up gauge",
            "# TYPE plink_drops_total counter",
            "plink_endpoint_drops_total{endpoint=\"orders-a\",service=\"orders\",reason=\"endpoint_max_flows\"} 2",
            "plink_device_xdp_redirect_errors_total{device=\"c1\"} 5",
            "plink_device_xdp_tx_errors_total{device=\"c1\"} 0",
            "plink_device_tx_dropped_total{device=\"c1\"} 1",
            "plink_service_mss_clamped_total{service=\"orders\",direction=\"out\"} 4",
            "plink_service_mss_clamped_total{service=\"orders\",direction=\"in\"} 0",
            "plink_service_frag_needed_sent_total{service=\"orders\"} 6",
            "# TYPE plink_dataplane_in_sync gauge",
            "plink_dataplane_in_sync 0",
            "# TYPE plink_apply_failures_total counter",
            "plink_apply_failures_total 2",
            "# TYPE plink_fleet_store_up gauge",
            "plink_fleet_store_up 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        let empty = render(&Snapshot::default());
        assert!(
            !empty.contains("plink_device_xdp_tx_errors_total"),
            "empty families are left out"
        );
        assert!(
            !empty.contains("plink_fleet_store_up"),
            "no store gauge without a fleet store"
        );
    }

    fn request(addr: SocketAddr, raw: &str) -> String {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(raw.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }

    /// A metrics server on a loopback port, serving the sample snapshot; it
    /// stops when the returned runtime is dropped.
    fn server(limits: ServeLimits) -> (tokio::runtime::Runtime, SocketAddr) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(bind("127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(serve_with(listener, Arc::new(sample_snapshot), limits));
        (rt, addr)
    }

    /// Slow clients, clients that never finish their request and more
    /// clients than the server takes: a well-behaved scrape still answers.
    #[test]
    fn http_survives_slow_and_too_many_clients() {
        use std::io::{Read as _, Write as _};
        let limits = ServeLimits {
            max_connections: 8,
            header_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_secs(5),
        };
        let (_rt, addr) = server(limits);
        let get = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

        // A client that trickles its request byte by byte is served.
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for b in get.bytes() {
            slow.write_all(&[b]).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut out = String::new();
        let _ = slow.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 200"), "trickled request: {out}");

        // Half a request that never ends is cut at the header timeout.
        let mut stuck = std::net::TcpStream::connect(addr).unwrap();
        stuck.write_all(b"GET /metr").unwrap();
        stuck
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = Vec::new();
        let read = stuck.read_to_end(&mut buf);
        assert!(
            read.is_ok(),
            "a stuck request is closed by the server: {read:?}"
        );

        // More stuck clients than the limit: the extra ones are closed at
        // once, and once the stuck ones time out a scrape works again.
        let held: Vec<_> = (0..limits.max_connections)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /").unwrap();
                s
            })
            .collect();
        let mut extra = std::net::TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let n = extra.read(&mut buf);
        assert!(
            matches!(n, Ok(0))
                || n.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "a connection over the limit is closed: {n:?}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let answer = request(addr, get);
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no scrape answered after the stuck clients"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(held);
    }

    #[test]
    fn http_serves_get_only_and_survives_garbage() {
        let (_rt, addr) = server(ServeLimits::default());
        let get = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let ok = request(addr, get);
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("plink_drops_total{reason=\"no_endpoint\"} 7"));
        let post = request(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let other = request(
            addr,
            "GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let garbage = request(addr, "\x00\x01 not http at all\r\n\r\n");
        assert!(!garbage.starts_with("HTTP/1.1 200"), "{garbage}");
        // Still serving after the garbage.
        assert!(request(addr, get).starts_with("HTTP/1.1 200"));
    }
}
