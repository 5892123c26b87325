//! Postgres local file cache (LFC): reads `neon.max_file_cache_size` and resizes
//! `neon.file_cache_size_limit` with the reference monitor's exact SQL.
//!
//! Unlike the reference, every statement is bounded (a client-side timeout plus the server's
//! `statement_timeout`), a lost connection is re-opened by the next call with bounded
//! exponential backoff, and the connection string's password never reaches a log line or an
//! error: only [`redacted`] descriptions do. One [`FileCache`] lives as long as the daemon.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls, Row};
use tracing::{debug, info, warn};

/// One mebibyte: the unit of both `neon.*` file cache settings.
pub const MIB: u64 = 1 << 20;

/// `application_name` used when the connection string sets none (the reference's default).
pub const DEFAULT_APPLICATION_NAME: &str = "vm-monitor";

/// The reference's statements, byte for byte.
const SQL_MAX_SIZE: &str = "SELECT pg_size_bytes(current_setting('neon.max_file_cache_size'));";
const SQL_CURRENT_SIZE: &str =
    "SELECT pg_size_bytes(current_setting('neon.file_cache_size_limit'));";
const SQL_RELOAD: &str = "SELECT pg_reload_conf();";

/// Extra client-side wait beyond `statement_timeout`: the server's own (clearer) error then
/// normally wins, and the client-side timeout fires only when the server is unresponsive.
const CLIENT_GRACE: Duration = Duration::from_millis(500);

/// Time limits for talking to Postgres.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Opening a connection: TCP/socket connect, authentication and session setup.
    pub connect: Duration,
    /// Server-side `statement_timeout` of the session; the client waits this plus 500 ms.
    pub statement: Duration,
    /// Upper bound for one public call (`set_size` etc.), reconnecting included.
    pub call: Duration,
    /// First wait after a failed connection attempt; doubled on each further failure.
    pub backoff_min: Duration,
    /// Longest wait between connection attempts while Postgres stays unreachable.
    pub backoff_max: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            statement: Duration::from_secs(2),
            call: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl Timeouts {
    /// Rejects zero durations and a backoff range that is upside down.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, d) in [
            ("connect", self.connect),
            ("statement", self.statement),
            ("call", self.call),
            ("backoff_min", self.backoff_min),
            ("backoff_max", self.backoff_max),
        ] {
            if d.is_zero() {
                bail!("file cache timeout `{name}` must be greater than zero");
            }
        }
        if self.backoff_min > self.backoff_max {
            bail!(
                "file cache backoff_min ({:?}) must not exceed backoff_max ({:?})",
                self.backoff_min,
                self.backoff_max
            );
        }
        // Postgres takes statement_timeout in whole milliseconds.
        if self.statement.as_millis() == 0 || self.statement.as_millis() > i32::MAX as u128 {
            bail!(
                "file cache statement timeout {:?} is out of Postgres' range",
                self.statement
            );
        }
        Ok(())
    }
}

/// What a resize asked for and what Postgres was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetOutcome {
    /// The size the caller asked for, in bytes.
    pub requested_bytes: u64,
    /// The size written to `neon.file_cache_size_limit`: capped by the maximum, whole MiB.
    pub applied_bytes: u64,
    /// `neon.max_file_cache_size` in bytes, as read for this resize.
    pub max_bytes: u64,
    /// Whether the maximum lowered the request.
    pub capped: bool,
}

/// Caps `requested` at `max` and rounds down to a whole MiB, as the reference does.
pub fn cap_size(requested: u64, max: u64) -> SetOutcome {
    let capped = requested > max;
    SetOutcome {
        requested_bytes: requested,
        applied_bytes: requested.min(max) / MIB * MIB,
        max_bytes: max,
        capped,
    }
}

/// The `ALTER SYSTEM` statement for `mib` MiB. Utility statements take no bind parameters,
/// so the value is interpolated; it is an integer we computed, never user text.
pub fn alter_system_sql(mib: u64) -> String {
    format!("ALTER SYSTEM SET neon.file_cache_size_limit = {mib};")
}

/// Wait before the next connection attempt after `failures` consecutive failed ones:
/// `min · 2^(failures−1)`, at most `max`; zero before any failure.
pub fn backoff_delay(failures: u32, min: Duration, max: Duration) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    2u32.checked_pow(failures - 1)
        .and_then(|factor| min.checked_mul(factor))
        .map_or(max, |d| d.min(max))
}

/// A loggable description of `connstr` (host, port, dbname, user, application_name only);
/// never contains the password or any other option.
pub fn redacted(connstr: &str) -> String {
    match connstr.parse::<Config>() {
        Ok(config) => describe(&config),
        Err(_) => "<unparseable connection string>".to_string(),
    }
}

/// The fields of `config` that are safe to log.
fn describe(config: &Config) -> String {
    let mut parts = Vec::new();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("host={}", hosts.join(",")));
    }
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(dbname) = config.get_dbname() {
        parts.push(format!("dbname={dbname}"));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if let Some(app) = config.get_application_name() {
        parts.push(format!("application_name={app}"));
    }
    if parts.is_empty() {
        "<connection string with no host, port, dbname or user>".to_string()
    } else {
        parts.join(" ")
    }
}

/// Parses `connstr`; the error keeps the parser's reason but never quotes the string.
fn parse_config(connstr: &str) -> anyhow::Result<Config> {
    connstr.parse::<Config>().map_err(|e| {
        // The parser may quote the offending character ("... but got `x`"), which could be
        // part of the password: keep only the position.
        let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        let reason = reason.split(": expected").next().unwrap_or_default();
        anyhow!("invalid Postgres connection string (not shown, it may hold a password): {reason}")
    })
}

/// An open connection and the task driving it.
struct Conn {
    client: Client,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A driver stuck on an unresponsive server would otherwise live until TCP gives up.
        self.driver.abort();
    }
}

/// Consecutive failed connection attempts and when the next one may happen.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    next_at: Option<Instant>,
    down_since: Option<Instant>,
    last_error: Option<String>,
}

/// Why a statement failed, which decides whether the reference's one retry applies.
enum StmtError {
    /// No connection could be had (Postgres down, or backing off): retrying now is pointless.
    Unavailable(anyhow::Error),
    /// The connection broke under the statement: one retry on a fresh connection.
    Lost(anyhow::Error),
    /// Anything else (SQL error, timeout): returned as is.
    Failed(anyhow::Error),
}

impl StmtError {
    fn into_inner(self) -> anyhow::Error {
        match self {
            StmtError::Unavailable(e) | StmtError::Lost(e) | StmtError::Failed(e) => e,
        }
    }
}

/// The two kinds of statements we send.
#[derive(Clone, Copy)]
enum Stmt<'a> {
    /// A `SELECT` returning one bigint (a size in bytes).
    Bytes(&'a str),
    /// A statement whose result is ignored.
    Execute(&'a str),
}

impl Stmt<'_> {
    fn sql(&self) -> &str {
        match self {
            Stmt::Bytes(sql) | Stmt::Execute(sql) => sql,
        }
    }
}

/// The daemon's handle on Postgres' file cache settings; reconnects by itself.
pub struct FileCache {
    config: Config,
    /// [`describe`]d connection target, for logs and errors.
    target: String,
    timeouts: Timeouts,
    conn: Option<Conn>,
    generation: u64,
    backoff: Backoff,
}

impl std::fmt::Debug for FileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCache")
            .field("target", &self.target)
            .field("connected", &self.is_connected())
            .field("generation", &self.generation)
            .field("failures", &self.backoff.failures)
            .finish_non_exhaustive()
    }
}

impl FileCache {
    /// Parses `connstr` without connecting; the first call connects.
    pub fn new(connstr: &str, timeouts: Timeouts) -> anyhow::Result<FileCache> {
        timeouts.validate()?;
        let mut config = parse_config(connstr)?;
        if config.get_application_name().is_none() {
            config.application_name(DEFAULT_APPLICATION_NAME);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeouts.connect);
        }
        let target = describe(&config);
        Ok(FileCache {
            config,
            target,
            timeouts,
            conn: None,
            generation: 0,
            backoff: Backoff::default(),
        })
    }

    /// Parses `connstr` and connects now (NoTls, like the reference).
    pub async fn connect(connstr: &str, timeouts: Timeouts) -> anyhow::Result<FileCache> {
        let mut fc = FileCache::new(connstr, timeouts)?;
        let deadline = Instant::now() + fc.timeouts.call;
        fc.ensure_connected(deadline).await?;
        Ok(fc)
    }

    /// The redacted connection target (safe to log).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The limits in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Whether a connection is open and not known to be broken.
    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.client.is_closed())
    }

    /// Counts successful (re)connects; a change means Postgres may have restarted, so the
    /// engine should re-read the maximum and re-assert the size.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How long until the next connection attempt is allowed (`None`: no backoff pending).
    pub fn next_attempt_in(&self) -> Option<Duration> {
        let next_at = self.backoff.next_at?;
        let now = Instant::now();
        (next_at > now).then(|| next_at - now)
    }

    /// `neon.max_file_cache_size` in bytes (one retry on a fresh connection).
    pub async fn max_size(&mut self) -> anyhow::Result<u64> {
        let deadline = self.deadline();
        self.select_bytes_with_retry(SQL_MAX_SIZE, deadline)
            .await
            .context("failed to read neon.max_file_cache_size")
    }

    /// `neon.file_cache_size_limit` in bytes, as this session sees it (for logs).
    pub async fn current_size(&mut self) -> anyhow::Result<u64> {
        let deadline = self.deadline();
        self.select_bytes_with_retry(SQL_CURRENT_SIZE, deadline)
            .await
            .context("failed to read neon.file_cache_size_limit")
    }

    /// Sets `neon.file_cache_size_limit` to `bytes`, capped by the maximum and rounded down
    /// to a whole MiB, and asks Postgres to reload its configuration (which is asynchronous).
    pub async fn set_size(&mut self, bytes: u64) -> anyhow::Result<SetOutcome> {
        let deadline = self.deadline();
        let result = self.set_size_by(bytes, deadline).await;
        result.with_context(|| format!("failed to set file cache size to {} MiB", bytes / MIB))
    }

    /// The daemon's startup resize: always written, even if unchanged, to fail fast when the
    /// role lacks `ALTER SYSTEM` / `pg_reload_conf()` rights (as the reference does).
    pub async fn set_initial_size(&mut self, bytes: u64) -> anyhow::Result<SetOutcome> {
        match self.current_size().await {
            Ok(current) => info!(
                postgres = %self.target,
                current_mib = current / MIB,
                "file cache size before startup resize"
            ),
            Err(e) => debug!(
                postgres = %self.target,
                error = %format_args!("{e:#}"),
                "could not read the file cache size before startup resize"
            ),
        }
        self.set_size(bytes)
            .await
            .context("failed to set file cache size, possibly due to inadequate permissions")
    }

    /// Runs `sql` under the same timeouts as the real statements. For tests only (e.g. a
    /// `pg_sleep` that must turn into a timeout error); the daemon never calls it.
    #[doc(hidden)]
    pub async fn execute_for_tests(&mut self, sql: &str) -> anyhow::Result<()> {
        let deadline = self.deadline();
        self.run(Stmt::Execute(sql), deadline)
            .await
            .map(drop)
            .map_err(StmtError::into_inner)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeouts.call
    }

    async fn set_size_by(&mut self, bytes: u64, deadline: Instant) -> anyhow::Result<SetOutcome> {
        let max = self
            .select_bytes_with_retry(SQL_MAX_SIZE, deadline)
            .await
            .context("failed to read neon.max_file_cache_size")?;
        let outcome = cap_size(bytes, max);
        let mib = outcome.applied_bytes / MIB;
        // Not retried (as in the reference): ALTER SYSTEM may have taken effect already.
        self.run(Stmt::Execute(&alter_system_sql(mib)), deadline)
            .await
            .map_err(StmtError::into_inner)?;
        self.run(Stmt::Execute(SQL_RELOAD), deadline)
            .await
            .map_err(StmtError::into_inner)?;
        info!(
            postgres = %self.target,
            requested_mib = bytes / MIB,
            applied_mib = mib,
            max_mib = max / MIB,
            capped = outcome.capped,
            "set file cache size{}",
            if outcome.capped { " (capped by maximum size)" } else { "" }
        );
        Ok(outcome)
    }

    /// A size query with the reference's single retry on a fresh connection.
    async fn select_bytes_with_retry(
        &mut self,
        sql: &'static str,
        deadline: Instant,
    ) -> anyhow::Result<u64> {
        match self.select_bytes(sql, deadline).await {
            Ok(v) => Ok(v),
            Err(StmtError::Lost(first)) => {
                warn!(
                    postgres = %self.target,
                    error = %format_args!("{first:#}"),
                    "Postgres connection lost during a query; retrying on a fresh connection"
                );
                self.select_bytes(sql, deadline).await.map_err(|e| {
                    e.into_inner().context(format!(
                        "retry on a fresh connection failed (first: {first:#})"
                    ))
                })
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    async fn select_bytes(&mut self, sql: &str, deadline: Instant) -> Result<u64, StmtError> {
        let row = self.run(Stmt::Bytes(sql), deadline).await?;
        let decode = || -> anyhow::Result<u64> {
            let row = row.context("query returned no rows")?;
            let v: i64 = row.try_get(0).context("query returned no bigint")?;
            u64::try_from(v).with_context(|| format!("query returned a negative size ({v})"))
        };
        decode()
            .with_context(|| format!("`{sql}` failed"))
            .map_err(StmtError::Failed)
    }

    /// Runs one statement, connecting first if needed, within both timeouts and `deadline`.
    async fn run(&mut self, stmt: Stmt<'_>, deadline: Instant) -> Result<Option<Row>, StmtError> {
        self.ensure_connected(deadline)
            .await
            .map_err(StmtError::Unavailable)?;
        let sql = stmt.sql();
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(StmtError::Failed(anyhow!(
                "`{sql}` not sent: the call's {} ms budget is used up",
                self.timeouts.call.as_millis()
            )));
        }
        let limit = (self.timeouts.statement + CLIENT_GRACE).min(remaining);
        let Some(conn) = &self.conn else {
            return Err(StmtError::Unavailable(anyhow!("not connected to Postgres")));
        };
        let client = &conn.client;
        let answer = timeout(limit, async {
            match stmt {
                Stmt::Bytes(sql) => client.query_opt(sql, &[]).await,
                Stmt::Execute(sql) => client.execute(sql, &[]).await.map(|_| None),
            }
        })
        .await;
        match answer {
            Ok(Ok(row)) => Ok(row),
            Ok(Err(e)) => {
                let lost = e.is_closed() || client.is_closed();
                let server_timeout = e.code() == Some(&SqlState::QUERY_CANCELED);
                let mut err = anyhow::Error::new(e);
                if server_timeout {
                    err = err.context(format!(
                        "statement_timeout ({} ms) expired on the server",
                        self.timeouts.statement.as_millis()
                    ));
                }
                let err = err.context(format!("`{sql}` failed"));
                if lost {
                    self.conn = None;
                    Err(StmtError::Lost(err))
                } else {
                    Err(StmtError::Failed(err))
                }
            }
            Err(_elapsed) => {
                warn!(
                    postgres = %self.target,
                    sql,
                    timeout_ms = limit.as_millis() as u64,
                    "Postgres did not answer in time; dropping the connection"
                );
                self.discard_unresponsive();
                Err(StmtError::Failed(anyhow!(
                    "`{sql}` timed out: no answer from Postgres within {} ms",
                    limit.as_millis()
                )))
            }
        }
    }

    /// Drops a connection whose state is unknown after a client-side timeout (the next call
    /// reconnects) and asks the server to cancel the statement, best effort.
    fn discard_unresponsive(&mut self) {
        if let Some(conn) = self.conn.take() {
            let token = conn.client.cancel_token();
            let limit = self.timeouts.connect;
            tokio::spawn(async move {
                if let Ok(Err(e)) = timeout(limit, token.cancel_query(NoTls)).await {
                    debug!(error = %e, "could not cancel the timed-out statement");
                }
            });
        }
    }

    /// Makes sure a usable connection exists, honouring the backoff after failed attempts.
    async fn ensure_connected(&mut self, deadline: Instant) -> anyhow::Result<()> {
        if let Some(conn) = &self.conn {
            if !conn.client.is_closed() {
                return Ok(());
            }
            // The driver task has already logged why.
            self.conn = None;
            debug!(postgres = %self.target, "Postgres connection closed; reconnecting");
        }
        let now = Instant::now();
        if let Some(next_at) = self.backoff.next_at
            && next_at > now
        {
            // Fail fast rather than sleep: the caller (the engine) must stay responsive.
            return Err(anyhow!(
                "{}",
                self.backoff
                    .last_error
                    .as_deref()
                    .unwrap_or("unknown error")
            )
            .context(format!(
                "Postgres ({}) is unreachable: {} failed connection attempt(s), next in {} ms",
                self.target,
                self.backoff.failures,
                (next_at - now).as_millis()
            )));
        }
        let budget = self
            .timeouts
            .connect
            .min(deadline.saturating_duration_since(now));
        let opened = match timeout(budget, self.open()).await {
            Ok(result) => result,
            Err(_) => Err(anyhow!("no answer within {} ms", budget.as_millis())),
        };
        match opened {
            Ok(conn) => {
                self.conn = Some(conn);
                self.generation += 1;
                let Backoff {
                    failures,
                    down_since,
                    ..
                } = std::mem::take(&mut self.backoff);
                if failures == 0 {
                    info!(postgres = %self.target, generation = self.generation, "connected to Postgres");
                } else {
                    info!(
                        postgres = %self.target,
                        generation = self.generation,
                        failed_attempts = failures,
                        down_for_ms = down_since.map_or(0, |t| t.elapsed().as_millis() as u64),
                        "reconnected to Postgres"
                    );
                }
                Ok(())
            }
            Err(e) => {
                let e = e.context(format!("failed to connect to Postgres ({})", self.target));
                self.record_failure(now, &e);
                Err(e)
            }
        }
    }

    /// Counts a failed attempt, schedules the next one, and logs without spamming: the first
    /// failure, then only when the count reaches a power of two.
    fn record_failure(&mut self, now: Instant, e: &anyhow::Error) {
        let b = &mut self.backoff;
        b.failures = b.failures.saturating_add(1);
        let delay = backoff_delay(
            b.failures,
            self.timeouts.backoff_min,
            self.timeouts.backoff_max,
        );
        b.next_at = Some(now + delay);
        let down_since = *b.down_since.get_or_insert(now);
        b.last_error = Some(format!("{e:#}"));
        if b.failures.is_power_of_two() {
            warn!(
                postgres = %self.target,
                failures = b.failures,
                down_for_ms = now.duration_since(down_since).as_millis() as u64,
                retry_in_ms = delay.as_millis() as u64,
                error = %format_args!("{e:#}"),
                "Postgres unreachable"
            );
        } else {
            debug!(postgres = %self.target, failures = b.failures, "Postgres still unreachable");
        }
    }

    /// Opens a connection, spawns its driver and sets the session's `statement_timeout`.
    async fn open(&self) -> anyhow::Result<Conn> {
        let (client, connection) = self.config.connect(NoTls).await?;
        let postgres = self.target.clone();
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                let e = anyhow::Error::new(e);
                warn!(postgres = %postgres, error = %format_args!("{e:#}"), "Postgres connection error");
            }
        });
        let conn = Conn { client, driver };
        let ms = self.timeouts.statement.as_millis();
        conn.client
            .batch_execute(&format!("SET statement_timeout = {ms}"))
            .await
            .context("failed to set statement_timeout")?;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_key_value_connstr() {
        let s = redacted(
            "host=localhost port=5432 dbname=postgres user=cloud_admin password=s3cret \
             sslmode=disable application_name=vm-monitor",
        );
        assert_eq!(
            s,
            "host=localhost port=5432 dbname=postgres user=cloud_admin application_name=vm-monitor"
        );
    }

    #[test]
    fn redacts_url_connstr() {
        let s = redacted("postgresql://cloud_admin:s3cret@127.0.0.1:6543/postgres?sslmode=disable");
        assert!(!s.contains("s3cret"), "{s}");
        assert_eq!(
            s,
            "host=127.0.0.1 port=6543 dbname=postgres user=cloud_admin"
        );
    }

    #[test]
    fn redacts_unix_socket_and_quoted_password() {
        let s = redacted("host=/var/run/postgresql user=u password='a b s3cret'");
        assert_eq!(s, "host=/var/run/postgresql user=u");
    }

    #[test]
    fn unparseable_connstr_is_not_echoed() {
        assert_eq!(
            redacted("password='s3cret"),
            "<unparseable connection string>"
        );
        for bad in [
            "password='s3cret",
            "password=s3cret port=x",
            "password=s3cret sslmode",
            "password=s3cret bogus=1",
            "password=s3cret x s3cret",
        ] {
            let err = FileCache::new(bad, Timeouts::default()).unwrap_err();
            let text = format!("{err:#} {err:?}");
            assert!(!text.contains("s3cret"), "{text}");
            assert!(
                text.contains("invalid Postgres connection string"),
                "{text}"
            );
            assert!(!text.contains("but got"), "{text}");
        }
    }

    #[test]
    fn new_fills_in_application_name_without_connecting() {
        let fc =
            FileCache::new("host=localhost user=u password=s3cret", Timeouts::default()).unwrap();
        assert_eq!(
            fc.target(),
            "host=localhost user=u application_name=vm-monitor"
        );
        assert!(!fc.is_connected());
        assert_eq!(fc.generation(), 0);
        assert_eq!(fc.next_attempt_in(), None);
        assert!(!format!("{fc:?}").contains("s3cret"));
    }

    #[test]
    fn caps_and_rounds_down_to_mib() {
        let max = 512 * MIB;
        assert_eq!(
            cap_size(300 * MIB, max),
            SetOutcome {
                requested_bytes: 300 * MIB,
                applied_bytes: 300 * MIB,
                max_bytes: max,
                capped: false
            }
        );
        let o = cap_size(300 * MIB + MIB - 1, max);
        assert_eq!((o.applied_bytes, o.capped), (300 * MIB, false));
        let o = cap_size(2048 * MIB, max);
        assert_eq!((o.applied_bytes, o.capped), (512 * MIB, true));
        let o = cap_size(max, max);
        assert_eq!((o.applied_bytes, o.capped), (max, false));
        // LFC disabled (max 0): everything is capped to 0.
        let o = cap_size(100 * MIB, 0);
        assert_eq!((o.applied_bytes, o.capped), (0, true));
        // A maximum that is not a whole MiB still yields whole MiB.
        let o = cap_size(u64::MAX, 10 * MIB + 5);
        assert_eq!((o.applied_bytes, o.capped), (10 * MIB, true));
    }

    #[test]
    fn alter_system_sql_is_the_reference_text() {
        assert_eq!(
            alter_system_sql(300),
            "ALTER SYSTEM SET neon.file_cache_size_limit = 300;"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let seq: Vec<u64> = (0..10)
            .map(|n| backoff_delay(n, min, max).as_millis() as u64)
            .collect();
        assert_eq!(seq, [0, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        // No overflow however long Postgres stays down.
        assert_eq!(backoff_delay(40, min, max), max);
        assert_eq!(backoff_delay(u32::MAX, min, max), max);
    }

    #[test]
    fn file_cache_can_move_into_a_task() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<FileCache>();
    }

    #[test]
    fn timeouts_are_validated() {
        assert!(Timeouts::default().validate().is_ok());
        let zero = Timeouts {
            statement: Duration::ZERO,
            ..Timeouts::default()
        };
        assert!(zero.validate().is_err());
        let inverted = Timeouts {
            backoff_min: Duration::from_secs(10),
            ..Timeouts::default()
        };
        assert!(inverted.validate().is_err());
        let sub_ms = Timeouts {
            statement: Duration::from_micros(10),
            ..Timeouts::default()
        };
        assert!(sub_ms.validate().is_err());
    }
}
