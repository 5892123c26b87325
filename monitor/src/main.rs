//! `vm-monitor`: drop-in for Neon's vm-monitor (same binary name, same `--addr/--cgroup/
//! --pgconnstr` flags, same wire protocol), plus `doctor` and `trace` for operators and kernel
//! developers.

use anyhow::Context;
use clap::Parser;
use monitor::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(err) = monitor::logging::init(cli.log_format) {
        eprintln!("vm-monitor: cannot initialise logging: {err:#}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("vm-monitor: {err:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => monitor::daemon::run(cli.serve).await,
            Some(Command::Doctor(args)) => monitor::doctor::run(args).await,
            Some(Command::Trace(args)) => monitor::trace::run(args).await,
            Some(Command::Replay(args)) => monitor::replay::run(args),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("vm-monitor: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
