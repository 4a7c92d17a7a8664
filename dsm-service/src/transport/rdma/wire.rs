//! The RDMA message format and its codec: the 8-byte header in front of
//! every SEND, cutting a frame into fragments of at most one slot, and
//! putting them back together with every framing rule checked (a violation
//! ends the link with a protocol error). No verbs here.

use crate::transport::peers::check_frame_len;

use super::SLOT_BYTES;

/// Bytes of the header in front of every SEND.
pub const MSG_HEADER: usize = 8;
/// Frame bytes a fragment carries at most.
pub(super) const CHUNK: usize = SLOT_BYTES - MSG_HEADER;
/// Version of the RDMA message format, traded with the queue-pair endpoints.
pub const RDMA_WIRE_VERSION: u16 = 1;

/// Message kind (header byte 0): a fragment of a frame.
pub(super) const KIND_DATA: u8 = 1;
/// Message kind: credits only.
pub(super) const KIND_CREDIT: u8 = 2;
/// Data fragment flag (header byte 1): the frame's first fragment.
pub(super) const FLAG_FIRST: u8 = 1;
/// Data fragment flag: the frame's last fragment.
pub(super) const FLAG_LAST: u8 = 2;

/// The 8 bytes in front of every SEND.
///
/// ```text
/// 0: kind (1 data, 2 credit-only)   1: flags (data: 1 first, 2 last)
/// 2..4: credits returned, u16 LE    4..8: first fragment: frame length, u32 LE
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MsgHeader {
    /// [`KIND_DATA`] or [`KIND_CREDIT`].
    pub(super) kind: u8,
    /// [`FLAG_FIRST`], [`FLAG_LAST`] (data only).
    pub(super) flags: u8,
    /// Credits returned to the receiver of this message.
    pub(super) credits: u16,
    /// The whole frame's length, on a first fragment; 0 otherwise.
    pub(super) total: u32,
}

impl MsgHeader {
    /// Writes the header into the first [`MSG_HEADER`] bytes of `b`.
    pub(super) fn write(&self, b: &mut [u8]) {
        b[0] = self.kind;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.credits.to_le_bytes());
        b[4..8].copy_from_slice(&self.total.to_le_bytes());
    }

    /// Reads a header, or says why the message is too short for one.
    pub(super) fn read(b: &[u8]) -> Result<MsgHeader, String> {
        if b.len() < MSG_HEADER {
            return Err(format!(
                "message of {} bytes is shorter than its {MSG_HEADER}-byte header",
                b.len()
            ));
        }
        Ok(MsgHeader {
            kind: b[0],
            flags: b[1],
            credits: u16::from_le_bytes([b[2], b[3]]),
            total: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
    }
}

impl MsgHeader {
    /// The header of a data fragment with `flags` of a `len`-byte frame.
    pub(super) fn data(flags: u8, len: usize) -> MsgHeader {
        MsgHeader {
            kind: KIND_DATA,
            flags,
            credits: 0,
            total: if flags & FLAG_FIRST != 0 {
                len as u32
            } else {
                0
            },
        }
    }

    /// The header of a credit-only message.
    pub(super) fn credit() -> MsgHeader {
        MsgHeader {
            kind: KIND_CREDIT,
            flags: 0,
            credits: 0,
            total: 0,
        }
    }
}

/// Cuts a frame of `len` bytes into `(offset, bytes, flags)` fragments of at
/// most `chunk` bytes.
pub(super) fn fragments(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize, u8)> {
    let count = len.div_ceil(chunk).max(1);
    (0..count).map(move |i| {
        let off = i * chunk;
        let mut flags = 0;
        if i == 0 {
            flags |= FLAG_FIRST;
        }
        if i + 1 == count {
            flags |= FLAG_LAST;
        }
        (off, chunk.min(len - off), flags)
    })
}

/// Copies bytes `off..off + dst.len()` of the frame `[channel] ++ payload`.
pub(super) fn write_body(dst: &mut [u8], ch: u8, payload: &[u8], off: usize) {
    if dst.is_empty() {
        return;
    }
    if off == 0 {
        dst[0] = ch;
        let n = dst.len() - 1;
        dst[1..].copy_from_slice(&payload[..n]);
    } else {
        let n = dst.len();
        dst.copy_from_slice(&payload[off - 1..off - 1 + n]);
    }
}

/// Puts fragmented frames back together and checks their framing.
#[derive(Debug, Default)]
pub(super) struct Reassembler {
    buf: Vec<u8>,
    total: usize,
    active: bool,
}

impl Reassembler {
    /// Takes one data fragment; returns the whole frame (channel byte first)
    /// once its last fragment is in.
    pub(super) fn push<'a>(
        &'a mut self,
        h: &MsgHeader,
        chunk: &'a [u8],
        max: usize,
    ) -> Result<Option<&'a [u8]>, String> {
        if h.flags & !(FLAG_FIRST | FLAG_LAST) != 0 {
            return Err(format!("unknown fragment flags {:#x}", h.flags));
        }
        if chunk.is_empty() {
            return Err("data fragment without data".into());
        }
        let first = h.flags & FLAG_FIRST != 0;
        let last = h.flags & FLAG_LAST != 0;
        if first {
            if self.active {
                return Err("a new frame started before the previous one ended".into());
            }
            let total = h.total as usize;
            check_frame_len(total, 1, max)?;
            if last {
                if chunk.len() != total {
                    return Err(format!(
                        "single-fragment frame carries {} bytes, its header says {total}",
                        chunk.len()
                    ));
                }
                return Ok(Some(chunk));
            }
            if chunk.len() >= total {
                return Err(format!(
                    "first fragment carries {} bytes of a {total}-byte frame but is not the last",
                    chunk.len()
                ));
            }
            self.buf.clear();
            self.buf.reserve(total);
            self.buf.extend_from_slice(chunk);
            self.total = total;
            self.active = true;
            return Ok(None);
        }
        if !self.active {
            return Err("continuation fragment without a first fragment".into());
        }
        if self.buf.len() + chunk.len() > self.total {
            return Err(format!(
                "fragments exceed the announced frame length {}",
                self.total
            ));
        }
        self.buf.extend_from_slice(chunk);
        if !last {
            return Ok(None);
        }
        self.active = false;
        if self.buf.len() != self.total {
            return Err(format!(
                "frame ended after {} of its {} bytes",
                self.buf.len(),
                self.total
            ));
        }
        Ok(Some(&self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> (u8, Vec<u8>) {
        (7, (0..len - 1).map(|i| (i * 31 + 5) as u8).collect())
    }

    /// Fragments a frame like the send path does and reassembles it.
    fn roundtrip(len: usize, chunk: usize, asm: &mut Reassembler) -> Vec<u8> {
        let (ch, payload) = frame(len);
        let mut out = None;
        for (off, n, flags) in fragments(len, chunk) {
            let mut msg = vec![0u8; MSG_HEADER + n];
            MsgHeader::data(flags, len).write(&mut msg);
            write_body(&mut msg[MSG_HEADER..], ch, &payload, off);
            let h = MsgHeader::read(&msg).unwrap();
            assert!(out.is_none(), "frame delivered before its last fragment");
            out = asm
                .push(&h, &msg[MSG_HEADER..], 1 << 20)
                .unwrap()
                .map(|b| b.to_vec());
        }
        let out = out.expect("frame delivered");
        assert_eq!(out[0], ch);
        assert_eq!(&out[1..], &payload[..]);
        out
    }

    #[test]
    fn rdma_header_roundtrips() {
        let h = MsgHeader {
            kind: KIND_DATA,
            flags: FLAG_FIRST,
            credits: 17,
            total: 123_456,
        };
        let mut b = [0u8; MSG_HEADER];
        h.write(&mut b);
        assert_eq!(MsgHeader::read(&b).unwrap(), h);
        assert!(MsgHeader::read(&b[..5]).unwrap_err().contains("shorter"));
    }

    #[test]
    fn rdma_fragments_cover_frames_exactly() {
        for len in [1, 2, 99, 100, 101, 1000, 12_345] {
            let frags: Vec<_> = fragments(len, 100).collect();
            assert_eq!(frags.iter().map(|f| f.1).sum::<usize>(), len);
            assert_eq!(frags[0].2 & FLAG_FIRST, FLAG_FIRST);
            assert_eq!(frags.last().unwrap().2 & FLAG_LAST, FLAG_LAST);
            assert!(frags.iter().all(|f| f.1 >= 1 && f.1 <= 100));
            assert_eq!(frags.len(), len.div_ceil(100));
        }
        let mut asm = Reassembler::default();
        for len in [1, 2, 99, 100, 101, 1000, 12_345, 1, CHUNK + 1] {
            roundtrip(len, 100, &mut asm);
        }
        roundtrip(3 * CHUNK + 17, CHUNK, &mut asm);
        roundtrip(CHUNK, CHUNK, &mut asm);
    }

    #[test]
    fn rdma_reassembler_refuses_bad_framing() {
        let data = |flags, total| MsgHeader {
            kind: KIND_DATA,
            flags,
            credits: 0,
            total,
        };
        let mut a = Reassembler::default();
        let e = a
            .push(&data(FLAG_FIRST | FLAG_LAST, 5000), &[0; 5000], 4096)
            .unwrap_err();
        assert!(e.contains("outside 1..=4096"), "{e}");
        let e = a.push(&data(FLAG_LAST, 0), &[1], 4096).unwrap_err();
        assert!(e.contains("without a first fragment"), "{e}");
        let e = a
            .push(&data(FLAG_FIRST | FLAG_LAST, 3), &[1, 2], 4096)
            .unwrap_err();
        assert!(e.contains("header says 3"), "{e}");
        assert!(a
            .push(&data(FLAG_FIRST, 10), &[1, 2], 4096)
            .unwrap()
            .is_none());
        let e = a.push(&data(FLAG_FIRST, 10), &[1, 2], 4096).unwrap_err();
        assert!(e.contains("before the previous one ended"), "{e}");
        let mut a = Reassembler::default();
        a.push(&data(FLAG_FIRST, 4), &[1, 2], 4096).unwrap();
        let e = a.push(&data(0, 0), &[1, 2, 3], 4096).unwrap_err();
        assert!(e.contains("exceed"), "{e}");
        let mut a = Reassembler::default();
        a.push(&data(FLAG_FIRST, 4), &[1, 2], 4096).unwrap();
        let e = a.push(&data(FLAG_LAST, 0), &[3], 4096).unwrap_err();
        assert!(e.contains("after 3 of its 4"), "{e}");
        let e = a.push(&data(0x80 | FLAG_FIRST, 1), &[3], 4096).unwrap_err();
        assert!(e.contains("flags"), "{e}");
        let e = a.push(&data(FLAG_FIRST, 1), &[], 4096).unwrap_err();
        assert!(e.contains("without data"), "{e}");
    }

    #[test]
    fn rdma_reassembler_refuses_a_zero_length_frame() {
        let e = Reassembler::default()
            .push(&MsgHeader::data(FLAG_FIRST | FLAG_LAST, 0), &[1], 4096)
            .unwrap_err();
        assert_eq!(e, "frame length 0 outside 1..=4096");
    }

    #[test]
    fn rdma_reassembler_refuses_a_first_fragment_that_fills_the_frame_but_is_not_last() {
        let mut a = Reassembler::default();
        let e = a
            .push(&MsgHeader::data(FLAG_FIRST, 2), &[1, 2], 4096)
            .unwrap_err();
        assert!(
            e.contains("carries 2 bytes of a 2-byte frame but is not the last"),
            "{e}"
        );
        let e = a
            .push(&MsgHeader::data(FLAG_FIRST, 2), &[1, 2, 3], 4096)
            .unwrap_err();
        assert!(e.contains("is not the last"), "{e}");
    }

    #[test]
    fn rdma_reassembler_recovers_nothing_after_a_frame_ends_and_starts_afresh() {
        let mut a = Reassembler::default();
        assert!(a
            .push(&MsgHeader::data(FLAG_FIRST, 3), &[1], 4096)
            .unwrap()
            .is_none());
        let frame = a
            .push(&MsgHeader::data(FLAG_LAST, 0), &[2, 3], 4096)
            .unwrap();
        assert_eq!(frame, Some(&[1u8, 2, 3][..]));
        let e = a.push(&MsgHeader::data(0, 0), &[4], 4096).unwrap_err();
        assert!(e.contains("without a first fragment"), "{e}");
        let frame = a
            .push(&MsgHeader::data(FLAG_FIRST | FLAG_LAST, 1), &[9], 4096)
            .unwrap();
        assert_eq!(frame, Some(&[9u8][..]));
    }

    #[test]
    fn rdma_headers_for_data_and_credits() {
        assert_eq!(MsgHeader::data(FLAG_FIRST, 10).total, 10);
        assert_eq!(MsgHeader::data(FLAG_LAST, 10).total, 0);
        let c = MsgHeader::credit();
        assert_eq!((c.kind, c.flags, c.total), (KIND_CREDIT, 0, 0));
        let mut b = [0xAAu8; MSG_HEADER];
        MsgHeader {
            credits: 0x1234,
            ..c
        }
        .write(&mut b);
        assert_eq!(b, [KIND_CREDIT, 0, 0x34, 0x12, 0, 0, 0, 0]);
    }
}
