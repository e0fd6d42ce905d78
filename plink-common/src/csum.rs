//! Incremental Internet checksum updates (RFC 1624, eqn. 3:
//! `HC' = ~(~HC + ~m + m')`).
//!
//! One's-complement sums do not depend on byte order, so these work on 16-bit
//! words exactly as loaded from the packet (native loads of big-endian data):
//! the caller never swaps. Updating this way keeps a valid checksum valid and
//! an invalid one invalid by the same amount, which is what a NAT must do.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum after one 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// Checksum after one 32-bit (two-word) field changed from `old` to `new`.
#[inline(always)]
pub fn update32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new & 0xffff)
        + (new >> 16);
    !fold(sum)
}

/// Checksum after a 128-bit field (an IPv6 address as an `Addr`: four
/// words as loaded from the packet) changed from `old` to `new`.
#[inline(always)]
pub fn update128(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut c = check;
    let mut i = 0;
    while i < 4 {
        c = update32(c, old[i], new[i]);
        i += 1;
    }
    c
}

/// Checksum after data whose one's-complement word sum is `sum` (native
/// 16-bit loads, unfolded) was added to the covered bytes.
#[inline(always)]
pub fn add(check: u16, sum: u32) -> u16 {
    let mut s = (!check) as u64 + sum as u64;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The word sum (unfolded) of 12 bytes as native 16-bit loads, e.g. the
/// addresses and ports of a PROXY header.
#[inline(always)]
pub fn sum_words(b: &[u8; 12]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < 12 {
        s += u16::from_ne_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

/// UDP over IPv4: a zero checksum means "none" and must stay zero; a computed
/// zero is sent as 0xFFFF (RFC 768), its one's-complement twin.
#[inline(always)]
pub fn udp_finish(original: u16, updated: u16) -> u16 {
    if original == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// Full checksum over big-endian words, for comparison.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        !fold(fold(sum) as u32)
    }

    #[test]
    fn incremental_matches_full() {
        let mut data = [
            0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let c = full(&data);
        data[5] = c;
        assert_eq!(full(&data), 0, "valid header sums to zero");
        let old = ((data[8] as u32) << 16) | data[9] as u32;
        let new = 0xc633_64c8u32;
        data[8] = (new >> 16) as u16;
        data[9] = new as u16;
        // The checksum word is part of the sum; recompute with it zeroed.
        data[5] = update32(c, old, new);
        assert_eq!(full(&data), 0);
        // An invalid checksum stays invalid.
        data[5] = data[5].wrapping_add(1);
        let bad = data[5];
        data[5] = update16(bad, data[4], 0x3f11);
        data[4] = 0x3f11;
        assert_ne!(full(&data), 0);
    }

    #[test]
    fn adding_words_matches_a_full_sum() {
        let data = [0x4500u16, 0x0073, 0x1234, 0xfedc, 0x0001];
        let c = full(&data);
        let extra = [0xabcdu16, 0xffff, 0x0102, 0x8000, 0x7fff, 0x0];
        let mut all = data.to_vec();
        all.extend_from_slice(&extra);
        let sum: u32 = extra.iter().map(|w| *w as u32).sum();
        assert_eq!(add(c, sum), full(&all));
        let bytes: [u8; 12] = core::array::from_fn(|i| (i * 37 + 5) as u8);
        let words: std::vec::Vec<u16> = bytes
            .chunks(2)
            .map(|w| u16::from_ne_bytes([w[0], w[1]]))
            .collect();
        let mut with = data.to_vec();
        with.extend_from_slice(&words);
        assert_eq!(add(c, sum_words(&bytes)), full(&with));
    }

    #[test]
    fn update128_matches_a_full_sum() {
        let mut data = [0x2001u16, 0x0db8, 0x00c1, 0, 0, 0, 0, 0x0001, 0x1234, 0];
        let c = full(&data);
        data[9] = c;
        let word = |d: &[u16], i: usize| (u32::from(d[i]) << 16) | u32::from(d[i + 1]);
        let old = [
            word(&data, 0),
            word(&data, 2),
            word(&data, 4),
            word(&data, 6),
        ];
        let new_words = [0x2001u16, 0x0db8, 0x0100, 0, 0, 0, 0xabcd, 0x0200];
        data[..8].copy_from_slice(&new_words);
        let new = [
            word(&data, 0),
            word(&data, 2),
            word(&data, 4),
            word(&data, 6),
        ];
        data[9] = update128(c, &old, &new);
        assert_eq!(full(&data), 0);
    }

    #[test]
    fn udp_zero_rules() {
        assert_eq!(udp_finish(0, 0x1234), 0);
        assert_eq!(udp_finish(5, 0), 0xffff);
        assert_eq!(udp_finish(5, 7), 7);
    }
}
