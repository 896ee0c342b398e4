//! File writes that never leave a half-written file behind: write a temporary file in the
//! same directory, fsync it, rename it over the target, fsync the directory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Atomically replaces `path` with `contents`, created with `mode` (e.g. 0o600 for keys).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".meshca-tmp-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Like [`write_atomic`], but the contents are streamed by `write` into a buffered temporary
/// file, so a large output is never held in memory. Nothing replaces `path` if `write` fails.
pub fn write_atomic_with<E: From<io::Error>>(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    let dir = parent_dir(path);
    let tmp = tempfile::Builder::new()
        .prefix(".meshca-tmp-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .tempfile_in(dir)?;
    let mut out = io::BufWriter::new(tmp);
    write(&mut out)?;
    let tmp = out.into_inner().map_err(|e| e.into_error())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(sync_dir(dir)?)
}

/// Atomically writes a file only its owner can read (mode 0600).
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Atomically writes a file anyone may read (mode 0644): certificates, public data.
pub fn write_public(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic(path, contents, 0o644)
}

/// Creates (or truncates) nothing: opens `path` for appending, creating it with `mode`.
pub fn open_append(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(mode)
        .open(path)
}

/// fsyncs a directory so a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Bytes an unprivileged writer can still use on the filesystem holding `path`
/// (`statvfs`: available blocks times the fragment size; the blocks kept for root do not
/// count).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the struct's size, which statvfs fills
    // when it returns 0.
    if unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

/// Reads at most `limit` bytes of a file, refusing larger ones (config and PEM inputs).
/// Its errors do not name the file: the caller does, once.
pub fn read_limited(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    read_to_limit(File::open(path)?, limit)
}

/// Opens a file for reading only if it is a regular file, saying what it is otherwise.
/// Looked at before the open, which would wait for a FIFO's writer (or have a device do
/// whatever its open does), and again on what was opened: without waiting, so a FIFO put
/// in the file's place in between is refused too.
pub fn open_regular(path: &Path) -> io::Result<File> {
    regular_file(&std::fs::metadata(path)?)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    regular_file(&file.metadata()?)?;
    Ok(file)
}

/// Refuses anything but a regular file, saying what it is.
fn regular_file(metadata: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = metadata.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}, not a regular file: meshca reads only regular files here"),
    ))
}

/// Reads `reader` to its end, refusing more than `limit` bytes: an input of any size is
/// never held whole.
pub fn read_to_limit(reader: impl Read, limit: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    reader.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        let size = if limit.is_multiple_of(1024) {
            format!("{} KiB", limit / 1024)
        } else {
            format!("{limit} bytes")
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {size}"),
        ));
    }
    Ok(buf)
}

/// Reads a UTF-8 text file of at most 1 MiB, with the path in any error.
pub fn read_text(path: &Path) -> Result<String, String> {
    let bytes =
        read_limited(path, 1 << 20).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    #[test]
    fn free_bytes_reads_the_filesystem_and_names_a_missing_path() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        let missing = free_bytes(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    /// A FIFO at a path, with a thread that writes `contents` into it once a reader opens
    /// it: a read that opens the FIFO gets them and returns (a test of a reader that must
    /// not open it fails rather than hangs). Dropping it lets the writer finish.
    pub(crate) struct FedFifo {
        path: PathBuf,
        writer: Option<std::thread::JoinHandle<()>>,
    }

    impl FedFifo {
        pub(crate) fn new(path: &Path, contents: &'static str) -> FedFifo {
            use std::os::unix::ffi::OsStrExt;
            let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
            let writer_path = path.to_path_buf();
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                // Waits for a reader.
                let mut fifo = OpenOptions::new().write(true).open(&writer_path).unwrap();
                let _ = fifo.write_all(contents.as_bytes());
            });
            FedFifo {
                path: path.to_path_buf(),
                writer: Some(writer),
            }
        }
    }

    impl Drop for FedFifo {
        fn drop(&mut self) {
            // A reader of its own (not waiting for a writer) lets a writer still waiting
            // in its open go on; kept open until the writer is done.
            let _reader = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.path);
            if let Some(writer) = self.writer.take() {
                let _ = writer.join();
            }
        }
    }

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_public(&path, b"three").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn streamed_atomic_write_leaves_the_old_file_when_writing_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.yaml");
        write_atomic_with(&path, 0o644, |w| w.write_all(b"first")).unwrap();
        let failed = write_atomic_with(&path, 0o644, |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("boom"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn read_limited_refuses_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'x'; 11]).unwrap();
        assert!(read_limited(&path, 10).is_err());
        assert_eq!(read_limited(&path, 11).unwrap().len(), 11);
    }

    /// "X: cannot read X: ..." said the path twice.
    #[test]
    fn a_file_that_cannot_be_read_is_named_once() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'x'; (1 << 20) + 1]).unwrap();
        for path in [dir.path().join("missing.toml"), big] {
            let message = read_text(&path).unwrap_err();
            let shown = path.display().to_string();
            assert_eq!(message.matches(&shown).count(), 1, "{message}");
            let message = crate::config::SignerConfig::load(&path)
                .unwrap_err()
                .to_string();
            assert_eq!(message.matches(&shown).count(), 1, "{message}");
        }
    }
}
