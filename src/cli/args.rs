//! The command line: every subcommand and flag, the parsers that refuse a bad value by
//! name, and clap's usage errors (as one JSON line under `--log-format json`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use meshca::agent::client::{SignerClient, SignerEndpoint};
use meshca::agent::rotation;
use meshca::pki::keys::KeyType;
use meshca::policy::ObjectRef;

use super::output::to_stderr;

pub(crate) const DAY_SECONDS: u64 = 86_400;
/// Shortest Lease: renewed every third of it, in whole seconds.
pub(crate) const MIN_LEASE_SECONDS: u64 = 3;
/// `--api-timeout-seconds` by default.
pub(crate) const API_TIMEOUT_SECONDS: u64 = meshca::agent::k8s::DEFAULT_API_TIMEOUT.as_secs();

/// `--stop-grace-seconds` by default: under Kubernetes' default (and deploy/'s)
/// terminationGracePeriodSeconds of 30, leaving time to give the Lease up.
pub(crate) const STOP_GRACE_SECONDS: u64 = 20;
pub(crate) const TEN_YEARS_SECONDS: u64 = 10 * 366 * DAY_SECONDS;

/// A number of seconds in `range`: durations are added to clocks, and a number past what
/// a clock holds (an operator's "never" of 2^64-1) would stop the process at its first use.
pub(crate) fn seconds(range: std::ops::RangeInclusive<u64>) -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(range)
}

#[derive(Parser)]
#[command(
    name = "meshca",
    version = meshca::VERSION,
    about = "External CA for multi-cluster Istio meshes: root key in a PKCS#11 token or Vault/OpenBao, policy enforced by the signer"
)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub(crate) log_format: LogFormat,
    /// Log filter (RUST_LOG syntax), e.g. info or meshca=debug; this flag wins over the
    /// RUST_LOG environment variable, which wins over the default.
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true, value_parser = log_filter)]
    pub(crate) log_level: String,
    /// What stdout gets: text, or one JSON object for a script (root show, verify, serve
    /// --check, request, agent --once --target-dir; an error is {"error", "exit_status"}).
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub(crate) output: Output,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum CrdComponent {
    Agent,
    MeshController,
}

#[derive(clap::Args)]
pub(crate) struct MeshControllerArgs {
    /// Namespace of the VirtualMeshes, Meshes, kubeconfig Secrets and the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "service-mesh-hub")]
    pub(crate) namespace: String,
    /// This replica's name in the Lease (default: $POD_NAME, $HOSTNAME).
    #[arg(long, env = "POD_NAME")]
    pub(crate) identity: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "meshca-mesh-controller")]
    pub(crate) lease_name: String,
    /// Lease duration in seconds (at least 3, at most a day).
    #[arg(long, default_value_t = 30, value_parser = seconds(MIN_LEASE_SECONDS..=DAY_SECONDS))]
    pub(crate) lease_seconds: u64,
    /// Longest time between two passes (at most a day).
    #[arg(long, default_value_t = 30, value_parser = seconds(1..=DAY_SECONDS))]
    pub(crate) resync_seconds: u64,
    /// After a root change, retire the old roots this long after every member reports the
    /// new one (default one day: Istio's workload certificate lifetime; at most 10 years).
    #[arg(long, default_value_t = 86_400, value_parser = seconds(0..=TEN_YEARS_SECONDS))]
    pub(crate) retire_after_seconds: u64,
    /// Longest wait for an API server (this cluster's and each member's), per call: one
    /// that never answers fails its step instead of holding the pass (at most an hour).
    #[arg(long, default_value_t = API_TIMEOUT_SECONDS, value_parser = seconds(1..=3600))]
    pub(crate) api_timeout_seconds: u64,
    /// At SIGTERM, how long a pass under way may finish before it is cut short and the
    /// Lease given up; keep it below the pod's terminationGracePeriodSeconds (at most an
    /// hour).
    #[arg(long, default_value_t = STOP_GRACE_SECONDS, value_parser = seconds(0..=3600))]
    pub(crate) stop_grace_seconds: u64,
    /// One pass, then exit.
    #[arg(long)]
    pub(crate) once: bool,
    /// Serve Prometheus metrics (/metrics) and /healthz over plain HTTP on this address,
    /// e.g. 0.0.0.0:9102 (not with --once, which exits before anyone scrapes them).
    #[arg(long, value_name = "ADDR", conflicts_with = "once")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
pub(crate) enum FederationCommand {
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
pub(crate) enum TokenCommand {
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
pub(crate) enum RootCommand {
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
pub(crate) enum AuditCommand {
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

/// A line's SHA-256 as the audit log writes it: 64 hex digits (either case is taken).
pub(crate) fn parse_line_hash(text: &str) -> Result<String, String> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err("not a line hash: expected 64 hex digits (a SHA-256), as `meshca audit verify` and the signer's \"audit log head\" line print it".into())
    }
}

/// A fraction of a certificate's lifetime in `range`, named by the flag it was given to.
pub(crate) fn fraction_in(text: &str, range: std::ops::RangeInclusive<f64>) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if range.contains(&value) => Ok(value),
        _ => Err(format!(
            "expected a fraction of the lifetime between {} and {}",
            range.start(),
            range.end()
        )),
    }
}

pub(crate) fn renew_fraction(text: &str) -> Result<f64, String> {
    fraction_in(text, rotation::RENEW_FRACTION_RANGE)
}

pub(crate) fn jitter_fraction(text: &str) -> Result<f64, String> {
    fraction_in(text, rotation::JITTER_FRACTION_RANGE)
}

/// A `--retire-root` (or `--accept-root`): a fingerprint in another form (SHA-1, a typo)
/// would match no root, and the root would stay trusted (or be refused) without a word.
///
/// openssl's whole line (`sha256 Fingerprint=3F:36:...`) is taken as it is printed: what
/// an operator pastes. Its name (`sha1 Fingerprint=`) does not decide: the digits do.
pub(crate) fn root_fingerprint(text: &str) -> Result<String, String> {
    let digits = text
        .split_once(" Fingerprint=")
        .map_or(text, |(_, digits)| digits);
    rotation::parse_sha256_fingerprint(digits.trim()).map_err(|e| e.to_string())
}

/// A `--signer` URL, refused at once rather than after the TLS files are read.
pub(crate) fn signer_url(text: &str) -> Result<String, String> {
    meshca::agent::client::check_signer_url(text).map(|()| text.to_string())
}

/// Ends the process as clap ends it on a usage error (usage line, exit 2), for a mistake
/// only the combination of a subcommand's flags shows.
pub(crate) fn usage_error(subcommand: &str, message: impl std::fmt::Display) -> ! {
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
pub(crate) fn parse_cli<I, T>(args: I) -> Result<Cli, clap::Error>
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
pub(crate) fn exit_on_usage_error(error: clap::Error) -> ! {
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
pub(crate) fn json_logs_requested(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
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
pub(crate) fn usage_error_message(error: &clap::Error) -> String {
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
pub(crate) struct ClientTlsArgs {
    /// CA bundle that verifies the signer's server certificate.
    #[arg(long)]
    pub(crate) ca_cert: PathBuf,
    /// This cluster's client certificate.
    #[arg(long)]
    pub(crate) client_cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    pub(crate) client_key: PathBuf,
}

impl ClientTlsArgs {
    pub(crate) fn endpoint(&self, signer: &str) -> SignerEndpoint {
        SignerEndpoint {
            url: signer.to_string(),
            ca: self.ca_cert.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
        }
    }

    pub(crate) fn signer_client(&self, signer: &str) -> anyhow::Result<SignerClient> {
        Ok(self.endpoint(signer).connect()?)
    }
}

#[derive(clap::Args)]
pub(crate) struct RequestArgs {
    /// Signer base URL, e.g. https://127.0.0.1:8443
    #[arg(long, value_parser = signer_url)]
    pub(crate) signer: String,
    #[command(flatten)]
    pub(crate) tls: ClientTlsArgs,
    /// <namespace>/<name> of the virtual mesh.
    #[arg(long)]
    pub(crate) virtual_mesh: ObjectRef,
    /// <namespace>/<name> of this cluster's mesh.
    #[arg(long)]
    pub(crate) mesh: ObjectRef,
    /// Key type of the intermediate (default: the first of ecdsa-p256, ecdsa-p384,
    /// rsa2048, rsa3072, rsa4096 the policy accepts).
    #[arg(long)]
    pub(crate) key_type: Option<KeyType>,
    /// Ask for a shorter lifetime than the policy's maximum.
    #[arg(long)]
    pub(crate) ttl_seconds: Option<u64>,
    /// Directory to write ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem into.
    #[arg(long)]
    pub(crate) out_dir: PathBuf,
    /// Replace files in DIR that meshca did not write (their roots stay trusted).
    #[arg(long)]
    pub(crate) adopt: bool,
    /// SHA-256 of a root to accept from the signer (repeatable; default: any). A signer
    /// whose root is not listed is asked for nothing; an announced root not listed is
    /// left out of root-cert.pem.
    #[arg(long = "accept-root", value_name = "SHA256", value_parser = root_fingerprint)]
    pub(crate) accept_roots: Vec<String>,
}

#[derive(clap::Args)]
pub(crate) struct AgentArgs {
    /// Directory mode: keep Istio's cacerts files in DIR (e.g. /etc/cacerts) instead of
    /// reconciling VirtualMeshCertificateSigningRequests.
    #[arg(long, value_name = "DIR", requires_all = ["signer", "virtual_mesh", "mesh"])]
    pub(crate) target_dir: Option<PathBuf>,
    /// One pass, then exit (non-zero when it failed).
    #[arg(long)]
    pub(crate) once: bool,
    /// Directory mode: signer base URL, e.g. https://127.0.0.1:8443
    #[arg(long, requires = "target_dir", value_parser = signer_url)]
    pub(crate) signer: Option<String>,
    #[command(flatten)]
    pub(crate) tls: ClientTlsArgs,
    /// Directory mode: <namespace>/<name> of the virtual mesh.
    #[arg(long, requires = "target_dir")]
    pub(crate) virtual_mesh: Option<ObjectRef>,
    /// Directory mode: <namespace>/<name> of this cluster's mesh.
    #[arg(long, requires = "target_dir")]
    pub(crate) mesh: Option<ObjectRef>,
    /// Directory mode: key type of the intermediate (default: the policy's first).
    #[arg(long, requires = "target_dir")]
    pub(crate) key_type: Option<KeyType>,
    /// Directory mode: ask for a shorter lifetime than the policy's maximum.
    #[arg(long, requires = "target_dir")]
    pub(crate) ttl_seconds: Option<u64>,
    /// Directory mode: replace files meshca did not write.
    #[arg(long, requires = "target_dir")]
    pub(crate) adopt: bool,
    /// Directory mode: renew after this fraction of the lifetime (0.1 to 0.95).
    #[arg(
        long,
        default_value_t = rotation::DEFAULT_RENEW_FRACTION,
        requires = "target_dir",
        value_parser = renew_fraction
    )]
    pub(crate) renew_fraction: f64,
    /// Directory mode: renew up to this fraction of the lifetime earlier, fixed per serial
    /// (0 to 0.5, below --renew-fraction).
    #[arg(
        long,
        default_value_t = rotation::DEFAULT_JITTER_FRACTION,
        requires = "target_dir",
        value_parser = jitter_fraction
    )]
    pub(crate) jitter_fraction: f64,
    /// Directory mode: SHA-256 of an old root to drop from root-cert.pem (repeatable): 64
    /// hex digits, bare or in colon-separated pairs (openssl x509 -noout -fingerprint
    /// -sha256).
    #[arg(
        long = "retire-root",
        value_name = "SHA256",
        requires = "target_dir",
        value_parser = root_fingerprint
    )]
    pub(crate) retire_roots: Vec<String>,
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
    pub(crate) accept_roots: Vec<String>,
    /// Longest time between two looks (and the cap of the retry backoff; at most a day).
    #[arg(long, default_value_t = 300, value_parser = seconds(1..=DAY_SECONDS))]
    pub(crate) resync_seconds: u64,
    /// Kubernetes mode: namespace of the requests and of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "service-mesh-hub")]
    pub(crate) namespace: String,
    /// Kubernetes mode: this replica's name in the Lease (default: $POD_NAME, $HOSTNAME).
    #[arg(long, env = "POD_NAME")]
    pub(crate) identity: Option<String>,
    /// Kubernetes mode: name of the leader-election Lease.
    #[arg(long, default_value = "meshca-agent")]
    pub(crate) lease_name: String,
    /// Kubernetes mode: Lease duration in seconds (at least 3, at most a day).
    #[arg(long, default_value_t = 30, value_parser = seconds(MIN_LEASE_SECONDS..=DAY_SECONDS))]
    pub(crate) lease_seconds: u64,
    /// Kubernetes mode: longest wait for the API server, per call: one that never answers
    /// fails the pass instead of holding it (at most an hour).
    #[arg(long, default_value_t = API_TIMEOUT_SECONDS, value_parser = seconds(1..=3600))]
    pub(crate) api_timeout_seconds: u64,
    /// Kubernetes mode: at SIGTERM, how long a pass under way may finish before it is cut
    /// short and the Lease given up; keep it below the pod's
    /// terminationGracePeriodSeconds (at most an hour).
    #[arg(long, default_value_t = STOP_GRACE_SECONDS, value_parser = seconds(0..=3600))]
    pub(crate) stop_grace_seconds: u64,
    /// Serve Prometheus metrics (/metrics) and /healthz over plain HTTP on this address,
    /// e.g. 0.0.0.0:9102 (not with --once, which exits before anyone scrapes them).
    #[arg(long, value_name = "ADDR", conflicts_with = "once")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}

/// A `--log-level` tracing can use: a typo is refused by name, not replaced by `info` nor
/// read as a target that turns every line off.
pub(crate) fn log_filter(text: &str) -> Result<String, String> {
    meshca::logging::check_filter(text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
}

impl Command {
    /// Whether `--output json` is known to it.
    pub(crate) fn speaks_json(&self) -> bool {
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
    pub(crate) fn is_daemon(&self) -> bool {
        match self {
            Command::Serve { check, .. } => !check,
            Command::Agent(_) | Command::MeshController(_) => true,
            _ => false,
        }
    }
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
