//! The `Reputation` service (a source's score explained, the auto-blocked sources), its
//! conversions and client calls.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use capybara_proto::v1::{self as pb, reputation_client::ReputationClient, reputation_server};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::AnswerError,
    handler::Api,
    status::invalid,
};
use crate::service::{
    core::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE},
    domain::{Scope, ValidationError, from_unix_secs, unix_secs},
    reputation::{Block, Part, PartView, ScoreView, Tally, parse_ip},
};

#[tonic::async_trait]
impl reputation_server::Reputation for Api {
    async fn explain_score(
        &self,
        req: Request<pb::ExplainScoreRequest>,
    ) -> Result<Response<pb::ScoreExplanation>, Status> {
        self.auth(&req, Scope::Read)?;
        let ip = parse_ip("ip", &req.into_inner().ip).map_err(invalid)?;
        let v = self.call(move |s| s.reputation.explain(ip)).await?;
        Ok(Response::new((&v).into()))
    }

    async fn list_auto_blocked(
        &self,
        req: Request<pb::ListAutoBlockedRequest>,
    ) -> Result<Response<pb::ListAutoBlockedResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.into_inner();
        let after = match r.page_token.as_str() {
            "" => None,
            t => Some(t.parse::<IpAddr>().map_err(|_| {
                invalid(ValidationError::Value {
                    field: "page_token",
                    reason: format!("{t:?} is not a page token of this call"),
                })
            })?),
        };
        let size = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let (page, more) = self
            .call(move |s| Ok(s.reputation.blocked_page(after, size)))
            .await?;
        Ok(Response::new(pb::ListAutoBlockedResponse {
            next_page_token: match (more, page.last()) {
                (true, Some(b)) => b.ip.to_string(),
                _ => String::new(),
            },
            blocks: page.iter().map(Into::into).collect(),
        }))
    }
}

fn secs(t: SystemTime) -> i64 {
    i64::try_from(unix_secs(t)).unwrap_or(i64::MAX)
}

fn time(s: i64) -> Option<SystemTime> {
    (s > 0).then(|| from_unix_secs(s as u64))
}

fn tenths(points: f64) -> u32 {
    (points * 10.0).round().clamp(0.0, f64::from(u32::MAX)) as u32
}

impl From<&PartView> for pb::ScorePart {
    fn from(p: &PartView) -> pb::ScorePart {
        pb::ScorePart {
            part: p.part.as_str().to_owned(),
            weight: p.weight,
            count: p.count,
            points: p.points,
        }
    }
}

impl From<&Block> for pb::AutoBlock {
    fn from(b: &Block) -> pb::AutoBlock {
        pb::AutoBlock {
            ip: b.ip.to_string(),
            since: secs(b.since),
            until: secs(b.until),
            score: f64::from(b.score) / 10.0,
            threshold: f64::from(b.threshold) / 10.0,
            parts: b
                .parts
                .iter()
                .map(|(p, t)| pb::ScorePart {
                    part: p.as_str().to_owned(),
                    weight: f64::from(p.weight()) / 10.0,
                    count: t.count,
                    points: f64::from(t.score) / 10.0,
                })
                .collect(),
        }
    }
}

impl From<&ScoreView> for pb::ScoreExplanation {
    fn from(v: &ScoreView) -> pb::ScoreExplanation {
        pb::ScoreExplanation {
            ip: v.ip.to_string(),
            enabled: v.enabled,
            score: v.score,
            threshold: v.threshold,
            parts: v.parts.iter().map(Into::into).collect(),
            half_life_s: v.half_life.as_secs(),
            first_seen: v.first_seen.map_or(0, secs),
            last_seen: v.last_seen.map_or(0, secs),
            next_halving: v.next_halving.map_or(0, secs),
            ttl_s: v.ttl.as_secs(),
            blocked: v.blocked.as_ref().map(Into::into),
            in_auto_by_hand: v.in_auto_by_hand,
            allowed: v.allowed,
        }
    }
}

fn part(field: &'static str, s: &str) -> Result<Part, AnswerError> {
    Part::parse(s).ok_or(AnswerError::Invalid { field })
}

fn ip(field: &'static str, s: &str) -> Result<IpAddr, AnswerError> {
    s.parse().map_err(|_| AnswerError::Invalid { field })
}

impl TryFrom<pb::AutoBlock> for Block {
    type Error = AnswerError;
    fn try_from(b: pb::AutoBlock) -> Result<Block, AnswerError> {
        Ok(Block {
            ip: ip("blocked.ip", &b.ip)?,
            since: time(b.since).ok_or(AnswerError::Invalid {
                field: "blocked.since",
            })?,
            until: time(b.until).ok_or(AnswerError::Invalid {
                field: "blocked.until",
            })?,
            score: tenths(b.score),
            threshold: tenths(b.threshold),
            parts: b
                .parts
                .iter()
                .map(|p| {
                    Ok((
                        part("blocked.parts.part", &p.part)?,
                        Tally {
                            count: p.count,
                            score: tenths(p.points),
                        },
                    ))
                })
                .collect::<Result<BTreeMap<_, _>, AnswerError>>()?,
        })
    }
}

impl TryFrom<pb::ScoreExplanation> for ScoreView {
    type Error = AnswerError;
    fn try_from(v: pb::ScoreExplanation) -> Result<ScoreView, AnswerError> {
        Ok(ScoreView {
            ip: ip("ip", &v.ip)?,
            enabled: v.enabled,
            score: v.score,
            threshold: v.threshold,
            parts: v
                .parts
                .iter()
                .map(|p| {
                    Ok(PartView {
                        part: part("parts.part", &p.part)?,
                        weight: p.weight,
                        count: p.count,
                        points: p.points,
                    })
                })
                .collect::<Result<_, AnswerError>>()?,
            half_life: Duration::from_secs(v.half_life_s),
            first_seen: time(v.first_seen),
            last_seen: time(v.last_seen),
            next_halving: time(v.next_halving),
            ttl: Duration::from_secs(v.ttl_s),
            blocked: v.blocked.map(TryInto::try_into).transpose()?,
            in_auto_by_hand: v.in_auto_by_hand,
            allowed: v.allowed,
        })
    }
}

impl Client {
    /// `ip`'s score explained (the agent checks the address, naming the field `ip`).
    pub async fn explain_score(&self, ip: &str) -> Result<ScoreView, ClientError> {
        let r = ReputationClient::new(self.channel.clone())
            .explain_score(self.req(pb::ExplainScoreRequest { ip: ip.to_owned() }))
            .await?
            .into_inner();
        Ok(r.try_into()?)
    }

    /// Every auto-blocked source (every page).
    pub async fn auto_blocked(&self) -> Result<Vec<Block>, ClientError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = ReputationClient::new(self.channel.clone())
                .list_auto_blocked(self.req(pb::ListAutoBlockedRequest {
                    page_size: MAX_PAGE_SIZE as u32,
                    page_token: token,
                }))
                .await?
                .into_inner();
            for b in r.blocks {
                out.push(b.try_into()?);
            }
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }
}
