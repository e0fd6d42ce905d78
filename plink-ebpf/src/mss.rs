//! TCP MSS clamping (`mss_clamp` of a service): the MSS option of a SYN
//! (consumer → service) or SYN-ACK (service → consumer) larger than the
//! service's clamp is lowered to it, with the TCP checksum updated
//! incrementally (RFC 1624), so a valid checksum stays valid and an invalid
//! one stays invalid by the same amount.
//!
//! IPv4 and IPv6 segments alike (NAT66 and NAT64 flows too: `auto` counts
//! IPv6's 60 bytes of headers where a segment or its peer's crosses IPv6).
//! Both ends then send segments that fit the smaller MTU without relying on
//! ICMP: what operators want when a consumer network sits behind a tunnel
//! that drops or never sends fragmentation-needed errors.
use aya_ebpf::{
    helpers::generated::{bpf_check_mtu, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use plink_common::{
    IPPROTO_TCP, MSS_CLAMP_AUTO, MSS_CLAMP_OFF, TCP_IPV4_HEADERS, TCP_IPV6_HEADERS, csum,
};

use crate::{
    maps::{EP_STATS, SERVICES, SVC_STATS},
    parse::{Flow, IP_LEN, IP_OFF, L4_OFF, TCP_CHECK, TCP_SYN, load, store},
};

/// TCP header without options.
const TCP_LEN: usize = 20;
/// TCP options are at most 40 bytes (data offset 15 words).
const MAX_OPTS: usize = 40;
/// The options buffer: a power of two above MAX_OPTS, so that masked
/// indexes need no bounds check.
const OPT_BUF: usize = 64;
/// Options walked at most before giving up (see `find_mss`).
const MAX_STEPS: usize = 12;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_MSS_LEN: u8 = 4;
/// Smallest MSS a PROXY header's length is taken off (RFC 9293's floor for
/// IPv4 is 536; below 64 a segment carries little more than headers).
const MIN_MSS: u32 = 64;

/// Direction of the segment, for the counters.
pub const IN: u32 = 0;
pub const OUT: u32 = 1;

/// The segment's headers as it leaves: IPv4 (offsets of `parse`) or IPv6
/// (`v6::parse`, no extension headers).
pub const V4: u32 = 0;
pub const V6: u32 = 1 << 16;
/// `auto` takes IPv6's 60 bytes of headers off the MTU (instead of 40):
/// an IPv6 segment, or a NAT64 one whose peer's segments cross an IPv6
/// link.
pub const AUTO_V6: u32 = 1 << 17;

/// Clamps the MSS if `f` (already rewritten in `ctx`) is a TCP segment with
/// SYN set; `egress_ifindex` is where it leaves. The cheap flag test stays
/// inline; the option walk is out of line, run for SYNs only.
#[inline(always)]
pub fn on_syn(
    ctx: &XdpContext,
    f: &Flow,
    service_id: u32,
    endpoint_id: u32,
    egress_ifindex: u32,
    dir: u32,
    shrink: u8,
) {
    on_tcp_syn(
        ctx,
        f.proto,
        f.tcp_flags,
        service_id,
        endpoint_id,
        egress_ifindex,
        dir | (shrink as u32) << 8,
    );
}

/// [`on_syn`] by protocol and flags; `how`: the direction, a PROXY
/// header's length << 8, and [`V6`] / [`AUTO_V6`].
#[inline(always)]
pub fn on_tcp_syn(
    ctx: &XdpContext,
    proto: u8,
    tcp_flags: u8,
    service_id: u32,
    endpoint_id: u32,
    egress_ifindex: u32,
    how: u32,
) {
    if proto == IPPROTO_TCP && tcp_flags & TCP_SYN != 0 {
        // BPF functions take five arguments: direction, shrink and family
        // share one.
        clamp(
            XdpContext { ctx: ctx.ctx },
            service_id,
            endpoint_id,
            egress_ifindex,
            how,
        );
    }
}

/// The MTU of `ifindex` (0: the device the frame came in on), or `None`
/// if the device is gone. `bpf_check_mtu` writes the device MTU whatever
/// the check's outcome.
#[inline(always)]
pub fn device_mtu(ctx: &XdpContext, ifindex: u32) -> Option<u32> {
    let mut mtu: u32 = 0;
    // SAFETY: valid ctx and out pointer; flags 0.
    let rc = unsafe { bpf_check_mtu(ctx.ctx.cast(), ifindex, &mut mtu, 0, 0) };
    (rc >= 0 && mtu != 0).then_some(mtu)
}

/// Out of line so the verifier walks the bounded option loop once, apart
/// from the per-packet path. Never drops: a segment it cannot parse leaves
/// unchanged (the endpoints' own MSS then applies).
#[inline(never)]
fn clamp(ctx: XdpContext, service_id: u32, endpoint_id: u32, egress_ifindex: u32, how: u32) {
    // `shrink`: a PROXY header's length, taken off whatever MSS is offered.
    let (dir, shrink) = (how & 0xff, (how >> 8) & 0xff);
    let v6 = how & V6 != 0;
    // Where the TCP header is, and how long the IP header before it.
    let (l4_off, ip_len) = if v6 {
        (crate::v6::L4_OFF6, 40)
    } else {
        (L4_OFF, IP_LEN)
    };
    let headers = if v6 || how & AUTO_V6 != 0 {
        TCP_IPV6_HEADERS
    } else {
        TCP_IPV4_HEADERS
    } as u32;
    let Some(svc) = SERVICES.get(service_id) else {
        return;
    };
    let setting = svc.mss_clamp;
    if setting == MSS_CLAMP_OFF && shrink == 0 {
        return;
    }
    let limit = if setting == MSS_CLAMP_OFF {
        u32::MAX
    } else if setting == MSS_CLAMP_AUTO {
        // Both interfaces the segment crosses: the peer's segments come
        // back the same way.
        match (device_mtu(&ctx, 0), device_mtu(&ctx, egress_ifindex)) {
            (Some(a), Some(b)) => a.min(b).saturating_sub(headers),
            _ => return,
        }
    } else {
        setting as u32
    };
    if limit == 0 {
        return;
    }
    // The IP packet's length: IPv4's total length, or IPv6's payload
    // length plus its header.
    let (Some(doff), Some(len_field)) = (
        load::<u8>(&ctx, l4_off + 12),
        load::<[u8; 2]>(&ctx, if v6 { IP_OFF + 4 } else { IP_OFF + 2 }),
    ) else {
        return;
    };
    let ip_total = u16::from_be_bytes(len_field) as usize + if v6 { ip_len } else { 0 };
    let hdr_len = (doff >> 4) as usize * 4;
    // Options must be inside the IP packet, not Ethernet padding after it.
    if hdr_len <= TCP_LEN || ip_len + hdr_len > ip_total {
        return;
    }
    let opt_len = hdr_len - TCP_LEN;
    if opt_len > MAX_OPTS {
        return;
    }
    // One bounded copy of the options: the walk below then indexes a stack
    // buffer bounded by MAX_OPTS instead of the packet at variable offsets,
    // which the verifier would need a data_end check for at every step.
    let mut opts = [0u8; OPT_BUF];
    // SAFETY: opts holds OPT_BUF > MAX_OPTS >= opt_len bytes; the helper
    // checks the frame.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            (l4_off + TCP_LEN) as u32,
            opts.as_mut_ptr().cast(),
            opt_len as u32,
        )
    };
    if rc != 0 {
        return;
    }
    let Some(at) = find_mss(&opts, opt_len) else {
        return;
    };
    let (hi, lo) = (
        opts[(at + 2) & (OPT_BUF - 1)],
        opts[(at + 3) & (OPT_BUF - 1)],
    );
    let mss = u16::from_be_bytes([hi, lo]) as u32;
    let target = mss.min(limit).saturating_sub(shrink);
    // Nothing to lower, or an offer too small to take a header off.
    if target >= mss || target < MIN_MSS {
        return;
    }
    let new = (target as u16).to_be_bytes();
    // The checksum sums 16-bit words from the start of the TCP header (an
    // even offset in the frame): a value at an odd offset straddles two
    // words, and its bytes count swapped (RFC 1071 §2(B)).
    let (old_word, new_word) = if at % 2 == 0 {
        (u16::from_ne_bytes([hi, lo]), u16::from_ne_bytes(new))
    } else {
        (
            u16::from_ne_bytes([lo, hi]),
            u16::from_ne_bytes([new[1], new[0]]),
        )
    };
    let check_off = l4_off + (TCP_CHECK - L4_OFF);
    let Some(check) = load::<u16>(&ctx, check_off) else {
        return;
    };
    let mut value = new;
    // SAFETY: two bytes from a stack buffer; the helper checks the frame.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            (l4_off + TCP_LEN + at + 2) as u32,
            value.as_mut_ptr().cast(),
            2,
        )
    };
    if rc != 0 || !store::<u16>(&ctx, check_off, csum::update16(check, old_word, new_word)) {
        return;
    }
    // Counted when the service's clamp lowered it, not for the header alone.
    if mss > limit {
        count(service_id, endpoint_id, dir);
    }
}

/// Offset of the MSS option (kind 2, length 4) in the first `len` bytes of
/// `opts`, walking the option list as RFC 9293 §3.1 lays it out.
///
/// Kept cheap for the verifier, which walks this loop again for every path
/// that reaches the call: indexes are masked to the buffer (no bounds
/// branches), the walk stops once fewer than 4 bytes remain (no MSS fits
/// there), and it takes at most MAX_STEPS options (12 cost the consumer
/// program 4k verified instructions; all 40 cost 120k). Linux, Windows and
/// the BSDs send MSS as the first option; a SYN that hides it behind more
/// than 11 others is left unclamped, which only costs that sender.
#[inline(always)]
fn find_mss(opts: &[u8; OPT_BUF], len: usize) -> Option<usize> {
    let mut i = 0usize;
    for _ in 0..MAX_STEPS {
        if i + OPT_MSS_LEN as usize > len {
            return None;
        }
        let kind = opts[i & (OPT_BUF - 1)];
        let olen = opts[(i + 1) & (OPT_BUF - 1)];
        if kind == OPT_MSS {
            // Only once per segment; a malformed one is left alone.
            return (olen == OPT_MSS_LEN).then_some(i);
        }
        if kind == OPT_END {
            return None;
        }
        let step = if kind == OPT_NOP { 1 } else { olen as usize };
        if step == 0 || (kind != OPT_NOP && step < 2) {
            return None;
        }
        i += step;
    }
    None
}

#[inline(always)]
fn count(service_id: u32, endpoint_id: u32, dir: u32) {
    for c in [
        SVC_STATS.get_ptr_mut(service_id),
        EP_STATS.get_ptr_mut(endpoint_id),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        let c = unsafe { &mut *c };
        if dir == OUT {
            c.mss_clamped_out += 1;
        } else {
            c.mss_clamped_in += 1;
        }
    }
}
