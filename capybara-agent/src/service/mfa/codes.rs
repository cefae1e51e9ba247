//! Backup codes and one-time codes.
//!
//! - **Backup codes**: [`BACKUP_CODES`] per enrolment, each 10 characters of Crockford's
//!   base32 alphabet (50 bits; look-alikes typed read as the same code), shown once as `xxxxx-xxxxx`. Stored as argon2id
//!   hashes (RFC 9106) with [`ARGON2_M_KIB`] KiB of memory, [`ARGON2_T`] passes and one lane
//!   (OWASP's first recommended setting; ~40 ms a hash on one core of the development machine),
//!   under one random 16-byte salt per enrolment: a code typed in is hashed once and compared
//!   with every unused hash in constant time, so a wrong code costs one hash, not ten. A used
//!   code's hash is removed.
//! - **One-time codes** (e-mail, SMS): 6 random digits, valid [`ONE_TIME_VALID`], single use,
//!   kept in memory only (an agent restart voids them: ask for another) as an HMAC-SHA-256 under
//!   a key derived from the MFA sealing key, so even a memory dump does not give 6 digits away
//!   to a quick search without the key file.

use std::time::Duration;

use argon2::{Algorithm, Argon2, Params, Version};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::service::secrets::hashes_equal;

/// Backup codes per enrolment.
pub const BACKUP_CODES: usize = 10;
/// argon2id memory, KiB (19 MiB).
pub const ARGON2_M_KIB: u32 = 19_456;
/// argon2id passes.
pub const ARGON2_T: u32 = 2;
/// How long a one-time code sent by e-mail or SMS is valid.
pub const ONE_TIME_VALID: Duration = Duration::from_secs(10 * 60);
/// At most one code sent per user within this long.
pub const SEND_INTERVAL: Duration = Duration::from_secs(60);

/// The backup-code alphabet: Crockford's base32 in lower case (digits and letters without
/// `i l o u`; a typed `o` reads as `0`, `i` and `l` as `1`).
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Ten new backup codes as shown (`xxxxx-xxxxx`), the salt and their hashes (hex) to store.
pub fn new_backup_codes() -> (Vec<String>, String, Vec<String>) {
    let salt: [u8; 16] = rand::random();
    let codes: Vec<String> = (0..BACKUP_CODES)
        .map(|_| {
            let s: String = (0..10)
                .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
                .collect();
            format!("{}-{}", &s[..5], &s[5..])
        })
        .collect();
    let hashes = codes
        .iter()
        .map(|c| hash_backup(&normalize(c), &salt))
        .collect();
    (codes, hex(&salt), hashes)
}

/// A code as typed, without spaces and dashes, in lower case.
pub fn normalize(code: &str) -> String {
    code.chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .flat_map(char::to_lowercase)
        .map(|c| match c {
            'o' => '0',
            'i' | 'l' => '1',
            c => c,
        })
        .collect()
}

/// Whether a normalized code has the shape of a backup code.
pub fn is_backup_shape(code: &str) -> bool {
    code.len() == 10 && code.bytes().all(|b| ALPHABET.contains(&b))
}

fn hash_backup(code: &str, salt: &[u8]) -> String {
    let params = Params::new(ARGON2_M_KIB, ARGON2_T, 1, Some(32)).expect("valid argon2 params");
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(code.as_bytes(), salt, &mut out)
        .expect("argon2 hashes a short code");
    hex(&out)
}

/// The index of the stored hash `code` (normalized) matches, if any: one hash, every stored one
/// compared in constant time.
pub fn match_backup(code: &str, salt_hex: &str, hashes: &[String]) -> Option<usize> {
    let salt = unhex(salt_hex)?;
    let h = hash_backup(code, &salt);
    let mut found = None;
    for (i, stored) in hashes.iter().enumerate() {
        if hashes_equal(&h, stored) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// A new one-time code (6 digits).
pub fn new_one_time_code() -> String {
    format!("{:06}", rand::random_range(0..1_000_000u32))
}

/// The hash a one-time code is kept as: HMAC-SHA-256 under `key` of the user, the channel and
/// the code.
pub fn one_time_hash(key: &[u8; 32], user: &str, channel: &str, code: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for part in [user, channel, code] {
        mac.update(part.as_bytes());
        mac.update(&[0]);
    }
    hex(&mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_codes_match_once_each_and_only_their_own() {
        let (codes, salt, mut hashes) = new_backup_codes();
        assert_eq!(codes.len(), BACKUP_CODES);
        assert_eq!(hashes.len(), BACKUP_CODES);
        assert!(
            codes
                .iter()
                .all(|c| c.len() == 11 && c.as_bytes()[5] == b'-')
        );
        // Stored hashes are not the codes.
        assert!(
            hashes
                .iter()
                .all(|h| !codes.iter().any(|c| h.contains(&normalize(c))))
        );
        // Typed with spaces, capitals or no dash: the same code.
        let typed = format!(" {} ", codes[3].to_uppercase().replace('-', " "));
        let n = normalize(&typed);
        assert!(is_backup_shape(&n));
        let i = match_backup(&n, &salt, &hashes).unwrap();
        assert_eq!(i, 3);
        hashes.remove(i);
        // Used: it matches nothing any more.
        assert_eq!(match_backup(&n, &salt, &hashes), None);
        assert_eq!(match_backup("2345678abc", &salt, &hashes), None);
        // Another enrolment's salt: no match.
        let (_, other_salt, _) = new_backup_codes();
        assert_eq!(
            match_backup(&normalize(&codes[0]), &other_salt, &hashes),
            None
        );
    }

    #[test]
    fn one_time_hashes_bind_user_channel_and_key() {
        let k = [7; 32];
        let h = one_time_hash(&k, "alice", "email", "123456");
        assert_eq!(h, one_time_hash(&k, "alice", "email", "123456"));
        assert_ne!(h, one_time_hash(&k, "alice", "sms", "123456"));
        assert_ne!(h, one_time_hash(&k, "bob", "email", "123456"));
        assert_ne!(h, one_time_hash(&[8; 32], "alice", "email", "123456"));
        let c = new_one_time_code();
        assert!(c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit()));
    }
}
