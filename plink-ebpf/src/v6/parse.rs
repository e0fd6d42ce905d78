//! IPv6 header parsing: a fixed 40-byte header followed directly by TCP,
//! UDP or ICMPv6 (extension headers are refused, so L4 starts at byte 54).
use aya_ebpf::programs::XdpContext;
use plink_common::{Addr, DropReason, IPPROTO_TCP, IPPROTO_UDP, addr_is_ambiguous_v6};

use crate::parse::{ETH_LEN, load, ptr_at};

pub use plink_common::IPPROTO_ICMPV6;
pub const IP6_OFF: usize = ETH_LEN;
pub const IP6_LEN: usize = 40;
pub const L4_OFF: usize = IP6_OFF + IP6_LEN;
/// Offsets inside the IPv6 header.
pub const IP6_HOP: usize = IP6_OFF + 7;
pub const IP6_SADDR: usize = IP6_OFF + 8;
pub const IP6_DADDR: usize = IP6_OFF + 24;
pub const TCP_CHECK: usize = L4_OFF + 16;
pub const UDP_CHECK: usize = L4_OFF + 6;
pub const ICMP6_CHECK: usize = L4_OFF + 2;
/// Echo identifier: translated like a port.
pub const ICMP6_ID: usize = L4_OFF + 4;

/// ICMPv6 types plink handles.
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;

/// What the datapath needs from an IPv6 TCP/UDP/ICMPv6 packet; addresses
/// and ports raw (network order). Echo is keyed like a port, as in IPv4
/// (`parse::Flow`).
#[derive(Clone, Copy)]
pub struct Flow6 {
    pub src: Addr,
    pub dst: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// TCP flags, or the ICMPv6 type.
    pub tcp_flags: u8,
    pub hop: u8,
    /// IPv6 header plus payload: the byte count of counters (as IPv4's
    /// total length) and the length FIB lookups check against the MTU.
    pub tot_len: u16,
}

/// Next-header values of the IPv6 extension headers (RFC 8200 4, RFC 7045):
/// hop-by-hop, routing, fragment, destination options, AH, ESP, mobility,
/// HIP, shim6.
#[inline(always)]
fn is_extension_header(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 60 | 51 | 50 | 135 | 139 | 140)
}

/// Parses the frame's IPv6 header and L4 ports. Refuses extension headers,
/// truncated packets, a UDP checksum of zero (mandatory in IPv6) and
/// addresses that would read as IPv4 ones (`Addr`); an unspecified source
/// is let through for neighbour solicitations only (duplicate address
/// detection), which the caller answers without a flow.
#[inline(always)]
pub fn parse_ipv6(ctx: &XdpContext) -> Result<Flow6, DropReason> {
    let Some(ip) = ptr_at::<[u8; 8]>(ctx, IP6_OFF) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let plen = u16::from_be_bytes([ip[4], ip[5]]);
    let proto = ip[6];
    let hop = ip[7];
    let l4_min = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        IPPROTO_ICMPV6 => 8,
        nh if is_extension_header(nh) => return Err(DropReason::Ipv6ExtensionHeader),
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    // The payload must hold the L4 header and fit in the frame (trailing
    // Ethernet padding allowed); a jumbogram (length 0) is refused with it.
    let frame_payload = (ctx.data_end() - ctx.data()).saturating_sub(L4_OFF);
    if (plen as usize) < l4_min || plen as usize > frame_payload {
        return Err(DropReason::Malformed);
    }
    let (Some(src), Some(dst)) = (load::<Addr>(ctx, IP6_SADDR), load::<Addr>(ctx, IP6_DADDR))
    else {
        return Err(DropReason::Malformed);
    };
    let Some(h) = load::<[u16; 4]>(ctx, L4_OFF) else {
        return Err(DropReason::Malformed);
    };
    let mut ports = [h[0], h[1]];
    let mut tcp_flags = 0;
    if proto == IPPROTO_ICMPV6 {
        tcp_flags = h[0].to_ne_bytes()[0];
        ports = match tcp_flags {
            ICMP6_ECHO_REQUEST => [h[2], 0],
            ICMP6_ECHO_REPLY => [0, h[2]],
            _ => [0, 0],
        };
    } else if proto == IPPROTO_TCP {
        let Some(f) = load::<u8>(ctx, L4_OFF + 13) else {
            return Err(DropReason::Malformed);
        };
        if ptr_at::<u16>(ctx, TCP_CHECK).is_none() {
            return Err(DropReason::Malformed);
        }
        tcp_flags = f;
    } else if h[3] == 0 {
        // UDP checksum (bytes 6..8): zero is invalid over IPv6 (RFC 8200 8.1).
        return Err(DropReason::Malformed);
    }
    let dad = proto == IPPROTO_ICMPV6 && tcp_flags == ND_NEIGHBOR_SOLICIT && src == [0; 4];
    if addr_is_ambiguous_v6(&dst) || (addr_is_ambiguous_v6(&src) && !dad) {
        return Err(DropReason::Ipv6AddressReserved);
    }
    Ok(Flow6 {
        src,
        dst,
        sport_be: ports[0],
        dport_be: ports[1],
        proto,
        tcp_flags,
        hop,
        tot_len: plen.wrapping_add(IP6_LEN as u16),
    })
}

/// Whom the frame's destination MAC names (`parse::addressed_to_us` for
/// IPv6, where neighbour solicitations go to 33:33:xx:xx:xx:xx).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DstMac {
    /// This interface.
    Us,
    /// IPv6 multicast.
    Multicast,
    /// Another host (or a runt frame).
    Other,
}

#[inline(always)]
pub fn dst_mac(ctx: &XdpContext, mac: &[u8; 6]) -> DstMac {
    // One bounds check and two word reads: separate loads, each an Option,
    // let LLVM test a register it had not set on every path.
    let Some(p) = ptr_at::<[u8; 6]>(ctx, 0) else {
        return DstMac::Other;
    };
    // SAFETY: bounds checked by ptr_at.
    let (hi, lo) = unsafe {
        (
            p.cast::<u32>().read_unaligned(),
            p.cast::<u8>().add(4).cast::<u16>().read_unaligned(),
        )
    };
    let [a, b, c, d, e, f] = *mac;
    if hi == u32::from_ne_bytes([a, b, c, d]) && lo == u16::from_ne_bytes([e, f]) {
        DstMac::Us
    } else if hi.to_ne_bytes()[0] == 0x33 && hi.to_ne_bytes()[1] == 0x33 {
        DstMac::Multicast
    } else {
        DstMac::Other
    }
}
