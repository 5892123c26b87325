//! VM scenarios: a real kernel (Debian 6.1 / 6.12 under qemu), real cgroup v2, the real
//! `vm-monitor` binary. Run inside the guest by `cargo xtask test` (through `cargo xtask vm`),
//! which sets `VM_MONITOR_IN_VM=1`; outside a VM every test returns immediately.
//!
//! The guest gets a zram swap device (as Neon VMs can have swap): without swap, anonymous
//! memory above memory.high cannot be reclaimed and the allocator is throttled for minutes.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const CG_ROOT: &str = "/sys/fs/cgroup";

fn in_vm() -> bool {
    if std::env::var_os("VM_MONITOR_IN_VM").is_none() {
        eprintln!("skipped: not inside a test VM (run through `cargo xtask test`)");
        return false;
    }
    true
}

fn bin() -> PathBuf {
    std::env::var_os("VM_MONITOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/vm-monitor"))
}

fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One-time guest preparation: swap on zram, memory controller for children.
fn prepare_guest() {
    tests::scenario::ensure_zram_swap(512).unwrap();
    let ctl = std::fs::read_to_string(format!("{CG_ROOT}/cgroup.subtree_control")).unwrap();
    if !ctl.split_whitespace().any(|c| c == "memory") {
        std::fs::write(format!("{CG_ROOT}/cgroup.subtree_control"), "+memory").unwrap();
    }
}

/// A cgroup v2 group for one test, removed (after its tasks exit) on drop.
struct Cgroup {
    name: String,
    dir: PathBuf,
}

impl Cgroup {
    fn create(name: &str, high: &str) -> Cgroup {
        prepare_guest();
        let dir = Path::new(CG_ROOT).join(name);
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.high"), high).unwrap();
        Cgroup {
            name: name.to_string(),
            dir,
        }
    }

    fn id(&self) -> u64 {
        std::fs::metadata(&self.dir).unwrap().ino()
    }

    /// Runs `script` inside the cgroup and waits for it.
    fn run(&self, script: &str) -> u32 {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {script}",
                self.dir.display()
            ))
            .spawn()
            .unwrap();
        let pid = child.id();
        let status = child.wait().unwrap();
        assert!(status.success(), "workload `{script}` failed: {status}");
        pid
    }

    fn event(&self, key: &str) -> u64 {
        let text = std::fs::read_to_string(self.dir.join("memory.events")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Lift the limit first so nothing left behind stays throttled.
        let _ = std::fs::write(self.dir.join("memory.high"), "max");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Anonymous memory: `tail` keeps a newline-free stream in memory.
fn allocate(mib: u32) -> String {
    format!("sh -c 'head -c {mib}M /dev/zero | tail > /dev/null'")
}

/// Echoes a child's stderr (prefixed with `label`) and hands each line to the receiver.
fn forward_stderr(child: &mut Child, label: &'static str) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{label}] {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// Whether a line containing `needle` arrives within a minute (TCG is slow).
fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) if line.contains(needle) => return true,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
    }
    false
}

/// A running `vm-monitor trace`, stopped with SIGINT; its events are read from `--output`.
struct Trace {
    child: Child,
    output: PathBuf,
    stderr: mpsc::Receiver<String>,
}

impl Trace {
    fn start(cgroup: &str, extra: &[&str]) -> Trace {
        let output =
            std::env::temp_dir().join(format!("trace-{cgroup}-{}.jsonl", std::process::id()));
        let mut child = Command::new(bin())
            .args(["trace", "--cgroup", cgroup, "--json", "--output"])
            .arg(&output)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = forward_stderr(&mut child, "trace");
        let t = Trace {
            child,
            output,
            stderr: rx,
        };
        t.wait_for_stderr("tracing:");
        t
    }

    fn wait_for_stderr(&self, needle: &str) {
        assert!(
            wait_for_line(&self.stderr, needle),
            "vm-monitor trace never printed {needle:?}"
        );
    }

    fn stop(mut self) -> Vec<Value> {
        sh(&format!("kill -INT {}", self.child.id()));
        let status = self.child.wait().unwrap();
        assert!(status.success(), "trace exited with {status}");
        let text = std::fs::read_to_string(&self.output).unwrap();
        let _ = std::fs::remove_file(&self.output);
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect()
    }
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

fn memcg_reclaim_scenario(label: &str) {
    let cg = Cgroup::create("neon-postgres", "32M");
    let trace = Trace::start(&cg.name, &[]);
    let pid = cg.run(&allocate(64));
    let events = trace.stop();
    let high = cg.event("high");
    let begins = of_kind(&events, "memcg_reclaim_begin");
    let ends = of_kind(&events, "memcg_reclaim_end");
    println!(
        "[{label}] kernel {}: memory.events high={high}, {} begin / {} end records, {} records in all",
        std::env::var("VM_MONITOR_KERNEL").unwrap_or_default(),
        begins.len(),
        ends.len(),
        events.len()
    );
    assert!(high > 0, "the allocation never crossed memory.high");
    assert!(
        !begins.is_empty() && !ends.is_empty(),
        "no memcg reclaim records: {events:?}"
    );
    for e in begins.iter().chain(&ends) {
        assert_eq!(e["cgroup_id"], cg.id(), "record from another cgroup: {e}");
    }
    assert!(
        ends.iter().any(|e| e["stall_us"].as_u64().unwrap_or(0) > 0),
        "no reclaim stall measured"
    );
    // The workload's processes (sh, head, tail) are children of the pid we started.
    assert!(
        begins
            .iter()
            .any(|e| e["comm"] == "tail" || e["tgid"] == pid),
        "no record attributed to the allocator: {begins:?}"
    );
}

#[test]
#[ignore = "runs inside a test VM"]
fn memcg_reclaim_events_carry_the_target_cgroup_id() {
    if !in_vm() {
        return;
    }
    memcg_reclaim_scenario("jit default");
}

#[test]
#[ignore = "runs inside a test VM"]
fn memcg_reclaim_events_with_jit_disabled() {
    if !in_vm() {
        return;
    }
    let before = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable").unwrap();
    std::fs::write("/proc/sys/net/core/bpf_jit_enable", "0").unwrap();
    let result = std::panic::catch_unwind(|| memcg_reclaim_scenario("jit off"));
    std::fs::write("/proc/sys/net/core/bpf_jit_enable", before.trim()).unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
#[ignore = "runs inside a test VM"]
fn sibling_cgroup_pressure_is_not_reported_for_the_target() {
    if !in_vm() {
        return;
    }
    let target = Cgroup::create("neon-postgres", "max");
    let sibling = Cgroup::create("sibling", "32M");
    let trace = Trace::start(&target.name, &[]);
    sibling.run(&allocate(64));
    let events = trace.stop();
    assert!(
        sibling.event("high") > 0,
        "the sibling never hit its memory.high"
    );
    let memcg: Vec<_> = events
        .iter()
        .filter(|e| {
            e["kind"]
                .as_str()
                .unwrap_or("")
                .starts_with("memcg_reclaim")
        })
        .collect();
    assert!(
        memcg.is_empty(),
        "sibling reclaim leaked into the target's stream: {memcg:?}"
    );
}

#[test]
#[ignore = "runs inside a test VM"]
fn doctor_reports_the_ebpf_tier() {
    if !in_vm() {
        return;
    }
    let cg = Cgroup::create("neon-postgres", "max");
    let out = Command::new(bin())
        .args(["doctor", "--json", "--cgroup", &cg.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
    assert_eq!(v["auto_tier"], "ebpf", "{v}");
    assert_eq!(v["cgroup2"], true);
    assert_eq!(v["memory_controller"], true);
    assert_eq!(v["cgroup"]["id"], cg.id());
    let table = Command::new(bin())
        .args(["doctor", "--cgroup", &cg.name])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("auto tier") && table.contains("ebpf"),
        "{table}"
    );
}

/// Voluntary context switches per thread of `pid`.
fn voluntary_switches(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if let Some(n) = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            out.insert(task.file_name().to_string_lossy().into_owned(), n);
        }
    }
    out
}

/// Starts the daemon on `signal` and counts its wake-ups over 10 idle seconds.
fn idle_wakeups(cg: &Cgroup, signal: &str) -> u64 {
    let mut child = Command::new(bin())
        .args([
            "--addr",
            "127.0.0.1:0",
            "--cgroup",
            &cg.name,
            "--signal",
            signal,
            "--no-memory-high",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = forward_stderr(&mut child, "daemon");
    if !wait_for_line(&rx, "pressure signal tier chosen") {
        let _ = child.kill();
        panic!("daemon never reported its tier");
    }
    std::thread::sleep(Duration::from_secs(2)); // let start-up settle
    let pid = child.id();
    let before = voluntary_switches(pid);
    std::thread::sleep(Duration::from_secs(10));
    let after = voluntary_switches(pid);
    // Threads started meanwhile count from zero; threads that exited are lost (none should).
    let woke: u64 = after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    sh(&format!("kill -TERM {pid}"));
    let _ = child.wait();
    woke
}

#[test]
#[ignore = "runs inside a test VM"]
fn idle_daemon_does_not_wake_up_on_the_ebpf_tier() {
    if !in_vm() {
        return;
    }
    let cg = Cgroup::create("neon-postgres", "max");
    let ebpf = idle_wakeups(&cg, "ebpf");
    let poll = idle_wakeups(&cg, "poll");
    println!(
        "idle 10 s, kernel {}: voluntary context switches ebpf={ebpf} poll={poll}",
        std::env::var("VM_MONITOR_KERNEL").unwrap_or_default()
    );
    // The poll tier wakes every 100 ms; the event path sleeps until the kernel has news.
    assert!(
        poll >= 50,
        "poll tier should wake ~10/s, saw {poll} in 10 s"
    );
    assert!(ebpf <= 5, "eBPF tier woke {ebpf} times in 10 idle seconds");
}
