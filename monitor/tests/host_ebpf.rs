//! The real eBPF programs on the running (host) kernel, as root.
//!
//! The host's memory controller is cgroup v1 and belongs to the machine: these tests only ever
//! create a throw-away v1 child of *their own* memory cgroup, with a small limit, and remove it.
//! With no v2 target the programs report memcg reclaim of every cgroup; the tests pick out the
//! records of the workload's own pid.
//!
//! Run with `cargo test -p monitor --test host_ebpf -- --ignored --test-threads=1` (as
//! `cargo xtask test` does).

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use monitor::cgroup::CgroupTarget;
use monitor::pressure::ebpf::{AttachedPrograms, EbpfOptions, EbpfPipeline};
use monitor::pressure::{PressureEvent, PressureKind, RecordKind};
use tests::hostcg::ScratchMemcg;
use tokio::sync::mpsc;

fn require_root() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "host eBPF tests load BPF programs and must run as root"
    );
}

async fn start(coalesce: Duration) -> (AttachedPrograms, mpsc::Receiver<PressureEvent>) {
    start_with(None, coalesce).await
}

async fn start_with(
    target: Option<CgroupTarget>,
    coalesce: Duration,
) -> (AttachedPrograms, mpsc::Receiver<PressureEvent>) {
    let pipeline = EbpfPipeline::load(&EbpfOptions {
        target,
        coalesce,
        run_stats: false,
    })
    .expect("loading the eBPF programs on the host kernel");
    let attached: Vec<_> = pipeline
        .attach_status()
        .iter()
        .filter(|a| a.attached())
        .map(|a| a.tracepoint.clone())
        .collect();
    for tp in [
        "vmscan:mm_vmscan_memcg_reclaim_begin",
        "vmscan:mm_vmscan_memcg_reclaim_end",
        "vmscan:mm_vmscan_direct_reclaim_begin",
        "vmscan:mm_vmscan_direct_reclaim_end",
        "vmscan:mm_vmscan_kswapd_wake",
        "oom:mark_victim",
    ] {
        assert!(
            attached.iter().any(|a| a == tp),
            "{tp} not attached: {attached:?}"
        );
    }
    let (tx, rx) = mpsc::channel(65536);
    (pipeline.start(tx).expect("starting the consumer"), rx)
}

/// Waits until no record has arrived for a while, returning everything received.
async fn drain(rx: &mut mpsc::Receiver<PressureEvent>) -> Vec<PressureEvent> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        out.push(ev);
    }
    out
}

fn scratch_file(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    dir.join(format!("{name}-{}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the host kernel; run by `cargo xtask test`"]
async fn memcg_reclaim_events_arrive_with_stall_and_counters_add_up() {
    require_root();
    let (programs, mut rx) = start(Duration::ZERO).await;
    let cg =
        ScratchMemcg::create("reclaim", 16 << 20).expect("creating a scratch v1 memory cgroup");
    let file = scratch_file("reclaim-fill");
    // 96 MiB of page cache through a 16 MiB limit: the memcg must reclaim over and over.
    let (pid, status) = cg
        .run(&format!(
            "dd if=/dev/zero of={} bs=1M count=96 conv=fsync status=none",
            file.display()
        ))
        .expect("running the workload");
    assert!(status.success(), "workload failed: {status}");
    let before = programs.counters().snapshot().unwrap();
    let events = drain(&mut rx).await;
    let after = programs.counters().snapshot().unwrap();
    let _ = std::fs::remove_file(&file);

    let mine: Vec<_> = events.iter().filter(|e| e.tgid == pid).collect();
    let begins = mine
        .iter()
        .filter(|e| e.kind == PressureKind::Kernel(RecordKind::MemcgReclaimBegin))
        .count();
    let ends: Vec<_> = mine
        .iter()
        .filter(|e| e.kind == PressureKind::Kernel(RecordKind::MemcgReclaimEnd))
        .collect();
    assert!(
        begins > 0,
        "no memcg reclaim begin for pid {pid}; got {} records in all",
        events.len()
    );
    assert!(!ends.is_empty(), "no memcg reclaim end for pid {pid}");
    assert!(
        ends.iter().any(|e| !e.stall.is_zero()),
        "every reclaim end has zero stall: {ends:?}"
    );
    assert!(
        ends.iter().map(|e| e.value).sum::<u64>() > 0,
        "nothing reclaimed"
    );
    assert!(
        mine.iter().all(|e| e.comm == "dd"),
        "comm of the workload: {mine:?}"
    );
    // Timestamps are CLOCK_BOOTTIME, the clock perf/trace-cmd use.
    let now = monitor::pressure::boottime_ns();
    assert!(mine.iter().all(|e| e.ts_ns > 0 && e.ts_ns <= now));

    // Nothing is lost silently: every hit is either sent, coalesced or counted as dropped,
    // and what we received is what the kernel says it sent.
    let received = count_by_kind(&events);
    for (kind, c) in &after {
        assert_eq!(
            c.seen,
            c.emitted + c.coalesced + c.dropped,
            "{kind:?}: {c:?}"
        );
        // The growth hint folds every hit of an arm into its one record, whatever the window.
        if *kind != RecordKind::GrowthHint {
            assert_eq!(c.coalesced, 0, "{kind:?}: coalescing was off");
        }
        let got = received.get(kind).copied().unwrap_or(0);
        let low = before.get(kind).map(|c| c.emitted).unwrap_or(0);
        assert!(
            low <= got && got <= c.emitted,
            "{kind:?}: received {got}, kernel emitted between {low} and {}",
            c.emitted
        );
    }
    println!(
        "pid {pid}: {begins} reclaim begins, {} ends, max stall {:?}, counters {after:?}",
        ends.len(),
        ends.iter().map(|e| e.stall).max()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the host kernel; run by `cargo xtask test`"]
async fn coalescing_bounds_records_and_counts_what_it_folds() {
    require_root();
    // A window longer than the workload: each (kind, cgroup) sends its first record only.
    let (programs, mut rx) = start(Duration::from_secs(30)).await;
    let cg =
        ScratchMemcg::create("coalesce", 16 << 20).expect("creating a scratch v1 memory cgroup");
    let file = scratch_file("coalesce-fill");
    let (pid, status) = cg
        .run(&format!(
            "dd if=/dev/zero of={} bs=1M count=96 conv=fsync status=none",
            file.display()
        ))
        .expect("running the workload");
    assert!(status.success(), "workload failed: {status}");
    let events = drain(&mut rx).await;
    let counters = programs.counters().snapshot().unwrap();
    let _ = std::fs::remove_file(&file);

    let c = counters[&RecordKind::MemcgReclaimBegin];
    assert!(c.coalesced > 0, "a 30 s window folded nothing: {c:?}");
    assert_eq!(c.seen, c.emitted + c.coalesced + c.dropped, "{c:?}");
    let mine_begins = events
        .iter()
        .filter(|e| e.tgid == pid && e.kind == PressureKind::Kernel(RecordKind::MemcgReclaimBegin))
        .count();
    assert!(
        mine_begins <= 1,
        "coalescing let {mine_begins} begins through for one cgroup"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the host kernel; run by `cargo xtask test`"]
async fn oom_kill_is_reported_with_the_victim_pid() {
    require_root();
    let (programs, mut rx) = start(Duration::from_secs(30)).await;
    let cg = ScratchMemcg::create("oom", 16 << 20).expect("creating a scratch v1 memory cgroup");
    // Anonymous memory beyond the limit with no swap: the memcg OOM killer must kill it.
    // `tail` keeps the whole newline-free stream in memory.
    let (pid, status) = cg.run("tail /dev/zero").expect("running the workload");
    assert!(
        !status.success(),
        "the allocation should have been OOM-killed"
    );
    let events = drain(&mut rx).await;
    let oom: Vec<_> = events
        .iter()
        .filter(|e| e.kind == PressureKind::Kernel(RecordKind::OomVictim))
        .collect();
    assert!(
        oom.iter().any(|e| e.value == u64::from(pid)),
        "no oom_victim record for pid {pid}: {oom:?}"
    );
    let c = programs.counters().snapshot().unwrap()[&RecordKind::OomVictim];
    assert_eq!(c.coalesced, 0, "OOM kills are never coalesced: {c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the host kernel; run by `cargo xtask test`"]
async fn memcg_stat_tracepoint_reports_the_target_memcg_by_its_own_id() {
    require_root();
    let tracefs = monitor::tracefs::TraceFs::locate().unwrap();
    if !tracefs.has_event("memcg", "count_memcg_events") {
        println!("skipped: this kernel has no memcg:count_memcg_events (added in 6.13)");
        return;
    }
    let cg = ScratchMemcg::create("memcg-events", 16 << 20)
        .expect("creating a scratch v1 memory cgroup");
    // The event carries the memcg's own cgroup id (its directory inode), so it matches the v1
    // child here just as it matches a v2 group in the VM.
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cg.dir).unwrap());
    let target = CgroupTarget {
        name: "scratch".into(),
        path: cg.dir.clone(),
        id,
        level: 1,
    };
    let (programs, mut rx) = start_with(Some(target), Duration::from_millis(1)).await;
    let file = scratch_file("memcg-events-fill");
    cg.run(&format!(
        "dd if=/dev/zero of={} bs=1M count=32 conv=fsync status=none",
        file.display()
    ))
    .expect("running the workload");
    let events = drain(&mut rx).await;
    let _ = std::fs::remove_file(&file);
    let memcg: Vec<_> = events
        .iter()
        .filter(|e| e.kind == PressureKind::Kernel(RecordKind::MemcgEvents))
        .collect();
    assert!(
        !memcg.is_empty(),
        "no memcg:count_memcg_events records for id {id}"
    );
    assert!(memcg.iter().all(|e| e.cgroup_id == id), "{memcg:?}");
    assert!(memcg.iter().all(|e| e.value > 0), "{memcg:?}");
    let c = programs.counters().snapshot().unwrap()[&RecordKind::MemcgEvents];
    assert_eq!(c.seen, c.emitted + c.coalesced + c.dropped, "{c:?}");
    println!(
        "memcg events for id {id}: {} records, counters {c:?}",
        memcg.len()
    );
}

/// Touches `mib` MiB of fresh anonymous memory and keeps it until dropped.
fn touch_anon(mib: usize) -> Vec<u8> {
    // A non-zero fill is a memset over the whole buffer: every page faults in.
    let v = vec![1u8; mib << 20];
    std::hint::black_box(&v);
    v
}

fn hints(events: &[PressureEvent]) -> Vec<&PressureEvent> {
    events
        .iter()
        .filter(|e| e.kind == PressureKind::Kernel(RecordKind::GrowthHint))
        .collect()
}

/// kmem:rss_stat growth hint: silent until armed; once armed, anonymous growth past the
/// budget since the snapshot sends at most one record per CPU (one per arm) whose running
/// total reached that CPU's threshold; growth between the snapshot and the arm counts (the
/// arm reports it as already reached and the next growth fires); every growth hit is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the host kernel; run by `cargo xtask test`"]
async fn growth_hint_is_silent_until_armed_and_fires_once_per_arm() {
    require_root();
    let (mut programs, mut rx) = start(Duration::from_millis(10)).await;
    let mut hint = programs
        .take_growth_hint()
        .expect("kmem:rss_stat attached on the host kernel");
    let cpus = aya::util::nr_cpus().expect("possible CPUs") as u64;

    // Not armed: growth is counted, nothing is sent (no target here, so the whole host counts).
    let a = touch_anon(64);
    let idle = drain(&mut rx).await;
    assert!(hints(&idle).is_empty(), "hint before arming: {idle:?}");
    drop(a);

    let budget = 8u64 << 20;
    let share = budget.div_ceil(cpus);
    for round in 1..=2 {
        let base = hint.snapshot().expect("snapshot");
        let early = round == 2;
        // Round 2: the growth lands between the snapshot and the arm, as it can while the
        // daemon reads memory.stat and decides.
        let a = early.then(|| touch_anon(64));
        let reached = hint.arm(&base, budget).expect("arming");
        assert_eq!(reached, early, "round {round}: reached at arm time");
        let b = touch_anon(64);
        let events = drain(&mut rx).await;
        drop((a, b));
        let got = hints(&events);
        println!("round {round}: {} hint(s): {got:?}", got.len());
        assert!(
            !got.is_empty(),
            "round {round}: 64 MiB or more of growth, no hint"
        );
        assert!(
            got.len() as u64 <= cpus,
            "round {round}: {} hints for one arm on {cpus} CPUs",
            got.len()
        );
        let lowest = base.totals().iter().min().copied().unwrap_or(0) + share;
        for h in &got {
            assert!(
                h.value >= lowest,
                "round {round}: a hint below every CPU's threshold ({lowest}): {h:?}"
            );
        }
    }
    let c = programs.counters().snapshot().unwrap()[&RecordKind::GrowthHint];
    assert!(c.coalesced > 0 && c.emitted >= 2, "{c:?}");
    assert_eq!(c.seen, c.emitted + c.coalesced + c.dropped, "{c:?}");
}

fn count_by_kind(events: &[PressureEvent]) -> BTreeMap<RecordKind, u64> {
    let mut m = BTreeMap::new();
    for e in events {
        if let PressureKind::Kernel(k) = e.kind {
            *m.entry(k).or_insert(0) += 1;
        }
    }
    m
}

/// `vm-monitor trace` announces readiness ("tracing: ...") only once Ctrl-C is handled: an
/// interrupt right after that line must end it cleanly with its summary, not kill it.
#[test]
#[ignore = "needs root and the host kernel (loads BPF programs); run by hand with --ignored"]
fn trace_interrupted_right_after_ready_prints_its_summary() {
    use std::io::{BufRead as _, BufReader, Read as _};
    use std::process::{Command, Stdio};

    require_root();
    for attempt in 1..=3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vm-monitor"))
            .args(["trace", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting vm-monitor trace");
        let stderr = child.stderr.take().expect("stderr pipe");
        let mut lines = BufReader::new(stderr).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.starts_with("tracing:"));
        assert!(ready, "trace never said it was ready");
        // SAFETY: kill only sends a signal to our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout pipe")
            .read_to_string(&mut out)
            .expect("reading trace's output");
        let status = child.wait().expect("waiting for trace");
        assert!(
            status.success(),
            "attempt {attempt}: SIGINT right after readiness ended trace with {status}"
        );
        let last = out.lines().last().unwrap_or_default();
        assert!(
            last.contains("\"summary\""),
            "attempt {attempt}: no summary line, got {last:?}"
        );
    }
}
