//! The engine's configuration: tiers, budgets, prices and detector settings.
//!
//! Every struct denies unknown fields and has defaults, so a config file
//! names only what it changes; [`EngineConfig::validate`] checks the values
//! once at start-up and names the field at fault.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::alert::Action;
use crate::price::{default_prices, ModelPrice};

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    /// The dotted path of the field at fault, e.g. `tiers.pro.requests_per_minute`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Everything the detectors need to know.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Tier given to records without a `tier` field (and to unknown tiers, which are also counted).
    pub default_tier: String,
    /// Plans and their limits. Tiers named here replace the built-in ones of the
    /// same name field by field; built-in `free`, `pro` and `enterprise` stay unless replaced.
    pub tiers: BTreeMap<String, TierConfig>,
    /// Per-user overrides of tier and budgets, keyed by `user_id`.
    pub users: BTreeMap<String, UserOverride>,
    /// Budget periods and alert percents.
    pub budgets: BudgetConfig,
    /// Model prices (USD per 1M tokens); entries here extend or replace the built-in table.
    pub pricing: PricingConfig,
    /// Request-rate spikes.
    pub request_spike: RequestSpikeConfig,
    /// Token spikes and token-exhaustion prompts.
    pub token_spike: TokenSpikeConfig,
    /// Repeated prompts and prompt farming.
    pub repeated_prompt: RepeatedPromptConfig,
    /// Keys used from many addresses.
    pub leaked_key: LeakedKeyConfig,
    /// Spend at a pace that empties the daily budget within the hour.
    pub runaway_spend: RunawaySpendConfig,
    /// What counts as an account's usual networks and clients.
    pub context: ContextConfig,
    /// How long state lives.
    pub state: StateConfig,
    /// How far a record's time may run ahead of a trusted clock.
    #[serde(default)]
    pub event_time: EventTimeConfig,
    /// The second stage: its event-time order and what it knows of networks.
    #[serde(default)]
    pub subjects: SubjectsConfig,
    /// Many accounts from one address or network (second stage).
    #[serde(default)]
    pub key_cycling: KeyCyclingConfig,
    /// Failed authentications from one address (second stage).
    #[serde(default)]
    pub credential_stuffing: CredentialStuffingConfig,
    /// One key under many accounts (second stage).
    #[serde(default)]
    pub key_sharing: KeySharingConfig,
    /// A key's traffic moving to hosting networks (second stage).
    #[serde(default)]
    pub data_center_share: DataCenterShareConfig,
}

/// Event-time bounds. A record's `ts` is the gateway's word, and one record
/// far in the future would otherwise move the partition's clock and its
/// account's budget period with it. Each record is held to a *reference*:
/// the Kafka message's timestamp in `keywatch run` (the producer's or the
/// broker's clock, not the record's), the wall clock when a message has
/// none, and in `keywatch replay` the wall clock at start (or `--now`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventTimeConfig {
    /// A record more than this many seconds past its reference is counted at
    /// reference + this, and flagged (`ts` among its repaired fields).
    pub max_ahead_secs: u32,
}

impl Default for EventTimeConfig {
    fn default() -> Self {
        EventTimeConfig {
            max_ahead_secs: 300,
        }
    }
}

/// A plan's limits (the seed practice's numbers are the defaults of the built-in tiers).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Requests per minute the plan allows; scales the rate prior and the minimum flood size.
    pub requests_per_minute: u32,
    /// Tokens (input + output) per day the plan allows; `token_quota` fires when a user passes it.
    pub tokens_per_day: u64,
    /// Largest completion the plan allows; scales what counts as a huge output.
    pub max_output_tokens: u32,
    /// Daily spend budget in USD.
    pub daily_budget_usd: f64,
    /// Monthly spend budget in USD, if the plan has one.
    #[serde(default)]
    pub monthly_budget_usd: Option<f64>,
}

/// Per-user overrides.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UserOverride {
    /// Tier for this user whatever the records say.
    pub tier: Option<String>,
    /// Daily budget replacing the tier's.
    pub daily_budget_usd: Option<f64>,
    /// Monthly budget replacing the tier's.
    pub monthly_budget_usd: Option<f64>,
}

/// Budget alert settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Percents of a budget that raise an alert, once each per user and period; at 100 and above the action is `block`.
    pub alert_percents: Vec<u8>,
    /// Time zone of budget periods as a fixed UTC offset (`+00:00`, `-05:00`); periods are calendar days and months there.
    pub utc_offset: String,
}

/// Pricing settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Prices by model name; a record's model matches the longest name that is a prefix of it
    /// (so `gpt-4o-2024-08-06` is priced as `gpt-4o`).
    pub models: BTreeMap<String, ModelPrice>,
    /// Price used for models not in the table. Without it such records cost 0 and are
    /// counted as unpriced (reported in the summary and metrics), never silently.
    pub fallback: Option<ModelPrice>,
}

/// Request-spike detector settings (see `detect::request_spike`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RequestSpikeConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// A minute must be at least this many times the learned rate to be a spike (keeps 2-3x batch bursts quiet).
    pub burst_factor: f64,
    /// A minute must also be this improbable under the learned rate (negative-binomial upper tail).
    pub p_value: f64,
    /// Cold-start prior: rate of a new subject as a fraction of its tier's requests per minute…
    pub prior_fraction: f64,
    /// …or this many requests per active minute, whichever is more. Low by default: a new
    /// account's first burst is judged by its context (an info alert when nothing is known of it).
    pub prior_requests: f64,
    /// Weight of the prior, in active minutes of evidence.
    pub prior_minutes: f64,
    /// Half-life of the learned rate, in active minutes.
    pub half_life_minutes: f64,
    /// Smallest spike, as a fraction of the tier's requests per minute (0 by default: a big
    /// plan's quiet account is judged against its own rate, not its plan's).
    pub min_fraction_of_tier: f64,
    /// Smallest spike in requests per minute, whatever the tier.
    pub min_requests: u32,
    /// After an alert, the subject stays in the same incident until this many minutes pass without a spike.
    pub cooldown_minutes: u32,
}

/// Token-spike detector settings (see `detect::token_spike`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSpikeConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// An answer of at least this fraction of the tier's max output tokens is "at the cap".
    pub huge_fraction_of_max: f64,
    /// Prior share of answers at the cap for a new account (its own share is learned).
    pub cap_share_prior: f64,
    /// Weight of that prior, in answers.
    pub cap_share_prior_answers: f64,
    /// Half-life of the learned share of capped answers, in answers.
    pub cap_share_half_life: f64,
    /// A jump in that share: capped answers in the window this improbable under the learned share (Beta-Binomial tail)…
    pub cap_share_p_value: f64,
    /// …and at least this many of them (1 to 6).
    pub cap_share_min_hits: u32,
    /// A big prompt is more than this many standard deviations above the account's learned (log) prompt size…
    pub prompt_z: f64,
    /// …at least this many times its learned median…
    pub prompt_factor: f64,
    /// …and at least this many tokens.
    pub prompt_min_tokens: u64,
    /// This many big prompts answered at the cap (or still generating after `in_flight_secs`) within the window are token exhaustion (1 to 6).
    pub exhaustion_count: u32,
    /// Window for counting capped answers, in minutes.
    pub window_minutes: u32,
    /// Tokens in a sliding minute must be this many standard deviations above the
    /// user's learned (log) tokens per active minute…
    pub burst_z: f64,
    /// …and at least this many max-output-sized requests' worth of tokens…
    pub min_max_outputs_per_minute: f64,
    /// …and at least this fraction of the tier's daily token allowance.
    pub min_day_fraction: f64,
    /// Half-life of the learned token rate and sizes, in active minutes / requests.
    pub half_life: f64,
    /// With split request/response logs: a big-prompt request unanswered this many seconds counts as answered at the cap (0 turns it off).
    pub in_flight_secs: u32,
    /// After an alert, the user stays in the same incident until this many quiet minutes pass.
    pub cooldown_minutes: u32,
    /// No longer used (answers at the cap are judged against the learned share); accepted so older files load.
    #[serde(skip_serializing)]
    pub huge_z: Option<f64>,
    /// No longer used (see `exhaustion_count` and `cap_share_min_hits`); accepted so older files load.
    #[serde(skip_serializing)]
    pub huge_count: Option<u32>,
    /// No longer used (requests in flight count only with a big prompt); accepted so older files load.
    #[serde(skip_serializing)]
    pub in_flight_count: Option<u32>,
}

/// How a record's context is judged (see `detect::context`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// A network or user agent is the account's usual one once the account used it again this many
    /// minutes or more after first; an account with none such has no usual context yet.
    pub familiar_after_minutes: u32,
    /// A network or user agent first seen in the `familiar_after_minutes` before or during an
    /// open spike incident on the account becomes usual only when used again with no incident
    /// open: an attack that comes first does not become the account's usual context.
    pub hold_during_incidents: bool,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            familiar_after_minutes: 30,
            hold_during_incidents: true,
        }
    }
}

/// Repeated-prompt detector settings (see `detect::repeated_prompt`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RepeatedPromptConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// One user sending the same fingerprint more than this many times in the window is farming.
    pub max_repeats: u32,
    /// The sliding window, in minutes.
    pub window_minutes: u32,
    /// Action for a user's repeats (`notify`, `throttle` or `block`).
    pub action: Action,
    /// This many distinct users each repeating the same fingerprint in the window is coordinated farming (0 turns it off).
    pub farming_min_users: u32,
    /// An early warning (notify) when one user sends the same fingerprint this many times within
    /// `early_window_minutes` (0 turns it off; at least two below `max_repeats`): an info alert, and
    /// from a user known to rarely repeat a prompt a warning one sighting later at a script's steady
    /// pace (none from a user that often repeats)…
    pub early_count: u32,
    /// …the early warning's window, in minutes…
    pub early_window_minutes: u32,
    /// …spanning at least this many seconds (a quick run of regenerations is not a script)…
    pub early_min_span_secs: u32,
    /// …"rarely": a learned share of repeated prompts below this, over 100 or more prompts
    /// ("often": ten times this).
    pub early_max_repeat_share: f64,
    /// A record answered with at most this many tokens (a health check, an embedding), or refused
    /// (status 400 and above: its retry repeats the prompt), is not a sighting. Request records of
    /// split logs always are (their answer is not known yet).
    pub probe_max_tokens: u64,
}

/// Leaked-key detector settings (see `detect::leaked_key`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeakedKeyConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// Window for counting distinct addresses, in minutes.
    pub window_minutes: u32,
    /// Fewest distinct IP addresses in a window to suspect a leak.
    pub min_ips: u32,
    /// Fewest distinct autonomous systems in a window (records without `asn` count by address).
    pub min_asns: u32,
    /// Distinct addresses must also be this many times the key's learned count per window.
    pub factor: f64,
}

/// Runaway-spend detector settings (see `detect::runaway_spend`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunawaySpendConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// Spend in a sliding minute that would empty the daily budget within this many minutes is runaway…
    pub pace_minutes: f64,
    /// …when it is also at least this many times the user's learned spend per active minute.
    pub burst_factor: f64,
    /// Half-life of the learned spend rate, in active minutes.
    pub half_life_minutes: f64,
    /// After an alert, the user stays in the same incident until this many quiet minutes pass.
    pub cooldown_minutes: u32,
    /// A runaway pages (warning) only once the pace has held over this many minutes; a single
    /// fast minute from the account's usual networks and client is an info alert.
    pub sustain_minutes: u32,
}

impl Default for RunawaySpendConfig {
    fn default() -> Self {
        RunawaySpendConfig {
            enabled: true,
            pace_minutes: 60.0,
            burst_factor: 4.0,
            half_life_minutes: 60.0,
            cooldown_minutes: 30,
            sustain_minutes: 10,
        }
    }
}

/// The second stage (see `subject`): detectors keyed by address, network,
/// key and prompt across every partition.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SubjectsConfig {
    /// The second stage takes records in event-time order: a record waits until every source
    /// has passed its time by this many seconds (a record later than that is taken as it comes,
    /// counted as late).
    pub lateness_secs: u32,
    /// Most records waiting for their turn in one stage-two partition; past it the oldest go
    /// first (counted as forced), so a stalled source cannot fill memory.
    pub max_buffered: u32,
    /// An account first seen this many minutes ago or less is young…
    pub young_minutes: u32,
    /// …once stage one has watched its partition for this many hours (at a fresh start every
    /// account is new, and none is young).
    pub history_hours: u32,
    /// Autonomous system numbers of hosting providers (data centers, VPS and proxy hosts).
    /// Default: a built-in list of the large clouds and hosts.
    pub hosting_asns: Vec<u32>,
    /// An address, network, key or prompt not seen for this long is forgotten.
    pub idle_ttl_hours: u32,
}

impl Default for SubjectsConfig {
    fn default() -> Self {
        SubjectsConfig {
            lateness_secs: 5,
            max_buffered: 500_000,
            young_minutes: 120,
            history_hours: 24,
            hosting_asns: default_hosting_asns(),
            idle_ttl_hours: 48,
        }
    }
}

/// The built-in hosting networks: the large clouds and hosting providers,
/// by their public autonomous system numbers (Amazon 16509 and 14618,
/// Google 15169 and 396982, Microsoft 8075, DigitalOcean 14061, OVH 16276,
/// Hetzner 24940, Akamai Linode 63949, Vultr 20473, M247 9009, DataCamp
/// 60068, ColoCrossing 36352, Oracle 31898, Alibaba 45102, Tencent 132203,
/// Scaleway 12876, Contabo 51167, Leaseweb 60781, IONOS 8560).
pub fn default_hosting_asns() -> Vec<u32> {
    vec![
        16509, 14618, 15169, 396982, 8075, 14061, 16276, 24940, 63949, 20473, 9009, 60068, 36352,
        31898, 45102, 132203, 12876, 51167, 60781, 8560,
    ]
}

/// Key cycling (see `subject::detect`): many accounts from one address or
/// one /24 (/64), far above what that address has been learned to carry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeyCyclingConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// Window for counting distinct accounts, in minutes.
    pub window_minutes: u32,
    /// Fewest distinct accounts in a window (the absolute minimum)…
    pub min_accounts: u32,
    /// …and at least this many times the address's learned accounts per window…
    pub factor: f64,
    /// …which starts at this many (the prior of an address never seen).
    pub prior_accounts: f64,
}

impl Default for KeyCyclingConfig {
    fn default() -> Self {
        KeyCyclingConfig {
            enabled: true,
            window_minutes: 30,
            min_accounts: 8,
            factor: 3.0,
            prior_accounts: 2.0,
        }
    }
}

/// Credential stuffing (see `subject::detect`): failed authentications (401,
/// 403) from one address, far above its norm, across many keys.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialStuffingConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// Window for counting failures, in minutes.
    pub window_minutes: u32,
    /// Fewest failures in a window (the absolute minimum)…
    pub min_failures: u32,
    /// …for at least this many distinct keys (a client retrying its one revoked key is not
    /// stuffing)…
    pub min_keys: u32,
    /// …and at least this many times the address's learned failures per window.
    pub factor: f64,
}

impl Default for CredentialStuffingConfig {
    fn default() -> Self {
        CredentialStuffingConfig {
            enabled: true,
            window_minutes: 10,
            min_failures: 20,
            min_keys: 5,
            factor: 5.0,
        }
    }
}

/// Key sharing (see `subject::detect`): one key id under more accounts than
/// it has been learned to serve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeySharingConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// Window for counting distinct accounts, in minutes.
    pub window_minutes: u32,
    /// Fewest distinct accounts under one key in a window…
    pub min_users: u32,
    /// …and at least this many times the key's learned accounts per window.
    pub factor: f64,
}

impl Default for KeySharingConfig {
    fn default() -> Self {
        KeySharingConfig {
            enabled: true,
            window_minutes: 60,
            min_users: 2,
            factor: 3.0,
        }
    }
}

/// Data-center share (see `subject`): the share of a key's requests from
/// hosting networks (`subjects.hosting_asns`), learned per key, jumping: a
/// key that lived on people's networks now called from data centers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataCenterShareConfig {
    /// Turns the detector on.
    pub enabled: bool,
    /// Window, in minutes.
    pub window_minutes: u32,
    /// Fewest requests in a window…
    pub min_requests: u32,
    /// …at least this share of them from hosting networks…
    pub min_share: f64,
    /// …with this improbable a count under the key's learned share
    /// (Beta-Binomial; prior 2% worth 20 requests)…
    pub p_value: f64,
    /// …once the key has this many requests of history (a key born in a
    /// data center is not moving there)…
    pub min_history: u32,
    /// …and its learned share is at most this (a key that lives in data
    /// centers already is not moving there either).
    pub max_learned_share: f64,
}

impl Default for DataCenterShareConfig {
    fn default() -> Self {
        DataCenterShareConfig {
            enabled: true,
            window_minutes: 60,
            min_requests: 10,
            min_share: 0.5,
            p_value: 1e-4,
            min_history: 50,
            max_learned_share: 0.2,
        }
    }
}

/// State lifetime settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// A user or key idle this long is forgotten (budget ledgers of an open monthly period are kept).
    pub idle_ttl_hours: u32,
    /// A repeat of (request_id, phase) within this many minutes of event time is a duplicate.
    pub dedup_horizon_minutes: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            default_tier: "free".into(),
            tiers: BTreeMap::new(),
            users: BTreeMap::new(),
            budgets: BudgetConfig::default(),
            pricing: PricingConfig::default(),
            request_spike: RequestSpikeConfig::default(),
            token_spike: TokenSpikeConfig::default(),
            repeated_prompt: RepeatedPromptConfig::default(),
            leaked_key: LeakedKeyConfig::default(),
            runaway_spend: RunawaySpendConfig::default(),
            context: ContextConfig::default(),
            state: StateConfig::default(),
            event_time: EventTimeConfig::default(),
            subjects: SubjectsConfig::default(),
            key_cycling: KeyCyclingConfig::default(),
            credential_stuffing: CredentialStuffingConfig::default(),
            key_sharing: KeySharingConfig::default(),
            data_center_share: DataCenterShareConfig::default(),
        }
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            alert_percents: vec![50, 80, 100],
            utc_offset: "+00:00".into(),
        }
    }
}

impl Default for RequestSpikeConfig {
    fn default() -> Self {
        RequestSpikeConfig {
            enabled: true,
            burst_factor: 4.0,
            p_value: 1e-6,
            prior_fraction: 0.0,
            prior_requests: 2.0,
            prior_minutes: 10.0,
            half_life_minutes: 60.0,
            min_fraction_of_tier: 0.0,
            min_requests: 10,
            cooldown_minutes: 15,
        }
    }
}

impl Default for TokenSpikeConfig {
    fn default() -> Self {
        TokenSpikeConfig {
            enabled: true,
            huge_fraction_of_max: 0.75,
            cap_share_prior: 0.02,
            cap_share_prior_answers: 50.0,
            cap_share_half_life: 200.0,
            cap_share_p_value: 1e-5,
            cap_share_min_hits: 3,
            prompt_z: 2.5,
            prompt_factor: 4.0,
            prompt_min_tokens: 1000,
            exhaustion_count: 2,
            window_minutes: 10,
            burst_z: 4.0,
            min_max_outputs_per_minute: 6.0,
            min_day_fraction: 0.25,
            half_life: 60.0,
            in_flight_secs: 45,
            cooldown_minutes: 15,
            huge_z: None,
            huge_count: None,
            in_flight_count: None,
        }
    }
}

impl Default for RepeatedPromptConfig {
    fn default() -> Self {
        RepeatedPromptConfig {
            enabled: true,
            max_repeats: 5,
            window_minutes: 60,
            action: Action::Block,
            farming_min_users: 10,
            early_count: 3,
            early_window_minutes: 10,
            early_min_span_secs: 90,
            early_max_repeat_share: 0.01,
            probe_max_tokens: 16,
        }
    }
}

impl Default for LeakedKeyConfig {
    fn default() -> Self {
        LeakedKeyConfig {
            enabled: true,
            window_minutes: 10,
            min_ips: 5,
            min_asns: 3,
            factor: 3.0,
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            idle_ttl_hours: 48,
            dedup_horizon_minutes: 30,
        }
    }
}

/// The built-in tiers: the seed practice's limits.
pub fn default_tiers() -> BTreeMap<String, TierConfig> {
    let t = |rpm, tokens, max_out, usd| TierConfig {
        requests_per_minute: rpm,
        tokens_per_day: tokens,
        max_output_tokens: max_out,
        daily_budget_usd: usd,
        monthly_budget_usd: None,
    };
    BTreeMap::from([
        ("free".to_string(), t(10, 10_000, 500, 1.0)),
        ("pro".to_string(), t(60, 100_000, 4_000, 50.0)),
        ("enterprise".to_string(), t(300, 1_000_000, 8_000, 500.0)),
    ])
}

fn positive(field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(bad(field, format!("must be a positive number, got {v}")))
    }
}

fn budget(field: &str, v: Option<f64>) -> Result<(), ConfigError> {
    match v {
        Some(v) => positive(field, v),
        None => Ok(()),
    }
}

impl EngineConfig {
    /// The tiers in force: the built-in ones with this config's tiers laid over them.
    pub fn effective_tiers(&self) -> BTreeMap<String, TierConfig> {
        let mut t = default_tiers();
        t.extend(self.tiers.iter().map(|(k, v)| (k.clone(), v.clone())));
        t
    }

    /// The price table in force: built-in prices with this config's laid over them.
    pub fn effective_prices(&self) -> BTreeMap<String, ModelPrice> {
        let mut p = default_prices();
        p.extend(self.pricing.models.iter().map(|(k, v)| (k.clone(), *v)));
        p
    }

    /// The budget time zone, minutes east of UTC.
    pub fn utc_offset_minutes(&self) -> Result<i32, ConfigError> {
        crate::time::parse_utc_offset(&self.budgets.utc_offset).ok_or_else(|| {
            bad(
                "budgets.utc_offset",
                format!(
                    "expected a fixed offset like +00:00 or -05:30, got {:?}",
                    self.budgets.utc_offset
                ),
            )
        })
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let tiers = self.effective_tiers();
        if !tiers.contains_key(&self.default_tier) {
            return Err(bad(
                "default_tier",
                format!(
                    "no tier named {:?} (tiers: {})",
                    self.default_tier,
                    names(&tiers)
                ),
            ));
        }
        for (name, t) in &tiers {
            let f = |x: &str| format!("tiers.{name}.{x}");
            if t.requests_per_minute == 0 {
                return Err(bad(f("requests_per_minute"), "must be at least 1"));
            }
            if t.max_output_tokens == 0 {
                return Err(bad(f("max_output_tokens"), "must be at least 1"));
            }
            if t.tokens_per_day == 0 {
                return Err(bad(f("tokens_per_day"), "must be at least 1"));
            }
            positive(&f("daily_budget_usd"), t.daily_budget_usd)?;
            budget(&f("monthly_budget_usd"), t.monthly_budget_usd)?;
        }
        for (user, o) in &self.users {
            if let Some(t) = &o.tier {
                if !tiers.contains_key(t) {
                    return Err(bad(
                        format!("users.{user}.tier"),
                        format!("no tier named {t:?} (tiers: {})", names(&tiers)),
                    ));
                }
            }
            budget(
                &format!("users.{user}.daily_budget_usd"),
                o.daily_budget_usd,
            )?;
            budget(
                &format!("users.{user}.monthly_budget_usd"),
                o.monthly_budget_usd,
            )?;
        }
        if self.budgets.alert_percents.is_empty() || self.budgets.alert_percents.len() > 8 {
            return Err(bad("budgets.alert_percents", "must list 1 to 8 percents"));
        }
        let mut sorted = self.budgets.alert_percents.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.budgets.alert_percents.len() || sorted[0] == 0 {
            return Err(bad(
                "budgets.alert_percents",
                "percents must be distinct and above 0",
            ));
        }
        self.utc_offset_minutes()?;
        for (model, p) in self.pricing.models.iter() {
            p.validate(&format!("pricing.models.{model}"))?;
        }
        if let Some(p) = &self.pricing.fallback {
            p.validate("pricing.fallback")?;
        }
        let rs = &self.request_spike;
        if rs.burst_factor < 1.0 || !rs.burst_factor.is_finite() {
            return Err(bad("request_spike.burst_factor", "must be at least 1"));
        }
        if !(rs.p_value > 0.0 && rs.p_value < 0.5) {
            return Err(bad("request_spike.p_value", "must be between 0 and 0.5"));
        }
        if !(0.0..=1.0).contains(&rs.prior_fraction) {
            return Err(bad("request_spike.prior_fraction", "must be from 0 to 1"));
        }
        positive("request_spike.prior_requests", rs.prior_requests)?;
        positive("request_spike.prior_minutes", rs.prior_minutes)?;
        positive("request_spike.half_life_minutes", rs.half_life_minutes)?;
        if !(0.0..=1.0).contains(&rs.min_fraction_of_tier) {
            return Err(bad(
                "request_spike.min_fraction_of_tier",
                "must be from 0 to 1",
            ));
        }
        let ts = &self.token_spike;
        positive("token_spike.huge_fraction_of_max", ts.huge_fraction_of_max)?;
        positive("token_spike.burst_z", ts.burst_z)?;
        positive(
            "token_spike.min_max_outputs_per_minute",
            ts.min_max_outputs_per_minute,
        )?;
        positive("token_spike.half_life", ts.half_life)?;
        if !(0.0..=1.0).contains(&ts.min_day_fraction) {
            return Err(bad("token_spike.min_day_fraction", "must be from 0 to 1"));
        }
        let max_recent = crate::detect::token_spike::MAX_RECENT;
        if ts.exhaustion_count == 0 || ts.exhaustion_count > max_recent {
            return Err(bad("token_spike.exhaustion_count", "must be from 1 to 6"));
        }
        if ts.cap_share_min_hits == 0 || ts.cap_share_min_hits > max_recent {
            return Err(bad("token_spike.cap_share_min_hits", "must be from 1 to 6"));
        }
        if !(ts.cap_share_prior > 0.0 && ts.cap_share_prior < 1.0) {
            return Err(bad(
                "token_spike.cap_share_prior",
                "must be between 0 and 1",
            ));
        }
        positive(
            "token_spike.cap_share_prior_answers",
            ts.cap_share_prior_answers,
        )?;
        positive("token_spike.cap_share_half_life", ts.cap_share_half_life)?;
        if !(ts.cap_share_p_value > 0.0 && ts.cap_share_p_value < 0.5) {
            return Err(bad(
                "token_spike.cap_share_p_value",
                "must be between 0 and 0.5",
            ));
        }
        positive("token_spike.prompt_z", ts.prompt_z)?;
        positive("token_spike.prompt_factor", ts.prompt_factor)?;
        if ts.window_minutes == 0 {
            return Err(bad("token_spike.window_minutes", "must be at least 1"));
        }
        let sc = &self.subjects;
        if sc.max_buffered == 0 {
            return Err(bad("subjects.max_buffered", "must be at least 1"));
        }
        if sc.idle_ttl_hours == 0 {
            return Err(bad("subjects.idle_ttl_hours", "must be at least 1"));
        }
        let kc = &self.key_cycling;
        if kc.window_minutes == 0 || kc.min_accounts < 2 {
            return Err(bad(
                "key_cycling",
                "window_minutes must be at least 1 and min_accounts at least 2",
            ));
        }
        positive("key_cycling.factor", kc.factor)?;
        positive("key_cycling.prior_accounts", kc.prior_accounts)?;
        let cs = &self.credential_stuffing;
        if cs.window_minutes == 0 || cs.min_failures == 0 || cs.min_keys == 0 {
            return Err(bad(
                "credential_stuffing",
                "window_minutes, min_failures and min_keys must be at least 1",
            ));
        }
        positive("credential_stuffing.factor", cs.factor)?;
        let ks = &self.key_sharing;
        if ks.window_minutes == 0 || ks.min_users < 2 {
            return Err(bad(
                "key_sharing",
                "window_minutes must be at least 1 and min_users at least 2",
            ));
        }
        positive("key_sharing.factor", ks.factor)?;
        let dc = &self.data_center_share;
        if dc.window_minutes == 0 || dc.min_requests == 0 {
            return Err(bad(
                "data_center_share",
                "window_minutes and min_requests must be at least 1",
            ));
        }
        if !(dc.min_share > 0.0 && dc.min_share <= 1.0) {
            return Err(bad(
                "data_center_share.min_share",
                "must be above 0 and at most 1",
            ));
        }
        if !(0.0..1.0).contains(&dc.max_learned_share) {
            return Err(bad(
                "data_center_share.max_learned_share",
                "must be from 0 to below 1",
            ));
        }
        if !(dc.p_value > 0.0 && dc.p_value < 0.5) {
            return Err(bad(
                "data_center_share.p_value",
                "must be between 0 and 0.5",
            ));
        }
        let rp = &self.repeated_prompt;
        if rp.max_repeats == 0 || rp.max_repeats > 1000 {
            return Err(bad("repeated_prompt.max_repeats", "must be from 1 to 1000"));
        }
        if rp.window_minutes == 0 {
            return Err(bad("repeated_prompt.window_minutes", "must be at least 1"));
        }
        if rp.early_count > 0 && rp.early_count + 1 >= rp.max_repeats {
            return Err(bad(
                "repeated_prompt.early_count",
                "must be at least two below max_repeats",
            ));
        }
        if rp.early_count > 0 && rp.early_window_minutes == 0 {
            return Err(bad(
                "repeated_prompt.early_window_minutes",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&rp.early_max_repeat_share) {
            return Err(bad(
                "repeated_prompt.early_max_repeat_share",
                "must be from 0 to 1",
            ));
        }
        let lk = &self.leaked_key;
        if lk.window_minutes == 0 {
            return Err(bad("leaked_key.window_minutes", "must be at least 1"));
        }
        if lk.min_ips < 2 || lk.min_ips > 1000 {
            return Err(bad("leaked_key.min_ips", "must be from 2 to 1000"));
        }
        if lk.min_asns > lk.min_ips {
            return Err(bad("leaked_key.min_asns", "cannot exceed min_ips"));
        }
        positive("leaked_key.factor", lk.factor)?;
        let rw = &self.runaway_spend;
        positive("runaway_spend.pace_minutes", rw.pace_minutes)?;
        positive("runaway_spend.burst_factor", rw.burst_factor)?;
        positive("runaway_spend.half_life_minutes", rw.half_life_minutes)?;
        if self.state.idle_ttl_hours == 0 {
            return Err(bad("state.idle_ttl_hours", "must be at least 1"));
        }
        if !(1..=86_400).contains(&self.event_time.max_ahead_secs) {
            return Err(bad(
                "event_time.max_ahead_secs",
                format!(
                    "must be from 1 to 86400 (a day), got {}",
                    self.event_time.max_ahead_secs
                ),
            ));
        }
        if self.state.dedup_horizon_minutes == 0 {
            return Err(bad("state.dedup_horizon_minutes", "must be at least 1"));
        }
        Ok(())
    }
}

fn names<T>(m: &BTreeMap<String, T>) -> String {
    m.keys().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_seed_practice() {
        let c = EngineConfig::default();
        c.validate().unwrap();
        let t = c.effective_tiers();
        assert_eq!(
            t["free"],
            TierConfig {
                requests_per_minute: 10,
                tokens_per_day: 10_000,
                max_output_tokens: 500,
                daily_budget_usd: 1.0,
                monthly_budget_usd: None
            }
        );
        assert_eq!(
            (
                t["pro"].requests_per_minute,
                t["pro"].tokens_per_day,
                t["pro"].max_output_tokens
            ),
            (60, 100_000, 4_000)
        );
        assert_eq!(t["enterprise"].daily_budget_usd, 500.0);
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = EngineConfig::default();
        c.tiers.insert(
            "pro".into(),
            TierConfig {
                requests_per_minute: 0,
                tokens_per_day: 1,
                max_output_tokens: 1,
                daily_budget_usd: 1.0,
                monthly_budget_usd: None,
            },
        );
        assert_eq!(
            c.validate().unwrap_err().field,
            "tiers.pro.requests_per_minute"
        );
        let mut c = EngineConfig {
            default_tier: "gold".into(),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("default_tier: no tier named \"gold\""));
        c.default_tier = "free".into();
        c.budgets.utc_offset = "CET".into();
        assert_eq!(c.validate().unwrap_err().field, "budgets.utc_offset");
        c.budgets.utc_offset = "+01:00".into();
        c.budgets.alert_percents = vec![50, 50];
        assert_eq!(c.validate().unwrap_err().field, "budgets.alert_percents");
    }
}
