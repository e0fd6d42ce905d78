//! rtnetlink over a raw socket, for the few messages plink sends (managed
//! neighbours, announced routes): small requests do not justify an async
//! netlink stack.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, bail};

/// `nlmsg_type` of an error or ACK answer.
pub const NLMSG_ERROR: u16 = 2;

/// A NETLINK_ROUTE socket.
pub fn socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("netlink socket");
    }
    // SAFETY: fd is ours; closed when the OwnedFd drops.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn send(sock: &OwnedFd, msg: &[u8]) -> anyhow::Result<()> {
    // SAFETY: sockaddr_nl is plain data; zero means "the kernel".
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: valid buffer and address.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error()).context("netlink send");
    }
    Ok(())
}

pub fn recv(sock: &OwnedFd, buf: &mut [u8]) -> anyhow::Result<usize> {
    // SAFETY: valid buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("netlink receive");
    }
    Ok(n as usize)
}

/// Sends one request with an ACK and returns the kernel's errno (0 = success).
pub fn request(msg: &[u8]) -> anyhow::Result<i32> {
    let sock = socket()?;
    send(&sock, msg)?;
    let mut buf = [0u8; 4096];
    let n = recv(&sock, &mut buf)?;
    if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        bail!("unexpected netlink answer ({n} bytes)");
    }
    Ok(-i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]))
}
