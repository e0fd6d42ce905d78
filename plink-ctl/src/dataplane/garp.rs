//! Gratuitous ARP for endpoint and NAT addresses, sent when the gateway
//! starts or adopts a dataplane so neighbours learn (or relearn) where they are.

use std::net::Ipv4Addr;

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

/// Sends one gratuitous ARP per address out of `ifindex` (in the caller's
/// network namespace). Egress frames do not pass through XDP.
pub fn announce(ifindex: u32, mac: [u8; 6], addrs: &[Ipv4Addr]) -> anyhow::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we own; closed exactly once when this drops.
    let _guard = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for addr in addrs {
        let f = frame(mac, *addr);
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
                "sending gratuitous ARP for {addr} on ifindex {ifindex}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

impl super::DataplaneSpec {
    /// What to announce: per interface, (ifindex, MAC, addresses) — endpoint
    /// addresses of each consumer network on its interfaces, NAT addresses on
    /// the provider interface.
    pub fn garp_plan(&self) -> Vec<(u32, [u8; 6], Vec<Ipv4Addr>)> {
        use super::{EndpointState, InterfaceRole};
        self.interfaces
            .iter()
            .map(|i| {
                let mut addrs: Vec<Ipv4Addr> = match i.role {
                    InterfaceRole::Consumer { network_id } => self
                        .endpoints
                        .iter()
                        .filter(|e| e.network_id == network_id && e.state != EndpointState::Removed)
                        // IPv6 addresses get no gratuitous ARP (unsolicited
                        // neighbour advertisements are IPv6 phase 2).
                        .filter_map(|e| super::spec::v4_only(e.addr))
                        .chain(
                            self.next_hops
                                .iter()
                                .filter(|(n, _)| *n == network_id)
                                .map(|(_, a)| *a),
                        )
                        .collect(),
                    InterfaceRole::Provider => self
                        .services
                        .iter()
                        .flat_map(|s| s.nat.iter().filter_map(|n| super::spec::v4_only(n.addr)))
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
}
