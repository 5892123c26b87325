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
//! Every frame is self-delimiting and checksummed. A reader keeps everything before a truncated
//! or damaged frame, skips the damage to the next intact frame (one warning per damaged run,
//! whatever its size: a crash-zeroed tail of a gigabyte is one line) and reads on; a frame
//! whose checksum is right but whose record is unknown is skipped and reported. Reading is
//! bounded whatever the input: one frame of at most [`MAX_FRAME_BYTES`] is buffered, at most
//! [`MAX_ISSUES`] problems are kept (the rest counted), and time is linear in the input size
//! (see [`RecordReader`]). Times are CLOCK_BOOTTIME nanoseconds (the
//! clock eBPF stamps events with, and perf/trace-cmd's `boot` clock); policy inputs carry the
//! same clock as a `Duration`. A clean end is marked by [`Record::End`]; a file without one was
//! cut short (crash, power loss, kill -9) and says so when read.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
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
/// Largest frame payload the writer produces and a reader accepts. The largest records are
/// policy steps (an input, its actions and decisions, peer texts cut short) and the header (a
/// JSON configuration), a few KiB each: 1 MiB leaves ample room while bounding what a damaged
/// length field can make a reader buffer or checksum.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;
/// Problems a reader keeps, with their offsets; more are only counted. Enough to see the
/// pattern of the damage, few enough to print.
pub const MAX_ISSUES: usize = 32;
/// Records [`TimeOrdered`] holds to sort a stream; see there.
pub const REORDER_RECORDS: usize = 4096;
/// Frame bytes [`TimeOrdered`] holds at most (one frame of any size always fits).
pub const REORDER_BYTES: usize = MAX_FRAME_BYTES as usize;
/// The clock every timestamp in a recording uses.
pub const CLOCK: &str = "CLOCK_BOOTTIME";

const PREAMBLE_BYTES: usize = MAGIC.len() + 2;
const FRAME_HEADER_BYTES: usize = 8;
/// Bytes read from the input at a time.
const READ_CHUNK: usize = 64 << 10;
/// Decoder messages kept in an issue, characters.
const MAX_REASON_CHARS: usize = 200;
/// Nesting a record may have (real ones have a handful of levels).
const MAX_RECORD_DEPTH: usize = 64;
/// Checksum work the reader may spend on candidate frames that turn out damaged: a start
/// (a few of the largest frames) plus this much per input byte consumed. It keeps skipping
/// garbage linear; intact files never come near it.
const CHECK_CREDIT_START: u64 = 4 * MAX_FRAME_BYTES as u64;
const CHECK_CREDIT_PER_BYTE: u64 = 16;
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
    /// `len` bytes from `offset` hold no intact frame (damage, garbage, zeros) and were
    /// skipped; `at_end`: they run to the end of the file, else reading resumed after them.
    Corrupt {
        offset: u64,
        len: u64,
        reason: String,
        at_end: bool,
    },
    /// The frame at `offset` is intact but holds no record this build knows; it is skipped.
    Undecodable { offset: u64, reason: String },
    /// Not a regular file (a FIFO, device, socket or directory): never opened for reading.
    NotAFile { kind: &'static str },
    /// Reading failed.
    Io { reason: String },
}

impl ReadError {
    /// Whether records after this one can still be read.
    pub fn is_skippable(&self) -> bool {
        matches!(
            self,
            ReadError::Undecodable { .. } | ReadError::Corrupt { at_end: false, .. }
        )
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
            ReadError::Corrupt {
                offset,
                len,
                reason,
                at_end: true,
            } => write!(
                f,
                "{len} bytes of damaged data at bytes {offset}..{} (the end of the file) \
                 ignored ({reason}); the records before them were read",
                offset.saturating_add(*len)
            ),
            ReadError::Corrupt {
                offset,
                len,
                reason,
                at_end: false,
            } => write!(
                f,
                "{len} bytes of damaged data at bytes {offset}..{} skipped ({reason}); reading \
                 resumed at the next intact record",
                offset.saturating_add(*len)
            ),
            ReadError::Undecodable { offset, reason } => {
                write!(f, "unreadable record at byte {offset} skipped ({reason})")
            }
            ReadError::NotAFile { kind } => write!(
                f,
                "not a regular file but a {kind}; recordings are read only from regular files"
            ),
            ReadError::Io { reason } => write!(f, "read error: {reason}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// `reason`, cut to [`MAX_REASON_CHARS`]: decoder messages can quote the input.
fn bounded_reason(mut reason: String) -> String {
    if let Some((cut, _)) = reason.char_indices().nth(MAX_REASON_CHARS) {
        reason.truncate(cut);
        reason.push('…');
    }
    reason
}

/// What `path` is, when it is not a regular file.
fn special_kind(ft: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt as _;
    if ft.is_file() {
        None
    } else if ft.is_dir() {
        Some("directory")
    } else if ft.is_fifo() {
        Some("FIFO (named pipe)")
    } else if ft.is_char_device() {
        Some("character device")
    } else if ft.is_block_device() {
        Some("block device")
    } else if ft.is_socket() {
        Some("socket")
    } else if ft.is_symlink() {
        Some("symbolic link")
    } else {
        Some("special file")
    }
}

/// Opens `path` for reading only if it is a regular file. A FIFO or device could block the
/// open or every read forever, so the type is checked before opening, the open itself cannot
/// block (O_NONBLOCK, for a FIFO swapped in after the check), and the opened file is checked
/// again. O_NONBLOCK changes nothing for reads of a regular file.
pub fn open_regular(path: &Path) -> Result<File, ReadError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |what: &str, e: io::Error| ReadError::Io {
        reason: format!("{what}: {e}"),
    };
    let meta = std::fs::metadata(path).map_err(|e| io("opening", e))?;
    if let Some(kind) = special_kind(&meta.file_type()) {
        return Err(ReadError::NotAFile { kind });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| io("opening", e))?;
    let meta = file
        .metadata()
        .map_err(|e| io("checking the opened file", e))?;
    if let Some(kind) = special_kind(&meta.file_type()) {
        return Err(ReadError::NotAFile { kind });
    }
    Ok(file)
}

/// A sliding window over the input: the reader looks at most one frame (header and payload,
/// at most `FRAME_HEADER_BYTES + MAX_FRAME_BYTES`) ahead of its position, so the buffer stays
/// below about twice that whatever the input, and holds only bytes that are there; every
/// input byte is read once and copied at most once more (compaction happens only when the
/// consumed part outweighs the rest).
struct Window<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Input offset of `buf[pos]`.
    offset: u64,
    eof: bool,
}

impl<R: Read> Window<R> {
    fn new(inner: R) -> Self {
        Window {
            inner,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            offset: 0,
            eof: false,
        }
    }

    /// Makes `n` bytes from the position available (fewer only at the end of the input) and
    /// returns how many are.
    fn fill(&mut self, n: usize) -> Result<usize, ReadError> {
        while self.end - self.pos < n && !self.eof {
            if self.pos > 0 && self.pos >= self.end - self.pos {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            }
            // Grown by what arrives, not by what a length field claims.
            let want = self.end + READ_CHUNK;
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(ReadError::Io {
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok((self.end - self.pos).min(n))
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    fn advance(&mut self, k: usize) {
        let k = k.min(self.end - self.pos);
        self.pos += k;
        self.offset += k as u64;
    }
}

/// Why no intact frame starts at a position (kept cheap: it is computed for every byte of a
/// damaged region, and turned into text only for the region's first).
#[derive(Clone, Copy, Debug)]
enum Bad {
    /// The input ends inside the frame: `available` of `needed` bytes.
    Cut {
        len: Option<u32>,
        needed: u64,
        available: u64,
    },
    Empty,
    TooLong(u32),
    NoRecord,
    Unchecked(u32),
    Checksum,
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bad::Cut { len: None, .. } => write!(f, "frame header cut short"),
            Bad::Cut { len: Some(l), .. } => {
                write!(f, "frame length {l} runs past the end of the file")
            }
            Bad::Empty => write!(f, "empty frame, which the writer never produces"),
            Bad::TooLong(l) => {
                write!(
                    f,
                    "frame length {l} exceeds the {MAX_FRAME_BYTES}-byte limit"
                )
            }
            Bad::NoRecord => write!(f, "no record starts there"),
            Bad::Unchecked(l) => write!(
                f,
                "frame length {l} not checked: the damage before it used up the checking budget"
            ),
            Bad::Checksum => write!(f, "checksum mismatch"),
        }
    }
}

enum Check {
    /// An intact frame with a payload of this many bytes.
    Frame(usize),
    Bad(Bad),
    /// No bytes left.
    End,
}

/// A run of bytes being skipped.
struct Region {
    start: u64,
    first: Bad,
    zeros: bool,
}

impl Region {
    fn into_error(self, end: u64, at_end: bool) -> ReadError {
        let len = end.saturating_sub(self.start);
        if self.zeros {
            return ReadError::Corrupt {
                offset: self.start,
                len,
                reason: "all zero bytes".to_string(),
                at_end,
            };
        }
        match self.first {
            Bad::Cut {
                needed, available, ..
            } if at_end => ReadError::Truncated {
                offset: self.start,
                needed,
                available,
            },
            first => ReadError::Corrupt {
                offset: self.start,
                len,
                reason: first.to_string(),
                at_end,
            },
        }
    }
}

/// Whether a payload starting with `b0 b1` can be a record: every [`Record`] is a one-entry
/// MessagePack map keyed by its variant's name (a short string). Only used to resynchronise:
/// it keeps the checksum from being computed at almost every offset of garbage.
fn plausible_record(b0: u8, b1: u8) -> bool {
    b0 == 0x81 && (0xa1..=0xbf).contains(&b1)
}

fn decode_record(payload: &[u8]) -> Result<Record, String> {
    let mut de = rmp_serde::Deserializer::from_read_ref(payload);
    // Real records nest a few levels; a deep nest of arrays must not run the stack out.
    de.set_max_depth(MAX_RECORD_DEPTH);
    Record::deserialize(&mut de).map_err(|e| bounded_reason(e.to_string()))
}

/// Reads the records of one file, one at a time, holding one frame.
///
/// After a damaged frame the reader resynchronises: it moves on byte by byte until an intact
/// frame (known length, right checksum and, there, the shape of a record) starts, and reports
/// the whole skipped run as one [`ReadError::Corrupt`] (or [`ReadError::Truncated`] when the
/// run is a last frame cut short). Skipping is linear: most offsets are refused from their
/// 8-byte frame header, runs of zeros are stepped over at once, and the checksums of candidate
/// frames that turn out wrong are paid from a budget that grows with the input consumed
/// (`CHECK_CREDIT_START` plus `CHECK_CREDIT_PER_BYTE` per byte), so no input can make the
/// reader hash more than a constant times its size.
pub struct RecordReader<R: Read> {
    win: Window<R>,
    header: Header,
    done: bool,
    credit: u64,
    hashed: u64,
    /// An intact frame found at the end of a skipped run, read by the next call.
    verified: Option<usize>,
    last_frame: usize,
}

impl<R: Read> RecordReader<R> {
    /// Checks the magic and version and reads the header.
    pub fn new(inner: R) -> Result<Self, ReadError> {
        let mut win = Window::new(inner);
        let n = win.fill(PREAMBLE_BYTES)?;
        let pre = &win.data()[..n];
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
        win.advance(PREAMBLE_BYTES);
        let mut reader = RecordReader {
            win,
            header: placeholder_header(),
            done: false,
            credit: CHECK_CREDIT_START,
            hashed: 0,
            verified: None,
            last_frame: 0,
        };
        let len = match reader.check(false)? {
            Check::Frame(len) => len,
            Check::End => {
                return Err(ReadError::TruncatedHeader {
                    len: PREAMBLE_BYTES as u64,
                });
            }
            Check::Bad(Bad::Cut { available, .. }) => {
                return Err(ReadError::TruncatedHeader {
                    len: PREAMBLE_BYTES as u64 + available,
                });
            }
            Check::Bad(bad) => {
                return Err(ReadError::BadHeader {
                    reason: bad.to_string(),
                });
            }
        };
        let header = parse_header(&reader.win.data()[FRAME_HEADER_BYTES..][..len])?;
        if header.format_version != FORMAT_VERSION {
            return Err(ReadError::UnsupportedVersion {
                found: header.format_version,
            });
        }
        reader.consume(FRAME_HEADER_BYTES + len);
        reader.header = header;
        Ok(reader)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Byte offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.win.offset
    }

    /// Size of the frame of the last record returned, header included.
    pub fn last_frame_bytes(&self) -> usize {
        self.last_frame
    }

    /// Payload bytes checksummed so far, intact frames included: the reader's main cost.
    pub fn hashed_bytes(&self) -> u64 {
        self.hashed
    }

    fn consume(&mut self, k: usize) {
        self.win.advance(k);
        self.credit = self
            .credit
            .saturating_add((k as u64).saturating_mul(CHECK_CREDIT_PER_BYTE));
    }

    /// Whether an intact frame starts at the position. `resync`: after damage, where a frame
    /// must also look like a record to be believed.
    fn check(&mut self, resync: bool) -> Result<Check, ReadError> {
        let avail = self.win.fill(FRAME_HEADER_BYTES)?;
        if avail == 0 {
            return Ok(Check::End);
        }
        if avail < FRAME_HEADER_BYTES {
            return Ok(Check::Bad(Bad::Cut {
                len: None,
                needed: FRAME_HEADER_BYTES as u64,
                available: avail as u64,
            }));
        }
        let d = self.win.data();
        let len = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        let crc = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
        if len == 0 {
            return Ok(Check::Bad(Bad::Empty));
        }
        if len > MAX_FRAME_BYTES {
            return Ok(Check::Bad(Bad::TooLong(len)));
        }
        let total = FRAME_HEADER_BYTES + len as usize;
        if resync {
            let n = self.win.fill(FRAME_HEADER_BYTES + 2)?;
            let d = self.win.data();
            if n < FRAME_HEADER_BYTES + 2 || !plausible_record(d[8], d[9]) {
                return Ok(Check::Bad(Bad::NoRecord));
            }
        }
        let avail = self.win.fill(total)?;
        if avail < total {
            return Ok(Check::Bad(Bad::Cut {
                len: Some(len),
                needed: total as u64,
                available: avail as u64,
            }));
        }
        if u64::from(len) > self.credit {
            return Ok(Check::Bad(Bad::Unchecked(len)));
        }
        self.hashed += u64::from(len);
        if crc32fast::hash(&self.win.data()[FRAME_HEADER_BYTES..total]) != crc {
            self.credit -= u64::from(len);
            return Ok(Check::Bad(Bad::Checksum));
        }
        Ok(Check::Frame(len as usize))
    }

    /// Moves past the offset of a bad frame: one byte, or a run of zeros at once (no frame
    /// starts where its length field is zero).
    fn skip(&mut self, region: &mut Region) -> Result<(), ReadError> {
        if self.win.data().first() == Some(&0) {
            self.win.fill(READ_CHUNK)?;
            let d = self.win.data();
            let zeros = d.iter().position(|b| *b != 0).unwrap_or(d.len());
            self.consume(zeros.saturating_sub(3).max(1));
        } else {
            region.zeros = false;
            self.consume(1);
        }
        Ok(())
    }

    /// The next record, or a problem (one per damaged run); `None` at the end.
    pub fn next_record(&mut self) -> Option<Result<Record, ReadError>> {
        if self.done {
            return None;
        }
        let mut region: Option<Region> = None;
        loop {
            let check = match self.verified.take() {
                Some(len) => Check::Frame(len),
                None => match self.check(region.is_some()) {
                    Ok(c) => c,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
            };
            match check {
                Check::End => {
                    self.done = true;
                    return region.map(|r| Err(r.into_error(self.win.offset, true)));
                }
                Check::Frame(len) => {
                    if let Some(r) = region {
                        self.verified = Some(len);
                        return Some(Err(r.into_error(self.win.offset, false)));
                    }
                    let start = self.win.offset;
                    let total = FRAME_HEADER_BYTES + len;
                    let result = decode_record(&self.win.data()[FRAME_HEADER_BYTES..total])
                        .map_err(|reason| ReadError::Undecodable {
                            offset: start,
                            reason,
                        });
                    self.consume(total);
                    self.last_frame = total;
                    return Some(result);
                }
                Check::Bad(bad) => {
                    let offset = self.win.offset;
                    let r = region.get_or_insert(Region {
                        start: offset,
                        first: bad,
                        zeros: true,
                    });
                    if let Err(e) = self.skip(r) {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
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
        reason: bounded_reason(format!("not a header: {e}")),
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
            Err(e) => header.policy_error = Some(bounded_reason(e.to_string())),
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
    /// Its last frame was cut short, or reading it failed (said by its issue).
    pub cut_short: bool,
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

/// What reading a recording found besides its records: kept (bounded) while records stream.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadSummary {
    /// The first segment's header.
    pub header: Header,
    pub segments: Vec<Segment>,
    /// The first [`MAX_ISSUES`] problems.
    pub issues: Vec<Issue>,
    /// Problems beyond those, only counted.
    pub issues_omitted: u64,
    /// Records read.
    pub records: u64,
    /// Records the recorder reported as lost.
    pub dropped: u64,
}

impl ReadSummary {
    fn push_issue(&mut self, issue: Issue) {
        push_issue(&mut self.issues, &mut self.issues_omitted, issue);
    }

    /// Segments the run is missing; see [`Recording::missing_segments`].
    pub fn missing_segments(&self) -> Vec<u32> {
        missing_segments(self.segments.iter().map(|s| s.segment))
    }

    /// Human-readable warnings, as [`Recording::warnings`].
    pub fn warnings(&self) -> Vec<String> {
        warnings(
            &self.header,
            &self.segments,
            &self.issues,
            self.issues_omitted,
            self.dropped,
        )
    }
}

fn push_issue(issues: &mut Vec<Issue>, omitted: &mut u64, issue: Issue) {
    if issues.len() < MAX_ISSUES {
        issues.push(issue);
    } else {
        *omitted += 1;
    }
}

/// Gaps in a run's segment numbers (given in order), and those before the first; at most
/// [`MAX_ISSUES`] are listed.
pub fn missing_segments(present: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut missing = Vec::new();
    let mut expect = 0u32;
    for s in present {
        // A huge segment number in a damaged header must not make this list huge.
        while expect < s && missing.len() < MAX_ISSUES {
            missing.push(expect);
            expect += 1;
        }
        expect = expect.max(s.saturating_add(1));
    }
    missing
}

fn warnings(
    header: &Header,
    segments: &[Segment],
    issues: &[Issue],
    omitted: u64,
    dropped: u64,
) -> Vec<String> {
    let mut w: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
    if omitted > 0 {
        w.push(format!(
            "{omitted} more problem(s) not listed (only the first {MAX_ISSUES} are kept)"
        ));
    }
    if let Some(e) = &header.policy_error {
        w.push(format!(
            "the recorded policy configuration is unreadable by this vm-monitor ({e}); \
             replay is not possible"
        ));
    }
    let missing = missing_segments(segments.iter().map(|s| s.segment));
    if !missing.is_empty() {
        w.push(format!(
            "run {} is missing segment(s) {:?} (deleted by the rolling budget?)",
            header.run_id, missing
        ));
    }
    if let Some(last) = segments.last()
        && !last.clean_end
        && !last.cut_short
    {
        w.push(
            "no end marker: the recorder did not finish (still running, killed, or crashed)"
                .to_string(),
        );
    }
    if dropped > 0 {
        w.push(format!(
            "{dropped} record(s) were dropped while recording (recorder queue full or disk \
             error)"
        ));
    }
    w
}

type Source<'a> = RecordReader<Box<dyn Read + 'a>>;

fn open_source(path: &Path) -> Result<Source<'static>, ReadError> {
    let file = open_regular(path)?;
    RecordReader::new(Box::new(file) as Box<dyn Read>)
}

/// Reads a recording (one file, or the segments of one rolling run in order) record by
/// record, holding one frame of input and the [`ReadSummary`] (whose issue list is capped):
/// what `trace export`, `trace plot` and `replay` stream through. [`Recording`] collects it.
pub struct RecordingReader<'a> {
    file: Option<Source<'a>>,
    path: Option<PathBuf>,
    /// Segments of the run not opened yet.
    queue: VecDeque<PathBuf>,
    /// Segment numbers of the run's files, as listed.
    planned: Vec<u32>,
    /// The run's files (none for in-memory bytes).
    paths: Vec<PathBuf>,
    summary: ReadSummary,
    last_frame: usize,
    skipped_segments: u64,
}

impl<'a> RecordingReader<'a> {
    /// Reads a recording held in memory. Only an unreadable preamble or header is an error.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self, ReadError> {
        let source = RecordReader::new(Box::new(bytes) as Box<dyn Read + 'a>)?;
        let segment = source.header().segment;
        Ok(Self::start(
            source,
            None,
            VecDeque::new(),
            vec![segment],
            Vec::new(),
        ))
    }

    fn start(
        source: Source<'a>,
        path: Option<PathBuf>,
        queue: VecDeque<PathBuf>,
        planned: Vec<u32>,
        paths: Vec<PathBuf>,
    ) -> Self {
        let header = source.header().clone();
        let segment = Segment {
            path: path.clone(),
            segment: header.segment,
            first_record: 0,
            records: 0,
            clean_end: false,
            cut_short: false,
        };
        RecordingReader {
            file: Some(source),
            path,
            queue,
            planned,
            paths,
            summary: ReadSummary {
                header,
                segments: vec![segment],
                issues: Vec::new(),
                issues_omitted: 0,
                records: 0,
                dropped: 0,
            },
            last_frame: 0,
            skipped_segments: 0,
        }
    }

    /// The first segment's header.
    pub fn header(&self) -> &Header {
        &self.summary.header
    }

    /// What was read so far besides the records.
    pub fn summary(&self) -> &ReadSummary {
        &self.summary
    }

    pub fn into_summary(self) -> ReadSummary {
        self.summary
    }

    /// The segment numbers of every file of the run, as listed before reading.
    pub fn planned_segments(&self) -> &[u32] {
        &self.planned
    }

    /// The files of the run, as listed before reading.
    pub fn planned_paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Segments after the first that could not be opened (each is also an issue).
    pub fn skipped_segments(&self) -> u64 {
        self.skipped_segments
    }

    /// Size of the frame of the last record returned.
    pub fn last_frame_bytes(&self) -> usize {
        self.last_frame
    }

    /// The next record; problems are collected in the summary. `None` at the end.
    pub fn next_record(&mut self) -> Option<Record> {
        loop {
            let file = self.file.as_mut()?;
            match file.next_record() {
                Some(Ok(rec)) => {
                    self.last_frame = file.last_frame_bytes();
                    let s = &mut self.summary;
                    if let Some(seg) = s.segments.last_mut() {
                        seg.records += 1;
                        seg.clean_end = matches!(rec, Record::End { .. });
                    }
                    s.records += 1;
                    if let Record::Dropped { total, .. } | Record::End { dropped: total, .. } = &rec
                    {
                        s.dropped = s.dropped.max(*total);
                    }
                    return Some(rec);
                }
                Some(Err(error)) => {
                    if matches!(error, ReadError::Truncated { .. } | ReadError::Io { .. })
                        && let Some(seg) = self.summary.segments.last_mut()
                    {
                        seg.cut_short = true;
                    }
                    let path = self.path.clone();
                    self.summary.push_issue(Issue { path, error });
                }
                None => {
                    self.file = None;
                    self.open_next();
                }
            }
        }
    }

    /// Opens the next segment that can be opened; each that cannot is an issue.
    fn open_next(&mut self) {
        while let Some(path) = self.queue.pop_front() {
            match open_source(&path) {
                Ok(source) => {
                    self.summary.segments.push(Segment {
                        path: Some(path.clone()),
                        segment: source.header().segment,
                        first_record: usize::try_from(self.summary.records).unwrap_or(usize::MAX),
                        records: 0,
                        clean_end: false,
                        cut_short: false,
                    });
                    self.file = Some(source);
                    self.path = Some(path);
                    return;
                }
                Err(error) => {
                    self.skipped_segments += 1;
                    self.summary.push_issue(Issue {
                        path: Some(path),
                        error,
                    });
                }
            }
        }
    }
}

impl RecordingReader<'static> {
    /// Opens a file, or a `--record-dir` directory: the segments of its most recent run, in
    /// order (older runs in the directory are ignored, with a note in the issues). Only
    /// regular files are opened (see [`open_regular`]).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
        if meta.is_dir() {
            Self::open_dir(path)
        } else {
            Self::open_file(path)
        }
    }

    /// Opens one recording file.
    pub fn open_file(path: &Path) -> anyhow::Result<Self> {
        let source = open_source(path).with_context(|| format!("reading {}", path.display()))?;
        let planned = vec![source.header().segment];
        Ok(Self::start(
            source,
            Some(path.to_path_buf()),
            VecDeque::new(),
            planned,
            vec![path.to_path_buf()],
        ))
    }

    fn open_dir(path: &Path) -> anyhow::Result<Self> {
        struct Candidate {
            run_id: String,
            start_unix_ns: u64,
            segment: u32,
            path: PathBuf,
        }
        let mut candidates = Vec::new();
        let mut issues = Vec::new();
        let mut omitted = 0u64;
        let entries =
            std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
                continue;
            }
            match open_source(&p) {
                Ok(r) => {
                    let h = r.header();
                    candidates.push(Candidate {
                        run_id: h.run_id.clone(),
                        start_unix_ns: h.start_unix_ns,
                        segment: h.segment,
                        path: p,
                    });
                }
                Err(error) => push_issue(
                    &mut issues,
                    &mut omitted,
                    Issue {
                        path: Some(p),
                        error,
                    },
                ),
            }
        }
        let Some(latest) = candidates
            .iter()
            .max_by_key(|c| (c.start_unix_ns, c.segment))
            .map(|c| c.run_id.clone())
        else {
            bail!(
                "{} holds no readable recording (*.{EXTENSION}){}",
                path.display(),
                issues
                    .first()
                    .map(|i| format!("; e.g. {i}"))
                    .unwrap_or_default()
            );
        };
        let other_runs = candidates.iter().filter(|c| c.run_id != latest).count();
        let mut run: Vec<(u32, PathBuf)> = candidates
            .into_iter()
            .filter(|c| c.run_id == latest)
            .map(|c| (c.segment, c.path))
            .collect();
        run.sort();
        let planned: Vec<u32> = run.iter().map(|(s, _)| *s).collect();
        let paths: Vec<PathBuf> = run.into_iter().map(|(_, p)| p).collect();
        let mut queue: VecDeque<PathBuf> = paths.iter().cloned().collect();
        let mut reader = loop {
            let Some(p) = queue.pop_front() else {
                bail!(
                    "{} holds no readable recording{}",
                    path.display(),
                    issues
                        .last()
                        .map(|i| format!("; e.g. {i}"))
                        .unwrap_or_default()
                );
            };
            match open_source(&p) {
                Ok(source) => break Self::start(source, Some(p), queue, planned, paths),
                Err(error) => push_issue(
                    &mut issues,
                    &mut omitted,
                    Issue {
                        path: Some(p),
                        error,
                    },
                ),
            }
        };
        reader.summary.issues_omitted += omitted;
        for issue in issues {
            reader.summary.push_issue(issue);
        }
        if other_runs > 0 {
            reader.summary.push_issue(Issue {
                path: Some(path.to_path_buf()),
                error: ReadError::Io {
                    reason: format!(
                        "{other_runs} segment(s) of older runs ignored; read run {latest} \
                         (pass a file to read another)"
                    ),
                },
            });
        }
        Ok(reader)
    }
}

impl Iterator for RecordingReader<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        self.next_record()
    }
}

/// A record waiting in [`TimeOrdered`]'s window, ordered by time then arrival.
struct Pending {
    ts_ns: u64,
    seq: u64,
    bytes: usize,
    record: Record,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.ts_ns, self.seq) == (other.ts_ns, other.seq)
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.ts_ns, self.seq).cmp(&(other.ts_ns, other.seq))
    }
}

/// The records of a [`RecordingReader`] in time order, as far as a bounded window allows:
/// records are nearly sorted already (per-CPU ring-buffer order), so holding the next
/// [`REORDER_RECORDS`] (at most [`REORDER_BYTES`] of frames) and always passing on the
/// earliest sorts them like a full sort would, in constant memory; a record later than that
/// comes out late instead. Same-time records keep their file order.
pub struct TimeOrdered<'r, 'a> {
    reader: &'r mut RecordingReader<'a>,
    heap: BinaryHeap<Reverse<Pending>>,
    bytes: usize,
    seq: u64,
    exhausted: bool,
}

impl<'r, 'a> TimeOrdered<'r, 'a> {
    pub fn new(reader: &'r mut RecordingReader<'a>) -> Self {
        TimeOrdered {
            reader,
            heap: BinaryHeap::new(),
            bytes: 0,
            seq: 0,
            exhausted: false,
        }
    }
}

impl Iterator for TimeOrdered<'_, '_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        while !self.exhausted && self.heap.len() < REORDER_RECORDS && self.bytes < REORDER_BYTES {
            match self.reader.next_record() {
                Some(record) => {
                    let bytes = self.reader.last_frame_bytes();
                    self.bytes += bytes;
                    self.heap.push(Reverse(Pending {
                        ts_ns: record.ts_ns(),
                        seq: self.seq,
                        bytes,
                        record,
                    }));
                    self.seq += 1;
                }
                None => self.exhausted = true,
            }
        }
        let Reverse(p) = self.heap.pop()?;
        self.bytes -= p.bytes;
        Some(p.record)
    }
}

/// A recording read into memory: one file, or the segments of one rolling run in order.
/// Holds every record: `replay`, `export` and `plot` stream through [`RecordingReader`]
/// instead.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    /// The first segment's header.
    pub header: Header,
    pub records: Vec<Record>,
    pub segments: Vec<Segment>,
    /// Truncation, damage, missing segments, missing end marker: the first [`MAX_ISSUES`].
    pub issues: Vec<Issue>,
    /// Issues beyond those, only counted.
    pub issues_omitted: u64,
}

impl Recording {
    /// Reads a recording from bytes. Only an unreadable preamble or header is an error; a
    /// damaged or truncated part becomes an [`Issue`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Recording, ReadError> {
        RecordingReader::from_bytes(bytes).map(Self::collect)
    }

    /// Reads every record of `reader`.
    pub fn collect(mut reader: RecordingReader<'_>) -> Recording {
        let mut records = Vec::new();
        while let Some(r) = reader.next_record() {
            records.push(r);
        }
        let s = reader.into_summary();
        Recording {
            header: s.header,
            records,
            segments: s.segments,
            issues: s.issues,
            issues_omitted: s.issues_omitted,
        }
    }

    /// Reads one recording file.
    pub fn load_file(path: &Path) -> anyhow::Result<Recording> {
        RecordingReader::open_file(path).map(Self::collect)
    }

    /// Reads a file, or a `--record-dir` directory (see [`RecordingReader::open`]).
    pub fn load(path: &Path) -> anyhow::Result<Recording> {
        RecordingReader::open(path).map(Self::collect)
    }

    /// Segments the run is missing (deleted by the rolling budget, or not passed): those
    /// before the first one present and gaps between them.
    pub fn missing_segments(&self) -> Vec<u32> {
        missing_segments(self.segments.iter().map(|s| s.segment))
    }

    /// Human-readable warnings: read issues, missing segments, no clean end, dropped records.
    pub fn warnings(&self) -> Vec<String> {
        warnings(
            &self.header,
            &self.segments,
            &self.issues,
            self.issues_omitted,
            self.dropped(),
        )
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

    /// The records in time order (a stable sort: same-time records keep their file order).
    pub fn time_ordered(&self) -> Vec<&Record> {
        let mut order: Vec<&Record> = self.records.iter().collect();
        order.sort_by_key(|r| r.ts_ns());
        order
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

/// The memory series of a [`Timeline`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Series {
    NonReclaimable,
    Current,
    Threshold,
    Usable,
    FileCache,
}

/// One piece of a timeline, as [`TimelineBuilder`] finds it.
#[derive(Clone, Debug, PartialEq)]
pub enum TimelineItem {
    Change(Series, Change<u64>),
    MemoryHigh(Change<Option<u64>>),
    Stall(Stall),
    Marker(Marker),
}

/// Turns records, fed in time order, into timeline items as they come: series changes,
/// stalls and markers. Holds only the last value of each series, so a whole recording can
/// stream through it ([`Timeline`] collects it; export and plot consume it directly).
#[derive(Clone, Debug, Default)]
pub struct TimelineBuilder {
    last: [Option<u64>; 5],
    last_high: Option<Option<u64>>,
    last_oom_kill: Option<u64>,
    first_ns: Option<u64>,
    last_ns: Option<u64>,
}

fn json_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    v.get(key).and_then(serde_json::Value::as_u64)
}

impl TimelineBuilder {
    /// Earliest and latest time seen; the header's `start_boot_ns` counts as seen, if set.
    pub fn span(&self, start_boot_ns: u64) -> (u64, u64) {
        let mut start = self.first_ns.unwrap_or(start_boot_ns);
        if start_boot_ns > 0 {
            start = start.min(start_boot_ns);
        }
        let end = self.last_ns.unwrap_or(start).max(start);
        (start, end)
    }

    fn time(&mut self, ts: u64) {
        self.first_ns = Some(self.first_ns.map_or(ts, |t| t.min(ts)));
        self.last_ns = Some(self.last_ns.map_or(ts, |t| t.max(ts)));
    }

    fn change(&mut self, series: Series, ts_ns: u64, value: u64, out: &mut Vec<TimelineItem>) {
        let last = &mut self.last[series as usize];
        if *last != Some(value) {
            *last = Some(value);
            out.push(TimelineItem::Change(series, Change { ts_ns, value }));
        }
    }

    fn high(&mut self, ts_ns: u64, value: Option<u64>, out: &mut Vec<TimelineItem>) {
        if self.last_high != Some(value) {
            self.last_high = Some(value);
            out.push(TimelineItem::MemoryHigh(Change { ts_ns, value }));
        }
    }

    /// Appends to `out` what `r` adds to the timeline.
    pub fn feed(&mut self, r: &Record, out: &mut Vec<TimelineItem>) {
        match r {
            Record::Event(e) => {
                self.time(e.ts_ns);
                match e.kind.record_kind() {
                    Some(k @ (RecordKind::MemcgReclaimEnd | RecordKind::DirectReclaimEnd))
                        if e.stall_ns > 0 =>
                    {
                        out.push(TimelineItem::Stall(Stall {
                            end_ns: e.ts_ns,
                            stall_ns: e.stall_ns,
                            memcg: k == RecordKind::MemcgReclaimEnd,
                            pid: e.pid,
                            tgid: e.tgid,
                            comm: e.comm.clone(),
                            nr_reclaimed: e.value,
                            events: e.events,
                        }))
                    }
                    Some(RecordKind::OomVictim) => out.push(TimelineItem::Marker(Marker {
                        ts_ns: e.ts_ns,
                        what: MarkerKind::OomKill {
                            victim_pid: Some(e.value),
                        },
                        detail: format!("OOM victim pid {} (seen in {})", e.value, e.comm),
                    })),
                    _ => {}
                }
                if let EventKind::MemoryEvents { oom_kill, .. } = e.kind {
                    if self.last_oom_kill.is_some_and(|prev| oom_kill > prev) {
                        out.push(TimelineItem::Marker(Marker {
                            ts_ns: e.ts_ns,
                            what: MarkerKind::OomKill { victim_pid: None },
                            detail: format!("memory.events oom_kill rose to {oom_kill}"),
                        }));
                    }
                    self.last_oom_kill = Some(oom_kill);
                }
            }
            Record::Reading(rd) => {
                self.time(rd.ts_ns);
                if let Some(v) = rd.non_reclaimable {
                    self.change(Series::NonReclaimable, rd.ts_ns, v, out);
                }
                if let Some(v) = rd.current {
                    self.change(Series::Current, rd.ts_ns, v, out);
                }
                if let Some(h) = rd.memory_high {
                    self.high(rd.ts_ns, h.bytes(), out);
                }
            }
            Record::Step(s) => self.step(s, out),
            // They mark how long the recording ran, events or not.
            Record::Dropped { at_ns, .. }
            | Record::KernelCounters { at_ns, .. }
            | Record::End { at_ns, .. } => self.time(*at_ns),
        }
    }

    fn step(&mut self, s: &StepRecord, out: &mut Vec<TimelineItem>) {
        let at = duration_ns(s.input.at());
        self.time(at);
        match &s.input {
            Input::Pressure {
                reading: Some(r), ..
            } => self.change(Series::NonReclaimable, at, *r, out),
            Input::Reading {
                non_reclaimable,
                current,
                ..
            } => {
                self.change(Series::NonReclaimable, at, *non_reclaimable, out);
                self.change(Series::Current, at, *current, out);
            }
            Input::Applied {
                effect,
                result: Ok(()),
                ..
            } => match effect {
                Effect::FileCache { bytes } => self.change(Series::FileCache, at, *bytes, out),
                Effect::MemoryHigh { value } => self.high(at, value.bytes(), out),
            },
            Input::UpscaleNotification { granted_mem, .. } => {
                out.push(TimelineItem::Marker(Marker {
                    ts_ns: at,
                    what: MarkerKind::UpscaleGranted {
                        granted: *granted_mem,
                    },
                    detail: format!("agent granted {} MiB", granted_mem >> 20),
                }))
            }
            Input::DownscaleRequest { target_mem, .. } => out.push(TimelineItem::Marker(Marker {
                ts_ns: at,
                what: MarkerKind::DownscaleRequest {
                    target: *target_mem,
                },
                detail: format!("agent asked to downscale to {} MiB", target_mem >> 20),
            })),
            _ => {}
        }
        for a in &s.actions {
            match a {
                ActionRecord::UpscaleRequest { text, .. } => {
                    out.push(TimelineItem::Marker(Marker {
                        ts_ns: at,
                        what: MarkerKind::UpscaleRequest,
                        detail: text.clone(),
                    }))
                }
                ActionRecord::Reply(OutcomeRecord::Downscale { ok, status }) => {
                    out.push(TimelineItem::Marker(Marker {
                        ts_ns: at,
                        what: MarkerKind::DownscaleResult { ok: *ok },
                        detail: status.clone(),
                    }))
                }
                ActionRecord::Decision(d) => {
                    let dat = d
                        .get("at")
                        .and_then(|a| Some((json_u64(a, "secs")?, json_u64(a, "nanos")?)))
                        .map(|(s, n)| s.saturating_mul(1_000_000_000).saturating_add(n))
                        .unwrap_or(at);
                    if let Some(th) = json_u64(d, "threshold").filter(|v| *v > 0) {
                        self.change(Series::Threshold, dat, th, out);
                    }
                    if let Some(u) = json_u64(d, "usable").filter(|v| *v > 0) {
                        self.change(Series::Usable, dat, u, out);
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
                        out.push(TimelineItem::Marker(Marker {
                            ts_ns: dat,
                            what: MarkerKind::Decision { kind },
                            detail,
                        }));
                    }
                }
                _ => {}
            }
        }
    }
}

impl Timeline {
    fn build(rec: &Recording) -> Timeline {
        let mut t = Timeline::default();
        let mut builder = TimelineBuilder::default();
        let mut items = Vec::new();
        for r in rec.time_ordered() {
            if let Record::Event(e) = r {
                t.events
                    .push((e.ts_ns, e.kind.name().into_owned(), e.events));
            }
            builder.feed(r, &mut items);
            for item in items.drain(..) {
                match item {
                    TimelineItem::Change(s, c) => match s {
                        Series::NonReclaimable => t.non_reclaimable.push(c),
                        Series::Current => t.current.push(c),
                        Series::Threshold => t.threshold.push(c),
                        Series::Usable => t.usable.push(c),
                        Series::FileCache => t.file_cache.push(c),
                    },
                    TimelineItem::MemoryHigh(c) => t.memory_high.push(c),
                    TimelineItem::Stall(s) => t.stalls.push(s),
                    TimelineItem::Marker(m) => t.markers.push(m),
                }
            }
        }
        (t.start_ns, t.end_ns) = builder.span(rec.header.start_boot_ns);
        t
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

    /// The preamble and header, and the frames of `records` (each with its offset).
    fn framed(records: &[Record]) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut bytes = RecordWriter::new(Vec::new(), &header())
            .unwrap()
            .into_inner();
        let mut frames = Vec::new();
        for r in records {
            let f = encode_record(r).unwrap();
            frames.push((bytes.len(), f.len()));
            bytes.extend_from_slice(&f);
        }
        (bytes, frames)
    }

    #[test]
    fn every_record_kind_looks_like_a_record_to_the_resynchroniser() {
        let mut records = sample_records();
        records.push(Record::Dropped { at_ns: 1, total: 2 });
        records.push(Record::KernelCounters {
            at_ns: 1,
            kinds: vec![],
        });
        for r in &records {
            let f = encode_record(r).unwrap();
            assert!(plausible_record(f[8], f[9]), "{r:?}: {:02x?}", &f[..12]);
        }
    }

    #[test]
    fn a_zero_tail_is_one_issue_and_loses_nothing() {
        let records = sample_records();
        let (mut bytes, _) = framed(&records);
        let valid = bytes.len();
        bytes.resize(valid + (1 << 20) + 5, 0);
        let rec = Recording::from_bytes(&bytes).unwrap();
        assert_eq!(rec.records, records);
        assert_eq!(
            rec.issues.iter().map(|i| &i.error).collect::<Vec<_>>(),
            [&ReadError::Corrupt {
                offset: valid as u64,
                len: (1 << 20) + 5,
                reason: "all zero bytes".into(),
                at_end: true,
            }]
        );
        assert_eq!(rec.warnings().len(), 1, "{:?}", rec.warnings());
        // Fewer than a frame header of zeros: still zeros, not a truncated record.
        let (mut short, _) = framed(&records);
        short.extend_from_slice(&[0, 0, 0]);
        let rec = Recording::from_bytes(&short).unwrap();
        assert_eq!(rec.records, records);
        assert!(matches!(
            rec.issues[..],
            [Issue {
                error: ReadError::Corrupt { len: 3, .. },
                ..
            }]
        ));
    }

    #[test]
    fn garbage_between_records_is_skipped_as_one_run() {
        let records = sample_records();
        let (bytes, frames) = framed(&records);
        let at = frames[2].0;
        // Deterministic noise, zero runs included.
        let noise: Vec<u8> = (0u32..5000)
            .map(|i| {
                if i % 700 < 40 {
                    0
                } else {
                    (i.wrapping_mul(2_654_435_761) >> 13) as u8
                }
            })
            .collect();
        let damaged = [&bytes[..at], &noise, &bytes[at..]].concat();
        let rec = Recording::from_bytes(&damaged).unwrap();
        assert_eq!(rec.records, records);
        assert_eq!(rec.issues.len(), 1, "{:?}", rec.issues);
        assert!(matches!(
            rec.issues[0].error,
            ReadError::Corrupt { offset, len: 5000, at_end: false, .. } if offset == at as u64
        ));
        assert!(
            rec.warnings()[0].contains("5000 bytes of damaged data"),
            "{:?}",
            rec.warnings()
        );
    }

    #[test]
    fn giant_lengths_are_refused_without_buffering_them() {
        let records = sample_records();
        let (bytes, frames) = framed(&records);
        let at = frames[3].0;
        for len in [u32::MAX, MAX_FRAME_BYTES + 1, MAX_FRAME_BYTES] {
            let mut head = len.to_le_bytes().to_vec();
            head.extend_from_slice(&[0x81, 0xa5, 0, 0]);
            let damaged = [&bytes[..at], &head, &bytes[at..]].concat();
            let mut r = RecordReader::new(damaged.as_slice()).unwrap();
            let mut got = Vec::new();
            let mut issues = Vec::new();
            for item in r.by_ref() {
                match item {
                    Ok(rec) => got.push(rec),
                    Err(e) => issues.push(e),
                }
            }
            assert_eq!(got, records, "length {len}");
            assert!(
                matches!(
                    issues[..],
                    [ReadError::Corrupt {
                        len: 8,
                        at_end: false,
                        ..
                    }]
                ),
                "{issues:?}"
            );
            assert!(r.win.buf.len() <= 2 * damaged.len() + READ_CHUNK);
        }
        // A giant length in the last frame: the file was cut short.
        let last = frames[frames.len() - 1].0;
        let mut cut = bytes[..last].to_vec();
        cut.extend_from_slice(&MAX_FRAME_BYTES.to_le_bytes());
        cut.extend_from_slice(&[1, 2, 3, 4, 5]);
        let rec = Recording::from_bytes(&cut).unwrap();
        assert_eq!(rec.records, records[..records.len() - 1]);
        assert!(matches!(
            rec.issues[..],
            [Issue { error: ReadError::Truncated { needed, available: 9, .. }, .. }]
                if needed == u64::from(MAX_FRAME_BYTES) + 8
        ));
    }

    #[test]
    fn many_damaged_runs_are_counted_not_kept() {
        let records: Vec<Record> = (0..300)
            .map(|i| Record::Dropped { at_ns: i, total: 0 })
            .collect();
        let mut bytes = RecordWriter::new(Vec::new(), &header())
            .unwrap()
            .into_inner();
        for r in &records {
            bytes.extend_from_slice(&encode_record(r).unwrap());
            bytes.push(0xee);
        }
        let rec = Recording::from_bytes(&bytes).unwrap();
        assert_eq!(rec.records, records);
        assert_eq!(rec.issues.len(), MAX_ISSUES);
        assert_eq!(rec.issues_omitted, 300 - MAX_ISSUES as u64);
        let w = rec.warnings();
        assert!(w.len() <= MAX_ISSUES + 2, "{}", w.len());
        assert!(
            w.iter().any(|w| w.contains("more problem(s) not listed")),
            "{w:?}"
        );
    }

    #[test]
    fn deep_nesting_is_an_unreadable_record_not_a_stack_overflow() {
        let step = |depth: usize| {
            let mut v = serde_json::Value::Null;
            for _ in 0..depth.min(40) {
                v = serde_json::Value::Array(vec![v]);
            }
            let rec = Record::Step(StepRecord {
                input: Input::Tick {
                    at: Duration::from_secs(1),
                },
                actions: vec![ActionRecord::Decision(v)],
            });
            let mut payload = rmp_serde::to_vec(&rec).unwrap();
            // The innermost null is the payload's last byte: nest deeper than serde_json can.
            assert_eq!(payload.pop(), Some(0xc0));
            payload.extend(std::iter::repeat_n(0x91, depth.saturating_sub(40)));
            payload.push(0xc0);
            let mut bytes = RecordWriter::new(Vec::new(), &header())
                .unwrap()
                .into_inner();
            push_frame(&mut bytes, &payload).unwrap();
            Recording::from_bytes(&bytes).unwrap()
        };
        let fine = step(20);
        assert_eq!(fine.records.len(), 1, "{:?}", fine.issues);
        let deep = step(200_000);
        assert!(deep.records.is_empty());
        assert!(matches!(
            deep.issues[0].error,
            ReadError::Undecodable { .. }
        ));
    }

    #[test]
    fn checksumming_stays_linear_on_crafted_candidates() {
        // Every 10 bytes a frame header claiming the largest payload, shaped like a record.
        let (mut bytes, _) = framed(&sample_records()[..1]);
        let start = bytes.len();
        while bytes.len() < start + (3 << 20) {
            bytes.extend_from_slice(&MAX_FRAME_BYTES.to_le_bytes());
            bytes.extend_from_slice(&[9, 9, 9, 9, 0x81, 0xa5]);
        }
        let mut r = RecordReader::new(bytes.as_slice()).unwrap();
        let items: Vec<_> = r.by_ref().collect();
        assert_eq!(items.len(), 2, "one record, one damaged run");
        let budget = CHECK_CREDIT_START + CHECK_CREDIT_PER_BYTE * bytes.len() as u64;
        assert!(
            r.hashed_bytes() <= budget + bytes.len() as u64,
            "{} bytes hashed for {} of input",
            r.hashed_bytes(),
            bytes.len()
        );
    }

    #[test]
    fn reasons_are_bounded() {
        let long = "x".repeat(10_000);
        assert!(bounded_reason(long).chars().count() <= MAX_REASON_CHARS + 1);
        assert_eq!(bounded_reason("short".into()), "short");
    }

    #[test]
    fn the_reorder_window_sorts_nearly_sorted_records() {
        let mut records: Vec<Record> = (0..10_000u64)
            .map(|i| Record::Dropped { at_ns: i, total: 0 })
            .collect();
        // Local inversions, as per-CPU buffers give.
        for i in (0..records.len() - 3).step_by(7) {
            records.swap(i, i + 3);
        }
        let (bytes, _) = framed(&records);
        let mut reader = RecordingReader::from_bytes(&bytes).unwrap();
        let ts: Vec<u64> = TimeOrdered::new(&mut reader).map(|r| r.ts_ns()).collect();
        assert_eq!(ts, (0..10_000).collect::<Vec<_>>());
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
