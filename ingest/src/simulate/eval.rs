//! Scoring a run: which injected attacks were alerted on, how fast, and how
//! many alerts fired on benign traffic.

use std::collections::HashMap;
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
}

/// The score of a run against its ground truth.
///
/// A coordinated-farming campaign is one attack however many accounts it
/// used: its head entry (key `None`) and its member entries (same onset and
/// end) are detected together when any of them is alerted on.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Attacks injected (campaigns counted once).
    pub attacks: usize,
    /// Attacks with at least one matching alert.
    pub detected: usize,
    /// Per attack, in ground-truth order: its kind and detection latency
    /// (first matching alert minus onset, at least 0), `None` when missed.
    pub latencies_ms: Vec<(AttackKind, Option<i64>)>,
    /// The largest detection latency, `None` when nothing was detected.
    pub max_latency_ms: Option<i64>,
    /// Alerts that match no attack, quota bookkeeping kinds excepted.
    pub false_positive_alerts: usize,
    /// `false_positive_alerts` per 10,000 benign user-days.
    pub false_positives_per_10k_user_days: f64,
    /// Alerts matching no attack whose action was `block` (any kind).
    pub benign_blocks: usize,
    /// `budget_threshold` and `token_quota` alerts matching no attack.
    pub benign_budget_alerts: usize,
    /// Every missed attack (a campaign by its head entry).
    pub misses: Vec<Attack>,
    /// Up to 10 false positives, described in one line each.
    pub false_positive_examples: Vec<String>,
}

/// Scores `alerts` against the ground truth `attacks` (from
/// [`Simulator::attacks`](super::Simulator::attacks)).
///
/// An alert matches an attack when its user is the attack's user (or, when
/// both name a key, its key is the attack's key) and it fired between one
/// minute before the onset and 30 minutes after the end.
pub fn evaluate(attacks: &[Attack], benign_user_days: f64, alerts: &[AlertRef<'_>]) -> Evaluation {
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
        attacks: groups,
        detected: 0,
        latencies_ms: Vec::with_capacity(groups),
        max_latency_ms: None,
        false_positive_alerts: 0,
        false_positives_per_10k_user_days: 0.0,
        benign_blocks: 0,
        benign_budget_alerts: 0,
        misses: Vec::new(),
        false_positive_examples: Vec::new(),
    };

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
        if eval.false_positive_examples.len() < MAX_FP_EXAMPLES {
            eval.false_positive_examples.push(describe(alert));
        }
    }

    let mut seen = vec![false; groups];
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
        match latency {
            Some(l) => {
                eval.detected += 1;
                eval.max_latency_ms = Some(eval.max_latency_ms.map_or(l, |m| m.max(l)));
            }
            None => eval.misses.push(head.clone()),
        }
    }

    if benign_user_days > 0.0 {
        eval.false_positives_per_10k_user_days =
            eval.false_positive_alerts as f64 / benign_user_days * 10_000.0;
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
        let is_campaign = attack.kind == AttackKind::CoordinatedFarming;
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
        for kind in AttackKind::ALL {
            let of_kind = self.latencies_ms.iter().filter(|(k, _)| *k == kind);
            let total = of_kind.clone().count();
            if total == 0 {
                continue;
            }
            let found: Vec<i64> = of_kind.filter_map(|(_, l)| *l).collect();
            write!(f, "  {:<20} {:>3}/{:<3}", kind.as_str(), found.len(), total)?;
            if let Some(max) = found.iter().max() {
                write!(f, " max latency {}", human_ms(*max))?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "false positives: {} alerts, {:.2} per 10k benign user-days",
            self.false_positive_alerts, self.false_positives_per_10k_user_days
        )?;
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
        let e = evaluate(&attacks, 1000.0, &alerts);
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
        let e = evaluate(&attacks, 1.0, &[alert("k", "u", None, 99, "notify")]);
        assert_eq!(e.latencies_ms, vec![(AttackKind::TokenExhaustion, Some(0))]);
        let e = evaluate(&attacks, 1.0, &[alert("k", "u", None, 140, "notify")]);
        assert_eq!(e.detected, 1);
        // Just outside on either side: a miss and a false positive.
        let mut late = alert("k", "u", None, 140, "notify");
        late.ts_ms += 1;
        let early = alert("k", "u", None, 98, "notify");
        let e = evaluate(&attacks, 1.0, &[late, early]);
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
        let e = evaluate(&attacks, 2000.0, &alerts);
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
        let e = evaluate(&attacks, 10.0, &alerts);
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
        let e = evaluate(&attacks, 10.0, &[]);
        assert_eq!(e.misses, vec![attacks[0].clone(), attacks[4].clone()]);
        assert_eq!(e.max_latency_ms, None);
    }

    #[test]
    fn fp_examples_are_capped() {
        let alerts: Vec<AlertRef<'_>> = (0..25)
            .map(|i| alert("request_spike", "acct_1", None, i, "notify"))
            .collect();
        let e = evaluate(&[], 0.0, &alerts);
        assert_eq!(e.false_positive_alerts, 25);
        assert_eq!(e.false_positive_examples.len(), MAX_FP_EXAMPLES);
        assert_eq!(e.false_positives_per_10k_user_days, 0.0);
        assert_eq!(e.attacks, 0);
    }
}
