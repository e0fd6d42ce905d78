//! `plink-ctl`: the plink controller.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use plink_ctl::{EBPF_OBJECT, config::Config, dataplane};

/// plink: a Private Link gateway. XDP programs do endpoint DNAT, SNAT and load
/// balancing in the kernel; this controller loads them, fills their maps from
/// a YAML config and runs the approval workflow.
#[derive(Parser)]
#[command(name = "plink-ctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config, load and attach the XDP programs to every interface
    /// it names, and keep running until SIGINT or SIGTERM.
    Run {
        /// The YAML config file.
        #[arg(short, long, default_value = "/etc/plink/plink.yaml")]
        config: PathBuf,
    },
    /// Validate a config file without touching the system. Errors name the
    /// file, line and column.
    Check {
        #[arg(short, long, default_value = "/etc/plink/plink.yaml")]
        config: PathBuf,
    },
    /// Print the per-interface packet counters of the running dataplane.
    Stats {
        #[arg(short, long, default_value = "/etc/plink/plink.yaml")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach the dataplane and remove its bpffs pins.
    Down {
        #[arg(short, long, default_value = "/etc/plink/plink.yaml")]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => {
            Config::load(&config)?;
            println!("{}: OK", config.display());
            Ok(())
        }
        Command::Stats { config, json } => stats(config, json),
        Command::Down { config } => {
            let cfg = Config::load(&config)?;
            if dataplane::remove_pins(&cfg.gateway.bpffs_root)? {
                println!("removed pins under {}", cfg.gateway.bpffs_root.display());
            } else {
                println!("nothing pinned under {}", cfg.gateway.bpffs_root.display());
            }
            Ok(())
        }
    }
}

fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let mut dp = dataplane::Dataplane::load(EBPF_OBJECT, &config.gateway.bpffs_root)?;
    dp.attach_all(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tracing::info!("plink is running; SIGINT or SIGTERM stops the controller");
        // Readiness marker on stdout for supervisors and tests.
        println!("ready");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        anyhow::Ok(())
    })?;
    drop(dp);
    Ok(())
}

fn stats(config_path: PathBuf, json: bool) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let stats = dataplane::read_interface_stats(&config.gateway.bpffs_root)?;
    if json {
        let rows: Vec<_> = stats
            .iter()
            .map(|(index, s)| {
                serde_json::json!({
                    "ifindex": index,
                    "name": dataplane::ifname(*index),
                    "packets": s.packets,
                    "bytes": s.bytes,
                    "ipv4_packets": s.ipv4_packets,
                    "arp_packets": s.arp_packets,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "interfaces": rows }));
    } else {
        println!(
            "{:<16} {:>8} {:>12} {:>14} {:>12} {:>12}",
            "INTERFACE", "IFINDEX", "PACKETS", "BYTES", "IPV4", "ARP"
        );
        for (index, s) in &stats {
            let name = dataplane::ifname(*index).unwrap_or_else(|| "?".into());
            println!(
                "{:<16} {:>8} {:>12} {:>14} {:>12} {:>12}",
                name, index, s.packets, s.bytes, s.ipv4_packets, s.arp_packets
            );
        }
    }
    Ok(())
}
