//! A hostile peer on the agent port, against the real binary on loopback: what it can make
//! the daemon spend is bounded, and a well-behaved agent keeps being served meanwhile.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tests::raw::RawClient;
use tests::{Daemon, FakeAgent};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

/// A client that sends pings and never reads would have the daemon queue a pong per ping
/// (hundreds of MiB in seconds without a bound); the outbound buffer is bounded, so memory
/// stays flat, the flooder is closed once past its ping budget, and the daemon keeps serving.
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
    // The agent never pings: past a small budget the flooder is closed, not served.
    assert!(closed, "the ping flood was still connected after 10 s");
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
    // Just under the 64 KiB message limit with the JSON around it.
    let junk = "x".repeat(63 * 1024);
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

// ---- Admission: connection budgets, deadlines, who may drive the session ----

fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A well-behaved agent (reads all the time, so it answers pings) checking its session every
/// 300 ms while `attack` runs; returns (answered, failed) and asserts it was never replaced.
async fn agent_served_during<F: std::future::Future>(
    d: &Daemon,
    attack: F,
) -> (F::Output, u32, u32) {
    let agent = FakeAgent::connect(tests::AgentConfig::new(d.ws_url()))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let stop = stop.clone();
        let agent_ref = &agent;
        async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            // At least 2 s of checks, however short the attack.
            while !stop.load(Ordering::Relaxed) || ok + failed < 7 {
                match agent_ref.health_check().await {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        println!("health check failed: {e:?}");
                        failed += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (ok, failed)
        }
    };
    let attack = async {
        let out = attack.await;
        stop.store(true, Ordering::Relaxed);
        out
    };
    let (out, (ok, failed)) = tokio::join!(attack, checker);
    assert_eq!(
        agent.connections(),
        1,
        "the agent was disconnected or replaced"
    );
    assert!(agent.is_connected(), "the agent lost its session");
    (out, ok, failed)
}

/// Refusals counted for `reason` (from /metrics on the agent port).
async fn refused(d: &Daemon, reason: &str) -> f64 {
    let page = tests::benchkit::MetricsPage::scrape(d.addr).await.unwrap();
    page.value(
        "vm_monitor_connections_refused_total",
        &[("reason", reason)],
    )
    .unwrap_or_else(|| panic!("no refusals counter for {reason} in /metrics"))
}

/// Whether the daemon closed `tcp` (EOF or reset) within `within`.
async fn closed_by_daemon(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // An error page before the close is fine.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Slow clients trickling their headers (slowloris), from addresses inside and outside the
/// allow-list: each is closed within the header deadline (4 s), outsiders cannot take more
/// than their share, the daemon's descriptors stay bounded, and an agent connected meanwhile
/// is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_closed_within_the_header_deadline() {
    let d = Daemon::start_logging(&["--agent-allow", "127.0.0.1,127.0.0.2"], Some("info"))
        .await
        .unwrap();
    let url = d.ws_url();
    let attack = async {
        // 10 addresses × 20 connections: above the per-peer (16), outsider (16) and total
        // (128) budgets.
        let mut conns = Vec::new();
        for n in 2..12u8 {
            for _ in 0..20 {
                if let Ok(mut tcp) = tests::raw::connect_tcp_from(&url, lo(n)).await {
                    let _ = tcp.write_all(b"GET /monitor HTTP/1.1\r\nHost: x\r\n").await;
                    conns.push((n, tcp));
                }
            }
        }
        let opened = conns.len();
        let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count();
        // Trickle a header byte per second; all must be closed within 4 s + slack.
        let started = Instant::now();
        let mut still_open = Vec::new();
        for (n, mut tcp) in conns {
            let _ = tcp.write_all(b"X").await;
            let left = Duration::from_secs(8).saturating_sub(started.elapsed());
            if !closed_by_daemon(&mut tcp, left).await {
                still_open.push(n);
            }
        }
        (opened, fds, still_open, started.elapsed())
    };
    let ((opened, fds, still_open, took), ok, failed) = agent_served_during(&d, attack).await;
    println!(
        "{opened} slow connections, daemon fds at peak {fds}, all closed after {:.1} s; agent {ok} ok / {failed} failed",
        took.as_secs_f64()
    );
    assert!(
        still_open.is_empty(),
        "not closed by the daemon: {still_open:?}"
    );
    assert!(fds < 128 + 32, "{fds} descriptors open in the daemon");
    assert_eq!(failed, 0, "health checks failed during the flood");
    assert!(ok >= 5, "only {ok} health checks");
    assert!(refused(&d, "too_many_from_peer").await >= 1.0);
    assert!(refused(&d, "too_many_outside_allow_list").await >= 1.0);
    // Afterwards a new connection is served at once.
    let health = tests::http::get(d.addr, "/healthz", None).await.unwrap();
    assert_eq!(health.status, 200);
}

/// Idle connections above every budget: refused at accept, the agent keeps its session, and
/// once the flood is over the budgets are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_is_refused_above_the_budgets() {
    let d = Daemon::start_logging(&[], Some("info")).await.unwrap();
    let url = d.ws_url();
    let attack = async {
        let mut conns = Vec::new();
        for n in 2..42u8 {
            for _ in 0..16 {
                if let Ok(tcp) = tests::raw::connect_tcp_from(&url, lo(n)).await {
                    conns.push(tcp);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count();
        (conns, fds)
    };
    let ((conns, fds), ok, failed) = agent_served_during(&d, attack).await;
    println!(
        "{} idle connections attempted, daemon fds {fds}; agent {ok} ok / {failed} failed",
        conns.len()
    );
    assert!(fds < 128 + 32, "{fds} descriptors open in the daemon");
    assert_eq!(failed, 0);
    drop(conns);
    // Closed flood connections give their budget back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(refused(&d, "too_many_connections").await >= 1.0);
    RawClient::handshake(&d.ws_url()).await.unwrap();
}

/// First frames built to be costly (a 1 MiB nested array, 1 KiB+ of brackets) are refused
/// unparsed or at the frame limit, while the agent (which holds the session) is served; deep
/// frames inside a session are refused by a linear scan, not a parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_huge_frames_are_refused_cheaply() {
    let d = Daemon::start_logging(&[], Some("info")).await.unwrap();
    let url = d.ws_url();
    let huge = format!("{}{}", "[".repeat(512 * 1024), "]".repeat(512 * 1024));
    let deep = "[".repeat(60 * 1024);
    let attack = async {
        let mut outcomes = Vec::new();
        for i in 0..40 {
            let Ok(mut c) = RawClient::connect_from(&url, lo(3)).await else {
                outcomes.push("upgrade refused".to_string());
                continue;
            };
            let frame = if i % 2 == 0 { &huge } else { &deep };
            let _ = c.send_text(frame).await;
            outcomes.push(match c.recv(Duration::from_secs(5)).await {
                Ok(Some(Message::Text(t))) => t.to_string(),
                Ok(Some(Message::Close(f))) => format!("close {:?}", f.map(|f| f.code)),
                other => format!("{other:?}"),
            });
        }
        outcomes
    };
    let (outcomes, ok, failed) = agent_served_during(&d, attack).await;
    println!(
        "agent {ok} ok / {failed} failed; first outcomes {:?}",
        &outcomes[..4]
    );
    assert_eq!(failed, 0, "health checks failed during the attack");
    let mut judged = 0;
    for (i, o) in outcomes.iter().enumerate() {
        // Refused upgrades are fine too: closing connections still count against the
        // per-peer budget for a moment.
        if o == "upgrade refused" {
            continue;
        }
        judged += 1;
        let expected = if i % 2 == 0 {
            "close Some(Size)"
        } else {
            "at most 1024 bytes"
        };
        assert!(o.contains(expected), "attempt {i}: {o}");
    }
    assert!(
        judged >= 10,
        "only {judged} attempts got past the upgrade: {outcomes:?}"
    );

    // Inside a session: refused with InvalidMessage before any parse, session kept.
    drop(d);
    let d = Daemon::start().await.unwrap();
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    let nested = format!(
        r#"{{"type":"HealthCheck","id":2,"x":{}}}"#,
        "[".repeat(60 * 1024)
    );
    for _ in 0..50 {
        c.send_text(&nested).await.unwrap();
        let reply = c.recv_text(Duration::from_secs(5)).await.unwrap();
        assert!(reply.contains("deeper than 16 levels"), "{reply}");
    }
    c.health_check(4).await.unwrap();
}

/// Another client cannot evict a healthy agent however often it handshakes; a session that
/// writes but never reads (so never answers a ping) is replaced by the next agent; the real
/// agent reconnecting from its own address always gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_attempts_cannot_evict_a_healthy_agent() {
    let d = Daemon::start_logging(&[], Some("info")).await.unwrap();
    let url = d.ws_url();
    let attack = async {
        let mut won = 0;
        let mut refusals = Vec::new();
        for _ in 0..30 {
            match RawClient::connect_from(&url, lo(2)).await {
                Err(e) => refusals.push(format!("{e:#}")),
                Ok(mut c) => {
                    c.send_text(r#"{"min":1,"max":1}"#).await.unwrap();
                    match c.recv_text(Duration::from_secs(5)).await {
                        Ok(t) if t == r#"{"version":1}"# => won += 1,
                        Ok(t) => refusals.push(t),
                        Err(e) => refusals.push(format!("{e:#}")),
                    }
                }
            }
        }
        (won, refusals)
    };
    let ((won, refusals), ok, failed) = agent_served_during(&d, attack).await;
    println!(
        "takeovers won {won}, agent {ok} ok / {failed} failed; refusals e.g. {:?}",
        refusals.first()
    );
    assert_eq!(won, 0, "a stranger took the session");
    assert_eq!(failed, 0);
    assert!(
        refusals
            .iter()
            .all(|r| r.contains("409") || r.contains("another autoscaler-agent session is active")),
        "{refusals:?}"
    );
    assert!(refused(&d, "agent_session_active").await >= 30.0);

    // A client holding the seat that writes but never reads loses it to the next agent.
    let mut squatter = RawClient::connect_from(&url, lo(5)).await.unwrap();
    squatter.send_text(r#"{"min":1,"max":1}"#).await.unwrap();
    // (The agent above is gone; the squatter takes the free seat.)
    let got = squatter.recv_text(Duration::from_secs(5)).await.unwrap();
    assert_eq!(got, r#"{"version":1}"#);
    let (mut tx, _rx_never_read) = squatter.ws.split();
    let pacing = tokio::spawn(async move {
        for i in 0..100u64 {
            let frame = format!(
                r#"{{"content":{{}},"type":"HealthCheck","id":{}}}"#,
                2 * i + 2
            );
            if tx.send(Message::text(frame)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent = RawClient::connect_from(&url, lo(6)).await.unwrap();
    let mut agent = agent;
    agent.send_text(r#"{"min":1,"max":1}"#).await.unwrap();
    assert_eq!(
        agent.recv_text(Duration::from_secs(4)).await.unwrap(),
        r#"{"version":1}"#,
        "the agent was kept out by a session that does not read"
    );
    agent.health_check(2).await.unwrap();
    pacing.abort();
}

/// A client that pipelines many requests and reads everything gets every answer, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered() {
    let d = Daemon::start().await.unwrap();
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    const N: u64 = 500;
    for i in 0..N {
        let frame = format!(
            r#"{{"content":{{}},"type":"HealthCheck","id":{}}}"#,
            2 * i + 2
        );
        c.ws.feed(Message::text(frame)).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    for i in 0..N {
        let reply = c.recv_text(Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            reply,
            format!(r#"{{"type":"HealthCheck","id":{}}}"#, 2 * i + 2)
        );
    }
}

/// Upgrades from outside `--agent-allow` and upgrades carrying an Origin header (a browser
/// page) get 403 before any websocket exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_and_browser_origins_are_refused_before_the_upgrade() {
    let d = Daemon::start_with_args(&["--agent-allow", "127.0.0.1/32"])
        .await
        .unwrap();
    let upgrade = |extra: &'static str| {
        format!(
            "GET /monitor HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    };
    let ask = |from: IpAddr, req: String| {
        let url = d.ws_url();
        async move {
            let mut tcp = tests::raw::connect_tcp_from(&url, from).await.unwrap();
            tcp.write_all(req.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
            String::from_utf8_lossy(&buf).into_owned()
        }
    };
    let outsider = ask(lo(2), upgrade("")).await;
    assert!(outsider.starts_with("HTTP/1.1 403"), "{outsider}");
    assert!(
        outsider.contains("127.0.0.2 is not in --agent-allow"),
        "{outsider}"
    );
    let browser = ask(lo(1), upgrade("Origin: http://example.com\r\n")).await;
    assert!(browser.starts_with("HTTP/1.1 403"), "{browser}");
    assert!(browser.contains("Origin"), "{browser}");
    // The allowed address without Origin upgrades.
    let fine = ask(lo(1), upgrade("")).await;
    assert!(fine.starts_with("HTTP/1.1 101"), "{fine}");
    assert!(refused(&d, "not_allowed").await >= 1.0);
    assert!(refused(&d, "origin").await >= 1.0);
}

/// With `--pgconnstr` and Postgres unreachable, nothing a network peer reads (replies, the
/// decision log on the agent port) names the Postgres host, port, database or user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_details_never_reach_a_network_peer() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let connstr =
        format!("host=127.0.0.1 port={port} user=pgsecretuser dbname=pgsecretdb password=pw");
    let d = Daemon::start_logging(&["--pgconnstr", &connstr], Some("info"))
        .await
        .unwrap();
    let mut c = RawClient::handshake(&d.ws_url()).await.unwrap();
    let mut replies = Vec::new();
    let gib = 1u64 << 30;
    for (i, body) in [
        format!(
            r#""type":"UpscaleNotification","content":{{"granted":{{"cpu":4,"mem":{}}}}}"#,
            8 * gib
        ),
        format!(r#""type":"DownscaleRequest","content":{{"target":{{"cpu":1,"mem":{gib}}}}}"#),
        format!(
            r#""type":"UpscaleNotification","content":{{"granted":{{"cpu":2,"mem":{}}}}}"#,
            4 * gib
        ),
    ]
    .iter()
    .enumerate()
    {
        c.send_text(&format!("{{{body},\"id\":{}}}", 2 * i + 2))
            .await
            .unwrap();
        replies.push(c.recv_text(Duration::from_secs(15)).await.unwrap());
    }
    let log = tests::http::get(d.addr, "/debug/decisions", None)
        .await
        .unwrap()
        .body;
    println!("replies {replies:?}");
    let secrets = ["pgsecretuser", "pgsecretdb", &port.to_string(), "password"];
    for text in replies.iter().chain([&log]) {
        for s in secrets {
            assert!(!text.contains(s), "{s:?} in what a peer reads: {text}");
        }
    }
    // The operator still learns why, in the daemon's own log.
    let logs = d.logs();
    assert!(logs.contains("Postgres"), "{logs}");
}
