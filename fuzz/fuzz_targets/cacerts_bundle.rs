//! The agent's check of an installed cacerts set (four NUL-separated files) and the
//! root-cert.pem it composes from it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::cacerts_bundle(data);
});
