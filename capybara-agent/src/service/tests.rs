//! Service-level tests of users, devices, tokens, stats, kick and blocklists on the in-memory
//! dataplane and tunnel (no root).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use capybara_common::{counters::Counter, drop::DropReason, peer::PeerStats};

use super::*;
use crate::{
    blocklist::{Direction, ListName, RegistrySnapshot},
    dataplane::Gate,
    net::Cidr,
    service::{
        core::now,
        directory::allowed_ips,
        domain::{Actor, DeviceName, PublicKey, Scope, TokenId, UserName, unix_secs},
        secrets::Sealer,
        testing::{MemoryPlane, MemoryTunnel},
        tokens::TokenRecord,
    },
    store::{Cf, keys},
};

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    plane: Arc<MemoryPlane>,
    tunnel: Arc<MemoryTunnel>,
    svc: Service,
}

fn config(keep: bool) -> ServiceConfig {
    ServiceConfig {
        server_v4: "10.99.0.1/29".parse().unwrap(),
        server_v6: "fd99::1/64".parse().unwrap(),
        server_public_key: PublicKey([1; 32]),
        endpoint: "vpn.example.com:51820".into(),
        dns: vec!["10.99.0.1".into()],
        keep_client_keys: keep.then(|| Sealer::new(&[3; 32])),
        geo_db: None,
        keep_unknown_peers: false,
    }
}

fn fixture(keep: bool) -> Fixture {
    fixture_with(config(keep))
}

fn fixture_with(config: ServiceConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let plane = Arc::new(MemoryPlane::default());
    let tunnel = Arc::new(MemoryTunnel::default());
    let svc = Service::open(
        Arc::new(Store::open(&path).unwrap()),
        plane.clone(),
        tunnel.clone(),
        config,
    )
    .unwrap();
    Fixture {
        _dir: dir,
        path,
        plane,
        tunnel,
        svc,
    }
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn new_user(name: &str) -> NewUser {
    NewUser {
        name: UserName::parse("name", name).unwrap(),
        device: DeviceName::default_device(),
        expires_at: None,
    }
}

fn u(name: &str) -> UserName {
    UserName::parse("name", name).unwrap()
}

#[test]
fn add_user_programs_tunnel_dataplane_and_store_and_audits() {
    let f = fixture(false);
    let (user, cfg) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    assert_eq!(user.name.as_str(), "alice");
    let peer = &cfg.peer;
    assert_eq!(
        peer.ipv4,
        Ipv4Addr::new(10, 99, 0, 2),
        "lowest free host after the server"
    );
    assert_eq!(peer.ipv6, "fd99::2".parse::<Ipv6Addr>().unwrap());
    let private = cfg.private_key.as_deref().unwrap();
    let private = crate::service::domain::decode_key(private).unwrap();
    assert_eq!(secrets::public_of(&private), peer.public_key);
    assert!(
        cfg.wg_quick.contains("PublicKey = AQEB"),
        "{}",
        cfg.wg_quick
    );
    assert!(cfg.wg_quick.contains("Address = 10.99.0.2/32, fd99::2/128"));
    assert!(cfg.wg_quick.contains("Endpoint = vpn.example.com:51820"));

    let plane = f.plane.state();
    assert_eq!(plane.peers[&peer.id], allowed_ips(peer));
    assert_eq!(plane.gates[&peer.id], Gate::Admitted { until: None });
    assert_eq!(
        f.tunnel.state()[&peer.public_key].allowed,
        allowed_ips(peer)
    );

    let audit = f.svc.core.audit_records(None, 10).unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "user.add");
    assert_eq!(audit[0].actor, "uid:0");
    assert_eq!(audit[0].target, "user:alice");
    assert!(audit[0].before.is_none() && audit[0].after.is_some());

    // The private key is not stored anywhere.
    let raw: Vec<(String, serde_json::Value)> = f.svc.core.store.scan(Cf::Peers, "").unwrap();
    let text = serde_json::to_string(&raw).unwrap();
    assert!(!text.contains(cfg.private_key.as_deref().unwrap()));
    assert!(matches!(
        f.svc.devices.user_config(&root(), &u("alice"), None, false),
        Err(ServiceError::KeyNotKept { .. })
    ));
}

#[test]
fn duplicates_and_unknowns_change_nothing() {
    let f = fixture(false);
    f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    let before = (f.plane.state().peers, f.tunnel.state().len());
    assert!(matches!(
        f.svc.users.add_user(&root(), new_user("alice")),
        Err(ServiceError::AlreadyExists { what: "user", .. })
    ));
    assert!(matches!(
        f.svc.users.remove_user(&root(), &u("bob")),
        Err(ServiceError::NotFound { what: "user", .. })
    ));
    assert!(matches!(
        f.svc
            .devices
            .add_device(&root(), &u("alice"), &DeviceName::default_device()),
        Err(ServiceError::AlreadyExists { what: "device", .. })
    ));
    let past = NewUser {
        expires_at: Some(SystemTime::now() - Duration::from_secs(1)),
        ..new_user("carol")
    };
    assert_eq!(
        match f.svc.users.add_user(&root(), past) {
            Err(ServiceError::Invalid(e)) => e.field(),
            other => panic!("{other:?}"),
        },
        "expires_at"
    );
    assert_eq!(before, (f.plane.state().peers, f.tunnel.state().len()));
    assert_eq!(f.svc.users.list_users().unwrap().len(), 1);
    assert_eq!(f.svc.core.audit_records(None, 100).unwrap().len(), 1);
}

#[test]
fn a_failed_dataplane_step_leaves_nothing_behind() {
    let f = fixture(false);
    f.plane.with(|s| s.fail_next_set_peer = true);
    assert!(matches!(
        f.svc.users.add_user(&root(), new_user("alice")),
        Err(ServiceError::Dataplane(_))
    ));
    assert!(f.plane.state().peers.is_empty());
    assert!(f.tunnel.state().is_empty());
    assert!(f.svc.users.list_users().unwrap().is_empty());
    assert!(
        f.svc
            .core
            .store
            .scan::<serde_json::Value>(Cf::Peers, "")
            .unwrap()
            .is_empty()
    );
    assert!(f.svc.core.audit_records(None, 10).unwrap().is_empty());
    // And the id/address were not consumed; the audit sequence has no gap.
    let (_, cfg) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    assert_eq!(cfg.peer.id, 0);
    assert_eq!(f.svc.core.audit_records(None, 10).unwrap()[0].seq, 1);
}

#[test]
fn addresses_and_ids_are_reused_and_the_pool_ends() {
    let f = fixture(false);
    // /29: hosts .1-.6, server .1 → five devices.
    let mut ids = Vec::new();
    for n in ["a", "b", "c", "d", "e"] {
        ids.push(f.svc.users.add_user(&root(), new_user(n)).unwrap().1.peer);
    }
    let v4: BTreeSet<Ipv4Addr> = ids.iter().map(|p| p.ipv4).collect();
    assert_eq!(v4.len(), 5);
    assert!(matches!(
        f.svc.users.add_user(&root(), new_user("f")),
        Err(ServiceError::Exhausted { .. })
    ));
    f.svc.users.remove_user(&root(), &u("c")).unwrap();
    let again = f.svc.users.add_user(&root(), new_user("f")).unwrap().1.peer;
    assert_eq!((again.id, again.ipv4), (ids[2].id, ids[2].ipv4));
}

/// Issue 19: the default tunnel subnet holds as many devices as the dataplane has peer ids,
/// and allocation goes on past the 254th device.
#[test]
fn the_default_subnet_holds_every_peer_and_allocation_goes_past_254() {
    let net: ipnet::Ipv4Net = crate::daemon::DEFAULT_TUNNEL_IPV4.parse().unwrap();
    let hosts = (1u32 << (32 - net.prefix_len())) - 2 - 1; // no network, broadcast, server
    assert!(
        hosts >= capybara_common::peer::MAX_PEERS - 3,
        "{net}: {hosts} devices"
    );
    assert!(net.addr().is_private(), "{net}");
    let f = fixture_with(ServiceConfig {
        server_v4: net,
        ..config(false)
    });
    let started = std::time::Instant::now();
    let mut last = None;
    for n in 0..300 {
        let name = format!("u{n}");
        last = Some(
            f.svc
                .users
                .add_user(&root(), new_user(&name))
                .unwrap()
                .1
                .peer,
        );
    }
    let last = last.unwrap();
    // Hosts .2 … 10.70.1.45: a /15 has no network or broadcast address at .0/.255 inside it.
    assert_eq!(last.ipv4, Ipv4Addr::new(10, 70, 1, 45));
    assert_eq!(last.ipv6, "fd99::12d".parse::<Ipv6Addr>().unwrap());
    eprintln!("300 devices added in {:?}", started.elapsed());
}

/// Issue 19: a full subnet names the flag that sets it and what to do.
#[test]
fn a_full_subnet_names_tunnel_ipv4_with_a_hint() {
    let f = fixture(false);
    for n in ["a", "b", "c", "d", "e"] {
        f.svc.users.add_user(&root(), new_user(n)).unwrap();
    }
    let e = f.svc.users.add_user(&root(), new_user("f")).unwrap_err();
    assert!(matches!(e, ServiceError::Exhausted { .. }), "{e}");
    let text = e.to_string();
    for needle in [
        "no free IPv4 address in 10.99.0.0/29",
        "--tunnel-ipv4 10.99.0.1/29",
        "5 devices",
        "user remove",
        "--tunnel-ipv4 10.99.0.1/15",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
    // An IPv6 subnet smaller than the IPv4 one runs out first, and says so.
    let f = fixture_with(ServiceConfig {
        server_v4: "10.99.0.1/24".parse().unwrap(),
        server_v6: "fd99::1/126".parse().unwrap(),
        ..config(false)
    });
    f.svc.users.add_user(&root(), new_user("a")).unwrap();
    f.svc.users.add_user(&root(), new_user("b")).unwrap();
    let e = f.svc.users.add_user(&root(), new_user("c")).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("--tunnel-ipv6 fd99::1/126") && text.contains("fd99::/126"),
        "{text}"
    );
}

#[test]
fn remove_user_removes_every_device_everywhere() {
    let f = fixture(false);
    f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    f.svc
        .devices
        .add_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("device", "phone").unwrap(),
        )
        .unwrap();
    f.svc.users.add_user(&root(), new_user("bob")).unwrap();
    assert_eq!(f.plane.state().peers.len(), 3);
    let removed = f.svc.users.remove_user(&root(), &u("alice")).unwrap();
    assert_eq!(removed.peers.len(), 2);
    assert_eq!(f.plane.state().peers.len(), 1);
    assert_eq!(f.tunnel.state().len(), 1);
    assert_eq!(f.svc.devices.list_peers(None).unwrap().len(), 1);
    assert_eq!(
        f.svc
            .core
            .audit_records(Some(&u("alice")), 10)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        f.svc.core.audit_records(Some(&u("bob")), 10).unwrap().len(),
        1
    );
}

#[test]
fn reopen_programs_stored_devices_and_removes_unknown_kernel_peers_unless_kept() {
    let f = fixture(false);
    let (_, a) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    let Fixture {
        _dir,
        path,
        plane,
        svc,
        ..
    } = f;
    drop(svc);
    // alice missing from the kernel (a fresh bpffs), and a peer the store does not know
    // (configured outside the agent) holding id 1 and the next free address.
    plane.with(|s| {
        s.peers.clear();
        s.peers.insert(1, vec!["10.99.0.3/32".parse().unwrap()]);
    });
    let tunnel = Arc::new(MemoryTunnel::default());
    let svc = Service::open(
        Arc::new(Store::open(&path).unwrap()),
        plane.clone(),
        tunnel.clone(),
        config(false),
    )
    .unwrap();
    let peers = plane.state().peers;
    assert_eq!(peers.keys().copied().collect::<Vec<_>>(), [a.peer.id]);
    assert_eq!(peers[&a.peer.id], allowed_ips(&a.peer));
    assert!(tunnel.state().contains_key(&a.peer.public_key));
    // The unknown peer is gone: its id and address are handed out again; the audit sequence
    // continues.
    let (_, b) = svc.users.add_user(&root(), new_user("bob")).unwrap();
    assert_eq!(b.peer.id, 1);
    assert_eq!(b.peer.ipv4, Ipv4Addr::new(10, 99, 0, 3));
    let seqs: Vec<u64> = svc
        .core
        .audit_records(None, 10)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, [2, 1]);
    drop(svc);

    // With keep_unknown_peers a peer the store does not know stays, and its id and address are
    // skipped.
    plane.with(|s| {
        s.peers.insert(2, vec!["10.99.0.4/32".parse().unwrap()]);
    });
    let svc = Service::open(
        Arc::new(Store::open(&path).unwrap()),
        plane.clone(),
        Arc::new(MemoryTunnel::default()),
        ServiceConfig {
            keep_unknown_peers: true,
            ..config(false)
        },
    )
    .unwrap();
    assert!(plane.state().peers.contains_key(&2));
    let (_, c) = svc.users.add_user(&root(), new_user("carol")).unwrap();
    assert_eq!((c.peer.id, c.peer.ipv4), (3, Ipv4Addr::new(10, 99, 0, 5)));
    drop(_dir);
}

/// Issue 19: after `--tunnel-ipv4` grew to a subnet holding the old one (what the exhaustion
/// hint says to do), a new device gets neither a stored device's IPv6 address (same offset in
/// the old subnet) nor the server's.
#[test]
fn a_grown_tunnel_subnet_hands_out_no_address_in_use() {
    let f = fixture_with(ServiceConfig {
        server_v4: "10.99.0.1/24".parse().unwrap(),
        ..config(false)
    });
    let (_, a) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    assert_eq!(
        (a.peer.ipv4, a.peer.ipv6),
        (Ipv4Addr::new(10, 99, 0, 2), "fd99::2".parse().unwrap())
    );
    let Fixture {
        _dir, path, svc, ..
    } = f;
    drop(svc);
    let svc = Service::open(
        Arc::new(Store::open(&path).unwrap()),
        Arc::new(MemoryPlane::default()),
        Arc::new(MemoryTunnel::default()),
        ServiceConfig {
            server_v4: "10.99.0.1/15".parse().unwrap(),
            ..config(false)
        },
    )
    .unwrap();
    let (_, b) = svc.users.add_user(&root(), new_user("bob")).unwrap();
    // 10.98.0.1 and .2 are free in IPv4, but fd99::1 is the server's, fd99::2 alice's.
    assert_eq!(
        (b.peer.ipv4, b.peer.ipv6),
        (Ipv4Addr::new(10, 98, 0, 3), "fd99::3".parse().unwrap())
    );
}

#[test]
fn kept_keys_show_the_config_again_and_rotate_replaces_the_key() {
    let f = fixture(true);
    let (_, first) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    assert!(first.peer.key_kept);
    let again = f
        .svc
        .devices
        .user_config(&root(), &u("alice"), None, false)
        .unwrap();
    assert_eq!(again.private_key, first.private_key);
    assert_eq!(again.wg_quick, first.wg_quick);
    let rotated = f
        .svc
        .devices
        .user_config(&root(), &u("alice"), None, true)
        .unwrap();
    assert_ne!(rotated.peer.public_key, first.peer.public_key);
    assert_eq!(rotated.peer.id, first.peer.id);
    let tun = f.tunnel.state();
    assert!(tun.contains_key(&rotated.peer.public_key));
    assert!(!tun.contains_key(&first.peer.public_key));
}

#[test]
fn reading_a_kept_key_is_audited_with_its_reader() {
    let f = fixture(true);
    f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    let reader = Actor::Token {
        id: TokenId::parse("id", "0123456789abcdef").unwrap(),
        scope: Scope::Admin,
    };
    f.svc
        .devices
        .user_config(&reader, &u("alice"), None, false)
        .unwrap();
    let last = &f.svc.core.audit_records(None, 1).unwrap()[0];
    assert_eq!(last.action, "peer.config");
    assert_eq!(last.target, "peer:alice/default");
    assert_eq!(last.actor, reader.to_string());
    assert!(last.before.is_none() && last.after.is_none());
}

#[test]
fn a_token_without_an_expiry_expires_after_the_default_lifetime() {
    let f = fixture(false);
    let before = SystemTime::now();
    let (tok, _) = f
        .svc
        .tokens
        .create_token(
            &root(),
            NewToken {
                scope: Scope::Read,
                name: String::new(),
                expires_at: None,
                user: None,
            },
        )
        .unwrap();
    let lifetime = tokens::DEFAULT_TOKEN_LIFETIME.as_secs();
    let at = tok.expires_at.expect("a default expiry");
    assert!(at >= unix_secs(before) + lifetime && at <= unix_secs(SystemTime::now()) + lifetime);
}

#[test]
fn tokens_authenticate_by_hash_and_stop_when_revoked_or_expired() {
    let f = fixture(false);
    let (tok, bearer) = f
        .svc
        .tokens
        .create_token(
            &root(),
            NewToken {
                scope: Scope::Write,
                name: "ci".into(),
                expires_at: None,
                user: None,
            },
        )
        .unwrap();
    assert_eq!(
        f.svc.tokens.authenticate(&bearer).unwrap(),
        Actor::Token {
            id: tok.id.clone(),
            scope: Scope::Write
        }
    );
    let raw: Vec<(String, serde_json::Value)> = f.svc.core.store.scan(Cf::Tokens, "").unwrap();
    assert!(!serde_json::to_string(&raw).unwrap().contains(&bearer));
    let forged = format!("capy_{}_{}", tok.id, "A".repeat(43));
    assert!(matches!(
        f.svc.tokens.authenticate(&forged),
        Err(AuthError::Invalid)
    ));
    assert!(matches!(
        f.svc.tokens.authenticate("nope"),
        Err(AuthError::Invalid)
    ));
    f.svc.tokens.revoke_token(&root(), &tok.id).unwrap();
    assert!(matches!(
        f.svc.tokens.authenticate(&bearer),
        Err(AuthError::Revoked)
    ));
    assert!(matches!(
        f.svc.tokens.revoke_token(&root(), &tok.id),
        Err(ServiceError::AlreadyRevoked { .. })
    ));
    assert!(f.svc.tokens.list_tokens().unwrap()[0].revoked_at.is_some());

    // Expiry: write a record that expired a second ago.
    let (tok2, bearer2) = f
        .svc
        .tokens
        .create_token(
            &root(),
            NewToken {
                scope: Scope::Read,
                name: String::new(),
                expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
                user: None,
            },
        )
        .unwrap();
    let mut rec: TokenRecord = f
        .svc
        .core
        .store
        .get(Cf::Tokens, tok2.id.as_str())
        .unwrap()
        .unwrap();
    rec.token.expires_at = Some(now() - 1);
    f.svc
        .core
        .store
        .put(Cf::Tokens, tok2.id.as_str(), &rec)
        .unwrap();
    assert!(matches!(
        f.svc.tokens.authenticate(&bearer2),
        Err(AuthError::Expired)
    ));
}

#[test]
fn kick_holds_every_device_and_a_handshake_admits_again() {
    let f = fixture(false);
    let (_, cfg) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    let kicked = f.svc.monitor.kick(&root(), &u("alice")).unwrap();
    assert_eq!(kicked.len(), 1);
    assert_eq!(
        f.plane.state().gates[&cfg.peer.id],
        Gate::Held(DropReason::GateKicked)
    );
    assert_eq!(f.tunnel.state()[&cfg.peer.public_key].kicks, 1);
    f.svc.monitor.on_handshake(&cfg.peer.public_key).unwrap();
    assert_eq!(
        f.plane.state().gates[&cfg.peer.id],
        Gate::Admitted { until: None }
    );
}

#[test]
fn stats_sum_devices_per_user_and_list_drops() {
    let f = fixture(false);
    let (_, a) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    let b = f
        .svc
        .devices
        .add_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("device", "phone").unwrap(),
        )
        .unwrap();
    f.plane.with(|s| {
        let mut x = PeerStats {
            rx_bytes: 100,
            rx_packets: 1,
            ..Default::default()
        };
        x.drops[DropReason::FlowLimit as usize] = 2;
        s.stats.insert(a.peer.id, x);
        s.stats.insert(
            b.peer.id,
            PeerStats {
                rx_bytes: 50,
                rx_packets: 1,
                tx_bytes: 7,
                tx_packets: 1,
                ..Default::default()
            },
        );
        s.drops.insert(
            DropReason::SourceBlocklist as u32,
            Counter {
                packets: 9,
                bytes: 900,
            },
        );
    });
    let st = f.svc.monitor.stats(None).unwrap();
    assert_eq!(st.peers.len(), 2);
    let alice = &st.users["alice"];
    assert_eq!(
        (alice.rx.bytes, alice.rx.packets, alice.tx.bytes),
        (150, 2, 7)
    );
    assert_eq!(alice.drops["flow-limit"], 2);
    assert_eq!(st.drops["source-blocklist"], 9);
}

#[test]
fn blocklist_changes_persist_with_an_audit_record() {
    let f = fixture(false);
    let name = ListName::parse("manual").unwrap();
    let cidrs: Vec<Cidr> = vec!["192.0.2.0/24".parse().unwrap()];
    let v = f
        .svc
        .lists
        .change_entries(&root(), Direction::Source, &name, EntriesOp::Add, &cidrs)
        .unwrap();
    // The answer is the count; the entries are paged.
    assert_eq!((v.entries, v.cidrs.len()), (1, 0));
    let (page, more) = f
        .svc
        .lists
        .blocklist_entries_page(Direction::Source, &name, None, 10)
        .unwrap();
    assert_eq!((page.cidrs, more), (cidrs, false));
    let snap: RegistrySnapshot = f
        .svc
        .core
        .store
        .get(Cf::Blocklists, keys::BLOCKLISTS)
        .unwrap()
        .unwrap();
    assert_eq!(snap.lists.len(), 1);
    assert!(matches!(
        f.svc
            .lists
            .delete_blocklist(&root(), Direction::Destination, &name),
        Err(ServiceError::NotFound { what: "list", .. })
    ));
    f.svc
        .lists
        .delete_blocklist(&root(), Direction::Source, &name)
        .unwrap();
    assert!(f.svc.lists.blocklists().unwrap().is_empty());
    let actions: Vec<String> = f
        .svc
        .core
        .audit_records(None, 10)
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect();
    assert_eq!(actions, ["blocklist.delete", "blocklist.add"]);
}

#[test]
fn a_blocklist_change_is_audited_as_a_diff_whose_size_does_not_grow_with_the_list() {
    let f = fixture(false);
    let name = ListName::parse("manual").unwrap();
    let add = |cidrs: &[Cidr]| {
        f.svc
            .lists
            .change_entries(&root(), Direction::Source, &name, EntriesOp::Add, cidrs)
            .unwrap();
        f.svc.core.audit_records(None, 1).unwrap().remove(0)
    };
    let one = |i: u32| -> Cidr {
        format!("198.51.{}.{}/32", i / 256, i % 256)
            .parse()
            .unwrap()
    };
    let small = add(&[one(0)]);
    assert_eq!(small.before, None, "a new list");
    let after = small.after.unwrap();
    assert_eq!(after["added_count"], 1);
    assert_eq!(after["added"], serde_json::json!(["198.51.0.0/32"]));
    // 20 000 entries, then one more: the record names the one.
    let bulk: Vec<Cidr> = (1..20_001).map(one).collect();
    let big = add(&bulk);
    assert_eq!(big.after.as_ref().unwrap()["added_count"], 20_000);
    assert_eq!(
        big.after.as_ref().unwrap()["added"]
            .as_array()
            .unwrap()
            .len(),
        100
    );
    assert_eq!(big.after.as_ref().unwrap()["truncated"], true);
    let later = add(&[one(20_001)]);
    assert_eq!(later.before.unwrap()["entries"], 20_001);
    let after = later.after.unwrap();
    assert_eq!(after["entries"], 20_002);
    assert_eq!(after["added"], serde_json::json!(["198.51.78.33/32"]));
    assert_eq!(after["removed_count"], 0);
    let size = |v: &serde_json::Value| v.to_string().len();
    assert!(
        size(&after) < 200,
        "one entry into 20 001: {} bytes",
        size(&after)
    );
    f.svc
        .lists
        .delete_blocklist(&root(), Direction::Source, &name)
        .unwrap();
    let del = f.svc.core.audit_records(None, 1).unwrap().remove(0);
    let after = del.after.unwrap();
    assert_eq!(after["deleted"], true);
    assert_eq!(after["removed_count"], 20_002);
    assert!(size(&after) < 4000, "{} bytes", size(&after));
}

#[test]
fn audit_pages_cover_every_record_once_and_retention_keeps_only_the_new() {
    let f = fixture(false);
    let name = ListName::parse("manual").unwrap();
    for i in 0..25 {
        let cidr: Cidr = format!("203.0.113.{i}/32").parse().unwrap();
        f.svc
            .lists
            .change_entries(&root(), Direction::Source, &name, EntriesOp::Add, &[cidr])
            .unwrap();
    }
    let all = f.svc.core.audit_page(None, None, 1000).unwrap();
    assert!(all.next.is_none());
    let n = all.items.len();
    assert!(n >= 25, "{n}");
    let (mut seen, mut before) = (Vec::new(), None);
    loop {
        let p = f.svc.core.audit_page(None, before, 4).unwrap();
        assert!(p.items.len() <= 4);
        before = p.items.last().map(|r| r.seq);
        seen.extend(p.items.iter().map(|r| r.seq));
        if p.next.is_none() {
            break;
        }
    }
    let want: Vec<u64> = all.items.iter().map(|r| r.seq).collect();
    assert_eq!(seen, want, "every record once, newest first");
    // The cap: no page is bigger than MAX_PAGE_SIZE, whatever is asked.
    assert_eq!(crate::service::core::MAX_PAGE_SIZE, 1000);
    // Retention: the records are backdated (older than a cutoff) but the last five.
    let store = &f.svc.core.store;
    let old: Vec<(String, crate::service::domain::AuditRecord)> =
        store.scan(Cf::Audit, "").unwrap();
    for (k, mut r) in old.iter().take(n - 5).cloned() {
        r.at -= 400 * 86_400;
        store.put(Cf::Audit, &k, &r).unwrap();
    }
    let pruned = f.svc.core.prune_audit(now() - 365 * 86_400).unwrap();
    assert_eq!(pruned, (n - 5) as u64);
    let left = f.svc.core.audit_records(None, 1000).unwrap();
    let kept: Vec<u64> = left.iter().rev().map(|r| r.seq).collect();
    let want: Vec<u64> = old.iter().skip(n - 5).map(|(_, r)| r.seq).collect();
    assert_eq!(kept, want, "the new records stay");
}

#[test]
fn connections_join_tunnel_status_with_devices() {
    let f = fixture(false);
    let (_, a) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    let t = SystemTime::now();
    f.tunnel.with_peer(&a.peer.public_key, |p| {
        p.status.endpoint = Some("192.0.2.9:4000".parse().unwrap());
        p.status.last_handshake = Some(t);
        p.status.rx_bytes = 5;
    });
    let c = f.svc.monitor.connections().unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].endpoint.as_deref(), Some("192.0.2.9:4000"));
    assert_eq!(c[0].last_handshake, Some(unix_secs(t)));
    assert_eq!(c[0].user.as_str(), "alice");
}

/// alice with two devices (`default`, `phone`) and bob with one, each with an open session
/// (recorded as the daemon's recorder does from the tunnel's reports).
fn three_connected(f: &Fixture) -> (history::Recorder, [domain::Peer; 3]) {
    let (_, a) = f.svc.users.add_user(&root(), new_user("alice")).unwrap();
    let phone = f
        .svc
        .devices
        .add_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("d", "phone").unwrap(),
        )
        .unwrap();
    let (_, b) = f.svc.users.add_user(&root(), new_user("bob")).unwrap();
    let mut rec = history::Recorder::start(f.svc.history.clone(), SystemTime::now()).unwrap();
    let peers = [a.peer, phone.peer, b.peer];
    for (i, p) in peers.iter().enumerate() {
        f.tunnel.with_peer(&p.public_key, |t| {
            t.status.last_handshake = Some(SystemTime::now());
        });
        rec.on_event(SessionEvent::Connected {
            key: p.public_key,
            endpoint: format!("192.0.2.{}:4000", i + 1).parse().unwrap(),
            at: SystemTime::now(),
        })
        .unwrap();
    }
    (rec, peers)
}

/// The connection id of device `p`, from `connections`.
fn connection_id(f: &Fixture, p: &domain::Peer) -> Option<domain::SessionId> {
    f.svc
        .monitor
        .connections()
        .unwrap()
        .into_iter()
        .find(|c| c.peer.as_ref().is_some_and(|x| x.id == p.id))
        .expect("listed")
        .id
}

#[test]
fn connections_carry_their_open_sessions_id_and_a_device_without_one_has_none() {
    let f = fixture(false);
    let (_, lone) = f.svc.users.add_user(&root(), new_user("carol")).unwrap();
    let (_, [a, phone, b]) = three_connected(&f);
    let open = f
        .svc
        .history
        .history(&HistoryQuery::default())
        .unwrap()
        .sessions;
    assert_eq!(open.len(), 3);
    for p in [&a, &phone, &b] {
        let id = connection_id(&f, p).expect("an open session's id");
        let s = open.iter().find(|s| s.peer_id == p.id).unwrap();
        assert_eq!(
            s.id, id,
            "the connection id is the session's id in the history"
        );
        assert_eq!(id.peer, p.id);
    }
    // Never handshaked: listed, no id.
    assert_eq!(connection_id(&f, &lone.peer), None);
}

#[test]
fn kicking_one_connection_ends_that_device_only_and_its_session_as_kicked() {
    let f = fixture(false);
    let (mut rec, [a, phone, b]) = three_connected(&f);
    let id = connection_id(&f, &a).unwrap();
    let gates_before = f.plane.state().gates;
    let kicked = f.svc.monitor.kick_connection(&root(), id, None).unwrap();
    assert_eq!(kicked, Some(a.clone()));
    let gates = f.plane.state().gates;
    assert_eq!(gates[&a.id], Gate::Held(DropReason::GateKicked));
    for other in [&phone, &b] {
        assert_eq!(
            gates.get(&other.id),
            gates_before.get(&other.id),
            "{}/{} untouched",
            other.user,
            other.device
        );
    }
    let tunnel = f.tunnel.state();
    assert_eq!(tunnel[&a.public_key].kicks, 1);
    assert_eq!(
        tunnel[&phone.public_key].kicks, 0,
        "alice's other device stays"
    );
    assert_eq!(tunnel[&b.public_key].kicks, 0);
    let audit = &f.svc.core.audit_records(None, 1).unwrap()[0];
    assert_eq!(
        (audit.action.as_str(), audit.target.as_str()),
        ("connection.kick", "peer:alice/default")
    );
    assert_eq!(
        audit.after.as_ref().unwrap()["connection"],
        id.to_string().as_str()
    );
    assert!(
        f.svc
            .core
            .audit_records(Some(&u("alice")), 10)
            .unwrap()
            .iter()
            .any(|r| r.action == "connection.kick"),
        "`history audit --user alice` finds it"
    );
    // The tunnel reports the kick; the session closes as kicked, under the same id.
    rec.on_event(SessionEvent::Disconnected {
        key: a.public_key,
        reason: EndReason::Kicked,
        at: SystemTime::now(),
    })
    .unwrap();
    let h = f
        .svc
        .history
        .history(&HistoryQuery {
            user: Some(u("alice")),
            ..HistoryQuery::default()
        })
        .unwrap();
    let s = h.sessions.iter().find(|s| s.id == id).expect("same id");
    assert_eq!(s.reason, Some(EndReason::Kicked));
    assert!(s.end.is_some());
    assert_eq!(connection_id(&f, &a), None, "no open session, no id");
    assert!(connection_id(&f, &phone).is_some());
    // Closed now: not found, naming it; nothing more happens.
    let e = f
        .svc
        .monitor
        .kick_connection(&root(), id, None)
        .unwrap_err();
    assert!(
        matches!(&e, ServiceError::NotFound { what: "connection", name } if *name == id.to_string()),
        "{e}"
    );
    assert_eq!(f.tunnel.state()[&a.public_key].kicks, 1);
    // A new handshake is a new session with a new id.
    f.svc.monitor.on_handshake(&a.public_key).unwrap();
    rec.on_event(SessionEvent::Connected {
        key: a.public_key,
        endpoint: "192.0.2.1:4001".parse().unwrap(),
        at: SystemTime::now(),
    })
    .unwrap();
    let again = connection_id(&f, &a).unwrap();
    assert_ne!(again, id);
    assert_eq!(f.plane.state().gates[&a.id], Gate::Admitted { until: None });
}

#[test]
fn kick_by_connection_refuses_unknown_ids_and_other_users_to_a_restricted_caller() {
    let f = fixture(false);
    let (_rec, [a, phone, b]) = three_connected(&f);
    let audit_before = f.svc.core.audit_records(None, 100).unwrap().len();
    let unchanged = |f: &Fixture| {
        let t = f.tunnel.state();
        assert!(
            [&a, &phone, &b].iter().all(|p| t[&p.public_key].kicks == 0),
            "nothing kicked"
        );
        assert_eq!(
            f.svc.core.audit_records(None, 100).unwrap().len(),
            audit_before
        );
    };
    let not_found = |r: Result<Option<domain::Peer>, ServiceError>, id: domain::SessionId| {
        let e = r.unwrap_err();
        assert!(
            matches!(&e, ServiceError::NotFound { what: "connection", name } if *name == id.to_string()),
            "{e}"
        );
        assert_eq!(e.to_string(), format!("connection \"{id}\" not found"));
    };
    // Well-formed ids of no open session: another start, another peer id.
    let id = connection_id(&f, &a).unwrap();
    for unknown in [
        domain::SessionId {
            start_ns: id.start_ns + 1,
            ..id
        },
        domain::SessionId { peer: 999, ..id },
        domain::SessionId {
            peer: phone.id,
            ..id
        },
    ] {
        not_found(
            f.svc.monitor.kick_connection(&root(), unknown, None),
            unknown,
        );
    }
    unchanged(&f);
    // A caller restricted to bob: alice's connection does not exist for it.
    not_found(
        f.svc.monitor.kick_connection(&root(), id, Some(&u("bob"))),
        id,
    );
    unchanged(&f);
    // Restricted to alice: hers it may kick.
    let kicked = f
        .svc
        .monitor
        .kick_connection(&root(), id, Some(&u("alice")))
        .unwrap();
    assert_eq!(kicked, Some(a));
}
