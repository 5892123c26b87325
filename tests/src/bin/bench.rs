//! Guest side of `cargo xtask bench`: raw measurements of the signal tiers (ebpf, psi, poll)
//! inside the test VM. Statistics are the host's job; this only writes samples.
//!
//! - Reaction latency: in blocks of `BENCH_BLOCK` ramps per tier, tiers rotating between blocks
//!   (one daemon start per block), each ramp a fresh memhog pushing anonymous memory past the
//!   upscale threshold. The crossing is timestamped by [`CrossingWatch`] (1 ms memory.stat
//!   watcher, SCHED_FIFO), the end by the fake agent receiving `UpscaleRequest`.
//! - Idle cost: per tier, `BENCH_IDLE_SECS` with the agent connected and no memory activity:
//!   the daemon's CPU time (utime + stime) and voluntary context switches (all threads).
//!
//! The daemon runs without `--pgconnstr` (no Postgres): the file cache plays no part in the
//! upscale trigger, and skipping Postgres saves minutes per boot under TCG.
//!
//! Output in `$VM_MONITOR_OUT/bench/`: `latency.csv`, `idle.csv`, `startup.csv`, `meta.txt`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use tests::scenario::{
    CGROUP, Cgroup, CrossingWatch, GIB, MIB, MemHog, Monitor, MonitorOptions, Sizes, agent_config,
    boottime_ns, connect_agent, cu,
};

/// Default tiers; `BENCH_TIERS` (comma-separated) overrides. `ebpf-c0` is the ebpf tier with
/// in-kernel coalescing off (`--coalesce-ms 0`), to see what the 10 ms default costs.
const TIERS: &str = "ebpf,psi,poll";
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

struct Out {
    dir: PathBuf,
}

impl Out {
    fn append(&self, file: &str, header: &str, row: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let path = self.dir.join(file);
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            writeln!(f, "{header}")?;
        }
        writeln!(f, "{row}")?;
        // The VM can be killed on a timeout; keep what was measured so far.
        f.sync_all()?;
        Ok(())
    }
}

async fn run() -> anyhow::Result<()> {
    let out_root = std::env::var_os("VM_MONITOR_OUT").context("VM_MONITOR_OUT is not set")?;
    let kernel = std::env::var("VM_MONITOR_KERNEL").unwrap_or_default();
    let out = Out {
        dir: Path::new(&out_root).join("bench"),
    };
    std::fs::create_dir_all(&out.dir)?;
    let ramps = env_u64("BENCH_RAMPS", 5);
    let block = env_u64("BENCH_BLOCK", 5).max(1);
    let idle_secs = env_u64("BENCH_IDLE_SECS", 15);
    let memhog = std::env::current_exe()?
        .parent()
        .context("no exe dir")?
        .join("memhog");
    ensure!(memhog.is_file(), "{} is missing", memhog.display());

    write_meta(&out, &kernel)?;
    let cg = Cgroup::create(CGROUP)?;
    let tiers_env = std::env::var("BENCH_TIERS").unwrap_or_else(|_| TIERS.to_string());
    let tiers: Vec<&str> = tiers_env.split(',').filter(|t| !t.is_empty()).collect();
    let idle_tiers: Vec<&str> = tiers.iter().copied().filter(|t| !t.contains('-')).collect();

    // Latency: tiers rotate between blocks so a slow drift of the machine hits all of them.
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
            let (mut mon, startup) = start(&cg, tier)?;
            out.append(
                "startup.csv",
                "kernel,tier,startup_ms",
                &format!("{kernel},{tier},{:.1}", startup.as_secs_f64() * 1e3),
            )?;
            for _ in 0..n {
                let r = match ramp(&mon, &cg, &memhog)
                    .await
                    .with_context(|| format!("{tier} ramp {}", done[t] + 1))?
                {
                    Some(r) => r,
                    None => {
                        // The daemon keeps memory.high at or above its last reading; on the
                        // event tiers that reading can be stale after the free. A fresh daemon
                        // starts from the true state.
                        eprintln!(
                            "bench: {tier}: memory.high not back at 1 CU; restarting the daemon"
                        );
                        ensure!(mon.terminate()?.success(), "{tier}: daemon exit failed");
                        let (m, startup) = start(&cg, tier)?;
                        mon = m;
                        out.append(
                            "startup.csv",
                            "kernel,tier,startup_ms",
                            &format!("{kernel},{tier},{:.1}", startup.as_secs_f64() * 1e3),
                        )?;
                        ramp(&mon, &cg, &memhog)
                            .await
                            .with_context(|| format!("{tier} ramp {}", done[t] + 1))?
                            .context("memory.high not at 1 CU even with a fresh daemon")?
                    }
                };
                done[t] += 1;
                eprintln!(
                    "bench: {kernel} {tier} ramp {}: {:.2} ms (trigger {}, early requests {})",
                    done[t], r.reaction_ms, r.trigger, r.early
                );
                out.append(
                    "latency.csv",
                    "kernel,block,tier,ramp,reaction_ms,event_to_frame_ms,reading_mib,early_requests,trigger",
                    &format!(
                        "{kernel},{b},{tier},{},{:.3},{:.3},{:.1},{},\"{}\"",
                        done[t],
                        r.reaction_ms,
                        r.event_to_frame_ms,
                        r.reading as f64 / MIB as f64,
                        r.early,
                        r.trigger.replace('"', "'")
                    ),
                )?;
            }
            ensure!(mon.terminate()?.success(), "{tier}: daemon exit failed");
        }
    }

    // Idle cost.
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
    Ok(())
}

fn write_meta(out: &Out, kernel: &str) -> anyhow::Result<()> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut meta = String::new();
    writeln!(meta, "kernel_line={kernel}")?;
    writeln!(
        meta,
        "guest_release={}",
        read("/proc/sys/kernel/osrelease").trim()
    )?;
    writeln!(
        meta,
        "guest_cpus={}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    writeln!(
        meta,
        "guest_memtotal_mib={}",
        tests::scenario::mem_total().unwrap_or(0) / MIB
    )?;
    writeln!(
        meta,
        "bpf_jit_enable={}",
        read("/proc/sys/net/core/bpf_jit_enable").trim()
    )?;
    std::fs::write(out.dir.join("meta.txt"), meta)?;
    Ok(())
}

/// Starts the daemon on `tier` (no Postgres) and checks it really runs that tier.
fn start(cg: &Cgroup, tier: &str) -> anyhow::Result<(Monitor, Duration)> {
    let started = Instant::now();
    let (signal, extra) = match tier.split_once('-') {
        Some((signal, "c0")) => (signal, vec!["--coalesce-ms".to_string(), "0".to_string()]),
        Some(_) => anyhow::bail!("unknown tier variant {tier}"),
        None => (tier, Vec::new()),
    };
    let mut opts = MonitorOptions::new(signal, None);
    opts.extra = extra;
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
    /// Crossing seen by the watcher → UpscaleRequest at the agent; negative if the request came
    /// first (the watcher polls every 1 ms; the eBPF tier can beat it).
    reaction_ms: f64,
    /// The kernel event (or poll sample) the decision is stamped with → the frame at the agent,
    /// both CLOCK_BOOTTIME: the daemon's own share of the reaction.
    event_to_frame_ms: f64,
    reading: u64,
    early: u32,
    trigger: String,
}

/// One measured ramp; `None` if memory.high did not come back to the 1 CU value (the ramp
/// would then cross the threshold before any reclaim, which is not the steady state).
async fn ramp(mon: &Monitor, cg: &Cgroup, memhog: &Path) -> anyhow::Result<Option<Ramp>> {
    let sizes = Sizes::for_allocation(GIB);
    let mut cfg = agent_config(mon.url());
    // Frame echo goes to the serial console, which costs guest CPU during the measurement.
    cfg.echo = false;
    let agent = connect_agent(cfg).await?;
    if !wait_high(cg, sizes.memory_high).await? {
        agent.close().await?;
        return Ok(None);
    }

    let base = cg.non_reclaimable()?;
    let mut hog = MemHog::start(cg, memhog)?;
    let pre = sizes.threshold.saturating_sub(base).saturating_sub(PRE_GAP) / MIB;
    hog.grow(pre, 32, Duration::ZERO)?;
    hog.wait_held(Duration::from_secs(60))?;
    // A request before the measured ramp would be stale (left from the previous ramp) or a
    // false trigger; count them so they cannot pass for a fast reaction.
    let mut early = 0;
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

    let target = (sizes.threshold.saturating_sub(base) + OVERSHOOT) / MIB;
    let mark = mon.mark();
    let watch = CrossingWatch::start(cg, sizes.threshold, Duration::from_millis(1));
    hog.grow(target, 4, Duration::from_millis(20))?;
    agent
        .wait_for_upscale_request(Duration::from_secs(60))
        .await?;
    let received = Instant::now();
    let received_boot = boottime_ns();
    // If the daemon beat the watcher's poll, the crossing shows up right after.
    let (crossed, reading) = watch
        .crossing(Duration::from_secs(10))
        .context("the watcher never saw the threshold crossed")?;
    let reaction_ms = if received >= crossed {
        (received - crossed).as_secs_f64() * 1e3
    } else {
        -((crossed - received).as_secs_f64() * 1e3)
    };
    let decision = mon.wait_for_decision(mark, "upscale_requested", Duration::from_secs(10))?;
    let trigger = decision["input"].as_str().unwrap_or_default().to_string();
    let at = &decision["at"];
    let decided_ns = at["secs"].as_u64().context("decision without at.secs")? * 1_000_000_000
        + at["nanos"].as_u64().context("decision without at.nanos")?;
    let event_to_frame_ms = (received_boot as f64 - decided_ns as f64) / 1e6;

    // Grant, as the agent would, so memory.high lifts and the hog finishes unthrottled.
    agent.upscale_to(cu(2), Duration::from_secs(20)).await?;
    hog.wait_held(Duration::from_secs(120))?;
    hog.free()?;
    drop(hog);
    agent.close().await?;
    Ok(Some(Ramp {
        reaction_ms,
        event_to_frame_ms,
        reading,
        early,
        trigger,
    }))
}

/// Waits (briefly) until the daemon applied the 1 CU memory.high (the fresh agent announced
/// 1 CU); false if it did not.
async fn wait_high(cg: &Cgroup, want: u64) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_millis(1500);
    loop {
        if cg.high()? == Some(want) {
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
    let (sw0, cpu0) = (switches(pid)?, cpu_ticks(pid)?);
    let t0 = Instant::now();
    tokio::time::sleep(span).await;
    let (sw1, cpu1) = (switches(pid)?, cpu_ticks(pid)?);
    let secs = t0.elapsed().as_secs_f64();
    let rss_kib = status_field(&format!("/proc/{pid}/status"), "VmRSS:")?;
    // Threads started meanwhile count from zero; none should exit while idle.
    let switches: u64 = sw1
        .iter()
        .map(|(tid, n)| n.saturating_sub(sw0.get(tid).copied().unwrap_or(0)))
        .sum();
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    agent.close().await?;
    ensure!(mon.terminate()?.success(), "{tier}: daemon exit failed");
    Ok(Idle {
        secs,
        switches,
        cpu_ms: (cpu1.saturating_sub(cpu0)) as f64 * 1e3 / hz,
        rss_kib,
    })
}

fn status_field(path: &str, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

/// Voluntary context switches per thread.
fn switches(pid: u32) -> anyhow::Result<std::collections::BTreeMap<u64, u64>> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let path = e.path().join("status");
        if let Ok(n) = status_field(&path.to_string_lossy(), "voluntary_ctxt_switches:") {
            out.insert(tid, n);
        }
    }
    Ok(out)
}

/// utime + stime of the whole process, clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}
