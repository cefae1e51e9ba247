//! `capybara cluster status|health`: the nodes of the etcd cluster this agent is a node of
//! (issue 25), and etcd's members and the node's lease as the agent reaches them.

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
}

/// Runs `capybara cluster …`.
pub(super) async fn run(cli: &Cli, cmd: &ClusterCmd) -> Result<(), CliError> {
    let client = connect(cli).await?;
    match cmd {
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
            let mut t = Table::new(&["NODE", "ROLE", "PEERS", "LEASE AGE", "TTL", ""]);
            for n in &s.nodes {
                t.row(vec![
                    n.record.name.clone(),
                    "member".into(),
                    n.record.peers_online.to_string(),
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
