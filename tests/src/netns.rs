//! Network-namespace topologies for tests: named hosts joined by veth pairs,
//! torn down on drop (also when the test panics) so a failed test never
//! poisons the next one.
//!
//! Every namespace is named `plt-<pid>-<n>-<host>`; `cargo xtask test` removes
//! leftovers with that prefix from runs that were killed before they could
//! clean up.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

/// Prefix of every namespace the tests create.
pub const NETNS_PREFIX: &str = "plt-";
/// bpffs directory under which tests pin; one sub-directory per topology.
pub const BPFFS_TEST_ROOT: &str = "/sys/fs/bpf/plink-test";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("running {program}: is it installed? `cargo xtask setup` installs it")
        })?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Fails with a message that says what to install, never skips silently.
pub fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests create network namespaces and load XDP programs: run them as root (cargo xtask test)"
    );
    for tool in ["ip", "nsenter", "ethtool", "sysctl"] {
        assert!(
            Command::new("which")
                .arg(tool)
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
            "`{tool}` is missing: run `cargo xtask setup` (installs iproute2, util-linux, ethtool, procps)"
        );
    }
    assert!(
        Path::new("/sys/fs/bpf").exists(),
        "/sys/fs/bpf is missing: mount bpffs with `mount -t bpf bpf /sys/fs/bpf`"
    );
}

/// One host: a network namespace.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
}

impl Host {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside this namespace. `nsenter --net` keeps /sys/fs/bpf
    /// visible, unlike `ip netns exec` (SPEC §7).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs a command in the namespace and fails with its stderr on error.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {}", self.name))?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in {} failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        let out = sh("ip", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Runs `f` on a thread that has joined this namespace: sockets it opens
    /// and BPF_PROG_TEST_RUN calls it makes (FIB lookups, ifindexes) belong here.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = self.netns_path();
        let handle = std::thread::spawn(move || -> anyhow::Result<T> {
            enter_netns(&path)?;
            Ok(f())
        });
        handle
            .join()
            .map_err(|panic| anyhow!("thread in netns panicked: {}", panic_message(&panic)))?
    }

    /// ifindex of an interface in this namespace.
    pub fn ifindex(&self, ifname: &str) -> anyhow::Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        out.split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| anyhow!("cannot parse ifindex of {ifname} from {out:?}"))
    }

    pub fn mac(&self, ifname: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .ok_or_else(|| anyhow!("no MAC for {ifname} in {out:?}"))?;
        parse_mac(mac)
    }

    /// A permanent neighbour entry: `addr` is at `mac` on `dev`.
    pub fn neigh_permanent(&self, addr: &str, mac: [u8; 6], dev: &str) -> anyhow::Result<()> {
        let mac = mac_text(mac);
        self.ip(&[
            "neigh",
            "replace",
            addr,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }
}

/// `02:00:00:00:00:01`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<_> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {text:?}");
    }
    for (slot, part) in mac.iter_mut().zip(parts) {
        *slot = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC {text:?}"))?;
    }
    Ok(mac)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".into()
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter_netns(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: valid fd; CLONE_NEWNET only affects the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Host {
    /// Sends raw Ethernet frames out of `ifname` (AF_PACKET), for traffic no
    /// socket would produce: forged replies, fragments, IPv6, bad headers.
    pub fn send_frames(&self, ifname: &str, frames: Vec<Vec<u8>>) -> anyhow::Result<()> {
        let ifindex = self.ifindex(ifname)?;
        self.run_in(move || -> anyhow::Result<()> {
            // SAFETY: plain socket(2); the fd is owned below.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd was just opened and is closed once, by this guard.
            let _guard =
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            for frame in &frames {
                // SAFETY: valid buffer and address with the sizes given.
                let rc = unsafe {
                    libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if rc < 0 {
                    bail!("sending a raw frame: {}", std::io::Error::last_os_error());
                }
            }
            Ok(())
        })?
    }

    /// A counter of /proc/net/snmp in this namespace, e.g. (`Ip`, `InReceives`).
    pub fn snmp(&self, section: &str, field: &str) -> anyhow::Result<u64> {
        let text = self.exec("cat", &["/proc/net/snmp"])?;
        let prefix = format!("{section}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no {section} section in /proc/net/snmp");
        };
        let i = header
            .split_whitespace()
            .position(|h| h == field)
            .ok_or_else(|| anyhow!("no {section} {field} in /proc/net/snmp"))?;
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("bad {section} {field} value"))
    }
}

/// A set of namespaces, links, processes and pins owned by one test.
pub struct Topology {
    prefix: String,
    hosts: Vec<Host>,
    children: Vec<(String, Child)>,
    bpffs_root: PathBuf,
    scratch: PathBuf,
    /// Pass programs keeping NAPI on at veth far ends (detached on drop).
    napi: Vec<aya::Ebpf>,
}

impl Topology {
    pub fn new() -> anyhow::Result<Self> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NETNS_PREFIX}{}-{id}", std::process::id());
        let bpffs_root = Path::new(BPFFS_TEST_ROOT).join(&prefix);
        let scratch = std::env::temp_dir().join(format!("plink-test-{prefix}"));
        Ok(Self {
            prefix,
            hosts: Vec::new(),
            children: Vec::new(),
            bpffs_root,
            scratch,
            napi: Vec::new(),
        })
    }

    /// Attaches plink's pass-everything XDP program (native mode) to `ifname`
    /// in `host`: frames that the gateway redirects or transmits into this
    /// veth pair are delivered only when this end runs NAPI (SPEC §7).
    pub fn enable_napi(&mut self, host: &Host, ifname: &str) -> anyhow::Result<()> {
        let ebpf = attach_standalone(host, ifname, plink_common::prog_names::PASS)?;
        self.napi.push(ebpf);
        Ok(())
    }

    /// A scratch directory for config files, sockets and state (removed on drop).
    pub fn scratch_dir(&self) -> anyhow::Result<&Path> {
        std::fs::create_dir_all(&self.scratch)
            .with_context(|| format!("creating {}", self.scratch.display()))?;
        Ok(&self.scratch)
    }

    /// Where this topology's plink instance pins (removed on drop).
    pub fn bpffs_root(&self) -> &Path {
        &self.bpffs_root
    }

    /// Creates a namespace with loopback up and IPv6 off (autoconfiguration
    /// traffic would perturb exact packet counts).
    pub fn host(&mut self, short: &str) -> anyhow::Result<Host> {
        let host = Host {
            name: format!("{}-{short}", self.prefix),
        };
        sh("ip", &["netns", "add", &host.name])?;
        self.hosts.push(host.clone());
        host.ip(&["link", "set", "lo", "up"])?;
        host.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        host.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(host)
    }

    /// Joins two hosts with a veth pair, brings both ends up and turns tx
    /// checksum offload off (XDP cannot see CHECKSUM_PARTIAL, SPEC §7).
    pub fn link(&mut self, a: &Host, a_if: &str, b: &Host, b_if: &str) -> anyhow::Result<()> {
        a.ip(&[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ])?;
        for (host, ifname) in [(a, a_if), (b, b_if)] {
            host.sysctl(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "1")?;
            host.exec("ethtool", &["-K", ifname, "tx", "off"])?;
            host.ip(&["link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// Starts a long-running process in a host; it is killed on drop.
    pub fn spawn(&mut self, host: &Host, program: &str, args: &[&str]) -> anyhow::Result<usize> {
        let child = host
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {program} in {}", host.name))?;
        self.children.push((program.to_owned(), child));
        Ok(self.children.len() - 1)
    }

    pub fn child_mut(&mut self, index: usize) -> &mut Child {
        &mut self.children[index].1
    }

    /// Sends SIGTERM to a child and waits for it, returning its output.
    pub fn stop(&mut self, index: usize) -> anyhow::Result<Output> {
        let (_, child) = &mut self.children[index];
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let (name, child) = self.children.remove(index);
        child
            .wait_with_output()
            .with_context(|| format!("waiting for {name}"))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.napi.clear();
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.bpffs_root.exists() {
            let _ = std::fs::remove_dir_all(&self.bpffs_root);
        }
        // Succeeds only once no other topology pins there.
        let _ = std::fs::remove_dir(BPFFS_TEST_ROOT);
        let _ = std::fs::remove_dir_all(&self.scratch);
        // Deleting a namespace destroys its veths, and their XDP links with them.
        for host in self.hosts.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &host.name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Loads plink's object with its big maps shrunk and attaches one of its
/// map-free programs (`plink_pass`, the benchmark forwarder) to `ifname` in
/// `host`, native mode. Detached when the returned object is dropped.
pub fn attach_standalone(host: &Host, ifname: &str, program: &str) -> anyhow::Result<aya::Ebpf> {
    let ifindex = host.ifindex(ifname)?;
    let program = program.to_owned();
    host.run_in(move || -> anyhow::Result<aya::Ebpf> {
        let mut loader = aya::EbpfLoader::new();
        // Only one map-free program is used: keep the object's big maps tiny.
        for map in [
            plink_common::map_names::CT_FWD,
            plink_common::map_names::CT_REV,
            plink_common::map_names::NAT_PORTS,
            plink_common::map_names::LB_TABLE,
        ] {
            loader.map_max_entries(map, 1);
        }
        let mut ebpf = loader.load(plink_ctl::EBPF_OBJECT)?;
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(&program)
            .ok_or_else(|| anyhow!("no {program} in the object"))?
            .try_into()?;
        plink_ctl::dataplane::load_verified(prog)?;
        prog.attach_to_if_index(ifindex, aya::programs::XdpMode::Driver)?;
        Ok(ebpf)
    })?
}
