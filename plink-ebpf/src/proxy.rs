//! PROXY protocol v2 (plink-common's `proxy`): the endpoint's header goes in
//! front of the client's first byte, in the segment that carries it (its
//! first data segment, or its FIN when it closes before sending), and again
//! in every retransmission of that segment. The backend's stream is then
//! `header ++ client bytes`: client sequence numbers after the first byte
//! are `pp_len` higher at the backend, and the backend's acknowledgements
//! and SACK edges `pp_len` lower at the client. SYN-ACKs offer an MSS
//! `pp_len` smaller (`mss.rs`), so a grown segment still fits.
use aya_ebpf::{
    helpers::generated::{
        bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::XdpContext,
};
use plink_common::{
    CtFwdKey, CtFwdValue, DropReason, IPPROTO_TCP, csum,
    proxy::{
        ADDRS_OFF, HEADER_MAX, backend_ack_to_client, client_seq_to_backend, crossed_past, pp_flags,
    },
    tcp_state,
};

use crate::{
    maps::{EP_STATS, PROXY_HEADERS, SCRATCH_PROXY, SVC_STATS},
    parse::{
        Flow, IP_LEN, IP_OFF, L4_OFF, TCP_ACK, TCP_CHECK, TCP_FIN, TCP_RST, TCP_SYN, load, store,
    },
    step::Step,
};

const TCP_SEQ: usize = L4_OFF + 4;
const TCP_ACK_NO: usize = L4_OFF + 8;
const TCP_DOFF: usize = L4_OFF + 12;
const IP_TOT_LEN: usize = IP_OFF + 2;
/// Don't-fragment, in the first byte of the IPv4 fragment field.
const IP_DF: u8 = 0x40;
/// Ethernet, IPv4 and the largest TCP header: what moves to the new front.
pub const HEADS_MAX: usize = L4_OFF + 60;
/// TCP options are at most 40 bytes; the buffers are a power of two above.
const OPT_BUF: usize = 64;
const MAX_OPTS: usize = 40;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
/// Options walked at most looking for SACK (as `mss::find_mss`).
const MAX_STEPS: usize = 10;

/// The per-CPU working set of the insertion and the SACK rewrite.
#[repr(C)]
pub struct ProxyWork {
    /// Ethernet, IPv4 and TCP headers of the segment being grown.
    pub heads: [u8; HEADS_MAX + 2],
    /// The flow's addresses and ports, as the header carries them.
    pub addrs: [u8; 12],
    /// TCP options before and after the SACK edges moved.
    pub opts_old: [u8; OPT_BUF],
    pub opts_new: [u8; OPT_BUF],
}

/// What the PROXY steps need of a parsed packet, in one register: passing
/// a `&Flow` to an out-of-line function would pin the flow to the caller's
/// stack frame, which has no bytes to spare.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Seg(u32);

impl Seg {
    #[inline(always)]
    pub fn of(f: &Flow) -> Seg {
        Seg((f.tot_len as u32) << 16 | (f.tcp_flags as u32) << 8 | f.proto as u32)
    }
}

/// The fields of [`Seg`], as a `Flow` names them.
struct SegFields {
    proto: u8,
    tcp_flags: u8,
    tot_len: u16,
}

#[inline(always)]
fn fields(s: Seg) -> SegFields {
    SegFields {
        proto: s.0 as u8,
        tcp_flags: (s.0 >> 8) as u8,
        tot_len: (s.0 >> 16) as u16,
    }
}

/// TCP data offset in bytes, and the payload length of the segment `f`.
#[inline(always)]
fn tcp_lengths(ctx: &XdpContext, f: &SegFields) -> Option<(usize, u32)> {
    let doff = (load::<u8>(ctx, TCP_DOFF)? >> 4) as usize * 4;
    let payload = (f.tot_len as u32).checked_sub((IP_LEN + doff) as u32)?;
    (doff >= 20).then_some((doff, payload))
}

#[inline(always)]
fn seq(ctx: &XdpContext) -> Option<u32> {
    load::<u32>(ctx, TCP_SEQ).map(u32::from_be)
}

/// The PROXY header length of `endpoint_id`'s flows (0: none).
#[inline(always)]
pub fn header_len(endpoint_id: u32) -> u8 {
    match PROXY_HEADERS.get(endpoint_id) {
        Some(h) if h.len as usize <= HEADER_MAX => h.len as u8,
        _ => 0,
    }
}

/// The payload of the client SYN in `ctx` if it is one (no ACK): a flow of
/// a PROXY service must not be opened by a SYN that carries data.
#[inline(always)]
pub fn syn_payload(ctx: &XdpContext, tot_len: u16) -> Option<u32> {
    let f = SegFields {
        proto: IPPROTO_TCP,
        tcp_flags: TCP_SYN,
        tot_len,
    };
    tcp_lengths(ctx, &f).map(|(_, p)| p)
}

/// The slow path's PROXY step for a client segment, before its rewrite:
/// [`on_client_syn`], then whether the segment still fits its next hop once
/// grown. `NEXT`, a drop, or `Step::other(mtu)`: answer "fragmentation
/// needed" with `mtu` (the hop's, less the header), so that the client
/// sends segments that fit with the header.
#[inline(never)]
pub fn before_rewrite(ctx: XdpContext, seg: Seg, v: &mut CtFwdValue) -> Step {
    let f = &fields(seg);
    let s = on_client_syn(&ctx, f, v);
    if !s.is_next() {
        return s;
    }
    // Until the header went out no sequence number depends on its length:
    // the setting as it is now (another encoding, or off) applies.
    if v.pp_len != 0 && v.pp_flags & pp_flags::SENT == 0 {
        let len = header_len(v.endpoint_id);
        if len != v.pp_len {
            v.pp_len = len;
        }
    }
    let grow = growth_of(&ctx, f, v);
    if grow == 0 || f.tot_len as u32 + grow <= v.hop_mtu as u32 {
        return Step::NEXT;
    }
    match load::<u8>(&ctx, IP_OFF + 6) {
        Some(b) if b & IP_DF != 0 => Step::other((v.hop_mtu as u32).saturating_sub(grow)),
        _ => Step::drop(DropReason::ProxyNoRoom),
    }
}

/// A client SYN (no ACK): the flow learns the header's length (0: none)
/// and where the client's bytes start. A SYN carrying data is dropped: its
/// bytes would reach the backend before the header. A stray SYN on an
/// established flow that sent its header changes nothing (the backend
/// answers it with a challenge ACK, RFC 5961, and the connection goes on).
#[inline(always)]
fn on_client_syn(ctx: &XdpContext, f: &SegFields, v: &mut CtFwdValue) -> Step {
    if f.proto != IPPROTO_TCP || f.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Step::NEXT;
    }
    if v.pp_flags & pp_flags::SENT != 0 && v.tcp_state == tcp_state::ESTABLISHED {
        return Step::NEXT;
    }
    // The setting as it is now: a SYN starts the byte stream afresh.
    let len = header_len(v.endpoint_id);
    if v.pp_len != len {
        v.pp_len = len;
    }
    if v.pp_flags != 0 {
        v.pp_flags = 0;
    }
    if v.pp_len == 0 {
        return Step::NEXT;
    }
    // One value at a time: a pair of Options let LLVM read a register it
    // set on one path only, which the verifier refuses.
    let Some((_, payload)) = tcp_lengths(ctx, f) else {
        return Step::drop(DropReason::Malformed);
    };
    if payload != 0 {
        return Step::drop(DropReason::ProxySynData);
    }
    let Some(s) = seq(ctx) else {
        return Step::drop(DropReason::Malformed);
    };
    v.pp_first_seq = s.wrapping_add(1);
    Step::NEXT
}

/// Bytes the client segment `f` of flow `v` grows by: the header's length
/// for a segment that starts at the client's first byte and carries data
/// or a FIN, else 0. Out of line: one call, one register, in the consumer's
/// frames that are at the stack limit.
#[inline(never)]
pub fn growth(ctx: XdpContext, seg: Seg, v: &CtFwdValue) -> u32 {
    growth_of(&ctx, &fields(seg), v)
}

#[inline(always)]
fn growth_of(ctx: &XdpContext, f: &SegFields, v: &CtFwdValue) -> u32 {
    if v.pp_len == 0
        || v.pp_flags & pp_flags::PAST != 0
        || f.proto != IPPROTO_TCP
        || f.tcp_flags & (TCP_SYN | TCP_RST) != 0
    {
        return 0;
    }
    let Some(s) = seq(ctx) else {
        return 0;
    };
    if s != v.pp_first_seq {
        return 0;
    }
    let Some((_, payload)) = tcp_lengths(ctx, f) else {
        return 0;
    };
    if payload != 0 || f.tcp_flags & TCP_FIN != 0 {
        v.pp_len as u32
    } else {
        0
    }
}

/// A client segment of a PROXY flow on the slow path, already NATed (which
/// leaves sequence numbers, flags and payload as they were): the header
/// inserted, or the sequence number moved up.
#[inline(never)]
pub fn client_segment(ctx: XdpContext, seg: Seg, key: &CtFwdKey, v: &mut CtFwdValue) -> Step {
    let f = &fields(seg);
    let grow = growth_of(&ctx, f, v);
    if grow != 0 {
        let s = insert(
            XdpContext { ctx: ctx.ctx },
            key,
            v.endpoint_id,
            grow,
            f.tot_len as u32,
        );
        if s.is_next() {
            if v.pp_flags & pp_flags::SENT == 0 {
                v.pp_flags |= pp_flags::SENT;
            }
            count_header(v.service_id, v.endpoint_id);
        }
        return s;
    }
    shift_client_seq(&ctx, v)
}

#[inline(always)]
fn count_header(service_id: u32, endpoint_id: u32) {
    for c in [
        SVC_STATS.get_ptr_mut(service_id),
        EP_STATS.get_ptr_mut(endpoint_id),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        unsafe { (*c).proxy_headers += 1 };
    }
}

/// A client segment that does not carry the header: its sequence number
/// as the backend counts (the established path, where [`growth`] is 0).
#[inline(always)]
pub fn shift_client_seq(ctx: &XdpContext, v: &mut CtFwdValue) -> Step {
    let Some(s) = seq(ctx) else {
        return Step::drop(DropReason::Malformed);
    };
    let past = v.pp_flags & pp_flags::PAST != 0;
    if !past && crossed_past(s, v.pp_first_seq) {
        v.pp_flags |= pp_flags::PAST;
    }
    let moved = client_seq_to_backend(s, v.pp_first_seq, v.pp_len as u32, past);
    if moved != s && !rewrite_u32(ctx, TCP_SEQ, s, moved) {
        return Step::drop(DropReason::Malformed);
    }
    Step::NEXT
}

/// Replaces the TCP header word at `off` (host-order `old` → `new`) and
/// updates the TCP checksum.
#[inline(always)]
fn rewrite_u32(ctx: &XdpContext, off: usize, old: u32, new: u32) -> bool {
    let Some(check) = load::<u16>(ctx, TCP_CHECK) else {
        return false;
    };
    store::<u32>(ctx, off, new.to_be())
        && store::<u16>(
            ctx,
            TCP_CHECK,
            csum::update32(check, old.to_be(), new.to_be()),
        )
}

/// Grows the segment by `len` bytes in front of its payload and writes the
/// endpoint's header there: the Ethernet, IPv4 and TCP headers move to the
/// new front, the IPv4 length and both checksums are updated (the header's
/// words are added to the TCP checksum; the payload keeps its word
/// positions since `len` is a multiple of 4).
#[inline(always)]
fn insert(ctx: XdpContext, key: &CtFwdKey, endpoint_id: u32, len: u32, tot_len: u32) -> Step {
    let Some(h) = PROXY_HEADERS.get(endpoint_id) else {
        return Step::drop(DropReason::ProxyHeaderChanged);
    };
    // Bounded by a mask the compiler cannot drop (a volatile read): the
    // verifier needs the helper's length bounded in the same register.
    // SAFETY: reading a field of the map value we hold.
    let n = unsafe { core::ptr::read_volatile(&h.len) } as u32 & HEADER_MAX as u32;
    // The flow was opened with this length; another one now (the service's
    // link-id encoding changed) would break the flow's sequence shift.
    if n != len || n == 0 {
        return Step::drop(DropReason::ProxyHeaderChanged);
    }
    let len = n;
    let Some(w) = SCRATCH_PROXY.get_ptr_mut(0) else {
        return Step::drop(DropReason::ProxyNoRoom);
    };
    // SAFETY: this CPU's scratch slot; XDP runs to completion.
    let w = unsafe { &mut *w };
    let Some(doff) = load::<u8>(&ctx, TCP_DOFF) else {
        return Step::drop(DropReason::Malformed);
    };
    let heads = L4_OFF + (doff >> 4) as usize * 4;
    if !(L4_OFF + 20..=HEADS_MAX).contains(&heads) {
        return Step::drop(DropReason::Malformed);
    }
    // SAFETY: `heads` <= HEADS_MAX < the buffer; the helper checks the frame.
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, w.heads.as_mut_ptr().cast(), heads as u32) } != 0 {
        return Step::drop(DropReason::Malformed);
    }
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) } != 0 {
        return Step::drop(DropReason::ProxyNoRoom);
    }
    // The client's addresses and the endpoint's, network order.
    let a = &mut w.addrs;
    a[0..4].copy_from_slice(&key.src_addr_be[0].to_ne_bytes());
    a[4..8].copy_from_slice(&key.dst_addr_be[0].to_ne_bytes());
    a[8..10].copy_from_slice(&key.src_port_be.to_ne_bytes());
    a[10..12].copy_from_slice(&key.dst_port_be.to_ne_bytes());
    // SAFETY: stores from the scratch slot and the map value, lengths
    // bounded above; the helper checks the frame.
    let stored = unsafe {
        bpf_xdp_store_bytes(ctx.ctx, 0, w.heads.as_mut_ptr().cast(), heads as u32) == 0
            && bpf_xdp_store_bytes(ctx.ctx, heads as u32, h.bytes.as_ptr() as *mut _, len) == 0
            && bpf_xdp_store_bytes(
                ctx.ctx,
                (heads + ADDRS_OFF) as u32,
                w.addrs.as_mut_ptr().cast(),
                12,
            ) == 0
    };
    if !stored {
        return Step::drop(DropReason::ProxyNoRoom);
    }
    let (Some(ip_check), Some(tcp_check)) =
        (load::<u16>(&ctx, IP_OFF + 10), load::<u16>(&ctx, TCP_CHECK))
    else {
        return Step::drop(DropReason::Malformed);
    };
    let (old_tot, new_tot) = ((tot_len as u16).to_be(), ((tot_len + len) as u16).to_be());
    let (old_tcp, new_tcp) = (
        ((tot_len - IP_LEN as u32) as u16).to_be(),
        ((tot_len - IP_LEN as u32 + len) as u16).to_be(),
    );
    let addr_sum = csum::sum_words(&w.addrs);
    let mut t = csum::update16(tcp_check, old_tcp, new_tcp);
    t = csum::add(t, h.sum + addr_sum);
    if !(store::<u16>(&ctx, IP_TOT_LEN, new_tot)
        && store::<u16>(
            &ctx,
            IP_OFF + 10,
            csum::update16(ip_check, old_tot, new_tot),
        )
        && store::<u16>(&ctx, TCP_CHECK, t))
    {
        return Step::drop(DropReason::Malformed);
    }
    Step::NEXT
}

/// A backend segment of a PROXY flow, already NATed: its acknowledgement
/// and SACK edges moved down by the header's length.
#[inline(always)]
pub fn backend_segment(ctx: &XdpContext, f: &Flow, v: &CtFwdValue) -> Step {
    if v.pp_len == 0 || f.proto != IPPROTO_TCP || f.tcp_flags & TCP_ACK == 0 {
        return Step::NEXT;
    }
    let (first, len) = (v.pp_first_seq, v.pp_len as u32);
    let past = v.pp_flags & pp_flags::PAST != 0;
    let Some(ack) = load::<u32>(ctx, TCP_ACK_NO).map(u32::from_be) else {
        return Step::drop(DropReason::Malformed);
    };
    let moved = backend_ack_to_client(ack, first, len, past);
    if moved != ack && !rewrite_u32(ctx, TCP_ACK_NO, ack, moved) {
        return Step::drop(DropReason::Malformed);
    }
    match load::<u8>(ctx, TCP_DOFF) {
        Some(d) if d >> 4 > 5 => sack(
            XdpContext { ctx: ctx.ctx },
            first,
            len,
            f.tot_len as u32,
            past,
        ),
        _ => Step::NEXT,
    }
}

/// Moves the edges of a SACK option (RFC 2018) like acknowledgements.
/// Out of line: the option walk is verified once. The checksum follows by
/// the difference of the option bytes before and after (their length is a
/// multiple of 4, as `bpf_csum_diff` wants).
#[inline(never)]
fn sack(ctx: XdpContext, first: u32, len: u32, tot_len: u32, past: bool) -> Step {
    let Some(w) = SCRATCH_PROXY.get_ptr_mut(0) else {
        return Step::NEXT;
    };
    // SAFETY: this CPU's scratch slot.
    let w = unsafe { &mut *w };
    let Some(doff) = load::<u8>(&ctx, TCP_DOFF) else {
        return Step::NEXT;
    };
    let opt_len = (doff >> 4) as usize * 4 - 20;
    if opt_len == 0 || opt_len > MAX_OPTS || IP_LEN + 20 + opt_len > tot_len as usize {
        return Step::NEXT;
    }
    // SAFETY: opt_len <= MAX_OPTS < OPT_BUF; the helper checks the frame.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            (L4_OFF + 20) as u32,
            w.opts_old.as_mut_ptr().cast(),
            opt_len as u32,
        )
    };
    if rc != 0 {
        return Step::NEXT;
    }
    let Some((at, blocks)) = find_sack(&w.opts_old, opt_len) else {
        return Step::NEXT;
    };
    w.opts_new = w.opts_old;
    let mut changed = false;
    for i in 0..4usize {
        if i >= blocks {
            break;
        }
        for edge in 0..2usize {
            let o = at + 2 + i * 8 + edge * 4;
            let b = |k: usize| w.opts_old[(o + k) & (OPT_BUF - 1)];
            let old = u32::from_be_bytes([b(0), b(1), b(2), b(3)]);
            let new = backend_ack_to_client(old, first, len, past);
            if new != old {
                changed = true;
                for (k, byte) in new.to_be_bytes().into_iter().enumerate() {
                    w.opts_new[(o + k) & (OPT_BUF - 1)] = byte;
                }
            }
        }
    }
    if !changed {
        return Step::NEXT;
    }
    let Some(check) = load::<u16>(&ctx, TCP_CHECK) else {
        return Step::NEXT;
    };
    // SAFETY: both buffers hold opt_len (a multiple of 4, <= 40) bytes.
    let diff = unsafe {
        bpf_csum_diff(
            w.opts_old.as_mut_ptr().cast(),
            opt_len as u32,
            w.opts_new.as_mut_ptr().cast(),
            opt_len as u32,
            0,
        )
    };
    if diff < 0 {
        return Step::NEXT;
    }
    // SAFETY: as the load above.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            (L4_OFF + 20) as u32,
            w.opts_new.as_mut_ptr().cast(),
            opt_len as u32,
        )
    };
    if rc != 0 || !store::<u16>(&ctx, TCP_CHECK, csum::add(check, diff as u32)) {
        return Step::drop(DropReason::Malformed);
    }
    Step::NEXT
}

/// Offset and block count of the SACK option in the first `len` bytes.
#[inline(always)]
fn find_sack(opts: &[u8; OPT_BUF], len: usize) -> Option<(usize, usize)> {
    let mut i = 0usize;
    for _ in 0..MAX_STEPS {
        if i + 10 > len {
            return None;
        }
        let kind = opts[i & (OPT_BUF - 1)];
        let olen = opts[(i + 1) & (OPT_BUF - 1)] as usize;
        if kind == OPT_SACK {
            let blocks = olen.wrapping_sub(2) / 8;
            let valid =
                olen >= 10 && (olen - 2).is_multiple_of(8) && blocks <= 4 && i + olen <= len;
            return valid.then_some((i, blocks));
        }
        if kind == OPT_END {
            return None;
        }
        let step = if kind == OPT_NOP { 1 } else { olen };
        if step == 0 || (kind != OPT_NOP && step < 2) {
            return None;
        }
        i += step;
    }
    None
}
