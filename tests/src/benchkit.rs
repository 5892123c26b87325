//! Measurement primitives shared by the benchmark drivers (`src/bin/bench.rs` in the VM,
//! `src/bin/bench-host.rs` on the host): a process's CPU time, context switches and memory
//! from `/proc`, and the daemon's `/metrics` as numbers. Raw samples only; statistics are
//! computed by `cargo xtask bench`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use prometheus_parse::{Scrape, Value};

/// One reading of a process's cost counters.
#[derive(Clone, Debug, Default)]
pub struct ProcSample {
    /// utime + stime of all threads, clock ticks.
    pub cpu_ticks: u64,
    /// Voluntary context switches per thread id.
    pub switches: BTreeMap<u64, u64>,
    pub rss_kib: u64,
    /// Peak RSS so far (`VmHWM`).
    pub hwm_kib: u64,
}

impl ProcSample {
    pub fn read(pid: u32) -> anyhow::Result<ProcSample> {
        let status = format!("/proc/{pid}/status");
        Ok(ProcSample {
            cpu_ticks: cpu_ticks(pid)?,
            switches: switches(pid)?,
            rss_kib: status_field(&status, "VmRSS:")?,
            hwm_kib: status_field(&status, "VmHWM:")?,
        })
    }

    /// CPU milliseconds spent between `earlier` and `self`.
    pub fn cpu_ms_since(&self, earlier: &ProcSample) -> f64 {
        self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 * 1e3 / clock_ticks_per_s()
    }

    /// Voluntary switches between `earlier` and `self`, all threads (threads started meanwhile
    /// count from zero).
    pub fn switches_since(&self, earlier: &ProcSample) -> u64 {
        self.switches
            .iter()
            .map(|(tid, n)| n.saturating_sub(earlier.switches.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

/// `USER_HZ`, the unit of `/proc/PID/stat` times.
pub fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// A `KEY: value ...` field of a `/proc/.../status` file (the first number).
pub fn status_field(path: &str, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

/// Voluntary context switches per thread.
fn switches(pid: u32) -> anyhow::Result<BTreeMap<u64, u64>> {
    let mut out = BTreeMap::new();
    let dir = format!("/proc/{pid}/task");
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let e = e?;
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let path: PathBuf = e.path().join("status");
        // A thread may exit between the listing and the read.
        if let Ok(n) = status_field(&path.to_string_lossy(), "voluntary_ctxt_switches:") {
            out.insert(tid, n);
        }
    }
    Ok(out)
}

/// utime + stime of the whole process, clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// A parsed `/metrics` page.
pub struct MetricsPage(Scrape);

/// The value of the sample `name` with (at least) `labels` in a parsed `/metrics` page
/// (counters, gauges, untyped); `None` if absent. The one lookup all tests share.
pub fn sample_value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .and_then(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

impl MetricsPage {
    pub async fn scrape(addr: SocketAddr) -> anyhow::Result<MetricsPage> {
        let r = crate::http::get(addr, "/metrics", None).await?;
        anyhow::ensure!(r.status == 200, "GET /metrics: {} {}", r.status, r.body);
        let s =
            Scrape::parse(r.body.lines().map(|l| Ok(l.to_string()))).context("parsing /metrics")?;
        Ok(MetricsPage(s))
    }

    /// The value of `name` with (at least) `labels` ([`sample_value`]).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample_value(&self.0, name, labels)
    }

    /// Every sample of `name` as (label set, value).
    pub fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| {
                let v = match s.value {
                    Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                    _ => return None,
                };
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                Some((labels, v))
            })
            .collect()
    }

    /// Sum of `name` over all its label sets (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples(name).iter().map(|(_, v)| v).sum()
    }

    /// `name` keyed by the value of `label`.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.samples(name) {
            if let Some(k) = labels.get(label) {
                *out.entry(k.clone()).or_insert(0.0) += v;
            }
        }
        out
    }
}

/// Appends CSV rows to files in one directory, writing the header on creation and syncing each
/// row (a VM killed on a timeout keeps what was measured).
pub struct CsvDir {
    pub dir: PathBuf,
}

impl CsvDir {
    pub fn new(dir: PathBuf) -> anyhow::Result<CsvDir> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(CsvDir { dir })
    }

    pub fn append(&self, file: &str, header: &str, row: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let path = self.dir.join(file);
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            writeln!(f, "{header}")?;
        }
        writeln!(f, "{row}")?;
        f.sync_all()?;
        Ok(())
    }
}

/// Times `pairs` detached/attached pairs of one workload, the order flipping every pair so a
/// drift of the machine within a pair cancels out over pairs. `run(attached)` does one run and
/// returns its duration and the monitor's CPU milliseconds; each run becomes a row of
/// `overhead.csv` (printed with `label` as it comes).
pub fn overhead_pairs(
    label: &str,
    out: &CsvDir,
    kernel: &str,
    pairs: u64,
    mut run: impl FnMut(bool) -> anyhow::Result<(std::time::Duration, f64)>,
) -> anyhow::Result<()> {
    for pair in 1..=pairs {
        let order = if pair % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for attached in order {
            let (elapsed, cpu_ms) = run(attached)?;
            let mode = if attached { "attached" } else { "detached" };
            let secs = elapsed.as_secs_f64();
            eprintln!("{label}: {kernel} overhead pair {pair} {mode}: {secs:.3} s");
            out.append(
                "overhead.csv",
                "kernel,pair,mode,seconds,daemon_cpu_ms",
                &format!("{kernel},{pair},{mode},{secs:.4},{cpu_ms:.1}"),
            )?;
        }
    }
    Ok(())
}

/// Writes `meta.txt` (`key=value` lines) describing the kernel the samples come from: its
/// release, CPUs, memory and JIT setting, plus `extra` pairs.
pub fn write_meta(out: &CsvDir, extra: &[(&str, &str)]) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut meta = String::new();
    for (k, v) in extra {
        writeln!(meta, "{k}={v}")?;
    }
    writeln!(
        meta,
        "release={}",
        read("/proc/sys/kernel/osrelease").trim()
    )?;
    writeln!(
        meta,
        "cpus={}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    writeln!(
        meta,
        "memtotal_mib={}",
        crate::scenario::mem_total().unwrap_or(0) >> 20
    )?;
    writeln!(
        meta,
        "bpf_jit_enable={}",
        read("/proc/sys/net/core/bpf_jit_enable").trim()
    )?;
    let path = out.dir.join("meta.txt");
    std::fs::write(&path, meta).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
