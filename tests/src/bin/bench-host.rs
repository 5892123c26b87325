//! Host side of `cargo xtask bench` (run as root on the host kernel): what can be measured
//! without cgroup v2. The host's memory controller is v1 and belongs to the machine, so the
//! daemon cannot manage a cgroup here; the eBPF pipeline runs as `vm-monitor trace` (same
//! programs, ring buffer and consumer, no engine), reporting memcg reclaim of every cgroup.
//! Workloads run in a throw-away v1 child of this process's own memory cgroup.
//!
//! - Start-up: exec → programs attached (`trace`'s "tracing:" line) and exec → socket
//!   listening (the daemon without `--cgroup`, "server bound").
//! - Overhead: a page-cache churn (reads of a sparse file through a small memory limit) timed
//!   with and without `trace` attached, alternating.
//! - Storm and per-run cost: `BENCH_STORM_TASKS` readers churning the page cache for
//!   `BENCH_STORM_SECS` under `trace --bpf-stats`, with the default coalescing and with none.
//!
//! Output (`BENCH_OUT`): `meta.txt`, `host-startup.csv`, `overhead.csv`, `storm.csv`,
//! `bpf-cost.csv` (the last three with the VM driver's columns).

// Test and bench drivers: a failure ends the run with a message, which is what unwrapping does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use tests::benchkit::{CsvDir, ProcSample, overhead_pairs, write_meta};
use tests::hostcg::ScratchMemcg;

const MIB: u64 = 1 << 20;
/// Memory limit of the scratch cgroup: far below what the workloads read.
const LIMIT: u64 = 32 * MIB;
/// The churned file (sparse: its pages come from the page cache, no disk reads).
const FILE_MIB: u64 = 256;
/// Reads of the file per overhead run.
const OVERHEAD_READS: u64 = 48;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-host failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Host {
    bin: PathBuf,
    out: CsvDir,
    cg: ScratchMemcg,
    file: PathBuf,
}

fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the host benchmark loads BPF programs: run it as root"
    );
    let bin =
        PathBuf::from(std::env::var_os("VM_MONITOR_BIN").context("VM_MONITOR_BIN is not set")?);
    ensure!(bin.is_file(), "{} is missing", bin.display());
    let out = CsvDir::new(PathBuf::from(
        std::env::var_os("BENCH_OUT").context("BENCH_OUT is not set")?,
    ))?;
    let file = out.dir.join(format!("churn-{}.img", std::process::id()));
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(FILE_MIB * MIB))
        .with_context(|| format!("creating {}", file.display()))?;
    let host = Host {
        bin,
        out,
        cg: ScratchMemcg::create("bench", LIMIT)?,
        file,
    };
    let result = (|| {
        write_meta(&host.out, &[])?;
        startup(&host, env_u64("BENCH_HOST_STARTS", 10))?;
        overhead(&host, env_u64("BENCH_OVERHEAD_PAIRS", 5))?;
        let secs = env_u64("BENCH_STORM_SECS", 30);
        let tasks = env_u64("BENCH_STORM_TASKS", 8);
        for (variant, coalesce) in [("ebpf", "10"), ("ebpf-c0", "0")] {
            storm(&host, variant, coalesce, tasks, secs)?;
        }
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_file(&host.file);
    result
}

/// Spawns `bin args`, waits for a stderr line containing `ready`, returns the child and the
/// time from spawn to that line. The rest of stderr is drained in the background.
fn spawn_until(
    bin: &Path,
    args: &[&str],
    ready: &'static str,
    stdout: Stdio,
) -> anyhow::Result<(Child, Duration)> {
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(ready)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(Instant::now());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(at) => Ok((child, at - t0)),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!(
                "{} never said {ready:?} (exit status {status:?})",
                bin.display()
            );
        }
    }
}

/// SIGINT (graceful stop) and wait.
fn interrupt(mut child: Child) -> anyhow::Result<()> {
    tests::scenario::signal(child.id(), libc::SIGINT)?;
    let status = child.wait().context("waiting for vm-monitor")?;
    ensure!(status.success(), "vm-monitor exited with {status}");
    Ok(())
}

fn startup(host: &Host, n: u64) -> anyhow::Result<()> {
    for i in 0..n {
        let (child, attached) = spawn_until(&host.bin, &["trace"], "tracing:", Stdio::null())?;
        interrupt(child)?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let (child, listening) =
            spawn_until(&host.bin, &["--addr", &addr], "server bound", Stdio::null())?;
        std::thread::sleep(Duration::from_millis(500));
        let rss = ProcSample::read(child.id())?.rss_kib;
        interrupt(child)?;
        eprintln!(
            "bench-host: start {}: programs attached {:.1} ms, daemon listening {:.1} ms",
            i + 1,
            attached.as_secs_f64() * 1e3,
            listening.as_secs_f64() * 1e3
        );
        host.out.append(
            "host-startup.csv",
            "run,trace_attached_ms,daemon_listening_ms,daemon_rss_kib",
            &format!(
                "{},{:.2},{:.2},{rss}",
                i + 1,
                attached.as_secs_f64() * 1e3,
                listening.as_secs_f64() * 1e3
            ),
        )?;
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// One overhead run: the file read `OVERHEAD_READS` times through the limit.
fn churn_once(host: &Host) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let script = format!(
        "sh -c 'for i in $(seq {OVERHEAD_READS}); do dd if={} of=/dev/null bs=1M status=none || exit 1; done'",
        host.file.display()
    );
    let (_, status) = host.cg.run(&script)?;
    ensure!(status.success(), "page-cache churn failed: {status}");
    Ok(t0.elapsed())
}

fn overhead(host: &Host, pairs: u64) -> anyhow::Result<()> {
    churn_once(host)?; // warm-up: binaries, the file's metadata
    overhead_pairs("bench-host", &host.out, "host", pairs, |attached| {
        if !attached {
            return Ok((churn_once(host)?, 0.0));
        }
        let (child, _) = spawn_until(
            &host.bin,
            &["trace", "--json", "--coalesce-ms", "10"],
            "tracing:",
            Stdio::null(),
        )?;
        let before = ProcSample::read(child.id())?;
        let elapsed = churn_once(host)?;
        let after = ProcSample::read(child.id())?;
        interrupt(child)?;
        Ok((elapsed, after.cpu_ms_since(&before)))
    })
}

fn storm(host: &Host, variant: &str, coalesce: &str, tasks: u64, secs: u64) -> anyhow::Result<()> {
    let summary_path = host.out.dir.join(format!("host-storm-{variant}.jsonl"));
    let stdout = std::fs::File::create(&summary_path)
        .with_context(|| format!("creating {}", summary_path.display()))?;
    // `trace` outlives the storm by a margin so every record emitted during it is consumed
    // before the summary compares the kernel's counters with what arrived.
    let duration = (secs + 2).to_string();
    let (mut child, _) = spawn_until(
        &host.bin,
        &[
            "trace",
            "--json",
            "--bpf-stats",
            "--coalesce-ms",
            coalesce,
            "--duration",
            &duration,
        ],
        "tracing:",
        Stdio::from(stdout),
    )?;
    let pid = child.id();
    let p0 = ProcSample::read(pid)?;
    let t0 = Instant::now();
    let script = format!(
        "sh -c 'while :; do dd if={} of=/dev/null bs=1M status=none; done'",
        host.file.display()
    );
    let mut readers = Vec::new();
    for _ in 0..tasks {
        readers.push(host.cg.spawn(&script)?);
    }
    let mut rss = Vec::new();
    let mut last = p0.clone();
    let mut last_at = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        match ProcSample::read(pid) {
            Ok(p) => {
                rss.push(p.rss_kib);
                last = p;
                last_at = t0.elapsed();
            }
            Err(_) => break,
        }
    }
    for r in &mut readers {
        let _ = tests::scenario::signal(r.id(), libc::SIGKILL);
    }
    // The readers' shells run `dd` children; kill the whole cgroup's tasks.
    kill_all(&host.cg)?;
    for mut r in readers {
        let _ = r.wait();
    }
    // The storm's span: rates and CPU share are over the sampled window.
    let elapsed = last_at.as_secs_f64();
    // `trace` stops by itself after --duration.
    let status = child.wait().context("waiting for vm-monitor trace")?;
    ensure!(status.success(), "vm-monitor trace exited with {status}");

    let text = std::fs::read_to_string(&summary_path)?;
    let _ = std::fs::remove_file(&summary_path);
    let summary: Value = text
        .lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("summary").is_some())
        })
        .context("vm-monitor trace printed no summary")?;
    let kinds = summary["summary"]
        .as_object()
        .context("malformed summary")?;
    let total =
        |field: &str| -> u64 { kinds.values().map(|k| k[field].as_u64().unwrap_or(0)).sum() };
    let row = format!(
        "host,{variant},{tasks},{elapsed:.2},0,{},{},{},{},{},{:.1},{},{},{},{},{}",
        total("seen"),
        total("emitted"),
        total("coalesced"),
        total("dropped"),
        total("received_records"),
        last.cpu_ms_since(&p0),
        p0.rss_kib,
        rss.first().copied().unwrap_or(p0.rss_kib),
        last.rss_kib,
        rss.iter().copied().max().unwrap_or(last.rss_kib),
        last.hwm_kib,
    );
    eprintln!("bench-host: storm {variant}: {row}");
    host.out.append(
        "storm.csv",
        "kernel,variant,tasks,seconds,rounds,seen,emitted,coalesced,dropped,delivered,daemon_cpu_ms,rss_before_kib,rss_first_kib,rss_end_kib,rss_peak_kib,hwm_kib",
        &row,
    )?;
    let jit = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|s| if s.trim() == "0" { "off" } else { "on" })
        .unwrap_or("?");
    for p in summary["programs"].as_array().into_iter().flatten() {
        host.out.append(
            "bpf-cost.csv",
            "kernel,jit,program,runs,run_time_ns,variant",
            &format!(
                "host,{jit},{},{},{},{variant}",
                p["program"].as_str().unwrap_or("?"),
                p["run_count"].as_u64().unwrap_or(0),
                p["run_time_ns"].as_u64().unwrap_or(0)
            ),
        )?;
    }
    Ok(())
}

/// Kills every task left in the scratch cgroup (v1 has no cgroup.kill).
fn kill_all(cg: &ScratchMemcg) -> anyhow::Result<()> {
    for _ in 0..50 {
        let procs = std::fs::read_to_string(cg.dir.join("cgroup.procs"))?;
        let pids: Vec<u32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            let _ = tests::scenario::signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("tasks left in {}", cg.dir.display())
}
