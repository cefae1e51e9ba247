//! The one-time-code channels ([`CodeSender`]): e-mail over SMTP with STARTTLS required, and SMS
//! through a signed webhook to an SMS gateway.
//!
//! - **E-mail** ([`EmailSender`], `--mfa-smtp smtp://host:587`, `--mfa-smtp-from`): lettre's
//!   blocking SMTP transport with `Tls::Required`: the session is upgraded with STARTTLS before
//!   anything else is said (a server that does not offer it, or a certificate that does not
//!   verify, fails the send; there is no plain-text fallback). `smtps://host:465` is implicit
//!   TLS instead. Certificates verify against the Mozilla roots (webpki-roots) plus the PEM CA
//!   of `--mfa-smtp-ca FILE` (a private CA). Credentials (`--mfa-smtp-credentials FILE`: one
//!   line `user:password`) are read from a file of mode 0600 (`fsutil::read_secret`: a file
//!   that group or others may read is refused). Every socket operation times out after
//!   [`SMTP_TIMEOUT`] (10 s); a send does at most a connect, EHLO, STARTTLS, EHLO, AUTH, MAIL,
//!   RCPT, DATA and QUIT, so it ends within about a minute even against a server that answers
//!   each step just in time, and within 10 s against a dead one.
//! - **SMS** ([`SmsSender`], `--mfa-sms-webhook URL`, `--mfa-sms-secret FILE`): a POST of
//!   `{"to","text"}` signed the Standard Webhooks way with the `whsec_` secret in the file
//!   (mode 0600), to the URL's addresses vetted by the webhooks' SSRF check
//!   (`service::webhooks::ssrf`; loopback and private addresses only with
//!   `--webhook-allow-private`), over `service::webhooks::http` (connect 5 s, whole request 10 s,
//!   redirects not followed). A 2xx answer is success; anything else is an error naming the
//!   status.
//! - The code itself never reaches a log: errors name the channel, the server and what failed,
//!   never the message.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use lettre::{
    Message, SmtpTransport, Transport as _,
    message::{Mailbox, header::ContentType},
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
    },
};

use crate::{
    fsutil,
    service::{
        verification::{CodeChannel, CodeSender},
        webhooks::{
            http::Conn,
            sign::Secret,
            ssrf::{self, WebhookUrl},
        },
    },
};

/// How long each SMTP socket operation may take.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A configuration error of a channel, naming the flag.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A flag's value is invalid.
    #[error("--{flag}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A secret file could not be read (missing, too open, unreadable).
    #[error("--{flag}: {source}")]
    File {
        /// The flag.
        flag: &'static str,
        /// Why.
        #[source]
        source: fsutil::SecretFileError,
    },
}

/// The e-mail flags, as given.
#[derive(Clone, Debug, Default)]
pub struct SmtpSettings {
    /// `--mfa-smtp`: `smtp://host[:port]` (STARTTLS, port 587 by default) or
    /// `smtps://host[:port]` (implicit TLS, 465).
    pub url: String,
    /// `--mfa-smtp-from`: the sender, `Name <addr>` or `addr`.
    pub from: String,
    /// `--mfa-smtp-credentials`: a file (mode 0600) of one line `user:password`.
    pub credentials: Option<PathBuf>,
    /// `--mfa-smtp-ca`: a PEM CA certificate to trust besides the Mozilla roots.
    pub ca: Option<PathBuf>,
}

/// E-mail over SMTP with TLS required.
pub struct EmailSender {
    transport: SmtpTransport,
    from: Mailbox,
    server: String,
}

impl std::fmt::Debug for EmailSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailSender")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .finish()
    }
}

impl EmailSender {
    /// An e-mail channel from its flags (every error names its flag).
    pub fn new(s: &SmtpSettings) -> Result<EmailSender, ChannelError> {
        let bad = |flag, reason: String| ChannelError::Invalid { flag, reason };
        let (implicit, rest) = if let Some(r) = s.url.strip_prefix("smtp://") {
            (false, r)
        } else if let Some(r) = s.url.strip_prefix("smtps://") {
            (true, r)
        } else {
            return Err(bad(
                "mfa-smtp",
                format!(
                    "{:?}: expected smtp://host[:port] (STARTTLS) or smtps://host[:port]",
                    s.url
                ),
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['/', '@', '?', '#']) {
            return Err(bad(
                "mfa-smtp",
                format!(
                    "{:?}: only a host and a port (credentials go in --mfa-smtp-credentials FILE)",
                    s.url
                ),
            ));
        }
        let not_host_port = || bad("mfa-smtp", format!("{:?}: not host[:port]", s.url));
        let (host, port) = match rest.strip_prefix('[') {
            Some(r) => {
                let (h, after) = r.split_once(']').ok_or_else(not_host_port)?;
                (h, after.strip_prefix(':'))
            }
            None => match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            },
        };
        if host.is_empty() || host.contains([':', '[', ']']) && !rest.starts_with('[') {
            return Err(not_host_port());
        }
        let host = host.to_owned();
        let port = match port.map(str::parse::<u16>) {
            None if implicit => 465,
            None => 587,
            Some(Ok(0)) => return Err(bad("mfa-smtp", format!("{:?}: port 0", s.url))),
            Some(Ok(p)) => p,
            Some(Err(_)) => return Err(not_host_port()),
        };
        let from: Mailbox = s.from.parse().map_err(|e| {
            bad(
                "mfa-smtp-from",
                format!("{:?} is not an e-mail address ({e})", s.from),
            )
        })?;
        let mut tls = TlsParameters::builder(host.clone());
        if let Some(ca) = &s.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| bad("mfa-smtp-ca", format!("{}: {e}", ca.display())))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(bad(
                    "mfa-smtp-ca",
                    format!(
                        "{}: not a PEM certificate (no BEGIN CERTIFICATE)",
                        ca.display()
                    ),
                ));
            }
            let cert = Certificate::from_pem(&pem).map_err(|e| {
                bad(
                    "mfa-smtp-ca",
                    format!("{}: not a PEM certificate ({e})", ca.display()),
                )
            })?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls
            .build_rustls()
            .map_err(|e| bad("mfa-smtp", format!("TLS for {host}: {e}")))?;
        let mut builder = SmtpTransport::builder_dangerous(host.clone())
            .port(port)
            .timeout(Some(SMTP_TIMEOUT))
            .tls(if implicit {
                Tls::Wrapper(tls)
            } else {
                Tls::Required(tls)
            });
        if let Some(path) = &s.credentials {
            builder = builder.credentials(read_credentials(path)?);
        }
        Ok(EmailSender {
            transport: builder.build(),
            from,
            server: format!("{host}:{port}"),
        })
    }

    /// Sends `code` for `user` to `to`.
    pub fn send(&self, to: &str, user: &str, code: &str) -> Result<(), String> {
        let to: Mailbox = to
            .parse()
            .map_err(|e| format!("e-mail: {to:?} is not an e-mail address ({e})"))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject("Your VPN verification code")
            .header(ContentType::TEXT_PLAIN)
            .body(format!(
                "Your verification code for the VPN (user {user}) is:\n\n    {code}\n\nEnter it on \
                 the verification page. If you did not ask for it, tell your administrator.\n"
            ))
            .map_err(|e| format!("e-mail: cannot build the message ({e})"))?;
        self.transport
            .send(&message)
            .map(|_| ())
            .map_err(|e| format!("e-mail through {}: {e}", self.server))
    }
}

/// `user:password` from the first line of `path` (mode 0600).
fn read_credentials(path: &Path) -> Result<Credentials, ChannelError> {
    const FLAG: &str = "mfa-smtp-credentials";
    let bytes = fsutil::read_secret(path)
        .map_err(|source| ChannelError::File { flag: FLAG, source })?
        .ok_or_else(|| ChannelError::Invalid {
            flag: FLAG,
            reason: format!("{}: no such file", path.display()),
        })?;
    let text = String::from_utf8(bytes).map_err(|_| ChannelError::Invalid {
        flag: FLAG,
        reason: format!("{}: not UTF-8", path.display()),
    })?;
    let line = text.lines().next().unwrap_or("");
    match line.split_once(':') {
        Some((user, password)) if !user.is_empty() && !password.is_empty() => {
            Ok(Credentials::new(user.to_owned(), password.to_owned()))
        }
        _ => Err(ChannelError::Invalid {
            flag: FLAG,
            reason: format!("{}: the first line must be user:password", path.display()),
        }),
    }
}

/// The SMS flags, as given.
#[derive(Clone, Debug, Default)]
pub struct SmsSettings {
    /// `--mfa-sms-webhook`: the gateway's URL.
    pub url: String,
    /// `--mfa-sms-secret`: a file (mode 0600) holding the `whsec_` signing secret.
    pub secret: PathBuf,
    /// `--webhook-allow-private`: the gateway may be on a loopback or private address.
    pub allow_private: bool,
}

/// SMS through a signed webhook to an SMS gateway.
#[derive(Debug)]
pub struct SmsSender {
    url: WebhookUrl,
    secret: Secret,
    allow_private: bool,
}

impl SmsSender {
    /// An SMS channel from its flags (every error names its flag).
    pub fn new(s: &SmsSettings) -> Result<SmsSender, ChannelError> {
        let url = ssrf::parse_url(&s.url).map_err(|e| ChannelError::Invalid {
            flag: "mfa-sms-webhook",
            reason: e.to_string(),
        })?;
        const FLAG: &str = "mfa-sms-secret";
        let bytes = fsutil::read_secret(&s.secret)
            .map_err(|source| ChannelError::File { flag: FLAG, source })?
            .ok_or_else(|| ChannelError::Invalid {
                flag: FLAG,
                reason: format!("{}: no such file", s.secret.display()),
            })?;
        let text = String::from_utf8_lossy(&bytes);
        let secret = Secret::parse("secret", text.trim()).map_err(|e| ChannelError::Invalid {
            flag: FLAG,
            reason: format!("{}: {e}", s.secret.display()),
        })?;
        Ok(SmsSender {
            url,
            secret,
            allow_private: s.allow_private,
        })
    }

    /// Sends `code` for `user` to the phone number `to`. Runs its own small runtime on a thread
    /// of its own, so it may be called from any thread (it blocks the caller until the answer or
    /// the timeout).
    pub fn send(&self, to: &str, user: &str, code: &str) -> Result<(), String> {
        let body = serde_json::json!({
            "to": to,
            "text": format!("Your VPN verification code (user {user}): {code}"),
        })
        .to_string();
        let id = format!("msg_{}", hex(&rand::random::<[u8; 12]>()));
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let signature = self.secret.sign(&id, timestamp, body.as_bytes());
        let headers = [
            ("webhook-id", id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        let answer = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("SMS: cannot start a runtime ({e})"))?;
                rt.block_on(Conn::default().post(
                    &self.url,
                    self.allow_private,
                    &headers,
                    body.into(),
                ))
                .map_err(|e| format!("SMS gateway {}: {e}", self.url.authority))
            })
            .join()
            .unwrap_or_else(|_| Err("SMS: the sender failed".into()))
        })?;
        if (200..300).contains(&answer.status) {
            Ok(())
        } else {
            Err(format!(
                "SMS gateway {} answered {}",
                self.url.authority, answer.status
            ))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The configured channels (`--mfa-smtp…`, `--mfa-sms…`).
#[derive(Debug, Default)]
pub struct Channels {
    /// E-mail, if configured.
    pub email: Option<EmailSender>,
    /// SMS, if configured.
    pub sms: Option<SmsSender>,
}

impl Channels {
    /// Whether no channel is configured.
    pub fn is_empty(&self) -> bool {
        self.email.is_none() && self.sms.is_none()
    }
}

impl CodeSender for Channels {
    fn channels(&self) -> Vec<CodeChannel> {
        let mut out = Vec::new();
        if self.email.is_some() {
            out.push(CodeChannel::Email);
        }
        if self.sms.is_some() {
            out.push(CodeChannel::Sms);
        }
        out
    }

    fn send(&self, channel: CodeChannel, to: &str, user: &str, code: &str) -> Result<(), String> {
        match channel {
            CodeChannel::Email => match &self.email {
                Some(e) => e.send(to, user, code),
                None => Err("e-mail: no SMTP server configured (--mfa-smtp)".into()),
            },
            CodeChannel::Sms => match &self.sms {
                Some(s) => s.send(to, user, code),
                None => Err("SMS: no gateway configured (--mfa-sms-webhook)".into()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn bad_smtp_flags_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let ok = SmtpSettings {
            url: "smtp://mail.example.org".into(),
            from: "VPN <vpn@example.org>".into(),
            ..SmtpSettings::default()
        };
        let e = EmailSender::new(&ok).unwrap();
        assert_eq!(e.server, "mail.example.org:587");
        let e = EmailSender::new(&SmtpSettings {
            url: "smtps://[::1]".into(),
            ..ok.clone()
        })
        .unwrap();
        assert_eq!(e.server, "::1:465");
        for (s, flag, why) in [
            (
                SmtpSettings {
                    url: "http://x".into(),
                    ..ok.clone()
                },
                "--mfa-smtp:",
                "expected smtp://",
            ),
            (
                SmtpSettings {
                    url: "smtp://u:p@x".into(),
                    ..ok.clone()
                },
                "--mfa-smtp:",
                "--mfa-smtp-credentials",
            ),
            (
                SmtpSettings {
                    url: "smtp://x:0".into(),
                    ..ok.clone()
                },
                "--mfa-smtp:",
                "port 0",
            ),
            (
                SmtpSettings {
                    url: "smtp://x:99999".into(),
                    ..ok.clone()
                },
                "--mfa-smtp:",
                "not host[:port]",
            ),
            (
                SmtpSettings {
                    from: "not an address".into(),
                    ..ok.clone()
                },
                "--mfa-smtp-from:",
                "not an e-mail address",
            ),
            (
                SmtpSettings {
                    ca: Some(dir.path().join("none.pem")),
                    ..ok.clone()
                },
                "--mfa-smtp-ca:",
                "none.pem",
            ),
            (
                SmtpSettings {
                    ca: Some(secret_file(dir.path(), "bad.pem", "garbage", 0o644)),
                    ..ok.clone()
                },
                "--mfa-smtp-ca:",
                "not a PEM certificate",
            ),
            (
                SmtpSettings {
                    credentials: Some(secret_file(dir.path(), "open", "u:p\n", 0o644)),
                    ..ok.clone()
                },
                "--mfa-smtp-credentials:",
                "chmod 600",
            ),
            (
                SmtpSettings {
                    credentials: Some(secret_file(dir.path(), "nocolon", "user\n", 0o600)),
                    ..ok.clone()
                },
                "--mfa-smtp-credentials:",
                "user:password",
            ),
            (
                SmtpSettings {
                    credentials: Some(dir.path().join("missing")),
                    ..ok.clone()
                },
                "--mfa-smtp-credentials:",
                "no such file",
            ),
        ] {
            let e = EmailSender::new(&s).unwrap_err().to_string();
            assert!(e.starts_with(flag) && e.contains(why), "{s:?}: {e}");
        }
        let creds = secret_file(dir.path(), "creds", "mailer:pa:ss\n", 0o600);
        EmailSender::new(&SmtpSettings {
            credentials: Some(creds),
            ..ok
        })
        .unwrap();
    }

    #[test]
    fn bad_sms_flags_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let good = Secret::generate().reveal();
        let ok = SmsSettings {
            url: "https://sms.example.org/send".into(),
            secret: secret_file(dir.path(), "secret", &format!("{good}\n"), 0o600),
            allow_private: false,
        };
        SmsSender::new(&ok).unwrap();
        for (s, flag, why) in [
            (
                SmsSettings {
                    url: "ftp://x".into(),
                    ..ok.clone()
                },
                "--mfa-sms-webhook:",
                "url:",
            ),
            (
                SmsSettings {
                    secret: secret_file(dir.path(), "open", &good, 0o640),
                    ..ok.clone()
                },
                "--mfa-sms-secret:",
                "chmod 600",
            ),
            (
                SmsSettings {
                    secret: secret_file(dir.path(), "short", "whsec_AAAA", 0o600),
                    ..ok.clone()
                },
                "--mfa-sms-secret:",
                "has 3 bytes",
            ),
            (
                SmsSettings {
                    secret: dir.path().join("missing"),
                    ..ok.clone()
                },
                "--mfa-sms-secret:",
                "no such file",
            ),
        ] {
            let e = SmsSender::new(&s).unwrap_err().to_string();
            assert!(e.starts_with(flag) && e.contains(why), "{s:?}: {e}");
        }
    }

    /// A refused destination is an error at once, naming the gateway, not a hang; a channel
    /// that is not configured says which flag configures it.
    #[test]
    fn failures_are_errors_naming_the_channel() {
        let dir = tempfile::tempdir().unwrap();
        let sms = SmsSender::new(&SmsSettings {
            url: "http://127.0.0.1:9/send".into(),
            secret: secret_file(dir.path(), "s", &Secret::generate().reveal(), 0o600),
            allow_private: false,
        })
        .unwrap();
        let e = sms.send("+4912345", "alice", "123456").unwrap_err();
        assert!(
            e.starts_with("SMS gateway 127.0.0.1:9: ") && e.contains("loopback"),
            "{e}"
        );
        assert!(!e.contains("123456"), "{e}");
        let none = Channels::default();
        assert!(none.is_empty() && none.channels().is_empty());
        assert!(
            none.send(CodeChannel::Email, "a@b.c", "alice", "1")
                .unwrap_err()
                .contains("--mfa-smtp")
        );
        assert!(
            none.send(CodeChannel::Sms, "+1", "alice", "1")
                .unwrap_err()
                .contains("--mfa-sms-webhook")
        );
        // Nothing listens on the discard port: the e-mail fails fast, without the code.
        let email = EmailSender::new(&SmtpSettings {
            url: "smtp://127.0.0.1:9".into(),
            from: "vpn@example.org".into(),
            ..SmtpSettings::default()
        })
        .unwrap();
        let e = email
            .send("alice@example.org", "alice", "654321")
            .unwrap_err();
        assert!(e.starts_with("e-mail through 127.0.0.1:9: "), "{e}");
        assert!(!e.contains("654321"), "{e}");
        let e = email.send("nobody", "alice", "654321").unwrap_err();
        assert!(
            e.starts_with("e-mail: \"nobody\" is not an e-mail address"),
            "{e}"
        );
    }
}
