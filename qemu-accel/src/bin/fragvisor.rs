//! `fragvisor`: the aggregate-VM launcher. See `qemu_accel::launcher` and
//! docs/launcher.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    qemu_accel::logging::install(std::env::var("FRAGVISOR_LOG").ok().as_deref());
    qemu_accel::launcher::main_from(std::env::args_os())
}
