//! The admin API: line-delimited JSON over a Unix socket (mode 0600), for
//! root only (checked again with SO_PEERCRED on every connection).
//!
//! Each request is one JSON object on one line, e.g.
//! `{"command":"approve","name":"orders-b"}`; each response is one line,
//! `{"ok":true,"data":...}` or `{"ok":false,"error":"...","details":[...]}`.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

pub use client::{ClientError, request};
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
    /// Live flows with their NAT mapping.
    Conntrack,
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
/// refused); a response is one line of any length (a conntrack listing grows
/// with the flows).
pub const MAX_LINE: usize = 64 * 1024;

#[cfg(test)]
mod tests;
