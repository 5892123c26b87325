//! Pure sizing formulas (the reference monitor's): usable memory, file-cache size, upscale threshold,
//! and the MiB formatting used in statuses.

use super::config::FileCacheConfig;

/// One mebibyte in bytes.
pub const MIB: u64 = 1 << 20;

/// Memory the policy sizes against: the agent's allocation minus the system buffer
/// (saturating at 0).
pub fn usable(mem: u64, sys_buffer: u64) -> u64 {
    mem.saturating_sub(sys_buffer)
}

/// Rounds down to a whole MiB.
pub fn round_down_mib(bytes: u64) -> u64 {
    bytes - bytes % MIB
}

/// Target file-cache size for `total` bytes of memory:
/// `min(trunc(m·total), trunc((total − min_remaining)/(1 + spread)))` rounded down to MiB,
/// 0 when `total ≤ min_remaining`, then capped by `max` (Postgres' `neon.max_file_cache_size`)
/// when known.
pub fn file_cache_size(cfg: &FileCacheConfig, total: u64, max: Option<u64>) -> u64 {
    let available = total.saturating_sub(cfg.min_remaining_after_cache);
    if available == 0 {
        return 0;
    }
    // f64 like the reference; `as u64` truncates and saturates (NaN → 0), which is the
    // clamp-to-≥0-then-truncate the reference specifies.
    let from_spread = (available as f64 / (1.0 + cfg.spread_factor)) as u64;
    let from_normal = (total as f64 * cfg.resource_multiplier) as u64;
    let size = round_down_mib(from_spread.min(from_normal));
    match max {
        // The adapter writes whole MiB (the GUC's unit), so cap then round again.
        Some(max) => round_down_mib(size.min(max)),
        None => size,
    }
}

/// Upscale threshold for `usable` bytes: `trunc(usable · fraction)` (HEAD: fraction 0.85).
pub fn threshold(usable: u64, fraction: f64) -> u64 {
    (usable as f64 * fraction) as u64
}

/// Bytes as f32 MiB, the unit and type the reference prints in statuses
/// (`Display` gives e.g. `487`, `564.3524`, `785.4`).
pub fn mib(bytes: u64) -> f32 {
    // Divide in f64 first so large values do not pick up f32 rounding of the byte count.
    (bytes as f64 / MIB as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::config::Config;

    const GIB: u64 = 1 << 30;

    fn fc(total: u64) -> u64 {
        file_cache_size(&Config::default().file_cache, total, None)
    }

    /// Worked examples of the reference monitor's formulas (its current threshold rule, on-disk LFC).
    #[test]
    fn reference_worked_examples() {
        let cfg = Config::default();
        // (VM mem, usable MiB, LFC MiB, threshold as printed)
        let table: [(u64, u64, u64, &str); 5] = [
            (512 * MIB, 412, 141, "350.2"),
            (GIB, 924, 607, "785.4"),
            (2 * GIB, 1948, 1461, "1655.8"),
            (4 * GIB, 3996, 2997, "3396.6"),
            (8 * GIB, 8092, 6069, "6878.2"),
        ];
        for (mem, usable_mib, lfc_mib, thr) in table {
            let u = usable(mem, cfg.sys_buffer);
            assert_eq!(u, usable_mib * MIB, "usable for {mem}");
            assert_eq!(fc(u), lfc_mib * MIB, "LFC for {mem}");
            let t = threshold(u, cfg.upscale_threshold_fraction);
            assert_eq!(mib(t).to_string(), thr, "threshold for {mem}");
        }
    }

    #[test]
    fn file_cache_zero_at_or_below_min_remaining() {
        assert_eq!(fc(0), 0);
        assert_eq!(fc(256 * MIB), 0);
        assert_eq!(fc(256 * MIB - 1), 0);
        // Just above: (1 MiB / 1.1) rounds down to 0 MiB.
        assert_eq!(fc(257 * MIB), 0);
        assert_eq!(fc(258 * MIB), MIB);
    }

    #[test]
    fn file_cache_crossover_to_multiplier() {
        // Above ≈1463 MiB the 75 % branch wins.
        // Below it the spread branch: (1000 − 256)/1.1 = 676.4 MiB.
        assert_eq!(fc(1000 * MIB), 676 * MIB);
        assert_eq!(fc(2000 * MIB), 1500 * MIB);
        assert_eq!(fc(16 * GIB), 12 * GIB);
    }

    #[test]
    fn file_cache_capped_by_max_and_whole_mib() {
        let cfg = Config::default().file_cache;
        assert_eq!(file_cache_size(&cfg, 4 * GIB, Some(GIB)), GIB);
        assert_eq!(file_cache_size(&cfg, 4 * GIB, Some(GIB + 12345)), GIB);
        assert_eq!(file_cache_size(&cfg, 4 * GIB, Some(0)), 0);
        assert_eq!(file_cache_size(&cfg, 4 * GIB, Some(100 * GIB)), fc(4 * GIB));
        for total in [300 * MIB + 7, 999_999_999, 3 * GIB + 1] {
            assert_eq!(fc(total) % MIB, 0);
        }
    }

    #[test]
    fn usable_saturates() {
        assert_eq!(usable(50 * MIB, 100 * MIB), 0);
        assert_eq!(usable(100 * MIB, 100 * MIB), 0);
        assert_eq!(usable(GIB, 100 * MIB), 924 * MIB);
    }

    #[test]
    fn threshold_truncates() {
        assert_eq!(threshold(924 * MIB, 0.85), 823_551_590);
        assert_eq!(threshold(0, 0.85), 0);
        assert_eq!(threshold(10, 1.0), 10);
    }

    #[test]
    fn mib_display_like_reference() {
        assert_eq!(mib(487 * MIB).to_string(), "487");
        assert_eq!(mib(100 * MIB).to_string(), "100");
        assert_eq!(mib(0).to_string(), "0");
        assert_eq!(mib(MIB / 2).to_string(), "0.5");
    }
}
