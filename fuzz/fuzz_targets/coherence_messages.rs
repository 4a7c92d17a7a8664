//! Coherence frames (channel 1) from a peer: decoding never panics, and
//! whatever decodes encodes back to bytes that decode the same.
#![no_main]

use dsm_service::coherence::messages;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msgs) = messages::decode_all(data) {
        let mut out = Vec::new();
        for m in &msgs {
            m.encode(&mut out);
        }
        let again = messages::decode_all(&out).expect("re-encoded messages decode");
        assert_eq!(format!("{msgs:?}"), format!("{again:?}"));
    }
});
