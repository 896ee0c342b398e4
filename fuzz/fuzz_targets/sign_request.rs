//! Request decoding and the whole signing decision against a fixed policy and root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::sign_request(data);
});
