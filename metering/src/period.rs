//! Budget periods: calendar hours, days and months in an IANA time zone, or rolling windows.
//!
//! Calendar periods reset at the start of the local hour, day or month, computed with jiff and
//! its bundled tz database, so a Budget in `Europe/Berlin` resets at local midnight across
//! daylight-saving changes (a 23- or 25-hour day). Hour periods are taken from the local clock's
//! minutes and seconds, so zones with 30- and 45-minute offsets reset on their local hour.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The period as the Budget CRD writes it (`spec.period`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeriodSpec {
    /// `hour`, `day` or `month`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar: Option<CalendarUnit>,
    /// IANA zone for calendar periods; UTC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// A sliding window: `30m`, `24h`, `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling: Option<String>,
}

/// Calendar units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CalendarUnit {
    /// Each local hour.
    Hour,
    /// Each local day.
    Day,
    /// Each local month.
    Month,
}

/// A parsed period.
#[derive(Clone, Debug, PartialEq)]
pub enum Period {
    /// Resets at each local hour, day or month start in `zone`.
    Calendar {
        /// Unit.
        unit: CalendarUnit,
        /// Zone.
        zone: TimeZone,
    },
    /// Counts what was spent in the last `length`.
    Rolling {
        /// Window length.
        length: SignedDuration,
    },
}

/// The span of time whose spend counts now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Inclusive start.
    pub start: Timestamp,
    /// For calendar periods the exclusive end, which is when the caps reset. For rolling
    /// windows, `now`: spend leaves the window one `length` after it happened.
    pub end: Timestamp,
}

impl TryFrom<&PeriodSpec> for Period {
    type Error = Error;

    fn try_from(spec: &PeriodSpec) -> Result<Self, Error> {
        match (spec.calendar, &spec.rolling) {
            (Some(unit), None) => {
                let zone = match &spec.time_zone {
                    None => TimeZone::UTC,
                    Some(name) => TimeZone::get(name).map_err(|source| Error::TimeZone {
                        zone: name.clone(),
                        source,
                    })?,
                };
                Ok(Period::Calendar { unit, zone })
            }
            (None, Some(rolling)) if spec.time_zone.is_none() => Ok(Period::Rolling {
                length: parse_rolling(rolling)?,
            }),
            _ => Err(Error::PeriodShape),
        }
    }
}

/// `30m`, `24h`, `7d` → a duration.
pub fn parse_rolling(s: &str) -> Result<SignedDuration, Error> {
    let bad = || Error::Rolling(s.to_owned());
    let (digits, unit) = s.split_at(s.len().checked_sub(1).ok_or_else(bad)?);
    if digits.starts_with('0') || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let secs_per = match unit {
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    // Cap at ten years: longer windows are a typo, and this keeps the arithmetic in range.
    let secs = n.checked_mul(secs_per).filter(|s| *s <= 10 * 366 * 86_400);
    secs.map(SignedDuration::from_secs).ok_or_else(bad)
}

impl Period {
    /// The window that contains `now`.
    pub fn window(&self, now: Timestamp) -> Result<Window, Error> {
        match self {
            Period::Rolling { length } => Ok(Window {
                start: now.checked_sub(*length).map_err(Error::Time)?,
                end: now,
            }),
            Period::Calendar { unit, zone } => {
                let z = now.to_zoned(zone.clone());
                let (start, end) = match unit {
                    CalendarUnit::Hour => {
                        let into = SignedDuration::new(
                            i64::from(z.minute()) * 60 + i64::from(z.second()),
                            z.subsec_nanosecond(),
                        );
                        let start = now.checked_sub(into).map_err(Error::Time)?;
                        let end = start
                            .checked_add(SignedDuration::from_hours(1))
                            .map_err(Error::Time)?;
                        (start, end)
                    }
                    CalendarUnit::Day => (
                        day_start(&z)?,
                        day_start(&z.tomorrow().map_err(Error::Time)?)?,
                    ),
                    CalendarUnit::Month => {
                        let first = z.first_of_month().map_err(Error::Time)?;
                        let next = z
                            .last_of_month()
                            .map_err(Error::Time)?
                            .tomorrow()
                            .map_err(Error::Time)?;
                        (day_start(&first)?, day_start(&next)?)
                    }
                };
                Ok(Window { start, end })
            }
        }
    }

    /// Window length for rolling periods.
    pub fn rolling_length(&self) -> Option<SignedDuration> {
        match self {
            Period::Rolling { length } => Some(*length),
            Period::Calendar { .. } => None,
        }
    }
}

fn day_start(z: &Zoned) -> Result<Timestamp, Error> {
    Ok(z.start_of_day().map_err(Error::Time)?.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn cal(unit: CalendarUnit, zone: Option<&str>) -> Period {
        Period::try_from(&PeriodSpec {
            calendar: Some(unit),
            time_zone: zone.map(str::to_owned),
            rolling: None,
        })
        .unwrap()
    }

    #[test]
    fn calendar_windows() {
        use CalendarUnit::*;
        // (unit, zone, now, start, end)
        let cases = [
            (
                Hour,
                None,
                "2026-03-10T12:34:56.5Z",
                "2026-03-10T12:00:00Z",
                "2026-03-10T13:00:00Z",
            ),
            (
                Day,
                None,
                "2026-03-10T23:59:59Z",
                "2026-03-10T00:00:00Z",
                "2026-03-11T00:00:00Z",
            ),
            (
                Month,
                None,
                "2026-02-15T08:00:00Z",
                "2026-02-01T00:00:00Z",
                "2026-03-01T00:00:00Z",
            ),
            (
                Month,
                None,
                "2024-12-31T23:00:00Z",
                "2024-12-01T00:00:00Z",
                "2025-01-01T00:00:00Z",
            ),
            // Berlin: local midnight is 23:00Z in winter
            (
                Day,
                Some("Europe/Berlin"),
                "2026-01-10T22:30:00Z",
                "2026-01-09T23:00:00Z",
                "2026-01-10T23:00:00Z",
            ),
            (
                Day,
                Some("Europe/Berlin"),
                "2026-01-10T23:30:00Z",
                "2026-01-10T23:00:00Z",
                "2026-01-11T23:00:00Z",
            ),
            // spring forward: 2026-03-29 in Berlin has 23 hours
            (
                Day,
                Some("Europe/Berlin"),
                "2026-03-29T12:00:00Z",
                "2026-03-28T23:00:00Z",
                "2026-03-29T22:00:00Z",
            ),
            // fall back: 2026-10-25 in Berlin has 25 hours
            (
                Day,
                Some("Europe/Berlin"),
                "2026-10-25T12:00:00Z",
                "2026-10-24T22:00:00Z",
                "2026-10-25T23:00:00Z",
            ),
            // the repeated 02:xx hour on fall-back day: each occurrence is its own hour
            (
                Hour,
                Some("Europe/Berlin"),
                "2026-10-25T00:30:00Z",
                "2026-10-25T00:00:00Z",
                "2026-10-25T01:00:00Z",
            ),
            (
                Hour,
                Some("Europe/Berlin"),
                "2026-10-25T01:30:00Z",
                "2026-10-25T01:00:00Z",
                "2026-10-25T02:00:00Z",
            ),
            // a 45-minute offset zone resets on its local hour
            (
                Hour,
                Some("Asia/Kathmandu"),
                "2026-06-01T00:20:00Z",
                "2026-06-01T00:15:00Z",
                "2026-06-01T01:15:00Z",
            ),
            // month in New York: local midnight of the 1st
            (
                Month,
                Some("America/New_York"),
                "2026-04-01T03:00:00Z",
                "2026-03-01T05:00:00Z",
                "2026-04-01T04:00:00Z",
            ),
        ];
        for (unit, zone, now, start, end) in cases {
            let w = cal(unit, zone).window(ts(now)).unwrap();
            assert_eq!(
                (w.start, w.end),
                (ts(start), ts(end)),
                "{unit:?} {zone:?} {now}"
            );
        }
    }

    #[test]
    fn rolling_windows() {
        let p = Period::try_from(&PeriodSpec {
            rolling: Some("30m".into()),
            ..PeriodSpec::default()
        })
        .unwrap();
        let w = p.window(ts("2026-03-10T12:00:00Z")).unwrap();
        assert_eq!(w.start, ts("2026-03-10T11:30:00Z"));
        assert_eq!(w.end, ts("2026-03-10T12:00:00Z"));
    }

    #[test]
    fn rolling_parse_table() {
        let ok = [("1m", 60), ("30m", 1800), ("24h", 86_400), ("7d", 604_800)];
        for (s, secs) in ok {
            assert_eq!(parse_rolling(s).unwrap().as_secs(), secs, "{s}");
        }
        for bad in [
            "",
            "m",
            "0m",
            "05m",
            "1w",
            "-1h",
            "1.5h",
            "99999999999999d",
            "h1",
        ] {
            assert!(parse_rolling(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let bad = [
            PeriodSpec::default(),
            PeriodSpec {
                calendar: Some(CalendarUnit::Day),
                rolling: Some("1h".into()),
                ..PeriodSpec::default()
            },
            PeriodSpec {
                rolling: Some("1h".into()),
                time_zone: Some("UTC".into()),
                ..PeriodSpec::default()
            },
            PeriodSpec {
                calendar: Some(CalendarUnit::Day),
                time_zone: Some("Mars/Olympus".into()),
                ..PeriodSpec::default()
            },
        ];
        for spec in bad {
            assert!(Period::try_from(&spec).is_err(), "{spec:?}");
        }
    }
}
