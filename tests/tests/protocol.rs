//! The agent protocol against the real `vm-monitor` binary (unmanaged mode: no cgroup, no
//! Postgres) over real loopback sockets. Build the binary first: `cargo build -p monitor`.
//!
//! "Answered" always means "within the agent's 5 s response timeout"; no other timing is
//! asserted. Where a test checks that something was *not* answered, it sends a health check
//! right after: the daemon answers frames of one connection in order (except scaling requests,
//! which are not used there), so an answer to the earlier frame would arrive first.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::time::Duration;
use tests::agent::{
    ATTEMPT_NOTE, AgentConfig, Alloc, ConnEnd, Dir, FakeAgent, Frame, RequestError, Timings,
};
use tests::daemon::Daemon;
use tests::raw::{AGENT_TIMEOUT, RawClient};
use tokio_tungstenite::tungstenite::Message;

const NOT_MANAGING: &str = "monitor is not managing cgroup or file cache";
const CU: Alloc = Alloc::DEFAULT_CU;
/// Bound for "the daemon drops a silent connection": its 4 s handshake budget plus slack.
const HANDSHAKE_DROP_BOUND: Duration = Duration::from_secs(10);

async fn daemon() -> Daemon {
    Daemon::start().await.expect("starting vm-monitor")
}

fn agent(d: &Daemon) -> AgentConfig {
    AgentConfig::new(d.ws_url())
}

fn invalid_message(frame: &str) -> (u64, String) {
    let v: Value = serde_json::from_str(frame).unwrap_or_else(|e| panic!("{frame}: {e}"));
    assert_eq!(v["type"], "InvalidMessage", "{frame}");
    let error = v["error"].as_str().expect("error text").to_string();
    assert!(!error.is_empty());
    // Flat envelope: exactly type, error, id.
    assert_eq!(v.as_object().unwrap().len(), 3, "{frame}");
    (v["id"].as_u64().expect("numeric id"), error)
}

// ---------------------------------------------------------------------------------------------
// Golden transcript

#[tokio::test]
async fn golden_transcript_against_unmanaged_daemon() {
    let mut d = daemon().await;
    let timings = Timings {
        health_interval: Duration::from_secs(1),
        ..Timings::default()
    };
    let a = FakeAgent::connect(AgentConfig {
        timings,
        ..agent(&d)
    })
    .await
    .unwrap();

    // 4 CU → 2 CU in 1-CU steps; the unmanaged daemon approves each.
    let report = a
        .downscale_to(Alloc::cus(2, CU), Duration::from_secs(20))
        .await
        .unwrap();
    assert!(report.reached, "{report:?}");
    assert_eq!((report.approved, report.denied, report.failed), (2, 0, 0));
    assert_eq!(report.statuses, vec![NOT_MANAGING, NOT_MANAGING]);
    assert_eq!(a.approved(), Some(Alloc::cus(2, CU)));

    // Wait for a periodic health check to go through, then a multi-CU upscale (2 → 4 CU).
    let hc_seen = async {
        while !a
            .transcript()
            .received_texts()
            .iter()
            .any(|t| t.contains(r#""type":"HealthCheck""#))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), hc_seen)
        .await
        .expect("periodic health check answered");
    a.upscale_to(Alloc::cus(4, CU), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(a.approved(), Some(Alloc::cus(4, CU)));
    let transcript = a.close().await.unwrap();
    println!("{transcript}");

    let frames = transcript.frames();
    assert_eq!(frames[0], (Dir::Sent, r#"{"min":1,"max":1}"#));
    assert_eq!(frames[1], (Dir::Received, r#"{"version":1}"#));
    let sent: Vec<&str> = frames[2..]
        .iter()
        .filter(|(d, _)| *d == Dir::Sent)
        .map(|(_, t)| *t)
        .collect();
    let received: Vec<&str> = frames[2..]
        .iter()
        .filter(|(d, _)| *d == Dir::Received)
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(sent.len(), received.len(), "one reply per request");

    // Even ids from 2, +2 each; each reply byte-exact, with the request's id.
    let mut scaling = Vec::new();
    let mut health_checks = 0;
    for (i, req) in sent.iter().enumerate() {
        let id = 2 * (i as u64 + 1);
        let v: Value = serde_json::from_str(req).unwrap();
        assert_eq!(v["id"].as_u64(), Some(id), "{req}");
        let want = match v["type"].as_str().unwrap() {
            "HealthCheck" => {
                health_checks += 1;
                assert_eq!(
                    *req,
                    format!(r#"{{"content":{{}},"type":"HealthCheck","id":{id}}}"#)
                );
                format!(r#"{{"type":"HealthCheck","id":{id}}}"#)
            }
            "DownscaleRequest" => {
                scaling.push(req.replace(&format!(r#","id":{id}}}"#), ""));
                format!(
                    r#"{{"type":"DownscaleResult","Ok":true,"Status":"{NOT_MANAGING}","id":{id}}}"#
                )
            }
            "UpscaleNotification" => {
                scaling.push(req.replace(&format!(r#","id":{id}}}"#), ""));
                format!(r#"{{"type":"UpscaleConfirmation","id":{id}}}"#)
            }
            other => panic!("unexpected request type {other}"),
        };
        assert!(
            received.contains(&want.as_str()),
            "no reply {want} in {received:?}"
        );
    }
    assert!(health_checks >= 1);
    assert_eq!(
        scaling,
        vec![
            r#"{"content":{"target":{"cpu":0.75,"mem":3221225472}},"type":"DownscaleRequest""#,
            r#"{"content":{"target":{"cpu":0.5,"mem":2147483648}},"type":"DownscaleRequest""#,
            r#"{"content":{"granted":{"cpu":1,"mem":4294967296}},"type":"UpscaleNotification""#,
        ]
    );
    // Nothing unsolicited from an unmanaged daemon (no UpscaleRequest, no InvalidMessage).
    assert!(!received.iter().any(|t| t.contains("UpscaleRequest")));
    assert!(!received.iter().any(|t| t.contains("InvalidMessage")));
    // Our close 1000 "normal exit" was answered with a close frame.
    assert!(
        transcript.0.iter().any(|e| e.dir == Dir::Received
            && e.frame == Frame::Close(Some((1000, "normal exit".into()))))
    );
    d.assert_serving().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// HTTP routes

#[tokio::test]
async fn http_routes() {
    let d = daemon().await;
    assert_eq!(d.http("GET", "/healthz", &[]).await.unwrap(), 200);
    let plain = d.http("GET", "/monitor", &[]).await.unwrap();
    assert!(
        (400..500).contains(&plain),
        "GET /monitor without upgrade: {plain}"
    );
    let bad_version = d
        .http(
            "GET",
            "/monitor",
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "12"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        .await
        .unwrap();
    assert!(
        (400..500).contains(&bad_version),
        "bad ws version: {bad_version}"
    );
    assert_eq!(d.http("POST", "/monitor", &[]).await.unwrap(), 405);
    assert_eq!(d.http("GET", "/nope", &[]).await.unwrap(), 404);
    assert_eq!(d.http("GET", "/", &[]).await.unwrap(), 404);
}

// ---------------------------------------------------------------------------------------------
// Robustness: the session survives everything below

#[tokio::test]
async fn garbage_text_frame_gets_invalid_message_with_id_0() {
    let d = daemon().await;
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    c.send_text("this is not json").await.unwrap();
    let (id, error) = invalid_message(&c.recv_text(AGENT_TIMEOUT).await.unwrap());
    assert_eq!(id, 0);
    assert!(error.contains("not valid JSON"), "{error}");
    c.send_text("[1,2,3]").await.unwrap();
    assert_eq!(
        invalid_message(&c.recv_text(AGENT_TIMEOUT).await.unwrap()).0,
        0
    );
    c.health_check(2).await.unwrap();
}

#[tokio::test]
async fn unknown_type_gets_invalid_message_with_its_id() {
    let d = daemon().await;
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    c.send_text(r#"{"content":{},"type":"Frobnicate","id":4}"#)
        .await
        .unwrap();
    assert_eq!(
        c.recv_text(AGENT_TIMEOUT).await.unwrap(),
        r#"{"type":"InvalidMessage","error":"unknown message type \"Frobnicate\"","id":4}"#
    );
    // Monitor-only types from the agent are refused the same way.
    c.send_text(r#"{"type":"UpscaleRequest","id":6}"#)
        .await
        .unwrap();
    assert_eq!(
        invalid_message(&c.recv_text(AGENT_TIMEOUT).await.unwrap()).0,
        6
    );
    c.health_check(8).await.unwrap();
}

#[tokio::test]
async fn missing_or_bad_id_gets_invalid_message_with_id_0() {
    let d = daemon().await;
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    c.send_text(r#"{"content":{},"type":"HealthCheck"}"#)
        .await
        .unwrap();
    assert_eq!(
        c.recv_text(AGENT_TIMEOUT).await.unwrap(),
        r#"{"type":"InvalidMessage","error":"missing field `id`","id":0}"#
    );
    c.send_text(r#"{"content":{},"type":"HealthCheck","id":"2"}"#)
        .await
        .unwrap();
    assert_eq!(
        invalid_message(&c.recv_text(AGENT_TIMEOUT).await.unwrap()).0,
        0
    );
    c.send_text(r#"{"content":{},"type":"HealthCheck","id":-2}"#)
        .await
        .unwrap();
    assert_eq!(
        invalid_message(&c.recv_text(AGENT_TIMEOUT).await.unwrap()).0,
        0
    );
    c.health_check(2).await.unwrap();
}

#[tokio::test]
async fn binary_frames_are_ignored() {
    let d = daemon().await;
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    c.send_binary(b"\x00\x01binary".to_vec()).await.unwrap();
    c.send_binary(br#"{"content":{},"type":"HealthCheck","id":2}"#.to_vec())
        .await
        .unwrap();
    // The next frame is the answer to this health check: nothing was sent for the binaries.
    c.health_check(4).await.unwrap();
}

#[tokio::test]
async fn oversized_frame_closes_session_with_1009_and_daemon_keeps_serving() {
    let mut d = daemon().await;
    // Exactly 64 KiB is still accepted (a health check padded with JSON whitespace).
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    let mut at_limit = r#"{"content":{},"type":"HealthCheck","id":2}"#.to_string();
    at_limit.push_str(&" ".repeat((64 << 10) - at_limit.len()));
    c.send_text(&at_limit).await.unwrap();
    assert_eq!(
        c.recv_text(AGENT_TIMEOUT).await.unwrap(),
        r#"{"type":"HealthCheck","id":2}"#
    );

    // One byte more closes the session with 1009.
    use futures_util::{SinkExt, StreamExt};
    let (mut tx, mut rx) = c.ws.split();
    let mut too_big = at_limit.clone();
    too_big.push(' ');
    // Read while writing: the daemon closes before it has read the whole frame.
    let writer = tokio::spawn(async move {
        let _ = tx.send(Message::text(too_big)).await;
    });
    let close = loop {
        match tokio::time::timeout(AGENT_TIMEOUT, rx.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(f))) => break f.expect("close code"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1009);
    assert_eq!(close.reason.as_str(), "message too big");
    let _ = writer.await;

    d.assert_serving().await.unwrap();
    let mut c2 = RawClient::handshake(&d.ws_url()).await.unwrap();
    c2.health_check(2).await.unwrap();
}

#[tokio::test]
async fn agent_invalid_message_and_internal_error_are_not_answered() {
    let d = daemon().await;
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    c.send_text(r#"{"content":{"error":"Received HealthCheck with id 9 but id is unknown or already timed out waiting for a reply"},"type":"InvalidMessage","id":9}"#)
        .await
        .unwrap();
    c.send_text(r#"{"content":{"error":"boom"},"type":"InternalError","id":11}"#)
        .await
        .unwrap();
    // Even malformed ones are only logged.
    c.send_text(r#"{"type":"InvalidMessage"}"#).await.unwrap();
    c.health_check(2).await.unwrap();
}

#[tokio::test]
async fn health_check_with_missing_null_or_empty_content_is_echoed() {
    let d = daemon().await;
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    for (id, frame) in [
        (2, r#"{"type":"HealthCheck","id":2}"#),
        (4, r#"{"content":null,"type":"HealthCheck","id":4}"#),
        (6, r#"{"content":{},"type":"HealthCheck","id":6}"#),
        (
            8,
            r#"{"id":8,"type":"HealthCheck","content":{},"extra":"ignored"}"#,
        ),
    ] {
        c.send_text(frame).await.unwrap();
        assert_eq!(
            c.recv_text(AGENT_TIMEOUT).await.unwrap(),
            format!(r#"{{"type":"HealthCheck","id":{id}}}"#)
        );
    }
}

#[tokio::test]
async fn cpu_may_be_integer_or_float() {
    let d = daemon().await;
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    for (id, frame, reply) in [
        (
            2,
            r#"{"content":{"granted":{"cpu":1,"mem":4294967296}},"type":"UpscaleNotification","id":2}"#,
            r#"{"type":"UpscaleConfirmation","id":2}"#.to_string(),
        ),
        (
            4,
            r#"{"content":{"granted":{"cpu":1.25,"mem":5368709120}},"type":"UpscaleNotification","id":4}"#,
            r#"{"type":"UpscaleConfirmation","id":4}"#.to_string(),
        ),
        (
            6,
            r#"{"content":{"target":{"cpu":1,"mem":4294967296}},"type":"DownscaleRequest","id":6}"#,
            format!(r#"{{"type":"DownscaleResult","Ok":true,"Status":"{NOT_MANAGING}","id":6}}"#),
        ),
        (
            8,
            r#"{"content":{"target":{"cpu":0.25,"mem":1073741824}},"type":"DownscaleRequest","id":8}"#,
            format!(r#"{{"type":"DownscaleResult","Ok":true,"Status":"{NOT_MANAGING}","id":8}}"#),
        ),
    ] {
        c.send_text(frame).await.unwrap();
        assert_eq!(c.recv_text(AGENT_TIMEOUT).await.unwrap(), reply, "id {id}");
    }
}

/// Allocations no VM can have, as `(label, allocation JSON)`.
const BAD_ALLOCATIONS: &[(&str, &str)] = &[
    ("negative cpu", r#"{"cpu":-1,"mem":4294967296}"#),
    ("zero cpu", r#"{"cpu":0,"mem":4294967296}"#),
    ("absurd cpu", r#"{"cpu":1e12,"mem":4294967296}"#),
    ("cpu as string", r#"{"cpu":"1","mem":4294967296}"#),
    ("missing cpu", r#"{"mem":4294967296}"#),
    ("negative mem", r#"{"cpu":1,"mem":-4294967296}"#),
    ("zero mem", r#"{"cpu":1,"mem":0}"#),
    ("fractional mem", r#"{"cpu":1,"mem":4294967296.5}"#),
    ("mem above 16 TiB", r#"{"cpu":1,"mem":17592186044417}"#),
    ("mem u64 max", r#"{"cpu":1,"mem":18446744073709551615}"#),
    ("missing mem", r#"{"cpu":1}"#),
    ("null allocation", "null"),
    ("empty allocation", "{}"),
];

#[tokio::test]
async fn invalid_allocations_are_refused_with_an_answer() {
    let mut d = daemon().await;
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    let mut id = 0;
    for (label, alloc) in BAD_ALLOCATIONS {
        for (ty, field) in [
            ("DownscaleRequest", "target"),
            ("UpscaleNotification", "granted"),
        ] {
            id += 2;
            let frame = format!(r#"{{"content":{{"{field}":{alloc}}},"type":"{ty}","id":{id}}}"#);
            c.send_text(&frame).await.unwrap();
            let reply = c.recv_text(AGENT_TIMEOUT).await.unwrap();
            let (reply_id, error) = invalid_message(&reply);
            assert_eq!(reply_id, id, "{label}: {reply}");
            assert!(
                error.starts_with(&format!("{ty} refused")),
                "{label}: {error}"
            );
            println!("{label:>18} {ty:<20} → {reply}");
        }
    }
    // Missing content entirely.
    c.send_text(r#"{"type":"DownscaleRequest","id":100}"#)
        .await
        .unwrap();
    assert_eq!(
        invalid_message(&c.recv_text(AGENT_TIMEOUT).await.unwrap()).0,
        100
    );
    // NaN / infinities cannot be written in JSON: such a frame is not JSON at all.
    c.send_text(r#"{"content":{"target":{"cpu":NaN,"mem":1}},"type":"DownscaleRequest","id":102}"#)
        .await
        .unwrap();
    assert_eq!(
        invalid_message(&c.recv_text(AGENT_TIMEOUT).await.unwrap()).0,
        0
    );
    c.health_check(104).await.unwrap();
    d.assert_serving().await.unwrap();
}

#[tokio::test]
async fn faithful_agent_sees_invalid_allocation_fail_fast_and_keeps_connection() {
    let d = daemon().await;
    let a = FakeAgent::connect(agent(&d)).await.unwrap();
    let err = a
        .request_raw(
            "DownscaleRequest",
            r#"{"target":{"cpu":-0.25,"mem":3221225472}}"#,
        )
        .await
        .unwrap_err();
    // The InvalidMessage carries the request id, so the agent fails it at once instead of
    // waiting for its 5 s timeout.
    match err {
        RequestError::Failed(frame) => {
            assert_eq!(invalid_message(&frame).0, 2);
        }
        other => panic!("expected the agent to fail the request, got {other:?}"),
    }
    a.health_check().await.unwrap();
    assert!(a.is_connected());
}

// ---------------------------------------------------------------------------------------------
// Single-agent policy

#[tokio::test]
async fn new_handshake_replaces_old_session_with_a_close_frame() {
    let d = daemon().await;
    let a = FakeAgent::connect(agent(&d)).await.unwrap();
    a.health_check().await.unwrap();
    let b = FakeAgent::connect(agent(&d)).await.unwrap();
    let end = a.wait_for_end(1, AGENT_TIMEOUT).await.unwrap();
    assert_eq!(
        end,
        ConnEnd::ClosedByMonitor {
            code: Some(1000),
            reason: "replaced by a newer agent connection".into()
        }
    );
    b.health_check().await.unwrap();
    assert!(!a.is_connected());
    assert!(b.is_connected());
}

#[tokio::test]
async fn half_open_and_garbage_connections_do_not_kill_the_healthy_session() {
    let mut d = daemon().await;
    let a = FakeAgent::connect(agent(&d)).await.unwrap();
    // Upgrades, never sends the version range.
    let mut silent = RawClient::connect(&d.ws_url()).await.unwrap();
    // Upgrades and sends garbage instead of the range.
    let mut garbage = RawClient::connect(&d.ws_url()).await.unwrap();
    garbage.send_text("GET / HTTP/1.0").await.unwrap();
    let reply = garbage.recv_text(AGENT_TIMEOUT).await.unwrap();
    assert!(
        reply.starts_with(r#"{"error":"expected protocol version range"#),
        "{reply}"
    );
    assert_eq!(
        garbage.expect_close(AGENT_TIMEOUT).await.unwrap(),
        (1002, "protocol version negotiation failed".into())
    );
    a.health_check().await.unwrap();

    let (code, reason) = silent.expect_close(HANDSHAKE_DROP_BOUND).await.unwrap();
    assert_eq!(
        (code, reason.as_str()),
        (1002, "timed out waiting for protocol version range")
    );
    a.health_check().await.unwrap();
    assert!(a.is_connected());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), a.wait_for_end(1, AGENT_TIMEOUT))
            .await
            .is_err(),
        "healthy session was closed"
    );
    d.assert_serving().await.unwrap();
}

#[tokio::test]
async fn faithful_agent_reconnects_no_sooner_than_min_wait_and_takes_over() {
    let d = daemon().await;
    let min_wait = Duration::from_secs(1);
    let a = FakeAgent::connect(AgentConfig {
        reconnect: true,
        timings: Timings {
            reconnect_min_wait: min_wait,
            ..Timings::default()
        },
        ..agent(&d)
    })
    .await
    .unwrap();
    let b = FakeAgent::connect(agent(&d)).await.unwrap();
    // b replaces a; a reconnects and replaces b in turn.
    assert!(matches!(
        a.wait_for_end(1, AGENT_TIMEOUT).await.unwrap(),
        ConnEnd::ClosedByMonitor {
            code: Some(1000),
            ..
        }
    ));
    assert!(matches!(
        b.wait_for_end(1, Duration::from_secs(10)).await.unwrap(),
        ConnEnd::ClosedByMonitor {
            code: Some(1000),
            ..
        }
    ));
    assert_eq!(a.connections(), 2);
    a.health_check().await.unwrap();
    // Reconnect spacing is measured between attempt starts, as the agent does.
    let starts: Vec<Duration> = a
        .transcript()
        .0
        .iter()
        .filter(|e| e.frame == Frame::Note(ATTEMPT_NOTE.to_string()))
        .map(|e| e.at)
        .collect();
    assert_eq!(starts.len(), 2);
    assert!(starts[1] - starts[0] >= min_wait, "{starts:?}");
    // The reconnected session starts over at id 2.
    let ids: Vec<u64> = a
        .transcript()
        .0
        .iter()
        .filter(|e| e.conn == 2 && e.dir == Dir::Sent)
        .filter_map(|e| e.text().and_then(|t| serde_json::from_str::<Value>(t).ok()))
        .filter_map(|v| v["id"].as_u64())
        .collect();
    assert_eq!(ids.first(), Some(&2));
}

// ---------------------------------------------------------------------------------------------
// Handshake edge cases

#[tokio::test]
async fn handshake_version_edge_cases_are_refused_and_daemon_keeps_serving() {
    let mut d = daemon().await;
    let a = FakeAgent::connect(agent(&d)).await.unwrap();
    let refused = [
        (
            r#"{"min":0,"max":0}"#,
            r#"{"error":"Received protocol version range <invalid: zero> which does not overlap with v1.0"}"#,
        ),
        (
            r#"{"min":2,"max":2}"#,
            r#"{"error":"Received protocol version range <unknown: 2> which does not overlap with v1.0"}"#,
        ),
        (
            r#"{"min":255,"max":255}"#,
            r#"{"error":"Received protocol version range <unknown: 255> which does not overlap with v1.0"}"#,
        ),
        (
            r#"{"min":2,"max":18446744073709551615}"#,
            r#"{"error":"Received protocol version range <unknown: 2> to <unknown: 18446744073709551615> which does not overlap with v1.0"}"#,
        ),
        (
            r#"{"min":2,"max":1}"#,
            r#"{"error":"Received invalid protocol version range <unknown: 2> to v1.0: min is greater than max"}"#,
        ),
    ];
    for (range, want) in refused {
        let mut c = RawClient::connect(&d.ws_url()).await.unwrap();
        c.send_text(range).await.unwrap();
        assert_eq!(c.recv_text(AGENT_TIMEOUT).await.unwrap(), want, "{range}");
        assert_eq!(
            c.expect_close(AGENT_TIMEOUT).await.unwrap(),
            (1002, "protocol version negotiation failed".into()),
            "{range}"
        );
        println!("{range} → {want} + close 1002");
        d.assert_serving().await.unwrap();
    }

    for garbage in [
        "garbage",
        r#"{"min":-1,"max":1}"#,
        r#"{"min":1}"#,
        "[1,1]",
        "",
    ] {
        let mut c = RawClient::connect(&d.ws_url()).await.unwrap();
        c.send_text(garbage).await.unwrap();
        let reply = c.recv_text(AGENT_TIMEOUT).await.unwrap();
        assert!(
            reply.starts_with(r#"{"error":"expected protocol version range"#),
            "{garbage:?}: {reply}"
        );
        assert_eq!(c.expect_close(AGENT_TIMEOUT).await.unwrap().0, 1002);
        println!("{garbage:?} → {reply} + close 1002");
    }

    let mut c = RawClient::connect(&d.ws_url()).await.unwrap();
    c.send_binary(br#"{"min":1,"max":1}"#.to_vec())
        .await
        .unwrap();
    let reply = c.recv_text(AGENT_TIMEOUT).await.unwrap();
    assert_eq!(
        reply,
        r#"{"error":"expected a text frame with the protocol version range, got a 17-byte binary frame"}"#
    );
    assert_eq!(c.expect_close(AGENT_TIMEOUT).await.unwrap().0, 1002);
    println!("binary first frame → {reply} + close 1002");

    // None of these replaced the healthy session.
    a.health_check().await.unwrap();
    assert!(a.is_connected());
    d.assert_serving().await.unwrap();

    // Ranges that include v1.0 are accepted, whatever their bounds; the last accepted
    // connection is the session.
    for range in [
        r#"{"min":0,"max":18446744073709551615}"#,
        r#"{"min":0,"max":1}"#,
        r#"{"min":1,"max":255}"#,
        r#"{"min":1,"max":1,"extra":"ignored"}"#,
    ] {
        let mut c = RawClient::connect(&d.ws_url()).await.unwrap();
        c.send_text(range).await.unwrap();
        assert_eq!(
            c.recv_text(AGENT_TIMEOUT).await.unwrap(),
            r#"{"version":1}"#,
            "{range}"
        );
        c.health_check(2).await.unwrap();
        println!("{range} → {{\"version\":1}}");
    }
    // Accepting them replaced the fake agent's session.
    assert!(matches!(
        a.wait_for_end(1, AGENT_TIMEOUT).await.unwrap(),
        ConnEnd::ClosedByMonitor {
            code: Some(1000),
            ..
        }
    ));
    d.assert_serving().await.unwrap();
}

#[tokio::test]
async fn silent_connection_is_dropped_after_the_handshake_budget() {
    let mut d = daemon().await;
    let mut c = RawClient::connect(&d.ws_url()).await.unwrap();
    let (code, reason) = c.expect_close(HANDSHAKE_DROP_BOUND).await.unwrap();
    assert_eq!(
        (code, reason.as_str()),
        (1002, "timed out waiting for protocol version range")
    );
    d.assert_serving().await.unwrap();
    RawClient::handshake(&d.ws_url())
        .await
        .unwrap()
        .health_check(2)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Shutdown

/// Every signal whose default action would kill the daemon ends in the same clean shutdown.
#[tokio::test]
async fn other_terminating_signals_close_the_session_with_1001_too() {
    for name in ["HUP", "QUIT", "USR1", "USR2", "ALRM", "INT"] {
        let d = daemon().await;
        let a = FakeAgent::connect(agent(&d)).await.unwrap();
        a.health_check().await.unwrap();
        let status = d.stop_with(name).await.unwrap();
        assert_eq!(
            a.wait_for_end(1, AGENT_TIMEOUT).await.unwrap(),
            ConnEnd::ClosedByMonitor {
                code: Some(1001),
                reason: "vm-monitor is shutting down".into()
            },
            "SIG{name}"
        );
        assert!(status.success(), "SIG{name}: {status}");
    }
}

#[tokio::test]
async fn sigterm_closes_the_session_with_1001() {
    let d = daemon().await;
    let a = FakeAgent::connect(agent(&d)).await.unwrap();
    a.health_check().await.unwrap();
    let status = d.terminate().await.unwrap();
    assert_eq!(
        a.wait_for_end(1, AGENT_TIMEOUT).await.unwrap(),
        ConnEnd::ClosedByMonitor {
            code: Some(1001),
            reason: "vm-monitor is shutting down".into()
        }
    );
    assert!(status.success(), "{status}");
}
