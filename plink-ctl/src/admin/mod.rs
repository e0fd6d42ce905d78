//! The admin API: line-delimited JSON over a Unix socket (mode 0600), for
//! root only (checked again with SO_PEERCRED on every connection).
//!
//! Each request is one JSON object on one line, e.g.
//! `{"command":"approve","name":"orders-b"}`; each response is one line,
//! `{"ok":true,"data":...}` or `{"ok":false,"error":"...","details":[...]}`.
//! Listings (`list_endpoints`, `conntrack`) stream: one `{"row":...}` line
//! per row, as the daemon reads them, then the response line (its data is
//! the row count), so an answer has no size limit and neither side holds a
//! whole listing as one message. `events` streams the same way: the
//! events in memory as rows, then (with `follow`) every new one as it
//! happens, until the client hangs up.

pub mod client;
pub mod server;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use client::{ClientError, request, request_rows};
pub use server::{AdminListener, serve};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    ListEndpoints,
    Approve {
        name: String,
    },
    Reject {
        name: String,
    },
    Remove {
        name: String,
    },
    Reload,
    /// Withdraw every announced route (docs/FLEET.md); flows keep forwarding.
    Drain,
    /// Live flows with their NAT mapping.
    Conntrack,
    /// The event log's records in memory (docs/EVENTS.md); with `follow`,
    /// then every new record as it is written.
    Events {
        #[serde(default)]
        follow: bool,
    },
    /// The datapath's debug messages (aya-log, into the controller's log):
    /// on, off, or (None) just ask.
    Debug {
        #[serde(default)]
        on: Option<bool>,
    },
}

impl Request {
    /// Whether the answer is streamed as rows.
    pub fn streams(&self) -> bool {
        matches!(
            self,
            Request::ListEndpoints | Request::Conntrack | Request::Events { .. }
        )
    }
}

/// One line of a streamed answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub row: serde_json::Value,
}

/// The data of a streamed answer's closing response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowCount {
    pub rows: u64,
}

/// One live flow as `conntrack` lists it: written by the daemon, read by
/// the CLI (one type, so the two cannot drift apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    /// The endpoint's name; `None` if the flow's endpoint id names none.
    pub endpoint: Option<String>,
    pub network: Option<String>,
    pub network_id: u32,
    /// `tcp`, `udp`, `icmp` or `other`.
    pub protocol: String,
    pub client: SocketAddr,
    pub endpoint_address: SocketAddr,
    pub nat: SocketAddr,
    pub backend: SocketAddr,
    pub backend_id: u32,
    pub tcp_state: u8,
    pub ingress_ifindex: u32,
    pub expires_in_ms: u64,
    /// Bytes of the PROXY protocol header the flow carries (0: none; a
    /// daemon without PROXY protocol sends no field).
    #[serde(default)]
    pub proxy_header_len: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// One line per problem, e.g. each config error of a refused reload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Self {
        match serde_json::to_value(data) {
            Ok(v) => Self {
                ok: true,
                data: Some(v),
                error: None,
                details: Vec::new(),
            },
            Err(e) => Self::error(format!("encoding the response: {e}"), Vec::new()),
        }
    }

    pub fn error(error: impl Into<String>, details: Vec<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(error.into()),
            details,
        }
    }
}

/// Requests are single lines of at most this many bytes (longer ones are
/// refused); listings stream row by row.
pub const MAX_LINE: usize = 64 * 1024;

#[cfg(test)]
mod tests;
