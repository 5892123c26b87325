//! `vm-monitor trace`: live pressure events for kernel developers, one line per record, and a
//! per-kind summary with the in-kernel counters (coalesced, dropped) on exit.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use monitor_ebpf::{KindCounters, RecordKind};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::cgroup::{CgroupMemory, CgroupTarget};
use crate::cli::{ExportArgs, PlotArgs, TraceArgs, TraceCommand};
use crate::pressure::ebpf::{EbpfOptions, EbpfPipeline, ProgramStats};
use crate::pressure::{PressureEvent, PressureKind, Tier, boottime_ns};
use crate::record::{
    CgroupInfo, Header, KernelKindCounters, ReadSummary, ReadingRecord, Record, Recorder,
};

/// One event as printed with `--json` and written to `--output`.
#[derive(Debug, Serialize)]
pub struct EventLine<'a> {
    pub ts_ns: u64,
    pub kind: &'a str,
    pub pid: u32,
    pub tgid: u32,
    pub comm: &'a str,
    pub cgroup_id: u64,
    pub stall_us: u64,
    pub value: u64,
    pub order: i32,
    pub gfp_flags: u64,
    pub events: u32,
}

impl<'a> From<&'a PressureEvent> for EventLine<'a> {
    fn from(ev: &'a PressureEvent) -> Self {
        EventLine {
            ts_ns: ev.ts_ns,
            kind: ev.kind_name(),
            pid: ev.pid,
            tgid: ev.tgid,
            comm: &ev.comm,
            cgroup_id: ev.cgroup_id,
            stall_us: ev.stall.as_micros() as u64,
            value: ev.value,
            order: ev.order,
            gfp_flags: ev.gfp_flags,
            events: ev.events,
        }
    }
}

/// The aligned text form of one event.
pub fn format_text(ev: &PressureEvent) -> String {
    let payload = match &ev.kind {
        PressureKind::Kernel(RecordKind::MemcgReclaimBegin | RecordKind::DirectReclaimBegin) => {
            format!("order={} gfp=0x{:x}", ev.order, ev.gfp_flags)
        }
        PressureKind::Kernel(RecordKind::MemcgReclaimEnd | RecordKind::DirectReclaimEnd) => {
            format!("nr_reclaimed={}", ev.value)
        }
        PressureKind::Kernel(RecordKind::KswapdWake) => {
            format!("nid={} order={}", ev.value, ev.order)
        }
        PressureKind::Kernel(RecordKind::OomVictim) => format!("victim_pid={}", ev.value),
        PressureKind::Kernel(RecordKind::MemcgEvents) => {
            format!("item={} val={}", ev.order, ev.value)
        }
        PressureKind::Kernel(RecordKind::GrowthHint) => {
            format!("member={} cpu_total={}KiB", ev.order, ev.value >> 10)
        }
        other => format!("{other:?}"),
    };
    format!(
        "{:>14.6} {:<21} {:>7} {:<16} {:>8} {:<28} {:>9} x{}",
        ev.ts_ns as f64 / 1e9,
        ev.kind_name(),
        ev.pid,
        ev.comm,
        ev.cgroup_id,
        payload,
        format!("{}us", ev.stall.as_micros()),
        ev.events
    )
}

/// Per-kind totals seen by this run.
#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct Seen {
    /// Records received.
    pub records: u64,
    /// Events those records represent (after in-kernel coalescing).
    pub events: u64,
}

/// Streams events until Ctrl-C/SIGTERM or `--duration`, then prints the summary; or runs
/// `trace export` / `trace plot` on a recording.
pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    match &args.command {
        Some(TraceCommand::Export(a)) => return export(a),
        Some(TraceCommand::Plot(a)) => return plot(a),
        None => {}
    }
    let target = match &args.cgroup {
        Some(name) => Some(CgroupTarget::resolve(name)?),
        None => None,
    };
    let pipeline = EbpfPipeline::load(&EbpfOptions {
        target: target.clone(),
        coalesce: Duration::from_millis(args.coalesce_ms),
        run_stats: args.bpf_stats,
    })?;
    let mut recording = match &args.record {
        Some(path) => Some(LiveRecording::start(
            path,
            target.as_ref(),
            args.coalesce_ms,
        )?),
        None => None,
    };
    let (tx, mut rx) = mpsc::channel(4096);
    let running = pipeline.start(tx)?;
    let mut out_file = match &args.output {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    // Listening before we announce readiness: Ctrl-C right after must still print the summary.
    let stop = crate::daemon::shutdown_signal();
    eprintln!(
        "tracing: {} (Ctrl-C to stop)",
        running
            .attach_status()
            .iter()
            .map(|a| format!("{} {}", a.tracepoint, a.state))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !args.json {
        println!(
            "{:>14} {:<21} {:>7} {:<16} {:>8} {:<28} {:>9} EVENTS",
            "TIME(s)", "KIND", "PID", "COMM", "CGROUP", "PAYLOAD", "STALL"
        );
    }

    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    tokio::pin!(stop);
    let mut seen: BTreeMap<&'static str, Seen> = BTreeMap::new();
    let mut stdout = std::io::stdout().lock();
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = &mut stop => break,
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                let s = seen.entry(ev.kind_name()).or_default();
                s.records += 1;
                s.events += u64::from(ev.events);
                if args.json {
                    serde_json::to_writer(&mut stdout, &EventLine::from(&ev)).context("writing to stdout")?;
                    writeln!(stdout).context("writing to stdout")?;
                } else {
                    writeln!(stdout, "{}", format_text(&ev)).context("writing to stdout")?;
                }
                if let Some(f) = out_file.as_mut() {
                    serde_json::to_writer(&mut *f, &EventLine::from(&ev)).context("writing the output file")?;
                    writeln!(f).context("writing the output file")?;
                }
                if let Some(r) = recording.as_mut() {
                    r.event(&ev);
                }
                // Flush when caught up, so a pipe reader sees events promptly without a flush
                // per line during storms; the cgroup is read once per such burst.
                if rx.is_empty() {
                    stdout.flush().context("flushing stdout")?;
                    if let Some(r) = recording.as_mut() {
                        r.burst_done();
                    }
                }
            }
        }
    }
    // Let records already committed reach us before the summary.
    tokio::time::sleep(Duration::from_millis(20)).await;
    while let Ok(ev) = rx.try_recv() {
        let s = seen.entry(ev.kind_name()).or_default();
        s.records += 1;
        s.events += u64::from(ev.events);
        if let Some(r) = recording.as_mut() {
            r.event(&ev);
        }
    }
    if let Some(mut f) = out_file {
        f.flush().context("flushing the output file")?;
    }
    let counters = running.counters().snapshot()?;
    if let Some(mut r) = recording {
        r.burst_done();
        r.finish(&counters)?;
    }
    let programs = if running.run_stats_enabled() {
        running.stats_reader().read()?
    } else {
        Vec::new()
    };
    if args.json {
        let json = serde_json::json!({
            "summary": counters.iter().map(|(k, c)| (k.name().to_string(), serde_json::json!({
                "received_records": seen.get(k.name()).map(|s| s.records).unwrap_or(0),
                "received_events": seen.get(k.name()).map(|s| s.events).unwrap_or(0),
                "seen": c.seen, "emitted": c.emitted, "coalesced": c.coalesced, "dropped": c.dropped,
            }))).collect::<serde_json::Map<_, _>>(),
            "programs": programs.iter().map(|p| serde_json::json!({
                "program": p.program,
                "run_count": p.run_count,
                "run_time_ns": u64::try_from(p.run_time.as_nanos()).unwrap_or(u64::MAX),
            })).collect::<Vec<_>>(),
        });
        writeln!(stdout, "{json}").context("writing to stdout")?;
    } else {
        write!(stdout, "{}", render_summary(&seen, &counters)).context("writing to stdout")?;
        if !programs.is_empty() {
            write!(stdout, "{}", render_program_stats(&programs)).context("writing to stdout")?;
        }
    }
    stdout.flush().context("flushing stdout")?;
    Ok(())
}

/// Summary table: what we received per kind next to the kernel's own counters.
pub fn render_summary(
    seen: &BTreeMap<&'static str, Seen>,
    counters: &BTreeMap<RecordKind, KindCounters>,
) -> String {
    let mut s = format!(
        "\n{:<21} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "KIND", "RECORDS", "EVENTS", "SEEN", "EMITTED", "COALESCED", "DROPPED"
    );
    for (kind, c) in counters {
        let got = seen.get(kind.name()).copied().unwrap_or_default();
        s.push_str(&format!(
            "{:<21} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            kind.name(),
            got.records,
            got.events,
            c.seen,
            c.emitted,
            c.coalesced,
            c.dropped
        ));
    }
    s
}

/// Per-program run statistics (`--bpf-stats`): runs, total time and the cost of one run.
pub fn render_program_stats(programs: &[ProgramStats]) -> String {
    let mut s = format!(
        "\n{:<28} {:>12} {:>14} {:>12}\n",
        "PROGRAM", "RUNS", "RUN TIME (ms)", "NS PER RUN"
    );
    for p in programs {
        let per_run = match p.run_count {
            0 => "-".to_string(),
            n => format!("{:.0}", p.run_time.as_nanos() as f64 / n as f64),
        };
        s.push_str(&format!(
            "{:<28} {:>12} {:>14.3} {:>12}\n",
            p.program,
            p.run_count,
            p.run_time.as_secs_f64() * 1e3,
            per_run
        ));
    }
    s
}

/// `trace --record`: events plus the cgroup's memory read once per burst of events.
struct LiveRecording {
    path: std::path::PathBuf,
    recorder: Recorder,
    memory: Option<CgroupMemory>,
    burst_pending: bool,
}

impl LiveRecording {
    fn start(
        path: &std::path::Path,
        target: Option<&CgroupTarget>,
        coalesce_ms: u64,
    ) -> anyhow::Result<LiveRecording> {
        let memory = match target {
            Some(t) => match CgroupMemory::open(t) {
                Ok(m) => Some(m),
                Err(err) => {
                    eprintln!("warning: recording without memory readings: {err:#}");
                    None
                }
            },
            None => None,
        };
        let header = Header::new(
            "trace",
            Some(Tier::Ebpf),
            target.map(CgroupInfo::from),
            None,
            Some(coalesce_ms),
        );
        let recorder = Recorder::create(path, header)?;
        let mut rec = LiveRecording {
            path: path.to_path_buf(),
            recorder,
            memory,
            burst_pending: false,
        };
        // A reading at the start gives the plot its baseline.
        rec.burst_pending = true;
        rec.burst_done();
        Ok(rec)
    }

    fn event(&mut self, ev: &PressureEvent) {
        self.recorder.record_event(ev);
        self.burst_pending = true;
    }

    /// Takes the burst's reading (like the engine: one `memory.stat` read per burst).
    fn burst_done(&mut self) {
        if !std::mem::take(&mut self.burst_pending) {
            return;
        }
        let Some(mem) = &self.memory else { return };
        self.recorder.record_reading(ReadingRecord {
            ts_ns: boottime_ns(),
            non_reclaimable: mem.stat().ok().map(|s| s.non_reclaimable()),
            current: mem.current().ok(),
            memory_high: mem.high().ok(),
        });
    }

    fn finish(self, counters: &BTreeMap<RecordKind, KindCounters>) -> anyhow::Result<()> {
        self.recorder.record(Record::KernelCounters {
            at_ns: boottime_ns(),
            kinds: counters
                .iter()
                .map(|(k, c)| KernelKindCounters {
                    kind: *k as u32,
                    seen: c.seen,
                    emitted: c.emitted,
                    coalesced: c.coalesced,
                    dropped: c.dropped,
                })
                .collect(),
        });
        let stats = self.recorder.finish()?;
        eprintln!(
            "recorded {} records to {}{}",
            stats.records,
            self.path.display(),
            if stats.dropped > 0 {
                format!(" ({} dropped: the writer could not keep up)", stats.dropped)
            } else {
                String::new()
            }
        );
        Ok(())
    }
}

/// Problems with a file already name it.
fn print_warnings(read: &ReadSummary) {
    for w in read.warnings() {
        eprintln!("warning: {w}");
    }
}

/// `trace export FILE --perfetto OUT.json`: streams, so any size of recording can be exported.
fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let (s, read) = crate::export::export_file(&args.file, &args.perfetto)?;
    print_warnings(&read);
    eprintln!(
        "wrote {}: {} reclaim slices, {} instants, {} counter samples (open it in the Perfetto \
         UI or chrome://tracing)",
        args.perfetto.display(),
        s.slices,
        s.instants,
        s.counters
    );
    if s.unnamed_tasks > 0 {
        eprintln!(
            "note: tasks beyond the first {} are exported without names",
            crate::export::MAX_TASKS
        );
    }
    Ok(())
}

/// `trace plot FILE -o OUT.svg`.
fn plot(args: &PlotArgs) -> anyhow::Result<()> {
    let (stats, read) = crate::plot::plot_file(&args.file, &args.output)?;
    print_warnings(&read);
    eprintln!("wrote {}", args.output.display());
    if stats.thinned {
        eprintln!(
            "note: series longer than {} points were thinned to at most {} points each \
             (each stretch keeps its first, lowest, highest and last point)",
            crate::plot::MAX_SERIES_POINTS / 2,
            crate::plot::MAX_SERIES_POINTS
        );
    }
    Ok(())
}
