//! Cluster keys: a fresh random key per run, in a private temporary file.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::LaunchError;

/// Random bytes in a generated key (written as hex, so the file holds 64
/// characters).
pub const KEY_BYTES: usize = 32;

/// A fresh key as hex text, from the kernel's random source.
pub fn random_key_hex() -> Result<String, LaunchError> {
    let mut buf = [0u8; KEY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| LaunchError::Runtime(format!("cannot read /dev/urandom: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Write a new random key to `path`, mode 0600; refuses to overwrite.
pub fn write_new_key(path: &Path) -> Result<(), LaunchError> {
    let hex = random_key_hex()?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            LaunchError::Runtime(format!("cannot create key file {}: {e}", path.display()))
        })?;
    writeln!(f, "{hex}")
        .map_err(|e| LaunchError::Runtime(format!("cannot write key file {}: {e}", path.display())))
}

/// A key generated for one run: a 0700 directory holding a 0600 key file,
/// both removed on drop.
#[derive(Debug)]
pub struct TempKey {
    dir: PathBuf,
    file: PathBuf,
}

impl TempKey {
    /// Make the directory and the key.
    pub fn create() -> Result<TempKey, LaunchError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("fragvisor-{}-{nanos:08x}", std::process::id()));
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| LaunchError::Runtime(format!("cannot create {}: {e}", dir.display())))?;
        let file = dir.join("cluster.key");
        let key = TempKey { dir, file };
        write_new_key(&key.file)?;
        Ok(key)
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.file
    }
}

impl Drop for TempKey {
    fn drop(&mut self) {
        // Best effort: a failure leaves a 0600 file in a 0700 directory.
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
