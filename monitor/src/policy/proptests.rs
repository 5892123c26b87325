//! Property tests: random input sequences (with effects acknowledged late, failed, or
//! interleaved with other inputs) must keep the policy's invariants.

use std::time::Duration;

use proptest::prelude::*;

use super::*;

const GIB: u64 = 1 << 30;

/// One generated step of a scenario.
#[derive(Clone, Debug)]
enum Ev {
    Pressure {
        dt: u64,
        kind: u8,
        reading: Option<u64>,
        stall_ms: u64,
    },
    Reading {
        dt: u64,
        bytes: u64,
    },
    Upscale {
        dt: u64,
        mem: u64,
    },
    Downscale {
        dt: u64,
        mem: u64,
    },
    /// Fires the scheduled tick if there is one, else a spurious tick.
    Tick {
        dt: u64,
    },
    /// Acknowledges the outstanding effect, successfully or not.
    Ack {
        fail: bool,
    },
    Connected,
    Disconnected,
    PgConnected {
        max: u64,
    },
}

fn mem() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (1u64..=16).prop_map(|n| n * 512 * MIB),
        1 => Just(0u64),
        1 => Just(50 * MIB),
        1 => Just(100 * MIB),
        1 => Just(u64::MAX),
    ]
}

fn reading() -> impl Strategy<Value = u64> {
    (0u64..9 * 1024).prop_map(|m| m * MIB)
}

fn ev() -> impl Strategy<Value = Ev> {
    let dt = || 0u64..1500;
    prop_oneof![
        6 => (dt(), 0u8..8, proptest::option::weighted(0.8, reading()), 0u64..40).prop_map(
            |(dt, kind, reading, stall_ms)| Ev::Pressure { dt, kind, reading, stall_ms }
        ),
        2 => (dt(), reading()).prop_map(|(dt, bytes)| Ev::Reading { dt, bytes }),
        2 => (dt(), mem()).prop_map(|(dt, mem)| Ev::Upscale { dt, mem }),
        2 => (dt(), mem()).prop_map(|(dt, mem)| Ev::Downscale { dt, mem }),
        3 => (0u64..60).prop_map(|dt| Ev::Tick { dt }),
        5 => proptest::bool::weighted(0.2).prop_map(|fail| Ev::Ack { fail }),
        1 => Just(Ev::Connected),
        1 => Just(Ev::Disconnected),
        1 => (0u64..20).prop_map(|g| Ev::PgConnected { max: g * GIB }),
    ]
}

fn signal(kind: u8, stall_ms: u64, n: u64) -> PressureSignal {
    let stall = Duration::from_millis(stall_ms);
    match kind {
        0 => PressureSignal::MemcgReclaim { stall },
        1 => PressureSignal::DirectReclaim { stall },
        2 => PressureSignal::OomKill,
        3 => PressureSignal::PsiTrigger,
        4 => PressureSignal::MemoryEvents {
            high: n,
            max: 0,
            oom: n / 3,
            oom_kill: n / 3,
        },
        5 => PressureSignal::KswapdWake,
        6 => PressureSignal::MemcgEvent { item: 1 },
        _ => PressureSignal::PolledSample,
    }
}

fn config(cgroup: bool, file_cache: bool, memory_high: bool) -> Config {
    Config {
        manage_cgroup: cgroup,
        manage_file_cache: file_cache,
        manage_memory_high: memory_high,
        memory_high_guard: true,
        ..Config::default()
    }
}

/// Drives a scenario, checking invariants after every input. Returns every input fed
/// (including acknowledgements) and every action produced, for replay checks.
struct Driver {
    p: Policy,
    now: Duration,
    outstanding: Option<Effect>,
    /// (time, bytes) of every reading fed, in order.
    readings: Vec<(Duration, u64)>,
    /// Usage the harness computes when a downscale is planned: max(latest, window peak).
    planned_usage: Option<u64>,
    last_upscale: Option<Duration>,
    requests: usize,
    replies: usize,
    inputs: Vec<Input>,
    actions: Vec<Action>,
    events_seen: u64,
}

impl Driver {
    fn new(cfg: Config) -> Self {
        Driver {
            p: Policy::new(cfg).unwrap(),
            now: Duration::ZERO,
            outstanding: None,
            readings: Vec::new(),
            planned_usage: None,
            last_upscale: None,
            requests: 0,
            replies: 0,
            inputs: Vec::new(),
            actions: Vec::new(),
            events_seen: 0,
        }
    }

    fn last_reading(&self) -> Option<u64> {
        self.readings.last().map(|(_, r)| *r)
    }

    fn harness_usage(&self) -> Option<u64> {
        let (t, latest) = *self.readings.last()?;
        if self.now.saturating_sub(t) > self.p.cfg.reading_max_age {
            return None;
        }
        let cutoff = self.now.saturating_sub(self.p.cfg.peak_window);
        let peak = self
            .readings
            .iter()
            .filter(|(t, _)| *t >= cutoff)
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(0);
        Some(latest.max(peak))
    }

    /// Usable memory of the in-flight scaling operation's plan, if any.
    fn plan_usable(&self) -> Option<u64> {
        match self.p.op.as_ref().map(|op| &op.kind) {
            Some(OpKind::Upscale { plan, .. }) | Some(OpKind::Downscale { plan, .. }) => {
                Some(plan.usable)
            }
            _ => None,
        }
    }

    /// The largest usable memory a memory.high write may be bounded by right now (the plan's
    /// for a new value, the committed one for a rollback).
    fn usable_bound(&self) -> u64 {
        self.plan_usable().unwrap_or(0).max(self.p.usable)
    }

    fn feed(&mut self, input: Input) -> Result<(), TestCaseError> {
        let is_request = matches!(
            input,
            Input::UpscaleNotification { .. } | Input::DownscaleRequest { .. }
        );
        let invalid = match input {
            Input::UpscaleNotification { granted_mem: m, .. }
            | Input::DownscaleRequest { target_mem: m, .. } => {
                (self.p.cfg.manage_cgroup || self.p.cfg.manage_file_cache)
                    && (m <= self.p.cfg.sys_buffer || m > self.p.cfg.max_mem)
            }
            _ => false,
        };
        if is_request {
            self.requests += 1;
        }
        let before = invalid.then(|| self.p.clone());
        // A downscale planned in an earlier call and still applying its effects.
        let mut carried = matches!(
            self.p.op.as_ref().map(|op| &op.kind),
            Some(OpKind::Downscale { .. })
        );
        let seq_before = self.p.op_seq;
        self.inputs.push(input.clone());
        let actions = self.p.handle(input);

        if let Some(before) = before {
            prop_assert_eq!(&self.p, &before, "invalid request changed state");
        }
        let carried_usage = self.planned_usage;
        // A downscale planned in this call and now waiting for its effects.
        if self.p.op_seq != seq_before
            && matches!(
                self.p.op.as_ref().map(|op| &op.kind),
                Some(OpKind::Downscale { .. })
            )
        {
            self.planned_usage = self.harness_usage();
        }
        // Whether the reply being looked at belongs to the carried downscale.
        let mut reply_is_carried = false;

        for action in &actions {
            match action {
                Action::SetMemoryHigh { value } => {
                    prop_assert!(self.p.cfg.writes_memory_high(), "memory.high written");
                    match value {
                        MemoryHigh::Bytes(v) => {
                            if let Some(r) = self.last_reading() {
                                prop_assert!(*v >= r, "memory.high {} below reading {}", v, r);
                            }
                            prop_assert!(
                                *v <= self.usable_bound(),
                                "memory.high {} above usable {}",
                                v,
                                self.usable_bound()
                            );
                        }
                        MemoryHigh::Max => {
                            let startup_or_shutdown = matches!(
                                self.p.op.as_ref().map(|op| &op.kind),
                                Some(OpKind::Startup) | Some(OpKind::Shutdown)
                            );
                            let usable = self.plan_usable().unwrap_or(u64::MAX).min(self.p.usable);
                            let over = self.last_reading().is_some_and(|r| r > usable);
                            // A rollback may restore a max that was legitimately written.
                            let undoing = self.p.op.as_ref().is_some_and(|op| op.undoing);
                            prop_assert!(
                                startup_or_shutdown || over || undoing,
                                "unexpected memory.high=max"
                            );
                        }
                    }
                }
                Action::SendUpscaleRequest { .. } => {
                    if let Some(last) = self.last_upscale {
                        prop_assert!(
                            self.now >= last + Duration::from_secs(1),
                            "upscale requests {:?} and {:?} closer than 1 s",
                            last,
                            self.now
                        );
                    }
                    self.last_upscale = Some(self.now);
                }
                Action::Reply(_) => {
                    self.replies += 1;
                    // The first reply of a call that finished a carried downscale is its own.
                    reply_is_carried = std::mem::take(&mut carried);
                }
                Action::Decision(d)
                    if d.kind == DecisionKind::DownscaleApproved && self.p.cfg.manage_cgroup =>
                {
                    // Planned earlier (usage as of then), or planned and finished now.
                    let usage = if reply_is_carried {
                        carried_usage
                    } else {
                        self.harness_usage()
                    };
                    prop_assert!(usage.is_some(), "approved without a fresh reading");
                    let usage = usage.unwrap_or(u64::MAX);
                    prop_assert!(
                        d.threshold >= usage + self.p.cfg.downscale_buffer,
                        "approved threshold {} < usage {} + buffer",
                        d.threshold,
                        usage
                    );
                }
                _ => {}
            }
            if let Some(effect) = action.effect() {
                prop_assert!(self.outstanding.is_none(), "two effects outstanding");
                self.outstanding = Some(effect);
            }
        }
        self.actions.extend(actions);
        Ok(())
    }

    fn ack(&mut self, fail: bool) -> Result<(), TestCaseError> {
        if let Some(effect) = self.outstanding.take() {
            let result = if fail {
                Err("injected failure".to_string())
            } else {
                Ok(())
            };
            self.feed(Input::Applied {
                at: self.now,
                effect,
                result,
            })?;
        }
        Ok(())
    }

    fn step(&mut self, ev: &Ev) -> Result<(), TestCaseError> {
        let ms = Duration::from_millis;
        match *ev {
            Ev::Pressure {
                dt,
                kind,
                reading,
                stall_ms,
            } => {
                self.now += ms(dt);
                self.events_seen += 1;
                if let Some(r) = reading {
                    self.readings.push((self.now, r));
                }
                let signal = signal(kind, stall_ms, self.events_seen);
                self.feed(Input::Pressure {
                    at: self.now,
                    signal,
                    reading,
                })
            }
            Ev::Reading { dt, bytes } => {
                self.now += ms(dt);
                self.readings.push((self.now, bytes));
                self.feed(Input::Reading {
                    at: self.now,
                    non_reclaimable: bytes,
                    current: bytes,
                })
            }
            Ev::Upscale { dt, mem } => {
                self.now += ms(dt);
                self.feed(Input::UpscaleNotification {
                    at: self.now,
                    granted_mem: mem,
                })
            }
            Ev::Downscale { dt, mem } => {
                self.now += ms(dt);
                self.feed(Input::DownscaleRequest {
                    at: self.now,
                    target_mem: mem,
                })
            }
            Ev::Tick { dt } => {
                let scheduled = self.actions.iter().rev().find_map(|a| match a {
                    Action::ScheduleTick { at } => Some(*at),
                    _ => None,
                });
                self.now = match scheduled {
                    Some(at) if at >= self.now => at,
                    _ => self.now + ms(dt),
                };
                let before = self.actions.len();
                self.feed(Input::Tick { at: self.now })?;
                let raised = self.actions[before..]
                    .iter()
                    .any(|a| matches!(a, Action::SetMemoryHigh { .. }));
                prop_assert!(
                    raised || self.p.tick_at.is_none_or(|t| t > self.now),
                    "a tick that did nothing left a tick due already"
                );
                Ok(())
            }
            Ev::Ack { fail } => self.ack(fail),
            Ev::Connected => self.feed(Input::AgentConnected { at: self.now }),
            Ev::Disconnected => self.feed(Input::AgentDisconnected { at: self.now }),
            Ev::PgConnected { max } => self.feed(Input::FileCacheConnected {
                at: self.now,
                max_size: max,
            }),
        }
    }

    /// Start, run the events, then shut down, acknowledging everything left.
    fn run(&mut self, mem_total: u64, pg_first: bool, evs: &[Ev]) -> Result<(), TestCaseError> {
        if pg_first {
            self.feed(Input::FileCacheConnected {
                at: self.now,
                max_size: 8 * GIB,
            })?;
        }
        self.feed(Input::Start {
            at: self.now,
            mem_total,
        })?;
        for ev in evs {
            self.step(ev)?;
        }
        // Drain: every effect acknowledged, and scheduled ticks fired until none is left
        // (stepping must terminate: each tick either raises memory.high or ends the schedule).
        while self.outstanding.is_some() {
            self.ack(false)?;
        }
        let mut ticks = 0;
        while let Some(due) = self.p.tick_at {
            ticks += 1;
            prop_assert!(ticks < 1000, "tick schedule does not terminate");
            self.now = self.now.max(due);
            let before = self.actions.len();
            self.feed(Input::Tick { at: self.now })?;
            let raised = self.actions[before..]
                .iter()
                .any(|a| matches!(a, Action::SetMemoryHigh { .. }));
            prop_assert!(
                raised || self.p.tick_at.is_none_or(|t| t > self.now),
                "a tick that did nothing was rescheduled for the same time"
            );
            while self.outstanding.is_some() {
                self.ack(false)?;
            }
        }
        self.now += Duration::from_secs(1);
        self.feed(Input::Shutdown { at: self.now })?;
        while self.outstanding.is_some() {
            self.ack(false)?;
        }
        Ok(())
    }
}

fn scenario() -> impl Strategy<Value = (bool, bool, bool, bool, u64, Vec<Ev>)> {
    (
        proptest::bool::weighted(0.85),
        proptest::bool::weighted(0.7),
        proptest::bool::weighted(0.8),
        any::<bool>(),
        (1u64..=16).prop_map(|n| n * 512 * MIB),
        proptest::collection::vec(ev(), 0..80),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// memory.high within [reading, usable]; upscale requests ≥ 1 s apart; approved downscales
    /// leave threshold ≥ usage + buffer; invalid requests change nothing; one effect at a time;
    /// every request answered once; shutdown completes.
    #[test]
    fn invariants_hold((cg, fc, mh, pg_first, mem_total, evs) in scenario()) {
        let mut d = Driver::new(config(cg, fc, mh));
        d.run(mem_total, pg_first, &evs)?;
        prop_assert_eq!(d.requests, d.replies, "every request answered exactly once");
        prop_assert!(d.p.is_shut_down());
        if d.p.cfg.writes_memory_high() {
            prop_assert_eq!(d.p.memory_high(), Some(MemoryHigh::Max));
        }
    }

    /// Feeding the recorded inputs (round-tripped through JSON) into a fresh policy replays
    /// the exact same actions.
    #[test]
    fn replay_is_deterministic((cg, fc, mh, pg_first, mem_total, evs) in scenario()) {
        let cfg = config(cg, fc, mh);
        let mut d = Driver::new(cfg.clone());
        d.run(mem_total, pg_first, &evs)?;
        let recorded = serde_json::to_string(&d.inputs).unwrap();
        let inputs: Vec<Input> = serde_json::from_str(&recorded).unwrap();
        let mut replay = Policy::new(cfg).unwrap();
        let actions: Vec<Action> = inputs.into_iter().flat_map(|i| replay.handle(i)).collect();
        prop_assert_eq!(&actions, &d.actions);
        prop_assert_eq!(&replay, &d.p);
    }
}
