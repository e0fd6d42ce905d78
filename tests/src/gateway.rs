//! Running `plink-ctl` inside a gateway namespace.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};

use crate::netns::{Host, Topology};

/// Path of the `plink-ctl` binary under test: `$PLINK_CTL_BIN`, or the one
/// cargo built next to this test executable.
pub fn plink_ctl_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PLINK_CTL_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/plink-ctl
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("plink-ctl");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p plink-ctl`; `cargo xtask test` does) or set PLINK_CTL_BIN",
        bin.display()
    );
    bin
}

/// The `gateway:` section of a config that keeps every path (pins, admin
/// socket, state) inside the topology's own directories.
pub fn gateway_section(topo: &Topology) -> anyhow::Result<String> {
    let scratch = topo.scratch_dir()?.display().to_string();
    Ok(format!(
        "gateway:\n  bpffs_root: {}\n  admin_socket: {scratch}/admin.sock\n  state_dir: {scratch}/state\n",
        topo.bpffs_root().display()
    ))
}

/// A running `plink-ctl run`, stopped by the topology's drop.
pub struct Gateway {
    pub config_path: PathBuf,
    pub child: usize,
    pub stderr: mpsc::Receiver<String>,
}

/// Writes `config_yaml` next to the topology's pins and starts `plink-ctl run`
/// in `host`, returning once it says it is ready.
pub fn start(topo: &mut Topology, host: &Host, config_yaml: &str) -> anyhow::Result<Gateway> {
    start_with_args(topo, host, config_yaml, &[])
}

/// Like [`start`], with extra arguments to `plink-ctl run`.
pub fn start_with_args(
    topo: &mut Topology,
    host: &Host,
    config_yaml: &str,
    extra: &[&str],
) -> anyhow::Result<Gateway> {
    let config_path = topo.scratch_dir()?.join(format!("{}.yaml", host.name));
    std::fs::write(&config_path, config_yaml)?;
    let bin = plink_ctl_bin();
    let bin = bin.to_str().context("non-UTF-8 binary path")?;
    let config = config_path.to_str().context("non-UTF-8 config path")?;
    let mut args = vec!["run", "--config", config];
    args.extend_from_slice(extra);
    let index = topo.spawn(host, bin, &args)?;
    let child = topo.child_mut(index);
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim() == "ready" {
                let _ = ready_tx.send(());
            }
        }
    });
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[plink-ctl] {line}");
            let _ = err_tx.send(line);
        }
    });
    match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(()) => Ok(Gateway {
            config_path,
            child: index,
            stderr: err_rx,
        }),
        Err(_) => {
            // The process may have exited: drain its stderr until it closes
            // (bounded), so the failure says why.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut log = Vec::new();
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                match err_rx.recv_timeout(left) {
                    Ok(line) => log.push(line),
                    Err(_) => break,
                }
            }
            bail!("plink-ctl did not become ready:\n{}", log.join("\n"))
        }
    }
}

impl Gateway {
    /// Scrapes `/metrics` of the plink running in `host` (default address).
    pub fn scrape(&self, host: &Host) -> anyhow::Result<String> {
        host.run_in(|| -> anyhow::Result<String> {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9430")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: plink\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
            if !head.starts_with("HTTP/1.1 200") {
                bail!("scrape failed: {head}");
            }
            Ok(body.to_owned())
        })?
    }

    /// One sample's value from a scrape: `name{labels}` exactly as printed.
    pub fn sample(scrape: &str, series: &str) -> u64 {
        scrape
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .map(|v| v as u64)
            .unwrap_or(0)
    }

    /// plink_drops_total for `reason`.
    pub fn drops(scrape: &str, reason: &str) -> u64 {
        Self::sample(scrape, &format!("plink_drops_total{{reason=\"{reason}\"}}"))
    }

    /// Runs `plink-ctl ARGS --config <this config>` in `host` and returns stdout.
    pub fn ctl(&self, host: &Host, args: &[&str]) -> anyhow::Result<String> {
        let bin = plink_ctl_bin();
        let mut full: Vec<&str> = args.to_vec();
        let config = self.config_path.to_str().ok_or_else(|| anyhow!("path"))?;
        full.extend_from_slice(&["--config", config]);
        host.exec(bin.to_str().ok_or_else(|| anyhow!("path"))?, &full)
    }
}
