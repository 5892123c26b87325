//! The `poll` tier, Neon-compatible baseline: read `memory.stat` every 100 ms and average the
//! last 5 samples (500 ms). Kept as the contrast the event-driven tiers are measured against.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tracing::warn;

use super::{PressureEvent, PressureKind};
use crate::cgroup::CgroupTarget;

/// Poll period (reference `memory_poll_interval`).
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Samples averaged (reference `memory_history_len`).
pub const HISTORY_LEN: usize = 5;

/// Rolling mean of the last [`HISTORY_LEN`] samples.
#[derive(Debug, Default)]
pub struct RollingMean {
    samples: VecDeque<u64>,
}

impl RollingMean {
    /// Adds a sample and returns (mean, samples in the mean).
    pub fn push(&mut self, v: u64) -> (u64, u32) {
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(v);
        let sum: u128 = self.samples.iter().map(|&s| u128::from(s)).sum();
        let n = self.samples.len();
        ((sum / n as u128) as u64, n as u32)
    }
}

/// Starts polling `target`'s `memory.stat`; one [`PressureKind::PolledSample`] per tick.
pub fn spawn(
    target: &CgroupTarget,
    tx: mpsc::Sender<PressureEvent>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let path = target.path.join("memory.stat");
    tokio::spawn(run(path, tx))
}

async fn run(path: PathBuf, tx: mpsc::Sender<PressureEvent>) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut mean = RollingMean::default();
    let mut failing = false;
    loop {
        ticker.tick().await;
        // A plain read, like the reference's: cgroupfs answers from memory, and a trip through
        // the blocking pool would add thread hand-offs to every 100 ms tick.
        let stat = match std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))
            .and_then(|t| crate::memstat::parse_memory_stat(&t).map_err(anyhow::Error::from))
        {
            Ok(s) => {
                failing = false;
                s
            }
            Err(err) => {
                // Once per failure streak, not every 100 ms.
                if !failing {
                    warn!(error = %format!("{err:#}"), "poll tier cannot read memory.stat");
                    failing = true;
                }
                continue;
            }
        };
        let (avg, samples) = mean.push(stat.non_reclaimable());
        let ev = PressureEvent::now(PressureKind::PolledSample {
            avg_non_reclaimable: avg,
            samples,
        });
        if tx.send(ev).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_mean_covers_the_last_five_samples() {
        let mut m = RollingMean::default();
        assert_eq!(m.push(10), (10, 1));
        assert_eq!(m.push(20), (15, 2));
        for v in [30, 40, 50] {
            m.push(v);
        }
        assert_eq!(m.push(60), (40, 5)); // 20..60
        for _ in 0..HISTORY_LEN {
            m.push(u64::MAX);
        }
        assert_eq!(
            m.push(u64::MAX),
            (u64::MAX, 5),
            "no overflow on huge samples"
        );
    }
}
