//! The daemon's recording, end to end in process: the real engine with a recorder attached,
//! driven through its channels like the daemon drives it, then `replay` must reproduce every
//! decision the engine made. No cgroup is needed: poll-tier samples carry their own reading.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use monitor::backend::{Resources, ScalingCall, ScalingOutcome, ScalingRequest};
use monitor::engine::{self, EngineParts};
use monitor::policy::{Config, Policy};
use monitor::pressure::{PressureEvent, PressureKind, Tier};
use monitor::record::{Header, Recorder, Recording};
use tokio::sync::{mpsc, oneshot, watch};

const GIB: u64 = 1 << 30;

async fn call(calls: &mpsc::Sender<ScalingCall>, request: ScalingRequest) -> ScalingOutcome {
    let (reply, rx) = oneshot::channel();
    calls
        .send(ScalingCall { request, reply })
        .await
        .expect("engine running");
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("engine answers within the agent's timeout")
        .expect("engine replies")
}

fn sample(bytes: u64) -> PressureEvent {
    PressureEvent::now(PressureKind::PolledSample {
        avg_non_reclaimable: bytes,
        samples: 5,
    })
}

#[tokio::test]
async fn engine_recording_replays_identically() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("run.vmrec");
    let cfg = Config {
        manage_file_cache: false,
        manage_memory_high: false,
        ..Config::default()
    };
    let recorder = Recorder::create(&path, Header::daemon(Tier::Poll, None, &cfg, None))
        .expect("creating the recording");
    let (pressure_tx, pressure_rx) = mpsc::channel(16);
    let (stop_tx, stop_rx) = watch::channel(false);
    let handle = engine::spawn(
        EngineParts {
            policy: Policy::new(cfg).expect("valid config"),
            cgroup: None,
            file_cache: None,
            mem_total: 4 * GIB,
            metrics: None,
            recorder: Some(recorder),
            growth_hint: None,
        },
        Some(pressure_rx),
        stop_rx,
        None,
    );
    let mut wanted = handle.backend.upscale_wanted.clone();
    // As a session would on taking the seat: the policy sends requests only to an agent.
    handle.backend.agent_connected(1);
    let calls = handle.backend.calls.clone();

    // Quiet, then over the threshold (0.85 · 4 GiB): one UpscaleRequest.
    pressure_tx.send(sample(GIB)).await.expect("engine running");
    pressure_tx
        .send(sample(4 * GIB - 1))
        .await
        .expect("engine running");
    tokio::time::timeout(Duration::from_secs(5), wanted.changed())
        .await
        .expect("an upscale is wanted")
        .expect("engine running");
    let granted = Resources {
        cpu: 2.0,
        mem_bytes: 8 * GIB,
    };
    assert_eq!(
        call(&calls, ScalingRequest::Upscale { granted }).await,
        ScalingOutcome::UpscaleConfirmed
    );
    // Usage drops, but the peak of a moment ago still counts: 4 GiB is denied, 6 GiB approved.
    pressure_tx
        .send(sample(GIB / 2))
        .await
        .expect("engine running");
    let to = |gib: u64| ScalingRequest::Downscale {
        target: Resources {
            cpu: 1.0,
            mem_bytes: gib * GIB,
        },
    };
    match call(&calls, to(4)).await {
        ScalingOutcome::Downscale { ok: false, status } => {
            assert!(status.contains("< 4096 (current usage)"), "{status}")
        }
        other => panic!("downscale to 4 GiB: {other:?}"),
    }
    match call(&calls, to(6)).await {
        ScalingOutcome::Downscale { ok: true, .. } => {}
        other => panic!("downscale to 6 GiB: {other:?}"),
    }
    pressure_tx
        .send(sample(3 * GIB / 2))
        .await
        .expect("engine running");
    match call(&calls, to(1)).await {
        ScalingOutcome::Downscale { ok: false, status } => {
            assert!(
                status.starts_with("calculated memory threshold too low"),
                "{status}"
            )
        }
        other => panic!("downscale to 1 GiB: {other:?}"),
    }
    stop_tx.send(true).expect("engine running");
    handle
        .task
        .await
        .expect("engine task")
        .expect("engine stops cleanly");

    let rec = Recording::load(&path).expect("the recording loads");
    let report = monitor::replay::replay(&rec, |_| {}).expect("replay runs");
    assert!(report.steps >= 8, "too few steps recorded: {report:?}");
    assert!(report.decisions >= 4, "too few decisions: {report:?}");
    assert!(report.identical(), "replay differs: {report:?}");
    assert!(report.stopped.is_none(), "{report:?}");
}
