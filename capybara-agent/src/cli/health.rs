//! `capybara health`: whether the agent and each of its components serve
//! (`grpc.health.v1`), with what each component's check found (`ListComponents`: e.g. the
//! `history` component's "auth reports dropped: N since start"); exit 1 unless all do. `--json`
//! prints the statuses only, as before.

use super::{
    Cli, CliError, connect,
    output::{out, print_json},
    table::Table,
};

/// Runs `capybara health`.
pub(super) async fn run(cli: &Cli) -> Result<(), CliError> {
    let client = connect(cli).await?;
    let mut rows = vec![("agent".to_owned(), client.health("").await?)];
    for c in crate::service::health::COMPONENTS {
        rows.push((c.to_owned(), client.health(&format!("capybara.{c}")).await?));
    }
    if cli.json {
        let map: std::collections::BTreeMap<&str, bool> =
            rows.iter().map(|(n, ok)| (n.as_str(), *ok)).collect();
        print_json(&map)?;
    } else {
        let details = client.components().await?;
        let detail = |n: &str| {
            details
                .iter()
                .find(|c| c.name == n)
                .map(|c| c.detail.clone())
                .unwrap_or_default()
        };
        let mut t = Table::new(&["COMPONENT", "STATUS", "DETAIL"]);
        for (n, ok) in &rows {
            t.row(vec![
                n.clone(),
                if *ok { "serving" } else { "not serving" }.into(),
                detail(n),
            ]);
        }
        out!("{t}")?;
    }
    match rows.iter().find(|(_, ok)| !ok) {
        None => Ok(()),
        Some((n, _)) => Err(CliError::Client(crate::api::client::ClientError::Status(
            tonic::Status::unavailable(format!("{n} is not serving (the agent's log says why)")),
        ))),
    }
}
