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
    /// A row could not be used (e.g. printing it failed).
    #[error("{0}")]
    Row(String),
}

/// Sends one request and reads its response. A refused request is an
/// `Ok(Response { ok: false, .. })`. The rows of a streamed answer are
/// collected into `data` as an array (use [`request_rows`] to take them one
/// by one instead).
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut rows = Vec::new();
    let mut response = request_rows(socket, req, |row| {
        rows.push(row);
        Ok(())
    })?;
    if req.streams() && response.ok {
        response.data = Some(serde_json::Value::Array(rows));
    }
    Ok(response)
}

/// Sends one request; hands each row of a streamed answer to `on_row` as it
/// arrives, and returns the closing response.
pub fn request_rows(
    socket: &Path,
    req: &Request,
    mut on_row: impl FnMut(serde_json::Value) -> Result<(), ClientError>,
) -> Result<Response, ClientError> {
    let io_err = |cause| ClientError::Io {
        path: socket.to_owned(),
        cause,
    };
    let bad = |detail: String| ClientError::BadAnswer {
        path: socket.to_owned(),
        detail,
    };
    let mut stream = UnixStream::connect(socket).map_err(|cause| ClientError::Connect {
        path: socket.to_owned(),
        cause,
    })?;
    // A reload can take a moment (it fsyncs); a hung daemon should not hang
    // the CLI forever. The timeout is per read, so a long listing is fine.
    // Following events waits for the next one as long as it takes.
    let timeout = match req {
        Request::Events { follow: true } => None,
        _ => Some(Duration::from_secs(30)),
    };
    stream.set_read_timeout(timeout).map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    // Only the daemon, which is root, answers here; each line is one row
    // or the closing response.
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    loop {
        answer.clear();
        let n = reader.read_line(&mut answer).map_err(io_err)?;
        if n == 0 {
            return Err(ClientError::NoAnswer {
                path: socket.to_owned(),
            });
        }
        let value: serde_json::Value =
            serde_json::from_str(answer.trim()).map_err(|e| bad(e.to_string()))?;
        if value.get("row").is_some() {
            let row: super::Row = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            on_row(row.row)?;
            continue;
        }
        return serde_json::from_value(value).map_err(|e| bad(e.to_string()));
    }
}
