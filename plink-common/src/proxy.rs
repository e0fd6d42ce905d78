//! PROXY protocol v2 (haproxy.org's proxy-protocol.txt, section 2.2): the
//! header the consumer program puts in front of a proxy-protocol flow's first
//! client bytes, so the backend learns the client's own address and port, the
//! endpoint it came through, and the endpoint's link id.
//!
//! The controller builds one header per endpoint ([`build_header`]) and
//! writes it to `PROXY_HEADERS[endpoint_id]`; only the 12 address and port
//! bytes at [`ADDRS_OFF`] differ per flow, and the datapath fills them in.
//! The header's length is a multiple of four (a NOOP TLV pads it): the
//! client's bytes then keep their 16-bit word positions in the segment, so
//! the TCP checksum is updated by adding the header's words, never
//! recomputed over the payload.

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
pub const VERSION_PROXY: u8 = 0x21;
/// Address family AF_INET, transport STREAM (TCP over IPv4).
pub const FAMILY_TCP4: u8 = 0x11;
/// Where the source address, destination address, source port and
/// destination port (all network order, 4 + 4 + 2 + 2 bytes) start.
pub const ADDRS_OFF: usize = 16;
/// Bytes of the fixed part: signature, version/command, family, length,
/// the IPv4 addresses and ports.
pub const FIXED_LEN: usize = ADDRS_OFF + 12;
/// Largest header plink inserts (the fixed part and every TLV): a multiple
/// of 4 whose bits mask any multiple of 4 up to it (0x7c), so the datapath
/// bounds a header's length with one AND.
pub const HEADER_MAX: usize = 124;

/// TLV types (proxy-protocol.txt 2.2.x and the clouds' own types).
pub mod tlv {
    /// PP2_TYPE_NOOP: padding, its value ignored.
    pub const NOOP: u8 = 0x04;
    /// AWS: subtype 0x01, the VPC endpoint id as a string.
    pub const AWS: u8 = 0xEA;
    pub const AWS_VPCE_ID: u8 = 0x01;
    /// Azure: subtype 0x01, the LINKID as a 32-bit little-endian integer.
    pub const AZURE: u8 = 0xEE;
    pub const AZURE_LINKID: u8 = 0x01;
    /// GCP: the PSC connection id, a 64-bit big-endian integer.
    pub const GCP: u8 = 0xE0;
    /// Custom types a service may choose (a 4-byte big-endian link id).
    pub const CUSTOM_MIN: u8 = 0xE0;
    pub const CUSTOM_MAX: u8 = 0xEF;
}

/// How an endpoint's link id is encoded (`proxy_protocol.link_id_tlv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkIdTlv {
    /// 0xEE, subtype 0x01, 4-byte little-endian link id.
    Azure,
    /// 0xEA, subtype 0x01, the endpoint's name.
    Aws,
    /// 0xE0, 8-byte big-endian link id (zero-extended).
    Gcp,
    /// The given type (0xE0..=0xEF), 4-byte big-endian link id.
    Custom(u8),
}

/// Value of `PROXY_HEADERS`, indexed by endpoint id. `len` 0: the endpoint's
/// service sends no PROXY header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Bytes of `bytes` in use: a multiple of 4, at most [`HEADER_MAX`].
    pub len: u16,
    pub _pad: u16,
    /// One's-complement sum (folded to 16 bits, RFC 1071) of `bytes[..len]`
    /// as native 16-bit loads, with the 12 address bytes zero: what the
    /// datapath adds to the TCP checksum before the flow's addresses.
    pub sum: u32,
    pub bytes: [u8; HEADER_MAX],
}
const _: () = assert!(core::mem::size_of::<ProxyHeader>() == 132);
const _: () = assert!(HEADER_MAX == 0x7c);

impl Default for ProxyHeader {
    fn default() -> Self {
        ProxyHeader {
            len: 0,
            _pad: 0,
            sum: 0,
            bytes: [0; HEADER_MAX],
        }
    }
}

/// Why a header cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The TLV would make the header longer than [`HEADER_MAX`]; carries the
    /// longest name (`aws`) that fits.
    TooLong { max_name: usize },
    /// A custom type outside 0xE0..=0xEF.
    BadType(u8),
}

/// The longest endpoint name an `aws` TLV can carry within [`HEADER_MAX`]
/// (the NOOP padding may need up to 6 bytes).
pub const AWS_NAME_MAX: usize = HEADER_MAX - FIXED_LEN - 4 - 6;

/// The header for an endpoint with `link_id` (and `name`, for `aws`), its
/// address bytes zero.
pub fn build_header(
    kind: LinkIdTlv,
    link_id: u32,
    name: &[u8],
) -> Result<ProxyHeader, HeaderError> {
    let mut h = ProxyHeader::default();
    let b = &mut h.bytes;
    b[..12].copy_from_slice(&SIGNATURE);
    b[12] = VERSION_PROXY;
    b[13] = FAMILY_TCP4;
    let mut at = FIXED_LEN;
    let put_tlv = |b: &mut [u8; HEADER_MAX], at: &mut usize, ty: u8, value: &[&[u8]]| {
        let n: usize = value.iter().map(|v| v.len()).sum();
        b[*at] = ty;
        b[*at + 1..*at + 3].copy_from_slice(&(n as u16).to_be_bytes());
        *at += 3;
        for v in value {
            b[*at..*at + v.len()].copy_from_slice(v);
            *at += v.len();
        }
    };
    match kind {
        LinkIdTlv::Azure => put_tlv(
            b,
            &mut at,
            tlv::AZURE,
            &[&[tlv::AZURE_LINKID], &link_id.to_le_bytes()],
        ),
        LinkIdTlv::Aws => {
            if name.len() > AWS_NAME_MAX {
                return Err(HeaderError::TooLong {
                    max_name: AWS_NAME_MAX,
                });
            }
            put_tlv(b, &mut at, tlv::AWS, &[&[tlv::AWS_VPCE_ID], name])
        }
        LinkIdTlv::Gcp => put_tlv(b, &mut at, tlv::GCP, &[&(link_id as u64).to_be_bytes()]),
        LinkIdTlv::Custom(ty) => {
            if !(tlv::CUSTOM_MIN..=tlv::CUSTOM_MAX).contains(&ty) {
                return Err(HeaderError::BadType(ty));
            }
            put_tlv(b, &mut at, ty, &[&link_id.to_be_bytes()])
        }
    }
    // Pad to a multiple of 4 with a NOOP TLV (3 bytes plus its value).
    let pad = match at % 4 {
        0 => 0,
        r => {
            let mut need = 4 - r;
            while need < 3 {
                need += 4;
            }
            need
        }
    };
    if pad > 0 {
        let zeros = [0u8; 8];
        put_tlv(b, &mut at, tlv::NOOP, &[&zeros[..pad - 3]]);
    }
    debug_assert!(at <= HEADER_MAX && at.is_multiple_of(4));
    let rest = (at - ADDRS_OFF) as u16;
    b[14..16].copy_from_slice(&rest.to_be_bytes());
    h.len = at as u16;
    h.sum = ones_sum(&h.bytes[..at]) as u32;
    Ok(h)
}

/// One's-complement sum of `bytes` (even length) as native 16-bit loads,
/// folded: the word sum `csum` adds to a checksum (RFC 1071).
pub fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for w in bytes.chunks(2) {
        let pair = [w[0], *w.get(1).unwrap_or(&0)];
        sum += u16::from_ne_bytes(pair) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Bits of `CtFwdValue::pp_flags`.
pub mod pp_flags {
    /// The header went out (in front of the first byte): its length is
    /// fixed for the flow's life, and a stray SYN does not reset it.
    pub const SENT: u8 = 1;
    /// The client is more than [`super::PAST_AFTER`] bytes past its first
    /// byte: from then on every client segment is after the first byte.
    /// (Sequence numbers compare modulo 2^32; without this bit the
    /// comparison with the first byte would turn around after 2 GiB.)
    pub const PAST: u8 = 2;
}

/// Client bytes after which [`pp_flags::PAST`] is set: more than any TCP
/// window (2^30 with the largest window scale), less than 2^31, where the
/// signed comparison with the first byte would turn.
pub const PAST_AFTER: u32 = 1 << 30;

/// Is the client segment at `seq` far enough past the first byte to set
/// [`pp_flags::PAST`]?
#[inline(always)]
pub fn crossed_past(seq: u32, first: u32) -> bool {
    let d = seq.wrapping_sub(first);
    d > PAST_AFTER && d < 1 << 31
}

/// Sequence number `seq` of a client segment, as the backend sees it: the
/// header's `len` bytes sit in front of the client's first byte `first`,
/// so everything after it moves up by `len`. The first byte itself keeps
/// its number (the header is inserted in front of it, in that segment).
/// `past`: [`pp_flags::PAST`] is set.
#[inline(always)]
pub fn client_seq_to_backend(seq: u32, first: u32, len: u32, past: bool) -> u32 {
    if past || (seq.wrapping_sub(first) as i32) > 0 {
        seq.wrapping_add(len)
    } else {
        seq
    }
}

/// An acknowledgement (or SACK edge) `ack` from the backend, as the client
/// sees it: the header's bytes are taken back out. An ack inside the header
/// (part of it received) acknowledges none of the client's bytes: `first`.
#[inline(always)]
pub fn backend_ack_to_client(ack: u32, first: u32, len: u32, past: bool) -> u32 {
    if past {
        return ack.wrapping_sub(len);
    }
    let after = ack.wrapping_sub(first) as i32;
    if after <= 0 {
        ack
    } else if after as u32 <= len {
        first
    } else {
        ack.wrapping_sub(len)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn headers_are_word_aligned_and_announce_their_length() {
        let long = [b'e'; AWS_NAME_MAX];
        for (kind, name) in [
            (LinkIdTlv::Azure, &b""[..]),
            (LinkIdTlv::Gcp, b""),
            (LinkIdTlv::Custom(0xE5), b""),
            (LinkIdTlv::Aws, b"ep"),
            (LinkIdTlv::Aws, b"vpce-0123456789abcdef0"),
            (LinkIdTlv::Aws, &long[..]),
        ] {
            let h = build_header(kind, 0x0102_0304, name).unwrap();
            let len = h.len as usize;
            assert_eq!(len % 4, 0, "{kind:?}");
            assert!(len <= HEADER_MAX);
            assert_eq!(&h.bytes[..12], &SIGNATURE);
            let rest = u16::from_be_bytes([h.bytes[14], h.bytes[15]]) as usize;
            assert_eq!(rest + 16, len, "{kind:?}: length field");
            assert_eq!(h.sum as u16, ones_sum(&h.bytes[..len]));
        }
        assert_eq!(
            build_header(LinkIdTlv::Aws, 1, &[b'x'; AWS_NAME_MAX + 1]),
            Err(HeaderError::TooLong {
                max_name: AWS_NAME_MAX
            })
        );
        assert_eq!(
            build_header(LinkIdTlv::Custom(0xD0), 1, b""),
            Err(HeaderError::BadType(0xD0))
        );
    }

    #[test]
    fn azure_link_id_is_little_endian_after_its_subtype() {
        let h = build_header(LinkIdTlv::Azure, 0x0A0B_0C0D, b"").unwrap();
        let t = &h.bytes[FIXED_LEN..];
        assert_eq!(t[0], tlv::AZURE);
        assert_eq!(u16::from_be_bytes([t[1], t[2]]), 5);
        assert_eq!(&t[3..8], &[0x01, 0x0D, 0x0C, 0x0B, 0x0A]);
    }

    #[test]
    fn sequence_numbers_shift_around_the_first_byte() {
        let first = u32::MAX - 2; // wraps inside the window
        assert_eq!(client_seq_to_backend(first, first, 44, false), first);
        assert_eq!(
            client_seq_to_backend(first - 1, first, 44, false),
            first - 1
        );
        assert_eq!(
            client_seq_to_backend(first.wrapping_add(10), first, 44, false),
            51
        );
        for d in 0..200u32 {
            let seq = first.wrapping_add(d);
            let b = client_seq_to_backend(seq, first, 44, false);
            // The backend acking what it got maps back to the client's seq.
            let ack_all = if d == 0 { b.wrapping_add(44) } else { b };
            assert_eq!(backend_ack_to_client(ack_all, first, 44, false), seq);
        }
        // Part of the header acknowledged: nothing of the client's.
        assert_eq!(
            backend_ack_to_client(first.wrapping_add(20), first, 44, false),
            first
        );
        assert_eq!(
            backend_ack_to_client(first.wrapping_sub(1), first, 44, false),
            first.wrapping_sub(1)
        );
    }

    /// A connection that uploads more than 2 GiB: once past 2^30 bytes the
    /// flow is marked, and the shift holds at 2^31 and 2^32 and beyond,
    /// where the signed comparison with the first byte turns around.
    #[test]
    fn the_shift_holds_past_two_and_four_gibibytes() {
        let first = 0x1234_5678u32;
        let len = 36;
        let mut past = false;
        let mut offset: u64 = 1;
        // Walk the stream in 64 MiB steps (a window's worth at a time).
        while offset < (5u64 << 30) {
            let seq = first.wrapping_add(offset as u32);
            if !past && crossed_past(seq, first) {
                assert!(offset > PAST_AFTER as u64 && offset < 1 << 31);
                past = true;
            }
            let b = client_seq_to_backend(seq, first, len, past);
            assert_eq!(b, seq.wrapping_add(len), "offset {offset}");
            assert_eq!(
                backend_ack_to_client(b, first, len, past),
                seq,
                "offset {offset}"
            );
            offset += 64 << 20;
        }
        assert!(past);
        // Without the mark, exactly what went wrong: unshifted after 2 GiB.
        let at_2g = first.wrapping_add((1u32 << 31) + 10);
        assert_eq!(client_seq_to_backend(at_2g, first, len, false), at_2g);
        assert_eq!(
            client_seq_to_backend(at_2g, first, len, true),
            at_2g.wrapping_add(len)
        );
    }
}
