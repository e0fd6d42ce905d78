//! plink's controller as a library: the CLI binary and the integration tests
//! share the config, the model the datapath consumes, the approval workflow
//! and the admin API.

pub mod admin;
pub mod announce;
pub mod approval;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod devstats;
pub mod dplog;
pub mod events;
pub mod fleet;
pub mod flowlog;
pub mod gateway;
pub mod health;
pub mod hostcheck;
pub mod linkwatch;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod plan;
pub mod state;

/// The eBPF object built by `build.rs`, embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/plink"));
