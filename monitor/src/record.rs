//! Recordings: a compact, versioned file of pressure events, cgroup readings and the policy's
//! inputs and actions, written by `vm-monitor trace --record` (and by the daemon through
//! [`Recorder`] / [`RollingRecorder`]), read by `trace export`, `trace plot` and `replay`.
//!
//! # File format (version 1)
//!
//! ```text
//! b"VMMONREC"        8-byte magic
//! u16 LE             format version (FORMAT_VERSION)
//! frame              header: JSON (`Header`), readable with `strings`/`head -c`
//! frame ...          records: MessagePack (`Record`), structs as arrays
//! frame = u32 LE payload length | u32 LE CRC-32 (IEEE) of the payload | payload
//! ```
//!
//! Every frame is self-delimiting and checksummed, so a reader stops cleanly at a truncated or
//! damaged frame and everything before it stays usable; a frame whose checksum is right but
//! whose record is unknown is skipped and reported. Times are CLOCK_BOOTTIME nanoseconds (the
//! clock eBPF stamps events with, and perf/trace-cmd's `boot` clock); policy inputs carry the
//! same clock as a `Duration`. A clean end is marked by [`Record::End`]; a file without one was
//! cut short (crash, power loss, kill -9) and says so when read.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::backend::ScalingOutcome;
use crate::cgroup::CgroupTarget;
use crate::memstat::MemoryHigh;
use crate::policy::{Action, Config, Effect, Input};
use crate::pressure::{PressureEvent, PressureKind, RecordKind, Tier, boottime_ns, kind_names};

/// First bytes of every recording.
pub const MAGIC: [u8; 8] = *b"VMMONREC";
/// The format this build writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;
/// File-name extension of recordings (rolling segments use it; single files may use any).
pub const EXTENSION: &str = "vmrec";
/// Largest frame a reader accepts: far above any real record, small enough that a damaged
/// length field cannot make the reader allocate gigabytes.
pub const MAX_FRAME_BYTES: u32 = 16 << 20;
/// The clock every timestamp in a recording uses.
pub const CLOCK: &str = "CLOCK_BOOTTIME";

const PREAMBLE_BYTES: usize = MAGIC.len() + 2;
const FRAME_HEADER_BYTES: usize = 8;
/// Capacity of the recorder's queue; beyond it records are dropped and counted, never waited for.
const QUEUE_CAPACITY: usize = 8192;
/// Records written between flushes while the queue never empties.
const FLUSH_EVERY: usize = 1024;
/// Room kept at the end of a rolling segment for its [`Record::End`].
const END_RESERVE: u64 = 64;
/// File-name prefix of rolling segments.
const ROLLING_PREFIX: &str = "vm-monitor-";

/// Everything a reader needs to know before the first record (JSON in the file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Same as the binary version in the preamble.
    pub format_version: u16,
    /// `vm-monitor` version that wrote the file.
    pub vm_monitor_version: String,
    /// What recorded: `trace` (events and readings only) or `daemon` (also policy steps).
    pub source: String,
    /// `uname -r` of the recording machine.
    pub kernel_release: String,
    /// Pressure signal tier that produced the events.
    #[serde(default)]
    pub tier: Option<Tier>,
    /// The watched cgroup.
    #[serde(default)]
    pub cgroup: Option<CgroupInfo>,
    /// Policy configuration (daemon recordings; `replay` builds its policy from it).
    #[serde(default)]
    pub policy: Option<Config>,
    /// In-kernel coalescing window, ms.
    #[serde(default)]
    pub coalesce_ms: Option<u64>,
    /// Always [`CLOCK`].
    pub clock: String,
    /// CLOCK_BOOTTIME when recording started, ns.
    pub start_boot_ns: u64,
    /// Wall clock (Unix time) when recording started, ns: maps boot-clock times to dates.
    pub start_unix_ns: u64,
    /// Identifies one recording run; rolling segments of a run share it.
    pub run_id: String,
    /// Position of this file in its run (0 = the run's beginning).
    #[serde(default)]
    pub segment: u32,
    /// Set by the reader when `policy` was present but this build cannot read it (a field was
    /// added or renamed since): the rest of the recording stays readable, replay is refused.
    #[serde(skip)]
    pub policy_error: Option<String>,
}

/// The watched cgroup as the kernel identifies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupInfo {
    /// Name relative to /sys/fs/cgroup.
    pub name: String,
    /// cgroup v2 id (kernfs inode), as carried by events.
    pub id: u64,
}

impl From<&CgroupTarget> for CgroupInfo {
    fn from(t: &CgroupTarget) -> Self {
        CgroupInfo {
            name: t.name.clone(),
            id: t.id,
        }
    }
}

impl Header {
    /// A header for a recording starting now on this machine.
    pub fn new(
        source: &str,
        tier: Option<Tier>,
        cgroup: Option<CgroupInfo>,
        policy: Option<Config>,
        coalesce_ms: Option<u64>,
    ) -> Header {
        let start_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Header {
            format_version: FORMAT_VERSION,
            vm_monitor_version: env!("CARGO_PKG_VERSION").to_string(),
            source: source.to_string(),
            kernel_release: kernel_release(),
            tier,
            cgroup,
            policy,
            coalesce_ms,
            clock: CLOCK.to_string(),
            start_boot_ns: boottime_ns(),
            start_unix_ns,
            run_id: format!("{:013}-{}", start_unix_ns / 1_000_000, std::process::id()),
            segment: 0,
            policy_error: None,
        }
    }

    /// The daemon's header: the policy configuration makes the recording replayable.
    pub fn daemon(
        tier: Tier,
        cgroup: Option<&CgroupTarget>,
        policy: &Config,
        coalesce_ms: Option<u64>,
    ) -> Header {
        Header::new(
            "daemon",
            Some(tier),
            cgroup.map(CgroupInfo::from),
            Some(policy.clone()),
            coalesce_ms,
        )
    }

    /// One line for titles and summaries.
    pub fn describe(&self) -> String {
        let tier = self.tier.map(|t| t.to_string());
        let cgroup = self
            .cgroup
            .as_ref()
            .map(|c| format!("cgroup {} (id {})", c.name, c.id));
        let mut parts = vec![
            format!("kernel {}", self.kernel_release),
            format!("tier {}", tier.as_deref().unwrap_or("?")),
        ];
        parts.extend(cgroup);
        parts.push(format!("{} recording", self.source));
        parts.join(", ")
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// One record after the header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// A pressure event as the tier delivered it.
    Event(EventRecord),
    /// The cgroup's memory, read on demand for a burst of events.
    Reading(ReadingRecord),
    /// One policy step: an input and every action the policy returned for it, in order.
    Step(StepRecord),
    /// The recorder's queue was full: `total` records lost so far (later records are intact).
    Dropped { at_ns: u64, total: u64 },
    /// The kernel's per-kind counters (`trace` writes them at the end).
    KernelCounters {
        at_ns: u64,
        kinds: Vec<KernelKindCounters>,
    },
    /// Clean end of a file; `continued`: the run goes on in the next rolling segment.
    End {
        at_ns: u64,
        records: u64,
        dropped: u64,
        continued: bool,
    },
}

impl Record {
    /// Boot-clock time of the record, ns.
    pub fn ts_ns(&self) -> u64 {
        match self {
            Record::Event(e) => e.ts_ns,
            Record::Reading(r) => r.ts_ns,
            Record::Step(s) => duration_ns(s.input.at()),
            Record::Dropped { at_ns, .. }
            | Record::KernelCounters { at_ns, .. }
            | Record::End { at_ns, .. } => *at_ns,
        }
    }
}

/// Nanoseconds of a boot-clock `Duration`, saturating.
pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A [`PressureEvent`] as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// CLOCK_BOOTTIME ns (eBPF: stamped in the kernel).
    pub ts_ns: u64,
    pub kind: EventKind,
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// Reclaim stall of `*_end` records (sum over coalesced repeats), ns.
    pub stall_ns: u64,
    pub value: u64,
    pub order: i32,
    pub gfp_flags: u64,
    /// Events this record stands for (> 1 when the kernel coalesced repeats).
    pub events: u32,
}

/// What an event says happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An eBPF record; the value is the stable `RecordKind` ABI number.
    Kernel(u32),
    PsiTrigger,
    MemoryEvents {
        high: u64,
        max: u64,
        oom: u64,
        oom_kill: u64,
    },
    PolledSample {
        avg_non_reclaimable: u64,
        samples: u32,
    },
}

impl EventKind {
    /// The eBPF record kind, if this is one this build knows.
    pub fn record_kind(&self) -> Option<RecordKind> {
        match self {
            EventKind::Kernel(v) => RecordKind::ALL.into_iter().find(|k| *k as u32 == *v),
            _ => None,
        }
    }

    /// Short name, as `trace` prints it.
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            EventKind::Kernel(v) => match self.record_kind() {
                Some(k) => Cow::Borrowed(k.name()),
                None => Cow::Owned(format!("kind_{v}")),
            },
            EventKind::PsiTrigger => Cow::Borrowed(kind_names::PSI_TRIGGER),
            EventKind::MemoryEvents { .. } => Cow::Borrowed(kind_names::MEMORY_EVENTS),
            EventKind::PolledSample { .. } => Cow::Borrowed(kind_names::POLLED_SAMPLE),
        }
    }
}

impl From<&PressureEvent> for EventRecord {
    fn from(ev: &PressureEvent) -> Self {
        let kind = match &ev.kind {
            PressureKind::Kernel(k) => EventKind::Kernel(*k as u32),
            PressureKind::PsiTrigger => EventKind::PsiTrigger,
            PressureKind::MemoryEvents {
                high,
                max,
                oom,
                oom_kill,
            } => EventKind::MemoryEvents {
                high: *high,
                max: *max,
                oom: *oom,
                oom_kill: *oom_kill,
            },
            PressureKind::PolledSample {
                avg_non_reclaimable,
                samples,
            } => EventKind::PolledSample {
                avg_non_reclaimable: *avg_non_reclaimable,
                samples: *samples,
            },
        };
        EventRecord {
            ts_ns: ev.ts_ns,
            kind,
            pid: ev.pid,
            tgid: ev.tgid,
            comm: ev.comm.clone(),
            cgroup_id: ev.cgroup_id,
            stall_ns: duration_ns(ev.stall),
            value: ev.value,
            order: ev.order,
            gfp_flags: ev.gfp_flags,
            events: ev.events,
        }
    }
}

/// The cgroup's memory at `ts_ns` (each field `None` when it could not be read).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadingRecord {
    pub ts_ns: u64,
    /// `active_anon + inactive_anon` from memory.stat, bytes.
    pub non_reclaimable: Option<u64>,
    /// `memory.current`, bytes.
    pub current: Option<u64>,
    /// `memory.high`.
    pub memory_high: Option<MemoryHigh>,
}

/// One call of `Policy::handle`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub input: Input,
    pub actions: Vec<ActionRecord>,
}

/// An [`Action`] as stored. Decisions and upscale reasons are kept as the JSON their
/// `Serialize` produces, so replay compares exactly what the decision log shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionRecord {
    UpscaleRequest {
        reason: serde_json::Value,
        text: String,
    },
    SetFileCache {
        bytes: u64,
    },
    SetMemoryHigh {
        value: MemoryHigh,
    },
    Reply(OutcomeRecord),
    ScheduleTick {
        at: Duration,
    },
    Decision(serde_json::Value),
}

/// A [`ScalingOutcome`] as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeRecord {
    UpscaleConfirmed,
    Downscale { ok: bool, status: String },
    InternalError(String),
}

impl From<&Action> for ActionRecord {
    fn from(a: &Action) -> Self {
        match a {
            Action::SendUpscaleRequest { reason } => ActionRecord::UpscaleRequest {
                reason: serde_json::to_value(reason).unwrap_or_default(),
                text: reason.to_string(),
            },
            Action::SetFileCache { bytes } => ActionRecord::SetFileCache { bytes: *bytes },
            Action::SetMemoryHigh { value } => ActionRecord::SetMemoryHigh { value: *value },
            Action::Reply(outcome) => ActionRecord::Reply(match outcome {
                ScalingOutcome::UpscaleConfirmed => OutcomeRecord::UpscaleConfirmed,
                ScalingOutcome::Downscale { ok, status } => OutcomeRecord::Downscale {
                    ok: *ok,
                    status: status.clone(),
                },
                ScalingOutcome::InternalError(e) => OutcomeRecord::InternalError(e.clone()),
            }),
            Action::ScheduleTick { at } => ActionRecord::ScheduleTick { at: *at },
            Action::Decision(d) => {
                ActionRecord::Decision(serde_json::to_value(d).unwrap_or_default())
            }
        }
    }
}

impl ActionRecord {
    /// One line for listings and diffs.
    pub fn describe(&self) -> String {
        match self {
            ActionRecord::UpscaleRequest { text, .. } => format!("UpscaleRequest: {text}"),
            ActionRecord::SetFileCache { bytes } => {
                format!("set file cache {} MiB", bytes >> 20)
            }
            ActionRecord::SetMemoryHigh { value } => match value {
                MemoryHigh::Max => "set memory.high max".to_string(),
                MemoryHigh::Bytes(b) => format!("set memory.high {} MiB ({b})", b >> 20),
            },
            ActionRecord::Reply(o) => format!("reply {o:?}"),
            ActionRecord::ScheduleTick { at } => format!("schedule tick at {:.6}s", secs(*at)),
            ActionRecord::Decision(d) => format!("decision {d}"),
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Kernel counters of one record kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelKindCounters {
    /// `RecordKind` ABI number.
    pub kind: u32,
    pub seen: u64,
    pub emitted: u64,
    pub coalesced: u64,
    pub dropped: u64,
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Appends one frame for `payload` to `out`.
fn push_frame(out: &mut Vec<u8>, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME_BYTES)
        .ok_or_else(|| {
            io::Error::other(format!("record of {} bytes is too large", payload.len()))
        })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// A record as one complete frame.
pub fn encode_record(record: &Record) -> io::Result<Vec<u8>> {
    let payload = rmp_serde::to_vec(record).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(payload.len() + FRAME_HEADER_BYTES);
    push_frame(&mut frame, &payload)?;
    Ok(frame)
}

/// Writes a recording to any `Write` (synchronously; [`Recorder`] runs one on a thread).
pub struct RecordWriter<W: Write> {
    out: W,
    bytes: u64,
    records: u64,
}

impl<W: Write> RecordWriter<W> {
    /// Writes the preamble and the header.
    pub fn new(mut out: W, header: &Header) -> io::Result<Self> {
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        let mut buf = Vec::with_capacity(PREAMBLE_BYTES + FRAME_HEADER_BYTES + json.len());
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        push_frame(&mut buf, &json)?;
        out.write_all(&buf)?;
        Ok(RecordWriter {
            out,
            bytes: buf.len() as u64,
            records: 0,
        })
    }

    /// Appends one record.
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        let frame = encode_record(record)?;
        self.write_frame(&frame)
    }

    /// Appends a frame made by [`encode_record`].
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.out.write_all(frame)?;
        self.bytes += frame.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// Bytes written so far, preamble and header included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// What the engine's recorder hands its writer thread: owned copies, converted off the
/// engine's path.
enum Msg {
    Event(PressureEvent),
    Reading(ReadingRecord),
    Step(Input, Vec<Action>),
    Record(Record),
}

/// Totals of a finished recording.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecorderStats {
    /// Records written (all files).
    pub records: u64,
    /// Records lost because the queue was full or the file could not be written.
    pub dropped: u64,
    /// Files written (rolling: segments opened).
    pub files: u64,
}

/// Records on a dedicated writer thread, so the caller (the engine, `trace`) never waits for
/// the disk: every `record_*` call copies its argument into a bounded queue
/// (capacity 8192) and returns; when the queue is full the record is dropped and counted, and
/// the count is written to the file as [`Record::Dropped`] (and in the final [`Record::End`]).
/// The thread flushes whenever the queue runs empty, so a crash loses at most what was queued.
pub struct Recorder {
    tx: Option<SyncSender<Msg>>,
    dropped: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<RecorderStats>>>,
}

impl Recorder {
    /// Records into the file at `path` (created or truncated).
    pub fn create(path: &Path, header: Header) -> anyhow::Result<Recorder> {
        let file =
            File::create(path).with_context(|| format!("creating recording {}", path.display()))?;
        let writer = RecordWriter::new(BufWriter::with_capacity(64 << 10, file), &header)
            .with_context(|| format!("writing the header of {}", path.display()))?;
        Recorder::spawn(
            Sink::File {
                path: path.to_path_buf(),
                writer,
            },
            QUEUE_CAPACITY,
        )
    }

    fn spawn(sink: Sink, capacity: usize) -> anyhow::Result<Recorder> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let thread = std::thread::Builder::new()
            .name("vm-monitor-recorder".to_string())
            .spawn(move || write_loop(sink, rx, counter))
            .context("starting the recorder thread")?;
        Ok(Recorder {
            tx: Some(tx),
            dropped,
            thread: Some(thread),
        })
    }

    fn send(&self, msg: Msg) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A pressure event, as received from the tier.
    pub fn record_event(&self, event: &PressureEvent) {
        self.send(Msg::Event(event.clone()));
    }

    /// A cgroup memory reading taken for a burst of events.
    pub fn record_reading(&self, reading: ReadingRecord) {
        self.send(Msg::Reading(reading));
    }

    /// One policy step: call right after `Policy::handle(input)` with what it returned, for
    /// every call, in call order (replay feeds the inputs back in this order).
    pub fn record_step(&self, input: &Input, actions: &[Action]) {
        self.send(Msg::Step(input.clone(), actions.to_vec()));
    }

    /// Any other record (e.g. kernel counters).
    pub fn record(&self, record: Record) {
        self.send(Msg::Record(record));
    }

    /// Records dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes everything queued and the end marker, closes the file and returns the totals.
    /// Blocks until the writer thread is done (call from `spawn_blocking` in async code if the
    /// queue may be long).
    pub fn finish(mut self) -> anyhow::Result<RecorderStats> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the recorder thread panicked"))?,
            None => Ok(RecorderStats::default()),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Closing the queue lets the thread write its end marker; it is not joined here so a
        // drop never blocks the caller.
        self.tx = None;
    }
}

enum Sink {
    File {
        path: PathBuf,
        writer: RecordWriter<BufWriter<File>>,
    },
    Rolling(Box<RollingSink>),
}

impl Sink {
    fn write(&mut self, record: &Record) -> anyhow::Result<()> {
        let frame = encode_record(record)?;
        match self {
            Sink::File { path, writer } => writer
                .write_frame(&frame)
                .with_context(|| format!("writing {}", path.display())),
            Sink::Rolling(r) => r.write_frame(&frame),
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Sink::File { path, writer } => writer
                .flush()
                .with_context(|| format!("writing {}", path.display())),
            Sink::Rolling(r) => r.flush(),
        }
    }

    fn stats(&self) -> (u64, u64) {
        match self {
            Sink::File { writer, .. } => (writer.records(), 1),
            Sink::Rolling(r) => (r.records_before + r.writer.records(), u64::from(r.files)),
        }
    }
}

fn to_record(msg: Msg) -> Record {
    match msg {
        Msg::Event(ev) => Record::Event(EventRecord::from(&ev)),
        Msg::Reading(r) => Record::Reading(r),
        Msg::Step(input, actions) => Record::Step(StepRecord {
            input,
            actions: actions.iter().map(ActionRecord::from).collect(),
        }),
        Msg::Record(r) => r,
    }
}

/// The writer thread's state: a failing disk must not stop the queue from draining (the
/// engine never waits), so the first error is logged and kept, and the rest counts as dropped.
struct WriteState {
    sink: Sink,
    failed: Option<anyhow::Error>,
    lost: u64,
}

impl WriteState {
    fn write(&mut self, rec: &Record) {
        if self.failed.is_some() {
            self.lost += 1;
            return;
        }
        if let Err(err) = self.sink.write(rec) {
            tracing::warn!(error = %format!("{err:#}"), "recording stopped: cannot write");
            self.failed = Some(err);
            self.lost += 1;
        }
    }

    fn flush(&mut self) {
        if self.failed.is_none()
            && let Err(err) = self.sink.flush()
        {
            tracing::warn!(error = %format!("{err:#}"), "recording stopped: cannot write");
            self.failed = Some(err);
        }
    }
}

fn write_loop(
    sink: Sink,
    rx: Receiver<Msg>,
    dropped: Arc<AtomicU64>,
) -> anyhow::Result<RecorderStats> {
    let mut st = WriteState {
        sink,
        failed: None,
        lost: 0,
    };
    let mut dropped_written = 0u64;
    while let Ok(first) = rx.recv() {
        st.write(&to_record(first));
        for _ in 1..FLUSH_EVERY {
            match rx.try_recv() {
                Ok(msg) => st.write(&to_record(msg)),
                Err(_) => break,
            }
        }
        let total = dropped.load(Ordering::Relaxed) + st.lost;
        if total != dropped_written {
            dropped_written = total;
            st.write(&Record::Dropped {
                at_ns: boottime_ns(),
                total,
            });
        }
        st.flush();
    }
    let (records, files) = st.sink.stats();
    let total_dropped = dropped.load(Ordering::Relaxed) + st.lost;
    st.write(&Record::End {
        at_ns: boottime_ns(),
        records,
        dropped: total_dropped,
        continued: false,
    });
    st.flush();
    if let Some(err) = st.failed {
        return Err(err.context(format!(
            "recording incomplete: {} records lost",
            total_dropped + 1
        )));
    }
    Ok(RecorderStats {
        records: records + 1,
        dropped: total_dropped,
        files,
    })
}

/// A size-bounded recording for post-mortems (`--record-dir DIR`): segments named
/// `vm-monitor-<start unix ms>-<pid>-<segment>.vmrec` are rotated when the next record would
/// take a segment past `max_file_bytes`, and the oldest `vm-monitor-*.vmrec` files in `dir`
/// (any run, never the one being written) are deleted while the directory's total exceeds
/// `max_total_bytes`. Each segment is a complete recording with its own header (`segment` counts
/// up from 0 within a run); `replay` needs segment 0, export and plot read any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollingRecorder {
    dir: PathBuf,
    max_file_bytes: u64,
    max_total_bytes: u64,
}

impl RollingRecorder {
    /// Checks the limits: `max_file_bytes` at least 4 KiB, `max_total_bytes` at least
    /// `max_file_bytes`. Nothing is created until [`RollingRecorder::start`].
    pub fn new(
        dir: &Path,
        max_file_bytes: u64,
        max_total_bytes: u64,
    ) -> anyhow::Result<RollingRecorder> {
        if max_file_bytes < 4096 {
            bail!("rolling recording: segment size {max_file_bytes} bytes is below 4 KiB");
        }
        if max_total_bytes < max_file_bytes {
            bail!(
                "rolling recording: total budget {max_total_bytes} bytes is smaller than one \
                 segment ({max_file_bytes} bytes)"
            );
        }
        Ok(RollingRecorder {
            dir: dir.to_path_buf(),
            max_file_bytes,
            max_total_bytes,
        })
    }

    /// Creates `dir` if missing, deletes old segments beyond the budget and starts recording
    /// a new run (segment 0) with `header`. Returns the same [`Recorder`] handle as
    /// [`Recorder::create`].
    pub fn start(&self, header: Header) -> anyhow::Result<Recorder> {
        let dir = &self.dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating recording directory {}", dir.display()))?;
        let mut header = header;
        header.segment = 0;
        let (path, writer) = RollingSink::open(dir, &header)?;
        let mut sink = RollingSink {
            dir: dir.clone(),
            max_file_bytes: self.max_file_bytes,
            max_total_bytes: self.max_total_bytes,
            header,
            path,
            writer,
            records_before: 0,
            files: 1,
        };
        sink.enforce_budget()?;
        Recorder::spawn(Sink::Rolling(Box::new(sink)), QUEUE_CAPACITY)
    }
}

struct RollingSink {
    dir: PathBuf,
    max_file_bytes: u64,
    max_total_bytes: u64,
    header: Header,
    path: PathBuf,
    writer: RecordWriter<BufWriter<File>>,
    records_before: u64,
    files: u32,
}

impl RollingSink {
    fn file_name(header: &Header) -> String {
        format!(
            "{ROLLING_PREFIX}{}-{:06}.{EXTENSION}",
            header.run_id, header.segment
        )
    }

    fn open(
        dir: &Path,
        header: &Header,
    ) -> anyhow::Result<(PathBuf, RecordWriter<BufWriter<File>>)> {
        let path = dir.join(Self::file_name(header));
        let file = File::create(&path)
            .with_context(|| format!("creating recording {}", path.display()))?;
        let writer = RecordWriter::new(BufWriter::with_capacity(64 << 10, file), header)
            .with_context(|| format!("writing the header of {}", path.display()))?;
        Ok((path, writer))
    }

    fn write_frame(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        if self.writer.records() > 0
            && self.writer.bytes() + frame.len() as u64 + END_RESERVE > self.max_file_bytes
        {
            self.rotate()?;
        }
        self.writer
            .write_frame(frame)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.writer
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn rotate(&mut self) -> anyhow::Result<()> {
        let end = Record::End {
            at_ns: boottime_ns(),
            records: self.writer.records(),
            dropped: 0,
            continued: true,
        };
        self.writer
            .write(&end)
            .and_then(|()| self.writer.flush())
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.records_before += self.writer.records();
        self.header.segment += 1;
        let (path, writer) = Self::open(&self.dir, &self.header)?;
        self.path = path;
        self.writer = writer;
        self.files += 1;
        self.enforce_budget()
    }

    /// Deletes the oldest segments (by name: start time, then segment) beyond the budget.
    fn enforce_budget(&mut self) -> anyhow::Result<()> {
        let mut files = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(ROLLING_PREFIX) && name.ends_with(&format!(".{EXTENSION}"))) {
                continue;
            }
            let path = entry.path();
            let len = if path == self.path {
                // Buffered bytes are not on disk yet; count what will be.
                self.writer.bytes()
            } else {
                entry.metadata().map(|m| m.len()).unwrap_or(0)
            };
            files.push((name, path, len));
        }
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.2).sum();
        for (_, path, len) in &files {
            if total <= self.max_total_bytes {
                break;
            }
            if *path == self.path {
                continue;
            }
            match std::fs::remove_file(path) {
                Ok(()) => total = total.saturating_sub(*len),
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot delete an old recording segment");
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Why (part of) a recording could not be read. Never a panic: every malformed input maps to
/// one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The file does not start with the magic.
    NotARecording { hint: Option<&'static str> },
    /// A recording of another format version.
    UnsupportedVersion { found: u16 },
    /// The file ends inside the preamble or the header.
    TruncatedHeader { len: u64 },
    /// The header frame is damaged or not a header.
    BadHeader { reason: String },
    /// The file ends inside the frame at `offset`: `available` of `needed` bytes are there.
    Truncated {
        offset: u64,
        needed: u64,
        available: u64,
    },
    /// The frame at `offset` is damaged (checksum or impossible length); nothing after it
    /// can be trusted.
    Corrupt { offset: u64, reason: String },
    /// The frame at `offset` is intact but holds no record this build knows; it is skipped.
    Undecodable { offset: u64, reason: String },
    /// Reading failed.
    Io { reason: String },
}

impl ReadError {
    /// Whether records after this one can still be read.
    pub fn is_skippable(&self) -> bool {
        matches!(self, ReadError::Undecodable { .. })
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NotARecording { hint } => {
                write!(f, "not a vm-monitor recording (no {:?} magic)", "VMMONREC")?;
                if let Some(h) = hint {
                    write!(f, "; {h}")?;
                }
                Ok(())
            }
            ReadError::UnsupportedVersion { found } if *found < FORMAT_VERSION => write!(
                f,
                "recording format version {found} is older than this vm-monitor reads \
                 (version {FORMAT_VERSION}); use the vm-monitor release that wrote it"
            ),
            ReadError::UnsupportedVersion { found } => write!(
                f,
                "recording format version {found} is newer than this vm-monitor reads \
                 (version {FORMAT_VERSION}); use a newer vm-monitor"
            ),
            ReadError::TruncatedHeader { len } => write!(
                f,
                "recording truncated inside its header (file is {len} bytes); no records"
            ),
            ReadError::BadHeader { reason } => write!(f, "recording header is damaged: {reason}"),
            ReadError::Truncated {
                offset,
                needed,
                available,
            } => write!(
                f,
                "last record truncated at byte {offset}: {available} of {needed} bytes present \
                 (the recording was cut short); the records before it were read"
            ),
            ReadError::Corrupt { offset, reason } => write!(
                f,
                "damaged record at byte {offset} ({reason}); the records before it were read, \
                 the rest of the file was ignored"
            ),
            ReadError::Undecodable { offset, reason } => {
                write!(f, "unreadable record at byte {offset} skipped ({reason})")
            }
            ReadError::Io { reason } => write!(f, "read error: {reason}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// Reads as many bytes as are there, up to `buf.len()`.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, ReadError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(ReadError::Io {
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(n)
}

enum Frame {
    Payload(Vec<u8>),
    Eof,
}

/// Reads records one at a time.
pub struct RecordReader<R: Read> {
    inner: R,
    offset: u64,
    header: Header,
    done: bool,
}

impl<R: Read> RecordReader<R> {
    /// Checks the magic and version and reads the header.
    pub fn new(mut inner: R) -> Result<Self, ReadError> {
        let mut pre = [0u8; PREAMBLE_BYTES];
        let n = read_full(&mut inner, &mut pre)?;
        if n < MAGIC.len() || pre[..MAGIC.len()] != MAGIC {
            if n < MAGIC.len() && n > 0 && pre[..n] == MAGIC[..n] {
                return Err(ReadError::TruncatedHeader { len: n as u64 });
            }
            let hint = if n == 0 {
                Some("the file is empty")
            } else if pre[0] == b'{' {
                Some(
                    "this looks like JSON lines from `trace --output`; record with `trace --record`",
                )
            } else {
                None
            };
            return Err(ReadError::NotARecording { hint });
        }
        if n < PREAMBLE_BYTES {
            return Err(ReadError::TruncatedHeader { len: n as u64 });
        }
        let version = u16::from_le_bytes([pre[8], pre[9]]);
        if version != FORMAT_VERSION {
            return Err(ReadError::UnsupportedVersion { found: version });
        }
        let mut reader = RecordReader {
            inner,
            offset: PREAMBLE_BYTES as u64,
            header: placeholder_header(),
            done: false,
        };
        let payload = match reader.frame() {
            Ok(Frame::Payload(p)) => p,
            Ok(Frame::Eof) => {
                return Err(ReadError::TruncatedHeader {
                    len: PREAMBLE_BYTES as u64,
                });
            }
            Err(ReadError::Truncated {
                offset, available, ..
            }) => {
                return Err(ReadError::TruncatedHeader {
                    len: offset + available,
                });
            }
            Err(ReadError::Corrupt { reason, .. }) => return Err(ReadError::BadHeader { reason }),
            Err(e) => return Err(e),
        };
        let header = parse_header(&payload)?;
        if header.format_version != FORMAT_VERSION {
            return Err(ReadError::UnsupportedVersion {
                found: header.format_version,
            });
        }
        reader.header = header;
        Ok(reader)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Byte offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn frame(&mut self) -> Result<Frame, ReadError> {
        let start = self.offset;
        let mut head = [0u8; FRAME_HEADER_BYTES];
        let n = read_full(&mut self.inner, &mut head)?;
        if n == 0 {
            return Ok(Frame::Eof);
        }
        if n < FRAME_HEADER_BYTES {
            return Err(ReadError::Truncated {
                offset: start,
                needed: FRAME_HEADER_BYTES as u64,
                available: n as u64,
            });
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_FRAME_BYTES {
            return Err(ReadError::Corrupt {
                offset: start,
                reason: format!("frame length {len} exceeds the {MAX_FRAME_BYTES}-byte limit"),
            });
        }
        let mut payload = vec![0u8; len as usize];
        let got = read_full(&mut self.inner, &mut payload)?;
        if got < payload.len() {
            return Err(ReadError::Truncated {
                offset: start,
                needed: (FRAME_HEADER_BYTES + payload.len()) as u64,
                available: (FRAME_HEADER_BYTES + got) as u64,
            });
        }
        if crc32fast::hash(&payload) != crc {
            return Err(ReadError::Corrupt {
                offset: start,
                reason: "checksum mismatch".to_string(),
            });
        }
        self.offset = start + (FRAME_HEADER_BYTES + payload.len()) as u64;
        Ok(Frame::Payload(payload))
    }

    /// The next record; `None` at the end, or after an error nothing can follow.
    pub fn next_record(&mut self) -> Option<Result<Record, ReadError>> {
        if self.done {
            return None;
        }
        let start = self.offset;
        match self.frame() {
            Ok(Frame::Eof) => {
                self.done = true;
                None
            }
            Ok(Frame::Payload(p)) => {
                Some(
                    rmp_serde::from_slice(&p).map_err(|e| ReadError::Undecodable {
                        offset: start,
                        reason: e.to_string(),
                    }),
                )
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl<R: Read> Iterator for RecordReader<R> {
    type Item = Result<Record, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record()
    }
}

/// Parses the header JSON; the policy configuration separately, so that a configuration this
/// build cannot read (written by another version) costs only replay, not the recording.
fn parse_header(payload: &[u8]) -> Result<Header, ReadError> {
    let bad = |e: serde_json::Error| ReadError::BadHeader {
        reason: format!("not a header: {e}"),
    };
    let mut value: serde_json::Value = serde_json::from_slice(payload).map_err(bad)?;
    let policy = value
        .as_object_mut()
        .and_then(|o| o.remove("policy"))
        .filter(|p| !p.is_null());
    let mut header: Header = serde_json::from_value(value).map_err(bad)?;
    if let Some(p) = policy {
        match serde_json::from_value::<Config>(p) {
            Ok(cfg) => header.policy = Some(cfg),
            Err(e) => header.policy_error = Some(e.to_string()),
        }
    }
    Ok(header)
}

fn placeholder_header() -> Header {
    Header {
        format_version: FORMAT_VERSION,
        vm_monitor_version: String::new(),
        source: String::new(),
        kernel_release: String::new(),
        tier: None,
        cgroup: None,
        policy: None,
        coalesce_ms: None,
        clock: CLOCK.to_string(),
        start_boot_ns: 0,
        start_unix_ns: 0,
        run_id: String::new(),
        segment: 0,
        policy_error: None,
    }
}

/// One file of a loaded recording.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    /// Where it came from (`None` for in-memory bytes).
    pub path: Option<PathBuf>,
    pub segment: u32,
    /// Index of its first record in [`Recording::records`].
    pub first_record: usize,
    pub records: usize,
    /// Ended with [`Record::End`].
    pub clean_end: bool,
}

/// Something wrong with part of a recording that did not stop it from being read.
#[derive(Clone, Debug, PartialEq)]
pub struct Issue {
    pub path: Option<PathBuf>,
    pub error: ReadError,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

/// A recording read into memory: one file, or the segments of one rolling run in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    /// The first segment's header.
    pub header: Header,
    pub records: Vec<Record>,
    pub segments: Vec<Segment>,
    /// Truncation, damage, missing segments, missing end marker.
    pub issues: Vec<Issue>,
}

impl Recording {
    /// Reads a recording from bytes. Only an unreadable preamble or header is an error; a
    /// damaged or truncated tail becomes an [`Issue`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Recording, ReadError> {
        Self::read(bytes, None)
    }

    fn read<R: Read>(r: R, path: Option<&Path>) -> Result<Recording, ReadError> {
        let mut reader = RecordReader::new(r)?;
        let header = reader.header().clone();
        let mut records = Vec::new();
        let mut issues = Vec::new();
        while let Some(item) = reader.next_record() {
            match item {
                Ok(rec) => records.push(rec),
                Err(error) => issues.push(Issue {
                    path: path.map(Path::to_path_buf),
                    error,
                }),
            }
        }
        let clean_end = matches!(records.last(), Some(Record::End { .. }));
        let segment = Segment {
            path: path.map(Path::to_path_buf),
            segment: header.segment,
            first_record: 0,
            records: records.len(),
            clean_end,
        };
        Ok(Recording {
            header,
            records,
            segments: vec![segment],
            issues,
        })
    }

    /// Reads one recording file.
    pub fn load_file(path: &Path) -> anyhow::Result<Recording> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Self::read(BufReader::with_capacity(64 << 10, file), Some(path))
            .with_context(|| format!("reading {}", path.display()))
    }

    /// Reads a file, or a `--record-dir` directory: the segments of its most recent run, in
    /// order (older runs in the directory are ignored, with a note in `issues`).
    pub fn load(path: &Path) -> anyhow::Result<Recording> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
        if !meta.is_dir() {
            return Self::load_file(path);
        }
        let mut candidates = Vec::new();
        let mut unreadable = Vec::new();
        let entries =
            std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
                continue;
            }
            match File::open(&p)
                .map_err(|e| ReadError::Io {
                    reason: e.to_string(),
                })
                .and_then(|f| RecordReader::new(BufReader::new(f)))
            {
                Ok(r) => candidates.push((r.header().clone(), p)),
                Err(error) => unreadable.push(Issue {
                    path: Some(p),
                    error,
                }),
            }
        }
        let Some(latest) = candidates
            .iter()
            .max_by_key(|(h, _)| (h.start_unix_ns, h.segment))
            .map(|(h, _)| h.run_id.clone())
        else {
            bail!(
                "{} holds no readable recording (*.{EXTENSION}){}",
                path.display(),
                unreadable
                    .first()
                    .map(|i| format!("; e.g. {i}"))
                    .unwrap_or_default()
            );
        };
        let other_runs = candidates
            .iter()
            .filter(|(h, _)| h.run_id != latest)
            .count();
        let mut run: Vec<(u32, PathBuf)> = candidates
            .into_iter()
            .filter(|(h, _)| h.run_id == latest)
            .map(|(h, p)| (h.segment, p))
            .collect();
        run.sort();
        let mut merged: Option<Recording> = None;
        for (_, p) in run {
            let part = Self::load_file(&p)?;
            merged = Some(match merged {
                None => part,
                Some(mut acc) => {
                    acc.append(part);
                    acc
                }
            });
        }
        let Some(mut rec) = merged else {
            bail!("{} holds no readable recording", path.display());
        };
        rec.issues.extend(unreadable);
        if other_runs > 0 {
            rec.issues.push(Issue {
                path: Some(path.to_path_buf()),
                error: ReadError::Io {
                    reason: format!(
                        "{other_runs} segment(s) of older runs ignored; read run {latest} \
                         (pass a file to read another)"
                    ),
                },
            });
        }
        Ok(rec)
    }

    fn append(&mut self, mut other: Recording) {
        let base = self.records.len();
        for s in &mut other.segments {
            s.first_record += base;
        }
        self.records.append(&mut other.records);
        self.segments.append(&mut other.segments);
        self.issues.append(&mut other.issues);
    }

    /// Segments the run is missing (deleted by the rolling budget, or not passed): those
    /// before the first one present and gaps between them.
    pub fn missing_segments(&self) -> Vec<u32> {
        let mut missing = Vec::new();
        let mut expect = 0u32;
        for s in &self.segments {
            while expect < s.segment {
                missing.push(expect);
                expect += 1;
            }
            expect = s.segment.saturating_add(1);
        }
        missing
    }

    /// Human-readable warnings: read issues, missing segments, no clean end, dropped records.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self.issues.iter().map(|i| i.to_string()).collect();
        if let Some(e) = &self.header.policy_error {
            w.push(format!(
                "the recorded policy configuration is unreadable by this vm-monitor ({e}); \
                 replay is not possible"
            ));
        }
        let missing = self.missing_segments();
        if !missing.is_empty() {
            w.push(format!(
                "run {} is missing segment(s) {:?} (deleted by the rolling budget?)",
                self.header.run_id, missing
            ));
        }
        if let Some(last) = self.segments.last()
            && !last.clean_end
            && !self.issues.iter().any(|i| !i.error.is_skippable())
        {
            w.push(
                "no end marker: the recorder did not finish (still running, killed, or crashed)"
                    .to_string(),
            );
        }
        let dropped = self.dropped();
        if dropped > 0 {
            w.push(format!(
                "{dropped} record(s) were dropped while recording (recorder queue full or disk \
                 error)"
            ));
        }
        w
    }

    /// Records the recorder reported as lost.
    pub fn dropped(&self) -> u64 {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Dropped { total, .. } | Record::End { dropped: total, .. } => Some(*total),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    pub fn events(&self) -> impl Iterator<Item = &EventRecord> {
        self.records.iter().filter_map(|r| match r {
            Record::Event(e) => Some(e),
            _ => None,
        })
    }

    pub fn steps(&self) -> impl Iterator<Item = &StepRecord> {
        self.records.iter().filter_map(|r| match r {
            Record::Step(s) => Some(s),
            _ => None,
        })
    }

    /// Per-kind record and event counts.
    pub fn event_counts(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        let mut m = std::collections::BTreeMap::new();
        for e in self.events() {
            let c: &mut (u64, u64) = m.entry(e.kind.name().into_owned()).or_default();
            c.0 += 1;
            c.1 += u64::from(e.events);
        }
        m
    }

    /// The series and markers `export` and `plot` draw.
    pub fn timeline(&self) -> Timeline {
        Timeline::build(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Timeline: what export and plot show

/// A value that changed at `ts_ns` (series hold only changes; each value lasts until the next).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change<T> {
    pub ts_ns: u64,
    pub value: T,
}

/// A reclaim stall of one task, ending at `end_ns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub end_ns: u64,
    pub stall_ns: u64,
    /// `true`: memcg reclaim; `false`: guest-wide direct reclaim.
    pub memcg: bool,
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub nr_reclaimed: u64,
    /// Coalesced repeats folded into it (their stalls are summed).
    pub events: u32,
}

/// A point-in-time marker.
#[derive(Clone, Debug, PartialEq)]
pub struct Marker {
    pub ts_ns: u64,
    pub what: MarkerKind,
    pub detail: String,
}

/// What a marker stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkerKind {
    /// The OOM killer picked a victim: eBPF `oom_victim` (with the victim's pid), or a rise of
    /// `memory.events` oom_kill (PSI/poll tiers, no pid).
    OomKill { victim_pid: Option<u64> },
    /// The policy sent an `UpscaleRequest`.
    UpscaleRequest,
    /// The agent granted memory (`UpscaleNotification`); `granted` bytes.
    UpscaleGranted { granted: u64 },
    /// The agent asked to downscale to `target` bytes.
    DownscaleRequest { target: u64 },
    /// The reply to a downscale request.
    DownscaleResult { ok: bool },
    /// Any other logged decision (kind as the decision log names it).
    Decision { kind: String },
}

/// Everything export and plot need, extracted once from a recording.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// Earliest and latest time in the recording, ns.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Non-reclaimable memory (`active_anon + inactive_anon`), bytes.
    pub non_reclaimable: Vec<Change<u64>>,
    /// `memory.current`, bytes.
    pub current: Vec<Change<u64>>,
    /// `memory.high` (`None` = max).
    pub memory_high: Vec<Change<Option<u64>>>,
    /// Upscale threshold, bytes.
    pub threshold: Vec<Change<u64>>,
    /// Usable memory (allocation − sys buffer), bytes.
    pub usable: Vec<Change<u64>>,
    /// File cache size applied, bytes.
    pub file_cache: Vec<Change<u64>>,
    pub stalls: Vec<Stall>,
    pub markers: Vec<Marker>,
    /// Every event: time, kind name, events represented.
    pub events: Vec<(u64, String, u32)>,
}

fn push_change<T: PartialEq + Copy>(series: &mut Vec<Change<T>>, ts_ns: u64, value: T) {
    if series.last().map(|c| c.value) != Some(value) {
        series.push(Change { ts_ns, value });
    }
}

fn json_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    v.get(key).and_then(serde_json::Value::as_u64)
}

impl Timeline {
    fn build(rec: &Recording) -> Timeline {
        // Series are built in time order; records are nearly sorted already (per-CPU ring
        // buffer order), so a stable sort by time keeps same-time records in file order.
        let mut order: Vec<&Record> = rec.records.iter().collect();
        order.sort_by_key(|r| r.ts_ns());
        let mut t = Timeline::default();
        let mut times = Vec::new();
        let mut last_oom_kill: Option<u64> = None;
        for r in order {
            match r {
                Record::Event(e) => {
                    times.push(e.ts_ns);
                    t.events
                        .push((e.ts_ns, e.kind.name().into_owned(), e.events));
                    match e.kind.record_kind() {
                        Some(k @ (RecordKind::MemcgReclaimEnd | RecordKind::DirectReclaimEnd))
                            if e.stall_ns > 0 =>
                        {
                            t.stalls.push(Stall {
                                end_ns: e.ts_ns,
                                stall_ns: e.stall_ns,
                                memcg: k == RecordKind::MemcgReclaimEnd,
                                pid: e.pid,
                                tgid: e.tgid,
                                comm: e.comm.clone(),
                                nr_reclaimed: e.value,
                                events: e.events,
                            })
                        }
                        Some(RecordKind::OomVictim) => t.markers.push(Marker {
                            ts_ns: e.ts_ns,
                            what: MarkerKind::OomKill {
                                victim_pid: Some(e.value),
                            },
                            detail: format!("OOM victim pid {} (seen in {})", e.value, e.comm),
                        }),
                        _ => {}
                    }
                    if let EventKind::MemoryEvents { oom_kill, .. } = e.kind {
                        if last_oom_kill.is_some_and(|prev| oom_kill > prev) {
                            t.markers.push(Marker {
                                ts_ns: e.ts_ns,
                                what: MarkerKind::OomKill { victim_pid: None },
                                detail: format!("memory.events oom_kill rose to {oom_kill}"),
                            });
                        }
                        last_oom_kill = Some(oom_kill);
                    }
                }
                Record::Reading(rd) => {
                    times.push(rd.ts_ns);
                    if let Some(v) = rd.non_reclaimable {
                        push_change(&mut t.non_reclaimable, rd.ts_ns, v);
                    }
                    if let Some(v) = rd.current {
                        push_change(&mut t.current, rd.ts_ns, v);
                    }
                    if let Some(h) = rd.memory_high {
                        push_change(&mut t.memory_high, rd.ts_ns, h.bytes());
                    }
                }
                Record::Step(s) => t.add_step(s, &mut times),
                // They mark how long the recording ran, events or not.
                Record::Dropped { at_ns, .. }
                | Record::KernelCounters { at_ns, .. }
                | Record::End { at_ns, .. } => times.push(*at_ns),
            }
        }
        t.start_ns = times
            .iter()
            .copied()
            .min()
            .unwrap_or(rec.header.start_boot_ns);
        if rec.header.start_boot_ns > 0 {
            t.start_ns = t.start_ns.min(rec.header.start_boot_ns);
        }
        t.end_ns = times
            .iter()
            .copied()
            .max()
            .unwrap_or(t.start_ns)
            .max(t.start_ns);
        t
    }

    fn add_step(&mut self, s: &StepRecord, times: &mut Vec<u64>) {
        let at = duration_ns(s.input.at());
        times.push(at);
        match &s.input {
            Input::Pressure {
                reading: Some(r), ..
            } => push_change(&mut self.non_reclaimable, at, *r),
            Input::Reading {
                non_reclaimable,
                current,
                ..
            } => {
                push_change(&mut self.non_reclaimable, at, *non_reclaimable);
                push_change(&mut self.current, at, *current);
            }
            Input::Applied {
                effect,
                result: Ok(()),
                ..
            } => match effect {
                Effect::FileCache { bytes } => push_change(&mut self.file_cache, at, *bytes),
                Effect::MemoryHigh { value } => {
                    push_change(&mut self.memory_high, at, value.bytes())
                }
            },
            Input::UpscaleNotification { granted_mem, .. } => self.markers.push(Marker {
                ts_ns: at,
                what: MarkerKind::UpscaleGranted {
                    granted: *granted_mem,
                },
                detail: format!("agent granted {} MiB", granted_mem >> 20),
            }),
            Input::DownscaleRequest { target_mem, .. } => self.markers.push(Marker {
                ts_ns: at,
                what: MarkerKind::DownscaleRequest {
                    target: *target_mem,
                },
                detail: format!("agent asked to downscale to {} MiB", target_mem >> 20),
            }),
            _ => {}
        }
        for a in &s.actions {
            match a {
                ActionRecord::UpscaleRequest { text, .. } => self.markers.push(Marker {
                    ts_ns: at,
                    what: MarkerKind::UpscaleRequest,
                    detail: text.clone(),
                }),
                ActionRecord::Reply(OutcomeRecord::Downscale { ok, status }) => {
                    self.markers.push(Marker {
                        ts_ns: at,
                        what: MarkerKind::DownscaleResult { ok: *ok },
                        detail: status.clone(),
                    })
                }
                ActionRecord::Decision(d) => {
                    let dat = d
                        .get("at")
                        .and_then(|a| Some((json_u64(a, "secs")?, json_u64(a, "nanos")?)))
                        .map(|(s, n)| s.saturating_mul(1_000_000_000).saturating_add(n))
                        .unwrap_or(at);
                    if let Some(th) = json_u64(d, "threshold").filter(|v| *v > 0) {
                        push_change(&mut self.threshold, dat, th);
                    }
                    if let Some(u) = json_u64(d, "usable").filter(|v| *v > 0) {
                        push_change(&mut self.usable, dat, u);
                    }
                    let kind = d
                        .get("kind")
                        .and_then(|k| k.as_str())
                        .unwrap_or("unknown")
                        .to_string();
                    // Upscale requests already have their own marker.
                    if kind != "upscale_requested" {
                        let detail = d
                            .get("detail")
                            .and_then(|k| k.as_str())
                            .unwrap_or_default()
                            .to_string();
                        self.markers.push(Marker {
                            ts_ns: dat,
                            what: MarkerKind::Decision { kind },
                            detail,
                        });
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PressureSignal;

    fn header() -> Header {
        let mut h = Header::new(
            "test",
            Some(Tier::Ebpf),
            None,
            Some(Config::default()),
            None,
        );
        h.start_boot_ns = 1_000;
        h.start_unix_ns = 1_700_000_000_000_000_000;
        h.run_id = "1700000000000-1".to_string();
        h
    }

    fn sample_records() -> Vec<Record> {
        vec![
            Record::Event(EventRecord {
                ts_ns: 5_000,
                kind: EventKind::Kernel(RecordKind::MemcgReclaimEnd as u32),
                pid: 42,
                tgid: 40,
                comm: "postgres".into(),
                cgroup_id: 7,
                stall_ns: 1_500,
                value: 32,
                order: 0,
                gfp_flags: 0xcc0,
                events: 3,
            }),
            Record::Event(EventRecord {
                ts_ns: 6_000,
                kind: EventKind::MemoryEvents {
                    high: 1,
                    max: 2,
                    oom: 0,
                    oom_kill: 0,
                },
                pid: 0,
                tgid: 0,
                comm: String::new(),
                cgroup_id: 0,
                stall_ns: 0,
                value: 0,
                order: -1,
                gfp_flags: 0,
                events: 1,
            }),
            Record::Reading(ReadingRecord {
                ts_ns: 6_500,
                non_reclaimable: Some(100 << 20),
                current: None,
                memory_high: Some(MemoryHigh::Max),
            }),
            Record::Step(StepRecord {
                input: Input::Pressure {
                    at: Duration::from_nanos(7_000),
                    signal: PressureSignal::MemcgReclaim {
                        stall: Duration::from_micros(3),
                    },
                    reading: Some(5),
                },
                actions: vec![
                    ActionRecord::SetMemoryHigh {
                        value: MemoryHigh::Bytes(1 << 30),
                    },
                    ActionRecord::Reply(OutcomeRecord::Downscale {
                        ok: false,
                        status: "no".into(),
                    }),
                    ActionRecord::Decision(
                        serde_json::json!({"at": {"secs": 0, "nanos": 7000}, "kind": "ignored"}),
                    ),
                ],
            }),
            Record::Step(StepRecord {
                input: Input::Applied {
                    at: Duration::from_nanos(8_000),
                    effect: Effect::FileCache { bytes: 1 << 20 },
                    result: Err("boom".into()),
                },
                actions: vec![],
            }),
            Record::Step(StepRecord {
                input: Input::Applied {
                    at: Duration::from_nanos(8_001),
                    effect: Effect::MemoryHigh {
                        value: MemoryHigh::Max,
                    },
                    result: Ok(()),
                },
                actions: vec![ActionRecord::ScheduleTick {
                    at: Duration::from_millis(9),
                }],
            }),
            Record::End {
                at_ns: 9_000,
                records: 6,
                dropped: 0,
                continued: false,
            },
        ]
    }

    fn encode(records: &[Record]) -> Vec<u8> {
        let mut w = RecordWriter::new(Vec::new(), &header()).unwrap();
        for r in records {
            w.write(r).unwrap();
        }
        w.into_inner()
    }

    #[test]
    fn round_trips_every_record_kind() {
        let records = sample_records();
        let bytes = encode(&records);
        let rec = Recording::from_bytes(&bytes).unwrap();
        assert_eq!(rec.header, header());
        assert_eq!(rec.records, records);
        assert!(rec.issues.is_empty(), "{:?}", rec.issues);
        assert!(rec.warnings().is_empty(), "{:?}", rec.warnings());
    }

    #[test]
    fn events_are_compact() {
        let frame = encode_record(&sample_records()[0]).unwrap();
        assert!(frame.len() < 64, "{} bytes", frame.len());
    }

    #[test]
    fn truncated_tail_is_reported_and_the_rest_kept() {
        let records = sample_records();
        let bytes = encode(&records);
        let rec = Recording::from_bytes(&bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(rec.records, records[..records.len() - 1]);
        assert_eq!(rec.issues.len(), 1);
        assert!(matches!(rec.issues[0].error, ReadError::Truncated { .. }));
        let text = rec.warnings().join("\n");
        assert!(text.contains("truncated"), "{text}");
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let bytes = encode(&sample_records());
        let err = Recording::from_bytes(b"").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = Recording::from_bytes(b"{\"ts_ns\":1}\n").unwrap_err();
        assert!(err.to_string().contains("trace --output"), "{err}");
        let err = Recording::from_bytes(&bytes[..5]).unwrap_err();
        assert!(matches!(err, ReadError::TruncatedHeader { .. }), "{err}");
        let err = Recording::from_bytes(&bytes[..30]).unwrap_err();
        assert!(
            err.to_string().contains("truncated inside its header"),
            "{err}"
        );
        let mut old = bytes.clone();
        old[8] = 0;
        let err = Recording::from_bytes(&old).unwrap_err();
        assert!(err.to_string().contains("older"), "{err}");
        let mut new = bytes.clone();
        new[8] = 9;
        let err = Recording::from_bytes(&new).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0xff;
        let rec = Recording::from_bytes(&flipped).unwrap();
        assert!(matches!(rec.issues[0].error, ReadError::Corrupt { .. }));
    }

    #[test]
    fn unreadable_policy_config_costs_only_replay() {
        let mut json = serde_json::to_value(header()).unwrap();
        json["policy"] = serde_json::json!({"renamed_field": 1});
        let payload = serde_json::to_vec(&json).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        push_frame(&mut bytes, &payload).unwrap();
        bytes.extend_from_slice(&encode_record(&sample_records()[0]).unwrap());
        let rec = Recording::from_bytes(&bytes).unwrap();
        assert_eq!(rec.header.policy, None);
        assert!(rec.header.policy_error.is_some());
        assert_eq!(rec.records.len(), 1);
        assert!(
            rec.warnings()
                .iter()
                .any(|w| w.contains("replay is not possible"))
        );
    }

    #[test]
    fn unknown_records_are_skipped() {
        let mut w = RecordWriter::new(Vec::new(), &header()).unwrap();
        w.write(&sample_records()[0]).unwrap();
        let garbage = rmp_serde::to_vec(&("future_record", 1, 2)).unwrap();
        let mut frame = Vec::new();
        push_frame(&mut frame, &garbage).unwrap();
        w.write_frame(&frame).unwrap();
        w.write(&sample_records()[1]).unwrap();
        let rec = Recording::from_bytes(&w.into_inner()).unwrap();
        assert_eq!(rec.records.len(), 2);
        assert!(rec.issues[0].error.is_skippable());
    }

    #[test]
    fn timeline_extracts_series_and_markers() {
        let rec = Recording::from_bytes(&encode(&sample_records())).unwrap();
        let t = rec.timeline();
        assert_eq!(t.start_ns, 1_000);
        assert_eq!(t.stalls.len(), 1);
        assert_eq!(t.stalls[0].stall_ns, 1_500);
        assert_eq!(
            t.non_reclaimable,
            vec![
                Change {
                    ts_ns: 6_500,
                    value: 100 << 20
                },
                Change {
                    ts_ns: 7_000,
                    value: 5
                }
            ]
        );
        assert_eq!(
            t.memory_high,
            vec![Change {
                ts_ns: 6_500,
                value: None
            }]
        );
        assert!(t.file_cache.is_empty(), "a failed resize is not a size");
        assert_eq!(t.events.len(), 2);
    }

    #[test]
    fn recorder_writes_a_file_and_counts_nothing_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.vmrec");
        let r = Recorder::create(&path, header()).unwrap();
        let mut ev = PressureEvent::now(PressureKind::Kernel(RecordKind::OomVictim));
        ev.value = 99;
        r.record_event(&ev);
        r.record_step(
            &Input::Tick {
                at: Duration::from_secs(1),
            },
            &[Action::ScheduleTick {
                at: Duration::from_secs(2),
            }],
        );
        let stats = r.finish().unwrap();
        assert_eq!(stats.dropped, 0);
        let rec = Recording::load(&path).unwrap();
        assert_eq!(rec.records.len(), 3);
        assert!(rec.warnings().is_empty(), "{:?}", rec.warnings());
        assert!(matches!(rec.records[2], Record::End { records: 2, .. }));
    }

    #[test]
    fn rolling_rotates_and_keeps_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("vm-monitor-0000000000001-1-000000.vmrec"),
            [0u8; 6000],
        )
        .unwrap();
        std::fs::write(dir.path().join("unrelated.txt"), [0u8; 100]).unwrap();
        let r = RollingRecorder::new(dir.path(), 4096, 3 * 4096)
            .unwrap()
            .start(header())
            .unwrap();
        let mut ev = PressureEvent::now(PressureKind::Kernel(RecordKind::KswapdWake));
        ev.comm = "kswapd0".into();
        for i in 0..2000 {
            ev.ts_ns = i;
            r.record_event(&ev);
            if i % 100 == 0 {
                // Let the writer keep up: this test is about rotation, not drops.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let stats = r.finish().unwrap();
        assert!(stats.files > 3, "{stats:?}");
        let mut total = 0;
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let e = e.unwrap();
            let len = e.metadata().unwrap().len();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".vmrec") {
                assert!(len <= 4096, "{name} is {len} bytes");
                total += len;
            }
            names.push(name);
        }
        assert!(total <= 3 * 4096, "{total} bytes: {names:?}");
        assert!(names.contains(&"unrelated.txt".to_string()));
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("vm-monitor-0000000000001"))
        );
        // The directory reads as the latest run, its oldest segments reported missing.
        let rec = Recording::load(dir.path()).unwrap();
        assert!(!rec.missing_segments().is_empty());
        assert!(rec.segments.last().unwrap().clean_end);
        let kept = rec.events().count() as u64;
        assert!(kept > 0 && kept < 2000);
        let ts: Vec<u64> = rec.events().map(|e| e.ts_ns).collect();
        assert!(
            ts.windows(2).all(|w| w[1] == w[0] + 1),
            "segments out of order"
        );
        assert_eq!(*ts.last().unwrap(), 1999);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.vmrec");
        let file = File::create(&path).unwrap();
        let writer = RecordWriter::new(BufWriter::new(file), &header()).unwrap();
        let r = Recorder::spawn(
            Sink::File {
                path: path.clone(),
                writer,
            },
            1,
        )
        .unwrap();
        let ev = PressureEvent::now(PressureKind::Kernel(RecordKind::KswapdWake));
        const SENT: u64 = 20_000;
        for _ in 0..SENT {
            r.record_event(&ev);
        }
        let dropped_at_send = r.dropped();
        let stats = r.finish().unwrap();
        assert_eq!(stats.dropped, dropped_at_send);
        let rec = Recording::load(&path).unwrap();
        let written = rec.events().count() as u64;
        assert_eq!(
            written + stats.dropped,
            SENT,
            "every record is written or counted"
        );
        assert_eq!(rec.dropped(), stats.dropped);
        if stats.dropped > 0 {
            assert!(
                rec.records
                    .iter()
                    .any(|r| matches!(r, Record::Dropped { .. }))
            );
            assert!(rec.warnings().iter().any(|w| w.contains("dropped")));
        }
    }

    #[test]
    fn recorder_can_move_to_the_engine_task() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Recorder>();
    }

    #[test]
    fn rolling_rejects_silly_limits() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RollingRecorder::new(dir.path(), 100, 1 << 20).is_err());
        assert!(RollingRecorder::new(dir.path(), 1 << 20, 1 << 10).is_err());
    }
}
