//! Forwarded device access: a non-origin vCPU's PIO/MMIO exit becomes an
//! [`Message::IoRequest`] call to the origin ([`Runtime::forward_io`]); the
//! origin's `fv-exec-N` threads run it on the device model and reply.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use dsm_service::NodeId;
use tracing::debug;

use super::wire::Message;
use super::{Runtime, RuntimeError};

/// Largest data of one forwarded access (string I/O moves up to a page).
pub const MAX_IO_DATA: usize = 4096;
/// Executor threads on the origin.
pub(super) const EXECUTORS: usize = 2;

/// Address space of a forwarded access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IoSpace {
    /// Port I/O.
    Pio = 0,
    /// Memory-mapped I/O.
    Mmio = 1,
}

/// One forwarded device access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    /// vCPU that made it.
    pub cpu: u32,
    /// Port or memory space.
    pub space: IoSpace,
    /// Port number or guest-physical address.
    pub addr: u64,
    /// Bytes per element (1, 2, 4, 8).
    pub size: u8,
    /// Elements (string I/O), at least 1.
    pub count: u32,
    /// A write (data goes to the device) or a read.
    pub is_write: bool,
    /// QEMU's `MemTxAttrs`, as bits.
    pub attrs: u32,
}

impl IoAccess {
    /// Bytes of data the access moves.
    pub fn len(&self) -> usize {
        usize::from(self.size) * self.count as usize
    }

    /// Whether it moves no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A forwarded access waiting for an executor: requester, sequence number,
/// the access and the data of a write.
pub(super) type IoJob = (NodeId, u32, IoAccess, Vec<u8>);

/// The origin's queue of forwarded accesses, shared by its executors.
pub(super) type IoQueue = Arc<Mutex<Receiver<IoJob>>>;

impl Runtime {
    /// Forwards an access by a local vCPU to the origin and waits for the
    /// result; `data` carries the bytes written or receives those read.
    pub fn forward_io(&self, access: &IoAccess, data: &mut [u8]) -> Result<u32, RuntimeError> {
        if access.len() > MAX_IO_DATA || data.len() < access.len() {
            return Err(RuntimeError::TooLarge(access.len()));
        }
        if let Some(c) = self.counts.get(access.cpu as usize) {
            c.forwarded.fetch_add(1, Ordering::Relaxed);
        }
        let payload = if access.is_write {
            data[..access.len()].to_vec()
        } else {
            Vec::new()
        };
        let request = |seq| Message::IoRequest {
            seq,
            access: *access,
            data: payload,
        };
        match self.call(0, request)? {
            Message::IoReply {
                result,
                data: reply,
                ..
            } => {
                if !access.is_write {
                    let n = reply.len().min(access.len());
                    data[..n].copy_from_slice(&reply[..n]);
                }
                Ok(result)
            }
            other => Err(RuntimeError::NodeFailed {
                node: 0,
                reason: format!("answered an I/O request with {other:?}"),
            }),
        }
    }

    /// Origin: starts the `fv-exec-N` threads that serve `queue`.
    pub(super) fn spawn_executors(self: &Arc<Self>, queue: &IoQueue) -> Result<(), RuntimeError> {
        for k in 0..EXECUTORS {
            let name = format!("fv-exec-{k}");
            let rt = self.clone();
            let rx = queue.clone();
            super::spawn(name.clone(), move || rt.executor(&name, &rx))
                .map_err(|e| RuntimeError::Dsm(e.to_string()))?;
        }
        Ok(())
    }

    /// One `fv-exec-N` thread: runs queued accesses on the device model and
    /// replies to their requesters, until the queue closes.
    fn executor(&self, name: &str, rx: &Mutex<Receiver<IoJob>>) {
        self.host.thread_start(name);
        loop {
            let job = match rx.lock() {
                Ok(rx) => rx.recv(),
                Err(poisoned) => poisoned.into_inner().recv(),
            };
            let Ok((from, seq, access, mut data)) = job else {
                return;
            };
            data.resize(access.len(), 0);
            let result = self.host.exec_io(&access, &mut data);
            let reply = Message::IoReply {
                seq,
                result,
                data: if access.is_write { Vec::new() } else { data },
            };
            if let Err(e) = self.send(from, &reply) {
                debug!(error = %e, "reply to a failed node dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(size: u8, count: u32) -> IoAccess {
        IoAccess {
            cpu: 0,
            space: IoSpace::Pio,
            addr: 0x3f8,
            size,
            count,
            is_write: false,
            attrs: 0,
        }
    }

    #[test]
    fn an_access_moves_size_times_count_bytes() {
        assert_eq!(access(1, 1).len(), 1);
        assert_eq!(access(4, 3).len(), 12);
        assert_eq!(access(8, 512).len(), MAX_IO_DATA);
        assert!(access(2, 0).is_empty());
        assert!(!access(2, 1).is_empty());
    }
}
