//! The benchmark reference: a minimal IPv4 forwarder, the ceiling plink's
//! datapath is compared against in BENCHMARKS.md (`cargo xtask bench`).
//!
//! It is **not** part of plink: `plink-ctl` never loads or attaches it. It
//! does what any XDP router must do and nothing more, as the kernel's
//! `samples/bpf/xdp_fwd` does: parse Ethernet/IPv4, `bpf_fib_lookup` from
//! the ingress interface, rewrite the MACs, decrement the TTL with an
//! incremental header checksum (RFC 1624) and `bpf_redirect`. Anything it
//! cannot forward (not IPv4, TTL ≤ 1, no route or no neighbour) goes to the
//! kernel with XDP_PASS, so the kernel can answer or resolve it.
//! No maps, no counters: it is meant to be the cheapest honest forwarder.
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::generated::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect},
    programs::XdpContext,
};

use crate::parse::{ETH_P_IP, IP_LEN, IP_OFF, ptr_at};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    // One bounds check for the Ethernet and IPv4 headers.
    let Some(p) = ptr_at::<[u8; IP_OFF + IP_LEN]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let p = p.cast::<u8>();
    // SAFETY: every offset below is inside the checked IP_OFF + IP_LEN bytes.
    unsafe {
        if u16::from_be(p.add(12).cast::<u16>().read_unaligned()) != ETH_P_IP {
            return xdp_action::XDP_PASS;
        }
        let ttl = *p.add(IP_OFF + 8);
        if ttl <= 1 {
            return xdp_action::XDP_PASS;
        }
        // SAFETY (zeroed): plain C struct, all-zero is a valid value.
        let mut fib: bpf_fib_lookup = core::mem::zeroed();
        fib.family = AF_INET;
        fib.__bindgen_anon_2.tos = *p.add(IP_OFF + 1);
        fib.l4_protocol = *p.add(IP_OFF + 9);
        fib.__bindgen_anon_1.tot_len =
            u16::from_be(p.add(IP_OFF + 2).cast::<u16>().read_unaligned());
        fib.ifindex = ctx.ingress_ifindex() as u32;
        fib.__bindgen_anon_3.ipv4_src = p.add(IP_OFF + 12).cast::<u32>().read_unaligned();
        fib.__bindgen_anon_4.ipv4_dst = p.add(IP_OFF + 16).cast::<u32>().read_unaligned();
        let rc = fib_lookup_helper(
            ctx.ctx.cast(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        );
        if rc as u32 != BPF_FIB_LKUP_RET_SUCCESS {
            return xdp_action::XDP_PASS;
        }
        // TTL is the high byte of its 16-bit checksum word: adding 0x0100
        // (network order) to the checksum undoes the decrement (RFC 1624).
        let check_p = p.add(IP_OFF + 10).cast::<u16>();
        let sum = check_p.read_unaligned() as u32 + 0x0100u16.to_be() as u32;
        check_p.write_unaligned((sum + (sum >> 16)) as u16);
        *p.add(IP_OFF + 8) = ttl - 1;
        p.cast::<[u8; 6]>().write_unaligned(fib.dmac);
        p.add(6).cast::<[u8; 6]>().write_unaligned(fib.smac);
        bpf_redirect(fib.ifindex, 0) as u32
    }
}
