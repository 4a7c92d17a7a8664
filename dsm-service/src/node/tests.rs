//! The node's roles driven message by message: one real [`NodeCore`] over
//! real userfaultfd-registered memory, its peers played by the test through
//! a recording link. Every frame the node sends is decoded and compared.
//!
//! The tests touch a page's memory only once the node holds it: a touch of
//! a page the node does not hold would wait for a fault thread that these
//! tests do not run.

use std::time::Instant;

use super::outbox::fake::{RecordingLink, Sent};
use super::outbox::Outbox;
use super::*;
use crate::coherence::messages::{GrantData, Msg};
use crate::uffd::{Fault, PAGE_SIZE};

/// One node under test and the memory it manages.
struct Fixture {
    core: NodeCore,
    base: u64,
    link: RecordingLink,
    /// Unmapped when the fixture drops, after the node (fields drop in
    /// order) and with it its userfaultfd.
    _map: memmap2::MmapMut,
}

impl Fixture {
    /// Node `me` of `nodes`, every page homed on node 0, `pages` pages; the
    /// origin (node 0) starts holding the pages of `written`, filled with
    /// their byte.
    fn new(me: NodeId, nodes: usize, pages: u64, written: &[(u64, u8)]) -> Fixture {
        Self::with(me, nodes, pages, written, RecordingLink::default())
    }

    fn with(
        me: NodeId,
        nodes: usize,
        pages: u64,
        written: &[(u64, u8)],
        link: RecordingLink,
    ) -> Fixture {
        let len = pages as usize * PAGE_SIZE;
        let mut map = memmap2::MmapMut::map_anon(len).expect("mmap");
        for &(page, byte) in written {
            let at = page as usize * PAGE_SIZE;
            map[at..at + PAGE_SIZE].fill(byte);
        }
        let base = map.as_mut_ptr() as u64;
        let mut space = AddressSpace::default();
        space.add("ram", base, len as u64).unwrap();
        let (uffd, touched) = register(&space, me == 0).expect("userfaultfd (run as root)");
        let opts = DsmOptions {
            prefetch_max: 0,
            ..DsmOptions::default()
        };
        let core = NodeCore::new(me, nodes, space, uffd, opts);
        if me == 0 {
            core.apply_touched(&pages::runs(&touched), true);
        }
        Fixture {
            core,
            base,
            link,
            _map: map,
        }
    }

    /// `msgs` arrive from `from` as one frame; returns what the node sent.
    fn recv(&self, from: NodeId, msgs: &[Msg<'_>]) -> Result<Vec<(NodeId, Sent)>, String> {
        let mut frame = Vec::new();
        for m in msgs {
            m.encode(&mut frame);
        }
        let mut out = Outbox::new(self.core.nodes, &self.link);
        let r = self.core.on_coherence_frame(from, &frame, &mut out);
        self.core.flush(&mut out);
        r.map(|()| self.link.take())
    }

    /// A fault on `page` by a thread of this node; returns what was sent.
    fn fault(&self, page: u64, write: bool) -> Vec<(NodeId, Sent)> {
        let f = Fault {
            addr: self.core.space.addr_of(page),
            write,
            wp: false,
        };
        let mut out = Outbox::new(self.core.nodes, &self.link);
        self.core.on_fault(f, Instant::now(), &mut out);
        self.core.flush(&mut out);
        self.link.take()
    }

    fn state(&self, page: u64) -> LocalState {
        self.core.pages.state(page)
    }

    /// The first byte of a page this node holds.
    fn byte(&self, page: u64) -> u8 {
        assert_ne!(self.state(page), LocalState::Invalid, "would block");
        // SAFETY: the page is held, so present.
        unsafe { *((self.base as usize + page as usize * PAGE_SIZE) as *const u8) }
    }
}

fn read(page: u64) -> Msg<'static> {
    Msg::Request {
        page,
        write: false,
        prefetch: false,
    }
}

fn write(page: u64) -> Msg<'static> {
    Msg::Request {
        page,
        write: true,
        prefetch: false,
    }
}

fn grant_msg(page: u64, mode: LocalState, data: GrantData<'_>, acks: u16) -> Msg<'_> {
    Msg::Grant {
        page,
        mode,
        data,
        acks,
    }
}

fn grant(page: u64, mode: LocalState, data: Option<u8>, zero: bool, acks: u16) -> Sent {
    Sent::Grant {
        page,
        mode,
        data,
        zero,
        acks,
    }
}

// ----- the home (directory carried out, supplying its own copy) ----------

#[test]
fn the_home_serves_a_read_from_its_own_copy_inline() {
    let f = Fixture::new(0, 2, 8, &[(3, 0xab)]);
    assert_eq!(f.state(3), LocalState::Exclusive);
    let sent = f.recv(1, &[read(3)]).unwrap();
    assert_eq!(
        sent,
        vec![(1, grant(3, LocalState::Shared, Some(0xab), false, 0))]
    );
    assert_eq!(
        f.state(3),
        LocalState::Shared,
        "the home keeps a read-only copy"
    );
    assert_eq!(f.byte(3), 0xab);
    // The grant was direct: the page is free again without a Done, and the
    // reader's upgrade drops the home's copy and sends no data.
    let sent = f.recv(1, &[write(3)]).unwrap();
    assert_eq!(
        sent,
        vec![(1, grant(3, LocalState::Exclusive, None, false, 0))]
    );
    assert_eq!(f.state(3), LocalState::Invalid);
}

#[test]
fn an_unowned_page_is_granted_as_zeros_with_no_data() {
    let f = Fixture::new(0, 2, 8, &[]);
    let sent = f.recv(1, &[write(6)]).unwrap();
    assert_eq!(
        sent,
        vec![(1, grant(6, LocalState::Exclusive, None, true, 0))]
    );
    assert_eq!(f.state(6), LocalState::Invalid, "the home never held it");
}

#[test]
fn a_first_touch_at_home_takes_the_unowned_pages_of_its_block() {
    // Page 3 is the origin's; the rest of block 0..16 and all of 16..32
    // are unowned, every page homed here.
    let f = Fixture::new(0, 2, 32, &[(3, 0x33)]);
    let sent = f.fault(5, false);
    assert!(sent.is_empty(), "a zero run needs no message: {sent:?}");
    for page in 0..32 {
        let want = if (3..16).contains(&page) {
            LocalState::Exclusive
        } else {
            LocalState::Invalid
        };
        assert_eq!(f.state(page), want, "page {page}");
    }
    assert_eq!(f.byte(3), 0x33, "the origin's page is untouched");
    assert_eq!((f.byte(4), f.byte(10), f.byte(15)), (0, 0, 0));
    assert_eq!(f.core.stats.snapshot().prefetched, 11, "4 and 6..=15");
    assert_eq!(f.core.stats.snapshot().faults(), 1);
    // A page of the run is the home's like any other: a remote reader gets
    // its data, and the run never reached the next block.
    let sent = f.recv(1, &[read(10)]).unwrap();
    assert_eq!(
        sent,
        vec![(1, grant(10, LocalState::Shared, Some(0), false, 0))]
    );
    let sent = f.recv(1, &[write(16)]).unwrap();
    assert_eq!(
        sent,
        vec![(1, grant(16, LocalState::Exclusive, None, true, 0))]
    );
}

#[test]
fn a_zero_run_stops_at_a_page_held_elsewhere() {
    let f = Fixture::new(0, 2, 16, &[]);
    // Node 1 owns pages 2 and 9.
    f.recv(1, &[write(2)]).unwrap();
    f.recv(1, &[write(9)]).unwrap();
    assert!(f.fault(7, true).is_empty());
    for (page, want) in [
        (1, LocalState::Invalid),
        (2, LocalState::Invalid),
        (3, LocalState::Exclusive),
        (7, LocalState::Exclusive),
        (8, LocalState::Exclusive),
        (9, LocalState::Invalid),
        (10, LocalState::Invalid),
    ] {
        assert_eq!(f.state(page), want, "page {page}");
    }
    // Node 1's pages are still its own: a read of 9 is fetched from it.
    let sent = f.recv(1, &[read(9)]).unwrap();
    assert_eq!(
        sent,
        vec![(1, grant(9, LocalState::Exclusive, None, false, 0))],
        "node 1 is the owner: a duplicate request keeps its mode"
    );
}

#[test]
fn a_write_invalidates_the_sharers_and_queues_the_next_request() {
    let f = Fixture::new(0, 3, 8, &[(5, 0x11)]);
    f.recv(1, &[read(5)]).unwrap();
    f.recv(2, &[read(5)]).unwrap();
    // Node 1 writes: it has the data; the home drops its own copy and node
    // 2 is told to, acknowledging to node 1.
    let sent = f.recv(1, &[write(5)]).unwrap();
    assert_eq!(
        sent,
        vec![
            (1, grant(5, LocalState::Exclusive, None, false, 1)),
            (
                2,
                Sent::Invalidate {
                    page: 5,
                    requester: 1
                }
            ),
        ]
    );
    assert_eq!(f.state(5), LocalState::Invalid);
    // The page is busy until node 1's Done: node 2's read waits.
    assert_eq!(f.recv(2, &[read(5)]).unwrap(), vec![]);
    let sent = f.recv(1, &[Msg::Done { page: 5 }]).unwrap();
    assert_eq!(
        sent,
        vec![
            (
                1,
                Sent::Fetch {
                    page: 5,
                    requester: 2,
                    keep: LocalState::Shared
                }
            ),
            (
                2,
                Sent::Grant {
                    page: 5,
                    mode: LocalState::Shared,
                    data: None,
                    zero: false,
                    acks: 1
                }
            ),
        ]
    );
    let e = f.recv(2, &[Msg::Done { page: 4 }]).unwrap_err();
    assert_eq!(
        e,
        "done for page 4 from node 2, which has no transaction on it"
    );
}

#[test]
fn a_run_of_reads_is_served_as_one_grant_run() {
    let written: Vec<(u64, u8)> = (0..8).map(|p| (p, 0x40 + p as u8)).collect();
    let f = Fixture::new(0, 2, 8, &written);
    let reads: Vec<Msg<'_>> = (2..7).map(read).collect();
    let sent = f.recv(1, &reads).unwrap();
    assert_eq!(
        sent,
        vec![(
            1,
            Sent::GrantRun {
                page: 2,
                count: 5,
                first_byte: 0x42
            }
        )]
    );
    for p in 2..7 {
        assert_eq!(f.state(p), LocalState::Shared);
    }
    assert_eq!(f.state(7), LocalState::Exclusive);
    // Each page's transaction ended with the run on the wire.
    let sent = f.recv(1, &[write(4)]).unwrap();
    assert_eq!(
        sent,
        vec![(1, grant(4, LocalState::Exclusive, None, false, 0))]
    );
}

#[test]
fn a_failed_send_declares_the_peer_down_by_name() {
    let link = RecordingLink {
        down: vec![1],
        ..Default::default()
    };
    let f = Fixture::with(0, 2, 8, &[(1, 7)], link);
    let events = f.core.events_rx.lock().unwrap().take().unwrap();
    f.recv(1, &[read(1)]).unwrap();
    match events.try_recv() {
        Ok(DsmEvent::PeerFailed { node: 1, reason }) => {
            assert!(reason.contains("node 1 is not connected"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(f.core.peers.check().is_err());
}

// ----- the requester -------------------------------------------------------

#[test]
fn a_fault_asks_the_home_and_a_zero_grant_installs_zeros() {
    let f = Fixture::new(1, 2, 8, &[]);
    assert_eq!(
        f.fault(2, true),
        vec![(
            0,
            Sent::Request {
                page: 2,
                write: true
            }
        )]
    );
    assert_eq!(f.fault(2, true), vec![], "a second fault joins the request");
    let sent = f
        .recv(
            0,
            &[grant_msg(2, LocalState::Exclusive, GrantData::Zero, 0)],
        )
        .unwrap();
    assert_eq!(sent, vec![], "a direct grant needs no Done");
    assert_eq!(f.state(2), LocalState::Exclusive);
    assert_eq!(f.byte(2), 0);
    assert_eq!(f.fault(2, true), vec![], "a duplicate fault is only woken");
}

#[test]
fn data_from_the_supplier_completes_the_grant_and_the_home_is_told() {
    let f = Fixture::new(1, 3, 8, &[]);
    f.fault(4, false);
    let g = grant_msg(4, LocalState::Shared, GrantData::FromSupplier, 1);
    assert_eq!(f.recv(0, &[g]).unwrap(), vec![]);
    assert_eq!(f.state(4), LocalState::Invalid, "waits for the data");
    let bytes = [0x5au8; PAGE_SIZE];
    let sent = f
        .recv(
            2,
            &[Msg::Data {
                page: 4,
                bytes: &bytes,
            }],
        )
        .unwrap();
    assert_eq!(sent, vec![(0, Sent::Done { page: 4 })]);
    assert_eq!(f.state(4), LocalState::Shared);
    assert_eq!(f.byte(4), 0x5a);
}

#[test]
fn a_write_during_a_read_request_asks_for_an_upgrade() {
    let f = Fixture::new(1, 2, 8, &[]);
    f.fault(1, false);
    assert_eq!(f.fault(1, true), vec![], "joins the read in flight");
    let bytes = [9u8; PAGE_SIZE];
    let g = grant_msg(1, LocalState::Shared, GrantData::Inline(&bytes), 0);
    let sent = f.recv(0, &[g]).unwrap();
    assert_eq!(
        sent,
        vec![(
            0,
            Sent::Request {
                page: 1,
                write: true
            }
        )]
    );
    assert_eq!(f.state(1), LocalState::Shared);
    let up = grant_msg(1, LocalState::Exclusive, GrantData::None, 0);
    assert_eq!(f.recv(0, &[up]).unwrap(), vec![]);
    assert_eq!(f.state(1), LocalState::Exclusive);
    assert_eq!(f.byte(1), 9);
}

#[test]
fn a_run_of_direct_grants_is_installed_at_once() {
    let f = Fixture::new(1, 2, 8, &[]);
    for p in 3..7 {
        f.fault(p, false);
    }
    let pages: Vec<[u8; PAGE_SIZE]> = (0..4).map(|k| [0x70 + k as u8; PAGE_SIZE]).collect();
    let grants: Vec<Msg<'_>> = pages
        .iter()
        .enumerate()
        .map(|(k, b)| grant_msg(3 + k as u64, LocalState::Shared, GrantData::Inline(b), 0))
        .collect();
    assert_eq!(f.recv(0, &grants).unwrap(), vec![]);
    for k in 0..4u64 {
        assert_eq!(f.state(3 + k), LocalState::Shared);
        assert_eq!(f.byte(3 + k), 0x70 + k as u8);
    }
    assert_eq!(f.core.stats.snapshot().pages_received, 4);
}

#[test]
fn impossible_grants_are_refused_by_name() {
    let f = Fixture::new(1, 3, 8, &[]);
    let zero = |page| grant_msg(page, LocalState::Exclusive, GrantData::Zero, 0);
    assert_eq!(
        f.recv(0, &[zero(2)]).unwrap_err(),
        "grant for page 2, which this node did not request"
    );
    f.fault(2, true);
    assert_eq!(
        f.recv(2, &[zero(2)]).unwrap_err(),
        "grant for page 2 from node 2, which is not its home"
    );
    assert_eq!(
        f.recv(0, &[zero(99)]).unwrap_err(),
        "page 99 is outside the 8 registered pages"
    );
    let promise = grant_msg(2, LocalState::Exclusive, GrantData::FromSupplier, 0);
    assert_eq!(
        f.recv(0, &[promise]).unwrap_err(),
        "grant for page 2 promises data that never came"
    );
    assert_eq!(
        f.recv(0, &[zero(2)]).unwrap_err(),
        "second grant for page 2"
    );
    assert_eq!(f.state(2), LocalState::Invalid, "nothing was installed");
}

// ----- the supplier and sharer -----------------------------------------------

#[test]
fn a_fetch_sends_the_data_and_keeps_what_the_home_says() {
    let f = Fixture::new(1, 3, 8, &[]);
    f.fault(0, true);
    f.recv(
        0,
        &[grant_msg(0, LocalState::Exclusive, GrantData::Zero, 0)],
    )
    .unwrap();
    assert_eq!(f.byte(0), 0);
    assert_eq!(f.state(0), LocalState::Exclusive);
    // SAFETY: page 0 is held Exclusive (asserted above): present, writable.
    unsafe { *(f.base as *mut u8) = 0x99 };
    let fetch = |keep| Msg::Fetch {
        page: 0,
        requester: 2,
        keep,
    };
    let data_to_2 = vec![(
        2,
        Sent::Data {
            page: 0,
            first_byte: 0x99,
        },
    )];
    assert_eq!(f.recv(0, &[fetch(LocalState::Shared)]).unwrap(), data_to_2);
    assert_eq!(f.state(0), LocalState::Shared, "downgraded, still readable");
    assert_eq!(f.byte(0), 0x99);
    assert_eq!(f.recv(0, &[fetch(LocalState::Invalid)]).unwrap(), data_to_2);
    assert_eq!(f.state(0), LocalState::Invalid);
    assert_eq!(
        f.recv(0, &[fetch(LocalState::Invalid)]).unwrap_err(),
        "asked to supply page 0, which this node does not hold"
    );
    let own = Msg::Fetch {
        page: 0,
        requester: 1,
        keep: LocalState::Invalid,
    };
    assert_eq!(
        f.recv(0, &[own]).unwrap_err(),
        "fetch of page 0 for this very node"
    );
    let stranger = Msg::Fetch {
        page: 0,
        requester: 7,
        keep: LocalState::Invalid,
    };
    assert_eq!(
        f.recv(0, &[stranger]).unwrap_err(),
        "requester 7 is not in the cluster"
    );
}

#[test]
fn an_invalidation_drops_the_copy_and_acknowledges_to_the_requester() {
    let f = Fixture::new(1, 3, 8, &[]);
    f.fault(5, false);
    let bytes = [3u8; PAGE_SIZE];
    f.recv(
        0,
        &[grant_msg(
            5,
            LocalState::Shared,
            GrantData::Inline(&bytes),
            0,
        )],
    )
    .unwrap();
    let sent = f
        .recv(
            0,
            &[Msg::Invalidate {
                page: 5,
                requester: 2,
            }],
        )
        .unwrap();
    assert_eq!(sent, vec![(2, Sent::InvAck { page: 5 })]);
    assert_eq!(f.state(5), LocalState::Invalid);
    assert_eq!(f.core.stats.snapshot().invalidations_received, 1);
}
