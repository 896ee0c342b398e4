//! YAML documents: VirtualMesh policies and federation inventories.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshca::fuzzing::mesh_yaml(data);
});
