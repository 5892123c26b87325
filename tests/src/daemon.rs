//! Runs the real `vm-monitor` binary on a free loopback port for integration tests.
//!
//! The binary is `$VM_MONITOR_BIN` if set, else `<target>/debug/vm-monitor` (`<target>` is
//! `$CARGO_TARGET_DIR` or the workspace's `target/`). Build it first: `cargo build -p monitor`.

use anyhow::{Context, bail};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// How long the daemon may take to answer `/healthz` after being spawned.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running daemon; killed on drop.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    log_path: PathBuf,
}

/// Path of the binary under test.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("VM_MONITOR_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug").join("vm-monitor");
    assert_fresh(&bin);
    bin
}

/// Panics if `bin` is older than any source it is built from: a test of a stale binary passes
/// or fails for the wrong code. (`cargo xtask test` builds it first; a bare `cargo test -p
/// tests` does not.)
fn assert_fresh(bin: &std::path::Path) {
    fn newest(dir: &std::path::Path, newest_seen: &mut std::time::SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                newest(&path, newest_seen);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                *newest_seen = (*newest_seen).max(modified);
            }
        }
    }
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut sources = std::time::SystemTime::UNIX_EPOCH;
        for dir in ["monitor/src", "monitor-ebpf/src"] {
            newest(&root.join(dir), &mut sources);
        }
        let built = std::fs::metadata(bin)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| panic!("{}: {e}; build it: cargo build -p monitor", bin.display()));
        assert!(
            built >= sources,
            "{} is older than the monitor sources: rebuild it (cargo build -p monitor) or set \
             VM_MONITOR_BIN",
            bin.display()
        );
    });
}

impl Daemon {
    /// Starts `vm-monitor --addr 127.0.0.1:<free port>` without cgroup or Postgres (the
    /// unmanaged mode) and waits until `/healthz` answers.
    pub async fn start() -> anyhow::Result<Daemon> {
        Self::start_with_args(&[]).await
    }

    /// Like [`Daemon::start`] with extra arguments.
    pub async fn start_with_args(extra: &[&str]) -> anyhow::Result<Daemon> {
        Self::start_logging(extra, None).await
    }

    /// Like [`Daemon::start_with_args`] with `RUST_LOG` = `level` (e.g. `info`, the
    /// production level, for tests that bound what the log receives).
    pub async fn start_logging(extra: &[&str], level: Option<&str>) -> anyhow::Result<Daemon> {
        // The port is free when we look; a concurrent test may grab it before the daemon binds,
        // so try a few ports.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::try_start(extra, level).await {
                Ok(d) => return Ok(d),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("daemon did not start")))
    }

    async fn try_start(extra: &[&str], level: Option<&str>) -> anyhow::Result<Daemon> {
        let bin = binary();
        if !bin.exists() {
            bail!(
                "{} does not exist; build it with `cargo build -p monitor` or set VM_MONITOR_BIN",
                bin.display()
            );
        }
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log_path =
            std::env::temp_dir().join(format!("vm-monitor-test-{}-{port}.log", std::process::id()));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone().context("cloning log file handle")?;
        let child = Command::new(&bin)
            .arg("--addr")
            .arg(addr.to_string())
            .args(extra)
            .env(
                "RUST_LOG",
                level.map(str::to_owned).unwrap_or_else(|| {
                    std::env::var("VM_MONITOR_TEST_LOG").unwrap_or_else(|_| "debug".to_string())
                }),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut daemon = Daemon {
            child,
            addr,
            log_path,
        };
        let until = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = daemon.child.try_wait().context("polling the daemon")? {
                bail!(
                    "vm-monitor exited during startup ({status}):\n{}",
                    daemon.logs()
                );
            }
            if let Ok(200) = daemon.http("GET", "/healthz", &[]).await {
                return Ok(daemon);
            }
            if Instant::now() >= until {
                bail!(
                    "vm-monitor did not answer /healthz within {STARTUP_TIMEOUT:?}:\n{}",
                    daemon.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's resident set (VmRSS) in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading the daemon's /proc status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in the daemon's /proc status")
    }

    /// `ws://127.0.0.1:PORT/monitor`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/monitor", self.addr)
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Fails if the process exited.
    pub fn assert_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait().context("polling the daemon")? {
            None => Ok(()),
            Some(status) => bail!("vm-monitor exited ({status}):\n{}", self.logs()),
        }
    }

    /// Still running and `/healthz` answers 200.
    pub async fn assert_serving(&mut self) -> anyhow::Result<()> {
        self.assert_running()?;
        let status = self.http("GET", "/healthz", &[]).await?;
        if status != 200 {
            bail!("/healthz answered {status}");
        }
        Ok(())
    }

    /// Sends a minimal HTTP/1.1 request and returns the status code.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<u16> {
        Ok(crate::http::request(self.addr, method, path, headers)
            .await?
            .status)
    }

    /// Sends SIGTERM and waits for the exit (bounded).
    pub async fn terminate(self) -> anyhow::Result<std::process::ExitStatus> {
        self.stop_with("TERM").await
    }

    /// Sends signal `name` (as `kill -NAME` spells it) and waits for the exit.
    pub async fn stop_with(mut self, name: &str) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY-free: kill(2) through the `kill` command keeps this crate free of libc.
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .with_context(|| format!("sending SIG{name}"))?;
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= until {
                bail!("vm-monitor did not exit after SIG{name}:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("VM_MONITOR_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}
