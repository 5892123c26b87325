//! `vm-monitor doctor`: what this kernel and machine offer, and the tier `auto` would pick.

use std::io::Write as _;

use anyhow::Context as _;

use crate::cli::DoctorArgs;
use crate::pressure::probe::{Capabilities, probe};

/// Runs the probe and prints a table (or JSON).
pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let caps = tokio::task::spawn_blocking(move || probe(args.cgroup.as_deref()))
        .await
        .context("probe task failed")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &caps).context("writing JSON")?;
        writeln!(out).context("writing to stdout")?;
    } else {
        out.write_all(render_table(&caps).as_bytes())
            .context("writing to stdout")?;
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The human-readable report.
pub fn render_table(c: &Capabilities) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("kernel".into(), c.kernel_release.clone()),
        ("BTF".into(), yes(c.btf).into()),
        (
            "BPF JIT".into(),
            match c.bpf_jit_enable {
                Some(0) => "off (interpreter)".into(),
                Some(v) => format!("on ({v})"),
                None => "not configured (interpreter)".into(),
            },
        ),
        (
            "tracefs".into(),
            c.tracefs.clone().unwrap_or_else(|| "not mounted".into()),
        ),
    ];
    for tp in &c.tracepoints {
        rows.push((
            format!("  {}", tp.name),
            if tp.present { "present" } else { "missing" }.into(),
        ));
    }
    rows.push(("BPF ring buffer".into(), yes(c.ringbuf).into()));
    rows.push((
        "may load BPF".into(),
        match &c.bpf_error {
            None => yes(c.can_load_bpf).into(),
            Some(e) => format!("no ({e})"),
        },
    ));
    rows.push(("cgroup v2".into(), yes(c.cgroup2).into()));
    rows.push(("memory controller".into(), yes(c.memory_controller).into()));
    rows.push(("PSI".into(), yes(c.psi).into()));
    if let Some(cg) = &c.cgroup {
        let v = match (&cg.error, cg.id) {
            (Some(e), _) => format!("error: {e}"),
            (None, id) => format!(
                "id {} memory files {} memory.pressure {}",
                id.unwrap_or(0),
                yes(cg.memory_files),
                yes(cg.memory_pressure_file)
            ),
        };
        rows.push((format!("cgroup {}", cg.name), v));
    }
    if let Some(level) = c.perf_event_paranoid {
        rows.push((
            "perf_event_paranoid".into(),
            if level >= 3 {
                format!("{level} (Debian's extra level: attaching needs CAP_SYS_ADMIN; set it to 2 for a non-root daemon with CAP_PERFMON)")
            } else {
                format!("{level} (CAP_PERFMON is enough to attach)")
            },
        ));
    }
    if let Some(p) = &c.process {
        rows.push(("this process".into(), p.to_string()));
        let has = |cap: &str| p.all_capabilities || p.effective.iter().any(|e| e == cap);
        rows.push((
            "ebpf tier needs".into(),
            format!(
                "CAP_BPF + CAP_PERFMON + CAP_DAC_READ_SEARCH to load and attach (here: {}); none once attached",
                if has("CAP_BPF") && has("CAP_PERFMON") && has("CAP_DAC_READ_SEARCH") {
                    "held"
                } else {
                    "missing"
                }
            ),
        ));
        rows.push((
            "psi tier window".into(),
            if has("CAP_SYS_RESOURCE") {
                "500 ms (CAP_SYS_RESOURCE held)".into()
            } else {
                "2 s on kernels ≥ 6.5 and Debian's 6.1 (no CAP_SYS_RESOURCE: shorter windows are refused)"
                    .into()
            },
        ));
    }
    rows.push((
        "auto tier".into(),
        match c.auto_tier {
            Some(t) => format!("{t} ({})", c.auto_reason),
            None => format!("none ({})", c.auto_reason),
        },
    ));
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}
