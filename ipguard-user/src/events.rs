//! The refused-packet events of the XDP program, read from its pinned ring
//! buffer (`IPG_EVENTS`).
//!
//! The kernel side already limits them (per source and in all, see
//! `ipguard_common::maps`) and counts every event it could not send, so
//! this side only decodes and hands them on. A slow consumer is not
//! compensated here: [`spawn_reader`] waits for room in its channel, the
//! ring fills, and the kernel counts what it then loses
//! (`COUNTER_EVENTS_LOST`), which keeps a single, exact count of losses.

use std::{io, path::Path};

use aya::maps::{Map, MapData, RingBuf};
use ipguard_common::{DropEvent, MAP_EVENTS};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};

use crate::datapath::DatapathError;

/// Decodes one ring-buffer record; None if it is too short to be a
/// [`DropEvent`] (a newer or corrupt producer).
pub fn decode(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() < size_of::<DropEvent>() {
        return None;
    }
    // SAFETY: at least size_of::<DropEvent>() bytes are readable, and
    // DropEvent is plain integers (every bit pattern is valid); the read
    // does not assume alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

/// An async reader of the pinned event ring.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    /// Opens the ring pinned under `pin_dir`. Needs a tokio runtime with
    /// I/O enabled.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let path = pin_dir.join(MAP_EVENTS);
        if !path.exists() {
            return Err(DatapathError::NotLoaded(pin_dir.to_path_buf()));
        }
        let err = |source| DatapathError::Map {
            name: MAP_EVENTS,
            source,
        };
        let data = MapData::from_pin(&path).map_err(err)?;
        let ring = RingBuf::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)?;
        // SAFETY: the RingBuf owns its map's descriptor and keeps it open,
        // unchanged, for as long as it lives, which the AsyncFd bounds.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                DatapathError::Io {
                    what: "cannot poll the event ring",
                    path,
                    source: e.into(),
                }
            })?;
        Ok(Self { ring })
    }

    /// The next event already in the ring, without waiting.
    pub fn try_next(&mut self) -> Option<DropEvent> {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            if let Some(ev) = decode(&item) {
                return Some(ev);
            }
        }
        None
    }

    /// Waits for the next event.
    pub async fn next(&mut self) -> io::Result<DropEvent> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(ev) = decode(&item) {
                    return Ok(ev);
                }
            }
            // Clears only the readiness this guard saw: an event submitted
            // since wakes the next wait.
            guard.clear_ready();
        }
    }
}

/// Reads events on a task of the current runtime and sends them to `tx`
/// until the receiver goes away.
pub fn spawn_reader(pin_dir: &Path, tx: mpsc::Sender<DropEvent>) -> anyhow::Result<()> {
    let mut reader = EventReader::open(pin_dir)?;
    tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(ev) => {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(
                        "reading the event ring failed ({e}); events stop here, counters go on"
                    );
                    return;
                }
            }
        }
    });
    Ok(())
}
