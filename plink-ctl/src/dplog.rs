//! The datapath's debug messages (aya-log), forwarded to the controller's
//! log (target `datapath`, level info, so the default filter shows them),
//! and the runtime switch (`plink-ctl debug on|off`): the `DEBUG` map the
//! datapath checks before each message. Off at every start.
use std::{os::fd::AsRawFd, sync::Mutex};

use aya::maps::{Array, MapData};

/// The `DEBUG` map of the running dataplane, once started.
static SWITCH: Mutex<Option<Array<MapData, u32>>> = Mutex::new(None);

/// Re-emits aya-log's records through tracing.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(target: "datapath", "{}", record.args());
    }

    fn flush(&self) {}
}

/// Takes the switch and the message ring out of `ebpf` and starts the
/// thread that forwards messages.
pub fn start(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    use anyhow::Context;
    let map = ebpf
        .take_map(plink_common::map_names::DEBUG)
        .context("the eBPF object has no DEBUG map")?;
    let switch: Array<MapData, u32> = Array::try_from(map)?;
    *SWITCH.lock().unwrap_or_else(|p| p.into_inner()) = Some(switch);
    let mut logger = aya_log::EbpfLogger::init_with_logger(ebpf, Forward)
        .context("opening the datapath's log ring (AYA_LOGS)")?;
    std::thread::Builder::new()
        .name("datapath-log".into())
        .spawn(move || {
            let fd = logger.as_raw_fd();
            loop {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 500) };
                logger.flush();
            }
        })?;
    Ok(())
}

/// Switches the datapath's debug messages on or off.
pub fn set(on: bool) -> anyhow::Result<()> {
    let mut g = SWITCH.lock().unwrap_or_else(|p| p.into_inner());
    let Some(switch) = g.as_mut() else {
        anyhow::bail!("the dataplane is not running in this process");
    };
    switch.set(0, u32::from(on), 0)?;
    Ok(())
}

/// Whether the datapath's debug messages are on.
pub fn get() -> Option<bool> {
    let g = SWITCH.lock().unwrap_or_else(|p| p.into_inner());
    g.as_ref().and_then(|s| s.get(&0, 0).ok()).map(|v| v != 0)
}
