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
//!
//! The export streams: records are read one at a time (through [`TimeOrdered`]'s bounded
//! window), and every trace event is serialised on its own and written out at once, so no
//! document is ever built in memory. What it keeps besides is one entry per task for its name
//! and slice clamping, at most [`MAX_TASKS`] of them (later tasks go unnamed and unclamped).
//! Task names are written after the events (viewers read metadata anywhere), the recording's
//! warnings last, in `otherData`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::pressure::RecordKind;
use crate::record::{
    EventKind, EventRecord, Header, MarkerKind, ReadSummary, Record, Recording, RecordingReader,
    Series, TimeOrdered, TimelineBuilder, TimelineItem,
};

/// pid of the policy's pseudo-process: above any Linux pid (`pid_max` ≤ 2^22).
pub const POLICY_PID: u64 = 99_999_999;
/// Its one thread, holding the policy's instants.
pub const POLICY_TID: u64 = 1;
/// Tasks (pid, tid) whose names and last slice end are kept.
pub const MAX_TASKS: usize = 1 << 16;

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
    /// Tasks beyond [`MAX_TASKS`]: their events are exported, their names are not.
    pub unnamed_tasks: u64,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn track(series: Series) -> &'static str {
    match series {
        Series::NonReclaimable => TRACK_NON_RECLAIMABLE,
        Series::Current => TRACK_CURRENT,
        Series::Threshold => TRACK_THRESHOLD,
        Series::Usable => TRACK_USABLE,
        Series::FileCache => TRACK_FILE_CACHE,
    }
}

#[derive(Default)]
struct Task {
    comm: String,
    /// End of its last reclaim slice, ns.
    last_end: Option<u64>,
}

/// Writes Chrome trace-event JSON while records are fed to it in time order: each event goes
/// to `out` as soon as its record is seen. Call [`PerfettoWriter::finish`] to close the
/// document.
pub struct PerfettoWriter<W: Write> {
    out: W,
    header: Header,
    builder: TimelineBuilder,
    items: Vec<TimelineItem>,
    tasks: BTreeMap<(u32, u32), Task>,
    processes: BTreeMap<u32, String>,
    summary: ExportSummary,
    /// Nothing written into `traceEvents` yet (no comma needed).
    first: bool,
}

impl<W: Write> PerfettoWriter<W> {
    /// Opens the document and writes the policy pseudo-process's names.
    pub fn new(out: W, header: &Header) -> io::Result<Self> {
        let mut w = PerfettoWriter {
            out,
            header: header.clone(),
            builder: TimelineBuilder::default(),
            items: Vec::new(),
            tasks: BTreeMap::new(),
            processes: BTreeMap::new(),
            summary: ExportSummary::default(),
            first: true,
        };
        w.out
            .write_all(b"{\"displayTimeUnit\":\"ms\",\"traceEvents\":[")?;
        let name = match &header.cgroup {
            Some(c) => format!("vm-monitor (cgroup {})", c.name),
            None => "vm-monitor".to_string(),
        };
        w.meta(
            &json!({"name": "process_name", "ph": "M", "pid": POLICY_PID,
                       "args": {"name": name}}),
        )?;
        w.meta(
            &json!({"name": "process_sort_index", "ph": "M", "pid": POLICY_PID,
                       "args": {"sort_index": -1}}),
        )?;
        w.meta(
            &json!({"name": "thread_name", "ph": "M", "pid": POLICY_PID, "tid": POLICY_TID,
                       "args": {"name": "decisions"}}),
        )?;
        Ok(w)
    }

    /// The output.
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// Writes one event of `traceEvents`.
    fn emit(&mut self, event: &Value) -> io::Result<()> {
        if !self.first {
            self.out.write_all(b",")?;
        }
        self.first = false;
        serde_json::to_writer(&mut self.out, event)?;
        Ok(())
    }

    fn meta(&mut self, event: &Value) -> io::Result<()> {
        self.summary.metadata += 1;
        self.emit(event)
    }

    fn instant(&mut self, event: &Value) -> io::Result<()> {
        self.summary.instants += 1;
        self.emit(event)
    }

    /// One record; feed them in time order ([`TimeOrdered`], [`Recording::time_ordered`]).
    pub fn record(&mut self, r: &Record) -> io::Result<()> {
        match r {
            Record::Event(e) => {
                self.task_seen(e);
                self.event(e)?;
            }
            Record::Dropped { at_ns, total } => {
                self.instant(
                    &json!({"name": "recorder dropped records", "cat": "recorder",
                    "ph": "i", "s": "g", "ts": us(*at_ns), "pid": POLICY_PID, "tid": POLICY_TID,
                    "args": {"total_dropped": total}}),
                )?;
            }
            _ => {}
        }
        let mut items = std::mem::take(&mut self.items);
        self.builder.feed(r, &mut items);
        let written = items.drain(..).try_for_each(|item| self.item(item));
        self.items = items;
        written
    }

    /// Notes a task's name: a process is named after its main thread when we saw it.
    fn task_seen(&mut self, e: &EventRecord) {
        let (pid, tid) = task(e.tgid, e.pid);
        if !self.tasks.contains_key(&(pid, tid)) {
            if self.tasks.len() >= MAX_TASKS {
                self.summary.unnamed_tasks += 1;
                return;
            }
            self.tasks.insert(
                (pid, tid),
                Task {
                    comm: e.comm.clone(),
                    last_end: None,
                },
            );
        }
        if pid == tid || !self.processes.contains_key(&pid) {
            self.processes.insert(pid, e.comm.clone());
        }
    }

    /// Kernel events other than reclaim (begins are covered by their end's slice).
    fn event(&mut self, e: &EventRecord) -> io::Result<()> {
        let (pid, tid) = task(e.tgid, e.pid);
        let (name, args) = match (&e.kind, e.kind.record_kind()) {
            (_, Some(RecordKind::MemcgReclaimBegin | RecordKind::DirectReclaimBegin)) => {
                return Ok(());
            }
            (_, Some(RecordKind::MemcgReclaimEnd | RecordKind::DirectReclaimEnd))
                if e.stall_ns > 0 =>
            {
                return Ok(());
            }
            // Exported with the timeline's OOM markers.
            (_, Some(RecordKind::OomVictim)) => return Ok(()),
            (_, Some(RecordKind::KswapdWake)) => (
                "kswapd wake".to_string(),
                json!({"nid": e.value, "order": e.order, "events": e.events}),
            ),
            (_, Some(RecordKind::MemcgEvents)) => (
                "memcg event".to_string(),
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
                json!({"avg_non_reclaimable_mib": mib(*avg_non_reclaimable), "samples": samples}),
            ),
            (kind, _) => (
                kind.name().replace('_', " "),
                json!({"value": e.value, "order": e.order, "events": e.events}),
            ),
        };
        self.instant(
            &json!({"name": name, "cat": "pressure", "ph": "i", "s": "t",
            "ts": us(e.ts_ns), "pid": pid, "tid": tid, "args": args}),
        )
    }

    fn item(&mut self, item: TimelineItem) -> io::Result<()> {
        match item {
            TimelineItem::Stall(s) => {
                // A task is in one reclaim at a time, so slices on a thread follow each other;
                // a coalesced record's summed stall can reach back over the previous slice and
                // is clamped to start at its end (Perfetto drops partially overlapping slices).
                let (pid, tid) = task(s.tgid, s.pid);
                let mut begin = s.end_ns.saturating_sub(s.stall_ns);
                if let Some(t) = self.tasks.get_mut(&(pid, tid)) {
                    if let Some(prev) = t.last_end {
                        begin = begin.max(prev.min(s.end_ns));
                    }
                    t.last_end = Some(s.end_ns);
                }
                self.summary.slices += 1;
                self.emit(&json!({
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
                }))
            }
            TimelineItem::Marker(m) => {
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
                self.instant(
                    &json!({"name": name, "cat": "policy", "ph": "i", "s": scope,
                    "ts": us(m.ts_ns), "pid": POLICY_PID, "tid": POLICY_TID, "args": args}),
                )
            }
            TimelineItem::Change(series, c) => self.counter(track(series), c.ts_ns, c.value),
            TimelineItem::MemoryHigh(c) => {
                self.counter(TRACK_MEMORY_HIGH, c.ts_ns, c.value.unwrap_or(0))
            }
        }
    }

    fn counter(&mut self, name: &str, ts_ns: u64, bytes: u64) -> io::Result<()> {
        self.summary.counters += 1;
        self.emit(
            &json!({"name": name, "cat": "memory", "ph": "C", "ts": us(ts_ns),
                          "pid": POLICY_PID, "args": {"MiB": mib(bytes)}}),
        )
    }

    /// Writes the task names and `otherData` (with `warnings`), closes the document and
    /// flushes.
    pub fn finish(mut self, warnings: &[String]) -> io::Result<(W, ExportSummary)> {
        for (pid, comm) in std::mem::take(&mut self.processes) {
            let name = if pid == 0 {
                "no task (kernel/irq context)".to_string()
            } else {
                format!("{} {pid}", or_unknown(&comm))
            };
            self.meta(&json!({"name": "process_name", "ph": "M", "pid": pid,
                              "args": {"name": name}}))?;
        }
        for ((pid, tid), t) in std::mem::take(&mut self.tasks) {
            self.meta(
                &json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                              "args": {"name": format!("{} {tid}", or_unknown(&t.comm))}}),
            )?;
        }
        let h = &self.header;
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
            "unnamed_tasks": self.summary.unnamed_tasks,
            "warnings": warnings,
        });
        self.out.write_all(b"],\"otherData\":")?;
        serde_json::to_writer(&mut self.out, &other)?;
        self.out.write_all(b"}\n")?;
        self.out.flush()?;
        Ok((self.out, self.summary))
    }
}

fn or_unknown(comm: &str) -> &str {
    if comm.is_empty() { "?" } else { comm }
}

/// pid/tid for the trace: the kernel's tgid is the process, its pid the thread.
fn task(tgid: u32, pid: u32) -> (u32, u32) {
    if tgid == 0 { (pid, pid) } else { (tgid, pid) }
}

/// Writes the trace-event JSON of a loaded recording to `out`.
pub fn write_trace<W: Write>(rec: &Recording, out: W) -> io::Result<(W, ExportSummary)> {
    let mut w = PerfettoWriter::new(out, &rec.header)?;
    for r in rec.time_ordered() {
        w.record(r)?;
    }
    w.finish(&rec.warnings())
}

/// Writes the Perfetto JSON for a loaded recording to the file `out`.
pub fn write_perfetto(rec: &Recording, out: &Path) -> anyhow::Result<ExportSummary> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    write_trace(rec, BufWriter::new(file))
        .map(|(_, s)| s)
        .with_context(|| format!("writing {}", out.display()))
}

/// Whether `a` and `b` name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// `trace export`: reads the recording at `input` (a file or a `--record-dir` directory) and
/// writes its trace-event JSON to `output` while reading, in memory bounded by the reorder
/// window and [`MAX_TASKS`], not by the recording. Returns what was written and what reading
/// found (its warnings are also in the output's `otherData`).
pub fn export_file(input: &Path, output: &Path) -> anyhow::Result<(ExportSummary, ReadSummary)> {
    let mut reader = RecordingReader::open(input)?;
    // Creating the output truncates it: it must not be what is being read.
    if reader.planned_paths().iter().any(|p| same_file(p, output)) {
        bail!(
            "{} is part of the recording being exported; choose another output file",
            output.display()
        );
    }
    let file = File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let writing = || format!("writing {}", output.display());
    let mut w = PerfettoWriter::new(BufWriter::new(file), &reader.header().clone())
        .with_context(writing)?;
    for r in TimeOrdered::new(&mut reader) {
        w.record(&r).with_context(writing)?;
    }
    let read = reader.into_summary();
    let (_, summary) = w.finish(&read.warnings()).with_context(writing)?;
    Ok((summary, read))
}
