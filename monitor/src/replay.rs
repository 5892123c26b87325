//! `vm-monitor replay FILE`: feeds a daemon recording's policy inputs through a fresh
//! [`Policy`] built from the recorded configuration and checks that every step returns exactly
//! the actions (decisions included) the daemon recorded. Time comes only from the inputs'
//! recorded `at`s, so the replay is deterministic. The recording streams through: only the
//! policy's state and the first [`MAX_DIFFS`] diffs are held.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::policy::Policy;
use crate::record::{ActionRecord, Header, Record, Recording, RecordingReader, missing_segments};

/// Diffs kept in a report (all are counted).
const MAX_DIFFS: usize = 20;

/// A step whose replayed actions differ from the recorded ones.
#[derive(Clone, Debug, PartialEq)]
pub struct StepDiff {
    /// 0-based index among the recording's steps.
    pub step: usize,
    pub at: Duration,
    /// The input, described.
    pub input: String,
    pub recorded: Vec<ActionRecord>,
    pub replayed: Vec<ActionRecord>,
}

/// The outcome of a replay.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplayReport {
    /// Steps fed to the policy.
    pub steps: usize,
    /// Decisions the replay produced.
    pub decisions: usize,
    /// Steps that differed (the first [`MAX_DIFFS`] are in `diffs`).
    pub differing: usize,
    pub diffs: Vec<StepDiff>,
    /// Why the replay stopped before the end of the recording, if it did.
    pub stopped: Option<String>,
}

impl ReplayReport {
    pub fn identical(&self) -> bool {
        self.differing == 0
    }
}

/// A fresh policy fed a recording's steps one record at a time.
struct Replayer {
    policy: Policy,
    report: ReplayReport,
}

impl Replayer {
    /// Refuses what cannot be replayed: no or unreadable configuration, a run that does not
    /// start at segment 0 (`first_segment`) or has `missing` segments.
    fn new(header: &Header, first_segment: Option<u32>, missing: &[u32]) -> anyhow::Result<Self> {
        if let Some(e) = &header.policy_error {
            bail!(
                "the recorded policy configuration cannot be read by this vm-monitor ({e}); \
                 replay with the version that recorded it ({})",
                header.vm_monitor_version
            );
        }
        let Some(cfg) = header.policy.clone() else {
            bail!(
                "this recording has no policy configuration ({} recording: events and readings \
                 only); replay needs a daemon recording (`--record-dir`)",
                header.source
            );
        };
        if let Some(first) = first_segment
            && first != 0
        {
            bail!(
                "this recording starts at segment {first} of run {}; replay needs the run from \
                 its start (segment 0 was deleted by the rolling budget or not passed)",
                header.run_id
            );
        }
        if !missing.is_empty() {
            bail!(
                "run {} is missing segment(s) {missing:?}; replay needs every segment",
                header.run_id
            );
        }
        let policy = Policy::new(cfg).context("the recorded policy configuration is invalid")?;
        Ok(Replayer {
            policy,
            report: ReplayReport::default(),
        })
    }

    /// Feeds one record; `false` once the replay must stop.
    fn feed(&mut self, record: &Record, on_step: &mut impl FnMut(&[ActionRecord])) -> bool {
        let report = &mut self.report;
        let step = match record {
            Record::Step(s) => s,
            Record::Dropped { at_ns, total } => {
                report.stopped = Some(format!(
                    "the recorder dropped {total} record(s) at {:.6}s; steps after that are not \
                     compared",
                    *at_ns as f64 / 1e9
                ));
                return false;
            }
            _ => return true,
        };
        let actions: Vec<ActionRecord> = self
            .policy
            .handle(step.input.clone())
            .iter()
            .map(ActionRecord::from)
            .collect();
        report.decisions += actions
            .iter()
            .filter(|a| matches!(a, ActionRecord::Decision(_)))
            .count();
        on_step(&actions);
        if actions != step.actions {
            report.differing += 1;
            if report.diffs.len() < MAX_DIFFS {
                report.diffs.push(StepDiff {
                    step: report.steps,
                    at: step.input.at(),
                    input: step.input.describe(),
                    recorded: step.actions.clone(),
                    replayed: actions,
                });
            }
        }
        report.steps += 1;
        true
    }

    fn finish(self) -> anyhow::Result<ReplayReport> {
        if self.report.steps == 0 && self.report.stopped.is_none() {
            bail!("this recording holds no policy steps to replay");
        }
        Ok(self.report)
    }
}

/// Replays `rec`; `on_step` sees each step's replayed actions (for printing).
pub fn replay(
    rec: &Recording,
    mut on_step: impl FnMut(&[ActionRecord]),
) -> anyhow::Result<ReplayReport> {
    let mut replayer = Replayer::new(
        &rec.header,
        rec.segments.first().map(|s| s.segment),
        &rec.missing_segments(),
    )?;
    for record in &rec.records {
        if !replayer.feed(record, &mut on_step) {
            break;
        }
    }
    replayer.finish()
}

/// Replays the recording `reader` streams, record by record, as [`replay`]. A segment of the
/// run that cannot be opened stops the comparison there (the policy would miss its inputs).
pub fn replay_reader(
    reader: &mut RecordingReader<'_>,
    mut on_step: impl FnMut(&[ActionRecord]),
) -> anyhow::Result<ReplayReport> {
    let missing = missing_segments(reader.planned_segments().iter().copied());
    let first = reader.summary().segments.first().map(|s| s.segment);
    let mut replayer = Replayer::new(reader.header(), first, &missing)?;
    let skipped = reader.skipped_segments();
    while let Some(record) = reader.next_record() {
        if reader.skipped_segments() > skipped {
            replayer.report.stopped = Some(
                "a segment of the run could not be read (see the warnings); steps after it are \
                 not compared"
                    .to_string(),
            );
            break;
        }
        if !replayer.feed(&record, &mut on_step) {
            break;
        }
    }
    replayer.finish()
}

/// The diff of one step, `-` recorded, `+` replayed, ` ` same.
pub fn render_diff(d: &StepDiff) -> String {
    let mut s = format!(
        "step {} at {:.6}s: {}\n",
        d.step,
        d.at.as_secs_f64(),
        d.input
    );
    let n = d.recorded.len().max(d.replayed.len());
    for i in 0..n {
        match (d.recorded.get(i), d.replayed.get(i)) {
            (Some(a), Some(b)) if a == b => s.push_str(&format!("    {}\n", a.describe())),
            (Some(ActionRecord::Decision(a)), Some(ActionRecord::Decision(b))) => {
                let (ra, rb) = decision_delta(a, b);
                s.push_str(&format!("  - {ra}\n  + {rb}\n"));
            }
            (a, b) => {
                if let Some(a) = a {
                    s.push_str(&format!("  - {}\n", a.describe()));
                }
                if let Some(b) = b {
                    s.push_str(&format!("  + {}\n", b.describe()));
                }
            }
        }
    }
    s
}

/// Two decisions as `decision <kind>: key=value ...` over the keys whose values differ.
fn decision_delta(a: &serde_json::Value, b: &serde_json::Value) -> (String, String) {
    let (Some(oa), Some(ob)) = (a.as_object(), b.as_object()) else {
        return (format!("decision {a}"), format!("decision {b}"));
    };
    let kind = |o: &serde_json::Map<String, serde_json::Value>| {
        o.get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("?")
            .to_string()
    };
    let mut keys: Vec<&String> = oa.keys().chain(ob.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    let mut ra = format!("decision {}:", kind(oa));
    let mut rb = format!("decision {}:", kind(ob));
    for k in keys {
        let (va, vb) = (oa.get(k).unwrap_or(&null), ob.get(k).unwrap_or(&null));
        if va != vb {
            ra.push_str(&format!(" {k}={va}"));
            rb.push_str(&format!(" {k}={vb}"));
        }
    }
    (ra, rb)
}

/// One replayed action as printed (decisions and upscale requests; other actions are only
/// compared).
fn render_action(a: &ActionRecord, json: bool) -> Option<String> {
    match a {
        ActionRecord::Decision(d) if json => Some(d.to_string()),
        ActionRecord::Decision(d) => {
            let field = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
            let at = d
                .get("at")
                .and_then(|a| Some((a.get("secs")?.as_u64()?, a.get("nanos")?.as_u64()?)))
                .map(|(s, n)| s as f64 + n as f64 / 1e9)
                .unwrap_or(0.0);
            Some(format!(
                "{at:>14.6} {:<20} {} -> {}",
                field("kind"),
                field("input"),
                field("detail")
            ))
        }
        _ => None,
    }
}

/// The `replay` command.
pub fn run(args: crate::cli::ReplayArgs) -> anyhow::Result<()> {
    let mut reader = RecordingReader::open(&args.file)?;
    eprintln!(
        "replaying {}: {}",
        args.file.display(),
        reader.header().describe()
    );
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // A closed pipe (`| head`) stops the listing, not the verdict.
    let mut out_error: Option<std::io::Error> = None;
    let report = replay_reader(&mut reader, |actions| {
        if args.quiet || out_error.is_some() {
            return;
        }
        for line in actions.iter().filter_map(|a| render_action(a, args.json)) {
            if let Err(e) = writeln!(out, "{line}") {
                out_error = Some(e);
                return;
            }
        }
    });
    // Problems are known only once read; they are printed before the verdict.
    for w in reader.summary().warnings() {
        eprintln!("warning: {w}");
    }
    let report = report?;
    if out_error.is_none()
        && let Err(e) = out.flush()
    {
        out_error = Some(e);
    }
    drop(out);
    if let Some(e) = out_error
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e).context("writing to stdout");
    }
    if let Some(why) = &report.stopped {
        eprintln!("warning: {why}");
    }
    if report.identical() {
        eprintln!(
            "replayed {} steps, {} decisions: identical to what the daemon decided when recorded",
            report.steps, report.decisions
        );
        return Ok(());
    }
    for d in &report.diffs {
        eprint!("{}", render_diff(d));
    }
    if report.differing > report.diffs.len() {
        eprintln!("... and {} more", report.differing - report.diffs.len());
    }
    bail!(
        "replay differs from the recording in {} of {} steps (first at step {})",
        report.differing,
        report.steps,
        report.diffs.first().map(|d| d.step).unwrap_or(0)
    )
}
