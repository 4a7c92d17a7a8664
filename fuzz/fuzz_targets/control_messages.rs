//! DSM control messages (channel 2) from a peer: decoding never panics, and
//! whatever decodes encodes back to exactly the same bytes (the format has
//! one encoding per message).
#![no_main]

use dsm_service::node::control::ControlMsg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ControlMsg::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
