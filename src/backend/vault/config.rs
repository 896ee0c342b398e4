//! The `[vault]` section of the signer config: where Vault/OpenBao is, which PKI mount
//! and issuer hold the root, timeouts, and how meshca logs in. Secrets (tokens, AppRole
//! secret IDs, service account JWTs) are named by file or environment variable, never
//! written inline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::secret::{SecretFile, SecretSource};

/// Default bound on one Vault call (connect, send, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on opening a connection to Vault.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Where Kubernetes mounts a pod's service account token.
pub const DEFAULT_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultSection {
    address: String,
    ca_cert: Option<PathBuf>,
    mount: Option<String>,
    issuer_ref: String,
    timeout_seconds: Option<u64>,
    connect_timeout_seconds: Option<u64>,
    auth: AuthSection,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
enum AuthSection {
    Token {
        token_file: Option<PathBuf>,
        token_env: Option<String>,
    },
    Approle {
        mount: Option<String>,
        role_id_file: PathBuf,
        secret_id_file: Option<PathBuf>,
        secret_id_env: Option<String>,
    },
    Kubernetes {
        mount: Option<String>,
        role: String,
        jwt_file: Option<PathBuf>,
    },
}

/// How meshca authenticates to Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// A token from a file (re-read when Vault refuses the current one: an agent may
    /// rotate it) or an environment variable.
    Token(SecretSource),
    AppRole {
        mount: String,
        role_id: SecretSource,
        secret_id: SecretSource,
    },
    Kubernetes {
        mount: String,
        role: String,
        /// The service account token; Kubernetes manages its mode, so it is not required
        /// to be 0600. Named in errors as a secret file is: a token pasted where its
        /// path belongs is not shown.
        jwt_file: SecretFile,
    },
}

impl VaultAuth {
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Token(_) => "token",
            VaultAuth::AppRole { .. } => "approle",
            VaultAuth::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// The Vault backend's settings, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VaultSettings {
    /// Base address, e.g. `https://vault.example.org:8200` (no path).
    pub address: Url,
    /// CA bundle that verifies Vault's TLS certificate (required for https).
    pub ca_cert: Option<PathBuf>,
    /// The PKI secrets engine's mount path, e.g. `pki`.
    pub mount: String,
    /// The issuer holding the root: its name or ID.
    pub issuer_ref: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub auth: VaultAuth,
}

impl VaultSection {
    /// Checks the section and resolves relative paths with `resolve`.
    pub fn resolve(self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<VaultSettings, String> {
        let address = parse_address(&self.address, self.ca_cert.is_some())?;
        let mount = self.mount.unwrap_or_else(|| "pki".into());
        check_path("vault.mount", &mount)?;
        check_name("vault.issuer_ref", &self.issuer_ref)?;
        let seconds = |field: &str, value: Option<u64>, default: Duration| match value {
            None => Ok(default),
            Some(s @ 1..=300) => Ok(Duration::from_secs(s)),
            Some(s) => Err(format!(
                "vault.{field} must be between 1 and 300 seconds, got {s}"
            )),
        };
        let auth = match self.auth {
            AuthSection::Token {
                token_file,
                token_env,
            } => VaultAuth::Token(one_secret(
                "vault.auth (method token)",
                "token_file",
                "token_env",
                token_file.map(|p| SecretFile::new("vault.auth.token_file", &p, resolve(&p))),
                token_env,
            )?),
            AuthSection::Approle {
                mount,
                role_id_file,
                secret_id_file,
                secret_id_env,
            } => {
                let mount = mount.unwrap_or_else(|| "approle".into());
                check_path("vault.auth.mount", &mount)?;
                VaultAuth::AppRole {
                    mount,
                    role_id: SecretSource::File(SecretFile::new(
                        "vault.auth.role_id_file",
                        &role_id_file,
                        resolve(&role_id_file),
                    )),
                    secret_id: one_secret(
                        "vault.auth (method approle)",
                        "secret_id_file",
                        "secret_id_env",
                        secret_id_file
                            .map(|p| SecretFile::new("vault.auth.secret_id_file", &p, resolve(&p))),
                        secret_id_env,
                    )?,
                }
            }
            AuthSection::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let mount = mount.unwrap_or_else(|| "kubernetes".into());
                check_path("vault.auth.mount", &mount)?;
                if role.trim().is_empty() {
                    return Err("vault.auth.role is empty".into());
                }
                VaultAuth::Kubernetes {
                    mount,
                    role,
                    jwt_file: {
                        let written = jwt_file.unwrap_or_else(|| PathBuf::from(DEFAULT_JWT_FILE));
                        SecretFile::new("vault.auth.jwt_file", &written, resolve(&written))
                    },
                }
            }
        };
        Ok(VaultSettings {
            address,
            ca_cert: self.ca_cert.map(|p| resolve(&p)),
            mount,
            issuer_ref: self.issuer_ref,
            timeout: seconds("timeout_seconds", self.timeout_seconds, DEFAULT_TIMEOUT)?,
            connect_timeout: seconds(
                "connect_timeout_seconds",
                self.connect_timeout_seconds,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            auth,
        })
    }
}

/// `https://` needs a CA bundle; `http://` is allowed only to this machine (a dev server,
/// a local Vault agent), since the token would cross the network in clear.
fn parse_address(value: &str, has_ca: bool) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| {
        format!("vault.address {value:?} is not a URL like https://vault:8200: {e}")
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("vault.address must not carry credentials".into());
    }
    if url.query().is_some() || url.fragment().is_some() || url.path() != "/" {
        return Err(format!(
            "vault.address {value:?} must be scheme://host:port only (no path or query)"
        ));
    }
    match url.scheme() {
        "https" if has_ca => Ok(url),
        "https" => Err(
            "vault.ca_cert is required for an https address (the CA bundle that verifies Vault's certificate)"
                .into(),
        ),
        "http" => {
            let loopback = match url.host_str() {
                Some("localhost") => true,
                Some(host) => host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()),
                None => false,
            };
            if loopback {
                Ok(url)
            } else {
                Err(format!(
                    "vault.address {value:?}: plain http is allowed only to 127.0.0.1/::1/localhost (the token would travel in clear); use https with vault.ca_cert"
                ))
            }
        }
        other => Err(format!(
            "vault.address scheme {other:?} is not http or https"
        )),
    }
}

fn one_secret(
    section: &str,
    file_key: &str,
    env_key: &str,
    file: Option<SecretFile>,
    env: Option<String>,
) -> Result<SecretSource, String> {
    match (file, env) {
        (Some(file), None) => Ok(SecretSource::File(file)),
        (None, Some(env)) => SecretSource::env(&format!("vault.auth.{env_key}"), env),
        (None, None) => Err(format!(
            "{section}: set {file_key} or {env_key} (secrets are never accepted inline or on the command line)"
        )),
        (Some(_), Some(_)) => Err(format!(
            "{section}: set only one of {file_key} and {env_key}"
        )),
    }
}

/// Mount paths: segments of letters, digits, `-`, `_`, `.`, separated by `/`.
fn check_path(field: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} {value:?} must be a path like \"pki\" or \"pki/meshca\" (letters, digits, - _ .)"
        ))
    }
}

/// Issuer references: a name or an ID (letters, digits, `-`, `_`).
fn check_name(field: &str, value: &str) -> Result<(), String> {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        Ok(())
    } else {
        Err(format!(
            "{field} {value:?} must be an issuer name or ID (letters, digits, - _)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VaultSettings, String> {
        let section: VaultSection = toml::from_str(text).map_err(|e| e.message().to_string())?;
        section.resolve(&|p: &Path| Path::new("/etc/meshca").join(p))
    }

    #[test]
    fn every_auth_method_resolves() {
        let token = parse(
            "address = \"http://127.0.0.1:8200\"\nissuer_ref = \"meshca-root\"\n[auth]\nmethod = \"token\"\ntoken_file = \"vault-token\"\n",
        )
        .unwrap();
        assert_eq!(token.mount, "pki");
        assert_eq!(token.timeout, DEFAULT_TIMEOUT);
        assert_eq!(
            token.auth,
            VaultAuth::Token(SecretSource::File(SecretFile::new(
                "vault.auth.token_file",
                Path::new("vault-token"),
                "/etc/meshca/vault-token".into()
            )))
        );
        let approle = parse(
            "address = \"https://vault.example.org:8200\"\nca_cert = \"ca.pem\"\nmount = \"pki/mesh\"\nissuer_ref = \"r\"\ntimeout_seconds = 4\n[auth]\nmethod = \"approle\"\nrole_id_file = \"role-id\"\nsecret_id_env = \"MESHCA_SECRET_ID\"\n",
        )
        .unwrap();
        assert_eq!(approle.ca_cert, Some("/etc/meshca/ca.pem".into()));
        assert_eq!(approle.timeout, Duration::from_secs(4));
        assert_eq!(
            approle.auth,
            VaultAuth::AppRole {
                mount: "approle".into(),
                role_id: SecretSource::File(SecretFile::new(
                    "vault.auth.role_id_file",
                    Path::new("role-id"),
                    "/etc/meshca/role-id".into()
                )),
                secret_id: SecretSource::Env("MESHCA_SECRET_ID".into()),
            }
        );
        let kube = parse(
            "address = \"http://localhost:8200\"\nissuer_ref = \"r\"\n[auth]\nmethod = \"kubernetes\"\nrole = \"meshca\"\n",
        )
        .unwrap();
        assert_eq!(
            kube.auth,
            VaultAuth::Kubernetes {
                mount: "kubernetes".into(),
                role: "meshca".into(),
                jwt_file: SecretFile::new(
                    "vault.auth.jwt_file",
                    Path::new(DEFAULT_JWT_FILE),
                    DEFAULT_JWT_FILE.into()
                ),
            }
        );
    }

    #[test]
    fn a_secret_where_its_variable_name_belongs_is_refused_unshown() {
        for (auth, key) in [
            (
                "method = \"token\"\ntoken_env = \"s.canaryTOKEN\"\n",
                "token_env",
            ),
            (
                "method = \"approle\"\nrole_id_file = \"r\"\nsecret_id_env = \"9f1c-canaryTOKEN\"\n",
                "secret_id_env",
            ),
        ] {
            let err = parse(&format!(
                "address = \"http://127.0.0.1:8200\"\nissuer_ref = \"r\"\n[auth]\n{auth}"
            ))
            .unwrap_err();
            assert!(
                err.contains(&format!(
                    "vault.auth.{key} is not an environment variable name"
                )) && !err.contains("canaryTOKEN"),
                "{err}"
            );
        }
    }

    #[test]
    fn mistakes_are_named() {
        let head = "issuer_ref = \"r\"\n";
        let token = "[auth]\nmethod = \"token\"\ntoken_file = \"t\"\n";
        let cases = [
            (
                format!("address = \"https://v:8200\"\n{head}{token}"),
                "vault.ca_cert is required",
            ),
            (
                format!("address = \"http://10.0.0.1:8200\"\n{head}{token}"),
                "plain http is allowed only",
            ),
            (
                format!("address = \"http://127.0.0.1:8200/v1\"\n{head}{token}"),
                "no path",
            ),
            (
                format!("address = \"http://127.0.0.1:8200\"\n{head}[auth]\nmethod = \"token\"\n"),
                "set token_file or token_env",
            ),
            (
                format!(
                    "address = \"http://127.0.0.1:8200\"\n{head}[auth]\nmethod = \"token\"\ntoken = \"s.hunter2\"\n"
                ),
                "unknown field",
            ),
            (
                format!(
                    "address = \"http://127.0.0.1:8200\"\n{head}[auth]\nmethod = \"approle\"\nrole_id_file = \"r\"\nsecret_id = \"hunter2\"\n"
                ),
                "unknown field",
            ),
            (
                format!("address = \"http://127.0.0.1:8200\"\n{head}[auth]\nmethod = \"ldap\"\n"),
                "unknown variant",
            ),
            (
                format!("address = \"http://127.0.0.1:8200\"\nissuer_ref = \"../x\"\n{token}"),
                "vault.issuer_ref",
            ),
            (
                format!(
                    "address = \"http://127.0.0.1:8200\"\nmount = \"pki/../sys\"\n{head}{token}"
                ),
                "vault.mount",
            ),
            (
                format!("address = \"http://127.0.0.1:8200\"\ntimeout_seconds = 0\n{head}{token}"),
                "timeout_seconds",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err}");
            assert!(!err.contains("hunter2"), "secret echoed: {err}");
        }
    }
}
