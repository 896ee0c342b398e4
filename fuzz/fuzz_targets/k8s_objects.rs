//! Kubernetes objects (JSON) the agent and the mesh controller read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::k8s_objects(data);
});
