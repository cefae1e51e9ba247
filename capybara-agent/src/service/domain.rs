//! Domain types of users, devices, tokens and the audit trail, and the parsers that make them.
//!
//! Input is parsed once, at the edge (API conversions, CLI), into these validated types; every
//! error names the field it came from ([`ValidationError::field`]) so the API can answer
//! `INVALID_ARGUMENT` with the field and the CLI can print one line and exit 2.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use capybara_common::peer::PeerId;
use serde::{Deserialize, Serialize};

/// Longest user, device or token name.
pub const MAX_NAME_LEN: usize = 32;

/// Input that does not make a valid domain value. Each variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A name is empty, too long, or has characters outside `[a-z0-9._-]` (or starts with
    /// something other than a letter or digit).
    #[error("{field}: invalid name {value:?}: {reason}")]
    Name {
        /// The field.
        field: &'static str,
        /// The input.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A protocol other than `wireguard`, `shadowsocks` or `vless`.
    #[error("{field}: unknown protocol {value:?} (expected wireguard, shadowsocks or vless)")]
    Protocol {
        /// The field.
        field: &'static str,
        /// The input.
        value: String,
    },
    /// A scope other than `read`, `write` or `admin`.
    #[error("{field}: unknown scope {value:?} (expected read, write or admin)")]
    Scope {
        /// The field.
        field: &'static str,
        /// The input.
        value: String,
    },
    /// A duration that is not `<number><s|m|h|d|w>` (e.g. `30d`) or is zero.
    #[error("{field}: invalid duration {value:?} (expected e.g. 30d, 12h, 90m)")]
    Duration {
        /// The field.
        field: &'static str,
        /// The input.
        value: String,
    },
    /// A timestamp in the past or out of range.
    #[error("{field}: {reason}")]
    Time {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A token id that is not 16 lowercase hex digits.
    #[error("{field}: invalid token id {value:?} (expected 16 hex digits)")]
    TokenId {
        /// The field.
        field: &'static str,
        /// The input.
        value: String,
    },
    /// A WireGuard key that is not 32 bytes of base64.
    #[error("{field}: invalid key (expected 32 bytes, base64)")]
    Key {
        /// The field.
        field: &'static str,
    },
    /// A blocklist name or entry that is not valid.
    #[error("{field}: {source}")]
    Blocklist {
        /// The field.
        field: &'static str,
        /// What the blocklist parser said (it names the entry).
        #[source]
        source: crate::blocklist::BlocklistError,
    },
    /// Not an ISO 3166-1 alpha-2 country code.
    #[error("{field}: {value:?} is not an ISO 3166-1 alpha-2 country code")]
    Country {
        /// The field.
        field: &'static str,
        /// The input.
        value: String,
    },
    /// A required field is empty or unspecified.
    #[error("{field}: required")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// Any other value that is not acceptable; `reason` says why (and quotes the input).
    #[error("{field}: {reason}")]
    Value {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither of two fields of which exactly one is required was given.
    #[error("{field}: required (or {or})")]
    MissingEither {
        /// The field named first.
        field: &'static str,
        /// The other one.
        or: &'static str,
    },
    /// Two fields that exclude each other were both given.
    #[error("{field}: give either {field} or {other}, not both")]
    Conflict {
        /// The field.
        field: &'static str,
        /// The field it excludes.
        other: &'static str,
    },
    /// A connection (session) id that is not 16 hex digits, `-`, 8 hex digits.
    #[error(
        "{field}: invalid connection id {value:?} (expected 16 hex digits, '-', 8 hex digits, \
         as `capybara connections` shows it)"
    )]
    SessionId {
        /// The field.
        field: &'static str,
        /// The input.
        value: String,
    },
    /// A policy value (rate, size, window, zone, …) that does not parse.
    #[error("{field}: {source}")]
    Policy {
        /// The field.
        field: &'static str,
        /// What the policy parser said (it quotes the input).
        #[source]
        source: PolicyValueError,
    },
}

impl ValidationError {
    /// The field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            ValidationError::Name { field, .. }
            | ValidationError::Scope { field, .. }
            | ValidationError::Duration { field, .. }
            | ValidationError::Time { field, .. }
            | ValidationError::TokenId { field, .. }
            | ValidationError::Key { field }
            | ValidationError::Country { field, .. }
            | ValidationError::Blocklist { field, .. }
            | ValidationError::Missing { field }
            | ValidationError::Value { field, .. }
            | ValidationError::MissingEither { field, .. }
            | ValidationError::Conflict { field, .. }
            | ValidationError::SessionId { field, .. }
            | ValidationError::Policy { field, .. }
            | ValidationError::Protocol { field, .. } => field,
        }
    }
}

fn check_name(field: &'static str, s: &str) -> Result<(), ValidationError> {
    let bad = |reason| ValidationError::Name {
        field,
        value: s.to_owned(),
        reason,
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(bad("longer than 32 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("only a-z, 0-9, '.', '_' and '-' are allowed"));
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $t:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $t(String);

        impl $t {
            /// Parses `s`, given in `field`.
            pub fn parse(field: &'static str, s: &str) -> Result<$t, ValidationError> {
                check_name(field, s)?;
                Ok($t(s.to_owned()))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $t {
            type Error = ValidationError;
            fn try_from(s: String) -> Result<$t, ValidationError> {
                $t::parse("name", &s)
            }
        }

        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

name_type!(
    /// A user name: 1–32 of `[a-z0-9._-]`, starting with a letter or digit (it appears in store
    /// keys, file names and configs, so nothing that needs quoting).
    UserName
);
name_type!(
    /// A device name, same rules as [`UserName`].
    DeviceName
);

impl DeviceName {
    /// The device a user's first device is called when none is given.
    pub fn default_device() -> DeviceName {
        DeviceName("default".to_owned())
    }
}

/// What a token may do. Ordered: `Read < Write < Admin`; a token may call an RPC whose
/// required scope is at most its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Reads only.
    Read,
    /// Reads and changes to users, devices, lists and connections.
    Write,
    /// Everything, including tokens.
    Admin,
}

impl Scope {
    /// Parses `read`, `write` or `admin`, given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<Scope, ValidationError> {
        match s {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            _ => Err(ValidationError::Scope {
                field,
                value: s.to_owned(),
            }),
        }
    }

    /// The lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    /// Whether a holder of `self` may do what needs `required`.
    pub fn allows(self, required: Scope) -> bool {
        self >= required
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a positive duration `<n><unit>` with unit `s`, `m`, `h`, `d` or `w`, given in
/// `field` (e.g. `--expires 30d`).
pub fn parse_duration(field: &'static str, s: &str) -> Result<Duration, ValidationError> {
    let bad = || ValidationError::Duration {
        field,
        value: s.to_owned(),
    };
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(unit_at);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(secs) if secs > 0 && secs <= MAX_EXPIRY_AHEAD.as_secs() => {
            Ok(Duration::from_secs(secs))
        }
        _ => Err(bad()),
    }
}

/// A token's id: 16 lowercase hex digits, public (it appears in lists and audit records).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenId(String);

impl TokenId {
    /// Parses `s`, given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<TokenId, ValidationError> {
        if s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(TokenId(s.to_owned()))
        } else {
            Err(ValidationError::TokenId {
                field,
                value: s.to_owned(),
            })
        }
    }

    /// A new random id.
    pub fn random() -> TokenId {
        let b: [u8; 8] = rand::random();
        TokenId(b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TokenId {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<TokenId, ValidationError> {
        TokenId::parse("id", &s)
    }
}

impl From<TokenId> for String {
    fn from(t: TokenId) -> String {
        t.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The id of a session (a device's connection), stable for the session's life and kept by its
/// history record: `capybara connections` shows it while the session is open, `history` after.
///
/// It is the session's store key (`session/<start ns>/<peer id>`, `store::keys::session`)
/// written in URL-safe form: the start in Unix nanoseconds as 16 lowercase hex digits, `-`, the
/// dataplane peer id as 8, e.g. `187e9c5b3a2f1d00-0000002a` (25 characters, no lookup table:
/// [`SessionId::key`] and [`SessionId::from_key`] convert in O(1), one to one; ids sort like
/// the keys, by start). Only that canonical form parses. Records written before ids existed
/// hold their key in `id`; both forms read back as the same id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId {
    /// The session's start, Unix nanoseconds.
    pub start_ns: u64,
    /// The dataplane peer id the device had.
    pub peer: PeerId,
}

impl SessionId {
    /// Parses the canonical text form `s`, given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<SessionId, ValidationError> {
        let bad = || ValidationError::SessionId {
            field,
            value: s.chars().take(64).collect(),
        };
        let hex = |t: &str| {
            t.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                .then(|| u64::from_str_radix(t, 16).ok())
                .flatten()
        };
        match s.split_once('-') {
            Some((start, peer)) if start.len() == 16 && peer.len() == 8 => Ok(SessionId {
                start_ns: hex(start).ok_or_else(bad)?,
                peer: PeerId::try_from(hex(peer).ok_or_else(bad)?).map_err(|_| bad())?,
            }),
            _ => Err(bad()),
        }
    }

    /// The session's key in the store.
    pub fn key(&self) -> String {
        crate::store::keys::session(self.start_ns, self.peer)
    }

    /// The id of the store key `key`, if it is a session's (exactly as `store::keys::session`
    /// writes them).
    pub fn from_key(key: &str) -> Option<SessionId> {
        let (start, peer) = key
            .strip_prefix(crate::store::keys::SESSIONS_PREFIX)?
            .split_once('/')?;
        let digits = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(start, 20) || !digits(peer, 10) {
            return None;
        }
        Some(SessionId {
            start_ns: start.parse().ok()?,
            peer: peer.parse().ok()?,
        })
    }
}

impl TryFrom<String> for SessionId {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<SessionId, ValidationError> {
        SessionId::from_key(&s).map_or_else(|| SessionId::parse("id", &s), Ok)
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> String {
        id.to_string()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:08x}", self.start_ns, self.peer)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// A WireGuard (x25519) public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses base64 `s`, given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<PublicKey, ValidationError> {
        decode_key(s)
            .map(PublicKey)
            .ok_or(ValidationError::Key { field })
    }
}

/// 32 bytes from standard base64, if that is what `s` is.
pub fn decode_key(s: &str) -> Option<[u8; 32]> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()?
        .try_into()
        .ok()
}

/// Standard base64, as WireGuard writes keys.
pub fn encode_key(k: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

impl TryFrom<String> for PublicKey {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<PublicKey, ValidationError> {
        PublicKey::parse("public_key", &s)
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        encode_key(&k.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_key(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The time `secs` seconds after the Unix epoch.
pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Parses a country code given in `field`.
pub fn country(field: &'static str, s: &str) -> Result<crate::geo::CountryCode, ValidationError> {
    crate::geo::CountryCode::parse(s).map_err(|_| ValidationError::Country {
        field,
        value: s.to_owned(),
    })
}

/// A protocol a user may connect with. WireGuard devices are [`Peer`]s; a user's Shadowsocks
/// and VLESS access is one proxy identity per protocol (`crate::proxy`), with a dense id of the
/// same id space as devices, so its kernel line carries the user's policy as a device's does.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// WireGuard (the tunnel, `crate::tunnel`); what records written before proxies say.
    #[default]
    Wireguard,
    /// Shadowsocks (AEAD), `crate::proxy::shadowsocks`.
    Shadowsocks,
    /// VLESS over TLS, `crate::proxy::vless`.
    Vless,
}

impl Protocol {
    /// Every protocol, in the order they are listed.
    pub const ALL: [Protocol; 3] = [Protocol::Wireguard, Protocol::Shadowsocks, Protocol::Vless];

    /// Parses `wireguard`, `shadowsocks` or `vless`, given in `field`.
    pub fn parse(field: &'static str, s: &str) -> Result<Protocol, ValidationError> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ValidationError::Protocol {
                field,
                value: s.to_owned(),
            })
    }

    /// The name used in the CLI, the API, history and webhooks.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Wireguard => "wireguard",
            Protocol::Shadowsocks => "shadowsocks",
            Protocol::Vless => "vless",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The name (also the store key).
    pub name: UserName,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Account expiry, Unix seconds; `None` = never.
    pub expires_at: Option<u64>,
}

/// A device of a user: one WireGuard peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Dense dataplane id (`0..MAX_PEERS`), stable for the peer's life.
    pub id: PeerId,
    /// Owner.
    pub user: UserName,
    /// Device name, unique per user.
    pub device: DeviceName,
    /// The client's public key.
    pub public_key: PublicKey,
    /// Inner IPv4 address (allowed IP `/32`).
    pub ipv4: Ipv4Addr,
    /// Inner IPv6 address (allowed IP `/128`).
    pub ipv6: Ipv6Addr,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Whether the client's private key is kept (encrypted) so its config can be shown again.
    pub key_kept: bool,
}

/// A user with its devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDetail {
    /// The user.
    pub user: User,
    /// Its devices, by device name.
    pub peers: Vec<Peer>,
    /// Its proxy identities (Shadowsocks, VLESS), by protocol.
    #[serde(default)]
    pub proxies: Vec<ProxyAccess>,
}

impl UserDetail {
    /// The protocols the user can connect with: `wireguard` while it has a device, then its
    /// proxy identities' protocols, in [`Protocol::ALL`] order.
    pub fn protocols(&self) -> Vec<Protocol> {
        Protocol::ALL
            .into_iter()
            .filter(|p| match p {
                Protocol::Wireguard => !self.peers.is_empty(),
                _ => self.proxies.iter().any(|x| x.protocol == *p),
            })
            .collect()
    }
}

/// A user's access by a proxy protocol (a proxy identity, `service::proxies`), as listed:
/// never its credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyAccess {
    /// Dense dataplane id, from the same id space as devices (its kernel line).
    pub id: PeerId,
    /// Owner.
    pub user: UserName,
    /// `shadowsocks` or `vless`.
    pub protocol: Protocol,
    /// Creation time, Unix seconds.
    pub created_at: u64,
}

/// What a client needs to connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// The device.
    pub peer: Peer,
    /// The client's private key (base64); present only when just generated or kept.
    pub private_key: Option<String>,
    /// The server's public key.
    pub server_public_key: PublicKey,
    /// `host:port` the client connects to.
    pub endpoint: String,
    /// DNS servers for the client.
    pub dns: Vec<String>,
    /// The complete wg-quick file.
    pub wg_quick: String,
}

/// An API token as listed: never its secret or hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Public id (the first part of the bearer string).
    pub id: TokenId,
    /// A label for people.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Expiry, Unix seconds; `None` = never.
    pub expires_at: Option<u64>,
    /// Revocation time, Unix seconds; `None` = valid.
    pub revoked_at: Option<u64>,
    /// The one user the token may act on and see (`None`: every user its scope allows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
}

/// Who made a change (or a request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Actor {
    /// A local user on the Unix socket, identified by its peer credentials.
    Local {
        /// The uid.
        uid: u32,
    },
    /// A bearer token.
    Token {
        /// The token's id.
        id: TokenId,
        /// Its scope.
        scope: Scope,
    },
    /// The agent itself (start-up reconciliation, expiry).
    Agent,
    /// A scheduled task running its command (`service::schedules`). Only an admin may add a
    /// task, so a task acts with the admin scope of whoever added it.
    Schedule {
        /// The task's id.
        id: u64,
    },
}

impl Actor {
    /// The scope the actor holds: root on the socket is admin.
    pub fn scope(&self) -> Scope {
        match self {
            Actor::Local { .. } | Actor::Agent | Actor::Schedule { .. } => Scope::Admin,
            Actor::Token { scope, .. } => *scope,
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Local { uid } => write!(f, "uid:{uid}"),
            Actor::Token { id, .. } => write!(f, "token:{id}"),
            Actor::Agent => f.write_str("agent"),
            Actor::Schedule { id } => write!(f, "schedule:{id}"),
        }
    }
}

/// One audit record: who changed what, before and after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, increasing.
    pub seq: u64,
    /// When, Unix seconds.
    pub at: u64,
    /// Who ([`Actor`]'s display form: `uid:0`, `token:<id>`, `agent`, `schedule:<id>`).
    pub actor: String,
    /// What, e.g. `user.add`, `token.revoke`.
    pub action: String,
    /// On what, e.g. `user:alice`, `peer:alice/laptop`, `token:<id>`.
    pub target: String,
    /// The object before (JSON), if it existed.
    pub before: Option<serde_json::Value>,
    /// The object after (JSON), if it exists.
    pub after: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_the_store_key_in_url_safe_form_one_to_one() {
        let id = SessionId {
            start_ns: 1_765_073_784_123_456_789,
            peer: 42,
        };
        let text = id.to_string();
        assert_eq!(text, "187ecd4141087d15-0000002a");
        assert_eq!(SessionId::parse("connection", &text), Ok(id));
        assert_eq!(id.key(), "session/01765073784123456789/0000000042");
        assert_eq!(SessionId::from_key(&id.key()), Some(id));
        for extreme in [
            SessionId {
                start_ns: 0,
                peer: 0,
            },
            SessionId {
                start_ns: u64::MAX,
                peer: u32::MAX,
            },
        ] {
            let t = extreme.to_string();
            assert_eq!(t.len(), 25);
            assert_eq!(SessionId::parse("connection", &t), Ok(extreme));
            assert_eq!(SessionId::from_key(&extreme.key()), Some(extreme));
        }
        // Ids sort like keys: by start.
        let later = SessionId {
            start_ns: id.start_ns + 1,
            peer: 1,
        };
        assert!(id.to_string() < later.to_string() && id.key() < later.key());
        // Only the canonical form parses, naming the field.
        for bad in [
            "",
            "187ECD4141087D15-0000002A",
            "187ecd4141087d15_0000002a",
            "187ecd4141087d15-2a",
            "87ecd4141087d15-0000002a",
            "187ecd4141087d15-0000002a-",
            "187ecd4141087d1g-0000002a",
            "+87ecd4141087d15-0000002a",
            "session/01765073784123456789/0000000042",
            "187ecd4141087d15-0000002a0",
        ] {
            let e = SessionId::parse("connection", bad).unwrap_err();
            assert_eq!(e.field(), "connection");
            assert!(
                e.to_string()
                    .starts_with("connection: invalid connection id"),
                "{e}"
            );
        }
        for bad in ["session/1/2", "session/01765073784123456789/42", "auth/1/2"] {
            assert_eq!(SessionId::from_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn session_ids_serialise_as_ids_and_read_stored_keys_too() {
        let id = SessionId {
            start_ns: 5,
            peer: 7,
        };
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"0000000000000005-00000007\""
        );
        for stored in [
            "\"0000000000000005-00000007\"",
            "\"session/00000000000000000005/0000000007\"",
        ] {
            assert_eq!(serde_json::from_str::<SessionId>(stored).unwrap(), id);
        }
        assert!(serde_json::from_str::<SessionId>("\"session/5/7\"").is_err());
    }

    #[test]
    fn names_are_validated_naming_the_field() {
        for ok in ["alice", "a", "bob.smith", "x-1_2", "0day"] {
            UserName::parse("name", ok).unwrap();
        }
        for bad in ["", "Alice", "-x", ".x", "a b", "a/b", "é", &"a".repeat(33)] {
            let e = UserName::parse("name", bad).unwrap_err();
            assert_eq!(e.field(), "name");
            assert!(e.to_string().starts_with("name: invalid name"), "{e}");
        }
        let e = DeviceName::parse("device", "Lap Top").unwrap_err();
        assert_eq!(e.field(), "device");
    }

    #[test]
    fn serde_refuses_invalid_names() {
        assert!(serde_json::from_str::<UserName>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<UserName>("\"not/ok\"").is_err());
    }

    #[test]
    fn scopes_are_ordered() {
        assert!(Scope::Admin.allows(Scope::Write));
        assert!(Scope::Write.allows(Scope::Read));
        assert!(Scope::Read.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Write));
        assert!(!Scope::Write.allows(Scope::Admin));
        assert_eq!(Scope::parse("scope", "write").unwrap(), Scope::Write);
        assert_eq!(Scope::parse("scope", "root").unwrap_err().field(), "scope");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            parse_duration("expires", "30d").unwrap().as_secs(),
            30 * 86_400
        );
        assert_eq!(
            parse_duration("expires", "2w").unwrap().as_secs(),
            14 * 86_400
        );
        assert_eq!(parse_duration("expires", "90m").unwrap().as_secs(), 5400);
        for bad in [
            "",
            "30",
            "d",
            "0d",
            "3x",
            "-1d",
            "1.5d",
            "99999999999999999999d",
        ] {
            assert_eq!(
                parse_duration("expires", bad).unwrap_err().field(),
                "expires",
                "{bad}"
            );
        }
    }

    #[test]
    fn token_ids_and_keys_parse() {
        let id = TokenId::random();
        assert_eq!(TokenId::parse("id", id.as_str()).unwrap(), id);
        assert!(TokenId::parse("id", "xyz").is_err());
        assert!(TokenId::parse("id", "ABCDEF0123456789").is_err());
        let k = PublicKey([7; 32]);
        assert_eq!(PublicKey::parse("k", &k.to_string()).unwrap(), k);
        assert_eq!(
            PublicKey::parse("public_key", "AAAA").unwrap_err(),
            ValidationError::Key {
                field: "public_key"
            }
        );
    }

    #[test]
    fn an_expiry_is_between_now_and_a_hundred_years_ahead() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        assert_eq!(expiry("expires_at", None), Ok(None));
        assert!(expiry("expires_at", Some(now + day)).unwrap().is_some());
        assert!(expiry("expires_at", Some(now + MAX_EXPIRY_AHEAD - day)).is_ok());
        for (at, reason) in [
            (now - day, "is in the past"),
            (now + MAX_EXPIRY_AHEAD + day, "too far in the future"),
            (from_unix_secs(253_402_300_800), "too far in the future"),
        ] {
            assert_eq!(
                expiry("expires_at", Some(at)),
                Err(ValidationError::Time {
                    field: "expires_at",
                    reason
                })
            );
        }
    }

    /// `from_yaml`'s error for `text` as a `PolicyDoc`, and how long the refusal took.
    fn refused(text: &str) -> (ValidationError, Duration) {
        let t = std::time::Instant::now();
        let e = crate::service::policy_file::doc::PolicyDoc::from_yaml(text).unwrap_err();
        (e, t.elapsed())
    }

    #[test]
    fn a_document_over_the_size_limit_is_refused_before_parsing() {
        let mut text = String::from("default: {}\n#");
        text.push_str(&"x".repeat(MAX_YAML_BYTES - text.len()));
        crate::service::policy_file::doc::PolicyDoc::from_yaml(&text).unwrap();
        text.push('x');
        let (e, took) = refused(&text);
        eprintln!("size bomb refused in {took:?}");
        assert_eq!(e.field(), "file");
        assert_eq!(
            e.to_string(),
            "file: the document is larger than 16 MiB (16777216 bytes), the most a policy file or \
             template may be"
        );
    }

    #[test]
    fn a_billion_laughs_is_refused_quickly_by_serde_yamls_repetition_limit() {
        // 9 levels of 9 aliases each: 9⁹ ≈ 387 million strings once expanded.
        let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..=9 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [{}]\n",
                vec![format!("*a{p}"); 9].join(", ")
            ));
        }
        // serde_yaml stops it by itself (we rely on that, so it is pinned here)…
        let t = std::time::Instant::now();
        let e = serde_yaml::from_str::<serde_yaml::Value>(&text).unwrap_err();
        eprintln!("billion laughs refused by serde_yaml in {:?}", t.elapsed());
        assert_eq!(e.to_string(), "repetition limit exceeded");
        // …and we say so clearly, wherever in the file it is.
        text.push_str("users: {alice: {devices: *a9}}\n");
        let (e, took) = refused(&text);
        eprintln!("billion laughs refused in {took:?}");
        assert_eq!(e.field(), "file");
        assert!(
            e.to_string()
                .starts_with("file: its aliases are used too often (more than 100 alias uses"),
            "{e}"
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn aliases_expanding_past_the_value_limit_are_refused() {
        // Each alias stays under serde_yaml's repetition limit (1 100 uses for ≈ 5 000 events),
        // but every use copies 4 000 devices: 4.4 million values once expanded.
        let devices = vec!["a"; 4000].join(", ");
        let mut text = format!("users:\n  u0: &u {{devices: [{devices}]}}\n");
        for i in 1..1100 {
            text.push_str(&format!("  u{i}: *u\n"));
        }
        let (e, took) = refused(&text);
        eprintln!("alias fan-out refused in {took:?}");
        assert_eq!(e.field(), "file");
        assert_eq!(
            e.to_string(),
            "file: more than 4000000 values with its aliases expanded (an alias bomb?)"
        );
        // Aliases that stay under the limit are fine.
        let ok = "groups:\n  a: {limits: &std {bandwidth: 10mbit}}\n  b: {limits: *std}\n";
        let d = crate::service::policy_file::doc::PolicyDoc::from_yaml(ok).unwrap();
        assert_eq!(d.groups.len(), 2);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let n = 10_000;
        let bombs = [
            format!("{}{}", "[".repeat(n), "]".repeat(n)),
            format!("{}a", "- ".repeat(n)),
            format!("{}a: b{}", "{a: ".repeat(n), "}".repeat(n)),
            format!(
                "users:\n  alice:\n    devices: {}{}",
                "[".repeat(n),
                "]".repeat(n)
            ),
        ];
        // A quarter of a tokio worker's stack (2 MiB), where the agent parses.
        let handle = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || bombs.map(|b| refused(&b)))
            .unwrap();
        for (e, took) in handle.join().unwrap() {
            eprintln!("nesting bomb refused in {took:?}: {e}");
            assert_eq!(e.field(), "file");
            assert!(
                e.to_string().ends_with("nested deeper than 128 levels"),
                "{e}"
            );
        }
    }
}

/// How far ahead an expiry may be: 100 years, the bound tokens' `expires_in_secs` and
/// [`parse_duration`] (`--expires 30d`) keep too. Every stored expiry is therefore a time
/// RFC 3339 can show (before year 10 000: one in year 10 000 once made `user list` panic).
pub const MAX_EXPIRY_AHEAD: Duration = Duration::from_secs(100 * 365 * 86_400);

/// An expiry given in `field` as seconds since the epoch; one in the past, or more than
/// [`MAX_EXPIRY_AHEAD`] from now, is refused.
pub fn expiry(field: &'static str, at: Option<SystemTime>) -> Result<Option<u64>, ValidationError> {
    let now = SystemTime::now();
    match at {
        Some(t) if t <= now => Err(ValidationError::Time {
            field,
            reason: "is in the past",
        }),
        Some(t) if t.duration_since(now).is_ok_and(|d| d > MAX_EXPIRY_AHEAD) => {
            Err(ValidationError::Time {
                field,
                reason: "too far in the future",
            })
        }
        t => Ok(t.map(unix_secs)),
    }
}

/// Why a policy value is invalid. Each variant carries the input as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyValueError {
    /// A rate that does not parse (see [`crate::units::Rate`]).
    #[error(transparent)]
    Rate(#[from] crate::units::RateError),
    /// Not a number with an optional byte unit.
    #[error("invalid size {input:?}: expected e.g. 100GB, 1.5TB, 500MiB")]
    ByteSize {
        /// The input.
        input: String,
    },
    /// Not a percentage 0–100.
    #[error("invalid percentage {input:?}: expected 0% to 100%")]
    Percent {
        /// The input.
        input: String,
    },
    /// Not one of the periods.
    #[error("invalid period {input:?}: expected daily, weekly, monthly or none")]
    Period {
        /// The input.
        input: String,
    },
    /// Not `DAYS HH:MM-HH:MM`.
    #[error("invalid window {input:?}: {reason} (expected e.g. \"Mon-Fri 08:00-18:00\")")]
    Window {
        /// The input.
        input: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Not a duration of at most 24 h.
    #[error("invalid online time {input:?}: expected e.g. 8h, 90m, 1h30m (at most 24h)")]
    OnlineTime {
        /// The input.
        input: String,
    },
    /// Not an IANA time zone name.
    #[error("unknown time zone {input:?}: expected an IANA name such as Europe/Berlin or UTC")]
    Zone {
        /// The input.
        input: String,
    },
    /// A policy document that does not parse (YAML syntax, a wrong type, an unknown field, or a
    /// bad value inside it).
    #[error("line {line} column {column}: {reason}")]
    Document {
        /// 1-based line (0 = unknown).
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the YAML parser said (it names the field path and quotes the value).
        reason: String,
    },
    /// A policy document over one of [`from_yaml`]'s limits (size, aliases).
    #[error("{reason}")]
    DocumentLimit {
        /// Which limit, and by how much if known.
        reason: String,
    },
    /// Not a log level.
    #[error("invalid log level {input:?}: expected error, warn, info, debug or trace")]
    LogLevel {
        /// The input.
        input: String,
    },
    /// Not a maximum age such as `90d`.
    #[error("invalid age {input:?}: expected e.g. 90d, 12h")]
    MaxAge {
        /// The input.
        input: String,
    },
    /// Not an IP address.
    #[error("invalid address {input:?}: expected an IPv4 or IPv6 address")]
    Address {
        /// The input.
        input: String,
    },
    /// Not a positive whole number (or `unlimited`).
    #[error("invalid count {input:?}: expected a whole number from 1 to {max} or unlimited")]
    Count {
        /// The input.
        input: String,
        /// The largest allowed value.
        max: u32,
    },
}

/// The largest policy file or configuration template [`from_yaml`] takes: 16 MiB, twice the
/// 7.2 MiB (7 591 425 bytes, 540 072 lines) of an exported policy file for 100 000 users (two
/// devices each, every tenth with its own limit, ten groups of 10 000 members with limits).
pub const MAX_YAML_BYTES: usize = 16 << 20;

/// The most values (scalars, sequences and mappings) a document may have with its aliases
/// expanded: 4 million, 5 times the 780 145 of that 100 000-user file. It bounds what
/// aliases can make of a small document (and the memory of the parsed result).
pub const MAX_YAML_VALUES: u64 = 4_000_000;

/// The deepest nesting: serde_yaml's own recursion limit, which [`from_yaml`] relies on.
pub const MAX_YAML_DEPTH: usize = 128;

/// Parses a YAML document into `T`; an error names the line, the column and the field path
/// (field `file`).
///
/// Policy files and templates come from files and over the API, so the YAML bombs are refused
/// with a [`PolicyValueError::DocumentLimit`] (or, for nesting, a located
/// [`PolicyValueError::Document`]) before they cost more than a bounded amount of time and
/// memory:
/// - size: more than [`MAX_YAML_BYTES`] is refused before parsing (serde_yaml holds every event of
///   a document in memory before it deserializes anything);
/// - aliases ("billion laughs"): a first pass walks the document as untyped values with its
///   aliases expanded and stops at [`MAX_YAML_VALUES`]. serde_yaml stops the exponential kind
///   itself (more than 100 alias uses per event of the document: "repetition limit exceeded");
///   the count stops the quadratic kind under that limit (a thousand aliases of a list of
///   thousands), which the typed parse would otherwise build in full;
/// - nesting: serde_yaml refuses more than [`MAX_YAML_DEPTH`] levels ("recursion limit
///   exceeded"), in both passes, on ≈ 2–4 KiB of stack per level in a debug build (10 000
///   levels are refused on a 512 KiB stack, a quarter of a tokio worker's; 256 KiB overflows);
///   its parser (libyaml) keeps its nesting on the heap. Flow nesting (`[`, `{`) is refused
///   before libyaml sees it ([`flow_too_deep`]); block nesting (`- - - …`) costs libyaml
///   ≈ 1 µs a level (debug), 8 s for 16 MiB of `- ` in a debug build.
///
/// Measured (debug build, tests below): the 16 MiB + 1 byte document is refused in microseconds;
/// a billion laughs in under a millisecond; 1 100 aliases of 4 000 devices (4.4 million values)
/// in 6.3 s (4 million values counted; most of it serde_yaml's unoptimised code); 10 000 levels
/// of nesting in microseconds (`[`, `{`) or 8 ms (`- `). The 100 000-user file takes 4.0 s,
/// 1.9 s of it the counting pass.
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ValidationError> {
    let limit = |reason| ValidationError::Policy {
        field: "file",
        source: PolicyValueError::DocumentLimit { reason },
    };
    if text.len() > MAX_YAML_BYTES {
        return Err(yaml_too_large());
    }
    if let Some((line, column)) = flow_too_deep(text) {
        return Err(ValidationError::Policy {
            field: "file",
            source: PolicyValueError::Document {
                line,
                column,
                reason: format!("nested deeper than {MAX_YAML_DEPTH} levels"),
            },
        });
    }
    let left = std::cell::Cell::new(MAX_YAML_VALUES);
    if let Err(e) = serde::de::DeserializeSeed::deserialize(
        CountValues(&left),
        serde_yaml::Deserializer::from_str(text),
    ) {
        if left.get() == 0 {
            return Err(limit(format!(
                "more than {MAX_YAML_VALUES} values with its aliases expanded (an alias bomb?)"
            )));
        }
        if is_limit(&e) {
            return Err(document_error(&e));
        }
        // Any other error (syntax) is the typed parse's to report, as it always has.
    }
    serde_yaml::from_str(text).map_err(|e| document_error(&e))
}

/// Where (1-based line and column) the brackets (`[`, `{`) of `text`, counted wherever they are,
/// first open more than [`MAX_YAML_DEPTH`] levels; `None` if they never do. libyaml spends
/// ≈ 28 µs (debug build) on each level of flow nesting before serde_yaml's own depth check
/// runs, which 16 MiB of `[` would make minutes; this scan takes microseconds. A bracket inside
/// a string or comment counts too: only 128 unclosed ones there would be refused.
fn flow_too_deep(text: &str) -> Option<(usize, usize)> {
    let (mut depth, mut line, mut column) = (0usize, 1, 0);
    for c in text.chars() {
        column += 1;
        match c {
            '\n' => (line, column) = (line + 1, 0),
            '[' | '{' => {
                depth += 1;
                if depth > MAX_YAML_DEPTH {
                    return Some((line, column));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The error for a policy file or template over [`MAX_YAML_BYTES`] (field `file`).
pub fn yaml_too_large() -> ValidationError {
    ValidationError::Policy {
        field: "file",
        source: PolicyValueError::DocumentLimit {
            reason: format!(
                "the document is larger than {} MiB ({MAX_YAML_BYTES} bytes), the most a policy \
                 file or template may be",
                MAX_YAML_BYTES >> 20
            ),
        },
    }
}

/// Whether `e` is one of serde_yaml's own limits (repetition of aliases, nesting).
fn is_limit(e: &serde_yaml::Error) -> bool {
    let m = e.to_string();
    m.starts_with("repetition limit exceeded") || m.starts_with("recursion limit exceeded")
}

/// A serde_yaml error as the `file` field's error, with its line and column; its own limits
/// said in our words.
fn document_error(e: &serde_yaml::Error) -> ValidationError {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let text = e.to_string();
    let source = if text == "repetition limit exceeded" {
        PolicyValueError::DocumentLimit {
            reason: "its aliases are used too often (more than 100 alias uses per event of the \
                     document: an alias bomb?)"
                .into(),
        }
    } else {
        // The location is in our message already.
        let suffix = format!(" at line {line} column {column}");
        let reason = text.strip_suffix(&suffix).unwrap_or(&text);
        let reason = if reason == "recursion limit exceeded" {
            format!("nested deeper than {MAX_YAML_DEPTH} levels")
        } else {
            reason.to_owned()
        };
        PolicyValueError::Document {
            line,
            column,
            reason,
        }
    };
    ValidationError::Policy {
        field: "file",
        source,
    }
}

/// Walks any value, aliases expanded, counting each scalar, sequence and mapping down from
/// the cell's value; at 0 it stops with an error.
#[derive(Clone, Copy)]
struct CountValues<'a>(&'a std::cell::Cell<u64>);

impl CountValues<'_> {
    fn tick<E: serde::de::Error>(self) -> Result<(), E> {
        match self.0.get().checked_sub(1) {
            Some(n) => {
                self.0.set(n);
                Ok(())
            }
            None => Err(E::custom("value limit exceeded")),
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for CountValues<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! count_scalars {
    ($($visit:ident: $t:ty),*) => {
        $(fn $visit<E: serde::de::Error>(self, _: $t) -> Result<(), E> {
            self.tick()
        })*
    };
}

impl<'de> serde::de::Visitor<'de> for CountValues<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    count_scalars!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128,
        visit_u128: u128, visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.tick()
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.tick()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.tick()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.tick()?;
        while map.next_entry_seed(self, self)?.is_some() {}
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, e: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): the tag is the variant, the value its content.
        let ((), v) = e.variant_seed(self)?;
        serde::de::VariantAccess::newtype_variant_seed(v, self)
    }
}
