//! The fixed tables of the model: tier limits, model prices, networks,
//! clients, raw prompt texts, and the two traffic profiles' knobs.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tier {
    Free,
    Pro,
    Enterprise,
}

/// The limits the detectors are configured with, per tier.
pub(super) struct TierLimits {
    pub(super) name: &'static str,
    pub(super) requests_per_min: u32,
    pub(super) tokens_per_day: u64,
    pub(super) max_output_tokens: u32,
    /// Daily budget in units of 1e-8 USD.
    pub(super) budget_e8: u64,
}

pub(super) const TIER_LIMITS: [TierLimits; 3] = [
    TierLimits {
        name: "free",
        requests_per_min: 10,
        tokens_per_day: 10_000,
        max_output_tokens: 500,
        budget_e8: 100_000_000,
    },
    TierLimits {
        name: "pro",
        requests_per_min: 60,
        tokens_per_day: 100_000,
        max_output_tokens: 4000,
        budget_e8: 5_000_000_000,
    },
    TierLimits {
        name: "enterprise",
        requests_per_min: 300,
        tokens_per_day: 1_000_000,
        max_output_tokens: 8000,
        budget_e8: 50_000_000_000,
    },
];

impl Tier {
    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub(super) fn limits(self) -> &'static TierLimits {
        &TIER_LIMITS[self.index()]
    }
}

/// Benign accounts keep to these shares of their tier's limits.
pub(super) const BENIGN_RATE_SHARE: f64 = 0.6;
pub(super) const BENIGN_OUTPUT_SHARE: f64 = 0.6;
pub(super) const BENIGN_TOKEN_SHARE: f64 = 0.75;
pub(super) const BENIGN_SPEND_SHARE: f64 = 0.8;

/// Prompt sizes of benign requests are capped per tier.
pub(super) const PROMPT_CAP: [u32; 3] = [2_000, 12_000, 24_000];

pub(super) struct Model {
    pub(super) name: &'static str,
    /// USD cents per million input tokens, i.e. 1e-8 USD per token.
    pub(super) input_e8: u64,
    /// USD cents per million output tokens.
    pub(super) output_e8: u64,
}

pub(super) const MODELS: [Model; 7] = [
    Model {
        name: "gpt-4o",
        input_e8: 250,
        output_e8: 1000,
    },
    Model {
        name: "gpt-4o-mini",
        input_e8: 15,
        output_e8: 60,
    },
    Model {
        name: "gpt-4.1",
        input_e8: 200,
        output_e8: 800,
    },
    Model {
        name: "gpt-4.1-mini",
        input_e8: 40,
        output_e8: 160,
    },
    Model {
        name: "claude-sonnet-4",
        input_e8: 300,
        output_e8: 1500,
    },
    Model {
        name: "claude-3-5-haiku",
        input_e8: 80,
        output_e8: 400,
    },
    Model {
        name: "gemini-2.0-flash",
        input_e8: 10,
        output_e8: 40,
    },
];
pub(super) const GPT_4O: u8 = 0;
pub(super) const GPT_4O_MINI: u8 = 1;
pub(super) const GPT_4_1: u8 = 2;
pub(super) const CLAUDE_SONNET_4: u8 = 4;
pub(super) const GEMINI_FLASH: u8 = 6;

pub(super) fn cost_e8(model: u8, prompt_tokens: u32, completion_tokens: u32) -> u64 {
    let m = &MODELS[usize::from(model)];
    u64::from(prompt_tokens) * m.input_e8 + u64::from(completion_tokens) * m.output_e8
}

pub(super) const CHAT: &str = "/v1/chat/completions";
pub(super) const EMBEDDINGS: &str = "/v1/embeddings";

/// An autonomous system and two /16 prefixes its addresses come from.
pub(super) struct Network {
    pub(super) asn: u32,
    pub(super) prefixes: [[u8; 2]; 2],
}

pub(super) const fn net(asn: u32, a: [u8; 2], b: [u8; 2]) -> Network {
    Network {
        asn,
        prefixes: [a, b],
    }
}

/// Consumer and business access networks: where people call from.
pub(super) const ACCESS_NETWORKS: [Network; 15] = [
    net(7922, [73, 15], [98, 207]),
    net(701, [71, 105], [108, 28]),
    net(7018, [99, 45], [107, 210]),
    net(20115, [76, 174], [97, 86]),
    net(3320, [79, 210], [91, 54]),
    net(3215, [90, 26], [86, 245]),
    net(2856, [86, 140], [109, 150]),
    net(12322, [88, 170], [82, 64]),
    net(4766, [121, 133], [175, 192]),
    net(55836, [49, 36], [157, 32]),
    net(1221, [101, 160], [120, 144]),
    net(28573, [177, 32], [189, 6]),
    net(6830, [84, 24], [62, 195]),
    net(4713, [153, 203], [114, 150]),
    net(812, [99, 224], [174, 112]),
];

/// Cloud providers: where back ends call from.
pub(super) const CLOUD_NETWORKS: [Network; 8] = [
    net(16509, [52, 14], [54, 210]),
    net(15169, [34, 82], [35, 199]),
    net(8075, [20, 62], [40, 112]),
    net(14061, [159, 65], [167, 99]),
    net(24940, [95, 216], [88, 99]),
    net(16276, [51, 68], [145, 239]),
    net(63949, [172, 105], [45, 79]),
    net(20473, [45, 32], [149, 28]),
];

/// Hosting, proxy and far-away access networks abusers also use.
pub(super) const ABUSE_NETWORKS: [Network; 10] = [
    net(9009, [185, 156], [89, 46]),
    net(60068, [185, 59], [195, 181]),
    net(4134, [113, 89], [183, 14]),
    net(9808, [112, 17], [120, 230]),
    net(12389, [95, 24], [178, 66]),
    net(45899, [14, 162], [113, 185]),
    net(7552, [27, 64], [171, 224]),
    net(8452, [41, 33], [197, 38]),
    net(36947, [41, 105], [105, 101]),
    net(9121, [78, 172], [88, 230]),
];

pub(super) fn network(i: usize) -> &'static Network {
    let (a, c) = (ACCESS_NETWORKS.len(), CLOUD_NETWORKS.len());
    if i < a {
        &ACCESS_NETWORKS[i]
    } else if i < a + c {
        &CLOUD_NETWORKS[i - a]
    } else {
        &ABUSE_NETWORKS[i - a - c]
    }
}
pub(super) const NETWORK_COUNT: usize =
    ACCESS_NETWORKS.len() + CLOUD_NETWORKS.len() + ABUSE_NETWORKS.len();

pub(super) fn address_in(net: &Network, rng: &mut Rng) -> u32 {
    let [a, b] = net.prefixes[rng.index(2)];
    u32::from_be_bytes([a, b, rng.below(256) as u8, 1 + rng.below(254) as u8])
}

/// Clients: the first `BENIGN_CLIENTS` are what accounts use; the rest are
/// what scripts and abusers use (a leaked key's users may use any but the
/// victim's own).
pub(super) const USER_AGENTS: [&str; 22] = [
    "OpenAI/Python 1.54.3",
    "OpenAI/JS 4.73.0",
    "Anthropic/Python 0.39.0",
    "langchain-openai/0.2.9 python/3.12.7",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "llama-index/0.12.2 openai/1.54.3",
    "litellm/1.52.14",
    "python-httpx/0.27.2",
    "Go-http-client/2.0",
    "okhttp/4.12.0",
    "Cursor/0.43.6 (darwin arm64)",
    "python-requests/2.32.3",
    "curl/8.11.0",
    "Go-http-client/1.1",
    "axios/1.7.9",
    "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
    "Python-urllib/3.11",
    "aiohttp/3.11.10",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "PostmanRuntime/7.43.0",
    "Java-http-client/21.0.5",
];
pub(super) const BENIGN_CLIENTS: usize = 12;

/// Raw prompts some gateways log instead of a fingerprint (plain ASCII, no
/// JSON escaping needed); each gets a " (ref NNNNN)" suffix so they rarely
/// repeat.
pub(super) const PROMPT_TEXTS: [&str; 12] = [
    "Summarize this support ticket in two sentences",
    "Translate the following paragraph into German",
    "Write a SQL query that counts orders per region",
    "Explain the difference between TCP and UDP",
    "Draft a polite reply declining the meeting",
    "Generate five product names for a coffee brand",
    "Fix the grammar in this sentence",
    "List the key risks in this contract clause",
    "Rewrite this paragraph for a ten year old",
    "Classify the sentiment of this review",
    "Extract the invoice number and total from this text",
    "Suggest unit tests for this Python function",
];
pub(super) const PROMPT_REF_CHARS: u32 = 12; // " (ref NNNNN)"

pub(super) const POPULAR_PROMPTS: usize = 20;

// ---------------------------------------------------------------------------
// Profiles.

/// The knobs of one traffic shape (per-tier arrays: free, pro, enterprise).
pub(super) struct ProfileParams {
    /// Cumulative tier shares: free, free + pro; enterprise is the rest.
    pub(super) tier_mix: [f64; 2],
    /// Pareto scale of sessions per day, per tier.
    pub(super) sessions_per_day_min: [f64; 3],
    /// Sessions per day are capped here.
    pub(super) sessions_per_day_max: [f64; 3],
    /// Pareto shape of sessions per day (smaller: heavier tail).
    pub(super) activity_alpha: f64,
    /// Mean requests per (non-burst) session.
    pub(super) session_len_mean: [f64; 3],
    /// Mean gap between a session's requests.
    pub(super) gap_mean_ms: [f64; 3],
    /// Hour (UTC) of the daily peak.
    pub(super) peak_hour_utc: f64,
    /// Activity at the daily trough, relative to the peak.
    pub(super) trough: f64,
    /// Share of pro and enterprise accounts that run batch jobs.
    pub(super) batch_share: f64,
    /// Chance that a batch account's session is a burst.
    pub(super) burst_chance: f64,
    /// Burst rate relative to the account's usual rate: [min, max).
    pub(super) burst_mult: [f64; 2],
    /// Multiplier of `SimConfig::split_fraction`.
    pub(super) split_mult: f64,
    /// Median prompt tokens per tier and the lognormal sigma.
    pub(super) prompt_median: [f64; 3],
    pub(super) prompt_sigma: f64,
    /// Median completion tokens per tier and the lognormal sigma.
    pub(super) completion_median: [f64; 3],
    pub(super) completion_sigma: f64,
    /// Share of requests using a popular (shared) prompt.
    pub(super) popular_share: f64,
    /// Share of fresh prompts that will be repeated (retry, regenerate).
    pub(super) repeat_share: f64,
    /// Share of requests to the embeddings endpoint.
    pub(super) embeddings_share: f64,
    /// Model weights per tier, in `MODELS` order.
    pub(super) model_weights: [[u32; 7]; 3],
}

pub(super) const STANDARD: ProfileParams = ProfileParams {
    tier_mix: [0.60, 0.95],
    sessions_per_day_min: [0.6, 1.5, 6.0],
    sessions_per_day_max: [12.0, 40.0, 150.0],
    activity_alpha: 1.6,
    session_len_mean: [4.0, 6.0, 12.0],
    gap_mean_ms: [30_000.0, 20_000.0, 8_000.0],
    peak_hour_utc: 15.0,
    trough: 0.30,
    batch_share: 0.15,
    burst_chance: 0.15,
    burst_mult: [2.0, 3.0],
    split_mult: 1.0,
    prompt_median: [150.0, 450.0, 700.0],
    prompt_sigma: 0.8,
    completion_median: [120.0, 280.0, 350.0],
    completion_sigma: 0.7,
    popular_share: 0.01,
    repeat_share: 0.04,
    embeddings_share: 0.08,
    model_weights: [
        [3, 40, 0, 12, 0, 15, 30],
        [20, 25, 10, 15, 15, 10, 5],
        [20, 15, 20, 10, 25, 5, 5],
    ],
};

pub(super) const SHIFTED: ProfileParams = ProfileParams {
    tier_mix: [0.40, 0.85],
    sessions_per_day_min: [0.7, 1.8, 7.0],
    sessions_per_day_max: [16.0, 60.0, 200.0],
    activity_alpha: 1.2,
    session_len_mean: [5.0, 8.0, 15.0],
    gap_mean_ms: [24_000.0, 16_000.0, 6_400.0],
    peak_hour_utc: 7.5,
    trough: 0.15,
    batch_share: 0.35,
    burst_chance: 0.25,
    burst_mult: [2.5, 3.0],
    split_mult: 2.0,
    prompt_median: [300.0, 900.0, 1400.0],
    prompt_sigma: 0.9,
    completion_median: [60.0, 140.0, 175.0],
    completion_sigma: 0.8,
    popular_share: 0.03,
    repeat_share: 0.06,
    embeddings_share: 0.18,
    model_weights: [
        [2, 20, 0, 8, 0, 25, 45],
        [10, 15, 10, 10, 30, 15, 10],
        [10, 10, 15, 10, 40, 5, 10],
    ],
};

impl Profile {
    pub(super) fn params(self) -> &'static ProfileParams {
        match self {
            Profile::Standard => &STANDARD,
            Profile::Shifted => &SHIFTED,
        }
    }
}

/// Activity relative to the daily peak at `ms`: a sinusoid between the
/// profile's trough and 1.
pub(super) fn daily_cycle(p: &ProfileParams, ms: i64) -> f64 {
    let hour = ms.rem_euclid(DAY_MS) as f64 / HOUR_MS as f64;
    let phase = std::f64::consts::TAU * (hour - p.peak_hour_utc) / 24.0;
    1.0 - (1.0 - p.trough) * (1.0 - cos(phase)) * 0.5
}
