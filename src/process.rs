//! What a meshca process does to itself at start, before it reads anything secret, and
//! what it can tell of its own open files when a library fails without saying why.
//!
//! Every command may hold a secret in memory: a token's user PIN, Vault credentials and
//! tokens, a private key (the transport key, an intermediate's key made by the agent). A
//! crash (a segfault in a vendor's PKCS#11 module, the SIGSYS of a system call filter)
//! would otherwise write the process's memory to a core file, and systemd-coredump or
//! a container runtime keeps those on disk, readable by whoever reads crash reports.

/// Why core dumps could not be turned off.
#[derive(Debug, thiserror::Error)]
pub enum CoreDumpError {
    #[error("cannot set the core file size limit to 0 (setrlimit RLIMIT_CORE): {0}")]
    Limit(std::io::Error),
    #[error("cannot make the process undumpable (prctl PR_SET_DUMPABLE 0): {0}")]
    Dumpable(std::io::Error),
}

/// Turns core dumps off for this process: a core file size limit of 0, soft and hard (so
/// no child raises it again), and the process marked undumpable: the kernel then dumps
/// nothing, also not to a core_pattern pipe (whose helper is handed the memory whatever
/// the limit, and trusted to honour it). Undumpable also keeps other processes of the
/// same user from attaching with ptrace or reading its memory through /proc
/// (`/proc/<pid>/` becomes root's; its world-readable files, such as `status` and
/// `limits`, stay readable). Both are tried; the first failure is returned.
pub fn forbid_core_dumps() -> Result<(), CoreDumpError> {
    let limit = rlimit::setrlimit(rlimit::Resource::CORE, 0, 0).map_err(CoreDumpError::Limit);
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
    let dumpable = match unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong) } {
        0 => Ok(()),
        _ => Err(CoreDumpError::Dumpable(std::io::Error::last_os_error())),
    };
    limit.and(dumpable)
}

/// How this process stands against its open-file limit (RLIMIT_NOFILE), once it is used
/// up or nearly: a PKCS#11 module that cannot open a file (SoftHSM's object files, a
/// network HSM's socket) reports only a general error, and an operator reading it looks at
/// the token instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFilesUsedUp {
    /// Files open now; none when not even `/proc/self/fd` could be opened to count them.
    pub open: Option<u64>,
    /// The soft limit.
    pub limit: u64,
}

impl std::fmt::Display for OpenFilesUsedUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.open {
            Some(open) => write!(
                f,
                "this process has {open} of its {} open files in use (RLIMIT_NOFILE)",
                self.limit
            )?,
            None => write!(
                f,
                "this process cannot open another file: its {} open files (RLIMIT_NOFILE) are in use",
                self.limit
            )?,
        }
        f.write_str(
            " (see what holds them, ls -l /proc/<pid>/fd; raise the limit, systemd LimitNOFILE, or lower limits.max_connections)",
        )
    }
}

/// Whether `open` files are at `limit`, or so close that the call that failed may have
/// found none left (some have been closed since: connections end all the time).
pub fn open_files_near_limit(open: u64, limit: u64) -> bool {
    open.saturating_add((limit / 50).max(16)) >= limit
}

/// This process's open files, when they are used up or nearly; none otherwise, or when
/// the limit cannot be read.
pub fn open_files_used_up() -> Option<OpenFilesUsedUp> {
    let (limit, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?;
    let open = match std::fs::read_dir("/proc/self/fd") {
        // Counted with the directory's own descriptor: one more than before the call.
        Ok(entries) => Some(entries.count().saturating_sub(1) as u64),
        Err(e) if e.raw_os_error() == Some(libc::EMFILE) => None,
        Err(_) => return None,
    };
    let used_up = open.is_none_or(|open| open_files_near_limit(open, limit));
    used_up.then_some(OpenFilesUsedUp { open, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_are_near_the_limit_within_a_fiftieth_or_sixteen() {
        assert!(open_files_near_limit(512, 512));
        assert!(open_files_near_limit(496, 512));
        assert!(!open_files_near_limit(495, 512));
        assert!(open_files_near_limit(1004, 1024));
        assert!(!open_files_near_limit(1003, 1024));
        assert!(open_files_near_limit(65_536 - 1_310, 65_536));
        assert!(!open_files_near_limit(65_536 - 1_311, 65_536));
        assert!(open_files_near_limit(3, 8));
        assert!(open_files_near_limit(u64::MAX, u64::MAX));
        // The test process itself is far from its limit.
        assert_eq!(open_files_used_up(), None);
    }

    /// Run in the test process itself: it only lowers what this process may do.
    #[test]
    fn core_dumps_are_off_after_the_start() {
        forbid_core_dumps().unwrap();
        // SAFETY: PR_GET_DUMPABLE takes no argument and returns the flag.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }, 0);
        assert_eq!(rlimit::getrlimit(rlimit::Resource::CORE).unwrap(), (0, 0));
        // A second call (the limit already 0) succeeds too.
        forbid_core_dumps().unwrap();
    }
}
