//! Bad command lines end with a clear error naming the flag, before anything is bound or
//! loaded, and never with a panic (exit 101).

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
