//! Event time: RFC 3339 parsing and formatting, and calendar periods.
//!
//! Time is a plain `i64` of Unix milliseconds everywhere in keywatch. The
//! parser is hand-written because it runs once per record on the hot path and
//! must not allocate; the calendar math is Howard Hinnant's days-from-civil.

/// Milliseconds in a minute.
pub const MINUTE_MS: i64 = 60_000;
/// Milliseconds in an hour.
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
/// Milliseconds in a day.
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

#[inline]
fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let s = b.get(at..at + n)?;
    let mut v = 0u32;
    for &c in s {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + d as u32;
    }
    Some(v)
}

/// Parses an RFC 3339 timestamp (`2026-11-23T10:15:02.481Z`, any fraction
/// length, `Z` or a `±HH:MM` offset; `t`, `z` and a space separator are
/// accepted as RFC 3339 allows) into Unix milliseconds. Fractions finer than
/// a millisecond are truncated. `None` when the text is not such a timestamp.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = digits(b, 0, 4)? as i64;
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    // 60 is a leap second; it is folded into the next second's first instant.
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + (b[i] - b'0') as i64;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_min: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = digits(b, i + 1, 2)? as i64;
            let om = digits(b, i + 4, 2)? as i64;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 60 + om;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour as i64 * 3600 + minute as i64 * 60 + second as i64;
    Some((secs - offset_min * 60) * 1000 + millis)
}

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds
/// (`2026-11-23T10:15:02.481Z`), appending to `out`.
pub fn write_rfc3339(ms: i64, out: &mut String) {
    let days = ms.div_euclid(DAY_MS);
    let rem = ms.rem_euclid(DAY_MS);
    let (y, m, d) = civil_from_days(days);
    let (h, rem) = (rem / HOUR_MS, rem % HOUR_MS);
    let (mi, rem) = (rem / MINUTE_MS, rem % MINUTE_MS);
    let (s, milli) = (rem / 1000, rem % 1000);
    use std::fmt::Write;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z"
    );
}

/// [`write_rfc3339`] into a new string.
pub fn format_rfc3339(ms: i64) -> String {
    let mut s = String::with_capacity(24);
    write_rfc3339(ms, &mut s);
    s
}

/// A budget period's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeriodKind {
    /// A calendar day.
    Day,
    /// A calendar month.
    Month,
}

impl PeriodKind {
    /// The contract's name of the period (`day`, `month`).
    pub fn as_str(self) -> &'static str {
        match self {
            PeriodKind::Day => "day",
            PeriodKind::Month => "month",
        }
    }

    /// Start and end (exclusive), in Unix ms, of the period holding `ms` in a
    /// zone `offset_min` minutes east of UTC.
    pub fn bounds(self, ms: i64, offset_min: i32) -> (i64, i64) {
        let off = offset_min as i64 * MINUTE_MS;
        let local = ms + off;
        let day = local.div_euclid(DAY_MS);
        match self {
            PeriodKind::Day => (day * DAY_MS - off, (day + 1) * DAY_MS - off),
            PeriodKind::Month => {
                let (y, m, _) = civil_from_days(day);
                let start = days_from_civil(y, m, 1);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1);
                (start * DAY_MS - off, end * DAY_MS - off)
            }
        }
    }
}

/// Parses a fixed UTC offset (`Z`, `UTC`, `+02:00`, `-05:30`) into minutes east of UTC.
pub fn parse_utc_offset(s: &str) -> Option<i32> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("utc") {
        return Some(0);
    }
    let b = t.as_bytes();
    if b.len() != 6 || b[3] != b':' {
        return None;
    }
    let h = digits(b, 1, 2)? as i32;
    let m = digits(b, 4, 2)? as i32;
    if h > 14 || m > 59 {
        return None;
    }
    match b[0] {
        b'+' => Some(h * 60 + m),
        b'-' => Some(-(h * 60 + m)),
        _ => None,
    }
}

/// The wall clock, Unix ms (the reference of a record that has no other:
/// [`crate::config::EventTimeConfig`]).
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_contract_example() {
        let ms = parse_rfc3339("2026-11-23T10:15:02.481Z").unwrap();
        assert_eq!(format_rfc3339(ms), "2026-11-23T10:15:02.481Z");
        assert_eq!(ms, 1_795_428_902_481);
    }

    #[test]
    fn offsets_fractions_and_separators() {
        let z = parse_rfc3339("2026-11-23T10:15:02Z").unwrap();
        assert_eq!(parse_rfc3339("2026-11-23T12:15:02+02:00"), Some(z));
        assert_eq!(parse_rfc3339("2026-11-23T05:45:02-04:30"), Some(z));
        assert_eq!(parse_rfc3339("2026-11-23 10:15:02z"), Some(z));
        assert_eq!(parse_rfc3339("2026-11-23T10:15:02.5Z"), Some(z + 500));
        assert_eq!(
            parse_rfc3339("2026-11-23T10:15:02.123456789Z"),
            Some(z + 123)
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-11-23",
            "2026-11-23T10:15:02",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T10:15:02.Z",
            "2026-11-23T10:15:02+0200",
            "2026-11-23T10:15:02Zjunk",
            "2026-1a-23T10:15:02Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_some());
    }

    #[test]
    fn periods() {
        let t = parse_rfc3339("2026-11-23T10:15:02Z").unwrap();
        let (s, e) = PeriodKind::Day.bounds(t, 0);
        assert_eq!(format_rfc3339(s), "2026-11-23T00:00:00.000Z");
        assert_eq!(e - s, DAY_MS);
        let (s, e) = PeriodKind::Month.bounds(t, 0);
        assert_eq!(format_rfc3339(s), "2026-11-01T00:00:00.000Z");
        assert_eq!(format_rfc3339(e), "2026-12-01T00:00:00.000Z");
        let (s, _) = PeriodKind::Day.bounds(t, 120);
        assert_eq!(format_rfc3339(s), "2026-11-22T22:00:00.000Z");
        let dec = parse_rfc3339("2026-12-31T23:00:00Z").unwrap();
        let (_, e) = PeriodKind::Month.bounds(dec, 0);
        assert_eq!(format_rfc3339(e), "2027-01-01T00:00:00.000Z");
        assert_eq!(parse_utc_offset("-05:30"), Some(-330));
        assert_eq!(parse_utc_offset("UTC"), Some(0));
        assert_eq!(parse_utc_offset("+2"), None);
    }

    proptest! {
        #[test]
        fn format_parse_round_trip(ms in -2_000_000_000_000i64..8_000_000_000_000i64) {
            let s = format_rfc3339(ms);
            prop_assert_eq!(parse_rfc3339(&s), Some(ms));
        }

        #[test]
        fn civil_round_trip(days in -1_000_000i64..1_000_000i64) {
            let (y, m, d) = civil_from_days(days);
            prop_assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn periods_contain_their_instant(ms in 0i64..5_000_000_000_000i64, off in -840i32..=840) {
            for kind in [PeriodKind::Day, PeriodKind::Month] {
                let (s, e) = kind.bounds(ms, off);
                prop_assert!(s <= ms && ms < e);
                prop_assert_eq!(kind.bounds(s, off), (s, e));
            }
        }
    }
}
