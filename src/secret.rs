//! Secrets (HSM PINs, Vault tokens) read from a file or an environment variable.
//! They are never accepted on the command line, never printed, and wiped on drop.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// A secret value. `Debug` and `Display` print only `<redacted>`.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(Zeroizing::new(value))
    }

    /// The secret itself, for handing to the token or Vault and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    File(SecretFile),
    Env(String),
}

/// A secret file, with the setting that names it for its errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretFile {
    pub path: PathBuf,
    /// `pkcs11.pin_file`, `--so-pin-file`, ...
    pub setting: String,
    /// Whether errors may show the path: a value written without a '/' may be the secret
    /// itself, typed where its file's path belongs (resolving it against the config's
    /// directory gives it one, so this is decided on the value as written).
    pub path_shown: bool,
}

impl SecretFile {
    /// The file `setting` names: `written` as the user wrote it, `path` where it resolves.
    pub fn new(setting: &str, written: &Path, path: PathBuf) -> Self {
        SecretFile {
            path,
            setting: setting.to_string(),
            path_shown: written.as_os_str().as_encoded_bytes().contains(&b'/'),
        }
    }

    /// The file as errors name it: the setting, and the path when it may be shown.
    pub fn shown(&self) -> String {
        if self.path_shown {
            format!("{} {}", self.setting, self.path.display())
        } else {
            format!(
                "{} (the value is not shown: without a '/' it may be the secret itself; give \
                 a path)",
                self.setting
            )
        }
    }
}

impl SecretSource {
    /// An environment variable source from the config key `key` (`pkcs11.pin_env`, ...).
    /// A value that is no variable name is refused without being shown: it is most likely
    /// the secret itself, typed where its variable's name belongs.
    pub fn env(key: &str, name: String) -> Result<SecretSource, String> {
        let mut chars = name.chars();
        let well_formed = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if well_formed {
            Ok(SecretSource::Env(name))
        } else {
            Err(format!(
                "{key} is not an environment variable name (letters, digits and _, not \
                 starting with a digit); its value is not shown: it may be the secret itself"
            ))
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(file) => f.write_str(&file.shown()),
            SecretSource::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret from {source_name}: {message}")]
    Unreadable {
        source_name: String,
        message: String,
    },
    #[error("secret from {0} is empty")]
    Empty(String),
    #[error("secret from {file} can be read by other users (mode {mode:o}); {fix}")]
    TooOpen {
        file: String,
        mode: u32,
        /// `run: chmod 600 <path>`, without the path where it is not shown.
        fix: String,
    },
}

impl SecretSource {
    /// Reads the secret; surrounding whitespace (a trailing newline) is dropped.
    pub fn read(&self) -> Result<Secret, SecretError> {
        let raw = match self {
            SecretSource::File(file) => read_secret_file(file)?,
            SecretSource::Env(name) => {
                Zeroizing::new(std::env::var(name).map_err(|e| SecretError::Unreadable {
                    source_name: self.to_string(),
                    // VarError's own text quotes a value that is not UTF-8: the secret.
                    message: match e {
                        std::env::VarError::NotPresent => "not set".into(),
                        std::env::VarError::NotUnicode(_) => "not valid UTF-8".into(),
                    },
                })?)
            }
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(SecretError::Empty(self.to_string()));
        }
        Ok(Secret::new(trimmed.to_string()))
    }
}

/// Longest secret file read: PINs and tokens are short, and a key pointed at the wrong
/// file (a log, a device) must not be read whole and presented as a PIN.
const MAX_SECRET_FILE: u64 = 64 * 1024;

fn read_secret_file(secret_file: &SecretFile) -> Result<Zeroizing<String>, SecretError> {
    use std::io::Read;
    let path = secret_file.path.as_path();
    let unreadable = |message: String| SecretError::Unreadable {
        source_name: secret_file.shown(),
        message,
    };
    let io = |e: std::io::Error| unreadable(e.to_string());
    // Only a regular file, refused before the open waits for a FIFO's writer; the mode is
    // that of the file opened, not of whatever the path names a moment later.
    let file = crate::fsutil::open_regular(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(SecretError::TooOpen {
            file: secret_file.shown(),
            mode: mode & 0o777,
            fix: if secret_file.path_shown {
                format!("run: chmod 600 {}", path.display())
            } else {
                "make it chmod 600".into()
            },
        });
    }
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(unreadable(format!(
            "larger than {} KiB: not a secret file",
            MAX_SECRET_FILE / 1024
        )));
    }
    // Copied out of the buffer, which is wiped on drop (a failed conversion would hand
    // the bytes to an error that is not).
    std::str::from_utf8(&bytes)
        .map(|text| Zeroizing::new(text.to_string()))
        .map_err(|_| unreadable("not valid UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &Path) -> SecretSource {
        SecretSource::File(SecretFile::new("pin_file", path, path.to_path_buf()))
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("1234".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(s.expose(), "1234");
    }

    #[test]
    fn files_are_trimmed_and_permissions_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        crate::fsutil::write_private(&path, b"s3cret\n").unwrap();
        let secret = file(&path).read().unwrap();
        assert_eq!(secret.expose(), "s3cret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = file(&path).read().unwrap_err().to_string();
        assert!(
            err.contains("chmod 600") && !err.contains("s3cret"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(file(&path).read(), Err(SecretError::Empty(_))));
    }

    #[test]
    fn a_file_too_large_or_not_a_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        let large = "7".repeat(MAX_SECRET_FILE as usize + 1);
        crate::fsutil::write_private(&path, large.as_bytes()).unwrap();
        let err = file(&path).read().unwrap_err().to_string();
        assert!(
            err.contains("larger than 64 KiB") && !err.contains("777"),
            "{err}"
        );
        crate::fsutil::write_private(&path, &large.as_bytes()[1..]).unwrap();
        assert_eq!(file(&path).read().unwrap().expose(), &large[1..]);
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = file(&sub).read().unwrap_err().to_string();
        assert!(err.contains("a directory, not a regular file"), "{err}");
    }

    /// A FIFO named as a PIN file is refused before the open, which would wait for a
    /// writer: the fed FIFO's writer would hand over its text if the reader opened it.
    #[test]
    fn a_fifo_as_secret_file_is_refused_unopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        let fifo = crate::fsutil::tests::FedFifo::new(&path, "piped-secret\n");
        let err = file(&path).read().unwrap_err().to_string();
        drop(fifo);
        assert!(
            err.contains(&path.display().to_string())
                && err.contains("a FIFO (named pipe), not a regular file")
                && !err.contains("piped-secret"),
            "{err}"
        );
    }

    #[test]
    fn a_value_that_is_no_variable_name_is_refused_unshown() {
        for name in ["123456", "9f1c2d3e-canary", "s.token value", "", "PIN=1"] {
            let err = SecretSource::env("pkcs11.pin_env", name.into()).unwrap_err();
            assert!(err.starts_with("pkcs11.pin_env is not an environment variable name"));
            assert!(name.is_empty() || !err.contains(name), "{err}");
        }
        for name in ["MESHCA_PIN", "_x", "pin2"] {
            assert_eq!(
                SecretSource::env("k", name.into()),
                Ok(SecretSource::Env(name.into()))
            );
        }
    }

    #[test]
    fn missing_env_is_named() {
        let err = SecretSource::Env("MESHCA_TEST_SURELY_UNSET".into())
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("MESHCA_TEST_SURELY_UNSET"));
    }
}
