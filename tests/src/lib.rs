//! Harnesses shared by plink's integration tests.
//!
//! - [`netns`]: network-namespace topologies with RAII teardown.
//! - [`golden`]: running crafted packets through the XDP programs with
//!   BPF_PROG_TEST_RUN inside a test namespace.
//! - [`gateway`]: starting `plink-ctl` in a gateway namespace.
//! - [`fleet`]: several gateways behind an ECMP router, announced by FRR.

pub mod fleet;
pub mod flowlogs;
pub mod gateway;
pub mod golden;
pub mod logs;
pub mod netns;
pub mod packet;
pub mod privatelink;
pub mod proxy;
pub mod servers;
pub mod streams;
