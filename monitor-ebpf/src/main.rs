//! vm-monitor's eBPF programs: classic tracepoints only (Neon's 6.12 VM kernel has no BTF, no
//! kprobes and no JIT), field offsets injected from tracefs at load time, records pushed into one
//! ring buffer, every hit counted per kind so nothing is lost silently.
#![no_std]
#![no_main]
// The programs are entry points: `pub` is how the loader's symbols read, not an API.
#![allow(unreachable_pub)]

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns,
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::info;
use monitor_ebpf::{
    EVENTS_RING_BYTES, FieldSlot, FieldSlots, GrowthArm, GrowthCpu, KIND_SLOTS, KindCounters,
    PressureRecord, RSS_MEMBER_ANON, RSS_MEMBER_SHMEM, RecordKind,
};

// ---- load-time configuration (set by userspace with `EbpfLoader::override_global`) ----

#[unsafe(no_mangle)]
static TARGET_CGROUP_ID: u64 = 0;
#[unsafe(no_mangle)]
static TARGET_CGROUP_LEVEL: u32 = 0;
#[unsafe(no_mangle)]
static COALESCE_NS: u64 = 0;
#[unsafe(no_mangle)]
static FIELDS: FieldSlots = FieldSlots {
    reclaim_begin_order: FieldSlot { offset: 0, size: 0 },
    reclaim_begin_gfp: FieldSlot { offset: 0, size: 0 },
    reclaim_end_nr: FieldSlot { offset: 0, size: 0 },
    kswapd_nid: FieldSlot { offset: 0, size: 0 },
    kswapd_order: FieldSlot { offset: 0, size: 0 },
    oom_pid: FieldSlot { offset: 0, size: 0 },
    memcg_id: FieldSlot { offset: 0, size: 0 },
    memcg_item: FieldSlot { offset: 0, size: 0 },
    memcg_val: FieldSlot { offset: 0, size: 0 },
    rss_mm_id: FieldSlot { offset: 0, size: 0 },
    rss_member: FieldSlot { offset: 0, size: 0 },
    rss_size: FieldSlot { offset: 0, size: 0 },
};

// ---- maps ----

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<KindCounters> = PerCpuArray::with_max_entries(KIND_SLOTS, 0);

/// Begin timestamps of memcg reclaim in the watched subtree, by thread id.
#[map]
static MEMCG_BEGIN: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

/// Begin timestamps of direct reclaim, by thread id.
#[map]
static DIRECT_BEGIN: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

/// Coalescing state per (kind, cgroup). LRU so a churn of cgroups cannot fill it.
#[map]
static COALESCE: LruHashMap<CoalesceKey, CoalesceState> = LruHashMap::with_max_entries(4096, 0);

/// Growth-hint arming per CPU, written by userspace after every reading (see [`GrowthArm`]).
#[map(name = "GROWTH_ARM")]
static GROWTH_ARM: PerCpuArray<GrowthArm> = PerCpuArray::with_max_entries(1, 0);

/// Growth seen by this CPU since load (see [`GrowthCpu`]); userspace reads it, never writes.
#[map(name = "GROWTH_CPU")]
static GROWTH_CPU: PerCpuArray<GrowthCpu> = PerCpuArray::with_max_entries(1, 0);

/// Last anon/shmem counter seen per mm (`mm_id`), to turn rss_stat's absolute sizes into
/// growth. Shared by all CPUs: a thread that migrates keeps its mm's baseline. LRU, so exited
/// processes age out.
#[map]
static MM_LAST: LruHashMap<u32, MmLast> = LruHashMap::with_max_entries(8192, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct MmLast {
    anon: u64,
    shmem: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CoalesceKey {
    cgroup_id: u64,
    kind: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CoalesceState {
    /// When the last record for this key was sent.
    last_emit_ns: u64,
    /// Hits folded since then, and the sums of their stall and value.
    pending: u64,
    pending_stall_ns: u64,
    pending_value: u64,
}

// ---- helpers ----

#[inline(always)]
fn cfg_u64(v: &u64) -> u64 {
    // SAFETY: reading our own static; volatile so the verifier sees the map load rather than a
    // constant folded at compile time.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn fields() -> FieldSlots {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&FIELDS) }
}

#[inline(always)]
fn read_field(ctx: &TracePointContext, slot: FieldSlot) -> u64 {
    let off = slot.offset as usize;
    // SAFETY: bpf_probe_read_kernel on the tracepoint record; a bad offset yields an error,
    // which we report as 0.
    unsafe {
        match slot.size {
            8 => ctx.read_at::<u64>(off).unwrap_or(0),
            4 => ctx.read_at::<u32>(off).map(|v| v as u64).unwrap_or(0),
            2 => ctx.read_at::<u16>(off).map(|v| v as u64).unwrap_or(0),
            1 => ctx.read_at::<u8>(off).map(|v| v as u64).unwrap_or(0),
            _ => 0,
        }
    }
}

#[inline(always)]
fn counters(kind: RecordKind) -> Option<&'static mut KindCounters> {
    // SAFETY: per-CPU slot; tracepoint programs run with migration disabled, so this CPU's copy
    // is ours for the duration of the program.
    COUNTERS
        .get_ptr_mut(kind as u32)
        .map(|p| unsafe { &mut *p })
}

/// Whether the current task is inside the watched cgroup subtree (always true without one).
#[inline(always)]
fn in_target_subtree() -> bool {
    let target = cfg_u64(&TARGET_CGROUP_ID);
    if target == 0 {
        return true;
    }
    // SAFETY: a volatile read of a static the loader patches before load.
    let level = unsafe { core::ptr::read_volatile(&TARGET_CGROUP_LEVEL) };
    // SAFETY: a helper call with no pointer arguments.
    unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) == target }
}

#[inline(always)]
fn current_cgroup_id() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// A record about to be sent (or coalesced).
struct Hit {
    kind: RecordKind,
    ts_ns: u64,
    cgroup_id: u64,
    stall_ns: u64,
    value: u64,
    gfp_flags: u64,
    order: i32,
}

/// Counts the hit, then sends it unless a record of the same kind and cgroup went out less than
/// `COALESCE_NS` ago (urgent kinds are never coalesced).
#[inline(always)]
fn report(hit: Hit) {
    let Some(c) = counters(hit.kind) else {
        return;
    };
    c.seen += 1;

    let mut events: u64 = 1;
    let mut stall_ns = hit.stall_ns;
    let mut value = hit.value;
    let window = cfg_u64(&COALESCE_NS);
    let urgent = hit.kind.is_urgent();
    if window != 0 && !urgent {
        let key = CoalesceKey {
            cgroup_id: hit.cgroup_id,
            kind: hit.kind as u32,
            _pad: 0,
        };
        if let Some(st) = COALESCE.get_ptr_mut(key) {
            // SAFETY: pointer from a successful map lookup.
            let st = unsafe { &mut *st };
            if hit.ts_ns.wrapping_sub(st.last_emit_ns) < window {
                st.pending += 1;
                st.pending_stall_ns += hit.stall_ns;
                st.pending_value += hit.value;
                c.coalesced += 1;
                return;
            }
            events += st.pending;
            stall_ns += st.pending_stall_ns;
            value += st.pending_value;
            st.last_emit_ns = hit.ts_ns;
            st.pending = 0;
            st.pending_stall_ns = 0;
            st.pending_value = 0;
        } else {
            let st = CoalesceState {
                last_emit_ns: hit.ts_ns,
                pending: 0,
                pending_stall_ns: 0,
                pending_value: 0,
            };
            let _ = COALESCE.insert(key, st, 0);
        }
    }

    send(c, &hit, events, stall_ns, value, urgent);
}

/// Writes one record for `hit` (standing for `events` hits) to the ring buffer.
#[inline(always)]
fn send(c: &mut KindCounters, hit: &Hit, events: u64, stall_ns: u64, value: u64, urgent: bool) {
    let Some(mut entry) = EVENTS.reserve::<PressureRecord>(0) else {
        c.dropped += events;
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    entry.write(PressureRecord {
        ts_ns: hit.ts_ns,
        cgroup_id: hit.cgroup_id,
        stall_ns,
        value,
        gfp_flags: hit.gfp_flags,
        kind: hit.kind as u32,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        order: hit.order,
        events: events as u32,
        _pad: 0,
        comm,
    });
    entry.submit(if urgent {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        0
    });
    c.emitted += 1;
}

#[inline(always)]
fn on_reclaim_begin(ctx: &TracePointContext, kind: RecordKind, begins: &HashMap<u32, u64>) {
    let ts = now_ns();
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = begins.insert(tid, ts, 0);
    let f = fields();
    report(Hit {
        kind,
        ts_ns: ts,
        cgroup_id: current_cgroup_id(),
        stall_ns: 0,
        value: 0,
        gfp_flags: read_field(ctx, f.reclaim_begin_gfp),
        order: read_field(ctx, f.reclaim_begin_order) as i32,
    });
}

#[inline(always)]
fn on_reclaim_end(ctx: &TracePointContext, kind: RecordKind, begins: &HashMap<u32, u64>) {
    let ts = now_ns();
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out before the entry is removed.
    let stall = match unsafe { begins.get(tid) } {
        Some(begin) => ts.saturating_sub(*begin),
        None => 0,
    };
    let _ = begins.remove(tid);
    report(Hit {
        kind,
        ts_ns: ts,
        cgroup_id: current_cgroup_id(),
        stall_ns: stall,
        value: read_field(ctx, fields().reclaim_end_nr),
        gfp_flags: 0,
        order: 0,
    });
}

// ---- programs ----

#[tracepoint]
pub fn memcg_reclaim_begin(ctx: TracePointContext) -> u32 {
    if in_target_subtree() {
        on_reclaim_begin(&ctx, RecordKind::MemcgReclaimBegin, &MEMCG_BEGIN);
    }
    0
}

#[tracepoint]
pub fn memcg_reclaim_end(ctx: TracePointContext) -> u32 {
    if in_target_subtree() {
        on_reclaim_end(&ctx, RecordKind::MemcgReclaimEnd, &MEMCG_BEGIN);
    }
    0
}

#[tracepoint]
pub fn direct_reclaim_begin(ctx: TracePointContext) -> u32 {
    on_reclaim_begin(&ctx, RecordKind::DirectReclaimBegin, &DIRECT_BEGIN);
    0
}

#[tracepoint]
pub fn direct_reclaim_end(ctx: TracePointContext) -> u32 {
    on_reclaim_end(&ctx, RecordKind::DirectReclaimEnd, &DIRECT_BEGIN);
    0
}

#[tracepoint]
pub fn kswapd_wake(ctx: TracePointContext) -> u32 {
    let f = fields();
    report(Hit {
        kind: RecordKind::KswapdWake,
        ts_ns: now_ns(),
        cgroup_id: current_cgroup_id(),
        stall_ns: 0,
        value: read_field(&ctx, f.kswapd_nid),
        gfp_flags: 0,
        order: read_field(&ctx, f.kswapd_order) as i32,
    });
    0
}

#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    let victim = read_field(&ctx, fields().oom_pid);
    info!(&ctx, "oom: marked victim pid {}", victim);
    report(Hit {
        kind: RecordKind::OomVictim,
        ts_ns: now_ns(),
        cgroup_id: current_cgroup_id(),
        stall_ns: 0,
        value: victim,
        gfp_flags: 0,
        order: 0,
    });
    0
}

#[tracepoint]
pub fn memcg_count_events(ctx: TracePointContext) -> u32 {
    let target = cfg_u64(&TARGET_CGROUP_ID);
    let f = fields();
    let id = read_field(&ctx, f.memcg_id);
    // Very high frequency: only the watched cgroup itself, and only with a target set.
    if target == 0 || id != target {
        return 0;
    }
    let item = read_field(&ctx, f.memcg_item) as i32;
    report(Hit {
        kind: RecordKind::MemcgEvents,
        ts_ns: now_ns(),
        cgroup_id: id,
        stall_ns: 0,
        value: read_field(&ctx, f.memcg_val),
        gfp_flags: 0,
        order: item,
    });
    0
}

/// Growth of the subtree's non-reclaimable memory, as the mapping processes see it. Fires on
/// every change of an mm's counters (≥ 6.2; 6.1 batches a task's changes, ≤ 64 pages), so it
/// must stay cheap: one hash lookup, no ring-buffer write except the one hint per arm.
///
/// It may over-hint, never under-hint the mapped part: a first sight of an mm counts its whole
/// size, shrinking is ignored (no credit), and a page shared by several processes (shmem,
/// COW) counts once per mapping mm. Memory no mm maps (kernel memory, unmapped tmpfs) is not
/// seen here; the reclaim, OOM and agent-driven readings still cover it.
#[tracepoint]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    if !in_target_subtree() {
        return 0;
    }
    let f = fields();
    let member = read_field(&ctx, f.rss_member);
    if member != RSS_MEMBER_ANON && member != RSS_MEMBER_SHMEM {
        return 0;
    }
    let size = read_field(&ctx, f.rss_size);
    let mm = read_field(&ctx, f.rss_mm_id) as u32;
    let grown = match MM_LAST.get_ptr_mut(mm) {
        Some(last) => {
            // SAFETY: pointer from a successful map lookup.
            let last = unsafe { &mut *last };
            let slot = if member == RSS_MEMBER_ANON {
                &mut last.anon
            } else {
                &mut last.shmem
            };
            let grown = size.saturating_sub(*slot);
            *slot = size;
            grown
        }
        None => {
            let mut last = MmLast { anon: 0, shmem: 0 };
            if member == RSS_MEMBER_ANON {
                last.anon = size;
            } else {
                last.shmem = size;
            }
            let _ = MM_LAST.insert(mm, last, 0);
            size
        }
    };
    if grown == 0 {
        return 0;
    }
    let Some(c) = counters(RecordKind::GrowthHint) else {
        return 0;
    };
    c.seen += 1;
    let Some(cpu) = GROWTH_CPU.get_ptr_mut(0) else {
        c.coalesced += 1;
        return 0;
    };
    // SAFETY: per-CPU slot, ours while the program runs (migration is disabled).
    let cpu = unsafe { &mut *cpu };
    cpu.grown = cpu.grown.saturating_add(grown);
    let Some(arm) = GROWTH_ARM.get_ptr(0) else {
        c.coalesced += 1;
        return 0;
    };
    // SAFETY: volatile read of this CPU's slot, which userspace replaces as a whole.
    let arm = unsafe { core::ptr::read_volatile(arm) };
    // Disarmed, already fired in this epoch, or the threshold not reached yet: counted only.
    if arm.epoch == 0 || cpu.fired_epoch == arm.epoch || cpu.grown < arm.threshold {
        c.coalesced += 1;
        return 0;
    }
    cpu.fired_epoch = arm.epoch;
    let hit = Hit {
        kind: RecordKind::GrowthHint,
        ts_ns: now_ns(),
        cgroup_id: current_cgroup_id(),
        stall_ns: 0,
        value: cpu.grown,
        gfp_flags: 0,
        order: member as i32,
    };
    // At most one per arm and the reason a reading is due now: wake the consumer at once.
    send(c, &hit, 1, 0, cpu.grown, true);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
