//! Token id → bytes, and a streaming decoder that never splits a UTF-8 character.

use crate::Tokenizer;

/// GPT-2 byte-level alphabet, inverted: code point → byte, for code points < 324.
/// Bytes 33..=126, 161..=172 and 174..=255 map to themselves; the other 68 bytes, in
/// increasing order, map to 256, 257, ….
fn unicode_to_byte() -> [Option<u8>; 324] {
    let mut table = [None; 324];
    let mut next = 256usize;
    for b in 0..=255u8 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        if printable {
            table[usize::from(b)] = Some(b);
        } else {
            table[next] = Some(b);
            next += 1;
        }
    }
    table
}

/// GPT-2 byte-level alphabet: byte → code point.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        let cp = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
};

pub(crate) fn byte_to_char(b: u8) -> char {
    BYTE_TO_CHAR[usize::from(b)]
}

/// Bytes a vocabulary string decodes to. Added tokens, and any token containing U+FF5C,
/// are emitted verbatim; BPE tokens map each code point back through the byte alphabet
/// (code points outside it are dropped).
pub(crate) fn token_to_bytes(token: &str, added: bool) -> Box<[u8]> {
    if added || token.contains('｜') {
        return token.as_bytes().into();
    }
    let table = unicode_to_byte();
    token
        .chars()
        .filter_map(|c| table.get(c as usize).copied().flatten())
        .collect()
}

/// Incremental detokenizer: feed ids (or bytes), get text that only ever contains whole
/// UTF-8 characters. Incomplete trailing bytes are held back until the next push; bytes
/// that can never form a valid character become U+FFFD. [`StreamDecoder::finish`] flushes
/// what is left (lossily).
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the text completed by token `id` to `out`.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32, out: &mut String) {
        self.push_bytes(tokenizer.token_bytes(id), out);
    }

    /// Appends the text completed by `bytes` to `out`.
    pub fn push_bytes(&mut self, bytes: &[u8], out: &mut String) {
        if self.pending.is_empty() {
            // Fast path: nothing held back, decode straight from the input.
            let rest = drain_valid(bytes, out, false);
            self.pending.extend_from_slice(rest);
            return;
        }
        self.pending.extend_from_slice(bytes);
        let pending = std::mem::take(&mut self.pending);
        let rest = drain_valid(&pending, out, false);
        self.pending.extend_from_slice(rest);
    }

    /// Flushes held-back bytes (an incomplete character becomes U+FFFD) and resets.
    pub fn finish(&mut self, out: &mut String) {
        let pending = std::mem::take(&mut self.pending);
        drain_valid(&pending, out, true);
    }

    /// Bytes currently held back (an incomplete UTF-8 character, at most 3 bytes).
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }
}

/// Appends the longest decodable prefix of `bytes` to `out` (invalid sequences as U+FFFD)
/// and returns the incomplete tail, or nothing when `flush`.
fn drain_valid<'a>(mut bytes: &'a [u8], out: &mut String, flush: bool) -> &'a [u8] {
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return &[];
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                // SAFETY-free: `valid` was just validated by from_utf8.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        bytes = rest.get(bad..).unwrap_or_default();
                    }
                    None if flush => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        return &[];
                    }
                    None => return rest,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let t = unicode_to_byte();
        let mut seen = [false; 256];
        for b in t.iter().flatten() {
            assert!(!seen[usize::from(*b)]);
            seen[usize::from(*b)] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(t[0x120], Some(b' '));
        assert_eq!(t[0x10A], Some(b'\n'));
        assert_eq!(t[0x143], Some(0xAD));
        for b in 0..=255u8 {
            assert_eq!(t[byte_to_char(b) as usize], Some(b));
        }
    }

    #[test]
    fn stream_holds_back_partial_chars() {
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        let snow = "☃".as_bytes(); // E2 98 83
        d.push_bytes(b"a", &mut out);
        d.push_bytes(&snow[..1], &mut out);
        assert_eq!(out, "a");
        assert_eq!(d.pending(), &snow[..1]);
        d.push_bytes(&snow[1..2], &mut out);
        assert_eq!(out, "a");
        d.push_bytes(&snow[2..], &mut out);
        assert_eq!(out, "a☃");
        assert!(d.pending().is_empty());
        // invalid byte in the middle → U+FFFD, stream continues
        d.push_bytes(b"x\xFFy\xF0\x9F", &mut out);
        assert_eq!(out, "a☃x\u{FFFD}y");
        d.finish(&mut out);
        assert_eq!(out, "a☃x\u{FFFD}y\u{FFFD}");
        assert!(d.pending().is_empty());
    }
}
