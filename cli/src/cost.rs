//! `soma cost --dry-run`: what a request may cost before it is sent. The BPE estimate, worst
//! case and prices the sidecar reserves against a Budget near its cap (far from it, the sidecar
//! reserves on the prompt's bytes, a looser bound that saves counting): every prompt token at
//! the dearest input price (plain, cached or cache-write) plus `max_tokens` of output (or the
//! sidecar's default when the request sets none).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{Value, json};
use soma_metering::{Amount, PriceTable, tokens};

use crate::budget::Output;

/// The endpoint a request is for (embeddings have no output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    /// `/v1/chat/completions` (and `/v1/completions`).
    Chat,
    /// `/v1/responses`.
    Responses,
    /// Anthropic's `/v1/messages`.
    Messages,
    /// `/v1/embeddings`.
    Embeddings,
}

/// `soma cost`.
#[derive(clap::Args, Debug)]
pub struct CostArgs {
    /// Estimate only (the only mode: nothing is sent anywhere).
    #[arg(long, required = true)]
    dry_run: bool,
    /// The request body (JSON); `-` or absent: standard input.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// The model (default: the request's `model`).
    #[arg(long)]
    model: Option<String>,
    /// The price table the operator hands the sidecars (`--prices-file`: YAML or JSON, model →
    /// inputPerMTok, outputPerMTok, cachedInputPerMTok, cacheWritePerMTok, cacheWrite1hPerMTok
    /// in micros per million tokens, webSearchPerUse, webFetchPerUse in micros per use).
    #[arg(long)]
    prices: Option<PathBuf>,
    /// The endpoint the request is for.
    #[arg(long, value_enum, default_value = "chat")]
    endpoint: Endpoint,
    /// Output tokens assumed when the request sets no `max_tokens` (the sidecar's
    /// `defaultMaxTokens`).
    #[arg(long, default_value_t = 4_096)]
    default_max_tokens: u64,
    /// Prompt tokens assumed per image (the sidecar's `imageTokens`).
    #[arg(long, default_value_t = tokens::DEFAULT_IMAGE_TOKENS)]
    image_tokens: u64,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("soma cost: {message}");
    ExitCode::from(2)
}

/// Runs the estimate.
pub fn run(args: &CostArgs) -> ExitCode {
    let text = match &args.file {
        Some(p) if p.as_os_str() != "-" => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => return fail(format_args!("cannot read {}: {e}", p.display())),
        },
        _ => {
            let mut t = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut t) {
                return fail(format_args!("cannot read standard input: {e}"));
            }
            t
        }
    };
    let body: Value = match serde_json::from_str(&text) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return fail("the request is not a JSON object"),
        Err(e) => return fail(format_args!("the request is not JSON: {e}")),
    };
    let Some(model) = args
        .model
        .clone()
        .or_else(|| body.get("model").and_then(Value::as_str).map(str::to_owned))
        .filter(|m| !m.is_empty())
    else {
        return fail("no model: the request has no \"model\" and --model is not given");
    };
    let price = match &args.prices {
        None => None,
        Some(p) => {
            let table: PriceTable = match std::fs::read_to_string(p)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_yaml::from_str(&t).map_err(|e| e.to_string()))
            {
                Ok(t) => t,
                Err(e) => return fail(format_args!("price table {}: {e}", p.display())),
            };
            match table.get(&model) {
                Some(p) => Some(*p),
                None => {
                    return fail(format_args!(
                        "model {model:?} is not in the price table {}: the sidecar would refuse the request as an unknown model",
                        p.display()
                    ));
                }
            }
        }
    };
    let prompt = tokens::estimate_prompt_with(&model, &body, args.image_tokens);
    let max_out = if args.endpoint == Endpoint::Embeddings {
        0
    } else {
        tokens::max_output_tokens(&body).unwrap_or(args.default_max_tokens)
    };
    // As the sidecar reserves it, with its default allowance for server tools.
    let bound = soma_metering::worst_usage(
        &body,
        prompt,
        max_out,
        &soma_metering::ToolAllowance::default(),
    );
    let worst = Amount::worst_case(&bound, price.as_ref());
    let out = json!({
        "model": model,
        "promptTokens": prompt,
        "maxOutputTokens": max_out,
        "worstCaseTokens": worst.tokens,
        "worstCaseWebSearches": bound.web_search_requests,
        "worstCaseWebFetches": bound.web_fetch_requests,
        "worstCaseCostMicros": price.map(|_| worst.micros),
        "priced": price.is_some(),
    });
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
        Output::Table => {
            println!("model               {model}");
            println!("prompt tokens       {prompt} (estimated with the model's BPE)");
            println!("max output tokens   {max_out}");
            println!("worst case tokens   {}", worst.tokens);
            if bound.web_search_requests + bound.web_fetch_requests > 0 {
                println!(
                    "server tool uses    {} web searches, {} web fetches (their results counted as input)",
                    bound.web_search_requests, bound.web_fetch_requests
                );
            }
            match price {
                Some(_) => println!(
                    "worst case cost     {} micros ({}.{:06} in the price table's currency)",
                    worst.micros,
                    worst.micros / 1_000_000,
                    worst.micros % 1_000_000
                ),
                None => println!("worst case cost     not priced (pass --prices)"),
            }
        }
    }
    ExitCode::SUCCESS
}
