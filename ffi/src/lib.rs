//! C ABI for the patched QEMU.
