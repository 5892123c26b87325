//! The fake agent itself, checked against a scripted monitor: it must behave like the Go agent
//! (agent-protocol.md, "Test-client recipe"), or tests built on it prove nothing.
//!
//! Timing checks here are lower bounds on the *fake agent's own* waits (cooldowns), never
//! upper bounds on anybody's speed.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tests::agent::{AgentConfig, Alloc, ConnEnd, FakeAgent, GIB, Timings};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const CU: Alloc = Alloc::DEFAULT_CU;
const WAIT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TcpStream>;

/// A monitor whose every reply the test writes by hand.
struct Scripted {
    listener: TcpListener,
    url: String,
}

impl Scripted {
    async fn new() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/monitor", listener.local_addr().unwrap());
        Scripted { listener, url }
    }

    /// Accepts one connection and completes the handshake, checking the agent's range frame.
    async fn accept(&self) -> Ws {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        assert_eq!(recv(&mut ws).await, r#"{"min":1,"max":1}"#);
        ws.send(Message::text(r#"{"version":1}"#)).await.unwrap();
        ws
    }
}

async fn recv_msg(ws: &mut Ws) -> Message {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return m,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

async fn recv(ws: &mut Ws) -> String {
    match recv_msg(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string())).await.unwrap();
}

fn id_of(frame: &str) -> u64 {
    serde_json::from_str::<Value>(frame).unwrap()["id"]
        .as_u64()
        .unwrap()
}

/// No periodic health checks during the test (they would interleave with scripted frames).
fn quiet(url: &str) -> AgentConfig {
    AgentConfig {
        timings: Timings {
            health_interval: Duration::from_secs(3600),
            retry_denied: Duration::from_millis(400),
            retry_failed: Duration::from_millis(300),
            ..Timings::default()
        },
        ..AgentConfig::new(url)
    }
}

#[tokio::test]
async fn health_checks_use_even_ids_from_2() {
    let m = Scripted::new().await;
    let config = AgentConfig {
        timings: Timings {
            health_interval: Duration::from_millis(100),
            ..Timings::default()
        },
        ..AgentConfig::new(&m.url)
    };
    let (agent, mut ws) = tokio::join!(FakeAgent::connect(config), m.accept());
    let agent = agent.unwrap();
    for id in [2, 4, 6] {
        assert_eq!(
            recv(&mut ws).await,
            format!(r#"{{"content":{{}},"type":"HealthCheck","id":{id}}}"#)
        );
        send(&mut ws, &format!(r#"{{"type":"HealthCheck","id":{id}}}"#)).await;
    }
    drop(agent);
}

#[tokio::test]
async fn downscale_steps_with_denial_cooldown_and_retry_after_error() {
    let m = Scripted::new().await;
    let config = quiet(&m.url);
    let (agent, mut ws) = tokio::join!(FakeAgent::connect(config), m.accept());
    let agent = agent.unwrap();
    let run = tokio::spawn(async move {
        let r = agent.downscale_to(Alloc::cus(2, CU), WAIT).await.unwrap();
        (agent, r)
    });
    let step1 =
        r#"{"content":{"target":{"cpu":0.75,"mem":3221225472}},"type":"DownscaleRequest","id":"#;

    let f = recv(&mut ws).await;
    assert_eq!(f, format!("{step1}2}}"));
    send(
        &mut ws,
        r#"{"type":"DownscaleResult","Ok":false,"Status":"no","id":2}"#,
    )
    .await;
    let denied_at = Instant::now();

    // Same step again, not before the denial cooldown.
    let f = recv(&mut ws).await;
    assert!(denied_at.elapsed() >= Duration::from_millis(400));
    assert_eq!(f, format!("{step1}4}}"));
    send(&mut ws, r#"{"type":"InternalError","error":"boom","id":4}"#).await;
    let failed_at = Instant::now();

    // Retried after the failure back-off; lowercase `ok` is accepted like Go does.
    let f = recv(&mut ws).await;
    assert!(failed_at.elapsed() >= Duration::from_millis(300));
    assert_eq!(f, format!("{step1}6}}"));
    send(
        &mut ws,
        r#"{"type":"DownscaleResult","ok":true,"status":"fine","id":6}"#,
    )
    .await;

    // Next 1-CU step immediately.
    let f = recv(&mut ws).await;
    assert_eq!(
        f,
        r#"{"content":{"target":{"cpu":0.5,"mem":2147483648}},"type":"DownscaleRequest","id":8}"#
    );
    send(
        &mut ws,
        r#"{"type":"DownscaleResult","Ok":true,"Status":"ok","id":8,"extra":1}"#,
    )
    .await;

    let (agent, report) = run.await.unwrap();
    assert!(report.reached);
    assert_eq!((report.approved, report.denied, report.failed), (2, 1, 1));
    assert_eq!(report.statuses, vec!["no", "fine", "ok"]);
    assert_eq!(agent.vm(), Alloc::cus(2, CU));
}

#[tokio::test]
async fn missing_ok_reads_as_denial() {
    let m = Scripted::new().await;
    let (agent, mut ws) = tokio::join!(FakeAgent::connect(quiet(&m.url)), m.accept());
    let agent = agent.unwrap();
    let run = tokio::spawn(async move {
        agent
            .downscale_to(Alloc::cus(3, CU), Duration::from_millis(200))
            .await
            .unwrap()
    });
    let f = recv(&mut ws).await;
    send(
        &mut ws,
        &format!(r#"{{"type":"DownscaleResult","id":{}}}"#, id_of(&f)),
    )
    .await;
    let report = run.await.unwrap();
    assert!(!report.reached);
    assert_eq!(report.denied, 1);
}

#[tokio::test]
async fn upscale_request_is_not_answered_and_grows_the_vm_one_cu_above_approved() {
    let m = Scripted::new().await;
    let config = AgentConfig {
        vm: Alloc::cus(3, CU),
        upscale_on_request: Some(Duration::from_millis(50)),
        ..quiet(&m.url)
    };
    let (agent, mut ws) = tokio::join!(FakeAgent::connect(config), m.accept());
    let agent = agent.unwrap();
    send(&mut ws, r#"{"type":"UpscaleRequest","id":3}"#).await;
    assert_eq!(agent.wait_for_upscale_request(WAIT).await.unwrap(), 3);
    // 1 + floor(3 GiB / 1 GiB) = 4 CU, in one notification with a fresh even id.
    assert_eq!(
        recv(&mut ws).await,
        r#"{"content":{"granted":{"cpu":1,"mem":4294967296}},"type":"UpscaleNotification","id":2}"#
    );
    send(&mut ws, r#"{"type":"UpscaleConfirmation","id":2}"#).await;
    // While the request is valid, downscaling stops at 4 CU.
    let deadline = Duration::from_millis(300);
    let report = async {
        while agent.approved() != Some(Alloc::cus(4, CU)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        agent
            .downscale_to(Alloc::cus(1, CU), deadline)
            .await
            .unwrap()
    };
    let report = tokio::time::timeout(WAIT, report).await.unwrap();
    assert_eq!(report.approved + report.denied + report.failed, 0);
    assert_eq!(agent.vm(), Alloc::new(1000, 4 * GIB));
}

#[tokio::test]
async fn unknown_ids_and_types_draw_invalid_message() {
    let m = Scripted::new().await;
    let (agent, mut ws) = tokio::join!(FakeAgent::connect(quiet(&m.url)), m.accept());
    let _agent = agent.unwrap();
    send(&mut ws, r#"{"type":"HealthCheck","id":42}"#).await;
    assert_eq!(
        recv(&mut ws).await,
        r#"{"content":{"error":"Received HealthCheck with id 42 but id is unknown or already timed out waiting for a reply"},"type":"InvalidMessage","id":42}"#
    );
    send(&mut ws, r#"{"type":"Bogus","id":44}"#).await;
    assert_eq!(
        recv(&mut ws).await,
        r#"{"content":{"error":"Received message of unknown type: \"Bogus\""},"type":"InvalidMessage","id":44}"#
    );
    // InvalidMessage from the monitor is only logged.
    send(&mut ws, r#"{"type":"InvalidMessage","error":"x","id":46}"#).await;
    send(&mut ws, r#"{"type":"HealthCheck","id":48}"#).await;
    assert_eq!(id_of(&recv(&mut ws).await), 48);
}

#[tokio::test]
async fn non_json_from_the_monitor_is_fatal_with_1011() {
    let m = Scripted::new().await;
    let (agent, mut ws) = tokio::join!(FakeAgent::connect(quiet(&m.url)), m.accept());
    let agent = agent.unwrap();
    send(&mut ws, "garbage").await;
    match recv_msg(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1011),
        other => panic!("expected close 1011, got {other:?}"),
    }
    assert!(matches!(
        agent.wait_for_end(1, WAIT).await.unwrap(),
        ConnEnd::ClosedByAgent { code: 1011, .. }
    ));
}

#[tokio::test]
async fn undecodable_downscale_result_sends_invalid_message_then_1011() {
    let m = Scripted::new().await;
    let (agent, mut ws) = tokio::join!(FakeAgent::connect(quiet(&m.url)), m.accept());
    let agent = agent.unwrap();
    let run = tokio::spawn(async move {
        let r = agent
            .downscale_to(Alloc::cus(3, CU), Duration::from_secs(1))
            .await;
        (agent, r)
    });
    let f = recv(&mut ws).await;
    let id = id_of(&f);
    send(
        &mut ws,
        &format!(r#"{{"type":"DownscaleResult","Ok":"yes","id":{id}}}"#),
    )
    .await;
    let invalid = recv(&mut ws).await;
    assert!(invalid.contains(r#""type":"InvalidMessage""#), "{invalid}");
    assert_eq!(id_of(&invalid), id);
    match recv_msg(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1011),
        other => panic!("expected close 1011, got {other:?}"),
    }
    let (_agent, report) = run.await.unwrap();
    assert!(!report.unwrap().reached);
}

#[tokio::test]
async fn continuous_health_check_failures_close_with_1011() {
    let m = Scripted::new().await;
    let config = AgentConfig {
        timings: Timings {
            health_interval: Duration::from_millis(100),
            response: Duration::from_millis(100),
            health_failure_limit: Duration::from_millis(500),
            ..Timings::default()
        },
        ..AgentConfig::new(&m.url)
    };
    let (agent, mut ws) = tokio::join!(FakeAgent::connect(config), m.accept());
    let agent = agent.unwrap();
    // Never answer; read until the agent gives up.
    let close = loop {
        match recv_msg(&mut ws).await {
            Message::Text(t) => assert!(t.contains("HealthCheck"), "{t}"),
            Message::Close(f) => break f.unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1011);
    assert_eq!(
        close.reason.as_str(),
        "vm-monitor has been failing health checks for at least 500ms"
    );
    assert!(matches!(
        agent.wait_for_end(1, WAIT).await.unwrap(),
        ConnEnd::ClosedByAgent { code: 1011, .. }
    ));
}

#[tokio::test]
async fn handshake_error_reply_closes_with_1002() {
    let m = Scripted::new().await;
    let server = async {
        let (tcp, _) = m.listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        assert_eq!(recv(&mut ws).await, r#"{"min":1,"max":1}"#);
        send(&mut ws, r#"{"error":"no overlap"}"#).await;
        recv_msg(&mut ws).await
    };
    let (agent, close) = tokio::join!(FakeAgent::connect(quiet(&m.url)), server);
    assert!(agent.is_err());
    match close {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 1002);
            assert_eq!(f.reason.as_str(), "no overlap");
        }
        other => panic!("expected close 1002, got {other:?}"),
    }
}
