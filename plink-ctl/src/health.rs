//! Active health checks, run by the controller from the provider side.
//!
//! Each backend of a service with a `health_check` gets one probe task: a TCP
//! connect, or an HTTP GET that must answer 2xx or 3xx, every `interval`,
//! each bounded by `timeout`. `fall` consecutive failures take an up backend
//! down, `rise` consecutive successes bring a down backend up. A change is
//! recorded in the shared [`HealthMap`] (which the gateway's table builder
//! and the metrics read) and signalled so the model is re-applied: a down
//! backend leaves its service's Maglev table, and because Maglev moves only
//! the entries of the backend that left and conntrack pins established flows,
//! flows to the other backends never move.
//!
//! A backend starts up (the optimistic start of HAProxy and Envoy): a
//! restarted controller keeps the running tables instead of emptying them
//! before its first probes. [`HealthMap::seed_down`] lets it adopt the down
//! state the running dataplane recorded.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    config::{BackendState, HealthCheck, HealthCheckKind},
    events::{Event, Events},
    gateway::Health,
    model::{BackendId, Model},
};

/// One backend's health as the checker last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendHealth {
    pub up: bool,
    /// Consecutive successes (while down) or failures (while up) so far.
    pub streak: u32,
    /// Probes run, and how many failed.
    pub probes: u64,
    pub failures: u64,
    /// Why the last probe failed, if it did.
    pub last_error: Option<String>,
}

impl Default for BackendHealth {
    fn default() -> Self {
        Self {
            up: true,
            streak: 0,
            probes: 0,
            failures: 0,
            last_error: None,
        }
    }
}

impl BackendHealth {
    /// Records one probe result; returns true when `up` changed.
    pub fn observe(&mut self, result: Result<(), String>, rise: u32, fall: u32) -> bool {
        self.probes += 1;
        let ok = result.is_ok();
        if let Err(e) = result {
            self.failures += 1;
            self.last_error = Some(e);
        } else {
            self.last_error = None;
        }
        // The streak counts results that argue for a change of state.
        if ok != self.up {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        let needed = if self.up { fall } else { rise }.max(1);
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            return true;
        }
        false
    }
}

/// Backend health shared by the checker, the table builder and the metrics.
/// Backends without a health check have no entry and count as up.
#[derive(Debug, Clone, Default)]
pub struct HealthMap(Arc<RwLock<BTreeMap<BackendId, BackendHealth>>>);

impl HealthMap {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<BackendId, BackendHealth>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<BackendId, BackendHealth>> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of every checked backend's health (for metrics and status).
    pub fn snapshot(&self) -> BTreeMap<BackendId, BackendHealth> {
        self.read().clone()
    }

    pub fn get(&self, id: BackendId) -> Option<BackendHealth> {
        self.read().get(&id).cloned()
    }

    /// Starts `id` as down (adopted from a running dataplane): it needs
    /// `rise` successes before it takes new flows again.
    pub fn seed_down(&self, id: BackendId) {
        self.write().insert(
            id,
            BackendHealth {
                up: false,
                ..Default::default()
            },
        );
    }

    /// Records a probe result; true when the backend changed state.
    pub fn observe(&self, id: BackendId, result: Result<(), String>, rise: u32, fall: u32) -> bool {
        self.write()
            .entry(id)
            .or_default()
            .observe(result, rise, fall)
    }

    fn forget(&self, id: BackendId) -> bool {
        self.write().remove(&id).is_some_and(|h| !h.up)
    }
}

impl Health for HealthMap {
    fn healthy(&self, backend: BackendId) -> bool {
        self.read().get(&backend).is_none_or(|h| h.up)
    }
}

/// What one probe task checks; a change restarts the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub target: SocketAddr,
    pub check: HealthCheck,
    /// The backend's port reads a PROXY protocol header first (its
    /// service's `proxy_protocol`, the check on a target port): the probe
    /// sends a LOCAL one, as a proxy's own health check does, so an
    /// `accept-proxy` listener takes it instead of logging a bad client.
    pub proxy_local: bool,
}

/// PROXY protocol v2 header with the LOCAL command and no addresses.
pub fn proxy_local_header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..12].copy_from_slice(&plink_common::proxy::SIGNATURE);
    h[12] = 0x20;
    h
}

impl Probe {
    /// Runs one probe, bounded by the check's timeout.
    pub async fn run(&self) -> Result<(), String> {
        let timeout = self.check.timeout.0;
        match tokio::time::timeout(timeout, self.attempt()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    async fn attempt(&self) -> Result<(), String> {
        let mut stream = TcpStream::connect(self.target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if self.proxy_local {
            stream
                .write_all(&proxy_local_header())
                .await
                .map_err(|e| format!("sending the PROXY header: {e}"))?;
        }
        if self.check.kind == HealthCheckKind::Tcp {
            return Ok(());
        }
        let path = self.check.path.as_deref().unwrap_or("/");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: plink-health-check\r\nConnection: close\r\n\r\n",
            self.target
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        // The status line is all we need; read until its end (bounded).
        let mut head = Vec::with_capacity(64);
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading the response: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default();
        match http_status(line) {
            Some(code) if (200..400).contains(&code) => Ok(()),
            Some(code) => Err(format!("HTTP status {code}")),
            None => Err(format!("not an HTTP status line: {line:?}")),
        }
    }
}

/// The status code of an HTTP/1.x status line.
fn http_status(line: &str) -> Option<u16> {
    let mut words = line.split_whitespace();
    if !words.next()?.starts_with("HTTP/") {
        return None;
    }
    words.next()?.parse().ok()
}

/// The probes the model asks for: every active or draining backend of a
/// service with a health check (down backends are not probed).
pub fn probes(model: &Model) -> BTreeMap<BackendId, Probe> {
    let mut out = BTreeMap::new();
    for svc in model.services.values() {
        let Some(check) = &svc.health_check else {
            continue;
        };
        let port = check
            .port
            .or_else(|| svc.ports.first().map(|p| p.target_port))
            .unwrap_or(0);
        let proxy_local =
            svc.proxy_protocol.is_some() && svc.ports.iter().any(|p| p.target_port == port);
        for b in &svc.backends {
            if b.state == BackendState::Down {
                continue;
            }
            out.insert(
                b.id,
                Probe {
                    target: SocketAddr::new(b.address, port),
                    check: check.clone(),
                    proxy_local,
                },
            );
        }
    }
    out
}

/// Runs one probe task per checked backend and signals state changes on
/// `changes` (the receiver re-applies the model).
pub struct HealthChecker {
    map: HealthMap,
    changes: mpsc::UnboundedSender<()>,
    tasks: BTreeMap<BackendId, (Probe, JoinHandle<()>)>,
    events: Events,
}

impl HealthChecker {
    pub fn new(map: HealthMap, changes: mpsc::UnboundedSender<()>) -> Self {
        Self {
            map,
            changes,
            tasks: BTreeMap::new(),
            events: Events::default(),
        }
    }

    /// Records backend transitions (down, up) into `events`.
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Starts, restarts and stops probe tasks to match `model`. Must be
    /// called inside a tokio runtime. A backend that stops being checked
    /// forgets its health (it counts as up again).
    pub fn reconcile(&mut self, model: &Model) {
        let wanted = probes(model);
        let stale: Vec<BackendId> = self
            .tasks
            .iter()
            .filter(|(id, (probe, _))| wanted.get(id) != Some(probe))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some((_, task)) = self.tasks.remove(&id) {
                task.abort();
            }
            if !wanted.contains_key(&id) {
                self.map.forget(id);
            }
        }
        let services: BTreeMap<BackendId, &str> = model
            .services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| (b.id, s.name.as_str())))
            .collect();
        for (id, probe) in wanted {
            if self.tasks.contains_key(&id) {
                continue;
            }
            let service = services.get(&id).copied().unwrap_or_default().to_owned();
            tracing::info!(backend_id = %id, target = %probe.target, kind = ?probe.check.kind, "health checks started");
            let task = tokio::spawn(probe_loop(
                id,
                probe.clone(),
                self.map.clone(),
                self.changes.clone(),
                (service, self.events.clone()),
            ));
            self.tasks.insert(id, (probe, task));
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

async fn probe_loop(
    id: BackendId,
    probe: Probe,
    map: HealthMap,
    changes: mpsc::UnboundedSender<()>,
    (service, events): (String, Events),
) {
    let interval = probe.check.interval.0.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let result = probe.run().await;
        let error = result.as_ref().err().cloned();
        if map.observe(id, result, probe.check.rise, probe.check.fall) {
            let up = map.get(id).is_some_and(|h| h.up);
            let (address, target) = (probe.target.ip(), probe.target);
            if up {
                tracing::info!(backend_id = %id, target = %probe.target, "backend is up: it rejoins the lookup table");
                events.emit(Event::BackendUp {
                    service: service.clone(),
                    address,
                    target,
                });
            } else {
                tracing::warn!(backend_id = %id, target = %probe.target, error = ?error, elapsed = ?started.elapsed(), "backend is down: it leaves the lookup table");
                events.emit(Event::BackendDown {
                    service: service.clone(),
                    address,
                    target,
                    error: error.clone(),
                });
            }
            if changes.send(()).is_err() {
                return;
            }
        } else if let Some(e) = error {
            tracing::debug!(backend_id = %id, target = %probe.target, "health probe failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> Result<(), String> {
        Err("refused".into())
    }

    #[test]
    fn fall_and_rise_need_consecutive_results() {
        let mut h = BackendHealth::default();
        assert!(h.up);
        // fall = 3: two failures, a success resets the streak.
        assert!(!h.observe(fail(), 2, 3));
        assert!(!h.observe(fail(), 2, 3));
        assert!(!h.observe(Ok(()), 2, 3));
        assert!(!h.observe(fail(), 2, 3));
        assert!(!h.observe(fail(), 2, 3));
        assert!(h.up);
        assert!(h.observe(fail(), 2, 3), "third consecutive failure");
        assert!(!h.up);
        assert_eq!(h.last_error.as_deref(), Some("refused"));
        // rise = 2: success, failure, success, success.
        assert!(!h.observe(Ok(()), 2, 3));
        assert!(!h.observe(fail(), 2, 3));
        assert!(!h.observe(Ok(()), 2, 3));
        assert!(h.observe(Ok(()), 2, 3));
        assert!(h.up);
        assert_eq!((h.probes, h.failures), (10, 6));
    }

    #[test]
    fn thresholds_of_one_flip_at_once() {
        let mut h = BackendHealth::default();
        assert!(h.observe(fail(), 1, 1));
        assert!(!h.up);
        assert!(h.observe(Ok(()), 1, 1));
        assert!(h.up);
    }

    #[test]
    fn unknown_backends_are_healthy_and_seeded_ones_are_not() {
        let map = HealthMap::default();
        assert!(map.healthy(BackendId(3)));
        map.seed_down(BackendId(3));
        assert!(!map.healthy(BackendId(3)));
        assert!(!map.observe(BackendId(3), Ok(()), 2, 2));
        assert!(map.observe(BackendId(3), Ok(()), 2, 2));
        assert!(map.healthy(BackendId(3)));
        assert!(!map.forget(BackendId(3)));
        assert!(map.snapshot().is_empty());
    }

    #[test]
    fn status_lines() {
        assert_eq!(http_status("HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(http_status("HTTP/1.0 302"), Some(302));
        assert_eq!(http_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(http_status(""), None);
        assert_eq!(http_status("HTTP/1.1 abc"), None);
    }

    fn check(kind: HealthCheckKind) -> HealthCheck {
        HealthCheck {
            kind,
            path: Some("/healthz".into()),
            port: None,
            interval: crate::config::HumanDuration::from_secs(1),
            timeout: crate::config::HumanDuration(Duration::from_millis(500)),
            rise: 1,
            fall: 1,
        }
    }

    /// A one-shot HTTP server answering `status` on loopback.
    async fn http_server(status: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        serve_http(listener, status)
    }

    fn serve_http(listener: tokio::net::TcpListener, status: &'static str) -> SocketAddr {
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        addr
    }

    /// A backend behind `accept-proxy`: it answers only a connection that
    /// starts with a PROXY v2 header (parsed by the `ppp` crate), here LOCAL.
    #[tokio::test]
    async fn probes_of_a_proxy_protocol_backend_start_with_a_local_header() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = [0u8; 16];
                if s.read_exact(&mut head).await.is_err() {
                    continue;
                }
                let local = matches!(
                    ppp::v2::Header::try_from(&head[..]),
                    Ok(h) if h.command == ppp::v2::Command::Local
                );
                let status = if local { "200 OK" } else { "400 Bad" };
                let mut rest = [0u8; 512];
                let _ = s.read(&mut rest).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let probe = |proxy_local| Probe {
            target: addr,
            check: check(HealthCheckKind::Http),
            proxy_local,
        };
        assert_eq!(probe(true).run().await, Ok(()));
        assert_eq!(probe(false).run().await, Err("HTTP status 400".to_owned()));
    }

    #[tokio::test]
    async fn probes_over_loopback() {
        let ok = http_server("200 OK").await;
        let moved = http_server("301 Moved").await;
        let broken = http_server("503 Unavailable").await;
        let http = |target| Probe {
            target,
            check: check(HealthCheckKind::Http),
            proxy_local: false,
        };
        assert_eq!(http(ok).run().await, Ok(()));
        assert_eq!(http(moved).run().await, Ok(()));
        assert_eq!(http(broken).run().await, Err("HTTP status 503".to_owned()));
        let tcp = Probe {
            target: ok,
            check: check(HealthCheckKind::Tcp),
            proxy_local: false,
        };
        assert_eq!(tcp.run().await, Ok(()));
        // A closed port: connection refused.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = Probe {
            target: closed,
            check: check(HealthCheckKind::Tcp),
            proxy_local: false,
        }
        .run()
        .await
        .unwrap_err();
        assert!(err.starts_with("connect"), "{err}");
    }

    /// IPv6 backends are probed over IPv6: the target of a backend of an
    /// IPv6 service is its address, and a probe reaches a server on ::1.
    #[tokio::test]
    async fn probes_an_ipv6_backend() {
        let text = "
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
  - name: web6
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: '2001:db8:100::10'}]
    nat: {addresses: ['2001:db8:100::200']}
    health_check: {type: http, path: /healthz, interval: 2s, timeout: 1s}
";
        let cfg = crate::config::Config::parse(std::path::Path::new("t.yaml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
        let state =
            crate::state::reconcile(&cfg, &crate::state::PersistedState::default()).unwrap();
        let model = Model::build(&cfg, &state).unwrap();
        let targets: Vec<String> = probes(&model)
            .values()
            .map(|p| p.target.to_string())
            .collect();
        assert_eq!(targets, ["[2001:db8:100::10]:8080"]);

        let listener = match tokio::net::TcpListener::bind("[::1]:0").await {
            Ok(l) => l,
            // A host without IPv6 loopback (disable_ipv6) cannot run the
            // second half; the target check above still ran.
            Err(e) => {
                eprintln!("skipping the ::1 probe: {e}");
                return;
            }
        };
        let ok = serve_http(listener, "200 OK");
        assert!(ok.is_ipv6());
        let probe = |kind| Probe {
            target: ok,
            check: check(kind),
            proxy_local: false,
        };
        assert_eq!(probe(HealthCheckKind::Http).run().await, Ok(()));
        assert_eq!(probe(HealthCheckKind::Tcp).run().await, Ok(()));
        let closed = std::net::TcpListener::bind("[::1]:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = Probe {
            target: closed,
            check: check(HealthCheckKind::Tcp),
            proxy_local: false,
        }
        .run()
        .await
        .unwrap_err();
        assert!(err.starts_with("connect"), "{err}");
    }
}
