//! Parsing digit selections such as `5`, `1-7` or `1,3,12`.

/// The largest k: two k-digit operands and their sum must fit in a `u64`.
pub const MAX_DIGITS: u32 = 18;

/// Parses a comma-separated list of k values and ranges into a sorted, deduplicated list.
pub fn parse_digits(spec: &str) -> Result<Vec<u32>, String> {
    let bad = |part: &str| {
        format!(
            "addition: cannot read digits `{part}` in `{spec}`; write a number (5), a range (1-7) or a list (1,3,12), each between 1 and {MAX_DIGITS}"
        )
    };
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: u32 = lo.parse().map_err(|_| bad(part))?;
        let hi: u32 = hi.parse().map_err(|_| bad(part))?;
        if lo == 0 || hi > MAX_DIGITS || lo > hi {
            return Err(bad(part));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok: [(&str, Vec<u32>); 5] = [
            ("5", vec![5]),
            ("1-7", (1..=7).collect()),
            ("1,3,12", vec![1, 3, 12]),
            (" 2 - 3 , 1", vec![1, 2, 3]),
            ("3,3,1-3", vec![1, 2, 3]),
        ];
        for (spec, want) in ok {
            assert_eq!(parse_digits(spec).unwrap(), want, "{spec}");
        }
        for spec in ["", "0", "7-1", "1-19", "a", "1,,2"] {
            assert!(parse_digits(spec).is_err(), "{spec}");
        }
    }
}
