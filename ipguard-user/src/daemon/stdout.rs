//! The daemon's event stream on stdout, written by a thread of its own.
//!
//! A reader that stops reading (a pipe nobody drains, a stopped `journalctl`
//! pager) blocks a write to stdout. Written from the event loop, that stopped
//! the loop too: no answers on the control socket, no expiry of runtime
//! entries or time windows. The loop now hands each line to a bounded queue;
//! when the queue is full the line is dropped and counted, never waited for.
//! (`ipguard events` and `blocked` read the daemon's own record, which never
//! drops.)

use std::{
    io::Write,
    sync::mpsc::{SyncSender, TrySendError, sync_channel},
};

use anyhow::{Context, Result};

/// Lines held for a slow reader: a few seconds of the default event cap.
const QUEUE: usize = 8192;

pub struct EventOut {
    tx: SyncSender<String>,
    /// Lines dropped because stdout did not keep up.
    pub dropped: u64,
}

impl EventOut {
    pub fn spawn() -> Result<Self> {
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("ipguard-stdout".into())
            .spawn(move || {
                let mut out = std::io::stdout();
                for line in rx {
                    // stdout gone (closed pipe): the events still go to
                    // `ipguard events`; nothing to write them to here.
                    if writeln!(out, "{line}").is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the thread that writes events to stdout")?;
        Ok(Self { tx, dropped: 0 })
    }

    /// Queues one line; drops it (and says so, now and then) when the
    /// reader is behind.
    pub fn send(&mut self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped += 1;
                if self.dropped == 1 || self.dropped.is_multiple_of(10_000) {
                    tracing::warn!(
                        dropped = self.dropped,
                        "stdout does not keep up with events: lines dropped from the stream (`ipguard events` still has them)"
                    );
                }
            }
        }
    }
}
