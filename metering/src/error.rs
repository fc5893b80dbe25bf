//! The metering crate's one error type.

/// What can go wrong while reading metering definitions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `period.timeZone` is not an IANA zone this build knows.
    #[error("unknown time zone {zone:?}")]
    TimeZone {
        /// The zone as written.
        zone: String,
        /// Why jiff refused it.
        #[source]
        source: jiff::Error,
    },
    /// `period.rolling` is not `<n>m`, `<n>h` or `<n>d` with n ≥ 1.
    #[error("rolling period {0:?} is not of the form 30m, 24h or 7d")]
    Rolling(String),
    /// Neither or both of `calendar` and `rolling`.
    #[error("a period needs exactly one of calendar or rolling")]
    PeriodShape,
    /// A Budget without any limit.
    #[error(
        "budget {0:?} has no limit: set tokens, costMicros, tokensPerMinute or requestsPerMinute"
    )]
    NoLimit(String),
    /// `onExhausted.action: BrownOut` without `brownOutModel`.
    #[error("budget {0:?}: onExhausted.brownOutModel is required when the action is BrownOut")]
    BrownOutModel(String),
    /// Date arithmetic left the representable range.
    #[error("time arithmetic out of range")]
    Time(#[source] jiff::Error),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::TimeZone { .. } => "time_zone",
            Error::Rolling(_) => "rolling",
            Error::PeriodShape => "period_shape",
            Error::NoLimit(_) => "no_limit",
            Error::BrownOutModel(_) => "brown_out_model",
            Error::Time(_) => "time",
        }
    }
}
