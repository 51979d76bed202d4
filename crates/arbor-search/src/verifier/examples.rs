//! Finding worked examples in a programming prompt: the inputs a code verifier runs every
//! candidate on, with the outputs the prompt says they give.
//!
//! Two forms are recognised, in the prompt's code or prose:
//! - doctests: `>>> f(1, 2)` followed by the expected output on the next line(s);
//! - one-line examples: `f(1, 2) ➞ 3`, `f(1, 2) ==> 3`, `f(1, 2) => 3`, `f(1, 2) -> 3`,
//!   `f(1, 2) == 3`, `f(1, 2) = 3`, `f(1, 2) should return 3`, where `f` is a function the
//!   prompt defines (`def f(`).
//!
//! Examples written only in words ("for lst = [1,2] the output should be 3") are not found;
//! such a prompt is scored on whether candidates run (see [`super::CodeVerifier`]).

use regex::Regex;
use std::collections::HashSet;
use std::sync::OnceLock;

/// One example call and the output the prompt gives for it, both as source text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// A Python expression, e.g. `add(1, 2)`.
    pub call: String,
    /// The expected value as written, e.g. `3` or `'abc'`.
    pub expected: String,
}

/// Names of the functions a prompt defines (`def name(`), in order.
pub fn defined_functions(text: &str) -> Vec<String> {
    static DEF: OnceLock<Regex> = OnceLock::new();
    let re = DEF.get_or_init(|| Regex::new(r"(?m)^[ \t]*def[ \t]+([A-Za-z_]\w*)[ \t]*\(").unwrap());
    let mut seen = HashSet::new();
    re.captures_iter(text)
        .map(|c| c[1].to_string())
        .filter(|n| seen.insert(n.clone()))
        .collect()
}

/// The examples of `prompt`, without duplicates (by call), doctests first.
pub fn extract_examples(prompt: &str) -> Vec<Example> {
    let names = defined_functions(prompt);
    let mut out = doctests(prompt, &names);
    for line in prompt.lines() {
        let t = line.trim();
        if t.starts_with("def ") || t.starts_with(">>>") {
            continue;
        }
        for name in &names {
            out.extend(one_line(t, name));
        }
    }
    let mut seen = HashSet::new();
    out.retain(|e| seen.insert(e.call.clone()));
    out
}

/// `>>> call` lines with the expected output on the following non-empty lines (up to a blank
/// line, the next `>>>`, a line calling one of `names`, or the end of the docstring).
fn doctests(prompt: &str, names: &[String]) -> Vec<Example> {
    let lines: Vec<&str> = prompt.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(call) = lines[i].trim().strip_prefix(">>>") else {
            i += 1;
            continue;
        };
        let call = call.trim().to_string();
        let mut expected = Vec::new();
        i += 1;
        while i < lines.len() {
            let t = lines[i].trim();
            let ends = t.is_empty()
                || t.starts_with(">>>")
                || t.starts_with("\"\"\"")
                || t.starts_with("'''")
                || names.iter().any(|n| find_call(t, n).is_some());
            if ends {
                break;
            }
            expected.push(t.trim_end_matches("\"\"\"").trim_end_matches("'''").trim());
            i += 1;
        }
        // `>>> x = 1` (a statement, no output) sets something up; not an example.
        if !call.is_empty() && !expected.is_empty() {
            out.push(Example {
                call,
                expected: expected.join("\n"),
            });
        }
    }
    out
}

/// The arrow forms of one-line examples, longest first so that `==>` is not read as `==`.
const ARROWS: [&str; 8] = [
    "should return",
    "==>",
    "➞",
    "=>",
    "->",
    "==",
    "returns",
    "=",
];

/// Examples of `name` on one line: `name(args) ARROW expected` (several may share a line,
/// separated by commas or semicolons only when each has its own call).
fn one_line(line: &str, name: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = find_call(&line[from..], name) {
        let start = from + pos;
        let Some(end) = matching_paren(line, start + name.len()) else {
            break;
        };
        let call = &line[start..=end];
        let rest = line[end + 1..].trim_start();
        from = end + 1;
        let Some(arrow) = ARROWS.iter().find(|a| rest.starts_with(*a)) else {
            continue;
        };
        let mut expected = rest[arrow.len()..].trim();
        // Another example on the same line ends this one.
        if let Some(next) = find_call(expected, name) {
            expected = expected[..next].trim_end_matches([' ', ',', ';']).trim();
        }
        let expected = expected.trim_end_matches([',', ';']).trim();
        if !expected.is_empty() {
            out.push(Example {
                call: call.to_string(),
                expected: expected.to_string(),
            });
        }
    }
    out
}

/// Byte offset of `name(` in `s` where `name` is a whole identifier.
fn find_call(s: &str, name: &str) -> Option<usize> {
    let pat = format!("{name}(");
    let mut from = 0;
    while let Some(p) = s[from..].find(&pat) {
        let at = from + p;
        let before = s[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            return Some(at);
        }
        from = at + pat.len();
    }
    None
}

/// The index of the `)` closing the `(` at `open`, skipping brackets inside string literals.
fn matching_paren(s: &str, open: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    if bytes.get(open) != Some(&b'(') {
        return None;
    }
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut i = open;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(_) if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return (b == b')').then_some(i);
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(call: &str, expected: &str) -> Example {
        Example {
            call: call.into(),
            expected: expected.into(),
        }
    }

    #[test]
    fn doctests_with_multi_line_outputs_and_setup_lines() {
        let p = "def f(x):\n    \"\"\" Doubles.\n    >>> f(2)\n    4\n    >>> y = 3\n    >>> f('a')\n    'aa'\n    \"\"\"\n";
        assert_eq!(
            extract_examples(p),
            vec![ex("f(2)", "4"), ex("f('a')", "'aa'")]
        );
    }

    #[test]
    fn one_line_forms_of_defined_functions_only() {
        let p = "def add(a, b) -> int:\n    \"\"\"Examples:\n    add(1, 2) ➞ 3\n    add([1, (2)], \")\") ==> [1]\n    add(0, 0) == 0, add(5, 5) == 10\n    print(1) = 1\n    \"\"\"";
        assert_eq!(
            extract_examples(p),
            vec![
                ex("add(1, 2)", "3"),
                ex("add([1, (2)], \")\")", "[1]"),
                ex("add(0, 0)", "0"),
                ex("add(5, 5)", "10"),
            ]
        );
    }

    #[test]
    fn prose_and_signatures_are_not_examples() {
        let p = "def g(n: int) -> int:\n    \"\"\"For n = 5 the output should be 3.\n    g is fast.\"\"\"";
        assert!(extract_examples(p).is_empty());
        assert_eq!(defined_functions(p), vec!["g".to_string()]);
        assert_eq!(defined_functions("x = 1"), Vec::<String>::new());
    }

    #[test]
    fn unbalanced_calls_do_not_panic() {
        assert!(extract_examples("def h(x):\n  h((1, 2) == 3\n  h(\"unterminated").is_empty());
    }
}
