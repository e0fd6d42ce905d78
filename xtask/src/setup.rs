//! `cargo xtask setup`: install what is missing, and nothing else.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Debian packages the demo, tests and benchmarks use, with the command each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("util-linux", "nsenter"),
    ("procps", "sysctl"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("iputils-ping", "ping"),
    ("netcat-openbsd", "nc"),
    ("nftables", "nft"),
    ("tcpdump", "tcpdump"),
    // promtool and a real Prometheus server for the metrics tests.
    ("prometheus", "promtool"),
    // The fleet's shared store (docs/FLEET.md) and its command-line client;
    // protoc builds the etcd client crate's gRPC code.
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    ("protobuf-compiler", "protoc"),
    // protoc's well-known types (google/protobuf/*.proto) the etcd client's
    // protos import: only a Recommends of protobuf-compiler.
    ("libprotobuf-dev", "protoc"),
    // bgpd, bfdd and zebra for the fleet (announcement, BFD, the ECMP router).
    ("frr", "vtysh"),
    // A real IPFIX collector (nfcapd) and its reader for the flow-log tests.
    ("nfdump", "nfcapd"),
    // A real PROXY protocol v2 parser as a backend (accept-proxy) for the
    // proxy-protocol tests.
    ("haproxy", "haproxy"),
];

/// Prefix under which rustc's own libLLVM is linked for building bpf-linker.
fn llvm_prefix() -> PathBuf {
    home().join(".cache/plink/llvm")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory first, where `cargo install` puts bpf-linker.
pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

pub fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run this as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .env("PATH", path_with_cargo_bin())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    println!("setup: running {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .env("PATH", path_with_cargo_bin())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|s| s.contains("install ok installed"))
}

pub fn run() -> anyhow::Result<()> {
    let mut installed_something = false;

    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(pkg, _)| !dpkg_installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        require_root("installing Debian packages")?;
        println!("setup: installing Debian packages: {}", missing.join(" "));
        run_cmd("apt-get", &["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&missing);
        run_cmd("apt-get", &args)?;
        installed_something = true;
    }

    if !is_bpffs(Path::new("/sys/fs/bpf")) {
        require_root("mounting bpffs")?;
        std::fs::create_dir_all("/sys/fs/bpf").ok();
        println!("setup: mounting bpffs at /sys/fs/bpf");
        run_cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
        installed_something = true;
    }

    let toolchains = output("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (the eBPF crate needs it)");
        run_cmd(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
        installed_something = true;
    }
    let components = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: installing nightly rust-src (for -Z build-std=core)");
        run_cmd(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
        installed_something = true;
    }

    // bpf-linker loads rustc's libLLVM, which `rustup run` puts on the library path.
    if output("rustup", &["run", "nightly", "bpf-linker", "--version"]).is_none() {
        install_bpf_linker()?;
        installed_something = true;
    }

    if installed_something {
        println!("setup: done");
    } else {
        println!("setup: everything is already installed");
    }
    Ok(())
}

/// Builds bpf-linker against rustc's own LLVM (SPEC §7): about 4 minutes.
fn install_bpf_linker() -> anyhow::Result<()> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])
        .context("asking rustup for the nightly sysroot")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .with_context(|| format!("no libLLVM in {}", lib_dir.display()))?;
    let llvm_name = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    // libLLVM.so.22.1-rust-… or libLLVM-22-rust-….so: the major version picks the feature.
    let major: String = llvm_name
        .trim_start_matches("libLLVM.so.")
        .trim_start_matches("libLLVM-")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if major.is_empty() {
        bail!("cannot tell the LLVM version of {}", llvm.display());
    }
    let prefix = llvm_prefix();
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    println!(
        "setup: building bpf-linker against rustc's LLVM {major} ({}); this takes a few minutes",
        llvm.display()
    );
    let feature = format!("llvm-{major}");
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--no-default-features",
        ])
        .args(["--features", &feature])
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path_with_cargo_bin())
        .status()
        .context("starting cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    // statfs(2) f_type of bpffs; read via `stat -f` to stay dependency-free.
    output("stat", &["-f", "-c", "%T", &path.to_string_lossy()])
        .is_some_and(|t| t.trim() == "bpf_fs")
}

/// Whether a test object named `plt-<pid>-...` belongs to a process that is
/// gone (a live one may be another test run on this machine).
fn owner_gone(name: &str) -> bool {
    name.strip_prefix("plt-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Namespaces and pins the tests create, left by a run that was killed.
pub fn test_leftovers() -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    if let Some(list) = output("ip", &["netns", "list"]) {
        for line in list.lines() {
            if let Some(name) = line.split_whitespace().next()
                && name.starts_with("plt-")
                && owner_gone(name)
            {
                found.push(format!("netns {name}"));
            }
        }
    }
    let pins = Path::new("/sys/fs/bpf/plink-test");
    if let Ok(entries) = std::fs::read_dir(pins) {
        for entry in entries.flatten() {
            if owner_gone(&entry.file_name().to_string_lossy()) {
                found.push(format!("pin {}", entry.path().display()));
            }
        }
    }
    Ok(found)
}

pub fn remove_test_leftovers() -> anyhow::Result<()> {
    for item in test_leftovers()? {
        println!("setup: removing leftover {item}");
        if let Some(name) = item.strip_prefix("netns ") {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        } else if let Some(path) = item.strip_prefix("pin ") {
            let _ = std::fs::remove_dir_all(path);
        }
    }
    Ok(())
}
