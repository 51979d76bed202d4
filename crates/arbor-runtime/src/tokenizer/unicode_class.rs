//! Per-codepoint character classes as llama.cpp's pre-tokenizer sees them: the Unicode general
//! category (letter, number, punctuation, mark, symbol, separator, other, unassigned) and the
//! White_Space property.
//!
//! The tables come from `regex-syntax`'s Unicode data (already compiled in for the regex engine),
//! read once into a sorted range list.

use std::sync::OnceLock;

/// The general-category group of a codepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Category {
    /// Cn: not assigned.
    Unassigned,
    /// N*
    Number,
    /// L*
    Letter,
    /// Z*
    Separator,
    /// M*
    Mark,
    /// P*
    Punctuation,
    /// S*
    Symbol,
    /// Cc, Cf, Co (Cs cannot occur in a Rust `char`).
    Control,
}

/// The classes of one codepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CharClass {
    pub category: Category,
    pub whitespace: bool,
}

impl CharClass {
    pub fn is_letter(self) -> bool {
        self.category == Category::Letter
    }
    pub fn is_number(self) -> bool {
        self.category == Category::Number
    }
}

struct Tables {
    /// Sorted, disjoint (start, end inclusive, category) ranges; gaps are unassigned.
    ranges: Vec<(u32, u32, Category)>,
    /// Sorted White_Space codepoints.
    whitespace: Vec<u32>,
    ascii: [CharClass; 128],
}

fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::ParserBuilder::new().build().parse(pattern);
    let Ok(hir) = hir else { return Vec::new() };
    match hir.kind() {
        regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(cls)) => cls
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let groups = [
            (r"\p{L}", Category::Letter),
            (r"\p{N}", Category::Number),
            (r"\p{P}", Category::Punctuation),
            (r"\p{M}", Category::Mark),
            (r"\p{S}", Category::Symbol),
            (r"\p{Z}", Category::Separator),
            (r"[\p{Cc}\p{Cf}\p{Co}]", Category::Control),
        ];
        let mut ranges = Vec::new();
        for (pattern, cat) in groups {
            ranges.extend(class_ranges(pattern).into_iter().map(|(a, b)| (a, b, cat)));
        }
        ranges.sort_by_key(|r| r.0);
        let mut whitespace = Vec::new();
        for (a, b) in class_ranges(r"\p{White_Space}") {
            whitespace.extend(a..=b);
        }
        let mut t = Tables {
            ranges,
            whitespace,
            ascii: [CharClass {
                category: Category::Unassigned,
                whitespace: false,
            }; 128],
        };
        let mut ascii = t.ascii;
        for (c, slot) in ascii.iter_mut().enumerate() {
            *slot = lookup(&t, c as u32);
        }
        t.ascii = ascii;
        t
    })
}

fn lookup(t: &Tables, cp: u32) -> CharClass {
    let idx = t.ranges.partition_point(|r| r.0 <= cp);
    let category = match idx.checked_sub(1).map(|i| t.ranges[i]) {
        Some((_, end, cat)) if cp <= end => cat,
        _ => Category::Unassigned,
    };
    CharClass {
        category,
        whitespace: t.whitespace.binary_search(&cp).is_ok(),
    }
}

/// The classes of `c`.
pub(crate) fn classify(c: char) -> CharClass {
    let t = tables();
    let cp = c as u32;
    if cp < 128 {
        t.ascii[cp as usize]
    } else {
        lookup(t, cp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_classes() {
        assert_eq!(classify('a').category, Category::Letter);
        assert_eq!(classify('Б').category, Category::Letter);
        assert_eq!(classify('7').category, Category::Number);
        assert_eq!(classify('½').category, Category::Number);
        assert_eq!(classify('!').category, Category::Punctuation);
        assert_eq!(classify('$').category, Category::Symbol);
        assert_eq!(classify('\u{301}').category, Category::Mark);
        assert_eq!(classify('\n').category, Category::Control);
        assert_eq!(classify(' ').category, Category::Separator);
        assert!(
            classify(' ').whitespace
                && classify('\u{3000}').whitespace
                && classify('\u{85}').whitespace
        );
        assert!(!classify('\u{200b}').whitespace);
        assert_eq!(classify('\u{378}').category, Category::Unassigned);
        assert_eq!(classify('🦙').category, Category::Symbol);
    }
}
