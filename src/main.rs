//! `meshca`: CLI wiring only. Each subcommand calls into the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};

use meshca::agent::client::{SignerClient, SignerEndpoint};
use meshca::agent::controller::{Controller, ControllerOptions};
use meshca::agent::directory::{self, DirOptions, DirOutcome};
use meshca::agent::election::LeaderLoop;
use meshca::agent::k8s::Kube;
use meshca::agent::metrics::{AgentMetrics, Exposition};
use meshca::agent::rotation::{self, RotationSettings};
use meshca::agent::{RequestOptions, cacerts, request_intermediate};
use meshca::backend::pkcs11;
use meshca::backend::vault::root::{self as vault_root, RootInitMode};
use meshca::config::{BackendKind, RootCertificateTaken, SignerConfig};
use meshca::pki::bundle::check_bundle;
use meshca::pki::keys::KeyType;
use meshca::pki::pem::decode_certificates;
use meshca::pki::profile::RootCa;
use meshca::policy::ObjectRef;
use meshca::secret::{SecretFile, SecretSource};
use meshca::signer::audit::{self, VerifyOutcome, rfc3339};

/// Writes one line of a command's report to stdout. A reader that stopped reading (`| head`,
/// `| grep -q`) ends the command quietly with the status a SIGPIPE would give (141), as
/// other Unix tools end, not with a panic; another write error is named on stderr.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            stdout_failed(e)
        }
    }};
}

/// [`say`] without the line end.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = write!(out, $($arg)*).and_then(|()| out.flush()) {
            stdout_failed(e)
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
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    to_stderr!("meshca: error: cannot write to stdout: {e}");
    std::process::exit(1)
}

const DAY_SECONDS: u64 = 86_400;
/// Shortest Lease: renewed every third of it, in whole seconds.
const MIN_LEASE_SECONDS: u64 = 3;
/// `--api-timeout-seconds` by default.
const API_TIMEOUT_SECONDS: u64 = meshca::agent::k8s::DEFAULT_API_TIMEOUT.as_secs();
/// `agent --once` whose bundle needed nothing but whose signer was unavailable (not
/// reached, or answered 429 or 5xx):
/// sysexits' EX_TEMPFAIL (try again later).
const EXIT_SIGNER_NOT_REACHED: u8 = 75;
/// `root init` without `--force` or `--adopt` found the root already there (its
/// certificate file, the token's key or the Vault issuer) and made nothing: sysexits'
/// EX_CANTCREAT, so a playbook can tell "already there" from "broken".
const EXIT_ROOT_EXISTS: u8 = 73;
/// A Kubernetes `--once` pass (agent, mesh controller) that another replica's Lease kept
/// from acting: before the pass (nothing written) or during it (the rest left to the
/// leader). Not 0: what the caller asked for was not done here; not 1: nothing is broken.
const EXIT_NOT_LEADER: u8 = 3;
/// `--stop-grace-seconds` by default: under Kubernetes' default (and deploy/'s)
/// terminationGracePeriodSeconds of 30, leaving time to give the Lease up.
const STOP_GRACE_SECONDS: u64 = 20;
const TEN_YEARS_SECONDS: u64 = 10 * 366 * DAY_SECONDS;

/// A number of seconds in `range`: durations are added to clocks, and a number past what
/// a clock holds (an operator's "never" of 2^64-1) would stop the process at its first use.
fn seconds(range: std::ops::RangeInclusive<u64>) -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(range)
}

#[derive(Parser)]
#[command(
    name = "meshca",
    version = meshca::VERSION,
    about = "External CA for multi-cluster Istio meshes: root key in a PKCS#11 token or Vault/OpenBao, policy enforced by the signer"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter (RUST_LOG syntax), e.g. info or meshca=debug; this flag wins over the
    /// RUST_LOG environment variable, which wins over the default.
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true, value_parser = log_filter)]
    log_level: String,
    /// What stdout gets: text, or one JSON object for a script (root show, verify, serve
    /// --check, request, agent --once --target-dir; an error is {"error", "exit_status"}).
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Prints a command's one JSON object on stdout (`--output json`).
fn say_json(value: &serde_json::Value) {
    say!("{value}");
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Initialize a token (SoftHSM or a test HSM slot) for the config's key URI.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Create or inspect the root CA.
    Root {
        #[command(subcommand)]
        command: RootCommand,
    },
    /// Run the signing daemon (mTLS HTTPS API).
    Serve {
        /// The signer's config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Address to listen on, overriding the config (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Check every file the start reads (config, VirtualMeshes, root certificate, TLS
        /// files, backend secrets, audit log place), print what was found and exit: 0 if
        /// they are fit for a start (with --listen, on that address). Contacts neither the
        /// token nor Vault.
        #[arg(long)]
        check: bool,
        /// With --check: also start the backend as `serve` does (log in to the token and
        /// sign a test challenge with the root's key, or log in to Vault and find the
        /// root's issuer), then close it. For a check before a restart.
        #[arg(long, requires = "check")]
        online: bool,
    },
    /// Generate an intermediate key here, have it signed, write Istio's cacerts files.
    Request(RequestArgs),
    /// Check a cacerts directory the way istiod does, plus meshca's profile.
    Verify {
        /// The cacerts directory: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem.
        dir: PathBuf,
        /// The root the bundle's chain must be anchored at (trusting it is not enough).
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Install and rotate the intermediate: in Kubernetes (VirtualMeshCertificateSigningRequest
    /// controller) or, with --target-dir, in a directory for istiod outside Kubernetes.
    Agent(AgentArgs),
    /// Print every CRD meshca defines (multi-document YAML).
    Crds {
        /// Only the CRDs of one component (what deploy/<component>/crds.yaml holds).
        #[arg(long = "for", value_enum)]
        component: Option<CrdComponent>,
    },
    /// Management plane: VirtualMeshes and Meshes in --namespace, agents' requests and
    /// federation objects in the member clusters.
    MeshController(MeshControllerArgs),
    /// Cross-cluster service federation.
    Federation {
        #[command(subcommand)]
        command: FederationCommand,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CrdComponent {
    Agent,
    MeshController,
}

#[derive(clap::Args)]
struct MeshControllerArgs {
    /// Namespace of the VirtualMeshes, Meshes, kubeconfig Secrets and the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "service-mesh-hub")]
    namespace: String,
    /// This replica's name in the Lease (default: $POD_NAME, $HOSTNAME).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "meshca-mesh-controller")]
    lease_name: String,
    /// Lease duration in seconds (at least 3, at most a day).
    #[arg(long, default_value_t = 30, value_parser = seconds(MIN_LEASE_SECONDS..=DAY_SECONDS))]
    lease_seconds: u64,
    /// Longest time between two passes (at most a day).
    #[arg(long, default_value_t = 30, value_parser = seconds(1..=DAY_SECONDS))]
    resync_seconds: u64,
    /// After a root change, retire the old roots this long after every member reports the
    /// new one (default one day: Istio's workload certificate lifetime; at most 10 years).
    #[arg(long, default_value_t = 86_400, value_parser = seconds(0..=TEN_YEARS_SECONDS))]
    retire_after_seconds: u64,
    /// Longest wait for an API server (this cluster's and each member's), per call: one
    /// that never answers fails its step instead of holding the pass (at most an hour).
    #[arg(long, default_value_t = API_TIMEOUT_SECONDS, value_parser = seconds(1..=3600))]
    api_timeout_seconds: u64,
    /// At SIGTERM, how long a pass under way may finish before it is cut short and the
    /// Lease given up; keep it below the pod's terminationGracePeriodSeconds (at most an
    /// hour).
    #[arg(long, default_value_t = STOP_GRACE_SECONDS, value_parser = seconds(0..=3600))]
    stop_grace_seconds: u64,
    /// One pass, then exit.
    #[arg(long)]
    once: bool,
    /// Serve Prometheus metrics (/metrics) and /healthz over plain HTTP on this address,
    /// e.g. 0.0.0.0:9102 (not with --once, which exits before anyone scrapes them).
    #[arg(long, value_name = "ADDR", conflicts_with = "once")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum FederationCommand {
    /// Write, per cluster, the Istio objects federation puts there: DIR/<cluster>.yaml.
    Render {
        /// File with one VirtualMesh document.
        #[arg(long)]
        virtual_mesh: PathBuf,
        /// Inventory YAML: the member clusters, their gateways and services.
        #[arg(long)]
        inventory: PathBuf,
        /// Output directory (created if missing).
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Initialize a free slot with the key URI's token label, the SO PIN and the user PIN
    /// from the config's pin_file/pin_env.
    Init {
        /// The signer's config (TOML): its [pkcs11] section names the token and the PIN.
        #[arg(long)]
        config: PathBuf,
        /// File holding the security officer PIN.
        #[arg(long)]
        so_pin_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum RootCommand {
    /// Generate the root key on the token (or inside Vault) and the root certificate.
    Init {
        /// The signer's config (TOML): backend, key and where the certificate goes.
        #[arg(long)]
        config: PathBuf,
        /// Replace an existing key of the same name (Vault: the old issuer is kept,
        /// renamed).
        #[arg(long)]
        force: bool,
        /// Vault only: take the existing issuer named by vault.issuer_ref as the root,
        /// after checking it against the policy, instead of generating one.
        #[arg(long, conflicts_with = "force")]
        adopt: bool,
    },
    /// Show the root certificate and the key's protection attributes.
    Show {
        /// The signer's config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// PKCS#11: set the root key's uses besides signing false (decrypt, unwrap,
    /// sign-recover, derive), as `root init` makes keys now.
    RestrictKey {
        /// The signer's config (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit log and say where it breaks. Give the files of a
    /// rotated log oldest first: each must continue the one before it.
    Verify {
        /// The log's files, oldest first (e.g. audit.log.1 audit.log), decompressed.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A line the log must still hold, by its hash: the `last_hash` of a signer's
        /// "audit log head" log line (kept off the host), or a last hash this command
        /// printed before. Fails if no line of the files hashes to it: lines were cut
        /// from the end, or it is another log's. Repeatable.
        #[arg(long = "expect-hash", value_name = "SHA256", value_parser = parse_line_hash)]
        expect_hashes: Vec<String>,
    },
}

/// `meshca audit verify`: each file's chain, each continuing the one before; with `json`,
/// one object on stdout, a break included (`intact: false`, with `error` and
/// `exit_status` as every command's error has them, and where it broke).
fn audit_verify(files: &[PathBuf], expect_hashes: &[String], json: bool) -> Result<ExitCode> {
    // The last hash and record time of the file before: the next file continues both.
    let mut after: Option<(String, Option<String>)> = None;
    let mut missing = expect_hashes.to_vec();
    let mut verified = Vec::new();
    let mut records_total = 0;
    for file in files {
        let follows = after.as_ref().map(|(last_hash, last_time)| audit::Follows {
            last_hash,
            last_time: last_time.as_deref(),
        });
        match audit::verify_file(file, follows, expect_hashes)? {
            VerifyOutcome::Intact {
                records,
                last_hash,
                continues_from,
                anchored,
                clock_steps_back,
                clock_steps_back_total,
                last_time,
            } => {
                if !json {
                    say!(
                        "meshca: audit log {} is intact: {records} records, last hash {last_hash}",
                        file.display()
                    );
                    if let Some(earlier) = &continues_from {
                        say!(
                            "  it continues an earlier file (rotated away) whose last line hashes to {earlier}: verify them together, oldest first, to check the link"
                        );
                    }
                    for (hash, line) in &anchored {
                        say!(
                            "  holds the expected line {hash}: line {line}, {} records after it",
                            records - line
                        );
                    }
                    for step in &clock_steps_back {
                        // Line 1 of a file after another follows that file's last record.
                        let before = if step.line == 1 && after.is_some() {
                            "the last record of the file before"
                        } else {
                            "the record before it"
                        };
                        say!(
                            "  warning: line {} is timed {}, {} s before {before} ({}): the signer's clock stepped back there: set back (what was issued after it carries dates too early), or put right after running ahead (what was issued before it carries dates too late); check the host's time synchronisation",
                            step.line,
                            step.time,
                            step.seconds,
                            step.previous_time
                        );
                    }
                    if clock_steps_back_total > clock_steps_back.len() {
                        say!(
                            "  warning: and {} more records timed over {} s before the record before them",
                            clock_steps_back_total - clock_steps_back.len(),
                            audit::CLOCK_STEP_NOTED.as_secs()
                        );
                    }
                }
                missing.retain(|m| !anchored.iter().any(|(hash, _)| hash == m));
                records_total += records;
                verified.push(serde_json::json!({
                    "file": file.display().to_string(),
                    "records": records,
                    "last_hash": last_hash,
                    "continues_from": continues_from,
                    "expected_lines": anchored.iter().map(|(hash, line)| serde_json::json!({
                        "hash": hash,
                        "line": line,
                        "records_after": records - line,
                    })).collect::<Vec<_>>(),
                    "clock_steps_back": clock_steps_back.iter().map(|step| serde_json::json!({
                        "line": step.line,
                        "time": step.time,
                        "previous_time": step.previous_time,
                        "seconds": step.seconds,
                    })).collect::<Vec<_>>(),
                    "clock_steps_back_total": clock_steps_back_total,
                }));
                after = Some((last_hash, last_time));
            }
            VerifyOutcome::Broken { line, problem } => {
                let error = format!(
                    "audit log {} breaks at line {line}: {problem}",
                    file.display()
                );
                if !json {
                    bail!("{error}");
                }
                let broken = serde_json::json!({
                    "file": file.display().to_string(),
                    "line": line,
                    "problem": problem,
                });
                // The files after the break were not read: whether they hold the
                // expected hashes is unknown, not "none missing".
                return audit_verify_failed(&error, verified, Some(broken), None);
            }
        }
    }
    if !missing.is_empty() {
        let error = format!(
            "no line of {} hashes to {}: lines were cut from the end of the log after that hash was recorded (or the hash is another log's, or of a file not given)",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            missing.join(", ")
        );
        if !json {
            bail!("{error}");
        }
        return audit_verify_failed(&error, verified, None, Some(&missing));
    }
    if json {
        say_json(&serde_json::json!({
            "intact": true,
            "records": records_total,
            "last_hash": after.map(|(last_hash, _)| last_hash),
            "files": verified,
        }));
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit verify --output json` for a log that does not verify: its object on stdout, the
/// error line on stderr, exit status 1. `missing` is None when the `--expect-hash` check
/// did not run (a break stopped the reading).
fn audit_verify_failed(
    error: &str,
    verified: Vec<serde_json::Value>,
    broken: Option<serde_json::Value>,
    missing: Option<&[String]>,
) -> Result<ExitCode> {
    say_json(&serde_json::json!({
        "intact": false,
        "error": error,
        "exit_status": 1,
        "files": verified,
        "broken": broken,
        "missing_expected_hashes": missing,
    }));
    to_stderr!("meshca: error: {error}");
    Ok(ExitCode::FAILURE)
}

/// A line's SHA-256 as the audit log writes it: 64 hex digits (either case is taken).
fn parse_line_hash(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err("not a line hash: expected 64 hex digits (a SHA-256), as `meshca audit verify` and the signer's \"audit log head\" line print it".into())
    }
}

/// A fraction of a certificate's lifetime in `range`, named by the flag it was given to.
fn fraction_in(text: &str, range: std::ops::RangeInclusive<f64>) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if range.contains(&value) => Ok(value),
        _ => Err(format!(
            "expected a fraction of the lifetime between {} and {}",
            range.start(),
            range.end()
        )),
    }
}

fn renew_fraction(text: &str) -> Result<f64, String> {
    fraction_in(text, rotation::RENEW_FRACTION_RANGE)
}

fn jitter_fraction(text: &str) -> Result<f64, String> {
    fraction_in(text, rotation::JITTER_FRACTION_RANGE)
}

/// A `--retire-root` (or `--accept-root`): a fingerprint in another form (SHA-1, a typo)
/// would match no root, and the root would stay trusted (or be refused) without a word.
///
/// openssl's whole line (`sha256 Fingerprint=3F:36:...`) is taken as it is printed: what
/// an operator pastes. Its name (`sha1 Fingerprint=`) does not decide: the digits do.
fn root_fingerprint(text: &str) -> Result<String, String> {
    let digits = text
        .split_once(" Fingerprint=")
        .map_or(text, |(_, digits)| digits);
    rotation::parse_sha256_fingerprint(digits.trim()).map_err(|e| e.to_string())
}

/// A `--signer` URL, refused at once rather than after the TLS files are read.
fn signer_url(text: &str) -> Result<String, String> {
    meshca::agent::client::check_signer_url(text).map(|()| text.to_string())
}

/// Ends the process as clap ends it on a usage error (usage line, exit 2), for a mistake
/// only the combination of a subcommand's flags shows.
fn usage_error(subcommand: &str, message: impl std::fmt::Display) -> ! {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    // Gives the subcommand its full name ("meshca agent") for the usage line.
    cli.build();
    let kind = clap::error::ErrorKind::ArgumentConflict;
    let error = match cli.find_subcommand_mut(subcommand) {
        Some(command) => command.error(kind, message),
        None => cli.error(kind, message),
    };
    exit_on_usage_error(error)
}

/// The command line, parsed, with what clap alone cannot refuse: a Kubernetes-mode flag
/// given to a directory-mode agent (`--target-dir`) is refused by name rather than left
/// unused. Only from the command line: `POD_NAMESPACE` and `POD_NAME` are in a pod's
/// environment whatever mode its agent runs in.
fn parse_cli<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};
    const KUBERNETES_ONLY: [(&str, &str); 6] = [
        ("namespace", "--namespace"),
        ("identity", "--identity"),
        ("lease_name", "--lease-name"),
        ("lease_seconds", "--lease-seconds"),
        ("api_timeout_seconds", "--api-timeout-seconds"),
        ("stop_grace_seconds", "--stop-grace-seconds"),
    ];
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    if let Some(("agent", agent)) = matches.subcommand()
        && agent.value_source("target_dir").is_some()
    {
        let given: Vec<&str> = KUBERNETES_ONLY
            .iter()
            .filter(|(id, _)| agent.value_source(id) == Some(ValueSource::CommandLine))
            .map(|(_, flag)| *flag)
            .collect();
        if !given.is_empty() {
            let message = format!(
                "{} {} for Kubernetes mode: a directory-mode agent (--target-dir) reads no API server and takes no Lease",
                given.join(", "),
                if given.len() == 1 { "is" } else { "are" }
            );
            let kind = clap::error::ErrorKind::ArgumentConflict;
            return Err(match command.find_subcommand_mut("agent") {
                Some(agent) => agent.error(kind, message),
                None => command.error(kind, message),
            });
        }
    }
    Ok(cli)
}

/// Ends the process on clap's error, as clap does (exit 2; help and version print to
/// stdout and exit 0), but as one JSON line when the command line asks for JSON logs:
/// whatever reads the log as JSON lines must get this line too.
fn exit_on_usage_error(error: clap::Error) -> ! {
    if error.use_stderr() && json_logs_requested(std::env::args_os()) {
        to_stderr!(
            "{}",
            meshca::logging::fatal_error_line(true, &usage_error_message(&error), 2)
        );
        std::process::exit(2);
    }
    error.exit()
}

/// `--log-format json` (or `=json`) anywhere on a command line that clap could not parse.
fn json_logs_requested(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    let mut previous_was_flag = false;
    for arg in args {
        if arg == "--" {
            return false;
        }
        if arg == "--log-format=json" || (previous_was_flag && arg == "json") {
            return true;
        }
        previous_was_flag = arg == "--log-format";
    }
    false
}

/// clap's message without its `error: ` prefix and usage block: the first paragraph,
/// on one line.
fn usage_error_message(error: &clap::Error) -> String {
    use clap::error::ErrorKind;
    // A command group without its subcommand renders the group's help, whose first
    // paragraph is its description: name what is missing instead.
    if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let rendered = error.render().to_string();
        // "Usage: meshca root [OPTIONS] <COMMAND>": the words before the first bracket.
        let group: Vec<&str> = rendered
            .lines()
            .find_map(|line| line.strip_prefix("Usage: "))
            .unwrap_or("this command")
            .split_whitespace()
            .take_while(|word| !word.starts_with(['[', '<']))
            .collect();
        // Its subcommands, from the command definition itself.
        let mut command = <Cli as clap::CommandFactory>::command();
        for name in group.iter().skip(1) {
            match command.find_subcommand(name) {
                Some(sub) => command = sub.clone(),
                None => break,
            }
        }
        let subcommands: Vec<String> = command
            .get_subcommands()
            .map(|sub| sub.get_name().to_string())
            .collect();
        let group = group.join(" ");
        return format!(
            "{group} needs a subcommand: {}",
            if subcommands.is_empty() {
                "see --help".to_string()
            } else {
                subcommands.join(", ")
            }
        );
    }
    let rendered = error.render().to_string();
    let first = rendered.split("\n\n").next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    first.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How a cluster reaches the signer over mTLS (`meshca request` and `meshca agent`).
#[derive(clap::Args)]
struct ClientTlsArgs {
    /// CA bundle that verifies the signer's server certificate.
    #[arg(long)]
    ca_cert: PathBuf,
    /// This cluster's client certificate.
    #[arg(long)]
    client_cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    client_key: PathBuf,
}

impl ClientTlsArgs {
    fn endpoint(&self, signer: &str) -> SignerEndpoint {
        SignerEndpoint {
            url: signer.to_string(),
            ca: self.ca_cert.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
        }
    }

    fn signer_client(&self, signer: &str) -> Result<SignerClient> {
        Ok(self.endpoint(signer).connect()?)
    }
}

/// A client key other users can read, named once as a command starts (the agents read the
/// key again for each pass; a warning each time would bury the rest of their log).
fn warn_of_open_key(open: Option<&meshca::tlsutil::KeyReadableByOthers>) {
    if let Some(open) = open {
        tracing::warn!(key = %open.path.display(), "{open}");
    }
}

#[derive(clap::Args)]
struct RequestArgs {
    /// Signer base URL, e.g. https://127.0.0.1:8443
    #[arg(long, value_parser = signer_url)]
    signer: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// <namespace>/<name> of the virtual mesh.
    #[arg(long)]
    virtual_mesh: ObjectRef,
    /// <namespace>/<name> of this cluster's mesh.
    #[arg(long)]
    mesh: ObjectRef,
    /// Key type of the intermediate (default: the first of ecdsa-p256, ecdsa-p384,
    /// rsa2048, rsa3072, rsa4096 the policy accepts).
    #[arg(long)]
    key_type: Option<KeyType>,
    /// Ask for a shorter lifetime than the policy's maximum.
    #[arg(long)]
    ttl_seconds: Option<u64>,
    /// Directory to write ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem into.
    #[arg(long)]
    out_dir: PathBuf,
    /// Replace files in DIR that meshca did not write (their roots stay trusted).
    #[arg(long)]
    adopt: bool,
    /// SHA-256 of a root to accept from the signer (repeatable; default: any). A signer
    /// whose root is not listed is asked for nothing; an announced root not listed is
    /// left out of root-cert.pem.
    #[arg(long = "accept-root", value_name = "SHA256", value_parser = root_fingerprint)]
    accept_roots: Vec<String>,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Directory mode: keep Istio's cacerts files in DIR (e.g. /etc/cacerts) instead of
    /// reconciling VirtualMeshCertificateSigningRequests.
    #[arg(long, value_name = "DIR", requires_all = ["signer", "virtual_mesh", "mesh"])]
    target_dir: Option<PathBuf>,
    /// One pass, then exit (non-zero when it failed).
    #[arg(long)]
    once: bool,
    /// Directory mode: signer base URL, e.g. https://127.0.0.1:8443
    #[arg(long, requires = "target_dir", value_parser = signer_url)]
    signer: Option<String>,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Directory mode: <namespace>/<name> of the virtual mesh.
    #[arg(long, requires = "target_dir")]
    virtual_mesh: Option<ObjectRef>,
    /// Directory mode: <namespace>/<name> of this cluster's mesh.
    #[arg(long, requires = "target_dir")]
    mesh: Option<ObjectRef>,
    /// Directory mode: key type of the intermediate (default: the policy's first).
    #[arg(long, requires = "target_dir")]
    key_type: Option<KeyType>,
    /// Directory mode: ask for a shorter lifetime than the policy's maximum.
    #[arg(long, requires = "target_dir")]
    ttl_seconds: Option<u64>,
    /// Directory mode: replace files meshca did not write.
    #[arg(long, requires = "target_dir")]
    adopt: bool,
    /// Directory mode: renew after this fraction of the lifetime (0.1 to 0.95).
    #[arg(
        long,
        default_value_t = rotation::DEFAULT_RENEW_FRACTION,
        requires = "target_dir",
        value_parser = renew_fraction
    )]
    renew_fraction: f64,
    /// Directory mode: renew up to this fraction of the lifetime earlier, fixed per serial
    /// (0 to 0.5, below --renew-fraction).
    #[arg(
        long,
        default_value_t = rotation::DEFAULT_JITTER_FRACTION,
        requires = "target_dir",
        value_parser = jitter_fraction
    )]
    jitter_fraction: f64,
    /// Directory mode: SHA-256 of an old root to drop from root-cert.pem (repeatable): 64
    /// hex digits, bare or in colon-separated pairs (openssl x509 -noout -fingerprint
    /// -sha256).
    #[arg(
        long = "retire-root",
        value_name = "SHA256",
        requires = "target_dir",
        value_parser = root_fingerprint
    )]
    retire_roots: Vec<String>,
    /// Directory mode: SHA-256 of a root to accept from the signer (repeatable, same forms
    /// as --retire-root). Default: any root (trust on first use, and whatever the signer
    /// announces); set it in production. A signer whose root is not listed is asked for
    /// nothing; an announced root not listed is left out of root-cert.pem.
    #[arg(
        long = "accept-root",
        value_name = "SHA256",
        requires = "target_dir",
        value_parser = root_fingerprint
    )]
    accept_roots: Vec<String>,
    /// Longest time between two looks (and the cap of the retry backoff; at most a day).
    #[arg(long, default_value_t = 300, value_parser = seconds(1..=DAY_SECONDS))]
    resync_seconds: u64,
    /// Kubernetes mode: namespace of the requests and of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "service-mesh-hub")]
    namespace: String,
    /// Kubernetes mode: this replica's name in the Lease (default: $POD_NAME, $HOSTNAME).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Kubernetes mode: name of the leader-election Lease.
    #[arg(long, default_value = "meshca-agent")]
    lease_name: String,
    /// Kubernetes mode: Lease duration in seconds (at least 3, at most a day).
    #[arg(long, default_value_t = 30, value_parser = seconds(MIN_LEASE_SECONDS..=DAY_SECONDS))]
    lease_seconds: u64,
    /// Kubernetes mode: longest wait for the API server, per call: one that never answers
    /// fails the pass instead of holding it (at most an hour).
    #[arg(long, default_value_t = API_TIMEOUT_SECONDS, value_parser = seconds(1..=3600))]
    api_timeout_seconds: u64,
    /// Kubernetes mode: at SIGTERM, how long a pass under way may finish before it is cut
    /// short and the Lease given up; keep it below the pod's
    /// terminationGracePeriodSeconds (at most an hour).
    #[arg(long, default_value_t = STOP_GRACE_SECONDS, value_parser = seconds(0..=3600))]
    stop_grace_seconds: u64,
    /// Serve Prometheus metrics (/metrics) and /healthz over plain HTTP on this address,
    /// e.g. 0.0.0.0:9102 (not with --once, which exits before anyone scrapes them).
    #[arg(long, value_name = "ADDR", conflicts_with = "once")]
    metrics_listen: Option<SocketAddr>,
}

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

/// A Kubernetes `--once` pass another replica's Lease kept from acting (exit
/// [`EXIT_NOT_LEADER`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NotLeader(&'static str);

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

/// A `--log-level` tracing can use: a typo is refused by name, not replaced by `info` nor
/// read as a target that turns every line off.
fn log_filter(text: &str) -> Result<String, String> {
    meshca::logging::check_filter(text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Loads a signer config and applies its module environment. Must run before any thread
/// is started: it may set SOFTHSM2_CONF, which the PKCS#11 module reads.
fn load_config(path: &Path) -> Result<SignerConfig> {
    let config = SignerConfig::load(path)?;
    if let Some(conf) = config
        .pkcs11
        .as_ref()
        .and_then(|p| p.softhsm2_conf.as_ref())
    {
        // SAFETY: called from main before the runtime or any other thread exists.
        unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
    }
    Ok(config)
}

fn pkcs11_settings(config: &SignerConfig) -> Result<&meshca::config::Pkcs11Settings> {
    config.pkcs11.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: no [pkcs11] section (this command is for the pkcs11 backend)",
            config.path.display()
        )
    })
}

fn vault_settings(config: &SignerConfig) -> Result<&meshca::backend::vault::config::VaultSettings> {
    config
        .vault
        .as_ref()
        .ok_or_else(|| anyhow!("{}: no [vault] section", config.path.display()))
}

/// The lines `root init` prints about the root it made or adopted, whatever the backend.
fn print_new_root(root: &meshca::pki::profile::RootCa, config: &SignerConfig) {
    say!("  subject      {}", root.subject);
    say!("  not after    {}", rfc3339(root.not_after));
    say!("  sha256       {}", root.fingerprint_sha256);
    say!("  certificate  {}", config.root.certificate.display());
}

/// What `request` and `agent --once` installed (or found) in `dir`, for `--output json`.
/// The intermediate's SHA-256 is of the ca-cert.pem now in `dir`.
fn installed_json(
    dir: &Path,
    s: &meshca::pki::bundle::BundleSummary,
    roots_changed: bool,
) -> serde_json::Value {
    let sha256 = std::fs::read_to_string(dir.join(meshca::pki::bundle::CA_CERT))
        .ok()
        .and_then(|pem| decode_certificates(&pem).ok())
        .and_then(|certs| certs.first().map(meshca::pki::bundle::fingerprint));
    serde_json::json!({
        "dir": dir.display().to_string(),
        "intermediate": {
            "subject": s.subject,
            "issuer": s.issuer,
            "serial": s.serial,
            "sha256": sha256,
            "key_type": s.key,
            "not_before": rfc3339(s.not_before),
            "not_after": rfc3339(s.not_after),
        },
        "root_sha256": s.anchor_fingerprint,
        "trusted_roots": s.root_fingerprints,
        // True: istiod takes the new root set only when it starts again.
        "roots_changed": roots_changed,
    })
}

/// A bundle's findings on one line: the only one as it is, several numbered.
fn list_findings(findings: &[meshca::pki::bundle::BundleError]) -> String {
    match findings {
        [only] => only.to_string(),
        _ => {
            let numbered: Vec<String> = findings
                .iter()
                .enumerate()
                .map(|(index, finding)| format!("({}) {finding}", index + 1))
                .collect();
            format!("{} problems: {}", findings.len(), numbered.join("; "))
        }
    }
}

/// `verify --output json`: the files read, the findings (an error each, every one found),
/// the result, and the certificates of cert-chain.pem and root-cert.pem.
fn verify_json(
    dir: &Path,
    files: &meshca::pki::bundle::BundleFiles,
    verified: &Result<meshca::pki::bundle::BundleSummary, Vec<meshca::pki::bundle::BundleError>>,
) -> serde_json::Value {
    use meshca::pki::bundle::{self, BundleError};
    let certificates = |pem: &str| -> Vec<serde_json::Value> {
        decode_certificates(pem)
            .unwrap_or_default()
            .iter()
            .map(|cert| {
                let tbs = cert.tbs_certificate();
                serde_json::json!({
                    "subject": tbs.subject().to_string(),
                    "issuer": tbs.issuer().to_string(),
                    "serial": meshca::pki::profile::serial_hex(tbs.serial_number()),
                    "sha256": bundle::fingerprint(cert),
                    "not_before": rfc3339(tbs.validity().not_before.to_system_time()),
                    "not_after": rfc3339(tbs.validity().not_after.to_system_time()),
                })
            })
            .collect()
    };
    let findings: Vec<serde_json::Value> = match verified {
        Ok(_) => Vec::new(),
        Err(findings) => findings
            .iter()
            .map(|e| {
                let file = match e {
                    BundleError::File { file, .. } => Some(*file),
                    BundleError::KeyMismatch => Some(bundle::CA_KEY),
                    BundleError::NotCa | BundleError::Profile(_) => Some(bundle::CA_CERT),
                    BundleError::ChainStart | BundleError::ChainLink { .. } => {
                        Some(bundle::CERT_CHAIN)
                    }
                    BundleError::NoTrustedRoot
                    | BundleError::NotSelfIssued(_)
                    | BundleError::BadAnchor(_)
                    | BundleError::UnexpectedRoot { .. } => Some(bundle::ROOT_CERT),
                    BundleError::Expired { .. } | BundleError::NotYetValid { .. } => None,
                };
                serde_json::json!({"severity": "error", "file": file, "message": e.to_string()})
            })
            .collect(),
    };
    let summary = verified.as_ref().ok();
    let names = [
        bundle::CA_CERT,
        bundle::CA_KEY,
        bundle::CERT_CHAIN,
        bundle::ROOT_CERT,
    ];
    let files_read: Vec<String> = names
        .iter()
        .map(|name| dir.join(name).display().to_string())
        .collect();
    serde_json::json!({
        "dir": dir.display().to_string(),
        "files": files_read,
        "valid": summary.is_some(),
        "findings": findings,
        "intermediate": summary.map(|s| serde_json::json!({
            "subject": s.subject,
            "issuer": s.issuer,
            "serial": s.serial,
            "key_type": s.key,
            "not_before": rfc3339(s.not_before),
            "not_after": rfc3339(s.not_after),
        })),
        "anchor_sha256": summary.map(|s| s.anchor_fingerprint.clone()),
        "chain": certificates(&files.cert_chain),
        "roots": certificates(&files.root_cert),
    })
}

/// `serve --check --output json`: what the text report says, as fields.
fn check_json(
    config: &SignerConfig,
    report: &meshca::signer::check::CheckReport,
) -> serde_json::Value {
    use meshca::tlsutil::CrlOverdue;
    let mut not_checked = vec!["listen addresses"];
    if report.online.is_none() {
        not_checked.insert(0, "backend login and root key (--online)");
    }
    serde_json::json!({
        "config": report.config,
        "valid": true,
        "virtual_meshes": report.virtual_meshes,
        "clients": report.clients,
        "root": report.root,
        "announced_roots": report
            .announced_roots
            .iter()
            .map(|(name, what)| serde_json::json!({"announcement": name, "description": what}))
            .collect::<Vec<_>>(),
        "listen": config.listen.to_string(),
        "ops_listen": config.ops_listen.map(|ops| ops.to_string()),
        "rules_sha256": report.rules_sha256,
        "rules": report.rules,
        "client_crl_overdue": match config.client_crl_overdue {
            CrlOverdue::Accept => "accept",
            CrlOverdue::Refuse => "refuse",
        },
        "server_certificate_not_after": rfc3339(report.server_certificate_not_after),
        "client_crls": report.client_crls,
        "backend": report.backend,
        "audit_log": report.audit_log,
        "online": report.online,
        "warnings": report.warnings,
        "not_checked": not_checked,
    })
}

fn vault_root_init(config: &SignerConfig, force: bool, adopt: bool) -> Result<ExitCode> {
    let settings = vault_settings(config)?;
    let mode = if adopt {
        RootInitMode::Adopt
    } else {
        RootInitMode::Generate { force }
    };
    let outcome = runtime()?.block_on(vault_root::root_init(config, settings, mode))?;
    let root = &outcome.root;
    let issuer = &outcome.issuer;
    if outcome.adopted {
        say!(
            "meshca: adopted Vault issuer {} as the root CA",
            issuer.issuer_name
        );
    } else {
        say!(
            "meshca: root CA generated inside Vault{}",
            match &outcome.previous_issuer_renamed_to {
                Some(name) => format!(" (the previous issuer is kept as {name})"),
                None => String::new(),
            }
        );
    }
    say!(
        "  issuer       {} (id {}) in mount {} at {}",
        issuer.issuer_name,
        issuer.issuer_id,
        settings.mount,
        settings.address.as_str().trim_end_matches('/')
    );
    say!(
        "  key          {} (id {}, held by Vault, never exported)",
        root.key_kind,
        issuer.key_id
    );
    print_new_root(root, config);
    for warning in &outcome.warnings {
        say!("  warning      Vault: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `root show`'s certificates: the root in force, then the roots announced beside it (a
/// root change under way), each with what an operator compares against the agents'
/// bundles and the metrics.
fn print_root_certificates(config: &SignerConfig, root: &RootCa) {
    let now = SystemTime::now();
    say!("root certificate {}", config.root.certificate.display());
    say!("  subject      {}", root.subject);
    say!("  key          {}", root.key_kind);
    say!("  not after    {}", rfc3339(root.not_after));
    say!("  sha256       {}", root.fingerprint_sha256);
    for announced in config.root.announced() {
        say!(
            "{} {} ({}, announced to the agents)",
            announced.announcement.name(),
            announced.path.display(),
            announced.announcement.key()
        );
        say!("  key          {}", announced.key_kind);
        say!(
            "  not after    {}{}",
            rfc3339(announced.not_after),
            if announced.not_after <= now {
                " (EXPIRED: the agents no longer trust it)"
            } else {
                ""
            }
        );
        say!("  sha256       {}", announced.fingerprint_sha256);
        say!(
            "  vouched by   {}",
            meshca::signer::check::describe_cross_cert(
                &config.audit_log,
                &announced.fingerprint_sha256
            )
        );
    }
}

/// `root show --output json`'s root: what `openssl x509 -noout -fingerprint -sha256
/// -dates -subject -ext subjectKeyIdentifier` says of the certificate file.
fn root_json(config: &SignerConfig, root: &RootCa) -> serde_json::Value {
    let validity = root.certificate.tbs_certificate().validity();
    serde_json::json!({
        "certificate": config.root.certificate.display().to_string(),
        "subject": root.subject.to_string(),
        "sha256": root.fingerprint_sha256,
        "ski": meshca::pki::csr::hex(&root.subject_key_id),
        "not_before": rfc3339(validity.not_before.to_system_time()),
        "not_after": rfc3339(root.not_after),
        "key_type": root.key_kind.to_string(),
    })
}

/// The roots announced beside the root in force, as `root show` prints them.
fn announced_roots_json(config: &SignerConfig) -> serde_json::Value {
    let now = SystemTime::now();
    config
        .root
        .announced()
        .map(|a| {
            serde_json::json!({
                "announcement": a.announcement.label(),
                "certificate": a.path.display().to_string(),
                "sha256": a.fingerprint_sha256,
                "not_after": rfc3339(a.not_after),
                "expired": a.not_after <= now,
                "key_type": a.key_kind.to_string(),
                "vouched_by": meshca::signer::check::describe_cross_cert(
                    &config.audit_log,
                    &a.fingerprint_sha256
                ),
            })
        })
        .collect()
}

/// `root show`'s lines on the token's key (text output).
fn print_key_attributes(settings: &meshca::config::Pkcs11Settings, attrs: &pkcs11::KeyAttributes) {
    say!("private key {}", settings.key);
    say!("  CKA_TOKEN             {}", attrs.token);
    say!("  CKA_PRIVATE           {}", attrs.private);
    say!("  CKA_SENSITIVE         {}", attrs.sensitive);
    say!("  CKA_EXTRACTABLE       {}", attrs.extractable);
    say!("  CKA_ALWAYS_SENSITIVE  {}", attrs.always_sensitive);
    say!("  CKA_NEVER_EXTRACTABLE {}", attrs.never_extractable);
    say!("  CKA_DECRYPT           {}", attrs.decrypt);
    say!("  CKA_UNWRAP            {}", attrs.unwrap);
    say!("  CKA_SIGN_RECOVER      {}", attrs.sign_recover);
    say!("  CKA_DERIVE            {}", attrs.derive);
    say!(
        "  CKA_VALUE readable    {}",
        if attrs.value_readable {
            "YES (the key can be read out!)"
        } else {
            "no"
        }
    );
    say!(
        "  root certificate's    {}",
        if attrs.not_the_root_key.is_none() {
            "yes (signed a challenge that verifies under it)"
        } else {
            "NO"
        }
    );
}

fn vault_root_show(config: &SignerConfig, json: bool) -> Result<ExitCode> {
    let settings = vault_settings(config)?;
    let root = meshca::signer::server::load_root(config)?;
    if !json {
        print_root_certificates(config, &root);
    }
    let info = runtime()?.block_on(vault_root::inspect(settings))?;
    let issuer_pem_matches = meshca::pki::pem::decode_certificates(&info.issuer.certificate_pem)
        .ok()
        .and_then(|c| c.into_iter().next())
        .is_some_and(|c| c == root.certificate);
    if json {
        let problems: Vec<String> = if issuer_pem_matches {
            Vec::new()
        } else {
            vec![format!(
                "Vault issuer {} is not the root in {}: a signer with this config will not start",
                settings.issuer_ref,
                config.root.certificate.display()
            )]
        };
        say_json(&serde_json::json!({
            "backend": "vault",
            "root": root_json(config, &root),
            "announced_roots": announced_roots_json(config),
            "vault": {
                "address": settings.address.as_str().trim_end_matches('/'),
                "mount": settings.mount,
                "issuer_ref": settings.issuer_ref,
                "issuer_id": info.issuer.issuer_id,
                "usage": info.issuer.usage,
                "key_type": info.key_type,
                "key_id": info.issuer.key_id,
                "key_name": info.key_name,
                "certificate_matches": issuer_pem_matches,
            },
            "key_check": {"ok": problems.is_empty(), "problems": problems},
        }));
        return Ok(if issuer_pem_matches {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    say!(
        "Vault issuer {} in mount {}",
        settings.issuer_ref,
        settings.mount
    );
    say!("  issuer id    {}", info.issuer.issuer_id);
    say!("  usage        {}", info.issuer.usage);
    say!(
        "  certificate  {}",
        if issuer_pem_matches {
            "the root certificate above"
        } else {
            "DIFFERENT from the root certificate file!"
        }
    );
    say!(
        "  key          {} (id {}{}); Vault's API has no call that returns it",
        info.key_type,
        info.issuer.key_id,
        if info.key_name.is_empty() {
            String::new()
        } else {
            format!(", name {}", info.key_name)
        }
    );
    if !issuer_pem_matches {
        // A script checking the root must not read success here: a signer with this
        // config refuses to start.
        to_stderr!(
            "meshca: Vault issuer {} is not the root in {}: a signer with this config will not start",
            settings.issuer_ref,
            config.root.certificate.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

impl Command {
    /// Whether `--output json` is known to it.
    fn speaks_json(&self) -> bool {
        match self {
            Command::Root {
                command: RootCommand::Show { .. },
            }
            | Command::Verify { .. }
            | Command::Audit { .. }
            | Command::Serve { check: true, .. }
            | Command::Request(_) => true,
            Command::Agent(args) => args.once && args.target_dir.is_some(),
            _ => false,
        }
    }

    /// A long-running process (the signer, the agents, the mesh controller), which a
    /// SIGHUP must not end.
    fn is_daemon(&self) -> bool {
        match self {
            Command::Serve { check, .. } => !check,
            Command::Agent(_) | Command::MeshController(_) => true,
            _ => false,
        }
    }
}

fn run(command: Command, output: Output) -> Result<ExitCode> {
    let json = output == Output::Json;
    match command {
        Command::Token {
            command:
                TokenCommand::Init {
                    config,
                    so_pin_file,
                },
        } => {
            let config = load_config(&config)?;
            let settings = pkcs11_settings(&config)?;
            let so_pin = SecretSource::File(SecretFile::new(
                "--so-pin-file",
                &so_pin_file,
                so_pin_file.clone(),
            ))
            .read()?;
            let user_pin = settings.pin.read()?;
            let label = pkcs11::init_token(settings, &so_pin, &user_pin)?;
            say!(
                "meshca: token {label:?} initialized (user PIN from {})",
                settings.pin
            );
        }
        Command::Root {
            command:
                RootCommand::Init {
                    config,
                    force,
                    adopt,
                },
        } => {
            let config = load_config(&config)?;
            // `--adopt` writes the issuer's own certificate: checked against the file's.
            if !adopt {
                config.check_root_certificate_free(force)?;
            }
            if config.root.backend == BackendKind::Vault {
                return vault_root_init(&config, force, adopt);
            }
            if adopt {
                bail!("--adopt is for the vault backend (it takes an existing Vault issuer)");
            }
            let settings = pkcs11_settings(&config)?;
            let pin = settings.pin.read()?;
            let outcome = pkcs11::root_init(&config, settings, &pin, force)?;
            let root = &outcome.root;
            say!(
                "meshca: root CA created in the token{}",
                if outcome.replaced_existing_key {
                    " (replaced the previous key)"
                } else {
                    ""
                }
            );
            say!(
                "  key          {} ({}, generated inside the token, not extractable)",
                settings.key,
                root.key_kind
            );
            print_new_root(root, &config);
        }
        Command::Root {
            command: RootCommand::RestrictKey { config },
        } => {
            let config = load_config(&config)?;
            if config.root.backend == BackendKind::Vault {
                bail!(
                    "root restrict-key is for a PKCS#11 root key: Vault's key has no such attributes"
                );
            }
            let settings = pkcs11_settings(&config)?;
            let root = meshca::signer::server::load_root(&config)?;
            let pin = settings.pin.read()?;
            let cleared = pkcs11::restrict_key_uses(settings, &pin, &root)?;
            if cleared.is_empty() {
                say!(
                    "meshca: root key {} allows only signing already",
                    settings.key
                );
            } else {
                say!(
                    "meshca: root key {} now allows only signing ({} set false)",
                    settings.key,
                    cleared.join(", ")
                );
            }
        }
        Command::Root {
            command: RootCommand::Show { config },
        } => {
            let config = load_config(&config)?;
            if config.root.backend == BackendKind::Vault {
                return vault_root_show(&config, json);
            }
            let settings = pkcs11_settings(&config)?;
            let root = meshca::signer::server::load_root(&config)?;
            if !json {
                print_root_certificates(&config, &root);
            }
            let pin = settings.pin.read()?;
            let attrs = pkcs11::inspect_key(settings, &pin, &root)?;
            // A script checking the root (`until: rc == 0`) must not read success here.
            let mut problems: Vec<String> =
                attrs.weaknesses().iter().map(|w| w.to_string()).collect();
            problems.extend(attrs.not_the_root_key.clone());
            if json {
                say_json(&serde_json::json!({
                    "backend": "pkcs11",
                    "root": root_json(&config, &root),
                    "announced_roots": announced_roots_json(&config),
                    "key": {
                        "uri": settings.key.to_string(),
                        "cka_token": attrs.token,
                        "cka_private": attrs.private,
                        "cka_sensitive": attrs.sensitive,
                        "cka_extractable": attrs.extractable,
                        "cka_always_sensitive": attrs.always_sensitive,
                        "cka_never_extractable": attrs.never_extractable,
                        "cka_decrypt": attrs.decrypt,
                        "cka_unwrap": attrs.unwrap,
                        "cka_sign_recover": attrs.sign_recover,
                        "cka_derive": attrs.derive,
                        "value_readable": attrs.value_readable,
                        "is_root_certificate_key": attrs.not_the_root_key.is_none(),
                    },
                    "key_check": {"ok": problems.is_empty(), "problems": problems},
                }));
            } else {
                print_key_attributes(settings, &attrs);
            }
            // Not refused: an adopted key made elsewhere may allow these, and none lets it
            // leave the token; but each lets the PIN's holder use it beyond signing.
            let other_uses = attrs.other_uses();
            if !other_uses.is_empty() {
                to_stderr!(
                    "meshca: warning: root key {}: allows more than signing ({} true): \
                     whoever holds the PIN can use it for that too; `meshca root restrict-key` \
                     sets them false",
                    settings.key,
                    other_uses.join(", ")
                );
            }
            if !problems.is_empty() {
                for problem in &problems {
                    to_stderr!("meshca: root key {}: {problem}", settings.key);
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Serve {
            config,
            listen,
            check: true,
            online,
        } => {
            let config = load_config(&config)?;
            let not_ready = || format!("{} is not ready to serve", config.path.display());
            let now = std::time::SystemTime::now();
            let mut report =
                meshca::signer::check::check(&config, listen, now).with_context(not_ready)?;
            if online {
                let checked = config.clone();
                // On a blocking thread of a runtime, as the start runs it.
                let found = runtime()?
                    .block_on(async move {
                        tokio::task::spawn_blocking(move || {
                            meshca::signer::check::check_online(&checked)
                        })
                        .await
                    })
                    .context("the online check stopped")?
                    .with_context(not_ready)?;
                report.online = Some(found);
            }
            if json {
                say_json(&check_json(&config, &report));
            } else {
                say!("{report}");
            }
        }
        Command::Serve {
            config,
            listen,
            check: false,
            ..
        } => {
            let config = load_config(&config)?;
            runtime()?.block_on(meshca::signer::server::run(config, listen))?;
        }
        Command::Request(args) => {
            let client = args.tls.signer_client(&args.signer)?;
            warn_of_open_key(client.key_readable_by_others());
            let opts = RequestOptions {
                virtual_mesh: args.virtual_mesh,
                mesh: args.mesh,
                key_type: args.key_type,
                ttl_seconds: args.ttl_seconds,
                out_dir: args.out_dir,
                adopt: args.adopt,
                pin: rotation::RootPin::new(&args.accept_roots, "--accept-root"),
            };
            let root_cert = opts.out_dir.join(meshca::pki::bundle::ROOT_CERT);
            let roots_before = std::fs::read(&root_cert).ok();
            let outcome = runtime()?.block_on(request_intermediate(&client, &opts))?;
            let s = &outcome.summary;
            let roots_changed = std::fs::read(&root_cert).ok() != roots_before;
            if json {
                let mut report = installed_json(&opts.out_dir, s, roots_changed);
                report["mesh"] = opts.mesh.to_string().into();
                report["virtual_mesh"] = opts.virtual_mesh.to_string().into();
                use meshca::pki::bundle::{CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
                report["files_written"] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT]
                    .iter()
                    .map(|name| opts.out_dir.join(name).display().to_string())
                    .collect();
                say_json(&report);
                return Ok(ExitCode::SUCCESS);
            }
            say!(
                "meshca: intermediate for {} installed in {}",
                opts.mesh,
                opts.out_dir.display()
            );
            say!("  subject      {}", s.subject);
            say!("  issuer       {}", s.issuer);
            say!("  serial       {}", s.serial);
            say!(
                "  key          {} (generated here; ca-key.pem is mode 0600)",
                outcome.key_type
            );
            say!("  not after    {}", rfc3339(s.not_after));
            say!("  root sha256  {}", s.anchor_fingerprint);
            say!("  trusts       {}", s.root_fingerprints.join(", "));
            // As `agent --once` says it: istiod takes a new root set only when it starts.
            if roots_changed {
                say!("  then         restart istiod: root-cert.pem changed");
            }
        }
        Command::Verify { dir, root } => {
            let files = cacerts::read_bundle(&dir)?;
            let expected = match root {
                Some(path) => {
                    let pem = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let mut certs =
                        decode_certificates(&pem).with_context(|| path.display().to_string())?;
                    Some(certs.remove(0))
                }
                None => None,
            };
            let checked = check_bundle(&files, expected.as_ref(), SystemTime::now());
            if json {
                say_json(&verify_json(&dir, &files, &checked));
                if let Err(findings) = &checked {
                    to_stderr!(
                        "meshca: {} is not a valid Istio cacerts bundle: {}",
                        dir.display(),
                        list_findings(findings)
                    );
                    return Ok(ExitCode::FAILURE);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let s = checked.map_err(|findings| {
                anyhow!(
                    "{} is not a valid Istio cacerts bundle: {}",
                    dir.display(),
                    list_findings(&findings)
                )
            })?;
            say!("meshca: {} is a valid plugged-in CA bundle", dir.display());
            say!("  subject      {}", s.subject);
            say!("  issuer       {}", s.issuer);
            say!("  serial       {}", s.serial);
            say!("  key          {} (matches ca-key.pem)", s.key);
            say!(
                "  valid        {} to {}",
                rfc3339(s.not_before),
                rfc3339(s.not_after)
            );
            say!(
                "  chain        {} certificate(s), ends at root sha256 {}",
                s.chain_length,
                s.anchor_fingerprint
            );
            for fp in &s.root_fingerprints {
                say!("  trusts root  sha256 {fp}");
            }
        }
        Command::Crds { component } => {
            use meshca::agent::crd::Component;
            let component = component.map(|c| match c {
                CrdComponent::Agent => Component::Agent,
                CrdComponent::MeshController => Component::MeshController,
            });
            say_raw!(
                "{}",
                meshca::agent::crd::crds_yaml_for(component)
                    .map_err(|e| anyhow!("cannot print CRDs: {e}"))?
            );
        }
        Command::MeshController(args) => return mesh_controller(args),
        Command::Agent(args) => return agent(args, json),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    expect_hashes,
                },
        } => return audit_verify(&files, &expect_hashes, json),
        Command::Federation {
            command:
                FederationCommand::Render {
                    virtual_mesh,
                    inventory,
                    out_dir,
                },
        } => federation_render(&virtual_mesh, &inventory, &out_dir)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The directory agent's renewal settings, checked together: each flag's range is
/// checked as it is parsed.
fn directory_rotation(args: &AgentArgs) -> Result<RotationSettings, rotation::SettingsError> {
    let rotation = RotationSettings::new(args.renew_fraction, args.jitter_fraction)?;
    // A single pass may be due at once on purpose (forcing a renewal); a loop would then
    // renew every second.
    if !args.once {
        rotation::check_ttl(args.ttl_seconds, &rotation)?;
    }
    Ok(rotation)
}

fn agent(args: AgentArgs, json: bool) -> Result<ExitCode> {
    let resync = std::time::Duration::from_secs(args.resync_seconds.max(1));
    let Some(target) = args.target_dir.clone() else {
        return kubernetes_agent(args, resync);
    };
    let rotation = directory_rotation(&args)
        .unwrap_or_else(|e| usage_error("agent", e.message(&rotation::AGENT_FLAGS)));
    // clap requires these with --target-dir.
    let (Some(signer), Some(virtual_mesh), Some(mesh)) =
        (&args.signer, args.virtual_mesh, args.mesh)
    else {
        bail!("directory mode (--target-dir) needs --signer, --virtual-mesh and --mesh");
    };
    let signer = args.tls.endpoint(signer);
    // Read once now, so a wrong flag or file fails the start; the loop reads them again
    // for each pass (a rotated client certificate is used without a restart).
    let client = signer.connect()?;
    warn_of_open_key(client.key_readable_by_others());
    let opts = DirOptions {
        target,
        virtual_mesh,
        mesh,
        key_type: args.key_type,
        ttl_seconds: args.ttl_seconds,
        adopt: args.adopt,
        rotation,
        retired_roots: args.retire_roots,
        pin: rotation::RootPin::new(&args.accept_roots, rotation::AGENT_FLAGS.accepted_roots),
    };
    let rt = runtime()?;
    if args.once {
        let outcome = rt.block_on(directory::reconcile(
            &client,
            &opts,
            &mut directory::PassMemory::default(),
            SystemTime::now(),
        ))?;
        directory::log_outcome(&opts.target, &outcome);
        if json {
            let s = outcome.summary();
            let mut report = installed_json(&opts.target, s, outcome.roots_changed());
            let (reason, signer_error) = match &outcome {
                DirOutcome::Installed { reason, .. } => (Some(reason.to_string()), None),
                DirOutcome::UpToDate {
                    signer_error: Some(error),
                    ..
                } => (None, Some(error.clone())),
                _ => (None, None),
            };
            report["result"] = outcome.result().into();
            report["reason"] = reason.into();
            report["renew_at"] = rfc3339(outcome.renew_at()).into();
            report["held_by_root"] = outcome.held_by_root().into();
            report["signer_error"] = signer_error.clone().into();
            say_json(&report);
            return Ok(if signer_error.is_some() {
                ExitCode::from(EXIT_SIGNER_NOT_REACHED)
            } else {
                ExitCode::SUCCESS
            });
        }
        let s = outcome.summary();
        say!("meshca: {}: {}", opts.target.display(), outcome.what());
        say!("  serial       {}", s.serial);
        say!("  not after    {}", rfc3339(s.not_after));
        say!("  renew at     {}", rfc3339(outcome.renew_at()));
        say!("  root sha256  {}", s.anchor_fingerprint);
        say!("  trusts       {}", s.root_fingerprints.join(", "));
        if outcome.roots_changed() {
            say!("  then         restart istiod: root-cert.pem changed");
        }
        if let DirOutcome::UpToDate {
            signer_error: Some(error),
            ..
        } = &outcome
        {
            // The bundle stands on its own, but a cron job must learn of a signer it will
            // need at the renewal (a wrong URL, a firewall) before then.
            say!("  signer       unavailable: {error}");
            return Ok(ExitCode::from(EXIT_SIGNER_NOT_REACHED));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let metrics = Arc::new(AgentMetrics::new());
    rt.block_on(async {
        let stop = shutdown_signal()?;
        serve_metrics(args.metrics_listen, metrics.clone()).await?;
        directory::run(&signer, &opts, resync, &metrics, stop).await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT taken over before anything says it is ready (see
/// [`meshca::signals::shutdown_signal`]).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    meshca::signals::shutdown_signal().context("cannot handle SIGTERM and SIGINT")
}

/// With `--metrics-listen`: serves a controller's metrics, logging where.
async fn serve_metrics(addr: Option<SocketAddr>, metrics: Arc<dyn Exposition>) -> Result<()> {
    if let Some(addr) = addr {
        let bound = meshca::agent::metrics::serve(addr, metrics)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(metrics = %bound, "metrics on http://{bound}/metrics");
    }
    Ok(())
}

fn kubernetes_agent(args: AgentArgs, resync: std::time::Duration) -> Result<ExitCode> {
    if args.signer.is_some() || args.virtual_mesh.is_some() || args.mesh.is_some() {
        bail!(
            "--signer, --virtual-mesh and --mesh are for directory mode (--target-dir); in Kubernetes they come from each VirtualMeshCertificateSigningRequest"
        );
    }
    // Fail at start on unreadable client credentials (they are read again on every
    // pass, so a rotated Secret is picked up).
    let tls = args.tls;
    let read = meshca::tlsutil::client_tls(&tls.ca_cert, &tls.client_cert, &tls.client_key)?;
    warn_of_open_key(read.key_readable_by_others.as_ref());
    let opts = ControllerOptions {
        namespace: args.namespace,
        identity: replica_identity(args.identity, "meshca-agent", args.once),
        lease_name: args.lease_name,
        lease_duration: std::time::Duration::from_secs(args.lease_seconds),
        resync,
        ca_cert: tls.ca_cert,
        client_cert: tls.client_cert,
        client_key: tls.client_key,
    };
    let metrics = Arc::new(AgentMetrics::new());
    let api_timeout = std::time::Duration::from_secs(args.api_timeout_seconds);
    run_in_cluster(
        args.once,
        args.metrics_listen,
        api_timeout,
        std::time::Duration::from_secs(args.stop_grace_seconds),
        metrics.clone(),
        |client| Controller::new(Kube::new(client), opts, metrics),
    )
}

fn mesh_controller(args: MeshControllerArgs) -> Result<ExitCode> {
    use meshca::mesh_controller::controller::{MeshController, MeshControllerOptions};
    use meshca::mesh_controller::metrics::MeshControllerMetrics;
    let opts = MeshControllerOptions {
        namespace: args.namespace,
        identity: replica_identity(args.identity, "meshca-mesh-controller", args.once),
        lease_name: args.lease_name,
        lease_duration: std::time::Duration::from_secs(args.lease_seconds),
        resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
        retire_after: std::time::Duration::from_secs(args.retire_after_seconds),
        member_api_timeout: std::time::Duration::from_secs(args.api_timeout_seconds),
    };
    let metrics = Arc::new(MeshControllerMetrics::new());
    run_in_cluster(
        args.once,
        args.metrics_listen,
        opts.member_api_timeout,
        std::time::Duration::from_secs(args.stop_grace_seconds),
        metrics.clone(),
        |client| MeshController::new(client, opts, metrics),
    )
}

/// This replica's name in the Lease: the flag, else the pod name, else `{fallback}-{pid}`.
/// A `--once` run adds `-once-{pid}`: run with a replica's name (`kubectl exec` into its
/// pod inherits POD_NAME), it would otherwise take that replica's Lease for its own and
/// act beside it.
fn replica_identity(flag: Option<String>, fallback: &str, once: bool) -> String {
    let name = flag
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("{fallback}-{}", std::process::id()));
    if once {
        format!("{name}-once-{}", std::process::id())
    } else {
        name
    }
}

/// Runs a Lease-holding controller against the cluster it finds (in-cluster or
/// kubeconfig): one pass with `--once`, else until SIGTERM or SIGINT; `metrics` served
/// on `metrics_listen` meanwhile.
fn run_in_cluster<C: LeaderLoop>(
    once: bool,
    metrics_listen: Option<SocketAddr>,
    api_timeout: std::time::Duration,
    stop_grace: std::time::Duration,
    metrics: Arc<dyn Exposition>,
    controller: impl FnOnce(kube::Client) -> C,
) -> Result<ExitCode> {
    // The Kubernetes client's TLS is kube's rustls configuration, with rustls's own clock,
    // which panics in every handshake before 1970 (meshca's own clients say so instead).
    let now = SystemTime::now();
    if now < SystemTime::UNIX_EPOCH {
        bail!(
            "this machine's clock reads {}, before 1970: the Kubernetes client cannot check the API server's certificate; set the clock right (NTP) and start again",
            rfc3339(now)
        );
    }
    let rt = runtime()?;
    rt.block_on(async move {
        // `--once` keeps the default actions: a SIGTERM ends a single pass at once.
        let stop = (!once).then(shutdown_signal).transpose()?;
        let mut config = kube::Config::infer()
            .await
            .context("cannot find a Kubernetes configuration (in-cluster or kubeconfig)")?;
        meshca::agent::k8s::bound_calls(&mut config, api_timeout);
        let client = meshca::agent::k8s::bounded_client(config)
            .context("cannot build the Kubernetes client")?;
        let controller = controller(client);
        serve_metrics(metrics_listen, metrics).await?;
        match stop {
            Some(stop) => controller.run(stop, stop_grace).await,
            None => {
                let (led, next) = controller.run_once_led().await?;
                if !led {
                    return Err(anyhow!(NotLeader(
                        "another replica holds the Lease: this --once pass did nothing (a replica \
                         that stopped without giving it up holds it for its duration; a running \
                         one makes the pass itself)"
                    )));
                }
                // A pass longer than the Lease may lose it to another replica midway: its
                // steps after that wrote nothing (each logged "not the leader any more"),
                // and the pass still returned. Still ours (renewed here if need be) or not.
                if !controller.elector().ensure().await? {
                    return Err(anyhow!(NotLeader(
                        "this replica is not the leader any more: another replica took the \
                         Lease during this --once pass, which wrote nothing after that (the \
                         leader makes the rest)"
                    )));
                }
                // Given back at once: a one-off pass (a Job, a laptop) must not keep the
                // replicas waiting for the Lease to expire.
                if let Err(e) = controller.release().await {
                    tracing::warn!(error = %e, "could not give the Lease up; it expires by itself");
                }
                say!("meshca: one pass done; next look in {}s", next.as_secs());
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn federation_render(virtual_mesh: &Path, inventory: &Path, out_dir: &Path) -> Result<()> {
    use meshca::mesh::{self, FederationConfig, Inventory};
    let vm_source = virtual_mesh.display().to_string();
    let vm_text = meshca::fsutil::read_text(virtual_mesh).map_err(|e| anyhow!(e))?;
    let document = mesh::parse_virtual_mesh(&vm_source, &vm_text)?;
    let config = FederationConfig::from_document(&document, &vm_source)?;
    let inv_source = inventory.display().to_string();
    let inv_bytes = meshca::fsutil::read_limited(inventory, mesh::inventory::MAX_INVENTORY_BYTES)
        .with_context(|| format!("cannot read {inv_source}"))?;
    let inv_text =
        String::from_utf8(inv_bytes).map_err(|_| anyhow!("{inv_source} is not UTF-8 text"))?;
    let inventory = Inventory::from_yaml(&inv_source, &inv_text).map_err(|e| match e {
        // Already names the file.
        mesh::InventoryError::Yaml { .. } => anyhow!(e),
        e => anyhow!(e).context(format!("inventory {inv_source}")),
    })?;
    let plan = mesh::translate(&config, &inventory)
        .with_context(|| format!("VirtualMesh {vm_source} with inventory {inv_source}"))?;
    let report = mesh::render::write_dir(&plan, out_dir)?;
    if config.mode.is_none() {
        say!(
            "meshca: VirtualMesh {} has no spec.federation: nothing is federated",
            config.virtual_mesh
        );
    }
    for (cluster, path) in &report.written {
        let s = plan.summary(cluster).unwrap_or_default();
        say!(
            "meshca: {}: {} object(s) ({} service(s) offered, {} received)",
            path.display(),
            s.objects,
            s.exported,
            s.imported
        );
    }
    for path in &report.removed {
        say!(
            "meshca: removed {} (its cluster left the VirtualMesh)",
            path.display()
        );
    }
    if plan.moved_addresses() > 0 {
        say!(
            "meshca: {} service(s) got their next address candidate after a hash collision",
            plan.moved_addresses()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_root_is_taken_as_openssl_prints_its_fingerprint_line() {
        let pairs = vec!["3F"; 32].join(":");
        let normalized = "3f".repeat(32);
        for line in [
            format!("sha256 Fingerprint={pairs}"),
            format!("SHA256 Fingerprint={pairs}\n"),
            pairs.clone(),
        ] {
            assert_eq!(root_fingerprint(&line), Ok(normalized.clone()), "{line}");
        }
        let sha1 = vec!["AA"; 20].join(":");
        assert!(
            root_fingerprint(&format!("sha1 Fingerprint={sha1}"))
                .unwrap_err()
                .contains("SHA-1")
        );
    }

    #[test]
    fn json_logs_are_seen_on_a_command_line_clap_refused() {
        let args = |list: &[&str]| {
            list.iter()
                .map(std::ffi::OsString::from)
                .collect::<Vec<_>>()
        };
        assert!(json_logs_requested(args(&[
            "meshca",
            "--log-format",
            "json",
            "x"
        ])));
        assert!(json_logs_requested(args(&[
            "meshca",
            "serve",
            "--log-format=json"
        ])));
        assert!(!json_logs_requested(args(&["meshca", "serve", "json"])));
        assert!(!json_logs_requested(args(&[
            "meshca",
            "--log-format",
            "text",
            "json"
        ])));
        // After `--` it is a value, not the flag.
        assert!(!json_logs_requested(args(&[
            "meshca",
            "--",
            "--log-format=json"
        ])));
    }

    #[test]
    fn durations_past_what_a_clock_holds_are_refused_by_name() {
        for args in [
            &[
                "meshca",
                "mesh-controller",
                "--retire-after-seconds",
                "18446744073709551615",
            ][..],
            &[
                "meshca",
                "mesh-controller",
                "--lease-seconds",
                "18446744073709551615",
            ],
            &["meshca", "agent", "--lease-seconds", "9223372036854775808"],
            &["meshca", "agent", "--resync-seconds", "0"],
            &["meshca", "agent", "--lease-seconds", "2"],
            &["meshca", "mesh-controller", "--lease-seconds", "1"],
        ] {
            let err = Cli::try_parse_from(args)
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(args[2]) && err.contains("not in"), "{err}");
        }
        assert!(
            Cli::try_parse_from(["meshca", "mesh-controller", "--retire-after-seconds", "0"])
                .is_ok()
        );
    }

    /// `meshca CMD --help` says what each argument is: none is left as a bare name.
    #[test]
    fn every_argument_has_a_help_line() {
        use clap::CommandFactory;
        fn undocumented(command: &clap::Command, path: &str, found: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_help().is_none() && !["help", "version"].contains(&id) {
                    found.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                undocumented(sub, &format!("{path} {}", sub.get_name()), found);
            }
        }
        let mut found = Vec::new();
        undocumented(&Cli::command(), "meshca", &mut found);
        assert_eq!(found, Vec::<String>::new());
    }

    /// A directory-mode flag given to the Kubernetes-mode agent is refused by name: it
    /// would do nothing there (the request's spec says what it says).
    #[test]
    fn directory_mode_flags_need_a_target_dir() {
        for flag in [
            &["--adopt"][..],
            &["--signer", "https://signer"],
            &["--virtual-mesh", "a/b"],
            &["--mesh", "a/b"],
            &["--key-type", "ecdsa-p256"],
            &["--ttl-seconds", "86400"],
            &["--renew-fraction", "0.5"],
            &["--jitter-fraction", "0.1"],
            &["--retire-root", ROOT_SHA256],
        ] {
            let mut args = vec!["meshca", "agent"];
            args.extend_from_slice(&TLS_FLAGS);
            args.extend_from_slice(flag);
            let err = Cli::try_parse_from(&args)
                .err()
                .unwrap_or_else(|| panic!("{flag:?} accepted without --target-dir"))
                .to_string();
            assert!(err.contains("--target-dir"), "{err}");
            args.extend_from_slice(&["--target-dir", "/etc/cacerts"]);
            for (required, value) in DIRECTORY_FLAGS {
                if flag[0] != required {
                    args.extend_from_slice(&[required, value]);
                }
            }
            assert!(Cli::try_parse_from(&args).is_ok(), "{args:?}");
        }
        let mut kubernetes_mode = vec!["meshca", "agent"];
        kubernetes_mode.extend_from_slice(&TLS_FLAGS);
        assert!(Cli::try_parse_from(kubernetes_mode).is_ok());
    }

    /// The Kubernetes-mode flags do nothing in directory mode: refused by name there.
    #[test]
    fn kubernetes_mode_flags_are_refused_in_directory_mode() {
        let mut directory = vec!["meshca", "agent", "--target-dir", "/etc/cacerts"];
        directory.extend_from_slice(&TLS_FLAGS);
        directory.extend(
            DIRECTORY_FLAGS
                .iter()
                .flat_map(|(flag, value)| [*flag, *value]),
        );
        assert!(parse_cli(&directory).is_ok());
        for flag in [
            &["--namespace", "smh"][..],
            &["--identity", "pod-0"],
            &["--lease-name", "other"],
            &["--lease-seconds", "60"],
            &["--api-timeout-seconds", "30"],
            &["--stop-grace-seconds", "10"],
        ] {
            let mut args = directory.clone();
            args.extend_from_slice(flag);
            let err = parse_cli(&args)
                .err()
                .unwrap_or_else(|| panic!("{flag:?} accepted in directory mode"));
            assert_eq!(err.exit_code(), 2);
            let err = err.to_string();
            assert!(
                err.contains(&format!("{} is for Kubernetes mode", flag[0])),
                "{err}"
            );
            // Kubernetes mode takes it.
            let mut kubernetes = vec!["meshca", "agent"];
            kubernetes.extend_from_slice(&TLS_FLAGS);
            kubernetes.extend_from_slice(flag);
            assert!(parse_cli(&kubernetes).is_ok(), "{kubernetes:?}");
        }
    }

    /// What directory mode needs besides --target-dir.
    const DIRECTORY_FLAGS: [(&str, &str); 3] = [
        ("--signer", "https://signer"),
        ("--virtual-mesh", "a/b"),
        ("--mesh", "a/c"),
    ];

    const ROOT_SHA256: &str = "5f35e0c1d0e4b1a9c0ffee00112233445566778899aabbccddeeff0011223344";

    /// `--retire-root` and `--accept-root` take a SHA-256 in the forms openssl and meshca
    /// print it, as fingerprints are compared; another form would retire nothing, or
    /// refuse every root, silently.
    #[test]
    fn retire_and_accept_root_take_only_a_sha256_fingerprint() {
        for flag in ["--retire-root", "--accept-root"] {
            root_flag_takes_only_a_sha256_fingerprint(flag);
        }
    }

    fn root_flag_takes_only_a_sha256_fingerprint(flag: &str) {
        let parse = |fingerprint: &str| {
            let mut args = vec!["meshca", "agent", "--target-dir", "/etc/cacerts"];
            args.extend_from_slice(&TLS_FLAGS);
            args.extend(
                DIRECTORY_FLAGS
                    .iter()
                    .flat_map(|(flag, value)| [*flag, *value]),
            );
            args.extend_from_slice(&[flag, fingerprint]);
            Cli::try_parse_from(args)
        };
        let colons: String = ROOT_SHA256
            .as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        for form in [
            ROOT_SHA256.to_string(),
            ROOT_SHA256.to_ascii_uppercase(),
            colons,
        ] {
            match parse(&form).map(|cli| cli.command) {
                Ok(Command::Agent(args)) if flag == "--retire-root" => {
                    assert_eq!(args.retire_roots, [ROOT_SHA256])
                }
                Ok(Command::Agent(args)) => assert_eq!(args.accept_roots, [ROOT_SHA256]),
                Ok(_) => panic!("not the agent"),
                Err(e) => panic!("{form}: {e}"),
            }
        }
        let sha1 = "5F:35:E0:C1:D0:E4:B1:A9:C0:FF:EE:00:11:22:33:44:55:66:77:88";
        for (refused, why) in [
            (sha1, "this looks like a SHA-1 fingerprint"),
            (
                &sha1.replace(':', ""),
                "this looks like a SHA-1 fingerprint",
            ),
            ("xyz", "not a SHA-256 fingerprint"),
            (&ROOT_SHA256[1..], "not a SHA-256 fingerprint"),
            (&format!("{ROOT_SHA256}:"), "not a SHA-256 fingerprint"),
            (
                &format!("5:{}", &ROOT_SHA256[1..]),
                "not a SHA-256 fingerprint",
            ),
        ] {
            let err = parse(refused).err().expect("refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
            let message = err.to_string();
            assert!(
                message.contains(flag) && message.contains(why),
                "{refused}: {message}"
            );
        }
    }

    const TLS_FLAGS: [&str; 6] = [
        "--ca-cert",
        "ca.pem",
        "--client-cert",
        "client.pem",
        "--client-key",
        "client-key.pem",
    ];
}
