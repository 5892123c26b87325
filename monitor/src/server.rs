//! HTTP side: `GET /monitor` (agent websocket), `GET /healthz` (daemon liveness), and the
//! operators' `GET /metrics` and `GET /debug/decisions` ([`observability_router`]).
//!
//! [`serve_router`] runs its own accept loop (rather than `axum::serve`) so that every
//! connection is admitted against the [`Admission`] budgets and gets header and HTTP-phase
//! deadlines: a flood of slow or idle clients cannot use up the daemon's descriptors or keep
//! the real agent out.

use crate::admission::{Admission, Counted, Refusal};
use crate::backend::BackendHandle;
use crate::decisions::{self, DecisionLog};
use crate::logging::warn_limited;
use crate::metrics::{self, Metrics};
use crate::session::{self, SessionConfig, SessionContext, Sessions};
use anyhow::{Context, bail};
use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{Extensions, HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// How long [`serve_router`] waits for agent sessions to finish their close handshake on
/// shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Shared state of the websocket route.
#[derive(Clone, Debug)]
pub struct ServerState {
    pub backend: BackendHandle,
    pub sessions: Arc<Sessions>,
    pub config: SessionConfig,
    pub admission: Arc<Admission>,
}

impl ServerState {
    pub fn new(backend: BackendHandle, admission: Arc<Admission>) -> Self {
        Self::with_config(backend, SessionConfig::default(), admission)
    }

    pub fn with_config(
        backend: BackendHandle,
        config: SessionConfig,
        admission: Arc<Admission>,
    ) -> Self {
        Self {
            backend,
            sessions: Sessions::new(),
            config,
            admission,
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

/// A refusal before the upgrade: a status the client can read and a counted reason.
fn refuse(state: &ServerState, peer: Option<SocketAddr>, why: Refusal, text: String) -> Response {
    state.admission.refused(why);
    warn_limited!(
        ?peer,
        reason = why.name(),
        "agent websocket refused: {text}"
    );
    let status = match why {
        Refusal::NotAllowed | Refusal::Origin => StatusCode::FORBIDDEN,
        Refusal::SeatTaken => StatusCode::CONFLICT,
        Refusal::TooManyConnections
        | Refusal::TooManyFromPeer
        | Refusal::TooManyOutsiders
        | Refusal::TooManyHandshaking => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, format!("vm-monitor: {text}\n")).into_response()
}

/// Non-upgrade requests are rejected by the `WebSocketUpgrade` extractor with a 4xx. Who may
/// upgrade is decided here, before any websocket state exists.
async fn monitor_ws(
    State(state): State<ServerState>,
    extensions: Extensions,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // Present when served through `serve_router`; optional so the router also works under a
    // plain `axum::serve` (then the allow-list cannot apply).
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    if let Some(p) = peer
        && !state.admission.allow().allows(p.ip())
    {
        let text = format!("{} is not in --agent-allow", p.ip().to_canonical());
        return refuse(&state, peer, Refusal::NotAllowed, text);
    }
    // Browsers always send Origin on a websocket; the agent never does. Without this a web
    // page open on the VM's network could drive the session.
    if headers.contains_key(header::ORIGIN) {
        let text = "websocket requests with an Origin header are not accepted".to_string();
        return refuse(&state, peer, Refusal::Origin, text);
    }
    // Cheap early answer while a healthy agent holds the session; the handshake decides for
    // good (`Sessions::claim`).
    if let Some(text) = state.sessions.seat_taken_for(peer) {
        return refuse(&state, peer, Refusal::SeatTaken, text);
    }
    let slot = match state.admission.handshake() {
        Ok(slot) => slot,
        Err(why) => {
            let text = "too many websocket handshakes in progress".to_string();
            return refuse(&state, peer, why, text);
        }
    };
    let limit = state.config.max_message_size;
    let ctx = SessionContext {
        backend: state.backend,
        sessions: state.sessions,
        config: state.config,
        peer,
        admission: state.admission,
    };
    ws.max_message_size(limit)
        .max_frame_size(limit)
        // Our frames are small and each is flushed at once; what can pile up is a peer that
        // does not read (pongs to its pings included): past the budget the write fails and
        // the session ends instead of buffering without bound.
        .write_buffer_size(0)
        .max_write_buffer_size(OUTBOUND_BUFFER_MAX)
        .on_failed_upgrade(move |e| warn_limited!(?peer, error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| session::run(socket, ctx, slot))
}

/// Binds and listens on the address. `addr` is `IP:port` or `host:port` (resolved; every
/// resolved address is tried in turn).
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let bound = bind_only(addr).await?;
    listen(bound, "listening for the autoscaler-agent")
}

/// [`bind`], logging `what` with the bound address.
pub async fn bind_for(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    listen(bind_only(addr).await?, what)
}

/// A socket bound to the listen address but not listening yet: the address is claimed (a
/// port in use is a start-up error), while connections are refused, not left waiting, until
/// [`listen`] once the daemon can serve them.
pub struct Bound {
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Binds without listening; see [`Bound`].
pub async fn bind_only(addr: &str) -> anyhow::Result<Bound> {
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
        let attempt = (|| {
            let socket = if candidate.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            // As std's TcpListener does: a restart need not wait out TIME_WAIT.
            socket.set_reuseaddr(true)?;
            socket.bind(*candidate)?;
            let local = socket.local_addr()?;
            std::io::Result::Ok(Bound {
                socket,
                addr: local,
            })
        })();
        match attempt {
            Ok(bound) => return Ok(bound),
            Err(e) => errors.push(format!("{candidate}: {e}")),
        }
    }
    bail!("cannot bind listen address {addr:?}: {}", errors.join("; "))
}

/// Starts listening on a [`Bound`] socket, logging `what` with the address.
pub fn listen(bound: Bound, what: &str) -> anyhow::Result<TcpListener> {
    let listener = bound
        .socket
        .listen(1024)
        .with_context(|| format!("listening on {}", bound.addr))?;
    info!(addr = %bound.addr, "{what}");
    Ok(listener)
}

/// Serves `app` (built from [`router`], possibly with more routes) on `listener` until
/// `shutdown` resolves, then closes agent sessions (close code 1001) and returns. `sessions`
/// and `admission` must be the ones in the router's [`ServerState`].
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    sessions: Arc<Sessions>,
    admission: Arc<Admission>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // EMFILE/ENFILE and aborted handshakes: keep serving, do not spin.
                    warn_limited!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match admission.connect(peer) {
            Ok(slot) => slot,
            Err(why) => {
                // Closed at once: an answer would cost more than the refusal protects.
                warn_limited!(%peer, reason = why.name(), "connection refused");
                drop(tcp);
                continue;
            }
        };
        // Frames are small and latency-bound (an UpscaleRequest right after a health-check
        // reply would otherwise wait for the peer's delayed ACK under Nagle).
        if admission.limits().tcp_nodelay
            && let Err(err) = tcp.set_nodelay(true)
        {
            debug!(error = %err, "cannot set TCP_NODELAY on an agent connection");
        }
        tokio::spawn(serve_connection(
            Counted::new(tcp, slot),
            peer,
            app.clone(),
            admission.limits().clone(),
        ));
    }
    info!("shutting down: closing agent sessions");
    // Upgraded connections live on in their own tasks; tell them here.
    sessions.begin_shutdown();
    if !sessions.wait_idle(SHUTDOWN_GRACE).await {
        warn!(
            live = sessions.live(),
            "agent sessions still open after the shutdown grace period"
        );
    }
    Ok(())
}

/// One HTTP/1.1 connection: each request's headers within `header_timeout`, the whole HTTP
/// phase (keep-alive included: a scraper reconnects cheaply) within `http_deadline`. An upgraded connection leaves this future and lives in its session task.
async fn serve_connection(
    io: Counted<tokio::net::TcpStream>,
    peer: SocketAddr,
    app: Router,
    limits: crate::admission::Limits,
) {
    let service = hyper::service::service_fn(
        move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            async move { tower_service::Service::call(&mut app, req.map(axum::body::Body::new)).await }
        },
    );
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // Far above any real request line and headers; bounds what a client can make us hold.
        .max_buf_size(16 * 1024);
    let conn = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    match tokio::time::timeout(limits.http_deadline, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => debug!(%peer, error = %err, "HTTP connection ended with an error"),
        Err(_) => debug!(%peer, "HTTP connection past its deadline; closed"),
    }
}
