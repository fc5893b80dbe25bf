//! The DR drill's report: what `soma dr drill` measured, typed once for the CLI that writes it
//! and the operator that copies it into a Job's status. The drill pod writes it as compact JSON
//! into its termination message (`--report-file /dev/termination-log`), which Kubernetes
//! keeps to at most 4096 bytes: [`DrillReport::bounded_json`] drops discrepancies that do
//! not fit, saying how many.

use serde::{Deserialize, Serialize};

/// The most bytes of a container's termination message Kubernetes keeps.
pub const REPORT_LIMIT: usize = 4096;

/// What one drill measured and found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrillReport {
    /// Whether the restore verified: chain intact, counts equal, nothing missing from the
    /// stream or the backup.
    pub passed: bool,
    /// When the backup's snapshot was taken (RFC 3339).
    pub snapshot_at: String,
    /// Seconds the backup took.
    pub backup_seconds: f64,
    /// Seconds the restore into the scratch database took.
    pub restore_seconds: f64,
    /// Seconds the verification of the restore took (audit chain, counts, stream).
    pub verify_seconds: f64,
    /// Recovery time: from the start of the restore to a verified restore.
    pub rto_seconds: f64,
    /// Recovery point: seconds of committed usage a restore from this backup loses (the
    /// newest record committed after the snapshot and before the backup was complete,
    /// measured from the snapshot; 0 when none was committed meanwhile).
    pub rpo_seconds: f64,
    /// Records committed after the snapshot, before the backup was complete.
    pub records_missed: i64,
    /// Usage records in the restore.
    pub records_restored: i64,
    /// Their tokens (input plus output).
    pub tokens_restored: i64,
    /// Their cost in micros.
    pub cost_micros_restored: i64,
    /// Usage messages in the JetStream stream (distinct records).
    pub stream_messages: i64,
    /// Whether the audit chains and seals of the restore verified (false also when not
    /// checked).
    pub chain_verified: bool,
    /// Whether the restore was reconciled against the stream.
    pub stream_reconciled: bool,
    /// What failed, exactly (empty when passed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discrepancies: Vec<String>,
    /// What was not a failure but is worth knowing (records not yet published, unsealed
    /// records of open windows, what was not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl DrillReport {
    /// Compact JSON of at most [`REPORT_LIMIT`] bytes: notes, then discrepancies, are dropped
    /// from the end (a last entry says how many) until it fits.
    pub fn bounded_json(&self) -> String {
        let fits = |r: &DrillReport| {
            let text = serde_json::to_string(r).unwrap_or_default();
            (text.len() <= REPORT_LIMIT).then_some(text)
        };
        let mut report = self.clone();
        loop {
            if let Some(text) = fits(&report) {
                return text;
            }
            if report.notes.pop().is_none() {
                break;
            }
        }
        // Keep the first discrepancies (the first says what failed first) and count the rest.
        let all = std::mem::take(&mut report.discrepancies);
        for kept in (1..=all.len()).rev() {
            report.discrepancies = all[..kept].to_vec();
            if kept < all.len() {
                report
                    .discrepancies
                    .push(format!("... and {} more discrepancies", all.len() - kept));
            }
            if let Some(text) = fits(&report) {
                return text;
            }
        }
        // One discrepancy too long on its own: cut it to what fits.
        let mut first = all.first().cloned().unwrap_or_default();
        let mut cut = first.len().min(REPORT_LIMIT / 2);
        while cut > 0 && !first.is_char_boundary(cut) {
            cut -= 1;
        }
        first.truncate(cut);
        first.push_str(" ...");
        report.discrepancies = vec![first];
        fits(&report).unwrap_or_else(|| {
            serde_json::to_string(&DrillReport {
                discrepancies: vec!["the report did not fit a termination message".into()],
                ..DrillReport::default()
            })
            .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_report_is_cut_to_fit_and_says_how_much_was_left_out() {
        let report = DrillReport {
            passed: false,
            discrepancies: (0..500)
                .map(|i| format!("record {i:04} is in the stream but not in the ledger"))
                .collect(),
            notes: vec!["x".repeat(100); 20],
            ..DrillReport::default()
        };
        let text = report.bounded_json();
        assert!(text.len() <= REPORT_LIMIT, "{}", text.len());
        let back: DrillReport = serde_json::from_str(&text).unwrap();
        assert!(back.notes.is_empty());
        assert_eq!(
            back.discrepancies[0],
            "record 0000 is in the stream but not in the ledger"
        );
        let last = back.discrepancies.last().unwrap();
        assert!(
            last.starts_with("... and ") && last.ends_with(" more discrepancies"),
            "{last}"
        );
        let shown = back.discrepancies.len() - 1;
        let more: usize = last
            .trim_start_matches("... and ")
            .trim_end_matches(" more discrepancies")
            .parse()
            .unwrap();
        assert_eq!(shown + more, 500);
        // A short report is left alone.
        let small = DrillReport {
            passed: true,
            ..DrillReport::default()
        };
        assert_eq!(
            serde_json::from_str::<DrillReport>(&small.bounded_json()).unwrap(),
            small
        );
    }
}
