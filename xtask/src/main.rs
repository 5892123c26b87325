//! `cargo xtask`: the project's single entry point for setup, the eBPF build, VM runs and tests.

mod bench;
mod cmd;
mod demo;
mod ebpf;
mod lint;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Development tasks for vm-monitor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything the build and the tests need (idempotent; skips what is present).
    Setup,
    /// Build the eBPF object the same way the daemon's build script embeds it.
    BuildEbpf,
    /// Boot a Debian kernel under qemu (TCG) with cgroup v2 and run a command inside.
    Vm(vm::VmArgs),
    /// Run every test: lint, unit, host-kernel eBPF (root) and VM tests on both kernels.
    Test(test::TestArgs),
    /// rustfmt check and clippy (host crates and the eBPF crate).
    Lint,
    /// Show vm-monitor at work in a VM: Postgres, the daemon, the fake agent and a
    /// memory-hungry SQL workload, as a timeline; recordings go to target/demo/.
    Demo(demo::DemoArgs),
    /// Benchmark the signal tiers (ebpf, psi, poll) side by side in a VM (reaction latency,
    /// idle cost, workload overhead, program cost, event storm) and on the host kernel;
    /// report in target/bench/. Not part of `test`.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let mut setup = setup::Setup::new()?;
    match cli.command {
        Command::Setup => {
            setup.all()?;
            cmd::step("setup complete");
            Ok(ExitCode::SUCCESS)
        }
        Command::BuildEbpf => {
            ebpf::build(&mut setup)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Vm(args) => {
            let code = vm::run(&mut setup, &args.into_run()?)?;
            // Exit codes outside 0..=255 cannot come from a shell; clamp rather than wrap to 0.
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
        }
        Command::Test(args) => test::run(&mut setup, &args),
        Command::Lint => {
            lint::run(&mut setup)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(&mut setup, &args),
        Command::Bench(args) => bench::run(&mut setup, &args),
    }
}
