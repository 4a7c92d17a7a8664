//! Where an incoming runtime frame goes. The DSM's receive threads decode
//! each frame ([`Dispatcher`]) and never call into QEMU (a vCPU blocked in a
//! fault may hold QEMU's locks): a clock ping is answered at once, a reply
//! wakes its caller, a forwarded access is queued for the origin's
//! executors, and everything else is queued for the `fv-app` thread, which
//! calls [`super::Host`].

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};

use dsm_service::node::AppHandler;
use dsm_service::{DsmNode, NodeId};
use tracing::{debug, warn};

use super::calls::Calls;
use super::clock_sync::answer_ping;
use super::io::IoJob;
use super::vm_state::VmState;
use super::wire::{Message, RUNTIME_CHANNEL};
use super::Runtime;
use crate::clock::ClockReading;

/// A message for the `fv-app` thread and the node that sent it.
pub(super) type AppJob = (NodeId, Message);

/// The thread that handles a decoded message.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// Origin: answer a clock ping on the receive thread, at once.
    AnswerClock(u32),
    /// A reply: wake the call it answers.
    Reply(Message),
    /// Origin: a forwarded access for the executors.
    Execute(IoJob),
    /// Everything else: the `fv-app` thread.
    App(Message),
}

/// Routes message `m` from `from` on node `me`.
fn route(m: Message, from: NodeId, me: NodeId) -> Route {
    match m {
        Message::ClockPing { seq } if me == 0 => Route::AnswerClock(seq),
        m @ (Message::IoReply { .. } | Message::ClockPong { .. }) => Route::Reply(m),
        Message::IoRequest { seq, access, data } if me == 0 => {
            Route::Execute((from, seq, access, data))
        }
        m => Route::App(m),
    }
}

/// The runtime's frame handler on the DSM's receive threads. It holds the
/// parts of the runtime it needs, not the runtime itself (which holds the
/// DSM node, which holds this handler).
pub(super) struct Dispatcher {
    me: NodeId,
    calls: Arc<Calls>,
    state: Arc<Mutex<VmState>>,
    /// The origin's base clock reading, sent with every clock answer.
    base: ClockReading,
    node: Weak<DsmNode>,
    exec: Sender<IoJob>,
    app: Sender<AppJob>,
}

impl Dispatcher {
    /// The dispatcher of `rt`, queueing forwarded accesses on `exec` and
    /// the rest on `app`.
    pub(super) fn new(rt: &Runtime, exec: Sender<IoJob>, app: Sender<AppJob>) -> Dispatcher {
        Dispatcher {
            me: rt.node.id(),
            calls: rt.calls.clone(),
            state: rt.state.clone(),
            base: rt.base,
            node: Arc::downgrade(&rt.node),
            exec,
            app,
        }
    }

    /// As the DSM's handler of application frames.
    pub(super) fn into_handler(self) -> AppHandler {
        Arc::new(move |from, ch, payload: &[u8]| {
            if ch == RUNTIME_CHANNEL {
                self.dispatch(from, payload);
            }
        })
    }

    /// Handles one runtime frame from `from`.
    fn dispatch(&self, from: NodeId, payload: &[u8]) {
        let m = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                warn!(node = self.me, peer = from, error = %e, "dropped runtime frame");
                return;
            }
        };
        match route(m, from, self.me) {
            Route::AnswerClock(seq) => self.answer_clock(from, seq),
            Route::Reply(reply) => {
                self.calls.complete(reply);
            }
            Route::Execute(job) => {
                let _ = self.exec.send(job);
            }
            Route::App(m) => {
                if let Message::Lifecycle(e) = m {
                    if e.ends_vm() {
                        // Before the sender's connection closes: its exit is
                        // no failure.
                        self.state.lock().expect("lock").peer_event(e);
                    }
                }
                let _ = self.app.send((from, m));
            }
        }
    }

    fn answer_clock(&self, from: NodeId, seq: u32) {
        let pong = answer_ping(seq, self.base);
        if let Some(n) = self.node.upgrade() {
            if let Err(e) = n.send_app(from, RUNTIME_CHANNEL, &pong.encode()) {
                debug!(error = %e, peer = from, "clock answer dropped");
            }
        }
    }
}

impl Runtime {
    /// The `fv-app` thread: hands queued messages to QEMU until the queue
    /// closes.
    pub(super) fn app_loop(&self, rx: &Receiver<AppJob>) {
        self.host.thread_start("fv-app");
        while let Ok((from, m)) = rx.recv() {
            match m {
                Message::Irq(irq) => self.host.deliver_irq(&irq),
                Message::Apic(s) => self.host.apic_state(&s),
                Message::IoapicEoi(v) => self.host.ioapic_eoi(v),
                Message::Lifecycle(e) => self.deliver_lifecycle(e, from),
                Message::IoRequest { .. }
                | Message::IoReply { .. }
                | Message::ClockPing { .. }
                | Message::ClockPong { .. } => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::io::{IoAccess, IoSpace};
    use super::super::lifecycle::Lifecycle;
    use super::*;

    fn request() -> Message {
        Message::IoRequest {
            seq: 4,
            access: IoAccess {
                cpu: 1,
                space: IoSpace::Mmio,
                addr: 0xfeb0_0000,
                size: 4,
                count: 1,
                is_write: true,
                attrs: 0,
            },
            data: vec![1, 2, 3, 4],
        }
    }

    #[test]
    fn the_origin_answers_clocks_and_executes_accesses() {
        assert_eq!(
            route(Message::ClockPing { seq: 3 }, 1, 0),
            Route::AnswerClock(3)
        );
        let Route::Execute((from, seq, access, data)) = route(request(), 2, 0) else {
            panic!("not executed");
        };
        assert_eq!((from, seq, access.cpu, data), (2, 4, 1, vec![1, 2, 3, 4]));
    }

    #[test]
    fn replies_wake_their_callers_on_every_node() {
        for me in [0, 1] {
            let reply = Message::IoReply {
                seq: 4,
                result: 0,
                data: vec![],
            };
            assert_eq!(route(reply.clone(), 0, me), Route::Reply(reply));
        }
    }

    #[test]
    fn the_rest_goes_to_the_app_thread() {
        let eoi = Message::IoapicEoi(0x31);
        assert_eq!(route(eoi.clone(), 1, 0), Route::App(eoi));
        let off = Message::Lifecycle(Lifecycle::PowerOff);
        assert_eq!(route(off.clone(), 0, 1), Route::App(off));
        // Requests only the origin serves are not served elsewhere.
        assert_eq!(route(request(), 0, 1), Route::App(request()));
        let ping = Message::ClockPing { seq: 1 };
        assert_eq!(route(ping.clone(), 0, 1), Route::App(ping));
    }
}
