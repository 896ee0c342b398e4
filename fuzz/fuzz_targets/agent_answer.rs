//! The agent's decoding of the signer's JSON answers (policy with announced roots; a
//! signing answer, checked as a bundle).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::agent_answer(data);
});
