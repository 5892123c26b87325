//! Policy constants with the reference defaults, and their validation.

use std::fmt;
use std::time::Duration;

use super::sizing::MIB;

/// The largest VM memory believed (16 TiB): the wire's sanity bound on any size, and the
/// policy's default `max_mem`.
pub const MAX_MEM: u64 = 16 << 40;

/// File-cache sizing knobs (the reference monitor's, for an on-disk file cache).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FileCacheConfig {
    /// Largest share of memory the cache may take (0.75).
    pub resource_multiplier: f64,
    /// Extra memory kept per cache byte above `min_remaining_after_cache` (0.1).
    pub spread_factor: f64,
    /// Memory always left to everything else before the cache gets any (256 MiB).
    pub min_remaining_after_cache: u64,
}

impl Default for FileCacheConfig {
    fn default() -> Self {
        FileCacheConfig {
            resource_multiplier: 0.75,
            spread_factor: 0.1,
            min_remaining_after_cache: 256 * MIB,
        }
    }
}

/// Everything the decision core needs to know up front.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// A cgroup is watched (`--cgroup`): readings, threshold and downscale checks apply.
    pub manage_cgroup: bool,
    /// The Postgres file cache is resized (`--pgconnstr`).
    pub manage_file_cache: bool,
    /// `memory.high` is written at all (off with `--no-memory-high`; ignored without a cgroup):
    /// `max` at start-up and on shutdown, and the guard's limits when that is on.
    pub manage_memory_high: bool,
    /// The memory.high guard (`--memory-high-guard`): memory.high held at the upscale
    /// threshold and stepped up while an upscale is pending. It throttles a runaway allocation
    /// before the agent answers, but it also makes the kernel reclaim page cache in Postgres's
    /// own context whenever the cgroup passes the threshold, so it is off by default.
    /// Recordings made before the field existed ran with the guard on.
    #[serde(default = "guard_in_old_recordings")]
    pub memory_high_guard: bool,
    /// Smallest growth budget armed for the kernel's growth hint below the threshold
    /// (256 KiB, one 6.1 per-task batch): the budget never exceeds the headroom, so the hint
    /// cannot fire after the crossing; this only bounds how often it fires just below it.
    #[serde(default = "default_growth_hint_floor")]
    pub growth_hint_floor: u64,
    /// Growth budget while usage is at or over the threshold (16 MiB). There the re-check at
    /// the rate limit paces the requests; a hint only refreshes the peak reading.
    #[serde(default = "default_growth_hint_over")]
    pub growth_hint_over: u64,
    /// Subtracted from the agent's allocation to get usable memory (100 MiB).
    pub sys_buffer: u64,
    /// File-cache sizing.
    pub file_cache: FileCacheConfig,
    /// Upscale threshold as a fraction of usable memory (0.85).
    pub upscale_threshold_fraction: f64,
    /// Headroom a downscale must leave above usage (100 MiB).
    pub downscale_buffer: u64,
    /// Minimum spacing of `UpscaleRequest`s (1 s).
    pub upscale_min_interval: Duration,
    /// How long a sent or suppressed upscale request counts as pending without a notification
    /// (10 s, the agent's `requestedUpscaleValidSeconds`).
    pub upscale_pending_for: Duration,
    /// Step by which `memory.high` is raised while an upscale is pending (10 MiB).
    pub memory_high_step: u64,
    /// Minimum spacing of those steps (25 ms).
    pub memory_high_step_every: Duration,
    /// Pressure counts as continuing for this long after the last pressure event (500 ms; keep
    /// it above the pressure source's longest quiet gap, e.g. the PSI window).
    pub pressure_hold: Duration,
    /// Window over which the peak reading is kept for downscale checks (5 s).
    pub peak_window: Duration,
    /// A downscale needs a reading at most this old (5 s, the reference's staleness limit).
    pub reading_max_age: Duration,
    /// A guest-wide direct-reclaim stall at least this long asks for an upscale (10 ms).
    pub direct_reclaim_stall: Duration,
    /// Largest believable allocation from the agent; above it a request is refused ([`MAX_MEM`]).
    pub max_mem: u64,
}

fn guard_in_old_recordings() -> bool {
    true
}

fn default_growth_hint_floor() -> u64 {
    256 << 10
}

fn default_growth_hint_over() -> u64 {
    16 * MIB
}

impl Default for Config {
    fn default() -> Self {
        Config {
            manage_cgroup: true,
            manage_file_cache: true,
            manage_memory_high: true,
            memory_high_guard: false,
            growth_hint_floor: default_growth_hint_floor(),
            growth_hint_over: default_growth_hint_over(),
            sys_buffer: 100 * MIB,
            file_cache: FileCacheConfig::default(),
            upscale_threshold_fraction: 0.85,
            downscale_buffer: 100 * MIB,
            upscale_min_interval: Duration::from_secs(1),
            upscale_pending_for: Duration::from_secs(10),
            memory_high_step: 10 * MIB,
            memory_high_step_every: Duration::from_millis(25),
            pressure_hold: Duration::from_millis(500),
            peak_window: Duration::from_secs(5),
            reading_max_age: Duration::from_secs(5),
            direct_reclaim_stall: Duration::from_millis(10),
            max_mem: MAX_MEM,
        }
    }
}

/// A rejected configuration value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The offending field (as named in [`Config`]).
    pub field: &'static str,
    /// Why it was rejected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn fail(field: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError {
        field,
        message: message.into(),
    })
}

impl Config {
    /// Whether `memory.high` is actually written (needs a cgroup).
    pub fn writes_memory_high(&self) -> bool {
        self.manage_cgroup && self.manage_memory_high
    }

    /// Whether memory.high is held below `max` (the guard; see [`Config::memory_high_guard`]).
    pub fn guards_memory_high(&self) -> bool {
        self.writes_memory_high() && self.memory_high_guard
    }

    /// Checks every value, reporting the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sys_buffer == 0 {
            return fail("sys_buffer", "must be non-zero");
        }
        let fc = &self.file_cache;
        let m = fc.resource_multiplier;
        if !(m > 0.0 && m < 1.0) {
            return fail(
                "file_cache.resource_multiplier",
                format!("{m} is not strictly between 0 and 1"),
            );
        }
        let s = fc.spread_factor;
        if !(s.is_finite() && s >= 0.0) {
            return fail(
                "file_cache.spread_factor",
                format!("{s} is not a finite number ≥ 0"),
            );
        }
        if m * (1.0 + s) >= 1.0 {
            return fail(
                "file_cache.spread_factor",
                format!(
                    "incompatible resource_multiplier and spread_factor: {m} × (1 + {s}) = {} must be < 1",
                    m * (1.0 + s)
                ),
            );
        }
        if fc.min_remaining_after_cache == 0 {
            return fail("file_cache.min_remaining_after_cache", "must be non-zero");
        }
        let f = self.upscale_threshold_fraction;
        // At 1 the threshold is all of usable memory: no room left to react in.
        if !(f > 0.0 && f < 1.0) {
            return fail(
                "upscale_threshold_fraction",
                format!("{f} is not in (0, 1)"),
            );
        }
        if self.upscale_min_interval.is_zero() {
            return fail("upscale_min_interval", "must be non-zero");
        }
        if self.upscale_pending_for.is_zero() {
            return fail("upscale_pending_for", "must be non-zero");
        }
        if self.memory_high_step == 0 {
            return fail("memory_high_step", "must be non-zero");
        }
        if self.memory_high_step_every.is_zero() {
            return fail("memory_high_step_every", "must be non-zero");
        }
        if self.reading_max_age.is_zero() {
            return fail("reading_max_age", "must be non-zero");
        }
        if self.max_mem <= self.sys_buffer {
            return fail("max_mem", "must be larger than sys_buffer");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn rejects_bad_values_with_field_names() {
        let check = |edit: fn(&mut Config), field: &str, needle: &str| {
            let mut cfg = Config::default();
            edit(&mut cfg);
            let err = cfg.validate().unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.to_string().contains(needle), "{err}");
        };
        check(|c| c.sys_buffer = 0, "sys_buffer", "non-zero");
        check(
            |c| c.file_cache.resource_multiplier = 1.0,
            "file_cache.resource_multiplier",
            "between 0 and 1",
        );
        check(
            |c| c.file_cache.resource_multiplier = 0.0,
            "file_cache.resource_multiplier",
            "between 0 and 1",
        );
        check(
            |c| c.file_cache.resource_multiplier = f64::NAN,
            "file_cache.resource_multiplier",
            "between 0 and 1",
        );
        check(
            |c| c.file_cache.spread_factor = -0.1,
            "file_cache.spread_factor",
            "≥ 0",
        );
        check(
            |c| c.file_cache.spread_factor = 0.4,
            "file_cache.spread_factor",
            "incompatible",
        );
        check(
            |c| c.file_cache.min_remaining_after_cache = 0,
            "file_cache.min_remaining_after_cache",
            "non-zero",
        );
        check(
            |c| c.upscale_threshold_fraction = 1.5,
            "upscale_threshold_fraction",
            "(0, 1)",
        );
        check(
            |c| c.upscale_threshold_fraction = 1.0,
            "upscale_threshold_fraction",
            "(0, 1)",
        );
        check(
            |c| c.upscale_min_interval = Duration::ZERO,
            "upscale_min_interval",
            "non-zero",
        );
        check(|c| c.memory_high_step = 0, "memory_high_step", "non-zero");
        check(
            |c| c.memory_high_step_every = Duration::ZERO,
            "memory_high_step_every",
            "non-zero",
        );
        check(|c| c.max_mem = MIB, "max_mem", "sys_buffer");
    }

    #[test]
    fn boundary_multiplier_spread_product() {
        let mut cfg = Config::default();
        cfg.file_cache.resource_multiplier = 0.5;
        cfg.file_cache.spread_factor = 0.99;
        cfg.validate().unwrap();
        cfg.file_cache.spread_factor = 1.0;
        assert!(cfg.validate().is_err());
    }
}
