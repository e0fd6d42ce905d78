//! The traffic generator: prebuilt Ethernet frames sent with AF_PACKET,
//! `sendmmsg` and PACKET_QDISC_BYPASS from one pinned CPU (SPEC §7: about
//! 1.1–1.4 Mpps from one core here, twice what plain UDP sockets manage).
//! A batch refused with ENOBUFS is counted as offered but dropped.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Frames per `sendmmsg` call.
const BATCH: usize = 64;

/// What one generator run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Frames the kernel accepted.
    pub sent: u64,
    /// Frames refused with ENOBUFS (offered, dropped before the wire).
    pub enobufs: u64,
    pub elapsed: Duration,
}

impl Sent {
    /// Offered frames per second (accepted + refused).
    pub fn offered_pps(&self) -> f64 {
        (self.sent + self.enobufs) as f64 / self.elapsed.as_secs_f64()
    }
    pub fn sent_pps(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> anyhow::Result<()> {
    pin_pid(0, cpu)
}

/// Pins task `pid` (0 = the calling thread) to `cpu`.
pub fn pin_pid(pid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "sched_setaffinity(pid {pid}, cpu {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sends `frames` round-robin out of `ifindex` for `duration`, from a thread
/// in the namespace at `netns` pinned to `cpu`. `passes`, when given, stops
/// after that many passes over the frames instead (warm-up).
pub fn send(
    netns: PathBuf,
    ifindex: u32,
    frames: Arc<Vec<Vec<u8>>>,
    cpu: usize,
    duration: Duration,
    passes: Option<u32>,
) -> anyhow::Result<Sent> {
    let handle = std::thread::spawn(move || -> anyhow::Result<Sent> {
        plink_tests::netns::enter_netns(&netns)?;
        pin_thread(cpu)?;
        send_here(ifindex, &frames, duration, passes)
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("generator thread panicked"))?
}

fn send_here(
    ifindex: u32,
    frames: &[Vec<u8>],
    duration: Duration,
    passes: Option<u32>,
) -> anyhow::Result<Sent> {
    if frames.is_empty() {
        bail!("no frames to send");
    }
    // Protocol 0: this socket only sends, it receives nothing.
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is closed once, by this guard.
    let fd_guard = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = 0x0800u16.to_be();
    sll.sll_ifindex = i32::try_from(ifindex).context("ifindex")?;
    sll.sll_halen = 6;
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: msghdr is plain data; the pointers set stay valid while
            // `frames`, `iovs` and `sll` live (this function's scope).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let total = frames.len() as u64 * u64::from(passes.unwrap_or(0));
    let mut out = Sent::default();
    let mut pos = 0usize;
    let started = Instant::now();
    let mut calls = 0u32;
    loop {
        // Checking the clock every 16 calls (1,024 frames) keeps it cheap.
        calls = calls.wrapping_add(1);
        if passes.is_some() {
            if out.sent + out.enobufs >= total {
                break;
            }
        } else if calls.is_multiple_of(16) && started.elapsed() >= duration {
            break;
        }
        let n = BATCH.min(msgs.len() - pos);
        // SAFETY: msgs[pos..pos + n] are initialised headers.
        let rc = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr().add(pos), n as u32, 0) };
        let advanced = if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOBUFS) {
                // The first frame of the batch was refused: count it and
                // move on (the rest of the batch is offered again next call).
                out.enobufs += 1;
                1
            } else {
                bail!("sendmmsg: {err}");
            }
        } else {
            out.sent += rc as u64;
            rc as usize
        };
        pos = (pos + advanced) % msgs.len();
    }
    out.elapsed = started.elapsed();
    drop(fd_guard);
    Ok(out)
}
