//! Debian's `v2ray` (4.34, installed by `cargo xtask setup`) as a process: a VLESS client over
//! TLS with a SOCKS inbound on loopback (what a user runs), or a VLESS+TLS server (the
//! reference of the `vless_throughput_vs_v2ray` benchmark). The configurations are the JSON
//! v2ray reads; [`V2ray`] stops the process when dropped, even on panic.
//!
//! The client configuration that worked against Capybara's endpoint ([`client_config`]):
//!
//! ```json
//! {"log": {"loglevel": "warning"},
//!  "inbounds": [{"listen": "127.0.0.1", "port": SOCKS_PORT, "protocol": "socks",
//!                "settings": {"auth": "noauth", "udp": false}}],
//!  "outbounds": [{"protocol": "vless",
//!    "settings": {"vnext": [{"address": "127.0.0.1", "port": ENDPOINT_PORT,
//!                            "users": [{"id": "UUID", "encryption": "none", "flow": ""}]}]},
//!    "streamSettings": {"network": "tcp", "security": "tls",
//!      "tlsSettings": {"serverName": "SNI", "disableSystemRoot": true,
//!        "certificates": [{"usage": "verify", "certificate": ["-----BEGIN CERTIFICATE-----", "…",
//!                                                             "-----END CERTIFICATE-----"]}]}}}]}
//! ```
//!
//! v2ray 4.34 has no `pinnedPeerCertificateChainSha256`: the endpoint's (self-signed)
//! certificate is its only trusted root (`usage: "verify"`, `disableSystemRoot`), and the name
//! is still checked against `serverName`.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The `v2ray` binary (Debian's package).
pub const V2RAY: &str = "/usr/bin/v2ray";

pub use crate::free_port;
pub use capybara_agent::service::proxies::format_uuid as uuid_string;

/// A VLESS-over-TLS client: SOCKS5 (no auth) on `127.0.0.1:socks_port`, VLESS to `server`
/// with `uuid`, checking the name `sni` and trusting only the PEM `trusted_pem`.
pub fn client_config(
    socks_port: u16,
    server: SocketAddr,
    uuid: &[u8; 16],
    sni: &str,
    trusted_pem: &str,
) -> Value {
    let lines: Vec<&str> = trusted_pem.lines().collect();
    json!({
        "log": {"loglevel": "warning"},
        "inbounds": [{
            "listen": "127.0.0.1",
            "port": socks_port,
            "protocol": "socks",
            "settings": {"auth": "noauth", "udp": false}
        }],
        "outbounds": [{
            "protocol": "vless",
            "settings": {"vnext": [{
                "address": server.ip().to_string(),
                "port": server.port(),
                "users": [{"id": uuid_string(uuid), "encryption": "none", "flow": ""}]
            }]},
            "streamSettings": {
                "network": "tcp",
                "security": "tls",
                "tlsSettings": {
                    "serverName": sni,
                    "disableSystemRoot": true,
                    "certificates": [{"usage": "verify", "certificate": lines}]
                }
            }
        }]
    })
}

/// A VLESS-over-TLS server on `127.0.0.1:port` for `uuids`, with the certificate and key in
/// the PEM files `cert` and `key`, connecting out directly (`freedom`).
pub fn server_config(port: u16, uuids: &[[u8; 16]], cert: &Path, key: &Path) -> Value {
    let clients: Vec<Value> = uuids
        .iter()
        .map(|u| json!({"id": uuid_string(u), "flow": ""}))
        .collect();
    json!({
        "log": {"loglevel": "warning"},
        "inbounds": [{
            "listen": "127.0.0.1",
            "port": port,
            "protocol": "vless",
            "settings": {"clients": clients, "decryption": "none"},
            "streamSettings": {
                "network": "tcp",
                "security": "tls",
                "tlsSettings": {"certificates": [{
                    "certificateFile": cert.display().to_string(),
                    "keyFile": key.display().to_string()
                }]}
            }
        }],
        "outbounds": [{"protocol": "freedom"}]
    })
}

/// A running `v2ray`; killed when dropped.
pub struct V2ray {
    child: Child,
    dir: tempfile::TempDir,
}

impl V2ray {
    /// Starts `v2ray` with `config` and waits (≤ 5 s) until it accepts on `127.0.0.1:port`.
    /// Panics with its log if it does not.
    pub fn start(config: &Value, port: u16) -> V2ray {
        let dir = tempfile::tempdir().expect("temp dir for v2ray");
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let log = std::fs::File::create(dir.path().join("v2ray.log")).unwrap();
        let child = Command::new(V2RAY)
            .arg("-config")
            .arg(&path)
            // Asset lookups (geoip.dat) stay in the temp dir; no rule uses them.
            .env("V2RAY_LOCATION_ASSET", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {V2RAY} (cargo xtask setup installs it): {e}"));
        let mut v = V2ray { child, dir };
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = v.child.try_wait() {
                panic!("v2ray exited ({status}): {}", v.log());
            }
            assert!(
                Instant::now() < deadline,
                "v2ray does not listen on {port} after 5 s: {}",
                v.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        v
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(self.log_path()).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("v2ray.log")
    }
}

impl Drop for V2ray {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
