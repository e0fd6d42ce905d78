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

/// Does the config publish an IPv6 service? Only those route IPv6 on the
/// provider side (NAT66): an IPv4 service's backends are IPv4, also when
/// consumers reach it over IPv6 through NAT64.
fn has_ipv6_service(config: &Config) -> bool {
    config.services.iter().any(|s| s.family() == Family::Ipv6)
}

/// Does the config publish an IPv4 service (NAT64 ones included)?
fn has_ipv4_service(config: &Config) -> bool {
    config.services.iter().any(|s| s.family() == Family::Ipv4)
}

/// Do consumers reach the gateway over IPv6? An IPv6 service, or any
/// endpoint with an IPv6 address: an IPv4 service's endpoint may have one
/// (`address` IPv6, or a dual-stack `address6`), served through NAT64.
fn serves_ipv6(config: &Config) -> bool {
    has_ipv6_service(config)
        || config
            .endpoints
            .iter()
            .any(|e| e.addresses().any(|a| a.is_ipv6()))
}

/// What the config asks of the host, by address family and side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Families {
    /// Some service is IPv4: the provider side routes IPv4.
    ipv4_service: bool,
    /// Some service is IPv6: the provider side routes IPv6.
    ipv6_service: bool,
    /// Consumers reach the gateway over IPv6 ([`serves_ipv6`]): what the
    /// consumer-side IPv6 checks go by.
    serves_ipv6: bool,
}

impl Families {
    fn of(config: &Config) -> Families {
        Families {
            ipv4_service: has_ipv4_service(config),
            ipv6_service: has_ipv6_service(config),
            serves_ipv6: serves_ipv6(config),
        }
    }
}

/// The provider interface's `net.ipv4.conf.<if>.forwarding`: on, for the
/// datapath's IPv4 FIB lookups. When every service is IPv6 (NAT66 only) the
/// IPv4 datapath never routes (no IPv4 backend, and an IPv6 service's
/// endpoints are IPv6: NAT46 is refused), so off is only a warning: an IPv4
/// service added later by a reload, which does not run these checks, would
/// need it. No service at all is not "all IPv6": nothing says which family
/// comes, so IPv4 forwarding stays required as it always was.
fn check_provider_forwarding(
    name: &str,
    families: Families,
    forwarding: Option<&str>,
) -> Option<Finding> {
    if forwarding == Some("1") {
        return None;
    }
    let fix = format!("`sysctl -w net.ipv4.conf.{name}.forwarding=1`");
    Some(if families.ipv6_service && !families.ipv4_service {
        finding(
            Severity::Warn,
            "provider_forwarding",
            name,
            format!(
                "IPv4 forwarding is off on provider interface {name}: fine while every service is \
                 IPv6 (the IPv4 datapath never routes), but an IPv4 service added later (NAT64 \
                 included) fails its FIB lookups (fib_forwarding_disabled) and a reload does not \
                 run this check; {fix}"
            ),
        )
    } else {
        finding(
            Severity::Fail,
            "provider_forwarding",
            name,
            format!(
                "IPv4 forwarding is off on provider interface {name}: the datapath's FIB \
                 lookups fail (fib_forwarding_disabled); {fix}"
            ),
        )
    })
}

/// An interface's `net.ipv6.conf.<if>.*` sysctls the IPv6 checks read;
/// `None`: not readable (the host has no IPv6).
#[derive(Debug, Clone, Copy, Default)]
struct Ipv6Sysctls<'a> {
    disable_ipv6: Option<&'a str>,
    forwarding: Option<&'a str>,
    accept_ra: Option<&'a str>,
}

/// The IPv6 half of the forwarding contract, from the interface's IPv6
/// sysctls. A consumer interface passes nothing to the kernel: with IPv6
/// enabled the kernel gives it a link-local address and answers, solicits
/// and takes router advertisements there, so it must have `disable_ipv6=1`
/// (XDP still sees, answers and forwards every frame); both consumer checks
/// fail once consumers reach the gateway over IPv6 (an IPv6 service or an
/// IPv6 endpoint address), and warn before. The provider interface needs
/// IPv6 on and forwarding on for an IPv6 service (the datapath's FIB
/// lookups, neighbour discovery for backends); NAT64 alone does not, its
/// backends are IPv4.
fn check_ipv6(name: &str, role: Role, families: Families, s: Ipv6Sysctls<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    match role {
        Role::Consumer => {
            if s.disable_ipv6.is_some_and(|v| v != "1") {
                let severity = if families.serves_ipv6 {
                    Severity::Fail
                } else {
                    Severity::Warn
                };
                out.push(finding(
                    severity,
                    "consumer_ipv6",
                    name,
                    format!(
                        "IPv6 is enabled on consumer interface {name}: the kernel gives it a link-local \
                         address, answers and takes router advertisements there, so consumers reach the \
                         gateway itself (XDP answers neighbour discovery for endpoints on its own); \
                         `sysctl -w net.ipv6.conf.{name}.disable_ipv6=1`"
                    ),
                ));
                // accept_ra=1 takes RAs only while the interface does not
                // forward, 2 always; either way one toggle away.
                if let Some(ra) = s.accept_ra.filter(|v| *v != "0") {
                    out.push(finding(
                        severity,
                        "consumer_accept_ra",
                        name,
                        format!(
                            "consumer interface {name} accepts router advertisements (accept_ra={ra}; \
                             1 takes them while IPv6 forwarding is off there): any consumer can install \
                             routes, a default route and addresses on the gateway itself; disable IPv6 \
                             there (recommended): `sysctl -w net.ipv6.conf.{name}.disable_ipv6=1`, or at \
                             least `sysctl -w net.ipv6.conf.{name}.accept_ra=0`"
                        ),
                    ));
                }
            }
        }
        Role::Provider if families.ipv6_service => match (s.disable_ipv6, s.forwarding) {
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
            // Forwarding on: accept_ra=1 now ignores router advertisements.
            _ if s.accept_ra == Some("1") => out.push(finding(
                Severity::Warn,
                "provider_accept_ra",
                name,
                format!(
                    "IPv6 forwarding is on for provider interface {name} and accept_ra=1, so the kernel \
                     ignores router advertisements there: if the provider side's IPv6 routes (the \
                     default route) come from RAs, they expire; `sysctl -w net.ipv6.conf.{name}.accept_ra=2`"
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
    let families = Families::of(config);
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
            out.extend(check_provider_forwarding(
                name,
                families,
                forwarding.as_deref(),
            ));
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
    let disable_ipv6 = sysctl_conf6(name, "disable_ipv6");
    let forwarding6 = sysctl_conf6(name, "forwarding");
    let accept_ra = sysctl_conf6(name, "accept_ra");
    out.extend(check_ipv6(
        name,
        role,
        families,
        Ipv6Sysctls {
            disable_ipv6: disable_ipv6.as_deref(),
            forwarding: forwarding6.as_deref(),
            accept_ra: accept_ra.as_deref(),
        },
    ));
    out
}

/// Checks whose failure breaks the forwarding contract (SPEC §2): `run`
/// refuses to start on them.
pub const CONTRACT_CHECKS: [&str; 6] = [
    "consumer_forwarding",
    "consumer_address",
    // A warning only when every service is IPv6.
    "provider_forwarding",
    // Failures only when consumers reach the gateway over IPv6 (an IPv6
    // service or endpoint address; a warning otherwise).
    "consumer_ipv6",
    "consumer_accept_ra",
    // Only with an IPv6 service.
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

    fn sev(f: &[Finding]) -> Vec<(&'static str, Severity)> {
        f.iter().map(|f| (f.check, f.severity)).collect()
    }

    /// IPv6 sysctls: disable_ipv6, forwarding, accept_ra.
    fn v6<'a>(
        disable_ipv6: Option<&'a str>,
        forwarding: Option<&'a str>,
        accept_ra: Option<&'a str>,
    ) -> Ipv6Sysctls<'a> {
        Ipv6Sysctls {
            disable_ipv6,
            forwarding,
            accept_ra,
        }
    }

    const V4: Families = Families {
        ipv4_service: true,
        ipv6_service: false,
        serves_ipv6: false,
    };
    /// An IPv4 service with NAT64 endpoints.
    const NAT64: Families = Families {
        ipv4_service: true,
        ipv6_service: false,
        serves_ipv6: true,
    };
    const V6: Families = Families {
        ipv4_service: false,
        ipv6_service: true,
        serves_ipv6: true,
    };

    #[test]
    fn the_ipv6_contract_follows_the_services_family() {
        // A consumer interface with IPv6 on: a failure once consumers reach
        // the gateway over IPv6, a warning before; with disable_ipv6=1 or no
        // IPv6: fine.
        let on = v6(Some("0"), Some("0"), Some("0"));
        for fam in [V6, NAT64] {
            assert_eq!(
                sev(&check_ipv6("c1", Role::Consumer, fam, on)),
                [("consumer_ipv6", Severity::Fail)]
            );
        }
        assert_eq!(
            sev(&check_ipv6("c1", Role::Consumer, V4, on)),
            [("consumer_ipv6", Severity::Warn)]
        );
        let off = v6(Some("1"), Some("0"), Some("1"));
        assert!(check_ipv6("c1", Role::Consumer, V6, off).is_empty());
        assert!(check_ipv6("c1", Role::Consumer, V6, v6(None, None, None)).is_empty());
        // The provider interface of an IPv6 service: IPv6 on, forwarding on.
        let p0 = |s| check_ipv6("p0", Role::Provider, V6, s);
        assert!(p0(v6(Some("0"), Some("1"), Some("2"))).is_empty());
        let off = p0(v6(Some("0"), Some("0"), Some("1")));
        assert_eq!(sev(&off), [("provider_forwarding6", Severity::Fail)]);
        assert!(
            off[0].message.contains("net.ipv6.conf.p0.forwarding=1"),
            "{}",
            off[0].message
        );
        let disabled = p0(v6(Some("1"), Some("1"), None));
        assert!(disabled[0].message.contains("disable_ipv6=0"));
        assert_eq!(
            sev(&p0(v6(None, None, None))),
            [("provider_forwarding6", Severity::Fail)]
        );
        // No IPv6 service: the provider's IPv6 settings are not plink's.
        assert!(check_ipv6("p0", Role::Provider, V4, v6(Some("1"), None, None)).is_empty());
        // Both IPv6 checks stop `run` when they fail.
        let f = check_ipv6("c1", Role::Consumer, V6, v6(Some("0"), None, None));
        assert_eq!(contract_violations(&f).len(), 1);
    }

    #[test]
    fn nat64_endpoints_need_no_provider_ipv6() {
        // NAT64: the backends are IPv4, so an IPv6-less provider is fine,
        // while the consumer side already counts as IPv6.
        for fam in [V4, NAT64] {
            for s in [
                v6(None, None, None),
                v6(Some("1"), Some("0"), Some("1")),
                v6(Some("0"), Some("0"), Some("1")),
            ] {
                assert!(check_ipv6("p0", Role::Provider, fam, s).is_empty());
            }
        }
    }

    #[test]
    fn consumer_accept_ra_follows_what_consumers_reach() {
        let c1 = |fam, s| check_ipv6("c1", Role::Consumer, fam, s);
        // IPv6 on and RAs taken (1: while not forwarding, 2: always).
        for ra in ["1", "2"] {
            let s = v6(Some("0"), Some("0"), Some(ra));
            for fam in [V6, NAT64] {
                assert_eq!(
                    sev(&c1(fam, s)),
                    [
                        ("consumer_ipv6", Severity::Fail),
                        ("consumer_accept_ra", Severity::Fail)
                    ]
                );
            }
            let f = c1(V4, s);
            assert_eq!(
                sev(&f),
                [
                    ("consumer_ipv6", Severity::Warn),
                    ("consumer_accept_ra", Severity::Warn)
                ]
            );
            let msg = &f[1].message;
            assert!(msg.contains(&format!("accept_ra={ra}")), "{msg}");
            assert!(
                msg.contains("sysctl -w net.ipv6.conf.c1.accept_ra=0")
                    && msg.contains("sysctl -w net.ipv6.conf.c1.disable_ipv6=1"),
                "{msg}"
            );
        }
        // accept_ra=0, unreadable, or IPv6 off there: no RA finding.
        for s in [
            v6(Some("0"), Some("0"), Some("0")),
            v6(Some("0"), Some("0"), None),
        ] {
            assert_eq!(sev(&c1(V6, s)), [("consumer_ipv6", Severity::Fail)]);
        }
        assert!(c1(V6, v6(Some("1"), Some("0"), Some("2"))).is_empty());
        assert!(c1(V6, v6(None, None, None)).is_empty());
        // A failing accept_ra stops `run` too.
        let f = c1(NAT64, v6(Some("0"), None, Some("1")));
        assert_eq!(contract_violations(&f).len(), 2);
    }

    #[test]
    fn provider_accept_ra_warns_only_when_forwarding_ignores_ras() {
        let p0 = |fam, s| check_ipv6("p0", Role::Provider, fam, s);
        let f = p0(V6, v6(Some("0"), Some("1"), Some("1")));
        assert_eq!(sev(&f), [("provider_accept_ra", Severity::Warn)]);
        assert!(
            f[0].message
                .contains("sysctl -w net.ipv6.conf.p0.accept_ra=2"),
            "{}",
            f[0].message
        );
        assert!(contract_violations(&f).is_empty());
        // accept_ra 0 or 2, or unreadable: nothing; forwarding off is the
        // forwarding failure alone; without an IPv6 service nothing.
        for ra in [Some("0"), Some("2"), None] {
            assert!(p0(V6, v6(Some("0"), Some("1"), ra)).is_empty());
        }
        assert_eq!(
            sev(&p0(V6, v6(Some("0"), Some("0"), Some("1")))),
            [("provider_forwarding6", Severity::Fail)]
        );
        assert!(p0(NAT64, v6(Some("0"), Some("1"), Some("1"))).is_empty());
    }

    #[test]
    fn provider_ipv4_forwarding_is_needed_unless_every_service_is_ipv6() {
        assert_eq!(check_provider_forwarding("p0", V4, Some("1")), None);
        // Any IPv4 service (NAT64's included), or none at all: a failure.
        let none = Families::default();
        let both = Families {
            ipv4_service: true,
            ..V6
        };
        for fam in [V4, NAT64, both, none] {
            for fwd in [Some("0"), None] {
                let f = check_provider_forwarding("p0", fam, fwd).expect("a finding");
                assert_eq!(
                    (f.check, f.severity),
                    ("provider_forwarding", Severity::Fail)
                );
                assert!(
                    f.message
                        .contains("sysctl -w net.ipv4.conf.p0.forwarding=1"),
                    "{}",
                    f.message
                );
            }
        }
        // Only IPv6 services: the IPv4 datapath never routes, a warning
        // that does not stop `run`.
        let f = check_provider_forwarding("p0", V6, Some("0")).expect("a finding");
        assert_eq!(
            (f.check, f.severity),
            ("provider_forwarding", Severity::Warn)
        );
        assert!(
            f.message
                .contains("sysctl -w net.ipv4.conf.p0.forwarding=1"),
            "{}",
            f.message
        );
        assert!(contract_violations(std::slice::from_ref(&f)).is_empty());
        assert_eq!(check_provider_forwarding("p0", V6, Some("1")), None);
    }

    #[test]
    fn families_of_a_config() {
        const HEAD: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
";
        const WEB4: &str = "  - name: web4
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10}]
    nat: {addresses: [198.51.100.200]}
    visibility: ['*']
";
        const WEB6: &str = "  - name: web6
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: '2001:db8:100::10'}]
    nat: {addresses: ['2001:db8:100::200']}
    visibility: ['*']
";
        let families = |services: &str, endpoints: &[&str]| {
            let mut text = format!("{HEAD}{services}");
            if !endpoints.is_empty() {
                text.push_str("endpoints:\n");
                for (i, e) in endpoints.iter().enumerate() {
                    text.push_str(&format!(
                        "  - {{name: e{i}, tenant: t, network: vnet-a, {e}}}\n"
                    ));
                }
            }
            let config = Config::parse(Path::new("/etc/plink/hostcheck.yaml"), &text)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            Families::of(&config)
        };
        assert_eq!(families(WEB4, &["address: 192.0.2.50, service: web4"]), V4);
        // NAT64: an IPv6 endpoint address, or a dual-stack address6, in
        // front of an IPv4 service; the provider side stays IPv4.
        assert_eq!(
            families(WEB4, &["address: '2001:db8:c1::50', service: web4"]),
            NAT64
        );
        assert_eq!(
            families(
                WEB4,
                &["address: 192.0.2.50, address6: '2001:db8:c1::60', service: web4"]
            ),
            NAT64
        );
        // NAT66 only, with or without endpoints.
        assert_eq!(
            families(WEB6, &["address: '2001:db8:c1::50', service: web6"]),
            V6
        );
        assert_eq!(families(WEB6, &[]), V6);
        assert_eq!(
            families(&format!("{WEB4}{WEB6}"), &[]),
            Families {
                ipv4_service: true,
                ..V6
            }
        );
    }

    #[test]
    fn missing_bpffs_is_a_failure_with_the_fix() {
        let f = check_bpffs(Path::new("/proc/plink-nowhere"));
        assert_eq!(f.severity, Severity::Fail);
        assert!(f.message.contains("mount -t bpf"), "{}", f.message);
        assert!(f.message.contains("nsenter"), "{}", f.message);
    }
}
