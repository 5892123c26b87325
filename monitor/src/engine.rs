//! The engine: glues pressure events, on-demand cgroup readings and agent requests to the pure
//! [`Policy`], and applies its actions (cgroup `memory.high`, Postgres file cache, replies,
//! `UpscaleRequest`s). One task owns all VM-wide state for the daemon's lifetime, so an agent
//! reconnect resets nothing.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::backend::{BackendHandle, ScalingCall, ScalingOutcome, ScalingRequest};
use crate::cgroup::{CgroupMemory, HighWriter};
use crate::filecache::FileCache;
use crate::logging::warn_limited;
use crate::metrics::Metrics;
use crate::policy::{Action, Decision, DecisionKind, Effect, Input, Policy, PressureSignal};
use crate::pressure::ebpf::{GrowthHint, GrowthSnapshot};
use crate::pressure::{PressureEvent, PressureKind, RecordKind, boottime_ns};
use crate::record::Recorder;

/// Most pressure events folded into one on-demand reading.
const MAX_BURST: usize = 256;

/// What the engine manages.
pub struct EngineParts {
    pub policy: Policy,
    /// The watched cgroup (`--cgroup`).
    pub cgroup: Option<CgroupMemory>,
    /// The Postgres file cache (`--pgconnstr`).
    pub file_cache: Option<FileCache>,
    /// Total memory at startup (MemTotal), the reference's starting size.
    pub mem_total: u64,
    /// Where to count events, requests and the VM's sizes (`/metrics`).
    pub metrics: Option<Metrics>,
    /// Records events and every policy step for post-mortems and `vm-monitor replay`.
    pub recorder: Option<Recorder>,
    /// The ebpf tier's in-kernel growth hint, armed after every reading.
    pub growth_hint: Option<GrowthHint>,
}

/// Observers of the engine (decision log, metrics) get every decision here.
pub type DecisionSink = mpsc::UnboundedSender<Decision>;

/// The running engine's handles.
pub struct EngineHandle {
    /// For the websocket server.
    pub backend: BackendHandle,
    /// Resolves with the engine's result after shutdown (memory.high restored).
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts the engine. It stops after `shutdown` flips to true, once memory.high is back at
/// `max` and every pending request has been answered.
pub fn spawn(
    parts: EngineParts,
    pressure: Option<mpsc::Receiver<PressureEvent>>,
    shutdown: watch::Receiver<bool>,
    decisions: Option<DecisionSink>,
) -> EngineHandle {
    let (calls_tx, calls_rx) = mpsc::channel(64);
    let (wanted_tx, wanted_rx) = watch::channel(0u64);
    let (agent_tx, agent_rx) = watch::channel(None);
    let high_writer = parts.cgroup.as_ref().and_then(|cg| {
        HighWriter::spawn(cg.clone())
            .map_err(|err| {
                warn!(error = %format!("{err:#}"), "memory.high is written on the runtime thread instead");
            })
            .ok()
    });
    let engine = Engine {
        high_writer,
        policy: parts.policy,
        cgroup: parts.cgroup,
        file_cache: parts.file_cache,
        fc_generation: 0,
        fc_retry_at: None,
        replies: VecDeque::new(),
        wanted: wanted_tx,
        tick_at: None,
        decisions,
        metrics: parts.metrics,
        recorder: parts.recorder,
        growth_hint: parts.growth_hint,
        armed: None,
        growth_base: GrowthSnapshot::default(),
        read_now: false,
        last_burst_reading: None,
        recheck_at: None,
        agent_seen: None,
    };
    let task = tokio::spawn(engine.run(parts.mem_total, pressure, calls_rx, agent_rx, shutdown));
    EngineHandle {
        backend: BackendHandle {
            calls: calls_tx,
            upscale_wanted: wanted_rx,
            agent: std::sync::Arc::new(agent_tx),
        },
        task,
    }
}

struct Engine {
    policy: Policy,
    cgroup: Option<CgroupMemory>,
    /// Writes memory.high off the runtime thread (see [`HighWriter`]).
    high_writer: Option<HighWriter>,
    file_cache: Option<FileCache>,
    /// `FileCache::generation` last announced to the policy.
    fc_generation: u64,
    /// When to try reaching Postgres again after it went away (boot-clock ns).
    fc_retry_at: Option<u64>,
    /// Requests the policy has not answered yet, with their reply slots, oldest first.
    replies: VecDeque<(ScalingRequest, oneshot::Sender<ScalingOutcome>)>,
    wanted: watch::Sender<u64>,
    /// Policy-requested tick (boot-clock ns).
    tick_at: Option<u64>,
    decisions: Option<DecisionSink>,
    metrics: Option<Metrics>,
    recorder: Option<Recorder>,
    growth_hint: Option<GrowthHint>,
    /// The policy's growth hint last armed (reading time, budget).
    armed: Option<(Duration, u64)>,
    /// Growth totals taken just before the last successful reading: the next arm counts
    /// from there.
    growth_base: GrowthSnapshot,
    /// The hint was already reached when armed: read at the next chance.
    read_now: bool,
    /// The last reading taken for a pressure burst, for reclaim bursts right after it.
    last_burst_reading: Option<(std::time::Instant, u64)>,
    /// Policy-requested fresh reading while usage stays over the threshold (boot-clock ns).
    recheck_at: Option<u64>,
    /// The agent session the policy was last told about.
    agent_seen: Option<u64>,
}

fn now() -> Duration {
    Duration::from_nanos(boottime_ns())
}

/// A tokio deadline for a boot-clock instant.
fn deadline(at_ns: u64) -> tokio::time::Instant {
    let wait = at_ns.saturating_sub(boottime_ns());
    tokio::time::Instant::now() + Duration::from_nanos(wait)
}

async fn sleep_until(at_ns: Option<u64>) {
    match at_ns {
        Some(at) => tokio::time::sleep_until(deadline(at)).await,
        None => std::future::pending().await,
    }
}

impl Engine {
    async fn run(
        mut self,
        mem_total: u64,
        mut pressure: Option<mpsc::Receiver<PressureEvent>>,
        mut calls: mpsc::Receiver<ScalingCall>,
        mut agent: watch::Receiver<Option<u64>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        // A reading first so the startup memory.high is never below current usage; Start then
        // writes memory.high = max before anything else (reference #5348).
        self.feed_reading().await;
        self.feed(Input::Start {
            at: now(),
            mem_total,
        })
        .await;
        // No agent yet: the policy keeps its wishes for the first one to connect.
        let current = *agent.borrow_and_update();
        self.feed(Input::AgentDisconnected { at: now() }).await;
        self.agent_changed(current).await;
        self.connect_file_cache().await;

        let mut burst = Vec::with_capacity(MAX_BURST);
        let mut agent_open = true;
        loop {
            // Once per wake-up, not per input: a burst of events shares one reading, and
            // re-arming is a syscall.
            self.follow_readings();
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                call = calls.recv() => {
                    match call {
                        Some(call) => self.handle_call(call).await,
                        None => break, // server gone
                    }
                }
                changed = agent.changed(), if agent_open => {
                    if changed.is_err() {
                        agent_open = false;
                        continue;
                    }
                    let current = *agent.borrow_and_update();
                    self.agent_changed(current).await;
                }
                n = recv_burst(&mut pressure, &mut burst) => {
                    if n == 0 {
                        // The source stopped (its task failed); keep serving requests.
                        warn!("pressure source stopped; upscale requests now come only from agent-driven readings");
                        pressure = None;
                        continue;
                    }
                    self.handle_pressure(&mut burst).await;
                }
                () = sleep_until(self.tick_at) => {
                    self.tick_at = None;
                    self.feed(Input::Tick { at: now() }).await;
                }
                () = sleep_until(self.recheck_at) => {
                    self.recheck_at = None;
                    // Once: a failing reading must not spin.
                    self.read_now = false;
                    self.feed_reading().await;
                }
                () = sleep_until(self.fc_retry_at) => {
                    self.fc_retry_at = None;
                    self.connect_file_cache().await;
                }
            }
        }
        self.shut_down(&mut calls).await
    }

    /// Tells the policy about a change of the agent session holding the seat (a replacement
    /// is a disconnect and a connect: the new agent knows nothing of earlier requests).
    async fn agent_changed(&mut self, current: Option<u64>) {
        if current == self.agent_seen {
            return;
        }
        if self.agent_seen.is_some() {
            self.feed(Input::AgentDisconnected { at: now() }).await;
        }
        self.agent_seen = current;
        if current.is_some() {
            self.feed(Input::AgentConnected { at: now() }).await;
        }
    }

    /// Sends the policy's answer to the oldest open request, counting it in the metrics.
    fn reply(&mut self, outcome: ScalingOutcome) {
        match self.replies.pop_front() {
            Some((request, slot)) => {
                if let Some(m) = &self.metrics {
                    m.scaling_outcome(&request, Some(&outcome));
                }
                // The session may have timed out and gone; nothing to do then.
                let _ = slot.send(outcome);
            }
            None => warn!(?outcome, "policy replied with no request pending"),
        }
    }

    async fn shut_down(&mut self, calls: &mut mpsc::Receiver<ScalingCall>) -> anyhow::Result<()> {
        calls.close();
        while let Ok(call) = calls.try_recv() {
            self.replies.push_back((call.request, call.reply));
        }
        self.feed(Input::Shutdown { at: now() }).await;
        // Requests that slipped in before `close` were queued above; the policy answers them.
        while !self.replies.is_empty() {
            self.reply(ScalingOutcome::InternalError(
                crate::policy::SHUTTING_DOWN.to_string(),
            ));
        }
        if let Some(r) = self.recorder.take() {
            match tokio::task::spawn_blocking(move || r.finish()).await {
                Ok(Ok(stats)) => info!(?stats, "recording closed"),
                Ok(Err(err)) => warn!(error = %format!("{err:#}"), "closing the recording failed"),
                Err(err) => warn!(error = %err, "closing the recording failed"),
            }
        }
        if self.policy.is_shut_down() || self.cgroup.is_none() {
            info!("engine stopped; memory.high restored to max");
            Ok(())
        } else {
            anyhow::bail!("could not restore memory.high to max on shutdown (see the log above)")
        }
    }

    async fn handle_call(&mut self, call: ScalingCall) {
        self.replies.push_back((call.request, call.reply));
        // Decide on fresh numbers: on the event-driven tiers the last reading can be from the
        // last pressure burst, long before memory was freed, and memory.high is never set below
        // it.
        self.feed_reading().await;
        let at = now();
        let input = match call.request {
            ScalingRequest::Upscale { granted } => Input::UpscaleNotification {
                at,
                granted_mem: granted.mem_bytes,
            },
            ScalingRequest::Downscale { target } => Input::DownscaleRequest {
                at,
                target_mem: target.mem_bytes,
            },
        };
        self.feed(input).await;
    }

    async fn handle_pressure(&mut self, burst: &mut Vec<PressureEvent>) {
        // One on-demand reading serves the whole burst: events arrive in bunches under
        // pressure, and memory.stat is the expensive part.
        let wants_reading = burst
            .iter()
            .any(|ev| !matches!(ev.kind, PressureKind::PolledSample { .. }));
        // Reclaim records come at up to 100/s per kind under a limit someone else holds; one
        // reading per poll period serves them as well as the poll tier would be served. What
        // can trigger on its own (growth hint, OOM, direct-reclaim stall, PSI, memory.events)
        // always gets a fresh one. The memory.high guard steps on every reading, so it always
        // reads.
        let reusable = !self.policy.config().guards_memory_high()
            && burst.iter().all(|ev| {
                matches!(
                    ev.kind,
                    PressureKind::Kernel(
                        RecordKind::MemcgReclaimBegin
                            | RecordKind::MemcgReclaimEnd
                            | RecordKind::DirectReclaimBegin
                            | RecordKind::KswapdWake
                            | RecordKind::MemcgEvents
                    )
                )
            });
        let recent = self
            .last_burst_reading
            .filter(|(at, _)| reusable && at.elapsed() < READING_REUSE)
            .map(|(_, r)| r);
        let needs_reading = wants_reading && recent.is_none();
        let base = if needs_reading {
            self.growth_snapshot()
        } else {
            None
        };
        let started = std::time::Instant::now();
        let reading = match &self.cgroup {
            Some(cg) if needs_reading => match cg.stat() {
                Ok(s) => {
                    self.reading_taken(base);
                    debug!(
                        took_us = started.elapsed().as_micros() as u64,
                        events = burst.len(),
                        "memory.stat read for a pressure burst"
                    );
                    self.last_burst_reading = Some((started, s.non_reclaimable()));
                    Some(s.non_reclaimable())
                }
                Err(err) => {
                    // Would repeat on every burst while the file stays unreadable.
                    warn_limited!(error = %format!("{err:#}"), "cannot read memory.stat on a pressure event");
                    None
                }
            },
            _ => recent,
        };
        for ev in burst.drain(..) {
            if let Some(m) = &self.metrics {
                m.pressure_event(&ev);
            }
            if let Some(r) = &self.recorder {
                r.record_event(&ev);
            }
            let (signal, carried) = PressureSignal::from_event(&ev);
            let input = Input::Pressure {
                at: Duration::from_nanos(ev.ts_ns.max(1)),
                signal,
                reading: carried.or(reading),
            };
            self.feed(input).await;
        }
    }

    async fn feed_reading(&mut self) {
        let base = self.growth_snapshot();
        let Some(cg) = &self.cgroup else { return };
        let reading = cg
            .stat()
            .and_then(|s| Ok((s.non_reclaimable(), cg.current()?)));
        match reading {
            Ok((non_reclaimable, current)) => {
                self.reading_taken(base);
                self.feed(Input::Reading {
                    at: now(),
                    non_reclaimable,
                    current,
                })
                .await
            }
            Err(err) => {
                warn_limited!(error = %format!("{err:#}"), "cannot read the cgroup's memory")
            }
        }
    }

    /// (Re)announces Postgres to the policy when a connection is (re)established, so the
    /// file cache is resized once Postgres is back.
    async fn connect_file_cache(&mut self) {
        let Some(fc) = self.file_cache.as_mut() else {
            return;
        };
        match fc.max_size().await {
            Ok(max) => {
                let generation = fc.generation();
                if generation != self.fc_generation {
                    self.fc_generation = generation;
                    info!(postgres = %fc.target(), max_mib = max >> 20, "connected to Postgres");
                    self.feed(Input::FileCacheConnected {
                        at: now(),
                        max_size: max,
                    })
                    .await;
                }
            }
            Err(err) => {
                let wait = fc.next_attempt_in().unwrap_or(Duration::from_secs(1));
                // Retried with backoff for as long as Postgres is down.
                warn_limited!(error = %format!("{err:#}"), retry_in = ?wait, "Postgres not reachable; file cache resize postponed");
                self.fc_retry_at = Some(boottime_ns() + wait.as_nanos() as u64);
            }
        }
    }

    /// One policy step, recorded (input and actions) so `vm-monitor replay` can reproduce it.
    fn step(&mut self, input: Input) -> Vec<Action> {
        match &self.recorder {
            Some(r) => {
                let actions = self.policy.handle(input.clone());
                r.record_step(&input, &actions);
                actions
            }
            None => self.policy.handle(input),
        }
    }

    /// Feeds one input and applies the resulting actions, feeding back their results until the
    /// policy has nothing more to do.
    async fn feed(&mut self, input: Input) {
        // The reaction latency is measured from the kernel's timestamp of the triggering event.
        let trigger_at = match &input {
            Input::Pressure { at, .. } => Some(*at),
            _ => None,
        };
        if let Some(m) = &self.metrics {
            m.input(&input);
        }
        let mut queue: VecDeque<Action> = self.step(input).into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::SendUpscaleRequest { reason } => {
                    info!(%reason, "requesting upscale");
                    self.wanted.send_modify(|n| *n += 1);
                    if let Some(m) = &self.metrics {
                        m.upscale_requested(trigger_at);
                    }
                    // Let the woken session send the frame before this step goes on.
                    tokio::task::yield_now().await;
                }
                Action::SetFileCache { bytes } => {
                    let result = self.apply_file_cache(bytes).await;
                    queue.extend(self.step(Input::Applied {
                        at: now(),
                        effect: Effect::FileCache { bytes },
                        result,
                    }));
                }
                Action::SetMemoryHigh { value } => {
                    let result = match (&self.high_writer, &self.cgroup) {
                        (Some(w), _) => w.write(value).await.map_err(|e| format!("{e:#}")),
                        (None, Some(cg)) => cg.set_high(value).map_err(|e| format!("{e:#}")),
                        (None, None) => Err("no cgroup is managed".to_string()),
                    };
                    match &result {
                        Ok(()) => debug!(%value, "memory.high written"),
                        // Stepping retries every few ms under pressure; keep the log readable.
                        Err(e) => warn_limited!(%value, error = %e, "writing memory.high failed"),
                    }
                    queue.extend(self.step(Input::Applied {
                        at: now(),
                        effect: Effect::MemoryHigh { value },
                        result,
                    }));
                }
                Action::Reply(outcome) => self.reply(outcome),
                Action::ScheduleTick { at } => {
                    self.tick_at = Some(u64::try_from(at.as_nanos()).unwrap_or(u64::MAX));
                }
                Action::Decision(d) => {
                    // Steps repeat every 25 ms while an upscale is pending: /debug/decisions and
                    // the metrics keep them; the log at info keeps only the decisions that matter.
                    // (Field values are only evaluated, i.e. serialised, when the level is on.)
                    if matches!(
                        d.kind,
                        DecisionKind::MemoryHighRaised | DecisionKind::Ignored
                    ) {
                        debug!(decision = %serde_json::to_string(&d).unwrap_or_default(), "decision");
                    } else {
                        info!(decision = %serde_json::to_string(&d).unwrap_or_default(), "decision");
                    }
                    if let Some(sink) = &self.decisions {
                        let _ = sink.send(d);
                    }
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.policy_state(&self.policy);
        }
    }

    /// The growth totals right now, to count the next hint from if the reading that follows
    /// succeeds. `None` without a hint (or when the map cannot be read: then the next arm
    /// counts from the last good snapshot, which only makes the hint earlier).
    fn growth_snapshot(&self) -> Option<GrowthSnapshot> {
        let hint = self.growth_hint.as_ref()?;
        match hint.snapshot() {
            Ok(s) => Some(s),
            Err(err) => {
                warn_limited!(error = %format!("{err:#}"), "reading the growth totals failed");
                None
            }
        }
    }

    /// A reading succeeded: the snapshot taken before it is the next arm's base.
    fn reading_taken(&mut self, base: Option<GrowthSnapshot>) {
        self.read_now = false;
        if let Some(base) = base {
            self.growth_base = base;
        }
    }

    /// Keeps the kernel's growth hint and the over-threshold re-check where the policy wants
    /// them after its latest reading.
    fn follow_readings(&mut self) {
        self.recheck_at = if self.read_now {
            Some(0)
        } else {
            self.policy
                .recheck_at()
                .map(|at| u64::try_from(at.as_nanos()).unwrap_or(u64::MAX))
        };
        let Some(hint) = self.growth_hint.as_mut() else {
            return;
        };
        let wanted = self.policy.growth_hint();
        if wanted == self.armed {
            return;
        }
        self.armed = wanted;
        if let Some((_, budget)) = wanted {
            match hint.arm(&self.growth_base, budget) {
                Ok(reached) => {
                    debug!(budget_mib = budget >> 20, reached, "growth hint armed");
                    if reached {
                        // Grown past the budget while reading and deciding: the programs
                        // would only tell on the next growth, so read again now.
                        self.read_now = true;
                        self.recheck_at = Some(0);
                    }
                }
                Err(err) => {
                    warn_limited!(error = %format!("{err:#}"), "arming the growth hint failed")
                }
            }
        }
    }

    async fn apply_file_cache(&mut self, bytes: u64) -> Result<(), String> {
        let Some(fc) = self.file_cache.as_mut() else {
            return Err("no file cache is managed".to_string());
        };
        match fc.set_size(bytes).await {
            Ok(outcome) => {
                info!(
                    requested_mib = outcome.requested_bytes >> 20,
                    applied_mib = outcome.applied_bytes >> 20,
                    capped = outcome.capped,
                    "file cache resized"
                );
                Ok(())
            }
            Err(err) => {
                // Try again later; a reconnect re-announces Postgres and the policy re-asserts.
                if self.fc_retry_at.is_none() {
                    let wait = fc.next_attempt_in().unwrap_or(Duration::from_secs(1));
                    self.fc_retry_at = Some(boottime_ns() + wait.as_nanos() as u64);
                }
                // The details (host, port, database, user, server messages) stay in the log:
                // the result goes into replies and the decision log, which network peers read.
                warn_limited!(error = %format!("{err:#}"), bytes, "setting the file cache size failed");
                Err(FILE_CACHE_FAILED.to_string())
            }
        }
    }
}

/// What peers learn of a failed file-cache resize (the cause is in the daemon's log).
const FILE_CACHE_FAILED: &str =
    "setting the Postgres file cache size failed (see the vm-monitor log)";

/// How long a pressure burst's reading serves later bursts of reclaim records (the poll tier's
/// sampling period).
const READING_REUSE: Duration = Duration::from_millis(100);

/// Waits for at least one event and takes what else is already queued (up to [`MAX_BURST`]).
/// Returns 0 when the source is gone; never resolves without a source.
async fn recv_burst(
    rx: &mut Option<mpsc::Receiver<PressureEvent>>,
    burst: &mut Vec<PressureEvent>,
) -> usize {
    let Some(rx) = rx.as_mut() else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Some(ev) => burst.push(ev),
        None => return 0,
    }
    while burst.len() < MAX_BURST {
        match rx.try_recv() {
            Ok(ev) => burst.push(ev),
            Err(_) => break,
        }
    }
    burst.len()
}

/// Reads MemTotal from /proc/meminfo.
pub fn mem_total() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    crate::memstat::parse_meminfo_total(&text).context("parsing /proc/meminfo")
}
