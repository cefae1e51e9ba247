//! Service-level tests of MFA on the in-memory dataplane and tunnel: enrolment, the gate each
//! code writes, the lifetime and session ends, limits and their event, sealing across a backup.

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use capybara_common::drop::DropReason;

use super::*;
use crate::{
    dataplane::Gate,
    service::{
        NewUser, Service, ServiceConfig, ServiceEvent,
        domain::{DeviceName, PublicKey},
        testing::{MemoryPlane, open_service},
    },
    store::Store,
};

struct Fixture {
    dir: tempfile::TempDir,
    plane: Arc<MemoryPlane>,
    svc: Service,
}

fn config() -> ServiceConfig {
    ServiceConfig {
        server_v4: "10.98.0.1/28".parse().unwrap(),
        server_v6: "fd98::1/64".parse().unwrap(),
        server_public_key: PublicKey([1; 32]),
        endpoint: "vpn.example.com:51820".into(),
        dns: vec![],
        keep_client_keys: None,
        geo_db: None,
        keep_unknown_peers: false,
    }
}

fn open_in(path: &Path) -> (Arc<MemoryPlane>, Service) {
    let plane = Arc::new(MemoryPlane::default());
    let svc = open_service(path, plane.clone(), config());
    (plane, svc)
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (plane, svc) = open_in(dir.path());
    Fixture { dir, plane, svc }
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

fn u(name: &str) -> UserName {
    UserName::parse("name", name).unwrap()
}

impl Fixture {
    /// Adds `name` with one device; its peer.
    fn user(&self, name: &str) -> Peer {
        let (_, cfg) = self
            .svc
            .users
            .add_user(
                &root(),
                NewUser {
                    name: u(name),
                    device: DeviceName::default_device(),
                    expires_at: None,
                },
            )
            .unwrap();
        cfg.peer
    }

    fn gate(&self, p: &Peer) -> Gate {
        self.plane.state().gates[&p.id]
    }

    /// `name` enrolled and confirmed; its secret and backup codes.
    fn enrolled(&self, name: &str) -> (Vec<u8>, Vec<String>) {
        let e = self.svc.mfa.enable(&root(), &u(name), None, None).unwrap();
        let secret = totp::secret_of_uri(&e.uri).unwrap();
        self.svc
            .mfa
            .confirm(&root(), &u(name), &code(&secret, SystemTime::now()))
            .unwrap();
        (secret, e.backup_codes)
    }
}

fn code(secret: &[u8], t: SystemTime) -> String {
    totp::code_at_step(secret, totp::step_of(unix_secs(t)))
}

fn ip(p: &Peer) -> IpAddr {
    IpAddr::V4(p.ipv4)
}

const STEP: Duration = Duration::from_secs(30);

#[test]
fn enrolment_is_pending_until_a_code_confirms_it_then_devices_are_held() {
    let f = fixture();
    let p = f.user("alice");
    let e = f
        .svc
        .mfa
        .enable(&root(), &u("alice"), Some("alice@example.org"), None)
        .unwrap();
    assert!(
        e.uri.starts_with("otpauth://totp/Capybara:alice?secret="),
        "{}",
        e.uri
    );
    assert!(e.uri.contains("issuer=Capybara"));
    assert_eq!(e.backup_codes.len(), 10);
    let secret = totp::secret_of_uri(&e.uri).unwrap();
    assert_eq!(secret.len(), 20);
    // Pending: not on, the device is not held.
    let s = f.svc.mfa.status(Some(&u("alice"))).unwrap().users.remove(0);
    assert_eq!((s.state.as_str(), s.required), ("pending", false));
    assert_eq!(s.email.as_deref(), Some("a***@example.org"));
    assert_eq!(f.gate(&p), Gate::Admitted { until: None });
    // A second enable is refused naming the user; a wrong code names the field; both change
    // nothing.
    let err = f
        .svc
        .mfa
        .enable(&root(), &u("alice"), None, None)
        .unwrap_err();
    assert!(err.to_string().starts_with("user:"), "{err}");
    let wrong = if code(&secret, SystemTime::now()) == "000000" {
        "111111"
    } else {
        "000000"
    };
    let err = f.svc.mfa.confirm(&root(), &u("alice"), wrong).unwrap_err();
    assert!(err.to_string().starts_with("code:"), "{err}");
    let err = f.svc.mfa.confirm(&root(), &u("alice"), "12ab").unwrap_err();
    assert!(err.to_string().starts_with("code:"), "{err}");
    assert_eq!(
        f.svc.mfa.status(Some(&u("alice"))).unwrap().users[0].state,
        "pending"
    );
    // The app's code confirms it: on, and the device is held as mfa-pending.
    let s = f
        .svc
        .mfa
        .confirm(&root(), &u("alice"), &code(&secret, SystemTime::now()))
        .unwrap();
    assert_eq!((s.state.as_str(), s.required), ("enrolled", true));
    assert_eq!(s.backup_codes_left, 10);
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateMfaPending));
    // The secret and the codes are nowhere in the store or the audit trail in clear.
    let raw: Vec<(String, serde_json::Value)> = f.svc.core.store.scan(Cf::Policy, "").unwrap();
    let audit = f.svc.core.audit_records(None, 100).unwrap();
    let text = format!("{raw:?}{audit:?}");
    let b32 = totp::base32(&secret);
    assert!(!text.contains(&b32), "the secret leaked");
    for c in &e.backup_codes {
        assert!(!text.contains(c.as_str()) && !text.contains(&codes::normalize(c)));
    }
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert!(
        actions.contains(&"mfa.enable") && actions.contains(&"mfa.confirm"),
        "{actions:?}"
    );
    assert!(
        !format!("{e:?}").contains(&b32),
        "Debug redacts the enrolment"
    );
    // Bad input changes nothing: an unknown user, a bad e-mail address, a bad number.
    assert!(matches!(
        f.svc.mfa.enable(&root(), &u("nobody"), None, None),
        Err(ServiceError::NotFound { .. })
    ));
    f.user("bob");
    let err = f
        .svc
        .mfa
        .enable(&root(), &u("bob"), Some("bob at example"), None)
        .unwrap_err();
    assert!(err.to_string().starts_with("email:"), "{err}");
    let err = f
        .svc
        .mfa
        .enable(&root(), &u("bob"), None, Some("0151"))
        .unwrap_err();
    assert!(err.to_string().starts_with("sms:"), "{err}");
    assert_eq!(
        f.svc.mfa.status(Some(&u("bob"))).unwrap().users[0].state,
        "none"
    );
}

#[test]
fn a_good_code_admits_until_the_lifetime_and_a_code_is_taken_once() {
    let f = fixture();
    let p = f.user("alice");
    let (secret, _) = f.enrolled("alice");
    f.svc.mfa.configure(MfaConfig {
        lifetime: Duration::from_secs(3600),
        lock: limits::DEFAULT_LOCK,
    });
    let t = SystemTime::now() + STEP;
    let v = f.svc.mfa.verify_at(ip(&p), &code(&secret, t), t).unwrap();
    assert_eq!((v.method, v.confirmed_enrolment), (Method::Totp, false));
    assert_eq!(v.until, t + Duration::from_secs(3600));
    // Written with the MFA deadline flag: the kernel holds it as mfa-pending at the deadline.
    assert_eq!(f.gate(&p), Gate::MfaAdmitted { until: v.until });
    let view = f.svc.mfa.view_at(ip(&p), t).unwrap();
    assert_eq!(view.status, PageStatus::Admitted { until: v.until });
    let st = f.svc.mfa.status(Some(&u("alice"))).unwrap().users.remove(0);
    assert_eq!(st.devices.len(), 1);
    assert!(st.last_verified.is_some());
    // The same code again: refused (its step is used).
    let again = f
        .svc
        .mfa
        .verify_at(ip(&p), &code(&secret, t), t + Duration::from_secs(1));
    assert!(
        matches!(again, Err(VerifyError::WrongCode { .. })),
        "{again:?}"
    );
    // The lifetime passes: the tick forgets the admission; the gate says held.
    f.svc.policy.tick(v.until + Duration::from_secs(1)).unwrap();
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateMfaPending));
    // An account expiry earlier than the lifetime is the deadline (no MFA flag).
    let expiry = SystemTime::now() + Duration::from_secs(1800);
    f.svc
        .users
        .expire_user(&root(), &u("alice"), expiry)
        .unwrap();
    let t2 = t + 2 * STEP;
    f.svc.mfa.verify_at(ip(&p), &code(&secret, t2), t2).unwrap();
    match f.gate(&p) {
        Gate::Admitted { until: Some(d) } => {
            assert!(
                d.duration_since(expiry).unwrap_or_else(|e| e.duration()) <= Duration::from_secs(1)
            )
        }
        g => panic!("{g:?}"),
    }
}

#[test]
fn the_session_end_and_a_kick_hold_the_device_again() {
    let f = fixture();
    let p = f.user("alice");
    let (secret, _) = f.enrolled("alice");
    let t = SystemTime::now() + STEP;
    f.svc
        .policy
        .on_connect(&p.public_key, SystemTime::now())
        .unwrap();
    f.svc.mfa.verify_at(ip(&p), &code(&secret, t), t).unwrap();
    assert!(matches!(f.gate(&p), Gate::MfaAdmitted { .. }));
    // Disconnect (idle): the session's admission ends.
    f.svc
        .policy
        .on_disconnect(&p.public_key, SystemTime::now())
        .unwrap();
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateMfaPending));
    // Admitted again, then kicked: held as kicked; its next handshake starts a session that
    // needs a code again.
    let t2 = t + STEP;
    f.svc
        .policy
        .on_connect(&p.public_key, SystemTime::now())
        .unwrap();
    f.svc.mfa.verify_at(ip(&p), &code(&secret, t2), t2).unwrap();
    f.svc.monitor.kick(&root(), &u("alice")).unwrap();
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateKicked));
    f.svc.monitor.on_handshake(&p.public_key).unwrap();
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateMfaPending));
}

#[test]
fn a_backup_code_works_once() {
    let f = fixture();
    let p = f.user("alice");
    let (_, backup) = f.enrolled("alice");
    let t = SystemTime::now();
    let v = f
        .svc
        .mfa
        .verify_at(ip(&p), &backup[4].to_uppercase(), t)
        .unwrap();
    assert_eq!((v.method, v.backup_codes_left), (Method::Backup, Some(9)));
    f.svc.policy.on_disconnect(&p.public_key, t).unwrap();
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateMfaPending));
    let again = f.svc.mfa.verify_at(ip(&p), &backup[4], t);
    assert!(
        matches!(again, Err(VerifyError::WrongCode { .. })),
        "{again:?}"
    );
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateMfaPending));
    assert_eq!(
        f.svc.mfa.status(Some(&u("alice"))).unwrap().users[0].backup_codes_left,
        9
    );
}

#[test]
fn wrong_codes_lock_and_raise_one_event_per_lock_then_unlock() {
    let f = fixture();
    let p = f.user("alice");
    let (secret, _) = f.enrolled("alice");
    let mut bus = f.svc.events().subscribe();
    let t0 = SystemTime::now() + STEP;
    let wrong = |t| {
        let c = code(&secret, t);
        format!("{:06}", (c.parse::<u32>().unwrap() + 500_000) % 1_000_000)
    };
    for i in 0..4u64 {
        let t = t0 + Duration::from_secs(i);
        match f.svc.mfa.verify_at(ip(&p), &wrong(t), t) {
            Err(VerifyError::WrongCode { attempts_left }) => {
                assert_eq!(attempts_left, 4 - i as u32)
            }
            r => panic!("{r:?}"),
        }
    }
    let t = t0 + Duration::from_secs(4);
    assert!(matches!(
        f.svc.mfa.verify_at(ip(&p), &wrong(t), t),
        Err(VerifyError::Locked { .. })
    ));
    // Locked: even the right code is not taken, and the device stays held.
    let t = t0 + Duration::from_secs(5);
    match f.svc.mfa.verify_at(ip(&p), &code(&secret, t), t) {
        Err(VerifyError::Locked { retry_after }) => {
            assert!(retry_after > Duration::from_secs(890), "{retry_after:?}")
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateMfaPending));
    assert!(f.svc.mfa.view_at(ip(&p), t).unwrap().retry_after.is_some());
    // One suspicious-activity event for the lock.
    let mut events = Vec::new();
    while let Ok(e) = bus.try_recv() {
        if let ServiceEvent::Notified(n) = e
            && n.kind == NotifyKind::SuspiciousActivity
        {
            events.push(n);
        }
    }
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].data["kind"], "mfa-failures");
    assert_eq!(events[0].data["device"], "default");
    assert_eq!(events[0].user.as_deref(), Some("alice"));
    assert_eq!(events[0].vpn_ip, Some(ip(&p)));
    // After the lock (15 min) the right code is taken.
    let t = t0 + limits::DEFAULT_LOCK + STEP;
    f.svc.mfa.verify_at(ip(&p), &code(&secret, t), t).unwrap();
    assert!(matches!(f.gate(&p), Gate::MfaAdmitted { .. }));
}

#[test]
fn disable_lifts_the_hold_and_reset_voids_the_old_secret_and_codes_but_keeps_it() {
    let f = fixture();
    let p = f.user("alice");
    let (secret, backup) = f.enrolled("alice");
    let t0 = SystemTime::now() + STEP;
    f.svc.mfa.verify_at(ip(&p), &code(&secret, t0), t0).unwrap();
    assert!(matches!(f.gate(&p), Gate::MfaAdmitted { .. }));
    // A reset ends the sessions the old secret admitted.
    let e = f.svc.mfa.reset(&root(), &u("alice")).unwrap();
    let new_secret = totp::secret_of_uri(&e.uri).unwrap();
    assert_ne!(new_secret, secret);
    let s = f.svc.mfa.status(Some(&u("alice"))).unwrap().users.remove(0);
    assert_eq!((s.state.as_str(), s.required), ("pending", true));
    assert_eq!(f.gate(&p), Gate::Held(DropReason::GateMfaPending));
    let t = SystemTime::now() + 2 * STEP;
    assert_eq!(
        f.svc.mfa.view_at(ip(&p), t).unwrap().status,
        PageStatus::Enrolling
    );
    // The old secret's code and an old backup code no longer work.
    assert!(f.svc.mfa.verify_at(ip(&p), &code(&secret, t), t).is_err());
    assert!(f.svc.mfa.verify_at(ip(&p), &backup[0], t).is_err());
    // The new secret's first code on the page confirms and admits.
    let v = f
        .svc
        .mfa
        .verify_at(ip(&p), &code(&new_secret, t), t)
        .unwrap();
    assert!(v.confirmed_enrolment);
    assert!(matches!(f.gate(&p), Gate::MfaAdmitted { .. }));
    // Disable: not held any more.
    let s = f.svc.mfa.disable(&root(), &u("alice")).unwrap();
    assert_eq!((s.state.as_str(), s.required), ("none", false));
    assert_eq!(f.gate(&p), Gate::Admitted { until: None });
    assert!(matches!(
        f.svc.mfa.view_at(ip(&p), t).unwrap().status,
        PageStatus::NotRequired
    ));
    assert!(matches!(
        f.svc.mfa.disable(&root(), &u("alice")),
        Err(ServiceError::NotFound { .. })
    ));
}

#[test]
fn require_all_holds_everyone_and_offers_self_service_enrolment_to_the_first_device() {
    let f = fixture();
    let a = f.user("alice");
    let o = f.svc.mfa.require_all(&root(), true).unwrap();
    assert!(o.require_all);
    assert_eq!(o.users.len(), 1);
    assert_eq!(
        (o.users[0].state.as_str(), o.users[0].required),
        ("none", true)
    );
    assert_eq!(f.gate(&a), Gate::Held(DropReason::GateMfaPending));
    // A user added now is held from its first packet.
    let b = f.user("bob");
    assert_eq!(f.gate(&b), Gate::Held(DropReason::GateMfaPending));
    // alice's second device.
    let a2 = f
        .svc
        .devices
        .add_device(
            &root(),
            &u("alice"),
            &DeviceName::parse("device", "phone").unwrap(),
        )
        .unwrap()
        .peer;
    let t = SystemTime::now() + STEP;
    let view = f.svc.mfa.view_at(ip(&a), t).unwrap();
    assert_eq!(view.status, PageStatus::Enrolling);
    let uri = view.enrol_uri.expect("the first device sees the URI");
    // The other device of the user does not (trust on first use).
    let other = f.svc.mfa.view_at(ip(&a2), t).unwrap();
    assert_eq!(
        (other.status, other.enrol_uri),
        (PageStatus::Enrolling, None)
    );
    assert_eq!(
        f.svc.mfa.view_at(ip(&a), t).unwrap().enrol_uri.as_deref(),
        Some(uri.as_str())
    );
    let secret = totp::secret_of_uri(&uri).unwrap();
    let v = f.svc.mfa.verify_at(ip(&a), &code(&secret, t), t).unwrap();
    assert!(v.confirmed_enrolment);
    assert!(matches!(f.gate(&a), Gate::MfaAdmitted { .. }));
    assert_eq!(f.gate(&a2), Gate::Held(DropReason::GateMfaPending));
    // Off: users without an enrolment are admitted; alice keeps hers.
    f.svc.mfa.require_all(&root(), false).unwrap();
    assert_eq!(f.gate(&b), Gate::Admitted { until: None });
    assert_eq!(f.gate(&a2), Gate::Held(DropReason::GateMfaPending));
    assert_eq!(
        f.svc.mfa.view_at(ip(&b), t).unwrap().status,
        PageStatus::NotRequired
    );
    // Addresses of no device.
    assert!(matches!(
        f.svc.mfa.view_at("10.98.0.14".parse().unwrap(), t),
        Err(VerifyError::NotADevice)
    ));
}

#[derive(Debug, Default)]
struct Outbox {
    sent: Mutex<Vec<(CodeChannel, String, String)>>,
    fail: bool,
}

impl CodeSender for Outbox {
    fn channels(&self) -> Vec<CodeChannel> {
        vec![CodeChannel::Email]
    }
    fn send(&self, channel: CodeChannel, to: &str, _user: &str, code: &str) -> Result<(), String> {
        if self.fail {
            return Err("smtp: connection refused".into());
        }
        self.sent
            .lock()
            .unwrap()
            .push((channel, to.to_owned(), code.to_owned()));
        Ok(())
    }
}

#[test]
fn a_one_time_code_by_email_is_taken_once_and_sent_at_most_once_a_minute() {
    let f = fixture();
    let p = f.user("alice");
    f.svc
        .mfa
        .enable(
            &root(),
            &u("alice"),
            Some("alice@example.org"),
            Some("+4915112345678"),
        )
        .unwrap();
    let e = f.svc.mfa.reset(&root(), &u("alice")).unwrap();
    let secret = totp::secret_of_uri(&e.uri).unwrap();
    f.svc
        .mfa
        .confirm(&root(), &u("alice"), &code(&secret, SystemTime::now()))
        .unwrap();
    let t = SystemTime::now();
    // No sender: no channel.
    assert!(matches!(
        f.svc.mfa.send_code_at(ip(&p), CodeChannel::Email, t),
        Err(VerifyError::NoChannel)
    ));
    let out = Arc::new(Outbox::default());
    f.svc.mfa.set_sender(out.clone());
    let view = f.svc.mfa.view_at(ip(&p), t).unwrap();
    assert_eq!(
        view.channels,
        vec![(CodeChannel::Email, "a***@example.org".to_owned())]
    );
    // SMS is not served by this sender.
    assert!(matches!(
        f.svc.mfa.send_code_at(ip(&p), CodeChannel::Sms, t),
        Err(VerifyError::NoChannel)
    ));
    let masked = f
        .svc
        .mfa
        .send_code_at(ip(&p), CodeChannel::Email, t)
        .unwrap();
    assert_eq!(masked, "a***@example.org");
    let sent = out.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, "alice@example.org");
    // Another within a minute: refused until then.
    assert!(matches!(
        f.svc
            .mfa
            .send_code_at(ip(&p), CodeChannel::Email, t + Duration::from_secs(10)),
        Err(VerifyError::SendTooSoon { retry_after }) if retry_after == Duration::from_secs(50)
    ));
    let v = f
        .svc
        .mfa
        .verify_at(ip(&p), &sent[0].2, t + Duration::from_secs(20))
        .unwrap();
    assert_eq!(v.method, Method::Email);
    assert!(matches!(f.gate(&p), Gate::MfaAdmitted { .. }));
    f.svc.policy.on_disconnect(&p.public_key, t).unwrap();
    // Used: not again.
    assert!(
        f.svc
            .mfa
            .verify_at(ip(&p), &sent[0].2, t + Duration::from_secs(21))
            .is_err()
    );
    // A code older than 10 minutes is void.
    let t2 = t + Duration::from_secs(61);
    f.svc
        .mfa
        .send_code_at(ip(&p), CodeChannel::Email, t2)
        .unwrap();
    let late = out.sent.lock().unwrap()[1].2.clone();
    let r = f.svc.mfa.verify_at(
        ip(&p),
        &late,
        t2 + codes::ONE_TIME_VALID + Duration::from_secs(1),
    );
    assert!(r.is_err(), "{r:?}");
    // A channel that fails: its reason is answered (never the code), the code is void and the
    // minute's limit does not count the failed send.
    let t3 = t2 + Duration::from_secs(120);
    f.svc.mfa.set_sender(Arc::new(Outbox {
        sent: Mutex::default(),
        fail: true,
    }));
    match f.svc.mfa.send_code_at(ip(&p), CodeChannel::Email, t3) {
        Err(VerifyError::SendFailed(why)) => assert_eq!(why, "smtp: connection refused"),
        other => panic!("{other:?}"),
    }
    f.svc.mfa.set_sender(out.clone());
    f.svc
        .mfa
        .send_code_at(ip(&p), CodeChannel::Email, t3 + Duration::from_secs(1))
        .unwrap();
}

#[test]
fn secrets_restored_beside_another_key_do_not_open_and_say_so() {
    let f = fixture();
    let p = f.user("alice");
    let (secret, _) = f.enrolled("alice");
    let mut backup = Vec::new();
    f.svc.store().write_backup(0, &mut backup).unwrap();
    let key_a = std::fs::read(paths::mfa_key_file(f.dir.path())).unwrap();

    let other = tempfile::tempdir().unwrap();
    crate::store::backup::restore(other.path(), &backup).unwrap();
    let raw_before: Vec<(String, serde_json::Value)> = Store::open(other.path())
        .unwrap()
        .scan(Cf::Policy, keys::MFA_USERS)
        .unwrap();
    let (plane, svc) = open_in(other.path());
    // A new key was made for this data directory; alice's secret does not open with it.
    let key_file = paths::mfa_key_file(other.path());
    assert_ne!(std::fs::read(&key_file).unwrap(), key_a);
    let s = svc.mfa.status(Some(&u("alice"))).unwrap().users.remove(0);
    let err = s.error.expect("the status says why");
    assert!(
        err.contains("does not open") && err.contains(&*key_file.to_string_lossy()),
        "{err}"
    );
    // Fail closed: held; the page's code is refused with that reason; nothing rewritten.
    assert_eq!(
        plane.state().gates[&p.id],
        Gate::Held(DropReason::GateMfaPending)
    );
    let t = SystemTime::now();
    let r = svc.mfa.verify_at(ip(&p), &code(&secret, t), t);
    assert!(
        matches!(&r, Err(VerifyError::Service(e)) if e.to_string().contains("does not open")),
        "{r:?}"
    );
    drop(svc);
    let raw_after: Vec<(String, serde_json::Value)> = Store::open(other.path())
        .unwrap()
        .scan(Cf::Policy, keys::MFA_USERS)
        .unwrap();
    assert_eq!(raw_before, raw_after);
    // With the key file it was sealed with, it opens.
    std::fs::write(&key_file, &key_a).unwrap();
    let (_, svc) = open_in(other.path());
    assert_eq!(
        svc.mfa.status(Some(&u("alice"))).unwrap().users[0].error,
        None
    );
    let t = SystemTime::now() + STEP;
    svc.mfa.verify_at(ip(&p), &code(&secret, t), t).unwrap();
}

#[test]
fn a_restart_holds_every_device_of_an_mfa_user_again() {
    let f = fixture();
    let p = f.user("alice");
    let q = f.user("bob");
    let (secret, _) = f.enrolled("alice");
    let t = SystemTime::now() + STEP;
    f.svc.mfa.verify_at(ip(&p), &code(&secret, t), t).unwrap();
    assert!(matches!(f.gate(&p), Gate::MfaAdmitted { .. }));
    let Fixture { dir, plane, svc } = f;
    drop(svc);
    // The same (pinned) kernel state; the restart ended every session, so the admission too.
    let svc = open_service(dir.path(), plane.clone(), config());
    assert_eq!(
        plane.state().gates[&p.id],
        Gate::Held(DropReason::GateMfaPending)
    );
    assert_eq!(plane.state().gates[&q.id], Gate::Admitted { until: None });
    assert_eq!(svc.mfa.status(None).unwrap().users.len(), 1);
}
