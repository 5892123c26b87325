//! The `ebpf` tier: load the embedded tracepoint programs without BTF (field offsets from
//! tracefs), attach what this kernel has, and turn ring-buffer records into [`PressureEvent`]s.
//! Nothing polls: the consumer sleeps in epoll until the kernel commits a record.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use aya::maps::{MapData, PerCpuArray, PerCpuValues, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use monitor_ebpf::{
    FieldSlot, FieldSlots, GLOBAL_COALESCE_NS, GLOBAL_FIELDS, GLOBAL_TARGET_CGROUP_ID,
    GLOBAL_TARGET_CGROUP_LEVEL, GrowthArm, GrowthCpu, KindCounters, MAP_COUNTERS, MAP_EVENTS,
    MAP_GROWTH_ARM, MAP_GROWTH_CPU, PressureRecord, RecordKind, TRACEPOINTS,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{PressureEvent, PressureKind};
use crate::cgroup::CgroupTarget;
use crate::tracefs::{EventFormat, TraceFs};

/// The eBPF object built by `build.rs` (aya-build), embedded in the binary.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vm-monitor-ebpf"));

/// What to load.
#[derive(Clone, Debug, Default)]
pub struct EbpfOptions {
    /// Only memcg reclaim inside this subtree is reported; `None` reports every cgroup.
    pub target: Option<CgroupTarget>,
    /// In-kernel coalescing window (zero: every event is sent).
    pub coalesce: Duration,
    /// Have the kernel accumulate the programs' run count and time while they are loaded
    /// (`BPF_ENABLE_STATS`, released with them; no sysctl is changed).
    pub run_stats: bool,
}

/// Result of trying to attach one program.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AttachStatus {
    /// `category:event`.
    pub tracepoint: String,
    /// `attached`, `missing` (no such tracepoint on this kernel) or `failed: ...`.
    pub state: String,
}

impl AttachStatus {
    /// Whether the program is live.
    pub fn attached(&self) -> bool {
        self.state == "attached"
    }
}

/// Loaded and attached programs. Dropping it detaches everything.
pub struct EbpfPipeline {
    ebpf: Ebpf,
    attach: Vec<AttachStatus>,
    counters: CounterReader,
    run_stats: Option<OwnedFd>,
    growth: Option<GrowthHint>,
}

/// Arms the in-kernel growth hint: [`GrowthHint::snapshot`] right before a memory.stat
/// reading, then [`GrowthHint::arm`] with that snapshot and the budget decided on the
/// reading; the programs send one [`RecordKind::GrowthHint`] once the watched subtree's mapped
/// anonymous and shmem memory has grown by at most `budget` since the snapshot (possibly
/// earlier, never later).
pub struct GrowthHint {
    arm: PerCpuArray<MapData, GrowthArm>,
    totals: PerCpuArray<MapData, GrowthCpu>,
    epoch: u64,
    cpus: usize,
}

/// Every CPU's running growth total at one instant (see [`GrowthHint::snapshot`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrowthSnapshot(Vec<u64>);

impl GrowthSnapshot {
    /// Bytes grown per possible CPU since load.
    pub fn totals(&self) -> &[u64] {
        &self.0
    }
}

impl GrowthHint {
    /// Every CPU's running growth total; take it before reading memory.stat, so that growth
    /// while the reading and the decision happen still counts towards the next hint.
    pub fn snapshot(&self) -> anyhow::Result<GrowthSnapshot> {
        let totals = self
            .totals
            .get(&0, 0)
            .context("reading the growth totals (GROWTH_CPU map)")?;
        Ok(GrowthSnapshot(totals.iter().map(|c| c.grown).collect()))
    }

    /// Re-arms (a new epoch) so that a hint comes once `budget` bytes grew after `base`.
    /// Returns whether some CPU had already grown that far when the arm landed: the programs
    /// only look on the next growth, so the caller should read now instead of waiting.
    pub fn arm(&mut self, base: &GrowthSnapshot, budget: u64) -> anyhow::Result<bool> {
        self.epoch = self.epoch.wrapping_add(1).max(1);
        // Rounded up and never 0: see GrowthArm on why a per-CPU share suffices.
        let share = budget.div_ceil(self.cpus as u64).max(1);
        let thresholds: Vec<u64> = (0..self.cpus)
            .map(|cpu| base.0.get(cpu).copied().unwrap_or(0).saturating_add(share))
            .collect();
        let values = thresholds
            .iter()
            .map(|&threshold| GrowthArm {
                epoch: self.epoch,
                threshold,
            })
            .collect::<Vec<_>>();
        let values = PerCpuValues::try_from(values)
            .map_err(|err| anyhow!("{err}"))
            .context("building the growth-hint arm")?;
        self.arm
            .set(0, values, 0)
            .context("arming the growth hint (GROWTH_ARM map)")?;
        let now = self.snapshot()?;
        Ok(now.0.iter().zip(&thresholds).any(|(t, th)| t >= th))
    }
}

/// Reads the per-kind counters (summed over CPUs) while the pipeline runs.
#[derive(Clone)]
pub struct CounterReader {
    map: Arc<Mutex<PerCpuArray<MapData, KindCounters>>>,
}

impl CounterReader {
    /// Current totals per kind.
    pub fn snapshot(&self) -> anyhow::Result<BTreeMap<RecordKind, KindCounters>> {
        let map = self
            .map
            .lock()
            .map_err(|_| anyhow!("counter map lock poisoned"))?;
        let mut out = BTreeMap::new();
        for kind in RecordKind::ALL {
            let per_cpu = map
                .get(&(kind as u32), 0)
                .with_context(|| format!("reading counters of {}", kind.name()))?;
            let mut sum = KindCounters::default();
            for c in per_cpu.iter() {
                sum.seen += c.seen;
                sum.emitted += c.emitted;
                sum.coalesced += c.coalesced;
                sum.dropped += c.dropped;
            }
            out.insert(kind, sum);
        }
        Ok(out)
    }
}

impl EbpfPipeline {
    /// Loads the programs and attaches every one whose tracepoint exists.
    pub fn load(opts: &EbpfOptions) -> anyhow::Result<EbpfPipeline> {
        raise_memlock_limit();
        // Before loading, so the first runs count too.
        let run_stats = if opts.run_stats {
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .context("enabling BPF run statistics (BPF_ENABLE_STATS, kernel ≥ 5.8)")?,
            )
        } else {
            None
        };
        let tracefs = TraceFs::locate().context("locating tracefs")?;
        let slots = field_slots(&tracefs);
        let target_id = opts.target.as_ref().map(|t| t.id).unwrap_or(0);
        let target_level = opts.target.as_ref().map(|t| t.level).unwrap_or(0);
        let coalesce_ns = u64::try_from(opts.coalesce.as_nanos()).unwrap_or(u64::MAX);

        let mut ebpf = EbpfLoader::new()
            // Neon's kernel has no BTF; offsets come from tracefs instead of CO-RE.
            .btf(None)
            .override_global(GLOBAL_TARGET_CGROUP_ID, &target_id, true)
            .override_global(GLOBAL_TARGET_CGROUP_LEVEL, &target_level, true)
            .override_global(GLOBAL_COALESCE_NS, &coalesce_ns, true)
            .override_global(GLOBAL_FIELDS, &slots, true)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (needs root/CAP_BPF+CAP_PERFMON and kernel ≥ 5.8)")?;

        let mut attach = Vec::new();
        for (prog, category, event) in TRACEPOINTS {
            let name = format!("{category}:{event}");
            if !tracefs.has_event(category, event) {
                attach.push(AttachStatus {
                    tracepoint: name,
                    state: "missing".into(),
                });
                continue;
            }
            let state = match attach_one(&mut ebpf, prog, category, event) {
                Ok(()) => "attached".to_string(),
                Err(err) => format!("failed: {err:#}"),
            };
            attach.push(AttachStatus {
                tracepoint: name,
                state,
            });
        }
        for a in &attach {
            debug!(tracepoint = %a.tracepoint, state = %a.state, "eBPF attach");
        }
        if !attach.iter().any(AttachStatus::attached) {
            bail!("no eBPF program could be attached: {attach:?}");
        }
        let memcg_ok = attach
            .iter()
            .filter(|a| a.tracepoint.contains("memcg_reclaim"))
            .all(AttachStatus::attached);
        if !memcg_ok {
            bail!("memcg reclaim tracepoints could not be attached: {attach:?}");
        }

        let counters = PerCpuArray::try_from(
            ebpf.take_map(MAP_COUNTERS)
                .ok_or_else(|| anyhow!("eBPF object has no {MAP_COUNTERS} map"))?,
        )
        .context("opening the counters map")?;
        let rss_attached = attach
            .iter()
            .any(|a| a.tracepoint == "kmem:rss_stat" && a.attached());
        let growth = if rss_attached {
            let mut open = |name: &str| {
                ebpf.take_map(name)
                    .ok_or_else(|| anyhow!("eBPF object has no {name} map"))
            };
            let arm = PerCpuArray::try_from(open(MAP_GROWTH_ARM)?)
                .context("opening the growth-hint arm map")?;
            let totals = PerCpuArray::try_from(open(MAP_GROWTH_CPU)?)
                .context("opening the growth-total map")?;
            let cpus = aya::util::nr_cpus()
                .map_err(|(what, err)| anyhow!("{what}: {err}"))
                .context("counting possible CPUs")?;
            Some(GrowthHint {
                arm,
                totals,
                epoch: 0,
                cpus: cpus.max(1),
            })
        } else {
            warn!(
                "kmem:rss_stat not attached: growth below the threshold is only seen on reclaim or agent requests"
            );
            None
        };
        Ok(EbpfPipeline {
            ebpf,
            attach,
            counters: CounterReader {
                map: Arc::new(Mutex::new(counters)),
            },
            run_stats,
            growth,
        })
    }

    /// Per-tracepoint attach results.
    pub fn attach_status(&self) -> &[AttachStatus] {
        &self.attach
    }

    /// A handle to read the in-kernel counters.
    pub fn counters(&self) -> CounterReader {
        self.counters.clone()
    }

    /// Starts the ring-buffer consumer (and the aya-log forwarder) on the current runtime.
    /// Events go to `tx`; when the receiver is gone the consumer stops. The returned guard
    /// keeps the programs attached.
    pub fn start(mut self, tx: mpsc::Sender<PressureEvent>) -> anyhow::Result<AttachedPrograms> {
        let ring = RingBuf::try_from(
            self.ebpf
                .take_map(MAP_EVENTS)
                .ok_or_else(|| anyhow!("eBPF object has no {MAP_EVENTS} map"))?,
        )
        .context("opening the events ring buffer")?;
        let ring = super::register_fd(ring, Interest::READABLE)
            .context("registering the ring buffer with the reactor")?;
        let consumer = tokio::spawn(consume(ring, tx));

        let logger = match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => match super::register_fd(logger, Interest::READABLE) {
                Ok(fd) => Some(tokio::spawn(forward_logs(fd))),
                Err(err) => {
                    warn!(error = %err, "cannot watch the eBPF log ring buffer");
                    None
                }
            },
            Err(err) => {
                warn!(error = %err, "eBPF logging unavailable");
                None
            }
        };
        info!(
            attached = self.attach.iter().filter(|a| a.attached()).count(),
            total = self.attach.len(),
            "eBPF programs attached"
        );
        Ok(AttachedPrograms {
            ebpf: Arc::new(Mutex::new(self.ebpf)),
            consumer,
            logger,
            counters: self.counters,
            attach: self.attach,
            run_stats: self.run_stats,
            growth: self.growth,
        })
    }
}

/// Running programs; dropping this detaches them and stops the consumer.
pub struct AttachedPrograms {
    /// Shared with [`ProgramStatsReader`]s; owning it keeps the programs loaded and attached.
    ebpf: Arc<Mutex<Ebpf>>,
    consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
    logger: Option<tokio::task::JoinHandle<()>>,
    counters: CounterReader,
    attach: Vec<AttachStatus>,
    run_stats: Option<OwnedFd>,
    growth: Option<GrowthHint>,
}

impl AttachedPrograms {
    /// The growth-hint arm (once; `None` when kmem:rss_stat is not attached). Until it is
    /// armed the hint stays silent.
    pub fn take_growth_hint(&mut self) -> Option<GrowthHint> {
        self.growth.take()
    }

    /// Whether the kernel accumulates the programs' run statistics: asked for at load
    /// ([`EbpfOptions::run_stats`]) or `kernel.bpf_stats_enabled=1`.
    pub fn run_stats_enabled(&self) -> bool {
        self.run_stats.is_some() || bpf_stats_enabled().unwrap_or(false)
    }

    /// Whether these programs hold their own `BPF_ENABLE_STATS` (see [`EbpfOptions::run_stats`]).
    pub fn holds_run_stats(&self) -> bool {
        self.run_stats.is_some()
    }

    /// A handle to read the in-kernel counters.
    pub fn counters(&self) -> CounterReader {
        self.counters.clone()
    }

    /// Per-tracepoint attach results.
    pub fn attach_status(&self) -> &[AttachStatus] {
        &self.attach
    }

    /// A reader of the programs' run statistics (see [`ProgramStatsReader`]).
    pub fn stats_reader(&self) -> ProgramStatsReader {
        ProgramStatsReader {
            ebpf: self.ebpf.clone(),
        }
    }
}

/// Reads the loaded programs' run statistics through the daemon's own program fds
/// (`BPF_OBJ_GET_INFO_BY_FD`), which needs no capability: it keeps working after the daemon has
/// dropped its privileges, where listing programs by id would need CAP_SYS_ADMIN.
#[derive(Clone)]
pub struct ProgramStatsReader {
    ebpf: Arc<Mutex<Ebpf>>,
}

impl ProgramStatsReader {
    /// The loaded programs' names.
    pub fn names(&self) -> Vec<String> {
        self.ebpf
            .lock()
            .map(|ebpf| ebpf.programs().map(|(name, _)| name.to_string()).collect())
            .unwrap_or_default()
    }

    /// Current statistics, by program name. The kernel only accumulates them while
    /// `kernel.bpf_stats_enabled=1` or a `BPF_ENABLE_STATS` fd is held; otherwise they stay 0.
    pub fn read(&self) -> anyhow::Result<Vec<ProgramStats>> {
        let ebpf = self
            .ebpf
            .lock()
            .map_err(|_| anyhow::anyhow!("the eBPF object lock is poisoned"))?;
        let mut out = Vec::new();
        for (name, prog) in ebpf.programs() {
            let info = prog
                .info()
                .with_context(|| format!("reading the statistics of program {name}"))?;
            out.push(ProgramStats {
                program: name.to_string(),
                run_count: info.run_count(),
                run_time: info.run_time(),
            });
        }
        out.sort_by(|a, b| a.program.cmp(&b.program));
        Ok(out)
    }
}

/// Run statistics of one loaded program. The kernel only accumulates them while
/// `kernel.bpf_stats_enabled=1` (or a `BPF_ENABLE_STATS` fd is held); otherwise they stay 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// Program (function) name in the object.
    pub program: String,
    pub run_count: u64,
    pub run_time: Duration,
}

/// Whether the `kernel.bpf_stats_enabled` sysctl is on. (A `BPF_ENABLE_STATS` fd held by
/// anyone also makes the kernel accumulate statistics, but the sysctl does not show it.)
pub fn bpf_stats_enabled() -> anyhow::Result<bool> {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text.trim() != "0")
}

impl Drop for AttachedPrograms {
    fn drop(&mut self) {
        self.consumer.abort();
        if let Some(l) = &self.logger {
            l.abort();
        }
    }
}

fn attach_one(ebpf: &mut Ebpf, prog: &str, category: &str, event: &str) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| anyhow!("program {prog} not in the object"))?
        .try_into()
        .with_context(|| format!("program {prog} is not a tracepoint"))?;
    program
        .load()
        .with_context(|| format!("loading {prog} (verifier)"))?;
    program
        .attach(category, event)
        .with_context(|| format!("attaching {prog} to {category}:{event}"))?;
    Ok(())
}

/// Drains the ring buffer whenever epoll says it is readable.
async fn consume(
    mut ring: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<PressureEvent>,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(64);
    loop {
        // Drain before waiting: readiness is edge-triggered, and the kernel only wakes us when
        // we have caught up, so anything committed before this point must be read now.
        {
            let rb = ring.get_mut();
            while let Some(item) = rb.next() {
                match decode_record(&item) {
                    Some(ev) => batch.push(ev),
                    // A kernel/ABI mismatch would repeat on every record.
                    None => crate::logging::warn_limited!(
                        len = item.len(),
                        "malformed ring-buffer record skipped"
                    ),
                }
                // `item` is dropped here, which releases its space in the ring.
            }
        }
        for ev in batch.drain(..) {
            if tx.send(ev).await.is_err() {
                return Ok(()); // nobody listens any more
            }
        }
        let mut guard = ring
            .readable_mut()
            .await
            .context("waiting on the ring buffer")?;
        guard.clear_ready();
    }
}

async fn forward_logs(mut fd: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>) {
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(err) => {
                warn!(error = %err, "eBPF log forwarding stopped");
                return;
            }
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Decodes one ring-buffer record; `None` for a short record or an unknown kind.
pub fn decode_record(bytes: &[u8]) -> Option<PressureEvent> {
    if bytes.len() < std::mem::size_of::<PressureRecord>() {
        return None;
    }
    // SAFETY: length checked above; PressureRecord is plain old data valid for any bit pattern,
    // and read_unaligned does not require alignment.
    let rec: PressureRecord =
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PressureRecord>()) };
    event_from_record(&rec)
}

/// Converts a raw record to the tier-independent event.
pub fn event_from_record(rec: &PressureRecord) -> Option<PressureEvent> {
    let kind = RecordKind::from_u32(rec.kind)?;
    let comm_len = rec
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(rec.comm.len());
    Some(PressureEvent {
        ts_ns: rec.ts_ns,
        kind: PressureKind::Kernel(kind),
        pid: rec.pid,
        tgid: rec.tgid,
        comm: String::from_utf8_lossy(&rec.comm[..comm_len]).into_owned(),
        cgroup_id: rec.cgroup_id,
        stall: Duration::from_nanos(rec.stall_ns),
        value: rec.value,
        order: rec.order,
        gfp_flags: rec.gfp_flags,
        events: rec.events.max(1),
    })
}

/// Field offsets for every event this kernel has; absent events/fields stay size 0.
fn field_slots(tracefs: &TraceFs) -> FieldSlots {
    let fmt = |cat: &str, ev: &str| -> Option<EventFormat> {
        if !tracefs.has_event(cat, ev) {
            return None;
        }
        match tracefs.format(cat, ev) {
            Ok(f) => Some(f),
            Err(err) => {
                warn!(event = %format!("{cat}:{ev}"), error = %format!("{err:#}"), "unreadable tracepoint format");
                None
            }
        }
    };
    let memcg_begin = fmt("vmscan", "mm_vmscan_memcg_reclaim_begin");
    let memcg_end = fmt("vmscan", "mm_vmscan_memcg_reclaim_end");
    let kswapd = fmt("vmscan", "mm_vmscan_kswapd_wake");
    let oom = fmt("oom", "mark_victim");
    let memcg_events = fmt("memcg", "count_memcg_events");
    let rss = fmt("kmem", "rss_stat");
    FieldSlots {
        reclaim_begin_order: slot(&memcg_begin, "order"),
        reclaim_begin_gfp: slot(&memcg_begin, "gfp_flags"),
        reclaim_end_nr: slot(&memcg_end, "nr_reclaimed"),
        kswapd_nid: slot(&kswapd, "nid"),
        kswapd_order: slot(&kswapd, "order"),
        oom_pid: slot(&oom, "pid"),
        memcg_id: slot(&memcg_events, "id"),
        memcg_item: slot(&memcg_events, "item"),
        memcg_val: slot(&memcg_events, "val"),
        rss_mm_id: slot(&rss, "mm_id"),
        rss_member: slot(&rss, "member"),
        rss_size: slot(&rss, "size"),
    }
}

/// The slot of `field` in `format`, if it is a readable integer (1, 2, 4 or 8 bytes).
pub fn slot(format: &Option<EventFormat>, field: &str) -> FieldSlot {
    match format.as_ref().and_then(|f| f.field(field)) {
        Some(f) if matches!(f.size, 1 | 2 | 4 | 8) => FieldSlot {
            offset: f.offset,
            size: f.size,
        },
        _ => FieldSlot::default(),
    }
}

fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        // Kernels ≥ 5.11 account BPF memory to the memcg instead; only older ones need this.
        debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracefs::parse_format;

    #[test]
    fn record_layout_matches_the_ebpf_side() {
        assert_eq!(std::mem::size_of::<PressureRecord>(), 80);
        assert_eq!(std::mem::align_of::<PressureRecord>(), 8);
        assert_eq!(std::mem::offset_of!(PressureRecord, ts_ns), 0);
        assert_eq!(std::mem::offset_of!(PressureRecord, kind), 40);
        assert_eq!(std::mem::offset_of!(PressureRecord, events), 56);
        assert_eq!(std::mem::offset_of!(PressureRecord, comm), 64);
        assert_eq!(std::mem::size_of::<KindCounters>(), 32);
        assert_eq!(std::mem::size_of::<FieldSlots>(), 48);
    }

    #[test]
    fn decodes_a_record() {
        let mut rec = PressureRecord {
            ts_ns: 123,
            cgroup_id: 42,
            stall_ns: 5_000,
            value: 32,
            gfp_flags: 0xcc0,
            kind: RecordKind::MemcgReclaimEnd as u32,
            pid: 7,
            tgid: 6,
            order: 0,
            events: 3,
            _pad: 0,
            comm: [0; 16],
        };
        rec.comm[..8].copy_from_slice(b"postgres");
        // SAFETY: viewing a POD struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const PressureRecord).cast::<u8>(),
                std::mem::size_of::<PressureRecord>(),
            )
        };
        let ev = decode_record(bytes).unwrap();
        assert_eq!(ev.kind, PressureKind::Kernel(RecordKind::MemcgReclaimEnd));
        assert_eq!(ev.comm, "postgres");
        assert_eq!(ev.stall, Duration::from_micros(5));
        assert_eq!(
            (ev.pid, ev.tgid, ev.cgroup_id, ev.value, ev.events),
            (7, 6, 42, 32, 3)
        );
        assert!(decode_record(&bytes[..79]).is_none(), "short record");
        rec.kind = 99;
        assert!(event_from_record(&rec).is_none(), "unknown kind");
        rec.kind = RecordKind::OomVictim as u32;
        rec.events = 0;
        assert_eq!(event_from_record(&rec).unwrap().events, 1);
    }

    #[test]
    fn slots_only_for_integer_fields() {
        let f = parse_format(
            "name: mark_victim\nID: 1\nformat:\n\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n",
        )
        .unwrap();
        let f = Some(f);
        assert_eq!(slot(&f, "pid"), FieldSlot { offset: 8, size: 4 });
        assert_eq!(slot(&f, "comm"), FieldSlot::default());
        assert_eq!(slot(&f, "nope"), FieldSlot::default());
        assert_eq!(slot(&None, "pid"), FieldSlot::default());
    }
}
