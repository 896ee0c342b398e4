//! A root certificate meshca did not make (DER or PEM): reading and the root lint.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::root_cert(data);
});
