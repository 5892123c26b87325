//! Pure parsers for the cgroup v2 memory files and `/proc` files the monitor reads.
//!
//! No file I/O here: callers read the text and hand it over, so every parser is unit tested
//! on literal kernel output. Malformed input is an error naming the file and line, never a
//! silent zero (the reference read a corrupt `memory.stat` as all zeros, which disabled
//! upscaling and approved every downscale).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A parse failure: which file, which line (1-based) and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// File name as the kernel spells it, e.g. `memory.stat`.
    pub file: &'static str,
    /// 1-based line number, when the problem is on one line.
    pub line: Option<usize>,
    /// What was wrong, quoting the offending text.
    pub message: String,
}

impl ParseError {
    fn at_line(file: &'static str, line: usize, text: &str, what: &str) -> Self {
        ParseError {
            file,
            line: Some(line),
            message: format!("`{text}`: {what}"),
        }
    }

    fn whole(file: &'static str, message: String) -> Self {
        ParseError {
            file,
            line: None,
            message,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}: line {}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ParseError {}

/// Result of the parsers in this module.
pub type Result<T> = std::result::Result<T, ParseError>;

/// Splits a flat-keyed cgroup file (`key value` per line) strictly: every non-empty line must be
/// exactly a key and an unsigned integer, and a key may appear only once.
fn flat_keyed<'a>(file: &'static str, text: &'a str) -> Result<Vec<(&'a str, u64)>> {
    let mut out: Vec<(&str, u64)> = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_ascii_whitespace();
        let (Some(key), Some(value), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ParseError::at_line(
                file,
                line_no,
                line,
                "expected `<key> <value>`",
            ));
        };
        let value = value.parse::<u64>().map_err(|_| {
            ParseError::at_line(file, line_no, line, "value is not an unsigned integer")
        })?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(ParseError::at_line(file, line_no, line, "duplicate key"));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// Looks up a required key of a [`flat_keyed`] file.
fn required(file: &'static str, fields: &[(&str, u64)], key: &str) -> Result<u64> {
    optional(fields, key).ok_or_else(|| ParseError::whole(file, format!("missing field `{key}`")))
}

/// Looks up an optional key of a [`flat_keyed`] file.
fn optional(fields: &[(&str, u64)], key: &str) -> Option<u64> {
    fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// The `memory.stat` fields the monitor uses, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStat {
    /// Anonymous memory (includes swap-backed shmem only on some kernels; see `shmem`).
    pub anon: u64,
    /// Page cache, including tmpfs/shmem.
    pub file: u64,
    /// Anonymous and swap-backed pages on the active LRU (includes shmem).
    pub active_anon: u64,
    /// Anonymous and swap-backed pages on the inactive LRU (includes shmem).
    pub inactive_anon: u64,
    /// File-backed pages on the active LRU.
    pub active_file: u64,
    /// File-backed pages on the inactive LRU.
    pub inactive_file: u64,
    /// tmpfs / shared memory (Postgres shared_buffers, DSM).
    pub shmem: u64,
}

impl MemoryStat {
    /// Memory the kernel cannot drop without swap: `active_anon + inactive_anon`, the
    /// reference's measure (it includes shmem, e.g. shared_buffers, and excludes page cache).
    pub fn non_reclaimable(&self) -> u64 {
        self.active_anon.saturating_add(self.inactive_anon)
    }
}

/// Parses a cgroup v2 `memory.stat`.
pub fn parse_memory_stat(text: &str) -> Result<MemoryStat> {
    const FILE: &str = "memory.stat";
    let fields = flat_keyed(FILE, text)?;
    Ok(MemoryStat {
        anon: required(FILE, &fields, "anon")?,
        file: required(FILE, &fields, "file")?,
        active_anon: required(FILE, &fields, "active_anon")?,
        inactive_anon: required(FILE, &fields, "inactive_anon")?,
        active_file: required(FILE, &fields, "active_file")?,
        inactive_file: required(FILE, &fields, "inactive_file")?,
        shmem: required(FILE, &fields, "shmem")?,
    })
}

/// Counters from a cgroup v2 `memory.events` (hierarchical: includes descendants).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEvents {
    /// Times usage was below `memory.low` but reclaimed anyway.
    pub low: u64,
    /// Times the cgroup was throttled and routed to reclaim because of `memory.high`.
    pub high: u64,
    /// Times usage was about to go over `memory.max`.
    pub max: u64,
    /// Times the OOM killer was invoked for the cgroup.
    pub oom: u64,
    /// Processes killed by the OOM killer.
    pub oom_kill: u64,
    /// Group OOM kills (kernel ≥ 5.17; absent before).
    pub oom_group_kill: Option<u64>,
}

/// Parses a cgroup v2 `memory.events` (or `memory.events.local`).
pub fn parse_memory_events(text: &str) -> Result<MemoryEvents> {
    const FILE: &str = "memory.events";
    let fields = flat_keyed(FILE, text)?;
    Ok(MemoryEvents {
        low: required(FILE, &fields, "low")?,
        high: required(FILE, &fields, "high")?,
        max: required(FILE, &fields, "max")?,
        oom: required(FILE, &fields, "oom")?,
        oom_kill: required(FILE, &fields, "oom_kill")?,
        oom_group_kill: optional(&fields, "oom_group_kill"),
    })
}

/// The value of a cgroup v2 `memory.high` (or `memory.max`): unlimited or a byte count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryHigh {
    /// No limit (`max`).
    Max,
    /// A limit in bytes.
    Bytes(u64),
}

impl MemoryHigh {
    /// The limit in bytes, or `None` for `max`.
    pub fn bytes(self) -> Option<u64> {
        match self {
            MemoryHigh::Max => None,
            MemoryHigh::Bytes(b) => Some(b),
        }
    }
}

/// Formats exactly what is written to the file: `max` or the decimal byte count.
impl fmt::Display for MemoryHigh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryHigh::Max => f.write_str("max"),
            MemoryHigh::Bytes(b) => write!(f, "{b}"),
        }
    }
}

impl FromStr for MemoryHigh {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self> {
        parse_memory_high(s)
    }
}

/// Parses a cgroup v2 `memory.high` (`max` or bytes, one line).
pub fn parse_memory_high(text: &str) -> Result<MemoryHigh> {
    const FILE: &str = "memory.high";
    let value = text.trim();
    if value == "max" {
        return Ok(MemoryHigh::Max);
    }
    if value.lines().count() > 1 {
        return Err(ParseError::whole(
            FILE,
            format!("`{value}`: expected a single line"),
        ));
    }
    value
        .parse::<u64>()
        .map(MemoryHigh::Bytes)
        .map_err(|_| ParseError::at_line(FILE, 1, value, "expected `max` or a byte count"))
}

/// Text to write to `memory.high` for `value` (same as its `Display`).
pub fn format_memory_high(value: MemoryHigh) -> String {
    value.to_string()
}

/// One line of a PSI file (`some` or `full`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PsiLine {
    /// Percentage of wall time stalled, averaged over 10 s.
    pub avg10: f64,
    /// Same over 60 s.
    pub avg60: f64,
    /// Same over 300 s.
    pub avg300: f64,
    /// Total stall time since boot (the file counts microseconds).
    pub total: Duration,
}

/// A parsed PSI file such as a cgroup's `memory.pressure` or `/proc/pressure/memory`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    /// Some task stalled.
    pub some: PsiLine,
    /// All non-idle tasks stalled at once (absent for system-wide CPU on old kernels).
    pub full: Option<PsiLine>,
}

/// Parses a PSI file (`some avg10=.. avg60=.. avg300=.. total=..` and optionally `full ...`).
pub fn parse_psi(text: &str) -> Result<Psi> {
    const FILE: &str = "memory.pressure";
    let mut some = None;
    let mut full = None;
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_ascii_whitespace();
        let slot = match parts.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => {
                return Err(ParseError::at_line(
                    FILE,
                    line_no,
                    line,
                    "expected a `some` or `full` line",
                ));
            }
        };
        if slot.is_some() {
            return Err(ParseError::at_line(FILE, line_no, line, "duplicate line"));
        }
        let (mut avg10, mut avg60, mut avg300, mut total) = (None, None, None, None);
        for part in parts {
            let bad = |what: &str| ParseError::at_line(FILE, line_no, line, what);
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad("expected `key=value` fields"))?;
            let avg = || -> Result<f64> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| bad("average is not a non-negative number"))
            };
            match key {
                "avg10" => avg10 = Some(avg()?),
                "avg60" => avg60 = Some(avg()?),
                "avg300" => avg300 = Some(avg()?),
                "total" => {
                    let us = value
                        .parse::<u64>()
                        .map_err(|_| bad("total is not an unsigned integer"))?;
                    total = Some(Duration::from_micros(us));
                }
                // Newer kernels may add fields; the four above are all we use.
                _ => {}
            }
        }
        let (Some(avg10), Some(avg60), Some(avg300), Some(total)) = (avg10, avg60, avg300, total)
        else {
            return Err(ParseError::at_line(
                FILE,
                line_no,
                line,
                "missing one of avg10, avg60, avg300, total",
            ));
        };
        *slot = Some(PsiLine {
            avg10,
            avg60,
            avg300,
            total,
        });
    }
    let some = some.ok_or_else(|| ParseError::whole(FILE, "missing `some` line".to_string()))?;
    Ok(Psi { some, full })
}

/// Parses `MemTotal` from `/proc/meminfo` and returns it in bytes (the file counts kB = KiB).
pub fn parse_meminfo_total(text: &str) -> Result<u64> {
    const FILE: &str = "/proc/meminfo";
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let Some(rest) = raw.trim().strip_prefix("MemTotal:") else {
            continue;
        };
        let line = raw.trim();
        let mut parts = rest.split_ascii_whitespace();
        let (Some(value), Some("kB"), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ParseError::at_line(
                FILE,
                line_no,
                line,
                "expected `MemTotal: <n> kB`",
            ));
        };
        let kb = value.parse::<u64>().map_err(|_| {
            ParseError::at_line(FILE, line_no, line, "value is not an unsigned integer")
        })?;
        if kb == 0 {
            return Err(ParseError::at_line(FILE, line_no, line, "MemTotal is zero"));
        }
        return kb
            .checked_mul(1024)
            .ok_or_else(|| ParseError::at_line(FILE, line_no, line, "value overflows u64 bytes"));
    }
    Err(ParseError::whole(
        FILE,
        "missing `MemTotal` line".to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real cgroup v2 `memory.stat` from a 6.1 kernel (trimmed of nothing we parse).
    const STAT: &str = "anon 104857600
file 52428800
kernel 4194304
kernel_stack 327680
pagetables 1048576
sec_pagetables 0
percpu 0
sock 0
vmalloc 0
shmem 8388608
zswap 0
zswapped 0
file_mapped 1048576
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 0
file_thp 0
shmem_thp 0
inactive_anon 73400320
active_anon 39845888
inactive_file 41943040
active_file 10485760
unevictable 0
slab_reclaimable 0
slab_unreclaimable 0
slab 0
workingset_refault_anon 0
pgfault 12345
";

    #[test]
    fn memory_stat_parses_needed_fields() {
        let stat = parse_memory_stat(STAT).unwrap();
        assert_eq!(stat.anon, 104_857_600);
        assert_eq!(stat.file, 52_428_800);
        assert_eq!(stat.shmem, 8_388_608);
        assert_eq!(stat.active_anon, 39_845_888);
        assert_eq!(stat.inactive_anon, 73_400_320);
        assert_eq!(stat.active_file, 10_485_760);
        assert_eq!(stat.inactive_file, 41_943_040);
        assert_eq!(stat.non_reclaimable(), 39_845_888 + 73_400_320);
    }

    #[test]
    fn memory_stat_malformed_value_names_the_line() {
        let text = STAT.replace("inactive_anon 73400320", "inactive_anon 7340x320");
        let err = parse_memory_stat(&text).unwrap_err();
        assert_eq!(err.file, "memory.stat");
        assert_eq!(err.line, Some(20));
        let shown = err.to_string();
        assert!(shown.contains("line 20"), "{shown}");
        assert!(shown.contains("inactive_anon 7340x320"), "{shown}");
    }

    #[test]
    fn memory_stat_rejects_wrong_shape_missing_and_duplicates() {
        assert!(parse_memory_stat("anon\n").unwrap_err().line == Some(1));
        assert!(parse_memory_stat("anon 1 2\n").is_err());
        let err = parse_memory_stat("").unwrap_err();
        assert!(err.to_string().contains("missing field `anon`"), "{err}");
        let no_active = STAT.replace("active_anon 39845888\n", "");
        let err = parse_memory_stat(&no_active).unwrap_err();
        assert!(err.to_string().contains("`active_anon`"), "{err}");
        let dup = format!("{STAT}anon 1\n");
        assert!(
            parse_memory_stat(&dup)
                .unwrap_err()
                .message
                .contains("duplicate")
        );
    }

    #[test]
    fn memory_stat_saturates_non_reclaimable() {
        let stat = MemoryStat {
            active_anon: u64::MAX,
            inactive_anon: 1,
            ..MemoryStat::default()
        };
        assert_eq!(stat.non_reclaimable(), u64::MAX);
    }

    #[test]
    fn memory_events_with_and_without_group_kill() {
        let new = "low 0\nhigh 17\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\nsock_throttled 0\n";
        let ev = parse_memory_events(new).unwrap();
        assert_eq!(
            ev,
            MemoryEvents {
                low: 0,
                high: 17,
                max: 2,
                oom: 1,
                oom_kill: 1,
                oom_group_kill: Some(0),
            }
        );
        let old = "low 0\nhigh 3\nmax 0\noom 0\noom_kill 0\n";
        let ev = parse_memory_events(old).unwrap();
        assert_eq!(ev.high, 3);
        assert_eq!(ev.oom_group_kill, None);
        let err = parse_memory_events("low 0\nhigh x\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(parse_memory_events("low 0\nhigh 1\n").is_err());
    }

    #[test]
    fn memory_high_round_trips() {
        assert_eq!(parse_memory_high("max\n").unwrap(), MemoryHigh::Max);
        assert_eq!(
            parse_memory_high("1073741824\n").unwrap(),
            MemoryHigh::Bytes(1 << 30)
        );
        for v in [
            MemoryHigh::Max,
            MemoryHigh::Bytes(0),
            MemoryHigh::Bytes(823_551_590),
        ] {
            assert_eq!(parse_memory_high(&format_memory_high(v)).unwrap(), v);
            assert_eq!(v.to_string().parse::<MemoryHigh>().unwrap(), v);
        }
        assert_eq!(MemoryHigh::Max.bytes(), None);
        assert_eq!(MemoryHigh::Bytes(5).bytes(), Some(5));
        assert!(parse_memory_high("").is_err());
        assert!(parse_memory_high("-1").is_err());
        assert!(parse_memory_high("12M").is_err());
        assert!(parse_memory_high("1\n2\n").is_err());
    }

    #[test]
    fn psi_parses_some_and_full() {
        let text = "some avg10=1.23 avg60=0.50 avg300=0.00 total=123456\n\
                    full avg10=0.10 avg60=0.00 avg300=0.00 total=789\n";
        let psi = parse_psi(text).unwrap();
        assert_eq!(psi.some.avg10, 1.23);
        assert_eq!(psi.some.avg60, 0.5);
        assert_eq!(psi.some.total, Duration::from_micros(123_456));
        let full = psi.full.unwrap();
        assert_eq!(full.avg10, 0.1);
        assert_eq!(full.total, Duration::from_micros(789));

        let some_only = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").unwrap();
        assert_eq!(some_only.full, None);
    }

    #[test]
    fn psi_rejects_malformed() {
        let err = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00\n").unwrap_err();
        assert_eq!(err.line, Some(1));
        assert!(parse_psi("some avg10=abc avg60=0 avg300=0 total=0\n").is_err());
        assert!(parse_psi("some avg10=-1 avg60=0 avg300=0 total=0\n").is_err());
        assert!(parse_psi("some avg10=NaN avg60=0 avg300=0 total=0\n").is_err());
        assert!(parse_psi("partial avg10=0 avg60=0 avg300=0 total=0\n").is_err());
        let err = parse_psi("full avg10=0 avg60=0 avg300=0 total=0\n").unwrap_err();
        assert!(err.to_string().contains("missing `some`"), "{err}");
        let dup = "some avg10=0 avg60=0 avg300=0 total=0\nsome avg10=0 avg60=0 avg300=0 total=0\n";
        assert_eq!(parse_psi(dup).unwrap_err().line, Some(2));
    }

    #[test]
    fn meminfo_total_in_bytes() {
        let text =
            "MemTotal:        2007236 kB\nMemFree:          123456 kB\nHugePages_Total:       0\n";
        assert_eq!(parse_meminfo_total(text).unwrap(), 2_007_236 * 1024);
        let later = "MemFree: 1 kB\nMemTotal: 1048576 kB\n";
        assert_eq!(parse_meminfo_total(later).unwrap(), 1 << 30);
    }

    #[test]
    fn meminfo_total_errors() {
        let err = parse_meminfo_total("MemFree: 1 kB\n").unwrap_err();
        assert!(err.to_string().contains("missing `MemTotal`"), "{err}");
        let err = parse_meminfo_total("MemFree: 1 kB\nMemTotal: 12x kB\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(parse_meminfo_total("MemTotal: 12 MB\n").is_err());
        assert!(parse_meminfo_total("MemTotal: 0 kB\n").is_err());
        assert!(parse_meminfo_total(&format!("MemTotal: {} kB\n", u64::MAX)).is_err());
    }
}
