//! Benign accounts: sessions, bursts, prompt reuse, and the guards that
//! keep each account inside its tier.

use super::*;

/// A benign account: fixed traits drawn at construction, and the state of
/// its sessions, its daily ledger and its prompt reuse.
pub(super) struct BenignUser {
    pub(super) rng: Rng,
    pub(super) number: u32,
    pub(super) tier: Tier,
    pub(super) split: bool,
    pub(super) batch: bool,
    pub(super) keys: [u32; 3],
    pub(super) key_count: u8,
    pub(super) ips: [u32; 2],
    pub(super) ip_count: u8,
    pub(super) asn: u32,
    pub(super) user_agent: u8,
    pub(super) primary_model: u8,
    /// Session arrival rate at the daily peak, per ms.
    pub(super) peak_sessions_per_ms: f64,
    /// Expected requests per day (attackers favour active accounts).
    pub(super) requests_per_day: f64,
    pub(super) session_len_mean: f64,
    pub(super) gap_mean_ms: f64,
    /// Requests left in the current ordinary session (0: between sessions).
    pub(super) left_in_session: u32,
    /// End of the current burst (0: not bursting).
    pub(super) burst_until_ms: i64,
    pub(super) burst_gap_ms: f64,
    /// The UTC day the ledger is for, and what was used on it.
    pub(super) day: i64,
    pub(super) tokens_today: u64,
    pub(super) spend_today_e8: u64,
    /// Times of the last requests (a ring as long as the allowed requests
    /// per minute), to hold the account under its per-minute share.
    pub(super) recent: Box<[i64]>,
    pub(super) recent_next: usize,
    /// A prompt being retried or regenerated.
    pub(super) repeat: SharedPrompt,
    pub(super) repeat_left: u8,
    pub(super) repeat_until_ms: i64,
    /// Last popular prompts used: (index, time).
    pub(super) popular_uses: [(u8, i64); 4],
    pub(super) popular_next: u8,
}

/// "Long ago": an initial time that every window has forgotten.
pub(super) const NEVER: i64 = i64::MIN / 4;

impl BenignUser {
    pub(super) fn new(
        number: u32,
        seed: u64,
        key_salt: u32,
        split_share: f64,
        p: &ProfileParams,
    ) -> Self {
        let mut rng = Rng::new(seed, STREAM_USER, u64::from(number));
        let u = rng.unit();
        let tier = if u < p.tier_mix[0] {
            Tier::Free
        } else if u < p.tier_mix[1] {
            Tier::Pro
        } else {
            Tier::Enterprise
        };
        let t = tier.index();
        let split = rng.chance(split_share);
        let batch = tier != Tier::Free && rng.chance(p.batch_share);
        let key_count = 1 + rng.weighted(&[60, 30, 10]) as u8;
        let mut keys = [0; 3];
        for (slot, key) in keys.iter_mut().enumerate() {
            *key = key_id(key_salt, (number << 2) | slot as u32);
        }
        let cloud = tier == Tier::Enterprise || (tier == Tier::Pro && rng.chance(0.3));
        let net = if cloud {
            &CLOUD_NETWORKS[rng.index(CLOUD_NETWORKS.len())]
        } else {
            &ACCESS_NETWORKS[rng.index(ACCESS_NETWORKS.len())]
        };
        let ip_count = if rng.chance(0.35) { 2 } else { 1 };
        let ips = [address_in(net, &mut rng), address_in(net, &mut rng)];
        let user_agent = rng.index(BENIGN_CLIENTS) as u8;
        let primary_model = rng.weighted(&p.model_weights[t]) as u8;
        let session_len_mean = p.session_len_mean[t] * rng.uniform(0.7, 1.4);
        let gap_mean_ms = p.gap_mean_ms[t] * rng.uniform(0.6, 1.6);
        // Heavy-tailed activity, but an account that would use more than
        // its plan allows is on a bigger plan: expected use stays at about
        // a third of the daily tokens, and the ledger in `step` only clips
        // the unlucky days.
        let mut requests_per_session = session_len_mean;
        if batch {
            let burst_len =
                10.0 * MINUTE_MS as f64 * (p.burst_mult[0] + p.burst_mult[1]) / 2.0 / gap_mean_ms;
            requests_per_session += p.burst_chance * (burst_len - session_len_mean);
        }
        let max_sessions = 0.35 * tier.limits().tokens_per_day as f64
            / (requests_per_session * expected_tokens_per_request(p, tier));
        let sessions_per_day = rng
            .pareto(p.sessions_per_day_min[t], p.activity_alpha)
            .min(p.sessions_per_day_max[t])
            .min(max_sessions);
        let mean_cycle = (1.0 + p.trough) / 2.0;
        let window = (f64::from(tier.limits().requests_per_min) * BENIGN_RATE_SHARE) as usize;
        Self {
            number,
            tier,
            split,
            batch,
            keys,
            key_count,
            ips,
            ip_count,
            asn: net.asn,
            user_agent,
            primary_model,
            peak_sessions_per_ms: sessions_per_day / mean_cycle / DAY_MS as f64,
            requests_per_day: sessions_per_day * requests_per_session,
            session_len_mean,
            gap_mean_ms,
            left_in_session: 0,
            burst_until_ms: 0,
            burst_gap_ms: 0.0,
            day: NEVER,
            tokens_today: 0,
            spend_today_e8: 0,
            recent: vec![NEVER; window.max(1)].into_boxed_slice(),
            recent_next: 0,
            repeat: SharedPrompt {
                fingerprint: 0,
                tokens: 0,
                chars: 0,
            },
            repeat_left: 0,
            repeat_until_ms: NEVER,
            popular_uses: [(u8::MAX, NEVER); 4],
            popular_next: 0,
            rng,
        }
    }

    /// The next session start at or after `from` (a Poisson process thinned
    /// by the daily cycle), or `None` past the end of the run.
    pub(super) fn next_session(&mut self, from: i64, w: &World<'_>) -> Option<i64> {
        let mean_gap = 1.0 / self.peak_sessions_per_ms;
        let mut t = from;
        loop {
            t = t.saturating_add(self.rng.exponential(mean_gap) as i64);
            if t >= w.run_end_ms {
                return None;
            }
            if self.rng.chance(daily_cycle(w.params, t)) {
                return Some(t);
            }
        }
    }

    /// One wake-up at `now`: maybe a request, and when to wake next.
    pub(super) fn step(
        &mut self,
        now: i64,
        w: &World<'_>,
        ids: &mut RequestIds,
    ) -> (Option<Exchange>, Option<i64>) {
        let p = w.params;
        if self.left_in_session == 0 && self.burst_until_ms == 0 {
            // A session starts.
            if self.batch && self.rng.chance(p.burst_chance) {
                self.burst_until_ms = now + (self.rng.uniform(5.0, 15.0) * MINUTE_MS as f64) as i64;
                self.burst_gap_ms =
                    self.gap_mean_ms / self.rng.uniform(p.burst_mult[0], p.burst_mult[1]);
            } else {
                self.left_in_session = self.rng.geometric(self.session_len_mean);
            }
        }

        // Hold to the per-minute share: wait until the oldest of the last
        // `window` requests is a minute old.
        let oldest = self.recent[self.recent_next];
        if oldest > now - MINUTE_MS {
            let at = oldest + MINUTE_MS + self.rng.below(3000) as i64;
            return (None, (at < w.run_end_ms).then_some(at));
        }

        let day = now.div_euclid(DAY_MS);
        if day != self.day {
            self.day = day;
            self.tokens_today = 0;
            self.spend_today_e8 = 0;
        }
        let mut ex = self.draw_exchange(now, w);
        let tokens = u64::from(ex.prompt_tokens) + u64::from(ex.completion_tokens);
        let cost = cost_e8(ex.model, ex.prompt_tokens, ex.completion_tokens);
        let limits = self.tier.limits();
        if (self.tokens_today + tokens) as f64 > limits.tokens_per_day as f64 * BENIGN_TOKEN_SHARE
            || (self.spend_today_e8 + cost) as f64 > limits.budget_e8 as f64 * BENIGN_SPEND_SHARE
        {
            // Near the day's allowance: done for today.
            self.left_in_session = 0;
            self.burst_until_ms = 0;
            return (None, self.next_session((day + 1) * DAY_MS, w));
        }
        self.tokens_today += tokens;
        self.spend_today_e8 += cost;
        self.recent[self.recent_next] = now;
        self.recent_next = (self.recent_next + 1) % self.recent.len();
        ex.request_id = ids.take();

        let next = if self.burst_until_ms > 0 {
            let at = now + (self.burst_gap_ms * self.rng.uniform(0.8, 1.2)) as i64;
            if at <= self.burst_until_ms {
                Some(at)
            } else {
                self.burst_until_ms = 0;
                self.next_session(at, w)
            }
        } else {
            self.left_in_session -= 1;
            let gap = self
                .rng
                .exponential(self.gap_mean_ms)
                .max(self.gap_mean_ms / 10.0) as i64;
            if self.left_in_session > 0 {
                Some(now + gap)
            } else {
                self.next_session(now + gap, w)
            }
        };
        (Some(ex), next.filter(|&t| t < w.run_end_ms))
    }

    pub(super) fn draw_exchange(&mut self, now: i64, w: &World<'_>) -> Exchange {
        let p = w.params;
        let t = self.tier.index();
        let rng = &mut self.rng;
        let key = match self.key_count {
            1 => 0,
            2 => rng.weighted(&[75, 25]),
            _ => rng.weighted(&[70, 20, 10]),
        };
        let ip = if self.ip_count == 2 && rng.chance(0.2) {
            self.ips[1]
        } else {
            self.ips[0]
        };
        let embeddings = rng.chance(p.embeddings_share);
        let model = if rng.chance(0.8) {
            self.primary_model
        } else {
            rng.weighted(&p.model_weights[t]) as u8
        };
        let status = draw_status(rng);
        let (prompt, prompt_tokens, prompt_chars) = self.draw_prompt(now, w, embeddings);
        let rng = &mut self.rng;
        let completion_tokens = if embeddings || status != 200 {
            0
        } else {
            let cap = f64::from(self.tier.limits().max_output_tokens) * BENIGN_OUTPUT_SHARE;
            rng.lognormal(p.completion_median[t], p.completion_sigma)
                .clamp(1.0, cap) as u32
        };
        Exchange {
            at_ms: now,
            request_id: 0,
            account: Account::Benign(self.number),
            key: self.keys[key],
            tier: self.tier,
            split: self.split,
            ip,
            asn: self.asn,
            user_agent: self.user_agent,
            embeddings,
            model,
            status,
            prompt_tokens,
            completion_tokens,
            priced: rng.chance(PRICED_SHARE),
            latency_ms: draw_latency(rng, status, embeddings, completion_tokens),
            prompt,
            prompt_chars,
        }
    }

    pub(super) fn draw_prompt(
        &mut self,
        now: i64,
        w: &World<'_>,
        embeddings: bool,
    ) -> (PromptRef, u32, u32) {
        let p = w.params;
        let rng = &mut self.rng;
        if self.repeat_left > 0 && now < self.repeat_until_ms && rng.chance(0.35) {
            self.repeat_left -= 1;
            let r = self.repeat;
            return (PromptRef::Fingerprint(r.fingerprint), r.tokens, r.chars);
        }
        if rng.chance(p.popular_share) {
            let i = rng.index(POPULAR_PROMPTS) as u8;
            let recent_uses = self
                .popular_uses
                .iter()
                .filter(|&&(j, at)| j == i && now - at < HOUR_MS)
                .count();
            // The ring must not forget a use younger than an hour, or the
            // count above would be short.
            let oldest_kept = self.popular_uses[usize::from(self.popular_next)].1;
            if recent_uses < 2 && now - oldest_kept >= HOUR_MS {
                self.popular_uses[usize::from(self.popular_next)] = (i, now);
                self.popular_next = (self.popular_next + 1) % self.popular_uses.len() as u8;
                let s = w.popular[usize::from(i)];
                return (PromptRef::Fingerprint(s.fingerprint), s.tokens, s.chars);
            }
        }
        if rng.chance(TEXT_PROMPT_SHARE) {
            return text_prompt(rng);
        }
        let t = self.tier.index();
        let median = if embeddings {
            300.0
        } else {
            p.prompt_median[t]
        };
        let tokens = rng
            .lognormal(median, p.prompt_sigma)
            .clamp(1.0, f64::from(PROMPT_CAP[t])) as u32;
        let fresh = SharedPrompt {
            fingerprint: rng.next_u64(),
            tokens,
            chars: chars_for(rng, tokens),
        };
        if rng.chance(p.repeat_share) {
            self.repeat = fresh;
            self.repeat_left = rng.int_in(1, 3) as u8;
            self.repeat_until_ms = now + HOUR_MS;
        }
        (
            PromptRef::Fingerprint(fresh.fingerprint),
            fresh.tokens,
            fresh.chars,
        )
    }
}
