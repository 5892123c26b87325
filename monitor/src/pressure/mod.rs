//! Pressure sources. Each tier turns what the kernel tells us into one stream of
//! [`PressureEvent`]s, so the rest of the daemon does not care which tier is active.

pub mod ebpf;
pub mod poll;
pub mod probe;
pub mod psi;

use std::fmt;
use std::time::Duration;

pub use monitor_ebpf::RecordKind;

/// How the daemon learns about memory pressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// eBPF tracepoint programs feeding a ring buffer.
    Ebpf,
    /// PSI trigger on the cgroup's `memory.pressure` plus `memory.events` notifications.
    Psi,
    /// Neon-compatible baseline: read `memory.stat` every 100 ms, average 5 samples.
    Poll,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Ebpf => "ebpf",
            Tier::Psi => "psi",
            Tier::Poll => "poll",
        })
    }
}

/// What a pressure event says happened.
#[derive(Clone, Debug, PartialEq)]
pub enum PressureKind {
    /// A record from the eBPF programs.
    Kernel(RecordKind),
    /// The PSI trigger on `memory.pressure` fired.
    PsiTrigger,
    /// `memory.events` changed: counters after the change.
    MemoryEvents {
        high: u64,
        max: u64,
        oom: u64,
        oom_kill: u64,
    },
    /// A poll-tier sample: non-reclaimable bytes averaged over the poll window.
    PolledSample {
        avg_non_reclaimable: u64,
        samples: u32,
    },
}

/// One pressure event, whatever the tier.
#[derive(Clone, Debug, PartialEq)]
pub struct PressureEvent {
    /// CLOCK_BOOTTIME nanoseconds (eBPF: stamped in the kernel; other tiers: when read).
    pub ts_ns: u64,
    pub kind: PressureKind,
    /// Task that hit the event (0 when unknown).
    pub pid: u32,
    pub tgid: u32,
    /// Task name (empty when unknown).
    pub comm: String,
    /// cgroup v2 id the event is attributed to (0 when unknown).
    pub cgroup_id: u64,
    /// Reclaim stall for `*End` records.
    pub stall: Duration,
    /// Kind-specific value (nr_reclaimed, victim pid, ...).
    pub value: u64,
    /// Allocation order / memcg item.
    pub order: i32,
    /// GFP flags of a reclaim begin.
    pub gfp_flags: u64,
    /// Events represented by this one (≥ 1; > 1 when the kernel coalesced repeats).
    pub events: u32,
}

impl PressureEvent {
    /// An event with no task attribution, stamped now.
    pub fn now(kind: PressureKind) -> Self {
        PressureEvent {
            ts_ns: boottime_ns(),
            kind,
            pid: 0,
            tgid: 0,
            comm: String::new(),
            cgroup_id: 0,
            stall: Duration::ZERO,
            value: 0,
            order: 0,
            gfp_flags: 0,
            events: 1,
        }
    }

    /// Short kind name for logs and output.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            PressureKind::Kernel(k) => k.name(),
            PressureKind::PsiTrigger => kind_names::PSI_TRIGGER,
            PressureKind::MemoryEvents { .. } => kind_names::MEMORY_EVENTS,
            PressureKind::PolledSample { .. } => kind_names::POLLED_SAMPLE,
        }
    }
}

/// Names of the kinds that do not come from the eBPF programs (those are
/// [`RecordKind::name`]): one spelling for logs, metrics labels, recordings and the policy.
pub mod kind_names {
    pub const PSI_TRIGGER: &str = "psi_trigger";
    pub const MEMORY_EVENTS: &str = "memory_events";
    pub const POLLED_SAMPLE: &str = "polled_sample";
}

/// CLOCK_BOOTTIME in ns, the clock `bpf_ktime_get_boot_ns` uses.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec we pass; CLOCK_BOOTTIME always exists
    // on Linux ≥ 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Registers an fd-owning object with the tokio reactor.
pub(crate) fn register_fd<T: std::os::fd::AsRawFd>(
    inner: T,
    interest: tokio::io::Interest,
) -> anyhow::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: every `T` we pass (aya maps and loggers, `std::fs::File`) owns its descriptor and
    // closes it only on drop, so the fd stays open and unchanged for the AsyncFd's lifetime.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(inner, interest) }
        .map_err(|e| anyhow::Error::new(e.into_parts().1))
}
