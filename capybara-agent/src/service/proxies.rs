//! Proxy identities: a user's access by Shadowsocks or VLESS (issue 24, `crate::proxy`).
//!
//! A user has at most one proxy identity per protocol: its credential and a dense id taken
//! from the **same** id bitmap as WireGuard devices (`directory`), so the identity's kernel line
//! `CAPY_PEER_HOT[id]` carries the user's policy exactly as a device's does. A proxy identity's
//! line has no allowed IPs and no tunnel peer: it is programmed with `Plane::set_peer(id, &[])`
//! (the line, its counters and its gate; nothing in the address maps) and never reaches the
//! tunnel. The policy (`service::policy`) applies to it as to a device: the gate (window,
//! daily time, device limit, account expiry, holds), the quota bucket, the rates and the flow
//! limit.
//!
//! ## Decisions
//! - **Device limit** (`max devices` / `--connections`): a proxy identity counts as one device
//!   while it has an open connection (`Policy::on_proxy_open` / `on_proxy_close`, called by
//!   the endpoints' event sink), however many connections it has: users expect "a protocol
//!   counts like one device". Over the limit, the identity that came online last is held, as a
//!   device is.
//! - **MFA**: does not gate proxy identities. The MFA admission is per WireGuard session, given
//!   on the verification page reached through the tunnel (by the device's tunnel address); a
//!   Shadowsocks or VLESS client has no tunnel address and no way to that page, so holding its
//!   identity `mfa-pending` would lock the protocol for good. A proxy credential is a 256-bit
//!   (Shadowsocks) or 122-bit (VLESS) random secret shown only to admins (`user config
//!   --protocol`, audited as `proxy.config`); an admin who requires MFA for a user should not
//!   give that user a proxy protocol.
//! - **Kick** ([`Proxies::kick_user`]): the lines are held `kicked` in the kernel and the open
//!   connections cut; the hold ends, as a device's does at its next handshake, when the
//!   identity's next connection is authenticated ([`Proxies::authenticated`], the endpoints'
//!   `Credentials::admitted`), which answers from the policy's decision, not from the kernel's
//!   kick hold: a kicked user may reconnect, as a kicked WireGuard device may.
//!
//! ## Credentials
//! - Shadowsocks: 32 random bytes, stored base64; the cipher is the agent's setting
//!   (`--shadowsocks-cipher`, default [`ShadowsocksCipher::DEFAULT`]) and the one secret serves
//!   every cipher: the 2022 edition's PSK is the secret (its first 16 bytes for
//!   `2022-blake3-aes-128-gcm`), base64 as the client's password; for the SIP004 AEAD ciphers
//!   the password is the base64 text and the key is derived from it with `EVP_BytesToKey` (MD5),
//!   as every Shadowsocks client derives it. Changing the cipher keeps the users' credentials
//!   (their client configs change).
//! - VLESS: a random UUID (version 4).
//!
//! [`Proxies`] implements `crate::proxy::Credentials`: a snapshot of the Shadowsocks keys
//! (`Arc<[ShadowsocksKey]>`) and a map of VLESS UUIDs, rebuilt after every change under the
//! writer lock (and when the cipher changes), read lock-free of the store.
//!
//! ## Order of a change
//! As devices (`service::devices`): validate (nothing changed on an error) → the kernel line
//! (adding) → one synced batch with the record and its audit record → the directory, the
//! credentials, the policy. Removal: the kernel line first, then the batch (a failed commit
//! programs it again), then the open connections are cut (the registry,
//! [`Proxies::registry`]).
//!
//! ## Client configs
//! The endpoints' settings ([`ProxySettings`]) come from the agent's flags (`--shadowsocks-listen`,
//! `--shadowsocks-cipher`, `--vless-listen`, `--vless-cert`, `--vless-key`, `--vless-sni`), set
//! with [`Proxies::configure`] by the daemon after the service opened; the host is the one
//! WireGuard configs use (`--public-endpoint`'s host), the port the endpoint's listen port.
//! - Shadowsocks: a SIP002 URI (`ss://userinfo@host:port#user`; userinfo base64url without
//!   padding of `method:password` for SIP004 ciphers, percent-encoded `method:password` for the
//!   2022 ciphers, as SIP002 requires) and an `ss-local` JSON config.
//! - VLESS: `vless://UUID@host:port?encryption=none&security=tls&sni=SNI&type=tcp#user` and a
//!   v2ray client JSON (socks inbound on 127.0.0.1:1080, a `vless` outbound over TCP with TLS).
//!   When the agent knows its certificate (a self-signed one, [`VlessEndpoint::cert_pem`]), the
//!   JSON pins it. Debian's v2ray is 4.34, which has no `pinnedPeerCertificateChainSha256` (added
//!   in v4.38.0, v2fly/v2ray-core 0c6a2e06b); 4.34 trusts a `certificates` entry with
//!   `usage: "verify"` as a root (`transport/internet/tls/config_other.go`, `getCertPool`),
//!   and with `disableSystemRoot: true` only it: Go accepts a leaf found in the root pool, so
//!   this pins the certificate (its name must still match `serverName`). Both are written: the
//!   `certificates` entry for 4.34, `pinnedPeerCertificateChainSha256` (base64 of the SHA-256
//!   of the certificate, the chain hash of a one-certificate chain) for newer versions; v2ray's
//!   JSON loader ignores fields it does not know.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::SystemTime,
};

use base64::Engine as _;
use capybara_common::peer::PeerId;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

use super::{
    ServiceError,
    core::{Core, now, to_json},
    directory::{Directory, ProxyRecord},
    domain::{Actor, Protocol, ProxyAccess, PublicKey, UserName, ValidationError},
    policy::Policy,
};
use crate::{
    dataplane::DataplaneError,
    proxy::{
        Credentials, Identity, ShadowsocksKey,
        registry::{CutCause, Registry},
    },
    store::{Batch, Cf, keys},
};

/// A Shadowsocks AEAD cipher (`--shadowsocks-cipher`): the endpoint's own type, one for the
/// service and the endpoint.
pub use crate::proxy::shadowsocks::Cipher as ShadowsocksCipher;

/// The Shadowsocks endpoint's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowsocksEndpoint {
    /// Where it listens (`--shadowsocks-listen`); its port is the clients'.
    pub listen: SocketAddr,
    /// The cipher (`--shadowsocks-cipher`).
    pub cipher: ShadowsocksCipher,
}

/// The VLESS endpoint's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VlessEndpoint {
    /// Where it listens (`--vless-listen`); its port is the clients'.
    pub listen: SocketAddr,
    /// The TLS server name clients send (`--vless-sni`); `None`: the public host.
    pub sni: Option<String>,
    /// The certificate clients pin (PEM), when the agent generated a self-signed one or was
    /// given one (`--vless-cert`); filled by the daemon once it loaded the certificate.
    pub cert_pem: Option<String>,
    /// The SHA-256 of that certificate's DER (its fingerprint).
    pub cert_sha256: Option<[u8; 32]>,
}

/// The proxy endpoints' settings; `None`: that endpoint is not configured (its protocol cannot
/// be given to users).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxySettings {
    /// Shadowsocks.
    pub shadowsocks: Option<ShadowsocksEndpoint>,
    /// VLESS.
    pub vless: Option<VlessEndpoint>,
}

/// A proxy identity's client configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyClientConfig {
    /// The identity.
    pub access: ProxyAccess,
    /// The URI clients import (`ss://…`, `vless://…`), also the QR code's text.
    pub uri: String,
    /// The JSON config: `ss-local`'s (Shadowsocks) or v2ray's (VLESS), pretty-printed.
    pub json: String,
}

/// The credentials endpoints check (see the module docs).
#[derive(Default)]
struct Snapshot {
    shadowsocks: Arc<[ShadowsocksKey]>,
    vless: HashMap<[u8; 16], Identity>,
}

/// The proxy identities feature; also the endpoints' `Credentials`.
pub struct Proxies {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
    settings: RwLock<ProxySettings>,
    snapshot: RwLock<Snapshot>,
    registry: Arc<Registry>,
}

impl fmt::Debug for Proxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxies")
            .field("settings", &*self.settings.read().unwrap())
            .finish_non_exhaustive()
    }
}

/// A random VLESS UUID (version 4, RFC 9562), as text.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

/// `b` as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Parses a UUID's text (with or without dashes, any case).
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|c| *c != b'-').collect();
    if hex.len() != 32 || s.len() != 32 && s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let txt = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(txt, 16).ok()?;
    }
    Some(out)
}

/// A stored Shadowsocks credential's 32 bytes.
fn secret(credential: &str) -> Option<[u8; 32]> {
    base64::engine::general_purpose::STANDARD
        .decode(credential)
        .ok()?
        .try_into()
        .ok()
}

/// The key a proxy identity's usage is recorded under (`service::usage`, where a device's is its
/// WireGuard key): a hash of its user and protocol, stable across restarts and re-creation, and
/// not a point any WireGuard key is (it is never used as one).
pub fn usage_key(user: &UserName, protocol: Protocol) -> PublicKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"capybara proxy identity usage\0");
    h.update(user.as_str().as_bytes());
    h.update(b"/");
    h.update(protocol.as_str().as_bytes());
    PublicKey(h.finalize().into())
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The host of `host:port` (an IPv6 address without its brackets).
pub fn host_of(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, p)| {
        if p.parse::<u16>().is_ok() {
            h
        } else {
            endpoint
        }
    });
    host.trim_start_matches('[').trim_end_matches(']')
}

/// `host` as a URI authority's host (an IPv6 address in brackets).
fn uri_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn not_configured(protocol: Protocol) -> ServiceError {
    let flag = match protocol {
        Protocol::Shadowsocks => "--shadowsocks-listen",
        _ => "--vless-listen",
    };
    ValidationError::Value {
        field: "protocol",
        reason: format!(
            "the {protocol} endpoint is not configured on this agent (start it with {flag} ADDR:PORT)"
        ),
    }
    .into()
}

fn wireguard_not_a_proxy() -> ServiceError {
    ValidationError::Value {
        field: "protocol",
        reason: "wireguard access is by device: use `capybara device add|remove` (or `user add \
                 --protocol wireguard,...`)"
            .into(),
    }
    .into()
}

impl Proxies {
    /// The feature over the shared core, directory and policy; no endpoint configured yet.
    pub fn new(core: Arc<Core>, dir: Arc<Directory>, policy: Arc<Policy>) -> Proxies {
        // An identity whose last connection closed is offline for the policy (a slot of the
        // device limit is free): the registry says so as the connection unregisters, whatever
        // endpoint held it.
        let weak = Arc::downgrade(&policy);
        core.proxies.on_last_close(Box::new(move |id| {
            if let Some(policy) = weak.upgrade()
                && let Err(e) = policy.on_proxy_close(id, SystemTime::now())
            {
                tracing::error!(error = %e, peer = id, "cannot decide a proxy identity's gate");
            }
        }));
        let p = Proxies {
            registry: core.proxies.clone(),
            core,
            dir,
            policy,
            settings: RwLock::new(ProxySettings::default()),
            snapshot: RwLock::new(Snapshot::default()),
        };
        p.rebuild();
        p
    }

    /// Sets the endpoints' settings (the daemon, from its flags, after the service opened; and
    /// again once the VLESS certificate is loaded). The Shadowsocks keys follow the cipher.
    pub fn configure(&self, settings: ProxySettings) {
        *self.settings.write().unwrap() = settings;
        self.rebuild();
    }

    /// The endpoints' settings.
    pub fn settings(&self) -> ProxySettings {
        self.settings.read().unwrap().clone()
    }

    /// The open proxied connections of all endpoints (the `Hub`'s registry, the core's):
    /// removing an identity (or its user) cuts its connections here, `kick` too
    /// (`service::monitor`).
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The identity of `rec`, as endpoints name it.
    fn identity(rec: &ProxyRecord) -> Identity {
        Identity {
            id: rec.access.id,
            user: rec.access.user.clone(),
            protocol: rec.access.protocol,
        }
    }

    /// Rebuilds the credentials snapshot from the directory (after every change).
    fn rebuild(&self) {
        let cipher = self
            .settings
            .read()
            .unwrap()
            .shadowsocks
            .as_ref()
            .map_or(ShadowsocksCipher::DEFAULT, |s| s.cipher);
        let mut ss = Vec::new();
        let mut vless = HashMap::new();
        for rec in self.dir.all_proxies() {
            match rec.access.protocol {
                Protocol::Shadowsocks => match secret(&rec.credential) {
                    Some(s) => ss.push(ShadowsocksKey {
                        identity: Self::identity(&rec),
                        key: cipher.key(&s),
                    }),
                    None => {
                        tracing::error!(user = %rec.access.user, "a stored Shadowsocks credential is not 32 bytes of base64; skipped")
                    }
                },
                Protocol::Vless => match parse_uuid(&rec.credential) {
                    Some(u) => {
                        vless.insert(u, Self::identity(&rec));
                    }
                    None => {
                        tracing::error!(user = %rec.access.user, "a stored VLESS UUID is malformed; skipped")
                    }
                },
                Protocol::Wireguard => {}
            }
        }
        *self.snapshot.write().unwrap() = Snapshot {
            shadowsocks: ss.into(),
            vless,
        };
    }

    /// Checks that `protocol` can be given to a user on this agent (a proxy protocol whose
    /// endpoint is configured).
    pub fn check_protocol(&self, protocol: Protocol) -> Result<(), ServiceError> {
        let s = self.settings.read().unwrap();
        let configured = match protocol {
            Protocol::Wireguard => return Err(wireguard_not_a_proxy()),
            Protocol::Shadowsocks => s.shadowsocks.is_some(),
            Protocol::Vless => s.vless.is_some(),
        };
        if configured {
            Ok(())
        } else {
            Err(not_configured(protocol))
        }
    }

    /// New records for `user`'s `protocols` (proxy protocols, checked), with ids no device
    /// or proxy identity holds and none of `taken` (ids allocated but not yet in the index).
    pub(super) fn new_records(
        &self,
        user: &UserName,
        protocols: &[Protocol],
        taken: &[PeerId],
    ) -> Result<Vec<ProxyRecord>, ServiceError> {
        let ids = self.dir.allocate_ids(protocols.len(), taken)?;
        Ok(protocols
            .iter()
            .zip(ids)
            .map(|(&protocol, id)| ProxyRecord {
                access: ProxyAccess {
                    id,
                    user: user.clone(),
                    protocol,
                    created_at: now(),
                },
                credential: match protocol {
                    Protocol::Vless => new_uuid(),
                    _ => {
                        let mut s = [0u8; 32];
                        rand::rng().fill_bytes(&mut s);
                        base64::engine::general_purpose::STANDARD.encode(s)
                    }
                },
            })
            .collect())
    }

    /// Programs the kernel lines of `recs` (no allowed IPs, no tunnel peer), each with its
    /// user's first gate; on an error none stays programmed.
    pub(super) fn program(&self, recs: &[ProxyRecord]) -> Result<(), ServiceError> {
        let plane = &self.core.plane;
        for (i, r) in recs.iter().enumerate() {
            let id = r.access.id;
            let res = plane
                .set_peer(id, &[])
                .and_then(|()| plane.set_gate(id, self.policy.first_proxy_gate(&r.access.user)));
            if let Err(e) = res {
                for undo in &recs[..=i] {
                    let _ = plane.remove_peer(undo.access.id);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Removes the kernel lines of `recs`.
    pub(super) fn unprogram(&self, recs: &[ProxyRecord]) -> Result<(), ServiceError> {
        for r in recs {
            match self.core.plane.remove_peer(r.access.id) {
                Ok(()) | Err(DataplaneError::UnknownPeer { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Programs every stored proxy identity's line (agent start, after the devices).
    pub fn reconcile(&self) -> Result<(), ServiceError> {
        let lines: Vec<_> = self
            .dir
            .all_proxies()
            .into_iter()
            .map(|r| (r.access.id, Vec::new()))
            .collect();
        if !lines.is_empty() {
            self.core.plane.set_peers(&lines)?;
            tracing::info!(
                proxies = lines.len(),
                "proxy identities restored from the store"
            );
        }
        Ok(())
    }

    /// Makes the directory, the kernel lines and the credentials match the stored proxy
    /// identities of `users` (every user: `None`) after the store changed under them (a
    /// cluster's change applied: `service::cluster`). Answers the users whose identities
    /// changed.
    pub fn resync(
        &self,
        users: Option<&BTreeSet<UserName>>,
    ) -> Result<BTreeSet<UserName>, ServiceError> {
        let stored_of = |prefix: &str| -> Result<Vec<ProxyRecord>, ServiceError> {
            Ok(self
                .core
                .store
                .scan::<ProxyRecord>(Cf::Proxies, prefix)?
                .into_iter()
                .map(|(_, r)| r)
                .collect())
        };
        let (stored, current) = match users {
            None => (stored_of("")?, self.dir.all_proxies()),
            Some(users) => {
                let (mut stored, mut current) = (Vec::new(), Vec::new());
                for u in users {
                    stored.extend(stored_of(&keys::user_proxies_prefix(u.as_str()))?);
                    current.extend(self.dir.proxy_records(u));
                }
                (stored, current)
            }
        };
        let same =
            |a: &ProxyRecord, b: &ProxyRecord| a.access == b.access && a.credential == b.credential;
        let gone: Vec<ProxyRecord> = current
            .iter()
            .filter(|c| !stored.iter().any(|s| same(s, c)))
            .cloned()
            .collect();
        let new: Vec<ProxyRecord> = stored
            .into_iter()
            .filter(|s| !current.iter().any(|c| same(s, c)))
            .collect();
        let mut users = BTreeSet::new();
        if !gone.is_empty() {
            if let Err(e) = self.unprogram(&gone) {
                tracing::error!(error = %e, "cluster: cannot unprogram removed proxy identities");
            }
            self.left(&gone);
            users.extend(gone.iter().map(|r| r.access.user.clone()));
        }
        if !new.is_empty() {
            if let Err(e) = self.program(&new) {
                tracing::error!(error = %e, "cluster: cannot program proxy identities");
                return Ok(users);
            }
            let ids: Vec<PeerId> = new.iter().map(|r| r.access.id).collect();
            self.policy.forget_ids(&ids);
            users.extend(new.iter().map(|r| r.access.user.clone()));
            for r in new {
                self.dir.insert_proxy(r);
            }
            self.rebuild();
        }
        Ok(users)
    }

    /// Committed records join the directory, the credentials and the policy.
    pub(super) fn joined(&self, user: &UserName, recs: Vec<ProxyRecord>) {
        let ids: Vec<PeerId> = recs.iter().map(|r| r.access.id).collect();
        self.policy.forget_ids(&ids);
        for r in recs {
            self.dir.insert_proxy(r);
        }
        self.rebuild();
        if let Err(e) = self.policy.apply(std::slice::from_ref(user), false) {
            tracing::error!(error = %e, %user, "cannot apply the policy to a new proxy identity");
        }
    }

    /// Records whose removal was committed leave the directory and the credentials; their
    /// open connections are cut.
    pub(super) fn left(&self, recs: &[ProxyRecord]) {
        for r in recs {
            self.dir.remove_proxy(&r.access);
        }
        self.rebuild();
        let ids: Vec<PeerId> = recs.iter().map(|r| r.access.id).collect();
        self.policy.forget_ids(&ids);
        for id in ids {
            let cut = self.registry.cut(id, CutCause::Removed);
            if cut > 0 {
                tracing::info!(peer = id, cut, "open proxied connections cut");
            }
        }
    }

    /// Gives `user` access by `protocol` (`user protocol add`): returns its client config.
    pub fn add_protocol(
        &self,
        actor: &Actor,
        user: &UserName,
        protocol: Protocol,
    ) -> Result<ProxyClientConfig, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        self.dir.user(user)?;
        self.check_protocol(protocol)?;
        if self.dir.proxy(user, protocol).is_some() {
            return Err(ValidationError::Value {
                field: "protocol",
                reason: format!("{user} already has {protocol}"),
            }
            .into());
        }
        let recs = self.new_records(user, &[protocol], &[])?;
        self.program(&recs)?;
        let rec = recs[0].clone();
        let mut batch = Batch::default();
        batch.put(
            Cf::Proxies,
            &keys::proxy(user.as_str(), protocol.as_str()),
            &rec,
        )?;
        self.core.audit(
            &mut batch,
            actor,
            "proxy.add",
            format!("user:{user}"),
            None,
            to_json(&rec.access),
        )?;
        if let Err(e) = self.core.commit(batch) {
            let _ = self.unprogram(&recs);
            return Err(e);
        }
        self.joined(user, recs);
        tracing::info!(%actor, %user, %protocol, id = rec.access.id, "proxy identity added");
        self.config_for(&rec)
    }

    /// Takes `user`'s access by `protocol` away (`user protocol remove`): its credential stops
    /// working, its open connections are cut, its id is free again.
    pub fn remove_protocol(
        &self,
        actor: &Actor,
        user: &UserName,
        protocol: Protocol,
    ) -> Result<ProxyAccess, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        self.dir.user(user)?;
        if protocol == Protocol::Wireguard {
            return Err(wireguard_not_a_proxy());
        }
        let rec = self
            .dir
            .proxy(user, protocol)
            .ok_or_else(|| ValidationError::Value {
                field: "protocol",
                reason: format!("{user} has no {protocol} access"),
            })?;
        let recs = [rec.clone()];
        self.unprogram(&recs)?;
        let mut batch = Batch::default();
        batch.delete(Cf::Proxies, &keys::proxy(user.as_str(), protocol.as_str()));
        self.core.audit(
            &mut batch,
            actor,
            "proxy.remove",
            format!("user:{user}"),
            to_json(&rec.access),
            None,
        )?;
        if let Err(e) = self.core.commit(batch) {
            let _ = self.program(&recs);
            return Err(e);
        }
        self.left(&recs);
        if let Err(e) = self.policy.apply(std::slice::from_ref(user), false) {
            tracing::error!(error = %e, %user, "cannot re-apply the policy after a proxy identity was removed");
        }
        tracing::info!(%actor, %user, %protocol, "proxy identity removed");
        Ok(rec.access)
    }

    /// The client config of `user`'s `protocol` identity (`user config --protocol`); who read
    /// a credential is in the audit trail (`proxy.config`).
    pub fn client_config(
        &self,
        actor: &Actor,
        user: &UserName,
        protocol: Protocol,
    ) -> Result<ProxyClientConfig, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        self.dir.user(user)?;
        if protocol == Protocol::Wireguard {
            return Err(wireguard_not_a_proxy());
        }
        let rec = self
            .dir
            .proxy(user, protocol)
            .ok_or_else(|| ValidationError::Value {
                field: "protocol",
                reason: format!(
                    "{user} has no {protocol} access (give it with `capybara user protocol add {user} {protocol}`)"
                ),
            })?;
        let cfg = self.config_for(&rec)?;
        let mut batch = Batch::default();
        self.core.audit(
            &mut batch,
            actor,
            "proxy.config",
            format!("user:{user}"),
            None,
            to_json(&rec.access),
        )?;
        self.core.commit(batch)?;
        Ok(cfg)
    }

    /// The proxy identities of `user`.
    pub fn list(&self, user: &UserName) -> Result<Vec<ProxyAccess>, ServiceError> {
        self.dir.user(user)?;
        Ok(self
            .dir
            .proxy_records(user)
            .into_iter()
            .map(|r| r.access)
            .collect())
    }

    /// The client config of `rec` with the current settings.
    pub(super) fn config_for(&self, rec: &ProxyRecord) -> Result<ProxyClientConfig, ServiceError> {
        let settings = self.settings.read().unwrap().clone();
        let host = host_of(&self.core.cfg.endpoint).to_owned();
        let name = rec.access.user.as_str();
        let (uri, json) = match rec.access.protocol {
            Protocol::Shadowsocks => {
                let ep = settings
                    .shadowsocks
                    .ok_or_else(|| not_configured(Protocol::Shadowsocks))?;
                let s = secret(&rec.credential).ok_or_else(|| ValidationError::Value {
                    field: "credential",
                    reason: "the stored Shadowsocks credential is damaged; remove and add the protocol again".into(),
                })?;
                shadowsocks_config(ep.cipher, &s, &host, ep.listen.port(), name)
            }
            Protocol::Vless => {
                let ep = settings
                    .vless
                    .ok_or_else(|| not_configured(Protocol::Vless))?;
                vless_config(&ep, &rec.credential, &host, name)
            }
            Protocol::Wireguard => return Err(wireguard_not_a_proxy()),
        };
        Ok(ProxyClientConfig {
            access: rec.access.clone(),
            uri,
            json,
        })
    }

    /// Whether identity `id` may connect now: its policy gate is open (the policy's decision:
    /// window, daily time, device limit, expiry, a policy hold). No side effect.
    pub fn admitted(&self, id: PeerId) -> bool {
        self.dir.proxy_by_id(id).is_some() && self.policy.admitted(id, SystemTime::now())
    }

    /// A connection of identity `id` was authenticated (what an endpoint's
    /// `Credentials::admitted` is): the identity is online for the policy and its gate decided
    /// again as after a device's handshake (`Policy::on_proxy_open`: it takes a slot of the
    /// device limit, a kick's hold ends), then whether it is admitted. Refused, it is offline
    /// again unless it has other open connections. So an endpoint asks this before it binds or
    /// connects anything, registers the connection ([`Registry::open`]) right after a yes, and
    /// its event sink calls `Policy::on_proxy_close` once the identity's last connection
    /// closed (`Registry::open_count` 0). Cost: one read of the kernel gate (and a write when
    /// it changes) per authenticated connection.
    pub fn authenticated(&self, id: PeerId) -> bool {
        if self.dir.proxy_by_id(id).is_none() {
            return false;
        }
        let now = SystemTime::now();
        if let Err(e) = self.policy.on_proxy_open(id, now) {
            tracing::error!(error = %e, peer = id, "cannot decide a proxy identity's gate");
        }
        let ok = self.policy.admitted(id, now);
        if !ok
            && self.registry.open_count(id) == 0
            && let Err(e) = self.policy.on_proxy_close(id, now)
        {
            tracing::error!(error = %e, peer = id, "cannot decide a proxy identity's gate");
        }
        ok
    }
}

/// The SIP002 URI and the `ss-local` JSON of a Shadowsocks identity.
pub fn shadowsocks_config(
    cipher: ShadowsocksCipher,
    secret: &[u8; 32],
    host: &str,
    port: u16,
    name: &str,
) -> (String, String) {
    let method = cipher.name();
    let password = cipher.password(secret);
    let userinfo = if cipher.is_2022() {
        format!("{}:{}", percent(method), percent(&password))
    } else {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{method}:{password}"))
    };
    let uri = format!(
        "ss://{userinfo}@{}:{port}#{}",
        uri_host(host),
        percent(name)
    );
    let json = serde_json::json!({
        "server": host,
        "server_port": port,
        "password": password,
        "method": method,
        "local_address": "127.0.0.1",
        "local_port": 1080,
        // SOCKS5 UDP ASSOCIATE too, relayed by the endpoint's UDP relay on the same port.
        "mode": "tcp_and_udp",
    });
    (uri, serde_json::to_string_pretty(&json).expect("JSON"))
}

/// The `vless://` URI and the v2ray client JSON of a VLESS identity (see the module docs for
/// the pinning).
pub fn vless_config(ep: &VlessEndpoint, uuid: &str, host: &str, name: &str) -> (String, String) {
    let port = ep.listen.port();
    let sni = ep.sni.clone().unwrap_or_else(|| host.to_owned());
    let uri = format!(
        "vless://{uuid}@{}:{port}?encryption=none&security=tls&sni={}&type=tcp#{}",
        uri_host(host),
        percent(&sni),
        percent(name)
    );
    let mut tls = serde_json::json!({ "serverName": sni });
    if let Some(pem) = &ep.cert_pem {
        let lines: Vec<&str> = pem.lines().filter(|l| !l.trim().is_empty()).collect();
        tls["certificates"] = serde_json::json!([{ "usage": "verify", "certificate": lines }]);
        tls["disableSystemRoot"] = serde_json::json!(true);
    }
    if let Some(fp) = &ep.cert_sha256 {
        tls["pinnedPeerCertificateChainSha256"] =
            serde_json::json!([base64::engine::general_purpose::STANDARD.encode(fp)]);
    }
    let json = serde_json::json!({
        "log": { "loglevel": "warning" },
        "inbounds": [{
            "tag": "socks-in",
            "listen": "127.0.0.1",
            "port": 1080,
            "protocol": "socks",
            // SOCKS5 UDP ASSOCIATE, relayed as VLESS UDP (a connection per destination).
            "settings": { "udp": true, "ip": "127.0.0.1", "auth": "noauth" },
        }],
        "outbounds": [{
            "tag": "capybara",
            "protocol": "vless",
            "settings": {
                "vnext": [{
                    "address": host,
                    "port": port,
                    "users": [{ "id": uuid, "encryption": "none" }],
                }],
            },
            "streamSettings": {
                "network": "tcp",
                "security": "tls",
                "tlsSettings": tls,
            },
        }],
    });
    (uri, serde_json::to_string_pretty(&json).expect("JSON"))
}

impl Credentials for Proxies {
    fn shadowsocks(&self) -> Arc<[ShadowsocksKey]> {
        self.snapshot.read().unwrap().shadowsocks.clone()
    }

    fn vless(&self, uuid: &[u8; 16]) -> Option<Identity> {
        self.snapshot.read().unwrap().vless.get(uuid).cloned()
    }

    /// See [`Proxies::authenticated`]: asked once a connection is authenticated, it is that
    /// connection's start for the policy.
    fn admitted(&self, id: PeerId) -> bool {
        self.authenticated(id)
    }
}

#[cfg(test)]
mod tests;
