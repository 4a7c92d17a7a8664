//! The sealed link: session keys from the handshake, and every frame after
//! it sealed with AES-256-GCM (`transport-security=aead`, the default).
//!
//! Key schedule (see `transport/WIRE.md`):
//!
//! ```text
//! salt = SHA-256("fragvisor-link-v2" | hello_dialer | hello_acceptor)
//! prk  = HKDF-Extract(salt, cluster key)
//! k_da = HKDF-Expand(prk, "fragvisor-link-v2 dialer->acceptor", 32)
//! k_ad = HKDF-Expand(prk, "fragvisor-link-v2 acceptor->dialer", 32)
//! ```
//!
//! Both hellos carry a fresh 32-byte nonce, so every connection gets keys of
//! its own, and one per direction. The AEAD nonce is a per-direction frame
//! counter (4 zero bytes, then the counter as u64 big endian) that neither
//! side sends: the receiver expects frame `n` to be sealed under nonce `n`,
//! so a frame that is modified, forged, replayed, reordered, or follows a
//! dropped one fails to open, and the link is declared down. The frame's
//! 4-byte length prefix is the associated data.
//!
//! The cipher is `ring`'s (AES-NI and carry-less multiply where the CPU has
//! them); nothing here is a hand-written primitive.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::digest::{digest, SHA256};
use ring::hkdf::{Salt, HKDF_SHA256};

/// Bytes a sealed frame adds: the GCM tag.
pub const TAG_LEN: usize = 16;

const LABEL: &[u8] = b"fragvisor-link-v2";
const INFO_DIALER_TO_ACCEPTOR: &[u8] = b"fragvisor-link-v2 dialer->acceptor";
const INFO_ACCEPTOR_TO_DIALER: &[u8] = b"fragvisor-link-v2 acceptor->dialer";

/// What protects a link after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportSecurity {
    /// Every frame encrypted and authenticated (AES-256-GCM): the default.
    #[default]
    Aead,
    /// Peers authenticated by the handshake; frames in clear, unprotected.
    AuthOnly,
}

impl TransportSecurity {
    /// The option value: `aead` or `auth-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportSecurity::Aead => "aead",
            TransportSecurity::AuthOnly => "auth-only",
        }
    }

    /// The byte a Hello carries.
    pub(crate) fn wire(self) -> u8 {
        match self {
            TransportSecurity::Aead => 1,
            TransportSecurity::AuthOnly => 2,
        }
    }

    /// The mode of a Hello's byte.
    pub(crate) fn from_wire(b: u8) -> Option<TransportSecurity> {
        match b {
            1 => Some(TransportSecurity::Aead),
            2 => Some(TransportSecurity::AuthOnly),
            _ => None,
        }
    }

    /// Bytes each frame carries beyond its channel and payload.
    pub fn overhead(self) -> usize {
        match self {
            TransportSecurity::Aead => TAG_LEN,
            TransportSecurity::AuthOnly => 0,
        }
    }

    /// What a user is told when a cluster starts in this mode, if anything.
    pub fn start_warning(self) -> Option<&'static str> {
        match self {
            TransportSecurity::Aead => None,
            TransportSecurity::AuthOnly => Some(
                "transport-security=auth-only: guest memory crosses the cluster network in clear \
                 and unprotected; anyone on the path can read it and change it",
            ),
        }
    }
}

impl std::fmt::Display for TransportSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `transport-security` value that is neither `aead` nor `auth-only`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transport-security={0}: expected aead or auth-only")]
pub struct BadSecurity(pub String);

impl std::str::FromStr for TransportSecurity {
    type Err = BadSecurity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "aead" => Ok(TransportSecurity::Aead),
            "auth-only" => Ok(TransportSecurity::AuthOnly),
            other => Err(BadSecurity(other.to_string())),
        }
    }
}

/// Why a sealed frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The frame did not open under the expected key and counter.
    #[error(
        "frame {frame} failed authentication: it was modified, forged, replayed, reordered, \
         or a frame before it was lost"
    )]
    Forged {
        /// The receiver's frame counter.
        frame: u64,
    },
    /// Shorter than a tag.
    #[error("sealed frame of {0} bytes is shorter than its {TAG_LEN}-byte tag")]
    Short(usize),
    /// 2^64 frames on one link: never reached in practice, refused anyway.
    #[error("the link's frame counter is exhausted")]
    Exhausted,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals the frames one direction of a link sends.
pub struct Sealer {
    key: LessSafeKey,
    next: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("next", &self.next).finish()
    }
}

impl Sealer {
    /// Seals one frame in place: `frame` holds the 4-byte length prefix
    /// (which must already count the tag) and the clear body; the body is
    /// encrypted and the tag appended. Frames must go on the wire in the
    /// order they are sealed.
    pub fn seal_frame(&mut self, frame: &mut Vec<u8>) -> Result<(), SealError> {
        let counter = self.next;
        self.next = counter.checked_add(1).ok_or(SealError::Exhausted)?;
        let (hdr, body) = frame.split_at_mut(4);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*hdr), body)
            .map_err(|_| SealError::Exhausted)?;
        frame.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// Opens the frames one direction of a link receives.
pub struct Opener {
    key: LessSafeKey,
    next: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("next", &self.next).finish()
    }
}

impl Opener {
    /// Opens one received frame in place: `hdr` is its 4-byte length prefix
    /// and `body` the sealed bytes with the tag at the end. Returns the
    /// length of the clear body (channel byte first) at the start of `body`.
    pub fn open_frame(&mut self, hdr: [u8; 4], body: &mut [u8]) -> Result<usize, SealError> {
        if body.len() < TAG_LEN {
            return Err(SealError::Short(body.len()));
        }
        let counter = self.next;
        let clear = self
            .key
            .open_in_place(nonce(counter), Aad::from(hdr), body)
            .map_err(|_| SealError::Forged { frame: counter })?
            .len();
        self.next = counter.checked_add(1).ok_or(SealError::Exhausted)?;
        Ok(clear)
    }
}

/// Both directions of one link's protection.
#[derive(Debug)]
pub struct LinkKeys {
    /// Seals what this node sends.
    pub seal: Sealer,
    /// Opens what this node receives.
    pub open: Opener,
}

fn key(prk: &ring::hkdf::Prk, info: &[u8]) -> LessSafeKey {
    let info = [info];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        .expect("32 bytes are within HKDF-SHA256's output limit");
    LessSafeKey::new(UnboundKey::from(okm))
}

/// Derives one link's keys from the cluster key and the two encoded hellos
/// of its handshake (which hold both nonces); `dialer` says which side this
/// node played.
pub fn derive(cluster_key: &[u8], hello_d: &[u8], hello_a: &[u8], dialer: bool) -> LinkKeys {
    let mut transcript = Vec::with_capacity(LABEL.len() + hello_d.len() + hello_a.len());
    transcript.extend_from_slice(LABEL);
    transcript.extend_from_slice(hello_d);
    transcript.extend_from_slice(hello_a);
    let salt = Salt::new(HKDF_SHA256, digest(&SHA256, &transcript).as_ref());
    let prk = salt.extract(cluster_key);
    let d_to_a = key(&prk, INFO_DIALER_TO_ACCEPTOR);
    let a_to_d = key(&prk, INFO_ACCEPTOR_TO_DIALER);
    let (tx, rx) = if dialer {
        (d_to_a, a_to_d)
    } else {
        (a_to_d, d_to_a)
    };
    LinkKeys {
        seal: Sealer { key: tx, next: 0 },
        open: Opener { key: rx, next: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123";

    fn pair() -> (LinkKeys, LinkKeys) {
        (
            derive(KEY, b"hello-d", b"hello-a", true),
            derive(KEY, b"hello-d", b"hello-a", false),
        )
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = ((body.len() + TAG_LEN) as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn split(f: &[u8]) -> ([u8; 4], Vec<u8>) {
        (f[..4].try_into().unwrap(), f[4..].to_vec())
    }

    #[test]
    fn frames_open_in_order_in_both_directions() {
        let (mut d, mut a) = pair();
        for i in 0..3u8 {
            let mut f = frame(&[1, i, i, i]);
            d.seal.seal_frame(&mut f).unwrap();
            assert_ne!(&f[4..8], &[1, i, i, i], "the body is not sent in clear");
            let (h, mut b) = split(&f);
            let n = a.open.open_frame(h, &mut b).unwrap();
            assert_eq!(&b[..n], &[1, i, i, i]);
        }
        let mut f = frame(b"\x01back");
        a.seal.seal_frame(&mut f).unwrap();
        let (h, mut b) = split(&f);
        let n = d.open.open_frame(h, &mut b).unwrap();
        assert_eq!(&b[..n], b"\x01back");
    }

    #[test]
    fn modified_replayed_reordered_and_dropped_frames_are_refused() {
        let (mut d, _) = pair();
        let sealed: Vec<Vec<u8>> = (0..3u8)
            .map(|i| {
                let mut f = frame(&[1, i]);
                d.seal.seal_frame(&mut f).unwrap();
                f
            })
            .collect();
        let opens = |order: &[usize], flip: Option<usize>| -> Result<(), SealError> {
            let (_, mut a) = pair();
            for &i in order {
                let (mut h, mut b) = split(&sealed[i]);
                if let Some(byte) = flip {
                    if byte < 4 {
                        h[byte] ^= 1;
                    } else {
                        b[byte - 4] ^= 1;
                    }
                }
                a.open.open_frame(h, &mut b)?;
            }
            Ok(())
        };
        opens(&[0, 1, 2], None).unwrap();
        assert_eq!(opens(&[0, 0], None), Err(SealError::Forged { frame: 1 }));
        assert_eq!(opens(&[1, 0], None), Err(SealError::Forged { frame: 0 }));
        assert_eq!(opens(&[0, 2], None), Err(SealError::Forged { frame: 1 }));
        for byte in [0, 4, 5, 6 + TAG_LEN - 1] {
            assert_eq!(
                opens(&[0], Some(byte)),
                Err(SealError::Forged { frame: 0 }),
                "byte {byte}"
            );
        }
    }

    #[test]
    fn keys_differ_per_direction_per_connection_and_per_cluster_key() {
        let seal_one = |k: &mut LinkKeys| {
            let mut f = frame(b"\x01same");
            k.seal.seal_frame(&mut f).unwrap();
            f
        };
        let (mut d, mut a) = pair();
        let base = seal_one(&mut d);
        assert_ne!(base, seal_one(&mut a), "the two directions share a key");
        let mut other_conn = derive(KEY, b"hello-d", b"hello-A", true);
        assert_ne!(base, seal_one(&mut other_conn));
        let mut other_key = derive(b"another key of 16+ bytes", b"hello-d", b"hello-a", true);
        assert_ne!(base, seal_one(&mut other_key));
        // A node with the wrong key cannot open.
        let mut wrong = derive(b"another key of 16+ bytes", b"hello-d", b"hello-a", false);
        let (h, mut b) = split(&base);
        assert!(wrong.open.open_frame(h, &mut b).is_err());
    }

    #[test]
    fn security_option_parses_and_names_bad_values() {
        assert_eq!("aead".parse(), Ok(TransportSecurity::Aead));
        assert_eq!("auth-only".parse(), Ok(TransportSecurity::AuthOnly));
        let e = "none".parse::<TransportSecurity>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "transport-security=none: expected aead or auth-only"
        );
        assert_eq!(TransportSecurity::default(), TransportSecurity::Aead);
        assert!(TransportSecurity::Aead.start_warning().is_none());
        assert!(TransportSecurity::AuthOnly.start_warning().is_some());
        for s in [TransportSecurity::Aead, TransportSecurity::AuthOnly] {
            assert_eq!(TransportSecurity::from_wire(s.wire()), Some(s));
        }
        assert_eq!(TransportSecurity::from_wire(0), None);
        let mut short = [0u8; 3];
        assert_eq!(
            pair().1.open.open_frame([0; 4], &mut short),
            Err(SealError::Short(3))
        );
    }
}
