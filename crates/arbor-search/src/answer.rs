//! Final answers in candidate texts: extraction, normalisation and matching, for voting
//! strategies and for grading against a reference.
//!
//! [`extract`] looks, in order, for the last complete `\boxed{...}`, then the last "the answer
//! is X" / "answer: X", then the last number; [`normalize`] makes equal answers compare equal
//! (`$`, `\text{}` and spacing dropped, `1,000.50` → `1000.5`, `2.0` → `2`).
//! [`exact_match`] compares two answers after normalisation; [`regex_match`] tests a pattern.

/// The final answer in `text`, normalised; `None` when there is none.
pub fn extract(text: &str) -> Option<String> {
    let found = [last_boxed(text), answer_phrase(text), last_number(text)];
    found
        .into_iter()
        .flatten()
        .map(|a| normalize(&a))
        .find(|a| !a.is_empty())
}

/// Whether `answer` and `reference` are the same answer once both are normalised.
pub fn exact_match(answer: &str, reference: &str) -> bool {
    normalize(answer) == normalize(reference)
}

/// Whether `pattern` (the `regex` crate's syntax; `(?i)` for case-insensitive) matches
/// anywhere in `text`; anchor it with `^...$` for a whole match. An invalid pattern is an error
/// naming it. The `regex` crate matches in linear time, so no pattern can hang a verifier.
pub fn regex_match(text: &str, pattern: &str) -> Result<bool, String> {
    let re = regex::Regex::new(pattern).map_err(|e| format!("pattern '{pattern}': {e}"))?;
    Ok(re.is_match(text))
}

/// Canonical form of an answer: `$` and `**` removed, `\text{..}`-style wrappers unwrapped,
/// LaTeX thin spaces removed, `\dfrac`/`\tfrac` → `\frac`, whitespace collapsed, trailing
/// periods dropped, and numbers canonical (no thousands commas, no `+`, no leading zeros, no
/// trailing fractional zeros: `+1,000.50` → `1000.5`, `-0.0` → `0`).
pub fn normalize(answer: &str) -> String {
    let mut s = answer
        .replace(['$'], "")
        .replace("**", "")
        .replace('−', "-");
    for wrapper in ["\\text{", "\\textbf{", "\\mathrm{", "\\mbox{"] {
        while let Some(at) = s.find(wrapper) {
            let inner = at + wrapper.len();
            match closing_brace(&s[inner..]) {
                Some(len) => {
                    s = format!(
                        "{}{}{}",
                        &s[..at],
                        &s[inner..inner + len],
                        &s[inner + len + 1..]
                    )
                }
                None => break,
            }
        }
    }
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", " "),
    ] {
        s = s.replace(from, to);
    }
    let mut s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    while s.ends_with('.') {
        s.pop();
    }
    canonical_number(s.trim()).unwrap_or_else(|| s.trim().to_string())
}

/// Byte length of the text before the `}` closing a group whose `{` precedes `s`.
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 1usize;
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next(); // an escaped brace does not nest
            }
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Contents of the last complete `\boxed{...}`.
fn last_boxed(text: &str) -> Option<String> {
    text.rmatch_indices("\\boxed").find_map(|(at, m)| {
        let rest = text[at + m.len()..].trim_start();
        let body = rest.strip_prefix('{')?;
        closing_brace(body).map(|len| body[..len].to_string())
    })
}

/// X in the last "the answer is X" or "answer: X", up to the line or sentence end.
fn answer_phrase(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase(); // same byte offsets as `text`
    let (at, len) = ["answer is", "answer:"]
        .iter()
        .filter_map(|m| lower.rfind(m).map(|at| (at, m.len())))
        .max()?;
    let rest = text[at + len..].trim_start_matches([':', ' ', '\t']);
    let line = rest.lines().next().unwrap_or("");
    // A sentence ends at a period followed by a space (a decimal point is not).
    let end = line
        .char_indices()
        .find(|&(i, c)| c == '.' && line[i + 1..].starts_with(char::is_whitespace))
        .map_or(line.len(), |(i, _)| i);
    let x = line[..end].trim().trim_end_matches('.').trim();
    (!x.is_empty()).then(|| x.to_string())
}

/// The last number: optional sign, digits with optional thousands commas, optional decimals.
fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let mut last = None;
    let mut i = 0;
    while i < b.len() {
        if !digit(i) {
            i += 1;
            continue;
        }
        let start = i;
        while digit(i) {
            i += 1;
        }
        if i - start <= 3 {
            // Thousands groups: a comma and exactly three digits.
            while b.get(i) == Some(&b',') && (1..=3).all(|k| digit(i + k)) && !digit(i + 4) {
                i += 4;
            }
        }
        if b.get(i) == Some(&b'.') && digit(i + 1) {
            i += 1;
            while digit(i) {
                i += 1;
            }
        }
        let before = &text[..start];
        let sign = before
            .strip_suffix('-')
            .or_else(|| before.strip_suffix('−'))
            .filter(|pre| !pre.ends_with(|c: char| c.is_alphanumeric() || ")]}".contains(c)));
        let num = text[start..i].replace(',', "");
        last = Some(if sign.is_some() {
            format!("-{num}")
        } else {
            num
        });
    }
    last
}

/// The canonical form of `s` if it is a plain number (`-1,234.50`), else `None`.
fn canonical_number(s: &str) -> Option<String> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let groups: Vec<&str> = int.split(',').collect();
    let grouped_ok = groups.len() == 1
        || (groups[0].len() <= 3
            && !groups[0].is_empty()
            && groups[1..].iter().all(|g| g.len() == 3));
    let digits = |t: &str| t.bytes().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty())
        || !grouped_ok
        || !groups.iter().all(|g| digits(g))
        || !digits(frac)
    {
        return None;
    }
    if body.contains('.') && frac.is_empty() {
        return None;
    }
    let int = int.replace(',', "");
    let int = match int.trim_start_matches('0') {
        "" => "0",
        t => t,
    };
    let frac = frac.trim_end_matches('0');
    let mut out = if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    };
    if neg && out != "0" {
        out.insert(0, '-');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(t: &str) -> Option<String> {
        extract(t)
    }

    #[test]
    fn boxed_wins_and_braces_balance() {
        assert_eq!(
            ex("so \\boxed{\\frac{1}{2}} and 7").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(ex("\\boxed{3} then \\boxed{4}").as_deref(), Some("4"));
        // The last one is cut off: the last complete one counts.
        assert_eq!(ex("\\boxed{3} then \\boxed{4").as_deref(), Some("3"));
        assert_eq!(ex("\\boxed {\\{1,2\\}}").as_deref(), Some("\\{1,2\\}"));
        assert_eq!(ex("$\\boxed{\\text{(B)}}$").as_deref(), Some("(B)"));
        assert_eq!(ex("\\boxed{1,000.0}").as_deref(), Some("1000"));
        // An empty box falls through to the next rule.
        assert_eq!(ex("answer: 12\n\\boxed{ }").as_deref(), Some("12"));
    }

    #[test]
    fn answer_phrases_case_insensitive_last_one() {
        assert_eq!(ex("The answer is 42.").as_deref(), Some("42"));
        assert_eq!(ex("THE ANSWER IS: $3.50$. Done").as_deref(), Some("3.5"));
        assert_eq!(ex("Answer: Paris\nmore text 9").as_deref(), Some("Paris"));
        assert_eq!(
            ex("answer is 1. no, the final answer is **-2**").as_deref(),
            Some("-2")
        );
        assert_eq!(ex("The answer is 3.14").as_deref(), Some("3.14"));
        // Nothing after the phrase: the last number instead.
        assert_eq!(ex("x=5 so the answer is\n").as_deref(), Some("5"));
    }

    #[test]
    fn last_number_signs_commas_decimals() {
        assert_eq!(ex("we get 1,234,567 apples").as_deref(), Some("1234567"));
        assert_eq!(ex("total = -7.50 dollars").as_deref(), Some("-7.5"));
        assert_eq!(ex("from 3-5").as_deref(), Some("5"));
        assert_eq!(ex("x−3 or (−4)").as_deref(), Some("-4"));
        assert_eq!(ex("list 1,2,3").as_deref(), Some("3"));
        assert_eq!(ex("12,3456").as_deref(), Some("3456"));
        assert_eq!(ex("pi is 3. yes").as_deref(), Some("3"));
        assert_eq!(ex("it is 007").as_deref(), Some("7"));
        assert_eq!(ex("no digits here"), None);
        assert_eq!(ex(""), None);
    }

    #[test]
    fn normalisation_makes_equal_answers_equal() {
        for (a, b) in [
            ("$1,000$", "1000"),
            (" 2.0 ", "2"),
            ("+5", "5"),
            ("-0.00", "0"),
            ("0.50", ".5"),
            ("\\dfrac{1}{2}", "\\frac{1}{2}"),
            ("1\\,000", "1000"),
            ("x  =  3.", "x = 3"),
        ] {
            assert_eq!(normalize(a), normalize(b), "{a:?} vs {b:?}");
        }
        assert_eq!(normalize("3.0.1"), "3.0.1");
        assert_eq!(normalize("1,00"), "1,00");
        assert!(exact_match("$42$.", "42.0"));
        assert!(!exact_match("42", "43"));
    }

    #[test]
    fn regex_matches() {
        let r = |t: &str, p: &str| regex_match(t, p).unwrap();
        assert!(r("the answer is 42", r"\b42\b"));
        assert!(!r("1420", r"\b42\b"));
        assert!(r("42", "^(42|forty-two)$"));
        assert!(r("forty-two", "^(?:42|forty-two)$"));
        assert!(!r("x42", "^42$"));
        assert!(r("Paris", "(?i)^paris$"));
        assert!(!r("Paris", "^paris$"));
        assert!(r("abc123", r"^[a-c]+\d{2,3}$"));
        assert!(!r("abc1234", r"^[a-c]+\d{2,3}$"));
        assert!(r("a-b", r"^[^0-9]*$"));
        assert!(r("a.b", r"a\.b") && !r("axb", r"a\.b"));
        assert!(r("", "^$") && r("aaa", "^a*?$"));
        // Nested loops cannot blow up: the regex crate matches in linear time.
        assert!(!r(&"a".repeat(4000), "^(a*)*c$"));
        for bad in ["(a", "a)", "*a", "[ab", "a{3,1}", "\\"] {
            assert!(regex_match("a", bad).is_err(), "{bad}");
        }
    }
}
