//! The record model: one request/response exchange as a `Copy` value, its
//! delivery as an exchange line or a request and a response line, and the
//! JSON rendering of each.

use super::*;

/// Who sent a request: a benign account (also the victim of attacks on its
/// keys) or a farming account created for a campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Account {
    Benign(u32),
    Farm(u32),
}

#[derive(Clone, Copy, Debug)]
pub(super) enum PromptRef {
    Fingerprint(u64),
    Text { template: u8, reference: u32 },
}

/// One request/response pair, everything needed to write its lines
/// (`Copy`, so pending lines cost no allocation).
#[derive(Clone, Copy, Debug)]
pub(super) struct Exchange {
    pub(super) at_ms: i64,
    pub(super) request_id: u64,
    pub(super) account: Account,
    pub(super) key: u32,
    pub(super) tier: Tier,
    pub(super) split: bool,
    pub(super) ip: u32,
    pub(super) asn: u32,
    pub(super) user_agent: u8,
    pub(super) embeddings: bool,
    pub(super) model: u8,
    pub(super) status: u16,
    pub(super) prompt_tokens: u32,
    pub(super) completion_tokens: u32,
    pub(super) priced: bool,
    pub(super) latency_ms: u32,
    pub(super) prompt: PromptRef,
    pub(super) prompt_chars: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Phase {
    Exchange,
    Request,
    Response,
}

/// A line to write: which phase of which exchange, and whether it is the
/// redelivered copy of a line already written.
#[derive(Clone, Copy, Debug)]
pub(super) struct Delivery {
    pub(super) exchange: Exchange,
    pub(super) phase: Phase,
    pub(super) redelivery: bool,
}

impl Delivery {
    pub(super) fn event_ms(&self) -> i64 {
        match self.phase {
            Phase::Response => self.exchange.at_ms + i64::from(self.exchange.latency_ms),
            Phase::Exchange | Phase::Request => self.exchange.at_ms,
        }
    }

    /// Appends the JSON line (the contract's canonical event).
    pub(super) fn render(&self, out: &mut impl Sink) {
        let ex = &self.exchange;
        out.put_str("{\"ts\":\"");
        push_rfc3339(out, self.event_ms());
        out.put_str("\",\"request_id\":\"req_");
        push_hex(out, ex.request_id, 16);
        match self.phase {
            Phase::Exchange => {}
            Phase::Request => out.put_str("\",\"phase\":\"request"),
            Phase::Response => out.put_str("\",\"phase\":\"response"),
        }
        out.put_str("\",\"user_id\":\"");
        push_user_id(out, ex.account);
        out.put_str("\",\"key_id\":\"key_");
        push_hex(out, u64::from(ex.key), 8);
        out.put_str("\",\"tier\":\"");
        out.put_str(ex.tier.limits().name);
        out.put_str("\",\"ip\":\"");
        push_ipv4(out, ex.ip);
        out.put_str("\",\"asn\":");
        push_u64(out, u64::from(ex.asn));
        out.put_str(",\"user_agent\":\"");
        out.put_str(USER_AGENTS[usize::from(ex.user_agent)]);
        out.put_str("\",\"endpoint\":\"");
        out.put_str(if ex.embeddings { EMBEDDINGS } else { CHAT });
        out.put_str("\",\"model\":\"");
        out.put_str(MODELS[usize::from(ex.model)].name);
        out.put_ascii(b"\"");
        if self.phase != Phase::Request {
            out.put_str(",\"status\":");
            push_u64(out, u64::from(ex.status));
        }
        out.put_str(",\"prompt_tokens\":");
        push_u64(out, u64::from(ex.prompt_tokens));
        if self.phase != Phase::Request {
            out.put_str(",\"completion_tokens\":");
            push_u64(out, u64::from(ex.completion_tokens));
            if ex.priced {
                out.put_str(",\"cost_usd\":");
                push_cost_e8(
                    out,
                    cost_e8(ex.model, ex.prompt_tokens, ex.completion_tokens),
                );
            }
            out.put_str(",\"latency_ms\":");
            push_u64(out, u64::from(ex.latency_ms));
        }
        if self.phase != Phase::Response {
            match ex.prompt {
                PromptRef::Fingerprint(fp) => {
                    out.put_str(",\"prompt_fingerprint\":\"");
                    push_hex(out, fp, 16);
                }
                PromptRef::Text {
                    template,
                    reference,
                } => {
                    out.put_str(",\"prompt\":\"");
                    out.put_str(PROMPT_TEXTS[usize::from(template)]);
                    out.put_str(" (ref ");
                    push_u64(out, u64::from(reference));
                    out.put_ascii(b")");
                }
            }
            out.put_str("\",\"prompt_chars\":");
            push_u64(out, u64::from(ex.prompt_chars));
        }
        out.put_str("}\n");
    }
}

/// `acct_000042` / `acct_f000042` (six digits at least, more when needed).
pub(super) fn push_user_id(out: &mut impl Sink, account: Account) {
    let n = match account {
        Account::Benign(n) => {
            out.put_str("acct_");
            n
        }
        Account::Farm(n) => {
            out.put_str("acct_f");
            n
        }
    };
    if n < 1_000_000 {
        push_padded(out, u64::from(n), 6);
    } else {
        push_u64(out, u64::from(n));
    }
}

pub(super) fn user_id_string(account: Account) -> String {
    let mut s = String::with_capacity(16);
    push_user_id(&mut s, account);
    s
}

pub(super) fn key_id_string(key: u32) -> String {
    let mut s = String::from("key_");
    push_hex(&mut s, u64::from(key), 8);
    s
}

/// Request ids: a bijective mix of a counter, so they look random and can
/// never collide.
pub(super) struct RequestIds {
    pub(super) next: u64,
    pub(super) salt: u64,
}

impl RequestIds {
    pub(super) fn take(&mut self) -> u64 {
        self.next += 1;
        mix64(self.next.wrapping_add(self.salt))
    }
}

/// Key ids: a 32-bit bijection of (account number, key slot), salted by the
/// seed, so no two keys share an id. Farm accounts use the upper half of
/// the input space.
pub(super) fn key_id(salt: u32, slot: u32) -> u32 {
    mix32(slot ^ salt)
}

/// A prompt reused across requests: its fingerprint and size.
#[derive(Clone, Copy, Debug)]
pub(super) struct SharedPrompt {
    pub(super) fingerprint: u64,
    pub(super) tokens: u32,
    pub(super) chars: u32,
}

/// What every actor's step may read.
pub(super) struct World<'a> {
    pub(super) params: &'static ProfileParams,
    pub(super) popular: &'a [SharedPrompt; POPULAR_PROMPTS],
    pub(super) run_end_ms: i64,
}

/// Latency of a response, from its status and size.
pub(super) fn draw_latency(
    rng: &mut Rng,
    status: u16,
    embeddings: bool,
    completion_tokens: u32,
) -> u32 {
    let ms = match status {
        429 => rng.uniform(3.0, 40.0),
        400 => rng.uniform(5.0, 60.0),
        500 => rng.uniform(500.0, 30_000.0),
        _ if embeddings => rng.uniform(40.0, 300.0),
        _ => rng.uniform(150.0, 700.0) + f64::from(completion_tokens) * rng.uniform(8.0, 35.0),
    };
    ms as u32
}

pub(super) fn draw_status(rng: &mut Rng) -> u16 {
    let u = rng.unit();
    if u < 0.010 {
        429
    } else if u < 0.017 {
        500
    } else if u < 0.027 {
        400
    } else {
        200
    }
}

/// Share of records that carry the gateway's own `cost_usd`.
pub(super) const PRICED_SHARE: f64 = 0.7;
/// Share of prompts logged as raw text instead of a fingerprint.
pub(super) const TEXT_PROMPT_SHARE: f64 = 0.01;

pub(super) fn text_prompt(rng: &mut Rng) -> (PromptRef, u32, u32) {
    let template = rng.index(PROMPT_TEXTS.len());
    let reference = rng.int_in(10_000, 99_999);
    let chars = PROMPT_TEXTS[template].len() as u32 + PROMPT_REF_CHARS;
    (
        PromptRef::Text {
            template: template as u8,
            reference,
        },
        chars.div_ceil(4),
        chars,
    )
}

/// Characters of a prompt of `tokens` tokens (about four per token).
pub(super) fn chars_for(rng: &mut Rng, tokens: u32) -> u32 {
    (f64::from(tokens) * rng.uniform(3.3, 4.7)) as u32
}

/// Mean tokens (prompt and completion) of a benign request.
pub(super) fn expected_tokens_per_request(p: &ProfileParams, tier: Tier) -> f64 {
    let t = tier.index();
    let lognormal_mean = |median: f64, sigma: f64| median * rng::exp(sigma * sigma / 2.0);
    let prompt = lognormal_mean(p.prompt_median[t], p.prompt_sigma);
    let cap = f64::from(tier.limits().max_output_tokens) * BENIGN_OUTPUT_SHARE;
    let completion = lognormal_mean(p.completion_median[t], p.completion_sigma).min(cap);
    prompt + completion * (1.0 - p.embeddings_share)
}
