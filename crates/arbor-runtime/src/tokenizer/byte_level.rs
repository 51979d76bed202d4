//! The GPT-2 byte-level alphabet: every byte maps to one printable codepoint so that byte-level
//! BPE vocabularies can be stored as text. Printable Latin-1 bytes map to themselves; the other
//! 68 bytes map, in byte order, to U+0100 onwards.

use std::sync::OnceLock;

struct Maps {
    to_char: [char; 256],
    /// Indexed by codepoint for codepoints below 0x144.
    to_byte: Vec<Option<u8>>,
}

fn maps() -> &'static Maps {
    static MAPS: OnceLock<Maps> = OnceLock::new();
    MAPS.get_or_init(|| {
        let printable = |b: u32| {
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
        };
        let mut to_char = ['\0'; 256];
        let mut to_byte = vec![None; 0x144];
        let mut next = 0x100u32;
        for b in 0..256u32 {
            let cp = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            // Every value here is below 0x144, a valid scalar value.
            let c = char::from_u32(cp).unwrap_or('\u{FFFD}');
            to_char[b as usize] = c;
            to_byte[cp as usize] = Some(b as u8);
        }
        Maps { to_char, to_byte }
    })
}

/// The codepoint that stands for byte `b`.
pub(crate) fn byte_to_char(b: u8) -> char {
    maps().to_char[b as usize]
}

/// The byte that `c` stands for, if `c` is in the alphabet.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    maps().to_byte.get(c as usize).copied().flatten()
}

/// Encodes the UTF-8 bytes of `text` in the byte-level alphabet.
pub(crate) fn encode_str(text: &str, out: &mut String) {
    for b in text.bytes() {
        out.push(byte_to_char(b));
    }
}

/// Decodes byte-level text to bytes; a codepoint outside the alphabet is kept as its own UTF-8.
pub(crate) fn decode_str(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_round_trips() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(decode_str("ĠHello"), b" Hello");
    }
}
