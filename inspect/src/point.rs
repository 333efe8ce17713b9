//! [`Point`]: a place in the log, as the commands' `--at`, `--since`,
//! `--from` … take it: a stream sequence, an RFC 3339 time, a duration
//! back from now, or `now`.

use std::str::FromStr;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::InspectError;

/// A point in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A stream sequence.
    Seq(u64),
    /// A time, in unix milliseconds.
    Time(i64),
}

/// Now, in unix milliseconds.
pub fn now_ms() -> i64 {
    to_ms(OffsetDateTime::now_utc())
}

/// `t` in unix milliseconds.
pub fn to_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Formats unix milliseconds as RFC 3339.
pub fn format_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

impl FromStr for Point {
    type Err = InspectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "now" {
            return Ok(Point::Time(now_ms()));
        }
        if let Ok(seq) = s.parse::<u64>() {
            return Ok(Point::Seq(seq));
        }
        if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
            return Ok(Point::Time(to_ms(t)));
        }
        // A bare number is a sequence, so a duration here has a unit.
        match humantime::parse_duration(s) {
            Ok(back) if s.ends_with(|c: char| c.is_ascii_alphabetic()) => Ok(Point::Time(
                now_ms().saturating_sub(back.as_millis() as i64),
            )),
            _ => Err(InspectError::BadPoint(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_read_as_sequences_times_and_durations_back() {
        assert_eq!("1234".parse::<Point>().unwrap(), Point::Seq(1234));
        assert_eq!(
            "2026-11-27T10:00:00Z".parse::<Point>().unwrap(),
            Point::Time(1_795_773_600_000)
        );
        let Point::Time(back) = "2h".parse::<Point>().unwrap() else {
            panic!("a duration is a time");
        };
        assert!((now_ms() - back - 7_200_000).abs() < 60_000);
        assert!("yesterday".parse::<Point>().is_err());
        assert_eq!(format_ms(1_795_773_600_000), "2026-11-27T10:00:00Z");
    }
}
