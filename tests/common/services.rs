//! Real services for the integration tests: a tansu broker process on a
//! free port, a fresh Postgres database, and a `keywatch run` process.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `name` in a directory of PATH, if there is one.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// The tansu binary: `KEYWATCH_TANSU`, else on PATH, else cargo's bin dir.
pub fn tansu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWATCH_TANSU") {
        return p.into();
    }
    if let Some(p) = on_path("tansu") {
        return p;
    }
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap()));
    let p = Path::new(&home).join("bin/tansu");
    assert!(
        p.is_file(),
        "tansu is not installed: run `bash scripts/install-tansu` (scripts/test does)"
    );
    p
}

/// A tansu broker process, stopped on drop: in-memory storage, or a
/// SQLite file that outlives the process ([`Broker::start_persistent`]).
pub struct Broker {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    port: u16,
    /// The directory of the SQLite file, for a persistent broker.
    data: Option<PathBuf>,
    log: PathBuf,
}

impl Broker {
    /// Starts a broker with in-memory storage on a free port and waits
    /// until it accepts connections.
    pub fn start(log: &Path) -> Broker {
        Self::launch(free_port(), None, log)
    }

    /// Starts a broker whose topics, records and groups live in a SQLite
    /// file in `data`, so that [`Broker::restart`] finds them again.
    pub fn start_persistent(data: &Path, log: &Path) -> Broker {
        std::fs::create_dir_all(data).unwrap();
        Self::launch(free_port(), Some(data.to_path_buf()), log)
    }

    fn launch(port: u16, data: Option<PathBuf>, log: &Path) -> Broker {
        let url = format!("tcp://127.0.0.1:{port}");
        // tansu reads a sqlite:// path relative to its working directory.
        let storage = match data {
            Some(_) => "sqlite://tansu.db",
            None => "memory://tansu/",
        };
        let mut cmd = Command::new(tansu_binary());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            storage,
        ]);
        if let Some(d) = &data {
            cmd.current_dir(d);
        }
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("starting tansu");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not start listening on {addr}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker {
            child: Some(child),
            addr,
            port,
            data,
            log: log.to_path_buf(),
        }
    }

    /// Kills the broker (SIGKILL: no clean shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the killed broker again on the same port and storage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill");
        assert!(self.data.is_some(), "an in-memory broker restarts empty");
        let mut again = Self::launch(self.port, self.data.clone(), &self.log);
        self.child = again.child.take();
    }

    /// Creates a topic with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let res = rt
            .block_on(admin.create_topics([&topic], &AdminOptions::new()))
            .expect("create_topics");
        for r in res {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
    }

    /// Produces `lines` to `topic`, keyed by `user_id`, each to the partition
    /// [`partition_of`] picks and stamped with [`message_times`]; waits until
    /// all are acknowledged.
    pub fn produce(&self, topic: &str, partitions: i32, lines: &[String]) {
        self.produce_at(topic, partitions, lines, &message_times(lines));
    }

    /// [`Broker::produce`] with the messages' timestamps given.
    pub fn produce_at(&self, topic: &str, partitions: i32, lines: &[String], times: &[i64]) {
        assert!(times.len() >= lines.len());
        let keys: Vec<String> = lines.iter().map(|l| user_of(l)).collect();
        let messages = lines
            .iter()
            .zip(&keys)
            .zip(times)
            .map(|((line, key), &at)| Message {
                partition: partition_of(key, partitions),
                key,
                payload: line.as_bytes(),
                timestamp: at,
            });
        self.produce_messages(topic, messages);
    }

    /// Produces `messages` to `topic` as they are (partition, key and
    /// timestamp given); waits until all are acknowledged.
    pub fn produce_messages<'m>(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = Message<'m>>,
    ) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("linger.ms", "20")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .unwrap();
        for m in messages {
            let mut rec = BaseRecord::to(topic)
                .payload(m.payload)
                .key(m.key)
                .partition(m.partition)
                .timestamp(m.timestamp);
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((e, r)) => {
                        assert!(
                            matches!(
                                e,
                                rdkafka::error::KafkaError::MessageProduction(
                                    rdkafka::types::RDKafkaErrorCode::QueueFull
                                )
                            ),
                            "{e}"
                        );
                        producer.poll(Duration::from_millis(10));
                        rec = r;
                    }
                }
            }
        }
        producer
            .flush(Duration::from_secs(120))
            .expect("flushing the producer");
    }
}

/// One Kafka message for [`Broker::produce_messages`].
pub struct Message<'m> {
    /// The partition it goes to.
    pub partition: i32,
    /// Its key.
    pub key: &'m str,
    /// Its bytes.
    pub payload: &'m [u8],
    /// Its timestamp (Unix milliseconds).
    pub timestamp: i64,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Kafka timestamp of each line, as a gateway's log shipper stamps it:
/// the time it logged the request, which never runs ahead of the requests
/// it has seen. A line whose `ts` is past 2100 (a hostile record) or that
/// has none gets the shipper's clock as it stands.
pub fn message_times(lines: &[String]) -> Vec<i64> {
    const PLAUSIBLE: i64 = 4_102_444_800_000; // 2100-01-01
    let mut clock = 1_795_392_000_000; // 2026-11-23, the simulator's start
    lines
        .iter()
        .map(|line| {
            let ts = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| {
                    v.get("ts")?
                        .as_str()
                        .and_then(detectors::time::parse_rfc3339)
                });
            if let Some(t) = ts.filter(|&t| t < PLAUSIBLE) {
                clock = clock.max(t);
            }
            clock
        })
        .collect()
}

/// The `user_id` of a record line (`""` when it has none: poison records).
pub fn user_of(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| {
            v.get("user_id")
                .and_then(|u| u.as_str())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// The partition a user's records go to (the tests' own partitioner, so the
/// expected results can be computed per partition).
pub fn partition_of(user: &str, partitions: i32) -> i32 {
    (detectors::hash::stable_hash(99, user.as_bytes()) % partitions as u64) as i32
}

/// A Postgres server of the test's own (initdb into a scratch directory,
/// on a free port), so that a test can stop and start a real server
/// without touching the machine's. Stopped and removed on drop.
pub struct PgServer {
    dir: PathBuf,
    port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub admin_url: String,
}

impl PgServer {
    /// Creates and starts a server in `dir` (which must not exist yet).
    pub fn start(dir: &Path) -> PgServer {
        std::fs::create_dir_all(dir).unwrap();
        if as_root() {
            // Postgres refuses to run as root: the files are its user's.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown {}", dir.display());
        }
        let data = dir.join("data");
        pg_tool(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "--no-instructions",
            ],
        );
        let port = free_port();
        let server = PgServer {
            dir: dir.to_path_buf(),
            port,
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        server.up();
        server
    }

    /// Starts the stopped server and waits until it accepts connections.
    pub fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            self.port,
            self.dir.display()
        );
        pg_tool(
            "pg_ctl",
            &[
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-l",
                self.dir.join("server.log").to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server as a crash or a failover does: at once (`immediate`),
    /// every connection cut; it recovers from its log when started again.
    pub fn down(&self) {
        pg_tool(
            "pg_ctl",
            &[
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Not fatal (it may be down already), but as the postgres user:
        // pg_ctl run as root refuses, and the server would outlive the test.
        let data = self.dir.join("data");
        let args = [
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ];
        let _ = pg_command("pg_ctl", &args).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
    })
}

/// A Postgres server program: on PATH, else in Debian's versioned directory.
fn pg_bin(name: &str) -> PathBuf {
    if let Some(p) = on_path(name) {
        return p;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("{name} not found on PATH or in /usr/lib/postgresql/*/bin (the PostgreSQL server package)")
    })
}

/// A Postgres server program's command, as the postgres user when the
/// test runs as root (the server programs refuse to run as root).
fn pg_command(name: &str, args: &[&str]) -> Command {
    let bin = pg_bin(name);
    let mut cmd = if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// Runs a Postgres server program; panics with its output when it fails.
fn pg_tool(name: &str, args: &[&str]) {
    let out = pg_command(name, args).output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh database, dropped on drop.
pub struct Database {
    admin_url: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl Database {
    /// Creates a database named after the test.
    pub fn create(test: &str) -> Database {
        let admin_url = std::env::var("KEYWATCH_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        Self::create_at(admin_url, test)
    }

    /// Creates a database named after the test on the server `admin_url`
    /// reaches (a [`PgServer`]'s, say).
    pub fn create_at(admin_url: String, test: &str) -> Database {
        let name = format!("kw_{}_{}_{}", test, std::process::id(), free_port());
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        let url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
        Database {
            admin_url,
            name,
            url,
        }
    }

    /// Runs a query and returns its rows, every field as text.
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        self.try_query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs a query; the database's error when it fails.
    pub fn try_query(&self, sql: &str) -> Result<Vec<Vec<String>>, sqlx::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use sqlx::Row;
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url).await?;
            let rows = sqlx::query(sql).fetch_all(&mut conn).await?;
            Ok(rows
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| {
                            r.try_get::<Option<String>, _>(i)
                                .unwrap()
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .collect())
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // Not fatal: a test's own server may be gone with its databases.
        let _ = try_psql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(url: &str, sql: &str) {
    try_psql(url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn try_psql(url: &str, sql: &str) -> Result<(), sqlx::Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await?;
        sqlx::query(sql).execute(&mut conn).await.map(|_| ())
    })
}

/// `pipeline.max_record_bytes` in the tests' pipelines: a poison record is longer.
pub const TEST_MAX_RECORD_BYTES: usize = 4096;

/// Writes a config file for `keywatch run` and returns its path.
pub fn run_config(dir: &Path, broker: &Broker, topic: &str, db: &Database, extra: &str) -> PathBuf {
    run_config_with(dir, broker, topic, db, extra, &RunSettings::default())
}

/// What [`run_config_with`] writes where [`run_config`] has its defaults.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// The format the topic is read in (`kafka.topics = [{ name, format }]`);
    /// `None`: listed by name, read as canonical events.
    pub format: Option<&'static str>,
    /// `pipeline.batch_max_records`.
    pub batch_max_records: usize,
    /// `pipeline.batch_max_ms`.
    pub batch_max_ms: u64,
    /// `pipeline.max_record_bytes`.
    pub max_record_bytes: usize,
    /// `pipeline.checkpoint_interval_secs`.
    pub checkpoint_interval_secs: u64,
    /// `pipeline.rollup_flush_secs` (None: keywatch's default).
    pub rollup_flush_secs: Option<u64>,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            format: None,
            batch_max_records: 5000,
            batch_max_ms: 200,
            max_record_bytes: TEST_MAX_RECORD_BYTES,
            checkpoint_interval_secs: 2,
            rollup_flush_secs: None,
        }
    }
}

/// [`run_config`] with `settings` in place of its defaults.
pub fn run_config_with(
    dir: &Path,
    broker: &Broker,
    topic: &str,
    db: &Database,
    extra: &str,
    settings: &RunSettings,
) -> PathBuf {
    let p = dir.join("keywatch.toml");
    let mut f = std::fs::File::create(&p).unwrap();
    let topics = match settings.format {
        Some(format) => format!(r#"[{{ name = "{topic}", format = "{format}" }}]"#),
        None => format!(r#"["{topic}"]"#),
    };
    write!(
        f,
        r#"
[kafka]
brokers = "{}"
topics = {topics}
group_id = "kw-test"
dead_letter_topic = "{topic}-dlq"

[pipeline]
batch_max_records = {}
batch_max_ms = {}
checkpoint_interval_secs = {}
{}parquet_dir = "{}"
max_record_bytes = {}

[postgres]
url = "{}"
max_connections = 4
{}{extra}
"#,
        broker.addr,
        settings.batch_max_records,
        settings.batch_max_ms,
        settings.checkpoint_interval_secs,
        settings
            .rollup_flush_secs
            .map(|s| format!("rollup_flush_secs = {s}\n"))
            .unwrap_or_default(),
        dir.join("lake").display(),
        settings.max_record_bytes,
        db.url,
        // Several keywatch processes run at once: no feed server unless asked for.
        if extra.contains("[feed]") {
            ""
        } else {
            "[feed]\nlisten = \"\"\n"
        },
    )
    .unwrap();
    p
}

/// A `keywatch run` process, killed on drop (a failing test leaves nothing behind).
pub struct Running(pub Child);

impl Running {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts `keywatch run` with `config`; its stderr goes to `log`.
pub fn start_run(config: &Path, log: &Path) -> Running {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_keywatch"))
        .args(["run", "--progress-secs", "0", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Running(child)
}

/// Stops a `keywatch run` gracefully (SIGTERM) and waits for it.
pub fn stop_run(run: &mut Running) {
    let child = &mut run.0;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "keywatch run exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "keywatch run did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the committed offsets of `topic` reach `ends` (partition ->
/// end offset), or panics after `timeout`.
pub fn wait_committed(db: &Database, topic: &str, ends: &HashMap<i32, i64>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        // Until `keywatch run` has migrated, the table does not exist yet.
        let rows = db
            .try_query(&format!("SELECT partition::text, next_offset::text FROM consumer_offsets WHERE topic = '{topic}'"))
            .unwrap_or_default();
        let got: HashMap<i32, i64> = rows
            .iter()
            .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
            .collect();
        if ends
            .iter()
            .all(|(p, e)| *e == 0 || got.get(p).is_some_and(|g| g >= e))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "offsets did not reach {ends:?} (at {got:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `keywatch serve` (dispatcher and feed) with `config`; its stderr
/// goes to `log`. When `feed_port` is given, waits until the feed answers.
pub fn start_serve(config: &Path, log: &Path, feed_port: Option<u16>) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keywatch"));
    cmd.args(["serve", "--config"]).arg(config);
    spawn_serve(cmd, log, feed_port)
}

/// [`start_serve`] with at most `nofile` open file descriptors (`ulimit -n`).
pub fn start_serve_with_fd_limit(
    config: &Path,
    log: &Path,
    feed_port: u16,
    nofile: u32,
) -> Running {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!("ulimit -n {nofile} && exec \"$0\" serve --config \"$1\""),
    ])
    .arg(env!("CARGO_BIN_EXE_keywatch"))
    .arg(config);
    spawn_serve(cmd, log, Some(feed_port))
}

fn spawn_serve(mut cmd: Command, log: &Path, feed_port: Option<u16>) -> Running {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = cmd.stdout(Stdio::null()).stderr(log_file).spawn().unwrap();
    if let Some(port) = feed_port {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "keywatch serve exited with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "keywatch serve did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Running(child)
}
