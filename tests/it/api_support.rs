//! An in-process agent API for the `api_*` tests: a real gRPC server on `127.0.0.1:0` and on a
//! Unix socket in a temporary directory, over a real store and the in-memory dataplane and
//! tunnel. Dropping it shuts the server down.

use std::{path::PathBuf, sync::Arc};

use capybara_agent::{
    api::{
        self, Listeners,
        client::{Client, ClientError, Endpoint},
    },
    service::{
        NewToken, Service, ServiceConfig,
        domain::{Actor, PublicKey, Scope},
        secrets::Sealer,
        testing::{MemoryPlane, MemoryTunnel},
    },
    store::Store,
};
use tonic::Code;

/// A running in-process API.
pub struct TestApi {
    pub dir: tempfile::TempDir,
    pub tcp: std::net::SocketAddr,
    pub socket: PathBuf,
    pub svc: Arc<Service>,
    pub plane: Arc<MemoryPlane>,
    pub tunnel: Arc<MemoryTunnel>,
    /// The metrics the service reports to (served as `GET /metrics`).
    pub metrics: Arc<capybara_agent::metrics::Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApi {
    /// Starts a server (inside a tokio runtime); `keep` = `--keep-client-keys`.
    pub async fn start(keep: bool) -> TestApi {
        TestApi::start_full(keep, None, None).await
    }

    /// Starts a server with a country database for geo policies.
    pub async fn start_with(
        keep: bool,
        geo_db: Option<Arc<capybara_agent::geo::GeoDb>>,
    ) -> TestApi {
        TestApi::start_full(keep, geo_db, None).await
    }

    /// Starts a server whose TCP listener serves TLS with `tls`.
    pub async fn start_tls(tls: capybara_agent::api::TlsIdentity) -> TestApi {
        TestApi::start_full(false, None, Some(tls)).await
    }

    async fn start_full(
        keep: bool,
        geo_db: Option<Arc<capybara_agent::geo::GeoDb>>,
        tls: Option<capybara_agent::api::TlsIdentity>,
    ) -> TestApi {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Store::open(&dir.path().join("data")).expect("store"));
        let plane = Arc::new(MemoryPlane::default());
        let tunnel = Arc::new(MemoryTunnel::default());
        let svc = Arc::new(
            Service::open(
                store,
                plane.clone(),
                tunnel.clone(),
                ServiceConfig {
                    server_v4: "10.99.0.1/16".parse().unwrap(),
                    server_v6: "fd99::1/64".parse().unwrap(),
                    server_public_key: PublicKey([1; 32]),
                    endpoint: "192.0.2.1:51820".into(),
                    dns: vec![],
                    keep_client_keys: keep.then(|| Sealer::new(&[2; 32])),
                    geo_db,
                    keep_unknown_peers: false,
                },
            )
            .expect("service"),
        );
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tcp");
        let addr = tcp.local_addr().unwrap();
        let socket = dir.path().join("run/agent.sock");
        let unix = api::bind_unix(&socket).expect("bind unix");
        let metrics = capybara_agent::metrics::Metrics::install(
            &svc,
            capybara_agent::metrics::MetricsConfig::default(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(api::run(
            svc.clone(),
            Listeners {
                tcp: Some(tcp),
                unix: Some(unix),
                tcp_tls: tls,
                // `GET /metrics` beside the API, as the agent serves it.
                metrics: Some(metrics.clone()),
                // No per-token rate limit (tests make calls at any pace; `api_rest` tests the
                // limiter with a setting of its own).
                tcp_access: Some(capybara_agent::service::access::ApiAccess {
                    listen: addr,
                    tls: None,
                    insecure: false,
                    rate_limit: 0,
                }),
                // Scheduled tasks, as the agent runs them (their commands in-process).
                in_process: Some(capybara_agent::scheduler::start(&svc)),
            },
            async {
                let _ = stopped.await;
            },
        ));
        let task = tokio::spawn(async move {
            task.await.expect("server task").expect("server");
        });
        TestApi {
            dir,
            tcp: addr,
            socket,
            svc,
            plane,
            tunnel,
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A token of `scope`, made directly through the service.
    pub fn token(&self, scope: Scope) -> String {
        self.svc
            .tokens
            .create_token(
                &Actor::Local { uid: 0 },
                NewToken {
                    scope,
                    name: format!("test-{scope}"),
                    expires_at: None,
                    user: None,
                },
            )
            .expect("token")
            .1
    }

    /// The TCP URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.tcp)
    }

    /// A TCP client with `token`.
    pub async fn tcp_client(&self, token: Option<&str>) -> Client {
        Client::connect(&Endpoint::Tcp {
            url: self.url(),
            token: token.map(str::to_owned),
            ca_cert: None,
        })
        .await
        .expect("connect tcp")
    }

    /// A client on the control socket.
    pub async fn unix_client(&self) -> Client {
        Client::connect(&Endpoint::Unix(self.socket.clone()))
            .await
            .expect("connect unix")
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server stopped cleanly");
        }
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The `capybara` binary, run with fixed leading arguments (how to reach the agent).
pub struct Cli {
    pub bin: PathBuf,
    pub args: Vec<String>,
}

/// What one `capybara` run printed and its exit code.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cli {
    /// Over the agent's Unix socket `socket`.
    pub fn socket(bin: &std::path::Path, socket: &std::path::Path) -> Cli {
        Cli {
            bin: bin.to_owned(),
            args: vec!["--socket".into(), socket.display().to_string()],
        }
    }

    /// Over `api`'s TCP listener with `token`.
    pub fn tcp(bin: &std::path::Path, api: &TestApi, token: &str) -> Cli {
        Cli {
            bin: bin.to_owned(),
            args: vec![
                "--endpoint".into(),
                api.url(),
                "--token".into(),
                token.into(),
            ],
        }
    }

    /// Runs it with `args` (the environment's token and endpoint removed).
    pub fn run(&self, args: &[&str]) -> Out {
        self.run_in(std::path::Path::new("."), args)
    }

    /// [`Cli::run`] in the working directory `dir` (for relative file arguments).
    pub fn run_in(&self, dir: &std::path::Path, args: &[&str]) -> Out {
        let o = std::process::Command::new(&self.bin)
            .args(&self.args)
            .args(args)
            .current_dir(dir)
            .env_remove("CAPYBARA_TOKEN")
            .env_remove("CAPYBARA_ENDPOINT")
            .output()
            .expect("run capybara");
        Out {
            code: o.status.code().expect("exit code"),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Its standard output; it must succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.code, 0, "capybara {args:?} failed: {}", o.stderr);
        o.stdout
    }

    /// Its `--json` output, parsed; it must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("JSON output")
    }

    /// It fails with `code` and one line of standard error containing `needle`; that line.
    pub fn fails(&self, code: i32, args: &[&str], needle: &str) -> String {
        let o = self.run(args);
        assert_eq!(o.code, code, "capybara {args:?}: {}{}", o.stdout, o.stderr);
        assert_eq!(o.stderr.lines().count(), 1, "one line: {:?}", o.stderr);
        assert!(
            o.stderr.contains(needle),
            "{needle:?} not in {:?}",
            o.stderr
        );
        o.stderr
    }
}

/// The gRPC code and message of a call that must fail (panics if it succeeded or failed
/// without a status).
pub fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(ClientError::Status(s)) => (s.code(), s.message().to_owned()),
        Err(e) => panic!("not a status: {e}"),
    }
}
