//! Paging of the name-ordered list calls (`ListUsers`, `ListPeers`, `ListTokens`,
//! `ListGroups`, `ListBlocklists`, `ListQuotaTemplates`, `ListConfigTemplates`,
//! `ListConnections`, and `GetStats` of every user, whose pages are of users: each user with all
//! its devices; `ShowQuota` of every user, by user), with the conventions of `ListAudit`: `page_size` 0 = 100 and more than
//! 1000 clamped to 1000 ([`super::audit::page_size`]); `page_token` empty = the first page;
//! `next_page_token` empty on the last page. Items come in key order (the name, or
//! `user/device`), so a token is the last key returned: `n` and the key's bytes in hex (opaque
//! to clients, any key safe in it). A token that does not decode is `INVALID_ARGUMENT` naming
//! `page_token`; one that decodes but names a key since removed simply continues after it.

use tonic::Status;

use super::audit::page_size;

/// What a name page token starts with.
const TOKEN_PREFIX: &str = "n";

/// One page asked for: how many items, after which key.
#[derive(Debug, Clone)]
pub(super) struct PageAsk {
    /// Items per page (1 ..= `MAX_PAGE_SIZE`).
    pub size: usize,
    /// The last key of the previous page; `None` = the first page.
    pub after: Option<String>,
}

impl PageAsk {
    /// The page a request's `page_size` and `page_token` ask for.
    pub fn parse(size: u32, token: &str) -> Result<PageAsk, Status> {
        Ok(PageAsk {
            size: page_size(size),
            after: decode(token)?,
        })
    }

    /// Whether `key` comes after the previous page.
    pub fn wants(&self, key: &str) -> bool {
        self.after.as_deref().is_none_or(|a| key > a)
    }

    /// The page of `items` (already in key order) this asks for, and the next page's token
    /// (empty on the last page).
    pub fn take<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        key: impl Fn(&T) -> String,
    ) -> (Vec<T>, String) {
        let mut out = Vec::new();
        let mut rest = items.into_iter().filter(|t| self.wants(&key(t)));
        for t in rest.by_ref() {
            out.push(t);
            if out.len() == self.size {
                break;
            }
        }
        let next = match (rest.next(), out.last()) {
            (Some(_), Some(last)) => token(&key(last)),
            _ => String::new(),
        };
        (out, next)
    }
}

/// The token that continues after `key`; empty for `None` (the last page).
pub(super) fn next_token(key: Option<&str>) -> String {
    key.map(token).unwrap_or_default()
}

/// The token for `key`.
fn token(key: &str) -> String {
    let mut t = String::with_capacity(1 + 2 * key.len());
    t.push_str(TOKEN_PREFIX);
    for b in key.bytes() {
        t.push_str(&format!("{b:02x}"));
    }
    t
}

/// The key a token continues after; empty = the first page.
fn decode(t: &str) -> Result<Option<String>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Status::invalid_argument(format!(
            "page_token: {t:?} is not a token this call returned"
        ))
    };
    let hex = t.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, Status>>()?;
    String::from_utf8(bytes).map(Some).map_err(|_| bad())
}

/// Walks every page of a list call (the `capybara` CLI prints whole lists): `page` fetches one
/// page at the largest size for a token and answers its items and the next token.
pub(super) async fn walk<T, E, F, Fut>(mut page: F) -> Result<Vec<T>, E>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), E>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        token = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        for key in ["alice", "alice/laptop", "ünï", ""] {
            if key.is_empty() {
                continue;
            }
            assert_eq!(decode(&token(key)).unwrap().as_deref(), Some(key));
        }
        for bad in ["x", "n", "n6", "nzz", "a12", "nff"] {
            let e = decode(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.message().starts_with("page_token:"), "{bad}");
        }
        let ask = PageAsk::parse(2, "").unwrap();
        let (p, next) = ask.take(["a", "b", "c"], |s| s.to_string());
        assert_eq!((p, next.as_str()), (vec!["a", "b"], token("b").as_str()));
        let ask = PageAsk::parse(2, &next).unwrap();
        assert_eq!(
            ask.take(["a", "b", "c"], |s| s.to_string()),
            (vec!["c"], String::new())
        );
        let ask = PageAsk::parse(3, "").unwrap();
        assert_eq!(ask.take(["a", "b", "c"], |s| s.to_string()).1, "");
    }
}
