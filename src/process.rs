//! What a meshca process does to itself at start, before it reads anything secret.
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

#[cfg(test)]
mod tests {
    use super::*;

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
