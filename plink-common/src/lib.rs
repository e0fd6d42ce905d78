//! Keys and values that cross the kernel boundary.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a compile-time
//! size assertion, so the eBPF object and the controller always agree on the
//! layout. Fields in network byte order carry a `_be` suffix. Addresses are
//! [`Addr`]: four big-endian words so IPv6 fits later; IPv4 lives in word 0 and
//! the other words are zero.
//!
//! The pure functions (flow hash, expiry rule, checksum arithmetic) are here so
//! that the datapath and the controller compute exactly the same thing.
#![no_std]

pub mod csum;
pub mod proxy;

/// Version of the map layout. Pins live under `/sys/fs/bpf/plink/v<LAYOUT_VERSION>/`
/// so that an incompatible build never adopts maps it cannot read.
pub const LAYOUT_VERSION: u32 = 9;

/// Maximum number of interfaces XDP may be attached to.
pub const MAX_INTERFACES: u32 = 64;
/// Endpoint ids are `0..MAX_ENDPOINTS` (indexes of the per-endpoint arrays).
pub const MAX_ENDPOINTS: u32 = 4096;
/// Service ids are `0..MAX_SERVICES`.
pub const MAX_SERVICES: u32 = 256;
/// Backend ids are `0..MAX_BACKENDS`, unique across services.
pub const MAX_BACKENDS: u32 = 4096;
/// NAT address slots per service.
pub const MAX_NAT_SLOTS: usize = 8;
/// NAT address counters: `service_id * MAX_NAT_SLOTS + slot`.
pub const MAX_NAT_COUNTERS: u32 = MAX_SERVICES * MAX_NAT_SLOTS as u32;
/// Ports probed (bounded) when allocating a NAT port for a new flow.
pub const NAT_PORT_PROBES: u32 = 32;
/// Default entries of the conntrack maps (flows; each flow has one forward,
/// one reverse and one NAT-port entry).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Default entries of the backend lookup table shared by all services.
pub const DEFAULT_LB_TABLE_ENTRIES: u32 = 65_537 * 16;
/// Backend id stored in lookup-table slots that have no backend.
pub const NO_BACKEND: u32 = u32::MAX;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// ICMP types plink translates.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACH: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// Destination-unreachable code "fragmentation needed and DF set".
    pub const CODE_FRAG_NEEDED: u8 = 4;
}

/// Names of the maps, shared so userspace never spells one differently.
pub mod map_names {
    pub const IF_STATS: &str = "IF_STATS";
    pub const INTERFACES: &str = "INTERFACES";
    pub const GLOBAL: &str = "GLOBAL";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const ARP_ENDPOINTS: &str = "ARP_ENDPOINTS";
    pub const NAT_ADDRS: &str = "NAT_ADDRS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const LB_TABLE: &str = "LB_TABLE";
    pub const CT_FWD: &str = "CT_FWD";
    pub const CT_REV: &str = "CT_REV";
    pub const NAT_PORTS: &str = "NAT_PORTS";
    pub const EP_LIMITS: &str = "EP_LIMITS";
    pub const EP_GC_FREED: &str = "EP_GC_FREED";
    pub const EP_GEN: &str = "EP_GEN";
    pub const EP_STATS: &str = "EP_STATS";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const NAT_STATS: &str = "NAT_STATS";
    pub const DROPS: &str = "DROPS";
    pub const EP_DROPS: &str = "EP_DROPS";
    /// PROXY protocol v2 headers, by endpoint id.
    pub const PROXY_HEADERS: &str = "PROXY_HEADERS";
    /// The IPv6 programs (`v6_prog` slots), filled by the controller after
    /// loading; not pinned (program fds, filled again at every start).
    pub const V6_PROGS: &str = "V6_PROGS";
    /// Flow-log ring buffer (not pinned: a new controller reads a new ring).
    pub const FLOW_LOG: &str = "FLOW_LOG";
    /// Flow-log records lost to a full ring, per CPU (not pinned).
    pub const FLOW_LOG_LOST: &str = "FLOW_LOG_LOST";
    /// Datapath debug messages on / off (one u32; not pinned: off at start).
    pub const DEBUG: &str = "DEBUG";

    /// Every map, in the order the controller pins them.
    pub const ALL: &[&str] = &[
        IF_STATS,
        INTERFACES,
        GLOBAL,
        ENDPOINTS,
        ARP_ENDPOINTS,
        NAT_ADDRS,
        SERVICES,
        BACKENDS,
        LB_TABLE,
        CT_FWD,
        CT_REV,
        NAT_PORTS,
        EP_LIMITS,
        EP_GC_FREED,
        EP_GEN,
        EP_STATS,
        SVC_STATS,
        BACKEND_STATS,
        NAT_STATS,
        DROPS,
        EP_DROPS,
        PROXY_HEADERS,
    ];
}

/// Names of the XDP programs, one per interface role.
pub mod prog_names {
    pub const CONSUMER: &str = "plink_consumer";
    pub const PROVIDER: &str = "plink_provider";
    /// Passes everything: enables NAPI on the far end of a veth pair.
    pub const PASS: &str = "plink_pass";
    /// The minimal forwarder `cargo xtask bench` compares plink against;
    /// never attached by `plink-ctl`.
    pub const BENCH_FWD: &str = "plink_bench_fwd";
    /// The IPv6 halves of the consumer and provider programs, reached by a
    /// tail call (slot [`v6_prog::CONSUMER`] / [`v6_prog::PROVIDER`] of the
    /// `V6_PROGS` program array) so that each has its own 512-byte stack and
    /// verifier budget.
    pub const CONSUMER6: &str = "plink_consumer6";
    pub const PROVIDER6: &str = "plink_provider6";
    /// ICMP errors about NAT64 flows' packets, translated to ICMPv6: a
    /// tail call of `plink_provider` (slot [`v6_prog::NAT64_ERROR`]) for
    /// a stack of its own.
    pub const NAT64_ERROR: &str = "plink_nat64_error";
}

/// Slots of the `V6_PROGS` program array (`map_names::V6_PROGS`).
pub mod v6_prog {
    pub const CONSUMER: u32 = 0;
    pub const PROVIDER: u32 = 1;
    pub const NAT64_ERROR: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// An address: four words in network byte order (the bytes as on the
/// wire). IPv4 is word 0 with the other words zero; IPv6 is all four.
///
/// The two cannot collide: an IPv6 address whose last 96 bits are zero has
/// a zero interface identifier (a Subnet-Router anycast address, RFC 4291
/// 2.6.1), never a host's; the controller refuses such addresses in its
/// configuration and the datapath drops IPv6 packets from or to one
/// ([`addr_is_ambiguous_v6`]), so an [`Addr`] names one family's address.
pub type Addr = [u32; 4];

/// The [`Addr`] of an IPv6 address given as its sixteen octets.
#[inline(always)]
pub const fn v6(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Would this IPv6 address (as an [`Addr`]) read as an IPv4 one? See [`Addr`].
#[inline(always)]
pub const fn addr_is_ambiguous_v6(a: &Addr) -> bool {
    a[1] == 0 && a[2] == 0 && a[3] == 0
}

/// The [`Addr`] of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn v4_be(addr_be: u32) -> Addr {
    [addr_be, 0, 0, 0]
}

/// The [`Addr`] of an IPv4 address given as its four octets.
#[inline(always)]
pub const fn v4(octets: [u8; 4]) -> Addr {
    v4_be(u32::from_ne_bytes(octets))
}

mod config;
mod conntrack;
mod counters;
mod flowlog;
mod hash;
mod iface;

pub use config::*;
pub use conntrack::*;
pub use counters::*;
pub use flowlog::*;
pub use hash::*;
pub use iface::*;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C) with all padding spelled out as fields, so
    // every byte is initialised and every bit pattern is valid.
    unsafe impl aya::Pod for IfStats {}
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for NetAddrKey {}
    unsafe impl aya::Pod for NatAddrInfo {}
    unsafe impl aya::Pod for ServiceConfig {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for CtFwdKey {}
    unsafe impl aya::Pod for CtFwdValue {}
    unsafe impl aya::Pod for CtRevKey {}
    unsafe impl aya::Pod for NatPortKey {}
    unsafe impl aya::Pod for CtOwner {}
    unsafe impl aya::Pod for EpLimitState {}
    unsafe impl aya::Pod for EndpointGen {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for FlowLogRecord {}
    unsafe impl aya::Pod for proxy::ProxyHeader {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    /// Fills a full-size port range with flows of pseudo-random hashes until
    /// the first allocation fails. With 32 independent probes the first
    /// failure is expected near 80% (where the chances 0.8^32 summed over the
    /// allocations reach one); linear probing failed near 55%.
    #[test]
    fn nat_probing_fills_most_of_a_large_range() {
        let (min, max) = (1024u16, 65535u16);
        let range = usize::from(max - min) + 1;
        let mut taken = vec![false; range];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for used in 0..range {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let hash = (state >> 32) as u32;
            let free = (0..NAT_PORT_PROBES)
                .map(|i| usize::from(nat_probe_port(hash, i, min, max) - min))
                .find(|&p| !taken[p]);
            match free {
                Some(p) => taken[p] = true,
                None => {
                    assert!(
                        used * 4 >= range * 3,
                        "allocation failed with {used} of {range} ports taken"
                    );
                    return;
                }
            }
        }
    }

    #[test]
    fn nat_probes_are_distinct_for_every_stride_and_range() {
        // The stride depends on the hash only through its selector (five
        // bits) and the skip over primes dividing the range: hashes that
        // hit each selector with each offset class cover every stride.
        let mut hashes: Vec<u32> = Vec::new();
        let mut h: u32 = 1;
        while hashes.len() < 1024 {
            h = h.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            hashes.push(h);
        }
        let selectors: std::collections::BTreeSet<u32> = hashes
            .iter()
            .map(|h| h.wrapping_mul(0x9E37_79B1) >> 27)
            .collect();
        assert_eq!(selectors.len(), 32, "the hashes reach every stride");
        let mut ranges: Vec<u32> = (2..=400).collect();
        // Ranges made of the table's own primes, odd and even.
        ranges.extend([
            37 * 101,
            37 * 101 * 2,
            401 * 101,
            37 * 41 * 43,
            65_536,
            65_535,
        ]);
        for range in ranges {
            let min = (65_536 - range).min(1024) as u16;
            let max = (min as u32 + range - 1) as u16;
            let probes = NAT_PORT_PROBES.min(range);
            for &hash in &hashes {
                let mut seen = std::collections::BTreeSet::new();
                for i in 0..probes {
                    let port = nat_probe_port(hash, i, min, max);
                    assert!((min..=max).contains(&port));
                    seen.insert(port);
                }
                assert_eq!(
                    seen.len() as u32,
                    probes,
                    "range {range}, hash {hash:#x}: stride {}",
                    nat_probe_stride(hash, range)
                );
            }
        }
    }

    #[test]
    fn nat_probing_finds_the_last_free_port_of_a_small_range() {
        for range in 1..=NAT_PORT_PROBES as u16 {
            for hash in [0, 1, 0xdead_beef, u32::MAX] {
                for free in 0..range {
                    let found = (0..NAT_PORT_PROBES)
                        .any(|i| nat_probe_port(hash, i, 2000, 2000 + range - 1) == 2000 + free);
                    assert!(
                        found,
                        "range {range}, hash {hash:#x}: port {free} never probed"
                    );
                }
            }
        }
    }

    #[test]
    fn drop_reason_names_are_unique_snake_case() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            assert_eq!(DropReason::from_index(i as u32), Some(*r));
            assert!(
                r.name()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            );
            for other in &DropReason::ALL[..i] {
                assert_ne!(other.name(), r.name());
            }
        }
        assert_eq!(DropReason::from_index(DropReason::COUNT), None);
    }

    #[test]
    fn expiry_rule() {
        let t = Timeouts::default();
        let slack = LAST_SEEN_SLACK_NS;
        let mut v = CtFwdValue {
            proto: IPPROTO_UDP,
            last_seen_ns: 1000,
            ..Default::default()
        };
        assert!(!flow_expired(&v, 1000 + t.udp_ns + slack, &t));
        assert!(flow_expired(&v, 1001 + t.udp_ns + slack, &t));
        // Refreshed by another CPU after `now` was read.
        assert!(!flow_expired(&v, 999, &t));
        v.proto = IPPROTO_TCP;
        v.tcp_state = tcp_state::SYN_SENT;
        assert!(flow_expired(&v, 1001 + t.tcp_transitory_ns + slack, &t));
        v.tcp_state = tcp_state::ESTABLISHED;
        assert!(!flow_expired(&v, 1001 + t.tcp_transitory_ns + slack, &t));
        assert_eq!(t.tcp_established_ns, 7440 * 1_000_000_000);
    }

    #[test]
    fn last_seen_is_written_once_per_tick_and_never_backwards() {
        assert!(!last_seen_moved(1000, 1000 + LAST_SEEN_TICK_NS));
        assert!(last_seen_moved(1000, 1001 + LAST_SEEN_TICK_NS));
        assert!(!last_seen_moved(5 * LAST_SEEN_TICK_NS, 1000));
        // A flow whose last write lags by a whole tick still is not expired
        // by the GC's clock (the slack covers the tick and the coarse clock).
        let t = Timeouts::default();
        let v = CtFwdValue {
            proto: IPPROTO_UDP,
            last_seen_ns: 1000,
            ..Default::default()
        };
        assert!(!flow_expired(&v, 1000 + LAST_SEEN_TICK_NS + t.udp_ns, &t));
    }

    #[test]
    fn flow_hash_depends_on_network() {
        let a = CtFwdKey {
            src_addr_be: v4([192, 0, 2, 1]),
            dst_addr_be: v4([192, 0, 2, 50]),
            network_id: 1,
            src_port_be: 1234u16.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let b = CtFwdKey { network_id: 2, ..a };
        assert_ne!(flow_hash(&a), flow_hash(&b));
        assert_eq!(flow_hash(&a), flow_hash(&a.clone()));
    }
}
