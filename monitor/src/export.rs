//! `vm-monitor trace export FILE --perfetto OUT.json`: a recording as Chrome trace-event JSON,
//! which the Perfetto UI (and chrome://tracing) opens.
//!
//! - reclaim stalls: complete slices (`ph: X`) on the stalled task (pid = tgid, tid = pid), from
//!   `end − stall` to the `*_end` record's time (the `*_begin` records are not exported
//!   separately; a coalesced record's summed stall is clamped so slices on a thread never
//!   overlap, the real sum stays in `args.stall_us`);
//! - OOM kills (eBPF `oom_victim`, or a `memory.events` oom_kill rise): global instants
//!   (`ph: i`, `s: g`), a line across every track;
//! - other kernel events (kswapd wakes, memcg events, PSI triggers, memory.events changes):
//!   thread instants on their task (no task: pid 0);
//! - the policy (a pseudo-process "vm-monitor"): `UpscaleRequest`s, grants, downscale requests
//!   and results, and decisions as instants; memory readings, memory.high, threshold, usable
//!   memory and file cache as counter tracks (`ph: C`, MiB).
//!
//! Timestamps are CLOCK_BOOTTIME in µs (fractional, so ns survive), the clock of
//! `perf record -k boot` and `trace-cmd record -C boot`, so traces line up.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::pressure::RecordKind;
use crate::record::{Change, EventKind, MarkerKind, Record, Recording};

/// pid of the policy's pseudo-process: above any Linux pid (`pid_max` ≤ 2^22).
pub const POLICY_PID: u64 = 99_999_999;
/// Its one thread, holding the policy's instants.
pub const POLICY_TID: u64 = 1;

/// Counter track names (Perfetto shows `"<name> MiB"`).
pub const TRACK_NON_RECLAIMABLE: &str = "non-reclaimable";
pub const TRACK_CURRENT: &str = "memory.current";
pub const TRACK_MEMORY_HIGH: &str = "memory.high (0 = max)";
pub const TRACK_THRESHOLD: &str = "upscale threshold";
pub const TRACK_USABLE: &str = "usable";
pub const TRACK_FILE_CACHE: &str = "file cache";

/// What an export contains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub slices: usize,
    pub instants: usize,
    pub counters: usize,
    pub metadata: usize,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// The Chrome trace-event JSON object for `rec`.
pub fn perfetto_json(rec: &Recording) -> (Value, ExportSummary) {
    let timeline = rec.timeline();
    let mut summary = ExportSummary::default();
    let mut events: Vec<(u64, Value)> = Vec::new();

    // Task names: a process is named after its main thread when we saw it.
    let mut threads: BTreeMap<(u32, u32), String> = BTreeMap::new();
    let mut processes: BTreeMap<u32, String> = BTreeMap::new();
    for e in rec.events() {
        let (pid, tid) = task(e.tgid, e.pid);
        threads.entry((pid, tid)).or_insert_with(|| e.comm.clone());
        if pid == tid || !processes.contains_key(&pid) {
            processes.insert(pid, e.comm.clone());
        }
    }

    // A task is in one reclaim at a time, so slices on a thread follow each other; a coalesced
    // record's summed stall can reach back over the previous slice and is clamped to start at
    // its end (Perfetto drops partially overlapping slices).
    let mut last_end: HashMap<(u32, u32), u64> = HashMap::new();
    for s in &timeline.stalls {
        let (pid, tid) = task(s.tgid, s.pid);
        let mut begin = s.end_ns.saturating_sub(s.stall_ns);
        if let Some(&prev) = last_end.get(&(pid, tid)) {
            begin = begin.max(prev.min(s.end_ns));
        }
        last_end.insert((pid, tid), s.end_ns);
        events.push((
            begin,
            json!({
                "name": if s.memcg { "memcg reclaim" } else { "direct reclaim" },
                "cat": "vmscan",
                "ph": "X",
                "ts": us(begin),
                "dur": us(s.end_ns - begin),
                "pid": pid,
                "tid": tid,
                "args": {
                    "stall_us": us(s.stall_ns),
                    "nr_reclaimed": s.nr_reclaimed,
                    "coalesced_events": s.events,
                },
            }),
        ));
        summary.slices += 1;
    }

    // Kernel events other than reclaim (begins are covered by their end's slice).
    for e in rec.events() {
        let (pid, tid) = task(e.tgid, e.pid);
        let (name, scope, args) = match (&e.kind, e.kind.record_kind()) {
            (_, Some(RecordKind::MemcgReclaimBegin | RecordKind::DirectReclaimBegin)) => continue,
            (_, Some(RecordKind::MemcgReclaimEnd | RecordKind::DirectReclaimEnd))
                if e.stall_ns > 0 =>
            {
                continue;
            }
            // Exported with the timeline's OOM markers below.
            (_, Some(RecordKind::OomVictim)) => continue,
            (_, Some(RecordKind::KswapdWake)) => (
                "kswapd wake".to_string(),
                "t",
                json!({"nid": e.value, "order": e.order, "events": e.events}),
            ),
            (_, Some(RecordKind::MemcgEvents)) => (
                "memcg event".to_string(),
                "t",
                json!({"item": e.order, "count": e.value, "cgroup_id": e.cgroup_id, "events": e.events}),
            ),
            (
                EventKind::MemoryEvents {
                    high,
                    max,
                    oom,
                    oom_kill,
                },
                _,
            ) => (
                "memory.events".to_string(),
                "t",
                json!({"high": high, "max": max, "oom": oom, "oom_kill": oom_kill}),
            ),
            (
                EventKind::PolledSample {
                    avg_non_reclaimable,
                    samples,
                },
                _,
            ) => (
                "poll sample".to_string(),
                "t",
                json!({"avg_non_reclaimable_mib": mib(*avg_non_reclaimable), "samples": samples}),
            ),
            (kind, _) => (
                kind.name().replace('_', " "),
                "t",
                json!({"value": e.value, "order": e.order, "events": e.events}),
            ),
        };
        events.push((
            e.ts_ns,
            json!({"name": name, "cat": "pressure", "ph": "i", "s": scope, "ts": us(e.ts_ns),
                   "pid": pid, "tid": tid, "args": args}),
        ));
        summary.instants += 1;
    }

    for m in &timeline.markers {
        let (name, scope, args) = match &m.what {
            MarkerKind::OomKill { victim_pid } => (
                "OOM kill".to_string(),
                "g",
                json!({"victim_pid": victim_pid, "detail": m.detail}),
            ),
            MarkerKind::UpscaleRequest => (
                "UpscaleRequest".to_string(),
                "t",
                json!({"reason": m.detail}),
            ),
            MarkerKind::UpscaleGranted { granted } => (
                "upscale granted".to_string(),
                "t",
                json!({"granted_mib": mib(*granted), "detail": m.detail}),
            ),
            MarkerKind::DownscaleRequest { target } => (
                "downscale request".to_string(),
                "t",
                json!({"target_mib": mib(*target), "detail": m.detail}),
            ),
            MarkerKind::DownscaleResult { ok } => (
                if *ok {
                    "downscale approved"
                } else {
                    "downscale denied"
                }
                .to_string(),
                "t",
                json!({"status": m.detail}),
            ),
            MarkerKind::Decision { kind } => (
                format!("decision: {kind}"),
                "t",
                json!({"detail": m.detail}),
            ),
        };
        events.push((
            m.ts_ns,
            json!({"name": name, "cat": "policy", "ph": "i", "s": scope, "ts": us(m.ts_ns),
                   "pid": POLICY_PID, "tid": POLICY_TID, "args": args}),
        ));
        summary.instants += 1;
    }
    for r in &rec.records {
        if let Record::Dropped { at_ns, total } = r {
            events.push((
                *at_ns,
                json!({"name": "recorder dropped records", "cat": "recorder", "ph": "i", "s": "g",
                       "ts": us(*at_ns), "pid": POLICY_PID, "tid": POLICY_TID,
                       "args": {"total_dropped": total}}),
            ));
            summary.instants += 1;
        }
    }

    // Counter tracks.
    let mut counter = |name: &str, series: &[Change<u64>]| {
        for c in series {
            events.push((
                c.ts_ns,
                json!({"name": name, "cat": "memory", "ph": "C", "ts": us(c.ts_ns),
                       "pid": POLICY_PID, "args": {"MiB": mib(c.value)}}),
            ));
            summary.counters += 1;
        }
    };
    counter(TRACK_NON_RECLAIMABLE, &timeline.non_reclaimable);
    counter(TRACK_CURRENT, &timeline.current);
    counter(TRACK_THRESHOLD, &timeline.threshold);
    counter(TRACK_USABLE, &timeline.usable);
    counter(TRACK_FILE_CACHE, &timeline.file_cache);
    let high: Vec<Change<u64>> = timeline
        .memory_high
        .iter()
        .map(|c| Change {
            ts_ns: c.ts_ns,
            value: c.value.unwrap_or(0),
        })
        .collect();
    counter(TRACK_MEMORY_HIGH, &high);

    events.sort_by_key(|(ts, _)| *ts);

    let mut meta = vec![
        json!({"name": "process_name", "ph": "M", "pid": POLICY_PID,
               "args": {"name": policy_name(rec)}}),
        json!({"name": "process_sort_index", "ph": "M", "pid": POLICY_PID,
               "args": {"sort_index": -1}}),
        json!({"name": "thread_name", "ph": "M", "pid": POLICY_PID, "tid": POLICY_TID,
               "args": {"name": "decisions"}}),
    ];
    for (pid, comm) in &processes {
        let name = if *pid == 0 {
            "no task (kernel/irq context)".to_string()
        } else {
            format!("{} {pid}", or_unknown(comm))
        };
        meta.push(json!({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}));
    }
    for ((pid, tid), comm) in &threads {
        meta.push(
            json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"name": format!("{} {tid}", or_unknown(comm))}}),
        );
    }
    summary.metadata = meta.len();

    let mut trace_events = meta;
    trace_events.extend(events.into_iter().map(|(_, v)| v));
    let h = &rec.header;
    let other = json!({
        "source": "vm-monitor recording",
        "format_version": h.format_version,
        "vm_monitor_version": h.vm_monitor_version,
        "kernel_release": h.kernel_release,
        "tier": h.tier.map(|t| t.to_string()),
        "cgroup": h.cgroup.as_ref().map(|c| format!("{} (id {})", c.name, c.id)),
        "clock": h.clock,
        "start_boot_ns": h.start_boot_ns,
        "start_unix_ns": h.start_unix_ns,
        "run_id": h.run_id,
        "warnings": rec.warnings(),
    });
    (
        json!({"traceEvents": trace_events, "displayTimeUnit": "ms", "otherData": other}),
        summary,
    )
}

fn or_unknown(comm: &str) -> &str {
    if comm.is_empty() { "?" } else { comm }
}

fn policy_name(rec: &Recording) -> String {
    match &rec.header.cgroup {
        Some(c) => format!("vm-monitor (cgroup {})", c.name),
        None => "vm-monitor".to_string(),
    }
}

/// pid/tid for the trace: the kernel's tgid is the process, its pid the thread.
fn task(tgid: u32, pid: u32) -> (u32, u32) {
    if tgid == 0 { (pid, pid) } else { (tgid, pid) }
}

/// Writes the Perfetto JSON for `rec` to `out`.
pub fn write_perfetto(rec: &Recording, out: &Path) -> anyhow::Result<ExportSummary> {
    let (json, summary) = perfetto_json(rec);
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut w, &json).with_context(|| format!("writing {}", out.display()))?;
    std::io::Write::flush(&mut w).with_context(|| format!("writing {}", out.display()))?;
    Ok(summary)
}
