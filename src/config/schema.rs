//! JSON-schema pieces for the spec types, so the CRD checks what the file loader checks.
//!
//! Plain data and schema transforms: nothing here depends on a Kubernetes crate. The patterns
//! accept a subset of what [`crate::config::units`] parses, in a form CEL's `duration()` also
//! reads (Go durations), so cross-field rules can compare them.

use schemars::Schema;
use serde_json::{Map, Value};

/// Durations the CRD accepts: one or more `<number><unit>` with units `ms`, `s`, `m`, `h`
/// (`250ms`, `1.5s`, `1h30m`). [`crate::config::units::parse_duration`] reads every one of them.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Sizes the CRD accepts as strings: digits with an optional binary or decimal suffix, exactly
/// what [`crate::config::units::parse_size`] reads.
pub const SIZE_PATTERN: &str = r"^[0-9]+(Ki|Mi|Gi|k|K|M|G)?$";

/// Replaces an untagged `number | string` enum's schema (an untyped `anyOf`, which Kubernetes
/// rejects as non-structural) with `x-kubernetes-int-or-string`, keeping its description.
pub fn int_or_string(schema: &mut Schema) {
    let mut replaced = Map::new();
    if let Some(description) = schema.get("description") {
        replaced.insert("description".to_owned(), description.clone());
    }
    replaced.insert("x-kubernetes-int-or-string".to_owned(), Value::Bool(true));
    *schema = Schema::from(replaced);
}

/// [`int_or_string`] for byte sizes: strings must also match [`SIZE_PATTERN`] (a `pattern`
/// constrains strings only, so plain byte counts still pass).
pub fn size_quantity(schema: &mut Schema) {
    int_or_string(schema);
    schema.insert("pattern".to_owned(), Value::from(SIZE_PATTERN));
}

/// Drops the `default` schemars derives from `#[serde(default)]` where that default would break
/// the field's own bounds (`backends: []` against `minItems: 1`): the API server rejects a CRD
/// whose defaults do not validate.
pub fn without_default(schema: &mut Schema) {
    schema.remove("default");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::{parse_duration, parse_size};

    #[test]
    fn every_duration_the_pattern_admits_parses() {
        let admitted = [
            "250ms",
            "30s",
            "5m",
            "1h30m",
            "1.5s",
            "0s",
            "1h2m3s4ms",
            "10.25m",
        ];
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        for text in admitted {
            assert!(pattern.is_match(text), "{text} should match the pattern");
            assert!(
                parse_duration(text).is_ok(),
                "{text} matches but does not parse"
            );
        }
        for text in ["", "30", "1.s", ".5s", "1d", "5 m", "-1s", "1us", "1e3s"] {
            assert!(
                !pattern.is_match(text),
                "{text} should not match the pattern"
            );
        }
    }

    #[test]
    fn every_size_suffix_in_the_pattern_parses() {
        let pattern = regex::Regex::new(SIZE_PATTERN).unwrap();
        for suffix in ["", "Ki", "Mi", "Gi", "k", "K", "M", "G"] {
            let text = format!("64{suffix}");
            assert!(pattern.is_match(&text), "{text} should match the pattern");
            assert!(
                parse_size(&text).is_ok(),
                "{text} matches but does not parse"
            );
        }
        for text in ["", "Ki", "1.5Mi", "-5", "10Xi", "64 Ki"] {
            assert!(
                !pattern.is_match(text),
                "{text} should not match the pattern"
            );
        }
    }
}
