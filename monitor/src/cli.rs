//! Command-line interface. The serve flags are the reference's (`-a/--addr`, `-c/--cgroup`,
//! `-p/--pgconnstr`), so existing inittab/vm-builder lines keep working.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Event-driven memory-pressure monitor for autoscaled Postgres VMs.
#[derive(Debug, Parser)]
#[command(name = "vm-monitor", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Subcommands; without one, the daemon serves the agent.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report what this kernel and machine offer and which signal tier `auto` would pick.
    Doctor(DoctorArgs),
    /// Stream live pressure events (for kernel developers) and print a summary on exit; or,
    /// with `export`/`plot`, turn a recording into a Perfetto trace or an SVG timeline.
    Trace(TraceArgs),
    /// Feed a daemon recording through the decision core and check that it decides exactly
    /// what the daemon decided when recorded (exit status 1 and a diff if not).
    Replay(ReplayArgs),
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for collectors.
    Json,
}

/// How the daemon learns about memory pressure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SignalChoice {
    /// Probe and pick the best available: ebpf, then psi, then poll.
    Auto,
    /// eBPF tracepoints and a ring buffer.
    Ebpf,
    /// PSI trigger on memory.pressure plus memory.events notifications.
    Psi,
    /// Read memory.stat every 100 ms (Neon-compatible baseline).
    Poll,
}

/// Flags of the daemon (the default command).
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on for the autoscaler-agent (`IP:port` or `host:port`).
    #[arg(short = 'a', long, default_value = "0.0.0.0:10301")]
    pub addr: String,
    /// Serve `/metrics`, `/debug/decisions` and `/healthz` on this address (`IP:port` or
    /// `host:port`), e.g. a loopback-only one for a local scraper. With it, `/metrics` and
    /// `/debug/decisions` are no longer served on `--addr`.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Addresses that may open the agent websocket: comma-separated CIDRs or IPs, `private`
    /// (loopback, 10/8, 172.16/12, 192.168/16, 100.64/10, link-local, IPv6 ULA) or `any`.
    /// Others get HTTP 403 before any websocket exists. Narrow it to the agent's network.
    #[arg(long, value_name = "LIST", default_value = "private")]
    pub agent_allow: crate::admission::AgentAllow,
    /// The daemon's own /proc/self/oom_score_adj (-1000..=1000): under the memory pressure it
    /// exists to report, the kernel should kill Postgres' backends before the daemon that asks
    /// for their memory. Lowering it needs CAP_SYS_RESOURCE (logged and skipped without).
    #[arg(long, value_name = "ADJ", default_value_t = -900, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: i32,
    /// Keep every capability the daemon started with. By default, once the programs are
    /// attached and every privileged file is open, it drops them all and sets no_new_privs.
    #[arg(long)]
    pub keep_privileges: bool,
    /// Leave Nagle's algorithm on for agent connections (only to measure what TCP_NODELAY
    /// saves).
    #[arg(long, hide = true)]
    pub no_tcp_nodelay: bool,
    /// Name of the cgroup (v2) Postgres runs in, relative to /sys/fs/cgroup.
    #[arg(short = 'c', long)]
    pub cgroup: Option<String>,
    /// Postgres connection string for file-cache resizing; omit to leave the file cache alone.
    /// On the command line it is readable by every user in /proc/PID/cmdline: pass a password
    /// through `VM_MONITOR_PGCONNSTR` or `--pgconnstr-file` instead.
    #[arg(
        short = 'p',
        long,
        env = "VM_MONITOR_PGCONNSTR",
        hide_env_values = true
    )]
    pub pgconnstr: Option<String>,
    /// Read the Postgres connection string from this file (first line; keep it mode 0600).
    #[arg(long, value_name = "PATH", conflicts_with = "pgconnstr")]
    pub pgconnstr_file: Option<std::path::PathBuf>,
    /// Pressure signal source.
    #[arg(long, value_enum, default_value_t = SignalChoice::Auto)]
    pub signal: SignalChoice,
    /// In-kernel coalescing window for repeated events of one kind and cgroup, in milliseconds
    /// (0 sends every event; OOM kills are never coalesced).
    #[arg(long, default_value_t = 10)]
    pub coalesce_ms: u64,
    /// Have the kernel count the eBPF programs' runs and run time while the daemon runs
    /// (`BPF_ENABLE_STATS`; no sysctl is changed), exported in /metrics. Costs two clock reads
    /// per program run.
    #[arg(long)]
    pub bpf_stats: bool,
    /// Never write the cgroup's memory.high, not even the `max` it is reset to at start-up and
    /// on shutdown (for a limit someone else owns). Detection is unaffected.
    #[arg(long, conflicts_with = "memory_high_guard")]
    pub no_memory_high: bool,
    /// Hold memory.high at the upscale threshold and step it up while an upscale is pending,
    /// to slow a runaway allocation until the agent answers. Costs Postgres: past the
    /// threshold the kernel reclaims page cache in Postgres's own context. Off by default;
    /// detection does not need it.
    #[arg(long)]
    pub memory_high_guard: bool,
    /// Keep a size-bounded rolling recording of events and decisions in this directory (for
    /// post-mortems: `vm-monitor replay DIR`, `vm-monitor trace export|plot DIR`).
    #[arg(long)]
    pub record_dir: Option<PathBuf>,
    /// Size of one recording segment before rotation (MiB).
    #[arg(long, default_value_t = 16)]
    pub record_segment_mib: u64,
    /// Total size kept in --record-dir; the oldest segments are deleted beyond it (MiB).
    #[arg(long, default_value_t = 256)]
    pub record_total_mib: u64,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// The policy's own defaults: the flags show and use exactly these.
fn defaults() -> crate::policy::Config {
    crate::policy::Config::default()
}

fn mib(bytes: u64) -> u64 {
    bytes / crate::policy::MIB
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Scaling constants; the defaults are the reference monitor's.
#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Scaling policy")]
pub struct PolicyArgs {
    /// Request an upscale when non-reclaimable memory reaches this fraction of usable memory.
    #[arg(long, default_value_t = defaults().upscale_threshold_fraction)]
    pub upscale_threshold: f64,
    /// Memory kept back for the system: usable = allocation − this (MiB).
    #[arg(long, default_value_t = mib(defaults().sys_buffer))]
    pub sys_buffer_mib: u64,
    /// A downscale must leave the new threshold this far above usage (MiB).
    #[arg(long, default_value_t = mib(defaults().downscale_buffer))]
    pub downscale_buffer_mib: u64,
    /// File cache at most this fraction of usable memory.
    #[arg(long, default_value_t = defaults().file_cache.resource_multiplier)]
    pub file_cache_multiplier: f64,
    /// File cache at most (usable − min remaining) / (1 + this).
    #[arg(long, default_value_t = defaults().file_cache.spread_factor)]
    pub file_cache_spread: f64,
    /// Memory left outside the file cache (MiB).
    #[arg(long, default_value_t = mib(defaults().file_cache.min_remaining_after_cache))]
    pub file_cache_min_remaining_mib: u64,
    /// Minimum spacing of UpscaleRequests (ms).
    #[arg(long, default_value_t = ms(defaults().upscale_min_interval))]
    pub upscale_interval_ms: u64,
    /// While an upscale is pending and pressure continues, raise memory.high by this (MiB)...
    #[arg(long, default_value_t = mib(defaults().memory_high_step))]
    pub memory_high_step_mib: u64,
    /// ...at most this often (ms).
    #[arg(long, default_value_t = ms(defaults().memory_high_step_every))]
    pub memory_high_step_ms: u64,
    /// A guest-wide direct-reclaim stall at least this long requests an upscale (ms).
    #[arg(long, default_value_t = ms(defaults().direct_reclaim_stall))]
    pub direct_reclaim_stall_ms: u64,
    /// Timeout of each Postgres statement (ms).
    #[arg(long, default_value_t = 2000)]
    pub pg_timeout_ms: u64,
}

/// Flags of `vm-monitor doctor`.
#[derive(Debug, Args, Clone)]
pub struct DoctorArgs {
    /// Machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// cgroup to check (relative to /sys/fs/cgroup).
    #[arg(short = 'c', long)]
    pub cgroup: Option<String>,
}

/// Flags of `vm-monitor trace`: live tracing unless a subcommand is given.
#[derive(Debug, Args, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: Option<TraceCommand>,
    /// Only memcg reclaim inside this cgroup subtree (relative to /sys/fs/cgroup); guest-wide
    /// kinds are always shown. Without it, memcg reclaim of every cgroup is shown.
    #[arg(short = 'c', long)]
    pub cgroup: Option<String>,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long, value_parser = parse_seconds)]
    pub duration: Option<std::time::Duration>,
    /// One JSON object per event instead of aligned text.
    #[arg(long)]
    pub json: bool,
    /// Coalescing window in milliseconds (0 = every event).
    #[arg(long, default_value_t = 0)]
    pub coalesce_ms: u64,
    /// Count the programs' runs and run time (`BPF_ENABLE_STATS`, no sysctl changed) and add
    /// them, with the cost per run, to the summary.
    #[arg(long)]
    pub bpf_stats: bool,
    /// Write the events as JSON lines to this file as well.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Record the events (and, with --cgroup, the cgroup's memory read on each burst) into
    /// this file, for `trace export` and `trace plot`.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
}

/// What `vm-monitor trace` does with a recording.
#[derive(Debug, Subcommand, Clone)]
pub enum TraceCommand {
    /// Convert a recording to Chrome/Perfetto trace-event JSON (open it in the Perfetto UI).
    Export(ExportArgs),
    /// Draw a recording as an SVG timeline.
    Plot(PlotArgs),
}

/// Flags of `vm-monitor trace export`.
#[derive(Debug, Args, Clone)]
pub struct ExportArgs {
    /// Recording file, or a `--record-dir` directory (its latest run).
    pub file: PathBuf,
    /// Write trace-event JSON here.
    #[arg(long, value_name = "OUT.json")]
    pub perfetto: PathBuf,
}

/// Flags of `vm-monitor trace plot`.
#[derive(Debug, Args, Clone)]
pub struct PlotArgs {
    /// Recording file, or a `--record-dir` directory (its latest run).
    pub file: PathBuf,
    /// Write the SVG here.
    #[arg(short = 'o', long, value_name = "OUT.svg")]
    pub output: PathBuf,
}

/// Flags of `vm-monitor replay`.
#[derive(Debug, Args, Clone)]
pub struct ReplayArgs {
    /// Daemon recording file, or a `--record-dir` directory (its latest run, from segment 0).
    pub file: PathBuf,
    /// Print replayed decisions as JSON lines (as the decision log has them).
    #[arg(long)]
    pub json: bool,
    /// Print only the verdict.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// A positive, finite number of seconds that fits a `Duration`.
fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{text} must be more than 0 seconds"));
    }
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| format!("{text} seconds is too long"))
}

#[cfg(test)]
mod seconds_tests {
    use super::parse_seconds;

    #[test]
    fn seconds_must_be_positive_finite_and_fit() {
        assert_eq!(parse_seconds("1.5").unwrap().as_millis(), 1500);
        for bad in [
            "0",
            "-1",
            "NaN",
            "inf",
            "1e300",
            "18446744073709551616",
            "x",
        ] {
            assert!(parse_seconds(bad).is_err(), "{bad} accepted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_defaults_are_the_policys_defaults() {
        let cli = Cli::try_parse_from(["vm-monitor"]).expect("no flags parse");
        let cfg = crate::daemon::policy_config(&cli.serve).expect("defaults are valid");
        let expected = crate::policy::Config {
            // What the flags decide besides the constants: nothing is managed without
            // --cgroup/--pgconnstr.
            manage_cgroup: false,
            manage_file_cache: false,
            ..crate::policy::Config::default()
        };
        assert_eq!(cfg, expected);
    }

    /// The daemon's command line in each shipped service definition parses, with the OOM score
    /// and privilege defaults the README describes.
    #[test]
    fn shipped_service_command_lines_parse() {
        let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
        let inittab = std::fs::read_to_string(format!("{deploy}/inittab")).expect("inittab");
        let unit = std::fs::read_to_string(format!("{deploy}/vm-monitor.service")).expect("unit");
        let from_inittab = inittab
            .lines()
            .find_map(|l| l.strip_prefix("::respawn:"))
            .and_then(|l| l.split_once(" -- "))
            .map(|(_, daemon)| daemon.to_owned())
            .expect("a ::respawn: line with `setpriv ... -- vm-monitor ...`");
        let from_unit = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart=")
            .to_owned();
        assert_eq!(
            from_inittab, from_unit,
            "the two service files start it differently"
        );
        let words: Vec<&str> = from_unit.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"/usr/local/bin/vm-monitor"));
        let cli = Cli::try_parse_from(&words).expect("the shipped command line parses");
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.cgroup.as_deref(), Some("neon-postgres"));
        assert_eq!(cli.serve.oom_score_adj, -900);
        assert!(!cli.serve.keep_privileges);
    }
}
