//! The coherence protocol: messages, the home's directory and its decisions.
//! `PROTOCOL.md` beside this file is the specification; the names here are
//! the names used there.
//!
//! This module is pure (no I/O, no userfaultfd): [`decide`] is the whole of
//! the home's logic and is unit-tested here and model-checked in
//! `tests/model_check.rs`. The engine that runs it is [`crate::node`].

pub mod messages;

use crate::NodeId;

/// A page's state at one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LocalState {
    /// Not mapped.
    Invalid = 0,
    /// Mapped read-only.
    Shared = 1,
    /// Mapped writable; the only copy.
    Exclusive = 2,
}

impl LocalState {
    /// From the byte stored in the page table of states.
    pub fn from_u8(v: u8) -> LocalState {
        match v {
            1 => LocalState::Shared,
            2 => LocalState::Exclusive,
            _ => LocalState::Invalid,
        }
    }
}

/// What a requester wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read (or a prefetch).
    Read,
    /// A write.
    Write,
}

/// Where the data of a grant comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataSource {
    /// The requester already has it.
    None,
    /// An unowned page: zeros.
    Zero,
    /// This node holds it.
    Node(NodeId),
}

/// A set of nodes as a bit mask.
pub type NodeSet = u64;

/// The bit of a node.
pub fn bit(n: NodeId) -> NodeSet {
    1u64 << n
}

/// The home's record of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirState {
    /// The Exclusive holder.
    pub owner: Option<NodeId>,
    /// Shared holders (empty when `owner` is set).
    pub sharers: NodeSet,
}

/// What the home does for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Mode granted.
    pub mode: LocalState,
    /// Where the data comes from.
    pub data: DataSource,
    /// What the supplier keeps (`Shared` or `Invalid`); meaningless without a supplier.
    pub supplier_keeps: LocalState,
    /// Nodes that must drop their Shared copy.
    pub invalidate: NodeSet,
}

/// The home's decision for a request by `r` (PROTOCOL.md, "The home's
/// decision"). Updates `dir` to the state after the transaction.
pub fn decide(dir: &mut DirState, home: NodeId, r: NodeId, access: Access) -> Plan {
    let rb = bit(r);
    let pick = |s: NodeSet| -> NodeId {
        if s & bit(home) != 0 {
            home
        } else {
            s.trailing_zeros() as NodeId
        }
    };
    match (access, dir.owner) {
        (_, Some(o)) if o == r => Plan {
            mode: LocalState::Exclusive,
            data: DataSource::None,
            supplier_keeps: LocalState::Invalid,
            invalidate: 0,
        },
        (Access::Read, Some(o)) => {
            *dir = DirState {
                owner: None,
                sharers: bit(o) | rb,
            };
            Plan {
                mode: LocalState::Shared,
                data: DataSource::Node(o),
                supplier_keeps: LocalState::Shared,
                invalidate: 0,
            }
        }
        (Access::Write, Some(o)) => {
            *dir = DirState {
                owner: Some(r),
                sharers: 0,
            };
            Plan {
                mode: LocalState::Exclusive,
                data: DataSource::Node(o),
                supplier_keeps: LocalState::Invalid,
                invalidate: 0,
            }
        }
        (_, None) if dir.sharers == 0 => {
            *dir = DirState {
                owner: Some(r),
                sharers: 0,
            };
            Plan {
                mode: LocalState::Exclusive,
                data: DataSource::Zero,
                supplier_keeps: LocalState::Invalid,
                invalidate: 0,
            }
        }
        (Access::Read, None) if dir.sharers & rb != 0 => Plan {
            mode: LocalState::Shared,
            data: DataSource::None,
            supplier_keeps: LocalState::Shared,
            invalidate: 0,
        },
        (Access::Read, None) => {
            let s = pick(dir.sharers);
            dir.sharers |= rb;
            Plan {
                mode: LocalState::Shared,
                data: DataSource::Node(s),
                supplier_keeps: LocalState::Shared,
                invalidate: 0,
            }
        }
        (Access::Write, None) => {
            let others = dir.sharers & !rb;
            let plan = if dir.sharers & rb != 0 {
                Plan {
                    mode: LocalState::Exclusive,
                    data: DataSource::None,
                    supplier_keeps: LocalState::Invalid,
                    invalidate: others,
                }
            } else {
                let s = pick(others);
                Plan {
                    mode: LocalState::Exclusive,
                    data: DataSource::Node(s),
                    supplier_keeps: LocalState::Invalid,
                    invalidate: others & !bit(s),
                }
            };
            *dir = DirState {
                owner: Some(r),
                sharers: 0,
            };
            plan
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: NodeId = 0;

    fn excl(o: NodeId) -> DirState {
        DirState {
            owner: Some(o),
            sharers: 0,
        }
    }

    #[test]
    fn read_of_exclusive_page_downgrades_owner_and_adds_reader() {
        let mut d = excl(2);
        let p = decide(&mut d, H, 1, Access::Read);
        assert_eq!(p.mode, LocalState::Shared);
        assert_eq!(p.data, DataSource::Node(2));
        assert_eq!(p.supplier_keeps, LocalState::Shared);
        assert_eq!(
            d,
            DirState {
                owner: None,
                sharers: bit(1) | bit(2)
            }
        );
    }

    #[test]
    fn write_of_exclusive_page_moves_ownership() {
        let mut d = excl(2);
        let p = decide(&mut d, H, 1, Access::Write);
        assert_eq!(
            (p.mode, p.data, p.supplier_keeps),
            (
                LocalState::Exclusive,
                DataSource::Node(2),
                LocalState::Invalid
            )
        );
        assert_eq!(d, excl(1));
    }

    #[test]
    fn upgrade_invalidates_every_other_sharer_and_needs_no_data() {
        let mut d = DirState {
            owner: None,
            sharers: 0b1111,
        };
        let p = decide(&mut d, H, 2, Access::Write);
        assert_eq!(p.data, DataSource::None);
        assert_eq!(p.invalidate, 0b1011);
        assert_eq!(d, excl(2));
    }

    #[test]
    fn write_by_non_sharer_takes_data_from_home_first() {
        let mut d = DirState {
            owner: None,
            sharers: bit(0) | bit(2),
        };
        let p = decide(&mut d, H, 1, Access::Write);
        assert_eq!(p.data, DataSource::Node(0));
        assert_eq!(p.invalidate, bit(2));
        let mut d = DirState {
            owner: None,
            sharers: bit(3) | bit(2),
        };
        let p = decide(&mut d, H, 1, Access::Write);
        assert_eq!(p.data, DataSource::Node(2));
        assert_eq!(p.invalidate, bit(3));
    }

    #[test]
    fn unowned_page_is_granted_exclusive_zero() {
        for a in [Access::Read, Access::Write] {
            let mut d = DirState::default();
            let p = decide(&mut d, H, 3, a);
            assert_eq!((p.mode, p.data), (LocalState::Exclusive, DataSource::Zero));
            assert_eq!(d, excl(3));
        }
    }

    #[test]
    fn duplicate_requests_change_nothing() {
        let mut d = excl(1);
        let p = decide(&mut d, H, 1, Access::Read);
        assert_eq!((p.mode, p.data), (LocalState::Exclusive, DataSource::None));
        assert_eq!(d, excl(1));
        let mut d = DirState {
            owner: None,
            sharers: bit(1) | bit(2),
        };
        let p = decide(&mut d, H, 1, Access::Read);
        assert_eq!((p.mode, p.data), (LocalState::Shared, DataSource::None));
        assert_eq!(d.sharers, bit(1) | bit(2));
    }
}
