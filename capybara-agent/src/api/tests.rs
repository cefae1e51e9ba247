//! Conversion tests across the API's features: requests name their bad field, answers round-trip
//! through proto.

use std::{collections::BTreeMap, time::SystemTime};

use capybara_proto::v1 as pb;

use super::lists::cidrs;
use crate::{
    blocklist::Direction,
    service::{
        BlocklistView, NewToken, NewUser, PeerCounters, PeerStatsView, Stats, Traffic,
        domain::{
            AuditRecord, DeviceName, Peer, PublicKey, Scope, Token, TokenId, User, UserDetail,
            UserName, ValidationError,
        },
        geo::GeoPolicy,
    },
};

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
        protocols: vec![],
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
        protocols: vec![],
    })
    .unwrap_err();
    assert_eq!(e.field(), "device");
    let e = NewUser::try_from(pb::AddUserRequest {
        name: "alice".into(),
        device: String::new(),
        expires_at: -5,
        protocols: vec![],
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
        ..Default::default()
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
        proxies: vec![crate::service::domain::ProxyAccess {
            id: 7,
            user: p.user.clone(),
            protocol: crate::service::domain::Protocol::Vless,
            created_at: 6,
        }],
    };
    assert_eq!(UserDetail::try_from(pb::UserDetail::from(&d)).unwrap(), d);
    let t = Token {
        id: TokenId::random(),
        name: "x".into(),
        scope: Scope::Admin,
        created_at: 1,
        expires_at: None,
        revoked_at: Some(3),
        user: Some(UserName::parse("user", "alice").unwrap()),
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
        proxies: vec![crate::service::ProxyCounters {
            user: UserName::parse("user", "alice").unwrap(),
            protocol: crate::service::domain::Protocol::Vless,
            id: 9,
            stats: PeerStatsView {
                tx: Traffic {
                    packets: 3,
                    bytes: 4,
                },
                ..PeerStatsView::default()
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
        entries: 1,
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
