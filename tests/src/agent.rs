//! A faithful fake autoscaler-agent: the real agent's timings, ids, phases and reconnect loop.
//! Independent of the `monitor` crate on purpose: frames are
//! built by hand in the Go agent's byte layout and decoded the way the Go agent decodes them
//! (generic map, string `type`, numeric `id`, case-insensitive payload fields, unknown fields
//! ignored, missing `Ok` = false).
//!
//! One [`FakeAgent`] models the agent's per-VM runner: it keeps at most one connection, sends
//! health checks, runs scaling requests one at a time, honours `UpscaleRequest`s and reconnects
//! no more often than every `reconnect_min_wait`. Every frame goes into a [`Transcript`].

use anyhow::{Context, anyhow, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------------------
// Resources and parameters

/// A VM allocation: vCPUs (kept in milli-CPU, as the agent does) and memory bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Alloc {
    pub milli_cpu: u64,
    pub mem: u64,
}

pub const GIB: u64 = 1 << 30;

impl Alloc {
    pub const fn new(milli_cpu: u64, mem: u64) -> Self {
        Self { milli_cpu, mem }
    }

    /// The agent's default compute unit: 0.25 vCPU, 1 GiB.
    pub const DEFAULT_CU: Alloc = Alloc::new(250, GIB);

    /// `n` compute units of `cu`.
    pub const fn cus(n: u64, cu: Alloc) -> Self {
        Self::new(cu.milli_cpu * n, cu.mem * n)
    }

    pub fn cpu(&self) -> f64 {
        self.milli_cpu as f64 / 1000.0
    }

    /// `{"cpu":0.75,"mem":3221225472}`, whole CPUs without a decimal point, as Go prints them.
    pub fn to_json(&self) -> String {
        format!(r#"{{"cpu":{},"mem":{}}}"#, go_cpu(self.milli_cpu), self.mem)
    }

    fn max_each(self, o: Alloc) -> Alloc {
        Alloc::new(self.milli_cpu.max(o.milli_cpu), self.mem.max(o.mem))
    }

    fn min_each(self, o: Alloc) -> Alloc {
        Alloc::new(self.milli_cpu.min(o.milli_cpu), self.mem.min(o.mem))
    }

    fn saturating_sub(self, o: Alloc) -> Alloc {
        Alloc::new(
            self.milli_cpu.saturating_sub(o.milli_cpu),
            self.mem.saturating_sub(o.mem),
        )
    }

    /// Each resource at or below `o`'s.
    pub fn fits_in(&self, o: &Alloc) -> bool {
        self.milli_cpu <= o.milli_cpu && self.mem <= o.mem
    }
}

impl fmt::Display for Alloc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vCPU / {} MiB",
            go_cpu(self.milli_cpu),
            self.mem >> 20
        )
    }
}

fn go_cpu(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        // Rust prints the shortest round-tripping form, like Go's 'g'-ish float formatting for
        // these magnitudes (0.25, 0.75, 1.5).
        (milli as f64 / 1000.0).to_string()
    }
}

/// Every timing the real agent uses, so tests can shrink them. Defaults are the shipped config.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// Dial + upgrade + version exchange (`connectionTimeoutSeconds`).
    pub connect: Duration,
    /// Every request's reply timeout (`responseTimeoutSeconds`).
    pub response: Duration,
    /// Health-check period; the first check is one period after connecting.
    pub health_interval: Duration,
    /// Continuous health-check failure before the agent gives up on a connection.
    pub health_failure_limit: Duration,
    /// Back-off after a failed scaling request (`retryFailedRequestSeconds`).
    pub retry_failed: Duration,
    /// Cooldown after a denied downscale (`retryDeniedDownscaleSeconds`).
    pub retry_denied: Duration,
    /// How long an `UpscaleRequest` influences the target (`requestedUpscaleValidSeconds`).
    pub requested_upscale_valid: Duration,
    /// Minimum spacing between connection attempt starts (`connectionRetryMinWaitSeconds`).
    pub reconnect_min_wait: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        let s = Duration::from_secs;
        Self {
            connect: s(4),
            response: s(5),
            health_interval: s(5),
            health_failure_limit: s(30),
            retry_failed: s(3),
            retry_denied: s(5),
            requested_upscale_valid: s(10),
            reconnect_min_wait: s(5),
        }
    }
}

impl Timings {
    /// All agent timings divided by `factor`, except the connect and response timeouts, which
    /// stay at the agent's values (they bound what we accept from the monitor).
    pub fn scaled(factor: u32) -> Self {
        let d = Self::default();
        Self {
            health_interval: d.health_interval / factor,
            health_failure_limit: d.health_failure_limit / factor,
            retry_failed: d.retry_failed / factor,
            retry_denied: d.retry_denied / factor,
            requested_upscale_valid: d.requested_upscale_valid / factor,
            reconnect_min_wait: d.reconnect_min_wait / factor,
            ..d
        }
    }
}

/// What the fake agent is and does.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `ws://HOST:PORT/monitor`.
    pub url: String,
    /// The VM's real size when the agent starts (the agent assumes the monitor knows it).
    pub vm: Alloc,
    /// Compute unit.
    pub cu: Alloc,
    /// VM maximum: requested upscales never go beyond.
    pub max: Alloc,
    pub timings: Timings,
    /// Reconnect after the connection ends (the real agent always does).
    pub reconnect: bool,
    /// On `UpscaleRequest`, grow the VM after this simulated scheduler + NeonVM delay.
    /// `None`: only record the request.
    pub upscale_on_request: Option<Duration>,
    /// Print transcript lines to stdout as they happen.
    pub echo: bool,
}

impl AgentConfig {
    /// A 4 CU VM (max 8 CU) with the agent's default timings, no reconnects (tests decide).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            vm: Alloc::cus(4, Alloc::DEFAULT_CU),
            cu: Alloc::DEFAULT_CU,
            max: Alloc::cus(8, Alloc::DEFAULT_CU),
            timings: Timings::default(),
            reconnect: false,
            upscale_on_request: None,
            echo: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transcript

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Agent → monitor.
    Sent,
    /// Monitor → agent.
    Received,
    /// Something that is not a frame (connect, disconnect, decisions).
    Note,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(usize),
    Close(Option<(u16, String)>),
    Note(String),
}

#[derive(Clone, Debug)]
pub struct Entry {
    /// Time since the fake agent was created.
    pub at: Duration,
    /// Connection number (1 = first connection).
    pub conn: u32,
    pub dir: Dir,
    pub frame: Frame,
}

impl Entry {
    pub fn text(&self) -> Option<&str> {
        match &self.frame {
            Frame::Text(t) => Some(t),
            _ => None,
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let arrow = match self.dir {
            Dir::Sent => "→",
            Dir::Received => "←",
            Dir::Note => "·",
        };
        write!(
            f,
            "t={:>8.3} #{} {arrow} ",
            self.at.as_secs_f64(),
            self.conn
        )?;
        match &self.frame {
            Frame::Text(t) => f.write_str(t),
            Frame::Binary(n) => write!(f, "<binary frame, {n} bytes>"),
            Frame::Close(Some((code, reason))) => write!(f, "<close {code} {reason:?}>"),
            Frame::Close(None) => write!(f, "<close, no code>"),
            Frame::Note(n) => write!(f, "({n})"),
        }
    }
}

/// All entries so far.
#[derive(Clone, Debug, Default)]
pub struct Transcript(pub Vec<Entry>);

impl Transcript {
    pub fn sent_texts(&self) -> Vec<&str> {
        self.texts(Dir::Sent)
    }

    pub fn received_texts(&self) -> Vec<&str> {
        self.texts(Dir::Received)
    }

    fn texts(&self, dir: Dir) -> Vec<&str> {
        self.0
            .iter()
            .filter(|e| e.dir == dir)
            .filter_map(Entry::text)
            .collect()
    }

    /// Frames (text only) in both directions, `(dir, text)`.
    pub fn frames(&self) -> Vec<(Dir, &str)> {
        self.0
            .iter()
            .filter(|e| e.dir != Dir::Note)
            .filter_map(|e| e.text().map(|t| (e.dir, t)))
            .collect()
    }
}

impl fmt::Display for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and outcomes

/// Why a request did not get its expected answer.
#[derive(Clone, Debug, PartialEq)]
pub enum RequestError {
    NotConnected,
    /// The connection ended while waiting.
    Disconnected,
    Timeout,
    /// The monitor answered `InternalError`.
    MonitorInternalError(String),
    /// Failed by the agent's id quirk (e.g. the monitor sent `InvalidMessage` with our id);
    /// carries the frame that failed it.
    Failed(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::NotConnected => f.write_str("not connected"),
            RequestError::Disconnected => f.write_str("connection ended while waiting"),
            RequestError::Timeout => f.write_str("timed out waiting for a reply"),
            RequestError::MonitorInternalError(e) => write!(f, "vm-monitor internal error: {e}"),
            RequestError::Failed(frame) => {
                write!(f, "monitor experienced an internal error (frame {frame})")
            }
        }
    }
}

impl std::error::Error for RequestError {}

/// A reply matched to one of our requests.
#[derive(Clone, Debug)]
pub struct Reply {
    pub id: u64,
    pub type_name: String,
    /// The raw frame text, byte for byte.
    pub text: String,
    fields: Map<String, Value>,
}

impl Reply {
    /// A payload field, matched like Go's decoder (exact key first, then case-insensitive).
    pub fn field(&self, name: &str) -> Option<&Value> {
        get_ci(&self.fields, name)
    }
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnEnd {
    /// The monitor sent a close frame.
    ClosedByMonitor { code: Option<u16>, reason: String },
    /// We closed (teardown, fatal decode error, failing health checks).
    ClosedByAgent { code: u16, reason: String },
    /// The socket ended without a close frame from the monitor.
    Dropped(String),
}

/// Result of [`FakeAgent::downscale_to`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DownscaleReport {
    pub reached: bool,
    pub approved: u32,
    pub denied: u32,
    pub failed: u32,
    /// Every `DownscaleResult` `Status` text received, in order.
    pub statuses: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Agent

/// The fake agent. Dropping it stops everything; [`FakeAgent::close`] closes politely.
pub struct FakeAgent {
    shared: Arc<Shared>,
    supervisor: tokio::task::JoinHandle<()>,
}

struct Shared {
    config: AgentConfig,
    start: Instant,
    transcript: Mutex<Vec<Entry>>,
    /// The VM's actual size as the agent manages it.
    vm: Mutex<Alloc>,
    current: watch::Sender<Option<Arc<Conn>>>,
    ends: watch::Sender<Vec<ConnEnd>>,
    /// (request id, CLOCK_BOOTTIME ns when the frame was handled).
    upscale_tx: mpsc::UnboundedSender<(u64, u64)>,
    upscale_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<(u64, u64)>>,
    /// At most one scaling request (upscale or downscale) in flight.
    scaling: tokio::sync::Mutex<()>,
    stop: watch::Sender<bool>,
    conns: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn record(&self, conn: u32, dir: Dir, frame: Frame) {
        self.record_at(Instant::now(), conn, dir, frame);
    }

    fn record_at(&self, when: Instant, conn: u32, dir: Dir, frame: Frame) {
        let entry = Entry {
            at: when.saturating_duration_since(self.start),
            conn,
            dir,
            frame,
        };
        if self.config.echo {
            println!("{entry}");
        }
        lock(&self.transcript).push(entry);
    }

    fn note(&self, conn: u32, text: impl Into<String>) {
        self.record(conn, Dir::Note, Frame::Note(text.into()));
    }

    fn current(&self) -> Option<Arc<Conn>> {
        self.current.borrow().clone()
    }
}

/// One websocket connection and its per-connection agent state.
struct Conn {
    no: u32,
    out: mpsc::UnboundedSender<Out>,
    state: Mutex<ConnState>,
    /// Set when the connection is over.
    ended: watch::Sender<Option<ConnEnd>>,
    /// Asks the reader to stop after we sent a close frame.
    closing: Notify,
}

struct ConnState {
    next_id: u64,
    pending: HashMap<u64, oneshot::Sender<Result<Reply, RequestError>>>,
    /// Last allocation the monitor accepted (starts as the VM's size).
    approved: Alloc,
    /// Last denied downscale: when, and the denied target.
    denied: Option<(Instant, Alloc)>,
    /// Last failed scaling request.
    failed_at: Option<Instant>,
    /// Last `UpscaleRequest`: when, and `approved` at that time.
    requested: Option<(Instant, Alloc)>,
    /// Set by whichever side started closing first; data frames after it are ignored.
    end: Option<ConnEnd>,
}

enum Out {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, String),
    /// Stop writing without sending anything (connection is over).
    Stop,
}

impl Conn {
    fn state(&self) -> MutexGuard<'_, ConnState> {
        lock(&self.state)
    }

    fn is_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// Usable for new requests: not ended and nobody started closing.
    fn is_open(&self) -> bool {
        !self.is_ended() && self.state().end.is_none()
    }

    fn send(&self, out: Out) -> Result<(), RequestError> {
        self.out.send(out).map_err(|_| RequestError::Disconnected)
    }

    /// Sends a close frame (once) and lets the reader wind down.
    fn close(&self, code: u16, reason: &str) {
        let reason = truncate_reason(reason);
        {
            let mut st = self.state();
            if st.end.is_some() {
                return;
            }
            st.end = Some(ConnEnd::ClosedByAgent {
                code,
                reason: reason.clone(),
            });
        }
        let _ = self.out.send(Out::Close(code, reason));
        self.closing.notify_one();
    }
}

impl FakeAgent {
    /// Connects (Phase 0) and starts health checks and the reconnect loop. Fails if the first
    /// connection attempt fails.
    pub async fn connect(config: AgentConfig) -> anyhow::Result<FakeAgent> {
        let (upscale_tx, upscale_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            vm: Mutex::new(config.vm),
            config,
            start: Instant::now(),
            transcript: Mutex::new(Vec::new()),
            current: watch::channel(None).0,
            ends: watch::channel(Vec::new()).0,
            upscale_tx,
            upscale_rx: tokio::sync::Mutex::new(upscale_rx),
            scaling: tokio::sync::Mutex::new(()),
            stop: watch::channel(false).0,
            conns: AtomicU32::new(0),
        });
        let started = Instant::now();
        let conn = dial(&shared, started).await?;
        let supervisor = tokio::spawn(supervise(shared.clone(), conn, started));
        Ok(FakeAgent { shared, supervisor })
    }

    pub fn transcript(&self) -> Transcript {
        Transcript(lock(&self.shared.transcript).clone())
    }

    /// The allocation the monitor last accepted on the current connection.
    pub fn approved(&self) -> Option<Alloc> {
        self.shared.current().map(|c| c.state().approved)
    }

    /// The VM's size as this agent manages it.
    pub fn vm(&self) -> Alloc {
        *lock(&self.shared.vm)
    }

    pub fn is_connected(&self) -> bool {
        self.shared.current().is_some_and(|c| c.is_open())
    }

    /// Number of successful handshakes so far.
    pub fn connections(&self) -> u32 {
        self.shared.conns.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` connections have ended and returns how the `n`-th ended.
    pub async fn wait_for_end(&self, n: usize, timeout: Duration) -> anyhow::Result<ConnEnd> {
        let mut rx = self.shared.ends.subscribe();
        let ends = tokio::time::timeout(timeout, rx.wait_for(|e| e.len() >= n))
            .await
            .with_context(|| format!("connection #{n} did not end within {timeout:?}"))?
            .map_err(|_| anyhow!("agent stopped"))?;
        Ok(ends[n - 1].clone())
    }

    /// Waits for the next `UpscaleRequest` from the monitor and returns its id.
    pub async fn wait_for_upscale_request(&self, timeout: Duration) -> anyhow::Result<u64> {
        Ok(self.wait_for_upscale_request_at(timeout).await?.0)
    }

    /// [`FakeAgent::wait_for_upscale_request`], also returning when the agent's reader handled
    /// the frame (CLOCK_BOOTTIME ns), before any hop to the waiting task.
    pub async fn wait_for_upscale_request_at(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<(u64, u64)> {
        let mut rx = self.shared.upscale_rx.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .with_context(|| format!("no UpscaleRequest within {timeout:?}"))?
            .ok_or_else(|| anyhow!("agent stopped"))
    }

    /// Takes the `UpscaleRequest`s already received and not yet waited for; returns how many.
    pub async fn take_upscale_requests(&self) -> u64 {
        let mut rx = self.shared.upscale_rx.lock().await;
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// Sends one health check now and waits for its reply.
    pub async fn health_check(&self) -> Result<Reply, RequestError> {
        let conn = self.shared.current().ok_or(RequestError::NotConnected)?;
        request(
            &self.shared,
            &conn,
            "HealthCheck",
            "{}",
            self.shared.config.timings.response,
        )
        .await
    }

    /// Sends a request of any type with a proper next id and waits for the frame answering it.
    /// For probing the monitor with payloads the real agent would never send.
    pub async fn request_raw(&self, type_name: &str, content: &str) -> Result<Reply, RequestError> {
        let conn = self.shared.current().ok_or(RequestError::NotConnected)?;
        request(
            &self.shared,
            &conn,
            type_name,
            content,
            self.shared.config.timings.response,
        )
        .await
    }

    /// Sends an arbitrary text frame (not something the real agent does; for robustness tests).
    pub fn send_raw_text(&self, text: &str) -> anyhow::Result<()> {
        let conn = self.shared.current().context("not connected")?;
        conn.send(Out::Text(text.to_string()))
            .map_err(|e| anyhow!("{e}"))
    }

    /// Sends an arbitrary binary frame (the real agent never does).
    pub fn send_raw_binary(&self, data: Vec<u8>) -> anyhow::Result<()> {
        let conn = self.shared.current().context("not connected")?;
        conn.send(Out::Binary(data)).map_err(|e| anyhow!("{e}"))
    }

    /// Phase 2: 1-CU `DownscaleRequest` steps towards `target`, honouring the denial cooldown,
    /// the retry back-off and a valid `UpscaleRequest`, until reached or `deadline` elapsed.
    pub async fn downscale_to(
        &self,
        target: Alloc,
        deadline: Duration,
    ) -> anyhow::Result<DownscaleReport> {
        downscale_to(&self.shared, target, deadline).await
    }

    /// Phase 3: the VM was resized to `granted`; notify the monitor (one message for the whole
    /// jump), retrying after failures until confirmed or `deadline` elapsed.
    pub async fn upscale_to(&self, granted: Alloc, deadline: Duration) -> anyhow::Result<()> {
        upscale_to(&self.shared, granted, deadline).await
    }

    /// Stops reconnecting, closes the current connection with 1000 "normal exit" and waits
    /// (bounded by the response timeout) for the close handshake.
    pub async fn close(self) -> anyhow::Result<Transcript> {
        self.shared.stop.send_replace(true);
        if let Some(conn) = self.shared.current() {
            conn.close(1000, "normal exit");
            let mut ended = conn.ended.subscribe();
            let _ = tokio::time::timeout(
                self.shared.config.timings.response,
                ended.wait_for(Option::is_some),
            )
            .await;
        }
        let mut this = self;
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut this.supervisor).await;
        Ok(this.transcript())
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        self.supervisor.abort();
        if let Some(conn) = self.shared.current() {
            conn.close(1000, "normal exit");
        }
    }
}

/// Transcript note marking the start of a connection attempt (stamped with the instant the
/// reconnect spacing is measured from).
pub const ATTEMPT_NOTE: &str = "connection attempt";

/// Phase 0 — dial, upgrade, version exchange, all within `timings.connect`.
async fn dial(shared: &Arc<Shared>, started: Instant) -> anyhow::Result<Arc<Conn>> {
    let no = shared.conns.load(Ordering::Relaxed) + 1;
    shared.record_at(
        started,
        no,
        Dir::Note,
        Frame::Note(ATTEMPT_NOTE.to_string()),
    );
    let url = shared.config.url.clone();
    let timeout = shared.config.timings.connect;
    let (ws, version) = tokio::time::timeout(timeout, handshake(shared, no, &url))
        .await
        .map_err(|_| {
            shared.note(no, "connect + handshake timed out");
            anyhow!("connecting to {url}: no handshake within {timeout:?}")
        })??;
    shared.conns.store(no, Ordering::Relaxed);
    shared.note(no, format!("connected, protocol version {version:?}"));

    let (sink, stream) = ws.split();
    let (out, out_rx) = mpsc::unbounded_channel();
    let approved = *lock(&shared.vm);
    let conn = Arc::new(Conn {
        no,
        out,
        state: Mutex::new(ConnState {
            next_id: 0,
            pending: HashMap::new(),
            approved,
            denied: None,
            failed_at: None,
            requested: None,
            end: None,
        }),
        ended: watch::channel(None).0,
        closing: Notify::new(),
    });
    tokio::spawn(writer(shared.clone(), no, sink, out_rx));
    tokio::spawn(reader(shared.clone(), conn.clone(), stream));
    tokio::spawn(health_checks(shared.clone(), conn.clone()));
    shared.current.send_replace(Some(conn.clone()));
    Ok(conn)
}

async fn handshake(shared: &Arc<Shared>, no: u32, url: &str) -> anyhow::Result<(Ws, Option<u64>)> {
    // Nagle off, as Go's net package leaves every TCP connection (the real agent's too).
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let range = r#"{"min":1,"max":1}"#;
    shared.record(no, Dir::Sent, Frame::Text(range.to_string()));
    ws.send(Message::text(range))
        .await
        .context("sending version range")?;
    loop {
        let msg = ws
            .next()
            .await
            .context("connection ended during handshake")?
            .context("reading handshake reply")?;
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => {
                record_frame(shared, no, Dir::Received, &other);
                bail!("handshake reply is not a text frame: {other:?}");
            }
        };
        shared.record(no, Dir::Received, Frame::Text(text.clone()));
        let v: Value = serde_json::from_str(&text).context("decoding handshake reply")?;
        // Like the Go agent: an error fails; otherwise the version is not checked.
        if let Some(err) = v
            .get("error")
            .and_then(Value::as_str)
            .filter(|e| !e.is_empty())
        {
            let reason = truncate_reason(err);
            shared.record(no, Dir::Sent, Frame::Close(Some((1002, reason.clone()))));
            let _ = ws
                .close(Some(CloseFrame {
                    code: CloseCode::Protocol,
                    reason: reason.into(),
                }))
                .await;
            bail!("monitor refused the handshake: {err}");
        }
        return Ok((ws, v.get("version").and_then(Value::as_u64)));
    }
}

/// Close reasons are limited to 123 bytes.
fn truncate_reason(s: &str) -> String {
    let mut end = s.len().min(120);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn record_frame(shared: &Shared, no: u32, dir: Dir, msg: &Message) {
    let frame = match msg {
        Message::Text(t) => Frame::Text(t.to_string()),
        Message::Binary(b) => Frame::Binary(b.len()),
        Message::Close(c) => Frame::Close(
            c.as_ref()
                .map(|c| (u16::from(c.code), c.reason.to_string())),
        ),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return,
    };
    shared.record(no, dir, frame);
}

async fn writer(
    shared: Arc<Shared>,
    no: u32,
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::UnboundedReceiver<Out>,
) {
    while let Some(out) = rx.recv().await {
        let (msg, last) = match out {
            Out::Text(t) => (Message::text(t), false),
            Out::Binary(b) => (Message::binary(b), false),
            Out::Close(code, reason) => (
                Message::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                })),
                true,
            ),
            Out::Stop => return,
        };
        record_frame(&shared, no, Dir::Sent, &msg);
        if let Err(e) = sink.send(msg).await {
            shared.note(no, format!("write failed: {e}"));
            return;
        }
        if last {
            return;
        }
    }
}

/// Phase 4 — inbound frames, plus connection teardown.
async fn reader(shared: Arc<Shared>, conn: Arc<Conn>, mut stream: SplitStream<Ws>) {
    let no = conn.no;
    let mut close_deadline: Option<Instant> = None;
    let mut dropped: Option<String> = None;
    loop {
        let next = match close_deadline {
            None => tokio::select! {
                m = stream.next() => m,
                _ = conn.closing.notified() => {
                    close_deadline = Some(Instant::now() + shared.config.timings.response);
                    continue;
                }
            },
            Some(deadline) => match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(m) => m,
                Err(_) => {
                    shared.note(no, "monitor did not complete the close handshake");
                    break;
                }
            },
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                dropped = Some(format!("read error: {e}"));
                break;
            }
            None => break,
        };
        record_frame(&shared, no, Dir::Received, &msg);
        let closing = conn.state().end.is_some();
        match msg {
            Message::Text(t) if !closing => {
                if let Err(fatal) = handle_inbound(&shared, &conn, t.as_str()) {
                    shared.note(no, format!("fatal: {fatal}"));
                    conn.close(1011, &fatal);
                }
            }
            // The agent's JSON reader fails on non-text frames.
            Message::Binary(_) if !closing => conn.close(1011, "received non-text message"),
            Message::Close(frame) => {
                let mut st = conn.state();
                if st.end.is_none() {
                    st.end = Some(ConnEnd::ClosedByMonitor {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    });
                }
                drop(st);
                // tungstenite queues the close reply; polling again flushes it.
                close_deadline.get_or_insert(Instant::now() + shared.config.timings.response);
            }
            _ => {}
        }
    }
    let end = {
        let mut st = conn.state();
        // Pending requests fail as soon as their waiters see the senders dropped.
        st.pending.clear();
        st.end.clone().unwrap_or_else(|| {
            ConnEnd::Dropped(
                dropped.unwrap_or_else(|| "connection ended without a close frame".to_string()),
            )
        })
    };
    shared.note(no, format!("connection ended: {end:?}"));
    let _ = conn.out.send(Out::Stop);
    conn.ended.send_replace(Some(end.clone()));
    shared.ends.send_modify(|e| e.push(end));
}

/// Decodes one inbound text frame like the Go dispatcher. `Err` = fatal for the connection.
fn handle_inbound(shared: &Arc<Shared>, conn: &Arc<Conn>, text: &str) -> Result<(), String> {
    let no = conn.no;
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("failed to parse message: {e}"))?;
    let Value::Object(fields) = value else {
        return Err("message is not a JSON object".to_string());
    };
    let type_name = match fields.get("type") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err("message has no string field \"type\"".to_string()),
    };
    let id = match fields.get("id") {
        // Go reads the id as float64 and converts.
        Some(Value::Number(n)) => n.as_f64().map(|f| f as u64).unwrap_or(0),
        _ => return Err("message has no numeric field \"id\"".to_string()),
    };
    let reply = Reply {
        id,
        type_name: type_name.clone(),
        text: text.to_string(),
        fields,
    };

    match type_name.as_str() {
        "HealthCheck" | "UpscaleConfirmation" | "DownscaleResult" => {
            if type_name == "DownscaleResult" {
                // Payload decode failure: InvalidMessage, then fatal.
                if let Err(e) = check_downscale_result(&reply) {
                    let _ =
                        send_invalid(conn, id, &format!("failed to decode DownscaleResult: {e}"));
                    return Err(format!("failed to decode DownscaleResult: {e}"));
                }
            }
            let waiter = conn.state().pending.remove(&id);
            match waiter {
                Some(w) => {
                    let _ = w.send(Ok(reply));
                }
                None => {
                    let _ = send_invalid(
                        conn,
                        id,
                        &format!(
                            "Received {type_name} with id {id} but id is unknown or already timed out waiting for a reply"
                        ),
                    );
                }
            }
        }
        "InternalError" => {
            let error = match reply.field("error") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => String::new(),
                Some(_) => {
                    let _ = send_invalid(conn, id, "failed to decode MonitorError");
                    return Err("failed to decode MonitorError".to_string());
                }
            };
            let waiter = conn.state().pending.remove(&id);
            match waiter {
                Some(w) => {
                    let _ = w.send(Err(RequestError::MonitorInternalError(error)));
                }
                None => {
                    let _ = send_invalid(
                        conn,
                        id,
                        &format!(
                            "Received MonitorError with id {id} but id is unknown or already timed out waiting for a reply"
                        ),
                    );
                }
            }
        }
        "UpscaleRequest" => {
            let at_ns = crate::scenario::boottime_ns();
            let mut st = conn.state();
            let base = st.approved;
            st.requested = Some((Instant::now(), base));
            drop(st);
            shared.note(no, format!("upscale requested (base {base})"));
            let _ = shared.upscale_tx.send((id, at_ns));
            if let Some(delay) = shared.config.upscale_on_request {
                let shared = shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let goal = requested_goal(&shared.config, base);
                    let approved = shared.current().map(|c| c.state().approved);
                    if let Some(approved) = approved
                        && !goal.fits_in(&approved)
                    {
                        let to = goal.max_each(approved);
                        let deadline = shared.config.timings.requested_upscale_valid;
                        if let Err(e) = upscale_to(&shared, to, deadline).await {
                            shared.note(no, format!("requested upscale failed: {e:#}"));
                        }
                    }
                });
            }
        }
        "InvalidMessage" => {
            let error = reply
                .field("error")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            shared.note(
                no,
                format!("monitor says our message {id} was invalid: {error}"),
            );
        }
        other => {
            let _ = send_invalid(
                conn,
                id,
                &format!("Received message of unknown type: {other:?}"),
            );
        }
    }
    // Agent quirk: any frame carrying the id of a still-pending request fails that request.
    let waiter = conn.state().pending.remove(&id);
    if let Some(w) = waiter {
        let _ = w.send(Err(RequestError::Failed(text.to_string())));
    }
    Ok(())
}

fn check_downscale_result(reply: &Reply) -> Result<(), String> {
    match reply.field("ok") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(v) => return Err(format!("Ok must be a boolean, got {v}")),
    }
    match reply.field("status") {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(v) => Err(format!("Status must be a string, got {v}")),
    }
}

fn send_invalid(conn: &Conn, id: u64, error: &str) -> Result<(), RequestError> {
    let frame = format!(
        r#"{{"content":{{"error":{}}},"type":"InvalidMessage","id":{id}}}"#,
        Value::String(error.to_string())
    );
    conn.send(Out::Text(frame))
}

/// Go's `encoding/json` field matching: exact key, else the first case-insensitive match.
fn get_ci<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).or_else(|| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// Sends `{"content":<content>,"type":<ty>,"id":<next even id>}` and waits for the reply.
async fn request(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    type_name: &str,
    content: &str,
    timeout: Duration,
) -> Result<Reply, RequestError> {
    let (tx, rx) = oneshot::channel();
    let id = {
        let mut st = conn.state();
        if st.end.is_some() || conn.is_ended() {
            return Err(RequestError::NotConnected);
        }
        st.next_id += 2;
        let id = st.next_id;
        // Registered before sending, so an instant reply is never lost; queued under the same
        // lock so ids go on the wire in increasing order.
        st.pending.insert(id, tx);
        let frame = format!(r#"{{"content":{content},"type":"{type_name}","id":{id}}}"#);
        if let Err(e) = conn.send(Out::Text(frame)) {
            st.pending.remove(&id);
            return Err(e);
        }
        id
    };
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(RequestError::Disconnected),
        Err(_) => {
            conn.state().pending.remove(&id);
            shared.note(
                conn.no,
                format!("{type_name} {id}: no reply within {timeout:?}"),
            );
            Err(RequestError::Timeout)
        }
    }
}

/// Phase 1 — periodic health checks; gives up on the connection after continuous failures.
async fn health_checks(shared: Arc<Shared>, conn: Arc<Conn>) {
    let t = shared.config.timings;
    let mut ticker =
        tokio::time::interval_at(Instant::now() + t.health_interval, t.health_interval);
    // If a check overruns, the next one starts right after it.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ended = conn.ended.subscribe();
    let mut failing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = ended.wait_for(Option::is_some) => return,
        }
        match request(&shared, &conn, "HealthCheck", "{}", t.response).await {
            Ok(_) => failing_since = None,
            Err(RequestError::NotConnected | RequestError::Disconnected) => return,
            Err(e) => {
                let now = Instant::now();
                let since = *failing_since.get_or_insert(now);
                shared.note(conn.no, format!("health check failed: {e}"));
                if now - since > t.health_failure_limit {
                    let limit = t.health_failure_limit;
                    let limit = if limit.subsec_nanos() == 0 {
                        format!("{}s", limit.as_secs())
                    } else {
                        format!("{limit:?}")
                    };
                    let reason =
                        format!("vm-monitor has been failing health checks for at least {limit}");
                    conn.close(1011, &reason);
                    return;
                }
            }
        }
    }
}

/// Phase 5 — reconnect loop: attempts start at least `reconnect_min_wait` apart, never give up.
async fn supervise(shared: Arc<Shared>, first: Arc<Conn>, first_started: Instant) {
    let mut stop = shared.stop.subscribe();
    let mut conn = Some(first);
    let mut started = first_started;
    loop {
        if let Some(c) = &conn {
            let mut ended = c.ended.subscribe();
            tokio::select! {
                _ = ended.wait_for(Option::is_some) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        if !shared.config.reconnect || *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + shared.config.timings.reconnect_min_wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        started = Instant::now();
        let no = shared.conns.load(Ordering::Relaxed) + 1;
        conn = match dial(&shared, started).await {
            Ok(c) => Some(c),
            Err(e) => {
                shared.note(no, format!("connection attempt failed: {e:#}"));
                None
            }
        };
    }
}

/// Waits until there is a live connection.
async fn connected(shared: &Shared, until: Instant) -> anyhow::Result<Arc<Conn>> {
    let mut rx = shared.current.subscribe();
    // Re-evaluated when `current` changes (a new connection), so a closing one is not spun on.
    let wait = rx.wait_for(|c| c.as_ref().is_some_and(|c| c.is_open()));
    let conn = tokio::time::timeout_at(until, wait)
        .await
        .context("not connected")?
        .map_err(|_| anyhow!("agent stopped"))?
        .clone();
    conn.context("not connected")
}

enum Step {
    Wait(Instant),
    Send { approved: Alloc, goal: Alloc },
}

/// `CU × (1 + floor(base.mem / CU.mem))`, capped at the VM maximum.
fn requested_goal(config: &AgentConfig, base: Alloc) -> Alloc {
    let n = 1 + base.mem / config.cu.mem.max(1);
    Alloc::cus(n, config.cu).min_each(config.max)
}

async fn downscale_to(
    shared: &Arc<Shared>,
    target: Alloc,
    deadline: Duration,
) -> anyhow::Result<DownscaleReport> {
    let until = Instant::now() + deadline;
    let t = shared.config.timings;
    let cu = shared.config.cu;
    let mut report = DownscaleReport::default();
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(report);
        }
        let conn = match connected(shared, until).await {
            Ok(c) => c,
            Err(_) => return Ok(report),
        };
        let decision = {
            let st = conn.state();
            let requested_until = st
                .requested
                .map(|(at, base)| (at + t.requested_upscale_valid, base))
                .filter(|(valid_until, _)| now < *valid_until);
            let mut goal = target;
            if let Some((_, base)) = requested_until {
                // A recent UpscaleRequest floors the target at one CU above what the monitor had.
                goal = goal.max_each(requested_goal(&shared.config, base));
            }
            let goal = goal.min_each(st.approved);
            if st.approved.fits_in(&goal) {
                if st.approved.fits_in(&target) {
                    report.reached = true;
                    return Ok(report);
                }
                // Only the UpscaleRequest holds us back; wait for it to expire.
                Step::Wait(requested_until.map_or(until, |(u, _)| u))
            } else {
                let failed = st.failed_at.map(|f| f + t.retry_failed);
                let denied = st.denied.map(|(at, _)| at + t.retry_denied);
                match failed.max(denied).filter(|w| *w > now) {
                    Some(w) => Step::Wait(w),
                    None => Step::Send {
                        approved: st.approved,
                        goal,
                    },
                }
            }
        };
        let (approved, goal) = match decision {
            Step::Wait(w) => {
                tokio::time::sleep_until(w.min(until)).await;
                continue;
            }
            Step::Send { approved, goal } => (approved, goal),
        };
        // At most 1 CU per step.
        let step = goal.max_each(approved.saturating_sub(cu));
        let _one_at_a_time = shared.scaling.lock().await;
        let content = format!(r#"{{"target":{}}}"#, step.to_json());
        match request(shared, &conn, "DownscaleRequest", &content, t.response).await {
            Ok(reply) => {
                // Go decodes whatever frame answered into DownscaleResult: missing Ok = false.
                let ok = reply.field("ok").and_then(Value::as_bool).unwrap_or(false);
                let status = reply
                    .field("status")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                report.statuses.push(status);
                let mut st = conn.state();
                if ok {
                    report.approved += 1;
                    st.approved = step;
                    st.denied = None;
                    drop(st);
                    // NeonVM may now shrink the VM to the approved step.
                    *lock(&shared.vm) = step;
                } else {
                    report.denied += 1;
                    st.denied = Some((Instant::now(), step));
                }
            }
            Err(RequestError::NotConnected | RequestError::Disconnected) => {}
            Err(e) => {
                shared.note(conn.no, format!("downscale failed: {e}"));
                report.failed += 1;
                conn.state().failed_at = Some(Instant::now());
            }
        }
    }
}

async fn upscale_to(
    shared: &Arc<Shared>,
    granted: Alloc,
    deadline: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    let t = shared.config.timings;
    // The VM has been resized (scheduler permit + NeonVM patch happened before the notification).
    *lock(&shared.vm) = granted;
    loop {
        if Instant::now() >= until {
            bail!("upscale to {granted} not confirmed within {deadline:?}");
        }
        let conn = connected(shared, until).await?;
        let retry_at = conn
            .state()
            .failed_at
            .map(|f| f + t.retry_failed)
            .filter(|w| *w > Instant::now());
        if let Some(w) = retry_at {
            tokio::time::sleep_until(w.min(until)).await;
            continue;
        }
        let _one_at_a_time = shared.scaling.lock().await;
        let content = format!(r#"{{"granted":{}}}"#, granted.to_json());
        match request(shared, &conn, "UpscaleNotification", &content, t.response).await {
            Ok(_) => {
                conn.state().approved = granted;
                return Ok(());
            }
            Err(RequestError::NotConnected | RequestError::Disconnected) => {}
            Err(e) => {
                shared.note(conn.no, format!("upscale notification failed: {e}"));
                conn.state().failed_at = Some(Instant::now());
            }
        }
    }
}
