//! Header parsing with the bounds checks the verifier wants.
//!
//! Offsets are fixed: plink handles IPv4 without options only (options are
//! dropped with a reason on the consumer side), so L4 starts at byte 34.
use aya_ebpf::programs::XdpContext;
use plink_common::{DropReason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IfaceInfo, icmp_type};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IP_OFF: usize = ETH_LEN;
pub const IP_LEN: usize = 20;
pub const L4_OFF: usize = IP_OFF + IP_LEN;
/// Offsets inside the IPv4 header.
pub const IP_TTL: usize = IP_OFF + 8;
pub const IP_CHECK: usize = IP_OFF + 10;
pub const IP_SADDR: usize = IP_OFF + 12;
pub const IP_DADDR: usize = IP_OFF + 16;
pub const TCP_CHECK: usize = L4_OFF + 16;
pub const UDP_CHECK: usize = L4_OFF + 6;
pub const ICMP_CHECK: usize = L4_OFF + 2;
/// Echo identifier: translated like a port.
pub const ICMP_ID: usize = L4_OFF + 4;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Returns a pointer to a `T` at `offset`, or `None` when the frame is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` at `offset` (no alignment assumed).
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    Some(unsafe { p.read_unaligned() })
}

/// Writes a `T` at `offset` (no alignment assumed); false when out of bounds.
#[inline(always)]
pub fn store<T: Copy>(ctx: &XdpContext, offset: usize, v: T) -> bool {
    match ptr_at::<T>(ctx, offset) {
        Some(p) => {
            // SAFETY: bounds checked by ptr_at.
            unsafe { p.write_unaligned(v) };
            true
        }
        None => false,
    }
}

/// Is the frame addressed to this interface's MAC (or, for ARP, broadcast)?
/// Frames for other hosts reach XDP on veth and on promiscuous NICs; the
/// kernel would drop them (PACKET_OTHERHOST), and plink must not forward or
/// answer them either. `iface` is the ingress interface's `INTERFACES`
/// entry; without one of this role the frame passes this step and the next
/// one counts it.
#[inline(always)]
pub fn addressed_to_us(
    ctx: &XdpContext,
    iface: Option<&IfaceInfo>,
    role: u8,
    ether_type: u16,
) -> bool {
    // Compared as a 4- and a 2-byte word: a 6-byte array in a 64-bit
    // register leaves LLVM two undefined bytes, which the verifier rejects.
    let (Some(dst_hi), Some(dst_lo)) = (load::<u32>(ctx, 0), load::<u16>(ctx, 4)) else {
        return false;
    };
    if ether_type == ETH_P_ARP && dst_hi == u32::MAX && dst_lo == u16::MAX {
        return true;
    }
    match iface {
        Some(i) if i.role == role => {
            let [a, b, c, d, e, f] = i.mac;
            u32::from_ne_bytes([a, b, c, d]) == dst_hi && u16::from_ne_bytes([e, f]) == dst_lo
        }
        _ => true,
    }
}

/// The EtherType in host order, or `None` for a runt frame.
#[inline(always)]
pub fn ether_type(ctx: &XdpContext) -> Option<u16> {
    load::<u16>(ctx, 12).map(u16::from_be)
}

/// What the datapath needs from an IPv4 TCP/UDP/ICMP packet. Addresses and
/// ports are raw (network byte order).
///
/// ICMP echo is keyed like a port: a request carries its identifier as the
/// source "port" (destination 0), a reply as the destination "port" (source
/// 0), so requests and replies hit the same forward and reverse entries as
/// any flow. Other ICMP types carry 0 in both.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// TCP flags, or the ICMP type.
    pub tcp_flags: u8,
    pub ttl: u8,
    /// IP total length: the byte count of counters.
    pub tot_len: u16,
}

/// Why an IPv4 packet could not be parsed into a [`Flow`].
#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext) -> Result<Flow, DropReason> {
    let Some(ip) = ptr_at::<[u8; IP_LEN]>(ctx, IP_OFF) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    if ip[0] & 0x0f != 5 {
        return Err(DropReason::IpOptions);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    // More-fragments set or a non-zero offset: no L4 header to place it by.
    if (ip[6] & 0x3f) != 0 || ip[7] != 0 {
        return Err(DropReason::Fragment);
    }
    let proto = ip[9];
    let l4_min = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        IPPROTO_ICMP => 8,
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    // The IP length must cover the L4 header and fit in the frame (trailing
    // Ethernet padding is allowed): a truncated packet never gets rewritten.
    let frame_ip_len = ctx.data_end() - ctx.data() - IP_OFF;
    if (tot_len as usize) < IP_LEN + l4_min || tot_len as usize > frame_ip_len {
        return Err(DropReason::Malformed);
    }
    let Some(ports) = load::<[u16; 2]>(ctx, L4_OFF) else {
        return Err(DropReason::Malformed);
    };
    let mut tcp_flags = 0;
    let mut ports = ports;
    if proto == IPPROTO_ICMP {
        // Type, code, checksum and the echo identifier: all in the 8 bytes checked.
        let Some(h) = load::<[u16; 4]>(ctx, L4_OFF) else {
            return Err(DropReason::Malformed);
        };
        tcp_flags = h[0].to_ne_bytes()[0];
        ports = match tcp_flags {
            icmp_type::ECHO_REQUEST => [h[2], 0],
            icmp_type::ECHO_REPLY => [0, h[2]],
            _ => [0, 0],
        };
    } else if proto == IPPROTO_TCP {
        let Some(f) = load::<u8>(ctx, L4_OFF + 13) else {
            return Err(DropReason::Malformed);
        };
        // The checksum we update must be inside the frame.
        if ptr_at::<u16>(ctx, TCP_CHECK).is_none() {
            return Err(DropReason::Malformed);
        }
        tcp_flags = f;
    } else if ptr_at::<u16>(ctx, UDP_CHECK).is_none() {
        return Err(DropReason::Malformed);
    }
    Ok(Flow {
        src_be: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst_be: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport_be: ports[0],
        dport_be: ports[1],
        proto,
        tcp_flags,
        ttl: ip[8],
        tot_len,
    })
}
