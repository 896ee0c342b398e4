//! `agent`, `mesh-controller` and `crds`: the controllers that install intermediates (in
//! Kubernetes or in a directory) and run the meshes, with their Lease and metrics.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, anyhow, bail};

use meshca::agent::controller::{Controller, ControllerOptions};
use meshca::agent::directory::{self, DirOptions, DirOutcome};
use meshca::agent::election::LeaderLoop;
use meshca::agent::k8s::Kube;
use meshca::agent::metrics::{AgentMetrics, Exposition};
use meshca::agent::rotation::{self, RotationSettings};
use meshca::signer::audit::rfc3339;

use super::args::{AgentArgs, CrdComponent, MeshControllerArgs, usage_error};
use super::bundle::installed_json;
use super::output::{say, say_json, say_raw};
use super::{runtime, warn_of_open_key};

/// `agent --once` whose bundle needed nothing but whose signer was unavailable (not
/// reached, or answered 429 or 5xx):
/// sysexits' EX_TEMPFAIL (try again later).
const EXIT_SIGNER_NOT_REACHED: u8 = 75;
/// A Kubernetes `--once` pass (agent, mesh controller) that another replica's Lease kept
/// from acting: before the pass (nothing written) or during it (the rest left to the
/// leader). Not 0: what the caller asked for was not done here; not 1: nothing is broken.
pub(crate) const EXIT_NOT_LEADER: u8 = 3;

/// A Kubernetes `--once` pass another replica's Lease kept from acting (exit
/// [`EXIT_NOT_LEADER`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NotLeader(&'static str);

/// `crds`: every CRD meshca defines, or one component's.
pub(crate) fn crds(component: Option<CrdComponent>) -> Result<ExitCode> {
    use meshca::agent::crd::Component;
    let component = component.map(|c| match c {
        CrdComponent::Agent => Component::Agent,
        CrdComponent::MeshController => Component::MeshController,
    });
    say_raw!(
        "{}",
        meshca::agent::crd::crds_yaml_for(component)
            .map_err(|e| anyhow!("cannot print CRDs: {e}"))?
    );
    Ok(ExitCode::SUCCESS)
}

/// The directory agent's renewal settings, checked together: each flag's range is
/// checked as it is parsed.
fn directory_rotation(args: &AgentArgs) -> Result<RotationSettings, rotation::SettingsError> {
    let rotation = RotationSettings::new(args.renew_fraction, args.jitter_fraction)?;
    // A single pass may be due at once on purpose (forcing a renewal); a loop would then
    // renew every second.
    if !args.once {
        rotation::check_ttl(args.ttl_seconds, &rotation)?;
    }
    Ok(rotation)
}

pub(crate) fn agent(args: AgentArgs, json: bool) -> Result<ExitCode> {
    let resync = std::time::Duration::from_secs(args.resync_seconds.max(1));
    let Some(target) = args.target_dir.clone() else {
        return kubernetes_agent(args, resync);
    };
    let rotation = directory_rotation(&args)
        .unwrap_or_else(|e| usage_error("agent", e.message(&rotation::AGENT_FLAGS)));
    // clap requires these with --target-dir.
    let (Some(signer), Some(virtual_mesh), Some(mesh)) =
        (&args.signer, args.virtual_mesh, args.mesh)
    else {
        bail!("directory mode (--target-dir) needs --signer, --virtual-mesh and --mesh");
    };
    let signer = args.tls.endpoint(signer);
    // Read once now, so a wrong flag or file fails the start; the loop reads them again
    // for each pass (a rotated client certificate is used without a restart).
    let client = signer.connect()?;
    warn_of_open_key(client.key_readable_by_others());
    let opts = DirOptions {
        target,
        virtual_mesh,
        mesh,
        key_type: args.key_type,
        ttl_seconds: args.ttl_seconds,
        adopt: args.adopt,
        rotation,
        retired_roots: args.retire_roots,
        pin: rotation::RootPin::new(&args.accept_roots, rotation::AGENT_FLAGS.accepted_roots),
    };
    let rt = runtime()?;
    if args.once {
        let outcome = rt.block_on(directory::reconcile(
            &client,
            &opts,
            &mut directory::PassMemory::default(),
            SystemTime::now(),
        ))?;
        directory::log_outcome(&opts.target, &outcome);
        if json {
            let s = outcome.summary();
            let mut report = installed_json(
                &opts.target,
                s,
                outcome.roots_changed(),
                outcome.istiod_restart().is_some(),
            );
            let (reason, signer_error) = match &outcome {
                DirOutcome::Installed { reason, .. } => (Some(reason.to_string()), None),
                DirOutcome::UpToDate {
                    signer_error: Some(error),
                    ..
                } => (None, Some(error.clone())),
                _ => (None, None),
            };
            report["result"] = outcome.result().into();
            report["reason"] = reason.into();
            report["renew_at"] = rfc3339(outcome.renew_at()).into();
            report["held_by_root"] = outcome.held_by_root().into();
            report["signer_error"] = signer_error.clone().into();
            say_json(&report);
            return Ok(if signer_error.is_some() {
                ExitCode::from(EXIT_SIGNER_NOT_REACHED)
            } else {
                ExitCode::SUCCESS
            });
        }
        let s = outcome.summary();
        say!("meshca: {}: {}", opts.target.display(), outcome.what());
        say!("  serial       {}", s.serial);
        say!("  not after    {}", rfc3339(s.not_after));
        say!("  renew at     {}", rfc3339(outcome.renew_at()));
        say!("  root sha256  {}", s.anchor_fingerprint);
        say!("  trusts       {}", s.root_fingerprints.join(", "));
        if let Some((why, _)) = outcome.istiod_restart() {
            say!("  then         restart istiod: {why}");
        }
        if let DirOutcome::UpToDate {
            signer_error: Some(error),
            ..
        } = &outcome
        {
            // The bundle stands on its own, but a cron job must learn of a signer it will
            // need at the renewal (a wrong URL, a firewall) before then.
            say!("  signer       unavailable: {error}");
            return Ok(ExitCode::from(EXIT_SIGNER_NOT_REACHED));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let metrics = Arc::new(AgentMetrics::new());
    rt.block_on(async {
        let stop = shutdown_signal()?;
        serve_metrics(args.metrics_listen, metrics.clone()).await?;
        directory::run(&signer, &opts, resync, &metrics, stop).await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT taken over before anything says it is ready (see
/// [`meshca::signals::shutdown_signal`]).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    meshca::signals::shutdown_signal().context("cannot handle SIGTERM and SIGINT")
}

/// With `--metrics-listen`: serves a controller's metrics, logging where.
async fn serve_metrics(addr: Option<SocketAddr>, metrics: Arc<dyn Exposition>) -> Result<()> {
    if let Some(addr) = addr {
        let bound = meshca::agent::metrics::serve(addr, metrics)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(metrics = %bound, "metrics on http://{bound}/metrics");
    }
    Ok(())
}

fn kubernetes_agent(args: AgentArgs, resync: std::time::Duration) -> Result<ExitCode> {
    if args.signer.is_some() || args.virtual_mesh.is_some() || args.mesh.is_some() {
        bail!(
            "--signer, --virtual-mesh and --mesh are for directory mode (--target-dir); in Kubernetes they come from each VirtualMeshCertificateSigningRequest"
        );
    }
    // Fail at start on unreadable client credentials (they are read again on every
    // pass, so a rotated Secret is picked up).
    let tls = args.tls;
    let read = meshca::tlsutil::client_tls(&tls.ca_cert, &tls.client_cert, &tls.client_key)?;
    warn_of_open_key(read.key_readable_by_others.as_ref());
    let opts = ControllerOptions {
        namespace: args.namespace,
        identity: replica_identity(args.identity, "meshca-agent", args.once),
        lease_name: args.lease_name,
        lease_duration: std::time::Duration::from_secs(args.lease_seconds),
        resync,
        ca_cert: tls.ca_cert,
        client_cert: tls.client_cert,
        client_key: tls.client_key,
    };
    let metrics = Arc::new(AgentMetrics::new());
    let api_timeout = std::time::Duration::from_secs(args.api_timeout_seconds);
    run_in_cluster(
        args.once,
        args.metrics_listen,
        api_timeout,
        std::time::Duration::from_secs(args.stop_grace_seconds),
        metrics.clone(),
        |client| Controller::new(Kube::new(client), opts, metrics),
    )
}

pub(crate) fn mesh_controller(args: MeshControllerArgs) -> Result<ExitCode> {
    use meshca::mesh_controller::controller::{MeshController, MeshControllerOptions};
    use meshca::mesh_controller::metrics::MeshControllerMetrics;
    let opts = MeshControllerOptions {
        namespace: args.namespace,
        identity: replica_identity(args.identity, "meshca-mesh-controller", args.once),
        lease_name: args.lease_name,
        lease_duration: std::time::Duration::from_secs(args.lease_seconds),
        resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
        retire_after: std::time::Duration::from_secs(args.retire_after_seconds),
        member_api_timeout: std::time::Duration::from_secs(args.api_timeout_seconds),
    };
    let metrics = Arc::new(MeshControllerMetrics::new());
    run_in_cluster(
        args.once,
        args.metrics_listen,
        opts.member_api_timeout,
        std::time::Duration::from_secs(args.stop_grace_seconds),
        metrics.clone(),
        |client| MeshController::new(client, opts, metrics),
    )
}

/// This replica's name in the Lease: the flag, else the pod name, else `{fallback}-{pid}`.
/// A `--once` run adds `-once-{pid}`: run with a replica's name (`kubectl exec` into its
/// pod inherits POD_NAME), it would otherwise take that replica's Lease for its own and
/// act beside it.
fn replica_identity(flag: Option<String>, fallback: &str, once: bool) -> String {
    let name = flag
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("{fallback}-{}", std::process::id()));
    if once {
        format!("{name}-once-{}", std::process::id())
    } else {
        name
    }
}

/// Runs a Lease-holding controller against the cluster it finds (in-cluster or
/// kubeconfig): one pass with `--once`, else until SIGTERM or SIGINT; `metrics` served
/// on `metrics_listen` meanwhile.
fn run_in_cluster<C: LeaderLoop>(
    once: bool,
    metrics_listen: Option<SocketAddr>,
    api_timeout: std::time::Duration,
    stop_grace: std::time::Duration,
    metrics: Arc<dyn Exposition>,
    controller: impl FnOnce(kube::Client) -> C,
) -> Result<ExitCode> {
    // The Kubernetes client's TLS is kube's rustls configuration, with rustls's own clock,
    // which panics in every handshake before 1970 (meshca's own clients say so instead).
    let now = SystemTime::now();
    if now < SystemTime::UNIX_EPOCH {
        bail!(
            "this machine's clock reads {}, before 1970: the Kubernetes client cannot check the API server's certificate; set the clock right (NTP) and start again",
            rfc3339(now)
        );
    }
    let rt = runtime()?;
    rt.block_on(async move {
        // `--once` keeps the default actions: a SIGTERM ends a single pass at once.
        let stop = (!once).then(shutdown_signal).transpose()?;
        let mut config = kube::Config::infer()
            .await
            .context("cannot find a Kubernetes configuration (in-cluster or kubeconfig)")?;
        meshca::agent::k8s::bound_calls(&mut config, api_timeout);
        let client = meshca::agent::k8s::bounded_client(config)
            .context("cannot build the Kubernetes client")?;
        let controller = controller(client);
        serve_metrics(metrics_listen, metrics).await?;
        match stop {
            Some(stop) => controller.run(stop, stop_grace).await,
            None => {
                let (led, next) = controller.run_once_led().await?;
                if !led {
                    return Err(anyhow!(NotLeader(
                        "another replica holds the Lease: this --once pass did nothing (a replica \
                         that stopped without giving it up holds it for its duration; a running \
                         one makes the pass itself)"
                    )));
                }
                // A pass longer than the Lease may lose it to another replica midway: its
                // steps after that wrote nothing (each logged "not the leader any more"),
                // and the pass still returned. Still ours (renewed here if need be) or not.
                if !controller.elector().ensure().await? {
                    return Err(anyhow!(NotLeader(
                        "this replica is not the leader any more: another replica took the \
                         Lease during this --once pass, which wrote nothing after that (the \
                         leader makes the rest)"
                    )));
                }
                // Given back at once: a one-off pass (a Job, a laptop) must not keep the
                // replicas waiting for the Lease to expire.
                if let Err(e) = controller.release().await {
                    tracing::warn!(error = %e, "could not give the Lease up; it expires by itself");
                }
                say!("meshca: one pass done; next look in {}s", next.as_secs());
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
