//! Operators' endpoints of the real `vm-monitor` binary (unmanaged mode, loopback only):
//! `/metrics` parses with an independent Prometheus text parser and moves as a fake agent drives
//! the daemon; `/debug/decisions` is JSON; `--metrics-addr` serves both; `--log-format json`
//! writes one JSON object per line. Build the binary first: `cargo build -p monitor`.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::time::Duration;

use prometheus_parse::Scrape;
use serde_json::Value;
use tests::agent::{AgentConfig, Alloc, FakeAgent};
use tests::benchkit::sample_value as value;
use tests::daemon::Daemon;
use tests::http::get;

const CU: Alloc = Alloc::DEFAULT_CU;
const NOT_MANAGING: &str = "monitor is not managing cgroup or file cache";

async fn scrape(addr: SocketAddr) -> Scrape {
    let r = get(addr, "/metrics", None).await.expect("GET /metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let s = Scrape::parse(r.body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{}", r.body));
    assert!(!s.samples.is_empty());
    for sample in &s.samples {
        assert!(
            sample.metric.starts_with("vm_monitor_"),
            "unprefixed metric {}",
            sample.metric
        );
    }
    s
}

/// Scrapes until `name{labels}` equals `want` (the daemon updates some metrics after replying).
async fn wait_for(addr: SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) -> Scrape {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(addr).await;
        let got = value(&s, name, labels);
        if got == Some(want) {
            return s;
        }
        if tokio::time::Instant::now() >= until {
            panic!("{name}{labels:?} is {got:?}, want {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn decisions(addr: SocketAddr, query: &str) -> Value {
    let r = get(addr, &format!("/debug/decisions{query}"), None)
        .await
        .expect("GET /debug/decisions");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON: {e}: {}", r.body))
}

#[tokio::test]
async fn metrics_and_decisions_follow_an_agent_session() {
    let mut d = Daemon::start().await.expect("starting vm-monitor");
    let s = scrape(d.addr).await;
    assert_eq!(
        value(&s, "vm_monitor_signal_tier", &[("tier", "none")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "vm_monitor_agent_connected", &[]), Some(0.0));
    assert_eq!(value(&s, "vm_monitor_agent_sessions_total", &[]), Some(0.0));
    assert_eq!(
        value(
            &s,
            "vm_monitor_downscale_requests_total",
            &[("result", "approved")]
        ),
        Some(0.0)
    );
    assert!(
        s.samples
            .iter()
            .any(|x| x.metric == "vm_monitor_reaction_latency_seconds"),
        "latency histogram exported from the start"
    );
    // The same engine and policy run with nothing to manage: only the start-up decision.
    let page = decisions(d.addr, "").await;
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["capacity"], 1024);
    assert_eq!(page["decisions"][0]["kind"], "startup", "{page}");

    let agent = FakeAgent::connect(AgentConfig::new(d.ws_url()))
        .await
        .expect("agent connects");
    wait_for(d.addr, "vm_monitor_agent_connected", &[], 1.0).await;
    let s = wait_for(d.addr, "vm_monitor_agent_sessions_total", &[], 1.0).await;
    assert_eq!(value(&s, "vm_monitor_agent_connections", &[]), Some(1.0));

    // 4 CU → 3 CU: one DownscaleRequest, approved by the unmanaged daemon.
    let report = agent
        .downscale_to(Alloc::cus(3, CU), Duration::from_secs(20))
        .await
        .expect("downscale");
    assert_eq!(agent.vm(), Alloc::cus(3, CU), "{report:?}");
    let s = wait_for(
        d.addr,
        "vm_monitor_downscale_requests_total",
        &[("result", "approved")],
        1.0,
    )
    .await;
    assert_eq!(
        value(
            &s,
            "vm_monitor_downscale_requests_total",
            &[("result", "denied")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "vm_monitor_decisions_total",
            &[("kind", "downscale_approved")]
        ),
        Some(1.0)
    );

    agent
        .upscale_to(Alloc::cus(4, CU), Duration::from_secs(20))
        .await
        .expect("upscale");
    wait_for(
        d.addr,
        "vm_monitor_upscale_notifications_total",
        &[("result", "confirmed")],
        1.0,
    )
    .await;

    agent.close().await.expect("agent closes");
    let s = wait_for(d.addr, "vm_monitor_agent_connected", &[], 0.0).await;
    assert_eq!(
        value(&s, "vm_monitor_agent_sessions_total", &[]),
        Some(1.0),
        "a counter: stays after the session ends"
    );
    assert_eq!(
        value(&s, "vm_monitor_upscale_requests_sent_total", &[]),
        Some(0.0)
    );

    // The decision log: the start-up, then both answers, oldest first, with their inputs.
    let page = decisions(d.addr, "").await;
    assert_eq!(page["total"], 3, "{page}");
    let list = page["decisions"].as_array().expect("decisions array");
    assert_eq!(list.len(), 3, "{page}");
    assert_eq!(list[0]["kind"], "startup");
    assert_eq!(list[1]["seq"], 2);
    assert_eq!(list[1]["kind"], "downscale_approved");
    assert_eq!(list[1]["input"], "downscale request target=3072 MiB");
    assert_eq!(list[1]["detail"], NOT_MANAGING);
    assert_eq!(list[1]["tier"], Value::Null, "no cgroup watched");
    assert!(list[1]["at_ns"].as_u64().is_some_and(|ns| ns > 0));
    assert_eq!(list[2]["seq"], 3);
    assert_eq!(list[2]["kind"], "upscale_applied");
    assert_eq!(list[2]["input"], "upscale notification granted=4096 MiB");

    let newest = decisions(d.addr, "?limit=1").await;
    let newest = newest["decisions"].as_array().expect("decisions array");
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0]["seq"], 3, "limit keeps the newest");
    let bad = get(d.addr, "/debug/decisions?limit=many", None)
        .await
        .expect("GET");
    assert_eq!(bad.status, 400);

    d.assert_serving().await.expect("still serving");
}

#[tokio::test]
async fn openmetrics_on_request() {
    let d = Daemon::start().await.expect("starting vm-monitor");
    let r = get(
        d.addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await
    .expect("GET /metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(r.body.ends_with("# EOF\n"), "{}", r.body);
    assert!(
        r.body.contains("vm_monitor_agent_sessions_total 0"),
        "{}",
        r.body
    );
}

fn free_port() -> u16 {
    StdListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `--metrics-addr` on a port of its own; retried because the port may be taken meanwhile.
async fn daemon_with_metrics_addr(extra: &[&str]) -> (Daemon, SocketAddr) {
    let mut last = None;
    for _ in 0..3 {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let flag = addr.to_string();
        let mut args = vec!["--metrics-addr", flag.as_str()];
        args.extend_from_slice(extra);
        match Daemon::start_with_args(&args).await {
            Ok(d) => return (d, addr),
            Err(e) => last = Some(e),
        }
    }
    panic!("vm-monitor did not start: {last:?}");
}

#[tokio::test]
async fn metrics_addr_and_json_logs() {
    let (d, maddr) = daemon_with_metrics_addr(&["--log-format", "json"]).await;
    assert_ne!(maddr, d.addr);
    let s = scrape(maddr).await;
    assert_eq!(value(&s, "vm_monitor_agent_connected", &[]), Some(0.0));
    assert_eq!(
        decisions(maddr, "").await["total"],
        1,
        "the start-up decision"
    );
    let health = get(maddr, "/healthz", None).await.expect("GET /healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ws = get(maddr, "/monitor", None).await.expect("GET /monitor");
    assert_eq!(ws.status, 404, "the agent is served on --addr only");
    // No longer on the agent's listener: a network peer reads neither.
    for path in ["/metrics", "/debug/decisions"] {
        let r = get(d.addr, path, None).await.expect(path);
        assert_eq!(r.status, 404, "{path} on --addr with --metrics-addr");
    }
    let health = get(d.addr, "/healthz", None)
        .await
        .expect("GET /healthz on --addr");
    assert_eq!(health.status, 200);

    let logs = d.logs();
    let status = d.terminate().await.expect("terminates");
    assert!(status.success(), "{status}");
    let mut saw_metrics_listener = false;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not one JSON object ({e}): {line}"));
        let obj = v.as_object().expect("a JSON object per line");
        for key in ["timestamp", "level", "target", "message"] {
            assert!(obj.contains_key(key), "no top-level {key}: {line}");
        }
        assert!(!obj.contains_key("fields"), "fields are flattened: {line}");
        if obj["message"] == "serving /metrics and /debug/decisions" {
            assert_eq!(obj["addr"], maddr.to_string(), "{line}");
            saw_metrics_listener = true;
        }
    }
    assert!(saw_metrics_listener, "{logs}");
}

#[tokio::test]
async fn metrics_addr_in_use_is_a_startup_error() {
    let taken = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let err = match Daemon::start_with_args(&["--metrics-addr", &addr]).await {
        Ok(_) => panic!("started although --metrics-addr {addr} is taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("--metrics-addr"), "{err}");
}
