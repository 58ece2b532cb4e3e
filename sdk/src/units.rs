//! Human-friendly sizes (`64MiB`, `1GiB`, `512B`) and durations (`500ms`, `30s`, `5m`).
//!
//! One rule for both: a number needs its unit, except where it cannot be mistaken. `0` needs
//! none, and neither does a size of at least 1 MiB (a count of bytes, `67108864`); a bare
//! `64` (64 bytes, or 64 MiB?) or `2` (seconds, or minutes?) is refused with a hint.

use std::time::Duration;

/// A size or duration that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("invalid size `{0}`: expected a number with a unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. `64MiB`")]
    Size(String),
    #[error(
        "invalid duration `{0}`: expected a number with a unit (ms, s, m, h), e.g. `500ms`, `30s`, `5m`"
    )]
    Duration(String),
    /// A bare number below 1 MiB: almost surely not meant as bytes.
    #[error("invalid size `{0}`: a number without a unit is bytes and must then be 0 or at least 1MiB; did you mean `{0}MiB` (or `{0}B`)?")]
    SizeWithoutUnit(String),
    /// A bare number other than 0.
    #[error("invalid duration `{0}`: a number needs a unit (ms, s, m, h); did you mean `{0}s`?")]
    DurationWithoutUnit(String),
}

fn split_number(s: &str) -> (&str, &str) {
    let idx = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    (&s[..idx], s[idx..].trim())
}

/// Parses a size in bytes. Fractions are allowed with a unit (`1.5GiB`).
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let s = input.trim();
    let err = || UnitError::Size(input.to_string());
    let (num, unit) = split_number(s);
    if num.is_empty() {
        return Err(err());
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return Err(err()),
    };
    if unit.is_empty() {
        return match num.parse::<u64>() {
            Ok(n) if n == 0 || n >= 1 << 20 => Ok(n),
            Ok(_) => Err(UnitError::SizeWithoutUnit(s.to_string())),
            Err(_) => Err(err()),
        };
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(err);
    }
    let f: f64 = num.parse().map_err(|_| err())?;
    let v = f * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(err());
    }
    Ok(v.round() as u64)
}

/// Formats bytes with a binary unit, exact where possible (`8GiB`, `1536MiB`, `1000`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (m, u) in UNITS {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{}", bytes / m, u);
        }
    }
    for (m, u) in UNITS {
        if bytes >= m {
            return format!("{:.1}{}", bytes as f64 / m as f64, u);
        }
    }
    format!("{bytes}B")
}

/// Parses a duration: `500ms`, `30s`, `5m`, `2h`, `1.5s`; a bare number only as `0`.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let s = input.trim();
    let err = || UnitError::Duration(input.to_string());
    let (num, unit) = split_number(s);
    if num.is_empty() {
        return Err(err());
    }
    let f: f64 = num.parse().map_err(|_| err())?;
    if unit.is_empty() && f != 0.0 {
        return Err(UnitError::DurationWithoutUnit(s.to_string()));
    }
    let secs = match unit {
        "ns" => f / 1e9,
        "us" | "µs" => f / 1e6,
        "ms" => f / 1e3,
        "" | "s" => f,
        "m" | "min" => f * 60.0,
        "h" => f * 3600.0,
        "d" => f * 86400.0,
        _ => return Err(err()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err())
}

/// Unix milliseconds as `2026-12-05T08:30:00.123Z` (proleptic Gregorian, UTC).
pub fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_ms_format_as_utc() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(format_unix_ms(1_796_459_405_007), "2026-12-05T08:30:05.007Z");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("67108864"), Ok(64 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("64"), Err(UnitError::SizeWithoutUnit("64".into())));
        assert!(parse_size("64").unwrap_err().to_string().contains("`64MiB`"));
        assert_eq!(parse_size("2gb"), Ok(2_000_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
        assert_eq!(format_size(8 << 30), "8GiB");
        assert_eq!(format_size(1536 << 20), "1536MiB");
        assert_eq!(format_size(100), "100B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2"), Err(UnitError::DurationWithoutUnit("2".into())));
        assert!(parse_duration("2").unwrap_err().to_string().contains("`2s`"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
