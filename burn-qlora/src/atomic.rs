//! Files written whole or not at all, so an interrupted save never leaves a half-written
//! checkpoint, adapter or model where a good one was.

use std::io;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically (see [`write_atomically_with`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomically_with(path, |temporary| std::fs::write(temporary, bytes))
}

/// Lets `write` fill a temporary file beside `path`, then flushes it to disk and renames it over
/// `path`. When `write` fails the temporary file is removed and `path` is left as it was.
pub fn write_atomically_with<E: From<io::Error>>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let temporary = temporary_path(path);
    let result = write(&temporary).and_then(|()| {
        std::fs::File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, path)?;
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// `dir/.name.partial`: hidden, in the same folder (a rename does not cross file systems).
fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.partial"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = std::env::temp_dir().join(format!("atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.bin");
        write_atomically(&path, b"old").unwrap();
        let failed: io::Result<()> = write_atomically_with(&path, |temporary| {
            std::fs::write(temporary, b"half")?;
            Err(io::Error::other("interrupted"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(
            !temporary_path(&path).exists(),
            "the temporary file is removed"
        );
        write_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
