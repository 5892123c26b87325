//! The ABI shared by vm-monitor's eBPF programs and its userspace loader: record layout, record
//! kinds, map names, global (load-time) configuration names and tracepoint field slots.
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding so that the layout is the
//! same for `bpfel-unknown-none` and `x86_64`; both sides assert the sizes below.
#![no_std]

/// Ring buffer carrying [`PressureRecord`]s to userspace.
pub const MAP_EVENTS: &str = "EVENTS";
/// Per-CPU array of [`KindCounters`], indexed by [`RecordKind`] value.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Per-CPU array (one [`GrowthArm`] per CPU) through which userspace arms the growth hint.
pub const MAP_GROWTH_ARM: &str = "GROWTH_ARM";
/// Per-CPU array (one [`GrowthCpu`] per CPU): growth each CPU has seen since load.
pub const MAP_GROWTH_CPU: &str = "GROWTH_CPU";
/// Ring-buffer size in bytes (power of two, multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Global: cgroup v2 id (kernfs inode) of the watched cgroup; 0 = no cgroup filter.
pub const GLOBAL_TARGET_CGROUP_ID: &str = "TARGET_CGROUP_ID";
/// Global: depth of the watched cgroup below the v2 root (`/sys/fs/cgroup/a/b` is 2).
pub const GLOBAL_TARGET_CGROUP_LEVEL: &str = "TARGET_CGROUP_LEVEL";
/// Global: coalescing window in ns; repeats of a kind for one cgroup inside it are counted, not sent.
pub const GLOBAL_COALESCE_NS: &str = "COALESCE_NS";
/// Global: [`FieldSlots`] with the tracepoint field offsets read from tracefs at load time.
pub const GLOBAL_FIELDS: &str = "FIELDS";

/// What happened. Values are stable: they are stored in recordings.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    /// `vmscan:mm_vmscan_memcg_reclaim_begin` in the watched subtree.
    MemcgReclaimBegin = 1,
    /// `vmscan:mm_vmscan_memcg_reclaim_end`: `value` = nr_reclaimed, `stall_ns` = begin→end.
    MemcgReclaimEnd = 2,
    /// `vmscan:mm_vmscan_direct_reclaim_begin` (guest-wide).
    DirectReclaimBegin = 3,
    /// `vmscan:mm_vmscan_direct_reclaim_end`: `value` = nr_reclaimed, `stall_ns` = begin→end.
    DirectReclaimEnd = 4,
    /// `vmscan:mm_vmscan_kswapd_wake`: `order`, `value` = node id.
    KswapdWake = 5,
    /// `oom:mark_victim`: `value` = victim pid. Never coalesced.
    OomVictim = 6,
    /// `memcg:count_memcg_events` (kernel ≥ 6.13) for the watched cgroup: `order` = item,
    /// `value` = count. The cgroup id comes from the event itself.
    MemcgEvents = 7,
    /// `kmem:rss_stat` in the watched subtree: anonymous/shmem pages mapped by its tasks grew
    /// by the armed budget since userspace's last snapshot ([`GrowthArm`]); a "look now" hint,
    /// not a measurement. `value` = this CPU's running growth total ([`GrowthCpu::grown`]),
    /// `order` = rss member.
    /// Growth hits not sent count as coalesced, whatever the coalescing window.
    GrowthHint = 8,
}

/// Number of counter slots (max kind value + 1).
pub const KIND_SLOTS: u32 = 9;

impl RecordKind {
    /// Every kind, in value order.
    pub const ALL: [RecordKind; 8] = [
        RecordKind::MemcgReclaimBegin,
        RecordKind::MemcgReclaimEnd,
        RecordKind::DirectReclaimBegin,
        RecordKind::DirectReclaimEnd,
        RecordKind::KswapdWake,
        RecordKind::OomVictim,
        RecordKind::MemcgEvents,
        RecordKind::GrowthHint,
    ];

    /// Decodes a raw kind value.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u32 == v)
    }

    /// Short stable name used in logs, metrics and recordings.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::MemcgReclaimBegin => "memcg_reclaim_begin",
            RecordKind::MemcgReclaimEnd => "memcg_reclaim_end",
            RecordKind::DirectReclaimBegin => "direct_reclaim_begin",
            RecordKind::DirectReclaimEnd => "direct_reclaim_end",
            RecordKind::KswapdWake => "kswapd_wake",
            RecordKind::OomVictim => "oom_victim",
            RecordKind::MemcgEvents => "memcg_events",
            RecordKind::GrowthHint => "growth_hint",
        }
    }

    /// Urgent kinds bypass coalescing and force a consumer wake-up.
    pub fn is_urgent(self) -> bool {
        matches!(self, RecordKind::OomVictim)
    }
}

/// One ring-buffer record (80 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PressureRecord {
    /// `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME), lines up with perf/trace-cmd.
    pub ts_ns: u64,
    /// cgroup v2 id of the current task, or the memcg id carried by the event.
    pub cgroup_id: u64,
    /// Stall time for `*End` kinds (0 when the begin was not seen).
    pub stall_ns: u64,
    /// Kind-specific value (nr_reclaimed, victim pid, node id, memcg event count).
    pub value: u64,
    /// Kind-specific flags (gfp flags of a reclaim begin).
    pub gfp_flags: u64,
    /// [`RecordKind`] as u32.
    pub kind: u32,
    /// Thread id of the current task.
    pub pid: u32,
    /// Process id of the current task.
    pub tgid: u32,
    /// Allocation order (reclaim begin, kswapd wake) or memcg event item.
    pub order: i32,
    /// Events of this kind and cgroup folded into this record (≥ 1): this one plus the ones
    /// coalesced since the previous record.
    pub events: u32,
    pub _pad: u32,
    /// `comm` of the current task, NUL padded.
    pub comm: [u8; 16],
}

/// Per-kind counters, one copy per CPU; userspace sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounters {
    /// Tracepoint hits that passed the cgroup filter.
    pub seen: u64,
    /// Records written to the ring buffer.
    pub emitted: u64,
    /// Hits folded into a later record instead of being sent.
    pub coalesced: u64,
    /// Records lost because the ring buffer was full.
    pub dropped: u64,
}

/// Tracepoint field offsets (bytes from the start of the raw record), from tracefs `format`.
/// A size of 0 means "field absent"; the program then reports 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldSlot {
    pub offset: u16,
    pub size: u16,
}

/// All field slots the programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldSlots {
    /// memcg/direct reclaim begin: `order`.
    pub reclaim_begin_order: FieldSlot,
    /// memcg/direct reclaim begin: `gfp_flags`.
    pub reclaim_begin_gfp: FieldSlot,
    /// memcg/direct reclaim end: `nr_reclaimed`.
    pub reclaim_end_nr: FieldSlot,
    /// kswapd_wake: `nid`.
    pub kswapd_nid: FieldSlot,
    /// kswapd_wake: `order`.
    pub kswapd_order: FieldSlot,
    /// mark_victim: `pid`.
    pub oom_pid: FieldSlot,
    /// count_memcg_events: `id` (memcg's cgroup id).
    pub memcg_id: FieldSlot,
    /// count_memcg_events: `item`.
    pub memcg_item: FieldSlot,
    /// count_memcg_events: `val`.
    pub memcg_val: FieldSlot,
    /// rss_stat: `mm_id` (a hash of the mm pointer).
    pub rss_mm_id: FieldSlot,
    /// rss_stat: `member` (MM_FILEPAGES 0, MM_ANONPAGES 1, MM_SWAPENTS 2, MM_SHMEMPAGES 3).
    pub rss_member: FieldSlot,
    /// rss_stat: `size` (the mm's counter for that member, in bytes).
    pub rss_size: FieldSlot,
}

/// rss_stat members that are non-reclaimable memory of the mapping process.
pub const RSS_MEMBER_ANON: u64 = 1;
/// See [`RSS_MEMBER_ANON`].
pub const RSS_MEMBER_SHMEM: u64 = 3;

/// How the growth hint is armed, per CPU. Each CPU keeps a running total of the growth it
/// sees ([`GrowthCpu::grown`], never reset) and sends one [`RecordKind::GrowthHint`] when the
/// total reaches `threshold`; then it stays quiet until userspace re-arms (a new `epoch`).
///
/// Userspace snapshots every CPU's total *before* each memory.stat reading and arms with
/// `threshold = snapshot + budget ÷ possible CPUs`: growth that happens while it reads and
/// decides is already counted (an early hint, never a late one), and if the subtree grew by
/// the budget, at least one CPU saw its share (pigeonhole), so no cross-CPU atomic is needed.
/// `epoch == 0` is disarmed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrowthArm {
    pub epoch: u64,
    pub threshold: u64,
}

/// One CPU's growth-hint state, written only by the programs on that CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrowthCpu {
    /// Bytes of growth seen on this CPU since the programs were loaded.
    pub grown: u64,
    /// The last epoch this CPU sent a hint for.
    pub fired_epoch: u64,
}

/// Tracepoints the programs attach to: (program name in the object, category, event).
pub const TRACEPOINTS: [(&str, &str, &str); 8] = [
    (
        "memcg_reclaim_begin",
        "vmscan",
        "mm_vmscan_memcg_reclaim_begin",
    ),
    ("memcg_reclaim_end", "vmscan", "mm_vmscan_memcg_reclaim_end"),
    (
        "direct_reclaim_begin",
        "vmscan",
        "mm_vmscan_direct_reclaim_begin",
    ),
    (
        "direct_reclaim_end",
        "vmscan",
        "mm_vmscan_direct_reclaim_end",
    ),
    ("kswapd_wake", "vmscan", "mm_vmscan_kswapd_wake"),
    ("oom_mark_victim", "oom", "mark_victim"),
    ("memcg_count_events", "memcg", "count_memcg_events"),
    ("rss_stat", "kmem", "rss_stat"),
];

// Layout is part of the ABI: fail the build on both sides if it drifts.
const _: () = assert!(core::mem::size_of::<PressureRecord>() == 80);
const _: () = assert!(core::mem::align_of::<PressureRecord>() == 8);
const _: () = assert!(core::mem::size_of::<KindCounters>() == 32);
const _: () = assert!(core::mem::size_of::<FieldSlots>() == 48);
const _: () = assert!(core::mem::size_of::<GrowthArm>() == 16);
const _: () = assert!(core::mem::size_of::<GrowthCpu>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding; every bit
    // pattern is valid.
    unsafe impl aya::Pod for super::PressureRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KindCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FieldSlots {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GrowthArm {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GrowthCpu {}
}
