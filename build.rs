//! Sets MESHCA_BUILD_REVISION, the git commit this build is from (`build_info{revision}`,
//! `--version`, the audit log's `start`): the package version alone (0.1.0 since the
//! start) cannot tell two builds apart.
//!
//! The short hash, `-dirty` if tracked files had changes; `unknown` outside a git checkout
//! of this repository (a tarball, a Docker build context without .git/). MESHCA_REVISION
//! in the environment wins (a Docker build passes it as a build argument).
//!
//! Rerun when HEAD or the ref it points to moves, not at every edit, which would rebuild
//! the crate each time: `-dirty` is the state of the tree when that last happened.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MESHCA_REVISION");
    let revision = match std::env::var("MESHCA_REVISION") {
        Ok(given) if !given.is_empty() => {
            // It ends up in a metric label and in audit lines: keep it to a plain word.
            let plain = given.len() <= 64
                && given
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
            if !plain {
                panic!("MESHCA_REVISION must be at most 64 letters, digits, '.', '-', '_' or '+'");
            }
            given
        }
        _ => from_git().unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=MESHCA_BUILD_REVISION={revision}");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env_path("CARGO_MANIFEST_DIR")?)
        // `git status` would otherwise refresh the index under its lock, racing the
        // developer's own git commands.
        .env("GIT_OPTIONAL_LOCKS", "0")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).map(PathBuf::from)
}

fn from_git() -> Option<String> {
    // Only a checkout of this repository: sources unpacked inside another one would take
    // that one's commit.
    let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    let manifest = env_path("CARGO_MANIFEST_DIR")?;
    if top.canonicalize().ok()? != manifest.canonicalize().ok()? {
        return None;
    }
    watch(&git(&["rev-parse", "--git-path", "HEAD"])?);
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        // A loose ref, or packed-refs once `git gc` packed it (a file that does not
        // exist would have cargo rerun this script at every build).
        let loose = git(&["rev-parse", "--git-path", &branch])?;
        if !watch(&loose) {
            watch(&git(&["rev-parse", "--git-path", "packed-refs"])?);
        }
    }
    let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
    let changes = git(&["status", "--porcelain", "--untracked-files=no"])?;
    Some(if changes.is_empty() {
        hash
    } else {
        format!("{hash}-dirty")
    })
}

/// `cargo:rerun-if-changed` for `path` (relative to the manifest directory, as git
/// prints it, or absolute), if it exists.
fn watch(path: &str) -> bool {
    let Some(dir) = env_path("CARGO_MANIFEST_DIR") else {
        return false;
    };
    let path = dir.join(Path::new(path));
    if !path.exists() {
        return false;
    }
    println!("cargo:rerun-if-changed={}", path.display());
    true
}
