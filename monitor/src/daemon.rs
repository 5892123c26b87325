//! The daemon (default command): bind, start the pressure source for the chosen tier, serve the
//! agent until SIGTERM/SIGINT.

use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::backend;
use crate::cgroup::CgroupTarget;
use crate::cli::{ServeArgs, SignalChoice};
use crate::pressure::ebpf::{AttachedPrograms, EbpfOptions, EbpfPipeline};
use crate::pressure::probe::{choose_tier, probe};
use crate::pressure::{PressureEvent, Tier, poll, psi};

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {}
        r = tokio::signal::ctrl_c() => {
            if let Err(err) = r {
                warn!(error = %err, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A running pressure source; dropping it stops the source.
pub enum PressureSource {
    /// eBPF programs stay attached while this lives.
    Ebpf(AttachedPrograms),
    /// PSI and poll tiers are plain tasks.
    Tasks(Vec<tokio::task::JoinHandle<anyhow::Result<()>>>),
}

impl Drop for PressureSource {
    fn drop(&mut self) {
        if let PressureSource::Tasks(tasks) = self {
            for t in tasks {
                t.abort();
            }
        }
    }
}

/// Starts the pressure source for `target`: probes, picks the tier (`auto` falls back with a
/// warning when eBPF cannot be loaded), and logs the choice and why.
pub async fn start_pressure(
    target: &CgroupTarget,
    choice: SignalChoice,
    coalesce: Duration,
    tx: mpsc::Sender<PressureEvent>,
) -> anyhow::Result<(Tier, PressureSource)> {
    let name = target.name.clone();
    let caps = tokio::task::spawn_blocking(move || probe(Some(&name)))
        .await
        .context("probe task failed")?;
    let (mut tier, mut reason) =
        choose_tier(caps.tier_inputs(), choice).map_err(anyhow::Error::msg)?;
    if tier == Tier::Ebpf {
        let opts = EbpfOptions {
            target: Some(target.clone()),
            coalesce,
        };
        match EbpfPipeline::load(&opts).and_then(|p| p.start(tx.clone())) {
            Ok(running) => {
                info!(%tier, %reason, kernel = %caps.kernel_release, cgroup = %target.name, cgroup_id = target.id, "pressure signal tier chosen");
                return Ok((tier, PressureSource::Ebpf(running)));
            }
            Err(err) if choice == SignalChoice::Auto => {
                let mut fallback = caps.tier_inputs();
                fallback.can_load_bpf = false;
                let (t, r) = choose_tier(fallback, SignalChoice::Auto).map_err(anyhow::Error::msg)?;
                warn!(error = %format!("{err:#}"), fallback = %t, "eBPF could not be loaded; falling back");
                tier = t;
                reason = format!("eBPF failed to load ({err:#}); {r}");
            }
            Err(err) => return Err(err.context("--signal ebpf")),
        }
    }
    let tasks = match tier {
        Tier::Psi => psi::spawn(target, psi::PsiTrigger::default(), tx)?,
        Tier::Poll => vec![poll::spawn(target, tx)],
        Tier::Ebpf => bail!("internal error: eBPF tier reached the task path"),
    };
    info!(%tier, %reason, kernel = %caps.kernel_release, cgroup = %target.name, "pressure signal tier chosen");
    Ok((tier, PressureSource::Tasks(tasks)))
}

/// Runs the daemon.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let listener = crate::server::bind(&args.addr).await?;
    let local = listener
        .local_addr()
        .context("reading the listener's address")?;
    if args.cgroup.is_some() || args.pgconnstr.is_some() {
        // The scaling engine (issue 4) is what manages a cgroup and the file cache; until it is
        // wired in, refuse rather than pretend to manage them.
        bail!(
            "--cgroup/--pgconnstr: the scaling engine is not available in this build; run \
             without them to serve the protocol only"
        );
    }
    let backend = backend::spawn_unmanaged();
    info!(addr = %local, "server bound; not managing a cgroup or file cache");
    crate::server::serve(listener, backend, shutdown_signal()).await
}
