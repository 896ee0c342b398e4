//! `serve` and `serve --check`: the signing daemon, or a look at everything its start
//! would read.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};

use meshca::config::SignerConfig;
use meshca::signer::audit::rfc3339;

use super::output::{say, say_json};
use super::{load_config, runtime};

/// `serve --check [--online]`: exit 0 when what a start reads is fit for one.
pub(crate) fn check(
    config: &Path,
    listen: Option<SocketAddr>,
    online: bool,
    json: bool,
) -> Result<ExitCode> {
    let config = load_config(config)?;
    let not_ready = || format!("{} is not ready to serve", config.path.display());
    let now = std::time::SystemTime::now();
    let mut report = meshca::signer::check::check(&config, listen, now).with_context(not_ready)?;
    if online {
        let checked = config.clone();
        // On a blocking thread of a runtime, as the start runs it.
        let found = runtime()?
            .block_on(async move {
                tokio::task::spawn_blocking(move || meshca::signer::check::check_online(&checked))
                    .await
            })
            .context("the online check stopped")?
            .with_context(not_ready)?;
        report.online = Some(found.found);
        report.warnings.extend(found.warnings);
    }
    if json {
        say_json(&check_json(&config, &report));
    } else {
        say!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `serve`: the signer, until SIGTERM.
pub(crate) fn serve(config: &Path, listen: Option<SocketAddr>) -> Result<ExitCode> {
    let config = load_config(config)?;
    runtime()?.block_on(meshca::signer::server::run(config, listen))?;
    Ok(ExitCode::SUCCESS)
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
