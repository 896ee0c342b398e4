//! The PKCS#11 URI parser, and its display read back as the same URI.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::pkcs11_uri(data);
});
