//! Headless Chromium driven over the W3C WebDriver protocol by Debian's `chromium-driver`
//! (`/usr/bin/chromedriver`), for tests of pages people use (the MFA verification page).
//!
//! [`Driver::start`] runs chromedriver on a free loopback port, in this network namespace or in
//! a test's [`NetNs`] (then Chromium runs there too, so its requests come from the namespace's
//! addresses, e.g. a WireGuard client's tunnel address); [`Driver::session`] opens a session
//! with headless Chromium (`--no-sandbox` as root, a profile of its own in a temp dir, a fixed
//! window size). A [`Session`] navigates, finds elements by CSS selector, types, clicks, reads
//! text and takes PNG screenshots. The session is deleted and chromedriver killed on drop, even
//! when the test panics.
//!
//! The HTTP client is a few lines over `TcpStream` (one request per connection, `Connection:
//! close`): WebDriver is plain JSON over HTTP/1.1 and needs no more. Every call has a 60 s
//! read timeout, so a hung browser fails the test instead of hanging it.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::netns::NetNs;

/// The WebDriver element key (W3C).
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long one WebDriver call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A running chromedriver.
pub struct Driver<'ns> {
    child: Child,
    addr: SocketAddr,
    ns: Option<&'ns NetNs>,
    profile: tempfile::TempDir,
}

impl std::fmt::Debug for Driver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("addr", &self.addr).finish()
    }
}

/// A WebDriver error answer.
#[derive(Debug)]
pub struct WebDriverError {
    /// The call.
    pub method: String,
    /// Its path.
    pub path: String,
    /// The W3C error code (`no such element`, …).
    pub error: String,
    /// The message.
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WebDriver {} {}: {}: {}",
            self.method, self.path, self.error, self.message
        )
    }
}

impl std::error::Error for WebDriverError {}

impl<'ns> Driver<'ns> {
    /// Starts chromedriver (in `ns` if given) and waits until it is ready (at most 30 s).
    pub fn start(ns: Option<&'ns NetNs>) -> Driver<'ns> {
        let port = match ns {
            Some(ns) => ns.run(crate::free_port),
            None => crate::free_port(),
        };
        let args = [
            "/usr/bin/chromedriver".to_owned(),
            format!("--port={port}"),
            "--allowed-ips=127.0.0.1".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = match ns {
            Some(ns) => ns.command(&args),
            None => {
                let mut c = Command::new(args[0]);
                c.args(&args[1..]);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver: {e} (cargo xtask setup installs chromium-driver)"
                )
            });
        let driver = Driver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ns,
            profile: tempfile::tempdir().expect("a temp dir for the browser profile"),
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(status) = driver.call("GET", "/status", None)
                && status["ready"] == true
            {
                return driver;
            }
            assert!(Instant::now() < end, "chromedriver not ready within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let addr = self.addr;
        match self.ns {
            Some(ns) => ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5))),
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        }
    }

    /// One WebDriver call: its `value`, or the error it answered.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        let fail = |error: String, message: String| WebDriverError {
            method: method.to_owned(),
            path: path.to_owned(),
            error,
            message,
        };
        let io = |e: std::io::Error| fail("io".into(), e.to_string());
        let mut stream = self.connect().map_err(io)?;
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(io)?;
        // chromedriver keeps the connection open whatever `Connection` says: read the head,
        // then exactly Content-Length bytes (or chunks, or to the end without either).
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = stream.read(&mut chunk).map_err(io)?;
            if n == 0 {
                return Err(fail(
                    "http".into(),
                    format!("no answer head: {:?}", String::from_utf8_lossy(&raw)),
                ));
            }
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
        let length = head.lines().find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
        let chunked = head.contains("transfer-encoding: chunked")
            || head.contains("transfer-encoding:chunked");
        loop {
            let have = raw.len() - head_end - 4;
            let done = match length {
                Some(n) => have >= n,
                None if chunked => raw.ends_with(b"0\r\n\r\n"),
                None => false,
            };
            if done {
                break;
            }
            let n = stream.read(&mut chunk).map_err(io)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        let rest = String::from_utf8_lossy(&raw[head_end + 4..]).into_owned();
        let body = if chunked { dechunk(&rest) } else { rest };
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| fail("json".into(), format!("{e}: {body:?}")))?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        match value.get("error").and_then(Value::as_str) {
            Some(error) => Err(fail(
                error.to_owned(),
                value["message"].as_str().unwrap_or("").to_owned(),
            )),
            None => Ok(value),
        }
    }

    /// A new session with headless Chromium (a `width`×`height` window).
    pub fn session(&self, width: u32, height: u32) -> Session<'_, 'ns> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-default-browser-check", "--disable-features=Translate",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            },
        }}});
        let v = self
            .call("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("cannot open a Chromium session: {e}"));
        let session = Session {
            driver: self,
            id: v["sessionId"].as_str().expect("a session id").to_owned(),
        };
        // Finding an element waits up to 2 s for it (a page still loading after a submit).
        session.call("POST", "/timeouts", Some(json!({"implicit": 2000})));
        session
    }
}

impl Drop for Driver<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A browser session (deleted on drop).
#[derive(Debug)]
pub struct Session<'d, 'ns> {
    driver: &'d Driver<'ns>,
    id: String,
}

/// An element of the page.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Session<'_, '_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.id);
        self.driver
            .call(method, &path, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Opens `url` and waits for it to load.
    pub fn navigate(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.call("GET", "/url", None)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// The page's title.
    pub fn title(&self) -> String {
        self.call("GET", "/title", None)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// The first element matching `css`, or `None`.
    pub fn try_find(&self, css: &str) -> Option<Element> {
        let path = format!("/session/{}/element", self.id);
        match self.driver.call(
            "POST",
            &path,
            Some(json!({"using": "css selector", "value": css})),
        ) {
            Ok(v) => Some(Element(
                v[ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("an element id in {v}"))
                    .to_owned(),
            )),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// The first element matching `css` (panics naming it if there is none).
    pub fn find(&self, css: &str) -> Element {
        self.try_find(css)
            .unwrap_or_else(|| panic!("no element {css:?} on {}", self.url()))
    }

    /// Types `text` into `el` (after clicking it, as a person would).
    pub fn type_into(&self, el: &Element, text: &str) {
        self.call("POST", &format!("/element/{}/click", el.0), Some(json!({})));
        self.call(
            "POST",
            &format!("/element/{}/value", el.0),
            Some(json!({ "text": text })),
        );
    }

    /// Clicks `el` (a button submits its form; the call returns once the next page loaded).
    pub fn click(&self, el: &Element) {
        self.call("POST", &format!("/element/{}/click", el.0), Some(json!({})));
    }

    /// Clicks `el`, which submits a form, and waits (at most 10 s) until the page it was on is
    /// gone (`el` is stale): a click does not always wait for the navigation it starts.
    pub fn submit(&self, el: &Element) {
        self.click(el);
        let end = Instant::now() + Duration::from_secs(10);
        let path = format!("/session/{}/element/{}/name", self.id, el.0);
        loop {
            match self.driver.call("GET", &path, None) {
                Err(e) if e.error == "stale element reference" => return,
                // The same, caught while Chromium swaps the documents: chromedriver then answers
                // "unknown error" from the inspector, the node being already detached (seen in
                // CI: "Node with given id does not belong to the document").
                Err(e)
                    if e.error == "unknown error"
                        && (e.message.contains("does not belong to the document")
                            || e.message.contains("No node with given id")) =>
                {
                    return;
                }
                Err(e) if e.error != "no such element" => panic!("{e}"),
                _ => {}
            }
            assert!(
                Instant::now() < end,
                "the form was not submitted within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The rendered text of `el`.
    pub fn text(&self, el: &Element) -> String {
        self.call("GET", &format!("/element/{}/text", el.0), None)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// An attribute of `el`.
    pub fn attribute(&self, el: &Element, name: &str) -> Option<String> {
        self.call("GET", &format!("/element/{}/attribute/{name}", el.0), None)
            .as_str()
            .map(str::to_owned)
    }

    /// The element that has the keyboard focus.
    pub fn active(&self) -> Element {
        let v = self.call("GET", "/element/active", None);
        Element(v[ELEMENT].as_str().expect("an element id").to_owned())
    }

    /// The id attribute of the focused element.
    pub fn active_id(&self) -> Option<String> {
        self.attribute(&self.active(), "id")
    }

    /// Whether `a` and `b` are the same element.
    pub fn same(&self, a: &Element, b: &Element) -> bool {
        a.0 == b.0
    }

    /// Presses keys (W3C key codes, e.g. `"\u{E004}"` for Tab) on the focused element.
    pub fn keys(&self, keys: &str) {
        let el = self.active();
        self.call(
            "POST",
            &format!("/element/{}/value", el.0),
            Some(json!({ "text": keys })),
        );
    }

    /// The page's source as the browser has it.
    pub fn source(&self) -> String {
        self.call("GET", "/source", None)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// A screenshot of the viewport (PNG bytes).
    pub fn screenshot_png(&self) -> Vec<u8> {
        let b64 = self.call("GET", "/screenshot", None);
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 PNG"))
            .expect("the screenshot decodes")
    }

    /// Saves a screenshot to `path` and, for a person to look at, copies it to `/work/shots/`
    /// under `name` (the directory is made if missing; a failure to copy is only reported).
    pub fn screenshot_to(&self, path: &std::path::Path, name: &str) -> Vec<u8> {
        let png = self.screenshot_png();
        std::fs::write(path, &png).expect("write the screenshot");
        let shots = std::path::Path::new("/work/shots");
        if let Err(e) =
            std::fs::create_dir_all(shots).and_then(|()| std::fs::write(shots.join(name), &png))
        {
            eprintln!("cannot copy the screenshot to /work/shots/{name}: {e}");
        }
        png
    }
}

impl Session<'_, '_> {
    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page and returns what
    /// it returns (the charts' test reads the boxes Chromium drew the texts in).
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// A screenshot of `el` alone (PNG bytes), cropped to its box.
    pub fn element_screenshot_png(&self, el: &Element) -> Vec<u8> {
        let b64 = self.call("GET", &format!("/element/{}/screenshot", el.0), None);
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 PNG"))
            .expect("the screenshot decodes")
    }
}

impl Drop for Session<'_, '_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .call("DELETE", &format!("/session/{}", self.id), None);
    }
}
