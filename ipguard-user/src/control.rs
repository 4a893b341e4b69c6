//! The control socket: one JSON request per line from the client, one JSON
//! response per line from the daemon (`events --follow` then streams one
//! event per line). The socket is mode 0600 in a 0700 directory and the
//! daemon also checks the peer's credentials: only root (or the daemon's
//! own user) may talk to it.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::error::{CliError, Exit};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Struct variants (not unit ones) so that unknown fields are refused
    // for every request.
    Status {},
    Apply {
        /// Where the client read the policy (for status and logs).
        path: String,
        /// The policy text itself: the daemon never reads a client's file.
        text: String,
        confirm_secs: Option<u64>,
        force: bool,
    },
    Confirm {},
    Events {
        follow: bool,
    },
    Allow {
        addr: String,
        for_secs: Option<u64>,
        service: Option<String>,
        label: Option<String>,
    },
    Revoke {
        addr: String,
    },
    Blocked {},
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    /// One readable line when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exit code the client should use when `ok` is false (cli.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<u8>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            exit: None,
            data,
        }
    }
    pub fn err(exit: Exit, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            exit: Some(exit as u8),
            data: serde_json::Value::Null,
        }
    }
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Self, CliError> {
        let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => CliError::system(format!(
                "the ipguard daemon is not running (nothing answers at {}): start it with `ipguard run`, or pass the --socket it uses",
                socket.display()
            )),
            std::io::ErrorKind::PermissionDenied => CliError::system(format!(
                "permission denied on {}: the control socket is root only, run this with sudo",
                socket.display()
            )),
            _ => CliError::system(format!("cannot connect to {}: {e}", socket.display())),
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| CliError::system(format!("socket: {e}")))?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends a request and reads its response; a refusal becomes an error
    /// with the daemon's exit code.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, CliError> {
        let mut line = serde_json::to_string(req).map_err(|e| CliError::system(e.to_string()))?;
        line.push('\n');
        let io = |e: std::io::Error| {
            CliError::system(format!("the daemon closed the control connection: {e}"))
        };
        self.writer.write_all(line.as_bytes()).map_err(io)?;
        let resp = self.read_line()?.ok_or_else(|| {
            CliError::system("the daemon closed the control connection without answering")
        })?;
        let resp: Response = serde_json::from_str(&resp)
            .map_err(|e| CliError::system(format!("malformed answer from the daemon: {e}")))?;
        if resp.ok {
            Ok(resp.data)
        } else {
            let exit = match resp.exit {
                Some(1) => Exit::Refused,
                Some(2) => Exit::Usage,
                _ => Exit::System,
            };
            Err(CliError {
                exit,
                message: resp
                    .error
                    .unwrap_or_else(|| "the daemon refused the request".into()),
            })
        }
    }

    /// The next streamed line (events --follow); None at end of stream.
    pub fn read_line(&mut self) -> Result<Option<String>, CliError> {
        let mut buf = String::new();
        match self.reader.read_line(&mut buf) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(buf.trim_end().to_string())),
            Err(e) => Err(CliError::system(format!("reading from the daemon: {e}"))),
        }
    }

    pub fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.writer.set_read_timeout(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::Allow {
            addr: "203.0.113.9".into(),
            for_secs: Some(2),
            service: None,
            label: Some("ticket".into()),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}
