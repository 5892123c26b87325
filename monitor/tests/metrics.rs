//! The engine feeding `/metrics` and the decision log, in process: a real engine and policy,
//! pressure events pushed through its channel (no cgroup files needed: poll-tier samples carry
//! their own reading), then the exposition parsed with an independent Prometheus parser.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use monitor::decisions::{self, DecisionLog};
use monitor::engine::{self, EngineParts};
use monitor::metrics::Metrics;
use monitor::policy::{self, Config, DecisionKind, Policy};
use monitor::pressure::{PressureEvent, PressureKind, RecordKind, Tier};
use prometheus_parse::{Scrape, Value};
use tests::benchkit::sample_value as value;
use tokio::sync::{mpsc, watch};

const GIB: u64 = 1 << 30;

fn scrape(m: &Metrics) -> Scrape {
    let text = m.encode(false).expect("metrics encode");
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("exposition does not parse: {e}\n{text}"))
}

/// (count, sum) of the reaction-latency histogram.
fn latency(s: &Scrape) -> (f64, f64) {
    let h = s
        .samples
        .iter()
        .find(|x| x.metric == "vm_monitor_reaction_latency_seconds")
        .expect("latency histogram");
    match &h.value {
        Value::Histogram(buckets) => {
            let count = buckets.last().map_or(0.0, |b| b.count);
            let sum = s
                .samples
                .iter()
                .find(|x| x.metric == "vm_monitor_reaction_latency_seconds_sum")
                .map_or(f64::NAN, |x| match x.value {
                    Value::Untyped(v) | Value::Gauge(v) | Value::Counter(v) => v,
                    _ => f64::NAN,
                });
            (count, sum)
        }
        other => panic!("not a histogram: {other:?}"),
    }
}

#[tokio::test]
async fn engine_feeds_metrics_and_the_decision_log() {
    let cfg = Config {
        manage_file_cache: false,
        manage_memory_high: false,
        ..Config::default()
    };
    let policy = Policy::new(cfg).expect("valid config");
    let metrics = Metrics::new();
    metrics.set_tier(Some(Tier::Poll));
    let log = Arc::new(DecisionLog::new(16));
    log.set_tier(Some(Tier::Poll));
    let (decision_tx, decision_rx) = mpsc::unbounded_channel();
    let collector = decisions::spawn_collector(decision_rx, log.clone(), Some(metrics.clone()));
    let (pressure_tx, pressure_rx) = mpsc::channel(16);
    let (stop_tx, stop_rx) = watch::channel(false);
    let handle = engine::spawn(
        EngineParts {
            policy,
            cgroup: None,
            file_cache: None,
            mem_total: 4 * GIB,
            metrics: Some(metrics.clone()),
            recorder: None,
            growth_hint: None,
        },
        Some(pressure_rx),
        stop_rx,
        Some(decision_tx),
    );
    let mut wanted = handle.backend.upscale_wanted.clone();
    // As a session would on taking the seat: the policy sends requests only to an agent.
    handle.backend.agent_connected(1);

    // A kernel record standing for 3 coalesced hits (no reading: no cgroup), then a poll
    // sample over the threshold, which asks for an upscale.
    let mut coalesced = PressureEvent::now(PressureKind::Kernel(RecordKind::MemcgReclaimBegin));
    coalesced.events = 3;
    pressure_tx.send(coalesced).await.expect("engine running");
    let over = 4 * GIB - 1;
    pressure_tx
        .send(PressureEvent::now(PressureKind::PolledSample {
            avg_non_reclaimable: over,
            samples: 5,
        }))
        .await
        .expect("engine running");
    tokio::time::timeout(Duration::from_secs(5), wanted.changed())
        .await
        .expect("an upscale is wanted")
        .expect("engine running");

    let s = scrape(&metrics);
    let v = |name: &str, labels: &[(&str, &str)]| value(&s, name, labels);
    assert_eq!(
        v(
            "vm_monitor_pressure_events_total",
            &[("kind", "memcg_reclaim_begin")]
        ),
        Some(3.0)
    );
    assert_eq!(
        v(
            "vm_monitor_pressure_records_total",
            &[("kind", "memcg_reclaim_begin")]
        ),
        Some(1.0)
    );
    assert_eq!(
        v(
            "vm_monitor_pressure_events_total",
            &[("kind", "polled_sample")]
        ),
        Some(1.0)
    );
    assert_eq!(v("vm_monitor_upscale_requests_total", &[]), Some(1.0));
    let (count, sum) = latency(&s);
    assert_eq!(
        count, 1.0,
        "one UpscaleRequest, triggered by a pressure event"
    );
    assert!(sum > 0.0 && sum < 5.0, "latency {sum} s");
    assert_eq!(
        v("vm_monitor_non_reclaimable_bytes", &[]),
        Some(over as f64)
    );
    assert_eq!(
        v("vm_monitor_upscale_threshold_bytes", &[]),
        Some(policy::threshold(4 * GIB, 0.85) as f64)
    );
    assert_eq!(
        v("vm_monitor_usable_memory_bytes", &[]),
        Some((4 * GIB) as f64)
    );
    assert_eq!(
        v("vm_monitor_memory_high_bytes", &[]),
        None,
        "never written"
    );
    assert_eq!(v("vm_monitor_signal_tier", &[("tier", "poll")]), Some(1.0));

    stop_tx.send(true).expect("engine listening");
    handle
        .task
        .await
        .expect("engine task")
        .expect("engine stops cleanly");
    drop(pressure_tx);
    // The engine owned the last decision sender; the collector drains and ends.
    collector.await.expect("collector task");

    let records = log.latest(None);
    let kinds: Vec<DecisionKind> = records.iter().map(|r| r.decision.kind).collect();
    assert!(kinds.contains(&DecisionKind::UpscaleRequested), "{kinds:?}");
    let upscale = records
        .iter()
        .find(|r| r.decision.kind == DecisionKind::UpscaleRequested)
        .expect("upscale decision");
    assert_eq!(upscale.tier, Some(Tier::Poll));
    assert_eq!(upscale.decision.reading, Some(over));
    assert!(
        records.windows(2).all(|w| w[0].seq < w[1].seq),
        "oldest first"
    );
    let s = scrape(&metrics);
    assert_eq!(
        value(
            &s,
            "vm_monitor_decisions_total",
            &[("kind", "upscale_requested")]
        ),
        Some(1.0)
    );
}

/// The eBPF tier's scrape-time source against the real programs on the host kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the host kernel (loads BPF programs); run by hand with --ignored"]
async fn ebpf_kernel_source_on_the_host() {
    use monitor::metrics::{EbpfKernelSource, KernelSource};
    use monitor::pressure::ebpf::{EbpfOptions, EbpfPipeline};

    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "loads BPF programs: run as root"
    );
    let pipeline = EbpfPipeline::load(&EbpfOptions {
        target: None,
        coalesce: Duration::from_millis(10),
        run_stats: false,
    })
    .expect("loading the eBPF programs");
    let (tx, _rx) = mpsc::channel(65536);
    let programs = pipeline.start(tx).expect("starting the consumer");
    let reader = programs.stats_reader();
    let names = reader.names();
    let known: Vec<&str> = monitor_ebpf::TRACEPOINTS.iter().map(|t| t.0).collect();
    assert!(names.len() >= 6, "{names:?}");
    assert!(
        names.iter().all(|name| known.contains(&name.as_str())),
        "{names:?}"
    );

    // Held for the rest of the test: the kernel accumulates run statistics meanwhile.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let stats = reader.read().expect("program statistics");
    assert_eq!(stats.len(), names.len(), "{stats:?}");
    println!("{stats:?}");

    let source = EbpfKernelSource::new(programs.counters(), reader);
    let (enabled, _) = source.programs().expect("program statistics");
    let metrics = Metrics::new();
    metrics.set_tier(Some(Tier::Ebpf));
    metrics.set_kernel(Box::new(source));
    let s = scrape(&metrics);
    for kind in RecordKind::ALL {
        for name in [
            "vm_monitor_ebpf_events_seen_total",
            "vm_monitor_ebpf_records_emitted_total",
            "vm_monitor_ebpf_events_coalesced_total",
            "vm_monitor_ebpf_records_dropped_total",
        ] {
            assert!(
                value(&s, name, &[("kind", kind.name())]).is_some(),
                "{name}{{kind={}}} missing",
                kind.name()
            );
        }
    }
    assert_eq!(
        value(&s, "vm_monitor_ebpf_stats_enabled", &[]),
        Some(if enabled { 1.0 } else { 0.0 })
    );
    assert_eq!(
        s.samples
            .iter()
            .any(|x| x.metric == "vm_monitor_ebpf_program_runs_total"),
        enabled,
        "run statistics only while kernel.bpf_stats_enabled=1"
    );
}

/// `--bpf-stats`: the pipeline holds its own BPF_ENABLE_STATS, the kernel counts the programs'
/// runs without the sysctl, and /metrics exports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the host kernel (loads BPF programs); run by hand with --ignored"]
async fn run_stats_option_exports_program_runs_without_the_sysctl() {
    use monitor::metrics::EbpfKernelSource;
    use monitor::pressure::ebpf::{EbpfOptions, EbpfPipeline, bpf_stats_enabled};

    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "loads BPF programs: run as root"
    );
    let sysctl_before = bpf_stats_enabled().expect("reading kernel.bpf_stats_enabled");
    let pipeline = EbpfPipeline::load(&EbpfOptions {
        target: None,
        coalesce: Duration::from_millis(10),
        run_stats: true,
    })
    .expect("loading the eBPF programs");
    let (tx, mut rx) = mpsc::channel(65536);
    let programs = pipeline.start(tx).expect("starting the consumer");
    assert!(programs.holds_run_stats() && programs.run_stats_enabled());

    // Memcg reclaim: 48 MiB of page cache written through a 16 MiB limit.
    let cg = tests::hostcg::ScratchMemcg::create("run-stats", 16 << 20)
        .expect("creating a scratch v1 memory cgroup");
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("run-stats-{}", std::process::id()));
    let (_, status) = cg
        .run(&format!(
            "dd if=/dev/zero of={} bs=1M count=48 conv=fsync status=none",
            file.display()
        ))
        .expect("running the workload");
    let _ = std::fs::remove_file(&file);
    assert!(status.success(), "workload failed: {status}");
    while rx.try_recv().is_ok() {}

    let source = EbpfKernelSource::new(programs.counters(), programs.stats_reader())
        .holding_run_stats(programs.holds_run_stats());
    let metrics = Metrics::new();
    metrics.set_tier(Some(Tier::Ebpf));
    metrics.set_kernel(Box::new(source));
    let s = scrape(&metrics);
    assert_eq!(value(&s, "vm_monitor_ebpf_stats_enabled", &[]), Some(1.0));
    let program = [("program", "memcg_reclaim_begin")];
    let runs = value(&s, "vm_monitor_ebpf_program_runs_total", &program).unwrap_or(0.0);
    let secs = value(
        &s,
        "vm_monitor_ebpf_program_run_time_seconds_total",
        &program,
    )
    .unwrap_or(0.0);
    assert!(runs > 0.0, "memcg reclaim ran, yet no runs were counted");
    assert!(secs > 0.0, "{runs} runs but no run time");
    assert_eq!(
        bpf_stats_enabled().expect("reading kernel.bpf_stats_enabled"),
        sysctl_before,
        "the sysctl must be left alone"
    );
    drop(programs);
    drop(cg);
}
