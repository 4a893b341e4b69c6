//! The control socket server.
use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot},
};

use super::Call;
use crate::{
    error::{CliError, Exit},
    protocol::{EventLine, Request, Response},
};

/// Longest request line accepted (an `apply` carries a whole policy).
const MAX_REQUEST: usize = 64 << 20;

/// Binds the socket: 0600 in a 0700 directory. A socket nobody answers on
/// is a leftover of a crash and is replaced; one that answers belongs to a
/// running daemon and is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(CliError::system(format!(
                "another ipguard daemon answers on {}: stop it first, or give this one its own --socket",
                path.display()
            ))
            .into());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(
    listener: UnixListener,
    calls: mpsc::Sender<Call>,
    events: broadcast::Sender<EventLine>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let calls = calls.clone();
        let events = events.subscribe();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, calls, events).await {
                tracing::debug!("control connection: {e:#}");
            }
        });
    }
}

fn allowed(stream: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(c) => c.uid() == 0 || c.uid() == me,
        Err(_) => false,
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> Result<()> {
    let mut line = serde_json::to_string(resp)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    Ok(())
}

async fn connection(
    stream: UnixStream,
    calls: mpsc::Sender<Call>,
    mut events: broadcast::Receiver<EventLine>,
) -> Result<()> {
    if !allowed(&stream) {
        let (_, mut w) = stream.into_split();
        send(
            &mut w,
            &Response::err(
                Exit::System,
                "permission denied: the control socket is root only",
            ),
        )
        .await?;
        return Ok(());
    }
    // Who asks, for the history's records.
    let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = AsyncReadExt::take(&mut lines, MAX_REQUEST as u64)
            .read_line(&mut buf)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let req: Request = match serde_json::from_str(buf.trim_end()) {
            Ok(r) => r,
            Err(e) => {
                send(
                    &mut w,
                    &Response::err(Exit::Usage, format!("malformed request: {e}")),
                )
                .await?;
                return Ok(());
            }
        };
        let follow = matches!(req, Request::Events { follow: true });
        let (tx, rx) = oneshot::channel();
        calls
            .send(Call {
                req,
                reply: tx,
                peer_uid,
            })
            .await
            .map_err(|_| anyhow::anyhow!("daemon is shutting down"))?;
        let resp = rx
            .await
            .unwrap_or_else(|_| Response::err(Exit::System, "the daemon is shutting down"));
        send(&mut w, &resp).await?;
        if follow {
            loop {
                match events.recv().await {
                    Ok(ev) => {
                        let mut line = serde_json::to_string(&ev)?;
                        line.push('\n');
                        w.write_all(line.as_bytes()).await?;
                    }
                    // A slow reader loses events rather than slowing the
                    // daemon; it is told how many.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let line = format!("{{\"lagged\":{n}}}\n");
                        w.write_all(line.as_bytes()).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}
