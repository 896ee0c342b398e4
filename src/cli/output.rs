//! What a command writes: its report on stdout (a closed pipe ends it as SIGPIPE would),
//! one JSON object with `--output json`, and lines on stderr that never panic.

/// Writes one line of a command's report to stdout. A reader that stopped reading (`| head`,
/// `| grep -q`) ends the command quietly with the status a SIGPIPE would give (141), as
/// other Unix tools end, not with a panic; another write error is named on stderr.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::cli::output::stdout_failed(e)
        }
    }};
}

/// [`say`] without the line end.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = write!(out, $($arg)*).and_then(|()| out.flush()) {
            $crate::cli::output::stdout_failed(e)
        }
    }};
}

/// Writes a line to stderr, ignoring a failed write: with stderr's reader gone (`2>&1 |
/// tee` after tee died), eprintln! would panic, and the exit status would be an abort.
macro_rules! to_stderr {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Ends the process after stdout failed: silently for a closed pipe, else naming the error.
pub(crate) fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    to_stderr!("meshca: error: cannot write to stdout: {e}");
    std::process::exit(1)
}

/// Prints a command's one JSON object on stdout (`--output json`).
pub(crate) fn say_json(value: &serde_json::Value) {
    say!("{value}");
}

pub(crate) use {say, say_raw, to_stderr};
