//! The signer's client CRL files: reading, ordering and superseding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::client_crls(data);
});
