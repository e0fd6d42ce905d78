//! `cargo xtask bench`: plink's benchmarks (issue 11). Prints markdown
//! tables and writes `target/bench/results.json` and `target/bench/results.md`;
//! BENCHMARKS.md says what each row measures and keeps the committed numbers.
//!
//! 1. Per-packet cost of each datapath path through BPF_PROG_TEST_RUN
//!    ([`perpacket`]), against the minimal forwarder `plink_bench_fwd`.
//! 2. Live forwarding client → gateway → server over veth ([`live`]):
//!    kernel routing, nftables DNAT+SNAT, the minimal XDP forwarder and a
//!    real `plink-ctl run`, in interleaved rounds; plink's run time per packet
//!    over 1k / 100k / 1M flows; gateway CPU per TCP connection.
//!
//! Everything runs in `plt-` namespaces of the test harness (removed on drop,
//! also on failure) and uses 198.18.0.0/15 only (SPEC §8).
//!
//! Knobs: `--quick` (or `PLINK_BENCH_QUICK=1`) for a short development run,
//! `PLINK_BENCH_ROUNDS` (default 5), `PLINK_BENCH_SECONDS` (per live run,
//! default 3), `PLINK_BENCH_OUT` (default `target/bench`).

mod generator;
mod live;
mod memlat;
mod perpacket;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use plink_tests::netns;

/// Benchmark settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub quick: bool,
    pub rounds: usize,
    /// Length of one live traffic run.
    pub run: Duration,
    /// BPF_PROG_TEST_RUN runs per path per round.
    pub runs_per_round: u32,
    /// Flow counts of the scale runs.
    pub scale_flows: Vec<u32>,
}

fn env_num(name: &str) -> anyhow::Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => {
            Ok(Some(v.trim().parse().with_context(|| {
                format!("{name}={v:?} is not a number")
            })?))
        }
        Err(_) => Ok(None),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var("PLINK_BENCH_QUICK").is_ok_and(|v| v == "1");
        let rounds = env_num("PLINK_BENCH_ROUNDS")?.unwrap_or(if quick { 2 } else { 5 }) as usize;
        let secs = env_num("PLINK_BENCH_SECONDS")?.unwrap_or(if quick { 1 } else { 3 });
        anyhow::ensure!(rounds >= 1, "PLINK_BENCH_ROUNDS must be at least 1");
        anyhow::ensure!(secs >= 1, "PLINK_BENCH_SECONDS must be at least 1");
        // ≥ 1,000,000 runs per path over all rounds in a full run.
        let runs_per_round = if quick {
            50_000
        } else {
            1_000_000u32.div_ceil(rounds as u32).max(200_000)
        };
        Ok(Self {
            quick,
            rounds,
            run: Duration::from_secs(secs),
            runs_per_round,
            scale_flows: if quick {
                vec![1_000, 100_000]
            } else {
                vec![1_000, 100_000, 1_000_000]
            },
        })
    }
}

/// Median, min and max of a sample.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"median": self.median, "min": self.min, "max": self.max})
    }

    /// `median (min–max)` with `digits` decimals, scaled by `scale`.
    pub fn fmt(&self, scale: f64, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median / scale,
            self.min / scale,
            self.max / scale,
            d = digits
        )
    }
}

/// nproc, kernel and CPU model of this machine.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown")
        .to_string();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    serde_json::json!({"nproc": nproc, "kernel": kernel, "cpu_model": model})
}

fn main() -> anyhow::Result<()> {
    netns::require_root_and_tools();
    let settings = Settings::from_env()?;
    let out_dir = std::env::var_os("PLINK_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut machine = machine();
    // The machine may be shared: record how busy it was when we started.
    machine["loadavg_at_start"] = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .into();
    println!("machine: {machine}");
    println!("settings: {settings:?}");
    let started = std::time::Instant::now();

    let mut md = String::new();
    md.push_str(&format!(
        "Machine: {} CPUs ({}), kernel {}. Rounds: {}, live run length: {} s{}.\n\n",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        settings.rounds,
        settings.run.as_secs(),
        if settings.quick { " (--quick)" } else { "" }
    ));

    // PLINK_BENCH_ONLY=perpacket|live|scale runs one part, `proxy` only the
    // per-packet proxy-protocol rows, `ipv6` only the per-packet established
    // rows of both families (development only).
    let only = std::env::var("PLINK_BENCH_ONLY").unwrap_or_default();
    let none = || perpacket::Output {
        markdown: String::new(),
        json: serde_json::Value::Null,
    };
    let pp = if only.is_empty() || only == "perpacket" || only == "proxy" || only == "ipv6" {
        println!("\n=== per-packet cost (BPF_PROG_TEST_RUN)");
        let rows = match only.as_str() {
            "proxy" => perpacket::Only::Proxy,
            "ipv6" => perpacket::Only::Ipv6,
            _ => perpacket::Only::All,
        };
        perpacket::run(&settings, rows).context("per-packet benchmark")?
    } else {
        none()
    };
    md.push_str(&pp.markdown);
    println!("{}", pp.markdown);

    let lv = if only == "scale" {
        live::scale_only(&settings)?
    } else if only.is_empty() || only == "live" {
        println!("\n=== live forwarding through a gateway namespace");
        live::run(&settings).context("live benchmark")?
    } else {
        live::Output {
            markdown: String::new(),
            json: serde_json::Value::Null,
        }
    };
    md.push_str(&lv.markdown);
    println!("{}", lv.markdown);

    let json = serde_json::json!({
        "machine": machine,
        "settings": {
            "quick": settings.quick,
            "rounds": settings.rounds,
            "run_seconds": settings.run.as_secs(),
            "test_runs_per_path_per_round": settings.runs_per_round,
        },
        "per_packet": pp.json,
        "live": lv.json,
        "elapsed_seconds": started.elapsed().as_secs(),
    });
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    md.push_str(&format!(
        "Load average (1, 5, 15 min) at start: {}; at the end: {}.\n",
        machine["loadavg_at_start"].as_str().unwrap_or("?"),
        load_end.trim()
    ));
    let json_path = out_dir.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = out_dir.join("results.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!(
        "\nwrote {} and {} in {} s",
        json_path.display(),
        md_path.display(),
        started.elapsed().as_secs()
    );
    Ok(())
}
