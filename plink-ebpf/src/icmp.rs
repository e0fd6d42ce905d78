//! ICMP errors about a flow, from the provider side back to its consumer
//! (RFC 5508 §4.2): the error quotes the packet we sent (NAT address/port →
//! backend), so both the outer header (to the consumer, from the endpoint
//! address) and the quoted header (consumer → endpoint, as the consumer sent
//! it) are translated, with every checksum updated incrementally.
//!
//! A slow path: out of line so the verifier checks it once, apart from the
//! per-packet path.
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_ns, helpers::generated::bpf_redirect,
    programs::XdpContext,
};
use plink_common::{
    DropReason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, csum, flow_expired, icmp_type, v4_be,
};

use crate::{
    fib,
    maps::{CT_FWD, CT_REV, GLOBAL, SCRATCH},
    parse::{
        ICMP_CHECK, IP_CHECK, IP_DADDR, IP_LEN, IP_OFF, IP_SADDR, IP_TTL, L4_OFF, load, ptr_at,
        store,
    },
    stats::{self, NO_EP, drop},
};

/// The quoted (inner) IPv4 header: after the 8-byte ICMP error header.
const IN_IP: usize = L4_OFF + 8;
const IN_CHECK: usize = IN_IP + 10;
const IN_SADDR: usize = IN_IP + 12;
const IN_DADDR: usize = IN_IP + 16;
/// The quoted transport header: only its first 8 bytes are guaranteed.
const IN_L4: usize = IN_IP + IP_LEN;
const IN_UDP_CHECK: usize = IN_L4 + 6;
const IN_TCP_CHECK: usize = IN_L4 + 16;
const IN_ICMP_CHECK: usize = IN_L4 + 2;
const IN_ICMP_ID: usize = IN_L4 + 4;

/// Is this ICMP type an error that quotes a packet plink translates?
#[inline(always)]
pub fn is_error(t: u8) -> bool {
    t == icmp_type::DEST_UNREACH
        || t == icmp_type::TIME_EXCEEDED
        || t == icmp_type::PARAMETER_PROBLEM
}

/// Translates an ICMP error that arrived on the provider interface for a
/// NAT address (already parsed as a header-only IPv4/ICMP packet of
/// `tot_len` bytes) and redirects it to the flow's consumer.
#[inline(never)]
pub fn provider_error(ctx: XdpContext, tot_len: u32) -> u32 {
    match translate(&ctx, tot_len as u16) {
        Ok(ifindex) => {
            // SAFETY: plain helper call.
            let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
            if action != xdp_action::XDP_REDIRECT {
                return drop(DropReason::RedirectFailed, NO_EP);
            }
            action
        }
        Err((r, ep)) => drop(r, ep),
    }
}

#[inline(always)]
fn translate(ctx: &XdpContext, tot_len: u16) -> Result<u32, (DropReason, u32)> {
    let malformed = (DropReason::Malformed, NO_EP);
    let no_flow = (DropReason::IcmpErrorNoFlow, NO_EP);
    // Outer ICMP header, quoted IP header and 8 quoted transport bytes must
    // all be inside the IP packet (not just the frame: padding is not data).
    if (tot_len as usize) < IP_LEN + 8 + IP_LEN + 8 {
        return Err(malformed);
    }
    // One bounds check for everything up to the 8 quoted transport bytes.
    let Some(p) = ptr_at::<[u8; IN_L4 + 8]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    // SAFETY: offsets below IN_L4 + 8 are inside the checked region.
    let rd16 = |off: usize| unsafe { p.add(off).cast::<u16>().read_unaligned() };
    // SAFETY: as above.
    let rd32 = |off: usize| unsafe { p.add(off).cast::<u32>().read_unaligned() };
    // SAFETY: as above.
    let (ver_ihl, frag, proto) = unsafe { (*p.add(IN_IP), rd16(IN_IP + 6), *p.add(IN_IP + 9)) };
    // plink never sends IP options or fragments, so a quoted header with them
    // is not about a packet of ours.
    if ver_ihl != 0x45 || frag & u16::from_ne_bytes([0x3f, 0xff]) != 0 {
        return Err(no_flow);
    }
    let (in_src, in_dst, out_dst) = (rd32(IN_SADDR), rd32(IN_DADDR), rd32(IP_DADDR));
    // The error must go to the address that sent the quoted packet.
    if in_src != out_dst {
        return Err(no_flow);
    }
    let l4 = [rd16(IN_L4), rd16(IN_L4 + 2), rd16(IN_L4 + 4)];
    // (NAT port, backend port) of the quoted packet, as the reverse key has them.
    let (nat_port, backend_port) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (l4[0], l4[1]),
        // Only an echo request of ours can be quoted; its id is the NAT "port".
        IPPROTO_ICMP if l4[0].to_ne_bytes()[0] == icmp_type::ECHO_REQUEST => (l4[2], 0),
        _ => return Err(no_flow),
    };
    // The key is built in the per-CPU scratch slot: this slow path runs
    // below the provider program's frame and the stack is 512 bytes in all.
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return Err(no_flow);
    };
    // SAFETY: this CPU's slot; XDP runs to completion.
    let rev = unsafe { &mut (*s).rev };
    rev.nat_addr_be = v4_be(in_src);
    rev.backend_addr_be = v4_be(in_dst);
    rev.nat_port_be = nat_port;
    rev.backend_port_be = backend_port;
    rev.proto = proto;
    rev._pad = [0; 3];
    // SAFETY: map value, read only.
    let Some(owner) = (unsafe { CT_REV.get(rev) }) else {
        return Err(no_flow);
    };
    // SAFETY: map value, read only: an error does not refresh the flow
    // (RFC 5508: only the flow's own packets keep its mapping alive).
    let Some(v) = (unsafe { CT_FWD.get(&owner.fwd) }) else {
        return Err(no_flow);
    };
    if v.nat_addr_be[0] != in_src
        || v.nat_port_be != nat_port
        || v.backend_addr_be[0] != in_dst
        || v.backend_port_be != backend_port
    {
        return Err((DropReason::CtBroken, v.endpoint_id));
    }
    let ep = v.endpoint_id;
    let Some(g) = GLOBAL.get(0) else {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if flow_expired(v, now, &g.timeouts) {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    }
    let (ttl_word, out_check, out_src, icmp_check, in_check) = (
        rd16(IP_TTL),
        rd16(IP_CHECK),
        rd32(IP_SADDR),
        rd16(ICMP_CHECK),
        rd16(IN_CHECK),
    );
    let ttl = ttl_word.to_ne_bytes()[0];
    if ttl <= 1 {
        return Err((DropReason::TtlExceeded, ep));
    }
    let client = owner.fwd.src_addr_be[0];
    let endpoint = owner.fwd.dst_addr_be[0];
    let (client_port, endpoint_port) = (owner.fwd.src_port_be, owner.fwd.dst_port_be);

    // Quoted header: NAT → client, backend → endpoint.
    let mut new_in_check = csum::update32(in_check, in_src, client);
    new_in_check = csum::update32(new_in_check, in_dst, endpoint);
    // The outer ICMP checksum covers every quoted byte that changes.
    let mut ic = csum::update32(icmp_check, in_src, client);
    ic = csum::update32(ic, in_dst, endpoint);
    ic = csum::update16(ic, in_check, new_in_check);

    if proto == IPPROTO_ICMP {
        let (old_id, inner_icmp_check) = (l4[2], l4[1]);
        let new_inner = csum::update16(inner_icmp_check, old_id, client_port);
        ic = csum::update16(ic, old_id, client_port);
        ic = csum::update16(ic, inner_icmp_check, new_inner);
        // SAFETY: inside the checked region.
        unsafe {
            p.add(IN_ICMP_ID).cast::<u16>().write_unaligned(client_port);
            p.add(IN_ICMP_CHECK)
                .cast::<u16>()
                .write_unaligned(new_inner);
        }
    } else {
        ic = csum::update16(ic, l4[0], client_port);
        ic = csum::update16(ic, l4[1], endpoint_port);
        // SAFETY: inside the checked region.
        unsafe {
            p.add(IN_L4)
                .cast::<[u16; 2]>()
                .write_unaligned([client_port, endpoint_port]);
        }
        // The quoted transport checksum is updated only where it was quoted
        // (inside the IP packet), as Linux does: a truncated quote keeps its bytes.
        let check_off = if proto == IPPROTO_UDP {
            IN_UDP_CHECK
        } else {
            IN_TCP_CHECK
        };
        if IP_OFF + tot_len as usize >= check_off + 2
            && let Some(old) = load::<u16>(ctx, check_off)
        {
            let mut l = csum::update32(old, in_src, client);
            l = csum::update32(l, in_dst, endpoint);
            l = csum::update16(l, l4[0], client_port);
            l = csum::update16(l, l4[1], endpoint_port);
            if proto == IPPROTO_UDP {
                l = csum::udp_finish(old, l);
            }
            ic = csum::update16(ic, old, l);
            if !store::<u16>(ctx, check_off, l) {
                return Err((DropReason::Malformed, ep));
            }
        }
    }

    // Outer header: from the endpoint address to the client, TTL - 1.
    let new_ttl_word = {
        let mut b = ttl_word.to_ne_bytes();
        b[0] = ttl - 1;
        u16::from_ne_bytes(b)
    };
    let mut oc = csum::update16(out_check, ttl_word, new_ttl_word);
    oc = csum::update32(oc, out_src, endpoint);
    oc = csum::update32(oc, out_dst, client);
    // Re-derive the region: the store above may have been the last use the
    // verifier tracked for `p`.
    let Some(p) = ptr_at::<[u8; IN_L4 + 8]>(ctx, 0) else {
        return Err((DropReason::Malformed, ep));
    };
    let p = p.cast::<u8>();
    // SAFETY: inside the checked region.
    unsafe {
        p.add(IN_SADDR).cast::<u32>().write_unaligned(client);
        p.add(IN_DADDR).cast::<u32>().write_unaligned(endpoint);
        p.add(IN_CHECK).cast::<u16>().write_unaligned(new_in_check);
        p.add(ICMP_CHECK).cast::<u16>().write_unaligned(ic);
        p.add(IP_TTL).cast::<u16>().write_unaligned(new_ttl_word);
        p.add(IP_SADDR).cast::<u32>().write_unaligned(endpoint);
        p.add(IP_DADDR).cast::<u32>().write_unaligned(client);
        p.add(IP_CHECK).cast::<u16>().write_unaligned(oc);
        p.cast::<[u8; 6]>().write_unaligned(v.client_mac);
        p.add(6).cast::<[u8; 6]>().write_unaligned(v.gw_mac);
    }
    if !fib::fits_mtu(ctx, v.ingress_ifindex) {
        return Err((DropReason::FragNeeded, ep));
    }
    stats::count_packet(v, tot_len as u64, true);
    Ok(v.ingress_ifindex)
}
