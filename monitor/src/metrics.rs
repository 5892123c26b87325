//! Prometheus metrics, served at `GET /metrics` (Prometheus text format 0.0.4, or OpenMetrics
//! when the scraper asks for it).
//!
//! Counters the engine bumps per event are pre-created handles (one atomic increment, no
//! lookup, no allocation), and the VM's sizes are plain atomic stores after each input. What is
//! counted elsewhere anyway — the kernel's per-kind counters, program run statistics, agent
//! sessions — is read at scrape time by a [`Collector`], so the event path does not pay for it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use monitor_ebpf::KindCounters;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::backend::{ScalingOutcome, ScalingRequest};
use crate::memstat::MemoryHigh;
use crate::policy::{DecisionKind, Input, Policy};
use crate::pressure::ebpf::{CounterReader, ProgramStats, ProgramStatsReader};
use crate::pressure::{PressureEvent, PressureKind, RecordKind, Tier, boottime_ns, kind_names};
use crate::session::Sessions;

/// Every metric name starts with `vm_monitor_`.
pub const PREFIX: &str = "vm_monitor";

/// Reaction-latency buckets (seconds): 100 µs … 10 s in 1-2.5-5 steps.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Pressure-event kinds with a counter slot: the kernel record kinds, then the other tiers'.
const N_KINDS: usize = RecordKind::ALL.len() + 3;

/// The `kind` label of slot `i`; equal to [`PressureEvent::kind_name`] of events in that slot.
fn slot_name(i: usize) -> &'static str {
    match RecordKind::ALL.get(i) {
        Some(k) => k.name(),
        None => match i - RecordKind::ALL.len() {
            0 => kind_names::PSI_TRIGGER,
            1 => kind_names::MEMORY_EVENTS,
            _ => kind_names::POLLED_SAMPLE,
        },
    }
}

fn slot_of(kind: &PressureKind) -> usize {
    let kernel = RecordKind::ALL.len();
    match kind {
        PressureKind::Kernel(k) => RecordKind::ALL.iter().position(|x| x == k).unwrap_or(0),
        PressureKind::PsiTrigger => kernel,
        PressureKind::MemoryEvents { .. } => kernel + 1,
        PressureKind::PolledSample { .. } => kernel + 2,
    }
}

type Label = [(&'static str, &'static str); 1];

/// Sentinel for "not known yet" in the scrape-time VM gauges.
const UNKNOWN: u64 = u64::MAX;
/// Sentinel for `memory.high = max`.
const HIGH_MAX: u64 = u64::MAX - 1;

/// Kernel-side statistics read at scrape time (the eBPF tier's counters and program stats).
pub trait KernelSource: Send + Sync + 'static {
    /// Per-kind seen/emitted/coalesced/dropped totals.
    fn counters(&self) -> anyhow::Result<BTreeMap<RecordKind, KindCounters>>;
    /// Whether `kernel.bpf_stats_enabled` is on, and the programs' run statistics (empty when
    /// off: the kernel does not accumulate them then).
    fn programs(&self) -> anyhow::Result<(bool, Vec<ProgramStats>)>;
}

/// [`KernelSource`] of a running eBPF pipeline.
pub struct EbpfKernelSource {
    counters: CounterReader,
    programs: ProgramStatsReader,
    /// The programs hold their own `BPF_ENABLE_STATS` (`--bpf-stats`), which the sysctl does
    /// not show.
    holds_run_stats: bool,
}

impl EbpfKernelSource {
    /// From the pipeline's counter and statistics readers.
    pub fn new(counters: CounterReader, programs: ProgramStatsReader) -> Self {
        Self {
            counters,
            programs,
            holds_run_stats: false,
        }
    }

    /// Marks the statistics as accumulated regardless of the sysctl (`--bpf-stats`).
    pub fn holding_run_stats(mut self, held: bool) -> Self {
        self.holds_run_stats = held;
        self
    }
}

impl KernelSource for EbpfKernelSource {
    fn counters(&self) -> anyhow::Result<BTreeMap<RecordKind, KindCounters>> {
        self.counters.snapshot()
    }

    fn programs(&self) -> anyhow::Result<(bool, Vec<ProgramStats>)> {
        if !self.holds_run_stats && !crate::pressure::ebpf::bpf_stats_enabled()? {
            return Ok((false, Vec::new()));
        }
        Ok((true, self.programs.read()?))
    }
}

/// The daemon's metrics. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

struct Inner {
    registry: Registry,
    pressure_events: [Counter; N_KINDS],
    pressure_records: [Counter; N_KINDS],
    upscale_requests: Counter,
    reaction_latency: Histogram,
    downscale_approved: Counter,
    downscale_denied: Counter,
    downscale_failed: Counter,
    upscale_confirmed: Counter,
    upscale_failed: Counter,
    decisions: Family<Label, Counter>,
    live: Arc<Live>,
}

/// What the scrape-time collector reads.
struct Live {
    /// Set once the pressure source is chosen; `None` inside: no cgroup is watched.
    tier: OnceLock<Option<Tier>>,
    vm: VmGauges,
    sessions: OnceLock<Arc<Sessions>>,
    admission: OnceLock<Arc<crate::admission::Admission>>,
    kernel: OnceLock<Box<dyn KernelSource>>,
}

/// Latest VM sizes, as plain atomics the engine stores after each input.
struct VmGauges {
    threshold: AtomicU64,
    usable: AtomicU64,
    allocation: AtomicU64,
    memory_high: AtomicU64,
    file_cache: AtomicU64,
    non_reclaimable: AtomicU64,
    current: AtomicU64,
}

impl VmGauges {
    fn new() -> Self {
        let unknown = || AtomicU64::new(UNKNOWN);
        Self {
            threshold: unknown(),
            usable: unknown(),
            allocation: unknown(),
            memory_high: unknown(),
            file_cache: unknown(),
            non_reclaimable: unknown(),
            current: unknown(),
        }
    }
}

fn store(cell: &AtomicU64, value: Option<u64>) {
    // Real byte counts never reach the sentinels.
    cell.store(
        value.map_or(UNKNOWN, |v| v.min(HIGH_MAX - 1)),
        Ordering::Relaxed,
    );
}

fn load(cell: &AtomicU64) -> Option<u64> {
    match cell.load(Ordering::Relaxed) {
        UNKNOWN => None,
        v => Some(v),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);

        let events = Family::<Label, Counter>::default();
        let records = Family::<Label, Counter>::default();
        // Pre-created so every kind shows up from the first scrape (rate() needs the zero) and
        // the event path is a bare atomic increment.
        let pressure_events =
            std::array::from_fn(|i| events.get_or_create(&[("kind", slot_name(i))]).clone());
        let pressure_records =
            std::array::from_fn(|i| records.get_or_create(&[("kind", slot_name(i))]).clone());
        registry.register(
            "pressure_events",
            "Pressure events received by the engine, by kind (an event the kernel coalesced into another's record counts as one)",
            events,
        );
        registry.register(
            "pressure_records",
            "Pressure records received by the engine, by kind (one per wake-up record, after in-kernel coalescing)",
            records,
        );

        let upscale_requests = Counter::default();
        registry.register(
            "upscale_requests",
            "UpscaleRequests the engine decided on and handed to the agent session (after the policy's rate limit)",
            upscale_requests.clone(),
        );
        let reaction_latency = Histogram::new(LATENCY_BUCKETS);
        registry.register_with_unit(
            "reaction_latency",
            "Time from the pressure event that triggered an UpscaleRequest (its kernel timestamp, CLOCK_BOOTTIME) to the request being handed to the agent session",
            Unit::Seconds,
            reaction_latency.clone(),
        );

        let downscales = Family::<Label, Counter>::default();
        let downscale_approved = downscales.get_or_create(&[("result", "approved")]).clone();
        let downscale_denied = downscales.get_or_create(&[("result", "denied")]).clone();
        let downscale_failed = downscales.get_or_create(&[("result", "error")]).clone();
        registry.register(
            "downscale_requests",
            "DownscaleRequests answered, by result (approved, denied, error = InternalError)",
            downscales,
        );
        let upscales = Family::<Label, Counter>::default();
        let upscale_confirmed = upscales.get_or_create(&[("result", "confirmed")]).clone();
        let upscale_failed = upscales.get_or_create(&[("result", "error")]).clone();
        registry.register(
            "upscale_notifications",
            "UpscaleNotifications answered, by result (confirmed, error = InternalError)",
            upscales,
        );
        let decisions = Family::<Label, Counter>::default();
        registry.register(
            "decisions",
            "Decision-log records, by kind (see GET /debug/decisions)",
            decisions.clone(),
        );
        registry.register(
            "build",
            "vm-monitor build information",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );

        let live = Arc::new(Live {
            tier: OnceLock::new(),
            vm: VmGauges::new(),
            sessions: OnceLock::new(),
            admission: OnceLock::new(),
            kernel: OnceLock::new(),
        });
        registry.register_collector(Box::new(LiveCollector { live: live.clone() }));

        Metrics {
            inner: Arc::new(Inner {
                registry,
                pressure_events,
                pressure_records,
                upscale_requests,
                reaction_latency,
                downscale_approved,
                downscale_denied,
                downscale_failed,
                upscale_confirmed,
                upscale_failed,
                decisions,
                live,
            }),
        }
    }

    // ---- set-up (once) ----------------------------------------------------------------

    /// The active signal tier (`None`: no cgroup is watched). Later calls are ignored.
    pub fn set_tier(&self, tier: Option<Tier>) {
        let _ = self.inner.live.tier.set(tier);
    }

    /// Agent sessions to report on. Later calls are ignored.
    pub fn set_sessions(&self, sessions: Arc<Sessions>) {
        let _ = self.inner.live.sessions.set(sessions);
    }

    /// The agent listener's connection budgets to report on. Later calls are ignored.
    pub fn set_admission(&self, admission: Arc<crate::admission::Admission>) {
        let _ = self.inner.live.admission.set(admission);
    }

    /// Kernel-side statistics (eBPF tier). Later calls are ignored.
    pub fn set_kernel(&self, source: Box<dyn KernelSource>) {
        let _ = self.inner.live.kernel.set(source);
    }

    // ---- engine (hot path: atomics only) ------------------------------------------------

    /// One event from the pressure stream.
    pub fn pressure_event(&self, ev: &PressureEvent) {
        let slot = slot_of(&ev.kind);
        self.inner.pressure_events[slot].inc_by(u64::from(ev.events.max(1)));
        self.inner.pressure_records[slot].inc();
    }

    /// Readings carried by an input, before the policy sees it.
    pub fn input(&self, input: &Input) {
        let vm = &self.inner.live.vm;
        match input {
            Input::Pressure {
                reading: Some(r), ..
            } => store(&vm.non_reclaimable, Some(*r)),
            Input::Reading {
                non_reclaimable,
                current,
                ..
            } => {
                store(&vm.non_reclaimable, Some(*non_reclaimable));
                store(&vm.current, Some(*current));
            }
            _ => {}
        }
    }

    /// The policy's sizes after an input was handled.
    pub fn policy_state(&self, policy: &Policy) {
        let vm = &self.inner.live.vm;
        // 0 before Start: not meaningful yet.
        store(&vm.threshold, Some(policy.threshold()).filter(|t| *t > 0));
        store(&vm.usable, Some(policy.usable()).filter(|u| *u > 0));
        store(&vm.allocation, policy.allocation());
        store(&vm.file_cache, policy.file_cache());
        match policy.memory_high() {
            Some(MemoryHigh::Max) => vm.memory_high.store(HIGH_MAX, Ordering::Relaxed),
            Some(MemoryHigh::Bytes(b)) => store(&vm.memory_high, Some(b)),
            None => store(&vm.memory_high, None),
        }
    }

    /// The engine handed an UpscaleRequest to the session; `trigger_at` is the boot-clock time
    /// of the pressure event that triggered it, if a pressure event did.
    pub fn upscale_requested(&self, trigger_at: Option<Duration>) {
        self.inner.upscale_requests.inc();
        if let Some(at) = trigger_at {
            let now = Duration::from_nanos(boottime_ns());
            self.inner
                .reaction_latency
                .observe(now.saturating_sub(at).as_secs_f64());
        }
    }

    // ---- other observers ----------------------------------------------------------------

    /// A decision-log record.
    pub fn decision(&self, kind: DecisionKind) {
        self.inner
            .decisions
            .get_or_create(&[("kind", crate::decisions::kind_name(kind))])
            .inc();
    }

    /// An agent request was answered (`None`: the backend dropped it).
    pub fn scaling_outcome(&self, request: &ScalingRequest, outcome: Option<&ScalingOutcome>) {
        let i = &self.inner;
        let counter = match (request, outcome) {
            (
                ScalingRequest::Downscale { .. },
                Some(ScalingOutcome::Downscale { ok: true, .. }),
            ) => &i.downscale_approved,
            (
                ScalingRequest::Downscale { .. },
                Some(ScalingOutcome::Downscale { ok: false, .. }),
            ) => &i.downscale_denied,
            (ScalingRequest::Downscale { .. }, _) => &i.downscale_failed,
            (ScalingRequest::Upscale { .. }, Some(ScalingOutcome::UpscaleConfirmed)) => {
                &i.upscale_confirmed
            }
            (ScalingRequest::Upscale { .. }, _) => &i.upscale_failed,
        };
        counter.inc();
    }

    // ---- exposition -----------------------------------------------------------------------

    /// The text exposition: Prometheus 0.0.4, or OpenMetrics 1.0 with `openmetrics`.
    pub fn encode(&self, openmetrics: bool) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(8 * 1024);
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry)?;
        }
        Ok(out)
    }
}

const OPENMETRICS_TYPE: &str = "application/openmetrics-text";
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `GET /metrics`. OpenMetrics only when the `Accept` header asks for it (Prometheus does by
/// default); anything else gets the classic text format, which every scraper reads.
pub async fn handler(State(metrics): State<Metrics>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(OPENMETRICS_TYPE));
    // Inline, not on the blocking pool: the scrape-time reads are a few quick syscalls, and a
    // pool thread would exit ~10 s later, an extra wake-up of an otherwise idle daemon.
    let encoded = metrics.encode(openmetrics);
    match encoded {
        Ok(body) => {
            let content_type = if openmetrics {
                OPENMETRICS_CONTENT_TYPE
            } else {
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE
            };
            (
                [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
                body,
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response(),
    }
}

/// Scrape-time metrics.
struct LiveCollector {
    live: Arc<Live>,
}

impl fmt::Debug for LiveCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveCollector").finish_non_exhaustive()
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + fmt::Debug + Send + Sync + 'static>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

fn bytes_gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    cell: &AtomicU64,
) -> fmt::Result {
    match load(cell) {
        Some(v) => gauge(enc, name, help, Some(&Unit::Bytes), v),
        None => Ok(()),
    }
}

impl Collector for LiveCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let live = &self.live;
        if let Some(tier) = live.tier.get() {
            let name = tier.map_or_else(|| "none".to_string(), |t| t.to_string());
            let mut m = enc.encode_descriptor(
                "signal_tier",
                "Active pressure-signal tier (ebpf, psi, poll; none when no cgroup is watched); always 1.",
                None,
                MetricType::Gauge,
            )?;
            let labels = [("tier", name.as_str())];
            ConstGauge::new(1u64).encode(m.encode_family(&labels)?)?;
        }

        let vm = &live.vm;
        bytes_gauge(
            &mut enc,
            "upscale_threshold",
            "Non-reclaimable usage at which an UpscaleRequest is sent.",
            &vm.threshold,
        )?;
        bytes_gauge(
            &mut enc,
            "usable_memory",
            "Memory the policy sizes against (allocation minus the system buffer; MemTotal before the first scaling).",
            &vm.usable,
        )?;
        bytes_gauge(
            &mut enc,
            "allocation",
            "The agent's last applied memory allocation.",
            &vm.allocation,
        )?;
        bytes_gauge(
            &mut enc,
            "file_cache_size",
            "Postgres file cache size last applied.",
            &vm.file_cache,
        )?;
        bytes_gauge(
            &mut enc,
            "non_reclaimable",
            "Non-reclaimable usage of the cgroup at the last reading.",
            &vm.non_reclaimable,
        )?;
        bytes_gauge(
            &mut enc,
            "memory_current",
            "memory.current of the cgroup at the last full reading.",
            &vm.current,
        )?;
        match vm.memory_high.load(Ordering::Relaxed) {
            UNKNOWN => {}
            HIGH_MAX => gauge(
                &mut enc,
                "memory_high",
                "memory.high last written (+Inf for max).",
                Some(&Unit::Bytes),
                f64::INFINITY,
            )?,
            b => gauge(
                &mut enc,
                "memory_high",
                "memory.high last written (+Inf for max).",
                Some(&Unit::Bytes),
                b,
            )?,
        }

        if let Some(s) = live.sessions.get() {
            gauge(
                &mut enc,
                "agent_connected",
                "1 while an agent session (handshake complete) is current.",
                None,
                u64::from(s.current().is_some()),
            )?;
            counter(
                &mut enc,
                "agent_sessions",
                "Agent sessions accepted (protocol handshake completed).",
                s.accepted(),
            )?;
            gauge(
                &mut enc,
                "agent_connections",
                "Websocket connections open (any phase).",
                None,
                s.live() as u64,
            )?;
            counter(
                &mut enc,
                "upscale_requests_sent",
                "UpscaleRequest frames sent to the agent: one per request of the policy (rate-limited there) while an agent is connected.",
                s.upscale_requests_sent(),
            )?;
        }

        if let Some(a) = live.admission.get() {
            let (open, handshaking) = a.open();
            gauge(
                &mut enc,
                "tcp_connections",
                "TCP connections open on the agent listener (any state).",
                None,
                open as u64,
            )?;
            gauge(
                &mut enc,
                "websocket_handshakes",
                "Agent websockets upgraded but not through the version handshake yet.",
                None,
                handshaking as u64,
            )?;
            let mut m = enc.encode_descriptor(
                "connections_refused",
                "Connections and websocket upgrades refused on the agent listener, by reason.",
                None,
                MetricType::Counter,
            )?;
            for (why, n) in a.refusals() {
                ConstCounter::new(n).encode(m.encode_family(&[("reason", why.name())])?)?;
            }
        }

        if let Some(kernel) = live.kernel.get() {
            encode_kernel(&mut enc, kernel.as_ref())?;
        }
        Ok(())
    }
}

fn encode_kernel(enc: &mut DescriptorEncoder, kernel: &dyn KernelSource) -> fmt::Result {
    match kernel.counters() {
        Ok(counters) => {
            type Field = fn(&KindCounters) -> u64;
            let series: [(&str, &str, Field); 4] = [
                (
                    "ebpf_events_seen",
                    "Tracepoint hits that passed the in-kernel cgroup filter, by kind.",
                    |c| c.seen,
                ),
                (
                    "ebpf_records_emitted",
                    "Records the eBPF programs wrote to the ring buffer, by kind.",
                    |c| c.emitted,
                ),
                (
                    "ebpf_events_coalesced",
                    "Hits folded into a later record by in-kernel coalescing (--coalesce-ms), by kind.",
                    |c| c.coalesced,
                ),
                (
                    "ebpf_records_dropped",
                    "Records lost because the ring buffer was full, by kind.",
                    |c| c.dropped,
                ),
            ];
            for (name, help, field) in series {
                let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (kind, c) in &counters {
                    let labels = [("kind", kind.name())];
                    ConstCounter::new(field(c)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Err(err) => crate::logging::warn_limited!(
            error = %format!("{err:#}"),
            "cannot read the eBPF counters for /metrics"
        ),
    }
    match kernel.programs() {
        Ok((enabled, programs)) => {
            gauge(
                enc,
                "ebpf_stats_enabled",
                "1 when kernel.bpf_stats_enabled is on (program run count and time are accumulated).",
                None,
                u64::from(enabled),
            )?;
            if enabled {
                let mut m = enc.encode_descriptor(
                    "ebpf_program_runs",
                    "Times each eBPF program ran (accumulated only while kernel.bpf_stats_enabled=1).",
                    None,
                    MetricType::Counter,
                )?;
                for p in &programs {
                    let labels = [("program", p.program.as_str())];
                    ConstCounter::new(p.run_count).encode(m.encode_family(&labels)?)?;
                }
                // `m` borrows `enc` until its last use above.
                let mut m = enc.encode_descriptor(
                    "ebpf_program_run_time",
                    "Time spent in each eBPF program (accumulated only while kernel.bpf_stats_enabled=1).",
                    Some(&Unit::Seconds),
                    MetricType::Counter,
                )?;
                for p in &programs {
                    let labels = [("program", p.program.as_str())];
                    ConstCounter::new(p.run_time.as_secs_f64())
                        .encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Err(err) => crate::logging::warn_limited!(
            error = %format!("{err:#}"),
            "cannot read eBPF program statistics for /metrics"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Resources;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("exposition parses")
    }

    use ::tests::benchkit::sample_value as value;

    struct FakeKernel;

    impl KernelSource for FakeKernel {
        fn counters(&self) -> anyhow::Result<BTreeMap<RecordKind, KindCounters>> {
            let mut m = BTreeMap::new();
            m.insert(
                RecordKind::MemcgReclaimBegin,
                KindCounters {
                    seen: 10,
                    emitted: 4,
                    coalesced: 5,
                    dropped: 1,
                },
            );
            Ok(m)
        }

        fn programs(&self) -> anyhow::Result<(bool, Vec<ProgramStats>)> {
            Ok((
                true,
                vec![ProgramStats {
                    program: "memcg_reclaim_begin".into(),
                    run_count: 42,
                    run_time: Duration::from_micros(1500),
                }],
            ))
        }
    }

    #[test]
    fn slot_names_match_event_kind_names() {
        let mut kinds: Vec<PressureKind> = RecordKind::ALL
            .iter()
            .map(|k| PressureKind::Kernel(*k))
            .collect();
        kinds.push(PressureKind::PsiTrigger);
        kinds.push(PressureKind::MemoryEvents {
            high: 0,
            max: 0,
            oom: 0,
            oom_kill: 0,
        });
        kinds.push(PressureKind::PolledSample {
            avg_non_reclaimable: 0,
            samples: 1,
        });
        assert_eq!(kinds.len(), N_KINDS);
        let mut seen = std::collections::HashSet::new();
        for kind in kinds {
            let ev = PressureEvent::now(kind);
            assert_eq!(slot_name(slot_of(&ev.kind)), ev.kind_name());
            assert!(seen.insert(slot_of(&ev.kind)), "slots are distinct");
        }
    }

    #[tokio::test]
    async fn exposition_parses_and_reflects_updates() {
        let m = Metrics::new();
        let mut ev = PressureEvent::now(PressureKind::Kernel(RecordKind::MemcgReclaimEnd));
        ev.events = 3;
        m.pressure_event(&ev);
        m.pressure_event(&PressureEvent::now(PressureKind::PsiTrigger));
        m.upscale_requested(Some(Duration::from_nanos(boottime_ns())));
        m.upscale_requested(None);
        let down = ScalingRequest::Downscale {
            target: Resources {
                cpu: 1.0,
                mem_bytes: 1 << 30,
            },
        };
        m.scaling_outcome(
            &down,
            Some(&ScalingOutcome::Downscale {
                ok: true,
                status: String::new(),
            }),
        );
        m.scaling_outcome(
            &down,
            Some(&ScalingOutcome::Downscale {
                ok: false,
                status: String::new(),
            }),
        );
        m.scaling_outcome(&down, None);
        m.decision(DecisionKind::DownscaleDenied);
        m.input(&Input::Reading {
            at: Duration::ZERO,
            non_reclaimable: 100,
            current: 200,
        });
        m.set_tier(Some(Tier::Ebpf));
        m.set_tier(Some(Tier::Poll)); // ignored
        m.set_sessions(Sessions::new());
        m.set_kernel(Box::new(FakeKernel));
        m.inner
            .live
            .vm
            .memory_high
            .store(HIGH_MAX, Ordering::Relaxed);

        let text = m.encode(false).expect("encodes");
        let s = parse(&text);
        let v = |name: &str, labels: &[(&str, &str)]| value(&s, name, labels);
        assert_eq!(
            v(
                "vm_monitor_pressure_events_total",
                &[("kind", "memcg_reclaim_end")]
            ),
            Some(3.0)
        );
        assert_eq!(
            v(
                "vm_monitor_pressure_records_total",
                &[("kind", "memcg_reclaim_end")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "vm_monitor_pressure_events_total",
                &[("kind", "psi_trigger")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "vm_monitor_pressure_events_total",
                &[("kind", "oom_victim")]
            ),
            Some(0.0)
        );
        assert_eq!(v("vm_monitor_upscale_requests_total", &[]), Some(2.0));
        assert_eq!(
            v(
                "vm_monitor_downscale_requests_total",
                &[("result", "approved")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "vm_monitor_downscale_requests_total",
                &[("result", "denied")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "vm_monitor_downscale_requests_total",
                &[("result", "error")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "vm_monitor_upscale_notifications_total",
                &[("result", "confirmed")]
            ),
            Some(0.0)
        );
        assert_eq!(
            v(
                "vm_monitor_decisions_total",
                &[("kind", "downscale_denied")]
            ),
            Some(1.0)
        );
        assert_eq!(v("vm_monitor_signal_tier", &[("tier", "ebpf")]), Some(1.0));
        assert_eq!(v("vm_monitor_non_reclaimable_bytes", &[]), Some(100.0));
        assert_eq!(v("vm_monitor_memory_current_bytes", &[]), Some(200.0));
        assert_eq!(v("vm_monitor_memory_high_bytes", &[]), Some(f64::INFINITY));
        assert_eq!(
            v("vm_monitor_upscale_threshold_bytes", &[]),
            None,
            "unknown: absent"
        );
        assert_eq!(v("vm_monitor_agent_connected", &[]), Some(0.0));
        assert_eq!(v("vm_monitor_agent_sessions_total", &[]), Some(0.0));
        assert_eq!(
            v(
                "vm_monitor_ebpf_events_seen_total",
                &[("kind", "memcg_reclaim_begin")]
            ),
            Some(10.0)
        );
        assert_eq!(
            v(
                "vm_monitor_ebpf_events_coalesced_total",
                &[("kind", "memcg_reclaim_begin")]
            ),
            Some(5.0)
        );
        assert_eq!(
            v(
                "vm_monitor_ebpf_records_dropped_total",
                &[("kind", "memcg_reclaim_begin")]
            ),
            Some(1.0)
        );
        assert_eq!(v("vm_monitor_ebpf_stats_enabled", &[]), Some(1.0));
        assert_eq!(
            v(
                "vm_monitor_ebpf_program_runs_total",
                &[("program", "memcg_reclaim_begin")]
            ),
            Some(42.0)
        );
        assert_eq!(
            v(
                "vm_monitor_ebpf_program_run_time_seconds_total",
                &[("program", "memcg_reclaim_begin")]
            ),
            Some(0.0015)
        );
        assert_eq!(
            v(
                "vm_monitor_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        let hist = s
            .samples
            .iter()
            .find(|s| s.metric == "vm_monitor_reaction_latency_seconds")
            .expect("histogram present");
        match &hist.value {
            prometheus_parse::Value::Histogram(buckets) => {
                assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1, "plus +Inf");
                let last = buckets.last().map(|b| b.count);
                assert_eq!(last, Some(1.0), "one observation");
            }
            other => panic!("not a histogram: {other:?}"),
        }

        // OpenMetrics on request.
        let om = m.encode(true).expect("encodes");
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
