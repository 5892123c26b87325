//! `cargo xtask bench`: the event-driven design against polling, side by side. Per VM kernel
//! (one boot each) the guest driver (`tests/src/bin/bench.rs`) measures reaction latency and
//! idle cost of the signal tiers (ebpf, psi, poll), the overhead on a reclaim-heavy workload,
//! the programs' cost per run (JIT on and off) and an event storm; on the host kernel
//! (`tests/src/bin/bench-host.rs`, root) start-up, overhead and storms. The drivers write raw
//! samples; this side computes the statistics and writes
//! `target/bench/{report.md,summary.json,*.csv}`. Not part of `cargo xtask test`: benchmarks
//! state numbers and targets, they do not fail on them.

mod data;
mod report;

use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::cmd::{self, info, step};
use crate::setup::{KernelLine, Setup};
use crate::vm::{self, VmRun};
use data::KernelData;

/// Parts of the VM run, in the order the driver runs them.
const PARTS: [&str; 5] = ["latency", "idle", "overhead", "storm", "managed"];

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Iteration mode (a few minutes): 6.12 only, 5 ramps per tier, 15 s idle, 3 overhead
    /// pairs, 10 s storms.
    #[arg(long)]
    quick: bool,
    /// Only this kernel line (default: 6.12 with --quick, else both).
    #[arg(long, value_enum)]
    kernel: Option<KernelLine>,
    /// Ramps per tier (default 5 with --quick, else 20).
    #[arg(long)]
    ramps: Option<u64>,
    /// Idle seconds per tier (default 15 with --quick, else 60).
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Detached/attached pairs of the overhead workload (default 3 with --quick, else 8).
    #[arg(long)]
    overhead_pairs: Option<u64>,
    /// Seconds per event storm (default 10 with --quick, else 30).
    #[arg(long)]
    storm_secs: Option<u64>,
    /// Tasks per event storm.
    #[arg(long, default_value_t = 8)]
    storm_tasks: u64,
    /// Tiers, comma-separated; `ebpf-c0` = ebpf with `--coalesce-ms 0` (latency only).
    #[arg(long, default_value = "ebpf,psi,poll")]
    tiers: String,
    /// VM parts to run, comma-separated (latency, idle, overhead, storm, managed).
    #[arg(long, default_value = "latency,idle,overhead,storm,managed")]
    parts: String,
    /// Skip the host-kernel part (start-up, overhead, storms with `vm-monitor trace`).
    #[arg(long)]
    no_host: bool,
}

pub(crate) fn run(setup: &mut Setup, args: &BenchArgs) -> Result<ExitCode> {
    let began = Instant::now();
    for p in args.parts.split(',').filter(|p| !p.is_empty()) {
        if !PARTS.contains(&p) {
            bail!("--parts: unknown part {p:?} (known: {})", PARTS.join(", "));
        }
    }
    setup.all()?;
    let root = setup.paths.root.clone();
    let target = setup.paths.target.clone();
    let built = cmd::build_guest_binaries(&root, &target, &["bench", "memhog", "bench-host"])?;
    let (monitor_bin, driver, host_driver) = (built[0].clone(), built[1].clone(), built[3].clone());

    let quick = args.quick;
    let kernels = match (args.kernel, quick) {
        (Some(k), _) => vec![k],
        (None, true) => vec![KernelLine::V6_12],
        (None, false) => KernelLine::ALL.to_vec(),
    };
    let ramps = args.ramps.unwrap_or(if quick { 5 } else { 20 });
    let idle_secs = args.idle_secs.unwrap_or(if quick { 15 } else { 60 });
    let pairs = args.overhead_pairs.unwrap_or(if quick { 3 } else { 8 });
    let storm_secs = args.storm_secs.unwrap_or(if quick { 10 } else { 30 });
    let storm_variants = if quick {
        "ebpf,ebpf-pc"
    } else {
        "ebpf,ebpf-c0,ebpf-pc"
    };
    // Blocks of 5 ramps per daemon start: tiers alternate, restarts stay few.
    let block = 5.min(ramps.max(1));
    // Generous: a TCG ramp takes a few seconds, a stalled guest much longer.
    let timeout = Duration::from_secs(
        600 + ramps * 3 * 30
            + idle_secs * 3 * 2
            + pairs * 2 * 120
            + storm_secs * 3 * 4
            + pairs * 3 * 2 * 120,
    );

    let dest = target.join("bench");
    fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    // A report must not mix in samples of an earlier run (e.g. the other kernel's CSVs).
    for entry in fs::read_dir(&dest).with_context(|| format!("reading {}", dest.display()))? {
        let path = entry?.path();
        let stale = path
            .extension()
            .is_some_and(|e| e == "csv" || e == "json" || e == "md");
        if stale && path.is_file() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let mut runs = Vec::new();

    // The host part first: it is quick and needs no VM.
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    if args.no_host {
        info("host-kernel part skipped (--no-host)");
    } else if !is_root {
        info("host-kernel part skipped: loading BPF programs on the host needs root");
    } else {
        step("host kernel: start-up, overhead and event storms (vm-monitor trace)");
        let raw = dest.join("raw-host");
        if raw.exists() {
            fs::remove_dir_all(&raw).with_context(|| format!("removing {}", raw.display()))?;
        }
        fs::create_dir_all(&raw)?;
        let status = std::process::Command::new(&host_driver)
            .env("VM_MONITOR_BIN", &monitor_bin)
            .env("BENCH_OUT", &raw)
            .env("BENCH_HOST_STARTS", if quick { "5" } else { "10" })
            .env("BENCH_OVERHEAD_PAIRS", pairs.to_string())
            .env("BENCH_STORM_SECS", storm_secs.to_string())
            .env("BENCH_STORM_TASKS", args.storm_tasks.to_string())
            .status()
            .with_context(|| format!("running {}", host_driver.display()))?;
        ensure!(status.success(), "the host bench driver failed: {status}");
        copy_raw(&raw, &dest, "host")?;
        runs.push(KernelData::load("host", &raw)?);
    }

    for kernel in kernels {
        let mut run = VmRun::new(kernel, vec![driver.display().to_string()]);
        let env = [
            ("VM_MONITOR_BIN", monitor_bin.display().to_string()),
            ("BENCH_PARTS", args.parts.clone()),
            ("BENCH_RAMPS", ramps.to_string()),
            ("BENCH_BLOCK", block.to_string()),
            ("BENCH_TIERS", args.tiers.clone()),
            ("BENCH_IDLE_SECS", idle_secs.to_string()),
            ("BENCH_OVERHEAD_PAIRS", pairs.to_string()),
            ("BENCH_STORM_SECS", storm_secs.to_string()),
            ("BENCH_STORM_TASKS", args.storm_tasks.to_string()),
            ("BENCH_STORM_VARIANTS", storm_variants.to_string()),
        ];
        run.env
            .extend(env.into_iter().map(|(k, v)| (k.to_owned(), v)));
        // Diagnostics: the daemon's RUST_LOG for the latency part, its log kept per block.
        if let Ok(filter) = std::env::var("BENCH_DAEMON_LOG") {
            run.env.push(("BENCH_DAEMON_LOG".to_owned(), filter));
        }
        run.timeout = Some(timeout);
        run.cwd = Some(root.clone());
        let (code, shared) = vm::run_with_dir(setup, &run)?;
        let raw = shared.join("bench");
        let data = KernelData::load(kernel.as_str(), &raw)?;
        copy_raw(&raw, &dest, kernel.as_str())?;
        ensure!(
            code == 0,
            "the bench driver on {} exited with {code} (partial data in {})",
            kernel.as_str(),
            raw.display()
        );
        runs.push(data);
    }
    // VM kernels first in every table, the host last.
    runs.sort_by_key(|d| d.is_host());

    let host = report::HostInfo::read();
    let summary = report::summary_json(&runs);
    let summary_path = dest.join("summary.json");
    fs::write(
        &summary_path,
        serde_json::to_string_pretty(&summary)? + "\n",
    )
    .with_context(|| format!("writing {}", summary_path.display()))?;
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let info_run = report::RunInfo {
        command: format!("cargo xtask {command}"),
        ramps,
        idle_secs,
        pairs,
        storm_secs,
        storm_tasks: args.storm_tasks,
        took: began.elapsed(),
    };
    let report = report::report_md(&runs, &host, &info_run);
    let report_path = dest.join("report.md");
    fs::write(&report_path, &report)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!(
        "{}\n{}",
        report::summary_table(&runs),
        report::cost_table(&runs)
    );
    step(format!(
        "report: {}, summary: {}, raw samples: {}/*.csv ({:.0} s)",
        report_path.display(),
        summary_path.display(),
        dest.display(),
        began.elapsed().as_secs_f64()
    ));
    Ok(ExitCode::SUCCESS)
}

/// Copies a driver's CSVs next to the report as `<label>-<name>.csv`.
fn copy_raw(raw: &Path, dest: &Path, label: &str) -> Result<()> {
    let Ok(entries) = fs::read_dir(raw) else {
        return Ok(());
    };
    for entry in entries {
        let from = entry?.path();
        if from.extension().is_some_and(|e| e == "csv" || e == "log") {
            let name = from.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            let to = dest.join(format!("{label}-{}", name.trim_start_matches("host-")));
            fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(())
}
