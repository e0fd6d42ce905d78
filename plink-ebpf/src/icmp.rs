//! ICMP errors about a flow, translated both ways (RFC 5508 §4.2) by one
//! rewrite over a description of the direction (`Translation`): an error
//! from the provider side quotes the packet we sent (NAT address/port →
//! backend) and goes back to the consumer as if about the packet it sent;
//! an error from a consumer-side router quotes a reply and goes to the
//! backend as if about the packet it sent. The outer and the quoted header
//! are both translated, every checksum updated incrementally. Also the
//! errors plink answers itself (time exceeded, fragmentation needed).
//!
//! A slow path: out of line so the verifier checks it once, apart from the
//! per-packet path.
use aya_ebpf::{
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use plink_common::{
    DropReason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, csum, flow_expired, flow_flags, icmp_type,
    v4_be,
};

use crate::{
    forward,
    maps::{CT_FWD, CT_REV, GLOBAL, SCRATCH_ICMP},
    parse::{
        ICMP_CHECK, IP_CHECK, IP_DADDR, IP_LEN, IP_OFF, IP_SADDR, IP_TTL, L4_OFF, load, ptr_at,
        store,
    },
    stats::{self, NO_EP, drop},
    step::Step,
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
        Ok(NAT64_FLOW) => crate::v6::nat64::ICMP_ERROR,
        Ok(ifindex) => forward::redirect(ifindex, NO_EP),
        Err((r, ep)) => drop(r, ep),
    }
}

/// `translate`'s answer for an error about a NAT64 flow's packet (no
/// interface has this index).
const NAT64_FLOW: u32 = u32::MAX;

/// The quoted packet of an ICMP error, as read (one bounds check).
struct Quote {
    proto: u8,
    /// Quoted source and destination address.
    src: u32,
    dst: u32,
    /// The first three 16-bit words of the quoted transport header: ports
    /// (TCP/UDP), or type+code, checksum and echo id (ICMP).
    l4: [u16; 3],
}

/// What a translated error says: the quoted packet's new addresses and
/// transport words, and the outer header's new source and destination.
struct Translation {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    /// The quoted echo id (ICMP quotes).
    icmp_id: u16,
    out_src: u32,
    out_dst: u32,
}

/// Reads the quote of the error in `ctx` (`tot_len` bytes of IP): it must
/// quote a whole option-less, unfragmented IPv4 header and 8 transport bytes
/// inside the IP packet, and be sent to the address that sent the quote.
#[inline(always)]
fn read_quote(ctx: &XdpContext, tot_len: u16) -> Result<Quote, (DropReason, u32)> {
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
    let (src, dst, out_dst) = (rd32(IN_SADDR), rd32(IN_DADDR), rd32(IP_DADDR));
    // The error must go to the address that sent the quoted packet.
    if src != out_dst {
        return Err(no_flow);
    }
    Ok(Quote {
        proto,
        src,
        dst,
        l4: [rd16(IN_L4), rd16(IN_L4 + 2), rd16(IN_L4 + 4)],
    })
}

/// Is flow `v` one an error may still be about: not expired (errors do not
/// refresh flows, RFC 5508), its endpoint current? Errors about it are
/// counted against its endpoint from here on.
#[inline(always)]
fn flow_alive(v: &plink_common::CtFwdValue) -> Result<(), (DropReason, u32)> {
    let ep = v.endpoint_id;
    let Some(g) = GLOBAL.get(0) else {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if flow_expired(v, now, &g.timeouts) || !crate::endpoint::current(v) {
        return Err((DropReason::IcmpErrorNoFlow, ep));
    }
    Ok(())
}

/// Rewrites the error in `ctx` as `t` says, both ways alike: the quoted
/// header and transport words (with the quoted transport checksum where it
/// was quoted, as Linux does), the outer ICMP checksum over every quoted
/// byte that changes, and the outer header (TTL - 1). `ep` is the flow's
/// endpoint, for the drops.
#[inline(always)]
fn rewrite_error(
    ctx: &XdpContext,
    q: &Quote,
    t: &Translation,
    tot_len: u16,
    ep: u32,
) -> Result<(), (DropReason, u32)> {
    let malformed = (DropReason::Malformed, ep);
    let Some(p) = ptr_at::<[u8; IN_L4 + 8]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    // SAFETY: offsets below IN_L4 + 8 are inside the checked region.
    let rd16 = |off: usize| unsafe { p.add(off).cast::<u16>().read_unaligned() };
    // SAFETY: as above.
    let rd32 = |off: usize| unsafe { p.add(off).cast::<u32>().read_unaligned() };
    let (ttl_word, out_check, out_src, out_dst, icmp_check, in_check) = (
        rd16(IP_TTL),
        rd16(IP_CHECK),
        rd32(IP_SADDR),
        rd32(IP_DADDR),
        rd16(ICMP_CHECK),
        rd16(IN_CHECK),
    );
    let ttl = ttl_word.to_ne_bytes()[0];
    if ttl <= 1 {
        return Err((DropReason::TtlExceeded, ep));
    }
    let mut new_in_check = csum::update32(in_check, q.src, t.src);
    new_in_check = csum::update32(new_in_check, q.dst, t.dst);
    let mut ic = csum::update32(icmp_check, q.src, t.src);
    ic = csum::update32(ic, q.dst, t.dst);
    ic = csum::update16(ic, in_check, new_in_check);
    if q.proto == IPPROTO_ICMP {
        let (old_id, inner_icmp_check) = (q.l4[2], q.l4[1]);
        let new_inner = csum::update16(inner_icmp_check, old_id, t.icmp_id);
        ic = csum::update16(ic, old_id, t.icmp_id);
        ic = csum::update16(ic, inner_icmp_check, new_inner);
        // SAFETY: inside the checked region.
        unsafe {
            p.add(IN_ICMP_ID).cast::<u16>().write_unaligned(t.icmp_id);
            p.add(IN_ICMP_CHECK)
                .cast::<u16>()
                .write_unaligned(new_inner);
        }
    } else {
        ic = csum::update16(ic, q.l4[0], t.sport);
        ic = csum::update16(ic, q.l4[1], t.dport);
        // SAFETY: inside the checked region.
        unsafe {
            p.add(IN_L4)
                .cast::<[u16; 2]>()
                .write_unaligned([t.sport, t.dport]);
        }
        let check_off = if q.proto == IPPROTO_UDP {
            IN_UDP_CHECK
        } else {
            IN_TCP_CHECK
        };
        if IP_OFF + tot_len as usize >= check_off + 2
            && let Some(old) = load::<u16>(ctx, check_off)
        {
            let mut l = csum::update32(old, q.src, t.src);
            l = csum::update32(l, q.dst, t.dst);
            l = csum::update16(l, q.l4[0], t.sport);
            l = csum::update16(l, q.l4[1], t.dport);
            if q.proto == IPPROTO_UDP {
                l = csum::udp_finish(old, l);
            }
            ic = csum::update16(ic, old, l);
            if !store::<u16>(ctx, check_off, l) {
                return Err(malformed);
            }
        }
    }
    let new_ttl_word = {
        let mut b = ttl_word.to_ne_bytes();
        b[0] = ttl - 1;
        u16::from_ne_bytes(b)
    };
    let mut oc = csum::update16(out_check, ttl_word, new_ttl_word);
    oc = csum::update32(oc, out_src, t.out_src);
    oc = csum::update32(oc, out_dst, t.out_dst);
    // Re-derive the region: the store above may have been the last use the
    // verifier tracked for `p`.
    let Some(p) = ptr_at::<[u8; IN_L4 + 8]>(ctx, 0) else {
        return Err(malformed);
    };
    let p = p.cast::<u8>();
    // SAFETY: inside the checked region.
    unsafe {
        p.add(IN_SADDR).cast::<u32>().write_unaligned(t.src);
        p.add(IN_DADDR).cast::<u32>().write_unaligned(t.dst);
        p.add(IN_CHECK).cast::<u16>().write_unaligned(new_in_check);
        p.add(ICMP_CHECK).cast::<u16>().write_unaligned(ic);
        p.add(IP_TTL).cast::<u16>().write_unaligned(new_ttl_word);
        p.add(IP_SADDR).cast::<u32>().write_unaligned(t.out_src);
        p.add(IP_DADDR).cast::<u32>().write_unaligned(t.out_dst);
        p.add(IP_CHECK).cast::<u16>().write_unaligned(oc);
    }
    Ok(())
}

/// Provider side: the quote is a packet plink sent (NAT address/port →
/// backend); it becomes client → endpoint, as the consumer sent it, and the
/// error goes from the endpoint address to the client. Returns the flow's
/// consumer interface.
#[inline(always)]
fn translate(ctx: &XdpContext, tot_len: u16) -> Result<u32, (DropReason, u32)> {
    let no_flow = (DropReason::IcmpErrorNoFlow, NO_EP);
    let q = read_quote(ctx, tot_len)?;
    // (NAT port, backend port) of the quoted packet, as the reverse key has them.
    let (nat_port, backend_port) = match q.proto {
        IPPROTO_TCP | IPPROTO_UDP => (q.l4[0], q.l4[1]),
        // Only an echo request of ours can be quoted; its id is the NAT "port".
        IPPROTO_ICMP if q.l4[0].to_ne_bytes()[0] == icmp_type::ECHO_REQUEST => (q.l4[2], 0),
        _ => return Err(no_flow),
    };
    // The key is built in the per-CPU scratch slot: this slow path runs
    // below the provider program's frame and the stack is 512 bytes in all.
    let Some(s) = SCRATCH_ICMP.get_ptr_mut(0) else {
        return Err(no_flow);
    };
    // SAFETY: this CPU's slot; XDP runs to completion.
    let rev = unsafe { &mut (*s).rev };
    rev.nat_addr_be = v4_be(q.src);
    rev.backend_addr_be = v4_be(q.dst);
    rev.nat_port_be = nat_port;
    rev.backend_port_be = backend_port;
    rev.proto = q.proto;
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
    // A NAT64 flow's error becomes ICMPv6 (`v6::nat64::provider_error`).
    // (Volatile: LLVM folded a plain read into the quote's rewrite below
    // in a way the verifier refused.)
    // SAFETY: reading a field of the map value we hold.
    if unsafe { core::ptr::read_volatile(&v.flags) } & flow_flags::NAT64 != 0 {
        return Ok(NAT64_FLOW);
    }
    if v.nat_addr_be[0] != q.src
        || v.nat_port_be != nat_port
        || v.backend_addr_be[0] != q.dst
        || v.backend_port_be != backend_port
    {
        return Err((DropReason::CtBroken, v.endpoint_id));
    }
    flow_alive(v)?;
    let ep = v.endpoint_id;
    let (client, endpoint) = (owner.fwd.src_addr_be[0], owner.fwd.dst_addr_be[0]);
    let (client_port, endpoint_port) = (owner.fwd.src_port_be, owner.fwd.dst_port_be);
    let t = Translation {
        src: client,
        dst: endpoint,
        sport: client_port,
        dport: endpoint_port,
        icmp_id: client_port,
        out_src: endpoint,
        out_dst: client,
    };
    rewrite_error(ctx, &q, &t, tot_len, ep)?;
    if v.pp_len != 0 && q.proto == IPPROTO_TCP {
        let past = v.pp_flags & plink_common::proxy::pp_flags::PAST != 0;
        let unshifted = unshift_quoted_seq(
            XdpContext { ctx: ctx.ctx },
            tot_len,
            v.pp_first_seq,
            v.pp_len as u32 | (past as u32) << 8,
        );
        if !unshifted {
            return Err((DropReason::Malformed, ep));
        }
    }
    let Some(p) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return Err((DropReason::Malformed, ep));
    };
    let p = p.cast::<u8>();
    // SAFETY: inside the checked region.
    unsafe {
        p.cast::<[u8; 6]>().write_unaligned(v.client_mac);
        p.add(6).cast::<[u8; 6]>().write_unaligned(v.gw_mac);
    }
    if !forward::fits_mtu(ctx, v.ingress_ifindex) {
        return Err((DropReason::FragNeeded, ep));
    }
    stats::count_packet(v, tot_len as u64, true);
    Ok(v.ingress_ifindex)
}

/// The quoted segment of a PROXY flow carries the backend's sequence
/// number; the client matches an error to its own (Linux ignores one
/// outside its send window), so it gets the client's number back, with
/// the ICMP checksum and the quoted TCP checksum (when quoted) updated.
/// Fragmentation needed about the segment that carried the header: the
/// client's own segment was `len` smaller than the one the router refused,
/// so the MTU it is told is `len` smaller too (else it would send the same
/// segment again, grown to the same refused size). `len_past`: the
/// header's length, and bit 8 = `pp_flags::PAST`.
#[inline(always)]
fn unshift_quoted_seq(ctx: XdpContext, tot_len: u16, first: u32, len_past: u32) -> bool {
    let ctx = &ctx;
    let (len, past) = (len_past & 0xff, len_past >> 8 != 0);
    // One bounds check for the three reads: with one each, LLVM merged
    // them into a path the verifier could not follow.
    let Some(p) = ptr_at::<[u8; IN_L4 + 8]>(ctx, 0) else {
        return false;
    };
    let p = p.cast::<u8>();
    // SAFETY: every offset is inside the checked IN_L4 + 8 bytes.
    let (raw, ic, kind) = unsafe {
        (
            p.add(IN_L4 + 4).cast::<u32>().read_unaligned(),
            p.add(ICMP_CHECK).cast::<u16>().read_unaligned(),
            p.add(L4_OFF).cast::<[u8; 2]>().read_unaligned(),
        )
    };
    let seq = u32::from_be(raw);
    let mut ic = ic;
    if !past && seq == first {
        // The quote is the grown segment: its length as the client sent it.
        let (Some(qlen_raw), Some(qcheck)) =
            (load::<u16>(ctx, IN_IP + 2), load::<u16>(ctx, IN_CHECK))
        else {
            return false;
        };
        let qlen = u16::from_be(qlen_raw);
        if qlen as u32 > len + IP_LEN as u32 {
            let own = (qlen - len as u16).to_be();
            let new_qcheck = csum::update16(qcheck, qlen_raw, own);
            ic = csum::update16(ic, qlen_raw, own);
            ic = csum::update16(ic, qcheck, new_qcheck);
            if !(store::<u16>(ctx, IN_IP + 2, own) && store::<u16>(ctx, IN_CHECK, new_qcheck)) {
                return false;
            }
        }
        if kind == [icmp_type::DEST_UNREACH, icmp_type::CODE_FRAG_NEEDED]
            && let Some(mtu_raw) = load::<u16>(ctx, L4_OFF + 6)
        {
            let mtu = u16::from_be(mtu_raw);
            let lower = mtu.saturating_sub(len as u16).max(68).to_be();
            ic = csum::update16(ic, mtu_raw, lower);
            if !store::<u16>(ctx, L4_OFF + 6, lower) {
                return false;
            }
        }
    }
    let client = plink_common::proxy::backend_ack_to_client(seq, first, len, past);
    if client == seq {
        return store::<u16>(ctx, ICMP_CHECK, ic);
    }
    let new = client.to_be();
    ic = csum::update32(ic, raw, new);
    if IP_OFF + tot_len as usize >= IN_TCP_CHECK + 2
        && let Some(old) = load::<u16>(ctx, IN_TCP_CHECK)
    {
        let l = csum::update32(old, raw, new);
        ic = csum::update16(ic, old, l);
        if !store::<u16>(ctx, IN_TCP_CHECK, l) {
            return false;
        }
    }
    store::<u32>(ctx, IN_L4 + 4, new) && store::<u16>(ctx, ICMP_CHECK, ic)
}

/// [`reply_error`] kinds.
pub const TIME_EXCEEDED: u32 = 1;
pub const FRAG_NEEDED: u32 = 2;

/// Bytes of the offending packet an error quotes: its header and 8 bytes.
const QUOTE: usize = IP_LEN + 8;
/// Length of the error frame: Ethernet, IP, ICMP header, quote.
const ERR_LEN: usize = L4_OFF + 8 + QUOTE;

/// Answers the consumer packet in `ctx` (IPv4 without options, 8 transport
/// bytes checked by `parse_ipv4`) with an ICMP error from the address it was
/// sent to, sent back out of the interface it came in on (`answer::back_out`): time
/// exceeded (`kind` [`TIME_EXCEEDED`]) or fragmentation needed with the
/// next-hop `mtu` ([`FRAG_NEEDED`]; only for DF packets: others are a
/// counted drop, XDP cannot fragment). The frame is reused in place: trimmed
/// to the quote and grown at the head by the new headers, so nothing is copied.
#[inline(never)]
pub fn reply_error(ctx: XdpContext, kind: u32, mtu: u32, endpoint_id: u32) -> u32 {
    let reason = if kind == FRAG_NEEDED {
        DropReason::FragNeeded
    } else {
        DropReason::TtlExceeded
    };
    let Some(old) = ptr_at::<[u8; L4_OFF + 8]>(&ctx, 0) else {
        return drop(DropReason::Malformed, endpoint_id);
    };
    // SAFETY: inside the checked region.
    let (macs, df, src, dst) = unsafe {
        let o = old.cast::<u8>();
        (
            o.cast::<[u8; 12]>().read_unaligned(),
            *o.add(IP_OFF + 6) & 0x40 != 0,
            o.add(IP_SADDR).cast::<u32>().read_unaligned(),
            o.add(IP_DADDR).cast::<u32>().read_unaligned(),
        )
    };
    if kind == FRAG_NEEDED && !df {
        return drop(reason, endpoint_id);
    }
    let len = ctx.data_end() - ctx.data();
    let keep = IP_OFF + QUOTE;
    // SAFETY: plain helper calls on this program's context.
    let resized = unsafe {
        (len <= keep || bpf_xdp_adjust_tail(ctx.ctx.cast(), keep as i32 - len as i32) == 0)
            && bpf_xdp_adjust_head(ctx.ctx.cast(), -((L4_OFF + 8 - IP_OFF) as i32)) == 0
    };
    if !resized {
        return drop(reason, endpoint_id);
    }
    let Some(p) = ptr_at::<[u8; ERR_LEN]>(&ctx, 0) else {
        return drop(reason, endpoint_id);
    };
    if ctx.data_end() - ctx.data() != ERR_LEN {
        return drop(reason, endpoint_id);
    }
    let p = p.cast::<u8>();
    let (ty, code) = if kind == FRAG_NEEDED {
        (icmp_type::DEST_UNREACH, icmp_type::CODE_FRAG_NEEDED)
    } else {
        (icmp_type::TIME_EXCEEDED, 0)
    };
    let tot_len = ((ERR_LEN - IP_OFF) as u16).to_be_bytes();
    let ip: [u8; 12] = [
        0x45,
        0,
        tot_len[0],
        tot_len[1],
        0,
        0,
        0x40,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
    ];
    let mtu = (mtu as u16).to_be_bytes();
    // SAFETY: every offset is inside the checked ERR_LEN bytes.
    unsafe {
        // Back to where it came from: the MACs swap.
        p.cast::<[u8; 6]>()
            .write_unaligned([macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]]);
        p.add(6)
            .cast::<[u8; 6]>()
            .write_unaligned([macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]]);
        p.add(12).cast::<[u8; 2]>().write_unaligned([0x08, 0x00]);
        p.add(IP_OFF).cast::<[u8; 12]>().write_unaligned(ip);
        p.add(IP_SADDR).cast::<u32>().write_unaligned(dst);
        p.add(IP_DADDR).cast::<u32>().write_unaligned(src);
        p.add(L4_OFF)
            .cast::<[u8; 8]>()
            .write_unaligned([ty, code, 0, 0, 0, 0, mtu[0], mtu[1]]);
        let sum = |from: usize, words: usize| {
            let mut s: u32 = 0;
            for i in 0..words {
                s += p.add(from + 2 * i).cast::<u16>().read_unaligned() as u32;
            }
            s
        };
        let ip_check = !fold(sum(IP_OFF, IP_LEN / 2));
        p.add(IP_CHECK).cast::<u16>().write_unaligned(ip_check);
        let icmp_check = !fold(sum(L4_OFF, (8 + QUOTE) / 2));
        p.add(ICMP_CHECK).cast::<u16>().write_unaligned(icmp_check);
    }
    crate::answer::back_out(&ctx, crate::answer::ingress_flags(&ctx), endpoint_id)
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Translates an ICMP error that a consumer-side router sent about a reply
/// (e.g. fragmentation needed on the way to a client behind it) for its
/// flow's backend: the quote becomes backend → NAT address/port, as the
/// backend sent it, and the outer header NAT address → backend. The flow
/// key includes `network_id`, so a consumer can only reach its own flows.
///
/// `NEXT` when translated, leaving the route query (NAT address →
/// backend) and the endpoint id in the `SCRATCH_ICMP` slot for the caller,
/// whose frame already holds a `NextHop` (routing here would put a third
/// frame on the 512-byte stack); otherwise the verdict (a counted drop).
#[inline(never)]
pub fn consumer_error(ctx: XdpContext, network_id: u32, tot_len: u32) -> Step {
    match consumer_translate(&ctx, network_id, tot_len as u16) {
        Ok(()) => Step::NEXT,
        Err((r, ep)) => Step::verdict(drop(r, ep)),
    }
}

/// Consumer side: the quote is a reply as the consumer got it (endpoint →
/// client); it becomes backend → NAT address/port, as the backend sent it,
/// and the error goes from the NAT address to the backend.
#[inline(always)]
fn consumer_translate(
    ctx: &XdpContext,
    network_id: u32,
    tot_len: u16,
) -> Result<(), (DropReason, u32)> {
    let no_flow = (DropReason::IcmpErrorNoFlow, NO_EP);
    let q = read_quote(ctx, tot_len)?;
    // (client port, endpoint port) as the forward key has them.
    let (client_port, endpoint_port) = match q.proto {
        IPPROTO_TCP | IPPROTO_UDP => (q.l4[1], q.l4[0]),
        IPPROTO_ICMP if q.l4[0].to_ne_bytes()[0] == icmp_type::ECHO_REPLY => (q.l4[2], 0),
        _ => return Err(no_flow),
    };
    let Some(s) = SCRATCH_ICMP.get_ptr_mut(0) else {
        return Err(no_flow);
    };
    // SAFETY: this CPU's slot; XDP runs to completion.
    let key = unsafe { &mut (*s).fwd };
    key.src_addr_be = v4_be(q.dst);
    key.dst_addr_be = v4_be(q.src);
    key.network_id = network_id;
    key.src_port_be = client_port;
    key.dst_port_be = endpoint_port;
    key.proto = q.proto;
    key._pad = [0; 3];
    // SAFETY: map value, read only; errors do not refresh flows.
    let Some(v) = (unsafe { CT_FWD.get(key) }) else {
        return Err(no_flow);
    };
    flow_alive(v)?;
    let ep = v.endpoint_id;
    let (nat, backend) = (v.nat_addr_be[0], v.backend_addr_be[0]);
    let (nat_port, backend_port) = (v.nat_port_be, v.backend_port_be);
    let t = Translation {
        src: backend,
        dst: nat,
        sport: backend_port,
        dport: nat_port,
        icmp_id: nat_port,
        out_src: nat,
        out_dst: backend,
    };
    rewrite_error(ctx, &q, &t, tot_len, ep)?;
    // SAFETY: this CPU's slot.
    unsafe {
        (*s).nat_be = nat;
        (*s).backend_be = backend;
        (*s).endpoint_id = ep;
    }
    stats::count_packet(v, tot_len as u64, false);
    Ok(())
}
