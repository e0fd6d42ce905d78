//! Managed neighbour entries (kernel ≥ 5.16, `NTF_EXT_MANAGED`): the kernel
//! keeps them resolved by itself, so `bpf_fib_lookup` finds the backend's
//! link-layer address instead of returning NO_NEIGH. The controller creates
//! one per backend (and next hop) on the provider interface, IPv4 (ARP) or
//! IPv6 (neighbour discovery) alike.
//!
//! Plain rtnetlink over a raw socket ([`crate::netlink`]).

use std::{io, net::IpAddr};

use anyhow::Context as _;

use crate::netlink::request;

const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NDA_DST: u16 = 1;
const NDA_FLAGS_EXT: u16 = 15;
const NTF_EXT_MANAGED: u32 = 1;

/// What `ensure_managed` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighOutcome {
    Created,
    /// An entry for the address exists already (managed or not); it was left alone
    /// so that a resolved entry never goes back through INCOMPLETE.
    Exists,
}

fn message(kind: u16, flags: u16, ifindex: u32, addr: IpAddr, managed: bool) -> Vec<u8> {
    let (family, dst) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let mut m = Vec::with_capacity(56);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    // struct ndmsg: family, pad, pad, ifindex, state (NUD_NONE), flags, type.
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&[0, 0]);
    // NDA_DST: 4 or 16 bytes, both a multiple of the 4-byte alignment.
    m.extend_from_slice(&(4 + dst.len() as u16).to_ne_bytes());
    m.extend_from_slice(&NDA_DST.to_ne_bytes());
    m.extend_from_slice(&dst);
    if managed {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&NDA_FLAGS_EXT.to_ne_bytes());
        m.extend_from_slice(&NTF_EXT_MANAGED.to_ne_bytes());
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// Creates a managed neighbour entry for `addr` on `ifindex` unless one exists.
pub fn ensure_managed(ifindex: u32, addr: impl Into<IpAddr>) -> anyhow::Result<NeighOutcome> {
    let addr = addr.into();
    let msg = message(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_EXCL, ifindex, addr, true);
    match request(&msg)? {
        0 => Ok(NeighOutcome::Created),
        libc::EEXIST => Ok(NeighOutcome::Exists),
        e => Err(io::Error::from_raw_os_error(e)).with_context(|| {
            format!(
                "adding a managed neighbour for {addr} on ifindex {ifindex} \
                 (managed neighbours need Linux 5.16 or later)"
            )
        }),
    }
}

/// Removes the neighbour entry for `addr` on `ifindex` (a backend left the config).
pub fn remove(ifindex: u32, addr: impl Into<IpAddr>) -> anyhow::Result<()> {
    let addr = addr.into();
    match request(&message(RTM_DELNEIGH, 0, ifindex, addr, false))? {
        0 | libc::ENOENT => Ok(()),
        e => Err(io::Error::from_raw_os_error(e))
            .with_context(|| format!("removing the neighbour {addr} on ifindex {ifindex}")),
    }
}

impl super::DataplaneSpec {
    /// Backend addresses whose neighbours the provider interface must keep
    /// resolved: every backend that is not down.
    pub fn managed_neighbours(&self) -> Vec<(u32, IpAddr)> {
        let Some(provider) = self
            .interfaces
            .iter()
            .find(|i| i.role == super::InterfaceRole::Provider)
        else {
            return Vec::new();
        };
        // Both families: ARP entries for IPv4 backends, neighbour discovery
        // for IPv6 ones (the controller's `gateway::manage_neighbours`
        // resolves the next hop of each the same way).
        let mut out: Vec<(u32, IpAddr)> = self
            .backends
            .iter()
            .filter(|b| b.state != super::BackendState::Down)
            .map(|b| (provider.ifindex, b.addr))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_neighbour_is_af_inet6_with_a_16_byte_dst() {
        let addr: IpAddr = "2001:db8:100::10".parse().unwrap();
        let m = message(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_EXCL, 7, addr, true);
        // nlmsghdr (16) + ndmsg (12) + NDA_DST (4 + 16) + NDA_FLAGS_EXT (8).
        assert_eq!(m.len(), 56);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 56);
        assert_eq!(m[16], libc::AF_INET6 as u8);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        assert_eq!(u16::from_ne_bytes([m[28], m[29]]), 20, "NDA_DST length");
        assert_eq!(u16::from_ne_bytes([m[30], m[31]]), NDA_DST);
        let IpAddr::V6(a) = addr else { unreachable!() };
        assert_eq!(&m[32..48], &a.octets());
        assert_eq!(u16::from_ne_bytes([m[50], m[51]]), NDA_FLAGS_EXT);
        assert_eq!(
            u32::from_ne_bytes(m[52..56].try_into().unwrap()),
            NTF_EXT_MANAGED
        );
        // IPv4 is as it was: AF_INET, a 4-byte NDA_DST.
        let m4 = message(
            RTM_DELNEIGH,
            0,
            7,
            std::net::Ipv4Addr::new(198, 51, 100, 10).into(),
            false,
        );
        assert_eq!(m4.len(), 36);
        assert_eq!(m4[16], libc::AF_INET as u8);
        assert_eq!(&m4[32..36], &[198, 51, 100, 10]);
    }
}
