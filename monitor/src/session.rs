//! One agent session: version handshake, then a reader (answers health checks and rejects bad
//! frames itself), a scaling worker (one backend call at a time, in arrival order, each with a
//! timeout) and a writer (the only task touching the socket's send half).
//!
//! Only one session is "current" (it holds the *seat*). A connection that completes the
//! handshake takes the seat only if it is free, or held from the same IP address (the agent
//! reconnecting), or held by a session that is no longer an agent: silent for longer than the
//! agent's health checks allow, or not answering a websocket ping within a second
//! ([`Sessions::claim`]). Otherwise the newcomer is refused and a healthy agent keeps its
//! session: any client on the network could otherwise evict it (the reference killed the old
//! session as soon as any upgrade arrived).

use crate::admission::HandshakeSlot;
use crate::backend::{BackendHandle, ScalingCall, ScalingOutcome, ScalingRequest};
use crate::logging::{PEER_TEXT_MAX, clip, info_limited, warn_limited};
use crate::protocol::{self, AgentBody, Decision, MonitorBody, MonitorMessage};
use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span};

/// Close code for "message too big" (RFC 6455 §7.4.1).
pub const CLOSE_TOO_BIG: u16 = 1009;

/// Largest message accepted from a peer. The agent's messages are under 200 bytes and its own
/// read limit is 32 KiB; a cap in this range keeps a hostile frame's parse cost small.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Largest first frame (the protocol version range, ~20 bytes) that is parsed at all.
const HANDSHAKE_FRAME_MAX: usize = 1024;

/// A current session that sent nothing for this long is no longer an agent: the agent sends a
/// health check every 5 s.
const SEAT_SILENCE: Duration = Duration::from_secs(12);
/// How long a current session has to answer the ping that a newcomer's claim triggers.
const SEAT_PING_TIMEOUT: Duration = Duration::from_secs(1);
/// A pong this recent proves the current session is read by a live peer: newcomers from
/// elsewhere are refused without pinging it again.
const SEAT_PROOF_VALID: Duration = Duration::from_secs(2);

/// How long a reply may wait for room in the outgoing queue, or a frame for the socket, before
/// the peer counts as not reading (the agent gives up on a reply after 5 s).
const WRITE_STALL: Duration = Duration::from_secs(2);

/// Per-session limits and timeouts.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Upgrade-to-reply budget for the version handshake (the agent's own budget is 4 s).
    pub handshake_timeout: Duration,
    /// How long one scaling request may wait on the backend before we answer `InternalError`
    /// (below the agent's 5 s response timeout so the agent hears a reason, not silence).
    pub backend_timeout: Duration,
    /// How long we wait for the peer's close frame after sending ours.
    pub close_timeout: Duration,
    /// Largest accepted message (and frame); bigger ones close the session with 1009.
    pub max_message_size: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(4),
            backend_timeout: Duration::from_secs(4),
            close_timeout: Duration::from_secs(2),
            max_message_size: MAX_MESSAGE,
        }
    }
}

/// Tracks the current agent session and all live connections (for shutdown).
#[derive(Debug)]
pub struct Sessions {
    next_conn: AtomicU64,
    current: Mutex<Option<Current>>,
    shutdown: watch::Sender<bool>,
    live: watch::Sender<usize>,
    /// Handshakes completed (for `/metrics`).
    accepted: AtomicU64,
    /// `UpscaleRequest` frames queued for agents (for `/metrics`).
    upscale_requests_sent: AtomicU64,
}

#[derive(Debug)]
struct Current {
    conn: u64,
    ip: Option<IpAddr>,
    kill: oneshot::Sender<()>,
    seat: Arc<Seat>,
}

/// What others may learn about the current session's liveness.
#[derive(Debug)]
struct Seat {
    /// Last frame from the peer (or the handshake).
    heard: Mutex<Instant>,
    /// Last pong to one of our pings (`None`: never pinged or never answered).
    ponged: watch::Sender<Option<Instant>>,
    /// Asks the session to ping its peer (capacity 1: one ping in flight is enough).
    ping: mpsc::Sender<()>,
}

impl Seat {
    fn heard(&self) -> Instant {
        *self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hear(&self) {
        *self.heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn recently_proven(&self, now: Instant) -> bool {
        self.ponged
            .borrow()
            .is_some_and(|t| now.saturating_duration_since(t) < SEAT_PROOF_VALID)
    }
}

/// What [`Sessions::claim`] decided.
enum Claim {
    Won {
        kill: oneshot::Receiver<()>,
        seat: SeatHandle,
    },
    Refused(String),
}

/// The current session's side of its [`Seat`].
struct SeatHandle {
    seat: Arc<Seat>,
    ping: mpsc::Receiver<()>,
}

/// What the incumbent looked like when a claim started.
struct Incumbent {
    conn: u64,
    ip: Option<IpAddr>,
    seat: Arc<Seat>,
}

impl Sessions {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            next_conn: AtomicU64::new(1),
            current: Mutex::new(None),
            shutdown: watch::channel(false).0,
            live: watch::channel(0).0,
            accepted: AtomicU64::new(0),
            upscale_requests_sent: AtomicU64::new(0),
        })
    }

    /// Asks every connection, handshaking or established, to close (1001).
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Number of websocket connections currently alive (any phase).
    pub fn live(&self) -> usize {
        *self.live.borrow()
    }

    /// Connection id of the current (handshaken) agent session, if any.
    pub fn current(&self) -> Option<u64> {
        self.lock().as_ref().map(|c| c.conn)
    }

    /// Agent sessions that completed the protocol handshake so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// `UpscaleRequest` frames sent to agents so far (one per wish of the backend).
    pub fn upscale_requests_sent(&self) -> u64 {
        self.upscale_requests_sent.load(Ordering::Relaxed)
    }

    /// Waits until every connection is gone, or `timeout` passed. Returns whether all are gone.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut rx = self.live.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Why a new agent websocket from `peer` would be refused right now, if it is certain
    /// without pinging anyone: a session from another address holds the seat and proved
    /// within the last two seconds that a live peer reads it.
    pub fn seat_taken_for(&self, peer: Option<SocketAddr>) -> Option<String> {
        let now = Instant::now();
        let current = self.lock();
        let c = current.as_ref()?;
        let same_ip = c.ip.is_some() && c.ip == peer.map(|p| p.ip().to_canonical());
        let healthy = now.saturating_duration_since(c.seat.heard()) < SEAT_SILENCE
            && c.seat.recently_proven(now);
        (!same_ip && healthy).then(|| SEAT_TAKEN.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        // A poisoned lock only means a panic elsewhere; the Option inside is still coherent.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(self: &Arc<Self>) -> Entered {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.live.send_modify(|n| *n += 1);
        Entered {
            conn,
            sessions: Arc::clone(self),
        }
    }

    fn incumbent(&self) -> Option<Incumbent> {
        self.lock().as_ref().map(|c| Incumbent {
            conn: c.conn,
            ip: c.ip,
            seat: Arc::clone(&c.seat),
        })
    }

    /// Takes the seat for `conn` if the rules in the module docs allow, telling a replaced
    /// session to go. Waits at most [`SEAT_PING_TIMEOUT`] (plus a retry if the seat changed
    /// hands meanwhile), within the agent's 4 s handshake budget.
    async fn claim(&self, conn: u64, ip: Option<IpAddr>) -> Claim {
        for _ in 0..3 {
            let incumbent = self.incumbent();
            if let Some(inc) = &incumbent
                && !(inc.ip.is_some() && inc.ip == ip)
                && !self.incumbent_is_gone(inc).await
            {
                return Claim::Refused(SEAT_TAKEN.to_string());
            }
            // Install only if the seat is still as judged; else judge the new holder.
            let mut current = self.lock();
            if current.as_ref().map(|c| c.conn) != incumbent.as_ref().map(|i| i.conn) {
                continue;
            }
            let (kill, kill_rx) = oneshot::channel();
            let (ping, ping_rx) = mpsc::channel(1);
            let seat = Arc::new(Seat {
                heard: Mutex::new(Instant::now()),
                ponged: watch::channel(None).0,
                ping,
            });
            let previous = current.replace(Current {
                conn,
                ip,
                kill,
                seat: Arc::clone(&seat),
            });
            drop(current);
            self.accepted.fetch_add(1, Ordering::Relaxed);
            if let Some(old) = previous {
                info_limited!(
                    old_conn = old.conn,
                    "new agent session replaces the previous one"
                );
                // The old session may have ended on its own meanwhile.
                let _ = old.kill.send(());
            }
            return Claim::Won {
                kill: kill_rx,
                seat: SeatHandle {
                    seat,
                    ping: ping_rx,
                },
            };
        }
        Claim::Refused(SEAT_TAKEN.to_string())
    }

    /// Whether the incumbent is no longer an agent: silent too long, or no pong to a ping.
    async fn incumbent_is_gone(&self, inc: &Incumbent) -> bool {
        let now = Instant::now();
        if now.saturating_duration_since(inc.seat.heard()) >= SEAT_SILENCE {
            info_limited!(
                old_conn = inc.conn,
                "current agent session has been silent too long; it may be replaced"
            );
            return true;
        }
        if inc.seat.recently_proven(now) {
            return false;
        }
        let mut ponged = inc.seat.ponged.subscribe();
        ponged.borrow_and_update();
        // Full: a ping is already on its way; its pong counts for us too.
        let _ = inc.seat.ping.try_send(());
        let answered = tokio::time::timeout(SEAT_PING_TIMEOUT, ponged.changed())
            .await
            .is_ok_and(|r| r.is_ok());
        if !answered {
            info_limited!(
                old_conn = inc.conn,
                "current agent session did not answer a ping; it may be replaced"
            );
        }
        !answered
    }
}

const SEAT_TAKEN: &str =
    "another autoscaler-agent session is active and healthy; try again after it ends";

/// Registration of one live connection; unregisters on drop.
struct Entered {
    conn: u64,
    sessions: Arc<Sessions>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let mut current = self.sessions.lock();
        if current.as_ref().is_some_and(|c| c.conn == self.conn) {
            *current = None;
        }
        drop(current);
        self.sessions.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Everything a session needs.
#[derive(Clone, Debug)]
pub struct SessionContext {
    pub backend: BackendHandle,
    pub sessions: Arc<Sessions>,
    pub config: SessionConfig,
    pub peer: Option<SocketAddr>,
    /// Where refused claims are counted.
    pub admission: Arc<crate::admission::Admission>,
}

/// Runs one upgraded websocket connection to its end. `slot` is its share of the handshake
/// budget, given back once the handshake is over.
pub async fn run(socket: WebSocket, ctx: SessionContext, slot: HandshakeSlot) {
    let entered = ctx.sessions.enter();
    let span = info_span!("agent_session", conn = entered.conn, peer = ?ctx.peer);
    async move {
        run_inner(socket, &ctx, entered.conn, slot).await;
        drop(entered);
    }
    .instrument(span)
    .await
}

async fn run_inner(mut socket: WebSocket, ctx: &SessionContext, conn: u64, slot: HandshakeSlot) {
    let cfg = &ctx.config;
    let mut shutdown = ctx.sessions.shutdown.subscribe();
    // Wishes raised before this session took the seat are not ours to send: the backend hears
    // of the new session and decides itself whether a request is still due (it is marked seen
    // here, before the seat is taken, so that the backend's answer to the connect is not lost).
    let mut wanted = ctx.backend.upscale_wanted.clone();
    wanted.borrow_and_update();
    debug!("websocket connection accepted, waiting for protocol version range");

    let outcome = tokio::select! {
        r = tokio::time::timeout(cfg.handshake_timeout, handshake(&mut socket, ctx, conn)) => match r {
            Ok(o) => o,
            Err(_) => HandshakeOutcome::Failed {
                code: close_code::PROTOCOL,
                reason: "timed out waiting for protocol version range",
                log: "no protocol version range within the handshake timeout".to_string(),
            },
        },
        _ = shutdown.wait_for(|s| *s) => HandshakeOutcome::Failed {
            code: close_code::AWAY,
            reason: SHUTDOWN_REASON,
            log: "shutting down during handshake".to_string(),
        },
    };
    drop(slot);
    let (kill, seat) = match outcome {
        HandshakeOutcome::Accepted {
            version,
            kill,
            seat,
        } => {
            info_limited!(version, "agent connected (protocol handshake complete)");
            (kill, seat)
        }
        HandshakeOutcome::Failed { code, reason, log } => {
            info_limited!(close_code = code, error = %clip(&log, PEER_TEXT_MAX), "handshake failed; closing connection");
            close_unsplit(socket, code, reason, cfg).await;
            return;
        }
        HandshakeOutcome::Gone(why) => {
            info_limited!(reason = %why, "connection ended during handshake");
            return;
        }
    };

    let (sink, stream) = socket.split();
    established(sink, stream, kill, seat, wanted, shutdown, ctx).await;
    ctx.backend.agent_gone(conn);
}

const SHUTDOWN_REASON: &str = "vm-monitor is shutting down";
const REPLACED_REASON: &str = "replaced by a newer agent connection";
const TOO_BIG_REASON: &str = "message too big";
const PING_FLOOD_REASON: &str = "too many pings";

/// Pings a peer may send: a burst of [`PingBudget::BURST`], then one a second.
struct PingBudget {
    tokens: f64,
    at: Instant,
}

impl PingBudget {
    const BURST: f64 = 32.0;

    fn new(now: Instant) -> Self {
        Self {
            tokens: Self::BURST,
            at: now,
        }
    }

    /// Takes one ping's token; false when the budget is spent.
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + refill).min(Self::BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

enum HandshakeOutcome {
    /// This connection is now the current session; `kill` fires when a newer one replaces it.
    Accepted {
        version: u64,
        kill: oneshot::Receiver<()>,
        seat: SeatHandle,
    },
    /// Close with this code/reason (any error reply was already sent).
    Failed {
        code: u16,
        reason: &'static str,
        log: String,
    },
    /// The peer went away; nothing left to send.
    Gone(String),
}

async fn handshake(socket: &mut WebSocket, ctx: &SessionContext, conn: u64) -> HandshakeOutcome {
    loop {
        let text = match socket.recv().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(b))) => {
                let error = format!(
                    "expected a text frame with the protocol version range, got a {}-byte binary frame",
                    b.len()
                );
                return refuse(
                    socket,
                    error,
                    close_code::PROTOCOL,
                    "expected protocol version range",
                    "binary first frame".to_string(),
                )
                .await;
            }
            // Control frames are answered by tungstenite; keep waiting for the range.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => {
                return HandshakeOutcome::Gone(format!("peer closed: {}", describe_close(&frame)));
            }
            Some(Err(e)) if is_too_big(&e) => {
                return HandshakeOutcome::Failed {
                    code: CLOSE_TOO_BIG,
                    reason: TOO_BIG_REASON,
                    log: format!("{e}"),
                };
            }
            Some(Err(e)) => return HandshakeOutcome::Gone(format!("read error: {e}")),
            None => return HandshakeOutcome::Gone("peer disconnected".to_string()),
        };
        if text.len() > HANDSHAKE_FRAME_MAX {
            // Refused unparsed: a version range is ~20 bytes, and parsing what a stranger
            // sends first is the cheapest work to make us do.
            let error = format!(
                "the protocol version range must be at most {HANDSHAKE_FRAME_MAX} bytes, got {}",
                text.len()
            );
            let log = format!("oversized first frame ({} bytes)", text.len());
            return refuse(
                socket,
                error,
                close_code::PROTOCOL,
                "expected protocol version range",
                log,
            )
            .await;
        }
        let reply = protocol::negotiate(text.as_str());
        if !reply.is_accepted() {
            let _ = socket.send(Message::Text(reply.to_json().into())).await;
            return HandshakeOutcome::Failed {
                code: close_code::PROTOCOL,
                reason: "protocol version negotiation failed",
                log: reply.error.unwrap_or_default(),
            };
        }
        // Take over before the agent can see the accept: otherwise a session delayed between
        // its reply and its takeover could replace a connection that handshook after it.
        let (kill, seat) = match ctx
            .sessions
            .claim(conn, ctx.peer.map(|p| p.ip().to_canonical()))
            .await
        {
            Claim::Won { kill, seat } => (kill, seat),
            Claim::Refused(why) => {
                ctx.admission.refused(crate::admission::Refusal::SeatTaken);
                let reason = "another agent session is active";
                return refuse(socket, why.clone(), close_code::AGAIN, reason, why).await;
            }
        };
        ctx.backend.agent_connected(conn);
        if let Err(e) = socket.send(Message::Text(reply.to_json().into())).await {
            ctx.backend.agent_gone(conn);
            return HandshakeOutcome::Gone(format!("write error: {e}"));
        }
        let version = reply.version.unwrap_or(protocol::PROTOCOL_V1_0);
        return HandshakeOutcome::Accepted {
            version,
            kill,
            seat,
        };
    }
}

/// Answers the first frame with `{"error": error}`; the caller closes with `code`/`reason`.
async fn refuse(
    socket: &mut WebSocket,
    error: String,
    code: u16,
    reason: &'static str,
    log: String,
) -> HandshakeOutcome {
    let reply = protocol::HandshakeReply::refused(error);
    let _ = socket.send(Message::Text(reply.to_json().into())).await;
    HandshakeOutcome::Failed { code, reason, log }
}

/// Sends a close frame on a not-yet-split socket and waits (bounded) for the peer's reply.
async fn close_unsplit(
    mut socket: WebSocket,
    code: u16,
    reason: &'static str,
    cfg: &SessionConfig,
) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(cfg.close_timeout, async {
        if socket.send(frame).await.is_err() {
            return;
        }
        if code == CLOSE_TOO_BIG {
            // The rest of the oversized frame is unread; dropping now would reset the
            // connection and may destroy our close frame before the peer reads it.
            tokio::time::sleep(TOO_BIG_LINGER).await;
            return;
        }
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// How long we keep a connection whose read side is poisoned (oversized frame) after sending
/// 1009, so that the peer gets to read the close frame.
const TOO_BIG_LINGER: Duration = Duration::from_millis(500);

/// Frames for the writer task.
#[derive(Debug)]
enum Outgoing {
    Frame(MonitorMessage),
    /// A liveness ping (see [`Sessions::claim`]).
    Ping(u64),
    Close(u16, &'static str),
}

/// Replies queued for the writer before we consider the peer stuck (the agent always reads).
const OUTGOING_QUEUE: usize = 64;
/// Scaling requests queued behind the one in progress (the agent has at most one in flight).
const SCALING_QUEUE: usize = 8;

enum End {
    /// We close with this code and reason.
    Close(u16, &'static str),
    /// The peer sent a close frame; tungstenite answers it, we just drain.
    PeerClosed,
    /// Connection is gone or unusable.
    Gone,
}

async fn established(
    sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
    mut kill: oneshot::Receiver<()>,
    seat: SeatHandle,
    mut wanted: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
    ctx: &SessionContext,
) {
    let SeatHandle {
        seat,
        ping: mut ping_asked,
    } = seat;
    let mut pings_sent: u64 = 0;
    let mut ping_budget = PingBudget::new(Instant::now());
    let cfg = &ctx.config;
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(OUTGOING_QUEUE);
    let writer = tokio::spawn(writer(sink, out_rx).in_current_span());
    let (scaling_tx, scaling_rx) = mpsc::channel::<(u64, ScalingRequest)>(SCALING_QUEUE);
    let worker = tokio::spawn(
        scaling_worker(
            scaling_rx,
            ctx.backend.calls.clone(),
            out_tx.clone(),
            cfg.backend_timeout,
        )
        .in_current_span(),
    );

    let mut wanted_open = true;
    let mut last_monitor_id: u64 = 1;
    let mut binary_frames: u64 = 0;

    let end = loop {
        tokio::select! {
            _ = &mut kill => break End::Close(close_code::NORMAL, REPLACED_REASON),
            () = stopping(&mut shutdown) => break End::Close(close_code::AWAY, SHUTDOWN_REASON),
            Some(()) = ping_asked.recv() => {
                pings_sent += 1;
                debug!(ping = pings_sent, "pinging the agent: another client claims the session");
                if out_tx.try_send(Outgoing::Ping(pings_sent)).is_err() {
                    // The queue is full: the peer is not reading, so it will not pong either.
                    debug!("outgoing queue full; not pinging");
                }
            }
            changed = wanted.changed(), if wanted_open => {
                if changed.is_err() {
                    // Backend gone: it can no longer ask for anything; keep serving.
                    wanted_open = false;
                    continue;
                }
                wanted.borrow_and_update();
                // Every wish is one frame: the policy spaces them (`--upscale-interval-ms`).
                last_monitor_id += 2;
                info!(id = last_monitor_id, "requesting upscale from agent");
                let msg = MonitorMessage::new(last_monitor_id, MonitorBody::UpscaleRequest);
                if !queue(&out_tx, msg).await {
                    break End::Gone;
                }
                ctx.sessions.upscale_requests_sent.fetch_add(1, Ordering::Relaxed);
            }
            frame = stream.next() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(e)) if is_too_big(&e) => {
                        warn_limited!(error = %e, limit = cfg.max_message_size, "agent sent an oversized message; closing with 1009");
                        break End::Close(CLOSE_TOO_BIG, TOO_BIG_REASON);
                    }
                    Some(Err(e)) => {
                        info_limited!(error = %e, "websocket read error; ending session");
                        break End::Gone;
                    }
                    None => {
                        info_limited!("agent disconnected without a close frame");
                        break End::Gone;
                    }
                };
                match frame {
                    Message::Text(text) => {
                        seat.hear();
                        if !handle_text(text.as_str(), &out_tx, &scaling_tx).await {
                            break End::Gone;
                        }
                    }
                    Message::Binary(b) => {
                        seat.hear();
                        binary_frames += 1;
                        debug!(len = b.len(), total = binary_frames, "ignoring binary frame from agent");
                    }
                    Message::Pong(payload) => {
                        // Only a pong to our latest ping proves the peer reads what we send.
                        if pings_sent > 0 && payload.as_ref() == pings_sent.to_be_bytes() {
                            seat.ponged.send_replace(Some(Instant::now()));
                        }
                    }
                    Message::Ping(_) => {
                        // The agent never pings; a peer that floods pings (and maybe never
                        // reads the pongs) is not an agent.
                        if !ping_budget.take(Instant::now()) {
                            warn_limited!("peer floods websocket pings; closing the session");
                            break End::Close(close_code::POLICY, PING_FLOOD_REASON);
                        }
                    }
                    Message::Close(frame) => {
                        info_limited!(close = %describe_close(&frame), "agent closed the connection");
                        break End::PeerClosed;
                    }
                }
            }
        }
    };

    // No more scaling replies once we are closing.
    worker.abort();
    match end {
        End::Close(code, reason) => {
            info_limited!(close_code = code, reason, "closing agent session");
            // The queue may be full of replies to a peer that does not read; do not wait long.
            let _ = tokio::time::timeout(
                cfg.close_timeout,
                out_tx.send(Outgoing::Close(code, reason)),
            )
            .await;
            drop(out_tx);
            let _ = tokio::time::timeout(cfg.close_timeout, writer).await;
            if code == CLOSE_TOO_BIG {
                tokio::time::sleep(TOO_BIG_LINGER).await;
            } else {
                drain(&mut stream, cfg.close_timeout).await;
            }
        }
        End::PeerClosed => {
            drop(out_tx);
            let _ = tokio::time::timeout(cfg.close_timeout, writer).await;
            // Polling again lets tungstenite flush its automatic close reply.
            drain(&mut stream, cfg.close_timeout).await;
        }
        End::Gone => {
            drop(out_tx);
            writer.abort();
        }
    }
    info_limited!(binary_frames_ignored = binary_frames, "agent session ended");
}

/// Resolves once shutdown begins. (A wrapper, so that no borrow of the watch value lives in a
/// `select!` whose handlers await.)
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Reads until the stream ends (peer's close reply / EOF) or `timeout`.
async fn drain(stream: &mut SplitStream<WebSocket>, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

/// Longest error text in an InvalidMessage reply, in bytes.
const INVALID_REPLY_MAX: usize = 1024;

/// Handles one text frame. Returns false when the session must end.
async fn handle_text(
    text: &str,
    out: &mpsc::Sender<Outgoing>,
    scaling: &mpsc::Sender<(u64, ScalingRequest)>,
) -> bool {
    let msg = match protocol::decode_inbound(text) {
        Decision::Handle(m) => m,
        Decision::Reject { id, error } => {
            // The peer chooses the text and the rate: both are bounded in the log.
            warn_limited!(id, error = %clip(&error, PEER_TEXT_MAX), len = text.len(), "invalid message from agent; answering InvalidMessage");
            return queue(
                out,
                // Bounded in the reply too: it may quote the peer's input.
                MonitorMessage::new(
                    id,
                    MonitorBody::InvalidMessage {
                        error: clip(&error, INVALID_REPLY_MAX).into_owned(),
                    },
                ),
            )
            .await;
        }
    };
    let id = msg.id;
    let request = match msg.body {
        AgentBody::HealthCheck => {
            debug!(id, "health check");
            return queue(out, MonitorMessage::new(id, MonitorBody::HealthCheck)).await;
        }
        AgentBody::InvalidMessage { error } => {
            warn_limited!(id, error = %clip(&error, PEER_TEXT_MAX), "agent says a message of ours was invalid");
            return true;
        }
        AgentBody::InternalError { error } => {
            warn_limited!(id, error = %clip(&error, PEER_TEXT_MAX), "agent reports an internal error");
            return true;
        }
        AgentBody::DownscaleRequest { target } => ScalingRequest::Downscale { target },
        AgentBody::UpscaleNotification { granted } => ScalingRequest::Upscale { granted },
    };
    match scaling.try_send((id, request)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            warn_limited!(
                id,
                "too many scaling requests queued; answering InternalError"
            );
            queue(
                out,
                MonitorMessage::new(
                    id,
                    MonitorBody::InternalError {
                        error: "too many scaling requests in flight".to_string(),
                    },
                ),
            )
            .await
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Queues a frame for the writer. A full queue holds back reading (a client pipelining
/// requests is served at the pace it reads); a queue that stays full for [`WRITE_STALL`]
/// means the peer stopped reading our replies, and such a session is of no use, so it ends.
async fn queue(out: &mpsc::Sender<Outgoing>, msg: MonitorMessage) -> bool {
    match out.send_timeout(Outgoing::Frame(msg), WRITE_STALL).await {
        Ok(()) => true,
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            warn_limited!("agent is not reading our replies; ending session");
            false
        }
        Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
    }
}

async fn writer(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let (msg, last) = match out {
            Outgoing::Frame(m) => (Message::Text(m.to_json().into()), false),
            Outgoing::Ping(n) => (Message::Ping(n.to_be_bytes().to_vec().into()), false),
            Outgoing::Close(code, reason) => (
                Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })),
                true,
            ),
        };
        match tokio::time::timeout(WRITE_STALL, sink.send(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "websocket write failed");
                return;
            }
            Err(_) => {
                warn_limited!("agent connection accepts no data; ending session");
                return;
            }
        }
        if last {
            return;
        }
    }
}

/// Processes scaling requests strictly one at a time, in arrival order.
async fn scaling_worker(
    mut rx: mpsc::Receiver<(u64, ScalingRequest)>,
    calls: mpsc::Sender<ScalingCall>,
    out: mpsc::Sender<Outgoing>,
    timeout: Duration,
) {
    while let Some((id, request)) = rx.recv().await {
        info_limited!(id, ?request, "scaling request from agent");
        let body = match call_backend(&calls, request, timeout).await {
            Ok(outcome) => reply_for(request, outcome),
            Err(error) => MonitorBody::InternalError { error },
        };
        match &body {
            MonitorBody::DownscaleResult { ok, status } => {
                info_limited!(id, ok, status = %status, "downscale answered");
            }
            MonitorBody::InternalError { error } => {
                warn_limited!(id, error = %error, "scaling request failed; answering InternalError");
            }
            _ => info_limited!(id, "upscale confirmed"),
        }
        if out
            .send(Outgoing::Frame(MonitorMessage::new(id, body)))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn call_backend(
    calls: &mpsc::Sender<ScalingCall>,
    request: ScalingRequest,
    timeout: Duration,
) -> Result<ScalingOutcome, String> {
    let (reply, rx) = oneshot::channel();
    let call = async {
        calls
            .send(ScalingCall { request, reply })
            .await
            .map_err(|_| "scaling backend is not running".to_string())?;
        rx.await
            .map_err(|_| "scaling backend dropped the request".to_string())
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "scaling backend did not answer within {} ms",
            timeout.as_millis()
        )),
    }
}

fn reply_for(request: ScalingRequest, outcome: ScalingOutcome) -> MonitorBody {
    match (request, outcome) {
        (_, ScalingOutcome::InternalError(error)) => MonitorBody::InternalError { error },
        (ScalingRequest::Upscale { .. }, ScalingOutcome::UpscaleConfirmed) => {
            MonitorBody::UpscaleConfirmation
        }
        (ScalingRequest::Downscale { .. }, ScalingOutcome::Downscale { ok, status }) => {
            MonitorBody::DownscaleResult { ok, status }
        }
        (request, outcome) => MonitorBody::InternalError {
            error: format!("scaling backend answered {outcome:?} to {request:?}"),
        },
    }
}

/// Whether a read error is tungstenite's "message/frame exceeds the configured limit".
fn is_too_big(e: &axum::Error) -> bool {
    // axum wraps the tungstenite error; the type must be from the tungstenite version axum
    // uses (a test checks the 1009 close, so a mismatch after an upgrade is caught).
    let inner: &(dyn std::error::Error + 'static) = match std::error::Error::source(e) {
        Some(inner) => inner,
        None => return false,
    };
    matches!(
        inner.downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

fn describe_close(frame: &Option<CloseFrame>) -> String {
    match frame {
        Some(f) => format!("{} {:?}", f.code, f.reason.as_str()),
        None => "no close code".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Resources;
    use crate::server::{self, ServerState};
    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

    /// Generous bound standing in for the agent's 5 s response timeout.
    const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

    struct TestServer {
        addr: SocketAddr,
        calls: mpsc::Receiver<ScalingCall>,
        wanted: watch::Sender<u64>,
        agent: watch::Receiver<Option<u64>>,
        sessions: Arc<Sessions>,
        shutdown: Option<oneshot::Sender<()>>,
        served: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    async fn start(config: SessionConfig) -> TestServer {
        let (calls_tx, calls) = mpsc::channel(16);
        let (wanted, wanted_rx) = watch::channel(0u64);
        let (agent_tx, agent) = watch::channel(None);
        let backend = BackendHandle {
            calls: calls_tx,
            upscale_wanted: wanted_rx,
            agent: Arc::new(agent_tx),
        };
        let listener = server::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admission = crate::admission::Admission::new(
            crate::admission::Limits::default(),
            crate::admission::AgentAllow::default(),
        );
        let state = ServerState::with_config(backend, config, admission.clone());
        let sessions = state.sessions.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let served = tokio::spawn(server::serve_router(
            listener,
            server::router(state),
            sessions.clone(),
            admission,
            async move {
                let _ = rx.await;
            },
        ));
        TestServer {
            addr,
            calls,
            wanted,
            agent,
            sessions,
            shutdown: Some(tx),
            served,
        }
    }

    async fn connect(addr: SocketAddr) -> Client {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/monitor"))
            .await
            .unwrap();
        ws.send(WsMessage::text(r#"{"min":1,"max":1}"#))
            .await
            .unwrap();
        assert_eq!(next_text(&mut ws).await, r#"{"version":1}"#);
        ws
    }

    async fn next_frame(ws: &mut Client) -> WsMessage {
        tokio::time::timeout(AGENT_TIMEOUT, ws.next())
            .await
            .expect("no frame within the agent's timeout")
            .expect("stream ended")
            .expect("read error")
    }

    async fn next_text(ws: &mut Client) -> String {
        match next_frame(ws).await {
            WsMessage::Text(t) => t.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    async fn send(ws: &mut Client, text: &str) {
        ws.send(WsMessage::text(text.to_string())).await.unwrap();
    }

    const DOWNSCALE_2: &str =
        r#"{"content":{"target":{"cpu":0.75,"mem":3221225472}},"type":"DownscaleRequest","id":2}"#;

    #[tokio::test]
    async fn health_checks_are_answered_while_a_scaling_request_waits() {
        let mut srv = start(SessionConfig::default()).await;
        let mut ws = connect(srv.addr).await;
        send(&mut ws, DOWNSCALE_2).await;
        // The backend now holds the request and does not answer yet.
        let call = tokio::time::timeout(AGENT_TIMEOUT, srv.calls.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            call.request,
            ScalingRequest::Downscale {
                target: Resources {
                    cpu: 0.75,
                    mem_bytes: 3221225472
                }
            }
        );
        for id in [4, 6, 8] {
            send(
                &mut ws,
                &format!(r#"{{"content":{{}},"type":"HealthCheck","id":{id}}}"#),
            )
            .await;
            assert_eq!(
                next_text(&mut ws).await,
                format!(r#"{{"type":"HealthCheck","id":{id}}}"#)
            );
        }
        call.reply
            .send(ScalingOutcome::Downscale {
                ok: false,
                status: "not yet".into(),
            })
            .unwrap();
        assert_eq!(
            next_text(&mut ws).await,
            r#"{"type":"DownscaleResult","Ok":false,"Status":"not yet","id":2}"#
        );
    }

    #[tokio::test]
    async fn scaling_requests_run_in_order_and_time_out_into_internal_error() {
        let config = SessionConfig {
            backend_timeout: Duration::from_millis(300),
            ..SessionConfig::default()
        };
        let mut srv = start(config).await;
        let mut ws = connect(srv.addr).await;
        send(&mut ws, DOWNSCALE_2).await;
        send(
            &mut ws,
            r#"{"content":{"granted":{"cpu":1,"mem":4294967296}},"type":"UpscaleNotification","id":4}"#,
        )
        .await;
        let first = srv.calls.recv().await.unwrap();
        assert!(matches!(first.request, ScalingRequest::Downscale { .. }));
        // Never answer the first one: it must turn into InternalError, then the second runs.
        let reply = next_text(&mut ws).await;
        assert!(
            reply.starts_with(r#"{"type":"InternalError","error":"scaling backend did not answer"#)
                && reply.ends_with(r#","id":2}"#),
            "{reply}"
        );
        let second = srv.calls.recv().await.unwrap();
        assert_eq!(
            second.request,
            ScalingRequest::Upscale {
                granted: Resources {
                    cpu: 1.0,
                    mem_bytes: 4294967296
                }
            }
        );
        second.reply.send(ScalingOutcome::UpscaleConfirmed).unwrap();
        assert_eq!(
            next_text(&mut ws).await,
            r#"{"type":"UpscaleConfirmation","id":4}"#
        );
        drop(first);
        // A backend error is passed on as InternalError with the same id.
        send(&mut ws, &DOWNSCALE_2.replace(r#""id":2"#, r#""id":6"#)).await;
        let call = srv.calls.recv().await.unwrap();
        call.reply
            .send(ScalingOutcome::InternalError("failed to downscale".into()))
            .unwrap();
        assert_eq!(
            next_text(&mut ws).await,
            r#"{"type":"InternalError","error":"failed to downscale","id":6}"#
        );
    }

    #[test]
    fn ping_budget_allows_a_burst_then_one_a_second() {
        let t0 = Instant::now();
        let mut b = PingBudget::new(t0);
        for _ in 0..32 {
            assert!(b.take(t0));
        }
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_secs(1)));
        assert!(!b.take(t0 + Duration::from_secs(1)));
        // Refilled up to the burst, not beyond.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..32 {
            assert!(b.take(later));
        }
        assert!(!b.take(later));
    }

    #[tokio::test]
    async fn every_upscale_wish_is_one_request_and_the_backend_hears_of_the_session() {
        let mut srv = start(SessionConfig::default()).await;
        let mut ws = connect(srv.addr).await;
        let conn = srv.sessions.current().expect("a current session");
        assert_eq!(*srv.agent.borrow_and_update(), Some(conn));
        // No spacing of its own: the backend's policy rate-limits the wishes.
        for (n, id) in [(1, 3), (2, 5), (3, 7)] {
            srv.wanted.send_replace(n);
            assert_eq!(
                next_text(&mut ws).await,
                format!(r#"{{"type":"UpscaleRequest","id":{id}}}"#)
            );
        }
        // A replacing session is announced; the replaced one's end does not undo that.
        let mut ws2 = connect(srv.addr).await;
        let conn2 = srv.sessions.current().expect("a current session");
        assert_ne!(conn2, conn);
        let _ = next_frame(&mut ws).await; // the old session's close
        send(&mut ws2, r#"{"content":{},"type":"HealthCheck","id":2}"#).await;
        assert_eq!(
            next_text(&mut ws2).await,
            r#"{"type":"HealthCheck","id":2}"#
        );
        assert_eq!(*srv.agent.borrow_and_update(), Some(conn2));
        // The session's end is announced too.
        drop(ws2);
        tokio::time::timeout(AGENT_TIMEOUT, srv.agent.wait_for(|a| a.is_none()))
            .await
            .expect("the backend hears the session end")
            .unwrap();
    }

    #[tokio::test]
    async fn upscale_requests_use_odd_ids_from_3_and_stale_wishes_are_dropped() {
        let srv = start(SessionConfig::default()).await;
        // Raised before any agent was connected: must not be sent.
        srv.wanted.send_replace(1);
        let mut ws = connect(srv.addr).await;
        // Health check as a barrier: a stale UpscaleRequest would have been queued before it.
        send(&mut ws, r#"{"content":{},"type":"HealthCheck","id":2}"#).await;
        assert_eq!(next_text(&mut ws).await, r#"{"type":"HealthCheck","id":2}"#);
        srv.wanted.send_replace(2);
        assert_eq!(
            next_text(&mut ws).await,
            r#"{"type":"UpscaleRequest","id":3}"#
        );
        srv.wanted.send_replace(3);
        assert_eq!(
            next_text(&mut ws).await,
            r#"{"type":"UpscaleRequest","id":5}"#
        );
    }

    #[tokio::test]
    async fn oversized_message_closes_with_1009_and_server_keeps_serving() {
        let srv = start(SessionConfig::default()).await;
        let ws = connect(srv.addr).await;
        let (mut tx, mut rx) = ws.split();
        let big = "x".repeat(MAX_MESSAGE + 1);
        // Send and read concurrently: the server closes while we are still writing.
        let sender = tokio::spawn(async move {
            let _ = tx.send(WsMessage::text(big)).await;
            tx
        });
        let close = match tokio::time::timeout(AGENT_TIMEOUT, rx.next())
            .await
            .unwrap()
        {
            Some(Ok(WsMessage::Close(frame))) => frame,
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            Some(Err(e)) => panic!("read error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        };
        let close = close.expect("close frame without code");
        assert_eq!(close.code, CloseCode::Size);
        assert_eq!(u16::from(close.code), 1009);
        let _ = sender.await;
        let mut ws2 = connect(srv.addr).await;
        send(&mut ws2, r#"{"content":{},"type":"HealthCheck","id":2}"#).await;
        assert_eq!(
            next_text(&mut ws2).await,
            r#"{"type":"HealthCheck","id":2}"#
        );
    }

    #[tokio::test]
    async fn shutdown_closes_sessions_with_1001_and_serve_returns() {
        let mut srv = start(SessionConfig::default()).await;
        let mut ws = connect(srv.addr).await;
        // A second connection still in its handshake is closed too.
        let (mut pending, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/monitor", srv.addr))
                .await
                .unwrap();
        srv.shutdown.take().unwrap().send(()).unwrap();
        for client in [&mut ws, &mut pending] {
            match next_frame(client).await {
                WsMessage::Close(Some(f)) => {
                    assert_eq!(u16::from(f.code), 1001);
                    assert_eq!(f.reason.as_str(), SHUTDOWN_REASON);
                }
                other => panic!("expected close frame, got {other:?}"),
            }
        }
        drop(ws);
        drop(pending);
        tokio::time::timeout(Duration::from_secs(10), &mut srv.served)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(srv.sessions.live(), 0);
    }

    #[tokio::test]
    async fn new_handshake_replaces_old_session_but_half_open_does_not() {
        let config = SessionConfig {
            handshake_timeout: Duration::from_millis(500),
            ..SessionConfig::default()
        };
        let srv = start(config).await;
        let mut old = connect(srv.addr).await;
        let first = srv.sessions.current();
        assert!(first.is_some());
        // Half-open: upgrades, never sends the range, gets dropped at the timeout.
        let (mut half, _) = tokio_tungstenite::connect_async(format!("ws://{}/monitor", srv.addr))
            .await
            .unwrap();
        match next_frame(&mut half).await {
            WsMessage::Close(Some(f)) => assert_eq!(u16::from(f.code), 1002),
            other => panic!("expected close frame, got {other:?}"),
        }
        assert_eq!(srv.sessions.current(), first);
        send(&mut old, r#"{"content":{},"type":"HealthCheck","id":2}"#).await;
        assert_eq!(
            next_text(&mut old).await,
            r#"{"type":"HealthCheck","id":2}"#
        );
        // A completed handshake replaces it.
        let mut new = connect(srv.addr).await;
        match next_frame(&mut old).await {
            WsMessage::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 1000);
                assert_eq!(f.reason.as_str(), REPLACED_REASON);
            }
            other => panic!("expected close frame, got {other:?}"),
        }
        assert_ne!(srv.sessions.current(), first);
        send(&mut new, r#"{"content":{},"type":"HealthCheck","id":2}"#).await;
        assert_eq!(
            next_text(&mut new).await,
            r#"{"type":"HealthCheck","id":2}"#
        );
    }
}
