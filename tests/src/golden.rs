//! Golden-packet harness: run a crafted frame through an XDP program with
//! BPF_PROG_TEST_RUN and get back the verdict and the output frame.
//!
//! BPF_PROG_TEST_RUN resolves the ingress ifindex and does FIB lookups in the
//! caller's network namespace, so callers run inside a test namespace
//! (`Host::run_in`) with the interfaces and neighbours the case needs.

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};

/// XDP verdicts, as the kernel numbers them.
pub mod verdict {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}

/// What one run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpRun {
    pub verdict: u32,
    pub output: Vec<u8>,
}

/// The kernel's `struct xdp_md` as BPF_PROG_TEST_RUN takes it for `ctx_in`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Loads plink's embedded eBPF object without pinning anything.
pub fn load_unpinned() -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .load(plink_ctl::EBPF_OBJECT)
        .context("loading plink's eBPF object")
}

/// Loads (verifies) the named XDP program and returns it.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} not in the object"))?
        .try_into()?;
    if program.fd().is_err() {
        plink_ctl::dataplane::load_verified(program)
            .with_context(|| format!("verifier refused {name}"))?;
    }
    Ok(program)
}

/// Runs `frame` through `program` as if it arrived on `ingress_ifindex`.
pub fn run(program: &Xdp, ingress_ifindex: u32, frame: &[u8]) -> anyhow::Result<XdpRun> {
    let ctx = XdpMd {
        data_end: u32::try_from(frame.len()).context("frame too large")?,
        ingress_ifindex,
        ..Default::default()
    };
    // SAFETY: XdpMd is repr(C) plain integers; viewing it as bytes is sound.
    let ctx_bytes = unsafe {
        std::slice::from_raw_parts(
            (&ctx as *const XdpMd).cast::<u8>(),
            std::mem::size_of::<XdpMd>(),
        )
    };
    // Room for programs that grow the frame (e.g. ICMP errors quoting it).
    let mut out = vec![0u8; frame.len() + 512];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(ctx_bytes),
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(XdpRun {
        verdict: result.return_value,
        output: out,
    })
}
