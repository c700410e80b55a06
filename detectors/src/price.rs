//! Model prices, in USD per million tokens, and the lookup that prices a record.
//!
//! Spend is kept in integer micro-dollars so budget crossings are exact:
//! `tokens × (USD per 1M tokens)` is already micro-dollars.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// One model's list price.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// USD per 1M input (prompt) tokens.
    pub input_per_mtok: f64,
    /// USD per 1M output (completion) tokens.
    pub output_per_mtok: f64,
}

impl ModelPrice {
    /// Cost of a request in micro-dollars.
    #[inline]
    pub fn cost_micros(&self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        (prompt_tokens as f64 * self.input_per_mtok
            + completion_tokens as f64 * self.output_per_mtok)
            .round() as u64
    }

    pub(crate) fn validate(&self, field: &str) -> Result<(), ConfigError> {
        for (name, v) in [
            ("input_per_mtok", self.input_per_mtok),
            ("output_per_mtok", self.output_per_mtok),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError {
                    field: format!("{field}.{name}"),
                    problem: format!("must be a non-negative number, got {v}"),
                });
            }
        }
        Ok(())
    }
}

/// The built-in price table: providers' published list prices (USD per 1M
/// tokens, standard tier, no caching or batch discounts) as of 2025. Prices
/// change: override or extend them under `[pricing.models]`.
pub fn default_prices() -> BTreeMap<String, ModelPrice> {
    let table: &[(&str, f64, f64)] = &[
        ("gpt-5", 1.25, 10.0),
        ("gpt-5-mini", 0.25, 2.0),
        ("gpt-5-nano", 0.05, 0.40),
        ("gpt-4.1", 2.0, 8.0),
        ("gpt-4.1-mini", 0.40, 1.60),
        ("gpt-4.1-nano", 0.10, 0.40),
        ("gpt-4o", 2.50, 10.0),
        ("gpt-4o-mini", 0.15, 0.60),
        ("o3", 2.0, 8.0),
        ("o3-mini", 1.10, 4.40),
        ("o4-mini", 1.10, 4.40),
        ("text-embedding-3-small", 0.02, 0.0),
        ("text-embedding-3-large", 0.13, 0.0),
        ("claude-opus-4", 15.0, 75.0),
        ("claude-sonnet-4", 3.0, 15.0),
        ("claude-3-7-sonnet", 3.0, 15.0),
        ("claude-3-5-sonnet", 3.0, 15.0),
        ("claude-haiku-4-5", 1.0, 5.0),
        ("claude-3-5-haiku", 0.80, 4.0),
        ("gemini-2.5-pro", 1.25, 10.0),
        ("gemini-2.5-flash", 0.30, 2.50),
        ("gemini-2.0-flash", 0.10, 0.40),
        ("gemini-1.5-pro", 1.25, 5.0),
        ("mistral-large", 2.0, 6.0),
        ("mistral-small", 0.10, 0.30),
    ];
    table
        .iter()
        .map(|&(m, i, o)| {
            (
                m.to_string(),
                ModelPrice {
                    input_per_mtok: i,
                    output_per_mtok: o,
                },
            )
        })
        .collect()
}

/// Most distinct model names remembered by the lookup cache; names past it are
/// still priced, just not cached (a flood of made-up names cannot grow memory).
const CACHE_CAP: usize = 1024;

/// Prices records by model name: exact name, else the longest table entry the
/// name starts with, also after a `provider/` prefix is removed.
#[derive(Clone, Debug)]
pub struct PriceTable {
    entries: Vec<(String, ModelPrice)>,
    fallback: Option<ModelPrice>,
    cache: HashMap<Box<str>, Option<ModelPrice>, crate::StableBuild>,
}

impl PriceTable {
    /// A table over `prices`, with `fallback` for names it does not know.
    pub fn new(prices: BTreeMap<String, ModelPrice>, fallback: Option<ModelPrice>) -> Self {
        PriceTable {
            entries: prices.into_iter().collect(),
            fallback,
            cache: HashMap::default(),
        }
    }

    fn search(&self, model: &str) -> Option<ModelPrice> {
        let bare = model.rsplit('/').next().unwrap_or(model);
        let mut best: Option<(usize, ModelPrice)> = None;
        for name in [model, bare] {
            for (k, p) in &self.entries {
                if name.starts_with(k.as_str()) && best.is_none_or(|(len, _)| k.len() > len) {
                    best = Some((k.len(), *p));
                }
            }
        }
        best.map(|(_, p)| p)
    }

    /// The table's price of `model` (`None` when unknown; the fallback is not applied).
    pub fn lookup(&mut self, model: &str) -> Option<ModelPrice> {
        if let Some(p) = self.cache.get(model) {
            return *p;
        }
        let p = self.search(model);
        if self.cache.len() < CACHE_CAP {
            self.cache.insert(model.into(), p);
        }
        p
    }

    /// Cost in micro-dollars, and whether the model was priced (false: unknown
    /// model or none given, priced by the fallback or at zero).
    pub fn cost_micros(
        &mut self,
        model: Option<&str>,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> (u64, bool) {
        let known = model.and_then(|m| self.lookup(m));
        match known.or(self.fallback) {
            Some(p) => (
                p.cost_micros(prompt_tokens, completion_tokens),
                known.is_some(),
            ),
            None => (0, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let mut t = PriceTable::new(default_prices(), None);
        assert_eq!(t.lookup("gpt-4o").unwrap().input_per_mtok, 2.5);
        assert_eq!(
            t.lookup("gpt-4o-mini-2024-07-18").unwrap().input_per_mtok,
            0.15
        );
        assert_eq!(t.lookup("gpt-4o-2024-08-06").unwrap().output_per_mtok, 10.0);
        assert_eq!(
            t.lookup("openai/gpt-4.1-mini").unwrap().input_per_mtok,
            0.40
        );
        assert_eq!(
            t.lookup("claude-sonnet-4-20250514")
                .unwrap()
                .output_per_mtok,
            15.0
        );
        assert!(t.lookup("my-finetune").is_none());
    }

    #[test]
    fn costs_are_micro_dollars_and_unknowns_are_flagged() {
        let mut t = PriceTable::new(default_prices(), None);
        // 812 in, 233 out on gpt-4o: 812*2.5 + 233*10 = 4360 micro-dollars.
        assert_eq!(t.cost_micros(Some("gpt-4o"), 812, 233), (4360, true));
        assert_eq!(t.cost_micros(Some("mystery"), 812, 233), (0, false));
        assert_eq!(t.cost_micros(None, 1, 1), (0, false));
        let mut f = PriceTable::new(
            default_prices(),
            Some(ModelPrice {
                input_per_mtok: 1.0,
                output_per_mtok: 2.0,
            }),
        );
        assert_eq!(f.cost_micros(Some("mystery"), 10, 10), (30, false));
    }
}
