//! A faithful fake autoscaler-agent for demos: connects to a vm-monitor, runs health checks,
//! optionally downscales / upscales the (pretend) VM, honours UpscaleRequests, and prints the
//! transcript as it goes.
//!
//! cargo run -p tests --bin fake-agent -- ws://127.0.0.1:10301/monitor --downscale-to 2 --duration 20

// Test and bench drivers: a failure ends the run with a message, which is what unwrapping does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Context;
use clap::Parser;
use std::time::Duration;
use tests::agent::{AgentConfig, Alloc, FakeAgent, GIB, Timings};

#[derive(Debug, Parser)]
#[command(
    name = "fake-agent",
    about = "Fake autoscaler-agent for vm-monitor demos"
)]
struct Args {
    /// Monitor URL, e.g. ws://127.0.0.1:10301/monitor (a missing path means /monitor).
    url: String,
    /// VM memory at start, GiB.
    #[arg(long, default_value_t = 4)]
    mem_gib: u64,
    /// VM vCPUs at start.
    #[arg(long, default_value_t = 1.0)]
    cpu: f64,
    /// Compute unit: vCPUs.
    #[arg(long, default_value_t = 0.25)]
    cu_cpu: f64,
    /// Compute unit: memory, GiB.
    #[arg(long, default_value_t = 1)]
    cu_mem_gib: u64,
    /// VM maximum, in compute units (bounds requested upscales).
    #[arg(long, default_value_t = 8)]
    max_cu: u64,
    /// Downscale to this many compute units (1-CU steps, like the agent).
    #[arg(long)]
    downscale_to: Option<u64>,
    /// Afterwards, upscale to this many compute units (one notification).
    #[arg(long)]
    upscale_to: Option<u64>,
    /// Seconds after connecting before scaling starts (the agent waits for its first metrics).
    #[arg(long, default_value_t = 2.0)]
    scale_after: f64,
    /// Total run time in seconds, then close with 1000 "normal exit".
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Divide the agent's timings (health-check period, cooldowns, reconnect wait) by this.
    #[arg(long, default_value_t = 1)]
    speedup: u32,
    /// Do not reconnect when the connection ends.
    #[arg(long)]
    no_reconnect: bool,
    /// Simulated scheduler + NeonVM delay before granting an UpscaleRequest, milliseconds.
    #[arg(long, default_value_t = 500)]
    grant_delay_ms: u64,
    /// Only record UpscaleRequests, never grow the VM.
    #[arg(long)]
    ignore_upscale_requests: bool,
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("invalid duration {s}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut url = args.url.clone();
    if !url.trim_start_matches("ws://").contains('/') {
        url.push_str("/monitor");
    }
    let milli = |cpu: f64| (cpu * 1000.0).round() as u64;
    let cu = Alloc::new(milli(args.cu_cpu), args.cu_mem_gib * GIB);
    let config = AgentConfig {
        url,
        vm: Alloc::new(milli(args.cpu), args.mem_gib * GIB),
        cu,
        max: Alloc::cus(args.max_cu, cu),
        timings: Timings::scaled(args.speedup.max(1)),
        reconnect: !args.no_reconnect,
        upscale_on_request: (!args.ignore_upscale_requests)
            .then(|| Duration::from_millis(args.grant_delay_ms)),
        echo: true,
    };
    println!(
        "fake-agent: VM {} (CU {}), max {}",
        config.vm, cu, config.max
    );
    let total = secs(args.duration)?;
    let start = tokio::time::Instant::now();
    let agent = FakeAgent::connect(config).await?;

    tokio::time::sleep(secs(args.scale_after)?).await;
    if let Some(n) = args.downscale_to {
        let remaining = total.saturating_sub(start.elapsed());
        let report = agent.downscale_to(Alloc::cus(n, cu), remaining).await?;
        println!("fake-agent: downscale to {n} CU: {report:?}");
    }
    if let Some(n) = args.upscale_to {
        let remaining = total.saturating_sub(start.elapsed());
        match agent.upscale_to(Alloc::cus(n, cu), remaining).await {
            Ok(()) => println!("fake-agent: upscale to {n} CU confirmed"),
            Err(e) => println!("fake-agent: upscale to {n} CU failed: {e:#}"),
        }
    }
    tokio::time::sleep_until(start + total).await;
    let transcript = agent.close().await?;
    let frames = transcript.frames().len();
    println!("fake-agent: done, {frames} frames exchanged");
    Ok(())
}
