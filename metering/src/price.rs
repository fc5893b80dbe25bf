//! Prices per model, and the cost of a [`Usage`] in integer micro-units.
//!
//! A price is micros per million tokens (USD 2.50 per 1M input tokens is `2_500_000`), and for
//! server-tool uses micros per use (USD 10 per 1,000 web searches is `10_000`). A call's cost is
//! `ceil(Σ tokens_k × price_k / 1_000_000) + Σ uses_t × price_t` over the token kinds and
//! tools, computed in `u128`, so it never overflows and never rounds a paid call down to zero.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::usage::Usage;

/// Micros per million tokens, by token kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    /// Plain prompt tokens.
    pub input_per_m_tok: u64,
    /// Generated tokens (reasoning included).
    pub output_per_m_tok: u64,
    /// Prompt tokens read from the cache; the input price when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_m_tok: Option<u64>,
    /// Prompt tokens written to the cache; the input price when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_m_tok: Option<u64>,
    /// Prompt tokens written to the cache with a one-hour lifetime; `cacheWritePerMTok` (then
    /// the input price) when unset.
    #[serde(
        default,
        rename = "cacheWrite1hPerMTok",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_write_1h_per_m_tok: Option<u64>,
    /// Micros per web search the provider runs. Unset: searches are not priced, and a record
    /// with searches says so (`unmetered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_search_per_use: Option<u64>,
    /// Micros per web page the provider fetches (Anthropic bills fetches as tokens only: set
    /// 0 to say so). Unset: as for searches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_fetch_per_use: Option<u64>,
}

const PER: u128 = 1_000_000;

impl Price {
    /// The cost of `usage` in micros, rounded up.
    pub fn cost_micros(&self, usage: &Usage) -> u64 {
        let cached = self.cached_input_per_m_tok.unwrap_or(self.input_per_m_tok);
        let write = self.cache_write_per_m_tok.unwrap_or(self.input_per_m_tok);
        let write_1h = self.cache_write_1h_per_m_tok.unwrap_or(write);
        let term = |n: u64, price: u64| u128::from(n).saturating_mul(u128::from(price));
        let scaled = term(usage.uncached_input_tokens(), self.input_per_m_tok)
            .saturating_add(term(usage.cached_input_tokens, cached))
            .saturating_add(term(usage.cache_write_short_input_tokens(), write))
            .saturating_add(term(usage.cache_write_1h_input_tokens, write_1h))
            .saturating_add(term(usage.output_tokens, self.output_per_m_tok));
        let uses = term(
            usage.web_search_requests,
            self.web_search_per_use.unwrap_or(0),
        )
        .saturating_add(term(
            usage.web_fetch_requests,
            self.web_fetch_per_use.unwrap_or(0),
        ));
        u64::try_from(scaled.div_ceil(PER).saturating_add(uses)).unwrap_or(u64::MAX)
    }

    /// The dearest price of a prompt token (plain, cached or cache write).
    pub fn dearest_input_per_m_tok(&self) -> u64 {
        self.input_per_m_tok
            .max(self.cached_input_per_m_tok.unwrap_or(0))
            .max(self.cache_write_per_m_tok.unwrap_or(0))
            .max(self.cache_write_1h_per_m_tok.unwrap_or(0))
    }

    /// What `usage` holds that this price does not price: server-tool uses without a per-use
    /// price (`price.webSearchPerUse`, `price.webFetchPerUse`).
    pub fn unpriced(&self, usage: &Usage) -> Vec<&'static str> {
        let mut out = Vec::new();
        if usage.web_search_requests > 0 && self.web_search_per_use.is_none() {
            out.push("price.webSearchPerUse");
        }
        if usage.web_fetch_requests > 0 && self.web_fetch_per_use.is_none() {
            out.push("price.webFetchPerUse");
        }
        out
    }
}

/// Prices by model name, as the sidecar's configuration gives them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PriceTable(pub BTreeMap<String, Price>);

impl PriceTable {
    /// The price of `model`: an exact name, else the longest configured prefix ending in `*`
    /// (`"gpt-4o-*"` prices dated snapshots such as `gpt-4o-2024-08-06`).
    pub fn get(&self, model: &str) -> Option<&Price> {
        if let Some(p) = self.0.get(model) {
            return Some(p);
        }
        self.0
            .iter()
            .filter_map(|(k, p)| k.strip_suffix('*').map(|prefix| (prefix, p)))
            .filter(|(prefix, _)| model.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(i: u64, o: u64, c: Option<u64>) -> Price {
        Price {
            input_per_m_tok: i,
            output_per_m_tok: o,
            cached_input_per_m_tok: c,
            ..Price::default()
        }
    }

    #[test]
    fn cost_table() {
        let u = |i, c, o| Usage {
            input_tokens: i,
            cached_input_tokens: c,
            output_tokens: o,
            ..Usage::default()
        };
        // (price, usage, micros)
        let cases = [
            // gpt-4o: $2.50 in, $10 out, $1.25 cached per 1M
            (
                price(2_500_000, 10_000_000, Some(1_250_000)),
                u(1_000, 0, 500),
                7_500,
            ),
            (
                price(2_500_000, 10_000_000, Some(1_250_000)),
                u(1_000, 400, 500),
                7_000,
            ),
            // one token of a cheap model still costs a micro (rounded up)
            (price(150_000, 600_000, None), u(1, 0, 0), 1),
            (price(150_000, 600_000, None), u(0, 0, 0), 0),
            // cached price falls back to input price
            (
                price(3_000_000, 15_000_000, None),
                u(2_000, 1_000, 0),
                6_000,
            ),
            // enormous counts do not overflow
            (
                price(u64::MAX, u64::MAX, None),
                u(u64::MAX, 0, u64::MAX),
                u64::MAX,
            ),
        ];
        for (p, usage, want) in cases {
            assert_eq!(p.cost_micros(&usage), want, "{p:?} {usage:?}");
        }
    }

    #[test]
    fn cache_writes_have_their_own_price() {
        let p = Price {
            cache_write_per_m_tok: Some(3_750_000),
            ..price(3_000_000, 15_000_000, Some(300_000))
        };
        let usage = Usage {
            input_tokens: 3_000,
            cached_input_tokens: 1_000,
            cache_write_input_tokens: 1_000,
            output_tokens: 100,
            ..Usage::default()
        };
        // 1000*3 + 1000*0.3 + 1000*3.75 + 100*15 = 3000 + 300 + 3750 + 1500
        assert_eq!(p.cost_micros(&usage), 8_550);
        // Of the writes, 400 kept for an hour at $6/M: 600*3.75 + 400*6 instead of 1000*3.75.
        let p1h = Price {
            cache_write_1h_per_m_tok: Some(6_000_000),
            ..p
        };
        let u1h = Usage {
            cache_write_1h_input_tokens: 400,
            ..usage
        };
        assert_eq!(p1h.cost_micros(&u1h), 3_000 + 300 + 2_250 + 2_400 + 1_500);
        // Without a 1h price, 1h writes cost what other writes do.
        assert_eq!(p.cost_micros(&u1h), 8_550);
    }

    #[test]
    fn server_tool_uses_are_priced_per_use_or_reported_unpriced() {
        let usage = Usage {
            input_tokens: 1_000,
            output_tokens: 100,
            web_search_requests: 3,
            web_fetch_requests: 2,
            ..Usage::default()
        };
        let p = Price {
            web_search_per_use: Some(10_000),
            web_fetch_per_use: Some(0),
            ..price(3_000_000, 15_000_000, None)
        };
        // tokens 3000 + 1500, searches 3 × 10_000, fetches free
        assert_eq!(p.cost_micros(&usage), 4_500 + 30_000);
        assert!(p.unpriced(&usage).is_empty());
        let bare = price(3_000_000, 15_000_000, None);
        assert_eq!(bare.cost_micros(&usage), 4_500);
        assert_eq!(
            bare.unpriced(&usage),
            vec!["price.webSearchPerUse", "price.webFetchPerUse"]
        );
    }

    #[test]
    fn lookup_exact_then_longest_prefix() {
        let t: PriceTable = serde_json::from_str(
            r#"{"gpt-4o": {"inputPerMTok": 1, "outputPerMTok": 1},
                "gpt-4o-*": {"inputPerMTok": 2, "outputPerMTok": 2},
                "gpt-4o-mini*": {"inputPerMTok": 3, "outputPerMTok": 3}}"#,
        )
        .unwrap();
        assert_eq!(t.get("gpt-4o").unwrap().input_per_m_tok, 1);
        assert_eq!(t.get("gpt-4o-2024-08-06").unwrap().input_per_m_tok, 2);
        assert_eq!(t.get("gpt-4o-mini-2024-07-18").unwrap().input_per_m_tok, 3);
        assert!(t.get("claude-3-5-haiku").is_none());
    }

    #[test]
    fn unknown_price_fields_are_refused() {
        let r: Result<Price, _> =
            serde_json::from_str(r#"{"inputPerMTok": 1, "outputPerMTok": 1, "input": 3}"#);
        assert!(r.is_err());
    }
}
