//! The decision log: the last decisions (UpscaleRequests, downscale approvals and denials,
//! upscale handling, resizes, ...) with their inputs, readings and thresholds, kept in a
//! bounded in-memory ring and served as JSON at `GET /debug/decisions` (newest last).
//! Each decision is also logged through `tracing` where it is made.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::policy::{Decision, DecisionKind};
use crate::pressure::Tier;

/// Decisions kept by the daemon.
pub const DEFAULT_CAPACITY: usize = 1024;

/// One entry of the log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecisionRecord {
    /// Position in the daemon's decision sequence, from 1 (gaps in a page mean the ring
    /// overwrote older entries).
    pub seq: u64,
    /// Wall-clock time the record was stored (ms since the Unix epoch), to match log lines.
    pub unix_ms: u64,
    /// `at` in boot-clock nanoseconds (the clock eBPF events are stamped with).
    pub at_ns: u64,
    /// Signal tier active when it was made (`null`: no cgroup is watched).
    pub tier: Option<Tier>,
    #[serde(flatten)]
    pub decision: Decision,
}

/// A bounded ring of decisions; the oldest goes when it is full.
#[derive(Debug)]
pub struct DecisionLog {
    capacity: usize,
    tier: OnceLock<Option<Tier>>,
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    records: VecDeque<DecisionRecord>,
    total: u64,
}

impl DecisionLog {
    /// A log keeping the last `capacity` decisions (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            tier: OnceLock::new(),
            ring: Mutex::new(Ring {
                records: VecDeque::with_capacity(capacity),
                total: 0,
            }),
        }
    }

    /// The tier to stamp on records. Later calls are ignored.
    pub fn set_tier(&self, tier: Option<Tier>) {
        let _ = self.tier.set(tier);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding the lock cannot leave the ring incoherent (push/pop only).
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a decision; returns its sequence number.
    pub fn push(&self, decision: Decision) -> u64 {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let at_ns = u64::try_from(decision.at.as_nanos()).unwrap_or(u64::MAX);
        let tier = self.tier.get().copied().flatten();
        let mut ring = self.lock();
        ring.total += 1;
        let seq = ring.total;
        if ring.records.len() == self.capacity {
            ring.records.pop_front();
        }
        ring.records.push_back(DecisionRecord {
            seq,
            unix_ms,
            at_ns,
            tier,
            decision,
        });
        seq
    }

    /// The newest `limit` records (all retained ones with `None`), oldest first.
    pub fn latest(&self, limit: Option<usize>) -> Vec<DecisionRecord> {
        let ring = self.lock();
        let n = limit.unwrap_or(usize::MAX).min(ring.records.len());
        ring.records
            .iter()
            .skip(ring.records.len() - n)
            .cloned()
            .collect()
    }

    /// Decisions stored since start (including those the ring has dropped).
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// Most records kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Drains the engine's decision channel into `log`, counting each in `metrics`. Ends when
/// every sender is gone.
pub fn spawn_collector(
    mut rx: mpsc::UnboundedReceiver<Decision>,
    log: Arc<DecisionLog>,
    metrics: Option<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if let Some(m) = &metrics {
                m.decision(d.kind);
            }
            log.push(d);
        }
    })
}

/// Query of `GET /debug/decisions`.
#[derive(Debug, Deserialize)]
pub struct DecisionsQuery {
    /// Only the newest N.
    pub limit: Option<usize>,
}

/// Body of `GET /debug/decisions`.
#[derive(Debug, Serialize)]
pub struct DecisionsPage {
    /// Most records the daemon keeps.
    pub capacity: usize,
    /// Decisions made since start (older ones than the ring holds are gone).
    pub total: u64,
    /// The records, oldest first.
    pub decisions: Vec<DecisionRecord>,
}

/// `GET /debug/decisions[?limit=N]`: the newest decisions as JSON, newest last. A malformed
/// `limit` is answered with 400 by the extractor.
pub async fn handler(
    State(log): State<Arc<DecisionLog>>,
    Query(query): Query<DecisionsQuery>,
) -> Json<DecisionsPage> {
    Json(DecisionsPage {
        capacity: log.capacity(),
        total: log.total(),
        decisions: log.latest(query.limit),
    })
}

/// Stable snake_case name of a decision kind (metrics label; matches its JSON form).
pub fn kind_name(kind: DecisionKind) -> &'static str {
    match kind {
        DecisionKind::Startup => "startup",
        DecisionKind::UpscaleRequested => "upscale_requested",
        DecisionKind::MemoryHighRaised => "memory_high_raised",
        DecisionKind::UpscaleApplied => "upscale_applied",
        DecisionKind::DownscaleApproved => "downscale_approved",
        DecisionKind::DownscaleDenied => "downscale_denied",
        DecisionKind::ScalingFailed => "scaling_failed",
        DecisionKind::Refused => "refused",
        DecisionKind::FileCacheResync => "file_cache_resync",
        DecisionKind::EffectFailed => "effect_failed",
        DecisionKind::Shutdown => "shutdown",
        DecisionKind::Ignored => "ignored",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn decision(n: u64) -> Decision {
        Decision {
            at: Duration::from_nanos(n),
            kind: DecisionKind::UpscaleRequested,
            input: format!("input {n}"),
            reading: Some(n),
            current: None,
            peak: None,
            threshold: 10,
            usable: 20,
            memory_high: None,
            file_cache: None,
            suppressed: 0,
            detail: String::new(),
        }
    }

    #[test]
    fn ring_keeps_the_newest_in_order() {
        let log = DecisionLog::new(3);
        assert!(log.latest(None).is_empty());
        for n in 1..=5 {
            assert_eq!(log.push(decision(n)), n);
        }
        assert_eq!(log.total(), 5);
        let all = log.latest(None);
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [3, 4, 5],
            "oldest dropped, newest last"
        );
        assert_eq!(all[2].at_ns, 5);
        let two = log.latest(Some(2));
        assert_eq!(two.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
        assert!(log.latest(Some(0)).is_empty());
        assert_eq!(log.latest(Some(99)).len(), 3);
    }

    #[test]
    fn zero_capacity_keeps_one() {
        let log = DecisionLog::new(0);
        log.push(decision(1));
        log.push(decision(2));
        assert_eq!(log.latest(None).len(), 1);
        assert_eq!(log.capacity(), 1);
    }

    #[test]
    fn records_serialize_flat_with_the_tier() {
        let log = DecisionLog::new(4);
        log.set_tier(Some(Tier::Psi));
        log.set_tier(Some(Tier::Ebpf)); // ignored
        log.push(decision(7));
        let v = serde_json::to_value(&log.latest(None)[0]).expect("serializes");
        assert_eq!(v["seq"], 1);
        assert_eq!(v["tier"], "psi");
        assert_eq!(v["kind"], "upscale_requested");
        assert_eq!(v["input"], "input 7");
        assert_eq!(v["reading"], 7);
        assert_eq!(v["threshold"], 10);
        assert_eq!(v["at_ns"], 7);
        assert!(v["unix_ms"].as_u64().is_some_and(|ms| ms > 0));
    }

    #[test]
    fn kind_names_match_the_json_form() {
        for kind in [
            DecisionKind::Startup,
            DecisionKind::UpscaleRequested,
            DecisionKind::MemoryHighRaised,
            DecisionKind::UpscaleApplied,
            DecisionKind::DownscaleApproved,
            DecisionKind::DownscaleDenied,
            DecisionKind::ScalingFailed,
            DecisionKind::Refused,
            DecisionKind::FileCacheResync,
            DecisionKind::EffectFailed,
            DecisionKind::Shutdown,
            DecisionKind::Ignored,
        ] {
            assert_eq!(
                serde_json::to_value(kind).ok(),
                Some(serde_json::Value::from(kind_name(kind)))
            );
        }
    }

    #[tokio::test]
    async fn collector_fills_the_log() {
        let log = Arc::new(DecisionLog::new(8));
        let (tx, rx) = mpsc::unbounded_channel();
        let task = spawn_collector(rx, log.clone(), Some(Metrics::new()));
        tx.send(decision(1)).expect("collector running");
        tx.send(decision(2)).expect("collector running");
        drop(tx);
        task.await.expect("collector ends cleanly");
        assert_eq!(log.total(), 2);
    }
}
