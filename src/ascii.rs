//! Numbers written as ASCII digits straight into byte buffers, for the per-request paths
//! (response heads, chunk sizes, log lines) where `fmt` machinery and `to_string` allocations
//! show up in profiles.

/// Appends `n` in decimal.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `n` in lower-case hexadecimal (chunk sizes).
pub(crate) fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Whether `bytes` equals `lower` in any letter case, where `lower` is a lower-case field name
/// or token (letters, digits, `-`) and `bytes` came off the wire through httparse or
/// `HeaderValue`, so it holds no control character but tab.
///
/// Setting bit `0x20` of a byte folds exactly the upper-case letters onto the lower-case ones,
/// leaves digits and `-` alone, and maps onto those only control characters, which the
/// precondition rules out. So words of the name can be compared at once: two overlapping loads
/// cover any length from 4 to 16 (field names that decide framing are 4 to 17 bytes), where
/// `eq_ignore_ascii_case` folds byte by byte.
pub(crate) fn eq_lower(bytes: &[u8], lower: &[u8]) -> bool {
    let len = bytes.len();
    if len != lower.len() {
        return false;
    }
    if len >= 8 {
        let word = |s: &[u8], at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&s[at..at + 8]);
            u64::from_ne_bytes(w)
        };
        const FOLD: u64 = 0x2020_2020_2020_2020;
        let mut at = 0;
        while at + 8 < len {
            if word(bytes, at) | FOLD != word(lower, at) | FOLD {
                return false;
            }
            at += 8;
        }
        word(bytes, len - 8) | FOLD == word(lower, len - 8) | FOLD
    } else if len >= 4 {
        let word = |s: &[u8], at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&s[at..at + 4]);
            u32::from_ne_bytes(w)
        };
        const FOLD: u32 = 0x2020_2020;
        word(bytes, 0) | FOLD == word(lower, 0) | FOLD
            && word(bytes, len - 4) | FOLD == word(lower, len - 4) | FOLD
    } else {
        bytes.iter().zip(lower).all(|(b, l)| b | 0x20 == *l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_match_the_standard_formatter() {
        for n in [0u64, 7, 10, 4_096, 20_000, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for n in [0usize, 0xf, 0x10, 0x4e20, usize::MAX] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(out, format!("{n:x}").as_bytes());
        }
    }

    /// Every lower-case name the proxy compares against, every length from 1 to 20, and every
    /// byte httparse and `HeaderValue` let through, in every position: the same verdict as
    /// `eq_ignore_ascii_case`.
    #[test]
    fn eq_lower_agrees_with_eq_ignore_ascii_case_on_wire_bytes() {
        let wire_bytes: Vec<u8> = (0u8..=255).filter(|b| *b == b'\t' || *b >= 0x20).collect();
        let mut targets: Vec<Vec<u8>> = [
            "date",
            "te",
            "content-length",
            "connection",
            "keep-alive",
            "transfer-encoding",
            "expect",
            "upgrade",
            "close",
            "chunked",
            "trailers",
            "proxy-connection",
        ]
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .collect();
        targets.extend((1..=20).map(|n| (0..n).map(|i| b"a0-z9"[i % 5]).collect()));
        for target in &targets {
            let upper = target.to_ascii_uppercase();
            assert!(eq_lower(target, target));
            assert!(eq_lower(&upper, target));
            assert!(!eq_lower(&target[1..], target));
            for at in 0..target.len() {
                for &b in &wire_bytes {
                    let mut name = upper.clone();
                    name[at] = b;
                    assert_eq!(
                        eq_lower(&name, target),
                        name.eq_ignore_ascii_case(target),
                        "{:?} against {:?}",
                        String::from_utf8_lossy(&name),
                        String::from_utf8_lossy(target)
                    );
                }
            }
        }
    }
}
