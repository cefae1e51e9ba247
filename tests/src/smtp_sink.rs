//! A local SMTP sink that speaks STARTTLS (PyPI's `aiosmtpd` in the venv `cargo xtask setup`
//! makes), for the e-mail code channel's tests.
//!
//! [`SmtpSink::start`] makes a throw-away CA and a server certificate for `127.0.0.1` with the
//! `openssl` command line (in the test's temp dir), starts the sink on a free loopback port with
//! that certificate and, when asked, a required login, and records every message it accepts as
//! one JSON line: the envelope, whether the session had been upgraded with STARTTLS when the
//! message came, the login used and the raw message. Killed on drop.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::{ca::TestCa, receivers::PYTHON};

const PY_SINK: &str = r#"
import asyncio, json, ssl, sys
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

cert, key, log, tls, user, password = sys.argv[1:7]

class Handler:
    async def handle_DATA(self, server, session, envelope):
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        with open(log, "a") as f:
            f.write(json.dumps({"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
                                "tls": session.ssl is not None, "login": login,
                                "data": envelope.content.decode("utf-8", "replace")}) + "\n")
        return "250 Message accepted"

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user
          and auth_data.password.decode() == password)
    return AuthResult(success=ok, handled=False, auth_data=auth_data)

ctx = None
if tls == "starttls":
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

def factory():
    return SMTP(Handler(), hostname="sink.test", tls_context=ctx, require_starttls=ctx is not None,
                authenticator=authenticator if user else None, auth_required=bool(user),
                auth_require_tls=True)

async def main():
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"#;

/// One message the sink accepted.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct SinkMessage {
    /// `MAIL FROM`.
    pub mail_from: String,
    /// `RCPT TO`s.
    pub rcpt_tos: Vec<String>,
    /// The session had been upgraded with STARTTLS.
    pub tls: bool,
    /// The login the client authenticated with, if any.
    pub login: Option<String>,
    /// The message (headers and body) as received.
    pub data: String,
}

/// The sink (see the module docs).
#[derive(Debug)]
pub struct SmtpSink {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
}

impl SmtpSink {
    /// Starts a sink in `dir` with `ca`'s server certificate: STARTTLS offered and required when
    /// `starttls`, else plain SMTP only (no STARTTLS offered); a login required when `login`
    /// is `Some((user, password))` (only over TLS).
    pub fn start(dir: &Path, ca: &TestCa, starttls: bool, login: Option<(&str, &str)>) -> SmtpSink {
        let log = dir.join(format!("smtp-{}.jsonl", rand::random::<u32>()));
        let (user, password) = login.unwrap_or(("", ""));
        let mut child = Command::new(PYTHON)
            .arg("-c")
            .arg(PY_SINK)
            .arg(&ca.cert_pem)
            .arg(&ca.key_pem)
            .arg(&log)
            .arg(if starttls { "starttls" } else { "plain" })
            .args([user, password])
            .stdout(Stdio::piped())
            // Refused handshakes (the tests' own) print tracebacks: kept beside the log.
            .stderr(
                std::fs::File::create(log.with_extension("stderr"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PYTHON}: {e} (cargo xtask setup makes it)"));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the sink prints its port");
        let port = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the SMTP sink did not start ({line:?}); is aiosmtpd in the venv? (cargo xtask setup)"
                )
            }
        };
        SmtpSink { child, port, log }
    }

    /// `smtp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message accepted so far.
    pub fn messages(&self) -> Vec<SinkMessage> {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("a message line"))
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
