//! deploy/systemd/ checked offline with systemd's own tools (`scripts/install-deps.sh`
//! installs Debian's systemd package where they are missing): the unit passes
//! `systemd-analyze verify` without a warning and `systemd-analyze security --offline=yes`
//! at its exposure, keeps the sandbox settings that matter and leaves out the two that
//! would break it, outwaits the signer's drain, and hands over the PIN at the path the
//! example config reads; meshca.sysusers is valid for `systemd-sysusers`, with and
//! without its SoftHSM line. What it cannot check: that the signer's system calls stay in
//! `@system-service` (that needs systemd running the unit; the unit's comment says how it
//! was traced).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

fn unit_path() -> PathBuf {
    repo().join("deploy/systemd/meshca-signer.service")
}

fn unit_text() -> String {
    std::fs::read_to_string(unit_path()).unwrap()
}

/// A systemd tool on PATH; missing, the test fails saying how to get it.
fn systemd_tool(name: &str) -> PathBuf {
    installed_tool(&format!("var/tools/bin/{name}"), name)
}

/// Every `key=value` of the unit's [Service] section, in order (a key may repeat).
fn service_settings() -> Vec<(String, String)> {
    let mut in_service = false;
    let mut settings = Vec::new();
    for line in unit_text().lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') {
            let (key, value) = line.split_once('=').unwrap();
            settings.push((key.to_string(), value.to_string()));
        }
    }
    settings
}

fn setting(key: &str) -> Option<String> {
    service_settings()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// A copy of the unit in a temp dir whose commands exist on this machine (verify checks
/// that they are executable; the unit's paths are those of the installed system).
fn unit_copy(dir: &std::path::Path) -> PathBuf {
    let text = unit_text()
        .replace("/usr/local/bin/meshca", MESHCA)
        .replace("/bin/kill", MESHCA);
    write(dir, "meshca-signer.service", &text)
}

#[test]
fn the_unit_passes_systemd_analyze_verify_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = run(Command::new(systemd_tool("systemd-analyze"))
        .arg("verify")
        .arg(&unit));
    // verify exits 0 on an unknown key or system call group, saying so on stderr.
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // It does catch a misspelt setting (the check is not a no-op).
    let bad = write(
        dir.path(),
        "bad.service",
        &std::fs::read_to_string(&unit)
            .unwrap()
            .replace("ProtectClock=true", "ProtectClok=true"),
    );
    let out = run(Command::new(systemd_tool("systemd-analyze"))
        .arg("verify")
        .arg(bad));
    assert!(
        text(&out.stderr).contains("ProtectClok"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_unit_is_sandboxed_to_an_exposure_of_at_most_2() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = run_ok(
        Command::new(systemd_tool("systemd-analyze"))
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit),
    );
    let report = text(&out.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for meshca-signer.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no overall exposure in\n{report}"))
        .parse()
        .unwrap();
    // 4.8 before the system call filter, the kernel and clock protections and the
    // namespace, realtime and IPC restrictions; 1.9 with them (systemd 252).
    assert!(exposure <= 2.0, "exposure {exposure}:\n{report}");

    let settings: BTreeMap<String, String> = service_settings().into_iter().collect();
    for (key, value) in [
        ("SystemCallFilter", "@system-service"),
        ("SystemCallArchitectures", "native"),
        ("ProtectClock", "true"),
        ("ProtectKernelLogs", "true"),
        ("ProtectHostname", "true"),
        ("RestrictNamespaces", "true"),
        ("RestrictRealtime", "true"),
        ("ProtectProc", "invisible"),
        ("RemoveIPC", "true"),
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
        ("CapabilityBoundingSet", ""),
        // A local USB or PCIe HSM needs /dev (the unit's comment says when to turn it on).
        ("PrivateDevices", "false"),
        // A crash's core file would hold the PIN and the Vault credentials.
        ("LimitCORE", "0"),
    ] {
        assert_eq!(settings.get(key).map(String::as_str), Some(value), "{key}");
    }
    // PrivateUsers= would cut the softhsm group off the token files; ProcSubset=pid would
    // hide /proc/sys/kernel/hostname, which the signer reads.
    for absent in ["PrivateUsers", "ProcSubset"] {
        assert!(!settings.contains_key(absent), "{absent} is set");
    }
    // SoftHSM-on-Debian only, so left commented.
    assert!(
        unit_text()
            .lines()
            .any(|l| l.trim() == "#SupplementaryGroups=softhsm")
    );
}

#[test]
fn the_unit_waits_for_the_drain_and_a_stuck_backend_before_killing_the_signer() {
    let stop: u64 = setting("TimeoutStopSec").unwrap().parse().unwrap();
    // After SIGTERM: the drain, then a signing may still wait its backend's timeout.
    let drain = meshca::config::Limits::default().drain_timeout;
    let backend =
        meshca::config::DEFAULT_TOKEN_TIMEOUT.max(meshca::backend::vault::config::DEFAULT_TIMEOUT);
    assert!(
        Duration::from_secs(stop) > drain + backend,
        "TimeoutStopSec={stop} is not above {drain:?} + {backend:?}"
    );
    assert_eq!(setting("KillSignal").as_deref(), Some("SIGTERM"));
}

#[test]
fn the_signer_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    // Type=notify: `systemctl start` returns once the signer serves (the token login
    // done), and fails with a start that fails.
    assert_eq!(setting("Type").as_deref(), Some("notify"));
    assert_eq!(setting("NotifyAccess").as_deref(), Some("main"));
    // systemd's side of the protocol: a datagram socket named by NOTIFY_SOCKET.
    let env = Env::new();
    let socket_path = env.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(EXIT_WAIT)).unwrap();
    let next = || {
        let mut message = [0u8; 1024];
        let n = socket
            .recv(&mut message)
            .expect("no message from the signer");
        String::from_utf8(message[..n].to_vec()).unwrap()
    };
    let mut signer = env.start_signer_command(|cmd| {
        cmd.env("NOTIFY_SOCKET", &socket_path);
    });
    let ready = next();
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=serving https://{}\n", signer.addr)
    );
    std::net::TcpStream::connect(signer.addr).expect("ready, but not listening");

    send_signal(signer.child.id(), "HUP");
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), ready, "the reload's end");

    // A reload that fails says so in `systemctl status` until the next one succeeds.
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, "not = [valid\n").unwrap();
    send_signal(signer.child.id(), "HUP");
    assert!(next().starts_with("RELOADING=1\n"));
    assert_eq!(
        next(),
        format!(
            "READY=1\nSTATUS=serving https://{}; last reload failed (tls, rules): see the log\n",
            signer.addr
        )
    );
    std::fs::write(&env.config, config).unwrap();
    send_signal(signer.child.id(), "HUP");
    assert!(next().starts_with("RELOADING=1\n"));
    assert_eq!(next(), ready, "a reload that succeeds clears it");

    assert!(signer.terminate());
    assert_eq!(next(), "STOPPING=1\nSTATUS=draining in-flight requests\n");
}

#[test]
fn the_example_config_reads_the_pin_where_the_unit_hands_it_over() {
    let credential = setting("LoadCredential").unwrap();
    let (name, source) = credential.split_once(':').unwrap();
    assert_eq!(source, "/etc/meshca/hsm-pin");
    let example: toml::Value = toml::from_str(
        &std::fs::read_to_string(repo().join("config/signer.example.toml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        example["pkcs11"]["pin_file"].as_str(),
        Some(format!("/run/credentials/meshca-signer.service/{name}").as_str()),
        "the credential directory is /run/credentials/<unit name>"
    );
    // SIGHUP before the check: the signer reloads the TLS files and the rules apart, and
    // a check run first would hold back a renewed certificate for a broken policy file.
    let reloads: Vec<String> = service_settings()
        .into_iter()
        .filter(|(k, _)| k == "ExecReload")
        .map(|(_, v)| v)
        .collect();
    assert!(
        reloads.len() == 2
            && reloads[0].starts_with("/bin/kill -HUP $MAINPID")
            && reloads[1].ends_with("serve --config /etc/meshca/signer.toml --check"),
        "{reloads:?}"
    );
    // The unit runs the config the example is meant to become.
    for command in ["ExecStart", "ExecReload"] {
        assert!(
            service_settings()
                .iter()
                .filter(|(k, _)| k == command)
                .any(|(_, v)| v.contains("--config /etc/meshca/signer.toml")),
            "{command}"
        );
    }
}

#[test]
fn meshca_sysusers_is_valid_with_and_without_its_softhsm_line() {
    let shipped = repo().join("deploy/systemd/meshca.sysusers");
    let dir = tempfile::tempdir().unwrap();
    let text_of = std::fs::read_to_string(&shipped).unwrap();
    assert!(
        text_of.lines().any(|l| l == "#m meshca softhsm"),
        "{text_of}"
    );
    let with_softhsm = write(
        dir.path(),
        "meshca-softhsm.conf",
        &text_of.replace("#m meshca softhsm", "m meshca softhsm"),
    );
    for (file, creates) in [
        (shipped, &["user 'meshca'"][..]),
        (with_softhsm, &["user 'meshca'", "group 'softhsm'"][..]),
    ] {
        // A root of its own, empty, and a dry run: nothing is written, no root needed.
        let root = tempfile::tempdir().unwrap();
        let out = run(Command::new(systemd_tool("systemd-sysusers"))
            .arg("--dry-run")
            .arg(format!("--root={}", root.path().display()))
            .arg(&file));
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{}: {said}", file.display());
        for needle in creates {
            assert!(said.contains(needle), "{needle} not in {said}");
        }
        assert!(!said.contains("gnoring"), "{said}");
    }
}
