//! CSR parsing and validation: DER and PEM input through parsing, key description, the
//! key policy and proof of possession. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::csr(data);
});
