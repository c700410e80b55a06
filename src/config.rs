//! The config file: TOML, then `KEYWATCH__SECTION__FIELD` environment
//! overrides, then command-line flags; validated once at start-up with
//! errors that name the field.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use detectors::EngineConfig;
use serde::{Deserialize, Serialize};

/// The built-in hash key, used only when none is configured (replays, demos).
const DEFAULT_HASH_KEY: &str = "keywatch-built-in-hash-key: set privacy.hash_key";

/// Prefix of environment overrides: `KEYWATCH__ENGINE__DEFAULT_TIER=pro` sets `engine.default_tier`.
pub const ENV_PREFIX: &str = "KEYWATCH__";

/// The whole configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Detector settings: tiers, budgets, prices and every detector's thresholds.
    pub engine: EngineConfig,
    /// How secrets a gateway sends by mistake are handled.
    pub privacy: PrivacyConfig,
    /// Where gateway records come from (`keywatch run`).
    pub kafka: ingest::config::KafkaConfig,
    /// Batching, checkpoints and the Parquet lake (`keywatch run`).
    pub pipeline: ingest::config::PipelineConfig,
    /// The database (`keywatch run`, `keywatch migrate`).
    pub postgres: PostgresConfig,
    /// Alert delivery: receivers, routing, retries and grouping (`keywatch run`, `keywatch serve`).
    pub alerting: alerting::AlertingConfig,
    /// The revocation feed and metrics HTTP server (`keywatch run`, `keywatch serve`).
    pub feed: alerting::FeedConfig,
    /// `POST /v1/logs` on the feed's listener: records gateways post,
    /// produced to a Kafka topic the pipeline reads (docs/intake.md).
    pub intake: ingest::intake::IntakeConfig,
    /// Where the gateway adapters find an account or key a record does not
    /// name itself (docs/gateways.md).
    pub gateways: detectors::decode::GatewayOptions,
}

/// The database.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL (`postgres://user@host:5432/db`). Unset: the
    /// `DATABASE_URL` environment variable, as sqlx and most tools read it.
    /// Passwords belong in the environment or `~/.pgpass`, not here.
    pub url: Option<String>,
    /// Connections in the pool (one per busy partition is plenty).
    pub max_connections: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            max_connections: 8,
        }
    }
}

impl PostgresConfig {
    /// The URL in force: the file's, else `DATABASE_URL`.
    pub fn url(&self) -> Result<String> {
        match &self.url {
            Some(u) => Ok(u.clone()),
            None => std::env::var("DATABASE_URL").map_err(|_| {
                anyhow::anyhow!("postgres.url: not set, and neither is DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres)")
            }),
        }
    }
}

/// Secret handling.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Key of the HMAC that turns a raw `api_key` into a key id (`kh_…`) and raw
    /// `prompt` text into a fingerprint. Keep it secret and stable: changing it
    /// changes those ids. Prefer `hash_key_file` or the environment
    /// (`KEYWATCH__PRIVACY__HASH_KEY`) to writing it here.
    pub hash_key: Option<String>,
    /// File holding the hash key (trailing whitespace ignored).
    pub hash_key_file: Option<PathBuf>,
}

impl Config {
    /// Loads `path` (or the defaults when `None`), applies environment
    /// overrides from `env`, and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("config file {} is not valid TOML", p.display()))?
            }
            None => toml::Table::new(),
        };
        let mut overridden = vec![];
        for (name, value) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
            if parts.iter().any(|p| p.is_empty()) {
                bail!("environment variable {name}: expected {ENV_PREFIX}SECTION__FIELD");
            }
            set(&mut table, &parts, parse_value(&value))
                .with_context(|| format!("environment variable {name}"))?;
            overridden.push(name);
        }
        let cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(
            |e: serde_path_to_error::Error<toml::de::Error>| {
                let field = e.path().to_string();
                // Blame the environment variable that set the field, if one
                // did; otherwise the file.
                let var = format!(
                    "{ENV_PREFIX}{}",
                    field.replace('.', "__").to_ascii_uppercase()
                );
                let set_by_env = overridden
                    .iter()
                    .any(|o| var == *o || var.starts_with(&format!("{o}__")));
                let origin = if set_by_env {
                    format!("environment variable {var}")
                } else {
                    match path {
                        Some(p) => format!("config file {}", p.display()),
                        None => "config".to_string(),
                    }
                };
                let message = e.inner().message().trim().to_string();
                if field == "." || field.is_empty() {
                    anyhow::anyhow!("{origin}: {message}")
                } else {
                    anyhow::anyhow!("{origin}: {field}: {message}")
                }
            },
        )?;
        cfg.engine.validate().context("invalid config (engine)")?;
        cfg.kafka.validate()?;
        cfg.pipeline.validate()?;
        cfg.alerting.validate().map_err(anyhow::Error::msg)?;
        alerting::feed::validate(&cfg.feed).map_err(anyhow::Error::msg)?;
        cfg.validate_intake()?;
        for (field, v) in [
            ("gateways.account_header", &cfg.gateways.account_header),
            ("gateways.key_header", &cfg.gateways.key_header),
        ] {
            if v.as_deref()
                .is_some_and(|h| h.trim().is_empty() || h.len() > 256)
            {
                bail!("{field}: must be a header or field name of 1 to 256 characters");
            }
        }
        if cfg.postgres.max_connections == 0 {
            bail!("postgres.max_connections: must be at least 1");
        }
        Ok(cfg)
    }

    /// `[intake]`: its own fields, then what it shares with the rest: it is
    /// served on `feed.listen`, and its token is not a feed client's.
    fn validate_intake(&self) -> Result<()> {
        self.intake.validate(&self.kafka)?;
        if !self.intake.enabled {
            return Ok(());
        }
        if self.feed.listen.is_empty() {
            bail!("intake.enabled: the intake is served on feed.listen, which is empty");
        }
        let hash = self.intake.token()?.sha256_hex();
        if let Some(c) = self
            .feed
            .clients
            .iter()
            .find(|c| c.token_sha256.eq_ignore_ascii_case(&hash))
        {
            bail!(
                "intake.token: is the token of feed client {:?}; the intake needs a token of its own",
                c.name
            );
        }
        Ok(())
    }

    /// The record decoder: the hash key in force and the gateway options;
    /// and whether the key is the built-in one.
    pub fn decoder(&self) -> Result<(detectors::Decoder, bool)> {
        let (key, built_in) = self.hash_key()?;
        Ok((
            detectors::Decoder::with_options(&key, self.gateways.clone()),
            built_in,
        ))
    }

    /// The hash key in force, and whether it is the built-in one.
    pub fn hash_key(&self) -> Result<(Vec<u8>, bool)> {
        if let Some(k) = &self.privacy.hash_key {
            if k.is_empty() {
                bail!("privacy.hash_key: must not be empty");
            }
            return Ok((k.as_bytes().to_vec(), false));
        }
        if let Some(f) = &self.privacy.hash_key_file {
            let k = std::fs::read_to_string(f)
                .with_context(|| format!("privacy.hash_key_file: reading {}", f.display()))?;
            let k = k.trim_end();
            if k.is_empty() {
                bail!("privacy.hash_key_file: {} is empty", f.display());
            }
            return Ok((k.as_bytes().to_vec(), false));
        }
        Ok((DEFAULT_HASH_KEY.as_bytes().to_vec(), true))
    }
}

/// An override's value: TOML when it parses as a TOML value (numbers, booleans, arrays), else a string.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<()> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("{p} is not a section"),
        };
    }
    t.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config> {
        let dir =
            std::env::temp_dir().join(format!("kw-config-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("keywatch.toml");
        std::fs::write(&p, text)?;
        Config::load(
            Some(&p),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn file_then_env() {
        let c = load(
            "[engine]\ndefault_tier = \"pro\"\n[engine.request_spike]\nburst_factor = 5.0\n",
            &[
                ("KEYWATCH__ENGINE__REQUEST_SPIKE__MIN_REQUESTS", "20"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.engine.default_tier, "pro");
        assert_eq!(c.engine.request_spike.burst_factor, 5.0);
        assert_eq!(c.engine.request_spike.min_requests, 20);
        let c = load("", &[("KEYWATCH__ENGINE__DEFAULT_TIER", "enterprise")]).unwrap();
        assert_eq!(c.engine.default_tier, "enterprise");
    }

    #[test]
    fn errors_name_the_field() {
        let e = load("[engine]\ndefualt_tier = \"pro\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `defualt_tier`"), "{e}");
        let e = format!("{:#}", load("[engine.tiers.pro]\nrequests_per_minute = 0\ntokens_per_day = 1\nmax_output_tokens = 1\ndaily_budget_usd = 1.0\n", &[]).unwrap_err());
        assert!(
            e.contains("tiers.pro.requests_per_minute: must be at least 1"),
            "{e}"
        );
        let e = load(
            "",
            &[("KEYWATCH__ENGINE__REQUEST_SPIKE__BURST_FACTOR", "lots")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("KEYWATCH__ENGINE__REQUEST_SPIKE__BURST_FACTOR")
                && e.contains("invalid type"),
            "{e}"
        );
        // A wrong value names its field, and blames the file, not an
        // unrelated variable that happens to be set.
        let e = load(
            "[feed]\nmax_wait_secs = -5\n",
            &[("KEYWATCH__POSTGRES__URL", "postgres://x")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("feed.max_wait_secs: invalid value: integer `-5`, expected u64")
                && !e.contains("KEYWATCH__POSTGRES__URL"),
            "{e}"
        );
        // Closed sets of values are enums: a value outside one names the
        // field and the values it takes.
        for (text, field, variant) in [
            ("[kafka]\nstart_from = \"newest\"\n", "kafka.start_from", "newest"),
            ("[engine.repeated_prompt]\naction = \"ban\"\n", "engine.repeated_prompt.action", "ban"),
            (
                "[[alerting.receivers]]\nname = \"a\"\ntype = \"slack\"\nmin_severity = \"urgent\"\n",
                "alerting.receivers[0].min_severity",
                "urgent",
            ),
            (
                "[[alerting.receivers]]\nname = \"a\"\ntype = \"slack\"\nkinds = [\"budget\"]\n",
                "alerting.receivers[0].kinds[0]",
                "budget",
            ),
            (
                "[[alerting.receivers]]\nname = \"m\"\ntype = \"email\"\nsmtp_host = \"h\"\nfrom = \"a@b\"\ntls = \"ssl\"\n",
                "alerting.receivers[0]",
                "ssl",
            ),
            (
                "[[alerting.receivers]]\nname = \"a\"\ntype = \"pager\"\n",
                "alerting.receivers[0]",
                "pager",
            ),
        ] {
            let e = load(text, &[]).unwrap_err().to_string();
            assert!(
                e.contains(field) && e.contains(&format!("unknown variant `{variant}`")),
                "{text}: {e}"
            );
        }
        // A field that does not apply to a receiver's type is refused as
        // the file is read, naming the receiver and the field.
        let e = load(
            "[[alerting.receivers]]\nname = \"ops\"\ntype = \"slack\"\nurl_env = \"X\"\nsecret = \"whsec_AAAA\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("alerting.receivers[0]")
                && e.contains("receiver \"ops\": secret: does not apply to a slack receiver"),
            "{e}"
        );
        let e = load("", &[("KEYWATCH__FEED__MAX_WAIT_SECS", "-3")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "environment variable KEYWATCH__FEED__MAX_WAIT_SECS: feed.max_wait_secs:"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_intake_needs_the_feed_listener_and_a_token_of_its_own() {
        let feed_token = "kwf_the-feed-gateways-token";
        let feed = format!(
            "[[feed.clients]]\nname = \"gw-a\"\ntoken_sha256 = \"{}\"\n",
            alerting::feed::hash_token(feed_token)
        );
        let e = load(
            &format!("{feed}[intake]\nenabled = true\n"),
            &[("KEYWATCH__INTAKE__TOKEN", feed_token)],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "intake.token: is the token of feed client \"gw-a\"; the intake needs a token of its own"
        );
        let c = load(
            &format!("{feed}[intake]\nenabled = true\n"),
            &[("KEYWATCH__INTAKE__TOKEN", "kwi_an-intake-token-of-its-own")],
        )
        .unwrap();
        assert!(c.intake.enabled);
        assert!(
            !format!("{c:?}").contains("kwi_an-intake"),
            "the token is never shown"
        );
        let e = load(
            "[feed]\nlisten = \"\"\n[intake]\nenabled = true\ntoken = \"kwi_an-intake-token-of-its-own\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("intake.enabled: the intake is served on feed.listen"),
            "{e}"
        );
        let e = load("[intake]\ntopic = \"elsewhere\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("intake.topic: \"elsewhere\" is not one of kafka.topics"),
            "{e}"
        );
    }

    #[test]
    fn example_config_is_the_documented_defaults() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/keywatch.example.toml"
        ))
        .unwrap();
        let c = load(&text, &[]).unwrap();
        let mut want = Config::default();
        want.engine.tiers = detectors::config::default_tiers();
        want.engine.pricing.models = detectors::price::default_prices();
        assert_eq!(c, want, "keywatch.example.toml must spell out the defaults");
    }
}
