//! The acceptor's handshake against whatever a stranger sends: the input
//! is everything the peer says. It must end in a session or an error,
//! never a panic, and write nothing before the peer's first frame.
#![no_main]

use std::io::{self, Read, Write};

use dsm_service::transport::handshake::{self, Expect, Hello};
use dsm_service::TransportSecurity;
use libfuzzer_sys::fuzz_target;

struct Peer<'a> {
    said: &'a [u8],
    heard: Vec<u8>,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.said.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.heard.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let exp = Expect {
        cluster_id: 42,
        local: 0,
        nodes: 3,
        security: TransportSecurity::Aead,
        layout: "ram: pc.ram 128 MiB".into(),
    };
    let mut peer = Peer {
        said: data,
        heard: Vec::new(),
    };
    let _ = handshake::accept(&mut peer, b"fuzz-cluster-key-0123456789", &exp);
    // The dialer's side against the same bytes as the acceptor's answers.
    let mut peer = Peer {
        said: data,
        heard: Vec::new(),
    };
    let dialer = Expect { local: 2, ..exp };
    let _ = handshake::dial(&mut peer, b"fuzz-cluster-key-0123456789", &dialer, 0);
    let _ = Hello::decode(data);
    let mut r = data;
    let _ = handshake::read_handshake_frame(&mut r);
});
