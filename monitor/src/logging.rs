//! tracing subscriber setup: human-readable by default, JSON lines for collectors; and
//! [`LogLimiter`], which keeps a warning that repeats in steady state (an unreadable file on every
//! event, Postgres down on every request) from flooding the log.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber. `RUST_LOG` overrides the default level (info; the reference
/// defaults to errors only, which hides every decision). JSON output is one object per line
/// with the event's fields at the top level (`flatten_event`), so collectors need no unnesting.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a terminal: log files and journald should stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Longest peer-supplied text that goes into a log line, in bytes (see [`clip`]).
pub const PEER_TEXT_MAX: usize = 200;

/// `text` cut to at most `max` bytes (at a char boundary), noting how much was cut: a peer
/// decides how long its strings are, the log must not.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// Default spacing of a repeated log line (see [`warn_limited!`]).
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Rate limit for one log site: the first occurrence passes, then at most one per `interval`,
/// reporting how many were swallowed since the last one that passed.
///
/// Lock-free and allocation-free so it can sit on the event path; meant to live in a `static`
/// (one per call site — [`warn_limited!`] declares it for you).
#[derive(Debug)]
pub struct LogLimiter {
    interval_ns: u64,
    /// Monotonic ns (see [`monotonic_ns`]) of the last line that passed; 0 = never.
    last_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter letting one line through per `interval`.
    pub const fn new(interval: Duration) -> Self {
        let ns = interval.as_nanos();
        LogLimiter {
            interval_ns: if ns > u64::MAX as u128 {
                u64::MAX
            } else {
                ns as u64
            },
            last_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log now; `Some(n)` carries the number of occurrences swallowed since the
    /// previous line that passed.
    pub fn check(&self) -> Option<u64> {
        self.check_at(monotonic_ns())
    }

    /// [`check`](Self::check) at an explicit time (monotonic ns), for tests.
    pub fn check_at(&self, now_ns: u64) -> Option<u64> {
        // 0 means "never logged"; a clock reading of 0 is only possible at the very start.
        let now = now_ns.max(1);
        let last = self.last_ns.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < self.interval_ns {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // Two threads may both see the interval expired; only one gets to log.
        match self
            .last_ns
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Some(self.suppressed.swap(0, Ordering::AcqRel)),
            Err(_) => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Occurrences swallowed since the last line that passed.
    pub fn pending(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// Nanoseconds on a process-local monotonic clock.
pub fn monotonic_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let elapsed = EPOCH.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

/// `tracing::warn!` through a per-call-site [`LogLimiter`] ([`REPEAT_INTERVAL`]): the first
/// occurrence is logged, then at most one per interval with a `repeated = N` field counting
/// the occurrences swallowed in between.
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::logging::LogLimiter =
            $crate::logging::LogLimiter::new($crate::logging::REPEAT_INTERVAL);
        if let Some(repeated) = LIMITER.check() {
            ::tracing::warn!(repeated = repeated, $($arg)+);
        }
    }};
}
pub(crate) use warn_limited;

/// Spacing of repeated info lines a peer can trigger at will (connection lifecycle, scaling
/// requests): the agent's own are seconds apart and all pass; a flood costs one line a second
/// per call site.
pub const INFO_REPEAT_INTERVAL: Duration = Duration::from_secs(1);

/// `tracing::info!` through a per-call-site [`LogLimiter`] ([`INFO_REPEAT_INTERVAL`]).
macro_rules! info_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::logging::LogLimiter =
            $crate::logging::LogLimiter::new($crate::logging::INFO_REPEAT_INTERVAL);
        if let Some(repeated) = LIMITER.check() {
            ::tracing::info!(repeated = repeated, $($arg)+);
        }
    }};
}
pub(crate) use info_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_cuts_long_text_at_a_char_boundary() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc… (6 bytes)");
        // 'é' is two bytes: a cut inside it moves back to its start.
        assert_eq!(clip("aéb", 2), "a… (4 bytes)");
        let long = "x".repeat(1 << 20);
        assert!(clip(&long, PEER_TEXT_MAX).len() < PEER_TEXT_MAX + 32);
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn first_passes_then_once_per_interval_with_count() {
        let l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.check_at(5 * SEC), Some(0), "first occurrence logs");
        for i in 1..=4 {
            assert_eq!(l.check_at(5 * SEC + i), None);
        }
        assert_eq!(l.pending(), 4);
        assert_eq!(l.check_at(14 * SEC), None, "still inside the interval");
        assert_eq!(l.check_at(15 * SEC), Some(5), "reports what it swallowed");
        assert_eq!(l.pending(), 0);
        assert_eq!(l.check_at(15 * SEC + 1), None);
        assert_eq!(l.check_at(100 * SEC), Some(1));
    }

    #[test]
    fn a_zero_clock_still_counts_as_logged() {
        let l = LogLimiter::new(Duration::from_secs(1));
        assert_eq!(l.check_at(0), Some(0));
        assert_eq!(l.check_at(0), None);
        assert_eq!(l.check_at(SEC + 1), Some(1));
    }

    #[test]
    fn zero_interval_never_limits() {
        let l = LogLimiter::new(Duration::ZERO);
        assert_eq!(l.check_at(7), Some(0));
        assert_eq!(l.check_at(7), Some(0));
    }

    #[test]
    fn concurrent_callers_log_once_per_interval() {
        let l = std::sync::Arc::new(LogLimiter::new(Duration::from_secs(3600)));
        // Each thread returns (lines that passed, swallowed counts those lines reported).
        let results: Vec<(u64, u64)> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..1000).fold((0, 0), |(n, reported), _| match l.check() {
                        Some(r) => (n + 1, reported + r),
                        None => (n, reported),
                    })
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or((0, 0)))
            .collect();
        let passed: u64 = results.iter().map(|r| r.0).sum();
        let reported: u64 = results.iter().map(|r| r.1).sum();
        assert_eq!(passed, 1);
        // A caller that lost the race may be counted before the winner resets the count, so it
        // shows up in the winner's report instead of `pending`; none is lost or double-counted.
        assert_eq!(reported + l.pending(), 3999);
    }

    #[test]
    fn macro_declares_one_limiter_per_site() {
        // Both sites log their first occurrence; repeats of each are swallowed.
        for _ in 0..3 {
            warn_limited!(site = "a", "test line a");
            warn_limited!(site = "b", "test line b");
        }
    }
}
