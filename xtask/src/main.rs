//! plink's developer workflows. Kept free of heavy dependencies so that
//! `cargo xtask setup` builds before any eBPF tooling exists.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "plink's developer workflows")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, nightly rust-src, bpf-linker,
    /// a bpffs mount) and nothing else. Idempotent.
    Setup,
    /// Set up, then build plink-ctl with its embedded eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, then run every check and test: fmt, clippy (host and eBPF),
    /// unit tests, golden packets (BPF_PROG_TEST_RUN) and end-to-end tests in
    /// network namespaces. Needs root.
    Test {
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
    },
    /// Set up, build, and run plink on a network-namespace topology with real
    /// traffic; prints what the clients got back and the counters; cleans up.
    Demo,
    /// Set up, build, and run a fleet: three gateways (plink + FRR each)
    /// behind a consumer router doing L4-hash ECMP with fast BFD; kills one
    /// node and drains another under live streams and prints what broke
    /// (docs/FLEET.md). Needs root.
    Fleet,
    /// Set up, build in release mode, and run the benchmarks (per-packet cost
    /// through BPF_PROG_TEST_RUN; live forwarding through kernel routing,
    /// nftables, a minimal XDP forwarder and plink; TCP connection cost;
    /// scale over 1k/100k/1M flows). Prints markdown tables and writes
    /// target/bench/results.{json,md}; see BENCHMARKS.md. Needs root.
    Bench {
        /// A short development run (2 rounds of 1 s, fewer test runs, no 1M-flow run).
        #[arg(long)]
        quick: bool,
    },
    /// The long fuzz runs: 1,000,000 packets through the XDP programs
    /// (BPF_PROG_TEST_RUN) and 100,000 mutated configs. `cargo xtask test`
    /// runs short seeded versions of both.
    Fuzz,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::Build { release } => setup::run().and_then(|()| build(release)),
        Task::Test { filter } => setup::run().and_then(|()| test(filter)),
        Task::Demo => setup::run().and_then(|()| demo()),
        Task::Fleet => setup::run().and_then(|()| fleet()),
        Task::Fuzz => setup::run().and_then(|()| fuzz()),
        Task::Bench { quick } => setup::run().and_then(|()| bench(quick)),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A cargo command in the workspace with ~/.cargo/bin on PATH (bpf-linker).
fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin());
    cmd
}

fn run_step(name: &str, mut cmd: Command) -> anyhow::Result<()> {
    println!("\n==> {name}");
    let status = cmd.status().with_context(|| format!("starting {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "-p", "plink-ctl"];
    if release {
        args.push("--release");
    }
    run_step("build plink-ctl", cargo(&args))
}

fn test(filter: Option<String>) -> anyhow::Result<()> {
    setup::require_root("the tests create network namespaces and load XDP programs")?;
    setup::remove_test_leftovers()?;
    run_step("cargo fmt --check", cargo(&["fmt", "--all", "--check"]))?;
    run_step(
        "clippy (host crates)",
        cargo(&[
            "clippy",
            "--workspace",
            "--exclude",
            "plink-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The eBPF crate only builds for the BPF target with nightly and build-std.
    let mut ebpf_clippy = Command::new("rustup");
    ebpf_clippy
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "plink-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"])
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin());
    run_step("clippy (eBPF crate, bpfel-unknown-none)", ebpf_clippy)?;
    build(false)?;
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        "plink-ebpf",
        "--no-fail-fast",
    ];
    if let Some(f) = filter.as_deref() {
        args.push("--");
        args.push(f);
    }
    // Figures of an earlier run would be printed as this run's.
    let figures = workspace_root().join("target/tmp/fleet-figures.txt");
    let _ = std::fs::remove_file(&figures);
    let mut result = run_step(
        "cargo test (unit, golden packets, end to end)",
        cargo(&args),
    );
    if result.is_ok() && filter.is_none() {
        // The verifier's view of each program, in the CI log.
        result = run_step(
            "verified instructions and stack use per program",
            cargo(&[
                "test",
                "-p",
                "plink-tests",
                "--test",
                "golden",
                "--",
                "verified_program_sizes",
                "--nocapture",
            ]),
        );
    }
    // The fleet test's measured figures (tests/tests/fleet.rs writes them).
    if let Ok(text) = std::fs::read_to_string(&figures) {
        println!("\nxtask: fleet figures (node loss, drain, new connections):\n{text}");
        let _ = std::fs::remove_file(&figures);
    }
    // Whatever happened, nothing may be left behind.
    let leftovers = setup::test_leftovers()?;
    result?;
    if !leftovers.is_empty() {
        bail!("tests left these behind: {}", leftovers.join(", "));
    }
    println!("\nxtask: all checks and tests passed; no namespaces or pins left behind");
    Ok(())
}

fn fuzz() -> anyhow::Result<()> {
    setup::require_root("packet fuzzing loads XDP programs in a test namespace")?;
    build(false)?;
    let mut configs = cargo(&[
        "test",
        "-p",
        "plink-ctl",
        "--release",
        "--",
        "mutated_configs_never_panic",
    ]);
    configs.env("PLINK_FUZZ_CONFIGS", "100000");
    run_step("fuzz: 100,000 mutated configs", configs)?;
    let mut packets = cargo(&[
        "test",
        "-p",
        "plink-tests",
        "--test",
        "golden",
        "--",
        "golden_fuzz_keeps_the_invariants",
        "--nocapture",
    ]);
    packets.env("PLINK_FUZZ_PACKETS", "1000000");
    run_step("fuzz: 1,000,000 packets through the XDP programs", packets)
}

fn demo() -> anyhow::Result<()> {
    setup::require_root("the demo creates network namespaces and attaches XDP")?;
    build(false)?;
    run_step(
        "demo",
        cargo(&["run", "--quiet", "-p", "plink-tests", "--example", "demo"]),
    )
}

fn fleet() -> anyhow::Result<()> {
    setup::require_root("the fleet demo creates network namespaces and attaches XDP")?;
    build(false)?;
    run_step(
        "fleet",
        cargo(&["run", "--quiet", "-p", "plink-tests", "--example", "fleet"]),
    )
}

fn bench(quick: bool) -> anyhow::Result<()> {
    setup::require_root("the benchmarks create network namespaces and attach XDP")?;
    // Release builds: the benchmark drives millions of packets itself, and
    // runs the release plink-ctl (found next to the example's binary).
    build(true)?;
    let mut args = vec![
        "run",
        "--quiet",
        "--release",
        "-p",
        "plink-tests",
        "--example",
        "bench",
        "--",
    ];
    if quick {
        args.push("--quick");
    }
    let mut cmd = cargo(&args);
    cmd.env("PLINK_BENCH_OUT", workspace_root().join("target/bench"));
    run_step("bench", cmd)
}
