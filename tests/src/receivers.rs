//! Webhook receivers on loopback for the webhook tests and the `webhook_events_per_s` bench.
//!
//! - [`PyReceiver`]: a small Python HTTP server (the venv's `standardwebhooks`, the Standard
//!   Webhooks project's own package from PyPI) that verifies every request's signature with
//!   the secret it is given and records each request (verified or not, with the time its body
//!   arrived) as one JSON line. It
//!   answers 204 to a verified request and 400 otherwise. Killed on drop.
//! - [`Sink`]: an HTTP/1.1 receiver in the test process (hyper) that answers 204 and counts and
//!   keeps what it got, fast enough for tens of thousands of requests a second; or, as a
//!   [`Blackhole`], a listener that accepts connections and never answers (a dead receiver that
//!   makes each attempt wait for its timeout).

use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

/// The venv's Python with `standardwebhooks`.
pub const PYTHON: &str = "/var/cache/capybara/pyenv/bin/python";

const PY_RECEIVER: &str = r#"
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from standardwebhooks.webhooks import Webhook

secret, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hook = Webhook(secret)

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        received_at = time.time()
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            hook.verify(body, headers)
            ok, err = True, ""
        except Exception as e:
            ok, err = False, repr(e)
        with open(log, "a") as f:
            f.write(json.dumps({"path": self.path, "received_at": received_at,
                                "verified": ok, "error": err,
                                "webhook_id": headers.get("webhook-id"),
                                "content_type": headers.get("content-type"),
                                "signatures": headers.get("webhook-signature", "").count("v1,"),
                                "body": json.loads(body) if ok else body.decode("utf-8", "replace")}) + "\n")
        self.send_response(204 if ok else 400)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer(("127.0.0.1", port), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// One request a [`PyReceiver`] got.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct PyRecord {
    /// The request path.
    pub path: String,
    /// When its body had been read (Unix seconds, the receiver's clock: the machine's).
    #[serde(default)]
    pub received_at: f64,
    /// `standardwebhooks` verified the signature.
    pub verified: bool,
    /// Why not.
    pub error: String,
    /// The `webhook-id` header.
    pub webhook_id: Option<String>,
    /// The `content-type` header.
    pub content_type: Option<String>,
    /// How many signatures the header held.
    pub signatures: usize,
    /// The body (JSON when verified).
    pub body: serde_json::Value,
}

fn spawn(ns: Option<&str>, secret: &str, port: u16, log: &std::path::Path) -> (Child, u16) {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, PYTHON]);
            c
        }
        None => Command::new(PYTHON),
    };
    let mut child = cmd
        .args(["-c", PY_RECEIVER, secret, &port.to_string()])
        .arg(log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {PYTHON}: {e} (cargo xtask setup makes it)"));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("the receiver prints its port");
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the receiver did not start: {line:?}"));
    (child, port)
}

/// The Python receiver (see the module docs).
pub struct PyReceiver {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
    secret: String,
    /// The network namespace it runs in (`ip netns exec`), if not this one.
    ns: Option<String>,
}

impl PyReceiver {
    /// Starts a receiver verifying with `secret` (`whsec_…`) on `port` (0: a free one),
    /// appending to the log file `log`.
    pub fn start(secret: &str, port: u16, log: PathBuf) -> PyReceiver {
        PyReceiver::start_in(None, secret, port, log)
    }

    /// [`PyReceiver::start`] inside network namespace `ns` (its loopback), for an agent
    /// running there.
    pub fn start_in(ns: Option<&str>, secret: &str, port: u16, log: PathBuf) -> PyReceiver {
        let (child, port) = spawn(ns, secret, port, &log);
        PyReceiver {
            child,
            port,
            log,
            secret: secret.to_owned(),
            ns: ns.map(str::to_owned),
        }
    }

    /// Its URL for path `/hook`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Every request it got so far (across restarts on the same log).
    pub fn records(&self) -> Vec<PyRecord> {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("a record line"))
            .collect()
    }

    /// Stops it (nothing listens on its port until [`PyReceiver::restart`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and log.
    pub fn restart(&mut self) {
        self.stop();
        let (child, _) = spawn(self.ns.as_deref(), &self.secret, self.port, &self.log);
        self.child = child;
    }
}

impl Drop for PyReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A new random `whsec_` secret (as a receiver's operator would make one).
pub fn random_secret() -> String {
    use base64::Engine as _;
    let key: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// What a [`Sink`] got.
#[derive(Debug, Default)]
pub struct SinkLog {
    /// Each request's `webhook-id` and body, in arrival order.
    pub got: Vec<(String, bytes::Bytes)>,
    /// When each of them had been read whole (the machine's clock), in the same order.
    pub arrived: Vec<std::time::SystemTime>,
}

/// A fast in-process receiver answering 204 (see the module docs).
#[derive(Debug)]
pub struct Sink {
    /// Its address.
    pub addr: SocketAddr,
    /// What it got.
    pub log: Arc<Mutex<SinkLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// Starts one on 127.0.0.1 (inside a tokio runtime).
    pub async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Sink::serve(listener)
    }

    /// Starts one on the loopback of network namespace `ns` (inside a tokio runtime), for an
    /// agent running there.
    pub fn start_in(ns: &crate::netns::NetNs) -> Sink {
        let listener = ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap_or_else(|e| panic!("bind 127.0.0.1:0 in {}: {e}", ns.name()));
        listener.set_nonblocking(true).expect("non-blocking");
        Sink::serve(tokio::net::TcpListener::from_std(listener).expect("a tokio listener"))
    }

    fn serve(listener: tokio::net::TcpListener) -> Sink {
        use hyper::{Request, Response, body::Incoming, service::service_fn};
        use hyper_util::rt::TokioIo;
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(SinkLog::default()));
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let _ = s.set_nodelay(true);
                let log = log2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let log = log.clone();
                        async move {
                            use http_body_util::BodyExt as _;
                            let id = req
                                .headers()
                                .get("webhook-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let body = req.into_body().collect().await?.to_bytes();
                            let at = std::time::SystemTime::now();
                            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                            log.got.push((id, body));
                            log.arrived.push(at);
                            Ok::<_, hyper::Error>(
                                Response::builder()
                                    .status(204)
                                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Sink { addr, log, task }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Requests so far.
    pub fn count(&self) -> usize {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).got.len()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener that accepts and never answers (a dead receiver), on 127.0.0.1.
#[derive(Debug)]
pub struct Blackhole {
    /// Its address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    /// Starts one (inside a tokio runtime).
    pub async fn start() -> Blackhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        Blackhole { addr, task }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `line` to stderr (progress of long tests).
pub fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}
