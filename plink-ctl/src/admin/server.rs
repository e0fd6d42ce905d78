//! The admin socket's server side.

use std::{
    io,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use tokio::sync::watch;

use super::{MAX_LINE, Request, Response, Row, RowCount};
use crate::{
    approval::Action,
    controller::{Controller, DataplaneQueries},
    events::Events,
    model::Model,
};

/// A bound admin socket. Removes its socket file when dropped (if the file
/// is still the one it created).
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

impl AdminListener {
    /// Binds `path` with mode 0600. The socket is created under a temporary
    /// name, chmod-ed, then renamed into place, so it is never reachable
    /// with a wider mode. A stale socket left by a dead controller is
    /// replaced; a live one (something answers) is an error.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        if path.exists() {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "{} is in use: another plink-ctl is serving it",
                            path.display()
                        ),
                    ));
                }
                Err(_) => std::fs::remove_file(path)?,
            }
        }
        let file_name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "socket path has no file name")
        })?;
        let tmp = parent.join(format!(
            ".{}.{}.tmp",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let setup = (|| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, path)?;
            std::fs::metadata(path).map(|m| m.ino())
        })();
        match setup {
            Ok(inode) => Ok(Self {
                listener,
                path: path.to_owned(),
                inode,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        if std::fs::metadata(&self.path).map(|m| m.ino()).ok() == Some(self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What connections read besides the controller: the published model and
/// the dataplane, so listings never wait for the controller's lock (an
/// apply holds it) and never hold it while they scan.
#[derive(Clone)]
struct Views {
    controller: Arc<Mutex<Controller>>,
    /// The committed model (published only once the kernel holds it).
    models: watch::Receiver<Arc<Model>>,
    dataplane: Option<Arc<dyn DataplaneQueries>>,
    events: Events,
}

/// Serves admin requests until `shutdown` completes. The controller's
/// dataplane must be set before; what listings read is taken from the
/// controller here, when called, not when first polled.
pub fn serve(
    listener: AdminListener,
    controller: Arc<Mutex<Controller>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> impl std::future::Future<Output = ()> {
    let views = {
        let c = lock(&controller);
        Views {
            models: c.subscribe(),
            dataplane: c.dataplane(),
            events: c.events(),
            controller: controller.clone(),
        }
    };
    serve_views(listener, views, shutdown)
}

async fn serve_views(
    listener: AdminListener,
    views: Views,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let views = views.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, views).await {
                            tracing::debug!("admin connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("admin socket accept: {e}");
                    // Do not spin if the error persists (e.g. EMFILE).
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
}

async fn connection(stream: UnixStream, views: Views) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (mut read, mut write) = stream.into_split();
    if uid != 0 {
        // The socket's mode already keeps others out; this holds even if
        // someone loosened it.
        let r = Response::error(
            format!(
                "permission denied: the plink admin API serves root only, and you are uid {uid}; run the command as root"
            ),
            Vec::new(),
        );
        send(&mut write, &r).await?;
        write.shutdown().await?;
        // Closing with the request unread would make the client's read fail
        // with ECONNRESET before it sees the refusal: drain it (bounded)
        // until the client hangs up.
        let drain = async {
            let mut sink = [0u8; 4096];
            let mut total = 0;
            while total <= MAX_LINE {
                match read.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
        return Ok(());
    }
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            let r = Response::error(format!("request longer than {MAX_LINE} bytes"), Vec::new());
            return send(&mut write, &r).await;
        }
        let response = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Events { follow }) => {
                if stream_events(&mut lines, &mut write, &views.events, follow).await? {
                    continue;
                }
                return Ok(());
            }
            Ok(request) if request.streams() => {
                // Rows cross a small bounded channel as they are read: a slow
                // client slows the reader down instead of growing a buffer.
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
                let v = views.clone();
                let producer = tokio::task::spawn_blocking(move || {
                    stream_rows(&v, request, &mut |frame| tx.blocking_send(frame).is_ok())
                });
                while let Some(frame) = rx.recv().await {
                    write.write_all(&frame).await?;
                }
                if let Err(e) = producer.await {
                    send(
                        &mut write,
                        &Response::error(format!("internal error: {e}"), Vec::new()),
                    )
                    .await?;
                }
                write.flush().await?;
                continue;
            }
            Ok(request) => {
                let controller = views.controller.clone();
                // Requests write the state file (fsync): keep them off the
                // async workers.
                tokio::task::spawn_blocking(move || handle(&controller, request))
                    .await
                    .unwrap_or_else(|e| Response::error(format!("internal error: {e}"), Vec::new()))
            }
            Err(e) => Response::error(format!("bad request: {e}"), Vec::new()),
        };
        send(&mut write, &response).await?;
    }
}

/// Streams the events in memory, then with `follow` every new one until
/// the client hangs up (false: the connection is done) or falls too far
/// behind (it gets an error response saying how many it missed).
async fn stream_events(
    lines: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    events: &Events,
    follow: bool,
) -> io::Result<bool> {
    use tokio::sync::broadcast::error::RecvError;
    let (recent, mut rx) = events.subscribe();
    let mut rows = 0u64;
    for r in recent {
        write
            .write_all(&frame(&Row {
                row: serde_json::to_value(&r)?,
            })?)
            .await?;
        rows += 1;
    }
    if !follow {
        send(write, &Response::ok(RowCount { rows })).await?;
        return Ok(true);
    }
    write.flush().await?;
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(r) => {
                    write.write_all(&frame(&Row { row: serde_json::to_value(&r)? })?).await?;
                    write.flush().await?;
                    rows += 1;
                }
                Err(RecvError::Lagged(n)) => {
                    let e = format!("this client fell {n} events behind; reconnect (the file has them all)");
                    send(write, &Response::error(e, Vec::new())).await?;
                    return Ok(false);
                }
                Err(RecvError::Closed) => {
                    send(write, &Response::ok(RowCount { rows })).await?;
                    return Ok(false);
                }
            },
            // A follower sends nothing more: end of input means it is gone.
            n = lines.read(&mut scratch) => {
                if matches!(n, Ok(0) | Err(_)) {
                    return Ok(false);
                }
            }
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> io::Result<()> {
    write.write_all(&frame(r)?).await?;
    write.flush().await
}

/// One line of the answer.
fn frame(v: &impl serde::Serialize) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(v).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Answers a listing row by row through `out` (false: the client is gone),
/// then with the closing response. Reads the published model and the
/// dataplane, never the controller's lock.
fn stream_rows(views: &Views, request: Request, out: &mut dyn FnMut(Vec<u8>) -> bool) {
    let mut rows = 0u64;
    let result = {
        let mut emit = |row: serde_json::Value| -> anyhow::Result<()> {
            if !out(frame(&Row { row })?) {
                anyhow::bail!("the client went away");
            }
            rows += 1;
            Ok(())
        };
        match request {
            Request::ListEndpoints => {
                let model = views.models.borrow().clone();
                let mut list: Vec<_> = model.endpoints.values().collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                list.into_iter()
                    .try_for_each(|e| emit(serde_json::to_value(e)?))
            }
            Request::Conntrack => match &views.dataplane {
                Some(dp) => dp
                    .conntrack(&mut |f| emit(serde_json::to_value(f)?))
                    .map_err(|e| e.context("reading conntrack")),
                None => Err(anyhow::anyhow!("this controller runs no dataplane")),
            },
            other => Err(anyhow::anyhow!(
                "internal error: {other:?} is not a listing"
            )),
        }
    };
    let response = match result {
        Ok(()) => Response::ok(RowCount { rows }),
        Err(e) => Response::error(format!("{e:#}"), Vec::new()),
    };
    if let Ok(line) = frame(&response) {
        out(line);
    }
}

fn lock(c: &Mutex<Controller>) -> std::sync::MutexGuard<'_, Controller> {
    // A panic elsewhere poisoned the lock; the state itself is only
    // replaced whole (see Controller::commit), so it is still coherent.
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one request against the controller. A change answers once the
/// dataplane holds it: the controller applies it before committing, and a
/// change the dataplane did not take is an error with its reason.
pub fn handle(controller: &Mutex<Controller>, request: Request) -> Response {
    handle_locked(controller, request)
}

fn handle_locked(controller: &Mutex<Controller>, request: Request) -> Response {
    let mut c = match controller.lock() {
        Ok(c) => c,
        // A panic elsewhere poisoned the lock; the state itself is only
        // replaced whole (see Controller::commit), so it is still coherent.
        Err(poisoned) => poisoned.into_inner(),
    };
    let act = |c: &mut Controller, name: &str, action| match c.act(name, action) {
        Ok(outcome) => Response::ok(outcome),
        Err(e) => Response::error(e.to_string(), Vec::new()),
    };
    match request {
        Request::Status => Response::ok(c.status()),
        Request::Debug { on } => {
            let set = on.map_or(Ok(()), crate::dplog::set);
            match (set, crate::dplog::get()) {
                (Ok(()), Some(now)) => Response::ok(serde_json::json!({ "debug": now })),
                (Err(e), _) => Response::error(e.to_string(), Vec::new()),
                (Ok(()), None) => {
                    Response::error("the dataplane is not running in this process", Vec::new())
                }
            }
        }
        Request::Approve { name } => act(&mut c, &name, Action::Approve),
        Request::Reject { name } => act(&mut c, &name, Action::Reject),
        Request::Remove { name } => act(&mut c, &name, Action::Remove),
        // Streamed by `stream_rows` / `stream_events`, without this lock.
        Request::ListEndpoints | Request::Conntrack | Request::Events { .. } => {
            Response::error("internal error: a listing is streamed", Vec::new())
        }
        Request::Drain => match c.drain() {
            Ok(()) => Response::ok(c.status()),
            Err(e) => Response::error(e.to_string(), Vec::new()),
        },
        Request::Reload => match c.reload() {
            Ok(outcome) => Response::ok(outcome),
            Err(e) => {
                let details = c.diagnostic_lines(&e);
                let headline = if e.diagnostics().is_empty() {
                    e.to_string()
                } else {
                    format!(
                        "reload refused: {} is invalid; the running configuration is unchanged",
                        c.config_path().display()
                    )
                };
                Response::error(headline, details)
            }
        },
    }
}
