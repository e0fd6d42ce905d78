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
    fn udp_zero_rules() {
        assert_eq!(udp_finish(0, 0x1234), 0);
        assert_eq!(udp_finish(5, 0), 0xffff);
        assert_eq!(udp_finish(5, 7), 7);
    }
}
