//! The alert: every detector decision, as contracts/alerts-and-feed.md defines it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hash::deterministic_id;
use crate::time::{format_rfc3339, parse_rfc3339, PeriodKind};

/// Which detector decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Spend passed a percent of a daily or monthly budget.
    BudgetThreshold,
    /// Tokens passed the tier's daily token allowance (an extension of the contract).
    TokenQuota,
    /// Requests per minute far above the subject's learned rate.
    RequestSpike,
    /// Huge completions or tokens per minute far above the user's learned rate.
    TokenSpike,
    /// One user sending the same prompt again and again.
    RepeatedPrompt,
    /// Many users repeating the same prompt (an extension of the contract).
    PromptFarming,
    /// One key used from many networks at once (an extension of the contract).
    LeakedKey,
    /// Spend at a pace that empties the daily budget within the hour (an extension of the contract).
    RunawaySpend,
    /// Many accounts from one address or network (an extension of the contract).
    KeyCycling,
    /// Failed authentications for many keys from one address (an extension of the contract).
    CredentialStuffing,
    /// One key under more accounts than it serves (an extension of the contract).
    KeySharing,
    /// A key's traffic moving to hosting networks (an extension of the contract).
    DataCenterShare,
    /// Not a detector's: a receiver answered `410 Gone` and keywatch stopped
    /// sending to it (an operator alert; its `user_id` is `keywatch`).
    ReceiverDisabled,
}

impl AlertKind {
    /// The contract's name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::BudgetThreshold => "budget_threshold",
            AlertKind::TokenQuota => "token_quota",
            AlertKind::RequestSpike => "request_spike",
            AlertKind::TokenSpike => "token_spike",
            AlertKind::RepeatedPrompt => "repeated_prompt",
            AlertKind::PromptFarming => "prompt_farming",
            AlertKind::LeakedKey => "leaked_key",
            AlertKind::RunawaySpend => "runaway_spend",
            AlertKind::KeyCycling => "key_cycling",
            AlertKind::CredentialStuffing => "credential_stuffing",
            AlertKind::KeySharing => "key_sharing",
            AlertKind::DataCenterShare => "data_center_share",
            AlertKind::ReceiverDisabled => "receiver_disabled",
        }
    }

    /// Whether the second stage decides it (subjects other than one account).
    pub fn second_stage(self) -> bool {
        matches!(
            self,
            AlertKind::PromptFarming
                | AlertKind::KeyCycling
                | AlertKind::CredentialStuffing
                | AlertKind::KeySharing
                | AlertKind::DataCenterShare
        )
    }

    /// Every detector's kind, in a fixed order.
    pub const ALL: [AlertKind; 12] = [
        AlertKind::BudgetThreshold,
        AlertKind::TokenQuota,
        AlertKind::RequestSpike,
        AlertKind::TokenSpike,
        AlertKind::RepeatedPrompt,
        AlertKind::PromptFarming,
        AlertKind::LeakedKey,
        AlertKind::RunawaySpend,
        AlertKind::KeyCycling,
        AlertKind::CredentialStuffing,
        AlertKind::KeySharing,
        AlertKind::DataCenterShare,
    ];
}

/// How urgent an alert is (ordered: `Info < Warning < Critical`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// For the record.
    #[default]
    Info,
    /// Someone should look today.
    Warning,
    /// Someone should look now.
    Critical,
}

impl Severity {
    /// The contract's name of the severity.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What a gateway should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Tell people; change nothing.
    Notify,
    /// Slow the key down.
    Throttle,
    /// Refuse the key.
    Block,
}

impl Action {
    /// The contract's name of the action.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Notify => "notify",
            Action::Throttle => "throttle",
            Action::Block => "block",
        }
    }
}

/// The budget part of a `budget_threshold` alert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetInfo {
    /// `day` or `month`.
    pub period: PeriodKind,
    /// Start of the period.
    #[serde(with = "rfc3339")]
    pub period_start: i64,
    /// The budget.
    pub limit_usd: f64,
    /// Spend so far in the period, including the crossing record.
    pub spent_usd: f64,
    /// The percent crossed.
    pub percent: u8,
}

/// One detector decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Deterministic id: the same decision on the same data always gets the same id.
    pub id: String,
    /// The detector.
    pub kind: AlertKind,
    /// Urgency.
    pub severity: Severity,
    /// What a gateway should do.
    pub action: Action,
    /// The account.
    pub user_id: String,
    /// The key, when the subject is a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The address, when the subject is an address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Event time of the record that made the condition true.
    #[serde(with = "rfc3339")]
    pub ts: i64,
    /// What was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<f64>,
    /// What was expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// The limit crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Budget details, for `budget_threshold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetInfo>,
    /// When a `throttle` or `block` should lapse on its own (an extension of the
    /// contract; budget blocks end with their period). Absent: until lifted.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_rfc3339")]
    pub expires_at: Option<i64>,
    /// The user's tier when the alert fired (an extension of the contract:
    /// receivers route on it). Absent when the subject is not one user's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// One sentence for the person on call.
    pub reason: String,
}

impl Alert {
    /// The deterministic id of a decision: kind, subject and the window or
    /// period (plus threshold) that make it unique.
    pub fn make_id(kind: AlertKind, subject: &str, window: &str) -> String {
        deterministic_id(&[kind.as_str(), subject, window])
    }
}

/// Rounds money for display and storage (cents are not enough for per-request costs).
pub fn round_usd(micros: u64) -> f64 {
    micros as f64 / 1e6
}

/// Serde helpers for RFC 3339 timestamps held as Unix milliseconds.
pub mod rfc3339 {
    use super::*;

    /// Writes the timestamp.
    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_rfc3339(*ms))
    }

    /// Reads the timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let s = String::deserialize(d)?;
        parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 timestamp: {s:?}")))
    }
}

/// Serde helpers for optional RFC 3339 timestamps.
pub mod opt_rfc3339 {
    use super::*;

    /// Writes the timestamp.
    pub fn serialize<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match ms {
            Some(ms) => s.serialize_str(&format_rfc3339(*ms)),
            None => s.serialize_none(),
        }
    }

    /// Reads the timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => parse_rfc3339(&s).map(Some).ok_or_else(|| {
                serde::de::Error::custom(format!("not an RFC 3339 timestamp: {s:?}"))
            }),
            None => Ok(None),
        }
    }
}
