//! Device counters the XDP program cannot see: a redirect or XDP_TX that
//! fails after the program returned is counted only by the driver (SPEC §7).
//!
//! Two sources, both read in the controller's own network namespace (not
//! through /sys, which under `nsenter --net` shows another namespace):
//! - the driver's ethtool statistics (`ethtool -S`, the `ETHTOOL_GSTATS`
//!   ioctl). veth names them per queue: `rx_queue_N_xdp_tx_errors` (XDP_TX
//!   frames that could not be queued to the peer) and
//!   `tx_queue_N_xdp_xmit_errors` (frames redirected *into* this device that
//!   it could not queue: ring full, frame larger than the peer's MTU).
//! - the device's `tx_dropped` (rtnetlink `IFLA_STATS64`): veth counts there
//!   the frames redirected into it while its peer runs no NAPI (no XDP
//!   program and no GRO on the far end), the silent drop of SPEC §7.

use std::{io, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd};

use anyhow::{Context as _, bail};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;
/// Offset of `n_stats` in `struct ethtool_drvinfo`.
const DRVINFO_N_STATS: usize = 180;
const DRVINFO_LEN: usize = 196;

/// XDP transmit failures of one device, summed over its queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpErrors {
    /// XDP_TX on this device's receive path that failed.
    pub tx_errors: u64,
    /// Redirects into this device that it failed to transmit.
    pub redirect_errors: u64,
    /// Packets the device dropped on transmit (`tx_dropped`).
    pub tx_dropped: u64,
}

/// Which XDP error a driver statistic counts, by its ethtool name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpStat {
    TxError,
    RedirectError,
}

/// Classifies an ethtool statistic name: veth (`rx_queue_N_xdp_tx_errors`,
/// `tx_queue_N_xdp_xmit_errors`), mlx5 (`rx_xdp_tx_err`, `tx_xdp_err`) and
/// drivers following either pattern.
pub fn classify(name: &str) -> Option<XdpStat> {
    if name.ends_with("xdp_tx_errors") || name.ends_with("xdp_tx_err") {
        Some(XdpStat::TxError)
    } else if name.ends_with("xdp_xmit_errors")
        || name.ends_with("xdp_xmit_err")
        || name == "tx_xdp_err"
    {
        Some(XdpStat::RedirectError)
    } else {
        None
    }
}

/// Sums a device's statistics into [`XdpErrors`] (without `tx_dropped`).
pub fn sum_xdp_errors<'a>(stats: impl IntoIterator<Item = (&'a str, u64)>) -> XdpErrors {
    let mut out = XdpErrors::default();
    for (name, value) in stats {
        match classify(name) {
            Some(XdpStat::TxError) => out.tx_errors = out.tx_errors.wrapping_add(value),
            Some(XdpStat::RedirectError) => {
                out.redirect_errors = out.redirect_errors.wrapping_add(value)
            }
            None => {}
        }
    }
    out
}

fn socket(domain: libc::c_int, kind: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours; closed on drop.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One `SIOCETHTOOL` call with `buf` as the command buffer.
fn ethtool(sock: &OwnedFd, dev: &str, buf: &mut [u64]) -> io::Result<()> {
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(dev.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = buf.as_mut_ptr().cast();
    // SAFETY: the buffer is as large as the command says (callers size it).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bytes_mut(buf: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 storage reinterpreted as bytes, same length in bytes.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len() * 8) }
}

fn put_u32(buf: &mut [u64], offset: usize, v: u32) {
    bytes_mut(buf)[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &mut [u64], offset: usize) -> u32 {
    let b = bytes_mut(buf);
    u32::from_ne_bytes([b[offset], b[offset + 1], b[offset + 2], b[offset + 3]])
}

/// Offset and length of `driver` in `struct ethtool_drvinfo`.
const DRVINFO_DRIVER: usize = 4;
const DRVINFO_DRIVER_LEN: usize = 32;

/// The driver of `dev` (what `ethtool -i` prints as `driver:`), or `None`
/// for a device without ethtool support.
pub fn driver_name(dev: &str) -> anyhow::Result<Option<String>> {
    if dev.len() >= libc::IF_NAMESIZE {
        bail!("interface name {dev:?} is too long");
    }
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).context("socket for ethtool")?;
    let mut info = vec![0u64; DRVINFO_LEN.div_ceil(8)];
    put_u32(&mut info, 0, ETHTOOL_GDRVINFO);
    match ethtool(&sock, dev, &mut info) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("ethtool driver info of {dev}")),
    }
    let raw = &bytes_mut(&mut info)[DRVINFO_DRIVER..DRVINFO_DRIVER + DRVINFO_DRIVER_LEN];
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    Ok(Some(String::from_utf8_lossy(&raw[..end]).into_owned()))
}

/// The driver's ethtool statistics of `dev`, by name (what `ethtool -S` prints).
pub fn ethtool_stats(dev: &str) -> anyhow::Result<Vec<(String, u64)>> {
    if dev.len() >= libc::IF_NAMESIZE {
        bail!("interface name {dev:?} is too long");
    }
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0).context("socket for ethtool")?;
    let mut info = vec![0u64; DRVINFO_LEN.div_ceil(8)];
    put_u32(&mut info, 0, ETHTOOL_GDRVINFO);
    match ethtool(&sock, dev, &mut info) {
        Ok(()) => {}
        // No ethtool support (loopback, some virtual devices): no driver statistics.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("ethtool driver info of {dev}")),
    }
    let n = get_u32(&mut info, DRVINFO_N_STATS) as usize;
    if n == 0 {
        return Ok(Vec::new());
    }
    // struct ethtool_gstrings { cmd, string_set, len, data[len * 32] }
    let mut names = vec![0u64; (12 + n * ETH_GSTRING_LEN).div_ceil(8)];
    put_u32(&mut names, 0, ETHTOOL_GSTRINGS);
    put_u32(&mut names, 4, ETH_SS_STATS);
    put_u32(&mut names, 8, n as u32);
    ethtool(&sock, dev, &mut names).with_context(|| format!("ethtool stat names of {dev}"))?;
    // struct ethtool_stats { cmd, n_stats, data[n_stats] (u64) }
    let mut values = vec![0u64; 1 + n];
    put_u32(&mut values, 0, ETHTOOL_GSTATS);
    put_u32(&mut values, 4, n as u32);
    ethtool(&sock, dev, &mut values).with_context(|| format!("ethtool stats of {dev}"))?;
    // The kernel may report fewer than asked if the set shrank meanwhile.
    let got = (get_u32(&mut values, 4) as usize).min(n);
    let name_bytes = bytes_mut(&mut names);
    Ok((0..got)
        .map(|i| {
            let raw = &name_bytes[12 + i * ETH_GSTRING_LEN..12 + (i + 1) * ETH_GSTRING_LEN];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            (
                String::from_utf8_lossy(&raw[..end]).into_owned(),
                values[1 + i],
            )
        })
        .collect())
}

const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLMSG_ERROR: u16 = 2;
const IFLA_STATS64: u16 = 23;
/// Index of `tx_dropped` in `struct rtnl_link_stats64` (u64 fields).
const STATS64_TX_DROPPED: usize = 7;

/// `tx_dropped` of the device with `ifindex`, from rtnetlink.
pub fn tx_dropped(ifindex: u32) -> anyhow::Result<u64> {
    let sock =
        socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE).context("netlink socket")?;
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(&32u32.to_ne_bytes());
    m.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
    // struct ifinfomsg: family, pad, type, index, flags, change.
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // SAFETY: sockaddr_nl is plain data; zero means "the kernel".
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: valid buffer and address.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            m.as_ptr().cast(),
            m.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error()).context("netlink send");
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("netlink receive");
    }
    parse_tx_dropped(&buf[..n as usize])
        .with_context(|| format!("reading the link statistics of ifindex {ifindex}"))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Finds `IFLA_STATS64.tx_dropped` in an `RTM_NEWLINK` answer.
fn parse_tx_dropped(msg: &[u8]) -> anyhow::Result<u64> {
    let kind = u16_at(msg, 4).context("short netlink answer")?;
    if kind == NLMSG_ERROR {
        let err = msg
            .get(16..20)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0);
        return Err(io::Error::from_raw_os_error(-err).into());
    }
    if kind != RTM_NEWLINK {
        bail!("unexpected netlink message type {kind}");
    }
    let total = msg
        .get(0..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(0)
        .min(msg.len());
    let mut at = 32; // nlmsghdr + ifinfomsg
    while at + 4 <= total {
        let len = usize::from(u16_at(msg, at).unwrap_or(0));
        let ty = u16_at(msg, at + 2).unwrap_or(0) & 0x3fff;
        if len < 4 {
            break;
        }
        if ty == IFLA_STATS64 {
            let off = at + 4 + STATS64_TX_DROPPED * 8;
            let field = msg.get(off..off + 8).context("short IFLA_STATS64")?;
            let mut b = [0u8; 8];
            b.copy_from_slice(field);
            return Ok(u64::from_ne_bytes(b));
        }
        at += len.div_ceil(4) * 4;
    }
    bail!("no IFLA_STATS64 in the answer")
}

/// XDP transmit errors and transmit drops of `dev`.
pub fn read(dev: &str) -> anyhow::Result<XdpErrors> {
    let stats = ethtool_stats(dev)?;
    let mut errors = sum_xdp_errors(stats.iter().map(|(n, v)| (n.as_str(), *v)));
    errors.tx_dropped = tx_dropped(crate::dataplane::ifindex(dev)?)?;
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_veth_and_mlx5_names() {
        let veth = [
            ("peer_ifindex", 7),
            ("rx_queue_0_xdp_packets", 100),
            ("rx_queue_0_xdp_redirect", 90),
            ("rx_queue_0_xdp_tx", 5),
            ("rx_queue_0_xdp_tx_errors", 2),
            ("rx_queue_1_xdp_tx_errors", 1),
            ("tx_queue_0_xdp_xmit", 40),
            ("tx_queue_0_xdp_xmit_errors", 4),
        ];
        assert_eq!(
            sum_xdp_errors(veth),
            XdpErrors {
                tx_errors: 3,
                redirect_errors: 4,
                tx_dropped: 0
            }
        );
        assert_eq!(classify("rx_xdp_tx_err"), Some(XdpStat::TxError));
        assert_eq!(classify("tx_xdp_err"), Some(XdpStat::RedirectError));
        assert_eq!(classify("rx_queue_0_xdp_tx"), None);
        assert_eq!(classify("rx_xdp_redirect"), None);
    }

    #[test]
    fn reads_loopback_in_this_namespace() {
        // Loopback has no ethtool statistics: empty, not an error.
        let lo = ethtool_stats("lo");
        assert!(matches!(&lo, Ok(v) if v.is_empty()), "{lo:?}");
        assert!(ethtool_stats("no-such-dev0").is_err());
        let idx = crate::dataplane::ifindex("lo").unwrap();
        let r = tx_dropped(idx);
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn netlink_parse_refuses_garbage() {
        assert!(parse_tx_dropped(&[]).is_err());
        assert!(parse_tx_dropped(&[0u8; 40]).is_err());
    }
}
