//! TOTP (RFC 6238 over RFC 4226's HOTP): HMAC-SHA-1, 6 digits, 30 s steps from the Unix epoch,
//! what authenticator apps compute from an `otpauth://totp/…` URI. A code is taken within
//! [`SKEW`] steps either side of now (clock skew of the phone), and only for a step later than
//! the last one used: a code is accepted once.

use hmac::{Hmac, Mac as _};
use sha1::Sha1;

/// Seconds per time step.
pub const STEP: u64 = 30;
/// Digits of a code.
pub const DIGITS: u32 = 6;
/// Steps taken either side of now.
pub const SKEW: u64 = 1;
/// Bytes of a secret (160 bits, RFC 4226's recommendation for HMAC-SHA-1).
pub const SECRET_LEN: usize = 20;
/// The issuer in the URI and its label.
pub const ISSUER: &str = "Capybara";

/// HOTP (RFC 4226): the `digits`-digit code of `counter` under `secret`.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let off = usize::from(h[19] & 0x0f);
    let bin = u32::from_be_bytes([h[off] & 0x7f, h[off + 1], h[off + 2], h[off + 3]]);
    bin % 10u32.pow(digits)
}

/// The time step of Unix second `unix`.
pub const fn step_of(unix: u64) -> u64 {
    unix / STEP
}

/// The code of step `step`, as the 6 digits an app shows.
pub fn code_at_step(secret: &[u8], step: u64) -> String {
    format!("{:06}", hotp(secret, step, DIGITS))
}

/// The step within [`SKEW`] of `now_unix` whose code is `code`, if it is later than `last`
/// (the last step used). Every candidate is compared in constant time.
pub fn check(secret: &[u8], code: &str, now_unix: u64, last: Option<u64>) -> Option<u64> {
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_of(now_unix);
    let mut found = None;
    for step in now.saturating_sub(SKEW)..=now + SKEW {
        let same = crate::service::secrets::hashes_equal(&code_at_step(secret, step), code);
        if same && last.is_none_or(|l| step > l) && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// RFC 4648 base32 without padding (what `otpauth://` URIs carry).
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes RFC 4648 base32 (upper or lower case, padding and spaces ignored).
pub fn decode_base32(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 5 / 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.chars().filter(|c| *c != '=' && !c.is_whitespace()) {
        let v = match c.to_ascii_uppercase() {
            c @ 'A'..='Z' => c as u32 - 'A' as u32,
            c @ '2'..='7' => c as u32 - '2' as u32 + 26,
            _ => return None,
        };
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The secret in an `otpauth://` URI's `secret=` parameter.
pub fn secret_of_uri(uri: &str) -> Option<Vec<u8>> {
    let query = uri.split_once('?')?.1;
    let b32 = query.split('&').find_map(|kv| kv.strip_prefix("secret="))?;
    decode_base32(b32)
}

/// The `otpauth://totp/Capybara:alice?…` URI of `user`'s secret (user names are
/// `[a-z0-9._-]`: nothing to escape).
pub fn uri(user: &str, secret: &[u8]) -> String {
    format!(
        "otpauth://totp/{ISSUER}:{user}?secret={}&issuer={ISSUER}&algorithm=SHA1&digits={DIGITS}&period={STEP}",
        base32(secret)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1: the seed is the ASCII "12345678901234567890".
    const SEED: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_sha1_vectors() {
        for (t, code) in [
            (59u64, 94_287_082u32),
            (1_111_111_109, 7_081_804),
            (1_111_111_111, 14_050_471),
            (1_234_567_890, 89_005_924),
            (2_000_000_000, 69_279_037),
            (20_000_000_000, 65_353_130),
        ] {
            assert_eq!(hotp(SEED, step_of(t), 8), code, "T = {t}");
            // Six digits are the last six of eight (the same truncation, mod 10^6).
            assert_eq!(
                code_at_step(SEED, step_of(t)),
                format!("{:06}", code % 1_000_000)
            );
        }
    }

    #[test]
    fn rfc4226_hotp_vectors() {
        let want = [
            755_224, 287_082, 359_152, 969_429, 338_314, 254_676, 287_922, 162_583, 399_871,
            520_489,
        ];
        for (c, w) in want.into_iter().enumerate() {
            assert_eq!(hotp(SEED, c as u64, 6), w, "counter {c}");
        }
    }

    #[test]
    fn one_step_of_skew_either_side_and_no_more() {
        let t = 1_234_567_890;
        let s = step_of(t);
        for (d, ok) in [(-2i64, false), (-1, true), (0, true), (1, true), (2, false)] {
            let code = code_at_step(SEED, s.checked_add_signed(d).unwrap());
            assert_eq!(
                check(SEED, &code, t, None).is_some(),
                ok,
                "a code {d} steps off"
            );
        }
        assert_eq!(check(SEED, "12345", t, None), None);
        assert_eq!(check(SEED, "12345a", t, None), None);
    }

    #[test]
    fn a_code_is_taken_once_and_never_an_earlier_one_after_it() {
        let t = 1_234_567_890;
        let code = code_at_step(SEED, step_of(t));
        let used = check(SEED, &code, t, None).unwrap();
        assert_eq!(used, step_of(t));
        // The same code again (replay), and the previous step's, are refused.
        assert_eq!(check(SEED, &code, t + 1, Some(used)), None);
        let before = code_at_step(SEED, step_of(t) - 1);
        assert_eq!(check(SEED, &before, t, Some(used)), None);
        // The next step's is taken.
        let next = code_at_step(SEED, step_of(t) + 1);
        assert_eq!(check(SEED, &next, t + STEP, Some(used)), Some(used + 1));
    }

    #[test]
    fn base32_matches_rfc4648_and_the_uri_carries_it() {
        for (raw, b32) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32(raw.as_bytes()), b32);
        }
        assert_eq!(base32(SEED), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        for raw in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            assert_eq!(
                decode_base32(&base32(raw.as_bytes())).unwrap(),
                raw.as_bytes()
            );
        }
        assert_eq!(secret_of_uri(&uri("alice", SEED)).unwrap(), SEED);
        assert_eq!(decode_base32("MZ1"), None);
        assert_eq!(
            uri("alice", SEED),
            "otpauth://totp/Capybara:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=Capybara&algorithm=SHA1&digits=6&period=30"
        );
    }
}
