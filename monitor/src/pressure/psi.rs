//! The `psi` tier: event-driven without eBPF. A PSI trigger on the cgroup's `memory.pressure`
//! (the kernel wakes us with POLLPRI when stall time in a window crosses a threshold) plus
//! change notifications on `memory.events` (kernfs notifies on every high/max/oom event).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use inotify::{Inotify, WatchMask};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{PressureEvent, PressureKind};
use crate::cgroup::CgroupTarget;

/// A PSI trigger: fire when tasks stalled on memory for `stall` within `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PsiTrigger {
    pub stall: Duration,
    pub window: Duration,
}

impl Default for PsiTrigger {
    /// 20 ms of "some" stall per 500 ms (the smallest window the kernel accepts): early enough
    /// to act before Postgres is visibly slowed.
    fn default() -> Self {
        PsiTrigger {
            stall: Duration::from_millis(20),
            window: Duration::from_millis(500),
        }
    }
}

impl PsiTrigger {
    /// The line written to `memory.pressure`, e.g. `some 20000 500000`.
    pub fn spec(&self) -> anyhow::Result<String> {
        let window_us = self.window.as_micros();
        let stall_us = self.stall.as_micros();
        if !(500_000..=10_000_000).contains(&window_us) {
            bail!(
                "PSI window must be between 500 ms and 10 s, got {:?}",
                self.window
            );
        }
        if stall_us == 0 || stall_us > window_us {
            bail!(
                "PSI stall threshold must be > 0 and ≤ the window, got {:?}",
                self.stall
            );
        }
        Ok(format!("some {stall_us} {window_us}"))
    }
}

/// Starts both watchers for `target`. Fails early if the trigger cannot be registered.
pub fn spawn(
    target: &CgroupTarget,
    trigger: PsiTrigger,
    tx: mpsc::Sender<PressureEvent>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let pressure = register_trigger(&target.path.join("memory.pressure"), trigger)?;
    let events_path = target.path.join("memory.events");
    let events = watch_events(&events_path)?;
    Ok(vec![
        tokio::spawn(run_trigger(pressure, tx.clone())),
        tokio::spawn(run_events(events, events_path, tx)),
    ])
}

impl PsiTrigger {
    /// The trigger an unprivileged process may register: since Linux 6.5 (and on stable kernels
    /// with the change backported, Debian's 6.1 among them) a trigger whose opener lacks
    /// CAP_SYS_RESOURCE must use a window that is a multiple of 2 s. The stall
    /// threshold keeps its share of the window.
    pub fn unprivileged(self) -> PsiTrigger {
        const STEP_US: u128 = 2_000_000;
        let window_us = self.window.as_micros().max(1);
        let rounded = window_us.div_ceil(STEP_US) * STEP_US;
        let stall_us = (self.stall.as_micros() * rounded / window_us).clamp(1, rounded);
        PsiTrigger {
            stall: Duration::from_micros(u64::try_from(stall_us).unwrap_or(u64::MAX)),
            window: Duration::from_micros(u64::try_from(rounded).unwrap_or(u64::MAX)),
        }
    }
}

fn register_trigger(path: &Path, trigger: PsiTrigger) -> anyhow::Result<AsyncFd<std::fs::File>> {
    let spec = trigger.spec()?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {} (PSI enabled? boot with psi=1)", path.display()))?;
    // The trigger lives as long as this fd stays open.
    match file.write_all(format!("{spec}\0").as_bytes()) {
        Ok(()) => info!(trigger = %spec, "PSI trigger registered"),
        Err(err)
            if err.raw_os_error() == Some(libc::EINVAL) && trigger.unprivileged() != trigger =>
        {
            let fallback = trigger.unprivileged();
            let fallback_spec = fallback.spec()?;
            file.write_all(format!("{fallback_spec}\0").as_bytes())
                .with_context(|| {
                    format!(
                        "registering PSI trigger {spec:?} on {} (refused: {err}), then {fallback_spec:?}",
                        path.display()
                    )
                })?;
            warn!(
                refused = %spec,
                trigger = %fallback_spec,
                "PSI trigger registered with a 2 s window: without CAP_SYS_RESOURCE this kernel accepts only multiples of 2 s (Linux 6.5, backported to some older stable kernels), and reports such triggers at most every 2 s"
            );
        }
        Err(err) => {
            return Err(err).with_context(|| {
                format!("registering PSI trigger {spec:?} on {}", path.display())
            });
        }
    }
    super::register_fd(file, Interest::PRIORITY)
        .with_context(|| format!("watching {} for POLLPRI", path.display()))
}

async fn run_trigger(
    fd: AsyncFd<std::fs::File>,
    tx: mpsc::Sender<PressureEvent>,
) -> anyhow::Result<()> {
    loop {
        let mut guard = fd
            .ready(Interest::PRIORITY)
            .await
            .context("waiting for the PSI trigger")?;
        guard.clear_ready();
        if tx
            .send(PressureEvent::now(PressureKind::PsiTrigger))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

struct EventsWatch {
    inotify: Inotify,
    last: Counts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    high: u64,
    max: u64,
    oom: u64,
    oom_kill: u64,
}

fn read_counts(path: &Path) -> anyhow::Result<Counts> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ev = crate::memstat::parse_memory_events(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(Counts {
        high: ev.high,
        max: ev.max,
        oom: ev.oom,
        oom_kill: ev.oom_kill,
    })
}

fn watch_events(path: &Path) -> anyhow::Result<EventsWatch> {
    let last = read_counts(path)?;
    let inotify = Inotify::init().context("inotify_init")?;
    inotify
        .watches()
        .add(path, WatchMask::MODIFY)
        .with_context(|| format!("inotify watch on {}", path.display()))?;
    Ok(EventsWatch { inotify, last })
}

async fn run_events(
    watch: EventsWatch,
    path: PathBuf,
    tx: mpsc::Sender<PressureEvent>,
) -> anyhow::Result<()> {
    let EventsWatch { inotify, mut last } = watch;
    let mut stream = inotify
        .into_event_stream([0u8; 1024])
        .context("inotify event stream")?;
    while let Some(item) = stream.next().await {
        if let Err(err) = item {
            crate::logging::warn_limited!(error = %err, "memory.events watch failed");
            continue;
        }
        let now = match read_counts(&path) {
            Ok(c) => c,
            Err(err) => {
                debug!(error = %format!("{err:#}"), "memory.events unreadable after notify");
                continue;
            }
        };
        // kernfs notifies for every counter (low too); only pressure-relevant changes count.
        if now == last {
            continue;
        }
        last = now;
        let ev = PressureEvent::now(PressureKind::MemoryEvents {
            high: now.high,
            max: now.max,
            oom: now.oom,
            oom_kill: now.oom_kill,
        });
        if tx.send(ev).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unprivileged_triggers_use_two_second_windows() {
        let t = PsiTrigger::default().unprivileged();
        assert_eq!(t.window, Duration::from_secs(2));
        assert_eq!(t.stall, Duration::from_millis(80));
        assert_eq!(t.spec().unwrap(), "some 80000 2000000");
        let already = PsiTrigger {
            stall: Duration::from_millis(100),
            window: Duration::from_secs(4),
        };
        assert_eq!(already.unprivileged(), already);
    }

    #[test]
    fn trigger_spec_is_validated() {
        assert_eq!(PsiTrigger::default().spec().unwrap(), "some 20000 500000");
        let too_short = PsiTrigger {
            stall: Duration::from_millis(10),
            window: Duration::from_millis(100),
        };
        assert!(too_short.spec().is_err());
        let stall_too_long = PsiTrigger {
            stall: Duration::from_secs(2),
            window: Duration::from_secs(1),
        };
        assert!(stall_too_long.spec().is_err());
        let zero = PsiTrigger {
            stall: Duration::ZERO,
            window: Duration::from_secs(1),
        };
        assert!(zero.spec().is_err());
    }
}
