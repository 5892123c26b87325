//! `cargo xtask demo`: vm-monitor at work in a VM. Boots the 6.12 kernel (Neon's VM kernel
//! line) and runs the `demo` driver of the tests crate there: PostgreSQL 15 inside
//! `neon-postgres`, `vm-monitor` on the eBPF tier, the fake autoscaler-agent and a
//! memory-hungry SQL session; the driver prints a timeline (pressure events, UpscaleRequest,
//! the agent's grant, file cache and memory.high changes, the downscale after the load, the
//! reaction time). The recordings are copied to `target/demo/`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Args;

use crate::cmd::{self, info, step};
use crate::setup::{KernelLine, Setup};
use crate::test::{PG_EXT_ENV, pg_extension};
use crate::vm::{self, VmRun};

/// The whole demo takes about two minutes under TCG; more means the guest hung.
const DEMO_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Kernel line to boot.
    #[arg(long, value_enum, default_value = "6.12")]
    kernel: KernelLine,
    /// Show the guest's whole console (boot, kernel messages) instead of only the demo's output.
    #[arg(long)]
    verbose: bool,
}

pub(crate) fn run(setup: &mut Setup, args: &DemoArgs) -> Result<ExitCode> {
    setup.all()?;
    let root = setup.paths.root.clone();
    let target = setup.paths.target.clone();
    // The release build (at the production log level, see the driver): what the bench measures.
    let built = cmd::build_guest_binaries(&root, &target, &["demo", "memhog"])?;
    let (monitor_bin, driver) = (built[0].clone(), built[1].clone());
    let ext = pg_extension(setup)?;

    let mut run = VmRun::new(args.kernel, vec![driver.display().to_string()]);
    run.env
        .push(("VM_MONITOR_BIN".into(), monitor_bin.display().to_string()));
    run.env.push((PG_EXT_ENV.into(), ext.display().to_string()));
    run.timeout = Some(DEMO_TIMEOUT);
    run.quiet = !args.verbose;
    run.cwd = Some(root.join("tests"));
    // The guest wrote into this run's shared directory.
    let (code, shared) = vm::run_with_dir(setup, &run)?;
    let dest = target.join("demo");
    let copied = copy_recordings(&shared.join("demo"), &dest)?;
    if copied > 0 {
        step(format!(
            "demo recordings copied to {} ({copied} files: timeline.txt, pressure-events.jsonl, decisions.jsonl, vm-monitor.log, agent-transcript.txt)",
            dest.display()
        ));
    }
    ensure!(code == 0, "the demo driver exited with {code}");
    render_recording(&monitor_bin, &dest)?;
    Ok(ExitCode::SUCCESS)
}

/// Turns the daemon's recording into a Perfetto trace and an SVG timeline, and checks that
/// replaying it through the policy reproduces the daemon's decisions.
fn render_recording(monitor_bin: &Path, dest: &Path) -> Result<()> {
    let perfetto = dest.join("trace.perfetto.json");
    let svg = dest.join("timeline.svg");
    step("replaying the daemon's recording through the policy");
    cmd::run(Command::new(monitor_bin).arg("replay").arg(dest).arg("-q"))
        .context("the recording does not replay to the daemon's decisions")?;
    step("exporting the recording");
    cmd::run(
        Command::new(monitor_bin)
            .args(["trace", "export"])
            .arg(dest)
            .arg("--perfetto")
            .arg(&perfetto),
    )?;
    cmd::run(
        Command::new(monitor_bin)
            .args(["trace", "plot"])
            .arg(dest)
            .arg("-o")
            .arg(&svg),
    )?;
    info(format!(
        "open {} in the Perfetto UI, or {} in a browser",
        perfetto.display(),
        svg.display()
    ));
    Ok(())
}

/// Replaces `dest` with the files of `from`; returns how many were copied.
fn copy_recordings(from: &Path, dest: &Path) -> Result<usize> {
    if !from.is_dir() {
        info(format!(
            "the guest left no recordings in {}",
            from.display()
        ));
        return Ok(0);
    }
    if dest.exists() {
        fs::remove_dir_all(dest).with_context(|| format!("clearing {}", dest.display()))?;
    }
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut n = 0;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::copy(entry.path(), dest.join(entry.file_name()))
                .with_context(|| format!("copying {}", entry.path().display()))?;
            n += 1;
        }
    }
    Ok(n)
}
