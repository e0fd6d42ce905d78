//! The running gateway: turns the controller's [`Model`] into the
//! dataplane's [`DataplaneSpec`], applies it, purges flows the model no
//! longer allows, and reads counters for metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use std::{
    process::Command,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};

use crate::{
    approval::ConnectionState,
    config::{BackendState as CfgBackendState, Config, Protocol as CfgProtocol, Role},
    dataplane::CounterKind,
    dataplane::{BackendState, Dataplane, DataplaneSpec, GcReport, Sizes, garp},
    devstats, metrics,
    model::{BackendId, Model},
    plan::{FlowPolicy, HostInterface, Observed, PlanError, Stale},
};

/// The MAC address of an interface in the current network namespace.
///
/// Read with an ioctl rather than from /sys: under `nsenter --net`, /sys
/// still shows the namespace it was mounted in.
pub fn interface_mac(name: &str) -> anyhow::Result<[u8; 6]> {
    if name.len() >= libc::IF_NAMESIZE {
        bail!("interface name {name:?} is too long");
    }
    // SAFETY: a plain datagram socket used only for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is open and req is a valid ifreq with a NUL-terminated name.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("reading the MAC address of {name}: {err}");
    }
    // SAFETY: SIOCGIFHWADDR filled ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

pub use crate::plan::{AllHealthy, Health};

/// Reads the interfaces `model` names from the host: ifindex and MAC.
pub fn observe_interfaces(model: &Model) -> BTreeMap<String, HostInterface> {
    let mut out = BTreeMap::new();
    for iface in model.interfaces.values() {
        // A missing interface is left out: the plan says so, by name.
        let Ok(ifindex) = crate::dataplane::ifindex(&iface.name) else {
            continue;
        };
        // The driver picks how XDP's own answers leave (AnswerPath).
        let driver = crate::devstats::driver_name(&iface.name).unwrap_or_else(|e| {
            tracing::warn!(interface = %iface.name, "{e:#}");
            None
        });
        match interface_mac(&iface.name) {
            Ok(mac) => {
                out.insert(
                    iface.name.clone(),
                    HostInterface {
                        ifindex,
                        mac,
                        answers: crate::dataplane::AnswerPath::for_driver(driver.as_deref()),
                    },
                );
            }
            Err(e) => tracing::warn!(interface = %iface.name, "{e:#}"),
        }
    }
    out
}

/// Why an apply did not happen, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Found before anything was written: the dataplane is as it was.
    #[error(transparent)]
    Refused(#[from] PlanError),
    /// A write failed part way: the maps hold part of the change.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// What an apply did besides writing the spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Flows purged because the spec no longer allows them, by reason.
    pub purged: BTreeMap<Stale, u64>,
}

/// The dataplane with the spec it last applied.
pub struct Gateway {
    pub dp: Dataplane,
    pub spec: Option<DataplaneSpec>,
    /// False after a failed apply: the maps may hold part of a spec, so the
    /// next apply compares with the maps rather than with `spec`.
    maps_match_spec: bool,
    /// Drained backends that left the config, kept while flows use them.
    retired_backends: BTreeSet<(u32, IpAddr)>,
    /// Flows at the last GC sweep (gauges are served from it, not a scan per scrape).
    pub last_gc: GcReport,
    /// NAT ports held per NAT address at the last GC sweep.
    pub nat_in_use: BTreeMap<(IpAddr, u8), u64>,
    pub conntrack_capacity: u64,
    /// When each retired NAT address retired (an adopted one: when it was
    /// adopted, so its grace restarts rather than ends early).
    retired_since: BTreeMap<IpAddr, std::time::Instant>,
    /// How long a retired NAT address is kept: the longest flow timeout, so
    /// a late reply of any flow it carried is dropped, not passed.
    retired_grace: std::time::Duration,
    /// Where NAT address transitions are recorded.
    pub events: crate::events::Events,
    /// What the first apply (the adopting one, if adopting) purged.
    pub first_apply: Option<ApplyReport>,
    /// The NAT addresses as last applied, for events.
    nat_seen: crate::events::NatView,
    /// The flow-log exporter thread (`gateway.flow_logs`), held for its
    /// drop (which stops it).
    _flow_log_exporter: Option<crate::flowlog::Exporter>,
}

/// The NAT addresses of `spec` by state, named by service (for events).
fn nat_view(spec: Option<&DataplaneSpec>, model: &Model) -> crate::events::NatView {
    let mut view = crate::events::NatView::default();
    let Some(spec) = spec else { return view };
    let names: BTreeMap<u32, &String> =
        model.services.values().map(|s| (s.id.0, &s.name)).collect();
    for s in &spec.services {
        let name = names
            .get(&s.id)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("#{}", s.id));
        for n in s.nat.iter().filter(|n| !n.addr.is_unspecified()) {
            let set = if n.draining {
                &mut view.draining
            } else {
                &mut view.active
            };
            set.insert((name.clone(), n.addr));
        }
    }
    view.retired = spec.retired_nat.keys().copied().collect();
    view
}

/// Whether a retired NAT address that retired at `since` is still kept at
/// `now`. One with no time recorded (just found in the pins) is: its grace
/// starts when the apply that keeps it succeeds.
fn in_grace(
    since: Option<&std::time::Instant>,
    grace: std::time::Duration,
    now: std::time::Instant,
) -> bool {
    since.is_none_or(|s| now.saturating_duration_since(*s) < grace)
}

/// Keeps the next hop of every backend resolved with a managed neighbour
/// entry, so the datapath's FIB lookups find a neighbour (NO_NEIGH is a drop).
/// Returns the next hops.
pub fn manage_neighbours(provider: &str, addrs: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
    let mut hops = BTreeSet::new();
    for addr in addrs {
        let a = addr.to_string();
        let family = if addr.is_ipv4() { "-4" } else { "-6" };
        let route = Command::new("ip")
            .args(["-o", family, "route", "get", &a])
            .output();
        // A backend behind a router: the router is the neighbour to keep.
        let hop = match route {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let words: Vec<&str> = text.split_whitespace().collect();
                words
                    .windows(2)
                    .find(|w| w[0] == "via")
                    .and_then(|w| w[1].parse().ok())
                    .unwrap_or(*addr)
            }
            _ => *addr,
        };
        hops.insert(hop);
    }
    let ifindex = match crate::dataplane::ifindex(provider) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("managed neighbours: {e:#}");
            return hops;
        }
    };
    for hop in &hops {
        if let Err(e) = crate::dataplane::neigh::ensure_managed(ifindex, *hop) {
            tracing::warn!(next_hop = %hop, "cannot keep the next hop resolved: {e:#}");
        }
    }
    hops
}

/// Waits (bounded) until the kernel has resolved `hops` on `provider`, so the
/// first packets after start are not NO_NEIGH drops. Unresolved hops are
/// logged: their backends answer once they appear.
pub fn wait_for_neighbours(provider: &str, hops: &BTreeSet<IpAddr>, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // Both families: ARP and neighbour-discovery entries.
        let out = Command::new("ip")
            .args(["neigh", "show", "dev", provider])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let unresolved: Vec<&IpAddr> = hops
            .iter()
            .filter(|h| {
                !text.lines().any(|l| {
                    l.split_whitespace().next() == Some(h.to_string().as_str())
                        && l.contains("lladdr")
                })
            })
            .collect();
        if unresolved.is_empty() {
            return;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                ?unresolved,
                "next hops not resolved yet; their flows drop as fib_no_neigh until they are"
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Gateway {
    /// Loads the programs with maps sized from the config, pinned under
    /// `gateway.bpffs_root`, and attaches them to every configured interface.
    pub fn start(config: &Config) -> anyhow::Result<Self> {
        let lb_table: u32 = config
            .lb_table_slots()
            .try_into()
            .context("the Maglev tables of all services exceed 2^32 slots")?;
        let flow_logs = config.gateway.flow_logs.as_ref();
        let sizes = Sizes {
            conntrack: config.gateway.conntrack.max_flows,
            lb_table,
            // Without flow logs the ring takes one page.
            flow_log_ring: flow_logs.map_or(4096, |f| f.ring_bytes),
        };
        let mut dp =
            Dataplane::load_with(crate::EBPF_OBJECT, Some(&config.gateway.bpffs_root), sizes)?;
        dp.attach_all(config)?;
        dp.start_datapath_log()
            .context("starting the datapath's debug log")?;
        let flow_log_exporter = match flow_logs {
            Some(f) => Some(
                dp.start_flow_logs(crate::flowlog::ExportConfig {
                    ipfix: f.ipfix,
                    json: f.json.clone(),
                    observation_domain: f.observation_domain,
                })
                .context("starting the flow-log exporter")?,
            ),
            None => None,
        };
        Ok(Self {
            dp,
            spec: None,
            maps_match_spec: true,
            retired_backends: BTreeSet::new(),
            last_gc: GcReport::default(),
            nat_in_use: BTreeMap::new(),
            conntrack_capacity: u64::from(sizes.conntrack),
            retired_since: BTreeMap::new(),
            retired_grace: std::time::Duration::MAX,
            events: crate::events::Events::default(),
            first_apply: None,
            nat_seen: crate::events::NatView::default(),
            _flow_log_exporter: flow_log_exporter,
        })
    }

    /// Backends that the running dataplane (adopted from its pins) records
    /// as down while the config has them active: a previous controller's
    /// health checks took them out, and they stay out until they pass again.
    pub fn adopted_down_backends(&mut self, model: &Model) -> Vec<BackendId> {
        let Ok(map) = self.dp.map_mut(plink_common::map_names::BACKENDS) else {
            return Vec::new();
        };
        let Ok(map) = aya::maps::Array::<_, plink_common::BackendInfo>::try_from(map) else {
            return Vec::new();
        };
        model
            .services
            .values()
            .filter(|s| s.health_check.is_some())
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.state == CfgBackendState::Active)
            .filter(|b| {
                map.get(&b.id.0, 0)
                    .is_ok_and(|i| i.enabled != 0 && i.state == plink_common::backend_state::DOWN)
            })
            .map(|b| b.id)
            .collect()
    }

    /// Sends gratuitous ARP for every endpoint and NAT address.
    pub fn announce(&self) {
        let Some(spec) = &self.spec else { return };
        for (ifindex, mac, addrs) in spec.garp_plan() {
            if let Err(e) = garp::announce(ifindex, mac, &addrs) {
                tracing::warn!("gratuitous ARP: {e:#}");
            }
        }
    }

    /// Removes expired flows; remembers the flow count and the NAT ports in
    /// use for metrics (gauges come from this sweep, not a scan per scrape).
    pub fn gc(&mut self) -> anyhow::Result<()> {
        self.last_gc = self.dp.gc_conntrack()?;
        // One port per flow, counted by the sweep (no walk of its own).
        self.nat_in_use = self.last_gc.nat_in_use.clone();
        Ok(())
    }

    /// Whether the NAT addresses need another apply: a draining address
    /// holds no port any more (at the last GC sweep), or a retired one's
    /// grace ran out. The GC calls this after each sweep.
    pub fn nat_converge_due(&self) -> bool {
        let Some(spec) = &self.spec else { return false };
        let drained = spec
            .services
            .iter()
            .flat_map(|s| s.nat.iter())
            .filter(|n| n.draining && !n.addr.is_unspecified())
            .any(|n| !self.nat_in_use.keys().any(|(a, _)| *a == n.addr));
        let now = std::time::Instant::now();
        let expired = self
            .retired_since
            .values()
            .any(|since| !in_grace(Some(since), self.retired_grace, now));
        drained || expired
    }

    /// The reconcile loop for one model: observe (interfaces, NAT ports in
    /// use, the pinned backends on an adopting start), plan (pure; refuses
    /// before anything is written), apply the spec as a diff, then purge
    /// every live flow the spec no longer allows (on an adopting start too:
    /// flows are judged against the spec, not against a previous one).
    pub fn apply_model(
        &mut self,
        model: &Model,
        health: &dyn Health,
    ) -> Result<ApplyReport, ApplyError> {
        let started = std::time::Instant::now();
        // What NAT slots the dataplane holds: the spec last applied, or on an
        // adopting start the pinned maps (draining addresses survive restarts).
        let (nat_held, mut nat_retired) = match &self.spec {
            Some(spec) => {
                let mut o = Observed::default();
                o.hold(spec);
                (o.nat_held, o.nat_retired)
            }
            None => self.dp.pinned_nat().map_err(ApplyError::Failed)?,
        };
        let t = &model.gateway.timeouts;
        self.retired_grace = [t.tcp_established.0, t.tcp_transitory.0, t.udp.0, t.icmp.0]
            .into_iter()
            .max()
            .unwrap_or_default();
        let now = std::time::Instant::now();
        nat_retired.retain(|a, _| in_grace(self.retired_since.get(a), self.retired_grace, now));
        // Fresh counts, never the last GC round's: a flow opened since then
        // holds its address as much as any other (a reload that moved the
        // address away on a second-old count would cut it). One batched walk.
        let nat_ports_in_use = self.dp.nat_ports_in_use().map_err(ApplyError::Failed)?;
        let observed = Observed {
            interfaces: observe_interfaces(model),
            nat_held,
            nat_retired,
            nat_ports_in_use,
            capacities: self.dp.capacities().map_err(ApplyError::Failed)?,
        };
        let spec = crate::plan::plan(model, &observed, health)?;
        // Drained backends that leave the config keep their flows.
        let kept =
            |id: u32, addr: IpAddr| spec.backends.iter().any(|b| b.id == id && b.addr == addr);
        let leaving_drained: Vec<(u32, IpAddr)> = match &self.spec {
            Some(old) => old
                .backends
                .iter()
                .filter(|b| b.state == BackendState::Draining)
                .map(|b| (b.id, b.addr))
                .collect(),
            // Adopting: what the pinned BACKENDS map says was draining.
            None => self.dp.draining_backends().unwrap_or_default(),
        };
        for (id, addr) in leaving_drained {
            if !kept(id, addr) {
                self.retired_backends.insert((id, addr));
            }
        }
        let previous = if self.maps_match_spec {
            self.spec.as_ref()
        } else {
            None
        };
        if let Err(e) = self.dp.apply_after(&spec, previous) {
            self.maps_match_spec = false;
            return Err(ApplyError::Failed(e));
        }
        self.maps_match_spec = true;
        tracing::debug!(elapsed = ?started.elapsed(), "model applied to the maps");
        let now = std::time::Instant::now();
        self.retired_since
            .retain(|a, _| spec.retired_nat.contains_key(a));
        for a in spec.retired_nat.keys() {
            self.retired_since.entry(*a).or_insert_with(|| {
                tracing::info!(nat_address = %a, "NAT address drained: retired (late replies to it are dropped, ARP no longer answered)");
                now
            });
        }
        if let Some(provider) = model.interfaces.values().find(|i| i.role == Role::Provider) {
            let backends: BTreeSet<IpAddr> = spec
                .backends
                .iter()
                .filter(|b| b.state != BackendState::Down)
                .map(|b| b.addr)
                .collect();
            let hops = manage_neighbours(&provider.name, &backends);
            if self.spec.is_none() {
                wait_for_neighbours(&provider.name, &hops, std::time::Duration::from_secs(3));
            }
        }
        let first = self.spec.is_none();
        // Compared with the view kept from the last apply: it names the
        // services of the model it was applied with (some may be gone now).
        let nat_now = nat_view(Some(&spec), model);
        for e in crate::events::nat_events(&self.nat_seen, &nat_now, self.retired_grace) {
            self.events.emit(e);
        }
        self.nat_seen = nat_now;
        self.spec = Some(spec.clone());
        // Every live flow against the spec just applied.
        let policy = FlowPolicy::new(&spec, model, &self.retired_backends);
        let mut purged: BTreeMap<Stale, u64> = BTreeMap::new();
        let mut retired_in_use = BTreeSet::new();
        self.dp
            .remove_flows_sweeping(
                |k, v, _| match policy.judge(k, v) {
                    Some(why) => {
                        *purged.entry(why).or_default() += 1;
                        true
                    }
                    None => {
                        if let Some(r) = policy.via_retired(v) {
                            retired_in_use.insert(r);
                        }
                        false
                    }
                },
                false,
            )
            .map_err(ApplyError::Failed)?;
        self.retired_backends = retired_in_use;
        if !purged.is_empty() {
            let reasons: Vec<String> = purged
                .iter()
                .map(|(why, n)| format!("{}: {n}", why.name()))
                .collect();
            tracing::info!(
                adopting = first,
                "flows the config no longer allows purged ({})",
                reasons.join(", ")
            );
        }
        let report = ApplyReport { purged };
        if first {
            self.first_apply = Some(report.clone());
        }
        Ok(report)
    }
}

/// What `/metrics` needs of the gateway besides counters, copied under its
/// lock (a few small maps) so that counters are then read without it.
#[derive(Clone, Debug, Default)]
pub struct MetricsView {
    conntrack_entries: u64,
    conntrack_capacity: u64,
    nat_in_use: BTreeMap<(IpAddr, u8), u64>,
    /// NAT slots by service id, as applied.
    nat: BTreeMap<u32, Vec<crate::dataplane::NatSpec>>,
    /// Backends some lookup table names.
    up: BTreeSet<u32>,
}

/// Something `/metrics` can copy a [`MetricsView`] from (the gateway).
pub trait HasMetricsView {
    fn metrics_view(&self) -> MetricsView;
}

impl HasMetricsView for Gateway {
    fn metrics_view(&self) -> MetricsView {
        let services = self.spec.iter().flat_map(|s| s.services.iter());
        MetricsView {
            conntrack_entries: self.last_gc.remaining,
            conntrack_capacity: self.conntrack_capacity,
            nat_in_use: self.nat_in_use.clone(),
            nat: services.clone().map(|s| (s.id, s.nat.clone())).collect(),
            up: services.flat_map(|s| s.lookup.iter().copied()).collect(),
        }
    }
}

impl Gateway {
    /// Reads every counter for `/metrics`, holding the gateway throughout
    /// (use [`scrape`] to read them without).
    pub fn snapshot(&mut self, model: &Model) -> anyhow::Result<metrics::Snapshot> {
        let view = self.metrics_view();
        snapshot_from(&view, &mut self.dp, model)
    }
}

/// A `/metrics` snapshot that holds `gateway`'s lock only to copy its view:
/// the counters are read through `counters` (its own map descriptors), so a
/// scrape never holds up an apply or a GC sweep. While one of them holds the
/// gateway, the scrape does not wait either: it uses `last_view`, the view of
/// the previous scrape (the counters themselves are always read live).
pub fn scrape<G: HasMetricsView>(
    gateway: &Mutex<G>,
    counters: &mut dyn crate::dataplane::CounterSource,
    last_view: &mut Option<MetricsView>,
    model: &Model,
) -> anyhow::Result<metrics::Snapshot> {
    use std::sync::TryLockError;
    let view = match gateway.try_lock() {
        Ok(g) => g.metrics_view(),
        Err(TryLockError::Poisoned(p)) => p.into_inner().metrics_view(),
        Err(TryLockError::WouldBlock) => match last_view.take() {
            Some(v) => v,
            // The first scrape has nothing older to show: it waits once.
            None => lock_any(gateway).metrics_view(),
        },
    };
    let snap = snapshot_from(&view, counters, model);
    *last_view = Some(view);
    snap
}

fn lock_any<G>(m: &Mutex<G>) -> std::sync::MutexGuard<'_, G> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads every counter for `/metrics`. Per-CPU values are summed here, at
/// scrape time; the flow count comes from the last GC sweep.
fn snapshot_from(
    view: &MetricsView,
    dp: &mut dyn crate::dataplane::CounterSource,
    model: &Model,
) -> anyhow::Result<metrics::Snapshot> {
    let mut snap = metrics::Snapshot {
        conntrack_entries: view.conntrack_entries,
        conntrack_capacity: view.conntrack_capacity,
        ..Default::default()
    };
    for e in model.endpoints.values() {
        if e.state == ConnectionState::Removed {
            continue;
        }
        let c = dp.counters(CounterKind::Endpoint, e.id.0)?;
        for (reason, count) in dp.endpoint_drop_counts(e.id.0)? {
            // Only reasons that happened: endpoints x reasons is a lot of zeros.
            if count > 0 {
                snap.endpoint_drops.push(metrics::EndpointDropSample {
                    endpoint: e.name.clone(),
                    service: e.service.clone(),
                    reason: reason.name().to_owned(),
                    count,
                });
            }
        }
        snap.endpoints.push(metrics::EndpointSample {
            endpoint: e.name.clone(),
            service: e.service.clone(),
            state: e.state.to_string(),
            protocol: protocol_name(e.protocol).to_owned(),
            packets_in: c.packets_in,
            bytes_in: c.bytes_in,
            packets_out: c.packets_out,
            bytes_out: c.bytes_out,
            connections: c.flows_created,
            refused_max_flows: c.refused_max_flows,
            refused_rate: c.refused_rate,
            link_id: e.link_id,
        });
    }
    let in_use = &view.nat_in_use;
    let up = &view.up;
    for svc in model.services.values() {
        let c = dp.counters(CounterKind::Service, svc.id.0)?;
        snap.services.push(metrics::ServiceSample {
            service: svc.name.clone(),
            packets_in: c.packets_in,
            bytes_in: c.bytes_in,
            packets_out: c.packets_out,
            bytes_out: c.bytes_out,
            nat_port_allocation_failures: c.nat_alloc_failures,
            mss_clamped_in: c.mss_clamped_in,
            mss_clamped_out: c.mss_clamped_out,
            frag_needed_to_backend: c.frag_needed_to_backend,
            proxy_headers: c.proxy_headers,
        });
        for b in &svc.backends {
            let c = dp.counters(CounterKind::Backend, b.id.0)?;
            snap.backends.push(metrics::BackendSample {
                service: svc.name.clone(),
                backend: b.address.to_string(),
                bytes: c.bytes_in + c.bytes_out,
                connections: c.flows_created,
                up: up.contains(&b.id.0),
            });
        }
        let spec_nat = view.nat.get(&svc.id.0).cloned().unwrap_or_default();
        // Per protocol, as ports are allocated: the service's protocol
        // and ICMP echo identifiers each have the whole range.
        let protocols = [
            (
                match svc.protocol {
                    CfgProtocol::Tcp => plink_common::IPPROTO_TCP,
                    CfgProtocol::Udp => plink_common::IPPROTO_UDP,
                },
                protocol_name(svc.protocol),
            ),
            (plink_common::IPPROTO_ICMP, "icmp"),
        ];
        for n in spec_nat.iter().filter(|n| !n.addr.is_unspecified()) {
            for (number, name) in protocols {
                snap.nat.push(metrics::NatSample {
                    service: svc.name.clone(),
                    nat_address: n.addr.to_string(),
                    protocol: name.to_owned(),
                    ports_in_use: in_use.get(&(n.addr, number)).copied().unwrap_or(0),
                    ports_capacity: u64::from(*n.ports.end()) - u64::from(*n.ports.start()) + 1,
                });
            }
        }
    }
    for (reason, count) in dp.drop_counts()? {
        snap.drops.push((reason.name().to_owned(), count));
    }
    for (index, stats) in dp.interface_stats()? {
        let interface = crate::dataplane::ifname(index).unwrap_or_else(|| index.to_string());
        snap.interfaces.push(metrics::InterfaceSample {
            interface,
            verdicts: stats.verdicts,
            ipv4: stats.ipv4_packets,
            ipv6: stats.ipv6_packets,
            arp: stats.arp_packets,
        });
    }
    for iface in model.interfaces.values() {
        // A device we cannot read is left out, not a failed scrape.
        match devstats::read(&iface.name) {
            Ok(d) => snap.devices.push(metrics::DeviceSample {
                device: iface.name.clone(),
                xdp_tx_errors: d.tx_errors,
                xdp_redirect_errors: d.redirect_errors,
                tx_dropped: d.tx_dropped,
            }),
            Err(e) => tracing::debug!(device = %iface.name, "device counters: {e:#}"),
        }
    }
    {
        use std::sync::atomic::Ordering::Relaxed;
        let st = &crate::flowlog::STATS;
        snap.flow_log_lost = vec![
            ("ring".into(), st.lost_ring.load(Relaxed)),
            ("queue".into(), st.lost_queue.load(Relaxed)),
        ];
        snap.flow_log_exported = vec![
            ("ipfix".into(), st.exported_ipfix.load(Relaxed)),
            ("json".into(), st.exported_json.load(Relaxed)),
        ];
        snap.flow_log_errors = vec![
            ("ipfix".into(), st.errors_ipfix.load(Relaxed)),
            ("json".into(), st.errors_json.load(Relaxed)),
        ];
    }
    Ok(snap)
}

/// A flow with the names `model` gives it, as the admin API lists it.
pub fn flow_row(
    f: &crate::dataplane::FlowEntry,
    model: &Model,
    networks: &BTreeMap<u32, &String>,
) -> crate::admin::FlowRow {
    let at = |(a, p): (std::net::IpAddr, u16)| std::net::SocketAddr::new(a, p);
    crate::admin::FlowRow {
        endpoint: model
            .endpoints
            .get(&crate::model::EndpointId(f.endpoint_id))
            .map(|e| e.name.clone()),
        network: networks.get(&f.network_id).map(|n| (*n).clone()),
        network_id: f.network_id,
        protocol: match f.protocol {
            plink_common::IPPROTO_TCP => "tcp",
            plink_common::IPPROTO_UDP => "udp",
            plink_common::IPPROTO_ICMP => "icmp",
            plink_common::IPPROTO_ICMPV6 => "icmpv6",
            _ => "other",
        }
        .to_owned(),
        client: at(f.client),
        endpoint_address: at(f.endpoint),
        nat: at(f.nat),
        backend: at(f.backend),
        backend_id: f.backend_id,
        tcp_state: f.tcp_state,
        ingress_ifindex: f.ingress_ifindex,
        expires_in_ms: u64::try_from(f.expires_in.as_millis()).unwrap_or(u64::MAX),
        proxy_header_len: f.proxy_header_len,
    }
}

fn protocol_name(p: CfgProtocol) -> &'static str {
    match p {
        CfgProtocol::Tcp => "tcp",
        CfgProtocol::Udp => "udp",
    }
}

/// The controller's way into the gateway: applies a model (plan, apply,
/// purge) and announces the addresses.
pub struct GatewayApplier {
    pub gateway: Arc<Mutex<Gateway>>,
    pub health: Box<dyn Health + Send>,
    /// `plink-ctl drain` was run: every route is withdrawn.
    pub draining: bool,
    /// The metric the announced routes were last written with.
    pub announced_with: Option<u32>,
    /// Routes a previous run left were looked for (once, at the first apply).
    pub routes_checked: bool,
}

impl GatewayApplier {
    pub fn new(gateway: Arc<Mutex<Gateway>>, health: Box<dyn Health + Send>) -> Self {
        Self {
            gateway,
            health,
            draining: false,
            announced_with: None,
            routes_checked: false,
        }
    }

    /// Writes the routes FRR announces (docs/FLEET.md): the table's content
    /// follows the model, backend health and the drain.
    fn announce_routes(&mut self, model: &Model) -> anyhow::Result<()> {
        let routes = crate::announce::RouteTable::MAIN;
        let Some(metric) = model.gateway.announce_metric else {
            // Announcement turned off (or never on): withdraw what is left.
            if self.announced_with.take().is_some() || !self.routes_checked {
                self.routes_checked = true;
                routes.sync(&BTreeSet::new(), 0)?;
            }
            return Ok(());
        };
        let want = crate::announce::desired(model, &*self.health, self.draining);
        let changes = routes.sync(&want, metric)?;
        self.announced_with = Some(metric);
        self.routes_checked = true;
        for a in &changes.added {
            tracing::info!("announcing {a}/32 (blackhole route, metric {metric})");
        }
        for a in &changes.removed {
            tracing::info!("withdrawing {a}/32");
        }
        Ok(())
    }
}

impl crate::controller::Applier for GatewayApplier {
    fn apply(&mut self, model: &Model) -> Result<(), crate::controller::ApplyFailure> {
        use crate::controller::ApplyFailure;
        let mut g = lock(&self.gateway);
        match g.apply_model(model, &*self.health) {
            Ok(_) => {
                g.announce();
                drop(g);
                self.announce_routes(model)
                    .map_err(|e| ApplyFailure::Failed(format!("announcing routes: {e:#}")))
            }
            Err(ApplyError::Refused(e)) => Err(ApplyFailure::Refused(e.to_string())),
            Err(ApplyError::Failed(e)) => Err(ApplyFailure::Failed(format!("{e:#}"))),
        }
    }

    fn set_draining(&mut self, on: bool) {
        self.draining = on;
    }
}

/// The admin API's view of a running gateway.
pub struct GatewayQueries {
    pub gateway: Arc<Mutex<Gateway>>,
    pub models: tokio::sync::watch::Receiver<Arc<Model>>,
    /// Reads flows without the gateway's lock (pinned dataplanes).
    pub flows: Option<crate::dataplane::FlowReader>,
}

impl crate::controller::DataplaneQueries for GatewayQueries {
    fn conntrack(
        &self,
        row: &mut dyn FnMut(crate::admin::FlowRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let model = self.models.borrow().clone();
        let networks: BTreeMap<u32, &String> =
            model.networks.iter().map(|(n, id)| (id.0, n)).collect();
        match &self.flows {
            // Row by row from our own descriptors: no lock, no whole listing.
            Some(reader) => reader.each(|f| row(flow_row(&f, &model, &networks))),
            None => {
                // Only the read holds the gateway's lock, not the answer.
                let flows = lock(&self.gateway).dp.list_conntrack()?;
                flows
                    .iter()
                    .try_for_each(|f| row(flow_row(f, &model, &networks)))
            }
        }
    }
}

/// Locks the gateway; its state stays coherent if a holder panicked.
pub fn lock(g: &Mutex<Gateway>) -> std::sync::MutexGuard<'_, Gateway> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use plink_common::{Counters, DropReason, IfStats};

    use super::*;
    use crate::dataplane::{CounterKind, CounterSource};

    struct View;

    impl HasMetricsView for View {
        fn metrics_view(&self) -> MetricsView {
            MetricsView {
                conntrack_entries: 7,
                ..Default::default()
            }
        }
    }

    /// Counters that check, on every read, that the gateway is not locked
    /// (an apply or a GC sweep could take it right then).
    struct Unlocked(Arc<Mutex<View>>, u64);

    impl Unlocked {
        fn check(&mut self) -> anyhow::Result<()> {
            anyhow::ensure!(
                self.0.try_lock().is_ok(),
                "a counter was read under the gateway's lock"
            );
            self.1 += 1;
            Ok(())
        }
    }

    impl CounterSource for Unlocked {
        fn counters(&mut self, _: CounterKind, _: u32) -> anyhow::Result<Counters> {
            self.check()?;
            Ok(Counters::default())
        }
        fn endpoint_drop_counts(&mut self, _: u32) -> anyhow::Result<BTreeMap<DropReason, u64>> {
            self.check()?;
            Ok(BTreeMap::new())
        }
        fn drop_counts(&mut self) -> anyhow::Result<BTreeMap<DropReason, u64>> {
            self.check()?;
            Ok(BTreeMap::new())
        }
        fn interface_stats(&mut self) -> anyhow::Result<BTreeMap<u32, IfStats>> {
            self.check()?;
            Ok(BTreeMap::new())
        }
    }

    /// A retired NAT address is kept for the grace period after it retired,
    /// and one read back from the pins (no time yet) is kept.
    #[test]
    fn retired_addresses_are_kept_for_their_grace_only() {
        let grace = std::time::Duration::from_secs(124 * 60);
        let t0 = std::time::Instant::now();
        assert!(in_grace(None, grace, t0), "adopted from the pins");
        assert!(in_grace(Some(&t0), grace, t0));
        assert!(in_grace(
            Some(&t0),
            grace,
            t0 + grace - std::time::Duration::from_millis(1)
        ));
        assert!(!in_grace(Some(&t0), grace, t0 + grace));
    }

    /// Issue 14, item 8: `/metrics` holds the gateway only to copy its view;
    /// every counter is read with the lock free for applies and the GC.
    #[test]
    fn a_scrape_reads_counters_without_the_gateway_lock() {
        let text = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10}]
    nat: {addresses: [198.51.100.200]}
    visibility: ['*']
    auto_approve: ['*']
endpoints:
  - {name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}
";
        let config = Config::parse(std::path::Path::new("test.yaml"), text).expect("config");
        let state = crate::state::reconcile(&config, &Default::default()).expect("ids");
        let model = Model::build(&config, &state).expect("model");
        let gateway = Arc::new(Mutex::new(View));
        let mut counters = Unlocked(gateway.clone(), 0);
        let mut last = None;
        let snap = scrape(&gateway, &mut counters, &mut last, &model).expect("scrape");
        assert_eq!(snap.conntrack_entries, 7, "the view was copied");
        assert!(counters.1 >= 4, "counters were read: {}", counters.1);
        assert_eq!(snap.endpoints.len(), 1);

        // While an apply (here: this test) holds the gateway, a scrape does
        // not wait for it: it shows the last view with live counters.
        let held = gateway.lock().expect("lock");
        let (tx, rx) = std::sync::mpsc::channel();
        let g = gateway.clone();
        std::thread::spawn(move || {
            struct Live;
            impl CounterSource for Live {
                fn counters(&mut self, _: CounterKind, _: u32) -> anyhow::Result<Counters> {
                    Ok(Counters {
                        packets_in: 5,
                        ..Default::default()
                    })
                }
                fn endpoint_drop_counts(
                    &mut self,
                    _: u32,
                ) -> anyhow::Result<BTreeMap<DropReason, u64>> {
                    Ok(BTreeMap::new())
                }
                fn drop_counts(&mut self) -> anyhow::Result<BTreeMap<DropReason, u64>> {
                    Ok(BTreeMap::new())
                }
                fn interface_stats(&mut self) -> anyhow::Result<BTreeMap<u32, IfStats>> {
                    Ok(BTreeMap::new())
                }
            }
            let _ = tx.send(
                scrape(&g, &mut Live, &mut last, &model)
                    .map(|s| (s.conntrack_entries, s.endpoints[0].packets_in)),
            );
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the scrape waited for the gateway's lock")
            .expect("scrape");
        assert_eq!(got, (7, 5), "last view, live counters");
        drop(held);
    }
}
