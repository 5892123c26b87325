//! Guest side of `cargo xtask demo`: Postgres 15 in `neon-postgres`, the real `vm-monitor`
//! (eBPF tier) and the fake autoscaler-agent; a memory-hungry SQL session; then a readable
//! timeline of what happened, with the measured reaction time. Runs as root inside the test VM.
//!
//! Everything recorded is left in `$VM_MONITOR_OUT/demo/` (xtask copies it to `target/demo/`):
//! `timeline.txt`, `pressure-events.jsonl` (`vm-monitor trace --output`, running alongside),
//! `decisions.jsonl` and `vm-monitor.log` (the daemon's decision log and full log),
//! `agent-transcript.txt` (every websocket frame).

// Test and bench drivers: a failure ends the run with a message, which is what unwrapping does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tests::agent::{Dir, Frame};
use tests::scenario::{
    CGROUP, Cgroup, CrossingWatch, GIB, MIB, MemHog, Monitor, MonitorOptions, Postgres, Sizes,
    agent_config, boottime_ns, connect_agent, cu, memory_high_in, mib, non_reclaimable_in, signal,
};

/// The SQL session: a PL/pgSQL array of 50 MiB strings, one more every 0.3 s, held briefly —
/// the memory profile of a big in-memory sort or hash join with a huge work_mem.
const STEPS: u64 = 18;
const STEP_MIB: u64 = 50;
/// (`repeat` of a 1 KiB string: one byte at a time would take ~1 s per step under TCG.)
const WORKLOAD: &str = "DO $$ DECLARE a text[] := '{}'; BEGIN \
     FOR i IN 1..18 LOOP a[i] := repeat(repeat('x', 1024), 50 * 1024); PERFORM pg_sleep(0.3); \
     END LOOP; PERFORM pg_sleep(3); END $$;";
/// Simulated scheduler + NeonVM delay before the agent grants an UpscaleRequest.
const GRANT_DELAY: Duration = Duration::from_millis(300);

fn main() -> ExitCode {
    tests::scenario::run_driver("demo", run())
}

/// Converts our `Instant`s to the boot clock the kernel events and decisions carry.
#[derive(Clone, Copy)]
struct Clock {
    instant: Instant,
    boot_ns: u64,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            boot_ns: boottime_ns(),
        }
    }

    fn boot_of(&self, at: Instant) -> u64 {
        if at >= self.instant {
            self.boot_ns + (at - self.instant).as_nanos() as u64
        } else {
            self.boot_ns
                .saturating_sub((self.instant - at).as_nanos() as u64)
        }
    }
}

/// One sample of the cgroup, every 200 ms.
#[derive(Clone, Copy)]
struct Sample {
    boot_ns: u64,
    anon: u64,
    high: Option<u64>,
}

fn out_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("VM_MONITOR_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// `vm-monitor trace --cgroup neon-postgres --output FILE`, stopped with SIGINT.
fn start_trace(output: &Path) -> anyhow::Result<Child> {
    let mut child = Command::new(tests::daemon::binary())
        .args(["trace", "--cgroup", CGROUP, "--output"])
        .arg(output)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting vm-monitor trace")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains("tracing:") => return Ok(child),
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    bail!("vm-monitor trace did not start")
}

fn high_str(h: Option<u64>) -> String {
    h.map_or("max".to_string(), mib)
}

async fn run() -> anyhow::Result<()> {
    let out = out_dir()?;
    let clock = Clock::now();
    let mut notes: Vec<(u64, String)> = Vec::new();
    let note = |notes: &mut Vec<(u64, String)>, text: String| {
        notes.push((boottime_ns(), text));
    };
    println!("==> demo: starting Postgres 15, vm-monitor and the fake agent in the VM");

    let cg = Cgroup::create(CGROUP)?;
    let pg = Postgres::start(&cg, "demo")?;
    let postgres_up = boottime_ns();
    note(
        &mut notes,
        format!(
            "Postgres 15 running inside cgroup {CGROUP} (test extension loaded, neon.max_file_cache_size = 1 GB, no swap for the cgroup)"
        ),
    );
    let events_path = out.join("pressure-events.jsonl");
    let mut trace = start_trace(&events_path)?;
    let mut opts = MonitorOptions::new("ebpf", Some(pg.connstr()));
    // The daemon's own recording (events and every policy step), for replay, Perfetto and SVG.
    opts.extra = vec!["--record-dir".into(), out.display().to_string()];
    // The production log level (the tests' default adds the engine's debug lines).
    opts.rust_log = "info".into();
    let mut monitor = Monitor::start(&cg, &opts)?;

    let mut cfg = agent_config(monitor.url());
    cfg.echo = false;
    cfg.upscale_on_request = Some(GRANT_DELAY);
    let agent_epoch = Instant::now();
    let agent = connect_agent(cfg).await?;

    // Sampler: the cgroup's anonymous memory and memory.high over time.
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let samples = samples.clone();
        let stop = stop_sampling.clone();
        let dir = cg.dir.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let (Ok(anon), Ok(high)) = (non_reclaimable_in(&dir), memory_high_in(&dir)) {
                    samples.lock().unwrap().push(Sample {
                        boot_ns: boottime_ns(),
                        anon,
                        high,
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let one = Sizes::for_allocation(GIB);
    let watch = CrossingWatch::start(&cg, one.threshold, Duration::from_millis(1));
    note(
        &mut notes,
        format!(
            "workload: one SQL session builds {} MiB in memory ({STEP_MIB} MiB every 0.3 s), holds it 3 s, ends",
            STEPS * STEP_MIB
        ),
    );
    println!(
        "==> demo: running the SQL workload ({} MiB in {STEP_MIB} MiB steps)",
        STEPS * STEP_MIB
    );
    let workload_start = boottime_ns();
    let sql = pg.psql_command(WORKLOAD).output().context("running psql")?;
    let workload_end = boottime_ns();
    if !sql.status.success() {
        bail!(
            "the SQL workload failed: {}",
            String::from_utf8_lossy(&sql.stderr)
        );
    }
    note(
        &mut notes,
        "workload finished; its memory is freed".to_string(),
    );
    let crossing = watch.crossing(Duration::ZERO);

    // After the load, the agent scales back down: it keeps an UpscaleRequest in force for
    // 10 s, and the daemon remembers the recent peak for 5 s, so this may take a moment.
    println!("==> demo: load over; the agent asks to go back to 1 CU");
    let report = agent
        .downscale_to(cu(1), Duration::from_secs(60))
        .await
        .context("downscaling")?;
    if !report.reached {
        bail!("the downscale did not complete: {report:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The headline figure, measured as `cargo xtask bench`'s latency part measures it: a fresh
    // memhog in the cgroup brought to just below the threshold, then ramped past it in 4 MiB
    // steps; the workload stamps (CLOCK_BOOTTIME) the page fault that crosses the threshold,
    // and the agent stamps the UpscaleRequest frame's arrival.
    println!("==> demo: one bench-style ramp past the threshold (the reaction figure)");
    let (bench_crossed, bench_reaction) = bench_ramp(&cg, &agent, &one).await?;
    notes.push((
        bench_crossed,
        format!("bench-style ramp (a memhog, 4 MiB steps): its page fault crosses the threshold; UpscaleRequest {bench_reaction:.1} ms later"),
    ));
    let report = agent
        .downscale_to(cu(1), Duration::from_secs(60))
        .await
        .context("downscaling after the bench-style ramp")?;
    if !report.reached {
        bail!("the downscale did not complete: {report:?}");
    }

    stop_sampling.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    signal(trace.id(), libc::SIGINT)?;
    let _ = trace.wait();
    let transcript = agent.close().await?;
    let status = monitor.terminate()?;
    note(
        &mut notes,
        format!(
            "vm-monitor stopped with SIGTERM ({status}); memory.high is {}",
            high_str(cg.high()?)
        ),
    );

    // ---- the timeline ---------------------------------------------------------------------
    let mut rows: Vec<(u64, String)> = notes;
    let lines = monitor.lines();
    let decisions: Vec<Value> = lines.iter().filter_map(|l| l.decision()).collect();
    let mut raised: Vec<(u64, Option<u64>)> = Vec::new();
    for d in &decisions {
        let at = duration_ns(&d["at"]);
        let kind = d["kind"].as_str().unwrap_or_default();
        let fc = d["file_cache"].as_u64().map_or("unknown".to_string(), mib);
        let high = d["memory_high"]["bytes"].as_u64();
        match kind {
            "memory_high_raised" => raised.push((at, high)),
            "startup" => rows.push((
                at,
                format!(
                    "vm-monitor up: memory.high max → {} (threshold from MemTotal)",
                    high_str(high)
                ),
            )),
            "file_cache_resync" => rows.push((
                at,
                format!("vm-monitor: Postgres connected, file cache set to {fc}"),
            )),
            "upscale_requested" => rows.push((
                at,
                format!(
                    "vm-monitor decides to ask for memory: {}",
                    d["input"].as_str().unwrap_or_default()
                ),
            )),
            "upscale_applied" | "downscale_approved" | "downscale_denied" | "scaling_failed" => {
                rows.push((
                    at,
                    format!(
                        "vm-monitor {}: {}",
                        kind.replace('_', " "),
                        d["detail"].as_str().unwrap_or_default()
                    ),
                ))
            }
            _ => {}
        }
    }
    // Consecutive memory.high steps read better as one line.
    for group in raised.chunk_by(|a, b| b.0 - a.0 < 2_000_000_000) {
        let (first, last) = (group[0], group[group.len() - 1]);
        rows.push((
            first.0,
            format!(
                "vm-monitor raises memory.high in steps while the upscale is pending: {} steps over {:.0} ms, up to {}",
                group.len(),
                (last.0 - first.0) as f64 / 1e6,
                high_str(last.1)
            ),
        ));
    }
    let agent_boot = clock.boot_of(agent_epoch);
    let mut first_request = None;
    for e in &transcript.0 {
        let at = agent_boot + e.at.as_nanos() as u64;
        let Frame::Text(text) = &e.frame else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        let line = match (e.dir, v["type"].as_str().unwrap_or_default()) {
            (Dir::Received, "UpscaleRequest") => {
                first_request.get_or_insert(at);
                "agent ← UpscaleRequest".to_string()
            }
            (Dir::Sent, "UpscaleNotification") => format!(
                "agent → UpscaleNotification: the VM now has {}{}",
                mib(v["content"]["granted"]["mem"].as_u64().unwrap_or(0)),
                if first_request.is_some() {
                    format!(
                        " (granted after a simulated {} ms scheduler + NeonVM delay)",
                        GRANT_DELAY.as_millis()
                    )
                } else {
                    " (the agent announces the VM's size)".to_string()
                }
            ),
            (Dir::Received, "UpscaleConfirmation") => "agent ← UpscaleConfirmation".to_string(),
            (Dir::Sent, "DownscaleRequest") => format!(
                "agent → DownscaleRequest to {}",
                mib(v["content"]["target"]["mem"].as_u64().unwrap_or(0))
            ),
            (Dir::Received, "DownscaleResult") => format!(
                "agent ← DownscaleResult Ok={} \"{}\"",
                v["Ok"],
                v["Status"].as_str().unwrap_or_default()
            ),
            (Dir::Received, "InternalError") => format!("agent ← InternalError {}", v["error"]),
            _ => continue,
        };
        rows.push((at, line));
    }
    let reaction = match (crossing, first_request) {
        (Some((crossed, reading)), Some(req)) => {
            let crossed = clock.boot_of(crossed);
            rows.push((
                crossed,
                format!(
                    "non-reclaimable memory crosses the threshold {} (independent memory.stat watcher: {})",
                    mib(one.threshold),
                    mib(reading)
                ),
            ));
            Some((req as f64 - crossed as f64) / 1e6)
        }
        _ => None,
    };

    // One row per second while the workload runs (and for any other second with pressure
    // events): the sampled memory and the kernel's pressure events, counted by kind.
    let events = std::fs::read_to_string(&events_path).unwrap_or_default();
    let mut per_second: BTreeMap<u64, BTreeMap<String, u64>> = BTreeMap::new();
    let mut total_events = 0u64;
    for line in events.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(ts), Some(kind)) = (v["ts_ns"].as_u64(), v["kind"].as_str()) else {
            continue;
        };
        let n = v["events"].as_u64().unwrap_or(1);
        total_events += n;
        let second = ts.saturating_sub(postgres_up) / 1_000_000_000;
        *per_second
            .entry(second)
            .or_default()
            .entry(kind.to_string())
            .or_default() += n;
    }
    let second_of = |ns: u64| ns.saturating_sub(postgres_up) / 1_000_000_000;
    for second in second_of(workload_start)..=second_of(workload_end) + 1 {
        per_second.entry(second).or_default();
    }
    let samples = samples.lock().unwrap().clone();
    for (second, kinds) in &per_second {
        let start = postgres_up + second * 1_000_000_000;
        let end = start + 1_000_000_000;
        let in_second: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.boot_ns >= start && s.boot_ns < end)
            .collect();
        let memory = match (in_second.first(), in_second.last()) {
            (Some(first), Some(last)) => {
                let anon = in_second.iter().map(|s| s.anon).max().unwrap_or(0);
                let high = if first.high == last.high {
                    high_str(last.high)
                } else {
                    format!("{} → {}", high_str(first.high), high_str(last.high))
                };
                format!("anon up to {}, memory.high {high}; ", mib(anon))
            }
            _ => String::new(),
        };
        let kinds = if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push((start, format!("  | {memory}pressure events: {kinds}")));
    }

    rows.sort_by_key(|(at, _)| *at);
    let mut text = String::new();
    let _ = writeln!(
        text,
        "vm-monitor demo: kernel {}, guest MemTotal {}, cgroup {CGROUP} (id {}), signal tier ebpf",
        std::env::var("VM_MONITOR_KERNEL").unwrap_or_default(),
        mib(tests::scenario::mem_total()?),
        cg.id()
    );
    let _ = writeln!(
        text,
        "sizes at 1 GiB: usable {}, threshold {}, file cache {}; at 2 GiB: threshold {}, file cache {} (capped by neon.max_file_cache_size)",
        mib(one.usable),
        mib(one.threshold),
        mib(one.file_cache),
        mib(Sizes::for_allocation(2 * GIB).threshold),
        mib(Sizes::for_allocation(2 * GIB).file_cache)
    );
    let _ = writeln!(text);
    // Time 0 is when Postgres was up (the cluster's initdb is no part of the story).
    let origin = postgres_up as f64;
    for (at, line) in &rows {
        let rel = (*at as f64 - origin) / 1e9;
        let _ = writeln!(text, "{rel:>8.3} s  {line}");
    }
    let _ = writeln!(text);
    let decided = decisions
        .iter()
        .find(|d| d["kind"] == "upscale_requested")
        .map(|d| duration_ns(&d["at"]));
    let _ = writeln!(
        text,
        "reaction time: {bench_reaction:.1} ms from the page fault that crosses the threshold to the UpscaleRequest at the agent (measured as `cargo xtask bench --parts latency` measures it: release build, production log level; compare its report)"
    );
    match reaction {
        Some(ms) => {
            let _ = writeln!(
                text,
                "SQL session: {ms:.1} ms from the crossing (seen by a memory.stat watcher polling every 1 ms) to the UpscaleRequest"
            );
            if let (Some(decided), Some(req)) = (decided, first_request) {
                let _ = writeln!(
                    text,
                    "the daemon's own view (the kernel event it acted on → UpscaleRequest at the agent): {:.1} ms",
                    (req as f64 - decided as f64) / 1e6
                );
            }
        }
        None => {
            let _ = writeln!(
                text,
                "reaction time: not measured (no crossing or no UpscaleRequest seen)"
            );
        }
    }
    let _ = writeln!(
        text,
        "{total_events} reclaim/OOM events from the kernel in pressure-events.jsonl (none is expected: memory.high stays max, the crossing is seen by the growth hint); also decisions.jsonl, vm-monitor.log, agent-transcript.txt"
    );
    print!("\n{text}");

    std::fs::write(out.join("timeline.txt"), &text)?;
    std::fs::write(
        out.join("decisions.jsonl"),
        decisions
            .iter()
            .map(|d| format!("{d}\n"))
            .collect::<String>(),
    )?;
    std::fs::write(
        out.join("vm-monitor.log"),
        lines
            .iter()
            .map(|l| format!("{}\n", l.text))
            .collect::<String>(),
    )?;
    std::fs::write(out.join("agent-transcript.txt"), transcript.to_string())?;
    if first_request.is_none() {
        bail!("the workload never produced an UpscaleRequest");
    }
    Ok(())
}

/// Just below the threshold before the measured ramp, as the bench does.
const PRE_GAP: u64 = 96 << 20;
/// How far past the threshold the measured ramp goes.
const OVERSHOOT: u64 = 32 << 20;

/// One ramp of the bench's latency part; returns the crossing (CLOCK_BOOTTIME ns) and crossing
/// → UpscaleRequest in ms. The agent grants it (after its scheduler delay); the memory is freed
/// before returning.
async fn bench_ramp(
    cg: &Cgroup,
    agent: &tests::agent::FakeAgent,
    sizes: &Sizes,
) -> anyhow::Result<(u64, f64)> {
    let memhog = std::env::current_exe()?
        .parent()
        .context("the driver has no directory")?
        .join("memhog");
    let mut hog = MemHog::start(cg, &memhog)?;
    let base = cg.non_reclaimable()?;
    let pre = sizes.threshold.saturating_sub(base).saturating_sub(PRE_GAP) / MIB;
    hog.grow(pre, 32, Duration::ZERO)?;
    hog.wait_held(Duration::from_secs(60))?;
    let _ = agent.take_upscale_requests().await;
    let missing = sizes.threshold.saturating_sub(cg.non_reclaimable()?);
    let cross_at = hog.held_mib * MIB + missing;
    hog.grow_marked(
        (cross_at + OVERSHOOT).div_ceil(MIB),
        4,
        Duration::from_millis(20),
        cross_at,
    )?;
    let (_, received_ns) = agent
        .wait_for_upscale_request_at(Duration::from_secs(60))
        .await?;
    let crossed_ns = hog
        .wait_crossed(Duration::from_secs(30))
        .context("the memhog never reached the threshold")?;
    hog.wait_held(Duration::from_secs(120))?;
    hog.free()?;
    Ok((crossed_ns, (received_ns as f64 - crossed_ns as f64) / 1e6))
}

/// A serialized `Duration` (`{"secs":..,"nanos":..}`) in nanoseconds.
fn duration_ns(v: &Value) -> u64 {
    v["secs"].as_u64().unwrap_or(0) * 1_000_000_000 + v["nanos"].as_u64().unwrap_or(0)
}
