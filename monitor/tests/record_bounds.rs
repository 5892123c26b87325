//! Recording readers stay bounded whatever the input: damaged, truncated, zero-filled or
//! random files cost memory bounded by their valid content plus a constant, a warning per
//! damaged run (capped), and time linear in their size; special files (FIFOs, devices,
//! directories) are refused without blocking; export, plot and replay stream.
//!
//! Memory is measured with a counting allocator, per thread (tests run in parallel), as the
//! peak of bytes allocated and not yet freed during a call.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use monitor::export::{self, PerfettoWriter};
use monitor::plot;
use monitor::policy::{Config, Input, MIB, Policy};
use monitor::pressure::{RecordKind, Tier};
use monitor::record::{
    ActionRecord, EventKind, EventRecord, Header, MAX_ISSUES, ReadError, ReadingRecord, Record,
    RecordWriter, Recording, RecordingReader, StepRecord, TimeOrdered, encode_record,
};
use monitor::replay;
use proptest::prelude::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vm-monitor");

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn note(delta: i64) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, passed on unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (i.e. System) with this layout.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from System with `layout`; the caller's new size, unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the most memory this thread held during it beyond
/// what it held before (the result included).
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, u64::try_from(peak - base).unwrap_or(0))
}

fn header(source: &str, policy: Option<Config>) -> Header {
    let mut h = Header::new(source, Some(Tier::Ebpf), None, policy, Some(10));
    h.start_boot_ns = 1_000_000_000;
    h.run_id = "1700000000000-7".into();
    h
}

fn event(i: u64, kind: RecordKind, stall_ns: u64) -> Record {
    Record::Event(EventRecord {
        ts_ns: 1_000_000_000 + i * 1_000,
        kind: EventKind::Kernel(kind as u32),
        pid: 1000 + (i % 5) as u32,
        tgid: 1000,
        comm: "postgres".into(),
        cgroup_id: 7,
        stall_ns,
        value: 32,
        order: 0,
        gfp_flags: 0xcc0,
        events: 1,
    })
}

/// A small recording of mixed records with an end marker.
fn sample() -> Vec<Record> {
    let mut records = Vec::new();
    for i in 0..60u64 {
        records.push(match i % 4 {
            0 => event(i, RecordKind::MemcgReclaimBegin, 0),
            1 => event(i, RecordKind::MemcgReclaimEnd, 2_000 + i),
            2 => event(i, RecordKind::KswapdWake, 0),
            _ => Record::Reading(ReadingRecord {
                ts_ns: 1_000_000_000 + i * 1_000,
                non_reclaimable: Some((300 + i) * MIB),
                current: Some(400 * MIB),
                memory_high: None,
            }),
        });
    }
    records.push(Record::End {
        at_ns: 1_000_100_000,
        records: 60,
        dropped: 0,
        continued: false,
    });
    records
}

/// Bytes of a recording of `records`, and where each record's frame starts and ends.
fn encode(records: &[Record]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut bytes = RecordWriter::new(Vec::new(), &header("test", None))
        .unwrap()
        .into_inner();
    let mut frames = Vec::new();
    for r in records {
        let f = encode_record(r).unwrap();
        frames.push((bytes.len(), bytes.len() + f.len()));
        bytes.extend_from_slice(&f);
    }
    (bytes, frames)
}

/// What any input may cost: the issue cap, records no more than frames fit, and memory of a
/// few frame windows plus what the records take (generously: at most 64 bytes of memory per
/// input byte).
fn assert_bounded(input: &[u8], rec: &Recording, peak: u64) {
    assert!(
        rec.issues.len() <= MAX_ISSUES,
        "{} issues",
        rec.issues.len()
    );
    assert!(
        rec.warnings().len() <= MAX_ISSUES + 4,
        "{:?}",
        rec.warnings()
    );
    assert!(rec.records.len() <= input.len() / 10 + 1);
    let budget = (8 << 20) + 64 * input.len() as u64;
    assert!(
        peak <= budget,
        "{peak} bytes held for {} of input",
        input.len()
    );
}

/// Reads `input`; on success checks the bounds. Never panics, whatever the input.
fn read(input: &[u8]) -> Result<Recording, ReadError> {
    let (rec, peak) = peak_during(|| Recording::from_bytes(input));
    if let Ok(rec) = &rec {
        assert_bounded(input, rec, peak);
    }
    rec
}

/// The records whose frames hold none of the `touched` offsets.
fn untouched(records: &[Record], frames: &[(usize, usize)], touched: &[usize]) -> Vec<Record> {
    records
        .iter()
        .zip(frames)
        .filter(|(_, (a, b))| !touched.iter().any(|t| (*a..*b).contains(t)))
        .map(|(r, _)| r.clone())
        .collect()
}

/// The sample's records, bytes and frames.
type Fixture = (Vec<Record>, Vec<u8>, Vec<(usize, usize)>);

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let records = sample();
        let (bytes, frames) = encode(&records);
        (records, bytes, frames)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn truncation_keeps_every_complete_record(cut in 0usize..100_000) {
        let (records, bytes, frames) = fixture();
        let cut = cut % (bytes.len() + 1);
        let first = frames[0].0;
        match read(&bytes[..cut]) {
            Ok(rec) => {
                prop_assert!(cut >= first);
                let complete = frames.iter().filter(|(_, end)| *end <= cut).count();
                prop_assert_eq!(&rec.records[..], &records[..complete]);
                prop_assert!(rec.issues.len() <= 1);
                if cut < bytes.len() {
                    prop_assert!(!rec.warnings().is_empty());
                }
            }
            Err(e) => prop_assert!(cut < first, "{}", e),
        }
    }

    #[test]
    fn bit_flips_cost_only_the_records_they_hit(
        flips in proptest::collection::vec((0usize..100_000, 1u8..=255), 1..12)
    ) {
        let (records, bytes, frames) = fixture();
        let mut damaged = bytes.clone();
        let mut touched = Vec::new();
        for (at, x) in flips {
            let i = at % damaged.len();
            damaged[i] ^= x;
            touched.push(i);
        }
        match read(&damaged) {
            Ok(rec) => {
                prop_assert!(touched.iter().all(|t| *t >= frames[0].0), "header damage went unseen");
                prop_assert_eq!(rec.records, untouched(records, frames, &touched));
            }
            Err(_) => prop_assert!(touched.iter().any(|t| *t < frames[0].0)),
        }
    }

    #[test]
    fn zero_tails_are_one_warning(len in 1usize..(3 << 20)) {
        let (records, bytes, _) = fixture();
        let mut damaged = bytes.clone();
        damaged.resize(bytes.len() + len, 0);
        let rec = read(&damaged).unwrap();
        prop_assert_eq!(&rec.records, records);
        prop_assert_eq!(rec.warnings().len(), 1, "{:?}", rec.warnings());
        let one_run = matches!(
            &rec.issues[0].error,
            ReadError::Corrupt { at_end: true, len: l, .. } if *l == len as u64
        );
        prop_assert!(one_run, "{:?}", rec.issues);
    }

    #[test]
    fn inserted_giant_lengths_are_one_warning(
        frame in 0usize..61,
        len in prop_oneof![Just(u32::MAX), 1u32 << 20..=u32::MAX, 1u32 << 16..=1u32 << 20],
        crc in any::<u32>(),
    ) {
        let (records, bytes, frames) = fixture();
        let at = frames[frame].0;
        let mut head = len.to_le_bytes().to_vec();
        head.extend_from_slice(&crc.to_le_bytes());
        let damaged = [&bytes[..at], &head, &bytes[at..]].concat();
        let rec = read(&damaged).unwrap();
        prop_assert_eq!(&rec.records, records);
        prop_assert_eq!(rec.issues.len(), 1, "{:?}", rec.issues);
    }

    #[test]
    fn inserted_garbage_is_one_warning(
        frame in 0usize..=61,
        garbage in proptest::collection::vec(any::<u8>(), 1..20_000),
    ) {
        let (records, bytes, frames) = fixture();
        let at = frames.get(frame).map_or(bytes.len(), |f| f.0);
        let damaged = [&bytes[..at], &garbage, &bytes[at..]].concat();
        let rec = read(&damaged).unwrap();
        prop_assert_eq!(&rec.records, records);
        prop_assert_eq!(rec.issues.len(), 1, "{:?}", rec.issues);
    }

    #[test]
    fn random_bytes_after_a_header_stay_bounded(
        garbage in proptest::collection::vec(any::<u8>(), 0..300_000),
        zeros in 0usize..100_000,
    ) {
        let (_, bytes, frames) = fixture();
        let mut input = bytes[..frames[0].0].to_vec();
        input.extend_from_slice(&garbage);
        input.resize(input.len() + zeros, 0);
        input.extend_from_slice(&garbage);
        let rec = read(&input).unwrap();
        prop_assert!(rec.issues.len() <= 2, "{:?}", rec.issues);
    }

    #[test]
    fn random_files_never_panic(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = read(&input);
        let mut with_magic = b"VMMONREC\x01\x00".to_vec();
        with_magic.extend_from_slice(&input);
        let _ = read(&with_magic);
    }
}

#[test]
fn a_64_mib_zero_tail_is_one_warning_in_memory_and_on_disk() {
    let (records, bytes, _) = fixture();
    let mut input = bytes.clone();
    input.resize(bytes.len() + (64 << 20), 0);
    let (rec, peak) = peak_during(|| Recording::from_bytes(&input).unwrap());
    assert_eq!(&rec.records, records);
    assert_eq!(rec.warnings().len(), 1, "{:?}", rec.warnings());
    assert!(
        rec.warnings()[0].contains("67108864 bytes"),
        "{:?}",
        rec.warnings()
    );
    // The reader's window, not the tail: a few MiB at most.
    assert!(peak < 4 << 20, "{peak} bytes held");
    drop(input);

    // On disk (sparse), through the file reader and the CLI.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tail.vmrec");
    std::fs::write(&path, bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(bytes.len() as u64 + (64 << 20)).unwrap();
    let (rec, peak) = peak_during(|| Recording::load(&path).unwrap());
    assert_eq!(&rec.records, records);
    assert_eq!(rec.warnings().len(), 1, "{:?}", rec.warnings());
    assert!(peak < 4 << 20, "{peak} bytes held");
    let out = dir.path().join("tail.json");
    let run = Command::new(BIN)
        .args(["trace", "export"])
        .arg(&path)
        .arg("--perfetto")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert_eq!(stderr.matches("warning:").count(), 1, "{stderr}");
    let json: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(
        json["otherData"]["warnings"].as_array().map(Vec::len),
        Some(1)
    );
    assert!(std::fs::metadata(&out).unwrap().len() < 64 << 10);
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo does not keep the pointer.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// Runs `f` on a thread and waits for it at most 20 s: a reader blocked on a FIFO fails the
/// test instead of hanging it.
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("reading blocked (or panicked) instead of refusing the file")
}

fn segment_name(segment: u32) -> String {
    format!("vm-monitor-1700000000000-7-{segment:06}.vmrec")
}

#[test]
fn fifos_and_other_special_files_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let roll = dir.path().join("roll");
    std::fs::create_dir(&roll).unwrap();
    std::fs::write(roll.join(segment_name(0)), &fixture().1).unwrap();
    let fifo = roll.join(segment_name(1));
    mkfifo(&fifo);
    std::fs::create_dir(roll.join(segment_name(2))).unwrap();

    // Passed directly.
    let direct = fifo.clone();
    let err = within_20s(move || Recording::load(&direct).map(|_| ()).unwrap_err());
    let text = format!("{err:#}");
    assert!(
        text.contains(&fifo.display().to_string()) && text.contains("FIFO"),
        "{text}"
    );
    let err = within_20s(|| {
        Recording::load(Path::new("/dev/null"))
            .map(|_| ())
            .unwrap_err()
    });
    assert!(format!("{err:#}").contains("character device"), "{err:#}");

    // In a record directory: skipped with a warning naming each, the real segment read.
    let dir_path = roll.clone();
    let rec = within_20s(move || Recording::load(&dir_path).unwrap());
    assert_eq!(rec.records, fixture().0);
    let warnings = rec.warnings().join("\n");
    assert!(
        warnings.contains(&fifo.display().to_string()) && warnings.contains("FIFO"),
        "{warnings}"
    );
    assert!(warnings.contains("directory"), "{warnings}");

    // A directory holding only a FIFO.
    let only = dir.path().join("only");
    std::fs::create_dir(&only).unwrap();
    mkfifo(&only.join(segment_name(0)));
    let only_path = only.clone();
    let err = within_20s(move || Recording::load(&only_path).map(|_| ()).unwrap_err());
    assert!(format!("{err:#}").contains("FIFO"), "{err:#}");

    // The subcommands, as processes.
    let svg = dir.path().join("out.svg");
    let json = dir.path().join("out.json");
    let cases: [Vec<std::ffi::OsString>; 3] = [
        vec!["replay".into(), fifo.clone().into()],
        vec![
            "trace".into(),
            "export".into(),
            fifo.clone().into(),
            "--perfetto".into(),
            json.into(),
        ],
        vec![
            "trace".into(),
            "plot".into(),
            fifo.clone().into(),
            "-o".into(),
            svg.into(),
        ],
    ];
    for args in cases {
        let mut child = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{args:?} blocked on a FIFO");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("FIFO"), "{args:?}: {stderr}");
    }
}

/// A recording file of `n` events: memcg reclaim pairs with stalls (one huge), kswapd wakes,
/// and a reading every 16 events.
fn big_recording(dir: &Path, n: u64) -> PathBuf {
    let path = dir.join("big.vmrec");
    let file = std::fs::File::create(&path).unwrap();
    let mut w = RecordWriter::new(std::io::BufWriter::new(file), &header("trace", None)).unwrap();
    for i in 0..n {
        let stall = if i == n / 2 {
            900_000_000
        } else {
            1_000 + i % 5_000
        };
        w.write(&match i % 3 {
            0 => event(i, RecordKind::MemcgReclaimBegin, 0),
            1 => event(i, RecordKind::MemcgReclaimEnd, stall),
            _ => event(i, RecordKind::KswapdWake, 0),
        })
        .unwrap();
        if i % 16 == 0 {
            w.write(&Record::Reading(ReadingRecord {
                ts_ns: 1_000_000_000 + i * 1_000,
                non_reclaimable: Some((i % 1000) * MIB),
                current: Some((i % 1500) * MIB),
                memory_high: None,
            }))
            .unwrap();
        }
    }
    w.write(&Record::End {
        at_ns: 1_000_000_000 + n * 1_000,
        records: n,
        dropped: 0,
        continued: false,
    })
    .unwrap();
    w.flush().unwrap();
    path
}

#[test]
fn export_streams_in_bounded_memory() {
    const N: u64 = 150_000;
    let dir = tempfile::tempdir().unwrap();
    let input = big_recording(dir.path(), N);
    let out = dir.path().join("big.json");
    let ((summary, read), peak) = peak_during(|| export::export_file(&input, &out).unwrap());
    assert!(read.warnings().is_empty(), "{:?}", read.warnings());
    assert_eq!(summary.slices as u64, N / 3);
    // A document of 150k events as a serde_json::Value alone would take well over 100 MiB.
    assert!(peak < 16 << 20, "{peak} bytes held exporting");
    let json: Value =
        serde_json::from_reader(std::io::BufReader::new(std::fs::File::open(&out).unwrap()))
            .expect("valid JSON");
    let events = json["traceEvents"].as_array().unwrap();
    let count = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
    assert_eq!(count("X") as u64, N / 3);
    assert_eq!(count("i"), summary.instants);
    assert_eq!(count("C"), summary.counters);
    assert_eq!(count("M"), summary.metadata);

    // Output leaves while records come in, not at the end.
    let mut reader = RecordingReader::open(&input).unwrap();
    let sink = Counter::default();
    let mut w = PerfettoWriter::new(sink, reader.header()).unwrap();
    let mut seen = 0u64;
    let mut before_end = 0u64;
    for r in TimeOrdered::new(&mut reader) {
        w.record(&r).unwrap();
        seen += 1;
        if seen == N / 2 {
            before_end = w_bytes(&w);
        }
    }
    let (sink, _) = w.finish(&[]).unwrap();
    assert!(
        before_end > sink.0 / 3,
        "{before_end} of {} bytes written halfway",
        sink.0
    );
}

/// Counts bytes written.
#[derive(Default)]
struct Counter(u64);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn w_bytes(w: &PerfettoWriter<Counter>) -> u64 {
    w.get_ref().0
}

#[test]
fn plot_streams_in_bounded_memory_and_keeps_the_spike() {
    const N: u64 = 150_000;
    let dir = tempfile::tempdir().unwrap();
    let input = big_recording(dir.path(), N);
    let out = dir.path().join("big.svg");
    let ((stats, _), peak) = peak_during(|| plot::plot_file(&input, &out).unwrap());
    assert!(stats.thinned);
    assert!(peak < 24 << 20, "{peak} bytes held plotting");
    let text = std::fs::read_to_string(&out).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
    let circles = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle"))
        .count();
    assert!(circles <= plot::MAX_SERIES_POINTS + 16, "{circles} points");
    assert!(
        text.contains(&format!("{N} events")),
        "title counts every event"
    );
    assert!(text.contains(&format!("memcg reclaim stall ({})", N / 3)));
}

#[test]
fn replay_streams_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.vmrec");
    let cfg = Config::default();
    let file = std::fs::File::create(&path).unwrap();
    let mut w = RecordWriter::new(
        std::io::BufWriter::new(file),
        &header("daemon", Some(cfg.clone())),
    )
    .unwrap();
    let mut policy = Policy::new(cfg).unwrap();
    let mut step = |input: Input| {
        let actions = policy.handle(input.clone());
        w.write(&Record::Step(StepRecord {
            input,
            actions: actions.iter().map(ActionRecord::from).collect(),
        }))
        .unwrap();
    };
    let at = |ms: u64| Duration::from_millis(1_000 + ms);
    step(Input::Start {
        at: at(0),
        mem_total: 4096 * MIB,
    });
    const STEPS: u64 = 60_000;
    for i in 1..STEPS {
        step(Input::Reading {
            at: at(i),
            non_reclaimable: (500 + (i * 7) % 2500) * MIB,
            current: 3000 * MIB,
        });
    }
    w.flush().unwrap();
    drop(w);

    let (loaded, whole) = peak_during(|| Recording::load(&path).unwrap());
    let expected = replay::replay(&loaded, |_| {}).unwrap();
    drop(loaded);
    let (report, peak) = peak_during(|| {
        let mut reader = RecordingReader::open(&path).unwrap();
        replay::replay_reader(&mut reader, |_| {}).unwrap()
    });
    assert_eq!(report, expected);
    assert!(report.identical());
    assert_eq!(report.steps as u64, STEPS);
    assert!(
        peak < 8 << 20 && peak < whole / 4,
        "{peak} bytes held replaying, {whole} loading"
    );
}

#[test]
fn a_long_random_file_is_one_warning() {
    // 8 MiB of pseudo-random bytes after a valid header: every offset is a candidate.
    let (_, bytes, frames) = fixture();
    let mut input = bytes[..frames[0].0].to_vec();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while input.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        input.extend_from_slice(&x.to_le_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.vmrec");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&input)
        .unwrap();
    let (rec, peak) = peak_during(|| Recording::load(&path).unwrap());
    assert!(peak < 4 << 20, "{peak} bytes held");
    assert!(rec.records.is_empty());
    assert_eq!(rec.issues.len(), 1, "{:?}", rec.issues);
}

#[test]
fn a_segment_lost_while_streaming_stops_the_replay_there() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::default();
    let recorder = monitor::record::RollingRecorder::new(dir.path(), 4096, 1 << 20)
        .unwrap()
        .start(Header::daemon(Tier::Ebpf, None, &cfg, Some(10)))
        .unwrap();
    let mut policy = Policy::new(cfg).unwrap();
    for i in 0..400u64 {
        let input = Input::Reading {
            at: Duration::from_millis(1_000 + i),
            non_reclaimable: (500 + i) * MIB,
            current: 3000 * MIB,
        };
        let actions = policy.handle(input.clone());
        recorder.record_step(&input, &actions);
        if i % 50 == 0 {
            // Let the writer keep up: this test is about segments, not drops.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    recorder.finish().unwrap();
    let mut reader = RecordingReader::open(dir.path()).unwrap();
    assert!(
        reader.planned_segments().len() > 3,
        "{:?}",
        reader.planned_segments()
    );
    // Deleted after listing (the rolling budget of a live daemon does this).
    std::fs::remove_file(&reader.planned_paths()[2]).unwrap();
    let report = replay::replay_reader(&mut reader, |_| {}).unwrap();
    assert!(report.identical(), "{report:?}");
    assert!(
        report
            .stopped
            .as_deref()
            .is_some_and(|s| s.contains("could not be read")),
        "{report:?}"
    );
    let warnings = reader.summary().warnings().join("\n");
    assert!(warnings.contains("missing segment(s) [2]"), "{warnings}");
}
