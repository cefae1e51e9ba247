//! The MFA verification page's HTTP layer and its code channels, on loopback, without root:
//!
//! - e-mail codes through `verify::senders::EmailSender` to a real SMTP sink (aiosmtpd) over
//!   STARTTLS with a test CA and a login: the message arrives with the code, over TLS; a server
//!   without STARTTLS, an untrusted certificate or a wrong password fail the send, and nothing
//!   is delivered;
//! - SMS codes through `SmsSender` to the Python `standardwebhooks` receiver, which verifies the
//!   signature; the SSRF check refuses loopback unless allowed; a dead gateway is an error;
//! - headless Chromium (WebDriver) on the page served by `verify::PageServer` with the stand-in
//!   port (`verify::testing::StandIn`; the real service is the e2e test's): held page, a wrong
//!   code, a code sent by e-mail through the real sink and typed in, admitted; screenshots
//!   checked for the page's colors (the inline CSS was allowed by the CSP's hash) and copied to
//!   `/work/shots/`.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc};

use capybara_agent::{
    service::verification::{CodeChannel, CodeSender},
    verify::{
        App, Limits, PageServer,
        senders::{Channels, EmailSender, SmsSender, SmsSettings, SmtpSettings},
        testing::StandIn,
    },
};
use capybara_tests::{
    browser::Driver,
    ca::TestCa,
    receivers::{PyReceiver, random_secret},
    smtp_sink::SmtpSink,
};

fn secret_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn email_sender(
    sink: &SmtpSink,
    ca: Option<&Path>,
    creds: Option<std::path::PathBuf>,
) -> EmailSender {
    EmailSender::new(&SmtpSettings {
        url: sink.url(),
        from: "VPN <vpn@example.org>".into(),
        credentials: creds,
        ca: ca.map(Path::to_owned),
    })
    .unwrap()
}

#[test]
fn email_codes_go_over_starttls_to_the_smtp_sink() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::generate(dir.path());
    let sink = SmtpSink::start(dir.path(), &ca, true, Some(("mailer", "s3cret pass")));
    let creds = secret_file(dir.path(), "smtp-login", "mailer:s3cret pass\n");

    let sender = email_sender(&sink, Some(&ca.ca_pem), Some(creds.clone()));
    sender.send("alice@example.org", "alice", "428913").unwrap();
    let got = sink.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    assert!(m.tls, "the message came over STARTTLS");
    assert_eq!(m.login.as_deref(), Some("mailer"));
    assert_eq!(m.mail_from, "vpn@example.org");
    assert_eq!(m.rcpt_tos, ["alice@example.org"]);
    assert!(
        m.data.contains("Subject: Your VPN verification code"),
        "{}",
        m.data
    );
    assert!(
        m.data.contains("    428913\r\n") || m.data.contains("    428913\n"),
        "{}",
        m.data
    );
    assert!(m.data.contains("(user alice)"));

    // The certificate is checked: without the test CA the send fails, naming TLS.
    let e = email_sender(&sink, None, Some(creds.clone()))
        .send("alice@example.org", "alice", "111111")
        .unwrap_err();
    assert!(
        e.starts_with(&format!("e-mail through 127.0.0.1:{}: ", sink.port)),
        "{e}"
    );
    assert!(!e.contains("111111"), "{e}");
    // A wrong password is refused by the server.
    let wrong = secret_file(dir.path(), "wrong-login", "mailer:guess\n");
    assert!(
        email_sender(&sink, Some(&ca.ca_pem), Some(wrong))
            .send("alice@example.org", "alice", "222222")
            .is_err()
    );
    assert_eq!(sink.messages().len(), 1, "nothing more was delivered");

    // A server that offers no STARTTLS gets nothing: TLS is required, there is no fallback to
    // plain text (the code would cross the network in clear).
    let plain = SmtpSink::start(dir.path(), &ca, false, None);
    let e = email_sender(&plain, Some(&ca.ca_pem), None)
        .send("alice@example.org", "alice", "333333")
        .unwrap_err();
    assert!(e.contains(&format!("127.0.0.1:{}", plain.port)), "{e}");
    assert!(plain.messages().is_empty(), "{:?}", plain.messages());
}

#[test]
fn sms_codes_are_signed_webhooks_the_gateway_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let secret = random_secret();
    let mut gateway = PyReceiver::start(&secret, 0, dir.path().join("sms.jsonl"));
    let settings = SmsSettings {
        url: gateway.url(),
        secret: secret_file(dir.path(), "sms-secret", &format!("{secret}\n")),
        allow_private: true,
    };
    let channels = Channels {
        email: None,
        sms: Some(SmsSender::new(&settings).unwrap()),
    };
    assert_eq!(channels.channels(), [CodeChannel::Sms]);
    channels
        .send(CodeChannel::Sms, "+4915100000012", "alice", "771203")
        .unwrap();
    let got = gateway.records();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].verified,
        "standardwebhooks verified the signature: {}",
        got[0].error
    );
    assert_eq!(got[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(got[0].body["to"], "+4915100000012");
    let text = got[0].body["text"].as_str().unwrap();
    assert!(text.contains("771203") && text.contains("alice"), "{text}");
    // No e-mail channel here: asking for one names the flag.
    assert!(
        channels
            .send(CodeChannel::Email, "a@example.org", "alice", "1")
            .unwrap_err()
            .contains("--mfa-smtp")
    );

    // Loopback is refused by the SSRF check unless allowed.
    let strict = SmsSender::new(&SmsSettings {
        allow_private: false,
        ..settings.clone()
    })
    .unwrap();
    let e = strict
        .send("+4915100000012", "alice", "000001")
        .unwrap_err();
    assert!(e.contains("loopback"), "{e}");
    // A dead gateway is an error, not a hang.
    gateway.stop();
    let e = SmsSender::new(&settings)
        .unwrap()
        .send("+4915100000012", "alice", "000002")
        .unwrap_err();
    assert!(e.contains("cannot connect"), "{e}");
    assert_eq!(gateway.records().len(), 1);
}

/// Whether the PNG has a pixel of `rgb`.
fn has_color(png_bytes: &[u8], rgb: [u8; 3]) -> (u32, bool) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = info.color_type.samples();
    let found = buf[..info.buffer_size()]
        .chunks(step)
        .any(|p| p[..3] == rgb);
    (info.width, found)
}

#[test]
fn chromium_verifies_a_device_on_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::generate(dir.path());
    let sink = SmtpSink::start(dir.path(), &ca, true, None);
    let mut port = StandIn::new("123456");
    port.sender = Some(Arc::new(Channels {
        email: Some(email_sender(&sink, Some(&ca.ca_pem), None)),
        sms: None,
    }));
    port.add(
        "127.0.0.1".parse().unwrap(),
        "alice",
        "laptop",
        vec![(CodeChannel::Email, "a***@example.org".into())],
    );
    let port = Arc::new(port);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = {
        let _in_rt = rt.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        PageServer::serve(
            App::new(port.clone(), Limits::default()),
            vec![tokio::net::TcpListener::from_std(listener).unwrap()],
        )
    };
    let url = format!("http://{}/", server.addrs()[0]);

    let driver = Driver::start(None);
    let b = driver.session(800, 1000);
    b.navigate(&url);
    assert_eq!(b.title(), "Verify this device – VPN");
    let state = b.find("[role=status]#state");
    assert!(
        b.text(&state).starts_with("This device is held"),
        "{}",
        b.text(&state)
    );
    let who = b.text(&b.find(".who"));
    assert_eq!(who, "User alice, device laptop");
    let code = b.find("input#code");
    assert_eq!(b.attribute(&code, "inputmode").as_deref(), Some("numeric"));
    assert_eq!(
        b.attribute(&code, "autocomplete").as_deref(),
        Some("one-time-code")
    );
    let label = b.find("label[for=code]");
    assert_eq!(b.text(&label), "Code");
    let held = b.screenshot_to(&dir.path().join("held.png"), "mfa-page-held.png");
    let (width, blue) = has_color(&held, [0x0b, 0x4a, 0x8f]);
    assert_eq!(width, 800);
    assert!(
        blue,
        "the Verify button is drawn in its color: the inline CSS was applied"
    );

    // A wrong code: the error is announced and the input marked invalid.
    b.type_into(&code, "000000");
    b.submit(&b.find("button#verify"));
    let alert = b.find("[role=alert]");
    assert!(
        b.text(&alert)
            .starts_with("code: wrong, already used or expired (2 attempts left"),
        "{}",
        b.text(&alert)
    );
    assert_eq!(
        b.attribute(&b.find("input#code"), "aria-invalid")
            .as_deref(),
        Some("true")
    );
    b.screenshot_to(&dir.path().join("wrong.png"), "mfa-page-wrong-code.png");
    assert!(sink.messages().is_empty());

    // A code by e-mail, through the real sink, typed in.
    b.submit(&b.find("button[name=send][value=email]"));
    let notice = b.text(&b.find("#notice"));
    assert_eq!(
        notice,
        "A code was sent by e-mail to a***@example.org. Enter it below."
    );
    let mail = sink.messages();
    assert_eq!(mail.len(), 1);
    assert!(mail[0].tls);
    let sent = port
        .sent_code
        .lock()
        .unwrap()
        .clone()
        .expect("a code was sent");
    assert!(mail[0].data.contains(&sent), "{}", mail[0].data);
    b.type_into(&b.find("input#code"), &sent);
    b.submit(&b.find("button#verify"));
    assert_eq!(b.text(&b.find("#notice")), "Code accepted.");
    let state = b.text(&b.find("[role=status]#state"));
    assert!(
        state.starts_with("This device is verified: the VPN is open for it until "),
        "{state}"
    );
    assert!(b.try_find("input#code").is_none(), "no form once admitted");
    let admitted = b.screenshot_to(&dir.path().join("admitted.png"), "mfa-page-admitted.png");
    assert!(
        has_color(&admitted, [0x0b, 0x5e, 0x2a]).1,
        "the admitted state's green bar"
    );
    assert_eq!(*port.seen.lock().unwrap(), ["000000", sent.as_str()]);

    drop(b);
    drop(driver);
    rt.block_on(server.stop());
}
