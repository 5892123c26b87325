//! A hostile peer on the agent port, against the real binary on loopback: what it can make
//! the daemon spend is bounded, and a well-behaved agent keeps being served meanwhile.

use std::time::{Duration, Instant};

use futures_util::SinkExt as _;
use tests::raw::RawClient;
use tests::{Daemon, FakeAgent};
use tokio_tungstenite::tungstenite::Message;

/// A client that sends pings and never reads would have the daemon queue a pong per ping
/// (hundreds of MiB in seconds without a bound); the outbound buffer is bounded, so memory
/// stays flat, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_without_reading_keeps_memory_bounded() {
    let d = Daemon::start_logging(&[], Some("info")).await.unwrap();
    let rss_before = d.rss_kib().unwrap();
    let mut flood = RawClient::handshake(&d.ws_url()).await.unwrap();
    let payload = vec![b'p'; 125];
    let started = Instant::now();
    let mut sent = 0u64;
    let mut peak = rss_before;
    let closed = loop {
        // Without reading: pongs pile up on the daemon's side of the connection.
        if flood
            .ws
            .send(Message::Ping(payload.clone().into()))
            .await
            .is_err()
        {
            break true;
        }
        sent += 1;
        if sent.is_multiple_of(2000) {
            peak = peak.max(d.rss_kib().unwrap());
        }
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
    };
    peak = peak.max(d.rss_kib().unwrap());
    println!(
        "{sent} pings in {:.1} s, closed: {closed}, RSS {rss_before} → peak {peak} KiB",
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {peak} KiB under the flood"
    );
    // The daemon itself is fine: an agent connecting now is served.
    let agent = FakeAgent::connect(tests::AgentConfig::new(d.ws_url()))
        .await
        .unwrap();
    agent.health_check().await.unwrap();
}

/// Peer-chosen text in the log is cut and its repeats are rate-limited: 500 invalid frames
/// carrying 64 KiB each cost the log a few KiB, not 32 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_message_flood_costs_the_log_a_bounded_amount() {
    let d = Daemon::start_logging(&[], Some("info")).await.unwrap();
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    let before = d.logs().len();
    let junk = "x".repeat(64 * 1024);
    for i in 0..500u64 {
        // The agent telling us our message was invalid, with a text of its choosing.
        let frame = format!(
            r#"{{"type":"InvalidMessage","error":"{junk}","id":{}}}"#,
            2 * i + 2
        );
        c.send_text(&frame).await.unwrap();
        // And an unknown type, which the daemon answers with InvalidMessage quoting it.
        c.send_text(&format!(r#"{{"type":"{junk}","id":{}}}"#, 2 * i + 3))
            .await
            .unwrap();
        let reply = c.recv_text(Duration::from_secs(5)).await.unwrap();
        assert!(
            reply.contains("InvalidMessage"),
            "{}",
            &reply[..reply.len().min(200)]
        );
        assert!(
            reply.len() < 4096,
            "a {} byte InvalidMessage reply",
            reply.len()
        );
    }
    c.health_check(10_001).await.unwrap();
    let grown = d.logs().len() - before;
    println!("log grew by {grown} bytes for 1000 invalid frames of 64 KiB");
    assert!(grown < 16 * 1024, "log grew by {grown} bytes");
}
