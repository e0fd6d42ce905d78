//! PROXY protocol v2 backends for end-to-end tests, both parsing the header
//! with code not written here:
//!
//! - [`PpBackend`]: a server on threads in a namespace that parses the
//!   header with the `ppp` crate and records what it found ([`PpRecord`]),
//!   then serves a tiny protocol (below);
//! - [`Haproxy`]: Debian's HAProxy with `accept-proxy` frontends, its log
//!   lines collected ([`HaproxyLog`]).
//!
//! The backend's protocol, after the header: one line
//! - `GET <n>\n`: answers the info line, then `n` bytes of
//!   [`servers::pattern_byte`], then closes;
//! - `PUT <n>\n` and `n` bytes: answers the info line with ` got=<n>
//!   fnv=<hex>` (FNV-1a 64 of the bytes received) appended, then closes;
//! - `GET / HTTP/1.x` and headers: an HTTP/1.0 200 whose body is the info line;
//! - nothing (EOF right after the header): recorded as [`Request::Eof`].
//!
//! The info line is `pp src=<ip:port> dst=<ip:port> tlvs=<type>:<hex>,...`.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    netns::{Host, Topology, wait_for},
    servers,
};

/// FNV-1a, 64 bits: a checksum both ends compute without another crate.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Upload bytes: a xorshift stream, so a shifted or duplicated range
/// changes the checksum.
pub fn upload_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A parsed PROXY v2 header, as the `ppp` crate read it.
#[derive(Clone, Debug, PartialEq)]
pub struct PpHeader {
    /// Total length on the wire (16 + the length field).
    pub len: usize,
    pub version: ppp::v2::Version,
    pub command: ppp::v2::Command,
    pub protocol: ppp::v2::Protocol,
    /// Source and destination, when the family is IPv4.
    pub src: Option<SocketAddrV4>,
    pub dst: Option<SocketAddrV4>,
    pub family: ppp::v2::AddressFamily,
    /// Every TLV in order (type, value), NOOP padding included.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl PpHeader {
    /// The value of the first TLV of `kind`.
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    fn info_line(&self) -> String {
        let mut tlvs = String::new();
        for (i, (k, v)) in self.tlvs.iter().enumerate() {
            if i > 0 {
                tlvs.push(',');
            }
            let _ = write!(tlvs, "{k:02x}:");
            for b in v {
                let _ = write!(tlvs, "{b:02x}");
            }
        }
        let show = |a: Option<SocketAddrV4>| a.map(|a| a.to_string()).unwrap_or("-".into());
        format!(
            "pp src={} dst={} tlvs={tlvs}",
            show(self.src),
            show(self.dst)
        )
    }
}

/// What the client sent after the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// EOF right after the header.
    Eof,
    Get(usize),
    /// `PUT`: bytes received and their checksum.
    Put {
        got: usize,
        fnv: u64,
    },
    /// An HTTP request line.
    Http(String),
    /// Anything else, or an error while reading it.
    Other(String),
}

/// One connection the backend accepted.
#[derive(Clone, Debug)]
pub struct PpRecord {
    /// The port the backend accepted it on.
    pub local_port: u16,
    /// The TCP peer (the gateway's NAT address, or HAProxy).
    pub peer: SocketAddr,
    /// The header, or why it did not parse.
    pub header: Result<PpHeader, String>,
    pub request: Request,
}

/// A PROXY v2 backend on threads in a namespace; stopped on drop.
pub struct PpBackend {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    records: Arc<Mutex<Vec<PpRecord>>>,
}

impl Drop for PpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl PpBackend {
    /// Listens on `addr` at each of `ports` in `host`.
    pub fn start(host: &Host, addr: Ipv4Addr, ports: &[u16]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for &port in ports {
            let bind = SocketAddrV4::new(addr, port);
            let listener = host
                .run_in(move || TcpListener::bind(bind))?
                .with_context(|| format!("binding TCP {bind}"))?;
            listener.set_nonblocking(true)?;
            let (stop, records) = (stop.clone(), records.clone());
            handles.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let records = records.clone();
                            std::thread::spawn(move || {
                                let record = serve(stream, peer, port);
                                if let Ok(mut r) = records.lock() {
                                    r.push(record);
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            handles,
            records,
        })
    }

    /// Every connection served so far (recorded once the backend is done with it).
    pub fn records(&self) -> Vec<PpRecord> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits for the record of the connection on `local_port` whose header
    /// says its source was `src`.
    pub fn wait_record(&self, local_port: u16, src: SocketAddrV4) -> anyhow::Result<PpRecord> {
        wait_for(
            &format!("the backend's record of {src} on port {local_port}"),
            Duration::from_secs(10),
            || {
                Ok(self.records().into_iter().find(|r| {
                    r.local_port == local_port
                        && r.header.as_ref().is_ok_and(|h| h.src == Some(src))
                }))
            },
        )
        .with_context(|| format!("records so far: {:#?}", self.records()))
    }
}

/// Reads the header (however the bytes are split into segments), then serves
/// the request; returns what it saw.
fn serve(stream: TcpStream, peer: SocketAddr, local_port: u16) -> PpRecord {
    let mut record = PpRecord {
        local_port,
        peer,
        header: Err("nothing read".into()),
        request: Request::Other(String::new()),
    };
    let result = (|| -> anyhow::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut stream = stream;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (header, rest) = loop {
            match ppp::v2::Header::try_from(buf.as_slice()) {
                Ok(h) => {
                    let header = convert(&h)?;
                    break (header, buf[h.len()..].to_vec());
                }
                Err(e) if ppp::PartialResult::is_incomplete(&e) => {}
                Err(e) => bail!(
                    "not a PROXY v2 header ({e}): {:02x?}",
                    &buf[..buf.len().min(64)]
                ),
            }
            let n = stream.read(&mut chunk).context("reading the header")?;
            if n == 0 {
                bail!(
                    "EOF within the header after {} bytes: {buf:02x?}",
                    buf.len()
                );
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let info = header.info_line();
        record.header = Ok(header);
        let mut reader = BufReader::new(std::io::Cursor::new(rest).chain(stream.try_clone()?));
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            record.request = Request::Eof;
            return Ok(());
        }
        if line.starts_with("GET /") {
            record.request = Request::Http(line.trim().to_owned());
            let mut h = String::new();
            while reader.read_line(&mut h)? > 2 {
                h.clear();
            }
            let body = format!("{info}\n");
            stream.write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )?;
        } else if let Some(n) = line.trim().strip_prefix("GET ") {
            let n: usize = n.parse().context("GET <n>")?;
            record.request = Request::Get(n);
            stream.write_all(format!("{info}\n").as_bytes())?;
            let mut out = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < n {
                let len = out.len().min(n - sent);
                for (i, b) in out[..len].iter_mut().enumerate() {
                    *b = servers::pattern_byte(sent + i);
                }
                stream.write_all(&out[..len])?;
                sent += len;
            }
        } else if let Some(n) = line.trim().strip_prefix("PUT ") {
            let n: usize = n.parse().context("PUT <n>")?;
            let mut fnv = Fnv::default();
            let mut got = 0;
            let mut body = vec![0u8; 64 * 1024];
            while got < n {
                let want = body.len().min(n - got);
                let k = reader.read(&mut body[..want])?;
                if k == 0 {
                    break;
                }
                fnv.update(&body[..k]);
                got += k;
            }
            record.request = Request::Put { got, fnv: fnv.0 };
            stream.write_all(format!("{info} got={got} fnv={:016x}\n", fnv.0).as_bytes())?;
        } else {
            record.request = Request::Other(line.clone());
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })();
    if let Err(e) = result {
        if record.header.is_err() {
            record.header = Err(format!("{e:#}"));
        } else {
            record.request = Request::Other(format!("error: {e:#}"));
        }
    }
    record
}

fn convert(h: &ppp::v2::Header<'_>) -> anyhow::Result<PpHeader> {
    let (src, dst) = match h.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            Some(SocketAddrV4::new(a.source_address, a.source_port)),
            Some(SocketAddrV4::new(a.destination_address, a.destination_port)),
        ),
        _ => (None, None),
    };
    let mut tlvs = Vec::new();
    for tlv in h.tlvs() {
        let tlv = tlv.map_err(|e| anyhow!("bad TLV: {e}"))?;
        tlvs.push((tlv.kind, tlv.value.to_vec()));
    }
    Ok(PpHeader {
        len: h.len(),
        version: h.version,
        command: h.command,
        protocol: h.protocol,
        src,
        dst,
        family: h.address_family(),
        tlvs,
    })
}

/// The info line's fields, as a client reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub src: String,
    pub dst: String,
    pub tlvs: String,
    /// `got=` and `fnv=` of a PUT answer.
    pub got: Option<usize>,
    pub fnv: Option<u64>,
}

pub fn parse_info(line: &str) -> anyhow::Result<Info> {
    let rest = line
        .trim()
        .strip_prefix("pp ")
        .ok_or_else(|| anyhow!("not an info line: {line:?}"))?;
    let mut info = Info {
        src: String::new(),
        dst: String::new(),
        tlvs: String::new(),
        got: None,
        fnv: None,
    };
    for w in rest.split_whitespace() {
        if let Some(v) = w.strip_prefix("src=") {
            info.src = v.into();
        } else if let Some(v) = w.strip_prefix("dst=") {
            info.dst = v.into();
        } else if let Some(v) = w.strip_prefix("tlvs=") {
            info.tlvs = v.into();
        } else if let Some(v) = w.strip_prefix("got=") {
            info.got = Some(v.parse()?);
        } else if let Some(v) = w.strip_prefix("fnv=") {
            info.fnv = Some(u64::from_str_radix(v, 16)?);
        }
    }
    Ok(info)
}

fn connect(src: Option<SocketAddrV4>, dst: SocketAddrV4) -> anyhow::Result<TcpStream> {
    let s = match src {
        Some(src) => servers::connect_from(src, dst)?,
        None => TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))
            .with_context(|| format!("connecting to {dst}"))?,
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// What a client of the backend got.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The client's own address.
    pub local: SocketAddrV4,
    /// The backend's info line.
    pub info: Info,
    /// Body bytes (GET: verified against the pattern).
    pub body_len: usize,
}

fn local_v4(s: &TcpStream) -> anyhow::Result<SocketAddrV4> {
    match s.local_addr()? {
        SocketAddr::V4(a) => Ok(a),
        other => bail!("not IPv4: {other}"),
    }
}

/// `GET <n>` from `host` (optionally from a fixed `src`): the info line and
/// the body, every byte checked.
pub fn get(
    host: &Host,
    src: Option<SocketAddrV4>,
    dst: SocketAddrV4,
    n: usize,
) -> anyhow::Result<Reply> {
    host.run_in(move || -> anyhow::Result<Reply> {
        let mut s = connect(src, dst)?;
        let local = local_v4(&s)?;
        s.write_all(format!("GET {n}\n").as_bytes())?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let info = parse_info(&line)?;
        let mut got = 0usize;
        let mut fnv_body = vec![0u8; 64 * 1024];
        loop {
            let k = reader
                .read(&mut fnv_body)
                .with_context(|| format!("after {got} body bytes"))?;
            if k == 0 {
                break;
            }
            if let Some(i) = (0..k).find(|&i| fnv_body[i] != servers::pattern_byte(got + i)) {
                bail!("body byte {} corrupted", got + i);
            }
            got += k;
        }
        if got != n {
            bail!("body has {got} bytes, expected {n}");
        }
        Ok(Reply {
            local,
            info,
            body_len: got,
        })
    })?
}

/// `PUT <n>` of [`upload_bytes`]`(n, seed)`: the backend's answer, its
/// checksum compared with the sender's.
pub fn put(host: &Host, dst: SocketAddrV4, n: usize, seed: u64) -> anyhow::Result<Reply> {
    host.run_in(move || -> anyhow::Result<Reply> {
        let data = upload_bytes(n, seed);
        let mut fnv = Fnv::default();
        fnv.update(&data);
        let mut s = connect(None, dst)?;
        let local = local_v4(&s)?;
        s.write_all(format!("PUT {n}\n").as_bytes())?;
        s.write_all(&data)?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).context("reading the answer")?;
        let info = parse_info(&line)?;
        if info.got != Some(n) || info.fnv != Some(fnv.0) {
            bail!(
                "the backend got {:?} bytes with FNV {:x?}; sent {n} with {:016x}",
                info.got,
                info.fnv,
                fnv.0
            );
        }
        Ok(Reply {
            local,
            info,
            body_len: n,
        })
    })?
}

/// Connects from `host` and closes without sending a byte; returns the
/// client's address and whatever the server answered before closing.
pub fn connect_and_close(
    host: &Host,
    dst: SocketAddrV4,
) -> anyhow::Result<(SocketAddrV4, Vec<u8>)> {
    host.run_in(move || -> anyhow::Result<(SocketAddrV4, Vec<u8>)> {
        let mut s = connect(None, dst)?;
        let local = local_v4(&s)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).context("reading to EOF")?;
        Ok((local, answer))
    })?
}

/// An HTTP/1.0 GET from `host`: the client's address, the status line and the body.
pub fn http_get(
    host: &Host,
    src: Option<SocketAddrV4>,
    dst: SocketAddrV4,
) -> anyhow::Result<(SocketAddrV4, String, String)> {
    host.run_in(move || -> anyhow::Result<(SocketAddrV4, String, String)> {
        let mut s = connect(src, dst)?;
        let local = local_v4(&s)?;
        s.write_all(format!("GET / HTTP/1.0\r\nHost: {dst}\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        s.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("not an HTTP response: {response:?}"))?;
        Ok((
            local,
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        ))
    })?
}

/// One line HAProxy logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaproxyLog {
    /// `http`, `err` (a connection without a request) or `tcp`.
    pub kind: String,
    /// The client address and port HAProxy learned (`%ci:%cp`).
    pub client: String,
    /// The destination it learned (`%fi:%fp`).
    pub frontend: String,
    /// Termination state (`%tsc`), HTTP status (`%ST`), bytes.
    pub fields: Vec<(String, String)>,
}

impl HaproxyLog {
    pub fn field(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("plink-pp ")?;
        let mut words = rest.split_whitespace();
        let kind = words.next()?.to_owned();
        let mut fields: Vec<(String, String)> = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let get = |f: &[(String, String)], k: &str| {
            f.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let client = format!("{}:{}", get(&fields, "ci"), get(&fields, "cp"));
        let frontend = format!("{}:{}", get(&fields, "fi"), get(&fields, "fp"));
        fields.retain(|(k, _)| !["ci", "cp", "fi", "fp"].contains(&k.as_str()));
        Some(Self {
            kind,
            client,
            frontend,
            fields,
        })
    }
}

/// HAProxy in a namespace, with two `accept-proxy` frontends on `addr`:
/// `:8080` mode http, answering `200` with the client and destination it
/// learned (`haproxy saw client=<ip:port> dst=<ip:port>`); `:8081` mode tcp,
/// relaying to `relay` with its own PROXY v2 header (`send-proxy-v2`), so
/// the relay target learns what HAProxy parsed.
pub struct Haproxy {
    lines: Arc<Mutex<Vec<String>>>,
    pub config: PathBuf,
}

impl Haproxy {
    pub const HTTP_PORT: u16 = 8080;
    pub const TCP_PORT: u16 = 8081;

    pub fn start(
        topo: &mut Topology,
        host: &Host,
        addr: Ipv4Addr,
        relay: SocketAddrV4,
    ) -> anyhow::Result<Self> {
        let config = topo.scratch_dir()?.join("haproxy.cfg");
        let (http, tcp) = (Self::HTTP_PORT, Self::TCP_PORT);
        // `log stdout`: the lines come back on the pipe the topology holds.
        // error-log-format: connections that end before a request (a
        // client that closes first) are logged with it.
        std::fs::write(
            &config,
            format!(
                "global
    log stdout format raw local0
defaults
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    mode http
    bind {addr}:{http} accept-proxy
    log-format \"plink-pp http ci=%ci cp=%cp fi=%fi fp=%fp st=%ST ts=%tsc\"
    error-log-format \"plink-pp err ci=%ci cp=%cp fi=%fi fp=%fp ts=%tsc\"
    http-request return status 200 content-type text/plain lf-string \"haproxy saw client=%[src]:%[src_port] dst=%[dst]:%[dst_port]\\n\"
frontend relay
    mode tcp
    bind {addr}:{tcp} accept-proxy
    log-format \"plink-pp tcp ci=%ci cp=%cp fi=%fi fp=%fp ts=%tsc up=%U down=%B\"
    default_backend relay
backend relay
    mode tcp
    server s1 {relay} send-proxy-v2
"
            ),
        )?;
        let cfg = config.to_str().context("non-UTF-8 path")?.to_owned();
        let which = std::process::Command::new("which").arg("haproxy").output();
        if !which.is_ok_and(|o| o.status.success()) {
            bail!("haproxy is missing: run `cargo xtask setup` (installs Debian's haproxy)");
        }
        let index = topo.spawn(host, "haproxy", &["-db", "-f", &cfg])?;
        let child = topo.child_mut(index);
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("[haproxy] {line}");
                    if let Ok(mut l) = lines.lock() {
                        l.push(line);
                    }
                }
            });
        }
        // Listening once `ss` shows both ports (connecting to probe would be
        // logged as a bad header).
        wait_for("haproxy to listen", Duration::from_secs(10), || {
            let out = host.exec("ss", &["-Hltn"])?;
            let up = [http, tcp]
                .iter()
                .all(|p| out.contains(&format!("{addr}:{p} ")));
            Ok(up.then_some(()))
        })
        .with_context(|| format!("haproxy's output: {:?}", lines.lock().map(|l| l.clone())))?;
        Ok(Self { lines, config })
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<HaproxyLog> {
        self.lines
            .lock()
            .map(|l| l.iter().filter_map(|l| HaproxyLog::parse(l)).collect())
            .unwrap_or_default()
    }

    /// Waits for a log line of `kind` whose client is `client`.
    pub fn wait_log(&self, kind: &str, client: SocketAddrV4) -> anyhow::Result<HaproxyLog> {
        let client = client.to_string();
        wait_for(
            &format!("haproxy to log a {kind} connection from {client}"),
            Duration::from_secs(10),
            || {
                Ok(self
                    .logs()
                    .into_iter()
                    .find(|l| l.kind == kind && l.client == client))
            },
        )
        .with_context(|| {
            format!(
                "haproxy's lines: {:#?}",
                self.lines.lock().map(|l| l.clone())
            )
        })
    }
}
