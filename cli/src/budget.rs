//! `soma budget report`: spend by Budget, Agent, model and day for a period, from the ledger,
//! as a table or JSON. A request charged to a chain counts under each Budget of the chain.

use std::collections::BTreeMap;
use std::process::ExitCode;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::Serialize;
use soma_ledger::spend::{ReportFilter, ReportRow, report as query};

use crate::ledger::{Failure, LedgerArgs, cause, connect};

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table for people.
    Table,
    /// JSON for programs.
    Json,
}

/// `soma budget report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    /// Only this Budget (`namespace/name`).
    #[arg(long)]
    budget: Option<String>,
    /// Only the Budgets of this namespace.
    #[arg(long, short = 'n', conflicts_with = "budget")]
    namespace: Option<String>,
    /// From this day (`YYYY-MM-DD`, in `--time-zone`) or instant (RFC 3339); default: the
    /// first day of this month.
    #[arg(long)]
    since: Option<String>,
    /// Until (exclusive) this day or instant; default: now.
    #[arg(long)]
    until: Option<String>,
    /// The zone days are counted in (IANA name).
    #[arg(long, default_value = "UTC")]
    time_zone: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

fn instant(text: &str, tz: &TimeZone, flag: &str) -> Result<Timestamp, Failure> {
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(t);
    }
    let day: Date = text.parse().map_err(|_| {
        Failure::input(format!(
            "{flag} {text:?} is neither a day (YYYY-MM-DD) nor an RFC 3339 instant"
        ))
    })?;
    day.to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .map_err(|e| Failure::input(format!("{flag} {text:?}: {e}")))
}

/// The report's JSON.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    since: String,
    until: String,
    time_zone: String,
    rows: Vec<ReportRow>,
    totals: Vec<Total>,
}

/// One Budget's total over the report.
#[derive(Serialize, Default, Clone)]
#[serde(rename_all = "camelCase")]
struct Total {
    budget: String,
    requests: i64,
    tokens: i64,
    cost_micros: i64,
}

fn cost(micros: i64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// Runs the report.
pub async fn report(args: ReportArgs) -> Result<ExitCode, Failure> {
    let tz = TimeZone::get(&args.time_zone).map_err(|_| {
        Failure::input(format!(
            "--time-zone {:?} is not an IANA time zone",
            args.time_zone
        ))
    })?;
    if let Some(b) = &args.budget {
        b.parse::<soma_metering::BudgetKey>()
            .map_err(|_| Failure::input(format!("--budget {b:?} must be namespace/name")))?;
    }
    let now = Timestamp::now();
    let since = match &args.since {
        Some(s) => instant(s, &tz, "--since")?,
        None => {
            let today = now.to_zoned(tz.clone()).date();
            today
                .first_of_month()
                .to_zoned(tz.clone())
                .map_err(|e| Failure::input(e.to_string()))?
                .timestamp()
        }
    };
    let until = match &args.until {
        Some(s) => instant(s, &tz, "--until")?,
        None => now,
    };
    if since >= until {
        return Err(Failure::input(format!(
            "--since ({since}) must be before --until ({until})"
        )));
    }
    let pool = connect(&args.ledger).await?;
    let rows = query(
        &pool,
        &ReportFilter {
            namespace: args.namespace.clone(),
            budget: args.budget.clone(),
            from_ms: since.as_millisecond(),
            to_ms: until.as_millisecond(),
            time_zone: args.time_zone.clone(),
        },
    )
    .await
    .map_err(|e| Failure::input(format!("reading the ledger: {}", cause(&e))))?;
    let mut totals: BTreeMap<String, Total> = BTreeMap::new();
    for r in &rows {
        let t = totals.entry(r.budget.clone()).or_insert_with(|| Total {
            budget: r.budget.clone(),
            ..Total::default()
        });
        t.requests += r.requests;
        t.tokens += r.input_tokens + r.output_tokens;
        t.cost_micros += r.cost_micros;
    }
    let report = Report {
        since: since.to_string(),
        until: until.to_string(),
        time_zone: args.time_zone.clone(),
        totals: totals.into_values().collect(),
        rows,
    };
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return Err(Failure::input(e.to_string())),
        },
        Output::Table => print_table(&report),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Report) {
    println!(
        "Spend from {} until {} (days in {})",
        r.since, r.until, r.time_zone
    );
    if r.rows.is_empty() {
        println!("no usage recorded");
        return;
    }
    let header = [
        "BUDGET", "DAY", "AGENT", "MODEL", "REQUESTS", "INPUT", "CACHED", "OUTPUT", "COST",
    ];
    let mut lines: Vec<[String; 9]> = r
        .rows
        .iter()
        .map(|x| {
            [
                x.budget.clone(),
                x.day.clone(),
                format!("{}/{}", x.namespace, x.agent),
                x.model.clone(),
                x.requests.to_string(),
                x.input_tokens.to_string(),
                x.cached_input_tokens.to_string(),
                x.output_tokens.to_string(),
                cost(x.cost_micros),
            ]
        })
        .collect();
    for t in &r.totals {
        lines.push([
            t.budget.clone(),
            "TOTAL".into(),
            String::new(),
            String::new(),
            t.requests.to_string(),
            String::new(),
            String::new(),
            format!("{} tokens", t.tokens),
            cost(t.cost_micros),
        ]);
    }
    let mut widths = header.map(str::len);
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.len());
        }
    }
    let print = |cells: &[String]| {
        let row: Vec<String> = cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i >= 4 {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        println!("{}", row.join("  ").trim_end());
    };
    print(&header.map(str::to_owned));
    for l in &lines {
        print(l);
    }
}
