//! The event log: every control-plane decision as one JSON object per line
//! (docs/EVENTS.md documents every kind).
//!
//! An [`Events`] handle is shared by the controller, the gateway, the health
//! checker and the admin API. [`Events::emit`] stamps an [`Event`] with the
//! time and the schema version, appends it to the configured sink (a file or
//! stdout), keeps it in a bounded in-memory ring and broadcasts it to
//! `plink-ctl events --follow` clients. Writing the log never fails the
//! decision it records: a write error is reported through `tracing` and the
//! event stays in the ring.
//!
//! Rotation: the file is opened in append mode and reopened on SIGHUP, and
//! also whenever its path no longer names the file we hold (renamed or
//! deleted by logrotate), checked before each write (events are rare, one
//! `stat` each is nothing). `copytruncate` works as well (O_APPEND).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs::File,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize, ser::SerializeMap as _};
use tokio::sync::broadcast;

use crate::{
    approval::{Action, ConnectionState, Decision, Reason},
    config::{Config, EventLogTarget},
    state::EndpointIdentity,
};

/// The `v` field of every record. Bumped when a field is renamed, removed
/// or changes meaning; new kinds and new detail fields do not bump it.
pub const SCHEMA_VERSION: u32 = 1;
/// Events kept in memory for `plink-ctl events`.
pub const RING_CAPACITY: usize = 1024;
/// A `cap_reached` event is emitted at most once per endpoint per this long.
pub const CAP_EVENT_INTERVAL: Duration = Duration::from_secs(10);

/// Who or what made an endpoint decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum By {
    /// An admin command (`plink-ctl endpoints approve|reject|remove`).
    Admin,
    /// The service's `auto_approve` list.
    AutoApprove,
    /// The service's `visibility` list (not visible, or narrowed on reload).
    Visibility,
    /// The config itself: an endpoint added to it (pending) or deleted from it.
    Config,
}

impl By {
    fn of(reason: Reason) -> Self {
        match reason {
            Reason::NotVisible | Reason::VisibilityNarrowed => By::Visibility,
            Reason::AutoApproved => By::AutoApprove,
            Reason::AwaitingApproval => By::Config,
            Reason::ApprovedByAdmin | Reason::RejectedByAdmin | Reason::RemovedByAdmin => By::Admin,
        }
    }
}

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `plink-ctl reload` (the admin socket).
    Admin,
    /// SIGHUP.
    Signal,
}

/// How `run` found the dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataplaneStart {
    /// Nothing was pinned: programs loaded and maps created.
    Created,
    /// A running dataplane was adopted from its pins.
    Adopted,
}

/// The details of an endpoint decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointChange {
    pub endpoint: String,
    /// `None` for an endpoint deleted from the config before this controller
    /// knew its tenant (at start).
    pub tenant: Option<String>,
    pub service: String,
    pub network: String,
    pub address: IpAddr,
    /// The state before; `None` for a new endpoint.
    pub from: Option<ConnectionState>,
    pub state: ConnectionState,
    /// `None` when the endpoint left the config (it has no reason any more).
    pub reason: Option<Reason>,
    pub by: By,
}

/// A backend as events name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendRef {
    pub service: String,
    pub address: IpAddr,
}

/// One control-plane decision. Serialized as `"kind": "<variant>"` and
/// `"details": {...}` inside a [`Record`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "details", rename_all = "snake_case")]
pub enum Event {
    ControllerStarted {
        version: String,
        pid: u32,
        config: PathBuf,
        dataplane: DataplaneStart,
        dataplane_id: Option<String>,
    },
    /// The controller stopped (the dataplane keeps forwarding), on a signal
    /// or because it failed.
    ControllerStopped {
        /// Tells a controller that failed to start (e.g. another one holds
        /// the pins) from the one that runs.
        pid: u32,
        /// `SIGTERM` or `SIGINT`; `None` when it failed.
        signal: Option<String>,
        error: Option<String>,
    },
    /// An adopting start: what the pins held and what the first apply
    /// purged because the config no longer allows it.
    DataplaneAdopted {
        dataplane_id: String,
        pin_dir: PathBuf,
        /// Flows purged, by reason.
        purged_flows: BTreeMap<String, u64>,
        /// Backends the previous controller's health checks had taken down.
        down_backends: Vec<BackendRef>,
        /// NAT addresses adopted draining or retired.
        draining_nat: Vec<IpAddr>,
        retired_nat: Vec<IpAddr>,
    },
    EndpointCreated(EndpointChange),
    EndpointApproved(EndpointChange),
    EndpointRejected(EndpointChange),
    EndpointRemoved(EndpointChange),
    /// An admin action on an endpoint was refused (nothing changed).
    EndpointActionRefused {
        endpoint: String,
        action: Action,
        error: String,
    },
    ReloadApplied {
        config: PathBuf,
        via: Trigger,
        /// One line per kind of object that changed; empty if nothing did.
        changes: Vec<String>,
    },
    ReloadRefused {
        config: PathBuf,
        via: Trigger,
        error: String,
        /// Each config error as `file:line:column: path: message`.
        errors: Vec<String>,
    },
    /// A write into the dataplane failed part way.
    ApplyFailed {
        error: String,
        /// Whether the previous configuration was put back; false means
        /// the dataplane diverged until a later apply succeeds.
        restored: bool,
    },
    /// The dataplane holds the committed configuration again after a failure.
    DataplaneInSync {
        /// Failed applies since start.
        apply_failures: u64,
    },
    BackendDown {
        service: String,
        address: IpAddr,
        /// The probed address and port.
        target: SocketAddr,
        /// Why the last probe failed.
        error: Option<String>,
    },
    BackendUp {
        service: String,
        address: IpAddr,
        target: SocketAddr,
    },
    NatAddressAdded {
        service: String,
        address: IpAddr,
    },
    NatAddressDraining {
        service: String,
        address: IpAddr,
    },
    /// A drained NAT address holds no flow any more: late replies to it are
    /// dropped and ARP is no longer answered, for `grace_seconds`.
    NatAddressRetired {
        address: IpAddr,
        grace_seconds: u64,
    },
    /// A retired address's grace ended: the gateway forgot it.
    NatAddressReleased {
        address: IpAddr,
    },
    /// The datapath refused new flows of an endpoint at its caps since the
    /// last such event (at most one per endpoint per `interval_seconds`).
    CapReached {
        endpoint: String,
        service: String,
        /// Refused at `max_flows` since the last event.
        refused_max_flows: u64,
        /// Refused at `new_flows_per_second` since the last event.
        refused_rate: u64,
        max_flows: u32,
        new_flows_per_second: u32,
        interval_seconds: u64,
    },
}

impl Event {
    /// What the event is about: an endpoint, backend or NAT address, the
    /// config file, or `controller` / `dataplane`.
    pub fn subject(&self) -> String {
        match self {
            Event::ControllerStarted { .. } | Event::ControllerStopped { .. } => {
                "controller".into()
            }
            Event::DataplaneAdopted { .. }
            | Event::ApplyFailed { .. }
            | Event::DataplaneInSync { .. } => "dataplane".into(),
            Event::EndpointCreated(c)
            | Event::EndpointApproved(c)
            | Event::EndpointRejected(c)
            | Event::EndpointRemoved(c) => c.endpoint.clone(),
            Event::EndpointActionRefused { endpoint, .. } | Event::CapReached { endpoint, .. } => {
                endpoint.clone()
            }
            Event::ReloadApplied { config, .. } | Event::ReloadRefused { config, .. } => {
                config.display().to_string()
            }
            Event::BackendDown {
                service, address, ..
            }
            | Event::BackendUp {
                service, address, ..
            } => format!("{service}/{address}"),
            Event::NatAddressAdded { address, .. }
            | Event::NatAddressDraining { address, .. }
            | Event::NatAddressRetired { address, .. }
            | Event::NatAddressReleased { address } => address.to_string(),
        }
    }

    /// The decision's result, one word.
    pub fn outcome(&self) -> String {
        match self {
            Event::ControllerStarted { .. } => "started".into(),
            Event::ControllerStopped { error: Some(_), .. } => "failed".into(),
            Event::ControllerStopped { .. } => "stopped".into(),
            Event::DataplaneAdopted { .. } => "adopted".into(),
            Event::EndpointCreated(c)
            | Event::EndpointApproved(c)
            | Event::EndpointRejected(c)
            | Event::EndpointRemoved(c) => c.state.to_string(),
            Event::EndpointActionRefused { .. } | Event::ReloadRefused { .. } => "refused".into(),
            Event::ReloadApplied { .. } => "applied".into(),
            Event::ApplyFailed { restored: true, .. } => "restored".into(),
            Event::ApplyFailed { .. } => "diverged".into(),
            Event::DataplaneInSync { .. } => "in_sync".into(),
            Event::BackendDown { .. } => "down".into(),
            Event::BackendUp { .. } => "up".into(),
            Event::NatAddressAdded { .. } => "added".into(),
            Event::NatAddressDraining { .. } => "draining".into(),
            Event::NatAddressRetired { .. } => "retired".into(),
            Event::NatAddressReleased { .. } => "released".into(),
            Event::CapReached { .. } => "rate_limited".into(),
        }
    }
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Record {
    /// [`SCHEMA_VERSION`].
    pub v: u32,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub subject: String,
    pub outcome: String,
    #[serde(flatten)]
    pub event: Event,
}

impl Record {
    pub fn new(event: Event, at: SystemTime) -> Self {
        Self {
            v: SCHEMA_VERSION,
            time: rfc3339(at),
            subject: event.subject(),
            outcome: event.outcome(),
            event,
        }
    }

    /// The record's `kind`.
    pub fn kind(&self) -> String {
        match serde_json::to_value(&self.event) {
            Ok(v) => v["kind"].as_str().unwrap_or_default().to_owned(),
            Err(_) => String::new(),
        }
    }
}

// Written by hand for a fixed key order (v, time, kind, subject, outcome,
// details, and the details in their declared order) that a person reading
// the file can scan; readers must not rely on it.
impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Deserialize)]
        struct Tagged<'a> {
            kind: &'a str,
            #[serde(borrow)]
            details: &'a serde_json::value::RawValue,
        }
        let text = serde_json::to_string(&self.event).map_err(serde::ser::Error::custom)?;
        let tagged: Tagged<'_> = serde_json::from_str(&text).map_err(serde::ser::Error::custom)?;
        let mut m = s.serialize_map(Some(6))?;
        m.serialize_entry("v", &self.v)?;
        m.serialize_entry("time", &self.time)?;
        m.serialize_entry("kind", tagged.kind)?;
        m.serialize_entry("subject", &self.subject)?;
        m.serialize_entry("outcome", &self.outcome)?;
        m.serialize_entry("details", tagged.details)?;
        m.end()
    }
}

/// `at` as RFC 3339 in UTC with milliseconds, e.g. `2026-12-01T23:50:10.123Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, mo, da) = civil_from_days(days as i64);
    format!(
        "{y:04}-{mo:02}-{da:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day): H. Hinnant's algorithm
/// (proleptic Gregorian), to avoid a date crate for one format.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("opening the event log {path}: {cause}")]
    Open { path: PathBuf, cause: io::Error },
}

/// Where records go.
enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: File,
        /// (device, inode) of `file`: when the path names another file, it
        /// was rotated and is reopened.
        id: (u64, u64),
    },
}

impl Sink {
    fn open_file(path: &Path) -> Result<Self, EventLogError> {
        let err = |cause| EventLogError::Open {
            path: path.to_owned(),
            cause,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        // Not world-readable: the log names tenants and their decisions,
        // which the admin API shows to root only. An existing file keeps
        // its mode (logrotate's `create` sets it).
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .map_err(err)?;
        let m = file.metadata().map_err(err)?;
        Ok(Sink::File {
            path: path.to_owned(),
            file,
            id: (m.dev(), m.ino()),
        })
    }

    /// Reopens a file whose path now names another file (or none).
    fn follow_rotation(&mut self) -> Result<(), EventLogError> {
        if let Sink::File { path, id, .. } = self {
            let current = std::fs::metadata(&*path).ok().map(|m| (m.dev(), m.ino()));
            if current != Some(*id) {
                *self = Sink::open_file(&path.clone())?;
            }
        }
        Ok(())
    }

    fn write(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line)?;
                out.flush()
            }
            // One write per record: O_APPEND keeps lines whole even if
            // another writer shares the file.
            Sink::File { file, .. } => file.write_all(line),
        }
    }
}

/// What the writer thread is asked to do.
enum Msg {
    Line(Vec<u8>),
    Reopen(std::sync::mpsc::SyncSender<Result<(), EventLogError>>),
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Lines queued for the writer thread at most; more are counted as lost.
pub const WRITE_QUEUE: usize = 4096;
/// How long [`Events::reopen`] and [`Events::flush`] wait for the writer.
const WRITER_WAIT: Duration = Duration::from_secs(5);

struct Inner {
    /// The writer thread's queue; `None` when the log goes nowhere.
    writer: Option<std::sync::mpsc::SyncSender<Msg>>,
    ring: Mutex<VecDeque<Record>>,
    capacity: usize,
    tx: broadcast::Sender<Record>,
    /// Records the writer could not take (queue full: the sink is stalled).
    lost: std::sync::atomic::AtomicU64,
}

/// The event log handle (cheap to clone). The default one keeps the ring
/// and broadcasts but writes nowhere (no `gateway.event_log`).
///
/// The sink is written by a thread of its own, fed through a bounded
/// queue: decisions are recorded while the controller holds its locks, and
/// a stalled sink (a journald that stopped reading stdout, a hung disk)
/// must not stall them. A record that does not fit the queue is counted
/// ([`Events::lost`]) and reported on stderr; it stays in the ring.
#[derive(Clone)]
pub struct Events(Arc<Inner>);

impl Default for Events {
    fn default() -> Self {
        Self::build(RING_CAPACITY, None, WRITE_QUEUE)
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl Events {
    /// A log writing nowhere, keeping the last `capacity` records.
    pub fn with_capacity(capacity: usize) -> Self {
        Self::build(capacity, None, WRITE_QUEUE)
    }

    fn build(capacity: usize, sink: Option<Sink>, queue: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity);
        let writer = sink.map(|sink| {
            let (wtx, wrx) = std::sync::mpsc::sync_channel(queue);
            std::thread::Builder::new()
                .name("plink-events".into())
                .spawn(move || write_loop(sink, wrx))
                .map(|_| wtx)
        });
        let writer = match writer {
            Some(Ok(w)) => Some(w),
            Some(Err(e)) => {
                tracing::error!("event log: cannot start its writer thread: {e}");
                None
            }
            None => None,
        };
        Self(Arc::new(Inner {
            writer,
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            tx,
            lost: Default::default(),
        }))
    }

    /// The log `gateway.event_log` names (none: in memory only). The file
    /// is opened here, so that a path we cannot write stops `run` at once.
    pub fn open(target: Option<&EventLogTarget>) -> Result<Self, EventLogError> {
        let sink = match target {
            None => None,
            Some(EventLogTarget::Stdout) => Some(Sink::Stdout),
            Some(EventLogTarget::File(path)) => Some(Sink::open_file(path)?),
        };
        Ok(Self::build(RING_CAPACITY, sink, WRITE_QUEUE))
    }

    /// Closes and reopens the file (SIGHUP, after logrotate moved it), once
    /// the lines queued before are written.
    pub fn reopen(&self) -> Result<(), EventLogError> {
        let Some(w) = &self.0.writer else {
            return Ok(());
        };
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if w.send(Msg::Reopen(ack)).is_err() {
            return Ok(());
        }
        done.recv_timeout(WRITER_WAIT).unwrap_or(Ok(()))
    }

    /// Waits (bounded) until every record emitted so far is written: before
    /// the process exits.
    pub fn flush(&self) {
        let Some(w) = &self.0.writer else { return };
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if w.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(WRITER_WAIT);
        }
    }

    /// Records the writer could not take since start.
    pub fn lost(&self) -> u64 {
        self.0.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records `event` now.
    pub fn emit(&self, event: Event) {
        self.emit_at(event, SystemTime::now());
    }

    pub fn emit_at(&self, event: Event, at: SystemTime) {
        let record = Record::new(event, at);
        let line = match serde_json::to_vec(&record) {
            Ok(mut line) => {
                line.push(b'\n');
                Some(line)
            }
            Err(e) => {
                tracing::warn!("event log: encoding {:?}: {e}", record.event);
                None
            }
        };
        // Ring, broadcast and queue under one lock: the file has the ring's
        // order, and a `--follow` client that takes the ring then
        // subscribes sees every record once, none missing.
        let mut ring = lock(&self.0.ring);
        if let (Some(w), Some(line)) = (&self.0.writer, line) {
            use std::sync::mpsc::TrySendError;
            if let Err(TrySendError::Full(_)) = w.try_send(Msg::Line(line)) {
                let n = self
                    .0
                    .lost
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The first loss, then every 1000th: stderr must not drown.
                if n.is_multiple_of(1000) {
                    tracing::warn!(
                        lost = n + 1,
                        "event log: the sink is not keeping up; records are kept in memory only"
                    );
                }
            }
        }
        if ring.len() == self.0.capacity {
            ring.pop_front();
        }
        ring.push_back(record.clone());
        let _ = self.0.tx.send(record);
    }

    /// The records in memory, oldest first.
    pub fn recent(&self) -> Vec<Record> {
        lock(&self.0.ring).iter().cloned().collect()
    }

    /// The records in memory and a receiver of every later one.
    pub fn subscribe(&self) -> (Vec<Record>, broadcast::Receiver<Record>) {
        let ring = lock(&self.0.ring);
        (ring.iter().cloned().collect(), self.0.tx.subscribe())
    }
}

/// The writer thread: until every handle is gone.
fn write_loop(mut sink: Sink, rx: std::sync::mpsc::Receiver<Msg>) {
    for msg in rx {
        match msg {
            Msg::Line(line) => {
                let written = sink
                    .follow_rotation()
                    .map_err(|e| e.to_string())
                    .and_then(|()| sink.write(&line).map_err(|e| e.to_string()));
                if let Err(e) = written {
                    tracing::warn!("event log: {e}; the event is kept in memory only");
                }
            }
            Msg::Reopen(ack) => {
                let r = match &sink {
                    Sink::File { path, .. } => Sink::open_file(&path.clone()).map(|s| sink = s),
                    Sink::Stdout => Ok(()),
                };
                let _ = ack.send(r);
            }
            Msg::Flush(ack) => {
                let _ = ack.send(());
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking writer leaves at worst a partial line; keep logging.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The endpoint decisions between two states: endpoints that appeared,
/// changed state, or left the config. An endpoint created approved or
/// rejected gives `endpoint_created` and then `endpoint_approved` /
/// `endpoint_rejected`, so that every approval has an `endpoint_approved`.
/// `old_config` gives the tenant of endpoints that left (None at start: the
/// config they were in is gone).
pub fn endpoint_events(
    old_config: Option<&Config>,
    old: &BTreeMap<EndpointIdentity, Decision>,
    new_config: &Config,
    new: &BTreeMap<EndpointIdentity, Decision>,
) -> Vec<Event> {
    let tenant_in = |cfg: &Config, id: &EndpointIdentity| {
        cfg.endpoints
            .iter()
            .find(|e| EndpointIdentity::of(e) == *id)
            .map(|e| e.tenant.clone())
    };
    let change = |id: &EndpointIdentity, tenant, from, d: Decision| EndpointChange {
        endpoint: id.name.clone(),
        tenant,
        service: id.service.clone(),
        network: id.network.clone(),
        address: id.address,
        from,
        state: d.state,
        reason: Some(d.reason),
        by: By::of(d.reason),
    };
    let by_state = |c: EndpointChange| match c.state {
        ConnectionState::Approved => Some(Event::EndpointApproved(c)),
        ConnectionState::Rejected => Some(Event::EndpointRejected(c)),
        ConnectionState::Removed => Some(Event::EndpointRemoved(c)),
        ConnectionState::Pending => None,
    };
    let mut out = Vec::new();
    for (id, d) in new {
        let tenant = tenant_in(new_config, id);
        match old.get(id) {
            None => {
                let c = change(id, tenant, None, *d);
                out.push(Event::EndpointCreated(c.clone()));
                out.extend(by_state(c));
            }
            Some(prev) if prev.state != d.state => {
                out.extend(by_state(change(id, tenant, Some(prev.state), *d)));
            }
            Some(_) => {}
        }
    }
    for (id, prev) in old {
        if new.contains_key(id) {
            continue;
        }
        out.push(Event::EndpointRemoved(EndpointChange {
            endpoint: id.name.clone(),
            tenant: old_config.and_then(|c| tenant_in(c, id)),
            service: id.service.clone(),
            network: id.network.clone(),
            address: id.address,
            from: Some(prev.state),
            state: ConnectionState::Removed,
            reason: None,
            by: By::Config,
        }));
    }
    out
}

/// NAT addresses of a spec, by state, for [`nat_events`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatView {
    /// (service, address) taking new flows.
    pub active: BTreeSet<(String, IpAddr)>,
    /// (service, address) draining.
    pub draining: BTreeSet<(String, IpAddr)>,
    pub retired: BTreeSet<IpAddr>,
}

/// The NAT address transitions from `old` to `new`.
pub fn nat_events(old: &NatView, new: &NatView, grace: Duration) -> Vec<Event> {
    let known = |v: &NatView, s: &String, a: &IpAddr| {
        v.active.contains(&(s.clone(), *a)) || v.draining.contains(&(s.clone(), *a))
    };
    let mut out = Vec::new();
    for (service, address) in &new.active {
        if !known(old, service, address) {
            out.push(Event::NatAddressAdded {
                service: service.clone(),
                address: *address,
            });
        }
    }
    for (service, address) in &new.draining {
        if !old.draining.contains(&(service.clone(), *address)) {
            out.push(Event::NatAddressDraining {
                service: service.clone(),
                address: *address,
            });
        }
    }
    for a in new.retired.difference(&old.retired) {
        out.push(Event::NatAddressRetired {
            address: *a,
            grace_seconds: grace.as_secs(),
        });
    }
    let in_use = |v: &NatView, a: &IpAddr| {
        v.active.iter().chain(&v.draining).any(|(_, x)| x == a) || v.retired.contains(a)
    };
    for a in old.retired.iter() {
        if !in_use(new, a) {
            out.push(Event::NatAddressReleased { address: *a });
        }
    }
    out
}

/// One endpoint's refusal counters as the datapath counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    pub max_flows: u64,
    pub rate: u64,
}

#[derive(Debug, Clone, Copy)]
struct CapState {
    /// The counters at the last event (or when first seen).
    reported: Refusals,
    last_event: Option<Instant>,
}

/// Turns the datapath's per-endpoint refusal counters into `cap_reached`
/// events, at most one per endpoint per `interval`. Counts refused between
/// two events are summed into the next one, never lost.
#[derive(Debug)]
pub struct CapWatch {
    interval: Duration,
    seen: BTreeMap<u32, CapState>,
    /// Whether an endpoint seen for the first time takes its counters as
    /// they are as the baseline: on the first pass after an adopting start
    /// (refusals from before this controller are old news). Otherwise its
    /// counters started at zero with its id, and every refusal is reported,
    /// also those before the first reading.
    baseline_from_counters: bool,
}

/// What [`CapWatch::observe`] needs to know of an endpoint.
#[derive(Debug, Clone)]
pub struct CapSubject {
    pub id: u32,
    pub endpoint: String,
    pub service: String,
    pub max_flows: u32,
    pub new_flows_per_second: u32,
}

impl CapWatch {
    /// `adopted`: the dataplane was adopted from a previous controller.
    pub fn new(interval: Duration, adopted: bool) -> Self {
        Self {
            interval,
            seen: BTreeMap::new(),
            baseline_from_counters: adopted,
        }
    }

    /// Ends the first pass over the endpoints: endpoints seen from now on
    /// are new (their counters were zeroed with their id).
    pub fn first_pass_done(&mut self) {
        self.baseline_from_counters = false;
    }

    /// Records the counters read at `now`; an event when they moved since
    /// the last one and the interval has passed. The first reading of an
    /// endpoint is its baseline only on an adopting start's first pass
    /// (see `baseline_from_counters`); otherwise the baseline is zero.
    pub fn observe(&mut self, e: &CapSubject, now_counts: Refusals, now: Instant) -> Option<Event> {
        let baseline = if self.baseline_from_counters {
            now_counts
        } else {
            Refusals::default()
        };
        let st = self.seen.entry(e.id).or_insert(CapState {
            reported: baseline,
            last_event: None,
        });
        // Counters went backwards: the pins were recreated; start over.
        if now_counts.max_flows < st.reported.max_flows || now_counts.rate < st.reported.rate {
            st.reported = now_counts;
            return None;
        }
        if now_counts == st.reported {
            return None;
        }
        if st
            .last_event
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            return None;
        }
        let event = Event::CapReached {
            endpoint: e.endpoint.clone(),
            service: e.service.clone(),
            refused_max_flows: now_counts.max_flows - st.reported.max_flows,
            refused_rate: now_counts.rate - st.reported.rate,
            max_flows: e.max_flows,
            new_flows_per_second: e.new_flows_per_second,
            interval_seconds: self.interval.as_secs(),
        };
        st.reported = now_counts;
        st.last_event = Some(now);
        Some(event)
    }

    /// Forgets endpoints not in `ids` (their ids may be reused).
    pub fn retain(&mut self, ids: &BTreeSet<u32>) {
        self.seen.retain(|id, _| ids.contains(id));
    }
}

#[cfg(test)]
mod tests;
