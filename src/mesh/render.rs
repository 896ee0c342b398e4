//! `meshca federation render`: a plan as one multi-document YAML file per cluster, for GitOps
//! and review. Same input, same bytes: objects come in the plan's fixed order and every map
//! is sorted. Each file is streamed to a temporary file and renamed into place.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::federation::FederationPlan;
use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cluster {0} is not in the plan")]
    UnknownCluster(String),
    #[error("cannot serialize {object}: {message}")]
    Serialize { object: String, message: String },
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: Box<RenderError>,
    },
}

/// The first line of every rendered file: it names the VirtualMesh and the cluster, so a
/// later render can recognise (and remove) a file it wrote for a cluster that has left.
pub fn header_line(plan: &FederationPlan<'_>, cluster: &str) -> String {
    format!(
        "# meshca federation render: VirtualMesh {}, cluster {cluster}",
        plan.config().virtual_mesh
    )
}

fn options() -> serde_saphyr::SerializerOptions {
    let mut options = serde_saphyr::SerializerOptions::default();
    // Long host names stay plain scalars rather than folded blocks.
    options.prefer_block_scalars = false;
    options
}

/// Writes the file for `cluster`: a comment header, then one document per object.
pub fn render_cluster_to(
    plan: &FederationPlan<'_>,
    cluster: &str,
    out: &mut dyn Write,
) -> Result<(), RenderError> {
    let unknown = || RenderError::UnknownCluster(cluster.to_string());
    let summary = plan.summary(cluster).ok_or_else(unknown)?;
    let objects = plan.objects(cluster).ok_or_else(unknown)?;
    writeln!(out, "{}", header_line(plan, cluster))?;
    writeln!(
        out,
        "# {} service(s) offered to the other clusters, {} received from them: {} object(s).",
        summary.exported, summary.imported, summary.objects
    )?;
    writeln!(
        out,
        "# Generated: change the inventory or the VirtualMesh, not this file."
    )?;
    for object in objects {
        out.write_all(b"---\n")?;
        serde_saphyr::to_io_writer_with_options(&mut &mut *out, &object.to_object(), options())
            .map_err(|e| RenderError::Serialize {
                object: object.id().to_string(),
                message: e.to_string(),
            })?;
    }
    Ok(())
}

/// The file for `cluster`, in memory.
pub fn render_cluster(plan: &FederationPlan<'_>, cluster: &str) -> Result<String, RenderError> {
    let mut out = Vec::new();
    render_cluster_to(plan, cluster, &mut out)?;
    // Every piece written is a str, so this cannot fail; map rather than unwrap anyway.
    String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e).into())
}

/// What [`write_dir`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// (cluster, file) in cluster order.
    pub written: Vec<(String, PathBuf)>,
    /// Files an earlier render wrote for this VirtualMesh for clusters no longer in it.
    pub removed: Vec<PathBuf>,
}

/// Writes `<dir>/<cluster>.yaml` for every cluster of the plan (creating `dir`), each file
/// atomically, and removes the files an earlier render of the same VirtualMesh left for
/// clusters that are gone (recognised by their header line; nothing else is touched).
pub fn write_dir(plan: &FederationPlan<'_>, dir: &Path) -> Result<WriteReport, RenderError> {
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |e: RenderError| RenderError::Write {
            path,
            source: Box::new(e),
        }
    };
    std::fs::create_dir_all(dir)
        .map_err(RenderError::from)
        .map_err(at(dir))?;
    let mut report = WriteReport::default();
    let clusters: Vec<&str> = plan.clusters().collect();
    for cluster in &clusters {
        let path = dir.join(format!("{cluster}.yaml"));
        fsutil::write_atomic_with(&path, 0o644, |out| render_cluster_to(plan, cluster, out))
            .map_err(at(&path))?;
        report.written.push((cluster.to_string(), path));
    }
    let mut stale = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(RenderError::from)
        .map_err(at(dir))?;
    for entry in entries {
        let entry = entry.map_err(RenderError::from).map_err(at(dir))?;
        let file_name = entry.file_name();
        let Some(cluster) = file_name.to_str().and_then(|n| n.strip_suffix(".yaml")) else {
            continue;
        };
        if clusters.contains(&cluster) || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        let Ok(start) = read_start(&path) else {
            continue;
        };
        let expected = header_line(plan, cluster);
        if start.split(|&b| b == b'\n').next() == Some(expected.as_bytes()) {
            stale.push(path);
        }
    }
    stale.sort();
    for path in stale {
        std::fs::remove_file(&path)
            .map_err(RenderError::from)
            .map_err(at(&path))?;
        report.removed.push(path);
    }
    fsutil::sync_dir(dir)
        .map_err(RenderError::from)
        .map_err(at(dir))?;
    Ok(report)
}

/// The first 4 KiB of a file of any size.
fn read_start(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(4096);
    std::fs::File::open(path)?
        .take(4096)
        .read_to_end(&mut buf)?;
    Ok(buf)
}
