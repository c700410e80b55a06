//! Allocation-free text formatting for the simulator's JSON lines: decimal
//! and hex integers, IPv4 addresses, exact decimal costs and RFC 3339
//! timestamps (days-from-civil, no date library).

/// Where formatted ASCII goes: the simulator's reused line buffer, or a
/// `String` for the odd report line.
pub(crate) trait Sink {
    /// Appends bytes that are ASCII by construction.
    fn put_ascii(&mut self, bytes: &[u8]);
    /// Appends text.
    fn put_str(&mut self, s: &str);
}

impl Sink for Vec<u8> {
    fn put_ascii(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn put_str(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }
}

impl Sink for String {
    fn put_ascii(&mut self, bytes: &[u8]) {
        self.extend(bytes.iter().map(|&b| char::from(b)));
    }

    fn put_str(&mut self, s: &str) {
        self.push_str(s);
    }
}

const MS_PER_DAY: i64 = 86_400_000;

/// Appends the decimal digits of `v`.
pub(crate) fn push_u64(out: &mut impl Sink, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_ascii(&buf[i..]);
}

/// Appends `v` as exactly `width` decimal digits, zero-padded (truncating
/// higher digits, which callers never have).
pub(crate) fn push_padded(out: &mut impl Sink, mut v: u64, width: usize) {
    let mut buf = [b'0'; 20];
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.put_ascii(&buf[..width]);
}

/// Appends the low `4 * digits` bits of `v` as lowercase hex.
pub(crate) fn push_hex(out: &mut impl Sink, v: u64, digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    for (i, slot) in buf[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = HEX[((v >> shift) & 0xF) as usize];
    }
    out.put_ascii(&buf[..digits]);
}

/// Appends a dotted-quad IPv4 address.
pub(crate) fn push_ipv4(out: &mut impl Sink, ip: u32) {
    for (i, octet) in ip.to_be_bytes().into_iter().enumerate() {
        if i > 0 {
            out.put_ascii(b".");
        }
        push_u64(out, u64::from(octet));
    }
}

/// Appends a cost given in units of 1e-8 USD as an exact JSON decimal
/// ("0.0", "0.00325", "12.5"): integer arithmetic, no float formatting.
pub(crate) fn push_cost_e8(out: &mut impl Sink, cost_e8: u64) {
    push_u64(out, cost_e8 / 100_000_000);
    out.put_ascii(b".");
    let mut frac = cost_e8 % 100_000_000;
    if frac == 0 {
        out.put_ascii(b"0");
        return;
    }
    let mut width = 8;
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    while frac % 10 == 0 {
        frac /= 10;
        width -= 1;
    }
    push_padded(out, frac, width);
}

/// Appends `ms` (unix milliseconds) as RFC 3339 UTC with milliseconds,
/// e.g. `2026-11-23T10:15:02.481Z`. Years outside 0000-9999 cannot be
/// written in RFC 3339; they are clamped to that range's ends.
pub(crate) fn push_rfc3339(out: &mut impl Sink, ms: i64) {
    let ms = ms.clamp(MIN_RFC3339_MS, MAX_RFC3339_MS);
    let days = ms.div_euclid(MS_PER_DAY);
    let in_day = ms.rem_euclid(MS_PER_DAY) as u64;
    let (y, m, d) = civil_from_days(days);
    let mut buf = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut buf[0..4], y as u64);
    put_digits(&mut buf[5..7], u64::from(m));
    put_digits(&mut buf[8..10], u64::from(d));
    put_digits(&mut buf[11..13], in_day / 3_600_000);
    put_digits(&mut buf[14..16], in_day / 60_000 % 60);
    put_digits(&mut buf[17..19], in_day / 1000 % 60);
    put_digits(&mut buf[20..23], in_day % 1000);
    out.put_ascii(&buf);
}

/// 0000-01-01T00:00:00.000Z in unix ms.
pub(crate) const MIN_RFC3339_MS: i64 = -62_167_219_200_000;
/// 9999-12-31T23:59:59.999Z in unix ms.
pub(crate) const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

fn put_digits(slot: &mut [u8], mut v: u64) {
    for b in slot.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of
/// [`civil_from_days`]).
#[cfg(test)]
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses exactly the `YYYY-MM-DDTHH:MM:SS.mmmZ` form [`push_rfc3339`]
/// writes back to unix ms; `None` for anything else.
#[cfg(test)]
pub(crate) fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo as u32).into() {
        return None;
    }
    if h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    Some(days * MS_PER_DAY + ((h * 60 + mi) * 60 + sec) * 1000 + ms)
}

#[cfg(test)]
fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(f: impl FnOnce(&mut String)) -> String {
        let mut out = String::new();
        f(&mut out);
        out
    }

    /// Reference: walk whole years, then whole months, from 1970 (or back
    /// from it). Slow and obviously right.
    fn naive_civil(mut days: i64) -> (i64, u32, u32) {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let mut y = 1970;
        loop {
            let len = if leap(y) { 366 } else { 365 };
            if days < 0 {
                y -= 1;
                days += if leap(y) { 366 } else { 365 };
            } else if days >= len {
                days -= len;
                y += 1;
            } else {
                break;
            }
        }
        let mut m = 1;
        loop {
            let len = i64::from(days_in_month(y, m));
            if days < len {
                return (y, m, days as u32 + 1);
            }
            days -= len;
            m += 1;
        }
    }

    #[test]
    fn known_instants() {
        assert_eq!(s(|o| push_rfc3339(o, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            s(|o| push_rfc3339(o, 1_795_392_000_000)),
            "2026-11-23T00:00:00.000Z"
        );
        assert_eq!(
            s(|o| push_rfc3339(o, 1_795_392_000_000 + 36_902_481)),
            "2026-11-23T10:15:02.481Z"
        );
        assert_eq!(
            s(|o| push_rfc3339(o, 951_782_400_000)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(s(|o| push_rfc3339(o, -1)), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            s(|o| push_rfc3339(o, MAX_RFC3339_MS)),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            s(|o| push_rfc3339(o, MIN_RFC3339_MS)),
            "0000-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(s(|o| push_u64(o, 0)), "0");
        assert_eq!(s(|o| push_u64(o, u64::MAX)), "18446744073709551615");
        assert_eq!(s(|o| push_hex(o, 0xABCD_EF01, 8)), "abcdef01");
        assert_eq!(s(|o| push_hex(o, 0x1, 16)), "0000000000000001");
        assert_eq!(s(|o| push_ipv4(o, 0xCB00_7107)), "203.0.113.7");
        assert_eq!(s(|o| push_cost_e8(o, 0)), "0.0");
        assert_eq!(s(|o| push_cost_e8(o, 325_000)), "0.00325");
        assert_eq!(s(|o| push_cost_e8(o, 1_250_000_000)), "12.5");
        assert_eq!(s(|o| push_cost_e8(o, 1)), "0.00000001");
        assert_eq!(s(|o| push_padded(o, 42, 6)), "000042");
    }

    proptest! {
        #[test]
        fn rfc3339_matches_reference(ms in MIN_RFC3339_MS..=MAX_RFC3339_MS) {
            let text = s(|o| push_rfc3339(o, ms));
            // Round trip through the inverse (days_from_civil).
            prop_assert_eq!(parse_rfc3339_ms(&text), Some(ms));
            // Date part against the naive calendar walk.
            let days = ms.div_euclid(MS_PER_DAY);
            let (y, m, d) = naive_civil(days);
            prop_assert_eq!(&text[..10], format!("{y:04}-{m:02}-{d:02}"));
            prop_assert_eq!(civil_from_days(days), (y, m, d));
            // Time part against plain arithmetic.
            let t = ms.rem_euclid(MS_PER_DAY);
            let want = format!(
                "T{:02}:{:02}:{:02}.{:03}Z",
                t / 3_600_000, t / 60_000 % 60, t / 1000 % 60, t % 1000
            );
            prop_assert_eq!(&text[10..], want);
        }

        #[test]
        fn cost_is_exact(cost in 0u64..10_000_000_000_000) {
            let text = s(|o| push_cost_e8(o, cost));
            let (int, frac) = text.split_once('.').unwrap();
            let frac_e8: u64 = format!("{frac:0<8}").parse().unwrap();
            prop_assert_eq!(int.parse::<u64>().unwrap() * 100_000_000 + frac_e8, cost);
        }
    }
}
