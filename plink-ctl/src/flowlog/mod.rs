//! Flow logs: the datapath's start and end records of logged flows (read
//! from the `FLOW_LOG` ring buffer) merged with the end records of the
//! flows the controller removes (GC expiry, purges), exported as IPFIX over
//! UDP and / or as JSON lines. One thread reads, converts and sends; the
//! GC hands its records over through a bounded queue and never waits.
pub mod ipfix;

use std::{
    collections::HashMap,
    io::Write,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use plink_common::{
    CtFwdKey, CtFwdValue, FlowLogRecord, flow_end_reason, flow_flags, flow_log_kind, tcp_state,
};
use serde::Serialize;

/// Start or end of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowKind {
    Start,
    End,
}

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// Idle for longer than its timeout.
    Expired,
    /// Idle after a FIN or RST (TCP).
    Closed,
    /// Removed by the controller while alive (endpoint rejected, removed
    /// or re-pointed, backend removed).
    Purged,
    /// Left by an endpoint that changed, removed by the datapath.
    Evicted,
}

impl EndReason {
    fn from_datapath(r: u8) -> Self {
        match r {
            flow_end_reason::CLOSED => EndReason::Closed,
            flow_end_reason::PURGED => EndReason::Purged,
            flow_end_reason::EVICTED => EndReason::Evicted,
            _ => EndReason::Expired,
        }
    }

    /// IANA flowEndReason.
    pub fn ipfix(self) -> u8 {
        match self {
            EndReason::Expired => ipfix::end_reason::IDLE_TIMEOUT,
            EndReason::Closed => ipfix::end_reason::END_OF_FLOW,
            EndReason::Purged | EndReason::Evicted => ipfix::end_reason::FORCED_END,
        }
    }
}

/// One flow-log record as exported. Times are UNIX milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowEvent {
    pub kind: FlowKind,
    pub reason: Option<EndReason>,
    pub proto: u8,
    pub network_id: u32,
    pub endpoint_id: u32,
    pub service_id: u32,
    /// Client and endpoint address: IPv4 or IPv6 (the consumer's family).
    pub client: SocketAddr,
    pub endpoint: SocketAddr,
    /// NAT address and backend: the service's family (IPv4 for NAT64).
    pub nat: SocketAddr,
    pub backend: SocketAddr,
    /// When the flow opened (the end's start, if this controller saw it).
    pub start_ms: u64,
    /// Its last packet (end), or its first (start).
    pub end_ms: u64,
    /// When the record was written.
    pub time_ms: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
}

fn sa(a: &plink_common::Addr, port_be: u16) -> SocketAddr {
    SocketAddr::new(crate::dataplane::spec::ip_of(a), u16::from_be(port_be))
}

/// CLOCK_MONOTONIC nanoseconds → UNIX milliseconds, given both clocks now.
pub fn wall_ms(mono_ns: u64, now_mono_ns: u64, now_unix_ms: u64) -> u64 {
    if mono_ns >= now_mono_ns {
        now_unix_ms + (mono_ns - now_mono_ns) / 1_000_000
    } else {
        now_unix_ms.saturating_sub((now_mono_ns - mono_ns) / 1_000_000)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The record of a ring entry (`wall`: monotonic ns → UNIX ms).
pub fn from_ring(r: &FlowLogRecord, wall: impl Fn(u64) -> u64) -> FlowEvent {
    let end = r.kind == flow_log_kind::END;
    FlowEvent {
        kind: if end { FlowKind::End } else { FlowKind::Start },
        reason: end.then(|| EndReason::from_datapath(r.reason)),
        proto: r.proto,
        network_id: r.network_id,
        endpoint_id: r.endpoint_id,
        service_id: r.service_id,
        client: sa(&r.client_addr_be, r.client_port_be),
        endpoint: sa(&r.endpoint_addr_be, r.endpoint_port_be),
        nat: sa(&r.nat_addr_be, r.nat_port_be),
        backend: sa(&r.backend_addr_be, r.backend_port_be),
        start_ms: wall(r.time_ns),
        end_ms: wall(if end { r.last_seen_ns } else { r.time_ns }),
        time_ms: wall(r.time_ns),
        packets_in: r.packets_in,
        bytes_in: r.bytes_in,
        packets_out: r.packets_out,
        bytes_out: r.bytes_out,
    }
}

/// The end record of a flow the controller removed; `expired`: by the
/// expiry rule (else purged).
pub fn from_removed(
    k: &CtFwdKey,
    v: &CtFwdValue,
    expired: bool,
    wall: impl Fn(u64) -> u64,
    now_ms: u64,
) -> FlowEvent {
    let reason = match (expired, v.tcp_state) {
        (true, tcp_state::CLOSING) => EndReason::Closed,
        (true, _) => EndReason::Expired,
        (false, _) => EndReason::Purged,
    };
    FlowEvent {
        kind: FlowKind::End,
        reason: Some(reason),
        proto: k.proto,
        network_id: k.network_id,
        endpoint_id: v.endpoint_id,
        service_id: v.service_id,
        client: sa(&k.src_addr_be, k.src_port_be),
        endpoint: sa(&k.dst_addr_be, k.dst_port_be),
        nat: sa(&v.nat_addr_be, v.nat_port_be),
        backend: sa(&v.backend_addr_be, v.backend_port_be),
        start_ms: wall(v.last_seen_ns),
        end_ms: wall(v.last_seen_ns),
        time_ms: now_ms,
        packets_in: v.log_packets_in,
        bytes_in: v.log_bytes_in,
        packets_out: v.log_packets_out,
        bytes_out: v.log_bytes_out,
    }
}

/// Is the flow logged?
pub fn logged(v: &CtFwdValue) -> bool {
    v.flags & flow_flags::LOGGED != 0
}

/// Counters for `/metrics`, shared by the exporter thread.
#[derive(Debug, Default)]
pub struct Stats {
    /// Lost in the datapath (ring full), summed over CPUs, last reading.
    pub lost_ring: AtomicU64,
    /// Lost between the GC and the exporter (queue full).
    pub lost_queue: AtomicU64,
    pub exported_ipfix: AtomicU64,
    pub exported_json: AtomicU64,
    pub errors_ipfix: AtomicU64,
    pub errors_json: AtomicU64,
}

/// The process's flow-log counters (zero without flow logs).
pub static STATS: Stats = Stats {
    lost_ring: AtomicU64::new(0),
    lost_queue: AtomicU64::new(0),
    exported_ipfix: AtomicU64::new(0),
    exported_json: AtomicU64::new(0),
    errors_ipfix: AtomicU64::new(0),
    errors_json: AtomicU64::new(0),
};

/// Where the GC sends the end records of the logged flows it removes.
#[derive(Clone, Debug)]
pub struct EndSink(SyncSender<(CtFwdKey, CtFwdValue, bool)>);

impl EndSink {
    /// Hands the removed flow over; a full queue loses it (counted).
    pub fn send(&self, k: &CtFwdKey, v: &CtFwdValue, expired: bool) {
        match self.0.try_send((*k, *v, expired)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                STATS.lost_queue.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Records queued from the GC before the exporter loses them.
pub const END_QUEUE: usize = 65_536;

/// The exporter's configuration.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub ipfix: Option<SocketAddr>,
    pub json: Option<PathBuf>,
    pub observation_domain: u32,
}

/// A running exporter thread.
pub struct Exporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the exporter on the datapath's ring and lost-counter maps;
/// returns it and the sink for the GC's end records.
pub fn start(
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    cfg: ExportConfig,
) -> anyhow::Result<(Exporter, EndSink)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(END_QUEUE);
    let mut out = Outputs::open(&cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("flow-logs".into())
        .spawn(move || run(ring, lost, rx, &mut out, &stop2))?;
    Ok((
        Exporter {
            stop,
            thread: Some(thread),
        },
        EndSink(tx),
    ))
}

struct Outputs {
    ipfix: Option<(UdpSocket, SocketAddr, ipfix::Encoder)>,
    json: Option<(PathBuf, std::fs::File)>,
}

impl Outputs {
    fn open(cfg: &ExportConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let ipfix = match cfg.ipfix {
            Some(to) => {
                let bind: SocketAddr = if to.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(bind).context("binding the IPFIX exporter's socket")?;
                Some((s, to, ipfix::Encoder::new(cfg.observation_domain)))
            }
            None => None,
        };
        let json = match &cfg.json {
            Some(p) => Some((p.clone(), open_json(p)?)),
            None => None,
        };
        Ok(Self { ipfix, json })
    }

    fn send(&mut self, batch: &[FlowEvent], now_secs: u32) {
        if let Some((s, to, enc)) = &mut self.ipfix {
            for m in enc.encode(now_secs, batch) {
                let n = records_in(&m);
                match s.send_to(&m, *to) {
                    Ok(_) => STATS.exported_ipfix.fetch_add(n, Ordering::Relaxed),
                    Err(_) => STATS.errors_ipfix.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Some((path, f)) = &mut self.json {
            // Reopened when rotated away (as the event log).
            if !same_file(path, f)
                && let Ok(n) = open_json(path)
            {
                *f = n;
            }
            let mut buf = Vec::new();
            for r in batch {
                if serde_json::to_writer(&mut buf, &json_line(r)).is_ok() {
                    buf.push(b'\n');
                }
            }
            match f.write_all(&buf) {
                Ok(()) => STATS
                    .exported_json
                    .fetch_add(batch.len() as u64, Ordering::Relaxed),
                Err(_) => STATS.errors_json.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

fn records_in(m: &[u8]) -> u64 {
    let mut at = 16;
    let mut n = 0;
    while at + 4 <= m.len() {
        let id = u16::from_be_bytes([m[at], m[at + 1]]);
        let len = u16::from_be_bytes([m[at + 2], m[at + 3]]) as usize;
        if len < 4 {
            break;
        }
        if let Some(t) = ipfix::Template::from_id(id) {
            n += ((len - 4) / t.record_len()) as u64;
        }
        at += len;
    }
    n
}

fn open_json(p: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(p)
        .with_context(|| format!("opening the flow log {}", p.display()))
}

fn same_file(p: &std::path::Path, f: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), f.metadata()) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// JSON-lines schema, version 1 (docs/CONFIG.md, README "Flow logs").
#[derive(Serialize)]
struct JsonLine<'a> {
    v: u32,
    time: String,
    event: FlowKind,
    reason: Option<EndReason>,
    protocol: &'a str,
    network_id: u32,
    endpoint_id: u32,
    service_id: u32,
    client: String,
    endpoint: String,
    nat: String,
    backend: String,
    start: String,
    end: String,
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
}

fn rfc3339(ms: u64) -> String {
    crate::events::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

fn json_line(r: &FlowEvent) -> JsonLine<'_> {
    JsonLine {
        v: 1,
        time: rfc3339(r.time_ms),
        event: r.kind,
        reason: r.reason,
        protocol: match r.proto {
            6 => "tcp",
            17 => "udp",
            1 => "icmp",
            58 => "icmpv6",
            _ => "other",
        },
        network_id: r.network_id,
        endpoint_id: r.endpoint_id,
        service_id: r.service_id,
        client: r.client.to_string(),
        endpoint: r.endpoint.to_string(),
        nat: r.nat.to_string(),
        backend: r.backend.to_string(),
        start: rfc3339(r.start_ms),
        end: rfc3339(r.end_ms),
        packets_in: r.packets_in,
        bytes_in: r.bytes_in,
        packets_out: r.packets_out,
        bytes_out: r.bytes_out,
    }
}

/// Flow identity for matching an end record with its start.
type FlowId = (u32, SocketAddr, SocketAddr, u8);

fn id(r: &FlowEvent) -> FlowId {
    (r.network_id, r.client, r.endpoint, r.proto)
}

/// Most flows whose start time is remembered for their end record.
const MAX_OPEN: usize = 1 << 20;

fn run(
    mut ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    ends: Receiver<(CtFwdKey, CtFwdValue, bool)>,
    out: &mut Outputs,
    stop: &AtomicBool,
) {
    let mut open: HashMap<FlowId, u64> = HashMap::new();
    let mut batch: Vec<FlowEvent> = Vec::new();
    let mut last_flush = Instant::now();
    let mut last_lost = Instant::now() - Duration::from_secs(1);
    let fd = ring.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        let now_mono = crate::dataplane::conntrack::monotonic_ns();
        let now_unix = unix_ms();
        let wall = |t| wall_ms(t, now_mono, now_unix);
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<FlowLogRecord>() {
                continue;
            }
            // SAFETY: the datapath writes whole FlowLogRecords; read unaligned.
            let r: FlowLogRecord =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowLogRecord>()) };
            batch.push(from_ring(&r, wall));
        }
        while let Ok((k, v, expired)) = ends.try_recv() {
            batch.push(from_removed(&k, &v, expired, wall, now_unix));
        }
        for r in &mut batch {
            match r.kind {
                FlowKind::Start => {
                    if open.len() < MAX_OPEN {
                        open.insert(id(r), r.start_ms);
                    }
                }
                FlowKind::End => {
                    if let Some(s) = open.remove(&id(r)) {
                        r.start_ms = s;
                    }
                }
            }
        }
        if last_lost.elapsed() >= Duration::from_millis(500) {
            last_lost = Instant::now();
            if let Ok(v) = lost.get(&0, 0) {
                let n = v.iter().fold(0u64, |a, x| a.wrapping_add(*x));
                STATS.lost_ring.store(n, Ordering::Relaxed);
            }
        }
        let full = batch.len() >= 256;
        if full || last_flush.elapsed() >= Duration::from_secs(1) {
            out.send(&batch, (now_unix / 1000) as u32);
            batch.clear();
            last_flush = Instant::now();
        }
    }
    // Stopping: what was read goes out.
    out.send(&batch, (unix_ms() / 1000) as u32);
}
