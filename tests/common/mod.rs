//! Test harness: every test gets its own root backend (a SoftHSM token in a temp dir, or
//! a real OpenBao server on 127.0.0.1), its own transport PKI (openssl), its own signer
//! config, and a real `meshca serve` on 127.0.0.1 with a port the OS picks. Nothing is
//! mocked.
#![allow(dead_code)]

pub mod certs;
pub mod deploy;
pub mod load;
pub mod openbao;

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use der::EncodePem;
use meshca::pki::csr::build_csr;
use meshca::pki::keys::{KeyType, PrivateKey};
use meshca::pki::profile::subject_name;
use tempfile::TempDir;

pub const MESHCA: &str = env!("CARGO_BIN_EXE_meshca");

/// The repository root (scripts live there).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A command as failure messages show it: program and arguments only. `Command`'s Debug
/// prints the variables set with `.env()` too, which carry PINs and tokens.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| format!("{part:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command, panicking with its output if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

/// Runs a command that must succeed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `error.code` of a signer's error answer ("" if none).
pub fn error_code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// The `error.message` of a signer's error answer ("" if none).
pub fn error_message(body: &serde_json::Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The SoftHSM module path, found by the same script `make demo` uses.
pub fn softhsm_module() -> String {
    let out = run_ok(&mut Command::new(repo().join("scripts/softhsm-module.sh")));
    text(&out.stdout).trim().to_string()
}

/// The SoftHSM module initialized in this process and the slot of the test token
/// (`meshca-test`), for tests that reach the token with cryptoki directly, not through
/// meshca. The caller has set SOFTHSM2_CONF (a test binary of its own) and finalizes.
pub fn open_test_token() -> (cryptoki::context::Pkcs11, cryptoki::slot::Slot) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    let pkcs11 = Pkcs11::new(softhsm_module()).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label().trim() == "meshca-test")
        .expect("token");
    (pkcs11, slot)
}

/// A VirtualMesh YAML document.
pub fn virtual_mesh(
    namespace: &str,
    name: &str,
    ttl_days: u32,
    rsa_bits: u32,
    org: &str,
    meshes: &[&str],
) -> String {
    let mut yaml = format!(
        "apiVersion: networking.smh.solo.io/v1alpha1\nkind: VirtualMesh\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  displayName: test\n  certificateAuthority:\n    builtin:\n      ttlDays: {ttl_days}\n      rsaKeySizeBytes: {rsa_bits}\n      orgName: \"{org}\"\n  federation:\n    mode: PERMISSIVE\n  shared: {{}}\n  meshes:\n"
    );
    for mesh in meshes {
        let (ns, n) = mesh.split_once('/').unwrap();
        yaml.push_str(&format!("  - name: {n}\n    namespace: {ns}\n"));
    }
    yaml
}

/// How a test environment is set up.
pub struct EnvSpec {
    pub virtual_meshes: Vec<String>,
    pub root_virtual_mesh: String,
    pub root_key_type: KeyType,
    /// (identity URI, [(virtual mesh, mesh)])
    pub clients: Vec<(String, Vec<(String, String)>)>,
    pub sessions: usize,
    /// Appended to the signer config (e.g. a `[limits]` section).
    pub extra_toml: String,
    pub backend: Backend,
}

/// Where the root key lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SoftHSM token in the test's temp dir.
    Pkcs11,
    /// An OpenBao server started for the test.
    Vault(VaultSpec),
}

impl Backend {
    /// Both backends, for tests that must behave the same on each.
    pub fn both() -> [Backend; 2] {
        [Backend::Pkcs11, Backend::Vault(VaultSpec::default())]
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Pkcs11 => "pkcs11",
            Backend::Vault(_) => "vault",
        }
    }
}

/// How the OpenBao server and meshca's login to it are set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultSpec {
    /// A Raft-backed server that can be stopped and restarted (else `-dev`, in memory).
    pub persistent: bool,
    pub auth: VaultAuthSpec,
    /// vault.timeout_seconds in the signer config.
    pub timeout_seconds: u64,
}

impl Default for VaultSpec {
    fn default() -> Self {
        VaultSpec {
            persistent: false,
            auth: VaultAuthSpec::Token { ttl: None },
            timeout_seconds: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VaultAuthSpec {
    /// A token with the meshca policy in `vault/token` (0600); `ttl` e.g. "30s".
    Token { ttl: Option<String> },
    /// AppRole `meshca` with the meshca policy; its tokens live `token_ttl`.
    AppRole { token_ttl: String },
    /// Kubernetes auth: OpenBao asks `kubernetes_host` (a TokenReview fake) about `jwt`,
    /// which is written to `vault/jwt` (mode 0644, as Kubernetes mounts it); role
    /// `meshca` is bound to service account meshca/meshca-signer.
    Kubernetes {
        kubernetes_host: String,
        jwt: String,
    },
}

/// The Vault policy meshca needs: sign with, read and manage issuers of the `pki` mount,
/// and generate a root in it (`meshca root init`).
pub const MESHCA_VAULT_POLICY: &str = r#"
path "pki/root/generate/internal" { capabilities = ["update"] }
path "pki/issuer/+/sign-self-issued" { capabilities = ["update"] }
path "pki/issuer/*" { capabilities = ["read", "update", "patch", "delete"] }
path "pki/key/*" { capabilities = ["read", "delete"] }
path "pki/config/urls" { capabilities = ["read"] }
"#;

impl EnvSpec {
    /// The default environment, its virtual mesh's RSA minimum `rsa_bits` (4096 leaves
    /// P-256 out of the key types accepted).
    pub fn with_rsa_minimum(rsa_bits: u32) -> Self {
        EnvSpec {
            virtual_meshes: vec![virtual_mesh(
                "test",
                "vm",
                30,
                rsa_bits,
                "acme",
                &["test/cluster-a", "test/cluster-b"],
            )],
            ..EnvSpec::default()
        }
    }
}

impl Default for EnvSpec {
    /// One virtual mesh `test/vm` (org acme, 30 days, RSA minimum 2048) with meshes
    /// `test/cluster-a` and `test/cluster-b`; a P-384 root; client `cluster-a` may ask
    /// for `test/cluster-a` only, `cluster-b` for `test/cluster-b` only.
    fn default() -> Self {
        EnvSpec {
            virtual_meshes: vec![virtual_mesh(
                "test",
                "vm",
                30,
                2048,
                "acme",
                &["test/cluster-a", "test/cluster-b"],
            )],
            root_virtual_mesh: "test/vm".into(),
            root_key_type: KeyType::EcdsaP384,
            clients: vec![
                (
                    identity("cluster-a"),
                    vec![("test/vm".into(), "test/cluster-a".into())],
                ),
                (
                    identity("cluster-b"),
                    vec![("test/vm".into(), "test/cluster-b".into())],
                ),
            ],
            sessions: 2,
            extra_toml: String::new(),
            backend: Backend::Pkcs11,
        }
    }
}

impl EnvSpec {
    /// The default with a rate limit that never binds: for tests about load and faults.
    pub fn unlimited_rate() -> Self {
        EnvSpec {
            extra_toml: "[limits]\nsign_requests_per_minute = 1000000\nsign_burst = 100000\n"
                .into(),
            ..EnvSpec::default()
        }
    }

    /// The default, plus virtual mesh `test/strict` (10 days, RSA minimum 4096) whose only
    /// member `test/cluster-strict` client `cluster-a` may also ask for (a mesh is granted
    /// in one virtual mesh at most).
    pub fn with_strict_mesh() -> Self {
        let mut spec = EnvSpec::default();
        spec.virtual_meshes.push(virtual_mesh(
            "test",
            "strict",
            10,
            4096,
            "acme",
            &["test/cluster-strict"],
        ));
        spec.clients[0]
            .1
            .push(("test/strict".into(), "test/cluster-strict".into()));
        spec
    }
}

/// The client identity URI of a test client name.
pub fn identity(name: &str) -> String {
    format!("spiffe://meshca.test/cluster/{name}")
}

/// What [`Env::init_next_root`] and [`Env::switch_to_next_root`] replace in the config,
/// and with what: the root's key (a token object, or a Vault issuer) and its certificate.
const NEXT_ROOT_REPLACEMENTS: [(&str, &str); 3] = [
    ("object=root-ca\"", "object=root-ca-next\""),
    (
        "issuer_ref = \"meshca-root\"",
        "issuer_ref = \"meshca-root-next\"",
    ),
    (
        "certificate = \"root-cert.pem\"",
        "certificate = \"next-root-cert.pem\"",
    ),
];

/// The config with its root's key and certificate replaced by the next root's.
fn config_with_next_root(config: &str) -> String {
    let replaced = NEXT_ROOT_REPLACEMENTS
        .iter()
        .fold(config.to_string(), |text, (root, next)| {
            text.replace(root, next)
        });
    assert_eq!(
        replaced.matches("next").count(),
        config.matches("next").count() + 2,
        "no root key and certificate to replace in:\n{config}"
    );
    replaced
}

/// A prepared environment: token (or OpenBao) with a root, transport PKI, signer config.
pub struct Env {
    /// Declared first so it stops before the temp dir goes.
    pub openbao: Option<openbao::OpenBao>,
    pub dir: TempDir,
    pub config: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        Env::with(EnvSpec::default())
    }

    /// Sets up everything up to (and including) `meshca root init`.
    pub fn with(spec: EnvSpec) -> Env {
        let env = Env::prepare(&spec);
        env.run_with_config_ok(&["root", "init"]);
        env
    }

    /// Sets up token (or OpenBao) and config, without creating the root.
    pub fn prepare(spec: &EnvSpec) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("meshca-test-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        let (openbao, backend_toml) = match &spec.backend {
            Backend::Pkcs11 => {
                run_ok(
                    Command::new(repo().join("softhsm/setup-token-dir.sh"))
                        .arg(root.join("softhsm")),
                );
                let section = format!(
                    r#"backend = "pkcs11"

[pkcs11]
module = "{module}"
key = "pkcs11:token=meshca-test;object=root-ca"
pin_file = "softhsm/user-pin"
softhsm2_conf = "softhsm/softhsm2.conf"
sessions = {sessions}
"#,
                    module = softhsm_module(),
                    sessions = spec.sessions,
                );
                (None, section)
            }
            Backend::Vault(vault) => {
                let (bao, section) = prepare_openbao(root, vault);
                (Some(bao), section)
            }
        };
        let pki = root.join("pki");
        let script = repo().join("scripts/transport-pki.sh");
        run_ok(Command::new(&script).arg("ca").arg(&pki));
        run_ok(Command::new(&script).arg("server").arg(&pki).arg("signer"));
        let mut clients_toml = String::new();
        for (id, grants) in &spec.clients {
            let name = id.rsplit('/').next().unwrap();
            run_ok(
                Command::new(&script)
                    .arg("client")
                    .arg(&pki)
                    .arg(name)
                    .arg(id),
            );
            let allow: Vec<String> = grants
                .iter()
                .map(|(vm, mesh)| format!("{{ virtual_mesh = \"{vm}\", mesh = \"{mesh}\" }}"))
                .collect();
            clients_toml.push_str(&format!(
                "\n[[clients]]\nidentity = \"{id}\"\nallow = [{}]\n",
                allow.join(", ")
            ));
        }
        std::fs::write(
            root.join("virtual-meshes.yaml"),
            spec.virtual_meshes.join("---\n"),
        )
        .unwrap();
        let config = root.join("signer.toml");
        std::fs::write(
            &config,
            format!(
                r#"listen = "127.0.0.1:0"
virtual_meshes = ["virtual-meshes.yaml"]
audit_log = "audit.log"

[tls]
cert = "pki/signer.pem"
key = "pki/signer.key"
client_ca = "pki/ca.pem"

[root]
certificate = "root-cert.pem"
virtual_mesh = "{root_vm}"
key_type = "{key_type}"
{backend_toml}{clients_toml}
{extra}"#,
                root_vm = spec.root_virtual_mesh,
                key_type = spec.root_key_type,
                extra = spec.extra_toml,
            ),
        )
        .unwrap();
        let env = Env {
            openbao,
            dir,
            config,
        };
        if spec.backend == Backend::Pkcs11 {
            run_ok(
                env.meshca_with_config(&["token", "init"])
                    .arg("--so-pin-file")
                    .arg(env.path("softhsm/so-pin")),
            );
        }
        env
    }

    /// Another environment with a root of its own (its own token) but this one's
    /// transport PKI: the signer's TLS certificate and key, its CA, the clients'. What
    /// whoever stole the signer's TLS key (or got a certificate from that CA) can run: a
    /// real signer the agents here reach and trust over TLS, under another root.
    pub fn impostor(&self) -> Env {
        let other = Env::new();
        for entry in std::fs::read_dir(self.path("pki")).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), other.path("pki").join(entry.file_name())).unwrap();
            }
        }
        other
    }

    /// The test's OpenBao server (Vault environments only).
    pub fn bao(&self) -> &openbao::OpenBao {
        self.openbao.as_ref().expect("not a Vault environment")
    }

    pub fn bao_mut(&mut self) -> &mut openbao::OpenBao {
        self.openbao.as_mut().expect("not a Vault environment")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A `meshca` command running in the environment's directory.
    pub fn meshca(&self) -> Command {
        let mut cmd = Command::new(MESHCA);
        cmd.current_dir(self.dir.path());
        cmd
    }

    /// `scripts/transport-pki.sh COMMAND pki/ ARGS...` on this environment's transport PKI.
    pub fn transport_pki(&self, command: &str, args: &[&str]) {
        run_ok(
            Command::new(repo().join("scripts/transport-pki.sh"))
                .arg(command)
                .arg(self.path("pki"))
                .args(args),
        );
    }

    /// Makes the signer check client revocations from its start: a CRL that revokes only a
    /// spare client (so every client the tests use starts out trusted), named in `[tls]
    /// client_crls`. Call before starting the signer.
    pub fn check_client_crls(&self) {
        self.transport_pki("client", &["spare", &identity("spare")]);
        self.transport_pki("revoke", &["spare"]);
        let config = std::fs::read_to_string(&self.config).unwrap().replace(
            "client_ca = \"pki/ca.pem\"",
            "client_ca = \"pki/ca.pem\"\nclient_crls = [\"pki/crl.pem\"]",
        );
        std::fs::write(&self.config, config).unwrap();
    }

    /// Makes the root a root change moves to: `root init` under a copy of the config
    /// (`next-signer.toml`) whose key is token object `root-ca-next` (or Vault issuer
    /// `meshca-root-next`) and whose certificate is `next-root-cert.pem`. Returns that
    /// certificate's path.
    pub fn init_next_root(&self) -> PathBuf {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let next_config = self.path("next-signer.toml");
        std::fs::write(&next_config, config_with_next_root(&config)).unwrap();
        run_ok(
            self.meshca()
                .args(["root", "init", "--config"])
                .arg(&next_config),
        );
        self.path("next-root-cert.pem")
    }

    /// [`Env::init_next_root`], with a key of `key_type` (`ecdsa-p256`, `rsa3072`, ...)
    /// rather than the root's.
    pub fn init_next_root_of(&self, key_type: &str) -> PathBuf {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let next = config_with_next_root(&config)
            .lines()
            .map(|line| {
                if line.starts_with("key_type = ") {
                    format!("key_type = \"{key_type}\"")
                } else {
                    line.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let next_config = self.path("next-signer.toml");
        std::fs::write(&next_config, next + "\n").unwrap();
        run_ok(
            self.meshca()
                .args(["root", "init", "--config"])
                .arg(&next_config),
        );
        self.path("next-root-cert.pem")
    }

    /// Names `file` as `[root] next_certificate` in the signer config (None: no next root).
    pub fn announce_next_root(&self, file: Option<&str>) {
        self.announce_root("next_certificate", file);
    }

    /// Names `file` as `[root] previous_certificate` in the signer config (None: no
    /// previous root).
    pub fn announce_previous_root(&self, file: Option<&str>) {
        self.announce_root("previous_certificate", file);
    }

    /// Sets the `[root]` key `key` to `file`, or removes it.
    fn announce_root(&self, key: &str, file: Option<&str>) {
        let config = std::fs::read_to_string(&self.config).unwrap();
        let assignment = format!("{key} = ");
        let mut lines: Vec<String> = config
            .lines()
            .filter(|line| !line.starts_with(&assignment))
            .map(String::from)
            .collect();
        if let Some(file) = file {
            let at = lines
                .iter()
                .position(|l| l.starts_with("certificate = "))
                .unwrap();
            lines.insert(at + 1, format!("{assignment}\"{file}\""));
        }
        std::fs::write(&self.config, lines.join("\n") + "\n").unwrap();
    }

    /// The root change itself: the signer config names the next root's key and
    /// certificate (made by [`Env::init_next_root`]) and announces nothing (a previous
    /// root is announced apart, after the switch: this replaces `certificate = ` lines).
    pub fn switch_to_next_root(&self) {
        self.announce_next_root(None);
        let config = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, config_with_next_root(&config)).unwrap();
    }

    /// `meshca audit verify audit.log` must pass; returns what it printed.
    pub fn audit_verify_ok(&self) -> String {
        let out = run_ok(self.meshca().args(["audit", "verify", "audit.log"]));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("is intact"), "{stdout}");
        stdout
    }

    /// `meshca <args> --config <the signer config>` in the environment's directory.
    pub fn meshca_with_config(&self, args: &[&str]) -> Command {
        let mut cmd = self.meshca();
        cmd.args(args).arg("--config").arg(&self.config);
        cmd
    }

    /// The flags of `meshca request` and of `meshca agent` in directory mode that name the
    /// signer at `addr` and `client`'s transport credentials.
    /// `meshca request` to the signer at `addr` as `client` for mesh `test/<client>` of
    /// test/vm, into `out/`: ready to run.
    pub fn request_command(&self, addr: impl std::fmt::Display, client: &str) -> Command {
        let mut cmd = self.meshca();
        cmd.arg("request")
            .args(self.signer_flags(addr, client))
            .args(["--virtual-mesh", "test/vm", "--mesh"])
            .arg(format!("test/{client}"))
            .arg("--out-dir")
            .arg(self.path("out"));
        cmd
    }

    pub fn signer_flags(&self, addr: impl std::fmt::Display, client: &str) -> Vec<OsString> {
        vec![
            "--signer".into(),
            format!("https://{addr}").into(),
            "--ca-cert".into(),
            self.path("pki/ca.pem").into(),
            "--client-cert".into(),
            self.path(&format!("pki/{client}.pem")).into(),
            "--client-key".into(),
            self.path(&format!("pki/{client}.key")).into(),
        ]
    }

    /// Runs [`Env::meshca_with_config`] (it may fail).
    pub fn run_with_config(&self, args: &[&str]) -> Output {
        run(&mut self.meshca_with_config(args))
    }

    /// Runs [`Env::meshca_with_config`], which must succeed.
    pub fn run_with_config_ok(&self, args: &[&str]) -> Output {
        run_ok(&mut self.meshca_with_config(args))
    }

    pub fn user_pin(&self) -> String {
        std::fs::read_to_string(self.path("softhsm/user-pin"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.path("root-cert.pem")).unwrap()
    }

    /// Starts `meshca serve` on an OS-chosen port and waits until it listens.
    pub fn start_signer(&self) -> Signer {
        self.start_signer_with(&[])
    }

    pub fn start_signer_with(&self, extra: &[&str]) -> Signer {
        self.start_signer_command(|cmd| {
            cmd.args(extra);
        })
    }

    /// Starts `meshca serve` as [`Env::start_signer`] does, with `configure` applied to
    /// its command first (more arguments, a `pre_exec`).
    pub fn start_signer_command(&self, configure: impl FnOnce(&mut Command)) -> Signer {
        let mut command = self.meshca_with_config(&["--log-format", "json", "serve"]);
        configure(&mut command);
        self.spawn_signer(command)
    }

    /// Starts the signer as [`Env::start_signer`] does, its clock offset by what the file
    /// `offset` says (libfaketime's syntax, `+2h`), read again at every call: a test moves
    /// the signer's clock while it runs by writing the file.
    pub fn start_signer_with_clock_file(&self, offset: &Path) -> Signer {
        let library = libfaketime();
        self.start_signer_command(|cmd| {
            cmd.env("LD_PRELOAD", &library)
                .env("FAKETIME_TIMESTAMP_FILE", offset)
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        })
    }

    /// Starts the signer as [`Env::start_signer`] does, with its clock `offset` ahead
    /// (libfaketime's FAKETIME syntax: `+31d`): libfaketime preloaded into the signer
    /// itself, so the [`Signer`] is the process that serves, and its token too.
    pub fn start_signer_in_the_future(&self, offset: &str) -> Signer {
        let library = libfaketime();
        self.start_signer_command(|cmd| {
            cmd.env("LD_PRELOAD", &library).env("FAKETIME", offset);
        })
    }

    fn spawn_signer(&self, mut command: Command) -> Signer {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshca serve");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let reader = {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                        && let Some(api) = value.get("api").and_then(|a| a.as_str())
                    {
                        let _ = tx.send(api.to_string());
                    }
                    logs.lock().unwrap().push(line);
                }
            })
        };
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!("signer did not start:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        Signer {
            child,
            addr,
            logs,
            reader: Some(reader),
            dir: self.dir.path().to_path_buf(),
        }
    }

    /// An HTTPS client presenting the named client's certificate.
    pub fn client(&self, name: &str) -> reqwest::Client {
        let tls = meshca::tlsutil::client_config(
            &self.path("pki/ca.pem"),
            &self.path(&format!("pki/{name}.pem")),
            &self.path(&format!("pki/{name}.key")),
        )
        .unwrap();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .unwrap()
    }
}

/// Starts OpenBao in `root/openbao`, with a `pki` mount, the meshca policy and meshca's
/// credentials in `root/vault/` (0600); returns it and the config's backend section.
fn prepare_openbao(root: &Path, spec: &VaultSpec) -> (openbao::OpenBao, String) {
    let dir = root.join("openbao");
    let bao = if spec.persistent {
        openbao::OpenBao::persistent(&dir)
    } else {
        openbao::OpenBao::dev(&dir)
    };
    bao.enable_pki("pki");
    bao.write_policy("meshca", MESHCA_VAULT_POLICY);
    let creds = root.join("vault");
    std::fs::create_dir_all(&creds).unwrap();
    let auth = match &spec.auth {
        VaultAuthSpec::Token { ttl } => {
            let mut extra = vec![];
            let ttl_flag = ttl.as_ref().map(|t| format!("-ttl={t}"));
            if let Some(flag) = &ttl_flag {
                extra.push(flag.as_str());
            }
            let token = bao.create_token(&["meshca"], &extra);
            openbao::write_secret(&creds.join("token"), &token);
            "method = \"token\"\ntoken_file = \"vault/token\"\n".to_string()
        }
        VaultAuthSpec::AppRole { token_ttl } => {
            let (role_id, secret_id) = bao.create_approle(
                "meshca",
                &[
                    "token_policies=meshca",
                    &format!("token_ttl={token_ttl}"),
                    "token_max_ttl=24h",
                ],
            );
            openbao::write_secret(&creds.join("role-id"), &role_id);
            openbao::write_secret(&creds.join("secret-id"), &secret_id);
            "method = \"approle\"\nrole_id_file = \"vault/role-id\"\nsecret_id_file = \"vault/secret-id\"\n"
                .to_string()
        }
        VaultAuthSpec::Kubernetes {
            kubernetes_host,
            jwt,
        } => {
            bao.cli_ok(&["auth", "enable", "kubernetes"]);
            // OpenBao insists on a CA bundle for the API server; any certificate will do
            // for a plain-http fake.
            let ca = root.join("openbao/kubernetes-ca.pem");
            run_ok(
                Command::new("openssl")
                    .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                    .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
                    .args(["-subj", "/CN=fake kubernetes", "-keyout"])
                    .arg(root.join("openbao/kubernetes-ca.key"))
                    .arg("-out")
                    .arg(&ca),
            );
            bao.cli_ok(&[
                "write",
                "auth/kubernetes/config",
                &format!("kubernetes_host={kubernetes_host}"),
                "disable_local_ca_jwt=true",
                &format!("kubernetes_ca_cert=@{}", ca.display()),
            ]);
            bao.cli_ok(&[
                "write",
                "auth/kubernetes/role/meshca",
                "bound_service_account_names=meshca-signer",
                "bound_service_account_namespaces=meshca",
                "token_policies=meshca",
                "token_ttl=1h",
            ]);
            std::fs::write(creds.join("jwt"), jwt).unwrap();
            "method = \"kubernetes\"\nrole = \"meshca\"\njwt_file = \"vault/jwt\"\n".to_string()
        }
    };
    let section = format!(
        "backend = \"vault\"\n\n[vault]\naddress = \"{address}\"\nmount = \"pki\"\nissuer_ref = \"meshca-root\"\ntimeout_seconds = {timeout}\nconnect_timeout_seconds = 2\n\n[vault.auth]\n{auth}",
        address = bao.address(),
        timeout = spec.timeout_seconds,
    );
    (bao, section)
}

/// A running signer; killed when dropped.
pub struct Signer {
    pub child: Child,
    pub addr: SocketAddr,
    /// Lines of stderr, as a reader thread takes them: a line written while a request
    /// was served may not be here yet when its answer arrives (wait for it with
    /// [`Signer::wait_for_log`]).
    pub logs: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl Signer {
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits (at most 30 s) for a log line containing `needle`; returns that line.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_nth_log(needle, 1).await
    }

    /// Waits (at most 30 s) for the `n`th log line containing `needle` (from 1); returns it.
    pub async fn wait_for_nth_log(&self, needle: &str, n: usize) -> String {
        self.wait_for_nth_log_within(needle, n, Duration::from_secs(30))
            .await
    }

    /// Waits at most `within` for the `n`th log line containing `needle`; returns it.
    pub async fn wait_for_nth_log_within(
        &self,
        needle: &str,
        n: usize,
        within: Duration,
    ) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(line) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
            {
                return line.clone();
            }
            if std::time::Instant::now() >= deadline {
                panic!("no log line #{n} with {needle:?} in:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Prometheus text of `/metrics`, fetched by `client`.
    pub async fn metrics(&self, client: &reqwest::Client) -> String {
        self.get_text(client, "/metrics").await
    }

    /// The body of a GET of `path`, fetched by `client`.
    pub async fn get_text(&self, client: &reqwest::Client, path: &str) -> String {
        client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The JSON answer of a GET of `path`, fetched by `client`.
    pub async fn get_json(&self, client: &reqwest::Client, path: &str) -> serde_json::Value {
        client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// SIGTERM, then wait for exit; returns whether it exited successfully. Every line
    /// the signer wrote is in the logs then.
    pub fn terminate(&mut self) -> bool {
        self.terminate_status().success()
    }

    /// SIGTERM, then its exit status, waiting at most [`EXIT_WAIT`] (the test fails with
    /// the logs past it). Every line the signer wrote is in the logs then.
    pub fn terminate_status(&mut self) -> std::process::ExitStatus {
        send_signal(self.child.id(), "TERM");
        let status = wait_within(&mut self.child, EXIT_WAIT).unwrap_or_else(|| {
            panic!(
                "the signer did not exit within {EXIT_WAIT:?} of SIGTERM:\n{}",
                self.logs()
            )
        });
        self.read_all_logs();
        status
    }

    /// Once the process has exited: waits until every line it wrote is in the logs.
    pub fn read_all_logs(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Audit lines that parse (a line torn by a crash is skipped), but `start` and `stop`
    /// records.
    pub fn audit_lines_lossy(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(made_by_the_test)
            .collect()
    }

    /// The audit lines the test made (decisions, reloads, ...): every line but the `start`
    /// record each start of the signer writes first and the `stop` record each clean stop
    /// writes last ([`Signer::all_audit_lines`] has them).
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.all_audit_lines()
            .into_iter()
            .filter(made_by_the_test)
            .collect()
    }

    /// The audit lines of intermediates issued (rule `issued`).
    pub fn issued_lines(&self) -> Vec<serde_json::Value> {
        self.audit_lines()
            .into_iter()
            .filter(|l| l["rule"] == "issued")
            .collect()
    }

    /// Every line of the audit log.
    pub fn all_audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Not a `start` or `stop` record, which the signer writes whatever the test does.
fn made_by_the_test(line: &serde_json::Value) -> bool {
    line["event"] != "start" && line["event"] != "stop"
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` (its name without `SIG`) to `pid`, which must take it. kill(2) itself,
/// not the `kill` command: slim images may lack procps, and a signal not sent would leave
/// the test waiting for what it should have caused.
pub fn send_signal(pid: u32, signal: &str) {
    let number = match signal {
        "TERM" => libc::SIGTERM,
        "HUP" => libc::SIGHUP,
        "KILL" => libc::SIGKILL,
        "INT" => libc::SIGINT,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        other => panic!("send_signal: SIG{other} is not one the tests send"),
    };
    let pid_t = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let sent = unsafe { libc::kill(pid_t, number) };
    assert!(
        sent == 0,
        "kill -{signal} {pid} failed: {}",
        std::io::Error::last_os_error()
    );
}

/// How long a process asked to stop (SIGTERM) may take to exit: a signer drains for far
/// less. Past it the test fails instead of hanging the suite.
pub const EXIT_WAIT: Duration = Duration::from_secs(60);

/// `child`'s exit status once it has exited, waiting at most `within` (None: still running).
pub fn wait_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CSR PEM for a fresh key of `key_type`, subject O=org, CN=cn.
pub fn csr(key_type: KeyType, org: &str, cn: &str) -> (PrivateKey, String) {
    let key = PrivateKey::generate(key_type).unwrap();
    let pem = build_csr(&key, subject_name(org, cn).unwrap())
        .unwrap()
        .to_pem(der::pem::LineEnding::LF)
        .unwrap();
    (key, pem)
}

/// The JSON body of a signing request.
pub fn sign_body(vm: &str, mesh: &str, csr: &str) -> serde_json::Value {
    serde_json::json!({"virtualMesh": vm, "mesh": mesh, "csr": csr})
}

/// POSTs a signing request; returns (status, JSON body).
pub async fn post_sign(
    client: &reqwest::Client,
    signer: &Signer,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client
        .post(signer.url("/v1/sign"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let json = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// A `test/cluster-a` signing request by `client` (cluster-a's) with a CSR of its own:
/// the status and the answer.
pub async fn sign_fresh(client: &reqwest::Client, signer: &Signer) -> (u16, serde_json::Value) {
    let (_key, csr) = csr(KeyType::EcdsaP256, "acme", "a");
    post_sign(
        client,
        signer,
        &sign_body("test/vm", "test/cluster-a", &csr),
    )
    .await
}

/// A raw TLS connection presenting the named client's certificate.
pub async fn tls_connect(
    env: &Env,
    signer: &Signer,
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = meshca::tlsutil::client_config(
        &env.path("pki/ca.pem"),
        &env.path(&format!("pki/{name}.pem")),
        &env.path(&format!("pki/{name}.key")),
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(signer.addr).await.unwrap();
    let server_name = rustls_pki_types::ServerName::IpAddress(signer.addr.ip().into());
    connector.connect(server_name, tcp).await.unwrap()
}

/// The signer still issues: a fresh `test/cluster-a` request by `client` (cluster-a's)
/// gets its intermediate.
pub async fn assert_still_issues(client: &reqwest::Client, signer: &Signer) {
    let (status, answer) = sign_fresh(client, signer).await;
    assert_eq!(status, 200, "the signer no longer issues: {answer}");
}

/// A tool `scripts/install-deps.sh` puts at `in_repo` (relative to the repository), else
/// `name` on PATH; missing, the test fails saying so (it is never skipped).
pub fn installed_tool(in_repo: &str, name: &str) -> PathBuf {
    let installed = repo().join(in_repo);
    if installed.is_file() {
        return installed;
    }
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        on_path.status.success(),
        "{name} is missing: run scripts/install-deps.sh (make test does)"
    );
    PathBuf::from(text(&on_path.stdout).trim())
}

/// The lines `child` writes to its piped stderr, as they come (read on a thread of their
/// own, so that the child never blocks on a full pipe).
pub fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = send.send(line);
        }
    });
    lines
}

/// libfaketime's library (`scripts/install-deps.sh` installs the faketime package);
/// missing, the test fails saying so (it is never skipped).
pub fn libfaketime() -> PathBuf {
    // /usr/lib/<multiarch triplet>/faketime on Debian, /usr/lib64/faketime elsewhere.
    ["/usr/lib", "/usr/lib64", "/usr/local/lib"]
        .into_iter()
        .flat_map(|base| {
            let base = Path::new(base);
            let mut dirs = vec![base.join("faketime")];
            if let Ok(entries) = std::fs::read_dir(base) {
                dirs.extend(entries.flatten().map(|e| e.path().join("faketime")));
            }
            dirs
        })
        .map(|dir| dir.join("libfaketime.so.1"))
        .find(|library| library.is_file())
        .expect("libfaketime is missing: run scripts/install-deps.sh (make test does)")
}

/// An address on 127.0.0.1 nobody listens on (a port bound, then released).
pub fn closed_addr() -> String {
    format!("127.0.0.1:{}", openbao::free_port())
}

/// The value of the sample `name` (labels included, as printed) in a Prometheus text
/// exposition.
pub fn metric_sample(exposition: &str, name: &str) -> Option<i64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A certificate file's notBefore or notAfter (`which`: `startdate`, `enddate`) in Unix
/// seconds, as openssl and date read it (an independent check of meshca's own parsing).
pub fn certificate_date_unix(cert: &Path, which: &str) -> i64 {
    openssl_date_unix("x509", cert, which)
}

/// A date of a certificate or CRL (`object`: `x509` or `crl`) as `openssl OBJECT -noout
/// -WHICH` prints it (`enddate`, `nextupdate`, ...), in Unix seconds.
pub fn openssl_date_unix(object: &str, path: &Path, which: &str) -> i64 {
    let line = text(
        &run_ok(
            Command::new("openssl")
                .args([object, "-noout", &format!("-{which}"), "-in"])
                .arg(path),
        )
        .stdout,
    );
    let (_, date) = line.trim().split_once('=').unwrap();
    let out = run_ok(Command::new("date").args(["-u", "-d", date, "+%s"]));
    text(&out.stdout).trim().parse().unwrap()
}

/// `openssl <args>` that must succeed; returns stdout.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    text(&run_ok(Command::new("openssl").current_dir(dir).args(args)).stdout)
}
