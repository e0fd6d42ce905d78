//! `plink-ctl check --host`: is this host set up the way plink's forwarding
//! contract needs? Each finding says what is wrong and how to fix it.
//!
//! Everything is read in the caller's network namespace (procfs net sysctls,
//! netlink through `ip`, ethtool), never from /sys/class/net, which under
//! `nsenter --net` still shows the namespace /sys was mounted in.

use std::{fmt, path::Path, process::Command};

use serde::Serialize;

use crate::config::{Config, Family, Role, XdpMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Ok => "ok",
            Severity::Warn => "WARN",
            Severity::Fail => "FAIL",
        })
    }
}

/// One finding: what was checked, on what, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Short id of the check, stable for scripts (`bpffs`, `consumer_forwarding`, ...).
    pub check: &'static str,
    /// The interface, or `host`.
    pub subject: String,
    pub message: String,
}

fn finding(severity: Severity, check: &'static str, subject: &str, message: String) -> Finding {
    Finding {
        severity,
        check,
        subject: subject.to_owned(),
        message,
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bpffs check: the pin root must live on a bpf filesystem.
fn check_bpffs(root: &Path) -> Finding {
    let mut probe = root.to_path_buf();
    while !probe.exists() && probe.pop() {}
    let fs_type = output("stat", &["-f", "-c", "%T", &probe.to_string_lossy()]);
    match fs_type.as_deref().map(str::trim) {
        Some("bpf_fs") => finding(
            Severity::Ok,
            "bpffs",
            "host",
            format!("{} is on bpffs", probe.display()),
        ),
        other => finding(
            Severity::Fail,
            "bpffs",
            "host",
            format!(
                "{} is not on bpffs (found {}): mount it with `mount -t bpf bpf /sys/fs/bpf`. \
                 Under `ip netns exec` /sys is remounted and bpffs hidden: run plink with \
                 `nsenter --net=/run/netns/NAME` instead",
                probe.display(),
                other.unwrap_or("nothing")
            ),
        ),
    }
}

fn kernel_version() -> Option<(u32, u32)> {
    let release = read_trimmed("/proc/sys/kernel/osrelease")?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn check_kernel() -> Vec<Finding> {
    let mut out = Vec::new();
    match kernel_version() {
        // bpf_link for XDP: 5.9; managed neighbour entries: 5.16.
        Some(v) if v >= (5, 16) => out.push(finding(
            Severity::Ok,
            "kernel",
            "host",
            format!(
                "kernel {}.{}: bpf_link XDP and managed neighbours supported",
                v.0, v.1
            ),
        )),
        Some(v) if v >= (5, 9) => out.push(finding(
            Severity::Warn,
            "kernel",
            "host",
            format!(
                "kernel {}.{} lacks managed neighbour entries (5.16+): backends' next hops may go \
                 unresolved and flows drop as fib_no_neigh; upgrade the kernel",
                v.0, v.1
            ),
        )),
        Some(v) => out.push(finding(
            Severity::Fail,
            "kernel",
            "host",
            format!(
                "kernel {}.{} has no bpf_link for XDP (5.9+): upgrade the kernel",
                v.0, v.1
            ),
        )),
        None => out.push(finding(
            Severity::Warn,
            "kernel",
            "host",
            "cannot read the kernel version".into(),
        )),
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        out.push(finding(
            Severity::Warn,
            "btf",
            "host",
            "no kernel BTF (/sys/kernel/btf/vmlinux): the verifier's messages will be less precise"
                .into(),
        ));
    }
    out
}

fn sysctl_conf(iface: &str, key: &str) -> Option<String> {
    read_trimmed(&format!("/proc/sys/net/ipv4/conf/{iface}/{key}"))
}

/// `net.ipv6.conf.<iface>.<key>`; `None` when the host has no IPv6 at all
/// (`ipv6.disable=1`), as for an interface that does not exist.
fn sysctl_conf6(iface: &str, key: &str) -> Option<String> {
    read_trimmed(&format!("/proc/sys/net/ipv6/conf/{iface}/{key}"))
}

/// Does the config publish an IPv6 service?
fn has_ipv6_service(config: &Config) -> bool {
    config.services.iter().any(|s| s.family() == Family::Ipv6)
}

/// The IPv6 half of the forwarding contract, from the interface's
/// `disable_ipv6` and `forwarding` sysctls (`None`: not readable, the
/// host has no IPv6). A consumer interface passes nothing to the kernel:
/// with IPv6 enabled the kernel gives it a link-local address and answers,
/// solicits and takes router advertisements there, so it must have
/// `disable_ipv6=1` (XDP still sees, answers and forwards every frame). The
/// provider interface needs IPv6 on and forwarding on for an IPv6 service
/// (the datapath's FIB lookups, neighbour discovery for backends).
fn check_ipv6(
    name: &str,
    role: Role,
    ipv6_service: bool,
    disable_ipv6: Option<&str>,
    forwarding: Option<&str>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    match role {
        Role::Consumer => {
            if disable_ipv6.is_some_and(|v| v != "1") {
                out.push(finding(
                    if ipv6_service { Severity::Fail } else { Severity::Warn },
                    "consumer_ipv6",
                    name,
                    format!(
                        "IPv6 is enabled on consumer interface {name}: the kernel gives it a link-local \
                         address, answers and takes router advertisements there, so consumers reach the \
                         gateway itself (XDP answers neighbour discovery for endpoints on its own); \
                         `sysctl -w net.ipv6.conf.{name}.disable_ipv6=1`"
                    ),
                ));
            }
        }
        Role::Provider if ipv6_service => match (disable_ipv6, forwarding) {
            (None, _) => out.push(finding(
                Severity::Fail,
                "provider_forwarding6",
                name,
                format!(
                    "the config has an IPv6 service but this host has no IPv6 on {name} \
                     (booted with ipv6.disable=1?): enable IPv6, or take the IPv6 services out"
                ),
            )),
            (Some("1"), _) => out.push(finding(
                Severity::Fail,
                "provider_forwarding6",
                name,
                format!(
                    "IPv6 is disabled on provider interface {name}, which an IPv6 service's backends \
                     are behind: `sysctl -w net.ipv6.conf.{name}.disable_ipv6=0`"
                ),
            )),
            (_, f) if f != Some("1") => out.push(finding(
                Severity::Fail,
                "provider_forwarding6",
                name,
                format!(
                    "IPv6 forwarding is off on provider interface {name}: the datapath's IPv6 FIB \
                     lookups fail (fib_forwarding_disabled); `sysctl -w net.ipv6.conf.{name}.forwarding=1` \
                     (with forwarding on the interface takes router advertisements only with accept_ra=2)"
                ),
            )),
            _ => {}
        },
        Role::Provider => {}
    }
    out
}

/// Drivers known to run XDP in native (driver) mode.
const NATIVE_XDP_DRIVERS: &[&str] = &[
    "veth",
    "virtio_net",
    "mlx5_core",
    "mlx4_en",
    "i40e",
    "ice",
    "ixgbe",
    "igb",
    "igc",
    "ena",
    "bnxt_en",
    "nfp",
    "qede",
    "thunder-nicvf",
    "tun",
    "netdevsim",
    "stmmac",
    "gve",
];

fn check_interface(config: &Config, name: &str, role: Role) -> Vec<Finding> {
    let mut out = Vec::new();
    let Some(link) = output("ip", &["-o", "link", "show", "dev", name]) else {
        out.push(finding(
            Severity::Fail,
            "interface",
            name,
            format!("interface {name} does not exist in this network namespace"),
        ));
        return out;
    };
    // Driver and native XDP.
    let driver = output("ethtool", &["-i", name]).and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("driver: ").map(|d| d.trim().to_owned()))
    });
    match (&driver, config.gateway.xdp_mode) {
        (Some(d), XdpMode::Native) if !NATIVE_XDP_DRIVERS.contains(&d.as_str()) => {
            out.push(finding(
                Severity::Warn,
                "native_xdp",
                name,
                format!(
                    "driver {d} is not known to support native XDP: attach may fail; \
                     set gateway.xdp_mode: generic (and turn GRO/GSO/TSO off) if it does"
                ),
            ))
        }
        (Some(d), _) => out.push(finding(
            Severity::Ok,
            "native_xdp",
            name,
            format!("driver {d}"),
        )),
        (None, _) => out.push(finding(
            Severity::Warn,
            "native_xdp",
            name,
            "cannot read the driver (is ethtool installed?)".into(),
        )),
    }
    // MTU: native XDP on veth needs frames that fit a page.
    let mtu: Option<u32> = link
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok());
    if let (Some(mtu), Some("veth")) = (mtu, driver.as_deref())
        && mtu > 3498
    {
        out.push(finding(
            Severity::Fail,
            "mtu",
            name,
            format!("MTU {mtu} is too large for native XDP on veth (at most 3498): lower it"),
        ));
    }
    // Offloads.
    let features = output("ethtool", &["-k", name]).unwrap_or_default();
    let feature_on = |key: &str| {
        features
            .lines()
            .any(|l| l.trim_start().starts_with(key) && l.contains(": on"))
    };
    if driver.as_deref() == Some("veth") && feature_on("tx-checksumming") {
        out.push(finding(
            Severity::Warn,
            "tx_checksum",
            name,
            "tx checksum offload is on: local senders on this veth hand XDP packets whose \
             checksum is not filled in yet; turn it off with `ethtool -K DEV tx off`"
                .into(),
        ));
    }
    if config.gateway.xdp_mode == XdpMode::Generic
        && (feature_on("generic-receive-offload") || feature_on("tcp-segmentation-offload"))
    {
        out.push(finding(
            Severity::Warn,
            "offloads",
            name,
            "generic XDP sees GRO/TSO super-packets, which redirects refuse: \
             `ethtool -K DEV gro off gso off tso off`"
                .into(),
        ));
    }
    // Forwarding contract.
    let forwarding = sysctl_conf(name, "forwarding");
    match role {
        Role::Consumer => {
            if forwarding.as_deref() == Some("1") {
                out.push(finding(
                    Severity::Fail,
                    "consumer_forwarding",
                    name,
                    format!(
                        "IPv4 forwarding is on for consumer interface {name}: the kernel must never \
                         route consumer traffic; `sysctl -w net.ipv4.conf.{name}.forwarding=0`"
                    ),
                ));
            }
            let addrs =
                output("ip", &["-o", "-4", "addr", "show", "dev", name]).unwrap_or_default();
            if !addrs.trim().is_empty() {
                out.push(finding(
                    Severity::Fail,
                    "consumer_address",
                    name,
                    format!(
                        "consumer interface {name} carries a gateway address; consumers must not \
                         reach the gateway itself: `ip addr flush dev {name}`"
                    ),
                ));
            }
        }
        Role::Provider => {
            if forwarding.as_deref() != Some("1") {
                out.push(finding(
                    Severity::Fail,
                    "provider_forwarding",
                    name,
                    format!(
                        "IPv4 forwarding is off on provider interface {name}: the datapath's FIB \
                         lookups fail (fib_forwarding_disabled); `sysctl -w net.ipv4.conf.{name}.forwarding=1`"
                    ),
                ));
            }
            if sysctl_conf(name, "rp_filter").as_deref() == Some("1") {
                out.push(finding(
                    Severity::Warn,
                    "rp_filter",
                    name,
                    "strict rp_filter on the provider interface can drop the gateway's own health \
                     checks' replies on asymmetric paths; consider loose mode (2)"
                        .into(),
                ));
            }
        }
    }
    out.extend(check_ipv6(
        name,
        role,
        has_ipv6_service(config),
        sysctl_conf6(name, "disable_ipv6").as_deref(),
        sysctl_conf6(name, "forwarding").as_deref(),
    ));
    out
}

/// Checks whose failure breaks the forwarding contract (SPEC §2): `run`
/// refuses to start on them.
pub const CONTRACT_CHECKS: [&str; 5] = [
    "consumer_forwarding",
    "consumer_address",
    "provider_forwarding",
    // Failures only with an IPv6 service (a warning otherwise).
    "consumer_ipv6",
    "provider_forwarding6",
];

/// The failed findings that break the forwarding contract.
pub fn contract_violations(findings: &[Finding]) -> Vec<&Finding> {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Fail && CONTRACT_CHECKS.contains(&f.check))
        .collect()
}

/// Runs every check for `config` in the current network namespace.
pub fn check_host(config: &Config) -> Vec<Finding> {
    let mut out = vec![check_bpffs(&config.gateway.bpffs_root)];
    out.extend(check_kernel());
    for iface in &config.interfaces {
        out.extend(check_interface(config, &iface.name, iface.role));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_parses() {
        let v = kernel_version().expect("a Linux host");
        assert!(v.0 >= 4);
    }

    #[test]
    fn the_ipv6_contract_follows_the_services_family() {
        let sev = |f: &[Finding]| f.iter().map(|f| (f.check, f.severity)).collect::<Vec<_>>();
        // A consumer interface with IPv6 on: a failure once a service is
        // IPv6, a warning before; with disable_ipv6=1 or no IPv6: fine.
        assert_eq!(
            sev(&check_ipv6(
                "c1",
                Role::Consumer,
                true,
                Some("0"),
                Some("0")
            )),
            [("consumer_ipv6", Severity::Fail)]
        );
        assert_eq!(
            sev(&check_ipv6(
                "c1",
                Role::Consumer,
                false,
                Some("0"),
                Some("0")
            )),
            [("consumer_ipv6", Severity::Warn)]
        );
        assert!(check_ipv6("c1", Role::Consumer, true, Some("1"), Some("0")).is_empty());
        assert!(check_ipv6("c1", Role::Consumer, true, None, None).is_empty());
        // The provider interface of an IPv6 service: IPv6 on, forwarding on.
        assert!(check_ipv6("p0", Role::Provider, true, Some("0"), Some("1")).is_empty());
        let off = check_ipv6("p0", Role::Provider, true, Some("0"), Some("0"));
        assert_eq!(sev(&off), [("provider_forwarding6", Severity::Fail)]);
        assert!(
            off[0].message.contains("net.ipv6.conf.p0.forwarding=1"),
            "{}",
            off[0].message
        );
        let disabled = check_ipv6("p0", Role::Provider, true, Some("1"), Some("1"));
        assert!(disabled[0].message.contains("disable_ipv6=0"));
        assert_eq!(
            sev(&check_ipv6("p0", Role::Provider, true, None, None)),
            [("provider_forwarding6", Severity::Fail)]
        );
        // No IPv6 service: the provider's IPv6 settings are not plink's.
        assert!(check_ipv6("p0", Role::Provider, false, Some("1"), None).is_empty());
        // Both IPv6 checks stop `run` when they fail.
        let f = check_ipv6("c1", Role::Consumer, true, Some("0"), None);
        assert_eq!(contract_violations(&f).len(), 1);
    }

    #[test]
    fn missing_bpffs_is_a_failure_with_the_fix() {
        let f = check_bpffs(Path::new("/proc/plink-nowhere"));
        assert_eq!(f.severity, Severity::Fail);
        assert!(f.message.contains("mount -t bpf"), "{}", f.message);
        assert!(f.message.contains("nsenter"), "{}", f.message);
    }
}
