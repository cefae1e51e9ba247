//! proto ↔ domain conversions of the control API. Requests become validated domain input with
//! `TryFrom` (every error names the proto field); domain answers become proto messages with
//! `From`; the client side turns the answers back into domain types with `TryFrom`, so the CLI
//! prints and serialises domain types only.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use capybara_common::drop::DropReason;
use capybara_proto::v1 as pb;

use super::convert::{drop_reason_from_proto, drop_reason_to_proto};
use crate::{
    blocklist::{Direction, ListName, parse_cidrs},
    net::Cidr,
    service::{
        BlocklistView, Connection, GeoStatus, NewToken, NewUser, PeerCounters, PeerStatsView,
        Stats, Traffic,
        domain::{
            AuditRecord, ClientConfig, DeviceName, Peer, PublicKey, Scope, Token, TokenId, User,
            UserDetail, UserName, ValidationError, from_unix_secs,
        },
        geo::GeoPolicy,
    },
};

fn opt_secs(v: Option<u64>) -> i64 {
    v.map_or(0, |s| s as i64)
}

fn secs_opt(v: i64) -> Option<u64> {
    (v > 0).then_some(v as u64)
}

/// A future timestamp in seconds (0 = none) from field `field`.
fn time_field(field: &'static str, v: i64) -> Result<Option<SystemTime>, ValidationError> {
    match v {
        0 => Ok(None),
        v if v < 0 => Err(ValidationError::Time {
            field,
            reason: "must be seconds since the Unix epoch",
        }),
        v => Ok(Some(from_unix_secs(v as u64))),
    }
}

/// The device in `field`; empty = `None`.
pub fn opt_device(field: &'static str, s: &str) -> Result<Option<DeviceName>, ValidationError> {
    (!s.is_empty())
        .then(|| DeviceName::parse(field, s))
        .transpose()
}

/// The user in `field`; empty = `None`.
pub fn opt_user(field: &'static str, s: &str) -> Result<Option<UserName>, ValidationError> {
    (!s.is_empty())
        .then(|| UserName::parse(field, s))
        .transpose()
}

impl TryFrom<pb::AddUserRequest> for NewUser {
    type Error = ValidationError;
    fn try_from(r: pb::AddUserRequest) -> Result<NewUser, ValidationError> {
        Ok(NewUser {
            name: UserName::parse("name", &r.name)?,
            device: opt_device("device", &r.device)?.unwrap_or_else(DeviceName::default_device),
            expires_at: time_field("expires_at", r.expires_at)?,
        })
    }
}

/// The scope of a proto enum value in `field`.
pub fn scope_from_proto(field: &'static str, v: i32) -> Result<Scope, ValidationError> {
    match pb::Scope::try_from(v) {
        Ok(pb::Scope::Read) => Ok(Scope::Read),
        Ok(pb::Scope::Write) => Ok(Scope::Write),
        Ok(pb::Scope::Admin) => Ok(Scope::Admin),
        Ok(pb::Scope::Unspecified) => Err(ValidationError::Missing { field }),
        Err(_) => Err(ValidationError::Scope {
            field,
            value: v.to_string(),
        }),
    }
}

/// The proto value of a scope.
pub fn scope_to_proto(s: Scope) -> pb::Scope {
    match s {
        Scope::Read => pb::Scope::Read,
        Scope::Write => pb::Scope::Write,
        Scope::Admin => pb::Scope::Admin,
    }
}

impl TryFrom<pb::CreateTokenRequest> for NewToken {
    type Error = ValidationError;
    fn try_from(r: pb::CreateTokenRequest) -> Result<NewToken, ValidationError> {
        let expires_at = match r.expires_in_secs {
            0 => None,
            s => Some(
                SystemTime::now()
                    .checked_add(Duration::from_secs(s))
                    .filter(|_| s <= 100 * 365 * 86_400)
                    .ok_or(ValidationError::Time {
                        field: "expires_in_secs",
                        reason: "too far in the future",
                    })?,
            ),
        };
        Ok(NewToken {
            scope: scope_from_proto("scope", r.scope)?,
            name: r.name,
            expires_at,
        })
    }
}

/// The direction of a proto enum value in `field`.
pub fn direction_from_proto(field: &'static str, v: i32) -> Result<Direction, ValidationError> {
    match pb::Direction::try_from(v) {
        Ok(pb::Direction::Source) => Ok(Direction::Source),
        Ok(pb::Direction::Destination) => Ok(Direction::Destination),
        _ => Err(ValidationError::Missing { field }),
    }
}

/// The proto value of a direction.
pub fn direction_to_proto(d: Direction) -> pb::Direction {
    match d {
        Direction::Source => pb::Direction::Source,
        Direction::Destination => pb::Direction::Destination,
    }
}

/// A list name from `field`.
pub fn list_name(field: &'static str, s: &str) -> Result<ListName, ValidationError> {
    ListName::parse(s).map_err(|source| ValidationError::Blocklist { field, source })
}

/// CIDRs from `field` (the error names the entry's index).
pub fn cidrs(field: &'static str, v: &[String]) -> Result<Vec<Cidr>, ValidationError> {
    if v.is_empty() {
        return Err(ValidationError::Missing { field });
    }
    parse_cidrs(v).map_err(|source| ValidationError::Blocklist { field, source })
}

impl From<&User> for pb::User {
    fn from(u: &User) -> pb::User {
        pb::User {
            name: u.name.to_string(),
            created_at: u.created_at as i64,
            expires_at: opt_secs(u.expires_at),
        }
    }
}

impl From<&Peer> for pb::Peer {
    fn from(p: &Peer) -> pb::Peer {
        pb::Peer {
            id: p.id,
            user: p.user.to_string(),
            device: p.device.to_string(),
            public_key: p.public_key.to_string(),
            ipv4: p.ipv4.to_string(),
            ipv6: p.ipv6.to_string(),
            created_at: p.created_at as i64,
            key_kept: p.key_kept,
        }
    }
}

impl From<&UserDetail> for pb::UserDetail {
    fn from(d: &UserDetail) -> pb::UserDetail {
        pb::UserDetail {
            user: Some((&d.user).into()),
            peers: d.peers.iter().map(Into::into).collect(),
        }
    }
}

impl From<&ClientConfig> for pb::ClientConfig {
    fn from(c: &ClientConfig) -> pb::ClientConfig {
        pb::ClientConfig {
            peer: Some((&c.peer).into()),
            private_key: c.private_key.clone().unwrap_or_default(),
            server_public_key: c.server_public_key.to_string(),
            endpoint: c.endpoint.clone(),
            dns: c.dns.clone(),
            wg_quick: c.wg_quick.clone(),
        }
    }
}

impl From<&Token> for pb::Token {
    fn from(t: &Token) -> pb::Token {
        pb::Token {
            id: t.id.to_string(),
            name: t.name.clone(),
            scope: scope_to_proto(t.scope) as i32,
            created_at: t.created_at as i64,
            expires_at: opt_secs(t.expires_at),
            revoked_at: opt_secs(t.revoked_at),
        }
    }
}

fn traffic_to_proto(t: Traffic) -> pb::Counter {
    pb::Counter {
        packets: t.packets,
        bytes: t.bytes,
    }
}

fn drops_to_proto(drops: &BTreeMap<String, u64>) -> Vec<pb::DropCount> {
    DropReason::ALL
        .iter()
        .filter_map(|r| {
            drops.get(r.name()).map(|n| pb::DropCount {
                reason: drop_reason_to_proto(*r) as i32,
                packets: *n,
            })
        })
        .collect()
}

impl From<&PeerStatsView> for pb::PeerStats {
    fn from(s: &PeerStatsView) -> pb::PeerStats {
        pb::PeerStats {
            rx: Some(traffic_to_proto(s.rx)),
            tx: Some(traffic_to_proto(s.tx)),
            drops: drops_to_proto(&s.drops),
        }
    }
}

impl From<&Stats> for pb::GetStatsResponse {
    fn from(s: &Stats) -> pb::GetStatsResponse {
        pb::GetStatsResponse {
            peers: s
                .peers
                .iter()
                .map(|p| pb::PeerStatsEntry {
                    peer: Some((&p.peer).into()),
                    stats: Some((&p.stats).into()),
                })
                .collect(),
            users: s
                .users
                .iter()
                .map(|(u, st)| pb::UserStatsEntry {
                    user: u.clone(),
                    stats: Some(st.into()),
                })
                .collect(),
            drops: drops_to_proto(&s.drops),
        }
    }
}

impl From<&Connection> for pb::Connection {
    fn from(c: &Connection) -> pb::Connection {
        pb::Connection {
            peer: Some((&c.peer).into()),
            endpoint: c.endpoint.clone().unwrap_or_default(),
            last_handshake: opt_secs(c.last_handshake),
            rx_bytes: c.rx_bytes,
            tx_bytes: c.tx_bytes,
        }
    }
}

impl From<&AuditRecord> for pb::AuditRecord {
    fn from(r: &AuditRecord) -> pb::AuditRecord {
        let json =
            |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        pb::AuditRecord {
            seq: r.seq,
            at: r.at as i64,
            actor: r.actor.clone(),
            action: r.action.clone(),
            target: r.target.clone(),
            before: json(&r.before),
            after: json(&r.after),
        }
    }
}

impl From<&BlocklistView> for pb::Blocklist {
    fn from(l: &BlocklistView) -> pb::Blocklist {
        pb::Blocklist {
            direction: direction_to_proto(l.direction) as i32,
            name: l.name.clone(),
            cidrs: l.cidrs.iter().map(ToString::to_string).collect(),
            hit_packets: l.hits.packets,
            hit_bytes: l.hits.bytes,
        }
    }
}

/// The geo policy of a `SetGeo` request.
impl TryFrom<pb::SetGeoRequest> for GeoPolicy {
    type Error = ValidationError;
    fn try_from(r: pb::SetGeoRequest) -> Result<GeoPolicy, ValidationError> {
        let countries = r
            .countries
            .iter()
            .map(|c| crate::service::domain::country("countries", c))
            .collect::<Result<Vec<_>, _>>()?;
        match pb::GeoMode::try_from(r.mode) {
            Ok(pb::GeoMode::Off) if countries.is_empty() => Ok(GeoPolicy::Off),
            Ok(pb::GeoMode::Off) => Err(ValidationError::Time {
                field: "countries",
                reason: "must be empty with mode off",
            }),
            Ok(pb::GeoMode::Block) if !countries.is_empty() => Ok(GeoPolicy::Block(countries)),
            Ok(pb::GeoMode::Allow) if !countries.is_empty() => Ok(GeoPolicy::Allow(countries)),
            Ok(pb::GeoMode::Block | pb::GeoMode::Allow) => {
                Err(ValidationError::Missing { field: "countries" })
            }
            _ => Err(ValidationError::Missing { field: "mode" }),
        }
    }
}

fn geo_mode_to_proto(mode: &str) -> pb::GeoMode {
    match mode {
        "block" => pb::GeoMode::Block,
        "allow" => pb::GeoMode::Allow,
        _ => pb::GeoMode::Off,
    }
}

impl From<&GeoStatus> for pb::GeoStatus {
    fn from(g: &GeoStatus) -> pb::GeoStatus {
        pb::GeoStatus {
            mode: geo_mode_to_proto(&g.mode) as i32,
            countries: g.countries.clone(),
            lists: g.lists.iter().map(Into::into).collect(),
        }
    }
}

// ---- client side: answers back to domain types ---------------------------------------------

/// An answer from the agent that does not make a domain value (a bug or a version skew).
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// A field failed validation.
    #[error("answer field {0}")]
    Field(#[from] ValidationError),
    /// A message field is missing.
    #[error("answer field {field} is missing")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// An address or enum field does not parse.
    #[error("answer field {field} is not valid")]
    Invalid {
        /// The field.
        field: &'static str,
    },
}

fn need<T>(field: &'static str, v: Option<T>) -> Result<T, AnswerError> {
    v.ok_or(AnswerError::Missing { field })
}

impl TryFrom<pb::User> for User {
    type Error = AnswerError;
    fn try_from(u: pb::User) -> Result<User, AnswerError> {
        Ok(User {
            name: UserName::parse("user.name", &u.name)?,
            created_at: u.created_at.max(0) as u64,
            expires_at: secs_opt(u.expires_at),
        })
    }
}

impl TryFrom<pb::Peer> for Peer {
    type Error = AnswerError;
    fn try_from(p: pb::Peer) -> Result<Peer, AnswerError> {
        Ok(Peer {
            id: p.id,
            user: UserName::parse("peer.user", &p.user)?,
            device: DeviceName::parse("peer.device", &p.device)?,
            public_key: PublicKey::parse("peer.public_key", &p.public_key)?,
            ipv4: p
                .ipv4
                .parse()
                .map_err(|_| AnswerError::Invalid { field: "peer.ipv4" })?,
            ipv6: p
                .ipv6
                .parse()
                .map_err(|_| AnswerError::Invalid { field: "peer.ipv6" })?,
            created_at: p.created_at.max(0) as u64,
            key_kept: p.key_kept,
        })
    }
}

impl TryFrom<pb::UserDetail> for UserDetail {
    type Error = AnswerError;
    fn try_from(d: pb::UserDetail) -> Result<UserDetail, AnswerError> {
        Ok(UserDetail {
            user: need("user", d.user)?.try_into()?,
            peers: d
                .peers
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl TryFrom<pb::ClientConfig> for ClientConfig {
    type Error = AnswerError;
    fn try_from(c: pb::ClientConfig) -> Result<ClientConfig, AnswerError> {
        Ok(ClientConfig {
            peer: need("config.peer", c.peer)?.try_into()?,
            private_key: (!c.private_key.is_empty()).then_some(c.private_key),
            server_public_key: PublicKey::parse("config.server_public_key", &c.server_public_key)?,
            endpoint: c.endpoint,
            dns: c.dns,
            wg_quick: c.wg_quick,
        })
    }
}

impl TryFrom<pb::Token> for Token {
    type Error = AnswerError;
    fn try_from(t: pb::Token) -> Result<Token, AnswerError> {
        Ok(Token {
            id: TokenId::parse("token.id", &t.id)?,
            name: t.name,
            scope: scope_from_proto("token.scope", t.scope)?,
            created_at: t.created_at.max(0) as u64,
            expires_at: secs_opt(t.expires_at),
            revoked_at: secs_opt(t.revoked_at),
        })
    }
}

fn traffic_from_proto(c: Option<pb::Counter>) -> Traffic {
    c.map(|c| Traffic {
        packets: c.packets,
        bytes: c.bytes,
    })
    .unwrap_or_default()
}

fn drops_from_proto(v: Vec<pb::DropCount>) -> Result<BTreeMap<String, u64>, AnswerError> {
    v.into_iter()
        .map(|d| {
            drop_reason_from_proto("drops.reason", d.reason)
                .map(|r| (r.name().to_owned(), d.packets))
                .map_err(|_| AnswerError::Invalid {
                    field: "drops.reason",
                })
        })
        .collect()
}

impl TryFrom<pb::PeerStats> for PeerStatsView {
    type Error = AnswerError;
    fn try_from(s: pb::PeerStats) -> Result<PeerStatsView, AnswerError> {
        Ok(PeerStatsView {
            rx: traffic_from_proto(s.rx),
            tx: traffic_from_proto(s.tx),
            drops: drops_from_proto(s.drops)?,
        })
    }
}

impl TryFrom<pb::GetStatsResponse> for Stats {
    type Error = AnswerError;
    fn try_from(s: pb::GetStatsResponse) -> Result<Stats, AnswerError> {
        Ok(Stats {
            peers: s
                .peers
                .into_iter()
                .map(|p| {
                    Ok(PeerCounters {
                        peer: need("peers.peer", p.peer)?.try_into()?,
                        stats: need("peers.stats", p.stats)?.try_into()?,
                    })
                })
                .collect::<Result<_, AnswerError>>()?,
            users: s
                .users
                .into_iter()
                .map(|u| Ok((u.user, need("users.stats", u.stats)?.try_into()?)))
                .collect::<Result<_, AnswerError>>()?,
            drops: drops_from_proto(s.drops)?,
        })
    }
}

impl TryFrom<pb::Connection> for Connection {
    type Error = AnswerError;
    fn try_from(c: pb::Connection) -> Result<Connection, AnswerError> {
        Ok(Connection {
            peer: need("connection.peer", c.peer)?.try_into()?,
            endpoint: (!c.endpoint.is_empty()).then_some(c.endpoint),
            last_handshake: secs_opt(c.last_handshake),
            rx_bytes: c.rx_bytes,
            tx_bytes: c.tx_bytes,
        })
    }
}

impl TryFrom<pb::AuditRecord> for AuditRecord {
    type Error = AnswerError;
    fn try_from(r: pb::AuditRecord) -> Result<AuditRecord, AnswerError> {
        let json = |field, s: String| -> Result<Option<serde_json::Value>, AnswerError> {
            if s.is_empty() {
                return Ok(None);
            }
            serde_json::from_str(&s)
                .map(Some)
                .map_err(|_| AnswerError::Invalid { field })
        };
        Ok(AuditRecord {
            seq: r.seq,
            at: r.at.max(0) as u64,
            actor: r.actor,
            action: r.action,
            target: r.target,
            before: json("audit.before", r.before)?,
            after: json("audit.after", r.after)?,
        })
    }
}

impl TryFrom<pb::Blocklist> for BlocklistView {
    type Error = AnswerError;
    fn try_from(l: pb::Blocklist) -> Result<BlocklistView, AnswerError> {
        Ok(BlocklistView {
            direction: direction_from_proto("list.direction", l.direction)?,
            cidrs: l
                .cidrs
                .iter()
                .map(|c| c.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| AnswerError::Invalid {
                    field: "list.cidrs",
                })?,
            name: l.name,
            hits: Traffic {
                packets: l.hit_packets,
                bytes: l.hit_bytes,
            },
        })
    }
}

impl TryFrom<pb::GeoStatus> for GeoStatus {
    type Error = AnswerError;
    fn try_from(g: pb::GeoStatus) -> Result<GeoStatus, AnswerError> {
        Ok(GeoStatus {
            mode: match pb::GeoMode::try_from(g.mode) {
                Ok(pb::GeoMode::Block) => "block",
                Ok(pb::GeoMode::Allow) => "allow",
                Ok(pb::GeoMode::Off) => "off",
                _ => return Err(AnswerError::Invalid { field: "geo.mode" }),
            }
            .into(),
            countries: g.countries,
            lists: g
                .lists
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geo_requests_are_validated_by_field() {
        let req = |mode: pb::GeoMode, c: &[&str]| pb::SetGeoRequest {
            mode: mode as i32,
            countries: c.iter().map(|s| (*s).to_owned()).collect(),
        };
        assert!(matches!(
            GeoPolicy::try_from(req(pb::GeoMode::Block, &["CN", "ru"])).unwrap(),
            GeoPolicy::Block(c) if c.len() == 2
        ));
        assert_eq!(
            GeoPolicy::try_from(req(pb::GeoMode::Off, &[])).unwrap(),
            GeoPolicy::Off
        );
        for (r, field) in [
            (req(pb::GeoMode::Block, &["XX1"]), "countries"),
            (req(pb::GeoMode::Block, &[]), "countries"),
            (req(pb::GeoMode::Off, &["CN"]), "countries"),
            (req(pb::GeoMode::Unspecified, &["CN"]), "mode"),
        ] {
            assert_eq!(GeoPolicy::try_from(r).unwrap_err().field(), field);
        }
    }

    fn peer() -> Peer {
        Peer {
            id: 7,
            user: UserName::parse("u", "alice").unwrap(),
            device: DeviceName::parse("d", "laptop").unwrap(),
            public_key: PublicKey([9; 32]),
            ipv4: "10.99.0.2".parse().unwrap(),
            ipv6: "fd99::2".parse().unwrap(),
            created_at: 1_700_000_000,
            key_kept: true,
        }
    }

    #[test]
    fn add_user_request_names_the_bad_field() {
        let ok = NewUser::try_from(pb::AddUserRequest {
            name: "alice".into(),
            device: String::new(),
            expires_at: 0,
        })
        .unwrap();
        assert_eq!(ok.device, DeviceName::default_device());
        let e = NewUser::try_from(pb::AddUserRequest {
            name: "Alice!".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field(), "name");
        let e = NewUser::try_from(pb::AddUserRequest {
            name: "alice".into(),
            device: "a b".into(),
            expires_at: 0,
        })
        .unwrap_err();
        assert_eq!(e.field(), "device");
        let e = NewUser::try_from(pb::AddUserRequest {
            name: "alice".into(),
            device: String::new(),
            expires_at: -5,
        })
        .unwrap_err();
        assert_eq!(e.field(), "expires_at");
    }

    #[test]
    fn token_request_needs_a_scope() {
        let e = NewToken::try_from(pb::CreateTokenRequest::default()).unwrap_err();
        assert_eq!(e, ValidationError::Missing { field: "scope" });
        let e = NewToken::try_from(pb::CreateTokenRequest {
            scope: 42,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field(), "scope");
        let t = NewToken::try_from(pb::CreateTokenRequest {
            scope: pb::Scope::Write as i32,
            name: "ci".into(),
            expires_in_secs: 60,
        })
        .unwrap();
        assert_eq!(t.scope, Scope::Write);
        assert!(t.expires_at.unwrap() > SystemTime::now());
    }

    #[test]
    fn domain_answers_round_trip_through_proto() {
        let p = peer();
        assert_eq!(Peer::try_from(pb::Peer::from(&p)).unwrap(), p);
        let d = UserDetail {
            user: User {
                name: p.user.clone(),
                created_at: 5,
                expires_at: Some(9),
            },
            peers: vec![p.clone()],
        };
        assert_eq!(UserDetail::try_from(pb::UserDetail::from(&d)).unwrap(), d);
        let t = Token {
            id: TokenId::random(),
            name: "x".into(),
            scope: Scope::Admin,
            created_at: 1,
            expires_at: None,
            revoked_at: Some(3),
        };
        assert_eq!(Token::try_from(pb::Token::from(&t)).unwrap(), t);
        let mut drops = BTreeMap::new();
        drops.insert("flow-limit".to_owned(), 4);
        let st = Stats {
            peers: vec![PeerCounters {
                peer: p.clone(),
                stats: PeerStatsView {
                    rx: Traffic {
                        packets: 1,
                        bytes: 2,
                    },
                    tx: Traffic::default(),
                    drops: drops.clone(),
                },
            }],
            users: [("alice".to_owned(), PeerStatsView::default())].into(),
            drops,
        };
        assert_eq!(
            Stats::try_from(pb::GetStatsResponse::from(&st)).unwrap(),
            st
        );
        let a = AuditRecord {
            seq: 3,
            at: 4,
            actor: "uid:0".into(),
            action: "user.add".into(),
            target: "user:alice".into(),
            before: None,
            after: Some(serde_json::json!({"a": 1})),
        };
        assert_eq!(AuditRecord::try_from(pb::AuditRecord::from(&a)).unwrap(), a);
        let l = BlocklistView {
            direction: Direction::Destination,
            name: "manual".into(),
            cidrs: vec!["192.0.2.0/24".parse().unwrap()],
            hits: Traffic {
                packets: 1,
                bytes: 60,
            },
        };
        assert_eq!(BlocklistView::try_from(pb::Blocklist::from(&l)).unwrap(), l);
    }

    #[test]
    fn cidr_lists_name_the_entry() {
        let e = cidrs("cidrs", &["10.0.0.0/8".into(), "10.0.0.1/8".into()]).unwrap_err();
        assert_eq!(e.field(), "cidrs");
        assert!(e.to_string().contains("#1"), "{e}");
        assert_eq!(cidrs("cidrs", &[]).unwrap_err().field(), "cidrs");
    }
}
