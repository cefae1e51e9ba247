//! The `Blocklists` service (named source and destination lists), its conversions and client
//! calls.
//!
//! No answer grows with a list (issue 19 item 8; a threat list of 1 000 000 entries is ~15 MB of
//! text, past the 4 MiB message limit): `ListBlocklists`, `AddEntries` and `RemoveEntries`
//! answer each list's `entry_count` with `cidrs` empty; `GetBlocklist` pages the entries in
//! address order (IPv4 before IPv6, then network address, then prefix length), with the
//! conventions of [`super::paging`] (its token carries the last entry's key). Uploads bigger
//! than one message go through `AddEntriesStream`/`RemoveEntriesStream`: the client sends
//! [`ENTRIES_PER_CHUNK`] entries per message, the server reads them all (at most
//! [`MAX_STREAM_ENTRIES`]) and applies them as one change, so the kernel flips once as for a
//! small change.

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
    blocklist::{BlocklistError, Direction, ListName, parse_cidrs},
    net::Cidr,
    service::{
        BlocklistView, EntriesOp, Traffic,
        domain::{Scope, ValidationError},
        lists::{entry_key, entry_key_text, parse_entry_key},
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
        let ask = super::paging::PageAsk::parse(r.page_size, &r.page_token)?;
        let after = match ask.after.as_deref() {
            None => None,
            Some(k) => Some(parse_entry_key(k).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "page_token: {:?} is not a token this call returned",
                    r.page_token
                ))
            })?),
        };
        let size = ask.size;
        let (l, more) = self
            .call(move |s| s.lists.blocklist_entries_page(dir, &name, after, size))
            .await?;
        let last = l
            .cidrs
            .last()
            .filter(|_| more)
            .map(|c| entry_key_text(entry_key(c)));
        let mut answer = pb::Blocklist::from(&l);
        answer.next_page_token = super::paging::next_token(last.as_deref());
        Ok(Response::new(answer))
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

    async fn add_entries_stream(
        &self,
        req: Request<tonic::Streaming<pb::ChangeEntriesRequest>>,
    ) -> Result<Response<pb::Blocklist>, Status> {
        change_stream(self, req, EntriesOp::Add).await
    }

    async fn remove_entries_stream(
        &self,
        req: Request<tonic::Streaming<pb::ChangeEntriesRequest>>,
    ) -> Result<Response<pb::Blocklist>, Status> {
        change_stream(self, req, EntriesOp::Remove).await
    }
}

/// The most entries one `AddEntriesStream` or `RemoveEntriesStream` carries (about 80 MB of
/// text; four times the largest list the tests upload).
pub const MAX_STREAM_ENTRIES: usize = 4 << 20;

/// Entries per message the client sends in a streamed change: about 1 MB of text, a quarter
/// of the 4 MiB message limit even with IPv6 entries.
pub const ENTRIES_PER_CHUNK: usize = 25_000;

/// `AddEntriesStream` and `RemoveEntriesStream`: every chunk is read and checked (an invalid
/// entry is named by its index in the whole stream) before the one change is applied.
async fn change_stream(
    api: &Api,
    req: Request<tonic::Streaming<pb::ChangeEntriesRequest>>,
    op: EntriesOp,
) -> Result<Response<pb::Blocklist>, Status> {
    let actor = api.auth(&req, Scope::Write)?;
    let mut stream = req.into_inner();
    let mut target: Option<(Direction, ListName)> = None;
    let mut entries: Vec<Cidr> = Vec::new();
    while let Some(msg) = stream.message().await? {
        match &target {
            None => {
                let dir = direction_from_proto("direction", msg.direction).map_err(invalid)?;
                let name = list_name("name", &msg.name).map_err(invalid)?;
                target = Some((dir, name));
            }
            Some((dir, name)) => {
                let same_dir = msg.direction == 0
                    || direction_from_proto("direction", msg.direction).ok() == Some(*dir);
                if !same_dir {
                    return Err(Status::invalid_argument(
                        "direction: every chunk of the stream names the first chunk's list",
                    ));
                }
                if !msg.name.is_empty() && msg.name != name.as_str() {
                    return Err(Status::invalid_argument(format!(
                        "name: {:?} is not the first chunk's list {:?}",
                        msg.name,
                        name.as_str()
                    )));
                }
            }
        }
        if entries.len() + msg.cidrs.len() > MAX_STREAM_ENTRIES {
            return Err(Status::invalid_argument(format!(
                "cidrs: more than {MAX_STREAM_ENTRIES} entries in one stream"
            )));
        }
        let offset = entries.len();
        let chunk = parse_cidrs(&msg.cidrs).map_err(|e| {
            let source = match e {
                BlocklistError::InvalidCidr { index, source } => BlocklistError::InvalidCidr {
                    index: index + offset,
                    source,
                },
                e => e,
            };
            invalid(ValidationError::Blocklist {
                field: "cidrs",
                source,
            })
        })?;
        entries.extend(chunk);
    }
    let (dir, name) = target.ok_or_else(|| invalid(ValidationError::Missing { field: "name" }))?;
    if entries.is_empty() {
        return Err(invalid(ValidationError::Missing { field: "cidrs" }));
    }
    let l = api
        .call(move |s| s.lists.change_entries(&actor, dir, &name, op, &entries))
        .await?;
    Ok(Response::new((&l).into()))
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
            entry_count: l.entries as u64,
            next_page_token: String::new(),
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
            entries: usize::try_from(l.entry_count).map_err(|_| AnswerError::Invalid {
                field: "list.entry_count",
            })?,
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

    /// One list with every entry (in address order), fetched page by page.
    pub async fn blocklist(
        &self,
        direction: Direction,
        name: &str,
    ) -> Result<BlocklistView, ClientError> {
        let mut token = String::new();
        let mut whole: Option<BlocklistView> = None;
        loop {
            let (page, next) = self
                .blocklist_page(
                    direction,
                    name,
                    crate::service::core::MAX_PAGE_SIZE as u32,
                    token,
                )
                .await?;
            match &mut whole {
                None => whole = Some(page),
                Some(w) => {
                    w.cidrs.extend(page.cidrs);
                    w.entries = page.entries;
                    w.hits = page.hits;
                }
            }
            if next.is_empty() {
                return Ok(whole.expect("one page fetched"));
            }
            token = next;
        }
    }

    /// One list with one page of its entries (address order; `page_size` 0 = the default) and
    /// the next page's token (empty on the last page).
    pub async fn blocklist_page(
        &self,
        direction: Direction,
        name: &str,
        page_size: u32,
        page_token: String,
    ) -> Result<(BlocklistView, String), ClientError> {
        let r = BlocklistsClient::new(self.channel.clone())
            .get_blocklist(self.req(pb::GetBlocklistRequest {
                direction: direction_to_proto(direction) as i32,
                name: name.into(),
                page_size,
                page_token,
            }))
            .await?
            .into_inner();
        let next = r.next_page_token.clone();
        Ok((r.try_into()?, next))
    }

    /// Adds (`add`) or removes entries of a list; the answer holds the list's entry count,
    /// not its entries ([`Client::blocklist`] fetches those). More than [`ENTRIES_PER_CHUNK`]
    /// entries go through the streaming call, still as one change.
    pub async fn change_entries(
        &self,
        direction: Direction,
        name: &str,
        cidrs: Vec<String>,
        add: bool,
    ) -> Result<BlocklistView, ClientError> {
        let mut c = BlocklistsClient::new(self.channel.clone());
        if cidrs.len() > ENTRIES_PER_CHUNK {
            // Too many for one message: streamed in chunks, applied as one change.
            let mut chunks = Vec::with_capacity(cidrs.len().div_ceil(ENTRIES_PER_CHUNK));
            let mut rest = cidrs.into_iter().peekable();
            while rest.peek().is_some() {
                chunks.push(pb::ChangeEntriesRequest {
                    direction: direction_to_proto(direction) as i32,
                    name: name.into(),
                    cidrs: rest.by_ref().take(ENTRIES_PER_CHUNK).collect(),
                });
            }
            let stream = tokio_stream::iter(chunks);
            let r = if add {
                c.add_entries_stream(self.req(stream)).await?
            } else {
                c.remove_entries_stream(self.req(stream)).await?
            };
            return Ok(r.into_inner().try_into()?);
        }
        let msg = pb::ChangeEntriesRequest {
            direction: direction_to_proto(direction) as i32,
            name: name.into(),
            cidrs,
        };
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
                ..Default::default()
            }))
            .await?;
        Ok(())
    }
}
