//! The pure decision core: a deterministic state machine from typed [`Input`]s to [`Action`]s.
//!
//! No I/O and no clock: time arrives inside every input, so a recorded input sequence
//! replays to the same actions. The engine's contract:
//! - feed an [`Input::Reading`] and then [`Input::Start`] first (the reading keeps the first
//!   memory.high above current usage), then [`Input::FileCacheConnected`] whenever Postgres
//!   (re)connects;
//! - feed pressure events with a `memory.stat` reading taken on demand, and a fresh
//!   [`Input::Reading`] right before each [`Input::DownscaleRequest`];
//! - perform the actions in order; every [`Action::SetFileCache`] / [`Action::SetMemoryHigh`]
//!   must be answered by exactly one [`Input::Applied`] (the policy emits at most one effect at a
//!   time and waits for it);
//! - every agent request gets exactly one [`Action::Reply`], possibly after several effects;
//! - honour [`Action::ScheduleTick`] (the latest one wins).
//!
//! VM state (threshold, readings, memory.high, file cache) lives as long as the [`Policy`];
//! agent reconnects do not reset it (the reference's per-connection reset caused
//! denial/reconnect loops, neon#5606).

pub mod config;
pub mod sizing;
pub mod types;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Duration;

pub use config::{Config, ConfigError, FileCacheConfig, MAX_MEM};
pub use sizing::{MIB, file_cache_size, mib, threshold, usable};
pub use types::{
    Action, Decision, DecisionKind, Effect, Input, PressureSignal, UpscaleReason, UpscaleTrigger,
};

use crate::backend::{NOT_MANAGING_STATUS, ScalingOutcome};
use crate::memstat::MemoryHigh;
use types::show_high;

/// Denial status when no reading has been seen yet (reference wording, neon#5606).
pub const NO_READINGS_STATUS: &str = "haven't received enough cgroup memory stats yet";
/// Denial status when the latest reading is older than `reading_max_age`.
pub const STALE_READINGS_STATUS: &str =
    "haven't gotten cgroup memory stats recently enough to determine downscaling information";
/// Error text for requests that arrive while shutting down.
pub const SHUTTING_DOWN: &str = "vm-monitor is shutting down";

/// Readings kept for the peak window; beyond this the two oldest are merged upward, which can
/// only overstate the peak (deny more), never forget it.
const PEAK_CAPACITY: usize = 256;

/// An agent request waiting for the current operation to finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Upscale { granted: u64 },
    Downscale { target: u64 },
}

impl Request {
    fn describe(self) -> String {
        match self {
            Request::Upscale { granted } => {
                format!("upscale notification granted={} MiB", mib(granted))
            }
            Request::Downscale { target } => {
                format!("downscale request target={} MiB", mib(target))
            }
        }
    }
}

/// One step of an operation. memory.high values are computed when the step is emitted, so
/// a reading that arrived meanwhile is respected (never set below current usage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Apply exactly this effect.
    Set(Effect),
    /// memory.high for `want` bounded by readings and `usable`; skipped when already there.
    HighFor { want: u64, usable: u64 },
    /// Roll memory.high back to `prev` (bounded like [`Step::HighFor`]); skipped when there.
    RestoreHigh { prev: MemoryHigh },
}

/// Sizes an operation commits when it succeeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    alloc: u64,
    usable: u64,
    threshold: u64,
}

/// What an in-flight operation is for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum OpKind {
    Startup,
    Resync,
    RaiseHigh,
    Upscale {
        request: String,
        plan: Plan,
    },
    Downscale {
        request: String,
        plan: Plan,
        status: String,
        high_before: Option<MemoryHigh>,
    },
    Shutdown,
}

impl OpKind {
    /// Scaling operations are all-or-nothing; the others are best effort.
    fn rolls_back(&self) -> bool {
        matches!(self, OpKind::Upscale { .. } | OpKind::Downscale { .. })
    }
}

/// A sequence of effects applied one at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Op {
    kind: OpKind,
    steps: VecDeque<Step>,
    in_flight: Option<Effect>,
    /// Applied effects with the value they replaced, for rollback.
    done: Vec<(Effect, Option<Effect>)>,
    errors: Vec<String>,
    undoing: bool,
    /// Shutdown arrived: finish the in-flight effect, then stop without rollback.
    aborted: bool,
}

impl Op {
    fn new(kind: OpKind, steps: impl IntoIterator<Item = Step>) -> Self {
        Op {
            kind,
            steps: steps.into_iter().collect(),
            in_flight: None,
            done: Vec::new(),
            errors: Vec::new(),
            undoing: false,
            aborted: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShutdownState {
    Running,
    Requested,
    InProgress,
    Done,
}

/// The decision core. See the module docs for the engine's contract.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    cfg: Config,
    started: bool,
    /// The agent's last applied allocation (None: still sized from MemTotal).
    alloc: Option<u64>,
    /// Memory sized against: MemTotal at startup, allocation − sys_buffer afterwards.
    usable: u64,
    threshold: u64,
    /// `neon.max_file_cache_size`, once Postgres told us.
    fc_max: Option<u64>,
    /// Last file-cache size known to be applied (None: unknown).
    fc_applied: Option<u64>,
    /// Last memory.high known to be written (None: unknown / never written).
    memory_high: Option<MemoryHigh>,
    /// Latest non-reclaimable reading `(at, bytes)`.
    latest: Option<(Duration, u64)>,
    latest_current: Option<u64>,
    /// Sliding-max deque over `peak_window`: times increasing, values strictly decreasing.
    peaks: VecDeque<(Duration, u64)>,
    last_upscale_sent: Option<Duration>,
    suppressed: u64,
    /// An upscale is pending until this time (refreshed by every wanted upscale).
    pending_until: Option<Duration>,
    last_trigger: Option<UpscaleTrigger>,
    /// Last time the cgroup itself was under pressure (a cgroup-local signal, or usage at or
    /// over the threshold); drives memory.high stepping. Guest-wide signals do not count:
    /// raising the cgroup's limit does nothing for them.
    pressure_seen_at: Option<Duration>,
    last_raise_at: Option<Duration>,
    tick_at: Option<Duration>,
    /// When the last due tick was consumed; a step is never rescheduled before it.
    last_tick: Option<Duration>,
    /// `memory.events` counters last seen: (high, max, oom_kill).
    events_seen: Option<(u64, u64, u64)>,
    /// Whether an agent session holds the seat; `None` until the engine first says (and in
    /// replays of recordings made before it did: then requests go out as they always did).
    agent_connected: Option<bool>,
    op: Option<Op>,
    /// Operations started so far (lets tests tell a new operation from a continuing one).
    op_seq: u64,
    queue: VecDeque<Request>,
    resync_wanted: bool,
    shutdown: ShutdownState,
}

impl Policy {
    /// A policy with validated `cfg`, waiting for [`Input::Start`].
    pub fn new(cfg: Config) -> Result<Policy, ConfigError> {
        cfg.validate()?;
        Ok(Policy {
            cfg,
            started: false,
            alloc: None,
            usable: 0,
            threshold: 0,
            fc_max: None,
            fc_applied: None,
            memory_high: None,
            latest: None,
            latest_current: None,
            peaks: VecDeque::new(),
            last_upscale_sent: None,
            suppressed: 0,
            pending_until: None,
            last_trigger: None,
            pressure_seen_at: None,
            last_raise_at: None,
            tick_at: None,
            last_tick: None,
            events_seen: None,
            agent_connected: None,
            op: None,
            op_seq: 0,
            queue: VecDeque::new(),
            resync_wanted: false,
            shutdown: ShutdownState::Running,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Current upscale threshold in bytes (0 before start).
    pub fn threshold(&self) -> u64 {
        self.threshold
    }

    /// Memory currently sized against, bytes (MemTotal until the first scaling event).
    pub fn usable(&self) -> u64 {
        self.usable
    }

    /// The agent's last applied allocation, if any.
    pub fn allocation(&self) -> Option<u64> {
        self.alloc
    }

    /// Last `memory.high` known to be written.
    pub fn memory_high(&self) -> Option<MemoryHigh> {
        self.memory_high
    }

    /// Last file-cache size known to be applied.
    pub fn file_cache(&self) -> Option<u64> {
        self.fc_applied
    }

    /// Whether an upscale is pending at `at` (requested, not yet notified, not expired).
    pub fn upscale_pending(&self, at: Duration) -> bool {
        self.pending_until.is_some_and(|until| at < until)
    }

    /// Wanted upscale requests folded by the rate limit since the last one sent.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Whether an effect is outstanding (the policy waits for [`Input::Applied`]).
    pub fn busy(&self) -> bool {
        self.op.is_some()
    }

    /// Whether an agent session is connected (as far as the engine said).
    pub fn agent_connected(&self) -> bool {
        self.agent_connected == Some(true)
    }

    /// Whether shutdown finished (memory.high restored); the engine may exit.
    pub fn is_shut_down(&self) -> bool {
        self.shutdown == ShutdownState::Done
    }

    /// The growth hint to arm after the latest reading: `(reading time, budget)`. The kernel
    /// asks for a fresh reading once the cgroup's mapped non-reclaimable memory has grown by
    /// `budget`. Below the threshold it is 7/8 of the headroom (the rest covers growth between
    /// the reading and the arming), at least [`Config::growth_hint_floor`], so readings come
    /// closer together only as usage nears the threshold and the crossing is never passed
    /// unseen; at or over it, [`Config::growth_hint_over`].
    pub fn growth_hint(&self) -> Option<(Duration, u64)> {
        if !self.started || !self.cfg.manage_cgroup || self.shutdown != ShutdownState::Running {
            return None;
        }
        let (at, reading) = self.latest?;
        if reading >= self.threshold {
            return Some((at, self.cfg.growth_hint_over));
        }
        let headroom = self.threshold - reading;
        Some((
            at,
            (headroom - headroom / 8).max(self.cfg.growth_hint_floor),
        ))
    }

    /// When the next reading is due because the latest one is at or over the threshold: the
    /// moment the rate limit allows the next UpscaleRequest. On the event-driven tiers nothing
    /// else would look again while usage just stays high, and the agent forgets a request
    /// after 10 s, granted or not.
    pub fn recheck_at(&self) -> Option<Duration> {
        if !self.started || !self.cfg.manage_cgroup || self.shutdown != ShutdownState::Running {
            return None;
        }
        let (at, reading) = self.latest?;
        if reading < self.threshold {
            return None;
        }
        let next = self.last_upscale_sent.map_or(at, |sent| {
            sent.saturating_add(self.cfg.upscale_min_interval)
        });
        Some(next.max(at.saturating_add(Duration::from_millis(1))))
    }

    /// Peak reading over the window ending at `at`.
    pub fn peak(&self, at: Duration) -> Option<u64> {
        let cutoff = at.saturating_sub(self.cfg.peak_window);
        // Values decrease towards the back, so the first entry inside the window is the max.
        self.peaks
            .iter()
            .find(|(t, _)| *t >= cutoff)
            .map(|(_, v)| *v)
    }

    /// Feeds one input and returns the actions to perform, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        let at = input.at();
        match &input {
            Input::Start { at, mem_total } => self.on_start(*at, *mem_total, &input, &mut out),
            Input::FileCacheConnected { max_size, .. } => {
                self.fc_max = Some(*max_size);
                if self.started && self.cfg.manage_file_cache {
                    self.resync_wanted = true;
                }
            }
            Input::Pressure {
                at,
                signal,
                reading,
            } => self.on_pressure(*at, signal, *reading, &mut out),
            Input::Reading {
                at,
                non_reclaimable,
                current,
            } => {
                self.latest_current = Some(*current);
                self.observe_reading(*at, *non_reclaimable);
                let over = self.over_threshold("reading", Some(*non_reclaimable));
                self.evaluate(*at, over, false, &mut out);
            }
            Input::UpscaleNotification { at, granted_mem } => self.on_request(
                *at,
                Request::Upscale {
                    granted: *granted_mem,
                },
                &mut out,
            ),
            Input::DownscaleRequest { at, target_mem } => self.on_request(
                *at,
                Request::Downscale {
                    target: *target_mem,
                },
                &mut out,
            ),
            Input::Applied {
                at, effect, result, ..
            } => self.on_applied(*at, *effect, result, &input, &mut out),
            Input::Tick { at } => {
                if self.tick_at.is_some_and(|due| *at >= due) {
                    self.tick_at = None;
                    self.last_tick = Some(*at);
                    self.maybe_raise(*at, &mut out);
                }
            }
            Input::AgentConnected { at } => {
                self.agent_connected = Some(true);
                // The agent forgets earlier requests on reconnect; repeat one if pressure is
                // still current (the rate limit still applies).
                if self.pressure_recent(*at)
                    && self.upscale_pending(*at)
                    && let Some(trigger) = self.last_trigger.clone()
                {
                    self.want_upscale(*at, trigger, &mut out);
                }
            }
            Input::AgentDisconnected { .. } => self.agent_connected = Some(false),
            Input::Shutdown { at } => self.on_shutdown(*at, &input, &mut out),
        }
        self.after(at, &mut out);
        out
    }

    // ---- inputs -------------------------------------------------------------------------

    fn on_start(&mut self, at: Duration, mem_total: u64, input: &Input, out: &mut Vec<Action>) {
        if self.started || self.shutdown != ShutdownState::Running {
            out.push(self.decision(
                at,
                DecisionKind::Ignored,
                input.describe(),
                "already started",
            ));
            return;
        }
        if mem_total == 0 || mem_total > self.cfg.max_mem {
            out.push(self.decision(
                at,
                DecisionKind::Refused,
                input.describe(),
                format!("implausible MemTotal of {mem_total} bytes"),
            ));
            return;
        }
        self.started = true;
        // Reference-compatible: startup sizes from MemTotal without subtracting sys_buffer.
        self.usable = mem_total;
        self.threshold = threshold(mem_total, self.cfg.upscale_threshold_fraction);
        let mut steps = Vec::new();
        if self.cfg.writes_memory_high() {
            // First thing, before Postgres is touched: a memory.high left by a previous run
            // could throttle the file-cache connection into a timeout (neon#5348).
            steps.push(Step::Set(Effect::MemoryHigh {
                value: MemoryHigh::Max,
            }));
        }
        if self.cfg.manage_file_cache && self.fc_max.is_some() {
            // Set even if unchanged, to prove permissions early.
            steps.push(Step::Set(Effect::FileCache {
                bytes: self.fc_target(self.usable),
            }));
        }
        if self.cfg.guards_memory_high() {
            steps.push(Step::HighFor {
                want: self.threshold,
                usable: self.usable,
            });
        }
        self.resync_wanted = false;
        self.start_op(at, Op::new(OpKind::Startup, steps), out);
        // Usage already over the threshold at startup asks for an upscale right away.
        let over = self.over_threshold("reading", self.latest.map(|(_, r)| r));
        self.evaluate(at, over, false, out);
    }

    fn on_pressure(
        &mut self,
        at: Duration,
        signal: &PressureSignal,
        reading: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        if let Some(r) = reading {
            self.observe_reading(at, r);
        }
        let mut local = false;
        let mut urgent = None;
        match signal {
            PressureSignal::MemcgReclaim { .. }
            | PressureSignal::MemcgEvent { .. }
            | PressureSignal::PsiTrigger => local = true,
            PressureSignal::DirectReclaim { stall } if *stall >= self.cfg.direct_reclaim_stall => {
                urgent = Some(UpscaleTrigger::DirectReclaimStall { stall: *stall });
            }
            PressureSignal::OomKill => {
                urgent = Some(UpscaleTrigger::OomKill {
                    source: "oom_victim",
                });
            }
            PressureSignal::MemoryEvents {
                high,
                max,
                oom_kill,
                ..
            } => {
                // The first observation is only a baseline: counters are cumulative since the
                // cgroup was created.
                if let Some((h0, m0, k0)) = self.events_seen {
                    local = *high > h0 || *max > m0;
                    if *oom_kill > k0 {
                        urgent = Some(UpscaleTrigger::OomKill {
                            source: "memory.events",
                        });
                    }
                }
                self.events_seen = Some((*high, *max, *oom_kill));
            }
            PressureSignal::DirectReclaim { .. }
            | PressureSignal::KswapdWake
            | PressureSignal::PolledSample
            | PressureSignal::GrowthHint => {}
        }
        // Usage is the primary trigger; a guest-wide signal only counts when usage does not.
        let trigger = self.over_threshold(signal.name(), reading).or(urgent);
        self.evaluate(at, trigger, local, out);
    }

    fn on_request(&mut self, at: Duration, request: Request, out: &mut Vec<Action>) {
        let answer = |this: &Self, out: &mut Vec<Action>, kind, detail: String, reply| {
            out.push(Action::Reply(reply));
            out.push(this.decision(at, kind, request.describe(), detail));
        };
        if self.shutdown != ShutdownState::Running {
            let err = ScalingOutcome::InternalError(SHUTTING_DOWN.to_string());
            answer(
                self,
                out,
                DecisionKind::Refused,
                SHUTTING_DOWN.to_string(),
                err,
            );
            return;
        }
        if !self.cfg.manage_cgroup && !self.cfg.manage_file_cache {
            let reply = match request {
                Request::Upscale { .. } => ScalingOutcome::UpscaleConfirmed,
                Request::Downscale { .. } => ScalingOutcome::Downscale {
                    ok: true,
                    status: NOT_MANAGING_STATUS.to_string(),
                },
            };
            let kind = match request {
                Request::Upscale { .. } => DecisionKind::UpscaleApplied,
                Request::Downscale { .. } => DecisionKind::DownscaleApproved,
            };
            answer(self, out, kind, NOT_MANAGING_STATUS.to_string(), reply);
            return;
        }
        // Validation first: an invalid request must not change any state.
        let (mem, what) = match request {
            Request::Upscale { granted } => (granted, "granted"),
            Request::Downscale { target } => (target, "target"),
        };
        if mem <= self.cfg.sys_buffer || mem > self.cfg.max_mem {
            let msg = format!(
                "invalid {what} memory of {mem} bytes: must be above the {} MiB system buffer and at most {} MiB",
                mib(self.cfg.sys_buffer),
                mib(self.cfg.max_mem)
            );
            let err = ScalingOutcome::InternalError(msg.clone());
            answer(self, out, DecisionKind::Refused, msg, err);
            return;
        }
        if !self.started {
            let msg = "vm-monitor is still starting".to_string();
            let err = ScalingOutcome::InternalError(msg.clone());
            answer(self, out, DecisionKind::Refused, msg, err);
            return;
        }
        if self.op.is_some() || !self.queue.is_empty() {
            self.queue.push_back(request);
            return;
        }
        self.process_request(at, request, out);
    }

    fn process_request(&mut self, at: Duration, request: Request, out: &mut Vec<Action>) {
        match request {
            Request::Upscale { granted } => {
                let plan = self.plan(granted);
                let steps = self.steps_for(&plan);
                let kind = OpKind::Upscale {
                    request: request.describe(),
                    plan,
                };
                self.start_op(at, Op::new(kind, steps), out);
            }
            Request::Downscale { target } => self.downscale(at, target, request, out),
        }
    }

    fn downscale(&mut self, at: Duration, target: u64, request: Request, out: &mut Vec<Action>) {
        let plan = self.plan(target);
        let deny = |this: &Self, out: &mut Vec<Action>, status: String| {
            out.push(Action::Reply(ScalingOutcome::Downscale {
                ok: false,
                status: status.clone(),
            }));
            out.push(this.decision(
                at,
                DecisionKind::DownscaleDenied,
                request.describe(),
                status,
            ));
        };
        if self.cfg.manage_cgroup {
            let Some((read_at, latest)) = self.latest else {
                deny(self, out, NO_READINGS_STATUS.to_string());
                return;
            };
            if at.saturating_sub(read_at) > self.cfg.reading_max_age {
                deny(self, out, STALE_READINGS_STATUS.to_string());
                return;
            }
            let usage = latest.max(self.peak(at).unwrap_or(0));
            if plan.threshold < usage.saturating_add(self.cfg.downscale_buffer) {
                let status = format!(
                    "calculated memory threshold too low: {} MiB (new threshold) < {} (current usage) + {} (downscale buffer)",
                    mib(plan.threshold),
                    mib(usage),
                    mib(self.cfg.downscale_buffer)
                );
                deny(self, out, status);
                return;
            }
        }
        let steps = self.steps_for(&plan);
        let mut parts = Vec::new();
        if self.cfg.manage_file_cache {
            parts.push(format!(
                "set file cache size to {} MiB",
                mib(self.fc_target(plan.usable))
            ));
        }
        if self.cfg.manage_cgroup {
            parts.push(format!(
                "set cgroup memory threshold from {} MiB to {} MiB, of new total {} MiB",
                mib(self.threshold),
                mib(plan.threshold),
                mib(plan.usable)
            ));
        }
        let kind = OpKind::Downscale {
            request: request.describe(),
            plan,
            status: parts.join("; "),
            high_before: self.memory_high,
        };
        self.start_op(at, Op::new(kind, steps), out);
    }

    fn on_applied(
        &mut self,
        at: Duration,
        effect: Effect,
        result: &Result<(), String>,
        input: &Input,
        out: &mut Vec<Action>,
    ) {
        let matches = self
            .op
            .as_ref()
            .is_some_and(|op| op.in_flight == Some(effect));
        if !matches {
            out.push(self.decision(
                at,
                DecisionKind::Ignored,
                input.describe(),
                "no such effect outstanding",
            ));
            return;
        }
        let previous = self.known(effect);
        match result {
            Ok(()) => self.record_applied(effect),
            // A failed SQL sequence may have half-applied (ALTER SYSTEM without reload), so the
            // size is unknown; a failed write(2) to memory.high leaves the old value.
            Err(_) => {
                if let Effect::FileCache { .. } = effect {
                    self.fc_applied = None;
                }
            }
        }
        let Some(op) = self.op.as_mut() else {
            return;
        };
        op.in_flight = None;
        match result {
            Ok(()) => {
                if !op.undoing {
                    op.done.push((effect, previous));
                }
            }
            Err(e) => {
                if op.undoing {
                    op.errors.push(format!("restoring {effect} failed: {e}"));
                } else {
                    op.errors.push(format!("{effect}: {e}"));
                    if op.kind.rolls_back() && !op.aborted {
                        // Undo newest first; the failed effect may have half-applied, so it is
                        // restored too when its old value is known.
                        let mut undo: VecDeque<Step> = VecDeque::new();
                        let previous_values: Vec<Option<Effect>> = std::iter::once(previous)
                            .chain(op.done.iter().rev().map(|(_, prev)| *prev))
                            .collect();
                        for prev in previous_values {
                            match prev {
                                Some(Effect::MemoryHigh { value }) => {
                                    undo.push_back(Step::RestoreHigh { prev: value })
                                }
                                Some(p) => undo.push_back(Step::Set(p)),
                                None => op
                                    .errors
                                    .push("previous value unknown, not restored".to_string()),
                            }
                        }
                        op.steps = undo;
                        op.undoing = true;
                    }
                }
            }
        }
        if op.aborted {
            op.steps.clear();
        }
        self.advance(at, out);
    }

    fn on_shutdown(&mut self, at: Duration, input: &Input, out: &mut Vec<Action>) {
        if self.shutdown != ShutdownState::Running {
            out.push(self.decision(
                at,
                DecisionKind::Ignored,
                input.describe(),
                "already shutting down",
            ));
            return;
        }
        self.shutdown = ShutdownState::Requested;
        self.tick_at = None;
        while let Some(request) = self.queue.pop_front() {
            out.push(Action::Reply(ScalingOutcome::InternalError(
                SHUTTING_DOWN.to_string(),
            )));
            out.push(self.decision(at, DecisionKind::Refused, request.describe(), SHUTTING_DOWN));
        }
        if let Some(op) = self.op.as_mut() {
            op.aborted = true;
            op.steps.clear();
        }
        // With no operation in flight, `after` starts the shutdown operation right away.
    }

    // ---- upscale triggering and memory.high stepping ------------------------------------

    fn over_threshold(&self, signal: &'static str, reading: Option<u64>) -> Option<UpscaleTrigger> {
        let reading = reading?;
        (self.started && self.cfg.manage_cgroup && reading >= self.threshold).then_some(
            UpscaleTrigger::Usage {
                signal,
                reading,
                threshold: self.threshold,
            },
        )
    }

    /// Common tail of pressure and readings: note pressure, ask for an upscale, step
    /// memory.high.
    fn evaluate(
        &mut self,
        at: Duration,
        trigger: Option<UpscaleTrigger>,
        local: bool,
        out: &mut Vec<Action>,
    ) {
        if self.shutdown != ShutdownState::Running || !self.started {
            return;
        }
        let pressured = local || matches!(trigger, Some(UpscaleTrigger::Usage { .. }));
        if pressured {
            self.pressure_seen_at = Some(self.pressure_seen_at.map_or(at, |t| t.max(at)));
        }
        if let Some(trigger) = trigger {
            self.want_upscale(at, trigger, out);
        }
        if pressured {
            self.maybe_raise(at, out);
        }
    }

    fn want_upscale(&mut self, at: Duration, trigger: UpscaleTrigger, out: &mut Vec<Action>) {
        let until = at.saturating_add(self.cfg.upscale_pending_for);
        self.pending_until = Some(self.pending_until.map_or(until, |u| u.max(until)));
        self.last_trigger = Some(trigger.clone());
        if self.agent_connected == Some(false) {
            // Nobody to send it to; the connect repeats it if it is still due, and the rate
            // limit counts from requests that reached an agent.
            self.suppressed += 1;
            return;
        }
        let allowed = self
            .last_upscale_sent
            .is_none_or(|sent| at >= sent && at - sent >= self.cfg.upscale_min_interval);
        if !allowed {
            self.suppressed += 1;
            return;
        }
        self.last_upscale_sent = Some(at);
        let reason = UpscaleReason {
            trigger,
            suppressed: std::mem::take(&mut self.suppressed),
        };
        let input = reason.trigger.to_string();
        let detail = format!(
            "sent UpscaleRequest; {} suppressed by the rate limit since the previous one",
            reason.suppressed
        );
        out.push(Action::SendUpscaleRequest { reason });
        out.push(self.decision(at, DecisionKind::UpscaleRequested, input, detail));
    }

    fn pressure_recent(&self, at: Duration) -> bool {
        self.pressure_seen_at
            .is_some_and(|seen| at <= seen.saturating_add(self.cfg.pressure_hold))
    }

    /// The next memory.high step, if stepping applies at all (time spacing aside).
    fn next_step(&self, at: Duration) -> Option<MemoryHigh> {
        if !self.cfg.guards_memory_high()
            || !self.started
            || self.shutdown != ShutdownState::Running
            || !self.upscale_pending(at)
            || !self.pressure_recent(at)
        {
            return None;
        }
        let current = match self.memory_high {
            Some(MemoryHigh::Max) => return None,
            Some(MemoryHigh::Bytes(b)) => b,
            None => self.threshold,
        };
        let next = self.bounded_high(
            current.saturating_add(self.cfg.memory_high_step),
            self.usable,
        );
        (Some(next) != self.memory_high).then_some(next)
    }

    fn step_due(&self) -> Option<Duration> {
        self.last_raise_at
            .map(|t| t.saturating_add(self.cfg.memory_high_step_every))
    }

    fn maybe_raise(&mut self, at: Duration, out: &mut Vec<Action>) {
        if self.op.is_some() || self.step_due().is_some_and(|due| at < due) {
            return;
        }
        let Some(value) = self.next_step(at) else {
            return;
        };
        self.last_raise_at = Some(at);
        self.start_op(
            at,
            Op::new(OpKind::RaiseHigh, [Step::Set(Effect::MemoryHigh { value })]),
            out,
        );
    }

    // ---- operations ---------------------------------------------------------------------

    fn start_op(&mut self, at: Duration, op: Op, out: &mut Vec<Action>) {
        self.op_seq += 1;
        self.op = Some(op);
        self.advance(at, out);
    }

    /// Emits the next effect of the current operation, or finishes it.
    fn advance(&mut self, at: Duration, out: &mut Vec<Action>) {
        loop {
            let Some(op) = self.op.as_ref() else {
                return;
            };
            if op.in_flight.is_some() {
                return;
            }
            let Some(step) = op.steps.front().copied() else {
                break;
            };
            let effect = match step {
                Step::Set(effect) => Some(effect),
                Step::HighFor { want, usable } => {
                    let value = self.bounded_high(want, usable);
                    (self.memory_high != Some(value)).then_some(Effect::MemoryHigh { value })
                }
                Step::RestoreHigh { prev } => {
                    let value = match prev {
                        MemoryHigh::Max => MemoryHigh::Max,
                        MemoryHigh::Bytes(b) => self.bounded_high(b, self.usable),
                    };
                    (self.memory_high != Some(value)).then_some(Effect::MemoryHigh { value })
                }
            };
            let Some(op) = self.op.as_mut() else {
                return;
            };
            op.steps.pop_front();
            if let Some(effect) = effect {
                op.in_flight = Some(effect);
                out.push(effect.action());
                return;
            }
        }
        if let Some(op) = self.op.take() {
            self.finish(at, op, out);
        }
    }

    fn finish(&mut self, at: Duration, op: Op, out: &mut Vec<Action>) {
        let failed = !op.errors.is_empty();
        let errors = op.errors.join("; ");
        match op.kind {
            OpKind::Upscale { request, .. } | OpKind::Downscale { request, .. } if op.aborted => {
                // Abandoned for shutdown; nothing is committed.
                out.push(Action::Reply(ScalingOutcome::InternalError(
                    SHUTTING_DOWN.to_string(),
                )));
                out.push(self.decision(at, DecisionKind::ScalingFailed, request, SHUTTING_DOWN));
            }
            OpKind::Upscale { request, .. } if failed => {
                let msg = format!("failed to upscale: {errors}");
                out.push(Action::Reply(ScalingOutcome::InternalError(msg.clone())));
                out.push(self.decision(at, DecisionKind::ScalingFailed, request, msg));
            }
            OpKind::Downscale { request, .. } if failed => {
                let msg = format!("failed to downscale: {errors}");
                out.push(Action::Reply(ScalingOutcome::InternalError(msg.clone())));
                out.push(self.decision(at, DecisionKind::ScalingFailed, request, msg));
            }
            OpKind::Upscale { request, plan } => {
                let old = self.threshold;
                self.commit(plan);
                self.pending_until = None;
                self.last_raise_at = None;
                let detail = format!(
                    "set file cache size to {}; set cgroup memory threshold from {} MiB to {} MiB, of new total {} MiB; memory.high {}",
                    self.fc_applied
                        .map_or("unknown".to_string(), |b| format!("{} MiB", mib(b))),
                    mib(old),
                    mib(plan.threshold),
                    mib(plan.usable),
                    show_high(self.memory_high)
                );
                out.push(Action::Reply(ScalingOutcome::UpscaleConfirmed));
                out.push(self.decision(at, DecisionKind::UpscaleApplied, request, detail));
            }
            OpKind::Downscale {
                request,
                plan,
                mut status,
                high_before,
            } => {
                self.commit(plan);
                if self.memory_high != high_before {
                    status.push_str(&format!(
                        "; set cgroup memory.high from {} to {}",
                        show_high(high_before),
                        show_high(self.memory_high)
                    ));
                }
                out.push(Action::Reply(ScalingOutcome::Downscale {
                    ok: true,
                    status: status.clone(),
                }));
                out.push(self.decision(at, DecisionKind::DownscaleApproved, request, status));
            }
            OpKind::Startup => {
                let detail = if failed {
                    format!("startup sizing incomplete: {errors}")
                } else {
                    "startup sizing applied".to_string()
                };
                let kind = if failed {
                    DecisionKind::EffectFailed
                } else {
                    DecisionKind::Startup
                };
                out.push(self.decision(at, kind, "start".to_string(), detail));
            }
            OpKind::Resync => {
                let (kind, detail) = if failed {
                    (DecisionKind::EffectFailed, errors)
                } else {
                    (
                        DecisionKind::FileCacheResync,
                        "file cache re-asserted".to_string(),
                    )
                };
                out.push(self.decision(at, kind, "file cache connected".to_string(), detail));
            }
            OpKind::RaiseHigh => {
                let (kind, detail) = if failed {
                    (DecisionKind::EffectFailed, errors)
                } else {
                    (
                        DecisionKind::MemoryHighRaised,
                        format!("memory.high raised to {}", show_high(self.memory_high)),
                    )
                };
                out.push(self.decision(at, kind, "upscale pending".to_string(), detail));
            }
            OpKind::Shutdown => {
                self.shutdown = ShutdownState::Done;
                let detail = if failed {
                    format!("could not restore memory.high: {errors}")
                } else {
                    "memory.high restored".to_string()
                };
                out.push(self.decision(at, DecisionKind::Shutdown, "shutdown".to_string(), detail));
            }
        }
    }

    /// Starts whatever waits for an idle policy, and keeps the tick schedule current.
    fn after(&mut self, at: Duration, out: &mut Vec<Action>) {
        loop {
            if self.op.is_some() {
                break;
            }
            match self.shutdown {
                ShutdownState::Requested => {
                    self.shutdown = ShutdownState::InProgress;
                    let steps =
                        self.cfg
                            .writes_memory_high()
                            .then_some(Step::Set(Effect::MemoryHigh {
                                value: MemoryHigh::Max,
                            }));
                    self.start_op(at, Op::new(OpKind::Shutdown, steps), out);
                    continue;
                }
                ShutdownState::InProgress | ShutdownState::Done => break,
                ShutdownState::Running => {}
            }
            if let Some(request) = self.queue.pop_front() {
                self.process_request(at, request, out);
                continue;
            }
            if self.resync_wanted {
                self.resync_wanted = false;
                let target = self.fc_target(self.usable);
                if self.fc_applied != Some(target) {
                    self.start_op(
                        at,
                        Op::new(
                            OpKind::Resync,
                            [Step::Set(Effect::FileCache { bytes: target })],
                        ),
                        out,
                    );
                }
                continue;
            }
            break;
        }
        self.reschedule(out);
    }

    fn reschedule(&mut self, out: &mut Vec<Action>) {
        // Derived from state only (not from the input's time), so inputs that change nothing
        // leave the schedule alone; a due time already past just means "tick now".
        let want = match (self.op.is_none(), self.pressure_seen_at) {
            (true, Some(seen)) => {
                let due = self.step_due().unwrap_or(seen);
                // A tick that found nothing to do must not be rescheduled at the same time.
                let due = self.last_tick.map_or(due, |t| due.max(t));
                self.next_step(due).is_some().then_some(due)
            }
            _ => None,
        };
        if let Some(due) = want
            && want != self.tick_at
        {
            out.push(Action::ScheduleTick { at: due });
        }
        self.tick_at = want;
    }

    // ---- helpers ------------------------------------------------------------------------

    fn plan(&self, mem: u64) -> Plan {
        let usable = usable(mem, self.cfg.sys_buffer);
        Plan {
            alloc: mem,
            usable,
            threshold: threshold(usable, self.cfg.upscale_threshold_fraction),
        }
    }

    /// Effects to move from the current state to `plan`: file cache first (the step most
    /// likely to fail, so a failure usually needs no rollback), then memory.high.
    fn steps_for(&self, plan: &Plan) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.cfg.manage_file_cache {
            let bytes = self.fc_target(plan.usable);
            if self.fc_applied != Some(bytes) {
                steps.push(Step::Set(Effect::FileCache { bytes }));
            }
        }
        if self.cfg.guards_memory_high() {
            steps.push(Step::HighFor {
                want: plan.threshold,
                usable: plan.usable,
            });
        }
        steps
    }

    fn commit(&mut self, plan: Plan) {
        self.alloc = Some(plan.alloc);
        self.usable = plan.usable;
        self.threshold = plan.threshold;
    }

    fn fc_target(&self, usable: u64) -> u64 {
        file_cache_size(&self.cfg.file_cache, usable, self.fc_max)
    }

    /// memory.high for a wanted value: never below the latest reading (plus a step of
    /// headroom), never above usable. When non-reclaimable memory alone exceeds usable, a byte
    /// limit could only throttle memory the kernel cannot reclaim (neon#5444), so `max`.
    fn bounded_high(&self, want: u64, usable: u64) -> MemoryHigh {
        let reading = self.latest.map_or(0, |(_, r)| r);
        if reading > usable {
            return MemoryHigh::Max;
        }
        let floor = reading.saturating_add(self.cfg.memory_high_step);
        MemoryHigh::Bytes(want.max(floor).min(usable))
    }

    fn known(&self, effect: Effect) -> Option<Effect> {
        match effect {
            Effect::FileCache { .. } => self.fc_applied.map(|bytes| Effect::FileCache { bytes }),
            Effect::MemoryHigh { .. } => self.memory_high.map(|value| Effect::MemoryHigh { value }),
        }
    }

    fn record_applied(&mut self, effect: Effect) {
        match effect {
            Effect::FileCache { bytes } => self.fc_applied = Some(bytes),
            Effect::MemoryHigh { value } => self.memory_high = Some(value),
        }
    }

    fn observe_reading(&mut self, at: Duration, bytes: u64) {
        // Out-of-order timestamps are clamped so the deque stays time-ordered.
        let at = self.latest.map_or(at, |(t, _)| t.max(at));
        self.latest = Some((at, bytes));
        let cutoff = at.saturating_sub(self.cfg.peak_window);
        while self.peaks.front().is_some_and(|(t, _)| *t < cutoff) {
            self.peaks.pop_front();
        }
        while self.peaks.back().is_some_and(|(_, v)| *v <= bytes) {
            self.peaks.pop_back();
        }
        self.peaks.push_back((at, bytes));
        if self.peaks.len() > PEAK_CAPACITY {
            // Merge the two oldest into (newer time, larger value): keeps the peak alive longer.
            if let (Some((_, v0)), Some((t1, _))) = (self.peaks.pop_front(), self.peaks.pop_front())
            {
                self.peaks.push_front((t1, v0));
            }
        }
    }

    fn decision(
        &self,
        at: Duration,
        kind: DecisionKind,
        input: String,
        detail: impl Into<String>,
    ) -> Action {
        Action::Decision(Decision {
            at,
            kind,
            input,
            reading: self.latest.map(|(_, r)| r),
            current: self.latest_current,
            peak: self.peak(at),
            threshold: self.threshold,
            usable: self.usable,
            memory_high: self.memory_high,
            file_cache: self.fc_applied,
            suppressed: self.suppressed,
            detail: detail.into(),
        })
    }
}
