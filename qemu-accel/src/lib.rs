//! FragVisor accelerator logic that is not QEMU glue.
