//! Random bytes from the kernel (`getrandom`), for keys, passwords and identities: one source, whose failure is
//! an error the caller reports, never a silent run of zeros.

use std::io;

/// `N` random bytes.
pub fn bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(format!("could not read random bytes: {e}")))?;
    Ok(bytes)
}

/// `N` random bytes as `2 * N` lowercase hex digits.
pub fn hex<const N: usize>() -> io::Result<String> {
    bytes::<N>().map(|b| super::hex::encode(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_draws_differ_and_hex_has_two_digits_a_byte() {
        let (a, b) = (hex::<16>().unwrap(), hex::<16>().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
