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

/// Sets the global subscriber (`json` or text, `level` in RUST_LOG syntax: the CLI has
/// already chosen between its flag and RUST_LOG) writing to `writer`, and routes panics
/// into it. `ansi` colours text output.
pub fn init<W>(json: bool, level: &str, writer: W, ansi: bool)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // The Vault client libraries log each failed call at ERROR level without context;
    // meshca reports those failures itself. Shown only when asked for by name.
    let mut level = level.to_string();
    for quiet in ["vaultrs", "rustify"] {
        if !level.contains(quiet) {
            level.push_str(&format!(",{quiet}=off"));
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi && !json)
        .with_writer(writer);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    std::panic::set_hook(Box::new(log_panic));
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
