//! Runtime messages (forwarded I/O, interrupts, lifecycle, clock; channel
//! 16) from a peer: decoding never panics, and whatever decodes encodes to
//! bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qemu_accel::runtime::wire::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let again = Message::decode(&m.encode()).expect("a re-encoded message decodes");
        assert_eq!(m, again);
    }
});
