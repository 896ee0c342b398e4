//! `federation render`: the Istio objects a VirtualMesh's federation puts in each cluster,
//! written per cluster to a directory.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};

use super::output::say;

pub(crate) fn render(virtual_mesh: &Path, inventory: &Path, out_dir: &Path) -> Result<ExitCode> {
    use meshca::mesh::{self, FederationConfig, Inventory};
    let vm_source = virtual_mesh.display().to_string();
    let vm_text = meshca::fsutil::read_text(virtual_mesh).map_err(|e| anyhow!(e))?;
    let document = mesh::parse_virtual_mesh(&vm_source, &vm_text)?;
    let config = FederationConfig::from_document(&document, &vm_source)?;
    let inv_source = inventory.display().to_string();
    let inv_bytes = meshca::fsutil::read_limited(inventory, mesh::inventory::MAX_INVENTORY_BYTES)
        .with_context(|| format!("cannot read {inv_source}"))?;
    let inv_text =
        String::from_utf8(inv_bytes).map_err(|_| anyhow!("{inv_source} is not UTF-8 text"))?;
    let inventory = Inventory::from_yaml(&inv_source, &inv_text).map_err(|e| match e {
        // Already names the file.
        mesh::InventoryError::Yaml { .. } => anyhow!(e),
        e => anyhow!(e).context(format!("inventory {inv_source}")),
    })?;
    let plan = mesh::translate(&config, &inventory)
        .with_context(|| format!("VirtualMesh {vm_source} with inventory {inv_source}"))?;
    let report = mesh::render::write_dir(&plan, out_dir)?;
    if config.mode.is_none() {
        say!(
            "meshca: VirtualMesh {} has no spec.federation: nothing is federated",
            config.virtual_mesh
        );
    }
    for (cluster, path) in &report.written {
        let s = plan.summary(cluster).unwrap_or_default();
        say!(
            "meshca: {}: {} object(s) ({} service(s) offered, {} received)",
            path.display(),
            s.objects,
            s.exported,
            s.imported
        );
    }
    for path in &report.removed {
        say!(
            "meshca: removed {} (its cluster left the VirtualMesh)",
            path.display()
        );
    }
    if plan.moved_addresses() > 0 {
        say!(
            "meshca: {} service(s) got their next address candidate after a hash collision",
            plan.moved_addresses()
        );
    }
    Ok(ExitCode::SUCCESS)
}
