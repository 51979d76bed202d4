//! Byte-level BPE pre-tokenisation: the regex lists that llama.cpp selects by
//! `tokenizer.ggml.pre`, and a splitter that applies them the way llama.cpp does.
//!
//! llama.cpp applies a model's regexes one after another, each splitting the pieces left by the
//! previous one (unmatched stretches become pieces too). Two regexes (GPT-2's and Llama 3's)
//! have hand-written matchers there, reproduced here as [`Rule::Gpt2`] and [`Rule::Llama3`].
//! The others run on a "collapsed" text when they use Unicode categories: ASCII stays itself,
//! every other codepoint becomes one stand-in character for its category (whitespace becomes
//! `\x0B`), and `\p{X}` in the regex becomes that stand-in plus the category's ASCII members.
//! `\s` means ASCII whitespace only, as in C++'s `std::regex`.

use super::unicode_class::{classify, Category, CharClass};
use crate::RuntimeError;

/// One splitting step.
pub(crate) enum Rule {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    /// with N = `max_digits` (3: Llama 3; 1: Qwen2, for which llama.cpp runs the regex itself,
    /// with the same result — checked against llama.cpp in the tests — far more slowly).
    Llama3 { max_digits: usize },
    /// Any other regex, compiled for the collapsed text (`collapsed`) or the plain one.
    Regex { re: Matcher, collapsed: bool },
}

/// What a `tokenizer.ggml.pre` value selects.
pub(crate) struct PreTokenizer {
    pub rules: Vec<Rule>,
    /// A word that is itself a token is not merged (Llama 3, Tekken).
    pub ignore_merges: bool,
    /// llama.cpp's default for adding BOS, before `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// llama.cpp forgets the BOS id for these (ChatGLM).
    pub no_bos: bool,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const PORO: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";
// Written with escapes: the class holds compatibility characters (e.g. U+1F7D, U+2126) that text
// tools may normalise into other codepoints.
const DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex list for each pre-tokenizer family; `None` for an unknown name.
fn patterns(pre: &str) -> Option<(&'static [&'static str], bool, bool, bool)> {
    // (regexes, ignore_merges, add_bos, no_bos)
    let r: (&'static [&'static str], bool, bool, bool) = match pre {
        "" | "default" => (&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], false, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (&[LLAMA3], true, true, false),
        "dbrx" | "smaug-bpe" => (&[LLAMA3], false, false, false),
        "glm4" | "chatglm-bpe" => (&[LLAMA3], false, false, true),
        "deepseek-llm" => (
            &["[\r\n]", DEEPSEEK_LLM_LETTERS, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", "[一-龥ࠀ-一가-퟿]+", r"\p{N}+"],
            false,
            false,
            false,
        ),
        "deepseek-v3" => (
            &[
                r"\p{N}{1,3}",
                "[一-龥぀-ゟ゠-ヿ]+",
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
            ],
            false,
            false,
            false,
        ),
        "deepseek-coder" => (&["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"], false, false, false),
        "falcon" => (&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"], false, false, false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (&[r"\p{N}", GPT2], false, false, false)
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de"
        | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion" => (&[GPT2], false, false, false),
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => (&[QWEN2], false, false, false),
        "poro-chat" | "bloom" | "gpt3-finnish" => (&[PORO], false, false, false),
        "viking" => (&[PORO, r"\p{N}"], false, false, false),
        "tekken" => (&[TEKKEN], true, true, false),
        "chameleon" => (
            &[
                "<sentinel:[0-9]+>",
                "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                "([\\t\\n]|    |  )",
                r"\p{N}",
                r"[\p{P}!-/:-@\[-`{-~]",
                GPT2,
            ],
            false,
            true,
            false,
        ),
        "gpt-4o" | "llama4" => (&[GPT4O], false, false, false),
        "superbpe" => (&[r"\p{N}+", r"(?=(\d{3})+(?!\d))"], false, false, false),
        "bailingmoe" => (
            &[r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
            false,
            false,
            false,
        ),
        _ => return None,
    };
    Some(r)
}

impl PreTokenizer {
    /// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre = pre` (empty: the default).
    pub fn for_name(pre: &str) -> Result<Self, RuntimeError> {
        let (list, ignore_merges, add_bos, no_bos) = patterns(pre).ok_or_else(|| {
            RuntimeError::Tokenizer(format!(
                "unknown pre-tokenizer type '{pre}' (tokenizer.ggml.pre); arbor knows llama.cpp's list, e.g. \
                 default, gpt-2, llama-bpe, qwen2, starcoder, deepseek-coder, deepseek-llm, smollm, falcon, mpt, \
                 refact, command-r, stablelm2, olmo, tekken, gpt-4o"
            ))
        })?;
        let rules = list
            .iter()
            .map(|p| Rule::compile(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreTokenizer {
            rules,
            ignore_merges,
            add_bos,
            no_bos,
        })
    }

    /// Splits `text` into words (as plain text, not yet byte-level encoded).
    pub fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, RuntimeError> {
        let cps: Vec<char> = text.chars().collect();
        let classes: Vec<CharClass> = cps.iter().map(|&c| classify(c)).collect();
        let mut byte_at = Vec::with_capacity(cps.len() + 1);
        let mut pos = 0;
        for c in &cps {
            byte_at.push(pos);
            pos += c.len_utf8();
        }
        byte_at.push(pos);

        let mut collapsed: Option<Vec<char>> = None;
        let mut plain: Option<Vec<char>> = None;
        let mut lens = vec![cps.len()];
        for rule in &self.rules {
            lens = match rule {
                Rule::Gpt2 => split_gpt2(&cps, &classes, &lens),
                Rule::Llama3 { max_digits } => split_llama3(&cps, &classes, &lens, *max_digits),
                Rule::Regex {
                    re,
                    collapsed: true,
                } => {
                    let view = collapsed.get_or_insert_with(|| collapse(&cps, &classes));
                    split_regex(re, view, &lens)?
                }
                Rule::Regex {
                    re,
                    collapsed: false,
                } => {
                    let view = plain.get_or_insert_with(|| {
                        cps.iter()
                            .zip(&classes)
                            .map(|(&c, cl)| {
                                if c as u32 > 0x7F && cl.whitespace {
                                    '\x0B'
                                } else {
                                    c
                                }
                            })
                            .collect()
                    });
                    split_regex(re, view, &lens)?
                }
            };
        }
        let mut words = Vec::with_capacity(lens.len());
        let mut start = 0;
        for len in lens {
            words.push(&text[byte_at[start]..byte_at[start + len]]);
            start += len;
        }
        Ok(words)
    }
}

/// Stand-in characters of the collapsed text.
const STAND_IN_NUMBER: char = '\u{D1}';
const STAND_IN_LETTER: char = '\u{D2}';
const STAND_IN_PUNCT: char = '\u{D3}';
const STAND_IN_MARK: char = '\u{D4}';
const STAND_IN_SYMBOL: char = '\u{D5}';
const STAND_IN_OTHER: char = '\u{D0}';

fn collapse(cps: &[char], classes: &[CharClass]) -> Vec<char> {
    cps.iter()
        .zip(classes)
        .map(|(&c, cl)| {
            if (c as u32) < 128 {
                c
            } else if cl.whitespace {
                '\x0B'
            } else {
                match cl.category {
                    Category::Number => STAND_IN_NUMBER,
                    Category::Letter => STAND_IN_LETTER,
                    Category::Punctuation => STAND_IN_PUNCT,
                    Category::Mark => STAND_IN_MARK,
                    Category::Symbol => STAND_IN_SYMBOL,
                    _ => STAND_IN_OTHER,
                }
            }
        })
        .collect()
}

const ASCII_SPACE_CLASS: &str = r"\t\n\x0B\x0C\r\x20";

impl Rule {
    fn compile(pattern: &str) -> Result<Rule, RuntimeError> {
        if pattern == GPT2 {
            return Ok(Rule::Gpt2);
        }
        if pattern == LLAMA3 {
            return Ok(Rule::Llama3 { max_digits: 3 });
        }
        if pattern == QWEN2 {
            return Ok(Rule::Llama3 { max_digits: 1 });
        }
        Self::compile_regex(pattern)
    }

    /// Compiles `pattern` for the regex engine, never for a hand-written matcher.
    fn compile_regex(pattern: &str) -> Result<Rule, RuntimeError> {
        let collapsed = ["\\p{N}", "\\p{L}", "\\p{P}", "\\p{M}", "\\p{S}"]
            .iter()
            .any(|c| pattern.contains(c));
        let translated = translate(pattern, collapsed);
        // The plain regex engine where the pattern allows it (no look-around), else fancy-regex.
        let re = match regex::Regex::new(&translated) {
            Ok(re) => Matcher::Plain(re),
            Err(_) => Matcher::Fancy(
                fancy_regex::RegexBuilder::new(&translated)
                    .backtrack_limit(10_000_000)
                    .build()
                    .map_err(|e| {
                        RuntimeError::Tokenizer(format!("pre-tokenizer regex {pattern:?}: {e}"))
                    })?,
            ),
        };
        Ok(Rule::Regex { re, collapsed })
    }
}

/// Rewrites a llama.cpp (ECMAScript) pre-tokenizer regex for `fancy_regex` on the collapsed or
/// plain text: `\p{X}` → stand-in + ASCII members, `\s`/`\S`/`\d` → their ASCII sets.
fn translate(pattern: &str, collapsed: bool) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && i + 1 < chars.len() {
            let n = chars[i + 1];
            if n == 'p'
                && collapsed
                && i + 4 < chars.len()
                && chars[i + 2] == '{'
                && chars[i + 4] == '}'
            {
                let members = match chars[i + 3] {
                    'N' => Some((STAND_IN_NUMBER, "0-9")),
                    'L' => Some((STAND_IN_LETTER, "A-Za-z")),
                    'P' => Some((STAND_IN_PUNCT, r"!-#%-*,-/:-;?-@\[-\]_\{\}")),
                    'M' => Some((STAND_IN_MARK, "")),
                    'S' => Some((STAND_IN_SYMBOL, r"\$\+<->\^`\|")),
                    _ => None,
                };
                if let Some((stand_in, ascii)) = members {
                    let body = format!("\\x{{{:X}}}{ascii}", stand_in as u32);
                    if inside {
                        out.push_str(&body);
                    } else {
                        out.push('[');
                        out.push_str(&body);
                        out.push(']');
                    }
                    i += 5;
                    continue;
                }
            }
            let set = match n {
                's' => Some((ASCII_SPACE_CLASS, false)),
                'S' => Some((ASCII_SPACE_CLASS, true)),
                'd' => Some(("0-9", false)),
                _ => None,
            };
            match set {
                Some((body, negated)) if !inside => {
                    out.push_str(if negated { "[^" } else { "[" });
                    out.push_str(body);
                    out.push(']');
                }
                Some((body, false)) => out.push_str(body),
                _ => {
                    out.push(c);
                    out.push(n);
                }
            }
            i += 2;
            continue;
        }
        if c == '[' && !inside {
            inside = true;
        } else if c == ']' && inside {
            inside = false;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// A compiled pre-tokenizer regex.
pub(crate) enum Matcher {
    Plain(regex::Regex),
    Fancy(fancy_regex::Regex),
}

impl Matcher {
    /// Byte spans of the successive matches in `hay`.
    fn for_each_match(
        &self,
        hay: &str,
        mut f: impl FnMut(usize, usize),
    ) -> Result<(), RuntimeError> {
        match self {
            Matcher::Plain(re) => re.find_iter(hay).for_each(|m| f(m.start(), m.end())),
            Matcher::Fancy(re) => {
                for m in re.find_iter(hay) {
                    let m = m.map_err(|e| {
                        RuntimeError::Tokenizer(format!("pre-tokenizer regex failed: {e}"))
                    })?;
                    f(m.start(), m.end());
                }
            }
        }
        Ok(())
    }
}

/// Applies `re` to each piece of `view` (pieces given as lengths in codepoints).
fn split_regex(re: &Matcher, view: &[char], lens: &[usize]) -> Result<Vec<usize>, RuntimeError> {
    let text: String = view.iter().collect();
    // Codepoint index of every byte offset (and of the end).
    let mut char_at_byte = Vec::with_capacity(text.len() + 1);
    let mut byte_at_char = Vec::with_capacity(view.len() + 1);
    for (k, c) in view.iter().enumerate() {
        byte_at_char.push(char_at_byte.len());
        char_at_byte.extend(std::iter::repeat_n(k, c.len_utf8()));
    }
    byte_at_char.push(text.len());
    char_at_byte.push(view.len());
    let mut out = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        let base = byte_at_char[start];
        let chunk = &text[base..byte_at_char[start + len]];
        let mut prev = start;
        re.for_each_match(chunk, |ms, me| {
            let (s, e) = (char_at_byte[base + ms], char_at_byte[base + me]);
            if s > prev {
                out.push(s - prev);
            }
            if e > s {
                out.push(e - s);
            }
            prev = e.max(prev);
        })?;
        if prev < start + len {
            out.push(start + len - prev);
        }
        start += len;
    }
    Ok(out)
}

/// Walks each piece, cutting tokens; `cut` records a token ending at a position.
struct Cutter<'a> {
    cps: &'a [char],
    classes: &'a [CharClass],
    ini: usize,
    end: usize,
    prev_end: usize,
    out: &'a mut Vec<usize>,
}

impl Cutter<'_> {
    fn cp(&self, pos: usize) -> Option<char> {
        (self.ini <= pos && pos < self.end).then(|| self.cps[pos])
    }
    /// `None` outside the piece (llama.cpp's empty flags).
    fn class(&self, pos: usize) -> Option<CharClass> {
        (self.ini <= pos && pos < self.end).then(|| self.classes[pos])
    }
    fn is_letter(&self, pos: usize) -> bool {
        self.class(pos).is_some_and(|c| c.is_letter())
    }
    fn is_number(&self, pos: usize) -> bool {
        self.class(pos).is_some_and(|c| c.is_number())
    }
    fn is_space(&self, pos: usize) -> bool {
        self.class(pos).is_some_and(|c| c.whitespace)
    }
    /// `[^\s\p{L}\p{N}]` and inside the piece.
    fn is_other(&self, pos: usize) -> bool {
        self.class(pos)
            .is_some_and(|c| !c.whitespace && !c.is_letter() && !c.is_number())
    }
    fn cut(&mut self, end: usize) -> usize {
        let len = end - self.prev_end;
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }
}

/// Length of a contraction (`'s`, `'re`, ...) at `pos`, with `fold` lowering the letters.
fn contraction(cut: &Cutter, pos: usize, fold: bool) -> usize {
    if cut.cp(pos) != Some('\'') || pos + 1 >= cut.end {
        return 0;
    }
    let low = |c: Option<char>| c.map(|c| if fold { c.to_ascii_lowercase() } else { c });
    let n1 = low(cut.cp(pos + 1));
    if matches!(n1, Some('s' | 't' | 'm' | 'd')) {
        return 2;
    }
    if pos + 2 < cut.end {
        let n2 = low(cut.cp(pos + 2));
        if matches!(
            (n1, n2),
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
        ) {
            return 3;
        }
    }
    0
}

fn split_gpt2(cps: &[char], classes: &[CharClass], lens: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        let mut cut = Cutter {
            cps,
            classes,
            ini: start,
            end: start + len,
            prev_end: start,
            out: &mut out,
        };
        let mut pos = start;
        while pos < cut.end {
            let n = contraction(&cut, pos, false);
            if n > 0 {
                pos += cut.cut(pos + n);
                continue;
            }
            let space = cut.cp(pos) == Some(' ');
            let p2 = pos + space as usize;
            if cut.is_letter(p2) {
                pos = p2;
                while cut.is_letter(pos) {
                    pos += 1;
                }
                cut.cut(pos);
                continue;
            }
            if cut.is_number(p2) {
                pos = p2;
                while cut.is_number(pos) {
                    pos += 1;
                }
                cut.cut(pos);
                continue;
            }
            if cut.is_other(p2) {
                pos = p2;
                while cut.is_other(pos) {
                    pos += 1;
                }
                cut.cut(pos);
                continue;
            }
            let mut spaces = 0;
            while cut.is_space(pos + spaces) {
                spaces += 1;
            }
            if spaces > 1 && cut.cp(pos + spaces).is_some() {
                pos += spaces - 1;
                cut.cut(pos);
                continue;
            }
            if spaces > 0 {
                pos += spaces;
                cut.cut(pos);
                continue;
            }
            pos += 1;
            cut.cut(pos);
        }
        start += len;
    }
    out
}

fn split_llama3(
    cps: &[char],
    classes: &[CharClass],
    lens: &[usize],
    max_digits: usize,
) -> Vec<usize> {
    let mut out = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        let mut cut = Cutter {
            cps,
            classes,
            ini: start,
            end: start + len,
            prev_end: start,
            out: &mut out,
        };
        let mut pos = start;
        while pos < cut.end {
            let n = contraction(&cut, pos, true);
            if n > 0 {
                pos += cut.cut(pos + n);
                continue;
            }
            let c = cut.cp(pos);
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(matches!(c, Some('\r' | '\n')) || cut.is_number(pos))
                && (cut.is_letter(pos) || cut.is_letter(pos + 1))
            {
                pos += 1;
                while cut.is_letter(pos) {
                    pos += 1;
                }
                cut.cut(pos);
                continue;
            }
            // \p{N}{1,max_digits}
            if cut.is_number(pos) {
                let mut ini = pos;
                while cut.is_number(pos) {
                    pos += 1;
                    if pos - ini >= max_digits {
                        cut.cut(pos);
                        ini = pos;
                    }
                }
                cut.cut(pos);
                continue;
            }
            // ' ?[^\s\p{L}\p{N}]+[\r\n]*' (llama.cpp tests the unshifted position for being inside)
            let p2 = if c == Some(' ') { pos + 1 } else { pos };
            if cut.is_other(p2) && cut.class(pos).is_some() {
                pos = p2;
                while cut.is_other(pos) {
                    pos += 1;
                }
                while matches!(cut.cp(pos), Some('\r' | '\n')) {
                    pos += 1;
                }
                cut.cut(pos);
                continue;
            }
            let mut spaces = 0;
            let mut last_newline_end = 0;
            while cut.is_space(pos + spaces) {
                if matches!(cut.cp(pos + spaces), Some('\r' | '\n')) {
                    last_newline_end = pos + spaces + 1;
                }
                spaces += 1;
            }
            if last_newline_end > 0 {
                pos = last_newline_end;
                cut.cut(pos);
                continue;
            }
            if spaces > 1 && cut.cp(pos + spaces).is_some() {
                pos += spaces - 1;
                cut.cut(pos);
                continue;
            }
            if spaces > 0 {
                pos += spaces;
                cut.cut(pos);
                continue;
            }
            pos += 1;
            cut.cut(pos);
        }
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        PreTokenizer::for_name(pre)
            .unwrap()
            .split(text)
            .unwrap()
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn every_known_name_compiles() {
        for name in [
            "default",
            "llama-bpe",
            "dbrx",
            "glm4",
            "deepseek-llm",
            "deepseek-v3",
            "deepseek-coder",
            "falcon",
            "smollm",
            "gpt-2",
            "qwen2",
            "poro-chat",
            "viking",
            "tekken",
            "chameleon",
            "gpt-4o",
            "superbpe",
            "bailingmoe",
        ] {
            PreTokenizer::for_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(PreTokenizer::for_name("nonsense").is_err());
    }

    #[test]
    fn gpt2_splits() {
        assert_eq!(
            words("gpt-2", "Hello world's   end  "),
            ["Hello", " world", "'s", "  ", " end", "  "]
        );
        assert_eq!(words("smollm", "abc 123"), ["abc", " ", "1", "2", "3"]);
    }

    /// The hand-written matchers split exactly as their regexes do on the collapsed text.
    #[test]
    fn hand_matchers_agree_with_their_regexes() {
        let samples = [
            "Hello world's   end  ",
            "I'M 12345 x\n\n y\r\n\t z  \n  ",
            " \u{a0}\u{3000}a\u{2009}\u{85}b \u{200b}c\x0b\x0cd",
            "我想在apple工作1314151天～ ½ Ⅻ ²³",
            "🦙.cpp 😶\u{200d}🌫\u{fe0f} (normal) e\u{301} naïve Führer",
            "it's 'S 'll 'LL 'Re x'd y'T don't  'xyz '' '",
            "\u{378}\u{e000}\x01\x7f!!!\n\n\n  ???\r\n   ...   ",
            "def f(x):\n    return x**2\n\n\n\tif a<=b: pass  # é",
            "   ",
            " ",
            "\n",
            "",
            "a",
            "1",
            "'",
            "' ",
            " '",
            "\u{a0}",
            " \u{a0}x",
        ];
        let split = |rule: Rule, text: &str| {
            let pre = PreTokenizer {
                rules: vec![rule],
                ignore_merges: false,
                add_bos: false,
                no_bos: false,
            };
            pre.split(text)
                .unwrap()
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let hand = |pattern: &str| match pattern {
            GPT2 => Rule::Gpt2,
            LLAMA3 => Rule::Llama3 { max_digits: 3 },
            _ => Rule::Llama3 { max_digits: 1 },
        };
        for pattern in [GPT2, LLAMA3, QWEN2] {
            for text in samples {
                let by_regex = split(Rule::compile_regex(pattern).unwrap(), text);
                assert_eq!(
                    split(hand(pattern), text),
                    by_regex,
                    "{pattern} on {text:?}"
                );
            }
        }
    }

    #[test]
    fn llama3_and_qwen2_splits() {
        assert_eq!(
            words("llama-bpe", "I'M 12345 x\n\n y"),
            ["I", "'M", " ", "123", "45", " x", "\n\n", " y"]
        );
        assert_eq!(
            words("qwen2", "I'M 12345 x\n\n y"),
            ["I", "'M", " ", "1", "2", "3", "4", "5", " x", "\n\n", " y"]
        );
        assert_eq!(words("superbpe", "1234567"), ["1", "234", "567"]);
    }
}
