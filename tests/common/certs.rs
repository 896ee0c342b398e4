//! Certificates as the tests make and check them with the `openssl` CLI, the independent
//! implementation: CSRs for keys and extensions meshca would never produce, the root's
//! self-signature and profile, a signer's answer as a cacerts directory, the chain check,
//! and workloads of two clusters in an mTLS handshake.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use der::EncodePem;
use meshca::pki::csr::build_csr;
use meshca::pki::keys::{KeyType, PrivateKey};
use meshca::pki::profile::subject_name;
use serde_json::Value;

use super::{Env, EnvSpec, openssl, run, run_ok, send_signal, text, write};

/// `genpkey` arguments of a P-256 key (a transport client certificate's).
pub const KEYGEN_P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
/// `genpkey` arguments of a P-384 key (the roots [`openssl_self_signed_ca`] makes).
pub const KEYGEN_P384: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"];
/// `genpkey` arguments of keys meshca refuses, for [`openssl_csr`].
pub const KEYGEN_P521: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"];
pub const KEYGEN_ED25519: &[&str] = &["-algorithm", "ED25519"];
pub const KEYGEN_RSA1024: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"];
pub const KEYGEN_RSA_EXPONENT_3: &[&str] = &[
    "-algorithm",
    "RSA",
    "-pkeyopt",
    "rsa_keygen_bits:2048",
    "-pkeyopt",
    "rsa_keygen_pubexp:3",
];

/// A well-formed P-256 CSR for O=org, CN=cn whose subject was then changed to CN=renamed:
/// its signature no longer verifies (proof of possession fails).
pub fn tampered_csr(org: &str, cn: &str, renamed: &str) -> String {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let mut req = build_csr(&key, subject_name(org, cn).unwrap()).unwrap();
    req.info.subject = subject_name(org, renamed).unwrap();
    req.to_pem(der::pem::LineEnding::LF).unwrap()
}

/// A CSR made by openssl: a `genpkey` key with `keygen`, then `req -new` with `subject`
/// and `extra` arguments (e.g. `-addext`). Files go to `dir` as `{name}.key|.csr`.
pub fn openssl_csr(
    dir: &Path,
    name: &str,
    keygen: &[&str],
    subject: &str,
    extra: &[&str],
) -> String {
    let key = format!("{name}.key");
    let mut args = vec!["genpkey"];
    args.extend_from_slice(keygen);
    args.extend_from_slice(&["-out", &key]);
    openssl(dir, &args);
    let out = format!("{name}.csr");
    let mut args = vec!["req", "-new", "-key", &key, "-subj", subject, "-out", &out];
    args.extend_from_slice(extra);
    openssl(dir, &args);
    std::fs::read_to_string(dir.join(out)).unwrap()
}

/// Asserts openssl verifies the environment's root-cert.pem as self-signed (`tag` names
/// the case in the message) and returns openssl's text of it.
pub fn openssl_root_text(env: &Env, tag: &str) -> String {
    let root = env.path("root-cert.pem");
    let root = root.to_str().unwrap();
    let verified = openssl(env.dir.path(), &["verify", "-CAfile", root, root]);
    assert!(verified.contains(": OK"), "{tag}: {verified}");
    openssl(env.dir.path(), &["x509", "-in", root, "-noout", "-text"])
}

/// Writes a signing answer's certificate, chain and root as a cacerts directory's files.
pub fn write_answer(dir: &Path, answer: &Value) {
    std::fs::create_dir_all(dir).unwrap();
    write(dir, "ca-cert.pem", answer["certificate"].as_str().unwrap());
    write(dir, "cert-chain.pem", answer["certChain"].as_str().unwrap());
    write(dir, "root-cert.pem", answer["rootCert"].as_str().unwrap());
}

/// `openssl verify` of a cacerts directory's ca-cert.pem through cert-chain.pem to
/// root-cert.pem; returns what openssl printed.
pub fn openssl_verify_bundle(dir: &Path) -> String {
    openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "ca-cert.pem",
        ],
    )
}

/// Writes the answer's PEMs to a directory and verifies them with openssl.
pub fn openssl_verifies(env: &Env, body: &Value, tag: &str) -> String {
    let dir = env.path(tag);
    write_answer(&dir, body);
    let verified = openssl_verify_bundle(&dir);
    assert!(verified.contains("ca-cert.pem: OK"), "{tag}: {verified}");
    openssl(&dir, &["x509", "-in", "ca-cert.pem", "-noout", "-text"])
}

/// A leaf signed as istiod would with the intermediate in `dir` (ca-cert.pem and
/// ca-key.pem), with `san` as its subjectAltName; then `openssl verify` of it through
/// cert-chain.pem to root-cert.pem, for a client certificate. Returns what openssl printed
/// and whether it verified.
pub fn leaf_verifies(dir: &Path, name: &str, san: &str) -> (String, bool) {
    let cert = format!("{name}.pem");
    Workload::issue_with_san(dir, dir, name, san);
    let out = run(Command::new("openssl").current_dir(dir).args([
        "verify",
        "-CAfile",
        "root-cert.pem",
        "-untrusted",
        "cert-chain.pem",
        "-purpose",
        "sslclient",
        &cert,
    ]));
    (
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
        out.status.success(),
    )
}

/// The intermediate answered into `dir` (ca-cert.pem, cert-chain.pem, root-cert.pem),
/// with `key` its key, carries the name constraints of `trustDomains: [pay.local]`: a leaf
/// for `spiffe://pay.local/...` signed with it verifies, one for `spiffe://web.local/...`
/// fails as outside the permitted subtree.
pub fn assert_constrained_to_pay_local(dir: &Path, key: &PrivateKey) {
    std::fs::write(
        dir.join("ca-key.pem"),
        key.to_pkcs8_pem().unwrap().as_bytes(),
    )
    .unwrap();
    let (out, ok) = leaf_verifies(dir, "pay", "URI:spiffe://pay.local/ns/a/sa/b");
    assert!(ok && out.contains("pay.pem: OK"), "{out}");
    let (out, ok) = leaf_verifies(dir, "web", "URI:spiffe://web.local/ns/web/sa/frontend");
    assert!(!ok && out.contains("permitted subtree violation"), "{out}");
}

/// A self-signed P-384 CA made by openssl, `<name>.pem` and `<name>.key` in `dir`, with
/// meshca's root extensions and `subject`, valid over `days` counted from now (`0..30`: 30
/// days from now; `-30..-1`: it ended yesterday). Made by `openssl ca -selfsign`, which
/// takes both dates (`openssl req -x509` cannot start one in the past). Returns the
/// certificate.
pub fn openssl_self_signed_ca(
    dir: &Path,
    name: &str,
    subject: &str,
    days: std::ops::Range<i32>,
) -> PathBuf {
    openssl_csr(dir, name, KEYGEN_P384, subject, &[]);
    let (key, csr, cert) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    // A throwaway CA database of its own, so several such roots can share `dir`.
    let db = format!("{name}.ca");
    std::fs::create_dir_all(dir.join(&db)).unwrap();
    write(dir, &format!("{db}/index.txt"), "");
    // Named by the config, though -rand_serial (a long serial, as the root profile wants)
    // does not read it.
    write(dir, &format!("{db}/serial"), "1000\n");
    write(
        dir,
        &format!("{db}/ca.cnf"),
        &format!(
            "[ca]\ndefault_ca = self\n[self]\ndatabase = {db}/index.txt\nserial = {db}/serial\nnew_certs_dir = {db}\n\
             default_md = sha384\npolicy = any\nunique_subject = no\ncopy_extensions = none\n\
             x509_extensions = root\n[any]\norganizationName = optional\ncommonName = optional\n\
             [root]\nbasicConstraints = critical,CA:TRUE,pathlen:1\n\
             keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid:always\n"
        ),
    );
    let date = |offset: i32| {
        let out = text(
            &run_ok(Command::new("date").args([
                "-u",
                "-d",
                &format!("{offset} days"),
                "+%Y%m%d%H%M%SZ",
            ]))
            .stdout,
        );
        out.trim().to_string()
    };
    openssl(
        dir,
        &[
            "ca",
            "-batch",
            "-selfsign",
            "-rand_serial",
            "-notext",
            "-preserveDN",
            "-config",
            &format!("{db}/ca.cnf"),
            "-keyfile",
            &key,
            "-in",
            &csr,
            "-startdate",
            &date(days.start),
            "-enddate",
            &date(days.end),
            "-out",
            &cert,
        ],
    );
    dir.join(cert)
}

/// SHA-256 of a certificate file, as openssl computes it (lowercase hex, no colons).
pub fn openssl_fingerprint(dir: &Path, file: &Path) -> String {
    let out = openssl(
        dir,
        &[
            "x509",
            "-in",
            file.to_str().unwrap(),
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    );
    let (_, hex) = out.trim().split_once('=').unwrap();
    hex.replace(':', "").to_ascii_lowercase()
}

/// `meshca serve` with another environment's root certificate in place of this one's:
/// asserts that the signer refuses to start, and returns its stderr.
pub fn serve_with_a_foreign_root(env: &Env) -> String {
    let other = Env::with(EnvSpec::default());
    std::fs::copy(other.path("root-cert.pem"), env.path("root-cert.pem")).unwrap();
    let out = env.run_with_config(&["serve"]);
    // A failure other than a refused PIN: the ordinary status, which a supervisor retries.
    assert_eq!(out.status.code(), Some(1));
    text(&out.stderr)
}

/// A workload certificate issued from a cluster's intermediate as istiod would (P-256,
/// SPIFFE ID `spiffe://cluster.local/ns/default/sa/<name>`), with that cluster's
/// cacerts: one side of an mTLS handshake. Files `<name>.pem` and `<name>.key`.
pub struct Workload {
    pub name: String,
    pub cacerts: PathBuf,
}

impl Workload {
    pub fn issue(dir: &Path, cacerts: &Path, name: &str) -> Workload {
        let san = format!("URI:spiffe://cluster.local/ns/default/sa/{name}");
        Workload::issue_with_san(dir, cacerts, name, &san)
    }

    /// [`Workload::issue`] with `san` (openssl's subjectAltName syntax) as its names.
    pub fn issue_with_san(dir: &Path, cacerts: &Path, name: &str, san: &str) -> Workload {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let cert = format!("{name}.pem");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/",
            ],
        );
        let ext = write(
            dir,
            &format!("{name}.ext"),
            &format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,{san}\n"
            ),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                cacerts.join("ca-cert.pem").to_str().unwrap(),
                "-CAkey",
                cacerts.join("ca-key.pem").to_str().unwrap(),
                "-set_serial",
                "0x4a1b2c3d4e5f",
                "-days",
                "1",
                "-sha256",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                &cert,
            ],
        );
        Workload {
            name: name.to_string(),
            cacerts: cacerts.to_path_buf(),
        }
    }

    /// `openssl s_server` / `s_client` arguments: this workload's certificate, key and
    /// chain, and its cluster's root-cert.pem as the only roots it trusts.
    fn tls_args(&self) -> Vec<OsString> {
        vec![
            "-cert".into(),
            format!("{}.pem", self.name).into(),
            "-key".into(),
            format!("{}.key", self.name).into(),
            "-cert_chain".into(),
            self.cacerts.join("cert-chain.pem").into(),
            "-CAfile".into(),
            self.cacerts.join("root-cert.pem").into(),
        ]
    }
}

/// What each side of one handshake printed.
#[derive(Debug)]
pub struct Handshake {
    pub client: String,
    pub server: String,
}

impl Handshake {
    const HELLO: &str = "hello over mTLS";

    /// Both sides verified the other and the client's line arrived.
    pub fn ok(&self) -> bool {
        self.client.contains("Verify return code: 0 (ok)") && self.server.contains(Self::HELLO)
    }

    pub fn assert_ok(&self) {
        assert!(self.ok(), "{self:#?}");
    }
}

/// One mTLS connection from `client` to `server` (openssl s_server and s_client, the seed
/// guide's own check): each side presents its certificate and chain and verifies the
/// other's against its own cluster's root-cert.pem only; the client then sends a line.
pub fn mtls_handshake(dir: &Path, server: &Workload, client: &Workload) -> Handshake {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Its stdin stays open while it serves (s_server stops at the end of its input); it
    // ends after one connection, whether the handshake succeeds or not, so it is not
    // probed: it says ACCEPT once it listens. `timeout` bounds both openssl processes:
    // neither may hang the suite.
    let mut server_process = Command::new("timeout")
        .current_dir(dir)
        .args(["30", "openssl", "s_server", "-naccept", "1"])
        .arg("-accept")
        .arg(format!("127.0.0.1:{port}"))
        .args(server.tls_args())
        .args(["-Verify", "3", "-verify_return_error"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server_output = Output::read(server_process.stdout.take().unwrap());
    assert!(
        server_output.wait_for("ACCEPT"),
        "s_server did not start: {}",
        server_output.text()
    );
    let mut client_process = Command::new("timeout")
        .current_dir(dir)
        .args([
            "30",
            "openssl",
            "s_client",
            "-showcerts",
            "-verify_return_error",
        ])
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"))
        .args(client.tls_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client_process.stdin.take().unwrap();
    // A refused handshake may have closed the pipe already.
    let _ = writeln!(stdin, "{}", Handshake::HELLO);
    // s_server writes what it received as it arrives (unbuffered): the line comes once
    // both sides accepted each other; after a refusal s_server ends instead. Only then
    // does the client's input end (s_client stops there), and s_server is stopped
    // (`timeout` passes SIGTERM on to openssl). No fixed wait: a slow host only delays.
    server_output.wait_for(Handshake::HELLO);
    drop(stdin);
    let client_out = client_process.wait_with_output().unwrap();
    let received = server_output.text();
    send_signal(server_process.id(), "TERM");
    let server_out = server_process.wait_with_output().unwrap();
    Handshake {
        client: format!("{}\n{}", text(&client_out.stdout), text(&client_out.stderr)),
        server: format!("{received}\n{}", text(&server_out.stderr)),
    }
}

/// A process's output as it comes, read on a thread that is left behind, so a process
/// keeping its output open cannot hang the caller once what it waits for is there.
struct Output {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Output {
    fn read(mut output: impl std::io::Read + Send + 'static) -> Output {
        let (sender, chunks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = output.read(&mut buf) {
                if sender.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Output {
            chunks,
            seen: Vec::new(),
        }
    }

    /// Reads until everything so far contains `needle` (true) or the output ends (false).
    fn wait_for(&mut self, needle: &str) -> bool {
        while !self.text().contains(needle) {
            match self.chunks.recv() {
                Ok(chunk) => self.seen.extend(chunk),
                Err(_) => return false,
            }
        }
        true
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }
}
