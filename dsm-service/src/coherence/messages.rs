//! Wire form of the coherence messages (channel `COHERENCE`).
//!
//! A frame is a sequence of messages, each `tag: u8, page: u64 LE` followed by
//! the tag's fields (little endian):
//!
//! | tag | message | fields |
//! |---|---|---|
//! | 1 | Request | access: u8 (0 read, 1 write, 2 prefetch) |
//! | 2 | Grant | mode: u8 (1 shared, 2 exclusive), data: u8 (0 none, 1 zero, 2 inline, 3 from supplier), acks: u16, [4096 bytes if inline] |
//! | 3 | Fetch | requester: u16, keep: u8 (0 invalid, 1 shared) |
//! | 4 | Data | 4096 bytes |
//! | 5 | Invalidate | requester: u16 |
//! | 6 | InvAck | — |
//! | 7 | Done | — |
//! | 8 | GrantRun | mode: u8, count: u16, count × 4096 bytes — direct grants (acks 0) with data for pages `page..page+count` |
//!
//! A message that is cut short, has an unknown tag or a field out of range
//! makes the whole frame malformed; the sender is then treated as faulty.

use crate::uffd::PAGE_SIZE;
use crate::NodeId;

use super::LocalState;

/// How a grant delivers its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantData<'a> {
    /// None: the requester has it.
    None,
    /// An unowned page: zeros.
    Zero,
    /// The data is in the grant.
    Inline(&'a [u8]),
    /// A `Data` message from the supplier brings it.
    FromSupplier,
}

/// One coherence message; page data is borrowed from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg<'a> {
    /// Requester → home.
    Request {
        /// Page.
        page: u64,
        /// Write access wanted.
        write: bool,
        /// Speculative (prefetch), no thread waits.
        prefetch: bool,
    },
    /// Home → requester.
    Grant {
        /// Page.
        page: u64,
        /// Mode granted.
        mode: LocalState,
        /// The data.
        data: GrantData<'a>,
        /// Further `Data`/`InvAck` messages to wait for.
        acks: u16,
    },
    /// Home → supplier.
    Fetch {
        /// Page.
        page: u64,
        /// Who gets the data.
        requester: NodeId,
        /// What the supplier keeps.
        keep: LocalState,
    },
    /// Supplier → requester.
    Data {
        /// Page.
        page: u64,
        /// Contents.
        bytes: &'a [u8],
    },
    /// Home → sharer.
    Invalidate {
        /// Page.
        page: u64,
        /// Who waits for the ack.
        requester: NodeId,
    },
    /// Sharer → requester.
    InvAck {
        /// Page.
        page: u64,
    },
    /// Requester → home.
    Done {
        /// Page.
        page: u64,
    },
    /// Home → requester: direct grants with data for consecutive pages
    /// (`bytes` holds `count` pages back to back), as one message so the
    /// requester installs them with one copy.
    GrantRun {
        /// First page.
        page: u64,
        /// Mode granted for every page.
        mode: LocalState,
        /// Contents of the pages.
        bytes: &'a [u8],
    },
}

/// A malformed coherence frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed coherence message at byte {offset}: {what}")]
pub struct DecodeError {
    /// Where.
    pub offset: usize,
    /// What is wrong.
    pub what: String,
}

impl Msg<'_> {
    /// Page the message is about.
    pub fn page(&self) -> u64 {
        match *self {
            Msg::Request { page, .. }
            | Msg::Grant { page, .. }
            | Msg::Fetch { page, .. }
            | Msg::Data { page, .. }
            | Msg::Invalidate { page, .. }
            | Msg::InvAck { page }
            | Msg::Done { page }
            | Msg::GrantRun { page, .. } => page,
        }
    }

    /// Appends the wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (tag, page) = match *self {
            Msg::Request { page, .. } => (1, page),
            Msg::Grant { page, .. } => (2, page),
            Msg::Fetch { page, .. } => (3, page),
            Msg::Data { page, .. } => (4, page),
            Msg::Invalidate { page, .. } => (5, page),
            Msg::InvAck { page } => (6, page),
            Msg::Done { page } => (7, page),
            Msg::GrantRun { page, .. } => (8, page),
        };
        out.push(tag);
        out.extend_from_slice(&page.to_le_bytes());
        match *self {
            Msg::Request {
                write, prefetch, ..
            } => out.push(if write {
                1
            } else if prefetch {
                2
            } else {
                0
            }),
            Msg::Grant {
                mode, data, acks, ..
            } => {
                out.push(mode as u8);
                out.push(match data {
                    GrantData::None => 0,
                    GrantData::Zero => 1,
                    GrantData::Inline(_) => 2,
                    GrantData::FromSupplier => 3,
                });
                out.extend_from_slice(&acks.to_le_bytes());
                if let GrantData::Inline(b) = data {
                    out.extend_from_slice(b);
                }
            }
            Msg::Fetch {
                requester, keep, ..
            } => {
                out.extend_from_slice(&requester.to_le_bytes());
                out.push(keep as u8);
            }
            Msg::Data { bytes, .. } => out.extend_from_slice(bytes),
            Msg::Invalidate { requester, .. } => out.extend_from_slice(&requester.to_le_bytes()),
            Msg::InvAck { .. } | Msg::Done { .. } => {}
            Msg::GrantRun { mode, bytes, .. } => {
                out.push(mode as u8);
                out.extend_from_slice(&((bytes.len() / PAGE_SIZE) as u16).to_le_bytes());
                out.extend_from_slice(bytes);
            }
        }
    }
}

/// Iterates over the messages of a frame.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// Over a frame payload.
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(DecodeError {
                offset: self.pos,
                what: format!(
                    "truncated {what}: need {n} bytes, {} left",
                    self.buf.len() - self.pos
                ),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn bad(&self, what: String) -> DecodeError {
        DecodeError {
            offset: self.pos,
            what,
        }
    }

    fn next_msg(&mut self) -> Result<Msg<'a>, DecodeError> {
        let tag = self.u8("tag")?;
        let page = u64::from_le_bytes(self.take(8, "page")?.try_into().expect("8 bytes"));
        Ok(match tag {
            1 => match self.u8("access")? {
                0 => Msg::Request {
                    page,
                    write: false,
                    prefetch: false,
                },
                1 => Msg::Request {
                    page,
                    write: true,
                    prefetch: false,
                },
                2 => Msg::Request {
                    page,
                    write: false,
                    prefetch: true,
                },
                a => return Err(self.bad(format!("request access {a}"))),
            },
            2 => {
                let mode = match self.u8("mode")? {
                    1 => LocalState::Shared,
                    2 => LocalState::Exclusive,
                    m => return Err(self.bad(format!("grant mode {m}"))),
                };
                let kind = self.u8("data kind")?;
                let acks = self.u16("acks")?;
                let data = match kind {
                    0 => GrantData::None,
                    1 => GrantData::Zero,
                    2 => GrantData::Inline(self.take(PAGE_SIZE, "page data")?),
                    3 => GrantData::FromSupplier,
                    k => return Err(self.bad(format!("grant data kind {k}"))),
                };
                Msg::Grant {
                    page,
                    mode,
                    data,
                    acks,
                }
            }
            3 => {
                let requester = self.u16("requester")?;
                let keep = match self.u8("keep")? {
                    0 => LocalState::Invalid,
                    1 => LocalState::Shared,
                    k => return Err(self.bad(format!("fetch keep {k}"))),
                };
                Msg::Fetch {
                    page,
                    requester,
                    keep,
                }
            }
            4 => Msg::Data {
                page,
                bytes: self.take(PAGE_SIZE, "page data")?,
            },
            5 => Msg::Invalidate {
                page,
                requester: self.u16("requester")?,
            },
            6 => Msg::InvAck { page },
            7 => Msg::Done { page },
            8 => {
                let mode = match self.u8("mode")? {
                    1 => LocalState::Shared,
                    2 => LocalState::Exclusive,
                    m => return Err(self.bad(format!("grant run mode {m}"))),
                };
                let count = usize::from(self.u16("count")?);
                if count == 0 || page.checked_add(count as u64).is_none() {
                    return Err(self.bad(format!("grant run of {count} pages at {page}")));
                }
                Msg::GrantRun {
                    page,
                    mode,
                    bytes: self.take(count * PAGE_SIZE, "page data")?,
                }
            }
            t => {
                return Err(DecodeError {
                    offset: self.pos - 9,
                    what: format!("unknown tag {t}"),
                })
            }
        })
    }
}

impl<'a> Iterator for Decoder<'a> {
    type Item = Result<Msg<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let r = self.next_msg();
        if r.is_err() {
            self.pos = self.buf.len();
        }
        Some(r)
    }
}

/// Decodes a whole frame, or names what is wrong with it.
pub fn decode_all(buf: &[u8]) -> Result<Vec<Msg<'_>>, DecodeError> {
    Decoder::new(buf).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let page = vec![0xabu8; PAGE_SIZE];
        let msgs = vec![
            Msg::Request {
                page: 1,
                write: true,
                prefetch: false,
            },
            Msg::Request {
                page: 2,
                write: false,
                prefetch: true,
            },
            Msg::Grant {
                page: 3,
                mode: LocalState::Shared,
                data: GrantData::Inline(&page),
                acks: 0,
            },
            Msg::Grant {
                page: 4,
                mode: LocalState::Exclusive,
                data: GrantData::FromSupplier,
                acks: 3,
            },
            Msg::Grant {
                page: 4,
                mode: LocalState::Exclusive,
                data: GrantData::Zero,
                acks: 0,
            },
            Msg::Fetch {
                page: 5,
                requester: 2,
                keep: LocalState::Shared,
            },
            Msg::Data {
                page: u64::MAX,
                bytes: &page,
            },
            Msg::Invalidate {
                page: 6,
                requester: 63,
            },
            Msg::InvAck { page: 7 },
            Msg::Done { page: 8 },
            Msg::GrantRun {
                page: 9,
                mode: LocalState::Shared,
                bytes: &[7; 2 * PAGE_SIZE],
            },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        assert_eq!(decode_all(&buf).unwrap(), msgs);
    }

    #[test]
    fn malformed_frames_are_named() {
        let mut buf = Vec::new();
        Msg::Data {
            page: 1,
            bytes: &[0; PAGE_SIZE],
        }
        .encode(&mut buf);
        buf.truncate(100);
        let e = decode_all(&buf).unwrap_err();
        assert!(e.what.contains("truncated page data"), "{e}");
        let e = decode_all(&[9, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(e.what, "unknown tag 9");
        let e = decode_all(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 7]).unwrap_err();
        assert!(e.what.contains("access 7"));
    }
}
