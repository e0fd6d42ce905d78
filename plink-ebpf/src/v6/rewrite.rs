//! NAT66 rewrite of an IPv6 TCP/UDP/ICMPv6-echo packet in place: addresses,
//! ports (or the echo identifier), hop limit and the L4 checksum, updated
//! incrementally over the pseudo-header's 128-bit addresses (RFC 1624).
//! IPv6 has no header checksum.
use aya_ebpf::programs::XdpContext;
use plink_common::{Addr, IPPROTO_TCP, IPPROTO_UDP, csum};

use super::parse::{
    Flow6, ICMP6_CHECK, ICMP6_ID, IP6_DADDR, IP6_HOP, IP6_SADDR, L4_OFF, TCP_CHECK, UDP_CHECK,
};
use crate::parse::{load, store};

/// New addresses, ports (raw, network order) and link-layer addresses.
pub struct Nat6 {
    pub src: Addr,
    pub dst: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Rewrites the packet parsed as `f` (the caller checked `f.hop > 1`).
/// Returns false if the frame is shorter than `parse_ipv6` promised (never).
#[inline(always)]
pub fn rewrite6(ctx: &XdpContext, f: &Flow6, n: &Nat6) -> bool {
    let check_off = match f.proto {
        IPPROTO_TCP => TCP_CHECK,
        IPPROTO_UDP => UDP_CHECK,
        _ => ICMP6_CHECK,
    };
    let Some(check) = load::<u16>(ctx, check_off) else {
        return false;
    };
    // ICMPv6, unlike ICMP, covers the pseudo-header: addresses change it
    // for every protocol.
    let mut c = csum::update128(check, &f.src, &n.src);
    c = csum::update128(c, &f.dst, &n.dst);
    let ports_ok = if f.proto == IPPROTO_TCP || f.proto == IPPROTO_UDP {
        c = csum::update16(c, f.sport_be, n.sport_be);
        c = csum::update16(c, f.dport_be, n.dport_be);
        if f.proto == IPPROTO_UDP {
            // The original is never 0 (refused by the parser).
            c = csum::udp_finish(check, c);
        }
        store::<[u16; 2]>(ctx, L4_OFF, [n.sport_be, n.dport_be])
    } else {
        // Echo: the identifier is whichever "port" is non-zero.
        let (old_id, new_id) = (f.sport_be | f.dport_be, n.sport_be | n.dport_be);
        c = csum::update16(c, old_id, new_id);
        store::<u16>(ctx, ICMP6_ID, new_id)
    };
    ports_ok
        && store::<[u8; 6]>(ctx, 0, n.dmac)
        && store::<[u8; 6]>(ctx, 6, n.smac)
        && store::<u8>(ctx, IP6_HOP, f.hop - 1)
        && store::<Addr>(ctx, IP6_SADDR, n.src)
        && store::<Addr>(ctx, IP6_DADDR, n.dst)
        && store::<u16>(ctx, check_off, c)
}
