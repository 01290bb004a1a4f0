//! Time as the protocol shows it: RFC 3339 UTC with milliseconds.

use std::fmt;

/// An instant, in milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The instant `millis` milliseconds after the Unix epoch.
    pub const fn from_unix_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn unix_millis(self) -> u64 {
        self.0
    }

    /// Whole seconds since the Unix epoch.
    pub const fn unix_seconds(self) -> u64 {
        self.0 / 1000
    }

    /// Milliseconds elapsed from `earlier` to `self`; zero when `earlier` is later.
    pub const fn millis_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl Timestamp {
    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (UTC only), as the service writes it.
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() < 20 || !matches!(bytes[bytes.len() - 1], b'Z' | b'z') {
            return None;
        }
        let num = |range: std::ops::Range<usize>| -> Option<u64> {
            let part = text.get(range)?;
            part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
        };
        if bytes[4] != b'-'
            || bytes[7] != b'-'
            || !matches!(bytes[10], b'T' | b't')
            || bytes[13] != b':'
            || bytes[16] != b':'
        {
            return None;
        }
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month)
            || !(1..=31).contains(&day)
            || hour > 23
            || minute > 59
            || second > 60
            || year < 1970
        {
            return None;
        }
        let rest = &text[19..text.len() - 1];
        let millis = match rest.strip_prefix('.') {
            None if rest.is_empty() => 0,
            Some(fraction) if !fraction.is_empty() && fraction.bytes().all(|b| b.is_ascii_digit()) => {
                let digits: String = fraction.chars().chain("000".chars()).take(3).collect();
                digits.parse().ok()?
            }
            _ => return None,
        };
        let days = days_from_civil(year as i64, month as u32, day as u32);
        let secs = u64::try_from(days).ok()? * 86_400 + hour * 3600 + minute * 60 + second;
        Some(Self(secs * 1000 + millis))
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl fmt::Display for Timestamp {
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0 % 1000;
        let secs = self.0 / 1000;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_rfc3339_utc_with_milliseconds() {
        assert_eq!(Timestamp::from_unix_millis(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp::from_unix_millis(1_735_689_600_123).to_string(), "2025-01-01T00:00:00.123Z");
        // A leap day.
        assert_eq!(Timestamp::from_unix_millis(1_709_210_096_007).to_string(), "2024-02-29T12:34:56.007Z");
        assert_eq!(Timestamp::from_unix_millis(951_868_799_999).to_string(), "2000-02-29T23:59:59.999Z");
    }

    #[test]
    fn rfc3339_round_trips_and_garbage_is_refused() {
        for millis in [0, 1_735_689_600_123, 1_709_210_096_007, 951_868_799_999, 4_102_444_800_000] {
            let t = Timestamp::from_unix_millis(millis);
            assert_eq!(Timestamp::parse_rfc3339(&t.to_string()), Some(t));
        }
        assert_eq!(
            Timestamp::parse_rfc3339("2025-01-01T00:00:00Z"),
            Some(Timestamp::from_unix_millis(1_735_689_600_000))
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2025-01-01T00:00:00.5Z"),
            Some(Timestamp::from_unix_millis(1_735_689_600_500))
        );
        for bad in [
            "",
            "2025-01-01",
            "2025-01-01T00:00:00",
            "2025-13-01T00:00:00Z",
            "2025-01-01T00:00:00+01:00",
            "20x5-01-01T00:00:00Z",
            "2025-01-01T00:00:00.Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_unix_millis(10);
        assert_eq!(t.millis_since(Timestamp::from_unix_millis(20)), 0);
        assert_eq!(Timestamp::from_unix_millis(20).millis_since(t), 10);
    }
}
