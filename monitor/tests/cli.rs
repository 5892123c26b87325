//! Bad command lines end with a clear error naming the flag, before anything is bound or
//! loaded, and never with a panic (exit 101).

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vm-monitor"))
        .args(args)
        // A port nobody listens on: if validation were skipped the daemon would bind and
        // keep running, and this test would hang instead of passing.
        .args(if args.first() == Some(&"trace") {
            &[][..]
        } else {
            &["--addr", "127.0.0.1:1"][..]
        })
        .env_remove("VM_MONITOR_PGCONNSTR")
        .output()
        .expect("running vm-monitor")
}

fn assert_refused(args: &[&str], needle: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: the error does not name {needle:?}: {stderr}"
    );
}

#[test]
fn an_upscale_threshold_of_one_or_more_is_refused() {
    for v in ["1.0", "1", "1.5", "0", "-0.1"] {
        assert_refused(
            &[&format!("--upscale-threshold={v}")],
            "--upscale-threshold",
        );
    }
}

#[test]
fn trace_durations_that_do_not_fit_are_refused_without_a_panic() {
    for v in ["1e300", "18446744073709551616", "0", "-1", "NaN"] {
        assert_refused(&["trace", &format!("--duration={v}")], "--duration");
    }
}

#[test]
fn a_missing_or_empty_connection_string_file_is_refused() {
    assert_refused(
        &["--pgconnstr-file", "/nonexistent/vm-monitor-connstr"],
        "--pgconnstr-file",
    );
    let empty =
        std::env::temp_dir().join(format!("vm-monitor-empty-connstr-{}", std::process::id()));
    std::fs::write(&empty, "\n").unwrap();
    assert_refused(
        &["--pgconnstr-file", empty.to_str().unwrap()],
        "no connection string",
    );
    let _ = std::fs::remove_file(&empty);
    assert_refused(
        &["--pgconnstr", "host=x", "--pgconnstr-file", "/tmp/x"],
        "--pgconnstr-file",
    );
}

#[test]
fn bad_agent_allow_lists_are_refused() {
    for v in ["", "10.0.0.0/33", "example.com", "10.0.0.1,"] {
        assert_refused(&[&format!("--agent-allow={v}")], "--agent-allow");
    }
}

/// Whether `pid` blocks SIGTERM (`SigBlk` in /proc/PID/status): true from the first line of
/// `main` until the daemon's handlers exist.
fn blocks_term(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mask = status.lines().find_map(|l| l.strip_prefix("SigBlk:"))?;
    let mask = u64::from_str_radix(mask.trim(), 16).ok()?;
    Some(mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// A TERM sent as soon as `main` runs (the process blocks TERM from its first line until its
/// handlers exist), or later in the start-up (flags, runtime, bind), ends in the clean
/// shutdown and exit 0, not in death by the signal's default action. (Before `main`, in the
/// dynamic loader, the program cannot act.)
#[test]
fn a_term_right_after_exec_shuts_down_cleanly() {
    use std::os::unix::process::ExitStatusExt as _;
    let mut saw_blocked = 0;
    for delay_us in [0u64, 0, 0, 0, 100, 1000, 5000, 20_000, 100_000] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vm-monitor"))
            .args(["--addr", "127.0.0.1:0"])
            .env_remove("VM_MONITOR_PGCONNSTR")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawning vm-monitor");
        let started = std::time::Instant::now();
        // Wait for the block (the first line of main); the window lasts about a millisecond,
        // so a poller that is descheduled may miss it: then the handlers are there already.
        let mut blocked = false;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            if blocks_term(child.id()) == Some(true) {
                blocked = true;
                break;
            }
            std::hint::spin_loop();
        }
        saw_blocked += usize::from(blocked);
        std::thread::sleep(std::time::Duration::from_micros(delay_us));
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let status = child.wait().expect("waiting for vm-monitor");
        assert_eq!(
            (status.code(), status.signal()),
            (Some(0), None),
            "TERM {delay_us} µs into main (blocked seen: {blocked}): {status}"
        );
    }
    assert!(
        saw_blocked >= 3,
        "TERM was blocked at the start of main in only {saw_blocked} of 9 runs"
    );
}
