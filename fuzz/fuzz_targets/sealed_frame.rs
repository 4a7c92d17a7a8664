//! Opening sealed frames: arbitrary bytes never open (the key is not the
//! attacker's) and never panic; and what a sealer seals always opens to
//! itself.
#![no_main]

use dsm_service::transport::sealed::{self, TAG_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = b"fuzz-cluster-key-0123456789";
    let mut rx = sealed::derive(key, b"hello-d", b"hello-a", false);
    if data.len() >= 4 {
        let hdr: [u8; 4] = data[..4].try_into().unwrap();
        let mut body = data[4..].to_vec();
        assert!(
            rx.open.open_frame(hdr, &mut body).is_err(),
            "a forged frame opened"
        );
    }
    let mut tx = sealed::derive(key, b"hello-d", b"hello-a", true);
    let mut rx = sealed::derive(key, b"hello-d", b"hello-a", false);
    let mut frame = ((data.len() + TAG_LEN) as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(data);
    tx.seal.seal_frame(&mut frame).unwrap();
    let hdr: [u8; 4] = frame[..4].try_into().unwrap();
    let n = rx.open.open_frame(hdr, &mut frame[4..]).unwrap();
    assert_eq!(&frame[4..4 + n], data);
});
