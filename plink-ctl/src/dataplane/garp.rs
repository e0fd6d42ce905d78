//! Gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6,
//! RFC 4861 §7.2.6) for endpoint and NAT addresses, sent when the gateway
//! starts or adopts a dataplane so neighbours learn (or relearn) where they are.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::bail;

/// The 42-byte gratuitous ARP request announcing `addr` at `mac`.
pub fn frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // Ethernet/IPv4 request, sender = target = the announced address.
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&addr.octets());
    f[38..42].copy_from_slice(&addr.octets());
    f
}

/// The 86-byte unsolicited neighbour advertisement announcing `addr` at
/// `mac` to all nodes (ff02::1): from the address itself, hop limit 255,
/// Override set and Solicited clear (so neighbours replace a cached link-layer
/// address, RFC 4861 §7.2.6), with the target link-layer address option.
pub fn na_frame(mac: [u8; 6], addr: Ipv6Addr) -> [u8; 86] {
    const ICMP6_LEN: usize = 32;
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut f = [0u8; 86];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    f[14] = 0x60;
    f[18..20].copy_from_slice(&(ICMP6_LEN as u16).to_be_bytes());
    f[20] = 58;
    f[21] = 255;
    f[22..38].copy_from_slice(&addr.octets());
    f[38..54].copy_from_slice(&all_nodes.octets());
    let icmp = 54;
    f[icmp] = 136;
    // Flags: R=0, S=0, O=1.
    f[icmp + 4] = 0x20;
    f[icmp + 8..icmp + 24].copy_from_slice(&addr.octets());
    // Target link-layer address option: type 2, length 1 (8 bytes).
    f[icmp + 24] = 2;
    f[icmp + 25] = 1;
    f[icmp + 26..icmp + 32].copy_from_slice(&mac);
    let check = icmp6_checksum(&addr, &all_nodes, &f[icmp..]);
    f[icmp + 2..icmp + 4].copy_from_slice(&check.to_be_bytes());
    f
}

/// The ICMPv6 checksum of `msg` (checksum field zero) over the IPv6
/// pseudo-header (RFC 8200 §8.1).
fn icmp6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let hi = u32::from(c[0]) << 8;
            sum += hi | c.get(1).map_or(0, |&lo| u32::from(lo));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one gratuitous ARP (IPv4) or unsolicited neighbour advertisement
/// (IPv6) per address out of `ifindex` (in the caller's network namespace).
/// Egress frames do not pass through XDP.
pub fn announce(ifindex: u32, mac: [u8; 6], addrs: &[IpAddr]) -> anyhow::Result<()> {
    // Protocol 0: the socket only sends (it is bound to no EtherType, so
    // nothing is queued to it).
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we own; closed exactly once when this drops.
    let _guard = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    for addr in addrs {
        let (f, what): (Vec<u8>, _) = match addr {
            IpAddr::V4(a) => (frame(mac, *a).to_vec(), "gratuitous ARP"),
            IpAddr::V6(a) => (
                na_frame(mac, *a).to_vec(),
                "unsolicited neighbour advertisement",
            ),
        };
        sll.sll_protocol = u16::from_be_bytes([f[12], f[13]]).to_be();
        sll.sll_addr[..6].copy_from_slice(&f[..6]);
        // SAFETY: valid buffer and address of the sizes passed.
        let rc = unsafe {
            libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            bail!(
                "sending {what} for {addr} on ifindex {ifindex}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

impl super::DataplaneSpec {
    /// What to announce: per interface, (ifindex, MAC, addresses) — endpoint
    /// addresses of each consumer network on its interfaces (a NAT64
    /// endpoint's IPv6 one too), NAT addresses on
    /// the provider interface.
    pub fn garp_plan(&self) -> Vec<(u32, [u8; 6], Vec<IpAddr>)> {
        use super::{EndpointState, InterfaceRole};
        self.interfaces
            .iter()
            .map(|i| {
                let mut addrs: Vec<IpAddr> = match i.role {
                    InterfaceRole::Consumer { network_id } => self
                        .endpoints
                        .iter()
                        .filter(|e| e.network_id == network_id && e.state != EndpointState::Removed)
                        .flat_map(|e| e.addresses())
                        .chain(
                            self.next_hops
                                .iter()
                                .filter(|(n, _)| *n == network_id)
                                .map(|(_, a)| IpAddr::V4(*a)),
                        )
                        .collect(),
                    InterfaceRole::Provider => self
                        .services
                        .iter()
                        .flat_map(|s| s.nat.iter().map(|n| n.addr))
                        .filter(|a| !a.is_unspecified())
                        .collect(),
                };
                addrs.sort();
                addrs.dedup();
                (i.ifindex, i.mac, addrs)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_frame_layout() {
        let mac = [2, 0, 0, 0, 0, 9];
        let f = frame(mac, Ipv4Addr::new(192, 0, 2, 50));
        assert_eq!(f[0..6], [0xff; 6], "broadcast");
        assert_eq!(f[6..12], mac);
        assert_eq!(f[12..14], [0x08, 0x06]);
        assert_eq!(f[20..22], [0, 1], "request");
        assert_eq!(f[22..28], mac, "sender MAC");
        assert_eq!(f[28..32], [192, 0, 2, 50], "sender IP");
        assert_eq!(f[32..38], [0; 6]);
        assert_eq!(f[38..42], [192, 0, 2, 50], "target IP = sender IP");
    }

    #[test]
    fn unsolicited_neighbour_advertisement_layout() {
        let mac = [2, 0, 0, 0, 0, 9];
        let addr: Ipv6Addr = "2001:db8:1::50".parse().expect("address");
        let f = na_frame(mac, addr);
        assert_eq!(f[0..6], [0x33, 0x33, 0, 0, 0, 1], "all-nodes multicast MAC");
        assert_eq!(f[6..12], mac);
        assert_eq!(f[12..14], [0x86, 0xdd]);
        assert_eq!(f[14] >> 4, 6);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 32, "payload length");
        assert_eq!((f[20], f[21]), (58, 255), "ICMPv6, hop limit 255");
        assert_eq!(f[22..38], addr.octets(), "from the announced address");
        assert_eq!(f[38..40], [0xff, 0x02]);
        assert_eq!(f[53], 1, "to ff02::1");
        assert_eq!((f[54], f[55]), (136, 0), "neighbour advertisement");
        assert_eq!(f[58], 0x20, "override, not solicited, not a router");
        assert_eq!(f[62..78], addr.octets(), "target");
        assert_eq!(
            f[78..86],
            [2, 1, 2, 0, 0, 0, 0, 9],
            "target link-layer option"
        );
        // A correct checksum makes the pseudo-header sum over the message
        // (checksum included) all ones, i.e. its complement zero.
        let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        let mut zeroed = f;
        zeroed[56] = 0;
        zeroed[57] = 0;
        assert_eq!(icmp6_checksum(&addr, &dst, &f[54..]), 0);
        assert_ne!(icmp6_checksum(&addr, &dst, &zeroed[54..]), 0);
    }
}
