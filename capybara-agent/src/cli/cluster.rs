//! `capybara cluster status|health|failover`: the nodes of the etcd cluster this agent is a
//! node of (issue 25), etcd's members and the node's lease as the agent reaches them, and the
//! failover switch.

use clap::Subcommand;

use super::{
    Cli, CliError, connect,
    output::{out, outln, print_json},
    table::Table,
};

/// `capybara cluster …`.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// The nodes whose lease lives now: name, role, peers online, how long since each renewed
    /// its lease, and etcd's revision.
    Status,
    /// Each etcd member as this node reaches it, and the node's lease; exit 1 unless a quorum
    /// answers and the lease is held.
    Health,
    /// Automatic failover of the failover group's service address (agents started with
    /// --failover-address), for the whole cluster.
    Failover {
        /// `enable` or `disable`.
        #[command(subcommand)]
        action: FailoverAction,
    },
}

/// `capybara cluster failover …`.
#[derive(Debug, Subcommand)]
pub enum FailoverAction {
    /// The group's nodes campaign; the elected one holds the service address.
    Enable,
    /// The primary releases the address; no node takes it.
    Disable,
}

/// Runs `capybara cluster …`.
pub(super) async fn run(cli: &Cli, cmd: &ClusterCmd) -> Result<(), CliError> {
    let client = connect(cli).await?;
    match cmd {
        ClusterCmd::Failover { action } => {
            let enabled = matches!(action, FailoverAction::Enable);
            let s = client.set_cluster_failover(enabled).await?;
            if cli.json {
                return print_json(&s);
            }
            outln!(
                "failover {} for the cluster{}",
                if enabled { "enabled" } else { "disabled" },
                if s.failover.primary.is_empty() {
                    String::new()
                } else {
                    format!(" · primary {}", s.failover.primary)
                }
            )?;
            Ok(())
        }
        ClusterCmd::Status => {
            let s = client.cluster_status().await?;
            if cli.json {
                return print_json(&s);
            }
            if !s.clustered {
                outln!("not clustered (the agent was started without --etcd)")?;
                return Ok(());
            }
            outln!(
                "node {} · prefix {} · revision {}",
                s.node,
                s.prefix,
                s.revision
            )?;
            if !s.failover.address.is_empty() || s.failover.enabled {
                outln!(
                    "failover {} · primary {} · this node {}{}",
                    if s.failover.enabled {
                        "enabled"
                    } else {
                        "disabled"
                    },
                    if s.failover.primary.is_empty() {
                        "none"
                    } else {
                        &s.failover.primary
                    },
                    s.failover.role,
                    if s.failover.address.is_empty() {
                        String::new()
                    } else {
                        format!(" · address {}", s.failover.address)
                    }
                )?;
            }
            let mut t = Table::new(&[
                "NODE",
                "ROLE",
                "PEERS",
                "APPLIED",
                "LAG",
                "LEASE AGE",
                "TTL",
                "",
            ]);
            for n in &s.nodes {
                t.row(vec![
                    n.record.name.clone(),
                    n.role.clone(),
                    n.record.peers_online.to_string(),
                    n.record.applied_revision.to_string(),
                    n.lag.to_string(),
                    format!("{:.0} s", n.lease_age_ms as f64 / 1_000.0),
                    format!("{} s", n.lease_ttl_s),
                    if n.this_node { "(this node)" } else { "" }.into(),
                ]);
            }
            out!("{t}")?;
            Ok(())
        }
        ClusterCmd::Health => {
            let h = client.cluster_health().await?;
            if cli.json {
                print_json(&h)?;
            } else if !h.clustered {
                outln!("not clustered (the agent was started without --etcd)")?;
                return Ok(());
            } else {
                let mut t = Table::new(&["MEMBER", "STATUS", "VERSION", "LEADER", "DB", "ERROR"]);
                for m in &h.members {
                    t.row(vec![
                        m.endpoint.clone(),
                        if m.reachable {
                            "reachable"
                        } else {
                            "unreachable"
                        }
                        .into(),
                        m.version.clone(),
                        if m.leader { "yes" } else { "" }.into(),
                        if m.reachable {
                            m.db_size.to_string()
                        } else {
                            String::new()
                        },
                        m.error.clone(),
                    ]);
                }
                out!("{t}")?;
                outln!(
                    "lease: {}",
                    if h.lease_held {
                        format!("held, {} s left", h.lease_ttl_left_s)
                    } else {
                        "not held".into()
                    }
                )?;
            }
            if h.clustered && !h.healthy {
                return Err(CliError::Client(crate::api::client::ClientError::Status(
                    tonic::Status::unavailable(
                        "the cluster is not healthy: no quorum of etcd members, or no lease",
                    ),
                )));
            }
            Ok(())
        }
    }
}
