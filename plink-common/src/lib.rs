//! Keys and values that cross the kernel boundary.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a compile-time
//! size assertion, so the eBPF object and the controller always agree on the
//! layout. Fields in network byte order carry a `_be` suffix.
#![no_std]

/// Version of the map layout. Pins live under `/sys/fs/bpf/plink/v<LAYOUT_VERSION>/`
/// so that an incompatible build never adopts maps it cannot read.
pub const LAYOUT_VERSION: u32 = 1;

/// Maximum number of interfaces XDP may be attached to.
pub const MAX_INTERFACES: u32 = 64;

/// Names of the maps, shared so userspace never spells one differently.
pub mod map_names {
    pub const IF_STATS: &str = "IF_STATS";
}

/// Names of the XDP programs, one per interface role.
pub mod prog_names {
    pub const CONSUMER: &str = "plink_consumer";
    pub const PROVIDER: &str = "plink_provider";
}

/// Per-interface, per-CPU packet counters (value of `IF_STATS`, keyed by ifindex).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    /// Every frame XDP saw on this interface.
    pub packets: u64,
    /// Bytes of every frame XDP saw (link-layer length).
    pub bytes: u64,
    /// Frames that carried IPv4.
    pub ipv4_packets: u64,
    /// Frames that carried ARP.
    pub arp_packets: u64,
}
const _: () = assert!(core::mem::size_of::<IfStats>() == 32);

impl IfStats {
    /// Sums per-CPU values into one total.
    pub fn add(&mut self, other: &IfStats) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.ipv4_packets = self.ipv4_packets.wrapping_add(other.ipv4_packets);
        self.arp_packets = self.arp_packets.wrapping_add(other.arp_packets);
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding bytes left implicit, every bit pattern valid.
    unsafe impl aya::Pod for super::IfStats {}
}
