//! Interfaces: per-interface counters, roles and what the datapath knows of each.

/// XDP verdicts in the order of `xdp_action` (index of [`IfStats::verdicts`]).
pub const XDP_VERDICT_NAMES: [&str; 5] = ["aborted", "drop", "pass", "tx", "redirect"];

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
    /// Frames that carried IPv6 (handled by the IPv6 programs).
    pub ipv6_packets: u64,
    /// Frames by the verdict the program returned, indexed by `xdp_action`
    /// (names in [`XDP_VERDICT_NAMES`]); they add up to `packets`.
    pub verdicts: [u64; 5],
}
const _: () = assert!(core::mem::size_of::<IfStats>() == 80);

impl IfStats {
    /// Sums per-CPU values into one total.
    pub fn add(&mut self, other: &IfStats) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.ipv4_packets = self.ipv4_packets.wrapping_add(other.ipv4_packets);
        self.arp_packets = self.arp_packets.wrapping_add(other.arp_packets);
        self.ipv6_packets = self.ipv6_packets.wrapping_add(other.ipv6_packets);
        for (mine, theirs) in self.verdicts.iter_mut().zip(other.verdicts) {
            *mine = mine.wrapping_add(theirs);
        }
    }
}

/// Role of an interface (`IfaceInfo::role`).
pub mod role {
    pub const CONSUMER: u8 = 1;
    pub const PROVIDER: u8 = 2;
}

/// Bits of `IfaceInfo::flags`.
pub mod iface_flags {
    /// Send frames plink answers itself (ARP replies, ICMP errors) with a
    /// redirect to the ingress interface instead of XDP_TX. On veth, XDP_TX
    /// wakes the peer only when the peer runs an XDP program; a redirect
    /// (`ndo_xdp_xmit`) wakes it whenever it has NAPI, GRO included.
    pub const ANSWER_BY_REDIRECT: u8 = 1;
}

/// Value of `INTERFACES`, keyed by ifindex (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// Consumer network id (consumer interfaces only).
    pub network_id: u32,
    /// The interface's own MAC: source of ARP replies and forwarded frames.
    pub mac: [u8; 6],
    /// [`role`] constant.
    pub role: u8,
    /// [`iface_flags`] bits.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 12);
