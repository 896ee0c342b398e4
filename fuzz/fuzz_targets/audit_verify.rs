//! `meshca audit verify`: the hash-chain check of an audit log anyone may have edited.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::audit_verify(data);
});
