//! meshca: an external CA for multi-cluster Istio meshes.
//!
//! The root key lives in a PKCS#11 token (or Vault/OpenBao PKI) and never leaves
//! it. The signer enforces VirtualMesh policy on every CSR; agents in each cluster install
//! the signed intermediates as Istio's plugged-in CA files.
//!
//! Module map (pure decisions apart from I/O):
//! - [`policy`]: VirtualMesh documents and the rules an intermediate must satisfy (pure).
//! - [`pki`]: CSRs, certificate profiles, lint-before-sign, signature checks (pure).
//! - [`backend`]: the [`backend::RootSigner`] trait; PKCS#11 and Vault/OpenBao backends.
//! - [`signer`]: the mTLS HTTPS daemon, authorization, audit log, metrics.
//! - [`agent`]: key + CSR generation, the signer client, Istio `cacerts` writers.
//! - [`mesh`]: VirtualMesh membership and cross-cluster federation (pure translation).
//! - [`mesh_controller`]: the management plane's CRDs and controller (`meshca mesh-controller`).
//! - [`config`]: the signer's TOML configuration.
//! - [`secret`]: PINs and tokens read from files or the environment, never printed.
//! - [`logging`]: text or JSON logs on stderr, panics included.
//! - [`signals`]: SIGTERM and SIGINT, taken over before a daemon says it is ready.
//! - [`process`]: what every command does to itself at start (no core dumps).
//! - [`service_manager`]: the signer's readiness, reloads and stop told to systemd.
//! - [`ops_http`]: the bounded plain-HTTP listener of the metrics and health endpoints.

/// The git commit this build is from (short hash, `-dirty` for a tree with changes), or
/// `unknown` outside git: set by build.rs. The package version has stayed 0.1.0, so this
/// is what tells two builds apart.
pub const REVISION: &str = env!("MESHCA_BUILD_REVISION");

/// `0.1.0 (revision 3f2c1a9b7e0d)`: `--version`, and the audit log's `start` and `stop`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("MESHCA_BUILD_REVISION"),
    ")"
);

pub mod agent;
pub mod backend;
pub mod config;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod http_answer;
pub mod logging;
pub mod mesh;
pub mod mesh_controller;
pub mod ops_http;
pub mod pki;
pub mod policy;
pub mod process;
pub mod secret;
pub mod service_manager;
pub mod signals;
pub mod signer;
pub mod tlsutil;
pub mod yaml;

// Property tests of the pure decisions, across modules (see the README's Tests section).
#[cfg(test)]
mod proptests;
