//! Guest side of `cargo xtask bench`: raw measurements of the signal tiers (ebpf, psi, poll)
//! inside the test VM. Statistics are the host's job; this only writes samples.
//!
//! - Reaction latency: in blocks of `BENCH_BLOCK` ramps per tier, tiers rotating between blocks
//!   (one daemon and one agent connection per block, nothing restarted between ramps), each
//!   ramp a fresh memhog pushing anonymous memory past the upscale threshold. The crossing is
//!   timestamped by the workload itself (the page fault that reaches the threshold,
//!   CLOCK_BOOTTIME), the end by the fake agent receiving `UpscaleRequest`. Ramps alternate
//!   between an agent that grants (then scales back down) and one that never answers, whose
//!   ramp holds above the threshold and counts the repeated requests.
//! - Idle cost: per tier, `BENCH_IDLE_SECS` with the agent connected and no memory activity:
//!   the daemon's CPU time (utime + stime) and voluntary context switches (all threads).
//!
//! - Overhead: a fixed reclaim-heavy workload (anonymous churn through memory.high into zram
//!   swap, then a page-cache read larger than memory.high from a loop-mounted ext4) timed with
//!   no daemon and with the ebpf daemon attached, alternating; then once per JIT mode with
//!   `--bpf-stats` for the programs' own cost per run.
//! - Event storm: `BENCH_STORM_TASKS` tasks churning memory through memory.high for
//!   `BENCH_STORM_SECS` (anonymous memory into zram swap, or with variant `ebpf-pc` re-reading
//!   page cache from ext4): the kernel's counters and the daemon's deliveries from /metrics, its
//!   CPU time and RSS (sampled every second).
//!
//! - Managed overhead: the daemon as it ships (ebpf, agent at 1 CU, memory.high as shipped),
//!   the daemon with `--memory-high-guard`, and no daemon at all, rotating per round, on
//!   workloads that keep non-reclaimable memory below the threshold: a page-cache read of
//!   1.5 × the threshold, an anonymous ramp to 64 MiB below it and a PostgreSQL sequential
//!   scan of a table of 1.5 × the threshold (the daemons manage its file cache). Per run: wall time, the
//!   cgroup's PSI some/full stall, memory.events high, daemon CPU, UpscaleRequests.
//!
//! `BENCH_PARTS` (comma-separated: latency, idle, overhead, storm, managed) selects parts. The daemon
//! runs without `--pgconnstr` (no Postgres): the file cache plays no part in any of this, and
//! skipping Postgres saves minutes per boot under TCG.
//!
//! Output in `$VM_MONITOR_OUT/bench/`: `latency.csv`, `idle.csv`, `startup.csv`,
//! `overhead.csv`, `bpf-cost.csv`, `storm.csv`, `storm-rss.csv`, `managed.csv`, `meta.txt`.

// Test and bench drivers: a failure ends the run with a message, which is what unwrapping does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use tests::agent::FakeAgent;
use tests::benchkit::{CsvDir, MetricsPage, ProcSample, overhead_pairs, write_meta};
use tests::scenario::{
    CGROUP, Cgroup, Ext4Scratch, GIB, MIB, MemHog, Monitor, MonitorOptions, Postgres, Sizes,
    agent_config, chown_tree, connect_agent, cu,
};

/// Default tiers; `BENCH_TIERS` (comma-separated) overrides. `ebpf-c0` is the ebpf tier with
/// in-kernel coalescing off (`--coalesce-ms 0`), to see what the 10 ms default costs;
/// `ebpf-nagle` the ebpf tier without TCP_NODELAY.
const TIERS: &str = "ebpf,psi,poll";
/// Every part, in the order they run.
const PARTS: &str = "latency,idle,overhead,storm,managed";
/// Anonymous memory is pre-grown quickly to this far below the threshold; only the last stretch
/// is the measured ramp (keeps each ramp ~1 s under TCG).
const PRE_GAP: u64 = 96 * MIB;
/// The measured ramp: 4 MiB every 20 ms, past the threshold by this much.
const OVERSHOOT: u64 = 32 * MIB;
const SETTLE: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    tests::scenario::run_driver("bench", run())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run() -> anyhow::Result<()> {
    // The fake agent's code is part of every measured frame path: read this binary into the
    // page cache once, so its first frame does not wait on 9p page faults.
    if let Ok(mut exe) = std::fs::File::open("/proc/self/exe") {
        let _ = std::io::copy(&mut exe, &mut std::io::sink());
    }
    let out_root = std::env::var_os("VM_MONITOR_OUT").context("VM_MONITOR_OUT is not set")?;
    let kernel = std::env::var("VM_MONITOR_KERNEL").unwrap_or_default();
    let out = CsvDir::new(Path::new(&out_root).join("bench"))?;
    let parts_env = std::env::var("BENCH_PARTS").unwrap_or_else(|_| PARTS.to_string());
    let parts: Vec<&str> = parts_env.split(',').filter(|p| !p.is_empty()).collect();
    for p in &parts {
        ensure!(
            PARTS.split(',').any(|k| k == *p),
            "unknown bench part {p:?}"
        );
    }
    let ramps = env_u64("BENCH_RAMPS", 5);
    let block = env_u64("BENCH_BLOCK", 5).max(1);
    let idle_secs = env_u64("BENCH_IDLE_SECS", 15);
    let memhog = std::env::current_exe()?
        .parent()
        .context("no exe dir")?
        .join("memhog");
    ensure!(memhog.is_file(), "{} is missing", memhog.display());

    write_meta(&out, &[("kernel_line", &kernel)])?;
    let cg = Cgroup::create(CGROUP)?;
    let tiers_env = std::env::var("BENCH_TIERS").unwrap_or_else(|_| TIERS.to_string());
    let tiers: Vec<&str> = tiers_env.split(',').filter(|t| !t.is_empty()).collect();
    let idle_tiers: Vec<&str> = tiers.iter().copied().filter(|t| !t.contains('-')).collect();

    if parts.contains(&"latency") {
        latency(&out, &cg, &memhog, &kernel, &tiers, ramps, block).await?;
    }
    if parts.contains(&"idle") {
        // Variants (`ebpf-c0`) only matter for latency.
        for tier in idle_tiers {
            let s = idle(&cg, tier, Duration::from_secs(idle_secs)).await?;
            eprintln!(
                "bench: {kernel} {tier} idle {idle_secs} s: {} voluntary switches, {:.1} ms CPU, RSS {} KiB",
                s.switches, s.cpu_ms, s.rss_kib
            );
            out.append(
                "idle.csv",
                "kernel,tier,seconds,voluntary_switches,cpu_ms,rss_kib",
                &format!(
                    "{kernel},{tier},{:.3},{},{:.1},{}",
                    s.secs, s.switches, s.cpu_ms, s.rss_kib
                ),
            )?;
        }
    }
    if parts.contains(&"managed") {
        let rounds = env_u64("BENCH_OVERHEAD_PAIRS", 5);
        managed(&out, &cg, &memhog, &kernel, rounds).await?;
    }
    if parts.contains(&"overhead") || parts.contains(&"storm") {
        tests::scenario::ensure_zram_swap(768)?;
    }
    if parts.contains(&"overhead") {
        let pairs = env_u64("BENCH_OVERHEAD_PAIRS", 5);
        overhead(&out, &cg, &memhog, &kernel, pairs).await?;
    }
    if parts.contains(&"storm") {
        let secs = env_u64("BENCH_STORM_SECS", 30);
        let tasks = env_u64("BENCH_STORM_TASKS", 8);
        let variants = std::env::var("BENCH_STORM_VARIANTS").unwrap_or_else(|_| "ebpf".into());
        for variant in variants.split(',').filter(|v| !v.is_empty()) {
            storm(&out, &cg, &memhog, &kernel, variant, tasks, secs).await?;
        }
    }
    Ok(())
}

async fn latency(
    out: &CsvDir,
    cg: &Cgroup,
    memhog: &Path,
    kernel: &str,
    tiers: &[&str],
    ramps: u64,
    block: u64,
) -> anyhow::Result<()> {
    // Latency: tiers rotate between blocks so a slow drift of the machine hits all of them.
    // One daemon and one agent connection per block: the ramps follow each other as they
    // would in production, nothing is restarted in between.
    let blocks = ramps.div_ceil(block);
    let mut done = vec![0u64; tiers.len()];
    for b in 0..blocks {
        for k in 0..tiers.len() {
            let t = (k + b as usize) % tiers.len();
            let tier = tiers[t];
            let n = block.min(ramps - done[t]);
            if n == 0 {
                continue;
            }
            let (mut mon, startup) = start(cg, tier)?;
            out.append(
                "startup.csv",
                "kernel,tier,startup_ms",
                &format!("{kernel},{tier},{:.1}", startup.as_secs_f64() * 1e3),
            )?;
            let mut cfg = agent_config(mon.url());
            // Frame echo goes to the serial console, which costs guest CPU during the measurement.
            cfg.echo = false;
            let agent = connect_agent(cfg).await?;
            for _ in 0..n {
                // Alternate: the agent grants (and later scales back down), or never answers.
                let grant = done[t].is_multiple_of(2);
                let r = ramp(&mon, &agent, cg, memhog, tier.ends_with("-guard"), grant)
                    .await
                    .with_context(|| format!("{tier} ramp {}", done[t] + 1))?;
                done[t] += 1;
                eprintln!(
                    "bench: {kernel} {tier} ramp {} ({}): {:.2} ms (trigger {}, early requests {}, {} more requests in {:.2} s while held, {} after the release)",
                    done[t],
                    r.mode(),
                    r.reaction_ms,
                    r.trigger,
                    r.early,
                    r.hold_requests,
                    r.hold_s,
                    r.after_release
                );
                out.append(
                    "latency.csv",
                    "kernel,block,tier,ramp,mode,reaction_ms,crossing_to_event_ms,event_to_frame_ms,reading_mib,early_requests,hold_s,hold_requests,after_release,trigger",
                    &format!(
                        "{kernel},{b},{tier},{},{},{:.3},{:.3},{:.3},{:.1},{},{:.3},{},{},\"{}\"",
                        done[t],
                        r.mode(),
                        r.reaction_ms,
                        r.crossing_to_event_ms,
                        r.event_to_frame_ms,
                        r.reading as f64 / MIB as f64,
                        r.early,
                        r.hold_s,
                        r.hold_requests,
                        r.after_release,
                        r.trigger.replace('"', "'")
                    ),
                )?;
            }
            agent.close().await?;
            ensure!(mon.terminate()?.success(), "{tier}: daemon exit failed");
            if std::env::var_os("BENCH_DAEMON_LOG").is_some() {
                let text: String = mon
                    .lines()
                    .iter()
                    .map(|l| format!("{}\n", l.text))
                    .collect();
                out.append(&format!("daemon-{tier}-{b}.log"), "log", &text)?;
            }
        }
    }
    Ok(())
}

/// Starts the daemon on `tier` (no Postgres) and checks it really runs that tier.
fn start(cg: &Cgroup, tier: &str) -> anyhow::Result<(Monitor, Duration)> {
    start_with(cg, tier, None)
}

/// [`start`], managing Postgres' file cache through `pgconnstr` if given.
fn start_with(
    cg: &Cgroup,
    tier: &str,
    pgconnstr: Option<String>,
) -> anyhow::Result<(Monitor, Duration)> {
    let started = Instant::now();
    let (signal, extra) = match tier.split_once('-') {
        Some((signal, "c0")) => (signal, vec!["--coalesce-ms".to_string(), "0".to_string()]),
        // The memory.high guard, for comparison with the daemon as shipped (guard off).
        Some((signal, "guard")) => (signal, vec!["--memory-high-guard".to_string()]),
        // Nagle left on, to show what TCP_NODELAY does to the latency.
        Some((signal, "nagle")) => (signal, vec!["--no-tcp-nodelay".to_string()]),
        Some(_) => anyhow::bail!("unknown tier variant {tier}"),
        None => (tier, Vec::new()),
    };
    let mut opts = MonitorOptions::new(signal, pgconnstr);
    opts.extra = extra;
    opts.rust_log = std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "info".into());
    let mon = Monitor::start(cg, &opts)?;
    let startup = started.elapsed();
    let line = mon.wait_for(0, Duration::from_secs(5), |l| {
        l.text.contains("pressure signal tier chosen")
    })?;
    ensure!(
        line.text.contains(&format!("tier={signal}")),
        "asked for {tier}, the daemon says: {}",
        line.text
    );
    Ok((mon, startup))
}

struct Ramp {
    /// The workload reaching the threshold → UpscaleRequest at the agent (CLOCK_BOOTTIME
    /// both); negative if the request came first (a false trigger).
    reaction_ms: f64,
    /// Crossing → the kernel event (or poll sample) the decision is stamped with: the kernel's
    /// (or the poll period's) share.
    crossing_to_event_ms: f64,
    /// The kernel event (or poll sample) the decision is stamped with → the frame at the agent,
    /// both CLOCK_BOOTTIME: the daemon's own share of the reaction.
    event_to_frame_ms: f64,
    reading: u64,
    early: u32,
    trigger: String,
    granted: bool,
    /// Ungranted ramps: the further requests in the [`HOLD`] after the first one, and the
    /// time from the first to the last of them.
    hold_s: f64,
    hold_requests: u64,
    /// Requests that came after the memory was freed (stale ones; should be 0 or 1).
    after_release: u64,
}

impl Ramp {
    fn mode(&self) -> &'static str {
        if self.granted { "grant" } else { "hold" }
    }
}

/// How long an ungranted ramp stays above the threshold after its first request.
const HOLD: Duration = Duration::from_secs(4);

/// One measured ramp on a connected agent at 1 CU. `grant`: the agent grants 2 CU on the
/// first request and, once the memory is freed, scales back to 1 CU through the downscale
/// protocol; otherwise it never answers and the ramp holds above the threshold for [`HOLD`].
async fn ramp(
    mon: &Monitor,
    agent: &FakeAgent,
    cg: &Cgroup,
    memhog: &Path,
    guard: bool,
    grant: bool,
) -> anyhow::Result<Ramp> {
    let sizes = Sizes::for_allocation(GIB);
    ensure!(
        wait_high(cg, guard.then_some(sizes.memory_high)).await?,
        "memory.high is {:?} before the ramp, not the 1 CU value",
        cg.high()?
    );

    let mut hog = MemHog::start(cg, memhog)?;
    let base = cg.non_reclaimable()?;
    let pre = sizes.threshold.saturating_sub(base).saturating_sub(PRE_GAP) / MIB;
    hog.grow(pre, 32, Duration::ZERO)?;
    hog.wait_held(Duration::from_secs(60))?;
    // A request before the measured ramp would be stale (left from the previous ramp) or a
    // false trigger; count them so they cannot pass for a fast reaction.
    let mut early = agent.take_upscale_requests().await as u32;
    while agent
        .wait_for_upscale_request(Duration::from_millis(1200))
        .await
        .is_ok()
    {
        early += 1;
        ensure!(
            early < 5,
            "the daemon keeps requesting upscale below the threshold"
        );
    }

    // The workload stamps its own crossing: with swap off for this cgroup its anonymous memory
    // can only grow, so non-reclaimable reaches the threshold exactly when the hog has touched
    // what is missing now.
    let missing = sizes.threshold.saturating_sub(cg.non_reclaimable()?);
    let cross_at = hog.held_mib * MIB + missing;
    let target = (cross_at + OVERSHOOT).div_ceil(MIB);
    let mark = mon.mark();
    hog.grow_marked(target, 4, Duration::from_millis(20), cross_at)?;
    let (_, received_ns) = agent
        .wait_for_upscale_request_at(Duration::from_secs(60))
        .await?;
    let crossed_ns = hog
        .wait_crossed(Duration::from_secs(30))
        .context("the workload never reached the threshold")?;
    let ms = |later: u64, earlier: u64| (later as f64 - earlier as f64) / 1e6;
    let decision = mon.wait_for_decision(mark, "upscale_requested", Duration::from_secs(10))?;
    let trigger = decision["input"].as_str().unwrap_or_default().to_string();
    let reading = decision["reading"].as_u64().unwrap_or(0);
    let at = &decision["at"];
    let decided_ns = at["secs"].as_u64().context("decision without at.secs")? * 1_000_000_000
        + at["nanos"].as_u64().context("decision without at.nanos")?;

    let (mut hold_s, mut hold_requests) = (0.0, 0);
    if grant {
        // As the agent would: memory.high (with the guard) lifts, the hog finishes.
        agent.upscale_to(cu(2), Duration::from_secs(20)).await?;
        hog.wait_held(Duration::from_secs(120))?;
    } else {
        // Nobody grants: the requests must keep coming at the rate limit while it stays above.
        // Timed from the first request's arrival: the rate is further requests ÷ the time
        // from the first to the last.
        let hold_from = Instant::now();
        while let Some(left) = HOLD.checked_sub(hold_from.elapsed()) {
            if agent.wait_for_upscale_request(left).await.is_ok() {
                hold_requests += 1;
                hold_s = hold_from.elapsed().as_secs_f64();
            }
        }
        hog.wait_held(Duration::from_secs(120))?;
    }
    hog.free()?;
    drop(hog);
    // A request decided just before the free may still arrive; more would be a daemon that
    // does not notice the release.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_release = agent.take_upscale_requests().await;
    if grant {
        let report = agent
            .downscale_to(cu(1), Duration::from_secs(60))
            .await
            .context("scaling back to 1 CU after the grant")?;
        ensure!(
            agent.vm() == cu(1),
            "the downscale to 1 CU did not complete: {report:?}"
        );
    }
    Ok(Ramp {
        reaction_ms: ms(received_ns, crossed_ns),
        crossing_to_event_ms: ms(decided_ns, crossed_ns),
        event_to_frame_ms: ms(received_ns, decided_ns),
        reading,
        early,
        trigger,
        granted: grant,
        hold_s,
        hold_requests,
        after_release,
    })
}

/// Waits (briefly) until the daemon applied the 1 CU memory.high (the fresh agent announced
/// 1 CU); false if it did not.
async fn wait_high(cg: &Cgroup, want: Option<u64>) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_millis(1500);
    loop {
        if cg.high()? == want {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Idle {
    secs: f64,
    switches: u64,
    cpu_ms: f64,
    rss_kib: u64,
}

async fn idle(cg: &Cgroup, tier: &str, span: Duration) -> anyhow::Result<Idle> {
    let (mut mon, _) = start(cg, tier)?;
    let mut cfg = agent_config(mon.url());
    cfg.echo = false;
    let agent = connect_agent(cfg).await?;
    tokio::time::sleep(SETTLE).await;
    let pid = mon.pid();
    let before = ProcSample::read(pid)?;
    let t0 = Instant::now();
    tokio::time::sleep(span).await;
    let after = ProcSample::read(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    agent.close().await?;
    ensure!(mon.terminate()?.success(), "{tier}: daemon exit failed");
    Ok(Idle {
        secs,
        switches: after.switches_since(&before),
        cpu_ms: after.cpu_ms_since(&before),
        rss_kib: after.rss_kib,
    })
}

// ---------------------------------------------------------------------------------------------
// Overhead on a reclaim-heavy workload

/// memory.high for the overhead and storm workloads: far below what they touch.
const WORKLOAD_HIGH: &str = "64M";
/// Anonymous churn per overhead run: this much touched and freed, this many times.
const OVERHEAD_ANON_MIB: u64 = 128;
const OVERHEAD_ROUNDS: u64 = 2;
/// Page-cache part of an overhead run: one read of a file this large.
const OVERHEAD_FILE_MIB: u64 = 192;

/// The fixed amount of reclaim-heavy work whose duration is compared.
struct Workload<'a> {
    cg: &'a Cgroup,
    memhog: &'a Path,
    fs: Ext4Scratch,
    file: PathBuf,
}

impl<'a> Workload<'a> {
    fn prepare(cg: &'a Cgroup, memhog: &'a Path) -> anyhow::Result<Workload<'a>> {
        // Swap allowed (zram), or anonymous memory above memory.high could not be reclaimed.
        cg.write("memory.swap.max", "max")?;
        cg.write("memory.high", WORKLOAD_HIGH)?;
        let fs = Ext4Scratch::mount(OVERHEAD_FILE_MIB + 64)?;
        let file = fs.sparse_file("churn", OVERHEAD_FILE_MIB * MIB)?;
        Ok(Workload {
            cg,
            memhog,
            fs,
            file,
        })
    }

    fn run(&self) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let mut hog = MemHog::start(self.cg, self.memhog)?;
        hog.churn(OVERHEAD_ANON_MIB, OVERHEAD_ROUNDS, 0.0)?;
        hog.wait_churned(Duration::from_secs(600))?;
        drop(hog);
        self.fs.read_in(self.cg, &self.file)?;
        Ok(t0.elapsed())
    }
}

impl Drop for Workload<'_> {
    fn drop(&mut self) {
        let _ = self.cg.write("memory.high", "max");
        let _ = self.cg.write("memory.swap.max", "0");
    }
}

/// The ebpf daemon attached to the workload's cgroup, leaving its memory.high alone (the
/// workload needs a fixed one) and with no agent: it consumes events and reads memory.stat
/// on each burst, as in production.
fn attach(cg: &Cgroup, extra: &[&str]) -> anyhow::Result<Monitor> {
    let mut opts = MonitorOptions::new("ebpf", None);
    opts.rust_log = "info".into();
    opts.extra = ["--no-memory-high"]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_string())
        .collect();
    Monitor::start(cg, &opts)
}

async fn overhead(
    out: &CsvDir,
    cg: &Cgroup,
    memhog: &Path,
    kernel: &str,
    pairs: u64,
) -> anyhow::Result<()> {
    let work = Workload::prepare(cg, memhog)?;
    // One unmeasured run: first faults of the binaries, zram and ext4 warm-up.
    let warm = work.run()?;
    eprintln!(
        "bench: {kernel} overhead warm-up run: {:.2} s",
        warm.as_secs_f64()
    );
    overhead_pairs("bench", out, kernel, pairs, |attached| {
        if !attached {
            return Ok((work.run()?, 0.0));
        }
        let mut mon = attach(cg, &[])?;
        let before = ProcSample::read(mon.pid())?;
        let elapsed = work.run()?;
        let after = ProcSample::read(mon.pid())?;
        ensure!(mon.terminate()?.success(), "daemon exit failed");
        Ok((elapsed, after.cpu_ms_since(&before)))
    })?;
    bpf_cost(out, &work, kernel).await
}

const JIT_SYSCTL: &str = "/proc/sys/net/core/bpf_jit_enable";

/// The programs' own cost per run, JIT on and off: one workload run each with `--bpf-stats`.
/// The JIT mode applies when a program is loaded, so the daemon starts after the switch.
async fn bpf_cost(out: &CsvDir, work: &Workload<'_>, kernel: &str) -> anyhow::Result<()> {
    let original = std::fs::read_to_string(JIT_SYSCTL)
        .with_context(|| format!("reading {JIT_SYSCTL}"))?
        .trim()
        .to_string();
    let result = async {
        for (jit, value) in [("on", "1"), ("off", "0")] {
            if let Err(err) = std::fs::write(JIT_SYSCTL, value) {
                // e.g. CONFIG_BPF_JIT_ALWAYS_ON refuses 0.
                eprintln!("bench: {kernel}: cannot set bpf_jit_enable={value}: {err}; skipped");
                continue;
            }
            let mut mon = attach(work.cg, &["--bpf-stats"])?;
            work.run()?;
            let page = MetricsPage::scrape(mon.addr).await?;
            ensure!(mon.terminate()?.success(), "daemon exit failed");
            let runs = page.by_label("vm_monitor_ebpf_program_runs_total", "program");
            let time = page.by_label("vm_monitor_ebpf_program_run_time_seconds_total", "program");
            ensure!(
                !runs.is_empty(),
                "no program statistics in /metrics with --bpf-stats"
            );
            for (program, n) in &runs {
                let ns = time.get(program).copied().unwrap_or(0.0) * 1e9;
                out.append(
                    "bpf-cost.csv",
                    "kernel,jit,program,runs,run_time_ns,variant",
                    &format!("{kernel},{jit},{program},{n},{ns:.0},overhead"),
                )?;
            }
            let (n, ns): (f64, f64) = runs
                .iter()
                .map(|(p, n)| (*n, time.get(p).copied().unwrap_or(0.0) * 1e9))
                .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            eprintln!(
                "bench: {kernel} bpf cost, JIT {jit}: {n} runs, {:.0} ns per run",
                ns / n.max(1.0)
            );
        }
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::write(JIT_SYSCTL, &original);
    result
}

// ---------------------------------------------------------------------------------------------
// Event storm

/// Each storm task touches and frees this much, over and over.
const STORM_TASK_MIB: u64 = 48;

async fn storm(
    out: &CsvDir,
    cg: &Cgroup,
    memhog: &Path,
    kernel: &str,
    variant: &str,
    tasks: u64,
    secs: u64,
) -> anyhow::Result<()> {
    // `-pc`: page-cache churn (each task re-reads its own file) instead of anonymous churn.
    // As shipped (the default window) unless the variant says otherwise.
    let (coalesce, page_cache) = match variant {
        "ebpf" => (None, false),
        "ebpf-c0" => (Some("0"), false),
        "ebpf-pc" => (None, true),
        other => anyhow::bail!("unknown storm variant {other}"),
    };
    let scratch = if page_cache {
        Some(Ext4Scratch::mount(tasks * STORM_TASK_MIB + 256)?)
    } else {
        None
    };
    cg.write("memory.swap.max", "max")?;
    cg.write("memory.high", WORKLOAD_HIGH)?;
    let result = async {
        let mut mon = match coalesce {
            Some(ms) => attach(cg, &["--coalesce-ms", ms])?,
            None => attach(cg, &[])?,
        };
        let pid = mon.pid();
        let mut hogs = Vec::new();
        let mut readers = Vec::new();
        if let Some(x) = &scratch {
            for i in 0..tasks {
                let file = x.sparse_file(&format!("storm-{i}"), STORM_TASK_MIB * MIB)?;
                readers.push(file);
            }
        } else {
            for _ in 0..tasks {
                hogs.push(MemHog::start(cg, memhog)?);
            }
        }
        let m0 = MetricsPage::scrape(mon.addr).await?;
        let p0 = ProcSample::read(pid)?;
        let t0 = Instant::now();
        for h in &mut hogs {
            h.churn(STORM_TASK_MIB, 0, secs as f64)?;
        }
        // Each reader loops over its file until the window ends and prints its rounds.
        let mut children = Vec::new();
        for file in &readers {
            let script = format!(
                "end=$(( $(date +%s) + {secs} )); n=0; while [ $(date +%s) -lt $end ]; do dd if='{}' of=/dev/null bs=1M status=none || exit 1; n=$((n+1)); done; echo $n",
                file.display()
            );
            children.push(
                cg.command("/bin/sh")
                    .args(["-c", &script])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .context("starting a page-cache reader")?,
            );
        }
        let mut rss = Vec::new();
        while t0.elapsed() < Duration::from_secs(secs) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let p = ProcSample::read(pid)?;
            rss.push((t0.elapsed().as_secs_f64(), p.rss_kib));
        }
        let mut rounds = 0;
        for h in &mut hogs {
            rounds += h.wait_churned(Duration::from_secs(secs + 300))?;
        }
        for child in children {
            let out = child.wait_with_output().context("waiting for a page-cache reader")?;
            ensure!(out.status.success(), "a page-cache reader failed: {:?}", out.status);
            rounds += String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .context("a page-cache reader printed no round count")?;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        // Let the daemon drain what was committed before the counters are compared.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let m1 = MetricsPage::scrape(mon.addr).await?;
        let p1 = ProcSample::read(pid)?;
        drop(hogs);
        ensure!(mon.terminate()?.success(), "daemon exit failed");

        let delta = |name: &str| m1.sum(name) - m0.sum(name);
        let kernel_kinds = |page: &MetricsPage, name: &str| -> f64 {
            // Delivered records of kernel kinds only (the engine also counts its own readings
            // under other kinds on other tiers).
            page.by_label(name, "kind")
                .iter()
                .filter(|(k, _)| monitor_kind(k))
                .map(|(_, v)| v)
                .sum()
        };
        let delivered = kernel_kinds(&m1, "vm_monitor_pressure_records_total")
            - kernel_kinds(&m0, "vm_monitor_pressure_records_total");
        let peak = rss.iter().map(|r| r.1).max().unwrap_or(p1.rss_kib);
        let first = rss.first().map_or(p0.rss_kib, |r| r.1);
        for (t, kib) in &rss {
            out.append(
                "storm-rss.csv",
                "kernel,variant,t_s,rss_kib",
                &format!("{kernel},{variant},{t:.1},{kib}"),
            )?;
        }
        let row = format!(
            "{kernel},{variant},{tasks},{elapsed:.2},{rounds},{},{},{},{},{delivered},{:.1},{},{},{},{},{}",
            delta("vm_monitor_ebpf_events_seen_total"),
            delta("vm_monitor_ebpf_records_emitted_total"),
            delta("vm_monitor_ebpf_events_coalesced_total"),
            delta("vm_monitor_ebpf_records_dropped_total"),
            p1.cpu_ms_since(&p0),
            p0.rss_kib,
            first,
            p1.rss_kib,
            peak,
            p1.hwm_kib,
        );
        eprintln!("bench: {kernel} storm {variant}: {row}");
        out.append(
            "storm.csv",
            "kernel,variant,tasks,seconds,rounds,seen,emitted,coalesced,dropped,delivered,daemon_cpu_ms,rss_before_kib,rss_first_kib,rss_end_kib,rss_peak_kib,hwm_kib",
            &row,
        )?;
        anyhow::Ok(())
    }
    .await;
    let _ = cg.write("memory.high", "max");
    let _ = cg.write("memory.swap.max", "0");
    drop(scratch);
    result
}

/// Whether a `kind` label of `vm_monitor_pressure_records_total` is a kernel (eBPF) kind.
fn monitor_kind(kind: &str) -> bool {
    !matches!(kind, "psi_trigger" | "memory_events" | "polled_sample")
}

/// Modes of the managed-overhead part: no daemon, the daemon as shipped, the guard.
const MANAGED_MODES: [&str; 3] = ["none", "ebpf", "ebpf-guard"];

/// Postgres in `cg` with an unlogged table of about `bytes` in a tablespace on `fs` (ext4,
/// so a scan goes through the page cache; the guest's root has none). Unlogged: no WAL to
/// write while building it.
fn scan_table(cg: &Cgroup, fs: &Ext4Scratch, bytes: u64) -> anyhow::Result<Postgres> {
    let started = Instant::now();
    let pg = Postgres::start(cg, "bench-pg")?;
    let dir = fs.mountpoint.join("tablespace");
    std::fs::create_dir_all(&dir)?;
    chown_tree(&dir)?;
    // Rows of ~1.8 kB stay inline and uncompressed (below the TOAST threshold): 4 per page.
    let rows = bytes / 2048;
    // Two calls: `-c` runs its statements in one transaction, which CREATE TABLESPACE refuses.
    pg.psql(&format!(
        "CREATE TABLESPACE bench LOCATION '{}'",
        dir.display()
    ))?;
    pg.psql(&format!(
        "CREATE UNLOGGED TABLE scan TABLESPACE bench AS \
         SELECT i, repeat(md5(i::text), 56) AS pad FROM generate_series(1, {rows}) i"
    ))?;
    let size = pg.psql("SELECT pg_relation_size('scan')")?;
    eprintln!(
        "bench: seq-scan table: {rows} rows, {size} bytes, built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(pg)
}

fn drop_caches() -> anyhow::Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

async fn managed(
    out: &CsvDir,
    cg: &Cgroup,
    memhog: &Path,
    kernel: &str,
    rounds: u64,
) -> anyhow::Result<()> {
    let sizes = Sizes::for_allocation(GIB);
    let read_bytes = sizes.threshold / 2 * 3;
    // Room for the read file and the table (same size, real data), with slack.
    // The table is real data: its image goes to the host-backed output dir, not guest memory.
    let out_dir = std::env::var_os("VM_MONITOR_OUT").context("VM_MONITOR_OUT is not set")?;
    let fs = Ext4Scratch::mount_in(Path::new(&out_dir), 2 * read_bytes / MIB + 512)?;
    let file = fs.sparse_file("managed", read_bytes)?;
    let pg = scan_table(cg, &fs, read_bytes)?;
    for round in 1..=rounds {
        for k in 0..MANAGED_MODES.len() {
            let mode = MANAGED_MODES[(k + round as usize) % MANAGED_MODES.len()];
            let (mut mon, agent) = if mode == "none" {
                cg.write("memory.high", "max")?;
                (None, None)
            } else {
                // Fully managing: the file cache too.
                let (mon, _) = start_with(cg, mode, Some(pg.connstr()))?;
                let mut cfg = agent_config(mon.url());
                cfg.echo = false;
                let agent = connect_agent(cfg).await?;
                let guard = mode.ends_with("-guard");
                ensure!(
                    wait_high(cg, guard.then_some(sizes.memory_high)).await?,
                    "{mode}: memory.high not where the daemon holds it at 1 CU"
                );
                (Some(mon), Some(agent))
            };
            for workload in [
                "page-cache-read",
                "anon-below-threshold",
                "postgres-seq-scan",
            ] {
                drop_caches()?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(a) = &agent {
                    a.take_upscale_requests().await;
                }
                let psi0 = cg.pressure()?;
                let high0 = cg.event("high")?;
                let cpu0 = match &mon {
                    Some(m) => Some(ProcSample::read(m.pid())?),
                    None => None,
                };
                let t0 = Instant::now();
                if workload == "page-cache-read" {
                    fs.read_in(cg, &file)?;
                } else if workload == "postgres-seq-scan" {
                    let rows = pg.psql("SELECT count(*) FROM scan")?;
                    ensure!(
                        rows.parse::<u64>().is_ok_and(|n| n > 0),
                        "seq scan returned {rows:?}"
                    );
                } else {
                    let mut hog = MemHog::start(cg, memhog)?;
                    let base = cg.non_reclaimable()?;
                    let target = sizes.threshold.saturating_sub(base + 64 * MIB) / MIB;
                    hog.grow(target, 4, Duration::from_millis(20))?;
                    hog.wait_held(Duration::from_secs(300))?;
                    hog.free()?;
                }
                let secs = t0.elapsed().as_secs_f64();
                let psi1 = cg.pressure()?;
                let high = cg.event("high")? - high0;
                let cpu_ms = match (&mon, &cpu0) {
                    (Some(m), Some(c0)) => ProcSample::read(m.pid())?.cpu_ms_since(c0),
                    _ => 0.0,
                };
                let requests = match &agent {
                    Some(a) => a.take_upscale_requests().await,
                    None => 0,
                };
                let some_us = psi1.some.total_us - psi0.some.total_us;
                let full_us = psi1.full.total_us - psi0.full.total_us;
                eprintln!(
                    "bench: {kernel} managed round {round} {mode} {workload}: {secs:.2} s, PSI full {:.1} ms / some {:.1} ms, memory.events high +{high}, daemon CPU {cpu_ms:.0} ms, {requests} UpscaleRequests",
                    full_us as f64 / 1e3,
                    some_us as f64 / 1e3
                );
                out.append(
                    "managed.csv",
                    "kernel,round,mode,workload,seconds,psi_some_us,psi_full_us,high_events,daemon_cpu_ms,upscale_requests",
                    &format!(
                        "{kernel},{round},{mode},{workload},{secs:.4},{some_us},{full_us},{high},{cpu_ms:.1},{requests}"
                    ),
                )?;
            }
            drop(agent);
            if let Some(m) = mon.as_mut() {
                ensure!(m.terminate()?.success(), "{mode}: daemon exit failed");
            }
        }
    }
    Ok(())
}
