//! The admin socket's client side, used by the CLI (blocking, no runtime).

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to {path}: {cause}. Is `plink-ctl run` running, with this admin_socket, and are you root?"
    )]
    Connect { path: PathBuf, cause: io::Error },
    #[error("talking to {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("{path} closed the connection without answering")]
    NoAnswer { path: PathBuf },
    #[error("{path} answered something that is not a plink response: {detail}")]
    BadAnswer { path: PathBuf, detail: String },
}

/// Sends one request and reads its response. A refused request is an
/// `Ok(Response { ok: false, .. })`.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let io_err = |cause| ClientError::Io {
        path: socket.to_owned(),
        cause,
    };
    let mut stream = UnixStream::connect(socket).map_err(|cause| ClientError::Connect {
        path: socket.to_owned(),
        cause,
    })?;
    // A reload can take a moment (it fsyncs); a hung daemon should not hang
    // the CLI forever.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    // The answer is one line of any length: a conntrack listing grows with
    // the flows (about 350 bytes each, 90 MB for a full default table).
    // Only the daemon, which is root, answers here.
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let n = reader.read_line(&mut answer).map_err(io_err)?;
    if n == 0 {
        return Err(ClientError::NoAnswer {
            path: socket.to_owned(),
        });
    }
    serde_json::from_str(answer.trim()).map_err(|e| ClientError::BadAnswer {
        path: socket.to_owned(),
        detail: e.to_string(),
    })
}
