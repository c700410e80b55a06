//! Number text shared by alert reasons, notification messages and
//! summaries, so a figure reads the same everywhere.

/// Digits grouped by thousands: `-1234567` as `-1,234,567`.
pub fn group_digits(n: i128) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::group_digits;

    #[test]
    fn groups_by_thousands() {
        for (n, want) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (-12345, "-12,345"),
            (1234567, "1,234,567"),
            (i128::from(u64::MAX), "18,446,744,073,709,551,615"),
        ] {
            assert_eq!(group_digits(n), want);
        }
    }
}
