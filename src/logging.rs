//! Logging for every command: tracing to stderr as text or JSON lines, and panics reported
//! through the same log, so a JSON log stays JSON lines when something panics; [`clip`],
//! which bounds text from outside before it is logged or recorded; and [`with_causes`],
//! an error's text with the causes its Display leaves out.

use std::panic::PanicHookInfo;

use tracing_subscriber::fmt::MakeWriter;

/// `text` cut to at most `max` bytes (at a character boundary), saying how long it was.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}

/// `error`'s message followed by its causes', each said once: libraries' Display often
/// hides the cause (reqwest and kube say "client error (SendRequest)" for a refused
/// connection and a timed-out read alike).
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// Crates whose log lines reach meshca's log, by the target their events carry: a bare
/// word in a filter names a target (`meshca`, `meshca::signer`, `kube_client`, ...), and
/// one under none of these matches nothing meshca logs.
const LOGGING_CRATES: [&str; 9] = [
    "meshca", "vaultrs", "rustify", "kube", "hyper", "rustls", "cryptoki", "reqwest", "tower",
];

/// A `--log-level` (RUST_LOG) filter meshca refuses.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("not a log filter (RUST_LOG syntax, e.g. info or meshca=debug): {0}")]
    Syntax(String),
    /// A bare word is a target to tracing, logged at every level, with everything else
    /// off: a misspelled level would turn every log line off, errors included.
    #[error(
        "'{0}' is neither a log level (trace, debug, info, warn, error, off) nor a target \
         meshca logs under ({targets}, each with its ::modules); a target's level is \
         written target=level, e.g. meshca=debug",
        targets = LOGGING_CRATES.join(", ")
    )]
    NeitherLevelNorTarget(String),
}

/// Checks a filter in RUST_LOG syntax before it is put in force: it must parse, and each
/// bare directive (no `=`, no span) must be a level or a target meshca logs under.
pub fn check_filter(text: &str) -> Result<(), FilterError> {
    tracing_subscriber::EnvFilter::try_new(text).map_err(|e| FilterError::Syntax(e.to_string()))?;
    for directive in text.split(',').map(str::trim) {
        let bare = !directive.is_empty() && !directive.contains(['=', '[']);
        if bare
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
            && !is_logging_target(directive)
        {
            return Err(FilterError::NeitherLevelNorTarget(directive.to_string()));
        }
    }
    Ok(())
}

/// `target` is one of [`LOGGING_CRATES`], a module of one (`meshca::signer`), or a crate
/// of its family (`kube_client`, `hyper_util`, `tower_http`).
fn is_logging_target(target: &str) -> bool {
    LOGGING_CRATES.iter().any(|name| {
        target
            .strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::") || rest.starts_with('_'))
    })
}

/// The target of the signer's `audit log head` line ([`crate::signer::audit::HeadAnchor`]):
/// let through at info whatever the filter, since `meshca audit verify --expect-hash`
/// needs it from the signer's log, and `--log-level warn` would otherwise drop it.
/// Named in the filter (`meshca::signer::audit::head=off`), it is left as named.
pub const AUDIT_HEAD_TARGET: &str = "meshca::signer::audit::head";

/// The filter put in force for `level` (RUST_LOG syntax, already checked): the Vault
/// client libraries off unless named, and the audit head line at info unless named.
fn effective_filter(level: &str) -> String {
    let mut filter = level.to_string();
    // The Vault client libraries log each failed call at ERROR level without context;
    // meshca reports those failures itself. Shown only when asked for by name.
    for quiet in ["vaultrs", "rustify"] {
        if !level.contains(quiet) {
            filter.push_str(&format!(",{quiet}=off"));
        }
    }
    // The most specific directive wins: this one over `warn`, `off` or `meshca=error`.
    if !level.contains(AUDIT_HEAD_TARGET) {
        filter.push_str(&format!(",{AUDIT_HEAD_TARGET}=info"));
    }
    filter
}

/// Whether a terminal may be given colours: not with `NO_COLOR` set to anything
/// (no-color.org) nor with `TERM=dumb` (a pty of Ansible or `kubectl exec -t` that shows
/// escape codes as text).
pub fn colour_allowed(no_color: Option<&std::ffi::OsStr>, term: Option<&std::ffi::OsStr>) -> bool {
    no_color.is_none_or(|value| value.is_empty()) && term.is_none_or(|term| term != "dumb")
}

/// Sets the global subscriber (`json` or text, `level` in RUST_LOG syntax: the CLI has
/// already chosen between its flag and RUST_LOG) writing to `writer`, and routes panics
/// into it. `ansi` colours text output.
pub fn init<W>(json: bool, level: &str, writer: W, ansi: bool)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let level = effective_filter(level);
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi && !json)
        // A log line stderr's reader is no longer there to take is dropped: tracing's
        // report of the failed write goes to stderr with eprintln!, whose panic (EPIPE)
        // the panic hook logs to stderr again, and the process aborts. A signer must
        // keep serving when its log pipe breaks.
        .log_internal_errors(false)
        .with_writer(writer);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    std::panic::set_hook(Box::new(log_panic));
}

/// The line a command that fails ends with: `meshca: error: ...` as text, or with
/// `--log-format json` one JSON object shaped like the log's events (timestamp, level,
/// message, target) plus the exit status, so that a log pipeline parsing JSON keeps the
/// line that says why the process stopped.
pub fn fatal_error_line(json: bool, message: &str, exit_status: u8) -> String {
    if !json {
        return format!("meshca: error: {message}");
    }
    serde_json::json!({
        "timestamp": crate::signer::audit::rfc3339(std::time::SystemTime::now()),
        "level": "ERROR",
        "message": format!("meshca: error: {message}"),
        "exit_status": exit_status,
        "target": "meshca",
    })
    .to_string()
}

/// One ERROR event per panic: its message, where, and on which thread (a token thread, a
/// runtime worker, ...); the backtrace too when RUST_BACKTRACE asks for one.
fn log_panic(info: &PanicHookInfo) {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)");
    let location = info
        .location()
        .map(|l| format!("{}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("unnamed");
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        tracing::error!(panic = message, location, thread, %backtrace, "panicked");
    } else {
        tracing::error!(panic = message, location, thread, "panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn a_bare_word_must_be_a_level_or_a_target_meshca_logs_under() {
        for accepted in [
            "info",
            "WARN",
            "Off",
            "meshca=debug,vaultrs=info",
            "meshca::signer=trace",
            "meshca::signer",
            "warn,meshca",
            "kube_client,hyper_util::client",
            "wran=debug",
            "info,",
        ] {
            assert!(check_filter(accepted).is_ok(), "{accepted} refused");
        }
        for misspelled in ["wran", "erorr", "debgu", "info,wran", "Meshca", "meshcaa"] {
            let refused = check_filter(misspelled).unwrap_err();
            assert!(
                matches!(refused, FilterError::NeitherLevelNorTarget(_)),
                "{misspelled}"
            );
        }
        let said = check_filter("info, wran").unwrap_err().to_string();
        assert!(
            said.starts_with(
                "'wran' is neither a log level (trace, debug, info, warn, error, off)"
            ),
            "{said}"
        );
        assert!(matches!(
            check_filter("meshca=debgu"),
            Err(FilterError::Syntax(_))
        ));
    }

    /// Log output kept in memory, for a subscriber of this thread only.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What an info line of the audit head's target and one of meshca's own leave in a
    /// log filtered by `level`.
    fn logged_under(level: &str) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let filter = tracing_subscriber::EnvFilter::try_new(effective_filter(level)).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: AUDIT_HEAD_TARGET, "audit log head");
            tracing::info!(target: "meshca::signer::server", "signer listening");
            tracing::info!(target: "meshca::signer::audit", "audit log was moved away");
        });
        let text = captured.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8(text).unwrap()
    }

    /// `meshca audit verify --expect-hash` needs the head line from the signer's log: a
    /// level that drops info lines (`warn`, `error`, even `off`) keeps that one.
    #[test]
    fn the_audit_head_line_passes_any_level_and_nothing_else_does() {
        for level in [
            "info",
            "warn",
            "error",
            "off",
            "meshca=warn",
            "meshca::signer=error",
        ] {
            let logged = logged_under(level);
            assert!(logged.contains("audit log head"), "{level}: {logged}");
            let others = level == "info";
            assert_eq!(
                logged.contains("signer listening"),
                others,
                "{level}: {logged}"
            );
            assert_eq!(
                logged.contains("audit log was moved away"),
                others,
                "{level}: {logged}"
            );
        }
        // Named, it is left as named.
        let logged = logged_under("warn,meshca::signer::audit::head=off");
        assert!(!logged.contains("audit log head"), "{logged}");
    }

    #[test]
    fn no_color_and_a_dumb_terminal_turn_colours_off() {
        use std::ffi::OsStr;
        let os = |s: &'static str| Some(OsStr::new(s));
        assert!(colour_allowed(None, os("xterm-256color")));
        assert!(colour_allowed(None, None));
        // no-color.org: set and not empty.
        assert!(colour_allowed(os(""), os("xterm")));
        assert!(!colour_allowed(os("1"), os("xterm")));
        assert!(!colour_allowed(None, os("dumb")));
    }

    #[test]
    fn an_error_is_said_with_each_of_its_causes_once() {
        let inner = Layer("operation timed out", None);
        let middle = Layer(
            "client error (SendRequest): operation timed out",
            Some(Box::new(inner)),
        );
        let outer = Layer("ServiceError", Some(Box::new(middle)));
        assert_eq!(
            with_causes(&outer),
            "ServiceError: client error (SendRequest): operation timed out"
        );
        assert_eq!(with_causes(&Layer("alone", None)), "alone");
    }
}
