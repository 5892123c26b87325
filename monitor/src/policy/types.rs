//! What goes into the decision core and what comes out.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sizing::mib;
use crate::backend::ScalingOutcome;
use crate::memstat::MemoryHigh;
use crate::pressure::{PressureEvent, PressureKind, RecordKind, kind_names};

/// What kind of pressure the kernel reported (tier-independent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PressureSignal {
    /// memcg reclaim in the watched cgroup (memory.high/max hit); `stall` is 0 for a begin.
    MemcgReclaim { stall: Duration },
    /// A `memcg:count_memcg_events` record for the watched cgroup (`item` is kernel-internal).
    MemcgEvent { item: i32 },
    /// Guest-wide direct reclaim; `stall` is 0 for a begin.
    DirectReclaim { stall: Duration },
    /// kswapd woke up (guest-wide background reclaim).
    KswapdWake,
    /// The OOM killer picked a victim somewhere in the guest.
    OomKill,
    /// The PSI trigger on the cgroup's `memory.pressure` fired.
    PsiTrigger,
    /// `memory.events` changed; counters after the change.
    MemoryEvents {
        high: u64,
        max: u64,
        oom: u64,
        oom_kill: u64,
    },
    /// A poll-tier sample (its averaged reading travels in [`Input::Pressure::reading`]).
    PolledSample,
    /// The kernel saw the cgroup's mapped memory grow by the armed budget: not pressure, a
    /// cue to look (the engine's on-demand reading decides).
    GrowthHint,
}

impl PressureSignal {
    /// Converts a pressure-stream event; the reading is `Some` only for poll-tier samples
    /// (other tiers read `memory.stat` on demand and fill it in).
    pub fn from_event(event: &PressureEvent) -> (PressureSignal, Option<u64>) {
        let signal = match &event.kind {
            PressureKind::Kernel(kind) => match kind {
                RecordKind::MemcgReclaimBegin => PressureSignal::MemcgReclaim {
                    stall: Duration::ZERO,
                },
                RecordKind::MemcgReclaimEnd => PressureSignal::MemcgReclaim { stall: event.stall },
                RecordKind::DirectReclaimBegin => PressureSignal::DirectReclaim {
                    stall: Duration::ZERO,
                },
                RecordKind::DirectReclaimEnd => {
                    PressureSignal::DirectReclaim { stall: event.stall }
                }
                RecordKind::KswapdWake => PressureSignal::KswapdWake,
                RecordKind::OomVictim => PressureSignal::OomKill,
                RecordKind::MemcgEvents => PressureSignal::MemcgEvent { item: event.order },
                RecordKind::GrowthHint => PressureSignal::GrowthHint,
            },
            PressureKind::PsiTrigger => PressureSignal::PsiTrigger,
            PressureKind::MemoryEvents {
                high,
                max,
                oom,
                oom_kill,
            } => PressureSignal::MemoryEvents {
                high: *high,
                max: *max,
                oom: *oom,
                oom_kill: *oom_kill,
            },
            PressureKind::PolledSample {
                avg_non_reclaimable,
                ..
            } => return (PressureSignal::PolledSample, Some(*avg_non_reclaimable)),
        };
        (signal, None)
    }

    /// Short stable name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            PressureSignal::MemcgReclaim { .. } => "memcg_reclaim",
            PressureSignal::MemcgEvent { .. } => "memcg_event",
            PressureSignal::DirectReclaim { .. } => "direct_reclaim",
            PressureSignal::KswapdWake => "kswapd_wake",
            PressureSignal::OomKill => "oom_kill",
            PressureSignal::PsiTrigger => kind_names::PSI_TRIGGER,
            PressureSignal::MemoryEvents { .. } => kind_names::MEMORY_EVENTS,
            PressureSignal::PolledSample => kind_names::POLLED_SAMPLE,
            PressureSignal::GrowthHint => "growth_hint",
        }
    }
}

/// A side effect the I/O layer performs and then reports back with [`Input::Applied`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Set `neon.file_cache_size_limit` to `bytes` (a whole MiB, already capped by the max).
    FileCache { bytes: u64 },
    /// Write the cgroup's `memory.high`.
    MemoryHigh { value: MemoryHigh },
}

impl Effect {
    /// The action asking for this effect.
    pub fn action(self) -> Action {
        match self {
            Effect::FileCache { bytes } => Action::SetFileCache { bytes },
            Effect::MemoryHigh { value } => Action::SetMemoryHigh { value },
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Effect::FileCache { bytes } => write!(f, "file cache size {} MiB", mib(*bytes)),
            Effect::MemoryHigh { value } => write!(f, "memory.high {}", show_high(Some(*value))),
        }
    }
}

/// Formats a memory.high value for statuses: `<x> MiB`, `max`, or `unknown`.
pub(crate) fn show_high(value: Option<MemoryHigh>) -> String {
    match value {
        Some(MemoryHigh::Bytes(b)) => format!("{} MiB", mib(b)),
        Some(MemoryHigh::Max) => "max".to_string(),
        None => "unknown".to_string(),
    }
}

/// One input to the policy. Every input carries its time (`at`, e.g. CLOCK_BOOTTIME since
/// boot, the clock eBPF stamps events with), so a recorded sequence replays identically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// Daemon start: `mem_total` is MemTotal in bytes (the reference sizes startup from it).
    Start { at: Duration, mem_total: u64 },
    /// Postgres is reachable and its `neon.max_file_cache_size` is `max_size` bytes; fed on
    /// every (re)connect so the file cache is re-asserted.
    FileCacheConnected { at: Duration, max_size: u64 },
    /// A pressure event; `reading` is the non-reclaimable bytes read on demand for it.
    Pressure {
        at: Duration,
        signal: PressureSignal,
        reading: Option<u64>,
    },
    /// A reading taken for another reason (e.g. right before a downscale request).
    Reading {
        at: Duration,
        non_reclaimable: u64,
        current: u64,
    },
    /// The agent's `UpscaleNotification`: the VM now has `granted_mem` bytes.
    UpscaleNotification { at: Duration, granted_mem: u64 },
    /// The agent's `DownscaleRequest` for `target_mem` bytes.
    DownscaleRequest { at: Duration, target_mem: u64 },
    /// Outcome of the last [`Effect`] the policy asked for.
    Applied {
        at: Duration,
        effect: Effect,
        result: Result<(), String>,
    },
    /// A timer requested by [`Action::ScheduleTick`] expired.
    Tick { at: Duration },
    /// An agent session completed its handshake.
    AgentConnected { at: Duration },
    /// The agent session ended.
    AgentDisconnected { at: Duration },
    /// SIGTERM/SIGINT: restore `memory.high = max` and stop.
    Shutdown { at: Duration },
}

impl Input {
    /// When the input happened.
    pub fn at(&self) -> Duration {
        match self {
            Input::Start { at, .. }
            | Input::FileCacheConnected { at, .. }
            | Input::Pressure { at, .. }
            | Input::Reading { at, .. }
            | Input::UpscaleNotification { at, .. }
            | Input::DownscaleRequest { at, .. }
            | Input::Applied { at, .. }
            | Input::Tick { at }
            | Input::AgentConnected { at }
            | Input::AgentDisconnected { at }
            | Input::Shutdown { at } => *at,
        }
    }

    /// One-line description for the decision log.
    pub fn describe(&self) -> String {
        match self {
            Input::Start { mem_total, .. } => format!("start mem_total={} MiB", mib(*mem_total)),
            Input::FileCacheConnected { max_size, .. } => {
                format!("file cache connected max={} MiB", mib(*max_size))
            }
            Input::Pressure {
                signal, reading, ..
            } => {
                let mut s = format!("pressure {}", signal.name());
                match signal {
                    PressureSignal::MemcgReclaim { stall }
                    | PressureSignal::DirectReclaim { stall }
                        if !stall.is_zero() =>
                    {
                        s.push_str(&format!(" stall={stall:?}"));
                    }
                    _ => {}
                }
                if let Some(r) = reading {
                    s.push_str(&format!(" reading={} MiB", mib(*r)));
                }
                s
            }
            Input::Reading {
                non_reclaimable,
                current,
                ..
            } => format!(
                "reading non_reclaimable={} MiB current={} MiB",
                mib(*non_reclaimable),
                mib(*current)
            ),
            Input::UpscaleNotification { granted_mem, .. } => {
                format!("upscale notification granted={} MiB", mib(*granted_mem))
            }
            Input::DownscaleRequest { target_mem, .. } => {
                format!("downscale request target={} MiB", mib(*target_mem))
            }
            Input::Applied { effect, result, .. } => match result {
                Ok(()) => format!("applied {effect}"),
                Err(e) => format!("failed {effect}: {e}"),
            },
            Input::Tick { .. } => "tick".to_string(),
            Input::AgentConnected { .. } => "agent connected".to_string(),
            Input::AgentDisconnected { .. } => "agent disconnected".to_string(),
            Input::Shutdown { .. } => "shutdown".to_string(),
        }
    }
}

/// Why an upscale was wanted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "trigger", rename_all = "snake_case")]
pub enum UpscaleTrigger {
    /// Non-reclaimable memory at or above the threshold, learned from `signal`.
    Usage {
        signal: &'static str,
        reading: u64,
        threshold: u64,
    },
    /// Guest-wide direct reclaim stalled at least the configured time.
    DirectReclaimStall { stall: Duration },
    /// The OOM killer ran (`source`: `oom_victim` tracepoint or `memory.events`).
    OomKill { source: &'static str },
}

impl fmt::Display for UpscaleTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpscaleTrigger::Usage {
                signal,
                reading,
                threshold,
            } => write!(
                f,
                "non-reclaimable {} MiB ≥ threshold {} MiB ({signal})",
                mib(*reading),
                mib(*threshold)
            ),
            UpscaleTrigger::DirectReclaimStall { stall } => {
                write!(f, "guest direct reclaim stalled {stall:?}")
            }
            UpscaleTrigger::OomKill { source } => write!(f, "OOM kill ({source})"),
        }
    }
}

/// Attached to each `UpscaleRequest`: the trigger and how many wanted requests the rate limit
/// folded into this one since the previous request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpscaleReason {
    /// What asked for it.
    pub trigger: UpscaleTrigger,
    /// Requests suppressed by the 1 s rate limit since the last one sent.
    pub suppressed: u64,
}

impl fmt::Display for UpscaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.trigger)?;
        if self.suppressed > 0 {
            write!(f, " (+{} suppressed)", self.suppressed)?;
        }
        Ok(())
    }
}

/// What the policy wants done, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send `UpscaleRequest` to the agent (already rate limited).
    SendUpscaleRequest { reason: UpscaleReason },
    /// Resize the Postgres file cache; answer with [`Input::Applied`].
    SetFileCache { bytes: u64 },
    /// Write `memory.high`; answer with [`Input::Applied`].
    SetMemoryHigh { value: MemoryHigh },
    /// Answer the pending agent request (exactly one per request).
    Reply(ScalingOutcome),
    /// Feed [`Input::Tick`] at or after `at`; supersedes any earlier schedule.
    ScheduleTick { at: Duration },
    /// A record for the decision log.
    Decision(Decision),
}

impl Action {
    /// The effect this action asks for, if it is one ([`Input::Applied`] must follow).
    pub fn effect(&self) -> Option<Effect> {
        match self {
            Action::SetFileCache { bytes } => Some(Effect::FileCache { bytes: *bytes }),
            Action::SetMemoryHigh { value } => Some(Effect::MemoryHigh { value: *value }),
            _ => None,
        }
    }
}

/// What a decision was about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// Startup sizing (memory.high = max, file cache, memory.high at threshold).
    Startup,
    /// An `UpscaleRequest` was sent.
    UpscaleRequested,
    /// `memory.high` was raised a step while an upscale is pending.
    MemoryHighRaised,
    /// An upscale notification was applied and confirmed.
    UpscaleApplied,
    /// A downscale was approved and applied.
    DownscaleApproved,
    /// A downscale was denied (`Ok: false`).
    DownscaleDenied,
    /// A scaling request failed; the previous state was restored (`InternalError`).
    ScalingFailed,
    /// A request was refused as invalid, or arrived before startup or after shutdown.
    Refused,
    /// The file cache was re-asserted after Postgres (re)connected.
    FileCacheResync,
    /// An effect outside a scaling request failed.
    EffectFailed,
    /// Shutdown: memory.high restored to max.
    Shutdown,
    /// An input that did not fit the current state and was ignored.
    Ignored,
}

/// A structured record of one decision: input, readings, thresholds and outcome.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// Time of the input that led to it.
    pub at: Duration,
    /// What it was about.
    pub kind: DecisionKind,
    /// The input, described.
    pub input: String,
    /// Latest non-reclaimable reading, bytes.
    pub reading: Option<u64>,
    /// Latest `memory.current` from an [`Input::Reading`], bytes.
    pub current: Option<u64>,
    /// Peak reading over the recent window, bytes.
    pub peak: Option<u64>,
    /// Upscale threshold after the decision, bytes.
    pub threshold: u64,
    /// Usable memory after the decision, bytes.
    pub usable: u64,
    /// Last known `memory.high`.
    pub memory_high: Option<MemoryHigh>,
    /// Last known file-cache size, bytes.
    pub file_cache: Option<u64>,
    /// Wanted upscale requests currently folded by the rate limit.
    pub suppressed: u64,
    /// Human-readable outcome.
    pub detail: String,
}
