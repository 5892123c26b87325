//! `vm-monitor`: drop-in for Neon's vm-monitor (same binary name, same `--addr/--cgroup/
//! --pgconnstr` flags, same wire protocol), plus `doctor` and `trace` for operators and kernel
//! developers.

use anyhow::Context;
use clap::Parser;
use monitor::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    // Before anything else: a TERM that arrives while the daemon starts must end in its clean
    // shutdown, not the default action (the daemon unblocks once its handlers exist).
    monitor::daemon::mask_terminating_signals(libc::SIG_BLOCK);
    let cli = Cli::parse();
    if cli.command.is_some() {
        // The tools keep the default actions (Ctrl-C ends them) unless they handle a signal.
        monitor::daemon::mask_terminating_signals(libc::SIG_UNBLOCK);
    }
    if let Err(err) = monitor::logging::init(cli.log_format) {
        eprintln!("vm-monitor: cannot initialise logging: {err:#}");
        return std::process::ExitCode::FAILURE;
    }
    // One thread runs everything: the event path (ring buffer → engine → websocket) never
    // crosses threads, and an idle daemon wakes once per agent health check, not once per
    // worker. Nothing here blocks for long: memory.high is written on a thread of its own
    // (lowering it reclaims inside the write), cgroup reads are small files, Postgres is
    // async, and the recorder writes on its own thread.
    let runtime = match tokio::runtime::Builder::new_current_thread()
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
