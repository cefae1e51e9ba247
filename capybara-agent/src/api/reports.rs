//! The `Reports` service (`capybara report generate`, `GET /api/v1/reports`; read scope) and
//! its client call.
//!
//! The agent renders the document (`service::usage::render`), so a REST caller asking for
//! `format=html` gets the same file the CLI writes; the answer also carries the structured
//! report. A report of 10 000 users is a few MB (the structured report and the document), so
//! the service takes [`MAX_REPORT_MESSAGE`] each way instead of tonic's 4 MiB.

use capybara_proto::v1::{self as pb, reports_client::ReportsClient, reports_server::Reports};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    handler::Api,
    status::invalid,
};
use crate::service::{
    domain::Scope,
    usage::{
        render::render,
        report::{Format, GroupUsage, QuotaStanding, Report, ReportQuery, UsageTotals, UserUsage},
        unix_ms,
    },
};

/// The largest report message each way: 64 MiB (≈ 100 000 users with their html rows).
pub const MAX_REPORT_MESSAGE: usize = 64 << 20;

fn totals(t: UsageTotals) -> pb::UsageTotals {
    pb::UsageTotals {
        rx_bytes: t.rx_bytes,
        rx_packets: t.rx_packets,
        tx_bytes: t.tx_bytes,
        tx_packets: t.tx_packets,
        sessions: t.sessions,
        online_seconds: t.online_seconds,
        peak_rx_bytes_per_second: t.peak_rx_bytes_per_second,
        peak_tx_bytes_per_second: t.peak_tx_bytes_per_second,
        drops: t.drops.into_iter().collect(),
    }
}

fn quota(q: QuotaStanding) -> pb::QuotaStanding {
    pb::QuotaStanding {
        used_bytes: q.used_bytes,
        limit_bytes: q.limit_bytes,
        percent: q.percent,
        over: q.over,
        period: q.period,
    }
}

impl From<Report> for pb::UsageReport {
    fn from(r: Report) -> pb::UsageReport {
        pb::UsageReport {
            period: r.period,
            from: r.from,
            to: r.to,
            generated_at: r.generated_at,
            group: r.group.unwrap_or_default(),
            resolution: r.resolution,
            totals: Some(totals(r.totals)),
            users: r
                .users
                .into_iter()
                .map(|u: UserUsage| pb::UserUsage {
                    user: u.user,
                    groups: u.groups,
                    usage: Some(totals(u.usage)),
                    quota: u.quota.map(quota),
                })
                .collect(),
            groups: r
                .groups
                .into_iter()
                .map(|g: GroupUsage| pb::GroupUsage {
                    group: g.group,
                    members: g.members,
                    usage: Some(totals(g.usage)),
                })
                .collect(),
            top_users: r.top_users,
            over_quota: r.over_quota,
            series: r
                .series
                .into_iter()
                .map(|p| pb::UsagePoint {
                    start: p.start,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                })
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl Reports for Api {
    async fn generate_report(
        &self,
        req: Request<pb::GenerateReportRequest>,
    ) -> Result<Response<pb::GenerateReportResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.into_inner();
        let format = Format::parse("format", &r.format).map_err(invalid)?;
        let q = ReportQuery::parse(&r.period, &r.from, &r.to, &r.group).map_err(invalid)?;
        let (report, document) = self
            .call(move |s| {
                let report = s.usage.report(&q, unix_ms(std::time::SystemTime::now()))?;
                let document = render(&report, format);
                Ok((report, document))
            })
            .await?;
        Ok(Response::new(pb::GenerateReportResponse {
            report: Some(report.into()),
            document,
            content_type: format.content_type().into(),
        }))
    }
}

/// What `capybara report generate` asks for (strings as the API takes them).
#[derive(Clone, Debug, Default)]
pub struct ReportRequest {
    /// text, json, csv or html.
    pub format: String,
    /// day, week or month.
    pub period: String,
    /// YYYY-MM-DD.
    pub from: String,
    /// YYYY-MM-DD.
    pub to: String,
    /// A group.
    pub group: String,
}

impl Client {
    /// A usage report: the rendered document and its media type.
    pub async fn generate_report(&self, r: ReportRequest) -> Result<(String, String), ClientError> {
        let answer = ReportsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_REPORT_MESSAGE)
            .generate_report(self.req(pb::GenerateReportRequest {
                format: r.format,
                period: r.period,
                from: r.from,
                to: r.to,
                group: r.group,
            }))
            .await?
            .into_inner();
        Ok((answer.document, answer.content_type))
    }
}
