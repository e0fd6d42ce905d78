//! A family-agnostic TCP stream server and its clients, for transfers
//! that must arrive intact: `GET n` is answered with `peer=P local=L` and
//! `n` pattern bytes, `PUT n` is followed by `n` pattern bytes from the
//! client and answered with `got n` once all arrived intact. (The IPv6 and
//! NAT64 tests: a server on one family, a client on the other.)

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{netns::Host, servers::pattern_byte};

/// A TCP server (either family): a request line `GET n` is answered
/// with `peer=P local=L` and `n` pattern bytes; `PUT n` is followed by `n`
/// pattern bytes from the client, answered with `got n` once all arrived
/// intact.
pub struct StreamServer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    /// Connections accepted.
    pub served: Arc<AtomicU64>,
}

impl StreamServer {
    pub fn start(host: &Host, bind: SocketAddr) -> anyhow::Result<StreamServer> {
        let listener = host
            .run_in(move || TcpListener::bind(bind))?
            .with_context(|| format!("binding {bind}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), served.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        n.fetch_add(1, Ordering::SeqCst);
                        std::thread::spawn(move || {
                            let _ = serve(stream, peer);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(StreamServer {
            stop,
            handle: Some(handle),
            served,
        })
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut stream = stream;
    let (verb, n) = line.trim().split_once(' ').unwrap_or(("", "0"));
    let n: usize = n.parse().unwrap_or(0);
    if verb == "PUT" {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < n {
            let k = reader.read(&mut buf)?;
            if k == 0 {
                break;
            }
            if buf[..k]
                .iter()
                .enumerate()
                .any(|(i, b)| *b != pattern_byte(got + i))
            {
                stream.write_all(b"corrupted\n")?;
                return Ok(());
            }
            got += k;
        }
        return stream.write_all(format!("got {got}\n").as_bytes());
    }
    stream.write_all(format!("peer={peer} local={local}\n").as_bytes())?;
    crate::servers::send_pattern(&mut stream, n)
}

/// What a download saw: the backend's view of the client (`peer`), which
/// backend answered (`local`), and the body length (verified).
#[derive(Debug)]
pub struct StreamReply {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub body: usize,
}

pub fn connect(host: &Host, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    host.run_in(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))?
        .with_context(|| format!("connecting to {dst}"))
}

pub fn download(host: &Host, dst: SocketAddr, n: usize) -> anyhow::Result<StreamReply> {
    let mut stream = connect(host, dst)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(format!("GET {n}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let parse = |key: &str| -> anyhow::Result<SocketAddr> {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .with_context(|| format!("no {key} in {line:?}"))?;
        Ok(v.parse()?)
    };
    let (peer, local) = (parse("peer=")?, parse("local=")?);
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = reader.read(&mut buf)?;
        if k == 0 {
            break;
        }
        if let Some(i) = (0..k).find(|i| buf[*i] != pattern_byte(received + i)) {
            bail!("body byte {} corrupted", received + i);
        }
        received += k;
    }
    if received != n {
        bail!("body has {received} bytes, expected {n}");
    }
    Ok(StreamReply {
        peer,
        local,
        body: received,
    })
}

pub fn upload(host: &Host, dst: SocketAddr, n: usize) -> anyhow::Result<()> {
    let mut stream = connect(host, dst)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(format!("PUT {n}\n").as_bytes())?;
    let body: Vec<u8> = (0..n).map(pattern_byte).collect();
    stream.write_all(&body)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.trim() != format!("got {n}") {
        bail!("the backend answered {answer:?} to a {n}-byte upload");
    }
    Ok(())
}
