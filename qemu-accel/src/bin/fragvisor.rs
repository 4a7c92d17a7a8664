//! `fragvisor`: the aggregate-VM launcher. See `qemu_accel::launcher` and
//! docs/launcher.md.

use std::process::ExitCode;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FRAGVISOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    qemu_accel::launcher::main_from(std::env::args_os())
}
