//! NAT rewrite of an IPv4 TCP/UDP/ICMP-echo packet in place, with incremental
//! checksums (RFC 1624) and the TTL decrement.
use aya_ebpf::programs::XdpContext;
use plink_common::{IPPROTO_ICMP, IPPROTO_UDP, csum};

use crate::parse::{
    Flow, ICMP_CHECK, ICMP_ID, IP_CHECK, IP_DADDR, IP_SADDR, IP_TTL, L4_OFF, TCP_CHECK, UDP_CHECK,
    load, ptr_at, store,
};

/// New addresses, ports (all raw, network order) and link-layer addresses.
pub struct Nat {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Rewrites the packet parsed as `f`. The caller checked `f.ttl > 1`.
/// Returns false if the frame is shorter than `parse_ipv4` promised (never).
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, f: &Flow, n: &Nat) -> bool {
    if f.proto == IPPROTO_ICMP {
        return rewrite_echo(ctx, f, n);
    }
    let Some(ip_check) = load::<u16>(ctx, IP_CHECK) else {
        return false;
    };
    let (ttl_word, new_ttl_word) = ttl_words(f);
    let mut c = csum::update16(ip_check, ttl_word, new_ttl_word);
    c = csum::update32(c, f.src_be, n.src_be);
    c = csum::update32(c, f.dst_be, n.dst_be);

    let l4_check_off = if f.proto == IPPROTO_UDP {
        UDP_CHECK
    } else {
        TCP_CHECK
    };
    let Some(l4_check) = load::<u16>(ctx, l4_check_off) else {
        return false;
    };
    // The pseudo-header carries both addresses; the ports are in the header.
    let mut l = csum::update32(l4_check, f.src_be, n.src_be);
    l = csum::update32(l, f.dst_be, n.dst_be);
    l = csum::update16(l, f.sport_be, n.sport_be);
    l = csum::update16(l, f.dport_be, n.dport_be);
    if f.proto == IPPROTO_UDP {
        l = csum::udp_finish(l4_check, l);
    }

    store::<[u8; 6]>(ctx, 0, n.dmac)
        && store::<[u8; 6]>(ctx, 6, n.smac)
        // Only the TTL byte: the protocol byte stays as it is (a word store
        // let LLVM build the untouched byte from an undefined register).
        && store::<u8>(ctx, IP_TTL, f.ttl - 1)
        && store::<u16>(ctx, IP_CHECK, c)
        && store::<u32>(ctx, IP_SADDR, n.src_be)
        && store::<u32>(ctx, IP_DADDR, n.dst_be)
        && store::<[u16; 2]>(ctx, L4_OFF, [n.sport_be, n.dport_be])
        && store::<u16>(ctx, l4_check_off, l)
}

/// The header checksum word holding TTL and protocol, before and after the
/// TTL decrement. Built from the parsed fields, not reloaded from the packet:
/// with a reloaded word LLVM kept the protocol byte in a register it did not
/// set on every path, which the verifier rejects.
#[inline(always)]
fn ttl_words(f: &Flow) -> (u16, u16) {
    (
        u16::from_ne_bytes([f.ttl, f.proto]),
        u16::from_ne_bytes([f.ttl.wrapping_sub(1), f.proto]),
    )
}

/// Echo request or reply: addresses and TTL as any flow; no pseudo-header,
/// and the identifier (in whichever "port" is non-zero, see `parse::Flow`)
/// is the only ICMP word that changes. One bounds check covers every byte
/// written, so the verifier sees a single straight-line store sequence.
#[inline(always)]
fn rewrite_echo(ctx: &XdpContext, f: &Flow, n: &Nat) -> bool {
    let Some(p) = ptr_at::<[u8; ICMP_ID + 2]>(ctx, 0) else {
        return false;
    };
    let p = p.cast::<u8>();
    // SAFETY: every offset below is inside the checked `ICMP_ID + 2` bytes.
    unsafe {
        let rd = |off: usize| p.add(off).cast::<u16>().read_unaligned();
        let (ip_check, icmp_check) = (rd(IP_CHECK), rd(ICMP_CHECK));
        let (ttl_word, new_ttl_word) = ttl_words(f);
        let mut c = csum::update16(ip_check, ttl_word, new_ttl_word);
        c = csum::update32(c, f.src_be, n.src_be);
        c = csum::update32(c, f.dst_be, n.dst_be);
        let (old_id, new_id) = (f.sport_be | f.dport_be, n.sport_be | n.dport_be);
        p.cast::<[u8; 6]>().write_unaligned(n.dmac);
        p.add(6).cast::<[u8; 6]>().write_unaligned(n.smac);
        p.add(IP_TTL).write(f.ttl - 1);
        p.add(IP_CHECK).cast::<u16>().write_unaligned(c);
        p.add(IP_SADDR).cast::<u32>().write_unaligned(n.src_be);
        p.add(IP_DADDR).cast::<u32>().write_unaligned(n.dst_be);
        p.add(ICMP_ID).cast::<u16>().write_unaligned(new_id);
        p.add(ICMP_CHECK)
            .cast::<u16>()
            .write_unaligned(csum::update16(icmp_check, old_id, new_id));
    }
    true
}
