//! Numbered calls to another node: the caller numbers a request, sends it
//! and blocks until the reply with the same number arrives or the call
//! fails (the callee died, the runtime stops). `IoRequest`/`IoReply` and
//! `ClockPing`/`ClockPong` are calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use dsm_service::NodeId;

use super::wire::{Message, RUNTIME_CHANNEL};
use super::{Runtime, RuntimeError};

/// A call to another node waiting for its reply.
#[derive(Debug)]
enum Slot {
    Waiting,
    Done(Message),
    Failed(RuntimeError),
}

/// The calls of one node that wait for their replies, by number.
#[derive(Debug)]
pub(super) struct Calls {
    slots: Mutex<HashMap<u32, Slot>>,
    cv: Condvar,
    next_seq: AtomicU32,
}

impl Default for Calls {
    fn default() -> Self {
        Calls {
            slots: Mutex::default(),
            cv: Condvar::new(),
            next_seq: AtomicU32::new(1),
        }
    }
}

impl Calls {
    fn slots(&self) -> MutexGuard<'_, HashMap<u32, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers a new call and opens its slot, before its request is sent.
    pub(super) fn open(&self) -> u32 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.slots().insert(seq, Slot::Waiting);
        seq
    }

    /// Closes the slot of a call whose request could not be sent.
    pub(super) fn cancel(&self, seq: u32) {
        self.slots().remove(&seq);
    }

    /// Hands `reply` to the call it answers (by [`Message::reply_seq`]) and
    /// wakes the callers. A reply to no open call is dropped; returns
    /// whether it was taken.
    pub(super) fn complete(&self, reply: Message) -> bool {
        let Some(seq) = reply.reply_seq() else {
            return false;
        };
        let mut slots = self.slots();
        let Some(slot) = slots.get_mut(&seq) else {
            return false;
        };
        *slot = Slot::Done(reply);
        self.cv.notify_all();
        true
    }

    /// Fails every call still waiting with `err()`.
    pub(super) fn fail_waiting(&self, err: impl Fn() -> RuntimeError) {
        let mut slots = self.slots();
        for s in slots.values_mut() {
            if matches!(s, Slot::Waiting) {
                *s = Slot::Failed(err());
            }
        }
        self.cv.notify_all();
    }

    /// Blocks until call `seq` has its reply or fails; closes its slot.
    pub(super) fn wait(&self, seq: u32) -> Result<Message, RuntimeError> {
        let mut slots = self.slots();
        loop {
            match slots.remove(&seq) {
                Some(Slot::Waiting) | None => {
                    slots.insert(seq, Slot::Waiting);
                    slots = self.cv.wait(slots).unwrap_or_else(|e| e.into_inner());
                }
                Some(Slot::Done(reply)) => return Ok(reply),
                Some(Slot::Failed(e)) => return Err(e),
            }
        }
    }
}

impl Runtime {
    /// Sends the request `request(seq)` (numbered by this node) to `to` and
    /// waits for the reply with the same number, or for `to`'s failure.
    pub(super) fn call(
        &self,
        to: NodeId,
        request: impl FnOnce(u32) -> Message,
    ) -> Result<Message, RuntimeError> {
        if self.is_stopping() {
            return Err(RuntimeError::Stopping);
        }
        let seq = self.calls.open();
        let msg = request(seq);
        if let Err(e) = self.node.send_app(to, RUNTIME_CHANNEL, &msg.encode()) {
            self.calls.cancel(seq);
            return Err(RuntimeError::NodeFailed {
                node: to,
                reason: e.to_string(),
            });
        }
        self.calls.wait(seq)
    }

    /// Fails every forwarded call still waiting with `err()`.
    pub(super) fn fail_calls(&self, err: impl Fn() -> RuntimeError) {
        self.calls.fail_waiting(err);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn pong(seq: u32) -> Message {
        Message::IoReply {
            seq,
            result: 7,
            data: vec![seq as u8],
        }
    }

    #[test]
    fn calls_are_numbered_from_one_upwards() {
        let calls = Calls::default();
        assert_eq!((calls.open(), calls.open(), calls.open()), (1, 2, 3));
    }

    #[test]
    fn a_reply_reaches_the_call_with_its_number() {
        let calls = Calls::default();
        let a = calls.open();
        let b = calls.open();
        assert!(calls.complete(pong(b)));
        assert!(calls.complete(pong(a)));
        assert_eq!(calls.wait(a).unwrap(), pong(a));
        assert_eq!(calls.wait(b).unwrap(), pong(b));
    }

    #[test]
    fn a_reply_to_no_open_call_is_dropped() {
        let calls = Calls::default();
        assert!(!calls.complete(pong(42)));
        assert!(!calls.complete(Message::IoapicEoi(1)), "not a reply");
        let seq = calls.open();
        calls.cancel(seq);
        assert!(!calls.complete(pong(seq)), "a cancelled call");
    }

    #[test]
    fn a_waiting_caller_wakes_on_its_reply() {
        let calls = Arc::new(Calls::default());
        let seq = calls.open();
        let waiter = {
            let calls = calls.clone();
            std::thread::spawn(move || calls.wait(seq))
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!calls.complete(Message::ClockPing { seq: 0 }));
        assert!(calls.complete(pong(seq)));
        assert_eq!(waiter.join().unwrap().unwrap(), pong(seq));
    }

    #[test]
    fn failing_outstanding_calls_fails_only_those_waiting() {
        let calls = Arc::new(Calls::default());
        let answered = calls.open();
        let waiting = calls.open();
        assert!(calls.complete(pong(answered)));
        let waiter = {
            let calls = calls.clone();
            std::thread::spawn(move || calls.wait(waiting))
        };
        std::thread::sleep(Duration::from_millis(20));
        calls.fail_waiting(|| RuntimeError::NodeFailed {
            node: 0,
            reason: "gone".into(),
        });
        let err = waiter.join().unwrap().unwrap_err();
        assert_eq!(err.to_string(), "node 0 failed: gone");
        assert_eq!(calls.wait(answered).unwrap(), pong(answered));
        // A call opened after the failure waits for its own reply.
        let later = calls.open();
        calls.complete(pong(later));
        assert_eq!(calls.wait(later).unwrap(), pong(later));
    }

    #[test]
    fn a_reply_after_the_failure_still_answers_the_call() {
        let calls = Calls::default();
        let seq = calls.open();
        calls.fail_waiting(|| RuntimeError::Stopping);
        assert!(calls.complete(pong(seq)));
        assert_eq!(calls.wait(seq).unwrap(), pong(seq));
    }
}
