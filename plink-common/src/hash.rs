//! The flow hash (backend selection, element-reuse check) and NAT port probing.
use super::*;

/// The flow hash that picks a backend: `LB_TABLE[lb_offset + flow_hash(k) % lb_size]`.
/// Over the whole forward key (consumer network included), so userspace can
/// predict a flow's backend. A murmur3-style mix: cheap in BPF, no loops.
#[inline(always)]
pub fn flow_hash(k: &CtFwdKey) -> u32 {
    let ports = ((k.src_port_be as u32) << 16) | k.dst_port_be as u32;
    let mut h: u32 = 0x9747_b28c ^ k.proto as u32;
    h = mix(h, k.src_addr_be[0]);
    h = mix(h, k.src_addr_be[1]);
    h = mix(h, k.src_addr_be[2]);
    h = mix(h, k.src_addr_be[3]);
    h = mix(h, k.dst_addr_be[0]);
    h = mix(h, k.dst_addr_be[1]);
    h = mix(h, k.dst_addr_be[2]);
    h = mix(h, k.dst_addr_be[3]);
    h = mix(h, k.network_id);
    h = mix(h, ports);
    fmix(h ^ 44)
}

#[inline(always)]
fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// NAT slot tried at probe `i` of a new flow: `(hash + i) % nat_count`.
/// Probing is deterministic so that tests and the controller can predict it.
#[inline(always)]
pub fn nat_probe_slot(hash: u32, i: u32, nat_count: u32) -> u32 {
    // checked_rem: no panic path for the BPF target even if nat_count is 0.
    hash.wrapping_add(i).checked_rem(nat_count).unwrap_or(0)
}

/// NAT port (host order) tried at probe `i` in a slot with range `min..=max`.
///
/// Each flow walks the range with its own stride: probing linearly from the
/// hash (one stride for everyone) builds runs of taken ports, and a new flow
/// landing in a run longer than the probe budget fails while half the range
/// is free. With per-flow strides a probe fails with the pool's utilisation as
/// its chance, nearly independently of the others. The stride is a prime
/// that does not divide the range, so it is coprime with it and the first
/// `min(range, NAT_PORT_PROBES)` probes are distinct ports. A range that the
/// probe budget covers is walked linearly, so its last free port is found.
#[inline(always)]
pub fn nat_probe_port(hash: u32, i: u32, min: u16, max: u16) -> u16 {
    let range = (max as u32).wrapping_sub(min as u32).wrapping_add(1);
    let stride = if range <= NAT_PORT_PROBES {
        1
    } else {
        nat_probe_stride(hash, range)
    };
    let step = (i as u64).wrapping_mul(stride as u64);
    let off = ((hash >> 8) as u64)
        .wrapping_add(step)
        .checked_rem(range as u64)
        .unwrap_or(0);
    min.wrapping_add(off as u16)
}

/// Primes above [`NAT_PORT_PROBES`], spread over the port space. A range of
/// at most 65,536 ports has at most three distinct prime factors this large
/// (37 × 41 × 43 × 47 > 65,536), so of four consecutive entries one never
/// divides the range.
const NAT_PROBE_STRIDES: [u32; 32] = [
    37, 101, 211, 401, 809, 1201, 1601, 2003, 2411, 3203, 4001, 4801, 5623, 6397, 7207, 8009, 9001,
    10007, 12007, 14009, 16001, 18013, 20011, 24007, 28001, 32003, 36007, 40009, 44017, 48017,
    54001, 60013,
];

/// The probe stride of a flow: a prime chosen by the hash, skipping (at most
/// three) primes that divide `range`. `range` must be above 1.
#[inline(always)]
pub fn nat_probe_stride(hash: u32, range: u32) -> u32 {
    let sel = (hash.wrapping_mul(0x9E37_79B1) >> 27) as usize;
    let mut k = 0;
    while k < 4 {
        let p = NAT_PROBE_STRIDES[(sel + k) & 31];
        if range.checked_rem(p).unwrap_or(0) != 0 {
            return p;
        }
        k += 1;
    }
    // Unreachable for ranges up to 65,536 (see above); 1 is coprime with all.
    1
}
