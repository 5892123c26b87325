//! The contract between agent sessions (websocket, per connection) and the VM-wide scaling
//! backend (file cache, cgroup, pressure history — lives for the daemon's lifetime).
//!
//! Sessions send [`ScalingCall`]s one at a time and wait for the [`ScalingOutcome`]; the
//! backend signals "please upscale" by bumping a counter on a `watch` channel, which the
//! current session turns into an `UpscaleRequest` frame.

use tokio::sync::{mpsc, oneshot, watch};

/// A VM allocation as granted or targeted by the agent, already validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resources {
    /// vCPUs (may be fractional, e.g. 0.25).
    pub cpu: f64,
    /// Memory in bytes.
    pub mem_bytes: u64,
}

/// A scaling request from the agent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalingRequest {
    /// The VM has been grown to `granted` (UpscaleNotification).
    Upscale { granted: Resources },
    /// The agent wants to shrink the VM to `target` (DownscaleRequest).
    Downscale { target: Resources },
}

/// The backend's answer to a [`ScalingRequest`].
#[derive(Clone, Debug, PartialEq)]
pub enum ScalingOutcome {
    /// Reply `UpscaleConfirmation`.
    UpscaleConfirmed,
    /// Reply `DownscaleResult { Ok, Status }`.
    Downscale { ok: bool, status: String },
    /// Reply `InternalError { error }`; the previous consistent state was kept.
    InternalError(String),
}

/// One request with its reply slot.
#[derive(Debug)]
pub struct ScalingCall {
    pub request: ScalingRequest,
    pub reply: oneshot::Sender<ScalingOutcome>,
}

/// What the server needs from the backend.
#[derive(Clone, Debug)]
pub struct BackendHandle {
    /// Scaling requests, handled by the backend strictly in arrival order.
    pub calls: mpsc::Sender<ScalingCall>,
    /// Bumped each time the backend wants an `UpscaleRequest` sent (already rate limited).
    pub upscale_wanted: watch::Receiver<u64>,
}

/// Status the reference monitor (and we) give when nothing is managed.
pub const NOT_MANAGING_STATUS: &str = "monitor is not managing cgroup or file cache";

/// Backend for a daemon started without `--cgroup` and `--pgconnstr`: it still serves the
/// protocol (the reference panics here): upscales are confirmed, downscales approved.
pub fn spawn_unmanaged() -> BackendHandle {
    let (calls, mut rx) = mpsc::channel::<ScalingCall>(16);
    // Never bumped: an unmanaged VM has nothing to ask for. The sender lives in the task so the
    // receiver does not observe a closed channel.
    let (wanted_tx, upscale_wanted) = watch::channel(0u64);
    tokio::spawn(async move {
        let _keep = wanted_tx;
        while let Some(call) = rx.recv().await {
            let outcome = match call.request {
                ScalingRequest::Upscale { .. } => ScalingOutcome::UpscaleConfirmed,
                ScalingRequest::Downscale { .. } => ScalingOutcome::Downscale {
                    ok: true,
                    status: NOT_MANAGING_STATUS.to_string(),
                },
            };
            // The session may have gone away meanwhile; nothing to do then.
            let _ = call.reply.send(outcome);
        }
    });
    BackendHandle {
        calls,
        upscale_wanted,
    }
}
