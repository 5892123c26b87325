//! HTTP side: `GET /monitor` (agent websocket), `GET /healthz` (daemon liveness), and the
//! operators' `GET /metrics` and `GET /debug/decisions` ([`observability_router`]).
//!
//! [`router`] is separate from [`serve`] so more routes (e.g. `/metrics`) can be merged in;
//! use [`serve_router`] to serve such an extended router with the same shutdown handling.

use crate::backend::BackendHandle;
use crate::decisions::{self, DecisionLog};
use crate::metrics::{self, Metrics};
use crate::session::{self, SessionConfig, SessionContext, Sessions};
use anyhow::{Context, bail};
use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::Extensions;
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// How long [`serve`] waits for agent sessions to finish their close handshake on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Shared state of the websocket route.
#[derive(Clone, Debug)]
pub struct ServerState {
    pub backend: BackendHandle,
    pub sessions: Arc<Sessions>,
    pub config: SessionConfig,
}

impl ServerState {
    pub fn new(backend: BackendHandle) -> Self {
        Self::with_config(backend, SessionConfig::default())
    }

    pub fn with_config(backend: BackendHandle, config: SessionConfig) -> Self {
        Self {
            backend,
            sessions: Sessions::new(),
            config,
        }
    }
}

/// The daemon's routes. Unknown paths get 404; other methods on a known path 405.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/monitor", get(monitor_ws))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /metrics` (Prometheus) and `GET /debug/decisions` (JSON decision log). Merge it into
/// [`router`] (no overlapping routes), or serve it alone with [`health_router`] merged in.
pub fn observability_router(metrics: Metrics, decisions: Arc<DecisionLog>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::handler))
        .with_state(metrics)
        .merge(
            Router::new()
                .route("/debug/decisions", get(decisions::handler))
                .with_state(decisions),
        )
}

/// Only `GET /healthz`, for a listener that does not serve the agent.
pub fn health_router() -> Router {
    Router::new().route("/healthz", get(healthz))
}

/// Bytes a connection may have queued for a peer that does not read before it is closed.
pub const OUTBOUND_BUFFER_MAX: usize = 256 * 1024;

/// Non-upgrade requests are rejected by the `WebSocketUpgrade` extractor with a 4xx.
async fn monitor_ws(
    State(state): State<ServerState>,
    extensions: Extensions,
    ws: WebSocketUpgrade,
) -> Response {
    // Present when served through `serve`/`serve_router`; optional so the router also works
    // under a plain `axum::serve`.
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let limit = state.config.max_message_size;
    let ctx = SessionContext {
        backend: state.backend,
        sessions: state.sessions,
        config: state.config,
        peer,
    };
    ws.max_message_size(limit)
        .max_frame_size(limit)
        // Our frames are small and each is flushed at once; what can pile up is a peer that
        // does not read (pongs to its pings included): past the budget the write fails and
        // the session ends instead of buffering without bound.
        .write_buffer_size(0)
        .max_write_buffer_size(OUTBOUND_BUFFER_MAX)
        .on_failed_upgrade(move |e| warn!(?peer, error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| session::run(socket, ctx))
}

/// Binds the listen address. `addr` is `IP:port` or `host:port` (resolved; every resolved
/// address is tried in turn).
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    bind_for(addr, "listening for the autoscaler-agent").await
}

/// [`bind`], logging `what` with the bound address.
pub async fn bind_for(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    let candidates: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| {
            format!("cannot resolve listen address {addr:?} (expected IP:PORT or HOST:PORT)")
        })?
        .collect();
    if candidates.is_empty() {
        bail!("listen address {addr:?} resolved to no addresses");
    }
    let mut errors = Vec::new();
    for candidate in &candidates {
        match TcpListener::bind(candidate).await {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(*candidate);
                info!(addr = %local, "{what}");
                return Ok(listener);
            }
            Err(e) => errors.push(format!("{candidate}: {e}")),
        }
    }
    bail!("cannot bind listen address {addr:?}: {}", errors.join("; "))
}

/// Serves [`router`] on `listener` until `shutdown` resolves, then closes agent sessions
/// (close code 1001) and returns.
pub async fn serve(
    listener: TcpListener,
    backend: BackendHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = ServerState::new(backend);
    let sessions = state.sessions.clone();
    serve_router(listener, router(state), sessions, shutdown).await
}

/// Like [`serve`] for a router built from [`router`] (possibly with extra routes); `sessions`
/// must be the `ServerState::sessions` the router was built with.
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    sessions: Arc<Sessions>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let signal_sessions = sessions.clone();
    let shutdown = async move {
        shutdown.await;
        info!("shutting down: closing agent sessions");
        // Upgraded connections are not tracked by axum's graceful shutdown; tell them here.
        signal_sessions.begin_shutdown();
    };
    // Frames are small and latency-bound (an UpscaleRequest right after a health-check reply
    // would otherwise wait for the peer's delayed ACK under Nagle).
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            debug!(error = %err, "cannot set TCP_NODELAY on an agent connection");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("HTTP server failed")?;
    if !sessions.wait_idle(SHUTDOWN_GRACE).await {
        warn!(
            live = sessions.live(),
            "agent sessions still open after the shutdown grace period"
        );
    }
    Ok(())
}
