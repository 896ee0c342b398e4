//! Istio's plugged-in CA files in a directory (`/etc/cacerts`, or a cluster's directory in
//! the demo), written as one atomic set.
//!
//! The layout is the one kubelet uses for Secret volumes, which istiod already reads:
//! the files live in a versioned directory `..<time>`, `..data` points at it, and each of
//! the four names is a symlink into `..data`. Replacing the set is a single rename of
//! `..data`, so a reader sees the old four files or the new four, never a mix, and a crash
//! at any point leaves one complete set. The one exception is the first write over plain
//! files (another tool's layout, taken over with adopt): the four names become symlinks
//! one rename at a time, so a reader (or a crash) in between sees some new files and some
//! old ones; the agent's next pass finds such a mix damaged and writes the set again.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use crate::fsutil::{sync_dir, write_atomic};
use crate::pki::bundle::{BundleFiles, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};

const DATA_LINK: &str = "..data";

/// The four files, in write order, with their modes.
fn entries(files: &BundleFiles) -> [(&'static str, &str, u32); 4] {
    [
        (CA_CERT, files.ca_cert.as_str(), 0o644),
        (CA_KEY, files.ca_key.as_str(), 0o600),
        (CERT_CHAIN, files.cert_chain.as_str(), 0o644),
        (ROOT_CERT, files.root_cert.as_str(), 0o644),
    ]
}

/// Largest cacerts file read: certificates and a key are a few kilobytes, a root bundle
/// during a root change a few more.
pub const MAX_FILE: u64 = 1024 * 1024;

/// Reads one cacerts file (following the symlinks, `name` to `..data/name` to the file in
/// the version directory) as text, at most [`MAX_FILE`] bytes: a file another tool put
/// there must not be read whole whatever its size. Only a regular file is read: a FIFO
/// would hold the reader (`meshca verify`, an agent's pass) until something wrote to it.
pub fn read_file(path: &Path) -> io::Result<String> {
    let file = crate::fsutil::open_regular(path)?;
    String::from_utf8(crate::fsutil::read_to_limit(file, MAX_FILE)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Reads the four files (following the symlinks), or says which is missing.
pub fn read_bundle(dir: &Path) -> io::Result<BundleFiles> {
    let read = |name: &str| {
        read_file(&dir.join(name))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(name).display())))
    };
    Ok(BundleFiles {
        ca_cert: read(CA_CERT)?,
        ca_key: read(CA_KEY)?,
        cert_chain: read(CERT_CHAIN)?,
        root_cert: read(ROOT_CERT)?,
    })
}

/// Writes the bundle into `dir` as one atomic set (see the module docs).
pub fn write_bundle(dir: &Path, files: &BundleFiles) -> io::Result<()> {
    write_bundle_with(dir, files, write_atomic)
}

/// [`write_bundle`], each file written by `write_file` (a failing one in tests).
fn write_bundle_with(
    dir: &Path,
    files: &BundleFiles,
    write_file: impl Fn(&Path, &[u8], u32) -> io::Result<()>,
) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(at(dir))?;
    // One writer at a time (the agent and a `meshca request` beside it): another's cleanup
    // would remove this write's version directory as a leftover, before or after its swap.
    // Released when the file closes, also when the process dies.
    let lock = fs::File::open(dir).map_err(at(dir))?;
    lock.lock().map_err(at(dir))?;
    let previous = fs::read_link(dir.join(DATA_LINK)).ok();

    let version = new_version_dir(dir).map_err(at(dir))?;
    let Some(version_name) = version.file_name().map(PathBuf::from) else {
        let _ = fs::remove_dir_all(&version);
        return Err(io::Error::other("version directory has no name"));
    };
    let swapped = entries(files)
        .into_iter()
        .try_for_each(|(name, contents, mode)| {
            let path = version.join(name);
            write_file(&path, contents.as_bytes(), mode).map_err(at(&path))
        })
        .and_then(|()| sync_dir(&version).map_err(at(&version)))
        .and_then(|()| replace_with_symlink(dir, DATA_LINK, &version_name));
    if let Err(e) = swapped {
        // Nothing refers to it: take its key away with it rather than leave a signed
        // intermediate's key behind at each failed pass.
        let _ = fs::remove_dir_all(&version);
        return Err(e);
    }

    // The new set is in force from here: a name that cannot be made a link (a directory
    // in its place, a file mounted over it) still leaves the other names linked, the old
    // version directory and the leftovers removed, and its error returned.
    let mut first_error = None;
    for (name, _, _) in entries(files) {
        let target = Path::new(DATA_LINK).join(name);
        if fs::read_link(dir.join(name)).ok().as_deref() != Some(target.as_path())
            && let Err(e) = replace_with_symlink(dir, name, &target)
        {
            first_error.get_or_insert(e);
        }
    }
    if let Err(e) = sync_dir(dir) {
        first_error.get_or_insert(at(dir)(e));
    }

    if let Some(old) = previous
        && old != version_name
        && is_version_dir_name(&old)
    {
        // Best effort: the old set is no longer referenced.
        let _ = fs::remove_dir_all(dir.join(old));
    }
    remove_leftovers(dir, &version_name);
    first_error.map_or(Ok(()), Err)
}

/// Puts the path into an I/O error: "cannot write DIR: Is a directory" would not say
/// which of the names in DIR failed.
fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Bytes the write probe writes: more than a bundle's four files take (a few kilobytes,
/// a root bundle during a root change a few more).
const PROBE_BYTES: usize = 64 * 1024;

/// Prefix of the write probe's temporary directory.
const PROBE_PREFIX: &str = ".meshca-probe-";

/// Whether a bundle could be written into `dir` now, found out before the signer is asked
/// for one: an intermediate that cannot be written would be signed (and audited) for
/// nothing at every retry. `dir` is created as a write would create it (an empty directory
/// reads as nothing installed); a temporary directory with a file of [`PROBE_BYTES`] in
/// it is written, synced and removed under the writers' lock (a read-only, full or
/// unwritable target fails here);
/// and none of the names a write replaces may be a directory (a rename onto one fails).
/// The error names the path that failed. Faults only the write itself can meet (a file
/// mounted over a name, an immutable file) are still met after the signature.
pub fn check_writable(dir: &Path) -> io::Result<()> {
    use std::io::Write;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(at(dir))?;
    for name in [DATA_LINK, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT] {
        let path = dir.join(name);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!(
                    "{}: a directory, which the link meshca writes cannot replace (remove it)",
                    path.display()
                ),
            ));
        }
    }
    // Under the writers' lock: a write finishing beside it removes probe directories as
    // leftovers (of a process killed while probing), this one's included.
    let lock = fs::File::open(dir).map_err(at(dir))?;
    lock.lock().map_err(at(dir))?;
    let probe = tempfile::Builder::new()
        .prefix(PROBE_PREFIX)
        .tempdir_in(dir)
        .map_err(at(dir))?;
    let file_path = probe.path().join("probe");
    fs::File::create(&file_path)
        .and_then(|mut file| {
            file.write_all(&vec![0u8; PROBE_BYTES])?;
            file.sync_all()
        })
        .map_err(at(&file_path))?;
    let probe_path = probe.path().to_path_buf();
    probe.close().map_err(at(&probe_path))
}

/// Removes, under the writers' lock, what a writer killed before its swap left in `dir`
/// (see [`remove_leftovers`]), and returns the version directories it removed. A pass
/// with nothing due calls it: a signed intermediate's key that was never installed would
/// otherwise stay on disk until the next renewal. A missing `dir` has none.
pub fn clean_up_leftovers(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let lock = match fs::File::open(dir) {
        Ok(lock) => lock,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at(dir)(e)),
    };
    lock.lock().map_err(at(dir))?;
    let current = fs::read_link(dir.join(DATA_LINK)).unwrap_or_default();
    Ok(remove_leftovers(dir, &current))
}

/// Removes what a process killed between creating a version directory and the swap left
/// behind: meshca's other version directories (each may hold a signed intermediate's key),
/// its temporary links and write probes; returns the version directories removed. Best
/// effort; nothing another tool named is touched.
fn remove_leftovers(dir: &Path, current: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let is_version = is_meshca_version_name(name);
        if is_dir && (is_version || is_probe_name(name)) && Path::new(name) != current {
            if fs::remove_dir_all(entry.path()).is_ok() && is_version {
                removed.push(entry.path());
            }
        } else if !is_dir && is_temporary_link_name(name) {
            let _ = fs::remove_file(entry.path());
        }
    }
    removed
}

/// `..<seconds>.<nanoseconds, 9 digits>.<attempt>`, as [`new_version_dir`] names them.
fn is_meshca_version_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("..") else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = rest.split('.').collect();
    matches!(parts[..], [secs, nanos, attempt] if digits(secs) && nanos.len() == 9 && digits(nanos) && digits(attempt))
}

/// `.meshca-probe-<random>`, as [`check_writable`] names its directory (left behind only
/// by a process killed while probing).
fn is_probe_name(name: &str) -> bool {
    name.strip_prefix(PROBE_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// `.<name>.tmp-<pid>`, as [`replace_with_symlink`] names them.
fn is_temporary_link_name(name: &str) -> bool {
    [DATA_LINK, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT]
        .iter()
        .any(|link| {
            name.strip_prefix('.')
                .and_then(|n| n.strip_prefix(link))
                .and_then(|n| n.strip_prefix(".tmp-"))
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Whether a `..data` target names a version directory inside the cacerts directory, the
/// only thing the cleanup may remove: one plain name beginning with `..` (meshca's
/// `..<time>.<n>`, kubelet's `..<date>`). A link edited by hand to `..`, `../elsewhere` or
/// an absolute path would otherwise have the cleanup remove a directory outside it.
fn is_version_dir_name(target: &Path) -> bool {
    let mut components = target.components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(name)), None) => {
            let name = name.to_string_lossy();
            name.len() > 2 && name.starts_with("..") && name != DATA_LINK
        }
        _ => false,
    }
}

/// Creates `..<unique time>` with mode 0755 (the key inside is 0600).
fn new_version_dir(dir: &Path) -> io::Result<PathBuf> {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    for attempt in 0..100u32 {
        let path = dir.join(format!(
            "..{}.{:09}.{attempt}",
            since.as_secs(),
            since.subsec_nanos()
        ));
        match fs::DirBuilder::new().mode(0o755).create(&path) {
            Ok(()) => {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                return Ok(path);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("cannot create a unique version directory"))
}

/// Atomically makes `dir/name` a symlink to `target` (whatever was there before but a
/// directory). The error names the path that failed; the temporary link is not left behind.
fn replace_with_symlink(dir: &Path, name: &str, target: &Path) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(at(&tmp))?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        at(&path)(e)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_fifo_in_place_of_a_file_is_refused_by_name_unopened() {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(dir.path(), &files("one")).unwrap();
        // In the version directory `..data` points to, as a Secret volume's files are.
        let version = dir
            .path()
            .join(fs::read_link(dir.path().join(DATA_LINK)).unwrap());
        fs::remove_file(version.join(CA_CERT)).unwrap();
        let fifo = crate::fsutil::tests::FedFifo::new(&version.join(CA_CERT), "cert from a pipe\n");
        let err = read_bundle(dir.path()).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().join(CA_CERT).display().to_string())
                && message.contains("a FIFO (named pipe), not a regular file"),
            "{message}"
        );
        // Not taken for garbled or missing: whoever reads it is told.
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // Let go while the FIFO is still at its path: its drop opens it to release the
        // writer, which would wait forever on a FIFO no longer there to be opened.
        drop(fifo);
        // A directory is no file either.
        fs::remove_file(version.join(CA_CERT)).unwrap();
        fs::create_dir(version.join(CA_CERT)).unwrap();
        let message = read_bundle(dir.path()).unwrap_err().to_string();
        assert!(
            message.contains("a directory, not a regular file"),
            "{message}"
        );
    }

    fn files(tag: &str) -> BundleFiles {
        BundleFiles {
            ca_cert: format!("cert {tag}\n"),
            ca_key: format!("key {tag}\n"),
            cert_chain: format!("chain {tag}\n"),
            root_cert: format!("root {tag}\n"),
        }
    }

    #[test]
    fn writes_replaces_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cacerts");
        write_bundle(&target, &files("one")).unwrap();
        assert_eq!(read_bundle(&target).unwrap().ca_key, "key one\n");
        let key_mode = fs::metadata(target.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);

        write_bundle(&target, &files("two")).unwrap();
        let bundle = read_bundle(&target).unwrap();
        assert_eq!(bundle.ca_cert, "cert two\n");
        assert_eq!(bundle.root_cert, "root two\n");
        // Only the current version directory, the ..data link and the four links remain.
        let mut names: Vec<String> = fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(names.contains(&"..data".to_string()));
    }

    #[test]
    fn what_a_killed_write_left_is_removed_by_the_next_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cacerts");
        write_bundle(&target, &files("one")).unwrap();
        // A version directory with a key, never swapped in; a temporary link; and names
        // that are not meshca's.
        let stray = target.join("..1764000000.000000000.0");
        fs::create_dir(&stray).unwrap();
        fs::write(stray.join(CA_KEY), "a signed intermediate's key").unwrap();
        std::os::unix::fs::symlink("..data/ca-key.pem", target.join(".ca-key.pem.tmp-4242"))
            .unwrap();
        for other in [
            "..2026_11_30_06_00_00.123",
            "..keep.me.0",
            ".ca-key.pem.tmp-x",
        ] {
            fs::create_dir(target.join(other)).unwrap();
        }
        write_bundle(&target, &files("two")).unwrap();
        let names = names_in(&target);
        assert!(
            !names
                .iter()
                .any(|n| n == "..1764000000.000000000.0" || n == ".ca-key.pem.tmp-4242"),
            "{names:?}"
        );
        for other in [
            "..2026_11_30_06_00_00.123",
            "..keep.me.0",
            ".ca-key.pem.tmp-x",
        ] {
            assert!(
                names.iter().any(|n| n == other),
                "{other} removed: {names:?}"
            );
        }
        assert_eq!(read_bundle(&target).unwrap().ca_key, "key two\n");
    }

    #[test]
    fn a_file_over_the_bound_is_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cacerts");
        write_bundle(&target, &files("one")).unwrap();
        // Another tool's file where a certificate should be (the link's target replaced).
        let link = fs::read_link(target.join(DATA_LINK)).unwrap();
        let big = "A".repeat(MAX_FILE as usize + 1);
        fs::write(target.join(link).join(CA_CERT), &big).unwrap();
        let err = read_bundle(&target).unwrap_err().to_string();
        assert!(
            err.contains("ca-cert.pem") && err.contains("larger than 1024 KiB"),
            "{}",
            &err[..err.len().min(200)]
        );
    }

    /// The names in `dir`, sorted.
    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_write_keeps_the_set_and_leaves_no_key_behind() {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(dir.path(), &files("one")).unwrap();
        let before = names_in(dir.path());
        // Fails after the key is written, as a full disk would.
        let failing = |path: &Path, contents: &[u8], mode: u32| {
            if path.ends_with(CERT_CHAIN) {
                return Err(io::Error::other("no space left on device"));
            }
            write_atomic(path, contents, mode)
        };
        let err = write_bundle_with(dir.path(), &files("two"), failing).unwrap_err();
        assert!(err.to_string().contains("no space left"), "{err}");
        assert_eq!(names_in(dir.path()), before);
        assert_eq!(read_bundle(dir.path()).unwrap(), files("one"));
    }

    /// meshca's version directories and temporary links in `dir`.
    fn meshca_names_in(dir: &Path) -> Vec<String> {
        names_in(dir)
            .into_iter()
            .filter(|n| is_meshca_version_name(n) || is_temporary_link_name(n))
            .collect()
    }

    #[test]
    fn a_data_link_that_cannot_be_replaced_leaves_no_version_directory_behind() {
        let dir = tempfile::tempdir().unwrap();
        // Another tool's directory where the link goes: the rename onto it fails.
        fs::create_dir(dir.path().join(DATA_LINK)).unwrap();
        for _ in 0..3 {
            let err = write_bundle(dir.path(), &files("one")).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(&dir.path().join(DATA_LINK).display().to_string()),
                "{message}"
            );
            assert_eq!(meshca_names_in(dir.path()), Vec::<String>::new());
        }
        assert_eq!(names_in(dir.path()), [DATA_LINK]);
    }

    #[test]
    fn a_name_that_cannot_be_linked_after_the_swap_is_named_and_the_rest_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        write_bundle(dir.path(), &files("one")).unwrap();
        // A directory where ca-cert.pem's link goes.
        fs::remove_file(dir.path().join(CA_CERT)).unwrap();
        fs::create_dir(dir.path().join(CA_CERT)).unwrap();
        for pass in ["two", "three"] {
            let err = write_bundle(dir.path(), &files(pass)).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(&dir.path().join(CA_CERT).display().to_string()),
                "{message}"
            );
            // Only the version directory in force is left, and no temporary link.
            let current = fs::read_link(dir.path().join(DATA_LINK)).unwrap();
            assert_eq!(
                meshca_names_in(dir.path()),
                [current.to_string_lossy().into_owned()]
            );
            assert_eq!(
                fs::read_to_string(dir.path().join(CA_KEY)).unwrap(),
                format!("key {pass}\n")
            );
        }
    }

    #[test]
    fn a_second_writer_waits_for_the_first_instead_of_removing_its_version_directory() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().to_path_buf();
        write_bundle(&target, &files("one")).unwrap();
        let (done, second_finished) = std::sync::mpsc::channel();
        let second = std::cell::RefCell::new(None);
        // While the first write fills its version directory, a second one runs (another
        // process, as far as the lock is concerned: it opens the directory itself).
        let interleaved = |path: &Path, contents: &[u8], mode: u32| {
            if path.ends_with(CA_KEY) {
                let target = target.clone();
                let done = done.clone();
                *second.borrow_mut() = Some(std::thread::spawn(move || {
                    let written = write_bundle(&target, &files("three"));
                    let _ = done.send(());
                    written
                }));
                // Bounded: with the lock the second write cannot finish before this one.
                let _ = second_finished.recv_timeout(std::time::Duration::from_secs(2));
            }
            write_atomic(path, contents, mode)
        };
        write_bundle_with(&target, &files("two"), interleaved).unwrap();
        let second = second.borrow_mut().take().unwrap();
        second.join().unwrap().unwrap();
        assert_eq!(read_bundle(&target).unwrap(), files("three"));
        assert_eq!(meshca_names_in(&target).len(), 1);
    }

    #[test]
    fn the_write_probe_waits_for_a_writer_whose_cleanup_would_remove_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().to_path_buf();
        write_bundle(&target, &files("one")).unwrap();
        // A writer in the middle of its write holds the lock (as write_bundle takes it).
        let writer = fs::File::open(&target).unwrap();
        writer.lock().unwrap();
        let (done, probed) = std::sync::mpsc::channel();
        let probe = {
            let target = target.clone();
            std::thread::spawn(move || {
                let checked = check_writable(&target);
                let _ = done.send(());
                checked
            })
        };
        // It cannot finish while the lock is held, however long this waits.
        assert!(
            probed
                .recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the probe ran beside a writer"
        );
        writer.unlock().unwrap();
        probe.join().unwrap().unwrap();
        assert_eq!(meshca_names_in(&target).len(), 1);
    }

    #[test]
    fn the_cleanup_removes_nothing_a_data_link_edited_by_hand_points_to_outside() {
        let parent = tempfile::tempdir().unwrap();
        let outside = parent.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "keep").unwrap();
        let target = parent.path().join("cacerts");
        let outside_abs = outside.to_string_lossy().into_owned();
        for link in ["..", "../outside", outside_abs.as_str(), "..data"] {
            write_bundle(&target, &files("one")).unwrap();
            let data = target.join(DATA_LINK);
            fs::remove_file(&data).unwrap();
            std::os::unix::fs::symlink(link, &data).unwrap();
            write_bundle(&target, &files("two")).unwrap();
            assert_eq!(read_bundle(&target).unwrap(), files("two"), "{link}");
            assert_eq!(
                fs::read_to_string(outside.join("keep")).unwrap(),
                "keep",
                "{link}"
            );
        }
        assert!(is_version_dir_name(Path::new("..2026_11_30_03_00_00.123")));
        assert!(!is_version_dir_name(Path::new("..")));
        assert!(!is_version_dir_name(Path::new("..a/b")));
    }

    #[test]
    fn plain_files_from_elsewhere_are_replaced_by_the_set() {
        let dir = tempfile::tempdir().unwrap();
        for name in [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT] {
            fs::write(dir.path().join(name), "old").unwrap();
        }
        write_bundle(dir.path(), &files("new")).unwrap();
        assert_eq!(read_bundle(dir.path()).unwrap().cert_chain, "chain new\n");
    }
}
