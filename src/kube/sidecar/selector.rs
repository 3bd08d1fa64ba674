//! `spec.podSelector` matching against the sidecar's own pod labels.

use std::collections::BTreeMap;

use crate::config::FieldError;
use crate::config::spec::LabelSelectorSpec;

/// Whether `selector` selects a pod labelled `labels`.
///
/// No selector, or an empty one, selects every pod (in the policy's namespace). All
/// `matchLabels` and all `matchExpressions` must hold. `Err` names the first malformed
/// requirement (unknown operator, `In`/`NotIn` without values, `Exists`/`DoesNotExist` with
/// values), which selects nothing: the API server rejects such selectors too.
pub fn selects(
    selector: Option<&LabelSelectorSpec>,
    labels: &BTreeMap<String, String>,
) -> Result<bool, FieldError> {
    let Some(selector) = selector else {
        return Ok(true);
    };
    let mut selected = selector
        .match_labels
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value));
    for (index, requirement) in selector.match_expressions.iter().enumerate() {
        let path = format!("spec.podSelector.matchExpressions[{index}]");
        let value = labels.get(&requirement.key);
        let holds = match requirement.operator.as_str() {
            "In" | "NotIn" if requirement.values.is_empty() => {
                return Err(FieldError::new(
                    format!("{path}.values"),
                    format!("must not be empty for {}", requirement.operator),
                ));
            }
            "Exists" | "DoesNotExist" if !requirement.values.is_empty() => {
                return Err(FieldError::new(
                    format!("{path}.values"),
                    format!("must be empty for {}", requirement.operator),
                ));
            }
            "In" => value.is_some_and(|v| requirement.values.contains(v)),
            // A missing label is "not in" any set, as in Kubernetes.
            "NotIn" => value.is_none_or(|v| !requirement.values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => {
                return Err(FieldError::new(
                    format!("{path}.operator"),
                    format!("unknown operator {other:?} (In, NotIn, Exists or DoesNotExist)"),
                ));
            }
        };
        selected &= holds;
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::spec::LabelSelectorRequirementSpec;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirementSpec {
        LabelSelectorRequirementSpec {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    fn selector(
        match_labels: &[(&str, &str)],
        exprs: Vec<LabelSelectorRequirementSpec>,
    ) -> LabelSelectorSpec {
        LabelSelectorSpec {
            match_labels: labels(match_labels),
            match_expressions: exprs,
        }
    }

    #[test]
    fn no_or_empty_selector_selects_every_pod() {
        let pod = labels(&[("app", "shop")]);
        assert_eq!(selects(None, &pod), Ok(true));
        assert_eq!(selects(Some(&selector(&[], vec![])), &pod), Ok(true));
        assert_eq!(
            selects(Some(&selector(&[], vec![])), &BTreeMap::new()),
            Ok(true)
        );
    }

    #[test]
    fn match_labels_must_all_hold() {
        let pod = labels(&[("app", "shop"), ("tier", "web")]);
        let both = selector(&[("app", "shop"), ("tier", "web")], vec![]);
        let wrong = selector(&[("app", "shop"), ("tier", "db")], vec![]);
        let missing = selector(&[("zone", "a")], vec![]);
        assert_eq!(selects(Some(&both), &pod), Ok(true));
        assert_eq!(selects(Some(&wrong), &pod), Ok(false));
        assert_eq!(selects(Some(&missing), &pod), Ok(false));
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let pod = labels(&[("app", "shop"), ("tier", "web")]);
        let cases = [
            (expr("app", "In", &["shop", "cart"]), true),
            (expr("app", "In", &["cart"]), false),
            (expr("missing", "In", &["x"]), false),
            (expr("app", "NotIn", &["cart"]), true),
            (expr("app", "NotIn", &["shop"]), false),
            (expr("missing", "NotIn", &["x"]), true),
            (expr("tier", "Exists", &[]), true),
            (expr("missing", "Exists", &[]), false),
            (expr("missing", "DoesNotExist", &[]), true),
            (expr("tier", "DoesNotExist", &[]), false),
        ];
        for (requirement, expected) in cases {
            let described = format!("{requirement:?}");
            let sel = selector(&[("app", "shop")], vec![requirement]);
            assert_eq!(
                selects(Some(&sel), &pod),
                Ok(expected),
                "{described} should give {expected}"
            );
        }
    }

    #[test]
    fn malformed_requirements_name_their_field() {
        let pod = labels(&[("app", "shop")]);
        let bad_op = selector(&[], vec![expr("app", "Equals", &["shop"])]);
        let err = selects(Some(&bad_op), &pod).unwrap_err();
        assert_eq!(err.path, "spec.podSelector.matchExpressions[0].operator");
        let no_values = selector(
            &[],
            vec![expr("app", "Exists", &[]), expr("app", "In", &[])],
        );
        let err = selects(Some(&no_values), &pod).unwrap_err();
        assert_eq!(err.path, "spec.podSelector.matchExpressions[1].values");
    }
}
