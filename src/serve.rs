//! keywatch's outward side, as the binary wires it: the dispatcher and the
//! feed server (inside `keywatch run`, or alone in `keywatch serve`), and the
//! operator commands `keys`, `token` and `receivers`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use alerting::dispatch::Dispatcher;
use alerting::metrics::{Render, Sources};
use alerting::Receiver;
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use detectors::time::format_rfc3339;
use rand::RngCore as _;
use sqlx::postgres::PgPool;
use storage::feed::{Feed, ManualAction};
use storage::outbox::Outbox;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::run::{connect, runtime};
use crate::ConfigArg;

mod intake;

use intake::IntakeServer;

/// Postgres connections of the feed server (besides `postgres.max_connections`).
const FEED_CONNECTIONS: u32 = 4;
/// How long a feed request waits for a Postgres connection before it
/// answers `503`.
const FEED_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The dispatcher and the feed server, running on a runtime.
pub struct Outward {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Where the feed server listens, when it runs.
    pub addr: Option<SocketAddr>,
}

/// Receivers built and the feed's address bound: everything in the
/// outward config that can fail, checked before the pipeline starts.
pub struct Prepared {
    receivers: Vec<Receiver>,
    listener: Option<tokio::net::TcpListener>,
    intake: Option<std::sync::Arc<IntakeServer>>,
}

impl Outward {
    /// Builds the receivers (checking their secrets and addresses) and the
    /// intake's producer (when `intake.enabled`), and binds the feed's address.
    pub fn prepare(rt: &tokio::runtime::Runtime, cfg: &Config) -> Result<Prepared> {
        let receivers = cfg
            .alerting
            .receivers
            .iter()
            .map(|r| Receiver::build(r, &cfg.alerting).map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()
            .context("invalid config (alerting.receivers)")?;
        let listener = if cfg.feed.listen.is_empty() {
            None
        } else {
            Some(
                rt.block_on(tokio::net::TcpListener::bind(&cfg.feed.listen))
                    .with_context(|| format!("feed.listen: binding {}", cfg.feed.listen))?,
            )
        };
        let intake = IntakeServer::new(cfg)?;
        Ok(Prepared {
            receivers,
            listener,
            intake,
        })
    }

    /// Starts the dispatcher and the feed server. `extra` adds the pipeline's metrics.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        cfg: &Config,
        prepared: Prepared,
        pool: PgPool,
        extra: Option<Render>,
    ) -> Result<Outward> {
        let (stop, stopped) = watch::channel(false);
        let dispatcher = Dispatcher::new(pool.clone(), prepared.receivers, cfg.alerting.clone());
        let intake = prepared.intake;
        let extra = match (extra, intake.as_ref().map(|i| i.render())) {
            (Some(a), Some(b)) => Some(std::sync::Arc::new(
                move |out: &mut alerting::metrics::Exposition| {
                    a(out);
                    b(out);
                },
            ) as Render),
            (a, b) => a.or(b),
        };
        let sources = Sources {
            delivery: Some(dispatcher.metrics()),
            feed: None,
            extra,
        };
        let mut tasks = vec![rt.spawn(dispatcher.run(stopped.clone()))];
        let mut addr = None;
        if let Some(listener) = prepared.listener {
            addr = Some(listener.local_addr()?);
            let feed = cfg.feed.clone();
            // The feed gets its own few connections: many gateways polling
            // must not take the ones batch commits and the dispatcher use.
            let url = cfg.postgres.url()?;
            let pool = rt
                .block_on(
                    sqlx::postgres::PgPoolOptions::new()
                        .max_connections(FEED_CONNECTIONS)
                        // With Postgres down, a poll or /healthz answers 503
                        // after this rather than hang (sqlx waits 30 s).
                        .acquire_timeout(FEED_ACQUIRE_TIMEOUT)
                        .connect(&url),
                )
                .context("connecting the feed to Postgres")?;
            let routes = match &intake {
                Some(i) => {
                    tracing::info!(topic = %i.topic(), "intake: POST /v1/logs");
                    i.router()
                }
                None => axum::Router::new(),
            };
            tasks.push(rt.spawn(async move {
                if let Err(e) =
                    alerting::feed::serve_with(listener, pool, feed, sources, routes, stopped).await
                {
                    tracing::error!(error = %e, "feed server stopped");
                }
            }));
        }
        Ok(Outward { stop, tasks, addr })
    }

    /// Stops both and waits (a send in flight is abandoned after 5 s; its
    /// lease runs out and it is sent again).
    pub fn stop(self, rt: &tokio::runtime::Runtime) {
        let _ = self.stop.send(true);
        rt.block_on(async {
            for t in self.tasks {
                let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
            }
        });
    }
}

/// Arguments of `keywatch serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    config: ConfigArg,
}

/// `keywatch serve`: the dispatcher and the feed without the Kafka pipeline
/// (for running more feed servers than pipeline instances).
pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    let cfg = Config::load(args.config.config.as_deref(), std::env::vars())?;
    let rt = runtime()?;
    let store = rt.block_on(connect(&cfg))?;
    let prepared = Outward::prepare(&rt, &cfg)?;
    let outward = Outward::start(&rt, &cfg, prepared, store.pool().clone(), None)?;
    match outward.addr {
        Some(a) => tracing::info!(address = %a, "feed on http://{a}, dispatching alerts"),
        None => tracing::info!("dispatching alerts (feed.listen is empty: no HTTP server)"),
    }
    rt.block_on(crate::run::shutdown_signal());
    tracing::info!("stopping");
    outward.stop(&rt);
    Ok(ExitCode::SUCCESS)
}

/// The config, a runtime and the (migrated) database, for the operator commands.
fn open(arg: &ConfigArg) -> Result<(Config, tokio::runtime::Runtime, storage::Store)> {
    let cfg = Config::load(arg.config.as_deref(), std::env::vars())?;
    let rt = runtime()?;
    let store = rt.block_on(connect(&cfg))?;
    Ok((cfg, rt, store))
}

/// Arguments of `keywatch keys`.
#[derive(clap::Args, Debug)]
pub struct KeysArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(clap::Subcommand, Debug)]
enum KeysCommand {
    /// Block a key (or, with --user and no key, every key of a user) by hand.
    /// Gateways polling the feed see it at once.
    Block {
        /// The key id (the gateway's public key id, never the secret).
        key_id: Option<String>,
        /// The key's user (looked up from recent traffic when omitted).
        #[arg(long)]
        user: Option<String>,
        /// Block a client address instead (no key, no user): what the
        /// second stage does on credential stuffing.
        #[arg(long, conflicts_with_all = ["key_id", "user"])]
        ip: Option<std::net::IpAddr>,
        /// Why, for the gateway's logs and the audit trail.
        #[arg(long)]
        reason: String,
        /// Lift the block on its own after this many hours (default: until unblocked).
        #[arg(long)]
        hours: Option<f64>,
        /// Throttle instead of block.
        #[arg(long)]
        throttle: bool,
        /// Who is acting (recorded as operator:NAME).
        #[arg(long, env = "USER", default_value = "unknown")]
        operator: String,
    },
    /// Lift the blocks and throttles of a key (or, with --user and no key,
    /// of every key of the user, including budget blocks).
    Unblock {
        /// The key id.
        key_id: Option<String>,
        /// The user (looked up from recent traffic when omitted).
        #[arg(long)]
        user: Option<String>,
        /// Lift the blocks of a client address instead (key cycling,
        /// credential stuffing, or an operator's).
        #[arg(long, conflicts_with_all = ["key_id", "user"])]
        ip: Option<std::net::IpAddr>,
        /// Why.
        #[arg(long)]
        reason: String,
        /// Who is acting (recorded as operator:NAME).
        #[arg(long, env = "USER", default_value = "unknown")]
        operator: String,
    },
    /// Print what is blocked or throttled now (as /v1/blocklist has it).
    List,
}

/// `keywatch keys ...`.
pub fn keys(args: KeysArgs) -> Result<ExitCode> {
    let (_, rt, store) = open(&args.config)?;
    let feed = Feed::new(store.pool().clone());
    let feed = &feed;
    rt.block_on(async {
        match args.command {
            KeysCommand::Block {
                key_id,
                user,
                ip,
                reason,
                hours,
                throttle,
                operator,
            } => {
                check_ids(key_id.as_deref(), user.as_deref())?;
                if let Some(h) = hours {
                    if !(h > 0.0 && h <= MAX_HOURS) {
                        bail!(
                            "--hours: must be above 0 and at most {MAX_HOURS} (ten years), got {h}"
                        );
                    }
                }
                let action = if throttle { "throttle" } else { "block" };
                if let Some(ip) = ip {
                    let seq =
                        record(feed, Target::Address(ip), action, &reason, hours, &operator).await?;
                    println!("{action} recorded as feed seq {seq}: address {ip}");
                    return Ok(ExitCode::SUCCESS);
                }
                let user = subject(feed, key_id.as_deref(), user).await?;
                let target = Target::Key(key_id.as_deref(), &user);
                let seq = record(feed, target, action, &reason, hours, &operator).await?;
                println!(
                    "{action} recorded as feed seq {seq}: user {user}, {}",
                    describe(key_id.as_deref())
                );
            }
            KeysCommand::Unblock {
                key_id,
                user,
                ip,
                reason,
                operator,
            } => {
                if let Some(ip) = ip {
                    let target = Target::Address(ip);
                    let seq = record(feed, target, "unblock", &reason, None, &operator).await?;
                    println!("unblock recorded as feed seq {seq}: address {ip}");
                    return Ok(ExitCode::SUCCESS);
                }
                check_ids(key_id.as_deref(), user.as_deref())?;
                if let (Some(k), Some(u)) = (key_id.as_deref(), user.as_deref()) {
                    // An unblock lifts the blocks of (user, key): under another
                    // user it would lift nothing, and gateways applying it by
                    // key would disagree with /v1/blocklist.
                    let owners = feed.owners_in_force(k).await?;
                    if !owners.is_empty() && !owners.iter().any(|o| o == u) {
                        bail!(
                            "{} is blocked under user {}, not {} (give that --user, or leave --user out)",
                            printable(k),
                            owners.iter().map(|o| printable(o)).collect::<Vec<_>>().join(", "),
                            printable(u)
                        );
                    }
                }
                let user = subject(feed, key_id.as_deref(), user).await?;
                let target = Target::Key(key_id.as_deref(), &user);
                let seq = record(feed, target, "unblock", &reason, None, &operator).await?;
                println!(
                    "unblock recorded as feed seq {seq}: user {user}, {}",
                    describe(key_id.as_deref())
                );
            }
            KeysCommand::List => {
                let rows = feed.in_force().await?;
                println!("seq\tuser\tkey\taction\texpires\treason");
                for r in rows {
                    // Ids and reasons come from traffic and operators:
                    // control characters are escaped, so no value can forge
                    // a row or drive the terminal.
                    let key = match (&r.ip, r.key_id.as_deref()) {
                        (Some(ip), _) => format!("(address {})", printable(ip)),
                        (None, Some(k)) => printable(k),
                        (None, None) => "(all keys)".into(),
                    };
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        r.seq,
                        printable(&r.user_id),
                        key,
                        printable(&r.action),
                        r.expires_ms.map_or_else(|| "never".into(), format_rfc3339),
                        printable(&r.reason),
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The longest `--hours` a manual block may last.
const MAX_HOURS: f64 = 87_600.0;

/// Key and user ids as the contract has them: 1 to 128 characters, no
/// control characters.
fn check_ids(key_id: Option<&str>, user: Option<&str>) -> Result<()> {
    for (flag, v) in [("KEY_ID", key_id), ("--user", user)] {
        let Some(v) = v else { continue };
        let len = v.chars().count();
        if !(1..=128).contains(&len) {
            bail!("{flag}: must be 1 to 128 characters, got {len}");
        }
        if v.chars().any(char::is_control) {
            bail!(
                "{flag}: must not hold control characters, got {}",
                printable(v)
            );
        }
    }
    Ok(())
}

/// `s` with control characters escaped (`\n`, `\u{1b}`): safe to print.
pub(crate) fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

fn describe(key_id: Option<&str>) -> String {
    match key_id {
        Some(k) => format!("key {k}"),
        None => "every key".into(),
    }
}

/// The user a manual action is about: given, or the key's user from its
/// latest alert or traffic of the last 30 days.
async fn subject(feed: &Feed, key_id: Option<&str>, user: Option<String>) -> Result<String> {
    if let Some(u) = user {
        if u.is_empty() {
            bail!("--user: must not be empty");
        }
        return Ok(u);
    }
    let Some(key) = key_id else {
        bail!("give a KEY_ID, or --user USER for every key of a user");
    };
    let found = feed.user_of_key(key).await?;
    found.with_context(|| {
        format!("key {key}: no alert or traffic in the last 30 days names its user; give --user")
    })
}

/// What a manual action is about.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// A key of a user (no key: every key of the user).
    Key(Option<&'a str>, &'a str),
    /// A client address (an address action names no key and no account).
    Address(std::net::IpAddr),
}

/// Records a manual action in the feed (same table, order and notification
/// as the detectors' actions); returns its sequence number.
async fn record(
    feed: &Feed,
    target: Target<'_>,
    action: &str,
    reason: &str,
    hours: Option<f64>,
    operator: &str,
) -> Result<i64> {
    if reason.trim().is_empty() {
        bail!("--reason: must not be empty");
    }
    let (key_id, user, ip) = match target {
        Target::Key(key, user) => (key, user, None),
        Target::Address(ip) => (None, "", Some(ip.to_string())),
    };
    let seq = feed
        .record_manual(&ManualAction {
            key_id,
            user_id: user,
            ip: ip.as_deref(),
            action,
            reason,
            hours,
            operator,
        })
        .await
        .map_err(|e| anyhow::anyhow!(e.detail()))
        .context("recording the action")?;
    Ok(seq)
}

/// Arguments of `keywatch token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// The gateway's name.
    name: String,
}

/// `keywatch token NAME`: a new random bearer token for a gateway, and the
/// config lines that admit it (only its hash goes in the config). The token
/// goes to standard error, the terminal, and never to standard output: the
/// documented `keywatch token NAME >> keywatch.toml` must not write the
/// secret into the file.
pub fn token(args: TokenArgs) -> Result<ExitCode> {
    // The operating system's generator (getrandom(2)), through rand.
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .context("reading the operating system's random generator")?;
    let token = format!(
        "kwf_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    eprintln!(
        "Give this token to the gateway {:?} (it is shown once; keywatch keeps only its hash):",
        args.name
    );
    eprintln!("  Authorization: Bearer {token}");
    println!("[[feed.clients]]");
    println!("name = {:?}", args.name);
    println!("token_sha256 = \"{}\"", alerting::feed::hash_token(&token));
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `keywatch receivers`.
#[derive(clap::Args, Debug)]
pub struct ReceiversArgs {
    #[command(flatten)]
    config: ConfigArg,
    #[command(subcommand)]
    command: ReceiversCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ReceiversCommand {
    /// Each configured receiver: enabled or not, and its deliveries by state.
    List,
    /// Re-enable a receiver disabled by a 410 Gone; its held deliveries go out.
    Enable {
        /// The receiver's name.
        name: String,
    },
}

/// `keywatch receivers ...`.
pub fn receivers(args: ReceiversArgs) -> Result<ExitCode> {
    let (cfg, rt, store) = open(&args.config)?;
    let outbox = Outbox::new(store.pool().clone());
    rt.block_on(async {
        match args.command {
            ReceiversCommand::List => {
                println!("receiver\ttype\tstatus\tpending\tdelivered\tfailed\tsuppressed");
                for r in &cfg.alerting.receivers {
                    let row = outbox.receiver_summary(&r.name).await?;
                    let status = match &row.disabled {
                        Some(why) => format!("DISABLED ({why})"),
                        None => "enabled".into(),
                    };
                    println!(
                        "{}\t{:?}\t{status}\t{}\t{}\t{}\t{}",
                        r.name,
                        r.kind(),
                        row.pending,
                        row.delivered,
                        row.failed,
                        row.suppressed,
                    );
                }
            }
            ReceiversCommand::Enable { name } => {
                if !cfg.alerting.receivers.iter().any(|r| r.name == name) {
                    bail!("no receiver named {name:?} in alerting.receivers");
                }
                if !outbox.enable_receiver(&name).await? {
                    println!("receiver {name} was not disabled");
                } else {
                    println!(
                        "receiver {name} enabled: its held deliveries go out on the next round"
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_actions_take_contract_ids_and_print_safely() {
        check_ids(Some("key_7f3a"), Some("acct_42")).unwrap();
        check_ids(None, Some("acct_42")).unwrap();
        let long = "k".repeat(100_000);
        let e = check_ids(Some(&long), None).unwrap_err().to_string();
        assert_eq!(e, "KEY_ID: must be 1 to 128 characters, got 100000");
        let e = check_ids(Some("k"), Some("")).unwrap_err().to_string();
        assert_eq!(e, "--user: must be 1 to 128 characters, got 0");
        let e = check_ids(Some("k\n9\tforged"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("KEY_ID: must not hold control characters"),
            "{e}"
        );
        assert_eq!(printable("a\nb\t\u{1b}[31m"), "a\\nb\\t\\u{1b}[31m");
        assert_eq!(printable("plain é"), "plain é");
    }
}
