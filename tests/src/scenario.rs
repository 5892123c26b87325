//! Guest-side harness for the end-to-end scaling scenarios (`tests/tests/vm_scaling.rs`) and
//! `cargo xtask demo` (`src/bin/demo.rs`): everything runs inside a test VM as root.
//!
//! - [`Cgroup`]: the `neon-postgres` cgroup v2 group with the memory controller and **no swap**
//!   (`memory.swap.max = 0`), so anonymous memory is truly non-reclaimable even when the guest
//!   has swap (the eBPF VM tests turn on zram); readers for `memory.*`; limits lifted on drop.
//! - [`Postgres`]: a private PostgreSQL 15 cluster started *inside* the cgroup, with the
//!   test-only extension (`tests/pg_ext`) defining the `neon.*` file-cache settings.
//! - [`Monitor`]: the real `vm-monitor` daemon, its stderr captured and parsed (decision log).
//! - [`MemHog`] (anonymous ramp, hold, free) and [`Ext4Scratch`] (a loop-mounted ext4, since the
//!   guest's root is 9p without a page cache) as workloads.
//! - Sizing formulas of the issue, computed here independently of the daemon's code.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use serde_json::Value;

use crate::agent::{AgentConfig, Alloc, FakeAgent};

/// The cgroup Postgres runs in, as in Neon's VMs.
pub const CGROUP: &str = "neon-postgres";
const CG_ROOT: &str = "/sys/fs/cgroup";
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// memory.high is kept in pages: the kernel rounds a written byte count down.
pub const PAGE: u64 = 4096;
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Environment variable naming the test extension's `.so`, built on the host before the VM
/// boots (`tests/pg_ext/build.sh`); without it the harness builds it in the guest.
pub const EXT_ENV: &str = "VM_MONITOR_PG_EXT";
/// `neon.max_file_cache_size` of the clusters.
pub const MAX_FILE_CACHE: u64 = GIB;
/// Working directory of the harness in the guest (a writable tmpfs overlay).
const WORK: &str = "/tmp/vm-monitor-scenario";
/// How long the daemon may take from spawn to its startup decision (eBPF load under TCG).
const DAEMON_STARTUP: Duration = Duration::from_secs(90);

/// Whether we run inside a test VM; prints why not.
pub fn in_vm() -> bool {
    if std::env::var_os("VM_MONITOR_IN_VM").is_none() {
        eprintln!("skipped: not inside a test VM (run through `cargo xtask test`)");
        return false;
    }
    true
}

/// One compute unit of the agent's default size (0.25 vCPU, 1 GiB) times `n`.
pub fn cu(n: u64) -> Alloc {
    Alloc::cus(n, Alloc::DEFAULT_CU)
}

// ---------------------------------------------------------------------------------------------
// Sizing, from the issue's formulas (independent of the monitor crate on purpose)

/// What the daemon should apply for one amount of usable memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub usable: u64,
    /// Upscale threshold: trunc(0.85 · usable).
    pub threshold: u64,
    /// min(0.75 · usable, (usable − 256 MiB) / 1.1) rounded down to MiB, capped by the max.
    pub file_cache: u64,
    /// What `memory.high` reads back after the daemon writes the threshold (page-aligned).
    pub memory_high: u64,
}

impl Sizes {
    /// After the agent announced `alloc` bytes: usable = alloc − 100 MiB.
    pub fn for_allocation(alloc: u64) -> Sizes {
        Sizes::for_usable(alloc - 100 * MIB)
    }

    /// At startup: usable = MemTotal.
    pub fn at_startup() -> anyhow::Result<Sizes> {
        Ok(Sizes::for_usable(mem_total()?))
    }

    pub fn for_usable(usable: u64) -> Sizes {
        let threshold = (usable as f64 * 0.85) as u64;
        let by_share = (usable as f64 * 0.75) as u64;
        let by_spread = (usable.saturating_sub(256 * MIB) as f64 / 1.1) as u64;
        let file_cache = (by_share.min(by_spread) / MIB * MIB).min(MAX_FILE_CACHE);
        Sizes {
            usable,
            threshold,
            file_cache,
            memory_high: threshold / PAGE * PAGE,
        }
    }
}

/// MemTotal of this (guest) kernel, bytes.
pub fn mem_total() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemTotal in /proc/meminfo")?;
    Ok(kib * 1024)
}

/// Bytes as MiB with one decimal, for printing.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// CLOCK_BOOTTIME in nanoseconds: the clock of the daemon's decisions and the eBPF events.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------------
// Small process helpers

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The first of `names` that exists (root's sbin may not be on PATH in the guest).
fn program(names: &[&str]) -> PathBuf {
    names
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(names[0]))
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn work_dir() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(WORK);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Sends `sig` to `pid` with kill(2).
pub fn signal(pid: u32, sig: i32) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is a child we started.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(std::io::Error::last_os_error()).context("kill");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// cgroup

/// PSI figures of one line of `memory.pressure`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Cumulative stall, microseconds.
    pub total_us: u64,
}

/// `memory.pressure`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Psi {
    pub some: PsiLine,
    pub full: PsiLine,
}

fn parse_psi(text: &str) -> anyhow::Result<Psi> {
    let mut psi = Psi::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let target = match words.next() {
            Some("some") => &mut psi.some,
            Some("full") => &mut psi.full,
            _ => continue,
        };
        for kv in words {
            let (k, v) = kv.split_once('=').context("malformed memory.pressure")?;
            match k {
                "avg10" => target.avg10 = v.parse()?,
                "avg60" => target.avg60 = v.parse()?,
                "avg300" => target.avg300 = v.parse()?,
                "total" => target.total_us = v.parse()?,
                _ => {}
            }
        }
    }
    Ok(psi)
}

fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A cgroup v2 group with the memory controller and no swap; on drop its limits are lifted,
/// whatever is left in it is killed, and it is removed.
pub struct Cgroup {
    pub name: String,
    pub dir: PathBuf,
}

impl Cgroup {
    /// Creates `name` (replacing a leftover from an earlier run).
    pub fn create(name: &str) -> anyhow::Result<Cgroup> {
        let root = Path::new(CG_ROOT);
        let ctl = std::fs::read_to_string(root.join("cgroup.subtree_control"))
            .context("reading the root cgroup.subtree_control (is cgroup v2 mounted?)")?;
        if !ctl.split_whitespace().any(|c| c == "memory") {
            std::fs::write(root.join("cgroup.subtree_control"), "+memory")
                .context("enabling the memory controller")?;
        }
        let cg = Cgroup {
            name: name.to_string(),
            dir: root.join(name),
        };
        if cg.dir.exists() {
            cg.teardown();
        }
        std::fs::create_dir(&cg.dir).with_context(|| format!("creating {}", cg.dir.display()))?;
        let swap_max = cg.dir.join("memory.swap.max");
        if swap_max.exists() {
            std::fs::write(&swap_max, "0").context("writing memory.swap.max = 0")?;
        } else {
            let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
            ensure!(
                swaps.lines().count() < 2,
                "swap is on but this kernel has no memory.swap.max to keep {name} off it"
            );
        }
        cg.write("memory.high", "max")?;
        Ok(cg)
    }

    fn teardown(&self) {
        for (file, value) in [("memory.high", "max"), ("memory.max", "max")] {
            let _ = std::fs::write(self.dir.join(file), value);
        }
        // Everything in here was started by the harness.
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not remove {}", self.dir.display());
    }

    /// The cgroup id (directory inode), as the eBPF records carry it.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.dir).map(|m| m.ino()).unwrap_or(0)
    }

    /// `sh` that moves itself into the cgroup and then execs `program` (arguments follow with
    /// `.arg`/`.args`): the program and all its children start inside the cgroup.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(self.dir.join("cgroup.procs"))
            .arg(program);
        cmd
    }

    pub fn read(&self, file: &str) -> anyhow::Result<String> {
        let path = self.dir.join(file);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    pub fn write(&self, file: &str, value: &str) -> anyhow::Result<()> {
        let path = self.dir.join(file);
        std::fs::write(&path, value)
            .with_context(|| format!("writing {value:?} to {}", path.display()))
    }

    /// `memory.high`: `None` for `max`.
    pub fn high(&self) -> anyhow::Result<Option<u64>> {
        memory_high_in(&self.dir)
    }

    pub fn current(&self) -> anyhow::Result<u64> {
        Ok(self.read("memory.current")?.trim().parse()?)
    }

    pub fn stat(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(parse_flat_keyed(&self.read("memory.stat")?))
    }

    /// Non-reclaimable memory as the issue defines it: `active_anon + inactive_anon`.
    pub fn non_reclaimable(&self) -> anyhow::Result<u64> {
        non_reclaimable_in(&self.dir)
    }

    /// `memory.events` counters (`low`, `high`, `max`, `oom`, `oom_kill`, ...).
    pub fn events(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(parse_flat_keyed(&self.read("memory.events")?))
    }

    pub fn event(&self, key: &str) -> anyhow::Result<u64> {
        self.events()?
            .get(key)
            .copied()
            .with_context(|| format!("no {key} in memory.events"))
    }

    pub fn pressure(&self) -> anyhow::Result<Psi> {
        parse_psi(&self.read("memory.pressure")?)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `memory.high` of the cgroup directory `dir`: `None` for `max`.
pub fn memory_high_in(dir: &Path) -> anyhow::Result<Option<u64>> {
    let path = dir.join("memory.high");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    match text.trim() {
        "max" => Ok(None),
        v => Ok(Some(v.parse().context("memory.high")?)),
    }
}

/// `active_anon + inactive_anon` of the cgroup directory `dir` (for threads that do not own
/// the [`Cgroup`]).
pub fn non_reclaimable_in(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join("memory.stat");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let stat = parse_flat_keyed(&text);
    Ok(stat.get("active_anon").copied().unwrap_or(0)
        + stat.get("inactive_anon").copied().unwrap_or(0))
}

/// Watches `memory.stat` from outside the workload and timestamps the moment non-reclaimable
/// memory first reaches a threshold: the independent clock for reaction-time measurements.
pub struct CrossingWatch {
    stop: Arc<AtomicBool>,
    result: mpsc::Receiver<(Instant, u64)>,
}

impl CrossingWatch {
    /// Polls every `period` until the crossing (then stops by itself) or until dropped.
    pub fn start(cg: &Cgroup, threshold: u64, period: Duration) -> CrossingWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, result) = mpsc::channel();
        let dir = cg.dir.clone();
        let flag = stop.clone();
        std::thread::spawn(move || {
            // Real-time priority: under load a normal thread's 1 ms sleeps overrun by tens of
            // ms on a 2-CPU TCG guest, which would make the crossing look late.
            let param = libc::sched_param { sched_priority: 10 };
            // SAFETY: sched_setscheduler reads the param we own; pid 0 is this thread.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
            while !flag.load(Ordering::Relaxed) {
                if let Ok(v) = non_reclaimable_in(&dir)
                    && v >= threshold
                {
                    let _ = tx.send((Instant::now(), v));
                    return;
                }
                std::thread::sleep(period);
            }
        });
        CrossingWatch { stop, result }
    }

    /// When the threshold was first seen crossed and the reading then; waits up to `timeout`
    /// for a crossing not seen yet.
    pub fn crossing(&self, timeout: Duration) -> Option<(Instant, u64)> {
        self.result.recv_timeout(timeout).ok()
    }
}

impl Drop for CrossingWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Postgres

/// The user Postgres runs as.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let fields: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .context("no user `postgres` (install postgresql; `cargo xtask setup` does)")?
        .split(':')
        .collect();
    Ok((fields[2].parse()?, fields[3].parse()?))
}

/// A command run as user `postgres` (setpriv: no PAM session needed, unlike runuser/su).
fn as_postgres(mut cmd: Command, program: &str) -> Command {
    cmd.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
        program,
    ]);
    cmd
}

fn setpriv() -> Command {
    Command::new(program(&["/usr/bin/setpriv", "/bin/setpriv"]))
}

pub fn chown_tree(path: &Path) -> anyhow::Result<()> {
    let (uid, gid) = postgres_ids()?;
    run(Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path))?;
    Ok(())
}

/// The test extension's `.so`: `$VM_MONITOR_PG_EXT`, else built once into the work dir.
pub fn extension() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Some(p) = std::env::var_os(EXT_ENV) {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "{EXT_ENV}={} does not exist", p.display());
        return Ok(p);
    }
    BUILT
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pg_ext/build.sh");
            let out = work_dir()
                .and_then(|w| run(Command::new("bash").arg(&script).arg(w.join("pg_ext"))))
                .map_err(|e| {
                    format!("{EXT_ENV} is not set and building the extension failed: {e:#}")
                })?;
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// An initdb'd data directory, made once per process and copied for each cluster (initdb
/// takes many seconds under TCG).
fn template() -> anyhow::Result<PathBuf> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let make = || -> anyhow::Result<PathBuf> {
                let dir = work_dir()?.join(format!("template-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)?;
                chown_tree(&dir)?;
                let data = dir.join("data");
                let started = Instant::now();
                run(as_postgres(setpriv(), &format!("{PG_BIN}/initdb"))
                    .current_dir(&dir)
                    .arg("-D")
                    .arg(&data)
                    .args(["-U", "postgres", "--auth=trust", "--no-sync"])
                    .args(["--no-instructions", "-E", "UTF8", "--locale=C"]))?;
                eprintln!(
                    "[scenario] initdb took {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                Ok(data)
            };
            make().map_err(|e| format!("initdb failed: {e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// A private PostgreSQL 15 cluster whose processes all run inside a cgroup; stopped and
/// removed on drop.
pub struct Postgres {
    pub root: PathBuf,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    log: PathBuf,
    cgroup_procs: PathBuf,
    running: bool,
}

impl Postgres {
    /// Copies the template cluster, configures it (loopback only, the test extension,
    /// `neon.max_file_cache_size` = 1 GB) and starts it inside `cg`.
    pub fn start(cg: &Cgroup, name: &str) -> anyhow::Result<Postgres> {
        let so = extension()?;
        let template = template()?;
        let root = work_dir()?.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let data = root.join("data");
        run(Command::new("cp").arg("-a").arg(&template).arg(&data))?;
        // Postgres loads the library by path; a copy next to the cluster is surely readable.
        let so_copy = root.join("neon_lfc_test.so");
        std::fs::copy(&so, &so_copy)
            .with_context(|| format!("copying {} to {}", so.display(), so_copy.display()))?;
        let sock = root.join("sock");
        std::fs::create_dir_all(&sock)?;
        let port = free_port()?;
        // In postgresql.conf, not `-c`: a command-line value would override ALTER SYSTEM.
        let conf = format!(
            "\n# vm-monitor scaling scenarios\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{}'\n\
             shared_preload_libraries = '{}'\n\
             neon.max_file_cache_size = '{}MB'\n\
             shared_buffers = 16MB\n\
             max_connections = 20\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             logging_collector = off\n",
            sock.display(),
            so_copy.display(),
            MAX_FILE_CACHE / MIB
        );
        let conf_path = data.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new().append(true).open(&conf_path)?;
        f.write_all(conf.as_bytes())?;
        drop(f);
        chown_tree(&root)?;
        let mut pg = Postgres {
            log: root.join("server.log"),
            root,
            data,
            sock,
            port,
            cgroup_procs: cg.dir.join("cgroup.procs"),
            running: false,
        };
        pg.start_server()?;
        Ok(pg)
    }

    fn pg_ctl(&self, in_cgroup: bool, args: &[&str]) -> Command {
        let base = if in_cgroup {
            let mut sh = Command::new("/bin/sh");
            sh.arg("-c")
                .arg(r#"echo $$ > "$0" && exec "$@""#)
                .arg(&self.cgroup_procs)
                .arg(program(&["/usr/bin/setpriv", "/bin/setpriv"]));
            sh
        } else {
            setpriv()
        };
        let mut cmd = as_postgres(base, &format!("{PG_BIN}/pg_ctl"));
        cmd.current_dir(&self.root)
            .arg("-D")
            .arg(&self.data)
            .args(args);
        cmd
    }

    /// `pg_ctl start` from inside the cgroup: the postmaster and every backend start there.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        let log = self.log.display().to_string();
        let started = Instant::now();
        let out = self
            .pg_ctl(true, &["-l", &log, "-w", "-t", "120", "start"])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed ({}): {}\nserver log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        self.running = true;
        eprintln!(
            "[scenario] Postgres started on port {} in {:.1} s",
            self.port,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// A fast shutdown: sessions are terminated, as when compute_ctl stops Postgres.
    pub fn stop_server(&mut self) -> anyhow::Result<()> {
        run(&mut self.pg_ctl(false, &["-m", "fast", "-w", "-t", "60", "stop"]))?;
        self.running = false;
        Ok(())
    }

    /// Connection string for the daemon, over loopback TCP.
    pub fn connstr(&self) -> String {
        format!(
            "host=127.0.0.1 port={} dbname=postgres user=postgres sslmode=disable application_name=vm-monitor",
            self.port
        )
    }

    /// psql over the unix socket, unaligned tuples only; `sql` may hold several statements.
    pub fn psql_command(&self, sql: &str) -> Command {
        let mut cmd = Command::new(program(&[&format!("{PG_BIN}/psql"), "/usr/bin/psql"]));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sock)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql]);
        cmd
    }

    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let out = run(&mut self.psql_command(sql))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `SHOW neon.file_cache_size_limit` (e.g. `607MB`).
    pub fn show_file_cache(&self) -> anyhow::Result<String> {
        self.psql("SHOW neon.file_cache_size_limit")
    }

    /// The file cache size limit in bytes, as the daemon's own SQL reads it.
    pub fn file_cache_bytes(&self) -> anyhow::Result<u64> {
        let v = self.psql("SELECT pg_size_bytes(current_setting('neon.file_cache_size_limit'))")?;
        v.parse()
            .with_context(|| format!("file cache size {v:?} is not a number"))
    }

    /// Overwrites `postgresql.auto.conf` (only while stopped), as a cluster restored from an
    /// older configuration would have it.
    pub fn write_auto_conf(&self, settings: &[(&str, &str)]) -> anyhow::Result<()> {
        ensure!(
            !self.running,
            "postgresql.auto.conf is only edited while stopped"
        );
        let mut text = String::from("# Do not edit this file manually!\n");
        for (k, v) in settings {
            text.push_str(&format!("{k} = '{v}'\n"));
        }
        let path = self.data.join("postgresql.auto.conf");
        std::fs::write(&path, text)?;
        chown_tree(&path)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .pg_ctl(false, &["-m", "immediate", "-w", "-t", "30", "stop"])
                .stdin(Stdio::null())
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// One stderr line of the daemon, stamped on arrival.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub at: Instant,
    pub text: String,
}

impl LogLine {
    /// The decision record, if this is a `decision={json}` line.
    pub fn decision(&self) -> Option<Value> {
        let start = self.text.find("decision={")? + "decision=".len();
        serde_json::Deserializer::from_str(&self.text[start..])
            .into_iter::<Value>()
            .next()?
            .ok()
    }
}

#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<LogLine>>,
    more: Condvar,
    closed: AtomicBool,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How to start the daemon.
#[derive(Clone, Debug)]
pub struct MonitorOptions {
    /// `--signal`.
    pub signal: String,
    /// `--pgconnstr`.
    pub pgconnstr: Option<String>,
    /// More flags.
    pub extra: Vec<String>,
    /// Echo the daemon's log lines to our stderr as they come. Off by default: in the VM our
    /// stderr is the serial console, and a busy log would cost the guest CPU time during
    /// measurements. The log is always saved (and dumped when a test panics), see [`Monitor`].
    pub echo: bool,
    /// `RUST_LOG` for the daemon. The default adds the engine's debug lines (memory.high
    /// writes) that scenarios check; benchmarks use the production default, `info`.
    pub rust_log: String,
    /// A command the daemon is started through (e.g. `setpriv --reuid=...`), which must exec
    /// it in place so the daemon keeps the child's pid. Empty: started directly.
    pub wrapper: Vec<String>,
    /// The daemon binary to run instead of [`crate::daemon::binary`].
    pub binary: Option<PathBuf>,
}

impl MonitorOptions {
    pub fn new(signal: &str, pgconnstr: Option<String>) -> MonitorOptions {
        MonitorOptions {
            signal: signal.to_string(),
            pgconnstr,
            extra: Vec::new(),
            echo: false,
            rust_log: "info,monitor::engine=debug".to_string(),
            wrapper: Vec::new(),
            binary: None,
        }
    }
}

/// The real `vm-monitor` daemon on a free loopback port, managing a cgroup (and Postgres'
/// file cache); killed on drop if still running. Its log is saved to
/// `$VM_MONITOR_OUT/vm-monitor-<port>.log` on drop, and printed when the thread panics.
pub struct Monitor {
    child: Child,
    pub addr: SocketAddr,
    lines: Arc<Lines>,
    exited: Option<ExitStatus>,
}

impl Monitor {
    /// Starts the daemon and waits for its startup decision (memory.high = max, file cache,
    /// memory.high = threshold applied).
    pub fn start(cg: &Cgroup, opts: &MonitorOptions) -> anyhow::Result<Monitor> {
        let bin = opts.binary.clone().unwrap_or_else(crate::daemon::binary);
        ensure!(
            bin.is_file(),
            "{} is missing: build it with `cargo build -p monitor`",
            bin.display()
        );
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&bin);
                cmd
            }
            None => Command::new(&bin),
        };
        cmd.arg("--addr")
            .arg(addr.to_string())
            .args(["--cgroup", &cg.name, "--signal", &opts.signal])
            .args(&opts.extra)
            .env("RUST_LOG", &opts.rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(c) = &opts.pgconnstr {
            cmd.args(["--pgconnstr", c]);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let lines = Arc::new(Lines::default());
        let sink = lines.clone();
        let echo = opts.echo;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let text = strip_ansi(&line);
                if echo {
                    eprintln!("[vm-monitor] {text}");
                }
                sink.lines.lock().unwrap().push(LogLine {
                    at: Instant::now(),
                    text,
                });
                sink.more.notify_all();
            }
            sink.closed.store(true, Ordering::Relaxed);
            sink.more.notify_all();
        });
        let mut monitor = Monitor {
            child,
            addr,
            lines,
            exited: None,
        };
        let startup = monitor.wait_for(0, DAEMON_STARTUP, |l| {
            l.decision().is_some_and(|d| d["input"] == "start")
        });
        // The file cache is sized once Postgres answered, right after the startup decision.
        let file_cache = || {
            monitor.wait_for(0, DAEMON_STARTUP, |l| {
                l.decision()
                    .is_some_and(|d| d["input"] == "file cache connected")
            })
        };
        let ready = startup.and_then(|_| match opts.pgconnstr {
            Some(_) => file_cache().map(|_| ()),
            None => Ok(()),
        });
        if let Err(e) = ready {
            let status = monitor.child.try_wait().ok().flatten();
            bail!("vm-monitor did not start ({e:#}); exit status {status:?}");
        }
        Ok(monitor)
    }

    /// `ws://ADDR/monitor`.
    pub fn url(&self) -> String {
        format!("ws://{}/monitor", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Number of log lines so far (a mark for [`Monitor::wait_for`]).
    pub fn mark(&self) -> usize {
        self.lines.lines.lock().unwrap().len()
    }

    pub fn lines(&self) -> Vec<LogLine> {
        self.lines.lines.lock().unwrap().clone()
    }

    /// Decision records from line `from` on, with their arrival times.
    pub fn decisions(&self, from: usize) -> Vec<(Instant, Value)> {
        self.lines.lines.lock().unwrap()[from..]
            .iter()
            .filter_map(|l| Some((l.at, l.decision()?)))
            .collect()
    }

    /// Waits for a line at index `from` or later matching `pred`.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> anyhow::Result<LogLine> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lines.lock().unwrap();
        let mut next = from;
        loop {
            if let Some(l) = lines.get(next..).and_then(|s| s.iter().find(|l| pred(l))) {
                return Ok(l.clone());
            }
            next = lines.len().max(from);
            let now = Instant::now();
            if now >= deadline {
                bail!("no matching vm-monitor log line within {timeout:?}");
            }
            if self.lines.closed.load(Ordering::Relaxed) {
                bail!("vm-monitor's stderr closed (it exited)");
            }
            lines = self
                .lines
                .more
                .wait_timeout(lines, (deadline - now).min(Duration::from_millis(200)))
                .unwrap()
                .0;
        }
    }

    /// Waits for a decision of `kind` (e.g. `upscale_applied`) from line `from` on.
    pub fn wait_for_decision(
        &self,
        from: usize,
        kind: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let line = self
            .wait_for(from, timeout, |l| {
                l.decision().is_some_and(|d| d["kind"] == kind)
            })
            .with_context(|| format!("waiting for a {kind} decision"))?;
        line.decision().context("decision vanished")
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        signal(self.child.id(), libc::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait()? {
                self.exited = Some(s);
                return Ok(s);
            }
            ensure!(
                Instant::now() < deadline,
                "vm-monitor did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails if the daemon exited.
    pub fn assert_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(s) => bail!("vm-monitor exited: {s}"),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let lines = self.lines();
        if let Some(out) = std::env::var_os("VM_MONITOR_OUT") {
            let path = Path::new(&out).join(format!("vm-monitor-{}.log", self.addr.port()));
            let text: String = lines.iter().map(|l| format!("{}\n", l.text)).collect();
            let _ = std::fs::write(path, text);
        }
        if std::thread::panicking() {
            eprintln!("---- vm-monitor log (port {}) ----", self.addr.port());
            for l in &lines {
                eprintln!("[vm-monitor] {}", l.text);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fake agent

/// The fake agent for these scenarios: a 1 CU VM (the agent assumes the monitor knows it), at
/// most 2 CU, the real agent's timings, no reconnects, UpscaleRequests only recorded.
pub fn agent_config(url: String) -> AgentConfig {
    let mut cfg = AgentConfig::new(url);
    cfg.vm = cu(1);
    cfg.max = cu(2);
    cfg.echo = true;
    cfg
}

/// Connects the agent and announces the 1 CU allocation with an `UpscaleNotification`, so
/// the daemon sizes for 1 GiB instead of the guest's MemTotal (keeps the ramps small).
pub async fn connect_agent(cfg: AgentConfig) -> anyhow::Result<FakeAgent> {
    let announce = cfg.vm;
    let agent = FakeAgent::connect(cfg).await?;
    agent
        .upscale_to(announce, Duration::from_secs(10))
        .await
        .context("announcing the allocation")?;
    Ok(agent)
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// The anonymous-memory workload (`src/bin/memhog.rs`) running inside a cgroup.
pub struct MemHog {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// MiB held after the last completed command.
    pub held_mib: u64,
}

impl MemHog {
    /// Starts `exe` (the memhog binary) inside `cg`.
    pub fn start(cg: &Cgroup, exe: &Path) -> anyhow::Result<MemHog> {
        let mut child = cg
            .command(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut hog = MemHog {
            child,
            stdin,
            lines: rx,
            held_mib: 0,
        };
        hog.expect("ready", Duration::from_secs(30))?;
        Ok(hog)
    }

    fn expect(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|_| anyhow!("memhog said no {prefix:?} within {timeout:?}"))?;
            if line.starts_with("error") {
                bail!("memhog: {line}");
            }
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }

    fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{cmd}").context("writing to memhog")?;
        self.stdin.flush().context("writing to memhog")
    }

    /// Starts growing to `total_mib` held (`step_mib` every `interval`); returns at once.
    pub fn grow(
        &mut self,
        total_mib: u64,
        step_mib: u64,
        interval: Duration,
    ) -> anyhow::Result<()> {
        self.send(&format!(
            "grow {total_mib} {step_mib} {}",
            interval.as_millis()
        ))
    }

    /// Like [`MemHog::grow`], and timestamps (CLOCK_BOOTTIME, in the workload itself) the page
    /// fault that brings the held memory to `mark_bytes`; [`MemHog::wait_crossed`] returns it.
    pub fn grow_marked(
        &mut self,
        total_mib: u64,
        step_mib: u64,
        interval: Duration,
        mark_bytes: u64,
    ) -> anyhow::Result<()> {
        self.send(&format!(
            "grow {total_mib} {step_mib} {} {mark_bytes}",
            interval.as_millis()
        ))
    }

    /// The CLOCK_BOOTTIME ns at which the last `grow_marked` reached its mark.
    pub fn wait_crossed(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let line = self.expect("crossed", timeout)?;
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .context("malformed memhog line")
    }

    /// Waits until the last `grow` finished.
    pub fn wait_held(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let line = self.expect("held", timeout)?;
        self.held_mib = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .context("malformed memhog line")?;
        Ok(self.held_mib)
    }

    /// Starts `churn` (touch `total_mib`, free, repeat) for `rounds` rounds or `secs` seconds
    /// (0 = no such limit); returns at once, [`MemHog::wait_churned`] collects the result.
    pub fn churn(&mut self, total_mib: u64, rounds: u64, secs: f64) -> anyhow::Result<()> {
        self.send(&format!("churn {total_mib} {rounds} {secs}"))
    }

    /// Waits for the last `churn` and returns the rounds it did.
    pub fn wait_churned(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let line = self.expect("churned", timeout)?;
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .context("malformed memhog line")
    }

    /// Releases everything and waits for it.
    pub fn free(&mut self) -> anyhow::Result<()> {
        self.send("free")?;
        self.wait_held(Duration::from_secs(60))?;
        Ok(())
    }
}

impl Drop for MemHog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loop-mounted ext4 filesystem: a real page cache (the guest's root is 9p without one,
/// and tmpfs pages are swap-backed, i.e. anonymous to the LRU).
pub struct Ext4Scratch {
    pub mountpoint: PathBuf,
    image: PathBuf,
}

impl Ext4Scratch {
    /// A `size_mib` sparse image in the work dir, formatted and mounted.
    pub fn mount(size_mib: u64) -> anyhow::Result<Ext4Scratch> {
        Self::mount_in(&work_dir()?, size_mib)
    }

    /// [`Ext4Scratch::mount`] with the image in `base`: the work dir lives in guest memory,
    /// so data that is really written (not holes) belongs on the host-backed shared dir.
    pub fn mount_in(base: &Path, size_mib: u64) -> anyhow::Result<Ext4Scratch> {
        let base = base.to_path_buf();
        let image = base.join(format!("ext4-{}.img", std::process::id()));
        let mountpoint = base.join(format!("ext4-{}", std::process::id()));
        let _ = Command::new("umount").arg(&mountpoint).output();
        std::fs::create_dir_all(&mountpoint)?;
        std::fs::File::create(&image)?.set_len(size_mib * MIB)?;
        run(
            Command::new(program(&["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]))
                .args(["-q", "-F"])
                .arg(&image),
        )?;
        // The loop driver may be a module; mount finds it either way once it is loaded.
        let _ = Command::new(program(&["/usr/sbin/modprobe", "/sbin/modprobe"]))
            .arg("loop")
            .output();
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(&image)
            .arg(&mountpoint))?;
        Ok(Ext4Scratch { mountpoint, image })
    }

    /// A file of `bytes` whose blocks are holes: reading it fills the page cache with clean
    /// file pages (ext4 zero-fills holes in the page cache) without storing any data.
    pub fn sparse_file(&self, name: &str, bytes: u64) -> anyhow::Result<PathBuf> {
        let path = self.mountpoint.join(name);
        std::fs::File::create(&path)?.set_len(bytes)?;
        Ok(path)
    }

    /// Reads `path` to /dev/null from inside `cg` (1 MiB blocks).
    pub fn read_in(&self, cg: &Cgroup, path: &Path) -> anyhow::Result<Duration> {
        let started = Instant::now();
        run(cg
            .command("dd")
            .arg(format!("if={}", path.display()))
            .args(["of=/dev/null", "bs=1M", "status=none"]))?;
        Ok(started.elapsed())
    }
}

impl Drop for Ext4Scratch {
    fn drop(&mut self) {
        for _ in 0..20 {
            match Command::new("umount").arg(&self.mountpoint).output() {
                Ok(o) if o.status.success() => break,
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Swap on a `mib` MiB zram device, once per boot (Neon VMs can have swap; without it,
/// anonymous memory above memory.high cannot be reclaimed at all).
pub fn ensure_zram_swap(mib: u64) -> anyhow::Result<()> {
    let swaps = std::fs::read_to_string("/proc/swaps").context("reading /proc/swaps")?;
    if swaps.lines().count() >= 2 {
        return Ok(());
    }
    run(Command::new("/bin/sh").arg("-c").arg(format!(
        "modprobe zram && echo {mib}M > /sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null && swapon /dev/zram0"
    )))
    .context("setting up zram swap")?;
    Ok(())
}

/// `main` of a guest-side driver binary: runs `body` on a 2-worker tokio runtime and maps its
/// result to the exit code, printing the error chain as `<name> failed: ...`.
pub fn run_driver<F>(name: &str, body: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name} failed: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issue's worked example: a 1 GiB allocation.
    #[test]
    fn sizes_for_one_gib() {
        let s = Sizes::for_allocation(GIB);
        assert_eq!(s.usable, 924 * MIB);
        assert_eq!(s.threshold, 823_551_590);
        assert_eq!(s.file_cache, 607 * MIB);
        assert_eq!(s.memory_high, 823_549_952);
    }

    #[test]
    fn sizes_for_two_gib_are_capped_by_the_max() {
        let s = Sizes::for_allocation(2 * GIB);
        assert_eq!(s.usable, 1948 * MIB);
        assert_eq!(s.threshold, 1_736_232_140);
        // min(1461, 1538) MiB, capped at neon.max_file_cache_size = 1 GiB.
        assert_eq!(s.file_cache, GIB);
        assert_eq!(s.memory_high % PAGE, 0);
    }

    #[test]
    fn parses_psi_and_flat_keyed_files() {
        let psi = parse_psi(
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\nfull avg10=0.75 avg60=0.10 avg300=0.00 total=567\n",
        )
        .unwrap();
        assert_eq!(psi.some.avg10, 1.5);
        assert_eq!(psi.full.total_us, 567);
        let kv = parse_flat_keyed("anon 10\nfile 20\nactive_anon 3\n");
        assert_eq!(kv["file"], 20);
        assert_eq!(kv.len(), 3);
    }

    #[test]
    fn strips_colour_and_finds_decisions() {
        let line = LogLine {
            at: Instant::now(),
            text: strip_ansi(
                "\u{1b}[2m2026\u{1b}[0m  INFO monitor::engine: decision decision={\"kind\":\"startup\",\"input\":\"start\"}",
            ),
        };
        assert!(line.text.starts_with("2026  INFO"));
        assert_eq!(line.decision().unwrap()["kind"], "startup");
    }
}
