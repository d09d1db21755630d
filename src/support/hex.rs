//! Lowercase hexadecimal, two digits a byte: key hashes, passwords, identities, request ids and raw tracker frames.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lowercase hex (what `sha256sum` and `xxd -p` print).
pub fn encode(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_is_two_lowercase_digits_high_nibble_first() {
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
