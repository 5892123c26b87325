//! The real engine behind the real server, with a websocket client as the agent: connects and
//! disconnects reach the policy (a reconnected agent is asked at once), and the policy's rate
//! limit (`--upscale-interval-ms`) is the only one on the wire. No cgroup is needed: poll-tier
//! samples carry their own reading.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use monitor::admission::{Admission, AgentAllow, Limits};
use monitor::engine::{self, EngineParts};
use monitor::policy::{Config, Policy};
use monitor::pressure::{PressureEvent, PressureKind};
use monitor::server::{self, ServerState};
use monitor::session::SessionConfig;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

const GIB: u64 = 1 << 30;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Rig {
    url: String,
    pressure: mpsc::Sender<PressureEvent>,
    _stop: watch::Sender<bool>,
}

/// Engine (4 GiB, nothing managed but the decisions) + server on loopback.
async fn rig(upscale_interval: Duration) -> Rig {
    let cfg = Config {
        manage_file_cache: false,
        manage_memory_high: false,
        upscale_min_interval: upscale_interval,
        ..Config::default()
    };
    let (pressure, pressure_rx) = mpsc::channel(64);
    let (stop, stop_rx) = watch::channel(false);
    let handle = engine::spawn(
        EngineParts {
            policy: Policy::new(cfg).expect("valid config"),
            cgroup: None,
            file_cache: None,
            mem_total: 4 * GIB,
            metrics: None,
            recorder: None,
            growth_hint: None,
        },
        Some(pressure_rx),
        stop_rx.clone(),
        None,
    );
    let listener = server::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let admission = Admission::new(Limits::default(), AgentAllow::default());
    let state =
        ServerState::with_config(handle.backend, SessionConfig::default(), admission.clone());
    let sessions = state.sessions.clone();
    let mut stopped = stop_rx;
    tokio::spawn(server::serve_router(
        listener,
        server::router(state),
        sessions,
        admission,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    Rig {
        url: format!("ws://{addr}/monitor"),
        pressure,
        _stop: stop,
    }
}

fn over_threshold() -> PressureEvent {
    // Threshold: 0.85 · (4 GiB − 100 MiB) ≈ 3.4 GiB.
    PressureEvent::now(PressureKind::PolledSample {
        avg_non_reclaimable: 4 * GIB - 1,
        samples: 5,
    })
}

async fn agent(url: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    ws.send(Message::text(r#"{"min":1,"max":1}"#))
        .await
        .expect("send range");
    match ws.next().await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), r#"{"version":1}"#),
        other => panic!("handshake: {other:?}"),
    }
    ws
}

/// Waits for the next UpscaleRequest; `None` if none comes within `within`.
async fn next_upscale(ws: &mut Ws, within: Duration) -> Option<Instant> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(t)))) if t.contains("UpscaleRequest") => {
                return Some(Instant::now());
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("session ended: {other:?}"),
        }
    }
}

/// Keeps pressure over the threshold: a sample every 50 ms until dropped.
fn keep_pressing(rig: &Rig) -> tokio::task::JoinHandle<()> {
    let tx = rig.pressure.clone();
    tokio::spawn(async move {
        while tx.send(over_threshold()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test]
async fn the_policys_interval_is_the_only_rate_limit_on_the_wire() {
    let rig = rig(Duration::from_millis(300)).await;
    let mut ws = agent(&rig.url).await;
    let pressing = keep_pressing(&rig);
    let mut stamps = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        if let Some(at) = next_upscale(&mut ws, Duration::from_secs(2)).await {
            stamps.push(at);
        }
    }
    pressing.abort();
    let gaps: Vec<u128> = stamps
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    println!("{} requests in 2.5 s, gaps {gaps:?} ms", stamps.len());
    // At 300 ms about 8; a second limiter of 1 s would allow 3.
    assert!(stamps.len() >= 5, "{} requests: {gaps:?}", stamps.len());
    // Never faster than the interval (minus delivery jitter).
    assert!(gaps.iter().all(|g| *g >= 200), "{gaps:?}");
}

#[tokio::test]
async fn a_reconnected_agent_is_asked_at_once_while_pressure_lasts() {
    let rig = rig(Duration::from_secs(1)).await;
    let mut first = agent(&rig.url).await;
    let pressing = keep_pressing(&rig);
    next_upscale(&mut first, Duration::from_secs(5))
        .await
        .expect("a first UpscaleRequest");
    // The agent goes away while the pressure continues, longer than the interval: the
    // policy keeps its wish for the next agent instead of sending it to nobody.
    drop(first);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let connected = Instant::now();
    let mut second = agent(&rig.url).await;
    let asked = next_upscale(&mut second, Duration::from_secs(5))
        .await
        .expect("the reconnected agent is asked");
    let after = asked - connected;
    println!("asked {after:?} after the reconnect");
    // At once (the sample cadence is 50 ms), not at the next tick of a 1 s limit counted from
    // a request nobody received.
    assert!(after < Duration::from_millis(500), "{after:?}");
    pressing.abort();
}
