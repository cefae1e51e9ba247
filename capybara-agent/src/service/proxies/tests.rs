//! Proxy identities on the in-memory dataplane: ids shared with devices, the policy reaching
//! proxy lines, credentials, restart, bad input, client configs.

use std::{sync::Arc, time::Duration};

use capybara_common::drop::DropReason;

use super::*;
use crate::{
    dataplane::Gate,
    service::{
        NewUser, Service, ServiceConfig, ServiceError,
        domain::{DeviceName, UserName},
        policy::{LimitsTarget, model::LimitsText},
        testing::{MemoryPlane, open_service},
    },
};

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn name(s: &str) -> UserName {
    UserName::parse("name", s).unwrap()
}

fn settings(cipher: ShadowsocksCipher) -> ProxySettings {
    ProxySettings {
        shadowsocks: Some(ShadowsocksEndpoint {
            listen: "0.0.0.0:8388".parse().unwrap(),
            cipher,
        }),
        vless: Some(VlessEndpoint {
            listen: "0.0.0.0:8443".parse().unwrap(),
            sni: Some("vpn.example.com".into()),
            cert_pem: Some(
                "-----BEGIN CERTIFICATE-----\nMIIB\nAAAA\n-----END CERTIFICATE-----\n".into(),
            ),
            cert_sha256: Some([7; 32]),
        }),
    }
}

fn open(dir: &std::path::Path, plane: Arc<MemoryPlane>) -> Service {
    let svc = open_service(
        dir,
        plane,
        ServiceConfig::for_tests("10.96.0.1/24", "fd96::1/64", "vpn.example.com:51820"),
    );
    svc.proxies.configure(settings(ShadowsocksCipher::DEFAULT));
    svc
}

fn add(svc: &Service, user: &str, protocols: &[Protocol]) -> crate::service::AddedUser {
    svc.users
        .add_user_with(
            &root(),
            NewUser {
                name: name(user),
                device: DeviceName::default_device(),
                expires_at: None,
            },
            protocols,
        )
        .unwrap()
}

const ALL: [Protocol; 3] = [Protocol::Wireguard, Protocol::Shadowsocks, Protocol::Vless];

/// An open connection of alice's Shadowsocks identity `id`, in the registry the endpoints share.
fn open_shadowsocks(svc: &Service, id: PeerId) -> crate::proxy::registry::Conn {
    svc.core.proxies.open(
        crate::proxy::Identity {
            id,
            user: name("alice"),
            protocol: Protocol::Shadowsocks,
        },
        "192.0.2.1:1".parse().unwrap(),
        crate::proxy::Target::Addr("192.0.2.2:80".parse().unwrap()),
        SystemTime::now(),
    )
}

#[test]
fn proxy_ids_come_from_the_devices_id_space_and_are_freed() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let a = add(&svc, "alice", &ALL);
    let dev = a.config.as_ref().unwrap().peer.id;
    let ss = a.proxies[0].access.id;
    let vl = a.proxies[1].access.id;
    assert_eq!(
        (a.proxies[0].access.protocol, a.proxies[1].access.protocol),
        (Protocol::Shadowsocks, Protocol::Vless)
    );
    let mut ids = vec![dev, ss, vl];
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2], "one id each, from the same bitmap");
    // The kernel has a line for each; the proxy lines have no allowed IPs and no tunnel peer.
    let st = plane.state();
    assert_eq!(st.peers[&ss], Vec::<crate::net::Cidr>::new());
    assert_eq!(st.peers[&vl], Vec::<crate::net::Cidr>::new());
    assert_eq!(st.peers[&dev].len(), 2);
    assert!(svc.directory.peer_by_id(ss).is_none());
    assert_eq!(
        svc.directory.proxy_by_id(vl).unwrap().protocol,
        Protocol::Vless
    );
    // A device added next gets the next id, never a proxy identity's.
    let bob = add(&svc, "bob", &[Protocol::Wireguard]);
    assert_eq!(bob.config.unwrap().peer.id, 3);
    // Removing a protocol frees its id (and its kernel line): the next device takes it.
    let removed = svc
        .proxies
        .remove_protocol(&root(), &name("alice"), Protocol::Shadowsocks)
        .unwrap();
    assert_eq!(removed.id, ss);
    assert!(!plane.state().peers.contains_key(&ss));
    let cfg = svc
        .devices
        .add_device(
            &root(),
            &name("bob"),
            &DeviceName::parse("device", "phone").unwrap(),
        )
        .unwrap();
    assert_eq!(cfg.peer.id, ss);
    // A user with proxy protocols only has no device and no tunnel peer.
    let c = add(&svc, "carol", &[Protocol::Vless]);
    assert!(c.config.is_none());
    assert_eq!(c.proxies[0].access.id, 4);
    let detail = svc.users.get_user(&name("carol")).unwrap();
    assert!(detail.peers.is_empty());
    assert_eq!(detail.protocols(), [Protocol::Vless]);
    // Removing the user removes its identities and their lines.
    svc.users.remove_user(&root(), &name("alice")).unwrap();
    let st = plane.state();
    assert!(!st.peers.contains_key(&vl) && !st.peers.contains_key(&dev));
    assert!(svc.directory.proxy_by_id(vl).is_none());
    assert!(
        svc.directory
            .proxy(&name("alice"), Protocol::Vless)
            .is_none()
    );
    assert_eq!(
        svc.directory.allocate_ids(2, &[]).unwrap(),
        [dev.min(vl), dev.max(vl)]
    );
}

fn limits(svc: &Service, user: &str, f: impl FnOnce(&mut LimitsText)) {
    let mut t = LimitsText::default();
    f(&mut t);
    svc.policy
        .set_limits(
            &root(),
            &LimitsTarget::User(name(user)),
            &t.parse().unwrap(),
        )
        .unwrap();
}

#[test]
fn the_users_policy_reaches_its_proxy_lines_as_a_devices() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let a = add(&svc, "alice", &ALL);
    let dev = a.config.unwrap().peer.id;
    let (ss, vl) = (a.proxies[0].access.id, a.proxies[1].access.id);
    assert!(svc.proxies.admitted(ss) && svc.proxies.admitted(vl));
    limits(&svc, "alice", |t| {
        t.bandwidth = Some("20Mbps".into());
        t.flows = Some("100".into());
        t.limit = Some("10GB".into());
    });
    let p = plane.state().policy;
    let rates = p.rates.get(&dev).copied().unwrap_or_default();
    assert!(
        rates.to_peer.is_some() && rates.from_peer.is_some(),
        "{rates:?}"
    );
    for id in [dev, ss, vl] {
        assert_eq!(p.rates.get(&id), Some(&rates), "rates of line {id}");
        assert_eq!(p.flows.get(&id), Some(&100), "flows of line {id}");
    }
    // One quota bucket for the user: every protocol charges it.
    assert!(p.assigned.contains_key(&dev));
    assert_eq!(p.assigned.get(&ss), p.assigned.get(&dev));
    assert_eq!(p.assigned.get(&vl), p.assigned.get(&dev));
    // The account expiry holds the proxy lines too, cuts their open connections, and the
    // endpoints refuse new ones.
    let conn = open_shadowsocks(&svc, ss);
    svc.users
        .expire_user(
            &root(),
            &name("alice"),
            SystemTime::now() - Duration::from_secs(5),
        )
        .unwrap();
    let st = plane.state();
    for id in [dev, ss, vl] {
        assert_eq!(
            st.gates[&id],
            Gate::Held(DropReason::GateExpired),
            "gate of {id}"
        );
    }
    assert!(
        conn.cut().is_cancelled(),
        "the held identity's connection is cut"
    );
    drop(conn);
    assert!(!svc.proxies.admitted(ss) && !svc.proxies.admitted(vl));
    svc.users.renew_user(&root(), &name("alice"), None).unwrap();
    assert!(svc.proxies.admitted(ss));
    assert_eq!(plane.state().gates[&ss], Gate::Admitted { until: None });
    // A protocol added later gets the policy at once.
    svc.proxies
        .remove_protocol(&root(), &name("alice"), Protocol::Vless)
        .unwrap();
    let cfg = svc
        .proxies
        .add_protocol(&root(), &name("alice"), Protocol::Vless)
        .unwrap();
    let p = plane.state().policy;
    assert_eq!(p.flows.get(&cfg.access.id), Some(&100));
    assert_eq!(p.assigned.get(&cfg.access.id), p.assigned.get(&dev));
}

#[test]
fn a_protocol_counts_as_one_device_for_the_device_limit() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let a = add(&svc, "alice", &ALL);
    let dev = a.config.as_ref().unwrap().peer.clone();
    let (ss, vl) = (a.proxies[0].access.id, a.proxies[1].access.id);
    limits(&svc, "alice", |t| t.connections = Some("1".into()));
    // Before the endpoints' checks below, which take the real time.
    let t0 = SystemTime::now() - Duration::from_secs(60);
    // The WireGuard device comes online first; a Shadowsocks connection is then one device
    // too many: that identity is held, the device keeps its slot.
    svc.policy.on_connect(&dev.public_key, t0).unwrap();
    svc.policy
        .on_proxy_open(ss, t0 + Duration::from_secs(1))
        .unwrap();
    let st = plane.state();
    assert_eq!(st.gates[&dev.id], Gate::Admitted { until: None });
    assert_eq!(st.gates[&ss], Gate::Held(DropReason::GateDeviceLimit));
    assert!(!svc.proxies.admitted(ss));
    // Not online, VLESS is not counted (and is admitted: it would take a slot once free).
    assert!(svc.proxies.admitted(vl));
    // The device leaves: the waiting identity gets the slot.
    svc.policy
        .on_disconnect(&dev.public_key, t0 + Duration::from_secs(2))
        .unwrap();
    assert_eq!(plane.state().gates[&ss], Gate::Admitted { until: None });
    assert!(svc.proxies.admitted(ss));
    // An endpoint's check is the connection's start: over the limit it is refused and leaves
    // no slot taken (VLESS stays offline; Shadowsocks keeps its slot).
    let creds: &dyn Credentials = &*svc.proxies;
    assert!(!creds.admitted(vl));
    assert!(svc.proxies.admitted(ss));
    assert_eq!(plane.state().gates[&ss], Gate::Admitted { until: None });
    // The identity's last connection closes: the slot is free again.
    svc.policy
        .on_proxy_close(ss, t0 + Duration::from_secs(3))
        .unwrap();
    svc.policy
        .on_proxy_open(vl, t0 + Duration::from_secs(4))
        .unwrap();
    assert!(svc.proxies.admitted(vl));
    assert_eq!(plane.state().gates[&vl], Gate::Admitted { until: None });
}

#[test]
fn a_kick_cuts_the_connections_and_the_next_one_is_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let a = add(&svc, "alice", &[Protocol::Shadowsocks]);
    let ss = a.proxies[0].access.id;
    svc.policy.on_proxy_open(ss, SystemTime::now()).unwrap();
    // An open connection of it, in the registry the endpoints share.
    let conn = open_shadowsocks(&svc, ss);
    svc.monitor
        .kick(
            &crate::service::domain::Actor::Local { uid: 0 },
            &name("alice"),
        )
        .unwrap();
    assert!(conn.cut().is_cancelled(), "its connection is cut");
    // Not held in the kernel: a hold there would drop the endpoint's reset too.
    assert_eq!(plane.state().gates[&ss], Gate::Admitted { until: None });
    drop(conn);
    // The policy's decision is unchanged: the endpoint admits the next connection.
    let creds: &dyn Credentials = &*svc.proxies;
    assert!(creds.admitted(ss));
    assert_eq!(plane.state().gates[&ss], Gate::Admitted { until: None });
}

#[test]
fn identities_and_credentials_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (ss_key, uuid, ids) = {
        let plane = Arc::new(MemoryPlane::default());
        let svc = open(dir.path(), plane);
        let a = add(&svc, "alice", &ALL);
        let creds: &dyn Credentials = &*svc.proxies;
        let keys = creds.shadowsocks();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key.len(), 32);
        let uuid = a.proxies[1]
            .uri
            .strip_prefix("vless://")
            .unwrap()
            .split('@')
            .next()
            .unwrap()
            .to_owned();
        let ids: Vec<PeerId> = a.proxies.iter().map(|p| p.access.id).collect();
        (keys[0].key.clone(), uuid, ids)
    };
    // A new kernel (a reboot): the stored identities are programmed again.
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let creds: &dyn Credentials = &*svc.proxies;
    let keys = creds.shadowsocks();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key, ss_key);
    assert_eq!(keys[0].identity.user, name("alice"));
    assert_eq!(keys[0].identity.id, ids[0]);
    let who = creds.vless(&parse_uuid(&uuid).unwrap()).unwrap();
    assert_eq!((who.id, who.protocol), (ids[1], Protocol::Vless));
    assert!(creds.vless(&[0; 16]).is_none());
    let st = plane.state();
    for id in &ids {
        assert!(st.peers[id].is_empty());
        assert_eq!(st.gates[id], Gate::Admitted { until: None });
    }
    assert!(creds.admitted(ids[0]));
    // The config is the same as when it was made.
    let cfg = svc
        .proxies
        .client_config(&root(), &name("alice"), Protocol::Vless)
        .unwrap();
    assert!(cfg.uri.starts_with(&format!("vless://{uuid}@")));
    // And a backup holds them.
    let mut out = Vec::new();
    svc.store().write_backup(0, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("\"proxies\"") && text.contains(&uuid),
        "backup"
    );
    // Removal leaves the credentials at once.
    svc.users.remove_user(&root(), &name("alice")).unwrap();
    assert!(creds.shadowsocks().is_empty());
    assert!(creds.vless(&parse_uuid(&uuid).unwrap()).is_none());
    assert!(!creds.admitted(ids[0]));
}

#[test]
fn bad_input_names_the_field_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    add(&svc, "alice", &[Protocol::Wireguard, Protocol::Shadowsocks]);
    let audit = || svc.core.audit_page(None, None, 1000).unwrap().items.len();
    let before = (audit(), plane.state().peers.len());
    let field = |e: ServiceError| match e {
        ServiceError::Invalid(v) => v.field(),
        other => panic!("not a validation error: {other:?}"),
    };
    let new = |n: &str| NewUser {
        name: name(n),
        device: DeviceName::default_device(),
        expires_at: None,
    };
    let u = &name("alice");
    // Already present.
    let e = svc
        .proxies
        .add_protocol(&root(), u, Protocol::Shadowsocks)
        .unwrap_err();
    assert_eq!(field(e), "protocol");
    // WireGuard is by device.
    let e = svc
        .proxies
        .add_protocol(&root(), u, Protocol::Wireguard)
        .unwrap_err();
    assert_eq!(field(e), "protocol");
    // Not present.
    let e = svc
        .proxies
        .remove_protocol(&root(), u, Protocol::Vless)
        .unwrap_err();
    assert_eq!(field(e), "protocol");
    // Listed twice, none.
    let e = svc
        .users
        .add_user_with(&root(), new("bob"), &[Protocol::Vless, Protocol::Vless])
        .unwrap_err();
    assert_eq!(field(e), "protocol");
    let e = svc
        .users
        .add_user_with(&root(), new("bob"), &[])
        .unwrap_err();
    assert_eq!(field(e), "protocol");
    // An endpoint this agent does not run.
    svc.proxies.configure(ProxySettings {
        vless: None,
        ..settings(ShadowsocksCipher::DEFAULT)
    });
    let e = svc
        .users
        .add_user_with(&root(), new("bob"), &[Protocol::Wireguard, Protocol::Vless])
        .unwrap_err();
    assert!(e.to_string().contains("--vless-listen"), "{e}");
    assert_eq!(field(e), "protocol");
    let e = svc
        .proxies
        .add_protocol(&root(), u, Protocol::Vless)
        .unwrap_err();
    assert_eq!(field(e), "protocol");
    assert!(!svc.directory.user_exists(&name("bob")).unwrap());
    assert_eq!((audit(), plane.state().peers.len()), before);
    // A kernel that refuses the line: nothing stays (the user, the batch, the audit record).
    plane.with(|s| s.fail_next_set_peer = true);
    svc.users
        .add_user_with(&root(), new("bob"), &[Protocol::Shadowsocks])
        .unwrap_err();
    assert!(!svc.directory.user_exists(&name("bob")).unwrap());
    assert_eq!((audit(), plane.state().peers.len()), before);
}

#[test]
fn shadowsocks_configs_follow_sip002_for_both_editions() {
    let secret = [0xfb; 32];
    let b64 = base64::engine::general_purpose::STANDARD;
    // 2022: the PSK is the secret; userinfo percent-encoded, never base64.
    let (uri, json) = shadowsocks_config(
        ShadowsocksCipher::Blake3Aes256Gcm,
        &secret,
        "vpn.example.com",
        8388,
        "alice",
    );
    let psk = b64.encode(secret);
    assert_eq!(
        uri,
        format!(
            "ss://2022-blake3-aes-256-gcm:{}@vpn.example.com:8388#alice",
            psk.replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D")
        )
    );
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["server"], "vpn.example.com");
    assert_eq!(j["server_port"], 8388);
    assert_eq!(j["method"], "2022-blake3-aes-256-gcm");
    assert_eq!(j["mode"], "tcp_and_udp", "UDP ASSOCIATE is relayed");
    assert_eq!(j["password"], psk);
    assert_eq!(
        ShadowsocksCipher::Blake3Aes128Gcm.key(&secret),
        secret[..16].to_vec()
    );
    // SIP004: userinfo is base64url without padding of method:password; IPv6 in brackets.
    let (uri, json) = shadowsocks_config(
        ShadowsocksCipher::Aes256Gcm,
        &secret,
        "2001:db8::1",
        8388,
        "bob",
    );
    let info = uri
        .strip_prefix("ss://")
        .unwrap()
        .split('@')
        .next()
        .unwrap();
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(info)
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        format!("aes-256-gcm:{psk}")
    );
    assert!(uri.ends_with("@[2001:db8::1]:8388#bob"), "{uri}");
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["method"], "aes-256-gcm");
    // The key a SIP004 client derives from that password (EVP_BytesToKey, MD5).
    assert_eq!(
        ShadowsocksCipher::Aes256Gcm.key(&secret),
        evp_bytes_to_key(psk.as_bytes(), 32)
    );
    // The reference derivation checked against Python's hashlib: md5(p) || md5(md5(p) || p).
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(
        hex(&evp_bytes_to_key(b"barfoo!", 32)),
        "b3adc47839e047eb228870526dc8fc30b347287ffca3045dcea06b3fdf090acb"
    );
    assert_eq!(
        hex(&evp_bytes_to_key(b"barfoo!", 16)),
        "b3adc47839e047eb228870526dc8fc30"
    );
}

#[test]
fn vless_configs_pin_the_certificate_for_v2ray_4_34_and_later() {
    let ep = settings(ShadowsocksCipher::DEFAULT).vless.unwrap();
    let uuid = new_uuid();
    let b = parse_uuid(&uuid).unwrap();
    assert_eq!(format_uuid(&b), uuid);
    assert_eq!((b[6] >> 4, b[8] >> 6), (4, 0b10), "version 4, RFC variant");
    let (uri, json) = vless_config(&ep, &uuid, "192.0.2.1", "alice");
    assert_eq!(
        uri,
        format!(
            "vless://{uuid}@192.0.2.1:8443?encryption=none&security=tls&sni=vpn.example.com&type=tcp#alice"
        )
    );
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    let inbound = &j["inbounds"][0];
    assert_eq!(
        (&inbound["protocol"], &inbound["listen"], &inbound["port"]),
        (
            &serde_json::json!("socks"),
            &serde_json::json!("127.0.0.1"),
            &serde_json::json!(1080)
        )
    );
    assert_eq!(inbound["settings"]["udp"], true, "UDP ASSOCIATE is relayed");
    let out = &j["outbounds"][0];
    assert_eq!(out["protocol"], "vless");
    let server = &out["settings"]["vnext"][0];
    assert_eq!(server["address"], "192.0.2.1");
    assert_eq!(server["port"], 8443);
    assert_eq!(server["users"][0]["id"], uuid.as_str());
    assert_eq!(server["users"][0]["encryption"], "none");
    let ss = &out["streamSettings"];
    assert_eq!(
        (&ss["network"], &ss["security"]),
        (&"tcp".into(), &"tls".into())
    );
    let tls = &ss["tlsSettings"];
    assert_eq!(tls["serverName"], "vpn.example.com");
    assert_eq!(tls["disableSystemRoot"], true);
    assert_eq!(tls["certificates"][0]["usage"], "verify");
    assert_eq!(
        tls["certificates"][0]["certificate"],
        serde_json::json!([
            "-----BEGIN CERTIFICATE-----",
            "MIIB",
            "AAAA",
            "-----END CERTIFICATE-----"
        ])
    );
    assert_eq!(
        tls["pinnedPeerCertificateChainSha256"][0],
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    );
    // Without a certificate the agent knows (one from a CA), no pin: the system roots.
    let plain = VlessEndpoint {
        cert_pem: None,
        cert_sha256: None,
        sni: None,
        ..ep
    };
    let (uri, json) = vless_config(&plain, &uuid, "vpn.example.org", "alice");
    assert!(uri.contains("sni=vpn.example.org"), "{uri}");
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    let tls = &j["outbounds"][0]["streamSettings"]["tlsSettings"];
    assert!(tls.get("certificates").is_none() && tls.get("disableSystemRoot").is_none());
    assert!(parse_uuid("not-a-uuid").is_none());
    assert_eq!(host_of("[2001:db8::1]:51820"), "2001:db8::1");
    assert_eq!(host_of("vpn.example.com:51820"), "vpn.example.com");
}

#[test]
fn changing_the_cipher_keeps_the_credential_and_changes_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Arc::new(MemoryPlane::default()));
    add(&svc, "alice", &[Protocol::Shadowsocks]);
    let creds: &dyn Credentials = &*svc.proxies;
    let k2022 = creds.shadowsocks()[0].key.clone();
    svc.proxies
        .configure(settings(ShadowsocksCipher::Chacha20IetfPoly1305));
    let k = creds.shadowsocks()[0].key.clone();
    assert_eq!(k.len(), 32);
    assert_ne!(k, k2022);
    let cfg = svc
        .proxies
        .client_config(&root(), &name("alice"), Protocol::Shadowsocks)
        .unwrap();
    let j: serde_json::Value = serde_json::from_str(&cfg.json).unwrap();
    assert_eq!(j["method"], "chacha20-ietf-poly1305");
    assert_eq!(
        evp_bytes_to_key(j["password"].as_str().unwrap().as_bytes(), 32),
        k
    );
}

#[test]
fn a_proxy_session_is_one_connection_row_and_kick_cuts_its_connections() {
    use crate::proxy::{Identity, Target};
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let a = add(&svc, "alice", &[Protocol::Wireguard, Protocol::Shadowsocks]);
    let id = a.proxies[0].access.id;
    let ss = Identity {
        id,
        user: name("alice"),
        protocol: Protocol::Shadowsocks,
    };
    let t0 = SystemTime::now();
    let dest = Target::Domain("example.org".into(), 443);
    let reg = &svc.core.proxies;
    let first = reg.open(
        ss.clone(),
        "192.0.2.7:1000".parse().unwrap(),
        dest.clone(),
        t0,
    );
    let t1 = t0 + Duration::from_secs(5);
    let second = reg.open(ss, "192.0.2.8:2000".parse().unwrap(), dest, t1);
    plane.with(|s| {
        s.stats.insert(
            id,
            capybara_common::peer::PeerStats {
                rx_bytes: 300,
                tx_bytes: 4_000,
                ..Default::default()
            },
        );
    });
    let c = svc.monitor.connections().unwrap();
    let row = c.iter().find(|c| c.peer.is_none()).expect("the proxy row");
    assert_eq!(
        (row.user.as_str(), row.device.as_str(), row.protocol),
        ("alice", "shadowsocks", Protocol::Shadowsocks)
    );
    assert_eq!(row.open_connections, 2);
    assert_eq!(
        row.endpoint.as_deref(),
        Some("192.0.2.8:2000"),
        "the latest connection's"
    );
    assert_eq!(
        row.last_handshake,
        Some(crate::service::domain::unix_secs(t1))
    );
    assert_eq!(
        (row.rx_bytes, row.tx_bytes),
        (300, 4_000),
        "the identity's kernel counters"
    );
    assert_eq!(c.len(), 2, "alice's WireGuard device is listed beside it");

    svc.monitor.kick(&root(), &name("alice")).unwrap();
    assert!(first.cut().is_cancelled() && second.cut().is_cancelled());
    let audit = svc.core.audit_records(None, 10).unwrap();
    let kick = audit
        .iter()
        .find(|r| r.action == "connection.kick")
        .unwrap();
    assert_eq!(kick.after.as_ref().unwrap()["proxy_connections"], 2);
}

#[test]
fn stats_count_proxy_identities_in_their_users_and_page_proxy_only_users() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let a = add(&svc, "alice", &ALL);
    let b = add(&svc, "bob", &[Protocol::Vless]); // no device
    let c = add(&svc, "carol", &[Protocol::Wireguard]);
    let dev = a.config.as_ref().unwrap().peer.id;
    let (ss, vl) = (a.proxies[0].access.id, a.proxies[1].access.id);
    let bob_vl = b.proxies[0].access.id;
    let carol = c.config.as_ref().unwrap().peer.id;
    let counters = |rx: u64, tx: u64| capybara_common::peer::PeerStats {
        rx_packets: 1,
        rx_bytes: rx,
        tx_packets: 1,
        tx_bytes: tx,
        ..Default::default()
    };
    plane.with(|s| {
        s.stats.insert(dev, counters(100, 1_000));
        s.stats.insert(ss, counters(20, 2_000));
        s.stats.insert(vl, counters(3, 30_000));
        s.stats.insert(bob_vl, counters(4, 40));
        s.stats.insert(carol, counters(5, 50));
    });

    let st = svc.monitor.stats(Some(&name("alice"))).unwrap();
    assert_eq!(st.peers.len(), 1);
    let lines: Vec<(Protocol, u32, u64)> = st
        .proxies
        .iter()
        .map(|p| (p.protocol, p.id, p.stats.tx.bytes))
        .collect();
    assert_eq!(
        lines,
        [
            (Protocol::Shadowsocks, ss, 2_000),
            (Protocol::Vless, vl, 30_000)
        ]
    );
    let alice = &st.users["alice"];
    assert_eq!(
        (alice.rx.bytes, alice.tx.bytes),
        (123, 33_000),
        "devices and proxies"
    );

    // Paged, one user a page: bob (a proxy only) has his page between alice's and carol's.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = svc.monitor.stats_page(after.as_deref(), 1).unwrap();
        let users: Vec<&String> = page.users.keys().collect();
        assert_eq!(users.len(), 1, "{page:?}");
        seen.push((
            users[0].clone(),
            page.peers.len(),
            page.proxies.len(),
            page.users[users[0]].tx.bytes,
        ));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(
        seen,
        [
            ("alice".to_owned(), 1, 2, 33_000),
            ("bob".to_owned(), 0, 1, 40),
            ("carol".to_owned(), 1, 0, 50),
        ]
    );
}

#[test]
fn usage_samples_proxy_identities_as_devices_named_by_protocol_and_no_device_takes_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let a = add(&svc, "alice", &ALL);
    let ss = a.proxies[0].access.id;
    plane.with(|s| {
        s.stats.insert(
            ss,
            capybara_common::peer::PeerStats {
                rx_bytes: 7,
                tx_bytes: 70,
                ..Default::default()
            },
        );
    });
    let conn = open_shadowsocks(&svc, ss);
    let samples = svc.usage.read_devices().unwrap();
    let by_name = |d: &str| {
        samples
            .iter()
            .find(|s| s.user == "alice" && s.device == d)
            .unwrap_or_else(|| panic!("no {d} sample: {samples:?}"))
    };
    let s = by_name("shadowsocks");
    assert_eq!((s.id, s.online), (ss, true));
    assert_eq!((s.counters.rx_bytes, s.counters.tx_bytes), (7, 70));
    assert_eq!(s.key, usage_key(&name("alice"), Protocol::Shadowsocks));
    assert!(!by_name("vless").online, "no connection open");
    assert!(!by_name("default").online);
    drop(conn);
    // A device may not take a proxy protocol's name; nothing is written.
    for taken in ["shadowsocks", "vless"] {
        let e = svc
            .devices
            .add_device(
                &root(),
                &name("alice"),
                &DeviceName::parse("device", taken).unwrap(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("device"), "{e}");
    }
    assert_eq!(svc.users.get_user(&name("alice")).unwrap().peers.len(), 1);
}

/// OpenSSL's `EVP_BytesToKey` with MD5, one iteration, no salt, written out as the reference the
/// endpoint's derivation (shadowsocks-rust's) is checked against: `D_i = MD5(D_{i-1} || password)`.
fn evp_bytes_to_key(password: &[u8], len: usize) -> Vec<u8> {
    use md5::Digest as _;
    let mut key = Vec::with_capacity(len + 16);
    let mut prev: Vec<u8> = Vec::new();
    while key.len() < len {
        let mut h = md5::Md5::new();
        h.update(&prev);
        h.update(password);
        prev = h.finalize().to_vec();
        key.extend_from_slice(&prev);
    }
    key.truncate(len);
    key
}
