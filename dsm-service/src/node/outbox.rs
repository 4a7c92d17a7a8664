//! [`Outbox`]: the coherence messages one batch of work produces, gathered
//! per destination and sent as one frame each at the end of the batch.
//!
//! The outbox only sends. A send that fails is returned to the caller
//! ([`Outbox::take_failures`]); deciding that the peer is down is the node's
//! business, not the outbox's.

use std::collections::VecDeque;

use crate::coherence::messages::Msg;
use crate::transport::TransportError;
use crate::NodeId;

/// An outgoing frame is sent as soon as it grows past this.
pub(super) const FLUSH_AT: usize = 1 << 20;

/// Where an outbox sends its frames (the node's transport; a recorder in
/// tests).
pub(super) trait FrameLink {
    /// Sends one coherence frame to `to`.
    fn send_coherence(&self, to: NodeId, frame: &[u8]) -> Result<(), TransportError>;
}

/// Messages gathered while handling one batch.
pub(super) struct Outbox<'a> {
    link: &'a dyn FrameLink,
    bufs: Vec<Vec<u8>>,
    /// Messages for this node itself, handled before anything is sent.
    pub local: VecDeque<Msg<'static>>,
    /// Direct grants `(requester, page)` waiting to be on the wire; their
    /// pages stay busy at the home until then.
    pub direct: Vec<(NodeId, u64)>,
    /// Prefetched pages installed in this batch.
    pub landed: Vec<u64>,
    failures: Vec<(NodeId, TransportError)>,
}

impl<'a> Outbox<'a> {
    /// An empty outbox for a cluster of `nodes` nodes.
    pub fn new(nodes: usize, link: &'a dyn FrameLink) -> Outbox<'a> {
        Outbox {
            link,
            bufs: (0..nodes).map(|_| Vec::new()).collect(),
            local: VecDeque::new(),
            direct: Vec::new(),
            landed: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Appends `msg` to the frame for `to`; sends the frame once it is
    /// [`FLUSH_AT`] bytes long.
    pub fn emit(&mut self, to: NodeId, msg: &Msg<'_>) {
        let b = &mut self.bufs[usize::from(to)];
        msg.encode(b);
        if b.len() >= FLUSH_AT {
            let buf = std::mem::take(b);
            self.send(to, &buf);
        }
    }

    /// `msg` for node `to`: this node's own queue when `to` is `me`, else
    /// the frame for `to`.
    pub fn route(&mut self, me: NodeId, to: NodeId, msg: Msg<'static>) {
        if to == me {
            self.local.push_back(msg);
        } else {
            self.emit(to, &msg);
        }
    }

    /// Sends the frame gathered for `to`, if any (keeping its buffer).
    pub fn flush_to(&mut self, to: NodeId) {
        let b = &mut self.bufs[usize::from(to)];
        if b.is_empty() {
            return;
        }
        let mut buf = std::mem::take(b);
        self.send(to, &buf);
        buf.clear();
        self.bufs[usize::from(to)] = buf;
    }

    /// Sends every gathered frame.
    pub fn flush_all(&mut self) {
        for to in 0..self.bufs.len() {
            self.flush_to(to as NodeId);
        }
    }

    /// Nothing is left to handle or send.
    pub fn is_idle(&self) -> bool {
        self.direct.is_empty() && self.local.is_empty() && self.bufs.iter().all(Vec::is_empty)
    }

    /// The sends that failed since the last call, with the peer they were
    /// for.
    pub fn take_failures(&mut self) -> Vec<(NodeId, TransportError)> {
        std::mem::take(&mut self.failures)
    }

    fn send(&mut self, to: NodeId, frame: &[u8]) {
        if let Err(e) = self.link.send_coherence(to, frame) {
            self.failures.push((to, e));
        }
    }
}

#[cfg(test)]
pub(super) mod fake {
    //! A link that records every frame, for the node's unit tests.
    use std::sync::Mutex;

    use super::*;
    use crate::coherence::messages::{decode_all, GrantData};
    use crate::coherence::LocalState;

    /// One decoded message as the tests compare it: owned, page data
    /// reduced to its first byte.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Sent {
        Request {
            page: u64,
            write: bool,
        },
        Grant {
            page: u64,
            mode: LocalState,
            data: Option<u8>,
            zero: bool,
            acks: u16,
        },
        GrantRun {
            page: u64,
            count: usize,
            first_byte: u8,
        },
        Fetch {
            page: u64,
            requester: NodeId,
            keep: LocalState,
        },
        Data {
            page: u64,
            first_byte: u8,
        },
        Invalidate {
            page: u64,
            requester: NodeId,
        },
        InvAck {
            page: u64,
        },
        Done {
            page: u64,
        },
    }

    fn owned(m: &Msg<'_>) -> Sent {
        match *m {
            Msg::Request { page, write, .. } => Sent::Request { page, write },
            Msg::Grant {
                page,
                mode,
                data,
                acks,
            } => Sent::Grant {
                page,
                mode,
                data: match data {
                    GrantData::Inline(b) => Some(b[0]),
                    _ => None,
                },
                zero: data == GrantData::Zero,
                acks,
            },
            Msg::GrantRun { page, bytes, .. } => Sent::GrantRun {
                page,
                count: bytes.len() / crate::uffd::PAGE_SIZE,
                first_byte: bytes[0],
            },
            Msg::Fetch {
                page,
                requester,
                keep,
            } => Sent::Fetch {
                page,
                requester,
                keep,
            },
            Msg::Data { page, bytes } => Sent::Data {
                page,
                first_byte: bytes[0],
            },
            Msg::Invalidate { page, requester } => Sent::Invalidate { page, requester },
            Msg::InvAck { page } => Sent::InvAck { page },
            Msg::Done { page } => Sent::Done { page },
        }
    }

    /// Records frames; sends to a node in `down` fail.
    #[derive(Default)]
    pub struct RecordingLink {
        pub frames: Mutex<Vec<(NodeId, Vec<u8>)>>,
        pub down: Vec<NodeId>,
    }

    impl RecordingLink {
        /// Every message sent so far, decoded, with its destination; clears
        /// the record.
        pub fn take(&self) -> Vec<(NodeId, Sent)> {
            let frames = std::mem::take(&mut *self.frames.lock().unwrap());
            frames
                .iter()
                .flat_map(|(to, f)| {
                    decode_all(f)
                        .expect("the node sends well-formed frames")
                        .iter()
                        .map(|m| (*to, owned(m)))
                        .collect::<Vec<_>>()
                })
                .collect()
        }
    }

    impl FrameLink for RecordingLink {
        fn send_coherence(&self, to: NodeId, frame: &[u8]) -> Result<(), TransportError> {
            if self.down.contains(&to) {
                return Err(TransportError::PeerDown(to));
            }
            self.frames.lock().unwrap().push((to, frame.to_vec()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{RecordingLink, Sent};
    use super::*;

    #[test]
    fn messages_to_one_peer_travel_in_one_frame() {
        let link = RecordingLink::default();
        let mut out = Outbox::new(3, &link);
        out.emit(1, &Msg::Done { page: 4 });
        out.emit(2, &Msg::InvAck { page: 5 });
        out.emit(1, &Msg::Done { page: 6 });
        assert!(
            link.frames.lock().unwrap().is_empty(),
            "nothing before the flush"
        );
        assert!(!out.is_idle());
        out.flush_all();
        assert!(out.is_idle());
        assert_eq!(link.frames.lock().unwrap().len(), 2, "one frame per peer");
        assert_eq!(
            link.take(),
            vec![
                (1, Sent::Done { page: 4 }),
                (1, Sent::Done { page: 6 }),
                (2, Sent::InvAck { page: 5 }),
            ]
        );
        out.flush_all();
        assert!(
            link.frames.lock().unwrap().is_empty(),
            "an empty frame is never sent"
        );
    }

    #[test]
    fn a_frame_is_sent_once_it_is_large() {
        let link = RecordingLink::default();
        let mut out = Outbox::new(2, &link);
        let page = [7u8; crate::uffd::PAGE_SIZE];
        let per_frame = FLUSH_AT / page.len() + 1;
        for p in 0..per_frame as u64 {
            out.emit(
                1,
                &Msg::Data {
                    page: p,
                    bytes: &page,
                },
            );
        }
        let frames = link.frames.lock().unwrap().len();
        assert_eq!(frames, 1, "sent at {FLUSH_AT} bytes, before any flush");
    }

    #[test]
    fn failed_sends_are_returned_not_acted_on() {
        let link = RecordingLink {
            down: vec![2],
            ..Default::default()
        };
        let mut out = Outbox::new(3, &link);
        out.emit(2, &Msg::Done { page: 1 });
        out.emit(1, &Msg::Done { page: 2 });
        out.flush_all();
        let failures = out.take_failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, 2);
        assert!(
            out.take_failures().is_empty(),
            "each failure is returned once"
        );
        assert_eq!(link.take(), vec![(1, Sent::Done { page: 2 })]);
    }
}
