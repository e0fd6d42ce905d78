//! Conntrack maintenance from userspace: garbage collection with the
//! datapath's own expiry rule, purging an endpoint's flows, and listing flows
//! with their NAT mapping.
//!
//! A flow is three entries: forward (the state), reverse and NAT port. The GC
//! deletes the forward entry first, so the datapath stops using the flow
//! before its port is freed, then the reverse entry and the port. The
//! forward entry is read as it is deleted and judged again: a flow the
//! datapath refreshed in between is put back ([`sweep_forward`]).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

pub use super::spec::ip_of;

use anyhow::Context as _;
use aya::maps::{Array, HashMap};
use plink_common::{
    CtFwdKey, CtFwdValue, CtOwner, CtRevKey, GlobalConfig, NatPortKey, flow_expired,
    flow_timeout_ns, map_names,
};

use super::Dataplane;

/// Reverse or NAT-port entries whose owner is gone are removed only when
/// older than this, so the GC never races a flow being inserted.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// How often a GC round also looks for orphaned reverse and NAT-port entries.
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(30);

/// What removing a round's candidates did.
struct Removed {
    flows: u64,
    /// A removed flow's key was re-used by the datapath meanwhile.
    superseded: bool,
    /// Candidates judged again and kept.
    kept: Vec<(CtFwdKey, CtFwdValue)>,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock
/// `bpf_ktime_get_coarse_ns` reads (the datapath's expiry clock).
pub fn coarse_monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one GC or purge pass removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Flows removed (forward entries).
    pub flows: u64,
    /// Reverse and NAT-port entries removed without their flow (leftovers).
    pub orphans: u64,
    /// Flows left (for a GC round: at the end of the last complete sweep).
    pub remaining: u64,
    /// NAT ports held per (NAT address, protocol), one per flow, at the end
    /// of the last complete sweep (GC rounds only).
    pub nat_in_use: BTreeMap<(IpAddr, u8), u64>,
}

/// Batches of CT_FWD (4,096 flows each) one GC round reads: a table larger
/// than ~131k flows is swept over several rounds (a million in about eight
/// seconds) instead of whole every second, which kept half a core busy in
/// the kernel's walk and its memory traffic slowed the datapath. Expiry does
/// not wait for the sweep: the datapath treats an expired flow as expired
/// whether or not it was removed, and reclaims expired flows' NAT ports and
/// cap slots itself.
const GC_BATCHES_PER_ROUND: usize = 32;

/// Where the GC's sweep of the flow table is, and what it counted so far.
#[derive(Debug, Default)]
pub(crate) struct GcSweep {
    cursor: Option<u64>,
    live: u64,
    nat_in_use: BTreeMap<(IpAddr, u8), u64>,
    /// The last complete sweep's counts.
    remaining: u64,
    nat_in_use_done: BTreeMap<(IpAddr, u8), u64>,
}

impl GcSweep {
    fn count_live(&mut self, v: &CtFwdValue) {
        self.live += 1;
        *self
            .nat_in_use
            .entry((ip_of(&v.nat_addr_be), v.proto))
            .or_default() += 1;
    }

    fn finish(&mut self) {
        self.remaining = std::mem::take(&mut self.live);
        self.nat_in_use_done = std::mem::take(&mut self.nat_in_use);
    }
}

/// One flow with its NAT mapping, for `plink-ctl conntrack`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub network_id: u32,
    pub protocol: u8,
    pub client: (IpAddr, u16),
    pub endpoint: (IpAddr, u16),
    pub nat: (IpAddr, u16),
    pub backend: (IpAddr, u16),
    pub endpoint_id: u32,
    pub service_id: u32,
    pub backend_id: u32,
    pub tcp_state: u8,
    pub ingress_ifindex: u32,
    /// Time left before the flow expires (zero if it already has).
    pub expires_in: Duration,
    /// Bytes of the PROXY protocol header the flow puts in front of its
    /// client's first bytes; 0: none.
    pub proxy_header_len: u8,
}

impl Dataplane {
    fn global(&mut self) -> anyhow::Result<GlobalConfig> {
        let g: Array<_, GlobalConfig> = Array::try_from(self.map_mut(map_names::GLOBAL)?)?;
        Ok(g.get(&0, 0)?)
    }

    /// Calls `each` with every entry of the hash map `name`: in batches
    /// where the kernel has them, else key by key.
    fn walk<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        mut each: impl FnMut(&K, &V),
    ) -> anyhow::Result<()> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let map = self.map_mut(name)?;
        let table: HashMap<_, K, V> = HashMap::try_from(&mut *map)?;
        let fd = aya::maps::IterableMap::map(&table).fd().as_fd().as_raw_fd();
        if super::batch::walk(fd, &mut each).with_context(|| format!("walking {name}"))? {
            return Ok(());
        }
        // Entries deleted while we iterate are skipped, not errors.
        for (k, v) in table.iter().filter_map(Result::ok) {
            each(&k, &v);
        }
        Ok(())
    }

    fn flows(&mut self) -> anyhow::Result<Vec<(CtFwdKey, CtFwdValue)>> {
        let mut out = Vec::new();
        self.walk(map_names::CT_FWD, |k, v| out.push((*k, *v)))?;
        Ok(out)
    }

    /// Removes expired flows (the rule the datapath applies, on its clock),
    /// frees their NAT ports, and sweeps leftover reverse / port entries.
    pub fn gc_conntrack(&mut self) -> anyhow::Result<GcReport> {
        // The next-hop generation is not moved here: the link watcher moves
        // it on neighbour, route and link events. A move per round would make
        // every flow look its hop up (and write its entry) once a second.
        let g = self.global()?;
        let mut doomed = |_: &CtFwdKey, v: &CtFwdValue, now| flow_expired(v, now, &g.timeouts);
        let now = monotonic_ns();
        let mut sweep = std::mem::take(&mut self.gc_sweep);
        let mut candidates: Vec<CtFwdKey> = Vec::new();
        let mut judge = |sweep: &mut GcSweep, k: &CtFwdKey, v: &CtFwdValue| {
            if doomed(k, v, now) {
                candidates.push(*k);
            } else {
                sweep.count_live(v);
            }
        };
        let walked = {
            use std::os::fd::{AsFd as _, AsRawFd as _};
            let table: HashMap<_, CtFwdKey, CtFwdValue> =
                HashMap::try_from(self.map_mut(map_names::CT_FWD)?)?;
            let fd = aya::maps::IterableMap::map(&table).fd().as_fd().as_raw_fd();
            let mut cursor = sweep.cursor;
            let walked = super::batch::walk_some(
                fd,
                &mut cursor,
                GC_BATCHES_PER_ROUND,
                |k: &CtFwdKey, v: &CtFwdValue| judge(&mut sweep, k, v),
            )
            .context("walking CT_FWD")?;
            sweep.cursor = cursor;
            if walked == super::batch::Walked::Unsupported {
                // Key by key, the whole table (kernels before 5.6).
                for (k, v) in table.iter().filter_map(Result::ok) {
                    judge(&mut sweep, &k, &v);
                }
            }
            walked
        };
        let removed = self.remove_candidates(&candidates, &mut doomed);
        let removed = match removed {
            Ok(r) => r,
            Err(e) => {
                // The sweep starts over next round rather than count twice.
                self.gc_sweep = GcSweep::default();
                return Err(e);
            }
        };
        for (_, v) in &removed.kept {
            sweep.count_live(v);
        }
        if walked != super::batch::Walked::More {
            sweep.finish();
        }
        // Orphans are rare (a lost insert race, a crash between two inserts)
        // and hold nothing the datapath cannot reclaim itself: they are
        // looked for every ORPHAN_SWEEP_EVERY, not every round.
        let due = self
            .orphans_swept_at
            .is_none_or(|t| t.elapsed() >= ORPHAN_SWEEP_EVERY);
        let mut report = GcReport {
            flows: removed.flows,
            orphans: 0,
            remaining: sweep.remaining,
            nat_in_use: sweep.nat_in_use_done.clone(),
        };
        self.gc_sweep = sweep;
        if due || removed.superseded {
            report.orphans = self.sweep_orphans()?;
            self.orphans_swept_at = Some(std::time::Instant::now());
        }
        Ok(report)
    }

    /// Makes every established flow look its next hop up again (a
    /// neighbour or route of the provider side changed): the flows' cached
    /// hops carry the previous generation.
    pub fn bump_hop_gen(&mut self) -> anyhow::Result<()> {
        let g = self.global()?;
        let mut global: Array<_, GlobalConfig> = Array::try_from(self.map_mut(map_names::GLOBAL)?)?;
        global.set(
            0,
            GlobalConfig {
                hop_gen: super::spec::next_hop_gen(g.hop_gen),
                ..g
            },
            0,
        )?;
        Ok(())
    }

    /// The forward entry of flow `k`, if any.
    pub fn flow(&mut self, k: &CtFwdKey) -> anyhow::Result<Option<CtFwdValue>> {
        let fwd: HashMap<_, CtFwdKey, CtFwdValue> =
            HashMap::try_from(self.map_mut(map_names::CT_FWD)?)?;
        Ok(fwd.get(k, 0).ok())
    }

    /// Removes every flow of `endpoint_id` (the endpoint was rejected or
    /// removed: set its state with `apply` first so no new flow appears).
    pub fn purge_endpoint(&mut self, endpoint_id: u32) -> anyhow::Result<GcReport> {
        self.remove_flows(|_, v, _| v.endpoint_id == endpoint_id)
    }

    /// Removes every flow to `backend_id` (a backend removed without draining).
    pub fn purge_backend(&mut self, backend_id: u32) -> anyhow::Result<GcReport> {
        self.remove_flows(|_, v, _| v.backend_id == backend_id)
    }

    /// Removes every flow `doomed` picks (with its reverse entry and NAT
    /// port), re-reading each just before deciding, then sweeps orphans.
    pub(crate) fn remove_flows(
        &mut self,
        doomed: impl FnMut(&CtFwdKey, &CtFwdValue, u64) -> bool,
    ) -> anyhow::Result<GcReport> {
        self.remove_flows_sweeping(doomed, true)
    }

    /// Like `remove_flows`; sweeps orphans only when `always_sweep` or when
    /// a removed flow's entries may have been left to the sweep (its key was
    /// re-used by the datapath meanwhile).
    pub(crate) fn remove_flows_sweeping(
        &mut self,
        mut doomed: impl FnMut(&CtFwdKey, &CtFwdValue, u64) -> bool,
        always_sweep: bool,
    ) -> anyhow::Result<GcReport> {
        // One walk judges every flow by the value it read; only the doomed
        // are read again (as they are deleted), so a live flow costs no
        // call of its own.
        let now = monotonic_ns();
        let mut listed_live = 0u64;
        let mut candidates: Vec<CtFwdKey> = Vec::new();
        self.walk(map_names::CT_FWD, |k: &CtFwdKey, v: &CtFwdValue| {
            if doomed(k, v, now) {
                candidates.push(*k);
            } else {
                listed_live += 1;
            }
        })?;
        let removed = self.remove_candidates(&candidates, &mut doomed)?;
        let mut report = GcReport {
            flows: removed.flows,
            remaining: listed_live + removed.kept.len() as u64,
            ..GcReport::default()
        };
        if always_sweep || removed.superseded {
            report.orphans = self.sweep_orphans()?;
            self.orphans_swept_at = Some(std::time::Instant::now());
        }
        Ok(report)
    }

    /// Removes the flows among `candidates` that `doomed` still picks when
    /// read again, with their reverse entries and NAT ports, and gives their
    /// cap slots back.
    fn remove_candidates(
        &mut self,
        candidates: &[CtFwdKey],
        doomed: &mut impl FnMut(&CtFwdKey, &CtFwdValue, u64) -> bool,
    ) -> anyhow::Result<Removed> {
        let flow_ends = self.flow_ends.clone();
        let timeouts = self.global()?.timeouts;
        let mut freed_per_endpoint: BTreeMap<u32, u64> = BTreeMap::new();
        let mut fwd: HashMap<_, CtFwdKey, CtFwdValue> =
            HashMap::try_from(self.map_mut(map_names::CT_FWD)?)?;
        let swept = sweep_forward(&mut fwd, candidates, doomed)?;
        // Logged flows get their end record (expired, or purged).
        if let Some(sink) = &flow_ends {
            let now = monotonic_ns();
            for (k, v) in swept.gone.iter().chain(&swept.superseded) {
                if crate::flowlog::logged(v) {
                    sink.send(k, v, flow_expired(v, now, &timeouts));
                }
            }
        }
        let mut out = Removed {
            flows: 0,
            superseded: !swept.superseded.is_empty(),
            kept: swept.kept,
        };
        for (_, v) in swept.gone.iter().chain(&swept.superseded) {
            *freed_per_endpoint.entry(v.endpoint_id).or_default() += 1;
            out.flows += 1;
        }
        // A superseded flow's reverse and port entries may be the new
        // flow's too: the orphan sweep removes them only if not.
        let gone = swept.gone;
        let mut rev: HashMap<_, CtRevKey, CtOwner> =
            HashMap::try_from(self.map_mut(map_names::CT_REV)?)?;
        for (_, v) in &gone {
            let _ = rev.remove(&rev_key(v));
        }
        let mut ports: HashMap<_, NatPortKey, CtOwner> =
            HashMap::try_from(self.map_mut(map_names::NAT_PORTS)?)?;
        for (_, v) in &gone {
            let _ = ports.remove(&port_key(v));
        }
        // Live-flow accounting for the max-flows cap (the datapath adds, we
        // subtract; one writer per map).
        let mut freed: Array<_, u64> = Array::try_from(self.map_mut(map_names::EP_GC_FREED)?)?;
        for (id, n) in freed_per_endpoint {
            if let Ok(old) = freed.get(&id, 0) {
                freed.set(id, old.wrapping_add(n), 0)?;
            }
        }
        Ok(out)
    }

    /// Reverse and NAT-port entries whose owner flow is gone or maps differently.
    fn sweep_orphans(&mut self) -> anyhow::Result<u64> {
        let grace = ORPHAN_GRACE.as_nanos() as u64;
        // What each live flow's own entries are, keyed by the flow.
        let mut owned: std::collections::HashMap<CtFwdKey, (CtRevKey, NatPortKey)> =
            std::collections::HashMap::new();
        self.walk(map_names::CT_FWD, |k: &CtFwdKey, v: &CtFwdValue| {
            owned.insert(*k, (rev_key(v), port_key(v)));
        })?;
        let now = monotonic_ns();
        let old = |o: &CtOwner| now.saturating_sub(o.created_ns) > grace;
        let mut stale_rev: Vec<CtRevKey> = Vec::new();
        self.walk(map_names::CT_REV, |rk: &CtRevKey, o: &CtOwner| {
            if old(o) && owned.get(&o.fwd).is_none_or(|(r, _)| r != rk) {
                stale_rev.push(*rk);
            }
        })?;
        let mut stale_ports: Vec<NatPortKey> = Vec::new();
        self.walk(map_names::NAT_PORTS, |pk: &NatPortKey, o: &CtOwner| {
            if old(o) && owned.get(&o.fwd).is_none_or(|(_, p)| p != pk) {
                stale_ports.push(*pk);
            }
        })?;
        let mut n = 0;
        let mut rev: HashMap<_, CtRevKey, CtOwner> =
            HashMap::try_from(self.map_mut(map_names::CT_REV)?)?;
        for k in stale_rev {
            n += u64::from(rev.remove(&k).is_ok());
        }
        let mut ports: HashMap<_, NatPortKey, CtOwner> =
            HashMap::try_from(self.map_mut(map_names::NAT_PORTS)?)?;
        for k in stale_ports {
            n += u64::from(ports.remove(&k).is_ok());
        }
        Ok(n)
    }

    /// Every flow with its NAT mapping.
    pub fn list_conntrack(&mut self) -> anyhow::Result<Vec<FlowEntry>> {
        let g = self.global().context("reading the timeouts")?;
        Ok(flow_entries(self.flows()?, &g))
    }

    /// NAT ports in use per NAT address and protocol
    /// number: a port is unique per (address, protocol), so each protocol has
    /// the whole range.
    pub fn nat_ports_in_use_by_protocol(&mut self) -> anyhow::Result<BTreeMap<(IpAddr, u8), u64>> {
        let mut out = BTreeMap::new();
        self.walk(map_names::NAT_PORTS, |k: &NatPortKey, _: &CtOwner| {
            *out.entry((ip_of(&k.addr_be), k.proto)).or_default() += 1;
        })?;
        Ok(out)
    }

    /// NAT ports in use per NAT address, all protocols.
    pub fn nat_ports_in_use(&mut self) -> anyhow::Result<BTreeMap<IpAddr, u64>> {
        let mut out = BTreeMap::new();
        for ((addr, _), n) in self.nat_ports_in_use_by_protocol()? {
            *out.entry(addr).or_default() += n;
        }
        Ok(out)
    }
}

fn flow_entries(flows: Vec<(CtFwdKey, CtFwdValue)>, g: &GlobalConfig) -> Vec<FlowEntry> {
    // The datapath's own clock: a flow listed as expired is expired for the
    // next packet too (CLOCK_MONOTONIC runs up to a jiffy ahead of it).
    let now = coarse_monotonic_ns();
    flows
        .into_iter()
        .map(|(k, v)| {
            // When the expiry rule (slack included) lets it go.
            let timeout = flow_timeout_ns(v.proto, v.tcp_state, &g.timeouts)
                .saturating_add(plink_common::LAST_SEEN_SLACK_NS);
            let age = now.saturating_sub(v.last_seen_ns);
            FlowEntry {
                network_id: k.network_id,
                protocol: k.proto,
                client: (ip_of(&k.src_addr_be), u16::from_be(k.src_port_be)),
                endpoint: (ip_of(&k.dst_addr_be), u16::from_be(k.dst_port_be)),
                nat: (ip_of(&v.nat_addr_be), u16::from_be(v.nat_port_be)),
                backend: (ip_of(&v.backend_addr_be), u16::from_be(v.backend_port_be)),
                endpoint_id: v.endpoint_id,
                service_id: v.service_id,
                backend_id: v.backend_id,
                tcp_state: v.tcp_state,
                ingress_ifindex: v.ingress_ifindex,
                expires_in: Duration::from_nanos(timeout.saturating_sub(age)),
                proxy_header_len: v.pp_len,
            }
        })
        .collect()
}

/// Reads the flows through its own descriptors of the pinned maps: a
/// listing neither waits for nor holds up applies and the GC.
pub struct FlowReader {
    fwd: HashMap<aya::maps::MapData, CtFwdKey, CtFwdValue>,
    global: Array<aya::maps::MapData, GlobalConfig>,
}

impl FlowReader {
    /// Opens the maps pinned under `bpffs_root`.
    pub fn open(bpffs_root: &std::path::Path) -> anyhow::Result<Self> {
        let dir = super::pin_dir(bpffs_root);
        let open = |name: &str| {
            let pin = dir.join(name);
            aya::maps::MapData::from_pin(&pin)
                .with_context(|| format!("opening the pinned map {}", pin.display()))
        };
        Ok(Self {
            fwd: HashMap::try_from(aya::maps::Map::HashMap(open(map_names::CT_FWD)?))?,
            global: Array::try_from(aya::maps::Map::Array(open(map_names::GLOBAL)?))?,
        })
    }

    /// Every flow with its NAT mapping.
    pub fn list(&self) -> anyhow::Result<Vec<FlowEntry>> {
        let mut out = Vec::new();
        self.each(|f| {
            out.push(f);
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands each flow to `f` as it is read from the map (no listing is
    /// held whole); an error from `f` stops the walk.
    pub fn each(&self, mut f: impl FnMut(FlowEntry) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let g = self.global.get(&0, 0).context("reading the timeouts")?;
        // Entries deleted while we iterate are skipped, not errors.
        for (k, v) in self.fwd.iter().filter_map(Result::ok) {
            for e in flow_entries(vec![(k, v)], &g) {
                f(e)?;
            }
        }
        Ok(())
    }
}

/// The forward-entry operations a sweep needs (the pinned map, or a test
/// double that plays the datapath).
pub(crate) trait ForwardTable {
    fn get(&self, k: &CtFwdKey) -> Option<CtFwdValue>;
    /// Deletes the entry, returning the value it held when it was deleted
    /// (`None` if it was gone already).
    fn take(&mut self, k: &CtFwdKey) -> anyhow::Result<Option<CtFwdValue>>;
    /// Puts an entry back unless the key exists again (`false` then).
    fn restore(&mut self, k: &CtFwdKey, v: &CtFwdValue) -> anyhow::Result<bool>;
}

/// What [`sweep_forward`] did.
#[derive(Debug, Default)]
pub(crate) struct Swept {
    /// Removed flows, with their last value: their reverse and NAT-port
    /// entries are theirs to remove.
    pub gone: Vec<(CtFwdKey, CtFwdValue)>,
    /// Removed flows whose key the datapath already reused for a new flow
    /// (it won the race to put the entry back).
    pub superseded: Vec<(CtFwdKey, CtFwdValue)>,
    /// Flows judged again and kept (refreshed by the datapath meanwhile).
    pub kept: Vec<(CtFwdKey, CtFwdValue)>,
    pub remaining: u64,
}

/// Removes the forward entries `doomed` picks. The value is judged before
/// the delete and again as it was deleted (atomically read and deleted): the
/// datapath may refresh a flow between the check and the delete, and such a
/// flow is put back (unless the datapath created a new one meanwhile).
pub(crate) fn sweep_forward(
    fwd: &mut impl ForwardTable,
    keys: &[CtFwdKey],
    doomed: &mut impl FnMut(&CtFwdKey, &CtFwdValue, u64) -> bool,
) -> anyhow::Result<Swept> {
    let mut out = Swept::default();
    for k in keys {
        let Some(v) = fwd.get(k) else { continue };
        if !doomed(k, &v, monotonic_ns()) {
            out.remaining += 1;
            out.kept.push((*k, v));
            continue;
        }
        let Some(taken) = fwd.take(k)? else { continue };
        if doomed(k, &taken, monotonic_ns()) {
            out.gone.push((*k, taken));
        } else if fwd.restore(k, &taken)? {
            out.remaining += 1;
            out.kept.push((*k, taken));
        } else {
            out.superseded.push((*k, taken));
        }
    }
    Ok(out)
}

impl ForwardTable for HashMap<&mut aya::maps::MapData, CtFwdKey, CtFwdValue> {
    fn get(&self, k: &CtFwdKey) -> Option<CtFwdValue> {
        HashMap::get(self, k, 0).ok()
    }

    fn take(&mut self, k: &CtFwdKey) -> anyhow::Result<Option<CtFwdValue>> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = aya::maps::IterableMap::map(self).fd().as_fd().as_raw_fd();
        match lookup_and_delete(fd, k) {
            Ok(v) => Ok(v),
            // Kernels before 5.14 have no LOOKUP_AND_DELETE for hash maps:
            // read, then delete (the refresh window stays open there).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let v = HashMap::get(self, k, 0).ok();
                Ok(if self.remove(k).is_ok() { v } else { None })
            }
            Err(e) => Err(anyhow::Error::new(e).context("deleting a flow")),
        }
    }

    fn restore(&mut self, k: &CtFwdKey, v: &CtFwdValue) -> anyhow::Result<bool> {
        const BPF_NOEXIST: u64 = 1;
        match self.insert(k, v, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(anyhow::Error::new(e).context("restoring a refreshed flow")),
        }
    }
}

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM: the value as it was when deleted.
fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::RawFd,
    key: &K,
) -> std::io::Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    // union bpf_attr, map_elem: map_fd (u32, padded), key, value, flags.
    let mut attr = [0u64; 8];
    attr[0] = fd as u32 as u64;
    attr[1] = key as *const K as u64;
    attr[2] = value.as_mut_ptr() as u64;
    match super::bpf_cmd(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: the kernel wrote a whole value of the map's value size
        // (checked against V when the map was opened).
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn rev_key(v: &CtFwdValue) -> CtRevKey {
    CtRevKey {
        nat_addr_be: v.nat_addr_be,
        backend_addr_be: v.backend_addr_be,
        nat_port_be: v.nat_port_be,
        backend_port_be: v.backend_port_be,
        // The value's: a NAT64 echo flow's entries are ICMP ones.
        proto: v.proto,
        _pad: [0; 3],
    }
}

fn port_key(v: &CtFwdValue) -> NatPortKey {
    NatPortKey {
        addr_be: v.nat_addr_be,
        port_be: v.nat_port_be,
        proto: v.proto,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A forward table whose "datapath" refreshes (or replaces) a flow right
    /// between the GC's check and its delete.
    struct Racy {
        flows: BTreeMap<CtFwdKey, CtFwdValue>,
        /// Runs on the entry just before `take` deletes it.
        before_delete: fn(&mut BTreeMap<CtFwdKey, CtFwdValue>, &CtFwdKey),
    }

    impl ForwardTable for Racy {
        fn get(&self, k: &CtFwdKey) -> Option<CtFwdValue> {
            self.flows.get(k).copied()
        }
        fn take(&mut self, k: &CtFwdKey) -> anyhow::Result<Option<CtFwdValue>> {
            (self.before_delete)(&mut self.flows, k);
            Ok(self.flows.remove(k))
        }
        fn restore(&mut self, k: &CtFwdKey, v: &CtFwdValue) -> anyhow::Result<bool> {
            if self.flows.contains_key(k) {
                return Ok(false);
            }
            self.flows.insert(*k, *v);
            Ok(true)
        }
    }

    fn key(port: u16) -> CtFwdKey {
        CtFwdKey {
            src_port_be: port.to_be(),
            ..Default::default()
        }
    }

    /// Doomed when idle for over a second, like an expiry rule.
    fn idle(_: &CtFwdKey, v: &CtFwdValue, now: u64) -> bool {
        now.saturating_sub(v.last_seen_ns) > 1_000_000_000
    }

    fn stale() -> CtFwdValue {
        CtFwdValue {
            last_seen_ns: 0,
            nat_port_be: 1000u16.to_be(),
            ..Default::default()
        }
    }

    /// Issue 14, item 8: a flow refreshed between the GC's check and its
    /// delete is put back, not lost.
    #[test]
    fn a_flow_refreshed_between_check_and_delete_is_restored() {
        let mut t = Racy {
            flows: [(key(1), stale()), (key(2), stale())].into_iter().collect(),
            before_delete: |flows, k| {
                if *k == key(1)
                    && let Some(v) = flows.get_mut(k)
                {
                    v.last_seen_ns = monotonic_ns();
                }
            },
        };
        let swept = sweep_forward(&mut t, &[key(1), key(2)], &mut idle).expect("sweep");
        assert_eq!(swept.remaining, 1);
        assert_eq!(
            swept.gone.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            vec![key(2)],
            "only the idle flow goes"
        );
        assert!(swept.superseded.is_empty());
        let kept = t.flows.get(&key(1)).expect("the refreshed flow is back");
        assert!(kept.last_seen_ns > 0, "with its refreshed value");
        assert!(!t.flows.contains_key(&key(2)));
    }

    /// A refreshed flow the datapath re-created meanwhile (same key, new
    /// mapping) is left to the datapath: nothing of the new one is removed.
    #[test]
    fn a_flow_recreated_meanwhile_wins_over_the_restore() {
        let mut t = Racy {
            flows: [(key(1), stale())].into_iter().collect(),
            before_delete: |flows, k| {
                if let Some(v) = flows.get_mut(k) {
                    v.last_seen_ns = monotonic_ns();
                }
            },
        };
        // The datapath puts a new flow under the key right after the delete.
        struct Recreating(Racy);
        impl ForwardTable for Recreating {
            fn get(&self, k: &CtFwdKey) -> Option<CtFwdValue> {
                self.0.get(k)
            }
            fn take(&mut self, k: &CtFwdKey) -> anyhow::Result<Option<CtFwdValue>> {
                let v = self.0.take(k)?;
                let fresh = CtFwdValue {
                    last_seen_ns: monotonic_ns(),
                    nat_port_be: 2000u16.to_be(),
                    ..Default::default()
                };
                self.0.flows.insert(*k, fresh);
                Ok(v)
            }
            fn restore(&mut self, k: &CtFwdKey, v: &CtFwdValue) -> anyhow::Result<bool> {
                self.0.restore(k, v)
            }
        }
        t.flows.insert(key(1), stale());
        let mut r = Recreating(t);
        let swept = sweep_forward(&mut r, &[key(1)], &mut idle).expect("sweep");
        assert!(swept.gone.is_empty(), "its entries may be the new flow's");
        assert_eq!(swept.superseded.len(), 1);
        assert_eq!(
            r.0.flows.get(&key(1)).map(|v| u16::from_be(v.nat_port_be)),
            Some(2000),
            "the new flow stays"
        );
    }
}

#[cfg(test)]
mod addr_tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn map_addresses_read_back_in_their_family() {
        let v4: IpAddr = "198.51.100.10".parse().unwrap();
        assert_eq!(ip_of(&plink_common::v4([198, 51, 100, 10])), v4);
        let v6: Ipv6Addr = "2001:db8:100::10".parse().unwrap();
        assert_eq!(ip_of(&plink_common::v6(v6.octets())), IpAddr::V6(v6));
        // Only the first word set: IPv4 by the rule (such IPv6 addresses are refused).
        let anycast: Ipv6Addr = "2001:db8::".parse().unwrap();
        assert!(ip_of(&plink_common::v6(anycast.octets())).is_ipv4());
    }
}
