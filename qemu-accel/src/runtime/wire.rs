//! The runtime's wire format: one [`Message`] per frame on channel
//! [`RUNTIME_CHANNEL`], first byte the tag, integers little endian
//! (`RUNTIME.md` next to this file has the table).

use dsm_service::transport::channel;
use thiserror::Error;

use super::io::{IoAccess, IoSpace, MAX_IO_DATA};
use super::irq::{ApicState, Irq, IrqKind};
use super::lifecycle::Lifecycle;
use crate::clock::ClockReading;

/// The transport channel of runtime messages.
pub const RUNTIME_CHANNEL: u8 = channel::APP_BASE;

/// Wire messages (little endian), one per frame, first byte the tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 1: `seq u32, cpu u32, space u8, write u8, size u8, count u32, addr u64, attrs u32, data`.
    IoRequest {
        /// Matches the reply.
        seq: u32,
        /// The access.
        access: IoAccess,
        /// Data of a write.
        data: Vec<u8>,
    },
    /// 2: `seq u32, result u32, data`.
    IoReply {
        /// Of the request.
        seq: u32,
        /// `MemTxResult`.
        result: u32,
        /// Data of a read.
        data: Vec<u8>,
    },
    /// 3: `cpu u32, kind u8, vector u8, level u8`.
    Irq(Irq),
    /// 4: `cpu u32, id u32, ldr u32, dfr u32, apicbase u64`.
    Apic(ApicState),
    /// 5: `vector u8`.
    IoapicEoi(u8),
    /// 6: `event u8, status i32` (event 0 power-off, 1 reset, 2 exit with
    /// `status`; the status is 0 for the others).
    Lifecycle(Lifecycle),
    /// 7: `seq u32`. A non-origin node asks for the origin's clocks.
    ClockPing {
        /// Matches the answer.
        seq: u32,
    },
    /// 8: `seq u32, tsc u64, mono_ns u64, base_tsc u64, base_mono_ns u64`.
    /// The origin's clocks when it answered, and its base reading (the
    /// guest clock's zero).
    ClockPong {
        /// Of the ping.
        seq: u32,
        /// The origin's clocks now.
        now: ClockReading,
        /// The origin's base reading.
        base: ClockReading,
    },
}

/// A frame that is not a runtime message.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed runtime message: {0}")]
pub struct DecodeError(String);

/// Reads a frame front to back; running short is a [`DecodeError`].
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError(format!(
                "truncated: need {n} bytes, {} left",
                self.0.len()
            )));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }
}

impl Message {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        match self {
            Message::IoRequest {
                seq,
                access: a,
                data,
            } => {
                b.push(1);
                b.extend_from_slice(&seq.to_le_bytes());
                b.extend_from_slice(&a.cpu.to_le_bytes());
                b.push(a.space as u8);
                b.push(u8::from(a.is_write));
                b.push(a.size);
                b.extend_from_slice(&a.count.to_le_bytes());
                b.extend_from_slice(&a.addr.to_le_bytes());
                b.extend_from_slice(&a.attrs.to_le_bytes());
                b.extend_from_slice(data);
            }
            Message::IoReply { seq, result, data } => {
                b.push(2);
                b.extend_from_slice(&seq.to_le_bytes());
                b.extend_from_slice(&result.to_le_bytes());
                b.extend_from_slice(data);
            }
            Message::Irq(i) => {
                b.push(3);
                b.extend_from_slice(&i.cpu.to_le_bytes());
                b.extend_from_slice(&[i.kind as u8, i.vector, u8::from(i.level)]);
            }
            Message::Apic(s) => {
                b.push(4);
                for v in [s.cpu, s.id, s.ldr, s.dfr] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&s.apicbase.to_le_bytes());
            }
            Message::IoapicEoi(v) => b.extend_from_slice(&[5, *v]),
            Message::Lifecycle(e) => {
                b.extend_from_slice(&[6, e.code()]);
                b.extend_from_slice(&e.status().to_le_bytes());
            }
            Message::ClockPing { seq } => {
                b.push(7);
                b.extend_from_slice(&seq.to_le_bytes());
            }
            Message::ClockPong { seq, now, base } => {
                b.push(8);
                b.extend_from_slice(&seq.to_le_bytes());
                for v in [now.tsc, now.mono_ns, base.tsc, base.mono_ns] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        b
    }

    /// The request number a reply answers (`None` for other messages).
    pub fn reply_seq(&self) -> Option<u32> {
        match self {
            Message::IoReply { seq, .. } | Message::ClockPong { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// Parses one message.
    pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader(buf);
        let m = match r.u8()? {
            1 => {
                let seq = r.u32()?;
                let cpu = r.u32()?;
                let space = match r.u8()? {
                    0 => IoSpace::Pio,
                    1 => IoSpace::Mmio,
                    s => return Err(DecodeError(format!("address space {s}"))),
                };
                let is_write = r.u8()? != 0;
                let size = r.u8()?;
                let count = r.u32()?;
                let addr = r.u64()?;
                let attrs = r.u32()?;
                let access = IoAccess {
                    cpu,
                    space,
                    addr,
                    size,
                    count,
                    is_write,
                    attrs,
                };
                if !matches!(size, 1 | 2 | 4 | 8) || count == 0 || access.len() > MAX_IO_DATA {
                    return Err(DecodeError(format!("access of {count} x {size} bytes")));
                }
                let data = r.take(if is_write { access.len() } else { 0 })?.to_vec();
                Message::IoRequest { seq, access, data }
            }
            2 => Message::IoReply {
                seq: r.u32()?,
                result: r.u32()?,
                data: r.rest(),
            },
            3 => {
                let cpu = r.u32()?;
                let code = r.u8()?;
                let kind = IrqKind::from_code(code)
                    .ok_or_else(|| DecodeError(format!("interrupt kind {code}")))?;
                Message::Irq(Irq {
                    cpu,
                    kind,
                    vector: r.u8()?,
                    level: r.u8()? != 0,
                })
            }
            4 => Message::Apic(ApicState {
                cpu: r.u32()?,
                id: r.u32()?,
                ldr: r.u32()?,
                dfr: r.u32()?,
                apicbase: r.u64()?,
            }),
            5 => Message::IoapicEoi(r.u8()?),
            6 => {
                let event = r.u8()?;
                let status = r.u32()? as i32;
                Message::Lifecycle(
                    Lifecycle::from_code(event, status)
                        .ok_or_else(|| DecodeError(format!("lifecycle event {event}")))?,
                )
            }
            7 => Message::ClockPing { seq: r.u32()? },
            8 => Message::ClockPong {
                seq: r.u32()?,
                now: ClockReading {
                    tsc: r.u64()?,
                    mono_ns: r.u64()?,
                },
                base: ClockReading {
                    tsc: r.u64()?,
                    mono_ns: r.u64()?,
                },
            },
            t => return Err(DecodeError(format!("unknown tag {t}"))),
        };
        if !r.0.is_empty() {
            return Err(DecodeError(format!("{} trailing bytes", r.0.len())));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(space: IoSpace, size: u8, count: u32) -> IoAccess {
        IoAccess {
            cpu: 1,
            space,
            addr: 0x1000,
            size,
            count,
            is_write: false,
            attrs: 0,
        }
    }

    /// One of every message, and of every variant's edge values.
    fn every_message() -> Vec<Message> {
        vec![
            Message::IoRequest {
                seq: 1,
                access: IoAccess {
                    is_write: true,
                    ..read(IoSpace::Mmio, 8, 512)
                },
                data: vec![0xab; MAX_IO_DATA],
            },
            Message::IoRequest {
                seq: u32::MAX,
                access: read(IoSpace::Pio, 2, 1),
                data: vec![],
            },
            Message::IoReply {
                seq: 2,
                result: u32::MAX,
                data: vec![],
            },
            Message::Irq(Irq {
                cpu: 7,
                kind: IrqKind::Fixed,
                vector: 0x30,
                level: true,
            }),
            Message::Irq(Irq {
                cpu: 0,
                kind: IrqKind::Nmi,
                vector: 0,
                level: false,
            }),
            Message::Irq(Irq {
                cpu: 1,
                kind: IrqKind::Smi,
                vector: 0,
                level: false,
            }),
            Message::Irq(Irq {
                cpu: 2,
                kind: IrqKind::Init,
                vector: 0,
                level: false,
            }),
            Message::ClockPong {
                seq: 0,
                now: ClockReading::default(),
                base: ClockReading {
                    tsc: u64::MAX,
                    mono_ns: u64::MAX,
                },
            },
            Message::Lifecycle(Lifecycle::Exit(i32::MIN)),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        let access = IoAccess {
            cpu: 3,
            space: IoSpace::Pio,
            addr: 0x3f8,
            size: 1,
            count: 4,
            is_write: true,
            attrs: 1,
        };
        let msgs = vec![
            Message::IoRequest {
                seq: 9,
                access,
                data: vec![1, 2, 3, 4],
            },
            Message::IoRequest {
                seq: 10,
                access: IoAccess {
                    is_write: false,
                    space: IoSpace::Mmio,
                    size: 8,
                    count: 1,
                    ..access
                },
                data: vec![],
            },
            Message::IoReply {
                seq: 10,
                result: 0,
                data: vec![9; 8],
            },
            Message::Irq(Irq {
                cpu: 2,
                kind: IrqKind::Sipi,
                vector: 0x9a,
                level: false,
            }),
            Message::Apic(ApicState {
                cpu: 1,
                id: 1 << 24,
                ldr: 2 << 24,
                dfr: u32::MAX,
                apicbase: 0xfee0_0900,
            }),
            Message::IoapicEoi(0x31),
            Message::Lifecycle(Lifecycle::Reset),
            Message::Lifecycle(Lifecycle::PowerOff),
            Message::Lifecycle(Lifecycle::Exit(33)),
            Message::Lifecycle(Lifecycle::Exit(-1)),
            Message::ClockPing { seq: 77 },
            Message::ClockPong {
                seq: 77,
                now: ClockReading {
                    tsc: u64::MAX,
                    mono_ns: 12,
                },
                base: ClockReading { tsc: 3, mono_ns: 4 },
            },
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn malformed_messages_are_named() {
        assert!(Message::decode(&[]).unwrap_err().0.contains("truncated"));
        assert_eq!(Message::decode(&[42]).unwrap_err().0, "unknown tag 42");
        assert!(Message::decode(&[6, 7, 0, 0, 0, 0])
            .unwrap_err()
            .0
            .contains("lifecycle event 7"));
        assert!(Message::decode(&[5, 1, 2])
            .unwrap_err()
            .0
            .contains("trailing"));
        let mut big = Message::IoRequest {
            seq: 1,
            access: IoAccess {
                cpu: 0,
                space: IoSpace::Pio,
                addr: 0,
                size: 4,
                count: 2000,
                is_write: false,
                attrs: 0,
            },
            data: vec![],
        }
        .encode();
        assert!(Message::decode(&big).unwrap_err().0.contains("2000 x 4"));
        big[10] = 3;
        assert!(Message::decode(&big).is_err());
    }

    #[test]
    fn edge_values_round_trip() {
        for m in every_message() {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn every_truncated_message_is_named() {
        for m in every_message() {
            let bytes = m.encode();
            // An I/O reply's data is whatever follows its header.
            let header = if matches!(m, Message::IoReply { .. }) {
                9
            } else {
                bytes.len()
            };
            for cut in 0..header {
                let err = Message::decode(&bytes[..cut]).unwrap_err();
                assert!(
                    err.0.starts_with("truncated: need "),
                    "{m:?} cut at {cut}: {err}"
                );
            }
        }
    }

    #[test]
    fn a_write_without_its_data_is_truncated() {
        let mut bytes = Message::IoRequest {
            seq: 1,
            access: IoAccess {
                is_write: true,
                ..read(IoSpace::Pio, 4, 2)
            },
            data: vec![0; 8],
        }
        .encode();
        bytes.truncate(bytes.len() - 1);
        assert_eq!(
            Message::decode(&bytes).unwrap_err().to_string(),
            "malformed runtime message: truncated: need 8 bytes, 7 left"
        );
    }

    #[test]
    fn a_read_with_data_has_trailing_bytes() {
        let mut bytes = Message::IoRequest {
            seq: 1,
            access: read(IoSpace::Pio, 1, 1),
            data: vec![],
        }
        .encode();
        bytes.push(0);
        assert_eq!(Message::decode(&bytes).unwrap_err().0, "1 trailing bytes");
    }

    #[test]
    fn impossible_fields_are_named() {
        let request = |access| {
            Message::IoRequest {
                seq: 1,
                access,
                data: vec![],
            }
            .encode()
        };
        let err = |bytes: &[u8]| Message::decode(bytes).unwrap_err().0;
        assert_eq!(
            err(&request(read(IoSpace::Pio, 3, 1))),
            "access of 1 x 3 bytes"
        );
        assert_eq!(
            err(&request(read(IoSpace::Pio, 4, 0))),
            "access of 0 x 4 bytes"
        );
        assert_eq!(
            err(&request(read(IoSpace::Mmio, 8, 513))),
            "access of 513 x 8 bytes"
        );
        let mut bad_space = request(read(IoSpace::Pio, 1, 1));
        bad_space[9] = 2;
        assert_eq!(err(&bad_space), "address space 2");
        let mut bad_kind = Message::Irq(Irq {
            cpu: 0,
            kind: IrqKind::Fixed,
            vector: 0,
            level: false,
        })
        .encode();
        bad_kind[5] = 5;
        assert_eq!(err(&bad_kind), "interrupt kind 5");
        assert_eq!(err(&[6, 3, 0, 0, 0, 0]), "lifecycle event 3");
        assert_eq!(err(&[9]), "unknown tag 9");
        assert_eq!(err(&[0]), "unknown tag 0");
        assert_eq!(err(&[7, 1, 0, 0, 0, 0]), "1 trailing bytes");
    }

    #[test]
    fn only_replies_have_a_reply_number() {
        let reply = Message::IoReply {
            seq: 5,
            result: 0,
            data: vec![],
        };
        assert_eq!(reply.reply_seq(), Some(5));
        let pong = Message::ClockPong {
            seq: 6,
            now: ClockReading::default(),
            base: ClockReading::default(),
        };
        assert_eq!(pong.reply_seq(), Some(6));
        assert_eq!(Message::ClockPing { seq: 7 }.reply_seq(), None);
        assert_eq!(Message::IoapicEoi(1).reply_seq(), None);
        let request = Message::IoRequest {
            seq: 8,
            access: read(IoSpace::Pio, 1, 1),
            data: vec![],
        };
        assert_eq!(request.reply_seq(), None);
    }

    #[test]
    fn tags_are_the_documented_ones() {
        let tag = |m: Message| m.encode()[0];
        assert_eq!(tag(Message::ClockPing { seq: 0 }), 7);
        assert_eq!(tag(Message::IoapicEoi(0)), 5);
        assert_eq!(tag(Message::Lifecycle(Lifecycle::Reset)), 6);
        assert_eq!(Message::IoapicEoi(0x31).encode(), [5, 0x31]);
        assert_eq!(
            Message::Lifecycle(Lifecycle::Exit(33)).encode(),
            [6, 2, 33, 0, 0, 0]
        );
    }
}
