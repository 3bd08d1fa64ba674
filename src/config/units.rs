//! Human-friendly durations (`250ms`, `30s`, `1m30s`) and byte sizes (`64Ki`, `10Mi`, `1500`).

use std::time::Duration;

/// Parses a duration written as one or more `<number><unit>` pairs, units `ms`, `s`, `m`, `h`.
///
/// Fractions are accepted (`1.5s`); a bare number without a unit is rejected so that `30`
/// never silently means seconds to one reader and milliseconds to another.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("invalid duration \"\": expected e.g. 250ms, 30s, 5m".to_owned());
    }
    let invalid = || format!("invalid duration {trimmed:?}: expected e.g. 250ms, 30s, 5m, 1h30m");
    let mut rest = trimmed;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        if number_len == 0 {
            return Err(invalid());
        }
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        let part = Duration::try_from_secs_f64(number * unit_seconds).map_err(|_| invalid())?;
        total = total.checked_add(part).ok_or_else(invalid)?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it (used in messages and `/config`).
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 && !duration.is_zero() {
        return format!("{}us", duration.as_micros());
    }
    if millis % 1000 != 0 {
        format!("{millis}ms")
    } else if millis % 60_000 != 0 || millis == 0 {
        format!("{}s", millis / 1000)
    } else {
        format!("{}m", millis / 60_000)
    }
}

/// Parses a byte size: plain bytes (`1500`), binary suffixes (`Ki`, `Mi`, `Gi`) or decimal ones
/// (`k`, `M`, `G`), as Kubernetes quantities are written.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let invalid = || format!("invalid size {trimmed:?}: expected e.g. 1500, 64Ki, 10Mi");
    let digits_len = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits_len == 0 {
        return Err(invalid());
    }
    let number: u64 = trimmed[..digits_len].parse().map_err(|_| invalid())?;
    let multiplier: u64 = match &trimmed[digits_len..] {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(invalid()),
    };
    number.checked_mul(multiplier).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_name_the_input() {
        for bad in ["banana", "", "30", "s", "5 m", "-1s", "1d", "1e3s"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("invalid duration"), "{bad}: {err}");
        }
        assert_eq!(
            parse_duration("banana").unwrap_err(),
            "invalid duration \"banana\": expected e.g. 250ms, 30s, 5m, 1h30m"
        );
    }

    #[test]
    fn durations_round_trip_through_format() {
        for text in ["250ms", "30s", "5m", "0s", "90s"] {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&format_duration(parsed)), Ok(parsed));
        }
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    }

    #[test]
    fn sizes_parse_binary_and_decimal_suffixes() {
        assert_eq!(parse_size("1500"), Ok(1500));
        assert_eq!(parse_size("64Ki"), Ok(65_536));
        assert_eq!(parse_size("10Mi"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("2k"), Ok(2000));
        for bad in ["", "Ki", "10Xi", "-5", "1.5Mi", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad} should be rejected");
        }
    }
}
