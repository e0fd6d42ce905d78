//! plink's controller as a library: the CLI binary and the integration tests
//! share the config model and the dataplane loader.

pub mod config;
pub mod dataplane;
pub mod maglev;

/// The eBPF object built by `build.rs`, embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/plink"));
