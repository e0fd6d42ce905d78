//! Tiny servers and clients for end-to-end tests, run on threads inside a
//! namespace. Servers answer with who they saw as the peer, so tests can
//! assert that backends see NAT addresses only.
//!
//! Protocol (TCP and UDP alike): the client sends one line `GET <n>\n`; the
//! server answers `peer=<ip>:<port> local=<ip>:<port>\n` followed by `n`
//! bytes of a known pattern (TCP only).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};

use crate::netns::Host;

/// The byte at offset `i` of a response body: a pattern that detects
/// reordering, duplication and loss, not just length.
pub fn pattern_byte(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

/// A server running on threads; stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    /// Requests served (TCP connections or UDP datagrams).
    pub served: Arc<AtomicU64>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Starts a TCP and/or UDP server bound to `addr:port` in `host`.
pub fn start(
    host: &Host,
    addr: Ipv4Addr,
    port: u16,
    tcp: bool,
    udp: bool,
) -> anyhow::Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let bind = SocketAddrV4::new(addr, port);
    if tcp {
        let listener = host
            .run_in(move || TcpListener::bind(bind))?
            .with_context(|| format!("binding TCP {bind}"))?;
        listener.set_nonblocking(true)?;
        let (stop, served) = (stop.clone(), served.clone());
        handles.push(std::thread::spawn(move || tcp_loop(listener, stop, served)));
    }
    if udp {
        let socket = host
            .run_in(move || UdpSocket::bind(bind))?
            .with_context(|| format!("binding UDP {bind}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (stop, served) = (stop.clone(), served.clone());
        handles.push(std::thread::spawn(move || udp_loop(socket, stop, served)));
    }
    Ok(Server {
        stop,
        handles,
        served,
    })
}

fn tcp_loop(listener: TcpListener, stop: Arc<AtomicBool>, served: Arc<AtomicU64>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                served.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = serve_tcp(stream, peer);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve_tcp(stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.starts_with("GET /") {
        // A minimal HTTP/1.0 answer for curl-like clients and the demo.
        let mut header = String::new();
        while reader.read_line(&mut header)? > 2 {
            header.clear();
        }
        let body = format!("hello from backend {local}; you came from {peer}\n");
        let mut stream = stream;
        stream.write_all(
            format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )?;
        return stream.shutdown(std::net::Shutdown::Write);
    }
    let n: usize = line
        .trim()
        .strip_prefix("GET ")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut stream = stream;
    stream.write_all(format!("peer={peer} local={local}\n").as_bytes())?;
    send_pattern(&mut stream, n)
}

/// Writes `n` pattern bytes ([`pattern_byte`]) to `stream` and closes its
/// write side: the body every GET answer carries.
pub fn send_pattern(stream: &mut TcpStream, n: usize) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < n {
        let len = chunk.len().min(n - sent);
        for (i, b) in chunk[..len].iter_mut().enumerate() {
            *b = pattern_byte(sent + i);
        }
        stream.write_all(&chunk[..len])?;
        sent += len;
    }
    stream.shutdown(std::net::Shutdown::Write)
}

fn udp_loop(socket: UdpSocket, stop: Arc<AtomicBool>, served: Arc<AtomicU64>) {
    let mut buf = [0u8; 2048];
    let local = socket.local_addr().ok();
    while !stop.load(Ordering::SeqCst) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            served.fetch_add(1, Ordering::SeqCst);
            let local = local.map(|l| l.to_string()).unwrap_or_default();
            let _ = socket.send_to(format!("peer={peer} local={local}\n").as_bytes(), peer);
        }
    }
}

/// What a client got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The address the server saw as its peer.
    pub peer: SocketAddrV4,
    /// The server's own address (which backend answered).
    pub local: SocketAddrV4,
    /// Body bytes received (TCP), verified against the pattern.
    pub body_len: usize,
}

fn parse_header(line: &str) -> anyhow::Result<(SocketAddrV4, SocketAddrV4)> {
    let mut peer = None;
    let mut local = None;
    for part in line.split_whitespace() {
        if let Some(v) = part.strip_prefix("peer=") {
            peer = Some(v.parse()?);
        } else if let Some(v) = part.strip_prefix("local=") {
            local = Some(v.parse()?);
        }
    }
    Ok((
        peer.ok_or_else(|| anyhow!("no peer in {line:?}"))?,
        local.ok_or_else(|| anyhow!("no local in {line:?}"))?,
    ))
}

/// TCP request from `host` (optionally bound to `src`) to `dst`, asking for
/// `body` bytes; verifies every byte of the body.
pub fn tcp_request(
    host: &Host,
    src: Option<SocketAddrV4>,
    dst: SocketAddrV4,
    body: usize,
) -> anyhow::Result<Reply> {
    host.run_in(move || -> anyhow::Result<Reply> {
        let stream = match src {
            Some(src) => connect_from(src, dst)?,
            None => TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))
                .with_context(|| format!("connecting to {dst}"))?,
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut stream = stream;
        stream.write_all(format!("GET {body}\n").as_bytes())?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let (peer, local) = parse_header(&line)?;
        let mut received = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != pattern_byte(received + i) {
                    bail!("body byte {} corrupted", received + i);
                }
            }
            received += n;
        }
        if received != body {
            bail!("body has {received} bytes, expected {body}");
        }
        Ok(Reply {
            peer,
            local,
            body_len: received,
        })
    })?
}

/// A TCP connection from the fixed `src` (address and port) to `dst`.
pub fn connect_from(src: SocketAddrV4, dst: SocketAddrV4) -> anyhow::Result<TcpStream> {
    // std cannot bind before connect: use a raw socket for the fixed source port.
    // SAFETY: plain socket syscalls on a descriptor we own; errors are checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let to_sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let s = to_sockaddr(src);
        if libc::bind(
            fd,
            (&s as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            bail!("bind {src}: {}", std::io::Error::last_os_error());
        }
        let d = to_sockaddr(dst);
        if libc::connect(
            fd,
            (&d as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            bail!(
                "connect {src} -> {dst}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(stream)
    }
}

/// HTTP GET `path` from `host` to `dst`; returns the status line and body.
pub fn http_get(host: &Host, dst: SocketAddrV4, path: &str) -> anyhow::Result<(String, String)> {
    let path = path.to_owned();
    host.run_in(move || -> anyhow::Result<(String, String)> {
        let mut stream = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(2))
            .with_context(|| format!("connecting to {dst}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {dst}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("not an HTTP response: {response:?}"))?;
        let status = head.lines().next().unwrap_or_default().to_owned();
        Ok((status, body.to_owned()))
    })?
}

/// Opens a TCP connection from `host` to `dst`, asks for `bytes` and reads
/// them on a thread, pausing `pause` after each 16 KiB read so the transfer
/// spans whatever the test does meanwhile. The thread returns the byte count
/// once the server closes, or what went wrong (reset, timeout, corruption).
pub fn slow_stream(
    host: &Host,
    dst: SocketAddrV4,
    bytes: usize,
    pause: Duration,
) -> anyhow::Result<JoinHandle<Result<usize, String>>> {
    let stream = host
        .run_in(move || TcpStream::connect_timeout(&dst.into(), Duration::from_secs(2)))?
        .with_context(|| format!("connecting to {dst}"))?;
    Ok(std::thread::spawn(move || {
        let mut stream = stream;
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(format!("GET {bytes}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            stream.read_exact(&mut byte).map_err(|e| e.to_string())?;
        }
        let mut buf = vec![0u8; 16 * 1024];
        let mut total = 0usize;
        loop {
            let n = stream
                .read(&mut buf)
                .map_err(|e| format!("after {total} bytes: {e}"))?;
            if n == 0 {
                return Ok(total);
            }
            if let Some(i) = (0..n).find(|&i| buf[i] != pattern_byte(total + i)) {
                return Err(format!("byte {} corrupted", total + i));
            }
            total += n;
            std::thread::sleep(pause);
        }
    }))
}

/// One UDP datagram and its reply, no retry: for probes that expect refusal.
pub fn udp_probe(
    host: &Host,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    host.run_in(move || -> anyhow::Result<Reply> {
        let socket = UdpSocket::bind(src).with_context(|| format!("binding {src}"))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send_to(b"GET 0\n", dst)?;
        let mut buf = [0u8; 2048];
        let (n, _) = socket
            .recv_from(&mut buf)
            .with_context(|| format!("no UDP reply from {dst} within {timeout:?}"))?;
        let (peer, local) = parse_header(&String::from_utf8_lossy(&buf[..n]))?;
        Ok(Reply {
            peer,
            local,
            body_len: 0,
        })
    })?
}

/// One UDP request/reply from `host` bound to `src` (port 0 for any).
pub fn udp_request(host: &Host, src: SocketAddrV4, dst: SocketAddrV4) -> anyhow::Result<Reply> {
    host.run_in(move || -> anyhow::Result<Reply> {
        let socket = UdpSocket::bind(src).with_context(|| format!("binding {src}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 2048];
        // UDP may lose the first datagram while neighbours resolve: retry a few times.
        for _ in 0..6 {
            socket.send_to(b"GET 0\n", dst)?;
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                if from != SocketAddr::V4(dst) {
                    bail!("reply came from {from}, expected {dst}");
                }
                let line = String::from_utf8_lossy(&buf[..n]);
                let (peer, local) = parse_header(&line)?;
                return Ok(Reply {
                    peer,
                    local,
                    body_len: 0,
                });
            }
        }
        bail!("no UDP reply from {dst}")
    })?
}
