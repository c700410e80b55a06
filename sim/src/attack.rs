//! Attacks: planning the ground truth at construction, and the actors
//! that send each attack's traffic.

use super::*;

/// Where a request comes from.
#[derive(Clone, Copy, Debug)]
pub(super) struct Origin {
    pub(super) ip: u32,
    pub(super) asn: u32,
    pub(super) user_agent: u8,
}

/// One attacking actor: an attack on a victim's key, or one account of a
/// coordinated-farming campaign.
pub(super) struct Attacker {
    pub(super) rng: Rng,
    pub(super) kind: AttackKind,
    pub(super) account: Account,
    pub(super) key: u32,
    pub(super) tier: Tier,
    pub(super) split: bool,
    pub(super) origin: Origin,
    pub(super) model: u8,
    pub(super) end_ms: i64,
    /// Mean gap between requests; `regular` gaps vary +-30 % around it,
    /// others are exponential.
    pub(super) gap_mean_ms: f64,
    pub(super) regular: bool,
    /// The farmed prompt (farming kinds).
    pub(super) prompt: SharedPrompt,
    /// Requests left (farming campaign accounts; others run until `end_ms`).
    pub(super) left: u32,
    /// Share answered 429 by the gateway's own rate limit (floods).
    pub(super) rejected_share: f64,
    /// Prompt and completion size ranges (exhaustion and drain).
    pub(super) prompt_range: [f64; 2],
    pub(super) completion_range: [f64; 2],
    /// A leaked key's users: used round-robin once, then at random.
    pub(super) pool: Vec<Origin>,
    pub(super) pool_next: usize,
}

impl Attacker {
    /// One request at `now`, and when the next is due (`None`: the attack
    /// is over).
    pub(super) fn step(
        &mut self,
        now: i64,
        ids: &mut RequestIds,
        p: &ProfileParams,
    ) -> (Exchange, Option<i64>) {
        let limits = self.tier.limits();
        let t = self.tier.index();
        let rng = &mut self.rng;
        let origin = if self.pool.is_empty() {
            self.origin
        } else {
            let i = if self.pool_next < self.pool.len() {
                self.pool_next
            } else {
                rng.index(self.pool.len())
            };
            self.pool_next += 1;
            self.pool[i]
        };
        let max_out = f64::from(limits.max_output_tokens);
        let mut status = 200;
        let mut model = self.model;
        let (prompt, prompt_tokens, prompt_chars, completion) = match self.kind {
            AttackKind::RequestFlood => {
                if rng.chance(self.rejected_share) {
                    status = 429;
                }
                let tokens = rng.lognormal(150.0, 0.5).clamp(1.0, 2000.0) as u32;
                let completion = rng.lognormal(80.0, 0.6).clamp(1.0, max_out * 0.6) as u32;
                (
                    PromptRef::Fingerprint(rng.next_u64()),
                    tokens,
                    chars_for(rng, tokens),
                    completion,
                )
            }
            AttackKind::TokenExhaustion | AttackKind::BudgetDrain => {
                let tokens = rng.uniform(self.prompt_range[0], self.prompt_range[1]) as u32;
                let completion = (max_out
                    * rng.uniform(self.completion_range[0], self.completion_range[1]))
                    as u32;
                (
                    PromptRef::Fingerprint(rng.next_u64()),
                    tokens,
                    chars_for(rng, tokens),
                    completion.min(limits.max_output_tokens),
                )
            }
            AttackKind::PromptFarming
            | AttackKind::CoordinatedFarming
            | AttackKind::SpreadFarming => {
                let completion = rng
                    .lognormal(p.completion_median[t], p.completion_sigma)
                    .clamp(1.0, max_out * 0.6) as u32;
                let s = self.prompt;
                (
                    PromptRef::Fingerprint(s.fingerprint),
                    s.tokens,
                    s.chars,
                    completion,
                )
            }
            AttackKind::CredentialStuffing => {
                status = if rng.chance(0.1) { 403 } else { 401 };
                (PromptRef::Fingerprint(rng.next_u64()), 0, 0, 0)
            }
            AttackKind::KeyCycling => {
                let tokens = rng
                    .lognormal(p.prompt_median[t], 0.8)
                    .clamp(1.0, f64::from(PROMPT_CAP[t])) as u32;
                let completion = rng
                    .lognormal(p.completion_median[t], p.completion_sigma)
                    .clamp(1.0, max_out) as u32;
                (
                    PromptRef::Fingerprint(rng.next_u64()),
                    tokens,
                    chars_for(rng, tokens),
                    completion,
                )
            }
            AttackKind::LeakedKey => {
                model = [GPT_4O, CLAUDE_SONNET_4, GPT_4_1, GPT_4O_MINI]
                    [rng.weighted(&[35, 35, 15, 15])];
                let tokens = rng
                    .lognormal(p.prompt_median[t] * 1.5, 0.8)
                    .clamp(1.0, f64::from(PROMPT_CAP[t])) as u32;
                let completion = rng
                    .lognormal(p.completion_median[t] * 1.5, 0.7)
                    .clamp(1.0, max_out) as u32;
                let prompt = if rng.chance(TEXT_PROMPT_SHARE) {
                    text_prompt(rng)
                } else {
                    (
                        PromptRef::Fingerprint(rng.next_u64()),
                        tokens,
                        chars_for(rng, tokens),
                    )
                };
                (prompt.0, prompt.1, prompt.2, completion)
            }
        };
        let completion_tokens = if status == 200 { completion } else { 0 };
        let ex = Exchange {
            at_ms: now,
            request_id: ids.take(),
            account: self.account,
            key: self.key,
            tier: self.tier,
            split: self.split,
            ip: origin.ip,
            asn: origin.asn,
            user_agent: origin.user_agent,
            embeddings: false,
            model,
            status,
            prompt_tokens,
            completion_tokens,
            priced: rng.chance(PRICED_SHARE),
            latency_ms: draw_latency(rng, status, false, completion_tokens),
            prompt,
            prompt_chars,
        };

        let gap = if self.kind.grouped() {
            self.left = self.left.saturating_sub(1);
            if self.gap_mean_ms > 0.0 {
                self.gap_mean_ms * rng.uniform(0.5, 1.5)
            } else {
                rng.uniform(15_000.0, 60_000.0)
            }
        } else if self.regular {
            self.gap_mean_ms * rng.uniform(0.7, 1.3)
        } else {
            rng.exponential(self.gap_mean_ms).max(50.0)
        };
        let next = now + gap as i64;
        (ex, (self.left > 0 && next <= self.end_ms).then_some(next))
    }
}

/// Victim facts an attack on its key borrows.
pub(super) struct Victim {
    pub(super) account: Account,
    pub(super) key: u32,
    pub(super) tier: Tier,
    pub(super) split: bool,
    pub(super) origin: Origin,
    pub(super) model: u8,
}

impl Victim {
    pub(super) fn of(u: &BenignUser) -> Self {
        Self {
            account: Account::Benign(u.number),
            key: u.keys[0],
            tier: u.tier,
            split: u.split,
            origin: Origin {
                ip: u.ips[0],
                asn: u.asn,
                user_agent: u.user_agent,
            },
            model: u.primary_model,
        }
    }
}

/// Ground truth and actors of every planned attack, in onset order.
pub(super) struct AttackPlan {
    pub(super) attacks: Vec<Attack>,
    pub(super) attackers: Vec<(i64, Attacker)>,
}

pub(super) fn plan_attacks(
    cfg: &SimConfig,
    users: &[BenignUser],
    key_salt: u32,
    run_end_ms: i64,
    split_share: f64,
) -> AttackPlan {
    let p = cfg.profile.params();
    // Each profile gets its own attacks, so a held-out run is held out in
    // its attacks too.
    let seed = mix64(cfg.seed ^ (cfg.profile as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let mut rng = Rng::new(seed, STREAM_PLAN, 0);
    let user_days = f64::from(cfg.users) * cfg.hours / 24.0;
    let mut count = (cfg.attacks_per_1k_user_days * user_days / 1000.0)
        .round()
        .min(1e6) as usize;
    if cfg.attacks_per_1k_user_days > 0.0 && cfg.hours >= 2.0 {
        count = count.max(AttackKind::ALL.len());
    }
    let earliest = cfg.start_ms + HOUR_MS;
    let mut plan = AttackPlan {
        attacks: Vec::new(),
        attackers: Vec::new(),
    };
    if run_end_ms - 5 * MINUTE_MS <= earliest {
        return plan;
    }

    // Victims: distinct accounts while they last, favouring active ones
    // (keys leak from, and scripts run on, accounts in use), so most
    // victims have a baseline before the onset. Weighted sampling without
    // replacement: sort by ln(u) / weight (Efraimidis-Spirakis).
    let mut victims: Vec<(f64, u32)> = users
        .iter()
        .map(|u| {
            (
                rng::ln(rng.unit_open()) / u.requests_per_day.clamp(1.0, 50.0),
                u.number,
            )
        })
        .collect();
    victims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let victims: Vec<u32> = victims.into_iter().map(|(_, n)| n).collect();
    let mut next_victim = 0usize;

    // (kind, onset, duration)
    let mut planned: Vec<(AttackKind, i64, i64)> = Vec::with_capacity(count);
    for i in 0..count {
        let kind = if cfg.users == 0 {
            AttackKind::CoordinatedFarming
        } else if i < AttackKind::ALL.len() {
            AttackKind::ALL[i]
        } else {
            AttackKind::ALL[rng.index(AttackKind::ALL.len())]
        };
        let minutes = match kind {
            AttackKind::RequestFlood => rng.uniform(5.0, 20.0),
            AttackKind::TokenExhaustion => rng.uniform(10.0, 30.0),
            AttackKind::PromptFarming => rng.uniform(20.0, 60.0),
            AttackKind::CoordinatedFarming => 30.0,
            AttackKind::LeakedKey => rng.uniform(30.0, 120.0),
            AttackKind::BudgetDrain => rng.uniform(20.0, 60.0),
            AttackKind::KeyCycling | AttackKind::CredentialStuffing | AttackKind::SpreadFarming => {
                unreachable!("planned by plan_cross")
            }
        };
        let duration = (minutes * MINUTE_MS as f64) as i64;
        let latest = (run_end_ms - duration).max(earliest);
        let mut onset = earliest + rng.below((latest - earliest) as u64 + 1) as i64;
        if cfg.opening && i < AttackKind::ALL.len() {
            onset = (earliest + i as i64 * super::OPENING_STEP_MS).min(latest);
        }
        // Campaign entries are grouped by (onset, end): keep them apart.
        while kind == AttackKind::CoordinatedFarming
            && planned.iter().any(|&(k, o, _)| k == kind && o == onset)
        {
            onset += 1;
        }
        planned.push((kind, onset, duration));
    }
    planned.sort_by_key(|&(_, onset, _)| onset);

    let mut farm_accounts = 0u32;
    for (n, &(kind, onset, duration)) in planned.iter().enumerate() {
        let end = (onset + duration).min(run_end_ms);
        let mut arng = Rng::new(seed, STREAM_ATTACK, n as u64);
        if kind == AttackKind::CoordinatedFarming {
            plan_campaign(
                &mut plan,
                &mut arng,
                onset,
                end,
                key_salt,
                split_share,
                &mut farm_accounts,
            );
            continue;
        }
        let victim = Victim::of(&users[victims[next_victim % victims.len()] as usize]);
        next_victim += 1;
        let limits = victim.tier.limits();
        let t = victim.tier.index();
        let mut attacker = Attacker {
            rng: Rng::new(seed, STREAM_ATTACK_TRAFFIC, n as u64),
            kind,
            account: victim.account,
            key: victim.key,
            tier: victim.tier,
            split: victim.split,
            origin: victim.origin,
            model: victim.model,
            end_ms: end,
            gap_mean_ms: MINUTE_MS as f64,
            regular: false,
            prompt: SharedPrompt {
                fingerprint: 0,
                tokens: 0,
                chars: 0,
            },
            left: u32::MAX,
            rejected_share: 0.0,
            prompt_range: [0.0, 0.0],
            completion_range: [0.0, 0.0],
            pool: Vec::new(),
            pool_next: 0,
        };
        let rpm_limit = f64::from(limits.requests_per_min);
        let per_min = |rate: f64| MINUTE_MS as f64 / rate;
        match kind {
            AttackKind::RequestFlood => {
                let usual = MINUTE_MS as f64 / p.gap_mean_ms[t];
                let rate =
                    (usual * arng.uniform(10.0, 40.0)).max(rpm_limit * arng.uniform(1.5, 2.5));
                attacker.gap_mean_ms = per_min(rate);
                attacker.regular = true;
                attacker.rejected_share = 0.8 * (1.0 - rpm_limit / rate).max(0.0);
            }
            AttackKind::TokenExhaustion => {
                attacker.gap_mean_ms = per_min(arng.uniform(4.0, 20.0));
                attacker.regular = true;
                attacker.prompt_range = [
                    [2_000.0, 4_000.0],
                    [8_000.0, 30_000.0],
                    [20_000.0, 100_000.0],
                ][t];
                attacker.completion_range = [0.9, 1.0];
            }
            AttackKind::PromptFarming => {
                // A script replaying one prompt at a steady 4-10 a minute.
                attacker.gap_mean_ms = per_min(arng.uniform(4.0, 10.0));
                attacker.regular = true;
                attacker.prompt = farmed_prompt(&mut arng, p.prompt_median[t]);
            }
            AttackKind::LeakedKey => {
                let rate = arng.uniform(5.0, 30.0);
                attacker.gap_mean_ms = per_min(rate);
                let expected = rate * duration as f64 / MINUTE_MS as f64;
                let addresses = (arng.int_in(30, 200) as usize)
                    .min((expected * 0.8) as usize)
                    .max(30);
                attacker.pool = leaked_key_users(&mut arng, addresses, &victim.origin);
            }
            AttackKind::BudgetDrain => {
                attacker.model = if arng.chance(0.5) {
                    GPT_4O
                } else {
                    CLAUDE_SONNET_4
                };
                attacker.prompt_range = [
                    [1_500.0, 3_000.0],
                    [8_000.0, 30_000.0],
                    [20_000.0, 60_000.0],
                ][t];
                attacker.completion_range = [0.6, 1.0];
                let m = &MODELS[usize::from(attacker.model)];
                let mean_cost = (attacker.prompt_range[0] + attacker.prompt_range[1]) / 2.0
                    * m.input_e8 as f64
                    + 0.8 * f64::from(limits.max_output_tokens) * m.output_e8 as f64;
                // Enough requests to spend 110 % of the budget in `duration`,
                // sent by a script at a steady cadence.
                let requests = 1.1 * limits.budget_e8 as f64 / mean_cost;
                attacker.gap_mean_ms = duration as f64 / requests;
                attacker.regular = true;
            }
            AttackKind::CoordinatedFarming
            | AttackKind::KeyCycling
            | AttackKind::CredentialStuffing
            | AttackKind::SpreadFarming => unreachable!("planned apart"),
        }
        plan.attacks.push(Attack {
            kind,
            user_id: user_id_string(victim.account),
            key_id: Some(key_id_string(victim.key)),
            onset_ms: onset,
            end_ms: end,
            variant: None,
        });
        plan.attackers.push((onset, attacker));
    }
    plan_cross(
        cfg,
        seed,
        count,
        earliest,
        run_end_ms,
        key_salt,
        split_share,
        &mut farm_accounts,
        &mut plan,
    );
    plan.attacks.sort_by_key(|a| a.onset_ms);
    plan
}

/// The attacks that span accounts, on their own random streams: key
/// cycling, credential stuffing and farming spread over many networks,
/// about a twelfth as many as the per-account attacks (at least one of
/// each), each a group of entries in the ground truth.
#[allow(clippy::too_many_arguments)]
fn plan_cross(
    cfg: &SimConfig,
    seed: u64,
    count: usize,
    earliest: i64,
    run_end_ms: i64,
    key_salt: u32,
    split_share: f64,
    farm_accounts: &mut u32,
    plan: &mut AttackPlan,
) {
    const KINDS: usize = 3;
    if count == 0 || cfg.users == 0 {
        return;
    }
    let mut rng = Rng::new(seed, STREAM_CROSS_PLAN, 0);
    let n = (count / 12).max(KINDS);
    for i in 0..n {
        let which = if i < KINDS { i } else { rng.index(KINDS) };
        let minutes = match which {
            0 => 30.0,
            1 => rng.uniform(10.0, 20.0),
            _ => 30.0,
        };
        let duration = (minutes * MINUTE_MS as f64) as i64;
        let latest = (run_end_ms - duration).max(earliest);
        let mut onset = earliest + rng.below((latest - earliest) as u64 + 1) as i64;
        if cfg.opening && i < KINDS {
            onset = (earliest + (AttackKind::ALL.len() + i) as i64 * super::OPENING_STEP_MS)
                .min(latest);
        }
        // Groups are told apart by (onset, end): keep them apart.
        while plan.attacks.iter().any(|a| a.onset_ms == onset) {
            onset += 1;
        }
        let end = (onset + duration).min(run_end_ms);
        let mut arng = Rng::new(seed, STREAM_CROSS, i as u64);
        match which {
            0 => plan_cycling(
                plan,
                &mut arng,
                onset,
                end,
                key_salt,
                split_share,
                farm_accounts,
            ),
            1 => plan_stuffing(plan, &mut arng, onset, end, key_salt, farm_accounts),
            _ => plan_spread_farming(
                plan,
                &mut arng,
                onset,
                end,
                key_salt,
                split_share,
                farm_accounts,
            ),
        }
    }
}

/// A fresh account of a group attack, with its truth entries (the
/// group's head first) and its actor.
#[allow(clippy::too_many_arguments)]
fn group_member(
    plan: &mut AttackPlan,
    kind: AttackKind,
    variant: Option<&str>,
    (onset, end): (i64, i64),
    (first, head): (i64, bool),
    key_salt: u32,
    farm_accounts: &mut u32,
    actor: impl FnOnce(Account, u32) -> Attacker,
) {
    let number = *farm_accounts;
    *farm_accounts += 1;
    let account = Account::Farm(number);
    let key = key_id(key_salt, 0x8000_0000 | (number << 2));
    for key_id in [None, Some(key_id_string(key))]
        .into_iter()
        .skip(!head as usize)
    {
        plan.attacks.push(Attack {
            kind,
            user_id: user_id_string(account),
            key_id,
            onset_ms: onset,
            end_ms: end,
            variant: variant.map(str::to_owned),
        });
    }
    plan.attackers.push((first, actor(account, key)));
}

fn group_actor(
    rng: &mut Rng,
    kind: AttackKind,
    account: Account,
    key: u32,
    origin: Origin,
    end: i64,
) -> Attacker {
    Attacker {
        rng: Rng::new(rng.next_u64(), STREAM_FARM, u64::from(key)),
        kind,
        account,
        key,
        tier: Tier::Free,
        split: false,
        origin,
        model: GPT_4O_MINI,
        end_ms: end,
        gap_mean_ms: 0.0,
        regular: false,
        prompt: SharedPrompt {
            fingerprint: 0,
            tokens: 0,
            chars: 0,
        },
        left: 1,
        rejected_share: 0.0,
        prompt_range: [0.0, 0.0],
        completion_range: [0.0, 0.0],
        pool: Vec::new(),
        pool_next: 0,
    }
}

/// Key cycling: 15-40 new free accounts from one address, half the time a
/// hosting provider's, each sending 6-10 ordinary requests spread over the
/// half hour, one scripted client.
fn plan_cycling(
    plan: &mut AttackPlan,
    rng: &mut Rng,
    onset: i64,
    end: i64,
    key_salt: u32,
    split_share: f64,
    farm_accounts: &mut u32,
) {
    let accounts = rng.int_in(15, 40);
    let hosting = rng.chance(0.5);
    let net = if hosting {
        network(ACCESS_NETWORKS.len() + rng.index(NETWORK_COUNT - ACCESS_NETWORKS.len()))
    } else {
        network(rng.index(ACCESS_NETWORKS.len()))
    };
    let variant = if hosting {
        "from a hosting network"
    } else {
        "from a residential address"
    };
    let origin = Origin {
        ip: address_in(net, rng),
        asn: net.asn,
        user_agent: (BENIGN_CLIENTS + rng.index(USER_AGENTS.len() - BENIGN_CLIENTS)) as u8,
    };
    let span = (end - onset).max(MINUTE_MS);
    for i in 0..accounts {
        let requests = rng.int_in(6, 10);
        let first = onset + rng.below((span / 3) as u64 + 1) as i64;
        let gap = (end - first).max(MINUTE_MS) as f64 / f64::from(requests);
        let split = rng.chance(split_share);
        group_member(
            plan,
            AttackKind::KeyCycling,
            Some(variant),
            (onset, end),
            (first, i == 0),
            key_salt,
            farm_accounts,
            |account, key| {
                let mut a = group_actor(rng, AttackKind::KeyCycling, account, key, origin, end);
                a.left = requests;
                a.gap_mean_ms = gap;
                a.split = split;
                a
            },
        );
    }
}

/// Credential stuffing: 60-300 guessed keys from one hosting or abuse
/// address over the attack, each tried once or twice a few seconds apart.
fn plan_stuffing(
    plan: &mut AttackPlan,
    rng: &mut Rng,
    onset: i64,
    end: i64,
    key_salt: u32,
    farm_accounts: &mut u32,
) {
    let guesses = rng.int_in(60, 300);
    let net = network(ACCESS_NETWORKS.len() + rng.index(NETWORK_COUNT - ACCESS_NETWORKS.len()));
    let origin = Origin {
        ip: address_in(net, rng),
        asn: net.asn,
        user_agent: (BENIGN_CLIENTS + rng.index(USER_AGENTS.len() - BENIGN_CLIENTS)) as u8,
    };
    let span = (end - onset).max(MINUTE_MS);
    for g in 0..guesses {
        let first = onset + span * i64::from(g) / i64::from(guesses);
        let tries = rng.int_in(1, 2);
        group_member(
            plan,
            AttackKind::CredentialStuffing,
            None,
            (onset, end),
            (first, g == 0),
            key_salt,
            farm_accounts,
            |account, key| {
                let mut a = group_actor(
                    rng,
                    AttackKind::CredentialStuffing,
                    account,
                    key,
                    origin,
                    end,
                );
                a.left = tries;
                a.gap_mean_ms = 3_000.0;
                a
            },
        );
    }
}

/// Farming spread over many networks: 30-60 new free accounts behind
/// residential proxies (each its own access address), each sending one
/// prompt only 2-3 times, minutes apart: no account repeats enough to be
/// noticed alone, and in a partitioned topic no partition sees many.
fn plan_spread_farming(
    plan: &mut AttackPlan,
    rng: &mut Rng,
    onset: i64,
    end: i64,
    key_salt: u32,
    split_share: f64,
    farm_accounts: &mut u32,
) {
    let accounts = rng.int_in(30, 60);
    let prompt = farmed_prompt(rng, 400.0);
    let span = (end - onset).max(MINUTE_MS);
    for i in 0..accounts {
        let net = network(rng.index(ACCESS_NETWORKS.len()));
        let origin = Origin {
            ip: address_in(net, rng),
            asn: net.asn,
            user_agent: rng.index(BENIGN_CLIENTS) as u8,
        };
        let first = onset + rng.below((span / 2) as u64 + 1) as i64;
        let left = rng.int_in(2, 3);
        let split = rng.chance(split_share);
        group_member(
            plan,
            AttackKind::SpreadFarming,
            None,
            (onset, end),
            (first, i == 0),
            key_salt,
            farm_accounts,
            |account, key| {
                let mut a = group_actor(rng, AttackKind::SpreadFarming, account, key, origin, end);
                a.prompt = prompt;
                a.left = left;
                a.gap_mean_ms = 4.0 * MINUTE_MS as f64;
                a.split = split;
                a
            },
        );
    }
}

/// A prompt to farm: one fingerprint, always the same size.
pub(super) fn farmed_prompt(rng: &mut Rng, median_tokens: f64) -> SharedPrompt {
    let tokens = rng.lognormal(median_tokens, 0.6).clamp(20.0, 4000.0) as u32;
    SharedPrompt {
        fingerprint: rng.next_u64(),
        tokens,
        chars: chars_for(rng, tokens),
    }
}

/// The addresses, networks and clients of a leaked key's users: `count`
/// distinct addresses over 10-16 networks other than the victim's, with
/// clients other than the victim's.
pub(super) fn leaked_key_users(rng: &mut Rng, count: usize, victim: &Origin) -> Vec<Origin> {
    let mut nets: Vec<usize> = (0..NETWORK_COUNT)
        .filter(|&i| network(i).asn != victim.asn)
        .collect();
    rng.shuffle(&mut nets);
    nets.truncate(rng.int_in(10, 16) as usize);
    let mut pool: Vec<Origin> = Vec::with_capacity(count);
    while pool.len() < count {
        let net = network(nets[pool.len() % nets.len()]);
        let ip = address_in(net, rng);
        if ip == victim.ip || pool.iter().any(|o| o.ip == ip) {
            continue;
        }
        let mut user_agent = rng.index(USER_AGENTS.len() - 1) as u8;
        if user_agent >= victim.user_agent {
            user_agent += 1;
        }
        pool.push(Origin {
            ip,
            asn: net.asn,
            user_agent,
        });
    }
    rng.shuffle(&mut pool);
    pool
}

/// A coordinated-farming campaign: 20-60 fresh free accounts on a few
/// hosting networks, one scripted client, one prompt, 3-6 requests each, 15-60 s apart,
/// every account starting within the campaign's first minute.
pub(super) fn plan_campaign(
    plan: &mut AttackPlan,
    rng: &mut Rng,
    onset: i64,
    end: i64,
    key_salt: u32,
    split_share: f64,
    farm_accounts: &mut u32,
) {
    let accounts = rng.int_in(20, 60);
    let prompt = farmed_prompt(rng, 400.0);
    let user_agent = (BENIGN_CLIENTS + rng.index(USER_AGENTS.len() - BENIGN_CLIENTS)) as u8;
    let model = if rng.chance(0.5) {
        GPT_4O_MINI
    } else {
        GEMINI_FLASH
    };
    let mut nets: Vec<usize> = (ACCESS_NETWORKS.len()..NETWORK_COUNT).collect();
    rng.shuffle(&mut nets);
    nets.truncate(rng.int_in(3, 6) as usize);
    // One script starts every account within the first minute.
    let first_window = ((end - onset) / 2).clamp(0, MINUTE_MS);
    for i in 0..accounts {
        let number = *farm_accounts;
        *farm_accounts += 1;
        let account = Account::Farm(number);
        let key = key_id(key_salt, 0x8000_0000 | (number << 2));
        if i == 0 {
            plan.attacks.push(Attack {
                kind: AttackKind::CoordinatedFarming,
                user_id: user_id_string(account),
                key_id: None,
                onset_ms: onset,
                end_ms: end,
                variant: None,
            });
        }
        plan.attacks.push(Attack {
            kind: AttackKind::CoordinatedFarming,
            user_id: user_id_string(account),
            key_id: Some(key_id_string(key)),
            onset_ms: onset,
            end_ms: end,
            variant: None,
        });
        let net = network(nets[rng.index(nets.len())]);
        let first = onset + rng.below(first_window as u64 + 1) as i64;
        let attacker = Attacker {
            rng: Rng::new(rng.next_u64(), STREAM_FARM, u64::from(number)),
            kind: AttackKind::CoordinatedFarming,
            account,
            key,
            tier: Tier::Free,
            split: rng.chance(split_share),
            origin: Origin {
                ip: address_in(net, rng),
                asn: net.asn,
                user_agent,
            },
            model,
            end_ms: end,
            gap_mean_ms: 0.0,
            regular: false,
            prompt,
            left: rng.int_in(3, 6),
            rejected_share: 0.0,
            prompt_range: [0.0, 0.0],
            completion_range: [0.0, 0.0],
            pool: Vec::new(),
            pool_next: 0,
        };
        plan.attackers.push((first, attacker));
    }
}
