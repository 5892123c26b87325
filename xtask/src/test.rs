//! `cargo xtask test`: every test in one run, stage by stage, stopping at the first failure and
//! closing with a per-stage summary and an `N passed, N failed` line that CI reads.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};

use crate::cmd::{self, loud, step};
use crate::lint;
use crate::setup::{KernelLine, Setup};
use crate::vm::{self, VmRun};

/// A VM suite on TCG takes minutes; more than this means the guest hung.
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);

#[derive(Args)]
pub(crate) struct TestArgs {
    /// Leave out a group of stages while iterating locally (repeatable); CI runs everything.
    #[arg(long, value_enum, value_name = "GROUP")]
    skip: Vec<SkipGroup>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SkipGroup {
    Lint,
    /// `cargo test --workspace`.
    Unit,
    HostEbpf,
    /// Building and running the VM tests on both kernels.
    Vm,
}

#[derive(Clone, Copy)]
enum Stage {
    Setup,
    Lint,
    Build,
    Workspace,
    HostEbpf,
    VmBuild,
    Vm(KernelLine),
}

impl Stage {
    fn name(self) -> String {
        match self {
            Stage::Setup => "setup".into(),
            Stage::Lint => "lint".into(),
            Stage::Build => "build vm-monitor".into(),
            Stage::Workspace => "cargo test --workspace".into(),
            Stage::HostEbpf => "host tests (eBPF, Postgres)".into(),
            Stage::VmBuild => "build VM tests".into(),
            Stage::Vm(k) => format!("VM tests on {}", k.as_str()),
        }
    }

    fn group(self) -> Option<SkipGroup> {
        match self {
            Stage::Setup | Stage::Build => None,
            Stage::Lint => Some(SkipGroup::Lint),
            Stage::Workspace => Some(SkipGroup::Unit),
            Stage::HostEbpf => Some(SkipGroup::HostEbpf),
            Stage::VmBuild | Stage::Vm(_) => Some(SkipGroup::Vm),
        }
    }
}

enum Outcome {
    Passed,
    /// Skipped on purpose, with the reason (printed loudly).
    Skipped(String),
    Failed(String),
    /// Not reached because an earlier stage failed.
    NotRun,
}

/// VM test targets of the `tests` package, run in this order in one boot per kernel: the
/// eBPF pipeline scenarios, then the end-to-end scaling scenarios (Postgres, daemon, agent).
const VM_TEST_TARGETS: &[&str] = &["vm", "vm_scaling"];

/// State carried between stages.
struct Run<'a> {
    setup: &'a mut Setup,
    /// The VM test executables, once built; empty when the VM tests do not exist yet.
    vm_exes: Vec<PathBuf>,
    /// The test-only Postgres extension, built on the host for the scaling scenarios.
    pg_ext: Option<PathBuf>,
}

pub(crate) fn run(setup: &mut Setup, args: &TestArgs) -> Result<ExitCode> {
    let mut stages = vec![
        Stage::Setup,
        Stage::Lint,
        Stage::Build,
        Stage::Workspace,
        Stage::HostEbpf,
        Stage::VmBuild,
    ];
    stages.extend(KernelLine::ALL.map(Stage::Vm));

    // A full run needs about 5 GiB under target/ (more on a first build of every feature set).
    if let Some(free) = free_mib(&setup.paths.target).filter(|&mib| mib < 8 * 1024) {
        loud(format!(
            "only {free} MiB free on the filesystem holding target/: the build may run out"
        ));
    }
    let mut run = Run {
        setup,
        vm_exes: Vec::new(),
        pg_ext: None,
    };
    let mut results: Vec<(Stage, Outcome, Duration)> = Vec::new();
    let mut failed = false;
    for stage in stages {
        if failed {
            results.push((stage, Outcome::NotRun, Duration::ZERO));
            continue;
        }
        step(format!("stage: {}", stage.name()));
        let started = Instant::now();
        let skip = stage.group().is_some_and(|g| args.skip.contains(&g));
        let result = if skip {
            Ok(Outcome::Skipped("--skip on the command line".into()))
        } else {
            run.stage(stage)
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(err) => {
                failed = true;
                eprintln!("error: stage `{}` failed: {err:#}", stage.name());
                // A full disk fails a build with one terse error; say how much was left.
                if let Some(free) = free_mib(&run.setup.paths.target) {
                    eprintln!("note: {free} MiB free on the filesystem holding target/");
                }
                Outcome::Failed(format!("{err:#}"))
            }
        };
        if let Outcome::Skipped(why) = &outcome {
            loud(format!("SKIPPED {}: {why}", stage.name()));
        }
        results.push((stage, outcome, started.elapsed()));
    }

    step("test summary");
    let (mut passed, mut failures, mut skipped) = (0, 0, 0);
    for (stage, outcome, took) in &results {
        let took = format!("{:7.1} s", took.as_secs_f64());
        let (tag, detail) = match outcome {
            Outcome::Passed => {
                passed += 1;
                ("PASS", took)
            }
            Outcome::Skipped(why) => {
                skipped += 1;
                ("SKIP", format!("{took}  {why}"))
            }
            Outcome::Failed(why) => {
                failures += 1;
                // The full error was printed when it happened; keep the table to one line.
                let first = why.lines().next().unwrap_or_default();
                ("FAIL", format!("{took}  {first}"))
            }
            Outcome::NotRun => {
                skipped += 1;
                ("----", "  not run".to_owned())
            }
        };
        println!("    {tag}  {:<26} {detail}", stage.name());
    }
    println!("{passed} passed, {failures} failed, {skipped} skipped");
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Free space, in MiB, on the filesystem holding `path` (the nearest existing ancestor).
fn free_mib(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is NUL-terminated and st is a valid out-pointer for one statvfs.
    if unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled st.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize) >> 20)
}

impl Run<'_> {
    fn stage(&mut self, stage: Stage) -> Result<Outcome> {
        match stage {
            Stage::Setup => self.setup.all().map(|()| Outcome::Passed),
            Stage::Lint => lint::run(self.setup).map(|()| Outcome::Passed),
            Stage::Build => {
                cmd::run(self.cargo().args(["build", "-p", "monitor"]))?;
                let bin = self.monitor_bin();
                ensure!(bin.is_file(), "{} was not built", bin.display());
                Ok(Outcome::Passed)
            }
            Stage::Workspace => {
                cmd::run(self.cargo().args(["test", "--workspace"]))?;
                Ok(Outcome::Passed)
            }
            Stage::HostEbpf => self.host_ebpf(),
            Stage::VmBuild => self.vm_build(),
            Stage::Vm(kernel) => self.vm(kernel),
        }
    }

    /// Cargo in the workspace root, with the daemon's path exported for tests that spawn it.
    fn cargo(&self) -> Command {
        let mut cargo = cmd::cargo();
        cargo
            .current_dir(&self.setup.paths.root)
            .env("VM_MONITOR_BIN", self.monitor_bin());
        cargo
    }

    fn monitor_bin(&self) -> PathBuf {
        self.setup.paths.target.join("debug/vm-monitor")
    }

    /// Root-only tests on the host: the real eBPF programs on the running kernel (and their
    /// /metrics series), and the file-cache adapter against private PostgreSQL 15 clusters.
    fn host_ebpf(&mut self) -> Result<Outcome> {
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let euid = unsafe { libc::geteuid() };
        ensure!(
            euid == 0,
            "the host tests load BPF programs and run Postgres as its own user: run as root"
        );
        cmd::run(self.cargo().args([
            "test",
            "-p",
            "monitor",
            "--test",
            "host_ebpf",
            "--test",
            "metrics",
            "--test",
            "filecache_pg",
            "--",
            "--ignored",
            "--test-threads=1",
        ]))?;
        Ok(Outcome::Passed)
    }

    fn vm_build(&mut self) -> Result<Outcome> {
        let root = &self.setup.paths.root;
        let targets: Vec<&str> = VM_TEST_TARGETS
            .iter()
            .copied()
            .filter(|t| root.join(format!("tests/tests/{t}.rs")).is_file())
            .collect();
        if targets.is_empty() {
            return Ok(Outcome::Skipped(
                "tests/tests/vm.rs does not exist yet".to_string(),
            ));
        }
        let mut build = self.cargo();
        build.args(["test", "-p", "tests"]);
        for t in &targets {
            build.args(["--test", t]);
        }
        build
            .args(["--no-run", "--message-format=json"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        println!("    $ {}", cmd::display(&build));
        let out = build
            .output()
            .context("could not start cargo to build the VM tests")?;
        if !out.status.success() {
            bail!("building the VM tests failed ({})", out.status);
        }
        let json = String::from_utf8_lossy(&out.stdout);
        self.vm_exes = targets
            .iter()
            .map(|t| {
                test_executable(&json, t).with_context(|| {
                    format!("cargo built the VM tests but reported no `{t}` executable")
                })
            })
            .collect::<Result<_>>()?;
        for exe in &self.vm_exes {
            cmd::info(format!("VM test executable: {}", exe.display()));
        }
        if targets.contains(&"vm_scaling") {
            // Built on the host: the guest sees it read-only, and compiling under TCG is slow.
            self.pg_ext = Some(pg_extension(self.setup)?);
        }
        Ok(Outcome::Passed)
    }

    fn vm(&mut self, kernel: KernelLine) -> Result<Outcome> {
        if self.vm_exes.is_empty() {
            return Ok(Outcome::Skipped(
                "no VM tests (tests/tests/vm.rs does not exist yet)".into(),
            ));
        }
        // One boot per kernel for all targets; a failing target does not hide the next one.
        let mut command = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            r#"rc=0; for exe in "$@"; do "$exe" --ignored --test-threads=1 --nocapture || rc=1; done; exit $rc"#
                .to_string(),
            "vm-tests".to_string(),
        ];
        command.extend(self.vm_exes.iter().map(|e| e.display().to_string()));
        let mut run = VmRun::new(kernel, command);
        run.env.push((
            "VM_MONITOR_BIN".into(),
            self.monitor_bin().display().to_string(),
        ));
        if let Some(ext) = &self.pg_ext {
            run.env.push((PG_EXT_ENV.into(), ext.display().to_string()));
        }
        run.timeout = Some(VM_TIMEOUT);
        // Where `cargo test` would run them: the package directory.
        run.cwd = Some(self.setup.paths.root.join("tests"));
        let code = vm::run(self.setup, &run)?;
        ensure!(code == 0, "the VM tests exited with {code}");
        Ok(Outcome::Passed)
    }
}

/// Environment variable the scaling scenarios read the extension's path from.
pub(crate) const PG_EXT_ENV: &str = "VM_MONITOR_PG_EXT";

/// Builds the test-only Postgres extension (`tests/pg_ext`) into `target/pg_ext` and returns
/// the `.so` path, which Postgres loads by absolute path.
pub(crate) fn pg_extension(setup: &mut Setup) -> Result<PathBuf> {
    setup.apt_packages(crate::setup::APT_POSTGRES)?;
    let script = setup.paths.root.join("tests/pg_ext/build.sh");
    let out_dir = setup.paths.target.join("pg_ext");
    step("building the test-only Postgres extension");
    let out = cmd::output(Command::new("bash").arg(&script).arg(&out_dir))?;
    let so = PathBuf::from(out.trim());
    ensure!(
        so.is_file(),
        "{} reported {}, which does not exist",
        script.display(),
        so.display()
    );
    cmd::info(format!("extension: {}", so.display()));
    Ok(so)
}

/// The executable of test target `name` in cargo's `--message-format=json` output.
fn test_executable(json_lines: &str, name: &str) -> Option<PathBuf> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == name
                && m["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_test_executable() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"tests","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"vm","kind":["test"]},"executable":"/t/debug/deps/vm-abc"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executable(json, "vm"),
            Some(PathBuf::from("/t/debug/deps/vm-abc"))
        );
        assert_eq!(test_executable(json, "other"), None);
    }
}
