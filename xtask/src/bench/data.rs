//! The drivers' raw samples (CSV) and the statistics over them.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// Tiers in report order.
pub(super) const TIERS: [&str; 3] = ["ebpf", "psi", "poll"];

#[derive(Clone, Debug, Default)]
pub(super) struct IdleSample {
    pub secs: f64,
    pub switches: f64,
    pub cpu_ms: f64,
    pub rss_kib: f64,
}

impl IdleSample {
    pub(super) fn wakeups_per_s(&self) -> f64 {
        self.switches / self.secs.max(f64::MIN_POSITIVE)
    }
    pub(super) fn cpu_ms_per_s(&self) -> f64 {
        self.cpu_ms / self.secs.max(f64::MIN_POSITIVE)
    }
}

/// One timed run of the overhead workload.
#[derive(Clone, Debug)]
pub(super) struct OverheadRun {
    pub pair: u64,
    pub attached: bool,
    pub secs: f64,
    pub daemon_cpu_ms: f64,
}

/// Run statistics of one program in one JIT mode.
#[derive(Clone, Debug)]
pub(super) struct ProgramCost {
    pub jit: String,
    pub program: String,
    pub runs: f64,
    pub run_time_ns: f64,
    /// The workload it was measured on (`overhead`, or a storm variant on the host).
    pub variant: String,
}

/// One event-storm run.
#[derive(Clone, Debug)]
pub(super) struct StormRun {
    pub variant: String,
    pub tasks: u64,
    pub secs: f64,
    pub seen: f64,
    pub emitted: f64,
    pub coalesced: f64,
    pub dropped: f64,
    pub delivered: f64,
    pub daemon_cpu_ms: f64,
    pub rss_first_kib: f64,
    pub rss_end_kib: f64,
    pub rss_peak_kib: f64,
}

impl StormRun {
    pub(super) fn cpu_pct(&self) -> f64 {
        self.daemon_cpu_ms / 10.0 / self.secs.max(f64::MIN_POSITIVE)
    }
    /// Every hit is accounted for: seen = emitted + coalesced + dropped and every emitted
    /// record reached the consumer.
    pub(super) fn accounted(&self) -> bool {
        self.seen == self.emitted + self.coalesced + self.dropped && self.delivered == self.emitted
    }
    /// RSS growth over the storm (peak above the first sample), KiB.
    pub(super) fn rss_growth_kib(&self) -> f64 {
        self.rss_peak_kib - self.rss_first_kib
    }
}

/// One ungranted ramp held above the threshold: further requests after the first one and
/// the time from the first to the last.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Hold {
    pub requests: f64,
    pub secs: f64,
}

impl Hold {
    /// Requests per second while held; `None` with fewer than one further request.
    pub(super) fn rate(&self) -> Option<f64> {
        (self.requests >= 1.0 && self.secs > 0.0).then(|| self.requests / self.secs)
    }
}

/// Host start-up: exec → programs attached (`trace`), exec → daemon listening.
#[derive(Clone, Debug)]
pub(super) struct HostStart {
    pub trace_attached_ms: f64,
    pub daemon_listening_ms: f64,
}

/// Everything measured on one kernel: a VM kernel line (`6.1`, `6.12`) or `host`.
pub(super) struct KernelData {
    pub label: String,
    pub meta: BTreeMap<String, String>,
    /// Reaction latency samples (ms) per tier.
    pub latency: BTreeMap<String, Vec<f64>>,
    /// The daemon's share per tier: triggering event (or poll sample) → frame at the agent.
    pub event_to_frame: BTreeMap<String, Vec<f64>>,
    /// The kernel's (or poll period's) share per tier: crossing → triggering event.
    pub crossing_to_event: BTreeMap<String, Vec<f64>>,
    /// Requests that came before the measured ramp, per tier.
    pub early: BTreeMap<String, u64>,
    /// Ungranted ramps held above the threshold, per tier.
    pub holds: BTreeMap<String, Vec<Hold>>,
    /// Requests that arrived after a ramp's memory was freed, per tier (summed).
    pub after_release: BTreeMap<String, u64>,
    pub idle: BTreeMap<String, IdleSample>,
    pub startup_ms: BTreeMap<String, Vec<f64>>,
    pub overhead: Vec<OverheadRun>,
    pub bpf_cost: Vec<ProgramCost>,
    pub storm: Vec<StormRun>,
    pub host_start: Vec<HostStart>,
    pub managed: Vec<ManagedRun>,
}

/// One run of the managed-overhead part: a workload under one mode (`none`, `ebpf`,
/// `ebpf-guard`).
#[derive(Clone, Debug)]
pub(super) struct ManagedRun {
    pub mode: String,
    pub workload: String,
    pub secs: f64,
    pub psi_some_us: f64,
    pub psi_full_us: f64,
    pub high_events: f64,
    pub daemon_cpu_ms: f64,
    pub upscale_requests: f64,
}

/// Medians of the managed-overhead runs of one mode and workload.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ManagedSummary {
    pub mode: String,
    pub workload: String,
    pub n: usize,
    pub secs_p50: f64,
    pub psi_full_ms_p50: f64,
    pub psi_some_ms_p50: f64,
    /// Summed over the runs.
    pub high_events: f64,
    pub cpu_pct_p50: f64,
    pub upscale_requests: f64,
}

impl KernelData {
    /// Per (workload, mode) medians, in the order first measured.
    pub(super) fn managed_summary(&self) -> Vec<ManagedSummary> {
        let mut keys: Vec<(String, String)> = Vec::new();
        for m in &self.managed {
            let k = (m.workload.clone(), m.mode.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.sort();
        keys.into_iter()
            .map(|(workload, mode)| {
                let runs: Vec<&ManagedRun> = self
                    .managed
                    .iter()
                    .filter(|m| m.workload == workload && m.mode == mode)
                    .collect();
                let p50 = |f: &dyn Fn(&ManagedRun) -> f64| {
                    let v: Vec<f64> = runs.iter().map(|m| f(m)).collect();
                    percentile(&v, 50.0).unwrap_or(f64::NAN)
                };
                ManagedSummary {
                    n: runs.len(),
                    secs_p50: p50(&|m| m.secs),
                    psi_full_ms_p50: p50(&|m| m.psi_full_us / 1e3),
                    psi_some_ms_p50: p50(&|m| m.psi_some_us / 1e3),
                    high_events: runs.iter().map(|m| m.high_events).sum(),
                    cpu_pct_p50: p50(&|m| m.cpu_pct()),
                    upscale_requests: runs.iter().map(|m| m.upscale_requests).sum(),
                    mode,
                    workload,
                }
            })
            .collect()
    }
}

impl ManagedRun {
    /// Daemon CPU as a share of the workload's wall time, in percent.
    pub(super) fn cpu_pct(&self) -> f64 {
        self.daemon_cpu_ms / (self.secs * 1e3).max(1e-9) * 100.0
    }
}

impl KernelData {
    pub(super) fn is_host(&self) -> bool {
        self.label == "host"
    }

    /// The standard tiers, then any variant measured (e.g. `ebpf-c0`).
    pub(super) fn tiers(&self) -> Vec<String> {
        let mut t: Vec<String> = TIERS.iter().map(|s| (*s).to_owned()).collect();
        t.extend(
            self.latency
                .keys()
                .filter(|k| !TIERS.contains(&k.as_str()))
                .cloned(),
        );
        t
    }

    pub(super) fn load(label: &str, dir: &Path) -> Result<KernelData> {
        let meta = fs::read_to_string(dir.join("meta.txt"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut data = KernelData {
            label: label.to_owned(),
            meta,
            latency: BTreeMap::new(),
            event_to_frame: BTreeMap::new(),
            crossing_to_event: BTreeMap::new(),
            early: BTreeMap::new(),
            holds: BTreeMap::new(),
            after_release: BTreeMap::new(),
            idle: BTreeMap::new(),
            startup_ms: BTreeMap::new(),
            overhead: Vec::new(),
            bpf_cost: Vec::new(),
            storm: Vec::new(),
            host_start: Vec::new(),
            managed: Vec::new(),
        };
        for row in read_csv(&dir.join("latency.csv"))? {
            let tier = field(&row, "tier")?.to_owned();
            let ms: f64 = num(&row, "reaction_ms")?;
            let early: u64 = field(&row, "early_requests")?.parse()?;
            let e2f: f64 = num(&row, "event_to_frame_ms")?;
            data.latency.entry(tier.clone()).or_default().push(ms);
            data.event_to_frame
                .entry(tier.clone())
                .or_default()
                .push(e2f);
            data.crossing_to_event
                .entry(tier.clone())
                .or_default()
                .push(num(&row, "crossing_to_event_ms")?);
            // Columns added with the one-daemon latency part; older files have no holds.
            if row.get("mode").map(String::as_str) == Some("hold") {
                data.holds.entry(tier.clone()).or_default().push(Hold {
                    requests: num(&row, "hold_requests")?,
                    secs: num(&row, "hold_s")?,
                });
            }
            if row.contains_key("after_release") {
                *data.after_release.entry(tier.clone()).or_default() +=
                    field(&row, "after_release")?.parse::<u64>()?;
            }
            *data.early.entry(tier).or_default() += early;
        }
        for row in read_csv(&dir.join("idle.csv"))? {
            data.idle.insert(
                field(&row, "tier")?.to_owned(),
                IdleSample {
                    secs: num(&row, "seconds")?,
                    switches: num(&row, "voluntary_switches")?,
                    cpu_ms: num(&row, "cpu_ms")?,
                    rss_kib: num(&row, "rss_kib")?,
                },
            );
        }
        for row in read_csv(&dir.join("startup.csv"))? {
            let tier = field(&row, "tier")?.to_owned();
            let ms = num(&row, "startup_ms")?;
            data.startup_ms.entry(tier).or_default().push(ms);
        }
        for row in read_csv(&dir.join("overhead.csv"))? {
            data.overhead.push(OverheadRun {
                pair: field(&row, "pair")?.parse()?,
                attached: field(&row, "mode")? == "attached",
                secs: num(&row, "seconds")?,
                daemon_cpu_ms: num(&row, "daemon_cpu_ms")?,
            });
        }
        for row in read_csv(&dir.join("bpf-cost.csv"))? {
            data.bpf_cost.push(ProgramCost {
                jit: field(&row, "jit")?.to_owned(),
                program: field(&row, "program")?.to_owned(),
                runs: num(&row, "runs")?,
                run_time_ns: num(&row, "run_time_ns")?,
                variant: field(&row, "variant")?.to_owned(),
            });
        }
        for row in read_csv(&dir.join("storm.csv"))? {
            data.storm.push(StormRun {
                variant: field(&row, "variant")?.to_owned(),
                tasks: field(&row, "tasks")?.parse()?,
                secs: num(&row, "seconds")?,
                seen: num(&row, "seen")?,
                emitted: num(&row, "emitted")?,
                coalesced: num(&row, "coalesced")?,
                dropped: num(&row, "dropped")?,
                delivered: num(&row, "delivered")?,
                daemon_cpu_ms: num(&row, "daemon_cpu_ms")?,
                rss_first_kib: num(&row, "rss_first_kib")?,
                rss_end_kib: num(&row, "rss_end_kib")?,
                rss_peak_kib: num(&row, "rss_peak_kib")?,
            });
        }
        for row in read_csv(&dir.join("managed.csv"))? {
            data.managed.push(ManagedRun {
                mode: field(&row, "mode")?.to_owned(),
                workload: field(&row, "workload")?.to_owned(),
                secs: num(&row, "seconds")?,
                psi_some_us: num(&row, "psi_some_us")?,
                psi_full_us: num(&row, "psi_full_us")?,
                high_events: num(&row, "high_events")?,
                daemon_cpu_ms: num(&row, "daemon_cpu_ms")?,
                upscale_requests: num(&row, "upscale_requests")?,
            });
        }
        for row in read_csv(&dir.join("host-startup.csv"))? {
            data.host_start.push(HostStart {
                trace_attached_ms: num(&row, "trace_attached_ms")?,
                daemon_listening_ms: num(&row, "daemon_listening_ms")?,
            });
        }
        Ok(data)
    }

    pub(super) fn stats(&self, tier: &str) -> Option<Stats> {
        Stats::of(self.latency.get(tier)?)
    }

    /// Requests per second of each hold of `tier` that saw a further request; `None` if the
    /// tier had no ungranted ramps.
    pub(super) fn hold_rates(&self, tier: &str) -> Option<Vec<f64>> {
        let holds = self.holds.get(tier)?;
        Some(holds.iter().filter_map(Hold::rate).collect())
    }

    pub(super) fn e2f_stats(&self, tier: &str) -> Option<Stats> {
        Stats::of(self.event_to_frame.get(tier)?)
    }

    pub(super) fn c2e_stats(&self, tier: &str) -> Option<Stats> {
        Stats::of(self.crossing_to_event.get(tier)?)
    }

    /// Slowdown of each pair in %: attached ÷ detached − 1 (pairs measured side by side, so a
    /// drift of the machine between pairs cancels out).
    pub(super) fn pair_slowdowns_pct(&self) -> Vec<f64> {
        let mut pairs: BTreeMap<u64, (Option<f64>, Option<f64>)> = BTreeMap::new();
        for r in &self.overhead {
            let e = pairs.entry(r.pair).or_default();
            if r.attached {
                e.1 = Some(r.secs);
            } else {
                e.0 = Some(r.secs);
            }
        }
        pairs
            .values()
            .filter_map(|(d, a)| Some((a.as_ref()? / d.as_ref()? - 1.0) * 100.0))
            .collect()
    }

    pub(super) fn overhead_secs(&self, attached: bool) -> Vec<f64> {
        self.overhead
            .iter()
            .filter(|r| r.attached == attached)
            .map(|r| r.secs)
            .collect()
    }

    /// JIT modes measured, with the total runs and the mean cost per run over all programs,
    /// for the first workload measured in that mode.
    pub(super) fn cost_per_run(&self) -> Vec<CostSummary> {
        let mut out: Vec<CostSummary> = Vec::new();
        for c in &self.bpf_cost {
            let key = (c.jit.clone(), c.variant.clone());
            match out
                .iter_mut()
                .find(|s| (s.jit.clone(), s.variant.clone()) == key)
            {
                Some(s) => {
                    s.runs += c.runs;
                    s.run_time_ns += c.run_time_ns;
                }
                None => out.push(CostSummary {
                    jit: c.jit.clone(),
                    variant: c.variant.clone(),
                    runs: c.runs,
                    run_time_ns: c.run_time_ns,
                }),
            }
        }
        out
    }
}

/// All programs' cost in one JIT mode on one workload.
#[derive(Clone, Debug)]
pub(super) struct CostSummary {
    pub jit: String,
    pub variant: String,
    pub runs: f64,
    pub run_time_ns: f64,
}

impl CostSummary {
    pub(super) fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0.0).then(|| self.run_time_ns / self.runs)
    }
}

type Row = BTreeMap<String, String>;

/// Rows of a CSV written by a driver (no embedded commas except in the quoted last field);
/// none if the file is absent (that part was not run).
fn read_csv(path: &Path) -> Result<Vec<Row>> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    Ok(parse_csv(&text))
}

fn parse_csv(text: &str) -> Vec<Row> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let names: Vec<&str> = header.split(',').collect();
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            // The last column may be a quoted string with commas: split only as often as needed.
            let values = l.splitn(names.len(), ',');
            names
                .iter()
                .zip(values)
                .map(|(n, v)| ((*n).to_owned(), v.trim_matches('"').to_owned()))
                .collect()
        })
        .collect()
}

fn field<'a>(row: &'a Row, name: &str) -> Result<&'a str> {
    row.get(name)
        .map(String::as_str)
        .with_context(|| format!("CSV row without {name}: {row:?}"))
}

fn num(row: &Row, name: &str) -> Result<f64> {
    let v = field(row, name)?;
    v.parse()
        .with_context(|| format!("{name} = {v:?} is not a number"))
}

/// Percentile `p` (0..=100) by linear interpolation between closest ranks; `None` if empty.
pub(super) fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

/// `a ÷ b`, `None` when undefined. `b` is clamped to 1 ms (the resolution these latencies are
/// reported with) so a tiny or negative divisor gives a lower bound instead of exploding.
pub(super) fn ratio(a: f64, b: f64) -> Option<f64> {
    const FLOOR_MS: f64 = 1.0;
    (a.is_finite() && b.is_finite()).then(|| a / b.max(FLOOR_MS))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

impl Stats {
    pub(super) fn of(samples: &[f64]) -> Option<Stats> {
        Some(Stats {
            n: samples.len(),
            min: percentile(samples, 0.0)?,
            p50: percentile(samples, 50.0)?,
            p90: percentile(samples, 90.0)?,
            max: percentile(samples, 100.0)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&v, 100.0), Some(5.0));
        assert_eq!(percentile(&v, 90.0), Some(4.6));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.5));
        assert_eq!(percentile(&[7.0], 90.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[f64::NAN, 2.0], 50.0), Some(2.0));
    }

    #[test]
    fn ratios_clamp_the_divisor_to_a_millisecond() {
        assert_eq!(ratio(100.0, 2.0), Some(50.0));
        assert_eq!(ratio(100.0, 0.25), Some(100.0));
        assert_eq!(ratio(100.0, -3.0), Some(100.0));
        assert_eq!(ratio(f64::NAN, 2.0), None);
    }

    #[test]
    fn stats_of_samples() {
        let s = Stats::of(&[10.0, 20.0, 30.0]).unwrap();
        assert_eq!((s.n, s.min, s.p50, s.max), (3, 10.0, 20.0, 30.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn csv_keeps_commas_in_the_quoted_last_field() {
        let rows = parse_csv("a,b,c\n1,2,\"x, y\"\n\n");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["c"], "x, y");
        assert_eq!(rows[0]["a"], "1");
    }

    #[test]
    fn held_ramps_give_a_rate_and_releases_add_up() {
        let dir = std::env::temp_dir().join(format!("xtask-holds-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("latency.csv"),
            "kernel,block,tier,ramp,mode,reaction_ms,crossing_to_event_ms,event_to_frame_ms,reading_mib,early_requests,hold_s,hold_requests,after_release,trigger\n\
             6.1,0,ebpf,1,grant,5,1,4,786,0,0,0,1,\"x\"\n\
             6.1,0,ebpf,2,hold,6,1,5,786,0,3.2,3,0,\"x\"\n\
             6.1,0,ebpf,3,hold,6,1,5,786,0,0,0,0,\"x\"\n",
        )
        .unwrap();
        let d = KernelData::load("6.1", &dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(d.holds["ebpf"].len(), 2);
        // The hold without a further request has no rate.
        assert_eq!(d.hold_rates("ebpf"), Some(vec![3.0 / 3.2]));
        assert_eq!(d.after_release["ebpf"], 1);
        assert_eq!(d.hold_rates("poll"), None);
        assert_eq!(d.stats("ebpf").unwrap().n, 3);
    }

    #[test]
    fn idle_rates() {
        let i = IdleSample {
            secs: 10.0,
            switches: 2.0,
            cpu_ms: 5.0,
            rss_kib: 0.0,
        };
        assert_eq!(i.wakeups_per_s(), 0.2);
        assert_eq!(i.cpu_ms_per_s(), 0.5);
    }

    fn data_with(overhead: Vec<OverheadRun>) -> KernelData {
        let mut d = KernelData::load("6.12", Path::new("/nonexistent")).unwrap();
        d.overhead = overhead;
        d
    }

    #[test]
    fn managed_summary_groups_by_workload_and_mode() {
        let run = |mode: &str, workload: &str, secs, full_us, high, cpu_ms| ManagedRun {
            mode: mode.into(),
            workload: workload.into(),
            secs,
            psi_some_us: full_us * 2.0,
            psi_full_us: full_us,
            high_events: high,
            daemon_cpu_ms: cpu_ms,
            upscale_requests: 0.0,
        };
        let mut d = data_with(Vec::new());
        d.managed = vec![
            run("none", "read", 10.0, 0.0, 0.0, 0.0),
            run("ebpf", "read", 10.0, 0.0, 0.0, 20.0),
            run("ebpf-guard", "read", 12.0, 2e6, 800.0, 900.0),
            run("ebpf", "read", 20.0, 0.0, 0.0, 20.0),
            run("ebpf-guard", "read", 14.0, 4e6, 900.0, 1100.0),
        ];
        let s = d.managed_summary();
        assert_eq!(s.len(), 3);
        let guard = s.iter().find(|m| m.mode == "ebpf-guard").unwrap();
        assert_eq!(
            (guard.n, guard.secs_p50, guard.high_events),
            (2, 13.0, 1700.0)
        );
        assert_eq!(guard.psi_full_ms_p50, 3000.0);
        let ebpf = s.iter().find(|m| m.mode == "ebpf").unwrap();
        // 20 ms of 10 s and of 20 s: 0.2 % and 0.1 %, median 0.15 %.
        assert!((ebpf.cpu_pct_p50 - 0.15).abs() < 1e-9, "{ebpf:?}");
    }

    #[test]
    fn slowdowns_pair_attached_with_detached_runs_of_the_same_pair() {
        let run = |pair, attached, secs| OverheadRun {
            pair,
            attached,
            secs,
            daemon_cpu_ms: 0.0,
        };
        let d = data_with(vec![
            run(1, false, 10.0),
            run(1, true, 10.5),
            run(2, true, 20.0),
            run(2, false, 20.0),
            // An incomplete pair (the run was cut short) is left out.
            run(3, false, 9.0),
        ]);
        let s = d.pair_slowdowns_pct();
        assert_eq!(s.len(), 2);
        assert!((s[0] - 5.0).abs() < 1e-9, "{s:?}");
        assert!(s[1].abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn cost_per_run_sums_programs_per_jit_mode() {
        let mut d = data_with(Vec::new());
        let cost = |jit: &str, program: &str, runs, ns| ProgramCost {
            jit: jit.into(),
            program: program.into(),
            runs,
            run_time_ns: ns,
            variant: "overhead".into(),
        };
        d.bpf_cost = vec![
            cost("on", "a", 100.0, 10_000.0),
            cost("on", "b", 100.0, 30_000.0),
            cost("off", "a", 50.0, 25_000.0),
            cost("off", "b", 0.0, 0.0),
        ];
        let c = d.cost_per_run();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].jit, "on");
        assert_eq!(c[0].ns_per_run(), Some(200.0));
        assert_eq!(c[1].ns_per_run(), Some(500.0));
    }

    #[test]
    fn storm_accounting_needs_every_hit_and_record() {
        let mut s = StormRun {
            variant: "ebpf".into(),
            tasks: 8,
            secs: 10.0,
            seen: 100.0,
            emitted: 60.0,
            coalesced: 30.0,
            dropped: 10.0,
            delivered: 60.0,
            daemon_cpu_ms: 200.0,
            rss_first_kib: 1000.0,
            rss_end_kib: 1100.0,
            rss_peak_kib: 1200.0,
        };
        assert!(s.accounted());
        assert_eq!(s.cpu_pct(), 2.0);
        assert_eq!(s.rss_growth_kib(), 200.0);
        s.delivered = 59.0;
        assert!(!s.accounted(), "a record lost between ring and consumer");
        s.delivered = 60.0;
        s.seen = 101.0;
        assert!(
            !s.accounted(),
            "a hit neither emitted, coalesced nor dropped"
        );
    }
}
