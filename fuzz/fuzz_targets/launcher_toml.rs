//! The launcher's VM file (`fragvisor run FILE.toml`): parsed and resolved
//! into a VM, as `fragvisor run` and `fragvisor print` do before they touch
//! any file. Errors are fine; panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qemu_accel::launcher::spec::{FileConfig, Overrides, VmSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = toml::from_str::<FileConfig>(text) {
        let _ = VmSpec::resolve(file, Overrides::default());
    }
});
