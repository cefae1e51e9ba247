//! Shadowsocks fixtures (issue 24): Debian's `ss-local` and `ss-server` (shadowsocks-libev
//! 3.3.5) on loopback, a SOCKS5 client to reach through `ss-local`, a file server to fetch from,
//! and the agent's test doubles of its proxy ports re-exported (`capybara_agent::proxy::testing`)
//! for an in-process [`capybara_agent::proxy::shadowsocks::serve`].
//!
//! shadowsocks-libev 3.3.5 speaks the SIP004 AEAD ciphers only (`aes-128-gcm`, `aes-192-gcm`,
//! `aes-256-gcm`, `chacha20-ietf-poly1305`, `xchacha20-ietf-poly1305`), none of the 2022
//! edition: [`LIBEV_CIPHERS`] are those the endpoint also serves.

use std::{
    io,
    net::{SocketAddr, TcpStream as StdTcpStream},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

pub use crate::socks::connect_async as socks5_connect;
use anyhow::{Context as _, Result, bail};
pub use capybara_agent::proxy::testing::{ChannelEvents, RecordingKernel, StaticUsers};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The ciphers both shadowsocks-libev 3.3.5 and the endpoint speak.
pub const LIBEV_CIPHERS: [&str; 3] = ["aes-128-gcm", "aes-256-gcm", "chacha20-ietf-poly1305"];

/// An `ss-local` or `ss-server` process with its configuration file; killed on drop.
pub struct SsProcess {
    child: Child,
    _dir: tempfile::TempDir,
    /// Where it listens (`ss-local`: its SOCKS5 port; `ss-server`: its Shadowsocks port).
    pub addr: SocketAddr,
    /// The configuration it was given (`-c`).
    pub config: serde_json::Value,
}

impl SsProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `ss-local` configuration for a server at `server` with `method` and `password`,
/// listening for SOCKS5 on `127.0.0.1:local_port`, TCP only.
pub fn local_config(
    server: SocketAddr,
    local_port: u16,
    method: &str,
    password: &str,
) -> serde_json::Value {
    serde_json::json!({
        "server": server.ip().to_string(),
        "server_port": server.port(),
        "local_address": "127.0.0.1",
        "local_port": local_port,
        "password": password,
        "method": method,
        "timeout": 60,
        "mode": "tcp_only",
    })
}

/// Starts `ss-local` for the server at `server`; returns once its SOCKS5 port accepts.
pub fn ss_local(server: SocketAddr, method: &str, password: &str) -> Result<SsProcess> {
    let port = crate::free_port();
    spawn(
        "ss-local",
        local_config(server, port, method, password),
        port,
    )
}

/// Starts `ss-local` with `config` as printed for a client (`capybara user config --protocol
/// shadowsocks`), its SOCKS5 port moved to a free one of the calling thread's namespace (the
/// printed 1080 may be taken); returns once it accepts.
pub fn ss_local_with(mut config: serde_json::Value) -> Result<SsProcess> {
    let port = crate::free_port();
    config["local_address"] = "127.0.0.1".into();
    config["local_port"] = port.into();
    spawn("ss-local", config, port)
}

/// Starts `ss-server` on a free loopback port with `method` and `password` (TCP only); returns
/// once it accepts.
pub fn ss_server(method: &str, password: &str) -> Result<SsProcess> {
    let port = crate::free_port();
    let config = serde_json::json!({
        "server": "127.0.0.1",
        "server_port": port,
        "password": password,
        "method": method,
        "timeout": 60,
        "mode": "tcp_only",
    });
    spawn("ss-server", config, port)
}

fn spawn(program: &str, config: serde_json::Value, port: u16) -> Result<SsProcess> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    let log = std::fs::File::create(dir.path().join("log"))?;
    let child = Command::new(program)
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("{program} (Debian's shadowsocks-libev: cargo xtask setup)"))?;
    let mut p = SsProcess {
        child,
        _dir: dir,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        config,
    };
    wait_listening(&mut p, program)?;
    Ok(p)
}

fn wait_listening(p: &mut SsProcess, program: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = p.child.try_wait()? {
            let log = std::fs::read_to_string(p._dir.path().join("log")).unwrap_or_default();
            bail!("{program} exited at start: {status}: {log}");
        }
        if StdTcpStream::connect_timeout(&p.addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{program} does not listen on {} after 5 s", p.addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a client sends the [`FileServer`] to ask for its file.
pub const FILE_REQUEST: &[u8] = b"GET /file\n";

/// A server on loopback that answers [`FILE_REQUEST`] with its file's length (8 bytes, big
/// endian) and the file, then waits for the client to close (so the proxied connection stays
/// open until the client has checked what it got). Stops when dropped.
pub struct FileServer {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileServer {
    /// Serves `file` (call inside a tokio runtime).
    pub async fn start(file: Arc<Vec<u8>>) -> io::Result<FileServer> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let file = Arc::clone(&file);
                tokio::spawn(async move {
                    let mut req = vec![0u8; FILE_REQUEST.len()];
                    if s.read_exact(&mut req).await.is_err() || req != FILE_REQUEST {
                        return;
                    }
                    let _ = s.write_all(&(file.len() as u64).to_be_bytes()).await;
                    let _ = s.write_all(&file).await;
                    let mut rest = [0u8; 64];
                    while let Ok(n) = s.read(&mut rest).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
        Ok(FileServer { addr, task })
    }
}

/// Asks `s` (a connection to a [`FileServer`], direct or proxied) for the file and reads it.
pub async fn fetch(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    s.write_all(FILE_REQUEST).await?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len).await?;
    let mut file = vec![0u8; u64::from_be_bytes(len) as usize];
    s.read_exact(&mut file).await?;
    Ok(file)
}

/// The local address of `pid`'s established TCP connection to `peer` (`ss -tnp`), e.g. the
/// source address `ss-local` connects to an endpoint from.
pub fn tcp_source_of(pid: u32, peer: SocketAddr) -> Result<SocketAddr> {
    let out = Command::new("ss")
        .args(["-Htnp", "state", "established", "dst"])
        .arg(peer.to_string())
        .output()
        .context("ss (iproute2)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("pid={pid},");
    text.lines()
        .filter(|l| l.contains(&needle))
        .find_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .with_context(|| format!("no connection of pid {pid} to {peer} in:\n{text}"))
}
