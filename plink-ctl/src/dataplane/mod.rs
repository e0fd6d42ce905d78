//! Loading the XDP programs, attaching them by interface role, and reading
//! their maps.
//!
//! - [`spec`]: the plain [`DataplaneSpec`] and [`Dataplane::apply`], which
//!   writes it into the maps as a diff.
//! - [`conntrack`]: garbage collection, endpoint purge and flow listing.
//! - [`stats`]: per-CPU counters summed (endpoint, service, backend, NAT
//!   address, drops by reason and by endpoint).
//! - [`garp`]: gratuitous ARP for endpoint and NAT addresses.
//! - [`neigh`]: managed neighbour entries so FIB lookups never see NO_NEIGH.
//!
//! Life of a gateway: [`Dataplane::load_with`] (map sizes) → [`Dataplane::apply`]
//! (the spec) → [`Dataplane::attach`] / [`Dataplane::attach_all`] → announce
//! ([`DataplaneSpec::garp_plan`] + [`garp::announce`]) and keep backends
//! resolved ([`DataplaneSpec::managed_neighbours`] + [`neigh::ensure_managed`])
//! → periodically [`Dataplane::gc_conntrack`]; after an `apply` that takes an
//! endpoint out of `Approved` (or removes a backend without draining),
//! [`Dataplane::purge_endpoint`] / [`Dataplane::purge_backend`].

pub mod batch;
pub mod conntrack;
pub mod garp;
pub mod neigh;
pub mod spec;
pub mod stats;

pub use conntrack::{FlowEntry, FlowReader, GcReport, monotonic_ns};
pub use spec::{
    AnswerPath, BackendSpec, BackendState, DataplaneSpec, EndpointSpec, EndpointState,
    InterfaceRole, InterfaceSpec, NatSpec, PortSpec, Protocol, RetiredNat, ServiceSpec,
    TimeoutSpec,
};
pub use stats::{CounterKind, CounterReader, CounterSource};

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuHashMap, PerCpuValues, ProgramArray},
    programs::{
        Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
    util::nr_cpus,
};
use plink_common::{IfStats, LAYOUT_VERSION, map_names, prog_names, v6_prog};

use crate::config::{Config, Role, XdpMode};

/// NAT slots by service id, and retired NAT addresses, as the pins hold them.
pub type PinnedNat = (
    BTreeMap<u32, Vec<spec::NatSpec>>,
    BTreeMap<std::net::IpAddr, spec::RetiredNat>,
);

/// Directory holding this layout version's pins under the configured root.
pub fn pin_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(format!("v{LAYOUT_VERSION}"))
}

/// An exclusive `flock` on the pin root, held while a controller runs (or
/// `down` removes the pins): one controller per dataplane.
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

/// Locks `bpffs_root` (created if needed). A controller being restarted may
/// still be exiting: waits a moment before calling the pins taken, then
/// names the process that holds them.
pub fn lock_pins(bpffs_root: &Path) -> anyhow::Result<PinLock> {
    use std::os::fd::AsRawFd as _;
    bpffs_check(bpffs_root)?;
    std::fs::create_dir_all(bpffs_root)
        .with_context(|| format!("creating {}", bpffs_root.display()))?;
    let dir = std::fs::File::open(bpffs_root)
        .with_context(|| format!("opening {}", bpffs_root.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        // SAFETY: flock on a valid open fd.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(PinLock { _dir: dir });
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the dataplane pinned under {} is in use by {}: one plink-ctl per dataplane. Stop it first (SIGTERM leaves forwarding running)",
                bpffs_root.display(),
                lock_holder(&dir).unwrap_or_else(|| "another process".into())
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The process holding a `flock` on `file`, from /proc/locks.
fn lock_holder(file: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let needle = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid: u32 = locks
        .lines()
        .filter(|l| l.contains("FLOCK"))
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == needle)?;
            words.get(at.checked_sub(1)?)?.parse().ok()
        })?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|w| !w.is_empty())
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Some(if cmdline.is_empty() {
        format!("pid {pid}")
    } else {
        format!("pid {pid} ({cmdline})")
    })
}

/// The identity of the dataplane pinned under `bpffs_root`, `None` when
/// nothing is pinned there: the boot and the kernel's id of the pinned
/// `GLOBAL` map. Map ids are not reused while the map lives, and pins do not
/// outlive a boot, so the pair names one dataplane for as long as it exists
/// (no map or program of the datapath has to carry it).
pub fn pinned_identity(bpffs_root: &Path) -> anyhow::Result<Option<String>> {
    let pin = pin_dir(bpffs_root).join(map_names::GLOBAL);
    if !pin.exists() {
        return Ok(None);
    }
    let info = aya::maps::MapInfo::from_pin(&pin)
        .with_context(|| format!("reading the pinned map {}", pin.display()))?;
    Ok(Some(identity(info.id())))
}

fn identity(global_map_id: u32) -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown-boot".into());
    format!("boot {boot} map {global_map_id}")
}

/// Maps pinned by the controller: every map, so that flows and counters
/// outlive one process.
const PINNED_MAPS: &[&str] = map_names::ALL;

/// Map sizes fixed at load (they take effect on a fresh start only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Flows: entries of CT_FWD, CT_REV and NAT_PORTS each.
    pub conntrack: u32,
    /// Slots of the backend lookup table shared by all services.
    pub lb_table: u32,
    /// Bytes of the flow-log ring buffer (a power of two, at least a page).
    pub flow_log_ring: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            conntrack: plink_common::DEFAULT_CONNTRACK_ENTRIES,
            lb_table: plink_common::DEFAULT_LB_TABLE_ENTRIES,
            flow_log_ring: plink_common::DEFAULT_FLOW_LOG_RING_BYTES,
        }
    }
}

/// A loaded dataplane. With a pin directory, maps and XDP links are pinned
/// and outlive the process; without one (tests), links detach on drop.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// What this process last wrote to the large arrays, so that `apply`
    /// diffs against memory instead of reading every slot back.
    written: spec::Written,
    /// When the GC last swept orphaned reverse and NAT-port entries.
    orphans_swept_at: Option<std::time::Instant>,
    /// Where the GC's sweep of the flow table is.
    gc_sweep: conntrack::GcSweep,
    /// Where the end records of logged flows the controller removes go.
    flow_ends: Option<crate::flowlog::EndSink>,
}

/// Where the XDP link of `ifname` is pinned.
fn link_pin_path(pin_dir: &Option<PathBuf>, ifname: &str) -> Option<PathBuf> {
    pin_dir.as_ref().map(|d| d.join("links").join(ifname))
}

/// A pinned map whose layout differs from what this build expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapMismatch {
    pub map: String,
    pub what: &'static str,
    pub pinned: u64,
    pub expected: u64,
}

/// Compares every pinned map under `dir` with the object's definition (with
/// `sizes` applied): type, key and value size, max entries and flags.
/// aya reuses a pinned map by name without checking any of this.
pub fn check_pinned_maps(
    object: &[u8],
    dir: &Path,
    sizes: Sizes,
) -> anyhow::Result<Vec<MapMismatch>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    let mut out = Vec::new();
    for (name, def) in &obj.maps {
        let pin = dir.join(name);
        if !pin.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&pin)
            .with_context(|| format!("reading the pinned map {}", pin.display()))?;
        let expected_entries = match name.as_str() {
            n if n == map_names::CT_FWD || n == map_names::CT_REV || n == map_names::NAT_PORTS => {
                sizes.conntrack
            }
            n if n == map_names::LB_TABLE => sizes.lb_table,
            _ => def.max_entries(),
        };
        let checks: [(&'static str, u64, u64); 5] = [
            (
                "type",
                u64::from(info.map_type().map(|t| t as u32).unwrap_or(u32::MAX)),
                u64::from(def.map_type()),
            ),
            (
                "key size",
                u64::from(info.key_size()),
                u64::from(def.key_size()),
            ),
            (
                "value size",
                u64::from(info.value_size()),
                u64::from(def.value_size()),
            ),
            (
                "max entries",
                u64::from(info.max_entries()),
                u64::from(expected_entries),
            ),
            (
                "flags",
                u64::from(info.map_flags()),
                u64::from(def.map_flags()),
            ),
        ];
        for (what, pinned, expected) in checks {
            if pinned != expected {
                out.push(MapMismatch {
                    map: name.clone(),
                    what,
                    pinned,
                    expected,
                });
            }
        }
    }
    Ok(out)
}

/// Resolves an interface name to its ifindex in the current network namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name).context("interface name contains a NUL byte")?;
    // SAFETY: c_name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!("interface {name:?} does not exist in this network namespace");
    }
    Ok(index)
}

/// Resolves an ifindex to its name, if it exists in the current namespace.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated string into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

fn bpffs_check(root: &Path) -> anyhow::Result<()> {
    let mut probe = root.to_path_buf();
    // The root may not exist yet: check the nearest existing ancestor is on bpffs.
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let c_path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        .context("bpffs path contains a NUL byte")?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated, st is a valid out pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;
    if rc != 0 || st.f_type as libc::c_long != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpffs mount. Mount one with `mount -t bpf bpf /sys/fs/bpf`; \
             note that `ip netns exec` remounts /sys and hides it: use `nsenter --net=/run/netns/NAME` instead",
            probe.display()
        );
    }
    Ok(())
}

impl Dataplane {
    /// Loads the embedded object with its maps pinned under `bpffs_root`.
    pub fn load(object: &[u8], bpffs_root: &Path) -> anyhow::Result<Self> {
        Self::load_with(object, Some(bpffs_root), Sizes::default())
    }

    /// Loads the object with the given map sizes; maps are pinned under
    /// `bpffs_root` when one is given (tests load unpinned).
    pub fn load_with(
        object: &[u8],
        bpffs_root: Option<&Path>,
        sizes: Sizes,
    ) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        let dir = match bpffs_root {
            Some(root) => {
                bpffs_check(root)?;
                let dir = pin_dir(root);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating the pin directory {}", dir.display()))?;
                Some(dir)
            }
            None => None,
        };
        if let Some(dir) = &dir {
            let mismatches = check_pinned_maps(object, dir, sizes)?;
            if !mismatches.is_empty() {
                let list: Vec<String> = mismatches
                    .iter()
                    .map(|m| {
                        format!(
                            "{}: {} is {} pinned, this build expects {}",
                            m.map, m.what, m.pinned, m.expected
                        )
                    })
                    .collect();
                bail!(
                    "refusing to adopt the dataplane pinned under {}: its maps do not match this build \
                     ({}). A sizing field changed, or the pins come from another plink version. \
                     Sizes take effect on a fresh start: `plink-ctl down` removes the pins \
                     (flows and counters are lost), then start again",
                    dir.display(),
                    list.join("; ")
                );
            }
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        for name in [map_names::CT_FWD, map_names::CT_REV, map_names::NAT_PORTS] {
            loader.map_max_entries(name, sizes.conntrack);
        }
        loader.map_max_entries(map_names::LB_TABLE, sizes.lb_table);
        loader.map_max_entries(map_names::FLOW_LOG, sizes.flow_log_ring);
        let ebpf = loader.load(object).context("loading the eBPF object")?;
        Ok(Self {
            ebpf,
            pin_dir: dir,
            written: spec::Written::default(),
            orphans_swept_at: None,
            gc_sweep: Default::default(),
            flow_ends: None,
        })
    }

    /// Forwards the datapath's debug messages to the log and takes the
    /// switch for them (`crate::dplog`).
    pub fn start_datapath_log(&mut self) -> anyhow::Result<()> {
        crate::dplog::start(&mut self.ebpf)
    }

    /// The flow-log ring buffer, taken out of the dataplane (its one reader).
    pub fn take_flow_log_ring(&mut self) -> anyhow::Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let ring = self
            .ebpf
            .take_map(map_names::FLOW_LOG)
            .context("the eBPF object has no FLOW_LOG map (or its reader took it)")?;
        Ok(aya::maps::RingBuf::try_from(ring)?)
    }

    /// Starts the flow-log exporter on this dataplane's ring; the flows
    /// the controller removes from then on get their end records.
    pub fn start_flow_logs(
        &mut self,
        cfg: crate::flowlog::ExportConfig,
    ) -> anyhow::Result<crate::flowlog::Exporter> {
        let ring = self.take_flow_log_ring()?;
        let lost = self
            .ebpf
            .take_map(map_names::FLOW_LOG_LOST)
            .context("the eBPF object has no FLOW_LOG_LOST map")?;
        let lost = aya::maps::PerCpuArray::try_from(lost)?;
        let (exporter, sink) = crate::flowlog::start(ring, lost, cfg)?;
        self.flow_ends = Some(sink);
        Ok(exporter)
    }

    /// Loads the programs into the kernel (verifier) without attaching
    /// them: the consumer and provider programs, and their IPv6 halves,
    /// which go into `V6_PROGS` (the IPv4 programs tail-call them; the map
    /// is not pinned, so every start, adopting or not, fills it).
    pub fn load_programs(&mut self) -> anyhow::Result<()> {
        for name in [
            prog_names::CONSUMER,
            prog_names::PROVIDER,
            prog_names::CONSUMER6,
            prog_names::PROVIDER6,
            prog_names::NAT64_ERROR,
        ] {
            let program = self.program(name)?;
            if program.fd().is_err() {
                load_verified(program)
                    .with_context(|| format!("the kernel refused to load {name}"))?;
            }
        }
        let mut fds = Vec::new();
        for (slot, name) in [
            (v6_prog::CONSUMER, prog_names::CONSUMER6),
            (v6_prog::PROVIDER, prog_names::PROVIDER6),
            (v6_prog::NAT64_ERROR, prog_names::NAT64_ERROR),
        ] {
            let fd = self
                .program(name)?
                .fd()
                .and_then(|fd| fd.try_clone().map_err(Into::into))
                .with_context(|| format!("the file descriptor of {name}"))?;
            fds.push((slot, fd));
        }
        let mut slots = ProgramArray::try_from(self.map_mut(map_names::V6_PROGS)?)?;
        for (slot, fd) in &fds {
            slots
                .set(*slot, fd, 0)
                .with_context(|| format!("filling slot {slot} of {}", map_names::V6_PROGS))?;
        }
        Ok(())
    }

    /// One of the XDP programs, by name ([`prog_names`]).
    pub fn program(&mut self, name: &str) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()?)
    }

    /// Attaches the program for `role` to `ifindex` (programs are loaded
    /// first if needed). The link lives as long as this `Dataplane`.
    pub fn attach(
        &mut self,
        ifindex: u32,
        role: InterfaceRole,
        mode: AyaXdpMode,
    ) -> anyhow::Result<()> {
        self.load_programs()?;
        let name = match role {
            InterfaceRole::Consumer { .. } => prog_names::CONSUMER,
            InterfaceRole::Provider => prog_names::PROVIDER,
        };
        self.program(name)?
            .attach_to_if_index(ifindex, mode)
            .with_context(|| format!("attaching {name} to ifindex {ifindex}"))?;
        Ok(())
    }

    /// A map by name, for the submodules.
    pub(crate) fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
    }

    /// Configured interfaces whose XDP link is missing or belongs to another
    /// (deleted) device: an interface deleted and re-created while plink
    /// runs. Interfaces that do not exist (yet) are not listed.
    pub fn unattached_interfaces(&self, config: &Config) -> Vec<String> {
        config
            .interfaces
            .iter()
            .filter(|iface| {
                let Ok(index) = ifindex(&iface.name) else {
                    return false;
                };
                link_pin_path(&self.pin_dir, &iface.name)
                    .is_some_and(|pin| pinned_link_ifindex(&pin).map_or(true, |on| on != index))
            })
            .map(|iface| iface.name.clone())
            .collect()
    }

    /// Attaches the program for each interface's role, in the configured mode.
    pub fn attach_all(&mut self, config: &Config) -> anyhow::Result<()> {
        let mode = match config.gateway.xdp_mode {
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Generic => AyaXdpMode::Skb,
        };
        self.detach_unconfigured_links(config)?;
        for role in [Role::Consumer, Role::Provider] {
            let prog_name = match role {
                Role::Consumer => prog_names::CONSUMER,
                Role::Provider => prog_names::PROVIDER,
            };
            self.load_programs()?;
            for iface in config.interfaces.iter().filter(|i| i.role == role) {
                let index = ifindex(&iface.name)?;
                self.register_interface(index)?;
                let program: &mut Xdp = self
                    .ebpf
                    .program_mut(prog_name)
                    .ok_or_else(|| anyhow!("program {prog_name} missing"))?
                    .try_into()?;
                let pin = link_pin_path(&self.pin_dir, &iface.name);
                if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
                    // A pinned link outlives its interface: when the interface
                    // was deleted (and maybe re-created under the same name)
                    // the link is defunct (ifindex 0, updates fail ENOLINK) or
                    // on another device. It is dropped and a new one attached.
                    let pinned_on = pinned_link_ifindex(pin).with_context(|| {
                        format!("reading the pinned XDP link {}", pin.display())
                    })?;
                    if pinned_on != index {
                        if pinned_on != 0 {
                            detach_pinned_link(pin).with_context(|| {
                                format!("detaching the stale XDP link {}", pin.display())
                            })?;
                        }
                        std::fs::remove_file(pin)
                            .with_context(|| format!("removing {}", pin.display()))?;
                        tracing::warn!(interface = %iface.name, ifindex = index, pinned_ifindex = pinned_on, "the pinned XDP link belonged to a deleted interface: attaching anew");
                    }
                }
                if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
                    // Adopt the running link: the new program replaces the
                    // old one atomically (BPF_LINK_UPDATE); no packet sees
                    // the interface without a program.
                    let pinned = PinnedLink::from_pin(pin)
                        .with_context(|| format!("opening the pinned link {}", pin.display()))?;
                    let fd_link: FdLink = pinned.into();
                    let link = XdpLink::try_from(fd_link)
                        .with_context(|| format!("{} is not an XDP link", pin.display()))?;
                    program
                        .attach_to_link(link)
                        .with_context(|| format!("replacing the program of {}", pin.display()))?;
                    tracing::info!(interface = %iface.name, ifindex = index, program = prog_name, "XDP link adopted");
                    continue;
                }
                let link_id = program.attach_to_if_index(index, mode).map_err(|e| {
                    let hint = match config.gateway.xdp_mode {
                        XdpMode::Native => {
                            "the driver may lack native XDP: set `gateway.xdp_mode: generic` \
                             (and turn GRO/GSO/TSO off on it), or detach another XDP program \
                             with `ip link set dev IFACE xdp off`"
                        }
                        XdpMode::Generic => {
                            "another XDP program may be attached: detach it with \
                             `ip link set dev IFACE xdpgeneric off`"
                        }
                    };
                    anyhow!(
                        "attaching XDP to interface {:?} failed: {e}. Hint: {hint}",
                        iface.name
                    )
                })?;
                if let Some(pin) = pin {
                    // Pinned, the link outlives this process: forwarding goes
                    // on while the controller is down.
                    let link = program.take_link(link_id)?;
                    let fd_link: FdLink = link
                        .try_into()
                        .map_err(|_| anyhow!("the kernel gave a netlink XDP attachment, not a bpf_link (Linux 5.9+ needed)"))?;
                    if let Some(dir) = pin.parent() {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                    }
                    fd_link
                        .pin(&pin)
                        .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
                }
                tracing::info!(interface = %iface.name, ifindex = index, program = prog_name, "XDP attached");
            }
        }
        Ok(())
    }

    /// Detaches and unpins the XDP links of interfaces the config no longer
    /// names: left attached, their traffic would be black-holed (consumer)
    /// or handled for a dataplane that no longer serves them.
    fn detach_unconfigured_links(&self, config: &Config) -> anyhow::Result<()> {
        let Some(dir) = self.pin_dir.as_ref().map(|d| d.join("links")) else {
            return Ok(());
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if config.interfaces.iter().any(|i| i.name == name) {
                continue;
            }
            let path = entry.path();
            if pinned_link_ifindex(&path).unwrap_or(0) != 0 {
                detach_pinned_link(&path)
                    .with_context(|| format!("detaching the XDP link {}", path.display()))?;
            }
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            tracing::info!(interface = %name, "interface no longer in the config: XDP detached");
        }
        Ok(())
    }

    /// The entries each map of this dataplane holds (as loaded or adopted).
    pub fn capacities(&mut self) -> anyhow::Result<crate::plan::Capacities> {
        let mut entries = |name: &str| -> anyhow::Result<u32> {
            let map = self.map_mut(name)?;
            let data: &MapData = match map {
                aya::maps::Map::HashMap(d)
                | aya::maps::Map::Array(d)
                | aya::maps::Map::PerCpuHashMap(d)
                | aya::maps::Map::PerCpuArray(d) => d,
                _ => bail!("map {name} has an unexpected type"),
            };
            Ok(data
                .info()
                .with_context(|| format!("reading the size of map {name}"))?
                .max_entries())
        };
        Ok(crate::plan::Capacities {
            interfaces: entries(map_names::INTERFACES)?,
            endpoint_keys: entries(map_names::ENDPOINTS)?,
            endpoint_addresses: entries(map_names::ARP_ENDPOINTS)?,
            endpoints: entries(map_names::EP_STATS)?,
            services: entries(map_names::SERVICES)?,
            backends: entries(map_names::BACKENDS)?,
            nat_addresses: entries(map_names::NAT_ADDRS)?,
        })
    }

    /// This dataplane's identity (see [`pinned_identity`]).
    pub fn identity(&mut self) -> anyhow::Result<String> {
        let map = self.map_mut(map_names::GLOBAL)?;
        let aya::maps::Map::Array(data) = map else {
            bail!("map GLOBAL is not an array");
        };
        Ok(identity(data.info().context("reading map GLOBAL")?.id()))
    }

    /// The NAT slots the pinned SERVICES map holds per enabled service, and
    /// the retired addresses of NAT_ADDRS (what an adopting start learns
    /// from the pins: draining addresses outlive the controller).
    pub fn pinned_nat(&mut self) -> anyhow::Result<PinnedNat> {
        use plink_common::{NatAddrInfo, ServiceConfig, nat_addr_flags, nat_flags};
        let ip = spec::ip_of;
        let services: aya::maps::Array<_, ServiceConfig> =
            aya::maps::Array::try_from(self.map_mut(map_names::SERVICES)?)?;
        let mut held = BTreeMap::new();
        for (id, svc) in services.iter().enumerate() {
            let svc = svc?;
            if svc.enabled == 0 {
                continue;
            }
            let count = (svc.nat_count as usize).min(svc.nat.len());
            let slots = svc.nat[..count]
                .iter()
                .map(|n| spec::NatSpec {
                    addr: spec::ip_of(&n.addr_be),
                    ports: n.port_min..=n.port_max,
                    draining: n.flags & nat_flags::DRAINING != 0,
                })
                .collect();
            held.insert(id as u32, slots);
        }
        let addrs: aya::maps::HashMap<_, plink_common::Addr, NatAddrInfo> =
            aya::maps::HashMap::try_from(self.map_mut(map_names::NAT_ADDRS)?)?;
        let mut retired = BTreeMap::new();
        for entry in addrs.iter() {
            let (a, info) = entry?;
            if info.flags & nat_addr_flags::RETIRED != 0 {
                retired.insert(
                    ip(&a),
                    spec::RetiredNat {
                        service_id: info.service_id,
                        slot: info.slot,
                    },
                );
            }
        }
        Ok((held, retired))
    }

    /// Backends the maps record as draining, with their addresses (what an
    /// adopting start learns from the pins).
    pub fn draining_backends(&mut self) -> anyhow::Result<Vec<(u32, std::net::IpAddr)>> {
        let map: aya::maps::Array<_, plink_common::BackendInfo> =
            aya::maps::Array::try_from(self.map_mut(map_names::BACKENDS)?)?;
        let mut out = Vec::new();
        for (id, info) in map.iter().enumerate() {
            let info = info?;
            if info.enabled != 0 && info.state == plink_common::backend_state::DRAINING {
                out.push((id as u32, spec::ip_of(&info.addr_be)));
            }
        }
        Ok(out)
    }

    pub(crate) fn register_interface(&mut self, index: u32) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::IF_STATS)
            .ok_or_else(|| anyhow!("map IF_STATS missing"))?;
        let mut stats: PerCpuHashMap<_, u32, IfStats> = PerCpuHashMap::try_from(map)?;
        if stats.get(&index, 0).is_err() {
            let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
            let zero = PerCpuValues::try_from(vec![IfStats::default(); cpus])?;
            stats.insert(index, zero, 0)?;
        }
        Ok(())
    }
}

/// Per-interface counters read from the pinned map, summed over CPUs.
pub fn read_interface_stats(bpffs_root: &Path) -> anyhow::Result<BTreeMap<u32, IfStats>> {
    let path = pin_dir(bpffs_root).join(map_names::IF_STATS);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {}: is `plink-ctl run` running with this config?",
            path.display()
        )
    })?;
    let map: PerCpuHashMap<_, u32, IfStats> =
        PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))?;
    sum_interface_stats(&map)
}

/// `IF_STATS` by ifindex, each summed over CPUs.
pub(crate) fn sum_interface_stats<T: std::borrow::Borrow<aya::maps::MapData>>(
    map: &PerCpuHashMap<T, u32, IfStats>,
) -> anyhow::Result<BTreeMap<u32, IfStats>> {
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (index, per_cpu) = entry?;
        let mut total = IfStats::default();
        for v in per_cpu.iter() {
            total.add(v);
        }
        out.insert(index, total);
    }
    Ok(out)
}

/// Removes this layout's pins (what `plink-ctl down` does).
pub fn remove_pins(bpffs_root: &Path) -> anyhow::Result<bool> {
    let dir = pin_dir(bpffs_root);
    if !dir.exists() {
        return Ok(false);
    }
    // Detach explicitly: unpinning only drops a reference, and the kernel
    // releases the last one later, so XDP could outlive `down` for a moment.
    if let Ok(links) = std::fs::read_dir(dir.join("links")) {
        for link in links.flatten() {
            // A defunct link (its interface was deleted) has nothing to detach.
            if pinned_link_ifindex(&link.path()).is_ok_and(|i| i == 0) {
                continue;
            }
            detach_pinned_link(&link.path()).with_context(|| {
                format!("detaching the XDP link pinned at {}", link.path().display())
            })?;
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    // Remove the root too when we were its only user.
    let _ = std::fs::remove_dir(bpffs_root);
    Ok(true)
}

/// A descriptor of the BPF object pinned at `path` (BPF_OBJ_GET).
fn pinned_object_fd(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    let pathname = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr: obj_get starts with the pathname pointer; zeroed beyond.
    let mut attr = [0u64; 8];
    attr[0] = pathname.as_ptr() as u64;
    let size = std::mem::size_of_val(&attr);
    // SAFETY: bpf(2) with a zeroed attr of the given size and a valid C string.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `bpf(cmd, attr)` with an 8-word attr; the error is errno.
pub(crate) fn bpf_cmd(cmd: libc::c_long, attr: &mut [u64; 8]) -> std::io::Result<()> {
    let size = std::mem::size_of_val(attr);
    // SAFETY: bpf(2) with an attr of the given size; callers fill it per `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// BPF_OBJ_GET on a pinned link, then BPF_LINK_DETACH: the program leaves
/// the interface now, whoever else holds the link.
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let fd = pinned_object_fd(path)?;
    // link_detach: the link fd.
    let mut attr = [0u64; 8];
    attr[0] = fd.as_raw_fd() as u64 & 0xffff_ffff;
    bpf_cmd(BPF_LINK_DETACH, &mut attr)
}

/// The ifindex the XDP link pinned at `path` is attached to; 0 when the
/// link is defunct (its interface was deleted).
fn pinned_link_ifindex(path: &Path) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    let fd = pinned_object_fd(path)?;
    // struct bpf_link_info: type, id, prog_id, then a union (8-aligned)
    // whose xdp member starts with the ifindex.
    let mut info = [0u32; 32];
    // info_by_fd: bpf_fd (u32), info_len (u32), info (u64 pointer).
    let mut attr = [0u64; 8];
    attr[0] = (fd.as_raw_fd() as u64 & 0xffff_ffff) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // The kernel writes at most info_len bytes into `info`.
    bpf_cmd(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info[0] != BPF_LINK_TYPE_XDP {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an XDP link (link type {})", info[0]),
        ));
    }
    Ok(info[4])
}

fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer. Kernels with memcg accounting
    // ignore the limit; failure only matters on old kernels and shows up at load.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

/// Loads `program` into the kernel. The verifier gives up with EAGAIN when a
/// signal is pending on this thread mid-check (a loaded machine stretches
/// the window to a second): signals are held off this thread while it loads
/// (process signals go to another thread or wait), and a load that still
/// meets one is retried, as libbpf does.
pub fn load_verified(program: &mut Xdp) -> Result<(), aya::programs::ProgramError> {
    const EAGAIN: i32 = 11;
    let mut attempts = 0;
    loop {
        let held = SignalsHeld::new();
        let loaded = program.load();
        drop(held);
        match loaded {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(EAGAIN) && attempts < 9 =>
            {
                attempts += 1;
            }
            other => return other,
        }
    }
}

/// Blocks every blockable signal on the calling thread until dropped (then
/// restores the previous mask).
struct SignalsHeld {
    previous: libc::sigset_t,
}

impl SignalsHeld {
    fn new() -> Self {
        // SAFETY: plain libc calls on sigset_t values we own.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
            Self { previous }
        }
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new` on the same thread.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut());
        }
    }
}
