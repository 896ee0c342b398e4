//! The binary's command line: its flags (`args`), what a command writes (`output`), and one
//! module per group of subcommands, each calling into the library.

pub(crate) mod agents;
pub(crate) mod args;
pub(crate) mod audit;
pub(crate) mod bundle;
pub(crate) mod federation;
pub(crate) mod output;
pub(crate) mod root;
pub(crate) mod serve;

use std::path::Path;

use anyhow::{Context, Result, anyhow};

use meshca::config::SignerConfig;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Loads a signer config and applies its module environment. Must run before any thread
/// is started: it may set SOFTHSM2_CONF, which the PKCS#11 module reads.
pub(crate) fn load_config(path: &Path) -> Result<SignerConfig> {
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

pub(crate) fn pkcs11_settings(config: &SignerConfig) -> Result<&meshca::config::Pkcs11Settings> {
    config.pkcs11.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: no [pkcs11] section (this command is for the pkcs11 backend)",
            config.path.display()
        )
    })
}

pub(crate) fn vault_settings(
    config: &SignerConfig,
) -> Result<&meshca::backend::vault::config::VaultSettings> {
    config
        .vault
        .as_ref()
        .ok_or_else(|| anyhow!("{}: no [vault] section", config.path.display()))
}

/// A client key other users can read, named once as a command starts (the agents read the
/// key again for each pass; a warning each time would bury the rest of their log).
pub(crate) fn warn_of_open_key(open: Option<&meshca::tlsutil::KeyReadableByOthers>) {
    if let Some(open) = open {
        tracing::warn!(key = %open.path.display(), "{open}");
    }
}
