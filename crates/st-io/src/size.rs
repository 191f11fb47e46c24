//! Byte sizes as users write them: `5GB` (decimal, as the Hub and transformers count shard
//! sizes), `24GiB` (binary, as GPU memory is counted), `1.5GB`, or a plain number of bytes.

use crate::error::{Error, Result};

const UNITS: &[(&str, u64)] = &[
    ("TIB", 1 << 40),
    ("GIB", 1 << 30),
    ("MIB", 1 << 20),
    ("KIB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

/// Parses a size. Units are case-insensitive; decimal (KB, MB, GB, TB) and binary
/// (KiB, MiB, GiB, TiB) units are both accepted, fractions too (`1.5GB`).
pub fn parse_size(input: &str) -> Result<u64> {
    let bad = |message: &str| Error::BadSize {
        input: input.to_string(),
        message: message.to_string(),
    };
    let s = input.trim();
    let upper = s.to_ascii_uppercase();
    let (number, multiplier) = UNITS
        .iter()
        .find_map(|(unit, m)| upper.strip_suffix(unit).map(|n| (n.trim(), *m)))
        .unwrap_or((upper.as_str(), 1));
    if number.is_empty() {
        return Err(bad(
            "expected a number, e.g. 5GB, 500MB, 24GiB or 1073741824",
        ));
    }
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(multiplier).ok_or_else(|| bad("too large"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| bad("expected a number followed by KB, MB, GB, TB, KiB, MiB, GiB or TiB"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(bad("must be a non-negative number"));
    }
    let bytes = value * multiplier as f64;
    if bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with a decimal unit and two decimals (`16.06 GB`), as the Hub shows sizes.
pub fn format_decimal(bytes: u64) -> String {
    format_with(bytes, 1000.0, &["B", "KB", "MB", "GB", "TB", "PB"])
}

/// Formats bytes with a binary unit (`23.65 GiB`), as GPU memory is usually quoted.
pub fn format_binary(bytes: u64) -> String {
    format_with(bytes, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB", "PiB"])
}

fn format_with(bytes: u64, base: f64, units: &[&str]) -> String {
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= base && unit + 1 < units.len() {
        value /= base;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_and_binary_units() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("50gb").unwrap(), 50_000_000_000);
        assert_eq!(parse_size("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("100KB").unwrap(), 100_000);
        assert_eq!(parse_size(" 7 MiB ").unwrap(), 7 << 20);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert_eq!(parse_size("12B").unwrap(), 12);
    }

    #[test]
    fn rejects_nonsense_naming_the_input() {
        for bad in [
            "",
            "GB",
            "five GB",
            "-1GB",
            "1e400GB",
            "99999999999TB",
            "5 parsecs",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid size \"{bad}\"")), "{e}");
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_decimal(16_060_522_496), "16.06 GB");
        assert_eq!(format_binary(24 << 30), "24.00 GiB");
        assert_eq!(format_decimal(999), "999 B");
    }
}
