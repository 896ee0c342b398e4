//! Property tests of meshca's pure decisions: for generated inputs, what must hold of the
//! policy rules, the signer's decision, the rate limiter, the agents' rotation and root
//! handling, federation's translation and the mesh controller's decisions.
//!
//! Each runs a fixed number of cases from a fixed seed, so a run is reproducible and its
//! time known; nothing is written to disk (proptest's failure files are off). A failure
//! prints its minimised input: that becomes a plain unit test next to the code it fixes.
//! To search further, set `PROPTEST_CASES` (cases per property) and `PROPTEST_RNG_SEED`.

mod federation;
mod mesh_controller;
mod policy;
mod ratelimit;
mod roots;
mod rotation;
mod signer;

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::RngSeed;

/// The seed of every property unless `PROPTEST_RNG_SEED` names another.
const SEED: u64 = 0x6d65_7368_6361;

/// `cases` cases (unless `PROPTEST_CASES` says otherwise) from a fixed seed, no failure
/// files.
pub(crate) fn cfg(cases: u32) -> ProptestConfig {
    // ProptestConfig::default() has read the PROPTEST_* variables.
    let from_env = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            from_env.cases
        } else {
            cases
        },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            from_env.rng_seed
        } else {
            RngSeed::Fixed(SEED)
        },
        failure_persistence: None,
        ..from_env
    }
}

/// A time between 1970 and about 2200, or far later (to 2^41 s), in whole seconds.
pub(crate) fn any_time() -> impl Strategy<Value = SystemTime> {
    prop_oneof![0u64..7_300_000_000, 0u64..(1u64 << 41)]
        .prop_map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// A VirtualMesh document: `metadata` and `builtin` as YAML flow maps, then the other
/// lines of `spec`.
pub(crate) fn virtual_mesh_yaml(metadata: &str, builtin: &str, spec: &[&str]) -> String {
    let mut yaml = format!(
        concat!(
            "kind: VirtualMesh\n",
            "metadata: {}\n",
            "spec:\n",
            "  certificateAuthority:\n",
            "    builtin: {}\n",
        ),
        metadata, builtin
    );
    for line in spec {
        yaml.push_str("  ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}
