//! `cargo xtask vm`: boots a Debian kernel with virtme-ng under qemu TCG (KVM does not work on
//! these machines) and runs a command in it through `tests/vm/guest-init.sh`.
//!
//! The guest sees the host's filesystem read-only, so host-built binaries run as they are; one
//! fresh directory under `target/vm-out/` is shared read-write for results and the exit code.

use std::env;
use std::fs;
use std::io::{self, BufRead as _, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, sleep};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::cmd::{self, find_program, info, shell_quote, step};
use crate::setup::{KernelLine, Setup};

#[derive(Args)]
pub(crate) struct VmArgs {
    /// Kernel line to boot.
    #[arg(long, value_enum, default_value = "6.1")]
    kernel: KernelLine,
    /// Guest memory (qemu `-m` syntax).
    #[arg(long, default_value = "2G")]
    memory: String,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Extra environment for the command, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Kill the VM after this many seconds (default: no limit).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// The command to run as root in the guest; use absolute paths or paths relative to the
    /// current directory (the guest starts there).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

impl VmArgs {
    pub(crate) fn into_run(self) -> Result<VmRun> {
        let env = self
            .env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .with_context(|| format!("--env {kv}: expected KEY=VALUE"))
            })
            .collect::<Result<_>>()?;
        Ok(VmRun {
            kernel: self.kernel,
            memory: self.memory,
            cpus: self.cpus,
            env,
            timeout: self.timeout.map(Duration::from_secs),
            cwd: None,
            command: self.command,
            quiet: false,
        })
    }
}

/// One VM run.
pub(crate) struct VmRun {
    pub kernel: KernelLine,
    pub memory: String,
    pub cpus: u32,
    /// Environment for the guest command (the guest does not inherit the host's).
    pub env: Vec<(String, String)>,
    pub timeout: Option<Duration>,
    /// Where the command starts in the guest (default: the current directory).
    pub cwd: Option<PathBuf>,
    pub command: Vec<String>,
    /// Keep the boot and the kernel's console messages out of the terminal: they go to
    /// `console.log` in the shared directory, and only the guest command's own lines are shown.
    pub quiet: bool,
}

impl VmRun {
    /// Defaults of `cargo xtask vm`.
    pub(crate) fn new(kernel: KernelLine, command: Vec<String>) -> Self {
        VmRun {
            kernel,
            memory: "2G".to_owned(),
            cpus: 2,
            env: Vec::new(),
            timeout: None,
            cwd: None,
            command,
            quiet: false,
        }
    }
}

/// Files the guest leaves in the shared directory.
const READY_FILE: &str = "guest-ready";
const EXIT_CODE_FILE: &str = "exit-code";
/// Host variables worth forwarding when set.
const FORWARDED_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE", "RUST_LIB_BACKTRACE"];

/// Boots before the guest command started that are retried (see [`run_with_dir`]).
const BOOT_ATTEMPTS: u32 = 3;

/// Boots the VM, streams its console, and returns the guest command's exit code.
pub(crate) fn run(setup: &mut Setup, vm: &VmRun) -> Result<i32> {
    run_with_dir(setup, vm).map(|(code, _)| code)
}

/// [`run`], also returning the run's shared directory (`VM_MONITOR_OUT` in the guest).
pub(crate) fn run_with_dir(setup: &mut Setup, vm: &VmRun) -> Result<(i32, PathBuf)> {
    let vng = setup.vm_tools()?;
    let qemu = find_program("qemu-system-x86_64", &[]).context(
        "qemu-system-x86_64 not found on PATH (Debian package qemu-system-x86; `cargo xtask setup` installs it)",
    )?;
    let kernel = setup.kernel(vm.kernel)?;
    ensure!(
        kernel.vmlinuz.is_file(),
        "kernel image {} is missing (`cargo xtask setup` unpacks it)",
        kernel.vmlinuz.display()
    );
    let guest_init = setup.paths.root.join("tests/vm/guest-init.sh");
    ensure!(guest_init.is_file(), "{} is missing", guest_init.display());
    let cwd = match &vm.cwd {
        Some(cwd) => cwd.clone(),
        None => env::current_dir().context("reading the current directory")?,
    };

    for attempt in 1..=BOOT_ATTEMPTS {
        let out = fresh_out_dir(&setup.paths.target.join("vm-out"), vm.kernel)?;
        let mut words = vec![
            "exec".to_owned(),
            "env".to_owned(),
            format!("VM_MONITOR_OUT={}", out.display()),
            format!("VM_MONITOR_KERNEL={}", vm.kernel.as_str()),
        ];
        for var in FORWARDED_ENV {
            if let Ok(value) = env::var(var) {
                words.push(format!("{var}={value}"));
            }
        }
        words.extend(vm.env.iter().map(|(k, v)| format!("{k}={v}")));
        words.push("/bin/sh".to_owned());
        words.push(guest_init.display().to_string());
        words.extend(vm.command.iter().cloned());
        let script = words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ");

        let venv_bin = setup.paths.venv().join("bin");
        let mut vng_cmd = Command::new(&vng);
        vng_cmd
            // vng starts virtme-run by name.
            .env("PATH", cmd::path_with(&[&venv_bin])?)
            .arg("--run")
            .arg(&kernel.vmlinuz)
            .arg("--disable-kvm")
            .args(["--cpus", &vm.cpus.to_string(), "--memory", &vm.memory])
            .arg("--qemu")
            .arg(&qemu)
            // Debian 12's virtiofsd (qemu 7.2's) rejects virtme's arguments; virtme would retry it
            // for ~7 s per boot before falling back to 9p anyway.
            .arg("--force-9p")
            // Without udev in the guest virtme finds no script I/O ports and runs the command on the
            // serial console, which only --verbose forwards.
            .arg("--verbose")
            .arg("--rwdir")
            .arg(&out)
            .arg("--cwd")
            .arg(&cwd)
            .arg("--exec")
            .arg(&script)
            .stdin(Stdio::null())
            // qemu reopens /proc/self/fd/{1,2} with O_TRUNC: on a log file that would wipe what was
            // written before. Relaying through pipes keeps redirected logs intact.
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());

        step(format!(
            "booting Linux {} ({}) under qemu TCG, {} CPUs, {}; shared dir {}",
            kernel.release,
            vm.kernel.as_str(),
            vm.cpus,
            vm.memory,
            out.display()
        ));
        let console_log = out.join(CONSOLE_LOG);
        let filter = if vm.quiet {
            info(format!(
                "waiting for the guest (a boot takes about 10 s); its console goes to {}",
                console_log.display()
            ));
            let log = fs::File::create(&console_log)
                .with_context(|| format!("creating {}", console_log.display()))?;
            Some(Arc::new(ConsoleFilter::new(log)))
        } else {
            info("waiting for the guest (a boot takes about 10 s); its console follows");
            println!("    $ {}", cmd::display(&vng_cmd));
            None
        };
        let started = Instant::now();
        let mut child = vng_cmd
            .spawn()
            .with_context(|| format!("could not start {}", vng.display()))?;
        let relays = match &filter {
            None => [
                child.stdout.take().map(|out| relay(out, io::stdout())),
                child.stderr.take().map(|err| relay(err, io::stderr())),
            ],
            Some(filter) => [
                child
                    .stdout
                    .take()
                    .map(|out| relay_filtered(out, filter.clone())),
                child
                    .stderr
                    .take()
                    .map(|err| relay_filtered(err, filter.clone())),
            ],
        };
        let ready = out.join(READY_FILE);
        let mut boot_time = None;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for vng")? {
                break status;
            }
            if boot_time.is_none() && ready.exists() {
                boot_time = Some(started.elapsed());
            }
            if let Some(limit) = vm.timeout
                && started.elapsed() > limit
            {
                kill_tree(child.id());
                let _ = child.wait();
                bail!(
                    "the VM ({}) did not finish within {} s and was killed",
                    vm.kernel.as_str(),
                    limit.as_secs()
                );
            }
            sleep(Duration::from_millis(100));
        };
        // The pipes close when qemu and virtme are gone, which they are once vng has exited.
        for relay in relays.into_iter().flatten() {
            let _ = relay.join();
        }
        let total = started.elapsed();

        let code_file = out.join(EXIT_CODE_FILE);
        let code = match fs::read_to_string(&code_file) {
            Ok(text) => text.trim().parse::<i32>().with_context(|| {
                format!("{} holds {text:?}, not an exit code", code_file.display())
            })?,
            // Under TCG a guest kernel occasionally oopses while booting (seen: an int3 during
            // text patching); the command never started, so booting again loses nothing.
            Err(_) if boot_time.is_none() && attempt < BOOT_ATTEMPTS => {
                step(format!(
                    "the guest died before the command started (vng exited with {status}; console in {}); booting again ({}/{BOOT_ATTEMPTS})",
                    console_where(vm.quiet, &console_log),
                    attempt + 1
                ));
                continue;
            }
            Err(_) => bail!(
                "the guest never reported the command's exit code (vng exited with {status}); \
                 the kernel or guest-init.sh failed before the command ran, see the console {}",
                console_where(vm.quiet, &console_log)
            ),
        };
        let boot = boot_time.map_or_else(
            || "unknown".to_owned(),
            |b| format!("{:.1} s", b.as_secs_f64()),
        );
        step(format!(
            "VM {} done: command exited with {code}; boot to command {boot}, total {:.1} s",
            vm.kernel.as_str(),
            total.as_secs_f64()
        ));
        return Ok((code, out));
    }
    bail!("the VM was not booted (no attempt left)")
}

/// The guest's whole console, in the shared directory, when the run is quiet.
const CONSOLE_LOG: &str = "console.log";

fn console_where(quiet: bool, log: &Path) -> String {
    if quiet {
        log.display().to_string()
    } else {
        "above".to_owned()
    }
}

/// What a quiet run shows: everything goes to the console log; the terminal gets the lines from
/// guest-init's "running:" line on, minus the kernel's own messages (`[   12.345678] ...`).
struct ConsoleFilter {
    log: Mutex<fs::File>,
    command_started: AtomicBool,
}

impl ConsoleFilter {
    fn new(log: fs::File) -> Self {
        ConsoleFilter {
            log: Mutex::new(log),
            command_started: AtomicBool::new(false),
        }
    }

    fn line(&self, line: &str) {
        if let Ok(mut log) = self.log.lock() {
            let _ = writeln!(log, "{line}");
        }
        let text = line.trim_end_matches('\r');
        if text.starts_with("guest-init: running:") {
            self.command_started.store(true, Ordering::Relaxed);
            return;
        }
        if !self.command_started.load(Ordering::Relaxed) || is_kernel_message(text) {
            return;
        }
        // guest-init's own bookkeeping ("exit code N") is reported by the host anyway.
        if text.starts_with("guest-init: ") {
            return;
        }
        println!("{text}");
    }
}

/// A printk line as the serial console shows it: `[ seconds.micros] message`.
fn is_kernel_message(line: &str) -> bool {
    let Some(rest) = line.trim_start().strip_prefix('[') else {
        return false;
    };
    let Some((stamp, _)) = rest.split_once(']') else {
        return false;
    };
    let stamp = stamp.trim();
    !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn relay_filtered(from: impl Read + Send + 'static, filter: Arc<ConsoleFilter>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = io::BufReader::new(from);
        let mut buf = Vec::new();
        // Lines, not UTF-8 strings: a console can carry any byte.
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf);
            filter.line(line.trim_end_matches('\n'));
            buf.clear();
        }
        let _ = io::stdout().flush();
    })
}

/// Copies a child's output to ours as it arrives.
fn relay(
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
) -> JoinHandle<()> {
    thread::spawn(move || {
        // A closed terminal on our side is no reason to stop the VM; just stop relaying.
        let _ = io::copy(&mut from, &mut to);
        let _ = to.flush();
    })
}

/// Run directories older than this are removed when a new run starts.
const KEEP_OUT_DIRS: Duration = Duration::from_secs(24 * 3600);

/// A new directory per run, so concurrent runs (the target dir is shared) do not collide.
fn fresh_out_dir(base: &Path, kernel: KernelLine) -> Result<PathBuf> {
    prune_old_runs(base);
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let dir = base.join(format!(
        "{}-{stamp}-{}",
        kernel.as_str(),
        std::process::id()
    ));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Best effort: a leftover directory only costs disk space.
fn prune_old_runs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > KEEP_OUT_DIRS);
        if old {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Kills `pid` and all its descendants (vng -> virtme-run -> qemu), found through /proc.
fn kill_tree(pid: u32) {
    let mut victims = vec![pid];
    let mut i = 0;
    let procs = child_map();
    while i < victims.len() {
        let parent = victims[i];
        victims.extend(
            procs
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    for victim in victims {
        if let Ok(victim) = libc::pid_t::try_from(victim) {
            // SAFETY: kill(2) has no memory-safety preconditions; these pids are our own tree.
            unsafe {
                libc::kill(victim, libc::SIGKILL);
            }
        }
    }
}

/// (pid, parent pid) of every process.
fn child_map() -> Vec<(u32, u32)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may contain spaces and parentheses; fields resume after the last ')'.
            let rest = &stat[stat.rfind(')')? + 1..];
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::is_kernel_message;

    #[test]
    fn kernel_messages_are_told_from_the_command_output() {
        assert!(is_kernel_message("[    1.234567] virtio_net virtio1: ..."));
        assert!(is_kernel_message("  [12345.000001] oom-kill:"));
        assert!(!is_kernel_message("==> demo: starting Postgres"));
        assert!(!is_kernel_message("[] not a stamp"));
        assert!(!is_kernel_message("[abc] bracketed text"));
        assert!(!is_kernel_message("   12.345 s  agent → UpscaleRequest"));
    }
}
