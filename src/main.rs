//! `meshca`: the binary's entry. The command line and each subcommand's wiring are in
//! `cli`; everything they call is the library's.

mod cli;

use std::process::ExitCode;

use anyhow::Result;

use cli::agents::{EXIT_NOT_LEADER, NotLeader};
use cli::args::{
    AuditCommand, Command, FederationCommand, LogFormat, Output, RootCommand, TokenCommand,
    exit_on_usage_error, parse_cli, usage_error,
};
use cli::output::{say_json, to_stderr};
use meshca::config::RootCertificateTaken;

/// `root init` without `--force` or `--adopt` found the root already there (its
/// certificate file, the token's key or the Vault issuer) and made nothing: sysexits'
/// EX_CANTCREAT, so a playbook can tell "already there" from "broken".
const EXIT_ROOT_EXISTS: u8 = 73;

fn main() -> ExitCode {
    // Before anything else: a SIGHUP sent right after the start (a reload) must not end a
    // daemon whose own handler is not in place yet. Failing, it is said once logging is up.
    let held = meshca::signals::hold_hangups();
    let cli = parse_cli(std::env::args_os()).unwrap_or_else(|error| exit_on_usage_error(error));
    if !cli.command.is_daemon() {
        meshca::signals::release_hangups();
    }
    meshca::tlsutil::install_default_provider();
    init_logging(cli.log_format, &cli.log_level);
    if let Err(e) = held {
        tracing::warn!(error = %e, "cannot take SIGHUP over at start: one sent before the signer's reload handler is in place ends the process");
    }
    // Before any command reads a PIN, a Vault credential or a key. A failure is warned of,
    // not fatal: the calls only lower what the process may do, so only a sandbox that
    // forbids them (a seccomp profile answering EPERM) makes them fail, and refusing to
    // start there would trade a second line of defence for an outage of the CA.
    if let Err(e) = meshca::process::forbid_core_dumps() {
        tracing::warn!(
            "{e}: a crash could write this process's memory (PINs, tokens, keys) to a core file; set the limit to 0 where it runs (systemd LimitCORE=0, ulimit -c 0)"
        );
    }
    let json = matches!(cli.log_format, LogFormat::Json);
    let output = cli.output;
    if output == Output::Json && !cli.command.speaks_json() {
        usage_error(
            "",
            "--output json is for root show, verify, audit verify, serve --check, request and agent --once --target-dir",
        );
    }
    match run(cli.command, output) {
        Ok(code) => code,
        Err(e) => {
            let status = exit_status(&e);
            if output == Output::Json {
                // A script reading stdout learns of the failure there too; the log line
                // below stays on stderr.
                say_json(&serde_json::json!({"error": describe(&e), "exit_status": status}));
            }
            // Written whatever the log level: it is why the process ends.
            to_stderr!(
                "{}",
                meshca::logging::fatal_error_line(json, &describe(&e), status)
            );
            ExitCode::from(status)
        }
    }
}

/// 78 (the README's table) for a PIN or Vault credentials refused, by whichever command
/// presented them: a script retrying `root show` until it passes would spend an attempt
/// towards locking the token at each try. 1 for every other failure.
fn exit_status(e: &anyhow::Error) -> u8 {
    use meshca::backend::pkcs11::TokenError;
    use meshca::backend::vault::client::VaultError;
    use meshca::backend::vault::root::VaultRootError;
    use meshca::signer::server::{EXIT_PIN_REFUSED, StartError};
    let refused = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<TokenError>(),
            Some(TokenError::PinIncorrect { .. } | TokenError::PinLocked)
        ) || matches!(
            cause.downcast_ref::<VaultError>(),
            Some(VaultError::LoginRefused { .. })
        ) || matches!(
            cause.downcast_ref::<VaultRootError>(),
            Some(VaultRootError::Vault(VaultError::LoginRefused { .. }))
        )
    });
    let root_exists = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<RootCertificateTaken>(),
            Some(RootCertificateTaken::Exists(_))
        ) || matches!(
            cause.downcast_ref::<TokenError>(),
            Some(TokenError::KeyExists(_))
        ) || matches!(
            cause.downcast_ref::<VaultRootError>(),
            Some(VaultRootError::IssuerExists { .. })
        )
    });
    match e.downcast_ref::<StartError>() {
        Some(start) => start.exit_status(),
        None if refused => EXIT_PIN_REFUSED,
        None if root_exists => EXIT_ROOT_EXISTS,
        None if e.chain().any(|cause| cause.is::<NotLeader>()) => EXIT_NOT_LEADER,
        None => 1,
    }
}

/// The error and its causes, leaving out a cause whose text an outer message already quotes.
fn describe(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

fn init_logging(format: LogFormat, level: &str) {
    meshca::logging::init(
        matches!(format, LogFormat::Json),
        level,
        std::io::stderr,
        std::io::IsTerminal::is_terminal(&std::io::stderr())
            && meshca::logging::colour_allowed(
                std::env::var_os("NO_COLOR").as_deref(),
                std::env::var_os("TERM").as_deref(),
            ),
    );
}

/// Hands the parsed command to its module in `cli`.
fn run(command: Command, output: Output) -> Result<ExitCode> {
    let json = output == Output::Json;
    match command {
        Command::Token {
            command:
                TokenCommand::Init {
                    config,
                    so_pin_file,
                },
        } => cli::root::token_init(&config, &so_pin_file),
        Command::Root {
            command:
                RootCommand::Init {
                    config,
                    force,
                    adopt,
                },
        } => cli::root::init(&config, force, adopt),
        Command::Root {
            command: RootCommand::RestrictKey { config },
        } => cli::root::restrict_key(&config),
        Command::Root {
            command: RootCommand::Show { config },
        } => cli::root::show(&config, json),
        Command::Serve {
            config,
            listen,
            check: true,
            online,
        } => cli::serve::check(&config, listen, online, json),
        Command::Serve {
            config,
            listen,
            check: false,
            ..
        } => cli::serve::serve(&config, listen),
        Command::Request(args) => cli::bundle::request(args, json),
        Command::Verify { dir, root } => cli::bundle::verify(&dir, root, json),
        Command::Crds { component } => cli::agents::crds(component),
        Command::MeshController(args) => cli::agents::mesh_controller(args),
        Command::Agent(args) => cli::agents::agent(args, json),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    expect_hashes,
                },
        } => cli::audit::audit_verify(&files, &expect_hashes, json),
        Command::Federation {
            command:
                FederationCommand::Render {
                    virtual_mesh,
                    inventory,
                    out_dir,
                },
        } => cli::federation::render(&virtual_mesh, &inventory, &out_dir),
    }
}
