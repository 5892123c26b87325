//! The contract between agent sessions (websocket, per connection) and the VM-wide scaling
//! backend (file cache, cgroup, pressure history — lives for the daemon's lifetime).
//!
//! Sessions send [`ScalingCall`]s one at a time and wait for the [`ScalingOutcome`]; the
//! backend signals "please upscale" by bumping a counter on a `watch` channel, which the
//! current session turns into an `UpscaleRequest` frame.

use std::sync::Arc;

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
    /// Bumped each time the backend wants an `UpscaleRequest` sent (the policy's rate limit
    /// applied: every bump is one frame).
    pub upscale_wanted: watch::Receiver<u64>,
    /// The connection id of the agent session holding the seat, if any: the backend's policy
    /// hears of every connect and disconnect (it repeats a current upscale to a reconnected
    /// agent, which forgets everything on reconnect).
    pub agent: Arc<watch::Sender<Option<u64>>>,
}

impl BackendHandle {
    /// Session `conn` took the seat.
    pub fn agent_connected(&self, conn: u64) {
        self.agent.send_replace(Some(conn));
    }

    /// Session `conn` ended; no-op if another session holds the seat by now.
    pub fn agent_gone(&self, conn: u64) {
        self.agent.send_if_modified(|current| {
            let ours = *current == Some(conn);
            if ours {
                *current = None;
            }
            ours
        });
    }
}

/// Status the reference monitor (and we) give when nothing is managed.
pub const NOT_MANAGING_STATUS: &str = "monitor is not managing cgroup or file cache";
