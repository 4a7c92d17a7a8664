//! The versioned, authenticated handshake that opens every connection.
//!
//! ```text
//! dialer (higher id)                      acceptor (lower id)
//!   Hello{magic,version,cluster,id,n,nonce_d} ──>
//!                                         checks magic, version, cluster, id
//!   <── Hello{...,nonce_a}   (or Reject{reason})
//!   Auth{HMAC(key, transcript, role=dialer)} ──>
//!                                         checks the MAC
//!   <── Auth{HMAC(key, transcript, role=acceptor)}   (or Reject{reason})
//! checks the MAC
//! ```
//!
//! The transcript binds both nonces, both ids and the cluster id, so a MAC
//! cannot be replayed on another connection or reflected back. A stranger
//! without the key never gets past `Auth`, so it can neither read nor write a
//! page. Frames before authentication are limited to [`MAX_HANDSHAKE_FRAME`]
//! bytes, and each read is bounded by the handshake timeout.

use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::sealed::{self, LinkKeys, TransportSecurity};
use crate::NodeId;

/// How long a connection may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Protocol version; a peer speaking another one is refused. Version 2
/// added the transport-security byte to the Hello and sealed frames.
pub const PROTOCOL_VERSION: u16 = 2;
/// First bytes of a Hello.
pub const MAGIC: [u8; 8] = *b"FRAGVSR\0";
/// Largest frame accepted before the peer is authenticated.
pub const MAX_HANDSHAKE_FRAME: usize = 256;

/// Frame channel of a Hello.
pub const CH_HELLO: u8 = 0xFF;
/// Frame channel of an Auth.
pub const CH_AUTH: u8 = 0xFE;
/// Frame channel of a Reject (UTF-8 reason).
pub const CH_REJECT: u8 = 0xFD;

/// A Hello without its layout text.
const HELLO_LEN: usize = 8 + 2 + 8 + 2 + 2 + 1 + 32 + 1;
/// Longest layout text a Hello carries; a longer one is cut and ends with a
/// digest of the whole, so that different layouts still differ.
pub const MAX_LAYOUT: usize = 180;
const MAC_LEN: usize = 32;

/// The first message on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
    /// Cluster id.
    pub cluster_id: u64,
    /// Sender's node id.
    pub node_id: NodeId,
    /// Sender's idea of the cluster size.
    pub nodes: u16,
    /// What protects the link after the handshake.
    pub security: TransportSecurity,
    /// Fresh random bytes.
    pub nonce: [u8; 32],
    /// What the sender's VM is ([`crate::ClusterConfig::layout`]), at most
    /// [`MAX_LAYOUT`] bytes.
    pub layout: String,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// I/O failed or timed out.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The connection closed mid-frame.
    #[error("truncated frame: the connection closed after {got} of {want} bytes")]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A length prefix beyond the pre-authentication limit.
    #[error("oversized handshake frame: {len} bytes (limit {MAX_HANDSHAKE_FRAME})")]
    Oversized {
        /// Announced length.
        len: usize,
    },
    /// Not a FragVisor peer.
    #[error("not a FragVisor peer: bad magic {0:02x?}")]
    BadMagic(Vec<u8>),
    /// A frame of the wrong kind or size.
    #[error("malformed handshake: {0}")]
    Malformed(String),
    /// Protocol version mismatch.
    #[error(
        "protocol version {theirs} is not supported (this node speaks version {PROTOCOL_VERSION})"
    )]
    Version {
        /// The peer's version.
        theirs: u16,
    },
    /// Another cluster.
    #[error("cluster id {theirs:#x} does not match this cluster ({ours:#x})")]
    Cluster {
        /// Theirs.
        theirs: u64,
        /// Ours.
        ours: u64,
    },
    /// The peer's idea of the cluster differs.
    #[error("peer claims node id {id} of {nodes} nodes; this cluster has {ours} nodes and expects {expected}")]
    Membership {
        /// Claimed id.
        id: NodeId,
        /// Claimed size.
        nodes: u16,
        /// Our size.
        ours: usize,
        /// What we expected.
        expected: String,
    },
    /// The two sides protect their links differently.
    #[error("transport security {theirs} does not match this node's {ours}")]
    Security {
        /// The peer's mode.
        theirs: TransportSecurity,
        /// Ours.
        ours: TransportSecurity,
    },
    /// An authenticated peer runs another VM (RAM layout, vCPUs).
    #[error("the nodes' VMs differ: node {theirs_id} has {theirs:?}, node {ours_id} has {ours:?}")]
    Layout {
        /// The peer.
        theirs_id: NodeId,
        /// The peer's layout.
        theirs: String,
        /// This node.
        ours_id: NodeId,
        /// Ours.
        ours: String,
    },
    /// The MAC did not verify.
    #[error("authentication failed: wrong cluster key")]
    BadKey,
    /// The peer refused us.
    #[error("refused by peer: {0}")]
    Rejected(String),
}

impl Hello {
    /// A Hello with a fresh nonce.
    pub fn new(cluster_id: u64, node_id: NodeId, nodes: u16, security: TransportSecurity) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster_id,
            node_id,
            nodes,
            security,
            nonce: random_nonce(),
            layout: String::new(),
        }
    }

    /// This Hello carrying `layout` (cut to [`MAX_LAYOUT`] bytes, see there).
    pub fn with_layout(mut self, layout: &str) -> Hello {
        self.layout = if layout.len() <= MAX_LAYOUT {
            layout.to_string()
        } else {
            let digest = ring::digest::digest(&ring::digest::SHA256, layout.as_bytes());
            let hex: String = digest.as_ref()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            // Room for "... #" and 16 hex digits.
            let mut cut = MAX_LAYOUT - 21;
            while !layout.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}... #{hex}", &layout[..cut])
        };
        self
    }

    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HELLO_LEN);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.cluster_id.to_le_bytes());
        b.extend_from_slice(&self.node_id.to_le_bytes());
        b.extend_from_slice(&self.nodes.to_le_bytes());
        b.push(self.security.wire());
        b.extend_from_slice(&self.nonce);
        b.push(self.layout.len() as u8);
        b.extend_from_slice(self.layout.as_bytes());
        b
    }

    /// Parses a Hello; checks magic and version.
    pub fn decode(b: &[u8]) -> Result<Hello, HandshakeError> {
        if b.len() < MAGIC.len() || b[..8] != MAGIC {
            return Err(HandshakeError::BadMagic(b[..b.len().min(8)].to_vec()));
        }
        if b.len() < 10 {
            return Err(HandshakeError::Malformed(format!(
                "hello of {} bytes",
                b.len()
            )));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != PROTOCOL_VERSION {
            return Err(HandshakeError::Version { theirs: version });
        }
        let want = HELLO_LEN + usize::from(b.get(HELLO_LEN - 1).copied().unwrap_or(0));
        if b.len() < HELLO_LEN || b.len() != want {
            return Err(HandshakeError::Malformed(format!(
                "hello of {} bytes, expected {}",
                b.len(),
                want.max(HELLO_LEN)
            )));
        }
        let layout = std::str::from_utf8(&b[HELLO_LEN..])
            .map_err(|_| HandshakeError::Malformed("layout is not UTF-8".into()))?
            .to_string();
        let security = TransportSecurity::from_wire(b[22]).ok_or_else(|| {
            HandshakeError::Malformed(format!("unknown transport security {:#x}", b[22]))
        })?;
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&b[23..55]);
        Ok(Hello {
            version,
            cluster_id: u64::from_le_bytes(b[10..18].try_into().expect("8 bytes")),
            node_id: u16::from_le_bytes([b[18], b[19]]),
            nodes: u16::from_le_bytes([b[20], b[21]]),
            security,
            nonce,
            layout,
        })
    }
}

/// Fills 32 bytes from the kernel's random source.
pub fn random_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    let mut filled = 0;
    while filled < n.len() {
        // SAFETY: writing at most `n.len() - filled` bytes into `n` from offset `filled`.
        let r = unsafe { libc::getrandom(n[filled..].as_mut_ptr().cast(), n.len() - filled, 0) };
        if r > 0 {
            filled += r as usize;
        }
    }
    n
}

/// The MAC a side sends: it covers the whole transcript and the sender's role.
pub fn auth_mac(key: &[u8], dialer: &Hello, acceptor: &Hello, from_dialer: bool) -> [u8; MAC_LEN] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"fragvisor-auth-v1");
    mac.update(&dialer.encode());
    mac.update(&acceptor.encode());
    mac.update(&[u8::from(from_dialer)]);
    mac.finalize().into_bytes().into()
}

/// Checks a MAC in constant time.
pub fn verify_mac(
    key: &[u8],
    dialer: &Hello,
    acceptor: &Hello,
    from_dialer: bool,
    got: &[u8],
) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"fragvisor-auth-v1");
    mac.update(&dialer.encode());
    mac.update(&acceptor.encode());
    mac.update(&[u8::from(from_dialer)]);
    mac.verify_slice(got).is_ok()
}

/// Writes one frame: `len: u32 LE` (channel + payload), channel, payload.
pub fn write_frame(w: &mut impl Write, channel: u8, payload: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(5 + payload.len());
    b.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    b.push(channel);
    b.extend_from_slice(payload);
    w.write_all(&b)?;
    w.flush()
}

/// Reads exactly `buf.len()` bytes; a close mid-way is `Truncated`.
pub fn read_full(
    r: &mut impl Read,
    buf: &mut [u8],
    want_total: usize,
    already: usize,
) -> Result<(), HandshakeError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(HandshakeError::Truncated {
                    got: already + got,
                    want: want_total,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HandshakeError::Io(e)),
        }
    }
    Ok(())
}

/// Reads one pre-authentication frame of at most [`MAX_HANDSHAKE_FRAME`] bytes.
/// A `Reject` from the peer becomes [`HandshakeError::Rejected`].
pub fn read_handshake_frame(r: &mut impl Read) -> Result<(u8, Vec<u8>), HandshakeError> {
    let mut hdr = [0u8; 4];
    read_full(r, &mut hdr, 4, 0)?;
    let len = u32::from_le_bytes(hdr) as usize;
    if len > MAX_HANDSHAKE_FRAME {
        // A Hello's magic read as a length is a sure sign of a non-peer; name
        // the bigger problem.
        return Err(HandshakeError::Oversized { len });
    }
    if len == 0 {
        return Err(HandshakeError::Malformed("empty frame".into()));
    }
    let mut body = vec![0u8; len];
    read_full(r, &mut body, len + 4, 4)?;
    let channel = body[0];
    let payload = body.split_off(1);
    if channel == CH_REJECT {
        return Err(HandshakeError::Rejected(
            String::from_utf8_lossy(&payload).into_owned(),
        ));
    }
    Ok((channel, payload))
}

/// Reads a frame that must be of kind `channel`.
pub fn expect_frame(r: &mut impl Read, channel: u8, what: &str) -> Result<Vec<u8>, HandshakeError> {
    let (ch, payload) = read_handshake_frame(r)?;
    if ch != channel {
        return Err(HandshakeError::Malformed(format!(
            "expected {what}, got a frame on channel {ch:#x}"
        )));
    }
    Ok(payload)
}

/// What the acceptor expects of a dialer.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Cluster id.
    pub cluster_id: u64,
    /// Our node id.
    pub local: NodeId,
    /// Cluster size.
    pub nodes: usize,
    /// What protects the links.
    pub security: TransportSecurity,
    /// This node's VM ([`crate::ClusterConfig::layout`]).
    pub layout: String,
}

impl Expect {
    /// What this node of `cfg` expects of its peers.
    pub fn for_node(cfg: &crate::ClusterConfig) -> Expect {
        Expect {
            cluster_id: cfg.cluster_id,
            local: cfg.node_id,
            nodes: cfg.nodes(),
            security: cfg.security,
            layout: cfg.layout.clone(),
        }
    }

    /// Checks that an authenticated peer runs the same VM.
    fn check_layout(&self, mine: &Hello, h: &Hello) -> Result<(), HandshakeError> {
        if h.layout != mine.layout {
            return Err(HandshakeError::Layout {
                theirs_id: h.node_id,
                theirs: h.layout.clone(),
                ours_id: mine.node_id,
                ours: mine.layout.clone(),
            });
        }
        Ok(())
    }

    /// Checks that a peer protects its links as this node does.
    fn check_security(&self, h: &Hello) -> Result<(), HandshakeError> {
        if h.security != self.security {
            return Err(HandshakeError::Security {
                theirs: h.security,
                ours: self.security,
            });
        }
        Ok(())
    }

    /// This side's Hello.
    fn hello(&self) -> Hello {
        Hello::new(
            self.cluster_id,
            self.local,
            self.nodes as u16,
            self.security,
        )
        .with_layout(&self.layout)
    }

    /// The link keys of an authenticated handshake, if the links are sealed.
    fn keys(&self, key: &[u8], dialer: &Hello, acceptor: &Hello, we_dialed: bool) -> Session {
        let peer = if we_dialed {
            acceptor.node_id
        } else {
            dialer.node_id
        };
        let keys = (self.security == TransportSecurity::Aead)
            .then(|| sealed::derive(key, &dialer.encode(), &acceptor.encode(), we_dialed));
        Session { peer, keys }
    }

    /// Checks the dialer's Hello: same cluster, same size, an id above ours.
    pub fn check_dialer(&self, h: &Hello) -> Result<(), HandshakeError> {
        if h.cluster_id != self.cluster_id {
            return Err(HandshakeError::Cluster {
                theirs: h.cluster_id,
                ours: self.cluster_id,
            });
        }
        let ok_id = usize::from(h.node_id) < self.nodes && h.node_id > self.local;
        if usize::from(h.nodes) != self.nodes || !ok_id {
            return Err(HandshakeError::Membership {
                id: h.node_id,
                nodes: h.nodes,
                ours: self.nodes,
                expected: format!(
                    "an id in {}..{} (higher ids dial lower ones)",
                    self.local + 1,
                    self.nodes
                ),
            });
        }
        Ok(())
    }

    /// Checks the acceptor's Hello: same cluster, same size, the id we dialed.
    pub fn check_acceptor(&self, h: &Hello, dialed: NodeId) -> Result<(), HandshakeError> {
        if h.cluster_id != self.cluster_id {
            return Err(HandshakeError::Cluster {
                theirs: h.cluster_id,
                ours: self.cluster_id,
            });
        }
        if usize::from(h.nodes) != self.nodes || h.node_id != dialed {
            return Err(HandshakeError::Membership {
                id: h.node_id,
                nodes: h.nodes,
                ours: self.nodes,
                expected: format!("node {dialed}"),
            });
        }
        Ok(())
    }
}

/// The reason logged for a refused connection: a read that timed out is
/// named as the handshake timeout.
pub fn refusal_reason(e: &HandshakeError) -> String {
    match e {
        HandshakeError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            format!(
                "handshake timed out after {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            )
        }
        e => e.to_string(),
    }
}

/// Sends a Reject with `reason`, ignoring errors (the peer may be gone).
pub fn send_reject(w: &mut impl Write, reason: &str) {
    let _ = write_frame(w, CH_REJECT, reason.as_bytes());
}

/// An authenticated connection: the peer, and the keys that seal its link
/// (`None` under `auth-only`).
#[derive(Debug)]
pub struct Session {
    /// The peer at the other end.
    pub peer: NodeId,
    /// The link's keys, when frames are sealed.
    pub keys: Option<LinkKeys>,
}

/// Runs the dialer's side over a connected stream.
pub fn dial(
    s: &mut (impl Read + Write),
    key: &[u8],
    exp: &Expect,
    peer: NodeId,
) -> Result<Session, HandshakeError> {
    let mine = exp.hello();
    write_frame(s, CH_HELLO, &mine.encode())?;
    let theirs = Hello::decode(&expect_frame(s, CH_HELLO, "hello")?)?;
    if let Err(e) = exp
        .check_acceptor(&theirs, peer)
        .and_then(|()| exp.check_security(&theirs))
    {
        send_reject(s, &e.to_string());
        return Err(e);
    }
    write_frame(s, CH_AUTH, &auth_mac(key, &mine, &theirs, true))?;
    let mac = expect_frame(s, CH_AUTH, "auth")?;
    if !verify_mac(key, &mine, &theirs, false, &mac) {
        send_reject(s, "authentication failed: wrong cluster key");
        return Err(HandshakeError::BadKey);
    }
    if let Err(e) = exp.check_layout(&mine, &theirs) {
        send_reject(s, &e.to_string());
        return Err(e);
    }
    Ok(exp.keys(key, &mine, &theirs, true))
}

/// Runs the acceptor's side; returns the authenticated dialer's session.
pub fn accept(
    s: &mut (impl Read + Write),
    key: &[u8],
    exp: &Expect,
) -> Result<Session, HandshakeError> {
    let first = expect_frame(s, CH_HELLO, "hello");
    let theirs = match first.and_then(|b| Hello::decode(&b)) {
        Ok(h) => h,
        Err(e) => {
            send_reject(s, &e.to_string());
            return Err(e);
        }
    };
    if let Err(e) = exp
        .check_dialer(&theirs)
        .and_then(|()| exp.check_security(&theirs))
    {
        send_reject(s, &e.to_string());
        return Err(e);
    }
    let mine = exp.hello();
    write_frame(s, CH_HELLO, &mine.encode())?;
    let mac = expect_frame(s, CH_AUTH, "auth")?;
    if !verify_mac(key, &theirs, &mine, true, &mac) {
        send_reject(s, "authentication failed: wrong cluster key");
        return Err(HandshakeError::BadKey);
    }
    // Only an authenticated peer learns this node's layout.
    if let Err(e) = exp.check_layout(&mine, &theirs) {
        send_reject(s, &e.to_string());
        return Err(e);
    }
    write_frame(s, CH_AUTH, &auth_mac(key, &theirs, &mine, false))?;
    Ok(exp.keys(key, &theirs, &mine, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn exp(local: NodeId) -> Expect {
        Expect {
            cluster_id: 42,
            local,
            nodes: 3,
            security: TransportSecurity::Aead,
            layout: String::new(),
        }
    }

    fn run_pair(
        dial_key: &'static [u8],
        accept_key: &'static [u8],
        dial_exp: Expect,
    ) -> (
        Result<Session, HandshakeError>,
        Result<Session, HandshakeError>,
    ) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(&mut b, accept_key, &exp(0)));
        let d = dial(&mut a, dial_key, &dial_exp, 0);
        drop(a);
        (d, t.join().unwrap())
    }

    #[test]
    fn matching_keys_authenticate() {
        let (d, a) = run_pair(b"k", b"k", exp(2));
        let (mut d, mut a) = (d.unwrap(), a.unwrap());
        assert_eq!((d.peer, a.peer), (0, 2));
        // Both sides derived the same keys, one per direction.
        let (dk, ak) = (d.keys.as_mut().unwrap(), a.keys.as_mut().unwrap());
        let mut f = (5u32 + sealed::TAG_LEN as u32).to_le_bytes().to_vec();
        f.extend_from_slice(b"\x01page");
        dk.seal.seal_frame(&mut f).unwrap();
        let hdr = f[..4].try_into().unwrap();
        let n = ak.open.open_frame(hdr, &mut f[4..]).unwrap();
        assert_eq!(&f[4..4 + n], b"\x01page");
    }

    #[test]
    fn auth_only_links_get_no_keys() {
        let mut e = exp(1);
        e.security = TransportSecurity::AuthOnly;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut ae = exp(0);
            ae.security = TransportSecurity::AuthOnly;
            accept(&mut b, b"k", &ae)
        });
        let d = dial(&mut a, b"k", &e, 0).unwrap();
        assert!(d.keys.is_none() && t.join().unwrap().unwrap().keys.is_none());
    }

    #[test]
    fn a_security_mismatch_is_refused_naming_both_modes() {
        let mut e = exp(1);
        e.security = TransportSecurity::AuthOnly;
        let (d, a) = run_pair(b"k", b"k", e);
        let msg = a.unwrap_err().to_string();
        assert_eq!(
            msg,
            "transport security auth-only does not match this node's aead"
        );
        assert!(d.unwrap_err().to_string().contains(&msg));
    }

    #[test]
    fn a_peer_of_the_previous_protocol_version_is_refused() {
        // A version-1 Hello (no security byte), as the last release sent.
        let mut v1 = MAGIC.to_vec();
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&42u64.to_le_bytes());
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&3u16.to_le_bytes());
        v1.extend_from_slice(&[0u8; 32]);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || accept(&mut b, b"k", &exp(0)));
        write_frame(&mut a, CH_HELLO, &v1).unwrap();
        let e = read_handshake_frame(&mut a).unwrap_err();
        assert_eq!(
            e.to_string(),
            "refused by peer: protocol version 1 is not supported (this node speaks version 2)"
        );
        assert!(matches!(
            t.join().unwrap(),
            Err(HandshakeError::Version { theirs: 1 })
        ));
    }

    #[test]
    fn wrong_key_is_refused_on_both_sides() {
        let (d, a) = run_pair(b"k1", b"k2", exp(1));
        assert!(matches!(a, Err(HandshakeError::BadKey)), "{a:?}");
        let msg = d.unwrap_err().to_string();
        assert!(msg.contains("wrong cluster key"), "{msg}");
    }

    #[test]
    fn other_cluster_is_refused() {
        let mut e = exp(1);
        e.cluster_id = 7;
        let (d, a) = run_pair(b"k", b"k", e);
        assert!(
            matches!(
                a,
                Err(HandshakeError::Cluster {
                    theirs: 7,
                    ours: 42
                })
            ),
            "{a:?}"
        );
        assert!(d.unwrap_err().to_string().contains("cluster id 0x7"));
    }

    #[test]
    fn a_peer_with_another_vm_is_refused_naming_both_layouts() {
        let mut e = exp(1);
        e.layout = "ram: pc.ram 256 MiB; vcpus 2 on nodes 0,1".into();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut ae = exp(0);
            ae.layout = "ram: pc.ram 128 MiB; vcpus 2 on nodes 0,1".into();
            accept(&mut b, b"k", &ae)
        });
        let d = dial(&mut a, b"k", &e, 0).unwrap_err().to_string();
        let a = t.join().unwrap().unwrap_err().to_string();
        assert_eq!(
            a,
            "the nodes' VMs differ: node 1 has \"ram: pc.ram 256 MiB; vcpus 2 on nodes 0,1\", \
             node 0 has \"ram: pc.ram 128 MiB; vcpus 2 on nodes 0,1\""
        );
        assert_eq!(d, format!("refused by peer: {a}"));
    }

    #[test]
    fn long_layouts_are_cut_but_still_differ() {
        let long = "x".repeat(400);
        let h = Hello::new(1, 1, 2, TransportSecurity::Aead).with_layout(&long);
        assert!(h.layout.len() <= MAX_LAYOUT, "{}", h.layout.len());
        let other = Hello::new(1, 1, 2, TransportSecurity::Aead).with_layout(&format!("{long}y"));
        assert_ne!(h.layout, other.layout);
        let back = Hello::decode(&h.encode()).unwrap();
        assert_eq!(back, h);
        assert!(h.encode().len() < MAX_HANDSHAKE_FRAME);
    }

    #[test]
    fn wrong_version_and_magic_are_named() {
        let mut h = Hello::new(1, 1, 2, TransportSecurity::Aead).encode();
        h[8] = 9;
        assert!(matches!(
            Hello::decode(&h),
            Err(HandshakeError::Version { theirs: 9 })
        ));
        assert!(matches!(
            Hello::decode(b"GET / HTTP/1.1"),
            Err(HandshakeError::BadMagic(_))
        ));
    }

    #[test]
    fn oversized_and_truncated_frames_are_refused() {
        let mut big: &[u8] = &[0xff, 0xff, 0xff, 0x7f, 1, 2, 3];
        assert!(matches!(
            read_handshake_frame(&mut big),
            Err(HandshakeError::Oversized { .. })
        ));
        let mut short: &[u8] = &[10, 0, 0, 0, CH_HELLO, 1, 2];
        assert!(matches!(
            read_handshake_frame(&mut short),
            Err(HandshakeError::Truncated { got: 7, want: 14 })
        ));
    }
}
