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

use crate::{
    error::{CliError, Exit},
    protocol::{Request, Response},
};

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

    /// [`Client::call`] with the answer read as `T`.
    pub fn call_as<T: serde::de::DeserializeOwned>(
        &mut self,
        req: &Request,
    ) -> Result<T, CliError> {
        let data = self.call(req)?;
        serde_json::from_value(data)
            .map_err(|e| CliError::system(format!("unexpected answer from the daemon: {e}")))
    }

    pub fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.writer.set_read_timeout(t);
    }
}
