//! `target/bench/report.md` and `summary.json` from the loaded samples: every number with
//! its spread, the ratios, and each target marked met / not met with the reason.

use std::fmt::Write as _;
use std::fs;
use std::time::Duration;

use serde_json::{Value, json};

use super::data::{IdleSample, KernelData, Stats, percentile, ratio};

/// The project's performance targets.
pub(super) const LATENCY_RATIO_TARGET: f64 = 50.0;
pub(super) const IDLE_WAKEUPS_TARGET: f64 = 0.3;
pub(super) const OVERHEAD_PCT_TARGET: f64 = 2.0;
pub(super) const STORM_CPU_PCT_TARGET: f64 = 2.0;
/// "RSS stays flat": the storm's peak at most this far above its first sample.
pub(super) const STORM_RSS_GROWTH_KIB: f64 = 2048.0;
pub(super) const IDLE_RSS_MIB_TARGET: f64 = 20.0;
/// Requests per second while held above the threshold without a grant: the 1 s rate limit,
/// less what a reading and a frame add per round (Neon's polling monitor: ~0.9/s).
pub(super) const HELD_RATE_MIN_PER_S: f64 = 0.8;
pub(super) const HELD_RATE_MAX_PER_S: f64 = 1.05;
/// The fake agent's health-check period (the real agent's default).
const HEALTH_INTERVAL_S: f64 = 5.0;

pub(super) struct HostInfo {
    pub release: String,
    pub cpu: String,
    pub cpus: usize,
}

impl HostInfo {
    pub(super) fn read() -> HostInfo {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostInfo {
            release: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    }
}

/// How the bench was run, for the report's header.
pub(super) struct RunInfo {
    pub command: String,
    pub ramps: u64,
    pub idle_secs: u64,
    pub pairs: u64,
    pub storm_secs: u64,
    pub storm_tasks: u64,
    pub took: Duration,
}

fn stats_json(s: Stats) -> Value {
    json!({"n": s.n, "min": s.min, "p50": s.p50, "p90": s.p90, "max": s.max})
}

pub(super) fn summary_json(runs: &[KernelData]) -> Value {
    let mut root = serde_json::Map::new();
    for d in runs {
        let mut k = serde_json::Map::new();
        if !d.is_host() {
            for tier in d.tiers() {
                let tier = tier.as_str();
                let mut t = serde_json::Map::new();
                if let Some(s) = d.stats(tier) {
                    t.insert("latency_ms".into(), stats_json(s));
                }
                if let Some(s) = d.e2f_stats(tier) {
                    t.insert("event_to_frame_ms".into(), stats_json(s));
                }
                if let Some(i) = d.idle.get(tier) {
                    t.insert(
                        "idle".into(),
                        json!({
                            "seconds": i.secs,
                            "wakeups_per_s": i.wakeups_per_s(),
                            "cpu_ms_per_s": i.cpu_ms_per_s(),
                            "rss_kib": i.rss_kib,
                        }),
                    );
                }
                if let Some(p) = d.startup_ms.get(tier).and_then(|v| percentile(v, 50.0)) {
                    t.insert("startup_ms_p50".into(), json!(p));
                }
                if let Some(rates) = d.hold_rates(tier) {
                    t.insert(
                        "held_requests_per_s".into(),
                        Stats::of(&rates).map_or(Value::Null, stats_json),
                    );
                    t.insert(
                        "requests_after_release".into(),
                        json!(d.after_release.get(tier).copied().unwrap_or(0)),
                    );
                }
                if !t.is_empty() {
                    k.insert(tier.into(), Value::Object(t));
                }
            }
            if let (Some(e), Some(p)) = (d.stats("ebpf"), d.stats("poll")) {
                k.insert(
                    "ratios".into(),
                    json!({
                        "poll_p50_over_ebpf_p50": ratio(p.p50, e.p50),
                        "psi_p50_over_ebpf_p50": d.stats("psi").and_then(|s| ratio(s.p50, e.p50)),
                    }),
                );
            }
        }
        if let Some(s) = Stats::of(&d.pair_slowdowns_pct()) {
            k.insert(
                "overhead".into(),
                json!({
                    "pairs": s.n,
                    "slowdown_pct": stats_json(s),
                    "detached_s_p50": percentile(&d.overhead_secs(false), 50.0),
                    "attached_s_p50": percentile(&d.overhead_secs(true), 50.0),
                }),
            );
        }
        let costs = d.cost_per_run();
        if !costs.is_empty() {
            k.insert(
                "bpf_cost".into(),
                costs
                    .iter()
                    .map(|c| {
                        (
                            format!("jit_{}_{}", c.jit, c.variant),
                            json!({"runs": c.runs, "ns_per_run": c.ns_per_run()}),
                        )
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            );
        }
        if !d.storm.is_empty() {
            k.insert(
                "storm".into(),
                d.storm
                    .iter()
                    .map(|s| {
                        (
                            s.variant.clone(),
                            json!({
                                "tasks": s.tasks,
                                "seconds": s.secs,
                                "events_per_s": s.seen / s.secs,
                                "records_per_s": s.delivered / s.secs,
                                "coalesced": s.coalesced,
                                "dropped": s.dropped,
                                "accounted": s.accounted(),
                                "cpu_pct": s.cpu_pct(),
                                "rss_first_kib": s.rss_first_kib,
                                "rss_peak_kib": s.rss_peak_kib,
                                "rss_end_kib": s.rss_end_kib,
                            }),
                        )
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            );
        }
        if !d.host_start.is_empty() {
            let attached: Vec<f64> = d.host_start.iter().map(|h| h.trace_attached_ms).collect();
            let listening: Vec<f64> = d.host_start.iter().map(|h| h.daemon_listening_ms).collect();
            k.insert(
                "startup".into(),
                json!({
                    "programs_attached_ms": Stats::of(&attached).map(stats_json),
                    "daemon_listening_ms": Stats::of(&listening).map(stats_json),
                }),
            );
        }
        let managed = d.managed_summary();
        if !managed.is_empty() {
            let rows: Vec<Value> = managed
                .iter()
                .map(|m| {
                    json!({
                        "mode": m.mode, "workload": m.workload, "n": m.n,
                        "seconds_p50": m.secs_p50,
                        "psi_full_ms_p50": m.psi_full_ms_p50,
                        "psi_some_ms_p50": m.psi_some_ms_p50,
                        "memory_events_high": m.high_events,
                        "daemon_cpu_pct_p50": m.cpu_pct_p50,
                        "upscale_requests": m.upscale_requests,
                    })
                })
                .collect();
            k.insert("managed".into(), Value::Array(rows));
        }
        root.insert(d.label.clone(), Value::Object(k));
    }
    Value::Object(root)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// The headline table (Markdown): latency and idle cost per VM kernel and tier.
pub(super) fn summary_table(runs: &[KernelData]) -> String {
    let mut t = String::new();
    t.push_str(
        "| kernel | tier | n | latency p50 ms | p90 ms | max ms | ÷ ebpf p50 | idle wakeups/s | idle CPU ms/s | RSS MiB |\n",
    );
    t.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for d in runs.iter().filter(|d| !d.is_host()) {
        let ebpf = d.stats("ebpf");
        for tier in d.tiers() {
            let tier = tier.as_str();
            let s = d.stats(tier);
            let i = d.idle.get(tier);
            if s.is_none() && i.is_none() {
                continue;
            }
            let _ = writeln!(
                t,
                "| {} | {tier} | {} | {} | {} | {} | {} | {} | {} | {} |",
                d.label,
                s.map_or(0, |s| s.n),
                fmt_opt(s.map(|s| s.p50), 1),
                fmt_opt(s.map(|s| s.p90), 1),
                fmt_opt(s.map(|s| s.max), 1),
                fmt_opt(s.zip(ebpf).and_then(|(s, e)| ratio(s.p50, e.p50)), 1),
                fmt_opt(i.map(IdleSample::wakeups_per_s), 2),
                fmt_opt(i.map(IdleSample::cpu_ms_per_s), 2),
                fmt_opt(i.map(|i| i.rss_kib / 1024.0), 1),
            );
        }
    }
    t
}

/// Second headline table: overhead, program cost, storm, per kernel.
pub(super) fn cost_table(runs: &[KernelData]) -> String {
    let mut t = String::new();
    t.push_str("| kernel | workload slowdown p50 % (min … max) | program ns/run JIT on | JIT off | storm events/s → records/s | storm CPU % | storm RSS first → peak MiB | drops |\n");
    t.push_str("|---|---|---|---|---|---|---|---|\n");
    for d in runs {
        let slow = Stats::of(&d.pair_slowdowns_pct());
        let costs = d.cost_per_run();
        let cost = |jit: &str| {
            costs
                .iter()
                .find(|c| c.jit == jit)
                .and_then(|c| c.ns_per_run())
        };
        let storm = d.storm.iter().find(|s| s.variant == "ebpf");
        if slow.is_none() && costs.is_empty() && storm.is_none() {
            continue;
        }
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            d.label,
            slow.map_or("–".into(), |s| format!(
                "{:+.2} ({:+.2} … {:+.2})",
                s.p50, s.min, s.max
            )),
            fmt_opt(cost("on"), 0),
            fmt_opt(cost("off"), 0),
            storm.map_or("–".into(), |s| format!(
                "{:.0} → {:.0}",
                s.seen / s.secs,
                s.delivered / s.secs
            )),
            fmt_opt(storm.map(|s| s.cpu_pct()), 2),
            storm.map_or("–".into(), |s| format!(
                "{:.1} → {:.1}",
                s.rss_first_kib / 1024.0,
                s.rss_peak_kib / 1024.0
            )),
            storm.map_or("–".into(), |s| format!("{:.0}", s.dropped)),
        );
    }
    t
}

/// Why the latency ratio falls short: where the ebpf tier's time goes.
fn ratio_reason(d: &KernelData) -> String {
    let (Some(e), Some(c), Some(f)) = (d.stats("ebpf"), d.c2e_stats("ebpf"), d.e2f_stats("ebpf"))
    else {
        return String::new();
    };
    format!(
        "; ebpf p50 {:.1} ms splits into crossing → the kernel event that triggered the decision p50 {:.1} ms (the kernel's share) and event → frame at the agent p50 {:.1} ms (the daemon's share: ring buffer wake-up, memory.stat read, decision, websocket write, all on the emulated CPU)",
        e.p50, c.p50, f.p50
    )
}

/// Run-to-run noise of repeated identical runs: half their range relative to the median, %.
fn noise_pct(runs: &[f64]) -> Option<f64> {
    let s = Stats::of(runs)?;
    (s.n >= 2 && s.p50 > 0.0).then(|| (s.max - s.min) / 2.0 / s.p50 * 100.0)
}

/// One target's verdict line.
fn verdict(met: Option<bool>, what: &str, detail: &str) -> String {
    let mark = match met {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "**not measured**",
    };
    format!("- {mark}: {what} — {detail}\n")
}

pub(super) fn report_md(runs: &[KernelData], host: &HostInfo, info: &RunInfo) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "# vm-monitor benchmark\n");
    let _ = writeln!(
        r,
        "Command: `{}`: {} ramps per tier per kernel (blocks of up to 5, tiers rotating between blocks, one VM boot per kernel), {} s idle per tier, {} overhead pairs, {} s storms with {} tasks; took {:.0} s. Release builds of `vm-monitor` and the drivers.\n",
        info.command,
        info.ramps,
        info.idle_secs,
        info.pairs,
        info.storm_secs,
        info.storm_tasks,
        info.took.as_secs_f64()
    );
    let _ = writeln!(r, "## Machine\n");
    let _ = writeln!(
        r,
        "- host: Linux {}, {} ({} CPUs)",
        host.release, host.cpu, host.cpus
    );
    for d in runs {
        let m = |k: &str| d.meta.get(k).cloned().unwrap_or_else(|| "?".into());
        if d.is_host() {
            let _ = writeln!(
                r,
                "- host kernel runs: Linux {}, bpf_jit_enable={} (left as the machine has it), cgroup v1 memory controller (so `vm-monitor trace` instead of the daemon, see Method)",
                m("release"),
                m("bpf_jit_enable")
            );
        } else {
            let _ = writeln!(
                r,
                "- guest {}: Linux {}, {} vCPUs, {} MiB, bpf_jit_enable={}{}",
                d.label,
                m("release"),
                m("cpus"),
                m("memtotal_mib"),
                m("bpf_jit_enable"),
                if d.bpf_cost.iter().any(|c| c.jit == "off") {
                    " (switched off and back for the JIT-off cost run)"
                } else {
                    ""
                }
            );
        }
    }
    let _ = writeln!(
        r,
        "- qemu TCG (no KVM): guest instructions are emulated, absolute times are several times slower and noisier than on hardware; compare ratios.\n"
    );
    let _ = writeln!(
        r,
        "## Summary\n\n{}\n{}",
        summary_table(runs),
        cost_table(runs)
    );
    targets(&mut r, runs);
    method(&mut r);
    details(&mut r, runs);
    r
}

fn targets(r: &mut String, runs: &[KernelData]) {
    let _ = writeln!(r, "## Targets\n");
    for d in runs.iter().filter(|d| !d.is_host()) {
        let k = d.label.as_str();
        let (e, p) = (d.stats("ebpf"), d.stats("poll"));
        let ratio_pe = e.zip(p).and_then(|(e, p)| ratio(p.p50, e.p50));
        r.push_str(&verdict(
            ratio_pe.map(|x| x >= LATENCY_RATIO_TARGET),
            &format!("{k}: ebpf p50 ≥ {LATENCY_RATIO_TARGET}× lower than poll p50"),
            &match (e, p, ratio_pe) {
                (Some(e), Some(p), Some(x)) => format!(
                    "poll p50 {:.1} ms ÷ ebpf p50 {:.2} ms = {x:.1}×{}",
                    p.p50,
                    e.p50,
                    if x < LATENCY_RATIO_TARGET {
                        ratio_reason(d)
                    } else {
                        String::new()
                    }
                ),
                _ => "missing samples".into(),
            },
        ));
        if let (Some(on), Some(off)) = (e, d.stats("ebpf-nagle")) {
            // Not a target, a before/after: `ebpf-nagle` is the daemon with Nagle left on.
            let _ = writeln!(
                r,
                "- {k}: TCP_NODELAY — ebpf p50 / p90 / max {:.1} / {:.1} / {:.1} ms with it (as shipped), {:.1} / {:.1} / {:.1} ms without (`ebpf-nagle`, n = {} / {})",
                on.p50, on.p90, on.max, off.p50, off.p90, off.max, on.n, off.n
            );
        }
        for tier in d.tiers() {
            let Some(rates) = d.hold_rates(&tier) else {
                continue;
            };
            let held = d.holds.get(&tier).map_or(0, Vec::len);
            let after = d.after_release.get(&tier).copied().unwrap_or(0);
            let s = Stats::of(&rates);
            r.push_str(&verdict(
                Some(
                    rates.len() == held
                        && s.is_some_and(|s| {
                            s.min >= HELD_RATE_MIN_PER_S && s.max <= HELD_RATE_MAX_PER_S
                        }),
                ),
                &format!(
                    "{k}: {tier}: held above the threshold with no grant, UpscaleRequests keep coming at the rate limit ({HELD_RATE_MIN_PER_S}–{HELD_RATE_MAX_PER_S}/s in every hold; the limit is 1/s)"
                ),
                &s.map_or("no hold had a second request".into(), |s| {
                    format!(
                        "{} of {held} holds repeated; {:.2}/s p50 ({:.2} … {:.2}); {after} request(s) after the releases of all ramps",
                        rates.len(),
                        s.p50,
                        s.min,
                        s.max
                    )
                }),
            ));
        }
        r.push_str(&verdict(
            e.zip(p).map(|(e, p)| e.max < p.p50),
            &format!("{k}: ebpf max below poll p50"),
            &e.zip(p).map_or("missing samples".into(), |(e, p)| {
                format!("ebpf max {:.1} ms vs poll p50 {:.1} ms", e.max, p.p50)
            }),
        ));
        let idle = d.idle.get("ebpf");
        r.push_str(&verdict(
            idle.map(|i| i.wakeups_per_s() <= IDLE_WAKEUPS_TARGET),
            &format!("{k}: ebpf idle wake-ups ≤ {IDLE_WAKEUPS_TARGET}/s"),
            &idle.map_or("missing samples".into(), |i| {
                format!(
                    "{:.0} voluntary switches in {:.1} s = {:.2}/s, {:.1} per agent health check (one every {HEALTH_INTERVAL_S} s; poll: {}/s)",
                    i.switches,
                    i.secs,
                    i.wakeups_per_s(),
                    i.switches / (i.secs / HEALTH_INTERVAL_S).max(1.0),
                    fmt_opt(d.idle.get("poll").map(IdleSample::wakeups_per_s), 2)
                )
            }),
        ));
        r.push_str(&verdict(
            idle.map(|i| i.rss_kib / 1024.0 < IDLE_RSS_MIB_TARGET),
            &format!("{k}: ebpf daemon idle RSS < {IDLE_RSS_MIB_TARGET} MiB"),
            &idle.map_or("missing samples".into(), |i| {
                format!("{:.1} MiB", i.rss_kib / 1024.0)
            }),
        ));
        let early: u64 = d.early.values().sum();
        if early > 0 {
            let _ = writeln!(
                r,
                "- note {k}: {early} UpscaleRequest(s) arrived before a measured ramp (below the threshold) and were not counted: {:?}",
                d.early
            );
        }
    }
    for d in runs {
        let k = d.label.as_str();
        let slow = Stats::of(&d.pair_slowdowns_pct());
        let noise = noise_pct(&d.overhead_secs(false));
        let what = format!(
            "{k}: reclaim-heavy workload slowdown < {OVERHEAD_PCT_TARGET} % with the monitor attached"
        );
        match (slow, noise) {
            (Some(s), Some(noise)) if noise > OVERHEAD_PCT_TARGET && s.p50 < noise => {
                let _ = writeln!(
                    r,
                    "- **inconclusive**: {what} — p50 {:+.2} % over {} pairs (min {:+.2} %, max {:+.2} %), but the detached runs alone vary by ±{noise:.1} %, more than the effect to resolve",
                    s.p50, s.n, s.min, s.max
                );
            }
            _ => r.push_str(&verdict(
                slow.map(|s| s.p50 < OVERHEAD_PCT_TARGET),
                &what,
                &slow.map_or("not run".into(), |s| {
                    format!(
                        "p50 {:+.2} % over {} pairs (min {:+.2} %, max {:+.2} %; detached runs vary by ±{})",
                        s.p50,
                        s.n,
                        s.min,
                        s.max,
                        fmt_opt(noise, 1) + " %"
                    )
                }),
            )),
        }
        let costs = d.cost_per_run();
        let modes: Vec<String> = costs
            .iter()
            .map(|c| {
                format!(
                    "JIT {} on {}: {} ns/run over {:.0} runs",
                    c.jit,
                    c.variant,
                    fmt_opt(c.ns_per_run(), 0),
                    c.runs
                )
            })
            .collect();
        let both = costs.iter().any(|c| c.jit == "on") && costs.iter().any(|c| c.jit == "off");
        r.push_str(&verdict(
            if costs.is_empty() {
                None
            } else {
                Some(both || d.is_host())
            },
            &format!(
                "{k}: per-run program cost reported{}",
                if d.is_host() {
                    " (host: the machine's JIT setting only; it is not ours to switch)"
                } else {
                    " for JIT on and off"
                }
            ),
            &if modes.is_empty() {
                "not run".into()
            } else {
                modes.join("; ")
            },
        ));
        for s in &d.storm {
            let ok = s.cpu_pct() < STORM_CPU_PCT_TARGET
                && s.rss_growth_kib() <= STORM_RSS_GROWTH_KIB
                && s.accounted();
            r.push_str(&verdict(
                Some(ok),
                &format!(
                    "{k}: storm ({}) under {STORM_CPU_PCT_TARGET} % of a core, RSS flat, every drop counted",
                    s.variant
                ),
                &format!(
                    "{:.2} % CPU, RSS {:.1} → peak {:.1} MiB, {:.0} hits = {:.0} emitted + {:.0} coalesced + {:.0} dropped, {:.0} records delivered{}",
                    s.cpu_pct(),
                    s.rss_first_kib / 1024.0,
                    s.rss_peak_kib / 1024.0,
                    s.seen,
                    s.emitted,
                    s.coalesced,
                    s.dropped,
                    s.delivered,
                    if d.is_host() {
                        " (host: `vm-monitor trace --json`, which also prints every record)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let managed = d.managed_summary();
        let none_workloads: Vec<&str> = managed
            .iter()
            .filter(|m| m.mode == "none")
            .map(|m| m.workload.as_str())
            .collect();
        for w in none_workloads {
            let of = |mode: &str| managed.iter().find(|m| m.mode == mode && m.workload == w);
            let (Some(none), Some(shipped)) = (of("none"), of("ebpf")) else {
                continue;
            };
            // "Within noise": the daemon's median stall no more than the no-daemon median
            // plus 10 ms (PSI's own resolution under TCG is a few ms).
            let stall_ok = shipped.psi_full_ms_p50 <= none.psi_full_ms_p50 + 10.0;
            r.push_str(&verdict(
                Some(stall_ok && shipped.high_events == 0.0),
                &format!("{k}: {w}: no stall and no memory.events high added by the daemon as shipped"),
                &format!(
                    "PSI full p50 {:.1} ms vs {:.1} ms without a daemon; memory.events high {:.0} (guard: {})",
                    shipped.psi_full_ms_p50,
                    none.psi_full_ms_p50,
                    shipped.high_events,
                    of("ebpf-guard").map_or("not measured".to_string(), |g| format!(
                        "{:.1} ms full, {:.0} high events",
                        g.psi_full_ms_p50, g.high_events
                    ))
                ),
            ));
            r.push_str(&verdict(
                Some(shipped.cpu_pct_p50 <= 1.0),
                &format!("{k}: {w}: daemon CPU ≤ 1 % of the workload's wall time"),
                &format!(
                    "{:.2} % p50 over {} runs ({:.2} s wall p50 vs {:.2} s without a daemon)",
                    shipped.cpu_pct_p50, shipped.n, shipped.secs_p50, none.secs_p50
                ),
            ));
        }
        if !d.host_start.is_empty() {
            let attached: Vec<f64> = d.host_start.iter().map(|h| h.trace_attached_ms).collect();
            let listening: Vec<f64> = d.host_start.iter().map(|h| h.daemon_listening_ms).collect();
            r.push_str(&verdict(
                Some(true),
                &format!("{k}: exec → ready reported"),
                &format!(
                    "programs attached p50 {} ms (max {}), daemon listening p50 {} ms (max {}), over {} starts",
                    fmt_opt(percentile(&attached, 50.0), 1),
                    fmt_opt(percentile(&attached, 100.0), 1),
                    fmt_opt(percentile(&listening, 50.0), 1),
                    fmt_opt(percentile(&listening, 100.0), 1),
                    attached.len()
                ),
            ));
        }
    }
    r.push('\n');
}

fn method(r: &mut String) {
    let _ = writeln!(r, "## Method\n");
    r.push_str(
        "- **Reaction latency** (VM): the daemon runs without `--pgconnstr` (no Postgres: the file cache plays no part in the upscale trigger). One daemon and one fake-agent connection (announcing 1 CU) per block of ramps, nothing restarted between ramps (the `starts` column counts blocks). Per ramp a fresh memhog pre-grows anonymous memory to 96 MiB below the upscale threshold, then grows 4 MiB every 20 ms to 32 MiB past it. The crossing is timestamped by the workload itself: swap is off for the cgroup, so its anonymous memory only grows and the memhog stamps (CLOCK_BOOTTIME) the page fault that brings non-reclaimable memory to the threshold; the end is the `UpscaleRequest` frame handled by the fake agent's reader (CLOCK_BOOTTIME, stamped before any hop to another task). The memhog maps its memory with `MADV_NOHUGEPAGE`: with transparent huge pages (`always` on Debian's kernels) usage would run up to 2 MiB ahead of the touches and the stamp would be off by up to one growth step. Nothing polls during the measurement. Ramps alternate between two agents' behaviours: *grant* (2 CU at once, then the memory is freed and the agent scales back to 1 CU through DownscaleRequests) and *hold* (the agent never answers; the memory stays above the threshold for 4 s after the first request, further requests are counted: held requests/s = further requests ÷ time from the first to the last). After each release 1.5 s pass and any request that still arrives is counted (`after release`). Event → frame: the decision's timestamp (the kernel event or poll sample that triggered it, CLOCK_BOOTTIME) to the frame's arrival.\n",
    );
    r.push_str(
        "- **Managed overhead** (VM): the daemon as shipped (ebpf, agent connected at 1 CU, memory.high as shipped), the same with `--memory-high-guard`, and no daemon, rotating per round; workloads that keep non-reclaimable memory below the threshold: a read of a sparse file 1.5 × the threshold from a loop-mounted ext4 (page cache dropped before each run) and an anonymous ramp (4 MiB every 20 ms) to 64 MiB below the threshold, then freed. Per run: wall time, the cgroup's `memory.pressure` some/full total, `memory.events` high, daemon utime+stime, UpscaleRequests received.\n",
    );
    r.push_str(
        "- **Idle cost** (VM): daemon on each tier with the agent connected (health check every 5 s), 3 s settle, then the window: utime+stime from `/proc/PID/stat` and voluntary context switches summed over `/proc/PID/task/*/status`; RSS from `VmRSS` at the end. CPU time has the kernel's 10 ms tick resolution.\n",
    );
    r.push_str(
        "- **Overhead** (VM): memory.high 64 MiB with swap on zram; one run = 2 × (touch and free 128 MiB anonymous memory) + one read of a 192 MiB sparse file on a loop-mounted ext4 (page cache). Runs alternate detached / attached (the ebpf daemon with `--no-memory-high`, no agent, so it consumes every event and reads memory.stat per burst as in production), the order flipping every pair; slowdown = attached ÷ detached − 1 per pair. (Host): 48 reads of a 256 MiB sparse file through a 32 MiB v1 memory limit, with and without `vm-monitor trace` attached.\n",
    );
    r.push_str(
        "- **Program cost**: `--bpf-stats` (`BPF_ENABLE_STATS`, no sysctl changed) during one overhead run per JIT mode, run time ÷ run count over all programs from `/metrics`; in the VM `net.core.bpf_jit_enable` is switched before the daemon (and so the programs) load. On the host the cost comes from the storm runs.\n",
    );
    r.push_str(
        "- **Event storm**: N tasks churning 48 MiB each (VM: anonymous through memory.high with swap; host: page-cache reads through the v1 limit) for the whole window. Offered = the programs' `seen` counter, delivered = records the daemon's engine received (host: records `trace` received); CPU from `/proc`, RSS sampled every second. `ebpf-c0` is the same with `--coalesce-ms 0`.\n",
    );
    r.push_str(
        "- **Start-up** (host): exec → `tracing:` (programs loaded, attached, ring buffer consumed) and exec → `server bound` of the daemon without a cgroup (the host has no cgroup v2 memory controller). In the VM: exec → the daemon's startup decision (tier chosen, memory.high applied).\n",
    );
    r.push_str("- Statistics: percentiles by linear interpolation between closest ranks; latency ratios use the ebpf p50 clamped to ≥ 1 ms, so they are lower bounds when ebpf is below it.\n\n");
}

fn details(r: &mut String, runs: &[KernelData]) {
    let _ = writeln!(r, "## Spread\n");
    r.push_str("| kernel | tier | n | min ms | p50 ms | p90 ms | max ms | crossing → event p50 ms | event → frame p50 ms | p90 ms | held requests/s p50 (min … max) | after release | daemon exec → started ms (p50) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for d in runs.iter().filter(|d| !d.is_host()) {
        for tier in d.tiers() {
            let tier = tier.as_str();
            let s = d.stats(tier);
            let f = d.e2f_stats(tier);
            if s.is_none() && !d.startup_ms.contains_key(tier) {
                continue;
            }
            let _ = writeln!(
                r,
                "| {} | {tier} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({} starts) |",
                d.label,
                s.map_or(0, |s| s.n),
                fmt_opt(s.map(|s| s.min), 2),
                fmt_opt(s.map(|s| s.p50), 2),
                fmt_opt(s.map(|s| s.p90), 2),
                fmt_opt(s.map(|s| s.max), 2),
                fmt_opt(d.c2e_stats(tier).map(|c| c.p50), 2),
                fmt_opt(f.map(|f| f.p50), 2),
                fmt_opt(f.map(|f| f.p90), 2),
                d.hold_rates(tier)
                    .and_then(|v| Stats::of(&v))
                    .map_or("–".into(), |s| format!(
                        "{:.2} ({:.2} … {:.2})",
                        s.p50, s.min, s.max
                    )),
                d.after_release.get(tier).map_or("–".into(), u64::to_string),
                fmt_opt(d.startup_ms.get(tier).and_then(|v| percentile(v, 50.0)), 0),
                d.startup_ms.get(tier).map_or(0, Vec::len),
            );
        }
    }

    let _ = writeln!(r, "\n### Overhead runs\n");
    r.push_str("| kernel | detached s p50 (min … max) | attached s p50 (min … max) | daemon CPU ms per attached run (p50) |\n|---|---|---|---|\n");
    for d in runs.iter().filter(|d| !d.overhead.is_empty()) {
        let span = |v: &[f64]| {
            Stats::of(v).map_or("–".into(), |s| {
                format!("{:.3} ({:.3} … {:.3})", s.p50, s.min, s.max)
            })
        };
        let cpu: Vec<f64> = d
            .overhead
            .iter()
            .filter(|o| o.attached)
            .map(|o| o.daemon_cpu_ms)
            .collect();
        let _ = writeln!(
            r,
            "| {} | {} | {} | {} |",
            d.label,
            span(&d.overhead_secs(false)),
            span(&d.overhead_secs(true)),
            fmt_opt(percentile(&cpu, 50.0), 0)
        );
    }

    let _ = writeln!(
        r,
        "\n### Managed overhead (the daemon fully managing vs no daemon vs the memory.high guard)\n"
    );
    r.push_str("| kernel | workload | mode | n | wall s p50 | PSI full ms p50 | PSI some ms p50 | memory.events high (sum) | daemon CPU % of wall p50 | UpscaleRequests (sum) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for d in runs {
        for m in d.managed_summary() {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.0} | {:.2} | {:.0} |",
                d.label,
                m.workload,
                m.mode,
                m.n,
                m.secs_p50,
                m.psi_full_ms_p50,
                m.psi_some_ms_p50,
                m.high_events,
                m.cpu_pct_p50,
                m.upscale_requests
            );
        }
    }

    let _ = writeln!(r, "\n### Program cost per run\n");
    r.push_str(
        "| kernel | JIT | workload | program | runs | ns per run |\n|---|---|---|---|---|---|\n",
    );
    for d in runs {
        for c in &d.bpf_cost {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {:.0} | {} |",
                d.label,
                c.jit,
                c.variant,
                c.program,
                c.runs,
                fmt_opt((c.runs > 0.0).then(|| c.run_time_ns / c.runs), 0)
            );
        }
    }

    let _ = writeln!(r, "\n### Event storms\n");
    r.push_str("| kernel | variant | tasks | s | hits/s | records/s delivered | coalesced | dropped | accounted | CPU % of a core | RSS first / end / peak MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for d in runs {
        for s in &d.storm {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.2} | {:.1} / {:.1} / {:.1} |",
                d.label,
                s.variant,
                s.tasks,
                s.secs,
                s.seen / s.secs,
                s.delivered / s.secs,
                s.coalesced,
                s.dropped,
                if s.accounted() { "yes" } else { "NO" },
                s.cpu_pct(),
                s.rss_first_kib / 1024.0,
                s.rss_end_kib / 1024.0,
                s.rss_peak_kib / 1024.0
            );
        }
    }
    r.push_str(
        "\nRaw samples: `<kernel>-*.csv` next to this file (`host-*.csv` for the host kernel).\n",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_half_the_range_over_the_median() {
        assert_eq!(noise_pct(&[9.0, 10.0, 11.0]), Some(10.0));
        assert_eq!(noise_pct(&[4.0]), None, "one run has no spread to speak of");
        assert_eq!(noise_pct(&[]), None);
    }

    #[test]
    fn verdict_lines_say_met_not_met_or_not_measured() {
        assert!(verdict(Some(true), "x", "y").starts_with("- **met**: x — y"));
        assert!(verdict(Some(false), "x", "y").starts_with("- **not met**"));
        assert!(verdict(None, "x", "y").starts_with("- **not measured**"));
    }
}
