//! X.509 for meshca, with no I/O: key descriptions, CSR parsing and proof of possession,
//! the certificate profiles, lint-before-sign, signature checks, PEM, and the checks an
//! Istio `cacerts` bundle must pass.

pub mod bundle;
pub mod cross;
pub mod csr;
pub mod datetime;
pub mod keys;
pub mod lint;
pub mod oids;
pub mod pem;
pub mod profile;
pub mod sigalg;
#[cfg(test)]
pub mod testing;
