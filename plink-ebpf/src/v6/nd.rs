//! Neighbour discovery (RFC 4861): Neighbor Solicitations for endpoint
//! addresses (consumer side) and NAT addresses (provider side) are answered
//! with a Neighbor Advertisement built in place and sent back out of the
//! ingress interface (`answer::back_out`), as `arp.rs` does for IPv4.
use aya_ebpf::{helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext};
use plink_common::{
    Addr, DropReason, IfaceInfo, NetAddrKey, addr_is_ambiguous_v6, nat_addr_flags, role, v6,
};

use super::parse::{Flow6, IPPROTO_ICMPV6, L4_OFF, ND_NEIGHBOR_ADVERT};
use crate::{
    maps::{ARP_ENDPOINTS, NAT_ADDRS},
    parse::{load, ptr_at},
    stats::{self, NO_EP},
    step::Step,
};

/// Ethernet + IPv6 + the advertisement with its target link-layer option.
const NA_FRAME_LEN: usize = L4_OFF + 32;
/// Neighbor Advertisement flags (first byte of the reserved word).
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// ff02::1, where the answer to a duplicate address detection probe goes.
const ALL_NODES: Addr = v6([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// Answers the Neighbor Solicitation `f` arrived as on an interface of
/// `role_of` (`iface`): `NEXT` when the target is none of ours (the caller
/// decides: a drop on consumer interfaces, the kernel's on the provider),
/// else the verdict (answer sent, or a counted drop of a malformed one).
#[inline(never)]
pub fn solicitation(ctx: XdpContext, f: &Flow6, iface: &IfaceInfo, role_of: u32) -> Step {
    // RFC 4861 7.1.1: hop limit 255 (never forwarded), code 0, at least the
    // target address.
    // Checked one at a time: a combined Option let LLVM test a register it
    // had not set on every path, which the verifier rejects.
    if f.hop != 255 || f.tot_len < (40 + 24) {
        return Step::drop(DropReason::Malformed);
    }
    match load::<u8>(&ctx, L4_OFF + 1) {
        Some(0) => {}
        _ => return Step::drop(DropReason::Malformed),
    }
    let Some(target) = load::<Addr>(&ctx, L4_OFF + 8) else {
        return Step::drop(DropReason::Malformed);
    };
    if addr_is_ambiguous_v6(&target) {
        return Step::NEXT;
    }
    let ours = if role_of == role::CONSUMER as u32 {
        let key = NetAddrKey {
            network_id: iface.network_id,
            addr_be: target,
        };
        // SAFETY: map lookup, value unused.
        unsafe { ARP_ENDPOINTS.get(&key) }.is_some()
    } else {
        // SAFETY: as above. A retired address is no longer announced.
        unsafe { NAT_ADDRS.get(&target) }.is_some_and(|n| n.flags & nat_addr_flags::RETIRED == 0)
    };
    if !ours {
        return Step::NEXT;
    }
    let Some(solicitor_mac) = load::<[u8; 6]>(&ctx, 6) else {
        return Step::drop(DropReason::Malformed);
    };
    // Duplicate address detection (source ::) is answered to all nodes,
    // unsolicited (RFC 4861 7.2.4); anything else to the solicitor.
    let dad = f.src == [0; 4];
    let (dst, dst_mac, flags) = if dad {
        (ALL_NODES, ALL_NODES_MAC, NA_OVERRIDE)
    } else {
        (f.src, solicitor_mac, NA_SOLICITED | NA_OVERRIDE)
    };
    // The advertisement is 86 bytes whatever options the solicitation had.
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: helper on our own context; bounds are re-checked below.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, NA_FRAME_LEN as i32 - len) } != 0 {
        return Step::drop(DropReason::Malformed);
    }
    let Some(p) = ptr_at::<[u8; NA_FRAME_LEN]>(&ctx, 0) else {
        return Step::drop(DropReason::Malformed);
    };
    let mac = iface.mac;
    let check = checksum(&target, &dst, flags, &mac);
    let p = p.cast::<u8>();
    // SAFETY: every offset below is inside the checked NA_FRAME_LEN bytes.
    unsafe {
        let at = |off: usize| p.add(off);
        at(0).cast::<[u8; 6]>().write_unaligned(dst_mac);
        at(6).cast::<[u8; 6]>().write_unaligned(mac);
        // Version 6, traffic class and flow label 0; payload 32; ICMPv6;
        // hop limit 255. The EtherType stays.
        at(14)
            .cast::<[u8; 8]>()
            .write_unaligned([0x60, 0, 0, 0, 0, 32, IPPROTO_ICMPV6, 255]);
        at(22).cast::<Addr>().write_unaligned(target);
        at(38).cast::<Addr>().write_unaligned(dst);
        at(L4_OFF)
            .cast::<[u8; 2]>()
            .write_unaligned([ND_NEIGHBOR_ADVERT, 0]);
        at(L4_OFF + 2).cast::<u16>().write_unaligned(check);
        at(L4_OFF + 4)
            .cast::<[u8; 4]>()
            .write_unaligned([flags, 0, 0, 0]);
        at(L4_OFF + 8).cast::<Addr>().write_unaligned(target);
        // Target link-layer address option: type 2, 8 bytes.
        at(L4_OFF + 24).cast::<[u8; 2]>().write_unaligned([2, 1]);
        at(L4_OFF + 26).cast::<[u8; 6]>().write_unaligned(mac);
    }
    Step::verdict(crate::answer::back_out(&ctx, iface.flags, NO_EP))
}

/// The advertisement's ICMPv6 checksum (native order, as stored), over the
/// pseudo-header (source = target, destination, length 32, next header 58)
/// and the 32 bytes of the message.
#[inline(always)]
fn checksum(target: &Addr, dst: &Addr, flags: u8, mac: &[u8; 6]) -> u16 {
    let w = |a: u8, b: u8| u16::from_ne_bytes([a, b]) as u32;
    let addr = |a: &Addr| {
        let mut s = 0u32;
        for x in a {
            s += (x & 0xffff) + (x >> 16);
        }
        s
    };
    let mut sum = 2 * addr(target)
        + addr(dst)
        + w(0, 32)
        + w(0, IPPROTO_ICMPV6)
        + w(ND_NEIGHBOR_ADVERT, 0)
        + w(flags, 0)
        + w(2, 1)
        + w(mac[0], mac[1])
        + w(mac[2], mac[3])
        + w(mac[4], mac[5]);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A solicitation for none of ours on a consumer interface.
#[inline(always)]
pub fn not_ours_consumer() -> u32 {
    stats::drop(DropReason::NdNotOurs, NO_EP)
}
