//! The `Blocklists` service (named source and destination lists), its conversions and client
//! calls.

use capybara_proto::v1::{
    self as pb, blocklists_client::BlocklistsClient, blocklists_server::Blocklists,
};
use tonic::{Request, Response, Status};

use super::{
    client::{Client, ClientError},
    convert::AnswerError,
    handler::Api,
    status::invalid,
};
use crate::{
    blocklist::{Direction, ListName, parse_cidrs},
    net::Cidr,
    service::{
        BlocklistView, EntriesOp, Traffic,
        domain::{Scope, ValidationError},
    },
};

#[tonic::async_trait]
impl Blocklists for Api {
    async fn list_blocklists(
        &self,
        req: Request<pb::ListBlocklistsRequest>,
    ) -> Result<Response<pb::ListBlocklistsResponse>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.get_ref();
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let (lists, more) = self
            .call(move |s| s.lists.blocklists_page(ask.after.as_deref(), ask.size))
            .await?;
        let last = lists
            .last()
            .filter(|_| more)
            .map(|l| crate::service::lists::blocklist_key(l.direction, &l.name));
        Ok(Response::new(pb::ListBlocklistsResponse {
            lists: lists.iter().map(Into::into).collect(),
            next_page_token: super::paging::next_token(last.as_deref()),
        }))
    }

    async fn get_blocklist(
        &self,
        req: Request<pb::GetBlocklistRequest>,
    ) -> Result<Response<pb::Blocklist>, Status> {
        self.auth(&req, Scope::Read)?;
        let r = req.into_inner();
        let dir = direction_from_proto("direction", r.direction).map_err(invalid)?;
        let name = list_name("name", &r.name).map_err(invalid)?;
        let l = self.call(move |s| s.lists.blocklist(dir, &name)).await?;
        Ok(Response::new((&l).into()))
    }

    async fn add_entries(
        &self,
        req: Request<pb::ChangeEntriesRequest>,
    ) -> Result<Response<pb::Blocklist>, Status> {
        change(self, req, EntriesOp::Add).await
    }

    async fn remove_entries(
        &self,
        req: Request<pb::ChangeEntriesRequest>,
    ) -> Result<Response<pb::Blocklist>, Status> {
        change(self, req, EntriesOp::Remove).await
    }

    async fn delete_blocklist(
        &self,
        req: Request<pb::GetBlocklistRequest>,
    ) -> Result<Response<pb::DeleteBlocklistResponse>, Status> {
        let actor = self.auth(&req, Scope::Write)?;
        let r = req.into_inner();
        let dir = direction_from_proto("direction", r.direction).map_err(invalid)?;
        let name = list_name("name", &r.name).map_err(invalid)?;
        self.call(move |s| s.lists.delete_blocklist(&actor, dir, &name))
            .await?;
        Ok(Response::new(pb::DeleteBlocklistResponse {}))
    }
}

/// `AddEntries` and `RemoveEntries`.
async fn change(
    api: &Api,
    req: Request<pb::ChangeEntriesRequest>,
    op: EntriesOp,
) -> Result<Response<pb::Blocklist>, Status> {
    let actor = api.auth(&req, Scope::Write)?;
    let r = req.into_inner();
    let dir = direction_from_proto("direction", r.direction).map_err(invalid)?;
    let name = list_name("name", &r.name).map_err(invalid)?;
    let entries = cidrs("cidrs", &r.cidrs).map_err(invalid)?;
    let l = api
        .call(move |s| s.lists.change_entries(&actor, dir, &name, op, &entries))
        .await?;
    Ok(Response::new((&l).into()))
}

/// The direction of a proto enum value in `field`.
pub fn direction_from_proto(field: &'static str, v: i32) -> Result<Direction, ValidationError> {
    match pb::Direction::try_from(v) {
        Ok(pb::Direction::Source) => Ok(Direction::Source),
        Ok(pb::Direction::Destination) => Ok(Direction::Destination),
        _ => Err(ValidationError::Missing { field }),
    }
}

/// The proto value of a direction.
pub fn direction_to_proto(d: Direction) -> pb::Direction {
    match d {
        Direction::Source => pb::Direction::Source,
        Direction::Destination => pb::Direction::Destination,
    }
}

/// A list name from `field`.
pub fn list_name(field: &'static str, s: &str) -> Result<ListName, ValidationError> {
    ListName::parse(s).map_err(|source| ValidationError::Blocklist { field, source })
}

/// CIDRs from `field` (the error names the entry's index).
pub fn cidrs(field: &'static str, v: &[String]) -> Result<Vec<Cidr>, ValidationError> {
    if v.is_empty() {
        return Err(ValidationError::Missing { field });
    }
    parse_cidrs(v).map_err(|source| ValidationError::Blocklist { field, source })
}

impl From<&BlocklistView> for pb::Blocklist {
    fn from(l: &BlocklistView) -> pb::Blocklist {
        pb::Blocklist {
            direction: direction_to_proto(l.direction) as i32,
            name: l.name.clone(),
            cidrs: l.cidrs.iter().map(ToString::to_string).collect(),
            hit_packets: l.hits.packets,
            hit_bytes: l.hits.bytes,
        }
    }
}

impl TryFrom<pb::Blocklist> for BlocklistView {
    type Error = AnswerError;
    fn try_from(l: pb::Blocklist) -> Result<BlocklistView, AnswerError> {
        Ok(BlocklistView {
            direction: direction_from_proto("list.direction", l.direction)?,
            cidrs: l
                .cidrs
                .iter()
                .map(|c| c.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| AnswerError::Invalid {
                    field: "list.cidrs",
                })?,
            name: l.name,
            hits: Traffic {
                packets: l.hit_packets,
                bytes: l.hit_bytes,
            },
        })
    }
}

impl Client {
    /// Every blocklist.
    pub async fn blocklists(&self) -> Result<Vec<BlocklistView>, ClientError> {
        super::paging::walk(|t| self.blocklists_page(crate::service::core::MAX_PAGE_SIZE as u32, t))
            .await
    }

    /// One page of blocklists (sources first, then by name; `page_size` 0 = the default) and
    /// the next page's token (empty on the last page).
    pub async fn blocklists_page(
        &self,
        page_size: u32,
        page_token: String,
    ) -> Result<(Vec<BlocklistView>, String), ClientError> {
        let r = BlocklistsClient::new(self.channel.clone())
            .list_blocklists(self.req(pb::ListBlocklistsRequest {
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let lists = r
            .lists
            .into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, AnswerError>>()?;
        Ok((lists, r.next_page_token))
    }

    /// Adds (`add`) or removes entries of a list.
    pub async fn change_entries(
        &self,
        direction: Direction,
        name: &str,
        cidrs: Vec<String>,
        add: bool,
    ) -> Result<BlocklistView, ClientError> {
        let msg = pb::ChangeEntriesRequest {
            direction: direction_to_proto(direction) as i32,
            name: name.into(),
            cidrs,
        };
        let mut c = BlocklistsClient::new(self.channel.clone());
        let r = if add {
            c.add_entries(self.req(msg)).await?
        } else {
            c.remove_entries(self.req(msg)).await?
        };
        Ok(r.into_inner().try_into()?)
    }

    /// Deletes a list.
    pub async fn delete_blocklist(
        &self,
        direction: Direction,
        name: &str,
    ) -> Result<(), ClientError> {
        BlocklistsClient::new(self.channel.clone())
            .delete_blocklist(self.req(pb::GetBlocklistRequest {
                direction: direction_to_proto(direction) as i32,
                name: name.into(),
            }))
            .await?;
        Ok(())
    }
}
