//! `capybara-agent`: the Capybara daemon. Parses flags (merged with the configuration file:
//! `daemon::config_file`), installs the signal handlers and runs `capybara_agent::daemon::run`
//! until SIGINT or SIGTERM.
//!
//! Under systemd (`Type=notify`, `$NOTIFY_SOCKET` set) it sends `READY=1` once the daemon is
//! ready (the programs attached, the tunnel up, the API's listeners bound) and `STOPPING=1` when
//! a signal starts the shutdown; without `$NOTIFY_SOCKET` both are no-ops.

use std::path::PathBuf;

use anyhow::Context as _;
use capybara_agent::{
    daemon::{self, AgentConfig, config_file},
    paths,
};

/// An interface address `a.b.c.d/len`: the host part may be set (it is the server's address).
fn iface_addr(field: &str, s: &str) -> anyhow::Result<ipnet::IpNet> {
    s.parse()
        .with_context(|| format!("--{field}: {s:?} is not ADDRESS/PREFIX_LEN"))
}

fn main() -> anyhow::Result<()> {
    capybara_agent::logging::install();
    let args = match config_file::parse(std::env::args_os()) {
        Ok(args) => args,
        Err(config_file::LoadError::Cli(e)) => e.exit(),
        Err(config_file::LoadError::File(e)) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Some(name) = &args.netns {
        // Before the runtime starts: setns(2) moves only the calling thread, and every thread
        // spawned afterwards inherits it.
        let path = PathBuf::from("/run/netns").join(name);
        let ns = std::fs::File::open(&path)
            .with_context(|| format!("--netns: cannot open {}", path.display()))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("--netns: cannot enter {}", path.display()))?;
    }
    let ipnet::IpNet::V4(v4) = iface_addr("tunnel-ipv4", &args.tunnel_ipv4)? else {
        anyhow::bail!(
            "--tunnel-ipv4: {:?} is not an IPv4 address",
            args.tunnel_ipv4
        );
    };
    let ipnet::IpNet::V6(v6) = iface_addr("tunnel-ipv6", &args.tunnel_ipv6)? else {
        anyhow::bail!(
            "--tunnel-ipv6: {:?} is not an IPv6 address",
            args.tunnel_ipv6
        );
    };
    let duration = |field, s: &str| {
        capybara_agent::service::domain::parse_duration(field, s)
            .with_context(|| format!("--{}", field.replace('_', "-")))
    };
    let disconnect_after = duration("disconnect_timeout", &args.disconnect_timeout)?;
    let history_retention = duration("history_retention", &args.history_retention)?;
    let audit_retention = duration("audit_retention", &args.audit_retention)?;
    let alerts = capybara_agent::service::alerts::AlertConfig {
        auth_threshold: args.suspicious_auth_threshold,
        auth_window: duration("suspicious_auth_window", &args.suspicious_auth_window)?,
        flow_threshold: args.suspicious_flow_threshold,
        flow_window: duration("suspicious_flow_window", &args.suspicious_flow_window)?,
    };
    alerts
        .validate()
        .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('_', "-")))?;
    let health_interval = duration("health_interval", &args.health_interval)?;
    if health_interval.is_zero() {
        anyhow::bail!("--health-interval: must be more than 0");
    }
    // The one-time-code channels, checked before anything starts (errors name the flag).
    let mut channels = capybara_agent::verify::senders::Channels::default();
    if let (Some(url), Some(from)) = (&args.mfa_smtp, &args.mfa_smtp_from) {
        channels.email = Some(capybara_agent::verify::senders::EmailSender::new(
            &capybara_agent::verify::senders::SmtpSettings {
                url: url.clone(),
                from: from.clone(),
                credentials: args.mfa_smtp_credentials.clone(),
                ca: args.mfa_smtp_ca.clone(),
            },
        )?);
    }
    if let (Some(url), Some(secret)) = (&args.mfa_sms_webhook, &args.mfa_sms_secret) {
        channels.sms = Some(capybara_agent::verify::senders::SmsSender::new(
            &capybara_agent::verify::senders::SmsSettings {
                url: url.clone(),
                secret: secret.clone(),
                allow_private: args.webhook_allow_private,
            },
        )?);
    }
    let mfa = daemon::MfaSettings {
        port: args.mfa_port,
        config: capybara_agent::service::mfa::MfaConfig {
            lifetime: duration("mfa_lifetime", &args.mfa_lifetime)?,
            lock: duration("mfa_lock", &args.mfa_lock)?,
        },
    };
    let reputation = daemon::ReputationSettings {
        enabled: args.reputation,
        threshold: capybara_agent::service::reputation::check_threshold(
            "reputation_threshold",
            args.reputation_threshold,
        )
        .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('_', "-")))?,
        ttl: duration("reputation_ttl", &args.reputation_ttl)?,
    };
    let proxies = daemon::ProxyConfig {
        settings: args.proxy_settings(),
        vless_cert: args.vless_cert.clone().zip(args.vless_key.clone()),
    };
    let cluster = if args.etcd.is_empty() {
        None
    } else {
        let ttl = duration("cluster_ttl", &args.cluster_ttl)?;
        if ttl < std::time::Duration::from_secs(2) || ttl.subsec_nanos() != 0 {
            anyhow::bail!(
                "--cluster-ttl: whole seconds, at least 2s (got {})",
                args.cluster_ttl
            );
        }
        let node = match &args.node_name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .context("--node-name: not given, and the host name cannot be read")?,
        };
        if node.is_empty() || node.contains('/') {
            anyhow::bail!("--node-name: {node:?} is not a node name (not empty, no '/')");
        }
        if !args.etcd_prefix.starts_with('/') || args.etcd_prefix.ends_with('/') {
            anyhow::bail!(
                "--etcd-prefix: {:?} must start with '/' and not end with one",
                args.etcd_prefix
            );
        }
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
        };
        let tls = match &args.etcd_ca {
            Some(ca) => {
                if let Some(plain) = args.etcd.iter().find(|e| !e.starts_with("https://")) {
                    anyhow::bail!("--etcd: {plain} is not https:// while --etcd-ca asks for TLS");
                }
                let identity = match (&args.etcd_cert, &args.etcd_key) {
                    (Some(c), Some(k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
                    _ => None,
                };
                Some(capybara_agent::cluster::EtcdTls {
                    ca_pem: read("--etcd-ca", ca)?,
                    identity,
                })
            }
            None if args.etcd_cert.is_some() => {
                anyhow::bail!("--etcd-cert: needs --etcd-ca (the CA of the members' certificates)")
            }
            None => None,
        };
        let failover = match (&args.failover_address, &args.failover_interface) {
            (Some(a), Some(iface)) => {
                let net: ipnet::Ipv4Net = a.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "--failover-address: {a:?} is not an IPv4 address with its prefix \
                         length (e.g. 10.0.0.100/24)"
                    )
                })?;
                Some(capybara_agent::cluster::failover::FailoverConfig {
                    address: net.addr(),
                    prefix_len: net.prefix_len(),
                    interface: iface.clone(),
                })
            }
            _ => None,
        };
        Some(capybara_agent::cluster::ClusterConfig {
            endpoints: args.etcd.clone(),
            node,
            prefix: args.etcd_prefix.clone(),
            ttl,
            tls,
            failover,
        })
    };
    let config = AgentConfig {
        cluster,
        proxies,
        mfa_page: daemon::MfaPageSettings {
            channels: (!channels.is_empty()).then(|| std::sync::Arc::new(channels)),
            ..daemon::MfaPageSettings::default()
        },
        mfa,
        reputation,
        alerts,
        health_interval,
        disconnect_after,
        history_retention,
        audit_retention,
        keep_unknown_peers: args.keep_unknown_peers,
        backup_dir: args.backup_dir,
        webhook_allow_private: args.webhook_allow_private,
        metrics: daemon::MetricsSettings {
            listen: args.metrics_listen,
            config: capybara_agent::metrics::MetricsConfig {
                top_users: args.metrics_top_users,
            },
        },
        uplink: args.uplink,
        tunnel: args.tunnel,
        tunnel_ipv4: (v4.addr(), v4.prefix_len()),
        tunnel_ipv6: (v6.addr(), v6.prefix_len()),
        listen_port: args.listen_port,
        tunnel_workers: args
            .tunnel_workers
            .map_or_else(capybara_agent::tunnel::default_workers, usize::from),
        data_dir: args.data_dir,
        bpffs_dir: args.bpffs_dir,
        detach_on_exit: args.detach_on_exit,
        wg_uapi_dir: args.wg_uapi_dir,
        api: daemon::ApiSettings {
            listen: args.api_listen,
            socket: (!args.no_api_socket).then_some(args.api_socket),
            endpoint: args.public_endpoint.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "localhost".into());
                format!("{host}:{}", args.listen_port)
            }),
            dns: args.dns.iter().map(ToString::to_string).collect(),
            keep_client_keys: args.keep_client_keys,
            geo_db: daemon::geo_db_path(args.geoip_db, std::path::Path::new(paths::GEOIP_DB)),
            tls: args.api_tls_cert.zip(args.api_tls_key),
            insecure: args.insecure,
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                _ = term.recv() => tracing::info!("SIGTERM"),
            }
            notify(sd_notify::NotifyState::Stopping);
        };
        daemon::run(config, shutdown, |r| {
            tracing::info!(
                tunnel = %r.tunnel,
                uplink = r.uplink.as_deref().unwrap_or("-"),
                port = r.listen_port,
                api = %r.api_tcp.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                metrics = %r.metrics_tcp.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                "capybara-agent ready"
            );
            notify(sd_notify::NotifyState::Ready);
        })
        .await
    })?;
    Ok(())
}

/// Tells systemd (`$NOTIFY_SOCKET`) the agent's state; a failure to send is logged, it never
/// stops the agent.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}
