//! The accelerator's option string, as a user types it after `-accel
//! fragvisor,`: split as QEMU splits it (`,` between options, `,,` for a
//! comma in a value), every option set, then the whole checked. Errors are
//! fine; panics are not. `key-file` is left out: it reads a file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qemu_accel::config::{ConfigBuilder, Engine};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let text = text.replace(",,", "\u{1}");
    let mut b = ConfigBuilder::new();
    for opt in text.split(',') {
        let opt = opt.replace('\u{1}', ",");
        let (name, value) = opt.split_once('=').unwrap_or((&opt, ""));
        if name == "key-file" {
            continue;
        }
        if b.set(name, value).is_ok() {
            let _ = b.get(name);
        }
    }
    for engine in [Engine::Kvm, Engine::Tcg] {
        let _ = b.build_with_env(engine, |_| None);
    }
});
