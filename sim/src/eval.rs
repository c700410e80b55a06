//! Scoring a run: which injected attacks were alerted on, how fast, and how
//! many alerts fired on benign traffic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use super::render::push_rfc3339;
use super::{Attack, AttackKind};

/// How long before an attack's onset an alert may fire and still count (the
/// detector's clock and the simulator's may disagree slightly).
const EARLY_SLACK_MS: i64 = 60_000;
/// How long after an attack's end an alert may fire and still count
/// (baselines and windows take time to notice).
const LATE_SLACK_MS: i64 = 30 * 60_000;
/// Alert kinds that are not detections but quota bookkeeping: firing on a
/// benign user is expected and not a false positive.
const QUOTA_KINDS: [&str; 2] = ["budget_threshold", "token_quota"];
/// How many false positives [`Evaluation`] keeps as examples.
const MAX_FP_EXAMPLES: usize = 10;

/// What the evaluator needs of an alert (the CLI maps its alerts to this).
#[derive(Clone, Copy, Debug)]
pub struct AlertRef<'a> {
    /// The alert kind, e.g. `request_spike` or `budget_threshold`.
    pub kind: &'a str,
    /// The account the alert is about.
    pub user_id: &'a str,
    /// The API key the alert is about, when it names one.
    pub key_id: Option<&'a str>,
    /// When the alert fired (event time, unix ms).
    pub ts_ms: i64,
    /// What keywatch did, e.g. `notify`, `throttle` or `block`.
    pub action: &'a str,
    /// How urgent it is: `info`, `warning` or `critical`. Warnings and
    /// criticals page someone; info alerts are a record to look at.
    pub severity: &'a str,
}

impl AlertRef<'_> {
    /// Whether the alert pages someone (warning or critical).
    pub fn pages(&self) -> bool {
        self.severity != "info"
    }

    /// Whether the alert asks gateways to hold the key or account back.
    pub fn restricts(&self) -> bool {
        self.action == "throttle" || self.action == "block"
    }
}

/// The attack kinds the detection bars are about: floods, token
/// exhaustion, farming (one account or many) and budget drains.
pub const CORE_KINDS: [AttackKind; 5] = [
    AttackKind::RequestFlood,
    AttackKind::TokenExhaustion,
    AttackKind::PromptFarming,
    AttackKind::CoordinatedFarming,
    AttackKind::BudgetDrain,
];

/// The core kinds judged by [`FAST_MS`]. Prompt farming is not: a prompt
/// repeated once a minute has been seen only three times two minutes in,
/// which a person regenerating an answer also does; its bar is a median.
pub const FAST_KINDS: [AttackKind; 4] = [
    AttackKind::RequestFlood,
    AttackKind::TokenExhaustion,
    AttackKind::CoordinatedFarming,
    AttackKind::BudgetDrain,
];

/// A detection is "fast" within this long of the onset.
pub const FAST_MS: i64 = 2 * 60_000;

/// The first hours of a run, when every account is new to the detectors:
/// pages then are reported on their own as the cold-start figure.
pub const COLD_START_MS: i64 = 6 * 3_600_000;

/// Detection of one attack kind.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct KindScore {
    /// Attacks of the kind (campaigns counted once).
    pub attacks: usize,
    /// Attacks with at least one matching alert.
    pub detected: usize,
    /// Detected within [`FAST_MS`] of the onset.
    pub fast: usize,
    /// Median time to detect, ms (nearest rank), `None` when nothing was detected.
    pub p50_ms: Option<i64>,
    /// 99th-percentile time to detect, ms (nearest rank).
    pub p99_ms: Option<i64>,
    /// Slowest detection, ms.
    pub max_ms: Option<i64>,
}

impl KindScore {
    /// Fills in the detection figures from the latencies of the detected attacks.
    fn fill(&mut self, mut found: Vec<i64>) {
        found.sort_unstable();
        self.detected = found.len();
        self.fast = found.iter().filter(|&&l| l <= FAST_MS).count();
        self.p50_ms = percentile(&found, 0.5);
        self.p99_ms = percentile(&found, 0.99);
        self.max_ms = found.last().copied();
    }
}

/// Alerts on benign traffic, of one alert kind.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct BenignScore {
    /// Warning and critical alerts (pages).
    pub pages: usize,
    /// Info alerts.
    pub info: usize,
    /// Alerts asking to throttle or block.
    pub restrictions: usize,
}

/// The score of a run against its ground truth.
///
/// A coordinated-farming campaign is one attack however many accounts it
/// used: its head entry (key `None`) and its member entries (same onset and
/// end) are detected together when any of them is alerted on.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Benign user-days of the run (the denominator of the rates).
    pub benign_user_days: f64,
    /// Attacks injected (campaigns counted once).
    pub attacks: usize,
    /// Attacks with at least one matching alert.
    pub detected: usize,
    /// Per attack, in ground-truth order: its kind and detection latency
    /// (first matching alert minus onset, at least 0), `None` when missed.
    pub latencies_ms: Vec<(AttackKind, Option<i64>)>,
    /// The largest detection latency, `None` when nothing was detected.
    pub max_latency_ms: Option<i64>,
    /// Detection per attack kind (kinds with no attack left out).
    pub by_attack: BTreeMap<AttackKind, KindScore>,
    /// Detection per form of a kind (`kind (variant)`), for attacks whose
    /// ground truth names a variant.
    pub by_variant: BTreeMap<String, KindScore>,
    /// Per attack with a variant, in ground-truth order: `kind (variant)`
    /// and its detection latency (so runs can be pooled).
    pub variant_latencies_ms: Vec<(String, Option<i64>)>,
    /// Share of core attacks ([`CORE_KINDS`]) detected (1 when there were none).
    pub core_recall: f64,
    /// Share of the [`FAST_KINDS`] attacks detected within [`FAST_MS`] (1 when there were none).
    pub core_fast: f64,
    /// Alerts that match no attack, quota bookkeeping kinds excepted.
    pub false_positive_alerts: usize,
    /// `false_positive_alerts` per 10,000 benign user-days.
    pub false_positives_per_10k_user_days: f64,
    /// Of those, the warnings and criticals: alerts that page someone.
    pub benign_pages: usize,
    /// `benign_pages` per 10,000 benign user-days.
    pub benign_pages_per_10k_user_days: f64,
    /// Distinct benign accounts paged.
    pub benign_accounts_paged: usize,
    /// Distinct benign accounts a detector asked to throttle or block
    /// (budget and quota alerts excepted: they enforce the plan).
    pub benign_accounts_restricted: usize,
    /// Benign pages within [`COLD_START_MS`] of the run's start, when the
    /// truth names it: every account is new to the detectors then.
    pub cold_start_pages: Option<usize>,
    /// Benign alerts per alert kind, quota kinds excepted.
    pub benign_by_detector: BTreeMap<String, BenignScore>,
    /// Alerts matching no attack whose action was `block` (any kind).
    pub benign_blocks: usize,
    /// `budget_threshold` and `token_quota` alerts matching no attack.
    pub benign_budget_alerts: usize,
    /// Every missed attack (a campaign by its head entry).
    pub misses: Vec<Attack>,
    /// Up to 10 benign pages (or, when none, other false positives), one line each.
    pub false_positive_examples: Vec<String>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Scores `alerts` against the ground truth `attacks` (from
/// [`Simulator::attacks`](super::Simulator::attacks)). `start_ms`, when
/// known, is the run's first instant (for the cold-start figure).
///
/// An alert matches an attack when its user is the attack's user (or, when
/// both name a key, its key is the attack's key) and it fired between one
/// minute before the onset and 30 minutes after the end.
pub fn evaluate(
    attacks: &[Attack],
    benign_user_days: f64,
    start_ms: Option<i64>,
    alerts: &[AlertRef<'_>],
) -> Evaluation {
    let group_of = campaign_groups(attacks);
    let groups = group_of.iter().copied().max().map_or(0, |g| g + 1);

    let mut by_user: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, attack) in attacks.iter().enumerate() {
        by_user.entry(attack.user_id.as_str()).or_default().push(i);
        if let Some(key) = &attack.key_id {
            by_key.entry(key.as_str()).or_default().push(i);
        }
    }

    let mut first_alert: Vec<Option<i64>> = vec![None; groups];
    let mut eval = Evaluation {
        benign_user_days,
        attacks: groups,
        detected: 0,
        latencies_ms: Vec::with_capacity(groups),
        max_latency_ms: None,
        by_attack: BTreeMap::new(),
        by_variant: BTreeMap::new(),
        variant_latencies_ms: Vec::new(),
        core_recall: 1.0,
        core_fast: 1.0,
        false_positive_alerts: 0,
        false_positives_per_10k_user_days: 0.0,
        benign_pages: 0,
        benign_pages_per_10k_user_days: 0.0,
        benign_accounts_paged: 0,
        benign_accounts_restricted: 0,
        cold_start_pages: start_ms.map(|_| 0),
        benign_by_detector: BTreeMap::new(),
        benign_blocks: 0,
        benign_budget_alerts: 0,
        misses: Vec::new(),
        false_positive_examples: Vec::new(),
    };
    let mut paged: HashSet<&str> = HashSet::new();
    let mut restricted: HashSet<&str> = HashSet::new();
    let mut other_examples = Vec::new();

    for alert in alerts {
        let in_window = |i: &usize| {
            let a = &attacks[*i];
            a.onset_ms - EARLY_SLACK_MS <= alert.ts_ms && alert.ts_ms <= a.end_ms + LATE_SLACK_MS
        };
        let user_hits = by_user.get(alert.user_id).into_iter().flatten();
        let key_hits = alert
            .key_id
            .and_then(|k| by_key.get(k))
            .into_iter()
            .flatten();
        let mut matched = false;
        for i in user_hits.chain(key_hits).filter(|i| in_window(i)) {
            matched = true;
            let first = &mut first_alert[group_of[*i]];
            *first = Some(first.map_or(alert.ts_ms, |t| t.min(alert.ts_ms)));
        }
        if matched {
            continue;
        }
        if alert.action == "block" {
            eval.benign_blocks += 1;
        }
        if QUOTA_KINDS.contains(&alert.kind) {
            eval.benign_budget_alerts += 1;
            continue;
        }
        eval.false_positive_alerts += 1;
        let score = eval
            .benign_by_detector
            .entry(alert.kind.to_owned())
            .or_default();
        if alert.restricts() {
            score.restrictions += 1;
            restricted.insert(alert.user_id);
        }
        if alert.pages() {
            score.pages += 1;
            eval.benign_pages += 1;
            paged.insert(alert.user_id);
            if let (Some(start), Some(n)) = (start_ms, eval.cold_start_pages.as_mut()) {
                if alert.ts_ms < start + COLD_START_MS {
                    *n += 1;
                }
            }
            if eval.false_positive_examples.len() < MAX_FP_EXAMPLES {
                eval.false_positive_examples.push(describe(alert));
            }
        } else {
            score.info += 1;
            if other_examples.len() < MAX_FP_EXAMPLES {
                other_examples.push(describe(alert));
            }
        }
    }
    if eval.false_positive_examples.is_empty() {
        eval.false_positive_examples = other_examples;
    }
    eval.benign_accounts_paged = paged.len();
    eval.benign_accounts_restricted = restricted.len();

    let mut seen = vec![false; groups];
    let mut found_by_kind: BTreeMap<AttackKind, Vec<i64>> = BTreeMap::new();
    let mut found_by_variant: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (i, attack) in attacks.iter().enumerate() {
        let g = group_of[i];
        if std::mem::replace(&mut seen[g], true) {
            continue;
        }
        // A group's first entry is its head: campaign_groups numbers groups
        // in order of their first entry, and the head precedes its members.
        let head = attack;
        let latency = first_alert[g].map(|t| (t - head.onset_ms).max(0));
        eval.latencies_ms.push((head.kind, latency));
        eval.by_attack.entry(head.kind).or_default().attacks += 1;
        let variant = head
            .variant
            .as_ref()
            .map(|v| format!("{} ({v})", head.kind.as_str()));
        if let Some(v) = &variant {
            eval.by_variant.entry(v.clone()).or_default().attacks += 1;
            eval.variant_latencies_ms.push((v.clone(), latency));
        }
        match latency {
            Some(l) => {
                eval.detected += 1;
                eval.max_latency_ms = Some(eval.max_latency_ms.map_or(l, |m| m.max(l)));
                found_by_kind.entry(head.kind).or_default().push(l);
                if let Some(v) = variant {
                    found_by_variant.entry(v).or_default().push(l);
                }
            }
            None => eval.misses.push(head.clone()),
        }
    }
    for (label, score) in eval.by_variant.iter_mut() {
        score.fill(found_by_variant.remove(label).unwrap_or_default());
    }
    let (mut core, mut core_found) = (0, 0);
    let (mut timed, mut timed_fast) = (0, 0);
    for (kind, score) in eval.by_attack.iter_mut() {
        score.fill(found_by_kind.remove(kind).unwrap_or_default());
        if CORE_KINDS.contains(kind) {
            core += score.attacks;
            core_found += score.detected;
        }
        if FAST_KINDS.contains(kind) {
            timed += score.attacks;
            timed_fast += score.fast;
        }
    }
    if core > 0 {
        eval.core_recall = core_found as f64 / core as f64;
    }
    if timed > 0 {
        eval.core_fast = timed_fast as f64 / timed as f64;
    }

    if benign_user_days > 0.0 {
        let per_10k = |n: usize| n as f64 / benign_user_days * 10_000.0;
        eval.false_positives_per_10k_user_days = per_10k(eval.false_positive_alerts);
        eval.benign_pages_per_10k_user_days = per_10k(eval.benign_pages);
    }
    eval
}

/// Group number of every ground-truth entry, numbered in order of each
/// group's first entry. Coordinated-farming members join the head (key
/// `None`) with the same onset and end; every other entry is its own group.
fn campaign_groups(attacks: &[Attack]) -> Vec<usize> {
    let mut heads: HashMap<(i64, i64), usize> = HashMap::new();
    let mut group_of = Vec::with_capacity(attacks.len());
    let mut next = 0;
    for attack in attacks {
        let is_campaign = attack.kind.grouped();
        let span = (attack.onset_ms, attack.end_ms);
        let group = match (is_campaign, &attack.key_id) {
            (true, None) => {
                let g = next;
                next += 1;
                heads.insert(span, g);
                g
            }
            (true, Some(_)) => match heads.get(&span) {
                Some(&g) => g,
                None => {
                    next += 1;
                    next - 1
                }
            },
            (false, _) => {
                next += 1;
                next - 1
            }
        };
        group_of.push(group);
    }
    group_of
}

fn describe(alert: &AlertRef<'_>) -> String {
    let mut s = String::with_capacity(96);
    push_rfc3339(&mut s, alert.ts_ms);
    s.push(' ');
    s.push_str(alert.kind);
    s.push_str(" user=");
    s.push_str(alert.user_id);
    if let Some(key) = alert.key_id {
        s.push_str(" key=");
        s.push_str(key);
    }
    s.push_str(" action=");
    s.push_str(alert.action);
    s.push_str(" severity=");
    s.push_str(alert.severity);
    s
}

/// `1h02m`, `3m12s`, `41s`, `850ms`.
fn human_ms(ms: i64) -> String {
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    }
}

fn human_opt(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_owned(), human_ms)
}

impl fmt::Display for Evaluation {
    /// Several lines, the last without a newline.
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        let mut text = String::new();
        let f = &mut text;
        writeln!(
            f,
            "attacks detected: {}/{}{}",
            self.detected,
            self.attacks,
            self.max_latency_ms
                .map(|l| format!(" (max latency {})", human_ms(l)))
                .unwrap_or_default()
        )?;
        let kinds = self
            .by_attack
            .iter()
            .map(|(k, s)| (k.as_str().to_owned(), s));
        for (label, k) in kinds.chain(self.by_variant.iter().map(|(l, s)| (format!("  {l}"), s))) {
            writeln!(
                f,
                "  {:<44} {:>3}/{:<3} within 2 min {:>3}  p50 {:>6}  p99 {:>6}  max {:>6}",
                label,
                k.detected,
                k.attacks,
                k.fast,
                human_opt(k.p50_ms),
                human_opt(k.p99_ms),
                human_opt(k.max_ms)
            )?;
        }
        writeln!(
            f,
            "core attacks: {:.3} detected; floods, exhaustion, campaigns and drains {:.3} within 2 minutes; prompt farming median {}",
            self.core_recall,
            self.core_fast,
            human_opt(self.by_attack.get(&AttackKind::PromptFarming).and_then(|k| k.p50_ms))
        )?;
        writeln!(
            f,
            "benign pages (warning/critical): {}, {:.2} per 10k benign user-days, on {} accounts{}",
            self.benign_pages,
            self.benign_pages_per_10k_user_days,
            self.benign_accounts_paged,
            self.cold_start_pages
                .map(|n| format!(
                    "; {n} in the first {} h (cold start)",
                    COLD_START_MS / 3_600_000
                ))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "benign accounts throttled or blocked by a detector: {}",
            self.benign_accounts_restricted
        )?;
        writeln!(
            f,
            "false positives (any severity): {} alerts, {:.2} per 10k benign user-days",
            self.false_positive_alerts, self.false_positives_per_10k_user_days
        )?;
        for (kind, b) in &self.benign_by_detector {
            writeln!(
                f,
                "  {kind:<20} pages {:>4}  info {:>5}  throttle/block {:>4}",
                b.pages, b.info, b.restrictions
            )?;
        }
        writeln!(f, "benign blocks: {}", self.benign_blocks)?;
        writeln!(
            f,
            "benign budget/quota alerts (not false positives): {}",
            self.benign_budget_alerts
        )?;
        for miss in &self.misses {
            let mut onset = String::new();
            push_rfc3339(&mut onset, miss.onset_ms);
            writeln!(
                f,
                "  missed {} user={}{} onset={onset}",
                miss.kind.as_str(),
                miss.user_id,
                miss.key_id
                    .as_deref()
                    .map(|k| format!(" key={k}"))
                    .unwrap_or_default()
            )?;
        }
        for example in &self.false_positive_examples {
            writeln!(f, "  false positive: {example}")?;
        }
        out.write_str(text.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_392_000_000;
    const MIN: i64 = 60_000;

    fn attack(
        kind: AttackKind,
        user: &str,
        key: Option<&str>,
        onset_min: i64,
        end_min: i64,
    ) -> Attack {
        Attack {
            kind,
            user_id: user.to_owned(),
            key_id: key.map(str::to_owned),
            onset_ms: T0 + onset_min * MIN,
            end_ms: T0 + end_min * MIN,
            variant: None,
        }
    }

    fn alert<'a>(
        kind: &'a str,
        user: &'a str,
        key: Option<&'a str>,
        at_min: i64,
        action: &'a str,
    ) -> AlertRef<'a> {
        AlertRef {
            kind,
            user_id: user,
            key_id: key,
            ts_ms: T0 + at_min * MIN,
            action,
            severity: "warning",
        }
    }

    #[test]
    fn match_by_user_and_by_key() {
        let attacks = [
            attack(
                AttackKind::RequestFlood,
                "acct_000001",
                Some("key_aaaaaaaa"),
                100,
                110,
            ),
            attack(
                AttackKind::LeakedKey,
                "acct_000002",
                Some("key_bbbbbbbb"),
                200,
                260,
            ),
        ];
        let alerts = [
            alert("request_spike", "acct_000001", None, 103, "throttle"),
            // Different user string but the attacked key: still a match.
            alert(
                "leaked_key",
                "someone_else",
                Some("key_bbbbbbbb"),
                230,
                "block",
            ),
        ];
        let e = evaluate(&attacks, 1000.0, None, &alerts);
        assert_eq!((e.attacks, e.detected), (2, 2));
        assert_eq!(
            e.latencies_ms,
            vec![
                (AttackKind::RequestFlood, Some(3 * MIN)),
                (AttackKind::LeakedKey, Some(30 * MIN))
            ]
        );
        assert_eq!(e.max_latency_ms, Some(30 * MIN));
        assert_eq!((e.false_positive_alerts, e.benign_blocks), (0, 0));
        assert!(e.misses.is_empty());
    }

    #[test]
    fn window_edges_and_early_alerts_clamp_to_zero() {
        let attacks = [attack(AttackKind::TokenExhaustion, "u", None, 100, 110)];
        // One minute early counts (latency 0), 30 min after the end counts.
        let e = evaluate(&attacks, 1.0, None, &[alert("k", "u", None, 99, "notify")]);
        assert_eq!(e.latencies_ms, vec![(AttackKind::TokenExhaustion, Some(0))]);
        let e = evaluate(&attacks, 1.0, None, &[alert("k", "u", None, 140, "notify")]);
        assert_eq!(e.detected, 1);
        // Just outside on either side: a miss and a false positive.
        let mut late = alert("k", "u", None, 140, "notify");
        late.ts_ms += 1;
        let early = alert("k", "u", None, 98, "notify");
        let e = evaluate(&attacks, 1.0, None, &[late, early]);
        assert_eq!((e.detected, e.false_positive_alerts), (0, 2));
        assert_eq!(e.misses, attacks.to_vec());
    }

    #[test]
    fn false_positives_blocks_and_quota_alerts() {
        let attacks = [attack(
            AttackKind::PromptFarming,
            "acct_000009",
            Some("key_09"),
            100,
            130,
        )];
        let alerts = [
            alert(
                "prompt_farming",
                "acct_000009",
                Some("key_09"),
                120,
                "notify",
            ),
            alert("request_spike", "acct_000100", Some("key_x"), 50, "block"),
            alert("leaked_key", "acct_000101", None, 500, "notify"),
            alert("budget_threshold", "acct_000102", None, 600, "notify"),
            alert("token_quota", "acct_000103", None, 700, "block"),
        ];
        let e = evaluate(&attacks, 2000.0, None, &alerts);
        assert_eq!(e.detected, 1);
        assert_eq!(e.false_positive_alerts, 2);
        assert!((e.false_positives_per_10k_user_days - 10.0).abs() < 1e-9);
        // Blocks count whatever the kind, quota kinds included.
        assert_eq!(e.benign_blocks, 2);
        assert_eq!(e.benign_budget_alerts, 2);
        assert_eq!(e.false_positive_examples.len(), 2);
        assert!(e.false_positive_examples[0].contains("request_spike user=acct_000100"));
        let report = e.to_string();
        assert!(report.contains("prompt_farming"), "{report}");
        assert!(report.contains("benign blocks: 2"), "{report}");
    }

    #[test]
    fn a_campaign_counts_once_and_any_member_detects_it() {
        let attacks = [
            attack(
                AttackKind::CoordinatedFarming,
                "acct_f000001",
                None,
                100,
                130,
            ),
            attack(
                AttackKind::CoordinatedFarming,
                "acct_f000001",
                Some("key_f1"),
                100,
                130,
            ),
            attack(
                AttackKind::CoordinatedFarming,
                "acct_f000002",
                Some("key_f2"),
                100,
                130,
            ),
            attack(
                AttackKind::CoordinatedFarming,
                "acct_f000003",
                Some("key_f3"),
                100,
                130,
            ),
            attack(
                AttackKind::RequestFlood,
                "acct_000001",
                Some("key_a"),
                300,
                310,
            ),
        ];
        let alerts = [
            alert(
                "coordinated_farming",
                "acct_f000003",
                Some("key_f3"),
                112,
                "block",
            ),
            alert(
                "coordinated_farming",
                "acct_f000002",
                Some("key_f2"),
                125,
                "block",
            ),
        ];
        let e = evaluate(&attacks, 10.0, None, &alerts);
        assert_eq!(e.attacks, 2);
        assert_eq!(e.detected, 1);
        assert_eq!(
            e.latencies_ms,
            vec![
                (AttackKind::CoordinatedFarming, Some(12 * MIN)),
                (AttackKind::RequestFlood, None)
            ]
        );
        assert_eq!(e.benign_blocks, 0);
        assert_eq!(e.misses, vec![attacks[4].clone()]);
        // Nothing at all: the campaign is missed by its head entry.
        let e = evaluate(&attacks, 10.0, None, &[]);
        assert_eq!(e.misses, vec![attacks[0].clone(), attacks[4].clone()]);
        assert_eq!(e.max_latency_ms, None);
    }

    #[test]
    fn pages_info_restrictions_cold_start_and_variants() {
        let mut flood = attack(AttackKind::RequestFlood, "victim", Some("k1"), 600, 610);
        flood.variant = Some("stolen key".into());
        let mut slow = attack(AttackKind::PromptFarming, "farmer", Some("k2"), 600, 700);
        slow.variant = Some("slow".into());
        let attacks = [flood, slow];
        let mut info = alert("request_spike", "benign_1", None, 10, "notify");
        info.severity = "info";
        let alerts = [
            // Detections: one fast, one after ten minutes.
            alert("request_spike", "victim", Some("k1"), 601, "throttle"),
            alert("repeated_prompt", "farmer", Some("k2"), 610, "block"),
            // Benign: an info alert is not a page, a throttle restricts.
            info,
            alert("token_spike", "benign_2", None, 30, "throttle"),
            alert("token_spike", "benign_2", None, 400, "throttle"),
            alert("budget_threshold", "benign_3", None, 50, "block"),
        ];
        let e = evaluate(&attacks, 5000.0, Some(T0), &alerts);
        assert_eq!(e.benign_pages, 2);
        assert!((e.benign_pages_per_10k_user_days - 4.0).abs() < 1e-9);
        assert_eq!(e.benign_accounts_paged, 1);
        assert_eq!(
            e.benign_accounts_restricted, 1,
            "budget blocks enforce the plan"
        );
        assert_eq!(
            e.cold_start_pages,
            Some(1),
            "the page at minute 400 is after 6 h"
        );
        assert_eq!(e.false_positive_alerts, 3);
        assert_eq!(e.benign_by_detector["request_spike"].info, 1);
        assert_eq!(e.benign_by_detector["token_spike"].restrictions, 2);
        let f = &e.by_attack[&AttackKind::RequestFlood];
        assert_eq!((f.detected, f.fast, f.p50_ms), (1, 1, Some(MIN)));
        let p = &e.by_variant["prompt_farming (slow)"];
        assert_eq!((p.detected, p.fast, p.max_ms), (1, 0, Some(10 * MIN)));
        assert!((e.core_recall - 1.0).abs() < 1e-9);
        assert!((e.core_fast - 1.0).abs() < 1e-9, "farming has its own bar");
        let text = e.to_string();
        assert!(text.contains("prompt_farming (slow)"), "{text}");
        assert!(text.contains("1 in the first 6 h"), "{text}");
    }

    #[test]
    fn fp_examples_are_capped() {
        let alerts: Vec<AlertRef<'_>> = (0..25)
            .map(|i| alert("request_spike", "acct_1", None, i, "notify"))
            .collect();
        let e = evaluate(&[], 0.0, None, &alerts);
        assert_eq!(e.false_positive_alerts, 25);
        assert_eq!(e.false_positive_examples.len(), MAX_FP_EXAMPLES);
        assert_eq!(e.false_positives_per_10k_user_days, 0.0);
        assert_eq!(e.attacks, 0);
    }
}
