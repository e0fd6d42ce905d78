//! Packet builders and checksum verifiers for golden tests. Everything here
//! computes checksums from scratch, never incrementally, so it is an
//! independent check on the datapath's RFC 1624 updates.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// One's-complement sum of `bytes` (odd length padded with a zero byte).
pub fn sum16(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    sum
}

pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `bytes` (checksum field included as it is).
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum16(bytes))
}

/// The L4 header + payload part of a frame, and its pseudo-header sum.
fn l4_sum(frame: &[u8]) -> (u8, usize, u32) {
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let proto = frame[23];
    let l4 = &frame[14 + ihl..14 + tot_len];
    // ICMP has no pseudo-header.
    if proto == IPPROTO_ICMP {
        return (proto, 14 + ihl, sum16(l4));
    }
    let pseudo = sum16(&frame[26..34]) + proto as u32 + l4.len() as u32;
    (proto, 14 + ihl, pseudo + sum16(l4))
}

/// Is the IPv4 header checksum of an Ethernet frame valid?
pub fn ip_checksum_ok(frame: &[u8]) -> bool {
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    fold(sum16(&frame[14..14 + ihl])) == 0xffff
}

/// Is the TCP/UDP checksum of an Ethernet/IPv4 frame valid? (UDP 0 = none = valid.)
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let (proto, l4_off, sum) = l4_sum(frame);
    if proto == IPPROTO_UDP && frame[l4_off + 6..l4_off + 8] == [0, 0] {
        return true;
    }
    fold(sum) == 0xffff
}

/// How far the L4 checksum field is from the correct one (0 = valid), in
/// one's-complement arithmetic: an incremental update must preserve it.
pub fn l4_checksum_error(frame: &[u8]) -> u16 {
    let (_, _, sum) = l4_sum(frame);
    // A valid checksum makes the total 0xffff; the error is the excess.
    let s = fold(sum);
    if s == 0xffff { 0 } else { s }
}

/// How far the IPv4 header checksum is from the correct one (0 = valid).
pub fn ip_checksum_error(frame: &[u8]) -> u16 {
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    let s = fold(sum16(&frame[14..14 + ihl]));
    if s == 0xffff { 0 } else { s }
}

/// Recomputes the IP and L4 checksums of a frame in place.
pub fn fix_checksums(frame: &mut [u8]) {
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    let proto = frame[23];
    let off = 14
        + ihl
        + match proto {
            IPPROTO_TCP => 16,
            IPPROTO_ICMP => 2,
            _ => 6,
        };
    frame[off..off + 2].copy_from_slice(&[0, 0]);
    let (_, _, sum) = l4_sum(frame);
    let mut c = !fold(sum);
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    frame[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

/// An Ethernet/IPv4/TCP, UDP or ICMP frame description. For ICMP the
/// header is `[tcp_flags (type), icmp_code, checksum, seq (4 bytes)]`: an
/// echo's identifier and sequence number, or an error's unused/MTU word.
#[derive(Clone, Debug)]
pub struct Ipv4Packet {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub ip_id: u16,
    /// TCP flags (ignored for UDP).
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub icmp_code: u8,
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self {
            eth_dst: [0; 6],
            eth_src: [0; 6],
            src: src.0,
            dst: dst.0,
            proto: IPPROTO_TCP,
            sport: src.1,
            dport: dst.1,
            ttl: 64,
            ip_id: 0x1234,
            tcp_flags: flags,
            seq: 1000,
            ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
            icmp_code: 0,
            payload: Vec::new(),
        }
    }

    /// An ICMP message: type, code, the 4-byte rest of the header, and the
    /// data after it (an echo's payload, or an error's quoted packet).
    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, code: u8, rest: u32, data: &[u8]) -> Self {
        Self {
            proto: IPPROTO_ICMP,
            tcp_flags: ty,
            icmp_code: code,
            seq: rest,
            payload: data.to_vec(),
            ..Self::tcp((src, 0), (dst, 0), 0)
        }
    }

    /// An echo request (`request`) or reply with identifier `id`.
    pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, request: bool, id: u16, seq: u16) -> Self {
        let ty = if request {
            ICMP_ECHO_REQUEST
        } else {
            ICMP_ECHO_REPLY
        };
        Self::icmp(
            src,
            dst,
            ty,
            0,
            ((id as u32) << 16) | seq as u32,
            b"plink-ping-payload",
        )
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Self {
        Self {
            proto: IPPROTO_UDP,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    /// The frame with correct checksums.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(64 + self.payload.len());
        f.extend_from_slice(&self.eth_dst);
        f.extend_from_slice(&self.eth_src);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let l4_len = if self.proto == IPPROTO_TCP { 20 } else { 8 } + self.payload.len();
        let tot_len = (20 + l4_len) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&tot_len.to_be_bytes());
        f.extend_from_slice(&self.ip_id.to_be_bytes());
        f.extend_from_slice(&[0x40, 0]); // DF
        f.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        match self.proto {
            IPPROTO_ICMP => {
                f.extend_from_slice(&[self.tcp_flags, self.icmp_code, 0, 0]);
                f.extend_from_slice(&self.seq.to_be_bytes());
            }
            IPPROTO_TCP => {
                f.extend_from_slice(&self.sport.to_be_bytes());
                f.extend_from_slice(&self.dport.to_be_bytes());
                f.extend_from_slice(&self.seq.to_be_bytes());
                f.extend_from_slice(&self.ack.to_be_bytes());
                f.extend_from_slice(&[0x50, self.tcp_flags]);
                f.extend_from_slice(&64240u16.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            }
            _ => {
                f.extend_from_slice(&self.sport.to_be_bytes());
                f.extend_from_slice(&self.dport.to_be_bytes());
                f.extend_from_slice(&(l4_len as u16).to_be_bytes());
                f.extend_from_slice(&[0, 0]);
            }
        }
        f.extend_from_slice(&self.payload);
        fix_checksums(&mut f);
        f
    }
}

pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;
pub const ND_ROUTER_SOLICIT: u8 = 133;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;

/// An Ethernet/IPv6/TCP, UDP or ICMPv6 frame description, as
/// [`Ipv4Packet`]: for ICMPv6 the header is `[type (tcp_flags), code,
/// checksum, seq (4 bytes)]` followed by the payload.
#[derive(Clone, Debug)]
pub struct Ipv6Packet {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub hop: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub icmp_code: u8,
    pub payload: Vec<u8>,
}

impl Ipv6Packet {
    pub fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Self {
        Self {
            eth_dst: [0; 6],
            eth_src: [0; 6],
            src: src.0,
            dst: dst.0,
            proto: IPPROTO_TCP,
            sport: src.1,
            dport: dst.1,
            hop: 64,
            tcp_flags: flags,
            seq: 1000,
            ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
            icmp_code: 0,
            payload: Vec::new(),
        }
    }

    pub fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Self {
        Self {
            proto: IPPROTO_UDP,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    /// An ICMPv6 message: type, code, the 4-byte rest of the header, data.
    pub fn icmp(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, code: u8, rest: u32, data: &[u8]) -> Self {
        Self {
            proto: IPPROTO_ICMPV6,
            tcp_flags: ty,
            icmp_code: code,
            seq: rest,
            payload: data.to_vec(),
            ..Self::tcp((src, 0), (dst, 0), 0)
        }
    }

    /// An echo request (`request`) or reply with identifier `id`.
    pub fn echo(src: Ipv6Addr, dst: Ipv6Addr, request: bool, id: u16, seq: u16) -> Self {
        let ty = if request {
            ICMP6_ECHO_REQUEST
        } else {
            ICMP6_ECHO_REPLY
        };
        Self::icmp(
            src,
            dst,
            ty,
            0,
            ((id as u32) << 16) | seq as u32,
            b"plink-ping6-payload",
        )
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    /// The frame with its L4 checksum computed from scratch.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(80 + self.payload.len());
        f.extend_from_slice(&self.eth_dst);
        f.extend_from_slice(&self.eth_src);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        let l4_len = if self.proto == IPPROTO_TCP { 20 } else { 8 } + self.payload.len();
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4_len as u16).to_be_bytes());
        f.extend_from_slice(&[self.proto, self.hop]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        match self.proto {
            IPPROTO_ICMPV6 => {
                f.extend_from_slice(&[self.tcp_flags, self.icmp_code, 0, 0]);
                f.extend_from_slice(&self.seq.to_be_bytes());
            }
            IPPROTO_TCP => {
                f.extend_from_slice(&self.sport.to_be_bytes());
                f.extend_from_slice(&self.dport.to_be_bytes());
                f.extend_from_slice(&self.seq.to_be_bytes());
                f.extend_from_slice(&self.ack.to_be_bytes());
                f.extend_from_slice(&[0x50, self.tcp_flags]);
                f.extend_from_slice(&64240u16.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0, 0]);
            }
            _ => {
                f.extend_from_slice(&self.sport.to_be_bytes());
                f.extend_from_slice(&self.dport.to_be_bytes());
                f.extend_from_slice(&(l4_len as u16).to_be_bytes());
                f.extend_from_slice(&[0, 0]);
            }
        }
        f.extend_from_slice(&self.payload);
        fix_checksums6(&mut f);
        f
    }
}

/// Offset of the L4 checksum of an Ethernet/IPv6 frame (no extension headers).
fn l4_check_off6(frame: &[u8]) -> usize {
    54 + match frame[20] {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => 2,
    }
}

/// The pseudo-header sum plus the L4 bytes of an Ethernet/IPv6 frame.
fn l4_sum6(frame: &[u8]) -> u32 {
    let plen = u16::from_be_bytes([frame[18], frame[19]]) as usize;
    let l4 = &frame[54..54 + plen];
    sum16(&frame[22..54]) + plen as u32 + frame[20] as u32 + sum16(l4)
}

/// Recomputes the L4 checksum (TCP, UDP, ICMPv6: all over the
/// pseudo-header) of an Ethernet/IPv6 frame in place.
pub fn fix_checksums6(frame: &mut [u8]) {
    let off = l4_check_off6(frame);
    frame[off..off + 2].copy_from_slice(&[0, 0]);
    let mut c = !fold(l4_sum6(frame));
    if frame[20] == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    frame[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Is the L4 checksum of an Ethernet/IPv6 frame valid?
pub fn l4_checksum6_ok(frame: &[u8]) -> bool {
    fold(l4_sum6(frame)) == 0xffff
}

/// How far the L4 checksum of an Ethernet/IPv6 frame is from the correct
/// one (0 = valid), as [`l4_checksum_error`] for IPv4.
pub fn l4_checksum6_error(frame: &[u8]) -> u16 {
    let s = fold(l4_sum6(frame));
    if s == 0xffff { 0 } else { s }
}

/// The solicited-node multicast address of `target` (RFC 4291 2.7.1) and
/// its MAC (RFC 2464 7).
pub fn solicited_node(target: Ipv6Addr) -> (Ipv6Addr, [u8; 6]) {
    let t = target.octets();
    let mut a = [0u8; 16];
    a[0] = 0xff;
    a[1] = 0x02;
    a[11] = 0x01;
    a[12] = 0xff;
    a[13..].copy_from_slice(&t[13..]);
    (Ipv6Addr::from(a), [0x33, 0x33, 0xff, t[13], t[14], t[15]])
}

/// A Neighbor Solicitation for `target` from `sender` (:: for duplicate
/// address detection, which carries no source link-layer option) to the
/// target's solicited-node address.
pub fn neighbor_solicitation(sender_mac: [u8; 6], sender: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let (group, group_mac) = solicited_node(target);
    let mut data = target.octets().to_vec();
    if !sender.is_unspecified() {
        data.extend_from_slice(&[1, 1]);
        data.extend_from_slice(&sender_mac);
    }
    let mut p = Ipv6Packet::icmp(sender, group, ND_NEIGHBOR_SOLICIT, 0, 0, &data);
    p.hop = 255;
    p.macs(sender_mac, group_mac).build()
}

/// The Neighbor Advertisement `owner_mac` should send for `target` to
/// `to` (`to_mac`): solicited, override, with the target link-layer option.
pub fn neighbor_advertisement(
    owner_mac: [u8; 6],
    target: Ipv6Addr,
    to_mac: [u8; 6],
    to: Ipv6Addr,
    solicited: bool,
) -> Vec<u8> {
    let mut data = target.octets().to_vec();
    data.extend_from_slice(&[2, 1]);
    data.extend_from_slice(&owner_mac);
    let flags: u32 = if solicited { 0x6000_0000 } else { 0x2000_0000 };
    let mut p = Ipv6Packet::icmp(target, to, ND_NEIGHBOR_ADVERT, 0, flags, &data);
    p.hop = 255;
    p.macs(owner_mac, to_mac).build()
}

/// An ARP request from `sender` asking for `target`.
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The ARP reply `owner_mac` should send for `target` to that request.
pub fn arp_reply(
    owner_mac: [u8; 6],
    target: Ipv4Addr,
    requester_mac: [u8; 6],
    requester: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&requester_mac);
    f.extend_from_slice(&owner_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&owner_mac);
    f.extend_from_slice(&target.octets());
    f.extend_from_slice(&requester_mac);
    f.extend_from_slice(&requester.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        let a = (Ipv4Addr::new(192, 0, 2, 1), 40000);
        let b = (Ipv4Addr::new(192, 0, 2, 50), 80);
        for f in [
            Ipv4Packet::tcp(a, b, TCP_SYN).build(),
            Ipv4Packet::udp(a, b, b"hello").build(),
        ] {
            assert!(ip_checksum_ok(&f));
            assert!(l4_checksum_ok(&f));
            assert_eq!(l4_checksum_error(&f), 0);
            let mut bad = f.clone();
            let n = bad.len();
            bad[n - 1] ^= 1;
            assert!(!l4_checksum_ok(&bad));
        }
    }

    #[test]
    fn built_ipv6_frames_have_valid_checksums() {
        let a = ("2001:db8:c1::1".parse().unwrap(), 40000);
        let b = ("2001:db8:c1::50".parse().unwrap(), 80);
        for f in [
            Ipv6Packet::tcp(a, b, TCP_SYN).build(),
            Ipv6Packet::udp(a, b, b"hello").build(),
            Ipv6Packet::echo(a.0, b.0, true, 7, 1).build(),
            neighbor_solicitation([2, 0, 0, 0, 0, 1], a.0, b.0),
        ] {
            assert!(l4_checksum6_ok(&f));
            let mut bad = f.clone();
            let n = bad.len();
            bad[n - 1] ^= 1;
            assert!(!l4_checksum6_ok(&bad));
        }
        let (group, mac) = solicited_node(b.0);
        assert_eq!(group, "ff02::1:ff00:50".parse::<Ipv6Addr>().unwrap());
        assert_eq!(mac, [0x33, 0x33, 0xff, 0, 0, 0x50]);
    }
}
