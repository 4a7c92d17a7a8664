//! FragVisor DSM service.
