//! The daemon (default command): bind, start the pressure source for the chosen tier, serve the
//! agent until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::cgroup::{CgroupMemory, CgroupTarget};
use crate::cli::{ServeArgs, SignalChoice};
use crate::decisions::{self, DecisionLog};
use crate::engine::{self, EngineParts};
use crate::metrics::{self, Metrics};
use crate::policy;
use crate::pressure::ebpf::{AttachedPrograms, EbpfOptions, EbpfPipeline};
use crate::pressure::probe::{choose_tier, probe};
use crate::pressure::{PressureEvent, Tier, poll, psi};
use crate::server::ServerState;

/// Signals whose default action would end the process: each one ends in the same clean
/// shutdown (agent session closed with 1001, memory.high restored) instead.
const TERMINATING: [(i32, &str); 7] = [
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGALRM, "SIGALRM"),
];

/// Blocks (`how` = `SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) the [`TERMINATING`] signals in the
/// calling thread (and threads it creates later). Blocked at the first line of `main`, a
/// signal sent right after exec stays pending instead of killing the process with its default
/// action; once [`shutdown_signal`] has registered handlers, unblocking delivers it to them.
pub fn mask_terminating_signals(how: libc::c_int) {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for (number, _) in TERMINATING {
            libc::sigaddset(&mut set, number);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Resolves on the first of the [`TERMINATING`] signals.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered now, not at the first poll: a signal that arrives between this call and the
    // first poll must stop us gracefully rather than kill us with the default action.
    let waits: Vec<_> = TERMINATING
        .iter()
        .map(|&(number, name)| {
            let registered = signal(SignalKind::from_raw(number));
            Box::pin(async move {
                match registered {
                    Ok(mut s) => {
                        s.recv().await;
                        info!(signal = name, "signal received; shutting down");
                    }
                    Err(err) => {
                        warn!(error = %err, signal = name, "cannot listen for the signal");
                        std::future::pending::<()>().await;
                    }
                }
            })
        })
        .collect();
    async move {
        futures_util::future::select_all(waits).await;
    }
}

/// A running pressure source; dropping it stops the source.
pub enum PressureSource {
    /// eBPF programs stay attached while this lives.
    Ebpf(Box<AttachedPrograms>),
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
    run_stats: bool,
    tx: mpsc::Sender<PressureEvent>,
) -> anyhow::Result<(Tier, PressureSource)> {
    // Inline rather than on the blocking pool: a pool thread would linger and then exit while
    // the daemon is otherwise idle (a wake-up the idle benchmarks would count).
    let caps = probe(Some(&target.name));
    let (mut tier, mut reason) =
        choose_tier(caps.tier_inputs(), choice).map_err(anyhow::Error::msg)?;
    if tier == Tier::Ebpf {
        let opts = EbpfOptions {
            target: Some(target.clone()),
            coalesce,
            run_stats,
        };
        match EbpfPipeline::load(&opts).and_then(|p| p.start(tx.clone())) {
            Ok(running) => {
                info!(%tier, %reason, kernel = %caps.kernel_release, cgroup = %target.name, cgroup_id = target.id, "pressure signal tier chosen");
                return Ok((tier, PressureSource::Ebpf(Box::new(running))));
            }
            Err(err) if choice == SignalChoice::Auto => {
                let mut fallback = caps.tier_inputs();
                fallback.can_load_bpf = false;
                let (t, r) =
                    choose_tier(fallback, SignalChoice::Auto).map_err(anyhow::Error::msg)?;
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
    if choice == SignalChoice::Auto {
        // A downgrade from the tier this daemon exists for is never silent.
        warn!(%tier, %reason, kernel = %caps.kernel_release, cgroup = %target.name, "pressure signal tier chosen: not ebpf");
    } else {
        info!(%tier, %reason, kernel = %caps.kernel_release, cgroup = %target.name, "pressure signal tier chosen");
    }
    Ok((tier, PressureSource::Tasks(tasks)))
}

/// Drops every capability unless `--keep-privileges`; logs what the process holds afterwards,
/// and warns if a thread kept more (capabilities are per thread).
fn drop_privileges(args: &ServeArgs) -> anyhow::Result<()> {
    use crate::privileges;
    if !args.keep_privileges {
        privileges::drop_all_after_start()
            .context("dropping capabilities after start-up (--keep-privileges keeps them all)")?;
    }
    match privileges::current() {
        Ok(now) => info!(privileges = %now, kept_all = args.keep_privileges, "running with"),
        Err(err) => warn!(error = %format!("{err:#}"), "cannot read this process's privileges"),
    }
    if !args.keep_privileges {
        for (thread, held) in privileges::threads_holding_more() {
            warn!(thread = %thread, capabilities = %held, "a thread kept capabilities the daemon dropped");
        }
    }
    Ok(())
}

/// The policy configuration from the command line, validated, with errors naming the flag.
pub fn policy_config(args: &ServeArgs) -> anyhow::Result<policy::Config> {
    let p = &args.policy;
    let ms = Duration::from_millis;
    let cfg = policy::Config {
        manage_cgroup: args.cgroup.is_some(),
        manage_file_cache: args.pgconnstr.is_some() || args.pgconnstr_file.is_some(),
        manage_memory_high: !args.no_memory_high,
        memory_high_guard: args.memory_high_guard,
        sys_buffer: p.sys_buffer_mib.saturating_mul(policy::MIB),
        file_cache: policy::FileCacheConfig {
            resource_multiplier: p.file_cache_multiplier,
            spread_factor: p.file_cache_spread,
            min_remaining_after_cache: p.file_cache_min_remaining_mib.saturating_mul(policy::MIB),
        },
        upscale_threshold_fraction: p.upscale_threshold,
        downscale_buffer: p.downscale_buffer_mib.saturating_mul(policy::MIB),
        upscale_min_interval: ms(p.upscale_interval_ms),
        memory_high_step: p.memory_high_step_mib.saturating_mul(policy::MIB),
        memory_high_step_every: ms(p.memory_high_step_ms),
        direct_reclaim_stall: ms(p.direct_reclaim_stall_ms),
        ..policy::Config::default()
    };
    cfg.validate().map_err(|e| {
        let flag = match e.field {
            "sys_buffer" => "--sys-buffer-mib",
            "file_cache.resource_multiplier" => "--file-cache-multiplier",
            "file_cache.spread_factor" => "--file-cache-spread",
            "file_cache.min_remaining_after_cache" => "--file-cache-min-remaining-mib",
            "upscale_threshold_fraction" => "--upscale-threshold",
            "downscale_buffer" => "--downscale-buffer-mib",
            "upscale_min_interval" => "--upscale-interval-ms",
            "memory_high_step" => "--memory-high-step-mib",
            "memory_high_step_every" => "--memory-high-step-ms",
            "direct_reclaim_stall" => "--direct-reclaim-stall-ms",
            other => other,
        };
        anyhow::anyhow!("invalid {flag}: {}", e.message)
    })?;
    if args.policy.pg_timeout_ms == 0 {
        bail!("invalid --pg-timeout-ms: must be positive");
    }
    Ok(cfg)
}

/// Runs the daemon.
/// Asks the kernel to read the daemon's own executable into the page cache now, so that the
/// first upscale — code paths that never ran before — is not slowed by page faults waiting on
/// the disk. Page cache only (clean, reclaimable), not resident memory; best effort.
fn prefetch_executable() {
    use std::os::fd::AsRawFd as _;
    match std::fs::File::open("/proc/self/exe") {
        Ok(exe) => {
            // SAFETY: a valid open descriptor; the advice has no memory-safety effect.
            let rc =
                unsafe { libc::posix_fadvise(exe.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
            if rc != 0 {
                debug!(
                    errno = rc,
                    "posix_fadvise(WILLNEED) on the executable failed"
                );
            }
        }
        Err(err) => debug!(error = %err, "cannot open /proc/self/exe to prefetch it"),
    }
}

/// The first line of `path`, the connection string kept out of the command line.
fn read_connstr(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--pgconnstr-file: reading {}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        anyhow::bail!(
            "--pgconnstr-file: {} has no connection string",
            path.display()
        );
    }
    Ok(line.to_string())
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // First: from here on every terminating signal ends in the clean shutdown.
    let signalled = shutdown_signal();
    mask_terminating_signals(libc::SIG_UNBLOCK);
    prefetch_executable();
    // Before anything can allocate much: under pressure the kernel should pick a backend.
    crate::privileges::set_oom_score_adj(args.oom_score_adj);
    let cfg = policy_config(&args)?;
    let policy = policy::Policy::new(cfg.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rolling = match &args.record_dir {
        Some(dir) => Some(
            crate::record::RollingRecorder::new(
                dir,
                args.record_segment_mib.saturating_mul(1 << 20),
                args.record_total_mib.saturating_mul(1 << 20),
            )
            .context("--record-dir")?,
        ),
        None => None,
    };
    // Fail on bad input before binding or touching anything.
    let target = match &args.cgroup {
        Some(name) => Some(CgroupTarget::resolve(name)?),
        None => None,
    };
    let cgroup = match &target {
        Some(t) => Some(CgroupMemory::open(t)?),
        None => None,
    };
    let pgconnstr = match (&args.pgconnstr, &args.pgconnstr_file) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(path)) => Some(read_connstr(path)?),
        (None, None) => None,
    };
    let file_cache = match &pgconnstr {
        Some(connstr) => {
            let statement = Duration::from_millis(args.policy.pg_timeout_ms);
            let timeouts = crate::filecache::Timeouts {
                statement,
                connect: statement,
                call: statement * 2,
                ..Default::default()
            };
            Some(crate::filecache::FileCache::new(connstr, timeouts)?)
        }
        None => None,
    };
    // Bound now (a port in use fails the start), listening only once the daemon can serve:
    // until then the agent's connection is refused and retried, not accepted and left
    // waiting past its handshake deadline while the programs load.
    let bound = crate::server::bind_only(&args.addr).await?;
    let local = bound.local_addr();
    let metrics_listener = match &args.metrics_addr {
        Some(addr) => Some(
            crate::server::bind_for(addr, "serving /metrics and /debug/decisions")
                .await
                .context("--metrics-addr")?,
        ),
        None => None,
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        signalled.await;
        info!("shutting down");
        let _ = shutdown_tx.send(true);
    });

    let metrics = Metrics::new();
    let decision_log = Arc::new(DecisionLog::new(decisions::DEFAULT_CAPACITY));
    let (decision_tx, decision_rx) = mpsc::unbounded_channel();
    decisions::spawn_collector(decision_rx, decision_log.clone(), Some(metrics.clone()));

    // Nothing managed (no --cgroup, no --pgconnstr) runs the same engine and policy: the
    // policy confirms upscales and approves downscales with the reference's status.
    if cgroup.is_none() && file_cache.is_none() {
        info!(addr = %local, "not managing a cgroup or file cache");
    }
    let (backend, engine, _source) = {
        let mut growth_hint = None;
        let (pressure, source, tier) = match &target {
            Some(t) => {
                let (tx, rx) = mpsc::channel(4096);
                let coalesce = Duration::from_millis(args.coalesce_ms);
                let (tier, mut source) =
                    start_pressure(t, args.signal, coalesce, args.bpf_stats, tx).await?;
                // Everything privileged is done (programs attached, triggers registered, files
                // open), and no other thread exists yet: capabilities are per thread, and the
                // threads started from here on inherit the reduced sets.
                drop_privileges(&args)?;
                if let PressureSource::Ebpf(programs) = &mut source {
                    growth_hint = programs.take_growth_hint();
                }
                if let PressureSource::Ebpf(programs) = &source {
                    metrics.set_kernel(Box::new(
                        metrics::EbpfKernelSource::new(
                            programs.counters(),
                            programs.stats_reader(),
                        )
                        .holding_run_stats(programs.holds_run_stats()),
                    ));
                }
                (Some(rx), Some(source), Some(tier))
            }
            None => {
                drop_privileges(&args)?;
                (None, None, None)
            }
        };
        metrics.set_tier(tier);
        decision_log.set_tier(tier);
        let recorder = match (&rolling, tier) {
            (Some(rolling), Some(tier)) => {
                let header = crate::record::Header::daemon(
                    tier,
                    target.as_ref(),
                    &cfg,
                    Some(args.coalesce_ms),
                );
                Some(
                    rolling
                        .start(header)
                        .context("starting the --record-dir recording")?,
                )
            }
            (Some(_), None) => {
                warn!(
                    "--record-dir needs --cgroup (there is no pressure signal to record); not recording"
                );
                None
            }
            (None, _) => None,
        };
        let parts = EngineParts {
            policy,
            cgroup,
            file_cache,
            mem_total: engine::mem_total()?,
            metrics: Some(metrics.clone()),
            recorder,
            growth_hint,
        };
        let handle = engine::spawn(parts, pressure, shutdown_rx.clone(), Some(decision_tx));
        info!(addr = %local, cgroup = ?args.cgroup, file_cache = pgconnstr.is_some(), "server bound");
        (handle.backend, handle.task, source)
    };

    let limits = crate::admission::Limits {
        tcp_nodelay: !args.no_tcp_nodelay,
        ..Default::default()
    };
    info!(agent_allow = %args.agent_allow, "agent websocket allowed from these networks");
    let admission = crate::admission::Admission::new(limits, args.agent_allow.clone());
    let state = ServerState::new(backend, admission.clone());
    let sessions = state.sessions.clone();
    metrics.set_sessions(sessions.clone());
    metrics.set_admission(admission.clone());
    let observability = crate::server::observability_router(metrics, decision_log);
    let mut app = crate::server::router(state);
    if let Some(listener) = metrics_listener {
        let app = observability.merge(crate::server::health_router());
        let mut stop = shutdown_rx.clone();
        // The same connection budgets and deadlines; no agent is served here.
        let budget = crate::admission::Admission::new(
            crate::admission::Limits::default(),
            crate::admission::AgentAllow::any(),
        );
        tokio::spawn(async move {
            let served = crate::server::serve_router(
                listener,
                app,
                crate::session::Sessions::new(),
                budget,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )
            .await;
            if let Err(err) = served {
                warn!(error = %format!("{err:#}"), "the --metrics-addr server failed");
            }
        });
    } else {
        app = app.merge(observability);
    }
    let listener = crate::server::listen(bound, "listening for the autoscaler-agent")?;
    let mut server_shutdown = shutdown_rx.clone();
    let server = crate::server::serve_router(listener, app, sessions, admission, async move {
        let _ = server_shutdown.wait_for(|stop| *stop).await;
    });
    let served = server.await;
    engine.await.context("engine task panicked")??;
    served
}
