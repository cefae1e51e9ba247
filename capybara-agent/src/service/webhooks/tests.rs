//! The outbox, the workers and the GC against real HTTP receivers on loopback (axum, in the
//! test process), over a real store.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use axum::{body::Bytes, extract::State, http::HeaderMap};

use super::*;
use crate::service::{
    NewUser, Service, ServiceConfig,
    domain::{DeviceName, UserName},
    testing::{MemoryPlane, open_service},
};

fn open(dir: &std::path::Path, plane: Arc<MemoryPlane>) -> Service {
    open_service(
        dir,
        plane,
        ServiceConfig::for_tests("10.96.0.1/24", "fd96::1/64", "vpn.example.com:51820"),
    )
}

fn root() -> Actor {
    Actor::Local { uid: 0 }
}

/// What a receiver got: each request's headers and body.
#[derive(Default)]
struct Receiver {
    /// The status it answers.
    answer: AtomicU16,
    got: Mutex<Vec<(HeaderMap, Bytes)>>,
}

impl Receiver {
    fn bodies(&self) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect()
    }
}

async fn receiver(answer: u16) -> (String, Arc<Receiver>) {
    let rx = Arc::new(Receiver::default());
    rx.answer.store(answer, Ordering::SeqCst);
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes| async move {
                    rx.got.lock().unwrap().push((headers, body));
                    axum::http::StatusCode::from_u16(rx.answer.load(Ordering::SeqCst)).unwrap()
                },
            ),
        )
        .with_state(rx.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (format!("http://{addr}/hook"), rx)
}

async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn add(svc: &Service, url: &str, events: &[&str]) -> (Webhook, Secret) {
    let names: Vec<String> = events.iter().map(|s| (*s).to_owned()).collect();
    let (w, secret) = svc
        .webhooks
        .add(
            &root(),
            NewWebhook {
                url: ssrf::parse_url(url).unwrap(),
                events: EventSet::parse(&names, false).unwrap(),
                secret: None,
                allow_private: true,
            },
        )
        .unwrap();
    (w, Secret::parse("secret", &secret).unwrap())
}

fn numbered(kind: NotifyKind, i: u64) -> Notification {
    let mut n = Notification::new(kind);
    n.data = serde_json::json!({ "i": i });
    n
}

fn outbox(svc: &Service) -> Vec<(u64, OutboxEvent)> {
    svc.core
        .store
        .scan::<OutboxEvent>(Cf::Outbox, "")
        .unwrap()
        .into_iter()
        .map(|(k, v)| (keys::outbox_seq(&k).unwrap(), v))
        .collect()
}

#[test]
fn outbox_keys_are_contiguous_and_each_writers_events_in_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Arc::new(open(dir.path(), Arc::new(MemoryPlane::default())));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let svc = svc.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let mut n = numbered(NotifyKind::ServerDown, i);
                    n.user = Some(format!("t{t}"));
                    if i % 2 == 0 {
                        svc.core.notify(n).unwrap();
                    } else {
                        let mut batch = Batch::default();
                        svc.core.stage_notification(&mut batch, n).unwrap();
                        let _ = svc.core.store.write(batch).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let all = outbox(&svc);
    assert_eq!(all.len(), 1600);
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=1600).collect::<Vec<_>>(), "no gap, in order");
    for t in 0..8 {
        let mine: Vec<u64> = all
            .iter()
            .filter(|(_, e)| e.event.user.as_deref() == Some(&format!("t{t}")))
            .map(|(_, e)| e.event.data["i"].as_u64().unwrap())
            .collect();
        assert_eq!(mine, (0..200).collect::<Vec<_>>(), "writer t{t}");
    }
    let ids: std::collections::BTreeSet<&str> = all.iter().map(|(_, e)| e.id.as_str()).collect();
    assert_eq!(ids.len(), 1600, "ids are unique");
    assert!(all.iter().all(|(_, e)| e.id.starts_with("msg_")));
    // A reopened store continues the sequence.
    drop(all);
    let store = svc.core.store.clone();
    assert_eq!(*store.outbox_end().borrow(), 1601);
}

#[test]
fn config_changed_is_written_with_its_audit_record_and_an_undone_change_leaves_none() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Arc::new(MemoryPlane::default());
    let svc = open(dir.path(), plane.clone());
    let user = |name: &str| NewUser {
        name: UserName::parse("user", name).unwrap(),
        device: DeviceName::parse("device", "laptop").unwrap(),
        expires_at: None,
    };
    svc.users.add_user(&root(), user("alice")).unwrap();
    let events = outbox(&svc);
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0].1.event;
    assert_eq!(ev.kind, NotifyKind::ConfigChanged);
    assert_eq!(ev.user.as_deref(), Some("alice"));
    assert_eq!(ev.data["action"], "user.add");
    assert_eq!(ev.data["actor"], "uid:0");
    let audit = svc.core.audit_records(None, 10).unwrap();
    assert_eq!(ev.data["seq"], audit[0].seq);
    // Published: nothing is held back.
    let end = *svc.core.store.outbox_end().borrow();
    assert_eq!(svc.core.outbox_readable(end), end);

    // The dataplane refuses bob: the change is undone, its event deleted, nothing held.
    plane.with(|s| s.fail_next_set_peer = true);
    assert!(svc.users.add_user(&root(), user("bob")).is_err());
    assert_eq!(outbox(&svc).len(), 1, "the undone change's event is gone");
    let end = *svc.core.store.outbox_end().borrow();
    assert_eq!(svc.core.outbox_readable(end), end);
    // A refused change (a duplicate) writes nothing.
    assert!(svc.users.add_user(&root(), user("alice")).is_err());
    assert_eq!(outbox(&svc).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_delivers_its_events_in_order_signed_and_the_gc_follows() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Arc::new(MemoryPlane::default()));
    let (url, rx) = receiver(200).await;
    let (w, secret) = add(&svc, &url, &["user-connect"]);
    for i in 0..40 {
        let kind = if i % 4 == 3 {
            NotifyKind::ServerDown
        } else {
            NotifyKind::UserConnect
        };
        svc.core.notify(numbered(kind, i)).unwrap();
    }
    until("30 deliveries", 20, || rx.got.lock().unwrap().len() >= 30).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 30, "only the kinds it subscribed to");
    let order: Vec<u64> = got
        .iter()
        .map(|(_, b)| {
            serde_json::from_slice::<serde_json::Value>(b).unwrap()["data"]["i"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let want: Vec<u64> = (0..40).filter(|i| i % 4 != 3).collect();
    assert_eq!(order, want, "in order");
    for (h, body) in &got {
        let id = h["webhook-id"].to_str().unwrap();
        let ts: u64 = h["webhook-timestamp"].to_str().unwrap().parse().unwrap();
        assert!(ts.abs_diff(now()) < 60);
        assert_eq!(
            h["webhook-signature"].to_str().unwrap(),
            secret.sign(id, ts, body)
        );
        assert_eq!(h["content-type"], "application/json");
        let p: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(p["id"], id);
        assert_eq!(p["event"], "user-connect");
    }
    // Delivered, recorded, and the cursor past them all; the GC empties the outbox.
    let list = svc.webhooks.deliveries(&w.id, false, 100).unwrap();
    assert_eq!(list.len(), 30);
    assert!(list.iter().all(|d| d.status == DeliveryStatus::Delivered
        && d.attempts == 1
        && d.status_code == Some(200)));
    svc.webhooks.gc_now().unwrap();
    until("an empty outbox", 10, || {
        let _ = svc.webhooks.gc_now();
        svc.webhooks.stats().outbox_depth == 0
    })
    .await;
    assert_eq!(svc.webhooks.stats().delivered, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_answering_410_is_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Arc::new(MemoryPlane::default()));
    let (url, rx) = receiver(410).await;
    let (w, _) = add(&svc, &url, &["quota-exceeded"]);
    svc.core
        .notify(numbered(NotifyKind::QuotaExceeded, 1))
        .unwrap();
    until("the endpoint disabled", 10, || {
        !svc.webhooks.get(&w.id).unwrap().enabled
    })
    .await;
    let hook = svc.webhooks.get(&w.id).unwrap();
    assert!(hook.disabled_reason.unwrap().contains("410"));
    let d = svc.webhooks.deliveries(&w.id, false, 10).unwrap();
    assert_eq!(d[0].status, DeliveryStatus::Gone);
    assert_eq!(d[0].status_code, Some(410));
    let audit = svc.core.audit_records(None, 1).unwrap();
    assert_eq!(
        (audit[0].action.as_str(), audit[0].actor.as_str()),
        ("webhook.disable", "agent")
    );
    // Nothing more is sent to it.
    svc.core
        .notify(numbered(NotifyKind::QuotaExceeded, 2))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.got.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_kept_and_a_retry_delivers_it_with_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Arc::new(MemoryPlane::default()));
    svc.webhooks.tune(Tuning {
        max_attempts: 3,
        wait_scale: 0.01,
        ..Tuning::default()
    });
    let (url, rx) = receiver(503).await;
    let (w, _) = add(&svc, &url, &["account-expired"]);
    svc.core
        .notify(numbered(NotifyKind::AccountExpired, 7))
        .unwrap();
    until("a dead letter", 10, || {
        svc.webhooks
            .deliveries(&w.id, true, 10)
            .unwrap()
            .iter()
            .any(|d| d.status == DeliveryStatus::Dead)
    })
    .await;
    let dead = svc.webhooks.deliveries(&w.id, true, 10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].status_code, Some(503));
    assert_eq!(rx.got.lock().unwrap().len(), 3);
    let first_id = rx.bodies()[0]["id"].clone();
    assert!(
        rx.bodies().iter().all(|b| b["id"] == first_id),
        "same id on every attempt"
    );

    rx.answer.store(200, Ordering::SeqCst);
    let again = svc
        .webhooks
        .retry(&root(), &DeliveryId::parse("id", &dead[0].id).unwrap())
        .unwrap();
    until("the retry delivered", 10, || {
        rx.got.lock().unwrap().len() == 4
    })
    .await;
    assert_eq!(rx.bodies()[3]["id"], first_id, "a retry keeps the event id");
    until("its record", 5, || {
        svc.webhooks
            .delivery(&again)
            .unwrap()
            .is_some_and(|d| d.status == DeliveryStatus::Delivered)
    })
    .await;
    assert!(svc.webhooks.deliveries(&w.id, true, 10).unwrap().is_empty());
    // Retrying it again: it is no longer a dead letter.
    assert!(matches!(
        svc.webhooks
            .retry(&root(), &DeliveryId::parse("id", &dead[0].id).unwrap()),
        Err(ServiceError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_drops_the_oldest_undelivered_events_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Arc::new(MemoryPlane::default()));
    svc.webhooks.tune(Tuning {
        cap: 10,
        ..Tuning::default()
    });
    let (url, rx) = receiver(500).await;
    add(&svc, &url, &["server-down"]);
    for i in 0..50 {
        svc.core
            .notify(numbered(NotifyKind::ServerDown, i))
            .unwrap();
    }
    svc.webhooks.gc_now().unwrap();
    let s = svc.webhooks.stats();
    assert!(s.outbox_depth <= 10, "{s:?}");
    // The first event is being retried (read before the GC), the 39 after it up to the
    // cap are dropped.
    assert!((39..=40).contains(&s.dropped), "{s:?}");
    // When the receiver recovers, it gets the newest 10 (and the one it was retrying).
    rx.answer.store(200, Ordering::SeqCst);
    until("the kept events", 20, || {
        rx.bodies().iter().filter(|b| b["data"]["i"] == 49).count() == 1
    })
    .await;
    let delivered: Vec<u64> = rx
        .bodies()
        .iter()
        .map(|b| b["data"]["i"].as_u64().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(
        delivered.ends_with(&(40..50).collect::<Vec<_>>()),
        "{delivered:?}"
    );
    assert!(delivered.len() <= 11, "{delivered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_rotation_both_secrets_sign() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Arc::new(MemoryPlane::default()));
    let (url, rx) = receiver(200).await;
    let (w, old) = add(&svc, &url, &["server-up"]);
    let (hook, new) = svc.webhooks.rotate_secret(&root(), &w.id, None).unwrap();
    let new = Secret::parse("secret", &new).unwrap();
    assert_eq!(hook.secret_fingerprint, new.fingerprint());
    assert!(hook.previous_secret_until.unwrap() >= now() + ROTATION_OVERLAP.as_secs() - 5);
    svc.core.notify(numbered(NotifyKind::ServerUp, 1)).unwrap();
    until("a delivery", 10, || !rx.got.lock().unwrap().is_empty()).await;
    let (h, body) = rx.got.lock().unwrap()[0].clone();
    let id = h["webhook-id"].to_str().unwrap();
    let ts: u64 = h["webhook-timestamp"].to_str().unwrap().parse().unwrap();
    assert_eq!(
        h["webhook-signature"].to_str().unwrap(),
        format!("{} {}", new.sign(id, ts, &body), old.sign(id, ts, &body))
    );
    // The audit records hold fingerprints, never a secret.
    for r in svc.core.audit_records(None, 10).unwrap() {
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains(&new.reveal()[6..]) && !text.contains(&old.reveal()[6..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_its_field_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svc = open(dir.path(), Arc::new(MemoryPlane::default()));
    let audit_before = svc.core.audit_records(None, 100).unwrap().len();
    let e = EventSet::parse(&["user-login".into()], false).unwrap_err();
    assert!(e.to_string().starts_with("event: unknown event"), "{e}");
    let e = EventSet::parse(&[], false).unwrap_err();
    assert!(e.to_string().starts_with("event: "), "{e}");
    assert_eq!(EventSet::parse(&[], true).unwrap(), EventSet::All);
    assert!(EventSet::All.contains(NotifyKind::ConfigChanged));
    assert!(!EventSet::All.contains(NotifyKind::WebhookTest));
    let e = Secret::parse("secret", "").unwrap_err();
    assert!(e.to_string().starts_with("secret: empty"), "{e}");
    for url in [
        "http://127.0.0.1:9/x",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://169.254.169.254/latest",
    ] {
        let e = svc
            .webhooks
            .check_url(&ssrf::parse_url(url).unwrap(), false)
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with("url: ") && e.to_string().contains("--allow-private"),
            "{e}"
        );
    }
    assert!(svc.webhooks.list().unwrap().is_empty());
    assert_eq!(
        svc.core.audit_records(None, 100).unwrap().len(),
        audit_before
    );
    let e = WebhookId::parse("id", "wh_nothex").unwrap_err();
    assert!(e.to_string().starts_with("id: "), "{e}");
    assert!(matches!(
        svc.webhooks.get(&WebhookId::random()),
        Err(ServiceError::NotFound { .. })
    ));
}

#[test]
fn the_retry_schedule_recovers_a_30_s_outage_within_seconds_and_spans_a_day() {
    // Before jitter: the first ten waits cover 37.5 s at most 5 s apart.
    let first: Vec<u64> = RETRY_SCHEDULE_MS[..10].to_vec();
    assert_eq!(first.iter().sum::<u64>(), 37_500);
    assert!(first.iter().all(|&w| w <= 5_000));
    assert!(RETRY_SCHEDULE_MS.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(RETRY_SCHEDULE_MS.len() as u32, MAX_ATTEMPTS - 1);
    let total: u64 = RETRY_SCHEDULE_MS.iter().sum();
    assert!((24 * 3_600_000..30 * 3_600_000).contains(&total), "{total}");
    // Jitter stays within ±20 %.
    for (n, base) in RETRY_SCHEDULE_MS.iter().enumerate() {
        let lo = backoff(n as u32 + 1, 0.0).as_millis() as u64;
        let hi = backoff(n as u32 + 1, 1.0).as_millis() as u64;
        assert_eq!((lo, hi), (base * 8 / 10, base * 12 / 10));
    }
    assert_eq!(backoff(1000, 0.5), Duration::from_millis(21_600_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_at_rest_when_the_agent_has_a_sealer() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServiceConfig::for_tests("10.96.0.1/24", "fd96::1/64", "vpn.example.com:51820");
    cfg.keep_client_keys = Some(crate::service::secrets::Sealer::new(&[9; 32]));
    let svc = open_service(dir.path(), Arc::new(MemoryPlane::default()), cfg);
    let (url, rx) = receiver(200).await;
    let (w, secret) = add(&svc, &url, &["server-down"]);
    let raw: serde_json::Value = svc
        .core
        .store
        .get(Cf::Webhooks, &keys::webhook(w.id.as_str()))
        .unwrap()
        .unwrap();
    let text = raw.to_string();
    assert!(raw["secret"]["sealed"].is_string(), "{text}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret.bytes());
    assert!(!text.contains(&b64), "the key is not stored in the clear");
    // And it still signs with the right key.
    svc.core
        .notify(numbered(NotifyKind::ServerDown, 1))
        .unwrap();
    until("a delivery", 10, || !rx.got.lock().unwrap().is_empty()).await;
    let (h, body) = rx.got.lock().unwrap()[0].clone();
    let ts: u64 = h["webhook-timestamp"].to_str().unwrap().parse().unwrap();
    assert_eq!(
        h["webhook-signature"].to_str().unwrap(),
        secret.sign(h["webhook-id"].to_str().unwrap(), ts, &body)
    );
}
