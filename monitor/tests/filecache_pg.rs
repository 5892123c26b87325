//! The file cache adapter against a real PostgreSQL 15 with the test-only extension
//! (`tests/pg_ext`), which defines the two `neon.*` settings with MB units like Neon's.
//!
//! Each test starts a private cluster (initdb + pg_ctl as user `postgres`, loopback only) and
//! stops it on drop. Needs root, postgresql-15 and postgresql-server-dev-15:
//! `cargo test -p monitor --test filecache_pg -- --ignored`.

// A test: unwrapping is how it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use monitor::filecache::{FileCache, MIB, SetOutcome, Timeouts};
use tokio::time::{Instant, sleep};
use tokio_postgres::{Client, NoTls};
use tracing_subscriber::fmt::MakeWriter;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_CONFIG: &str = "/usr/lib/postgresql/15/bin/pg_config";
/// Password of the clusters' `postgres` role over TCP (scram-sha-256).
const PASSWORD: &str = "pw-for-tests";
const MAX_MB: u64 = 512;

// ---------------------------------------------------------------------------------------
// Harness: the extension build and a private cluster.

/// The built extension, once per test binary.
fn extension() -> &'static Path {
    static SO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match SO.get_or_init(build_extension) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

fn build_extension() -> Result<PathBuf, String> {
    if !Path::new(PG_CONFIG).is_file() {
        return Err(format!(
            "{PG_CONFIG} is missing: install postgresql-server-dev-15 (`cargo xtask setup` does)"
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pg_ext/build.sh");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pg_ext");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&out_dir)
        .env("PG_CONFIG", PG_CONFIG)
        .output()
        .map_err(|e| format!("could not run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "building the test extension failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let so = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !so.is_file() {
        return Err(format!(
            "{} printed {}, which does not exist",
            script.display(),
            so.display()
        ));
    }
    Ok(so)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A command run as user `postgres`.
fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")]);
    cmd
}

/// Where clusters live: under `CARGO_TARGET_TMPDIR` when user `postgres` can reach it (every
/// parent directory searchable), else in the system's temp directory.
fn cluster_base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let preferred = Path::new(env!("CARGO_TARGET_TMPDIR")).join("filecache_pg");
        std::fs::create_dir_all(&preferred).unwrap();
        let reachable = Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-x"])
            .arg(&preferred)
            .status()
            .is_ok_and(|s| s.success());
        if reachable {
            preferred
        } else {
            std::env::temp_dir().join("vm-monitor-filecache_pg")
        }
    })
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A private PostgreSQL 15 cluster; stopped and removed on drop.
struct Pg {
    root: PathBuf,
    data: PathBuf,
    /// Separate only when the natural one would be too long for a unix socket path.
    sock: PathBuf,
    log: PathBuf,
    port: u16,
}

impl Pg {
    /// initdb + start; `with_extension` loads the test extension by absolute path.
    fn start(name: &str, with_extension: bool) -> Pg {
        assert_eq!(
            // SAFETY: geteuid(2) cannot fail and touches no memory.
            unsafe { libc::geteuid() },
            0,
            "these tests run Postgres as user `postgres` through runuser and need root"
        );
        assert!(
            Path::new(PG_BIN).join("initdb").is_file(),
            "{PG_BIN}/initdb is missing: install postgresql-15 (`cargo xtask setup` does)"
        );
        let so = with_extension.then(extension);

        let pid = std::process::id();
        let root = cluster_base().join(format!("{name}-{pid}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        // Postgres loads it by absolute path; a copy in the cluster's directory is readable
        // by `postgres` even where the build directory is not.
        let so = so.map(|built| {
            let copy = root.join("neon_lfc_test.so");
            std::fs::copy(built, &copy).unwrap();
            copy
        });
        let port = free_port();
        let mut sock = root.join("sock");
        if sock.join(format!(".s.PGSQL.{port}")).as_os_str().len() > 100 {
            sock = std::env::temp_dir().join(format!("fcpg-{name}-{pid}"));
        }
        let _ = std::fs::remove_dir_all(&sock);
        std::fs::create_dir_all(&sock).unwrap();

        let uid_gid = |flag: &str| -> u32 {
            let out = run(Command::new("id").args([flag, "postgres"]));
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (uid_gid("-u"), uid_gid("-g"));
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        for dir in [&root, &sock, &pwfile] {
            chown(dir, Some(uid), Some(gid)).unwrap();
        }
        let data = root.join("data");
        run(as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C"]));

        // In postgresql.conf, not `-o -c`: a command-line value would override ALTER SYSTEM.
        let mut conf = format!(
            "\n# vm-monitor filecache_pg test\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{}'\n\
             neon.max_file_cache_size = '{MAX_MB}MB'\n\
             shared_buffers = 16MB\n\
             max_connections = 20\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            quote(&sock)
        );
        match so {
            Some(so) => conf.push_str(&format!("shared_preload_libraries = '{}'\n", quote(&so))),
            // Stock Postgres lets ALTER SYSTEM set a custom name only once a placeholder exists.
            None => conf.push_str("neon.file_cache_size_limit = '0'\n"),
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_path, text).unwrap();

        let pg = Pg {
            log: root.join("server.log"),
            root,
            data,
            sock,
            port,
        };
        pg.start_server();
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .unwrap()
    }

    fn start_server(&self) {
        let log = self.log.display().to_string();
        let out = self.pg_ctl(&["-l", &log, "-w", "-t", "60", "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start failed ({}): {}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// A fast shutdown: sessions are terminated, as when compute_ctl stops Postgres.
    fn stop_server(&self) {
        let out = self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]);
        assert!(out.status.success(), "pg_ctl stop failed: {out:?}");
    }

    /// Connection string for the file cache, over TCP with a password.
    fn connstr(&self, user: &str, password: &str, app: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname=postgres user={user} password={password} \
             application_name={app} sslmode=disable",
            self.port
        )
    }

    /// A superuser session over the unix socket, for setup and checks.
    async fn admin(&self) -> Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(&self.sock)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect(NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    fn postmaster_pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap();
        text.lines().next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- server log tail ({}) ---\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "-t", "30", "stop"]);
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.sock);
    }
}

/// A path inside a single-quoted postgresql.conf value.
fn quote(path: &Path) -> String {
    path.display().to_string().replace('\'', "''")
}

/// Sends `sig` to `pid` and sends SIGCONT on drop, so a failing test never leaves Postgres
/// stopped.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        assert_eq!(
            // SAFETY: kill(2) with a pid of a Postgres process this test started.
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP {pid}"
        );
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

async fn show_limit(admin: &Client) -> String {
    let row = admin
        .query_one("SHOW neon.file_cache_size_limit", &[])
        .await
        .unwrap();
    row.get(0)
}

/// Waits for the (asynchronous) reload to reach the admin session.
async fn wait_for_limit(admin: &Client, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = show_limit(admin).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "neon.file_cache_size_limit stayed {got:?}, wanted {want:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

async fn limit_bytes(admin: &Client) -> i64 {
    admin
        .query_one(
            "SELECT pg_size_bytes(current_setting('neon.file_cache_size_limit'))",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every log line of this test binary, from one global subscriber (thread-local ones miss
/// lines: tracing caches per-callsite interest across threads).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn global() -> &'static Logs {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(logs.clone())
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            logs
        })
    }

    /// Starts capturing (idempotent).
    fn capture() {
        Logs::global();
    }

    /// The adapter's lines for one test: each carries `application_name=<app>` in its
    /// `postgres=` field.
    fn of(app: &str) -> String {
        let all = String::from_utf8_lossy(&Logs::global().0.lock().unwrap()).into_owned();
        let tag = format!("application_name={app}");
        all.lines()
            .filter(|l| l.contains(&tag))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

fn chain(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

// ---------------------------------------------------------------------------------------
// With the extension: sizes, units, the cap and the check hook.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn set_size_writes_whole_megabytes_that_postgres_reads_back() {
    let pg = Pg::start("set_size", true);
    let admin = pg.admin().await;
    let connstr = pg.connstr("postgres", PASSWORD, "fc-set-size");
    let mut fc = FileCache::connect(&connstr, Timeouts::default())
        .await
        .unwrap();
    assert_eq!(fc.max_size().await.unwrap(), MAX_MB * MIB);

    let out = fc.set_size(300 * MIB).await.unwrap();
    assert_eq!(
        out,
        SetOutcome {
            requested_bytes: 300 * MIB,
            applied_bytes: 300 * MIB,
            max_bytes: MAX_MB * MIB,
            capped: false,
        }
    );
    wait_for_limit(&admin, "300MB").await;
    assert_eq!(limit_bytes(&admin).await, 300 << 20);

    // The adapter's own session sees the reload too (for its logs).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fc.current_size().await.unwrap() != 300 * MIB {
        assert!(
            Instant::now() < deadline,
            "current_size never became 300 MiB"
        );
        sleep(Duration::from_millis(50)).await;
    }

    // Not a whole MiB: rounded down.
    let out = fc.set_size(200 * MIB + 12345).await.unwrap();
    assert_eq!((out.applied_bytes, out.capped), (200 * MIB, false));
    wait_for_limit(&admin, "200MB").await;
    assert_eq!(fc.generation(), 1, "one connection throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn set_size_is_capped_by_max_file_cache_size() {
    let pg = Pg::start("capped", true);
    let admin = pg.admin().await;
    let connstr = pg.connstr("postgres", PASSWORD, "fc-capped");
    let mut fc = FileCache::connect(&connstr, Timeouts::default())
        .await
        .unwrap();

    let out = fc.set_size(2048 * MIB).await.unwrap();
    assert_eq!(
        out,
        SetOutcome {
            requested_bytes: 2048 * MIB,
            applied_bytes: MAX_MB * MIB,
            max_bytes: MAX_MB * MIB,
            capped: true,
        }
    );
    wait_for_limit(&admin, "512MB").await;
    assert_eq!(limit_bytes(&admin).await, 512 << 20);
    // ALTER SYSTEM persisted it: a restart keeps the size.
    let auto = std::fs::read_to_string(pg.data.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("neon.file_cache_size_limit = '512'"),
        "postgresql.auto.conf:\n{auto}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn extension_rejects_a_limit_above_the_max_like_neons() {
    let pg = Pg::start("check_hook", true);
    let admin = pg.admin().await;
    let max: String = admin
        .query_one("SHOW neon.max_file_cache_size", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(max, "512MB");

    for too_big in ["513", "'1GB'"] {
        let err = admin
            .batch_execute(&format!(
                "ALTER SYSTEM SET neon.file_cache_size_limit = {too_big}"
            ))
            .await
            .unwrap_err();
        let db = err.as_db_error().expect("a server error");
        assert_eq!(
            db.message(),
            "neon.file_cache_size_limit can not be larger than neon.max_file_cache_size"
        );
    }
    // The maximum itself is accepted, and it is a reload-time (SIGHUP) setting.
    admin
        .batch_execute("ALTER SYSTEM SET neon.file_cache_size_limit = 512")
        .await
        .unwrap();
    let err = admin
        .batch_execute("SET neon.file_cache_size_limit = 100")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("cannot be changed now"),
        "{err:?}"
    );
    // The maximum can only change at server start.
    let err = admin
        .batch_execute("SET neon.max_file_cache_size = 100")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("cannot be changed"),
        "{err:?}"
    );
}

/// Why the extension exists: stock Postgres keeps `neon.*` as unit-less strings, so the
/// reference's `pg_size_bytes(current_setting(...))` reads "300" as 300 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn stock_postgres_reads_a_unitless_placeholder_as_bytes() {
    let pg = Pg::start("stock", false);
    let admin = pg.admin().await;
    let connstr = pg.connstr("postgres", PASSWORD, "fc-stock");
    let mut fc = FileCache::connect(&connstr, Timeouts::default())
        .await
        .unwrap();

    let out = fc.set_size(300 * MIB).await.unwrap();
    assert_eq!(out.applied_bytes, 300 * MIB);
    wait_for_limit(&admin, "300").await;
    assert_eq!(limit_bytes(&admin).await, 300, "300 *bytes*, not 300 MB");
    assert_eq!(fc.current_size().await.unwrap(), 300);
}

// ---------------------------------------------------------------------------------------
// Failures: Postgres down, slow, hung; permissions; secrets.

// Current-thread: the driver cannot notice the shutdown while pg_ctl blocks the thread, so
// the next query meets the dead connection and takes the reference's retry path.
#[tokio::test]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn reconnects_after_postgres_restarts() {
    Logs::capture();
    let pg = Pg::start("restart", true);
    let timeouts = Timeouts {
        call: Duration::from_secs(3),
        ..Timeouts::default()
    };
    let connstr = pg.connstr("postgres", PASSWORD, "fc-restart");
    let mut fc = FileCache::connect(&connstr, timeouts).await.unwrap();
    fc.set_size(100 * MIB).await.unwrap();
    assert_eq!(fc.generation(), 1);

    pg.stop_server();
    for _ in 0..3 {
        let t = Instant::now();
        let err = fc.set_size(200 * MIB).await.unwrap_err();
        assert!(
            t.elapsed() < timeouts.call + Duration::from_secs(1),
            "took {:?}: {err:#}",
            t.elapsed()
        );
        assert!(
            chain(&err).contains("failed to set file cache size to 200 MiB"),
            "{err:#}"
        );
        assert!(!chain(&err).contains(PASSWORD), "{err:#}");
        assert!(!fc.is_connected());
    }

    pg.start_server();
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        match fc.set_size(200 * MIB).await {
            Ok(out) => break out,
            Err(e) => {
                assert!(Instant::now() < deadline, "never reconnected: {e:#}");
                sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(out.applied_bytes, 200 * MIB);
    assert_eq!(fc.generation(), 2, "the same FileCache reconnected once");
    assert!(fc.is_connected());
    let admin = pg.admin().await;
    wait_for_limit(&admin, "200MB").await;
    let logs = Logs::of("fc-restart");
    assert!(logs.contains("reconnected to Postgres"), "{logs}");
    assert!(!logs.contains(PASSWORD), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn slow_statement_hits_the_server_statement_timeout() {
    let pg = Pg::start("stmt_timeout", true);
    let timeouts = Timeouts {
        statement: Duration::from_secs(1),
        ..Timeouts::default()
    };
    let connstr = pg.connstr("postgres", PASSWORD, "fc-slow");
    let mut fc = FileCache::connect(&connstr, timeouts).await.unwrap();

    let t = Instant::now();
    let err = fc
        .execute_for_tests("SELECT pg_sleep(30)")
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    let text = chain(&err);
    assert!(
        text.contains("statement_timeout (1000 ms) expired on the server"),
        "{text}"
    );
    assert!(
        text.contains("canceling statement due to statement timeout"),
        "{text}"
    );

    // The session survives a server-side timeout: same connection, next call works.
    assert!(fc.is_connected());
    fc.set_size(64 * MIB).await.unwrap();
    assert_eq!(fc.generation(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn hung_postgres_times_out_instead_of_hanging() {
    let pg = Pg::start("hung", true);
    let admin = pg.admin().await;
    let timeouts = Timeouts {
        // Generous enough for a loaded 2-core machine, far below "hangs forever".
        connect: Duration::from_secs(2),
        statement: Duration::from_secs(1),
        call: Duration::from_secs(5),
        ..Timeouts::default()
    };
    let connstr = pg.connstr("postgres", PASSWORD, "fc-hung");
    let mut fc = FileCache::connect(&connstr, timeouts).await.unwrap();
    fc.set_size(100 * MIB).await.unwrap();

    // Our backend stops answering (the server-side timeout cannot fire in a stopped process).
    let backend: i32 = admin
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'fc-hung'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let stopped_backend = Stopped::new(backend);
    let t = Instant::now();
    let err = fc.set_size(200 * MIB).await.unwrap_err();
    let took = t.elapsed();
    // Client-side limit: statement_timeout + 500 ms.
    assert!(took < Duration::from_secs(4), "took {took:?}: {err:#}");
    assert!(
        chain(&err).contains("timed out: no answer from Postgres within"),
        "{err:#}"
    );
    assert!(!fc.is_connected(), "an unresponsive connection is dropped");

    // The whole server stops answering: even connecting times out.
    let stopped_postmaster = Stopped::new(pg.postmaster_pid());
    let t = Instant::now();
    let err = fc.set_size(200 * MIB).await.unwrap_err();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}: {err:#}");
    assert!(
        chain(&err).contains("failed to connect to Postgres"),
        "{err:#}"
    );

    drop(stopped_postmaster);
    drop(stopped_backend);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match fc.set_size(200 * MIB).await {
            Ok(out) => {
                assert_eq!(out.applied_bytes, 200 * MIB);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "never recovered: {e:#}");
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(fc.generation() >= 2);
    wait_for_limit(&admin, "200MB").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn startup_resize_fails_clearly_without_rights_and_works_with_grants() {
    let pg = Pg::start("grants", true);
    let admin = pg.admin().await;
    admin
        .batch_execute("CREATE ROLE lfc_user LOGIN PASSWORD 'lfc-pw'")
        .await
        .unwrap();
    let connstr = pg.connstr("lfc_user", "lfc-pw", "fc-grants");
    let mut fc = FileCache::connect(&connstr, Timeouts::default())
        .await
        .unwrap();

    let err = fc.set_initial_size(128 * MIB).await.unwrap_err();
    let text = chain(&err);
    assert!(
        text.starts_with("failed to set file cache size, possibly due to inadequate permissions"),
        "{text}"
    );
    assert!(text.contains("permission denied"), "{text}");
    assert!(!text.contains("lfc-pw"), "{text}");

    // PG15+: the two rights the reference's role needs, without superuser.
    admin
        .batch_execute(
            "GRANT ALTER SYSTEM ON PARAMETER neon.file_cache_size_limit TO lfc_user;
             GRANT EXECUTE ON FUNCTION pg_reload_conf() TO lfc_user;",
        )
        .await
        .unwrap();
    let out = fc.set_initial_size(128 * MIB).await.unwrap();
    assert_eq!(out.applied_bytes, 128 * MIB);
    wait_for_limit(&admin, "128MB").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, postgresql-15 and postgresql-server-dev-15"]
async fn wrong_password_is_reported_without_echoing_it() {
    let pg = Pg::start("wrong_pw", true);
    let connstr = pg.connstr("postgres", "s3cret-wrong", "fc-wrong-pw");
    let err = FileCache::connect(&connstr, Timeouts::default())
        .await
        .unwrap_err();
    let text = format!("{err:#} {err:?}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(text.contains(&format!("port={}", pg.port)), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

/// Runs without Postgres: connecting to a port nobody listens on.
#[tokio::test]
async fn password_never_appears_in_connection_errors() {
    Logs::capture();
    let port = free_port();
    for connstr in [
        format!(
            "host=127.0.0.1 port={port} user=cloud_admin password=s3cret dbname=postgres \
             application_name=fc-secret"
        ),
        format!(
            "postgresql://cloud_admin:s3cret@127.0.0.1:{port}/postgres?sslmode=disable\
             &application_name=fc-secret"
        ),
    ] {
        let err = FileCache::connect(&connstr, Timeouts::default())
            .await
            .unwrap_err();
        let text = format!("{err:#} {err:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains(&format!("host=127.0.0.1 port={port}")),
            "{text}"
        );
        assert!(text.contains("failed to connect to Postgres"), "{text}");

        // While backing off, calls fail fast and still say nothing secret.
        let mut fc = FileCache::new(&connstr, Timeouts::default()).unwrap();
        let first = fc.set_size(MIB).await.unwrap_err();
        let t = Instant::now();
        let second = fc.set_size(MIB).await.unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "backoff must not sleep"
        );
        let text = format!("{first:#} {first:?} {second:#} {second:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            chain(&second).contains("1 failed connection attempt(s), next in"),
            "{second:#}"
        );
        assert!(fc.next_attempt_in().is_some());
    }
    let logs = Logs::of("fc-secret");
    assert!(logs.contains("Postgres unreachable"), "{logs}");
    assert!(!logs.contains("s3cret"), "{logs}");
}

/// Runs without Postgres: a long outage logs the first failures, then ever more rarely.
#[tokio::test]
async fn outage_logs_without_spam() {
    Logs::capture();
    let timeouts = Timeouts {
        backoff_min: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        ..Timeouts::default()
    };
    let connstr = format!(
        "host=127.0.0.1 port={} user=u password=s3cret application_name=fc-outage",
        free_port()
    );
    let mut fc = FileCache::new(&connstr, timeouts).unwrap();
    for _ in 0..40 {
        assert!(fc.set_size(MIB).await.is_err());
        sleep(Duration::from_millis(2)).await;
    }
    let logs = Logs::of("fc-outage");
    let warnings = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("Postgres unreachable"))
        .count();
    // Attempts 1, 2, 4, 8, 16 and 32 (each attempt is one backoff step).
    assert_eq!(warnings, 6, "{logs}");
    assert!(logs.contains("failures=32"), "{logs}");
    assert!(!logs.contains("s3cret"), "{logs}");
}
