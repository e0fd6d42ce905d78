//! Flow-log checks shared by the end-to-end tests: a real IPFIX collector
//! (nfdump's `nfcapd`) in a test namespace, and the JSON lines file.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde_json::Value;

use crate::netns::{Host, Topology};

/// Fails with what to install when nfdump's tools are missing.
pub fn require_nfdump() {
    for tool in ["nfcapd", "nfdump"] {
        assert!(
            Command::new("which")
                .arg(tool)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false),
            "`{tool}` is missing: run `cargo xtask setup` (installs Debian's nfdump)"
        );
    }
}

/// The records of a JSON flow log (complete lines only: the controller
/// may be writing the last one).
pub fn read_json_lines(path: &Path) -> Vec<Value> {
    crate::logs::read_complete_lines(path)
        .unwrap_or_default()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// A JSON number, or a number in a string (nfdump prints some as strings).
pub fn u(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// nfdump's JSON output of the files in `dir` (1.7: one object per flow,
/// in an array).
pub fn nfdump_records(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let out = Command::new("nfdump")
        .args(["-R"])
        .arg(dir)
        .args(["-o", "json"])
        .output()
        .context("running nfdump")?;
    anyhow::ensure!(
        out.status.success(),
        "nfdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("nfdump -o json printed no JSON: {text}"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// `nfcapd` listening on `addr` in `host`, storing under the topology's
/// scratch directory; stopped (and its file written) by [`Collector::stop`],
/// or killed with the topology.
pub struct Collector {
    child: usize,
    pub store: PathBuf,
}

impl Collector {
    pub fn start(topo: &mut Topology, host: &Host, addr: SocketAddr) -> anyhow::Result<Self> {
        require_nfdump();
        let store = topo.scratch_dir()?.join(format!("nfcapd-{}", addr.port()));
        std::fs::create_dir_all(&store)?;
        let ip = addr.ip().to_string();
        let port = addr.port().to_string();
        let store_arg = store.to_string_lossy().into_owned();
        let args = ["-w", &store_arg, "-b", &ip, "-p", &port, "-t", "3600"];
        let child = topo.spawn(host, "nfcapd", &args)?;
        Ok(Self { child, store })
    }

    /// Stops the collector (it writes its file out) and returns what it
    /// stored, as nfdump reads it.
    pub fn stop(self, topo: &mut Topology) -> anyhow::Result<Vec<Value>> {
        let out = topo.stop(self.child)?;
        let stored = nfdump_records(&self.store)?;
        anyhow::ensure!(
            !stored.is_empty(),
            "nfcapd stored nothing; its stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stored)
    }
}
