//! VirtualMesh policy: the documents the signer's operators own, and the pure rules every
//! intermediate must satisfy. No I/O here, so every rule is tested exhaustively.

pub mod rules;
pub mod virtual_mesh;

pub use rules::{Denial, Rule, ValidityError, ValidityWindow};
pub use virtual_mesh::{ObjectRef, PolicyLoadError, PolicySet, VirtualMeshPolicy};
