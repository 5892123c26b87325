//! Unit tests: one scenario per rule.

use std::time::Duration;

use super::*;

const GIB: u64 = 1 << 30;

/// The configuration with the memory.high guard on: most scenarios here exercise the guard's
/// stepping; the default (guard off) has its own tests below.
fn guarded() -> Config {
    Config {
        memory_high_guard: true,
        ..Config::default()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Feeds `input`, then acknowledges each effect the policy asks for, answering with
/// `fail(effect)` (None = success). Returns every action in order.
fn run_with(
    p: &mut Policy,
    input: Input,
    mut fail: impl FnMut(Effect) -> Option<String>,
) -> Vec<Action> {
    let at = input.at();
    let mut all = Vec::new();
    let mut next = Some(input);
    while let Some(input) = next.take() {
        let actions = p.handle(input);
        for a in &actions {
            if let Some(effect) = a.effect() {
                assert!(next.is_none(), "two effects outstanding: {actions:?}");
                let result = match fail(effect) {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
                next = Some(Input::Applied { at, effect, result });
            }
        }
        all.extend(actions);
    }
    all
}

fn run(p: &mut Policy, input: Input) -> Vec<Action> {
    run_with(p, input, |_| None)
}

fn effects(actions: &[Action]) -> Vec<Effect> {
    actions.iter().filter_map(Action::effect).collect()
}

fn highs(actions: &[Action]) -> Vec<MemoryHigh> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetMemoryHigh { value } => Some(*value),
            _ => None,
        })
        .collect()
}

fn replies(actions: &[Action]) -> Vec<ScalingOutcome> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn upscales(actions: &[Action]) -> Vec<UpscaleReason> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendUpscaleRequest { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

fn decisions(actions: &[Action]) -> Vec<Decision> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Decision(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn only_reply(actions: &[Action]) -> ScalingOutcome {
    let r = replies(actions);
    assert_eq!(r.len(), 1, "{actions:?}");
    r[0].clone()
}

fn downscale_status(actions: &[Action]) -> (bool, String) {
    match only_reply(actions) {
        ScalingOutcome::Downscale { ok, status } => (ok, status),
        other => panic!("not a downscale result: {other:?}"),
    }
}

/// A started policy sized for an agent allocation of `alloc` (Postgres max 100 GiB).
fn started_at(cfg: Config, alloc: u64) -> Policy {
    let mut p = Policy::new(cfg).unwrap();
    run(
        &mut p,
        Input::FileCacheConnected {
            at: ms(0),
            max_size: 100 * GIB,
        },
    );
    run(
        &mut p,
        Input::Start {
            at: ms(0),
            mem_total: alloc - 150 * MIB,
        },
    );
    let a = run(
        &mut p,
        Input::UpscaleNotification {
            at: ms(1),
            granted_mem: alloc,
        },
    );
    assert_eq!(only_reply(&a), ScalingOutcome::UpscaleConfirmed);
    p
}

fn started(alloc: u64) -> Policy {
    started_at(guarded(), alloc)
}

fn pressure(at: Duration, reading: u64) -> Input {
    Input::Pressure {
        at,
        signal: PressureSignal::MemcgReclaim { stall: ms(3) },
        reading: Some(reading),
    }
}

fn reading(at: Duration, bytes: u64) -> Input {
    Input::Reading {
        at,
        non_reclaimable: bytes,
        current: bytes,
    }
}

// ---- startup -------------------------------------------------------------------------------

#[test]
fn startup_sets_max_first_then_file_cache_then_threshold() {
    let mut p = Policy::new(guarded()).unwrap();
    run(
        &mut p,
        Input::FileCacheConnected {
            at: ms(0),
            max_size: 100 * GIB,
        },
    );
    let a = run(
        &mut p,
        Input::Start {
            at: ms(0),
            mem_total: GIB,
        },
    );
    let thr = threshold(GIB, 0.85);
    assert_eq!(
        effects(&a),
        vec![
            Effect::MemoryHigh {
                value: MemoryHigh::Max
            },
            Effect::FileCache {
                bytes: file_cache_size(&FileCacheConfig::default(), GIB, None)
            },
            Effect::MemoryHigh {
                value: MemoryHigh::Bytes(thr)
            },
        ]
    );
    // Startup sizes from MemTotal without the sys buffer (reference-compatible).
    assert_eq!(p.usable(), GIB);
    assert_eq!(p.threshold(), thr);
    assert_eq!(p.memory_high(), Some(MemoryHigh::Bytes(thr)));
    assert!(
        decisions(&a)
            .iter()
            .any(|d| d.kind == DecisionKind::Startup)
    );
}

#[test]
fn startup_defers_file_cache_until_postgres_connects() {
    let mut p = Policy::new(guarded()).unwrap();
    let a = run(
        &mut p,
        Input::Start {
            at: ms(0),
            mem_total: 2 * GIB,
        },
    );
    assert!(
        effects(&a)
            .iter()
            .all(|e| matches!(e, Effect::MemoryHigh { .. }))
    );
    assert_eq!(p.file_cache(), None);
    let a = run(
        &mut p,
        Input::FileCacheConnected {
            at: ms(10),
            max_size: GIB,
        },
    );
    // Capped by neon.max_file_cache_size.
    assert_eq!(effects(&a), vec![Effect::FileCache { bytes: GIB }]);
    assert_eq!(p.file_cache(), Some(GIB));
    // A reconnect with nothing to change does not rewrite it.
    let a = run(
        &mut p,
        Input::FileCacheConnected {
            at: ms(20),
            max_size: GIB,
        },
    );
    assert!(effects(&a).is_empty());
}

#[test]
fn startup_failure_is_logged_and_sizing_continues() {
    let mut p = Policy::new(guarded()).unwrap();
    run(
        &mut p,
        Input::FileCacheConnected {
            at: ms(0),
            max_size: 100 * GIB,
        },
    );
    let a = run_with(
        &mut p,
        Input::Start {
            at: ms(0),
            mem_total: GIB,
        },
        |e| matches!(e, Effect::FileCache { .. }).then(|| "permission denied".to_string()),
    );
    assert_eq!(effects(&a).len(), 3);
    assert_eq!(p.file_cache(), None);
    let d = decisions(&a);
    assert!(
        d.iter()
            .any(|d| d.kind == DecisionKind::EffectFailed && d.detail.contains("permission denied"))
    );
    // Postgres comes back: the size is re-asserted.
    let a = run(
        &mut p,
        Input::FileCacheConnected {
            at: ms(5),
            max_size: 100 * GIB,
        },
    );
    assert_eq!(effects(&a).len(), 1);
    assert!(p.file_cache().is_some());
}

#[test]
fn second_start_is_ignored() {
    let mut p = started(GIB);
    let before = p.clone();
    let a = run(
        &mut p,
        Input::Start {
            at: ms(5),
            mem_total: 8 * GIB,
        },
    );
    assert!(effects(&a).is_empty());
    assert_eq!(decisions(&a)[0].kind, DecisionKind::Ignored);
    assert_eq!(p, before);
}

/// `rounds` pressure events over the threshold, 10 ms apart, each followed by a due tick, then
/// a grant of 4 GiB at 1 s.
fn pressure_then_grant(p: &mut Policy, rounds: u64) -> Vec<Action> {
    let mut all = Vec::new();
    for i in 0..rounds {
        all.extend(run(p, pressure(ms(10 + i * 10), 1900 * MIB)));
        all.extend(run(
            p,
            Input::Tick {
                at: ms(15 + i * 10),
            },
        ));
    }
    all.extend(run(
        p,
        Input::UpscaleNotification {
            at: ms(1000),
            granted_mem: 4 * GIB,
        },
    ));
    all
}

#[test]
fn no_memory_high_mode_never_writes_it() {
    let cfg = Config {
        manage_memory_high: false,
        ..guarded()
    };
    let mut p = started_at(cfg, 2 * GIB);
    let mut all = pressure_then_grant(&mut p, 50);
    all.extend(run(&mut p, reading(ms(1100), 100 * MIB)));
    all.extend(run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(1100),
            target_mem: 3 * GIB,
        },
    ));
    all.extend(run(&mut p, Input::Shutdown { at: ms(1200) }));
    assert!(highs(&all).is_empty(), "{all:?}");
    assert!(!upscales(&all).is_empty());
    assert!(p.is_shut_down());
}

// ---- upscale requests ----------------------------------------------------------------------

#[test]
fn pressure_below_threshold_does_not_upscale() {
    let mut p = started(GIB);
    let thr = p.threshold();
    let a = run(&mut p, pressure(ms(10), thr - 1));
    assert!(upscales(&a).is_empty());
    assert!(!p.upscale_pending(ms(10)));
    // A pressure event without a reading, and a page-cache-only squeeze, say nothing.
    let a = run(
        &mut p,
        Input::Pressure {
            at: ms(20),
            signal: PressureSignal::PsiTrigger,
            reading: None,
        },
    );
    assert!(upscales(&a).is_empty());
}

#[test]
fn pressure_at_threshold_upscales() {
    let mut p = started(GIB);
    let thr = p.threshold();
    let a = run(&mut p, pressure(ms(10), thr));
    let u = upscales(&a);
    assert_eq!(u.len(), 1);
    assert_eq!(
        u[0].trigger,
        UpscaleTrigger::Usage {
            signal: "memcg_reclaim",
            reading: thr,
            threshold: thr
        }
    );
    assert!(p.upscale_pending(ms(10)));
    assert!(
        decisions(&a)
            .iter()
            .any(|d| d.kind == DecisionKind::UpscaleRequested && d.threshold == thr)
    );
}

#[test]
fn polled_sample_upscales_like_the_reference() {
    let mut p = started(GIB);
    let thr = p.threshold();
    let a = run(
        &mut p,
        Input::Pressure {
            at: ms(10),
            signal: PressureSignal::PolledSample,
            reading: Some(thr + 1),
        },
    );
    assert_eq!(upscales(&a).len(), 1);
}

#[test]
fn reading_above_threshold_upscales() {
    let mut p = started(GIB);
    let thr = p.threshold();
    let a = run(&mut p, reading(ms(10), thr));
    assert_eq!(upscales(&a).len(), 1);
}

#[test]
fn upscale_requests_rate_limited_with_suppressed_count() {
    let mut p = started(GIB);
    let thr = p.threshold();
    let mut sent = Vec::new();
    for i in 0..=25 {
        let at = ms(100 + i * 100);
        for r in upscales(&run(&mut p, pressure(at, thr + MIB))) {
            sent.push((at, r.suppressed));
        }
    }
    // 100 ms .. 2600 ms: sends at 100, 1100, 2100; nine suppressed in between each.
    assert_eq!(sent, vec![(ms(100), 0), (ms(1100), 9), (ms(2100), 9)]);
    assert_eq!(p.suppressed(), 5);
}

#[test]
fn rate_limit_survives_out_of_order_time() {
    let mut p = started(GIB);
    let thr = p.threshold();
    assert_eq!(upscales(&run(&mut p, pressure(ms(5000), thr))).len(), 1);
    assert!(upscales(&run(&mut p, pressure(ms(100), thr))).is_empty());
    assert!(upscales(&run(&mut p, pressure(ms(5999), thr))).is_empty());
    assert_eq!(upscales(&run(&mut p, pressure(ms(6000), thr))).len(), 1);
}

#[test]
fn long_direct_reclaim_stall_upscales_short_does_not() {
    let mut p = started(GIB);
    let low = 100 * MIB;
    let short = run(
        &mut p,
        Input::Pressure {
            at: ms(10),
            signal: PressureSignal::DirectReclaim { stall: ms(9) },
            reading: Some(low),
        },
    );
    assert!(upscales(&short).is_empty());
    let long = run(
        &mut p,
        Input::Pressure {
            at: ms(20),
            signal: PressureSignal::DirectReclaim { stall: ms(10) },
            reading: Some(low),
        },
    );
    assert_eq!(
        upscales(&long)[0].trigger,
        UpscaleTrigger::DirectReclaimStall { stall: ms(10) }
    );
}

#[test]
fn oom_kill_upscales() {
    let mut p = started(GIB);
    let a = run(
        &mut p,
        Input::Pressure {
            at: ms(10),
            signal: PressureSignal::OomKill,
            reading: None,
        },
    );
    assert_eq!(
        upscales(&a)[0].trigger,
        UpscaleTrigger::OomKill {
            source: "oom_victim"
        }
    );
}

#[test]
fn memory_events_oom_kill_increase_upscales_after_baseline() {
    let mut p = started(GIB);
    let ev = |at, oom_kill| Input::Pressure {
        at,
        signal: PressureSignal::MemoryEvents {
            high: 5,
            max: 0,
            oom: oom_kill,
            oom_kill,
        },
        reading: Some(10 * MIB),
    };
    // Old kills from before we started are only a baseline.
    assert!(upscales(&run(&mut p, ev(ms(10), 3))).is_empty());
    assert!(upscales(&run(&mut p, ev(ms(20), 3))).is_empty());
    let a = run(&mut p, ev(ms(30), 4));
    assert_eq!(
        upscales(&a)[0].trigger,
        UpscaleTrigger::OomKill {
            source: "memory.events"
        }
    );
}

#[test]
fn nothing_happens_before_start() {
    let mut p = Policy::new(guarded()).unwrap();
    let a = run(&mut p, pressure(ms(1), 10 * GIB));
    assert!(a.is_empty(), "{a:?}");
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(2),
            target_mem: GIB,
        },
    );
    assert!(matches!(only_reply(&a), ScalingOutcome::InternalError(_)));
}

// ---- memory.high ---------------------------------------------------------------------------

#[test]
fn memory_high_steps_while_pending_and_pressure_continues() {
    let mut p = started(GIB);
    let thr = p.threshold();
    let usable = p.usable();
    let a = run(&mut p, pressure(ms(100), thr));
    // Raised right away: one step above the threshold (≥ reading + step).
    assert_eq!(highs(&a), vec![MemoryHigh::Bytes(thr + 10 * MIB)]);
    assert!(a.contains(&Action::ScheduleTick { at: ms(125) }));

    // Ticks keep stepping 10 MiB / 25 ms while pressure is recent (hold 500 ms).
    let mut at = ms(125);
    let mut values = Vec::new();
    loop {
        let a = run(&mut p, Input::Tick { at });
        values.extend(highs(&a));
        match a.iter().find_map(|x| match x {
            Action::ScheduleTick { at } => Some(*at),
            _ => None,
        }) {
            Some(next) => at = next,
            None => break,
        }
    }
    // 100 ms + 500 ms hold, one step per 25 ms, but capped by usable (924 MiB).
    assert_eq!(values.first(), Some(&MemoryHigh::Bytes(thr + 20 * MIB)));
    assert_eq!(values.last(), Some(&MemoryHigh::Bytes(usable)));
    assert!(
        values
            .iter()
            .all(|v| v.bytes().is_some_and(|b| b <= usable))
    );
    for w in values.windows(2) {
        assert!(w[0].bytes() < w[1].bytes());
    }
}

#[test]
fn memory_high_stepping_stops_when_pressure_stops() {
    let mut p = started(4 * GIB);
    let thr = p.threshold();
    run(&mut p, pressure(ms(100), thr));
    // No more pressure: ticks after the hold do nothing.
    let a = run(&mut p, Input::Tick { at: ms(700) });
    assert!(highs(&a).is_empty());
    assert!(!a.iter().any(|x| matches!(x, Action::ScheduleTick { .. })));
    // Spurious early ticks are ignored too.
    let a = run(&mut p, Input::Tick { at: ms(1) });
    assert!(highs(&a).is_empty());
}

#[test]
fn memory_high_not_stepped_without_pending_upscale() {
    let mut p = started(GIB);
    // Page-cache squeeze: memcg reclaim, anon far below the threshold.
    let a = run(&mut p, pressure(ms(100), 50 * MIB));
    assert!(highs(&a).is_empty());
    assert!(!a.iter().any(|x| matches!(x, Action::ScheduleTick { .. })));
}

#[test]
fn memory_high_goes_to_max_when_anon_exceeds_usable() {
    let mut p = started(GIB);
    let usable = p.usable();
    let a = run(&mut p, pressure(ms(100), usable + MIB));
    assert_eq!(highs(&a), vec![MemoryHigh::Max]);
    // Nothing further to step from max.
    assert!(!a.iter().any(|x| matches!(x, Action::ScheduleTick { .. })));
}

#[test]
fn memory_high_never_set_below_reading() {
    let mut p = started(2 * GIB);
    let thr = p.threshold();
    let high_reading = thr + 200 * MIB;
    let a = run(&mut p, pressure(ms(100), high_reading));
    for v in highs(&a) {
        assert!(v.bytes().is_none_or(|b| b >= high_reading));
    }
    // The upscale notification recomputes it for the new size.
    let a = run(
        &mut p,
        Input::UpscaleNotification {
            at: ms(200),
            granted_mem: 4 * GIB,
        },
    );
    let new_thr = threshold(4 * GIB - 100 * MIB, 0.85);
    assert_eq!(highs(&a), vec![MemoryHigh::Bytes(new_thr)]);
    assert_eq!(p.threshold(), new_thr);
}

// ---- upscale notification ------------------------------------------------------------------

#[test]
fn upscale_notification_grows_everything_and_clears_pending() {
    let mut p = started(GIB);
    let thr = p.threshold();
    run(&mut p, pressure(ms(100), thr));
    assert!(p.upscale_pending(ms(100)));
    let a = run(
        &mut p,
        Input::UpscaleNotification {
            at: ms(300),
            granted_mem: 2 * GIB,
        },
    );
    assert_eq!(only_reply(&a), ScalingOutcome::UpscaleConfirmed);
    let fc = effects(&a);
    assert_eq!(fc[0], Effect::FileCache { bytes: 1461 * MIB });
    assert_eq!(p.file_cache(), Some(1461 * MIB));
    assert_eq!(p.usable(), 1948 * MIB);
    assert_eq!(mib(p.threshold()).to_string(), "1655.8");
    assert_eq!(p.memory_high(), Some(MemoryHigh::Bytes(p.threshold())));
    assert_eq!(p.allocation(), Some(2 * GIB));
    assert!(!p.upscale_pending(ms(300)));
    assert!(
        decisions(&a)
            .iter()
            .any(|d| d.kind == DecisionKind::UpscaleApplied)
    );
}

#[test]
fn upscale_failure_rolls_back_and_answers_internal_error() {
    let mut p = started(GIB);
    let before = (
        p.threshold(),
        p.file_cache(),
        p.memory_high(),
        p.allocation(),
    );
    let a = run_with(
        &mut p,
        Input::UpscaleNotification {
            at: ms(300),
            granted_mem: 2 * GIB,
        },
        |e| matches!(e, Effect::MemoryHigh { .. }).then(|| "EBUSY".to_string()),
    );
    // FC grown, memory.high failed, FC restored.
    assert_eq!(
        effects(&a),
        vec![
            Effect::FileCache { bytes: 1461 * MIB },
            Effect::MemoryHigh {
                value: MemoryHigh::Bytes(threshold(1948 * MIB, 0.85))
            },
            Effect::FileCache { bytes: 607 * MIB },
        ]
    );
    match only_reply(&a) {
        ScalingOutcome::InternalError(e) => {
            assert!(e.starts_with("failed to upscale"), "{e}");
            assert!(e.contains("EBUSY"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        (
            p.threshold(),
            p.file_cache(),
            p.memory_high(),
            p.allocation()
        ),
        before
    );
}

// ---- downscale -----------------------------------------------------------------------------

#[test]
fn downscale_denied_with_reference_wording() {
    let mut p = started(2 * GIB);
    run(&mut p, reading(ms(100), GIB));
    let before = p.clone();
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(100),
            target_mem: GIB,
        },
    );
    assert_eq!(
        downscale_status(&a),
        (
            false,
            "calculated memory threshold too low: 785.4 MiB (new threshold) < 1024 (current usage) + 100 (downscale buffer)"
                .to_string()
        )
    );
    assert!(effects(&a).is_empty());
    assert_eq!(p, before);
    assert_eq!(decisions(&a)[0].kind, DecisionKind::DownscaleDenied);
}

#[test]
fn downscale_denied_prints_fractional_usage_like_f32_display() {
    let mut p = started(2 * GIB);
    // 564.3524 MiB, the reference's example figure.
    let usage = (564.3524_f64 * MIB as f64) as u64;
    run(&mut p, reading(ms(100), usage));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(100),
            target_mem: 512 * MIB + 100 * MIB,
        },
    );
    let (ok, status) = downscale_status(&a);
    assert!(!ok);
    assert!(
        status.contains("< 564.3524 (current usage) + 100 (downscale buffer)"),
        "{status}"
    );
}

#[test]
fn downscale_remembers_recent_peak() {
    let mut p = started(2 * GIB);
    // A spike 2 s ago, now low.
    run(&mut p, pressure(ms(1000), 800 * MIB));
    run(&mut p, reading(ms(3000), 100 * MIB));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(3000),
            target_mem: GIB,
        },
    );
    let (ok, status) = downscale_status(&a);
    assert!(!ok);
    assert!(status.contains("< 800 (current usage)"), "{status}");
    // 5 s window: at 6.5 s the spike is forgotten.
    run(&mut p, reading(ms(6500), 100 * MIB));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(6500),
            target_mem: GIB,
        },
    );
    assert!(downscale_status(&a).0);
}

#[test]
fn downscale_without_readings_denied() {
    let mut p = started(2 * GIB);
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(100),
            target_mem: GIB,
        },
    );
    assert_eq!(
        downscale_status(&a),
        (false, NO_READINGS_STATUS.to_string())
    );
    run(&mut p, reading(ms(100), 10 * MIB));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(5101),
            target_mem: GIB,
        },
    );
    assert_eq!(
        downscale_status(&a),
        (false, STALE_READINGS_STATUS.to_string())
    );
}

#[test]
fn downscale_approved_shrinks_cache_first_with_status() {
    let mut p = started(2 * GIB);
    run(&mut p, reading(ms(100), 100 * MIB));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(100),
            target_mem: GIB,
        },
    );
    let thr = threshold(924 * MIB, 0.85);
    assert_eq!(
        effects(&a),
        vec![
            Effect::FileCache { bytes: 607 * MIB },
            Effect::MemoryHigh {
                value: MemoryHigh::Bytes(thr)
            },
        ]
    );
    assert_eq!(
        downscale_status(&a),
        (
            true,
            "set file cache size to 607 MiB; set cgroup memory threshold from 1655.8 MiB to 785.4 MiB, of new total 924 MiB; set cgroup memory.high from 1655.8 MiB to 785.4 MiB"
                .to_string()
        )
    );
    assert_eq!(p.threshold(), thr);
    assert_eq!(p.usable(), 924 * MIB);
    assert_eq!(p.allocation(), Some(GIB));
    assert_eq!(p.file_cache(), Some(607 * MIB));
}

#[test]
fn downscale_failure_restores_previous_file_cache() {
    let mut p = started(2 * GIB);
    run(&mut p, reading(ms(100), 100 * MIB));
    let before = p.clone();
    let a = run_with(
        &mut p,
        Input::DownscaleRequest {
            at: ms(100),
            target_mem: GIB,
        },
        |e| matches!(e, Effect::MemoryHigh { .. }).then(|| "write failed".to_string()),
    );
    assert_eq!(
        effects(&a),
        vec![
            Effect::FileCache { bytes: 607 * MIB },
            Effect::MemoryHigh {
                value: MemoryHigh::Bytes(threshold(924 * MIB, 0.85))
            },
            Effect::FileCache { bytes: 1461 * MIB },
        ]
    );
    match only_reply(&a) {
        ScalingOutcome::InternalError(e) => assert!(e.starts_with("failed to downscale"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.threshold(), before.threshold());
    assert_eq!(p.file_cache(), before.file_cache());
    assert_eq!(p.memory_high(), before.memory_high());
    assert_eq!(p.allocation(), before.allocation());
}

#[test]
fn postgres_down_then_back() {
    let mut p = started(2 * GIB);
    run(&mut p, reading(ms(100), 100 * MIB));
    let before = p.clone();
    // Every SQL attempt fails: the shrink and its undo.
    let a = run_with(
        &mut p,
        Input::DownscaleRequest {
            at: ms(100),
            target_mem: GIB,
        },
        |e| matches!(e, Effect::FileCache { .. }).then(|| "connection refused".to_string()),
    );
    assert!(matches!(only_reply(&a), ScalingOutcome::InternalError(_)));
    assert!(highs(&a).is_empty(), "memory.high untouched: {a:?}");
    assert_eq!(p.threshold(), before.threshold());
    assert_eq!(
        p.file_cache(),
        None,
        "size unknown after a failed SQL sequence"
    );
    // Postgres back: the size for the current (unchanged) allocation is re-asserted.
    let a = run(
        &mut p,
        Input::FileCacheConnected {
            at: ms(4000),
            max_size: 100 * GIB,
        },
    );
    assert_eq!(effects(&a), vec![Effect::FileCache { bytes: 1461 * MIB }]);
    assert!(
        decisions(&a)
            .iter()
            .any(|d| d.kind == DecisionKind::FileCacheResync)
    );
    // And the agent's retry succeeds.
    run(&mut p, reading(ms(4100), 100 * MIB));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(4100),
            target_mem: GIB,
        },
    );
    assert!(downscale_status(&a).0);
}

#[test]
fn downscale_with_file_cache_only_skips_cgroup_checks() {
    let cfg = Config {
        manage_cgroup: false,
        ..guarded()
    };
    let mut p = started_at(cfg, 2 * GIB);
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(100),
            target_mem: GIB,
        },
    );
    assert_eq!(
        downscale_status(&a),
        (true, "set file cache size to 607 MiB".to_string())
    );
    assert!(highs(&a).is_empty());
}

#[test]
fn downscale_with_cgroup_only() {
    let cfg = Config {
        manage_file_cache: false,
        ..guarded()
    };
    let mut p = started_at(cfg, 2 * GIB);
    run(&mut p, reading(ms(100), 100 * MIB));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(100),
            target_mem: GIB,
        },
    );
    let (ok, status) = downscale_status(&a);
    assert!(ok);
    assert!(
        status.starts_with("set cgroup memory threshold from 1655.8 MiB to 785.4 MiB"),
        "{status}"
    );
    assert!(
        !effects(&a)
            .iter()
            .any(|e| matches!(e, Effect::FileCache { .. }))
    );
}

#[test]
fn unmanaged_confirms_and_approves() {
    let cfg = Config {
        manage_cgroup: false,
        manage_file_cache: false,
        ..guarded()
    };
    let mut p = Policy::new(cfg).unwrap();
    let a = run(
        &mut p,
        Input::Start {
            at: ms(0),
            mem_total: GIB,
        },
    );
    assert!(effects(&a).is_empty());
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(1),
            target_mem: GIB,
        },
    );
    assert_eq!(
        downscale_status(&a),
        (
            true,
            "monitor is not managing cgroup or file cache".to_string()
        )
    );
    let a = run(
        &mut p,
        Input::UpscaleNotification {
            at: ms(2),
            granted_mem: 2 * GIB,
        },
    );
    assert_eq!(only_reply(&a), ScalingOutcome::UpscaleConfirmed);
    assert!(effects(&a).is_empty());
}

// ---- validation ----------------------------------------------------------------------------

#[test]
fn invalid_allocations_refused_without_state_change() {
    let mut p = started(2 * GIB);
    run(&mut p, reading(ms(100), 100 * MIB));
    for mem in [0, 1, 100 * MIB, 65 << 40, u64::MAX] {
        for input in [
            Input::UpscaleNotification {
                at: ms(200),
                granted_mem: mem,
            },
            Input::DownscaleRequest {
                at: ms(200),
                target_mem: mem,
            },
        ] {
            let before = p.clone();
            let a = run(&mut p, input);
            match only_reply(&a) {
                ScalingOutcome::InternalError(e) => assert!(e.contains("invalid"), "{e}"),
                other => panic!("{mem}: {other:?}"),
            }
            assert!(effects(&a).is_empty());
            assert_eq!(p, before);
        }
    }
}

#[test]
fn config_is_validated() {
    let cfg = Config {
        upscale_threshold_fraction: 0.0,
        ..guarded()
    };
    assert_eq!(
        Policy::new(cfg).unwrap_err().field,
        "upscale_threshold_fraction"
    );
}

// ---- sessions, ordering, shutdown ----------------------------------------------------------

#[test]
fn reconnect_keeps_vm_state() {
    let mut p = started(2 * GIB);
    run(&mut p, Input::AgentConnected { at: ms(0) });
    run(&mut p, pressure(ms(1000), 800 * MIB));
    let snapshot = (p.threshold(), p.usable(), p.memory_high(), p.file_cache());
    run(&mut p, Input::AgentDisconnected { at: ms(1100) });
    assert!(!p.agent_connected());
    run(&mut p, Input::AgentConnected { at: ms(1200) });
    assert!(p.agent_connected());
    assert_eq!(
        (p.threshold(), p.usable(), p.memory_high(), p.file_cache()),
        snapshot
    );
    // The spike from before the reconnect still blocks the downscale.
    run(&mut p, reading(ms(2000), 100 * MIB));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(2000),
            target_mem: GIB,
        },
    );
    assert!(!downscale_status(&a).0);
}

#[test]
fn reconnect_repeats_a_current_upscale_request() {
    let mut p = started(GIB);
    let thr = p.threshold();
    assert_eq!(upscales(&run(&mut p, pressure(ms(100), thr))).len(), 1);
    run(&mut p, Input::AgentDisconnected { at: ms(150) });
    run(&mut p, pressure(ms(400), thr));
    // Within the rate limit: nothing yet.
    assert!(upscales(&run(&mut p, Input::AgentConnected { at: ms(500) })).is_empty());
    run(&mut p, pressure(ms(900), thr));
    assert_eq!(
        upscales(&run(&mut p, Input::AgentConnected { at: ms(1300) })).len(),
        1
    );
}

#[test]
fn without_an_agent_wishes_wait_for_the_next_connect() {
    let mut p = started(GIB);
    let thr = p.threshold();
    run(&mut p, Input::AgentDisconnected { at: ms(0) });
    // Nobody to ask: nothing is sent, and nothing counts against the rate limit.
    assert!(upscales(&run(&mut p, pressure(ms(100), thr))).is_empty());
    assert!(upscales(&run(&mut p, pressure(ms(300), thr))).is_empty());
    // The agent that connects hears of it at once.
    assert_eq!(
        upscales(&run(&mut p, Input::AgentConnected { at: ms(400) })).len(),
        1
    );
    // And the rate limit holds from there.
    assert!(upscales(&run(&mut p, pressure(ms(900), thr))).is_empty());
    assert_eq!(upscales(&run(&mut p, pressure(ms(1400), thr))).len(), 1);
}

#[test]
fn request_waits_for_in_flight_effect() {
    let mut p = started(GIB);
    // Raise memory.high, but do not acknowledge it yet.
    let a = p.handle(pressure(ms(100), p.threshold()));
    let effect = effects(&a)[0];
    assert!(p.busy());
    let a = p.handle(Input::UpscaleNotification {
        at: ms(110),
        granted_mem: 2 * GIB,
    });
    assert!(a.is_empty(), "queued: {a:?}");
    let a = run(
        &mut p,
        Input::Applied {
            at: ms(120),
            effect,
            result: Ok(()),
        },
    );
    assert_eq!(only_reply(&a), ScalingOutcome::UpscaleConfirmed);
    assert_eq!(p.allocation(), Some(2 * GIB));
}

#[test]
fn unexpected_applied_is_ignored() {
    let mut p = started(GIB);
    let before = p.clone();
    let a = p.handle(Input::Applied {
        at: ms(5),
        effect: Effect::FileCache { bytes: MIB },
        result: Ok(()),
    });
    assert_eq!(decisions(&a)[0].kind, DecisionKind::Ignored);
    assert_eq!(p, before);
}

#[test]
fn shutdown_restores_max_and_refuses_requests() {
    let mut p = started(GIB);
    let a = run(&mut p, Input::Shutdown { at: ms(100) });
    assert_eq!(highs(&a), vec![MemoryHigh::Max]);
    assert!(p.is_shut_down());
    assert_eq!(p.memory_high(), Some(MemoryHigh::Max));
    let a = run(
        &mut p,
        Input::DownscaleRequest {
            at: ms(200),
            target_mem: GIB,
        },
    );
    assert_eq!(
        only_reply(&a),
        ScalingOutcome::InternalError(SHUTTING_DOWN.to_string())
    );
    // No more memory.high writes or upscale requests.
    let a = run(&mut p, pressure(ms(300), 10 * GIB));
    assert!(highs(&a).is_empty() && upscales(&a).is_empty());
}

#[test]
fn shutdown_during_scaling_abandons_it_then_restores_max() {
    let mut p = started(GIB);
    run(&mut p, reading(ms(50), 10 * MIB));
    let a = p.handle(Input::UpscaleNotification {
        at: ms(100),
        granted_mem: 2 * GIB,
    });
    let effect = effects(&a)[0];
    assert!(matches!(effect, Effect::FileCache { .. }));
    assert!(p.handle(Input::Shutdown { at: ms(110) }).is_empty());
    let a = run(
        &mut p,
        Input::Applied {
            at: ms(120),
            effect,
            result: Ok(()),
        },
    );
    assert_eq!(
        only_reply(&a),
        ScalingOutcome::InternalError(SHUTTING_DOWN.to_string())
    );
    assert_eq!(highs(&a), vec![MemoryHigh::Max]);
    assert!(p.is_shut_down());
    assert_eq!(p.allocation(), Some(GIB), "not committed");
}

// ---- conversions ---------------------------------------------------------------------------

#[test]
fn pressure_events_convert() {
    use crate::pressure::{PressureEvent, PressureKind, RecordKind};
    let mut ev = PressureEvent {
        ts_ns: 5,
        kind: PressureKind::Kernel(RecordKind::DirectReclaimEnd),
        pid: 1,
        tgid: 1,
        comm: "postgres".to_string(),
        cgroup_id: 0,
        stall: ms(12),
        value: 3,
        order: 0,
        gfp_flags: 0,
        events: 1,
    };
    assert_eq!(
        PressureSignal::from_event(&ev),
        (PressureSignal::DirectReclaim { stall: ms(12) }, None)
    );
    ev.kind = PressureKind::PolledSample {
        avg_non_reclaimable: 42,
        samples: 5,
    };
    assert_eq!(
        PressureSignal::from_event(&ev),
        (PressureSignal::PolledSample, Some(42))
    );
    ev.kind = PressureKind::Kernel(RecordKind::OomVictim);
    assert_eq!(PressureSignal::from_event(&ev).0, PressureSignal::OomKill);
}

#[test]
fn inputs_round_trip_through_json_for_replay() {
    let inputs = vec![
        Input::Start {
            at: ms(0),
            mem_total: GIB,
        },
        pressure(ms(1), 5),
        Input::Applied {
            at: ms(2),
            effect: Effect::MemoryHigh {
                value: MemoryHigh::Max,
            },
            result: Err("x".to_string()),
        },
    ];
    let text = serde_json::to_string(&inputs).unwrap();
    let back: Vec<Input> = serde_json::from_str(&text).unwrap();
    assert_eq!(back, inputs);
}

#[test]
fn decisions_carry_context() {
    let mut p = started(GIB);
    let thr = p.threshold();
    let a = run(&mut p, pressure(ms(100), thr + MIB));
    let d = decisions(&a)
        .into_iter()
        .find(|d| d.kind == DecisionKind::UpscaleRequested)
        .unwrap();
    assert_eq!(d.reading, Some(p.threshold() + MIB));
    assert_eq!(d.peak, Some(p.threshold() + MIB));
    assert_eq!(d.usable, 924 * MIB);
    assert!(d.input.contains("memcg_reclaim"), "{}", d.input);
    serde_json::to_string(&d).unwrap();
}

#[test]
fn guest_wide_signal_does_not_step_memory_high() {
    let mut p = started(GIB);
    let a = run(
        &mut p,
        Input::Pressure {
            at: ms(10),
            signal: PressureSignal::OomKill,
            reading: Some(10 * MIB),
        },
    );
    assert_eq!(upscales(&a).len(), 1);
    assert!(highs(&a).is_empty());
    assert!(p.upscale_pending(ms(10)));
    // Cgroup pressure while that upscale is pending does step it.
    let a = run(
        &mut p,
        Input::Pressure {
            at: ms(50),
            signal: PressureSignal::PsiTrigger,
            reading: Some(10 * MIB),
        },
    );
    assert_eq!(highs(&a).len(), 1);
}

#[test]
fn startup_respects_an_early_reading() {
    let mut p = Policy::new(guarded()).unwrap();
    run(&mut p, reading(ms(0), 950 * MIB));
    let a = run(
        &mut p,
        Input::Start {
            at: ms(0),
            mem_total: GIB,
        },
    );
    // The threshold is 870.4 MiB, usage is above it: memory.high goes above usage, and an
    // upscale is requested straight away.
    assert_eq!(
        highs(&a),
        vec![MemoryHigh::Max, MemoryHigh::Bytes(960 * MIB)]
    );
    assert_eq!(upscales(&a).len(), 1);
}

/// Regression (found by proptest): the tick schedule used to depend on the input's time, so an
/// invalid request arriving after the pressure hold changed state.
#[test]
fn invalid_request_after_time_passes_changes_nothing() {
    let cfg = Config {
        manage_file_cache: false,
        ..guarded()
    };
    let mut p = Policy::new(cfg).unwrap();
    let a = p.handle(Input::Start {
        at: ms(0),
        mem_total: 512 * MIB,
    });
    let first = effects(&a)[0];
    // Pressure while the startup effects are still outstanding.
    p.handle(Input::Pressure {
        at: ms(0),
        signal: PressureSignal::DirectReclaim { stall: ms(10) },
        reading: None,
    });
    run(
        &mut p,
        Input::Applied {
            at: ms(0),
            effect: first,
            result: Ok(()),
        },
    );
    for at in [ms(1), ms(501)] {
        let before = p.clone();
        let a = run(&mut p, Input::DownscaleRequest { at, target_mem: 0 });
        assert!(matches!(only_reply(&a), ScalingOutcome::InternalError(_)));
        assert_eq!(p, before);
    }
}

// ---- default mode: memory.high reset to max and left there; readings drive everything ----

fn shipped(alloc: u64) -> Policy {
    started_at(Config::default(), alloc)
}

#[test]
fn default_mode_writes_only_max_and_never_limits() {
    let mut p = Policy::new(Config::default()).unwrap();
    let mut all = run(&mut p, reading(ms(0), 100 * MIB));
    all.extend(run(
        &mut p,
        Input::Start {
            at: ms(0),
            mem_total: 2 * GIB,
        },
    ));
    all.extend(pressure_then_grant(&mut p, 20));
    all.extend(run(&mut p, Input::Shutdown { at: ms(1200) }));
    assert_eq!(
        highs(&all),
        vec![MemoryHigh::Max, MemoryHigh::Max],
        "{all:?}"
    );
    assert!(!upscales(&all).is_empty());
    assert!(p.is_shut_down());
}

#[test]
fn recheck_follows_the_rate_limit_while_over_the_threshold_and_stops_below() {
    let mut p = shipped(2 * GIB);
    let over = p.threshold() + 10 * MIB;
    assert_eq!(p.recheck_at(), None, "below the threshold nothing is due");
    let a = run(&mut p, reading(ms(10_000), over));
    assert_eq!(upscales(&a).len(), 1);
    let due = p.recheck_at().expect("a re-check while over the threshold");
    assert_eq!(due, ms(11_000));
    // No grant: every re-check on schedule asks again, for as long as usage stays over.
    for i in 1..=12u64 {
        let at = ms(10_000 + i * 1000);
        assert_eq!(p.recheck_at(), Some(at));
        let a = run(&mut p, reading(at, over));
        assert_eq!(upscales(&a).len(), 1, "re-check {i}: {a:?}");
    }
    let a = run(&mut p, reading(ms(23_000), 100 * MIB));
    assert!(upscales(&a).is_empty());
    assert_eq!(p.recheck_at(), None);
    // A second crossing after the release is seen like the first.
    let a = run(&mut p, reading(ms(30_000), over));
    assert_eq!(upscales(&a).len(), 1);
}

#[test]
fn growth_hint_budget_is_most_of_the_headroom_with_a_floor() {
    let mut p = shipped(2 * GIB);
    let t = p.threshold();
    assert_eq!(p.growth_hint(), None, "no reading yet");
    run(&mut p, reading(ms(100), t - 800 * MIB));
    assert_eq!(p.growth_hint(), Some((ms(100), 700 * MIB)));
    run(&mut p, reading(ms(200), t - 8 * MIB));
    assert_eq!(
        p.growth_hint(),
        Some((ms(200), 7 * MIB)),
        "never past the crossing"
    );
    run(&mut p, reading(ms(250), t - 64 * 1024));
    assert_eq!(p.growth_hint(), Some((ms(250), 256 * 1024)), "floor");
    run(&mut p, reading(ms(300), t + 100 * MIB));
    assert_eq!(
        p.growth_hint(),
        Some((ms(300), 16 * MIB)),
        "over the threshold"
    );
    run(&mut p, Input::Shutdown { at: ms(400) });
    assert_eq!(p.growth_hint(), None, "disarmed once shutting down");
    assert_eq!(p.recheck_at(), None);
}

#[test]
fn config_from_old_recordings_keeps_the_guard() {
    let mut v = serde_json::to_value(Config::default()).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("memory_high_guard");
    obj.remove("growth_hint_floor");
    obj.remove("growth_hint_over");
    let old: Config = serde_json::from_value(v).unwrap();
    assert!(old.memory_high_guard);
    assert_eq!(old.growth_hint_floor, Config::default().growth_hint_floor);
    assert_eq!(old.growth_hint_over, Config::default().growth_hint_over);
    assert!(!Config::default().memory_high_guard);
}
