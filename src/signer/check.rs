//! `meshca serve --check`: every file a start reads, checked the way the start checks it,
//! without contacting the token or Vault and without binding the listeners. For CI on a
//! config change and for `systemctl reload` (the unit runs it before sending SIGHUP).
//! `--online` adds the backend's start: the token or Vault login and the root key in it,
//! for a check before a restart.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::audit::rfc3339;
use super::server::{
    StartError, TlsFiles, check_root_key_type, clock_reaches_certificates, load_root, mesh_roots,
    read_pin, serving_tls, start_backend,
};
use crate::backend::vault::client::VaultClient;
use crate::config::{BackendSettings, SignerConfig};
use crate::pki::keys::PublicKeyKind;
use crate::tlsutil::CrlOverdue;

/// What is about to expire this soon is named (as the alerts do for the signer's TLS
/// certificate).
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// What the check found: enough to see that the files read are the intended ones.
#[derive(Debug)]
pub struct CheckReport {
    pub config: String,
    pub virtual_meshes: Vec<String>,
    pub clients: usize,
    pub root: String,
    /// The roots announced besides the root in force: ("next root" or "previous root",
    /// what it is).
    pub announced_roots: Vec<(&'static str, String)>,
    /// The digest a signer started with this config names the rules by (its audit log's
    /// `rulesSha256`, its `meshca_rules_info`): the same on every replica meant to be alike.
    pub rules_sha256: String,
    /// The rules that digest is of, one statement a line as the audit log's `start` record
    /// holds them (root, virtual meshes, each client's grants, every limit, announced roots).
    pub rules: String,
    /// `listen` and `ops_listen`.
    pub listen: String,
    /// `[tls] client_crl_overdue`.
    pub client_crl_overdue: String,
    pub server_certificate_not_after: SystemTime,
    /// Each client CRL file and when it is due to be replaced.
    pub client_crls: Vec<String>,
    pub backend: String,
    pub audit_log: String,
    /// Nothing in them stops a start; an operator should still act.
    pub warnings: Vec<String>,
    /// With `--online`: the backend as the start found it.
    pub online: Option<String>,
}

/// Checks what `meshca serve` would read from disk at start: the config and its VirtualMesh
/// files (already loaded into `config`), the root certificate and its strength against
/// every policy, the TLS files (server certificate and key, client CA, CRLs), the backend's
/// local files and secrets (PKCS#11 module, PIN; Vault CA, credentials) and the audit log's
/// place. Secrets are read and dropped, never shown. The listen addresses are checked
/// as the start uses them, `listen_override` (`--listen`) in place of `listen`. `now`
/// dates the expiry warnings.
pub fn check(
    config: &SignerConfig,
    listen_override: Option<SocketAddr>,
    now: SystemTime,
) -> Result<CheckReport, StartError> {
    config.check_listeners(listen_override)?;
    let root = load_root(config)?;
    check_root_key_type(config, &root)?;
    config.check_apart_from_root(&root.subject)?;
    let roots = mesh_roots(&root, &config.root.certificate, config.root.announced())
        .map_err(crate::tlsutil::TlsError::from)?;
    let tls = serving_tls(&TlsFiles::of(config), &roots, None)?;
    crate::tlsutil::check_issuer_pins(
        &config.client_ca,
        config.authorization.issuers(),
        &tls.client_cas,
    )
    .map_err(crate::tlsutil::TlsError::from)?;
    clock_reaches_certificates(&root, &tls.certificate, config, now)?;
    let backend = check_backend(config)?;
    let (audit_log, torn_tail, audit_mode) = check_audit_log(&config.audit_log)?;

    let mut warnings = Vec::new();
    if torn_tail > 0 {
        warnings.push(format!(
            "the audit log ends in an incomplete line of {torn_tail} bytes (a crash mid-write): the start moves it aside and records a recovery"
        ));
    }
    if audit_mode & 0o022 != 0 {
        warnings.push(format!(
            "the audit log is writable by group or others (mode {audit_mode:o}): the start removes their write access if the signer's user owns it (only the signer should write it)"
        ));
    }
    if audit_mode & 0o004 != 0 {
        warnings.push(format!(
            "the audit log is readable by every user (mode {audit_mode:o}; its lines name clients and decisions): chmod o-r"
        ));
    }
    // An expired announced root does not stop a start: the agents skip it.
    let announced_expiries = config.root.announced().map(|a| {
        let what = format!("the {} ({})", a.announcement.name(), a.announcement.key());
        (what, a.not_after)
    });
    let expiries = [
        ("the root certificate".to_string(), root.not_after),
        (
            "the signer's TLS certificate".to_string(),
            tls.certificate.not_after,
        ),
        (
            "a client CA certificate (tls.client_ca)".to_string(),
            tls.client_ca_not_after,
        ),
    ];
    for (what, not_after) in expiries.into_iter().chain(announced_expiries) {
        if not_after <= now {
            warnings.push(format!("{what} expired at {}", rfc3339(not_after)));
        } else if not_after <= now + EXPIRY_WARNING {
            warnings.push(format!("{what} expires at {}", rfc3339(not_after)));
        }
    }
    // The start raises the soft limit up to the hard one, so the hard one is what counts
    // (read in this process: under the same unit or shell as the signer, the same limit).
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        && let Some(shortfall) =
            super::server::open_files_shortfall(hard, config.limits.max_connections)
    {
        warnings.push(shortfall);
    }
    for superseded in &tls.superseded_crls {
        warnings.push(format!("{superseded}; remove it from the file"));
    }
    warnings.extend(tls.client_ca_crl_problems.iter().cloned());
    warnings.extend(config.policies.trust_domain_warnings());
    if let Some(open) = &tls.key_readable_by_others {
        warnings.push(open.to_string());
    }
    let unpinned: Vec<&str> = config
        .authorization
        .clients()
        .map(|(identity, _)| identity)
        .filter(|identity| config.authorization.issuer_of(identity).is_none())
        .collect();
    warnings.extend(crate::tlsutil::unpinned_clients_warning(
        &tls.client_cas,
        &unpinned,
    ));
    for crl in &tls.crl_next_updates {
        if let Some(due) = crl.overdue_since(now) {
            warnings.push(format!(
                "the client CRL {} was due to be replaced at {} (its nextUpdate): {}",
                crl.path.display(),
                rfc3339(due),
                config.client_crl_overdue.consequence()
            ));
        }
    }
    let client_crls = tls
        .crl_next_updates
        .iter()
        .map(|crl| match crl.next_update {
            Some(next) => format!("{}, next update {}", crl.path.display(), rfc3339(next)),
            None => format!("{}, no next update", crl.path.display()),
        })
        .collect();
    let rules = super::reload::Rules::of(config, &root.fingerprint_sha256);
    Ok(CheckReport {
        config: config.path.display().to_string(),
        virtual_meshes: config.policies.iter().map(|p| p.id.to_string()).collect(),
        clients: config.authorization.clients().count(),
        root: describe_root(&root.key_kind, root.not_after, &root.fingerprint_sha256),
        rules_sha256: rules.digest().to_string(),
        rules: rules.text().to_string(),
        listen: {
            let listen = match listen_override {
                Some(listen) => format!("{listen} (--listen)"),
                None => config.listen.to_string(),
            };
            match config.ops_listen {
                Some(ops) => format!("{listen}, ops {ops}"),
                None => format!("{listen}, no ops listener (ops_listen unset)"),
            }
        },
        client_crl_overdue: format!(
            "{}: while a client CRL is past its nextUpdate, {}",
            match config.client_crl_overdue {
                CrlOverdue::Accept => "accept",
                CrlOverdue::Refuse => "refuse",
            },
            config.client_crl_overdue.consequence()
        ),
        announced_roots: config
            .root
            .announced()
            .map(|a| {
                let what = format!(
                    "{}, {}; {}",
                    a.path.display(),
                    describe_root(&a.key_kind, a.not_after, &a.fingerprint_sha256),
                    describe_cross_cert(&config.audit_log, &a.fingerprint_sha256)
                );
                (a.announcement.name(), what)
            })
            .collect(),
        server_certificate_not_after: tls.certificate.not_after,
        client_crls,
        backend,
        audit_log,
        warnings,
        online: None,
    })
}

/// The cross certificate by which the root key vouches for the announced root with
/// SHA-256 `fingerprint`, as the audit log last recorded it (`serial S sha256 F`): the
/// signer makes one at each start and at the reload that announces the root, and names
/// it in that record; the last such record names the one it serves.
pub fn audited_cross_cert(audit_log: &Path, fingerprint: &str) -> Option<String> {
    use std::io::BufRead;
    let file = std::fs::File::open(audit_log).ok()?;
    let mut last = None;
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        // A start or reload that failed made it, but put nothing in force.
        if line.contains(r#""event":"start_failed""#)
            || line.contains(r#""rule":"rules_reload_failed""#)
        {
            continue;
        }
        for (root, cross) in super::audit::cross_certs_named(&line) {
            if root == fingerprint {
                last = cross.strip_prefix("cross certificate ").map(String::from);
            }
        }
    }
    last
}

/// [`audited_cross_cert`] as `serve --check` and `root show` say it.
pub fn describe_cross_cert(audit_log: &Path, fingerprint: &str) -> String {
    match audited_cross_cert(audit_log, fingerprint) {
        Some(cross) => format!("cross certificate {cross} (as the audit log last recorded it)"),
        None => "no cross certificate in the audit log yet (the signer makes it at start, or at the reload that announces the root)".into(),
    }
}

fn describe_root(key: &PublicKeyKind, not_after: SystemTime, fingerprint: &str) -> String {
    format!(
        "{key}, valid until {}, SHA-256 {fingerprint}",
        rfc3339(not_after)
    )
}

/// The backend's files and secrets as the start reads them, without a login.
fn check_backend(config: &SignerConfig) -> Result<String, StartError> {
    let backend = StartError::Backend;
    match config.backend().map_err(backend)? {
        BackendSettings::Pkcs11(settings) => {
            if !settings.module.is_file() {
                return Err(backend(format!(
                    "pkcs11.module {} is not a file",
                    settings.module.display()
                )));
            }
            crate::backend::pkcs11::module_file_trusted(&settings.module).map_err(|e| {
                backend(format!("pkcs11.module {}: {e}", settings.module.display()))
            })?;
            if let Some(conf) = &settings.softhsm2_conf {
                crate::fsutil::read_text(conf)
                    .map_err(|e| backend(format!("pkcs11.softhsm2_conf: {e}")))?;
            }
            let token_dir = match softhsm_conf(settings) {
                Some(conf) => format!(
                    ", SoftHSM tokens in {}",
                    check_softhsm_token_dir(&conf).map_err(backend)?.display()
                ),
                None => String::new(),
            };
            read_pin(settings)?;
            Ok(format!(
                "pkcs11, module {}, key {}, {} sessions, PIN from {}{token_dir}",
                settings.module.display(),
                settings.key,
                settings.sessions,
                settings.pin
            ))
        }
        BackendSettings::Vault(settings) => {
            VaultClient::check_offline(settings).map_err(|e| backend(format!("Vault: {e}")))?;
            Ok(format!(
                "vault at {}, mount {}, issuer {}, login by {}",
                settings.address,
                settings.mount,
                settings.issuer_ref,
                settings.auth.method()
            ))
        }
    }
}

/// The SoftHSM configuration the module will read, when the module is SoftHSM: the
/// config's `softhsm2_conf`, else SOFTHSM2_CONF, else SoftHSM's default.
fn softhsm_conf(settings: &crate::config::Pkcs11Settings) -> Option<PathBuf> {
    let module = settings
        .module
        .file_name()?
        .to_string_lossy()
        .to_lowercase();
    if !module.contains("softhsm") {
        return None;
    }
    settings
        .softhsm2_conf
        .clone()
        .or_else(|| std::env::var_os("SOFTHSM2_CONF").map(PathBuf::from))
        .or_else(|| Some(PathBuf::from("/etc/softhsm/softhsm2.conf")))
}

/// SoftHSM's token directory (`directories.tokendir` in `conf`), read as SoftHSM reads it
/// at start: every token directory listed and every file in it opened. A token made by
/// another user (`sudo meshca root init`) is 0700/0600, and the start would say only
/// "failed to initialize" or "no token matches".
fn check_softhsm_token_dir(conf: &Path) -> Result<PathBuf, String> {
    let text = crate::fsutil::read_text(conf).map_err(|e| format!("SoftHSM config: {e}"))?;
    let token_dir = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("directories.tokendir"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|dir| PathBuf::from(dir.trim()))
        .next_back()
        .ok_or_else(|| format!("{} sets no directories.tokendir", conf.display()))?;
    let unreadable = |what: &Path, e: std::io::Error| {
        format!(
            "SoftHSM's token directory {} (directories.tokendir in {}): cannot read {}: {e}; run the signer as the user that made the token (`meshca token init`, `root init`), or give that user read access (Debian: the softhsm group)",
            token_dir.display(),
            conf.display(),
            what.display()
        )
    };
    let tokens = std::fs::read_dir(&token_dir).map_err(|e| unreadable(&token_dir, e))?;
    for token in tokens {
        let token = token.map_err(|e| unreadable(&token_dir, e))?.path();
        if !token.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&token).map_err(|e| unreadable(&token, e))? {
            let file = file.map_err(|e| unreadable(&token, e))?.path();
            if file.is_file() {
                std::fs::File::open(&file).map_err(|e| unreadable(&file, e))?;
            }
        }
    }
    Ok(token_dir)
}

/// The audit log is opened (or created) for appending at start: its directory must exist,
/// and an existing log must be a file this user can append to. Returns what to show, the
/// length of a torn last line and the file's permission bits (0 if it does not exist yet).
/// Nothing is written.
fn check_audit_log(path: &Path) -> Result<(String, usize, u32), StartError> {
    let problem = |message: String| {
        StartError::Audit(super::audit::AuditError::Io {
            path: path.display().to_string(),
            message,
        })
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|e| problem(format!("cannot be opened for appending: {e}")))?;
            // A running signer holds the log's lock: then this is the log it writes (and
            // a start with this config would be refused while it runs). A shared lock, let
            // go at once, takes nothing from it.
            let in_use = matches!(
                file.try_lock_shared(),
                Err(std::fs::TryLockError::WouldBlock)
            );
            drop(file);
            // Beside a running signer, a last line may be under way: not a torn one.
            let torn = if in_use {
                0
            } else {
                super::audit::torn_tail_len(path)
                    .map_err(|e| problem(format!("cannot be read: {e}")))?
            };
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
            Ok((
                format!(
                    "{} ({} bytes{})",
                    path.display(),
                    meta.len(),
                    if in_use {
                        "; written by a running signer, which holds its lock"
                    } else {
                        ""
                    }
                ),
                torn,
                mode,
            ))
        }
        Ok(_) => Err(problem("is not a regular file".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = crate::fsutil::parent_dir(path);
            if !dir.is_dir() {
                return Err(problem(format!(
                    "its directory {} does not exist",
                    dir.display()
                )));
            }
            Ok((format!("{} (created at start)", path.display()), 0, 0))
        }
        Err(e) => Err(problem(e.to_string())),
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "meshca: {} is valid", self.config)?;
        writeln!(f, "  virtual meshes  {}", self.virtual_meshes.join(", "))?;
        writeln!(f, "  clients         {}", self.clients)?;
        writeln!(f, "  root            {}", self.root)?;
        for (name, what) in &self.announced_roots {
            writeln!(f, "  {name:<15} {what}")?;
        }
        writeln!(f, "  listen          {}", self.listen)?;
        writeln!(f, "  rules           sha256 {}", self.rules_sha256)?;
        for statement in self.rules.lines() {
            writeln!(f, "    {statement}")?;
        }
        writeln!(f, "  CRL overdue     {}", self.client_crl_overdue)?;
        writeln!(
            f,
            "  server cert     valid until {}",
            rfc3339(self.server_certificate_not_after)
        )?;
        for crl in &self.client_crls {
            writeln!(f, "  client CRL      {crl}")?;
        }
        writeln!(f, "  backend         {}", self.backend)?;
        writeln!(f, "  audit log       {}", self.audit_log)?;
        if let Some(online) = &self.online {
            writeln!(f, "  online          {online}")?;
        }
        for warning in &self.warnings {
            writeln!(f, "  warning: {warning}")?;
        }
        match self.online {
            Some(_) => write!(f, "  not checked: the listen addresses"),
            None => write!(
                f,
                "  not checked: the token or Vault login and the root key in it (--online), the listen addresses"
            ),
        }
    }
}

/// The backend's start, as `meshca serve` makes it, then its end: the token login and a
/// test signature with the root's key that the root certificate verifies (PKCS#11), or the
/// Vault login and the issuer holding the root's key (Vault). One token session, not the
/// pool's (a live signer holds those, and small tokens allow few); it closes when this
/// returns, and a Vault login's token is revoked. Runs on a blocking thread of a runtime
/// (the Vault start waits on it).
pub fn check_online(config: &SignerConfig) -> Result<OnlineCheck, StartError> {
    let root = load_root(config)?;
    let mut config = config.clone();
    if let Some(pkcs11) = config.pkcs11.as_mut() {
        pkcs11.sessions = 1;
    }
    let backend = start_backend(&config, root)?;
    let runtime = tokio::runtime::Handle::current();
    let warnings = runtime
        .block_on(super::server::constrained_unsignable(
            backend.as_ref(),
            &config.policies,
        ))
        .into_iter()
        .collect();
    runtime.block_on(backend.close());
    Ok(OnlineCheck {
        found: format!(
            "{}: logged in, the root's key answers for the root certificate",
            backend.describe()
        ),
        warnings,
    })
}

/// What `serve --check --online` found of the backend.
pub struct OnlineCheck {
    pub found: String,
    /// What the backend says would fail a signing, not the start.
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last record naming the root's cross certificate wins, in either wording (a
    /// start's summary, a reload's change); a root named without one is not taken.
    #[test]
    fn the_cross_certificate_named_is_the_last_the_audit_log_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        assert_eq!(audited_cross_cert(&log, "aa"), None);
        std::fs::write(
            &log,
            concat!(
                r#"{"event":"reload","message":"next root sha256 aa announced (cross certificate serial 01 sha256 f1)"}"#,
                "\n",
                r#"{"event":"start","message":"rules in force: limits: x; next root sha256 aa (cross certificate serial 02 sha256 f2) announced"}"#,
                "\n",
                r#"{"event":"reload","message":"previous root sha256 aa no longer announced; next root sha256 bb announced"}"#,
                "\n",
                // Made by a start or reload that failed: not in force.
                r#"{"event":"start_failed","message":"made cross certificates: next root sha256 aa (cross certificate serial 03 sha256 f3)"}"#,
                "\n",
                r#"{"event":"reload","rule":"rules_reload_failed","message":"made: next root sha256 bb (cross certificate serial 04 sha256 f4)"}"#,
                "\n",
            ),
        )
        .unwrap();
        assert_eq!(
            audited_cross_cert(&log, "aa").as_deref(),
            Some("serial 02 sha256 f2")
        );
        assert_eq!(audited_cross_cert(&log, "bb"), None);
        assert!(describe_cross_cert(&log, "bb").starts_with("no cross certificate"));
    }

    #[test]
    fn a_softhsm_token_directory_that_cannot_be_read_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("softhsm2.conf");
        let tokens = dir.path().join("tokens");
        let write_conf = |token_dir: &Path| {
            let text = format!(
                "# comment\ndirectories.tokendir = {}\nobjectstore.backend = file\n",
                token_dir.display()
            );
            std::fs::write(&conf, text).unwrap();
        };
        write_conf(&tokens);
        let missing = check_softhsm_token_dir(&conf).unwrap_err();
        assert!(
            missing.contains(&format!("SoftHSM's token directory {}", tokens.display()))
                && missing.contains("cannot read")
                && missing.contains("the user that made the token"),
            "{missing}"
        );

        std::fs::create_dir_all(tokens.join("a-token")).unwrap();
        std::fs::write(tokens.join("a-token/token.object"), b"x").unwrap();
        assert_eq!(check_softhsm_token_dir(&conf).unwrap(), tokens);

        // A token directory where a file should be: listed, and refused by name.
        let a_file = dir.path().join("not-a-dir");
        std::fs::write(&a_file, b"").unwrap();
        write_conf(&a_file);
        let not_dir = check_softhsm_token_dir(&conf).unwrap_err();
        assert!(not_dir.contains("cannot read"), "{not_dir}");

        std::fs::write(&conf, "objectstore.backend = file\n").unwrap();
        let unset = check_softhsm_token_dir(&conf).unwrap_err();
        assert!(unset.contains("sets no directories.tokendir"), "{unset}");
    }
}
