//! Properties of whole simulated runs, checked on the lines themselves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Instant;

use serde_json::Value;

use super::render::parse_rfc3339_ms;
use super::*;

/// One parsed line.
#[derive(Clone, Debug)]
struct Rec {
    ts: i64,
    request_id: String,
    phase: Phase,
    user: String,
    key: String,
    tier: usize,
    ip: String,
    asn: u64,
    user_agent: String,
    model: usize,
    status: Option<u64>,
    prompt_tokens: u64,
    completion_tokens: Option<u64>,
    cost_usd: Option<f64>,
    fingerprint: Option<String>,
}

impl Rec {
    /// A request arrives with this record (exchange or request phase).
    fn is_arrival(&self) -> bool {
        self.phase != Phase::Response
    }

    /// Tokens this record adds to the daily count, by the contract:
    /// exchange both, request the prompt, response the completion.
    fn counted_tokens(&self) -> u64 {
        match self.phase {
            Phase::Exchange => self.prompt_tokens + self.completion_tokens.unwrap_or(0),
            Phase::Request => self.prompt_tokens,
            Phase::Response => self.completion_tokens.unwrap_or(0),
        }
    }

    /// Cost this record adds (exchange and response), priced by the table
    /// when the gateway left it out.
    fn counted_cost(&self) -> f64 {
        if self.phase == Phase::Request {
            return 0.0;
        }
        self.cost_usd.unwrap_or_else(|| {
            let ct = self.completion_tokens.unwrap_or(0) as u32;
            cost_e8(self.model as u8, self.prompt_tokens as u32, ct) as f64 * 1e-8
        })
    }
}

struct Run {
    /// The unique records (redelivered duplicates dropped), in output order.
    recs: Vec<Rec>,
    attacks: Vec<Attack>,
    lines: usize,
    duplicates: usize,
    bytes: usize,
    min_len: usize,
    max_len: usize,
    start_ms: i64,
    end_ms: i64,
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks one line against the contract and parses it; panics with the line
/// on any violation.
fn check_line(line: &str) -> Rec {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    let str_of = |k: &str| obj.get(k).and_then(Value::as_str);
    let u64_of = |k: &str| obj.get(k).and_then(Value::as_u64);
    let req_str =
        |k: &str| str_of(k).unwrap_or_else(|| panic!("{k} missing or not a string: {line}"));
    let req_u64 =
        |k: &str| u64_of(k).unwrap_or_else(|| panic!("{k} missing or not an integer: {line}"));

    let ts = parse_rfc3339_ms(req_str("ts")).unwrap_or_else(|| panic!("bad ts: {line}"));
    let request_id = req_str("request_id");
    assert!(
        request_id.starts_with("req_") && is_lower_hex(&request_id[4..], 16),
        "{line}"
    );
    let phase = match str_of("phase") {
        None => Phase::Exchange,
        Some("request") => Phase::Request,
        Some("response") => Phase::Response,
        Some(other) => panic!("phase {other}: {line}"),
    };
    let user = req_str("user_id");
    let digits = user
        .strip_prefix("acct_f")
        .or_else(|| user.strip_prefix("acct_"))
        .unwrap_or("");
    assert!(
        digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()),
        "{line}"
    );
    let key = req_str("key_id");
    assert!(
        key.starts_with("key_") && is_lower_hex(&key[4..], 8),
        "{line}"
    );
    let tier = TIER_LIMITS
        .iter()
        .position(|t| t.name == req_str("tier"))
        .unwrap_or_else(|| panic!("{line}"));
    let ip = req_str("ip");
    let addr: Ipv4Addr = ip.parse().unwrap_or_else(|_| panic!("ip: {line}"));
    assert!(
        !addr.is_private() && !addr.is_loopback() && !addr.is_unspecified(),
        "{line}"
    );
    let asn = req_u64("asn");
    assert!(asn > 0 && asn <= u64::from(u32::MAX), "{line}");
    let user_agent = req_str("user_agent");
    assert!(!user_agent.is_empty() && user_agent.len() <= 512, "{line}");
    let endpoint = req_str("endpoint");
    assert!(endpoint == CHAT || endpoint == EMBEDDINGS, "{line}");
    let model = MODELS
        .iter()
        .position(|m| m.name == req_str("model"))
        .unwrap_or_else(|| panic!("{line}"));
    let prompt_tokens = req_u64("prompt_tokens");

    let (status, completion_tokens, cost_usd) = if phase == Phase::Request {
        for k in ["status", "completion_tokens", "cost_usd", "latency_ms"] {
            assert!(!obj.contains_key(k), "request phase with {k}: {line}");
        }
        (None, None, None)
    } else {
        let status = req_u64("status");
        assert!([200, 400, 401, 403, 429, 500].contains(&status), "{line}");
        let ct = req_u64("completion_tokens");
        if endpoint == EMBEDDINGS || status != 200 {
            assert_eq!(ct, 0, "{line}");
        }
        assert!(
            ct <= u64::from(TIER_LIMITS[tier].max_output_tokens),
            "{line}"
        );
        let latency = req_u64("latency_ms");
        assert!(latency < 600_000, "{line}");
        let cost = obj.get("cost_usd").map(|c| {
            let c = c.as_f64().unwrap_or_else(|| panic!("cost: {line}"));
            let want = cost_e8(model as u8, prompt_tokens as u32, ct as u32) as f64 * 1e-8;
            assert!(
                c >= 0.0 && (c - want).abs() <= 1e-9 + want * 1e-12,
                "cost {c} vs {want}: {line}"
            );
            c
        });
        (Some(status), Some(ct), cost)
    };

    let fingerprint = if phase == Phase::Response {
        for k in ["prompt_fingerprint", "prompt", "prompt_chars"] {
            assert!(!obj.contains_key(k), "response phase with {k}: {line}");
        }
        None
    } else {
        let fp = str_of("prompt_fingerprint");
        let text = str_of("prompt");
        assert!(
            fp.is_some() != text.is_some(),
            "exactly one of fingerprint and prompt: {line}"
        );
        if let Some(fp) = fp {
            assert!(is_lower_hex(fp, 16), "{line}");
        }
        let chars = req_u64("prompt_chars");
        if let Some(text) = text {
            assert_eq!(text.len() as u64, chars, "{line}");
        }
        fp.map(str::to_owned)
    };
    let known = [
        "ts",
        "request_id",
        "phase",
        "user_id",
        "key_id",
        "tier",
        "ip",
        "asn",
        "user_agent",
        "endpoint",
        "model",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "latency_ms",
        "prompt_fingerprint",
        "prompt",
        "prompt_chars",
    ];
    assert!(obj.keys().all(|k| known.contains(&k.as_str())), "{line}");

    Rec {
        ts,
        request_id: request_id.to_owned(),
        phase,
        user: user.to_owned(),
        key: key.to_owned(),
        tier,
        ip: ip.to_owned(),
        asn,
        user_agent: user_agent.to_owned(),
        model,
        status,
        prompt_tokens,
        completion_tokens,
        cost_usd,
        fingerprint,
    }
}

/// Runs the simulator to the end, checking every line, the event-time
/// order and the duplicates on the way.
fn run_checked(cfg: SimConfig) -> Run {
    let start_ms = cfg.start_ms;
    let end_ms = cfg.start_ms + (cfg.hours * HOUR_MS as f64).round() as i64;
    let mut sim = Simulator::new(cfg);
    let attacks = sim.attacks().to_vec();
    let mut seen: HashMap<(String, Phase), String> = HashMap::new();
    let mut run = Run {
        recs: Vec::new(),
        attacks,
        lines: 0,
        duplicates: 0,
        bytes: 0,
        min_len: usize::MAX,
        max_len: 0,
        start_ms,
        end_ms,
    };
    let mut line = String::new();
    let mut latest = i64::MIN;
    let mut request_ts: HashMap<String, i64> = HashMap::new();
    loop {
        line.clear();
        let Some(ts) = sim.next_record(&mut line) else {
            break;
        };
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line}"
        );
        run.lines += 1;
        run.bytes += line.len();
        run.min_len = run.min_len.min(line.len());
        run.max_len = run.max_len.max(line.len());
        let rec = check_line(line.trim_end());
        assert_eq!(rec.ts, ts, "returned time is the line's ts");
        assert!(ts >= start_ms, "{line}");
        let id = (rec.request_id.clone(), rec.phase);
        if let Some(first) = seen.get(&id) {
            // A redelivery: byte for byte the same line, a little late.
            assert_eq!(first, &line);
            assert!(ts >= latest - 3_000, "duplicate more than 3 s late: {line}");
            run.duplicates += 1;
            continue;
        }
        assert!(ts >= latest, "event time went back: {line}");
        latest = ts;
        seen.insert(id, line.clone());
        match rec.phase {
            Phase::Request => {
                request_ts.insert(rec.request_id.clone(), rec.ts);
            }
            Phase::Response => {
                let req = request_ts
                    .remove(&rec.request_id)
                    .unwrap_or_else(|| panic!("response before request: {line}"));
                assert!(rec.ts >= req, "{line}");
            }
            Phase::Exchange => {
                assert!(
                    !seen.contains_key(&(rec.request_id.clone(), Phase::Request)),
                    "{line}"
                );
            }
        }
        run.recs.push(rec);
    }
    assert!(request_ts.is_empty(), "every request has its response");
    run
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn output_hash(cfg: SimConfig) -> (u64, usize) {
    let mut sim = Simulator::new(cfg);
    let mut out = String::new();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut lines = 0;
    while sim.next_record(&mut out).is_some() {
        lines += 1;
        if out.len() > 1 << 16 {
            hash = fnv1a(out.as_bytes()) ^ hash.rotate_left(5);
            out.clear();
        }
    }
    (fnv1a(out.as_bytes()) ^ hash.rotate_left(5), lines)
}

fn small(seed: u64) -> SimConfig {
    SimConfig {
        users: 300,
        hours: 6.0,
        seed,
        ..SimConfig::default()
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = output_hash(small(5));
    assert!(a.1 > 1000, "{a:?}");
    assert_eq!(a, output_hash(small(5)));
    assert_ne!(a.0, output_hash(small(6)).0);
    let shifted = SimConfig {
        profile: Profile::Shifted,
        ..small(5)
    };
    assert_ne!(a.0, output_hash(shifted).0);
}

#[test]
fn ground_truth_is_deterministic_and_serializable() {
    let a = Simulator::new(small(9));
    let b = Simulator::new(small(9));
    assert_eq!(a.attacks(), b.attacks());
    let json = serde_json::to_string(a.attacks()).unwrap();
    assert!(json.contains("\"kind\":\"request_flood\""), "{json}");
    let back: Vec<Attack> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a.attacks());
    let truth = Truth {
        benign_user_days: a.benign_user_days(),
        attacks: a.attacks().to_vec(),
        start_ms: Some(a.start_ms()),
    };
    let back: Truth = serde_json::from_str(&serde_json::to_string(&truth).unwrap()).unwrap();
    assert_eq!(back, truth);
    let scored = evaluate(&truth.attacks, truth.benign_user_days, truth.start_ms, &[]);
    let value = serde_json::to_value(&scored).unwrap();
    assert_eq!(value["attacks"], scored.attacks);
}

#[test]
fn records_follow_the_contract() {
    let run = run_checked(SimConfig::default());
    let n = run.recs.len() as f64;
    let mean = run.bytes as f64 / run.lines as f64;
    println!(
        "default run: {} lines ({} duplicates), {} unique; line bytes mean {mean:.0}, min {}, max {}",
        run.lines, run.duplicates, run.recs.len(), run.min_len, run.max_len
    );
    assert!((300.0..=500.0).contains(&mean), "mean line length {mean}");
    assert!(run.lines > 20_000);

    let dup_share = run.duplicates as f64 / run.recs.len() as f64;
    assert!(
        (0.003..0.008).contains(&dup_share),
        "duplicates {dup_share}"
    );
    let billed: Vec<&Rec> = run
        .recs
        .iter()
        .filter(|r| r.phase != Phase::Request)
        .collect();
    let priced =
        billed.iter().filter(|r| r.cost_usd.is_some()).count() as f64 / billed.len() as f64;
    assert!((0.66..0.74).contains(&priced), "priced share {priced}");
    // Raw prompts are a benign-traffic trait (attacks use fingerprints,
    // which farming needs anyway).
    let arrivals: Vec<&Rec> = benign_records(&run)
        .into_iter()
        .filter(|r| r.is_arrival())
        .collect();
    let fingerprinted =
        arrivals.iter().filter(|r| r.fingerprint.is_some()).count() as f64 / arrivals.len() as f64;
    assert!(
        (0.985..0.995).contains(&fingerprinted),
        "fingerprint share {fingerprinted}"
    );
    let split = run
        .recs
        .iter()
        .filter(|r| r.phase != Phase::Exchange)
        .count() as f64
        / n;
    assert!((0.05..0.6).contains(&split), "split share {split}");
    let benign = benign_records(&run);
    let benign_billed: Vec<&&Rec> = benign
        .iter()
        .filter(|r| r.phase != Phase::Request)
        .collect();
    let ok = benign_billed
        .iter()
        .filter(|r| r.status == Some(200))
        .count() as f64
        / benign_billed.len() as f64;
    assert!((0.96..0.985).contains(&ok), "200 share {ok}");
    println!(
        "benign share of unique records {:.2}",
        benign.len() as f64 / n
    );

    // Keys belong to one account; accounts have 1-3 keys.
    let mut owner: HashMap<&str, &str> = HashMap::new();
    let mut keys_of: HashMap<&str, HashSet<&str>> = HashMap::new();
    for r in &run.recs {
        assert_eq!(*owner.entry(&r.key).or_insert(&r.user), r.user);
        keys_of.entry(&r.user).or_default().insert(&r.key);
    }
    assert!(keys_of.values().all(|k| (1..=3).contains(&k.len())));
    assert!(run.recs.last().unwrap().ts <= run.end_ms + 600_000);
}

/// Benign accounts of a run: everyone not named by the ground truth.
fn benign_records(run: &Run) -> Vec<&Rec> {
    let attacked: HashSet<&str> = run.attacks.iter().map(|a| a.user_id.as_str()).collect();
    run.recs
        .iter()
        .filter(|r| !attacked.contains(r.user.as_str()) && !r.user.starts_with("acct_f"))
        .collect()
}

fn check_benign_limits(profile: Profile) {
    let run = run_checked(SimConfig {
        users: 2000,
        profile,
        seed: 3,
        ..SimConfig::default()
    });
    let recs = benign_records(&run);
    assert!(recs.len() > 30_000, "{}", recs.len());

    let mut per_minute: HashMap<(&str, i64), u32> = HashMap::new();
    let mut per_day: HashMap<(&str, i64), (u64, f64)> = HashMap::new();
    let mut fp_times: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
    let mut tier_of: HashMap<&str, usize> = HashMap::new();
    for r in &recs {
        tier_of.insert(&r.user, r.tier);
        let limits = &TIER_LIMITS[r.tier];
        if let Some(ct) = r.completion_tokens {
            assert!(
                ct as f64 <= f64::from(limits.max_output_tokens) * 0.6,
                "{r:?}"
            );
        }
        if r.is_arrival() {
            *per_minute
                .entry((&r.user, r.ts.div_euclid(MINUTE_MS)))
                .or_default() += 1;
            if let Some(fp) = &r.fingerprint {
                fp_times.entry((&r.key, fp)).or_default().push(r.ts);
            }
        }
        let day = per_day
            .entry((&r.user, r.ts.div_euclid(DAY_MS)))
            .or_default();
        day.0 += r.counted_tokens();
        day.1 += r.counted_cost();
    }

    let mut worst_rate = [0f64; 3];
    for (&(user, _), &count) in &per_minute {
        let t = tier_of[user];
        let share = f64::from(count) / f64::from(TIER_LIMITS[t].requests_per_min);
        assert!(
            share <= 0.6 + 1e-9,
            "{user} sent {count} requests in a minute"
        );
        worst_rate[t] = worst_rate[t].max(share);
    }
    let (mut worst_tokens, mut worst_spend) = ([0f64; 3], [0f64; 3]);
    for (&(user, day), &(tokens, spend)) in &per_day {
        let t = tier_of[user];
        let limits = &TIER_LIMITS[t];
        let token_share = tokens as f64 / limits.tokens_per_day as f64;
        let spend_share = spend / (limits.budget_e8 as f64 * 1e-8);
        assert!(
            token_share <= 0.8,
            "{user} used {tokens} tokens on day {day}"
        );
        assert!(spend_share <= 0.85, "{user} spent {spend} on day {day}");
        worst_tokens[t] = worst_tokens[t].max(token_share);
        worst_spend[t] = worst_spend[t].max(spend_share);
    }
    // The same prompt from one key: at most four times in any hour.
    let mut worst_repeat = 0;
    for times in fp_times.values() {
        for (i, &t) in times.iter().enumerate() {
            let within = times[i..].iter().take_while(|&&u| u < t + HOUR_MS).count();
            worst_repeat = worst_repeat.max(within);
        }
    }
    assert!(
        worst_repeat <= 4,
        "a key repeated a prompt {worst_repeat} times in an hour"
    );
    assert!(worst_repeat >= 2, "legitimate repeats exist");
    // Popular prompts: the same fingerprint from many keys.
    let mut keys_per_fp: HashMap<&str, HashSet<&str>> = HashMap::new();
    for &(key, fp) in fp_times.keys() {
        keys_per_fp.entry(fp).or_default().insert(key);
    }
    let widest = keys_per_fp.values().map(HashSet::len).max().unwrap_or(0);
    assert!(
        widest >= 10,
        "popular prompts are shared across keys ({widest})"
    );
    println!(
        "{profile}: {} benign records; worst share of limit per tier (free, pro, enterprise): \
         rate/min {worst_rate:.2?}, tokens/day {worst_tokens:.2?}, spend/day {worst_spend:.3?}; \
         repeats/h {worst_repeat}; popular prompt seen from {widest} keys",
        recs.len()
    );
}

#[test]
fn benign_accounts_stay_within_their_tier_standard() {
    check_benign_limits(Profile::Standard);
}

#[test]
fn benign_accounts_stay_within_their_tier_shifted() {
    check_benign_limits(Profile::Shifted);
}

#[test]
fn shifted_profile_looks_different() {
    let stats = |profile| {
        let run = run_checked(SimConfig {
            users: 1000,
            hours: 24.0,
            profile,
            seed: 4,
            ..SimConfig::default()
        });
        let recs = benign_records(&run);
        // Active accounts per hour: robust to one heavy account's burst.
        let mut by_hour: Vec<HashSet<&str>> = vec![HashSet::new(); 24];
        let mut tiers = [0usize; 3];
        let mut users = HashSet::new();
        let mut prompt_tokens = 0u64;
        let mut arrivals = 0u64;
        for r in recs.iter().filter(|r| r.is_arrival()) {
            by_hour[(r.ts.rem_euclid(DAY_MS) / HOUR_MS) as usize].insert(r.user.as_str());
            if users.insert(r.user.clone()) {
                tiers[r.tier] += 1;
            }
            prompt_tokens += r.prompt_tokens;
            arrivals += 1;
        }
        // The peak as the phase of the daily harmonic (mid-hour bins).
        let (mut re, mut im) = (0.0, 0.0);
        for (h, active) in by_hour.iter().enumerate() {
            let angle = std::f64::consts::TAU * (h as f64 + 0.5) / 24.0;
            re += active.len() as f64 * angle.cos();
            im += active.len() as f64 * angle.sin();
        }
        let peak = (im.atan2(re).rem_euclid(std::f64::consts::TAU) * 24.0 / std::f64::consts::TAU)
            .round() as i64
            % 24;
        let split =
            recs.iter().filter(|r| r.phase != Phase::Exchange).count() as f64 / recs.len() as f64;
        (
            peak,
            tiers[0] as f64 / users.len() as f64,
            prompt_tokens as f64 / arrivals as f64,
            split,
        )
    };
    let (std_peak, std_free, std_prompt, std_split) = stats(Profile::Standard);
    let (sh_peak, sh_free, sh_prompt, sh_split) = stats(Profile::Shifted);
    println!(
        "standard: peak {std_peak}h free {std_free:.2} prompt {std_prompt:.0} split {std_split:.2}; \
         shifted: peak {sh_peak}h free {sh_free:.2} prompt {sh_prompt:.0} split {sh_split:.2}"
    );
    assert!((14..=16).contains(&std_peak), "{std_peak}");
    assert!((6..=9).contains(&sh_peak), "{sh_peak}");
    assert!(std_free > sh_free + 0.1);
    assert!(sh_prompt > std_prompt * 1.3);
    assert!(sh_split > std_split * 1.3);
}

#[test]
fn every_attack_kind_is_injected_and_visible() {
    let run = run_checked(SimConfig::default());
    let heads: Vec<&Attack> = run
        .attacks
        .iter()
        .filter(|a| !a.kind.grouped() || a.key_id.is_none())
        .collect();
    assert_eq!(
        heads.len(),
        20 + 3,
        "20 per 1000 user-days, and one of each attack across accounts"
    );
    for kind in AttackKind::ALL.into_iter().chain(AttackKind::CROSS_ACCOUNT) {
        assert!(heads.iter().any(|a| a.kind == kind), "{kind} missing");
    }
    let members = |a: &Attack| -> Vec<&Attack> {
        run.attacks
            .iter()
            .filter(|m| {
                m.kind == a.kind
                    && m.key_id.is_some()
                    && (m.onset_ms, m.end_ms) == (a.onset_ms, a.end_ms)
            })
            .collect()
    };
    for a in &run.attacks {
        assert!(
            a.onset_ms >= run.start_ms + HOUR_MS && a.end_ms <= run.end_ms && a.end_ms > a.onset_ms,
            "{a:?}"
        );
    }

    let in_window =
        |a: &Attack, r: &Rec, slack: i64| r.ts >= a.onset_ms && r.ts <= a.end_ms + slack;
    let of_key = |a: &Attack, slack: i64| -> Vec<&Rec> {
        let key = a.key_id.as_deref().unwrap();
        run.recs
            .iter()
            .filter(|r| r.key == key && in_window(a, r, slack))
            .collect()
    };
    for a in &heads {
        let minutes = (a.end_ms - a.onset_ms) as f64 / MINUTE_MS as f64;
        match a.kind {
            AttackKind::RequestFlood => {
                let recs = of_key(a, 0);
                let limit = TIER_LIMITS[recs[0].tier].requests_per_min;
                let mut per_min: BTreeMap<i64, u32> = BTreeMap::new();
                for r in recs.iter().filter(|r| r.is_arrival()) {
                    *per_min.entry(r.ts / MINUTE_MS).or_default() += 1;
                }
                let peak = per_min.values().copied().max().unwrap();
                assert!(
                    f64::from(peak) >= 1.5 * f64::from(limit),
                    "{a:?}: peak {peak}/min, limit {limit}"
                );
            }
            AttackKind::TokenExhaustion => {
                let recs = of_key(a, 10 * MINUTE_MS);
                let max_out = TIER_LIMITS[recs[0].tier].max_output_tokens;
                let huge = recs
                    .iter()
                    .filter(|r| {
                        r.completion_tokens
                            .is_some_and(|c| c as f64 >= 0.9 * f64::from(max_out))
                    })
                    .count();
                assert!(
                    huge as f64 >= 3.0 * minutes * 0.5,
                    "{a:?}: {huge} huge completions"
                );
            }
            AttackKind::PromptFarming => {
                let mut counts: HashMap<&str, u32> = HashMap::new();
                for r in of_key(a, 0) {
                    if let Some(fp) = &r.fingerprint {
                        *counts.entry(fp).or_default() += 1;
                    }
                }
                let most = counts.values().copied().max().unwrap();
                assert!(
                    f64::from(most) >= minutes,
                    "{a:?}: the farmed prompt only {most} times"
                );
            }
            AttackKind::LeakedKey => {
                let recs = of_key(a, 0);
                let home: HashSet<&str> = run
                    .recs
                    .iter()
                    .filter(|r| r.user == a.user_id && r.ts < a.onset_ms)
                    .map(|r| r.ip.as_str())
                    .collect();
                let home_ua: HashSet<&str> = run
                    .recs
                    .iter()
                    .filter(|r| r.user == a.user_id && r.ts < a.onset_ms)
                    .map(|r| r.user_agent.as_str())
                    .collect();
                let foreign: Vec<&&Rec> = recs
                    .iter()
                    .filter(|r| !home.contains(r.ip.as_str()))
                    .collect();
                let ips: HashSet<&str> = foreign.iter().map(|r| r.ip.as_str()).collect();
                let asns: HashSet<u64> = foreign.iter().map(|r| r.asn).collect();
                assert!(
                    ips.len() >= 30 && asns.len() >= 10,
                    "{a:?}: {} ips, {} asns",
                    ips.len(),
                    asns.len()
                );
                assert!(
                    foreign
                        .iter()
                        .all(|r| !home_ua.contains(r.user_agent.as_str())),
                    "{a:?}"
                );
            }
            AttackKind::BudgetDrain => {
                let recs = of_key(a, 10 * MINUTE_MS);
                let budget = TIER_LIMITS[recs[0].tier].budget_e8 as f64 * 1e-8;
                let spend: f64 = recs.iter().map(|r| r.counted_cost()).sum();
                assert!(spend >= 0.8 * budget, "{a:?}: spent {spend} of {budget}");
            }
            AttackKind::KeyCycling | AttackKind::CredentialStuffing => {
                let members = members(a);
                let (range, per) = match a.kind {
                    AttackKind::KeyCycling => (15..=40, 6..=10),
                    _ => (60..=300, 1..=2),
                };
                assert!(
                    range.contains(&members.len()),
                    "{a:?}: {} accounts",
                    members.len()
                );
                let mut ips = HashSet::new();
                for m in &members {
                    let sent: Vec<&Rec> = of_key(m, 0)
                        .into_iter()
                        .filter(|r| r.is_arrival())
                        .collect();
                    assert!(per.contains(&sent.len()), "{m:?}: {} requests", sent.len());
                    ips.extend(sent.iter().map(|r| r.ip.clone()));
                    if a.kind == AttackKind::CredentialStuffing {
                        assert!(of_key(m, MINUTE_MS)
                            .iter()
                            .filter(|r| r.completion_tokens.is_some())
                            .all(|r| matches!(r.status, Some(401 | 403))));
                    }
                }
                assert_eq!(ips.len(), 1, "{a:?}: one address");
            }
            AttackKind::CoordinatedFarming | AttackKind::SpreadFarming => {
                let members = members(a);
                let spread = a.kind == AttackKind::SpreadFarming;
                let (range, per) = if spread {
                    (30..=60, 2..=3)
                } else {
                    (20..=60, 3..=6)
                };
                assert!(
                    range.contains(&members.len()),
                    "{a:?}: {} accounts",
                    members.len()
                );
                assert_eq!(members[0].user_id, a.user_id);
                let mut fps = HashSet::new();
                for m in &members {
                    let sent: Vec<&Rec> = of_key(m, 0)
                        .into_iter()
                        .filter(|r| r.is_arrival())
                        .collect();
                    assert!(per.contains(&sent.len()), "{m:?}: {} requests", sent.len());
                    assert!(
                        run.recs
                            .iter()
                            .filter(|r| r.user == m.user_id && r.is_arrival())
                            .count()
                            == sent.len()
                    );
                    fps.extend(sent.iter().map(|r| r.fingerprint.clone().unwrap()));
                }
                assert_eq!(fps.len(), 1, "one prompt across the campaign");
            }
        }
    }
}

#[test]
fn evaluating_the_ground_truth_against_itself_detects_everything() {
    let sim = Simulator::new(SimConfig {
        users: 500,
        hours: 12.0,
        ..SimConfig::default()
    });
    let alerts: Vec<AlertRef<'_>> = sim
        .attacks()
        .iter()
        .map(|a| AlertRef {
            kind: a.kind.as_str(),
            user_id: &a.user_id,
            key_id: a.key_id.as_deref(),
            ts_ms: a.onset_ms + 30_000,
            action: "notify",
            severity: "warning",
        })
        .collect();
    let e = evaluate(sim.attacks(), sim.benign_user_days(), None, &alerts);
    assert_eq!(e.detected, e.attacks);
    assert!(e.attacks >= 6);
    assert_eq!(e.max_latency_ms, Some(30_000));
    assert_eq!(e.false_positive_alerts, 0);
    assert!((sim.benign_user_days() - 250.0).abs() < 1e-9);
    println!("{e}");
}

#[test]
fn degenerate_configs_do_not_panic() {
    let drain = |cfg: SimConfig| {
        let mut sim = Simulator::new(cfg);
        let mut out = String::new();
        let mut n = 0;
        while sim.next_record(&mut out).is_some() {
            n += 1;
        }
        (n, sim.attacks().len())
    };
    assert_eq!(
        drain(SimConfig {
            hours: 0.0,
            ..SimConfig::default()
        }),
        (0, 0)
    );
    assert_eq!(
        drain(SimConfig {
            hours: f64::NAN,
            ..SimConfig::default()
        }),
        (0, 0)
    );
    // No accounts: only campaigns of fresh accounts can be injected.
    let (lines, attacks) = drain(SimConfig {
        users: 0,
        hours: 3.0,
        ..SimConfig::default()
    });
    assert!(lines > 0 && attacks > 20);
    // No attacks at all.
    let sim = Simulator::new(SimConfig {
        attacks_per_1k_user_days: 0.0,
        ..small(1)
    });
    assert!(sim.attacks().is_empty());
    // A run too short for attacks after the first hour.
    assert_eq!(
        drain(SimConfig {
            users: 10,
            hours: 1.0,
            ..SimConfig::default()
        })
        .1,
        0
    );
    // Every line split, every line duplicated.
    let (lines, _) = drain(SimConfig {
        users: 20,
        hours: 2.0,
        split_fraction: 7.0,
        duplicate_fraction: 1.0,
        ..small(2)
    });
    assert!(lines > 0);
}

#[test]
fn profile_names() {
    assert_eq!("standard".parse::<Profile>(), Ok(Profile::Standard));
    assert_eq!("shifted".parse::<Profile>(), Ok(Profile::Shifted));
    let err = "weekend".parse::<Profile>().unwrap_err().to_string();
    assert!(
        err.contains("weekend") && err.contains("standard") && err.contains("shifted"),
        "{err}"
    );
    assert_eq!(Profile::Shifted.to_string(), "shifted");
}

/// Not a benchmark and asserts nothing about time: prints the generation
/// speed (run with `--release -- --nocapture` for meaningful numbers).
#[test]
fn generation_speed_report() {
    // Debug builds are several times slower: keep the test quick there.
    let users = if cfg!(debug_assertions) {
        10_000
    } else {
        100_000
    };
    let cfg = SimConfig {
        users,
        hours: 24.0,
        seed: 11,
        ..SimConfig::default()
    };
    let started = Instant::now();
    let mut sim = Simulator::new(cfg);
    let planned = started.elapsed();
    let mut out = String::with_capacity(1 << 20);
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut lengths = [0u64; 12]; // histogram in 50-byte buckets
    let mut last = 0;
    while sim.next_record(&mut out).is_some() {
        let len = out.len() - last;
        lengths[(len / 50).min(11)] += 1;
        lines += 1;
        last = out.len();
        if out.len() > 1 << 20 {
            bytes += out.len() as u64;
            out.clear();
            last = 0;
        }
    }
    bytes += out.len() as u64;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{users} users x 24 h: {lines} records, {:.1} MB in {secs:.2} s (setup {:.0} ms): {:.2} M records/s, {:.0} MB/s; \
         mean line {:.0} B",
        bytes as f64 / 1e6,
        planned.as_secs_f64() * 1e3,
        lines as f64 / secs / 1e6,
        bytes as f64 / secs / 1e6,
        bytes as f64 / lines as f64
    );
    let hist: Vec<String> = lengths
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(i, &n)| {
            format!(
                "{}-{}: {:.1}%",
                i * 50,
                i * 50 + 49,
                n as f64 * 100.0 / lines as f64
            )
        })
        .collect();
    println!("line length histogram: {}", hist.join(", "));
    assert!(lines > 0);
}

#[test]
fn the_opening_starts_one_attack_of_each_kind_right_after_the_first_hour() {
    let plain = Simulator::new(SimConfig {
        users: 2000,
        hours: 24.0,
        seed: 7,
        ..SimConfig::default()
    });
    let opening = Simulator::new(SimConfig {
        users: 2000,
        hours: 24.0,
        seed: 7,
        opening: true,
        ..SimConfig::default()
    });
    let first = opening.start_ms() + HOUR_MS;
    // The per-account kinds, then the three across accounts.
    let window = first + (AttackKind::ALL.len() + 3) as i64 * OPENING_STEP_MS;
    for kind in AttackKind::ALL.into_iter().chain(AttackKind::CROSS_ACCOUNT) {
        assert!(
            opening
                .attacks()
                .iter()
                .any(|a| a.kind == kind && (first..window).contains(&a.onset_ms)),
            "no {kind:?} in the opening"
        );
    }
    // Without it, attacks are spread over the day.
    let early_kinds: HashSet<AttackKind> = plain
        .attacks()
        .iter()
        .filter(|a| (first..window).contains(&a.onset_ms))
        .map(|a| a.kind)
        .collect();
    assert!(early_kinds.len() < 3, "{early_kinds:?}");
    // The rest of the day starts when and lasts as long as it would
    // without the opening (victims may differ: they go in onset order).
    let timing = |s: &Simulator| -> Vec<(AttackKind, i64, i64)> {
        let mut v: Vec<_> = s
            .attacks()
            .iter()
            .filter(|a| !a.kind.grouped() && a.onset_ms >= window)
            .map(|a| (a.kind, a.onset_ms, a.end_ms))
            .collect();
        v.sort();
        v
    };
    let (rest, all_plain) = (timing(&opening), timing(&plain));
    assert!(rest.len() > 10, "{}", rest.len());
    let missing: Vec<_> = rest.iter().filter(|t| !all_plain.contains(t)).collect();
    assert!(missing.is_empty(), "{missing:?}");
    assert!(all_plain.len() - rest.len() <= AttackKind::ALL.len());
}
