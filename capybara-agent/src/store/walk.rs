//! Walking a key range without loading it: the history's pages and its pruning read one
//! record at a time from a RocksDB iterator, so their memory does not grow with the history.

use rocksdb::{Direction, IteratorMode, ReadOptions};
use serde::de::DeserializeOwned;

use super::{Cf, Store, StoreError};

/// Where a walk goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// Oldest key first.
    Forward,
    /// Newest key first.
    Backward,
}

/// The first key after every key that starts with `prefix` (keys here are ASCII).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    match end.last_mut() {
        Some(b) if *b < 0xff => *b += 1,
        _ => end.push(0xff),
    }
    end
}

impl Store {
    /// Calls `f` with each record of `cf` whose key starts with `prefix`, in `dir` order,
    /// starting strictly after `after` (in walk order) when given, until `f` returns false.
    /// One record in memory at a time.
    pub fn walk<T: DeserializeOwned>(
        &self,
        cf: Cf,
        prefix: &str,
        dir: Walk,
        after: Option<&str>,
        mut f: impl FnMut(&str, T) -> bool,
    ) -> Result<(), StoreError> {
        let end = prefix_end(prefix);
        let start: &[u8] = match (dir, after) {
            (_, Some(k)) => k.as_bytes(),
            (Walk::Forward, None) => prefix.as_bytes(),
            (Walk::Backward, None) => &end,
        };
        let mode = IteratorMode::From(
            start,
            match dir {
                Walk::Forward => Direction::Forward,
                Walk::Backward => Direction::Reverse,
            },
        );
        let mut read = ReadOptions::default();
        read.fill_cache(false);
        for item in self.db.iterator_cf_opt(self.handle(cf), read, mode) {
            let (k, v) = item.map_err(|source| StoreError::Io {
                op: "scan",
                cf: cf.name(),
                key: prefix.to_owned(),
                source,
            })?;
            if after.is_some_and(|a| a.as_bytes() == &*k) || (dir == Walk::Backward && *k >= *end) {
                continue;
            }
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let key = String::from_utf8_lossy(&k);
            let value = serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                cf: cf.name(),
                key: key.clone().into_owned(),
                source,
            })?;
            if !f(&key, value) {
                break;
            }
        }
        Ok(())
    }
}

impl Store {
    /// Calls `f` with each raw `(key, value)` of `cf` from `start` (inclusive) forwards, in key
    /// order, until `f` returns false or the family ends: the usage rollups' reads (binary
    /// values, read by the million for a month's report). Blocks are not kept in the block
    /// cache, as for [`Store::walk`].
    pub fn walk_raw(
        &self,
        cf: Cf,
        start: &str,
        mut f: impl FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let mut read = ReadOptions::default();
        read.fill_cache(false);
        let mut it = self.db.raw_iterator_cf_opt(self.handle(cf), read);
        it.seek(start.as_bytes());
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let key = std::str::from_utf8(k).unwrap_or_default();
            if !f(key, v) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(|source| StoreError::Io {
            op: "scan",
            cf: cf.name(),
            key: start.to_owned(),
            source,
        })
    }

    /// The raw value under `key` in `cf`.
    pub fn get_raw(&self, cf: Cf, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_pinned_cf(self.handle(cf), key)
            .map(|v| v.map(|b| b.to_vec()))
            .map_err(|source| StoreError::Io {
                op: "get",
                cf: cf.name(),
                key: key.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_a_prefix_both_ways_from_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for k in ["a/1", "b/1", "b/2", "b/3", "c/1"] {
            store.put(Cf::Sessions, k, &k.to_owned()).unwrap();
        }
        let keys = |dir, after| {
            let mut v = Vec::new();
            store
                .walk::<String>(Cf::Sessions, "b/", dir, after, |k, _| {
                    v.push(k.to_owned());
                    true
                })
                .unwrap();
            v
        };
        assert_eq!(keys(Walk::Forward, None), ["b/1", "b/2", "b/3"]);
        assert_eq!(keys(Walk::Backward, None), ["b/3", "b/2", "b/1"]);
        assert_eq!(keys(Walk::Forward, Some("b/1")), ["b/2", "b/3"]);
        assert_eq!(keys(Walk::Backward, Some("b/3")), ["b/2", "b/1"]);
        assert!(keys(Walk::Backward, Some("b/1")).is_empty());
    }
}
